//! `sluice authz`: the per-request decision service for Envoy's ext_authz filter, compatible with
//! OPA-Envoy's input and result formats.

pub mod decision_log;
pub mod input;
pub mod response;
