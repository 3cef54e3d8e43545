//! What the targets share: one current-thread runtime, and a reader that
//! hands out an input in the pieces a fuzz input chose, so every stream
//! parser also meets its bytes split at arbitrary places.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

/// One runtime for the process: building one per input would cost more
/// than most inputs take to parse.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Lengths of the pieces `len` bytes are cut into, from one control byte:
/// 0 keeps them whole; otherwise a small xorshift sequence seeded by the
/// byte picks lengths of 1 up to `1 + seed % 32`, so short seeds give
/// byte-by-byte reads and long ones reads that cut headers in the middle.
pub fn cuts(seed: u8, len: usize) -> Vec<usize> {
    if seed == 0 || len == 0 {
        return vec![len];
    }
    let most = 1 + usize::from(seed % 32);
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut pieces = Vec::new();
    let mut left = len;
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let piece = (1 + state as usize % most).min(left);
        pieces.push(piece);
        left -= piece;
    }
    pieces
}

/// Reads `data` in the pieces of [`cuts`], then end of file. Every read is
/// ready at once, like bytes already in a socket buffer.
pub struct Pieces {
    data: Vec<u8>,
    ends: Vec<usize>,
    at: usize,
    next_end: usize,
}

impl Pieces {
    pub fn new(data: &[u8], seed: u8) -> Pieces {
        let mut ends = Vec::new();
        let mut end = 0;
        for piece in cuts(seed, data.len()) {
            end += piece;
            ends.push(end);
        }
        Pieces {
            data: data.to_vec(),
            ends,
            at: 0,
            next_end: 0,
        }
    }

    /// How many bytes have been read so far.
    pub fn taken(&self) -> usize {
        self.at
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.next_end < this.ends.len() && this.ends[this.next_end] <= this.at {
            this.next_end += 1;
        }
        let Some(&end) = this.ends.get(this.next_end) else {
            return Poll::Ready(Ok(()));
        };
        let count = (end - this.at).min(buf.remaining());
        buf.put_slice(&this.data[this.at..this.at + count]);
        this.at += count;
        Poll::Ready(Ok(()))
    }
}

/// The end of the first empty line (CRLF or bare LF), written out plainly
/// as RFC 9112 §2.2 reads: a LF, then either another LF or CR LF.
pub fn reference_head_end(data: &[u8]) -> Option<usize> {
    for i in 0..data.len() {
        if data[i] != b'\n' {
            continue;
        }
        if data.get(i + 1) == Some(&b'\n') {
            return Some(i + 2);
        }
        if data.get(i + 1) == Some(&b'\r') && data.get(i + 2) == Some(&b'\n') {
            return Some(i + 3);
        }
    }
    None
}
