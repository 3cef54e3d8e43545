//! Active upstream health checks: each interval, `GET path` on a fresh
//! connection to every server (TLS when the upstream uses it); any status
//! below 400 passes. The loop ends when its upstream is dropped by a reload.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::HealthCheck;
use crate::upstream::{ConnectError, Upstream};

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
            upstream.set_healthy(index, passed.is_ok());
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
