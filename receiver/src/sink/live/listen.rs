//! The clients of `--serve-pcap`: accepted, and with `--serve-pcap-tls` checked, each in a
//! task of its own, then served their queue until they leave.
//!
//! With TLS, a client proves itself by the first line it sends once the handshake is done:
//! the viewer token, as its file holds it (`socat ... - < viewer-token`). A client that
//! sends no token or a wrong one within [`AUTH_TIMEOUT`] gets one line saying so, instead of
//! the pcap header, and is closed; a TLS handshake that fails is closed at once. Both are
//! logged (a line per [`REFUSAL_LOG_WINDOW`] at most) and counted.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::{send_queue, tune, Client, Peer, PeerEof, Secure, Totals, LIVE_REFUSED, MAX_CLIENTS};

/// Turned-away clients are logged at most once in this window; the rest are counted.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// How long a client has for the TLS handshake and its token line.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest token line read: a token (1024 bytes at most), a line end, some spaces.
const MAX_TOKEN_LINE: usize = 2048;
/// What a refused client reads instead of the pcap header.
const REFUSAL: &[u8] =
    b"capstream live stream: refused: send the viewer token (its file) as the first line\n";

/// Accepts clients, each handled by a task of its own that hands it to the sink (at its
/// next flush) once it has proved itself.
pub(super) async fn accept(
    listener: TcpListener,
    secure: Option<Secure>,
    joining: mpsc::Sender<Arc<Client>>,
    totals: Arc<Totals>,
    cut: watch::Receiver<bool>,
) {
    let refusals = Arc::new(Mutex::new(Throttle::default()));
    let tls = secure
        .as_ref()
        .map(|s| tokio_rustls::TlsAcceptor::from(Arc::clone(&s.tls)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                tracing::warn!("live stream: cannot accept a client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if totals.connected.load(Ordering::Relaxed) >= MAX_CLIENTS {
            refused(
                &refusals,
                peer,
                format_args!("{MAX_CLIENTS} clients already connected"),
            );
            continue;
        }
        tune(&stream, &peer.to_string());
        totals.connected.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client::new(Peer::Client(peer), &totals));
        let handled = Handled {
            peer,
            client,
            joining: joining.clone(),
            refusals: Arc::clone(&refusals),
            cut: cut.clone(),
        };
        match (&tls, &secure) {
            (Some(tls), Some(secure)) => {
                let (tls, secure) = (tls.clone(), secure.clone());
                tokio::spawn(async move {
                    match prove(&tls, &secure, stream).await {
                        Ok(stream) => handled.serve(stream, PeerEof::HalfClose).await,
                        Err(Refusal::Handshake(why)) => handled.refuse(format_args!("{why}")),
                        Err(Refusal::Token(why, mut stream)) => {
                            let _ = tokio::time::timeout(AUTH_TIMEOUT, async {
                                let _ = stream.write_all(REFUSAL).await;
                                let _ = stream.shutdown().await;
                            })
                            .await;
                            handled.refuse(format_args!("{why}"));
                        }
                    }
                });
            }
            _ => {
                tokio::spawn(handled.serve(stream, PeerEof::Left));
            }
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Why a TLS client is turned away.
enum Refusal {
    /// No TLS: nothing can be said to it.
    Handshake(String),
    /// What was wrong with its token, and the connection, to tell it.
    Token(&'static str, Box<TlsStream>),
}

/// The TLS handshake, then the client's first line, which must be the viewer token; each
/// within [`AUTH_TIMEOUT`].
async fn prove(
    tls: &tokio_rustls::TlsAcceptor,
    secure: &Secure,
    stream: TcpStream,
) -> Result<TlsStream, Refusal> {
    let mut stream = match tokio::time::timeout(AUTH_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(Refusal::Handshake(format!("TLS handshake failed: {e}"))),
        Err(_) => {
            return Err(Refusal::Handshake(format!(
                "no TLS handshake within {} s",
                AUTH_TIMEOUT.as_secs()
            )))
        }
    };
    let why = match tokio::time::timeout(AUTH_TIMEOUT, first_line(&mut stream)).await {
        Ok(Some(line)) if secure.viewer.matches(line.trim_ascii()) => return Ok(stream),
        Ok(Some(line)) if line.trim_ascii().is_empty() => "no viewer token",
        Ok(Some(_)) => "wrong viewer token",
        Ok(None) => "no viewer token line",
        Err(_) => "no viewer token in time",
    };
    Err(Refusal::Token(why, Box::new(stream)))
}

/// What the peer sends up to its first line end or the end of what it sends, without the
/// line end; `None` if that is longer than [`MAX_TOKEN_LINE`] or cannot be read. Whatever
/// follows in the same read is ignored, as everything a client sends after it.
async fn first_line<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return Some(line);
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..end]);
            return (line.len() <= MAX_TOKEN_LINE).then_some(line);
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_TOKEN_LINE {
            return None;
        }
    }
}

/// An accepted client, on its way to the sink or away.
struct Handled {
    peer: SocketAddr,
    client: Arc<Client>,
    joining: mpsc::Sender<Arc<Client>>,
    refusals: Arc<Mutex<Throttle>>,
    cut: watch::Receiver<bool>,
}

impl Handled {
    fn refuse(self, why: std::fmt::Arguments<'_>) {
        self.client.totals.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(LIVE_REFUSED).increment(1);
        refused(&self.refusals, self.peer, why);
        self.client.leave();
    }

    /// Hands the client to the sink, then sends it its queue until it leaves, the stream
    /// ends, or it is cut off at exit.
    async fn serve<S: AsyncRead + AsyncWrite>(mut self, stream: S, eof: PeerEof) {
        let client = Arc::clone(&self.client);
        if self.joining.try_send(Arc::clone(&client)).is_err() {
            refused(
                &self.refusals,
                self.peer,
                format_args!("too many clients joining at once"),
            );
            client.leave();
            return;
        }
        client.totals.clients.fetch_add(1, Ordering::Relaxed);
        let ended = send_queue(stream, &client, eof, &mut self.cut).await;
        client.leave();
        let dropped = client.dropped.load(Ordering::Relaxed);
        let sent = client.sent.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                "live stream: client {} left ({}): {sent} packets sent, {dropped} dropped \
                 because it read too slowly",
                client.peer,
                ended.reason()
            );
        } else {
            tracing::info!(
                "live stream: client {} left ({}): {sent} packets sent, 0 dropped",
                client.peer,
                ended.reason()
            );
        }
    }
}

/// Logs a turned-away client, throttled.
fn refused(throttle: &Mutex<Throttle>, peer: SocketAddr, why: std::fmt::Arguments<'_>) {
    throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .refused(peer, why);
}

/// Turned-away clients in the log: one line per window, the rest counted into the next.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    left_out: u64,
}

impl Throttle {
    fn refused(&mut self, peer: SocketAddr, why: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_WINDOW)
        {
            self.left_out += 1;
            return;
        }
        self.last = Some(now);
        let more = std::mem::take(&mut self.left_out);
        if more > 0 {
            tracing::warn!("live stream: refused {peer}: {why} (and {more} more not logged)");
        } else {
            tracing::warn!("live stream: refused {peer}: {why}");
        }
    }
}
