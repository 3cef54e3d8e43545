//! Forward auth (`[route.auth] forward = …`) through a running proxy, with a
//! real auth service on hyper: allow (listed headers copied upstream), 401 and
//! 403 relayed with their bodies, timeout, down, and anything else → 503.

use std::sync::atomic::Ordering;

use crate::support::*;

on_both_paths!(
    forward_auth_allow_copies_listed_headers_and_sees_the_clients_credentials,
    forward_auth_401_and_403_are_relayed_with_their_bodies,
    forward_auth_timeout_is_503_auth_unavailable,
    forward_auth_down_is_503_auth_unavailable,
    forward_auth_answers_other_than_2xx_401_403_are_503,
    forward_auth_never_sees_forwarding_headers_forged_by_an_untrusted_client,
);

struct Setup {
    auth: HyperServer,
    backend: WsBackend,
    plain: HyperServer,
    proxy: TestProxy,
    _down: tokio::net::TcpSocket,
}

async fn setup() -> Setup {
    let auth = spawn_auth_service().await;
    let backend = spawn_ws_echo().await;
    let plain = spawn_plain_backend().await;
    let (down_socket, down) = refusing_port();
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
        path = "/fa"
        upstream = "echo"
        origins = ["https://app.edge.test"]
        missing_origin = "allow"
        [route.auth]
        forward = "http://{auth}/check"
        forward_response_headers = ["X-User"]

        [[route]]
        path = "/fa-slow"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        forward = "http://{auth}/check"
        forward_timeout = "300ms"

        [[route]]
        path = "/fa-down"
        upstream = "echo"
        missing_origin = "allow"
        [route.auth]
        forward = "http://{down}/check"

        [[route]]
        path = "/fa-plain"
        upstream = "plain"
        websocket = "allowed"
        [route.auth]
        forward = "http://{auth}/check"
        forward_response_headers = ["X-User"]
        {warmup}
        "#,
        warmup = warmup_config().await,
        ws = backend.addr,
        plain = plain.addr,
        auth = auth.addr,
    );
    let proxy = start_proxy(&toml).await;
    Setup {
        auth,
        backend,
        plain,
        proxy,
        _down: down_socket,
    }
}

async fn forward_auth_allow_copies_listed_headers_and_sees_the_clients_credentials(
    path: UpgradePath,
) {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    let (head, _) = upgrade_via(
        path,
        addr,
        "/fa/room?case=allow&x=1",
        &[
            ("Origin", "https://app.edge.test"),
            ("Cookie", "sid=abc123; theme=dark"),
            ("Authorization", "Basic dXNlcjpwYXNz"),
            ("X-User", "mallory"),
            ("X-Other", "client-value"),
        ],
    )
    .await;
    assert_eq!(head.status, 101, "{:?}", head.headers);

    let asked = setup.auth.next_request().await;
    assert_eq!(asked.method, "GET");
    assert_eq!(asked.uri, "/check");
    assert_eq!(asked.one("x-forwarded-method").as_deref(), Some("GET"));
    assert_eq!(
        asked.one("x-forwarded-uri").as_deref(),
        Some("/fa/room?case=allow&x=1")
    );
    assert_eq!(
        asked.one("origin").as_deref(),
        Some("https://app.edge.test")
    );
    assert_eq!(
        asked.one("cookie").as_deref(),
        Some("sid=abc123; theme=dark")
    );
    assert_eq!(
        asked.one("authorization").as_deref(),
        Some("Basic dXNlcjpwYXNz")
    );
    // The subrequest is not an upgrade and carries no WebSocket key.
    assert_eq!(asked.one("upgrade"), None);
    assert_eq!(asked.one("sec-websocket-key"), None);

    let seen = setup.backend.next_request().await;
    assert_eq!(seen.uri, "/fa/room?case=allow&x=1");
    assert_eq!(
        seen.all("x-user"),
        ["alice"],
        "only the auth service's X-User"
    );
    assert_eq!(
        seen.all("x-other"),
        ["client-value"],
        "unlisted auth headers are not copied"
    );
    assert_eq!(
        seen.one("cookie").as_deref(),
        Some("sid=abc123; theme=dark")
    );

    // A 2xx without X-User: the client's copy still never passes.
    let (head, _) = upgrade_via(path, addr, "/fa?case=anon", &[("X-User", "mallory")]).await;
    assert_eq!(head.status, 101);
    setup.auth.next_request().await;
    assert_eq!(
        setup.backend.next_request().await.all("x-user"),
        Vec::<String>::new()
    );

    // The origin check still runs before the auth service is asked.
    let (head, body) = upgrade_via(
        path,
        addr,
        "/fa?case=allow",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_reject(&head, &body, 403, "origin-forbidden");
    setup.auth.assert_idle();
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn forward_auth_401_and_403_are_relayed_with_their_bodies(path: UpgradePath) {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    for (case, status, body_text) in [
        ("deny401", 401, "please log in"),
        ("deny403", 403, "not your room"),
    ] {
        let (head, body) = upgrade_via(
            path,
            addr,
            &format!("/fa?case={case}"),
            &[("Cookie", "sid=expired")],
        )
        .await;
        assert_eq!(head.status, status, "{case}: {:?}", head.headers);
        assert_eq!(header_values(&head, "wsgate-reason"), ["auth-denied"]);
        assert_eq!(body, body_text, "{case}");
        let challenge: &[&str] = if status == 401 {
            &["Cookie realm=\"app\""]
        } else {
            &[]
        };
        assert_eq!(
            header_values(&head, "www-authenticate"),
            challenge,
            "{case}: the auth service's challenge is relayed"
        );
        let asked = setup.auth.next_request().await;
        assert_eq!(asked.one("cookie").as_deref(), Some("sid=expired"));
    }
    // Plain HTTP is relayed the same way.
    let (head, body, _) = send_via(
        path,
        addr,
        &plain_request("GET", "/fa-plain?case=deny403", &[]),
    )
    .await;
    assert_eq!((head.status, body.as_str()), (403, "not your room"));
    assert_eq!(header_values(&head, "wsgate-reason"), ["auth-denied"]);
    setup.auth.next_request().await;

    setup.plain.assert_idle();
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn forward_auth_timeout_is_503_auth_unavailable(path: UpgradePath) {
    let mut setup = setup().await;
    let mut stream = open_via(path, setup.proxy.addr()).await;
    let started = std::time::Instant::now();
    let (head, body) = send_on(
        &mut stream,
        upgrade_request("/fa-slow?case=slow", "edge.test", &[]).as_bytes(),
    )
    .await;
    assert_reject(&head, &body, 503, "auth-unavailable");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "answered before the timeout: {:?}",
        started.elapsed()
    );
    assert!(body.contains("did not answer within 300ms"), "{body}");
    setup.auth.next_request().await;
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn forward_auth_down_is_503_auth_unavailable(path: UpgradePath) {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    for _ in 0..2 {
        let (head, body) = upgrade_via(path, addr, "/fa-down", &[]).await;
        assert_reject(&head, &body, 503, "auth-unavailable");
        assert!(body.contains("unreachable"), "{body}");
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

async fn forward_auth_answers_other_than_2xx_401_403_are_503(path: UpgradePath) {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    for (case, status) in [("teapot", "418"), ("redirect", "302"), ("error", "500")] {
        let (head, body) = upgrade_via(path, addr, &format!("/fa?case={case}"), &[]).await;
        assert_reject(&head, &body, 503, "auth-unavailable");
        assert!(body.contains(status), "{case}: {body}");
        setup.auth.next_request().await;
    }
    assert_backend_idle(&mut setup.backend);
    setup.proxy.stop().await;
}

#[tokio::test]
async fn forward_auth_checks_plain_http_and_reuses_its_connections() {
    let mut setup = setup().await;
    let addr = setup.proxy.addr();
    let mut stream = connect(addr).await;
    for method in ["GET", "POST", "GET"] {
        let (head, body) = send_on(
            &mut stream,
            plain_request(method, "/fa-plain/x?case=allow", &[("X-User", "mallory")]).as_bytes(),
        )
        .await;
        assert_eq!((head.status, body.as_str()), (200, "plain ok"), "{method}");
        let asked = setup.auth.next_request().await;
        assert_eq!(asked.method, "GET", "the subrequest is always a GET");
        assert_eq!(asked.one("x-forwarded-method").as_deref(), Some(method));
        assert_eq!(
            asked.one("x-forwarded-uri").as_deref(),
            Some("/fa-plain/x?case=allow")
        );
        let seen = setup.plain.next_request().await;
        assert_eq!(seen.method, method);
        assert_eq!(seen.all("x-user"), ["alice"]);
    }
    assert_eq!(
        setup.auth.connections.load(Ordering::SeqCst),
        1,
        "three sequential checks should share one pooled connection"
    );
    drop(stream);
    setup.proxy.stop().await;
}

/// The auth service is told where the request went (`X-Forwarded-Host`,
/// `X-Forwarded-Proto`); from an untrusted peer those must be the proxy's own
/// values, as they are for the backend — an auth service such as Authelia
/// picks its access rule by `X-Forwarded-Host`.
async fn forward_auth_never_sees_forwarding_headers_forged_by_an_untrusted_client(
    path: UpgradePath,
) {
    let mut setup = setup().await;
    let (head, _) = upgrade_via(
        path,
        setup.proxy.addr(),
        "/fa?case=allow",
        &[
            ("X-Forwarded-Host", "admin.internal"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    assert_eq!(head.status, 101);
    let asked = setup.auth.next_request().await;
    assert_eq!(asked.all("x-forwarded-host"), ["edge.test"]);
    assert_eq!(asked.all("x-forwarded-proto"), ["http"]);
    // The backend gets the corrected values already.
    let seen = setup.backend.next_request().await;
    assert_eq!(seen.all("x-forwarded-host"), ["edge.test"]);
    assert_eq!(seen.all("x-forwarded-proto"), ["http"]);
    setup.proxy.stop().await;
}
