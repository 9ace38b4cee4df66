//! Rego gates of a Rollout (`analysis.policies`): after a step's metrics passed, each policy is asked whether
//! the release may move on. The input holds the Rollout, its namespace's labels, the latest verdicts and the
//! time; a denial's reasons come from the `deny` set beside the decision. Gates fail closed.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::api::{DenyAction, MetricVerdict, PromotionPolicy, Rollout};
use crate::policy::Module;
use crate::policy::engine::{Limits, PolicyEngine};
use crate::rollout::Gate;

/// The `input` of a gate.
pub fn gate_input(
    rollout: &Rollout,
    namespace_labels: &std::collections::BTreeMap<String, String>,
    verdicts: &[MetricVerdict],
    now: jiff::Timestamp,
) -> Value {
    let status = rollout.status.clone().unwrap_or_default();
    json!({
        "rollout": {
            "name": rollout.name_any(),
            "namespace": rollout.namespace(),
            "revision": status.revision,
            "step": status.current_step,
            "weight": status.canary_weight.get(),
            "labels": rollout.labels(),
            "annotations": rollout.annotations(),
        },
        "namespace": {"labels": namespace_labels},
        // Dry-run metrics apart, so a policy that wants every metric passed is not held by one that never gates.
        "metrics": verdicts.iter().filter(|v| !v.dry_run).map(metric_input).collect::<Vec<_>>(),
        "dryRunMetrics": verdicts.iter().filter(|v| v.dry_run).map(metric_input).collect::<Vec<_>>(),
        "now": now.to_string(),
    })
}

fn metric_input(v: &MetricVerdict) -> Value {
    json!({
        "name": v.name,
        "value": v.value,
        "verdict": v.verdict,
        "primaryValue": v.primary_value,
    })
}

/// Evaluates one gate: `Ok((allowed, reasons))`. Anything but `true` denies.
pub fn evaluate(
    policy: &PromotionPolicy,
    modules: &[Module],
    input: &Value,
) -> Result<(bool, Vec<String>), String> {
    let mut engine =
        PolicyEngine::compile(modules, &json!({}), Limits::default()).map_err(|e| e.to_string())?;
    let allowed = engine
        .eval(&policy.query, input)
        .map_err(|e| e.to_string())?
        == Some(Value::Bool(true));
    let reasons_query = match policy.query.rsplit_once('.') {
        Some((package, _)) => format!("{package}.deny"),
        None => return Ok((allowed, Vec::new())),
    };
    let mut reasons: Vec<String> = match engine.eval(&reasons_query, input) {
        Ok(Some(Value::Array(items))) => items
            .into_iter()
            .map(|r| {
                r.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| r.to_string())
            })
            .collect(),
        _ => Vec::new(),
    };
    if !allowed && reasons.is_empty() {
        reasons.push(format!("{} is not true", policy.query));
    }
    Ok((allowed, reasons))
}

/// Asks every gate of the Rollout, in order; the first denial wins. Gates fail closed: a gate that cannot
/// be asked (its namespace or ConfigMap unreadable, a policy that does not compile or errs) denies. A read
/// the API server refused holds the release and is retried (it is not a decision, so `onDeny: rollback`
/// does not apply); a missing or broken policy is a denial like any other.
pub async fn ask_gates(client: &Client, rollout: &Rollout, verdicts: &[MetricVerdict]) -> Gate {
    let namespace = rollout.namespace().unwrap_or_default();
    let Some(first) = rollout.spec.analysis.policies.first() else {
        return Gate::Allowed(Vec::new());
    };
    // Policies decide on the namespace's labels (the shipped gate asks for an approval in production), so
    // labels that cannot be read must not read as "no labels".
    let namespace_labels = match Api::<Namespace>::all(client.clone())
        .get_opt(&namespace)
        .await
    {
        Ok(Some(ns)) => ns.labels().clone(),
        Ok(None) => {
            return Gate::Denied {
                by: format!("policy {}", first.name),
                reasons: vec![format!("namespace {namespace:?} not found")],
                rollback: false,
            };
        }
        Err(err) => {
            return Gate::Denied {
                by: format!("policy {}", first.name),
                reasons: vec![format!(
                    "cannot read the labels of namespace {namespace:?} for the gate input: {err}; \
                     the operator needs `get` on namespaces"
                )],
                rollback: false,
            };
        }
    };
    let input = gate_input(rollout, &namespace_labels, verdicts, jiff::Timestamp::now());
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let mut allowed = Vec::new();
    for policy in &rollout.spec.analysis.policies {
        let denied = |reasons: Vec<String>| Gate::Denied {
            by: format!("policy {}", policy.name),
            reasons,
            rollback: policy.on_deny == DenyAction::Rollback,
        };
        let modules = match configmaps.get_opt(&policy.config_map_ref.name).await {
            Ok(Some(cm)) => cm
                .data
                .unwrap_or_default()
                .into_iter()
                .filter(|(key, _)| key.ends_with(".rego"))
                .map(|(path, source)| Module { path, source })
                .collect::<Vec<_>>(),
            Ok(None) => {
                return denied(vec![format!(
                    "ConfigMap {:?} not found in namespace {namespace:?}",
                    policy.config_map_ref.name
                )]);
            }
            Err(err) => {
                return Gate::Denied {
                    by: format!("policy {}", policy.name),
                    reasons: vec![format!(
                        "cannot read ConfigMap {:?}: {err}",
                        policy.config_map_ref.name
                    )],
                    rollback: false,
                };
            }
        };
        if modules.is_empty() {
            return denied(vec![format!(
                "ConfigMap {:?} has no *.rego key",
                policy.config_map_ref.name
            )]);
        }
        let policy_owned = policy.clone();
        let input = input.clone();
        let result =
            tokio::task::spawn_blocking(move || evaluate(&policy_owned, &modules, &input)).await;
        match result {
            Ok(Ok((true, _))) => allowed.push(format!("policy {}", policy.name)),
            Ok(Ok((false, reasons))) => return denied(reasons),
            Ok(Err(error)) => {
                return denied(vec![format!("the policy cannot be evaluated: {error}")]);
            }
            Err(error) => return denied(vec![format!("the policy evaluation failed: {error}")]),
        }
    }
    Gate::Allowed(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_policy() -> Vec<Module> {
        ["gate.rego"]
            .iter()
            .map(|name| Module {
                path: (*name).into(),
                source: std::fs::read_to_string(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../policies/rollout-gate")
                        .join(name),
                )
                .expect("the shipped gate policy"),
            })
            .collect()
    }

    fn rollout(annotations: Value) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "podinfo", "namespace": "shop", "annotations": annotations},
            "spec": {"targetRef": {"kind": "Deployment", "name": "podinfo"}, "service": {"port": 9898},
                "analysis": {"interval": "10s", "stepWeight": 20}},
            "status": {"revision": "abc", "canaryWeight": 20, "currentStep": 0},
        }))
        .expect("rollout")
    }

    fn policy() -> PromotionPolicy {
        serde_json::from_value(json!({"name": "change-control", "configMapRef": {"name": "gate"}}))
            .expect("policy")
    }

    #[test]
    fn the_shipped_gate_requires_approval_in_production() {
        let production = [("environment".to_owned(), "production".to_owned())].into();
        // A Wednesday, outside any freeze window.
        let now: jiff::Timestamp = "2026-11-25T10:00:00Z".parse().unwrap();
        let unapproved = gate_input(&rollout(json!({})), &production, &[], now);
        let (allowed, reasons) = evaluate(&policy(), &gate_policy(), &unapproved).unwrap();
        assert!(!allowed);
        assert!(
            reasons.iter().any(|r| r.contains("sluice.dev/approved-by")),
            "{reasons:?}"
        );
        let approved = gate_input(
            &rollout(json!({"sluice.dev/approved-by": "alice"})),
            &production,
            &[],
            now,
        );
        assert_eq!(
            evaluate(&policy(), &gate_policy(), &approved).unwrap(),
            (true, vec![])
        );
    }

    #[test]
    fn the_input_describes_the_rollout_and_its_checks() {
        let verdicts = [
            MetricVerdict::at_epoch(
                "request-success-rate",
                crate::api::Verdict::Pass,
                Some(99.5),
            ),
            MetricVerdict {
                dry_run: true,
                ..MetricVerdict::at_epoch("p95", crate::api::Verdict::Fail, Some(900.0))
            },
        ];
        let input = gate_input(
            &rollout(json!({})),
            &Default::default(),
            &verdicts,
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(input["rollout"]["weight"], 20);
        assert_eq!(input["rollout"]["revision"], "abc");
        assert_eq!(
            input["metrics"][0],
            json!({"name": "request-success-rate", "value": 99.5, "verdict": "pass", "primaryValue": null})
        );
        assert_eq!(
            input["metrics"].as_array().map(Vec::len),
            Some(1),
            "gating metrics only"
        );
        assert_eq!(input["dryRunMetrics"][0]["name"], "p95");
        assert_eq!(input["now"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn broken_or_non_boolean_policies_deny() {
        let broken = [Module {
            path: "g.rego".into(),
            source: "package sluice.rollout.gate\n\nallow if {\n".into(),
        }];
        assert!(evaluate(&policy(), &broken, &json!({})).is_err());
        let string = [Module {
            path: "g.rego".into(),
            source: "package sluice.rollout.gate\n\nallow := \"yes\"\n".into(),
        }];
        let (allowed, reasons) = evaluate(&policy(), &string, &json!({})).unwrap();
        assert!(!allowed);
        assert_eq!(
            reasons,
            vec!["data.sluice.rollout.gate.allow is not true".to_owned()]
        );
    }
}
