//! Forward auth, like nginx `auth_request` and Traefik ForwardAuth: for
//! services whose login is a session cookie, the decision is delegated to an
//! HTTP endpoint. It gets a `GET` carrying the client's method, URI and
//! credentials; 2xx allows, 401/403 are relayed, anything else means the auth
//! service is not doing its job, which is a 503 — never an allow.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, ORIGIN};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::Rejection;
use crate::headers::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP};

const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

/// The request headers the auth service sees, every value of each. The
/// forwarding ones are the proxy's own by the time the check runs (the head is
/// rewritten first), so an untrusted client cannot forge them.
const PASSED_ON: [HeaderName; 7] = [
    ORIGIN,
    COOKIE,
    AUTHORIZATION,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    X_FORWARDED_FOR,
    X_REAL_IP,
];

/// A relayed 401/403 body is cut here: it goes to the client, and an auth
/// service should not be able to make us buffer without bound.
pub(crate) const MAX_BODY: usize = 64 * 1024;

pub(crate) struct ForwardAuth {
    url: Uri,
    timeout: Duration,
    /// Headers of a 2xx answer copied onto the upstream request (e.g. `X-User`).
    copy_headers: Vec<HeaderName>,
    /// Keeps connections to the auth service open between requests.
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for ForwardAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardAuth")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("copy_headers", &self.copy_headers)
            .finish_non_exhaustive()
    }
}

impl ForwardAuth {
    /// `url` must already be validated as `http://host[:port]/path`.
    pub fn new(url: Uri, timeout: Duration, copy_headers: Vec<HeaderName>) -> ForwardAuth {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        ForwardAuth {
            url,
            timeout,
            copy_headers,
            client,
        }
    }

    pub fn copy_headers(&self) -> &[HeaderName] {
        &self.copy_headers
    }

    /// Asks the auth service about `parts`; `Ok` holds the headers to add upstream.
    pub async fn check(&self, parts: &Parts) -> Result<Vec<(HeaderName, HeaderValue)>, Rejection> {
        match tokio::time::timeout(self.timeout, self.ask(parts)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Rejection::AuthUnavailable {
                detail: format!(
                    "the auth service at {} did not answer within {:?}",
                    self.url, self.timeout
                ),
            }),
        }
    }

    async fn ask(&self, parts: &Parts) -> Result<Vec<(HeaderName, HeaderValue)>, Rejection> {
        let response = self
            .client
            .request(self.subrequest(parts))
            .await
            .map_err(|error| {
                let what = if error.is_connect() {
                    "is unreachable"
                } else {
                    "failed"
                };
                Rejection::AuthUnavailable {
                    detail: format!(
                        "the auth service at {} {what}: {}",
                        self.url,
                        error_chain(&error)
                    ),
                }
            })?;
        let status = response.status();
        // What a client needs to act on a refusal: the challenge, the body's
        // type, and where to log in.
        let relayed: http::HeaderMap = every_value(
            response.headers(),
            &[
                http::header::WWW_AUTHENTICATE,
                http::header::CONTENT_TYPE,
                http::header::LOCATION,
            ],
        )
        .collect();
        let copied: Vec<(HeaderName, HeaderValue)> =
            every_value(response.headers(), &self.copy_headers).collect();
        // Reading the body (bounded) lets the connection go back to the pool.
        let body = read_bounded(response.into_body()).await;
        if status.is_success() {
            return Ok(copied);
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Rejection::AuthDenied {
                status,
                headers: Box::new(relayed),
                body: body.unwrap_or_default(),
            });
        }
        Err(Rejection::AuthUnavailable {
            detail: format!(
                "the auth service at {} answered {status}; only 2xx, 401 and 403 are understood",
                self.url
            ),
        })
    }

    fn subrequest(&self, parts: &Parts) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        if let Ok(method) = HeaderValue::from_str(parts.method.as_str()) {
            headers.insert(X_FORWARDED_METHOD, method);
        }
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str());
        if let Ok(target) = HeaderValue::from_str(target) {
            headers.insert(X_FORWARDED_URI, target);
        }
        headers.extend(every_value(&parts.headers, &PASSED_ON));
        request
    }
}

/// Every value of each of `names`, as (name, value) pairs.
fn every_value<'a>(
    headers: &'a http::HeaderMap,
    names: &'a [HeaderName],
) -> impl Iterator<Item = (HeaderName, HeaderValue)> + 'a {
    names.iter().flat_map(move |name| {
        headers
            .get_all(name)
            .iter()
            .map(move |value| (name.clone(), value.clone()))
    })
}

/// Up to [`MAX_BODY`] bytes of the body; `None` if reading it failed.
async fn read_bounded(mut body: hyper::body::Incoming) -> Option<Bytes> {
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        let room = MAX_BODY - collected.len();
        collected.extend_from_slice(&data[..data.len().min(room)]);
        if collected.len() == MAX_BODY {
            break;
        }
    }
    Some(Bytes::from(collected))
}

/// "client error (Connect): tcp connect error: Connection refused (os error 111)".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
