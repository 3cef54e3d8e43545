//! What the backend receives on an upgrade: the request line, `Host`,
//! `Origin` and every `Sec-WebSocket-*` header unchanged, no hop-by-hop
//! header, and forwarding headers set for untrusted and trusted peers.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;

use crate::common::*;

const KEY: &str = "x3JJHMbDL1EzLkh9GBhXDw==";

fn config(backend: SocketAddr, server_extra: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        {server_extra}
        [upstream.echo]
        servers = ["{backend}"]
        [[route]]
        path = "/ws"
        upstream = "echo"
        origins = ["https://app.example.com"]
        "#
    )
}

/// A full upgrade request with the given extra header lines.
fn upgrade(target: &str, host: &str, extra: &[&str]) -> String {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

#[test]
fn accept_key_helper_matches_rfc_6455() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(accept_key(KEY), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
}

#[tokio::test]
async fn request_line_host_origin_and_websocket_headers_arrive_unchanged() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "")).await;
    let request = upgrade(
        "/ws/room/42?token=abc&x=%2F&flag",
        "Chat.Example.COM:8080",
        &[
            "Origin: HTTPS://App.Example.com",
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            "User-Agent: wsgate-it/1.0",
            "Cookie: session=s3cr3t; theme=dark",
        ],
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some("HSmrc0sMlYUkAGmm5OPpG2HaGWk=")
    );
    assert_eq!(head.get("sec-websocket-protocol"), Some("chat"));
    assert!(
        head.get("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    );

    let seen = backend.next_request().await;
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/ws/room/42?token=abc&x=%2F&flag");
    assert_eq!(seen.one("host").as_deref(), Some("Chat.Example.COM:8080"));
    assert_eq!(
        seen.one("origin").as_deref(),
        Some("HTTPS://App.Example.com")
    );
    assert_eq!(seen.one("upgrade").as_deref(), Some("websocket"));
    assert_eq!(seen.one("connection").as_deref(), Some("Upgrade"));
    assert_eq!(seen.one("sec-websocket-key").as_deref(), Some(KEY));
    assert_eq!(seen.one("sec-websocket-version").as_deref(), Some("13"));
    assert_eq!(
        seen.one("sec-websocket-protocol").as_deref(),
        Some("chat, superchat")
    );
    assert_eq!(
        seen.one("sec-websocket-extensions").as_deref(),
        Some("permessage-deflate; client_max_window_bits")
    );
    assert_eq!(seen.one("user-agent").as_deref(), Some("wsgate-it/1.0"));
    assert_eq!(
        seen.one("cookie").as_deref(),
        Some("session=s3cr3t; theme=dark")
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_the_upgrade() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "")).await;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade, X-Secret\r\nConnection: X-Other\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n\
         X-Secret: named-by-connection\r\nX-Other: also-named\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Checksum\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\nX-Kept: end-to-end\r\n\r\n"
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    let seen = backend.next_request().await;
    for gone in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
    ] {
        assert!(
            seen.all(gone).is_empty(),
            "{gone} reached the backend: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.all("connection"), vec!["Upgrade".to_owned()]);
    assert_eq!(seen.one("upgrade").as_deref(), Some("websocket"));
    assert_eq!(seen.one("x-kept").as_deref(), Some("end-to-end"));
    assert_eq!(seen.one("sec-websocket-key").as_deref(), Some(KEY));
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn untrusted_peer_has_spoofed_forwarding_headers_replaced() {
    let mut backend = spawn_ws_echo().await;
    // 10.0.0.0/8 is trusted, but the test's peer (127.0.0.1) is not.
    let proxy = start_proxy(&config(backend.addr, r#"trusted_proxies = ["10.0.0.0/8"]"#)).await;
    let request = upgrade(
        "/ws",
        "chat.example.com:8443",
        &[
            "Origin: https://app.example.com",
            "X-Forwarded-For: 6.6.6.6, 10.0.0.1",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil.test",
            "X-Real-IP: 6.6.6.6",
            "Forwarded: for=6.6.6.6;proto=https;host=evil.test",
        ],
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    let seen = backend.next_request().await;
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.one("x-forwarded-host").as_deref(),
        Some("chat.example.com:8443")
    );
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=\"chat.example.com:8443\"")
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn trusted_peer_chain_is_extended_and_its_proto_and_host_kept() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(
        backend.addr,
        r#"trusted_proxies = ["127.0.0.1/32"]"#,
    ))
    .await;
    let request = upgrade(
        "/ws",
        "internal-lb:8080",
        &[
            "Origin: https://app.example.com",
            // Two lines form one list; the right-most 127.0.0.1 is trusted,
            // so the client is the entry before it.
            "X-Forwarded-For: 203.0.113.9",
            "X-Forwarded-For: 198.51.100.7, 127.0.0.1",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: chat.example.com",
            "X-Real-IP: 1.2.3.4",
            "Forwarded: for=203.0.113.9;proto=https;host=chat.example.com",
        ],
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    let seen = backend.next_request().await;
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 198.51.100.7, 127.0.0.1, 127.0.0.1")
    );
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.one("x-forwarded-host").as_deref(),
        Some("chat.example.com")
    );
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("198.51.100.7"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some(
            "for=203.0.113.9;proto=https;host=chat.example.com, for=127.0.0.1;proto=http;host=\"internal-lb:8080\""
        )
    );
    assert_eq!(seen.one("host").as_deref(), Some("internal-lb:8080"));
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn trusted_peer_without_forwarding_headers_gets_fresh_ones() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(
        backend.addr,
        r#"trusted_proxies = ["127.0.0.1/32"]"#,
    ))
    .await;
    let request = upgrade(
        "/ws",
        "chat.example.com",
        &["Origin: https://app.example.com"],
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    let seen = backend.next_request().await;
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.one("x-forwarded-host").as_deref(),
        Some("chat.example.com")
    );
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=chat.example.com")
    );
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn client_ip_from_a_trusted_chain_drives_allow_ips_but_a_spoof_does_not() {
    let backend = spawn_ws_echo().await;
    let route = |trusted: &str| {
        format!(
            r#"
            [[listener]]
            addr = "127.0.0.1:0"
            [server]
            drain_timeout = "1s"
            trusted_proxies = [{trusted}]
            [upstream.echo]
            servers = ["{}"]
            [[route]]
            path = "/"
            upstream = "echo"
            missing_origin = "allow"
            allow_ips = ["198.51.100.0/24"]
            "#,
            backend.addr
        )
    };
    let request = upgrade("/", "x", &["X-Forwarded-For: 198.51.100.7"]);

    let trusting = start_proxy(&route(r#""127.0.0.1/32""#)).await;
    let (head, _, stream) = exchange(trusting.addr(), &request).await;
    assert_eq!(head.status, 101, "{:?}", head.headers);
    drop(stream);
    trusting.stop().await;

    let untrusting = start_proxy(&route("")).await;
    let (head, body, _) = exchange(untrusting.addr(), &request).await;
    assert_rejected(&head, &body, 403, "ip-forbidden");
    untrusting.stop().await;
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 128);
    compressor
        .compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    // RFC 7692 §7.2.1: the sync flush's empty stored block is not sent.
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "{out:?}");
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut decompressor = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(64 * 1024);
    decompressor
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .unwrap();
    out
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_end_to_end() {
    const CLIENT_TEXT: &str = "hello hello hello, compressed world, hello hello hello";
    const SERVER_TEXT: &str = "compressed reply, compressed reply, compressed reply";
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<Frame>();
    let (backend, mut heads) = spawn_raw_ws(move |mut stream, head| {
        let frames_tx = frames_tx.clone();
        async move {
            let offered = Head::parse(&head)
                .get("sec-websocket-extensions")
                .unwrap_or_default()
                .to_owned();
            let extensions: &[(&str, &str)] = if offered.starts_with("permessage-deflate") {
                &[("Sec-WebSocket-Extensions", "permessage-deflate")]
            } else {
                &[]
            };
            stream
                .write_all(switching_protocols(&head, extensions).as_bytes())
                .await
                .unwrap();
            let frame = read_frame(&mut stream).await;
            let _ = frames_tx.send(frame);
            // FIN + RSV1 + text, unmasked as a server frame must be.
            stream
                .write_all(&ws_frame(0xC1, &deflate(SERVER_TEXT.as_bytes()), None))
                .await
                .unwrap();
            let _ = read_until_eof(&mut stream).await;
        }
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let request = upgrade(
        "/ws",
        "chat.example.com",
        &[
            "Origin: https://app.example.com",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ],
    );
    let (head, _, mut stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        head.get("sec-websocket-extensions"),
        Some("permessage-deflate")
    );
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some(accept_key(KEY).as_str())
    );
    let backend_head = Head::parse(&within("backend head", heads.recv()).await.unwrap());
    assert_eq!(
        backend_head.get("sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits")
    );

    let compressed = deflate(CLIENT_TEXT.as_bytes());
    assert!(compressed.len() < CLIENT_TEXT.len());
    stream
        .write_all(&ws_frame(0xC1, &compressed, Some([0x11, 0x22, 0x33, 0x44])))
        .await
        .unwrap();
    let seen = within("the backend's frame", frames.recv()).await.unwrap();
    assert_eq!(
        seen.first, 0xC1,
        "FIN, RSV1 and the text opcode must survive"
    );
    assert!(seen.masked);
    assert_eq!(
        String::from_utf8(inflate(&seen.payload)).unwrap(),
        CLIENT_TEXT
    );

    let reply = read_frame(&mut stream).await;
    assert_eq!(reply.first, 0xC1);
    assert!(!reply.masked);
    assert_eq!(
        String::from_utf8(inflate(&reply.payload)).unwrap(),
        SERVER_TEXT
    );
    stream.shutdown().await.unwrap();
    let _ = read_until_eof(&mut stream).await;
    proxy.stop().await;
}

#[tokio::test]
async fn backend_101_headers_reach_the_client_unchanged() {
    let (backend, _) = spawn_raw_ws(|mut stream, head| async move {
        let response = switching_protocols(
            &head,
            &[
                ("Sec-WebSocket-Protocol", "chat.v2"),
                (
                    "Sec-WebSocket-Extensions",
                    "permessage-deflate; server_no_context_takeover",
                ),
                ("X-Backend-Id", "node-7"),
                ("Set-Cookie", "affinity=node-7; Path=/"),
            ],
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        let _ = read_until_eof(&mut stream).await;
    })
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let request = upgrade(
        "/ws",
        "chat.example.com",
        &[
            "Origin: https://app.example.com",
            "Sec-WebSocket-Protocol: chat.v1, chat.v2",
            "Sec-WebSocket-Extensions: permessage-deflate",
        ],
    );
    let (head, _, stream) = exchange(proxy.addr(), &request).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some(accept_key(KEY).as_str())
    );
    assert_eq!(head.get("sec-websocket-protocol"), Some("chat.v2"));
    assert_eq!(
        head.get("sec-websocket-extensions"),
        Some("permessage-deflate; server_no_context_takeover")
    );
    assert_eq!(head.get("x-backend-id"), Some("node-7"));
    assert_eq!(head.get("set-cookie"), Some("affinity=node-7; Path=/"));
    assert!(
        head.get("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    );
    drop(stream);
    proxy.stop().await;
}
