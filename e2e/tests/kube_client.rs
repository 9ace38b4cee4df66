//! kube-rs against the sandbox: the same client and watchers the operator uses.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Client, CustomResourceExt};
use serde_json::json;
use sluice::api::Rollout;
use sluice_e2e::{Sandbox, SandboxConfig};

async fn start(config: SandboxConfig) -> (Sandbox, Client) {
    let sandbox = Sandbox::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("sandbox starts");
    let kubeconfig: kube::config::Kubeconfig =
        serde_saphyr::from_str(&sandbox.kubeconfig()).expect("sandbox kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube-rs accepts the sandbox kubeconfig");
    let client = Client::try_from(config).expect("client builds");
    (sandbox, client)
}

async fn install_rollout_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Rollout::crd())
        .await
        .expect("Rollout CRD installs");
}

fn rollout(name: &str, step_weight: u8) -> Rollout {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "analysis": {"interval": "1s", "stepWeight": step_weight, "maxWeight": 50},
        }
    }))
    .expect("valid Rollout")
}

/// A kube-runtime watcher over a CRD reports create, update and delete, in order.
#[tokio::test]
async fn watcher_sees_create_update_delete_in_order() {
    let (sandbox, client) = start(SandboxConfig::default()).await;
    install_rollout_crd(&client).await;
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), "default");
    let mut events = watcher(rollouts.clone(), watcher::Config::default()).boxed();

    // The initial (empty) list completes before anything is written.
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("watcher answers")
        .expect("watcher has no error")
    {
        let done = matches!(event, watcher::Event::InitDone);
        seen.push(describe(&event));
        if done {
            break;
        }
    }
    assert_eq!(seen, vec!["Init".to_owned(), "InitDone".to_owned()]);

    rollouts
        .create(&PostParams::default(), &rollout("web", 10))
        .await
        .expect("create");
    rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"analysis": {"stepWeight": 20}}})),
        )
        .await
        .expect("update");
    rollouts
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");

    let mut changes = Vec::new();
    while changes.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("watcher reports every change within 10s")
            .expect("watcher has no error")
            .expect("stream stays open");
        changes.push(describe(&event));
    }
    assert_eq!(
        changes,
        vec![
            "Apply web step=10",
            "Apply web step=20",
            "Delete web step=20"
        ]
    );
    sandbox.stop().await;
}

fn describe(event: &watcher::Event<Rollout>) -> String {
    let text = |verb: &str, r: &Rollout| {
        let step = r.spec.analysis.step_weight.map(|w| w.get()).unwrap_or(0);
        format!(
            "{verb} {} step={step}",
            r.metadata.name.as_deref().unwrap_or("?")
        )
    };
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(r) => text("InitApply", r),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(r) => text("Apply", r),
        watcher::Event::Delete(r) => text("Delete", r),
    }
}

/// A watch from a compacted resourceVersion gets 410 Gone; bookmarks arrive on idle watches.
#[tokio::test]
async fn expired_resource_versions_are_gone_and_bookmarks_arrive() {
    let (sandbox, client) = start(SandboxConfig {
        history_limit: 5,
        bookmark_interval: Duration::from_millis(200),
        ..SandboxConfig::default()
    })
    .await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let first = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "m0"}})).expect("cm"),
        )
        .await
        .expect("create");
    let first_rv = first.metadata.resource_version.clone().unwrap_or_default();
    for i in 1..10 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("m{i}")}})).expect("cm");
        maps.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let mut stream = maps
        .watch(&WatchParams::default().disable_bookmarks(), &first_rv)
        .await
        .expect("watch starts")
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("answer within 5s")
        .expect("stream ok")
        .expect("one event");
    match event {
        WatchEvent::Error(status) => assert_eq!(status.code, 410, "{status:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    let list = maps.list(&Default::default()).await.expect("list");
    let rv = list.metadata.resource_version.unwrap_or_default();
    let mut stream = maps
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("a bookmark within 5s")
        .expect("stream ok")
        .expect("one event");
    match event {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    sandbox.stop().await;
}

/// Server-side apply from kube-rs, the way the operator writes: field manager, force, status subresource.
#[tokio::test]
async fn server_side_apply_and_status_from_kube() {
    let (sandbox, client) = start(SandboxConfig::default()).await;
    install_rollout_crd(&client).await;
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), "default");
    let params = PatchParams::apply(sluice::api::FIELD_MANAGER).force();
    let applied = rollouts
        .patch("web", &params, &Patch::Apply(rollout("web", 10)))
        .await
        .expect("apply creates");
    assert_eq!(applied.metadata.generation, Some(1));
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, vec![sluice::api::FIELD_MANAGER.to_owned()]);

    let status = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
                        "status": {"phase": "Initialized", "canaryWeight": 0}});
    let updated = rollouts
        .patch_status("web", &params, &Patch::Apply(status))
        .await
        .expect("status apply");
    assert_eq!(
        updated.metadata.generation,
        Some(1),
        "status writes leave generation alone"
    );
    assert_eq!(
        updated.status.and_then(|s| s.phase),
        Some(sluice::api::RolloutPhase::Initialized)
    );

    // Applying the same thing again writes nothing.
    let before = rollouts
        .get("web")
        .await
        .expect("get")
        .metadata
        .resource_version;
    let again = rollouts
        .patch("web", &params, &Patch::Apply(rollout("web", 10)))
        .await
        .expect("re-apply");
    assert_eq!(again.metadata.resource_version, before);

    // An invalid change is refused with a 422 naming the field.
    let err = rollouts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"analysis": {"stepWeight": 90}}})),
        )
        .await
        .expect_err("CEL rule refuses maxWeight < stepWeight");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("spec.analysis"),
                "{}",
                status.message
            );
        }
        other => panic!("expected an API error, got {other}"),
    }
    sandbox.stop().await;
}

/// The kubelet stand-in: ready after a spec change, never ready with the annotation.
#[tokio::test]
async fn workloads_report_readiness() {
    let (sandbox, client) = start(SandboxConfig {
        ready_delay: Duration::from_millis(50),
        ..SandboxConfig::default()
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment = |name: &str, never_ready: bool| -> Deployment {
        let annotations = if never_ready {
            json!({"sandbox.sluice.dev/never-ready": "true"})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}, "annotations": annotations},
                             "spec": {"containers": [{"name": "app", "image": "example:1"}]}}
            }
        }))
        .expect("deployment")
    };
    deployments
        .create(&PostParams::default(), &deployment("good", false))
        .await
        .expect("create");
    deployments
        .create(&PostParams::default(), &deployment("bad", true))
        .await
        .expect("create");
    let ready = |d: &Deployment| {
        d.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    };
    let observed = |d: &Deployment| d.status.as_ref().and_then(|s| s.observed_generation);
    let mut good = deployments.get("good").await.expect("get");
    for _ in 0..100 {
        if ready(&good) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        good = deployments.get("good").await.expect("get");
    }
    assert_eq!(ready(&good), 2);
    assert_eq!(observed(&good), good.metadata.generation);
    let bad = deployments.get("bad").await.expect("get");
    assert_eq!(
        observed(&bad),
        bad.metadata.generation,
        "status is written for a never-ready workload too"
    );
    assert_eq!(ready(&bad), 0);
    sandbox.stop().await;
}

/// Events published by kube-runtime's Recorder (events.k8s.io/v1), as the operator will publish them; a
/// repeat becomes a series on the same Event.
#[tokio::test]
async fn recorder_events_are_stored_and_repeats_become_a_series() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    let (sandbox, client) = start(SandboxConfig::default()).await;
    install_rollout_crd(&client).await;
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), "default");
    let created = rollouts
        .create(&PostParams::default(), &rollout("web", 10))
        .await
        .expect("create");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sluice".into(),
            instance: None,
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
        .expect("first publish");
    recorder
        .publish(&event, &reference)
        .await
        .expect("repeat publish");

    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "default");
    let stored = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items;
    assert_eq!(
        stored.len(),
        1,
        "a repeat must update the same Event: {stored:?}"
    );
    let stored = &stored[0];
    assert_eq!(stored.reason.as_deref(), Some("RolledBack"));
    assert_eq!(
        stored.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("web")
    );
    assert_eq!(stored.series.as_ref().map(|s| s.count), Some(2));
    sandbox.stop().await;
}

/// Stopping the sandbox ends open watches instead of leaving them to their timeout.
#[tokio::test]
async fn stop_ends_open_watches() {
    let (sandbox, client) = start(SandboxConfig::default()).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut stream = maps
        .watch(&WatchParams::default().timeout(290), "0")
        .await
        .expect("watch")
        .boxed();
    sandbox.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.try_next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived the sandbox");
}

/// kube-runtime's finalizer helper (the operator's cleanup path) adds its finalizer, and after deletion runs
/// the cleanup and removes it so the object goes away.
#[tokio::test]
async fn kube_runtime_finalizer_helper_round_trip() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    use std::sync::Arc;

    let (sandbox, client) = start(SandboxConfig::default()).await;
    install_rollout_crd(&client).await;
    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), "default");
    rollouts
        .create(&PostParams::default(), &rollout("web", 10))
        .await
        .expect("create");
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
    const NAME: &str = "sluice.dev/cleanup";
    // First pass only adds the finalizer; the second applies.
    let obj = Arc::new(rollouts.get("web").await.expect("get"));
    finalizer(&rollouts, NAME, obj, step("apply"))
        .await
        .expect("finalizer added");
    let obj = rollouts.get("web").await.expect("get");
    assert_eq!(obj.metadata.finalizers, Some(vec![NAME.to_owned()]));
    finalizer(&rollouts, NAME, Arc::new(obj), step("apply"))
        .await
        .expect("apply runs");

    rollouts
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete is accepted");
    let obj = rollouts.get("web").await.expect("held by the finalizer");
    assert!(obj.metadata.deletion_timestamp.is_some());
    finalizer(&rollouts, NAME, Arc::new(obj), step("cleanup"))
        .await
        .expect("cleanup runs");
    let gone = rollouts.get_opt("web").await.expect("get_opt");
    assert!(
        gone.is_none(),
        "the object must be gone once its finalizer is removed"
    );
    sandbox.stop().await;
}
