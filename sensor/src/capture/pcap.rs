//! The libpcap backend, for live interfaces and capture files.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcap::{Activated, Active, Capture, Device, Linktype, Offline, Precision, Stat};
use pcap_record::{direction, timestamp_ns};
use protocol::InterfaceInfo;

use super::{compose_filter, CaptureBackend, FrameOwner, FrameOwners, Options, Stopper};
use crate::batcher::{Backpressure, Batcher};
use crate::error::{Error, Result};

/// Read timeout: a quiet link still returns to the loop this often, so partial batches
/// get flushed and a stop request is seen.
const READ_TIMEOUT_MS: i32 = 50;
/// Kernel buffer per live capture: room for bursts while a batch is compressed.
const BUFFER_SIZE: i32 = 8 << 20;
/// Longest a stopping live capture keeps reading what the kernel holds for it.
const DRAIN_ON_STOP: Duration = Duration::from_millis(200);
/// How long after a stop the kernel has surely handed over the packets it held: libpcap
/// reads TPACKET_V3 blocks, which the kernel shows only once full or once the read timeout
/// has passed since the block opened, so the block open at the stop needs up to one more
/// read timeout (and a timer tick).
const BLOCK_RETIRED: Duration = Duration::from_millis(2 * READ_TIMEOUT_MS as u64);
/// How often libpcap's counters (received, dropped) are read.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// While packets flow, the flush interval and the counters are looked at every this many
/// packets; an empty read always looks.
const CLOCK_EVERY: u32 = 64;

enum Handle {
    Live(Capture<Active>),
    File(Capture<Offline>),
}

pub struct PcapCapture {
    info: InterfaceInfo,
    link_name: String,
    link_type: i32,
    handle: Handle,
    stop: Arc<AtomicBool>,
    /// Live captures on Unix: wakes the wait for packets at a stop.
    stop_wake: Option<StopWake>,
    /// `--attribute` (live, Linux): whose each frame is.
    owners: Option<FrameOwners>,
}

impl PcapCapture {
    pub fn live(name: &str, opts: &Options) -> Result<Self> {
        let inactive = Capture::from_device(name)
            .map_err(|e| Error::runtime(format!("cannot open interface {name}: {}", msg(&e))))?;
        let snaplen = i32::try_from(opts.snaplen).unwrap_or(i32::MAX);
        let mut cap = inactive
            .snaplen(snaplen)
            .timeout(READ_TIMEOUT_MS)
            .buffer_size(BUFFER_SIZE)
            .promisc(true)
            .precision(Precision::Nano)
            .open()
            .map_err(|e| open_error(name, &e))?;
        // The filter is compiled on the activated handle: only then does libpcap know the
        // link type, and `vlan` gets its live-capture meaning.
        check_user_filter(&cap, &opts.filter)?;
        let filter = compose_filter(&opts.filter, opts.exclude.as_ref());
        cap.filter(&filter, true).map_err(|e| {
            Error::input(format!(
                "invalid filter \"{filter}\": {} (check the --bpf expression)",
                msg(&e)
            ))
        })?;
        let link_type = cap.get_datalink().0;
        // See WaitForPackets: on Unix, reads never block; the capture thread waits itself.
        #[cfg(unix)]
        let cap = cap.setnonblock().map_err(|e| {
            Error::runtime(format!("cannot read {name} without blocking: {}", msg(&e)))
        })?;
        let mut capture = Self::build(name, link_type, opts, Handle::Live(cap))?;
        capture.stop_wake = StopWake::new()
            .map_err(|e| Error::runtime(format!("cannot capture on {name}: {e}")))?;
        Ok(capture)
    }

    pub fn file(path: &Path, opts: &Options) -> Result<Self> {
        let shown = path.display().to_string();
        if path.to_str().is_none() {
            return Err(Error::input(format!(
                "cannot read {shown}: the path is not valid UTF-8 (rename the file)"
            )));
        }
        let mut cap = Capture::from_file_with_precision(path, Precision::Nano)
            .map_err(|e| file_error(&shown, &msg(&e)))?;
        check_user_filter(&cap, &opts.filter)?;
        // A file holds no traffic of this sensor: the user's filter alone applies.
        cap.filter(opts.filter.trim(), true).map_err(|e| {
            Error::input(format!(
                "invalid filter \"{}\": {}",
                opts.filter.trim(),
                msg(&e)
            ))
        })?;
        let link_type = cap.get_datalink().0;
        Self::build(&shown, link_type, opts, Handle::File(cap))
    }

    fn build(name: &str, link_type: i32, opts: &Options, handle: Handle) -> Result<Self> {
        let link = u16::try_from(link_type).map_err(|_| {
            Error::runtime(format!("{name} has an unsupported link type {link_type}"))
        })?;
        let link_name = Linktype(link_type)
            .get_name()
            .unwrap_or_else(|_| format!("LINKTYPE {link_type}"));
        Ok(Self {
            info: InterfaceInfo {
                name: name.to_string(),
                link_type: link,
                snaplen: opts.snaplen,
                filter: opts.filter.trim().to_string(),
            },
            link_name,
            link_type,
            handle,
            stop: Arc::new(AtomicBool::new(false)),
            stop_wake: None,
            owners: None,
        })
    }

    /// Attributes each frame to its process (and, with selectors, takes only theirs).
    #[cfg_attr(
        not(target_os = "linux"),
        allow(dead_code, reason = "attribution is refused off Linux")
    )]
    pub fn with_owners(mut self, owners: FrameOwners) -> Self {
        self.owners = Some(owners);
        self
    }
}

impl CaptureBackend for PcapCapture {
    #[cfg(unix)]
    fn packet_sockets(&self) -> Vec<std::os::raw::c_int> {
        use std::os::fd::AsRawFd;
        match &self.handle {
            Handle::Live(capture) => vec![capture.as_raw_fd()],
            Handle::File(_) => Vec::new(),
        }
    }

    fn info(&self) -> &InterfaceInfo {
        &self.info
    }

    fn needs_after_attach(&self) -> Vec<crate::privileges::Need> {
        self.owners
            .as_ref()
            .map(FrameOwners::needs)
            .unwrap_or_default()
    }

    fn link_type_name(&self) -> &str {
        &self.link_name
    }

    fn backpressure(&self) -> Backpressure {
        match self.handle {
            Handle::Live(_) => Backpressure::Drop,
            Handle::File(_) => Backpressure::Wait,
        }
    }

    fn stopper(&mut self) -> Stopper {
        let stop = Arc::clone(&self.stop);
        // The flag is the stop; the wakeup (Unix) or breakloop (a read blocked in Npcap)
        // makes a waiting live capture see it at once. Files never wait.
        let wake = self.stop_wake.as_ref().map(StopWake::sender);
        #[cfg(not(unix))]
        let brk = match &mut self.handle {
            Handle::Live(cap) => Some(cap.breakloop_handle()),
            Handle::File(_) => None,
        };
        Box::new(move || {
            stop.store(true, Relaxed);
            if let Some(w) = &wake {
                w.send();
            }
            #[cfg(not(unix))]
            if let Some(b) = &brk {
                b.breakloop();
            }
        })
    }

    fn run(self: Box<Self>, mut batcher: Batcher) -> Result<()> {
        let Self {
            info,
            link_type,
            handle,
            stop,
            stop_wake,
            owners,
            ..
        } = *self;
        let mut pump = Pump {
            name: &info.name,
            snaplen: info.snaplen as usize,
            link_type,
            stop: &stop,
            stop_wake: stop_wake.as_ref(),
            owners,
        };
        let result = match handle {
            Handle::Live(mut cap) => {
                let mut stats = LiveStats::default();
                let r = pump.run(&mut cap, &mut batcher, Some(&mut stats));
                // Last counters before the final Stats frame.
                stats.poll(&mut cap, &batcher);
                r
            }
            Handle::File(mut cap) => pump.run(&mut cap, &mut batcher, None),
        };
        // The transport may already be gone (connection lost): nothing left to do then.
        let _ = batcher.finish();
        result
    }
}

struct Pump<'a> {
    name: &'a str,
    snaplen: usize,
    link_type: i32,
    stop: &'a AtomicBool,
    stop_wake: Option<&'a StopWake>,
    owners: Option<FrameOwners>,
}

/// Ends a live capture's wait for packets at a stop, on Unix. libpcap's own breakloop
/// cannot: in non-blocking mode its wakeup descriptor is closed, so it only makes the next
/// read fail. One end of a socket pair becomes readable, and the wait polls it beside the
/// capture.
struct StopWake {
    #[cfg(unix)]
    readable_at_stop: std::os::unix::net::UnixStream,
    #[cfg(unix)]
    sender: Arc<std::os::unix::net::UnixStream>,
}

/// The stopper's end of a [`StopWake`].
struct StopWakeSender {
    #[cfg(unix)]
    end: Arc<std::os::unix::net::UnixStream>,
}

impl StopWake {
    #[cfg(unix)]
    fn new() -> std::io::Result<Option<Self>> {
        let (readable_at_stop, sender) = std::os::unix::net::UnixStream::pair()?;
        // The stopper must never block, however often it is called.
        sender.set_nonblocking(true)?;
        Ok(Some(Self {
            readable_at_stop,
            sender: Arc::new(sender),
        }))
    }

    /// Npcap reads block, and breakloop ends them.
    #[cfg(not(unix))]
    fn new() -> std::io::Result<Option<Self>> {
        Ok(None)
    }

    fn sender(&self) -> StopWakeSender {
        StopWakeSender {
            #[cfg(unix)]
            end: Arc::clone(&self.sender),
        }
    }
}

impl StopWakeSender {
    fn send(&self) {
        #[cfg(unix)]
        {
            use std::io::Write;
            // A full socket buffer means it is readable already.
            let _ = (&*self.end).write(&[1]);
        }
    }
}

/// Waiting for packets between non-blocking reads.
///
/// libpcap on Linux never returns on its read timeout while a link is idle (it polls
/// again), so a partial batch would wait for the next packet however long that takes. Live
/// handles therefore read non-blocking on Unix and wait here, at most one read timeout, so
/// that quiet links still flush.
trait WaitForPackets {
    /// Waits for packets, at most one read timeout; `stop_wake`, when given, ends the wait
    /// at a stop.
    fn wait_for_packets(&self, stop_wake: Option<&StopWake>);
}

impl WaitForPackets for Capture<Active> {
    #[cfg(unix)]
    fn wait_for_packets(&self, stop_wake: Option<&StopWake>) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(READ_TIMEOUT_MS) * 1_000_000,
        };
        let capture = PollFd::new(self, PollFlags::IN);
        // An error (EINTR) only means an earlier look at the stop flag and the batch.
        let _ = match stop_wake {
            Some(w) => poll(
                &mut [capture, PollFd::new(&w.readable_at_stop, PollFlags::IN)],
                Some(&timeout),
            ),
            None => poll(&mut [capture], Some(&timeout)),
        };
    }

    /// Npcap returns on its read timeout: the blocking read already waited.
    #[cfg(not(unix))]
    fn wait_for_packets(&self, _: Option<&StopWake>) {}
}

/// A file never waits.
impl WaitForPackets for Capture<Offline> {
    fn wait_for_packets(&self, _: Option<&StopWake>) {}
}

impl Pump<'_> {
    /// Reads packets into the batcher until stopped, the input ends, or the transport
    /// is gone. `stats` is given for live captures only.
    fn run<T: Activated + ?Sized>(
        &mut self,
        cap: &mut Capture<T>,
        batcher: &mut Batcher,
        mut stats: Option<&mut LiveStats>,
    ) -> Result<()>
    where
        Capture<T>: WaitForPackets,
    {
        let live = stats.is_some();
        // Once stopped, a live capture still takes what the kernel holds for it (the block
        // open at the stop included, and what arrives meanwhile; for 200 ms at most under a
        // flood); a file just stops.
        let mut stopped_at: Option<Instant> = None;
        // Packets since the clock was last read: reading it per packet costs more than
        // the rest of the loop on small frames.
        let mut unchecked: u32 = 0;
        loop {
            if stopped_at.is_none() && self.stop.load(Relaxed) {
                if !live {
                    return Ok(());
                }
                stopped_at = Some(Instant::now());
            }
            let since_stop = stopped_at.map(|t| t.elapsed());
            if since_stop.is_some_and(|d| d >= DRAIN_ON_STOP) {
                return Ok(());
            }
            match cap.next_packet() {
                Ok(p) => {
                    let data = &p.data[..p.data.len().min(self.snaplen)];
                    if !live {
                        // A file shows only what passed the filter: seen = matched.
                        batcher.counters().seen.fetch_add(1, Relaxed);
                    }
                    let dir = direction(self.link_type, data);
                    let (timestamp, len) = (timestamp_ns(p.header), p.header.len);
                    let owner = match &mut self.owners {
                        Some(owners) => owners.of(self.link_type, data, dir),
                        None => FrameOwner::Unattributed,
                    };
                    let pushed = match owner {
                        FrameOwner::Process(key, process) => {
                            batcher.push_attributed(timestamp, len, dir, data, key, process)
                        }
                        FrameOwner::Unattributed => batcher.push(timestamp, len, dir, data),
                        // Filtered out, as by the expression: seen, not matched.
                        FrameOwner::NotSelected => Ok(()),
                    };
                    if pushed.is_err() {
                        return Ok(());
                    }
                    unchecked += 1;
                    if unchecked < CLOCK_EVERY {
                        continue;
                    }
                }
                Err(pcap::Error::TimeoutExpired)
                    if since_stop.is_some_and(|d| d >= BLOCK_RETIRED) =>
                {
                    return Ok(())
                }
                // Once stopped, the wakeup stays readable: the wait is for the capture alone.
                Err(pcap::Error::TimeoutExpired) => {
                    cap.wait_for_packets(self.stop_wake.filter(|_| stopped_at.is_none()));
                }
                // On a live capture this is breakloop (the stop, on Windows): libpcap
                // clears it, and the drain above reads on. On a file it is the end.
                Err(pcap::Error::NoMorePackets) if live => continue,
                Err(pcap::Error::NoMorePackets) => return Ok(()),
                Err(e) => {
                    if self.stop.load(Relaxed) {
                        return Ok(());
                    }
                    return Err(Error::runtime(format!(
                        "capture on {} failed: {}",
                        self.name,
                        msg(&e)
                    )));
                }
            }
            unchecked = 0;
            if let Some(owners) = &mut self.owners {
                owners.tick();
            }
            if batcher.tick().is_err() {
                return Ok(());
            }
            if let Some(s) = stats.as_deref_mut() {
                if s.last_poll.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
                    s.poll(cap, batcher);
                }
            }
        }
    }
}

/// Turns libpcap's 32-bit, wrapping counters into the sensor's 64-bit totals.
#[derive(Default)]
struct LiveStats {
    last: Option<Stat>,
    last_poll: Option<Instant>,
}

impl LiveStats {
    fn poll<T: Activated + ?Sized>(&mut self, cap: &mut Capture<T>, batcher: &Batcher) {
        self.last_poll = Some(Instant::now());
        let Ok(now) = cap.stats() else { return };
        let prev = self.last.unwrap_or(Stat {
            received: 0,
            dropped: 0,
            if_dropped: 0,
        });
        let c = batcher.counters();
        c.seen
            .fetch_add(now.received.wrapping_sub(prev.received).into(), Relaxed);
        c.drop_kernel
            .fetch_add(now.dropped.wrapping_sub(prev.dropped).into(), Relaxed);
        c.drop_interface
            .fetch_add(now.if_dropped.wrapping_sub(prev.if_dropped).into(), Relaxed);
        self.last = Some(now);
    }
}

/// Compiles the user's expression alone, so that a mistake is reported in the user's own
/// terms rather than inside the composed filter.
pub(super) fn check_user_filter<T: Activated + ?Sized>(
    cap: &Capture<T>,
    filter: &str,
) -> Result<()> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Ok(());
    }
    cap.compile(filter, true).map(drop).map_err(|e| {
        Error::input(format!(
            "invalid filter \"{filter}\": {} (see `man pcap-filter` for the syntax)",
            msg(&e)
        ))
    })
}

fn file_error(shown: &str, text: &str) -> Error {
    // libpcap usually names the file itself; avoid saying it twice.
    let what = if text.starts_with(shown) {
        format!("cannot read {text}")
    } else {
        format!("cannot read {shown}: {text}")
    };
    if text.contains("No such file") || denied(text) {
        Error::input(what)
    } else {
        Error::input(format!("{what} (is it a pcap or pcapng file?)"))
    }
}

/// Whether libpcap's message says the system refused for want of privilege. libpcap
/// reports errors as text only (its `errbuf`, which the pcap crate passes on without the
/// errno), so its words are read here, and only here.
pub(super) fn denied(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("permission") || lower.contains("not permitted")
}

/// libpcap's own message, without the crate's "libpcap error: " prefix.
pub(super) fn msg(e: &pcap::Error) -> String {
    match e {
        pcap::Error::PcapError(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Explains why an interface could not be opened: unknown name, missing privilege, or
/// libpcap's message.
pub(super) fn open_error(name: &str, e: &pcap::Error) -> Error {
    let text = msg(e);
    if let Ok(devices) = Device::list() {
        if !devices.iter().any(|d| d.name == name) {
            return unknown_interface(name);
        }
    }
    if denied(&text) {
        return Error::runtime(format!(
            "no permission to capture on {name}: {text} (run as root or grant CAP_NET_RAW, \
             e.g. `setcap cap_net_raw=ep` on the sensor binary)"
        ));
    }
    Error::runtime(format!("cannot capture on {name}: {text}"))
}

/// "unknown interface", with the names that do exist.
pub(super) fn unknown_interface(name: &str) -> Error {
    let names: Vec<String> = Device::list()
        .map(|d| d.into_iter().map(|d| d.name).collect())
        .unwrap_or_default();
    Error::input(format!(
        "unknown interface {name} (available: {}; {})",
        names.join(", "),
        LIST_HINT
    ))
}

#[cfg(unix)]
const LIST_HINT: &str = "see `ip link`";
#[cfg(not(unix))]
const LIST_HINT: &str = "see `getmac /v`";
