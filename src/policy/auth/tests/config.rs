//! `[route.auth]` validation: every problem is reported, each with its key path.

use super::*;

const KEY: &str = "route[3].auth";

fn problems(raw: &RawAuth, dir: &Path) -> Vec<(String, String)> {
    build(raw, dir, KEY).expect_err("the config should be refused")
}

/// Asserts exactly one problem, at `field`, whose message contains `words`.
fn only_problem(raw: &RawAuth, dir: &Path, field: &str, words: &str) {
    let found = problems(raw, dir);
    let key = if field.is_empty() {
        KEY.to_owned()
    } else {
        format!("{KEY}.{field}")
    };
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, key, "{found:?}");
    assert!(
        found[0].1.contains(words),
        "{:?} lacks {words:?}",
        found[0].1
    );
}

fn with_secret_env(tweak: impl FnOnce(&mut RawAuth)) -> RawAuth {
    let mut raw = RawAuth {
        jwt_secret_env: Some("PATH".into()),
        ..RawAuth::default()
    };
    tweak(&mut raw);
    raw
}

fn with_forward(tweak: impl FnOnce(&mut RawAuth)) -> RawAuth {
    let mut raw = RawAuth {
        forward: Some("http://127.0.0.1:9100/check".into()),
        ..RawAuth::default()
    };
    tweak(&mut raw);
    raw
}

#[test]
fn exactly_one_key_source_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    only_problem(&RawAuth::default(), dir.path(), "", "set one key source");
    let two = with_secret_env(|raw| raw.jwks_file = Some("keys.json".into()));
    only_problem(
        &two,
        dir.path(),
        "jwks_file",
        "cannot be combined with jwt_secret_env",
    );
    let forward_and_key = with_forward(|raw| raw.jwt_public_key = Some("k.pem".into()));
    only_problem(
        &forward_and_key,
        dir.path(),
        "jwt_public_key",
        "cannot be combined with `forward`",
    );
}

#[test]
fn secret_sources_must_yield_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let unset = RawAuth {
        jwt_secret_env: Some("WSGATE_TEST_UNSET_6B1E0F".into()),
        ..RawAuth::default()
    };
    only_problem(
        &unset,
        dir.path(),
        "jwt_secret_env",
        "environment variable \"WSGATE_TEST_UNSET_6B1E0F\" is not set or empty",
    );
    let missing = RawAuth {
        jwt_secret_file: Some("nope".into()),
        ..RawAuth::default()
    };
    only_problem(&missing, dir.path(), "jwt_secret_file", "cannot read");
    std::fs::write(dir.path().join("blank"), "\n").unwrap();
    let blank = RawAuth {
        jwt_secret_file: Some("blank".into()),
        ..RawAuth::default()
    };
    only_problem(&blank, dir.path(), "jwt_secret_file", "is empty");
}

#[test]
fn public_keys_must_be_usable_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(dir.path().join("private.pem"), pair.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("junk.pem"),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let cases = [
        ("missing.pem", "cannot read"),
        ("private.pem", "holds a private key"),
        ("junk.pem", "is not a PEM public key"),
    ];
    for (file, words) in cases {
        let raw = RawAuth {
            jwt_public_key: Some(file.into()),
            ..RawAuth::default()
        };
        only_problem(&raw, dir.path(), "jwt_public_key", words);
    }
}

#[test]
fn key_sets_must_parse_and_every_key_must_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, point) = generate(Algorithm::ES256);
    let ec = |kid: &str| {
        serde_json::json!({ "kty": "EC", "crv": "P-256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]) })
    };
    let mut wrong_alg = ec("b");
    wrong_alg["alg"] = serde_json::json!("HS256");
    let cases = [
        ("not json".to_owned(), "is not a JSON Web Key Set"),
        (r#"{"keys": []}"#.to_owned(), "holds no signature key"),
        (
            serde_json::json!({ "keys": [ec("a"), ec("a")] }).to_string(),
            "key \"a\" appears twice",
        ),
        (
            serde_json::json!({ "keys": [ec("a"), wrong_alg] }).to_string(),
            "key \"b\": \"alg\": \"HS256\" does not fit",
        ),
        (
            r#"{"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}"#.to_owned(),
            "keys[0]: only the P-256 and P-384",
        ),
    ];
    for (text, words) in cases {
        std::fs::write(dir.path().join("keys.json"), &text).unwrap();
        let raw = RawAuth {
            jwks_file: Some("keys.json".into()),
            ..RawAuth::default()
        };
        only_problem(&raw, dir.path(), "jwks_file", words);
    }
}

#[test]
fn jwt_fields_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    only_problem(
        &with_secret_env(|raw| raw.leeway = Some("soon".into())),
        dir.path(),
        "leeway",
        "is not a duration",
    );
    only_problem(
        &with_secret_env(|raw| raw.token_query = Some(" ".into())),
        dir.path(),
        "token_query",
        "must not be empty",
    );
    only_problem(
        &with_secret_env(|raw| raw.token_cookie = Some(String::new())),
        dir.path(),
        "token_cookie",
        "must not be empty",
    );
    only_problem(
        &with_secret_env(|raw| raw.strip_token = true),
        dir.path(),
        "strip_token",
        "only applies with `token_query`",
    );
    for managed in [
        "Authorization",
        "X-Real-IP",
        "x-forwarded-for",
        "Forwarded",
        "Sec-WebSocket-Key",
    ] {
        let reserved = with_secret_env(|raw| {
            raw.forward_claims.insert("sub".into(), managed.into());
        });
        only_problem(
            &reserved,
            dir.path(),
            "forward_claims.sub",
            "a header the proxy manages",
        );
    }
    let nonsense = with_secret_env(|raw| {
        raw.forward_claims.insert("name".into(), "X User".into());
    });
    only_problem(
        &nonsense,
        dir.path(),
        "forward_claims.name",
        "is not a header name",
    );
    only_problem(
        &with_secret_env(|raw| raw.forward_timeout = Some("1s".into())),
        dir.path(),
        "forward_timeout",
        "only applies with `forward`",
    );
    let zero_leeway = with_secret_env(|raw| raw.leeway = Some("0s".into()));
    assert!(build(&zero_leeway, dir.path(), KEY).is_ok());
}

#[test]
fn forward_fields_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    only_problem(
        &with_forward(|raw| raw.forward = Some("https://auth/check".into())),
        dir.path(),
        "forward",
        "https is not supported",
    );
    only_problem(
        &with_forward(|raw| raw.forward = Some("/check".into())),
        dir.path(),
        "forward",
        "is not an http:// URL",
    );
    only_problem(
        &with_forward(|raw| raw.forward_timeout = Some("0s".into())),
        dir.path(),
        "forward_timeout",
        "longer than zero",
    );
    let headers =
        with_forward(|raw| raw.forward_response_headers = vec!["X-User".into(), "Host".into()]);
    only_problem(
        &headers,
        dir.path(),
        "forward_response_headers[1]",
        "a header the proxy manages",
    );
    only_problem(
        &with_forward(|raw| raw.token_query = Some("t".into())),
        dir.path(),
        "token_query",
        "only applies to JWT checks",
    );
    assert!(
        build(
            &with_forward(|raw| raw.forward_response_headers = vec!["X-User".into()]),
            dir.path(),
            KEY
        )
        .is_ok()
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawAuth {
        jwt_secret_env: Some("WSGATE_TEST_UNSET_6B1E0F".into()),
        leeway: Some("later".into()),
        strip_token: true,
        forward_response_headers: vec!["X-User".into()],
        ..RawAuth::default()
    };
    let keys: Vec<String> = problems(&raw, dir.path())
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        keys,
        [
            "route[3].auth.forward_response_headers",
            "route[3].auth.jwt_secret_env",
            "route[3].auth.leeway",
            "route[3].auth.strip_token"
        ]
    );
}
