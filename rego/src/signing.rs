//! OPA-compatible bundle signing: a `.signatures.json` JWT listing a digest of every bundle file.
//!
//! Format (as in OPA's `bundle` package and `opa sign`):
//! - `.signatures.json` is `{"signatures":["<JWT>"]}`; OPA accepts exactly one JWT.
//! - The JWT header carries `alg` and, when a key id is set, `kid`; there is no `typ`.
//! - The payload is `{"files":[{"name","hash","algorithm"}],"keyid"?,"scope"?}`. File names are
//!   the archive names without the leading `/` (OPA trims it on both sign and verify).
//! - `hash` is lowercase hex. For "structured" files (base name `data.json`, `data.yaml`,
//!   `.manifest`, `.signatures.json`) OPA does not hash the raw bytes: it parses the document and
//!   hashes a canonical compact JSON rendering (object keys sorted bytewise, numbers kept as their
//!   literal text, strings re-encoded like Go's `encoding/json` without HTML escaping). Every
//!   other file (`.rego`, …) is hashed byte for byte. [`file_digest`] replicates both.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::Bundle;

/// Name of the signatures file inside a bundle (without the archive's leading `/`).
pub const SIGNATURES_FILE: &str = ".signatures.json";
/// The file hashing algorithm OPA uses by default, and the one [`sign`] writes.
pub const DEFAULT_HASH_ALGORITHM: &str = "SHA-256";

/// Errors from signing or verifying a bundle. Messages name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("invalid {algorithm} key: {reason}")]
    InvalidKey {
        algorithm: SigningAlgorithm,
        reason: String,
    },
    #[error(
        "unsupported signing algorithm '{0}'; use one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, HS256, HS384, HS512"
    )]
    UnsupportedAlgorithm(String),
    #[error("signing the bundle failed: {0}")]
    Sign(String),
    #[error(
        "bundle is not signed (no {SIGNATURES_FILE}) but a verification key is configured; sign the bundle or remove the key"
    )]
    Unsigned,
    #[error("{SIGNATURES_FILE} must contain exactly one JWT, found {0}")]
    SignatureCount(usize),
    #[error("{SIGNATURES_FILE}: malformed JWT: {0}")]
    MalformedToken(String),
    #[error(
        "{SIGNATURES_FILE}: JWT is signed with {found} but the verification key expects {expected}"
    )]
    AlgorithmMismatch { expected: String, found: String },
    #[error(
        "{SIGNATURES_FILE}: JWT signature does not verify with the configured key (wrong key, or the signature was altered)"
    )]
    BadSignature,
    #[error(
        "{SIGNATURES_FILE}: signature scope '{found}' does not match the expected scope '{expected}'"
    )]
    ScopeMismatch { expected: String, found: String },
    #[error("{SIGNATURES_FILE}: file '{0}' is listed more than once in the signature")]
    DuplicateSignedFile(String),
    #[error(
        "bundle file '{name}' uses hash algorithm '{algorithm}'; supported: SHA-256, SHA-384, SHA-512, SHA-512-256"
    )]
    UnsupportedHashAlgorithm { name: String, algorithm: String },
    #[error(
        "bundle file '{0}' is not covered by the signature (added after signing?); re-sign the bundle"
    )]
    FileNotSigned(String),
    #[error(
        "bundle file '{name}' does not match its signed digest (modified after signing?): signed {expected}, actual {actual}"
    )]
    DigestMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "files listed in the signature are missing from the bundle (removed after signing?): {}",
        .0.join(", ")
    )]
    FilesMissing(Vec<String>),
    #[error("cannot hash bundle file '{name}': {reason}")]
    Canonicalize { name: String, reason: String },
}

/// JWT algorithms supported for bundle signatures (OPA also supports ES512 and EdDSA-less
/// others; `jsonwebtoken` with `ring` does not do ES512).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    HS256,
    HS384,
    HS512,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    Ec,
    Hmac,
}

impl SigningAlgorithm {
    /// The JWT `alg` name, e.g. `RS256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::RS384 => Algorithm::RS384,
            Self::RS512 => Algorithm::RS512,
            Self::PS256 => Algorithm::PS256,
            Self::PS384 => Algorithm::PS384,
            Self::PS512 => Algorithm::PS512,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::HS256 => Algorithm::HS256,
            Self::HS384 => Algorithm::HS384,
            Self::HS512 => Algorithm::HS512,
        }
    }

    /// Whether the key is a shared secret rather than a PEM key.
    pub fn is_hmac(self) -> bool {
        self.family() == KeyFamily::Hmac
    }

    fn family(self) -> KeyFamily {
        match self {
            Self::RS256 | Self::RS384 | Self::RS512 | Self::PS256 | Self::PS384 | Self::PS512 => {
                KeyFamily::Rsa
            }
            Self::ES256 | Self::ES384 => KeyFamily::Ec,
            Self::HS256 | Self::HS384 | Self::HS512 => KeyFamily::Hmac,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlgorithm {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "HS256" => Self::HS256,
            "HS384" => Self::HS384,
            "HS512" => Self::HS512,
            other => return Err(SigningError::UnsupportedAlgorithm(other.to_string())),
        })
    }
}

/// Contents of `.signatures.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignaturesConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
    /// OPA's custom-verifier plugin name; kept for round-tripping, never acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

impl SignaturesConfig {
    /// Compact JSON as written into the bundle.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings cannot fail; fall back to an empty object defensively.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// One entry of the JWT payload's `files` list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub hash: String,
    pub algorithm: String,
}

/// JWT payload. Unknown claims (`iat`, `iss`, custom claims) are ignored like OPA does.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    files: Vec<FileInfo>,
    /// Deprecated by OPA in favour of the header `kid`, but still written for older OPAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

/// A private key (RSA/EC PEM, PKCS#8 for EC) or HMAC secret used to sign bundles.
#[derive(Clone)]
pub struct SigningKey {
    algorithm: SigningAlgorithm,
    key: EncodingKey,
    key_id: Option<String>,
    scope: Option<String>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("scope", &self.scope)
            .finish()
    }
}

impl SigningKey {
    /// A PEM private key for an RSA (`RS*`/`PS*`) or EC (`ES*`, PKCS#8 `PRIVATE KEY`) algorithm.
    pub fn from_pem(algorithm: SigningAlgorithm, pem: &[u8]) -> Result<Self, SigningError> {
        let key = match algorithm.family() {
            KeyFamily::Rsa => EncodingKey::from_rsa_pem(pem),
            KeyFamily::Ec => EncodingKey::from_ec_pem(pem),
            KeyFamily::Hmac => {
                return Err(SigningError::InvalidKey {
                    algorithm,
                    reason: "HMAC algorithms take a shared secret; use SigningKey::from_secret"
                        .into(),
                });
            }
        }
        .map_err(|e| SigningError::InvalidKey {
            algorithm,
            reason: format!("{e}; expected a PEM private key (EC keys in PKCS#8 form)"),
        })?;
        Ok(Self {
            algorithm,
            key,
            key_id: None,
            scope: None,
        })
    }

    /// A shared secret for an `HS*` algorithm.
    pub fn from_secret(algorithm: SigningAlgorithm, secret: &[u8]) -> Result<Self, SigningError> {
        check_secret(algorithm, secret)?;
        Ok(Self {
            algorithm,
            key: EncodingKey::from_secret(secret),
            key_id: None,
            scope: None,
        })
    }

    /// Sets the key id written as the JWT `kid` header and the (deprecated) `keyid` claim.
    pub fn with_key_id(mut self, key_id: impl Into<String>) -> Self {
        self.key_id = Some(key_id.into());
        self
    }

    /// Sets the `scope` claim; verifiers must be configured with the same scope.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }
}

/// A public key (PEM) or HMAC secret used to verify bundle signatures.
#[derive(Clone)]
pub struct VerificationKey {
    algorithm: SigningAlgorithm,
    key: DecodingKey,
    scope: Option<String>,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

impl VerificationKey {
    /// A PEM public key (`PUBLIC KEY`, or `RSA PUBLIC KEY` for RSA).
    pub fn from_pem(algorithm: SigningAlgorithm, pem: &[u8]) -> Result<Self, SigningError> {
        let key = match algorithm.family() {
            KeyFamily::Rsa => DecodingKey::from_rsa_pem(pem),
            KeyFamily::Ec => DecodingKey::from_ec_pem(pem),
            KeyFamily::Hmac => {
                return Err(SigningError::InvalidKey {
                    algorithm,
                    reason:
                        "HMAC algorithms take a shared secret; use VerificationKey::from_secret"
                            .into(),
                });
            }
        }
        .map_err(|e| SigningError::InvalidKey {
            algorithm,
            reason: format!("{e}; expected a PEM public key"),
        })?;
        Ok(Self {
            algorithm,
            key,
            scope: None,
        })
    }

    /// A shared secret for an `HS*` algorithm.
    pub fn from_secret(algorithm: SigningAlgorithm, secret: &[u8]) -> Result<Self, SigningError> {
        check_secret(algorithm, secret)?;
        Ok(Self {
            algorithm,
            key: DecodingKey::from_secret(secret),
            scope: None,
        })
    }

    /// The scope the signature must carry (OPA compares exactly; unset means "no scope").
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }
}

fn check_secret(algorithm: SigningAlgorithm, secret: &[u8]) -> Result<(), SigningError> {
    if algorithm.family() != KeyFamily::Hmac {
        return Err(SigningError::InvalidKey {
            algorithm,
            reason: "asymmetric algorithms take a PEM key; use from_pem".into(),
        });
    }
    if secret.is_empty() {
        return Err(SigningError::InvalidKey {
            algorithm,
            reason: "the HMAC secret is empty".into(),
        });
    }
    Ok(())
}

/// Signs `bundle` in place: hashes exactly the files [`Bundle::files`] yields (which is what
/// [`Bundle::to_tar_gz`] writes) and stores the resulting `.signatures.json`.
pub fn sign(bundle: &mut Bundle, key: &SigningKey) -> Result<(), SigningError> {
    let token = sign_files(&bundle.files(), key)?;
    bundle.set_signatures(Some(SignaturesConfig {
        signatures: vec![token],
        plugin: None,
    }));
    Ok(())
}

/// Builds the signature JWT over `files` (`(name, bytes)`; any `.signatures.json` is skipped).
pub fn sign_files(files: &[(String, Vec<u8>)], key: &SigningKey) -> Result<String, SigningError> {
    let mut infos = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let name = name.trim_start_matches('/');
        if name == SIGNATURES_FILE {
            continue;
        }
        infos.push(FileInfo {
            name: name.to_string(),
            hash: file_digest(name, bytes, DEFAULT_HASH_ALGORITHM)?,
            algorithm: DEFAULT_HASH_ALGORITHM.to_string(),
        });
    }
    // Stable payload regardless of the caller's file order.
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let payload = Payload {
        files: infos,
        keyid: key.key_id.clone(),
        scope: key.scope.clone(),
    };
    let mut header = Header::new(key.algorithm.jwt());
    // OPA writes no `typ`; keep the header minimal and identical to `opa sign`.
    header.typ = None;
    header.kid = key.key_id.clone();
    jsonwebtoken::encode(&header, &payload, &key.key).map_err(|e| SigningError::Sign(e.to_string()))
}

/// Verifies a bundle's stored signature against the files [`Bundle::files`] renders.
pub fn verify(bundle: &Bundle, key: &VerificationKey) -> Result<(), SigningError> {
    let signatures = bundle.signatures().ok_or(SigningError::Unsigned)?;
    verify_files(&bundle.files(), signatures, key)
}

/// Verifies raw bundle files (as read from an archive) against `signatures`: checks the JWT,
/// then that every file except `.signatures.json` is listed with a matching digest and that no
/// listed file is missing.
pub fn verify_files(
    files: &[(String, Vec<u8>)],
    signatures: &SignaturesConfig,
    key: &VerificationKey,
) -> Result<(), SigningError> {
    let payload = verify_token(signatures, key)?;
    let mut expected: BTreeMap<String, FileInfo> = BTreeMap::new();
    for info in payload.files {
        let name = info.name.trim_start_matches('/').to_string();
        if expected.insert(name.clone(), info).is_some() {
            return Err(SigningError::DuplicateSignedFile(name));
        }
    }
    for (name, bytes) in files {
        let name = name.trim_start_matches('/');
        if name == SIGNATURES_FILE {
            continue;
        }
        let info = expected
            .remove(name)
            .ok_or_else(|| SigningError::FileNotSigned(name.to_string()))?;
        let actual = file_digest(name, bytes, &info.algorithm)?;
        if !actual.eq_ignore_ascii_case(&info.hash) {
            return Err(SigningError::DigestMismatch {
                name: name.to_string(),
                expected: info.hash,
                actual,
            });
        }
    }
    if !expected.is_empty() {
        return Err(SigningError::FilesMissing(expected.into_keys().collect()));
    }
    Ok(())
}

fn verify_token(
    signatures: &SignaturesConfig,
    key: &VerificationKey,
) -> Result<Payload, SigningError> {
    let [token] = signatures.signatures.as_slice() else {
        return Err(SigningError::SignatureCount(signatures.signatures.len()));
    };
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| SigningError::MalformedToken(e.to_string()))?;
    if header.alg != key.algorithm.jwt() {
        return Err(SigningError::AlgorithmMismatch {
            expected: key.algorithm.to_string(),
            found: format!("{:?}", header.alg),
        });
    }
    let mut validation = Validation::new(key.algorithm.jwt());
    // Bundle signatures carry no registered time/audience claims; OPA checks none of them.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data =
        jsonwebtoken::decode::<Payload>(token, &key.key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => SigningError::BadSignature,
                _ => SigningError::MalformedToken(e.to_string()),
            }
        })?;
    let found = data.claims.scope.clone().unwrap_or_default();
    let expected = key.scope.clone().unwrap_or_default();
    if found != expected {
        return Err(SigningError::ScopeMismatch { expected, found });
    }
    Ok(data.claims)
}

/// True for the files OPA hashes over their canonical JSON form rather than raw bytes.
pub fn is_structured(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    matches!(
        base,
        "data.json" | "data.yaml" | ".manifest" | SIGNATURES_FILE
    )
}

/// Hex digest of one bundle file the way OPA computes it (see the module docs).
pub fn file_digest(name: &str, bytes: &[u8], algorithm: &str) -> Result<String, SigningError> {
    let alg = match algorithm {
        "SHA-256" => &ring::digest::SHA256,
        "SHA-384" => &ring::digest::SHA384,
        "SHA-512" => &ring::digest::SHA512,
        "SHA-512-256" => &ring::digest::SHA512_256,
        other => {
            return Err(SigningError::UnsupportedHashAlgorithm {
                name: name.to_string(),
                algorithm: other.to_string(),
            });
        }
    };
    let canonical;
    let input: &[u8] = if is_structured(name) {
        canonical =
            structured_canonical(name, bytes).map_err(|reason| SigningError::Canonicalize {
                name: name.to_string(),
                reason,
            })?;
        &canonical
    } else {
        bytes
    };
    Ok(hex(ring::digest::digest(alg, input).as_ref()))
}

fn structured_canonical(name: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    // OPA parses structured files with a JSON decoder and falls back to YAML (`util.Unmarshal`).
    match canonical_json(bytes) {
        Ok(c) => Ok(c),
        Err(json_err) if name.ends_with(".yaml") => {
            let text = std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_string())?;
            let value: Value = serde_saphyr::from_str(text)
                .map_err(|e| format!("neither JSON ({json_err}) nor YAML ({e})"))?;
            Ok(canonical_json_value(&value))
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Canonical compact JSON of a value (sorted keys, Go string escaping). Used both to write
/// `data.json`/`.manifest` and to hash them, so what Sluice writes is already canonical.
pub fn canonical_json_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_go_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sort explicitly: serde_json's `preserve_order` feature may be on elsewhere.
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_go_string(out, k);
                out.push(b':');
                write_value(out, v);
            }
            out.push(b'}');
        }
    }
}

/// Encodes a string like Go's `json.Encoder` with `SetEscapeHTML(false)` (Go ≥ 1.22):
/// short escapes for `\b \f \n \r \t`, `\u00XX` for other controls, and `\u2028`/`\u2029`.
fn write_go_string(out: &mut Vec<u8>, s: &str) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c if u32::from(c) < 0x20 => {
                let b = c as u8;
                out.extend_from_slice(b"\\u00");
                out.push(DIGITS[usize::from(b >> 4)]);
                out.push(DIGITS[usize::from(b & 0xf)]);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Canonicalizes JSON text the way OPA's hasher sees it: parse (numbers kept as literal text,
/// duplicate keys: last wins, invalid UTF-8 → U+FFFD per byte), then re-render canonically.
pub fn canonical_json(text: &[u8]) -> Result<Vec<u8>, String> {
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let mut parser = JsonParser { b: text, pos: 0 };
    let mut out = Vec::with_capacity(text.len());
    parser.value(&mut out, 0)?;
    parser.ws();
    if parser.pos != text.len() {
        return Err(format!("trailing data at byte {}", parser.pos));
    }
    Ok(out)
}

/// Deep enough for real data, shallow enough to never overflow the stack.
const MAX_JSON_DEPTH: usize = 512;

struct JsonParser<'a> {
    b: &'a [u8],
    pos: usize,
}

impl JsonParser<'_> {
    fn err(&self, what: &str) -> String {
        format!("invalid JSON at byte {}: {what}", self.pos)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", char::from(c))))
        }
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
        if depth > MAX_JSON_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.ws();
        match self.peek() {
            Some(b'{') => self.object(out, depth),
            Some(b'[') => self.array(out, depth),
            Some(b'"') => {
                let s = self.string()?;
                write_go_string(out, &s);
                Ok(())
            }
            Some(b't') => self.literal(out, b"true"),
            Some(b'f') => self.literal(out, b"false"),
            Some(b'n') => self.literal(out, b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(out),
            _ => Err(self.err("expected a value")),
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, lit: &[u8]) -> Result<(), String> {
        if self.b[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            out.extend_from_slice(lit);
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number fraction"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number exponent"));
            }
        }
        // Go decodes with UseNumber, so the literal text is what gets hashed.
        out.extend_from_slice(&self.b[start..self.pos]);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .b
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("truncated \\u escape"))?;
        let mut v = 0u32;
        for d in digits {
            let n = char::from(*d)
                .to_digit(16)
                .ok_or_else(|| self.err("invalid \\u escape"))?;
            v = v * 16 + n;
        }
        self.pos += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.pos += 1; // opening quote
        let mut s = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            match c {
                b'"' => {
                    self.pos += 1;
                    return Ok(s);
                }
                b'\\' => {
                    self.pos += 1;
                    let esc = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
                    self.pos += 1;
                    match esc {
                        b'"' => s.push('"'),
                        b'\\' => s.push('\\'),
                        b'/' => s.push('/'),
                        b'b' => s.push('\u{8}'),
                        b'f' => s.push('\u{c}'),
                        b'n' => s.push('\n'),
                        b'r' => s.push('\r'),
                        b't' => s.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            s.push(self.surrogate_aware(hi)?);
                        }
                        _ => return Err(self.err("invalid escape")),
                    }
                }
                0..=0x1f => return Err(self.err("control character in string")),
                0x20..=0x7f => {
                    s.push(char::from(c));
                    self.pos += 1;
                }
                _ => {
                    // Decode one UTF-8 char; like Go, each invalid byte becomes U+FFFD.
                    let len = match c {
                        0xc2..=0xdf => 2,
                        0xe0..=0xef => 3,
                        0xf0..=0xf4 => 4,
                        _ => 0,
                    };
                    let decoded = self
                        .b
                        .get(self.pos..self.pos + len)
                        .filter(|_| len > 0)
                        .and_then(|chunk| std::str::from_utf8(chunk).ok());
                    match decoded {
                        Some(ch) => {
                            s.push_str(ch);
                            self.pos += len;
                        }
                        None => {
                            s.push('\u{fffd}');
                            self.pos += 1;
                        }
                    }
                }
            }
        }
    }

    /// Combines a `\uD8xx\uDCxx` pair; lone surrogates become U+FFFD as in Go.
    fn surrogate_aware(&mut self, hi: u32) -> Result<char, String> {
        if (0xd800..0xdc00).contains(&hi) && self.b[self.pos..].starts_with(b"\\u") {
            let save = self.pos;
            self.pos += 2;
            let lo = self.hex4()?;
            if (0xdc00..0xe000).contains(&lo) {
                let cp = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
                return Ok(char::from_u32(cp).unwrap_or('\u{fffd}'));
            }
            self.pos = save;
        }
        Ok(char::from_u32(hi).unwrap_or('\u{fffd}'))
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
        self.pos += 1;
        out.push(b'[');
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            self.value(out, depth + 1)?;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    out.push(b',');
                }
                Some(b']') => {
                    self.pos += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
        self.pos += 1;
        // Sorted, last duplicate wins (Go map semantics).
        let mut members: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.ws();
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected an object key"));
                }
                let key = self.string()?;
                self.expect(b':')?;
                let mut v = Vec::new();
                self.value(&mut v, depth + 1)?;
                members.insert(key, v);
                self.ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.err("expected ',' or '}'")),
                }
            }
        }
        out.push(b'{');
        for (i, (k, v)) in members.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_go_string(out, &k);
            out.push(b':');
            out.extend_from_slice(&v);
        }
        out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Module;
    use crate::bundle::{BundleError, LoadOptions};
    use b64url::decode_part;
    use serde_json::json;

    const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
    const RSA_OTHER_PUBLIC: &str = include_str!("testdata/rsa_other_public.pem");
    const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");

    /// Minimal base64url decoding for inspecting JWT parts in tests (no extra dependency).
    mod b64url {
        pub fn decode_part(part: &str) -> Vec<u8> {
            let val = |c: u8| match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'-' => 62,
                _ => 63,
            };
            let mut out = Vec::new();
            let (mut acc, mut bits) = (0u32, 0);
            for c in part.bytes() {
                acc = (acc << 6) | u32::from(val(c));
                bits += 6;
                if bits >= 8 {
                    bits -= 8;
                    out.push((acc >> bits) as u8);
                }
            }
            out
        }
    }

    fn bundle() -> Bundle {
        Bundle::from_parts(
            vec![Module {
                path: "envoy/authz.rego".into(),
                source: "package envoy.authz\n\nallow if input.user == \"alice\"\n".into(),
            }],
            json!({"roles": {"admin": ["alice"]}}),
            Some("rev-1".into()),
            None,
        )
        .expect("bundle")
    }

    fn rsa() -> (SigningKey, VerificationKey) {
        (
            SigningKey::from_pem(SigningAlgorithm::RS256, RSA_PRIVATE.as_bytes())
                .expect("rsa private")
                .with_key_id("k1"),
            VerificationKey::from_pem(SigningAlgorithm::RS256, RSA_PUBLIC.as_bytes())
                .expect("rsa public"),
        )
    }

    fn with_key(key: &VerificationKey) -> LoadOptions {
        LoadOptions {
            verification_key: Some(key.clone()),
            ..LoadOptions::default()
        }
    }

    fn jwt_parts(b: &Bundle) -> (Value, Value) {
        let token = &b.signatures().expect("signed").signatures[0];
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = serde_json::from_slice(&decode_part(parts[0])).expect("header");
        let payload = serde_json::from_slice(&decode_part(parts[1])).expect("payload");
        (header, payload)
    }

    #[test]
    fn canonical_json_matches_opa_hashing_form() {
        let c = |s: &str| String::from_utf8(canonical_json(s.as_bytes()).expect(s)).expect("utf8");
        assert_eq!(
            c(r#" { "b" : [1, 2.50, -0, 1e3, 1E+2], "a": null } "#),
            r#"{"a":null,"b":[1,2.50,-0,1e3,1E+2]}"#
        );
        assert_eq!(c(r#"{"k":1,"k":2}"#), r#"{"k":2}"#);
        assert_eq!(
            c(r#""<>&\/\u00e9\u2028\u0001\b\f\n\r\t\"\\""#),
            "\"<>&/é\\u2028\\u0001\\b\\f\\n\\r\\t\\\"\\\\\""
        );
        assert_eq!(c(r#""\ud83d\ude00 \ud800x""#), "\"😀 \u{fffd}x\"");
        assert_eq!(c("\u{feff}{}"), "{}");
        assert_eq!(
            canonical_json(b"\"\xe2\x82\"").expect("lossy"),
            "\"\u{fffd}\u{fffd}\"".as_bytes()
        );
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01",
            "1.",
            "tru",
            "\"\u{1}\"",
            "{} x",
            "\"\\x\"",
        ] {
            assert!(
                canonical_json(bad.as_bytes()).is_err(),
                "{bad:?} should fail"
            );
        }
        let deep = "[".repeat(MAX_JSON_DEPTH + 2) + &"]".repeat(MAX_JSON_DEPTH + 2);
        assert!(canonical_json(deep.as_bytes()).is_err());
        // What Sluice writes is already canonical.
        let v = json!({"z": [1, 2.5, "a\u{2028}\u{7}"], "a": {"y": true, "x": null}});
        let written = canonical_json_value(&v);
        assert_eq!(canonical_json(&written).expect("canon"), written);
    }

    #[test]
    fn structured_files_hash_their_canonical_form() {
        let a = file_digest("x/data.json", br#"{"b":1,"a":[1,2]}"#, "SHA-256").expect("a");
        let b = file_digest(
            "x/data.json",
            b"{\n  \"a\": [1, 2],\n  \"b\": 1\n}\n",
            "SHA-256",
        )
        .expect("b");
        assert_eq!(a, b);
        let y = file_digest("x/data.yaml", b"a: [1, 2]\nb: 1\n", "SHA-256").expect("yaml");
        assert_eq!(a, y);
        // Non-structured files are hashed byte for byte.
        let r1 = file_digest("p.rego", b"package p\n", "SHA-256").expect("r");
        let r2 = file_digest("p.rego", b"package p \n", "SHA-256").expect("r");
        assert_ne!(r1, r2);
        assert_eq!(
            file_digest("p.rego", b"", "SHA-256").expect("empty"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(matches!(
            file_digest("p.rego", b"", "MD5"),
            Err(SigningError::UnsupportedHashAlgorithm { .. })
        ));
    }

    #[test]
    fn rs256_round_trip() {
        let (sk, vk) = rsa();
        let mut b = bundle();
        sign(&mut b, &sk).expect("sign");
        verify(&b, &vk).expect("verify");
        let (header, payload) = jwt_parts(&b);
        assert_eq!(header, json!({"alg": "RS256", "kid": "k1"}));
        assert_eq!(payload["keyid"], "k1");
        let names: Vec<&str> = payload["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, [".manifest", "data.json", "envoy/authz.rego"]);
        assert!(
            payload["files"]
                .as_array()
                .expect("files")
                .iter()
                .all(|f| f["algorithm"] == "SHA-256")
        );

        // RS256 is deterministic, so signed tarballs are reproducible too.
        let mut again = bundle();
        sign(&mut again, &sk).expect("sign");
        let tgz = b.to_tar_gz().expect("tgz");
        assert_eq!(tgz, again.to_tar_gz().expect("tgz"));

        let loaded = Bundle::from_tar_gz(&tgz, &with_key(&vk)).expect("verified load");
        assert_eq!(loaded, b);
        verify(&loaded, &vk).expect("re-verify");
        assert_eq!(loaded.to_tar_gz().expect("tgz"), tgz);
        // Signed bundle without a key: loads (signature kept, unchecked).
        let unchecked = Bundle::from_tar_gz(&tgz, &LoadOptions::default()).expect("load");
        assert!(unchecked.signatures().is_some());
    }

    #[test]
    fn es256_and_hs256_round_trip() {
        let sk = SigningKey::from_pem(SigningAlgorithm::ES256, EC_PRIVATE.as_bytes()).expect("ec");
        let vk =
            VerificationKey::from_pem(SigningAlgorithm::ES256, EC_PUBLIC.as_bytes()).expect("ec");
        let mut b = bundle();
        sign(&mut b, &sk).expect("sign");
        let (header, _) = jwt_parts(&b);
        assert_eq!(header, json!({"alg": "ES256"}));
        let tgz = b.to_tar_gz().expect("tgz");
        Bundle::from_tar_gz(&tgz, &with_key(&vk)).expect("verified load");

        let sk = SigningKey::from_secret(SigningAlgorithm::HS256, b"s3cret").expect("hs");
        let vk = VerificationKey::from_secret(SigningAlgorithm::HS256, b"s3cret").expect("hs");
        let mut b = bundle();
        sign(&mut b, &sk).expect("sign");
        verify(&b, &vk).expect("verify");
        let wrong = VerificationKey::from_secret(SigningAlgorithm::HS256, b"other").expect("hs");
        assert!(matches!(
            verify(&b, &wrong),
            Err(SigningError::BadSignature)
        ));
    }

    #[test]
    fn tampering_is_detected_and_named() {
        let (sk, vk) = rsa();
        let mut signed = bundle();
        sign(&mut signed, &sk).expect("sign");

        let mut modified = signed.clone();
        modified.modules[0].source.push_str("allow := true\n");
        let err = verify(&modified, &vk).expect_err("modified");
        assert!(
            matches!(err, SigningError::DigestMismatch { ref name, .. } if name == "envoy/authz.rego"),
            "{err}"
        );
        // The same through a tarball: the stale signature is written, loading refuses it.
        let err = Bundle::from_tar_gz(&modified.to_tar_gz().expect("tgz"), &with_key(&vk))
            .expect_err("tampered tarball");
        assert!(err.to_string().contains("envoy/authz.rego"), "{err}");

        let mut data_changed = signed.clone();
        data_changed.data["roles"]["admin"] = json!(["mallory"]);
        let err = verify(&data_changed, &vk).expect_err("data");
        assert!(
            matches!(err, SigningError::DigestMismatch { ref name, .. } if name == "data.json")
        );

        let mut added = signed.clone();
        added.modules.push(Module {
            path: "zz.rego".into(),
            source: "package envoy.authz.zz\n".into(),
        });
        let err = verify(&added, &vk).expect_err("added");
        assert!(
            matches!(err, SigningError::FileNotSigned(ref n) if n == "zz.rego"),
            "{err}"
        );

        let mut removed = signed.clone();
        removed.modules.clear();
        let err = verify(&removed, &vk).expect_err("removed");
        assert!(
            matches!(err, SigningError::FilesMissing(ref n) if n == &["envoy/authz.rego".to_string()]),
            "{err}"
        );

        let other = VerificationKey::from_pem(SigningAlgorithm::RS256, RSA_OTHER_PUBLIC.as_bytes())
            .expect("other");
        assert!(matches!(
            verify(&signed, &other),
            Err(SigningError::BadSignature)
        ));
        let ec =
            VerificationKey::from_pem(SigningAlgorithm::ES256, EC_PUBLIC.as_bytes()).expect("ec");
        assert!(matches!(
            verify(&signed, &ec),
            Err(SigningError::AlgorithmMismatch { .. })
        ));

        // Re-formatting data.json is not tampering (OPA hashes structured files canonically).
        let mut files = signed.files();
        for (name, bytes) in &mut files {
            if name == "data.json" {
                *bytes = b"{ \"roles\" : { \"admin\" : [ \"alice\" ] } }\n".to_vec();
            }
        }
        verify_files(&files, signed.signatures().expect("sig"), &vk).expect("whitespace ok");
    }

    #[test]
    fn signature_presence_scope_and_count() {
        let (sk, vk) = rsa();
        let tgz = bundle().to_tar_gz().expect("tgz");
        let err = Bundle::from_tar_gz(&tgz, &with_key(&vk)).expect_err("unsigned");
        assert!(
            matches!(err, BundleError::Signature(SigningError::Unsigned)),
            "{err}"
        );
        assert!(matches!(
            verify(&bundle(), &vk),
            Err(SigningError::Unsigned)
        ));

        let mut scoped = bundle();
        sign(&mut scoped, &sk.clone().with_scope("write")).expect("sign");
        assert!(matches!(
            verify(&scoped, &vk),
            Err(SigningError::ScopeMismatch { .. })
        ));
        verify(&scoped, &vk.clone().with_scope("write")).expect("scope ok");

        let mut b = bundle();
        sign(&mut b, &sk).expect("sign");
        let mut two = b.signatures().expect("sig").clone();
        two.signatures.push(two.signatures[0].clone());
        assert!(matches!(
            verify_files(&b.files(), &two, &vk),
            Err(SigningError::SignatureCount(2))
        ));
        let garbage = SignaturesConfig {
            signatures: vec!["not-a-jwt".into()],
            plugin: None,
        };
        assert!(matches!(
            verify_files(&b.files(), &garbage, &vk),
            Err(SigningError::MalformedToken(_))
        ));
    }

    /// Checks a signed Sluice bundle against a real OPA. Not run by default (no `opa` here):
    /// `cargo test policy::signing -- --ignored` with `opa` (v1.x) on PATH.
    #[test]
    #[ignore = "needs the `opa` binary on PATH"]
    fn real_opa_accepts_signed_bundle_and_rejects_tampering() {
        use std::process::Command;
        let dir = tempfile::tempdir().expect("tmp");
        let (sk, _) = rsa();
        let mut b = bundle();
        sign(&mut b, &sk).expect("sign");
        let good = dir.path().join("good.tar.gz");
        std::fs::write(&good, b.to_tar_gz().expect("tgz")).expect("write");
        b.modules[0].source = "package envoy.authz\n\nallow := true\n".into();
        let bad = dir.path().join("bad.tar.gz");
        std::fs::write(&bad, b.to_tar_gz().expect("tgz")).expect("write");
        let key = dir.path().join("pub.pem");
        std::fs::write(&key, RSA_PUBLIC).expect("write");
        let input = dir.path().join("input.json");
        std::fs::write(&input, r#"{"user":"alice"}"#).expect("write");
        let eval = |bundle: &std::path::Path| {
            Command::new("opa")
                .arg("eval")
                .arg("--bundle")
                .arg(bundle)
                .arg("--verification-key")
                .arg(&key)
                .args(["--verification-key-id", "k1", "--format", "raw", "--input"])
                .arg(&input)
                .arg("data.envoy.authz.allow")
                .output()
                .expect("run opa (is it on PATH?)")
        };
        let ok = eval(&good);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "true");
        let tampered = eval(&bad);
        assert!(!tampered.status.success(), "OPA accepted a tampered bundle");
    }

    #[test]
    fn key_construction_errors() {
        assert!(SigningKey::from_pem(SigningAlgorithm::RS256, b"nope").is_err());
        assert!(SigningKey::from_pem(SigningAlgorithm::HS256, RSA_PRIVATE.as_bytes()).is_err());
        assert!(SigningKey::from_secret(SigningAlgorithm::RS256, b"x").is_err());
        assert!(SigningKey::from_secret(SigningAlgorithm::HS256, b"").is_err());
        assert!(VerificationKey::from_pem(SigningAlgorithm::ES256, RSA_PUBLIC.as_bytes()).is_err());
        assert_eq!(
            "ES256".parse::<SigningAlgorithm>().expect("alg"),
            SigningAlgorithm::ES256
        );
        assert!("none".parse::<SigningAlgorithm>().is_err());
        let dbg = format!(
            "{:?}",
            SigningKey::from_secret(SigningAlgorithm::HS256, b"s3cret")
        );
        assert!(!dbg.contains("s3cret"));
    }
}
