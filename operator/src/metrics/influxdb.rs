//! InfluxDB, in both of its query languages:
//! - **Flux** (Flagger's `influxdb` provider): `POST /api/v2/query?org=ORG` with `Authorization: Token ...`; the
//!   answer is CSV, and the value is the last `_value` of the one table returned. InfluxDB 2 and 1.8+.
//! - **InfluxQL** (a query that starts with `SELECT`): `GET /query?q=...`, the API of InfluxDB 1.x (and of 2.x and 3
//!   through their compatibility endpoint); the value is the last non-null value of the one series returned.
//!
//! Neither language lets Sluice own the time range as it does for Graphite's and Datadog's: a query selects its
//! range with `{{ interval }}` (the metric's window cut to the stage, in seconds). InfluxQL is tested against
//! Debian's influxd 1.6; Flux against InfluxDB's documented request and response shapes.

use std::time::Duration;

use serde_json::{Value, json};

use super::prometheus::Auth;
use super::{Observation, ProviderError, QueryContext, ServerAccess};
use crate::api::{Metric, Provider};

/// An InfluxDB server.
#[derive(Clone)]
pub struct InfluxDb {
    http: reqwest::Client,
    url: String,
    /// The organization Flux queries run in (`org` in the Secret, as in Flagger).
    org: Option<String>,
    /// The database InfluxQL queries read (`db`).
    database: Option<String>,
}

impl std::fmt::Debug for InfluxDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfluxDb")
            .field("url", &self.url)
            .field("org", &self.org)
            .finish()
    }
}

/// Which language a query is written in: InfluxQL starts with `SELECT`; anything else is Flux.
fn is_influxql(query: &str) -> bool {
    query
        .trim_start()
        .get(..6)
        .is_some_and(|head| head.eq_ignore_ascii_case("select"))
}

impl InfluxDb {
    /// A client for the InfluxDB at `url`. A `token` from the Secret is sent as `Authorization: Token ...`
    /// (InfluxDB's scheme), `username`/`password` as basic auth (InfluxDB 1.x).
    pub fn new(
        url: &str,
        timeout: Duration,
        access: &ServerAccess,
        org: Option<String>,
        database: Option<String>,
    ) -> Result<Self, ProviderError> {
        let access = ServerAccess {
            auth: match &access.auth {
                Some(Auth::Bearer(token)) => Some(Auth::Token(token.clone())),
                other => other.clone(),
            },
            ..access.clone()
        };
        let http = super::prometheus::http_client(url, timeout, &access)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            org,
            database,
        })
    }

    /// Measures `metric` (its `query`, rendered) and judges it; with `primaryComparison`, the same query about
    /// the primary too. `minRequests` does not apply: there is no request count.
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
            |query, _| query,
            |query: String, _| async move { self.value(&metric.name, &query).await },
        )
        .await
    }

    /// Runs `query` in its language and reads its one number.
    async fn value(&self, metric: &str, query: &str) -> Result<Option<f64>, ProviderError> {
        let influxql = is_influxql(query);
        let request = if influxql {
            let mut parameters = vec![("q", query), ("epoch", "s")];
            if let Some(database) = &self.database {
                parameters.push(("db", database));
            }
            self.http
                .get(format!("{}/query", self.url))
                .query(&parameters)
        } else {
            let org = self.org.as_deref().ok_or_else(|| ProviderError::Query {
                metric: Some(metric.to_owned()),
                query: query.to_owned(),
                reason: "a Flux query runs in an organization: put `org` in the MetricTemplate's Secret \
                         (or write the query in InfluxQL, starting with SELECT)"
                    .into(),
            })?;
            self.http
                .post(format!("{}/api/v2/query", self.url))
                .query(&[("org", org)])
                .header(reqwest::header::ACCEPT, "application/csv")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json!({"query": query, "type": "flux"}).to_string())
        };
        let unreachable = |reason: String| ProviderError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let (status, body) = super::prometheus::exchange(request, &self.url).await?;
        let bad_response = |reason: String| ProviderError::BadResponse {
            url: self.url.clone(),
            reason,
        };
        let query_error = |reason: String| ProviderError::Query {
            metric: Some(metric.to_owned()),
            query: query.to_owned(),
            reason,
        };
        let read = match status {
            200 if influxql => serde_json::from_str(&body)
                .map_err(|e| Unread::Malformed(format!("not InfluxQL's JSON: {e}")))
                .and_then(|json| influxql_value(&json)),
            200 => flux_value(&body),
            401 | 403 => {
                return Err(ProviderError::Unauthorized {
                    url: self.url.clone(),
                    status,
                    detail: error_message(&body),
                });
            }
            404 if !influxql => {
                return Err(query_error(
                    "this InfluxDB has no Flux API (/api/v2/query answered 404): InfluxDB 1.x needs 1.8 or \
                     later with flux-enabled = true, or write the query in InfluxQL (starting with SELECT)"
                        .into(),
                ));
            }
            400 | 404 | 422 => return Err(query_error(error_message(&body))),
            other => {
                return Err(unreachable(format!(
                    "HTTP {other}: {}",
                    error_message(&body)
                )));
            }
        };
        read.map_err(|unread| match unread {
            Unread::Malformed(reason) => bad_response(reason),
            Unread::Refused(reason) => query_error(reason),
            Unread::Several(series) => ProviderError::NotOneSeries {
                metric: Some(metric.to_owned()),
                query: query.to_owned(),
                series: series.len(),
                sample: series.join(", "),
            },
        })
    }
}

/// Why an answer gave no value.
#[derive(Debug, PartialEq)]
enum Unread {
    Malformed(String),
    /// The server evaluated the query and said why it failed.
    Refused(String),
    /// Names of the series, when there were several.
    Several(Vec<String>),
}

/// InfluxDB's error body: `{"error": ...}` (1.x), `{"code": ..., "message": ...}` (2.x), or the text as it came.
fn error_message(body: &str) -> String {
    let json: Option<Value> = serde_json::from_str(body).ok();
    json.as_ref()
        .and_then(|j| j.get("error").or_else(|| j.get("message")))
        .and_then(Value::as_str)
        .map_or_else(|| body.trim().chars().take(300).collect(), str::to_owned)
}

/// The value of an InfluxQL answer (`{"results": [{"series": [{"columns": ["time", "x"], "values": [[t, v]]}]}]}`):
/// the last non-null value of the one series; no series or only nulls is no data.
fn influxql_value(json: &Value) -> Result<Option<f64>, Unread> {
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        return Err(Unread::Refused(error.to_owned()));
    }
    let results = json
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| Unread::Malformed("no results in InfluxQL's answer".into()))?;
    let [result] = results.as_slice() else {
        return Err(Unread::Refused(format!(
            "the query has {} statements; a check runs one",
            results.len()
        )));
    };
    if let Some(error) = result.get("error").and_then(Value::as_str) {
        return Err(Unread::Refused(error.to_owned()));
    }
    let series = result
        .get("series")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(only) = series.first() else {
        return Ok(None);
    };
    if series.len() > 1 {
        return Err(Unread::Several(series.iter().map(series_name).collect()));
    }
    let columns: Vec<&str> = only
        .get("columns")
        .and_then(Value::as_array)
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let selected: Vec<usize> = (0..columns.len())
        .filter(|&i| columns[i] != "time")
        .collect();
    let [column] = selected.as_slice() else {
        return Err(Unread::Refused(format!(
            "the query selects {} columns ({}); a check reads one number: select one",
            selected.len(),
            columns.join(", ")
        )));
    };
    let rows = only
        .get("values")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut last = None;
    for row in rows {
        match row.get(column) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => last = n.as_f64(),
            Some(other) => {
                return Err(Unread::Refused(format!(
                    "column {} holds {other}, not a number",
                    columns[*column]
                )));
            }
        }
    }
    Ok(last)
}

/// A series' name and tags, e.g. `errors{workload=web}`.
fn series_name(series: &Value) -> String {
    let name = series.get("name").and_then(Value::as_str).unwrap_or("?");
    match series.get("tags").and_then(Value::as_object) {
        Some(tags) if !tags.is_empty() => {
            let tags: Vec<String> = tags
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            format!("{name}{{{}}}", tags.join(","))
        }
        _ => name.to_owned(),
    }
}

/// The value of a Flux answer (CSV: `,result,table,...,_value,...`; a new header starts each table of a new
/// shape): the last `_value` of the one table; no row or an empty `_value` is no data. Flagger reads the first
/// row and calls an empty answer 0, which would pass an error-rate check with no traffic.
fn flux_value(body: &str) -> Result<Option<f64>, Unread> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body.as_bytes());
    // Positions of the result, table and _value columns in the current table's header.
    let mut header: Option<(usize, usize, usize)> = None;
    let mut tables: Vec<String> = Vec::new();
    let mut last = None;
    for record in reader.records() {
        let record = record.map_err(|e| Unread::Malformed(format!("not Flux's CSV: {e}")))?;
        if record.iter().all(str::is_empty) {
            continue;
        }
        // InfluxDB reports an error that happens while it streams as a table of its own.
        if record.get(0) == Some("error") || record.get(1) == Some("error") {
            let mut rest = reader.records();
            let detail = rest
                .next()
                .and_then(Result::ok)
                .map(|r| r.iter().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            return Err(Unread::Refused(detail.trim().to_owned()));
        }
        let position = |name: &str| record.iter().position(|f| f == name);
        if let (Some(result), Some(table)) = (position("result"), position("table")) {
            let value = position("_value").ok_or_else(|| {
                Unread::Refused(
                    "the query's result has no _value column: keep _value (end with a reducer such as mean())"
                        .into(),
                )
            })?;
            header = Some((result, table, value));
            continue;
        }
        let Some((result_at, table_at, value_at)) = header else {
            return Err(Unread::Malformed(
                "Flux's CSV has rows before its header".into(),
            ));
        };
        // Each yield numbers its tables from 0: a table is its result's name and its number.
        let table = format!(
            "{}/{}",
            record.get(result_at).unwrap_or_default(),
            record.get(table_at).unwrap_or_default()
        );
        if !tables.contains(&table) {
            tables.push(table);
        }
        let value = record.get(value_at).unwrap_or_default();
        if !value.is_empty() {
            last = Some(
                value
                    .parse::<f64>()
                    .map_err(|_| Unread::Refused(format!("_value {value:?} is not a number")))?,
            );
        }
    }
    if tables.len() > 1 {
        return Err(Unread::Several(
            tables.into_iter().map(|t| format!("table {t}")).collect(),
        ));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_means_influxql() {
        assert!(is_influxql("  select sum(errors) FROM requests"));
        assert!(is_influxql("SELECT 1"));
        assert!(!is_influxql("from(bucket: \"mesh\") |> range(start: -30s)"));
        assert!(!is_influxql("sel"));
    }

    #[test]
    fn influxql_reads_the_last_non_null_value_of_one_series() {
        let answer = json!({"results": [{"statement_id": 0, "series": [{"name": "requests",
            "columns": ["time", "rate"], "values": [[1, 0.5], [2, 1.5], [3, null]]}]}]});
        assert_eq!(influxql_value(&answer), Ok(Some(1.5)));
        let empty = json!({"results": [{"statement_id": 0}]});
        assert_eq!(influxql_value(&empty), Ok(None));
    }

    #[test]
    fn influxql_refuses_what_is_not_one_number() {
        let two = json!({"results": [{"series": [
            {"name": "errors", "tags": {"workload": "a"}, "columns": ["time", "sum"], "values": [[1, 1]]},
            {"name": "errors", "tags": {"workload": "b"}, "columns": ["time", "sum"], "values": [[1, 2]]}]}]});
        assert_eq!(
            influxql_value(&two),
            Err(Unread::Several(vec![
                "errors{workload=a}".into(),
                "errors{workload=b}".into()
            ]))
        );
        let columns = json!({"results": [{"series": [{"name": "r", "columns": ["time", "a", "b"], "values": [[1, 1, 2]]}]}]});
        assert!(
            matches!(influxql_value(&columns), Err(Unread::Refused(r)) if r.contains("2 columns"))
        );
        let statements = json!({"results": [{"statement_id": 0}, {"statement_id": 1}]});
        assert!(
            matches!(influxql_value(&statements), Err(Unread::Refused(r)) if r.contains("2 statements"))
        );
        let error = json!({"results": [{"statement_id": 0, "error": "database not found: mesh"}]});
        assert_eq!(
            influxql_value(&error),
            Err(Unread::Refused("database not found: mesh".into()))
        );
        assert!(matches!(
            influxql_value(&json!({})),
            Err(Unread::Malformed(_))
        ));
    }

    #[test]
    fn flux_reads_the_last_value_of_one_table() {
        let body = ",result,table,_start,_stop,_value,workload\r\n\
                    ,_result,0,2026-12-07T17:00:00Z,2026-12-07T17:00:30Z,0.25,web\r\n\
                    ,_result,0,2026-12-07T17:00:30Z,2026-12-07T17:01:00Z,1.5,web\r\n\r\n";
        assert_eq!(flux_value(body), Ok(Some(1.5)));
        assert_eq!(flux_value(""), Ok(None));
        assert_eq!(flux_value("\r\n"), Ok(None));
        let no_value = ",result,table,_value\r\n,_result,0,\r\n";
        assert_eq!(flux_value(no_value), Ok(None));
    }

    #[test]
    fn flux_refuses_several_tables_errors_and_non_numbers() {
        let two = ",result,table,_value,workload\r\n,_result,0,1,a\r\n,_result,1,2,b\r\n";
        assert_eq!(
            flux_value(two),
            Err(Unread::Several(vec![
                "table _result/0".into(),
                "table _result/1".into()
            ]))
        );
        let two_yields =
            ",result,table,_value\r\n,errors,0,1\r\n\r\n,result,table,_value\r\n,requests,0,2\r\n";
        assert!(matches!(flux_value(two_yields), Err(Unread::Several(t)) if t.len() == 2));
        let no_value = ",result,table,_time\r\n,_result,0,2026-12-07T17:00:00Z\r\n";
        assert!(matches!(flux_value(no_value), Err(Unread::Refused(r)) if r.contains("no _value")));
        let streamed_error = "error,reference\r\nruntime error: division by zero,\r\n";
        assert!(
            matches!(flux_value(streamed_error), Err(Unread::Refused(r)) if r.contains("division by zero"))
        );
        let text = ",result,table,_value\r\n,_result,0,high\r\n";
        assert!(matches!(flux_value(text), Err(Unread::Refused(_))));
        let headless = ",_result,0,1.5\r\n";
        assert!(matches!(flux_value(headless), Err(Unread::Malformed(_))));
    }

    #[test]
    fn error_bodies_of_both_generations_are_read() {
        assert_eq!(
            error_message(r#"{"error":"error parsing query: found SELEC"}"#),
            "error parsing query: found SELEC"
        );
        assert_eq!(
            error_message(
                r#"{"code":"invalid","message":"compilation failed: undefined identifier x"}"#
            ),
            "compilation failed: undefined identifier x"
        );
        assert_eq!(error_message("  bad gateway \n"), "bad gateway");
    }
}
