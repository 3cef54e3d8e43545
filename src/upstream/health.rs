//! Server health, active and passive, and the gauge that shows it.
//!
//! Active: each interval, `GET path` on a fresh connection to every server
//! (TLS when the upstream uses it); any status below 400 passes. The loop
//! ends when its upstream is dropped by a reload.
//!
//! Passive (nginx's `max_fails`/`fail_timeout`): `max_fails` failures in a
//! row — failed connects, upgrade answers of 500 or more, or none in time —
//! take a server out of rotation for `fail_timeout`; any success resets the
//! count. When the time is up the server is back, but on trial as in nginx:
//! its count still stands, so its next failure takes it out again at once,
//! and only a success clears it.
//!
//! A server is in rotation while both say so; `wsgate_upstream_servers`
//! shows that, and each change of either is logged once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::{HealthCheck, UpstreamConfig};
use crate::metrics::{Metrics, ServerGauge};
use crate::upstream::{ConnectError, Upstream};

/// Every server's health in one upstream.
pub(crate) struct Health {
    config: Arc<UpstreamConfig>,
    servers: Vec<ServerHealth>,
}

struct ServerHealth {
    /// The last active check passed; true before the first and without checks.
    checked: AtomicBool,
    /// Passive: failures since the last success.
    fails: AtomicU32,
    /// Passive: out of rotation until its `fail_timeout` timer ends.
    out: AtomicBool,
    /// Held while a change is made and shown, so the gauge ends on the
    /// last state even when the checker and a request change it at once.
    change: Mutex<()>,
    gauge: ServerGauge,
}

impl Health {
    pub(crate) fn new(config: Arc<UpstreamConfig>, metrics: &Metrics) -> Arc<Health> {
        let servers = config
            .servers
            .iter()
            .map(|server| {
                let gauge = metrics.upstream_server(&config.name, server);
                gauge.set(true);
                ServerHealth {
                    checked: AtomicBool::new(true),
                    fails: AtomicU32::new(0),
                    out: AtomicBool::new(false),
                    change: Mutex::new(()),
                    gauge,
                }
            })
            .collect();
        Arc::new(Health { config, servers })
    }

    /// New connections and requests may go to `index`.
    pub(crate) fn in_rotation(&self, index: usize) -> bool {
        self.servers.get(index).is_some_and(|server| {
            server.checked.load(Ordering::Acquire) && !server.out.load(Ordering::Acquire)
        })
    }

    /// `index` passed its last active check, whatever passive health says.
    pub(crate) fn passes_checks(&self, index: usize) -> bool {
        self.servers
            .get(index)
            .is_some_and(|server| server.checked.load(Ordering::Acquire))
    }

    /// Records an active check's result.
    pub(crate) fn set_checked(&self, index: usize, passed: bool) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        let _change = server.change.lock();
        if server.checked.swap(passed, Ordering::AcqRel) == passed {
            return;
        }
        let name = &self.config.servers[index];
        if passed {
            tracing::info!(upstream = %self.config.name, server = %name, "server passed its health check again");
        } else {
            tracing::warn!(upstream = %self.config.name, server = %name, "server failed its health check; no new connections");
        }
        server.gauge.set(self.in_rotation(index));
    }

    /// Passive: an attempt on `index` failed.
    pub(crate) fn failed(self: &Arc<Self>, index: usize) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        let fails = server
            .fails
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |fails| {
                Some(fails.saturating_add(1))
            })
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let passive = self.config.passive_health;
        if fails < passive.max_fails {
            return;
        }
        let _change = server.change.lock();
        if server.out.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            upstream = %self.config.name,
            server = %self.config.servers[index],
            fails,
            fail_timeout = ?passive.fail_timeout,
            "server failed too often in a row; out of rotation for fail_timeout"
        );
        server.gauge.set(self.in_rotation(index));
        // Holds the health weakly: a reload that drops the upstream ends
        // the wait's effect, not the other way round.
        let health = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(passive.fail_timeout).await;
            if let Some(health) = health.upgrade() {
                health.back_in(index);
            }
        });
    }

    /// Passive: an attempt on `index` succeeded.
    pub(crate) fn succeeded(&self, index: usize) {
        if let Some(server) = self.servers.get(index) {
            // Read first: most successes find nothing to reset, and a
            // write would move the cache line between cores each request.
            if server.fails.load(Ordering::Relaxed) != 0 {
                server.fails.store(0, Ordering::Release);
            }
        }
    }

    /// `fail_timeout` is over: `index` is on trial.
    fn back_in(&self, index: usize) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        let _change = server.change.lock();
        if !server.out.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::info!(
            upstream = %self.config.name,
            server = %self.config.servers[index],
            "server back in rotation after fail_timeout; its next failure takes it out again"
        );
        server.gauge.set(self.in_rotation(index));
    }
}

/// Why one server failed its health check (logged at debug).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("invalid health check request: {0}")]
    Request(#[source] http::Error),
    #[error("request failed: {0}")]
    Send(#[source] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("timed out")]
    TimedOut,
}

pub async fn check_forever(upstream: Weak<Upstream>, check: HealthCheck) {
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        for index in 0..upstream.config.servers.len() {
            let passed = tokio::time::timeout(check.interval, probe(&upstream, index, &check.path))
                .await
                .unwrap_or(Err(ProbeError::TimedOut));
            if let Err(why) = &passed {
                tracing::debug!(upstream = %upstream.config.name, server = %upstream.config.servers[index], %why, "health check failed");
            }
            upstream.health.set_checked(index, passed.is_ok());
        }
    }
}

async fn probe(upstream: &Arc<Upstream>, index: usize, path: &str) -> Result<(), ProbeError> {
    let (stream, _) = upstream.connect_to(index, &[]).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(ProbeError::Handshake)?;
    tokio::spawn(connection);
    let host = upstream.config.servers[index].clone();
    let request = Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "wsgate-health-check")
        .body(Empty::new())
        .map_err(ProbeError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(ProbeError::Send)?;
    if response.status() < StatusCode::BAD_REQUEST {
        Ok(())
    } else {
        Err(ProbeError::Status(response.status()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    fn health(max_fails: u32, fail_timeout: &str) -> (Arc<Health>, Arc<Metrics>) {
        let toml = format!(
            r#"
            [[listener]]
            addr = "127.0.0.1:0"
            [upstream.u]
            servers = ["127.0.0.1:1", "127.0.0.1:2"]
            max_fails = {max_fails}
            fail_timeout = "{fail_timeout}"
            [[route]]
            upstream = "u"
            "#
        );
        let config = Config::parse(&toml, std::path::Path::new(".")).unwrap();
        let metrics = Metrics::new();
        let upstream = config.upstreams["u"].clone();
        (Health::new(upstream, &metrics), metrics)
    }

    fn shown(metrics: &Metrics, server: &str, state: &str) -> bool {
        let wanted = format!(
            "wsgate_upstream_servers{{upstream=\"u\",server=\"{server}\",state=\"{state}\"}} 1"
        );
        metrics.encode().lines().any(|line| line == wanted)
    }

    #[tokio::test]
    async fn max_fails_in_a_row_take_a_server_out_and_a_success_resets_the_count() {
        let (health, metrics) = health(3, "1h");
        health.failed(0);
        health.failed(0);
        health.succeeded(0);
        health.failed(0);
        health.failed(0);
        assert!(health.in_rotation(0), "the success reset the count");
        assert!(shown(&metrics, "127.0.0.1:1", "up"));
        health.failed(0);
        assert!(!health.in_rotation(0));
        assert!(health.passes_checks(0), "passive health is not the checks'");
        assert!(health.in_rotation(1), "the other server is untouched");
        assert!(shown(&metrics, "127.0.0.1:1", "down"));
        assert!(shown(&metrics, "127.0.0.1:2", "up"));
    }

    #[tokio::test]
    async fn after_fail_timeout_a_server_is_on_trial() {
        let (health, metrics) = health(2, "1h");
        health.failed(1);
        health.failed(1);
        assert!(!health.in_rotation(1));
        // The timer's effect, without waiting an hour for it.
        health.back_in(1);
        assert!(health.in_rotation(1));
        assert!(shown(&metrics, "127.0.0.1:2", "up"));
        health.failed(1);
        assert!(!health.in_rotation(1), "one failure on trial takes it out");
        health.back_in(1);
        health.succeeded(1);
        health.failed(1);
        assert!(health.in_rotation(1), "a success ended the trial");
    }

    #[tokio::test]
    async fn the_timer_brings_a_server_back() {
        let (health, metrics) = health(1, "50ms");
        health.failed(0);
        assert!(!health.in_rotation(0));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !health.in_rotation(0) {
            assert!(tokio::time::Instant::now() < deadline, "never back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(shown(&metrics, "127.0.0.1:1", "up"));
    }

    #[tokio::test]
    async fn both_kinds_must_agree_for_up() {
        let (health, metrics) = health(1, "1h");
        health.set_checked(0, false);
        assert!(shown(&metrics, "127.0.0.1:1", "down"));
        health.failed(0);
        health.set_checked(0, true);
        assert!(
            shown(&metrics, "127.0.0.1:1", "down"),
            "passive still says out"
        );
        health.back_in(0);
        assert!(shown(&metrics, "127.0.0.1:1", "up"));
    }
}
