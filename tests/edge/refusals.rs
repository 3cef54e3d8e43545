//! A backend's refusal of an upgrade (any answer but a 101) through a running
//! proxy: relayed to the client as the backend sent it — status, headers,
//! body — with no `wsgate-reason`, whichever way the upgrade was served.

use std::net::SocketAddr;

use crate::support::*;

on_both_paths!(backend_refusals_of_an_upgrade_are_relayed_unchanged);

/// One route on `backend`, no origin needed; plus the warm-up route.
async fn start(backend: SocketAddr) -> TestProxy {
    let toml = format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.refusing]
        servers = ["{backend}"]
        [[route]]
        path = "/refuse"
        upstream = "refusing"
        missing_origin = "allow"
        {warmup}
        "#,
        warmup = warmup_config().await,
    );
    start_proxy(&toml).await
}

/// The backend saw the client's upgrade, forwarded.
#[track_caller]
fn assert_forwarded_upgrade(path: UpgradePath, seen: &str) {
    assert!(
        seen.starts_with("GET /refuse/room?x=1 HTTP/1.1\r\n"),
        "{path}: {seen:?}"
    );
    let head = Head::parse(seen);
    assert_eq!(head.get("upgrade"), Some("websocket"), "{path}: {seen:?}");
    assert_eq!(
        head.get("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ=="),
        "{path}"
    );
    assert_eq!(head.get("cookie"), Some("sid=expired"), "{path}");
    assert_eq!(head.get("x-forwarded-for"), Some("127.0.0.1"), "{path}");
}

async fn backend_refusals_of_an_upgrade_are_relayed_unchanged(path: UpgradePath) {
    let cookie = [("Cookie", "sid=expired")];

    // Framed by Content-Length.
    let (backend, mut seen) = spawn_raw_backend(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nX-Backend-Node: eu-1\r\n\
          Content-Length: 13\r\n\r\nnot your room",
    )
    .await;
    let proxy = start(backend).await;
    let (head, body) = upgrade_via(path, proxy.addr(), "/refuse/room?x=1", &cookie).await;
    assert_eq!(head.status, 403, "{path}: {:?} {body:?}", head.headers);
    assert_eq!(body, "not your room", "{path}");
    assert_eq!(header_values(&head, "content-length"), ["13"], "{path}");
    assert_eq!(
        header_values(&head, "content-type"),
        ["text/html"],
        "{path}"
    );
    assert_eq!(header_values(&head, "x-backend-node"), ["eu-1"], "{path}");
    assert_eq!(
        header_values(&head, "wsgate-reason"),
        Vec::<String>::new(),
        "{path}"
    );
    let request = within("the backend to see the upgrade", seen.recv())
        .await
        .unwrap();
    assert_forwarded_upgrade(path, &request);
    proxy.stop().await;

    // Chunked, with a challenge and a trailer; held whole (it is small).
    let (backend, mut seen) = spawn_raw_backend(
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\
          WWW-Authenticate: Basic realm=\"ws\"\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n",
    )
    .await;
    let proxy = start(backend).await;
    let (head, body) = upgrade_via(path, proxy.addr(), "/refuse/room?x=1", &cookie).await;
    assert_eq!(head.status, 401, "{path}: {:?} {body:?}", head.headers);
    assert_eq!(body, "hello world", "{path}");
    // Re-framed by its length once held whole, on both paths.
    assert_eq!(header_values(&head, "content-length"), ["11"], "{path}");
    assert_eq!(
        header_values(&head, "transfer-encoding"),
        Vec::<String>::new(),
        "{path}"
    );
    assert_eq!(
        header_values(&head, "www-authenticate"),
        ["Basic realm=\"ws\""],
        "{path}"
    );
    assert_eq!(
        header_values(&head, "wsgate-reason"),
        Vec::<String>::new(),
        "{path}"
    );
    assert_eq!(
        header_values(&head, "x-trailer"),
        Vec::<String>::new(),
        "{path}"
    );
    let request = within("the backend to see the upgrade", seen.recv())
        .await
        .unwrap();
    assert_forwarded_upgrade(path, &request);
    proxy.stop().await;
}
