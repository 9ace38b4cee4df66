//! Rego policies: the engine (a regorus wrapper with OPA-compatible JWT builtins), the `policy test`
//! runner and OPA bundles (build, load, sign). No Kubernetes client: the `sluice-authz` sidecar links it.

pub mod bundle;
pub mod engine;
pub mod jwt;
pub mod signing;
pub mod testing;

/// One Rego source file, as loaded from a bundle or from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// File name inside the bundle (e.g. `envoy/authz.rego`); used in error messages.
    pub path: String,
    /// Rego source text.
    pub source: String,
}
