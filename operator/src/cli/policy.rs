//! `sluice policy test|eval|build`: the Rego workflow of a policy repository, on the same engine and
//! bundle code the operator and `sluice authz` use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use thiserror::Error;

use crate::policy::Module;
use crate::policy::bundle::{Bundle, BundleError, LoadOptions, merge_objects};
use crate::policy::engine::{Limits, PolicyEngine};
use crate::policy::signing::{SigningAlgorithm, SigningKey, VerificationKey};
use crate::policy::testing::{Outcome, run_tests};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Run the `test_*` rules of Rego files and directories, like `opa test`. Exit 0 only when all pass.
    Test(TestArgs),
    /// Evaluate a query against a bundle (directory or .tar.gz) and an input; prints the value as JSON.
    /// Exit 1 when the result is undefined, 2 on errors.
    Eval(EvalArgs),
    /// Build an OPA bundle (.tar.gz) from a directory: .rego files anywhere, data.json/data.yaml by directory.
    Build(BuildArgs),
    /// Show an AuthorizationPolicy in the cluster: revision, matched workloads, conditions, last error.
    Status {
        name: String,
        #[command(flatten)]
        target: super::rollout::Target,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TestFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Rego files or directories (searched recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = TestFormat::Text)]
    pub format: TestFormat,
    /// Only run tests whose `data.<package>.<rule>` name matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub run: Option<String>,
    /// Print every test, not only failures.
    #[arg(short, long)]
    pub verbose: bool,
    /// Longest one test may run, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// A builtin error fails the test instead of making the call undefined (as `opa test`'s flag).
    #[arg(long)]
    pub strict_builtin_errors: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Bundle directory or .tar.gz.
    #[arg(long, value_name = "PATH")]
    pub bundle: PathBuf,
    /// JSON (or YAML) file holding `input`; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// The query, e.g. `data.envoy.authz.allow` (default: the bundle's own, else that one).
    #[arg(long)]
    pub query: Option<String>,
    /// PEM public key (or HMAC secret file with --verification-alg HS256) the bundle's signature must verify with.
    #[arg(long, value_name = "FILE")]
    pub verification_key: Option<PathBuf>,
    /// Algorithm of --verification-key.
    #[arg(long, default_value = "RS256")]
    pub verification_alg: SigningAlgorithm,
    /// A builtin error is an evaluation error (exit 2) instead of an undefined call (as `opa eval`'s flag).
    #[arg(long)]
    pub strict_builtin_errors: bool,
    /// Longest the evaluation may run, in milliseconds. (The request path of `sluice authz` has its own,
    /// much shorter budget: `--eval-timeout-ms`.)
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Directory holding the policy.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Where to write the bundle.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Revision to record in .manifest (default: a hash of the content).
    #[arg(long)]
    pub revision: Option<String>,
    /// Sign the bundle with this PEM private key (or HMAC secret file with --signing-alg HS256).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Algorithm of --signing-key.
    #[arg(long, default_value = "RS256")]
    pub signing_alg: SigningAlgorithm,
    /// `keyid` recorded in the signature, matched by OPA's `keys` configuration.
    #[arg(long)]
    pub key_id: Option<String>,
    /// Skip running the bundle's tests before building it.
    #[arg(long)]
    pub skip_tests: bool,
}

#[derive(Debug, Error)]
pub enum PolicyCliError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON or YAML: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error(
        "{path}: data.{at} is already defined by another path; data documents may only add keys"
    )]
    DataConflict { path: PathBuf, at: String },
    #[error("invalid --run regular expression: {0}")]
    Filter(#[from] regex::Error),
    #[error("{0}")]
    Compile(#[from] crate::policy::engine::CompileError),
    #[error("evaluating {query}: {source}")]
    Eval {
        query: String,
        #[source]
        source: crate::policy::engine::EvalError,
    },
    #[error("{0}")]
    Signing(#[from] crate::policy::signing::SigningError),
    #[error("{failed} tests failed; not building the bundle (use --skip-tests to build anyway)")]
    TestsFailed { failed: usize },
    #[error("{0}")]
    Cluster(#[from] super::rollout::RolloutCliError),
}

pub fn run(command: PolicyCommand) -> Result<ExitCode, PolicyCliError> {
    match command {
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Eval(args) => eval(args),
        PolicyCommand::Build(args) => build(args),
        PolicyCommand::Status { name, target } => Ok(super::rollout::policy_status(target, name)?),
    }
}

/// Loads files and directories the way `opa test` does: modules from `.rego` files, data files by directory.
fn load_sources(paths: &[PathBuf]) -> Result<(Vec<Module>, serde_json::Value), PolicyCliError> {
    let mut modules = Vec::new();
    let mut data = serde_json::Map::new();
    // Data from several paths merges like OPA's: objects combine, any other overlap is an error.
    let mut add = |path: &Path, document: serde_json::Value| match document {
        serde_json::Value::Object(document) => merge_objects(&mut data, document, &mut Vec::new())
            .map_err(|at| PolicyCliError::DataConflict {
                path: path.to_owned(),
                at: at.join("."),
            }),
        _ => Err(PolicyCliError::Input {
            path: path.to_owned(),
            reason: "a data document must be a JSON object".into(),
        }),
    };
    for path in paths {
        if path.is_dir() {
            let bundle = Bundle::from_dir(path, &LoadOptions::default())?;
            modules.extend(bundle.modules);
            add(path, bundle.data)?;
        } else {
            let source = read_to_string(path)?;
            if path.extension().is_some_and(|e| e == "rego") {
                modules.push(Module {
                    path: path.display().to_string(),
                    source,
                });
            } else {
                add(path, parse_document(path, &source)?)?;
            }
        }
    }
    Ok((modules, serde_json::Value::Object(data)))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, PolicyCliError> {
    std::fs::read(path).map_err(|source| PolicyCliError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, PolicyCliError> {
    std::fs::read_to_string(path).map_err(|source| PolicyCliError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_document(path: &Path, text: &str) -> Result<serde_json::Value, PolicyCliError> {
    serde_json::from_str(text).or_else(|json_error| {
        serde_saphyr::from_str(text).map_err(|_| PolicyCliError::Input {
            path: path.to_owned(),
            reason: json_error.to_string(),
        })
    })
}

fn test(args: TestArgs) -> Result<ExitCode, PolicyCliError> {
    let (modules, data) = load_sources(&args.paths)?;
    let filter = args.run.as_deref().map(regex::Regex::new).transpose()?;
    let limits = Limits {
        max_eval_time: std::time::Duration::from_millis(args.timeout_ms.max(1)),
        strict_builtin_errors: args.strict_builtin_errors,
        ..Limits::default()
    };
    let report = run_tests(&modules, &data, filter.as_ref(), limits)?;
    let output = match args.format {
        TestFormat::Text => report.render_text(args.verbose),
        TestFormat::Json => report.render_json().to_string(),
    };
    print(&output)?;
    Ok(if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print(text: &str) -> Result<(), PolicyCliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                stdout.write_all(b"\n")
            }
        })
        .map_err(|source| PolicyCliError::Write {
            path: "<stdout>".into(),
            source,
        })
}

fn eval(args: EvalArgs) -> Result<ExitCode, PolicyCliError> {
    let mut options = LoadOptions::default();
    if let Some(path) = &args.verification_key {
        let key = read_bytes(path)?;
        let alg = args.verification_alg;
        options.verification_key = Some(if alg.is_hmac() {
            VerificationKey::from_secret(alg, &key)?
        } else {
            VerificationKey::from_pem(alg, &key)?
        });
    }
    let bundle = Bundle::load(&args.bundle, &options)?;
    let input = match &args.input {
        None => serde_json::Value::Null,
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
                PolicyCliError::Read {
                    path: path.clone(),
                    source,
                }
            })?;
            parse_document(path, &text)?
        }
        Some(path) => parse_document(path, &read_to_string(path)?)?,
    };
    let query = args
        .query
        .or_else(|| bundle_query(&bundle))
        .unwrap_or_else(|| crate::api::DEFAULT_QUERY.to_owned());
    let limits = Limits {
        max_eval_time: std::time::Duration::from_millis(args.timeout_ms.max(1)),
        strict_builtin_errors: args.strict_builtin_errors,
        ..Limits::default()
    };
    let mut engine = PolicyEngine::compile(&bundle.modules, &bundle.data, limits)?;
    match engine.eval(&query, &input) {
        Ok(Some(value)) => {
            print(&value.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(None) => {
            eprintln!("undefined");
            Ok(ExitCode::from(1))
        }
        Err(source) => Err(PolicyCliError::Eval { query, source }),
    }
}

/// The decision an AuthorizationPolicy bundle names in its manifest metadata.
fn bundle_query(bundle: &Bundle) -> Option<String> {
    bundle
        .manifest
        .metadata
        .as_ref()?
        .pointer("/sluice/query")?
        .as_str()
        .map(str::to_owned)
}

fn build(args: BuildArgs) -> Result<ExitCode, PolicyCliError> {
    let mut bundle = Bundle::from_dir(&args.path, &LoadOptions::default())?;
    if let Some(revision) = args.revision {
        bundle.manifest.revision = revision;
    }
    if !args.skip_tests {
        let report = run_tests(&bundle.modules, &bundle.data, None, Limits::default())?;
        if !report.all_passed() {
            print(&report.render_text(false))?;
            let failed = report
                .results
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Fail | Outcome::Error(_)))
                .count();
            return Err(PolicyCliError::TestsFailed { failed });
        }
    } else {
        // Still refuse modules that do not compile: OPA would refuse the bundle.
        PolicyEngine::compile(&bundle.modules, &bundle.data, Limits::default())?;
    }
    if let Some(path) = &args.signing_key {
        let key = read_bytes(path)?;
        let alg = args.signing_alg;
        let mut key = if alg.is_hmac() {
            SigningKey::from_secret(alg, &key)?
        } else {
            SigningKey::from_pem(alg, &key)?
        };
        if let Some(id) = &args.key_id {
            key = key.with_key_id(id.clone());
        }
        crate::policy::signing::sign(&mut bundle, &key)?;
    }
    let bytes = bundle.to_tar_gz()?;
    std::fs::write(&args.output, &bytes).map_err(|source| PolicyCliError::Write {
        path: args.output.clone(),
        source,
    })?;
    eprintln!(
        "wrote {} ({} bytes, revision {}, roots {:?}, {} modules)",
        args.output.display(),
        bytes.len(),
        bundle.manifest.revision,
        bundle.manifest.roots,
        bundle.modules.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_from_several_paths_merges_and_conflicts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let roles = write("roles.json", r#"{"roles": {"admin": ["GET"]}}"#);
        let more = write("more.yaml", "roles:\n  viewer: [GET]\nlimits: {rps: 10}\n");
        let module = write("p.rego", "package p\n\nx := 1\n");
        let (modules, data) = load_sources(&[roles.clone(), more, module]).unwrap();
        assert_eq!(modules.len(), 1);
        assert_eq!(
            data,
            serde_json::json!({"roles": {"admin": ["GET"], "viewer": ["GET"]}, "limits": {"rps": 10}})
        );
        let clash = write("clash.json", r#"{"roles": {"admin": ["POST"]}}"#);
        match load_sources(&[roles, clash]) {
            Err(PolicyCliError::DataConflict { at, .. }) => assert_eq!(at, "roles.admin"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let scalar = write("scalar.json", "3");
        assert!(matches!(
            load_sources(&[scalar]),
            Err(PolicyCliError::Input { .. })
        ));
    }
}
