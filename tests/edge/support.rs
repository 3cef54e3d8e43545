//! Helpers for the edge tests: framed responses on raw sockets, exact
//! rejection checks, keys and tokens made at run time, a plain HTTP backend
//! and a forward-auth service, both on hyper and both reporting what they saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub use crate::common::*;

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 on a socket.
// ---------------------------------------------------------------------------

/// Writes `request` and reads exactly one response: the head, then a body
/// framed by `Content-Length` or chunked encoding (none for 1xx/204/304). The
/// connection stays usable (keep-alive, or the tunnel after a 101).
pub async fn send_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> (Head, String) {
    within("a response from the proxy", async {
        stream.write_all(request).await.unwrap();
        let text = read_head(stream).await;
        assert!(
            text.ends_with("\r\n\r\n"),
            "no complete response head: {text:?}"
        );
        let head = Head::parse(&text);
        if head.status < 200 || head.status == 204 || head.status == 304 {
            return (head, String::new());
        }
        let mut body = Vec::new();
        if let Some(length) = head.get("content-length") {
            body.resize(length.parse().unwrap(), 0);
            stream.read_exact(&mut body).await.unwrap();
        } else if head
            .get("transfer-encoding")
            .is_some_and(|value| value.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size_line = read_crlf_line(stream).await;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                let mut chunk = vec![0u8; size + 2];
                stream.read_exact(&mut chunk).await.unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            stream.read_to_end(&mut body).await.unwrap();
        }
        (head, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

async fn read_crlf_line<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 4096 {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_owned()
}

/// One request on a new connection; the connection is handed back.
pub async fn send(addr: SocketAddr, request: &str) -> (Head, String, TcpStream) {
    let mut stream = connect(addr).await;
    let (head, body) = send_on(&mut stream, request.as_bytes()).await;
    (head, body, stream)
}

/// An upgrade to `path` with extra header lines; returns status, headers and
/// body (the connection is dropped).
pub async fn upgrade(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> (Head, String) {
    let (head, body, _stream) = send(addr, &upgrade_request(path, "edge.test", extra)).await;
    (head, body)
}

/// A plain GET (keep-alive) with extra header lines.
pub fn plain_request(method: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: edge.test\r\n");
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" || method == "PUT" {
        request.push_str("Content-Length: 5\r\n\r\nhello");
    } else {
        request.push_str("\r\n");
    }
    request
}

/// All values of a response header.
pub fn header_values(head: &Head, name: &str) -> Vec<String> {
    head.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// A rejection exactly as the contract describes it: status, one
/// `wsgate-reason`, a plain-text body naming the reason.
#[track_caller]
pub fn assert_reject(head: &Head, body: &str, status: u16, reason: &str) {
    assert_eq!(
        head.status, status,
        "status; headers {:?}, body {body:?}",
        head.headers
    );
    assert_eq!(
        header_values(head, "wsgate-reason"),
        [reason],
        "wsgate-reason; headers {:?}, body {body:?}",
        head.headers
    );
    assert!(
        body.contains(&format!("wsgate-reason: {reason}")),
        "body does not name {reason}: {body:?}"
    );
    assert!(
        head.get("content-type")
            .is_some_and(|value| value.starts_with("text/plain")),
        "content-type {:?}",
        head.get("content-type")
    );
}

/// The `WWW-Authenticate` values of a response.
pub fn challenges(head: &Head) -> Vec<String> {
    header_values(head, "www-authenticate")
}

/// The peer closes the connection without sending a single byte (a reset
/// counts as a close).
pub async fn assert_closed_silently<S: AsyncRead + Unpin>(stream: &mut S, what: &str) {
    let data = read_until_eof(stream).await;
    assert!(
        data.is_empty(),
        "{what}: expected the connection to be closed without a response, got {:?}",
        String::from_utf8_lossy(&data)
    );
}

/// The backend saw nothing (more): every request it got has been taken.
#[track_caller]
pub fn assert_backend_idle(backend: &mut WsBackend) {
    if let Ok(request) = backend.seen.try_recv() {
        panic!("the backend should not have seen {request:?}");
    }
}

// ---------------------------------------------------------------------------
// Keys and tokens, generated per test run.
// ---------------------------------------------------------------------------

pub const ISSUER: &str = "https://issuer.edge.test";
pub const AUDIENCE: &str = "wsgate-edge";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass every check of the JWT routes below.
pub fn good_claims(sub: &str) -> Value {
    json!({
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "scope": "read chat",
        "iat": now(),
        "exp": now() + 600,
    })
}

/// `good_claims` with fields replaced (a `null` removes the field).
pub fn claims_with(sub: &str, changes: Value) -> Value {
    let mut claims = good_claims(sub);
    let map = claims.as_object_mut().unwrap();
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.clone(), value.clone());
        }
    }
    claims
}

/// Keys written to a temp folder, referenced from configs by relative path
/// (so the config's base folder is exercised too):
/// `secret.txt` (HS, with a trailing newline), `es256.pem`, `ed25519.pem`
/// (public keys) and `jwks.json` (`k1` = the P-256 key, `k2` = the Ed25519 key).
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub secret: Vec<u8>,
    pub es: rcgen::KeyPair,
    pub ed: rcgen::KeyPair,
    /// Another P-256 key nobody configured.
    pub es_stranger: rcgen::KeyPair,
}

impl Keys {
    pub fn generate() -> Keys {
        let es = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let es_stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // 32 random bytes from a fresh Ed25519 key, as text.
        let random = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let der = random.serialize_der();
        let secret = URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]).into_bytes();

        let dir = tempfile::tempdir().unwrap();
        let mut secret_file = secret.clone();
        secret_file.push(b'\n');
        std::fs::write(dir.path().join("secret.txt"), secret_file).unwrap();
        std::fs::write(dir.path().join("es256.pem"), es.public_key_pem()).unwrap();
        std::fs::write(dir.path().join("ed25519.pem"), ed.public_key_pem()).unwrap();
        let point = es.public_key_raw();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        let jwks = json!({
            "keys": [
                {
                    "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                },
                {
                    "kty": "OKP", "crv": "Ed25519", "kid": "k2",
                    "x": URL_SAFE_NO_PAD.encode(ed.public_key_raw()),
                },
            ]
        });
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        Keys {
            dir,
            secret,
            es,
            ed,
            es_stranger,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// HS256 with the configured secret.
    pub fn hs(&self, claims: &Value) -> String {
        sign_hs(Algorithm::HS256, &self.secret, claims)
    }

    /// ES256 with the configured P-256 key.
    pub fn es(&self, claims: &Value, kid: Option<&str>) -> String {
        sign_pem(Algorithm::ES256, &self.es, claims, kid)
    }

    /// EdDSA with the configured Ed25519 key.
    pub fn ed(&self, claims: &Value, kid: Option<&str>) -> String {
        sign_pem(Algorithm::EdDSA, &self.ed, claims, kid)
    }
}

pub fn sign_hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

pub fn sign_pem(alg: Algorithm, key: &rcgen::KeyPair, claims: &Value, kid: Option<&str>) -> String {
    let pem = key.serialize_pem();
    let encoding = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// An unsigned token (`alg: none`, empty signature).
pub fn unsigned_token(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

// ---------------------------------------------------------------------------
// A plain HTTP backend and a forward-auth service, on hyper.
// ---------------------------------------------------------------------------

fn seen(request: &http::Request<Incoming>) -> SeenRequest {
    SeenRequest {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        headers: request
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// Serves HTTP/1.1 with `answer` on 127.0.0.1:0; each accepted connection is
/// counted, each request reported.
async fn spawn_hyper<F, Fut>(answer: F) -> HyperServer
where
    F: Fn(SeenRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen_rx) = mpsc::unbounded_channel();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let report = seen(&request);
                        let _ = tx.send(report.clone());
                        let answer = answer.clone();
                        async move { Ok::<_, Infallible>(answer(report).await) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    HyperServer {
        addr,
        seen: seen_rx,
        connections,
    }
}

pub struct HyperServer {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<SeenRequest>,
    pub connections: Arc<AtomicUsize>,
}

impl HyperServer {
    pub async fn next_request(&mut self) -> SeenRequest {
        within("a request to arrive", self.seen.recv())
            .await
            .expect("server stopped")
    }

    #[track_caller]
    pub fn assert_idle(&mut self) {
        if let Ok(request) = self.seen.try_recv() {
            panic!("should not have been asked: {request:?}");
        }
    }
}

fn response(status: u16, headers: &[(&str, &str)], body: &str) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

/// A plain HTTP backend answering every request with 200 `plain ok`.
pub async fn spawn_plain_backend() -> HyperServer {
    spawn_hyper(|_| async { response(200, &[("x-backend", "plain")], "plain ok") }).await
}

/// A forward-auth service; the decision is taken from the `case=` parameter of
/// the `X-Forwarded-Uri` it is sent:
/// `allow` → 200 + `X-User: alice`; `anon` → 200 without it; `deny401` → 401
/// `please log in`; `deny403` → 403 `not your room`; `teapot` → 418; `redirect`
/// → 302; `error` → 500; `slow` → no answer for 30 s.
pub async fn spawn_auth_service() -> HyperServer {
    spawn_hyper(|request: SeenRequest| async move {
        let uri = request.one("x-forwarded-uri").unwrap_or_default();
        let case = uri
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("case="))
            .unwrap_or("allow")
            .to_owned();
        match case.as_str() {
            "anon" => response(200, &[], ""),
            "deny401" => response(
                401,
                &[("www-authenticate", "Cookie realm=\"app\"")],
                "please log in",
            ),
            "deny403" => response(403, &[], "not your room"),
            "teapot" => response(418, &[], "short and stout"),
            "redirect" => response(302, &[("location", "/login")], ""),
            "error" => response(500, &[], "boom"),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                response(200, &[("x-user", "too-late")], "")
            }
            _ => response(200, &[("x-user", "alice"), ("x-other", "not-copied")], "ok"),
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// The two ways an upgrade is served.
// ---------------------------------------------------------------------------

/// How an upgrade reaches the proxy. `Direct`: it is the connection's first
/// request (every browser WebSocket), served without hyper.
/// `AfterPlainRequest`: a plain `GET` answered 200 goes first on the same
/// keep-alive connection, so the upgrade is served by hyper's service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradePath {
    Direct,
    AfterPlainRequest,
}

impl std::fmt::Display for UpgradePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpgradePath::Direct => "direct (first request)",
            UpgradePath::AfterPlainRequest => "hyper (after a plain request)",
        })
    }
}

/// The path of the warm-up route that [`warmup_config`] adds.
pub const WARMUP_PATH: &str = "/wsgate-warmup";

/// TOML for a warm-up route on its own plain backend (answering every
/// request `200 plain ok`), to append at the end of a test's config.
///
/// The plain request that puts an upgrade on the hyper path goes here rather
/// than to the route under test: on the tested routes a plain request would
/// itself be checked and counted (`wsgate_rejections_total` for 426
/// `upgrade-required`, 401 `token-missing`, 403 `ip-forbidden`), would ask a
/// forward-auth service, or would reach the WebSocket backend — and each
/// test's exact assertions on metrics and on what the services saw must hold
/// unchanged on both paths. Which route the first request went to does not
/// matter to the proxy: once a connection's first request was not an
/// upgrade, every later request on it is hyper's. That the connection stays
/// usable after a plain request refused on the tested route itself is
/// checked separately (`check_order`). The route has no IP, origin or auth
/// policy, so the warm-up is answered 200 whatever the client address.
pub async fn warmup_config() -> String {
    let backend = spawn_plain_backend().await;
    format!(
        "\n[upstream.wsgate-warmup]\nservers = [\"{}\"]\n\
         [[route]]\npath = \"{WARMUP_PATH}\"\nupstream = \"wsgate-warmup\"\nwebsocket = \"forbidden\"\n",
        backend.addr
    )
}

/// A connection ready for an upgrade sent the `path` way: fresh for
/// `Direct`; after a plain `GET` on the warm-up route, read in full (head
/// and body) and checked to be the backend's 200, for `AfterPlainRequest`.
pub async fn open_via(path: UpgradePath, addr: SocketAddr) -> TcpStream {
    let mut stream = connect(addr).await;
    if path == UpgradePath::AfterPlainRequest {
        let (head, body) = send_on(
            &mut stream,
            plain_request("GET", &format!("{WARMUP_PATH}/page"), &[]).as_bytes(),
        )
        .await;
        assert_eq!(
            (head.status, head.get("x-backend"), body.as_str()),
            (200, Some("plain"), "plain ok"),
            "{path}: the plain request before the upgrade; headers {:?}",
            head.headers
        );
        assert!(
            !head
                .get("connection")
                .is_some_and(|value| value.eq_ignore_ascii_case("close")),
            "{path}: the plain answer must keep the connection open; headers {:?}",
            head.headers
        );
    }
    stream
}

/// `send` over `path`: `request` on a connection opened by [`open_via`]
/// (for `Direct`, exactly [`send`]).
pub async fn send_via(
    path: UpgradePath,
    addr: SocketAddr,
    request: &str,
) -> (Head, String, TcpStream) {
    if path == UpgradePath::Direct {
        return send(addr, request).await;
    }
    let mut stream = open_via(path, addr).await;
    let (head, body) = send_on(&mut stream, request.as_bytes()).await;
    (head, body, stream)
}

/// `upgrade` over `path` (for `Direct`, exactly [`upgrade`]).
pub async fn upgrade_via(
    path: UpgradePath,
    addr: SocketAddr,
    target: &str,
    extra: &[(&str, &str)],
) -> (Head, String) {
    if path == UpgradePath::Direct {
        return upgrade(addr, target, extra).await;
    }
    let (head, body, _stream) =
        send_via(path, addr, &upgrade_request(target, "edge.test", extra)).await;
    (head, body)
}

/// `ws_connect` (a real tungstenite client) over `path`.
pub async fn ws_connect_via(
    path: UpgradePath,
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = open_via(path, addr).await;
    let mut request = format!("ws://{addr}{target}")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    within(
        "websocket handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await
}

/// Turns `async fn name(path: UpgradePath)` test bodies into two tests each,
/// `name::direct` and `name::after_plain_request`, so a failure names the
/// path it happened on. Each run gets its own proxy and backends (the body
/// sets them up), so counts and "backend saw nothing more" hold per path.
macro_rules! on_both_paths {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn direct() {
                    super::$name(crate::support::UpgradePath::Direct).await;
                }

                #[tokio::test]
                async fn after_plain_request() {
                    super::$name(crate::support::UpgradePath::AfterPlainRequest).await;
                }
            }
        )+
    };
}
pub(crate) use on_both_paths;
