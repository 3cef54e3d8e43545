//! The contract's check order through a running proxy — route, client IP,
//! request shape, origin, token, scope, subprotocol — so a request that fails
//! several checks is refused by the first, and `wsgate_rejections_total`
//! counts each reason.

use serde_json::json;
use tokio::io::AsyncWriteExt;

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

/// Three routes with the same policy (origin, JWT with a scope,
/// subprotocol): `/order`, `/order-ip` (allowing only 10.0.0.0/8) and
/// `/order-ws` (`websocket = "required"`); plus the warm-up route.
async fn start(keys: &Keys, backend: &WsBackend) -> TestProxy {
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
        {warmup}
        "#,
        backend = backend.addr,
        warmup = warmup_config().await,
    );
    start_proxy_in(&toml, keys.path()).await
}

on_both_paths!(check_order_is_ip_shape_origin_token_scope_subprotocol);

async fn check_order_is_ip_shape_origin_token_scope_subprotocol(path: UpgradePath) {
    let keys = Keys::generate();
    let mut backend = spawn_ws_echo().await;
    let proxy = start(&keys, &backend).await;
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
        let (head, body, _) = send_via(path, addr, request).await;
        assert_eq!(
            (head.status, head.get("wsgate-reason")),
            (*status, Some(*reason)),
            "{path}, {label}: {body}"
        );
        assert_reject(&head, &body, *status, reason);
        let expected_challenge: Vec<String> = match *reason {
            "token-missing" => vec!["Bearer".into()],
            "token-invalid" => vec![r#"Bearer error="invalid_token""#.into()],
            "scope-missing" => vec![r#"Bearer error="insufficient_scope""#.into()],
            _ => vec![],
        };
        assert_eq!(challenges(&head), expected_challenge, "{path}, {label}");
        if *reason == "bad-version" {
            assert_eq!(head.get("sec-websocket-version"), Some("13"), "{path}");
        }
    }

    // Everything right: through.
    let (head, body) =
        upgrade_via(path, addr, "/order", &[GOOD_ORIGIN, valid, GOOD_PROTOCOL]).await;
    assert_eq!(head.status, 101, "{path}: {body}");
    let seen = backend.next_request().await;
    assert_eq!(seen.all("sec-websocket-protocol"), ["chat.v1"], "{path}");
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
    assert_eq!(count("/order-ip", "ip-forbidden"), Some(3.0), "{path}");
    assert_eq!(count("/order-ws", "upgrade-required"), Some(1.0), "{path}");
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
        assert_eq!(count("/order", reason), Some(expected), "{path}, {reason}");
    }
    assert_eq!(count("/order", "ip-forbidden"), None, "{path}");
    let handshakes = |route: &str, outcome: &str| {
        metric(
            &metrics,
            "wsgate_handshakes_total",
            &[("route", route), ("outcome", outcome)],
        )
    };
    assert_eq!(handshakes("/order", "rejected"), Some(10.0), "{path}");
    assert_eq!(handshakes("/order", "upgraded"), Some(1.0), "{path}");
    assert_eq!(handshakes("/order-ip", "rejected"), Some(2.0), "{path}");
    proxy.stop().await;
}

/// The hyper path after a plain request that the tested route itself
/// refuses — 426 on a websocket-only route, 401 without a token, 403 for the
/// client address: the refusal (read in full) leaves the keep-alive
/// connection open, and the upgrade sent on it next is judged on its own,
/// then tunnelled.
#[tokio::test]
async fn upgrade_after_a_plain_request_refused_on_the_same_route() {
    let keys = Keys::generate();
    let mut backend = spawn_ws_echo().await;
    let proxy = start(&keys, &backend).await;
    let addr = proxy.addr();
    let valid = format!("Bearer {}", keys.hs(&good_claims("ordered")));
    let good: &[(&str, &str)] = &[GOOD_ORIGIN, ("Authorization", &valid), GOOD_PROTOCOL];

    // (plain request's route, its status and reason, the upgrade's route,
    // its refusal or None for a 101)
    type Case<'a> = (&'a str, u16, &'a str, &'a str, Option<(u16, &'a str)>);
    let cases: [Case; 4] = [
        ("/order-ws", 426, "upgrade-required", "/order-ws", None),
        ("/order", 401, "token-missing", "/order", None),
        ("/order-ip", 403, "ip-forbidden", "/order", None),
        (
            "/order-ip",
            403,
            "ip-forbidden",
            "/order-ip",
            Some((403, "ip-forbidden")),
        ),
    ];
    for (plain_route, plain_status, plain_reason, upgrade_route, refusal) in cases {
        let label = format!("plain {plain_route}, then an upgrade of {upgrade_route}");
        let mut stream = connect(addr).await;
        let (head, body) = send_on(
            &mut stream,
            plain_request("GET", &format!("{plain_route}/page"), &[]).as_bytes(),
        )
        .await;
        assert_reject(&head, &body, plain_status, plain_reason);
        assert!(
            !head
                .get("connection")
                .is_some_and(|value| value.eq_ignore_ascii_case("close")),
            "{label}: the plain refusal closes the connection: {:?}",
            head.headers
        );
        let (head, body) = send_on(
            &mut stream,
            upgrade_request(upgrade_route, "edge.test", good).as_bytes(),
        )
        .await;
        match refusal {
            Some((status, reason)) => {
                assert_reject(&head, &body, status, reason);
                assert_backend_idle(&mut backend);
            }
            None => {
                assert_eq!(head.status, 101, "{label}: {:?} {body}", head.headers);
                assert_eq!(
                    header_values(&head, "sec-websocket-protocol"),
                    ["chat.v1"],
                    "{label}"
                );
                let seen = backend.next_request().await;
                assert_eq!(seen.uri, upgrade_route, "{label}");
                assert_eq!(seen.all("sec-websocket-protocol"), ["chat.v1"], "{label}");
                // A real tunnel: one frame there and back.
                stream
                    .write_all(&ws_frame(0x81, b"after a refusal", Some([9, 8, 7, 6])))
                    .await
                    .unwrap();
                let echo = read_frame(&mut stream).await;
                assert_eq!(
                    (echo.first, echo.masked, echo.payload.as_slice()),
                    (0x81, false, &b"after a refusal"[..]),
                    "{label}"
                );
            }
        }
    }
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}
