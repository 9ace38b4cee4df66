//! `sluice simulate`: the real planner run offline over a recorded or imagined metric series, so users can
//! tune thresholds, steps and deadlines before applying a Rollout. Same planner, same verdicts as the
//! operator; only the cluster and Prometheus are replaced by the series and a virtual clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Checks, Observed, PlanInput, checks_due, plan};
use crate::api::{MetricVerdict, RolloutPhase, RolloutSpec, RolloutStatus};

/// One sample: at `time` seconds after the release started, `metric` measured `value` over `requests`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub time: f64,
    pub metric: String,
    /// Empty in CSV (or null in JSON) means no data.
    #[serde(default)]
    pub value: Option<f64>,
    #[serde(default)]
    pub requests: Option<f64>,
}

#[derive(Debug, Error, PartialEq)]
pub enum SeriesError {
    #[error("line {line}: {reason} (expected `time,metric,value,requests`)")]
    Csv { line: usize, reason: String },
    #[error("not a JSON array of {{time, metric, value, requests}}: {0}")]
    Json(String),
}

/// Parses CSV (`time,metric,value,requests`, header optional, `#` comments) or a JSON array.
pub fn parse_series(text: &str) -> Result<Vec<Sample>, SeriesError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str(trimmed).map_err(|e| SeriesError::Json(e.to_string()));
    }
    let mut samples = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || (index == 0 && line.starts_with("time")) {
            continue;
        }
        let error = |reason: String| SeriesError::Csv {
            line: index + 1,
            reason,
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 3 {
            return Err(error(format!("{} fields", fields.len())));
        }
        let number = |text: &str, what: &str| -> Result<Option<f64>, SeriesError> {
            if text.is_empty() || text.eq_ignore_ascii_case("nan") {
                return Ok(None);
            }
            text.parse::<f64>()
                .map(Some)
                .map_err(|_| error(format!("{what} {text:?} is not a number")))
        };
        samples.push(Sample {
            time: number(fields[0], "time")?.ok_or_else(|| error("time is empty".into()))?,
            metric: fields[1].to_owned(),
            value: number(fields[2], "value")?,
            requests: match fields.get(3) {
                Some(text) => number(text, "requests")?,
                None => None,
            },
        });
    }
    Ok(samples)
}

/// The latest sample of each metric at or before `at` seconds.
fn latest(series: &[Sample], at: f64) -> BTreeMap<&str, &Sample> {
    let mut by_metric: BTreeMap<&str, &Sample> = BTreeMap::new();
    for sample in series.iter().filter(|s| s.time <= at) {
        match by_metric.get(sample.metric.as_str()) {
            Some(seen) if seen.time > sample.time => {}
            _ => {
                by_metric.insert(sample.metric.as_str(), sample);
            }
        }
    }
    by_metric
}

/// What happened at one moment of the simulated release.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Moment {
    pub time: f64,
    pub phase: String,
    pub canary_weight: u8,
    pub message: String,
    /// Verdicts of the checks run at this moment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<MetricVerdict>,
    /// Transition reasons (WeightChanged, RolledBack, Promoted …).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// The simulated release.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    pub moments: Vec<Moment>,
    /// Succeeded, Failed, or the phase reached when the simulation ran out of time.
    pub outcome: String,
    pub ended_at: f64,
    /// Canary weights in the order they were routed.
    pub weights: Vec<u8>,
}

/// Runs the planner for a new revision over `series`, ticking every `tick` for at most `limit`.
/// The canary becomes ready `ready_after` into the release; the primary is ready throughout.
pub fn simulate(
    spec: &RolloutSpec,
    series: &[Sample],
    tick: Duration,
    ready_after: Duration,
    limit: Duration,
) -> Timeline {
    let start: Timestamp = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(1_800_000_000);
    // An initialized Rollout: the primary runs revision "stable", the target has just changed to "release".
    let mut status = RolloutStatus {
        phase: Some(RolloutPhase::Initialized),
        revision: Some("stable".into()),
        last_promoted_revision: Some("stable".into()),
        ..RolloutStatus::default()
    };
    let mut observed = Observed {
        target_revision: Some("release".into()),
        primary_revision: Some("stable".into()),
        primary_ready: true,
        ..Observed::default()
    };
    let mut moments = Vec::new();
    let mut weights = Vec::new();
    let mut elapsed = Duration::ZERO;
    let mut canary_up = false;
    while elapsed <= limit {
        let now = start + jiff::SignedDuration::try_from(elapsed).unwrap_or_default();
        let at = elapsed.as_secs_f64();
        observed.canary_ready = canary_up && elapsed >= ready_after;
        let checks = if checks_due(spec, &status, &observed, now) {
            let seen = latest(series, at);
            Checks::Ran(
                spec.analysis
                    .metrics
                    .iter()
                    .map(|metric| {
                        let sample = seen.get(metric.name.as_str());
                        let value = sample.and_then(|s| s.value);
                        let requests = sample.and_then(|s| s.requests);
                        MetricVerdict {
                            name: metric.name.clone(),
                            verdict: crate::metrics::judge(metric, value, requests),
                            value: value.filter(|v| v.is_finite()),
                            checked_at: Time(now),
                            dry_run: metric.dry_run,
                            primary_value: None,
                        }
                    })
                    .collect(),
            )
        } else {
            Checks::NotRun
        };
        let planned = plan(PlanInput {
            spec,
            status: &status,
            generation: 1,
            observed: &observed,
            checks: &checks,
            now,
        });
        if let Some(desired) = planned.desired {
            canary_up = desired.canary_up;
            if desired.primary_from_target {
                observed.primary_revision = observed.target_revision.clone();
            }
            if canary_up && weights.last() != Some(&desired.canary_weight.get()) {
                weights.push(desired.canary_weight.get());
            }
            if !canary_up && weights.last().is_some_and(|w| *w != 0) {
                weights.push(0);
            }
        }
        let changed = planned.status.phase != status.phase
            || planned.status.canary_weight != status.canary_weight
            || planned.status.message != status.message
            || !planned.transitions.is_empty()
            || matches!(checks, Checks::Ran(_));
        if changed {
            moments.push(Moment {
                time: at,
                phase: planned
                    .status
                    .phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_default(),
                canary_weight: planned.status.canary_weight.get(),
                message: planned.status.message.clone().unwrap_or_default(),
                verdicts: match &checks {
                    Checks::Ran(v) => v.clone(),
                    _ => Vec::new(),
                },
                events: planned
                    .transitions
                    .iter()
                    .map(|t| t.reason.as_str().to_owned())
                    .collect(),
            });
        }
        status = planned.status;
        if matches!(
            status.phase,
            Some(RolloutPhase::Succeeded | RolloutPhase::Failed)
        ) {
            break;
        }
        elapsed += tick;
    }
    Timeline {
        outcome: status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
        ended_at: elapsed.as_secs_f64(),
        moments,
        weights,
    }
}

/// The human-readable timeline.
pub fn render(timeline: &Timeline) -> String {
    let mut out = String::new();
    for m in &timeline.moments {
        let checks: Vec<String> = m
            .verdicts
            .iter()
            .map(|v| {
                let value = v
                    .value
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "no data".into());
                format!("{} {value} {:?}", v.name, v.verdict).to_lowercase()
            })
            .collect();
        let _ = write!(
            out,
            "t={:>6.1}s  {:<11} canary {:>3}%  {}",
            m.time, m.phase, m.canary_weight, m.message
        );
        if !checks.is_empty() {
            let _ = write!(out, "  [{}]", checks.join("; "));
        }
        if !m.events.is_empty() {
            let _ = write!(out, "  <{}>", m.events.join(", "));
        }
        out.push('\n');
    }
    let weights: Vec<String> = timeline.weights.iter().map(|w| format!("{w}%")).collect();
    let _ = writeln!(
        out,
        "\n{} after {:.1}s; canary weights: {}",
        match timeline.outcome.as_str() {
            "Succeeded" => "PROMOTED",
            "Failed" => "ROLLED BACK",
            _ => "UNFINISHED",
        },
        timeline.ended_at,
        weights.join(" -> ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> RolloutSpec {
        serde_json::from_value(json!({
            "targetRef": {"kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "progressDeadlineSeconds": 60,
            "analysis": {"interval": "10s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
                "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "minRequests": 10}]},
        }))
        .expect("spec")
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn csv_and_json_series_parse_the_same() {
        let csv = "time,metric,value,requests\n# warm-up\n0,request-success-rate,100,50\n10,request-success-rate,,0\n";
        let json = r#"[{"time":0,"metric":"request-success-rate","value":100,"requests":50},
                       {"time":10,"metric":"request-success-rate","value":null,"requests":0}]"#;
        assert_eq!(parse_series(csv), parse_series(json));
        assert_eq!(parse_series(csv).unwrap().len(), 2);
        assert_eq!(
            parse_series("0,request-success-rate,high,5"),
            Err(SeriesError::Csv {
                line: 1,
                reason: "value \"high\" is not a number".into()
            })
        );
    }

    #[test]
    fn a_healthy_series_is_promoted_step_by_step() {
        let series = parse_series("0,request-success-rate,99.9,100").unwrap();
        let timeline = simulate(
            &spec(),
            &series,
            SECOND,
            Duration::ZERO,
            Duration::from_secs(600),
        );
        assert_eq!(timeline.outcome, "Succeeded");
        assert_eq!(timeline.weights, vec![0, 20, 40, 60, 0]);
        insta::assert_snapshot!(render(&timeline));
    }

    #[test]
    fn a_drop_in_success_rate_rolls_back_after_threshold_failures() {
        let series =
            parse_series("0,request-success-rate,99.9,100\n15,request-success-rate,90,100")
                .unwrap();
        let timeline = simulate(
            &spec(),
            &series,
            SECOND,
            Duration::ZERO,
            Duration::from_secs(600),
        );
        assert_eq!(timeline.outcome, "Failed");
        assert_eq!(timeline.weights, vec![0, 20, 40, 0]);
        assert!(
            timeline.ended_at >= 30.0 && timeline.ended_at <= 40.0,
            "{}",
            timeline.ended_at
        );
    }

    #[test]
    fn too_few_requests_is_no_data_and_holds_until_the_deadline() {
        let series = parse_series("0,request-success-rate,100,3").unwrap();
        let timeline = simulate(
            &spec(),
            &series,
            SECOND,
            Duration::ZERO,
            Duration::from_secs(600),
        );
        assert_eq!(timeline.outcome, "Failed");
        assert_eq!(timeline.weights, vec![0, 20, 0]);
        let last = timeline.moments.last().unwrap();
        assert!(
            last.message.contains("no progress within 60s"),
            "{}",
            last.message
        );
    }
}
