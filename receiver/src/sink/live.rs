//! The live stream (`--serve-pcap ADDR:PORT`), PCAP-over-IP: each TCP client gets a classic
//! pcap stream (the global header, then records) of the merged packets from the moment it
//! joins, as `tshark -i TCP@host:port`, Wireshark, Arkime and Zeek read it.
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

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::InterfaceStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::pcap::{check_link_type, write_header, write_record};
use super::{OutPacket, Refusal, Sink, SinkInterface};

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
/// Turned-away clients are logged at most once in this window; the rest are counted.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Starts listening; the sink feeds the clients, the handle ends the stream at exit.
pub async fn serve(addr: SocketAddr) -> io::Result<(LiveSink, Live)> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (joining_tx, joining) = mpsc::channel(MAX_CLIENTS);
    let (cut, cut_rx) = watch::channel(false);
    let totals = Arc::new(Totals::default());
    let accept = tokio::spawn(accept(listener, joining_tx, Arc::clone(&totals), cut_rx));
    let sink = LiveSink {
        link_type: None,
        other_link_types: OtherLinkTypes::Refuse,
        served: Vec::new(),
        totals: Arc::clone(&totals),
        not_sent: NotSent::register(),
        header: None,
        records: Vec::with_capacity(2 * CHUNK),
        packets: 0,
        clients: Vec::new(),
        joining,
    };
    Ok((
        sink,
        Live {
            addr,
            accept,
            cut,
            totals,
        },
    ))
}

/// Counts over all clients, for the exit summary.
#[derive(Default)]
struct Totals {
    clients: AtomicU64,
    connected: AtomicUsize,
    sent: AtomicU64,
    dropped: AtomicU64,
    /// Packets handed to the stream while no client was connected.
    no_client: AtomicU64,
    /// Packets of interfaces whose link type the stream does not carry.
    other_link_type: AtomicU64,
}

/// The listening side, held by main: ends the stream once the sink is finished.
pub struct Live {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    cut: watch::Sender<bool>,
    totals: Arc<Totals>,
}

impl Live {
    /// Stops accepting, gives the clients a few seconds to take what is queued for them,
    /// cuts off the rest (counting what they did not get as dropped), and returns the
    /// stream's part of the exit summary.
    pub async fn close(self) -> LiveSummary {
        self.accept.abort();
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
            sent: total(&self.totals.sent),
            dropped: total(&self.totals.dropped),
            no_client: total(&self.totals.no_client),
            other_link_type: total(&self.totals.other_link_type),
        }
    }
}

/// The live stream's part of the exit summary: packets over all its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSummary {
    pub addr: SocketAddr,
    pub clients: u64,
    pub sent: u64,
    /// Not sent to clients that read too slowly.
    pub dropped: u64,
    /// Handed to the stream while no client was connected.
    pub no_client: u64,
    /// Of interfaces whose link type the stream does not carry (in the file only).
    pub other_link_type: u64,
}

impl LiveSummary {
    pub fn line(&self) -> String {
        let mut line = format!(
            "live stream {}: {} client(s), {} packets sent, {} dropped for clients that read \
             too slowly, {} not sent with no client connected",
            self.addr, self.clients, self.sent, self.dropped, self.no_client
        );
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
            "address": self.addr.to_string(),
            "clients": self.clients,
            "sent": self.sent,
            "dropped": self.dropped,
            "no_client": self.no_client,
            "other_link_type": self.other_link_type,
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

struct Client {
    peer: SocketAddr,
    queue: Mutex<Queue>,
    ready: Notify,
    dropped: AtomicU64,
    totals: Arc<Totals>,
}

impl Client {
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
            self.dropped.fetch_add(chunk.packets, Ordering::Relaxed);
            self.totals
                .dropped
                .fetch_add(chunk.packets, Ordering::Relaxed);
            return;
        }
        q.bytes += chunk.data.len();
        q.chunks.push_back(chunk.clone());
        drop(q);
        self.ready.notify_one();
    }

    fn end(&self) {
        self.queue().end = true;
        self.ready.notify_one();
    }

    fn is_gone(&self) -> bool {
        self.queue().gone
    }
}

/// Accepts clients and hands them to the sink, which takes them in at its next flush.
async fn accept(
    listener: TcpListener,
    joining: mpsc::Sender<Arc<Client>>,
    totals: Arc<Totals>,
    cut: watch::Receiver<bool>,
) {
    let mut refusals = Throttle::default();
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
            refusals.refused(
                peer,
                format_args!("{MAX_CLIENTS} clients already connected"),
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!("live stream: no keepalive for {peer}: {e}");
        }
        let client = Arc::new(Client {
            peer,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
            totals: Arc::clone(&totals),
        });
        if joining.try_send(Arc::clone(&client)).is_err() {
            refusals.refused(peer, format_args!("too many clients joining at once"));
            continue;
        }
        totals.clients.fetch_add(1, Ordering::Relaxed);
        totals.connected.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(send_to(stream, client, cut.clone()));
    }
}

/// Sends a client its queue until it leaves, the stream ends, or it is cut off at exit.
async fn send_to(mut stream: TcpStream, client: Arc<Client>, mut cut: watch::Receiver<bool>) {
    let (mut from, mut to) = stream.split();
    let mut ignored = [0u8; 512];
    let mut sent = 0u64;
    let reason = loop {
        let next = {
            let mut q = client.queue();
            match q.chunks.pop_front() {
                Some(chunk) => {
                    q.bytes -= chunk.data.len();
                    Some(chunk)
                }
                None if q.end => break "the receiver stopped",
                None => None,
            }
        };
        match next {
            Some(chunk) => tokio::select! {
                written = tokio::time::timeout(WRITE_TIMEOUT, to.write_all(&chunk.data)) => {
                    match written {
                        Ok(Ok(())) => {
                            sent += chunk.packets;
                            client.totals.sent.fetch_add(chunk.packets, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => break "it went away",
                        Err(_) => {
                            client.queue().chunks.push_front(chunk);
                            break "it took nothing for 30 s";
                        }
                    }
                }
                _ = cut.changed() => {
                    client.queue().chunks.push_front(chunk);
                    break "cut off at exit";
                }
            },
            None => tokio::select! {
                _ = client.ready.notified() => {}
                // Clients have nothing to say; reading notices when one leaves.
                read = from.read(&mut ignored) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        break "it closed the connection";
                    }
                }
                _ = cut.changed() => break "cut off at exit",
            },
        }
    };
    let unsent: u64 = {
        let mut q = client.queue();
        q.gone = true;
        q.bytes = 0;
        q.chunks.drain(..).map(|c| c.packets).sum()
    };
    if unsent > 0 {
        client.dropped.fetch_add(unsent, Ordering::Relaxed);
        client.totals.dropped.fetch_add(unsent, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    let dropped = client.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!(
            "live stream: client {} left ({reason}): {sent} packets sent, {dropped} dropped \
             because it read too slowly",
            client.peer
        );
    } else {
        tracing::info!(
            "live stream: client {} left ({reason}): {sent} packets sent, 0 dropped",
            client.peer
        );
    }
    client.totals.connected.fetch_sub(1, Ordering::Relaxed);
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
    other_link_types: OtherLinkTypes,
    /// Whether each interface added (by its index) is of the stream's link type.
    served: Vec<bool>,
    totals: Arc<Totals>,
    not_sent: NotSent,
    header: Option<Chunk>,
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
        write_header(&mut header, link_type).expect("writing to a Vec cannot fail");
        let header = Chunk {
            data: Bytes::from(header),
            packets: 0,
        };
        for client in &self.clients {
            client.offer(&header, true);
        }
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
        write_record(&mut self.records, packet)?;
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

    fn iface(link_type: u16) -> SinkInterface {
        SinkInterface {
            name: "h/eth0".into(),
            link_type,
            snaplen: 262_144,
            filter: String::new(),
            description: String::new(),
            sensor: "s".into(),
            session: "0a1b2c3d".into(),
        }
    }

    #[tokio::test]
    async fn a_client_gets_the_header_then_the_packets_from_its_joining_on() {
        let (mut sink, live) = serve("127.0.0.1:5330".parse().unwrap()).await.unwrap();
        let mut client = TcpStream::connect(live.addr).await.unwrap();
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
        }
    }

    /// Beside a file, with --link-type: a first sensor of another link type does not decide
    /// the stream's; its packets are skipped and counted, as are packets with no client.
    #[tokio::test]
    async fn beside_a_file_other_link_types_are_skipped_and_counted() {
        let (sink, live) = serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut sink = sink.with_link_type(Some(1)).beside_a_file();
        assert!(sink.check(&[iface(276)]).is_ok(), "not refused");
        let cooked = sink.add_interface(&iface(276)).unwrap();
        let ethernet = sink.add_interface(&iface(1)).unwrap();
        // No client yet: counted as sent to no one.
        sink.write_packet(&packet(ethernet)).unwrap();
        let mut client = TcpStream::connect(live.addr).await.unwrap();
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
        let (sink, _live) = serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let sink = sink.with_link_type(Some(1));
        assert!(sink.check(&[iface(276)]).is_err());
        assert!(sink.check(&[iface(1)]).is_ok());
    }
}
