//! `sluice-sandbox --listen 127.0.0.1:PORT --kubeconfig PATH`: serve the Kubernetes-API sandbox until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice_e2e::{Sandbox, SandboxConfig};

/// Local Kubernetes-API sandbox for trying and testing Sluice (not a production API server).
#[derive(Debug, Parser)]
#[command(name = "sluice-sandbox", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the sandbox here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds before Deployments and StatefulSets report ready replicas.
    #[arg(long, default_value_t = 300)]
    ready_delay_ms: u64,
    /// Watch events kept for replay; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// Seconds between bookmarks on idle watches that allow them.
    #[arg(long, default_value_t = 5)]
    bookmark_interval_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = SandboxConfig {
        ready_delay: Duration::from_millis(args.ready_delay_ms),
        history_limit: args.watch_history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs.max(1)),
    };
    let sandbox = match Sandbox::start(args.listen, config).await {
        Ok(sandbox) => sandbox,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.kubeconfig
        && let Err(err) = sandbox.write_kubeconfig(path)
    {
        eprintln!("error: cannot write kubeconfig {}: {err}", path.display());
        return ExitCode::FAILURE;
    }
    // Scripts wait for this line: it is printed only once the port accepts connections.
    println!("sluice-sandbox listening on {}", sandbox.url());
    tokio::select! {
        result = sandbox.wait() => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: sandbox stopped: {err}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}
