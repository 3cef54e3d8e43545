//! The access log: one line per plain HTTP request, written when its
//! response body has been sent (or abandoned), so it can say how many bytes
//! went out, as nginx's access log does.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};

/// What the line says about the request; the path has no query values
/// (they can carry tokens).
pub(crate) struct AccessLine {
    pub route: String,
    pub client_ip: IpAddr,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub started: Instant,
}

/// `response`'s body, counted, with the line written when it is done.
pub(crate) fn logged(body: ProxyBody, line: AccessLine) -> ProxyBody {
    Logged {
        inner: body,
        line: Some(line),
        bytes: 0,
    }
    .boxed()
}

struct Logged {
    inner: ProxyBody,
    line: Option<AccessLine>,
    bytes: u64,
}

impl Logged {
    fn write_line(&mut self, complete: bool) {
        if let Some(line) = self.line.take() {
            tracing::info!(
                route = %line.route,
                client_ip = %line.client_ip,
                method = %line.method,
                path = %line.path,
                status = line.status,
                bytes = self.bytes,
                complete,
                duration_ms = line.started.elapsed().as_millis() as u64,
                "request"
            );
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.write_line(true),
            Poll::Ready(Some(Err(_))) => self.write_line(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    /// A body hyper never polled to its end: an empty body hyper does not
    /// poll at all, or a client gone mid-body.
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.write_line(complete);
    }
}
