//! `allow_ips` / `deny_ips` through a running proxy: IPv4, IPv6 and
//! IPv4-mapped peers, and the client IP that `trusted_proxies` establishes
//! from `X-Forwarded-For` (and never from an untrusted peer's header).

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::support::*;

on_both_paths!(
    ip_allow_and_deny_lists_for_an_ipv4_client,
    ip_allow_and_deny_lists_for_an_ipv6_client,
    ip_v4_mapped_peer_is_compared_as_ipv4,
    ip_from_a_trusted_proxys_x_forwarded_for_is_the_client_ip,
    ip_in_x_forwarded_for_from_an_untrusted_peer_is_ignored,
    ip_v4_mapped_cidr_in_deny_ips_denies_the_ipv4_client,
);

/// One route per policy, all on the echo backend, no origin needed; plus the
/// warm-up route, which has no IP policy, so the plain request before a
/// hyper-path upgrade is answered whatever the client address.
async fn config(listener: &str, backend: SocketAddr, server_extra: &str) -> String {
    let route = |path: &str, policy: &str| {
        format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"echo\"\nmissing_origin = \"allow\"\n{policy}\n"
        )
    };
    [
        format!(
            "[[listener]]\naddr = \"{listener}\"\n[server]\ndrain_timeout = \"1s\"\n{server_extra}\n\
             [upstream.echo]\nservers = [\"{backend}\"]\n"
        ),
        route("/open", ""),
        route("/loopback4", "allow_ips = [\"127.0.0.1/32\"]"),
        route("/ten", "allow_ips = [\"10.0.0.0/8\"]"),
        route("/loopback6", "allow_ips = [\"::1/128\"]"),
        route("/any", "allow_ips = [\"0.0.0.0/0\", \"::/0\"]"),
        route(
            "/allow-then-deny",
            "allow_ips = [\"127.0.0.0/8\", \"::1/128\"]\ndeny_ips = [\"127.0.0.1/32\", \"::1/128\"]",
        ),
        route("/deny-only", "deny_ips = [\"10.0.0.0/8\", \"fd00::/8\"]"),
        route("/deny-loopback", "deny_ips = [\"127.0.0.0/8\"]"),
        route("/doc", "allow_ips = [\"203.0.113.0/24\"]"),
        route("/doc-denied", "deny_ips = [\"203.0.113.9\"]"),
        route("/mapped-deny", "deny_ips = [\"::ffff:127.0.0.0/104\"]"),
        warmup_config().await,
    ]
    .concat()
}

/// Expects a 101 and returns what the backend saw.
async fn allowed(
    via: UpgradePath,
    addr: SocketAddr,
    backend: &mut WsBackend,
    path: &str,
    extra: &[(&str, &str)],
) -> SeenRequest {
    let (head, body) = upgrade_via(via, addr, path, extra).await;
    assert_eq!(head.status, 101, "{via}, {path} {extra:?}: {body}");
    backend.next_request().await
}

async fn forbidden(
    via: UpgradePath,
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    ip: &str,
) {
    let (head, body) = upgrade_via(via, addr, path, extra).await;
    assert_eq!(
        (head.status, head.get("wsgate-reason")),
        (403, Some("ip-forbidden")),
        "{via}, {path} {extra:?}: {body}"
    );
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert!(
        body.contains(&format!("client address {ip} ")),
        "{via}, {path}: body should name {ip}: {body}"
    );
}

async fn ip_allow_and_deny_lists_for_an_ipv4_client(via: UpgradePath) {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config("127.0.0.1:0", backend.addr, "").await).await;
    let addr = proxy.addr();
    for path in ["/open", "/loopback4", "/any", "/deny-only", "/doc-denied"] {
        let seen = allowed(via, addr, &mut backend, path, &[]).await;
        assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
    }
    for path in [
        "/ten",
        "/loopback6",
        "/allow-then-deny",
        "/deny-loopback",
        "/doc",
    ] {
        forbidden(via, addr, path, &[], "127.0.0.1").await;
    }
    // Plain HTTP is held to the same list (and never reaches the backend).
    let (head, body, _) = send_via(via, addr, &plain_request("GET", "/ten", &[])).await;
    assert_reject(&head, &body, 403, "ip-forbidden");
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

async fn ip_allow_and_deny_lists_for_an_ipv6_client(via: UpgradePath) {
    let probe = TcpListener::bind("[::1]:0").await;
    if let Err(error) = probe {
        println!("note: IPv6 loopback unavailable ({error}); skipping the IPv6 allowlist test");
        return;
    }
    drop(probe);
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config("[::1]:0", backend.addr, "").await).await;
    let addr = proxy.addr();
    assert!(addr.is_ipv6());
    for path in [
        "/open",
        "/loopback6",
        "/any",
        "/deny-only",
        "/deny-loopback",
    ] {
        let seen = allowed(via, addr, &mut backend, path, &[]).await;
        assert_eq!(seen.one("x-real-ip").as_deref(), Some("::1"));
        assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("::1"));
        assert_eq!(
            seen.one("forwarded").as_deref(),
            Some("for=\"[::1]\";proto=http;host=edge.test")
        );
    }
    for path in ["/loopback4", "/ten", "/allow-then-deny", "/doc"] {
        forbidden(via, addr, path, &[], "::1").await;
    }
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

async fn ip_v4_mapped_peer_is_compared_as_ipv4(via: UpgradePath) {
    let mut backend = spawn_ws_echo().await;
    // A dual-stack listener: a connection to 127.0.0.1 arrives as ::ffff:127.0.0.1.
    let Ok(probe) = TcpListener::bind("[::]:0").await else {
        println!("note: no IPv6 wildcard listener here; skipping the v4-mapped test");
        return;
    };
    let port = probe.local_addr().unwrap().port();
    let mapped = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => probe.accept().await.map(|(_, peer)| peer.ip()).ok(),
        Err(_) => None,
    };
    drop(probe);
    match mapped {
        Some(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {}
        other => {
            println!(
                "note: [::]:0 is not dual-stack here (peer {other:?}); skipping the v4-mapped test"
            );
            return;
        }
    }
    let proxy = start_proxy(
        &config(
            "[::]:0",
            backend.addr,
            "trusted_proxies = [\"127.0.0.1/32\"]",
        )
        .await,
    )
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], proxy.addr().port()).into();
    for path in ["/open", "/loopback4", "/any", "/deny-only"] {
        let seen = allowed(via, addr, &mut backend, path, &[]).await;
        assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
        assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            seen.one("forwarded").as_deref(),
            Some("for=127.0.0.1;proto=http;host=edge.test")
        );
    }
    for path in ["/loopback6", "/ten", "/allow-then-deny", "/deny-loopback"] {
        forbidden(via, addr, path, &[], "127.0.0.1").await;
    }
    // The mapped peer counts as the trusted 127.0.0.1 for X-Forwarded-For.
    let xff = [("X-Forwarded-For", "203.0.113.9")];
    let seen = allowed(via, addr, &mut backend, "/doc", &xff).await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("203.0.113.9"));
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

async fn ip_from_a_trusted_proxys_x_forwarded_for_is_the_client_ip(via: UpgradePath) {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(
        &config(
            "127.0.0.1:0",
            backend.addr,
            "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]",
        )
        .await,
    )
    .await;
    let addr = proxy.addr();

    let seen = allowed(
        via,
        addr,
        &mut backend,
        "/doc",
        &[("X-Forwarded-For", "203.0.113.9")],
    )
    .await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("203.0.113.9"));
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    // The right-most untrusted entry counts; trusted hops are skipped.
    let chain = [("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 10.1.2.3")];
    let seen = allowed(via, addr, &mut backend, "/doc", &chain).await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("203.0.113.9"));
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("198.51.100.1, 203.0.113.9, 10.1.2.3, 127.0.0.1")
    );
    // An address before that is not the client, so cannot buy its way in.
    let spoof = [("X-Forwarded-For", "203.0.113.9, 198.51.100.1")];
    forbidden(via, addr, "/doc", &spoof, "198.51.100.1").await;
    // deny_ips applies to the forwarded client as well.
    forbidden(
        via,
        addr,
        "/doc-denied",
        &[("X-Forwarded-For", "203.0.113.9")],
        "203.0.113.9",
    )
    .await;
    // Without the header the trusted peer is the client.
    forbidden(via, addr, "/doc", &[], "127.0.0.1").await;
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

async fn ip_in_x_forwarded_for_from_an_untrusted_peer_is_ignored(via: UpgradePath) {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config("127.0.0.1:0", backend.addr, "").await).await;
    let addr = proxy.addr();
    let xff = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
    ];
    forbidden(via, addr, "/doc", &xff, "127.0.0.1").await;
    let seen = allowed(via, addr, &mut backend, "/doc-denied", &xff).await;
    assert_eq!(seen.one("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=edge.test")
    );
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}

/// `deny_ips = ["::ffff:127.0.0.0/104"]` names 127.0.0.0/8 in IPv4-mapped form.
/// Clients are compared as IPv4, so a mapped CIDR in the config never matches
/// anything: a deny list written that way silently lets everyone in.
async fn ip_v4_mapped_cidr_in_deny_ips_denies_the_ipv4_client(via: UpgradePath) {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config("127.0.0.1:0", backend.addr, "").await).await;
    forbidden(via, proxy.addr(), "/mapped-deny", &[], "127.0.0.1").await;
    assert_backend_idle(&mut backend);
    proxy.stop().await;
}
