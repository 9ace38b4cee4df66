//! Propagation on a real control plane: from the `kubectl apply` (server-side apply) of an
//! AuthorizationPolicy change to the new revision active on N real OPA instances (`opa run`, long-polling
//! the operator's bundle server; activation times from the reports OPA's status plugin POSTs on every
//! activation) and on N `sluice-authz` sidecars (long-polling; activation times from their "bundle
//! activated" log line).
//!
//! `cargo bench -p sluice-e2e --bench propagation` (about 1 minute). `SLUICE_BENCH_INSTANCES` sets N (default
//! 100 of each), `SLUICE_BENCH_ROUNDS` the number of changes measured (default 5).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use sluice::api::AuthorizationPolicy;
use sluice_e2e::harness::{OperatorProcess, sluice_binary, start_cluster};
use sluice_e2e::opa::{BundleConfig, OpaServer};

/// (who, revision, when it was seen active)
type Activations = Arc<Mutex<Vec<(String, String, Instant)>>>;

const POLICY: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method in data.envoy.authz.methods
"#;

fn policy(round: usize) -> Value {
    let methods: Vec<String> = (0..=round).map(|i| format!("M{i}")).collect();
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "fanout", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "fanout"}},
            "modules": [{"name": "authz.rego", "rego": POLICY}],
            "data": {"envoy": {"authz": {"methods": methods}}},
        }
    })
}

async fn receive_status(State(seen): State<Activations>, body: Bytes) {
    let at = Instant::now();
    let Ok(report) = serde_json::from_slice::<Value>(&body) else {
        return;
    };
    let id = report["labels"]["id"].as_str().unwrap_or("?").to_owned();
    if let Some(revision) = report["bundles"]["authz"]["active_revision"].as_str() {
        seen.lock()
            .unwrap()
            .push((format!("opa {id}"), revision.to_owned(), at));
    }
}

/// A `sluice-authz` long-polling the bundle server; its activations are read from its JSON log.
fn start_sidecar(index: usize, url: &str, seen: Activations) -> Child {
    let binary = sluice_binary()
        .expect("sluice builds")
        .with_file_name("sluice-authz");
    let mut child = Command::new(binary)
        .args(["--bundle", url, "--long-poll-secs", "60"])
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--decision-log-rate",
            "0",
            "--threads",
            "1",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice-authz starts");
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if record["fields"]["message"] == "bundle activated"
                && let Some(revision) = record["fields"]["revision"].as_str()
            {
                seen.lock().unwrap().push((
                    format!("sluice-authz {index}"),
                    revision.to_owned(),
                    Instant::now(),
                ));
            }
        }
    });
    child
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let instances: usize = std::env::var("SLUICE_BENCH_INSTANCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let rounds: usize = std::env::var("SLUICE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cluster = start_cluster().await.expect("control plane");
    let operator = OperatorProcess::start(
        &cluster.operator_kubeconfig,
        "http://127.0.0.1:9",
        &cluster.dir.path().join("operator.log"),
    )
    .expect("operator");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policies: Api<AuthorizationPolicy> = Api::namespaced(cluster.client.clone(), "default");
    let apply = |round: usize| {
        let policies = policies.clone();
        async move {
            policies
                .patch(
                    "fanout",
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(policy(round)),
                )
                .await
                .expect("applied");
        }
    };
    apply(0).await;

    let seen: Activations = Arc::default();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let receiver_url = format!("http://{}", receiver.local_addr().expect("addr"));
    tokio::spawn(
        axum::serve(
            receiver,
            Router::new()
                .route("/status", post(receive_status))
                .with_state(seen.clone()),
        )
        .into_future(),
    );

    let bundle = BundleConfig {
        server: operator.bundle_url.clone(),
        resource: "bundles/default/fanout".into(),
        long_poll_secs: 60,
        verification: None,
        status_receiver: Some(receiver_url),
    };
    let started = Instant::now();
    let opas: Vec<OpaServer> = (0..instances)
        .map(|_| OpaServer::start(&bundle).expect("opa starts"))
        .collect();
    let url = format!("{}/bundles/default/fanout", operator.bundle_url);
    let mut sidecars: Vec<Child> = (0..instances)
        .map(|i| start_sidecar(i, &url, seen.clone()))
        .collect();
    eprintln!(
        "{instances} OPA and {instances} sluice-authz instances started in {:.1?}",
        started.elapsed()
    );

    let who_has = |revision: &str| -> std::collections::HashMap<String, Instant> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, r, _)| r == revision)
            .map(|(who, _, at)| (who.clone(), *at))
            .collect()
    };
    let served = |previous: Option<String>| {
        let policies = policies.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let p = policies.get("fanout").await.expect("policy");
                if let Some(r) = p.status.and_then(|s| s.revision)
                    && Some(&r) != previous.as_ref()
                {
                    return r;
                }
                assert!(Instant::now() < deadline, "no revision served");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let wait_all = |revision: String| async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let have = who_has(&revision);
            if have.len() >= 2 * instances {
                return have;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} instances activated {revision}",
                have.len(),
                2 * instances
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let mut revision = served(None).await;
    wait_all(revision.clone()).await;
    eprintln!(
        "all instances active on the first revision after {:.1?}",
        started.elapsed()
    );
    // Let every instance settle into its long poll.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut opa_delays = Vec::new();
    let mut sidecar_delays = Vec::new();
    for round in 1..=rounds {
        let applied = Instant::now();
        apply(round).await;
        revision = served(Some(revision)).await;
        let have = wait_all(revision.clone()).await;
        let mut round_opa = Vec::new();
        let mut round_sidecar = Vec::new();
        for (who, at) in have {
            let delay = at.saturating_duration_since(applied);
            if who.starts_with("opa") {
                round_opa.push(delay);
            } else {
                round_sidecar.push(delay);
            }
        }
        round_opa.sort();
        round_sidecar.sort();
        eprintln!(
            "round {round}: OPA p50 {:?} max {:?}; sluice-authz p50 {:?} max {:?}",
            percentile(&round_opa, 0.5),
            round_opa.last().copied().unwrap_or_default(),
            percentile(&round_sidecar, 0.5),
            round_sidecar.last().copied().unwrap_or_default(),
        );
        opa_delays.extend(round_opa);
        sidecar_delays.extend(round_sidecar);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    opa_delays.sort();
    sidecar_delays.sort();
    println!(
        "\nPropagation, apply → new revision active, {instances} instances of each, {rounds} changes (real control plane, operator on loopback)\n"
    );
    println!("| clients | activations measured | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, delays) in [
        (
            "OPA (opa run, long polling; status plugin reports)",
            &opa_delays,
        ),
        (
            "sluice-authz (long polling; activation log)",
            &sidecar_delays,
        ),
    ] {
        println!(
            "| {name} | {} | {:.0?} | {:.0?} | {:.0?} |",
            delays.len(),
            percentile(delays, 0.5),
            percentile(delays, 0.99),
            delays.last().copied().unwrap_or_default()
        );
    }
    for child in &mut sidecars {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(opas);
    drop(operator);
}
