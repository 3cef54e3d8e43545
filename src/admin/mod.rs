//! The admin listener: `GET /metrics` (Prometheus text, or OpenMetrics on
//! request), `/healthz` (the process is up) and `/readyz` (it accepts
//! traffic; 503 once draining, so a load balancer stops sending new clients
//! first).

mod exposition;
mod process;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        // Runs until the proxy has fully stopped, not merely stopped
        // accepting: /readyz answering 503 while draining is its point.
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |request| answer(request, metrics.clone(), ready.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// wsgate's families, then the process metrics, as one OpenMetrics text.
fn metrics_text(metrics: &Metrics) -> String {
    let mut text = metrics.encode();
    if let Some(body) = text.strip_suffix("# EOF\n") {
        text.truncate(body.len());
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(process::ProcessCollector::new()));
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.push_str("# EOF\n");
    }
    text
}

async fn answer(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let accept = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|value| value.to_str().ok());
            let openmetrics = metrics_text(&metrics);
            if exposition::wants_openmetrics(accept) {
                (StatusCode::OK, exposition::OPENMETRICS, openmetrics)
            } else {
                (
                    StatusCode::OK,
                    exposition::PROMETHEUS_TEXT,
                    exposition::to_prometheus_text(&openmetrics),
                )
            }
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        (&Method::GET, "/readyz") if ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    Ok(response)
}
