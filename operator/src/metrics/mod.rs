//! Metric providers: a Rollout's `Metric` becomes PromQL, Prometheus answers with one number, and the number is
//! judged pass / fail / no-data.
//!
//! Everything here is pure except [`Prometheus`], the thin HTTP client. The rules users rely on:
//! - no data (empty result, NaN, ±Inf, fewer requests than `minRequests`) is never a pass ([`judge`]);
//! - an error (Prometheus unreachable, PromQL rejected, several series) is never a verdict: the caller freezes
//!   the rollout and retries, and rolls back only after the progress deadline.

mod azure;
mod builtin;
mod cloudwatch;
mod datadog;
mod graphite;
mod influxdb;
mod newrelic;
mod prometheus;
mod query;
mod verdict;

pub use azure::{EntraCredential, EntraSecret, EntraToken, azure_cloud};
pub use builtin::{MetricQueries, builtin};
pub use cloudwatch::{
    AwsCredentials, CloudWatch, cloudwatch_endpoint, operator_identity_may_sign_for,
};
pub use datadog::{DEFAULT_DATADOG_ADDRESS, Datadog};
pub use graphite::Graphite;
pub use influxdb::InfluxDb;
pub use newrelic::{DEFAULT_INSIGHTS_ADDRESS, DEFAULT_NERDGRAPH_ADDRESS, NewRelic, NewRelicKey};
pub use prometheus::{Auth, Prometheus, ProviderError, ServerAccess, install_crypto_provider};
pub use query::{QueryContext, QueryError, promql_duration, render, window};
pub use verdict::judge;

use std::time::Duration;

use crate::api::{Metric, Provider, Verdict};

/// The result of one check of one metric, as recorded in the Rollout's status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// The metric's name.
    pub metric: String,
    pub verdict: Verdict,
    /// The measured value; `None` when the query returned nothing.
    pub value: Option<f64>,
    /// Requests in the window, when the metric has a requests query.
    pub requests: Option<f64>,
    /// The PromQL that produced `value`, so users can paste it into Prometheus.
    pub query: String,
    /// The primary's value, for a metric judged against it.
    pub primary_value: Option<f64>,
}

/// The queries for `metric`: its own `query` template when it has one (so a user can override a builtin's
/// PromQL under the builtin's name), else the builtin of that name. The window is the metric's `interval`,
/// else `ctx.interval` (the analysis interval), cut to `ctx.stage_age` ([`window`]).
///
/// A custom query has no requests query, so `minRequests` does not apply to it.
pub fn queries_for(
    provider: Provider,
    metric: &Metric,
    ctx: &QueryContext,
) -> Result<MetricQueries, QueryError> {
    let written = metric
        .interval
        .as_ref()
        .map_or(ctx.interval.as_str(), |own| own.0.as_str());
    let interval = window(written, ctx.stage_age)?;
    let ctx = QueryContext {
        interval,
        ..ctx.clone()
    };
    match &metric.query {
        Some(template) => Ok(MetricQueries {
            value: render(template, &ctx)?,
            requests: None,
        }),
        None => builtin(provider, &metric.name, &ctx).ok_or_else(|| QueryError::UnknownMetric {
            metric: metric.name.clone(),
        }),
    }
}

/// The query of a provider whose query language is not PromQL (Graphite, InfluxDB...), and its window: the
/// metric's `interval` cut to the stage ([`window_length`]). `{{ interval }}` is that window in whole seconds
/// (`90s`), which every such language reads, where PromQL's `1m` or `1m30s` are errors in some of them.
pub(crate) fn query_in_seconds(
    provider: Provider,
    metric: &Metric,
    ctx: &QueryContext,
) -> Result<(String, Duration), QueryError> {
    let window = window_length(metric, ctx)?;
    let in_seconds = Metric {
        interval: Some(crate::api::DurationString(format!(
            "{}s",
            window.as_secs().max(1)
        ))),
        ..metric.clone()
    };
    let whole_stage = QueryContext {
        stage_age: None,
        ..ctx.clone()
    };
    let query = queries_for(provider, &in_seconds, &whole_stage)?.value;
    Ok((query, window))
}

/// Measures a metric of a provider that answers one number per query (all but Prometheus, whose builtins also
/// count requests): the query rendered for the canary and, with `primaryComparison`, for the primary, each
/// passed through `finish` (a provider's own additions, such as NRQL's `SINCE`) and measured over the same window
/// by `measure`. `minRequests` does not apply: there is no request count.
pub(crate) async fn observe_one_number<Measured>(
    provider: Provider,
    metric: &Metric,
    ctx: &QueryContext,
    finish: impl Fn(String, Duration) -> String,
    measure: impl Fn(String, Duration) -> Measured,
) -> Result<Observation, ProviderError>
where
    Measured: std::future::Future<Output = Result<Option<f64>, ProviderError>>,
{
    let invalid = |source| ProviderError::InvalidMetric {
        metric: metric.name.clone(),
        source,
    };
    let (query, window) = query_in_seconds(provider, metric, ctx).map_err(invalid)?;
    let query = finish(query, window);
    let measured = measure(query.clone(), window).await?;
    let own = verdict::judge_parts(&metric.threshold_range, None, measured, None);
    let (verdict, primary_value) = match &metric.primary_comparison {
        None => (own, None),
        Some(comparison) => {
            primary_is_selected(provider, metric, ctx)?;
            let (primary_query, _) =
                query_in_seconds(provider, metric, &ctx.for_primary()).map_err(invalid)?;
            let primary = measure(finish(primary_query, window), window).await?;
            let verdict =
                verdict::judge_against_primary(comparison, None, (own, measured), (primary, None));
            (verdict, primary)
        }
    };
    Ok(Observation {
        metric: metric.name.clone(),
        verdict,
        value: measured,
        requests: None,
        query,
        primary_value,
    })
}

/// A comparison with the primary needs a query that names the workload: one that reads the same series for
/// `<target>` and `<target>-primary` would compare the canary with itself and always pass.
pub(crate) fn primary_is_selected(
    provider: Provider,
    metric: &Metric,
    ctx: &QueryContext,
) -> Result<(), ProviderError> {
    let invalid = |source| ProviderError::InvalidMetric {
        metric: metric.name.clone(),
        source,
    };
    let canary = queries_for(provider, metric, ctx).map_err(invalid)?;
    let primary = queries_for(provider, metric, &ctx.for_primary()).map_err(invalid)?;
    if canary.value == primary.value {
        return Err(invalid(QueryError::PrimaryNotSelected));
    }
    Ok(())
}

/// The length of a metric's query window (see [`window`]): its `interval`, else the analysis interval, cut to
/// the stage's age.
pub fn window_length(metric: &Metric, ctx: &QueryContext) -> Result<Duration, QueryError> {
    let written = metric
        .interval
        .as_ref()
        .map_or(ctx.interval.as_str(), |own| own.0.as_str());
    let text = window(written, ctx.stage_age)?;
    crate::api::parse_duration(&text).ok_or(QueryError::BadInterval { interval: text })
}

/// A server that answers a metric's query.
#[derive(Clone, Debug)]
pub enum MetricServer {
    Prometheus(Prometheus),
    Datadog(Datadog),
    Graphite(Graphite),
    InfluxDb(InfluxDb),
    NewRelic(NewRelic),
    CloudWatch(std::sync::Arc<CloudWatch>),
}

impl MetricServer {
    /// Measures `metric` for the workload in `ctx` and judges it.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        match self {
            Self::Prometheus(server) => server.observe(provider, metric, ctx).await,
            Self::Datadog(server) => server.observe(provider, metric, ctx).await,
            Self::Graphite(server) => server.observe(provider, metric, ctx).await,
            Self::InfluxDb(server) => server.observe(provider, metric, ctx).await,
            Self::NewRelic(server) => server.observe(provider, metric, ctx).await,
            Self::CloudWatch(server) => server.observe(provider, metric, ctx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DurationString, NoDataPolicy, REQUEST_DURATION, ThresholdRange};

    fn ctx() -> QueryContext {
        QueryContext {
            namespace: "test".into(),
            target: "podinfo".into(),
            service: "podinfo".into(),
            interval: "1m".into(),
            variables: Default::default(),
            statefulset: false,
            stage_age: None,
            waypoint: false,
        }
    }

    fn metric(name: &str, query: Option<&str>, interval: Option<&str>) -> Metric {
        Metric {
            name: name.into(),
            query: query.map(Into::into),
            threshold_range: ThresholdRange {
                min: None,
                max: Some(500.0),
            },
            interval: interval.map(|i| DurationString(i.into())),
            min_requests: Some(10),
            on_no_data: NoDataPolicy::Hold,
            dry_run: false,
            primary_comparison: None,
            template_ref: None,
            template_variables: Default::default(),
        }
    }

    #[test]
    fn a_custom_query_is_rendered_without_a_requests_query() {
        let m = metric(
            "errors",
            Some("sum(rate(x{ns=\"{{ namespace }}\"}[{{ interval }}]))"),
            None,
        );
        assert_eq!(
            queries_for(Provider::Istio, &m, &ctx()),
            Ok(MetricQueries {
                value: "sum(rate(x{ns=\"test\"}[1m]))".into(),
                requests: None
            })
        );
    }

    #[test]
    fn the_metric_interval_overrides_the_analysis_interval() {
        let m = metric(REQUEST_DURATION, None, Some("1.5m"));
        let queries = queries_for(Provider::Istio, &m, &ctx());
        assert!(queries.is_ok_and(|q| q.value.contains("[90s]") && !q.value.contains("[1m]")));
    }

    #[test]
    fn builtins_and_custom_queries_count_only_the_current_stage() {
        let young = QueryContext {
            stage_age: Some(std::time::Duration::from_secs(20)),
            ..ctx()
        };
        let builtin = queries_for(
            Provider::Istio,
            &metric(REQUEST_DURATION, None, None),
            &young,
        );
        assert!(
            builtin.as_ref().is_ok_and(|q| q.value.contains("[20s]")
                && q.requests.as_deref().is_some_and(|r| r.contains("[20s]"))
                && !q.value.contains("[1m]")),
            "{builtin:?}"
        );
        let custom = metric("errors", Some("sum(rate(x[{{ interval }}]))"), Some("5m"));
        assert_eq!(
            queries_for(Provider::Istio, &custom, &young).map(|q| q.value),
            Ok("sum(rate(x[20s]))".into())
        );
    }

    #[test]
    fn a_custom_query_wins_over_a_builtin_name() {
        let m = metric(REQUEST_DURATION, Some("vector(1)"), None);
        assert_eq!(
            queries_for(Provider::Istio, &m, &ctx()).map(|q| q.value),
            Ok("vector(1)".into())
        );
    }

    #[test]
    fn an_unknown_metric_without_query_is_an_error() {
        let m = metric("latency", None, None);
        assert_eq!(
            queries_for(Provider::GatewayApi, &m, &ctx()),
            Err(QueryError::UnknownMetric {
                metric: "latency".into()
            })
        );
    }
}
