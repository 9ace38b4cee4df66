//! Sluice's Prometheus provider against a real Prometheus scraping a fake Istio mesh: the builtin queries, the
//! verdicts users rely on (no data is never a pass) and the errors that freeze a rollout.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sluice::api::{
    Metric, NoDataPolicy, Provider, REQUEST_DURATION, REQUEST_SUCCESS_RATE, ThresholdRange, Verdict,
};
use sluice::metrics::{Observation, Prometheus, ProviderError, QueryContext};
use sluice_e2e::prometheus::{FakeMesh, PrometheusServer, WorkloadTraffic};

const NAMESPACE: &str = "test";
/// Every bounded wait in this file.
const PATIENCE: Duration = Duration::from_secs(20);

fn ctx(target: &str) -> QueryContext {
    QueryContext {
        namespace: NAMESPACE.into(),
        target: target.into(),
        service: target.into(),
        interval: "10s".into(),
        variables: BTreeMap::new(),
        statefulset: false,
        stage_age: None,
        waypoint: false,
    }
}

fn metric(name: &str, min: Option<f64>, max: Option<f64>, min_requests: Option<u32>) -> Metric {
    Metric {
        name: name.into(),
        query: None,
        threshold_range: ThresholdRange { min, max },
        interval: None,
        min_requests,
        on_no_data: NoDataPolicy::Hold,
        dry_run: false,
        primary_comparison: None,
        template_ref: None,
        template_variables: Default::default(),
    }
}

/// Polls `check` until it returns `Some`, for at most [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = check().await? {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!("gave up after {PATIENCE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Observes until the metric has a value (Prometheus has enough samples for `rate`), then returns that observation.
async fn measured(
    prometheus: &Prometheus,
    metric: &Metric,
    target: &str,
) -> anyhow::Result<Observation> {
    eventually(
        &format!("a value of {} for {target}", metric.name),
        move || async move {
            let observation = prometheus
                .observe(Provider::Istio, metric, &ctx(target))
                .await?;
            Ok(observation
                .value
                .is_some_and(f64::is_finite)
                .then_some(observation))
        },
    )
    .await
}

async fn mesh_and_prometheus() -> anyhow::Result<(FakeMesh, PrometheusServer, Prometheus)> {
    let mesh = FakeMesh::start().await?;
    let server = PrometheusServer::start(&[mesh.target()]).await?;
    server.wait_for_scrapes(2, PATIENCE).await?;
    let client = Prometheus::new(&server.url(), Duration::from_secs(5))?;
    Ok((mesh, server, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_metrics_judge_live_istio_traffic() -> anyhow::Result<()> {
    let (mesh, server, prometheus) = mesh_and_prometheus().await?;
    mesh.set(
        "healthy",
        NAMESPACE,
        WorkloadTraffic {
            rps: 50.0,
            error_ratio: 0.0,
            latency_ms: 20.0,
        },
    );
    mesh.set(
        "erroring",
        NAMESPACE,
        WorkloadTraffic {
            rps: 50.0,
            error_ratio: 0.2,
            latency_ms: 20.0,
        },
    );
    mesh.set(
        "broken",
        NAMESPACE,
        WorkloadTraffic {
            rps: 20.0,
            error_ratio: 1.0,
            latency_ms: 5.0,
        },
    );
    mesh.set(
        "slow",
        NAMESPACE,
        WorkloadTraffic {
            rps: 20.0,
            error_ratio: 0.0,
            latency_ms: 300.0,
        },
    );
    mesh.set("idle", NAMESPACE, WorkloadTraffic::IDLE);
    let success = metric(REQUEST_SUCCESS_RATE, Some(99.0), None, Some(10));

    let healthy = measured(&prometheus, &success, "healthy").await?;
    assert_eq!(healthy.verdict, Verdict::Pass, "{healthy:?}");
    assert_eq!(healthy.value, Some(100.0));
    assert!(
        healthy.query.contains(r#"destination_workload="healthy""#),
        "{}",
        healthy.query
    );

    // Judge the ratio over a full window: right after the first error the 500 series has fewer samples than the
    // 200 one, and `rate` extrapolates them differently (seen as 85% under load).
    let erroring = eventually("a full window of erroring traffic", || async {
        let observation = prometheus
            .observe(Provider::Istio, &success, &ctx("erroring"))
            .await?;
        Ok(observation
            .requests
            .is_some_and(|r| r >= 400.0)
            .then_some(observation))
    })
    .await?;
    assert_eq!(erroring.verdict, Verdict::Fail, "{erroring:?}");
    let rate = erroring.value.unwrap_or_default();
    assert!(
        (75.0..=85.0).contains(&rate),
        "success rate {rate} should be about 80: {erroring:?}"
    );

    // Every request failing is a 0% success rate and a failure, not "no data".
    let broken = measured(&prometheus, &success, "broken").await?;
    assert_eq!(
        (broken.verdict, broken.value),
        (Verdict::Fail, Some(0.0)),
        "{broken:?}"
    );

    // No traffic: no series at all, so no data, whatever the bounds.
    let idle = prometheus
        .observe(Provider::Istio, &success, &ctx("idle"))
        .await?;
    assert_eq!(
        (idle.verdict, idle.value),
        (Verdict::NoData, None),
        "{idle:?}"
    );
    let lenient = metric(REQUEST_SUCCESS_RATE, Some(0.0), None, None);
    let idle = prometheus
        .observe(Provider::Istio, &lenient, &ctx("idle"))
        .await?;
    assert_eq!(idle.verdict, Verdict::NoData, "{idle:?}");

    // Requests are counted once (reporter="destination"), and more than that is required here.
    let demanding = metric(REQUEST_SUCCESS_RATE, Some(99.0), None, Some(1_000_000));
    let starved = prometheus
        .observe(Provider::Istio, &demanding, &ctx("healthy"))
        .await?;
    assert_eq!(starved.verdict, Verdict::NoData, "{starved:?}");
    let total = mesh
        .totals("healthy", NAMESPACE)
        .map(|t| t.requests)
        .unwrap_or_default();
    let counted = starved
        .requests
        .context("the builtin has a requests query")?;
    // 10s at 50 rps is about 500; double counting both reporters would be about 1000.
    assert!(
        counted > 0.0 && counted < 800.0 && counted <= total as f64 + 100.0,
        "{counted} of {total}: {starved:?}"
    );
    assert!(
        starved.value.is_some_and(|v| v >= 99.0),
        "the value is still reported: {starved:?}"
    );

    // p99 of a 20 ms service lies in Istio's (10, 25] ms bucket; of a 300 ms service in (250, 500].
    let duration = metric(REQUEST_DURATION, None, Some(100.0), Some(10));
    let fast = measured(&prometheus, &duration, "healthy").await?;
    let p99 = fast.value.unwrap_or_default();
    assert!(p99 > 10.0 && p99 <= 25.0, "p99 {p99}: {fast:?}");
    assert_eq!(fast.verdict, Verdict::Pass);
    let slow = measured(&prometheus, &duration, "slow").await?;
    let p99 = slow.value.unwrap_or_default();
    assert!(p99 > 250.0 && p99 <= 500.0, "p99 {p99}: {slow:?}");
    assert_eq!(slow.verdict, Verdict::Fail);

    // A custom template renders the Rollout's placeholders; minRequests does not apply without a requests query.
    let custom = Metric {
        query: Some(
            r#"sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="{{ namespace }}",destination_workload="{{ target }}",response_code=~"5.*"}[{{ interval }}]))"#
                .into(),
        ),
        ..metric("error-rps", None, Some(1.0), Some(1_000_000))
    };
    // rate() under-reads a series younger than its window, so wait for a full window of data.
    let client = &prometheus;
    let custom_ref = &custom;
    let errors = eventually("about 10 errors per second", move || async move {
        let observation = client
            .observe(Provider::Istio, custom_ref, &ctx("erroring"))
            .await?;
        Ok(observation
            .value
            .is_some_and(|rps| (7.0..=13.0).contains(&rps))
            .then_some(observation))
    })
    .await?;
    assert_eq!(
        (errors.verdict, errors.requests),
        (Verdict::Fail, None),
        "{errors:?}"
    );

    // Gateway API on Istio reads the same telemetry.
    let via_gateway = prometheus
        .observe(Provider::GatewayApi, &success, &ctx("healthy"))
        .await?;
    assert_eq!(via_gateway.verdict, Verdict::Pass, "{via_gateway:?}");

    drop(server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_never_verdicts() -> anyhow::Result<()> {
    let (mesh, mut server, prometheus) = mesh_and_prometheus().await?;
    mesh.set("podinfo", NAMESPACE, WorkloadTraffic::healthy(10.0));
    let client = &prometheus;
    eventually("podinfo's series", move || async move {
        Ok(client
            .instant(r#"count(istio_requests_total{destination_workload="podinfo"})"#)
            .await?)
    })
    .await?;

    // Bad PromQL is a Query error that names the metric and the query.
    match prometheus
        .instant("sum(rate(istio_requests_total[1m]")
        .await
    {
        Err(ProviderError::Query {
            metric: None,
            query,
            reason,
        }) => {
            assert!(query.starts_with("sum(rate("), "{query}");
            assert!(!reason.is_empty());
        }
        other => bail!("expected a Query error, got {other:?}"),
    }
    let broken = Metric {
        query: Some("sum(".into()),
        ..metric("broken", Some(1.0), None, None)
    };
    let err = prometheus
        .observe(Provider::Istio, &broken, &ctx("podinfo"))
        .await
        .err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(matches!(err, Some(ProviderError::Query { .. })), "{err:?}");
    assert!(
        text.contains(r#""broken""#) && text.contains("sum("),
        "{text}"
    );

    // A query that is not aggregated to one series is an error, not a guess at which series counts.
    match prometheus
        .instant(r#"istio_requests_total{destination_workload="podinfo"}"#)
        .await
    {
        Err(err @ ProviderError::NotOneSeries { series: 2.., .. }) => {
            assert!(err.to_string().contains("sum("), "{err}");
        }
        other => bail!("expected NotOneSeries, got {other:?}"),
    }
    match prometheus.instant("istio_requests_total[1m]").await {
        Err(ProviderError::RangeVector { .. }) => {}
        other => bail!("expected RangeVector, got {other:?}"),
    }

    // Scalars and NaN pass through; judging NaN is the verdict's job.
    assert_eq!(prometheus.instant("scalar(vector(42))").await?, Some(42.0));
    assert!(prometheus.instant("0/0").await?.is_some_and(f64::is_nan));
    assert_eq!(
        prometheus
            .instant(r#"sum(istio_requests_total{destination_workload="nobody"})"#)
            .await?,
        None
    );

    // Prometheus gone: Unreachable, from both entry points.
    server.stop();
    let success = metric(REQUEST_SUCCESS_RATE, Some(99.0), None, None);
    match prometheus
        .observe(Provider::Istio, &success, &ctx("podinfo"))
        .await
    {
        Err(ProviderError::Unreachable { url, reason }) => {
            assert_eq!(url, server.url());
            assert!(!reason.is_empty());
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }
    assert!(matches!(
        prometheus.instant("vector(1)").await,
        Err(ProviderError::Unreachable { .. })
    ));

    // Back on the same URL with its data, the same client measures again.
    server.restart().await?;
    let back = measured(&prometheus, &success, "podinfo").await?;
    assert_eq!(back.verdict, Verdict::Pass, "{back:?}");
    Ok(())
}

#[tokio::test]
async fn a_silent_endpoint_times_out_as_unreachable() -> anyhow::Result<()> {
    // Accepts connections but never answers, like a hung Prometheus.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let prometheus = Prometheus::new(&url, Duration::from_millis(500))?;
    let result = prometheus.instant("vector(1)").await;
    hold.abort();
    match result {
        Err(ProviderError::Unreachable { reason, .. }) => {
            assert!(reason.contains("500ms"), "{reason}")
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }
    Ok(())
}
