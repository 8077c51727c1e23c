//! On-demand captures: the receiver opens a stream on the sensor's connection for each,
//! asking for an interface, a tcpdump filter and a limit (see `protocol::CaptureRequest`).
//! Each runs a capture backend of its own (its own in-kernel filter, as --mode says) on a
//! thread of its own, with its own counters, and streams its batches back on that stream
//! until a limit is reached or the receiver lets go. Only with `--allow-on-demand`; every
//! request is logged with who asked.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use program::names::clean;
use protocol::{
    BatchBuilder, CaptureEnded, CaptureLimits, CaptureRequest, CaptureStarted, DropReason,
    ErrorCode, ErrorMsg, Message,
};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::batcher::{Backpressure, Batcher, Outgoing, SessionBatching};
use crate::capture::{self, CaptureBackend, Mode, Source};
use crate::privileges::{Capability, Need};
use crate::stats::Counters;

/// Batches between an on-demand capture's thread and its stream.
const CHANNEL_BATCHES: usize = 16;
/// How long the receiver has to send its request on a stream it opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the receiver has to take a capture's last words.
const LINGER: Duration = Duration::from_secs(5);

/// What the sensor allows of on-demand captures, and how it opens them.
pub struct OnDemand {
    /// `--allow-on-demand`: without it every request is refused.
    pub allowed: bool,
    /// The host's interfaces, as listed to viewers.
    pub available: Vec<String>,
    mode: Mode,
    /// The options of the standing capture: the own flow excluded, ring size, XDP mode;
    /// the filter and snap length are each request's.
    template: capture::Options,
    batch_size: usize,
    flush_interval: Duration,
    max_duration: Duration,
    max_rate: Option<u64>,
    max_captures: u32,
    running: AtomicU32,
    next_id: AtomicU64,
    /// Since the sensor started: captures ended, packets they sent, packets they lost.
    ended: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// The sensor's settings for on-demand captures (from its command line).
pub struct Settings {
    pub allowed: bool,
    /// Whether it captures live, so that its host's interfaces are listed to viewers.
    pub live: bool,
    pub mode: Mode,
    pub template: capture::Options,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub max_duration: Duration,
    pub max_rate: Option<u64>,
    pub max_captures: u32,
}

impl OnDemand {
    pub fn new(settings: Settings) -> Self {
        Self {
            allowed: settings.allowed,
            available: if settings.live {
                host_interfaces()
            } else {
                Vec::new()
            },
            mode: settings.mode,
            template: settings.template,
            batch_size: settings.batch_size,
            flush_interval: settings.flush_interval,
            max_duration: settings.max_duration,
            max_rate: settings.max_rate,
            max_captures: settings.max_captures,
            running: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            ended: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The exit summary's line of on-demand captures, once any was asked for.
    pub fn summary_line(&self) -> Option<String> {
        let ended = self.ended.load(Relaxed);
        (self.allowed && self.next_id.load(Relaxed) > 1).then(|| {
            format!(
                "summary: on-demand: {ended} capture(s) ended, {} packets sent, {} dropped",
                self.sent.load(Relaxed),
                self.dropped.load(Relaxed)
            )
        })
    }

    /// Serves the streams the receiver opens on `conn` until it closes.
    pub async fn serve(self: Arc<Self>, conn: Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(Arc::clone(&self).serve_stream(send, recv));
        }
    }

    async fn serve_stream(self: Arc<Self>, mut send: SendStream, mut recv: RecvStream) {
        let mut buf = BytesMut::new();
        let first = tokio::time::timeout(
            REQUEST_TIMEOUT,
            program::frames::read_message(&mut recv, &mut buf),
        )
        .await;
        let request = match first {
            Ok(Ok(Some(Message::CaptureRequest(request)))) => request,
            Ok(Ok(other)) => {
                let what = other.map_or("nothing".into(), |m| format!("{:?}", m.message_type()));
                return tracing::warn!("on-demand: the receiver sent {what} instead of a request");
            }
            Ok(Err(why)) => return tracing::warn!("on-demand: a request stream broke: {why}"),
            Err(_) => return tracing::warn!("on-demand: the receiver sent no request in time"),
        };
        let who = clean(&request.requested_by);
        let interface = request
            .targets
            .first()
            .map(|t| clean(&t.interface))
            .unwrap_or_default();
        tracing::info!(
            "on-demand capture asked by {who}: {interface}, filter \"{}\", {}",
            clean(&request.filter),
            describe_limits(&request.limits)
        );
        let opened = self.open(&request, &interface).await;
        let (backend, slot) = match opened {
            Ok(opened) => opened,
            Err(why) => {
                tracing::warn!("on-demand capture asked by {who} refused: {why}");
                let refusal = Message::Error(ErrorMsg {
                    code: ErrorCode::CAPTURE_REFUSED,
                    message: why,
                });
                let _ = send.write_all(&refusal.to_bytes()).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(LINGER, send.stopped()).await;
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Relaxed);
        tracing::info!("on-demand capture {id} started for {who} on {interface}");
        let limits = self.capped(request.limits);
        let (reason, stats) = self.run(id, backend, limits, &mut send, &mut recv).await;
        drop(slot);
        tracing::info!(
            "on-demand capture {id} for {who} on {interface} ended ({reason}): {} packets sent, \
             {} matched, {} dropped",
            stats.delivered,
            stats.matched,
            stats.dropped()
        );
        let ended = Message::CaptureEnded(CaptureEnded { reason, stats });
        let _ = send.write_all(&ended.to_bytes()).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    }

    /// The request's limits, with the sensor's duration cap.
    fn capped(&self, mut limits: CaptureLimits) -> CaptureLimits {
        let cap = u64::try_from(self.max_duration.as_millis()).unwrap_or(u64::MAX);
        if limits.duration_ms == 0 || limits.duration_ms > cap {
            limits.duration_ms = cap;
        }
        limits
    }

    /// Opens the capture the request asks for, or says why not, in the user's terms.
    async fn open(
        self: &Arc<Self>,
        request: &CaptureRequest,
        interface: &str,
    ) -> Result<(Box<dyn CaptureBackend>, Slot<'_>), String> {
        if !self.allowed {
            return Err(
                "this sensor does not take on-demand captures (start it with --allow-on-demand)"
                    .into(),
            );
        }
        if request.targets.len() != 1 {
            return Err("a request names exactly one interface".into());
        }
        if !self.available.iter().any(|name| name == interface) {
            return Err(format!(
                "no interface \"{interface}\" on this sensor (it has: {})",
                self.available.join(", ")
            ));
        }
        let slot = Slot::take(self)?;
        let mut opts = self.template.clone();
        opts.filter = request.filter.trim().to_string();
        opts.snaplen = request.snaplen.min(self.template.snaplen);
        let (mode, name) = (self.mode, interface.to_string());
        let opened = tokio::task::spawn_blocking(move || {
            capture::open(mode, &Source::Interfaces(vec![name]), &opts)
        })
        .await
        .map_err(|e| format!("the capture could not be opened: {e}"))?;
        let mut backends = opened.map_err(|e| e.to_string())?;
        match backends.pop() {
            Some(backend) => Ok((backend, slot)),
            None => Err("the capture could not be opened".into()),
        }
    }

    /// Runs one capture to its end; returns why it ended and its counters.
    async fn run(
        &self,
        id: u64,
        mut backend: Box<dyn CaptureBackend>,
        limits: CaptureLimits,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> (String, protocol::InterfaceStats) {
        let info = backend.info().clone();
        let started = Message::CaptureStarted(CaptureStarted {
            interfaces: vec![info.clone()],
        });
        let stop = backend.stopper();
        let (tx, mut rx) = mpsc::channel(CHANNEL_BATCHES);
        let session = SessionBatching::new(
            Arc::new(AtomicU64::new(0)),
            1,
            tx,
            self.batch_size,
            self.flush_interval,
        );
        let counters = Arc::new(Counters::default());
        let batcher = Batcher::new(session, 0, Arc::clone(&counters), Backpressure::Drop);
        let thread = std::thread::Builder::new()
            .name(format!("on-demand-{id}"))
            .spawn(move || backend.run(batcher));
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                stop();
                return (
                    format!("cannot start a capture thread: {e}"),
                    counters.snapshot(0),
                );
            }
        };
        let gauge = metrics::gauge!("capstream_sensor_on_demand_captures",
            "interface" => info.name.clone());
        gauge.increment(1.0);
        let mut sent = Sent::new(limits, self.max_rate);
        let reason = if send.write_all(&started.to_bytes()).await.is_err() {
            "the receiver went away".to_string()
        } else {
            let ends_at = tokio::time::Instant::now() + Duration::from_millis(limits.duration_ms);
            let deadline = tokio::time::sleep_until(ends_at);
            tokio::pin!(deadline);
            let mut scratch = [0u8; 64];
            let duration_limit = || format!("duration limit ({} ms)", limits.duration_ms);
            loop {
                tokio::select! {
                    batch = rx.recv() => {
                        let Some(batch) = batch else { break "the capture ended".to_string() };
                        if let Some(frame) = sent.admit(batch) {
                            // A receiver that does not read cannot keep it past its end.
                            match tokio::time::timeout_at(ends_at, send.write_chunk(frame)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break "the receiver went away".to_string(),
                                Err(_) => break duration_limit(),
                            }
                        }
                        if let Some(limit) = sent.reached() {
                            break limit;
                        }
                    }
                    () = &mut deadline => break duration_limit(),
                    read = recv.read(&mut scratch) => match read {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break "stopped by the receiver".to_string(),
                    },
                }
            }
        };
        stop();
        // What the capture still hands over is past the end: not sent.
        while rx.recv().await.is_some() {}
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Ok(Ok(Err(e))) = joined {
            tracing::warn!("on-demand capture {id}: {e}");
        }
        gauge.decrement(1.0);
        let mut stats = counters.snapshot(0);
        stats.delivered = sent.packets;
        if sent.capped > 0 {
            stats.drops.push((DropReason::RATE_CAP, sent.capped));
        }
        self.ended.fetch_add(1, Relaxed);
        self.sent.fetch_add(stats.delivered, Relaxed);
        self.dropped.fetch_add(stats.dropped(), Relaxed);
        let series = |name: &'static str| metrics::counter!(name, "interface" => info.name.clone());
        series("capstream_sensor_on_demand_packets_sent_total").increment(stats.delivered);
        series("capstream_sensor_on_demand_packets_dropped_total").increment(stats.dropped());
        (reason, stats)
    }
}

/// The capabilities opening a capture in `mode` takes, kept for on-demand captures (the
/// README's Privileges table: what each mode needs to start).
pub fn needs(mode: Mode) -> Vec<Need> {
    let mut caps = vec![Capability::NetRaw];
    if mode != Mode::Pcap {
        caps.extend([Capability::Bpf, Capability::NetAdmin]);
    }
    if mode == Mode::Afxdp {
        caps.push(Capability::IpcLock);
    }
    caps.into_iter()
        .map(|cap| Need::new(cap, "to open on-demand captures"))
        .collect()
}

/// One of the `--on-demand-max-captures` places, held while a capture runs.
struct Slot<'a>(&'a AtomicU32);

impl<'a> Slot<'a> {
    fn take(on_demand: &'a OnDemand) -> Result<Self, String> {
        let max = on_demand.max_captures;
        on_demand
            .running
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .map(|_| Self(&on_demand.running))
            .map_err(|_| {
                format!(
                    "this sensor already runs {max} on-demand captures (--on-demand-max-captures)"
                )
            })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// What a capture has sent, against its limits and the rate cap.
struct Sent {
    limits: CaptureLimits,
    max_rate: Option<u64>,
    packets: u64,
    bytes: u64,
    /// Packets dropped by the rate cap.
    capped: u64,
    /// The current second of the rate cap and the bytes sent in it.
    second: (Instant, u64),
}

impl Sent {
    fn new(limits: CaptureLimits, max_rate: Option<u64>) -> Self {
        Self {
            limits,
            max_rate,
            packets: 0,
            bytes: 0,
            capped: 0,
            second: (Instant::now(), 0),
        }
    }

    /// The frame to send for `batch`: all of it, its first packets where it goes past a
    /// limit, or none when the rate cap drops it.
    fn admit(&mut self, batch: Outgoing) -> Option<Bytes> {
        let Outgoing {
            sequence,
            batch: encoded,
            ..
        } = batch;
        let now = Instant::now();
        if now.duration_since(self.second.0) >= Duration::from_secs(1) {
            self.second = (now, 0);
        }
        if self
            .max_rate
            .is_some_and(|rate| self.second.1 + encoded.raw_len as u64 > rate)
        {
            self.capped += u64::from(encoded.packets);
            return None;
        }
        let room_packets = remaining(self.limits.packets, self.packets);
        let room_bytes = remaining(self.limits.bytes, self.bytes);
        let (frame, packets, raw_len) =
            if u64::from(encoded.packets) <= room_packets && encoded.raw_len as u64 <= room_bytes {
                (
                    encoded.frame,
                    u64::from(encoded.packets),
                    encoded.raw_len as u64,
                )
            } else {
                first_packets(&encoded.frame, sequence, room_packets, room_bytes)?
            };
        self.second.1 += raw_len;
        self.packets += packets;
        self.bytes += raw_len;
        Some(frame)
    }

    /// The limit reached, if one is.
    fn reached(&self) -> Option<String> {
        let l = &self.limits;
        if l.packets > 0 && self.packets >= l.packets {
            return Some(format!("packet limit ({})", l.packets));
        }
        if l.bytes > 0 && self.bytes >= l.bytes {
            return Some(format!("byte limit ({})", l.bytes));
        }
        None
    }
}

/// How much of `limit` (0: none) is left after `used`.
fn remaining(limit: u64, used: u64) -> u64 {
    if limit == 0 {
        u64::MAX
    } else {
        limit.saturating_sub(used)
    }
}

/// A batch of the first packets of `frame` that fit in `packets` and `bytes` (of records),
/// with its packet count and record bytes. Runs once per capture, at its last batch.
fn first_packets(
    frame: &[u8],
    sequence: u64,
    packets: u64,
    bytes: u64,
) -> Option<(Bytes, u64, u64)> {
    const RECORD_HEADER_LEN: u64 = 8 + 4 + 4 + 1;
    let Ok(Some(Message::Batch(batch))) = protocol::decode_frame(&mut BytesMut::from(frame)) else {
        return None;
    };
    let mut builder = BatchBuilder::new(batch.body.len().max(1));
    let (mut taken, mut taken_bytes) = (0u64, 0u64);
    for packet in batch.packets().ok()? {
        let size = RECORD_HEADER_LEN + packet.data.len() as u64;
        if taken >= packets || taken_bytes + size > bytes {
            break;
        }
        let _ = builder.push(
            packet.timestamp_ns,
            packet.original_len,
            packet.direction,
            &packet.data,
        );
        taken += 1;
        taken_bytes += size;
    }
    if taken == 0 {
        return None;
    }
    Some((builder.finish(0, sequence, 0).frame, taken, taken_bytes))
}

fn describe_limits(limits: &CaptureLimits) -> String {
    let mut parts = Vec::new();
    if limits.duration_ms > 0 {
        parts.push(format!("for {} ms", limits.duration_ms));
    }
    if limits.packets > 0 {
        parts.push(format!("{} packets", limits.packets));
    }
    if limits.bytes > 0 {
        parts.push(format!("{} bytes", limits.bytes));
    }
    if parts.is_empty() {
        "no limit asked".into()
    } else {
        parts.join(", ")
    }
}

/// The interfaces of this host that a capture can open, as libpcap lists them.
fn host_interfaces() -> Vec<String> {
    match pcap::Device::list() {
        Ok(devices) => devices
            .into_iter()
            .filter(|d| d.flags.is_up() || d.name == "any")
            .map(|d| d.name)
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list this host's interfaces: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Direction;

    /// A batch of `n` packets of 100 bytes, as a capture thread hands it over.
    fn batch(sequence: u64, n: u32) -> Outgoing {
        let mut builder = BatchBuilder::new(1 << 20);
        for i in 0..n {
            let _ = builder.push(u64::from(i), 100, Direction::Inbound, &[7u8; 100]);
        }
        Outgoing {
            sequence,
            interface_id: 0,
            batch: builder.finish(0, sequence, 0),
        }
    }

    fn packets_in(frame: &[u8]) -> u32 {
        match protocol::decode_frame(&mut BytesMut::from(frame)) {
            Ok(Some(Message::Batch(b))) => b.packets().unwrap().count() as u32,
            other => panic!("not a batch: {other:?}"),
        }
    }

    #[test]
    fn a_packet_limit_sends_exactly_that_many_and_then_ends() {
        let limits = CaptureLimits {
            packets: 250,
            ..CaptureLimits::default()
        };
        let mut sent = Sent::new(limits, None);
        let first = sent.admit(batch(1, 100)).unwrap();
        assert_eq!(packets_in(&first), 100);
        assert_eq!(sent.reached(), None);
        let second = sent.admit(batch(2, 100)).unwrap();
        assert_eq!(packets_in(&second), 100);
        // Only the first 50 of the third fit.
        let third = sent.admit(batch(3, 100)).unwrap();
        assert_eq!(packets_in(&third), 50);
        assert_eq!(sent.packets, 250);
        assert_eq!(sent.reached().as_deref(), Some("packet limit (250)"));
    }

    #[test]
    fn a_byte_limit_counts_records() {
        // 10 records of 17 + 100 bytes.
        let limits = CaptureLimits {
            bytes: 1170,
            ..CaptureLimits::default()
        };
        let mut sent = Sent::new(limits, None);
        let frame = sent.admit(batch(1, 25)).unwrap();
        assert_eq!(packets_in(&frame), 10);
        assert_eq!(sent.reached().as_deref(), Some("byte limit (1170)"));
    }

    #[test]
    fn the_rate_cap_drops_whole_batches_and_counts_them() {
        let mut sent = Sent::new(CaptureLimits::default(), Some(3000));
        assert!(sent.admit(batch(1, 20)).is_some());
        // 2340 bytes sent this second: the next 2340 would pass 3000.
        assert!(sent.admit(batch(2, 20)).is_none());
        assert_eq!((sent.packets, sent.capped), (20, 20));
        assert_eq!(sent.reached(), None);
    }

    #[test]
    fn the_duration_cap_applies_to_unlimited_and_longer_requests() {
        let on_demand = OnDemand::new(Settings {
            allowed: true,
            live: false,
            mode: Mode::Pcap,
            template: capture::Options {
                snaplen: 262_144,
                filter: String::new(),
                exclude: None,
                ring_size: None,
                xdp_attach: capture::XdpAttach::Auto,
                afxdp: capture::AfxdpFlags::default(),
                attribute: false,
                selectors: capture::Selectors::default(),
            },
            batch_size: 1 << 16,
            flush_interval: Duration::from_millis(100),
            max_duration: Duration::from_secs(60),
            max_rate: None,
            max_captures: 1,
        });
        let asked = |ms| {
            on_demand
                .capped(CaptureLimits {
                    duration_ms: ms,
                    ..CaptureLimits::default()
                })
                .duration_ms
        };
        assert_eq!(
            (asked(0), asked(1000), asked(120_000)),
            (60_000, 1000, 60_000)
        );
        // One place: a second capture is refused while the first holds it.
        let held = Slot::take(&on_demand).unwrap();
        let refused = Slot::take(&on_demand).map(drop).unwrap_err();
        assert!(refused.contains("already runs 1"), "{refused}");
        drop(held);
        assert!(Slot::take(&on_demand).is_ok());
    }
}
