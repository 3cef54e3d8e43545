//! `deploy/` stays true to wsgate: the alert rules pass `promtool check
//! rules` (Debian's prometheus package, installed by .ci/run), every metric
//! the rules and the dashboard name is one a live wsgate exports, and the
//! Kubernetes config passes `wsgate check` with a grace period above the
//! drain.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Every `wsgate_…` and `process_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["wsgate_", "process_"] {
        let mut from = 0;
        while let Some(found) = text[from..].find(prefix) {
            let start = from + found;
            let before_ok = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = start
                + text[start..]
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(text.len() - start);
            if before_ok {
                names.insert(text[start..end].to_owned());
            }
            from = end;
        }
    }
    names
}

/// The sample names a live wsgate's `/metrics` shows once each kind of
/// event has happened (a family with no series yet is not printed).
async fn exported_names() -> BTreeSet<String> {
    use tokio::io::AsyncWriteExt;

    let backend = spawn_ws_echo().await;
    let (refusing, _) = spawn_raw_backend(
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let cert = test_cert(&["localhost"]);
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        [admin]
        addr = "127.0.0.1:0"
        [upstream.backend]
        servers = ["{}"]
        [upstream.refusing]
        servers = ["{refusing}"]
        [[route]]
        path = "/"
        upstream = "backend"
        missing_origin = "allow"
        [[route]]
        path = "/refused"
        upstream = "refusing"
        missing_origin = "allow"
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
        backend.addr
    ))
    .await;
    let admin = proxy.admin.unwrap();
    // A tunnel that closes, a refusal by wsgate and one by the backend, a
    // plain request, a failed TLS handshake.
    let (ws, _) = ws_connect(proxy.addrs[0], "/", &[]).await.unwrap();
    drop(ws);
    metric_becomes(admin, "wsgate_tunnels_active", &[("route", "/")], 0.0).await;
    let (head, _, _) = exchange(
        proxy.addrs[0],
        &upgrade_request("/", "x", &[("Sec-WebSocket-Version", "8")]),
    )
    .await;
    assert_eq!(head.status, 400, "two versions: a refusal by wsgate");
    let (head, _, _) = exchange(proxy.addrs[0], &upgrade_request("/refused", "x", &[])).await;
    assert_eq!(head.status, 403);
    let (head, _, _) = exchange(
        proxy.addrs[0],
        "GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    // The echo backend answers a plain GET with no HTTP response.
    assert_eq!(head.status, 502);
    let mut tls = connect(proxy.addrs[1]).await;
    tls.write_all(b"not TLS\r\n\r\n").await.unwrap();
    let _ = read_until_eof(&mut tls).await;
    let (_, text) = admin_get(admin, "/metrics").await;
    proxy.stop().await;
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[test]
fn alert_rules_pass_promtool() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or_else(|| {
            panic!("promtool is missing: .ci/run installs Debian's prometheus package for it")
        });
    let output = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("SUCCESS: 7 rules found"), "{stdout}");
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_use_is_exported() {
    let exported = exported_names().await;
    let alerts = metric_names(&read("prometheus/alerts.yml"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/wsgate.json")).expect("the dashboard is JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push_str(target["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let panels = metric_names(&exprs);
    assert!(
        alerts.len() >= 7 && panels.len() >= 10,
        "{alerts:?} {panels:?}"
    );
    let missing: Vec<&String> = alerts
        .union(&panels)
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {exported:?}"
    );
}

#[tokio::test]
async fn the_kubernetes_config_passes_check_and_the_grace_period_covers_the_drain() {
    let configmap = read("kubernetes/configmap.yaml");
    let (_, rest) = configmap
        .split_once("proxy.toml: |\n")
        .expect("a proxy.toml key");
    let toml: String = rest
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let config = parse_config(&toml, Path::new("."));
    let deployment = read("kubernetes/deployment.yaml");
    let number_after = |key: &str| -> u64 {
        let (_, rest) = deployment
            .split_once(key)
            .unwrap_or_else(|| panic!("no {key}"));
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key} is not a number"))
    };
    let grace = number_after("terminationGracePeriodSeconds:");
    let pre_stop = number_after("seconds:");
    let drain =
        pre_stop + config.server.drain_delay.as_secs() + config.server.drain_timeout.as_secs();
    assert!(
        grace > drain,
        "grace {grace} s ≤ preStop + drain_delay + drain_timeout = {drain} s"
    );
    for probe in ["path: /readyz", "path: /healthz"] {
        assert!(deployment.contains(probe), "no {probe} probe");
    }
    let pdb = read("kubernetes/pdb.yaml");
    assert!(pdb.contains("kind: PodDisruptionBudget"));
}
