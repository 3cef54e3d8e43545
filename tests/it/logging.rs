//! Every rejection is one structured log line with route, client IP, origin
//! and reason, and a token in the query string never appears in clear.
//!
//! The tests run on a current-thread runtime, so the proxy's tasks run on the
//! test's own thread and a thread-local subscriber sees exactly their events.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::common::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn rejection_is_logged_once_with_its_facts_and_no_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // With a single scoped subscriber alive, tracing-core computes a new
    // callsite's interest from the registering thread's own default, so a
    // callsite first hit by another test's thread would be cached as "never".
    // A second live dispatcher makes it combine all of them instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [server]
        drain_timeout = "1s"
        [upstream.echo]
        servers = ["{}"]
        [[route]]
        name = "chat"
        path = "/ws"
        upstream = "echo"
        origins = ["https://app.example.com"]
        "#,
        backend.addr
    ))
    .await;
    let request = upgrade_request(
        "/ws?token=SUPERSECRET123&room=7",
        "x",
        &[("Origin", "https://evil.test")],
    );
    // Other tests' threads may have registered the proxy's callsites while
    // no subscriber wanted them; re-ask every callsite now that ours exists.
    tracing::callsite::rebuild_interest_cache();
    let (head, body, _) = exchange(proxy.addr(), &request).await;
    assert_rejected(&head, &body, 403, "origin-forbidden");
    proxy.stop().await;

    let logs = captured.text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("origin-forbidden"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one rejection line:\n{logs}");
    let line = lines[0];
    for fact in ["chat", "127.0.0.1", "https://evil.test", "origin-forbidden"] {
        assert!(line.contains(fact), "{fact} missing from {line}");
    }
    assert!(
        line.contains("token="),
        "the parameter name may be logged: {line}"
    );
    assert!(
        !logs.contains("SUPERSECRET123"),
        "the token leaked into the logs:\n{logs}"
    );
}
