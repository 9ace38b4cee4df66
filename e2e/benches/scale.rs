//! N Rollouts on one operator, and N Flagger Canaries on the same control plane in the same run.
//!
//! `cargo xtask bench scale --rollouts N` (builds the control plane and Flagger first), or
//! `cargo bench -p sluice-e2e --bench scale -- --rollouts N [--no-flagger] [--idle-secs S]`.
//!
//! One real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes whose
//! pods become ready at once) holds 2N Deployments (one replica each): N in `sluice-bench`, N in
//! `flagger-bench`. Then, one operator at a time (so neither takes the other's CPU):
//! 1. N Rollouts (or Canaries) are created, Istio provider, while the operator is stopped;
//! 2. the operator starts (a release build of `sluice operator`, or Flagger's pinned release), and the time
//!    until all N report `Initialized` is measured;
//! 3. its RSS (peak over the run and settled), CPU seconds, and its API requests by verb — counted from the
//!    API server's own audit log for the operator's ServiceAccount — are read; then, with nothing to do, the
//!    requests it makes during an idle window;
//! 4. one target's template is changed and the time until its VirtualService gives the canary traffic is
//!    measured, with the N others present.
//!
//! The table it prints is the one in `docs/benchmarks.md`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};
use sluice_e2e::harness::{Cluster, OperatorProcess, start_cluster_with};

const SLUICE_USER: &str = "system:serviceaccount:sluice-system:sluice";
const FLAGGER_USER: &str = "system:serviceaccount:flagger-system:flagger";

struct Options {
    rollouts: usize,
    flagger: bool,
    idle: Duration,
}

impl Options {
    fn from_args() -> Options {
        let args: Vec<String> = std::env::args().collect();
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Options {
            rollouts: value("--rollouts").unwrap_or(100) as usize,
            flagger: !args.iter().any(|a| a == "--no-flagger"),
            idle: Duration::from_secs(value("--idle-secs").unwrap_or(120)),
        }
    }
}

/// What one operator did with N objects.
#[derive(Default)]
struct Measured {
    who: String,
    initialized_after: Duration,
    rss_peak_mib: f64,
    rss_settled_mib: f64,
    cpu_secs: f64,
    requests: BTreeMap<String, u64>,
    idle_requests: u64,
    idle_writes: u64,
    idle_window: Duration,
    release_started_after: Option<Duration>,
}

fn deployment(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "ghcr.io/stefanprodan/podinfo:6.0.0",
                                         "ports": [{"containerPort": 9898, "name": "http"}]}]},
            },
        },
    })
}

fn rollout(name: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": "sluice-bench"},
        "spec": {
            "provider": "istio",
            "targetRef": {"kind": "Deployment", "name": name},
            "service": {"port": 9898},
            "analysis": {"interval": "10s", "threshold": 5, "stepWeight": 20, "maxWeight": 60},
        },
    })
}

fn canary(name: &str) -> Value {
    json!({
        "apiVersion": "flagger.app/v1beta1", "kind": "Canary",
        "metadata": {"name": name, "namespace": "flagger-bench"},
        "spec": {
            "provider": "istio",
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "service": {"port": 9898},
            "analysis": {"interval": "10s", "threshold": 5, "stepWeight": 20, "maxWeight": 60},
        },
    })
}

/// Creates `objects` with up to 32 requests in flight.
async fn create_all(client: &kube::Client, resource: &ApiResource, objects: Vec<Value>) {
    futures::stream::iter(objects)
        .for_each_concurrent(32, |object| {
            let client = client.clone();
            async move {
                let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
                let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, resource);
                let object: DynamicObject = serde_json::from_value(object).expect("object");
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &object).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(status)) if status.code == 409 => return,
                        Err(err) if attempt < 4 => {
                            eprintln!("create failed ({err}); retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(err) => panic!("cannot create {:?}: {err}", object.metadata.name),
                    }
                }
            }
        })
        .await;
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Lists every object of `resource` in `namespace`, 500 at a time.
async fn list_all(client: &kube::Client, namespace: &str, resource: &ApiResource) -> Vec<Value> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            Err(err) => {
                eprintln!("list failed: {err}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        out.extend(
            page.items
                .into_iter()
                .filter_map(|o| serde_json::to_value(o).ok()),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return out,
        }
    }
}

async fn wait_deployments_available(client: &kube::Client, namespace: &str, n: usize) {
    let started = Instant::now();
    let deployments = resource("apps", "v1", "Deployment", "deployments");
    loop {
        let ready = list_all(client, namespace, &deployments)
            .await
            .iter()
            .filter(|d| d.pointer("/status/readyReplicas").and_then(Value::as_i64) == Some(1))
            .count();
        if ready >= n {
            println!(
                "  {n} Deployments in {namespace} available after {:.0?}",
                started.elapsed()
            );
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "only {ready}/{n} Deployments in {namespace} became available"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Audit events of `user` in the log from byte `from` on: counts by verb, and the end offset.
fn audit_counts(log: &Path, user: &str, from: u64) -> (BTreeMap<String, u64>, u64) {
    let mut counts = BTreeMap::new();
    let Ok(mut file) = std::fs::File::open(log) else {
        return (counts, from);
    };
    let end = file.seek(SeekFrom::End(0)).unwrap_or(from);
    let _ = file.seek(SeekFrom::Start(from));
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut read = from;
    while read < end {
        line.clear();
        let Ok(n) = reader.read_line(&mut line) else {
            break;
        };
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        read += n as u64;
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event.pointer("/user/username").and_then(Value::as_str) != Some(user) {
            continue;
        }
        let verb = event["verb"].as_str().unwrap_or("?");
        *counts.entry(verb.to_owned()).or_default() += 1;
    }
    (counts, read)
}

fn audit_end(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// The audit log is written before each response (blocking mode); this only lets in-flight requests finish.
async fn audit_flushed(_log: &Path) {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The canary's weight in an Istio VirtualService (Sluice's and Flagger's both name it after the Service and
/// route to `<service>-canary`).
fn canary_weight(vs: &Value, service: &str) -> i64 {
    let canary = format!("{service}-canary");
    vs.pointer("/spec/http")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|route| route["route"].as_array().cloned().unwrap_or_default())
        .filter(|d| {
            d.pointer("/destination/host")
                .and_then(Value::as_str)
                .is_some_and(|h| h == canary || h.starts_with(&format!("{canary}.")))
        })
        .filter_map(|d| d["weight"].as_i64())
        .max()
        .unwrap_or(0)
}

/// Runs one operator over N objects of `kind` in `namespace`: everything [`Measured`] holds.
#[allow(clippy::too_many_arguments)]
async fn measure(
    cluster: &Cluster,
    who: &str,
    user: &str,
    namespace: &str,
    objects: (&ApiResource, Vec<Value>),
    start: impl FnOnce() -> Running,
    n: usize,
    idle: Duration,
) -> (Measured, Running) {
    let client = &cluster.client;
    let audit = cluster.control_plane.audit_log();
    let (kind, objects) = objects;
    create_all(client, kind, objects).await;
    println!("  {n} {} created in {namespace}", kind.plural);

    audit_flushed(&audit).await;
    let from = audit_end(&audit);
    let child = start();
    let started = Instant::now();
    let pid = child.pid();
    let mut measured = Measured {
        who: who.to_owned(),
        ..Default::default()
    };
    loop {
        let initialized = list_all(client, namespace, kind)
            .await
            .iter()
            .filter(|o| o.pointer("/status/phase").and_then(Value::as_str) == Some("Initialized"))
            .count();
        if initialized >= n {
            measured.initialized_after = started.elapsed();
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "{who}: only {initialized}/{n} Initialized after an hour"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  {who}: all {n} Initialized after {:.1?}",
        measured.initialized_after
    );

    // Settle (the last status writes and scale-downs), then read memory, CPU and requests.
    tokio::time::sleep(Duration::from_secs(20)).await;
    audit_flushed(&audit).await;
    (
        measured.cpu_secs,
        measured.rss_settled_mib,
        measured.rss_peak_mib,
    ) = sluice_e2e::harness::process_usage(pid);
    let (requests, offset) = audit_counts(&audit, user, from);
    measured.requests = requests;

    // Idle: nothing changes; every request now is overhead.
    let idle_from = offset;
    tokio::time::sleep(idle).await;
    audit_flushed(&audit).await;
    let (idle_requests, _) = audit_counts(&audit, user, idle_from);
    measured.idle_window = idle;
    measured.idle_requests = idle_requests.values().sum();
    measured.idle_writes = WRITE_VERBS
        .iter()
        .filter_map(|v| idle_requests.get(*v))
        .sum();
    println!(
        "  {who}: idle {:.0?}: {} requests ({} writes) {:?}",
        idle, measured.idle_requests, measured.idle_writes, idle_requests
    );

    // A release with N others present: the template of the middle target changes.
    let name = format!("app-{:05}", n / 2);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let virtual_services: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &resource(
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
        ),
    );
    let patch =
        json!({"spec": {"template": {"metadata": {"annotations": {"bench/revision": "2"}}}}});
    let changed = Instant::now();
    deployments
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("template change");
    while changed.elapsed() < Duration::from_secs(120) {
        if let Ok(vs) = virtual_services.get(&name).await
            && canary_weight(&serde_json::to_value(&vs).unwrap_or_default(), &name) > 0
        {
            measured.release_started_after = Some(changed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  {who}: canary traffic {:?} after the template change",
        measured.release_started_after
    );
    (measured, child)
}

/// An operator under measurement; stopped (killed) when dropped.
enum Running {
    Sluice(OperatorProcess),
    Flagger(Child),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Sluice(operator) => operator.pid(),
            Running::Flagger(child) => child.id(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Flagger(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn flagger_process(
    binary: &Path,
    kubeconfig: &Path,
    log: &Path,
) -> impl FnOnce() -> Running + use<> {
    let binary = binary.to_owned();
    let kubeconfig = kubeconfig.to_owned();
    let log = log.to_owned();
    move || {
        let port = sluice_e2e::prometheus::free_port().expect("port");
        let prometheus = sluice_e2e::prometheus::free_port().expect("port");
        let log = std::fs::File::create(&log).expect("flagger log");
        Running::Flagger(
            Command::new(binary)
                .args([
                    &format!("-kubeconfig={}", kubeconfig.display()),
                    "-mesh-provider=istio",
                    // Nothing listens there: the Canaries have no metrics to query.
                    &format!("-metrics-server=http://127.0.0.1:{prometheus}"),
                    &format!("-port={port}"),
                    "-log-level=info",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("flagger starts"),
        )
    }
}

/// Flagger's CRDs, and a ServiceAccount for it bound to cluster-admin (its chart's ClusterRole is broader
/// than what this run needs; the audit log tells its requests apart by this account).
async fn install_flagger(cluster: &Cluster, crds: &Path) -> PathBuf {
    let out = cluster
        .kubectl
        .run(&["apply", "--server-side", "-f", &crds.display().to_string()]);
    assert!(out.success, "Flagger CRDs: {}", out.stderr);
    let out = cluster.kubectl.run(&[
        "wait",
        "--for=condition=Established",
        "crd/canaries.flagger.app",
        "--timeout=60s",
    ]);
    assert!(out.success, "Flagger CRDs: {}", out.stderr);
    let client = &cluster.client;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "flagger-system"}})).expect("ns");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "flagger-system");
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "flagger"}})).expect("sa");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("ServiceAccount");
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "flagger"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "flagger", "namespace": "flagger-system"}],
    }))
    .expect("binding");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    let kubeconfig = cluster.dir.path().join("flagger.kubeconfig");
    cluster
        .control_plane
        .write_service_account_kubeconfig(
            "flagger-system",
            "flagger",
            &kubeconfig,
            Duration::from_secs(4 * 3600),
        )
        .await
        .expect("Flagger kubeconfig");
    kubeconfig
}

fn row(m: &Measured, n: usize) -> String {
    let total: u64 = m.requests.values().sum();
    let verbs = m
        .requests
        .iter()
        .map(|(verb, count)| format!("{verb} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let per_rollout_per_10min =
        m.idle_requests as f64 / n as f64 * (600.0 / m.idle_window.as_secs_f64());
    format!(
        "| {} | {n} | {:.1} s | {:.0} / {:.0} MiB | {:.1} | {total} ({verbs}) | {} ({} writes; {:.2} per Rollout per 10 min) | {} |",
        m.who,
        m.initialized_after.as_secs_f64(),
        m.rss_peak_mib,
        m.rss_settled_mib,
        m.cpu_secs,
        m.idle_requests as f64 * 60.0 / m.idle_window.as_secs_f64(),
        m.idle_writes,
        per_rollout_per_10min,
        m.release_started_after
            .map_or("none in 120 s".to_owned(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            )),
    )
}

#[tokio::main]
async fn main() {
    let options = Options::from_args();
    let n = options.rollouts;
    // Built now, so that the operator's start is not a build.
    sluice_e2e::harness::sluice_binary().expect("the sluice binary builds");
    let rival = if options.flagger {
        Some(
            sluice_testcluster::RivalTools::locate()
                .ok()
                .filter(|t| t.flagger.is_file() && t.flagger_crds.is_file())
                .expect(
                    "Flagger is not built: run `cargo xtask bench scale` (or pass --no-flagger)",
                ),
        )
    } else {
        None
    };
    // Pods: N targets per operator, then N primaries each; kwok nodes take 1,000 pods.
    let pods = 4 * n + 100;
    let cluster = start_cluster_with(|options| {
        options.nodes = pods.div_ceil(1000);
        options.audit_users = vec![SLUICE_USER.into(), FLAGGER_USER.into()];
        options.ready_timeout = Duration::from_secs(300);
        // The cluster's own controllers must keep up with thousands of Deployments (both operators get this).
        options.controller_qps = Some(500);
    })
    .await
    .expect("control plane");
    let client = cluster.client.clone();
    let flagger_kubeconfig = match &rival {
        Some(rival) => Some(install_flagger(&cluster, &rival.flagger_crds).await),
        None => None,
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut bench_namespaces = vec!["sluice-bench"];
    if rival.is_some() {
        bench_namespaces.push("flagger-bench");
    }
    let deployments = resource("apps", "v1", "Deployment", "deployments");
    let setup = Instant::now();
    for ns in &bench_namespaces {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("namespace");
        let objects = (0..n)
            .map(|i| deployment(&format!("app-{i:05}"), ns))
            .collect();
        create_all(&client, &deployments, objects).await;
    }
    for ns in &bench_namespaces {
        wait_deployments_available(&client, ns, n).await;
    }
    println!(
        "setup: {} Deployments in {:.0?}",
        n * bench_namespaces.len(),
        setup.elapsed()
    );

    let mut results = Vec::new();
    let sluice_log = cluster.dir.path().join("sluice-operator.log");
    let (sluice, operator) = measure(
        &cluster,
        "Sluice",
        SLUICE_USER,
        "sluice-bench",
        (
            &resource("sluice.dev", "v1alpha1", "Rollout", "rollouts"),
            (0..n).map(|i| rollout(&format!("app-{i:05}"))).collect(),
        ),
        || {
            let prometheus = sluice_e2e::prometheus::free_port().expect("port");
            let operator = OperatorProcess::start_with(
                &cluster.operator_kubeconfig,
                &format!("http://127.0.0.1:{prometheus}"),
                &sluice_log,
                &[],
            )
            .expect("operator starts");
            Running::Sluice(operator)
        },
        n,
        options.idle,
    )
    .await;
    drop(operator);
    results.push(sluice);

    if let (Some(rival), Some(kubeconfig)) = (&rival, &flagger_kubeconfig) {
        let log = cluster.dir.path().join("flagger.log");
        let (flagger, process) = measure(
            &cluster,
            &format!("Flagger {}", rival.versions.flagger),
            FLAGGER_USER,
            "flagger-bench",
            (
                &resource("flagger.app", "v1beta1", "Canary", "canaries"),
                (0..n).map(|i| canary(&format!("app-{i:05}"))).collect(),
            ),
            flagger_process(&rival.flagger, kubeconfig, &log),
            n,
            options.idle,
        )
        .await;
        drop(process);
        results.push(flagger);
    }

    println!();
    println!(
        "| operator | N | all Initialized after start | RSS peak / settled | CPU s (start → settled) | API requests (start → settled) | idle requests per minute | template change → canary traffic |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for m in &results {
        println!("{}", row(m, n));
    }
    tokio::task::block_in_place(move || cluster.control_plane.stop());
}
