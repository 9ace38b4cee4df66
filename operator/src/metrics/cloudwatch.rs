//! Amazon CloudWatch's `GetMetricData`, as Flagger's `cloudwatch` MetricTemplate provider uses it: the query is a
//! JSON array of `MetricDataQuery`, sent with AWS's JSON 1.0 protocol and a SigV4 signature (signed by the
//! `aws-sigv4` crate). Sluice sets the time range: the metric's window cut to the stage (Flagger reaches back ten
//! intervals). Credentials come from the template's Secret, the operator's environment, or EKS Pod Identity.
//! Tested against CloudWatch's documented request and response shapes on a loopback stand-in: there is no AWS
//! to run here.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use serde::Deserialize;
use serde_json::{Value, json};

use super::prometheus::error_chain;
use super::{Observation, ProviderError, QueryContext, ServerAccess};
use crate::api::{Metric, Provider};

/// Where CloudWatch answers in `region`, unless a template sets `address`.
pub fn cloudwatch_endpoint(region: &str) -> String {
    let domain = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://monitoring.{region}.{domain}")
}

/// Whether requests signed with the operator's own AWS identity may go to `address`: only `https://` CloudWatch
/// endpoints, `monitoring.<region>.amazonaws.com` (`.com.cn`) or a VPC endpoint of it
/// (`*.monitoring.<region>.vpce.amazonaws.com`). Other hosts under `amazonaws.com` (API Gateway, S3) can be
/// anyone's; a template author could otherwise collect requests signed with the operator's identity, and its
/// session token, at an address of their choosing.
pub fn operator_identity_may_sign_for(address: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(address).map_err(|e| format!("address {address:?}: {e}"))?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let cloudwatch = match labels.as_slice() {
        ["monitoring", _region, "amazonaws", "com"]
        | ["monitoring", _region, "amazonaws", "com", "cn"] => true,
        [.., "monitoring", _region, "vpce", "amazonaws", "com"] => labels.len() > 5,
        _ => false,
    };
    if url.scheme() == "https" && cloudwatch {
        Ok(())
    } else {
        Err(format!(
            "address {address:?} is not an https AWS endpoint, and the template has no keys of its own: Sluice \
             signs with the operator's AWS identity only for AWS endpoints; leave address unset, or put \
             aws_access_key_id and aws_secret_access_key in the template's Secret"
        ))
    }
}

/// Where AWS credentials come from.
#[derive(Debug)]
pub enum AwsCredentials {
    /// Keys from the template's Secret.
    FromSecret(Credentials),
    /// Keys from the operator's environment.
    Static(Credentials),
    /// EKS Pod Identity: the agent at `uri` exchanges the pod's token (read from `token_file` each time, since it
    /// rotates) for temporary credentials, cached until shortly before they expire.
    PodIdentity {
        uri: String,
        token_file: PathBuf,
        cached: tokio::sync::Mutex<Option<(Credentials, Instant)>>,
    },
}

impl AwsCredentials {
    /// Credentials for a template: `aws_access_key_id` and `aws_secret_access_key` (and `aws_session_token`) from
    /// its Secret; else the operator's `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`; else EKS
    /// Pod Identity (`AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, which
    /// the Pod Identity webhook sets).
    pub fn resolve(
        secret: impl Fn(&str) -> Option<String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let keys = |lookup: &dyn Fn(&str) -> Option<String>, names: [&str; 3], source: &str| match (
            lookup(names[0]),
            lookup(names[1]),
        ) {
            (Some(id), Some(key)) => Ok(Some(Credentials::new(
                id,
                key,
                lookup(names[2]),
                None,
                "sluice",
            ))),
            (None, None) => Ok(None),
            _ => Err(format!(
                "{source} has only one of {} and {}: set both",
                names[0], names[1]
            )),
        };
        let from_secret = keys(
            &secret,
            [
                "aws_access_key_id",
                "aws_secret_access_key",
                "aws_session_token",
            ],
            "the Secret",
        )?;
        let from_env = || {
            keys(
                &env,
                [
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN",
                ],
                "the operator's environment",
            )
        };
        if let Some(credentials) = from_secret {
            return Ok(Self::FromSecret(credentials));
        }
        if let Some(credentials) = from_env()? {
            return Ok(Self::Static(credentials));
        }
        match (
            env("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
        ) {
            (Some(uri), Some(token_file)) => Ok(Self::PodIdentity {
                uri,
                token_file: PathBuf::from(token_file),
                cached: tokio::sync::Mutex::new(None),
            }),
            _ => Err(
                "no AWS credentials: put aws_access_key_id and aws_secret_access_key in the template's Secret, \
                 or give the operator an EKS Pod Identity association (AWS_CONTAINER_CREDENTIALS_FULL_URI is \
                 not set)"
                    .into(),
            ),
        }
    }

    /// Whether these are the operator's own credentials rather than the template's.
    pub fn are_the_operators(&self) -> bool {
        !matches!(self, Self::FromSecret(_))
    }

    async fn current(&self, http: &reqwest::Client) -> Result<Credentials, String> {
        let (uri, token_file, cached) = match self {
            Self::FromSecret(credentials) | Self::Static(credentials) => {
                return Ok(credentials.clone());
            }
            Self::PodIdentity {
                uri,
                token_file,
                cached,
            } => (uri, token_file, cached),
        };
        let mut cached = cached.lock().await;
        if let Some((credentials, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(credentials.clone());
        }
        let token = std::fs::read_to_string(token_file).map_err(|e| {
            format!(
                "cannot read the Pod Identity token {}: {e}",
                token_file.display()
            )
        })?;
        let response = http
            .get(uri)
            .header(reqwest::header::AUTHORIZATION, token.trim())
            .send()
            .await
            .map_err(|e| format!("the Pod Identity agent at {uri}: {}", error_chain(&e)))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| error_chain(&e))?;
        if !status.is_success() {
            return Err(format!(
                "the Pod Identity agent at {uri} answered {status}: {}",
                body.chars().take(300).collect::<String>()
            ));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Issued {
            access_key_id: String,
            secret_access_key: String,
            token: String,
            expiration: String,
        }
        let issued: Issued = serde_json::from_str(&body)
            .map_err(|e| format!("the Pod Identity agent's answer is not credentials: {e}"))?;
        let expires = issued
            .expiration
            .parse::<jiff::Timestamp>()
            .map_err(|e| format!("Expiration {:?}: {e}", issued.expiration))?;
        let lifetime = Duration::from_secs(
            u64::try_from(expires.as_second() - jiff::Timestamp::now().as_second()).unwrap_or(0),
        );
        let credentials = Credentials::new(
            issued.access_key_id,
            issued.secret_access_key,
            Some(issued.token),
            Some(SystemTime::now() + lifetime),
            "eks-pod-identity",
        );
        let renew_at = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(300))
                .max(lifetime / 2);
        *cached = Some((credentials.clone(), renew_at));
        Ok(credentials)
    }
}

/// CloudWatch in one region.
pub struct CloudWatch {
    http: reqwest::Client,
    url: String,
    region: String,
    credentials: AwsCredentials,
}

impl std::fmt::Debug for CloudWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudWatch")
            .field("url", &self.url)
            .field("region", &self.region)
            .finish()
    }
}

impl CloudWatch {
    /// A client for CloudWatch in `region`, at `address` or the region's endpoint.
    pub fn new(
        address: Option<&str>,
        region: &str,
        timeout: Duration,
        access: &ServerAccess,
        credentials: AwsCredentials,
    ) -> Result<Self, ProviderError> {
        let url = address.map_or_else(|| cloudwatch_endpoint(region), str::to_owned);
        let http = super::prometheus::http_client(&url, timeout, access)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            region: region.to_owned(),
            credentials,
        })
    }

    /// Measures `metric` (its `MetricDataQuery` array, rendered) over its window and judges it; with
    /// `primaryComparison`, the same query about the primary too.
    pub async fn observe(
        &self,
        provider: Provider,
        metric: &Metric,
        ctx: &QueryContext,
    ) -> Result<Observation, ProviderError> {
        let now = jiff::Timestamp::now().as_second();
        super::observe_one_number(provider, metric, ctx, |query, _| query, |query: String, window| async move {
            self.value(&metric.name, &query, window, now).await
        })
        .await
    }

    async fn value(
        &self,
        metric: &str,
        query: &str,
        window: Duration,
        now: i64,
    ) -> Result<Option<f64>, ProviderError> {
        let query_error = |reason: String| ProviderError::Query {
            metric: Some(metric.to_owned()),
            query: query.to_owned(),
            reason,
        };
        let queries: Value = serde_json::from_str(query).map_err(|e| {
            query_error(format!(
                "the query is not JSON ({e}); write a JSON array of MetricDataQuery"
            ))
        })?;
        if !queries.is_array() {
            return Err(query_error(
                "the query must be a JSON array of MetricDataQuery".into(),
            ));
        }
        let start = now - i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX);
        let body = json!({
            "MetricDataQueries": queries,
            "StartTime": start,
            "EndTime": now,
            "ScanBy": "TimestampDescending",
        })
        .to_string();
        let credentials = self
            .credentials
            .current(&self.http)
            .await
            .map_err(|reason| ProviderError::Token {
                url: self.url.clone(),
                reason,
            })?;
        let headers = self.signed_headers(&credentials, &body)?;
        let mut request = self.http.post(format!("{}/", self.url)).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let unreachable = |reason: String| ProviderError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let (status, text) = super::prometheus::exchange(request, &self.url).await?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match status {
            200 => {}
            400 | 401 | 403 => {
                let (kind, message) = aws_error(&answer, &text);
                return Err(if status != 400 || is_credential_error(&kind) {
                    ProviderError::Unauthorized {
                        url: self.url.clone(),
                        status,
                        detail: format!("{kind}: {message}"),
                    }
                } else {
                    query_error(format!("{kind}: {message}"))
                });
            }
            other => {
                let (kind, message) = aws_error(&answer, &text);
                return Err(unreachable(format!("HTTP {other}: {kind}: {message}")));
            }
        }
        latest_value(&answer, start).map_err(|unread| match unread {
            Unread::Failed(reason) => query_error(reason),
            Unread::Malformed(reason) => ProviderError::BadResponse {
                url: self.url.clone(),
                reason,
            },
            Unread::Several(ids) => ProviderError::NotOneSeries {
                metric: Some(metric.to_owned()),
                query: query.to_owned(),
                series: ids.len(),
                sample: ids.join(", "),
            },
        })
    }

    /// The headers of a `GetMetricData` call in AWS's JSON 1.0 protocol, SigV4-signed for `monitoring`.
    fn signed_headers(
        &self,
        credentials: &Credentials,
        body: &str,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let failed = |reason: String| ProviderError::Token {
            url: self.url.clone(),
            reason: format!("cannot sign the request: {reason}"),
        };
        let host = reqwest::Url::parse(&self.url)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| {
                    u.port()
                        .map_or_else(|| h.to_owned(), |p| format!("{h}:{p}"))
                })
            })
            .unwrap_or_default();
        let mut headers = vec![
            ("host".to_owned(), host),
            (
                "content-type".to_owned(),
                "application/x-amz-json-1.0".to_owned(),
            ),
            (
                "x-amz-target".to_owned(),
                "GraniteServiceVersion20100801.GetMetricData".to_owned(),
            ),
        ];
        let identity = credentials.clone().into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("monitoring")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| failed(e.to_string()))?
            .into();
        let url = format!("{}/", self.url);
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| failed(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| failed(e.to_string()))?
            .into_parts();
        headers.extend(
            instructions
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        // reqwest sets Host itself.
        headers.retain(|(k, _)| k != "host");
        Ok(headers)
    }
}

/// AWS's JSON error: `__type` (its last `#` segment) and `message` (or `Message`).
fn aws_error(answer: &Value, text: &str) -> (String, String) {
    let kind = answer
        .get("__type")
        .and_then(Value::as_str)
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
        .unwrap_or_else(|| "Error".into());
    let message = answer
        .get("message")
        .or_else(|| answer.get("Message"))
        .and_then(Value::as_str)
        .map_or_else(|| text.trim().chars().take(300).collect(), str::to_owned);
    (kind, message)
}

/// AWS's 400s that are about who is asking, not what is asked.
fn is_credential_error(kind: &str) -> bool {
    matches!(
        kind,
        "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "AccessDeniedException"
    )
}

#[derive(Debug, PartialEq)]
enum Unread {
    Malformed(String),
    /// CloudWatch could not compute the result (`StatusCode` `Forbidden` or `InternalError`).
    Failed(String),
    Several(Vec<String>),
}

/// The value of a `GetMetricData` answer: the newest value of the one result (queries with `ReturnData: false`
/// are not returned) among the datapoints that start at or after `start` (CloudWatch rounds `StartTime` down to
/// the minute, so it can return a datapoint that began before the stage); no value is no data.
fn latest_value(answer: &Value, start: i64) -> Result<Option<f64>, Unread> {
    let results = answer
        .get("MetricDataResults")
        .and_then(Value::as_array)
        .ok_or_else(|| Unread::Malformed("no MetricDataResults in the answer".into()))?;
    let Some(only) = results.first() else {
        return Ok(None);
    };
    if results.len() > 1 {
        return Err(Unread::Several(
            results
                .iter()
                .map(|r| {
                    r.get("Id")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                })
                .collect(),
        ));
    }
    let status = only
        .get("StatusCode")
        .and_then(Value::as_str)
        .unwrap_or("Complete");
    if !matches!(status, "Complete" | "PartialData") {
        let messages: Vec<String> = answer
            .get("Messages")
            .into_iter()
            .chain(only.get("Messages"))
            .filter_map(Value::as_array)
            .flatten()
            .map(|m| {
                format!(
                    "{}: {}",
                    m.get("Code").and_then(Value::as_str).unwrap_or("?"),
                    m.get("Value").and_then(Value::as_str).unwrap_or_default()
                )
            })
            .collect();
        return Err(Unread::Failed(format!(
            "CloudWatch could not compute the result ({status}) {}",
            messages.join("; ")
        )));
    }
    let numbers = |field: &str| -> Result<Vec<f64>, Unread> {
        only.get(field)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| Unread::Malformed(format!("{field} holds {v}, not a number")))
            })
            .collect()
    };
    let (timestamps, values) = (numbers("Timestamps")?, numbers("Values")?);
    if timestamps.len() != values.len() {
        return Err(Unread::Malformed(
            "Timestamps and Values differ in length".into(),
        ));
    }
    let start = start as f64;
    Ok(timestamps
        .iter()
        .zip(&values)
        .filter(|(at, _)| **at >= start)
        .max_by(|a, b| a.0.total_cmp(b.0))
        .map(|(_, value)| *value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn the_operators_identity_signs_only_for_aws_endpoints() {
        for aws in [
            "https://monitoring.eu-west-1.amazonaws.com",
            "https://vpce-0a1b-x1.monitoring.eu-west-1.vpce.amazonaws.com/",
            "https://monitoring.cn-north-1.amazonaws.com.cn",
        ] {
            assert_eq!(operator_identity_may_sign_for(aws), Ok(()), "{aws}");
        }
        for elsewhere in [
            "http://monitoring.eu-west-1.amazonaws.com",
            "https://collector.example.com",
            "https://amazonaws.com.example.com",
            "https://abc123.execute-api.eu-west-1.amazonaws.com",
            "https://my-bucket.s3.amazonaws.com",
            "https://monitoring.eu-west-1.vpce.amazonaws.com",
            "https://example.com/.amazonaws.com",
            "http://127.0.0.1:8080",
        ] {
            assert!(
                operator_identity_may_sign_for(elsewhere).is_err(),
                "{elsewhere}"
            );
        }
    }

    #[test]
    fn endpoints_follow_the_region() {
        assert_eq!(
            cloudwatch_endpoint("eu-west-1"),
            "https://monitoring.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            cloudwatch_endpoint("cn-north-1"),
            "https://monitoring.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn credentials_come_from_the_secret_then_the_environment_then_pod_identity() {
        let env = lookup(&[
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/var/run/token"),
        ]);
        let secret = lookup(&[
            ("aws_access_key_id", "SECRETKEY"),
            ("aws_secret_access_key", "s"),
            ("aws_session_token", "t"),
        ]);
        assert!(matches!(
            AwsCredentials::resolve(&secret, &env),
            Ok(AwsCredentials::FromSecret(c)) if c.access_key_id() == "SECRETKEY" && c.session_token() == Some("t")
        ));
        assert!(matches!(
            AwsCredentials::resolve(lookup(&[]), &env),
            Ok(AwsCredentials::Static(c)) if c.access_key_id() == "ENVKEY"
        ));
        let pod_identity = lookup(&[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/var/run/token"),
        ]);
        assert!(matches!(
            AwsCredentials::resolve(lookup(&[]), &pod_identity),
            Ok(AwsCredentials::PodIdentity { uri, .. }) if uri.ends_with("/v1/credentials")
        ));
        let half = lookup(&[("aws_access_key_id", "K")]);
        assert!(
            AwsCredentials::resolve(half, &env)
                .is_err_and(|e| e.contains("the Secret has only one"))
        );
        assert!(
            AwsCredentials::resolve(lookup(&[]), lookup(&[]))
                .is_err_and(|e| e.contains("no AWS credentials"))
        );
    }

    #[test]
    fn the_newest_value_of_one_result_is_read() {
        let answer = json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [100, 160, 40],
            "Values": [1.0, 2.0, 0.5], "StatusCode": "Complete"}], "Messages": []});
        assert_eq!(latest_value(&answer, 0), Ok(Some(2.0)));
        let empty = json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [], "Values": []}]});
        assert_eq!(latest_value(&empty, 0), Ok(None));
        assert_eq!(latest_value(&json!({"MetricDataResults": []}), 0), Ok(None));
    }

    #[test]
    fn datapoints_from_before_the_stage_are_not_counted() {
        let answer = json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [120, 60],
            "Values": [1.0, 9.0], "StatusCode": "Complete"}]});
        assert_eq!(latest_value(&answer, 90), Ok(Some(1.0)));
        assert_eq!(latest_value(&answer, 121), Ok(None));
        let only_old =
            json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [60], "Values": [9.0]}]});
        assert_eq!(latest_value(&only_old, 90), Ok(None));
    }

    #[test]
    fn a_result_cloudwatch_could_not_compute_is_an_error() {
        let forbidden = json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [], "Values": [],
            "StatusCode": "Forbidden", "Messages": [{"Code": "Forbidden", "Value": "no access to namespace"}]}]});
        assert!(
            matches!(latest_value(&forbidden, 0), Err(Unread::Failed(r)) if r.contains("no access to namespace"))
        );
    }

    #[test]
    fn several_results_or_malformed_answers_are_errors() {
        let two = json!({"MetricDataResults": [{"Id": "m1", "Timestamps": [1], "Values": [1]},
                                               {"Id": "m2", "Timestamps": [1], "Values": [2]}]});
        assert_eq!(
            latest_value(&two, 0),
            Err(Unread::Several(vec!["m1".into(), "m2".into()]))
        );
        for bad in [
            json!({}),
            json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [1, 2], "Values": [1]}]}),
            json!({"MetricDataResults": [{"Id": "e1", "Timestamps": [1], "Values": ["x"]}]}),
        ] {
            assert!(
                matches!(latest_value(&bad, 0), Err(Unread::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn aws_errors_are_read_and_sorted() {
        let answer = json!({"__type": "com.amazonaws.cloudwatch#InvalidParameterValueException",
                            "message": "The value ... for parameter MetricDataQueries is invalid."});
        assert_eq!(aws_error(&answer, "").0, "InvalidParameterValueException");
        assert!(!is_credential_error("InvalidParameterValueException"));
        assert!(is_credential_error("ExpiredTokenException"));
        assert!(is_credential_error("UnrecognizedClientException"));
    }
}
