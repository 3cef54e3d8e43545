//! The real `wsgate run` as a child process, its stderr lines collected on
//! a channel, killed when dropped (a failing test leaves no process behind).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::DEADLINE;

pub struct WsgateProcess {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
}

impl WsgateProcess {
    /// `wsgate run <extra args> -c <config>` with `RUST_LOG=<log_level>`.
    pub fn start(config: &Path, extra_args: &[&str], log_level: &str) -> WsgateProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("run")
            .args(extra_args)
            .arg("-c")
            .arg(config)
            .env("RUST_LOG", log_level)
            .env("NO_COLOR", "1")
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
        WsgateProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line for which `matches` holds, within [`DEADLINE`].
    pub fn wait_for<T>(&mut self, what: &str, mut matches: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    self.seen.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Err(_) => panic!("no log line {what}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        self.wait_for(&format!("containing {needle:?}"), |line| {
            line.contains(needle).then(|| line.to_owned())
        })
    }

    /// The first listener's address, from its "listening" line.
    pub fn listening_addr(&mut self) -> SocketAddr {
        self.wait_for("saying where it listens", |line| {
            if !line.contains("listening") {
                return None;
            }
            line.split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.parse().ok())
        })
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "wsgate did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WsgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
