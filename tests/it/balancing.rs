//! Balancing and health end to end: per-request server choice for plain
//! HTTP under every `balance`, consistent hashing with bounded load (the
//! same mapping on two proxies), sticky cookies on plain responses and on
//! the 101 of both upgrade paths, plaintext and TLS, and passive health with
//! its gauge. Which server served a request is read off the backends' own
//! request channels: each reports a request before it answers, so once the
//! client has the answer, exactly one backend has reported it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use crate::common::*;

/// A sticky cookie value: 16 hex digits of XXH3-64 of the server's
/// `host:port` as configured.
fn cookie_value(server: SocketAddr) -> String {
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(server.to_string().as_bytes())
    )
}

fn set_cookie(server: SocketAddr, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!(
        "srv={}; Path=/; HttpOnly; SameSite=Lax{secure}",
        cookie_value(server)
    )
}

/// The one backend that saw a request since the last call (health checks
/// aside).
fn served(channels: &mut [&mut mpsc::UnboundedReceiver<SeenRequest>]) -> usize {
    let mut hits = Vec::new();
    for (index, channel) in channels.iter_mut().enumerate() {
        while let Ok(seen) = channel.try_recv() {
            if seen.uri != "/healthz" {
                hits.push(index);
            }
        }
    }
    assert_eq!(hits.len(), 1, "backends that saw the request: {hits:?}");
    hits[0]
}

fn served_raw(channels: &mut [&mut mpsc::UnboundedReceiver<String>]) -> usize {
    let mut hits = Vec::new();
    for (index, channel) in channels.iter_mut().enumerate() {
        while channel.try_recv().is_ok() {
            hits.push(index);
        }
    }
    assert_eq!(hits.len(), 1, "backends that saw the request: {hits:?}");
    hits[0]
}

fn list(servers: &[SocketAddr]) -> String {
    servers
        .iter()
        .map(|server| format!("\"{server}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One listener (plaintext) and an admin listener, one upstream `u` with
/// `upstream_extra`, one route for everything.
async fn proxy(servers: &[SocketAddr], upstream_extra: &str) -> TestProxy {
    start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [upstream.u]
        servers = [{servers}]
        {upstream_extra}
        [[route]]
        name = "all"
        path = "/"
        upstream = "u"
        missing_origin = "allow"
        "#,
        servers = list(servers)
    ))
    .await
}

async fn origins(count: usize) -> Vec<HttpOrigin> {
    let mut origins = Vec::new();
    for _ in 0..count {
        origins.push(spawn_http_origin().await);
    }
    origins
}

fn addrs(origins: &[HttpOrigin]) -> Vec<SocketAddr> {
    origins.iter().map(|origin| origin.addr).collect()
}

fn channels(origins: &mut [HttpOrigin]) -> Vec<&mut mpsc::UnboundedReceiver<SeenRequest>> {
    origins.iter_mut().map(|origin| &mut origin.seen).collect()
}

/// A plain GET on a fresh connection, with extra header lines.
async fn get(proxy: SocketAddr, extra: &str) -> Head {
    let (head, _, _) = exchange(
        proxy,
        &format!("GET /x HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(head.status, 200, "{:?}", head.headers);
    head
}

#[tokio::test]
async fn round_robin_picks_per_request_from_fresh_client_connections() {
    let mut origins = origins(3).await;
    let proxy = proxy(&addrs(&origins), "balance = \"round_robin\"").await;
    let mut order = Vec::new();
    for _ in 0..9 {
        get(proxy.addr(), "").await;
        order.push(served(&mut channels(&mut origins)));
    }
    // Each origin keeps its pooled connection, and the next request still
    // goes where the balancer says.
    assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
}

#[tokio::test]
async fn round_robin_picks_per_request_on_one_keep_alive_connection() {
    let mut origins = origins(3).await;
    let proxy = proxy(&addrs(&origins), "").await;
    let mut client = connect(proxy.addr()).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut client, "GET").await;
        assert_eq!(head.status, 200);
        order.push(served(&mut channels(&mut origins)));
    }
    assert_eq!(order, [0, 1, 2, 0, 1, 2]);
}

#[tokio::test]
async fn round_robin_spreads_concurrent_requests_exactly() {
    let mut origins = origins(3).await;
    let proxy = proxy(&addrs(&origins), "balance = \"round_robin\"").await;
    let addr = proxy.addr();
    let requests: Vec<_> = (0..9)
        .map(|_| tokio::spawn(async move { get(addr, "").await.status }))
        .collect();
    for request in requests {
        assert_eq!(within("a response", request).await.unwrap(), 200);
    }
    let counts: Vec<usize> = origins
        .iter_mut()
        .map(|origin| {
            let mut count = 0;
            while origin.seen.try_recv().is_ok() {
                count += 1;
            }
            count
        })
        .collect();
    assert_eq!(counts, [3, 3, 3]);
}

/// A backend that holds every plain request until a permit is added, then
/// answers `200 ok`; it reports each request as it arrives.
async fn spawn_holding_origin() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<String>,
    std::sync::Arc<Semaphore>,
) {
    let release = std::sync::Arc::new(Semaphore::new(0));
    let permits = release.clone();
    let (addr, seen) = spawn_raw_ws(move |mut stream, _| {
        let permits = permits.clone();
        async move {
            if let Ok(permit) = permits.acquire().await {
                permit.forget();
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            }
        }
    })
    .await;
    (addr, seen, release)
}

#[tokio::test]
async fn least_conn_counts_plain_requests_in_flight() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(spawn_holding_origin().await);
    }
    let servers: Vec<SocketAddr> = backends.iter().map(|(addr, _, _)| *addr).collect();
    let proxy = proxy(&servers, "balance = \"least_conn\"").await;
    let addr = proxy.addr();
    let send = || tokio::spawn(async move { get(addr, "").await.status });
    // One at a time, each held at its backend before the next is sent, so
    // each choice sees the ones before it.
    let mut held = Vec::new();
    let mut order = Vec::new();
    for _ in 0..3 {
        held.push(send());
        let mut seen = None;
        until("a backend to hold the request", || {
            let hit = backends
                .iter_mut()
                .position(|(_, channel, _)| channel.try_recv().is_ok());
            seen = seen.or(hit);
            std::future::ready(seen.is_some())
        })
        .await;
        order.push(seen.unwrap());
    }
    assert_eq!(order, [0, 1, 2], "ties go round");
    // Server 1 answers: it is the only one with nothing in flight, where
    // round robin would go on to server 0.
    backends[1].2.add_permits(1);
    let answered = within("the released request", held.remove(1)).await;
    assert_eq!(answered.unwrap(), 200);
    let next = send();
    let mut seen = None;
    until("a backend to hold the request", || {
        let hit = backends
            .iter_mut()
            .position(|(_, channel, _)| channel.try_recv().is_ok());
        seen = seen.or(hit);
        std::future::ready(seen.is_some())
    })
    .await;
    assert_eq!(seen, Some(1));
    for (_, _, release) in &backends {
        release.add_permits(8);
    }
    for request in held.into_iter().chain([next]) {
        assert_eq!(within("a response", request).await.unwrap(), 200);
    }
}

#[tokio::test]
async fn hash_sends_one_user_to_one_backend_over_many_upgrades() {
    // Two servers: with at most one earlier tunnel still closing, the bound
    // (two of two) never moves a key.
    let mut backends = [spawn_ws_echo().await, spawn_ws_echo().await];
    let servers = [backends[0].addr, backends[1].addr];
    let proxy = proxy(&servers, "balance = \"hash\"\nhash_key = \"header:x-user\"").await;
    let mut used = [false; 2];
    for user in 0..20 {
        let user = format!("user-{user}");
        let mut first = None;
        for _ in 0..3 {
            let (ws, response) = ws_connect(proxy.addr(), "/chat", &[("X-User", &user)])
                .await
                .unwrap();
            assert_eq!(response.status(), 101);
            let index = served(&mut backends.iter_mut().map(|b| &mut b.seen).collect::<Vec<_>>());
            assert_eq!(*first.get_or_insert(index), index, "{user} moved");
            used[index] = true;
            let mut ws = ws;
            ws.close(None).await.unwrap();
            drain_ws(ws).await;
        }
    }
    assert_eq!(used, [true, true], "twenty users all on one server");
}

#[tokio::test]
async fn two_proxies_with_the_same_servers_map_100_keys_identically() {
    let mut origins = origins(3).await;
    let servers = addrs(&origins);
    let hash = "balance = \"hash\"\nhash_key = \"header:x-user\"";
    let one = proxy(&servers, hash).await;
    // The same servers listed in another order: servers are known by
    // name, not by place.
    let reversed: Vec<SocketAddr> = servers.iter().rev().copied().collect();
    let two = proxy(&reversed, hash).await;
    let mut counts = [0; 3];
    for key in 0..100 {
        let header = format!("X-User: key-{key}\r\n");
        get(one.addr(), &header).await;
        let here = served(&mut channels(&mut origins));
        get(two.addr(), &header).await;
        let there = served(&mut channels(&mut origins));
        assert_eq!(here, there, "key-{key}");
        counts[here] += 1;
    }
    assert!(counts.iter().all(|&count| count > 10), "{counts:?}");
}

#[tokio::test]
async fn a_request_without_the_hash_key_falls_back_to_least_conn() {
    let mut origins = origins(3).await;
    let proxy = proxy(
        &addrs(&origins),
        "balance = \"hash\"\nhash_key = \"query:room\"",
    )
    .await;
    let mut keyless = Vec::new();
    for _ in 0..3 {
        get(proxy.addr(), "").await;
        keyless.push(served(&mut channels(&mut origins)));
    }
    // Nothing in flight: least_conn's ties go round.
    assert_eq!(keyless, [0, 1, 2]);
    let mut keyed = Vec::new();
    for _ in 0..3 {
        let (head, _, _) = exchange(
            proxy.addr(),
            "GET /x?a=1&room=lobby HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(head.status, 200);
        keyed.push(served(&mut channels(&mut origins)));
    }
    assert!(keyed.iter().all(|&index| index == keyed[0]), "{keyed:?}");
}

#[tokio::test]
async fn client_ip_hash_uses_the_client_ip_wsgate_determined() {
    let mut origins = origins(3).await;
    let servers = list(&addrs(&origins));
    let trusting = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        trusted_proxies = ["127.0.0.1/32"]
        [upstream.u]
        servers = [{servers}]
        balance = "hash"
        [[route]]
        path = "/"
        upstream = "u"
        "#
    ))
    .await;
    let untrusting = proxy(&addrs(&origins), "balance = \"hash\"").await;
    let mut used = [false; 3];
    for client in 1..=30 {
        let header = format!("X-Forwarded-For: 192.0.2.{client}\r\n");
        get(trusting.addr(), &header).await;
        let first = served(&mut channels(&mut origins));
        get(trusting.addr(), &header).await;
        assert_eq!(served(&mut channels(&mut origins)), first);
        used[first] = true;
    }
    assert_eq!(used, [true; 3], "thirty client IPs on fewer servers");
    // From an untrusted peer the header is not believed: every request is
    // 127.0.0.1's.
    get(untrusting.addr(), "").await;
    let peer = served(&mut channels(&mut origins));
    for client in 1..=10 {
        get(
            untrusting.addr(),
            &format!("X-Forwarded-For: 192.0.2.{client}\r\n"),
        )
        .await;
        assert_eq!(served(&mut channels(&mut origins)), peer);
    }
}

#[tokio::test]
async fn one_key_never_holds_more_than_its_bounded_share_of_tunnels() {
    let mut backends = [spawn_ws_echo().await, spawn_ws_echo().await];
    let servers = [backends[0].addr, backends[1].addr];
    let proxy = proxy(&servers, "balance = \"hash\"\nhash_key = \"header:x-user\"").await;
    let mut open = Vec::new();
    let mut order = Vec::new();
    for _ in 0..8 {
        let (ws, response) = ws_connect(proxy.addr(), "/chat", &[("X-User", "everyone")])
            .await
            .unwrap();
        assert_eq!(response.status(), 101);
        order.push(served(
            &mut backends.iter_mut().map(|b| &mut b.seen).collect::<Vec<_>>(),
        ));
        open.push(ws);
    }
    // The key's server takes the m-th tunnel while it holds fewer than
    // ⌈1.25 · m / 2⌉: 1, 2, 2, 3, 4, 4, 5, 5; the rest go to the other.
    let home = order[0];
    let expected: Vec<usize> = [0, 0, 1, 0, 0, 1, 0, 1]
        .iter()
        .map(|&other| if other == 0 { home } else { 1 - home })
        .collect();
    assert_eq!(order, expected);
    for mut ws in open {
        ws.close(None).await.unwrap();
        drain_ws(ws).await;
    }
}

#[tokio::test]
async fn sticky_cookie_is_set_on_plain_responses_and_honoured() {
    let mut origins = origins(3).await;
    let servers = addrs(&origins);
    let proxy = proxy(&servers, "sticky_cookie = \"srv\"").await;
    let head = get(proxy.addr(), "").await;
    assert_eq!(served(&mut channels(&mut origins)), 0);
    assert_eq!(
        head.all("set-cookie").collect::<Vec<_>>(),
        [set_cookie(servers[0], false)]
    );
    // A cookie naming server 2 beats round robin, and is not set again.
    let cookie = format!("Cookie: theme=dark; srv={}\r\n", cookie_value(servers[2]));
    for _ in 0..4 {
        let head = get(proxy.addr(), &cookie).await;
        assert_eq!(served(&mut channels(&mut origins)), 2);
        assert_eq!(head.get("set-cookie"), None, "{:?}", head.headers);
    }
    let head = get(
        proxy.addr(),
        &format!("Cookie: srv={}\r\n", cookie_value(servers[1])),
    )
    .await;
    assert_eq!(head.get("set-cookie"), None);
    assert_eq!(served(&mut channels(&mut origins)), 1);
}

/// A backend that switches upgrades (101 with the right accept key, then
/// holds the connection) and answers anything else `200 ok`, closing.
async fn spawn_switching_backend() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    spawn_raw_ws(|mut stream, head| async move {
        if head.to_ascii_lowercase().contains("upgrade: websocket") {
            let answer = switching_protocols(&head, &[("X-Backend", "yes")]);
            let _ = stream.write_all(answer.as_bytes()).await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut sink)).await;
        } else {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    })
    .await
}

#[tokio::test]
async fn sticky_cookie_is_set_on_the_101_of_both_upgrade_paths() {
    let mut backends = [
        spawn_switching_backend().await,
        spawn_switching_backend().await,
    ];
    let servers = [backends[0].0, backends[1].0];
    let proxy = proxy(&servers, "sticky_cookie = \"srv\"").await;
    let mut seen = || served_raw(&mut backends.iter_mut().map(|b| &mut b.1).collect::<Vec<_>>());

    // Direct path: the connection's first request is the upgrade.
    let (head, _, _tunnel) = exchange(proxy.addr(), &upgrade_request("/ws", "app.test", &[])).await;
    assert_eq!(head.status, 101);
    let first = seen();
    assert_eq!(first, 0);
    assert_eq!(
        head.all("set-cookie").collect::<Vec<_>>(),
        [set_cookie(servers[0], false)]
    );
    assert_eq!(
        head.get("x-backend"),
        Some("yes"),
        "the backend's own fields stay"
    );
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some(accept_key("dGhlIHNhbXBsZSBub25jZQ==").as_str())
    );
    let cookie = format!("srv={}", cookie_value(servers[0]));
    let (head, _, _tunnel) = exchange(
        proxy.addr(),
        &upgrade_request("/ws", "app.test", &[("Cookie", &cookie)]),
    )
    .await;
    assert_eq!(head.status, 101);
    assert_eq!(seen(), 0, "the cookie beat round robin");
    assert_eq!(head.get("set-cookie"), None);

    // Through hyper: an upgrade after a plain request on one connection.
    let mut client = connect(proxy.addr()).await;
    client
        .write_all(b"GET /page HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut client, "GET").await;
    assert_eq!(head.status, 200);
    let plain = seen();
    assert_eq!(plain, 1);
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(servers[1], false).as_str())
    );
    client
        .write_all(upgrade_request("/ws", "app.test", &[]).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut client, "GET").await;
    assert_eq!(head.status, 101);
    assert_eq!(seen(), 0);
    assert_eq!(
        head.all("set-cookie").collect::<Vec<_>>(),
        [set_cookie(servers[0], false)]
    );
    assert_eq!(head.get("x-backend"), Some("yes"));

    let mut client = connect(proxy.addr()).await;
    client
        .write_all(b"GET /page HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let (_, _) = read_response(&mut client, "GET").await;
    let _ = seen();
    let cookie = format!("srv={}", cookie_value(servers[1]));
    client
        .write_all(upgrade_request("/ws", "app.test", &[("Cookie", &cookie)]).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut client, "GET").await;
    assert_eq!(head.status, 101);
    assert_eq!(seen(), 1);
    assert_eq!(head.get("set-cookie"), None);
}

#[tokio::test]
async fn sticky_cookie_is_secure_on_tls_listeners() {
    let (backend, mut seen) = spawn_switching_backend().await;
    let cert = test_cert(&["localhost"]);
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [upstream.u]
        servers = ["{backend}"]
        sticky_cookie = "srv"
        [[route]]
        path = "/"
        upstream = "u"
        missing_origin = "allow"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
    ))
    .await;
    let mut tls = tls_connect(proxy.addr(), "localhost", &cert.cert_pem).await;
    tls.write_all(b"GET /page HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut tls, "GET").await;
    assert_eq!((head.status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(backend, true).as_str())
    );
    within("the backend's report", seen.recv()).await.unwrap();

    let mut tls = tls_connect(proxy.addr(), "localhost", &cert.cert_pem).await;
    tls.write_all(upgrade_request("/ws", "localhost", &[]).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut tls, "GET").await;
    assert_eq!(head.status, 101);
    assert_eq!(
        head.all("set-cookie").collect::<Vec<_>>(),
        [set_cookie(backend, true)]
    );
}

#[tokio::test]
async fn a_cookie_naming_an_unknown_or_unavailable_server_gets_a_new_one() {
    let (_refusing, down) = refusing_port();
    let mut origins = origins(2).await;
    let servers = [down, origins[0].addr, origins[1].addr];
    let proxy = proxy(
        &servers,
        "sticky_cookie = \"srv\"\nmax_fails = 1\nfail_timeout = \"1h\"",
    )
    .await;
    let admin = proxy.admin.unwrap();
    // The index in `servers` of the origin that served the last request.
    let which = |origins: &mut Vec<HttpOrigin>| served(&mut channels(origins)) + 1;

    // Not one of ours: balanced as if absent, and a new cookie.
    let head = get(proxy.addr(), "Cookie: srv=0123456789abcdef\r\n").await;
    // Round robin began at the refusing server; the request fell through.
    assert_eq!(which(&mut origins), 1);
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(servers[1], false).as_str())
    );
    let down_labels = [
        ("upstream", "u"),
        ("server", &*down.to_string()),
        ("state", "down"),
    ];
    assert_eq!(
        admin_metric(admin, "wsgate_upstream_servers", &down_labels).await,
        1.0
    );

    // Naming the server now out of rotation: not tried, a new cookie.
    let stale = format!("Cookie: srv={}\r\n", cookie_value(down));
    let head = get(proxy.addr(), &stale).await;
    let served_by = which(&mut origins);
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(servers[served_by], false).as_str())
    );

    // Not a cookie value at all.
    let head = get(proxy.addr(), "Cookie: srv=zz\r\n").await;
    let served_by = which(&mut origins);
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(servers[served_by], false).as_str())
    );
}

#[tokio::test]
async fn a_cookie_naming_a_server_that_fails_its_health_check_gets_a_new_one() {
    let (_refusing, down) = refusing_port();
    let mut origin = spawn_http_origin().await;
    let proxy = proxy(
        &[down, origin.addr],
        "sticky_cookie = \"srv\"\nhealth_check = { path = \"/healthz\", interval = \"100ms\" }",
    )
    .await;
    let admin = proxy.admin.unwrap();
    let labels = [
        ("upstream", "u"),
        ("server", &*down.to_string()),
        ("state", "down"),
    ];
    metric_becomes(admin, "wsgate_upstream_servers", &labels, 1.0).await;
    let head = get(
        proxy.addr(),
        &format!("Cookie: srv={}\r\n", cookie_value(down)),
    )
    .await;
    assert_eq!(served(&mut [&mut origin.seen]), 0);
    assert_eq!(
        head.get("set-cookie"),
        Some(set_cookie(origin.addr, false).as_str())
    );
}

/// Answers each connection's one plain request `200 ok` and reports it.
async fn serve_plain(listener: tokio::net::TcpListener) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let _ = tx.send(head);
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    rx
}

#[tokio::test]
async fn a_refusing_server_goes_out_after_max_fails_and_is_tried_after_fail_timeout() {
    let (refusing, flaky) = refusing_port();
    let mut origin = spawn_http_origin().await;
    let proxy = proxy(
        &[flaky, origin.addr],
        "max_fails = 2\nfail_timeout = \"2s\"",
    )
    .await;
    let admin = proxy.admin.unwrap();
    let gauge = |state| server_state(admin, flaky, state);
    assert_eq!((gauge("up").await, gauge("down").await), (1.0, 0.0));

    // Round robin: the refusing server's turns fall through to the origin.
    get(proxy.addr(), "").await;
    assert_eq!(served(&mut [&mut origin.seen]), 0);
    assert_eq!(gauge("up").await, 1.0, "one failure of two");
    for _ in 0..2 {
        get(proxy.addr(), "").await;
        assert_eq!(served(&mut [&mut origin.seen]), 0);
    }
    assert_eq!((gauge("up").await, gauge("down").await), (0.0, 1.0));

    // Out of rotation: though it accepts now, it gets nothing.
    let mut flaky_seen = serve_plain(refusing.listen(64).unwrap()).await;
    for _ in 0..4 {
        get(proxy.addr(), "").await;
        assert_eq!(served(&mut [&mut origin.seen]), 0);
    }
    assert_eq!(
        gauge("down").await,
        1.0,
        "the requests above took longer than fail_timeout"
    );
    assert!(flaky_seen.try_recv().is_err());

    // After fail_timeout it is back, and its turn goes to it.
    let up = [
        ("upstream", "u"),
        ("server", &*flaky.to_string()),
        ("state", "up"),
    ];
    metric_becomes(admin, "wsgate_upstream_servers", &up, 1.0).await;
    assert_eq!(gauge("down").await, 0.0);
    get(proxy.addr(), "").await;
    get(proxy.addr(), "").await;
    within("the server back in rotation", flaky_seen.recv())
        .await
        .unwrap();
    assert_eq!(served(&mut [&mut origin.seen]), 0);
    assert_eq!(gauge("up").await, 1.0);
}

/// `wsgate_upstream_servers{upstream="u", server, state}`.
async fn server_state(admin: SocketAddr, server: SocketAddr, state: &str) -> f64 {
    let server = server.to_string();
    let labels = [
        ("upstream", "u"),
        ("server", server.as_str()),
        ("state", state),
    ];
    admin_metric(admin, "wsgate_upstream_servers", &labels).await
}

#[tokio::test]
async fn upgrade_answers_of_500_or_more_count_as_failures() {
    let (busy, mut seen) = spawn_raw_backend(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
    )
    .await;
    let proxy = proxy(&[busy], "max_fails = 2\nfail_timeout = \"1h\"").await;
    let admin = proxy.admin.unwrap();
    let busy_name = busy.to_string();
    let down = [
        ("upstream", "u"),
        ("server", busy_name.as_str()),
        ("state", "down"),
    ];
    for attempt in 1..=3 {
        let (head, body, _) =
            exchange(proxy.addr(), &upgrade_request("/ws", "app.test", &[])).await;
        assert_eq!((head.status, body.as_str()), (503, "busy"));
        // Out after two, but the only server, out by passive health alone:
        // still tried rather than refusing everyone for fail_timeout.
        within("the backend's report", seen.recv()).await.unwrap();
        let expected = if attempt >= 2 { 1.0 } else { 0.0 };
        assert_eq!(
            admin_metric(admin, "wsgate_upstream_servers", &down).await,
            expected
        );
    }
}

#[tokio::test]
async fn upgrade_refusals_below_500_are_no_failures() {
    let (picky, _seen) = spawn_raw_backend(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
    )
    .await;
    let proxy = proxy(&[picky], "max_fails = 1").await;
    let admin = proxy.admin.unwrap();
    let picky_name = picky.to_string();
    let up = [
        ("upstream", "u"),
        ("server", picky_name.as_str()),
        ("state", "up"),
    ];
    for _ in 0..2 {
        let (head, _, _) = exchange(proxy.addr(), &upgrade_request("/ws", "app.test", &[])).await;
        assert_eq!(head.status, 404);
    }
    assert_eq!(
        admin_metric(admin, "wsgate_upstream_servers", &up).await,
        1.0
    );
}
