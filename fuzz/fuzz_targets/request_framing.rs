//! The first head wsgate refuses itself (`wire::malformed`) against hyper,
//! configured as wsgate's HTTP/1.1 server is, serving the same head:
//!
//! - a head wsgate refuses is one hyper would not serve either;
//! - a head wsgate passes on never gets hyper's bare 400 — the refusal
//!   without a reason that the check exists to replace.
//!
//! Input: a complete head (up to its blank line); what follows is ignored.

#![no_main]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::fuzzing::first_head_problem;
use wsgate_fuzz::{reference_head_end, runtime};

/// wsgate's default `max_header_bytes`; a longer first head is a 431 before
/// either check runs.
const MAX_HEAD: usize = 16384;

#[derive(Debug)]
enum Hyper {
    /// The service was called: hyper took it as a request.
    Served,
    /// hyper answered by itself with this status.
    Refused(u16),
    /// hyper closed without an answer.
    Silent,
}

async fn hyper_verdict(head: &[u8]) -> Hyper {
    let (client, server) = tokio::io::duplex(4 * MAX_HEAD);
    let served = Arc::new(AtomicBool::new(false));
    let flag = served.clone();
    let service = service_fn(move |_request| {
        flag.store(true, Ordering::SeqCst);
        async { Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new())) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_buf_size((MAX_HEAD * 4).max(64 * 1024))
        .max_headers(512)
        .preserve_header_case(true)
        .keep_alive(true);
    let serving = tokio::spawn(async move {
        let _ = builder
            .serve_connection(TokioIo::new(server), service)
            .with_upgrades()
            .await;
    });
    let (mut read, mut write) = tokio::io::split(client);
    let _ = write.write_all(head).await;
    let _ = write.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), read.read_to_end(&mut answer)).await;
    serving.abort();
    if served.load(Ordering::SeqCst) {
        return Hyper::Served;
    }
    let mut fields = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(&answer) {
        Ok(_) => response.code.map_or(Hyper::Silent, Hyper::Refused),
        Err(_) => Hyper::Silent,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(end) = reference_head_end(data) else {
        return;
    };
    if end > MAX_HEAD {
        return;
    }
    let head = &data[..end];
    let problem = first_head_problem(head);
    let hyper = runtime().block_on(hyper_verdict(head));
    match (problem, &hyper) {
        (Some(problem), Hyper::Served) => {
            panic!("wsgate refuses ({problem}) a head hyper serves: {head:?}")
        }
        (None, Hyper::Refused(400)) => panic!("a bare 400 from hyper for {head:?}"),
        _ => {}
    }
});
