//! Sluice's New Relic provider against New Relic's documented request and response shapes, played on a loopback
//! stand-in (there is no New Relic to run here): NerdGraph (`POST` GraphQL with `API-Key`, the NRQL in the
//! `nrql` field of `actor.account(id)`, results under `data.actor.account.nrql.results`, refusals as `errors`
//! with status 200) and the Insights query API (`GET /v1/accounts/ID/query?nrql=` with `X-Query-Key`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sluice::api::{Metric, NoDataPolicy, Provider, ThresholdRange, Verdict};
use sluice::metrics::{NewRelic, NewRelicKey, ProviderError, QueryContext, ServerAccess};

const ACCOUNT: u64 = 1234567;

#[derive(Default)]
struct StandIn {
    /// The NRQL of every query, as received.
    asked: Mutex<Vec<String>>,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The results New Relic would give for `nrql`: a percentage picked by the workload it names, two rows for a
/// FACET, nothing for an idle workload, and a syntax error for a misspelt SELECT.
fn results_for(nrql: &str) -> Result<Value, String> {
    if nrql.starts_with("SELEC ") {
        return Err("NRQL Syntax Error: Error at line 1 position 1, unexpected 'SELEC'".into());
    }
    Ok(if nrql.contains("FACET") {
        json!([{"facet": "a", "percentage": 1.0}, {"facet": "b", "percentage": 2.0}])
    } else if nrql.contains("'idle'") {
        json!([{"percentage": null}])
    } else if nrql.contains("'bad'") {
        json!([{"percentage": 7.5}])
    } else {
        json!([{"percentage": 0.5}])
    })
}

async fn start_stand_in(state: Arc<StandIn>) -> SocketAddr {
    async fn nerdgraph(
        State(state): State<Arc<StandIn>>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, axum::Json<Value>) {
        if header(&headers, "api-key") != "NRAK-user" {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"errors": [{"message": "Invalid API key"}]})),
            );
        }
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let graphql = body["query"].as_str().unwrap_or_default();
        if !graphql.contains("account(id: $account)") || body["variables"]["account"] != ACCOUNT {
            return (
                StatusCode::OK,
                axum::Json(json!({"errors": [{"message": format!("unexpected request {body}")}]})),
            );
        }
        let nrql = body["variables"]["nrql"].as_str().unwrap_or_default();
        if let Ok(mut asked) = state.asked.lock() {
            asked.push(nrql.to_owned());
        }
        match results_for(nrql) {
            Ok(results) => (
                StatusCode::OK,
                axum::Json(json!({"data": {"actor": {"account": {"nrql": {"results": results}}}}})),
            ),
            Err(message) => (
                StatusCode::OK,
                axum::Json(json!({"data": {"actor": {"account": {"nrql": null}}},
                                   "errors": [{"message": message}]})),
            ),
        }
    }
    async fn insights(
        State(state): State<Arc<StandIn>>,
        Path(account): Path<u64>,
        headers: HeaderMap,
        Query(params): Query<BTreeMap<String, String>>,
    ) -> (StatusCode, axum::Json<Value>) {
        if header(&headers, "x-query-key") != "NRIQ-query" || account != ACCOUNT {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(json!({"error": "Invalid query key"})),
            );
        }
        let nrql = params.get("nrql").cloned().unwrap_or_default();
        if let Ok(mut asked) = state.asked.lock() {
            asked.push(nrql.clone());
        }
        match results_for(&nrql) {
            Ok(results) => (StatusCode::OK, axum::Json(json!({"results": results}))),
            Err(message) => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": message})),
            ),
        }
    }
    let app = axum::Router::new()
        .route("/graphql", axum::routing::post(nerdgraph))
        .route("/v1/accounts/{account}/query", axum::routing::get(insights))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn ctx(target: &str) -> QueryContext {
    QueryContext {
        namespace: "shop".into(),
        target: target.into(),
        service: target.into(),
        interval: "1m".into(),
        variables: BTreeMap::new(),
        statefulset: false,
        stage_age: Some(Duration::from_secs(45)),
        waypoint: false,
    }
}

fn metric(query: &str) -> Metric {
    Metric {
        name: "errors".into(),
        query: Some(query.into()),
        threshold_range: ThresholdRange {
            min: None,
            max: Some(1.0),
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

const ERROR_RATE: &str = "SELECT percentage(count(*), WHERE error IS true) FROM Transaction WHERE appName = '{{ target }}'";

fn client(addr: &str, key: NewRelicKey) -> NewRelic {
    NewRelic::new(
        Some(addr),
        Duration::from_secs(5),
        &ServerAccess::default(),
        ACCOUNT,
        key,
    )
    .expect("a New Relic client")
}

#[tokio::test]
async fn nerdgraph_checks_send_the_nrql_with_sluices_window_and_judge_the_one_number() {
    let state = Arc::new(StandIn::default());
    let addr = start_stand_in(state.clone()).await;
    let newrelic = client(
        &format!("http://{addr}/graphql"),
        NewRelicKey::User("NRAK-user".into()),
    );
    let good = newrelic
        .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("good"))
        .await
        .expect("measured");
    assert_eq!((good.verdict, good.value), (Verdict::Pass, Some(0.5)));
    assert_eq!(
        state.asked.lock().map(|a| a.clone()).unwrap_or_default(),
        [
            "SELECT percentage(count(*), WHERE error IS true) FROM Transaction WHERE appName = 'good' SINCE 45 SECONDS AGO"
        ],
        "the window is the stage's 45 s, not the metric's minute"
    );
    let bad = newrelic
        .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("bad"))
        .await
        .expect("measured");
    assert_eq!((bad.verdict, bad.value), (Verdict::Fail, Some(7.5)));
    let idle = newrelic
        .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("idle"))
        .await
        .expect("measured");
    assert_eq!((idle.verdict, idle.value), (Verdict::NoData, None));

    let facet = newrelic
        .observe(
            Provider::Istio,
            &metric(
                "SELECT percentage(count(*), WHERE error IS true) FROM Transaction FACET appName",
            ),
            &ctx("good"),
        )
        .await;
    assert!(
        matches!(&facet, Err(ProviderError::Query { reason, .. }) if reason.contains("2 rows")),
        "{facet:?}"
    );
    let typo = newrelic
        .observe(
            Provider::Istio,
            &metric("SELEC count(*) FROM Transaction"),
            &ctx("good"),
        )
        .await;
    assert!(
        matches!(&typo, Err(ProviderError::Query { reason, .. }) if reason.contains("NRQL Syntax Error")),
        "{typo:?}"
    );
    let wrong_key = client(
        &format!("http://{addr}/graphql"),
        NewRelicKey::User("NRAK-revoked".into()),
    )
    .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("good"))
    .await;
    assert!(
        matches!(
            wrong_key,
            Err(ProviderError::Unauthorized { status: 401, .. })
        ),
        "{wrong_key:?}"
    );
}

#[tokio::test]
async fn an_insights_query_key_uses_the_insights_api() {
    let state = Arc::new(StandIn::default());
    let addr = start_stand_in(state.clone()).await;
    let insights = client(
        &format!("http://{addr}"),
        NewRelicKey::InsightsQuery("NRIQ-query".into()),
    );
    let bad = insights
        .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("bad"))
        .await
        .expect("measured");
    assert_eq!((bad.verdict, bad.value), (Verdict::Fail, Some(7.5)));
    assert!(
        state.asked.lock().is_ok_and(|a| a
            .iter()
            .all(|q| q.ends_with("appName = 'bad' SINCE 45 SECONDS AGO"))),
        "{:?}",
        state.asked.lock().map(|a| a.clone())
    );
    let typo = insights
        .observe(
            Provider::Istio,
            &metric("SELEC count(*) FROM Transaction"),
            &ctx("bad"),
        )
        .await;
    assert!(
        matches!(&typo, Err(ProviderError::Query { reason, .. }) if reason.contains("NRQL Syntax Error")),
        "{typo:?}"
    );
    let wrong_key = client(
        &format!("http://{addr}"),
        NewRelicKey::InsightsQuery("NRIQ-old".into()),
    )
    .observe(Provider::Istio, &metric(ERROR_RATE), &ctx("bad"))
    .await;
    assert!(
        matches!(
            wrong_key,
            Err(ProviderError::Unauthorized { status: 403, .. })
        ),
        "{wrong_key:?}"
    );
}
