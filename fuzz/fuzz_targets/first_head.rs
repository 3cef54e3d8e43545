//! Reading a connection's first request head off the wire, its bytes cut
//! into arbitrary reads, against the plain definition of where a head ends
//! (the first empty line, CRLF or bare LF, RFC 9112 §2.2):
//!
//! - a head that ends within the limit is `Complete`, and what was read is
//!   a prefix of the input that holds the whole head;
//! - one that ends past the limit is `TooLarge`;
//! - input with no empty line is `Closed` or `TooLarge`, never `Complete`;
//! - whatever was read then goes through the upgrade parser (see the
//!   `upgrade_request` target) without a panic.
//!
//! Input: a cut byte (see `cuts`), a limit byte (0: 16 KiB, else 4 bytes
//! per unit), then the bytes the client sends.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsgate::fuzzing::{FirstHead, parse_upgrade, read_first_head};
use wsgate::headers::forwarding::Hop;
use wsgate_fuzz::{Pieces, reference_head_end, runtime};

fuzz_target!(|input: &[u8]| {
    let [cut, limit, data @ ..] = input else {
        return;
    };
    let limit = match limit {
        0 => 16 * 1024,
        units => usize::from(*units) * 4,
    };
    let mut reader = Pieces::new(data, *cut);
    let head = runtime().block_on(read_first_head(&mut reader, limit, Duration::from_secs(60)));
    let end = reference_head_end(data);
    match head {
        FirstHead::Complete(read) => {
            let end = end.unwrap_or_else(|| panic!("Complete without an empty line in the input"));
            assert!(
                end <= limit,
                "Complete, but the head ({end} bytes) is over the limit ({limit})"
            );
            assert!(
                read.len() >= end,
                "Complete with {} bytes read, the head is {end}",
                read.len()
            );
            assert_eq!(
                &read[..],
                &data[..read.len()],
                "what was read is not the input's start"
            );
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let hop = Hop {
                peer: loopback,
                peer_trusted: false,
                client_ip: loopback,
                tls: false,
            };
            let _ = parse_upgrade(&Bytes::from(read.to_vec()), &hop);
        }
        FirstHead::TooLarge => {
            assert!(
                end.is_none_or(|end| end > limit),
                "TooLarge, but the head ends at {end:?}, within {limit}"
            );
        }
        FirstHead::Closed => {
            assert!(end.is_none(), "Closed, but the head ends at {end:?}");
        }
        FirstHead::TimedOut => panic!("timed out on a reader that is always ready"),
    }
});
