//! What each of the `--connections` workers does with its connection, per
//! mode.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;

use super::Mode;
use super::client::{Attempt, Bounded, Target, Ws, bounded};
use super::pace::{MessageRate, Pacer, SendTimes};
use super::stats::{OpenConn, Stats, Tally};

/// Everything the workers share for one run.
pub(super) struct Plan {
    pub(super) target: Target,
    pub(super) mode: Mode,
    /// Echo messages per connection (0 = none).
    pub(super) messages: u64,
    pub(super) message_size: usize,
    pub(super) in_flight: usize,
    /// Limit for each echo to come back, and for room to send.
    pub(super) timeout: Duration,
    /// No new connection or message is started after this.
    pub(super) deadline: Instant,
    /// Work still in progress at the deadline gets until here to finish.
    pub(super) hard_end: Instant,
    pub(super) pacer: Option<Pacer>,
    /// `--message-rate`: echo sends on a timetable instead of back to back.
    pub(super) message_rate: Option<MessageRate>,
    pub(super) stats: Stats,
}

/// Why an upgraded connection ended badly.
enum SessionError {
    Mismatch,
    Timeout,
    ClosedEarly,
}

impl Plan {
    /// One worker: runs its mode until the deadline, using `source` as the local address.
    pub(super) async fn worker(&self, index: usize, source: Option<IpAddr>) {
        let payload = payload(self.message_size, index as u64);
        match self.mode {
            Mode::Hold => {
                if let Some((ws, _open)) = self.open(source).await {
                    let ws = match self.exchange(ws, &payload, None).await {
                        Some(ws) => ws,
                        None => return,
                    };
                    self.hold(ws).await;
                }
            }
            Mode::Echo | Mode::Bulk => {
                while Instant::now() < self.deadline {
                    let Some((ws, _open)) = self.open(source).await else {
                        continue;
                    };
                    let send_times = self
                        .message_rate
                        .as_ref()
                        .map(|rate| rate.send_times(index));
                    if let Some(ws) = self.exchange(ws, &payload, send_times).await {
                        self.close(ws, true).await;
                    }
                }
            }
            Mode::Handshake => {
                while Instant::now() < self.deadline {
                    if let Some((ws, _open)) = self.open(source).await {
                        self.close(ws, false).await;
                    }
                }
            }
        }
    }

    /// Waits for a `--rate` slot, then connects and upgrades, counting the outcome.
    async fn open(&self, source: Option<IpAddr>) -> Option<(Ws, OpenConn<'_>)> {
        if let Some(pacer) = &self.pacer {
            if !pacer.wait(self.deadline).await {
                return None;
            }
        }
        if Instant::now() >= self.deadline {
            return None;
        }
        self.stats.attempted.fetch_add(1, Relaxed);
        let started = Instant::now();
        match self.target.connect(source, self.hard_end).await {
            Attempt::Upgraded(ws) => Some((*ws, self.stats.handshake_succeeded(started.elapsed()))),
            Attempt::Failed(failure) => {
                self.stats.handshake_failed(failure);
                None
            }
            Attempt::CutOff => {
                self.stats.unfinished.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Sends `--messages` copies of `payload` with up to `--in-flight` outstanding,
    /// back to back or at `send_times`, checks every echo, and hands the
    /// connection back if all went well.
    async fn exchange(
        &self,
        ws: Ws,
        payload: &Bytes,
        mut send_times: Option<SendTimes>,
    ) -> Option<Ws> {
        if self.messages == 0 {
            return Some(ws);
        }
        let (mut sink, mut stream) = ws.split();
        // Sender and receiver run concurrently: waiting for echoes between sends
        // would cap a connection at one message per round trip, and sending
        // without reading could deadlock once both socket buffers are full.
        let window = Semaphore::new(self.in_flight);
        let (sent_at_tx, mut sent_at_rx) = mpsc::unbounded_channel::<Instant>();
        let writer = async {
            let mut sent = Tally::new(&self.stats.sent, &self.stats.bytes_sent);
            // Messages that fit in the window go out in one write, as a busy
            // client's would; the socket is flushed only before waiting.
            let mut unflushed = false;
            for _ in 0..self.messages {
                let timed_from = match &mut send_times {
                    Some(send_times) => {
                        if unflushed {
                            self.finish_send(sink.flush()).await?;
                            unflushed = false;
                        }
                        match send_times.next(self.deadline).await {
                            Some(timed_from) => Some(timed_from),
                            None => break,
                        }
                    }
                    None => None,
                };
                match window.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(TryAcquireError::Closed) => break,
                    Err(TryAcquireError::NoPermits) => {
                        if unflushed {
                            self.finish_send(sink.flush()).await?;
                            unflushed = false;
                        }
                        tokio::select! {
                            permit = window.acquire() => match permit {
                                Ok(permit) => permit.forget(),
                                Err(_) => break,
                            },
                            () = sleep_until(self.deadline) => break,
                        }
                    }
                }
                if Instant::now() >= self.deadline {
                    break;
                }
                // Queued before the message goes out, so the receiver always finds it.
                let _ = sent_at_tx.send(timed_from.unwrap_or_else(Instant::now));
                self.finish_send(sink.feed(Message::Binary(payload.clone())))
                    .await?;
                unflushed = true;
                sent.add(payload.len());
            }
            if unflushed {
                self.finish_send(sink.flush()).await?;
            }
            drop(sent_at_tx);
            Ok(sink)
        };
        let reader = async {
            let mut received = Tally::new(&self.stats.received, &self.stats.bytes_received);
            let mut rtts = self.stats.rtt_recorder();
            while let Some(sent_at) = sent_at_rx.recv().await {
                let limit = (sent_at + self.timeout).min(self.hard_end);
                let data = loop {
                    match tokio::time::timeout_at(limit, stream.next()).await {
                        Err(_) => return Err(SessionError::Timeout),
                        Ok(Some(Ok(Message::Binary(data)))) => break data,
                        Ok(Some(Ok(Message::Text(_)))) => return Err(SessionError::Mismatch),
                        // Control frames; tungstenite answers pings by itself.
                        Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                        Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                            return Err(SessionError::ClosedEarly);
                        }
                    }
                };
                if data != *payload {
                    return Err(SessionError::Mismatch);
                }
                rtts.record(sent_at.elapsed());
                received.add(data.len());
                window.add_permits(1);
            }
            Ok(stream)
        };
        match tokio::try_join!(writer, reader) {
            Ok((sink, stream)) => stream.reunite(sink).ok(),
            Err(error) => {
                self.count(error);
                None
            }
        }
    }

    /// Keeps the connection open and idle until the deadline, then closes it.
    async fn hold(&self, mut ws: Ws) {
        loop {
            tokio::select! {
                () = sleep_until(self.deadline) => break,
                message = ws.next() => match message {
                    // Data a backend pushes on its own is fine while holding.
                    Some(Ok(Message::Binary(_) | Message::Text(_) | Message::Ping(_)
                        | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        self.count(SessionError::ClosedEarly);
                        return;
                    }
                },
            }
        }
        self.close(ws, self.messages > 0).await;
    }

    /// The client's side of the closing handshake. With `strict`, data arriving
    /// now is an echo nobody asked for: a duplicated or misrouted message.
    async fn close(&self, mut ws: Ws, strict: bool) {
        let closing = async {
            if ws.close(None).await.is_err() {
                return;
            }
            while let Some(Ok(message)) = ws.next().await {
                if strict && matches!(message, Message::Binary(_) | Message::Text(_)) {
                    self.count(SessionError::Mismatch);
                }
            }
        };
        // A peer slow to acknowledge the close costs time, not correctness.
        let _ = bounded(self.timeout, self.hard_end, closing).await;
    }

    /// A send that cannot make progress within the timeout is as bad as a
    /// missing echo: the tunnel stopped reading.
    async fn finish_send<E>(
        &self,
        sending: impl Future<Output = Result<(), E>>,
    ) -> Result<(), SessionError> {
        match bounded(self.timeout, self.hard_end, sending).await {
            Bounded::Done(Ok(())) => Ok(()),
            Bounded::Done(Err(_)) => Err(SessionError::ClosedEarly),
            Bounded::TimedOut | Bounded::CutOff => Err(SessionError::Timeout),
        }
    }

    fn count(&self, error: SessionError) {
        let counter = match error {
            SessionError::Mismatch => &self.stats.echo_mismatch,
            SessionError::Timeout => &self.stats.echo_timeout,
            SessionError::ClosedEarly => &self.stats.closed_early,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// A payload unique to the worker, so that an echo delivered to the wrong
/// connection shows up as a mismatch. Built once: every send shares it.
fn payload(size: usize, worker: u64) -> Bytes {
    let tag = worker.to_le_bytes();
    (0..size)
        .map(|i| match tag.get(i) {
            Some(&byte) => byte,
            None => (i as u8).wrapping_mul(31) ^ tag[i % tag.len()],
        })
        .collect()
}
