//! `--hold`: keep one upgraded connection open and idle — sending nothing
//! but Pongs, so any idle timeout on the path can fire — and report how and
//! when it ended: still open, a Close with its code, or a cut with none
//! (the 1006 a browser would report).

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::frames::{
    Frame, FrameReader, OP_CLOSE, OP_PONG, client_frame, close_payload, close_politely,
};
use super::net::Conn;
use super::report::{HoldEnd, HoldStep, TokenPlace, millis};

/// How long the probe waits for the server's answer to its own Close.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What the hold saw; the caller adds which attempt it repeated.
pub(super) struct Held {
    pub ended: HoldEnd,
    pub code: Option<u16>,
    pub close_reason: Option<String>,
    pub after: Option<Duration>,
    pub pings_answered: u64,
    pub messages_received: u64,
    pub error: Option<String>,
}

impl Held {
    pub fn into_step(
        self,
        requested: Duration,
        origin: Option<String>,
        token_in: Option<TokenPlace>,
    ) -> HoldStep {
        HoldStep {
            requested_ms: millis(requested),
            origin,
            token_in,
            ended: self.ended,
            code: self.code,
            close_reason: self.close_reason,
            after_ms: self.after.map(millis),
            pings_answered: self.pings_answered,
            messages_received: self.messages_received,
            error: self.error,
        }
    }

    pub fn failed(error: String) -> Held {
        Held {
            ended: HoldEnd::Failed,
            code: None,
            close_reason: None,
            after: None,
            pings_answered: 0,
            messages_received: 0,
            error: Some(error),
        }
    }
}

/// Holds `conn`, upgraded at `upgraded_at`, for `duration`; a write (a
/// Pong, the Close answer) gets `timeout`.
pub(super) async fn hold(
    mut conn: Conn,
    already_read: Vec<u8>,
    upgraded_at: Instant,
    duration: Duration,
    timeout: Duration,
) -> Held {
    let mut reader = FrameReader::new(already_read);
    let deadline = upgraded_at + duration;
    let mut held = Held {
        ended: HoldEnd::Open,
        code: None,
        close_reason: None,
        after: None,
        pings_answered: 0,
        messages_received: 0,
        error: None,
    };
    // Ends at the deadline, on the server's Close, or when the stream ends.
    loop {
        let frame = match tokio::time::timeout_at(deadline, reader.next(&mut conn)).await {
            Err(_) => {
                close_politely(&mut conn, &mut reader, CLOSE_WAIT).await;
                return held;
            }
            Ok(frame) => frame,
        };
        match frame {
            Ok(Some(Frame::Ping(payload))) => {
                if let Err(error) = send(&mut conn, OP_PONG, &payload, timeout).await {
                    return cut(
                        held,
                        upgraded_at,
                        Some(format!("answering a Ping: {error}")),
                    );
                }
                held.pings_answered += 1;
            }
            Ok(Some(Frame::Pong)) => {}
            Ok(Some(Frame::Data { fin })) => held.messages_received += u64::from(fin),
            Ok(Some(Frame::Close { code, reason })) => {
                held.after = Some(upgraded_at.elapsed());
                held.ended = HoldEnd::Close;
                held.code = Some(code.unwrap_or(1005));
                held.close_reason = Some(reason);
                // RFC 6455 §5.5.1: answer with the same code; the server
                // then closes the TCP connection.
                let _ = send(&mut conn, OP_CLOSE, &close_payload(code), timeout).await;
                let _ = tokio::time::timeout(CLOSE_WAIT, conn.shutdown()).await;
                return held;
            }
            Ok(None) => return cut(held, upgraded_at, None),
            Err(error) => return cut(held, upgraded_at, Some(error.to_string())),
        }
    }
}

fn cut(mut held: Held, upgraded_at: Instant, error: Option<String>) -> Held {
    held.after = Some(upgraded_at.elapsed());
    held.ended = HoldEnd::Cut;
    held.code = Some(1006);
    held.error = error;
    held
}

async fn send(
    conn: &mut Conn,
    opcode: u8,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let frame = client_frame(opcode, payload)?;
    let write = async {
        conn.write_all(&frame).await?;
        conn.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}
