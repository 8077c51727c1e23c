//! One sensor connection: reads its stream, checks every frame, passes batches to the
//! writer and acknowledges what was written. A misbehaving sensor is told why and dropped;
//! the others carry on. A sensor that does not prove who it is (client certificate, token)
//! is refused before anything of it reaches the writer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod rules;

use bytes::BytesMut;
use program::names::{clean, sensor_label, sensor_name};
use protocol::{decode_frame, Ack, ErrorCode, ErrorMsg, Goodbye, Message};
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{certificate_name, Auth};
use crate::merge::SessionId;
use crate::quota::{Held, Quotas, RateLimit};
use crate::server::{Admission, Unauthenticated};
use crate::viewer::{Registration, Sensors};
use crate::writer::{Attached, ConnId, Event};
use rules::{Accepted, Refusal, SensorProtocol};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A sensor must open its stream and say Hello this soon after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the peer to read our last words before closing.
const LINGER: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 256 * 1024;

/// How a session ended.
enum End {
    /// Goodbye exchanged: every batch written and acknowledged.
    Clean,
    /// The sensor vanished (connection lost or stream ended without Goodbye).
    Lost(String),
    Refused(Refusal),
}

pub async fn connection(
    incoming: Incoming,
    unauthenticated: Unauthenticated,
    conn_id: ConnId,
    events: mpsc::Sender<Event>,
    admission: Admission,
    mut shutdown: watch::Receiver<bool>,
) {
    let Admission {
        auth,
        quotas,
        sensors,
        key_log_grace,
    } = admission;
    // IPv4 sensors on the dual-stack socket show as 127.0.0.1, not [::ffff:127.0.0.1].
    let peer = incoming.remote_address();
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let handshake = unless_shutdown(
        &mut shutdown,
        tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming),
    );
    // Failed handshakes include every sensor whose client certificate was refused: logged
    // at a bounded rate, as anyone may cause them.
    let conn = match handshake.await {
        None => return,
        Some(Ok(Ok(conn))) => conn,
        // With --client-ca, a failed handshake is mostly a refused certificate.
        Some(Ok(Err(e))) if auth.client_certificates => {
            return auth
                .refusals
                .auth_failed(peer, format!("handshake failed: {e}"))
        }
        Some(Ok(Err(e))) => {
            return auth
                .refusals
                .refused(peer, format!("handshake failed: {e}"))
        }
        Some(Err(_)) => return auth.refusals.refused(peer, "handshake timed out"),
    };
    // The verifier required a certificate; its name names the sensor.
    let identity = if auth.client_certificates {
        let Some(name) = certificate_name(&conn) else {
            conn.close(
                VarInt::from_u32(ErrorCode::UNAUTHENTICATED.0.into()),
                b"no client certificate",
            );
            return auth
                .refusals
                .auth_failed(peer, "no client certificate after the handshake");
        };
        Some(name)
    } else {
        None
    };
    let stream = unless_shutdown(
        &mut shutdown,
        tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()),
    );
    let (send, recv) = match stream.await {
        None => {
            conn.close(
                VarInt::from_u32(ErrorCode::SHUTTING_DOWN.0.into()),
                b"receiver shutting down",
            );
            return;
        }
        Some(Ok(Ok(streams))) => streams,
        Some(Ok(Err(e))) => {
            return auth
                .refusals
                .refused(peer, format!("closed before opening a stream: {e}"))
        }
        Some(Err(_)) => {
            conn.close(
                VarInt::from_u32(ErrorCode::PROTOCOL.0.into()),
                b"no stream opened",
            );
            return auth
                .refusals
                .refused(peer, format!("opened no stream within {HELLO_TIMEOUT:?}"));
        }
    };
    let mut s = SensorConnection {
        conn: conn_id,
        connection: conn.clone(),
        peer,
        send,
        recv,
        buf: BytesMut::with_capacity(READ_CHUNK),
        events,
        auth,
        identity,
        unauthenticated: Some(unauthenticated),
        rules: SensorProtocol::default(),
        joined: None,
        left: false,
        quotas,
        rate: quotas
            .rate
            .map(|r| RateLimit::new(r, std::time::Instant::now())),
        held: Held::default(),
        sensors,
        listed: None,
        key_log_grace,
    };
    let end = s.run(shutdown).await;
    let name = s
        .joined
        .as_ref()
        .map_or_else(|| peer.to_string(), |(_, name)| name.clone());
    if let (Some((session, _)), false) = (&s.joined, s.left) {
        // What arrived stays; the session waits for the sensor to come back.
        let detached = Event::Detached {
            session: *session,
            conn: conn_id,
            duplicates: s.rules.duplicates(),
        };
        let _ = s.events.send(detached).await;
    }
    // Before its Hello is accepted, a peer is anyone: what it causes is logged at a bounded
    // rate, by address. Its text (a close reason) is cleaned either way.
    let before_hello = s.joined.is_none();
    match end {
        End::Clean => {
            tracing::info!("{name}: left cleanly");
            let _ = tokio::time::timeout(LINGER, conn.closed()).await;
        }
        End::Lost(why) if before_hello => s
            .auth
            .refusals
            .refused(peer, format!("connection lost: {}", clean(&why))),
        End::Lost(why) => tracing::warn!("{name}: connection lost: {}", clean(&why)),
        End::Refused(r) => {
            if r.code == ErrorCode::SHUTTING_DOWN {
                tracing::info!("{name}: told the receiver is shutting down");
            } else if before_hello {
                // (An unauthenticated one was logged when refused.)
                if r.code != ErrorCode::UNAUTHENTICATED {
                    s.auth.refusals.refused(peer, &r.message);
                }
            } else {
                tracing::warn!("{name}: refused: {}", r.message);
            }
            s.say_last(
                &conn,
                Message::Error(ErrorMsg {
                    code: r.code,
                    message: r.message,
                }),
                r.code,
            )
            .await;
        }
    }
}

/// One sensor's connection: its stream, and the rules its messages are held to.
struct SensorConnection {
    conn: ConnId,
    /// The QUIC connection, for its round-trip time.
    connection: Connection,
    peer: SocketAddr,
    send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
    events: mpsc::Sender<Event>,
    auth: Arc<Auth>,
    /// The name in the sensor's verified client certificate (with `--client-ca`).
    identity: Option<String>,
    /// Counts this connection among those not yet authenticated, until its Hello is
    /// accepted.
    unauthenticated: Option<Unauthenticated>,
    /// What the sensor may send, and what it is told when it breaks the protocol.
    rules: SensorProtocol,
    /// The sensor's session id and name once its Hello was accepted.
    joined: Option<(SessionId, String)>,
    /// The writer has closed the session (Goodbye, or the receiver stopping).
    left: bool,
    quotas: Quotas,
    rate: Option<RateLimit>,
    /// This sensor's batches taken in and not yet in the output.
    held: Held,
    /// Where viewers find connected sensors; this one is listed while joined.
    sensors: Arc<Sensors>,
    listed: Option<Registration>,
    /// How long this connection is still read once the receiver stops, if its sensor
    /// follows TLS key logs.
    key_log_grace: Duration,
}

/// Completes at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` unless the receiver starts shutting down first (then `None`).
async fn unless_shutdown<F: std::future::Future>(
    shutdown: &mut watch::Receiver<bool>,
    f: F,
) -> Option<F::Output> {
    if *shutdown.borrow() {
        return None;
    }
    tokio::select! {
        out = f => Some(out),
        _ = shutdown.changed() => None,
    }
}

fn shutting_down() -> End {
    End::Refused(Refusal::shutting_down())
}

impl SensorConnection {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> End {
        let first = tokio::time::timeout(HELLO_TIMEOUT, self.next_message());
        let Some(first) = unless_shutdown(&mut shutdown, first).await else {
            return shutting_down();
        };
        let hello = match first {
            Ok(Ok(Some(first))) => match self.rules.hello(first) {
                Ok(hello) => hello,
                Err(refusal) => return End::Refused(refusal),
            },
            Ok(Ok(None)) => return End::Lost("stream ended before Hello".into()),
            Ok(Err(end)) => return end,
            Err(_) => {
                return End::Refused(Refusal::new(ErrorCode::PROTOCOL, "no Hello within 10 s"))
            }
        };
        // Before anything of the sensor reaches the writer.
        let token = self.auth.check_token(&hello);
        if let Err(why) = token {
            let claims = sensor_name(&hello, self.identity.as_deref());
            self.auth
                .refusals
                .auth_failed(self.peer, format!("{why} (from sensor {claims})"));
        }
        if let Err(refusal) = self.rules.admit(&hello, token) {
            return End::Refused(refusal);
        }
        let (session, interfaces) = (hello.session_id, hello.interfaces.len());
        // Its packets wait in the merge for keys still on their way: a stopping receiver
        // reads on for a reorder window, so that those keys come here, ahead of the
        // packets, rather than to the next receiver, behind them.
        let grace = if hello.tls_key_log {
            self.key_log_grace
        } else {
            Duration::ZERO
        };
        let mut stopping_at: Option<tokio::time::Instant> = None;
        let name = sensor_label(&hello, self.identity.as_deref(), self.peer);
        let listing = (
            sensor_name(&hello, self.identity.as_deref()),
            hello.available.clone(),
            hello.on_demand,
        );
        let (reply, accepted) = oneshot::channel();
        let joined = Event::Joined {
            conn: self.conn,
            hello: Box::new(hello),
            identity: self.identity.clone(),
            peer: self.peer,
            reply,
        };
        if self.events.send(joined).await.is_err() {
            return shutting_down();
        }
        let attached = match accepted.await {
            Ok(Ok(attached)) => attached,
            Ok(Err(why)) => return End::Refused(Refusal::join(why)),
            Err(_) => return shutting_down(),
        };
        self.rules.on_join(attached.received);
        // Admitted: no longer counted against its address, and its batches get their share
        // of the receive window when it is listed below.
        self.unauthenticated = None;
        let Attached {
            acked, mut acks, ..
        } = attached;
        tracing::info!(
            "{name}: joined with {interfaces} interface(s), resuming after batch {acked}"
        );
        self.joined = Some((session, name));
        let (listed_name, available, on_demand) = listing;
        self.listed = Some(self.sensors.register(
            self.conn,
            listed_name,
            self.connection.clone(),
            available,
            on_demand,
        ));
        // Where the sensor resumes: it sends again everything after this.
        if let Err(e) = self.write(Message::Ack(Ack { sequence: acked })).await {
            return e;
        }

        // Where this connection's reading waited: the writer's queue full, its sensor over
        // its quota of held bytes (reported when it leaves, to tell which wait holds
        // sensors back).
        let (mut queue_wait, mut quota_wait) = (Duration::ZERO, Duration::ZERO);
        loop {
            // Over its quota of held bytes, the sensor waits (unread) for its acknowledgements.
            let room = self.held.has_room(self.quotas.held);
            let waiting = std::time::Instant::now();
            let message = tokio::select! {
                m = self.next_message(), if room => m,
                changed = acks.changed() => {
                    if changed.is_err() {
                        return End::Lost("a newer connection of the same session took over".into());
                    }
                    let sequence = *acks.borrow_and_update();
                    if !room {
                        quota_wait += waiting.elapsed();
                    }
                    self.held.acknowledged(sequence);
                    if let Err(e) = self.write(Message::Ack(Ack { sequence })).await {
                        return e;
                    }
                    continue;
                }
                _ = shutdown.changed(), if stopping_at.is_none() => {
                    if grace.is_zero() {
                        return self.leave(true).await;
                    }
                    stopping_at = Some(tokio::time::Instant::now() + grace);
                    continue;
                }
                _ = sleep_until(stopping_at) => return self.leave(true).await,
            };
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => return End::Lost("stream ended without Goodbye".into()),
                Err(end) => return end,
            };
            let event = match self.rules.on_message(message) {
                Ok(Accepted::Batch {
                    sequence,
                    interface_id,
                    packets,
                    wire_len,
                }) => {
                    self.held.add(sequence, packets.records_len());
                    Event::Batch {
                        session,
                        conn: self.conn,
                        sequence,
                        interface_id,
                        raw_len: packets.records_len(),
                        packets,
                        wire_len,
                    }
                }
                Ok(Accepted::Duplicate) => continue,
                Ok(Accepted::Stats(stats)) => Event::Stats {
                    session,
                    conn: self.conn,
                    stats,
                    rtt: self.connection.rtt(),
                },
                Ok(Accepted::Goodbye) => {
                    let name = self.joined.as_ref().map_or("", |(_, name)| name.as_str());
                    tracing::debug!(
                        "{name}: its reading waited {} ms for the writer's queue, {} ms over \
                         its quota of held bytes",
                        queue_wait.as_millis(),
                        quota_wait.as_millis()
                    );
                    return self.leave(false).await;
                }
                Err(refusal) => return End::Refused(refusal),
            };
            // A full queue makes this connection wait, and QUIC flow control slows the
            // sensor: back-pressure, never a silent drop.
            let sending = std::time::Instant::now();
            if self.events.send(event).await.is_err() {
                return shutting_down();
            }
            queue_wait += sending.elapsed();
        }
    }

    /// Closes the session once all of it is written, then sends the final Ack and our
    /// Goodbye (the sensor said Goodbye) or "shutting down" (the receiver is stopping; the
    /// sensor resumes with the next receiver after that Ack, so nothing is sent twice).
    async fn leave(&mut self, stopping: bool) -> End {
        let Some((session, _)) = self.joined else {
            return shutting_down();
        };
        let (done, written) = oneshot::channel();
        let left = Event::Left {
            session,
            conn: self.conn,
            duplicates: self.rules.duplicates(),
            done,
        };
        if self.events.send(left).await.is_err() {
            return End::Lost("the receiver stopped".into());
        }
        let Ok(sequence) = written.await else {
            return End::Lost("the receiver stopped before writing everything".into());
        };
        self.left = true;
        if let Err(e) = self.write(Message::Ack(Ack { sequence })).await {
            return e;
        }
        if stopping {
            return shutting_down();
        }
        if let Err(e) = self.write(Message::Goodbye(Goodbye)).await {
            return e;
        }
        let _ = self.send.finish();
        End::Clean
    }

    /// The next whole frame; `Ok(None)` when the stream ended cleanly between frames.
    async fn next_message(&mut self) -> Result<Option<Message>, End> {
        loop {
            // Before the Hello is accepted, the first frame must be a Hello (at most 256 KiB).
            self.rules.check_header(&self.buf).map_err(End::Refused)?;
            match decode_frame(&mut self.buf) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(End::Refused(Refusal::protocol(e))),
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    self.buf.extend_from_slice(&chunk.bytes);
                    if let Some(rate) = &mut self.rate {
                        let wait = rate.take(chunk.bytes.len(), std::time::Instant::now());
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => return Err(End::Lost("stream ended inside a message".into())),
                Err(e) => return Err(End::Lost(e.to_string())),
            }
        }
    }

    async fn write(&mut self, m: Message) -> Result<(), End> {
        self.send
            .write_all(&m.to_bytes())
            .await
            .map_err(|e| End::Lost(e.to_string()))
    }

    /// Sends a final message and gives the peer a moment to read it before closing.
    async fn say_last(&mut self, conn: &Connection, m: Message, code: ErrorCode) {
        if self.write(m).await.is_ok() {
            let _ = self.send.finish();
            let _ = tokio::time::timeout(LINGER, conn.closed()).await;
        }
        conn.close(VarInt::from_u32(code.0.into()), b"");
    }
}
