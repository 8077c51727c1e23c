//! One QUIC connection to the receiver: its handshake, and two tasks that carry frames on
//! the session's stream, one writing what the delivery loop hands it, one reading the
//! receiver's Acks, Goodbye or error. A connection that fails is dropped whole; the
//! delivery loop ([`crate::delivery`]) makes a new one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{ErrorCode, Message};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use crate::cli::ReceiverAddr;
use crate::error::{Error, Result};
use crate::tls::{ClientTls, LastVerification};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver silent this long is gone (killed, or the path cut): reconnect. Short, because
/// the sensor keeps everything unacknowledged and loses nothing by reconnecting. With
/// several receivers, --failover-after if shorter (see [`idle_timeout`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives per idle timeout: several may be lost before the connection is.
const KEEP_ALIVES_PER_IDLE: u32 = 5;
/// How long a name may take to resolve again before the addresses known are used.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames handed to the writing task ahead of the stream: enough to keep it busy while the
/// delivery loop takes in batches.
const FRAMES_AHEAD: usize = 8;
/// How long a sensor whose session ended cleanly waits at exit for its connection to
/// close: enough for the endpoint to send the close frame. Waiting for the whole drain
/// took up to seconds with several sensors on a busy receiver (fan-in bench, issue 19).
const CLOSE_AFTER_GOODBYE: Duration = Duration::from_millis(20);

/// The QUIC idle timeout: [`IDLE_TIMEOUT`], or `failover_after` when that is shorter, so
/// that a receiver killed under a connection is noticed in time to fail over.
pub fn idle_timeout(failover_after: Option<Duration>) -> Duration {
    failover_after.map_or(IDLE_TIMEOUT, |d| d.min(IDLE_TIMEOUT))
}

/// Finds the receivers' addresses: an IP literal as is, a name through the resolver, every
/// one of its addresses (each is a receiver of its own). One address family only, that of
/// the UDP socket every connection goes through: IPv4 when any receiver has an IPv4
/// address (IPv4 loopback works where IPv6 is disabled; `localhost` has both). It blocks:
/// the sensor resolves before its async runtime starts (see `prepare` in main.rs).
pub fn resolve(receivers: &[ReceiverAddr]) -> Result<Vec<Target>> {
    use std::net::ToSocketAddrs;
    let mut found = Vec::new();
    for addr in receivers {
        let addresses: Vec<SocketAddr> = match addr.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, addr.port)],
            Err(_) => (addr.host.as_str(), addr.port)
                .to_socket_addrs()
                .map_err(|e| {
                    Error::runtime(format!(
                        "cannot resolve receiver host {}: {e} (check the name, or give an IP \
                         address)",
                        addr.host
                    ))
                })?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(Error::runtime(format!(
                "receiver host {} has no address (check the name, or give an IP address)",
                addr.host
            )));
        }
        found.extend(addresses.into_iter().map(|a| Target::new(a, addr)));
    }
    let v4 = found.iter().any(|t| t.addr.is_ipv4());
    let (kept, other): (Vec<Target>, Vec<Target>) =
        found.into_iter().partition(|t| t.addr.is_ipv4() == v4);
    // A name with addresses of both families (localhost) is reached by one of them: said
    // only for receivers that are left out whole.
    for t in other
        .iter()
        .filter(|t| !kept.iter().any(|k| k.host == t.host))
    {
        tracing::warn!(
            "receiver {} ({}) left out: the sensor's socket is IPv4, for the other receivers",
            t.addr,
            t.host
        );
    }
    Ok(kept)
}

/// One receiver: an address, and the name it was given by (the TLS name by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// HOST of its --receiver.
    pub host: String,
}

impl Target {
    fn new(addr: SocketAddr, given: &ReceiverAddr) -> Self {
        Self {
            addr,
            host: given.host.clone(),
        }
    }
}

/// The UDP socket of every connection of the process, bound before the captures are
/// attached so that the filter can leave out exactly this flow (its local port).
pub fn bind_socket(remote: SocketAddr) -> Result<std::net::UdpSocket> {
    // The receiver's address family, so that IPv4 works on hosts without IPv6.
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(local)
        .map_err(|e| Error::runtime(format!("cannot open a UDP socket on {local}: {e}")))
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
    /// The receiver was silent for the whole idle timeout.
    Silent(String),
}

/// Why a connection attempt failed; the variant says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS verification, names and protocol mismatches, a refused client certificate: a
    /// misconfiguration when the first connection meets them, which does not fix itself.
    /// Later, anyone on the path can fake them, so they are retried then (see
    /// [`crate::delivery`]).
    #[error(transparent)]
    Permanent(Error),
    /// Unreachable, timed out, broken off: may pass.
    #[error(transparent)]
    Passing(Error),
}

impl ConnectError {
    /// Whether trying again cannot help (unless the failure was forged).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }

    /// The error, to report.
    pub fn into_error(self) -> Error {
        match self {
            Self::Permanent(e) | Self::Passing(e) => e,
        }
    }
}

/// One connection and its open stream.
pub struct Link {
    conn: Connection,
    frames: mpsc::Sender<Bytes>,
    pub events: mpsc::Receiver<LinkEvent>,
}

/// The client side of every connection of the process.
pub struct Client {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    verification: LastVerification,
    /// Every --receiver, resolved again before each attempt.
    receivers: Vec<ReceiverAddr>,
    /// The socket's family.
    ipv4: bool,
    /// --server-name; else each receiver's HOST.
    server_name: Option<String>,
    idle_timeout: Duration,
    /// Serves the on-demand captures the receiver asks for on each connection.
    on_demand: Arc<crate::on_demand::OnDemand>,
}

/// What [`Client::new`] needs besides the socket, the TLS set-up and the on-demand server.
pub struct Settings {
    pub receivers: Vec<ReceiverAddr>,
    pub server_name: Option<String>,
    /// From [`idle_timeout`].
    pub idle_timeout: Duration,
}

impl Client {
    /// `socket`: from [`bind_socket`].
    pub fn new(
        socket: std::net::UdpSocket,
        settings: Settings,
        tls: ClientTls,
        on_demand: Arc<crate::on_demand::OnDemand>,
    ) -> Result<Self> {
        let ClientTls {
            config,
            verification,
        } = tls;
        let quic = QuicClientConfig::try_from(config)
            .map_err(|e| Error::runtime(format!("TLS setup failed: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(settings.idle_timeout / KEEP_ALIVES_PER_IDLE));
        transport.max_idle_timeout(Some(
            settings
                .idle_timeout
                .try_into()
                .map_err(|_| Error::runtime("invalid QUIC idle timeout"))?,
        ));
        client.transport_config(Arc::new(transport));
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::runtime("no async runtime for the QUIC endpoint"))?;
        let ipv4 = socket
            .local_addr()
            .map_err(|e| Error::runtime(format!("cannot read the UDP socket's address: {e}")))?
            .is_ipv4();
        let endpoint = Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
            .map_err(|e| Error::runtime(format!("cannot open the QUIC endpoint: {e}")))?;
        Ok(Self {
            endpoint,
            config: client,
            verification,
            receivers: settings.receivers,
            ipv4,
            server_name: settings.server_name,
            idle_timeout: settings.idle_timeout,
            on_demand,
        })
    }

    /// How long a receiver is silent before its connection ends as [`LinkEvent::Silent`].
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Resolves every receiver's name again (DNS failover, a moved receiver): the
    /// addresses of the socket's family; none of a name whose resolver fails (said once
    /// here), so that the caller keeps what it knew.
    pub async fn resolve_again(&self) -> Vec<Target> {
        let mut found = Vec::new();
        for addr in &self.receivers {
            if let Ok(ip) = addr.host.parse::<IpAddr>() {
                found.push(Target::new(SocketAddr::new(ip, addr.port), addr));
                continue;
            }
            let lookup = tokio::net::lookup_host((addr.host.as_str(), addr.port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addresses)) => found.extend(
                    addresses
                        .filter(|a| a.is_ipv4() == self.ipv4)
                        .map(|a| Target::new(a, addr)),
                ),
                Ok(Err(e)) => tracing::warn!(
                    "cannot resolve receiver host {} again: {e}; keeping its known addresses",
                    addr.host
                ),
                Err(_) => tracing::warn!(
                    "cannot resolve receiver host {} again: no answer within {}s; keeping its \
                     known addresses",
                    addr.host,
                    RESOLVE_TIMEOUT.as_secs()
                ),
            }
        }
        found
    }

    /// Connects to `target`, opens the session's stream and sends `hello` first on it.
    pub async fn connect(&self, target: &Target, hello: Bytes) -> Result<Link, ConnectError> {
        let remote = target.addr;
        let server_name = self.server_name.as_deref().unwrap_or(&target.host);
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), remote, server_name)
            .map_err(|e| {
                ConnectError::Permanent(Error::input(format!(
                    "cannot connect to {remote} as \"{server_name}\": {e} (check --server-name)"
                )))
            })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(handshake_error(remote, e, &self.verification)),
            Err(_) => {
                return Err(ConnectError::Passing(Error::runtime(format!(
                    "cannot reach receiver at {remote}: no answer within {}s (is the \
                     receiver running, and UDP port {} open?)",
                    CONNECT_TIMEOUT.as_secs(),
                    remote.port()
                ))))
            }
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| match refusal_of_this_sensor(&e) {
                Some(why) => refused_for_good(remote, why),
                None => ConnectError::Passing(Error::runtime(format!(
                    "cannot open a stream to {remote}: {e}"
                ))),
            })?;
        let (frames, to_write) = mpsc::channel(FRAMES_AHEAD);
        // Acks come one per written round; the loop reads them promptly.
        let (events_tx, events) = mpsc::channel(256);
        // The Hello goes first: the channel is empty and has room.
        let _ = frames.try_send(hello);
        tokio::spawn(write_frames(send, to_write, events_tx.clone()));
        tokio::spawn(read_receiver(recv, events_tx));
        tokio::spawn(Arc::clone(&self.on_demand).serve(conn.clone()));
        Ok(Link {
            conn,
            frames,
            events,
        })
    }

    /// Waits (briefly) for the last connection to tell the receiver it closed. After a
    /// clean end (Goodbye exchanged, `clean`) only [`CLOSE_AFTER_GOODBYE`]: the full drain
    /// (three probe timeouts, which grow with a loaded receiver's round-trip time) only
    /// answers a peer that missed our close, and the receiver lets go of a finished
    /// session's connection by itself.
    pub async fn close(&self, clean: bool) {
        let wait = if clean {
            CLOSE_AFTER_GOODBYE
        } else {
            Duration::from_secs(2)
        };
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
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
        let path = self.conn.stats().path;
        tracing::debug!(
            "QUIC: {} datagrams lost of {} sent, {} congestion events, rtt {} ms, congestion \
             window {} bytes",
            path.lost_packets,
            path.sent_packets,
            path.congestion_events,
            path.rtt.as_millis(),
            path.cwnd
        );
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
        match protocol::decode_frame(&mut buf) {
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
        None if matches!(e, ConnectionError::TimedOut) => LinkEvent::Silent(e.to_string()),
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
    let detail = program::names::clean(&close.to_string());
    Some(format!("{what} ({detail})"))
}

fn refused_for_good(remote: SocketAddr, why: String) -> ConnectError {
    ConnectError::Permanent(Error::runtime(format!(
        "receiver {remote} refused this sensor: {why}"
    )))
}

fn handshake_error(
    remote: SocketAddr,
    e: ConnectionError,
    verification: &LastVerification,
) -> ConnectError {
    if let Some(why) = refusal_of_this_sensor(&e) {
        return refused_for_good(remote, why);
    }
    let permanent = matches!(
        e,
        ConnectionError::TransportError(_) | ConnectionError::VersionMismatch
    );
    let verified = verification.lock().ok().and_then(|mut v| {
        let seen = std::mem::take(&mut *v);
        seen.error.map(|err| (err, seen.fingerprint))
    });
    let error = handshake_message(remote, e, verified);
    if permanent {
        ConnectError::Permanent(error)
    } else {
        ConnectError::Passing(error)
    }
}

/// The one line for a failed handshake; `verified`: the error this sensor's own check of
/// the receiver's certificate returned, with the fingerprint it saw.
fn handshake_message(
    remote: SocketAddr,
    e: ConnectionError,
    verified: Option<(rustls::Error, Option<crate::cli::Fingerprint>)>,
) -> Error {
    use rustls::CertificateError as Cert;
    let text = e.to_string();
    if let Some((rustls::Error::InvalidCertificate(why), seen)) = verified {
        let hint = match (why, seen) {
            (Cert::ApplicationVerificationFailure, Some(got)) => {
                return Error::runtime(format!(
                    "TLS verification of receiver {remote} failed: its certificate has SHA-256 \
                     fingerprint {got}, which does not match --fingerprint (compare with the \
                     receiver's 'certificate ... SHA-256 fingerprint' line)"
                ))
            }
            (Cert::UnknownIssuer | Cert::BadSignature, _) => {
                "is --ca the receiver's certificate, or the CA that signed it? A receiver \
                 presenting another certificate may also be an impostor in the path"
            }
            (Cert::Expired | Cert::NotValidYet, _)
            | (Cert::ExpiredContext { .. } | Cert::NotValidYetContext { .. }, _) => {
                "the receiver's certificate is outside its validity dates: check both clocks, \
                 or renew it (`receiver certs init` renews one it made)"
            }
            (Cert::NotValidForName | Cert::NotValidForNameContext { .. }, _) => {
                "pass --server-name with a name the certificate holds"
            }
            _ => "check --ca/--fingerprint",
        };
        return Error::runtime(format!(
            "TLS handshake with receiver {remote} failed: {text} ({hint})"
        ));
    }
    match e {
        ConnectionError::TimedOut => Error::runtime(format!(
            "cannot reach receiver at {remote}: timed out (is the receiver running, and UDP \
             port {} open?)",
            remote.port()
        )),
        ConnectionError::VersionMismatch => Error::runtime(format!(
            "receiver at {remote} offers no QUIC version this sensor speaks (a Version \
             Negotiation packet: another QUIC server there, or one forged on the path)"
        )),
        ConnectionError::TransportError(t) => {
            // QUIC carries a TLS alert as error 0x100 + alert; 120: no_application_protocol.
            let hint = if u64::from(t.code) == 0x100 + 120 {
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
    fn a_fingerprint_mismatch_names_the_fingerprint_seen() {
        let remote: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let verification = LastVerification::default();
        *verification.lock().unwrap() = crate::tls::Verified {
            fingerprint: Some(crate::cli::Fingerprint([0xab; 32])),
            error: Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        };
        // (quinn does not export its TransportError; the verifier's record decides.)
        let e = handshake_error(remote, ConnectionError::VersionMismatch, &verification);
        let text = e.into_error().to_string();
        assert!(
            text.contains(&"ab".repeat(32)) && text.contains("does not match --fingerprint"),
            "{text}"
        );
        // Taken: the next failure is explained by its own verification.
        assert!(verification.lock().unwrap().error.is_none());
    }

    #[test]
    fn a_refused_client_certificate_says_what_to_do_and_is_final() {
        let remote: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let e = handshake_error(remote, closed_with_alert(116), &LastVerification::default());
        assert!(e.is_permanent());
        let text = e.into_error().to_string();
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
            LinkEvent::Silent(_)
        ));
        assert!(matches!(
            connection_lost(closed_with_alert(120)),
            LinkEvent::Lost(_)
        ));
    }
}
