//! The contract's check order through a running proxy — route, client IP,
//! request shape, origin, token, scope, subprotocol — so a request that fails
//! several checks is refused by the first, and `wsgate_rejections_total`
//! counts each reason.

use serde_json::json;

use crate::support::*;

const GOOD_ORIGIN: (&str, &str) = ("Origin", "https://app.edge.test");
const EVIL_ORIGIN: (&str, &str) = ("Origin", "https://evil.example");
const GOOD_PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", "chat.v1");
const BAD_PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", "chat.v9");

/// A raw upgrade with a chosen key and version, for the shape checks.
fn odd_upgrade(path: &str, key: &str, version: &str, extra: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: edge.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n"
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

#[tokio::test]
async fn check_order_is_ip_shape_origin_token_scope_subprotocol() {
    let keys = Keys::generate();
    let mut backend = spawn_ws_echo().await;
    let policy = r#"
        origins = ["https://app.edge.test"]
        subprotocols = ["chat.v1"]
        [route.auth]
        jwt_secret_file = "secret.txt"
        required_scope = "chat"
    "#;
    let toml = format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{backend}"]

        [[route]]
        path = "/order"
        upstream = "echo"
        {policy}

        [[route]]
        path = "/order-ip"
        upstream = "echo"
        allow_ips = ["10.0.0.0/8"]
        {policy}

        [[route]]
        path = "/order-ws"
        upstream = "echo"
        websocket = "required"
        {policy}
        "#,
        backend = backend.addr
    );
    let proxy = start_proxy_in(&toml, keys.path()).await;
    let addr = proxy.addr();
    let valid = format!("Bearer {}", keys.hs(&good_claims("ordered")));
    let valid = ("Authorization", valid.as_str());
    let unscoped = format!(
        "Bearer {}",
        keys.hs(&claims_with("ordered", json!({ "scope": "read" })))
    );
    let unscoped = ("Authorization", unscoped.as_str());
    let invalid = ("Authorization", "Bearer not.a.token");
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    // (request, status, reason)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "forbidden IP, everything else right",
            upgrade_request(
                "/order-ip",
                "edge.test",
                &[GOOD_ORIGIN, valid, GOOD_PROTOCOL],
            ),
            403,
            "ip-forbidden",
        ),
        (
            "forbidden IP, everything else wrong",
            odd_upgrade("/order-ip", "short", "8", &[EVIL_ORIGIN, BAD_PROTOCOL]),
            403,
            "ip-forbidden",
        ),
        (
            "forbidden IP, plain request on a websocket-only route",
            plain_request("GET", "/order-ip", &[]),
            403,
            "ip-forbidden",
        ),
        (
            "plain request on a websocket-only route, no token",
            plain_request("GET", "/order-ws", &[]),
            426,
            "upgrade-required",
        ),
        (
            "bad version, forbidden origin, no token",
            odd_upgrade("/order", KEY, "8", &[EVIL_ORIGIN, BAD_PROTOCOL]),
            426,
            "bad-version",
        ),
        (
            "bad key, forbidden origin, no token",
            odd_upgrade("/order", "short", "13", &[EVIL_ORIGIN]),
            400,
            "bad-handshake",
        ),
        (
            "forbidden origin, no token",
            upgrade_request("/order", "edge.test", &[EVIL_ORIGIN, BAD_PROTOCOL]),
            403,
            "origin-forbidden",
        ),
        (
            "forbidden origin, valid token",
            upgrade_request("/order", "edge.test", &[EVIL_ORIGIN, valid, GOOD_PROTOCOL]),
            403,
            "origin-forbidden",
        ),
        (
            "no origin, invalid token",
            upgrade_request("/order", "edge.test", &[invalid, BAD_PROTOCOL]),
            403,
            "origin-missing",
        ),
        (
            "valid origin, no token, bad subprotocol",
            upgrade_request("/order", "edge.test", &[GOOD_ORIGIN, BAD_PROTOCOL]),
            401,
            "token-missing",
        ),
        (
            "valid origin, invalid token, bad subprotocol",
            upgrade_request("/order", "edge.test", &[GOOD_ORIGIN, invalid, BAD_PROTOCOL]),
            401,
            "token-invalid",
        ),
        (
            "valid origin, token without the scope, bad subprotocol",
            upgrade_request(
                "/order",
                "edge.test",
                &[GOOD_ORIGIN, unscoped, BAD_PROTOCOL],
            ),
            403,
            "scope-missing",
        ),
        (
            "valid origin, good token, bad subprotocol",
            upgrade_request("/order", "edge.test", &[GOOD_ORIGIN, valid, BAD_PROTOCOL]),
            400,
            "subprotocol-forbidden",
        ),
        (
            "valid origin, good token, no subprotocol",
            upgrade_request("/order", "edge.test", &[GOOD_ORIGIN, valid]),
            400,
            "subprotocol-forbidden",
        ),
    ];
    for (label, request, status, reason) in &cases {
        let (head, body, _) = send(addr, request).await;
        assert_eq!(
            (head.status, head.get("wsgate-reason")),
            (*status, Some(*reason)),
            "{label}: {body}"
        );
        assert_reject(&head, &body, *status, reason);
        let expected_challenge: Vec<String> = match *reason {
            "token-missing" => vec!["Bearer".into()],
            "token-invalid" => vec![r#"Bearer error="invalid_token""#.into()],
            "scope-missing" => vec![r#"Bearer error="insufficient_scope""#.into()],
            _ => vec![],
        };
        assert_eq!(challenges(&head), expected_challenge, "{label}");
        if *reason == "bad-version" {
            assert_eq!(head.get("sec-websocket-version"), Some("13"));
        }
    }

    // Everything right: through.
    let (head, body) = upgrade(addr, "/order", &[GOOD_ORIGIN, valid, GOOD_PROTOCOL]).await;
    assert_eq!(head.status, 101, "{body}");
    let seen = backend.next_request().await;
    assert_eq!(seen.all("sec-websocket-protocol"), ["chat.v1"]);
    assert_backend_idle(&mut backend);

    let (status, metrics) = admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let count = |route: &str, reason: &str| {
        metric(
            &metrics,
            "wsgate_rejections_total",
            &[("route", route), ("reason", reason)],
        )
    };
    assert_eq!(count("/order-ip", "ip-forbidden"), Some(3.0));
    assert_eq!(count("/order-ws", "upgrade-required"), Some(1.0));
    for (reason, expected) in [
        ("bad-version", 1.0),
        ("bad-handshake", 1.0),
        ("origin-forbidden", 2.0),
        ("origin-missing", 1.0),
        ("token-missing", 1.0),
        ("token-invalid", 1.0),
        ("scope-missing", 1.0),
        ("subprotocol-forbidden", 2.0),
    ] {
        assert_eq!(count("/order", reason), Some(expected), "{reason}");
    }
    assert_eq!(count("/order", "ip-forbidden"), None);
    let handshakes = |route: &str, outcome: &str| {
        metric(
            &metrics,
            "wsgate_handshakes_total",
            &[("route", route), ("outcome", outcome)],
        )
    };
    assert_eq!(handshakes("/order", "rejected"), Some(10.0));
    assert_eq!(handshakes("/order", "upgraded"), Some(1.0));
    assert_eq!(handshakes("/order-ip", "rejected"), Some(2.0));
    proxy.stop().await;
}
