//! JWT verification with the accepted algorithms pinned by the key, never by
//! the token: an HS key accepts only HS256/384/512, an RSA key RS*/PS*, a P-256
//! key ES256, an Ed25519 key EdDSA. So `alg: none` and algorithm confusion (an
//! HS256 token "signed" with the public key's PEM bytes as the secret) fail
//! before any cryptography runs.
//!
//! `jsonwebtoken` checks the signature only; expiry, issuer and audience are
//! checked here so the reason can say *how* a token failed ("expired 42 s ago").
//! Details name claims and header fields, never the token or a key.

use std::path::Path;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

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
    pub fn public_key_pem(path: &Path) -> Result<Keys, String> {
        let pem = std::fs::read(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        if String::from_utf8_lossy(&pem).contains("PRIVATE KEY") {
            return Err(format!(
                "{} holds a private key; give the public key (`openssl pkey -in key.pem -pubout`)",
                path.display()
            ));
        }
        let key = DecodingKey::from_rsa_pem(&pem)
            .map(|key| PinnedKey::for_family(key, AlgorithmFamily::Rsa))
            .or_else(|_| DecodingKey::from_ec_pem(&pem).map(PinnedKey::for_ec_point))
            .or_else(|_| {
                DecodingKey::from_ed_pem(&pem)
                    .map(|key| PinnedKey::for_family(key, AlgorithmFamily::Ed))
            })
            .map_err(|_| {
                format!(
                    "{} is not a PEM public key (RSA, EC P-256/P-384 or Ed25519)",
                    path.display()
                )
            })?;
        key.probe()
            .map_err(|why| format!("{}: {why}", path.display()))?;
        Ok(Keys::Single(key))
    }

    /// A JSON Web Key Set (RFC 7517 §5). Keys marked `"use": "enc"` are skipped;
    /// every other key must be usable, since a silently ignored key would only
    /// surface later as "unknown key id".
    pub fn jwks_file(path: &Path) -> Result<Keys, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| vec![format!("cannot read {}: {error}", path.display())])?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|error| {
            vec![format!(
                "{} is not a JSON Web Key Set: {error}",
                path.display()
            )]
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
                problems.push(format!("{name} appears twice"));
                continue;
            }
            match PinnedKey::from_jwk(jwk).and_then(|key| key.probe().map(|()| key)) {
                Ok(key) => keys.push((jwk.common.key_id.clone(), key)),
                Err(why) => problems.push(format!("{name}: {why}")),
            }
        }
        if keys.is_empty() && problems.is_empty() {
            problems.push(format!("{} holds no signature key", path.display()));
        }
        if problems.is_empty() {
            Ok(Keys::Set(keys))
        } else {
            Err(problems)
        }
    }

    fn choose(&self, kid: Option<&str>) -> Result<&PinnedKey, String> {
        let set = match self {
            Keys::Single(key) => return Ok(key),
            Keys::Set(set) => set,
        };
        match kid {
            Some(kid) => set
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid))
                .map(|(_, key)| key)
                .ok_or_else(|| format!("unknown key id {:?}", short(kid))),
            None => match set.as_slice() {
                [(_, only)] => Ok(only),
                _ => {
                    Err("token has no key id (\"kid\") and the key set has several keys".to_owned())
                }
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

    fn from_jwk(jwk: &jsonwebtoken::jwk::Jwk) -> Result<PinnedKey, String> {
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => {
                    return Err(
                        "only the P-256 and P-384 curves are supported for EC keys".to_owned()
                    );
                }
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKeyPair(_) => {
                return Err("only Ed25519 is supported for OKP keys".to_owned());
            }
            AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac.algorithms().to_vec(),
            _ => return Err("unsupported key type (kty)".to_owned()),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => by_type,
            Some(declared) => {
                let declared = declared.to_string();
                match Algorithm::from_str(&declared) {
                    Ok(alg) if by_type.contains(&alg) => vec![alg],
                    _ => return Err(format!("\"alg\": {declared:?} does not fit this key type")),
                }
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|error| format!("unusable key ({error})"))?;
        Ok(PinnedKey { key, algorithms })
    }

    /// Builds a verifier once so a broken key is a config problem, not a
    /// run-time "signature invalid" for every token.
    fn probe(&self) -> Result<(), String> {
        let alg = *self
            .algorithms
            .first()
            .ok_or("unsupported key (EC keys must be P-256 or P-384)")?;
        jsonwebtoken::crypto::verify("AAAA", b"probe", &self.key, alg)
            .map(|_| ())
            .map_err(|error| format!("unusable {alg:?} key ({error})"))
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
) -> Result<Map<String, Value>, String> {
    let header = header_fields(token)?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("token header has no \"alg\"")?;
    let kid = header.get("kid").and_then(Value::as_str);
    let key = keys.choose(kid)?;
    let alg = Algorithm::from_str(alg_name)
        .ok()
        .filter(|alg| key.algorithms.contains(alg))
        .ok_or_else(|| {
            format!(
                "token algorithm {:?} is not accepted (the key accepts {})",
                short(alg_name),
                key.accepted()
            )
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
                ErrorKind::InvalidSignature => "token signature is invalid".to_owned(),
                ErrorKind::InvalidAlgorithm => {
                    format!("token algorithm {alg_name:?} is not accepted")
                }
                _ => "token is malformed (its payload is not base64url-encoded JSON)".to_owned(),
            });
        }
    };
    let Value::Object(claims) = claims else {
        return Err("token payload is not a JSON object".to_owned());
    };
    check_times(&claims, rules.leeway, now)?;
    check_issuer(&claims, rules.issuer.as_deref())?;
    check_audience(&claims, rules.audience.as_deref())?;
    Ok(claims)
}

/// The JOSE header, read before verification only to pick the key and check
/// `alg` against it.
fn header_fields(token: &str) -> Result<Map<String, Value>, String> {
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(
            "token is malformed (a JWT has three base64url parts separated by dots)".to_owned(),
        );
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| "token is malformed (its header is not base64url)".to_owned())?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err("token is malformed (its header is not a JSON object)".to_owned()),
    }
}

fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
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
            .ok_or_else(|| format!("token claim {name:?} is not a number of seconds")),
    }
}

/// A token without `exp` never expires; the edge refuses such tokens.
fn check_times(claims: &Map<String, Value>, leeway: u64, now: u64) -> Result<(), String> {
    let exp = numeric_claim(claims, "exp")?.ok_or("token has no expiry (\"exp\" claim)")?;
    if now > exp.saturating_add(leeway) {
        return Err(format!("token expired {} s ago", now - exp));
    }
    if let Some(nbf) = numeric_claim(claims, "nbf")? {
        if nbf > now.saturating_add(leeway) {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(nbf);
            return Err(format!(
                "token is not valid before {} (in {} s)",
                humantime::format_rfc3339_seconds(at),
                nbf - now
            ));
        }
    }
    Ok(())
}

fn check_issuer(claims: &Map<String, Value>, expected: Option<&str>) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == expected => Ok(()),
        Some(Value::String(iss)) => {
            Err(format!("token issuer {:?} is not {expected:?}", short(iss)))
        }
        Some(_) => Err(format!(
            "token issuer is not a string; expected {expected:?}"
        )),
        None => Err(format!(
            "token has no issuer (\"iss\"); expected {expected:?}"
        )),
    }
}

/// RFC 7519 §4.1.3: `aud` is one string or an array of them.
fn check_audience(claims: &Map<String, Value>, expected: Option<&str>) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let matches = match claims.get("aud") {
        None => {
            return Err(format!(
                "token has no audience (\"aud\"); expected {expected:?}"
            ));
        }
        Some(Value::String(aud)) => aud == expected,
        Some(Value::Array(list)) => list.iter().any(|aud| aud.as_str() == Some(expected)),
        Some(_) => false,
    };
    if matches {
        Ok(())
    } else {
        let aud = claims.get("aud").map(Value::to_string).unwrap_or_default();
        Err(format!(
            "token audience {} does not include {expected:?}",
            short(&aud)
        ))
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
