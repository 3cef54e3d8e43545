//! Two real `wsgate run` processes over the same three servers (listed in
//! different orders) agree on where every hashed key goes and on what every
//! sticky cookie means: no per-process state (a random hash seed, a list
//! index) leaks into either. Listeners bind port 0; each process's port is
//! read from its "listening" log line.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;

use common::process::WsgateProcess;
use common::*;

/// A running `wsgate run`, killed (by its own pid) when dropped.
struct Wsgate {
    /// Killed on drop; read on, so a full pipe never blocks its logging.
    _process: WsgateProcess,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Wsgate {
    fn start(config: &str) -> Wsgate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let mut process = WsgateProcess::start(&path, &[], "info");
        let addr = process.listening_addr();
        Wsgate {
            _process: process,
            addr,
            _dir: dir,
        }
    }
}

fn config(servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|server| format!("\"{server}\""))
        .collect();
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"

[upstream.app]
servers = [{}]
balance = "hash"
hash_key = "header:x-user"
sticky_cookie = "srv"

[[route]]
path = "/"
upstream = "app"
"#,
        servers.join(", ")
    )
}

/// Which origin served a plain GET with `extra` header lines, and the
/// response's `Set-Cookie`.
async fn get(
    proxy: SocketAddr,
    extra: &str,
    origins: &mut [HttpOrigin],
) -> (usize, Option<String>) {
    let (head, _, _) = exchange(
        proxy,
        &format!("GET /x HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(head.status, 200, "{:?}", head.headers);
    let mut hits = Vec::new();
    for (index, origin) in origins.iter_mut().enumerate() {
        while origin.seen.try_recv().is_ok() {
            hits.push(index);
        }
    }
    assert_eq!(hits.len(), 1, "origins that saw the request: {hits:?}");
    (hits[0], head.get("set-cookie").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_map_keys_and_cookies_alike() {
    let mut origins = Vec::new();
    for _ in 0..3 {
        origins.push(spawn_http_origin().await);
    }
    let servers: Vec<SocketAddr> = origins.iter().map(|origin| origin.addr).collect();
    let reversed: Vec<SocketAddr> = servers.iter().rev().copied().collect();
    let one = Wsgate::start(&config(&servers));
    let two = Wsgate::start(&config(&reversed));

    let mut counts = [0; 3];
    let mut set_by_one: [Option<String>; 3] = Default::default();
    for key in 0..100 {
        let header = format!("X-User: key-{key}\r\n");
        let (here, cookie) = get(one.addr, &header, &mut origins).await;
        let (there, again) = get(two.addr, &header, &mut origins).await;
        assert_eq!(here, there, "key-{key}");
        // The same server, so the same cookie.
        assert_eq!(cookie, again);
        counts[here] += 1;
        set_by_one[here] = cookie;
    }
    assert!(counts.iter().all(|&count| count > 10), "{counts:?}");

    // A cookie one process set names its server the same way to the
    // other, which honours it and sets none.
    for (index, set_cookie) in set_by_one.iter().enumerate() {
        let set_cookie = set_cookie.as_deref().unwrap();
        let value = format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(servers[index].to_string().as_bytes())
        );
        assert_eq!(
            set_cookie,
            format!("srv={value}; Path=/; HttpOnly; SameSite=Lax")
        );
        let (served, cookie) =
            get(two.addr, &format!("Cookie: srv={value}\r\n"), &mut origins).await;
        assert_eq!((served, cookie), (index, None));
    }
}
