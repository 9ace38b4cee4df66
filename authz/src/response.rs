//! Maps a policy decision to an Envoy ext_authz v3 `CheckResponse` (gRPC) or an HTTP verdict, mirroring OPA-Envoy.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::protobuf::{self as pbwk, value::Kind};
use envoy_types::pb::google::rpc::Status;
use serde_json::{Map, Value};

use super::input::InputError;

/// `google.rpc.Code.OK`.
pub const GRPC_OK: i32 = 0;
/// `google.rpc.Code.PERMISSION_DENIED`.
pub const GRPC_PERMISSION_DENIED: i32 = 7;
/// Denied-response status when the policy does not set `http_status`.
pub const DEFAULT_DENY_STATUS: u16 = 403;
/// HTTP-service header carrying `request_headers_to_remove` (comma separated).
pub const HEADERS_TO_REMOVE_HEADER: &str = "x-envoy-auth-headers-to-remove";

/// The policy result could not be used. OPA-Envoy answers these with a gRPC *error*
/// (code `UNKNOWN`, this message), leaving the outcome to Envoy's `failure_mode_allow` /
/// `status_on_error`; see also `error_check_response`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    /// The query was undefined (no result).
    #[error("undefined decision")]
    Undefined,
    /// The result is neither a boolean nor an object.
    #[error("illegal value for policy evaluation result: {0}")]
    IllegalType(&'static str),
    /// Object result without `allowed`.
    #[error(
        "failed to get response status: unable to determine evaluation result due to missing \"allowed\" key"
    )]
    MissingAllowed,
    /// `allowed` is not a boolean.
    #[error(
        "failed to get response status: type assertion error, expected allowed to be of type 'boolean' but got '{0}'"
    )]
    AllowedNotBool(&'static str),
    /// A response field has the wrong shape.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// Decision key, e.g. `headers`.
        field: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// `http_status` is not a status code Envoy knows.
    #[error("failed to get response http status: Invalid HTTP status code {0}")]
    InvalidHttpStatus(String),
}

/// A validated policy decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// `allow = true|false`: no headers, body or metadata.
    Bool(bool),
    /// Object decision (`{"allowed": bool, ...}`).
    Structured(Box<StructuredDecision>),
}

/// The fields of an object decision that OPA-Envoy uses.
///
/// Like OPA-Envoy, only the fields relevant to the outcome are read/validated:
/// `headers` and `dynamic_metadata` always; `request_headers_to_remove`,
/// `response_headers_to_add`, `query_parameters_to_set/_remove` only when allowed;
/// `body` and `http_status` only when denied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StructuredDecision {
    /// `allowed`.
    pub allowed: bool,
    /// `headers`: upstream request headers on allow, client response headers on deny.
    pub headers: Vec<(String, String)>,
    /// `dynamic_metadata` (object) → `CheckResponse.dynamic_metadata`.
    pub dynamic_metadata: Option<Map<String, Value>>,
    /// `request_headers_to_remove` → `OkHttpResponse.headers_to_remove`.
    pub request_headers_to_remove: Vec<String>,
    /// `response_headers_to_add` → `OkHttpResponse.response_headers_to_add`.
    pub response_headers_to_add: Vec<(String, String)>,
    /// `query_parameters_to_set` → `OkHttpResponse.query_parameters_to_set`.
    pub query_parameters_to_set: Vec<(String, String)>,
    /// `query_parameters_to_remove` → `OkHttpResponse.query_parameters_to_remove`.
    pub query_parameters_to_remove: Vec<String>,
    /// `body` of the denied response.
    pub body: String,
    /// `http_status` of the denied response (default 403).
    pub http_status: u16,
}

impl Decision {
    /// Validates a query result (`None` = undefined) the way OPA-Envoy does.
    pub fn from_result(result: Option<&Value>) -> Result<Self, DecisionError> {
        let obj = match result {
            None => return Err(DecisionError::Undefined),
            Some(Value::Bool(b)) => return Ok(Decision::Bool(*b)),
            Some(Value::Object(o)) => o,
            Some(other) => return Err(DecisionError::IllegalType(type_name(other))),
        };
        let allowed = match obj.get("allowed") {
            None => return Err(DecisionError::MissingAllowed),
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(DecisionError::AllowedNotBool(type_name(other))),
        };
        let mut d = StructuredDecision {
            allowed,
            http_status: DEFAULT_DENY_STATUS,
            ..Default::default()
        };
        if let Some(v) = obj.get("headers") {
            d.headers = headers(v, "headers")?;
        }
        d.dynamic_metadata = match obj.get("dynamic_metadata") {
            None => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(other) => {
                return Err(invalid(
                    "dynamic_metadata",
                    format!("expected object, got {}", type_name(other)),
                ));
            }
        };
        if allowed {
            if let Some(v) = obj.get("request_headers_to_remove") {
                d.request_headers_to_remove = strings(v, "request_headers_to_remove")?;
            }
            if let Some(v) = obj.get("response_headers_to_add") {
                d.response_headers_to_add = headers(v, "response_headers_to_add")?;
            }
            if let Some(v) = obj.get("query_parameters_to_set") {
                d.query_parameters_to_set = query_params(v)?;
            }
            if let Some(v) = obj.get("query_parameters_to_remove") {
                d.query_parameters_to_remove = strings(v, "query_parameters_to_remove")?;
            }
        } else {
            match obj.get("body") {
                None => {}
                Some(Value::String(s)) => d.body.clone_from(s),
                Some(other) => {
                    return Err(invalid(
                        "body",
                        format!("expected string, got {}", type_name(other)),
                    ));
                }
            }
            if let Some(v) = obj.get("http_status") {
                d.http_status = http_status(v)?;
            }
        }
        Ok(Decision::Structured(Box::new(d)))
    }

    /// Whether the policy allows the request (before any dry-run override).
    pub fn allowed(&self) -> bool {
        match self {
            Decision::Bool(b) => *b,
            Decision::Structured(d) => d.allowed,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn invalid(field: &'static str, reason: String) -> DecisionError {
    DecisionError::InvalidField { field, reason }
}

/// `{"k": "v" | ["v", ...]}` or a list of such objects (OPA-Envoy `transformAnyInputToHeadersBag`).
fn headers(v: &Value, field: &'static str) -> Result<Vec<(String, String)>, DecisionError> {
    fn from_obj(
        obj: &Map<String, Value>,
        field: &'static str,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), DecisionError> {
        for (k, v) in obj {
            match v {
                Value::String(s) => out.push((k.clone(), s.clone())),
                Value::Array(items) => {
                    for item in items {
                        let Value::String(s) = item else {
                            return Err(invalid(
                                field,
                                format!("invalid value type {} for header '{k}'", type_name(item)),
                            ));
                        };
                        out.push((k.clone(), s.clone()));
                    }
                }
                other => {
                    return Err(invalid(
                        field,
                        format!("invalid value type {} for header '{k}'", type_name(other)),
                    ));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    match v {
        Value::Object(obj) => from_obj(obj, field, &mut out)?,
        Value::Array(list) => {
            for item in list {
                let Value::Object(obj) = item else {
                    return Err(invalid(
                        field,
                        format!("expected object, got {}", type_name(item)),
                    ));
                };
                from_obj(obj, field, &mut out)?;
            }
        }
        other => {
            return Err(invalid(
                field,
                format!("expected object, got {}", type_name(other)),
            ));
        }
    }
    Ok(out)
}

fn strings(v: &Value, field: &'static str) -> Result<Vec<String>, DecisionError> {
    let Value::Array(items) = v else {
        return Err(invalid(
            field,
            format!("expected array of strings, got {}", type_name(v)),
        ));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                field,
                format!("expected string element, got {}", type_name(other)),
            )),
        })
        .collect()
}

/// OPA-Envoy accepts only an object `{"k": "v" | ["v", ...]}` here.
fn query_params(v: &Value) -> Result<Vec<(String, String)>, DecisionError> {
    const FIELD: &str = "query_parameters_to_set";
    let Value::Object(obj) = v else {
        return Err(invalid(
            FIELD,
            format!("expected object, got {}", type_name(v)),
        ));
    };
    let mut out = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        match v {
            Value::String(s) => out.push((k.clone(), s.clone())),
            Value::Array(items) => {
                for item in items {
                    let Value::String(s) = item else {
                        return Err(invalid(
                            FIELD,
                            format!("expected string element, got {}", type_name(item)),
                        ));
                    };
                    out.push((k.clone(), s.clone()));
                }
            }
            other => {
                return Err(invalid(
                    FIELD,
                    format!("expected string or array, got {}", type_name(other)),
                ));
            }
        }
    }
    Ok(out)
}

fn http_status(v: &Value) -> Result<u16, DecisionError> {
    let Value::Number(n) = v else {
        return Err(invalid(
            "http_status",
            format!("expected number, got {}", type_name(v)),
        ));
    };
    let code = n
        .as_i64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        .ok_or_else(|| DecisionError::InvalidHttpStatus(n.to_string()))?;
    let valid = code != 0
        && i32::try_from(code)
            .ok()
            .is_some_and(|c| StatusCode::try_from(c).is_ok());
    match u16::try_from(code) {
        Ok(c) if valid => Ok(c),
        _ => Err(DecisionError::InvalidHttpStatus(code.to_string())),
    }
}

/// Options applied when turning a decision into a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseOptions<'a> {
    /// OPA-Envoy `dry-run`: a denial becomes `OK` with an empty `OkHttpResponse`
    /// (dynamic metadata kept); report `Decision::allowed()` as the would-be outcome.
    pub dry_run: bool,
    /// Added as `dynamic_metadata.decision_id` (OPA-Envoy always adds one).
    pub decision_id: Option<&'a str>,
}

fn header_options(headers: &[(String, String)]) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .map(|(k, v)| HeaderValueOption {
            // Like OPA-Envoy: only `header`; `append` unset ("defaults to false" for
            // ext_authz, i.e. add or override), `append_action` default.
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// JSON object → `google.protobuf.Struct` (numbers become doubles).
pub fn json_to_struct(m: &Map<String, Value>) -> pbwk::Struct {
    pbwk::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), json_to_pb(v))).collect(),
    }
}

fn json_to_pb(v: &Value) -> pbwk::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(pbwk::ListValue {
            values: a.iter().map(json_to_pb).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    pbwk::Value { kind: Some(kind) }
}

fn with_decision_id(md: Option<pbwk::Struct>, decision_id: Option<&str>) -> Option<pbwk::Struct> {
    let Some(id) = decision_id else {
        return md;
    };
    let mut md = md.unwrap_or_else(|| pbwk::Struct {
        fields: HashMap::with_capacity(1),
    });
    md.fields.insert(
        "decision_id".to_owned(),
        pbwk::Value {
            kind: Some(Kind::StringValue(id.to_owned())),
        },
    );
    Some(md)
}

/// Builds the `CheckResponse` exactly like OPA-Envoy's `check()`:
/// status `OK`/`PERMISSION_DENIED`; boolean decisions carry no `http_response`;
/// object decisions get an `OkHttpResponse` or `DeniedHttpResponse`.
pub fn check_response(decision: &Decision, opts: &ResponseOptions<'_>) -> CheckResponse {
    let allowed = decision.allowed();
    let mut resp = CheckResponse {
        status: Some(Status {
            code: if allowed {
                GRPC_OK
            } else {
                GRPC_PERMISSION_DENIED
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Decision::Structured(d) = decision {
        resp.dynamic_metadata = d.dynamic_metadata.as_ref().map(json_to_struct);
        let headers = header_options(&d.headers);
        resp.http_response = Some(if allowed {
            HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove: d.request_headers_to_remove.clone(),
                response_headers_to_add: header_options(&d.response_headers_to_add),
                query_parameters_to_set: d
                    .query_parameters_to_set
                    .iter()
                    .map(|(k, v)| QueryParameter {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                query_parameters_to_remove: d.query_parameters_to_remove.clone(),
                ..Default::default()
            })
        } else {
            HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(d.http_status),
                }),
                headers,
                body: d.body.clone(),
            })
        });
    }
    if opts.dry_run && !allowed {
        resp.status = Some(Status {
            code: GRPC_OK,
            ..Default::default()
        });
        resp.http_response = Some(HttpResponse::OkResponse(OkHttpResponse::default()));
    }
    resp.dynamic_metadata = with_decision_id(resp.dynamic_metadata.take(), opts.decision_id);
    resp
}

/// Convenience: `Decision::from_result` + `check_response`. On `Err`, OPA-Envoy returns
/// the error as a gRPC status (`tonic::Status::unknown(err.to_string())`).
pub fn check_response_for_result(
    result: Option<&Value>,
    opts: &ResponseOptions<'_>,
) -> Result<CheckResponse, DecisionError> {
    Decision::from_result(result).map(|d| check_response(&d, opts))
}

/// The `CheckResponse` when the policy cannot decide (undefined, malformed result, evaluation
/// error). OPA-Envoy answers with a gRPC error and leaves the outcome to Envoy's
/// `failure_mode_allow`; Sluice decides itself so the policy's `failOpen` holds whatever Envoy's
/// setting: `fail_open` → `OK`, else `PERMISSION_DENIED` with the message and no `http_response`
/// (Envoy then replies 403).
pub fn error_check_response(message: &str, fail_open: bool) -> CheckResponse {
    CheckResponse {
        status: Some(Status {
            code: if fail_open {
                GRPC_OK
            } else {
                GRPC_PERMISSION_DENIED
            },
            message: message.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// OPA-Envoy's answer when the request cannot be turned into input (bad escape, invalid
/// JSON body, ...): `PERMISSION_DENIED` + denied `400` whose body is the message. Returned
/// even in dry-run, and without `decision_id`.
pub fn input_error_response(err: &InputError) -> CheckResponse {
    let message = format!("request_parse_error: {err}");
    CheckResponse {
        status: Some(Status {
            code: GRPC_PERMISSION_DENIED,
            message: message.clone(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(400u16),
            }),
            headers: Vec::new(),
            body: message,
        })),
        ..Default::default()
    }
}

/// Transport-neutral answer for Envoy's HTTP ext_authz service (`http_service`).
///
/// Envoy treats `200` as allow: response headers listed in `allowed_upstream_headers` are
/// set on the upstream request, those in `allowed_client_headers_on_success` on the client
/// response, and `x-envoy-auth-headers-to-remove` drops request headers. Any other status
/// is a denial forwarded to the client with body and `allowed_client_headers`; `5xx`
/// counts as an authz *error* (`failure_mode_allow` / `status_on_error`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpVerdict {
    /// Effective outcome (after dry-run).
    pub allowed: bool,
    /// Status the auth service answers with.
    pub status: u16,
    /// All response headers, in order.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: String,
    /// Headers meant for the upstream request on allow (subset of `headers`).
    pub upstream_headers: Vec<(String, String)>,
    /// Headers meant for the client on allow (`response_headers_to_add`, subset of `headers`).
    pub client_headers_on_success: Vec<(String, String)>,
}

/// Maps a decision to an HTTP-service verdict (same semantics as `check_response`;
/// `query_parameters_to_*` and `dynamic_metadata` have no HTTP-service equivalent and are
/// dropped).
pub fn http_verdict(decision: &Decision, opts: &ResponseOptions<'_>) -> HttpVerdict {
    let allowed = decision.allowed();
    if !allowed && opts.dry_run {
        return HttpVerdict {
            allowed: true,
            status: 200,
            ..Default::default()
        };
    }
    let Decision::Structured(d) = decision else {
        return HttpVerdict {
            allowed,
            status: if allowed { 200 } else { DEFAULT_DENY_STATUS },
            ..Default::default()
        };
    };
    if !allowed {
        return HttpVerdict {
            allowed,
            status: http_denial_status(d.http_status),
            headers: d.headers.clone(),
            body: d.body.clone(),
            ..Default::default()
        };
    }
    let mut headers = Vec::with_capacity(d.headers.len() + d.response_headers_to_add.len() + 1);
    headers.extend(d.headers.iter().cloned());
    headers.extend(d.response_headers_to_add.iter().cloned());
    if !d.request_headers_to_remove.is_empty() {
        headers.push((
            HEADERS_TO_REMOVE_HEADER.to_owned(),
            d.request_headers_to_remove.join(", "),
        ));
    }
    HttpVerdict {
        allowed,
        status: 200,
        headers,
        body: String::new(),
        upstream_headers: d.headers.clone(),
        client_headers_on_success: d.response_headers_to_add.clone(),
    }
}

/// The status an HTTP-mode denial is answered with. Envoy's HTTP ext_authz client allows a request
/// exactly when the answer is 200, reads 5xx as an authorization-server *error* (then
/// `failure_mode_allow` or `status_on_error` decides), and 1xx is no final answer at all; so a
/// denial asking for any of those is answered 403, and stays a denial whatever Envoy's settings.
/// (gRPC mode keeps the policy's status: there the denial is carried by the gRPC code.)
pub fn http_denial_status(requested: u16) -> u16 {
    match requested {
        200 | 100..=199 | 500.. => DEFAULT_DENY_STATUS,
        other => other,
    }
}

/// HTTP-service counterpart of [`error_check_response`]: `200` when failing open, else `403`
/// with the message as body.
pub fn http_error_verdict(message: &str, fail_open: bool) -> HttpVerdict {
    HttpVerdict {
        allowed: fail_open,
        status: if fail_open { 200 } else { DEFAULT_DENY_STATUS },
        body: if fail_open {
            String::new()
        } else {
            message.to_owned()
        },
        ..Default::default()
    }
}

/// HTTP-service counterpart of `input_error_response`: `400` with the message as body.
pub fn http_input_error_verdict(err: &InputError) -> HttpVerdict {
    HttpVerdict {
        allowed: false,
        status: 400,
        body: format!("request_parse_error: {err}"),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decide(v: Value) -> Result<Decision, DecisionError> {
        Decision::from_result(Some(&v))
    }

    fn resp(v: Value, opts: &ResponseOptions<'_>) -> CheckResponse {
        check_response(&decide(v).unwrap(), opts)
    }

    fn code(r: &CheckResponse) -> i32 {
        r.status.as_ref().map_or(-1, |s| s.code)
    }

    fn pairs(h: &[HeaderValueOption]) -> Vec<(String, String)> {
        let mut v: Vec<_> = h
            .iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        v.sort();
        v
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    fn ok(r: &CheckResponse) -> &OkHttpResponse {
        match &r.http_response {
            Some(HttpResponse::OkResponse(o)) => o,
            other => panic!("expected ok response, got {other:?}"),
        }
    }

    fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
        match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => d,
            other => panic!("expected denied response, got {other:?}"),
        }
    }

    const NO_OPTS: ResponseOptions<'static> = ResponseOptions {
        dry_run: false,
        decision_id: None,
    };

    #[test]
    fn boolean_decisions_have_no_http_response() {
        for (v, c) in [(true, GRPC_OK), (false, GRPC_PERMISSION_DENIED)] {
            let r = resp(json!(v), &NO_OPTS);
            assert_eq!(code(&r), c);
            assert!(r.http_response.is_none());
            assert!(r.dynamic_metadata.is_none());
        }
    }

    #[test]
    fn invalid_results_are_errors() {
        let cases = [
            (None, DecisionError::Undefined),
            (Some(json!("yes")), DecisionError::IllegalType("string")),
            (Some(json!(1)), DecisionError::IllegalType("number")),
            (Some(json!(null)), DecisionError::IllegalType("null")),
            (Some(json!([true])), DecisionError::IllegalType("array")),
            (Some(json!({})), DecisionError::MissingAllowed),
            (Some(json!({"headers": {}})), DecisionError::MissingAllowed),
            (
                Some(json!({"allowed": "true"})),
                DecisionError::AllowedNotBool("string"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                Decision::from_result(input.as_ref()),
                Err(expected),
                "{input:?}"
            );
        }
        assert_eq!(DecisionError::Undefined.to_string(), "undefined decision");
    }

    #[test]
    fn invalid_fields_table() {
        let bad = [
            json!({"allowed": true, "headers": "x"}),
            json!({"allowed": false, "headers": {"a": 1}}),
            json!({"allowed": true, "headers": {"a": ["x", 2]}}),
            json!({"allowed": true, "headers": ["x"]}),
            json!({"allowed": true, "dynamic_metadata": [1]}),
            json!({"allowed": false, "dynamic_metadata": "x"}),
            json!({"allowed": true, "request_headers_to_remove": "x"}),
            json!({"allowed": true, "request_headers_to_remove": [1]}),
            json!({"allowed": true, "response_headers_to_add": 1}),
            json!({"allowed": true, "query_parameters_to_set": [{"key": "a", "value": "b"}]}),
            json!({"allowed": true, "query_parameters_to_set": {"a": 1}}),
            json!({"allowed": true, "query_parameters_to_remove": {"a": 1}}),
            json!({"allowed": false, "body": {"msg": "no"}}),
            json!({"allowed": false, "http_status": "401"}),
            json!({"allowed": false, "http_status": 418}),
            json!({"allowed": false, "http_status": 0}),
            json!({"allowed": false, "http_status": 99999}),
            json!({"allowed": false, "http_status": 401.5}),
        ];
        for v in bad {
            assert!(decide(v.clone()).is_err(), "{v}");
        }
        // Like OPA-Envoy, fields irrelevant to the outcome are not validated.
        let ignored = [
            json!({"allowed": false, "request_headers_to_remove": 5, "query_parameters_to_set": []}),
            json!({"allowed": true, "body": 5, "http_status": "teapot"}),
        ];
        for v in ignored {
            assert!(decide(v.clone()).is_ok(), "{v}");
        }
    }

    #[test]
    fn structured_allow_maps_every_field() {
        let r = resp(
            json!({
                "allowed": true,
                "headers": {"x-user": "alice", "x-role": ["a", "b"]},
                "request_headers_to_remove": ["authorization"],
                "response_headers_to_add": [{"set-cookie": "s=1"}, {"set-cookie": "t=2"}],
                "query_parameters_to_set": {"tenant": "acme", "tag": ["x", "y"]},
                "query_parameters_to_remove": ["token"],
                "dynamic_metadata": {"user": "alice", "n": 2, "nested": {"ok": true}},
                "body": "ignored on allow",
                "http_status": 401
            }),
            &NO_OPTS,
        );
        assert_eq!(code(&r), GRPC_OK);
        let o = ok(&r);
        assert_eq!(
            pairs(&o.headers),
            vec![p("x-role", "a"), p("x-role", "b"), p("x-user", "alice")]
        );
        assert_eq!(o.headers_to_remove, vec!["authorization".to_owned()]);
        assert_eq!(
            pairs(&o.response_headers_to_add),
            vec![p("set-cookie", "s=1"), p("set-cookie", "t=2")]
        );
        let mut qs: Vec<_> = o
            .query_parameters_to_set
            .iter()
            .map(|q| (q.key.clone(), q.value.clone()))
            .collect();
        qs.sort();
        assert_eq!(qs, vec![p("tag", "x"), p("tag", "y"), p("tenant", "acme")]);
        assert_eq!(o.query_parameters_to_remove, vec!["token".to_owned()]);
        let md = r.dynamic_metadata.as_ref().unwrap();
        assert_eq!(
            md.fields["user"].kind,
            Some(Kind::StringValue("alice".into()))
        );
        assert_eq!(md.fields["n"].kind, Some(Kind::NumberValue(2.0)));
        assert!(matches!(
            md.fields["nested"].kind,
            Some(Kind::StructValue(_))
        ));
    }

    #[test]
    #[allow(deprecated)]
    fn header_value_options_match_opa_envoy() {
        let r = resp(json!({"allowed": true, "headers": {"k": "v"}}), &NO_OPTS);
        let hvo = &ok(&r).headers[0];
        assert_eq!(hvo.append, None);
        assert_eq!(hvo.append_action, 0);
        assert!(!hvo.keep_empty_value);
        assert!(hvo.header.as_ref().unwrap().raw_value.is_empty());
    }

    #[test]
    fn structured_deny_table() {
        let cases = [
            (json!({"allowed": false}), 403, "", vec![]),
            (
                json!({"allowed": false, "http_status": 401, "body": "login", "headers": {"www-authenticate": "Bearer"}}),
                401,
                "login",
                vec![p("www-authenticate", "Bearer")],
            ),
            (
                json!({"allowed": false, "http_status": 429.0}),
                429,
                "",
                vec![],
            ),
            (
                json!({"allowed": false, "http_status": 302, "headers": [{"location": "/login"}]}),
                302,
                "",
                vec![p("location", "/login")],
            ),
        ];
        for (v, status, body, headers) in cases {
            let r = resp(v.clone(), &NO_OPTS);
            assert_eq!(code(&r), GRPC_PERMISSION_DENIED, "{v}");
            let d = denied(&r);
            assert_eq!(d.status.as_ref().map(|s| s.code), Some(status), "{v}");
            assert_eq!(d.body, body, "{v}");
            assert_eq!(pairs(&d.headers), headers, "{v}");
        }
    }

    #[test]
    fn deny_keeps_dynamic_metadata_and_decision_id_is_added() {
        let opts = ResponseOptions {
            dry_run: false,
            decision_id: Some("d-1"),
        };
        let r = resp(
            json!({"allowed": false, "dynamic_metadata": {"why": "nope"}}),
            &opts,
        );
        let md = r.dynamic_metadata.unwrap();
        assert_eq!(md.fields.len(), 2);
        assert_eq!(
            md.fields["decision_id"].kind,
            Some(Kind::StringValue("d-1".into()))
        );
        let r = resp(json!(true), &opts);
        assert_eq!(r.dynamic_metadata.unwrap().fields.len(), 1);
    }

    #[test]
    fn dry_run_allows_but_reports_would_be_decision() {
        let opts = ResponseOptions {
            dry_run: true,
            decision_id: Some("d-2"),
        };
        for v in [
            json!(false),
            json!({"allowed": false, "http_status": 401, "body": "x", "headers": {"a": "b"}, "dynamic_metadata": {"k": 1}}),
        ] {
            let d = decide(v.clone()).unwrap();
            assert!(!d.allowed(), "would-be decision is deny");
            let r = check_response(&d, &opts);
            assert_eq!(code(&r), GRPC_OK);
            assert_eq!(ok(&r), &OkHttpResponse::default());
            assert!(
                r.dynamic_metadata
                    .unwrap()
                    .fields
                    .contains_key("decision_id")
            );
            let h = http_verdict(&d, &opts);
            assert!(h.allowed);
            assert_eq!(h.status, 200);
            assert!(h.headers.is_empty());
        }
        // An allow is untouched by dry-run.
        let r = resp(json!({"allowed": true, "headers": {"a": "b"}}), &opts);
        assert_eq!(ok(&r).headers.len(), 1);
    }

    #[test]
    fn result_and_error_helpers() {
        assert_eq!(
            check_response_for_result(None, &NO_OPTS),
            Err(DecisionError::Undefined)
        );
        let r = error_check_response("undefined decision", false);
        assert_eq!(code(&r), GRPC_PERMISSION_DENIED);
        assert_eq!(r.status.unwrap().message, "undefined decision");
        assert_eq!(
            code(&error_check_response("undefined decision", true)),
            GRPC_OK
        );

        let r = input_error_response(&InputError::SemicolonInQuery);
        assert_eq!(code(&r), GRPC_PERMISSION_DENIED);
        let d = denied(&r);
        assert_eq!(d.status.as_ref().map(|s| s.code), Some(400));
        assert_eq!(
            d.body,
            "request_parse_error: invalid semicolon separator in query"
        );
        let h = http_input_error_verdict(&InputError::SemicolonInQuery);
        assert_eq!((h.status, h.body.as_str()), (400, d.body.as_str()));
        let h = http_error_verdict("undefined decision", false);
        assert_eq!((h.status, h.body.as_str()), (403, "undefined decision"));
        assert!(!h.allowed);
        let h = http_error_verdict("undefined decision", true);
        assert_eq!(h.status, 200);
        assert!(h.allowed);
    }

    #[test]
    fn http_denials_are_never_answered_as_allow_or_as_server_error() {
        for (requested, answered) in [
            (200, 403),
            (100, 403),
            (500, 403),
            (503, 403),
            (504, 403),
            (201, 201),
            (302, 302),
            (401, 401),
            (429, 429),
        ] {
            assert_eq!(http_denial_status(requested), answered, "{requested}");
            let d =
                decide(json!({"allowed": false, "http_status": requested, "body": "no"})).unwrap();
            let h = http_verdict(&d, &NO_OPTS);
            assert_eq!(
                (h.allowed, h.status, h.body.as_str()),
                (false, answered, "no")
            );
            // gRPC mode keeps the policy's status: the gRPC code carries the denial.
            let r = check_response(&d, &NO_OPTS);
            assert_eq!(code(&r), GRPC_PERMISSION_DENIED);
            assert_eq!(
                denied(&r).status.as_ref().map(|s| s.code),
                Some(i32::from(requested))
            );
        }
    }

    #[test]
    fn http_verdict_table() {
        let cases = [
            (json!(true), true, 200, vec![], ""),
            (json!(false), false, 403, vec![], ""),
            (
                json!({"allowed": true, "headers": {"x-user": "alice"}, "response_headers_to_add": {"x-trace": "1"}, "request_headers_to_remove": ["authorization", "cookie"], "query_parameters_to_set": {"a": "b"}}),
                true,
                200,
                vec![
                    p("x-user", "alice"),
                    p("x-trace", "1"),
                    p(HEADERS_TO_REMOVE_HEADER, "authorization, cookie"),
                ],
                "",
            ),
            (
                json!({"allowed": false, "http_status": 401, "body": "login", "headers": {"www-authenticate": "Bearer"}}),
                false,
                401,
                vec![p("www-authenticate", "Bearer")],
                "login",
            ),
        ];
        for (v, allowed, status, headers, body) in cases {
            let h = http_verdict(&decide(v.clone()).unwrap(), &NO_OPTS);
            assert_eq!(
                (h.allowed, h.status, h.headers.clone(), h.body.as_str()),
                (allowed, status, headers, body),
                "{v}"
            );
        }
        let h = http_verdict(
            &decide(json!({"allowed": true, "headers": {"u": "1"}, "response_headers_to_add": {"c": "2"}})).unwrap(),
            &NO_OPTS,
        );
        assert_eq!(h.upstream_headers, vec![p("u", "1")]);
        assert_eq!(h.client_headers_on_success, vec![p("c", "2")]);
    }
}
