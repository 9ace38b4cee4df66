//! OPA-compatible `io.jwt.*` builtins, registered on regorus engines as extensions.
//!
//! Semantics follow OPA's token builtins: `decode` returns `[header, payload, sig_hex]`,
//! `verify_*` return a boolean (bad signature => `false`, malformed input => error) and
//! `decode_verify` returns `[valid, header, payload]` (`[false, {}, {}]` when invalid).
//! Errors become *undefined* (OPA non-strict builtin errors); they are logged at debug level.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use regorus::Value;

/// Why a token builtin could not produce a result (surfaced as undefined in policies).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("{0}")]
    Malformed(String),
    #[error("invalid key: {0}")]
    Key(String),
    #[error("{0}")]
    Argument(String),
}

type Result<T> = std::result::Result<T, JwtError>;

/// OPA base64url decoding accepts both padded and unpadded segments.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Register every `io.jwt.*` extension on `engine`; returns the builtin names.
pub fn register(engine: &mut regorus::Engine) -> std::result::Result<Vec<&'static str>, String> {
    type Builtin = fn(&[Value]) -> Result<Value>;
    let builtins: [(&str, u8, Builtin); 15] = [
        ("io.jwt.decode", 1, decode),
        ("io.jwt.decode_verify", 2, decode_verify),
        ("io.jwt.verify_rs256", 2, |a| {
            verify_with(a, Algorithm::RS256)
        }),
        ("io.jwt.verify_rs384", 2, |a| {
            verify_with(a, Algorithm::RS384)
        }),
        ("io.jwt.verify_rs512", 2, |a| {
            verify_with(a, Algorithm::RS512)
        }),
        ("io.jwt.verify_ps256", 2, |a| {
            verify_with(a, Algorithm::PS256)
        }),
        ("io.jwt.verify_ps384", 2, |a| {
            verify_with(a, Algorithm::PS384)
        }),
        ("io.jwt.verify_ps512", 2, |a| {
            verify_with(a, Algorithm::PS512)
        }),
        ("io.jwt.verify_es256", 2, |a| {
            verify_with(a, Algorithm::ES256)
        }),
        ("io.jwt.verify_es384", 2, |a| {
            verify_with(a, Algorithm::ES384)
        }),
        ("io.jwt.verify_hs256", 2, |a| {
            verify_with(a, Algorithm::HS256)
        }),
        ("io.jwt.verify_hs384", 2, |a| {
            verify_with(a, Algorithm::HS384)
        }),
        ("io.jwt.verify_hs512", 2, |a| {
            verify_with(a, Algorithm::HS512)
        }),
        // ring has no P-521, so ES512 cannot be verified; fail loudly rather than return false.
        ("io.jwt.verify_es512", 2, |_| {
            Err(JwtError::Argument("ES512 is not supported".into()))
        }),
        ("io.jwt.verify_eddsa", 2, |a| {
            verify_with(a, Algorithm::EdDSA)
        }),
    ];
    for (name, nargs, f) in builtins {
        let ext = move |args: Vec<Value>| -> anyhow::Result<Value> {
            Ok(f(&args).unwrap_or_else(|e| {
                tracing::debug!(builtin = name, error = %e, "builtin error (undefined)");
                Value::Undefined
            }))
        };
        engine
            .add_extension(name.to_string(), nargs, Box::new(ext))
            .map_err(|e| format!("registering {name}: {e}"))?;
    }
    Ok(builtins.iter().map(|(name, _, _)| *name).collect())
}

/// A split compact JWS.
struct Token<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    signing_input: &'a str,
}

fn split(jwt: &str) -> Result<Token<'_>> {
    let jwt = jwt.trim();
    let parts: Vec<&str> = jwt.split('.').collect();
    match parts.as_slice() {
        [header, payload, signature] => Ok(Token {
            header,
            payload,
            signature,
            signing_input: &jwt[..header.len() + 1 + payload.len()],
        }),
        [_, _, _, _, _] => Err(JwtError::Malformed(
            "JWT is a JWE object, which is not supported".into(),
        )),
        _ => Err(JwtError::Malformed(format!(
            "encoded JWT must have 3 sections, found {}",
            parts.len()
        ))),
    }
}

fn b64(segment: &str, what: &str) -> Result<Vec<u8>> {
    B64URL
        .decode(segment)
        .map_err(|e| JwtError::Malformed(format!("JWT {what} had invalid encoding: {e}")))
}

/// Decode a base64url JSON segment that must hold an object.
fn json_object(segment: &str, what: &str) -> Result<Value> {
    let bytes = b64(segment, what)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| JwtError::Malformed(format!("JWT {what} is not UTF-8")))?;
    let value = Value::from_json_str(text)
        .map_err(|e| JwtError::Malformed(format!("JWT {what} is not valid JSON: {e}")))?;
    match value {
        Value::Object(_) => Ok(value),
        _ => Err(JwtError::Malformed(format!("JWT {what} must be an object"))),
    }
}

fn string_arg<'a>(args: &'a [Value], i: usize, builtin: &str) -> Result<&'a str> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(JwtError::Argument(format!(
            "{builtin}: operand {} must be a string",
            i + 1
        ))),
    }
}

fn str_field<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    match &obj[key] {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// `io.jwt.decode(jwt)` => `[header, payload, signature_hex]`.
fn decode(args: &[Value]) -> Result<Value> {
    let token = split(string_arg(args, 0, "io.jwt.decode")?)?;
    let header = json_object(token.header, "header")?;
    // OPA unwraps nested tokens (`cty: JWT`) whose payload is itself a (quoted) JWT.
    if str_field(&header, "cty").is_some_and(|c| c.eq_ignore_ascii_case("JWT")) {
        let inner = b64(token.payload, "payload")?;
        let inner = String::from_utf8_lossy(&inner);
        let inner = inner.trim_matches(|c| c == '"' || c == '\'');
        return decode(&[Value::from(inner)]);
    }
    let payload = json_object(token.payload, "payload")?;
    let signature = hex(&b64(token.signature, "signature")?);
    Ok(Value::from(vec![header, payload, Value::from(signature)]))
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

/// Key family, tracked by us because jsonwebtoken panics if e.g. an RSA JWK is used for HMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
    Hmac,
}

fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
    }
}

struct Key {
    kid: Option<String>,
    family: Family,
    key: DecodingKey,
}

/// Parse OPA's `certificate` argument: PEM certificate(s), PEM public key(s), a JWK or a JWKS.
fn parse_keys(material: &str) -> Result<Vec<Key>> {
    let material = material.trim();
    if material.starts_with("-----BEGIN") {
        return parse_pem_keys(material);
    }
    let json: serde_json::Value = serde_json::from_str(material)
        .map_err(|e| JwtError::Key(format!("expected PEM or JWK/JWKS JSON: {e}")))?;
    let jwks = match json.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => return Err(JwtError::Key("JWKS `keys` must be an array".into())),
        None => vec![json],
    };
    // Skip individual keys we cannot use (e.g. unsupported curves), like OPA does.
    let keys: Vec<Key> = jwks
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .filter_map(|jwk| {
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                AlgorithmParameters::OctetKey(_) => Family::Hmac,
            };
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some(Key {
                kid: jwk.common.key_id.clone(),
                family,
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(JwtError::Key("no usable key in JWK/JWKS".into()));
    }
    Ok(keys)
}

fn parse_pem_keys(material: &str) -> Result<Vec<Key>> {
    let mut keys = Vec::new();
    // Certificate chains / key bundles hold several PEM blocks; each may carry a key.
    let mut rest = material;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let after = &rest[begin + 11..];
        let label = after.split("-----").next().unwrap_or_default();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[begin..].find(&end_marker) else {
            return Err(JwtError::Key(format!("unterminated {label} PEM block")));
        };
        let block_end = begin + end + end_marker.len();
        let pem = &rest.as_bytes()[begin..block_end];
        rest = &rest[block_end..];
        let (family, key) = DecodingKey::from_rsa_pem(pem)
            .map(|k| (Family::Rsa, k))
            .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| (Family::Ec, k)))
            .or_else(|_| DecodingKey::from_ed_pem(pem).map(|k| (Family::Ed, k)))
            .map_err(|e| JwtError::Key(format!("unsupported {label} PEM block: {e}")))?;
        keys.push(Key {
            kid: None,
            family,
            key,
        });
    }
    if keys.is_empty() {
        return Err(JwtError::Key("no PEM block found".into()));
    }
    Ok(keys)
}

/// True when any candidate key of the right family verifies the signature.
/// A `kid` in the header narrows candidates to matching keys when any match (as OPA does).
fn verify_signature(
    token: &Token<'_>,
    kid: Option<&str>,
    keys: &[Key],
    alg: Algorithm,
) -> Result<bool> {
    let want = family(alg);
    let by_kid: Vec<&Key> = match kid {
        Some(kid) => keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect(),
        None => Vec::new(),
    };
    let candidates: Vec<&Key> = if by_kid.is_empty() {
        keys.iter().collect()
    } else {
        by_kid
    };
    // jsonwebtoken expects unpadded base64url.
    let sig = token.signature.trim_end_matches('=');
    for key in candidates.into_iter().filter(|k| k.family == want) {
        match jsonwebtoken::crypto::verify(sig, token.signing_input.as_bytes(), &key.key, alg) {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            Err(e) => return Err(JwtError::Malformed(format!("JWT signature: {e}"))),
        }
    }
    Ok(false)
}

/// `io.jwt.verify_<alg>(jwt, certificate_or_secret)` => boolean.
fn verify_with(args: &[Value], alg: Algorithm) -> Result<Value> {
    let name = "io.jwt.verify";
    let token = split(string_arg(args, 0, name)?)?;
    let material = string_arg(args, 1, name)?;
    // Validate segment encodings so malformed tokens error instead of returning false.
    let header = json_object(token.header, "header")?;
    b64(token.signature, "signature")?;
    let keys = match family(alg) {
        Family::Hmac => vec![Key {
            kid: None,
            family: Family::Hmac,
            key: DecodingKey::from_secret(material.as_bytes()),
        }],
        _ => parse_keys(material)?,
    };
    let ok = verify_signature(&token, str_field(&header, "kid"), &keys, alg)?;
    Ok(Value::from(ok))
}

/// Parsed `decode_verify` constraints.
struct Constraints {
    keys: Option<Vec<Key>>,
    secret: Option<String>,
    alg: Option<String>,
    iss: Option<String>,
    aud: Option<String>,
    time_ns: f64,
}

fn parse_constraints(v: &Value) -> Result<Constraints> {
    let Value::Object(obj) = v else {
        return Err(JwtError::Argument(
            "io.jwt.decode_verify: constraints must be an object".into(),
        ));
    };
    let mut c = Constraints {
        keys: None,
        secret: None,
        alg: None,
        iss: None,
        aud: None,
        time_ns: now_ns(),
    };
    for (k, val) in obj.iter() {
        let key = match k {
            Value::String(s) => s.as_ref(),
            _ => {
                return Err(JwtError::Argument(
                    "token constraint keys must be strings".into(),
                ));
            }
        };
        let s = || match val {
            Value::String(s) => Ok(s.to_string()),
            _ => Err(JwtError::Argument(format!(
                "token constraint {key} must be a string"
            ))),
        };
        match key {
            "cert" => c.keys = Some(parse_keys(&s()?)?),
            "secret" => c.secret = Some(s()?),
            "alg" => c.alg = Some(s()?),
            "iss" => c.iss = Some(s()?),
            "aud" => c.aud = Some(s()?),
            "time" => {
                // Nanoseconds exceed f64's exact integers: read integers as integers first.
                c.time_ns = val
                    .as_i64()
                    .map(|n| n as f64)
                    .or_else(|_| val.as_f64())
                    .map_err(|_| {
                        JwtError::Argument("token constraint time must be a number".into())
                    })?;
            }
            other => {
                return Err(JwtError::Argument(format!(
                    "unknown token validation constraint: {other}"
                )));
            }
        }
    }
    match (&c.keys, &c.secret) {
        (Some(_), Some(_)) => Err(JwtError::Argument("duplicate key constraints".into())),
        (None, None) => Err(JwtError::Argument(
            "no key constraint (cert or secret)".into(),
        )),
        _ => Ok(c),
    }
}

fn now_ns() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as f64)
        .unwrap_or(0.0)
}

/// `io.jwt.decode_verify(jwt, constraints)` => `[valid, header, payload]`.
fn decode_verify(args: &[Value]) -> Result<Value> {
    let token = split(string_arg(args, 0, "io.jwt.decode_verify")?)?;
    let c = parse_constraints(args.get(1).unwrap_or(&Value::Undefined))?;
    let header = json_object(token.header, "header")?;
    let unverified = || {
        Value::from(vec![
            Value::from(false),
            Value::new_object(),
            Value::new_object(),
        ])
    };

    let alg_name = str_field(&header, "alg").unwrap_or_default();
    if c.alg.as_deref().is_some_and(|want| want != alg_name) {
        return Ok(unverified());
    }
    // Like OPA: a token whose algorithm cannot be verified (`none`, unknown) is not valid, not an error.
    let Ok(alg) = Algorithm::from_str(alg_name) else {
        return Ok(unverified());
    };
    let keys = match (family(alg), &c.secret, &c.keys) {
        (Family::Hmac, Some(secret), _) => vec![Key {
            kid: None,
            family: Family::Hmac,
            key: DecodingKey::from_secret(secret.as_bytes()),
        }],
        (Family::Hmac, None, _) | (_, Some(_), _) => return Ok(unverified()),
        (_, None, Some(keys)) => keys
            .iter()
            .map(|k| Key {
                kid: k.kid.clone(),
                family: k.family,
                key: k.key.clone(),
            })
            .collect(),
        (_, None, None) => return Ok(unverified()),
    };
    b64(token.signature, "signature")?;
    if !verify_signature(&token, str_field(&header, "kid"), &keys, alg)? {
        return Ok(unverified());
    }

    let payload = json_object(token.payload, "payload")?;
    let now_s = c.time_ns / 1e9;
    match &payload["exp"] {
        Value::Undefined => {}
        Value::Number(_) => {
            if now_s >= payload["exp"].as_f64().unwrap_or(f64::NEG_INFINITY) {
                return Ok(unverified());
            }
        }
        _ => return Err(JwtError::Malformed("exp value must be a number".into())),
    }
    match &payload["nbf"] {
        Value::Undefined => {}
        Value::Number(_) => {
            if now_s < payload["nbf"].as_f64().unwrap_or(f64::INFINITY) {
                return Ok(unverified());
            }
        }
        _ => return Err(JwtError::Malformed("nbf value must be a number".into())),
    }
    if let Some(iss) = &c.iss
        && str_field(&payload, "iss") != Some(iss.as_str())
    {
        return Ok(unverified());
    }
    // OPA: a token carrying `aud` is only valid when the constraint names one of its audiences.
    let aud_ok = match (&payload["aud"], c.aud.as_deref()) {
        (Value::Undefined, want) => want.is_none(),
        (_, None) => false,
        (Value::String(s), Some(want)) => s.as_ref() == want,
        (Value::Array(items), Some(want)) => items
            .iter()
            .any(|a| matches!(a, Value::String(s) if s.as_ref() == want)),
        _ => false,
    };
    if !aud_ok {
        return Ok(unverified());
    }
    Ok(Value::from(vec![Value::from(true), header, payload]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const RSA_KEY: &str = include_str!("testdata/rsa_key.pem");
    const RSA_PUB: &str = include_str!("testdata/rsa_pub.pem");
    const RSA_CERT: &str = include_str!("testdata/rsa_cert.pem");
    const EC_KEY: &str = include_str!("testdata/ec_key.pem");
    const EC_PUB: &str = include_str!("testdata/ec_pub.pem");
    const EC_CERT: &str = include_str!("testdata/ec_cert.pem");
    const JWKS: &str = include_str!("testdata/jwks.json");

    fn now_s() -> i64 {
        (now_ns() / 1e9) as i64
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        let key = match family(alg) {
            Family::Rsa => EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
            Family::Ec => EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
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
        verify_with(&args, alg).map(|v| serde_json::to_value(&v).unwrap())
    }

    fn tamper(jwt: &str) -> String {
        let mut parts: Vec<String> = jwt.split('.').map(str::to_string).collect();
        parts[1] = B64URL
            .encode(br#"{"sub":"mallory","role":"admin"}"#)
            .trim_end_matches('=')
            .to_string();
        parts.join(".")
    }

    #[test]
    fn decode_matches_opa_shape() {
        let jwt = sign(Algorithm::HS256, None, json!({"sub": "alice", "n": 1}));
        let out = call(decode, &[json!(jwt)]).unwrap();
        assert_eq!(out[0], json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(out[1], json!({"sub": "alice", "n": 1}));
        let sig = B64URL.decode(jwt.rsplit('.').next().unwrap()).unwrap();
        assert_eq!(out[2], json!(hex(&sig)));
        assert_eq!(out[2].as_str().unwrap().len(), 64);
    }

    #[test]
    fn decode_errors_on_malformed_tokens() {
        assert!(matches!(
            call(decode, &[json!("abc")]),
            Err(JwtError::Malformed(_))
        ));
        assert!(
            matches!(call(decode, &[json!("a.b.c.d.e")]), Err(JwtError::Malformed(m)) if m.contains("JWE"))
        );
        assert!(call(decode, &[json!("e30.!!!.c2ln")]).is_err());
        // payload must be an object
        let arr = B64URL.encode("[1]");
        assert!(call(decode, &[json!(format!("e30.{arr}.c2ln"))]).is_err());
        assert!(call(decode, &[json!(42)]).is_err());
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
        // a bundle with several certificates: any matching key verifies
        let bundle = format!("{RSA_CERT}{EC_CERT}");
        assert_eq!(
            verify(Algorithm::ES256, &jwt, &bundle).unwrap(),
            json!(true)
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
            matches!(dv(&plain, json!({"secret": "a", "foo": 1})), Err(JwtError::Argument(m)) if m.contains("foo"))
        );
        let bad_exp = sign(Algorithm::HS256, None, json!({"exp": "soon"}));
        assert!(dv(&bad_exp, json!({"secret": "s3cret"})).is_err());
        assert!(dv("a.b", json!({"secret": "s3cret"})).is_err());
    }

    #[test]
    fn extensions_work_in_rego_and_errors_are_undefined() {
        let mut engine = regorus::Engine::new();
        register(&mut engine).unwrap();
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
}
