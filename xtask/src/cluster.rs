//! `cargo xtask cluster up | down | status`: the sluice-testcluster control plane as detached background
//! processes, recorded in `.cluster/state.json` (gitignored) so that `down` and `status` find them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use sluice_testcluster::{Cluster, ClusterOptions, ClusterState, PolicyTools, Tools};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Build the pinned control-plane binaries (and fetch the mesh CRDs) if they are not cached yet.
    Build,
    /// Build the binaries if needed, start the control plane in the background and print the kubeconfig
    /// path once the API server, the controllers and the fake Nodes are ready.
    Up {
        /// Where to write the admin kubeconfig (default .cluster/admin.kubeconfig).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Number of fake Nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Stop every process `up` started.
    Down,
    /// Show the processes, versions and readiness of the cluster `up` started.
    Status,
    /// Write a kubeconfig for a ServiceAccount (token from the TokenRequest API).
    Kubeconfig {
        /// NAMESPACE/NAME of the ServiceAccount.
        service_account: String,
        /// Output file.
        #[arg(long, short)]
        output: PathBuf,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
}

fn dir() -> PathBuf {
    crate::root().join(".cluster")
}

fn state_file() -> PathBuf {
    dir().join("state.json")
}

fn load() -> Result<Option<ClusterState>, String> {
    ClusterState::load(&state_file()).map_err(|e| e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

pub fn run(command: ClusterCommand) -> Result<(), String> {
    match command {
        ClusterCommand::Build => build().map(|_| ()),
        ClusterCommand::Up { kubeconfig, nodes } => up(kubeconfig, nodes),
        ClusterCommand::Down => down(),
        ClusterCommand::Status => status(),
        ClusterCommand::Kubeconfig {
            service_account,
            output,
            ttl,
        } => {
            let state = load()?.ok_or("no cluster is running: run `cargo xtask cluster up`")?;
            let (namespace, name) = service_account
                .split_once('/')
                .ok_or("give the ServiceAccount as NAMESPACE/NAME")?;
            runtime()?
                .block_on(state.write_service_account_kubeconfig(
                    namespace,
                    name,
                    &output,
                    Duration::from_secs(ttl),
                ))
                .map_err(|e| e.to_string())?;
            println!("{}", output.display());
            Ok(())
        }
    }
}

/// The pinned binaries, built on first use (about 15 minutes on 2 cores; then cached by version under
/// `~/.cache/sluice/tools`), and the mesh CRD modules in the Go module cache.
pub fn build() -> Result<Tools, String> {
    let started = Instant::now();
    let tools = Tools::ensure(&|line| println!("{line}")).map_err(|e| e.to_string())?;
    let crds = sluice_testcluster::mesh_crd_files().map_err(|e| e.to_string())?;
    println!(
        "control plane: Kubernetes {}, etcd {}, kwok {} and {} mesh CRD files ready in {:.0?}",
        tools.versions.kubernetes,
        tools.versions.etcd,
        tools.versions.kwok,
        crds.len(),
        started.elapsed()
    );
    Ok(tools)
}

/// OPA and ghz at their pinned versions, for the interop tests and benchmarks (cached like the control plane).
pub fn build_policy_tools() -> Result<PolicyTools, String> {
    let tools = PolicyTools::ensure(&|line| println!("{line}")).map_err(|e| e.to_string())?;
    println!(
        "OPA {} and ghz {} ready",
        tools.versions.opa, tools.versions.ghz
    );
    Ok(tools)
}

fn all_running(state: &ClusterState) -> bool {
    state
        .processes_running()
        .iter()
        .all(|(_, running)| *running)
}

fn up(kubeconfig: Option<PathBuf>, nodes: usize) -> Result<(), String> {
    let started = Instant::now();
    if let Some(state) = load()? {
        if all_running(&state) {
            if let Some(path) = &kubeconfig {
                copy_kubeconfig(&state.kubeconfig, path)?;
            }
            println!(
                "the cluster is already running (Kubernetes {})",
                state.kubernetes_version
            );
            println!(
                "{}",
                kubeconfig.as_deref().unwrap_or(&state.kubeconfig).display()
            );
            return Ok(());
        }
        println!("cleaning up a cluster that is no longer complete");
        state.stop(Duration::from_secs(10));
        remove_state()?;
    }
    let tools = Tools::ensure(&|line| println!("{line}")).map_err(|e| e.to_string())?;
    let kubeconfig = match kubeconfig {
        Some(path) if path.is_relative() => Some(
            std::env::current_dir()
                .map_err(|e| e.to_string())?
                .join(path),
        ),
        other => other,
    };
    let mut opts = ClusterOptions::new(tools);
    opts.state_dir = Some(dir());
    opts.kubeconfig = kubeconfig;
    opts.nodes = nodes;
    opts.state_file = Some(state_file());
    opts.stop_with_parent = false;
    let boot = Instant::now();
    let cluster = match runtime()?.block_on(Cluster::start(opts)) {
        Ok(cluster) => cluster,
        Err(e) => {
            // Every process was stopped when the half-started cluster was dropped.
            let _ = std::fs::remove_file(state_file());
            return Err(e.to_string());
        }
    };
    let phases: Vec<String> = cluster
        .timings()
        .iter()
        .map(|(what, at)| format!("{what} {:.1}s", at.as_secs_f64()))
        .collect();
    println!("ready: {}", phases.join(", "));
    let state = cluster.detach();
    state.save(&state_file()).map_err(|e| e.to_string())?;
    println!(
        "control plane ready in {:.1}s (total {:.1}s): Kubernetes {}, etcd {}, kwok {}, {} fake node(s), API server {}",
        boot.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
        state.kubernetes_version,
        state.etcd_version,
        state.kwok_version,
        state.nodes.len(),
        state.server
    );
    println!("kubectl of the same release: {}", state.kubectl.display());
    println!("stop it with: cargo xtask cluster down");
    println!("{}", state.kubeconfig.display());
    Ok(())
}

fn copy_kubeconfig(from: &Path, to: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(from).map_err(|e| format!("{}: {e}", from.display()))?;
    sluice_testcluster::kubeconfig::write(to, &text).map_err(|e| e.to_string())
}

fn remove_state() -> Result<(), String> {
    let dir = dir();
    for sub in ["etcd", "state.json"] {
        let path = dir.join(sub);
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

fn down() -> Result<(), String> {
    let Some(state) = load()? else {
        println!("no cluster is running");
        return Ok(());
    };
    let started = Instant::now();
    state.stop(Duration::from_secs(10));
    let left: Vec<String> = state
        .processes_running()
        .iter()
        .filter(|(_, running)| *running)
        .map(|(p, _)| format!("{} (pid {})", p.name, p.pid))
        .collect();
    if !left.is_empty() {
        return Err(format!("still running: {}", left.join(", ")));
    }
    remove_state()?;
    println!(
        "stopped {} in {:.1}s (logs kept in {})",
        state
            .processes
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64(),
        dir().join("logs").display()
    );
    Ok(())
}

fn status() -> Result<(), String> {
    let Some(state) = load()? else {
        return Err("no cluster is running (cargo xtask cluster up starts one)".into());
    };
    println!(
        "Kubernetes {}, etcd {}, kwok {}; API server {}",
        state.kubernetes_version, state.etcd_version, state.kwok_version, state.server
    );
    println!("kubeconfig: {}", state.kubeconfig.display());
    for (process, running) in state.processes_running() {
        let rss = if running {
            rss_kib(process.pid).map(|k| format!(", {} MiB RSS", k / 1024))
        } else {
            None
        };
        println!(
            "  {:<24} pid {:<8} {}{}",
            process.name,
            process.pid,
            if running { "running" } else { "NOT RUNNING" },
            rss.unwrap_or_default()
        );
    }
    let ready = runtime()?.block_on(async {
        let client = state.client().await.map_err(|e| e.to_string())?;
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let readyz =
            tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await;
        let readyz = match readyz {
            Ok(Ok(body)) => body.trim().to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "timed out".into(),
        };
        println!("  /readyz: {readyz}");
        let nodes: Api<Node> = Api::all(client.clone());
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            for node in list {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                    .map_or("unknown", |c| c.status.as_str())
                    .to_string();
                println!(
                    "  node {}: Ready={ready}",
                    node.metadata.name.unwrap_or_default()
                );
            }
        }
        let pods: Api<Pod> = Api::all(client);
        if let Ok(list) = pods.list(&ListParams::default()).await {
            println!("  pods: {}", list.items.len());
        }
        Ok::<bool, String>(readyz == "ok")
    })?;
    if ready && all_running(&state) {
        Ok(())
    } else {
        Err("the cluster is not healthy".into())
    }
}

/// Resident set size of a process, from /proc.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
