//! Graphite's render API (`GET /render?format=json`), as Flagger's `graphite` MetricTemplate provider uses it: a
//! template's query is the render parameters (`target=...`), and the value is the last non-null point. Sluice
//! owns the time range: `from` and `until` are the metric's window cut to the stage, whatever the query says,
//! so a check never counts traffic from before the revision on trial. Tested against Debian's graphite-web.

use std::time::Duration;

use serde_json::Value;

use super::{Observation, ProviderError, QueryContext, ServerAccess};
use crate::api::{Metric, Provider};

/// A graphite-web (or compatible) render API.
#[derive(Clone)]
pub struct Graphite {
    http: reqwest::Client,
    url: String,
}

impl std::fmt::Debug for Graphite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graphite").field("url", &self.url).finish()
    }
}

/// Render parameters Sluice sets itself.
const OWNED_PARAMETERS: [&str; 5] = ["format", "from", "until", "now", "noCache"];

impl Graphite {
    /// A client for the render API under `url` (e.g. `http://graphite.monitoring` or
    /// `https://example.com/graphite`), with `access`'s credentials, headers and TLS trust.
    pub fn new(url: &str, timeout: Duration, access: &ServerAccess) -> Result<Self, ProviderError> {
        let http = super::prometheus::http_client(url, timeout, access)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// Measures `metric` (its `query`, rendered) over its window and judges it; with `primaryComparison`, the
    /// same query about the primary too. `minRequests` does not apply: a render gives no request count.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        super::observe_one_number(provider, metric, ctx, |query, _| query, |query: String, window| async move {
            self.last_point(&metric.name, &query, window).await
        })
        .await
    }

    /// Renders `query` over the last `window` and reads its last non-null point.
    async fn last_point(
        &self,
        metric: &str,
        query: &str,
        window: Duration,
    ) -> Result<Option<f64>, ProviderError> {
        let parameters = render_parameters(query, window).ok_or_else(|| ProviderError::Query {
            metric: Some(metric.to_owned()),
            query: query.to_owned(),
            reason: "it is not render parameters such as target=...&target=...".into(),
        })?;
        let unreachable = |reason: String| ProviderError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let request = self
            .http
            .get(format!("{}/render", self.url))
            .query(&parameters);
        let (status, body) = super::prometheus::exchange(request, &self.url).await?;
        let bad_response = |reason: String| ProviderError::BadResponse {
            url: self.url.clone(),
            reason,
        };
        match status {
            200 => {
                let json: Value = serde_json::from_str(&body).map_err(|e| {
                    bad_response(format!("not render JSON ({e}): {}", first_line(&body)))
                })?;
                last_point(&json).map_err(|unread| match unread {
                    Unread::Malformed(reason) => bad_response(reason),
                    Unread::Several(targets) => ProviderError::NotOneSeries {
                        metric: Some(metric.to_owned()),
                        query: query.to_owned(),
                        series: targets.len(),
                        sample: targets.join(", "),
                    },
                })
            }
            401 | 403 => Err(ProviderError::Unauthorized {
                url: self.url.clone(),
                status,
                detail: first_line(&body),
            }),
            // graphite-web answers a query it cannot evaluate with 400 or 500 and the reason.
            400 | 500 => Err(ProviderError::Query {
                metric: Some(metric.to_owned()),
                query: query.to_owned(),
                reason: first_line(&body),
            }),
            other => Err(unreachable(format!("HTTP {other}: {}", first_line(&body)))),
        }
    }
}

/// The query's parameters with Sluice's time range and format in place of any the query had.
/// `None` when the query cannot be read as URL parameters.
fn render_parameters(query: &str, window: Duration) -> Option<Vec<(String, String)>> {
    let written = query.split_whitespace().collect::<Vec<_>>().join(" ");
    // Parsed as a URL's query, as Flagger does; the base is only there to make it a URL.
    let parsed = reqwest::Url::parse(&format!("http://graphite.invalid/render?{written}")).ok()?;
    let mut parameters: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(name, _)| !OWNED_PARAMETERS.contains(&name.as_ref()))
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    parameters.push(("from".into(), format!("-{}s", window.as_secs().max(1))));
    parameters.push(("until".into(), "now".into()));
    parameters.push(("format".into(), "json".into()));
    // graphite-web caches answers by their parameters, relative `from` included: a cached answer to the same
    // query from the previous stage would reach back past this one.
    parameters.push(("noCache".into(), "true".into()));
    Some(parameters)
}

/// Why a render answer gave no value.
#[derive(Debug, PartialEq)]
enum Unread {
    Malformed(String),
    /// The targets of the series, when there were several.
    Several(Vec<String>),
}

impl From<&str> for Unread {
    fn from(reason: &str) -> Self {
        Self::Malformed(reason.to_owned())
    }
}

/// The last non-null point of the one series in a render answer (`[{"target", "datapoints": [[v, t], ...]}]`).
/// No series, or only nulls, is no data; several series are an error, as for Prometheus: a query must reduce
/// to one number (with `sumSeries`, `asPercent`...), or the check would judge whichever series came last.
fn last_point(json: &Value) -> Result<Option<f64>, Unread> {
    let series = json
        .as_array()
        .ok_or("Graphite's answer is not a list of series")?;
    let Some(only) = series.first() else {
        return Ok(None);
    };
    if series.len() > 1 {
        return Err(Unread::Several(
            series
                .iter()
                .map(|s| {
                    s.get("target")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                })
                .collect(),
        ));
    }
    let points = only
        .get("datapoints")
        .and_then(Value::as_array)
        .ok_or("Graphite's series has no datapoints list")?;
    let mut last = None;
    for point in points {
        let value = point
            .get(0)
            .ok_or("a Graphite datapoint is not [value, time]")?;
        let number = match value {
            Value::Null => None,
            Value::Number(n) => n.as_f64(),
            // Some Graphite-compatible servers quote their numbers.
            Value::String(s) => Some(s.parse::<f64>().map_err(|_| {
                Unread::Malformed(format!("a Graphite datapoint value {s:?} is not a number"))
            })?),
            other => {
                return Err(Unread::Malformed(format!(
                    "a Graphite datapoint value {other} is not a number"
                )));
            }
        };
        if number.is_some() {
            last = number;
        }
    }
    Ok(last)
}

fn first_line(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sluice_owns_the_time_range_and_the_format() {
        let parameters = render_parameters(
            "target=asPercent(sumSeries(a.{{x}}), sumSeries(b))&from=-1h&until=-5min\n  &format=png&maxDataPoints=1",
            Duration::from_secs(42),
        );
        assert_eq!(
            parameters.as_deref(),
            Some(
                &[
                    ("target", "asPercent(sumSeries(a.{{x}}), sumSeries(b))"),
                    ("maxDataPoints", "1"),
                    ("from", "-42s"),
                    ("until", "now"),
                    ("format", "json"),
                    ("noCache", "true"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))[..]
            )
        );
    }

    #[test]
    fn several_targets_are_kept_in_order() {
        let parameters =
            render_parameters("target=a&target=b", Duration::from_millis(300)).unwrap_or_default();
        assert_eq!(parameters[0], ("target".into(), "a".into()));
        assert_eq!(parameters[1], ("target".into(), "b".into()));
        assert_eq!(parameters[2], ("from".into(), "-1s".into()));
    }

    #[test]
    fn the_value_is_the_last_non_null_point() {
        let answer = json!([{"target": "x", "datapoints": [[1.0, 10], [2.5, 20], [null, 30]]}]);
        assert_eq!(last_point(&answer), Ok(Some(2.5)));
        let quoted = json!([{"target": "x", "datapoints": [["3.5", 10]]}]);
        assert_eq!(last_point(&quoted), Ok(Some(3.5)));
    }

    #[test]
    fn no_series_or_only_nulls_is_no_data() {
        assert_eq!(last_point(&json!([])), Ok(None));
        let nulls = json!([{"target": "x", "datapoints": [[null, 10], [null, 20]]}]);
        assert_eq!(last_point(&nulls), Ok(None));
        let empty = json!([{"target": "x", "datapoints": []}]);
        assert_eq!(last_point(&empty), Ok(None));
    }

    #[test]
    fn several_series_or_malformed_answers_are_errors() {
        let two = json!([{"target": "a", "datapoints": [[1, 1]]}, {"target": "b", "datapoints": [[2, 1]]}]);
        assert_eq!(
            last_point(&two),
            Err(Unread::Several(vec!["a".into(), "b".into()]))
        );
        for bad in [
            json!({"target": "x"}),
            json!([{"target": "x"}]),
            json!([{"target": "x", "datapoints": [[]]}]),
            json!([{"target": "x", "datapoints": [["many", 1]]}]),
            json!([{"target": "x", "datapoints": [[true, 1]]}]),
        ] {
            assert!(
                matches!(last_point(&bad), Err(Unread::Malformed(_))),
                "{bad}"
            );
        }
    }
}
