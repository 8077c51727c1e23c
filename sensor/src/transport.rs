//! The QUIC side: connect to the receiver, send Hello, batches and Stats on one stream,
//! and end the session cleanly (Goodbye both ways) or report why it could not.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{Goodbye, Hello, Message, Stats};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, Notify};

use crate::batcher::Outgoing;
use crate::capture::Stopper;
use crate::cli::{Fingerprint, ReceiverAddr};
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::tls::{ClientTls, SeenFingerprint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Longer than the receiver's largest reorder window, which a leaving sensor's last
/// packets may wait out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the receiver's error message after a write failed, so that its
/// reason ("shutting down", "unsupported link type") is shown rather than "connection lost".
const ERROR_GRACE: Duration = Duration::from_secs(1);

/// Finds the receiver's address: an IP literal as is, a name through the resolver.
pub async fn resolve(addr: &ReceiverAddr) -> Result<SocketAddr> {
    if let Ok(ip) = addr.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, addr.port));
    }
    let mut found = tokio::net::lookup_host((addr.host.as_str(), addr.port))
        .await
        .map_err(|e| {
            Error::runtime(format!(
                "cannot resolve receiver host {}: {e} (check the name, or give an IP address)",
                addr.host
            ))
        })?;
    found.next().ok_or_else(|| {
        Error::runtime(format!(
            "receiver host {} has no address (check the name, or give an IP address)",
            addr.host
        ))
    })
}

/// What the receiver told us, as seen by the reading task.
#[derive(Debug)]
enum Event {
    Goodbye,
    Error(String),
    /// The receiver broke the protocol or the connection ended.
    Ended(String),
}

pub struct Connected {
    endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    events: mpsc::Receiver<Event>,
    /// Highest batch sequence the receiver has written.
    acked: Arc<AtomicU64>,
    pub remote: SocketAddr,
}

/// Connects and opens the session's stream.
pub async fn connect(remote: SocketAddr, server_name: &str, tls: ClientTls) -> Result<Connected> {
    let ClientTls { config, seen } = tls;
    let quic = QuicClientConfig::try_from(config)
        .map_err(|e| Error::runtime(format!("TLS setup failed: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    client.transport_config(Arc::new(transport));

    // Bind to the receiver's address family, so that IPv4 works on hosts without IPv6.
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = Endpoint::client(local)
        .map_err(|e| Error::runtime(format!("cannot open a UDP socket on {local}: {e}")))?;
    endpoint.set_default_client_config(client);

    let connecting = endpoint.connect(remote, server_name).map_err(|e| {
        Error::input(format!(
            "cannot connect to {remote} as \"{server_name}\": {e} (check --server-name)"
        ))
    })?;
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(handshake_error(remote, e, seen.as_ref())),
        Err(_) => {
            return Err(Error::runtime(format!(
                "cannot reach receiver at {remote}: no answer within {}s (is the receiver \
                 running, and UDP port {} open?)",
                CONNECT_TIMEOUT.as_secs(),
                remote.port()
            )))
        }
    };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::runtime(format!("cannot open a stream to {remote}: {e}")))?;
    let acked = Arc::new(AtomicU64::new(0));
    // A handful of events at most: Goodbye, then one terminal event.
    let (events_tx, events) = mpsc::channel(4);
    tokio::spawn(read_receiver(recv, Arc::clone(&acked), events_tx));
    Ok(Connected {
        endpoint,
        conn,
        send,
        events,
        acked,
        remote,
    })
}

fn handshake_error(
    remote: SocketAddr,
    e: ConnectionError,
    seen: Option<&SeenFingerprint>,
) -> Error {
    let seen: Option<Fingerprint> = seen.and_then(|s| s.lock().ok().and_then(|g| *g));
    let text = e.to_string();
    if let (Some(got), true) = (seen, text.contains("ApplicationVerificationFailure")) {
        return Error::runtime(format!(
            "TLS verification of receiver {remote} failed: its certificate has SHA-256 \
             fingerprint {got}, which does not match --fingerprint (compare with the \
             receiver's 'certificate ... SHA-256 fingerprint' line)"
        ));
    }
    match e {
        ConnectionError::TimedOut => Error::runtime(format!(
            "cannot reach receiver at {remote}: timed out (is the receiver running, and UDP \
             port {} open?)",
            remote.port()
        )),
        ConnectionError::TransportError(_) => {
            let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
                "is --ca the receiver's certificate, or the CA that signed it?"
            } else if text.contains("not valid for name") || text.contains("NotValidForName") {
                "pass --server-name with a name the certificate holds"
            } else if text.contains("application protocol") {
                "is this a Capstream receiver?"
            } else {
                "check --ca/--fingerprint and the receiver's version"
            };
            Error::runtime(format!(
                "TLS handshake with receiver {remote} failed: {text} ({hint})"
            ))
        }
        _ => Error::runtime(format!(
            "cannot connect to receiver at {remote}: {text} (is it a Capstream receiver?)"
        )),
    }
}

/// Reads the receiver's frames: records Acks, passes on Goodbye and errors.
async fn read_receiver(mut recv: RecvStream, acked: Arc<AtomicU64>, events: mpsc::Sender<Event>) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match common::decode_frame(&mut buf) {
            Ok(Some(Message::Ack(ack))) => {
                acked.fetch_max(ack.sequence, Relaxed);
                continue;
            }
            Ok(Some(Message::Goodbye(_))) => {
                let _ = events.send(Event::Goodbye).await;
                continue;
            }
            Ok(Some(Message::Error(e))) => {
                let _ = events.send(Event::Error(e.message)).await;
                return;
            }
            Ok(Some(other)) => {
                let _ = events
                    .send(Event::Ended(format!(
                        "receiver sent an unexpected {:?} message",
                        other.message_type()
                    )))
                    .await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = events
                    .send(Event::Ended(format!("bad message from receiver: {e}")))
                    .await;
                return;
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                let _ = events
                    .send(Event::Ended("receiver ended the stream".into()))
                    .await;
                return;
            }
            Err(e) => {
                let _ = events
                    .send(Event::Ended(format!("connection to receiver lost: {e}")))
                    .await;
                return;
            }
        }
    }
}

/// Everything the streaming loop needs besides the connection.
pub struct StreamInput<'a> {
    pub session_id: u64,
    pub batches: mpsc::Receiver<Outgoing>,
    pub counters: &'a [Arc<Counters>],
    pub stoppers: &'a [Stopper],
    /// Notified on SIGINT/SIGTERM.
    pub shutdown: Arc<Notify>,
}

/// What the session achieved, for the exit summary.
#[derive(Debug, Default)]
pub struct Outcome {
    pub batches_sent: u64,
    pub acked: u64,
}

impl Connected {
    pub async fn send_hello(&mut self, hello: &Hello) -> Result<()> {
        let frame = Message::Hello(hello.clone()).to_bytes();
        let r = self.send.write_all(&frame).await;
        self.check_write(r).await
    }

    /// Streams batches until every capture has ended (input exhausted or stopped by a
    /// signal), then ends the session. On failure, the captures are stopped.
    pub async fn stream(mut self, mut input: StreamInput<'_>) -> (Outcome, Result<()>) {
        let mut outcome = Outcome::default();
        let result = self.stream_inner(&mut input, &mut outcome).await;
        if result.is_err() {
            for stop in input.stoppers {
                stop();
            }
            // Unblock capture threads waiting for room: the batches have nowhere to go.
            input.batches.close();
            self.conn.close(VarInt::from_u32(1), b"sensor error");
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
        outcome.acked = self.acked.load(Relaxed);
        (outcome, result)
    }

    async fn stream_inner(
        &mut self,
        input: &mut StreamInput<'_>,
        outcome: &mut Outcome,
    ) -> Result<()> {
        let mut frame = BytesMut::new();
        let mut stats_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + STATS_EVERY, STATS_EVERY);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Batches from several capture threads can arrive slightly out of order; at most
        // one per thread is held here, and the stream carries them in sequence.
        let mut pending: BTreeMap<u64, Outgoing> = BTreeMap::new();
        let mut next_sequence = 1u64;
        let mut stopping = false;
        loop {
            tokio::select! {
                ev = self.events.recv() => return Err(early_end(self.remote, ev)),
                _ = input.shutdown.notified(), if !stopping => {
                    tracing::info!("stopping: flushing captured packets to the receiver");
                    stopping = true;
                    for stop in input.stoppers {
                        stop();
                    }
                }
                item = input.batches.recv() => match item {
                    Some(out) => {
                        pending.insert(out.sequence, out);
                        while let Some(out) = pending.remove(&next_sequence) {
                            self.write_batch(out, input.counters, outcome).await?;
                            next_sequence += 1;
                        }
                    }
                    None => break,
                },
                _ = stats_tick.tick() => {
                    self.write_stats(&mut frame, input).await?;
                }
            }
        }
        // Every capture has ended; a gap is only possible if one failed mid-batch.
        for (_, out) in std::mem::take(&mut pending) {
            self.write_batch(out, input.counters, outcome).await?;
        }
        self.write_stats(&mut frame, input).await?;
        let r = self
            .send
            .write_all(&Message::Goodbye(Goodbye).to_bytes())
            .await;
        self.check_write(r).await?;
        let _ = self.send.finish();

        let waited = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            match self.events.recv().await {
                Some(Event::Goodbye) => Ok(()),
                other => Err(early_end(self.remote, other)),
            }
        })
        .await;
        match waited {
            Ok(r) => r?,
            Err(_) => {
                let acked = self.acked.load(Relaxed);
                if acked < outcome.batches_sent {
                    return Err(Error::runtime(format!(
                        "receiver {} did not end the session within {}s; it confirmed {acked} \
                         of {} batches",
                        self.remote,
                        GOODBYE_TIMEOUT.as_secs(),
                        outcome.batches_sent
                    )));
                }
                tracing::warn!(
                    "receiver did not say goodbye within {}s, but confirmed every batch",
                    GOODBYE_TIMEOUT.as_secs()
                );
            }
        }
        self.conn.close(VarInt::from_u32(0), b"done");
        self.endpoint.wait_idle().await;
        Ok(())
    }

    async fn write_batch(
        &mut self,
        out: Outgoing,
        counters: &[Arc<Counters>],
        outcome: &mut Outcome,
    ) -> Result<()> {
        let wire = out.batch.frame.len();
        let r = self.send.write_chunk(out.batch.frame).await;
        self.check_write(r).await?;
        if let Some(c) = counters.get(usize::from(out.interface_id)) {
            c.sent(out.batch.packets, out.batch.raw_len, wire);
        }
        outcome.batches_sent += 1;
        Ok(())
    }

    async fn write_stats(&mut self, frame: &mut BytesMut, input: &StreamInput<'_>) -> Result<()> {
        let stats = Stats {
            session_id: input.session_id,
            interfaces: input
                .counters
                .iter()
                .enumerate()
                .map(|(i, c)| c.snapshot(u16::try_from(i).unwrap_or(u16::MAX)))
                .collect(),
        };
        frame.clear();
        Message::Stats(stats).encode(frame);
        let r = self.send.write_all(frame).await;
        self.check_write(r).await
    }

    /// Turns a failed write into the most useful error: the receiver's own message if it
    /// sent one before closing.
    async fn check_write<E: std::fmt::Display>(&mut self, r: Result<(), E>) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        match tokio::time::timeout(ERROR_GRACE, self.events.recv()).await {
            Ok(Some(Event::Error(msg))) => Err(receiver_error(self.remote, &msg)),
            _ => Err(Error::runtime(format!(
                "connection to receiver {} lost: {e}",
                self.remote
            ))),
        }
    }
}

/// The receiver's ErrorMsg text is the sensor's error line, as is: it already says what
/// went wrong and what to do.
fn receiver_error(_remote: SocketAddr, msg: &str) -> Error {
    Error::runtime(msg)
}

/// The receiver spoke (or vanished) before the sensor said Goodbye.
fn early_end(remote: SocketAddr, ev: Option<Event>) -> Error {
    match ev {
        Some(Event::Error(msg)) => receiver_error(remote, &msg),
        Some(Event::Goodbye) => {
            Error::runtime(format!("receiver {remote} ended the session unexpectedly"))
        }
        Some(Event::Ended(why)) => Error::runtime(format!("{why} ({remote})")),
        None => Error::runtime(format!("connection to receiver {remote} lost")),
    }
}
