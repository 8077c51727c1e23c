//! One QUIC connection to the receiver: its handshake, and two tasks that carry frames on
//! the session's stream, one writing what the delivery loop hands it, one reading the
//! receiver's Acks, Goodbye or error. A connection that fails is dropped whole; the
//! delivery loop ([`crate::delivery`]) makes a new one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{ErrorCode, Message};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use crate::cli::{Fingerprint, ReceiverAddr};
use crate::error::{Error, Result};
use crate::tls::{ClientTls, SeenFingerprint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A receiver silent this long is gone (killed, or the path cut): reconnect. Short, because
/// the sensor keeps everything unacknowledged and loses nothing by reconnecting.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames handed to the writing task ahead of the stream: enough to keep it busy while the
/// delivery loop takes in batches.
const FRAMES_AHEAD: usize = 8;

/// Finds the receiver's address: an IP literal as is, a name through the resolver. It
/// blocks: the sensor resolves before its async runtime starts (see `prepare` in main.rs).
pub fn resolve(addr: &ReceiverAddr) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = addr.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, addr.port));
    }
    let mut found = (addr.host.as_str(), addr.port)
        .to_socket_addrs()
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

/// What a connection's tasks report to the delivery loop.
#[derive(Debug)]
pub enum LinkEvent {
    Ack(u64),
    Goodbye,
    /// The receiver's last words before closing.
    Refused {
        code: ErrorCode,
        message: String,
    },
    /// The connection ended or broke the protocol.
    Lost(String),
}

/// Why a connection attempt failed, and whether trying again can help.
pub struct ConnectError {
    pub error: Error,
    /// TLS verification, names and protocol mismatches do not fix themselves.
    pub permanent: bool,
}

/// One connection and its open stream.
pub struct Link {
    conn: Connection,
    frames: mpsc::Sender<Bytes>,
    pub events: mpsc::Receiver<LinkEvent>,
}

/// The client side of every connection of a session.
pub struct Client {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    seen: Option<SeenFingerprint>,
    pub remote: SocketAddr,
    server_name: String,
}

impl Client {
    pub fn new(remote: SocketAddr, server_name: &str, tls: ClientTls) -> Result<Self> {
        let ClientTls { config, seen } = tls;
        let quic = QuicClientConfig::try_from(config)
            .map_err(|e| Error::runtime(format!("TLS setup failed: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .map_err(|_| Error::runtime("invalid QUIC idle timeout"))?,
        ));
        client.transport_config(Arc::new(transport));
        // Bind to the receiver's address family, so that IPv4 works on hosts without IPv6.
        let local: SocketAddr = match remote {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = Endpoint::client(local)
            .map_err(|e| Error::runtime(format!("cannot open a UDP socket on {local}: {e}")))?;
        Ok(Self {
            endpoint,
            config: client,
            seen,
            remote,
            server_name: server_name.to_string(),
        })
    }

    /// Connects, opens the session's stream and sends `hello` first on it.
    pub async fn connect(&self, hello: Bytes) -> Result<Link, ConnectError> {
        let remote = self.remote;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), remote, &self.server_name)
            .map_err(|e| ConnectError {
                error: Error::input(format!(
                    "cannot connect to {remote} as \"{}\": {e} (check --server-name)",
                    self.server_name
                )),
                permanent: true,
            })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(handshake_error(remote, e, self.seen.as_ref())),
            Err(_) => {
                return Err(ConnectError {
                    error: Error::runtime(format!(
                        "cannot reach receiver at {remote}: no answer within {}s (is the \
                         receiver running, and UDP port {} open?)",
                        CONNECT_TIMEOUT.as_secs(),
                        remote.port()
                    )),
                    permanent: false,
                })
            }
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| match refusal_of_this_sensor(&e) {
                Some(why) => refused_for_good(remote, why),
                None => ConnectError {
                    error: Error::runtime(format!("cannot open a stream to {remote}: {e}")),
                    permanent: false,
                },
            })?;
        let (frames, to_write) = mpsc::channel(FRAMES_AHEAD);
        // Acks come one per written round; the loop reads them promptly.
        let (events_tx, events) = mpsc::channel(256);
        // The Hello goes first: the channel is empty and has room.
        let _ = frames.try_send(hello);
        tokio::spawn(write_frames(send, to_write, events_tx.clone()));
        tokio::spawn(read_receiver(recv, events_tx));
        Ok(Link {
            conn,
            frames,
            events,
        })
    }

    /// Waits (briefly) for the last connection to tell the receiver it closed.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

impl Link {
    /// The way to the stream: a permit from it is room for one frame.
    pub fn frames(&self) -> mpsc::Sender<Bytes> {
        self.frames.clone()
    }

    /// QUIC's current smoothed round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Sends a frame if there is room at once (statistics: the next tick sends fresher).
    pub fn try_send(&self, frame: Bytes) {
        let _ = self.frames.try_send(frame);
    }

    /// Ends the connection; `clean` when the session is complete.
    pub fn close(self, clean: bool) {
        let (code, reason): (u32, &[u8]) = if clean {
            (0, b"done")
        } else {
            (1, b"sensor reconnecting or stopping")
        };
        self.conn.close(VarInt::from_u32(code), reason);
    }
}

/// Writes the frames the delivery loop hands over, in order. When the loop lets go of the
/// link, the stream is finished.
async fn write_frames(
    mut send: SendStream,
    mut frames: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<LinkEvent>,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = send.write_chunk(frame).await {
            let event = match e {
                quinn::WriteError::ConnectionLost(e) => connection_lost(e),
                e => LinkEvent::Lost(e.to_string()),
            };
            let _ = events.send(event).await;
            return;
        }
    }
    let _ = send.finish();
}

/// Reads the receiver's frames and passes them on as events.
async fn read_receiver(mut recv: RecvStream, events: mpsc::Sender<LinkEvent>) {
    let mut buf = BytesMut::with_capacity(4096);
    let last = loop {
        match common::decode_frame(&mut buf) {
            Ok(Some(Message::Ack(ack))) => {
                if events.send(LinkEvent::Ack(ack.sequence)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Message::Goodbye(_))) => {
                if events.send(LinkEvent::Goodbye).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Message::Error(e))) => {
                break LinkEvent::Refused {
                    code: e.code,
                    message: e.message,
                }
            }
            Ok(Some(other)) => {
                break LinkEvent::Lost(format!(
                    "receiver sent an unexpected {:?} message",
                    other.message_type()
                ))
            }
            Ok(None) => {}
            Err(e) => break LinkEvent::Lost(format!("bad message from receiver: {e}")),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => break LinkEvent::Lost("receiver ended the stream".into()),
            Err(quinn::ReadError::ConnectionLost(e)) => break connection_lost(e),
            Err(e) => break LinkEvent::Lost(e.to_string()),
        }
    };
    let _ = events.send(last).await;
}

/// A broken connection as an event: a receiver that refused this sensor's client
/// certificate refuses it again on every try, so that is final; anything else is retried.
fn connection_lost(e: ConnectionError) -> LinkEvent {
    match refusal_of_this_sensor(&e) {
        Some(message) => LinkEvent::Refused {
            code: ErrorCode::UNAUTHENTICATED,
            message,
        },
        None => LinkEvent::Lost(e.to_string()),
    }
}

/// What it means, and what to do, when the receiver closed the connection with a TLS alert
/// about this sensor's client certificate. The sensor's own handshake is complete before
/// the receiver has checked that certificate, so the refusal arrives as the connection's
/// close, usually after the Hello was sent.
fn refusal_of_this_sensor(e: &ConnectionError) -> Option<String> {
    let ConnectionError::ConnectionClosed(close) = e else {
        return None;
    };
    let code = u64::from(close.error_code);
    // QUIC carries a TLS alert as error 0x100 + alert.
    if !(0x100..0x200).contains(&code) {
        return None;
    }
    let what = match code & 0xff {
        116 => {
            "the receiver requires a client certificate: pass --cert and --key (issued by \
                `receiver certs sensor NAME` on the receiver)"
        }
        48 => {
            "the receiver does not trust this sensor's certificate (--cert): it was not \
               issued by the CA the receiver trusts (its --client-ca)"
        }
        45 => {
            "the receiver refused this sensor's certificate (--cert) as expired or not yet \
               valid: check both clocks, or issue a new one with `receiver certs sensor NAME`"
        }
        42 | 43 | 44 | 46 | 49 | 51 => "the receiver refused this sensor's certificate (--cert)",
        _ => return None,
    };
    // The receiver's own words, as data.
    let detail: String = close
        .to_string()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    Some(format!("{what} ({detail})"))
}

fn refused_for_good(remote: SocketAddr, why: String) -> ConnectError {
    ConnectError {
        error: Error::runtime(format!("receiver {remote} refused this sensor: {why}")),
        permanent: true,
    }
}

fn handshake_error(
    remote: SocketAddr,
    e: ConnectionError,
    seen: Option<&SeenFingerprint>,
) -> ConnectError {
    if let Some(why) = refusal_of_this_sensor(&e) {
        return refused_for_good(remote, why);
    }
    let permanent = matches!(
        e,
        ConnectionError::TransportError(_) | ConnectionError::VersionMismatch
    );
    ConnectError {
        error: handshake_message(remote, e, seen),
        permanent,
    }
}

fn handshake_message(
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
                "is --ca the receiver's certificate, or the CA that signed it? A receiver \
                 presenting another certificate may also be an impostor in the path"
            } else if text.contains("certificate expired") || text.contains("not valid yet") {
                "the receiver's certificate is outside its validity dates: check both clocks, \
                 or renew it (`receiver certs init` renews one it made)"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_with_alert(alert: u8) -> ConnectionError {
        ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: Bytes::from_static(b"peer sent no certificates\x1b[31m"),
        })
    }

    fn refusal(event: LinkEvent) -> String {
        match event {
            LinkEvent::Refused { code, message } => {
                assert_eq!(code, ErrorCode::UNAUTHENTICATED);
                assert!(!message.contains('\x1b'), "{message:?}");
                message
            }
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn a_refused_client_certificate_says_what_to_do_and_is_final() {
        let remote: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let e = handshake_error(remote, closed_with_alert(116), None);
        assert!(e.permanent);
        let text = e.error.to_string();
        assert!(
            text.contains("127.0.0.1:4433") && text.contains("pass --cert and --key"),
            "{text}"
        );
        assert!(refusal(connection_lost(closed_with_alert(116))).contains("--cert and --key"));
        assert!(refusal(connection_lost(closed_with_alert(48))).contains("--client-ca"));
        assert!(refusal(connection_lost(closed_with_alert(45))).contains("expired"));
        // Anything else is retried.
        assert!(matches!(
            connection_lost(ConnectionError::TimedOut),
            LinkEvent::Lost(_)
        ));
        assert!(matches!(
            connection_lost(closed_with_alert(120)),
            LinkEvent::Lost(_)
        ));
    }
}
