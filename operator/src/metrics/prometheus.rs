//! A thin Prometheus HTTP API client: one instant query → at most one number, and errors that say what to fix.
//!
//! Errors are never turned into a verdict: the caller freezes the rollout on them (DESIGN: "If Prometheus ...
//! cannot be reached, the rollout freezes").

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use prometheus_http_query::response::Data;
use thiserror::Error;

use crate::api::{Metric, MetricProvider, Provider};

use super::verdict::{judge_against_primary, judge_parts};
use super::{MetricQueries, Observation, QueryContext, QueryError, queries_for};

/// Why a metric could not be measured. None of these is "no data": each freezes the rollout.
#[derive(Debug, Error)]
pub enum ProviderError {
    #[error(
        "invalid metrics server URL {url:?}: {reason}; pass an absolute http(s) URL such as \
         http://prometheus.istio-system:9090 (--prometheus-url, or the MetricTemplate's provider.address)"
    )]
    InvalidUrl { url: String, reason: String },
    #[error("cannot set up the HTTP client for the metrics server: {reason}")]
    HttpClient { reason: String },
    #[error(
        "the metrics server at {url} is unreachable: {reason}; check its address (--prometheus-url, or the \
         MetricTemplate's provider.address) and that it is running (rollouts stay frozen until it answers)"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the metrics server at {url} refused Sluice's query ({status}): check the credentials it expects \
         (the MetricTemplate's secretRef, or the operator's identity) and headers (such as a tenant's \
         X-Scope-OrgID){}",
        detail_of(.detail)
    )]
    Unauthorized {
        url: String,
        status: u16,
        /// What the server said, when it said something.
        detail: String,
    },
    #[error(
        "the metrics server at {url} answered with something that is not its API's response: {reason}; \
         check that the address (--prometheus-url, or the MetricTemplate's provider.address) points at the \
         API itself (not a UI or proxy path)"
    )]
    BadResponse { url: String, reason: String },
    #[error("the metrics server rejected the query{}: {reason}; fix the query: {query}", for_metric(.metric))]
    Query {
        metric: Option<String>,
        query: String,
        reason: String,
    },
    #[error(
        "the query{} returned {series} series ({sample}), but a check needs a single number; aggregate it \
         to one series (PromQL: sum(...); Graphite: sumSeries(...); InfluxQL: no GROUP BY; NRQL: no FACET; \
         CloudWatch: ReturnData false on helper queries): {query}",
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
    #[error(
        "cannot get credentials for {url}: {reason}; check the MetricTemplate's Secret or the operator's \
         workload identity, and what that identity may do (Azure Monitor: the Monitoring Data Reader role on \
         the workspace; CloudWatch: cloudwatch:GetMetricData)"
    )]
    Token { url: String, reason: String },
    #[error("metric {metric:?}: {source}")]
    InvalidMetric {
        metric: String,
        #[source]
        source: QueryError,
    },
}

fn detail_of(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!("; the server said: {detail}")
    }
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
            Self::Unauthorized { .. } => "PrometheusUnauthorized",
            Self::Token { .. } => "MetricTokenFailed",
            Self::Query { .. } | Self::NotOneSeries { .. } | Self::RangeVector { .. } => {
                "MetricQueryFailed"
            }
            Self::InvalidMetric { .. } => "MetricInvalid",
        }
    }
}

/// Credentials for a metrics server.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Basic {
        username: String,
        password: String,
    },
    Bearer(String),
    /// InfluxDB's own scheme, `Authorization: Token ...`.
    Token(String),
}

impl Auth {
    fn header_value(&self) -> String {
        use base64::Engine as _;
        match self {
            Auth::Basic { username, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
            Auth::Bearer(token) => format!("Bearer {token}"),
            Auth::Token(token) => format!("Token {token}"),
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Auth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// How to reach a metrics server beyond its URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerAccess {
    pub auth: Option<Auth>,
    pub headers: BTreeMap<String, String>,
    /// PEM certificates to trust besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    pub insecure_skip_verify: bool,
}

impl ServerAccess {
    /// The access a `MetricTemplate`'s provider describes, with the data of its `secretRef` Secret (when it has
    /// one). The error says which key to fix.
    pub fn of(
        provider: &MetricProvider,
        secret: Option<&BTreeMap<String, Vec<u8>>>,
    ) -> Result<Self, String> {
        let empty = BTreeMap::new();
        let data = secret.unwrap_or(&empty);
        let text = |key: &str| -> Result<Option<String>, String> {
            data.get(key)
                .map(|raw| {
                    String::from_utf8(raw.clone())
                        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                        .map_err(|_| format!("key {key} of the Secret is not UTF-8 text"))
                })
                .transpose()
        };
        let auth = match (text("username")?, text("password")?, text("token")?) {
            (None, None, None) => None,
            (Some(username), Some(password), None) => Some(Auth::Basic { username, password }),
            (None, None, Some(token)) => Some(Auth::Bearer(token)),
            (Some(_), None, None) | (None, Some(_), None) => {
                return Err("the Secret needs both username and password for basic auth".into());
            }
            _ => {
                return Err(
                    "the Secret holds both token and username/password: keep one way to authenticate"
                        .into(),
                );
            }
        };
        Ok(Self {
            auth,
            ..Self::transport(provider, secret)
        })
    }

    /// What a provider's template and Secret say about reaching the server, credentials aside: extra headers,
    /// the `ca.crt` to trust and `insecureSkipVerify`.
    pub fn transport(
        provider: &MetricProvider,
        secret: Option<&BTreeMap<String, Vec<u8>>>,
    ) -> Self {
        Self {
            auth: None,
            headers: provider.headers.clone(),
            ca_pem: secret.and_then(|data| data.get("ca.crt").cloned()),
            insecure_skip_verify: provider.insecure_skip_verify,
        }
    }
}

/// A Prometheus server reached over its HTTP API.
#[derive(Clone)]
pub struct Prometheus {
    client: prometheus_http_query::Client,
    url: String,
    timeout: Duration,
    /// Azure Monitor: a bearer token from Entra ID on every query.
    entra: Option<std::sync::Arc<super::azure::EntraToken>>,
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
        Self::with_access(url, timeout, &ServerAccess::default())
    }

    /// [`Prometheus::new`] for a server that wants credentials, extra headers or its own TLS trust.
    pub fn with_access(
        url: &str,
        timeout: Duration,
        access: &ServerAccess,
    ) -> Result<Self, ProviderError> {
        let http = http_client(url, timeout, access)?;
        let client = prometheus_http_query::Client::from(http, url).map_err(|e| {
            ProviderError::InvalidUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            client,
            url: url.to_owned(),
            timeout,
            entra: None,
        })
    }

    /// An Azure Monitor workspace's query endpoint: [`Prometheus::with_access`] plus an Entra ID token on
    /// every query.
    pub fn with_entra_token(
        url: &str,
        timeout: Duration,
        access: &ServerAccess,
        token: super::azure::EntraToken,
    ) -> Result<Self, ProviderError> {
        Ok(Self {
            entra: Some(std::sync::Arc::new(token)),
            ..Self::with_access(url, timeout, access)?
        })
    }

    /// How long a query may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        if metric.primary_comparison.is_some() {
            super::primary_is_selected(provider, metric, ctx)?;
        }
        let (queries, measured, count) = self.measure(provider, metric, ctx).await?;
        let min_requests = queries.requests.as_ref().and(metric.min_requests);
        let own = judge_parts(&metric.threshold_range, min_requests, measured, count);
        let (verdict, primary_value) = match &metric.primary_comparison {
            None => (own, None),
            Some(comparison) => {
                // The same query about the primary workload (Sluice names it `<target>-primary`).
                let (_, primary, primary_count) =
                    self.measure(provider, metric, &ctx.for_primary()).await?;
                let verdict = judge_against_primary(
                    comparison,
                    min_requests,
                    (own, measured),
                    (primary, primary_count),
                );
                (verdict, primary)
            }
        };
        tracing::debug!(metric = %metric.name, ?measured, ?count, ?primary_value, ?verdict, query = %queries.value, "observed metric");
        Ok(Observation {
            metric: metric.name.clone(),
            verdict,
            value: measured,
            requests: count,
            query: queries.value,
            primary_value,
        })
    }

    /// Runs a metric's queries for the workload in `ctx`: its value and, for builtins, its request count.
    async fn measure(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<(MetricQueries, Option<f64>, Option<f64>), ProviderError> {
        let queries =
            queries_for(provider, metric, ctx).map_err(|source| ProviderError::InvalidMetric {
                metric: metric.name.clone(),
                source,
            })?;
        let name = Some(metric.name.as_str());
        let (measured, count) = match &queries.requests {
            Some(requests) => {
                let (measured, count) = tokio::join!(
                    self.instant_for(name, &queries.value),
                    self.instant_for(name, requests)
                );
                (measured?, count?)
            }
            None => (self.instant_for(name, &queries.value).await?, None),
        };
        Ok((queries, measured, count))
    }

    async fn instant_for(
        &self,
        metric: Option<&str>,
        query: &str,
    ) -> Result<Option<f64>, ProviderError> {
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        let mut request = self.client.query(query).timeout(timeout_ms);
        if let Some(entra) = &self.entra {
            let token = entra.access_token().await?;
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ProviderError::Token {
                    url: self.url.clone(),
                    reason: "the access token is not header text".into(),
                })?;
            value.set_sensitive(true);
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.get_raw().await.map_err(|e| self.unanswered(e))?;
        let result = match self.read_answer(response, metric, query).await {
            Ok(result) => result,
            Err(error) => {
                if let (ProviderError::Unauthorized { .. }, Some(entra)) = (&error, &self.entra) {
                    // Revoked, or its role changed: the next check asks Entra ID for a new one.
                    entra.forget().await;
                }
                return Err(error);
            }
        };
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

    /// Reads an answer by its status first: a 401/403 is a credentials problem whatever its body says (a proxy's
    /// or Azure Monitor's JSON refusal is not a Prometheus response), then Prometheus' `status` field.
    async fn read_answer(
        &self,
        response: reqwest::Response,
        metric: Option<&str>,
        query: &str,
    ) -> Result<prometheus_http_query::response::PromqlResult, ProviderError> {
        let url = self.url.clone();
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            let detail = response.text().await.unwrap_or_default();
            return Err(ProviderError::Unauthorized {
                url,
                status,
                detail: detail.trim().chars().take(200).collect(),
            });
        }
        let json_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        let body = response
            .text()
            .await
            .map_err(|e| ProviderError::Unreachable {
                url: url.clone(),
                reason: error_chain(&e),
            })?;
        let first_line = || {
            body.trim()
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>()
        };
        let answer: Option<serde_json::Value> = json_type
            .then(|| serde_json::from_str(&body).ok())
            .flatten();
        match answer
            .as_ref()
            .and_then(|a| a.get("status"))
            .and_then(serde_json::Value::as_str)
        {
            Some("success") => answer
                .as_ref()
                .and_then(|a| a.get("data"))
                .cloned()
                .ok_or_else(|| "no data".to_owned())
                .and_then(|data| serde_json::from_value(data).map_err(|e| e.to_string()))
                .map_err(|reason| ProviderError::BadResponse {
                    url,
                    reason: format!("a success without a readable result: {reason}"),
                }),
            Some("error") => {
                let field = |name: &str| {
                    answer
                        .as_ref()
                        .and_then(|a| a.get(name))
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                Err(ProviderError::Query {
                    metric: metric.map(str::to_owned),
                    query: query.to_owned(),
                    reason: format!("{}: {}", field("errorType"), field("error")),
                })
            }
            // 5xx without a Prometheus body: Prometheus is starting, or a proxy cannot reach it.
            _ if status >= 500 => Err(ProviderError::Unreachable {
                url,
                reason: format!("HTTP {status}: {}", first_line()),
            }),
            _ => Err(ProviderError::BadResponse {
                url,
                reason: format!(
                    "HTTP {status}, not a Prometheus API answer: {}",
                    first_line()
                ),
            }),
        }
    }

    /// A request that got no answer: timed out, refused, or could not be sent.
    fn unanswered(&self, err: prometheus_http_query::Error) -> ProviderError {
        use prometheus_http_query::Error;
        let url = self.url.clone();
        match err {
            Error::Client(e) => match e.inner() {
                Some(inner) if inner.is_timeout() => ProviderError::Unreachable {
                    url,
                    reason: format!("no answer within {:?}", self.timeout),
                },
                Some(inner) => ProviderError::Unreachable {
                    url,
                    reason: error_chain(inner),
                },
                None => ProviderError::Unreachable {
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

/// Sends `request` and reads the whole answer: its status and body. No answer (refused, timed out, cut off) is
/// `Unreachable` at `url`.
pub(crate) async fn exchange(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<(u16, String), ProviderError> {
    let unreachable = |e: reqwest::Error| ProviderError::Unreachable {
        url: url.to_owned(),
        reason: error_chain(&e),
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(unreachable)?;
    Ok((status, body))
}

/// An HTTP client for the metrics server at `url` (http or https, with a host), sending `access`'s credentials
/// and headers on every request and trusting its CA. Every request, connection included, gives up after
/// `timeout`.
pub(crate) fn http_client(
    url: &str,
    timeout: Duration,
    access: &ServerAccess,
) -> Result<reqwest::Client, ProviderError> {
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
    let misconfigured = |reason: String| ProviderError::HttpClient { reason };
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &access.headers {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| misconfigured(format!("header name {name:?}: {e}")))?;
        let value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|e| misconfigured(format!("header {name}: {e}")))?;
        headers.insert(name, value);
    }
    if let Some(auth) = &access.auth {
        let mut value =
            reqwest::header::HeaderValue::from_str(&auth.header_value()).map_err(|_| {
                misconfigured("the credentials hold characters a header cannot carry".into())
            })?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .default_headers(headers)
        .danger_accept_invalid_certs(access.insecure_skip_verify);
    if let Some(pem) = &access.ca_pem {
        for certificate in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| misconfigured(format!("ca.crt is not PEM certificates: {e}")))?
        {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| ProviderError::HttpClient {
        reason: error_chain(&e),
    })
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
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
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

    fn provider(headers: &[(&str, &str)]) -> MetricProvider {
        MetricProvider {
            type_: crate::api::MetricProviderType::Prometheus,
            address: Some("https://mimir.example.com/prometheus".into()),
            secret_ref: None,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            region: None,
            database: None,
            insecure_skip_verify: false,
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_templates_secret_gives_basic_or_bearer_credentials() {
        let tenant = provider(&[("X-Scope-OrgID", "tenant-a")]);
        let basic = ServerAccess::of(
            &tenant,
            Some(&secret(&[("username", "u"), ("password", "p\n")])),
        );
        assert_eq!(
            basic.as_ref().map(|a| a.auth.clone()),
            Ok(Some(Auth::Basic {
                username: "u".into(),
                password: "p".into()
            })),
            "a trailing newline (echo > file) is not part of the password"
        );
        assert_eq!(
            basic.map(|a| a.headers),
            Ok(BTreeMap::from([(
                "X-Scope-OrgID".to_owned(),
                "tenant-a".to_owned()
            )]))
        );
        let bearer = ServerAccess::of(&tenant, Some(&secret(&[("token", "t0k")])));
        assert_eq!(bearer.map(|a| a.auth), Ok(Some(Auth::Bearer("t0k".into()))));
        assert_eq!(ServerAccess::of(&tenant, None).map(|a| a.auth), Ok(None));
        for (bad, says) in [
            (secret(&[("username", "u")]), "both username and password"),
            (
                secret(&[("token", "t"), ("username", "u"), ("password", "p")]),
                "keep one way",
            ),
        ] {
            let err = ServerAccess::of(&tenant, Some(&bad))
                .err()
                .unwrap_or_default();
            assert!(err.contains(says), "{err}");
        }
        assert!(format!("{:?}", Auth::Bearer("t0k".into())).contains("redacted"));
        assert!(
            !format!(
                "{:?}",
                Auth::Basic {
                    username: "u".into(),
                    password: "hunter2".into()
                }
            )
            .contains("hunter2")
        );
    }

    #[test]
    fn a_comparison_with_the_primary_needs_a_query_that_selects_the_target() {
        let ctx = QueryContext {
            namespace: "shop".into(),
            target: "web".into(),
            service: "web".into(),
            interval: "1m".into(),
            ..Default::default()
        };
        let metric = |query: Option<&str>| Metric {
            name: "errors".into(),
            query: query.map(Into::into),
            threshold_range: crate::api::ThresholdRange {
                min: None,
                max: Some(1.0),
            },
            interval: None,
            min_requests: None,
            on_no_data: crate::api::NoDataPolicy::Hold,
            template_variables: Default::default(),
            dry_run: false,
            template_ref: None,
            primary_comparison: Some(crate::api::PrimaryComparison {
                max_delta: Some(0.5),
                ..Default::default()
            }),
        };
        let by_service = metric(Some("sum(rate(x{svc=\"{{ service }}\"}[{{ interval }}]))"));
        let err = super::super::primary_is_selected(Provider::Istio, &by_service, &ctx).err();
        assert!(
            err.as_ref()
                .is_some_and(|e| e.to_string().contains("does not use {{ target }}")),
            "{err:?}"
        );
        let by_target = metric(Some("sum(rate(x{w=\"{{ target }}\"}[{{ interval }}]))"));
        assert!(super::super::primary_is_selected(Provider::Istio, &by_target, &ctx).is_ok());
        assert!(
            super::super::primary_is_selected(Provider::Istio, &metric(None), &ctx).is_err(),
            "errors is no builtin"
        );
        let builtin = Metric {
            name: crate::api::REQUEST_SUCCESS_RATE.into(),
            ..metric(None)
        };
        assert!(super::super::primary_is_selected(Provider::Istio, &builtin, &ctx).is_ok());
    }

    #[test]
    fn bad_access_settings_are_errors_not_panics() {
        let bad_header = ServerAccess {
            headers: BTreeMap::from([("X-Tenant".to_owned(), "line\nbreak".to_owned())]),
            ..Default::default()
        };
        let bad_ca = ServerAccess {
            ca_pem: Some(
                b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec(),
            ),
            ..Default::default()
        };
        for access in [bad_header, bad_ca] {
            let built =
                Prometheus::with_access("http://127.0.0.1:9090", Duration::from_secs(1), &access);
            assert!(
                matches!(built, Err(ProviderError::HttpClient { .. })),
                "{access:?}: {built:?}"
            );
        }
    }

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
