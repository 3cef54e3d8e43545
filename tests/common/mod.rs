//! Shared test harness: the proxy started in-process on port 0, real
//! backends on loopback, a real TLS client. Every wait has a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod process;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Upper bound for any single wait in a test.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// A self-signed certificate for `localhost` written to a temp folder.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
}

pub fn test_cert(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let (cert_pem, key_pem) = wsgate::tls::generate_dev_certificate(&names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("test.crt");
    let key_path = dir.path().join("test.key");
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, key_pem).unwrap();
    TestCert {
        dir,
        cert_path,
        key_path,
        cert_pem,
    }
}

/// A config with one TLS listener on port 0 serving `cert` (plus the
/// `listener` keys given), then `sections` (`[server]`, `[admin]`, …), and
/// one route `/` to `backend` that allows the origin `https://localhost`.
pub fn tls_echo_config(
    cert: &TestCert,
    backend: SocketAddr,
    listener: &str,
    sections: &str,
) -> String {
    format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}
        {listener}
        {sections}
        [upstream.echo]
        servers = ["{backend}"]
        [[route]]
        path = "/"
        upstream = "echo"
        origins = ["https://localhost"]
        "#,
        cert.cert_path.display(),
        cert.key_path.display(),
    )
}

/// A running proxy; dropping it (or calling `stop`) shuts it down.
pub struct TestProxy {
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub reloader: wsgate::Reloader,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Starts the drain and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            within("proxy shutdown", task).await.unwrap().unwrap();
        }
    }

    /// Begins shutdown without waiting; returns the task to await.
    pub fn begin_shutdown(mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.take().unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub fn parse_config(toml: &str, base: &Path) -> wsgate::Config {
    match wsgate::Config::parse(toml, base) {
        Ok(config) => config,
        Err(problems) => panic!("test config invalid: {problems:?}\n{toml}"),
    }
}

/// Starts the proxy on the given TOML (use `127.0.0.1:0` listener addresses).
pub async fn start_proxy(toml: &str) -> TestProxy {
    start_proxy_in(toml, Path::new(".")).await
}

pub async fn start_proxy_in(toml: &str, base: &Path) -> TestProxy {
    let config = parse_config(toml, base);
    let proxy = wsgate::Proxy::bind(&config).await.unwrap();
    let addrs = proxy.local_addrs();
    let admin = proxy.admin_addr();
    let reloader = proxy.reloader();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    TestProxy {
        addrs,
        admin,
        reloader,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

/// The request head a backend received, header names lower-cased, in order.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// All values of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The single value of `name`; panics when it appears more than once.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        assert!(
            all.len() <= 1,
            "{name} appears {} times: {all:?}",
            all.len()
        );
        all.into_iter().next()
    }
}

/// A WebSocket echo backend reporting each upgrade request it receives.
pub struct WsBackend {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<SeenRequest>,
}

impl WsBackend {
    pub async fn next_request(&mut self) -> SeenRequest {
        within("the backend to see a request", self.seen.recv())
            .await
            .expect("backend stopped")
    }
}

/// Echo backend; selects the first offered subprotocol, like most servers.
pub async fn spawn_ws_echo() -> WsBackend {
    spawn_ws_backend(|offered| offered.first().cloned()).await
}

/// Echo backend whose subprotocol choice is made by `choose` from the offer.
pub async fn spawn_ws_backend(choose: fn(&[String]) -> Option<String>) -> WsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)]
                let callback = |request: &Request, mut response: Response| {
                    let headers = request
                        .headers()
                        .iter()
                        .map(|(n, v)| {
                            (
                                n.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    let offered: Vec<String> = request
                        .headers()
                        .get_all("sec-websocket-protocol")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(|v| v.split(','))
                        .map(|t| t.trim().to_owned())
                        .collect();
                    if let Some(choice) = choose(&offered) {
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", choice.parse().unwrap());
                    }
                    let _ = tx.send(SeenRequest {
                        method: request.method().to_string(),
                        uri: request.uri().to_string(),
                        headers,
                    });
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let echo = matches!(message, Message::Text(_) | Message::Binary(_));
                    if echo && ws.send(message.clone()).await.is_err() {
                        return;
                    }
                    match message {
                        Message::Text(_) | Message::Binary(_) => {}
                        Message::Close(_) => return,
                        _ => {}
                    }
                }
            });
        }
    });
    WsBackend { addr, seen }
}

/// A backend that answers each connection's first request with `response`
/// verbatim and reports the raw request head it read.
pub async fn spawn_raw_backend(
    response: &'static [u8],
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let _ = tx.send(head);
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink))
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Reads up to the end of an HTTP head (CRLF CRLF), byte by byte so nothing
/// after it is consumed.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 256 * 1024 {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends raw bytes and reads the whole reply until the server closes or goes
/// quiet for the deadline.
pub async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> String {
    stream.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("TCP connect", TcpStream::connect(addr))
        .await
        .unwrap()
}

/// A parsed HTTP response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn parse(text: &str) -> Head {
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .take_while(|line| !line.is_empty())
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Head { status, headers }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn all<'h, 'n>(&'h self, name: &'n str) -> impl Iterator<Item = &'h str> + use<'h, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a response to a raw request over `stream`: status and headers, with
/// the body (which follows `\r\n\r\n`).
pub async fn raw_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> (Head, String) {
    let reply = raw_exchange(stream, request.as_bytes()).await;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (Head::parse(head), body.to_owned())
}

/// A valid upgrade request head for `path`, with extra header lines.
pub fn upgrade_request(path: &str, host: &str, extra: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

pub type Ws<S> = WebSocketStream<S>;

/// WebSocket client handshake over plain TCP with extra headers.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let stream = connect(addr).await;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
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

/// A rustls client trusting exactly `cert_pem`.
pub fn tls_connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    cert_pem: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = connect(addr).await;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    within("TLS handshake", tls_connector(cert_pem).connect(name, tcp))
        .await
        .unwrap()
}

/// Polls `condition` every 10 ms until it holds or the deadline passes.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            panic!("condition never held: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fetches `path` from the admin listener and returns the body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = connect(admin).await;
    let (head, body) = raw_request(
        &mut stream,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (head.status, body)
}

/// The value of one metric series in Prometheus text, e.g.
/// `metric(&text, "wsgate_rejections_total", &[("reason", "no-route")])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

// ---------------------------------------------------------------------------
// Waiting on async conditions, framed HTTP responses, raw backends.
// ---------------------------------------------------------------------------

/// Polls the async `condition` every 10 ms until it holds or the deadline
/// passes.
pub async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(true) = tokio::time::timeout(remaining, condition()).await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("condition never held: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The current value of one series on the admin listener (0 when absent).
pub async fn admin_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    metric(&body, name, labels).unwrap_or(0.0)
}

/// Waits until a metric series has exactly `value`.
pub async fn metric_becomes(admin: SocketAddr, name: &str, labels: &[(&str, &str)], value: f64) {
    until(&format!("{name}{labels:?} == {value}"), || async {
        admin_metric(admin, name, labels).await == value
    })
    .await;
}

/// A loopback port that refuses connections: bound but not listening. Keep
/// the socket alive for the whole test, so no parallel test can take the
/// port over (a released port can be reused and answer).
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

pub async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 64 * 1024 {
        match stream.read(&mut byte).await {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).trim_end().to_owned()
}

/// Reads one response off `stream`, its body framed by `Transfer-Encoding:
/// chunked`, `Content-Length` or the end of the connection, so keep-alive
/// connections can be reused. A 101 has no body: the stream is then a tunnel.
pub async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    request_method: &str,
) -> (Head, Vec<u8>) {
    within("a response", async {
        let text = read_head(stream).await;
        assert!(
            text.ends_with("\r\n\r\n"),
            "incomplete response head: {text:?}"
        );
        let head = Head::parse(&text);
        let mut body = Vec::new();
        let no_body = request_method == "HEAD"
            || head.status < 200
            || head.status == 204
            || head.status == 304;
        if no_body {
            return (head, body);
        }
        let chunked = head
            .headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let size_line = read_line(stream).await;
                let size_text = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                if size == 0 {
                    // Trailers until the empty line.
                    for _ in 0..100 {
                        if read_line(stream).await.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                stream.read_exact(&mut body[start..]).await.unwrap();
                assert_eq!(read_line(stream).await, "", "chunk not followed by CRLF");
            }
        } else if let Some(length) = head.get("content-length") {
            let length: usize = length.parse().unwrap();
            body.resize(length, 0);
            stream.read_exact(&mut body).await.unwrap();
        } else {
            stream.read_to_end(&mut body).await.unwrap();
        }
        (head, body)
    })
    .await
}

/// Sends `request` on a new connection and reads one framed response; the
/// connection is returned so a 101 can be used as a tunnel.
pub async fn exchange(addr: SocketAddr, request: &str) -> (Head, String, TcpStream) {
    let mut stream = connect(addr).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let method = request.split(' ').next().unwrap_or("GET").to_owned();
    let (head, body) = read_response(&mut stream, &method).await;
    (head, String::from_utf8_lossy(&body).into_owned(), stream)
}

/// Asserts a rejection exactly as the contract describes it.
#[track_caller]
pub fn assert_rejected(head: &Head, body: &str, status: u16, reason: &str) {
    assert_eq!(
        head.status, status,
        "status; headers {:?}, body {body:?}",
        head.headers
    );
    assert_eq!(
        head.get("wsgate-reason"),
        Some(reason),
        "wsgate-reason; headers {:?}",
        head.headers
    );
    assert!(
        body.contains(reason),
        "body does not name {reason}: {body:?}"
    );
    assert!(
        head.get("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "content-type {:?}",
        head.get("content-type")
    );
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim().as_bytes())
}

/// A raw 101 answering `request_head`, with extra header lines.
pub fn switching_protocols(request_head: &str, extra: &[(&str, &str)]) -> String {
    let head = Head::parse(request_head);
    let key = head.get("sec-websocket-key").expect("no Sec-WebSocket-Key");
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    for (name, value) in extra {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response
}

/// A backend that hands each accepted connection and its raw request head to
/// `handler` (which writes whatever answer it likes). Each head is reported.
pub async fn spawn_raw_ws<F, Fut>(handler: F) -> (SocketAddr, mpsc::UnboundedReceiver<String>)
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let _ = tx.send(head.clone());
                handler(stream, head).await;
            });
        }
    });
    (addr, rx)
}

/// A backend that reads the request head and then never answers, holding the
/// connection until the peer goes away.
pub async fn spawn_silent_backend() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    spawn_raw_ws(|mut stream, _| async move {
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut sink)).await;
    })
    .await
}

/// A tungstenite backend running `handler` on each accepted WebSocket.
pub async fn spawn_ws_handler<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(WebSocketStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                    handler(ws).await;
                }
            });
        }
    });
    addr
}

/// One WebSocket frame: `first` is the FIN/RSV/opcode byte; a client frame
/// passes a mask.
pub fn ws_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = vec![first];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len @ 126..=65535 => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    frame
}

/// A frame read off the wire: first byte, whether it was masked, the payload
/// (unmasked).
#[derive(Debug)]
pub struct Frame {
    pub first: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Frame {
    within("a WebSocket frame", async {
        let mut two = [0u8; 2];
        stream.read_exact(&mut two).await.unwrap();
        let masked = two[1] & 0x80 != 0;
        let len = match two[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.unwrap();
                u16::from_be_bytes(ext) as usize
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.unwrap();
                u64::from_be_bytes(ext) as usize
            }
            len => len as usize,
        };
        let mut mask = [0u8; 4];
        if masked {
            stream.read_exact(&mut mask).await.unwrap();
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        Frame {
            first: two[0],
            masked,
            payload,
        }
    })
    .await
}

/// Reads until EOF (or an error, which a reset is); returns what arrived.
pub async fn read_until_eof<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut data = Vec::new();
    within("the peer to close", async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    data
}

// ---------------------------------------------------------------------------
// A plain HTTP origin built on hyper.
// ---------------------------------------------------------------------------

/// A plain HTTP origin: `GET /big?bytes=N` streams N bytes (byte i is
/// `i % 251`); a request with a body gets the body streamed back; any other
/// request gets its method, URI and headers back as JSON. Every request head
/// is reported.
pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<SeenRequest>,
}

impl HttpOrigin {
    pub async fn next_request(&mut self) -> SeenRequest {
        within("the origin to see a request", self.seen.recv())
            .await
            .expect("origin stopped")
    }
}

pub fn big_body_byte(index: usize) -> u8 {
    (index % 251) as u8
}

pub async fn spawn_http_origin() -> HttpOrigin {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Frame as BodyFrame, Incoming};

    type OriginBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let headers: Vec<(String, String)> = request
                                .headers()
                                .iter()
                                .map(|(n, v)| {
                                    (
                                        n.as_str().to_owned(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect();
                            let seen = SeenRequest {
                                method: request.method().to_string(),
                                uri: request.uri().to_string(),
                                headers: headers.clone(),
                            };
                            let _ = tx.send(seen.clone());
                            let has_body =
                                request.headers().contains_key(http::header::CONTENT_LENGTH)
                                    || request
                                        .headers()
                                        .contains_key(http::header::TRANSFER_ENCODING);
                            let big = request
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("bytes="))
                                .and_then(|n| n.parse::<usize>().ok())
                                .filter(|_| request.uri().path() == "/big");
                            let mut response = if let Some(total) = big {
                                const CHUNK: usize = 64 * 1024;
                                let chunks = (0..total.div_ceil(CHUNK)).map(move |index| {
                                    let start = index * CHUNK;
                                    let end = (start + CHUNK).min(total);
                                    let data: Vec<u8> = (start..end).map(big_body_byte).collect();
                                    Ok::<_, hyper::Error>(BodyFrame::data(bytes::Bytes::from(data)))
                                });
                                http::Response::new(BodyExt::boxed(StreamBody::new(
                                    futures_util::stream::iter(chunks),
                                )))
                            } else if has_body {
                                // Streamed straight back, frame by frame.
                                http::Response::new(BodyExt::boxed(request.into_body()))
                            } else {
                                let json = serde_json::json!({
                                    "method": seen.method,
                                    "uri": seen.uri,
                                    "headers": headers,
                                });
                                let body: OriginBody =
                                    Full::new(bytes::Bytes::from(json.to_string()))
                                        .map_err(|never| match never {})
                                        .boxed();
                                http::Response::new(body)
                            };
                            response
                                .headers_mut()
                                .insert("x-origin", http::HeaderValue::from_static("plain"));
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    HttpOrigin { addr, seen }
}

// ---------------------------------------------------------------------------
// TLS clients for certificate checks.
// ---------------------------------------------------------------------------

/// Accepts any server certificate (signatures still checked), so a test can
/// look at which certificate it was given.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config: trusting exactly `cert_pem`, or any certificate when
/// `None`; limited to `versions`; offering ALPN http/1.1.
pub fn tls_client_config(
    cert_pem: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap();
    let mut config = match cert_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A TLS connection with `config`; the handshake's result is returned rather
/// than unwrapped so refusals can be asserted.
pub async fn tls_connect_with(
    addr: SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect(addr).await;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
}

/// The DER of the first certificate in a PEM string.
pub fn cert_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Reads the rest of a tungstenite stream so its close handshake completes,
/// then drops it so our side of the TCP connection closes too.
pub async fn drain_ws<S>(mut ws: Ws<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("the websocket to end", async {
        for _ in 0..100 {
            match ws.next().await {
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    })
    .await;
}
