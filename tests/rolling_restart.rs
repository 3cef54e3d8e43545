//! A rolling restart behind a real load balancer (issue 13, item 3): two
//! `wsgate run` processes with `proxy_protocol = true` behind HAProxy in
//! `mode tcp` with `send-proxy-v2`, HAProxy health-checking each one's
//! `/readyz`, 50 WebSocket clients through HAProxy. SIGTERM one wsgate: each
//! of its clients gets Close 1012 inside `drain_delay + drain_spread`,
//! reconnects through HAProxy to the other wsgate and echoes again; the
//! other wsgate's clients are untouched; no connection ends without a Close
//! frame (what a browser reports as 1006).
//!
//! Each wsgate forwards to its own echo backend, so the backend that saw a
//! connection's unique path says which wsgate HAProxy picked for it.
//!
//! HAProxy is required: without it the test fails rather than skips, so a CI
//! image that lost it cannot pass silently.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc as async_mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const CLIENTS: usize = 50;
const DRAIN_DELAY: Duration = Duration::from_millis(500);
const DRAIN_SPREAD: Duration = Duration::from_secs(2);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack for scheduling and the closing handshake's round trip through
/// HAProxy on a loaded CI machine.
const MARGIN: Duration = Duration::from_secs(1);
const RECONNECT_ATTEMPTS: usize = 20;
const ROUTE: &str = "echo";

/// A child process whose stderr lines are collected on a channel; dropping
/// it kills the process, so a failing test leaves nothing running.
struct Process {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Process {
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (with a deadline) for a stderr line containing `needle`.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no line containing {needle:?}; saw:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every stderr line up to the process's end; call after it exited.
    fn rest_of_output(&mut self) -> &[String] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return &self.seen,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: stderr still open after exit", self.name)
                }
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {} failed", self.name);
    }

    /// Polls (without blocking the runtime) until the process exits;
    /// returns its exit code and when the exit was seen, or `None` when it
    /// was still running at the deadline.
    async fn exited(&mut self) -> Option<(Option<i32>, Instant)> {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status.code(), Instant::now()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `wsgate run` with its listener and admin addresses.
struct Wsgate {
    process: Process,
    listener: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Wsgate {
    fn start(name: &'static str, backend: SocketAddr) -> Wsgate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsgate.toml");
        std::fs::write(&path, wsgate_config(backend)).unwrap();
        let mut process = Process::spawn(
            name,
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .args(["run", "-c"])
                .arg(&path)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
        );
        let line = process.wait_for_line("listening");
        let listener: SocketAddr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no address in {line:?}"));
        // Only the proxy's listeners are logged; the admin listener, bound
        // before them, is the process's other listening socket.
        let admin_ports: Vec<u16> = listening_ports(process.child.id())
            .into_iter()
            .filter(|port| *port != listener.port())
            .collect();
        assert_eq!(
            admin_ports.len(),
            1,
            "{name}: expected one admin listener besides {listener}, found ports {admin_ports:?}"
        );
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_ports[0]));
        Wsgate {
            process,
            listener,
            admin,
            _dir: dir,
        }
    }

    async fn metrics(&self) -> String {
        let (status, body) = admin_get(self.admin, "/metrics").await;
        assert_eq!(
            status, 200,
            "{}: /metrics answered {status}",
            self.process.name
        );
        body
    }

    async fn tunnels_active(&self) -> f64 {
        metric(
            &self.metrics().await,
            "wsgate_tunnels_active",
            &[("route", ROUTE)],
        )
        .unwrap_or(0.0)
    }
}

fn wsgate_config(backend: SocketAddr) -> String {
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"
proxy_protocol = true

[server]
trusted_proxies = ["127.0.0.1/32"]
drain_delay = "{delay}ms"
drain_spread = "{spread}ms"
drain_timeout = "{timeout}ms"
drain_close_code = 1012
worker_threads = 2

[admin]
addr = "127.0.0.1:0"

[upstream.echo]
servers = ["{backend}"]

[[route]]
name = "{ROUTE}"
path = "/ws"
upstream = "echo"
missing_origin = "allow"
"#,
        delay = DRAIN_DELAY.as_millis(),
        spread = DRAIN_SPREAD.as_millis(),
        timeout = DRAIN_TIMEOUT.as_millis(),
    )
}

/// TCP ports `pid` listens on: its socket inodes (from `/proc/PID/fd`)
/// matched against the LISTEN rows of `/proc/PID/net/tcp`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // local_address is fields[1] ("0100007F:1F90"), st is fields[3]
            // (0A = LISTEN), inode is fields[9].
            let listening = fields.get(3) == Some(&"0A");
            let ours = fields.get(9).is_some_and(|inode| inodes.contains(*inode));
            if !(listening && ours) {
                return None;
            }
            let port = fields.get(1)?.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn haproxy_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy not found on PATH nor in /usr/sbin: this test needs a real HAProxy \
                 (Debian: apt-get install haproxy; .ci/run installs it)"
            )
        })
}

/// HAProxy in front of both wsgates. Its frontend socket is bound here and
/// handed over as an inherited descriptor (`bind fd@N`): HAProxy refuses
/// port 0, and a port picked then freed could be taken before it binds.
struct Haproxy {
    process: Process,
    front: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(servers: [(&str, &Wsgate); 2]) -> Haproxy {
        let binary = haproxy_binary();
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let socket = socket2::Socket::from(front);
        // std opens every socket close-on-exec; this one must survive the
        // exec. Nothing else is spawned while it is inheritable.
        socket.set_cloexec(false).unwrap();
        let mut config = format!(
            r#"
global
    maxconn 1024

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    # A connect refused by a wsgate that just stopped accepting goes to the
    # other one instead of failing the client.
    retries 3
    option redispatch

frontend ws
    bind fd@{fd}
    default_backend wsgate

backend wsgate
    balance roundrobin
    # In mode tcp this is still an HTTP check, to the admin port: the
    # traffic port expects a PROXY header first, and /readyz is what
    # turns 503 the moment a drain begins.
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1
"#,
            fd = socket.as_raw_fd()
        );
        for (name, wsgate) in servers {
            config.push_str(&format!(
                "    server {name} {} send-proxy-v2 check port {}\n",
                wsgate.listener,
                wsgate.admin.port()
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &config).unwrap();
        let process = Process::spawn(
            "haproxy",
            Command::new(binary).arg("-f").arg(&path).arg("-db"),
        );
        // HAProxy holds its own copy now.
        drop(socket);
        Haproxy {
            process,
            front: front_addr,
            _dir: dir,
        }
    }

    /// Waits until HAProxy answers on its frontend, or fails with its log.
    async fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                panic!(
                    "haproxy exited with {status} before serving; its log:\n{}",
                    self.process.rest_of_output().join("\n")
                );
            }
            // The kernel accepts into the inherited socket's backlog even
            // before HAProxy runs, so a connect proves nothing: a
            // round trip to a wsgate and its backend does.
            if probe(self.front).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not serve within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One WebSocket round trip through `front` that leaves no tunnel open.
async fn probe(front: SocketAddr) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(front).await.ok()?;
        let request = format!("ws://{front}/ws/probe")
            .into_client_request()
            .ok()?;
        let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.ok()?;
        ws.send(Message::text("probe")).await.ok()?;
        let echoed = matches!(ws.next().await, Some(Ok(Message::Text(_))));
        ws.close(None).await.ok()?;
        while let Some(Ok(_)) = ws.next().await {}
        Some(echoed)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// What one client lived through.
#[derive(Debug, Default)]
struct ClientLog {
    id: usize,
    /// The drain's Close on the first connection: its code, when it came.
    drain_close: Option<(Option<u16>, Instant)>,
    /// Attempts before a connection echoed, and why each earlier one failed.
    retries: Vec<String>,
    reconnected: bool,
    /// Connections that got their 101 and then ended without a Close frame.
    abrupt_ends: Vec<String>,
    /// Anything else the contract rules out.
    failures: Vec<String>,
}

enum Event {
    Ready,
    Reconnected,
    Failed,
}

/// A failed attempt to open an echoing connection.
enum Attempt {
    /// Refused or closed before the 101: try again.
    Retry(String),
    /// Upgraded, then broke: never acceptable.
    Broken { abrupt: bool, what: String },
}

fn path_for(id: usize, attempt: usize) -> String {
    format!("/ws/c{id}/a{attempt}")
}

/// Connects through HAProxy, upgrades and echoes one message.
async fn open(front: SocketAddr, path: &str) -> Result<Ws<TcpStream>, Attempt> {
    let step = Duration::from_secs(5);
    let tcp = match tokio::time::timeout(step, TcpStream::connect(front)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => return Err(Attempt::Retry(format!("connect: {error}"))),
        Err(_) => return Err(Attempt::Retry("connect timed out".into())),
    };
    let request = format!("ws://{front}{path}").into_client_request().unwrap();
    let mut ws =
        match tokio::time::timeout(step, tokio_tungstenite::client_async(request, tcp)).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(error)) => return Err(Attempt::Retry(format!("handshake: {error}"))),
            Err(_) => return Err(Attempt::Retry("handshake timed out".into())),
        };
    match echo(&mut ws, path).await {
        Ok(()) => Ok(ws),
        Err(broken) => Err(broken),
    }
}

/// Sends `text` and expects it back; anything else on an upgraded
/// connection is a broken one.
async fn echo(ws: &mut Ws<TcpStream>, text: &str) -> Result<(), Attempt> {
    if let Err(error) = ws.send(Message::text(text)).await {
        return Err(Attempt::Broken {
            abrupt: true,
            what: format!("send failed after the 101: {error}"),
        });
    }
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(echoed)))) if echoed.as_str() == text => Ok(()),
        Ok(Some(Ok(Message::Close(frame)))) => Err(Attempt::Broken {
            abrupt: false,
            what: format!("Close {frame:?} instead of the echo"),
        }),
        Ok(Some(Ok(other))) => Err(Attempt::Broken {
            abrupt: false,
            what: format!("{other:?} instead of the echo"),
        }),
        Ok(Some(Err(error))) => Err(Attempt::Broken {
            abrupt: true,
            what: format!("ended without a Close frame: {error}"),
        }),
        Ok(None) => Err(Attempt::Broken {
            abrupt: true,
            what: "ended without a Close frame".into(),
        }),
        Err(_) => Err(Attempt::Broken {
            abrupt: false,
            what: "no echo within 5s".into(),
        }),
    }
}

/// Opens a connection, retrying refusals a bounded number of times.
async fn open_with_retries(
    front: SocketAddr,
    id: usize,
    first_attempt: usize,
    log: &mut ClientLog,
) -> Option<Ws<TcpStream>> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for attempt in first_attempt..first_attempt + RECONNECT_ATTEMPTS {
        match open(front, &path_for(id, attempt)).await {
            Ok(ws) => return Some(ws),
            Err(Attempt::Retry(why)) => log.retries.push(why),
            Err(Attempt::Broken { abrupt, what }) => {
                let list = if abrupt {
                    &mut log.abrupt_ends
                } else {
                    &mut log.failures
                };
                list.push(format!("attempt {attempt}: {what}"));
                return None;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        // A backoff, not a synchronisation: HAProxy needs a check interval
        // to take a draining wsgate out.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.failures.push(format!(
        "no connection echoed in {RECONNECT_ATTEMPTS} attempts"
    ));
    None
}

/// Reads the rest of a connection after the drain's Close: wsgate must
/// close the TCP connection once the closing handshake is done.
async fn finish_closing_handshake(ws: &mut Ws<TcpStream>, log: &mut ClientLog) {
    let ended = tokio::time::timeout(DEADLINE, async {
        for _ in 0..100 {
            match ws.next().await {
                None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.to_string()),
            }
        }
        Err("more than 100 messages after the Close".into())
    })
    .await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(error)) => log
            .failures
            .push(format!("after the drain's Close: {error}")),
        Err(_) => log
            .failures
            .push("connection still open 10s after the drain's Close".into()),
    }
}

/// One client: connect and echo, then either be drained (take the Close,
/// reconnect, echo) or be left alone; at the end echo once more and close.
async fn client(
    id: usize,
    front: SocketAddr,
    events: async_mpsc::UnboundedSender<(usize, Event)>,
    mut finish: watch::Receiver<bool>,
) -> ClientLog {
    let mut log = ClientLog {
        id,
        ..ClientLog::default()
    };
    let Some(mut ws) = open_with_retries(front, id, 0, &mut log).await else {
        let _ = events.send((id, Event::Failed));
        return log;
    };
    let _ = events.send((id, Event::Ready));
    let woke = tokio::select! {
        _ = finish.wait_for(|done| *done) => None,
        item = ws.next() => Some(item),
    };
    if let Some(item) = woke {
        match item {
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|frame| u16::from(frame.code));
                log.drain_close = Some((code, Instant::now()));
                finish_closing_handshake(&mut ws, &mut log).await;
            }
            Some(Ok(other)) => log.failures.push(format!("unexpected {other:?}")),
            Some(Err(error)) => log
                .abrupt_ends
                .push(format!("ended without a Close frame: {error}")),
            None => log.abrupt_ends.push("ended without a Close frame".into()),
        }
        if !log.failures.is_empty() || !log.abrupt_ends.is_empty() {
            let _ = events.send((id, Event::Failed));
            return log;
        }
        let first = log.retries.len() + 1;
        match open_with_retries(front, id, first, &mut log).await {
            Some(reconnected) => ws = reconnected,
            None => {
                let _ = events.send((id, Event::Failed));
                return log;
            }
        }
        log.reconnected = true;
        let _ = events.send((id, Event::Reconnected));
        let _ = finish.wait_for(|done| *done).await;
    }
    match echo(&mut ws, &format!("c{id} last")).await {
        Ok(()) => {}
        Err(Attempt::Broken { abrupt: true, what }) => log.abrupt_ends.push(what),
        Err(Attempt::Broken { what, .. } | Attempt::Retry(what)) => log.failures.push(what),
    }
    let normal = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    if ws.close(Some(normal)).await.is_ok() {
        let _ = tokio::time::timeout(DEADLINE, async {
            for _ in 0..100 {
                if !matches!(ws.next().await, Some(Ok(_))) {
                    break;
                }
            }
        })
        .await;
    }
    log
}

/// Client ids whose connections a backend saw, from the unique paths.
fn clients_seen(backend: &mut WsBackend) -> BTreeMap<usize, Vec<String>> {
    let mut seen: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    while let Ok(request) = backend.seen.try_recv() {
        let id = request
            .uri
            .strip_prefix("/ws/c")
            .and_then(|rest| rest.split('/').next())
            .and_then(|id| id.parse().ok());
        if let Some(id) = id {
            seen.entry(id).or_default().push(request.uri);
        }
    }
    seen
}

/// wsgate's tunnel-end log lines, quotes dropped (the text format quotes
/// some string fields: `cause="drain"`).
fn tunnel_end_lines(log: &[String]) -> Vec<String> {
    log.iter()
        .filter(|line| line.contains("tunnel closed"))
        .map(|line| line.replace('"', ""))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_behind_haproxy_ends_no_connection_without_a_close_frame() {
    let started = Instant::now();
    let mut backend_a = spawn_ws_echo().await;
    let mut backend_b = spawn_ws_echo().await;
    let mut a = Wsgate::start("wsgate a", backend_a.addr);
    let b = Wsgate::start("wsgate b", backend_b.addr);
    let mut haproxy = Haproxy::start([("a", &a), ("b", &b)]);
    haproxy.wait_until_serving().await;
    let front = haproxy.front;

    let (events_tx, mut events) = async_mpsc::unbounded_channel();
    let (finish_tx, finish_rx) = watch::channel(false);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, front, events_tx.clone(), finish_rx.clone())))
        .collect();
    drop(events_tx);

    let mut ready = 0;
    let mut failed = BTreeSet::new();
    within("every client to connect and echo", async {
        while ready + failed.len() < CLIENTS {
            match events.recv().await {
                Some((_, Event::Ready)) => ready += 1,
                Some((id, _)) => {
                    failed.insert(id);
                }
                None => break,
            }
        }
    })
    .await;
    assert!(failed.is_empty(), "clients {failed:?} could not connect");

    // The backend that saw a client's path is the wsgate HAProxy chose.
    let on_a: BTreeSet<usize> = clients_seen(&mut backend_a).into_keys().collect();
    let on_b: BTreeSet<usize> = clients_seen(&mut backend_b).into_keys().collect();
    assert_eq!(on_a.len() + on_b.len(), CLIENTS, "a: {on_a:?}, b: {on_b:?}");
    assert!(on_a.is_disjoint(&on_b), "a: {on_a:?}, b: {on_b:?}");
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "roundrobin sent every client to one wsgate: a {on_a:?}, b {on_b:?}"
    );
    // `until`, not one look: the readiness probe's tunnel is counted until
    // wsgate has finished with it, which may be just after its client saw
    // the end.
    for (wsgate, clients) in [(&a, &on_a), (&b, &on_b)] {
        let expected = clients.len() as f64;
        until("each wsgate to count its clients' tunnels", || async move {
            wsgate.tunnels_active().await == expected
        })
        .await;
    }

    let signalled = Instant::now();
    a.process.signal("TERM");

    // Every client of a reconnects while a drains; meanwhile a's exit is
    // timed as it happens.
    let mut reconnected = BTreeSet::new();
    let wait_for_reconnects = async {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while reconnected.len() < on_a.len() && failed.is_empty() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some((id, Event::Reconnected))) => {
                    reconnected.insert(id);
                }
                Ok(Some((id, _))) => {
                    failed.insert(id);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let (a_exited, ()) = tokio::join!(a.process.exited(), wait_for_reconnects);

    // The reconnected clients and the untouched ones are all on b now. When
    // some client did not make it, its log below says more than b's count.
    let everyone = CLIENTS as f64;
    let b_ref = &b;
    if failed.is_empty() && reconnected == on_a {
        until("wsgate b to hold every tunnel", || async move {
            b_ref.tunnels_active().await == everyone
        })
        .await;
    }

    finish_tx.send(true).unwrap();
    let mut logs = Vec::new();
    for task in clients {
        logs.push(within("a client to finish", task).await.unwrap());
    }
    let a_exit = a_exited.map(|(code, at)| (code, at.duration_since(signalled)));
    if a_exit.is_none() {
        // Its stderr ends only with it.
        let _ = a.process.child.kill();
    }
    let a_log = a.process.rest_of_output().to_vec();

    let abrupt: Vec<String> = logs
        .iter()
        .flat_map(|log| {
            log.abrupt_ends
                .iter()
                .map(move |e| format!("c{}: {e}", log.id))
        })
        .collect();
    let failures: Vec<String> = logs
        .iter()
        .flat_map(|log| {
            log.failures
                .iter()
                .map(move |e| format!("c{}: {e}", log.id))
        })
        .collect();
    let retries: usize = logs.iter().map(|log| log.retries.len()).sum();
    let drained: BTreeMap<usize, (Option<u16>, Duration)> = logs
        .iter()
        .filter_map(|log| {
            let (code, at) = log.drain_close?;
            Some((log.id, (code, at.duration_since(signalled))))
        })
        .collect();
    let first_close = drained.values().map(|(_, at)| *at).min();
    let last_close = drained.values().map(|(_, at)| *at).max();
    eprintln!(
        "rolling restart: {} clients on a, {} on b; {} drained, {} reconnected ({retries} retries); \
         closes from {first_close:?} to {last_close:?} after SIGTERM; a's exit (code, after \
         SIGTERM): {a_exit:?}; whole test so far {:?}",
        on_a.len(),
        on_b.len(),
        drained.len(),
        reconnected.len(),
        started.elapsed(),
    );
    if retries > 0 {
        for log in logs.iter().filter(|log| !log.retries.is_empty()) {
            eprintln!("c{} retried: {:?}", log.id, log.retries);
        }
    }

    assert!(
        abrupt.is_empty(),
        "{} connections ended without a Close frame (a browser's 1006):\n{}",
        abrupt.len(),
        abrupt.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Exactly a's clients were drained, each with 1012, inside the window.
    let drained_ids: BTreeSet<usize> = drained.keys().copied().collect();
    assert_eq!(drained_ids, on_a, "drained clients are not a's clients");
    for (id, (code, at)) in &drained {
        assert_eq!(*code, Some(1012), "c{id}'s drain Close code");
        assert!(
            *at >= DRAIN_DELAY,
            "c{id} got its Close {at:?} after SIGTERM, before drain_delay ({DRAIN_DELAY:?}) was over"
        );
        assert!(
            *at <= DRAIN_DELAY + DRAIN_SPREAD + MARGIN,
            "c{id} got its Close {at:?} after SIGTERM, past drain_delay + drain_spread"
        );
    }
    // Spread, not all at once: with n clients the last Close is due
    // (n-1)/n of the spread after the first.
    if let (Some(first), Some(last)) = (first_close, last_close) {
        if on_a.len() >= 4 {
            assert!(
                last - first >= DRAIN_SPREAD / 2,
                "closes came within {:?} of each other, not spread over {DRAIN_SPREAD:?}",
                last - first
            );
        }
    }

    // Every drained client echoed again, through b.
    assert_eq!(reconnected, on_a, "not every client of a reconnected");
    let b_later = clients_seen(&mut backend_b);
    for id in &on_a {
        assert!(
            b_later.contains_key(id),
            "c{id} reconnected, but not through b"
        );
    }
    assert!(
        clients_seen(&mut backend_a).is_empty(),
        "a took new connections after SIGTERM"
    );

    // a exits 0 once its last tunnel ended, well before drain_timeout.
    let Some((a_code, a_took)) = a_exit else {
        panic!(
            "wsgate a still running {DEADLINE:?} after SIGTERM; its log:\n{}",
            a_log.join("\n")
        );
    };
    assert_eq!(
        a_code,
        Some(0),
        "wsgate a's exit; its log:\n{}",
        a_log.join("\n")
    );
    assert!(
        a_took <= DRAIN_DELAY + DRAIN_SPREAD + MARGIN * 2 && a_took < DRAIN_TIMEOUT,
        "wsgate a exited {a_took:?} after SIGTERM (drain_timeout {DRAIN_TIMEOUT:?})"
    );
    // a's own account: every client's tunnel ended by its drain Close,
    // none cut and none without a Close frame (the readiness probes before
    // the clients closed their own).
    let ends = tunnel_end_lines(&a_log);
    let drain_ends: Vec<&String> = ends
        .iter()
        .filter(|line| line.contains("cause=drain"))
        .collect();
    assert_eq!(drain_ends.len(), on_a.len(), "a's tunnel ends:\n{ends:#?}");
    for line in &drain_ends {
        assert!(
            line.contains("close_code=1012") && line.contains("close_from=wsgate"),
            "{line}"
        );
    }
    for line in &ends {
        assert!(!line.contains("close_code=1006"), "{line}");
    }

    // HAProxy saw a's /readyz turn 503 and took it out of rotation.
    let down = haproxy.process.wait_for_line("wsgate/a is DOWN");
    assert!(down.contains("503"), "{down}");

    // b's tunnels all closed by their clients' Close 1000, none without a
    // Close frame.
    until("wsgate b to count every close", || async move {
        let text = b_ref.metrics().await;
        metric(
            &text,
            "wsgate_tunnel_closes_total",
            &[("route", ROUTE), ("from", "client"), ("code", "1000")],
        ) == Some(everyone)
    })
    .await;
    let text = b.metrics().await;
    let abnormal = metric(
        &text,
        "wsgate_tunnel_closes_total",
        &[("route", ROUTE), ("from", "none"), ("code", "1006")],
    );
    assert!(
        abnormal.unwrap_or(0.0) == 0.0,
        "b counted {abnormal:?} 1006s"
    );
    assert_eq!(b.tunnels_active().await, 0.0);
    eprintln!("rolling restart: whole test {:?}", started.elapsed());
}
