//! `subprotocols` through a running proxy: the offer is narrowed to the
//! allowed ones in the client's order, a client offering none of them gets
//! 400, and a backend selecting one outside the forwarded offer is 502.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const PROTOCOL: &str = "Sec-WebSocket-Protocol";

/// Header lines of a request.
type Extra<'a> = &'a [(&'a str, &'a str)];

struct Setup {
    first: WsBackend,
    last: WsBackend,
    rogue: WsBackend,
    proxy: TestProxy,
}

fn pick_last(offered: &[String]) -> Option<String> {
    offered.last().cloned()
}

/// Picks `chat.v3` whatever was offered (allowed nowhere, offered by some clients).
fn pick_v3(_: &[String]) -> Option<String> {
    Some("chat.v3".to_owned())
}

async fn setup() -> Setup {
    let first = spawn_ws_echo().await;
    let last = spawn_ws_backend(pick_last).await;
    let rogue = spawn_ws_backend(pick_v3).await;
    let route = |path: &str, upstream: &str| {
        format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"{upstream}\"\nmissing_origin = \"allow\"\n\
             subprotocols = [\"chat.v2\", \"chat.v1\"]\n"
        )
    };
    let toml = [
        format!(
            "[[listener]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
             [server]\ndrain_timeout = \"1s\"\n\
             [upstream.first]\nservers = [\"{}\"]\n[upstream.last]\nservers = [\"{}\"]\n\
             [upstream.rogue]\nservers = [\"{}\"]\n",
            first.addr, last.addr, rogue.addr
        ),
        route("/sp", "first"),
        route("/sp-last", "last"),
        route("/sp-rogue", "rogue"),
        "[[route]]\npath = \"/free\"\nupstream = \"rogue\"\nmissing_origin = \"allow\"\n"
            .to_owned(),
        warmup_config().await,
    ]
    .concat();
    let proxy = start_proxy(&toml).await;
    Setup {
        first,
        last,
        rogue,
        proxy,
    }
}

on_both_paths!(
    subprotocol_offer_is_narrowed_to_the_allowed_ones_in_client_order,
    subprotocol_offer_without_an_allowed_one_is_400,
    subprotocol_selected_outside_the_forwarded_offer_is_502,
    subprotocol_selected_inside_the_offer_reaches_the_client,
);

fn addr(setup: &Setup) -> SocketAddr {
    setup.proxy.addr()
}

async fn subprotocol_offer_is_narrowed_to_the_allowed_ones_in_client_order(path: UpgradePath) {
    let mut setup = setup().await;
    let (head, body) = upgrade_via(
        path,
        addr(&setup),
        "/sp",
        &[(PROTOCOL, "chat.v3, chat.v1, chat.v2")],
    )
    .await;
    assert_eq!(head.status, 101, "{body}");
    assert_eq!(header_values(&head, "sec-websocket-protocol"), ["chat.v1"]);
    let seen = setup.first.next_request().await;
    assert_eq!(seen.all("sec-websocket-protocol"), ["chat.v1, chat.v2"]);

    // Across several header lines, unknown and case-different tokens dropped.
    let (head, _) = upgrade_via(
        path,
        addr(&setup),
        "/sp",
        &[(PROTOCOL, "Chat.V1, chat.v2"), (PROTOCOL, "x, chat.v1")],
    )
    .await;
    assert_eq!(head.status, 101);
    assert_eq!(header_values(&head, "sec-websocket-protocol"), ["chat.v2"]);
    let seen = setup.first.next_request().await;
    assert_eq!(seen.all("sec-websocket-protocol"), ["chat.v2, chat.v1"]);

    // A real client: negotiated, and the tunnel carries data.
    let (mut ws, response) =
        ws_connect_via(path, addr(&setup), "/sp", &[(PROTOCOL, "chat.v3, chat.v2")])
            .await
            .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v2");
    assert_eq!(
        setup
            .first
            .next_request()
            .await
            .all("sec-websocket-protocol"),
        ["chat.v2"]
    );
    within("the echo", async {
        ws.send(Message::Text("v2 hello".into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("v2 hello".into())
        );
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert_backend_idle(&mut setup.first);
    setup.proxy.stop().await;
}

async fn subprotocol_offer_without_an_allowed_one_is_400(path: UpgradePath) {
    let mut setup = setup().await;
    let cases: [(&str, Extra, &str); 5] = [
        ("only x", &[(PROTOCOL, "x")], "(x)"),
        ("no offer", &[], "(none)"),
        ("empty offer", &[(PROTOCOL, "")], "(none)"),
        (
            "case differs",
            &[(PROTOCOL, "CHAT.V1, Chat.v2")],
            "(CHAT.V1, Chat.v2)",
        ),
        (
            "prefix only",
            &[(PROTOCOL, "chat, chat.v1x")],
            "(chat, chat.v1x)",
        ),
    ];
    for (label, extra, offered) in cases {
        let (head, body) = upgrade_via(path, addr(&setup), "/sp", extra).await;
        assert_reject(&head, &body, 400, "subprotocol-forbidden");
        assert!(body.contains(offered), "{label}: {body}");
        assert_eq!(
            header_values(&head, "sec-websocket-protocol"),
            Vec::<String>::new()
        );
    }
    // A real client gets the same refusal.
    let error = ws_connect_via(path, addr(&setup), "/sp", &[(PROTOCOL, "chat.v9")])
        .await
        .unwrap_err();
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 400);
            assert_eq!(response.headers()["wsgate-reason"], "subprotocol-forbidden");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    assert_backend_idle(&mut setup.first);
    setup.proxy.stop().await;
}

async fn subprotocol_selected_outside_the_forwarded_offer_is_502(path: UpgradePath) {
    let mut setup = setup().await;
    // chat.v3 was offered by the client but narrowed away: not selectable.
    let (head, body) = upgrade_via(
        path,
        addr(&setup),
        "/sp-rogue",
        &[(PROTOCOL, "chat.v3, chat.v1")],
    )
    .await;
    assert_reject(&head, &body, 502, "upstream-protocol");
    assert!(body.contains("\"chat.v3\""), "{body}");
    assert_eq!(
        setup
            .rogue
            .next_request()
            .await
            .all("sec-websocket-protocol"),
        ["chat.v1"]
    );
    // Never offered at all.
    let (head, body) = upgrade_via(path, addr(&setup), "/sp-rogue", &[(PROTOCOL, "chat.v2")]).await;
    assert_reject(&head, &body, 502, "upstream-protocol");
    setup.rogue.next_request().await;
    // On a route without `subprotocols`, a selection the client did not offer
    // is refused all the same (RFC 6455 §4.1: the client would fail it).
    let (head, body) = upgrade_via(path, addr(&setup), "/free", &[(PROTOCOL, "chat.v1")]).await;
    assert_reject(&head, &body, 502, "upstream-protocol");
    setup.rogue.next_request().await;

    let admin = setup.proxy.admin.unwrap();
    let (status, metrics) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for (route, count) in [("/sp-rogue", 2.0), ("/free", 1.0)] {
        let labels = [("route", route), ("reason", "upstream-protocol")];
        assert_eq!(
            metric(&metrics, "wsgate_rejections_total", &labels),
            Some(count)
        );
        let labels = [("route", route), ("outcome", "upstream_error")];
        assert_eq!(
            metric(&metrics, "wsgate_handshakes_total", &labels),
            Some(count)
        );
    }
    assert_backend_idle(&mut setup.rogue);
    setup.proxy.stop().await;
}

async fn subprotocol_selected_inside_the_offer_reaches_the_client(path: UpgradePath) {
    let mut setup = setup().await;
    let (head, body) = upgrade_via(
        path,
        addr(&setup),
        "/sp-last",
        &[(PROTOCOL, "chat.v1, chat.v3, chat.v2")],
    )
    .await;
    assert_eq!(head.status, 101, "{body}");
    assert_eq!(header_values(&head, "sec-websocket-protocol"), ["chat.v2"]);
    assert_eq!(
        setup
            .last
            .next_request()
            .await
            .all("sec-websocket-protocol"),
        ["chat.v1, chat.v2"]
    );
    let (mut ws, response) = ws_connect_via(
        path,
        addr(&setup),
        "/sp-last",
        &[(PROTOCOL, "chat.v2, chat.v1")],
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v1");
    setup.last.next_request().await;
    within("closing", async {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert_backend_idle(&mut setup.last);
    setup.proxy.stop().await;
}
