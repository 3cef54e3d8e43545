//! Forward auth against real auth services on loopback sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

/// What the test auth service saw: connections accepted and request heads.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: Mutex<Vec<http::request::Parts>>,
}

/// An auth service whose answer depends on the request path.
async fn spawn_auth_service() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            state.connections.fetch_add(1, Ordering::SeqCst);
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let (parts, _) = request.into_parts();
                        let path = parts.uri.path().to_owned();
                        state.requests.lock().unwrap().push(parts);
                        Ok::<_, Infallible>(answer(&path).await)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: &'static [u8]| {
        let mut response = Response::new(Full::new(Bytes::from_static(body)));
        *response.status_mut() = status;
        response
    };
    match path {
        "/allow" => {
            let mut response = reply(StatusCode::OK, b"");
            response
                .headers_mut()
                .insert("x-user", HeaderValue::from_static("alice"));
            response
                .headers_mut()
                .append("x-groups", HeaderValue::from_static("a"));
            response
                .headers_mut()
                .append("x-groups", HeaderValue::from_static("b"));
            response
                .headers_mut()
                .insert("x-secret-internal", HeaderValue::from_static("not copied"));
            response
        }
        "/login" => reply(StatusCode::UNAUTHORIZED, b"please log in"),
        "/forbidden" => reply(StatusCode::FORBIDDEN, b"not your room"),
        "/huge" => Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .body(Full::new(Bytes::from(vec![b'x'; 100 * 1024])))
            .unwrap(),
        "/broken" => reply(StatusCode::INTERNAL_SERVER_ERROR, b"oops"),
        "/redirect" => reply(StatusCode::FOUND, b""),
        _ => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            reply(StatusCode::OK, b"")
        }
    }
}

fn forward_policy(url: String, timeout: &str) -> AuthPolicy {
    let raw = RawAuth {
        forward: Some(url),
        forward_timeout: Some(timeout.into()),
        forward_response_headers: vec!["X-User".into(), "X-Groups".into()],
        ..RawAuth::default()
    };
    build_ok(&raw, Path::new("."))
}

fn client_request() -> Parts {
    request(
        "/ws/room?id=7",
        &[
            ("origin", "https://app.example"),
            ("cookie", "sid=abc"),
            ("authorization", "Bearer t"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "chat.example"),
            ("x-user", "spoofed"),
            ("user-agent", "not passed on"),
        ],
    )
}

#[tokio::test]
async fn a_2xx_allows_and_copies_the_listed_headers() {
    let (addr, seen) = spawn_auth_service().await;
    let policy = forward_policy(format!("http://{addr}/allow"), "2s");
    let mut parts = client_request();
    policy.strip_spoofable(&mut parts.headers);
    assert!(
        parts.headers.get("x-user").is_none(),
        "the client's copy is stripped"
    );
    let grant = policy.check(&parts).await.unwrap();
    grant.apply(&mut parts);
    assert_eq!(parts.headers["x-user"], "alice");
    assert_eq!(
        parts.headers.get_all("x-groups").iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(parts.headers.get("x-secret-internal").is_none());
    assert_eq!(parts.uri, "/ws/room?id=7");

    let requests = seen.requests.lock().unwrap();
    let sent = &requests[0];
    assert_eq!(sent.method, http::Method::GET);
    assert_eq!(sent.uri.path(), "/allow");
    let expected = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/ws/room?id=7"),
        ("origin", "https://app.example"),
        ("cookie", "sid=abc"),
        ("authorization", "Bearer t"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "chat.example"),
    ];
    for (name, value) in expected {
        assert_eq!(sent.headers[name], value, "{name}");
    }
    assert!(sent.headers.get("user-agent").is_none());
}

#[tokio::test]
async fn connections_to_the_auth_service_are_reused() {
    let (addr, seen) = spawn_auth_service().await;
    let policy = forward_policy(format!("http://{addr}/allow"), "2s");
    for _ in 0..3 {
        policy.check(&client_request()).await.unwrap();
    }
    let denied = forward_policy(format!("http://{addr}/login"), "2s");
    assert!(denied.check(&client_request()).await.is_err());
    assert_eq!(seen.requests.lock().unwrap().len(), 3 + 1);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1 + 1,
        "one per policy"
    );
}

#[tokio::test]
async fn a_401_or_403_is_relayed_with_its_body() {
    let (addr, _) = spawn_auth_service().await;
    for (path, status, body) in [
        ("login", 401, "please log in"),
        ("forbidden", 403, "not your room"),
    ] {
        let policy = forward_policy(format!("http://{addr}/{path}"), "2s");
        let rejection = policy.check(&client_request()).await.unwrap_err();
        let expected = Rejection::AuthDenied {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Box::default(),
            body: Bytes::from_static(body.as_bytes()),
        };
        assert_eq!(rejection, expected);
    }
    let huge = forward_policy(format!("http://{addr}/huge"), "2s");
    match huge.check(&client_request()).await {
        Err(Rejection::AuthDenied { status, body, .. }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(body.len(), 64 * 1024, "bounded");
        }
        other => panic!("{other:?}"),
    }
}

fn unavailable(result: Result<AuthGrant, Rejection>) -> String {
    match result {
        Err(Rejection::AuthUnavailable { detail }) => detail,
        other => panic!("expected auth-unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn other_answers_mean_unavailable() {
    let (addr, _) = spawn_auth_service().await;
    let broken = forward_policy(format!("http://{addr}/broken"), "2s");
    assert_eq!(
        unavailable(broken.check(&client_request()).await),
        format!(
            "the auth service at http://{addr}/broken answered 500 Internal Server Error; only 2xx, 401 and 403 are understood"
        )
    );
    let redirect = forward_policy(format!("http://{addr}/redirect"), "2s");
    assert!(unavailable(redirect.check(&client_request()).await).contains("answered 302 Found"));
}

#[tokio::test]
async fn a_silent_auth_service_times_out() {
    let (addr, _) = spawn_auth_service().await;
    let policy = forward_policy(format!("http://{addr}/hang"), "200ms");
    let started = std::time::Instant::now();
    let detail = unavailable(policy.check(&client_request()).await);
    assert_eq!(
        detail,
        format!("the auth service at http://{addr}/hang did not answer within 200ms")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let policy = forward_policy(format!("http://{addr}/check"), "2s");
    let detail = unavailable(policy.check(&client_request()).await);
    assert!(
        detail.starts_with(&format!(
            "the auth service at http://{addr}/check is unreachable: "
        )),
        "{detail}"
    );
    assert!(detail.to_lowercase().contains("refused"), "{detail}");
}
