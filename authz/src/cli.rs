//! `sluice authz` (and the `sluice-authz` sidecar binary): flags and start-up of the ext_authz decision service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use thiserror::Error;

use crate::decision_log::{DEFAULT_MASKED_HEADERS, DecisionLog};
use crate::grpc::CheckService;
use crate::input::InputOptions;
use crate::metrics::AuthzMetrics;
use crate::source::{BundleSource, Loader};
use crate::{Authorizer, Overrides};
use sluice_rego::bundle::LoadOptions;
use sluice_rego::engine::Limits;
use sluice_rego::signing::{SigningAlgorithm, VerificationKey};

#[derive(Debug, clap::Args)]
pub struct AuthzArgs {
    /// The bundle: a .tar.gz or directory (re-read when it changes, e.g. a mounted ConfigMap), or an
    /// OPA bundle server URL such as http://sluice.sluice-system:8181/bundles/NAMESPACE/NAME (long-polled).
    #[arg(long, value_name = "PATH|URL")]
    pub bundle: BundleSource,
    /// Address of the gRPC Authorization service (Envoy `grpc_service`).
    #[arg(long, default_value = "0.0.0.0:9191")]
    pub grpc_addr: SocketAddr,
    /// Also serve Envoy's HTTP ext_authz service (`http_service`) on this address.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Envoy's `http_service.path_prefix`, removed from the path the policy sees.
    #[arg(long, default_value = "")]
    pub http_path_prefix: String,
    /// HTTP mode: parse request bodies that arrive without the x-envoy-auth-partial-body header.
    /// Only safe when Envoy's with_request_body.allow_partial_message is false; by default such
    /// requests are denied with 400, since a truncated body could hide fields from the policy.
    #[arg(long)]
    pub http_allow_unsignalled_body: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8282")]
    pub metrics_addr: SocketAddr,
    /// The decision to evaluate (default: the bundle's own, else data.envoy.authz.allow).
    #[arg(long)]
    pub query: Option<String>,
    /// Evaluate and log, but allow every request.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow requests the policy cannot decide (undefined, malformed result, evaluation error).
    #[arg(long)]
    pub fail_open: bool,
    /// Builtin errors fail the evaluation, which denies the request (unless --fail-open), instead of
    /// making the call undefined (OPA's --strict-builtin-errors; a bundle's metadata can also ask for it).
    #[arg(long)]
    pub strict_builtin_errors: bool,
    /// How often a bundle file or directory is checked for changes, in seconds.
    #[arg(long, default_value_t = 1)]
    pub poll_interval_secs: u64,
    /// How long one long-poll request to a bundle server waits for a new revision, in seconds.
    #[arg(long, default_value_t = 60)]
    pub long_poll_secs: u64,
    /// PEM public key (or HMAC secret file) bundles must be signed with.
    #[arg(long, value_name = "FILE")]
    pub verification_key: Option<PathBuf>,
    /// Algorithm of --verification-key.
    #[arg(long, default_value = "RS256")]
    pub verification_alg: SigningAlgorithm,
    /// Decision log lines per second on stdout (0 turns decision logs off).
    #[arg(long, default_value_t = 100)]
    pub decision_log_rate: u32,
    /// Request headers whose values are masked in decision logs (repeat the flag).
    #[arg(long = "mask-header", value_name = "NAME", default_values_t = DEFAULT_MASKED_HEADERS.iter().map(|h| h.to_string()))]
    pub mask_headers: Vec<String>,
    /// Do not parse request bodies into input.parsed_body (OPA-Envoy's skip-request-body-parse).
    #[arg(long)]
    pub skip_request_body_parse: bool,
    /// Longest one evaluation may run, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub eval_timeout_ms: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Log format (application logs on stderr; decision logs are JSON lines on stdout).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Error)]
pub enum AuthzError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read --verification-key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Signing(#[from] sluice_rego::signing::SigningError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

pub fn run(args: AuthzArgs) -> Result<(), AuthzError> {
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(2)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        // Policies evaluate on the worker threads; deep rule chains need more than the default 2 MiB.
        .thread_stack_size(8 << 20)
        .enable_all()
        .build()
        .map_err(AuthzError::Runtime)?;
    runtime.block_on(serve(args))
}

async fn listen(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, AuthzError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AuthzError::Listen { what, addr, source })
}

async fn serve(args: AuthzArgs) -> Result<(), AuthzError> {
    init_logging(args.log_format);
    install_crypto_provider();
    let mut options = LoadOptions::default();
    if let Some(path) = &args.verification_key {
        let key = std::fs::read(path).map_err(|source| AuthzError::Key {
            path: path.clone(),
            source,
        })?;
        let alg = args.verification_alg;
        options.verification_key = Some(if alg.is_hmac() {
            VerificationKey::from_secret(alg, &key)?
        } else {
            VerificationKey::from_pem(alg, &key)?
        });
    }
    let grpc_listener = listen("gRPC", args.grpc_addr).await?;
    let http_listener = match args.http_addr {
        Some(addr) => Some(listen("HTTP ext_authz", addr).await?),
        None => None,
    };
    let admin_listener = listen("metrics", args.metrics_addr).await?;

    let metrics = AuthzMetrics::new();
    let log = (args.decision_log_rate > 0).then(|| {
        DecisionLog::spawn(
            args.decision_log_rate,
            args.mask_headers.clone(),
            std::io::LineWriter::new(std::io::stdout()),
            metrics.log_dropped.clone(),
        )
    });
    let input_options = InputOptions {
        skip_request_body_parse: args.skip_request_body_parse,
        ..InputOptions::default()
    };
    let authorizer = Arc::new(Authorizer::new(metrics, log, input_options));
    let loader = Loader {
        authorizer: authorizer.clone(),
        overrides: Overrides {
            query: args.query.clone(),
            dry_run: args.dry_run,
            fail_open: args.fail_open,
            strict_builtin_errors: args.strict_builtin_errors,
        },
        options: Arc::new(options),
        limits: Limits {
            max_eval_time: Duration::from_millis(args.eval_timeout_ms.max(1)),
            ..Limits::default()
        },
    };
    let loading = match args.bundle.clone() {
        BundleSource::Path(path) => tokio::spawn(
            loader.watch_path(path, Duration::from_secs(args.poll_interval_secs.max(1))),
        ),
        BundleSource::Url(url) => {
            tokio::spawn(loader.poll_url(url, Duration::from_secs(args.long_poll_secs.max(1))))
        }
    };
    let addr =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        grpc_addr = addr(&grpc_listener),
        http_addr = http_listener.as_ref().map(addr),
        metrics_addr = addr(&admin_listener),
        bundle = ?args.bundle,
        "sluice authz starting"
    );
    let admin = tokio::spawn({
        let router = crate::http::admin_router(authorizer.clone());
        async move { axum::serve(admin_listener, router).await }
    });
    let http = http_listener.map(|listener| {
        let options = crate::http::HttpCheckOptions {
            path_prefix: args.http_path_prefix.clone(),
            allow_unsignalled_body: args.http_allow_unsignalled_body,
        };
        let router = crate::http::check_router(authorizer.clone(), &options);
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
            let _ = stream.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, router).await })
    });
    let service = AuthorizationServer::new(CheckService {
        authorizer: authorizer.clone(),
    });
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait for delayed ACKs (tens of ms at the tail).
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            shutdown_signal(),
        )
        .await;
    loading.abort();
    admin.abort();
    if let Some(http) = http {
        http.abort();
    }
    tracing::info!("sluice authz stopped");
    result.map_err(AuthzError::from)
}

/// Log format of application logs (on stderr).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Application logs on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// rustls needs one process-wide crypto provider for the bundle server client (https:// bundle URLs).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
