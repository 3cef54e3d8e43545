//! The TLS listener: certificate choice by SNI, ALPN, TLS 1.2, and a wss
//! upgrade with an echo through it.

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;

struct Fixture {
    proxy: TestProxy,
    backend: WsBackend,
    a: TestCert,
    b: TestCert,
}

async fn fixture() -> Fixture {
    let backend = spawn_ws_echo().await;
    let a = test_cert(&["a.test"]);
    let b = test_cert(&["b.test"]);
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }} ] }}
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        path = "/"
        upstream = "echo"
        origins = ["https://a.test"]
        "#,
        a.cert_path.display(),
        a.key_path.display(),
        b.cert_path.display(),
        b.key_path.display(),
        backend.addr
    ))
    .await;
    Fixture {
        proxy,
        backend,
        a,
        b,
    }
}

fn all_versions() -> Vec<&'static rustls::SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

/// The leaf certificate the server presented for `server_name`.
async fn presented(f: &Fixture, server_name: &str) -> Vec<u8> {
    let tls = tls_connect_with(
        f.proxy.addr(),
        server_name,
        tls_client_config(None, &all_versions()),
    )
    .await
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
    let f = fixture().await;
    let (a, b) = (cert_der(&f.a.cert_pem), cert_der(&f.b.cert_pem));
    assert_ne!(a, b);
    assert!(
        presented(&f, "a.test").await == a,
        "SNI a.test did not get cert A"
    );
    assert!(
        presented(&f, "B.TEST").await == b,
        "SNI B.TEST did not get cert B"
    );
    assert!(
        presented(&f, "unknown.test").await == a,
        "an unknown SNI did not get the first cert"
    );
    // An IP address as server name sends no SNI at all.
    assert!(
        presented(&f, "127.0.0.1").await == a,
        "no SNI did not get the first cert"
    );

    // The same, verified: a client trusting only one certificate completes
    // the handshake for that certificate's name, and fails for the other.
    let only_a = || tls_client_config(Some(&f.a.cert_pem), &all_versions());
    let only_b = || tls_client_config(Some(&f.b.cert_pem), &all_versions());
    assert!(
        tls_connect_with(f.proxy.addr(), "a.test", only_a())
            .await
            .is_ok()
    );
    assert!(
        tls_connect_with(f.proxy.addr(), "b.test", only_b())
            .await
            .is_ok()
    );
    assert!(
        tls_connect_with(f.proxy.addr(), "b.test", only_a())
            .await
            .is_err()
    );
    f.proxy.stop().await;
}

#[tokio::test]
async fn alpn_negotiates_http11() {
    let f = fixture().await;
    let tls = tls_connect(f.proxy.addr(), "a.test", &f.a.cert_pem).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    f.proxy.stop().await;
}

#[tokio::test]
async fn tls12_client_is_served() {
    let f = fixture().await;
    let config = tls_client_config(Some(&f.b.cert_pem), &[&rustls::version::TLS12]);
    let mut tls = tls_connect_with(f.proxy.addr(), "b.test", config)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    tls.write_all(upgrade_request("/", "b.test", &[("Origin", "https://a.test")]).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut tls, "GET").await;
    assert_eq!(head.status, 101);
    drop(tls);
    f.proxy.stop().await;
}

#[tokio::test]
async fn wss_upgrade_echoes_and_forwards_https_proto() {
    let mut f = fixture().await;
    let tls = tls_connect(f.proxy.addr(), "a.test", &f.a.cert_pem).await;
    let mut request = "wss://a.test/chat?room=1".into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "https://a.test".parse().unwrap());
    let (mut ws, response) = within(
        "wss handshake",
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    let seen = f.backend.next_request().await;
    assert_eq!(seen.uri, "/chat?room=1");
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(seen.one("host").as_deref(), Some("a.test"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=https;host=a.test")
    );
    for text in ["over tls", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(
            within("echo", ws.next()).await.unwrap().unwrap(),
            Message::text(text)
        );
    }
    ws.close(None).await.unwrap();
    within("close", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    drop(ws);
    f.proxy.stop().await;
}

#[tokio::test]
async fn plaintext_and_tls_listeners_serve_side_by_side_and_survive_garbage() {
    let mut backend = spawn_ws_echo().await;
    let cert = test_cert(&["localhost"]);
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        path = "/"
        upstream = "echo"
        missing_origin = "allow"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
        backend.addr
    ))
    .await;
    assert_eq!(proxy.addrs.len(), 2);
    let (plain, tls_addr) = (proxy.addrs[0], proxy.addrs[1]);

    // Garbage: plaintext HTTP to the TLS port, a TLS hello cut short, and a
    // connection dropped at once. None of it may stop either listener.
    let mut wrong = connect(tls_addr).await;
    wrong
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = read_until_eof(&mut wrong).await;
    let mut cut = connect(tls_addr).await;
    cut.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    drop(cut);
    drop(connect(plain).await);

    let (head, _, stream) = exchange(plain, &upgrade_request("/", "x", &[])).await;
    assert_eq!(head.status, 101);
    assert_eq!(
        backend
            .next_request()
            .await
            .one("x-forwarded-proto")
            .as_deref(),
        Some("http")
    );
    drop(stream);

    let mut tls = tls_connect(tls_addr, "localhost", &cert.cert_pem).await;
    tls.write_all(upgrade_request("/", "localhost", &[]).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut tls, "GET").await;
    assert_eq!(head.status, 101);
    assert_eq!(
        backend
            .next_request()
            .await
            .one("x-forwarded-proto")
            .as_deref(),
        Some("https")
    );
    drop(tls);
    proxy.stop().await;
}

#[tokio::test]
async fn server_picks_aes128_gcm_sha256_even_when_the_client_prefers_aes256() {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let f = fixture().await;
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
        ..rustls::crypto::ring::default_provider()
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(cert_der(
            &f.a.cert_pem,
        )))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tls_connect_with(f.proxy.addr(), "a.test", config)
        .await
        .unwrap();
    let chosen = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(chosen, TLS13_AES_128_GCM_SHA256.suite());
    drop(tls);
    f.proxy.stop().await;
}
