//! `wsgate demo`: an echo backend, the proxy in front of it with TLS, and a
//! scripted run through it, in one process and with no set-up, so a newcomer
//! sees in seconds what wsgate does and how a refusal reads.

use std::fmt::Write as _;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::config::Config;
use crate::listen::Proxy;
use crate::tools::echo::HEADERS_PROBE;

const ALLOWED_ORIGIN: &str = "https://app.example.com";
const FORBIDDEN_ORIGIN: &str = "https://evil.example.net";
const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the demo and prints its report; `Ok(true)` when every step behaved.
pub async fn run() -> anyhow::Result<bool> {
    let workdir = tempfile_dir()?;
    let (cert_pem, key_pem) = crate::tls::generate_dev_certificate(&["localhost".to_owned()])?;
    std::fs::write(workdir.join("demo.crt"), &cert_pem)?;
    std::fs::write(workdir.join("demo.key"), key_pem)?;
    // HS256 wants at least 32 bytes of secret; this one only lives for the demo.
    let secret = format!(
        "wsgate-demo-secret-{:016x}-{:08x}",
        std::process::id(),
        rand_ish()
    );
    std::fs::write(workdir.join("jwt.secret"), &secret)?;

    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(crate::tools::echo::serve(backend));

    let config_text = demo_config(backend_addr);
    let config = Config::parse(&config_text, &workdir).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("the demo config is invalid:\n  {}", list.join("\n  "))
    })?;
    let proxy = Proxy::bind(&config).await?;
    let proxy_addr = proxy.local_addrs()[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));

    let client = DemoClient::new(proxy_addr, &cert_pem)?;
    let token = demo_token(&secret)?;
    println!(
        "wsgate demo: an echo backend, wsgate in front of it with TLS, and a client, all in this process\n"
    );
    println!("  backend  ws://{backend_addr}  (echo)");
    println!(
        "  proxy    wss://localhost:{}/chat  (self-signed development certificate)",
        proxy_addr.port()
    );
    println!(
        "  route    /chat: websocket required, origins = [\"{ALLOWED_ORIGIN}\"], JWT (HS256) required\n"
    );

    let mut outcomes = Vec::new();
    let mut report = |outcome: anyhow::Result<String>| {
        match &outcome {
            Ok(line) => println!("  ok    {line}"),
            Err(error) => println!("  FAIL  {error:#}"),
        }
        outcomes.push(outcome.is_ok());
    };
    report(client.allowed_upgrade(&token).await);
    report(
        client
            .expect_refusal(
                "2. forbidden origin",
                &format!("/chat?token={token}"),
                Some(FORBIDDEN_ORIGIN),
                403,
                "origin-forbidden",
            )
            .await,
    );
    report(
        client
            .expect_refusal(
                "3. no token",
                "/chat",
                Some(ALLOWED_ORIGIN),
                401,
                "token-missing",
            )
            .await,
    );
    report(client.plain_get().await);
    let passed = outcomes.iter().filter(|ok| **ok).count();
    let steps = outcomes;
    println!();
    if passed == steps.len() {
        println!("all {passed} steps behaved as expected");
    } else {
        println!(
            "{} of {} steps did not behave as expected",
            steps.len() - passed,
            steps.len()
        );
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(STEP_TIMEOUT, serving).await;
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(passed == steps.len())
}

/// Not a secret generator: just enough to make the demo's secret differ per run.
fn rand_ish() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("wsgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn demo_config(backend: SocketAddr) -> String {
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"
tls = {{ certs = [ {{ cert = "demo.crt", key = "demo.key" }} ] }}

[server]
drain_timeout = "2s"

[upstream.echo]
servers = ["{backend}"]

[[route]]
path = "/chat"
upstream = "echo"
websocket = "required"
origins = ["{ALLOWED_ORIGIN}"]

[route.auth]
jwt_secret_file = "jwt.secret"
token_query = "token"
"#
    )
}

fn demo_token(secret: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({ "sub": "demo-user", "exp": now + 300 });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

struct DemoClient {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl DemoClient {
    fn new(addr: SocketAddr, cert_pem: &str) -> anyhow::Result<DemoClient> {
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        // The same client TLS setup the proxy uses towards backends, trusting
        // the demo's own certificate.
        let config = crate::tls::upstream_client_config(&certs).map_err(anyhow::Error::msg)?;
        Ok(DemoClient {
            addr,
            tls: tokio_rustls::TlsConnector::from(config),
        })
    }

    async fn tls_stream(&self) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        Ok(self.tls.connect(name, tcp).await?)
    }

    async fn handshake(
        &self,
        path: &str,
        origin: Option<&str>,
    ) -> anyhow::Result<
        Result<
            tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
            tungstenite::http::Response<Option<Vec<u8>>>,
        >,
    > {
        let mut request =
            format!("wss://localhost:{}{path}", self.addr.port()).into_client_request()?;
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse()?);
        }
        let stream = self.tls_stream().await?;
        let attempt = tokio::time::timeout(
            STEP_TIMEOUT,
            tokio_tungstenite::client_async(request, stream),
        )
        .await?;
        match attempt {
            Ok((socket, _)) => Ok(Ok(socket)),
            Err(tungstenite::Error::Http(response)) => Ok(Err(*response)),
            Err(error) => Err(error.into()),
        }
    }

    async fn allowed_upgrade(&self, token: &str) -> anyhow::Result<String> {
        let label = "1. allowed origin + valid token";
        let mut socket = self
            .handshake(&format!("/chat?token={token}"), Some(ALLOWED_ORIGIN))
            .await?
            .map_err(|response| {
                anyhow::anyhow!("{label}: expected 101, got {}", response.status())
            })?;
        let greeting = "hello through wsgate";
        socket.send(Message::text(greeting)).await?;
        let echoed = next_text(&mut socket).await?;
        anyhow::ensure!(
            echoed == greeting,
            "{label}: echoed {echoed:?}, sent {greeting:?}"
        );
        socket.send(Message::text(HEADERS_PROBE)).await?;
        let seen: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&next_text(&mut socket).await?)?;
        socket.close(None).await?;
        let mut report = format!("{label:<34} → 101 Switching Protocols, echoed {echoed:?}\n");
        report.push_str("        the backend received:");
        for name in [
            "origin",
            "x-forwarded-proto",
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
        ] {
            let value = seen.get(name).map(String::as_str).unwrap_or("(absent)");
            let _ = write!(report, "\n          {name}: {value}");
        }
        anyhow::ensure!(
            seen.get("origin").map(String::as_str) == Some(ALLOWED_ORIGIN),
            "{label}: the backend did not receive the client's Origin"
        );
        anyhow::ensure!(
            seen.get("x-forwarded-proto").map(String::as_str) == Some("https"),
            "{label}: the backend did not receive X-Forwarded-Proto: https"
        );
        Ok(report)
    }

    async fn expect_refusal(
        &self,
        label: &str,
        path: &str,
        origin: Option<&str>,
        status: u16,
        reason: &str,
    ) -> anyhow::Result<String> {
        let response = match self.handshake(path, origin).await? {
            Ok(_) => anyhow::bail!("{label}: expected {status}, but the upgrade was accepted"),
            Err(response) => response,
        };
        let got_reason = response
            .headers()
            .get("wsgate-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        anyhow::ensure!(
            response.status().as_u16() == status && got_reason == reason,
            "{label}: expected {status} {reason}, got {} {got_reason}",
            response.status().as_u16()
        );
        let body = response
            .body()
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let first_line = body.lines().next().unwrap_or("").to_owned();
        Ok(format!(
            "{label:<34} → {status}, wsgate-reason: {reason}\n          body: {first_line}"
        ))
    }

    async fn plain_get(&self) -> anyhow::Result<String> {
        let label = "4. plain GET on a websocket route";
        let mut stream = self.tls_stream().await?;
        stream
            .write_all(b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        tokio::time::timeout(STEP_TIMEOUT, stream.read_to_end(&mut reply)).await??;
        let reply = String::from_utf8_lossy(&reply);
        let status_line = reply.lines().next().unwrap_or("");
        let has = |header: &str| reply.lines().any(|line| line.eq_ignore_ascii_case(header));
        anyhow::ensure!(
            status_line.starts_with("HTTP/1.1 426")
                && has("wsgate-reason: upgrade-required")
                && has("upgrade: websocket"),
            "{label}: expected 426 upgrade-required with Upgrade: websocket, got {status_line:?}"
        );
        Ok(format!(
            "{label:<34} → 426, wsgate-reason: upgrade-required, Upgrade: websocket"
        ))
    }
}

async fn next_text<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = tokio::time::timeout(STEP_TIMEOUT, socket.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the connection closed"))??;
        if let Message::Text(text) = message {
            return Ok(text.as_str().to_owned());
        }
    }
}
