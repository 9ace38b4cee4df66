//! Starts the real control plane and checks what the end-to-end tests rely on. Ignored by default: the
//! first run builds the binaries (about 20 minutes on 2 cores). Run with
//! `cargo test -p sluice-testcluster -- --ignored` (or after `cargo xtask cluster up` has built them).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use sluice_testcluster::{Cluster, ClusterOptions, READY_AFTER_ANNOTATION, Tools, process};

fn deployment(name: &str, replicas: i32, ready_after: Option<&str>) -> anyhow::Result<Deployment> {
    let annotations = match ready_after {
        Some(value) => serde_json::json!({ READY_AFTER_ANNOTATION: value }),
        None => serde_json::json!({}),
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name }, "annotations": annotations },
                "spec": { "containers": [{ "name": "app", "image": "example.invalid/app:1" }] },
            },
        },
    }))?)
}

fn ready_pods(pods: &[Pod]) -> usize {
    pods.iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count()
}

async fn pods_of(api: &Api<Pod>, app: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(api
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items)
}

#[tokio::test]
#[ignore = "builds and runs the real control plane; run with --ignored"]
async fn control_plane_runs_workloads_and_enforces_rbac() -> anyhow::Result<()> {
    let tools =
        tokio::task::spawn_blocking(|| Tools::ensure(&|line| eprintln!("{line}"))).await??;
    let mut opts = ClusterOptions::new(tools);
    opts.nodes = 2;
    let started = Instant::now();
    let cluster = Cluster::start(opts).await?;
    eprintln!("cluster ready in {:.1?}", started.elapsed());
    let client = cluster.client();

    // Workloads: ready at once, after a delay, never.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, replicas, ready_after) in [
        ("now", 2, None),
        ("later", 1, Some("4s")),
        ("never", 1, Some("never")),
    ] {
        deployments
            .create(
                &PostParams::default(),
                &deployment(name, replicas, ready_after)?,
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut later_running_unready_seen = false;
    loop {
        let now = pods_of(&pods, "now").await?;
        let later = pods_of(&pods, "later").await?;
        let never = pods_of(&pods, "never").await?;
        let running = |ps: &[Pod]| {
            ps.iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count()
        };
        if running(&later) == 1 && ready_pods(&later) == 0 {
            later_running_unready_seen = true;
        }
        if ready_pods(&now) == 2 && ready_pods(&later) == 1 && running(&never) == 1 {
            assert_eq!(ready_pods(&never), 0, "a never-ready pod stays unready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workloads did not reach the expected states"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        later_running_unready_seen,
        "the delayed pod was Running but not Ready first"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ready_pods(&pods_of(&pods, "never").await?),
        0,
        "still not ready"
    );

    // A ServiceAccount kubeconfig authenticates, and RBAC denies what it was not granted.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "tester"}}))?,
        )
        .await?;
    let path = cluster.state().dir.join("tester.kubeconfig");
    cluster
        .write_service_account_kubeconfig("default", "tester", &path, Duration::from_secs(600))
        .await?;
    let text = std::fs::read_to_string(&path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&text)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let tester = kube::Client::try_from(config)?;
    let denied = Api::<Pod>::namespaced(tester, "default")
        .list(&ListParams::default())
        .await;
    match denied {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    // Stopping leaves no process behind.
    let records = cluster.state().processes.clone();
    cluster.stop();
    for record in &records {
        assert!(
            !process::pid_exists(record.pid),
            "{} (pid {}) is still there",
            record.name,
            record.pid
        );
    }
    Ok(())
}
