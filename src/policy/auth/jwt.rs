//! JWT verification with the accepted algorithms pinned by the key, never by
//! the token: an HS key accepts only HS256/384/512, an RSA key RS*/PS*, a P-256
//! key ES256, an Ed25519 key EdDSA. So `alg: none` and algorithm confusion (an
//! HS256 token "signed" with the public key's PEM bytes as the secret) fail
//! before any cryptography runs.
//!
//! `jsonwebtoken` checks the signature only; expiry, issuer and audience are
//! checked here so the reason can say *how* a token failed ("expired 42 s ago").
//! Details name claims and header fields, never the token or a key.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Why a configured key file cannot be used. Each text names the file (and,
/// in a key set, the key), never key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} holds a private key; give the public key (`openssl pkey -in key.pem -pubout`)",
        .path.display()
    )]
    PrivateKey { path: PathBuf },
    #[error("{} is not a PEM public key (RSA, EC P-256/P-384 or Ed25519)", .path.display())]
    NotPublicKey { path: PathBuf },
    #[error("{} is not a JSON Web Key Set: {source}", .path.display())]
    NotKeySet {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} holds no signature key", .path.display())]
    NoSignatureKey { path: PathBuf },
    /// `name` is the file and the key, e.g. `keys.json: key "a"`.
    #[error("{name} appears twice")]
    Duplicate { name: String },
    #[error("{name}: {source}")]
    Unusable {
        name: String,
        #[source]
        source: UnusableKey,
    },
}

/// Every problem found in a JSON Web Key Set, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", join_problems(.0))]
pub(crate) struct KeySetError(pub Vec<KeyError>);

fn join_problems(problems: &[KeyError]) -> String {
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    texts.join("; ")
}

/// Why one key (a PEM public key or a JWK) cannot verify tokens.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnusableKey {
    #[error("only the P-256 and P-384 curves are supported for EC keys")]
    EcCurve,
    #[error("only Ed25519 is supported for OKP keys")]
    OkpCurve,
    #[error("unsupported key type (kty)")]
    KeyType,
    #[error("\"alg\": {declared:?} does not fit this key type")]
    AlgorithmMismatch { declared: String },
    #[error("unusable key ({0})")]
    Jwk(#[source] jsonwebtoken::errors::Error),
    #[error("unsupported key (EC keys must be P-256 or P-384)")]
    NoAlgorithm,
    #[error("unusable {alg:?} key ({source})")]
    Probe {
        alg: Algorithm,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

/// Why a token was not accepted; the text is the `token rejected` detail the
/// client sees, so it names claims and header fields, never the token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("token is malformed (a JWT has three base64url parts separated by dots)")]
    NotThreeParts,
    #[error("token is malformed (its header is not base64url)")]
    HeaderNotBase64(#[source] base64::DecodeError),
    #[error("token is malformed (its header is not a JSON object)")]
    HeaderNotObject,
    #[error("token header has no \"alg\"")]
    NoAlgorithm,
    /// `kid` is already shortened.
    #[error("unknown key id {kid:?}")]
    UnknownKeyId { kid: String },
    #[error("token has no key id (\"kid\") and the key set has several keys")]
    NoKeyId,
    /// `alg` is already shortened; `accepted` lists the key's algorithms.
    #[error("token algorithm {alg:?} is not accepted (the key accepts {accepted})")]
    AlgorithmNotAccepted { alg: String, accepted: String },
    #[error("token signature is invalid")]
    SignatureInvalid,
    #[error("token algorithm {alg:?} is not accepted")]
    AlgorithmRejected { alg: String },
    #[error("token is malformed (its payload is not base64url-encoded JSON)")]
    PayloadMalformed(#[source] jsonwebtoken::errors::Error),
    #[error("token payload is not a JSON object")]
    PayloadNotObject,
    #[error(transparent)]
    Claim(#[from] ClaimError),
}

/// A verified token whose claims do not pass: expiry, issuer, audience.
/// Echoed values (`found`) are already shortened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error("token claim {name:?} is not a number of seconds")]
    NotSeconds { name: String },
    #[error("token has no expiry (\"exp\" claim)")]
    NoExpiry,
    #[error("token expired {ago} s ago")]
    Expired { ago: u64 },
    #[error(
        "token is not valid before {} (in {} s)",
        rfc3339(*.not_before),
        .not_before - .now
    )]
    NotYetValid { not_before: u64, now: u64 },
    #[error("token issuer {found:?} is not {expected:?}")]
    WrongIssuer { found: String, expected: String },
    #[error("token issuer is not a string; expected {expected:?}")]
    IssuerNotString { expected: String },
    #[error("token has no issuer (\"iss\"); expected {expected:?}")]
    NoIssuer { expected: String },
    #[error("token has no audience (\"aud\"); expected {expected:?}")]
    NoAudience { expected: String },
    /// `found` is the `aud` claim as JSON.
    #[error("token audience {found} does not include {expected:?}")]
    WrongAudience { found: String, expected: String },
}

fn rfc3339(unix_secs: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs),
    )
}

/// A key and the only algorithms a token verified with it may use.
#[derive(Debug)]
pub(crate) struct PinnedKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Where the verifying key comes from.
#[derive(Debug)]
pub(crate) enum Keys {
    /// `jwt_secret_env`, `jwt_secret_file` or `jwt_public_key`.
    Single(PinnedKey),
    /// `jwks_file`: chosen by the token's `kid` (or the only key when it has none).
    Set(Vec<(Option<String>, PinnedKey)>),
}

/// The claim checks after the signature.
#[derive(Debug)]
pub(crate) struct Rules {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Allowed clock skew for `exp` and `nbf`, in seconds.
    pub leeway: u64,
}

impl Keys {
    /// An HS256/384/512 shared secret.
    pub fn secret(secret: &[u8]) -> Keys {
        if secret.len() < 32 {
            // RFC 7518 §3.2 wants at least the hash size; refusing would break existing setups.
            tracing::warn!(
                "the JWT secret is shorter than 32 bytes; HS256 wants at least 32 random bytes"
            );
        }
        Keys::Single(PinnedKey {
            key: DecodingKey::from_secret(secret),
            algorithms: AlgorithmFamily::Hmac.algorithms().to_vec(),
        })
    }

    /// A PEM public key: RSA (PKCS#1 or SPKI), EC P-256/P-384 or Ed25519 (SPKI).
    pub fn public_key_pem(path: &Path) -> Result<Keys, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if String::from_utf8_lossy(&pem).contains("PRIVATE KEY") {
            return Err(KeyError::PrivateKey {
                path: path.to_path_buf(),
            });
        }
        let key = DecodingKey::from_rsa_pem(&pem)
            .map(|key| PinnedKey::for_family(key, AlgorithmFamily::Rsa))
            .or_else(|_| DecodingKey::from_ec_pem(&pem).map(PinnedKey::for_ec_point))
            .or_else(|_| {
                DecodingKey::from_ed_pem(&pem)
                    .map(|key| PinnedKey::for_family(key, AlgorithmFamily::Ed))
            })
            .map_err(|_| KeyError::NotPublicKey {
                path: path.to_path_buf(),
            })?;
        key.probe().map_err(|source| KeyError::Unusable {
            name: path.display().to_string(),
            source,
        })?;
        Ok(Keys::Single(key))
    }

    /// A JSON Web Key Set (RFC 7517 §5). Keys marked `"use": "enc"` are skipped;
    /// every other key must be usable, since a silently ignored key would only
    /// surface later as "unknown key id".
    pub fn jwks_file(path: &Path) -> Result<Keys, KeySetError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            KeySetError(vec![KeyError::Read {
                path: path.to_path_buf(),
                source,
            }])
        })?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|source| {
            KeySetError(vec![KeyError::NotKeySet {
                path: path.to_path_buf(),
                source,
            }])
        })?;
        let mut keys: Vec<(Option<String>, PinnedKey)> = Vec::new();
        let mut problems = Vec::new();
        for (index, jwk) in set.keys.iter().enumerate() {
            let name = match &jwk.common.key_id {
                Some(kid) => format!("{}: key {kid:?}", path.display()),
                None => format!("{}: keys[{index}]", path.display()),
            };
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            if keys
                .iter()
                .any(|(kid, _)| kid.is_some() && *kid == jwk.common.key_id)
            {
                problems.push(KeyError::Duplicate { name });
                continue;
            }
            match PinnedKey::from_jwk(jwk).and_then(|key| key.probe().map(|()| key)) {
                Ok(key) => keys.push((jwk.common.key_id.clone(), key)),
                Err(source) => problems.push(KeyError::Unusable { name, source }),
            }
        }
        if keys.is_empty() && problems.is_empty() {
            problems.push(KeyError::NoSignatureKey {
                path: path.to_path_buf(),
            });
        }
        if problems.is_empty() {
            Ok(Keys::Set(keys))
        } else {
            Err(KeySetError(problems))
        }
    }

    fn choose(&self, kid: Option<&str>) -> Result<&PinnedKey, TokenError> {
        let set = match self {
            Keys::Single(key) => return Ok(key),
            Keys::Set(set) => set,
        };
        match kid {
            Some(kid) => set
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key)
                .ok_or_else(|| TokenError::UnknownKeyId { kid: short(kid) }),
            None => match set.as_slice() {
                [(_, only)] => Ok(only),
                _ => Err(TokenError::NoKeyId),
            },
        }
    }
}

impl PinnedKey {
    fn for_family(key: DecodingKey, family: AlgorithmFamily) -> PinnedKey {
        PinnedKey {
            key,
            algorithms: family.algorithms().to_vec(),
        }
    }

    /// The curve decides between ES256 and ES384: the SEC1 point is 65 or 33
    /// bytes for P-256, 97 or 49 for P-384.
    fn for_ec_point(key: DecodingKey) -> PinnedKey {
        let point_len = key.try_get_as_bytes().map_or(0, <[u8]>::len);
        let algorithms = match point_len {
            65 | 33 => vec![Algorithm::ES256],
            97 | 49 => vec![Algorithm::ES384],
            _ => Vec::new(), // refused by `probe`
        };
        PinnedKey { key, algorithms }
    }

    fn from_jwk(jwk: &jsonwebtoken::jwk::Jwk) -> Result<PinnedKey, UnusableKey> {
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => return Err(UnusableKey::EcCurve),
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKeyPair(_) => {
                return Err(UnusableKey::OkpCurve);
            }
            AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac.algorithms().to_vec(),
            _ => return Err(UnusableKey::KeyType),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => by_type,
            Some(declared) => {
                let declared = declared.to_string();
                match Algorithm::from_str(&declared) {
                    Ok(alg) if by_type.contains(&alg) => vec![alg],
                    _ => return Err(UnusableKey::AlgorithmMismatch { declared }),
                }
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(UnusableKey::Jwk)?;
        Ok(PinnedKey { key, algorithms })
    }

    /// Builds a verifier once so a broken key is a config problem, not a
    /// run-time "signature invalid" for every token.
    fn probe(&self) -> Result<(), UnusableKey> {
        let alg = *self.algorithms.first().ok_or(UnusableKey::NoAlgorithm)?;
        jsonwebtoken::crypto::verify("AAAA", b"probe", &self.key, alg)
            .map(|_| ())
            .map_err(|source| UnusableKey::Probe { alg, source })
    }

    fn accepted(&self) -> String {
        let names: Vec<String> = self
            .algorithms
            .iter()
            .map(|alg| format!("{alg:?}"))
            .collect();
        names.join(", ")
    }
}

/// Verifies `token` at unix time `now`; `Err` is the reason detail.
pub(super) fn verify(
    keys: &Keys,
    rules: &Rules,
    token: &str,
    now: u64,
) -> Result<Map<String, Value>, TokenError> {
    let header = header_fields(token)?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::NoAlgorithm)?;
    let kid = header.get("kid").and_then(Value::as_str);
    let key = keys.choose(kid)?;
    let alg = Algorithm::from_str(alg_name)
        .ok()
        .filter(|alg| key.algorithms.contains(alg))
        .ok_or_else(|| TokenError::AlgorithmNotAccepted {
            alg: short(alg_name),
            accepted: key.accepted(),
        })?;

    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let claims = match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
        Ok(data) => data.claims,
        Err(error) => {
            return Err(match error.kind() {
                ErrorKind::InvalidSignature => TokenError::SignatureInvalid,
                ErrorKind::InvalidAlgorithm => TokenError::AlgorithmRejected {
                    alg: alg_name.to_owned(),
                },
                _ => TokenError::PayloadMalformed(error),
            });
        }
    };
    let Value::Object(claims) = claims else {
        return Err(TokenError::PayloadNotObject);
    };
    check_times(&claims, rules.leeway, now)?;
    check_issuer(&claims, rules.issuer.as_deref())?;
    check_audience(&claims, rules.audience.as_deref())?;
    Ok(claims)
}

/// The JOSE header, read before verification only to pick the key and check
/// `alg` against it.
fn header_fields(token: &str) -> Result<Map<String, Value>, TokenError> {
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(TokenError::NotThreeParts);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(TokenError::HeaderNotBase64)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err(TokenError::HeaderNotObject),
    }
}

fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, ClaimError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|secs| secs.is_finite() && *secs >= 0.0)
                    .map(|secs| secs as u64)
            })
            .map(Some)
            .ok_or_else(|| ClaimError::NotSeconds {
                name: name.to_owned(),
            }),
    }
}

/// A token without `exp` never expires; the edge refuses such tokens.
fn check_times(claims: &Map<String, Value>, leeway: u64, now: u64) -> Result<(), ClaimError> {
    let exp = numeric_claim(claims, "exp")?.ok_or(ClaimError::NoExpiry)?;
    if now > exp.saturating_add(leeway) {
        return Err(ClaimError::Expired { ago: now - exp });
    }
    if let Some(nbf) = numeric_claim(claims, "nbf")? {
        if nbf > now.saturating_add(leeway) {
            return Err(ClaimError::NotYetValid {
                not_before: nbf,
                now,
            });
        }
    }
    Ok(())
}

fn check_issuer(claims: &Map<String, Value>, expected: Option<&str>) -> Result<(), ClaimError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let expected = expected.to_owned();
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == expected => Ok(()),
        Some(Value::String(iss)) => Err(ClaimError::WrongIssuer {
            found: short(iss),
            expected,
        }),
        Some(_) => Err(ClaimError::IssuerNotString { expected }),
        None => Err(ClaimError::NoIssuer { expected }),
    }
}

/// RFC 7519 §4.1.3: `aud` is one string or an array of them.
fn check_audience(claims: &Map<String, Value>, expected: Option<&str>) -> Result<(), ClaimError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let matches = match claims.get("aud") {
        None => {
            return Err(ClaimError::NoAudience {
                expected: expected.to_owned(),
            });
        }
        Some(Value::String(aud)) => aud == expected,
        Some(Value::Array(list)) => list.iter().any(|aud| aud.as_str() == Some(expected)),
        Some(_) => false,
    };
    if matches {
        Ok(())
    } else {
        let aud = claims.get("aud").map(Value::to_string).unwrap_or_default();
        Err(ClaimError::WrongAudience {
            found: short(&aud),
            expected: expected.to_owned(),
        })
    }
}

/// `scope` (RFC 8693 §4.2, space-separated) or `scp` (an array, or a string as
/// some identity providers send it) must contain `required`.
pub(super) fn has_scope(claims: &Map<String, Value>, required: &str) -> bool {
    let in_text = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .is_some_and(|text| text.split_ascii_whitespace().any(|scope| scope == required))
    };
    let in_array = claims
        .get("scp")
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(|scope| scope.as_str() == Some(required)));
    in_text(claims.get("scope")) || in_text(claims.get("scp")) || in_array
}

/// How a claim travels as a header: strings as they are, numbers and booleans
/// printed, anything else as compact JSON.
pub(super) fn claim_text(value: &Value) -> String {
    // A string's own text; anything else (numbers, booleans, arrays) as JSON.
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Values echoed from a token are bounded so a reason body stays readable.
fn short(text: &str) -> String {
    const LIMIT: usize = 64;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
