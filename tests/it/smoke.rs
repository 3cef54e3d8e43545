use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn upgrade_and_echo_through_plaintext_listener() {
    let mut backend = spawn_ws_echo().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        path = "/ws"
        upstream = "echo"
        origins = ["https://app.example.com"]
        "#,
        backend.addr
    ))
    .await;
    let (mut ws, response) = ws_connect(
        proxy.addr(),
        "/ws/room?x=1",
        &[("Origin", "https://app.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    let seen = backend.next_request().await;
    assert_eq!(seen.uri, "/ws/room?x=1");
    assert_eq!(
        seen.one("origin").as_deref(),
        Some("https://app.example.com")
    );
    ws.send(Message::text("hello")).await.unwrap();
    let echoed = within("echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(echoed, Message::text("hello"));
    ws.close(None).await.unwrap();
    drop(ws);
    proxy.stop().await;
}
