//! `sluice-authz`: the ext_authz sidecar on its own, with no Kubernetes client linked. The same server as
//! `sluice authz` (same flags), for images that run beside every workload.

use std::process::ExitCode;

use clap::Parser;
use sluice_authz::cli::AuthzArgs;

/// Envoy ext_authz decision service: evaluates an OPA bundle's policy for each request.
#[derive(Parser)]
#[command(name = "sluice-authz", version)]
struct Cli {
    #[command(flatten)]
    args: AuthzArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match sluice_authz::cli::run(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
