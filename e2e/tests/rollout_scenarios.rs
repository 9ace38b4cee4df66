//! End-to-end Rollout scenarios: the real `sluice operator` binary, running as its ServiceAccount with exactly
//! the RBAC of `config/base`, against a real local control plane (see `testcluster/`: its own etcd,
//! kube-apiserver, controllers and kwok nodes per scenario, with the real Gateway API and Istio CRDs), judged
//! by a real Prometheus that scrapes a fake mesh exporting Istio's series. Each scenario watches the route
//! object's weights over time, not just the final state.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::{Provider, Rollout, RolloutPhase};
use sluice::traffic::{RouteTarget, router_for};
use sluice_e2e::harness::{Cluster, OperatorProcess, start_cluster};
use sluice_e2e::prometheus::{FakeMesh, PrometheusServer, WorkloadTraffic};

const NS: &str = "default";

/// A canary that fails half its requests.
const ERRORING: WorkloadTraffic = WorkloadTraffic {
    rps: 50.0,
    error_ratio: 0.5,
    latency_ms: 20.0,
};

/// Canary weights seen on the route object, in order, with when they were first seen.
type WeightLog = Arc<Mutex<Vec<(Instant, u8)>>>;

struct Scenario {
    client: Client,
    provider: Provider,
    mesh: FakeMesh,
    prometheus: PrometheusServer,
    operator: OperatorProcess,
    weights: WeightLog,
    recorder: tokio::task::JoinHandle<()>,
    /// Plays Consul's controller for ServiceSplitters (Consul scenarios only).
    consul: Option<tokio::task::JoinHandle<()>>,
    /// When the stand-in Consul synced each canary weight.
    consul_syncs: WeightLog,
    /// The target's kind: `Deployment` or `StatefulSet`.
    kind: String,
    /// The control plane; stopped when the scenario ends (declared last: dropped after the operator).
    cluster: Cluster,
}

fn rollout(provider: Provider, analysis: Value, deadline: u32) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "provider": provider,
            "progressDeadlineSeconds": deadline,
            "analysis": analysis,
        }
    })
}

fn canary_analysis(threshold: u32) -> Value {
    checked_analysis(json!({"threshold": threshold, "stepWeight": 20, "maxWeight": 60}))
}

fn deployment(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {"metadata": {"labels": {"app": "podinfo"}},
                         "spec": {"containers": [{"name": "podinfo", "image": image, "ports": [{"containerPort": 9898}]}]}}
        }
    })
}

fn route_target() -> RouteTarget {
    RouteTarget {
        name: "podinfo".into(),
        namespace: NS.into(),
        apex: "podinfo".into(),
        primary: "podinfo-primary".into(),
        canary: "podinfo-canary".into(),
        port: 9898,
        hosts: vec![],
        gateways: vec![],
        owner: Default::default(),
        canary_routes: Default::default(),
    }
}

/// A local control plane with Sluice (`config/base`) and the mesh CRDs installed.
async fn cluster() -> Cluster {
    start_cluster()
        .await
        .expect("control plane with Sluice and the mesh CRDs installed")
}

/// Stops the control plane's processes (blocking: it waits for them to exit).
fn stop_cluster(cluster: Cluster) {
    tokio::task::block_in_place(move || cluster.control_plane.stop());
}

/// Starts `sluice operator` as its ServiceAccount (`cluster.operator_kubeconfig`), logging to `log` in the
/// cluster's directory.
fn start_operator(cluster: &Cluster, prometheus_url: &str, log: &str) -> OperatorProcess {
    OperatorProcess::start(
        &cluster.operator_kubeconfig,
        prometheus_url,
        &cluster.dir.path().join(log),
    )
    .expect("operator starts")
}

impl Scenario {
    async fn start(provider: Provider, analysis: Value, deadline: u32) -> Scenario {
        Scenario::start_with_sync_delay(provider, analysis, deadline, Duration::from_millis(200))
            .await
    }

    /// [`Scenario::start`] with a Consul that takes `consul_sync_delay` to sync each splitter.
    async fn start_with_sync_delay(
        provider: Provider,
        analysis: Value,
        deadline: u32,
        consul_sync_delay: Duration,
    ) -> Scenario {
        let scenario = Scenario::launch(
            provider,
            analysis,
            deadline,
            deployment("podinfo:1"),
            consul_sync_delay,
        )
        .await;
        scenario
            .wait_for_phase(RolloutPhase::Initialized, Duration::from_secs(60))
            .await;
        scenario
    }

    /// Starts everything with `target` as the Rollout's Deployment, without waiting for initialization.
    async fn start_with(
        provider: Provider,
        analysis: Value,
        deadline: u32,
        target: Value,
    ) -> Scenario {
        Scenario::launch(
            provider,
            analysis,
            deadline,
            target,
            Duration::from_millis(200),
        )
        .await
    }

    async fn launch(
        provider: Provider,
        analysis: Value,
        deadline: u32,
        target: Value,
        consul_sync_delay: Duration,
    ) -> Scenario {
        Scenario::launch_in(
            cluster().await,
            provider,
            analysis,
            deadline,
            target,
            consul_sync_delay,
        )
        .await
    }

    /// [`Scenario::launch`] on a cluster the test prepared.
    async fn launch_in(
        cluster: Cluster,
        provider: Provider,
        analysis: Value,
        deadline: u32,
        target: Value,
        consul_sync_delay: Duration,
    ) -> Scenario {
        let client = cluster.client.clone();
        let kind = target["kind"].as_str().unwrap_or("Deployment").to_owned();
        provision_volumes(&client, &target).await;
        workloads(&client, &kind)
            .create(
                &PostParams::default(),
                &serde_json::from_value(target).expect("workload"),
            )
            .await
            .expect("target created");

        let mesh = FakeMesh::start().await.expect("fake mesh");
        for workload in ["podinfo", "podinfo-primary"] {
            mesh.set(workload, NS, WorkloadTraffic::healthy(50.0));
        }
        let prometheus = PrometheusServer::start(&[mesh.target()])
            .await
            .expect("prometheus starts");
        prometheus
            .wait_for_scrapes(2, Duration::from_secs(20))
            .await
            .expect("prometheus scrapes the mesh");

        let rollouts: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            NS,
            &kube::core::ApiResource::erase::<Rollout>(&()),
        );
        let mut object = rollout(provider, analysis, deadline);
        object["spec"]["targetRef"]["kind"] = json!(kind);
        let object: DynamicObject = serde_json::from_value(object).expect("rollout");
        rollouts
            .create(&PostParams::default(), &object)
            .await
            .expect("rollout created");

        let operator = start_operator(&cluster, &prometheus.url(), "operator.log");
        let weights: WeightLog = Arc::default();
        let recorder = tokio::spawn(record_weights(client.clone(), provider, weights.clone()));
        let consul_syncs: WeightLog = Arc::default();
        let consul = (provider == Provider::Consul).then(|| {
            tokio::spawn(play_consul(
                client.clone(),
                consul_sync_delay,
                consul_syncs.clone(),
            ))
        });
        Scenario {
            client,
            provider,
            mesh,
            prometheus,
            operator,
            weights,
            recorder,
            consul,
            consul_syncs,
            kind,
            cluster,
        }
    }

    /// Waits for `InvalidSpec=True`; returns the condition.
    async fn wait_for_invalid_spec(&self) -> sluice::api::Condition {
        let started = Instant::now();
        loop {
            let status = self.rollout().await.status.unwrap_or_default();
            if let Some(c) = status
                .conditions
                .iter()
                .find(|c| c.type_ == "InvalidSpec" && c.status == "True")
            {
                return c.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no InvalidSpec condition\n{}",
                self.operator.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The live route object as JSON.
    async fn route(&self) -> Value {
        let router = router_for(self.provider);
        let routes: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), NS, &router.api_resource());
        serde_json::to_value(routes.get("podinfo").await.expect("route object")).expect("json")
    }

    /// Waits until the rollout's status message satisfies `wanted`; returns it.
    async fn wait_for_message(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let message = self
                .rollout()
                .await
                .status
                .and_then(|st| st.message)
                .unwrap_or_default();
            if wanted(&message) {
                return message;
            }
            assert!(
                started.elapsed() < timeout,
                "message never came; last: {message}\n{}",
                self.operator.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn rollout(&self) -> Rollout {
        Api::<Rollout>::namespaced(self.client.clone(), NS)
            .get("podinfo")
            .await
            .expect("rollout readable")
    }

    async fn wait_for_phase(&self, phase: RolloutPhase, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let r = self.rollout().await;
            if r.status.as_ref().and_then(|s| s.phase) == Some(phase) {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                panic!(
                    "rollout never reached {phase:?} within {timeout:?}; status: {:?}\nweights: {:?}\noperator log:\n{}",
                    r.status,
                    self.weight_sequence(),
                    self.operator.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_weight(&self, at_least: u8, timeout: Duration) {
        let started = Instant::now();
        while !self.weight_sequence().iter().any(|w| *w >= at_least) {
            assert!(
                started.elapsed() < timeout,
                "canary weight never reached {at_least}: {:?}\n{}",
                self.weight_sequence(),
                self.operator.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn weight_sequence(&self) -> Vec<u8> {
        self.weights
            .lock()
            .map(|w| w.iter().map(|(_, w)| *w).collect())
            .unwrap_or_default()
    }

    /// Starts a fresh observation window: the weight log holds only what happens from now on.
    fn clear_weights(&self) {
        self.weights.lock().map(|mut w| w.clear()).unwrap_or(());
    }

    /// Waits until the Rollout satisfies `done`; returns it.
    async fn wait_for(&self, timeout: Duration, done: impl Fn(&Rollout) -> bool) -> Rollout {
        let started = Instant::now();
        loop {
            let r = self.rollout().await;
            if done(&r) {
                return r;
            }
            assert!(
                started.elapsed() < timeout,
                "the rollout never got there within {timeout:?}; status: {:?}\nweights: {:?}\noperator log:\n{}",
                r.status,
                self.weight_sequence(),
                self.operator.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the route (as recorded) sends `weight`% to the canary.
    async fn wait_for_route_weight(&self, weight: u8, timeout: Duration) {
        let started = Instant::now();
        while self.weight_sequence().last() != Some(&weight) {
            assert!(
                started.elapsed() < timeout,
                "the route never settled at {weight}% canary: {:?}",
                self.weight_sequence()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Changes the target's pod template: a new release.
    async fn release(&self, image: &str, template_annotations: Value) {
        let deployments = workloads(&self.client, &self.kind);
        let patch = json!({"spec": {"template": {
            "metadata": {"annotations": template_annotations},
            "spec": {"containers": [{"name": "podinfo", "image": image}]}
        }}});
        deployments
            .patch("podinfo", &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .expect("new revision");
        self.weights.lock().map(|mut w| w.clear()).unwrap_or(());
    }

    async fn deployment(&self, name: &str) -> Deployment {
        Api::<Deployment>::namespaced(self.client.clone(), NS)
            .get(name)
            .await
            .expect("deployment")
    }

    /// Kills the operator and restarts it (as its ServiceAccount again), logging to `log`.
    fn restart_operator(&mut self, log: &str) {
        self.operator.kill();
        self.operator = start_operator(&self.cluster, &self.prometheus.url(), log);
    }

    /// The admin kubeconfig, for what a user would run (kubectl, the plugin).
    fn kubeconfig(&self) -> std::path::PathBuf {
        self.cluster.kubeconfig.clone()
    }

    async fn stop(self) {
        let Scenario {
            mut operator,
            recorder,
            consul,
            mesh,
            cluster,
            ..
        } = self;
        recorder.abort();
        if let Some(consul) = consul {
            consul.abort();
        }
        operator.kill();
        drop(mesh);
        keep_logs(&cluster);
        stop_cluster(cluster);
    }
}

/// The control plane has no storage provisioner: a StatefulSet's volume claims stay Pending, and so do its
/// Pods, unless volumes are there to bind. Creates, like a provisioner would have, one PersistentVolume per
/// claim of the target and of its `-primary` clone (claims without a storage class bind to volumes without
/// one). Nothing mounts them: kwok runs no containers.
async fn provision_volumes(client: &Client, target: &Value) {
    use k8s_openapi::api::core::v1::PersistentVolume;
    let Some(templates) = target["spec"]["volumeClaimTemplates"].as_array() else {
        return;
    };
    let replicas = target["spec"]["replicas"].as_u64().unwrap_or(1);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for template in templates {
        let claim = template["metadata"]["name"].as_str().expect("claim name");
        let storage = &template["spec"]["resources"]["requests"]["storage"];
        for set in ["podinfo", "podinfo-primary"] {
            for ordinal in 0..replicas {
                let name = format!("{claim}-{set}-{ordinal}");
                let volume = json!({
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": name},
                    "spec": {
                        "capacity": {"storage": storage},
                        "accessModes": template["spec"]["accessModes"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "claimRef": {"namespace": NS, "name": name},
                        "hostPath": {"path": format!("/tmp/sluice-e2e/{name}")},
                    }
                });
                volumes
                    .create(
                        &PostParams::default(),
                        &serde_json::from_value(volume).expect("volume"),
                    )
                    .await
                    .expect("volume created");
            }
        }
    }
}

/// Copies the operator's (and Prometheus's) logs to `$SLUICE_E2E_LOGS/<test>/` when that is set.
fn keep_logs(cluster: &Cluster) {
    let Some(root) = std::env::var_os("SLUICE_E2E_LOGS") else {
        return;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .replace("::", "-");
    let dest = std::path::Path::new(&root).join(test);
    let _ = std::fs::create_dir_all(&dest);
    if let Ok(entries) = std::fs::read_dir(cluster.dir.path()) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(&path, dest.join(entry.file_name()));
            }
        }
    }
}

/// The Api of Deployments or StatefulSets.
fn workloads(client: &Client, kind: &str) -> Api<DynamicObject> {
    let kind: sluice::api::TargetKind = serde_json::from_value(json!(kind)).expect("a target kind");
    Api::namespaced_with(
        client.clone(),
        NS,
        &sluice::controller::workload::api_resource(kind),
    )
}

/// A stand-in for consul-k8s' config-entry controller: after `delay`, marks a ServiceSplitter `Synced` when
/// its spec changed or its condition is not True, as consul-k8s does once the entry is in Consul.
async fn play_consul(client: Client, delay: Duration, syncs: WeightLog) {
    let router = router_for(Provider::Consul);
    let splitters: Api<DynamicObject> = Api::namespaced_with(client, NS, &router.api_resource());
    let mut synced: std::collections::HashMap<String, i64> = Default::default();
    loop {
        if let Ok(list) = splitters.list(&Default::default()).await {
            for splitter in list.items {
                let name = splitter.metadata.name.clone().unwrap_or_default();
                let generation = splitter.metadata.generation.unwrap_or_default();
                let condition_true = splitter
                    .data
                    .pointer("/status/conditions/0/status")
                    .and_then(Value::as_str)
                    == Some("True");
                if synced.get(&name) == Some(&generation) && condition_true {
                    continue;
                }
                tokio::time::sleep(delay).await;
                // Like consul-k8s, sync what the splitter holds now, not what it held before the wait.
                let Ok(current) = splitters.get(&name).await else {
                    continue;
                };
                let generation = current.metadata.generation.unwrap_or_default();
                // Whole seconds, like metav1.Time.
                let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                    .expect("a valid time")
                    .to_string();
                let status = json!({"status": {
                    "conditions": [{"type": "Synced", "status": "True", "lastTransitionTime": now}],
                    "lastSyncedTime": now,
                }});
                if splitters
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .is_ok()
                {
                    synced.insert(name, generation);
                    let weight = serde_json::to_value(&current)
                        .ok()
                        .and_then(|v| router.observed_split(&v, &route_target()))
                        .map(|split| split.canary().get());
                    if let (Some(weight), Ok(mut log)) = (weight, syncs.lock()) {
                        log.push((Instant::now(), weight));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches the route object and logs every change of the canary weight. A watch sees every write, so a
/// state that lasts a few milliseconds (the 100% of a blue-green promotion) is not missed between polls.
async fn record_weights(client: Client, provider: Provider, log: WeightLog) {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let router = router_for(provider);
    let routes: Api<DynamicObject> = Api::namespaced_with(client, NS, &router.api_resource());
    let target = route_target();
    let config = watcher::Config::default().fields("metadata.name=podinfo");
    let mut routes = std::pin::pin!(watcher(routes, config).default_backoff().applied_objects());
    while let Some(route) = routes.next().await {
        let Ok(route) = route else { continue };
        let split = serde_json::to_value(&route)
            .ok()
            .and_then(|v| router.observed_split(&v, &target));
        if let (Some(split), Ok(mut log)) = (split, log.lock()) {
            let weight = split.canary().get();
            if log.last().map(|(_, w)| *w) != Some(weight) {
                log.push((Instant::now(), weight));
            }
        }
    }
}

fn image_of(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

async fn healthy_release_is_promoted(provider: Provider) {
    let s = Scenario::start(provider, canary_analysis(2), 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    // Give the recorder a moment to see the final route.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let weights = s.weight_sequence();
    let climbed: Vec<u8> = weights.iter().copied().filter(|w| *w > 0).collect();
    assert_eq!(
        climbed,
        vec![20, 40, 60],
        "every step once, in order: {weights:?}"
    );
    // Each move followed a passing check at the weight before it, as the operator's transitions say (how long
    // a weight is held before its check is the planner's, proven in its unit tests; wall-clock gaps seen
    // through a watch lag on a loaded machine).
    let log = s.operator.log();
    for wanted in [
        "canary ready; routing 20% of traffic to it",
        "checks passed at 20%; routing 40% to the canary",
        "checks passed at 40%; routing 60% to the canary",
        "every stage passed",
    ] {
        assert!(
            log.contains(wanted),
            "no transition saying {wanted:?}:\n{log}"
        );
    }
    assert_eq!(
        weights.last(),
        Some(&0),
        "100% primary at the end: {weights:?}"
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:2"
    );
    assert_eq!(
        s.deployment("podinfo").await.spec.and_then(|s| s.replicas),
        Some(0),
        "canary scaled to 0"
    );
    let status = s.rollout().await.status.expect("status");
    assert_eq!(status.last_promoted_revision, status.revision);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::Istio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gatewayapi_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::GatewayApi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linkerd_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::Linkerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smi_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::Smi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smi_v1alpha1_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::SmiV1alpha1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consul_healthy_release_walks_every_step_and_is_promoted() {
    healthy_release_is_promoted(Provider::Consul).await;
}

/// Each provider's builtin success rate reads its own mesh's failure series: an erroring canary fails.
async fn erroring_canary_is_rolled_back(provider: Provider) {
    let s = Scenario::start(provider, canary_analysis(1), 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(20, Duration::from_secs(20)).await;
    s.mesh.set("podinfo", NS, ERRORING);
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(20))
        .await;
    let message = s
        .rollout()
        .await
        .status
        .and_then(|st| st.message)
        .unwrap_or_default();
    assert!(message.contains("request-success-rate"), "{message}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.weight_sequence().last(),
        Some(&0),
        "{:?}",
        s.weight_sequence()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linkerd_erroring_canary_is_rolled_back() {
    erroring_canary_is_rolled_back(Provider::Linkerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consul_erroring_canary_is_rolled_back() {
    erroring_canary_is_rolled_back(Provider::Consul).await;
}

/// Consul applies a splitter asynchronously: a step is judged only once the splitter is `Synced`, so with a
/// Consul that takes 2s to sync, no weight moves on before Consul has synced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consul_steps_wait_for_the_splitter_to_sync() {
    let s = Scenario::start_with_sync_delay(
        Provider::Consul,
        canary_analysis(2),
        60,
        Duration::from_secs(2),
    )
    .await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let weights: Vec<(Instant, u8)> = s.weights.lock().map(|w| w.clone()).unwrap_or_default();
    let syncs: Vec<(Instant, u8)> = s.consul_syncs.lock().map(|w| w.clone()).unwrap_or_default();
    let steps: Vec<_> = weights.windows(2).filter(|p| p[0].1 > 0).collect();
    assert_eq!(steps.len(), 3, "{weights:?}");
    for pair in steps {
        let (weight, moved_on) = (pair[0].1, pair[1].0);
        let synced = syncs
            .iter()
            .find(|(_, w)| *w == weight)
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("Consul never synced {weight}%: {syncs:?}"));
        assert!(
            synced <= moved_on,
            "{weight}% was judged {:?} before Consul synced it",
            synced.duration_since(moved_on)
        );
    }
    s.stop().await;
}

/// `sluice simulate`, fed the series Prometheus recorded during a real release, tells the same story the
/// operator lived: the same weights, the same outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulate_agrees_with_the_operator_on_the_same_series() {
    // Checks every 10 s, and errors that start in the middle of the 40% stage: 5 s from either check, so
    // neither the operator's reconcile latency nor the 1 s ticks of the series can move them to another
    // stage. What must agree is the path: promoted through 20%, rolled back at 40%.
    let analysis = json!({
        "interval": "10s", "threshold": 1, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "10s", "minRequests": 5}]
    });
    let s = Scenario::start(Provider::Istio, analysis.clone(), 60).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(40, Duration::from_secs(60)).await;
    let stage_start = |weight: u8| {
        s.weights
            .lock()
            .ok()
            .and_then(|w| w.iter().find(|(_, x)| *x == weight).map(|(t, _)| *t))
            .expect("the stage was recorded")
    };
    let (first_stage, second_stage) = (stage_start(20), stage_start(40));
    tokio::time::sleep(
        (second_stage + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    )
    .await;
    s.mesh.set("podinfo", NS, ERRORING);
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(60))
        .await;
    let lived = s.weight_sequence();
    // The simulator's clock starts where the operator's first stage started (the canary already ready).
    let epoch_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let released = epoch_now - first_stage.elapsed().as_secs_f64();

    // The series the operator's queries saw, second by second since its first stage started.
    let ctx = sluice::metrics::QueryContext {
        namespace: NS.into(),
        target: "podinfo".into(),
        service: "podinfo".into(),
        interval: "10s".into(),
        variables: Default::default(),
        statefulset: false,
        stage_age: None,
        waypoint: false,
    };
    let queries =
        sluice::metrics::builtin(Provider::Istio, "request-success-rate", &ctx).expect("builtin");
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let mut csv = String::from("time,metric,value,requests\n");
    let first = |data: Value| {
        data.pointer("/result/0/value/1")
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<f64>().ok())
    };
    let mut t = 0.0;
    while released + t <= ended {
        let value = first(
            s.prometheus
                .query_at(&queries.value, released + t)
                .await
                .expect("query"),
        );
        let requests = match &queries.requests {
            Some(q) => first(s.prometheus.query_at(q, released + t).await.expect("query")),
            None => None,
        };
        let field = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        csv.push_str(&format!(
            "{t},request-success-rate,{},{}\n",
            field(value),
            field(requests)
        ));
        t += 1.0;
    }
    let series = s.cluster.dir.path().join("series.csv");
    std::fs::write(&series, &csv).expect("series written");
    let rollout = s.cluster.dir.path().join("rollout.yaml");
    std::fs::write(&rollout, rollout_yaml(&analysis)).expect("rollout written");
    let output = std::process::Command::new(sluice_e2e::harness::sluice_binary().expect("sluice"))
        .arg("simulate")
        .arg(&rollout)
        .arg("--metrics")
        .arg(&series)
        .args(["--ready-after", "0"])
        .output()
        .expect("sluice simulate runs");
    let timeline = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{timeline}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{timeline}");
    assert!(timeline.contains("ROLLED BACK"), "{timeline}");
    let simulated: Vec<u8> = timeline
        .lines()
        .last()
        .and_then(|l| l.split("canary weights: ").nth(1))
        .map(|w| {
            w.split(" -> ")
                .filter_map(|x| x.trim_end_matches('%').parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let from_first_step =
        |weights: &[u8]| -> Vec<u8> { weights.iter().copied().skip_while(|w| *w == 0).collect() };
    assert_eq!(
        from_first_step(&lived),
        vec![20, 40, 0],
        "the operator\n{timeline}\nseries:\n{csv}"
    );
    assert_eq!(
        from_first_step(&simulated),
        from_first_step(&lived),
        "simulate vs the operator\n{timeline}\nseries:\n{csv}"
    );
    s.stop().await;
}

fn rollout_yaml(analysis: &Value) -> String {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "progressDeadlineSeconds": 60,
            "analysis": analysis,
        }
    })
    .to_string()
}

/// A Rego gate (`analysis.policies`) holds a healthy canary until the rollout is approved, says why in the
/// status and an Event, then lets it through with an audit Event for every move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rego_gate_holds_until_approved_then_allows() {
    let mut analysis = canary_analysis(2);
    analysis["policies"] = json!([{"name": "approval", "configMapRef": {"name": "gate"}}]);
    let s = Scenario::start(Provider::Istio, analysis, 30).await;
    let gate = r#"package sluice.rollout.gate

default allow := false

allow if count(deny) == 0

deny contains "needs an approval: annotate the rollout with sluice.dev/approved-by" if {
	not input.rollout.annotations["sluice.dev/approved-by"]
}
"#;
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(s.client.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "gate", "namespace": NS},
                "data": {"gate.rego": gate},
            }))
            .expect("configmap"),
        )
        .await
        .expect("gate ConfigMap created");
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(20, Duration::from_secs(20)).await;
    // Healthy metrics alone would have moved on within a few seconds: the gate holds it.
    let message = s
        .wait_for_message(
            |m| m.starts_with("held at 20% by policy approval"),
            Duration::from_secs(20),
        )
        .await;
    assert!(message.contains("sluice.dev/approved-by"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.weight_sequence().iter().max(),
        Some(&20),
        "{:?}",
        s.weight_sequence()
    );

    Api::<Rollout>::namespaced(s.client.clone(), NS)
        .patch(
            "podinfo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"sluice.dev/approved-by": "alice"}}}),
            ),
        )
        .await
        .expect("approved");
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(30))
        .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.client.clone(), NS)
        .list(&Default::default())
        .await
        .expect("events");
    // kube's event recorder folds repeats into one Event series, so look at reasons, not counts.
    let reasons: Vec<String> = events
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(
        reasons.contains(&"PromotionDenied".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"PromotionAllowed".to_owned()),
        "{reasons:?}"
    );
    let climbed: Vec<u8> = s.weight_sequence().into_iter().filter(|w| *w > 0).collect();
    assert_eq!(climbed, vec![20, 40, 60], "every step after the approval");
    s.stop().await;
}

/// Runs `kubectl sluice ARGS` through the real kubectl, which finds the `kubectl-sluice` plugin on PATH.
fn kubectl_sluice(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    let binary = sluice_e2e::harness::sluice_binary().expect("sluice binaries");
    let bin_dir = binary.parent().expect("target dir").to_owned();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    std::process::Command::new(sluice_e2e::harness::kubectl_binary())
        .arg("sluice")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", path)
        .output()
        .expect("kubectl runs")
}

fn plugin_ok(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = kubectl_sluice(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl sluice {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kubectl plugin steers a release, and each command is judged by what it changes in a fresh
/// observation window (the weight log is cleared when the command is given), with an analysis where the
/// natural course of the release could not produce the same outcome: pause holds past the deadline, abort
/// rolls back, resume and retry release again from the first step, undo restores the promoted template
/// exactly and abandons the release, promote moves one indefinite pause on, promote --full skips the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_sluice_steers_a_release() {
    let s = Scenario::start(Provider::Istio, canary_analysis(2), 6).await;
    let kubeconfig = s.kubeconfig();
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(20, Duration::from_secs(20)).await;

    // Pause: once the operator has seen it, the weight holds and the 6s progress deadline does not fire.
    plugin_ok(&kubeconfig, &["pause", "podinfo", "-n", NS]);
    let paused = s
        .wait_for(Duration::from_secs(20), |r| {
            r.status.as_ref().is_some_and(|st| st.paused_at.is_some())
        })
        .await;
    let paused_at = paused
        .status
        .clone()
        .unwrap_or_default()
        .canary_weight
        .get();
    s.clear_weights();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = s.rollout().await.status.unwrap_or_default();
    assert_eq!(
        status.phase,
        Some(RolloutPhase::Progressing),
        "{:?}",
        status.message
    );
    assert_eq!(status.canary_weight.get(), paused_at);
    assert!(
        s.weight_sequence().iter().all(|w| *w == paused_at),
        "the route moved while paused: {:?}",
        s.weight_sequence()
    );
    let view = plugin_ok(&kubeconfig, &["get", "podinfo", "-n", NS]);
    assert!(view.contains("(paused by user)"), "{view}");
    assert!(view.contains("request-success-rate"), "{view}");
    assert!(view.contains("PausedByUser"), "events are shown: {view}");

    // Abort (while paused): everything back to the primary, the canary scaled down.
    s.clear_weights();
    plugin_ok(&kubeconfig, &["abort", "podinfo", "-n", NS]);
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(20))
        .await;
    let aborted = s.rollout().await;
    let message = aborted.status.clone().and_then(|st| st.message);
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("aborted by the user")),
        "{message:?}"
    );
    assert!(
        !aborted.annotations().contains_key("sluice.dev/abort"),
        "the abort annotation is used once"
    );
    s.wait_for_route_weight(0, Duration::from_secs(10)).await;
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:1"
    );

    // Resume, then retry: the failed revision is released again from the first step, and goes on to the
    // end (it would hold at its first step if the resume had not lifted the pause).
    plugin_ok(&kubeconfig, &["resume", "podinfo", "-n", NS]);
    assert!(
        !s.rollout()
            .await
            .annotations()
            .contains_key("sluice.dev/paused"),
        "resume lifts the pause"
    );
    s.clear_weights();
    plugin_ok(&kubeconfig, &["retry", "podinfo", "-n", NS]);
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(60))
        .await;
    let climbed: Vec<u8> = s.weight_sequence().into_iter().filter(|w| *w > 0).collect();
    assert_eq!(
        climbed,
        vec![20, 40, 60],
        "the retry walks every step again"
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:2"
    );

    // From here on, releases stop at indefinite pauses, so only a command can move them.
    let rollouts: Api<Rollout> = Api::namespaced(s.client.clone(), NS);
    let steps = json!({"spec": {"analysis": {"stepWeight": null, "maxWeight": null, "steps": [
        {"setWeight": 20}, {"pause": {}}, {"setWeight": 40}, {"pause": {}}, {"setWeight": 60}
    ]}}});
    rollouts
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(steps))
        .await
        .expect("switch to manual steps");

    // Undo: a `kubectl rollout restart`-style release (new image, restart annotation) is abandoned by putting
    // the target back on exactly the promoted template.
    s.release(
        "podinfo:3",
        json!({"kubectl.kubernetes.io/restartedAt": "2026-12-07T06:00:00Z"}),
    )
    .await;
    s.wait_for_phase(RolloutPhase::Paused, Duration::from_secs(20))
        .await;
    s.clear_weights();
    plugin_ok(&kubeconfig, &["undo", "podinfo", "-n", NS]);
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(20))
        .await;
    let undone = s.rollout().await.status.unwrap_or_default();
    assert_eq!(
        undone.message.as_deref(),
        Some("the target was reverted to the promoted revision")
    );
    assert_eq!(undone.revision, undone.last_promoted_revision);
    let target = s.deployment("podinfo").await;
    assert_eq!(image_of(&target), "podinfo:2");
    let annotations = target
        .spec
        .as_ref()
        .and_then(|sp| sp.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("kubectl.kubernetes.io/restartedAt"),
        "the abandoned revision's keys are gone: {annotations:?}"
    );
    let target_json = serde_json::to_value(&target).expect("json");
    let primary_json = serde_json::to_value(s.deployment("podinfo-primary").await).expect("json");
    assert_eq!(
        sluice::controller::workload::template_revision(&target_json),
        sluice::controller::workload::primary_revision(&primary_json),
        "the target runs the promoted revision"
    );
    s.wait_for_route_weight(0, Duration::from_secs(10)).await;

    // Promote: one indefinite pause is passed, and the release stops at the next one.
    s.release("podinfo:4", json!({})).await;
    s.wait_for_phase(RolloutPhase::Paused, Duration::from_secs(20))
        .await;
    s.clear_weights();
    plugin_ok(&kubeconfig, &["promote", "podinfo", "-n", NS]);
    s.wait_for(Duration::from_secs(20), |r| {
        r.status.as_ref().is_some_and(|st| {
            st.phase == Some(RolloutPhase::Paused) && st.canary_weight.get() == 40
        })
    })
    .await;
    let window = s.weight_sequence();
    assert!(
        window.last() == Some(&40) && window.iter().all(|w| [20, 40].contains(w)),
        "promote moves exactly one step, from 20 to 40: {window:?}"
    );

    // Promote --full: promoted from 40 without ever routing the remaining 60% step.
    s.clear_weights();
    plugin_ok(&kubeconfig, &["promote", "podinfo", "--full", "-n", NS]);
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(30))
        .await;
    assert!(
        !s.weight_sequence().contains(&60),
        "promote --full skips the remaining steps: {:?}",
        s.weight_sequence()
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:4"
    );

    let list = plugin_ok(&kubeconfig, &["list", "-n", NS]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("podinfo") && l.contains("Succeeded")),
        "{list}"
    );
    // Errors read like kubectl's, with a non-zero exit.
    let missing = kubectl_sluice(&kubeconfig, &["get", "nope", "-n", NS]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
    let retry_ok = kubectl_sluice(&kubeconfig, &["retry", "podinfo", "-n", NS]);
    assert!(
        !retry_ok.status.success(),
        "nothing to retry after a success"
    );
    let policy = kubectl_sluice(&kubeconfig, &["policy", "status", "nope", "-n", NS]);
    assert!(String::from_utf8_lossy(&policy.stderr).contains("authorizationpolicies.sluice.dev"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erroring_canary_is_rolled_back_at_its_next_check() {
    let s = Scenario::start(Provider::Istio, canary_analysis(1), 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(20, Duration::from_secs(20)).await;
    s.mesh.set("podinfo", NS, ERRORING);
    let injected = Instant::now();
    // When Prometheus first shows the canary failing the check...
    let query = r#"sum(rate(istio_requests_total{reporter="destination",destination_workload="podinfo",response_code!~"5.*"}[10s])) / sum(rate(istio_requests_total{reporter="destination",destination_workload="podinfo"}[10s])) * 100"#;
    let polling_since = Instant::now();
    let visible = loop {
        let answer = s.prometheus.query(query).await.expect("query");
        let value = answer
            .pointer("/result/0/value/1")
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<f64>().ok());
        if value.is_some_and(|v| v < 99.0) {
            break Instant::now();
        }
        assert!(
            polling_since.elapsed() < Duration::from_secs(20),
            "Prometheus never showed the errors: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // ...until the route sends everything back to the primary.
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(20))
        .await;
    let back = s
        .weights
        .lock()
        .ok()
        .and_then(|w| {
            w.iter()
                .rev()
                .find(|(_, weight)| *weight == 0)
                .map(|(t, _)| *t)
        })
        .expect("the route went back to 0% canary");
    let took = back.saturating_duration_since(visible);
    println!(
        "MEASURED: errors injected -> visible in Prometheus {} ms -> 100% primary {} ms (rollback {} ms after visible)",
        visible.duration_since(injected).as_millis(),
        back.saturating_duration_since(injected).as_millis(),
        took.as_millis()
    );
    // Order, not speed (the speed is the MEASURED line above): with a threshold of 1, the first check that
    // sees the errors rolls back. At most one step lands after they became visible (from a check that
    // queried just before), and then everything goes back to the primary.
    let after_visible: Vec<u8> = s
        .weights
        .lock()
        .map(|w| {
            w.iter()
                .filter(|(t, _)| *t >= visible)
                .map(|(_, weight)| *weight)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        after_visible.last(),
        Some(&0),
        "back on the primary: {after_visible:?}"
    );
    assert!(
        after_visible.iter().filter(|w| **w > 0).count() <= 1,
        "the canary kept gaining traffic after the errors were visible: {after_visible:?}"
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:1",
        "the primary keeps the old version"
    );
    assert_eq!(
        s.deployment("podinfo").await.spec.and_then(|s| s.replicas),
        Some(0)
    );
    let message = s
        .rollout()
        .await
        .status
        .and_then(|st| st.message)
        .unwrap_or_default();
    assert!(
        message.contains("request-success-rate"),
        "the reason names the metric: {message}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_down_freezes_the_weight_then_the_deadline_rolls_back() {
    let mut s = Scenario::start(Provider::Istio, canary_analysis(2), 8).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(20, Duration::from_secs(20)).await;
    s.prometheus.stop();
    let frozen_at = *s.weight_sequence().last().expect("a weight");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        s.weight_sequence().last(),
        Some(&frozen_at),
        "weights must not move while metrics are down"
    );
    let r = s.rollout().await;
    assert_ne!(
        r.status.as_ref().and_then(|st| st.phase),
        Some(RolloutPhase::Succeeded)
    );
    let progressing = r.status.as_ref().and_then(|st| {
        st.conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .cloned()
    });
    assert_eq!(progressing.map(|c| c.reason), Some("Frozen".to_owned()));
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.weight_sequence().last(), Some(&0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_that_never_becomes_ready_is_rolled_back_at_the_deadline() {
    let s = Scenario::start(Provider::Istio, canary_analysis(2), 5).await;
    s.release(
        "podinfo:broken",
        json!({sluice_testcluster::READY_AFTER_ANNOTATION: "never"}),
    )
    .await;
    let took = s
        .wait_for_phase(RolloutPhase::Failed, Duration::from_secs(20))
        .await;
    assert!(
        took >= Duration::from_secs(4),
        "rolled back before the deadline: {took:?}"
    );
    assert!(
        s.weight_sequence().iter().all(|w| *w == 0),
        "a canary that is not ready gets no traffic"
    );
    assert_eq!(
        s.deployment("podinfo").await.spec.and_then(|s| s.replicas),
        Some(0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_mid_release_continues_from_status() {
    let mut s = Scenario::start(Provider::Istio, canary_analysis(2), 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(40, Duration::from_secs(20)).await;
    s.operator.kill();
    let paused = s.weight_sequence();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.weight_sequence(),
        paused,
        "nothing moves while the operator is down"
    );
    s.restart_operator("operator-2.log");
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let climbed: Vec<u8> = s.weight_sequence().into_iter().filter(|w| *w > 0).collect();
    assert_eq!(
        climbed,
        vec![20, 40, 60],
        "no step repeated or skipped across the restart"
    );
    s.stop().await;
}

/// Two replicas with leader election: only the leader moves the release; killing it (SIGKILL: no release of
/// the Lease) hands the release to the standby after the Lease expires, which continues from status: no step
/// repeated or skipped, and every notification delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_fail_over_mid_release_without_repeating_a_step_or_an_alert() {
    let mut analysis = canary_analysis(2);
    analysis["alerts"] =
        json!([{"name": "hook", "severity": "info", "providerRef": {"name": "hook"}}]);
    let mut s = Scenario::start(Provider::Istio, analysis, 60).await;
    let receiver: SharedReceiver = Arc::new(Mutex::new(Receiver::default()));
    let hook = start_receiver(receiver.clone()).await;
    install_providers(&s, None, hook).await;

    // Replace the single operator by two replicas electing a leader on a short Lease.
    s.operator.kill();
    let lease_args = [
        "--leader-elect",
        "--leader-election-namespace",
        "sluice-system",
        "--leader-election-lease-secs",
        "6",
    ];
    let start = |log: &str| {
        OperatorProcess::start_with(
            &s.cluster.operator_kubeconfig,
            &s.prometheus.url(),
            &s.cluster.dir.path().join(log),
            &lease_args,
        )
        .expect("replica starts")
    };
    let mut replicas = [start("replica-a.log"), start("replica-b.log")];
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(s.client.clone(), "sluice-system");
    let holder = async || {
        leases
            .get_opt("sluice-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let first = eventually("a leader", Duration::from_secs(30), async || holder().await).await;
    let leader = replicas
        .iter()
        .position(|r| first.ends_with(&format!("-{}", r.pid())))
        .unwrap_or_else(|| panic!("the Lease names {first}, neither replica"));
    let standby = 1 - leader;
    eventually(
        "only the leader to say it leads",
        Duration::from_secs(10),
        async || replicas[leader].log().contains(" leading").then_some(()),
    )
    .await;
    assert!(
        !replicas[standby].log().contains(" leading"),
        "the standby leads too:\n{}",
        replicas[standby].log()
    );

    s.release("podinfo:2", json!({})).await;
    s.wait_for_weight(40, Duration::from_secs(30)).await;
    replicas[leader].kill();
    let killed = Instant::now();
    let second = eventually(
        "the standby to take the Lease",
        Duration::from_secs(30),
        async || holder().await.filter(|h| *h != first),
    )
    .await;
    let failover = killed.elapsed();
    assert!(
        second.ends_with(&format!("-{}", replicas[standby].pid())),
        "{second}"
    );
    println!(
        "failover: the standby holds the Lease {failover:.1?} after the leader was killed (Lease 6 s)"
    );
    assert!(
        failover < Duration::from_secs(20),
        "failover took {failover:?}"
    );

    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let climbed: Vec<u8> = s.weight_sequence().into_iter().filter(|w| *w > 0).collect();
    assert_eq!(
        climbed,
        vec![20, 40, 60],
        "no step repeated or skipped across the failover"
    );
    let reasons = deliveries_until(&receiver, "Promoted").await;
    for once in ["ReleaseStarted", "Promoted"] {
        assert_eq!(
            reasons.iter().filter(|(_, r)| r == once).count(),
            1,
            "{once} delivered once: {reasons:?}"
        );
    }
    drop(replicas);
    s.stop().await;
}

/// Write requests the API server has served since it started, by `VERB group/resource[/subresource]`, read
/// from its `apiserver_request_total` metric (every request counts, a no-op patch too, unlike
/// resourceVersions). Leases and Nodes are left out: kwok's node heartbeats write them all the time. So are
/// Events, which the controller-manager writes too: [`events_by_reporter`] tells whose they are.
fn api_writes(cluster: &Cluster) -> std::collections::BTreeMap<String, u64> {
    let text = tokio::task::block_in_place(|| cluster.kubectl.ok(&["get", "--raw", "/metrics"]));
    let mut writes = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let verb = label("verb");
        let resource = label("resource");
        if ![
            "POST",
            "PUT",
            "PATCH",
            "APPLY",
            "DELETE",
            "DELETECOLLECTION",
        ]
        .contains(&verb.as_str())
            || ["leases", "nodes", "events"].contains(&resource.as_str())
        {
            continue;
        }
        let (group, subresource) = (label("group"), label("subresource"));
        let key = if subresource.is_empty() {
            format!("{verb} {group}/{resource}")
        } else {
            format!("{verb} {group}/{resource}/{subresource}")
        };
        *writes.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or_default() as u64;
    }
    writes
}

/// Every Event (core and events.k8s.io: the same objects) in [`NS`] as `reporter: reason (object)`, by
/// name and resourceVersion, so a repeated Event counts again.
async fn events_by_reporter(client: &Client) -> std::collections::BTreeMap<String, String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|e| {
            let reporter = e
                .reporting_controller
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| {
                    e.deprecated_source
                        .as_ref()
                        .and_then(|s| s.component.clone())
                })
                .unwrap_or_default();
            let object = e
                .regarding
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            (
                format!(
                    "{}@{}",
                    e.name_any(),
                    e.resource_version().unwrap_or_default()
                ),
                format!(
                    "{reporter}: {} ({object})",
                    e.reason.clone().unwrap_or_default()
                ),
            )
        })
        .collect()
}

/// The resourceVersion of every object the operator reads or writes for a Rollout in [`NS`], by
/// `kind/name`.
async fn resource_versions(client: &Client) -> std::collections::BTreeMap<String, String> {
    let mut kinds = vec![
        kube::core::ApiResource::erase::<Rollout>(&()),
        kube::core::ApiResource::erase::<Deployment>(&()),
        kube::core::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
    ];
    kinds.extend(
        [
            "networking.istio.io/v1:VirtualService",
            "networking.istio.io/v1:DestinationRule",
        ]
        .iter()
        .map(|gvk| {
            let (api_version, kind) = gvk.split_once(':').expect("gvk");
            let (group, version) = api_version.split_once('/').expect("group/version");
            kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
                group, version, kind,
            ))
        }),
    );
    let mut versions = std::collections::BTreeMap::new();
    for kind in kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &kind);
        for object in api.list(&Default::default()).await.expect("list").items {
            versions.insert(
                format!("{}/{}", kind.kind, object.name_any()),
                object.resource_version().unwrap_or_default(),
            );
        }
    }
    versions
}

/// 100 Rollouts at rest, reconciled every second: the operator must write nothing, not even a patch that
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_idle_rollouts_cause_no_writes() {
    let cluster = cluster().await;
    let client = cluster.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let rollouts: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &kube::core::ApiResource::erase::<Rollout>(&()),
    );
    const COUNT: usize = 100;
    for i in 0..COUNT {
        let name = format!("app-{i}");
        let mut d = deployment("podinfo:1");
        d["metadata"]["name"] = json!(name);
        d["spec"]["selector"]["matchLabels"]["app"] = json!(name);
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!(name);
        d["spec"]["replicas"] = json!(1);
        deployments
            .create(
                &PostParams::default(),
                &serde_json::from_value(d).expect("deployment"),
            )
            .await
            .expect("create");
        let mut r = rollout(Provider::Istio, canary_analysis(2), 60);
        r["metadata"]["name"] = json!(name);
        r["spec"]["targetRef"]["name"] = json!(name);
        rollouts
            .create(
                &PostParams::default(),
                &serde_json::from_value(r).expect("rollout"),
            )
            .await
            .expect("create");
    }
    // Prometheus is never asked anything while the Rollouts are idle.
    let operator = start_operator(&cluster, "http://127.0.0.1:9", "operator.log");
    let typed: Api<Rollout> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    loop {
        let list = typed.list(&Default::default()).await.expect("list");
        let initialized = list
            .items
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(RolloutPhase::Initialized))
            .count();
        if initialized == COUNT {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {initialized}/{COUNT} initialized\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let init_time = started.elapsed();
    // Let the last initializations settle: the controllers scale the targets to 0 and report it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let versions_before = resource_versions(&client).await;
    let events_before = events_by_reporter(&client).await;
    let before = api_writes(&cluster);
    assert!(
        before.keys().any(|k| k.contains("sluice.dev/rollouts")),
        "the API server's request metric shows no write to Rollouts: is it still apiserver_request_total? {before:?}"
    );
    // Five analysis intervals: every Rollout is reconciled about five times.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = api_writes(&cluster);
    let versions_after = resource_versions(&client).await;
    let events_after = events_by_reporter(&client).await;
    // Events recorded (or repeated) in the window; the controller-manager's and the scheduler's may still
    // trickle in from the initialization (their recorders batch and rate-limit), Sluice's must not.
    let new_events: Vec<&String> = events_after
        .iter()
        .filter(|(key, _)| !events_before.contains_key(*key))
        .map(|(_, what)| what)
        .collect();
    let sluice_events: Vec<&&String> = new_events
        .iter()
        .filter(|what| what.starts_with("sluice:"))
        .collect();
    let new: std::collections::BTreeMap<&String, u64> = after
        .iter()
        .map(|(key, n)| (key, n - before.get(key).copied().unwrap_or_default()))
        .filter(|(_, n)| *n > 0)
        .collect();
    let changed: Vec<&String> = versions_after
        .iter()
        .filter(|(key, rv)| versions_before.get(*key) != Some(rv))
        .map(|(key, _)| key)
        .collect();
    println!(
        "MEASURED: {COUNT} Rollouts initialized in {} ms; writes while idle for 5s: {} (besides Events), \
         Events: {} by Sluice, {} by others",
        init_time.as_millis(),
        new.values().sum::<u64>(),
        sluice_events.len(),
        new_events.len() - sluice_events.len(),
    );
    assert!(
        sluice_events.is_empty(),
        "idle reconciles recorded Events: {sluice_events:?}"
    );
    assert_eq!(
        versions_before.len(),
        versions_after.len(),
        "objects appeared or went away while idle"
    );
    assert!(changed.is_empty(), "idle reconciles changed: {changed:?}");
    assert!(
        new.is_empty(),
        "idle reconciles wrote: {new:?}\n{}",
        operator
            .log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(operator);
    keep_logs(&cluster);
    stop_cluster(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_indefinite_pause_waits_for_the_promote_annotation_which_is_used_once() {
    let analysis = json!({
        "interval": "1s", "threshold": 2,
        "steps": [{"setWeight": 25}, {"pause": {}}, {"setWeight": 50}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "10s"}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_phase(RolloutPhase::Paused, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.rollout().await.status.and_then(|st| st.phase),
        Some(RolloutPhase::Paused),
        "waits for a human"
    );
    assert_eq!(s.weight_sequence().last(), Some(&25));
    let rollouts: Api<Rollout> = Api::namespaced(s.client.clone(), NS);
    let promote = json!({"metadata": {"annotations": {"sluice.dev/promote": "true"}}});
    rollouts
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(promote))
        .await
        .expect("annotate");
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(20))
        .await;
    let climbed: Vec<u8> = s.weight_sequence().into_iter().filter(|w| *w > 0).collect();
    assert_eq!(climbed, vec![25, 50]);
    let annotations = s.rollout().await.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("sluice.dev/promote"),
        "the annotation is consumed: {annotations:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_rollout_hands_traffic_back_to_the_target() {
    use k8s_openapi::api::core::v1::Service;
    let s = Scenario::start(Provider::Istio, canary_analysis(2), 30).await;
    assert_eq!(
        s.deployment("podinfo").await.spec.and_then(|d| d.replicas),
        Some(0),
        "target parked at 0"
    );
    let rollouts: Api<Rollout> = Api::namespaced(s.client.clone(), NS);
    rollouts
        .delete("podinfo", &Default::default())
        .await
        .expect("delete");
    let started = Instant::now();
    while rollouts.get_opt("podinfo").await.expect("get").is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the finalizer never let go\n{}",
            s.operator.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target = s.deployment("podinfo").await;
    assert_eq!(
        target.spec.and_then(|d| d.replicas),
        Some(2),
        "the target runs again, at the primary's size"
    );
    let services: Api<Service> = Api::namespaced(s.client.clone(), NS);
    let apex = services
        .get("podinfo")
        .await
        .expect("the apex Service stays");
    let selector = apex.spec.and_then(|sp| sp.selector).unwrap_or_default();
    assert_eq!(
        selector.get("app").map(String::as_str),
        Some("podinfo"),
        "apex selects the target's pods again"
    );
    for gone in ["podinfo-primary", "podinfo-canary"] {
        assert!(
            services.get_opt(gone).await.expect("get").is_none(),
            "Service {gone} removed"
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), NS);
    assert!(
        deployments
            .get_opt("podinfo-primary")
            .await
            .expect("get")
            .is_none(),
        "primary removed"
    );
    let routes: Api<DynamicObject> = Api::namespaced_with(
        s.client.clone(),
        NS,
        &router_for(Provider::Istio).api_resource(),
    );
    assert!(
        routes.get_opt("podinfo").await.expect("get").is_none(),
        "route removed"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_sluice_cannot_split_is_reported_as_invalid_spec() {
    let mut target = deployment("podinfo:1");
    target["spec"]["selector"] =
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["podinfo"]}]});
    let s = Scenario::start_with(Provider::Istio, canary_analysis(2), 30, target).await;
    let condition = s.wait_for_invalid_spec().await;
    assert!(
        condition.message.contains("matchLabels"),
        "{}",
        condition.message
    );
    // Backed off, not hot-looping: the operator does not keep rewriting the status.
    let rv = s.rollout().await.metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.rollout().await.metadata.resource_version, rv);
    // Counted once, as docs/monitoring.md says.
    let metrics = reqwest::get(format!("{}/metrics", s.operator.metrics_url))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(r#"sluice_rollout_transitions_total{reason="InvalidSpec"} 1"#),
        "{metrics}"
    );
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), NS);
    assert!(
        deployments
            .get_opt("podinfo-primary")
            .await
            .expect("get")
            .is_none(),
        "nothing was created"
    );
    s.stop().await;
}

/// Waits for the first release after the one with status.revision `previous` to end (Succeeded or Failed).
async fn next_outcome(s: &Scenario, previous: Option<String>) -> sluice::api::RolloutStatus {
    let ended = s
        .wait_for(Duration::from_secs(60), |r| {
            r.status.as_ref().is_some_and(|st| {
                st.revision != previous
                    && matches!(
                        st.phase,
                        Some(RolloutPhase::Succeeded | RolloutPhase::Failed)
                    )
            })
        })
        .await;
    ended.status.unwrap_or_default()
}

/// Each release is judged on its own traffic, although the metric windows (30 s) are far longer than the
/// analysis interval (1 s): a mildly bad release pushed right after a good one is not promoted on the good
/// one's traffic, and a fixed release pushed right after a rollback is not rolled back for the bad one's
/// errors. (The fake mesh reports the canary workload's series throughout, as a mesh keeps the previous
/// revision's samples in range.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn back_to_back_releases_are_judged_only_on_their_own_traffic() {
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "30s", "minRequests": 5},
            {"name": "request-duration", "thresholdRange": {"max": 500}, "interval": "30s"},
            // Fails at every check, and must never decide anything.
            {"name": "always-failing-probe", "query": "vector(1)", "thresholdRange": {"max": 0}, "dryRun": true}
        ]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;

    s.release("podinfo:2", json!({})).await;
    let good = next_outcome(&s, initialized).await;
    assert_eq!(good.phase, Some(RolloutPhase::Succeeded), "{good:?}");
    // The dry-run metric was reported, in an Event and in the verdicts, and did not hold anything up.
    eventually(
        "a DryRunMetricFailed Event",
        Duration::from_secs(10),
        async || {
            events_by_reporter(&s.client)
                .await
                .into_values()
                .any(|e| e.contains("DryRunMetricFailed (podinfo)"))
                .then_some(())
        },
    )
    .await;
    assert!(
        good.verdicts
            .iter()
            .any(|v| v.name == "always-failing-probe"
                && v.dry_run
                && v.verdict == sluice::api::Verdict::Fail),
        "{:?}",
        good.verdicts
    );

    // 3% errors: below the 99% floor in any window of this release alone, but diluted above it by 30 s of the
    // previous release's healthy traffic for the first 10 s.
    let mildly_bad = WorkloadTraffic {
        error_ratio: 0.03,
        ..WorkloadTraffic::healthy(50.0)
    };
    s.mesh.set("podinfo", NS, mildly_bad);
    s.release("podinfo:3", json!({})).await;
    let bad = next_outcome(&s, good.revision.clone()).await;
    assert_eq!(
        bad.phase,
        Some(RolloutPhase::Failed),
        "a bad release was promoted on the previous release's traffic: {bad:?}"
    );
    assert!(
        bad.message
            .as_deref()
            .is_some_and(|m| m.contains("request-success-rate")),
        "{bad:?}"
    );

    s.mesh.set("podinfo", NS, ERRORING);
    s.release("podinfo:4", json!({})).await;
    let broken = next_outcome(&s, bad.revision.clone()).await;
    assert_eq!(broken.phase, Some(RolloutPhase::Failed), "{broken:?}");

    // The fix, pushed right away: its windows must not reach back into podinfo:4's errors.
    s.mesh.set("podinfo", NS, WorkloadTraffic::healthy(50.0));
    s.release("podinfo:5", json!({})).await;
    let fixed = next_outcome(&s, broken.revision.clone()).await;
    assert_eq!(
        fixed.phase,
        Some(RolloutPhase::Succeeded),
        "a fixed release was judged on the rolled-back release's errors: {fixed:?}"
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:5"
    );
    s.stop().await;
}

/// A metric judged against the primary (`primaryComparison`): when both versions share a flaky dependency, a
/// canary as good as the primary is promoted although neither meets a 99% floor, and one five points worse is
/// rolled back although it stays above the absolute floor it also has. A stage's first checks read a window of a
/// second or two, so the traffic is 200 requests per second and a check waits for 150 of them (`minRequests`):
/// at 50 per second with `minRequests: 5`, one error more or less in a loaded machine's window moved the success
/// rate by points (a CI run measured 91.88 for a nominal 96.5, and rolled the good canary back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_is_judged_against_the_primary() {
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{
            "name": "request-success-rate", "interval": "10s", "minRequests": 150,
            "thresholdRange": {"min": 90}, "primaryComparison": {"minDelta": -2}
        }]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    let failing = |share: f64| WorkloadTraffic {
        error_ratio: share,
        ..WorkloadTraffic::healthy(200.0)
    };
    s.mesh.set("podinfo-primary", NS, failing(0.03));
    s.mesh.set("podinfo", NS, failing(0.035));
    s.release("podinfo:2", json!({})).await;
    let as_good = next_outcome(&s, initialized).await;
    assert_eq!(as_good.phase, Some(RolloutPhase::Succeeded), "{as_good:?}");
    let verdict = as_good
        .verdicts
        .iter()
        .find(|v| v.name == "request-success-rate")
        .cloned()
        .expect("a verdict");
    assert!(
        verdict
            .primary_value
            .is_some_and(|p| (p - 97.0).abs() < 0.5),
        "the primary's value is reported: {verdict:?}"
    );

    s.mesh.set("podinfo", NS, failing(0.08));
    s.release("podinfo:3", json!({})).await;
    let worse = next_outcome(&s, as_good.revision.clone()).await;
    assert_eq!(worse.phase, Some(RolloutPhase::Failed), "{worse:?}");
    let message = worse.message.unwrap_or_default();
    assert!(message.contains("(primary 97"), "{message}");
    s.stop().await;
}

/// What an authenticating proxy in front of Prometheus (Mimir's gateway, an ingress with auth) saw.
#[derive(Default)]
struct ProxyLog {
    served: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
}

/// Serves `app` on a free loopback port until the returned task is aborted (or the test ends).
async fn serve_on_loopback(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("bound address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Starts a proxy to `upstream` on a free loopback port that forwards only requests carrying
/// `Authorization: Bearer <token>` and `X-Scope-OrgID: <tenant>`, and answers 401 to the rest.
async fn start_auth_proxy(
    upstream: String,
    token: &'static str,
    tenant: &'static str,
    log: Arc<ProxyLog>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    use std::sync::atomic::Ordering;
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (http, upstream, log) = (http.clone(), upstream.clone(), log.clone());
        async move {
            // Owned values only: a borrow of the request (not Sync) must not live across an await.
            let (parts, body) = request.into_parts();
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let authorized = header("authorization") == Some(format!("Bearer {token}"))
                && header("x-scope-orgid").as_deref() == Some(tenant);
            if !authorized {
                log.refused.fetch_add(1, Ordering::SeqCst);
                return (
                    StatusCode::UNAUTHORIZED,
                    [(axum::http::header::CONTENT_TYPE, "text/plain".to_owned())],
                    "unauthorized".to_owned(),
                );
            }
            log.served.fetch_add(1, Ordering::SeqCst);
            let content_type = header("content-type").unwrap_or_default();
            let target = format!(
                "{upstream}{}",
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
            );
            let method = parts.method.clone();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let mut forwarded = http.request(method, target).body(body);
            if !content_type.is_empty() {
                forwarded = forwarded.header("content-type", content_type);
            }
            match forwarded.send().await {
                Ok(answer) => {
                    let status = StatusCode::from_u16(answer.status().as_u16())
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                    let kind = answer
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    (
                        status,
                        [(axum::http::header::CONTENT_TYPE, kind)],
                        answer.text().await.unwrap_or_default(),
                    )
                }
                Err(err) => (
                    StatusCode::BAD_GATEWAY,
                    [(axum::http::header::CONTENT_TYPE, "text/plain".to_owned())],
                    err.to_string(),
                ),
            }
        }
    });
    serve_on_loopback(app).await
}

/// A `MetricTemplate` sends its query to its own server with the credentials of its Secret and its tenant
/// header (a Prometheus behind an authenticating proxy), and a rotated, wrong token freezes the release with
/// a message that says what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_metric_template_queries_an_authenticating_prometheus_with_its_secret() {
    use std::sync::atomic::Ordering;
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "tenant-success-rate", "templateRef": {"name": "tenant-success"},
                     "interval": "10s", "thresholdRange": {"min": 99}}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    let log = Arc::new(ProxyLog::default());
    let (proxy, proxy_task) =
        start_auth_proxy(s.prometheus.url(), "s3cret", "tenant-a", log.clone()).await;
    let selector = r#"reporter="destination",destination_workload_namespace="{{ namespace }}",destination_workload="{{ target }}""#;
    let objects = [
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "metrics-auth", "namespace": NS},
               "stringData": {"token": "s3cret"}}),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MetricTemplate",
        "metadata": {"name": "tenant-success", "namespace": NS},
        "spec": {
            "provider": {"type": "prometheus", "address": format!("http://{proxy}"),
                         "secretRef": {"name": "metrics-auth"},
                         "headers": {"X-Scope-OrgID": "tenant-a"}},
            "query": format!(
                "sum(rate(istio_requests_total{{{selector},response_code!~\"5.*\"}}[{{{{ interval }}}}])) / sum(rate(istio_requests_total{{{selector}}}[{{{{ interval }}}}])) * 100"
            ),
        }}),
    ];
    for object in objects {
        let out = s
            .cluster
            .kubectl
            .run_with_stdin(&["apply", "-f", "-"], &object.to_string());
        assert!(out.success, "{}", out.stderr);
    }

    s.release("podinfo:2", json!({})).await;
    let promoted = next_outcome(&s, initialized).await;
    assert_eq!(
        promoted.phase,
        Some(RolloutPhase::Succeeded),
        "{promoted:?}"
    );
    assert!(
        log.served.load(Ordering::SeqCst) > 0 && log.refused.load(Ordering::SeqCst) == 0,
        "the template's server was queried, always with the token and tenant: served {}, refused {}",
        log.served.load(Ordering::SeqCst),
        log.refused.load(Ordering::SeqCst)
    );

    // A wrong token: the release freezes (an error is not a verdict) and says what to check.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(s.client.clone(), NS);
    secrets
        .patch(
            "metrics-auth",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"token": "d3Jvbmc="}})),
        )
        .await
        .expect("token rotated");
    s.release("podinfo:3", json!({})).await;
    let message = s
        .wait_for_message(
            |m| m.contains("refused Sluice's query (401)"),
            Duration::from_secs(30),
        )
        .await;
    assert!(message.contains(&format!("http://{proxy}")), "{message}");
    assert!(message.contains("secretRef"), "{message}");
    assert_eq!(
        s.rollout().await.status.and_then(|st| st.phase),
        Some(RolloutPhase::Progressing),
        "frozen, not rolled back"
    );
    assert!(log.refused.load(Ordering::SeqCst) > 0);
    // Credentials stay out of the operator's log and the Rollout's status.
    let status = serde_json::to_string(&s.rollout().await.status).unwrap_or_default();
    for secret in ["s3cret", "Bearer wrong", "d3Jvbmc="] {
        assert!(
            !s.operator.log().contains(secret),
            "{secret} in the operator log"
        );
        assert!(!status.contains(secret), "{secret} in the status");
    }
    proxy_task.abort();
    s.stop().await;
}

/// Istio ambient mode (namespace labelled `istio.io/use-waypoint`): a Rollout whose waypoint does not exist says
/// so instead of waiting; once the waypoint Gateway exists, traffic is split with an HTTPRoute on the Service
/// (no VirtualService) and judged from the waypoint's series, the only L7 telemetry there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ambient_rollout_is_shifted_on_an_httproute_and_judged_from_the_waypoint() {
    let cluster = cluster().await;
    cluster
        .kubectl
        .ok(&["label", "namespace", NS, "istio.io/use-waypoint=waypoint"]);
    let s = Scenario::launch_in(
        cluster,
        Provider::Istio,
        canary_analysis(2),
        60,
        deployment("podinfo:1"),
        Duration::from_millis(200),
    )
    .await;
    let waiting = |r: &Rollout| {
        r.status.as_ref().and_then(|st| {
            st.conditions
                .iter()
                .find(|c| c.type_ == "MeshReady" && c.reason == "WaypointMissing")
                .cloned()
        })
    };
    let reported = s
        .wait_for(Duration::from_secs(30), |r| waiting(r).is_some())
        .await;
    let condition = waiting(&reported).expect("the MeshReady condition");
    assert_eq!(condition.status, "False");
    for wanted in [
        "namespace default",
        "Gateway default/waypoint",
        "istioctl waypoint apply -n default --name waypoint",
    ] {
        assert!(
            condition.message.contains(wanted),
            "{wanted:?} not in {:?}",
            condition.message
        );
    }

    let waypoint = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": NS, "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    });
    let out = s
        .cluster
        .kubectl
        .run_with_stdin(&["apply", "-f", "-"], &waypoint.to_string());
    assert!(out.success, "{}", out.stderr);
    s.wait_for_phase(RolloutPhase::Initialized, Duration::from_secs(90))
        .await;

    // Sidecar-less from here: only the waypoint reports the canary's and the primary's requests.
    for workload in ["podinfo", "podinfo-primary"] {
        s.mesh.set_ambient(workload, NS, true);
    }
    let weights: WeightLog = Arc::default();
    let recorder = tokio::spawn(record_weights(
        s.client.clone(),
        Provider::GatewayApi,
        weights.clone(),
    ));
    s.release("podinfo:2", json!({})).await;
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(60))
        .await;
    recorder.abort();
    let seen: Vec<u8> = weights
        .lock()
        .map(|w| w.iter().map(|(_, w)| *w).filter(|w| *w > 0).collect())
        .unwrap_or_default();
    assert_eq!(seen, vec![20, 40, 60], "every step on the HTTPRoute");
    let virtual_services: Api<DynamicObject> = Api::namespaced_with(
        s.client.clone(),
        NS,
        &router_for(Provider::Istio).api_resource(),
    );
    assert!(
        virtual_services
            .get_opt("podinfo")
            .await
            .expect("VirtualServices readable")
            .is_none(),
        "no VirtualService in ambient mode"
    );
    let ready = s.rollout().await.status.unwrap_or_default();
    assert!(
        ready
            .conditions
            .iter()
            .any(|c| c.type_ == "MeshReady" && c.status == "True"),
        "{:?}",
        ready.conditions
    );

    // Leaving ambient mode: the split moves to a VirtualService and the HTTPRoute goes, rather than both
    // routing at once.
    s.cluster
        .kubectl
        .ok(&["label", "namespace", NS, "istio.io/use-waypoint-"]);
    let http_routes: Api<DynamicObject> = Api::namespaced_with(
        s.client.clone(),
        NS,
        &router_for(Provider::GatewayApi).api_resource(),
    );
    eventually(
        "the VirtualService instead of the HTTPRoute",
        Duration::from_secs(90),
        async || {
            let virtual_service = virtual_services.get_opt("podinfo").await.ok()??;
            let gone = http_routes.get_opt("podinfo").await.ok()?.is_none();
            gone.then_some(virtual_service)
        },
    )
    .await;
    s.stop().await;
}

/// What the stand-in Datadog answers, and the windows (`to - from`, seconds) and queries it was asked.
#[derive(Default)]
struct FakeDatadog {
    value: Mutex<f64>,
    asked: Mutex<Vec<(i64, String)>>,
}

/// Datadog's query API as its documentation describes it (`GET /api/v1/query` with `from`, `to` and `query`,
/// keys in `DD-API-KEY` and `DD-APPLICATION-KEY`, `{"series": [{"pointlist": [[ms, value]]}]}`), played on a
/// free loopback port: there is no Datadog on this machine.
async fn start_fake_datadog(state: Arc<FakeDatadog>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    async fn query(
        State(state): State<Arc<FakeDatadog>>,
        headers: HeaderMap,
        Query(params): Query<std::collections::HashMap<String, String>>,
    ) -> (StatusCode, axum::Json<Value>) {
        let key = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        if key("dd-api-key") != "api-123" || key("dd-application-key") != "app-456" {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(json!({"errors": ["Forbidden"]})),
            );
        }
        let number = |name: &str| params.get(name).and_then(|v| v.parse::<i64>().ok());
        let (Some(from), Some(to), Some(q)) = (number("from"), number("to"), params.get("query"))
        else {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"errors": ["from, to and query are required"]})),
            );
        };
        if let Ok(mut asked) = state.asked.lock() {
            asked.push((to - from, q.clone()));
        }
        let value = state.value.lock().map(|v| *v).unwrap_or(f64::NAN);
        (
            StatusCode::OK,
            axum::Json(
                json!({"status": "ok", "query": q, "from_date": from * 1000, "to_date": to * 1000,
                              "series": [{"metric": "errors", "pointlist": [[(to - 10) * 1000, 0.0], [to * 1000, value]]}]}),
            ),
        )
    }
    let app = axum::Router::new()
        .route("/api/v1/query", axum::routing::get(query))
        .with_state(state);
    serve_on_loopback(app).await
}

/// A Datadog MetricTemplate (against Datadog's documented API shapes, on a loopback stand-in): its keys come
/// from the Secret, its window is the metric's cut to the stage (`to - from`), a low error rate is promoted and a
/// high one rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_datadog_metric_template_judges_releases() {
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "dd-errors", "templateRef": {"name": "dd-errors"}, "interval": "30s",
                     "thresholdRange": {"max": 1}}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    let datadog = Arc::new(FakeDatadog::default());
    let (addr, task) = start_fake_datadog(datadog.clone()).await;
    let objects = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dd-keys", "namespace": NS},
               "stringData": {"datadog_api_key": "api-123", "datadog_application_key": "app-456"}}),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MetricTemplate",
               "metadata": {"name": "dd-errors", "namespace": NS},
               "spec": {"provider": {"type": "datadog", "address": format!("http://{addr}"),
                                     "secretRef": {"name": "dd-keys"}},
                        "query": "sum:trace.http.request.errors{service:{{ target }}}.as_rate()"}}),
    ];
    for object in objects {
        let out = s
            .cluster
            .kubectl
            .run_with_stdin(&["apply", "-f", "-"], &object.to_string());
        assert!(out.success, "{}", out.stderr);
    }
    if let Ok(mut value) = datadog.value.lock() {
        *value = 0.2;
    }
    s.release("podinfo:2", json!({})).await;
    let good = next_outcome(&s, initialized).await;
    assert_eq!(good.phase, Some(RolloutPhase::Succeeded), "{good:?}");
    let asked = datadog.asked.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(!asked.is_empty());
    for (window, query) in &asked {
        assert_eq!(
            query,
            "sum:trace.http.request.errors{service:podinfo}.as_rate()"
        );
        assert!((1..=30).contains(window), "window {window}s");
    }
    assert!(
        asked.iter().any(|(window, _)| *window < 30),
        "the first checks of a stage ask for less than the metric's 30 s: {asked:?}"
    );

    if let Ok(mut value) = datadog.value.lock() {
        *value = 5.0;
    }
    s.release("podinfo:3", json!({})).await;
    let bad = next_outcome(&s, good.revision.clone()).await;
    assert_eq!(bad.phase, Some(RolloutPhase::Failed), "{bad:?}");
    let message = bad.message.unwrap_or_default();
    assert!(message.contains("dd-errors 5.00"), "{message}");
    task.abort();
    s.stop().await;
}

/// A Graphite MetricTemplate on a real graphite-web: a release with 0.2% errors is promoted, one with 5% rolled
/// back with the value in its message. A writer puts each second's errors and requests into whisper files, as
/// carbon would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graphite_metric_template_judges_releases() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "graphite-errors", "templateRef": {"name": "graphite-errors"},
                     "interval": "30s", "thresholdRange": {"max": 1}}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    let graphite = Arc::new(
        sluice_e2e::graphite::GraphiteServer::start()
            .await
            .expect("graphite-web starts"),
    );
    // Errors per 100 requests, in hundredths.
    let errors = Arc::new(AtomicU64::new(20));
    let writer = {
        let (graphite, errors) = (graphite.clone(), errors.clone());
        tokio::spawn(async move {
            loop {
                let (graphite, errors) = (graphite.clone(), errors.load(Ordering::Relaxed));
                let _ = tokio::task::spawn_blocking(move || {
                    let now = jiff::Timestamp::now().as_second();
                    let seconds = [now - 1, now];
                    graphite.write(
                        "mesh.default.podinfo.requests",
                        &seconds.map(|at| (at, 100.0)),
                    )?;
                    graphite.write(
                        "mesh.default.podinfo.errors",
                        &seconds.map(|at| (at, errors as f64 / 100.0)),
                    )
                })
                .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let template = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MetricTemplate",
        "metadata": {"name": "graphite-errors", "namespace": NS},
        "spec": {"provider": {"type": "graphite", "address": graphite.url()},
                 "query": "target=asPercent(sumSeries(mesh.{{ namespace }}.{{ target }}.errors), sumSeries(mesh.{{ namespace }}.{{ target }}.requests))&from=-1h"}});
    let out = s
        .cluster
        .kubectl
        .run_with_stdin(&["apply", "-f", "-"], &template.to_string());
    assert!(out.success, "{}", out.stderr);

    s.release("podinfo:2", json!({})).await;
    let good = next_outcome(&s, initialized).await;
    assert_eq!(good.phase, Some(RolloutPhase::Succeeded), "{good:?}");

    errors.store(500, Ordering::Relaxed);
    s.release("podinfo:3", json!({})).await;
    let bad = next_outcome(&s, good.revision.clone()).await;
    assert_eq!(bad.phase, Some(RolloutPhase::Failed), "{bad:?}");
    let message = bad.message.unwrap_or_default();
    assert!(message.contains("graphite-errors 5.00"), "{message}");
    writer.abort();
    s.stop().await;
}

/// An InfluxDB MetricTemplate on a real influxd (InfluxQL, basic auth from the Secret): a release with 0.2% errors
/// is promoted, one with 5% rolled back. A writer sends each second's counts, as Telegraf would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_influxdb_metric_template_judges_releases() {
    use sluice_e2e::influxdb::{ADMIN, InfluxServer};
    use std::sync::atomic::{AtomicU32, Ordering};
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "influx-errors", "templateRef": {"name": "influx-errors"},
                     "interval": "30s", "thresholdRange": {"max": 1}}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    let influx = Arc::new(InfluxServer::start("mesh").await.expect("influxd starts"));
    // Failed requests out of 1000 a second.
    let errors = Arc::new(AtomicU32::new(2));
    let writer = {
        let (influx, errors) = (influx.clone(), errors.clone());
        tokio::spawn(async move {
            loop {
                let now = jiff::Timestamp::now().as_second();
                let line = format!(
                    "requests,namespace=default,workload=podinfo total=1000,errors={} {now}\n",
                    errors.load(Ordering::Relaxed)
                );
                let _ = influx.write("mesh", &line).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let objects = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "influx", "namespace": NS},
               "stringData": {"username": ADMIN.0, "password": ADMIN.1}}),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MetricTemplate",
               "metadata": {"name": "influx-errors", "namespace": NS},
               "spec": {"provider": {"type": "influxdb", "address": influx.url(), "secretRef": {"name": "influx"}},
                        "query": "SELECT sum(\"errors\") / sum(\"total\") * 100 FROM \"mesh\"..\"requests\" WHERE \"namespace\" = '{{ namespace }}' AND \"workload\" = '{{ target }}' AND time > now() - {{ interval }}"}}),
    ];
    for object in objects {
        let out = s
            .cluster
            .kubectl
            .run_with_stdin(&["apply", "-f", "-"], &object.to_string());
        assert!(out.success, "{}", out.stderr);
    }
    s.release("podinfo:2", json!({})).await;
    let good = next_outcome(&s, initialized).await;
    assert_eq!(good.phase, Some(RolloutPhase::Succeeded), "{good:?}");

    errors.store(50, Ordering::Relaxed);
    s.release("podinfo:3", json!({})).await;
    let bad = next_outcome(&s, good.revision.clone()).await;
    assert_eq!(bad.phase, Some(RolloutPhase::Failed), "{bad:?}");
    let message = bad.message.unwrap_or_default();
    assert!(message.contains("influx-errors 5.00"), "{message}");
    writer.abort();
    s.stop().await;
}

/// A New Relic MetricTemplate (against NerdGraph's documented shapes, on a loopback stand-in): the account and
/// user key come from the Secret, a low error percentage is promoted and a high one rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_relic_metric_template_judges_releases() {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::{AtomicU64, Ordering};
    let analysis = json!({
        "interval": "1s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "nr-errors", "templateRef": {"name": "nr-errors"}, "interval": "30s",
                     "thresholdRange": {"max": 1}}]
    });
    let s = Scenario::start(Provider::Istio, analysis, 60).await;
    let initialized = s.rollout().await.status.unwrap_or_default().revision;
    // The error percentage New Relic reports, in hundredths.
    let percentage = Arc::new(AtomicU64::new(20));
    async fn nerdgraph(
        State(percentage): State<Arc<AtomicU64>>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, axum::Json<Value>) {
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let key = headers.get("api-key").and_then(|v| v.to_str().ok());
        if key != Some("NRAK-123") || body["variables"]["account"] != 42 {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"errors": [{"message": "Invalid API key"}]})),
            );
        }
        let value = percentage.load(Ordering::Relaxed) as f64 / 100.0;
        (
            StatusCode::OK,
            axum::Json(
                json!({"data": {"actor": {"account": {"nrql": {"results": [{"percentage": value}]}}}}}),
            ),
        )
    }
    let app = axum::Router::new()
        .route("/graphql", axum::routing::post(nerdgraph))
        .with_state(percentage.clone());
    let (addr, task) = serve_on_loopback(app).await;
    let objects = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "newrelic", "namespace": NS},
               "stringData": {"newrelic_account_id": "42", "newrelic_api_key": "NRAK-123"}}),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MetricTemplate",
               "metadata": {"name": "nr-errors", "namespace": NS},
               "spec": {"provider": {"type": "newrelic", "address": format!("http://{addr}/graphql"),
                                     "secretRef": {"name": "newrelic"}},
                        "query": "SELECT percentage(count(*), WHERE error IS true) FROM Transaction WHERE appName = '{{ target }}'"}}),
    ];
    for object in objects {
        let out = s
            .cluster
            .kubectl
            .run_with_stdin(&["apply", "-f", "-"], &object.to_string());
        assert!(out.success, "{}", out.stderr);
    }
    s.release("podinfo:2", json!({})).await;
    let good = next_outcome(&s, initialized).await;
    assert_eq!(good.phase, Some(RolloutPhase::Succeeded), "{good:?}");

    percentage.store(500, Ordering::Relaxed);
    s.release("podinfo:3", json!({})).await;
    let bad = next_outcome(&s, good.revision.clone()).await;
    assert_eq!(bad.phase, Some(RolloutPhase::Failed), "{bad:?}");
    let message = bad.message.unwrap_or_default();
    assert!(message.contains("nr-errors 5.00"), "{message}");
    task.abort();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_mesh_crd_is_reported_then_picked_up_once_installed() {
    let cluster = cluster().await;
    let crd = "virtualservices.networking.istio.io";
    let saved: Value =
        serde_json::from_str(&cluster.kubectl.ok(&["get", "crd", crd, "-o", "json"]))
            .expect("the CRD as JSON");
    cluster.kubectl.ok(&["delete", "crd", crd, "--wait=true"]);
    let s = Scenario::launch_in(
        cluster,
        Provider::Istio,
        canary_analysis(2),
        30,
        deployment("podinfo:1"),
        Duration::from_millis(200),
    )
    .await;

    // Said in a condition and the status message, not only in the log.
    let missing = |r: &Rollout| {
        r.status.as_ref().and_then(|st| {
            st.conditions
                .iter()
                .find(|c| c.type_ == "MeshReady" && c.status == "False")
                .cloned()
        })
    };
    let reported = s
        .wait_for(Duration::from_secs(30), |r| missing(r).is_some())
        .await;
    let condition = missing(&reported).expect("the MeshReady condition");
    for wanted in [
        "VirtualService",
        "networking.istio.io/v1",
        "spec.provider istio",
        "istioctl install",
    ] {
        assert!(
            condition.message.contains(wanted),
            "{wanted:?} not in {:?}",
            condition.message
        );
    }
    assert_eq!(condition.reason, "RouteAPIMissing");
    let status = reported.status.unwrap_or_default();
    assert_eq!(status.message.as_deref(), Some(condition.message.as_str()));
    assert_eq!(
        status.phase, None,
        "nothing was initialized without a route"
    );
    // And in a Warning Event on the Rollout.
    eventually(
        "a RouteAPIMissing Event on the Rollout",
        Duration::from_secs(10),
        async || {
            events_by_reporter(&s.client)
                .await
                .into_values()
                .any(|e| e.contains("RouteAPIMissing (podinfo)"))
                .then_some(())
        },
    )
    .await;
    // Backed off, not hot-looping: the status is written once.
    let rv = s.rollout().await.metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.rollout().await.metadata.resource_version, rv);

    // Installing the CRD is enough: the operator retries on its own and initializes.
    let crd_object = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": crd}, "spec": saved["spec"],
    });
    let out = s.cluster.kubectl.run_with_stdin(
        &["apply", "--server-side", "-f", "-"],
        &crd_object.to_string(),
    );
    assert!(out.success, "{}", out.stderr);
    s.cluster.kubectl.ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        crd,
        "--timeout=30s",
    ]);
    s.wait_for_phase(RolloutPhase::Initialized, Duration::from_secs(90))
        .await;
    let ready = s.rollout().await.status.unwrap_or_default();
    assert!(
        ready
            .conditions
            .iter()
            .any(|c| c.type_ == "MeshReady" && c.status == "True"),
        "{:?}",
        ready.conditions
    );
    assert_eq!(s.route().await["kind"], "VirtualService");
    s.stop().await;
}

/// A webhook receiver that refuses the first `failures` requests (or all, while `down`), and records what it
/// accepted.
#[derive(Default)]
struct Receiver {
    failures: usize,
    down: bool,
    attempts: usize,
    accepted: Vec<(String, Value, Option<String>, Vec<u8>)>,
}

type SharedReceiver = Arc<Mutex<Receiver>>;

async fn start_receiver(receiver: SharedReceiver) -> SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    async fn hook(
        axum::extract::State(state): axum::extract::State<SharedReceiver>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let Ok(mut r) = state.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR;
        };
        r.attempts += 1;
        if r.down || r.failures > 0 {
            r.failures = r.failures.saturating_sub(1);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let id = headers
            .get("x-sluice-delivery")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let signature = headers
            .get("x-sluice-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        r.accepted.push((id, json, signature, body.to_vec()));
        StatusCode::OK
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(receiver);
    serve_on_loopback(app).await.0
}

const HMAC_KEY: &str = "s3cr3t";

async fn install_providers(s: &Scenario, alertmanager: Option<&str>, hook: SocketAddr) {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    let secret = json!({"metadata": {"name": "hook"},
        "stringData": {"address": format!("http://{hook}/hook"), "hmacKey": HMAC_KEY}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).expect("secret"),
        )
        .await
        .expect("secret");
    let providers: Api<sluice::api::AlertProvider> = Api::namespaced(s.client.clone(), NS);
    let hook_provider = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "AlertProvider",
        "metadata": {"name": "hook"}, "spec": {"type": "webhook", "secretRef": {"name": "hook"}}});
    providers
        .create(
            &PostParams::default(),
            &serde_json::from_value(hook_provider).expect("p"),
        )
        .await
        .expect("p");
    if let Some(url) = alertmanager {
        let am = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "AlertProvider",
            "metadata": {"name": "alertmanager"}, "spec": {"type": "alertmanager", "address": url}});
        providers
            .create(
                &PostParams::default(),
                &serde_json::from_value(am).expect("p"),
            )
            .await
            .expect("p");
    }
}

fn alerting_analysis() -> Value {
    let mut analysis = canary_analysis(1);
    analysis["alerts"] = json!([
        {"name": "pager", "severity": "error", "providerRef": {"name": "alertmanager"}},
        {"name": "hook", "severity": "info", "providerRef": {"name": "hook"}}
    ]);
    analysis
}

fn accepted_reasons(receiver: &SharedReceiver) -> Vec<(String, String)> {
    receiver
        .lock()
        .map(|r| {
            r.accepted
                .iter()
                .map(|(id, body, _, _)| {
                    (
                        id.clone(),
                        body["reason"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The webhook's accepted deliveries (id, reason) once one has `reason`; each id must be there once.
async fn deliveries_until(receiver: &SharedReceiver, reason: &str) -> Vec<(String, String)> {
    let reasons = eventually(
        &format!("a {reason} delivery"),
        Duration::from_secs(20),
        async || {
            let reasons = accepted_reasons(receiver);
            reasons.iter().any(|(_, r)| r == reason).then_some(reasons)
        },
    )
    .await;
    let ids: std::collections::BTreeSet<&String> = reasons.iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids.len(),
        reasons.len(),
        "a notification was delivered twice: {reasons:?}"
    );
    reasons
}

async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_alert_reaches_alertmanager_and_a_later_success_resolves_it() {
    let s = Scenario::start(Provider::Istio, alerting_analysis(), 30).await;
    let alertmanager = sluice_e2e::alertmanager::AlertmanagerServer::start()
        .await
        .expect("alertmanager");
    let receiver: SharedReceiver = Arc::new(Mutex::new(Receiver {
        failures: 2,
        ..Receiver::default()
    }));
    let hook = start_receiver(receiver.clone()).await;
    install_providers(&s, Some(&alertmanager.url()), hook).await;

    s.mesh.set("podinfo", NS, ERRORING);
    s.release("podinfo:bad", json!({})).await;
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(30))
        .await;
    let failed_revision = s
        .rollout()
        .await
        .status
        .and_then(|st| st.revision)
        .unwrap_or_default();

    let alert = eventually(
        "the rollback alert in Alertmanager",
        Duration::from_secs(20),
        async || {
            let alerts = alertmanager.alerts().await.ok()?;
            alerts
                .into_iter()
                .find(|a| a["labels"]["rollout"] == "podinfo" && a["status"]["state"] == "active")
        },
    )
    .await;
    assert_eq!(alert["labels"]["alertname"], "SluiceRolloutRolledBack");
    assert_eq!(alert["labels"]["namespace"], NS);
    assert_eq!(alert["labels"]["severity"], "error");
    assert_eq!(alert["labels"]["revision"], json!(failed_revision));
    assert!(
        alert["annotations"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("request-success-rate"),
        "{alert}"
    );

    // The webhook refused twice, then accepted each notification exactly once, signed.
    let reasons = deliveries_until(&receiver, "RolledBack").await;
    let names: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        names.contains(&"ReleaseStarted") && names.contains(&"RolledBack"),
        "{names:?}"
    );
    let attempts = receiver.lock().map(|r| r.attempts).unwrap_or_default();
    assert!(
        attempts >= reasons.len() + 2,
        "the two refusals were retried"
    );
    if let Ok(r) = receiver.lock() {
        for (_, _, signature, body) in &r.accepted {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
            let tag = ring::hmac::sign(&key, body);
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(signature.as_deref(), Some(format!("sha256={hex}").as_str()));
        }
    }

    // A successful release resolves the alert.
    s.mesh.set("podinfo", NS, WorkloadTraffic::healthy(50.0));
    // Wait until the errors have left the 10s query window, or the next release would judge them too.
    let query = r#"sum(rate(istio_requests_total{reporter="destination",destination_workload="podinfo",response_code=~"5.*"}[10s]))"#;
    eventually(
        "the errors to age out of the query window",
        Duration::from_secs(30),
        async || {
            let answer = s.prometheus.query(query).await.ok()?;
            let errors = answer
                .pointer("/result/0/value/1")
                .and_then(Value::as_str)
                .and_then(|v| v.parse::<f64>().ok());
            errors.is_none_or(|e| e == 0.0).then_some(())
        },
    )
    .await;
    s.release("podinfo:good", json!({})).await;
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    eventually(
        "the alert to be resolved",
        Duration::from_secs(20),
        async || {
            let alerts = alertmanager.alerts().await.ok()?;
            (!alerts
                .iter()
                .any(|a| a["labels"]["rollout"] == "podinfo" && a["status"]["state"] == "active"))
            .then_some(())
        },
    )
    .await;
    assert!(
        s.rollout()
            .await
            .status
            .and_then(|st| st.firing_alert)
            .is_none()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_restart_before_delivery_still_delivers_exactly_once() {
    let mut analysis = canary_analysis(1);
    analysis["alerts"] =
        json!([{"name": "hook", "severity": "info", "providerRef": {"name": "hook"}}]);
    let mut s = Scenario::start(Provider::Istio, analysis, 30).await;
    let receiver: SharedReceiver = Arc::new(Mutex::new(Receiver {
        down: true,
        ..Receiver::default()
    }));
    let hook = start_receiver(receiver.clone()).await;
    install_providers(&s, None, hook).await;
    s.mesh.set("podinfo", NS, ERRORING);
    s.release("podinfo:bad", json!({})).await;
    s.wait_for_phase(RolloutPhase::Failed, Duration::from_secs(30))
        .await;
    // The sink is down: the rollback waits in the outbox, in status.
    eventually(
        "a refused delivery attempt",
        Duration::from_secs(10),
        async || (receiver.lock().map(|r| r.attempts).unwrap_or_default() > 0).then_some(()),
    )
    .await;
    let pending = s
        .rollout()
        .await
        .status
        .map(|st| st.notifications)
        .unwrap_or_default();
    assert!(
        pending.iter().any(|n| n.reason == "RolledBack"),
        "rollback not in the outbox: {pending:?}"
    );
    s.operator.kill();
    if let Ok(mut r) = receiver.lock() {
        r.down = false;
    }
    s.restart_operator("operator-2.log");
    eventually(
        "the rollback delivered after the restart",
        Duration::from_secs(30),
        async || {
            accepted_reasons(&receiver)
                .iter()
                .any(|(_, r)| r == "RolledBack")
                .then_some(())
        },
    )
    .await;
    eventually("an empty outbox", Duration::from_secs(20), async || {
        s.rollout()
            .await
            .status
            .is_some_and(|st| st.notifications.is_empty())
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rolled_back = accepted_reasons(&receiver)
        .into_iter()
        .filter(|(_, r)| r == "RolledBack")
        .count();
    assert_eq!(
        rolled_back, 1,
        "exactly one rollback notification across the restart"
    );
    s.stop().await;
}

fn checked_analysis(extra: Value) -> Value {
    let mut analysis = json!({
        "interval": "1s", "threshold": 2,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "10s", "minRequests": 5},
            {"name": "request-duration", "thresholdRange": {"max": 500}, "interval": "10s"}
        ]
    });
    if let (Some(analysis), Some(extra)) = (analysis.as_object_mut(), extra.as_object()) {
        analysis.extend(extra.clone());
    }
    analysis
}

/// Blue-green with mirroring on Istio: the new version is judged on mirrored copies while every user request
/// stays on the primary, then all traffic switches to it at once, and back to the primary once it runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blue_green_mirrors_while_judged_then_switches_everything_at_once() {
    let analysis = checked_analysis(json!({"iterations": 3, "mirror": true, "mirrorWeight": 50}));
    let s = Scenario::start(Provider::Istio, analysis, 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_message(
        |m| m == "analysing the canary on a mirrored copy of 50% of the requests (blue-green)",
        Duration::from_secs(20),
    )
    .await;
    // The route is written before the status: the mirror is on, the canary gets no user request.
    let route = s.route().await;
    let weighted = &route["spec"]["http"][0];
    assert_eq!(weighted["name"], "canary");
    assert_eq!(weighted["mirror"]["host"], "podinfo-canary", "{route}");
    assert_eq!(weighted["mirrorPercentage"]["value"], 50.0);
    assert_eq!(weighted["route"][1]["weight"], 0);
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    s.wait_for_route_weight(0, Duration::from_secs(10)).await;
    let climbed: Vec<u8> = s
        .weight_sequence()
        .into_iter()
        .skip_while(|w| *w == 0)
        .collect();
    assert_eq!(
        climbed,
        vec![100, 0],
        "nothing while judged, everything at once for the promotion, then back to the primary"
    );
    let route = s.route().await;
    assert_eq!(route["spec"]["http"][0].get("mirror"), None, "{route}");
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:2"
    );
    assert_eq!(
        s.deployment("podinfo").await.spec.and_then(|s| s.replicas),
        Some(0)
    );
    s.stop().await;
}

/// A/B testing on Gateway API: requests with the header or the cookie go to the canary through a match rule
/// on the HTTPRoute, the rest stay on the primary; the rule goes away with the promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ab_test_routes_matching_requests_on_the_httproute_then_promotes() {
    let analysis = checked_analysis(json!({
        "iterations": 3,
        "match": [
            {"headers": {"x-canary": {"exact": "insider"}}},
            {"cookie": {"name": "canary", "value": "always"}}
        ]
    }));
    let s = Scenario::start(Provider::GatewayApi, analysis, 30).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_message(|m| m.contains("(A/B test)"), Duration::from_secs(20))
        .await;
    let route = s.route().await;
    let rules = route["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(rules.len(), 2, "{route}");
    assert_eq!(
        rules[0]["matches"][0]["headers"],
        json!([{"type": "Exact", "name": "x-canary", "value": "insider"}])
    );
    assert_eq!(rules[0]["matches"][1]["headers"][0]["name"], "Cookie");
    assert_eq!(
        rules[0]["matches"][1]["headers"][0]["value"],
        sluice::traffic::cookie_regex("canary", "always")
    );
    assert_eq!(rules[0]["backendRefs"][1]["name"], "podinfo-canary");
    assert_eq!(rules[0]["backendRefs"][1]["weight"], 100);
    assert_eq!(
        rules[1]["backendRefs"][0]["weight"], 100,
        "everyone else stays on the primary"
    );
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    let route = s.route().await;
    assert_eq!(
        route["spec"]["rules"].as_array().map(Vec::len),
        Some(1),
        "{route}"
    );
    assert!(
        s.weight_sequence().iter().all(|w| *w == 0),
        "the weighted split never moved: {:?}",
        s.weight_sequence()
    );
    assert_eq!(
        image_of(&s.deployment("podinfo-primary").await),
        "podinfo:2"
    );
    s.stop().await;
}

/// What the webhook receiver got, by path.
type HookLog = Arc<Mutex<Vec<(String, Value)>>>;

/// Webhooks on loopback: `/confirm` answers 403 until `open` is set, `/load` and `/events` always 200.
async fn start_hooks(open: Arc<std::sync::atomic::AtomicBool>, log: HookLog) -> SocketAddr {
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/{hook}",
        axum::routing::post(
            move |axum::extract::Path(hook): axum::extract::Path<String>,
                  axum::Json(body): axum::Json<Value>| {
                let open = open.clone();
                let log = log.clone();
                async move {
                    if let Ok(mut log) = log.lock() {
                        log.push((hook.clone(), body));
                    }
                    if hook == "confirm" && !open.load(std::sync::atomic::Ordering::SeqCst) {
                        (StatusCode::FORBIDDEN, "waiting for QA sign-off")
                    } else {
                        (StatusCode::OK, "ok")
                    }
                }
            },
        ),
    );
    serve_on_loopback(app).await.0
}

/// A confirm-promotion webhook holds the release at its last step (outside the progress deadline) until it
/// answers 2xx; rollout hooks run with every check and event hooks hear every transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confirm_promotion_webhook_holds_until_it_says_yes() {
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: HookLog = Arc::default();
    let addr = start_hooks(open.clone(), log.clone()).await;
    let mut analysis = canary_analysis(2);
    analysis["webhooks"] = json!([
        {"name": "qa", "type": "confirm-promotion", "url": format!("http://{addr}/confirm"), "timeout": "2s"},
        {"name": "load", "url": format!("http://{addr}/load"), "metadata": {"cmd": "hey -z 1m http://podinfo-canary:9898/"}},
        {"name": "audit", "type": "event", "url": format!("http://{addr}/events")}
    ]);
    // A 6s deadline: the hold below outlasts it, and must not count against it.
    let s = Scenario::start(Provider::Istio, analysis, 6).await;
    s.release("podinfo:2", json!({})).await;
    s.wait_for_message(
        |m| m == "held at 60% by webhook qa: HTTP 403: waiting for QA sign-off",
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rollout = s.rollout().await;
    let status = rollout.status.clone().unwrap_or_default();
    assert_eq!(
        status.phase,
        Some(RolloutPhase::Progressing),
        "{:?}",
        status.message
    );
    assert_eq!(s.weight_sequence().iter().max(), Some(&60));
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(30))
        .await;
    let revision = s.rollout().await.status.and_then(|st| st.revision);
    let events = eventually(
        "the Promoted event hook",
        Duration::from_secs(10),
        async || {
            let log = log.lock().map(|l| l.clone()).unwrap_or_default();
            let promoted = log.iter().any(|(hook, body)| {
                hook == "events" && body["metadata"]["eventReason"] == "Promoted"
            });
            promoted.then_some(log)
        },
    )
    .await;
    let confirm = events
        .iter()
        .find(|(hook, _)| hook == "confirm")
        .map(|(_, body)| body.clone())
        .expect("confirm-promotion was called");
    assert_eq!(confirm["name"], "podinfo");
    assert_eq!(confirm["namespace"], NS);
    assert_eq!(confirm["type"], "confirm-promotion");
    assert_eq!(confirm["checksum"].as_str(), revision.as_deref());
    assert_eq!(confirm["sluice"]["canaryWeight"], 60);
    let load = events
        .iter()
        .filter(|(hook, _)| hook == "load")
        .collect::<Vec<_>>();
    assert!(load.len() >= 3, "one rollout hook call per check: {load:?}");
    assert_eq!(
        load[0].1["metadata"]["cmd"],
        "hey -z 1m http://podinfo-canary:9898/"
    );
    let reasons: Vec<String> = events
        .iter()
        .filter(|(hook, _)| hook == "events")
        .filter_map(|(_, body)| body["metadata"]["eventReason"].as_str().map(str::to_owned))
        .collect();
    for reason in [
        "ReleaseStarted",
        "PromotionDenied",
        "PromotionAllowed",
        "Promoted",
    ] {
        assert!(reasons.iter().any(|r| r == reason), "{reason}: {reasons:?}");
    }
    s.stop().await;
}

fn statefulset(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {
            "replicas": 2,
            "serviceName": "podinfo-headless",
            "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {"metadata": {"labels": {"app": "podinfo"}},
                         "spec": {"containers": [{"name": "podinfo", "image": image, "ports": [{"containerPort": 9898}]}]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
            }]
        }
    })
}

/// The canary flow for a StatefulSet target: a primary StatefulSet clone with its own volumes, the target
/// scaled up as the canary and back to 0 after the promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statefulset_canary_is_promoted_through_its_primary_clone() {
    let s = Scenario::start_with(
        Provider::Istio,
        canary_analysis(2),
        30,
        statefulset("podinfo:1"),
    )
    .await;
    s.wait_for_phase(RolloutPhase::Initialized, Duration::from_secs(20))
        .await;
    let sets = workloads(&s.client, "StatefulSet");
    let primary = sets.get("podinfo-primary").await.expect("primary clone");
    assert_eq!(primary.data["spec"]["serviceName"], "podinfo-headless");
    assert_eq!(
        primary.data["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert_eq!(
        primary.data["spec"]["selector"]["matchLabels"],
        json!({"app": "podinfo-primary"})
    );
    s.release("podinfo:2", json!({})).await;
    s.wait_for_phase(RolloutPhase::Succeeded, Duration::from_secs(40))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let weights = s.weight_sequence();
    let climbed: Vec<u8> = weights.iter().copied().filter(|w| *w > 0).collect();
    assert_eq!(climbed, vec![20, 40, 60], "{weights:?}");
    assert_eq!(weights.last(), Some(&0));
    let primary = sets.get("podinfo-primary").await.expect("primary");
    assert_eq!(
        primary.data["spec"]["template"]["spec"]["containers"][0]["image"],
        "podinfo:2"
    );
    let canary = sets.get("podinfo").await.expect("target");
    assert_eq!(canary.data["spec"]["replicas"], 0, "canary scaled to 0");
    s.stop().await;
}

/// Linkerd rejects RequestMirror filters: asking for mirroring there is reported in status, not silently
/// dropped, and nothing is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirroring_on_linkerd_is_reported_as_invalid_spec() {
    let analysis = checked_analysis(json!({"iterations": 2, "mirror": true}));
    let s = Scenario::start_with(Provider::Linkerd, analysis, 30, deployment("podinfo:1")).await;
    let condition = s.wait_for_invalid_spec().await;
    assert!(
        condition
            .message
            .contains("Linkerd rejects HTTPRoute RequestMirror filters"),
        "{}",
        condition.message
    );
    let router = router_for(Provider::Linkerd);
    let routes: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), NS, &router.api_resource());
    assert!(
        routes.get_opt("podinfo").await.expect("get").is_none(),
        "no route was written"
    );
    s.stop().await;
}
