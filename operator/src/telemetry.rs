//! Sluice's own Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints of `sluice operator`.
//! Per-object series exist only for live Rollouts (name and namespace) and are removed with them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::PoisonError;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::{RolloutPhase, RolloutStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetricLabels {
    pub namespace: String,
    pub name: String,
    pub metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

const PHASES: [RolloutPhase; 7] = [
    RolloutPhase::Initializing,
    RolloutPhase::Initialized,
    RolloutPhase::Progressing,
    RolloutPhase::Promoting,
    RolloutPhase::Succeeded,
    RolloutPhase::Failed,
    RolloutPhase::Paused,
];

/// The operator's metrics.
pub struct Telemetry {
    registry: Registry,
    phase: Family<PhaseLabels, Gauge>,
    canary_weight: Family<RolloutLabels, Gauge>,
    failed_checks: Family<RolloutLabels, Gauge>,
    transitions: Family<ReasonLabels, Counter>,
    metric_value: Family<MetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    checks: Family<VerdictLabels, Counter>,
    reconcile_errors: Counter,
    reconcile_duration: Histogram,
    /// Components still starting; `None` until the operator says which to wait for.
    starting: std::sync::Mutex<Option<std::collections::BTreeSet<&'static str>>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("sluice");
        let phase = Family::<PhaseLabels, Gauge>::default();
        let canary_weight = Family::<RolloutLabels, Gauge>::default();
        let failed_checks = Family::<RolloutLabels, Gauge>::default();
        let transitions = Family::<ReasonLabels, Counter>::default();
        let metric_value =
            Family::<MetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let checks = Family::<VerdictLabels, Counter>::default();
        let reconcile_errors = Counter::default();
        let reconcile_duration = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register(
            "rollout_phase",
            "1 for the phase each Rollout is in",
            phase.clone(),
        );
        registry.register(
            "rollout_canary_weight",
            "Traffic weight on the canary, percent",
            canary_weight.clone(),
        );
        registry.register(
            "rollout_failed_checks",
            "Failed checks counted in the current release",
            failed_checks.clone(),
        );
        registry.register(
            "rollout_transitions",
            "Rollout transitions by reason",
            transitions.clone(),
        );
        registry.register(
            "rollout_metric_value",
            "Latest measured value of each Rollout metric",
            metric_value.clone(),
        );
        registry.register("rollout_checks", "Metric checks by verdict", checks.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        Telemetry {
            registry,
            phase,
            canary_weight,
            failed_checks,
            transitions,
            metric_value,
            checks,
            reconcile_errors,
            reconcile_duration,
            starting: std::sync::Mutex::new(None),
        }
    }

    pub fn observe_rollout(&self, namespace: &str, name: &str, status: &RolloutStatus) {
        let labels = RolloutLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.canary_weight
            .get_or_create(&labels)
            .set(i64::from(status.canary_weight.get()));
        self.failed_checks
            .get_or_create(&labels)
            .set(i64::from(status.failed_checks));
        for verdict in &status.verdicts {
            if let Some(value) = verdict.value {
                let labels = MetricLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                    metric: verdict.name.clone(),
                };
                self.metric_value.get_or_create(&labels).set(value);
            }
        }
        for phase in PHASES {
            let value = i64::from(status.phase == Some(phase));
            let labels = PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase: format!("{phase:?}"),
            };
            self.phase.get_or_create(&labels).set(value);
        }
    }

    /// Drops the series of a deleted Rollout (and its `metrics`) so cardinality follows live objects.
    pub fn forget_rollout(&self, namespace: &str, name: &str, metrics: &[String]) {
        for metric in metrics {
            self.metric_value.remove(&MetricLabels {
                namespace: namespace.into(),
                name: name.into(),
                metric: metric.clone(),
            });
        }
        let labels = RolloutLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.canary_weight.remove(&labels);
        self.failed_checks.remove(&labels);
        for phase in PHASES {
            self.phase.remove(&PhaseLabels {
                namespace: namespace.into(),
                name: name.into(),
                phase: format!("{phase:?}"),
            });
        }
    }

    pub fn transition(&self, reason: &str) {
        self.transitions
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn check(&self, verdict: crate::api::Verdict) {
        self.checks
            .get_or_create(&VerdictLabels {
                verdict: format!("{verdict:?}"),
            })
            .inc();
    }

    pub fn reconcile_failed(&self) {
        self.reconcile_errors.inc();
    }

    pub fn reconcile_took(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// `/readyz` answers 503 until each of `components` has called [`Telemetry::set_ready`].
    pub fn expect_ready(&self, components: &[&'static str]) {
        let mut starting = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        *starting = Some(components.iter().copied().collect());
    }

    /// `component` has listed its resources and watches them.
    pub fn set_ready(&self, component: &'static str) {
        let mut starting = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = starting.as_mut() {
            set.remove(component);
        }
    }

    /// `None` when ready, else what is still starting.
    pub fn still_starting(&self) -> Option<String> {
        let starting = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        match starting.as_ref() {
            None => Some("the controllers".into()),
            Some(set) if set.is_empty() => None,
            Some(set) => Some(set.iter().copied().collect::<Vec<_>>().join(", ")),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        telemetry.encode(),
    )
}

async fn readyz(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    match telemetry.still_starting() {
        None => (StatusCode::OK, "ok".to_owned()),
        Some(what) => (StatusCode::SERVICE_UNAVAILABLE, format!("starting: {what}")),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(telemetry);
    axum::serve(listener, app).await
}

/// Binds the metrics address, so a busy port is reported before the controller starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Weight;

    #[test]
    fn ready_only_once_every_expected_component_is() {
        let t = Telemetry::new();
        assert!(
            t.still_starting().is_some(),
            "not ready before being told what to wait for"
        );
        t.expect_ready(&["rollouts", "authorizationpolicies"]);
        assert_eq!(
            t.still_starting().as_deref(),
            Some("authorizationpolicies, rollouts")
        );
        t.set_ready("rollouts");
        assert_eq!(t.still_starting().as_deref(), Some("authorizationpolicies"));
        t.set_ready("authorizationpolicies");
        assert_eq!(t.still_starting(), None);
    }

    #[test]
    fn series_follow_live_rollouts() {
        let t = Telemetry::new();
        let status = RolloutStatus {
            phase: Some(RolloutPhase::Progressing),
            canary_weight: Weight::new(30).expect("weight"),
            ..RolloutStatus::default()
        };
        let status = RolloutStatus {
            verdicts: vec![crate::api::MetricVerdict::at_epoch(
                "request-success-rate",
                crate::api::Verdict::Pass,
                Some(99.5),
            )],
            ..status
        };
        t.observe_rollout("test", "web", &status);
        t.transition("WeightChanged");
        let text = t.encode();
        assert!(
            text.contains(r#"sluice_rollout_canary_weight{namespace="test",name="web"} 30"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sluice_rollout_phase{namespace="test",name="web",phase="Progressing"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_rollout_transitions_total{reason="WeightChanged"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_rollout_metric_value{namespace="test",name="web",metric="request-success-rate"} 99.5"#),
            "{text}"
        );
        t.forget_rollout("test", "web", &["request-success-rate".to_owned()]);
        assert!(!t.encode().contains(r#"name="web""#));
    }
}
