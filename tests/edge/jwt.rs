//! `[route.auth]` with JWTs, through a running proxy: every token location and
//! their precedence, every failure kind with its exact status, reason and
//! RFC 6750 challenge, claims forwarded as headers (never the client's own
//! copy), `strip_token`, and plain HTTP on an auth route.

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

on_both_paths!(
    jwt_in_query_cookie_or_bearer_header_upgrades_and_echoes,
    jwt_query_beats_cookie_beats_header,
    jwt_missing_token_is_401_token_missing_with_a_bare_bearer_challenge,
    jwt_every_invalid_token_is_401_token_invalid_and_never_echoed,
    jwt_public_keys_pin_the_algorithm_and_refuse_confusion,
    jwt_jwks_chooses_the_key_by_kid,
    jwt_without_the_required_scope_is_403_scope_missing,
    jwt_forward_claims_are_set_by_the_edge_and_client_copies_never_pass,
    jwt_strip_token_removes_only_the_token_parameter,
);

struct Setup {
    keys: Keys,
    backend: WsBackend,
    plain: HyperServer,
    proxy: TestProxy,
}

async fn setup() -> Setup {
    let keys = Keys::generate();
    let backend = spawn_ws_echo().await;
    let plain = spawn_plain_backend().await;
    let toml = format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{ws}"]
        [upstream.plain]
        servers = ["{plain}"]

        [[route]]
        path = "/hs"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        jwt_secret_file = "secret.txt"
        token_query = "token"
        token_cookie = "session"
        issuer = "{ISSUER}"
        audience = "{AUDIENCE}"
        leeway = "5s"
        required_scope = "chat"
        forward_claims = {{ sub = "X-User-Id" }}

        [[route]]
        path = "/es"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        jwt_public_key = "es256.pem"

        [[route]]
        path = "/ed"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        jwt_public_key = "ed25519.pem"

        [[route]]
        path = "/jwks"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        jwks_file = "jwks.json"
        forward_claims = {{ sub = "X-User-Id" }}

        [[route]]
        path = "/strip"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        jwt_secret_file = "secret.txt"
        token_query = "token"
        strip_token = true

        [[route]]
        path = "/plain"
        upstream = "plain"
        websocket = "allowed"
        [route.auth]
        jwt_secret_file = "secret.txt"
        token_query = "token"
        forward_claims = {{ sub = "X-User-Id" }}
        {warmup}
        "#,
        warmup = warmup_config().await,
        ws = backend.addr,
        plain = plain.addr,
    );
    let proxy = start_proxy_in(&toml, keys.path()).await;
    Setup {
        keys,
        backend,
        plain,
        proxy,
    }
}

/// Upgrades through the proxy with a real client, checks one echo, closes.
async fn upgrade_and_echo(via: UpgradePath, setup: &Setup, path: &str, headers: &[(&str, &str)]) {
    let (mut ws, response) = ws_connect_via(via, setup.proxy.addr(), path, headers)
        .await
        .unwrap_or_else(|error| panic!("{via}: upgrade of {path} failed: {error}"));
    assert_eq!(response.status(), 101, "{via}");
    within("the echo", async {
        ws.send(Message::Text("ping through the edge".into()))
            .await
            .unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::Text("ping through the edge".into()));
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A rejected token: 401 `token-invalid` with the RFC 6750 challenge, and the
/// body names neither the token nor its signature.
#[track_caller]
fn assert_token_invalid(label: &str, head: &Head, body: &str, token: &str, detail: &str) {
    assert_reject(head, body, 401, "token-invalid");
    assert_eq!(
        challenges(head),
        [r#"Bearer error="invalid_token""#],
        "{label}"
    );
    assert!(
        body.contains(detail),
        "{label}: body should say {detail:?}: {body:?}"
    );
    assert!(!body.contains(token), "{label}: body echoes the token");
    if let Some(signature) = token.rsplit('.').next().filter(|s| s.len() > 8) {
        assert!(
            !body.contains(signature),
            "{label}: body echoes the signature"
        );
    }
}

async fn jwt_in_query_cookie_or_bearer_header_upgrades_and_echoes(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let from_query = keys.hs(&good_claims("via-query"));
    let from_cookie = keys.hs(&good_claims("via-cookie"));
    let from_header = keys.hs(&good_claims("via-header"));

    upgrade_and_echo(via, &setup, &format!("/hs?token={from_query}"), &[]).await;
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.uri, format!("/hs?token={from_query}"));
    assert_eq!(seen.one("x-user-id").as_deref(), Some("via-query"));

    let cookie = format!("theme=dark; session={from_cookie}; lang=en");
    upgrade_and_echo(via, &setup, "/hs/room", &[("Cookie", &cookie)]).await;
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.uri, "/hs/room");
    assert_eq!(seen.one("x-user-id").as_deref(), Some("via-cookie"));
    assert_eq!(seen.one("cookie"), Some(cookie.clone()));

    let bearer = format!("Bearer {from_header}");
    upgrade_and_echo(via, &setup, "/hs", &[("Authorization", &bearer)]).await;
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("via-header"));
    assert_eq!(seen.one("authorization"), Some(bearer));

    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_query_beats_cookie_beats_header(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let good = |sub: &str| keys.hs(&good_claims(sub));
    let forged = sign_hs(Algorithm::HS256, b"not-the-secret", &good_claims("forged"));
    let addr = setup.proxy.addr();

    // All three good: the query's token is the one used.
    let cookie = format!("session={}", good("c"));
    let bearer = format!("Bearer {}", good("h"));
    let (head, _) = upgrade_via(
        via,
        addr,
        &format!("/hs?token={}", good("q")),
        &[("Cookie", &cookie), ("Authorization", &bearer)],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("q"));

    // No query token: the cookie beats the header.
    let (head, _) = upgrade_via(
        via,
        addr,
        "/hs?other=1",
        &[("Cookie", &cookie), ("Authorization", &bearer)],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("c"));

    // A bad token in a stronger place is not rescued by a good one behind it.
    let path = format!("/hs?token={forged}");
    let (head, body) = upgrade_via(via, addr, &path, &[("Authorization", &bearer)]).await;
    assert_token_invalid("bad query, good header", &head, &body, &forged, "signature");
    let (head, body) = upgrade_via(via, addr, &path, &[("Cookie", &cookie)]).await;
    assert_token_invalid("bad query, good cookie", &head, &body, &forged, "signature");
    let bad_cookie = format!("session={forged}");
    let (head, body) = upgrade_via(
        via,
        addr,
        "/hs",
        &[("Cookie", &bad_cookie), ("Authorization", &bearer)],
    )
    .await;
    assert_token_invalid(
        "bad cookie, good header",
        &head,
        &body,
        &forged,
        "signature",
    );

    // A good query token wins over a bad cookie.
    let (head, _) = upgrade_via(
        via,
        addr,
        &format!("/hs?token={}", good("q2")),
        &[("Cookie", &bad_cookie)],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("q2"));

    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_missing_token_is_401_token_missing_with_a_bare_bearer_challenge(via: UpgradePath) {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    let requests: [(&str, &[(&str, &str)]); 5] = [
        ("/hs", &[]),
        ("/hs?token=", &[("Cookie", "session=; theme=dark")]),
        ("/hs?tokens=abc", &[("Cookie", "sessionid=abc")]),
        ("/hs", &[("Authorization", "Basic dXNlcjpwYXNz")]),
        ("/jwks", &[("Authorization", "Bearer ")]),
    ];
    for (path, extra) in requests {
        let (head, body) = upgrade_via(via, addr, path, extra).await;
        assert_reject(&head, &body, 401, "token-missing");
        assert_eq!(challenges(&head), ["Bearer"], "{path} {extra:?}");
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_every_invalid_token_is_401_token_invalid_and_never_echoed(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    let now = now();
    let sub = "mallory";
    let cases: Vec<(&str, String, &str)> = vec![
        ("not a JWT at all", "garbage".to_owned(), "malformed"),
        (
            "three parts, none of them base64 JSON",
            "a.b.c".to_owned(),
            "malformed",
        ),
        (
            "bad signature",
            sign_hs(
                Algorithm::HS256,
                b"someone else's secret",
                &good_claims(sub),
            ),
            "signature is invalid",
        ),
        (
            "payload swapped after signing",
            {
                let genuine = keys.hs(&good_claims(sub));
                let other = keys.hs(&claims_with(sub, json!({ "sub": "admin" })));
                let parts: Vec<&str> = genuine.split('.').collect();
                let other_payload = other.split('.').nth(1).unwrap();
                format!("{}.{}.{}", parts[0], other_payload, parts[2])
            },
            "signature is invalid",
        ),
        (
            "expired",
            keys.hs(&claims_with(sub, json!({ "exp": now - 60 }))),
            "expired",
        ),
        (
            "not yet valid",
            keys.hs(&claims_with(sub, json!({ "nbf": now + 600 }))),
            "not valid before",
        ),
        (
            "no exp",
            keys.hs(&claims_with(sub, json!({ "exp": null }))),
            "no expiry",
        ),
        (
            "wrong issuer",
            keys.hs(&claims_with(sub, json!({ "iss": "https://evil.example" }))),
            "issuer",
        ),
        (
            "no issuer",
            keys.hs(&claims_with(sub, json!({ "iss": null }))),
            "issuer",
        ),
        (
            "wrong audience",
            keys.hs(&claims_with(sub, json!({ "aud": ["other", "api"] }))),
            "audience",
        ),
        (
            "alg none",
            unsigned_token(&good_claims(sub)),
            "algorithm \"none\"",
        ),
        (
            "an ES256 token on an HS route",
            keys.es(&good_claims(sub), None),
            "algorithm \"ES256\"",
        ),
    ];
    for (label, token, detail) in &cases {
        for (place, path, extra) in [
            ("query", format!("/hs?token={token}"), None),
            (
                "cookie",
                "/hs".to_owned(),
                Some(("Cookie", format!("session={token}"))),
            ),
            (
                "header",
                "/hs".to_owned(),
                Some(("Authorization", format!("Bearer {token}"))),
            ),
        ] {
            let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (head, body) = upgrade_via(via, addr, &path, &extra).await;
            assert_token_invalid(&format!("{label} ({place})"), &head, &body, token, detail);
        }
    }
    // Leeway: 3 s past `exp` is within the configured 5 s.
    let (head, _) = upgrade_via(
        via,
        addr,
        &format!(
            "/hs?token={}",
            keys.hs(&claims_with("late", json!({ "exp": now - 3 })))
        ),
        &[],
    )
    .await;
    assert_eq!(head.status, 101, "a token within the leeway is accepted");
    assert_eq!(
        setup
            .backend
            .next_request()
            .await
            .one("x-user-id")
            .as_deref(),
        Some("late")
    );
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_public_keys_pin_the_algorithm_and_refuse_confusion(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    let claims = good_claims("pk-user");

    let es = format!("Bearer {}", keys.es(&claims, None));
    upgrade_and_echo(via, &setup, "/es", &[("Authorization", &es)]).await;
    setup.backend.next_request().await;
    let ed = format!("Bearer {}", keys.ed(&claims, None));
    upgrade_and_echo(via, &setup, "/ed", &[("Authorization", &ed)]).await;
    setup.backend.next_request().await;

    let es_pem = std::fs::read(keys.path().join("es256.pem")).unwrap();
    let ed_pem = std::fs::read(keys.path().join("ed25519.pem")).unwrap();
    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "HS256 signed with the ES256 public key PEM as secret",
            "/es",
            sign_hs(Algorithm::HS256, &es_pem, &claims),
            "algorithm \"HS256\"",
        ),
        (
            "HS512 signed with the ES256 public key PEM as secret",
            "/es",
            sign_hs(Algorithm::HS512, &es_pem, &claims),
            "algorithm \"HS512\"",
        ),
        (
            "HS256 signed with the Ed25519 public key PEM as secret",
            "/ed",
            sign_hs(Algorithm::HS256, &ed_pem, &claims),
            "algorithm \"HS256\"",
        ),
        (
            "alg none on a public-key route",
            "/es",
            unsigned_token(&claims),
            "algorithm \"none\"",
        ),
        (
            "ES256 signed by a key nobody configured",
            "/es",
            sign_pem(Algorithm::ES256, &keys.es_stranger, &claims, None),
            "signature is invalid",
        ),
        (
            "an EdDSA token on the ES256 route",
            "/es",
            keys.ed(&claims, None),
            "algorithm \"EdDSA\"",
        ),
        (
            "an ES256 token on the Ed25519 route",
            "/ed",
            keys.es(&claims, None),
            "algorithm \"ES256\"",
        ),
        (
            "expired ES256",
            "/es",
            keys.es(
                &claims_with("pk-user", json!({ "exp": now() - 3600 })),
                None,
            ),
            "expired",
        ),
    ];
    for (label, path, token, detail) in &cases {
        let bearer = format!("Bearer {token}");
        let (head, body) = upgrade_via(via, addr, path, &[("Authorization", &bearer)]).await;
        assert_token_invalid(label, &head, &body, token, detail);
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_jwks_chooses_the_key_by_kid(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();

    let by_k1 = format!("Bearer {}", keys.es(&good_claims("k1-user"), Some("k1")));
    upgrade_and_echo(via, &setup, "/jwks", &[("Authorization", &by_k1)]).await;
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("k1-user"));
    let by_k2 = format!("Bearer {}", keys.ed(&good_claims("k2-user"), Some("k2")));
    upgrade_and_echo(via, &setup, "/jwks", &[("Authorization", &by_k2)]).await;
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.one("x-user-id").as_deref(), Some("k2-user"));

    let claims = good_claims("mallory");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown kid",
            keys.es(&claims, Some("k9")),
            "unknown key id \"k9\"",
        ),
        (
            "no kid while the set has two keys",
            keys.es(&claims, None),
            "no key id",
        ),
        (
            "kid of the P-256 key on an EdDSA token",
            keys.ed(&claims, Some("k1")),
            "algorithm \"EdDSA\"",
        ),
        (
            "kid k1 but signed by a stranger's P-256 key",
            sign_pem(Algorithm::ES256, &keys.es_stranger, &claims, Some("k1")),
            "signature is invalid",
        ),
        (
            "HS256 with kid k1, signed with the JWKS file as secret",
            {
                let jwks = std::fs::read(keys.path().join("jwks.json")).unwrap();
                let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
                header.kid = Some("k1".into());
                jsonwebtoken::encode(
                    &header,
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(&jwks),
                )
                .unwrap()
            },
            "algorithm \"HS256\"",
        ),
    ];
    for (label, token, detail) in &cases {
        let bearer = format!("Bearer {token}");
        let (head, body) = upgrade_via(via, addr, "/jwks", &[("Authorization", &bearer)]).await;
        assert_token_invalid(label, &head, &body, token, detail);
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_without_the_required_scope_is_403_scope_missing(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    for (label, changes) in [
        ("other scopes", json!({ "scope": "read write" })),
        (
            "a scope that only starts with it",
            json!({ "scope": "chatty" }),
        ),
        ("no scope at all", json!({ "scope": null })),
        (
            "scp array without it",
            json!({ "scope": null, "scp": ["read"] }),
        ),
    ] {
        let token = keys.hs(&claims_with("no-scope", changes));
        let (head, body) = upgrade_via(via, addr, &format!("/hs?token={token}"), &[]).await;
        assert_reject(&head, &body, 403, "scope-missing");
        assert_eq!(
            challenges(&head),
            [r#"Bearer error="insufficient_scope""#],
            "{label}"
        );
        assert!(!body.contains(&token), "{label}: body echoes the token");
    }
    for (label, changes) in [
        ("scope string", json!({ "scope": "chat" })),
        (
            "scp array",
            json!({ "scope": null, "scp": ["read", "chat"] }),
        ),
    ] {
        let token = keys.hs(&claims_with("scoped", changes));
        let (head, body) = upgrade_via(via, addr, &format!("/hs?token={token}"), &[]).await;
        assert_eq!(head.status, 101, "{label}: {body}");
        setup.backend.next_request().await;
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_forward_claims_are_set_by_the_edge_and_client_copies_never_pass(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    let token = keys.hs(&good_claims("user-42"));

    // Upgrade: the client's own X-User-Id (two copies, odd case) is replaced.
    let (head, _) = upgrade_via(
        via,
        addr,
        &format!("/hs?token={token}"),
        &[("X-User-Id", "admin"), ("x-USER-id", "root")],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.all("x-user-id"), ["user-42"]);

    // A token without the claim: the header is absent, not the client's.
    let anonymous = keys.hs(&claims_with("x", json!({ "sub": null })));
    let (head, _) = upgrade_via(
        via,
        addr,
        &format!("/hs?token={anonymous}"),
        &[("X-User-Id", "admin")],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.all("x-user-id"), Vec::<String>::new());

    // JWKS route, token in the header.
    let bearer = format!("Bearer {}", keys.ed(&good_claims("ed-user"), Some("k2")));
    let (head, _) = upgrade_via(
        via,
        addr,
        "/jwks",
        &[("X-User-Id", "admin"), ("Authorization", &bearer)],
    )
    .await;
    assert_eq!(head.status, 101);
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.all("x-user-id"), ["ed-user"]);

    // Plain HTTP on an auth route.
    let mut stream = connect(addr).await;
    let (head, body) = send_on(
        &mut stream,
        plain_request(
            "GET",
            &format!("/plain/me?token={token}"),
            &[("X-User-Id", "admin")],
        )
        .as_bytes(),
    )
    .await;
    assert_eq!((head.status, body.as_str()), (200, "plain ok"));
    let seen = setup.plain.next_request().await;
    assert_eq!(seen.all("x-user-id"), ["user-42"]);
    let (head, body) = send_on(
        &mut stream,
        plain_request(
            "POST",
            &format!("/plain/me?token={anonymous}"),
            &[("X-User-Id", "admin")],
        )
        .as_bytes(),
    )
    .await;
    assert_eq!((head.status, body.as_str()), (200, "plain ok"));
    let seen = setup.plain.next_request().await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.all("x-user-id"), Vec::<String>::new());

    drop(stream);
    setup.plain.assert_idle();
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn jwt_strip_token_removes_only_the_token_parameter(via: UpgradePath) {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    let token = keys.hs(&good_claims("s"));

    let cases = [
        (
            format!("/strip?a=1&token={token}&b=%2F+x&c"),
            "/strip?a=1&b=%2F+x&c",
        ),
        (format!("/strip/room?token={token}"), "/strip/room"),
        (
            format!("/strip?token={token}&tokens=keep"),
            "/strip?tokens=keep",
        ),
    ];
    for (path, expected) in &cases {
        let (head, _) = upgrade_via(via, addr, path, &[]).await;
        assert_eq!(head.status, 101, "{path}");
        let seen = setup.backend.next_request().await;
        assert_eq!(seen.uri, *expected);
        assert!(!seen.uri.contains(&token));
    }
    // A token from the header leaves the query alone.
    let bearer = format!("Bearer {token}");
    let (head, _) = upgrade_via(
        via,
        addr,
        "/strip?a=1&token=",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(head.status, 101);
    assert_eq!(setup.backend.next_request().await.uri, "/strip?a=1&token=");

    // Without strip_token the query reaches the backend unchanged (see the
    // location test); a route with it but a bad token never reaches it.
    let (head, body) = upgrade_via(via, addr, "/strip?a=1&token=bad", &[]).await;
    assert_reject(&head, &body, 401, "token-invalid");
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

#[tokio::test]
async fn jwt_plain_http_on_an_auth_route_is_checked_too() {
    let mut setup = setup().await;
    let keys = &setup.keys;
    let addr = setup.proxy.addr();
    let mut stream = connect(addr).await;

    let (head, body) = send_on(
        &mut stream,
        plain_request("GET", "/plain/data", &[]).as_bytes(),
    )
    .await;
    assert_reject(&head, &body, 401, "token-missing");
    assert_eq!(challenges(&head), ["Bearer"]);

    let expired = keys.hs(&claims_with("p", json!({ "exp": now() - 600 })));
    let bearer = format!("Bearer {expired}");
    let (head, body) = send_on(
        &mut stream,
        plain_request("GET", "/plain/data", &[("Authorization", &bearer)]).as_bytes(),
    )
    .await;
    assert_token_invalid("expired, plain HTTP", &head, &body, &expired, "expired");
    setup.plain.assert_idle();

    let token = keys.hs(&good_claims("plain-user"));
    let bearer = format!("Bearer {token}");
    let (head, body) = send_on(
        &mut stream,
        plain_request("GET", "/plain/data?x=1", &[("Authorization", &bearer)]).as_bytes(),
    )
    .await;
    assert_eq!((head.status, body.as_str()), (200, "plain ok"));
    assert_eq!(head.get("x-backend"), Some("plain"));
    let seen = setup.plain.next_request().await;
    assert_eq!(seen.uri, "/plain/data?x=1");
    assert_eq!(seen.one("authorization"), Some(bearer));
    assert_eq!(seen.all("x-user-id"), ["plain-user"]);

    let (head, body) = send_on(
        &mut stream,
        plain_request("POST", &format!("/plain/data?token={token}"), &[]).as_bytes(),
    )
    .await;
    assert_eq!((head.status, body.as_str()), (200, "plain ok"));
    assert_eq!(setup.plain.next_request().await.method, "POST");

    drop(stream);
    setup.plain.assert_idle();
    setup.proxy.stop().await;
}
