//! A WebSocket echo backend, built in so that `wsgate demo`, the benchmarks and
//! users trying wsgate out have something real to proxy to.
//!
//! Every data message comes back unchanged. The one exception is the text
//! message [`HEADERS_PROBE`], answered with a JSON object of the request headers
//! the backend received: that is how the demo shows what the proxy forwarded.

use std::collections::BTreeMap;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Text message that asks the echo backend for the headers of its upgrade request.
pub const HEADERS_PROBE: &str = "wsgate-echo:headers";

/// Accepts connections until the listener fails; each connection gets its own task.
pub async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo_connection(stream));
            }
            // Running out of descriptors is transient; anything else is per-connection.
            Err(error) => {
                tracing::debug!(%error, "echo backend accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut seen_headers = BTreeMap::new();
    // tungstenite fixes the callback's error type; its size is not ours to change.
    #[allow(clippy::result_large_err)]
    let capture = |request: &Request, mut response: Response| {
        for (name, value) in request.headers() {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            seen_headers
                .entry(name.as_str().to_owned())
                .and_modify(|existing: &mut String| {
                    existing.push_str(", ");
                    existing.push_str(&value);
                })
                .or_insert(value);
        }
        // Pick the client's first offered subprotocol, as a typical backend would.
        let first_offer = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|value| value.to_str().ok())
            .and_then(|list| list.split(',').next())
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .and_then(|token| HeaderValue::from_str(token).ok());
        if let Some(protocol) = first_offer {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", protocol);
        }
        Ok(response)
    };
    // tungstenite's 128 KiB default read buffer per connection would make the
    // backend, not the proxy, the memory hog in idle-connection benchmarks.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(64 << 20));
    let Ok(mut socket) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, capture, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == HEADERS_PROBE => {
                let json = serde_json::to_string(&seen_headers).unwrap_or_default();
                Message::text(json)
            }
            Message::Text(_) | Message::Binary(_) => message,
            // tungstenite answers pings and echoes the close frame by itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            // tungstenite queued the close reply; flush it before dropping the socket.
            Message::Close(_) => {
                let _ = socket.flush().await;
                break;
            }
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
