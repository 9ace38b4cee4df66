//! `/readyz` of `sluice operator` says ready only once its controllers have listed and watch their
//! resources: an operator whose ServiceAccount may not list them stays unready (and says what is starting),
//! while `/healthz` answers; with the RBAC of `config/base` it becomes ready.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_e2e::harness::{OperatorProcess, start_cluster};

async fn get(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = http.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

/// Polls `url` until `done` holds for its answer; the last answer otherwise.
async fn poll(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    done: impl Fn(&(u16, String)) -> bool,
) -> Option<(u16, String)> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        last = get(http, url).await;
        if last.as_ref().is_some_and(&done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_controllers_watches() {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    let http = reqwest::Client::new();
    let unprivileged = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                              "metadata": {"name": "nobody", "namespace": "default"}});
    let out = cluster
        .kubectl
        .run_with_stdin(&["apply", "-f", "-"], &unprivileged.to_string());
    assert!(out.success, "{}", out.stderr);
    let nobody = cluster.dir.path().join("nobody.kubeconfig");
    cluster
        .control_plane
        .write_service_account_kubeconfig("default", "nobody", &nobody, Duration::from_secs(600))
        .await
        .expect("token");

    let starved = OperatorProcess::start(
        &nobody,
        "http://127.0.0.1:9",
        &cluster.dir.path().join("starved.log"),
    )
    .expect("operator starts");
    let health = poll(
        &http,
        &format!("{}/healthz", starved.metrics_url),
        Duration::from_secs(60),
        |(code, _)| *code == 200,
    )
    .await;
    assert_eq!(health.map(|(code, _)| code), Some(200), "{}", starved.log());
    // Its lists are refused (403) and retried: it must not claim to be ready, however long we ask.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        let ready = get(&http, &format!("{}/readyz", starved.metrics_url)).await;
        let (code, body) = ready.expect("readyz answers");
        assert_eq!(
            code, 503,
            "ready without being able to list anything: {body}"
        );
        assert!(
            body.contains("rollouts") && body.contains("authorizationpolicies"),
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(starved);

    let operator = OperatorProcess::start(
        &cluster.operator_kubeconfig,
        "http://127.0.0.1:9",
        &cluster.dir.path().join("operator.log"),
    )
    .expect("operator starts");
    let ready = poll(
        &http,
        &format!("{}/readyz", operator.metrics_url),
        Duration::from_secs(60),
        |(code, _)| *code == 200,
    )
    .await;
    assert_eq!(
        ready.as_ref().map(|(code, _)| *code),
        Some(200),
        "{ready:?}\n{}",
        operator.log()
    );
}
