//! Builds the OPA-Envoy-compatible policy `input` document from an Envoy ext_authz v3 `CheckRequest` (or a plain HTTP request).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderMap, Metadata, SocketAddress, address, envoy_internal_address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::{self as pbwk, value::Kind};
use serde_json::{Map, Number, Value};

/// Header Envoy sets to `"true"` when the forwarded body was cut at `max_request_bytes`.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// How protobuf types whose JSON form is ambiguous are rendered under `input.attributes`.
///
/// Everything else (camelCase names, only populated fields, maps as objects, bytes as
/// base64, `Struct` as plain JSON) is identical in both flavours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProtoEncoding {
    /// Current OPA-Envoy (`envoyauth/protomap.go`, v1.x): `int64` as JSON numbers,
    /// `Timestamp` as `{"seconds": n, "nanos": n}`, enums as numbers.
    #[default]
    Protomap,
    /// Canonical protojson (older OPA-Envoy releases): `int64` as decimal strings,
    /// `Timestamp` as an RFC 3339 string, enums by name.
    ProtoJson,
}

/// Options for building the input document.
#[derive(Debug, Clone, Copy, Default)]
pub struct InputOptions {
    /// OPA-Envoy `skip-request-body-parse`: omit `parsed_body` and `truncated_body`.
    pub skip_request_body_parse: bool,
    /// Rendering of `int64`, `Timestamp` and enum fields.
    pub encoding: ProtoEncoding,
}

/// The request could not be turned into an input document (OPA-Envoy answers these with
/// `PERMISSION_DENIED` and a `400` denied response, see `response::input_error_response`).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// `%` not followed by two hex digits in the path or query.
    #[error("invalid URL escape {0:?}")]
    InvalidEscape(String),
    /// Go's `url.ParseQuery` rejects `;` as a separator.
    #[error("invalid semicolon separator in query")]
    SemicolonInQuery,
    /// `content-length` is not an integer.
    #[error("strconv.ParseInt: parsing {0:?}: invalid syntax")]
    InvalidContentLength(String),
    /// Body declared as `application/json` is not valid JSON.
    #[error("invalid JSON body: {0}")]
    InvalidJsonBody(#[from] serde_json::Error),
    /// Malformed `multipart/form-data` body, or one Go's reader would not read the same way.
    #[error("invalid multipart body: {0}")]
    InvalidMultipart(#[from] super::multipart::MultipartError),
    /// The `content-type` of a multipart body is not a valid media type.
    #[error("invalid content-type: {0}")]
    InvalidContentType(#[from] super::multipart::MediaTypeError),
    /// HTTP mode: a body without `x-envoy-auth-partial-body`, so whether it is complete is unknown.
    #[error(
        "request body without the x-envoy-auth-partial-body header: add it to Envoy's http_service authorization_request.allowed_headers (or start sluice authz with --http-allow-unsignalled-body if allow_partial_message is false)"
    )]
    UnsignalledBody,
}

/// The policy `input`: the JSON document (what decision logs record) and, when the body held numbers
/// an `f64` cannot represent, `parsed_body` again with those numbers exact (OPA keeps them exact).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInput {
    pub document: Value,
    exact_body: Option<regorus::Value>,
}

impl PolicyInput {
    /// The value the policy is evaluated on.
    pub fn into_rego(self) -> regorus::Value {
        let mut input = regorus::Value::from(self.document);
        if let (Some(body), Ok(fields)) = (self.exact_body, input.as_object_mut()) {
            fields.insert(regorus::Value::from("parsed_body"), body);
        }
        input
    }

    /// `parsed_body` with exact numbers, when it differs from the document's.
    pub fn exact_body(&self) -> Option<&regorus::Value> {
        self.exact_body.as_ref()
    }
}

/// Builds `input` for a `CheckRequest` exactly like OPA-Envoy's `RequestToInput` (v3):
/// `attributes` (proto-JSON, camelCase, populated fields only), `version`, `parsed_path`,
/// `parsed_query`, `parsed_body`, `truncated_body` and `source_principal` (when non-empty).
pub fn input_from_check_request(
    req: &CheckRequest,
    opts: &InputOptions,
) -> Result<Value, InputError> {
    policy_input(req, opts).map(|input| input.document)
}

/// [`input_from_check_request`], keeping big numbers of the body exact for evaluation.
pub fn policy_input(req: &CheckRequest, opts: &InputOptions) -> Result<PolicyInput, InputError> {
    let enc = opts.encoding;
    let mut input = Map::new();
    if let Some(attrs) = &req.attributes {
        input.insert("attributes".into(), attributes_json(attrs, enc));
    }
    let mut version = Map::new();
    version.insert("encoding".into(), Value::from("protojson"));
    version.insert("ext_authz".into(), Value::from("v3"));
    input.insert("version".into(), Value::Object(version));

    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let (path, body, raw_body, headers) = match http {
        Some(h) => (
            h.path.as_str(),
            h.body.as_str(),
            h.raw_body.as_slice(),
            Some(&h.headers),
        ),
        None => ("", "", &[][..], None),
    };

    let (parsed_path, parsed_query) = parse_path_and_query(path)?;
    input.insert("parsed_path".into(), parsed_path);
    input.insert("parsed_query".into(), parsed_query);

    let mut exact_body = None;
    if !opts.skip_request_body_parse {
        let empty = HashMap::new();
        let (parsed_body, truncated) = parse_body(headers.unwrap_or(&empty), body, raw_body)?;
        input.insert("parsed_body".into(), parsed_body.json);
        input.insert("truncated_body".into(), Value::Bool(truncated));
        exact_body = parsed_body.exact;
    }

    if let Some(p) = req
        .attributes
        .as_ref()
        .and_then(|a| a.source.as_ref())
        .map(|s| s.principal.as_str())
        .filter(|p| !p.is_empty())
    {
        input.insert("source_principal".into(), Value::from(p));
    }
    Ok(PolicyInput {
        document: Value::Object(input),
        exact_body,
    })
}

/// A plain HTTP request as received by Sluice's HTTP ext_authz service
/// (Envoy `http_service`; strip Envoy's `path_prefix` from `path` first).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpRequestParts<'a> {
    /// Request method, e.g. `GET`.
    pub method: &'a str,
    /// Original request target (path and query), without the `path_prefix`.
    pub path: &'a str,
    /// Request body Envoy forwarded (`with_request_body`), possibly empty.
    pub body: &'a [u8],
    /// Downstream peer (`attributes.source.address`), e.g. from `x-forwarded-for`.
    pub source: Option<SocketAddr>,
    /// Local address (`attributes.destination.address`).
    pub destination: Option<SocketAddr>,
    /// `attributes.request.http.scheme`.
    pub scheme: Option<&'a str>,
    /// `attributes.request.http.protocol`, e.g. `HTTP/1.1`.
    pub protocol: Option<&'a str>,
    /// `attributes.request.time`.
    pub time: Option<SystemTime>,
}

/// Converts an HTTP-mode request into the equivalent `CheckRequest`, so that
/// `input_from_check_request` yields the same `input` shape as gRPC mode.
///
/// Header names are lower-cased and repeated headers joined with `,` (as Envoy does);
/// `host` comes from `:authority`/`host`, `id` from `x-request-id`. A body that is valid
/// UTF-8 goes to `http.body`, otherwise to `http.rawBody`.
pub fn check_request_from_http<'h>(
    parts: &HttpRequestParts<'_>,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> CheckRequest {
    let mut map: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value);
        let name = name.to_ascii_lowercase();
        match map.get_mut(&name) {
            Some(existing) => {
                existing.push(',');
                existing.push_str(&value);
            }
            None => {
                map.insert(name, value.into_owned());
            }
        }
    }
    let host = map
        .get(":authority")
        .or_else(|| map.get("host"))
        .cloned()
        .unwrap_or_default();
    let id = map.get("x-request-id").cloned().unwrap_or_default();
    let (body, raw_body) = match std::str::from_utf8(parts.body) {
        Ok(s) => (s.to_owned(), Vec::new()),
        Err(_) => (String::new(), parts.body.to_vec()),
    };
    let http = HttpRequest {
        id,
        method: parts.method.to_owned(),
        headers: map,
        path: parts.path.to_owned(),
        host,
        scheme: parts.scheme.unwrap_or_default().to_owned(),
        protocol: parts.protocol.unwrap_or_default().to_owned(),
        body,
        raw_body,
        ..Default::default()
    };
    let time = parts.time.map(|t| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => pbwk::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        },
        Err(_) => pbwk::Timestamp::default(),
    });
    let peer = |addr: Option<SocketAddr>| {
        addr.map(|a| Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: a.ip().to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                        a.port(),
                    ))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: peer(parts.source),
            destination: peer(parts.destination),
            request: Some(Request {
                time,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

// ---------------------------------------------------------------------------
// proto -> JSON (populated fields only, JSON/camelCase names)
// ---------------------------------------------------------------------------

fn put_str(m: &mut Map<String, Value>, key: &str, v: &str) {
    if !v.is_empty() {
        m.insert(key.to_owned(), Value::from(v));
    }
}

fn put_str_map(m: &mut Map<String, Value>, key: &str, v: &HashMap<String, String>) {
    if !v.is_empty() {
        let obj = v
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        m.insert(key.to_owned(), Value::Object(obj));
    }
}

fn put_bytes(m: &mut Map<String, Value>, key: &str, v: &[u8]) {
    if !v.is_empty() {
        m.insert(key.to_owned(), Value::from(BASE64.encode(v)));
    }
}

fn int64(v: i64, enc: ProtoEncoding) -> Value {
    match enc {
        ProtoEncoding::Protomap => Value::from(v),
        ProtoEncoding::ProtoJson => Value::from(v.to_string()),
    }
}

fn attributes_json(a: &AttributeContext, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    if let Some(p) = &a.source {
        m.insert("source".into(), peer_json(p, enc));
    }
    if let Some(p) = &a.destination {
        m.insert("destination".into(), peer_json(p, enc));
    }
    if let Some(r) = &a.request {
        m.insert("request".into(), request_json(r, enc));
    }
    put_str_map(&mut m, "contextExtensions", &a.context_extensions);
    if let Some(md) = &a.metadata_context {
        m.insert("metadataContext".into(), metadata_json(md));
    }
    if let Some(md) = &a.route_metadata_context {
        m.insert("routeMetadataContext".into(), metadata_json(md));
    }
    if let Some(t) = &a.tls_session {
        m.insert("tlsSession".into(), tls_json(t));
    }
    Value::Object(m)
}

fn peer_json(p: &Peer, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    if let Some(a) = &p.address {
        m.insert("address".into(), address_json(a, enc));
    }
    put_str(&mut m, "service", &p.service);
    put_str_map(&mut m, "labels", &p.labels);
    put_str(&mut m, "principal", &p.principal);
    put_str(&mut m, "certificate", &p.certificate);
    Value::Object(m)
}

fn address_json(a: &Address, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            m.insert("socketAddress".into(), socket_json(s, enc));
        }
        Some(address::Address::Pipe(p)) => {
            let mut pm = Map::new();
            put_str(&mut pm, "path", &p.path);
            if p.mode != 0 {
                pm.insert("mode".into(), Value::from(p.mode));
            }
            m.insert("pipe".into(), Value::Object(pm));
        }
        Some(address::Address::EnvoyInternalAddress(e)) => {
            let mut em = Map::new();
            if let Some(envoy_internal_address::AddressNameSpecifier::ServerListenerName(n)) =
                &e.address_name_specifier
            {
                // oneof member: emitted even when empty.
                em.insert("serverListenerName".into(), Value::from(n.as_str()));
            }
            put_str(&mut em, "endpointId", &e.endpoint_id);
            m.insert("envoyInternalAddress".into(), Value::Object(em));
        }
        None => {}
    }
    Value::Object(m)
}

fn socket_json(s: &SocketAddress, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    if s.protocol != 0 {
        let v = match (enc, socket_address::Protocol::try_from(s.protocol)) {
            (ProtoEncoding::ProtoJson, Ok(p)) => Value::from(p.as_str_name()),
            _ => Value::from(s.protocol),
        };
        m.insert("protocol".into(), v);
    }
    put_str(&mut m, "address", &s.address);
    match &s.port_specifier {
        // oneof members carry presence: a set port 0 is still emitted.
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            m.insert("portValue".into(), Value::from(*p));
        }
        Some(socket_address::PortSpecifier::NamedPort(n)) => {
            m.insert("namedPort".into(), Value::from(n.as_str()));
        }
        None => {}
    }
    put_str(&mut m, "resolverName", &s.resolver_name);
    if s.ipv4_compat {
        m.insert("ipv4Compat".into(), Value::Bool(true));
    }
    put_str(
        &mut m,
        "networkNamespaceFilepath",
        &s.network_namespace_filepath,
    );
    Value::Object(m)
}

fn request_json(r: &Request, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    if let Some(t) = &r.time {
        m.insert("time".into(), timestamp_json(t, enc));
    }
    if let Some(h) = &r.http {
        m.insert("http".into(), http_json(h, enc));
    }
    Value::Object(m)
}

fn http_json(h: &HttpRequest, enc: ProtoEncoding) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "id", &h.id);
    put_str(&mut m, "method", &h.method);
    put_str_map(&mut m, "headers", &h.headers);
    if let Some(hm) = &h.header_map {
        m.insert("headerMap".into(), header_map_json(hm));
    }
    put_str(&mut m, "path", &h.path);
    put_str(&mut m, "host", &h.host);
    put_str(&mut m, "scheme", &h.scheme);
    put_str(&mut m, "query", &h.query);
    put_str(&mut m, "fragment", &h.fragment);
    if h.size != 0 {
        m.insert("size".into(), int64(h.size, enc));
    }
    put_str(&mut m, "protocol", &h.protocol);
    put_str(&mut m, "body", &h.body);
    put_bytes(&mut m, "rawBody", &h.raw_body);
    Value::Object(m)
}

fn header_map_json(hm: &HeaderMap) -> Value {
    let mut m = Map::new();
    if !hm.headers.is_empty() {
        let list = hm
            .headers
            .iter()
            .map(|hv| {
                let mut o = Map::new();
                put_str(&mut o, "key", &hv.key);
                put_str(&mut o, "value", &hv.value);
                put_bytes(&mut o, "rawValue", &hv.raw_value);
                Value::Object(o)
            })
            .collect();
        m.insert("headers".into(), Value::Array(list));
    }
    Value::Object(m)
}

fn metadata_json(md: &Metadata) -> Value {
    let mut m = Map::new();
    if !md.filter_metadata.is_empty() {
        let obj = md
            .filter_metadata
            .iter()
            .map(|(k, s)| (k.clone(), struct_json(s)))
            .collect();
        m.insert("filterMetadata".into(), Value::Object(obj));
    }
    if !md.typed_filter_metadata.is_empty() {
        // Both flavours: `{typeUrl, value(base64)}` (protomap's view of `Any`; protojson would
        // need the type registry to expand it).
        let obj = md
            .typed_filter_metadata
            .iter()
            .map(|(k, any)| {
                let mut o = Map::new();
                put_str(&mut o, "typeUrl", &any.type_url);
                put_bytes(&mut o, "value", &any.value);
                (k.clone(), Value::Object(o))
            })
            .collect();
        m.insert("typedFilterMetadata".into(), Value::Object(obj));
    }
    Value::Object(m)
}

fn tls_json(t: &TlsSession) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "sni", &t.sni);
    Value::Object(m)
}

/// `google.protobuf.Struct` as plain JSON (numbers are doubles; NaN/Inf become `null`).
pub(crate) fn struct_json(s: &pbwk::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), pb_value_json(v)))
            .collect(),
    )
}

fn pb_value_json(v: &pbwk::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::from(s.as_str()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(pb_value_json).collect()),
    }
}

fn timestamp_json(t: &pbwk::Timestamp, enc: ProtoEncoding) -> Value {
    match enc {
        ProtoEncoding::Protomap => {
            let mut m = Map::new();
            if t.seconds != 0 {
                m.insert("seconds".into(), Value::from(t.seconds));
            }
            if t.nanos != 0 {
                m.insert("nanos".into(), Value::from(t.nanos));
            }
            Value::Object(m)
        }
        ProtoEncoding::ProtoJson => Value::from(rfc3339(t.seconds, t.nanos)),
    }
}

/// protojson's Timestamp format: UTC, `Z`, and 0, 3, 6 or 9 fractional digits.
fn rfc3339(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    let nanos = nanos.clamp(0, 999_999_999);
    if nanos != 0 {
        if nanos % 1_000_000 == 0 {
            out.push_str(&format!(".{:03}", nanos / 1_000_000));
        } else if nanos % 1_000 == 0 {
            out.push_str(&format!(".{:06}", nanos / 1_000));
        } else {
            out.push_str(&format!(".{nanos:09}"));
        }
    }
    out.push('Z');
    out
}

// ---------------------------------------------------------------------------
// parsed_path / parsed_query / parsed_body (Go net/url semantics)
// ---------------------------------------------------------------------------

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Go's `url.PathUnescape` (`plus_is_space = false`) / `url.QueryUnescape` (`true`).
fn unescape(s: &str, plus_is_space: bool) -> Result<Cow<'_, str>, InputError> {
    let bytes = s.as_bytes();
    let needs_decoding = bytes.contains(&b'%') || (plus_is_space && bytes.contains(&b'+'));
    if !needs_decoding {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
                    _ => None,
                };
                let Some(b) = decoded else {
                    let end = (i + 3).min(bytes.len());
                    let bad = String::from_utf8_lossy(&bytes[i..end]).into_owned();
                    return Err(InputError::InvalidEscape(bad));
                };
                out.push(b);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// Go's `url.ParseQuery` into `{key: [values...]}`; like Go, keeps parsing after an error
/// but reports the first one.
fn parse_query(query: &str) -> Result<Map<String, Value>, InputError> {
    let mut out: Map<String, Value> = Map::new();
    let mut first_err = None;
    for pair in query.split('&') {
        if pair.contains(';') {
            first_err.get_or_insert(InputError::SemicolonInQuery);
            continue;
        }
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = match (unescape(k, true), unescape(v, true)) {
            (Ok(k), Ok(v)) => (k, v),
            (Err(e), _) | (_, Err(e)) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let v = Value::from(v.into_owned());
        match out.get_mut(k.as_ref()) {
            Some(Value::Array(list)) => list.push(v),
            _ => {
                out.insert(k.into_owned(), Value::Array(vec![v]));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// `parsed_path` and `parsed_query` as in OPA-Envoy: cut at the first `?`, path-unescape,
/// trim leading `/`, split on `/` (so `/` and `""` give `[""]`, and `%2F` splits).
pub fn parse_path_and_query(path: &str) -> Result<(Value, Value), InputError> {
    let (raw_path, raw_query) = path.split_once('?').unwrap_or((path, ""));
    let decoded = unescape(raw_path, false)?;
    let segments = decoded
        .trim_start_matches('/')
        .split('/')
        .map(Value::from)
        .collect();
    Ok((
        Value::Array(segments),
        Value::Object(parse_query(raw_query)?),
    ))
}

/// `parsed_body` as JSON, and again with exact numbers when that differs.
struct ParsedBody {
    json: Value,
    exact: Option<regorus::Value>,
}

impl ParsedBody {
    const NULL: ParsedBody = ParsedBody {
        json: Value::Null,
        exact: None,
    };
}

/// Returns `(parsed_body, truncated_body)` per OPA-Envoy's `getParsedBody`: the content type is
/// matched by substring in the same order (JSON, gRPC, form, multipart).
fn parse_body(
    headers: &HashMap<String, String>,
    body: &str,
    raw_body: &[u8],
) -> Result<(ParsedBody, bool), InputError> {
    if headers.get(PARTIAL_BODY_HEADER).map(String::as_str) == Some("true") {
        return Ok((ParsedBody::NULL, true));
    }
    let Some(content_type) = headers.get("content-type") else {
        return Ok((ParsedBody::NULL, false));
    };
    let kind = if content_type.contains("application/json") {
        BodyKind::Json
    } else if content_type.contains("application/grpc") {
        // Needs a proto descriptor set (unsupported, as OPA-Envoy without `proto-descriptor`).
        return Ok((ParsedBody::NULL, false));
    } else if content_type.contains("application/x-www-form-urlencoded") {
        BodyKind::Form
    } else if content_type.contains("multipart/form-data") {
        BodyKind::Multipart
    } else {
        return Ok((ParsedBody::NULL, false));
    };
    let payload: &[u8] = if !body.is_empty() {
        body.as_bytes()
    } else if !raw_body.is_empty() {
        raw_body
    } else {
        return Ok((ParsedBody::NULL, false));
    };
    if let Some(cl) = headers.get("content-length") {
        let cl: i64 = cl
            .parse()
            .map_err(|_| InputError::InvalidContentLength(cl.clone()))?;
        let len = i64::try_from(payload.len()).unwrap_or(i64::MAX);
        if cl != -1 && cl > len {
            return Ok((ParsedBody::NULL, true));
        }
    }
    let parsed = match kind {
        BodyKind::Json => parse_json(&go_lossy(payload))?,
        BodyKind::Form => ParsedBody {
            json: Value::Object(parse_query(&go_lossy(payload))?),
            exact: None,
        },
        BodyKind::Multipart => parse_multipart(content_type, payload)?,
    };
    Ok((parsed, false))
}

enum BodyKind {
    Json,
    Form,
    Multipart,
}

/// Bytes as a Go program turning them into UTF-8 text sees them (`encoding/json`, `range` over a
/// string): each byte that is not part of valid UTF-8 becomes one U+FFFD.
fn go_lossy(bytes: &[u8]) -> Cow<'_, str> {
    let Err(_) = std::str::from_utf8(bytes) else {
        return String::from_utf8_lossy(bytes);
    };
    let mut out = String::with_capacity(bytes.len() + 8);
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                return Cow::Owned(out);
            }
            Err(e) => {
                let (valid, invalid) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                out.push(char::REPLACEMENT_CHARACTER);
                rest = &invalid[1..];
            }
        }
    }
}

/// JSON as OPA's `util.UnmarshalJSON` reads it. OPA keeps numbers as their decimal text, so
/// `12345678901234567891` and `12345678901234567890` differ; `serde_json` would make both the same
/// `f64`. When a number is not exact as `f64` (or a 64-bit integer), the value is built again for
/// evaluation with each number taken from its text.
fn parse_json(text: &str) -> Result<ParsedBody, serde_json::Error> {
    let json: Value = serde_json::from_str(text)?;
    let numbers = number_tokens(text);
    if numbers.iter().all(|n| exact_as_f64(n)) {
        return Ok(ParsedBody { json, exact: None });
    }
    use serde::de::DeserializeSeed as _;
    let mut numbers = numbers.into_iter();
    let mut de = serde_json::Deserializer::from_str(text);
    let exact = ExactValue {
        numbers: &mut numbers,
    }
    .deserialize(&mut de)?;
    Ok(ParsedBody {
        json,
        exact: Some(exact),
    })
}

/// The number literals of a valid JSON text, in document order.
fn number_tokens(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                out.push(&text[start..i]);
            }
            _ => i += 1,
        }
    }
    out
}

fn exact_as_f64(literal: &str) -> bool {
    if literal.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok();
    }
    match (
        regorus::Value::from_numeric_string(literal),
        literal.parse::<f64>(),
    ) {
        (Ok(exact), Ok(float)) => exact == regorus::Value::from(float),
        _ => false,
    }
}

/// Builds a `regorus::Value` from JSON, taking each number from its literal text.
struct ExactValue<'a, 't> {
    numbers: &'a mut std::vec::IntoIter<&'t str>,
}

impl ExactValue<'_, '_> {
    fn number<E: serde::de::Error>(self) -> Result<regorus::Value, E> {
        let literal = self
            .numbers
            .next()
            .ok_or_else(|| E::custom("number literals out of step"))?;
        regorus::Value::from_numeric_string(literal)
            .map_err(|_| E::custom(format!("number {literal} is out of range")))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ExactValue<'_, '_> {
    type Value = regorus::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<regorus::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ExactValue<'_, '_> {
    type Value = regorus::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<regorus::Value, E> {
        Ok(regorus::Value::from(v))
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<regorus::Value, E> {
        self.number()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<regorus::Value, E> {
        self.number()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<regorus::Value, E> {
        self.number()
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<regorus::Value, E> {
        Ok(regorus::Value::from(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<regorus::Value, E> {
        Ok(regorus::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<regorus::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(ExactValue {
            numbers: &mut *self.numbers,
        })? {
            items.push(item);
        }
        Ok(regorus::Value::from(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<regorus::Value, A::Error> {
        let mut fields = std::collections::BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(ExactValue {
                numbers: &mut *self.numbers,
            })?;
            fields.insert(regorus::Value::from(key), value);
        }
        Ok(regorus::Value::from(fields))
    }
}

/// `multipart/form-data` as OPA-Envoy reads it with Go's `mime/multipart`: `{name: [value...]}`,
/// parts whose Content-Type contains `application/json` parsed as JSON, nameless parts skipped.
fn parse_multipart(content_type: &str, payload: &[u8]) -> Result<ParsedBody, InputError> {
    let media = super::multipart::parse_media_type(content_type.as_bytes())?;
    let Some(boundary) = media.params.get("boundary") else {
        return Ok(ParsedBody::NULL);
    };
    let fields = super::multipart::read_form(payload, boundary)?;
    let mut json: Map<String, Value> = Map::new();
    // Exact values in field order; only kept when a JSON part had a number f64 cannot hold.
    let mut exact_values: Vec<(String, Option<regorus::Value>)> = Vec::new();
    for field in fields {
        let is_json = memchr::memmem::find(&field.content_type, b"application/json").is_some();
        let (value, exact_value) = if is_json {
            let parsed = parse_json(&go_lossy(&field.value))?;
            (parsed.json, parsed.exact)
        } else {
            (Value::from(go_lossy(&field.value).into_owned()), None)
        };
        match json.get_mut(&field.name) {
            Some(Value::Array(list)) => list.push(value),
            _ => {
                json.insert(field.name.clone(), Value::Array(vec![value]));
            }
        }
        exact_values.push((field.name, exact_value));
    }
    let exact = exact_values.iter().any(|(_, v)| v.is_some()).then(|| {
        let mut lists: std::collections::BTreeMap<String, Vec<regorus::Value>> = Default::default();
        for (name, exact_value) in exact_values {
            let index = lists.get(&name).map_or(0, Vec::len);
            let value =
                exact_value.unwrap_or_else(|| regorus::Value::from(json[&name][index].clone()));
            lists.entry(name).or_default().push(value);
        }
        regorus::Value::from(
            lists
                .into_iter()
                .map(|(name, values)| (regorus::Value::from(name), regorus::Value::from(values)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
    });
    Ok(ParsedBody {
        json: Value::Object(json),
        exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue;
    use serde_json::json;

    fn struct_of(v: Value) -> pbwk::Struct {
        fn pb(v: &Value) -> pbwk::Value {
            let kind = match v {
                Value::Null => Kind::NullValue(0),
                Value::Bool(b) => Kind::BoolValue(*b),
                Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
                Value::String(s) => Kind::StringValue(s.clone()),
                Value::Array(a) => Kind::ListValue(pbwk::ListValue {
                    values: a.iter().map(pb).collect(),
                }),
                Value::Object(o) => Kind::StructValue(pbwk::Struct {
                    fields: o.iter().map(|(k, v)| (k.clone(), pb(v))).collect(),
                }),
            };
            pbwk::Value { kind: Some(kind) }
        }
        match pb(&v).kind {
            Some(Kind::StructValue(s)) => s,
            _ => pbwk::Struct::default(),
        }
    }

    fn socket(addr: &str, port: u32) -> Option<Address> {
        Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        })
    }

    fn hmap(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A request shaped like what Envoy sends from an Istio sidecar.
    fn realistic() -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: socket("10.244.0.12", 43_512),
                    principal: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
                    ..Default::default()
                }),
                destination: Some(Peer {
                    address: socket("10.244.0.20", 8080),
                    principal: "spiffe://cluster.local/ns/shop/sa/orders".into(),
                    labels: hmap(&[("app", "orders")]),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: Some(pbwk::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 123_000_000,
                    }),
                    http: Some(HttpRequest {
                        id: "4031816203955893765".into(),
                        method: "POST".into(),
                        headers: hmap(&[
                            (":authority", "orders.shop.svc:8080"),
                            (":method", "POST"),
                            (":path", "/api/v1/orders%20new?dry=true&tag=a&tag=b"),
                            ("content-type", "application/json"),
                            ("authorization", "Bearer abc"),
                        ]),
                        path: "/api/v1/orders%20new?dry=true&tag=a&tag=b".into(),
                        host: "orders.shop.svc:8080".into(),
                        scheme: "http".into(),
                        size: 27,
                        protocol: "HTTP/1.1".into(),
                        body: r#"{"item":"book","qty":2.5e0}"#.into(),
                        ..Default::default()
                    }),
                }),
                context_extensions: hmap(&[("virtual_host", "orders")]),
                metadata_context: Some(Metadata {
                    filter_metadata: [(
                        "envoy.filters.http.jwt_authn".to_owned(),
                        struct_of(json!({"sub": "alice", "roles": ["admin"], "exp": 1.0})),
                    )]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn realistic_request_protomap() {
        let got = input_from_check_request(&realistic(), &InputOptions::default()).unwrap();
        let expected = json!({
            "attributes": {
                "source": {
                    "address": {"socketAddress": {"address": "10.244.0.12", "portValue": 43512}},
                    "principal": "spiffe://cluster.local/ns/shop/sa/frontend"
                },
                "destination": {
                    "address": {"socketAddress": {"address": "10.244.0.20", "portValue": 8080}},
                    "principal": "spiffe://cluster.local/ns/shop/sa/orders",
                    "labels": {"app": "orders"}
                },
                "request": {
                    "time": {"seconds": 1_700_000_000i64, "nanos": 123_000_000},
                    "http": {
                        "id": "4031816203955893765",
                        "method": "POST",
                        "headers": {
                            ":authority": "orders.shop.svc:8080",
                            ":method": "POST",
                            ":path": "/api/v1/orders%20new?dry=true&tag=a&tag=b",
                            "content-type": "application/json",
                            "authorization": "Bearer abc"
                        },
                        "path": "/api/v1/orders%20new?dry=true&tag=a&tag=b",
                        "host": "orders.shop.svc:8080",
                        "scheme": "http",
                        "size": 27,
                        "protocol": "HTTP/1.1",
                        "body": "{\"item\":\"book\",\"qty\":2.5e0}"
                    }
                },
                "contextExtensions": {"virtual_host": "orders"},
                "metadataContext": {
                    "filterMetadata": {
                        "envoy.filters.http.jwt_authn": {
                            "sub": "alice", "roles": ["admin"], "exp": 1.0
                        }
                    }
                }
            },
            "version": {"encoding": "protojson", "ext_authz": "v3"},
            "parsed_path": ["api", "v1", "orders new"],
            "parsed_query": {"dry": ["true"], "tag": ["a", "b"]},
            "parsed_body": {"item": "book", "qty": 2.5},
            "truncated_body": false,
            "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend"
        });
        assert_eq!(got, expected);
    }

    #[test]
    fn realistic_request_canonical_protojson() {
        let opts = InputOptions {
            encoding: ProtoEncoding::ProtoJson,
            ..Default::default()
        };
        let got = input_from_check_request(&realistic(), &opts).unwrap();
        assert_eq!(
            got["attributes"]["request"]["time"],
            json!("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(got["attributes"]["request"]["http"]["size"], json!("27"));
        // Everything else is identical to the protomap flavour.
        let mut a = got;
        let mut b = input_from_check_request(&realistic(), &InputOptions::default()).unwrap();
        for v in [&mut a, &mut b] {
            let http = &mut v["attributes"]["request"];
            http["time"] = Value::Null;
            http["http"]["size"] = Value::Null;
        }
        assert_eq!(a, b);
    }

    #[test]
    fn only_populated_fields_are_emitted() {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer::default()),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/".into(),
                        ..Default::default()
                    }),
                }),
                tls_session: Some(TlsSession::default()),
                ..Default::default()
            }),
        };
        let got = input_from_check_request(&req, &InputOptions::default()).unwrap();
        assert_eq!(
            got,
            json!({
                "attributes": {
                    "source": {},
                    "request": {"http": {"method": "GET", "path": "/"}},
                    "tlsSession": {}
                },
                "version": {"encoding": "protojson", "ext_authz": "v3"},
                "parsed_path": [""],
                "parsed_query": {},
                "parsed_body": null,
                "truncated_body": false
            })
        );
    }

    #[test]
    fn empty_request_still_has_version_and_parsed_fields() {
        let got =
            input_from_check_request(&CheckRequest::default(), &InputOptions::default()).unwrap();
        assert_eq!(
            got,
            json!({
                "version": {"encoding": "protojson", "ext_authz": "v3"},
                "parsed_path": [""],
                "parsed_query": {},
                "parsed_body": null,
                "truncated_body": false
            })
        );
    }

    #[test]
    fn oneof_port_zero_and_other_address_kinds() {
        let peer_with = |a: address::Address| Peer {
            address: Some(Address { address: Some(a) }),
            ..Default::default()
        };
        let cases = [
            (
                address::Address::SocketAddress(SocketAddress {
                    protocol: 1,
                    address: "::1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                    ipv4_compat: true,
                    ..Default::default()
                }),
                json!({"socketAddress": {"protocol": 1, "address": "::1", "portValue": 0, "ipv4Compat": true}}),
            ),
            (
                address::Address::Pipe(envoy_types::pb::envoy::config::core::v3::Pipe {
                    path: "/run/envoy.sock".into(),
                    mode: 0,
                }),
                json!({"pipe": {"path": "/run/envoy.sock"}}),
            ),
        ];
        for (addr, expected) in cases {
            let p = peer_with(addr);
            assert_eq!(peer_json(&p, ProtoEncoding::Protomap)["address"], expected);
        }
        let udp = peer_with(address::Address::SocketAddress(SocketAddress {
            protocol: 1,
            ..Default::default()
        }));
        assert_eq!(
            peer_json(&udp, ProtoEncoding::ProtoJson)["address"]["socketAddress"]["protocol"],
            json!("UDP")
        );
    }

    #[test]
    fn raw_body_header_map_and_typed_metadata_are_base64() {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        raw_body: vec![0xff, 0x00, b'a'],
                        header_map: Some(HeaderMap {
                            headers: vec![HeaderValue {
                                key: "x-bin".into(),
                                raw_value: b"v1".to_vec(),
                                ..Default::default()
                            }],
                        }),
                        ..Default::default()
                    }),
                }),
                route_metadata_context: Some(Metadata {
                    typed_filter_metadata: [(
                        "f".to_owned(),
                        pbwk::Any {
                            type_url: "type.googleapis.com/x.Y".into(),
                            value: vec![1, 2],
                        },
                    )]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let got = input_from_check_request(&req, &InputOptions::default()).unwrap();
        assert_eq!(
            got["attributes"]["request"]["http"],
            json!({"headerMap": {"headers": [{"key": "x-bin", "rawValue": "djE="}]}, "rawBody": "/wBh"})
        );
        assert_eq!(
            got["attributes"]["routeMetadataContext"],
            json!({"typedFilterMetadata": {"f": {"typeUrl": "type.googleapis.com/x.Y", "value": "AQI="}}})
        );
    }

    #[test]
    fn parsed_path_table() {
        let cases: &[(&str, Value)] = &[
            ("/api/v1/items%20x?q=1", json!(["api", "v1", "items x"])),
            ("/", json!([""])),
            ("", json!([""])),
            ("///a//b/", json!(["a", "", "b", ""])),
            ("/a%2Fb", json!(["a", "b"])),
            ("/a+b", json!(["a+b"])),
            ("/caf%C3%A9", json!(["café"])),
            ("/x?y/z", json!(["x"])),
        ];
        for (path, expected) in cases {
            let (p, _) = parse_path_and_query(path).unwrap();
            assert_eq!(&p, expected, "path {path:?}");
        }
    }

    #[test]
    fn parsed_query_table() {
        let cases: &[(&str, Value)] = &[
            ("/p", json!({})),
            ("/p?", json!({})),
            (
                "/p?a=1&a=2&b=&c",
                json!({"a": ["1", "2"], "b": [""], "c": [""]}),
            ),
            (
                "/p?q=a+b%20c&k%3D=v%26",
                json!({"q": ["a b c"], "k=": ["v&"]}),
            ),
            ("/p?&&x=1&", json!({"x": ["1"]})),
            ("/p?=v", json!({"": ["v"]})),
            ("/p?a=1=2", json!({"a": ["1=2"]})),
        ];
        for (path, expected) in cases {
            let (_, q) = parse_path_and_query(path).unwrap();
            assert_eq!(&q, expected, "path {path:?}");
        }
    }

    #[test]
    fn malformed_path_or_query_is_an_error() {
        for path in ["/%zz", "/a%2", "/p?a=%", "/p?a=1;b=2", "/p?%gg=1"] {
            assert!(parse_path_and_query(path).is_err(), "{path:?}");
        }
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        path: "/p?a=1;b=2".into(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        };
        let err = input_from_check_request(&req, &InputOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), "invalid semicolon separator in query");
    }

    fn body_req(headers: &[(&str, &str)], body: &str, raw: &[u8]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        headers: hmap(headers),
                        path: "/".into(),
                        body: body.into(),
                        raw_body: raw.to_vec(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    fn body_of(
        headers: &[(&str, &str)],
        body: &str,
        raw: &[u8],
    ) -> Result<(Value, Value), InputError> {
        let v = input_from_check_request(&body_req(headers, body, raw), &InputOptions::default())?;
        Ok((v["parsed_body"].clone(), v["truncated_body"].clone()))
    }

    #[test]
    fn parsed_body_table() {
        const JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");
        const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
        /// (name, headers, body, raw_body, parsed_body, truncated_body)
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a str,
            &'a [u8],
            Value,
            bool,
        );
        let cases: &[Case<'_>] = &[
            (
                "json",
                &[JSON],
                r#"{"a":[1,"x"]}"#,
                b"",
                json!({"a": [1, "x"]}),
                false,
            ),
            (
                "json raw body",
                &[JSON],
                "",
                br#"{"r":true}"#,
                json!({"r": true}),
                false,
            ),
            ("json scalar", &[JSON], "3", b"", json!(3), false),
            ("json empty", &[JSON], "", b"", Value::Null, false),
            (
                "json exact length",
                &[JSON, ("content-length", "2")],
                "{}",
                b"",
                json!({}),
                false,
            ),
            (
                "json length -1",
                &[JSON, ("content-length", "-1")],
                "{}",
                b"",
                json!({}),
                false,
            ),
            (
                "truncated by length",
                &[JSON, ("content-length", "10")],
                "{\"a\":",
                b"",
                Value::Null,
                true,
            ),
            (
                "partial header",
                &[JSON, (PARTIAL_BODY_HEADER, "true")],
                "{\"a\":",
                b"",
                Value::Null,
                true,
            ),
            (
                "partial header, no type",
                &[(PARTIAL_BODY_HEADER, "true")],
                "x",
                b"",
                Value::Null,
                true,
            ),
            (
                "partial header not true",
                &[JSON, (PARTIAL_BODY_HEADER, "false")],
                "{}",
                b"",
                json!({}),
                false,
            ),
            (
                "form",
                &[FORM],
                "a=1&a=2&b=x+y%21",
                b"",
                json!({"a": ["1", "2"], "b": ["x y!"]}),
                false,
            ),
            (
                "form truncated",
                &[FORM, ("content-length", "99")],
                "a=1",
                b"",
                Value::Null,
                true,
            ),
            ("no content-type", &[], "{\"a\":1}", b"", Value::Null, false),
            (
                "text/plain",
                &[("content-type", "text/plain")],
                "hi",
                b"",
                Value::Null,
                false,
            ),
            (
                "grpc without descriptors",
                &[("content-type", "application/grpc")],
                "",
                b"\0\0\0\0\0",
                Value::Null,
                false,
            ),
        ];
        for (name, headers, body, raw, parsed, truncated) in cases {
            let (p, t) = body_of(headers, body, raw).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&p, parsed, "{name}");
            assert_eq!(t, Value::Bool(*truncated), "{name}");
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let json = ("content-type", "application/json");
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert!(matches!(
            body_of(&[json], "{not json", b""),
            Err(InputError::InvalidJsonBody(_))
        ));
        assert!(matches!(
            body_of(&[json], "{} trailing", b""),
            Err(InputError::InvalidJsonBody(_))
        ));
        assert!(matches!(
            body_of(&[json, ("content-length", "abc")], "{}", b""),
            Err(InputError::InvalidContentLength(_))
        ));
        assert!(matches!(
            body_of(&[form], "a=%zz", b""),
            Err(InputError::InvalidEscape(_))
        ));
        // Not parsed → no error.
        assert!(body_of(&[("content-type", "text/plain")], "{not json", b"").is_ok());
    }

    #[test]
    fn multipart_body() {
        let ct = ("content-type", "multipart/form-data; boundary=\"XyZ\"");
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"meta\"\r\nContent-Type: application/json\r\n\r\n{\"k\":1}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\nline1\r\nline2\r\n--XyZ\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nsecond\r\n--XyZ\r\nContent-Disposition: attachment\r\n\r\nignored\r\n--XyZ--\r\n";
        let (p, t) = body_of(&[ct], body, b"").unwrap();
        assert_eq!(
            p,
            json!({"meta": [{"k": 1}], "f": ["line1\r\nline2", "second"]})
        );
        assert_eq!(t, json!(false));
        // No boundary parameter → not parsed.
        let (p, _) = body_of(&[("content-type", "multipart/form-data")], body, b"").unwrap();
        assert_eq!(p, Value::Null);
        assert!(body_of(&[ct], "--XyZ\r\nbroken", b"").is_err());
    }

    fn exact_body_of(headers: &[(&str, &str)], body: &str) -> regorus::Value {
        let input = policy_input(&body_req(headers, body, b""), &InputOptions::default()).unwrap();
        input.into_rego()[&regorus::Value::from("parsed_body")].clone()
    }

    fn number(literal: &str) -> regorus::Value {
        regorus::Value::from_numeric_string(literal).unwrap()
    }

    #[test]
    fn big_integers_in_json_bodies_stay_exact() {
        const JSON: (&str, &str) = ("content-type", "application/json");
        let body = exact_body_of(
            &[JSON],
            r#"{"id": 12345678901234567891, "list": [1, -98765432109876543210, 0.5, "x"], "small": 7, "e": 1e30}"#,
        );
        let id = &body[&regorus::Value::from("id")];
        assert_eq!(id, &number("12345678901234567891"));
        // f64 would make its neighbour equal; OPA keeps them apart and so must we.
        assert_ne!(id, &number("12345678901234567890"));
        let list = &body[&regorus::Value::from("list")];
        assert_eq!(list[1], number("-98765432109876543210"));
        assert_eq!(list[2], regorus::Value::from(0.5));
        assert_eq!(list[3], regorus::Value::from("x"));
        assert_eq!(
            body[&regorus::Value::from("small")],
            regorus::Value::from(7u64)
        );
        assert_eq!(
            body[&regorus::Value::from("e")],
            number("1000000000000000000000000000000")
        );
        // Bodies whose numbers f64 holds exactly take the plain path.
        let input = policy_input(
            &body_req(&[JSON], r#"{"a": 1, "b": [2.5, -3]}"#, b""),
            &InputOptions::default(),
        )
        .unwrap();
        assert!(input.exact_body().is_none());
        // Numbers in a multipart JSON part are kept exact too.
        let ct = ("content-type", "multipart/form-data; boundary=b");
        let body = exact_body_of(
            &[ct],
            "--b\r\nContent-Disposition: form-data; name=\"m\"\r\nContent-Type: application/json\r\n\r\n{\"n\": 18446744073709551616}\r\n--b\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\nplain\r\n--b--\r\n",
        );
        assert_eq!(
            body[&regorus::Value::from("m")][0][&regorus::Value::from("n")],
            number("18446744073709551616")
        );
        assert_eq!(
            body[&regorus::Value::from("t")][0],
            regorus::Value::from("plain")
        );
    }

    #[test]
    fn number_literals_are_found_outside_strings_only() {
        assert_eq!(
            number_tokens(r#"{"a-1": "2e5 \" 3", "b": [-1.5e+3, 0, true, null]}"#),
            vec!["-1.5e+3", "0"]
        );
    }

    #[test]
    fn content_types_are_matched_in_opa_envoys_order() {
        let multipart = "--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n";
        // OPA-Envoy checks gRPC before forms: without descriptors it parses nothing.
        let (p, _) = body_of(
            &[(
                "content-type",
                "application/grpc; x=multipart/form-data; boundary=b",
            )],
            multipart,
            b"",
        )
        .unwrap();
        assert_eq!(p, Value::Null);
        // JSON wins over everything else named in the same header.
        assert!(matches!(
            body_of(
                &[(
                    "content-type",
                    "application/json; x=multipart/form-data; boundary=b"
                )],
                multipart,
                b""
            ),
            Err(InputError::InvalidJsonBody(_))
        ));
        // Go's ParseMediaType errors deny the request; a missing boundary parses nothing.
        assert!(matches!(
            body_of(
                &[(
                    "content-type",
                    "multipart/form-data; boundary=b; boundary=c"
                )],
                multipart,
                b""
            ),
            Err(InputError::InvalidContentType(_))
        ));
    }

    #[test]
    fn invalid_utf8_becomes_one_replacement_per_byte_as_in_go() {
        assert_eq!(go_lossy(b"a\xf0\x9f\x98b"), "a\u{fffd}\u{fffd}\u{fffd}b");
        assert_eq!(go_lossy("é".as_bytes()), "é");
        let (p, _) = body_of(
            &[("content-type", "application/json")],
            "",
            b"{\"k\": \"\xff\xfe\"}",
        )
        .unwrap();
        assert_eq!(p, json!({"k": "\u{fffd}\u{fffd}"}));
    }

    #[test]
    fn skip_request_body_parse_omits_body_fields() {
        let req = body_req(&[("content-type", "application/json")], "{bad", b"");
        let opts = InputOptions {
            skip_request_body_parse: true,
            ..Default::default()
        };
        let got = input_from_check_request(&req, &opts).unwrap();
        assert!(got.get("parsed_body").is_none());
        assert!(got.get("truncated_body").is_none());
    }

    #[test]
    fn rfc3339_formatting() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00Z"),
            (1_700_000_000, 123_000_000, "2023-11-14T22:13:20.123Z"),
            (1_700_000_000, 123_400_000, "2023-11-14T22:13:20.123400Z"),
            (1_700_000_000, 1, "2023-11-14T22:13:20.000000001Z"),
            (951_782_400, 0, "2000-02-29T00:00:00Z"),
            (-1, 0, "1969-12-31T23:59:59Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59Z"),
        ];
        for (s, n, expected) in cases {
            assert_eq!(rfc3339(s, n), expected);
        }
    }

    #[test]
    fn http_mode_builds_the_same_shape() {
        let parts = HttpRequestParts {
            method: "POST",
            path: "/api/v1/orders%20new?tag=a",
            body: br#"{"item":"book"}"#,
            source: Some("10.0.0.1:5555".parse().unwrap()),
            protocol: Some("HTTP/1.1"),
            time: Some(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)),
            ..Default::default()
        };
        let headers: [(&str, &[u8]); 5] = [
            ("Host", b"orders.shop.svc"),
            ("Content-Type", b"application/json"),
            ("X-Request-Id", b"req-1"),
            ("Accept", b"text/html"),
            ("accept", b"application/json"),
        ];
        let req = check_request_from_http(&parts, headers);
        let got = input_from_check_request(&req, &InputOptions::default()).unwrap();
        assert_eq!(
            got,
            json!({
                "attributes": {
                    "source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 5555}}},
                    "request": {
                        "time": {"seconds": 1_700_000_000i64},
                        "http": {
                            "id": "req-1",
                            "method": "POST",
                            "headers": {
                                "host": "orders.shop.svc",
                                "content-type": "application/json",
                                "x-request-id": "req-1",
                                "accept": "text/html,application/json"
                            },
                            "path": "/api/v1/orders%20new?tag=a",
                            "host": "orders.shop.svc",
                            "protocol": "HTTP/1.1",
                            "body": "{\"item\":\"book\"}"
                        }
                    }
                },
                "version": {"encoding": "protojson", "ext_authz": "v3"},
                "parsed_path": ["api", "v1", "orders new"],
                "parsed_query": {"tag": ["a"]},
                "parsed_body": {"item": "book"},
                "truncated_body": false
            })
        );
        // Non-UTF-8 body goes to rawBody.
        let parts = HttpRequestParts {
            body: &[0xff, 0xfe],
            ..Default::default()
        };
        let req = check_request_from_http(&parts, std::iter::empty());
        let got = input_from_check_request(&req, &InputOptions::default()).unwrap();
        assert_eq!(
            got["attributes"]["request"]["http"],
            json!({"rawBody": "//4="})
        );
    }
}
