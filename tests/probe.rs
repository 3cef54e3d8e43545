//! `wsgate probe` as a user runs it — the real binary — against a matrix of
//! real servers on loopback: wsgate routes (in-process) for each verdict,
//! Debian's nginx configured the classic broken way and the right way, a
//! WebSocket server that checks Origin itself, a closed port, a name that
//! does not resolve, a certificate for another name, and `--hold` against
//! an idle timeout and a server that cuts. Each test asserts the exact
//! verdict, exit code and what every upgrade attempt got.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

const NGINX: &str = "/usr/sbin/nginx";

// ---------------------------------------------------------------------------
// Running the probe.
// ---------------------------------------------------------------------------

struct Probe {
    code: Option<i32>,
    json: Value,
}

impl Probe {
    fn verdict(&self) -> &str {
        self.json["verdict"].as_str().unwrap_or("")
    }

    /// Each upgrade attempt as `origin_from[+token_in] status [wsgate-reason]`.
    fn attempts(&self) -> Vec<String> {
        self.json["steps"]["upgrades"]
            .as_array()
            .map(|attempts| attempts.iter().map(summary).collect())
            .unwrap_or_default()
    }

    #[track_caller]
    fn assert(&self, verdict: &str, code: i32, attempts: &[&str]) {
        let shown = serde_json::to_string_pretty(&self.json).unwrap_or_default();
        assert_eq!(self.verdict(), verdict, "verdict; report:\n{shown}");
        assert_eq!(self.code, Some(code), "exit code; report:\n{shown}");
        assert_eq!(self.attempts(), attempts, "attempts; report:\n{shown}");
        assert!(
            self.json["fix"].as_str().is_some_and(|fix| !fix.is_empty()),
            "no fix: {shown}"
        );
    }
}

fn summary(attempt: &Value) -> String {
    let mut text = attempt["origin_from"].as_str().unwrap_or("?").to_owned();
    if let Some(place) = attempt["token_in"].as_str() {
        text.push('+');
        text.push_str(place);
    }
    match attempt["status"].as_u64() {
        Some(status) => text.push_str(&format!(" {status}")),
        None => text.push_str(" error"),
    }
    if let Some(reason) = attempt["wsgate_reason"].as_str() {
        text.push_str(&format!(" {reason}"));
    }
    text
}

async fn run_probe(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("probe")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    within("wsgate probe to finish", child)
        .await
        .expect("wsgate probe runs")
}

async fn probe(args: &[&str]) -> Probe {
    let mut args = args.to_vec();
    args.push("--json");
    let output = run_probe(&args).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "probe {args:?} printed no JSON ({error}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Probe {
        code: output.status.code(),
        json,
    }
}

/// The text report and the exit code.
async fn probe_text(args: &[&str]) -> (String, Option<i32>) {
    let output = run_probe(args).await;
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        output.status.code(),
    )
}

// ---------------------------------------------------------------------------
// wsgate in front of the echo backend.
// ---------------------------------------------------------------------------

/// A wsgate whose routes can name its own origin (`http://127.0.0.1:PORT`):
/// started with a placeholder, then reloaded once the port is known.
struct Gate {
    proxy: TestProxy,
    /// `ws://127.0.0.1:PORT`
    base: String,
}

async fn start_gate(config: impl Fn(&str) -> String) -> Gate {
    let proxy = start_proxy(&config("http://placeholder.invalid")).await;
    let own = format!("http://{}", proxy.addr());
    let reloaded = proxy
        .reloader
        .apply(&parse_config(&config(&own), Path::new(".")));
    assert!(reloaded.is_ok(), "reload: {reloaded:?}");
    Gate {
        base: format!("ws://{}", proxy.addr()),
        proxy,
    }
}

impl Gate {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn gate_config(backend: SocketAddr, routes: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{backend}"]
        {routes}
        "#
    )
}

/// HS256 secret in a file, and tokens signed with it.
struct Secret {
    dir: tempfile::TempDir,
    key: Vec<u8>,
}

impl Secret {
    fn new() -> Secret {
        let dir = tempfile::tempdir().unwrap();
        let key = b"probe-test-secret-0123456789abcdef-0123456789".to_vec();
        std::fs::write(dir.path().join("secret.txt"), &key).unwrap();
        Secret { dir, key }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("secret.txt")
    }

    fn token(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({ "sub": "probe", "scope": scope, "iat": now, "exp": now + 600 });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&self.key),
        )
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_urls_own_origin_upgrading_is_ok_and_the_report_shows_every_step() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|own| {
        gate_config(
            backend.addr,
            &format!(
                r#"[[route]]
                path = "/chat"
                upstream = "echo"
                origins = ["{own}"]"#
            ),
        )
    })
    .await;
    let url = gate.url("/chat");
    let probe = probe(&[&url]).await;
    probe.assert("ok", 0, &["url 101", "none 403 origin-missing"]);
    let own = format!("http://{}", gate.proxy.addr());
    let first = &probe.json["steps"]["upgrades"][0];
    assert_eq!(first["origin"], json!(own));
    assert_eq!(first["upgraded"], json!(true));
    assert_eq!(
        probe.json["steps"]["dns"]["addresses"],
        json!(["127.0.0.1"])
    );
    assert_eq!(
        probe.json["steps"]["tcp"]["connected"],
        json!(gate.proxy.addr().to_string())
    );
    assert_eq!(probe.json["steps"]["tls"], Value::Null);
    assert_eq!(
        probe.json["fix"],
        json!(format!(
            "nothing to fix: the URL's own origin {own} upgraded."
        ))
    );

    let (text, code) = probe_text(&[&url]).await;
    assert_eq!(code, Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("wsgate probe {url}"), "{text}");
    assert!(
        lines[1].starts_with("dns      127.0.0.1 → 127.0.0.1 (") && lines[1].ends_with(" ms)"),
        "{text}"
    );
    assert!(
        lines[2].starts_with(&format!("tcp      connected to {} in ", gate.proxy.addr())),
        "{text}"
    );
    assert!(
        lines[3].starts_with(&format!(
            "upgrade  Origin {own} (the URL's own) → 101 Switching Protocols, Sec-WebSocket-Accept ok ("
        )),
        "{text}"
    );
    assert!(
        lines[4].starts_with("upgrade  no Origin → 403 Forbidden, wsgate-reason: origin-missing ("),
        "{text}"
    );
    assert!(
        lines[5].starts_with("         body: 403 Forbidden"),
        "{text}"
    );
    assert_eq!(lines[6], "verdict  ok", "{text}");
    assert_eq!(
        lines[7],
        format!("fix      nothing to fix: the URL's own origin {own} upgraded."),
        "{text}"
    );
    assert_eq!(lines.len(), 8, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_wsgate_refuses_is_origin_rejected_until_the_allowed_one_is_given() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|_| {
        gate_config(
            backend.addr,
            r#"[[route]]
            path = "/chat"
            upstream = "echo"
            origins = ["https://app.test"]"#,
        )
    })
    .await;
    let url = gate.url("/chat");
    let refused = probe(&[&url]).await;
    refused.assert(
        "origin-rejected",
        1,
        &["url 403 origin-forbidden", "none 403 origin-missing"],
    );
    let own = format!("http://{}", gate.proxy.addr());
    assert!(
        refused.json["fix"]
            .as_str()
            .is_some_and(|fix| fix.starts_with(&format!("the server refuses the Origin {own}:"))),
        "{}",
        refused.json["fix"]
    );
    let allowed = probe(&[&url, "--origin", "https://app.test"]).await;
    allowed.assert(
        "ok",
        0,
        &[
            "url 403 origin-forbidden",
            "flag 101",
            "none 403 origin-missing",
        ],
    );
}

fn auth_route(path: &str, own: &str, secret: &Path, places: &str, scope: &str) -> String {
    format!(
        r#"[[route]]
        path = "{path}"
        upstream = "echo"
        origins = ["{own}"]
        [route.auth]
        jwt_secret_file = "{}"
        {places}
        {scope}
        "#,
        secret.display()
    )
}

async fn auth_gate(secret: &Secret) -> Gate {
    let backend = spawn_ws_echo().await;
    let path = secret.path();
    start_gate(move |own| {
        let routes = [
            auth_route(
                "/any",
                own,
                &path,
                "token_query = \"token\"\ntoken_cookie = \"session\"",
                "",
            ),
            auth_route("/bearer", own, &path, "", ""),
            auth_route(
                "/scoped",
                own,
                &path,
                "token_query = \"token\"",
                "required_scope = \"chat\"",
            ),
        ];
        gate_config(backend.addr, &routes.concat())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_is_token_missing_with_the_bearer_challenge() {
    let secret = Secret::new();
    let gate = auth_gate(&secret).await;
    let probe = probe(&[&gate.url("/any")]).await;
    probe.assert(
        "token-missing",
        1,
        &["url 401 token-missing", "none 403 origin-missing"],
    );
    assert_eq!(
        probe.json["steps"]["upgrades"][0]["www_authenticate"],
        json!("Bearer")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_tried_in_each_place_and_one_that_works_is_ok() {
    let secret = Secret::new();
    let gate = auth_gate(&secret).await;
    let token = secret.token("chat");
    let everywhere = probe(&[&gate.url("/any"), "--token", &token]).await;
    everywhere.assert(
        "ok",
        0,
        &[
            "url 401 token-missing",
            "none 403 origin-missing",
            "url+query 101",
            "url+cookie 101",
            "url+bearer 101",
        ],
    );
    // A route that reads only the Authorization header: the browser-usable
    // places miss, the header works.
    let bearer_only = probe(&[&gate.url("/bearer"), "--token", &token]).await;
    bearer_only.assert(
        "ok",
        0,
        &[
            "url 401 token-missing",
            "none 403 origin-missing",
            "url+query 401 token-missing",
            "url+cookie 401 token-missing",
            "url+bearer 101",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_wsgate_cannot_verify_is_token_invalid() {
    let secret = Secret::new();
    let gate = auth_gate(&secret).await;
    let probe = probe(&[&gate.url("/any"), "--token", "not-a-jwt"]).await;
    probe.assert(
        "token-invalid",
        1,
        &[
            "url 401 token-missing",
            "none 403 origin-missing",
            "url+query 401 token-invalid",
            "url+cookie 401 token-invalid",
            "url+bearer 401 token-invalid",
        ],
    );
    assert_eq!(
        probe.json["steps"]["upgrades"][2]["www_authenticate"],
        json!("Bearer error=\"invalid_token\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_token_without_the_routes_scope_is_scope_missing() {
    let secret = Secret::new();
    let gate = auth_gate(&secret).await;
    let token = secret.token("read");
    let probe = probe(&[&gate.url("/scoped"), "--token", &token]).await;
    probe.assert(
        "scope-missing",
        1,
        &[
            "url 401 token-missing",
            "none 403 origin-missing",
            "url+query 403 scope-missing",
            "url+cookie 401 token-missing",
            "url+bearer 403 scope-missing",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_ip_outside_allow_ips_is_ip_forbidden() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|own| {
        gate_config(
            backend.addr,
            &format!(
                r#"[[route]]
                path = "/"
                upstream = "echo"
                origins = ["{own}"]
                allow_ips = ["10.0.0.0/8"]"#
            ),
        )
    })
    .await;
    probe(&[&gate.url("/")]).await.assert(
        "ip-forbidden",
        1,
        &["url 403 ip-forbidden", "none 403 ip-forbidden"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_no_route_matches_is_no_route() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|own| {
        gate_config(
            backend.addr,
            &format!(
                r#"[[route]]
                path = "/chat"
                upstream = "echo"
                origins = ["{own}"]"#
            ),
        )
    })
    .await;
    probe(&[&gate.url("/chatroom")]).await.assert(
        "no-route",
        1,
        &["url 404 no-route", "none 404 no-route"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_to_a_closed_port_is_upstream_down() {
    let (_closed, addr) = refusing_port();
    let gate = start_gate(|own| {
        gate_config(
            addr,
            &format!(
                r#"[[route]]
                path = "/"
                upstream = "echo"
                origins = ["{own}"]
                missing_origin = "allow""#
            ),
        )
    })
    .await;
    probe(&[&gate.url("/")]).await.assert(
        "upstream-down",
        1,
        &[
            "url 502 upstream-unavailable",
            "none 502 upstream-unavailable",
        ],
    );
}

/// With `handshake_rate = "1/m"` the probe's first attempt takes the only
/// handshake; every later one is refused by the limiter, which says nothing
/// about its origin or token. So a rate-limited browser attempt makes the
/// verdict `rate-limited` unless a browser attempt upgraded anyway.
#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_rate_the_attempts_trip_is_rate_limited() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|own| {
        gate_config(
            backend.addr,
            &format!(
                r#"[[route]]
                path = "/open"
                upstream = "echo"
                origins = ["{own}"]
                handshake_rate = "1/m"

                [[route]]
                path = "/app"
                upstream = "echo"
                origins = ["https://app.test"]
                handshake_rate = "1/m""#
            ),
        )
    })
    .await;
    // The own origin takes the one handshake and upgrades: that is an answer.
    let first = probe(&[&gate.url("/open")]).await;
    first.assert("ok", 0, &["url 101", "none 429 rate-limited"]);
    let again = probe(&[&gate.url("/open")]).await;
    again.assert(
        "rate-limited",
        1,
        &["url 429 rate-limited", "none 429 rate-limited"],
    );
    assert_eq!(
        again.json["steps"]["upgrades"][0]["retry_after"]
            .as_str()
            .map(|s| s.parse::<u64>().is_ok()),
        Some(true),
        "{}",
        again.json
    );
    // The refused own origin spends the handshake the allowed one needed.
    let masked = probe(&[&gate.url("/app"), "--origin", "https://app.test"]).await;
    masked.assert(
        "rate-limited",
        1,
        &[
            "url 403 origin-forbidden",
            "flag 429 rate-limited",
            "none 429 rate-limited",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_reports_the_idle_timeouts_close_1001_after_a_second() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|own| {
        gate_config(
            backend.addr,
            &format!(
                r#"[[route]]
                path = "/idle"
                upstream = "echo"
                origins = ["{own}"]
                idle_timeout = "1s"

                [[route]]
                path = "/long"
                upstream = "echo"
                origins = ["{own}"]"#
            ),
        )
    })
    .await;
    let idle = probe(&[&gate.url("/idle"), "--hold", "5s"]).await;
    idle.assert("ok", 0, &["url 101", "none 403 origin-missing"]);
    let hold = &idle.json["steps"]["hold"];
    assert_eq!(hold["ended"], json!("close"), "{hold}");
    assert_eq!(hold["code"], json!(1001), "{hold}");
    assert_eq!(hold["close_reason"], json!("idle timeout"), "{hold}");
    let after = hold["after_ms"].as_f64().unwrap_or(0.0);
    assert!(
        (950.0..3000.0).contains(&after),
        "closed after {after} ms: {hold}"
    );
    let fix = idle.json["fix"].as_str().unwrap_or("");
    assert!(
        fix.starts_with("the handshake is fine; the server closed the idle connection with 1001 (idle timeout) after 1."),
        "{fix}"
    );

    let (text, code) = probe_text(&[&gate.url("/idle"), "--hold", "5s"]).await;
    assert_eq!(code, Some(0), "{text}");
    let line = text.lines().find(|l| l.starts_with("hold ")).unwrap_or("");
    assert!(
        line.starts_with("hold     closed by the server with code 1001 \"idle timeout\" after 1."),
        "{text}"
    );

    let long = probe(&[&gate.url("/long"), "--hold", "300ms"]).await;
    long.assert("ok", 0, &["url 101", "none 403 origin-missing"]);
    let hold = &long.json["steps"]["hold"];
    assert_eq!(hold["ended"], json!("open"), "{hold}");
    assert_eq!(hold["code"], Value::Null, "{hold}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_reports_a_cut_without_close_as_1006() {
    let (addr, _heads) = spawn_raw_ws(|mut stream, head| async move {
        use tokio::io::AsyncWriteExt;
        let _ = stream
            .write_all(switching_protocols(&head, &[]).as_bytes())
            .await;
        // Then the TCP connection ends with no Close frame.
    })
    .await;
    let probe = probe(&[&format!("ws://{addr}/"), "--hold", "5s"]).await;
    probe.assert("ok", 0, &["url 101", "none 101"]);
    let hold = &probe.json["steps"]["hold"];
    assert_eq!(hold["ended"], json!("cut"), "{hold}");
    assert_eq!(hold["code"], json!(1006), "{hold}");
    let fix = probe.json["fix"].as_str().unwrap_or("");
    assert!(
        fix.starts_with(
            "the handshake is fine, but the idle connection was cut without a Close frame after "
        ),
        "{fix}"
    );
}

// ---------------------------------------------------------------------------
// Servers that are not wsgate.
// ---------------------------------------------------------------------------

/// A WebSocket echo server as frameworks write them: a request without
/// `Upgrade` gets 426 (Python's websockets does), and with `allowed_origin`
/// set, a browser Origin other than that one gets a bare 403 — no reason
/// header — while clients that send no Origin pass.
async fn spawn_framework_server(allowed_origin: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| async move {
                    Ok::<_, std::convert::Infallible>(answer(request, allowed_origin))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn answer(
    mut request: http::Request<Incoming>,
    allowed_origin: Option<&'static str>,
) -> http::Response<Full<bytes::Bytes>> {
    let text = |status: u16, body: &'static str| {
        let mut response =
            http::Response::new(Full::new(bytes::Bytes::from_static(body.as_bytes())));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response
    };
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = header("sec-websocket-key").filter(|_| upgrade) else {
        return text(426, "Upgrade Required: this is a WebSocket endpoint\n");
    };
    if let (Some(allowed), Some(origin)) = (allowed_origin, header("origin"))
        && origin != allowed
    {
        return text(403, "Forbidden\n");
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = text(101, "");
    let headers = response.headers_mut();
    headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
    headers.insert("connection", http::HeaderValue::from_static("Upgrade"));
    headers.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&accept_key(&key)).unwrap(),
    );
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_checking_origin_itself_with_a_bare_403_is_origin_rejected() {
    let addr = spawn_framework_server(Some("https://app.test")).await;
    let url = format!("ws://{addr}/socket");
    let refused = probe(&[&url]).await;
    refused.assert("origin-rejected", 1, &["url 403", "none 101"]);
    let attempt = &refused.json["steps"]["upgrades"][0];
    assert_eq!(attempt["wsgate_reason"], Value::Null);
    assert_eq!(attempt["body"], json!("Forbidden"));
    probe(&[&url, "--origin", "https://app.test"]).await.assert(
        "ok",
        0,
        &["url 403", "flag 101", "none 101"],
    );
}

/// A running nginx (master_process off: one process, ours to stop).
struct Nginx {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(fixture: &str, backend: SocketAddr) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: .ci/run installs Debian's nginx in its \"installing the peers\" step (apt-get install -y nginx); run that step or install it"
        );
        let template_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/probe")
            .join(fixture);
        let template = std::fs::read_to_string(&template_path).unwrap();
        // A free port is found by binding 0; another process could take it
        // before nginx binds, so a refused bind is retried on a new one.
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = template
                .replace("@PREFIX@", &dir.path().display().to_string())
                .replace("@PORT@", &port.to_string())
                .replace("@BACKEND@", &backend.to_string());
            let config_path = dir.path().join("nginx.conf");
            std::fs::write(&config_path, config).unwrap();
            let mut child = tokio::process::Command::new(NGINX)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            // Ready once it accepts; done early if it exited (a taken port).
            let deadline = tokio::time::Instant::now() + DEADLINE;
            let mut exited = false;
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Nginx {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            last_log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            if !exited {
                panic!("nginx did not start listening within {DEADLINE:?}:\n{last_log}");
            }
        }
        panic!("nginx would not start:\n{last_log}");
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = within("nginx to exit", self.child.wait()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_without_upgrade_headers_is_upgrade_stripped() {
    let backend = spawn_framework_server(None).await;
    let nginx = Nginx::start("nginx-no-upgrade.conf", backend).await;
    let probe = probe(&[&nginx.url("/socket")]).await;
    probe.assert("upgrade-stripped", 1, &["url 426", "none 426"]);
    assert_eq!(
        probe.json["steps"]["upgrades"][0]["body"],
        json!("Upgrade Required: this is a WebSocket endpoint")
    );
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_without_upgrade_headers_in_front_of_wsgate_is_upgrade_stripped() {
    let backend = spawn_ws_echo().await;
    let gate = start_gate(|_| {
        gate_config(
            backend.addr,
            r#"[[route]]
            path = "/"
            upstream = "echo"
            missing_origin = "allow"
            websocket = "required""#,
        )
    })
    .await;
    let nginx = Nginx::start("nginx-no-upgrade.conf", gate.proxy.addr()).await;
    probe(&[&nginx.url("/socket")]).await.assert(
        "upgrade-stripped",
        1,
        &["url 426 upgrade-required", "none 426 upgrade-required"],
    );
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_forwarding_the_upgrade_is_ok() {
    let backend = spawn_framework_server(None).await;
    let nginx = Nginx::start("nginx-upgrade.conf", backend).await;
    probe(&[&nginx.url("/socket"), "--hold", "200ms"])
        .await
        .assert("ok", 0, &["url 101", "none 101"]);
    nginx.stop().await;
}

// ---------------------------------------------------------------------------
// Before the upgrade: nothing listening, no such name, the wrong certificate.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_is_connect_failed() {
    let (_closed, addr) = refusing_port();
    let probe = probe(&[&format!("ws://{addr}/")]).await;
    probe.assert("connect-failed", 1, &[]);
    let tcp = &probe.json["steps"]["tcp"];
    assert_eq!(tcp["connected"], Value::Null);
    assert_eq!(tcp["failed"][0]["addr"], json!(addr.to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_does_not_resolve_is_dns_failed() {
    let probe = probe(&["ws://does-not-exist.invalid/"]).await;
    probe.assert("dns-failed", 1, &[]);
    assert_eq!(probe.json["steps"]["tcp"], Value::Null);
    assert_eq!(
        probe.json["steps"]["dns"]["host"],
        json!("does-not-exist.invalid")
    );
}

async fn tls_gate(cert: &TestCert) -> TestProxy {
    let backend = spawn_ws_echo().await;
    let toml = format!(
        r#"
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
        origins = ["https://127.0.0.1"]
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
        backend.addr
    );
    let proxy = start_proxy(&toml).await;
    let own = format!("https://{}", proxy.addr());
    let reloaded = proxy.reloader.apply(&parse_config(
        &toml.replace("https://127.0.0.1", &own),
        Path::new("."),
    ));
    assert!(reloaded.is_ok(), "{reloaded:?}");
    proxy
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_another_name_is_tls_failed_and_described() {
    let cert = test_cert(&["other.test"]);
    let proxy = tls_gate(&cert).await;
    let url = format!("wss://{}/", proxy.addr());
    let refused = probe(&[&url]).await;
    refused.assert("tls-failed", 1, &[]);
    let tls = &refused.json["steps"]["tls"];
    assert_eq!(tls["ok"], json!(false), "{tls}");
    assert_eq!(tls["trusted"], json!(false), "{tls}");
    assert_eq!(tls["certificate"]["names"], json!(["other.test"]), "{tls}");
    assert_eq!(tls["certificate"]["covers_host"], json!(false), "{tls}");
    assert_eq!(tls["certificate"]["self_signed"], json!(true), "{tls}");
    assert_eq!(
        refused.json["fix"],
        json!(
            "the certificate is for other.test, not 127.0.0.1: serve one that names 127.0.0.1 (or probe with --insecure to look past it)."
        )
    );

    // --insecure looks past it, and still says what is wrong.
    let insecure = probe(&[&url, "--insecure"]).await;
    insecure.assert("ok", 0, &["url 101", "none 403 origin-missing"]);
    let tls = &insecure.json["steps"]["tls"];
    assert_eq!(tls["ok"], json!(true), "{tls}");
    assert_eq!(tls["alpn"], json!("http/1.1"), "{tls}");
    assert_eq!(tls["trusted"], json!(false), "{tls}");
    assert_eq!(tls["insecure"], json!(true), "{tls}");
    assert!(
        tls["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("TLS 1.")),
        "{tls}"
    );
}
