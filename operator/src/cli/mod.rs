//! Command-line parsing and output. Each subcommand calls into the library; nothing here holds logic.

pub use sluice_authz::cli as authz;
pub mod policy;
pub mod rollout;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Run the Rollout controller (uses $KUBECONFIG, or the in-cluster service account).
    Operator(OperatorArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD with --out-dir).
    Crd {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Serve Envoy ext_authz decisions (gRPC, and optionally HTTP) from a policy bundle.
    Authz(Box<authz::AuthzArgs>),
    /// Look at and steer Rollouts: get, list, promote, abort, pause, resume, retry, undo (also `kubectl sluice`).
    Rollout {
        #[command(flatten)]
        target: rollout::Target,
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
    /// Run the release planner offline over a metric series and print the timeline.
    Simulate(SimulateArgs),
    /// Test, evaluate and build Rego policies and OPA bundles.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
}

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Prometheus that scrapes the mesh; every Rollout's metrics are queried there.
    #[arg(
        long,
        env = "SLUICE_PROMETHEUS_URL",
        default_value = "http://prometheus.istio-system:9090"
    )]
    pub prometheus_url: String,
    /// Timeout of one Prometheus query, in seconds.
    #[arg(long, default_value_t = 5)]
    pub prometheus_timeout_secs: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Address of the OPA-compatible bundle server (`GET /bundles/<namespace>/<name>`).
    #[arg(long, default_value = "0.0.0.0:8181")]
    pub bundle_addr: std::net::SocketAddr,
    /// Sign every bundle the operator serves with this PEM private key (or HMAC secret file with
    /// --bundle-signing-alg HS256), so OPA (`keys` + `signing`) and `sluice authz --verification-key` can
    /// refuse a bundle altered on the way. Mount it from a Secret.
    #[arg(long, env = "SLUICE_BUNDLE_SIGNING_KEY", value_name = "FILE")]
    pub bundle_signing_key: Option<PathBuf>,
    /// Algorithm of --bundle-signing-key.
    #[arg(long, default_value = "RS256")]
    pub bundle_signing_alg: crate::policy::signing::SigningAlgorithm,
    /// `keyid` written into served bundles' signatures (what OPA's `signing.keyid` names).
    #[arg(long, value_name = "ID")]
    pub bundle_signing_key_id: Option<String>,
    /// AlertProvider (`NAMESPACE/NAME`) for Rollouts that configure no alerts; they get warnings and errors.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub default_alert_provider: Option<String>,
    /// Timeout of one alert delivery, in seconds.
    #[arg(long, default_value_t = 10)]
    pub alert_timeout_secs: u64,
    /// HTTPS proxy for alert deliveries.
    #[arg(long, env = "SLUICE_ALERT_PROXY")]
    pub alert_proxy: Option<String>,
    /// Let MetricTemplates without keys of their own query Azure Monitor and CloudWatch with the operator's
    /// own cloud identity (Azure workload identity, AWS environment keys or EKS Pod Identity). Off by default:
    /// whoever may write a MetricTemplate could then read any metric that identity can read.
    #[arg(long, env = "SLUICE_METRIC_TEMPLATES_USE_OPERATOR_IDENTITY")]
    pub metric_templates_use_operator_identity: bool,
    /// Run as one of several replicas: only the holder of a Lease reconciles and serves bundles; the others
    /// wait (not ready) and take over when the leader stops renewing it.
    #[arg(long, env = "SLUICE_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: the Pod's own, from POD_NAMESPACE, else sluice-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    pub leader_election_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "sluice-operator")]
    pub leader_election_lease: String,
    /// How long a leader's Lease is valid after its last renewal, in seconds: the longest failover after a
    /// leader dies without releasing it (a leader that stops cleanly releases it at once).
    #[arg(long, default_value_t = 15)]
    pub leader_election_lease_secs: u64,
    /// Requests per second the operator may send the API server (watches and Lease renewals excepted);
    /// status, route and scale writes are served first when requests queue.
    #[arg(long, default_value_t = 200.0)]
    pub api_qps: f64,
    /// Requests the operator may send at once above --api-qps after a quiet spell.
    #[arg(long, default_value_t = 400)]
    pub api_burst: u32,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The Rollout (YAML or JSON; only its spec is used).
    #[arg(value_name = "ROLLOUT.yaml")]
    pub rollout: PathBuf,
    /// Metric series: CSV `time,metric,value,requests` (seconds since the release started) or a JSON array.
    #[arg(long, value_name = "SERIES")]
    pub metrics: PathBuf,
    /// Seconds until the canary is ready.
    #[arg(long, default_value_t = 0.0)]
    pub ready_after: f64,
    /// Stop after this many simulated seconds.
    #[arg(long, default_value_t = 3600)]
    pub limit_secs: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = SimulateFormat::Text)]
    pub format: SimulateFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SimulateFormat {
    Text,
    Json,
}

pub use sluice_authz::cli::{LogFormat, init_logging};

#[derive(Debug, Error)]
pub enum CliError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr} for metrics: {source}")]
    MetricsAddr {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for bundles: {source}")]
    BundleAddr {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Policy(#[from] policy::PolicyCliError),
    #[error("{0}")]
    Authz(#[from] authz::AuthzError),
    #[error("{0}")]
    Rollout(#[from] rollout::RolloutCliError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Rollout: {reason}")]
    BadRollout { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Series {
        path: PathBuf,
        #[source]
        source: crate::rollout::simulate::SeriesError,
    },
    #[error(
        "leader election on Lease {namespace}/{lease}: {message} (the operator's ServiceAccount needs get, create, \
         update and patch on leases.coordination.k8s.io there, see config/base/rbac.yaml)"
    )]
    LeaderElection {
        namespace: String,
        lease: String,
        message: String,
    },
    #[error(
        "lost the leadership of Lease {0}: stopping, so that a restart competes again instead of writing beside \
         the new leader"
    )]
    LeadershipLost(String),
    #[error("no usable Kubernetes configuration (set KUBECONFIG or run in a cluster): {0}")]
    Kubeconfig(#[source] kube::Error),
    #[error("cannot read --bundle-signing-key {path}: {source}")]
    SigningKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid --bundle-signing-key: {0}")]
    SigningKey(#[source] crate::policy::signing::SigningError),
    #[error("invalid --default-alert-provider {0:?}: expected NAMESPACE/NAME")]
    DefaultAlertProvider(String),
    #[error("cannot set up alert delivery: {0}")]
    Alerts(#[source] crate::notify::DeliveryError),
    #[error("invalid --prometheus-url: {0}")]
    Prometheus(#[source] crate::metrics::ProviderError),
    #[error("could not render the CRDs as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// Exit status for this error: 2 for policy errors (1 means "tests failed" or "undefined" there).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Policy(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Operator(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            runtime.block_on(operator(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command } => Ok(policy::run(command)?),
        Command::Rollout { target, command } => Ok(rollout::run(target, command)?),
        Command::Simulate(args) => simulate(args),
        Command::Authz(args) => {
            authz::run(*args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd { out_dir: None } => {
            let yaml = crate::api::all_crds_yaml()?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(yaml.as_bytes())
                .map_err(|source| CliError::Write {
                    path: "<stdout>".into(),
                    source,
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd { out_dir: Some(dir) } => {
            for crd in crate::api::crds() {
                let path = dir.join(crate::api::crd_file_name(&crd));
                std::fs::write(&path, crate::api::crd_yaml(&crd)?)
                    .map_err(|source| CliError::Write { path, source })?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn simulate(args: SimulateArgs) -> Result<ExitCode, CliError> {
    use crate::rollout::simulate;
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| CliError::Read {
            path: path.clone(),
            source,
        })
    };
    let text = read(&args.rollout)?;
    let document: serde_json::Value =
        serde_saphyr::from_str(&text).map_err(|e| CliError::BadRollout {
            path: args.rollout.clone(),
            reason: e.to_string(),
        })?;
    let spec: crate::api::RolloutSpec =
        serde_json::from_value(document.get("spec").cloned().unwrap_or(document)).map_err(|e| {
            CliError::BadRollout {
                path: args.rollout.clone(),
                reason: e.to_string(),
            }
        })?;
    let series =
        simulate::parse_series(&read(&args.metrics)?).map_err(|source| CliError::Series {
            path: args.metrics.clone(),
            source,
        })?;
    let timeline = simulate::simulate(
        &spec,
        &series,
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs_f64(args.ready_after.max(0.0)),
        std::time::Duration::from_secs(args.limit_secs),
    );
    let output = match args.format {
        SimulateFormat::Text => simulate::render(&timeline),
        SimulateFormat::Json => serde_json::to_string_pretty(&timeline).unwrap_or_default() + "\n",
    };
    std::io::stdout()
        .lock()
        .write_all(output.as_bytes())
        .map_err(|source| CliError::Write {
            path: "<stdout>".into(),
            source,
        })?;
    Ok(ExitCode::SUCCESS)
}

/// The key served bundles are signed with, read once at start-up (a bad key stops the operator there).
fn bundle_signing_key(
    args: &OperatorArgs,
) -> Result<Option<crate::policy::signing::SigningKey>, CliError> {
    use crate::policy::signing::SigningKey;
    let Some(path) = &args.bundle_signing_key else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|source| CliError::SigningKeyFile {
        path: path.clone(),
        source,
    })?;
    let alg = args.bundle_signing_alg;
    let key = if alg.is_hmac() {
        SigningKey::from_secret(alg, &bytes)
    } else {
        SigningKey::from_pem(alg, &bytes)
    }
    .map_err(CliError::SigningKey)?;
    Ok(Some(match &args.bundle_signing_key_id {
        Some(id) => key.with_key_id(id.clone()),
        None => key,
    }))
}

async fn operator(args: OperatorArgs) -> Result<(), CliError> {
    init_logging(args.log_format);
    let listener = crate::telemetry::bind(args.metrics_addr)
        .await
        .map_err(|source| CliError::MetricsAddr {
            addr: args.metrics_addr,
            source,
        })?;
    let bundle_listener = tokio::net::TcpListener::bind(args.bundle_addr)
        .await
        .map_err(|source| CliError::BundleAddr {
            addr: args.bundle_addr,
            source,
        })?;
    let prometheus = crate::metrics::Prometheus::new(
        &args.prometheus_url,
        std::time::Duration::from_secs(args.prometheus_timeout_secs.max(1)),
    )
    .map_err(CliError::Prometheus)?;
    let default_alert = match &args.default_alert_provider {
        None => None,
        Some(text) => {
            let (namespace, name) = text
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
                .ok_or_else(|| CliError::DefaultAlertProvider(text.clone()))?;
            Some(crate::api::RolloutAlert {
                name: "default".into(),
                severity: crate::api::AlertSeverity::Warn,
                provider_ref: crate::api::ProviderRef {
                    name: name.into(),
                    namespace: Some(namespace.into()),
                },
            })
        }
    };
    let signing = bundle_signing_key(&args)?;
    let deliverer = crate::notify::Deliverer::new(
        std::time::Duration::from_secs(args.alert_timeout_secs.max(1)),
        args.alert_proxy.as_deref(),
    )
    .map_err(CliError::Alerts)?;
    let config = kube::Config::infer()
        .await
        .map_err(|e| CliError::Kubeconfig(kube::Error::InferConfig(e)))?;
    let limiter = crate::client::Limiter::new(args.api_qps, args.api_burst);
    let client = crate::client::limited_client(config, limiter).map_err(CliError::Kubeconfig)?;
    let telemetry = std::sync::Arc::new(crate::telemetry::Telemetry::new());
    let metrics_addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let bundle_addr = bundle_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(metrics_addr, bundle_addr, prometheus = %args.prometheus_url, "sluice operator starting");
    telemetry.expect_ready(&[
        crate::controller::READY_COMPONENT,
        crate::controller::authz::READY_COMPONENT,
    ]);
    let server = tokio::spawn(crate::telemetry::serve(listener, telemetry.clone()));
    let bundles = crate::policy::server::BundleStore::default();
    let bundle_server = tokio::spawn(crate::policy::server::serve(
        bundle_listener,
        bundles.clone(),
    ));
    let election_client = client.clone();
    let controllers = async {
        futures::join!(
            crate::controller::run(
                client.clone(),
                prometheus,
                telemetry.clone(),
                deliverer,
                default_alert,
                args.metric_templates_use_operator_identity,
            ),
            crate::controller::authz::run(client.clone(), bundles, telemetry, signing),
        );
    };
    let result = if args.leader_elect {
        lead(&args, election_client, controllers).await
    } else {
        controllers.await;
        Ok(())
    };
    server.abort();
    bundle_server.abort();
    tracing::info!("sluice operator stopped");
    result
}

/// Waits for the Lease, then runs `controllers` while holding it. Losing it stops the operator (the
/// controllers cannot be trusted to have stopped writing otherwise); a clean stop releases it, so a standby
/// takes over at once instead of after the Lease's duration.
async fn lead(
    args: &OperatorArgs,
    client: kube::Client,
    controllers: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let namespace = args.leader_election_namespace.clone();
    let lease = args.leader_election_lease.clone();
    let failed = |message: String| CliError::LeaderElection {
        namespace: namespace.clone(),
        lease: lease.clone(),
        message,
    };
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let duration = args.leader_election_lease_secs.max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, &lease)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .with_field_manager(format!("{}-lease", crate::api::FIELD_MANAGER))
        .build()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (mut leading, election) = manager.watch().await;
    tracing::info!(lease = %format!("{namespace}/{lease}"), %identity, "waiting to lead");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => changed.map_err(|_| failed("the election stopped".into()))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
    tracing::info!(lease = %format!("{namespace}/{lease}"), %identity, "leading");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    let result = tokio::select! {
        () = controllers => Ok(()),
        () = lost => Err(CliError::LeadershipLost(format!("{namespace}/{lease}"))),
    };
    // Closing the channel makes the election task release the Lease.
    drop(leading);
    match election.await {
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "could not release the Lease; it expires on its own")
        }
        Err(err) => tracing::warn!(error = %err, "the election task failed"),
        Ok(Ok(_)) => tracing::info!("released the Lease"),
    }
    result
}
