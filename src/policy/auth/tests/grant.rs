//! What a passing check changes: scope, claim headers, spoof stripping,
//! `strip_token`, and key choice in a JWKS (plus RSA when `openssl` exists).

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use super::*;

#[test]
fn required_scope_reads_scope_text_and_scp_array() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) =
        es256_policy(dir.path(), |raw| raw.required_scope = Some("chat".into()));
    let exp = NOW + 60;
    for granted in [
        json!({ "exp": exp, "scope": "read chat" }),
        json!({ "exp": exp, "scp": ["chat"] }),
        json!({ "exp": exp, "scp": "x chat" }),
    ] {
        assert!(
            check_at(&policy, &bearer(&signer.sign(&granted)), NOW).is_ok(),
            "{granted}"
        );
    }
    let lacking = [
        json!({ "exp": exp, "scope": "read chatty" }),
        json!({ "exp": exp, "scp": ["read", "chat.write"] }),
        json!({ "exp": exp, "scope": ["chat"] }),
        json!({ "exp": exp }),
    ];
    for claims in lacking {
        let result = check_at(&policy, &bearer(&signer.sign(&claims)), NOW);
        assert_eq!(
            result.unwrap_err(),
            Rejection::ScopeMissing {
                scope: "chat".into()
            },
            "{claims}"
        );
    }
}

#[test]
fn an_invalid_token_is_401_before_any_scope_check() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) =
        es256_policy(dir.path(), |raw| raw.required_scope = Some("chat".into()));
    let expired = signer.sign(&json!({ "exp": NOW - 3600 }));
    assert_eq!(
        invalid(&policy, &bearer(&expired)),
        "token expired 3600 s ago"
    );
}

#[test]
fn forwarded_claims_replace_whatever_the_client_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |raw| {
        for (claim, header) in [
            ("sub", "X-User-Id"),
            ("admin", "X-Admin"),
            ("uid", "X-Uid"),
            ("roles", "X-Roles"),
            ("tenant", "X-Tenant"),
        ] {
            raw.forward_claims.insert(claim.into(), header.into());
        }
    });
    let token = signer.sign(
        &json!({ "exp": NOW + 60, "sub": "alice", "admin": false, "uid": 42, "roles": ["a", "b"] }),
    );
    let mut parts = request(
        "/ws",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-user-id", "root"),
            ("x-tenant", "evil"),
            ("x-keep", "1"),
        ],
    );
    policy.strip_spoofable(&mut parts.headers);
    assert!(parts.headers.get("x-user-id").is_none() && parts.headers.get("x-tenant").is_none());
    assert_eq!(parts.headers["x-keep"], "1");

    let grant = check_at(&policy, &parts, NOW).unwrap();
    parts
        .headers
        .insert("x-user-id", HeaderValue::from_static("added-later"));
    grant.apply(&mut parts);
    assert_eq!(
        parts
            .headers
            .get_all("x-user-id")
            .iter()
            .collect::<Vec<_>>(),
        ["alice"]
    );
    assert_eq!(parts.headers["x-admin"], "false");
    assert_eq!(parts.headers["x-uid"], "42");
    assert_eq!(parts.headers["x-roles"], r#"["a","b"]"#);
    assert!(
        parts.headers.get("x-tenant").is_none(),
        "absent claim, absent header"
    );

    let hostile = signer.sign(&json!({ "exp": NOW + 60, "sub": "alice\r\nX-Admin: true" }));
    assert_eq!(
        invalid(&policy, &bearer(&hostile)),
        "claim \"sub\" cannot be sent as header x-user-id"
    );
}

#[test]
fn strip_token_removes_only_the_token_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |raw| raw.strip_token = true);
    let token = signer.sign(&claims());
    let cases = [
        (
            format!("/ws?a=%2F+1&token={token}&b&token=again"),
            "/ws?a=%2F+1&b",
        ),
        (format!("/ws?token={token}"), "/ws"),
        (
            format!("http://chat.example/ws?token={token}&x=1"),
            "http://chat.example/ws?x=1",
        ),
    ];
    for (uri, expected) in cases {
        let mut parts = request(&uri, &[]);
        check_at(&policy, &parts, NOW).unwrap().apply(&mut parts);
        assert_eq!(parts.uri.to_string(), expected);
    }
    let mut from_header = request("/ws?a=1", &[("authorization", &format!("Bearer {token}"))]);
    check_at(&policy, &from_header, NOW)
        .unwrap()
        .apply(&mut from_header);
    assert_eq!(from_header.uri, "/ws?a=1");
}

fn write_jwks(dir: &Path, keys: Vec<Value>) {
    std::fs::write(dir.join("keys.json"), json!({ "keys": keys }).to_string()).unwrap();
}

fn ec_jwk(raw_point: &[u8], kid: &str) -> Value {
    json!({ "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&raw_point[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw_point[33..65]) })
}

fn ed_jwk(raw: &[u8], kid: &str) -> Value {
    json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "x": URL_SAFE_NO_PAD.encode(raw) })
}

#[test]
fn jwks_picks_the_key_by_kid() {
    let dir = tempfile::tempdir().unwrap();
    let (mut es, _, es_raw) = generate(Algorithm::ES256);
    let (mut ed, _, ed_raw) = generate(Algorithm::EdDSA);
    let (_, _, unused_raw) = generate(Algorithm::ES256);
    let mut encryption_key = ec_jwk(&unused_raw, "enc-1");
    encryption_key["use"] = json!("enc");
    write_jwks(
        dir.path(),
        vec![ec_jwk(&es_raw, "k1"), ed_jwk(&ed_raw, "k2"), encryption_key],
    );
    let policy = build_ok(
        &RawAuth {
            jwks_file: Some("keys.json".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );

    es.kid = Some("k1".into());
    ed.kid = Some("k2".into());
    assert!(check_at(&policy, &bearer(&es.sign(&claims())), NOW).is_ok());
    assert!(check_at(&policy, &bearer(&ed.sign(&claims())), NOW).is_ok());

    ed.kid = Some("k1".into());
    assert_eq!(
        invalid(&policy, &bearer(&ed.sign(&claims()))),
        "token algorithm \"EdDSA\" is not accepted (the key accepts ES256)"
    );
    es.kid = Some("k2".into());
    assert_eq!(
        invalid(&policy, &bearer(&es.sign(&claims()))),
        "token algorithm \"ES256\" is not accepted (the key accepts EdDSA)"
    );
    es.kid = Some("k9".into());
    assert_eq!(
        invalid(&policy, &bearer(&es.sign(&claims()))),
        "unknown key id \"k9\""
    );
    es.kid = Some("enc-1".into());
    assert_eq!(
        invalid(&policy, &bearer(&es.sign(&claims()))),
        "unknown key id \"enc-1\"",
        "encryption keys are skipped"
    );
    es.kid = None;
    assert_eq!(
        invalid(&policy, &bearer(&es.sign(&claims()))),
        "token has no key id (\"kid\") and the key set has several keys"
    );
}

#[test]
fn a_single_key_jwks_accepts_tokens_without_kid() {
    let dir = tempfile::tempdir().unwrap();
    let (es, _, es_raw) = generate(Algorithm::ES256);
    write_jwks(dir.path(), vec![ec_jwk(&es_raw, "only")]);
    let policy = build_ok(
        &RawAuth {
            jwks_file: Some("keys.json".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );
    assert!(check_at(&policy, &bearer(&es.sign(&claims())), NOW).is_ok());
}

/// `rcgen` cannot make RSA keys and no RSA crate is a dependency, so this
/// test uses the `openssl` tool when the machine has it.
fn openssl_rsa_key(dir: &Path) -> Option<(String, String)> {
    let private = dir.join("rsa.pem");
    let public = dir.join("rsa.pub.pem");
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success())
    };
    let made = run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str()?,
    ]) && run(&[
        "pkey",
        "-in",
        private.to_str()?,
        "-pubout",
        "-out",
        public.to_str()?,
    ]);
    if !made {
        eprintln!("skipping RSA coverage: the openssl tool is not available");
        return None;
    }
    Some((
        std::fs::read_to_string(private).ok()?,
        std::fs::read_to_string(public).ok()?,
    ))
}

#[test]
fn rsa_keys_accept_rs_and_ps_but_not_hs() {
    let dir = tempfile::tempdir().unwrap();
    let Some((private_pem, public_pem)) = openssl_rsa_key(dir.path()) else {
        return;
    };
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_algorithm = None;
    jwk.common.key_id = Some("rsa-1".into());
    std::fs::write(
        dir.path().join("keys.json"),
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let by_pem = build_ok(
        &RawAuth {
            jwt_public_key: Some("rsa.pub.pem".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );
    let by_jwks = build_ok(
        &RawAuth {
            jwks_file: Some("keys.json".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );
    for policy in [&by_pem, &by_jwks] {
        for alg in [Algorithm::RS256, Algorithm::PS256, Algorithm::RS512] {
            let signer = Signer {
                key: key.clone(),
                alg,
                kid: Some("rsa-1".into()),
            };
            assert!(
                check_at(policy, &bearer(&signer.sign(&claims())), NOW).is_ok(),
                "{alg:?}"
            );
        }
        let confused = Signer {
            key: EncodingKey::from_secret(public_pem.as_bytes()),
            alg: Algorithm::HS256,
            kid: Some("rsa-1".into()),
        };
        assert!(
            invalid(policy, &bearer(&confused.sign(&claims())))
                .starts_with("token algorithm \"HS256\" is not accepted")
        );
    }
}
