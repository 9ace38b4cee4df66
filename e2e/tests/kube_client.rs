//! Sluice's own kube-runtime writes, made as the operator's ServiceAccount (exactly the RBAC of
//! `config/base`) against a real API server: the status server-side apply of the controllers, the
//! kube-runtime finalizer helper the Rollout controller wraps its reconcile in, and the event Recorder.
//! (How watches, patches or garbage collection behave is Kubernetes' business and not tested here.)

use std::sync::Arc;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sluice::api::{FIELD_MANAGER, Rollout, RolloutStatus};
use sluice::controller::FINALIZER;
use sluice_e2e::harness::{client_for, start_cluster};

const NS: &str = "default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_writes_succeed_with_its_rbac_and_round_trip() {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    let operator = client_for(&cluster.operator_kubeconfig)
        .await
        .expect("client for the operator's ServiceAccount");
    let admin: Api<Rollout> = Api::namespaced(cluster.client.clone(), NS);
    let rollouts: Api<Rollout> = Api::namespaced(operator.clone(), NS);

    // A user creates a Rollout (the operator may not: it only reads and patches them).
    let rollout: Rollout = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": "web"},
            "service": {"port": 9898},
            "analysis": {"interval": "30s", "stepWeight": 10, "maxWeight": 50},
        }
    }))
    .expect("valid Rollout");
    let created = admin
        .patch("web", &PatchParams::apply("e2e"), &Patch::Apply(&rollout))
        .await
        .expect("a user applies the Rollout");
    let mut other = rollout.clone();
    other.metadata.name = Some("other".into());
    let refused = rollouts
        .patch(
            "other",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&other),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "the operator must not be able to create Rollouts: {refused:?}"
    );

    // 1. The status write of the controllers: server-side apply of apiVersion, kind and status only.
    // What the API server stores must read back equal to what was written (timestamps at whole seconds,
    // empty messages kept), or the controller's "status changed?" comparison would write on every
    // reconcile and each write would trigger the next one.
    let status: RolloutStatus = serde_json::from_value(json!({
        "phase": "Initialized",
        "observedGeneration": 1,
        "canaryWeight": 0,
        "message": "waiting for the primary to become ready",
        "lastTransitionTime": "2026-01-02T03:04:05Z",
        "conditions": [{
            "type": "Ready",
            "status": "False",
            "reason": "Initializing",
            "message": "",
            "observedGeneration": 1,
            "lastTransitionTime": "2026-01-02T03:04:05Z",
        }],
    }))
    .expect("valid RolloutStatus");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "status": status,
    }));
    let write = || rollouts.patch_status("web", &params, &patch);
    let written = write().await.expect("the operator writes the status");
    assert_eq!(written.status.as_ref(), Some(&status), "status round trip");
    assert_eq!(
        written.metadata.generation, created.metadata.generation,
        "a status write leaves the generation alone"
    );
    assert_eq!(
        written.spec, created.spec,
        "a status write leaves the spec alone"
    );
    let again = write().await.expect("the same status again");
    assert_eq!(
        again.metadata.resource_version, written.metadata.resource_version,
        "an unchanged status must not be a write"
    );

    // 2. The kube-runtime finalizer helper: adds the finalizer, then on deletion runs the cleanup and
    // removes it so the Rollout goes away.
    let step = |expected: &'static str| {
        move |event: Finalizer<Rollout>| async move {
            let seen = match event {
                Finalizer::Apply(_) => "apply",
                Finalizer::Cleanup(_) => "cleanup",
            };
            assert_eq!(seen, expected);
            Ok::<_, std::io::Error>(Action::await_change())
        }
    };
    let current = Arc::new(rollouts.get("web").await.expect("the operator reads"));
    finalizer(&rollouts, FINALIZER, current, step("apply"))
        .await
        .expect("finalizer added");
    let current = rollouts.get("web").await.expect("get");
    assert_eq!(current.finalizers(), [FINALIZER.to_owned()]);
    assert_eq!(
        current.status.as_ref(),
        Some(&status),
        "adding the finalizer keeps the status"
    );
    finalizer(&rollouts, FINALIZER, Arc::new(current), step("apply"))
        .await
        .expect("apply runs");

    // 3. Events through kube-runtime's Recorder (events.k8s.io/v1), as the Rollout controller publishes
    // them; a repeat becomes a series on the same Event.
    let recorder = Recorder::new(
        operator.clone(),
        Reporter {
            controller: "sluice".into(),
            instance: Some("sluice-operator-0".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "RolledBack".into(),
        note: Some("request-success-rate 91.2 < 99".into()),
        action: "Rollback".into(),
        secondary: None,
    };
    let reference = created.object_ref(&());
    recorder
        .publish(&event, &reference)
        .await
        .expect("the operator publishes an Event");
    recorder
        .publish(&event, &reference)
        .await
        .expect("and repeats it");
    let events: Api<K8sEvent> = Api::namespaced(cluster.client.clone(), NS);
    let stored: Vec<K8sEvent> = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RolledBack"))
        .collect();
    assert_eq!(
        stored.len(),
        1,
        "a repeat updates the same Event: {stored:?}"
    );
    let stored = &stored[0];
    assert_eq!(
        stored.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("web")
    );
    assert_eq!(stored.reporting_controller.as_deref(), Some("sluice"));
    assert_eq!(stored.series.as_ref().map(|s| s.count), Some(2));

    // Deletion waits for the finalizer; the cleanup pass removes it and the Rollout is gone.
    admin
        .delete("web", &DeleteParams::default())
        .await
        .expect("a user deletes the Rollout");
    let held = rollouts.get("web").await.expect("held by the finalizer");
    assert!(held.metadata.deletion_timestamp.is_some());
    finalizer(&rollouts, FINALIZER, Arc::new(held), step("cleanup"))
        .await
        .expect("cleanup runs and removes the finalizer");
    assert!(
        rollouts.get_opt("web").await.expect("get_opt").is_none(),
        "the Rollout must be gone once its finalizer is removed"
    );
}
