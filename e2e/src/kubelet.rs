//! A kubelet and workload-controller stand-in: Deployments and StatefulSets report ready replicas shortly
//! after each spec change, unless their pod template asks to simulate pods that never become ready.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::registry::TypeKey;
use crate::server::Shared;
use crate::store::{EventType, WriteOptions, now_rfc3339};

/// Annotation (on the workload or its pod template) that keeps its pods from ever becoming ready,
/// like a crash-looping release.
pub const NEVER_READY_ANNOTATION: &str = "sandbox.sluice.dev/never-ready";
/// Annotation (on the workload or its pod template) overriding the delay before pods turn ready, e.g. `2s`.
pub const READY_DELAY_ANNOTATION: &str = "sandbox.sluice.dev/ready-delay";
/// Field manager of the status writes the stand-in makes.
pub const FIELD_MANAGER: &str = "sluice-sandbox-kubelet";

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(key))
        .or_else(|| {
            obj.pointer("/metadata/annotations")
                .and_then(|a| a.get(key))
        })
        .and_then(Value::as_str)
}

fn never_ready(obj: &Value) -> bool {
    annotation(obj, NEVER_READY_ANNOTATION) == Some("true")
}

/// The status a workload controller and kubelets would converge to for this object.
pub fn workload_status(obj: &Value, previous: Option<&Value>, now: &str) -> Value {
    let replicas = obj
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let generation = obj
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let ready = if never_ready(obj) { 0 } else { replicas };
    let available = ready >= replicas;
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let since = previous
            .and_then(|p| p.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
            })
            .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now));
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": now, "lastTransitionTime": since})
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut status = json!({
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
    });
    if replicas > ready {
        status["unavailableReplicas"] = json!(replicas - ready);
    }
    if obj.get("kind").and_then(Value::as_str) == Some("StatefulSet") {
        // One revision per generation; `kubectl rollout status` compares them.
        let revision = format!("{name}-{generation}");
        status["currentReplicas"] = json!(replicas);
        status["currentRevision"] = json!(revision);
        status["updateRevision"] = json!(revision);
    }
    status["conditions"] = json!([
        if available {
            condition(
                "Available",
                true,
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            )
        } else {
            condition(
                "Available",
                false,
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            )
        },
        condition(
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{name}\" has successfully progressed.")
        ),
    ]);
    status
}

/// Whether the stored status already says what [`workload_status`] would (ignoring timestamps).
fn status_is_current(obj: &Value) -> bool {
    let Some(current) = obj.get("status") else {
        return false;
    };
    let desired = workload_status(obj, Some(current), "");
    let counts = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
    ];
    let same_counts = counts.iter().all(|f| current.get(f) == desired.get(f));
    let condition_states = |s: &Value| -> Vec<(Value, Value)> {
        s.get("conditions")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| (c["type"].clone(), c["status"].clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    same_counts && condition_states(current) == condition_states(&desired)
}

fn is_workload(key: &TypeKey) -> bool {
    key.group == "apps" && matches!(key.resource.as_str(), "deployments" | "statefulsets")
}

/// Runs until the store's event channel closes.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut rx = shared.lock().subscribe();
    loop {
        let event = match rx.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => {
                // Events were dropped: look at every workload instead.
                for (key, namespace, name) in stale_workloads(&shared) {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(shared.config.ready_delay).await;
                        converge(&shared, &key, &namespace, &name);
                    });
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if event.type_ == EventType::Deleted
            || !is_workload(&event.key)
            || status_is_current(&event.object)
        {
            continue;
        }
        let delay = annotation(&event.object, READY_DELAY_ANNOTATION)
            .and_then(parse_delay)
            .unwrap_or(shared.config.ready_delay);
        let shared = shared.clone();
        let key = event.key.clone();
        let namespace = event.namespace.clone();
        let name = event
            .object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            converge(&shared, &key, &namespace, &name);
        });
    }
}

/// Workloads whose status does not yet say what the stand-in would report.
fn stale_workloads(shared: &Shared) -> Vec<(TypeKey, String, String)> {
    let store = shared.lock();
    let mut stale = Vec::new();
    for resource in ["deployments", "statefulsets"] {
        let Some(ty) = store.registry().get("apps", "v1", resource) else {
            continue;
        };
        for obj in store.list(&ty, None) {
            if !status_is_current(&obj) {
                let text = |p: &str| {
                    obj.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                stale.push((
                    ty.key(),
                    text("/metadata/namespace"),
                    text("/metadata/name"),
                ));
            }
        }
    }
    stale
}

fn parse_delay(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    text.strip_suffix('s')
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

fn converge(shared: &Shared, key: &TypeKey, namespace: &str, name: &str) {
    let mut store = shared.lock();
    let Some(ty) = store.registry().any_version(key) else {
        return;
    };
    let Ok(obj) = store.get(&ty, namespace, name) else {
        return;
    };
    if status_is_current(&obj) || obj.pointer("/metadata/deletionTimestamp").is_some() {
        return;
    }
    let mut updated = obj.clone();
    updated["status"] = workload_status(&obj, obj.get("status"), &now_rfc3339());
    let opts = WriteOptions {
        field_manager: Some(FIELD_MANAGER.into()),
        ..WriteOptions::default()
    };
    if let Err(err) = store.update(&ty, namespace, name, updated, Some("status"), &opts) {
        tracing::debug!(%err, name, namespace, "kubelet stand-in could not update status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(annotations: Value) -> Value {
        json!({"metadata": {"name": "web", "generation": 3},
               "spec": {"replicas": 2, "template": {"metadata": {"annotations": annotations}}}})
    }

    #[test]
    fn healthy_workloads_become_available() {
        let status = workload_status(&deployment(json!({})), None, "t0");
        assert_eq!(status["readyReplicas"], json!(2));
        assert_eq!(status["observedGeneration"], json!(3));
        assert_eq!(status["conditions"][0]["type"], json!("Available"));
        assert_eq!(status["conditions"][0]["status"], json!("True"));
    }

    #[test]
    fn never_ready_template_stays_unavailable() {
        let obj = deployment(json!({NEVER_READY_ANNOTATION: "true"}));
        let status = workload_status(&obj, None, "t0");
        assert_eq!(status["readyReplicas"], json!(0));
        assert_eq!(status["unavailableReplicas"], json!(2));
        assert_eq!(status["conditions"][0]["status"], json!("False"));
    }

    #[test]
    fn converged_status_is_recognised_and_spec_changes_are_not() {
        let mut obj = deployment(json!({}));
        assert!(!status_is_current(&obj));
        obj["status"] = workload_status(&obj, None, "t0");
        assert!(status_is_current(&obj));
        obj["metadata"]["generation"] = json!(4);
        assert!(!status_is_current(&obj));
    }

    #[test]
    fn delays_parse() {
        assert_eq!(parse_delay("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_delay("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_delay("soon"), None);
    }
}
