//! A real Socket.IO service behind wsgate (issue 14, items 5 and 7): two
//! instances of a Node Socket.IO server (`tests/socketio/server.js`, the
//! `socket.io` package from the npm registry) behind one upstream, and
//! `socket.io-client` (`tests/socketio/client.js`) opening 50 sessions with
//! the default transports: long-polling first, then the upgrade.
//!
//! An engine.io session lives in the instance that answered its handshake;
//! every later poll, post and the upgrade must reach that same instance, or
//! the other one answers 400 "Session ID unknown". With `sticky_cookie` they
//! do; without it round robin splits sessions. And `origin_checks = "all"`
//! refuses a forbidden page's polling requests, which the default
//! (`"upgrades"`) lets through to the backend.
//!
//! Node.js and the packages are required: without them the tests fail
//! rather than skip. `.ci/run` installs Debian's `nodejs` and `npm` and runs
//! `npm ci` in `tests/socketio` (its "installing the peers" step).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const SESSIONS: usize = 50;
const ALLOWED: &str = "http://app.test";
const FORBIDDEN: &str = "http://evil.test";
const COOKIE: &str = "wsgate_sticky";
/// A whole client run: 50 sessions one after another take about 2 s here;
/// each of the client's own waits is bounded by `--wait-ms`.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

fn socketio_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Fails (never skips) when Node or the packages are missing, naming the
/// step that installs them.
fn require_node() {
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`node --version` failed ({}): tests/socketio.rs needs Node.js; .ci/run installs \
             Debian's nodejs and npm in its \"installing the peers\" step",
            output.status
        ),
        Err(error) => panic!(
            "node not found ({error}): tests/socketio.rs needs Node.js; .ci/run installs \
             Debian's nodejs and npm in its \"installing the peers\" step"
        ),
    }
    for package in ["socket.io", "socket.io-client"] {
        let installed = socketio_dir().join("node_modules").join(package);
        assert!(
            installed.join("package.json").is_file(),
            "{} is missing: run `npm ci` in tests/socketio (.ci/run does, in its \
             \"installing the peers\" step)",
            installed.display()
        );
    }
}

/// One `node server.js NAME` process. Closing its stdin ends it; dropping it
/// kills it, so a failing test leaves no server behind.
struct Instance {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: tokio::task::JoinHandle<Vec<String>>,
}

impl Instance {
    async fn start(name: &'static str) -> Instance {
        let mut child = Command::new("node")
            .arg("server.js")
            .arg(name)
            .current_dir(socketio_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start node server.js {name}: {error}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        // Collected until the process ends: every engine.io connection error.
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line);
            }
            seen
        });
        let mut stdout = BufReader::new(stdout).lines();
        let first = within(&format!("server {name} listening"), stdout.next_line()).await;
        let port: u16 = match first {
            Ok(Some(line)) => line
                .strip_prefix("listening ")
                .and_then(|port| port.trim().parse().ok())
                .unwrap_or_else(|| panic!("server {name} printed {line:?}, not `listening PORT`")),
            other => {
                let log = within("server stderr", stderr).await.unwrap();
                panic!(
                    "server {name} ended before listening ({other:?}); stderr:\n{}",
                    log.join("\n")
                )
            }
        };
        Instance {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            stdin,
            stderr,
        }
    }

    /// Ends the server and returns its connection errors' messages.
    async fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = within(&format!("server {} exit", self.name), self.child.wait())
            .await
            .unwrap();
        assert!(
            status.success(),
            "server {} exited with {status}",
            self.name
        );
        let lines = within("server stderr", &mut self.stderr).await.unwrap();
        lines
            .iter()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|_| panic!("server {}: stray stderr {line:?}", self.name));
                assert_eq!(event["event"], "connection_error", "{line}");
                event["message"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }
}

/// What `client.js` prints.
#[derive(Debug, Deserialize)]
struct Summary {
    ok: usize,
    failed: usize,
    upgraded: usize,
    errors: Vec<String>,
    sessions: Vec<Session>,
}

#[derive(Debug, Deserialize)]
struct Session {
    connected: bool,
    upgraded: bool,
    instances_polling: Vec<String>,
    instances_ws: Vec<String>,
    error: Option<String>,
}

impl Summary {
    /// How many times each error message occurred.
    fn error_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for error in &self.errors {
            *counts.entry(error.as_str()).or_default() += 1;
        }
        counts
    }
}

/// Runs `client.js` against wsgate: `sessions` sessions one after another
/// (so round robin's turns follow the sessions' order) with `origin`.
async fn run_client(proxy: SocketAddr, sessions: usize, origin: &str) -> Summary {
    let mut command = Command::new("node");
    command
        .arg("client.js")
        .arg(format!("http://{proxy}"))
        .args(["--sessions", &sessions.to_string()])
        .args(["--concurrency", "1"])
        .args(["--wait-ms", "3000"])
        .args(["--origin", origin])
        .current_dir(socketio_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(CLIENT_DEADLINE, command.output()).await {
        Ok(output) => output.expect("run node client.js"),
        Err(_) => panic!("client.js did not finish within {CLIENT_DEADLINE:?}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client.js exited with {}; stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Summary = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("client.js printed no summary ({error}): {stdout}"));
    assert_eq!(summary.sessions.len(), sessions, "{stdout}");
    assert_eq!(summary.ok + summary.failed, sessions, "{stdout}");
    summary
}

/// The wsgate config: one upstream over `servers`, round robin, with
/// `upstream_extra` and `route_extra` lines added.
fn config(servers: &[&Instance], upstream_extra: &str, route_extra: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|server| format!("\"{}\"", server.addr))
        .collect();
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"

        [upstream.socketio]
        servers = [{servers}]
        balance = "round_robin"
        {upstream_extra}

        [[route]]
        name = "socketio"
        path = "/socket.io"
        upstream = "socketio"
        origins = ["{ALLOWED}"]
        {route_extra}
        "#,
        servers = servers.join(", ")
    )
}

/// A plain engine.io handshake (`GET /socket.io/?EIO=4&transport=polling`)
/// through wsgate with `origin` (none when empty).
async fn polling_handshake(proxy: SocketAddr, origin: &str) -> (Head, String) {
    let origin = if origin.is_empty() {
        String::new()
    } else {
        format!("Origin: {origin}\r\n")
    };
    let (head, body, _) = exchange(
        proxy,
        &format!(
            "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: app.test\r\n{origin}\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    (head, body)
}

/// A direct WebSocket upgrade (`transport=websocket`) through wsgate.
async fn websocket_upgrade(proxy: SocketAddr, origin: &str) -> Head {
    let mut stream = connect(proxy).await;
    let request = upgrade_request(
        "/socket.io/?EIO=4&transport=websocket",
        "app.test",
        &[("Origin", origin)],
    );
    let (head, _) = raw_request(&mut stream, &request).await;
    head
}

fn assert_origin_forbidden(head: &Head, what: &str) {
    assert_eq!(head.status, 403, "{what}: {head:?}");
    assert_eq!(
        head.all("wsgate-reason").collect::<Vec<_>>(),
        ["origin-forbidden"],
        "{what}: {head:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sticky_cookie_every_session_stays_on_one_instance_and_upgrades() {
    require_node();
    let (a, b) = tokio::join!(Instance::start("a"), Instance::start("b"));
    let proxy = start_proxy(&config(
        &[&a, &b],
        &format!("sticky_cookie = \"{COOKIE}\""),
        "",
    ))
    .await;

    let summary = run_client(proxy.addr(), SESSIONS, ALLOWED).await;

    assert_eq!(
        (summary.ok, summary.failed, summary.upgraded),
        (SESSIONS, 0, SESSIONS),
        "errors: {:?}",
        summary.error_counts()
    );
    let mut per_instance: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, session) in summary.sessions.iter().enumerate() {
        assert!(
            session.connected && session.upgraded,
            "{index}: {session:?}"
        );
        assert_eq!(session.error, None, "{index}");
        // The polling phase and the WebSocket phase met the same single
        // instance: the upgrade reached the session's own server.
        assert_eq!(session.instances_polling.len(), 1, "{index}: {session:?}");
        assert_eq!(
            session.instances_ws, session.instances_polling,
            "{index}: {session:?}"
        );
        *per_instance
            .entry(session.instances_polling[0].as_str())
            .or_default() += 1;
    }
    // Only a session's first request comes without the cookie, so round
    // robin takes exactly one turn per session; the sessions run one after
    // another, so the turns alternate: 25 sessions each.
    assert_eq!(
        per_instance,
        BTreeMap::from([("a", SESSIONS / 2), ("b", SESSIONS / 2)])
    );

    proxy.stop().await;
    // No request ever reached an instance that did not hold its session.
    let (a_errors, b_errors) = tokio::join!(a.finish(), b.finish());
    assert_eq!(a_errors, Vec::<String>::new());
    assert_eq!(b_errors, Vec::<String>::new());
    eprintln!("sticky: sessions per instance {per_instance:?}");
}

/// Without stickiness, round robin sends a session's requests to both
/// instances. A session survives only if its handshake, every poll and post,
/// and the upgrade all land on the instance that holds it; otherwise the
/// other one answers 400 "Session ID unknown": on a poll or post the client
/// gives up (`connect_error` or `disconnect`), on the upgrade the probe fails
/// and the session never upgrades (`upgradeError`).
///
/// Measured with 50 sequential sessions: with a server chosen per plain
/// request (issue 14, item 0) all 50 fail, 104 to 110 "Session ID unknown"
/// on the instances (3 runs), nearly all on the first poll or post. Before
/// that, when plain requests mostly reused one pooled connection, 25 to 37
/// failed (8 runs), most by the upgrade reaching the wrong instance. The
/// bound asserted, at least a third failed and as many "Session ID unknown"
/// on the instances, is well below every measured run, so scheduling cannot
/// flip it, and it cannot hold with stickiness, where the first test sees 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sticky_cookie_round_robin_splits_sessions() {
    require_node();
    let (a, b) = tokio::join!(Instance::start("a"), Instance::start("b"));
    let proxy = start_proxy(&config(&[&a, &b], "", "")).await;

    let summary = run_client(proxy.addr(), SESSIONS, ALLOWED).await;

    proxy.stop().await;
    let (a_errors, b_errors) = tokio::join!(a.finish(), b.finish());
    let unknown = a_errors
        .iter()
        .chain(&b_errors)
        .filter(|message| message.as_str() == "Session ID unknown")
        .count();
    eprintln!(
        "without sticky_cookie: ok {} failed {} upgraded {}; \"Session ID unknown\" on the \
         instances: {unknown} (a {}, b {}); client errors {:?}",
        summary.ok,
        summary.failed,
        summary.upgraded,
        a_errors.len(),
        b_errors.len(),
        summary.error_counts()
    );
    assert!(
        summary.failed >= SESSIONS / 3,
        "only {} of {SESSIONS} sessions failed without sticky_cookie: {:?}",
        summary.failed,
        summary.error_counts()
    );
    assert!(
        unknown >= SESSIONS / 3,
        "the instances saw only {unknown} requests for sessions they do not hold"
    );
    // Every session that failed did so because of the split: no other kind
    // of failure (a refusal by wsgate, a timeout of the run) hides in here.
    for (index, session) in summary.sessions.iter().enumerate() {
        if let Some(error) = &session.error {
            assert!(
                error.contains("Session ID unknown") || error.starts_with("upgradeError"),
                "{index}: {error}"
            );
        } else {
            assert_eq!(session.instances_polling.len(), 1, "{index}: {session:?}");
            assert_eq!(
                session.instances_ws, session.instances_polling,
                "{index}: {session:?}"
            );
        }
    }
}

/// `origin_checks = "all"`: a page on a forbidden origin cannot even start
/// a session (its first poll is refused by wsgate), nor upgrade; an allowed
/// origin works as before, and a request without `Origin` passes (a
/// browser's same-origin GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_checks_all_refuses_a_forbidden_origins_polling_and_upgrade() {
    require_node();
    let a = Instance::start("a").await;
    let proxy = start_proxy(&config(&[&a], "", "origin_checks = \"all\"")).await;

    let (head, body) = polling_handshake(proxy.addr(), FORBIDDEN).await;
    assert_origin_forbidden(&head, "polling handshake from a forbidden origin");
    assert!(!body.contains("\"sid\""), "the backend answered: {body}");
    assert_origin_forbidden(
        &websocket_upgrade(proxy.addr(), FORBIDDEN).await,
        "upgrade from a forbidden origin",
    );

    let forbidden = run_client(proxy.addr(), 3, FORBIDDEN).await;
    assert_eq!((forbidden.ok, forbidden.failed), (0, 3), "{forbidden:?}");
    for session in &forbidden.sessions {
        assert!(!session.connected, "{session:?}");
        assert!(session.instances_polling.is_empty(), "{session:?}");
        // The engine.io client reports the status and wsgate's body.
        let error = session.error.as_deref().unwrap_or_default();
        assert!(
            error.starts_with("connect_error: xhr poll error: 403: "),
            "{session:?}"
        );
        assert!(error.contains("origin-forbidden"), "{session:?}");
    }

    let (head, body) = polling_handshake(proxy.addr(), ALLOWED).await;
    assert_eq!(head.status, 200, "{head:?} {body}");
    assert!(body.starts_with("0{\"sid\":"), "{body}");
    let (head, body) = polling_handshake(proxy.addr(), "").await;
    assert_eq!(head.status, 200, "without Origin: {head:?} {body}");

    let allowed = run_client(proxy.addr(), 3, ALLOWED).await;
    assert_eq!(
        (allowed.ok, allowed.failed, allowed.upgraded),
        (3, 0, 3),
        "{allowed:?}"
    );

    proxy.stop().await;
    assert_eq!(a.finish().await, Vec::<String>::new());
}

/// The default, `origin_checks = "upgrades"`: the upgrade from a forbidden
/// origin is refused, but its polling requests reach the backend, which
/// even echoes the origin in `Access-Control-Allow-Origin`: a forbidden page
/// holds a working Socket.IO session over long-polling. This is what
/// `"all"` (above) closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_forbidden_origin_still_talks_over_polling() {
    require_node();
    let a = Instance::start("a").await;
    let proxy = start_proxy(&config(&[&a], "", "")).await;

    let (head, body) = polling_handshake(proxy.addr(), FORBIDDEN).await;
    assert_eq!(head.status, 200, "{head:?} {body}");
    assert_eq!(head.get("wsgate-reason"), None, "{head:?}");
    assert_eq!(
        head.get("access-control-allow-origin"),
        Some(FORBIDDEN),
        "{head:?}"
    );
    assert!(body.starts_with("0{\"sid\":"), "{body}");
    assert_origin_forbidden(
        &websocket_upgrade(proxy.addr(), FORBIDDEN).await,
        "upgrade from a forbidden origin",
    );

    // The Socket.IO client connects and its echo is answered over polling;
    // only its upgrade fails.
    let forbidden = run_client(proxy.addr(), 3, FORBIDDEN).await;
    assert_eq!(
        (forbidden.ok, forbidden.failed, forbidden.upgraded),
        (0, 3, 0),
        "{forbidden:?}"
    );
    for session in &forbidden.sessions {
        assert!(session.connected, "{session:?}");
        assert_eq!(session.instances_polling, ["a"], "{session:?}");
        assert!(session.instances_ws.is_empty(), "{session:?}");
        let error = session.error.as_deref().unwrap_or_default();
        assert!(error.starts_with("upgradeError"), "{session:?}");
    }

    proxy.stop().await;
    assert_eq!(a.finish().await, Vec::<String>::new());
}
