//! `sluice-sandbox`: an in-memory stand-in for the Kubernetes API server, for Sluice's end-to-end tests and
//! for trying Sluice without a cluster.
//!
//! It speaks enough of the Kubernetes HTTP API for the real `kubectl` and kube-rs clients: discovery, CRUD on
//! built-in kinds and on any applied CRD (validated against its schema and CEL rules), list/watch with
//! resourceVersions, bookmarks and 410 Gone, selectors, the status and scale subresources, JSON / merge /
//! strategic-merge / server-side-apply patches, finalizers, ownerReference garbage collection, and a kubelet
//! stand-in that makes Deployments and StatefulSets ready. It is a test harness, not a production API server.

pub mod alertmanager;
mod discovery;
pub mod harness;
pub mod kubelet;
pub mod merge;
pub mod prometheus;
mod protobuf;
mod registry;
pub mod schema;
mod selector;
mod server;
mod status;
mod store;
mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use server::{SandboxConfig, WriteLog};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running sandbox API server.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sandbox {
    /// Binds `listen` (port 0 picks a free port) and serves in the background on the current runtime.
    pub async fn start(listen: SocketAddr, config: SandboxConfig) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(server::Shared {
            store: Mutex::new(store::Store::new(config.history_limit)),
            config,
            address: addr.to_string(),
            stopping: tokio::sync::watch::channel(false).0,
            writes: Mutex::default(),
        });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve_until(listener, shared.clone(), async move {
            let _ = rx.await;
        }));
        Ok(Sandbox {
            addr,
            shared,
            shutdown: Some(tx),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Write requests served so far (count and the latest `METHOD /path`s); also at `GET /sandbox/writes`.
    pub fn writes(&self) -> WriteLog {
        self.shared
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this sandbox (namespace `default`).
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url())
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.kubeconfig())
    }

    /// Stops serving; open watches are cut.
    pub async fn stop(mut self) {
        self.shared.stopping.send_replace(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Resolves when the server stops by itself (it only does on an I/O error).
    pub async fn wait(mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }
}

/// Kubeconfig YAML for a sandbox URL.
pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sluice-sandbox\n  cluster:\n    server: {url}\nusers:\n- name: sluice-sandbox\n  user: {{}}\ncontexts:\n- name: sluice-sandbox\n  context:\n    cluster: sluice-sandbox\n    user: sluice-sandbox\n    namespace: default\ncurrent-context: sluice-sandbox\n"
    )
}

/// A sandbox on its own runtime thread, for tests and tools that are not async (e.g. driving `kubectl`).
pub struct BackgroundSandbox {
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
    sandbox: Option<Sandbox>,
}

impl BackgroundSandbox {
    /// Starts on a free loopback port.
    pub fn start(config: SandboxConfig) -> std::io::Result<BackgroundSandbox> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let sandbox = runtime.block_on(Sandbox::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            config,
        ))?;
        Ok(BackgroundSandbox {
            url: sandbox.url(),
            runtime: Some(runtime),
            sandbox: Some(sandbox),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url)
    }
}

impl Drop for BackgroundSandbox {
    fn drop(&mut self) {
        if let (Some(runtime), Some(sandbox)) = (self.runtime.take(), self.sandbox.take()) {
            runtime.block_on(sandbox.stop());
            runtime.shutdown_background();
        }
    }
}
