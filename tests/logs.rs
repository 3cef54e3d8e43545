//! Logs as the real binary writes them: `--log-format json` gives one JSON
//! object a line with timestamp, level, message and every field; a plain
//! request gets an access line, a tunnel its end line; secrets (query
//! values, cookies, Authorization, tokens) never appear, even at debug.

#[path = "common/mod.rs"]
mod common;

use common::process::WsgateProcess;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const SECRETS: [&str; 4] = [
    "query-secret-value",
    "cookie-secret-value",
    "bearer-secret-value",
    "ticket-secret-value",
];

/// The next line, parsed, whose message is `message`; every line must be JSON.
fn wait_for(wsgate: &mut WsgateProcess, message: &str) -> serde_json::Value {
    wsgate.wait_for(&format!("with message {message:?}"), |line| {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        (value["message"] == message).then_some(value)
    })
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
    let mut wsgate = WsgateProcess::start(&path, &["--log-format", "json"], "debug");
    let listening = wait_for(&mut wsgate, "listening");
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
    let access = wait_for(&mut wsgate, "request");
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
    let rejected = wait_for(&mut wsgate, "request rejected");
    assert_eq!(rejected["reason"], "origin-forbidden");
    assert_eq!(rejected["origin"], "https://evil.example");
    assert_eq!(rejected["path"], "/ws?ticket=…");
    assert_eq!(rejected["protocol"], "http/1.1");

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
    let closed = wait_for(&mut wsgate, "tunnel closed");
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
