//! The splice behind an upgraded connection, and everything wsgate does to
//! a WebSocket after its 101.
//!
//! Bytes pass unchanged both ways ([`pump`]), their frame headers followed,
//! so wsgate knows what a byte pipe cannot: where frames begin and end,
//! which Close frames passed, how many messages. On that it acts, always
//! between whole frames:
//!
//! - no byte either way for `idle_timeout`: Close 1001 to both sides;
//! - a client silent for `ping_interval`: a Ping; still silent
//!   `ping_timeout` later: dead, Close 1001 to the backend;
//! - a message over `max_message_bytes`: the frame that crossed it is not
//!   passed on, Close 1009 to both sides;
//! - a drain: Close `drain_close_code` at the tunnel's moment in the spread.
//!
//! After a Close of its own wsgate waits for each side's answering Close or
//! FIN (1 s, or during a drain until the drain's cut), then the tunnel ends.
//! Without one, a FIN in one direction is passed on as a write shutdown
//! while the other keeps flowing, until both have finished, except that
//! once Close frames have passed both ways the first FIN ends it.
//!
//! One timer serves every deadline: it is armed for the earliest and moved
//! only when it fires early, so neither traffic nor pings touch the timer
//! wheel per message, and an idle tunnel with pings costs one timer entry.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::time::Instant;

use crate::config::TunnelConfig;
use crate::drain::{Drain, Moment};
use crate::stream::HoldForFin;
use crate::ws::frame::Violation;
use pump::FinDue;

mod pump;

use pump::{MessageBucket, Own, Pump, PumpError};

/// How long wsgate waits for the answer to a Close of its own, outside a
/// drain.
pub const CLOSE_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Why a tunnel ended; the `cause` label of `wsgate_tunnels_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    Client,
    Upstream,
    IdleTimeout,
    Drain,
    PingTimeout,
    MessageTooBig,
    Error,
}

impl CloseCause {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::Client => "client",
            CloseCause::Upstream => "upstream",
            CloseCause::IdleTimeout => "idle_timeout",
            CloseCause::Drain => "drain",
            CloseCause::PingTimeout => "ping_timeout",
            CloseCause::MessageTooBig => "message_too_big",
            CloseCause::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelOutcome {
    pub cause: CloseCause,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Data messages each way (a message counted at its last frame).
    pub messages_to_upstream: u64,
    pub messages_to_client: u64,
    /// The first Close frame of the closing handshake: who sent it, and its
    /// code (`None`: a Close without one, 1005). `None` when no Close frame
    /// passed either way: what a browser reports as 1006.
    pub close: Option<(CloseFrom, Option<u16>)>,
    /// A direction whose bytes stopped being valid framing, and why; its
    /// frames were no longer followed (the bytes still passed).
    pub lost: Option<(Side, Violation)>,
}

/// A tunnel's two ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    fn ended(self) -> CloseCause {
        match self {
            Side::Client => CloseCause::Client,
            Side::Upstream => CloseCause::Upstream,
        }
    }
}

/// Who sent the Close frame that started a closing handshake.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CloseFrom {
    Client,
    Upstream,
    Wsgate,
}

impl CloseFrom {
    /// The `from` label of `wsgate_tunnel_closes_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseFrom::Client => "client",
            CloseFrom::Upstream => "upstream",
            CloseFrom::Wsgate => "wsgate",
        }
    }
}

/// A closing handshake wsgate started.
struct Closing {
    cause: CloseCause,
    /// Whether the side was sent our Close (or a Close passed to it) and
    /// so has an answer to give.
    await_client: bool,
    await_upstream: bool,
    /// `None` during a drain: the drain's cut ends the wait.
    give_up_at: Option<Instant>,
}

/// A reset or broken pipe is that side going away, not a proxy error.
fn cause_of(error: &io::Error, side: Side) -> CloseCause {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => side.ended(),
        _ => CloseCause::Error,
    }
}

/// The tunnel's clocks, for the one timer.
struct Clock {
    /// A byte moved either way (our own frames do not count).
    last_activity: Instant,
    /// A byte arrived from the client.
    client_heard: Instant,
    /// Our Ping waits for the end of a frame in flight to the client; its
    /// timeout starts when it goes out.
    ping_queued: bool,
    /// When our Ping went out, unanswered so far by anything from the client.
    ping_sent: Option<Instant>,
    /// Pings stopped: the client's direction can no longer carry them.
    pings_off: bool,
    /// The client is out of message tokens until then (mirrors its pump).
    resume_at: Option<Instant>,
}

/// Splices `client` and `upstream` as the module docs say, until both
/// directions end, wsgate's own closing handshake ends, or the drain cuts
/// the tunnel. The streams are borrowed so they are held once, by the
/// caller, for the tunnel's life.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    rules: &TunnelConfig,
    drain: &Drain,
) -> TunnelOutcome
where
    C: AsyncRead + HoldForFin + Unpin,
    U: AsyncRead + HoldForFin + Unpin,
{
    let bucket = rules.client_message_rate.map(MessageBucket::new);
    let mut to_upstream = Pump::new(true, rules.max_message_bytes, bucket);
    let mut to_client = Pump::new(false, rules.max_message_bytes, None);
    // Whoever sent the first Close frame closed the tunnel, or without one,
    // whoever sent the first FIN; the other side only followed.
    let mut first_close: Option<(CloseFrom, Option<u16>)> = None;
    let mut first_eof: Option<Side> = None;
    let mut closing: Option<Closing> = None;
    let mut drain_moment: Option<Moment> = None;
    let now = Instant::now();
    let mut clock = Clock {
        last_activity: now,
        client_heard: now,
        ping_queued: false,
        ping_sent: None,
        pings_off: false,
        resume_at: None,
    };
    let timer = tokio::time::sleep_until(next_deadline(rules, &clock, None, None));
    tokio::pin!(timer);
    let begun = drain.begun();
    tokio::pin!(begun);

    let (client_fin_on_drop, upstream_fin_on_drop) =
        (client.drop_sends_fin(), upstream.drop_sends_fin());
    let cause = poll_fn(|cx| {
        let mut client_moved = false;
        let mut upstream_moved = false;
        // Once Close frames have passed both ways the first FIN ends the
        // tunnel (below), and closing a TCP socket sends our FIN for us.
        let upward = to_upstream.poll_pump(
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *upstream),
            FinDue {
                writer_sent_fin: to_client.read_closed,
                by_drop_after_close: to_client.frames.close.is_some() && upstream_fin_on_drop,
            },
            &mut client_moved,
        );
        let downward = to_client.poll_pump(
            cx,
            Pin::new(&mut *upstream),
            Pin::new(&mut *client),
            FinDue {
                writer_sent_fin: to_upstream.read_closed,
                by_drop_after_close: to_upstream.frames.close.is_some() && client_fin_on_drop,
            },
            &mut upstream_moved,
        );
        clock.resume_at = to_upstream.resume_at;
        // Upward is pumped first, so when both Closes were read in one
        // poll the backend's can be an answer to the client's, never the
        // other way round.
        if first_close.is_none() {
            if let Some(code) = to_upstream.frames.close {
                first_close = Some((CloseFrom::Client, code));
            } else if let Some(code) = to_client.frames.close {
                first_close = Some((CloseFrom::Upstream, code));
            }
        }
        let peer_closer = || match first_close {
            Some((CloseFrom::Client, _)) => Some(Side::Client),
            Some((CloseFrom::Upstream, _)) => Some(Side::Upstream),
            _ => None,
        };
        for (result, read_side, write_side) in [
            (&upward, Side::Client, Side::Upstream),
            (&downward, Side::Upstream, Side::Client),
        ] {
            let cause = match result {
                Poll::Ready(Err(PumpError::Read(error))) => cause_of(error, read_side),
                Poll::Ready(Err(PumpError::Write(error))) => cause_of(error, write_side),
                _ => continue,
            };
            return Poll::Ready(match (&closing, cause, peer_closer()) {
                (Some(closing), _, _) => closing.cause,
                (None, CloseCause::Client | CloseCause::Upstream, Some(closer)) => closer.ended(),
                (None, cause, _) => cause,
            });
        }
        if to_upstream.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Client);
        }
        if to_client.read_closed && first_eof.is_none() {
            first_eof = Some(Side::Upstream);
        }
        let ended_by = match &closing {
            Some(closing) => closing.cause,
            None => peer_closer().or(first_eof).unwrap_or(Side::Client).ended(),
        };
        if upward.is_ready() && downward.is_ready() {
            return Poll::Ready(ended_by);
        }
        // RFC 6455 §7.1.1: once Close frames have passed both ways the
        // connection is done, so the first FIN (passed on) ends the tunnel;
        // a peer that keeps its socket open must not hold it, nor a drain.
        let handshake_done = to_upstream.frames.close.is_some() && to_client.frames.close.is_some();
        if handshake_done
            && ((upward.is_ready() && to_client.caught_up())
                || (downward.is_ready() && to_upstream.caught_up()))
        {
            return Poll::Ready(ended_by);
        }
        if closing.is_none() && (to_upstream.over_limit || to_client.over_limit) {
            // The direction that carried the message sent its receiver a
            // Close 1009 in the frame's place; its sender gets one too.
            let offender = if to_upstream.over_limit {
                Side::Client
            } else {
                Side::Upstream
            };
            let sender_pump = match offender {
                Side::Client => &mut to_client,
                Side::Upstream => &mut to_upstream,
            };
            let told_sender = sender_pump.queue_close(1009, "message too big");
            first_close.get_or_insert((CloseFrom::Wsgate, Some(1009)));
            let (await_client, await_upstream) = match offender {
                Side::Client => (told_sender, true),
                Side::Upstream => (true, told_sender),
            };
            closing = Some(Closing {
                cause: CloseCause::MessageTooBig,
                await_client,
                await_upstream,
                give_up_at: Some(Instant::now() + CLOSE_ANSWER_WAIT),
            });
            timer
                .as_mut()
                .reset(next_deadline(rules, &clock, closing.as_ref(), drain_moment));
            cx.waker().wake_by_ref();
        }
        if let Some(closing) = &closing {
            // A side has answered once its Close or its FIN came through.
            let client_done = !closing.await_client
                || to_upstream.frames.close.is_some()
                || to_upstream.read_closed;
            let upstream_done = !closing.await_upstream
                || to_client.frames.close.is_some()
                || to_client.read_closed;
            if client_done && upstream_done {
                return Poll::Ready(closing.cause);
            }
        }
        if drain_moment.is_none() && begun.as_mut().poll(cx).is_ready() {
            drain_moment = drain.moment();
            timer
                .as_mut()
                .reset(next_deadline(rules, &clock, closing.as_ref(), drain_moment));
        }
        if client_moved || upstream_moved {
            let now = Instant::now();
            clock.last_activity = now;
            if client_moved {
                clock.client_heard = now;
                clock.ping_sent = None;
            }
        }
        if clock.ping_queued && to_client.outbox != Some(Own::Ping) {
            clock.ping_queued = false;
            if to_client.sealed || client_moved {
                // Never sent, or answered by what came with it.
            } else {
                clock.ping_sent = Some(Instant::now());
                timer
                    .as_mut()
                    .reset(next_deadline(rules, &clock, closing.as_ref(), drain_moment));
            }
        }
        if let Some(resume_at) = to_upstream.resume_at {
            if resume_at < timer.deadline() {
                timer.as_mut().reset(resume_at);
            }
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if to_upstream.resume_at.is_some_and(|at| now >= at) {
                to_upstream.resume_at = None;
                clock.resume_at = None;
                cx.waker().wake_by_ref();
            }
            if drain_moment.is_some_and(|moment| now >= moment.cut_at) {
                return Poll::Ready(closing.as_ref().map_or(CloseCause::Drain, |c| c.cause));
            }
            match &closing {
                Some(closing) => {
                    if closing.give_up_at.is_some_and(|at| now >= at) {
                        return Poll::Ready(closing.cause);
                    }
                }
                None => {
                    let started = if let Some(moment) =
                        drain_moment.filter(|moment| now >= moment.close_at)
                    {
                        let reason = match moment.close_code {
                            1012 => "service restart",
                            _ => "going away",
                        };
                        Some(start_closing(
                            CloseCause::Drain,
                            moment.close_code,
                            reason,
                            None,
                            (&mut to_upstream, &mut to_client),
                            &mut first_close,
                        ))
                    } else if rules.ping.is_some_and(|ping| {
                        clock
                            .ping_sent
                            .is_some_and(|sent| now >= sent + ping.timeout)
                    }) {
                        // A dead client hears nothing more; the backend is told.
                        to_client.seal();
                        let told = to_upstream.queue_close(1001, "ping timeout");
                        if told {
                            first_close.get_or_insert((CloseFrom::Wsgate, Some(1001)));
                        }
                        Some(Closing {
                            cause: CloseCause::PingTimeout,
                            await_client: false,
                            await_upstream: told,
                            give_up_at: Some(now + CLOSE_ANSWER_WAIT),
                        })
                    } else if now >= clock.last_activity + rules.idle_timeout {
                        Some(start_closing(
                            CloseCause::IdleTimeout,
                            1001,
                            "idle timeout",
                            Some(now + CLOSE_ANSWER_WAIT),
                            (&mut to_upstream, &mut to_client),
                            &mut first_close,
                        ))
                    } else {
                        if let Some(ping) = rules.ping {
                            if clock.ping_sent.is_none()
                                && !clock.ping_queued
                                && !clock.pings_off
                                && now >= clock.client_heard + ping.interval
                            {
                                if to_client.can_carry()
                                    && to_client.outbox.is_none()
                                    && to_client.frames.close.is_none()
                                {
                                    to_client.outbox = Some(Own::Ping);
                                    clock.ping_queued = true;
                                    cx.waker().wake_by_ref();
                                } else {
                                    clock.pings_off = true;
                                }
                            }
                        }
                        None
                    };
                    if let Some(started) = started {
                        if !started.await_client && !started.await_upstream {
                            // Neither side can be told: nothing to wait for.
                            return Poll::Ready(started.cause);
                        }
                        closing = Some(started);
                        cx.waker().wake_by_ref();
                    }
                }
            }
            timer
                .as_mut()
                .reset(next_deadline(rules, &clock, closing.as_ref(), drain_moment));
        }
        Poll::Pending
    })
    .await;

    let lost = match (to_upstream.frames.lost, to_client.frames.lost) {
        (Some(violation), _) => Some((Side::Client, violation)),
        (None, Some(violation)) => Some((Side::Upstream, violation)),
        (None, None) => None,
    };
    TunnelOutcome {
        cause,
        client_to_upstream: to_upstream.bytes,
        upstream_to_client: to_client.bytes,
        messages_to_upstream: to_upstream.frames.messages,
        messages_to_client: to_client.frames.messages,
        close: first_close,
        lost,
    }
}

/// Queues a Close of ours to both sides.
fn start_closing(
    cause: CloseCause,
    code: u16,
    reason: &'static str,
    give_up_at: Option<Instant>,
    (to_upstream, to_client): (&mut Pump, &mut Pump),
    first_close: &mut Option<(CloseFrom, Option<u16>)>,
) -> Closing {
    let told_upstream = to_upstream.queue_close(code, reason);
    let told_client = to_client.queue_close(code, reason);
    if told_upstream || told_client {
        first_close.get_or_insert((CloseFrom::Wsgate, Some(code)));
    }
    Closing {
        cause,
        await_client: told_client,
        await_upstream: told_upstream,
        give_up_at,
    }
}

/// The earliest moment the tunnel has something to do.
fn next_deadline(
    rules: &TunnelConfig,
    clock: &Clock,
    closing: Option<&Closing>,
    drain: Option<Moment>,
) -> Instant {
    // Far enough to mean never, near enough not to overflow an Instant.
    let never = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let cut = drain.map_or(never, |moment| moment.cut_at);
    if let Some(closing) = closing {
        return closing.give_up_at.unwrap_or(never).min(cut);
    }
    let mut at = (clock.last_activity + rules.idle_timeout).min(cut);
    if let Some(moment) = drain {
        at = at.min(moment.close_at);
    }
    if let Some(ping) = rules
        .ping
        .filter(|_| !clock.pings_off && !clock.ping_queued)
    {
        at = at.min(match clock.ping_sent {
            Some(sent) => sent + ping.timeout,
            None => clock.client_heard + ping.interval,
        });
    }
    at
}

#[cfg(test)]
mod tests;
