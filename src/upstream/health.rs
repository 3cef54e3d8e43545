//! Active upstream health checks: each interval, `GET path` on a fresh
//! connection to every server (TLS when the upstream uses it); any status
//! below 400 passes. The loop ends when its upstream is dropped by a reload.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::HealthCheck;
use crate::upstream::Upstream;

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
                .unwrap_or(Err("timed out".to_owned()));
            if let Err(why) = &passed {
                tracing::debug!(upstream = %upstream.config.name, server = %upstream.config.servers[index], %why, "health check failed");
            }
            upstream.set_healthy(index, passed.is_ok());
        }
    }
}

async fn probe(upstream: &Arc<Upstream>, index: usize, path: &str) -> Result<(), String> {
    let (stream, _) = upstream
        .connect_to(index, &[])
        .await
        .map_err(|error| error.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|error| error.to_string())?;
    tokio::spawn(connection);
    let host = upstream.config.servers[index].clone();
    let request = Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "wsgate-health-check")
        .body(Empty::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| error.to_string())?;
    if response.status() < StatusCode::BAD_REQUEST {
        Ok(())
    } else {
        Err(format!("answered {}", response.status()))
    }
}
