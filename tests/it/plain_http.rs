//! Plain HTTP through the same routes: methods, bodies both ways (length and
//! chunked), keep-alive, a large streamed response, header rules, and errors.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;

use crate::common::*;

fn config(origin: SocketAddr) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.origin]
        servers = ["{origin}"]
        [upstream.dead]
        servers = ["{dead}"]
        [[route]]
        path = "/"
        upstream = "origin"
        websocket = "allowed"
        origins = ["https://app.example.com"]
        [[route]]
        path = "/static"
        upstream = "origin"
        websocket = "forbidden"
        [[route]]
        path = "/down"
        upstream = "dead"
        "#,
        dead = "127.0.0.1:1",
    )
}

async fn setup() -> (TestProxy, HttpOrigin) {
    let origin = spawn_http_origin().await;
    let proxy = start_proxy(&config(origin.addr)).await;
    (proxy, origin)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn get_passes_method_target_and_host_unchanged() {
    let (proxy, mut origin) = setup().await;
    let (head, body, _) = exchange(
        proxy.addr(),
        "GET /api/items?page=2&q=a%20b HTTP/1.1\r\nHost: Shop.Example.com:8080\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200, "{body}");
    assert_eq!(head.get("x-origin"), Some("plain"));
    let echoed = json(body.as_bytes());
    assert_eq!(echoed["method"], "GET");
    assert_eq!(echoed["uri"], "/api/items?page=2&q=a%20b");
    let seen = origin.next_request().await;
    assert_eq!(seen.one("host").as_deref(), Some("Shop.Example.com:8080"));
    assert_eq!(seen.one("accept").as_deref(), Some("application/json"));
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.one("x-forwarded-host").as_deref(),
        Some("Shop.Example.com:8080")
    );
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_target_is_forwarded_in_origin_form() {
    let (proxy, mut origin) = setup().await;
    let (head, _, _) = exchange(
        proxy.addr(),
        "GET http://shop.example.com/a/b?c=d HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    let seen = origin.next_request().await;
    assert_eq!(seen.uri, "/a/b?c=d");
    proxy.stop().await;
}

#[tokio::test]
async fn content_length_body_is_streamed_both_ways() {
    let (proxy, mut origin) = setup().await;
    let payload = "field=value&other=🚀".repeat(50);
    let request = format!(
        "POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    let (head, body, _) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 200);
    assert_eq!(body, payload);
    let seen = origin.next_request().await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.one("content-length"), Some(payload.len().to_string()));
    assert_eq!(
        seen.one("content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn chunked_body_is_streamed_both_ways() {
    let (proxy, mut origin) = setup().await;
    let request = "PATCH /doc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n1\r\n,\r\n10\r\n chunked world!!\r\n0\r\n\r\n";
    let (head, body, _) = exchange(proxy.addr(), request).await;
    assert_eq!(head.status, 200);
    assert_eq!(body, "hello, chunked world!!");
    let seen = origin.next_request().await;
    assert_eq!(seen.method, "PATCH");
    assert!(
        seen.all("content-length").is_empty()
            || seen.one("content-length").as_deref() == Some("22")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_two_requests_on_one_connection() {
    let (proxy, mut origin) = setup().await;
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 200);
    assert_eq!(json(&body)["uri"], "/first");
    stream
        .write_all(b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "POST").await;
    assert_eq!(head.status, 200);
    assert_eq!(body, b"second");
    assert_eq!(origin.next_request().await.uri, "/first");
    assert_eq!(origin.next_request().await.uri, "/second");
    // Pipelined: both requests written at once, answered in order.
    stream
        .write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\nGET /fourth HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        json(&read_response(&mut stream, "GET").await.1)["uri"],
        "/third"
    );
    assert_eq!(
        json(&read_response(&mut stream, "GET").await.1)["uri"],
        "/fourth"
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_is_streamed_intact() {
    let (proxy, _origin) = setup().await;
    const SIZE: usize = 8 * 1024 * 1024;
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(format!("GET /big?bytes={SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, "GET").await;
    assert_eq!(head.status, 200);
    assert_eq!(body.len(), SIZE);
    if let Some(index) = (0..SIZE).find(|&index| body[index] != big_body_byte(index)) {
        panic!("byte {index} differs");
    }
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn origin_policy_does_not_apply_to_plain_requests() {
    let (proxy, mut origin) = setup().await;
    for origin_header in ["Origin: https://evil.test\r\n", "Origin: null\r\n", ""] {
        let request =
            format!("GET /page HTTP/1.1\r\nHost: x\r\n{origin_header}Connection: close\r\n\r\n");
        let (head, body, _) = exchange(proxy.addr(), &request).await;
        assert_eq!(head.status, 200, "{origin_header:?}: {body}");
        let seen = origin.next_request().await;
        let expected = origin_header
            .strip_prefix("Origin: ")
            .map(|v| v.trim_end().to_owned());
        assert_eq!(seen.one("origin"), expected);
    }
    // A websocket = "forbidden" route still serves plain HTTP.
    let (head, _, _) = exchange(
        proxy.addr(),
        "GET /static/app.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_plain_requests() {
    let (proxy, mut origin) = setup().await;
    let request = "GET /hop HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
                   Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Sum\r\n\
                   Proxy-Authorization: Basic dXNlcjpwYXNz\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n";
    let (head, _, _) = exchange(proxy.addr(), request).await;
    assert_eq!(head.status, 200);
    let seen = origin.next_request().await;
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            seen.all(gone).is_empty(),
            "{gone} reached the origin: {:?}",
            seen.headers
        );
    }
    assert!(
        seen.all("connection")
            .iter()
            .all(|value| !value.to_ascii_lowercase().contains("x-secret")),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.one("x-kept").as_deref(), Some("yes"));
    proxy.stop().await;
}

#[tokio::test]
async fn origin_down_is_502_upstream_unavailable() {
    let (proxy, _origin) = setup().await;
    let (head, body, _) = exchange(
        proxy.addr(),
        "GET /down/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_rejected(&head, &body, 502, "upstream-unavailable");
    proxy.stop().await;
}

#[tokio::test]
async fn silent_origin_is_504_upstream_timeout() {
    let (silent, _) = spawn_silent_backend().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.silent]
        servers = ["{silent}"]
        [[route]]
        path = "/"
        upstream = "silent"
        handshake_timeout = "300ms"
        "#
    ))
    .await;
    let (head, body, _) = exchange(
        proxy.addr(),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_rejected(&head, &body, 504, "upstream-timeout");
    proxy.stop().await;
}

#[tokio::test]
async fn bodies_stream_without_waiting_for_the_end() {
    let (proxy, _origin) = setup().await;
    let mut stream = connect(proxy.addr()).await;
    // Head and first chunk only; the echo of that chunk must come back
    // before the rest of the body is sent.
    stream
        .write_all(
            b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        )
        .await
        .unwrap();
    let head = Head::parse(&within("the response head", read_head(&mut stream)).await);
    assert_eq!(head.status, 200);
    assert_eq!(head.get("transfer-encoding"), Some("chunked"));
    assert_eq!(
        within("the first chunk size", read_line(&mut stream)).await,
        "5"
    );
    assert_eq!(
        within("the first chunk", read_line(&mut stream)).await,
        "first"
    );
    stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    assert_eq!(
        within("the second chunk size", read_line(&mut stream)).await,
        "6"
    );
    assert_eq!(
        within("the second chunk", read_line(&mut stream)).await,
        "second"
    );
    assert_eq!(within("the last chunk", read_line(&mut stream)).await, "0");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_responses_and_keep_alive_survives() {
    let (backend, mut heads) = spawn_raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Internal\r\nX-Internal: secret\r\n\
          Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Public: yes\r\n\r\nok",
    )
    .await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [upstream.raw]
        servers = ["{backend}"]
        [[route]]
        path = "/"
        upstream = "raw"
        "#
    ))
    .await;
    let mut stream = connect(proxy.addr()).await;
    for round in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut stream, "GET").await;
        assert_eq!(head.status, 200, "round {round}");
        assert_eq!(body, b"ok");
        assert_eq!(head.get("x-public"), Some("yes"));
        for gone in ["x-internal", "keep-alive", "proxy-authenticate"] {
            assert_eq!(head.get(gone), None, "{gone} reached the client");
        }
        assert!(
            head.get("connection")
                .is_none_or(|v| !v.to_ascii_lowercase().contains("close")),
            "{:?}",
            head.headers
        );
        within("backend head", heads.recv()).await.unwrap();
    }
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn content_length_beside_chunked_cannot_smuggle_a_request() {
    let (proxy, mut origin) = setup().await;
    // CL.TE: a proxy trusting Content-Length would pass "0\r\n\r\nGET /smuggled…"
    // as the start of a second request.
    let request = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n";
    let (head, body, _) = exchange(proxy.addr(), request).await;
    assert_eq!(head.status, 200);
    assert_eq!(body, "hello");
    let seen = origin.next_request().await;
    assert_eq!(seen.uri, "/a");
    assert_ne!(seen.one("content-length").as_deref(), Some("4"));
    assert!(
        origin.seen.try_recv().is_err(),
        "a second request reached the origin"
    );
    proxy.stop().await;
}
