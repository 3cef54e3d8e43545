//! Route choice end to end: host routes beat host-less ones, the longest
//! path prefix on a segment boundary wins, host compares without case or
//! port.

use crate::common::*;

struct Origins {
    root: HttpOrigin,
    ws: HttpOrigin,
    api: HttpOrigin,
}

impl Origins {
    /// Asserts which origin got the request for `path` on `host`.
    async fn expect(&mut self, proxy: &TestProxy, host: &str, path: &str, which: &str) {
        let (head, _, _) = exchange(
            proxy.addr(),
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(head.status, 200, "{host}{path}");
        let (chosen, others) = match which {
            "root" => (&mut self.root, [&mut self.ws, &mut self.api]),
            "ws" => (&mut self.ws, [&mut self.root, &mut self.api]),
            _ => (&mut self.api, [&mut self.root, &mut self.ws]),
        };
        assert_eq!(
            chosen.next_request().await.uri,
            path,
            "{host}{path} should go to {which}"
        );
        for other in others {
            assert!(
                other.seen.try_recv().is_err(),
                "{host}{path} also reached another origin"
            );
        }
    }
}

#[tokio::test]
async fn host_then_longest_prefix_picks_the_route() {
    let mut origins = Origins {
        root: spawn_http_origin().await,
        ws: spawn_http_origin().await,
        api: spawn_http_origin().await,
    };
    let proxy = start_proxy(&format!(
        r#"
        [[listener]]
        addr = "127.0.0.1:0"
        [upstream.root]
        servers = ["{}"]
        [upstream.ws]
        servers = ["{}"]
        [upstream.api]
        servers = ["{}"]
        [[route]]
        path = "/"
        upstream = "root"
        [[route]]
        path = "/ws/"
        upstream = "ws"
        [[route]]
        host = "API.example.com"
        path = "/"
        upstream = "api"
        "#,
        origins.root.addr, origins.ws.addr, origins.api.addr
    ))
    .await;
    origins.expect(&proxy, "www.example.com", "/ws", "ws").await;
    origins
        .expect(&proxy, "www.example.com", "/ws/room?x=1", "ws")
        .await;
    origins
        .expect(&proxy, "www.example.com", "/wsx", "root")
        .await;
    origins.expect(&proxy, "www.example.com", "/", "root").await;
    origins
        .expect(&proxy, "api.example.com", "/ws/room", "api")
        .await;
    origins
        .expect(&proxy, "Api.Example.COM:8443", "/anything", "api")
        .await;
    origins
        .expect(&proxy, "api.example.com.", "/x", "api")
        .await;
    origins
        .expect(&proxy, "api.example.org", "/x", "root")
        .await;
    proxy.stop().await;
}
