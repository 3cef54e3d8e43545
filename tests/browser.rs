//! A real browser through the real `wsgate` binary: Debian's Chromium,
//! driven by `playwright-core` (`tests/browser/drive.js`), loads a page from
//! wsgate over TLS and opens `wss://` from it.
//!
//! The certificate chain is a CA made here and a `localhost` leaf it signed;
//! the CA is trusted the way a user would trust it, in the NSS database
//! under `$HOME/.pki/nssdb` that Chromium on Linux reads — no certificate
//! error is ignored, and a third listener with a self-signed certificate is
//! the control that Chromium does check. One wsgate process has the two
//! listeners under test: the default (ALPN `h2` and `http/1.1`) and one with
//! `http2 = false`. wsgate's own JSON log lines say which protocol each
//! WebSocket really used, and name the origin and reason of the refusal of
//! a page from a forbidden origin.
//!
//! What Chromium (156) does with WebSockets and HTTP/2, as this test pins
//! it: a socket opened by a page that came over h2 goes on that page's
//! connection as an RFC 8441 extended CONNECT (the page load brought
//! wsgate's SETTINGS_ENABLE_CONNECT_PROTOCOL long before the socket). A
//! socket never opens an h2 connection of its own, though: with no h2
//! connection to wsgate in the page's network partition it goes over a new
//! HTTP/1.1 connection, even to a listener that offers h2. DevTools shows
//! which from the browser's side: over HTTP/1.1 Chromium makes a
//! `Sec-WebSocket-Key` and gets 101, on an h2 stream it makes none and gets
//! 200.
//!
//! Chromium, certutil (Debian's libnss3-tools), Node.js and
//! `tests/browser/node_modules` are required: without them the test fails
//! rather than skips. `.ci/run` installs the Debian packages and runs
//! `npm ci` in `tests/browser`.

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::DEADLINE;
use common::process::WsgateProcess;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

const PAGE: &str = include_str!("browser/page.html");
const CHROMIUM: &str = "/usr/bin/chromium";
const CERTUTIL: &str = "/usr/bin/certutil";
const CA_NICKNAME: &str = "wsgate-test-ca";
/// The whole Node run: Chromium's start (about 1.5 s here, `LAUNCH_MS` at
/// most) and five scenarios of a few hundred milliseconds, each of whose
/// waits `drive.js` bounds by `WAIT_MS`.
const BROWSER_DEADLINE: Duration = Duration::from_secs(40);
const LAUNCH_MS: u64 = 15_000;
const WAIT_MS: u64 = 5_000;
/// The backend serves at most this many connections and echoes at most this
/// many messages per socket: the test makes far fewer.
const BACKEND_CONNECTIONS: usize = 64;
const ECHOES_PER_SOCKET: usize = 16;

const INSTALL_HINT: &str = ".ci/run installs them in its \"installing the peers\" step: \
     `apt-get install --no-install-recommends chromium libnss3-tools nodejs npm` and \
     `npm ci` in tests/browser";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails (never skips) when a tool is missing, saying how to install it.
fn require_tools() {
    for (path, package) in [(CHROMIUM, "chromium"), (CERTUTIL, "libnss3-tools")] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing: tests/browser.rs needs Debian's {package}; {INSTALL_HINT}"
        );
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`node --version` failed ({}): tests/browser.rs needs Node.js; {INSTALL_HINT}",
            output.status
        ),
        Err(error) => {
            panic!("node not found ({error}): tests/browser.rs needs Node.js; {INSTALL_HINT}")
        }
    }
    let installed = browser_dir().join("node_modules/playwright-core/package.json");
    assert!(
        installed.is_file(),
        "{} is missing: run `npm ci` in tests/browser; {INSTALL_HINT}",
        installed.display()
    );
}

// ---------------------------------------------------------------------------
// Certificates: a CA and a leaf it signed, the CA trusted in an NSS database.
// ---------------------------------------------------------------------------

/// A certificate and its key, as files for wsgate's config.
struct Leaf {
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// A CA (its certificate's path) and a `localhost` leaf it signed.
fn make_ca_and_leaf(dir: &Path) -> (PathBuf, Leaf) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "wsgate browser test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let ca_path = dir.join("ca.pem");
    let leaf = Leaf {
        cert_path: dir.join("localhost.crt"),
        key_path: dir.join("localhost.key"),
    };
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&leaf.cert_path, leaf_cert.pem()).unwrap();
    std::fs::write(&leaf.key_path, leaf_key.serialize_pem()).unwrap();
    (ca_path, leaf)
}

fn certutil(args: &[&str]) {
    let output = std::process::Command::new(CERTUTIL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "certutil {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `home/.pki/nssdb` trusting `ca` for TLS servers: where Chromium on Linux
/// looks for the user's own trust anchors.
fn trust_ca(home: &Path, ca: &Path) {
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    certutil(&["-N", "--empty-password", "-d", &db]);
    certutil(&[
        "-A",
        "-n",
        CA_NICKNAME,
        "-t",
        "C,,",
        "-i",
        ca.to_str().unwrap(),
        "-d",
        &db,
    ]);
}

// ---------------------------------------------------------------------------
// The backend: the page on `/`, a WebSocket echo on `/ws`, plain HTTP/1.1.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Request {
        method: String,
        path: String,
        origin: Option<String>,
        forwarded_proto: Option<String>,
    },
    Echoed(String),
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

async fn serve(
    mut request: Request<Incoming>,
    seen: mpsc::UnboundedSender<Seen>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = seen.send(Seen::Request {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        origin: header(&request, "origin"),
        forwarded_proto: header(&request, "x-forwarded-proto"),
    });
    let upgrade = header(&request, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let key = header(&request, "sec-websocket-key");
    let response = match (request.uri().path(), upgrade, key) {
        ("/ws", true, Some(key)) => {
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    echo(ws, seen).await;
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .body(Full::default())
                .unwrap()
        }
        ("/", false, _) => Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
            .unwrap(),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::default())
            .unwrap(),
    };
    Ok(response)
}

async fn echo<S>(mut ws: WebSocketStream<S>, seen: mpsc::UnboundedSender<Seen>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for _ in 0..ECHOES_PER_SOCKET {
        let message = match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(message))) => message,
            _ => return,
        };
        // tungstenite queues the answer to a Close itself; the next read
        // sends it and then ends the stream.
        if let Message::Text(text) = message {
            let _ = seen.send(Seen::Echoed(text.to_string()));
            if ws.send(Message::Text(text)).await.is_err() {
                return;
            }
        }
    }
}

struct Backend {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

async fn spawn_backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for _ in 0..BACKEND_CONNECTIONS {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| serve(request, tx.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Backend { addr, seen }
}

// ---------------------------------------------------------------------------
// wsgate and its JSON log.
// ---------------------------------------------------------------------------

/// Three TLS listeners in this order: the default (ALPN `h2` and
/// `http/1.1`), `http2 = false`, and one whose certificate is self-signed
/// and so trusted by nobody.
fn config(trusted: &Leaf, untrusted: &Leaf, backend: SocketAddr, origins: &[String]) -> String {
    let tls = |leaf: &Leaf| {
        format!(
            r#"tls = {{ certs = [ {{ cert = "{}", key = "{}" }} ] }}"#,
            leaf.cert_path.display(),
            leaf.key_path.display()
        )
    };
    let origins = match origins {
        [] => String::new(),
        origins => format!("origins = {origins:?}"),
    };
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"
{trusted}

[[listener]]
addr = "127.0.0.1:0"
{trusted}
http2 = false

[[listener]]
addr = "127.0.0.1:0"
{untrusted}

[server]
drain_timeout = "2s"

[upstream.app]
servers = ["{backend}"]

[[route]]
name = "app"
path = "/"
upstream = "app"
{origins}
"#,
        trusted = tls(trusted),
        untrusted = tls(untrusted),
    )
}

/// wsgate's own development certificate: self-signed, so no browser that
/// checks certificates accepts it.
fn self_signed(dir: &Path) -> Leaf {
    let (cert, key) = wsgate::tls::generate_dev_certificate(&["localhost".to_owned()]).unwrap();
    let leaf = Leaf {
        cert_path: dir.join("self-signed.crt"),
        key_path: dir.join("self-signed.key"),
    };
    std::fs::write(&leaf.cert_path, cert).unwrap();
    std::fs::write(&leaf.key_path, key).unwrap();
    leaf
}

fn json(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

/// The first line, already read or still to come, for which `matches` holds.
fn log_line(wsgate: &mut WsgateProcess, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    if let Some(found) = wsgate
        .seen
        .iter()
        .filter_map(|line| json(line))
        .find(&matches)
    {
        return found;
    }
    wsgate.wait_for(what, |line| json(line).filter(&matches))
}

/// Every line read so far whose `message` is `message`, without the fields
/// that differ from run to run.
fn lines_with_message(wsgate: &WsgateProcess, message: &str) -> Vec<Value> {
    wsgate
        .seen
        .iter()
        .filter_map(|line| json(line))
        .filter(|line| line["message"] == message)
        .map(|mut line| {
            let fields = line.as_object_mut().unwrap();
            for varying in ["timestamp", "duration_ms", "target", "peer"] {
                fields.remove(varying);
            }
            line
        })
        .collect()
}

/// The bytes of one masked text frame of `len` (< 126) bytes and a masked
/// Close with a code and no reason: what the browser sends.
fn client_bytes(len: usize) -> usize {
    (2 + 4 + len) + (2 + 4 + 2)
}

/// The same, unmasked: what the echo backend sends back.
fn backend_bytes(len: usize) -> usize {
    (2 + len) + (2 + 2)
}

fn scenario<'a>(results: &'a [Value], name: &str) -> &'a Value {
    let mut found = results.iter().filter(|result| result["name"] == name);
    let result = found
        .next()
        .unwrap_or_else(|| panic!("no result for {name}"));
    assert!(found.next().is_none(), "two results for {name}");
    result
}

fn assert_json(actual: &Value, expected: Value, what: &str) {
    assert_eq!(
        actual,
        &expected,
        "{what}:\nactual   {}\nexpected {}",
        serde_json::to_string_pretty(actual).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
}

/// Runs `drive.js` with `input` and returns its one JSON line.
async fn drive_chromium(home: &Path, input: Value) -> Value {
    let node = tokio::process::Command::new("node")
        .arg("drive.js")
        .arg(input.to_string())
        .current_dir(browser_dir())
        // Chromium finds the NSS database, and so the test CA, under $HOME.
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BROWSER_DEADLINE, node)
        .await
        .unwrap_or_else(|_| panic!("node drive.js took over {BROWSER_DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node drive.js failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("drive.js printed {stdout:?} ({error}); stderr:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_through_wsgate_over_h2_and_http11_with_a_real_ca() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (ca_path, leaf) = make_ca_and_leaf(dir.path());
    let untrusted = self_signed(dir.path());
    trust_ca(&home, &ca_path);
    let mut backend = spawn_backend().await;

    // The allowed origins name the listeners' ports, known only once they
    // are bound: wsgate starts with no origin allowed, then a SIGHUP reload
    // (which keeps the listeners) brings in the real list before the
    // browser makes its first connection.
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, config(&leaf, &untrusted, backend.addr, &[])).unwrap();
    let mut wsgate = WsgateProcess::start(&config_path, &["--log-format", "json"], "info");
    let mut ports = Vec::new();
    for _ in 0..3 {
        let line = log_line(&mut wsgate, "saying where it listens", |line| {
            line["message"] == "listening"
                && line["addr"]
                    .as_str()
                    .and_then(|addr| addr.parse::<SocketAddr>().ok())
                    .is_some_and(|addr| !ports.contains(&addr.port()))
        });
        let addr: SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        ports.push(addr.port());
    }
    let (h2_port, h1_port, untrusted_port) = (ports[0], ports[1], ports[2]);
    let h2_origin = format!("https://localhost:{h2_port}");
    let h1_origin = format!("https://localhost:{h1_port}");
    let allowed = [h2_origin.clone(), h1_origin.clone()];
    std::fs::write(
        &config_path,
        config(&leaf, &untrusted, backend.addr, &allowed),
    )
    .unwrap();
    wsgate.signal("HUP");
    log_line(&mut wsgate, "saying the reload took", |line| {
        line["message"] == "configuration reloaded"
    });

    let h2_message = "hello over the h2 listener";
    let h1_message = "hello over the http/1.1 listener";
    let forbidden_origin = format!("http://127.0.0.1:{}", backend.addr.port());
    let input = serde_json::json!({
        "userDataDir": dir.path().join("profile"),
        "launchMs": LAUNCH_MS,
        "waitMs": WAIT_MS,
        "scenarios": [
            {
                "name": "h2",
                "page": format!("{h2_origin}/"),
                "socket": format!("wss://localhost:{h2_port}/ws"),
                "message": h2_message,
            },
            {
                "name": "http1",
                "page": format!("{h1_origin}/"),
                "socket": format!("wss://localhost:{h1_port}/ws"),
                "message": h1_message,
            },
            // The backend serves the same page itself, on an origin that
            // is not in the route's list.
            {
                "name": "forbidden, new connection",
                "page": format!("{forbidden_origin}/"),
                "socket": format!("wss://localhost:{h2_port}/ws"),
                "message": "never sent",
            },
            {
                "name": "forbidden, on an h2 connection",
                "page": format!("{forbidden_origin}/"),
                "warmup": format!("{h2_origin}/"),
                "socket": format!("wss://localhost:{h2_port}/ws"),
                "message": "never sent",
            },
            {
                "name": "untrusted certificate",
                "page": format!("https://localhost:{untrusted_port}/"),
            },
        ],
    });
    let report = drive_chromium(&home, input).await;
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "{report}");

    // The page came over h2 and so did its WebSocket: Chromium put the
    // extended CONNECT on the page's connection (whose SETTINGS, with
    // ENABLE_CONNECT_PROTOCOL, it had long before), made no key, got 200.
    assert_json(
        scenario(results, "h2"),
        serde_json::json!({
            "name": "h2",
            "console": [],
            "handshakes": [{ "keySent": false, "origin": h2_origin, "responseStatus": 200 }],
            "pageStatus": 200,
            "nextHopProtocol": "h2",
            "socket": {
                "events": ["open", "message", "close"],
                "echoed": h2_message,
                "code": 1000,
                "wasClean": true,
                "extensions": "",
            },
        }),
        "the h2 listener, as the page saw it",
    );
    assert_json(
        scenario(results, "http1"),
        serde_json::json!({
            "name": "http1",
            "console": [],
            "handshakes": [{ "keySent": true, "origin": h1_origin, "responseStatus": 101 }],
            "pageStatus": 200,
            "nextHopProtocol": "http/1.1",
            "socket": {
                "events": ["open", "message", "close"],
                "echoed": h1_message,
                "code": 1000,
                "wasClean": true,
                "extensions": "",
            },
        }),
        "the http2 = false listener, as the page saw it",
    );
    // A WebSocket never opens a new h2 connection in Chromium: from a page
    // with no connection to wsgate in its partition the socket comes over
    // HTTP/1.1 (a key is made), even to the h2 listener. After the page's
    // credentialed fetch it rides that h2 connection (no key). Both are
    // refused: the browser sees only the 403 and a 1006.
    let refused = |name: &str, key_sent: bool, warmup: Option<&str>| {
        let mut expected = serde_json::json!({
            "name": name,
            "console": [format!(
                "error: WebSocket connection to 'wss://localhost:{h2_port}/ws' failed: \
                 Error during WebSocket handshake: Unexpected response code: 403"
            )],
            "handshakes": [{
                "keySent": key_sent,
                "origin": forbidden_origin,
                "responseStatus": null,
            }],
            "pageStatus": 200,
            "nextHopProtocol": "http/1.1",
            "socket": {
                "events": ["error", "close"],
                "echoed": null,
                "code": 1006,
                "wasClean": false,
                "extensions": "",
            },
        });
        if let Some(warmup) = warmup {
            expected["warmup"] = warmup.into();
        }
        assert_json(scenario(results, name), expected, name);
    };
    refused("forbidden, new connection", true, None);
    refused("forbidden, on an h2 connection", false, Some("opaque"));
    // The control: without the test CA's trust Chromium would refuse.
    assert_json(
        scenario(results, "untrusted certificate"),
        serde_json::json!({
            "name": "untrusted certificate",
            "console": [],
            "handshakes": [],
            "failure": format!(
                "page.goto: net::ERR_CERT_AUTHORITY_INVALID at https://localhost:{untrusted_port}/"
            ),
        }),
        "the self-signed listener",
    );

    // wsgate's side. Every line is in once it has logged "stopped".
    wsgate.signal("TERM");
    log_line(&mut wsgate, "saying it stopped", |line| {
        line["message"] == "stopped"
    });
    assert_eq!(wsgate.wait_exit(), Some(0));

    let tunnel = |origin: &str, protocol: &str, message: &str| {
        serde_json::json!({
            "level": "INFO",
            "message": "tunnel closed",
            "route": "app",
            "client_ip": "127.0.0.1",
            "origin": origin,
            "protocol": protocol,
            "cause": "client",
            "close_code": 1000,
            "close_from": "client",
            "client_to_upstream": client_bytes(message.len()),
            "upstream_to_client": backend_bytes(message.len()),
            "messages_to_upstream": 1,
            "messages_to_client": 1,
        })
    };
    assert_json(
        &Value::Array(lines_with_message(&wsgate, "tunnel closed")),
        serde_json::json!([
            tunnel(&h2_origin, "h2", h2_message),
            tunnel(&h1_origin, "http/1.1", h1_message),
        ]),
        "wsgate's tunnel lines",
    );
    // The first socket came on a new HTTP/1.1 connection, the second as a
    // stream of the h2 connection the page's fetch had opened.
    let rejection = |protocol: &str| {
        serde_json::json!({
            "level": "INFO",
            "message": "request rejected",
            "route": "app",
            "client_ip": "127.0.0.1",
            "origin": forbidden_origin,
            "path": "/ws",
            "protocol": protocol,
            "status": 403,
            "reason": "origin-forbidden",
            "detail": format!("origin \"{forbidden_origin}\" is not in the allowlist of route \"app\""),
        })
    };
    assert_json(
        &Value::Array(lines_with_message(&wsgate, "request rejected")),
        serde_json::json!([rejection("http/1.1"), rejection("h2")]),
        "wsgate's refusal lines",
    );
    let page = serde_json::json!({
        "level": "INFO",
        "message": "request",
        "route": "app",
        "client_ip": "127.0.0.1",
        "method": "GET",
        "path": "/",
        "status": 200,
        "bytes": PAGE.len(),
        "complete": true,
    });
    // The two pages and the forbidden page's fetch.
    assert_json(
        &Value::Array(lines_with_message(&wsgate, "request")),
        serde_json::json!([page, page, page]),
        "wsgate's request lines",
    );
    // Chromium refused the self-signed certificate in the handshake, with
    // the alert that says so. How many connections it tries (one to three
    // here) is its own business; every one ends the same way.
    let tls_failures = lines_with_message(&wsgate, "TLS handshake failed");
    assert!(!tls_failures.is_empty(), "no TLS failure logged");
    for failure in &tls_failures {
        assert_json(
            failure,
            serde_json::json!({
                "level": "INFO",
                "message": "TLS handshake failed",
                "listener": "127.0.0.1:0",
                "error": "received fatal alert: CertificateUnknown",
            }),
            "wsgate's TLS failure line",
        );
    }

    // The backend saw both upgrades with the page's Origin and never one
    // from the forbidden page.
    let mut seen = Vec::new();
    while let Ok(event) = backend.seen.try_recv() {
        seen.push(event);
    }
    let get = |path: &str, origin: Option<&str>, via_wsgate: bool| Seen::Request {
        method: "GET".to_owned(),
        path: path.to_owned(),
        origin: origin.map(str::to_owned),
        forwarded_proto: via_wsgate.then(|| "https".to_owned()),
    };
    assert_eq!(
        seen,
        vec![
            get("/", None, true),
            get("/ws", Some(&h2_origin), true),
            Seen::Echoed(h2_message.to_owned()),
            get("/", None, true),
            get("/ws", Some(&h1_origin), true),
            Seen::Echoed(h1_message.to_owned()),
            get("/", None, false),
            get("/", None, false),
            get("/", None, true),
        ]
    );
}
