//! Origin-policy attacks at the integration level (the matcher itself is
//! unit-tested): each hostile `Origin` gets 403 origin-forbidden, each
//! legitimate spelling of an allowed origin gets 101.

use crate::common::*;

async fn proxy() -> (TestProxy, WsBackend) {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        path = "/ws"
        upstream = "echo"
        origins = ["https://app.example.com", "https://*.example.org", "http://localhost:5173"]
        "#,
        backend.addr
    ))
    .await;
    (proxy, backend)
}

#[tokio::test]
async fn hostile_origins_are_403_origin_forbidden() {
    let (proxy, _backend) = proxy().await;
    let hostile = [
        ("suffix", "https://app.example.com.evil.com"),
        ("prefix", "https://evilapp.example.com"),
        ("userinfo after", "https://app.example.com@evil.com"),
        ("userinfo before", "https://evil.com@app.example.com"),
        ("scheme", "http://app.example.com"),
        ("websocket scheme", "wss://app.example.com"),
        ("port", "https://app.example.com:8443"),
        ("port on a port-less allow", "http://localhost:5174"),
        ("default port for a port pattern", "http://localhost"),
        ("null", "null"),
        ("trailing dot", "https://app.example.com."),
        ("trailing slash", "https://app.example.com/"),
        ("path", "https://app.example.com/app"),
        (
            "two origins in one value",
            "https://app.example.com https://evil.com",
        ),
        ("comma list", "https://app.example.com, https://evil.com"),
        ("empty", ""),
        ("wildcard's own domain", "https://example.org"),
        ("wildcard suffix trick", "https://xexample.org"),
        ("wildcard empty label", "https://.example.org"),
        ("wildcard scheme", "http://a.example.org"),
        ("wildcard port", "https://a.example.org:444"),
        ("wildcard suffix", "https://a.example.org.evil.com"),
    ];
    for (attack, origin) in hostile {
        let (head, body, _) = exchange(
            proxy.addr(),
            &upgrade_request("/ws", "app.example.com", &[("Origin", origin)]),
        )
        .await;
        assert_eq!(
            head.status, 403,
            "{attack} ({origin:?}) was not refused: {:?}",
            head.headers
        );
        assert_rejected(&head, &body, 403, "origin-forbidden");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn two_origin_headers_are_403_even_when_both_are_allowed() {
    let (proxy, _backend) = proxy().await;
    let request = upgrade_request(
        "/ws",
        "app.example.com",
        &[
            ("Origin", "https://app.example.com"),
            ("Origin", "https://app.example.com"),
        ],
    );
    let (head, body, _) = exchange(proxy.addr(), &request).await;
    assert_rejected(&head, &body, 403, "origin-forbidden");
    let mixed = upgrade_request(
        "/ws",
        "app.example.com",
        &[
            ("Origin", "https://app.example.com"),
            ("Origin", "https://evil.com"),
        ],
    );
    let (head, body, _) = exchange(proxy.addr(), &mixed).await;
    assert_rejected(&head, &body, 403, "origin-forbidden");
    proxy.stop().await;
}

#[tokio::test]
async fn allowed_origins_upgrade_in_every_legitimate_spelling() {
    let (proxy, mut backend) = proxy().await;
    let allowed = [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://App.Example.Com:443",
        "https://a.example.org",
        "https://deep.er.example.org",
        "https://A.Example.ORG:443",
        "http://localhost:5173",
    ];
    for origin in allowed {
        let (head, _, stream) = exchange(
            proxy.addr(),
            &upgrade_request("/ws", "app.example.com", &[("Origin", origin)]),
        )
        .await;
        assert_eq!(
            head.status, 101,
            "{origin:?} was refused: {:?}",
            head.headers
        );
        // The backend sees the Origin byte for byte, not normalised.
        assert_eq!(
            backend.next_request().await.one("origin").as_deref(),
            Some(origin)
        );
        drop(stream);
    }
    proxy.stop().await;
}
