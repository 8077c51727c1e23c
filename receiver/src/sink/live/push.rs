//! `--push-pcap HOST:PORT`: the stream sent to a reader that listens (Arkime's
//! `pcap-over-ip-server` mode, `socat TCP-LISTEN:PORT - | tcpdump -r -`). Each connection
//! gets the pcap header, then what is queued. When the reader goes away (it closes, a write
//! fails or stalls), the receiver connects again with backoff; meanwhile the reader's
//! queue holds what it can (16 MiB) and drops the rest, counted, as for a slow client. A
//! chunk not wholly written before a connection broke is sent again whole on the next one,
//! after the header: the reader had a torn record of it, which ends that stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use program::backoff::Backoff;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{send_queue, tune, Client, Ended, PeerEof, WRITE_TIMEOUT};

/// The wait after the first failed attempt, doubled after each next one up to 5 s; a
/// connection that was up starts again from it.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `target` and serves it `reader`'s queue, again after each loss, until the
/// stream ends (and the reader got it all) or is cut off at exit.
pub(super) async fn run(
    target: String,
    reader: Arc<Client>,
    mut header: watch::Receiver<Option<Bytes>>,
    mut cut: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF;
    let mut failing = false;
    let ended = loop {
        if reader.queue().end && header.borrow().is_none() {
            // No sensor came: nothing to send.
            break Ended::Stopped;
        }
        let connected = tokio::select! {
            connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)) => {
                connected.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            }
            _ = cut.changed() => break Ended::Cut,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                // The first failure of a run is a warning, the retries that follow are not.
                if !failing {
                    tracing::warn!(
                        "live stream: cannot connect to the reader at {target} (--push-pcap): \
                         {e}; trying again, with backoff up to {} s",
                        BACKOFF.max().as_secs()
                    );
                    failing = true;
                } else {
                    tracing::debug!("live stream: cannot connect to {target}: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay()) => {}
                    _ = cut.changed() => break Ended::Cut,
                }
                continue;
            }
        };
        failing = false;
        backoff.reset();
        tune(&stream, &target);
        reader
            .totals
            .push_connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!("live stream: pushing to the reader at {target}");
        let ended = serve(stream, &reader, &mut header, &mut cut).await;
        match ended {
            Ended::Stopped | Ended::Cut => break ended,
            Ended::WentAway | Ended::Stalled | Ended::Closed => {
                tracing::warn!(
                    "live stream: the reader at {target} left ({}); connecting again",
                    ended.reason()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay()) => {}
                    _ = cut.changed() => break Ended::Cut,
                }
            }
        }
    };
    reader.leave();
    let sent = reader.sent.load(Ordering::Relaxed);
    let dropped = reader.dropped.load(Ordering::Relaxed);
    let line = format!(
        "live stream: pushing to {target} ended ({}): {sent} packets sent, {dropped} not \
         delivered (the reader away or reading too slowly)",
        ended.reason()
    );
    if dropped > 0 {
        tracing::warn!("{line}");
    } else {
        tracing::info!("{line}");
    }
}

/// One connection: the header once the link type is known, then the queue.
async fn serve(
    mut stream: TcpStream,
    reader: &Client,
    header: &mut watch::Receiver<Option<Bytes>>,
    cut: &mut watch::Receiver<bool>,
) -> Ended {
    let header = loop {
        if let Some(header) = header.borrow_and_update().clone() {
            break header;
        }
        if reader.queue().end {
            return Ended::Stopped;
        }
        tokio::select! {
            _ = header.changed() => {}
            _ = reader.ready.notified() => {}
            _ = cut.changed() => return Ended::Cut,
        }
    };
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&header)).await {
        Ok(Ok(())) => send_queue(stream, reader, PeerEof::Left, cut).await,
        Ok(Err(_)) => Ended::WentAway,
        Err(_) => Ended::Stalled,
    }
}
