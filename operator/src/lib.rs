//! Sluice: progressive delivery (`Rollout`) and Rego authorization (`AuthorizationPolicy`) for service meshes.
//!
//! The library holds everything the `sluice` binary runs; `main.rs` only parses arguments and dispatches.

pub mod api;
/// The ext_authz decision service (its own crate, so the sidecar binary links no Kubernetes client).
pub use sluice_authz as authz;
pub mod cli;
pub mod client;
pub mod controller;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod rollout;
pub mod telemetry;
pub mod traffic;
