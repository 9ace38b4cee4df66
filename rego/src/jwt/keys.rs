//! Key material of the `io.jwt.*` builtins, read as OPA reads it (one PEM certificate or public key, a JWK
//! or a JWK set), and the JWS algorithms that sign and verify with it. RSA, P-256, P-384, Ed25519 and HMAC
//! run on ring; P-521 (ES512) on RustCrypto's `p521`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature as sig;

/// JWS algorithms OPA knows (`tokenAlgorithms`).
pub const ALGORITHMS: [&str; 13] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256",
    "HS384", "HS512", "EdDSA",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    fn from_jwk(crv: &str) -> Result<Self, String> {
        match crv {
            "P-256" => Ok(Curve::P256),
            "P-384" => Ok(Curve::P384),
            "P-521" => Ok(Curve::P521),
            other => Err(format!("unsupported elliptic curve {other:?}")),
        }
    }

    /// Bytes of one coordinate or scalar.
    fn size(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }
}

/// A public key (private parts of a JWK are only kept for signing, see [`SigningKey`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// Big-endian modulus and exponent.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
    /// A JWK `oct` key: a shared secret.
    Secret(Vec<u8>),
    /// A certificate whose key algorithm we do not know: it verifies nothing (as in OPA).
    Unsupported,
}

/// One candidate key, with the `alg` and `kid` a JWK may carry.
#[derive(Clone, Debug)]
pub struct VerificationKey {
    pub key: PublicKey,
    pub alg: Option<String>,
    pub kid: Option<String>,
}

/// OPA's `getKeysFromCertOrJWK`: exactly one PEM block (a `CERTIFICATE` or a `PUBLIC KEY`), else a JWK or
/// a JWK set. Error texts are OPA's.
pub fn keys_from_cert_or_jwk(material: &str) -> Result<Vec<VerificationKey>, String> {
    if let Some(block) = pem_decode(material) {
        if !block.rest.is_empty() {
            return Err("extra data after a PEM certificate block".into());
        }
        let key = match block.label.as_str() {
            "CERTIFICATE" => certificate_public_key(&block.der)
                .map_err(|e| format!("failed to parse a PEM certificate: {e}"))?,
            "PUBLIC KEY" => spki_public_key(&block.der, false)
                .map_err(|e| format!("failed to parse a PEM public key: {e}"))?,
            _ => return Err("failed to extract a Key from the PEM certificate".into()),
        };
        return Ok(vec![VerificationKey {
            key,
            alg: None,
            kid: None,
        }]);
    }
    let jwks =
        parse_jwk_set(material).map_err(|e| format!("failed to parse a JWK key (set): {e}"))?;
    Ok(jwks
        .into_iter()
        // Keys naming an algorithm OPA does not know are skipped, not errors.
        .filter(|k| k.alg.as_deref().is_none_or(|a| ALGORITHMS.contains(&a)))
        .map(|k| VerificationKey {
            key: k.public,
            alg: k.alg,
            kid: k.kid,
        })
        .collect())
}

struct PemBlock {
    label: String,
    der: Vec<u8>,
    /// What follows the block's END line.
    rest: String,
}

/// The first well-formed PEM block, with Go's `encoding/pem` rules: text before `-----BEGIN` is skipped,
/// the END line must name the same label, and `rest` starts after the END line's newline.
fn pem_decode(text: &str) -> Option<PemBlock> {
    let mut search = 0;
    while let Some(found) = text[search..].find("-----BEGIN ") {
        let begin = search + found;
        search = begin + 1;
        if begin > 0 && text.as_bytes()[begin - 1] != b'\n' {
            continue;
        }
        let after_begin = &text[begin + "-----BEGIN ".len()..];
        let (type_line, body) = after_begin.split_once('\n').unwrap_or((after_begin, ""));
        let Some(label) = type_line
            .trim_end_matches([' ', '\t', '\r'])
            .strip_suffix("-----")
        else {
            continue;
        };
        let end_marker = format!("-----END {label}-----");
        let Some(end) = body.find(&end_marker) else {
            continue;
        };
        if end > 0 && body.as_bytes()[end - 1] != b'\n' {
            continue;
        }
        let after_end = &body[end + end_marker.len()..];
        let (end_line_rest, rest) = after_end.split_once('\n').unwrap_or((after_end, ""));
        if !end_line_rest.trim_end_matches([' ', '\t', '\r']).is_empty() {
            continue;
        }
        let b64: String = body[..end]
            .chars()
            .filter(|c| !matches!(c, ' ' | '\t' | '\r' | '\n'))
            .collect();
        let Ok(der) = STANDARD.decode(b64) else {
            continue;
        };
        return Some(PemBlock {
            label: label.to_string(),
            der,
            rest: rest.to_string(),
        });
    }
    None
}

/// A DER tag-length-value reader: just enough ASN.1 for certificates and SubjectPublicKeyInfo.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element's tag and contents.
    fn next(&mut self) -> Result<(u8, &'a [u8]), String> {
        let [tag, len0, rest @ ..] = self.0 else {
            return Err("truncated DER".into());
        };
        let (len, rest) = if *len0 < 0x80 {
            (usize::from(*len0), rest)
        } else {
            let n = usize::from(len0 & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("bad DER length".into());
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err("truncated DER".into());
        }
        let (value, rest) = rest.split_at(len);
        self.0 = rest;
        Ok((*tag, value))
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8], String> {
        match self.next()? {
            (t, v) if t == tag => Ok(v),
            (t, _) => Err(format!("expected {what}, found DER tag {t:#04x}")),
        }
    }

    /// The raw bytes (tag and length included) of the next element.
    fn raw(&mut self) -> Result<&'a [u8], String> {
        let start = self.0;
        self.next()?;
        Ok(&start[..start.len() - self.0.len()])
    }

    fn end(&self, what: &str) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("trailing data after {what}"))
        }
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// The subject public key of an X.509 certificate.
fn certificate_public_key(der: &[u8]) -> Result<PublicKey, String> {
    let mut outer = Der(der);
    let mut cert = Der(outer.expect(SEQUENCE, "a certificate")?);
    outer.end("the certificate")?;
    let mut tbs = Der(cert.expect(SEQUENCE, "tbsCertificate")?);
    cert.expect(SEQUENCE, "signatureAlgorithm")?;
    cert.expect(BIT_STRING, "signatureValue")?;
    cert.end("the certificate")?;
    let (mut tag, _) = tbs.next()?;
    if tag == 0xa0 {
        // Explicit version; the serial number follows.
        tag = tbs.next()?.0;
    }
    if tag != INTEGER {
        return Err("expected a serial number".into());
    }
    for what in ["signature", "issuer", "validity", "subject"] {
        tbs.expect(SEQUENCE, what)?;
    }
    spki_public_key(tbs.raw()?, true)
}

/// A SubjectPublicKeyInfo. In a certificate an unknown key algorithm is not an error (Go's x509 leaves
/// the key empty and verification fails); as a bare public key it is.
fn spki_public_key(der: &[u8], lenient: bool) -> Result<PublicKey, String> {
    let mut outer = Der(der);
    let mut spki = Der(outer.expect(SEQUENCE, "SubjectPublicKeyInfo")?);
    outer.end("SubjectPublicKeyInfo")?;
    let mut alg = Der(spki.expect(SEQUENCE, "AlgorithmIdentifier")?);
    let oid = alg.expect(OID, "an algorithm OID")?;
    let bits = spki.expect(BIT_STRING, "the public key")?;
    spki.end("SubjectPublicKeyInfo")?;
    let key = match bits {
        [0, key @ ..] => key,
        _ => return Err("malformed public key bit string".into()),
    };
    match oid {
        OID_RSA => {
            let mut outer = Der(key);
            let mut rsa = Der(outer.expect(SEQUENCE, "RSAPublicKey")?);
            let n = strip_zeros(rsa.expect(INTEGER, "the modulus")?);
            let e = strip_zeros(rsa.expect(INTEGER, "the exponent")?);
            rsa.end("RSAPublicKey")?;
            Ok(PublicKey::Rsa { n, e })
        }
        OID_EC => {
            let curve = match alg.expect(OID, "a named curve")? {
                OID_P256 => Curve::P256,
                OID_P384 => Curve::P384,
                OID_P521 => Curve::P521,
                _ if lenient => return Ok(PublicKey::Unsupported),
                _ => return Err("unsupported elliptic curve".into()),
            };
            Ok(PublicKey::Ec {
                curve,
                point: key.to_vec(),
            })
        }
        OID_ED25519 => Ok(PublicKey::Ed25519(key.to_vec())),
        _ if lenient => Ok(PublicKey::Unsupported),
        _ => Err("unknown public key algorithm".into()),
    }
}

fn strip_zeros(int: &[u8]) -> Vec<u8> {
    let start = int.iter().position(|b| *b != 0).unwrap_or(int.len());
    int[start..].to_vec()
}

/// A parsed JWK: its public key, and its private parts when it has them.
pub struct Jwk {
    pub public: PublicKey,
    pub private: Option<PrivateKey>,
    pub alg: Option<String>,
    pub kid: Option<String>,
}

pub enum PrivateKey {
    Rsa(Box<sig::RsaKeyPair>),
    /// The scalar and the JWK's public point (ring checks they match).
    Ec {
        curve: Curve,
        d: Vec<u8>,
        point: Vec<u8>,
    },
    Ed25519(Box<sig::Ed25519KeyPair>),
    Secret(Vec<u8>),
}

/// A JWK set (`{"keys": [...]}`) or a single JWK; every key must parse.
pub fn parse_jwk_set(text: &str) -> Result<Vec<Jwk>, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match json.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.iter().map(parse_jwk).collect(),
        Some(_) => Err("`keys` must be an array".into()),
        None => Ok(vec![parse_jwk(&json)?]),
    }
}

fn parse_jwk(jwk: &serde_json::Value) -> Result<Jwk, String> {
    let text = |name: &str| match jwk.get(name) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("JWK member {name:?} must be a string")),
    };
    let bytes = |name: &str| -> Result<Option<Vec<u8>>, String> {
        text(name)?
            .map(|s| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s.trim_end_matches('='))
                    .map_err(|e| format!("JWK member {name:?} is not base64url: {e}"))
            })
            .transpose()
    };
    let required = |name: &str| bytes(name)?.ok_or_else(|| format!("JWK is missing {name:?}"));
    let kty = text("kty")?.ok_or("JWK is missing \"kty\"")?;
    let (public, private) = match kty.as_str() {
        "RSA" => {
            let n = strip_zeros(&required("n")?);
            let e = strip_zeros(&required("e")?);
            let private = match bytes("d")? {
                None => None,
                Some(d) => {
                    let components = ring::rsa::KeyPairComponents {
                        public_key: ring::rsa::PublicKeyComponents { n: &n, e: &e },
                        d,
                        p: required("p")?,
                        q: required("q")?,
                        dP: required("dp")?,
                        dQ: required("dq")?,
                        qInv: required("qi")?,
                    };
                    let pair = sig::RsaKeyPair::from_components(&components)
                        .map_err(|e| format!("invalid RSA private key: {e}"))?;
                    Some(PrivateKey::Rsa(Box::new(pair)))
                }
            };
            (PublicKey::Rsa { n, e }, private)
        }
        "EC" => {
            let curve = Curve::from_jwk(&text("crv")?.ok_or("JWK is missing \"crv\"")?)?;
            let coordinate = |name: &str| -> Result<Vec<u8>, String> {
                let v = required(name)?;
                left_pad(&v, curve.size())
                    .ok_or_else(|| format!("JWK {name:?} is too long for the curve"))
            };
            let mut point = vec![4u8];
            point.extend(coordinate("x")?);
            point.extend(coordinate("y")?);
            let private = bytes("d")?
                .map(|d| {
                    left_pad(&d, curve.size())
                        .map(|d| PrivateKey::Ec {
                            curve,
                            d,
                            point: point.clone(),
                        })
                        .ok_or("JWK \"d\" is too long for the curve")
                })
                .transpose()?;
            (PublicKey::Ec { curve, point }, private)
        }
        "OKP" => {
            let crv = text("crv")?.ok_or("JWK is missing \"crv\"")?;
            if crv != "Ed25519" {
                return Err(format!("unsupported OKP curve {crv:?}"));
            }
            let x = required("x")?;
            let private = match bytes("d")? {
                None => None,
                Some(d) => Some(PrivateKey::Ed25519(Box::new(
                    sig::Ed25519KeyPair::from_seed_and_public_key(&d, &x)
                        .map_err(|e| format!("invalid Ed25519 private key: {e}"))?,
                ))),
            };
            (PublicKey::Ed25519(x), private)
        }
        "oct" => {
            let k = required("k")?;
            (PublicKey::Secret(k.clone()), Some(PrivateKey::Secret(k)))
        }
        other => return Err(format!("invalid key type {other:?}")),
    };
    Ok(Jwk {
        public,
        private,
        alg: text("alg")?,
        kid: text("kid")?,
    })
}

fn left_pad(v: &[u8], size: usize) -> Option<Vec<u8>> {
    let v = &v[v
        .len()
        .saturating_sub(size)
        .min(v.iter().take_while(|b| **b == 0).count())..];
    (v.len() <= size).then(|| {
        let mut out = vec![0; size - v.len()];
        out.extend_from_slice(v);
        out
    })
}

fn hmac_algorithm(alg: &str) -> Option<ring::hmac::Algorithm> {
    match alg {
        "HS256" => Some(ring::hmac::HMAC_SHA256),
        "HS384" => Some(ring::hmac::HMAC_SHA384),
        "HS512" => Some(ring::hmac::HMAC_SHA512),
        _ => None,
    }
}

/// HMAC over `message`, constant-time compared.
pub fn verify_hmac(alg: &str, secret: &[u8], message: &[u8], signature: &[u8]) -> bool {
    hmac_algorithm(alg).is_some_and(|a| {
        ring::hmac::verify(&ring::hmac::Key::new(a, secret), message, signature).is_ok()
    })
}

/// Whether `signature` is `alg`'s signature of `message` under `key`. A key of the wrong type, or an
/// algorithm this key cannot do, is "not verified" (false), as in OPA.
pub fn verify(key: &PublicKey, alg: &str, message: &[u8], signature: &[u8]) -> bool {
    let rsa = |params: &'static sig::RsaParameters| match key {
        PublicKey::Rsa { n, e } => sig::RsaPublicKeyComponents { n, e }
            .verify(params, message, signature)
            .is_ok(),
        _ => false,
    };
    match alg {
        "RS256" => rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => rsa(&sig::RSA_PSS_2048_8192_SHA256),
        "PS384" => rsa(&sig::RSA_PSS_2048_8192_SHA384),
        "PS512" => rsa(&sig::RSA_PSS_2048_8192_SHA512),
        "ES256" | "ES384" | "ES512" => match key {
            PublicKey::Ec { curve, point } => verify_ecdsa(*curve, alg, point, message, signature),
            _ => false,
        },
        "EdDSA" => match key {
            PublicKey::Ed25519(x) => sig::UnparsedPublicKey::new(&sig::ED25519, x)
                .verify(message, signature)
                .is_ok(),
            _ => false,
        },
        "HS256" | "HS384" | "HS512" => match key {
            PublicKey::Secret(k) => verify_hmac(alg, k, message, signature),
            _ => false,
        },
        _ => false,
    }
}

fn verify_ecdsa(curve: Curve, alg: &str, point: &[u8], message: &[u8], signature: &[u8]) -> bool {
    // JWS signatures are r || s; Go splits them in half and reads big-endian integers, so accept any
    // even length whose halves fit the curve.
    let half = signature.len() / 2;
    let (Some(r), Some(s)) = (
        left_pad(&signature[..half], curve.size()),
        left_pad(&signature[half..], curve.size()),
    ) else {
        return false;
    };
    if !signature.len().is_multiple_of(2) {
        return false;
    }
    let fixed = [r, s].concat();
    let ring_alg = match (curve, alg) {
        (Curve::P256, "ES256") => &sig::ECDSA_P256_SHA256_FIXED,
        (Curve::P384, "ES384") => &sig::ECDSA_P384_SHA384_FIXED,
        (Curve::P521, "ES512") => {
            use p521::ecdsa::signature::Verifier as _;
            let (Ok(key), Ok(sig)) = (
                p521::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p521::ecdsa::Signature::from_slice(&fixed),
            ) else {
                return false;
            };
            return key.verify(message, &sig).is_ok();
        }
        // A curve and hash OPA's Go could pair but ring cannot: not verified.
        _ => return false,
    };
    sig::UnparsedPublicKey::new(ring_alg, point)
        .verify(message, &fixed)
        .is_ok()
}

/// Signs `message` with `alg` and the first key of a JWK (set), as `io.jwt.encode_sign*` do.
pub fn sign(key: &PrivateKey, alg: &str, message: &[u8]) -> Result<Vec<u8>, String> {
    let rng = ring::rand::SystemRandom::new();
    let rsa = |encoding: &'static dyn sig::RsaEncoding| match key {
        PrivateKey::Rsa(pair) => {
            let mut out = vec![0; pair.public().modulus_len()];
            pair.sign(encoding, &rng, message, &mut out)
                .map_err(|_| "RSA signing failed (is the key at least 2048 bits?)".to_string())?;
            Ok(out)
        }
        _ => Err(format!(
            "the JWK cannot sign {alg}: it is not an RSA private key"
        )),
    };
    match alg {
        "RS256" => rsa(&sig::RSA_PKCS1_SHA256),
        "RS384" => rsa(&sig::RSA_PKCS1_SHA384),
        "RS512" => rsa(&sig::RSA_PKCS1_SHA512),
        "PS256" => rsa(&sig::RSA_PSS_SHA256),
        "PS384" => rsa(&sig::RSA_PSS_SHA384),
        "PS512" => rsa(&sig::RSA_PSS_SHA512),
        "HS256" | "HS384" | "HS512" => match (key, hmac_algorithm(alg)) {
            (PrivateKey::Secret(k), Some(a)) => {
                Ok(ring::hmac::sign(&ring::hmac::Key::new(a, k), message)
                    .as_ref()
                    .to_vec())
            }
            _ => Err(format!("the JWK cannot sign {alg}: it is not an oct key")),
        },
        "EdDSA" => match key {
            PrivateKey::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            _ => Err("the JWK cannot sign EdDSA: it is not an Ed25519 private key".into()),
        },
        "ES256" | "ES384" | "ES512" => {
            let PrivateKey::Ec { curve, d, point } = key else {
                return Err(format!(
                    "the JWK cannot sign {alg}: it is not an EC private key"
                ));
            };
            let ring_alg = match (curve, alg) {
                (Curve::P256, "ES256") => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                (Curve::P384, "ES384") => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                (Curve::P521, "ES512") => {
                    use p521::ecdsa::signature::Signer as _;
                    let key = p521::ecdsa::SigningKey::from_slice(d)
                        .map_err(|e| format!("invalid P-521 private key: {e}"))?;
                    let signature: p521::ecdsa::Signature = key.sign(message);
                    return Ok(signature.to_vec());
                }
                _ => return Err(format!("the JWK's curve does not match {alg}")),
            };
            let pair = sig::EcdsaKeyPair::from_private_key_and_public_key(ring_alg, d, point, &rng)
                .map_err(|e| format!("invalid EC private key: {e}"))?;
            pair.sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_string())
        }
        other => Err(format!("unknown JWS algorithm: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair as _;

    const RSA_CERT: &str = include_str!("../testdata/rsa_cert.pem");
    const EC_CERT: &str = include_str!("../testdata/ec_cert.pem");
    const EC_PUB: &str = include_str!("../testdata/ec_pub.pem");

    #[test]
    fn pem_blocks_follow_go_rules() {
        let keys = keys_from_cert_or_jwk(RSA_CERT).unwrap();
        assert!(matches!(keys[0].key, PublicKey::Rsa { .. }));
        let keys = keys_from_cert_or_jwk(EC_PUB).unwrap();
        assert!(matches!(
            keys[0].key,
            PublicKey::Ec {
                curve: Curve::P256,
                ..
            }
        ));
        // Leading text is skipped; anything after the block is refused.
        assert!(keys_from_cert_or_jwk(&format!("junk\n{EC_CERT}")).is_ok());
        assert_eq!(
            keys_from_cert_or_jwk(&format!("{RSA_CERT}{EC_CERT}")).unwrap_err(),
            "extra data after a PEM certificate block"
        );
        let private = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            keys_from_cert_or_jwk(private).unwrap_err(),
            "failed to extract a Key from the PEM certificate"
        );
        let garbled = "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
        assert!(
            keys_from_cert_or_jwk(garbled)
                .unwrap_err()
                .starts_with("failed to parse a PEM certificate: ")
        );
    }

    #[test]
    fn jwks_skip_unknown_algorithms_and_reject_unknown_key_types() {
        let set = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "a"},
                               {"kty": "oct", "k": "c2VjcmV0", "alg": "XX999"}]}"#;
        let keys = keys_from_cert_or_jwk(set).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        assert!(
            keys_from_cert_or_jwk(r#"{"kty": "bogus"}"#)
                .unwrap_err()
                .starts_with("failed to parse a JWK key (set): ")
        );
    }

    #[test]
    fn signs_and_verifies_every_curve() {
        let rng = ring::rand::SystemRandom::new();
        for (curve, alg, ring_alg) in [
            (Curve::P256, "ES256", &sig::ECDSA_P256_SHA256_FIXED_SIGNING),
            (Curve::P384, "ES384", &sig::ECDSA_P384_SHA384_FIXED_SIGNING),
        ] {
            let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).unwrap();
            let pair = sig::EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).unwrap();
            let point = pair.public_key().as_ref().to_vec();
            // ring does not expose the scalar: find it in its PKCS#8 output as the bytes that match the point.
            let d = (0..pkcs8.as_ref().len() - curve.size())
                .map(|i| pkcs8.as_ref()[i..i + curve.size()].to_vec())
                .find(|d| {
                    sig::EcdsaKeyPair::from_private_key_and_public_key(ring_alg, d, &point, &rng)
                        .is_ok()
                })
                .unwrap();
            let private = PrivateKey::Ec {
                curve,
                d,
                point: point.clone(),
            };
            let signature = sign(&private, alg, b"msg").unwrap();
            let public = PublicKey::Ec { curve, point };
            assert!(verify(&public, alg, b"msg", &signature));
            assert!(!verify(&public, alg, b"other", &signature));
        }
        let mut d = [7u8; 66];
        d[0] = 0; // below the group order
        let key = p521::ecdsa::SigningKey::from_slice(&d).unwrap();
        let point = key.verifying_key().to_sec1_point(false).as_bytes().to_vec();
        let private = PrivateKey::Ec {
            curve: Curve::P521,
            d: d.to_vec(),
            point: point.clone(),
        };
        let signature = sign(&private, "ES512", b"msg").unwrap();
        let public = PublicKey::Ec {
            curve: Curve::P521,
            point,
        };
        assert!(verify(&public, "ES512", b"msg", &signature));
        assert!(!verify(&public, "ES384", b"msg", &signature));
    }
}
