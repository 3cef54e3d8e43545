//! `AuthPolicy` end to end: keys generated at run time, tokens signed here and
//! checked at a fixed clock so reasons are exact; forward auth against real
//! auth services on loopback sockets.

mod config;
mod forward;
mod grant;
mod jwt;

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde_json::{Value, json};

use super::*;
use crate::config::auth::build;
use crate::config::raw::RawAuth;

const NOW: u64 = 1_750_000_000;

struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl Signer {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// A fresh key pair: the signer and the public key as PEM and as raw bytes.
fn generate(alg: Algorithm) -> (Signer, String, Vec<u8>) {
    let pair = match alg {
        Algorithm::ES256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        Algorithm::EdDSA => KeyPair::generate_for(&PKCS_ED25519).unwrap(),
        other => panic!("no generator for {other:?}"),
    };
    let private = pair.serialize_pem();
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        _ => EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
    };
    (
        Signer {
            key,
            alg,
            kid: None,
        },
        pair.public_key_pem(),
        pair.public_key_raw().to_vec(),
    )
}

fn claims() -> Value {
    json!({ "sub": "alice", "exp": NOW + 600, "scope": "read chat" })
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn bearer(token: &str) -> Parts {
    request("/ws", &[("authorization", &format!("Bearer {token}"))])
}

fn build_ok(raw: &RawAuth, dir: &Path) -> AuthPolicy {
    build(raw, dir, "route[0].auth").unwrap()
}

fn check_at(policy: &AuthPolicy, parts: &Parts, now: u64) -> Result<AuthGrant, Rejection> {
    match &policy.mode {
        Mode::Jwt(auth) => auth.check(parts, now),
        Mode::Forward(_) => panic!("not a JWT policy"),
    }
}

fn invalid(policy: &AuthPolicy, parts: &Parts) -> String {
    match check_at(policy, parts, NOW) {
        Err(Rejection::TokenInvalid { detail }) => detail,
        other => panic!("expected token-invalid, got {other:?}"),
    }
}

/// An ES256 policy reading the token from everywhere, plus its signer.
fn es256_policy(dir: &Path, tweak: impl FnOnce(&mut RawAuth)) -> (AuthPolicy, Signer, String) {
    let (signer, public_pem, _) = generate(Algorithm::ES256);
    std::fs::write(dir.join("es256.pem"), &public_pem).unwrap();
    let mut raw = RawAuth {
        jwt_public_key: Some("es256.pem".into()),
        token_query: Some("token".into()),
        token_cookie: Some("session".into()),
        ..RawAuth::default()
    };
    tweak(&mut raw);
    (build_ok(&raw, dir), signer, public_pem)
}
