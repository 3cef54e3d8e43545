//! Finding and verifying the token: every location and every failure kind.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::*;

#[test]
fn policy_and_grant_are_shareable() {
    fn assert_traits<T: Send + Sync + std::fmt::Debug>() {}
    assert_traits::<AuthPolicy>();
    assert_traits::<AuthGrant>();
}

#[test]
fn es256_token_is_accepted_from_every_location() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    let token = signer.sign(&claims());
    let places = [
        request(&format!("/ws?a=1&token={token}"), &[]),
        request(
            "/ws",
            &[("cookie", &format!("theme=dark; session={token}"))],
        ),
        bearer(&token),
    ];
    for parts in &places {
        assert!(check_at(&policy, parts, NOW).is_ok(), "{:?}", parts.uri);
    }
}

#[test]
fn query_beats_cookie_beats_header() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    let good = signer.sign(&claims());
    let bad = "x.y.z";
    let query_good = request(
        &format!("/ws?token={good}"),
        &[("cookie", &format!("session={bad}"))],
    );
    assert!(check_at(&policy, &query_good, NOW).is_ok());
    let query_bad = request(
        &format!("/ws?token={bad}"),
        &[("authorization", &format!("Bearer {good}"))],
    );
    assert!(invalid(&policy, &query_bad).contains("malformed"));
    let cookie_bad = request(
        "/ws",
        &[
            ("cookie", &format!("session={bad}")),
            ("authorization", &format!("Bearer {good}")),
        ],
    );
    assert!(invalid(&policy, &cookie_bad).contains("malformed"));
}

#[test]
fn missing_token_names_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _, _) = es256_policy(dir.path(), |_| {});
    let result = check_at(
        &policy,
        &request("/ws?tok=1", &[("authorization", "Basic dTpw")]),
        NOW,
    );
    assert_eq!(
        result.unwrap_err(),
        Rejection::TokenMissing {
            looked_in: "query parameter \"token\", cookie \"session\", Authorization header".into()
        }
    );
}

#[test]
fn malformed_tokens_are_invalid_without_echoing_them() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    let good = signer.sign(&claims());
    let (_, payload_and_signature) = good.split_once('.').unwrap();
    let cases = [
        ("only.two", "three base64url parts"),
        ("a.b.c.d.e", "three base64url parts"),
        (
            &format!("!!!.{payload_and_signature}") as &str,
            "header is not base64url",
        ),
        (
            &format!("{}.{payload_and_signature}", URL_SAFE_NO_PAD.encode("[1]")),
            "header is not a JSON object",
        ),
        (
            &format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT"}"#)),
            "header has no \"alg\"",
        ),
    ];
    for (token, expected) in cases {
        let detail = invalid(&policy, &bearer(token));
        assert!(detail.contains(expected), "{token}: {detail}");
        assert!(
            !detail.contains(token),
            "the detail echoes the token: {detail}"
        );
    }
}

#[test]
fn bad_signature_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _, _) = es256_policy(dir.path(), |_| {});
    let (stranger, _, _) = generate(Algorithm::ES256);
    assert_eq!(
        invalid(&policy, &bearer(&stranger.sign(&claims()))),
        "token signature is invalid"
    );
}

#[test]
fn expiry_honours_the_leeway() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    let expired_long_ago = signer.sign(&json!({ "exp": NOW - 42 }));
    assert_eq!(
        invalid(&policy, &bearer(&expired_long_ago)),
        "token expired 42 s ago"
    );
    let just_expired = signer.sign(&json!({ "exp": NOW - 20 }));
    assert!(
        check_at(&policy, &bearer(&just_expired), NOW).is_ok(),
        "within the default 30 s leeway"
    );

    let (strict, signer, _) = es256_policy(dir.path(), |raw| raw.leeway = Some("0s".into()));
    let just_expired = signer.sign(&json!({ "exp": NOW - 1 }));
    assert_eq!(
        invalid(&strict, &bearer(&just_expired)),
        "token expired 1 s ago"
    );
    let fractional = signer.sign(&json!({ "exp": (NOW + 5) as f64 + 0.5 }));
    assert!(check_at(&strict, &bearer(&fractional), NOW).is_ok());
}

#[test]
fn tokens_without_a_numeric_expiry_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    assert_eq!(
        invalid(&policy, &bearer(&signer.sign(&json!({ "sub": "a" })))),
        "token has no expiry (\"exp\" claim)"
    );
    let text_exp = signer.sign(&json!({ "exp": "tomorrow" }));
    assert_eq!(
        invalid(&policy, &bearer(&text_exp)),
        "token claim \"exp\" is not a number of seconds"
    );
}

#[test]
fn not_before_honours_the_leeway() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |_| {});
    let early = signer.sign(&json!({ "exp": NOW + 600, "nbf": NOW + 100 }));
    let detail = invalid(&policy, &bearer(&early));
    assert_eq!(
        detail,
        "token is not valid before 2025-06-15T15:08:20Z (in 100 s)"
    );
    let nearly = signer.sign(&json!({ "exp": NOW + 600, "nbf": NOW + 10 }));
    assert!(check_at(&policy, &bearer(&nearly), NOW).is_ok());
}

#[test]
fn issuer_and_audience_are_enforced_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, signer, _) = es256_policy(dir.path(), |raw| {
        raw.issuer = Some("https://id.example".into());
        raw.audience = Some("chat".into());
    });
    let sign = |extra: Value| {
        let mut claims = claims();
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        signer.sign(&claims)
    };
    let good = sign(json!({ "iss": "https://id.example", "aud": ["mail", "chat"] }));
    assert!(check_at(&policy, &bearer(&good), NOW).is_ok());
    let cases = [
        (
            json!({ "iss": "https://evil.example", "aud": "chat" }),
            "token issuer \"https://evil.example\" is not \"https://id.example\"",
        ),
        (
            json!({ "aud": "chat" }),
            "token has no issuer (\"iss\"); expected \"https://id.example\"",
        ),
        (
            json!({ "iss": "https://id.example", "aud": "mail" }),
            "token audience \"mail\" does not include \"chat\"",
        ),
        (
            json!({ "iss": "https://id.example", "aud": ["a", "b"] }),
            "token audience [\"a\",\"b\"] does not include \"chat\"",
        ),
        (
            json!({ "iss": "https://id.example" }),
            "token has no audience (\"aud\"); expected \"chat\"",
        ),
    ];
    for (extra, expected) in cases {
        assert_eq!(invalid(&policy, &bearer(&sign(extra))), expected);
    }
    let (open, signer, _) = es256_policy(dir.path(), |_| {});
    let any_aud = signer.sign(&json!({ "exp": NOW + 60, "aud": "elsewhere", "iss": "anyone" }));
    assert!(
        check_at(&open, &bearer(&any_aud), NOW).is_ok(),
        "unchecked unless configured"
    );
}

#[test]
fn alg_none_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _, _) = es256_policy(dir.path(), |_| {});
    for alg in ["none", "None", "NONE"] {
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
        let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
        let detail = invalid(&policy, &bearer(&format!("{header}.{payload}.")));
        assert_eq!(
            detail,
            format!("token algorithm \"{alg}\" is not accepted (the key accepts ES256)")
        );
    }
}

#[test]
fn hs256_signed_with_the_public_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, _, public_pem) = es256_policy(dir.path(), |_| {});
    let confused = Signer {
        key: EncodingKey::from_secret(public_pem.as_bytes()),
        alg: Algorithm::HS256,
        kid: None,
    };
    let detail = invalid(&policy, &bearer(&confused.sign(&claims())));
    assert_eq!(
        detail,
        "token algorithm \"HS256\" is not accepted (the key accepts ES256)"
    );
}

#[test]
fn eddsa_public_key_is_pinned_to_eddsa() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, public_pem, _) = generate(Algorithm::EdDSA);
    std::fs::write(dir.path().join("ed.pem"), public_pem).unwrap();
    let raw = RawAuth {
        jwt_public_key: Some("ed.pem".into()),
        ..RawAuth::default()
    };
    let policy = build_ok(&raw, dir.path());
    assert!(check_at(&policy, &bearer(&signer.sign(&claims())), NOW).is_ok());
    let (es, _, _) = generate(Algorithm::ES256);
    let detail = invalid(&policy, &bearer(&es.sign(&claims())));
    assert_eq!(
        detail,
        "token algorithm \"ES256\" is not accepted (the key accepts EdDSA)"
    );
}

#[test]
fn hs_secret_from_env_and_from_file() {
    let dir = tempfile::tempdir().unwrap();
    // PATH is always set; setting a variable would need `unsafe` in edition 2024.
    let path_value = std::env::var_os("PATH").unwrap();
    let from_env = build_ok(
        &RawAuth {
            jwt_secret_env: Some("PATH".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );
    std::fs::write(
        dir.path().join("secret"),
        "s3cret-value-for-tests-only-0123456789\r\n",
    )
    .unwrap();
    let from_file = build_ok(
        &RawAuth {
            jwt_secret_file: Some("secret".into()),
            ..RawAuth::default()
        },
        dir.path(),
    );
    let secrets: [(&AuthPolicy, &[u8]); 2] = [
        (&from_env, path_value.as_encoded_bytes()),
        (&from_file, b"s3cret-value-for-tests-only-0123456789"),
    ];
    for (policy, secret) in secrets {
        let debug = format!("{policy:?}");
        assert!(
            !debug.contains(&*String::from_utf8_lossy(secret)),
            "Debug shows the secret: {debug}"
        );
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let signer = Signer {
                key: EncodingKey::from_secret(secret),
                alg,
                kid: None,
            };
            assert!(
                check_at(policy, &bearer(&signer.sign(&claims())), NOW).is_ok(),
                "{alg:?}"
            );
        }
        let wrong = Signer {
            key: EncodingKey::from_secret(b"wrong"),
            alg: Algorithm::HS256,
            kid: None,
        };
        assert_eq!(
            invalid(policy, &bearer(&wrong.sign(&claims()))),
            "token signature is invalid"
        );
        let (es, _, _) = generate(Algorithm::ES256);
        assert!(invalid(policy, &bearer(&es.sign(&claims()))).contains("HS256, HS384, HS512"));
    }
}
