//! Prometheus metrics of `sluice authz`: decision latency and results, the active bundle revision and
//! when it was activated, bundle load failures and decision-log drops.

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// allow, deny, dry_run_deny, error, bad_request or not_ready.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub revision: String,
}

/// The metrics; cheap to clone handles are kept inside.
pub struct AuthzMetrics {
    registry: Registry,
    latency: Histogram,
    decisions: Family<ResultLabels, Counter>,
    bundle: Family<RevisionLabels, Gauge>,
    activated: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub bundle_errors: Counter,
    pub log_dropped: Counter,
}

impl Default for AuthzMetrics {
    fn default() -> Self {
        AuthzMetrics::new()
    }
}

impl AuthzMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_authz");
        // 25µs … 100ms: decisions are expected well under a millisecond.
        let latency = Histogram::new([
            0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
            0.1,
        ]);
        let decisions = Family::<ResultLabels, Counter>::default();
        let bundle = Family::<RevisionLabels, Gauge>::default();
        let activated = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let bundle_errors = Counter::default();
        let log_dropped = Counter::default();
        registry.register(
            "decision_duration_seconds",
            "Time to decide one request, input mapping included",
            latency.clone(),
        );
        registry.register("decisions", "Decisions by result", decisions.clone());
        registry.register(
            "bundle_info",
            "1 for the revision of the active bundle",
            bundle.clone(),
        );
        registry.register(
            "bundle_activation_timestamp_seconds",
            "When the active bundle was activated (Unix time)",
            activated.clone(),
        );
        registry.register(
            "bundle_load_errors",
            "Bundles that could not be fetched, loaded or compiled (the previous one kept serving)",
            bundle_errors.clone(),
        );
        registry.register(
            "decision_logs_dropped",
            "Decisions not logged because of the rate limit or a full queue",
            log_dropped.clone(),
        );
        AuthzMetrics {
            registry,
            latency,
            decisions,
            bundle,
            activated,
            bundle_errors,
            log_dropped,
        }
    }

    pub fn decided(&self, result: &str, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
        self.decisions
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn activated(&self, revision: &str, at: SystemTime) {
        self.bundle.clear();
        self.bundle
            .get_or_create(&RevisionLabels {
                revision: revision.to_owned(),
            })
            .set(1);
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.activated.set(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_revision_is_reported_at_a_time() {
        let m = AuthzMetrics::new();
        m.activated("r1", SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        m.activated("r2", SystemTime::UNIX_EPOCH + Duration::from_secs(20));
        m.decided("allow", Duration::from_micros(40));
        m.decided("deny", Duration::from_micros(40));
        m.decided("allow", Duration::from_micros(40));
        let text = m.encode();
        assert!(
            text.contains(r#"sluice_authz_bundle_info{revision="r2"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"revision="r1""#), "{text}");
        assert!(
            text.contains(r#"sluice_authz_decisions_total{result="allow"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("sluice_authz_decision_duration_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("sluice_authz_bundle_activation_timestamp_seconds 20"),
            "{text}"
        );
    }
}
