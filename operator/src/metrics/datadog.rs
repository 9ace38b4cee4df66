//! Datadog's metrics query API (`GET /api/v1/query`), as Flagger's `datadog` MetricTemplate provider uses it:
//! the last point of the first series is the value. Only the documented request and response shapes are tested
//! here (against a loopback stand-in); there is no Datadog to run on this machine.

use std::time::Duration;

use serde_json::Value;

use super::{Observation, ProviderError, QueryContext, ServerAccess};
use crate::api::{Metric, Provider};

/// Where Datadog's API lives unless a template says otherwise.
pub const DEFAULT_DATADOG_ADDRESS: &str = "https://api.datadoghq.com";

/// A Datadog site reached with an API key and an application key.
#[derive(Clone)]
pub struct Datadog {
    http: reqwest::Client,
    url: String,
    api_key: String,
    application_key: String,
}

impl std::fmt::Debug for Datadog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datadog").field("url", &self.url).finish()
    }
}

impl Datadog {
    /// A client for the Datadog API at `url`; `access` brings extra headers and TLS trust (its credentials are
    /// unused: Datadog takes its keys in headers of its own).
    pub fn new(
        url: &str,
        timeout: Duration,
        access: &ServerAccess,
        api_key: String,
        application_key: String,
    ) -> Result<Self, ProviderError> {
        let http = super::prometheus::http_client(url, timeout, access)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            api_key,
            application_key,
        })
    }

    /// Measures `metric` (its `query`, rendered) over its window and judges it; with `primaryComparison`, the
    /// same query about the primary too. `minRequests` does not apply: Datadog gives no request count.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        let now = jiff::Timestamp::now().as_second();
        super::observe_one_number(provider, metric, ctx, |query, _| query, |query: String, window| async move {
            self.instant(&metric.name, &query, window, now).await
        })
        .await
    }

    /// The base URL this client queries.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Evaluates `query` over the `window` that ends at `now` (Unix seconds).
    pub async fn instant(
        &self,
        metric: &str,
        query: &str,
        window: Duration,
        now: i64,
    ) -> Result<Option<f64>, ProviderError> {
        let from = now - i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX);
        let request = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[
                ("from", from.to_string()),
                ("to", now.to_string()),
                ("query", query.to_owned()),
            ])
            .header("DD-API-KEY", &self.api_key)
            .header("DD-APPLICATION-KEY", &self.application_key);
        let (status, body) = super::prometheus::exchange(request, &self.url).await?;
        match status {
            401 | 403 => Err(ProviderError::Unauthorized {
                url: self.url.clone(),
                status,
                detail: errors_of(&body),
            }),
            400 => Err(ProviderError::Query {
                metric: Some(metric.to_owned()),
                query: query.to_owned(),
                reason: errors_of(&body),
            }),
            200 => {
                let json: Value =
                    serde_json::from_str(&body).map_err(|e| ProviderError::BadResponse {
                        url: self.url.clone(),
                        reason: format!("not JSON: {e}"),
                    })?;
                last_point(&json).map_err(|reason| ProviderError::BadResponse {
                    url: self.url.clone(),
                    reason,
                })
            }
            other => Err(ProviderError::Unreachable {
                url: self.url.clone(),
                reason: format!("HTTP {other}: {}", errors_of(&body)),
            }),
        }
    }
}

/// Datadog's `{"errors": [...]}`, or the body as it came.
fn errors_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("errors").cloned())
        .map_or_else(|| body.chars().take(200).collect(), |e| e.to_string())
}

/// The value of a `/api/v1/query` answer: the last point of the first series (Flagger's reading); no series
/// or no point is no data; an answer with `status: error` or without `series` is not Datadog's.
pub fn last_point(answer: &Value) -> Result<Option<f64>, String> {
    if answer.get("status").and_then(Value::as_str) == Some("error") {
        return Err(format!(
            "Datadog reported an error: {}",
            answer.get("error").unwrap_or(&Value::Null)
        ));
    }
    let series = answer
        .get("series")
        .and_then(Value::as_array)
        .ok_or("the answer has no series array")?;
    let Some(first) = series.first() else {
        return Ok(None);
    };
    let points = first
        .get("pointlist")
        .and_then(Value::as_array)
        .ok_or("the series has no pointlist")?;
    // A point is [timestamp in ms, value]; Datadog sends null for an empty interval.
    Ok(points
        .iter()
        .rev()
        .find_map(|p| p.get(1).and_then(Value::as_f64)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_value_is_the_last_point_of_the_first_series() {
        let answer = json!({"status": "ok", "series": [
            {"metric": "errors", "pointlist": [[1_700_000_000_000.0, 0.5], [1_700_000_010_000.0, 1.5]]},
            {"metric": "other", "pointlist": [[1_700_000_010_000.0, 99.0]]}
        ]});
        assert_eq!(last_point(&answer), Ok(Some(1.5)));
        let trailing_null = json!({"series": [{"pointlist": [[1.0, 2.0], [2.0, null]]}]});
        assert_eq!(last_point(&trailing_null), Ok(Some(2.0)));
    }

    #[test]
    fn no_series_or_points_is_no_data_and_garbage_is_an_error() {
        assert_eq!(last_point(&json!({"status": "ok", "series": []})), Ok(None));
        assert_eq!(
            last_point(&json!({"series": [{"pointlist": []}]})),
            Ok(None)
        );
        assert!(last_point(&json!({"status": "error", "error": "bad query"})).is_err());
        assert!(last_point(&json!({"data": []})).is_err());
        assert!(last_point(&json!({"series": [{"metric": "x"}]})).is_err());
    }
}
