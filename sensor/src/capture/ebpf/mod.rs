//! Linux eBPF capture: a socket filter, TC or XDP program runs the user's tcpdump filter in
//! the kernel and copies matching frames into a BPF ring buffer of the CPU it runs on; this
//! backend drains the rings in timestamp order (see `rings`).
//!
//! The chain (see `sensor-ebpf`): entry program → translated filter → emit program, joined
//! by tail calls. The filter is libpcap's own compilation of the expression, translated
//! from classic BPF and loaded with a raw bpf() call by the `cbpf_to_ebpf` crate, since Aya
//! loads only programs from an object.
//!
//! Timestamps: TC hands over the skb's own CLOCK_REALTIME receive stamp where there is one
//! (the stamp tcpdump gets). Otherwise the programs stamp CLOCK_BOOTTIME
//! (bpf_ktime_get_boot_ns) and this side adds REALTIME − BOOTTIME, sampled on every
//! wake-up, which gives wall-clock nanoseconds that follow clock steps within one wake-up.
//! `--mode afxdp` frames carry no stamp and are stamped when read.

#[cfg(feature = "afxdp")]
pub mod afxdp;
mod attribution;
mod rings;

pub use attribution::FrameOwners;

use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use aya::programs::{
    tc, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
    SchedClassifier, SockOps, SocketFilter, TcAttachType, Xdp, XdpMode,
};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use cbpf_to_ebpf::{CbpfInsn, OnAccept, Refusal, Target};
use pcap::{Capture, Linktype};
use protocol::{Direction, InterfaceInfo};
use rustix::time::ClockId;
use sensor_ebpf as shared;

use super::{compose_filter, CaptureBackend, Options, Stopper, XdpAttach};
use crate::batcher::{Backpressure, Batcher};
use crate::error::{Error, Result};
use crate::privileges::{Capability, Need};

/// The programs, built by `cargo xtask build-ebpf` and embedded by build.rs.
#[cfg(capstream_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/sensor-ebpf.o"
)));
#[cfg(not(capstream_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// How long a wait for frames lasts before the loop looks at the stop flag and the batch
/// timer again.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// A ring wakes the sensor once it is this fraction full (1/8): bursts are read in bulk,
/// with seven eighths of the ring still free; a trickle waits for the poll timeout.
const WAKEUP_FRACTION: u32 = 8;
/// How soon frames held in the rings for another CPU's (see `rings`) are looked at again.
const HOLD_RECHECK: Duration = Duration::from_millis(1);
/// How often the kernel counters are read.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Which hook runs the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A socket filter on an AF_PACKET socket: both directions, like tcpdump.
    Socket,
    /// clsact ingress and egress.
    Tc,
    /// XDP: ingress only, before the kernel's own processing.
    Xdp(XdpAttach),
    /// XDP redirecting matching frames to AF_XDP sockets (a dedicated mirror port).
    #[cfg(feature = "afxdp")]
    Afxdp(XdpAttach, super::AfxdpFlags),
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "ebpf",
            Self::Tc => "tc",
            Self::Xdp(_) => "xdp",
            #[cfg(feature = "afxdp")]
            Self::Afxdp(..) => "afxdp",
        }
    }

    /// Where the filter program runs.
    fn filter_hook(self) -> cbpf_to_ebpf::Hook {
        match self {
            Self::Socket => cbpf_to_ebpf::Hook::SocketFilter,
            Self::Tc => cbpf_to_ebpf::Hook::Tc,
            Self::Xdp(_) => cbpf_to_ebpf::Hook::Xdp { frags: true },
            #[cfg(feature = "afxdp")]
            Self::Afxdp(..) => cbpf_to_ebpf::Hook::Xdp { frags: true },
        }
    }

    /// The emit program and the entry programs of this hook in the object.
    fn programs(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Self::Socket => (shared::SOCKET_EMIT, &[shared::SOCKET_ENTRY]),
            Self::Tc => (shared::TC_EMIT, &[shared::TC_INGRESS, shared::TC_EGRESS]),
            Self::Xdp(_) => (shared::XDP_EMIT, &[shared::XDP_ENTRY]),
            #[cfg(feature = "afxdp")]
            Self::Afxdp(..) => (shared::AFXDP_EMIT, &[shared::XDP_ENTRY]),
        }
    }
}

/// Why an eBPF mode cannot run in a build without the programs.
fn no_programs() -> Error {
    Error::runtime(
        "this build has no eBPF programs; run cargo xtask build-ebpf and rebuild the sensor, \
         or use --mode pcap",
    )
}

/// How the entry programs are attached, to detach them when the capture stops.
enum Attachment {
    /// The AF_PACKET socket carrying the socket filter.
    Socket,
    Tc(Vec<(&'static str, aya::programs::tc::SchedClassifierLinkId)>),
    Xdp(aya::programs::xdp::XdpLinkId),
    Detached,
}

pub struct EbpfCapture {
    info: InterfaceInfo,
    link_name: String,
    hook: Hook,
    ebpf: Ebpf,
    rings: rings::Rings,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    attachment: Attachment,
    /// An AF_PACKET socket bound to the interface: carries the socket filter in `ebpf`
    /// mode, and holds the interface in promiscuous mode in every mode, as tcpdump does.
    packet_socket: OwnedFd,
    /// Kept loaded while it sits in the program array.
    _filter: OwnedFd,
    /// Packets the chain failed to filter, as last reported (never expected).
    chain_failed_reported: u64,
    /// `--mode afxdp`: the AF_XDP sockets the frames arrive on.
    #[cfg(feature = "afxdp")]
    sockets: Option<afxdp::Sockets>,
    stop: Arc<AtomicBool>,
    /// `--attribute`: the owners of the frames' sockets.
    attributor: Option<attribution::Attributor>,
}

impl EbpfCapture {
    pub fn open(iface: &str, hook: Hook, opts: &Options) -> Result<Self> {
        let object = OBJECT.ok_or_else(no_programs)?;
        let mode = hook.name();
        if iface == "any" {
            return Err(Error::input(format!(
                "--mode {mode} captures named interfaces, not \"any\" (name them with -i, \
                 or use --mode pcap)"
            )));
        }
        let ifindex = ifindex(iface)?;
        let (filter, link_type) = compile_filter(iface, mode, opts)?;
        let in_xdp = matches!(hook.filter_hook(), cbpf_to_ebpf::Hook::Xdp { .. });
        if in_xdp && link_type != Linktype::ETHERNET.0 {
            return Err(Error::input(format!(
                "--mode {mode} needs an Ethernet interface and {iface} is not one; use --mode tc"
            )));
        }
        let loopback = is_loopback(iface);
        // AF_XDP frames go to their sockets, never to the rings: the smallest will do.
        let ring_size = match hook {
            #[cfg(feature = "afxdp")]
            Hook::Afxdp(..) => Some(rings::MIN_RING_BYTES),
            _ => opts.ring_size,
        };
        let layout = rings::Layout::for_this_machine(ring_size)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(shared::RINGS_MAP, layout.slots())
            .override_global(shared::SNAPLEN_GLOBAL, &opts.snaplen, true)
            .override_global(shared::LOOPBACK_GLOBAL, &u32::from(loopback), true)
            .override_global(shared::ATTRIBUTE_GLOBAL, &u32::from(opts.attribute), true)
            .override_global(
                shared::SENSOR_TGID_GLOBAL,
                &attribution::tgid_for_hooks(),
                true,
            )
            .override_global(
                shared::SELECTING_GLOBAL,
                &u32::from(!opts.selectors.is_empty()),
                true,
            )
            .override_global(
                shared::WAKEUP_BYTES_GLOBAL,
                &u64::from(layout.ring_bytes / WAKEUP_FRACTION),
                true,
            )
            .load(object)
            .map_err(|e| object_refused(mode, &e))?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| tracing::debug!("no eBPF-side logging: {e}"))
            .ok();
        let (emit, entries) = hook.programs();
        let emit_fd = load_emit(&mut ebpf, hook, emit)?;
        // Before any program is attached: a frame finds its CPU's ring in place.
        let rings = rings::Rings::create(&mut ebpf, &layout)?;

        let programs = map_fd(&ebpf, shared::PROGRAMS_MAP)?;
        let scratch = map_fd(&ebpf, shared::SCRATCH_MAP)?;
        let target = Target {
            hook: hook.filter_hook(),
            pass: hook.filter_hook().pass(),
            on_accept: OnAccept::TailCall {
                prog_array: programs.as_fd(),
                index: shared::PROG_EMIT,
                scratch: scratch.as_fd(),
            },
        };
        let insns = cbpf_to_ebpf::translate(&filter, &target).map_err(|e| {
            let instead = match e.refusal {
                Refusal::AncillaryNotInXdp { .. } => "; use --mode tc or --mode ebpf",
                _ => "",
            };
            Error::input(format!(
                "the filter cannot run in --mode {mode}: {e}{instead}"
            ))
        })?;
        let filter_fd = cbpf_to_ebpf::load_program(hook.filter_hook(), &insns, "capstream_filter")
            .map_err(|e| kernel_refused(mode, e.to_string(), denied(Some(e.errno()))))?;
        for (index, prog) in [
            (shared::PROG_FILTER, filter_fd.as_fd()),
            (shared::PROG_EMIT, emit_fd.as_fd()),
        ] {
            cbpf_to_ebpf::prog_array_set(programs.as_fd(), index, prog)
                .map_err(|e| Error::runtime(format!("cannot chain the eBPF programs: {e}")))?;
        }

        #[cfg(feature = "afxdp")]
        let mut sockets = None;
        let packet_socket = packet_socket().map_err(|e| {
            kernel_refused(
                mode,
                format!("cannot open a packet socket: {e}"),
                denied(e.raw_os_error()),
            )
        })?;
        let attachment = match hook {
            Hook::Socket => {
                let prog: &mut SocketFilter = program(&mut ebpf, entries[0])?;
                prog.load().map_err(|e| load_error(mode, entries[0], &e))?;
                prog.attach(packet_socket.as_fd())
                    .map_err(|e| Error::runtime(format!("cannot attach the socket filter: {e}")))?;
                // Bound only now, with the filter in place: nothing unfiltered is queued.
                bind_all(&packet_socket, ifindex).map_err(|e| {
                    Error::runtime(format!("cannot bind the packet socket to {iface}: {e}"))
                })?;
                Attachment::Socket
            }
            Hook::Tc => {
                // Aya attaches with TCX from 6.6 on, which needs no qdisc; older kernels need
                // clsact, and one already there (another tool, a previous run) is fine.
                let tcx = kernel_at_least(6, 6);
                if !tcx {
                    let _ = tc::qdisc_add_clsact(iface);
                }
                let mut links = Vec::new();
                // On a loopback, whatever goes out comes back in: ingress sees it all once,
                // as tcpdump does.
                let hooks = if loopback { 1 } else { 2 };
                for (name, direction) in entries
                    .iter()
                    .zip([TcAttachType::Ingress, TcAttachType::Egress])
                    .take(hooks)
                {
                    let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
                    prog.load().map_err(|e| load_error(mode, name, &e))?;
                    let link = prog.attach(iface, direction).map_err(|e| {
                        Error::runtime(format!(
                            "cannot attach the TC program to {iface}: {e} (the kernel needs \
                             clsact support; try --mode ebpf)"
                        ))
                    })?;
                    links.push((*name, link));
                }
                Attachment::Tc(links)
            }
            Hook::Xdp(attach) => {
                let prog: &mut Xdp = program(&mut ebpf, entries[0])?;
                prog.load().map_err(|e| load_error(mode, entries[0], &e))?;
                Attachment::Xdp(attach_xdp(prog, iface, attach)?)
            }
            #[cfg(feature = "afxdp")]
            Hook::Afxdp(attach, options) => {
                // The sockets first: a frame redirected before its socket exists would
                // go to the stack uncounted.
                let mut xsks: aya::maps::XskMap<&mut MapData> = ebpf
                    .map_mut(shared::XSKS_MAP)
                    .ok_or_else(|| missing(shared::XSKS_MAP))?
                    .try_into()
                    .map_err(|e| Error::runtime(format!("bad AF_XDP socket map: {e}")))?;
                sockets = Some(afxdp::Sockets::open(iface, options, &mut xsks)?);
                let prog: &mut Xdp = program(&mut ebpf, entries[0])?;
                prog.load().map_err(|e| load_error(mode, entries[0], &e))?;
                Attachment::Xdp(attach_xdp(prog, iface, attach)?)
            }
        };
        set_promiscuous(&packet_socket, ifindex)
            .map_err(|e| Error::runtime(format!("cannot put {iface} in promiscuous mode: {e}")))?;
        // Maps the sensor has no more use for, closed: the programs that use them keep
        // them alive. The program array stays open (the kernel empties one whose last
        // descriptor closes), and the seccomp filter forbids updating it.
        drop(ebpf.take_map(shared::SCRATCH_MAP));
        if hook.name() != "afxdp" {
            drop(ebpf.take_map(shared::XSKS_MAP));
        }

        let attributor = if opts.attribute {
            let select_in = SelectIn::Kernel;
            let (attributor, _) = attach_owner_hooks(&mut ebpf, mode, &opts.selectors, select_in)?;
            Some(attributor)
        } else {
            for map in [shared::OWNERS_MAP, shared::FLOWS_MAP, shared::LISTENERS_MAP] {
                drop(ebpf.take_map(map));
            }
            None
        };
        let counters = PerCpuArray::try_from(
            ebpf.take_map(shared::COUNTERS_MAP)
                .ok_or_else(|| missing(shared::COUNTERS_MAP))?,
        )
        .map_err(|e| Error::runtime(format!("cannot read the kernel counters: {e}")))?;
        let link_name = Linktype(link_type)
            .get_name()
            .unwrap_or_else(|_| format!("LINKTYPE {link_type}"));
        Ok(Self {
            info: InterfaceInfo {
                name: iface.to_string(),
                link_type: u16::try_from(link_type).map_err(|_| {
                    Error::runtime(format!("{iface} has an unsupported link type {link_type}"))
                })?,
                snaplen: opts.snaplen,
                filter: opts.filter.trim().to_string(),
            },
            link_name: format!("{link_name}, {mode}"),
            hook,
            ebpf,
            rings,
            counters,
            logger,
            attachment,
            packet_socket,
            _filter: filter_fd,
            chain_failed_reported: 0,
            #[cfg(feature = "afxdp")]
            sockets,
            stop: Arc::new(AtomicBool::new(false)),
            attributor,
        })
    }

    /// Detaches the entry programs: no new frames enter the rings after this.
    fn detach(&mut self) {
        let result = match std::mem::replace(&mut self.attachment, Attachment::Detached) {
            Attachment::Detached => Ok(()),
            Attachment::Socket => {
                SocketFilter::detach(self.packet_socket.as_fd()).map_err(|e| e.to_string())
            }
            Attachment::Tc(links) => links.into_iter().try_for_each(|(name, link)| {
                program::<SchedClassifier>(&mut self.ebpf, name)
                    .map_err(|e| e.to_string())?
                    .detach(link)
                    .map_err(|e| e.to_string())
            }),
            Attachment::Xdp(link) => program::<Xdp>(&mut self.ebpf, shared::XDP_ENTRY)
                .map_err(|e| e.to_string())
                .and_then(|p| p.detach(link).map_err(|e| e.to_string())),
        };
        if let Err(e) = result {
            tracing::warn!(
                "{}: cannot detach the capture programs: {e}",
                self.info.name
            );
        }
    }

    /// Waits until a ring (or the log ring) has data, or the poll timeout passes.
    fn wait(&self) {
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: i64::try_from(POLL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX),
        };
        // AF_XDP frames never pass the rings: the sockets decide how to wait.
        #[cfg(feature = "afxdp")]
        if let Some(sockets) = &self.sockets {
            sockets.wait(&timeout);
            return;
        }
        self.rings
            .wait(self.logger.as_ref().map(AsFd::as_fd), &timeout);
    }

    /// Moves the kernel's per-CPU counters into the sensor's.
    fn poll_counters(&mut self, batcher: &Batcher) {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        let c = batcher.counters();
        c.seen.store(sum(shared::COUNTER_SEEN), Relaxed);
        #[cfg(feature = "afxdp")]
        let socket_drops = self.sockets.as_ref().map_or(0, afxdp::Sockets::dropped);
        #[cfg(not(feature = "afxdp"))]
        let socket_drops = 0;
        c.drop_kernel
            .store(sum(shared::COUNTER_RING_FULL) + socket_drops, Relaxed);
        let failed = sum(shared::COUNTER_CHAIN_FAILED);
        if failed > self.chain_failed_reported {
            self.chain_failed_reported = failed;
            tracing::warn!(
                "{}: {failed} packets were not filtered because a tail call failed",
                self.info.name
            );
        }
    }
}

impl CaptureBackend for EbpfCapture {
    fn info(&self) -> &InterfaceInfo {
        &self.info
    }

    fn link_type_name(&self) -> &str {
        &self.link_name
    }

    fn backpressure(&self) -> Backpressure {
        Backpressure::Drop
    }

    fn stopper(&mut self) -> Stopper {
        let stop = Arc::clone(&self.stop);
        Box::new(move || stop.store(true, Relaxed))
    }

    /// Nothing on current kernels: the rings and the AF_XDP sockets are read through their
    /// descriptors, the socket filter is detached from the sensor's own socket, and links
    /// made with bpf() (TCX from 6.6, XDP from 5.9) are detached by closing them. Older
    /// kernels attach through netlink, and only a netlink request (CAP_NET_ADMIN) detaches
    /// the program, which would otherwise go on filtering after the sensor has gone.
    fn packet_sockets(&self) -> Vec<std::os::raw::c_int> {
        vec![self.packet_socket.as_raw_fd()]
    }

    fn needs_after_attach(&self) -> Vec<Need> {
        let iface = &self.info.name;
        let mut needs = Vec::new();
        match self.attachment {
            Attachment::Tc(_) if !kernel_at_least(6, 6) => needs.push(Need::new(
                Capability::NetAdmin,
                format!("to detach the TC programs from {iface} at exit"),
            )),
            Attachment::Xdp(_) if !kernel_at_least(5, 9) => needs.push(Need::new(
                Capability::NetAdmin,
                format!("to detach the XDP program from {iface} at exit"),
            )),
            _ => {}
        }
        needs.extend(map_reads_need(format!(
            "to read the kernel counters of {iface}"
        )));
        needs
    }

    fn run(mut self: Box<Self>, mut batcher: Batcher) -> Result<()> {
        tracing::info!(
            "{}: capturing in the kernel with --mode {}",
            self.info.name,
            self.hook.name()
        );
        let snaplen = self.info.snaplen as usize;
        let mut reinserted = Vec::with_capacity(snaplen.min(65536) + 4);
        let mut last_stats = Instant::now();
        let mut open = true;
        loop {
            let stopping = self.stop.load(Relaxed);
            if stopping {
                // Nothing new enters the rings; what they hold is still delivered below.
                self.detach();
            }
            let now = rings::Now {
                monotonic_ns: clock_u64(ClockId::Monotonic),
                real_ns: clock_u64(ClockId::Realtime),
            };
            // REALTIME − BOOTTIME, from the same wall-clock reading as `now`.
            let offset = i128::from(now.real_ns) - clock_ns(ClockId::Boottime);
            let attributor = &mut self.attributor;
            let drained = self.rings.drain(
                now,
                !stopping,
                |record| parse_header(record).map_or(0, |h| timestamp(&h, offset)),
                |record| {
                    let attributor = attributor.as_mut();
                    match deliver(
                        record,
                        offset,
                        snaplen,
                        &mut reinserted,
                        attributor,
                        &mut batcher,
                    ) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => ControlFlow::Break(()),
                    }
                },
            );
            if drained == rings::Drained::Stopped {
                open = false;
            }
            #[cfg(feature = "afxdp")]
            if let Some(sockets) = &mut self.sockets {
                let now = clock_u64(ClockId::Realtime);
                if open && sockets.drain(snaplen, now, &mut batcher).is_err() {
                    open = false;
                }
            }
            if let Some(l) = &mut self.logger {
                l.flush();
            }
            if stopping || !open || batcher.tick().is_err() {
                break;
            }
            if last_stats.elapsed() >= STATS_EVERY {
                self.poll_counters(&batcher);
                last_stats = Instant::now();
            }
            if drained == rings::Drained::Holding {
                // A wait would end at once (the rings hold data): look again shortly.
                std::thread::sleep(HOLD_RECHECK);
            } else {
                self.wait();
            }
        }
        self.poll_counters(&batcher);
        // The transport may already be gone (connection lost): nothing left to do then.
        let _ = batcher.finish();
        Ok(())
    }
}

/// Hands one ring record to the batcher, with a stripped VLAN tag put back after the MAC
/// addresses (as libpcap does, lengths included).
fn deliver(
    record: &[u8],
    boot_to_real: i128,
    snaplen: usize,
    reinserted: &mut Vec<u8>,
    attributor: Option<&mut attribution::Attributor>,
    batcher: &mut Batcher,
) -> Result<(), crate::batcher::Closed> {
    let Some(header) = parse_header(record) else {
        return Ok(());
    };
    let end = HEADER_LEN + header.captured_len as usize;
    let Some(mut data) = record.get(HEADER_LEN..end) else {
        return Ok(());
    };
    let mut wire_len = header.wire_len;
    if header.flags & shared::FLAG_VLAN_STRIPPED != 0 && data.len() >= 12 {
        reinserted.clear();
        reinserted.extend_from_slice(&data[..12]);
        reinserted.extend_from_slice(&header.vlan_tpid.to_be_bytes());
        reinserted.extend_from_slice(&header.vlan_tci.to_be_bytes());
        reinserted.extend_from_slice(&data[12..]);
        reinserted.truncate(snaplen);
        data = reinserted;
        wire_len = wire_len.saturating_add(4);
    }
    let timestamp = timestamp(&header, boot_to_real);
    let direction = match header.direction {
        shared::DIRECTION_INBOUND => Direction::Inbound,
        shared::DIRECTION_OUTBOUND => Direction::Outbound,
        _ => Direction::Unknown,
    };
    let owner = attributor.and_then(|a| a.owner(header.socket_cookie));
    match owner {
        Some((key, known)) => {
            batcher.push_attributed(timestamp, wire_len, direction, data, key, &known.process)
        }
        None => batcher.push(timestamp, wire_len, direction, data),
    }
}

/// Where the process selectors are applied: in the kernel, before any copy (the eBPF
/// modes), or by the sensor, on the frames libpcap hands over (`--mode pcap`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum SelectIn {
    Kernel,
    Sensor,
}

/// `--attribute`: loads the cgroup socket hooks and attaches them to the cgroup2 root,
/// so that every socket of the host gets its owner recorded. Attached as BPF links (the
/// kernel has them here, 6.6+ for TCX), which always sit beside other programs: the kernel
/// wants no attach flags for them, `Single` being the one mode that sends none. Returns the
/// flow table too, which only the sensor's own lookups (`--mode pcap`) need.
fn attach_owner_hooks(
    ebpf: &mut Ebpf,
    mode: &str,
    selectors: &super::Selectors,
    select_in: SelectIn,
) -> Result<(
    attribution::Attributor,
    aya::maps::HashMap<MapData, shared::FlowKey, u64>,
)> {
    let root = attribution::CgroupRoot::open()?;
    let selection = attribution::Selection {
        pids: selectors.pids.clone(),
        comms: selectors
            .comms
            .iter()
            .map(|c| {
                let mut comm = [0u8; 16];
                comm[..c.len()].copy_from_slice(c.as_bytes());
                comm
            })
            .collect(),
        cgroups: attribution::selected_cgroups(&root, selectors)?,
    };
    let selection = match select_in {
        SelectIn::Kernel => {
            select(
                ebpf,
                shared::SELECT_PIDS_MAP,
                selection.pids.iter().copied(),
            )?;
            select(
                ebpf,
                shared::SELECT_COMMS_MAP,
                selection.comms.iter().copied(),
            )?;
            select(
                ebpf,
                shared::SELECT_CGROUPS_MAP,
                selection.cgroups.iter().copied(),
            )?;
            None
        }
        SelectIn::Sensor => (!selectors.is_empty()).then_some(selection),
    };
    let refused = |name: &str, e: &dyn std::error::Error| {
        kernel_refused(
            mode,
            format!(
                "--attribute: cannot attach {name} to the cgroup2 root: {}",
                chain(e)
            ),
            false,
        )
    };
    for name in shared::OWNER_SOCK_HOOKS {
        let prog: &mut CgroupSock = program(ebpf, name)?;
        prog.load().map_err(|e| load_error(mode, name, &e))?;
        prog.attach(root.file(), CgroupAttachMode::Single)
            .map_err(|e| refused(name, &e))?;
    }
    for name in shared::OWNER_ADDR_HOOKS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(|e| load_error(mode, name, &e))?;
        prog.attach(root.file(), CgroupAttachMode::Single)
            .map_err(|e| refused(name, &e))?;
    }
    // Servers' accepted connections need sock_ops with bpf_get_netns_cookie (Linux 5.15):
    // without it, the rest of attribution still works.
    let name = shared::OWNER_ACCEPT_HOOK;
    let prog: &mut SockOps = program(ebpf, name)?;
    let accepted = prog
        .load()
        .map_err(|e| load_error(mode, name, &e))
        .and_then(|()| {
            prog.attach(root.file(), CgroupAttachMode::Single)
                .map_err(|e| refused(name, &e))
        });
    if let Err(e) = accepted {
        tracing::warn!(
            "--attribute: connections that servers on this host accept are not attributed \
             (Linux 5.15 or later needed): {e}"
        );
    }
    let name = shared::OWNER_FLOWS_HOOK;
    let prog: &mut CgroupSkb = program(ebpf, name)?;
    prog.load().map_err(|e| load_error(mode, name, &e))?;
    prog.attach(
        root.file(),
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::Single,
    )
    .map_err(|e| refused(name, &e))?;
    let owners = aya::maps::HashMap::try_from(
        ebpf.take_map(shared::OWNERS_MAP)
            .ok_or_else(|| missing(shared::OWNERS_MAP))?,
    )
    .map_err(|e| Error::runtime(format!("cannot read the socket owners: {e}")))?;
    let mut flows = aya::maps::HashMap::try_from(
        ebpf.take_map(shared::FLOWS_MAP)
            .ok_or_else(|| missing(shared::FLOWS_MAP))?,
    )
    .map_err(|e| Error::runtime(format!("cannot fill the flow table: {e}")))?;
    let mut listeners = aya::maps::HashMap::try_from(
        ebpf.take_map(shared::LISTENERS_MAP)
            .ok_or_else(|| missing(shared::LISTENERS_MAP))?,
    )
    .map_err(|e| Error::runtime(format!("cannot fill the listening ports: {e}")))?;
    let attributor =
        attribution::Attributor::new(owners, &mut flows, &mut listeners, root, selection);
    Ok((attributor, flows))
}

/// `--mode pcap --attribute`: the object's cgroup hooks alone, attached as in the eBPF
/// modes, and the tables they fill, which the sensor reads for libpcap's frames.
pub fn frame_owners(selectors: &super::Selectors) -> Result<FrameOwners> {
    let object = OBJECT.ok_or_else(no_programs)?;
    let mode = "pcap --attribute";
    let mut ebpf = EbpfLoader::new()
        // No frame is copied: the rings' array gets no ring.
        .map_max_entries(shared::RINGS_MAP, 1)
        .override_global(
            shared::SENSOR_TGID_GLOBAL,
            &attribution::tgid_for_hooks(),
            true,
        )
        .load(object)
        .map_err(|e| object_refused(mode, &e))?;
    let (attributor, flows) = attach_owner_hooks(&mut ebpf, mode, selectors, SelectIn::Sensor)?;
    Ok(FrameOwners::new(ebpf, attributor, flows))
}

/// What a capture that reads the kernel's maps while it runs needs for that: before 6.5,
/// kernel.unprivileged_bpf_disabled refuses every bpf() call, reads of existing maps
/// included, to a process without CAP_BPF.
fn map_reads_need(why: String) -> Option<Need> {
    (!kernel_at_least(6, 5) && unprivileged_bpf_disabled()).then(|| Need::new(Capability::Bpf, why))
}

/// Fills one of the kernel's selector sets.
fn select<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, keys: impl Iterator<Item = K>) -> Result<()> {
    let mut set: aya::maps::HashMap<&mut MapData, K, u8> = ebpf
        .map_mut(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(|e| Error::runtime(format!("bad selector map {name}: {e}")))?;
    for key in keys {
        set.insert(key, 1, 0)
            .map_err(|e| Error::runtime(format!("cannot fill {name}: {e}")))?;
    }
    Ok(())
}

const HEADER_LEN: usize = std::mem::size_of::<shared::PacketHeader>();

fn parse_header(record: &[u8]) -> Option<shared::PacketHeader> {
    let bytes = record.get(..HEADER_LEN)?;
    // SAFETY: `bytes` holds HEADER_LEN bytes, PacketHeader is plain integers (aya::Pod)
    // and read_unaligned needs no alignment.
    Some(unsafe {
        bytes
            .as_ptr()
            .cast::<shared::PacketHeader>()
            .read_unaligned()
    })
}

/// A record's wall-clock time in nanoseconds: its own, or its boot time plus `boot_to_real`.
fn timestamp(header: &shared::PacketHeader, boot_to_real: i128) -> u64 {
    let t = if header.flags & shared::FLAG_REALTIME != 0 {
        i128::from(header.boot_ns)
    } else {
        i128::from(header.boot_ns) + boot_to_real
    };
    u64::try_from(t).unwrap_or(0)
}

fn clock_ns(clock: ClockId) -> i128 {
    let t = rustix::time::clock_gettime(clock);
    i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
}

/// `clock` in nanoseconds (since the epoch for the wall clock).
fn clock_u64(clock: ClockId) -> u64 {
    u64::try_from(clock_ns(clock)).unwrap_or(0)
}

/// Compiles the composed filter on a live libpcap handle, as tcpdump does, so that `vlan`
/// tests the tag the kernel moved into metadata (the XDP translation sees frames that way
/// too). Returns the classic program and the interface's link type.
fn compile_filter(iface: &str, mode: &str, opts: &Options) -> Result<(Vec<CbpfInsn>, i32)> {
    let live = Capture::from_device(iface)
        .map_err(|e| Error::runtime(format!("cannot open interface {iface}: {e}")))?
        .snaplen(i32::try_from(opts.snaplen).unwrap_or(i32::MAX))
        .buffer_size(1 << 16)
        .open()
        .map_err(|e| {
            let text = super::pcap::msg(&e);
            if super::pcap::denied(&text) {
                kernel_refused(
                    mode,
                    format!("no permission to capture on {iface}: {text}"),
                    true,
                )
            } else {
                super::pcap::open_error(iface, &e)
            }
        })?;
    super::pcap::check_user_filter(&live, &opts.filter)?;
    let expr = compose_filter(&opts.filter, opts.exclude.as_ref());
    let program = live.compile(&expr, true).map_err(|e| {
        Error::input(format!(
            "invalid filter \"{expr}\": {}",
            super::pcap::msg(&e)
        ))
    })?;
    Ok((CbpfInsn::from_pcap(&program), live.get_datalink().0))
}

fn attach_xdp(
    prog: &mut Xdp,
    iface: &str,
    attach: XdpAttach,
) -> Result<aya::programs::xdp::XdpLinkId> {
    let native = |p: &mut Xdp| p.attach(iface, XdpMode::Driver);
    let generic = |p: &mut Xdp| p.attach(iface, XdpMode::Skb);
    match attach {
        XdpAttach::Native => native(prog).map_err(|e| {
            Error::runtime(format!(
                "cannot attach XDP in the driver of {iface}: {e} (try --xdp-attach skb)"
            ))
        }),
        XdpAttach::Skb => generic(prog).map_err(|e| {
            Error::runtime(format!("cannot attach XDP to {iface}: {e} (try --mode tc)"))
        }),
        XdpAttach::Auto => native(prog).or_else(|e| {
            tracing::info!("{iface}: native XDP unavailable ({e}); attaching in the generic path");
            generic(prog).map_err(|e| {
                Error::runtime(format!("cannot attach XDP to {iface}: {e} (try --mode tc)"))
            })
        }),
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(|e| Error::runtime(format!("eBPF program {name} has the wrong type: {e}")))
}

/// Loads the emit program and returns a duplicate of its descriptor for the program array.
fn load_emit(ebpf: &mut Ebpf, hook: Hook, name: &'static str) -> Result<OwnedFd> {
    let mode = hook.name();
    let prog = ebpf.program_mut(name).ok_or_else(|| missing(name))?;
    let loaded = match prog {
        aya::programs::Program::SocketFilter(p) => p.load(),
        aya::programs::Program::SchedClassifier(p) => p.load(),
        aya::programs::Program::Xdp(p) => p.load(),
        _ => {
            return Err(Error::runtime(format!(
                "eBPF program {name} has the wrong type"
            )))
        }
    };
    loaded.map_err(|e| load_error(mode, name, &e))?;
    prog.fd()
        .map_err(|e| e.to_string())
        .and_then(|fd| fd.as_fd().try_clone_to_owned().map_err(|e| e.to_string()))
        .map_err(|e| Error::runtime(format!("eBPF program {name}: {e}")))
}

fn map_fd(ebpf: &Ebpf, name: &str) -> Result<OwnedFd> {
    let map = ebpf.map(name).ok_or_else(|| missing(name))?;
    let data: &MapData = match map {
        aya::maps::Map::ProgramArray(d) | aya::maps::Map::PerCpuArray(d) => d,
        _ => {
            return Err(Error::runtime(format!(
                "eBPF map {name} has the wrong type"
            )))
        }
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::runtime(format!("eBPF map {name}: {e}")))
}

fn missing(name: &str) -> Error {
    Error::runtime(format!(
        "the embedded eBPF object lacks {name}; rebuild with cargo xtask build-ebpf"
    ))
}

/// The kernel refused the object's maps (or the object is bad).
fn object_refused(mode: &str, e: &aya::EbpfError) -> Error {
    kernel_refused(
        mode,
        format!("cannot load the eBPF programs: {}", chain(e)),
        denied(errno(e)),
    )
}

fn load_error(mode: &str, name: &str, e: &aya::programs::ProgramError) -> Error {
    kernel_refused(
        mode,
        format!("cannot load eBPF program {name}: {}", chain(e)),
        denied(errno(e)),
    )
}

/// The `errno` of the system call an error comes from, found among its causes (Aya, xsk-rs
/// and our own loader keep the call's `io::Error` as a source).
pub(super) fn errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(n) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        next = e.source();
    }
    None
}

/// Whether the kernel refused for want of privilege.
fn denied(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EPERM | libc::EACCES))
}

/// An error with its causes (where Aya keeps errno and the verifier's log), on one line.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors repeat their cause in their own message.
        let cause = s.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = s.source();
    }
    text
}

/// Explains a refusal by the kernel: the missing capabilities when it `denied` for want of
/// privilege (EPERM, EACCES), else that the kernel may lack what the mode needs.
fn kernel_refused(mode: &str, text: String, denied: bool) -> Error {
    if denied {
        let caps = if mode == "afxdp" {
            "CAP_NET_RAW, CAP_BPF, CAP_NET_ADMIN and CAP_IPC_LOCK"
        } else {
            "CAP_NET_RAW, CAP_BPF and CAP_NET_ADMIN"
        };
        Error::runtime(format!(
            "{text} (--mode {mode} needs {caps}, or root; --mode pcap needs only CAP_NET_RAW)"
        ))
    } else {
        Error::runtime(format!(
            "{text} (this kernel may lack what --mode {mode} needs; --mode pcap works \
             without eBPF)"
        ))
    }
}

/// Whether the running kernel is at least `major.minor`; an unknown one counts as older,
/// which at worst keeps a capability more.
fn kernel_at_least(major: u8, minor: u8) -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(major, minor, 0))
}

/// kernel.unprivileged_bpf_disabled, taken as set when it cannot be read.
fn unprivileged_bpf_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map_or(true, |v| v.trim() != "0")
}

fn is_loopback(iface: &str) -> bool {
    pcap::Device::list().is_ok_and(|devices| {
        devices
            .iter()
            .any(|d| d.name == iface && d.flags.is_loopback())
    })
}

fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| Error::input(format!("bad interface name {iface:?}")))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(super::pcap::unknown_interface(iface));
    }
    Ok(index)
}

const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET socket that receives nothing until bound.
fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_all(socket: &OwnedFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and its size is passed with it.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Promiscuous mode for as long as the socket lives (the kernel counts memberships, so
/// other users of the interface are unaffected).
fn set_promiscuous(socket: &OwnedFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: packet_mreq is plain data; all-zero is a valid start.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: `mreq` is a valid packet_mreq and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&raw const mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
