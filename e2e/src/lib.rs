//! Sluice's end-to-end harness: a real local control plane with Sluice installed (see `harness` and the
//! `sluice-testcluster` crate), a simulated mesh scraped by a real Prometheus, a real Alertmanager, and the
//! demo binary.

pub mod alertmanager;
pub mod graphite;
pub mod harness;
pub mod influxdb;
pub mod opa;
pub mod prometheus;
