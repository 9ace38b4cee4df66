//! Pure builders for the objects Sluice derives from the user's workload (a Deployment or a StatefulSet,
//! handled as JSON): the revision hash, the `<target>-primary` copy, the three Services, and readiness.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::api::{MANAGED_BY_LABEL, Rollout, TargetKind};

/// Annotation on the primary recording which target revision it runs.
pub const REVISION_ANNOTATION: &str = "sluice.dev/revision";

/// The `apps/v1` resource of a target kind, for a dynamic Api.
pub fn api_resource(kind: TargetKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apps", "v1", kind.name()),
        kind.plural(),
    )
}

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

/// The revision of a workload's pod template. The template goes through the typed `PodTemplateSpec` so the
/// JSON (and the hash) is canonical, whatever the kind and whatever extra fields the server returned.
pub fn template_revision(workload: &Value) -> Option<String> {
    let template: PodTemplateSpec =
        serde_json::from_value(workload.pointer("/spec/template")?.clone()).ok()?;
    let json = serde_json::to_vec(&template).ok()?;
    Some(format!("{:010x}", fnv1a(&json) & 0xff_ffff_ffff))
}

/// The target's template revision, from the whole object or, on a copy from the watch cache (which keeps
/// no template), from the revision the cache computed when it stored it.
pub fn revision_of(workload: &Value) -> Option<String> {
    if workload.pointer("/spec/template").is_some() {
        return template_revision(workload);
    }
    workload
        .pointer("/metadata/annotations")?
        .get(super::cache::CACHED_REVISION)?
        .as_str()
        .map(str::to_owned)
}

/// The revision the primary runs, as recorded when Sluice wrote it.
pub fn primary_revision(primary: &Value) -> Option<String> {
    primary
        .pointer("/metadata/annotations")?
        .get(REVISION_ANNOTATION)?
        .as_str()
        .map(str::to_owned)
}

fn int_at(workload: &Value, pointer: &str) -> Option<i64> {
    workload.pointer(pointer).and_then(Value::as_i64)
}

/// All replicas of the current template are updated, ready and available (Deployments and StatefulSets
/// report the same status fields).
pub fn is_ready(workload: &Value) -> bool {
    let want = i64::from(replicas(workload));
    if workload.get("status").is_none() {
        return false;
    }
    let observed = int_at(workload, "/status/observedGeneration").unwrap_or(0)
        >= int_at(workload, "/metadata/generation").unwrap_or(0);
    let count = |field: &str| int_at(workload, &format!("/status/{field}")).unwrap_or(0);
    want > 0
        && observed
        && count("updatedReplicas") >= want
        && count("availableReplicas") >= want
        && count("readyReplicas") >= want
}

pub fn replicas(workload: &Value) -> i32 {
    int_at(workload, "/spec/replicas")
        .and_then(|r| i32::try_from(r).ok())
        .unwrap_or(1)
}

/// The target's selector labels.
pub fn selector_labels(target: &Value) -> BTreeMap<String, String> {
    target
        .pointer("/spec/selector/matchLabels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default()
}

/// Primary pods carry the target's selector labels with `-primary` appended, so Services can tell them apart.
pub fn primary_labels(target: &Value) -> BTreeMap<String, String> {
    selector_labels(target)
        .into_iter()
        .map(|(k, v)| (k, format!("{v}-primary")))
        .collect()
}

/// The target's pod template of the revision `primary` runs: the inverse of [`primary_workload`], which
/// copied that template and gave the selector labels a `-primary` suffix. `sluice rollout undo` writes it
/// back whole, so nothing the abandoned revision added survives. `None` when the primary has no template.
pub fn promoted_target_template(primary: &Value, target: &Value) -> Option<Value> {
    let mut template = primary
        .pointer("/spec/template")
        .filter(|t| t.is_object())?
        .clone();
    let selector = selector_labels(target);
    if !selector.is_empty() {
        let labels = template["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let restored = labels
            .into_iter()
            .chain(
                selector
                    .into_iter()
                    .map(|(key, value)| (key, Value::String(value))),
            )
            .collect::<serde_json::Map<_, _>>();
        template["metadata"]["labels"] = Value::Object(restored);
    }
    Some(template)
}

fn managed_labels() -> Value {
    json!({ MANAGED_BY_LABEL.0: MANAGED_BY_LABEL.1 })
}

/// StatefulSet fields the primary copies from the target; the first three are immutable, so once the
/// primary exists they keep its own values.
const STATEFULSET_IMMUTABLE: [&str; 3] =
    ["serviceName", "volumeClaimTemplates", "podManagementPolicy"];
/// `persistentVolumeClaimRetentionPolicy` is left out on purpose: the primary keeps the default (Retain), so
/// deleting a Rollout, which deletes the primary, never deletes the volumes that served production.
const STATEFULSET_MUTABLE: [&str; 4] = [
    "updateStrategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "ordinals",
];

/// The primary workload running `target`'s current pod template (`replicas` as given). For a StatefulSet,
/// `existing` (the live primary) supplies the fields that cannot change after creation.
pub fn primary_workload(
    names: &Names,
    kind: TargetKind,
    target: &Value,
    existing: Option<&Value>,
    replicas: i32,
    owner: &OwnerReference,
) -> Value {
    let revision = template_revision(target).unwrap_or_default();
    let labels = primary_labels(target);
    let mut template = target
        .pointer("/spec/template")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
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
    let mut spec = json!({
        "replicas": replicas,
        "selector": {"matchLabels": labels},
        "template": template,
    });
    if kind == TargetKind::StatefulSet {
        for field in STATEFULSET_IMMUTABLE {
            let from = existing.unwrap_or(target);
            if let Some(value) = from.pointer(&format!("/spec/{field}")) {
                spec[field] = value.clone();
            }
        }
        for field in STATEFULSET_MUTABLE {
            if let Some(value) = target.pointer(&format!("/spec/{field}")) {
                spec[field] = value.clone();
            }
        }
        // The primary must roll its pods when promoted: `OnDelete` or a partition would leave them on the old
        // template and the promotion would wait for a readiness that never comes.
        let rolling = spec
            .pointer("/updateStrategy/rollingUpdate")
            .and_then(Value::as_object)
            .map(|r| {
                let mut r = r.clone();
                r.remove("partition");
                r
            })
            .filter(|r| !r.is_empty());
        spec["updateStrategy"] = match rolling {
            Some(rolling) => json!({"type": "RollingUpdate", "rollingUpdate": rolling}),
            None => json!({"type": "RollingUpdate"}),
        };
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind.name(),
        "metadata": {
            "name": names.primary,
            "namespace": names.namespace,
            "labels": managed_labels(),
            "annotations": { REVISION_ANNOTATION: revision },
            "ownerReferences": [owner],
        },
        "spec": spec,
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

/// What the finalizer does when a Rollout is deleted: traffic goes back to the user's workload and what
/// Sluice created goes away. Pure, so it can be tested; the controller's `cleanup` carries it out in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Cleanup {
    /// Replicas the target is scaled back to, when it sits at 0 (between releases).
    pub scale_target_to: Option<i32>,
    /// The apex Service, applied (not deleted: it is the user's entry point) selecting the target's pods.
    pub apex_service: Option<Value>,
    /// The route object: resource and name.
    pub route: (ApiResource, String),
    /// The `-primary` and `-canary` Services.
    pub services: Vec<String>,
    /// The `<target>-primary` workload (of the target's kind).
    pub workloads: Vec<String>,
}

/// The cleanup of `rollout`, whose route objects are `route`, given the live target and primary (as JSON).
pub fn cleanup(
    rollout: &Rollout,
    names: &Names,
    route: ApiResource,
    target: Option<&Value>,
    primary: Option<&Value>,
) -> Cleanup {
    let scale_target_to = target
        .filter(|t| replicas(t) == 0)
        .map(|_| primary.map(replicas).unwrap_or(1).max(1));
    let apex_service = target.map(|target| {
        service(
            rollout,
            names,
            &names.service,
            &selector_labels(target),
            None,
        )
    });
    Cleanup {
        scale_target_to,
        apex_service,
        route: (route, names.service.clone()),
        services: vec![names.service_primary.clone(), names.service_canary.clone()],
        workloads: vec![names.primary.clone()],
    }
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

    fn target(image: &str) -> Value {
        json!({
            "metadata": {"name": "podinfo", "namespace": "test", "generation": 2},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "template": {"metadata": {"labels": {"app": "podinfo", "tier": "web"}},
                             "spec": {"containers": [{"name": "app", "image": image}]}}
            },
            "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}
        })
    }

    #[test]
    fn revisions_follow_the_pod_template_only() {
        let a = target("podinfo:1");
        let mut scaled = a.clone();
        scaled["spec"]["replicas"] = json!(0);
        // Fields the server adds that are not part of a pod template do not change the revision.
        scaled["spec"]["template"]["unknownField"] = json!(true);
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
        stale["metadata"]["generation"] = json!(3);
        assert!(!is_ready(&stale));
        let mut short = ready.clone();
        short["status"]["availableReplicas"] = json!(2);
        assert!(!is_ready(&short));
        let mut fresh = ready.clone();
        fresh.as_object_mut().map(|o| o.remove("status"));
        assert!(!is_ready(&fresh));
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
        let primary = primary_workload(&names, TargetKind::Deployment, &t, None, 3, &owner);
        assert_eq!(primary["kind"], "Deployment");
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

    fn names(target: &str) -> Names {
        Names {
            namespace: "test".into(),
            target: target.into(),
            primary: format!("{target}-primary"),
            service: target.into(),
            service_primary: format!("{target}-primary"),
            service_canary: format!("{target}-canary"),
        }
    }

    #[test]
    fn the_promoted_template_is_recovered_exactly_from_the_primary() {
        let promoted = target("podinfo:1");
        let owner = OwnerReference::default();
        let primary = primary_workload(
            &names("podinfo"),
            TargetKind::Deployment,
            &promoted,
            None,
            3,
            &owner,
        );
        // The next revision changes the image, adds a restart annotation and a label, and drops one.
        let mut next = target("podinfo:2");
        let template = &mut next["spec"]["template"];
        template["metadata"]["annotations"] =
            json!({"kubectl.kubernetes.io/restartedAt": "2026-12-07T06:00:00Z"});
        template["metadata"]["labels"] = json!({"app": "podinfo", "canary-only": "yes"});
        let restored = promoted_target_template(&primary, &next).expect("a template");
        assert_eq!(restored, promoted["spec"]["template"]);
        let mut undone = next.clone();
        undone["spec"]["template"] = restored;
        assert_eq!(template_revision(&undone), primary_revision(&primary));
    }

    proptest::proptest! {
        /// Whatever the promoted template's labels and annotations, undo's template hashes to the revision
        /// recorded on the primary.
        #[test]
        fn undo_restores_the_recorded_revision(
            labels in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4),
            annotations in proptest::collection::btree_map("[a-z./]{1,12}", ".{0,12}", 0..4),
            extra in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4),
        ) {
            let mut promoted = target("podinfo:1");
            let mut all = labels.clone();
            all.insert("app".into(), "podinfo".into());
            promoted["spec"]["template"]["metadata"]["labels"] = json!(all);
            promoted["spec"]["template"]["metadata"]["annotations"] = json!(annotations);
            let primary = primary_workload(
                &names("podinfo"), TargetKind::Deployment, &promoted, None, 3, &OwnerReference::default(),
            );
            let mut next = target("podinfo:2");
            next["spec"]["template"]["metadata"]["annotations"] = json!(extra);
            let mut undone = next.clone();
            undone["spec"]["template"] = promoted_target_template(&primary, &next).expect("a template");
            proptest::prop_assert_eq!(template_revision(&undone), template_revision(&promoted));
            proptest::prop_assert_eq!(template_revision(&undone), primary_revision(&primary));
        }
    }

    #[test]
    fn a_statefulset_primary_keeps_its_immutable_fields() {
        let names = Names {
            namespace: "test".into(),
            target: "db".into(),
            primary: "db-primary".into(),
            service: "db".into(),
            service_primary: "db-primary".into(),
            service_canary: "db-canary".into(),
        };
        let owner = OwnerReference {
            api_version: "sluice.dev/v1alpha1".into(),
            kind: "Rollout".into(),
            name: "db".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        let claims = |size: &str| json!([{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}]);
        let mut target = target("db:1");
        target["spec"]["serviceName"] = json!("db-headless");
        target["spec"]["volumeClaimTemplates"] = claims("1Gi");
        target["spec"]["podManagementPolicy"] = json!("Parallel");
        target["spec"]["updateStrategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}});
        let created = primary_workload(&names, TargetKind::StatefulSet, &target, None, 2, &owner);
        assert_eq!(created["kind"], "StatefulSet");
        assert_eq!(created["spec"]["serviceName"], "db-headless");
        assert_eq!(created["spec"]["volumeClaimTemplates"], claims("1Gi"));
        assert_eq!(created["spec"]["podManagementPolicy"], "Parallel");
        assert_eq!(
            created["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}})
        );
        assert_eq!(
            created["spec"]["selector"]["matchLabels"],
            json!({"app": "podinfo-primary"})
        );
        // The user grew the volumes and changed the strategy in the target: the API server would refuse the
        // volume change on the primary, so only the mutable field follows, and the primary still rolls.
        target["spec"]["volumeClaimTemplates"] = claims("5Gi");
        target["spec"]["minReadySeconds"] = json!(5);
        target["spec"]["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 1, "maxUnavailable": 1}});
        target["spec"]["template"]["spec"]["containers"][0]["image"] = json!("db:2");
        let promoted = primary_workload(
            &names,
            TargetKind::StatefulSet,
            &target,
            Some(&created),
            2,
            &owner,
        );
        assert_eq!(promoted["spec"]["volumeClaimTemplates"], claims("1Gi"));
        assert_eq!(
            promoted["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
            "the partition is dropped"
        );
        assert_eq!(promoted["spec"]["minReadySeconds"], 5);
        target["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        let on_delete = primary_workload(
            &names,
            TargetKind::StatefulSet,
            &target,
            Some(&created),
            2,
            &owner,
        );
        assert_eq!(
            on_delete["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate"})
        );
        assert_eq!(
            promoted["spec"]["template"]["spec"]["containers"][0]["image"],
            "db:2"
        );
        // A Deployment primary never gets StatefulSet fields.
        let deployment = primary_workload(&names, TargetKind::Deployment, &target, None, 2, &owner);
        assert_eq!(deployment["spec"].get("serviceName"), None);
        assert_eq!(api_resource(TargetKind::StatefulSet).plural, "statefulsets");
    }
}
