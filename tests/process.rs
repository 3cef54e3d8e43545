//! The real binary as a real process: `wsgate run`, SIGHUP reloads (good and
//! bad), SIGTERM drain. Listeners bind port 0; the test learns the ports from
//! the "listening" log lines.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::WsgateProcess;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn config_text(backend: SocketAddr, origin: &str, drain: &str, threads: usize) -> String {
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"

[server]
drain_timeout = "{drain}"
worker_threads = {threads}

[upstream.echo]
servers = ["{backend}"]

[[route]]
path = "/ws"
upstream = "echo"
origins = ["{origin}"]
"#
    )
}

async fn handshake_status(addr: SocketAddr, origin: &str) -> u16 {
    match ws_connect(addr, "/ws", &[("Origin", origin)]).await {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("handshake failed without a status: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_refuses_a_bad_one_and_keeps_tunnels() {
    let backend = spawn_ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        config_text(backend.addr, "https://old.example.com", "5s", 0),
    )
    .unwrap();
    let mut wsgate = WsgateProcess::start(&path, &[], "info");
    let addr = wsgate.listening_addr();

    assert_eq!(handshake_status(addr, "https://old.example.com").await, 101);
    let (mut established, _) = ws_connect(addr, "/ws", &[("Origin", "https://old.example.com")])
        .await
        .unwrap();

    std::fs::write(
        &path,
        config_text(backend.addr, "https://new.example.com", "5s", 0),
    )
    .unwrap();
    wsgate.signal("HUP");
    wsgate.wait_for_line("configuration reloaded");
    assert_eq!(handshake_status(addr, "https://new.example.com").await, 101);
    assert_eq!(handshake_status(addr, "https://old.example.com").await, 403);

    // A broken file must not take the running config down.
    std::fs::write(
        &path,
        "[[listener]]\naddr = \"127.0.0.1:0\"\ntypo_key = true\n",
    )
    .unwrap();
    wsgate.signal("HUP");
    let refused = wsgate.wait_for_line("reload refused");
    assert!(refused.contains("typo_key"), "{refused}");
    assert_eq!(handshake_status(addr, "https://new.example.com").await, 101);

    // The tunnel opened before both reloads still works.
    established.send(Message::text("still here")).await.unwrap();
    let echoed = within("echo on the old tunnel", established.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("still here"));
    established.close(None).await.unwrap();
    drop(established);

    wsgate.signal("TERM");
    assert_eq!(wsgate.wait_exit(), Some(0));
}

/// Signals caught by the process (`SigCgt` in /proc), as a bit mask in
/// which signal n is bit n - 1.
fn caught_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SigCgt line in:\n{status}"))
}

/// A SIGHUP or SIGTERM sent the moment "listening" appears must reach its
/// handler, not the default action that would end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_handlers_are_in_place_before_the_listening_line() {
    const SIGHUP: u64 = 1 << (1 - 1);
    const SIGINT: u64 = 1 << (2 - 1);
    const SIGTERM: u64 = 1 << (15 - 1);
    let backend = spawn_ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        config_text(backend.addr, "https://app.example.com", "5s", 1),
    )
    .unwrap();
    let mut wsgate = WsgateProcess::start(&path, &[], "info");
    wsgate.listening_addr();
    let caught = caught_signals(wsgate.child.id());
    assert_eq!(
        caught & (SIGHUP | SIGINT | SIGTERM),
        SIGHUP | SIGINT | SIGTERM,
        "caught mask {caught:x}"
    );
    wsgate.signal("HUP");
    wsgate.wait_for_line("configuration reloaded");
    wsgate.signal("TERM");
    assert_eq!(wsgate.wait_exit(), Some(0));
}

/// SIGTERM: listeners close, the open tunnel gets Close 1012 (Service
/// Restart: reconnect), and the process exits 0 as soon as its closing
/// handshake has ended, not at drain_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_close_1012_and_exits_when_the_tunnels_end() {
    let backend = spawn_ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    // One thread: the current-thread runtime must drain the same way.
    std::fs::write(
        &path,
        config_text(backend.addr, "https://app.example.com", "20s", 1),
    )
    .unwrap();
    let mut wsgate = WsgateProcess::start(&path, &[], "info");
    let addr = wsgate.listening_addr();
    let (mut tunnel, _) = ws_connect(addr, "/ws", &[("Origin", "https://app.example.com")])
        .await
        .unwrap();

    let signalled = Instant::now();
    wsgate.signal("TERM");
    wsgate.wait_for_line("no new connections");
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    let close = within("the drain's Close", async {
        for _ in 0..10 {
            match tunnel.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("the tunnel ended without a Close: {other:?}"),
            }
        }
        panic!("no Close among the first 10 messages")
    })
    .await;
    let close = close.expect("a Close with a code");
    assert_eq!(u16::from(close.code), 1012);
    assert_eq!(close.reason.as_str(), "service restart");
    drain_ws(tunnel).await;
    assert_eq!(wsgate.wait_exit(), Some(0));
    let elapsed = signalled.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "exited after {elapsed:?}: waited for drain_timeout although the tunnel had closed"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(usize::MAX)
}

/// How many health checks `origin` saw from now until `count` more arrived,
/// and how long that took.
async fn time_for_health_checks(origin: &mut HttpOrigin, count: usize) -> Duration {
    while origin.seen.try_recv().is_ok() {}
    let started = Instant::now();
    let mut checks = 0;
    while checks < count {
        let seen = origin.next_request().await;
        if seen.uri == "/healthz" {
            checks += 1;
        }
    }
    started.elapsed()
}

/// Each SIGHUP builds a new generation of upstream pools and health-check
/// loops; once nothing uses the old generation, its loops must stop and its
/// pooled connections close. Before the fix every reload left both behind: a
/// pooled connection held its upstream, which held the pool it sat in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_leave_one_generation_of_health_checks_and_pooled_connections() {
    let mut origin = spawn_http_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    let interval_ms = 100;
    let config = |generation: usize| {
        format!(
            r#"
[[listener]]
addr = "127.0.0.1:0"

[upstream.app]
servers = ["{}"]
health_check = {{ path = "/healthz", interval = "{interval_ms}ms" }}

[[route]]
path = "/gen{generation}"
upstream = "app"
"#,
            origin.addr
        )
    };
    std::fs::write(&path, config(0)).unwrap();
    let mut wsgate = WsgateProcess::start(&path, &[], "info");
    let addr = wsgate.listening_addr();
    let pid = wsgate.child.id();

    // One plain request per generation leaves a pooled connection in that
    // generation's pool; the client's own connection closes with it.
    let plain = |generation: usize| {
        format!("GET /gen{generation} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    };
    let (head, _, _) = exchange(addr, &plain(0)).await;
    assert_eq!(head.status, 200);
    let baseline_fds = open_fds(pid);

    let reloads = 10;
    for generation in 1..=reloads {
        std::fs::write(&path, config(generation)).unwrap();
        wsgate.signal("HUP");
        wsgate.wait_for_line("configuration reloaded");
        let (head, _, _) = exchange(addr, &plain(generation)).await;
        assert_eq!(head.status, 200, "generation {generation}");
    }

    // One generation's pooled connection stays; the ten before it go.
    let deadline = Instant::now() + DEADLINE;
    let mut fds = open_fds(pid);
    while fds > baseline_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds = open_fds(pid);
    }
    assert!(
        fds <= baseline_fds,
        "{fds} fds open after {reloads} reloads, {baseline_fds} before"
    );

    // With one loop, 20 checks take 20 intervals; with eleven, under two.
    // A slow machine only makes this longer, so it cannot fail by noise.
    let checks = 20;
    let took = time_for_health_checks(&mut origin, checks).await;
    let one_generation = Duration::from_millis(interval_ms) * checks as u32;
    assert!(
        took >= one_generation * 3 / 4,
        "{checks} health checks in {took:?}: more than one generation is checking \
         (one takes about {one_generation:?})"
    );

    wsgate.signal("TERM");
    assert_eq!(wsgate.wait_exit(), Some(0));
}
