//! Logs as the real binary writes them: `--log-format json` gives one JSON
//! object a line with timestamp, level, message and every field; a plain
//! request gets an access line, a tunnel its end line; secrets (query
//! values, cookies, Authorization, tokens) never appear, even at debug.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const SECRETS: [&str; 4] = [
    "query-secret-value",
    "cookie-secret-value",
    "bearer-secret-value",
    "ticket-secret-value",
];

struct Wsgate {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Wsgate {
    fn start(config: &std::path::Path) -> Wsgate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "--log-format", "json", "-c"])
            .arg(config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Wsgate {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line (parsed) whose message is `message`, within a deadline.
    fn wait_for(&mut self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {message:?} line; saw:\n{}", self.seen.join("\n")));
            self.seen.push(line.clone());
            let value: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            if value["message"] == message {
                return value;
            }
        }
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_fields_and_never_a_secret() {
    let backend = spawn_ws_echo().await;
    let origin = spawn_http_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[listener]]
addr = "127.0.0.1:0"
[upstream.echo]
servers = ["{}"]
[upstream.web]
servers = ["{}"]
[[route]]
name = "chat"
path = "/ws"
upstream = "echo"
origins = ["https://app.example.com"]
[[route]]
name = "web"
path = "/"
upstream = "web"
"#,
            backend.addr, origin.addr
        ),
    )
    .unwrap();
    let mut wsgate = Wsgate::start(&path);
    let listening = wsgate.wait_for("listening");
    let addr: std::net::SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    for field in ["timestamp", "level", "message"] {
        assert!(listening.get(field).is_some(), "no {field}: {listening}");
    }

    let request = format!(
        "GET /page?token={}&x=1 HTTP/1.1\r\nHost: x\r\nCookie: session={}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        SECRETS[0], SECRETS[1], SECRETS[2]
    );
    let (head, _, _) = exchange(addr, &request).await;
    assert_eq!(head.status, 200);
    let access = wsgate.wait_for("request");
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["route"], "web");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/page?token=…&x=…");
    assert_eq!(access["status"], 200);
    assert_eq!(access["client_ip"], "127.0.0.1");
    assert!(access["bytes"].as_u64().is_some(), "{access}");
    assert!(access["duration_ms"].as_u64().is_some(), "{access}");

    let forbidden = format!("/ws?ticket={}", SECRETS[3]);
    let refused = ws_connect(addr, &forbidden, &[("Origin", "https://evil.example")]).await;
    assert!(refused.is_err());
    let rejected = wsgate.wait_for("request rejected");
    assert_eq!(rejected["reason"], "origin-forbidden");
    assert_eq!(rejected["origin"], "https://evil.example");
    assert_eq!(rejected["path"], "/ws?ticket=…");

    let (mut ws, _) = ws_connect(addr, "/ws", &[("Origin", "https://app.example.com")])
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        within("echo", ws.next()).await.unwrap().unwrap(),
        Message::text("hi")
    );
    ws.close(None).await.unwrap();
    drain_ws(ws).await;
    let closed = wsgate.wait_for("tunnel closed");
    assert_eq!(closed["route"], "chat");
    assert_eq!(closed["cause"], "client");
    // tungstenite closes without a code: 1005.
    assert_eq!(closed["close_code"], 1005);
    assert_eq!(closed["close_from"], "client");
    assert_eq!(closed["messages_to_upstream"], 1);
    assert_eq!(closed["origin"], "https://app.example.com");

    let all = wsgate.seen.join("\n");
    for secret in SECRETS {
        assert!(!all.contains(secret), "{secret} logged:\n{all}");
    }
    assert!(!all.contains('\u{1b}'), "colour codes in a log file");
}
