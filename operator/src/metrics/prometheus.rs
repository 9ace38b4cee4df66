//! A thin Prometheus HTTP API client: one instant query → at most one number, and errors that say what to fix.
//!
//! Errors are never turned into a verdict: the caller freezes the rollout on them (DESIGN: "If Prometheus ...
//! cannot be reached, the rollout freezes").

use std::fmt;
use std::time::Duration;

use prometheus_http_query::response::Data;
use thiserror::Error;

use crate::api::{Metric, Provider};

use super::verdict::judge_parts;
use super::{MetricQueries, Observation, QueryContext, QueryError, queries_for};

/// Why a metric could not be measured. None of these is "no data": each freezes the rollout.
#[derive(Debug, Error)]
pub enum ProviderError {
    #[error(
        "invalid Prometheus URL {url:?}: {reason}; pass an absolute http(s) URL such as \
         http://prometheus.istio-system:9090 (--prometheus-url)"
    )]
    InvalidUrl { url: String, reason: String },
    #[error("cannot set up the HTTP client for Prometheus: {reason}")]
    HttpClient { reason: String },
    #[error(
        "Prometheus at {url} is unreachable: {reason}; check --prometheus-url and that Prometheus is \
         running (rollouts stay frozen until it answers)"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "Prometheus at {url} answered with something that is not a Prometheus API response: {reason}; \
         check that --prometheus-url points at Prometheus itself (not a UI or proxy path)"
    )]
    BadResponse { url: String, reason: String },
    #[error("Prometheus rejected the query{}: {reason}; fix the PromQL: {query}", for_metric(.metric))]
    Query {
        metric: Option<String>,
        query: String,
        reason: String,
    },
    #[error(
        "the query{} returned {series} series ({sample}), but a check needs a single number; aggregate it \
         to one series, e.g. wrap it in sum(...): {query}",
        for_metric(.metric)
    )]
    NotOneSeries {
        metric: Option<String>,
        query: String,
        series: usize,
        sample: String,
    },
    #[error(
        "the query{} returned a range vector; a check needs a single number: apply rate(), increase() or \
         *_over_time() to it: {query}",
        for_metric(.metric)
    )]
    RangeVector {
        metric: Option<String>,
        query: String,
    },
    #[error("metric {metric:?}: {source}")]
    InvalidMetric {
        metric: String,
        #[source]
        source: QueryError,
    },
}

fn for_metric(metric: &Option<String>) -> String {
    metric
        .as_deref()
        .map(|name| format!(" of metric {name:?}"))
        .unwrap_or_default()
}

impl ProviderError {
    /// A short CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } | Self::HttpClient { .. } => "PrometheusMisconfigured",
            Self::Unreachable { .. } => "PrometheusUnreachable",
            Self::BadResponse { .. } => "PrometheusBadResponse",
            Self::Query { .. } | Self::NotOneSeries { .. } | Self::RangeVector { .. } => {
                "MetricQueryFailed"
            }
            Self::InvalidMetric { .. } => "MetricInvalid",
        }
    }
}

/// A Prometheus server reached over its HTTP API.
#[derive(Clone)]
pub struct Prometheus {
    client: prometheus_http_query::Client,
    url: String,
    timeout: Duration,
}

impl fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prometheus")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Prometheus {
    /// A client for the Prometheus at `url` (e.g. `http://prometheus.istio-system:9090`). Every request, connection
    /// included, gives up after `timeout`; Prometheus is asked to stop evaluating after the same time.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, ProviderError> {
        let invalid = |reason: String| ProviderError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                "the scheme must be http or https and a host is needed".into(),
            ));
        }
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| ProviderError::HttpClient {
                reason: error_chain(&e),
            })?;
        let client =
            prometheus_http_query::Client::from(http, url).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            client,
            url: url.to_owned(),
            timeout,
        })
    }

    /// The base URL this client queries.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Evaluates `query` now. An empty result is `Ok(None)`; one sample or a scalar is `Ok(Some(v))`, NaN
    /// included (the verdict maps it to no data); several series are an error.
    pub async fn instant(&self, query: &str) -> Result<Option<f64>, ProviderError> {
        self.instant_for(None, query).await
    }

    /// Measures `metric` for the workload in `ctx` and judges it. `minRequests` applies only when the metric has
    /// a requests query (the builtins do; a custom `query` does not), since a custom query's volume is unknown.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        let MetricQueries { value, requests } =
            queries_for(provider, metric, ctx).map_err(|source| ProviderError::InvalidMetric {
                metric: metric.name.clone(),
                source,
            })?;
        let name = Some(metric.name.as_str());
        let (measured, count) = match &requests {
            Some(requests) => {
                let (measured, count) = tokio::join!(
                    self.instant_for(name, &value),
                    self.instant_for(name, requests)
                );
                (measured?, count?)
            }
            None => (self.instant_for(name, &value).await?, None),
        };
        let min_requests = requests.as_ref().and(metric.min_requests);
        let verdict = judge_parts(&metric.threshold_range, min_requests, measured, count);
        tracing::debug!(metric = %metric.name, ?measured, ?count, ?verdict, query = %value, "observed metric");
        Ok(Observation {
            metric: metric.name.clone(),
            verdict,
            value: measured,
            requests: count,
            query: value,
        })
    }

    async fn instant_for(
        &self,
        metric: Option<&str>,
        query: &str,
    ) -> Result<Option<f64>, ProviderError> {
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        let result = self
            .client
            .query(query)
            .timeout(timeout_ms)
            .get()
            .await
            .map_err(|e| self.classify(e, metric, query))?;
        match result.data() {
            Data::Scalar(sample) => Ok(Some(sample.value())),
            Data::Vector(series) => match series.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(one.sample().value())),
                many => Err(ProviderError::NotOneSeries {
                    metric: metric.map(str::to_owned),
                    query: query.to_owned(),
                    series: many.len(),
                    sample: many
                        .iter()
                        .take(3)
                        .map(|s| labels(s.metric()))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            },
            Data::Matrix(_) => Err(ProviderError::RangeVector {
                metric: metric.map(str::to_owned),
                query: query.to_owned(),
            }),
        }
    }

    fn classify(
        &self,
        err: prometheus_http_query::Error,
        metric: Option<&str>,
        query: &str,
    ) -> ProviderError {
        use prometheus_http_query::Error;
        let url = self.url.clone();
        match err {
            Error::Prometheus(e) => ProviderError::Query {
                metric: metric.map(str::to_owned),
                query: query.to_owned(),
                reason: format!("{}: {}", e.error_type(), e.message()),
            },
            Error::Client(e) => match e.inner() {
                Some(inner) if inner.is_timeout() => ProviderError::Unreachable {
                    url,
                    reason: format!("no answer within {:?}", self.timeout),
                },
                Some(inner) if inner.is_connect() => ProviderError::Unreachable {
                    url,
                    reason: error_chain(inner),
                },
                // 5xx without a Prometheus error body: Prometheus is starting or a proxy cannot reach it.
                Some(inner) if inner.status().is_some_and(|s| s.is_server_error()) => {
                    ProviderError::Unreachable {
                        url,
                        reason: format!("{e} ({})", error_chain(inner)),
                    }
                }
                Some(inner) if inner.is_request() => ProviderError::Unreachable {
                    url,
                    reason: error_chain(inner),
                },
                Some(inner) => ProviderError::BadResponse {
                    url,
                    reason: format!("{e}: {}", error_chain(inner)),
                },
                None => ProviderError::BadResponse {
                    url,
                    reason: e.to_string(),
                },
            },
            other => ProviderError::BadResponse {
                url,
                reason: other.to_string(),
            },
        }
    }
}

/// rustls needs one process-wide crypto provider; Sluice uses ring, like its Kubernetes client, because aws-lc
/// needs a C/CMake toolchain to build. A provider someone installed earlier is kept.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing one is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// An error and all its causes, e.g. "error sending request: client error (Connect): Connection refused".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn labels(metric: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = metric.iter().collect();
    pairs.sort();
    let body = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join(",");
    format!("{{{body}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_absolute_http() {
        for bad in ["prometheus:9090", "ftp://prometheus", "not a url", ""] {
            assert!(
                matches!(
                    Prometheus::new(bad, Duration::from_secs(1)),
                    Err(ProviderError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        assert!(Prometheus::new("http://127.0.0.1:9090", Duration::from_secs(1)).is_ok());
        assert!(
            Prometheus::new(
                "https://prometheus.example:443/prefix",
                Duration::from_secs(1)
            )
            .is_ok()
        );
    }

    #[test]
    fn messages_name_the_metric_and_the_query() {
        let err = ProviderError::Query {
            metric: Some("errors".into()),
            query: "sum(".into(),
            reason: "bad_data: unexpected end of input".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains(r#"metric "errors""#) && text.contains("sum("),
            "{text}"
        );
        let anonymous = ProviderError::RangeVector {
            metric: None,
            query: "x[1m]".into(),
        };
        assert!(
            anonymous
                .to_string()
                .starts_with("the query returned a range vector")
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        // Bind then drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let prometheus =
            Prometheus::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2))
                .expect("valid url");
        match prometheus.instant("vector(1)").await {
            Err(ProviderError::Unreachable { url, reason }) => {
                assert!(url.contains(&port.to_string()));
                assert!(!reason.is_empty());
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
