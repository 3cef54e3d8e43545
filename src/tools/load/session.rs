//! What each of the `--connections` workers does with its connection, per
//! mode.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Mode;
use super::client::{Attempt, Bounded, Target, Ws, bounded};
use super::pace::{MessageRate, Pacer, SendTimes};
use super::stats::{OpenConn, Stats, Tally};
use super::tag::{Arrival, Payloads};

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
#[derive(Clone, Copy)]
enum SessionError {
    Mismatch,
    Timeout,
    ClosedEarly,
}

impl Plan {
    /// One worker: runs its mode until the deadline, using `source` as the local address.
    pub(super) async fn worker(&self, index: usize, source: Option<IpAddr>) {
        let payloads = Payloads::new(self.message_size, index);
        match self.mode {
            Mode::Hold => {
                if let Some((ws, mut conn)) = self.open(index, source).await {
                    if let Some(ws) = self.exchange(ws, &mut conn, &payloads, None).await {
                        self.hold(ws, &mut conn).await;
                    }
                }
            }
            Mode::Echo | Mode::Bulk => {
                while Instant::now() < self.deadline {
                    let Some((ws, mut conn)) = self.open(index, source).await else {
                        continue;
                    };
                    let send_times = self
                        .message_rate
                        .as_ref()
                        .map(|rate| rate.send_times(index));
                    if let Some(ws) = self.exchange(ws, &mut conn, &payloads, send_times).await {
                        self.close(ws, &mut conn).await;
                    }
                }
            }
            Mode::Handshake => {
                while Instant::now() < self.deadline {
                    if let Some((ws, mut conn)) = self.open(index, source).await {
                        self.close(ws, &mut conn).await;
                    }
                }
            }
        }
    }

    /// Waits for a `--rate` slot, then connects and upgrades, counting the outcome.
    async fn open(&self, index: usize, source: Option<IpAddr>) -> Option<(Ws, OpenConn<'_>)> {
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
        match self.target.connect(index, source, self.hard_end).await {
            Attempt::Upgraded(ws) => {
                let status = self.target.success_status();
                Some((
                    *ws,
                    self.stats.handshake_succeeded(status, started.elapsed()),
                ))
            }
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

    /// Sends `--messages` tagged messages with up to `--in-flight` outstanding,
    /// back to back or at `send_times`, matches every echo to its send by its
    /// tag, and hands the connection back if all went well.
    async fn exchange(
        &self,
        ws: Ws,
        conn: &mut OpenConn<'_>,
        payloads: &Payloads,
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
        // Each message's sequence number and the instant its round trip is timed from.
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
        let writer = async {
            let mut sent = Tally::new(&self.stats.sent, &self.stats.bytes_sent);
            let mut stamper = payloads.stamper();
            // Messages that fit in the window go out in one write, as a busy
            // client's would; the socket is flushed only before waiting.
            let mut unflushed = false;
            for sequence in 0..self.messages {
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
                let _ = sent_tx.send((sequence, timed_from.unwrap_or_else(Instant::now)));
                let message = stamper.message(sequence);
                let len = message.len();
                self.finish_send(sink.feed(Message::Binary(message)))
                    .await?;
                unflushed = true;
                sent.add(len);
            }
            if unflushed {
                self.finish_send(sink.flush()).await?;
            }
            drop(sent_tx);
            Ok(())
        };
        let reader = async {
            let mut echoes = Tally::new(&self.stats.received, &self.stats.bytes_received);
            let mut unsolicited = self.stats.unsolicited();
            let mut rtts = self.stats.rtt_recorder();
            // Sent and not yet echoed, by sequence number: at most --in-flight.
            let mut outstanding = BTreeMap::<u64, Instant>::new();
            let mut writing = true;
            while writing || !outstanding.is_empty() {
                // The lowest sequence number went out first, so its echo is due first.
                let limit = match outstanding.first_key_value() {
                    Some((_, &sent_at)) => (sent_at + self.timeout).min(self.hard_end),
                    None => self.hard_end,
                };
                let message = tokio::select! {
                    // Taking sends first means a message is outstanding
                    // before its echo is looked at.
                    biased;
                    sent = sent_rx.recv(), if writing => {
                        match sent {
                            Some((sequence, sent_at)) => {
                                outstanding.insert(sequence, sent_at);
                            }
                            None => writing = false,
                        }
                        continue;
                    }
                    message = stream.next() => message,
                    () = sleep_until(limit) => return Err(SessionError::Timeout),
                };
                let data = match message {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Text(text))) => {
                        unsolicited.add(text.len());
                        continue;
                    }
                    // Control frames; tungstenite answers pings by itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        conn.server_closed(close_code(frame.as_ref()));
                        return Err(SessionError::ClosedEarly);
                    }
                    Some(Err(_)) | None => return Err(SessionError::ClosedEarly),
                };
                match payloads.classify(&data) {
                    Arrival::Echo(sequence) => {
                        if let Some(sent_at) = outstanding.remove(&sequence) {
                            rtts.record(sent_at.elapsed());
                            echoes.add(data.len());
                            window.add_permits(1);
                            continue;
                        }
                    }
                    Arrival::Altered(sequence) if outstanding.contains_key(&sequence) => {
                        return Err(SessionError::Mismatch);
                    }
                    Arrival::Altered(_) | Arrival::Foreign => {}
                }
                // A repeated echo lands here too: a backend that broadcasts
                // to every client, the sender included, sends one.
                unsolicited.add(data.len());
            }
            Ok(())
        };
        let outcome = tokio::try_join!(writer, reader);
        let ws = stream.reunite(sink).ok();
        let Err(error) = outcome else {
            return ws;
        };
        self.count(error);
        match (error, ws) {
            // Answer the server's Close, or find the one a failed write may
            // have raced with.
            (SessionError::ClosedEarly, Some(ws)) => self.close(ws, conn).await,
            // Waiting for the closing handshake of a broken tunnel would only
            // stretch the run.
            (SessionError::ClosedEarly, None)
            | (SessionError::Mismatch | SessionError::Timeout, _) => {}
        }
        None
    }

    /// Keeps the connection open and idle until the deadline, then closes it.
    async fn hold(&self, mut ws: Ws, conn: &mut OpenConn<'_>) {
        let mut unsolicited = self.stats.unsolicited();
        loop {
            tokio::select! {
                () = sleep_until(self.deadline) => break,
                message = ws.next() => match message {
                    // Data a backend pushes on its own is fine while holding.
                    Some(Ok(Message::Binary(data))) => unsolicited.add(data.len()),
                    Some(Ok(Message::Text(text))) => unsolicited.add(text.len()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        conn.server_closed(close_code(frame.as_ref()));
                        self.count(SessionError::ClosedEarly);
                        // On to answer the Close.
                        break;
                    }
                    Some(Err(_)) | None => {
                        self.count(SessionError::ClosedEarly);
                        return;
                    }
                },
            }
        }
        self.close(ws, conn).await;
    }

    /// The client's side of the closing handshake, or its answer to the
    /// server's Close, then reading until the connection ends to learn the
    /// server's close code. Every echo is in by now: data arriving is
    /// unsolicited.
    async fn close(&self, mut ws: Ws, conn: &mut OpenConn<'_>) {
        let mut unsolicited = self.stats.unsolicited();
        let closing = async {
            let normal = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            // A failed send is no reason to stop reading: after the server's
            // own Close tungstenite refuses ours but sends the answer it
            // queued on the next read, and on a broken connection the
            // server's Close may still be waiting in the socket.
            let _ = ws.close(Some(normal)).await;
            while let Some(Ok(message)) = ws.next().await {
                match message {
                    Message::Binary(data) => unsolicited.add(data.len()),
                    Message::Text(text) => unsolicited.add(text.len()),
                    Message::Close(frame) => conn.server_closed(close_code(frame.as_ref())),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
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

/// RFC 6455 §7.1.5: a Close frame without a code counts as 1005.
fn close_code(frame: Option<&CloseFrame>) -> u16 {
    frame.map_or(u16::from(CloseCode::Status), |frame| u16::from(frame.code))
}
