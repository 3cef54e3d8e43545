//! The upgrade path's own request parser (`UpgradeRequest::parse`) and
//! what it does with a request it takes: the head written for the backend
//! and the header map for auth. Against httparse as the reference reader
//! of HTTP/1.1 heads:
//!
//! - a request taken is a complete GET, HTTP/1.1, asking for `Upgrade:
//!   websocket` with `Connection: upgrade`, and its head length and rest
//!   are httparse's;
//! - the head written upstream is one complete HTTP/1.1 GET, nothing after
//!   it, with `Connection: Upgrade`, and none of the client's hop-by-hop
//!   fields;
//! - the header map for auth exists (every field httparse passes, `http`
//!   takes).
//!
//! Input: a flags byte (peer trusted, TLS, IPv6 peer), then the bytes.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::parse_upgrade;
use wsgate::headers::forwarding::Hop;

/// Fields that describe a connection (RFC 9110 §7.6.1), which no proxy
/// passes on; `Connection` itself is written afresh.
const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
];

fn tokens<'a>(
    fields: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = String> + 'a {
    fields
        .iter()
        .filter(move |field| field.name.eq_ignore_ascii_case(name))
        .flat_map(|field| field.value.split(|&b| b == b','))
        .map(|token| String::from_utf8_lossy(token.trim_ascii()).to_ascii_lowercase())
}

fuzz_target!(|input: &[u8]| {
    let [flags, data @ ..] = input else {
        return;
    };
    let peer = if flags & 4 != 0 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
    };
    let hop = Hop {
        peer,
        peer_trusted: flags & 1 != 0,
        client_ip: peer,
        tls: flags & 2 != 0,
    };
    let buffer = Bytes::copy_from_slice(data);
    let Some(upgrade) = parse_upgrade(&buffer, &hop) else {
        return;
    };

    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(head_len)) = request.parse(data) else {
        panic!("taken, but httparse does not read a complete head");
    };
    assert_eq!(request.method, Some("GET"), "taken, but not a GET");
    assert_eq!(request.version, Some(1), "taken, but not HTTP/1.1");
    assert_eq!(
        upgrade.head_len, head_len,
        "head length differs from httparse's"
    );
    assert_eq!(
        &upgrade.rest[..],
        &data[head_len..],
        "the rest is not what follows the head"
    );
    assert!(
        tokens(request.headers, "upgrade").any(|t| t == "websocket"),
        "taken without Upgrade: websocket"
    );
    assert!(
        tokens(request.headers, "connection").any(|t| t == "upgrade"),
        "taken without Connection: upgrade"
    );
    assert!(upgrade.parts.is_some(), "a taken request has no header map");

    let mut out_fields = [httparse::EMPTY_HEADER; 256];
    let mut out = httparse::Request::new(&mut out_fields);
    match out.parse(&upgrade.encoded) {
        Ok(httparse::Status::Complete(len)) => {
            assert_eq!(
                len,
                upgrade.encoded.len(),
                "bytes after the head written upstream"
            );
        }
        other => panic!(
            "the head written upstream does not parse ({other:?}): {:?}",
            String::from_utf8_lossy(&upgrade.encoded)
        ),
    }
    assert_eq!(out.method, Some("GET"));
    assert_eq!(out.version, Some(1));
    let connection: Vec<String> = tokens(out.headers, "connection").collect();
    assert_eq!(connection, ["upgrade"], "Connection upstream");
    for field in out.headers.iter() {
        assert!(
            !HOP_BY_HOP
                .iter()
                .any(|hop| field.name.eq_ignore_ascii_case(hop)),
            "hop-by-hop field {:?} went upstream",
            field.name
        );
    }
});
