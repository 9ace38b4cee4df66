//! A real local Kubernetes control plane for Sluice's end-to-end tests, the demo and `cargo xtask cluster`:
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake Nodes that take Pods to
//! Running/Ready), built from their published Go modules at the versions pinned in `tools/versions.env` and
//! started on free loopback ports. No Docker, no container runtime, nothing downloaded but Go modules.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_testcluster::Error> {
//! use sluice_testcluster::{Cluster, ClusterOptions, Tools};
//! let tools = Tools::ensure(&|line| println!("{line}"))?; // builds once per version (minutes), then cached
//! let cluster = Cluster::start(ClusterOptions::new(tools)).await?;
//! println!("KUBECONFIG={}", cluster.kubeconfig().display());
//! cluster.stop(); // or drop it: every process is stopped either way
//! # Ok(()) }
//! ```
//!
//! The API server runs with TLS, client-certificate authentication, `--authorization-mode=Node,RBAC` and
//! service-account token signing; [`Cluster::write_service_account_kubeconfig`] gives a kubeconfig for any
//! ServiceAccount (a TokenRequest token). Pods become Ready through kwok at once, or later or never with the
//! annotation [`READY_AFTER_ANNOTATION`] (`5s`, `1m`, `never`).

mod cluster;
mod crds;
pub mod kubeconfig;
mod kwok;
pub mod pki;
pub mod process;
mod tools;
mod versions;

use std::path::Path;

pub use cluster::{
    Cluster, ClusterOptions, ClusterState, KWOK_NODE_ANNOTATION, Ports, READY_AFTER_ANNOTATION,
    request_token,
};
pub use crds::mesh_crd_files;
pub use kwok::SLUICE_STAGES;
pub use tools::{PolicyTools, Progress, RivalTools, Tools, cache_root, modules_dir};
pub use versions::{VERSIONS_ENV, Versions};

/// Everything that can go wrong building, starting or stopping the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tools/versions.env: {0}")]
    Versions(String),
    #[error("building the control plane: {0}")]
    Build(String),
    #[error("PKI: {0}")]
    Pki(String),
    #[error("starting the control plane: {0}")]
    Start(String),
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("cluster state: {0}")]
    State(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
