//! `wsgate check` run as a real process on real files.

use std::path::Path;

use crate::common::*;

const WSGATE: &str = env!("CARGO_BIN_EXE_wsgate");

struct Outcome {
    code: Option<i32>,
    stdout: String,
}

async fn check(config: &Path) -> Outcome {
    let output = within(
        "wsgate check",
        tokio::process::Command::new(WSGATE)
            .arg("check")
            .arg("-c")
            .arg(config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

/// The problem lines of `check`'s report, keyed by their TOML path.
fn problem_line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .map(str::trim)
        .find(|line| {
            line.starts_with(&format!("{key}:")) || line.starts_with(&format!("{key} (line"))
        })
        .unwrap_or_else(|| panic!("no problem reported for {key}:\n{stdout}"))
}

/// Everything wrong in one file except unknown keys, which stop parsing.
const SEVERAL_PROBLEMS: &str = r#"
[[listener]]
addr = "127.0.0.1:0"
tls = { certs = [ { cert = "missing.crt", key = "missing.key" } ] }

[server]
trusted_proxies = ["10.0.0.0/33"]

[upstream.chat]
servers = ["127.0.0.1:9000"]

[[route]]
path = "/ws"
upstream = "chat"
idle_timeout = "forever"
origins = ["https://app.example.com/", "*"]
allow_ips = ["not-an-ip"]

[[route]]
path = "/other"
upstream = "nope"
"#;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn example_config_in_the_repository_passes_check() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let outcome = check(&example).await;
    assert_eq!(outcome.code, Some(0), "{}", outcome.stdout);
    assert_eq!(outcome.stdout.trim(), "config ok");
}

#[tokio::test]
async fn check_lists_every_problem_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "proxy.toml", SEVERAL_PROBLEMS);
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    let out = &outcome.stdout;
    assert!(problem_line(out, "listener[0].tls.certs[0].cert").contains("missing.crt"));
    assert!(problem_line(out, "server.trusted_proxies[0]").contains("10.0.0.0/33"));
    assert!(problem_line(out, "route[0].idle_timeout").contains("forever"));
    assert!(problem_line(out, "route[0].origins[0]").contains("https://app.example.com/"));
    assert!(problem_line(out, "route[0].origins[1]").contains("allow_any_origin"));
    assert!(problem_line(out, "route[0].allow_ips[0]").contains("not-an-ip"));
    assert!(problem_line(out, "route[1].upstream").contains("nope"));
    assert!(!out.contains("config ok"));
}

#[tokio::test]
async fn check_names_an_unknown_key_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        "[[listener]]\naddr = \"127.0.0.1:0\"\n[upstream.chat]\nservers = [\"127.0.0.1:9000\"]\n\
         [[route]]\npath = \"/ws\"\nupstream = \"chat\"\nidel_timeout = \"1s\"\n",
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    let line = problem_line(&outcome.stdout, "route[0].idel_timeout");
    assert!(line.contains("line 8"), "{line}");
    assert!(line.contains("unknown key"), "{line}");
}

#[tokio::test]
async fn check_lists_an_unknown_key_together_with_the_other_problems() {
    let dir = tempfile::tempdir().unwrap();
    let text = SEVERAL_PROBLEMS.replace(
        "idle_timeout = \"forever\"",
        "idle_timeout = \"forever\"\nidel_timeout = \"1s\"",
    );
    let config = write(&dir, "proxy.toml", &text);
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    for key in [
        "route[0].idel_timeout",
        "listener[0].tls.certs[0].cert",
        "server.trusted_proxies[0]",
        "route[0].idle_timeout",
        "route[0].origins[0]",
        "route[0].origins[1]",
        "route[0].allow_ips[0]",
        "route[1].upstream",
    ] {
        problem_line(&outcome.stdout, key);
    }
}

#[tokio::test]
async fn check_names_bad_tunnel_and_drain_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        r#"
[[listener]]
addr = "127.0.0.1:0"

[server]
drain_timeout = "4s"
drain_spread = "5s"
drain_close_code = 1000
drain_delay = "soon"

[upstream.chat]
servers = ["127.0.0.1:9000"]

[[route]]
path = "/ws"
upstream = "chat"
ping_timeout = "5s"
max_message_bytes = 0

[[route]]
path = "/other"
upstream = "chat"
ping_interval = "0s"
"#,
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    let out = &outcome.stdout;
    assert!(problem_line(out, "server.drain_spread").contains("longer than drain_timeout"));
    assert!(problem_line(out, "server.drain_close_code").contains("1000 is not 1012"));
    assert!(problem_line(out, "server.drain_delay").contains("soon"));
    assert!(problem_line(out, "route[0].ping_timeout").contains("ping_interval"));
    assert!(problem_line(out, "route[0].max_message_bytes").contains("0 is not"));
    assert!(problem_line(out, "route[1].ping_interval").contains("longer than 0s"));
}

#[tokio::test]
async fn check_warns_of_a_route_that_can_never_upgrade_and_still_passes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        r#"
[[listener]]
addr = "127.0.0.1:0"
[upstream.chat]
servers = ["127.0.0.1:9000"]
[[route]]
name = "chat"
path = "/ws"
upstream = "chat"
"#,
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(0), "{}", outcome.stdout);
    let warning = outcome
        .stdout
        .lines()
        .find(|line| line.starts_with("warning: route[0]:"))
        .unwrap_or_else(|| panic!("no warning:\n{}", outcome.stdout));
    assert!(warning.contains("can never upgrade"), "{warning}");
    assert!(outcome.stdout.trim_end().ends_with("config ok"));
}

#[tokio::test]
async fn check_refuses_durations_that_would_cut_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        r#"
[[listener]]
addr = "127.0.0.1:0"
[server]
header_timeout = "0s"
[upstream.chat]
servers = ["127.0.0.1:9000"]
connect_timeout = "0ms"
[[route]]
path = "/ws"
upstream = "chat"
missing_origin = "allow"
idle_timeout = "0s"
handshake_timeout = "0s"
"#,
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    for key in [
        "server.header_timeout",
        "upstream.chat.connect_timeout",
        "route[0].idle_timeout",
        "route[0].handshake_timeout",
    ] {
        assert!(
            problem_line(&outcome.stdout, key).contains("would cut every connection"),
            "{key}"
        );
    }
}

#[tokio::test]
async fn a_misspelt_required_key_is_named_as_the_typo_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        r#"
[[listener]]
addr = "127.0.0.1:0"
[upstream.chat]
servers = ["127.0.0.1:9000"]
[[route]]
path = "/ws"
upstrem = "chat"
"#,
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    let line = problem_line(&outcome.stdout, "route[0].upstrem");
    assert!(line.contains("did you mean `upstream`?"), "{line}");
    assert!(line.contains("line 8"), "{line}");
    assert!(
        !outcome.stdout.contains("missing field"),
        "{}",
        outcome.stdout
    );
}

/// One syntax error does not hide the file's other problems.
#[tokio::test]
async fn a_syntax_error_is_reported_with_the_problems_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "proxy.toml",
        r#"
[[listener]]
addr = "127.0.0.1:0"
[server]
drain_timeout = "30s
[upstream.chat]
servers = ["127.0.0.1:9000"]
[[route]]
path = "/ws"
upstream = "chat"
idle_timeout = "forever"
origins = ["https://app.example.com/"]
typo_key = 1
"#,
    );
    let outcome = check(&config).await;
    assert_eq!(outcome.code, Some(1), "{}", outcome.stdout);
    let out = &outcome.stdout;
    assert!(out.contains("line 5"), "the syntax error's line:\n{out}");
    assert!(problem_line(out, "route[0].idle_timeout").contains("forever"));
    assert!(problem_line(out, "route[0].origins[0]").contains("https://app.example.com/"));
    assert!(problem_line(out, "route[0].typo_key").contains("unknown key"));
    assert!(out.contains("4 problems"), "{out}");
}
