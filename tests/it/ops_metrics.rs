//! `/metrics` as operators scrape it: the Prometheus text format unless
//! OpenMetrics is asked for, the process metrics, build info, reloads, TLS
//! handshake failures and backend refusals of upgrades.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;

use crate::common::*;

async fn scrape(admin: SocketAddr, accept: Option<&str>) -> (Head, String) {
    let mut stream = connect(admin).await;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    raw_request(
        &mut stream,
        &format!("GET /metrics HTTP/1.1\r\nHost: admin\r\n{accept}Connection: close\r\n\r\n"),
    )
    .await
}

fn config(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        {listener_extra}
        [admin]
        addr = "127.0.0.1:0"
        [upstream.backend]
        servers = ["{backend}"]
        [[route]]
        name = "chat"
        path = "/"
        upstream = "backend"
        missing_origin = "allow"
        "#
    )
}

#[tokio::test]
async fn metrics_speak_prometheus_text_unless_openmetrics_is_asked_for() {
    let backend = spawn_ws_echo().await;
    let proxy = start_proxy(&config(backend.addr, "")).await;
    let admin = proxy.admin.unwrap();
    let (head, text) = scrape(admin, None).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.get("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    // The 0.0.4 format: TYPE names are the samples' names, no EOF.
    assert!(
        text.contains("# TYPE wsgate_handshakes_total counter\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE wsgate_tunnels_active gauge\n"));
    assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
    assert!(!text.contains("# EOF"));
    for line in text.lines().filter(|line| line.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap_or_default();
        let kind = line.split_whitespace().nth(3).unwrap_or_default();
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
    assert_eq!(
        metric(
            &text,
            "wsgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for name in [
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        let value = metric(&text, name, &[]).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert!(
            value > 0.0 || name == "process_cpu_seconds_total",
            "{name} = {value}"
        );
    }
    let fds = metric(&text, "process_open_fds", &[]).unwrap_or_default();
    let real = std::fs::read_dir("/proc/self/fd").unwrap().count() as f64;
    assert!(
        (fds - real).abs() <= 8.0,
        "process_open_fds {fds}, /proc says {real}"
    );

    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (head, text) = scrape(admin, Some(prometheus)).await;
    assert_eq!(
        head.get("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(text.contains("# TYPE wsgate_handshakes counter\n"));
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn reloads_are_counted_by_result() {
    let backend = spawn_ws_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = config(backend.addr, "");
    std::fs::write(&path, &text).unwrap();
    let proxy = start_proxy(&text).await;
    let admin = proxy.admin.unwrap();
    let reloads = |result: &'static str| async move {
        admin_metric(admin, "wsgate_reloads_total", &[("result", result)]).await
    };
    assert_eq!((reloads("ok").await, reloads("failed").await), (0.0, 0.0));
    proxy.reloader.reload_from(&path).unwrap();
    std::fs::write(&path, "[[listener]]\naddr = \"127.0.0.1:0\"\ntypo = 1\n").unwrap();
    assert!(proxy.reloader.reload_from(&path).is_err());
    assert_eq!((reloads("ok").await, reloads("failed").await), (1.0, 1.0));
    proxy.stop().await;
}

#[tokio::test]
async fn failed_tls_handshakes_are_counted_per_listener() {
    let backend = spawn_ws_echo().await;
    let cert = test_cert(&["localhost"]);
    let tls = format!(
        "tls = {{ certs = [ {{ cert = \"{}\", key = \"{}\" }} ] }}",
        cert.cert_path.display(),
        cert.key_path.display()
    );
    let proxy = start_proxy(&config(backend.addr, &tls)).await;
    let admin = proxy.admin.unwrap();
    // Not TLS at all: what a plain-HTTP client or a scanner sends.
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until_eof(&mut stream).await.first(),
        Some(&0x15),
        "a TLS alert"
    );
    metric_becomes(
        admin,
        "wsgate_tls_handshake_failures_total",
        &[("listener", "127.0.0.1:0")],
        1.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn backend_refusals_of_upgrades_are_counted_by_status() {
    let (backend, _) = spawn_raw_backend(
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\nconnection: close\r\n\r\nno way",
    )
    .await;
    let proxy = start_proxy(&config(backend, "")).await;
    let admin = proxy.admin.unwrap();
    for _ in 0..2 {
        let (head, body, _) = exchange(proxy.addr(), &upgrade_request("/", "x", &[])).await;
        assert_eq!((head.status, body.as_str()), (403, "no way"));
    }
    assert_eq!(
        admin_metric(
            admin,
            "wsgate_upstream_refusals_total",
            &[("route", "chat"), ("status", "403")]
        )
        .await,
        2.0
    );
    proxy.stop().await;
}
