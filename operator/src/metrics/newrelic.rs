//! New Relic, as Flagger's `newrelic` MetricTemplate provider reaches it: NRQL through NerdGraph (`POST` to the
//! GraphQL endpoint with `API-Key`), or through the older Insights query API (`GET /v1/accounts/ID/query` with
//! `X-Query-Key`) when the Secret holds a query key instead. Sluice owns the time range: it appends
//! `SINCE <window> SECONDS AGO` (the metric's window cut to the stage), as Flagger appends the metric's interval.
//! Tested against New Relic's documented request and response shapes on a loopback stand-in: there is no New
//! Relic to run here.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Observation, ProviderError, QueryContext, ServerAccess};
use crate::api::{Metric, Provider};

/// NerdGraph, New Relic's GraphQL API (US region; EU accounts set `https://api.eu.newrelic.com/graphql`).
pub const DEFAULT_NERDGRAPH_ADDRESS: &str = "https://api.newrelic.com/graphql";
/// The Insights query API (US region; EU: `https://insights-api.eu.newrelic.com`).
pub const DEFAULT_INSIGHTS_ADDRESS: &str = "https://insights-api.newrelic.com";

/// How Sluice authenticates to New Relic, which also picks the API.
#[derive(Clone)]
pub enum NewRelicKey {
    /// A user key (`newrelic_api_key`): NerdGraph.
    User(String),
    /// An Insights query key (`newrelic_query_key`): the Insights query API.
    InsightsQuery(String),
}

/// A New Relic account.
#[derive(Clone)]
pub struct NewRelic {
    http: reqwest::Client,
    url: String,
    account: u64,
    key: NewRelicKey,
}

impl std::fmt::Debug for NewRelic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRelic")
            .field("url", &self.url)
            .field("account", &self.account)
            .finish()
    }
}

impl NewRelic {
    /// A client for `account`; `address` defaults to the API `key` selects. `access` brings extra headers and TLS
    /// trust (its credentials are unused: New Relic takes its keys in headers of its own).
    pub fn new(
        address: Option<&str>,
        timeout: Duration,
        access: &ServerAccess,
        account: u64,
        key: NewRelicKey,
    ) -> Result<Self, ProviderError> {
        let url = address.unwrap_or(match key {
            NewRelicKey::User(_) => DEFAULT_NERDGRAPH_ADDRESS,
            NewRelicKey::InsightsQuery(_) => DEFAULT_INSIGHTS_ADDRESS,
        });
        let http = super::prometheus::http_client(url, timeout, access)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            account,
            key,
        })
    }

    /// Measures `metric` (its NRQL, rendered, over its window) and judges it; with `primaryComparison`, the same
    /// query about the primary too. `minRequests` does not apply: there is no request count.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        super::observe_one_number(
            provider,
            metric,
            ctx,
            |query, window| since(&query, window),
            |query: String, _| async move { self.value(&metric.name, &query).await },
        )
        .await
    }

    async fn value(&self, metric: &str, nrql: &str) -> Result<Option<f64>, ProviderError> {
        let request = match &self.key {
            NewRelicKey::User(key) => self
                .http
                .post(&self.url)
                .header("API-Key", key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(
                    json!({
                        "query": "query($account: Int!, $nrql: Nrql!) { actor { account(id: $account) { nrql(query: $nrql) { results } } } }",
                        "variables": {"account": self.account, "nrql": nrql},
                    })
                    .to_string(),
                ),
            NewRelicKey::InsightsQuery(key) => self
                .http
                .get(format!("{}/v1/accounts/{}/query", self.url, self.account))
                .header("X-Query-Key", key)
                .query(&[("nrql", nrql)]),
        };
        let unreachable = |reason: String| ProviderError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let (status, body) = super::prometheus::exchange(request, &self.url).await?;
        let query_error = |reason: String| ProviderError::Query {
            metric: Some(metric.to_owned()),
            query: nrql.to_owned(),
            reason,
        };
        match status {
            200 => {}
            401 | 403 => {
                return Err(ProviderError::Unauthorized {
                    url: self.url.clone(),
                    status,
                    detail: error_message(&body),
                });
            }
            400 => return Err(query_error(error_message(&body))),
            other => {
                return Err(unreachable(format!(
                    "HTTP {other}: {}",
                    error_message(&body)
                )));
            }
        }
        let json: Value = serde_json::from_str(&body).map_err(|e| ProviderError::BadResponse {
            url: self.url.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        // NerdGraph answers 200 with `errors` for a query it refuses (NRQL syntax, unknown account, key scope).
        if let Some(errors) = json.get("errors").and_then(Value::as_array)
            && !errors.is_empty()
        {
            let messages: Vec<&str> = errors
                .iter()
                .filter_map(|e| e.get("message").and_then(Value::as_str))
                .collect();
            return Err(query_error(messages.join("; ")));
        }
        let results = match self.key {
            NewRelicKey::User(_) => json.pointer("/data/actor/account/nrql/results"),
            NewRelicKey::InsightsQuery(_) => json.get("results"),
        };
        let results =
            results
                .and_then(Value::as_array)
                .ok_or_else(|| ProviderError::BadResponse {
                    url: self.url.clone(),
                    reason: "no NRQL results in the answer".into(),
                })?;
        results_value(results).map_err(query_error)
    }
}

/// The NRQL with Sluice's range appended (Flagger's templates leave it out, and a `SINCE` of their own would
/// reach back past the stage).
fn since(nrql: &str, window: Duration) -> String {
    format!(
        "{} SINCE {} SECONDS AGO",
        nrql.trim_end(),
        window.as_secs().max(1)
    )
}

/// `{"error": ...}` (Insights), `{"errors": [{"message": ...}]}` (NerdGraph), or the text as it came.
fn error_message(body: &str) -> String {
    let json: Option<Value> = serde_json::from_str(body).ok();
    json.as_ref()
        .and_then(|j| {
            j.get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| {
                    j.pointer("/errors/0/message")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
        })
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

/// The one number of NRQL results: one row (a `FACET` or `TIMESERIES` makes several, an error) holding one
/// value, either a number (`{"count": 12}`) or an object of one number (`{"percentile.duration": {"95": 0.3}}`).
/// No row, or a null value, is no data.
fn results_value(results: &[Value]) -> Result<Option<f64>, String> {
    let [row] = results else {
        return match results.len() {
            0 => Ok(None),
            n => Err(format!(
                "the query returned {n} rows; a check reads one number: drop FACET or TIMESERIES"
            )),
        };
    };
    let fields = row
        .as_object()
        .ok_or("an NRQL result row is not an object")?;
    let [(name, value)] = fields.iter().collect::<Vec<_>>()[..] else {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        return Err(format!(
            "the query selects {} values ({}); select one",
            names.len(),
            names.join(", ")
        ));
    };
    let value = match value {
        Value::Object(inner) if inner.len() == 1 => inner.values().next().unwrap_or(&Value::Null),
        other => other,
    };
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        other => Err(format!("{name} is {other}, not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_appends_the_window() {
        assert_eq!(
            since(
                "SELECT count(*) FROM Transaction  \n",
                Duration::from_millis(1500)
            ),
            "SELECT count(*) FROM Transaction SINCE 1 SECONDS AGO"
        );
    }

    #[test]
    fn one_row_of_one_number_is_the_value() {
        assert_eq!(
            results_value(&[json!({"percentage": 1.25})]),
            Ok(Some(1.25))
        );
        assert_eq!(
            results_value(&[json!({"percentile.duration": {"95": 0.3}})]),
            Ok(Some(0.3))
        );
        assert_eq!(results_value(&[]), Ok(None));
        assert_eq!(
            results_value(&[json!({"average.duration": null})]),
            Ok(None)
        );
    }

    #[test]
    fn anything_but_one_number_is_an_error_that_says_why() {
        let facets = [
            json!({"count": 1, "facet": "a"}),
            json!({"count": 2, "facet": "b"}),
        ];
        assert!(results_value(&facets).is_err_and(|e| e.contains("2 rows")));
        let two = [json!({"count": 1, "average.duration": 0.2})];
        assert!(results_value(&two).is_err_and(|e| e.contains("2 values")));
        assert!(results_value(&[json!({"count": "many"})]).is_err());
        assert!(results_value(&[json!(3)]).is_err());
    }

    #[test]
    fn error_bodies_of_both_apis_are_read() {
        assert_eq!(
            error_message(r#"{"error": "NRQL Syntax Error"}"#),
            "NRQL Syntax Error"
        );
        assert_eq!(
            error_message(r#"{"errors": [{"message": "Invalid API key"}]}"#),
            "Invalid API key"
        );
    }
}
