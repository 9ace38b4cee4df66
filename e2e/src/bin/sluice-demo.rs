//! `cargo xtask demo`: Sluice end to end in about a minute on one machine. A real local Kubernetes control
//! plane (etcd, kube-apiserver, controllers, kwok nodes; see testcluster/), a real
//! Prometheus scraping a simulated mesh, a real Alertmanager, the operator and `sluice authz` play a healthy
//! canary, a bad canary that is rolled back and alerted on, and an authorization policy that allows one
//! request and denies another. Ends with a summary and cleans up after itself.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use sluice::api::{AuthorizationPolicy, Rollout, RolloutPhase};
use sluice_e2e::alertmanager::AlertmanagerServer;
use sluice_e2e::harness::{Cluster, OperatorProcess, repo_root, sluice_binary, start_cluster};
use sluice_e2e::prometheus::{FakeMesh, PrometheusServer, WorkloadTraffic};

const NS: &str = "default";
type Failure = Box<dyn std::error::Error + Send + Sync>;

fn step(title: &str) {
    println!("\n==> {title}");
}

/// Server-side applies any object (its kind resolved through discovery).
async fn apply(client: &Client, object: Value) -> Result<(), Failure> {
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, &kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
    api.patch(
        &name,
        &PatchParams::apply("sluice-demo").force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

fn podinfo(image: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "podinfo"}},
            "template": {"metadata": {"labels": {"app": "podinfo"}},
                "spec": {"containers": [{"name": "podinfo", "image": image}]}}}})
}

async fn rollout(client: &Client) -> Result<Rollout, Failure> {
    Ok(Api::<Rollout>::namespaced(client.clone(), NS)
        .get("podinfo")
        .await?)
}

/// Prints the `sluice rollout get --watch` view whenever it changes, until the phase is reached.
async fn watch_until(
    client: &Client,
    phase: RolloutPhase,
    limit: Duration,
) -> Result<(Duration, Vec<u8>), Failure> {
    let started = Instant::now();
    let mut last = String::new();
    let mut weights: Vec<u8> = Vec::new();
    loop {
        let r = rollout(client).await?;
        let status = r.status.clone().unwrap_or_default();
        let weight = status.canary_weight.get();
        if weights.last() != Some(&weight) {
            weights.push(weight);
        }
        let line = format!(
            "[{:>5.1}s] {:<12} {} canary {:>3}%  {}",
            started.elapsed().as_secs_f64(),
            status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
            sluice::cli::rollout::weight_bar(weight),
            weight,
            status.message.clone().unwrap_or_default()
        );
        if status.phase.is_some() && line[9..] != *last.get(9..).unwrap_or_default() {
            println!("{line}");
            last = line;
        }
        if status.phase == Some(phase) {
            return Ok((started.elapsed(), weights));
        }
        if started.elapsed() > limit {
            return Err(format!("the rollout did not reach {phase:?} within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match demo().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\ndemo failed: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), Failure> {
    let started = Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    step(
        "starting a local Kubernetes control plane (kubectl apply -k config/base), a simulated mesh, Prometheus and Alertmanager",
    );
    let Cluster {
        control_plane,
        client,
        dir,
        operator_kubeconfig,
        ..
    } = start_cluster().await?;
    let mesh = FakeMesh::start().await?;
    for workload in ["podinfo", "podinfo-primary"] {
        mesh.set(workload, NS, WorkloadTraffic::healthy(50.0));
    }
    let prometheus = PrometheusServer::start(&[mesh.target()]).await?;
    prometheus
        .wait_for_scrapes(2, Duration::from_secs(20))
        .await?;
    let alertmanager = AlertmanagerServer::start().await?;
    println!(
        "prometheus {}  alertmanager {}",
        prometheus.url(),
        alertmanager.url()
    );

    step(
        "applying podinfo, its Rollout (Istio, 20% steps every 2s) and an Alertmanager AlertProvider",
    );
    apply(&client, podinfo("ghcr.io/stefanprodan/podinfo:6.7.0")).await?;
    apply(
        &client,
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "AlertProvider",
        "metadata": {"name": "alertmanager", "namespace": NS},
        "spec": {"type": "alertmanager", "address": alertmanager.url()}}),
    )
    .await?;
    apply(&client, json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "podinfo", "namespace": NS},
        "spec": {"targetRef": {"kind": "Deployment", "name": "podinfo"}, "service": {"port": 9898},
            "provider": "istio", "progressDeadlineSeconds": 60,
            "analysis": {"interval": "2s", "threshold": 1, "stepWeight": 20, "maxWeight": 60,
                "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "10s", "minRequests": 5}],
                "alerts": [{"name": "on-call", "severity": "error", "providerRef": {"name": "alertmanager"}}]}}}))
    .await?;
    let operator = OperatorProcess::start(
        &operator_kubeconfig,
        &prometheus.url(),
        &dir.path().join("operator.log"),
    )?;
    watch_until(&client, RolloutPhase::Initialized, Duration::from_secs(30)).await?;

    step("release 1: podinfo 6.7.1, healthy — promoted step by step");
    apply(&client, podinfo("ghcr.io/stefanprodan/podinfo:6.7.1")).await?;
    let (healthy_took, healthy_weights) =
        watch_until(&client, RolloutPhase::Succeeded, Duration::from_secs(60)).await?;

    step(
        "release 2: podinfo 6.8.0 starts failing half its requests at 20% — rolled back and alerted",
    );
    apply(&client, podinfo("ghcr.io/stefanprodan/podinfo:6.8.0")).await?;
    let bad_started = Instant::now();
    loop {
        if rollout(&client)
            .await?
            .status
            .is_some_and(|s| s.canary_weight.get() >= 20)
        {
            break;
        }
        if bad_started.elapsed() > Duration::from_secs(30) {
            return Err("the bad release never reached 20%".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.set(
        "podinfo",
        NS,
        WorkloadTraffic {
            rps: 50.0,
            error_ratio: 0.5,
            latency_ms: 20.0,
        },
    );
    let (_, _) = watch_until(&client, RolloutPhase::Failed, Duration::from_secs(60)).await?;
    let rolled_back_in = bad_started.elapsed();
    let alert_started = Instant::now();
    let alert = loop {
        let alerts = alertmanager.alerts().await.unwrap_or_default();
        if let Some(alert) = alerts
            .into_iter()
            .find(|a| a["labels"]["alertname"] == "SluiceRolloutRolledBack")
        {
            break alert;
        }
        if alert_started.elapsed() > Duration::from_secs(30) {
            return Err("Alertmanager never received the rollback alert".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "Alertmanager: {} {{rollout={}, severity={}}}: {}",
        alert["labels"]["alertname"].as_str().unwrap_or_default(),
        alert["labels"]["rollout"].as_str().unwrap_or_default(),
        alert["labels"]["severity"].as_str().unwrap_or_default(),
        alert["annotations"]["description"]
            .as_str()
            .unwrap_or_default()
    );

    step(
        "an AuthorizationPolicy: compiled, tested, served as an OPA bundle, enforced by `sluice authz`",
    );
    let sample =
        std::fs::read_to_string(repo_root().join("config/samples/authorizationpolicy.yaml"))?;
    let policy: Value = serde_saphyr::from_str(&sample)?;
    let policy_started = Instant::now();
    apply(&client, policy).await?;
    let revision = loop {
        let p = Api::<AuthorizationPolicy>::namespaced(client.clone(), NS)
            .get("podinfo-authz")
            .await?;
        let ready = p.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if let (true, Some(revision)) = (ready, p.status.and_then(|s| s.revision)) {
            break revision;
        }
        if policy_started.elapsed() > Duration::from_secs(30) {
            return Err("the AuthorizationPolicy never became Ready".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let policy_took = policy_started.elapsed();
    println!(
        "revision {revision} ready in {policy_took:.1?} (tests passed, bundle served with ETag and long polling)"
    );
    // A port picked free can be taken before `sluice authz` binds it on a busy machine: a start that exits is
    // tried again on new ports, and what it said is kept for the error.
    let web = reqwest::Client::new();
    let authz_log =
        std::env::temp_dir().join(format!("sluice-demo-authz-{}.log", std::process::id()));
    let mut authz_started = None;
    for _attempt in 0..3 {
        let (grpc, http, admin) = distinct_ports()?;
        let mut child = KillOnDrop(
            Command::new(sluice_binary()?)
                .args([
                    "authz",
                    "--bundle",
                    &format!("{}/bundles/{NS}/podinfo-authz", operator.bundle_url),
                ])
                .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
                .args(["--http-addr", &format!("127.0.0.1:{http}")])
                .args([
                    "--metrics-addr",
                    &format!("127.0.0.1:{admin}"),
                    "--decision-log-rate",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&authz_log)?)
                .spawn()?,
        );
        let ready_started = Instant::now();
        let mut exited = false;
        while ready_started.elapsed() < Duration::from_secs(20) {
            let ready = web
                .get(format!("http://127.0.0.1:{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            if child.0.try_wait().ok().flatten().is_some() {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !exited && ready_started.elapsed() < Duration::from_secs(20) {
            authz_started = Some((child, http));
            break;
        }
        if !exited {
            break;
        }
    }
    let Some((_authz, http)) = authz_started else {
        let said = std::fs::read_to_string(&authz_log).unwrap_or_default();
        return Err(format!("sluice authz never became ready; it said:\n{said}").into());
    };
    let base: SocketAddr = format!("127.0.0.1:{http}").parse()?;
    let allowed = web
        .get(format!("http://{base}/api/info"))
        .header("x-user", "alice")
        .send()
        .await?
        .status();
    let denied = web
        .delete(format!("http://{base}/admin"))
        .header("x-user", "alice")
        .send()
        .await?
        .status();
    println!("GET /api/info (x-user: alice) -> {allowed}");
    println!("DELETE /admin (x-user: alice) -> {denied}");

    println!("\nSUMMARY");
    let weights: Vec<String> = healthy_weights
        .iter()
        .filter(|w| **w > 0)
        .map(|w| format!("{w}%"))
        .collect();
    println!(
        "healthy release: promoted in {:.1}s through {}",
        healthy_took.as_secs_f64(),
        weights.join(" -> ")
    );
    println!(
        "bad release: rolled back in {:.1}s; Alertmanager got SluiceRolloutRolledBack",
        rolled_back_in.as_secs_f64()
    );
    println!(
        "policy: revision {revision} served in {:.1}s; GET /api/info {}, DELETE /admin {}",
        policy_took.as_secs_f64(),
        allowed.as_u16(),
        denied.as_u16()
    );
    println!("total: {:.1}s", started.elapsed().as_secs_f64());

    drop(operator);
    control_plane.stop();
    drop((mesh, prometheus, alertmanager, dir));
    Ok(())
}

/// Three free loopback ports, all different: the listeners are held until all three are known.
fn distinct_ports() -> std::io::Result<(u16, u16, u16)> {
    let bind = || std::net::TcpListener::bind(("127.0.0.1", 0));
    let (a, b, c) = (bind()?, bind()?, bind()?);
    Ok((
        a.local_addr()?.port(),
        b.local_addr()?.port(),
        c.local_addr()?.port(),
    ))
}
