//! Sluice's CloudWatch provider against CloudWatch's documented request and response shapes, on a loopback
//! stand-in (there is no AWS to run here): `GetMetricData` in AWS's JSON 1.0 protocol (`POST /`,
//! `X-Amz-Target: GraniteServiceVersion20100801.GetMetricData`), a SigV4 `Authorization` for service `monitoring`
//! in the template's region, `{"__type", "message"}` errors, and the EKS Pod Identity agent's credentials
//! (`GET` with the pod's token, `{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}` back). The stand-in
//! signs what it received again with the same keys (with `aws-sigv4`, at the request's `X-Amz-Date`) and
//! refuses a signature that differs, so a header or body changed after signing is caught.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sluice::api::{Metric, NoDataPolicy, Provider, ThresholdRange, Verdict};
use sluice::metrics::{AwsCredentials, CloudWatch, ProviderError, QueryContext, ServerAccess};

const REGION: &str = "eu-west-1";

#[derive(Default)]
struct StandIn {
    /// Each GetMetricData call: its headers and body.
    calls: Mutex<Vec<(BTreeMap<String, String>, Value)>>,
    /// Pod Identity credential requests.
    issued: Mutex<u32>,
    /// The session token CloudWatch considers expired.
    expired: Mutex<Option<String>>,
}

fn headers_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The signature AWS would compute for this request with the stand-in's keys, or why it cannot be computed.
fn expected_signature(
    headers: &BTreeMap<String, String>,
    body: &str,
    secret_key: &str,
) -> Result<String, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let authorization = headers.get("authorization").ok_or("no Authorization")?;
    let credential = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .ok_or("no Credential")?;
    let signed: Vec<&str> = authorization
        .split("SignedHeaders=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .ok_or("no SignedHeaders")?
        .split(';')
        .collect();
    let date = headers.get("x-amz-date").ok_or("no X-Amz-Date")?;
    let time = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", date)
        .and_then(|t| t.to_zoned(jiff::tz::TimeZone::UTC))
        .map_err(|e| e.to_string())?;
    let time = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(time.timestamp().as_second()).unwrap_or_default());
    let identity = aws_credential_types::Credentials::new(
        credential,
        secret_key,
        headers.get("x-amz-security-token").cloned(),
        None,
        "stand-in",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("monitoring")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let host = headers.get("host").ok_or("no Host")?;
    let uri = format!("http://{host}/");
    let signable_headers = signed
        .iter()
        .filter(|name| !["x-amz-date", "x-amz-security-token"].contains(name))
        .map(|name| (*name, headers.get(*name).map_or("", String::as_str)));
    let request = SignableRequest::new(
        "POST",
        uri.as_str(),
        signable_headers,
        SignableBody::Bytes(body.as_bytes()),
    )
    .map_err(|e| e.to_string())?;
    let (_, signature) = sign(request, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    Ok(signature)
}

async fn get_metric_data(
    State(state): State<Arc<StandIn>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, axum::Json<Value>) {
    let headers = headers_map(&headers);
    let secret_key = if headers
        .get("authorization")
        .is_some_and(|a| a.contains("ASIAPODIDENTITY"))
    {
        "pod-secret"
    } else {
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    };
    let sent = headers
        .get("authorization")
        .and_then(|a| a.split("Signature=").nth(1))
        .unwrap_or_default()
        .to_owned();
    match expected_signature(&headers, &body, secret_key) {
        Ok(expected) if expected == sent => {}
        other => {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(
                    json!({"__type": "com.amazonaws.cloudwatch#SignatureDoesNotMatch",
                    "message": format!("The request signature we calculated does not match: {other:?}")}),
                ),
            );
        }
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if let Ok(mut calls) = state.calls.lock() {
        calls.push((headers.clone(), body.clone()));
    }
    let error = |status: StatusCode, kind: &str, message: &str| {
        (
            status,
            axum::Json(
                json!({"__type": format!("com.amazonaws.cloudwatch#{kind}"), "message": message}),
            ),
        )
    };
    let expired = state.expired.lock().ok().and_then(|e| e.clone());
    if expired.is_some() && headers.get("x-amz-security-token") == expired.as_ref() {
        return error(
            StatusCode::BAD_REQUEST,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        );
    }
    let query = &body["MetricDataQueries"];
    if query[0]["Id"]
        .as_str()
        .is_some_and(|id| id.starts_with(char::is_uppercase))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            "The value for parameter MetricDataQueries.member.1.Id is not matching the expected pattern ^[a-z][a-zA-Z0-9_]*$.",
        );
    }
    let service = query[0]["MetricStat"]["Metric"]["Dimensions"][0]["Value"]
        .as_str()
        .unwrap_or_default();
    let end = body["EndTime"].as_i64().unwrap_or_default();
    let (timestamps, values) = match service {
        "good" => (vec![end - 60, end], vec![3.0, 0.5]),
        "bad" => (vec![end, end - 60], vec![7.5, 0.5]),
        _ => (vec![], vec![]),
    };
    (
        StatusCode::OK,
        axum::Json(
            json!({"MetricDataResults": [{"Id": query[0]["Id"], "Label": "5XXError",
            "Timestamps": timestamps, "Values": values, "StatusCode": "Complete"}], "Messages": []}),
        ),
    )
}

async fn pod_identity(
    State(state): State<Arc<StandIn>>,
    headers: HeaderMap,
) -> (StatusCode, axum::Json<Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("pod-jwt") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"Message": "invalid token"})),
        );
    }
    let mut issued = state.issued.lock().unwrap_or_else(|e| e.into_inner());
    *issued += 1;
    let expiration = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(6);
    (
        StatusCode::OK,
        axum::Json(
            json!({"AccessKeyId": "ASIAPODIDENTITY", "SecretAccessKey": "pod-secret",
            "Token": format!("pod-session-{}", *issued), "AccountId": "123456789012",
            "Expiration": expiration.to_string()}),
        ),
    )
}

async fn start(state: Arc<StandIn>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/", axum::routing::post(get_metric_data))
        .route("/v1/credentials", axum::routing::get(pod_identity))
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

/// API Gateway's 5XXError of the API named like the target, one-minute sums.
const ERRORS: &str = r#"[{"Id": "e1", "MetricStat": {"Metric": {"Namespace": "AWS/ApiGateway", "MetricName": "5XXError",
    "Dimensions": [{"Name": "ApiName", "Value": "{{ target }}"}]}, "Period": 60, "Stat": "Sum"}, "ReturnData": true}]"#;

fn metric(query: &str) -> Metric {
    Metric {
        name: "api-errors".into(),
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

fn ctx(target: &str) -> QueryContext {
    QueryContext {
        namespace: "shop".into(),
        target: target.into(),
        service: target.into(),
        interval: "5m".into(),
        variables: BTreeMap::new(),
        statefulset: false,
        stage_age: Some(Duration::from_secs(120)),
        waypoint: false,
    }
}

fn client(addr: SocketAddr, credentials: AwsCredentials) -> CloudWatch {
    CloudWatch::new(
        Some(&format!("http://{addr}")),
        REGION,
        Duration::from_secs(5),
        &ServerAccess::default(),
        credentials,
    )
    .expect("a CloudWatch client")
}

fn static_keys(session: Option<&str>) -> AwsCredentials {
    let secret = |key: &str| match key {
        "aws_access_key_id" => Some("AKIDEXAMPLE".to_owned()),
        "aws_secret_access_key" => Some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned()),
        "aws_session_token" => session.map(str::to_owned),
        _ => None,
    };
    AwsCredentials::resolve(secret, |_| None).expect("credentials")
}

#[tokio::test]
async fn get_metric_data_is_signed_for_the_region_and_judged_on_the_newest_value() {
    let state = Arc::new(StandIn::default());
    let addr = start(state.clone()).await;
    let cloudwatch = client(addr, static_keys(Some("session-1")));
    let good = cloudwatch
        .observe(Provider::Istio, &metric(ERRORS), &ctx("good"))
        .await
        .expect("measured");
    assert_eq!((good.verdict, good.value), (Verdict::Pass, Some(0.5)));
    let bad = cloudwatch
        .observe(Provider::Istio, &metric(ERRORS), &ctx("bad"))
        .await
        .expect("measured");
    assert_eq!((bad.verdict, bad.value), (Verdict::Fail, Some(7.5)));
    let idle = cloudwatch
        .observe(Provider::Istio, &metric(ERRORS), &ctx("idle"))
        .await
        .expect("measured");
    assert_eq!((idle.verdict, idle.value), (Verdict::NoData, None));

    let calls = state.calls.lock().map(|c| c.clone()).unwrap_or_default();
    let (headers, body) = &calls[0];
    let today = headers
        .get("x-amz-date")
        .map(|d| d.chars().take(8).collect::<String>())
        .unwrap_or_default();
    let authorization = headers.get("authorization").cloned().unwrap_or_default();
    assert!(
        authorization.starts_with(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{today}/eu-west-1/monitoring/aws4_request, SignedHeaders="
        )) && authorization.contains("content-type;host;x-amz-date;x-amz-security-token;x-amz-target")
            && authorization.contains("Signature="),
        "{authorization}"
    );
    assert_eq!(
        headers.get("x-amz-target").map(String::as_str),
        Some("GraniteServiceVersion20100801.GetMetricData")
    );
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/x-amz-json-1.0")
    );
    assert_eq!(
        headers.get("x-amz-security-token").map(String::as_str),
        Some("session-1")
    );
    assert!(headers.contains_key("x-amz-date"));
    assert_eq!(
        body["MetricDataQueries"][0]["MetricStat"]["Metric"]["Dimensions"][0]["Value"],
        "good"
    );
    assert_eq!(
        body["EndTime"].as_i64().unwrap_or_default()
            - body["StartTime"].as_i64().unwrap_or_default(),
        120,
        "the window is the stage's two minutes, not the metric's five: {body}"
    );
}

#[tokio::test]
async fn what_cloudwatch_refuses_freezes_the_check_with_a_reason() {
    let state = Arc::new(StandIn::default());
    let addr = start(state.clone()).await;
    let cloudwatch = client(addr, static_keys(Some("old-session")));
    let bad_id = cloudwatch
        .observe(
            Provider::Istio,
            &metric(&ERRORS.replace("\"e1\"", "\"E1\"")),
            &ctx("good"),
        )
        .await;
    assert!(
        matches!(&bad_id, Err(ProviderError::Query { reason, .. })
            if reason.starts_with("InvalidParameterValueException: ") && reason.contains("expected pattern")),
        "{bad_id:?}"
    );
    let not_json = cloudwatch
        .observe(
            Provider::Istio,
            &metric("SELECT AVG(5XXError)"),
            &ctx("good"),
        )
        .await;
    assert!(
        matches!(&not_json, Err(ProviderError::Query { reason, .. }) if reason.contains("JSON array of MetricDataQuery")),
        "{not_json:?}"
    );
    if let Ok(mut expired) = state.expired.lock() {
        *expired = Some("old-session".into());
    }
    let expired = cloudwatch
        .observe(Provider::Istio, &metric(ERRORS), &ctx("good"))
        .await;
    assert!(
        matches!(
            expired,
            Err(ProviderError::Unauthorized { status: 400, .. })
        ),
        "{expired:?}"
    );
}

#[tokio::test]
async fn eks_pod_identity_credentials_are_fetched_once_and_used_to_sign() {
    let state = Arc::new(StandIn::default());
    let addr = start(state.clone()).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token, "pod-jwt\n").expect("token written");
    let env = {
        let (uri, file) = (
            format!("http://{addr}/v1/credentials"),
            token.display().to_string(),
        );
        move |name: &str| match name {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI" => Some(uri.clone()),
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" => Some(file.clone()),
            _ => None,
        }
    };
    let credentials = AwsCredentials::resolve(|_| None, env).expect("Pod Identity");
    let cloudwatch = client(addr, credentials);
    for _ in 0..2 {
        let observed = cloudwatch
            .observe(Provider::Istio, &metric(ERRORS), &ctx("good"))
            .await
            .expect("measured");
        assert_eq!(observed.value, Some(0.5));
    }
    assert_eq!(state.issued.lock().map(|i| *i).ok(), Some(1));
    let calls = state.calls.lock().map(|c| c.clone()).unwrap_or_default();
    for (headers, _) in &calls {
        assert!(
            headers
                .get("authorization")
                .is_some_and(|a| a.contains("Credential=ASIAPODIDENTITY/")),
            "{headers:?}"
        );
        assert_eq!(
            headers.get("x-amz-security-token").map(String::as_str),
            Some("pod-session-1")
        );
    }
}
