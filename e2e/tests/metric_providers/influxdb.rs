//! Sluice's InfluxDB provider. InfluxQL against a real influxd (Debian's 1.x, authentication on): the value a
//! check reads, the window cut to the stage, no data, the primary comparison, and the errors that freeze a
//! rollout. Flux (Flagger's language, InfluxDB 2) against InfluxDB's documented request and response shapes on
//! a loopback stand-in, since Debian has no InfluxDB 2: there the shapes are what is tested, not a server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sluice::api::{Metric, NoDataPolicy, PrimaryComparison, Provider, ThresholdRange, Verdict};
use sluice::metrics::{Auth, InfluxDb, ProviderError, QueryContext, ServerAccess};
use sluice_e2e::influxdb::{ADMIN, InfluxServer};

const DATABASE: &str = "mesh";
/// Errors per hundred requests of one workload, over the window.
const ERROR_RATE: &str = r#"SELECT sum("errors") / sum("total") * 100 FROM "mesh".."requests"
    WHERE "namespace" = '{{ namespace }}' AND "workload" = '{{ target }}' AND time > now() - {{ interval }}"#;

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

fn basic_auth(username: &str, password: &str) -> ServerAccess {
    ServerAccess {
        auth: Some(Auth::Basic {
            username: username.into(),
            password: password.into(),
        }),
        ..ServerAccess::default()
    }
}

/// `total` requests a second with `errors` of them failing, for each second from `from` to `to` seconds ago.
async fn traffic(
    influx: &InfluxServer,
    workload: &str,
    (from, to): (i64, i64),
    total: u32,
    errors: u32,
) {
    let now = jiff::Timestamp::now().as_second();
    let lines: String = (to..=from)
        .map(|ago| {
            format!(
                "requests,namespace=shop,workload={workload} total={total},errors={errors} {}\n",
                now - ago
            )
        })
        .collect();
    influx
        .write(DATABASE, &lines)
        .await
        .expect("points written");
}

async fn started() -> (InfluxServer, InfluxDb) {
    let server = InfluxServer::start(DATABASE).await.expect("influxd starts");
    let client = InfluxDb::new(
        &server.url(),
        Duration::from_secs(10),
        &basic_auth(ADMIN.0, ADMIN.1),
        None,
        None,
    )
    .expect("an InfluxDB client");
    (server, client)
}

#[tokio::test]
async fn influxql_checks_read_one_number_and_judge_it() {
    let (server, influx) = started().await;
    traffic(&server, "good", (60, 0), 200, 2).await;
    traffic(&server, "bad", (60, 0), 200, 18).await;
    let good = influx
        .observe(
            Provider::Istio,
            &metric(ERROR_RATE, 5.0),
            &ctx("good", None),
        )
        .await
        .expect("good measured");
    assert_eq!((good.verdict, good.value), (Verdict::Pass, Some(1.0)));
    assert!(
        good.query.contains("now() - 120s") && good.query.contains("'good'"),
        "{{{{ interval }}}} is the window in seconds: {}",
        good.query
    );
    let bad = influx
        .observe(Provider::Istio, &metric(ERROR_RATE, 5.0), &ctx("bad", None))
        .await
        .expect("bad measured");
    assert_eq!((bad.verdict, bad.value), (Verdict::Fail, Some(9.0)));
}

/// A release pushed right after a bad one: 50% errors until 21 seconds ago, 1% since. Cut to a 20-second
/// stage, the check sees 1%; over the written two minutes it would not.
#[tokio::test]
async fn the_window_is_cut_to_the_stage() {
    let (server, influx) = started().await;
    traffic(&server, "web", (110, 21), 100, 50).await;
    traffic(&server, "web", (19, 0), 100, 1).await;
    let m = metric(ERROR_RATE, 5.0);
    let stage = influx
        .observe(
            Provider::Istio,
            &m,
            &ctx("web", Some(Duration::from_secs(20))),
        )
        .await
        .expect("measured over the stage");
    assert!(stage.query.contains("now() - 20s"), "{}", stage.query);
    assert_eq!((stage.verdict, stage.value), (Verdict::Pass, Some(1.0)));
    let whole = influx
        .observe(Provider::Istio, &m, &ctx("web", None))
        .await
        .expect("measured over the written window");
    assert!(
        whole.value.is_some_and(|v| v > 20.0),
        "the written 2m reaches the previous release: {whole:?}"
    );
}

#[tokio::test]
async fn no_points_in_the_window_is_no_data_and_a_primary_comparison_reads_both() {
    let (server, influx) = started().await;
    traffic(&server, "quiet", (110, 40), 100, 50).await;
    let quiet = influx
        .observe(
            Provider::Istio,
            &metric(ERROR_RATE, 5.0),
            &ctx("quiet", Some(Duration::from_secs(30))),
        )
        .await
        .expect("measured");
    assert_eq!((quiet.verdict, quiet.value), (Verdict::NoData, None));

    traffic(&server, "web-primary", (30, 0), 100, 3).await;
    traffic(&server, "web", (30, 0), 100, 8).await;
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
    let far = influx
        .observe(Provider::Istio, &compared, &ctx("web", None))
        .await
        .expect("measured");
    assert_eq!(
        (far.verdict, far.value, far.primary_value),
        (Verdict::Fail, Some(8.0), Some(3.0))
    );
}

#[tokio::test]
async fn what_influxdb_refuses_freezes_the_check_with_a_reason() {
    let (mut server, influx) = started().await;
    traffic(&server, "a", (10, 0), 100, 1).await;
    traffic(&server, "b", (10, 0), 100, 1).await;
    let expect_query_error = |result: Result<_, ProviderError>, wanted: &str| match result {
        Err(ProviderError::Query { reason, .. }) if reason.contains(wanted) => {}
        other => panic!("expected a query error saying {wanted:?}, got {other:?}"),
    };
    let typo = influx
        .observe(
            Provider::Istio,
            &metric("SELECT sum(errors FROM requests", 5.0),
            &ctx("a", None),
        )
        .await;
    expect_query_error(typo, "error parsing query");
    let no_database = influx
        .observe(
            Provider::Istio,
            &metric(r#"SELECT sum("errors") FROM "nope".."requests""#, 5.0),
            &ctx("a", None),
        )
        .await;
    expect_query_error(no_database, "database not found");
    let several = influx
        .observe(
            Provider::Istio,
            &metric(
                r#"SELECT sum("errors") FROM "mesh".."requests" WHERE time > now() - {{ interval }} GROUP BY "workload""#,
                5.0,
            ),
            &ctx("a", None),
        )
        .await;
    assert!(
        matches!(&several, Err(ProviderError::NotOneSeries { series: 2, sample, .. })
            if sample.contains("workload=a") && sample.contains("workload=b")),
        "{several:?}"
    );
    // Debian's influxd is 1.6: it has no Flux API, and the error says what to do.
    let flux = InfluxDb::new(
        &server.url(),
        Duration::from_secs(10),
        &basic_auth(ADMIN.0, ADMIN.1),
        Some("shop".into()),
        None,
    )
    .expect("a client");
    let no_flux = flux
        .observe(
            Provider::Istio,
            &metric(
                r#"from(bucket: "mesh") |> range(start: -{{ interval }})"#,
                5.0,
            ),
            &ctx("a", None),
        )
        .await;
    expect_query_error(no_flux, "flux-enabled");
    let without_org = influx
        .observe(
            Provider::Istio,
            &metric(
                r#"from(bucket: "mesh") |> range(start: -{{ interval }})"#,
                5.0,
            ),
            &ctx("a", None),
        )
        .await;
    expect_query_error(without_org, "put `org` in the MetricTemplate's Secret");

    let wrong_password = InfluxDb::new(
        &server.url(),
        Duration::from_secs(10),
        &basic_auth(ADMIN.0, "rotated"),
        None,
        None,
    )
    .expect("a client")
    .observe(Provider::Istio, &metric(ERROR_RATE, 5.0), &ctx("a", None))
    .await;
    assert!(
        matches!(
            wrong_password,
            Err(ProviderError::Unauthorized { status: 401, .. })
        ),
        "{wrong_password:?}"
    );
    server.stop();
    let gone = influx
        .observe(Provider::Istio, &metric(ERROR_RATE, 5.0), &ctx("a", None))
        .await;
    assert!(
        matches!(&gone, Err(ProviderError::Unreachable { url, .. }) if *url == server.url()),
        "{gone:?}"
    );
}

/// What the Flux stand-in was asked: the `org` parameter, the Authorization header and the JSON body.
type Asked = Arc<Mutex<Vec<(String, String, Value)>>>;

/// InfluxDB 2's query API as its documentation describes it (`POST /api/v2/query?org=...`,
/// `Authorization: Token ...`, a JSON body with `query` and `type: flux`, CSV back; 401 with
/// `{"code": "unauthorized", "message": ...}`), played on a free loopback port: there is no InfluxDB 2 here.
async fn start_flux_stand_in(asked: Asked, answer: &'static str) -> SocketAddr {
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new()
        .route(
            "/api/v2/query",
            axum::routing::post(
                move |State(asked): State<Asked>,
                      Query(params): Query<BTreeMap<String, String>>,
                      headers: HeaderMap,
                      body: String| async move {
                    let authorization = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let org = params.get("org").cloned().unwrap_or_default();
                    if let Ok(mut asked) = asked.lock() {
                        asked.push((org, authorization.clone(), json));
                    }
                    if authorization != "Token t0ken" {
                        return (
                            StatusCode::UNAUTHORIZED,
                            r#"{"code":"unauthorized","message":"unauthorized access"}"#.to_owned(),
                        );
                    }
                    (StatusCode::OK, answer.to_owned())
                },
            ),
        )
        .with_state(asked);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test]
async fn flux_queries_follow_influxdb_2s_documented_api() {
    let asked: Asked = Arc::default();
    let answer = ",result,table,_start,_stop,_value,workload\r\n\
                  ,_result,0,2026-12-07T17:00:00Z,2026-12-07T17:00:30Z,0.4,web\r\n\r\n";
    let addr = start_flux_stand_in(asked.clone(), answer).await;
    let token = ServerAccess {
        auth: Some(Auth::Bearer("t0ken".into())),
        ..ServerAccess::default()
    };
    let flux = InfluxDb::new(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        &token,
        Some("shop-org".into()),
        None,
    )
    .expect("a client");
    let query = r#"from(bucket: "mesh") |> range(start: -{{ interval }}) |> filter(fn: (r) => r.workload == "{{ target }}") |> mean()"#;
    let observed = flux
        .observe(
            Provider::Istio,
            &metric(query, 1.0),
            &ctx("web", Some(Duration::from_secs(45))),
        )
        .await
        .expect("measured");
    assert_eq!(
        (observed.verdict, observed.value),
        (Verdict::Pass, Some(0.4))
    );
    let asked = asked.lock().map(|a| a.clone()).unwrap_or_default();
    let [(org, authorization, body)] = asked.as_slice() else {
        panic!("one query expected: {asked:?}");
    };
    assert_eq!(org, "shop-org");
    assert_eq!(authorization, "Token t0ken");
    assert_eq!(body["type"], "flux");
    assert_eq!(
        body["query"],
        r#"from(bucket: "mesh") |> range(start: -45s) |> filter(fn: (r) => r.workload == "web") |> mean()"#
    );

    let refused = InfluxDb::new(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        &ServerAccess {
            auth: Some(Auth::Bearer("old".into())),
            ..ServerAccess::default()
        },
        Some("shop-org".into()),
        None,
    )
    .expect("a client")
    .observe(Provider::Istio, &metric(query, 1.0), &ctx("web", None))
    .await;
    assert!(
        matches!(
            refused,
            Err(ProviderError::Unauthorized { status: 401, .. })
        ),
        "{refused:?}"
    );
}

/// `provider.database` is InfluxQL's `db`, so a query may name its measurement alone (as InfluxDB 2 and 3's
/// `/query` require).
#[tokio::test]
async fn the_database_is_sent_as_db() {
    let (server, _) = started().await;
    traffic(&server, "web", (20, 0), 100, 4).await;
    let unqualified = r#"SELECT sum("errors") / sum("total") * 100 FROM "requests"
        WHERE "workload" = '{{ target }}' AND time > now() - {{ interval }}"#;
    let with_db = InfluxDb::new(
        &server.url(),
        Duration::from_secs(10),
        &basic_auth(ADMIN.0, ADMIN.1),
        None,
        Some(DATABASE.into()),
    )
    .expect("a client");
    let observed = with_db
        .observe(
            Provider::Istio,
            &metric(unqualified, 5.0),
            &ctx("web", None),
        )
        .await
        .expect("measured");
    assert_eq!(
        (observed.verdict, observed.value),
        (Verdict::Pass, Some(4.0))
    );
    let without_db = InfluxDb::new(
        &server.url(),
        Duration::from_secs(10),
        &basic_auth(ADMIN.0, ADMIN.1),
        None,
        None,
    )
    .expect("a client")
    .observe(
        Provider::Istio,
        &metric(unqualified, 5.0),
        &ctx("web", None),
    )
    .await;
    assert!(
        matches!(&without_db, Err(ProviderError::Query { reason, .. }) if reason.contains("database name required")),
        "{without_db:?}"
    );
}
