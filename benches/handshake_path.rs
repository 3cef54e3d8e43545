//! Micro-benchmarks for the work wsgate does per upgrade request before a
//! byte reaches the backend: route choice, origin matching, client-IP
//! resolution, header rewriting and JWT verification.
//!
//! These are pure functions, so the numbers are the CPU cost of the policy
//! layer alone; `benches/compare.py` measures the whole handshake (TCP, TLS,
//! HTTP parsing, upstream connect) against nginx and HAProxy. A handshake
//! through the proxy costs tens of microseconds of CPU even in plaintext, so
//! anything here above ~1 µs is worth a look.
//!
//! Run: `cargo bench --bench handshake_path` (about a minute).

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use wsgate::config::RouteConfig;
use wsgate::headers;
use wsgate::headers::forwarding::{self, Hop};
use wsgate::policy::origin::{self, OriginPattern};
use wsgate::router;

/// A route table shaped like a real deployment's: a few host-specific routes,
/// several path prefixes under them, and hostless fallbacks. Route choice
/// scans every route, so the table size is what matters.
const ROUTES: &str = r#"
[[listener]]
addr = "127.0.0.1:0"

[upstream.chat]
servers = ["127.0.0.1:9000"]
[upstream.api]
servers = ["127.0.0.1:9001"]

[[route]]
host = "chat.example.com"
path = "/ws"
upstream = "chat"
origins = ["https://app.example.com", "https://*.example.com"]

[[route]]
host = "chat.example.com"
path = "/ws/admin"
upstream = "chat"
origins = ["https://admin.example.com"]

[[route]]
host = "chat.example.com"
path = "/"
upstream = "api"
websocket = "forbidden"

[[route]]
host = "api.example.com"
path = "/v1/stream"
upstream = "api"
origins = ["https://app.example.com"]

[[route]]
host = "api.example.com"
path = "/v2/stream"
upstream = "api"
origins = ["https://app.example.com"]

[[route]]
host = "api.example.com"
path = "/"
upstream = "api"
websocket = "forbidden"

[[route]]
path = "/socket.io"
upstream = "chat"
origins = ["https://app.example.com"]

[[route]]
path = "/live"
upstream = "chat"
origins = ["https://app.example.com"]

[[route]]
path = "/"
upstream = "api"
websocket = "allowed"
missing_origin = "allow"
"#;

fn routes() -> Vec<Arc<RouteConfig>> {
    wsgate::Config::parse(ROUTES, Path::new("."))
        .expect("the benchmark route table is valid")
        .routes
}

fn bench_router(c: &mut Criterion) {
    let routes = routes();
    let mut group = c.benchmark_group("router");
    // The common case: a host route with a deeper prefix sibling.
    group.bench_function("host_route_hit", |b| {
        b.iter(|| {
            router::route(
                black_box(&routes).iter().map(|route| &**route),
                black_box("chat.example.com"),
                black_box("/ws/room/42"),
            )
        })
    });
    group.bench_function("hostless_fallback", |b| {
        b.iter(|| {
            router::route(
                black_box(&routes).iter().map(|route| &**route),
                black_box("other.example.org"),
                black_box("/live/feed"),
            )
        })
    });
    // What the proxy really does per request: normalise the Host header first
    // (it allocates a lower-cased copy), then route.
    group.bench_function("normalise_host_then_route", |b| {
        b.iter(|| {
            let host = router::normalise_request_host(black_box("Chat.Example.COM:8443"));
            router::route(
                black_box(&routes).iter().map(|route| &**route),
                &host,
                black_box("/ws/room/42"),
            )
        })
    });
    group.finish();
}

fn bench_origin(c: &mut Criterion) {
    let patterns: Vec<OriginPattern> = [
        "https://app.example.com",
        "https://staging.example.com",
        "http://localhost:5173",
        "https://*.example.net",
        "https://*.example.com",
    ]
    .iter()
    .map(|text| OriginPattern::parse(text).expect("valid pattern"))
    .collect();
    let mut group = c.benchmark_group("origin");
    group.bench_function("exact_first", |b| {
        b.iter(|| origin::is_allowed(black_box(&patterns), black_box("https://app.example.com")))
    });
    // Falls through every exact pattern to the last wildcard.
    group.bench_function("wildcard_last", |b| {
        b.iter(|| {
            origin::is_allowed(
                black_box(&patterns),
                black_box("https://eu.chat.example.com"),
            )
        })
    });
    group.bench_function("rejected", |b| {
        b.iter(|| origin::is_allowed(black_box(&patterns), black_box("https://evil.example.org")))
    });
    group.bench_function("null_origin", |b| {
        b.iter(|| origin::is_allowed(black_box(&patterns), black_box("null")))
    });
    group.finish();
}

/// The request head a browser sends for a WebSocket upgrade, behind one
/// trusted load balancer, with a couple of hop-by-hop headers to strip.
fn browser_upgrade() -> HeaderMap {
    let pairs = [
        ("host", "chat.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "*/*"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("sec-websocket-version", "13"),
        ("origin", "https://app.example.com"),
        ("sec-websocket-extensions", "permessage-deflate"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("connection", "keep-alive, Upgrade"),
        ("keep-alive", "timeout=5"),
        (
            "cookie",
            "session=0123456789abcdef0123456789abcdef; theme=dark",
        ),
        ("pragma", "no-cache"),
        ("cache-control", "no-cache"),
        ("upgrade", "websocket"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
    ];
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    map
}

fn bench_headers(c: &mut Criterion) {
    let trusted: Vec<IpNet> = ["127.0.0.1/32", "::1/128", "10.0.0.0/8"]
        .iter()
        .map(|net| net.parse().expect("valid CIDR"))
        .collect();
    let lb: IpAddr = "10.1.2.3".parse().expect("valid IP");
    let stranger: IpAddr = "198.51.100.7".parse().expect("valid IP");
    let head = browser_upgrade();
    let mut group = c.benchmark_group("headers");
    group.bench_function("client_ip_untrusted_peer", |b| {
        b.iter(|| headers::client_ip(black_box(stranger), black_box(&head), black_box(&trusted)))
    });
    group.bench_function("client_ip_trusted_xff_walk", |b| {
        b.iter(|| headers::client_ip(black_box(lb), black_box(&head), black_box(&trusted)))
    });
    // The map is cloned outside the timed part: the proxy rewrites the
    // request's own map in place.
    group.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched_ref(
            browser_upgrade,
            |map| headers::strip_hop_by_hop(map, true),
            BatchSize::SmallInput,
        )
    });
    let hop = Hop {
        peer: lb,
        peer_trusted: true,
        client_ip: "203.0.113.9".parse().expect("valid IP"),
        tls: true,
    };
    group.bench_function("set_forwarding_headers", |b| {
        b.iter_batched_ref(
            browser_upgrade,
            |map| forwarding::set_forwarding_headers(map, black_box(&hop)),
            BatchSize::SmallInput,
        )
    });
    // Everything above in the order the proxy runs it for one upgrade.
    let routes = routes();
    group.bench_function("whole_head_rewrite", |b| {
        b.iter_batched_ref(
            browser_upgrade,
            |map| {
                let host = router::normalise_request_host("chat.example.com");
                let index =
                    router::route(routes.iter().map(|route| &**route), &host, "/ws/room/42")
                        .expect("routed");
                let client = headers::client_ip(lb, map, &trusted);
                let origin_ok = map
                    .get("origin")
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|value| origin::is_allowed(&routes[index].policy.origins, value));
                headers::strip_hop_by_hop(map, true);
                forwarding::set_forwarding_headers(
                    map,
                    &Hop {
                        peer: lb,
                        peer_trusted: true,
                        client_ip: client,
                        tls: true,
                    },
                );
                origin_ok
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A route whose `[route.auth]` verifies JWTs with `key_line`, plus the
/// scope check and one forwarded claim, as a typical deployment would.
fn auth_route(dir: &Path, key_line: &str) -> Arc<RouteConfig> {
    let text = format!(
        "[[listener]]\naddr = \"127.0.0.1:0\"\n\
         [upstream.chat]\nservers = [\"127.0.0.1:9000\"]\n\
         [[route]]\npath = \"/ws\"\nupstream = \"chat\"\nmissing_origin = \"allow\"\n\
         [route.auth]\n{key_line}\ntoken_query = \"token\"\nrequired_scope = \"chat\"\n\
         forward_claims = {{ sub = \"X-User-Id\" }}\n"
    );
    let config = wsgate::Config::parse(&text, dir)
        .unwrap_or_else(|problems| panic!("bench auth config: {problems:?}"));
    config.routes[0].clone()
}

fn token(algorithm: Algorithm, key: &EncodingKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "sub": "user-42",
        "scope": "read chat",
        "iat": now,
        "exp": now + 24 * 3600,
    });
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("token encodes")
}

/// The request head as the proxy sees it, token in `Authorization: Bearer`.
fn request_with(token: &str) -> Parts {
    http::Request::builder()
        .uri("/ws/room/42")
        .header("host", "chat.example.com")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .expect("valid request")
        .into_parts()
        .0
}

/// `AuthPolicy::check` is async for forward auth only; the JWT path never
/// awaits, so one poll finishes it and no runtime is timed along with it.
fn poll_once<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the JWT check awaited something"),
    }
}

fn bench_jwt(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");

    let secret = b"0123456789abcdef0123456789abcdef-bench-only";
    std::fs::write(dir.path().join("hs256.secret"), secret).expect("write secret");
    let hs_route = auth_route(dir.path(), "jwt_secret_file = \"hs256.secret\"");
    let hs_token = token(Algorithm::HS256, &EncodingKey::from_secret(secret));

    let es_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    std::fs::write(dir.path().join("es256.pub.pem"), es_key.public_key_pem())
        .expect("write public key");
    let es_route = auth_route(dir.path(), "jwt_public_key = \"es256.pub.pem\"");
    let es_token = token(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(es_key.serialize_pem().as_bytes()).expect("EC signing key"),
    );

    // A token whose last signature character is changed: fails after all the parsing.
    let mut forged = hs_token.clone();
    let last = forged.pop().expect("non-empty token");
    forged.push(if last == 'A' { 'B' } else { 'A' });

    let mut group = c.benchmark_group("jwt");
    for (name, route, token, should_pass) in [
        ("hs256_valid", &hs_route, &hs_token, true),
        ("hs256_bad_signature", &hs_route, &forged, false),
        ("es256_valid", &es_route, &es_token, true),
    ] {
        let policy = route.auth.as_ref().expect("route has auth");
        let parts = request_with(token);
        assert_eq!(
            poll_once(policy.check(&parts)).is_ok(),
            should_pass,
            "{name}"
        );
        group.bench_function(name, |b| {
            b.iter(|| poll_once(policy.check(black_box(&parts))).is_ok())
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short windows: these functions run in nanoseconds, so 2 s gives
    // millions of samples and the whole suite stays around a minute.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = handshake_path;
    config = config();
    targets = bench_router, bench_origin, bench_headers, bench_jwt
}
criterion_main!(handshake_path);
