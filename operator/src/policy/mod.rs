//! Rego policies: the engine, bundles and signing live in the `sluice-rego` crate (shared with the
//! `sluice-authz` sidecar); the operator adds the bundle server.

pub use sluice_rego::{Module, bundle, engine, jwt, signing, testing};

pub mod server;
