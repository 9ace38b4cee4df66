//! Sluice's Graphite provider against a real graphite-web (Debian's package) reading whisper files the test
//! writes second by second: the value a check reads, the window cut to the stage, no data, the primary
//! comparison, and the errors that freeze a rollout.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice::api::{
    DurationString, Metric, NoDataPolicy, PrimaryComparison, Provider, ThresholdRange, Verdict,
};
use sluice::metrics::{Graphite, ProviderError, QueryContext, ServerAccess};
use sluice_e2e::graphite::GraphiteServer;

/// Errors and requests per second of one workload, as a mesh exporter would send them to carbon.
const ERROR_RATE: &str = "target=asPercent(sumSeries(mesh.{{ namespace }}.{{ target }}.errors), sumSeries(mesh.{{ namespace }}.{{ target }}.requests))";
/// The same over the whole window, in one bucket (`{{ interval }}` is the window in seconds).
const ERROR_RATE_OVER_WINDOW: &str = "target=asPercent(summarize(sumSeries(mesh.{{ namespace }}.{{ target }}.errors), '{{ interval }}', 'sum', true), summarize(sumSeries(mesh.{{ namespace }}.{{ target }}.requests), '{{ interval }}', 'sum', true))";

fn ctx(target: &str, stage_age: Option<Duration>) -> QueryContext {
    QueryContext {
        namespace: "shop".into(),
        target: target.into(),
        service: target.into(),
        interval: "2m".into(),
        variables: BTreeMap::new(),
        statefulset: false,
        stage_age,
        waypoint: false,
    }
}

fn metric(query: &str, max: f64) -> Metric {
    Metric {
        name: "error-rate".into(),
        query: Some(query.into()),
        threshold_range: ThresholdRange {
            min: None,
            max: Some(max),
        },
        interval: None,
        min_requests: None,
        on_no_data: NoDataPolicy::Hold,
        dry_run: false,
        primary_comparison: None,
        template_ref: None,
        template_variables: Default::default(),
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// `requests` per second with `errors` of them failing, for each second from `from` to `to` seconds ago.
fn traffic(
    graphite: &GraphiteServer,
    workload: &str,
    (from, to): (i64, i64),
    requests: f64,
    errors: f64,
) {
    let now = now();
    let seconds: Vec<i64> = (to..=from).map(|ago| now - ago).collect();
    let points = |value: f64| seconds.iter().map(|&at| (at, value)).collect::<Vec<_>>();
    graphite
        .write(&format!("mesh.shop.{workload}.requests"), &points(requests))
        .expect("requests written");
    graphite
        .write(&format!("mesh.shop.{workload}.errors"), &points(errors))
        .expect("errors written");
}

async fn started() -> (GraphiteServer, Graphite) {
    let server = GraphiteServer::start().await.expect("graphite-web starts");
    let client = Graphite::new(
        &server.url(),
        Duration::from_secs(10),
        &ServerAccess::default(),
    )
    .expect("a Graphite client");
    (server, client)
}

#[tokio::test]
async fn a_check_reads_the_last_point_of_one_series_and_judges_it() {
    let (server, graphite) = started().await;
    traffic(&server, "good", (60, 0), 100.0, 1.0);
    traffic(&server, "bad", (60, 0), 100.0, 9.0);
    let good = graphite
        .observe(
            Provider::Istio,
            &metric(ERROR_RATE, 5.0),
            &ctx("good", None),
        )
        .await
        .expect("good measured");
    assert_eq!((good.verdict, good.value), (Verdict::Pass, Some(1.0)));
    assert!(
        good.query.contains("mesh.shop.good.errors"),
        "the rendered query is shown to users: {}",
        good.query
    );
    let bad = graphite
        .observe(Provider::Istio, &metric(ERROR_RATE, 5.0), &ctx("bad", None))
        .await
        .expect("bad measured");
    assert_eq!((bad.verdict, bad.value), (Verdict::Fail, Some(9.0)));
}

/// A release pushed right after a bad one: the first minute and a half of the window held 50% errors, the last
/// 20 seconds (this stage) 1%. Cut to the stage, the check sees 1%; over the whole written window it would not.
#[tokio::test]
async fn the_window_is_cut_to_the_stage() {
    let (server, graphite) = started().await;
    traffic(&server, "web", (110, 21), 100.0, 50.0);
    traffic(&server, "web", (20, 0), 100.0, 1.0);
    let m = metric(ERROR_RATE_OVER_WINDOW, 5.0);
    let stage = graphite
        .observe(
            Provider::Istio,
            &m,
            &ctx("web", Some(Duration::from_secs(20))),
        )
        .await
        .expect("measured over the stage");
    assert!(
        stage.query.contains("'20s'"),
        "{{{{ interval }}}} is the stage's window in seconds: {}",
        stage.query
    );
    assert_eq!(stage.verdict, Verdict::Pass, "{stage:?}");
    assert!(
        stage.value.is_some_and(|v| v < 2.0),
        "only this stage's 1%: {stage:?}"
    );
    let whole = graphite
        .observe(Provider::Istio, &m, &ctx("web", None))
        .await
        .expect("measured over the written window");
    assert!(whole.query.contains("'120s'"), "{}", whole.query);
    assert!(
        whole.value.is_some_and(|v| v > 20.0),
        "the written 2m reaches the previous release: {whole:?}"
    );
}

#[tokio::test]
async fn traffic_from_before_the_stage_is_no_data() {
    let (server, graphite) = started().await;
    traffic(&server, "quiet", (110, 40), 100.0, 50.0);
    let observation = graphite
        .observe(
            Provider::Istio,
            &metric(ERROR_RATE, 5.0),
            &ctx("quiet", Some(Duration::from_secs(30))),
        )
        .await
        .expect("measured");
    assert_eq!(
        (observation.verdict, observation.value),
        (Verdict::NoData, None)
    );
}

#[tokio::test]
async fn a_canary_is_compared_with_its_primary() {
    let (server, graphite) = started().await;
    traffic(&server, "web-primary", (60, 0), 100.0, 3.0);
    traffic(&server, "web", (60, 0), 100.0, 4.0);
    traffic(&server, "worse", (60, 0), 100.0, 8.0);
    traffic(&server, "worse-primary", (60, 0), 100.0, 3.0);
    let compared = Metric {
        threshold_range: ThresholdRange {
            min: None,
            max: None,
        },
        primary_comparison: Some(PrimaryComparison {
            max_delta: Some(2.0),
            ..PrimaryComparison::default()
        }),
        ..metric(ERROR_RATE, 0.0)
    };
    let close = graphite
        .observe(Provider::Istio, &compared, &ctx("web", None))
        .await
        .expect("measured");
    assert_eq!(
        (close.verdict, close.value, close.primary_value),
        (Verdict::Pass, Some(4.0), Some(3.0))
    );
    let far = graphite
        .observe(Provider::Istio, &compared, &ctx("worse", None))
        .await
        .expect("measured");
    assert_eq!((far.verdict, far.primary_value), (Verdict::Fail, Some(3.0)));
}

#[tokio::test]
async fn what_graphite_refuses_freezes_the_check_with_a_reason() {
    let (mut server, graphite) = started().await;
    traffic(&server, "a", (10, 0), 100.0, 1.0);
    traffic(&server, "b", (10, 0), 100.0, 1.0);
    let unknown = graphite
        .observe(
            Provider::Istio,
            &metric("target=nosuchfunction(mesh.shop.a.errors)", 5.0),
            &ctx("a", None),
        )
        .await;
    assert!(
        matches!(&unknown, Err(ProviderError::Query { reason, .. }) if reason.contains("nosuchfunction")),
        "{unknown:?}"
    );
    let several = graphite
        .observe(
            Provider::Istio,
            &metric("target=mesh.shop.*.errors", 5.0),
            &ctx("a", None),
        )
        .await;
    assert!(
        matches!(&several, Err(ProviderError::NotOneSeries { series: 2, sample, .. })
            if sample.contains("mesh.shop.a.errors") && sample.contains("mesh.shop.b.errors")),
        "{several:?}"
    );
    let bad_interval = graphite
        .observe(
            Provider::Istio,
            &Metric {
                interval: Some(DurationString("soon".into())),
                ..metric(ERROR_RATE, 5.0)
            },
            &ctx("a", None),
        )
        .await;
    assert!(
        matches!(bad_interval, Err(ProviderError::InvalidMetric { .. })),
        "{bad_interval:?}"
    );
    server.stop();
    let gone = graphite
        .observe(Provider::Istio, &metric(ERROR_RATE, 5.0), &ctx("a", None))
        .await;
    assert!(
        matches!(&gone, Err(ProviderError::Unreachable { url, .. }) if *url == server.url()),
        "{gone:?}"
    );
}
