//! OPA-compatible `io.jwt.*` builtins, registered on regorus engines as extensions.
//!
//! Semantics and error texts follow OPA's `topdown/tokens.go`: `decode` returns `[header, payload,
//! sig_hex]`, `verify_*` return a boolean (bad signature => `false`, malformed input => error),
//! `decode_verify` returns `[valid, header, payload]` (`[false, {}, {}]` when invalid) and unwraps nested
//! (`cty: JWT`) tokens, `encode_sign*` produce compact JWS. Errors are undefined unless the engine runs
//! with strict builtin errors, as in OPA.

mod keys;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use regorus::Value;

use keys::VerificationKey;

/// Why a token builtin could not produce a result; the text is OPA's where OPA has one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct JwtError(String);

type Result<T> = std::result::Result<T, JwtError>;

fn err<T>(message: impl Into<String>) -> Result<T> {
    Err(JwtError(message.into()))
}

/// Go's `base64.URLEncoding` after OPA's padding fix-up: padding must then be exact, but non-zero
/// trailing bits are accepted (Go is not strict there, so such a signature is "false", not an error).
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

type Builtin = fn(&[Value]) -> Result<Value>;

/// Every `io.jwt.*` builtin with its arity.
const BUILTINS: [(&str, u8, Builtin); 17] = [
    ("io.jwt.decode", 1, decode),
    ("io.jwt.decode_verify", 2, decode_verify),
    ("io.jwt.verify_rs256", 2, |a| verify_with(a, "RS256")),
    ("io.jwt.verify_rs384", 2, |a| verify_with(a, "RS384")),
    ("io.jwt.verify_rs512", 2, |a| verify_with(a, "RS512")),
    ("io.jwt.verify_ps256", 2, |a| verify_with(a, "PS256")),
    ("io.jwt.verify_ps384", 2, |a| verify_with(a, "PS384")),
    ("io.jwt.verify_ps512", 2, |a| verify_with(a, "PS512")),
    ("io.jwt.verify_es256", 2, |a| verify_with(a, "ES256")),
    ("io.jwt.verify_es384", 2, |a| verify_with(a, "ES384")),
    ("io.jwt.verify_es512", 2, |a| verify_with(a, "ES512")),
    ("io.jwt.verify_eddsa", 2, |a| verify_with(a, "EdDSA")),
    ("io.jwt.verify_hs256", 2, |a| verify_hs(a, "HS256")),
    ("io.jwt.verify_hs384", 2, |a| verify_hs(a, "HS384")),
    ("io.jwt.verify_hs512", 2, |a| verify_hs(a, "HS512")),
    ("io.jwt.encode_sign", 3, encode_sign),
    ("io.jwt.encode_sign_raw", 3, encode_sign_raw),
];

/// Register every `io.jwt.*` extension on `engine`; returns the builtin names. With `strict`, a builtin
/// error fails the evaluation as `<builtin>: <message>` (OPA's `--strict-builtin-errors`); otherwise
/// the call is undefined.
pub fn register(
    engine: &mut regorus::Engine,
    strict: bool,
) -> std::result::Result<Vec<&'static str>, String> {
    for (name, nargs, f) in BUILTINS {
        let ext = move |args: Vec<Value>| -> anyhow::Result<Value> {
            match f(&args) {
                Ok(v) => Ok(v),
                Err(e) if strict => Err(anyhow::anyhow!("{name}: {e}")),
                Err(e) => {
                    tracing::debug!(builtin = name, error = %e, "builtin error (undefined)");
                    Ok(Value::Undefined)
                }
            }
        };
        engine
            .add_extension(name.to_string(), nargs, Box::new(ext))
            .map_err(|e| format!("registering {name}: {e}"))?;
    }
    Ok(BUILTINS.iter().map(|(name, _, _)| *name).collect())
}

/// OPA's `base64url.decode`: unpadded input is padded first (RFC 7515 appendix C).
fn b64url(segment: &str) -> std::result::Result<Vec<u8>, String> {
    // Go's decoder skips line breaks.
    let mut s: String = segment
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect();
    if !s.ends_with('=') {
        match s.len() % 4 {
            0 => {}
            2 => s.push_str("=="),
            3 => s.push('='),
            _ => return Err(format!("illegal base64url string: {segment}")),
        }
    }
    B64URL.decode(&s).map_err(|e| {
        let at = match e {
            base64::DecodeError::InvalidByte(at, _)
            | base64::DecodeError::InvalidLastSymbol(at, _) => at,
            base64::DecodeError::InvalidLength(at) => at,
            base64::DecodeError::InvalidPadding => s.find('=').unwrap_or(s.len()),
        };
        format!("illegal base64 data at input byte {at}")
    })
}

/// A compact JWS split into its three base64url parts.
struct Token<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

impl<'a> Token<'a> {
    /// OPA's `decodeJWT`.
    fn split(jwt: &'a str) -> Result<Self> {
        if !jwt.contains('.') {
            return err("encoded JWT had no period separators");
        }
        match jwt.split('.').collect::<Vec<_>>().as_slice() {
            [header, payload, signature] => Ok(Token {
                header,
                payload,
                signature,
            }),
            parts => err(format!(
                "encoded JWT must have 3 sections, found {}",
                parts.len()
            )),
        }
    }

    fn signing_input(&self) -> String {
        format!("{}.{}", self.header, self.payload)
    }

    /// The header object; a header naming `enc` is a JWE (RFC 7516 section 9), which is refused.
    fn decode_header(&self) -> Result<Value> {
        let bytes = b64url(self.header)
            .map_err(|e| JwtError(format!("JWT header had invalid encoding: {e}")))?;
        let header =
            json_object(&bytes).map_err(|e| JwtError(format!("bad JWT header: {}", e.0)))?;
        if header["enc"] != Value::Undefined {
            return err("JWT is a JWE object, which is not supported");
        }
        Ok(header)
    }

    fn decode_payload(&self) -> Result<Vec<u8>> {
        b64url(self.payload).map_err(|e| JwtError(format!("JWT payload had invalid encoding: {e}")))
    }

    fn decode_signature(&self) -> Result<Vec<u8>> {
        b64url(self.signature).map_err(JwtError)
    }
}

/// JSON text that must be an object (OPA's `extractJSONObject`).
fn json_object(bytes: &[u8]) -> Result<Value> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| JwtError("invalid JSON: not UTF-8 text".into()))?;
    match Value::from_json_str(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => err("decoded JSON type was not an Object"),
        Err(e) => err(format!("invalid JSON: {e}")),
    }
}

fn string_arg(args: &[Value], i: usize) -> Result<&str> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => err(format!(
            "operand {} must be string but got {}",
            i + 1,
            type_name(other)
        )),
        None => err(format!("operand {} is missing", i + 1)),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Undefined => "undefined",
    }
}

fn str_field<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    match &obj[key] {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// `io.jwt.decode(jwt)` => `[header, payload, signature_hex]`; nested (`cty: JWT`) tokens are unwrapped.
fn decode(args: &[Value]) -> Result<Value> {
    let mut jwt = string_arg(args, 0)?.to_string();
    loop {
        let token = Token::split(&jwt)?;
        let header = token.decode_header()?;
        let payload = token.decode_payload()?;
        if str_field(&header, "cty") == Some("JWT") {
            // jwt.io quotes a nested token; OPA strips the quotes.
            let inner = String::from_utf8_lossy(&payload);
            jwt = inner.trim_matches(|c| c == '"' || c == '\'').to_string();
            continue;
        }
        let payload = json_object(&payload)?;
        let signature = token
            .decode_signature()
            .map_err(|e| JwtError(format!("JWT signature had invalid encoding: {}", e.0)))?;
        return Ok(Value::from(vec![
            header,
            payload,
            Value::from(hex(&signature)),
        ]));
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The JOSE header fields OPA interprets (its `tokenHeader`).
struct Header {
    alg: String,
    kid: String,
    cty: String,
    crit: Vec<String>,
    unknown: Vec<String>,
}

impl Header {
    fn parse(header: &Value) -> Result<Self> {
        let mut out = Header {
            alg: String::new(),
            kid: String::new(),
            cty: String::new(),
            crit: Vec::new(),
            unknown: Vec::new(),
        };
        let Value::Object(fields) = header else {
            return err("JWT header must be an object");
        };
        for (k, v) in fields.iter() {
            let Value::String(name) = k else { continue };
            let string = |field: &mut String| match v {
                Value::String(s) => {
                    *field = s.to_string();
                    Ok(())
                }
                _ => err(format!("{name}: must be a string")),
            };
            match name.as_ref() {
                "alg" => string(&mut out.alg)?,
                "kid" => string(&mut out.kid)?,
                "cty" => string(&mut out.cty)?,
                "typ" => string(&mut String::new())?,
                "crit" => {
                    let Value::Array(items) = v else {
                        return err("crit: must be a list");
                    };
                    out.crit = items
                        .iter()
                        .filter_map(|i| str_value(i).map(str::to_string))
                        .collect();
                    if out.crit.is_empty() {
                        return err("crit: must be a nonempty list");
                    }
                }
                other => out.unknown.push(other.to_string()),
            }
        }
        Ok(out)
    }

    /// RFC 7515: `alg` must be present, and a critical parameter we do not understand invalidates the JWS.
    fn valid(&self) -> bool {
        !self.alg.is_empty() && !self.unknown.iter().any(|u| self.crit.contains(u))
    }
}

fn str_value(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// `io.jwt.verify_<alg>(jwt, certificate)` => boolean (OPA's `builtinJWTVerify`).
fn verify_with(args: &[Value], alg: &str) -> Result<Value> {
    let jwt = string_arg(args, 0)?;
    let token = Token::split(jwt)?;
    let keys = keys::keys_from_cert_or_jwk(string_arg(args, 1)?).map_err(JwtError)?;
    let signature = token.decode_signature()?;
    let header = Header::parse(&token.decode_header()?)?;
    let message = token.signing_input();
    let check = |key: &VerificationKey| keys::verify(&key.key, alg, message.as_bytes(), &signature);
    // A key whose kid matches the header's is the only one tried.
    if !header.kid.is_empty()
        && let Some(key) = keys.iter().find(|k| k.kid.as_deref() == Some(&header.kid))
    {
        return Ok(Value::from(check(key)));
    }
    let ok = keys
        .iter()
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == header.alg))
        .any(check);
    Ok(Value::from(ok))
}

/// `io.jwt.verify_hs<n>(jwt, secret)`: only the signature is checked, as in OPA.
fn verify_hs(args: &[Value], alg: &str) -> Result<Value> {
    let jwt = string_arg(args, 0)?;
    let secret = string_arg(args, 1)?;
    let token = Token::split(jwt)?;
    let signature = token.decode_signature()?;
    Ok(Value::from(keys::verify_hmac(
        alg,
        secret.as_bytes(),
        token.signing_input().as_bytes(),
        &signature,
    )))
}

/// Parsed `decode_verify` constraints (OPA's `tokenConstraints`).
struct Constraints {
    keys: Option<Vec<VerificationKey>>,
    secret: String,
    alg: String,
    iss: String,
    aud: String,
    time_ns: f64,
}

impl Constraints {
    fn parse(v: &Value) -> Result<Self> {
        let Value::Object(obj) = v else {
            return err(format!("operand 2 must be object but got {}", type_name(v)));
        };
        let mut c = Constraints {
            keys: None,
            secret: String::new(),
            alg: String::new(),
            iss: String::new(),
            aud: String::new(),
            time_ns: now_ns(),
        };
        for (k, val) in obj.iter() {
            let Value::String(name) = k else {
                return err("token constraint keys must be strings");
            };
            let string = || {
                str_value(val)
                    .map(str::to_string)
                    .ok_or_else(|| JwtError(format!("{name} constraint: must be a string")))
            };
            match name.as_ref() {
                "cert" => {
                    let cert = str_value(val)
                        .ok_or_else(|| JwtError("cert constraint: must be a string".into()))?;
                    c.keys = Some(keys::keys_from_cert_or_jwk(cert).map_err(JwtError)?);
                }
                "secret" => c.secret = string()?,
                "alg" => c.alg = string()?,
                "iss" => c.iss = string()?,
                "aud" => c.aud = string()?,
                "time" => {
                    let Value::Number(_) = val else {
                        return err("token time constraint: must be a number");
                    };
                    // Nanoseconds exceed f64's exact integers: read integers as integers first.
                    let t = val
                        .as_i64()
                        .map(|n| n as f64)
                        .or_else(|_| val.as_f64())
                        .map_err(|_| JwtError("token time constraint: unvalid float64".into()))?;
                    if t < 0.0 {
                        return err("token time constraint: must not be negative");
                    }
                    c.time_ns = t;
                }
                other => return err(format!("unknown token validation constraint: {other}")),
            }
        }
        match (c.keys.is_some(), !c.secret.is_empty()) {
            (true, true) => err("duplicate key constraints"),
            (false, false) => err("no key constraint"),
            _ => Ok(c),
        }
    }

    /// Whether the signature verifies with the trusted key(s) or secret, for the header's `alg`.
    fn verify(&self, header: &Header, message: &[u8], signature: &[u8]) -> bool {
        let Some(keys) = &self.keys else {
            return keys::verify_hmac(&header.alg, self.secret.as_bytes(), message, signature);
        };
        let check = |k: &VerificationKey| keys::verify(&k.key, &header.alg, message, signature);
        if !header.kid.is_empty()
            && let Some(key) = keys.iter().find(|k| k.kid.as_deref() == Some(&header.kid))
        {
            return check(key);
        }
        keys.iter()
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == header.alg))
            .any(check)
    }

    fn audience_ok(&self, aud: &Value) -> bool {
        match aud {
            Value::String(s) => s.as_ref() == self.aud,
            Value::Array(items) => items.iter().any(|a| str_value(a) == Some(&self.aud)),
            _ => false,
        }
    }
}

fn now_ns() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as f64)
        .unwrap_or(0.0)
}

/// `io.jwt.decode_verify(jwt, constraints)` => `[valid, header, payload]` (OPA's `builtinJWTDecodeVerify`).
fn decode_verify(args: &[Value]) -> Result<Value> {
    let mut jwt = string_arg(args, 0)?.to_string();
    let c = Constraints::parse(args.get(1).unwrap_or(&Value::Undefined))?;
    let unverified = || {
        Ok(Value::from(vec![
            Value::from(false),
            Value::new_object(),
            Value::new_object(),
        ]))
    };
    // Each nesting level (`cty: JWT`) is verified with the same constraints.
    let (header, payload) = loop {
        let token = Token::split(&jwt)?;
        let decoded = token.decode_header()?;
        let header = Header::parse(&decoded)?;
        if !header.valid() || (!c.alg.is_empty() && c.alg != header.alg) {
            return unverified();
        }
        let signature = token.decode_signature()?;
        if !c.verify(&header, token.signing_input().as_bytes(), &signature) {
            return unverified();
        }
        let payload = token.decode_payload()?;
        if header.cty.eq_ignore_ascii_case("JWT") {
            jwt = String::from_utf8_lossy(&payload).into_owned();
            continue;
        }
        break (decoded, json_object(&payload)?);
    };

    if !c.iss.is_empty() && str_field(&payload, "iss") != Some(c.iss.as_str()) {
        return unverified();
    }
    match &payload["aud"] {
        Value::Undefined if !c.aud.is_empty() => return unverified(),
        Value::Undefined => {}
        aud if !c.audience_ok(aud) => return unverified(),
        _ => {}
    }
    let now_s = c.time_ns / 1e9;
    match &payload["exp"] {
        Value::Undefined => {}
        exp @ Value::Number(_) => {
            // Valid only strictly before `exp` (a NaN never is).
            if now_s.partial_cmp(&number(exp)) != Some(std::cmp::Ordering::Less) {
                return unverified();
            }
        }
        _ => return err("exp value must be a number"),
    }
    match &payload["nbf"] {
        Value::Undefined => {}
        nbf @ Value::Number(_) => {
            if now_s < number(nbf) {
                return unverified();
            }
        }
        _ => return err("nbf value must be a number"),
    }
    Ok(Value::from(vec![Value::from(true), header, payload]))
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `io.jwt.encode_sign(headers, payload, key)`: the objects are serialised as Go's `json.Marshal` does.
fn encode_sign(args: &[Value]) -> Result<Value> {
    let json = |i: usize| -> Result<String> {
        let v = args
            .get(i)
            .ok_or_else(|| JwtError(format!("operand {} is missing", i + 1)))?;
        go_json(v)
    };
    let (headers, payload, key) = (json(0)?, json(1)?, json(2)?);
    encode_jws(&headers, &payload, &key)
}

/// `io.jwt.encode_sign_raw(headers, payload, key)`: JSON texts signed as given.
fn encode_sign_raw(args: &[Value]) -> Result<Value> {
    let key = string_arg(args, 2)?;
    let headers = string_arg(args, 0)?;
    let payload = string_arg(args, 1)?;
    encode_jws(headers, payload, key)
}

/// Compact JSON with sorted keys and Go's HTML-safe escapes, so tokens match OPA's byte for byte.
fn go_json(v: &Value) -> Result<String> {
    let text =
        serde_json::to_string(v).map_err(|e| JwtError(format!("cannot serialise JSON: {e}")))?;
    Ok(text
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029"))
}

/// OPA's `commonBuiltinJWTEncodeSign`.
fn encode_jws(headers: &str, payload: &str, jwk: &str) -> Result<Value> {
    let keys =
        keys::parse_jwk_set(jwk).map_err(|e| JwtError(format!("failed to parse JWK: {e}")))?;
    let Some(key) = keys.first() else {
        return err("no keys found in JWK set");
    };
    let header: serde_json::Value = serde_json::from_str(headers).map_err(|e| {
        JwtError(format!(
            "missing or invalid 'alg' header: {}",
            go_json_error(headers, &e)
        ))
    })?;
    let alg = match header.get("alg") {
        Some(serde_json::Value::String(alg)) => alg.as_str(),
        Some(_) => return err("missing or invalid 'alg' header: 'alg' must be a string"),
        None => {
            return err(
                "missing or invalid 'alg' header: unsupported signature algorithm (none given)",
            );
        }
    };
    if !keys::ALGORITHMS.contains(&alg) {
        return err(format!("unknown JWS algorithm: {alg}"));
    }
    let typ = header.get("typ").and_then(serde_json::Value::as_str);
    if typ.is_none_or(|t| t == "JWT")
        && serde_json::from_str::<serde::de::IgnoredAny>(payload).is_err()
    {
        return err("type is JWT but payload is not JSON");
    }
    let Some(private) = &key.private else {
        return err("the JWK has no private key to sign with");
    };
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(headers),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = keys::sign(private, alg, input.as_bytes()).map_err(JwtError)?;
    Ok(Value::from(format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    )))
}

/// A JSON syntax error worded like Go's (`cannot parse JSON: invalid character 'x' ...`).
fn go_json_error(text: &str, e: &serde_json::Error) -> String {
    if text.trim().is_empty() {
        return "cannot parse JSON: cannot parse empty string".into();
    }
    if e.is_eof() {
        return "cannot parse JSON: unexpected end of JSON input".into();
    }
    let at = text
        .lines()
        .take(e.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + e.column().saturating_sub(1);
    match text.get(at..).and_then(|rest| rest.chars().next()) {
        Some(c) => format!("cannot parse JSON: invalid character {c:?} ({e})"),
        None => format!("cannot parse JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::json;

    const RSA_KEY: &str = include_str!("../testdata/rsa_key.pem");
    const RSA_PUB: &str = include_str!("../testdata/rsa_pub.pem");
    const RSA_CERT: &str = include_str!("../testdata/rsa_cert.pem");
    const EC_KEY: &str = include_str!("../testdata/ec_key.pem");
    const EC_PUB: &str = include_str!("../testdata/ec_pub.pem");
    const EC_CERT: &str = include_str!("../testdata/ec_cert.pem");
    const JWKS: &str = include_str!("../testdata/jwks.json");

    fn now_s() -> i64 {
        (now_ns() / 1e9) as i64
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        let key = match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap()
            }
            Algorithm::ES256 => EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
            _ => EncodingKey::from_secret(b"s3cret"),
        };
        encode(&header, &claims, &key).unwrap()
    }

    fn call(
        f: fn(&[Value]) -> Result<Value>,
        args: &[serde_json::Value],
    ) -> Result<serde_json::Value> {
        let args: Vec<Value> = args.iter().cloned().map(Value::from).collect();
        f(&args).map(|v| serde_json::to_value(&v).unwrap())
    }

    fn verify(alg: Algorithm, jwt: &str, key: &str) -> Result<serde_json::Value> {
        let args = [Value::from(jwt), Value::from(key)];
        let alg = format!("{alg:?}");
        let out = if alg.starts_with("HS") {
            verify_hs(&args, &alg)
        } else {
            verify_with(&args, &alg)
        };
        out.map(|v| serde_json::to_value(&v).unwrap())
    }

    fn tamper(jwt: &str) -> String {
        let mut parts: Vec<String> = jwt.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","role":"admin"}"#);
        parts.join(".")
    }

    #[test]
    fn decode_matches_opa_shape() {
        let jwt = sign(Algorithm::HS256, None, json!({"sub": "alice", "n": 1}));
        let out = call(decode, &[json!(jwt)]).unwrap();
        assert_eq!(out[0], json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(out[1], json!({"sub": "alice", "n": 1}));
        let sig = b64url(jwt.rsplit('.').next().unwrap()).unwrap();
        assert_eq!(out[2], json!(hex(&sig)));
        assert_eq!(out[2].as_str().unwrap().len(), 64);
    }

    #[test]
    fn decode_errors_on_malformed_tokens() {
        let error = |jwt: serde_json::Value| call(decode, &[jwt]).unwrap_err().to_string();
        assert_eq!(error(json!("abc")), "encoded JWT had no period separators");
        // Five parts are not three (OPA detects a JWE by its `enc` header, not by counting).
        assert_eq!(
            error(json!("a.b.c.d.e")),
            "encoded JWT must have 3 sections, found 5"
        );
        let jwe_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
        assert_eq!(
            error(json!(format!("{jwe_header}.e30.c2ln"))),
            "JWT is a JWE object, which is not supported"
        );
        assert_eq!(
            error(json!("e30.!!!.c2ln")),
            "JWT payload had invalid encoding: illegal base64 data at input byte 0"
        );
        // payload must be an object
        let arr = URL_SAFE_NO_PAD.encode("[1]");
        assert_eq!(
            error(json!(format!("e30.{arr}.c2ln"))),
            "decoded JSON type was not an Object"
        );
        assert_eq!(error(json!(42)), "operand 1 must be string but got number");
    }

    #[test]
    fn base64_follows_go_padding_and_trailing_bits() {
        assert_eq!(b64url("YQ").unwrap(), b"a");
        assert_eq!(b64url("YQ==").unwrap(), b"a");
        // Non-zero trailing bits decode (Go is lenient), so a tampered signature is false, not an error.
        assert_eq!(b64url("YR").unwrap(), b"a");
        assert_eq!(
            b64url("YQ=").unwrap_err(),
            "illegal base64 data at input byte 2"
        );
        assert_eq!(b64url("Y").unwrap_err(), "illegal base64url string: Y");
    }

    #[test]
    fn verify_rs256_with_pem_cert_and_key() {
        let jwt = sign(Algorithm::RS256, None, json!({"sub": "alice"}));
        assert_eq!(
            verify(Algorithm::RS256, &jwt, RSA_PUB).unwrap(),
            json!(true)
        );
        assert_eq!(
            verify(Algorithm::RS256, &jwt, RSA_CERT).unwrap(),
            json!(true)
        );
        assert_eq!(
            verify(Algorithm::RS256, &tamper(&jwt), RSA_CERT).unwrap(),
            json!(false)
        );
        // wrong key type: the RSA token does not verify against an EC certificate
        assert_eq!(
            verify(Algorithm::RS256, &jwt, EC_CERT).unwrap(),
            json!(false)
        );
        assert!(verify(Algorithm::RS256, &jwt, "not a key").is_err());
        assert!(verify(Algorithm::RS256, "garbage", RSA_PUB).is_err());
    }

    #[test]
    fn verify_es256_with_pem_cert_key_and_chain() {
        let jwt = sign(Algorithm::ES256, None, json!({"sub": "bob"}));
        assert_eq!(verify(Algorithm::ES256, &jwt, EC_PUB).unwrap(), json!(true));
        assert_eq!(
            verify(Algorithm::ES256, &jwt, EC_CERT).unwrap(),
            json!(true)
        );
        // Only one PEM block is read, and nothing may follow it (OPA).
        let bundle = format!("{EC_CERT}{RSA_CERT}");
        assert_eq!(
            verify(Algorithm::ES256, &jwt, &bundle)
                .unwrap_err()
                .to_string(),
            "extra data after a PEM certificate block"
        );
        assert_eq!(
            verify(Algorithm::ES256, &tamper(&jwt), EC_PUB).unwrap(),
            json!(false)
        );
    }

    #[test]
    fn verify_hs256() {
        let jwt = sign(Algorithm::HS256, None, json!({"sub": "carol"}));
        assert_eq!(
            verify(Algorithm::HS256, &jwt, "s3cret").unwrap(),
            json!(true)
        );
        assert_eq!(
            verify(Algorithm::HS256, &jwt, "wrong").unwrap(),
            json!(false)
        );
        assert_eq!(
            verify(Algorithm::HS256, &tamper(&jwt), "s3cret").unwrap(),
            json!(false)
        );
    }

    #[test]
    fn verify_with_jwk_and_jwks() {
        let rs = sign(Algorithm::RS256, Some("rsa1"), json!({"sub": "a"}));
        let es = sign(Algorithm::ES256, Some("ec1"), json!({"sub": "a"}));
        assert_eq!(verify(Algorithm::RS256, &rs, JWKS).unwrap(), json!(true));
        assert_eq!(verify(Algorithm::ES256, &es, JWKS).unwrap(), json!(true));
        let jwks: serde_json::Value = serde_json::from_str(JWKS).unwrap();
        let single_jwk = jwks["keys"][0].to_string();
        assert_eq!(
            verify(Algorithm::RS256, &rs, &single_jwk).unwrap(),
            json!(true)
        );
        // An RSA JWK must never be used for an ES or HS verification (jsonwebtoken would panic).
        assert_eq!(
            verify(Algorithm::ES256, &es, &single_jwk).unwrap(),
            json!(false)
        );
        // Unknown kid falls back to trying all keys.
        let rs_other = sign(Algorithm::RS256, Some("rotated"), json!({"sub": "a"}));
        assert_eq!(
            verify(Algorithm::RS256, &rs_other, JWKS).unwrap(),
            json!(true)
        );
    }

    fn dv(jwt: &str, constraints: serde_json::Value) -> Result<serde_json::Value> {
        call(decode_verify, &[json!(jwt), constraints])
    }

    #[test]
    fn decode_verify_valid_token() {
        let exp = now_s() + 600;
        let jwt = sign(
            Algorithm::RS256,
            None,
            json!({"sub": "alice", "iss": "idp", "aud": ["api", "web"], "exp": exp}),
        );
        let out = dv(&jwt, json!({"cert": RSA_CERT, "iss": "idp", "aud": "web"})).unwrap();
        assert_eq!(out[0], json!(true));
        assert_eq!(out[1]["alg"], json!("RS256"));
        assert_eq!(out[2]["sub"], json!("alice"));
    }

    #[test]
    fn decode_verify_rejects_like_opa() {
        let unverified = json!([false, {}, {}]);
        let now = now_s();
        let expired = sign(Algorithm::ES256, None, json!({"exp": now - 10}));
        assert_eq!(dv(&expired, json!({"cert": EC_PUB})).unwrap(), unverified);
        // explicit time (ns) before expiry makes it valid again
        let t = ((now - 20) as f64) * 1e9;
        assert_eq!(
            dv(&expired, json!({"cert": EC_PUB, "time": t})).unwrap()[0],
            json!(true)
        );
        let early = sign(Algorithm::ES256, None, json!({"nbf": now + 100}));
        assert_eq!(dv(&early, json!({"cert": EC_PUB})).unwrap(), unverified);

        let aud = sign(Algorithm::HS256, None, json!({"aud": "api"}));
        assert_eq!(
            dv(&aud, json!({"secret": "s3cret", "aud": "other"})).unwrap(),
            unverified
        );
        // token has aud but no aud constraint => invalid (OPA semantics)
        assert_eq!(dv(&aud, json!({"secret": "s3cret"})).unwrap(), unverified);
        assert_eq!(
            dv(&aud, json!({"secret": "s3cret", "aud": "api"})).unwrap()[0],
            json!(true)
        );
        // aud constraint but token has none => invalid
        let plain = sign(Algorithm::HS256, None, json!({"sub": "x"}));
        assert_eq!(
            dv(&plain, json!({"secret": "s3cret", "aud": "api"})).unwrap(),
            unverified
        );

        assert_eq!(
            dv(&plain, json!({"secret": "s3cret", "iss": "idp"})).unwrap(),
            unverified
        );
        assert_eq!(dv(&plain, json!({"secret": "wrong"})).unwrap(), unverified);
        assert_eq!(
            dv(&plain, json!({"secret": "s3cret", "alg": "RS256"})).unwrap(),
            unverified
        );
        // HS token with a certificate constraint cannot verify (no key confusion)
        assert_eq!(dv(&plain, json!({"cert": JWKS})).unwrap(), unverified);
        assert_eq!(
            dv(&tamper(&plain), json!({"secret": "s3cret"})).unwrap(),
            unverified
        );
    }

    #[test]
    fn decode_verify_argument_errors() {
        let plain = sign(Algorithm::HS256, None, json!({"sub": "x"}));
        assert!(dv(&plain, json!({})).is_err());
        assert!(dv(&plain, json!({"secret": "a", "cert": RSA_PUB})).is_err());
        assert!(
            matches!(dv(&plain, json!({"secret": "a", "foo": 1})), Err(JwtError(m)) if m == "unknown token validation constraint: foo")
        );
        let bad_exp = sign(Algorithm::HS256, None, json!({"exp": "soon"}));
        assert!(dv(&bad_exp, json!({"secret": "s3cret"})).is_err());
        assert!(dv("a.b", json!({"secret": "s3cret"})).is_err());
    }

    #[test]
    fn extensions_work_in_rego_and_errors_are_undefined() {
        let mut engine = regorus::Engine::new();
        register(&mut engine, false).unwrap();
        engine
            .add_policy(
                "t.rego".into(),
                r#"package t
claims := io.jwt.decode(input.token)[1]
bad := io.jwt.decode("nope")
ok := io.jwt.verify_hs256(input.token, "s3cret")
"#
                .into(),
            )
            .unwrap();
        let jwt = sign(Algorithm::HS256, None, json!({"sub": "alice"}));
        engine.set_input(Value::from(json!({"token": jwt})));
        assert_eq!(
            engine.eval_rule("data.t.claims".into()).unwrap()["sub"],
            Value::from("alice")
        );
        assert_eq!(
            engine.eval_rule("data.t.ok".into()).unwrap(),
            Value::from(true)
        );
        assert_eq!(
            engine.eval_rule("data.t.bad".into()).unwrap(),
            Value::Undefined
        );
    }

    fn jws(header: &str, payload: &str, key: &str) -> String {
        match encode_jws(header, payload, key).unwrap() {
            Value::String(s) => s.to_string(),
            other => panic!("not a token: {other}"),
        }
    }

    fn hs256(header: serde_json::Value, payload: serde_json::Value) -> String {
        let key = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode("s3cret")}).to_string();
        jws(&header.to_string(), &payload.to_string(), &key)
    }

    #[test]
    fn unknown_critical_headers_make_a_token_invalid() {
        let unverified = json!([false, {}, {}]);
        let crit = hs256(
            json!({"alg": "HS256", "crit": ["x-junk"], "x-junk": 1}),
            json!({"sub": "a"}),
        );
        assert_eq!(dv(&crit, json!({"secret": "s3cret"})).unwrap(), unverified);
        // A critical parameter OPA understands (here `kid`) is fine.
        let known = hs256(
            json!({"alg": "HS256", "crit": ["kid"], "kid": "k"}),
            json!({"sub": "a"}),
        );
        assert_eq!(
            dv(&known, json!({"secret": "s3cret"})).unwrap()[0],
            json!(true)
        );
        let empty = hs256(json!({"alg": "HS256", "crit": []}), json!({}));
        assert_eq!(
            dv(&empty, json!({"secret": "s3cret"}))
                .unwrap_err()
                .to_string(),
            "crit: must be a nonempty list"
        );
    }

    #[test]
    fn decode_verify_unwraps_nested_tokens_verifying_each_level() {
        // `typ` is not JWT: encode_sign would insist on a JSON payload otherwise (as OPA does).
        let inner = hs256(json!({"alg": "HS256"}), json!({"sub": "inner"}));
        let key = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode("s3cret")}).to_string();
        let outer = jws(r#"{"alg":"HS256","cty":"JWT","typ":"JOSE"}"#, &inner, &key);
        let out = dv(&outer, json!({"secret": "s3cret"})).unwrap();
        assert_eq!(out, json!([true, {"alg": "HS256"}, {"sub": "inner"}]));
        // An inner token signed with another secret fails the whole token.
        let other = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode("other")}).to_string();
        let forged = jws(r#"{"alg":"HS256"}"#, r#"{"sub":"x"}"#, &other);
        let wrapped = jws(r#"{"alg":"HS256","cty":"JWT","typ":"JOSE"}"#, &forged, &key);
        assert_eq!(
            dv(&wrapped, json!({"secret": "s3cret"})).unwrap()[0],
            json!(false)
        );
    }

    #[test]
    fn encode_sign_round_trips_through_decode_verify() {
        // RFC 7515 appendix A.4 key (P-521): ES512 signs and verifies.
        let jwk = json!({
            "kty": "EC", "crv": "P-521",
            "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
            "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2",
            "d": "AY5pb7A0UFiB3RELSD64fTLOSV_jazdF7fLYyuTw8lOfRhWg6Y6rUrPAxerEzgdRhajnu0ferB0d53vM9mE15j2C"
        });
        let token = call(
            encode_sign,
            &[json!({"alg": "ES512"}), json!({"sub": "a"}), jwk.clone()],
        )
        .unwrap();
        let token = token.as_str().unwrap();
        let mut public = jwk.clone();
        public.as_object_mut().unwrap().remove("d");
        let out = dv(token, json!({"cert": public.to_string()})).unwrap();
        assert_eq!(out[0], json!(true));
        assert_eq!(
            verify_with(
                &[Value::from(token), Value::from(public.to_string())],
                "ES512"
            )
            .unwrap(),
            Value::from(true)
        );
        // A key that cannot sign the header's algorithm is an error, not a token.
        let err = call(encode_sign, &[json!({"alg": "RS256"}), json!({}), jwk]).unwrap_err();
        assert!(err.to_string().contains("not an RSA private key"), "{err}");
    }
}
