//! Pure builders for the objects Sluice derives from the user's workload: the revision hash, the
//! `<target>-primary` Deployment, the three Services, and readiness.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::api::{MANAGED_BY_LABEL, Rollout};

/// Annotation on the primary recording which target revision it runs.
pub const REVISION_ANNOTATION: &str = "sluice.dev/revision";

/// Names of everything a Rollout manages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub target: String,
    pub primary: String,
    pub service: String,
    pub service_primary: String,
    pub service_canary: String,
}

impl Names {
    pub fn of(rollout: &Rollout) -> Names {
        let target = rollout.spec.target_ref.name.clone();
        let service = rollout
            .spec
            .service
            .name
            .clone()
            .unwrap_or_else(|| target.clone());
        Names {
            namespace: rollout
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            primary: format!("{target}-primary"),
            service_primary: format!("{service}-primary"),
            service_canary: format!("{service}-canary"),
            target,
            service,
        }
    }
}

/// A stable 64-bit FNV-1a hash; `DefaultHasher` may change between Rust releases, revisions must not.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The revision of a Deployment's pod template (serde_json maps are sorted, so the JSON is canonical).
pub fn template_revision(deployment: &Deployment) -> Option<String> {
    let template = deployment.spec.as_ref().map(|s| &s.template)?;
    let json = serde_json::to_vec(template).ok()?;
    Some(format!("{:010x}", fnv1a(&json) & 0xff_ffff_ffff))
}

/// The revision the primary runs, as recorded when Sluice wrote it.
pub fn primary_revision(primary: &Deployment) -> Option<String> {
    primary
        .metadata
        .annotations
        .as_ref()?
        .get(REVISION_ANNOTATION)
        .cloned()
}

/// All replicas of the current template are updated and available.
pub fn is_ready(deployment: &Deployment) -> bool {
    let want = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = &deployment.status else {
        return false;
    };
    let observed =
        status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    want > 0
        && observed
        && status.updated_replicas.unwrap_or(0) >= want
        && status.available_replicas.unwrap_or(0) >= want
        && status.ready_replicas.unwrap_or(0) >= want
}

pub fn replicas(deployment: &Deployment) -> i32 {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
}

/// The target's selector labels.
pub fn selector_labels(target: &Deployment) -> BTreeMap<String, String> {
    target
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
}

/// Primary pods carry the target's selector labels with `-primary` appended, so Services can tell them apart.
pub fn primary_labels(target: &Deployment) -> BTreeMap<String, String> {
    selector_labels(target)
        .into_iter()
        .map(|(k, v)| (k, format!("{v}-primary")))
        .collect()
}

fn managed_labels() -> Value {
    json!({ MANAGED_BY_LABEL.0: MANAGED_BY_LABEL.1 })
}

/// The primary Deployment running `target`'s current pod template (`replicas` as given).
pub fn primary_deployment(
    names: &Names,
    target: &Deployment,
    replicas: i32,
    owner: &OwnerReference,
) -> Value {
    let revision = template_revision(target).unwrap_or_default();
    let labels = primary_labels(target);
    let mut template = target
        .spec
        .as_ref()
        .map(|s| serde_json::to_value(&s.template).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    if !template.is_object() {
        template = json!({});
    }
    let template_labels = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .chain(
            labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone()))),
        )
        .collect::<serde_json::Map<_, _>>();
    template["metadata"]["labels"] = Value::Object(template_labels);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": names.primary,
            "namespace": names.namespace,
            "labels": managed_labels(),
            "annotations": { REVISION_ANNOTATION: revision },
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": template,
        }
    })
}

/// A ClusterIP Service of the rollout (`name`) selecting `selector`.
pub fn service(
    rollout: &Rollout,
    names: &Names,
    name: &str,
    selector: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> Value {
    let port = rollout.spec.service.port;
    let target_port = rollout.spec.service.target_port.unwrap_or(port);
    let mut metadata =
        json!({"name": name, "namespace": names.namespace, "labels": managed_labels()});
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}],
        }
    })
}

/// Whether a live Service already selects and exposes what `desired` says.
pub fn service_matches(live: &Service, desired: &Value) -> bool {
    let live_spec = live.spec.as_ref();
    let selector = live_spec
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let want_selector: BTreeMap<String, String> = serde_json::from_value(
        desired
            .pointer("/spec/selector")
            .cloned()
            .unwrap_or(Value::Null),
    )
    .unwrap_or_default();
    let ports: Vec<(i32, String)> = live_spec
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let target = p.target_port.map(|t| match t {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
            });
            (p.port, target.unwrap_or_default())
        })
        .collect();
    let want_port = desired
        .pointer("/spec/ports/0/port")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let want_target = desired
        .pointer("/spec/ports/0/targetPort")
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    let managed = live
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL.0))
        .map(String::as_str)
        == Some(MANAGED_BY_LABEL.1);
    managed
        && selector == want_selector
        && ports.len() == 1
        && i64::from(ports[0].0) == want_port
        && Some(ports[0].1.clone()) == want_target
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(image: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "podinfo", "namespace": "test", "generation": 2},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "template": {"metadata": {"labels": {"app": "podinfo", "tier": "web"}},
                             "spec": {"containers": [{"name": "app", "image": image}]}}
            },
            "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}
        }))
        .expect("deployment")
    }

    #[test]
    fn revisions_follow_the_pod_template_only() {
        let a = target("podinfo:1");
        let mut scaled = a.clone();
        if let Some(spec) = scaled.spec.as_mut() {
            spec.replicas = Some(0);
        }
        assert_eq!(
            template_revision(&a),
            template_revision(&scaled),
            "scaling is not a new revision"
        );
        assert_ne!(
            template_revision(&a),
            template_revision(&target("podinfo:2"))
        );
        assert_eq!(template_revision(&a).map(|r| r.len()), Some(10));
    }

    #[test]
    fn readiness_needs_the_current_generation_and_all_replicas() {
        let ready = target("x");
        assert!(is_ready(&ready));
        let mut stale = ready.clone();
        stale.metadata.generation = Some(3);
        assert!(!is_ready(&stale));
        let mut short = ready.clone();
        if let Some(status) = short.status.as_mut() {
            status.available_replicas = Some(2);
        }
        assert!(!is_ready(&short));
    }

    #[test]
    fn the_primary_selects_its_own_pods() {
        let t = target("podinfo:1");
        let names = Names {
            namespace: "test".into(),
            target: "podinfo".into(),
            primary: "podinfo-primary".into(),
            service: "podinfo".into(),
            service_primary: "podinfo-primary".into(),
            service_canary: "podinfo-canary".into(),
        };
        let owner = OwnerReference {
            api_version: "sluice.dev/v1alpha1".into(),
            kind: "Rollout".into(),
            name: "podinfo".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        let primary = primary_deployment(&names, &t, 3, &owner);
        assert_eq!(
            primary["spec"]["selector"]["matchLabels"],
            json!({"app": "podinfo-primary"})
        );
        assert_eq!(
            primary["spec"]["template"]["metadata"]["labels"],
            json!({"app": "podinfo-primary", "tier": "web"})
        );
        assert_eq!(
            primary["metadata"]["annotations"][REVISION_ANNOTATION],
            json!(template_revision(&t))
        );
        assert_eq!(
            primary["spec"]["template"]["spec"]["containers"][0]["image"],
            "podinfo:1"
        );
    }
}
