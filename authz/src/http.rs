//! The HTTP front ends of `sluice authz`: Envoy's HTTP ext_authz service (every method and path is a
//! check of the original request) and the admin endpoints `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::input::{
    HttpRequestParts, InputError, PARTIAL_BODY_HEADER, check_request_from_http, policy_input,
};
use super::response::{
    HttpVerdict, ResponseOptions, http_error_verdict, http_input_error_verdict, http_verdict,
};
use super::{Authorizer, Verdict};

#[derive(Clone)]
struct CheckState {
    authorizer: Arc<Authorizer>,
    /// Envoy's `http_service.path_prefix`, removed before the path reaches the policy.
    path_prefix: Arc<str>,
    allow_unsignalled_body: bool,
}

/// How the HTTP ext_authz service reads what Envoy forwards.
#[derive(Debug, Clone, Default)]
pub struct HttpCheckOptions {
    /// Envoy's `http_service.path_prefix`, removed from the path the policy sees.
    pub path_prefix: String,
    /// Parse a body that arrives without `x-envoy-auth-partial-body`. Only safe when Envoy's
    /// `with_request_body.allow_partial_message` is false, so every forwarded body is whole.
    pub allow_unsignalled_body: bool,
}

/// The HTTP ext_authz service: answers every request as a check of the request Envoy forwarded.
pub fn check_router(authorizer: Arc<Authorizer>, options: &HttpCheckOptions) -> Router {
    Router::new().fallback(check).with_state(CheckState {
        authorizer,
        path_prefix: options.path_prefix.trim_end_matches('/').into(),
        allow_unsignalled_body: options.allow_unsignalled_body,
    })
}

/// Whether a body can be parsed safely in HTTP mode. Envoy's HTTP client rewrites `content-length`
/// to the size it forwards, so only `x-envoy-auth-partial-body` says whether the body was cut at
/// `max_request_bytes`; without it, a truncated form could hide a field the backend will read.
pub fn body_completeness_known(
    headers: &HeaderMap,
    body: &[u8],
    allow_unsignalled_body: bool,
) -> bool {
    body.is_empty() || allow_unsignalled_body || headers.contains_key(PARTIAL_BODY_HEADER)
}

/// The original request target, without Envoy's path prefix.
pub fn original_path<'a>(path_and_query: &'a str, prefix: &str) -> std::borrow::Cow<'a, str> {
    match path_and_query.strip_prefix(prefix) {
        Some(rest) if !prefix.is_empty() && (rest.is_empty() || rest.starts_with('?')) => {
            format!("/{rest}").into()
        }
        Some(rest) if prefix.is_empty() || rest.starts_with('/') => rest.into(),
        _ => path_and_query.into(),
    }
}

/// The HTTP-service verdict for a check.
pub fn http_response_for(verdict: Verdict) -> HttpVerdict {
    match verdict {
        // 5xx is an authorization-server error to Envoy: its failure_mode_allow decides.
        Verdict::NotReady => HttpVerdict {
            allowed: false,
            status: 503,
            body: "no policy bundle is active yet".into(),
            ..Default::default()
        },
        Verdict::BadRequest(err) => http_input_error_verdict(&err),
        Verdict::Decided {
            decision,
            dry_run,
            decision_id,
        } => http_verdict(
            &decision,
            &ResponseOptions {
                dry_run,
                decision_id: Some(&decision_id),
            },
        ),
        Verdict::Failed {
            error, fail_open, ..
        } => http_error_verdict(&error, fail_open),
    }
}

async fn check(
    State(state): State<CheckState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let path = original_path(target, &state.path_prefix);
    let parts = HttpRequestParts {
        method: method.as_str(),
        path: &path,
        body: &body,
        time: Some(SystemTime::now()),
        ..Default::default()
    };
    let request = check_request_from_http(
        &parts,
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())),
    );
    let signalled = body_completeness_known(&headers, &body, state.allow_unsignalled_body);
    let verdict = state.authorizer.check(&path, |options| {
        if !signalled && !options.skip_request_body_parse {
            return Err(InputError::UnsignalledBody);
        }
        policy_input(&request, options)
    });
    into_response(http_response_for(verdict))
}

/// Headers a policy may not set on the answer to Envoy: they describe this response's framing
/// and connection, and a wrong value would make Envoy read the answer as an error (and then
/// `failure_mode_allow` decides) instead of as the policy's verdict.
const RESERVED_RESPONSE_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

fn into_response(verdict: HttpVerdict) -> Response {
    let status = StatusCode::from_u16(verdict.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = (status, verdict.body).into_response();
    let headers = response.headers_mut();
    for (name, value) in verdict.headers {
        if RESERVED_RESPONSE_HEADERS
            .iter()
            .any(|reserved| name.eq_ignore_ascii_case(reserved))
        {
            tracing::debug!(
                name,
                "policy set a framing header on the HTTP verdict; dropped"
            );
            continue;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::debug!(
                name,
                "policy returned a header that is not valid HTTP; dropped"
            ),
        }
    }
    response
}

/// `/healthz`, `/readyz` (200 once a bundle is active, with its revision) and `/metrics`.
pub fn admin_router(authorizer: Arc<Authorizer>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(authorizer)
}

async fn readyz(State(authorizer): State<Arc<Authorizer>>) -> Response {
    match authorizer.active() {
        Some(active) => (
            StatusCode::OK,
            format!("ok: revision {}\n", active.revision),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no policy bundle is active yet\n",
        )
            .into_response(),
    }
}

async fn metrics(State(authorizer): State<Arc<Authorizer>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        authorizer.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_cannot_set_the_framing_of_the_answer_to_envoy() {
        let response = into_response(HttpVerdict {
            allowed: false,
            status: 403,
            headers: vec![
                ("Content-Length".into(), "0".into()),
                ("transfer-encoding".into(), "chunked".into()),
                ("connection".into(), "close".into()),
                ("x-reason".into(), "blocked".into()),
                ("bad header".into(), "x".into()),
            ],
            body: "denied".into(),
            ..Default::default()
        });
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let headers = response.headers();
        assert!(headers.get(header::CONTENT_LENGTH).is_none());
        assert!(headers.get(header::TRANSFER_ENCODING).is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(
            headers.get("x-reason").map(|v| v.as_bytes()),
            Some(&b"blocked"[..])
        );
    }

    #[test]
    fn bodies_need_the_partial_body_signal_unless_trusted() {
        let mut headers = HeaderMap::new();
        assert!(body_completeness_known(&headers, b"", false));
        assert!(!body_completeness_known(&headers, b"a=1", false));
        assert!(body_completeness_known(&headers, b"a=1", true));
        headers.insert(PARTIAL_BODY_HEADER, HeaderValue::from_static("false"));
        assert!(body_completeness_known(&headers, b"a=1", false));
    }

    #[test]
    fn the_path_prefix_is_removed_only_on_a_segment_boundary() {
        assert_eq!(
            original_path("/authz/api/items?x=1", "/authz"),
            "/api/items?x=1"
        );
        assert_eq!(original_path("/authz?x=1", "/authz"), "/?x=1");
        assert_eq!(original_path("/authz", "/authz"), "/");
        assert_eq!(original_path("/authzed/api", "/authz"), "/authzed/api");
        assert_eq!(original_path("/api", ""), "/api");
    }
}
