//! Every status and `wsgate-reason` of the handshake path: routing, request
//! shape, IP, origin, subprotocols and the upstream's answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const REFUSAL: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Backend: refused-you\r\n\
Content-Length: 21\r\n\r\nbackend says go away\n";

struct Fixture {
    proxy: TestProxy,
    echo: WsBackend,
    /// Keeps the "dead" upstream's port bound (and refusing) for the test.
    _dead: tokio::net::TcpSocket,
}

/// One proxy with a route per situation.
async fn fixture() -> Fixture {
    let echo = spawn_ws_echo().await;
    let (dead_socket, dead) = refusing_port();
    let (silent, _) = spawn_silent_backend().await;
    let (refuser, _) = spawn_raw_backend(REFUSAL).await;
    let liar = spawn_ws_backend(|_| Some("evil".to_owned())).await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{echo}"]
        [upstream.dead]
        servers = ["{dead}"]
        [upstream.silent]
        servers = ["{silent}"]
        [upstream.refuser]
        servers = ["{refuser}"]
        [upstream.liar]
        servers = ["{liar}"]

        [[route]]
        path = "/ws"
        upstream = "echo"
        websocket = "required"
        origins = ["https://app.example.com"]

        [[route]]
        path = "/static"
        upstream = "echo"
        websocket = "forbidden"

        [[route]]
        path = "/internal"
        upstream = "echo"
        allow_ips = ["10.0.0.0/8"]
        origins = ["https://app.example.com"]

        [[route]]
        path = "/denied"
        upstream = "echo"
        deny_ips = ["127.0.0.0/8"]
        missing_origin = "allow"

        [[route]]
        path = "/native"
        upstream = "echo"
        missing_origin = "allow"

        [[route]]
        path = "/proto"
        upstream = "echo"
        origins = ["https://app.example.com"]
        subprotocols = ["chat.v2", "b"]

        [[route]]
        path = "/dead"
        upstream = "dead"
        missing_origin = "allow"

        [[route]]
        path = "/silent"
        upstream = "silent"
        missing_origin = "allow"
        handshake_timeout = "300ms"

        [[route]]
        path = "/refuse"
        upstream = "refuser"
        missing_origin = "allow"

        [[route]]
        path = "/liar"
        upstream = "liar"
        missing_origin = "allow"

        [[route]]
        host = "api.example.com"
        path = "/only-api"
        upstream = "echo"
        missing_origin = "allow"
        "#,
        echo = echo.addr,
        liar = liar.addr,
    ))
    .await;
    Fixture {
        proxy,
        echo,
        _dead: dead_socket,
    }
}

/// A request from its request line and header lines, verbatim.
fn request(line: &str, headers: &[&str]) -> String {
    let mut text = format!("{line}\r\n");
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

async fn reject(addr: SocketAddr, text: &str, status: u16, reason: &str) -> Head {
    let (head, body, _) = exchange(addr, text).await;
    assert_rejected(&head, &body, status, reason);
    head
}

const HOST: &str = "Host: chat.example.com";
const UPGRADE: &str = "Upgrade: websocket";
const CONNECTION: &str = "Connection: Upgrade";
const VERSION: &str = "Sec-WebSocket-Version: 13";
const ORIGIN: &str = "Origin: https://app.example.com";

fn key_line() -> String {
    format!("Sec-WebSocket-Key: {KEY}")
}

#[tokio::test]
async fn unmatched_path_or_host_is_404_no_route() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    reject(
        addr,
        &request("GET /nothing HTTP/1.1", &[HOST]),
        404,
        "no-route",
    )
    .await;
    reject(
        addr,
        &upgrade_request(
            "/nothing",
            "chat.example.com",
            &[("Origin", "https://app.example.com")],
        ),
        404,
        "no-route",
    )
    .await;
    // A host route only serves its host; /ws is not a prefix of /wsx.
    reject(
        addr,
        &upgrade_request("/only-api", "other.example.com", &[]),
        404,
        "no-route",
    )
    .await;
    reject(
        addr,
        &upgrade_request(
            "/wsx",
            "chat.example.com",
            &[("Origin", "https://app.example.com")],
        ),
        404,
        "no-route",
    )
    .await;
    let (head, _, stream) = exchange(
        addr,
        &upgrade_request("/only-api", "API.Example.com:443", &[]),
    )
    .await;
    assert_eq!(head.status, 101);
    drop(stream);
    f.proxy.stop().await;
}

#[tokio::test]
async fn malformed_handshakes_are_400_bad_handshake() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    let key = key_line();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "missing key",
            vec![HOST, UPGRADE, CONNECTION, VERSION, ORIGIN],
        ),
        (
            "key of 10 bytes",
            vec![
                HOST,
                UPGRADE,
                CONNECTION,
                "Sec-WebSocket-Key: dGhlIHNhbXBsZQ==",
                VERSION,
                ORIGIN,
            ],
        ),
        (
            "key not base64",
            vec![
                HOST,
                UPGRADE,
                CONNECTION,
                "Sec-WebSocket-Key: !!!!not*base64!!!!!!!==",
                VERSION,
                ORIGIN,
            ],
        ),
        (
            "two keys",
            vec![
                HOST,
                UPGRADE,
                CONNECTION,
                &key,
                "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
                VERSION,
                ORIGIN,
            ],
        ),
        (
            "missing version",
            vec![HOST, UPGRADE, CONNECTION, &key, ORIGIN],
        ),
    ];
    for (what, headers) in cases {
        let (head, body, _) = exchange(addr, &request("GET /ws HTTP/1.1", &headers)).await;
        assert_eq!(head.status, 400, "{what}: {body}");
        assert_rejected(&head, &body, 400, "bad-handshake");
    }
    let post = request(
        "POST /ws HTTP/1.1",
        &[
            HOST,
            UPGRADE,
            CONNECTION,
            &key,
            VERSION,
            ORIGIN,
            "Content-Length: 0",
        ],
    );
    reject(addr, &post, 400, "bad-handshake").await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn unsupported_version_is_426_bad_version_naming_13() {
    let f = fixture().await;
    let text = request(
        "GET /ws HTTP/1.1",
        &[
            HOST,
            UPGRADE,
            CONNECTION,
            &key_line(),
            "Sec-WebSocket-Version: 8",
            ORIGIN,
        ],
    );
    let head = reject(f.proxy.addr(), &text, 426, "bad-version").await;
    assert_eq!(head.get("sec-websocket-version"), Some("13"));
    f.proxy.stop().await;
}

#[tokio::test]
async fn plain_request_on_required_route_is_426_upgrade_required() {
    let f = fixture().await;
    let head = reject(
        f.proxy.addr(),
        &request("GET /ws HTTP/1.1", &[HOST, ORIGIN]),
        426,
        "upgrade-required",
    )
    .await;
    assert_eq!(head.get("upgrade"), Some("websocket"));
    // `Upgrade: h2c` is not a WebSocket upgrade either.
    let h2c = request(
        "GET /ws HTTP/1.1",
        &[
            HOST,
            "Upgrade: h2c",
            "Connection: Upgrade, HTTP2-Settings",
            "HTTP2-Settings: AAMAAABkAAQAAP__",
        ],
    );
    reject(f.proxy.addr(), &h2c, 426, "upgrade-required").await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn upgrade_on_forbidden_route_is_403_websocket_forbidden() {
    let f = fixture().await;
    reject(
        f.proxy.addr(),
        &upgrade_request("/static/ws", "x", &[("Origin", "https://app.example.com")]),
        403,
        "websocket-forbidden",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn client_outside_allow_ips_or_inside_deny_ips_is_403_ip_forbidden() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    reject(
        addr,
        &upgrade_request("/internal", "x", &[("Origin", "https://app.example.com")]),
        403,
        "ip-forbidden",
    )
    .await;
    reject(
        addr,
        &upgrade_request("/denied", "x", &[]),
        403,
        "ip-forbidden",
    )
    .await;
    // The IP check runs before anything else: a bad handshake or a bad origin
    // from a forbidden address still only learns ip-forbidden.
    reject(
        addr,
        &request(
            "GET /internal HTTP/1.1",
            &[
                HOST,
                UPGRADE,
                CONNECTION,
                VERSION,
                "Origin: https://evil.test",
            ],
        ),
        403,
        "ip-forbidden",
    )
    .await;
    reject(
        addr,
        &request("GET /internal HTTP/1.1", &[HOST]),
        403,
        "ip-forbidden",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn origin_not_allowed_or_missing_is_403() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    reject(
        addr,
        &upgrade_request("/ws", "x", &[("Origin", "https://evil.example.net")]),
        403,
        "origin-forbidden",
    )
    .await;
    reject(
        addr,
        &upgrade_request("/ws", "x", &[]),
        403,
        "origin-missing",
    )
    .await;
    // A route without `origins` allows no browser origin at all.
    reject(
        addr,
        &upgrade_request("/native", "x", &[("Origin", "https://app.example.com")]),
        403,
        "origin-forbidden",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn missing_origin_allow_lets_native_clients_through() {
    let mut f = fixture().await;
    let (head, _, stream) =
        exchange(f.proxy.addr(), &upgrade_request("/native/feed", "x", &[])).await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    let seen = f.echo.next_request().await;
    assert_eq!(seen.uri, "/native/feed");
    assert!(seen.all("origin").is_empty());
    drop(stream);
    f.proxy.stop().await;
}

#[tokio::test]
async fn checks_run_in_contract_order() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    // Shape before origin: a bad key with a bad origin is a bad handshake.
    reject(
        addr,
        &request(
            "GET /ws HTTP/1.1",
            &[
                HOST,
                UPGRADE,
                CONNECTION,
                VERSION,
                "Origin: https://evil.test",
            ],
        ),
        400,
        "bad-handshake",
    )
    .await;
    // Origin before subprotocol.
    reject(
        addr,
        &upgrade_request(
            "/proto",
            "x",
            &[
                ("Origin", "https://evil.test"),
                ("Sec-WebSocket-Protocol", "nope"),
            ],
        ),
        403,
        "origin-forbidden",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn no_allowed_subprotocol_is_400_subprotocol_forbidden() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    let origin = ("Origin", "https://app.example.com");
    reject(
        addr,
        &upgrade_request(
            "/proto",
            "x",
            &[origin, ("Sec-WebSocket-Protocol", "chat.v1, x")],
        ),
        400,
        "subprotocol-forbidden",
    )
    .await;
    reject(
        addr,
        &upgrade_request("/proto", "x", &[origin]),
        400,
        "subprotocol-forbidden",
    )
    .await;
    // Tokens compare exactly.
    reject(
        addr,
        &upgrade_request(
            "/proto",
            "x",
            &[origin, ("Sec-WebSocket-Protocol", "CHAT.V2")],
        ),
        400,
        "subprotocol-forbidden",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn offered_subprotocols_are_narrowed_to_the_allowed_ones_in_client_order() {
    let mut f = fixture().await;
    let text = upgrade_request(
        "/proto",
        "x",
        &[
            ("Origin", "https://app.example.com"),
            ("Sec-WebSocket-Protocol", "a, chat.v2"),
            ("Sec-WebSocket-Protocol", "b"),
        ],
    );
    let (head, _, stream) = exchange(f.proxy.addr(), &text).await;
    assert_eq!(head.status, 101);
    assert_eq!(head.get("sec-websocket-protocol"), Some("chat.v2"));
    let seen = f.echo.next_request().await;
    assert_eq!(
        seen.all("sec-websocket-protocol"),
        vec!["chat.v2, b".to_owned()]
    );
    drop(stream);
    f.proxy.stop().await;
}

#[tokio::test]
async fn refused_backend_connection_is_502_upstream_unavailable() {
    let f = fixture().await;
    reject(
        f.proxy.addr(),
        &upgrade_request("/dead", "x", &[]),
        502,
        "upstream-unavailable",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn backend_silent_past_handshake_timeout_is_504_upstream_timeout() {
    let f = fixture().await;
    let started = Instant::now();
    reject(
        f.proxy.addr(),
        &upgrade_request("/silent", "x", &[]),
        504,
        "upstream-timeout",
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "timed out after only {elapsed:?}"
    );
    f.proxy.stop().await;
}

#[tokio::test]
async fn backend_refusal_reaches_the_client_unchanged() {
    let f = fixture().await;
    let (head, body, _) = exchange(f.proxy.addr(), &upgrade_request("/refuse", "x", &[])).await;
    assert_eq!(head.status, 403);
    assert_eq!(head.get("x-backend"), Some("refused-you"));
    assert_eq!(head.get("content-type"), Some("text/plain"));
    assert_eq!(
        head.get("wsgate-reason"),
        None,
        "the backend's answer is not a wsgate rejection"
    );
    assert_eq!(body, "backend says go away\n");
    f.proxy.stop().await;
}

#[tokio::test]
async fn backend_selecting_an_unoffered_subprotocol_is_502_upstream_protocol() {
    let f = fixture().await;
    let addr = f.proxy.addr();
    reject(
        addr,
        &upgrade_request(
            "/liar",
            "x",
            &[("Sec-WebSocket-Protocol", "chat, superchat")],
        ),
        502,
        "upstream-protocol",
    )
    .await;
    reject(
        addr,
        &upgrade_request("/liar", "x", &[]),
        502,
        "upstream-protocol",
    )
    .await;
    f.proxy.stop().await;
}

#[tokio::test]
async fn upgrade_tokens_match_case_insensitively_among_others() {
    let mut f = fixture().await;
    let text = request(
        "GET /ws HTTP/1.1",
        &[
            HOST,
            "Upgrade: WebSocket",
            "Connection: keep-alive",
            "Connection: UPGRADE",
            &key_line(),
            VERSION,
            ORIGIN,
        ],
    );
    let (head, _, stream) = exchange(f.proxy.addr(), &text).await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    let seen = f.echo.next_request().await;
    assert_eq!(seen.all("connection"), vec!["Upgrade".to_owned()]);
    assert_eq!(seen.one("upgrade").as_deref(), Some("WebSocket"));
    drop(stream);
    f.proxy.stop().await;
}

#[tokio::test]
async fn repeated_version_header_is_400_bad_handshake() {
    let f = fixture().await;
    let text = request(
        "GET /ws HTTP/1.1",
        &[
            HOST,
            UPGRADE,
            CONNECTION,
            &key_line(),
            VERSION,
            VERSION,
            ORIGIN,
        ],
    );
    reject(f.proxy.addr(), &text, 400, "bad-handshake").await;
    f.proxy.stop().await;
}

/// A proxy whose only route goes to a raw backend answering `response`.
async fn proxy_to_raw(response: &'static [u8]) -> TestProxy {
    let (backend, _) = spawn_raw_backend(response).await;
    start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.raw]
        servers = ["{backend}"]
        [[route]]
        path = "/"
        upstream = "raw"
        missing_origin = "allow"
        "#
    ))
    .await
}

#[tokio::test]
async fn backend_closing_or_answering_garbage_is_502_upstream_unavailable() {
    for response in [&b""[..], b"SSH-2.0-OpenSSH_9.6\r\n"] {
        let proxy = proxy_to_raw(response).await;
        let (head, body, _) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
        assert_rejected(&head, &body, 502, "upstream-unavailable");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn backend_101_to_something_else_is_502_upstream_protocol() {
    let proxy = proxy_to_raw(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let (head, body, _) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
    assert_rejected(&head, &body, 502, "upstream-protocol");
    proxy.stop().await;
}

/// A malformed request is a 400 with a reason, never a bare 400: two Host
/// headers (RFC 9112 §3.2), on the upgrade path and on plain HTTP.
#[tokio::test]
async fn two_host_headers_get_400_bad_request_with_a_reason() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        path = "/"
        upstream = "echo"
        missing_origin = "allow"
        "#,
        backend.addr
    ))
    .await;
    let upgrade = upgrade_request("/", "a.test", &[("Host", "b.test")]);
    let (head, body, _) = exchange(proxy.addr(), &upgrade).await;
    assert_rejected(&head, &body, 400, "bad-request");
    let plain = "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    let (head, body, _) = exchange(proxy.addr(), plain).await;
    assert_rejected(&head, &body, 400, "bad-request");
    assert_eq!(
        admin_metric(
            proxy.admin.unwrap(),
            "wsgate_rejections_total",
            &[("route", "-"), ("reason", "bad-request")]
        )
        .await,
        2.0
    );
    proxy.stop().await;
}

/// Heads whose body framing hyper would refuse with a bare 400 of its own
/// are refused by wsgate with the reason, logged and counted, and reach no
/// backend.
#[tokio::test]
async fn ambiguous_body_framing_and_noise_get_400_bad_request_with_a_reason() {
    let mut origin = spawn_http_origin().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [upstream.app]
        servers = ["{}"]
        [[route]]
        path = "/"
        upstream = "app"
        websocket = "forbidden"
        "#,
        origin.addr
    ))
    .await;
    let cases = [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
            "two different Content-Length values",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding does not end in chunked",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "Transfer-Encoding does not end in chunked",
        ),
        (
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0 has no Transfer-Encoding",
        ),
        ("\x01\x02 noise\r\n\r\n", "the request head is not HTTP/1.x"),
    ];
    for (request, detail) in cases {
        let (head, body, _) = exchange(proxy.addr(), request).await;
        assert_rejected(&head, &body, 400, "bad-request");
        assert!(body.contains(detail), "{request:?}: {body}");
    }
    assert_eq!(
        admin_metric(
            proxy.admin.unwrap(),
            "wsgate_rejections_total",
            &[("route", "-"), ("reason", "bad-request")]
        )
        .await,
        cases.len() as f64
    );
    // A well-framed request after them all is the first the origin sees.
    let (head, _, _) = exchange(
        proxy.addr(),
        "GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(origin.next_request().await.uri, "/after");
    proxy.stop().await;
}
