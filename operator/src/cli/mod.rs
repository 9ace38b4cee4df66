//! Command-line parsing and output. Each subcommand calls into the library; nothing here holds logic.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thiserror::Error;

/// Progressive delivery and authorization for service meshes.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD with --out-dir).
    Crd {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error("could not render the CRDs as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Crd { out_dir: None } => {
            let yaml = crate::api::all_crds_yaml()?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(yaml.as_bytes())
                .map_err(|source| CliError::Write {
                    path: "<stdout>".into(),
                    source,
                })
        }
        Command::Crd { out_dir: Some(dir) } => {
            for crd in crate::api::crds() {
                let path = dir.join(crate::api::crd_file_name(&crd));
                std::fs::write(&path, crate::api::crd_yaml(&crd)?)
                    .map_err(|source| CliError::Write { path, source })?;
            }
            Ok(())
        }
    }
}
