//! The live stream, PCAP-over-IP: each TCP client of `--serve-pcap ADDR:PORT` gets a classic
//! pcap stream (the global header, then records) of the merged packets from the moment it
//! joins, as `tshark -i TCP@host:port`, Wireshark, Arkime and Zeek read it; `--push-pcap
//! HOST:PORT` sends the same to a reader that listens (Arkime's `pcap-over-ip-server`),
//! connecting again whenever it goes away. Timestamps are in microseconds unless asked
//! otherwise, since every reader takes those. With `--serve-pcap-tls`, clients speak TLS
//! (the receiver's certificate) and send the viewer token as their first line
//! ([`listen`]).
//!
//! Best effort by design: a client never slows capture, the file or other clients. Each
//! has a bounded queue; when it is full, that client's packets are dropped and counted, and
//! the count is logged when it leaves and in the exit summary. Handing packets to the
//! stream never fails, so without a file it is what acknowledges the sensors' batches.
//! What it cannot send is counted, never silent: packets with no client connected, and,
//! beside a file, packets of interfaces whose link type the stream does not carry.
//!
//! Clients that stop reading, or vanish without closing (half-open), are dropped: TCP
//! keepalive finds the vanished, a write timeout the silent.

mod listen;
mod push;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::InterfaceStats;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::pcap::{check_link_type, write_header, write_record, Precision};
use super::{OutPacket, Refusal, Sink, SinkInterface};
use crate::viewer_token::ViewerToken;

/// Clients served at once; more are turned away (and logged).
pub const MAX_CLIENTS: usize = 64;
/// Data queued for one client beyond what its socket holds. Past it, that client's
/// packets are dropped; about 130 ms of a saturated 1 Gbit/s link.
pub const CLIENT_QUEUE: usize = 16 << 20;
/// Records go to the clients in chunks of about this size, and at every flush.
const CHUNK: usize = 64 << 10;
/// How long clients get at exit to take what is queued for them.
const DRAIN: Duration = Duration::from_secs(5);
/// A client that takes nothing of a chunk for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive: probes after this long idle, then every [`KEEPALIVE_INTERVAL`]; a
/// vanished client is dropped after [`KEEPALIVE_PROBES`] unanswered ones.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// What the live stream serves, where, and how.
pub struct Stream {
    /// `--serve-pcap`: where clients connect, if anywhere.
    pub listen: Option<SocketAddr>,
    /// `--serve-pcap-tls`: clients must speak TLS and send the viewer token.
    pub secure: Option<Secure>,
    /// `--push-pcap HOST:PORT`: a reader this receiver connects to, if any.
    pub push: Option<String>,
    /// `--serve-pcap-precision`.
    pub precision: Precision,
}

/// TLS with the receiver's certificate, and the viewer token each client must send.
#[derive(Clone)]
pub struct Secure {
    pub tls: Arc<rustls::ServerConfig>,
    pub viewer: Arc<ViewerToken>,
}

/// Starts listening and pushing; the sink feeds the clients, the handle ends the stream at
/// exit.
pub async fn serve(stream: Stream) -> io::Result<(LiveSink, Live)> {
    let listener = match stream.listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let (joining_tx, joining) = mpsc::channel(MAX_CLIENTS);
    let (cut, cut_rx) = watch::channel(false);
    let (header_tx, header_rx) = watch::channel(None);
    let totals = Arc::new(Totals::default());
    describe_metrics();
    let accept = listener.map(|listener| {
        tokio::spawn(listen::accept(
            listener,
            stream.secure,
            joining_tx,
            Arc::clone(&totals),
            cut_rx.clone(),
        ))
    });
    let mut clients = Vec::new();
    if let Some(target) = &stream.push {
        let client = Arc::new(Client::new(Peer::Reader(target.clone()), &totals));
        totals.connected.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(push::run(
            target.clone(),
            Arc::clone(&client),
            header_rx,
            cut_rx,
        ));
        clients.push(client);
    }
    let sink = LiveSink {
        link_type: None,
        precision: stream.precision,
        other_link_types: OtherLinkTypes::Refuse,
        served: Vec::new(),
        totals: Arc::clone(&totals),
        not_sent: NotSent::register(),
        header: None,
        header_tx,
        records: Vec::with_capacity(2 * CHUNK),
        packets: 0,
        clients,
        joining,
    };
    Ok((
        sink,
        Live {
            addr,
            push: stream.push,
            accept,
            cut,
            totals,
        },
    ))
}

/// Packets sent, and not sent (dropped), to some clients.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// Counts over all clients, for the exit summary.
#[derive(Default)]
struct Totals {
    clients: AtomicU64,
    /// Connections refused: no or a wrong viewer token, a failed TLS handshake.
    refused: AtomicU64,
    /// Clients connected, and the reader pushed to, until its task ends.
    connected: AtomicUsize,
    /// The clients that connected.
    served: Counts,
    /// The reader pushed to (`--push-pcap`).
    pushed: Counts,
    /// Connections made to the reader pushed to.
    push_connections: AtomicU64,
    /// Packets handed to the stream while no client was connected.
    no_client: AtomicU64,
    /// Packets of interfaces whose link type the stream does not carry.
    other_link_type: AtomicU64,
}

/// The listening side, held by main: ends the stream once the sink is finished.
pub struct Live {
    /// Where clients connect (`--serve-pcap`).
    pub addr: Option<SocketAddr>,
    /// The reader pushed to (`--push-pcap`).
    pub push: Option<String>,
    accept: Option<JoinHandle<()>>,
    cut: watch::Sender<bool>,
    totals: Arc<Totals>,
}

impl Live {
    /// Stops accepting, gives the clients a few seconds to take what is queued for them,
    /// cuts off the rest (counting what they did not get as dropped), and returns the
    /// stream's part of the exit summary.
    pub async fn close(self) -> LiveSummary {
        if let Some(accept) = &self.accept {
            accept.abort();
        }
        let connected = || self.totals.connected.load(Ordering::Relaxed);
        let deadline = Instant::now() + DRAIN;
        while connected() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if connected() > 0 {
            let _ = self.cut.send(true);
            let deadline = Instant::now() + Duration::from_secs(1);
            while connected() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let total = |n: &AtomicU64| n.load(Ordering::Relaxed);
        LiveSummary {
            addr: self.addr,
            clients: total(&self.totals.clients),
            refused: total(&self.totals.refused),
            sent: total(&self.totals.served.sent),
            dropped: total(&self.totals.served.dropped),
            no_client: total(&self.totals.no_client),
            other_link_type: total(&self.totals.other_link_type),
            push: self.push.map(|target| PushSummary {
                target,
                connections: total(&self.totals.push_connections),
                sent: total(&self.totals.pushed.sent),
                not_delivered: total(&self.totals.pushed.dropped),
            }),
        }
    }
}

/// The live stream's part of the exit summary: packets over all its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSummary {
    /// Where clients connected (`--serve-pcap`), if anywhere.
    pub addr: Option<SocketAddr>,
    pub clients: u64,
    /// Connections refused: no or a wrong viewer token, a failed TLS handshake.
    pub refused: u64,
    pub sent: u64,
    /// Not sent to clients that read too slowly.
    pub dropped: u64,
    /// Handed to the stream while no client was connected.
    pub no_client: u64,
    /// Of interfaces whose link type the stream does not carry (in the file only).
    pub other_link_type: u64,
    /// `--push-pcap`.
    pub push: Option<PushSummary>,
}

/// What went to the reader pushed to (`--push-pcap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSummary {
    pub target: String,
    pub connections: u64,
    pub sent: u64,
    /// Dropped while the reader was away or read too slowly, or left at exit.
    pub not_delivered: u64,
}

impl LiveSummary {
    pub fn line(&self) -> String {
        let mut line = String::from("live stream");
        if let Some(addr) = self.addr {
            line += &format!(
                " {addr}: {} client(s), {} packets sent, {} dropped for clients that read too \
                 slowly",
                self.clients, self.sent, self.dropped
            );
            if self.refused > 0 {
                line += &format!(", {} connection(s) refused", self.refused);
            }
            line += ",";
        }
        if let Some(push) = &self.push {
            line += &format!(
                " pushed to {}: {} connection(s), {} packets sent, {} not delivered (the \
                 reader away or reading too slowly),",
                push.target, push.connections, push.sent, push.not_delivered
            );
        }
        line += &format!(" {} not sent with no client connected", self.no_client);
        if self.other_link_type > 0 {
            line += &format!(
                ", {} not sent being of another link type (in the file only)",
                self.other_link_type
            );
        }
        line
    }

    /// The figures of [`LiveSummary::line`] for `--summary-json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.addr.map(|a| a.to_string()),
            "clients": self.clients,
            "refused": self.refused,
            "sent": self.sent,
            "dropped": self.dropped,
            "no_client": self.no_client,
            "other_link_type": self.other_link_type,
            "push": self.push.as_ref().map(|p| serde_json::json!({
                "target": p.target,
                "connections": p.connections,
                "sent": p.sent,
                "not_delivered": p.not_delivered,
            })),
        })
    }
}

/// Records ready to send: whole records only, so a client that misses one still reads on.
#[derive(Clone)]
struct Chunk {
    data: Bytes,
    packets: u64,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// The client left: nothing more for it.
    gone: bool,
    /// The stream ended: send what is queued, then close.
    end: bool,
}

/// Who a client is, for the log.
enum Peer {
    /// Connected to `--serve-pcap`.
    Client(SocketAddr),
    /// The reader of `--push-pcap`, which every connection made to it serves in turn.
    Reader(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(addr) => addr.fmt(f),
            Self::Reader(target) => f.write_str(target),
        }
    }
}

struct Client {
    peer: Peer,
    queue: Mutex<Queue>,
    ready: Notify,
    /// Packets sent to it, and dropped for it, over all its connections.
    sent: AtomicU64,
    dropped: AtomicU64,
    totals: Arc<Totals>,
}

impl Client {
    fn new(peer: Peer, totals: &Arc<Totals>) -> Self {
        Self {
            peer,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            totals: Arc::clone(totals),
        }
    }

    /// The reader pushed to gets the header at each connection, not in its queue.
    fn is_pushed_to(&self) -> bool {
        matches!(self.peer, Peer::Reader(_))
    }

    fn counts(&self) -> &Counts {
        match self.peer {
            Peer::Client(_) => &self.totals.served,
            Peer::Reader(_) => &self.totals.pushed,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding it would leave plain data, still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `chunk`, or drops it (counted) if the queue is full and `always` is false.
    fn offer(&self, chunk: &Chunk, always: bool) {
        let mut q = self.queue();
        if q.gone {
            return;
        }
        if !always && q.bytes + chunk.data.len() > CLIENT_QUEUE {
            drop(q);
            self.count_dropped(chunk.packets);
            return;
        }
        q.bytes += chunk.data.len();
        q.chunks.push_back(chunk.clone());
        drop(q);
        self.ready.notify_one();
    }

    fn count_dropped(&self, packets: u64) {
        self.dropped.fetch_add(packets, Ordering::Relaxed);
        self.counts().dropped.fetch_add(packets, Ordering::Relaxed);
        if self.is_pushed_to() {
            metrics::counter!(PUSH_NOT_DELIVERED).increment(packets);
        }
    }

    fn end(&self) {
        self.queue().end = true;
        self.ready.notify_one();
    }

    fn is_gone(&self) -> bool {
        self.queue().gone
    }

    /// The client is let go: what is still queued for it is dropped, counted.
    fn leave(&self) {
        let unsent: u64 = {
            let mut q = self.queue();
            q.gone = true;
            q.bytes = 0;
            q.chunks.drain(..).map(|c| c.packets).sum()
        };
        if unsent > 0 {
            self.count_dropped(unsent);
        }
        self.totals.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

const PUSH_NOT_DELIVERED: &str = "capstream_receiver_push_not_delivered_total";
/// `--serve-pcap-tls` clients refused.
const LIVE_REFUSED: &str = "capstream_receiver_live_refused_total";

/// The help of the stream's own counters (those of what it did not send: [`NotSent`]).
fn describe_metrics() {
    metrics::describe_counter!(
        PUSH_NOT_DELIVERED,
        "Packets the reader of --push-pcap did not get: away, or reading too slowly."
    );
    metrics::describe_counter!(
        LIVE_REFUSED,
        "Live-stream clients refused: no or a wrong viewer token, a failed TLS handshake."
    );
}

/// Why a connection to a client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The stream ended and the client got all of it.
    Stopped,
    WentAway,
    Stalled,
    Cut,
    /// It closed its side (the reader pushed to, or a plain client: they say nothing).
    Closed,
}

impl Ended {
    fn reason(self) -> &'static str {
        match self {
            Self::Stopped => "the receiver stopped",
            Self::WentAway => "it went away",
            Self::Stalled => "it took nothing for 30 s",
            Self::Cut => "cut off at exit",
            Self::Closed => "it closed the connection",
        }
    }
}

/// What the end of what a peer sends means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerEof {
    /// It left: clients that never send anything.
    Left,
    /// It will send nothing more, and reads on: a TLS client that sent its token from a
    /// file (socat shuts its sending side at the file's end).
    HalfClose,
}

/// Sends `client` its queue over `stream` until the stream ends, the connection fails or
/// stalls, or it is cut off at exit. What the peer sends is read and ignored: reading
/// notices when it leaves. A chunk not wholly written stays first in the queue.
async fn send_queue<S: AsyncRead + AsyncWrite>(
    stream: S,
    client: &Client,
    eof: PeerEof,
    cut: &mut watch::Receiver<bool>,
) -> Ended {
    let (mut from, mut to) = tokio::io::split(stream);
    let mut ignored = [0u8; 512];
    let mut reading = true;
    let ended = loop {
        let next = {
            let mut q = client.queue();
            match q.chunks.pop_front() {
                Some(chunk) => {
                    q.bytes -= chunk.data.len();
                    Some(chunk)
                }
                None if q.end => break Ended::Stopped,
                None => None,
            }
        };
        match next {
            Some(chunk) => {
                let ended = tokio::select! {
                    written = tokio::time::timeout(WRITE_TIMEOUT, to.write_all(&chunk.data)) => {
                        match written {
                            Ok(Ok(())) => {
                                client.sent.fetch_add(chunk.packets, Ordering::Relaxed);
                                client.counts().sent.fetch_add(chunk.packets, Ordering::Relaxed);
                                None
                            }
                            Ok(Err(_)) => Some(Ended::WentAway),
                            Err(_) => Some(Ended::Stalled),
                        }
                    }
                    _ = cut.changed() => Some(Ended::Cut),
                };
                if let Some(ended) = ended {
                    let mut q = client.queue();
                    q.bytes += chunk.data.len();
                    q.chunks.push_front(chunk);
                    break ended;
                }
            }
            None => tokio::select! {
                _ = client.ready.notified() => {}
                read = from.read(&mut ignored), if reading => match (read, eof) {
                    (Ok(n), _) if n > 0 => {}
                    (Ok(_), PeerEof::HalfClose) => reading = false,
                    (Ok(_), PeerEof::Left) => break Ended::Closed,
                    (Err(_), _) => break Ended::WentAway,
                },
                _ = cut.changed() => break Ended::Cut,
            },
        }
    };
    let _ = to.shutdown().await;
    ended
}

/// Sets what every connection to a client gets: no delay, keepalive.
fn tune(stream: &TcpStream, peer: &str) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!("live stream: no keepalive for {peer}: {e}");
    }
}

/// `capstream_receiver_live_not_sent_total` by reason, registered once.
struct NotSent {
    no_client: metrics::Counter,
    other_link_type: metrics::Counter,
}

impl NotSent {
    fn register() -> Self {
        const NAME: &str = "capstream_receiver_live_not_sent_total";
        metrics::describe_counter!(
            NAME,
            "Packets the live stream did not send: no client connected, or of another link \
             type than the stream's (beside a file that holds them)."
        );
        Self {
            no_client: metrics::counter!(NAME, "reason" => "no_client"),
            other_link_type: metrics::counter!(NAME, "reason" => "link_type"),
        }
    }
}

/// What the stream does with a sensor interface of another link type than its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtherLinkTypes {
    /// The stream is the only output: the sensor is refused (its packets would go nowhere).
    Refuse,
    /// Beside a file that holds them: the stream skips them, counted.
    Skip,
}

/// Formats the merged packets once and hands them to every client.
pub struct LiveSink {
    /// `--link-type`, else fixed by the first interface, as in a pcap file.
    link_type: Option<u16>,
    precision: Precision,
    other_link_types: OtherLinkTypes,
    /// Whether each interface added (by its index) is of the stream's link type.
    served: Vec<bool>,
    totals: Arc<Totals>,
    not_sent: NotSent,
    header: Option<Chunk>,
    /// The header again, for each connection to the reader pushed to.
    header_tx: watch::Sender<Option<Bytes>>,
    /// Records since the last chunk.
    records: Vec<u8>,
    packets: u64,
    clients: Vec<Arc<Client>>,
    joining: mpsc::Receiver<Arc<Client>>,
}

impl LiveSink {
    /// Carries `link_type` (`--link-type`) rather than the first sensor's.
    pub fn with_link_type(mut self, link_type: Option<u16>) -> Self {
        if let Some(link_type) = link_type {
            self.start(link_type);
        }
        self
    }

    /// Beside a file, which holds every interface: interfaces of another link type are
    /// skipped (counted) rather than refused.
    pub fn beside_a_file(mut self) -> Self {
        self.other_link_types = OtherLinkTypes::Skip;
        self
    }

    /// Fixes the link type and makes the header every client starts with.
    fn start(&mut self, link_type: u16) {
        let mut header = Vec::with_capacity(24);
        write_header(&mut header, link_type, self.precision).expect("writing to a Vec cannot fail");
        let header = Chunk {
            data: Bytes::from(header),
            packets: 0,
        };
        for client in self.clients.iter().filter(|c| !c.is_pushed_to()) {
            client.offer(&header, true);
        }
        self.header_tx.send_replace(Some(header.data.clone()));
        self.header = Some(header);
        self.link_type = Some(link_type);
    }

    /// Takes in the clients that connected since the last flush; they start with the
    /// header.
    fn admit(&mut self) {
        while let Ok(client) = self.joining.try_recv() {
            tracing::info!("live stream: client {} joined", client.peer);
            if let Some(header) = &self.header {
                client.offer(header, true);
            }
            self.clients.push(client);
        }
    }

    /// Hands the records so far to every client, as one shared buffer.
    fn seal(&mut self) {
        if self.records.is_empty() {
            return;
        }
        let chunk = Chunk {
            data: Bytes::from(std::mem::replace(
                &mut self.records,
                Vec::with_capacity(2 * CHUNK),
            )),
            packets: std::mem::take(&mut self.packets),
        };
        for client in &self.clients {
            client.offer(&chunk, false);
        }
    }
}

impl Sink for LiveSink {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        match self.other_link_types {
            OtherLinkTypes::Skip => Ok(()),
            OtherLinkTypes::Refuse => check_link_type(
                self.link_type,
                interfaces,
                "the live stream (--serve-pcap) is classic pcap",
                "a live stream holds one link type: serve this sensor from a receiver of its own",
            ),
        }
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        if self.link_type.is_none() {
            self.start(interface.link_type);
        }
        self.served
            .push(self.link_type == Some(interface.link_type));
        Ok(self.served.len() as u32 - 1)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        if !self
            .served
            .get(packet.interface as usize)
            .copied()
            .unwrap_or(false)
        {
            self.totals.other_link_type.fetch_add(1, Ordering::Relaxed);
            self.not_sent.other_link_type.increment(1);
            return Ok(());
        }
        if self.clients.is_empty() {
            self.totals.no_client.fetch_add(1, Ordering::Relaxed);
            self.not_sent.no_client.increment(1);
            return Ok(());
        }
        write_record(&mut self.records, packet, self.precision)?;
        self.packets += 1;
        if self.records.len() >= CHUNK {
            self.seal();
        }
        Ok(())
    }

    fn write_stats(&mut self, _interface: u32, _stats: &InterfaceStats) -> io::Result<()> {
        // Classic pcap has no place for counters.
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal();
        self.clients.retain(|c| !c.is_gone());
        self.admit();
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.seal();
        // Whoever connected until now gets the header and the end; later ones are refused.
        self.joining.close();
        self.admit();
        for client in &self.clients {
            client.end();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use pcap_file::pcap::PcapReader;
    use protocol::Direction;

    use super::*;

    /// A plain stream on `addr`, in nanoseconds so that timestamps read back exactly.
    fn plain(addr: &str) -> Stream {
        Stream {
            listen: Some(addr.parse().unwrap()),
            secure: None,
            push: None,
            precision: Precision::Nano,
        }
    }

    fn iface(link_type: u16) -> SinkInterface {
        SinkInterface {
            name: "h/eth0".into(),
            link_type,
            snaplen: 262_144,
            filter: String::new(),
            description: String::new(),
            sensor: "s".into(),
            session: "0a1b2c3d".into(),
            session_id: 0x0a1b_2c3d,
        }
    }

    #[tokio::test]
    async fn a_client_gets_the_header_then_the_packets_from_its_joining_on() {
        let (mut sink, live) = serve(plain("127.0.0.1:5330")).await.unwrap();
        let mut client = TcpStream::connect(live.addr.unwrap()).await.unwrap();
        while sink.clients.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sink.flush().unwrap();
        }
        let idx = sink.add_interface(&iface(1)).unwrap();
        assert!(matches!(
            sink.check(&[iface(276)]),
            Err(Refusal::LinkType(why)) if why.contains("--serve-pcap")
        ));
        for t in 1..=3u64 {
            sink.write_packet(&OutPacket {
                interface: idx,
                timestamp_ns: t,
                original_len: 60,
                direction: Direction::Unknown,
                data: &[t as u8; 60],
                batch: Default::default(),
                process: None,
            })
            .unwrap();
        }
        Box::new(sink).finish().unwrap();
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).await.unwrap();
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        let mut times = Vec::new();
        while let Some(p) = reader.next_packet() {
            times.push(p.unwrap().timestamp().as_nanos());
        }
        assert_eq!(times, [1, 2, 3]);
        let summary = live.close().await;
        assert_eq!((summary.clients, summary.sent, summary.dropped), (1, 3, 0));
        let line = summary.line();
        assert!(
            line.contains("1 client(s), 3 packets sent, 0 dropped"),
            "{line}"
        );
        assert_eq!(summary.json()["sent"], 3);
    }

    fn packet(interface: u32) -> OutPacket<'static> {
        OutPacket {
            interface,
            timestamp_ns: 1,
            original_len: 60,
            direction: Direction::Unknown,
            data: &[0; 60],
            batch: Default::default(),
            process: None,
        }
    }

    /// Beside a file, with --link-type: a first sensor of another link type does not decide
    /// the stream's; its packets are skipped and counted, as are packets with no client.
    #[tokio::test]
    async fn beside_a_file_other_link_types_are_skipped_and_counted() {
        let (sink, live) = serve(plain("127.0.0.1:0")).await.unwrap();
        let mut sink = sink.with_link_type(Some(1)).beside_a_file();
        assert!(sink.check(&[iface(276)]).is_ok(), "not refused");
        let cooked = sink.add_interface(&iface(276)).unwrap();
        let ethernet = sink.add_interface(&iface(1)).unwrap();
        // No client yet: counted as sent to no one.
        sink.write_packet(&packet(ethernet)).unwrap();
        let mut client = TcpStream::connect(live.addr.unwrap()).await.unwrap();
        while sink.clients.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sink.flush().unwrap();
        }
        for interface in [cooked, ethernet, cooked] {
            sink.write_packet(&packet(interface)).unwrap();
        }
        Box::new(sink).finish().unwrap();
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).await.unwrap();
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        assert_eq!(u32::from(reader.header().datalink), 1);
        let mut n = 0;
        while let Some(p) = reader.next_packet() {
            p.unwrap();
            n += 1;
        }
        assert_eq!(n, 1, "only the Ethernet packet");
        let summary = live.close().await.line();
        assert!(
            summary.contains("1 packets sent")
                && summary.contains("1 not sent with no client connected")
                && summary.contains("2 not sent being of another link type"),
            "{summary}"
        );
    }

    /// Alone, the stream refuses a sensor of another link type than --link-type's, even
    /// the first.
    #[tokio::test]
    async fn alone_a_given_link_type_refuses_the_first_other_sensor() {
        let (sink, _live) = serve(plain("127.0.0.1:0")).await.unwrap();
        let sink = sink.with_link_type(Some(1));
        assert!(sink.check(&[iface(276)]).is_err());
        assert!(sink.check(&[iface(1)]).is_ok());
    }

    /// --push-pcap: each connection to the reader starts with the header (microseconds by
    /// default); what waited while it was away follows; a reader that closes is connected
    /// to again.
    #[tokio::test]
    async fn the_reader_pushed_to_gets_the_header_at_each_connection() {
        let reader = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = Stream {
            listen: None,
            secure: None,
            push: Some(reader.local_addr().unwrap().to_string()),
            precision: Precision::Micro,
        };
        let (mut sink, live) = serve(stream).await.unwrap();
        let idx = sink.add_interface(&iface(1)).unwrap();
        let (mut first, _) = reader.accept().await.unwrap();
        let write = |sink: &mut LiveSink, timestamp_ns| {
            sink.write_packet(&OutPacket {
                timestamp_ns,
                ..packet(idx)
            })
            .unwrap();
            sink.flush().unwrap();
        };
        write(&mut sink, 1_500_000_000_123_456_789);
        let mut bytes = vec![0u8; 24 + 16 + 60];
        first.read_exact(&mut bytes).await.unwrap();
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_ne_bytes());
        let mut reader_view = PcapReader::new(&bytes[..]).unwrap();
        let p = reader_view.next_packet().unwrap().unwrap();
        assert_eq!(p.timestamp().as_nanos(), 1_500_000_000_123_456_000);
        assert_eq!((p.data().len(), p.orig_len()), (60, 60));
        drop(first);

        let (mut second, _) = reader.accept().await.unwrap();
        write(&mut sink, 2_000);
        Box::new(sink).finish().unwrap();
        let mut bytes = Vec::new();
        second.read_to_end(&mut bytes).await.unwrap();
        let mut again = PcapReader::new(&bytes[..]).unwrap();
        let p = again.next_packet().unwrap().unwrap();
        assert_eq!(p.timestamp().as_nanos(), 2_000);
        assert!(again.next_packet().is_none());
        let summary = live.close().await;
        let push = summary.push.clone().unwrap();
        assert_eq!((push.connections, push.sent, push.not_delivered), (2, 2, 0));
        assert_eq!(summary.json()["push"]["sent"], 2);
        let line = summary.line();
        assert!(
            line.contains("2 connection(s), 2 packets sent, 0 not delivered"),
            "{line}"
        );
    }
}
