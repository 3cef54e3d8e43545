//! The body type of every response the proxy hands hyper: an origin's
//! streamed body, a backend refusal streamed off its connection
//! ([`crate::ws::refusal`]), or one of our own fixed bodies.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// A response body's error: hyper's from an origin's body, ours from a
/// refusal streamed off a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
