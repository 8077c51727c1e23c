//! Capstream's in-kernel capture programs.
//!
//! Every mode runs the same chain, joined by tail calls through `CAPSTREAM_PROGRAMS`:
//!
//! 1. an **entry** program (socket filter, TC ingress/egress, or XDP) counts the packet and
//!    records its direction;
//! 2. the **filter**: the user's tcpdump expression, compiled by libpcap to classic BPF
//!    and translated to eBPF by the sensor at start-up (slot `PROG_FILTER`); when it
//!    accepts, it stores its result (the snap length) in the scratch and jumps to
//! 3. the mode's **emit** program (slot `PROG_EMIT`), which copies the frame into the ring.
//!
//! All of them are passive: whatever happens, the packet goes on untouched.
#![no_std]
#![no_main]

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::bindings::xdp_action::XDP_PASS;
use aya_ebpf::btf_maps::{ArrayOfMaps, RingBuf};
use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    bpf_get_netns_cookie, bpf_get_smp_processor_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
    bpf_ringbuf_query, bpf_skb_load_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
};
use aya_ebpf::macros::{
    btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, classifier, map, sock_ops, socket_filter,
    xdp,
};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, ProgramArray, XskMap};
use aya_ebpf::programs::{
    SkBuffContext, SockAddrContext, SockContext, SockOpsContext, TcContext, XdpContext,
};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use sensor_ebpf::{
    FlowKey, ListenerKey, Owner, PacketHeader, Scratch, COUNTERS, COUNTER_CHAIN_FAILED,
    COUNTER_MATCHED, COUNTER_RING_FULL, COUNTER_SEEN, DIRECTION_INBOUND, DIRECTION_OUTBOUND,
    FLAG_REALTIME, FLAG_VLAN_STRIPPED, MAX_CAPTURE, MAX_FLOWS, MAX_LISTENERS, MAX_OWNERS,
    MAX_QUEUES, MAX_SELECTED, PROG_FILTER,
};

/// What a TC program returns to let the packet go on to the next program, or on its way
/// (TC_ACT_UNSPEC, TCX_NEXT).
const TC_NEXT: i32 = -1;
/// A socket filter's "deliver 0 bytes": the frame reached the ring, the socket needs nothing.
const SOCKET_KEEP_NOTHING: i64 = 0;
const PACKET_OUTGOING: u32 = 4;

/// The user's snap length; the sensor sets it when loading.
#[no_mangle]
static CAPSTREAM_SNAPLEN: u32 = MAX_CAPTURE;

/// Non-zero with `--attribute`: frames carry their socket's cookie. The sensor sets it.
#[no_mangle]
static CAPSTREAM_ATTRIBUTE: u32 = 0;

/// The sensor's own process id (tgid), set when loading: its own sockets are left out of
/// the owner table, so that its QUIC sends cost it no table update and no flow lookup per
/// datagram (its traffic to receivers is left out of the capture anyway).
#[no_mangle]
static CAPSTREAM_SENSOR_TGID: u32 = 0;

/// Non-zero with process selectors: only frames whose owner matches one are taken.
#[no_mangle]
static CAPSTREAM_SELECTING: u32 = 0;

/// Non-zero on a loopback interface, where every packet passes the socket twice (going
/// out, then coming in): as libpcap does, only the incoming copy counts.
#[no_mangle]
static CAPSTREAM_LOOPBACK: u32 = 0;

/// A CPU's ring. The size here only describes the kind of map: the sensor creates each
/// CPU's ring itself, sized from --ring-size.
type Ring = RingBuf<u8, { 1 << 16 }>;

/// One ring per CPU, by CPU number (see `RINGS_MAP`); the sensor sets the number of slots
/// to the machine's possible CPUs.
#[btf_map]
static CAPSTREAM_RINGS: ArrayOfMaps<Ring, 1> = ArrayOfMaps::new();
#[map]
static CAPSTREAM_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);
#[map]
static CAPSTREAM_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map]
static CAPSTREAM_XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static CAPSTREAM_OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(MAX_OWNERS, 0);
#[map]
static CAPSTREAM_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static CAPSTREAM_LISTENERS: LruHashMap<ListenerKey, Owner> =
    LruHashMap::with_max_entries(MAX_LISTENERS, 0);
#[map]
static CAPSTREAM_SELECT_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_SELECTED, 0);
#[map]
static CAPSTREAM_SELECT_COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_SELECTED, 0);
#[map]
static CAPSTREAM_SELECT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_SELECTED, 0);
#[map]
static CAPSTREAM_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A global the sensor sets at load time; read volatile so that the compiler does not
/// fold in the value the object was built with.
#[inline(always)]
fn load_global<T: Copy>(global: &T) -> T {
    // SAFETY: a reference to a live, initialised global of plain data.
    unsafe { core::ptr::read_volatile(global) }
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(n) = CAPSTREAM_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a per-CPU slot, written only by programs on this CPU, which run to
        // completion without preemption by another of ours.
        unsafe { *n += 1 };
    }
}

/// Counts the packet, notes its direction, and jumps to the filter.
#[inline(always)]
fn enter<C: EbpfContext>(ctx: &C, direction: u8) {
    count(COUNTER_SEEN);
    if let Some(s) = CAPSTREAM_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch, see `count`.
        unsafe { (*s).direction = u32::from(direction) };
    }
    // SAFETY: the context is this program's own; on success this does not return.
    unsafe { CAPSTREAM_PROGRAMS.tail_call(ctx, PROG_FILTER) };
    count(COUNTER_CHAIN_FAILED);
    debug!(ctx, "capstream: no filter program in the chain");
}

/// What emit needs from a mode's context.
trait Frame: EbpfContext {
    /// The frame's full length (all fragments), without a stripped VLAN tag.
    fn wire_len(&self) -> u32;
    /// Copies `len` bytes from the frame's start; false if the kernel refused.
    fn copy_to(&self, dst: *mut u8, len: u32) -> bool {
        self.load(0, dst, len)
    }
    /// Copies `len` bytes from `offset`; false if the kernel refused (past the end).
    fn load(&self, offset: u32, dst: *mut u8, len: u32) -> bool;
    /// The VLAN tag the kernel moved out of the frame: (TCI, TPID in host order).
    fn stripped_vlan(&self) -> Option<(u16, u16)>;
    /// The kernel's own receive timestamp (CLOCK_REALTIME ns), where the hook can read it.
    fn realtime_stamp(&self) -> Option<u64> {
        None
    }
    /// The cookie of the socket the frame belongs to, 0 if none (or the hook cannot tell).
    fn socket_cookie(&self) -> u64 {
        0
    }
    /// The frame's linear part as (start, end) addresses, where the hook may read packet
    /// memory in place (TC, XDP): a bounds check instead of a helper call per read.
    fn linear(&self) -> Option<(usize, usize)> {
        None
    }
}

/// `N` bytes of the frame from `offset`: read in place when the linear part holds them,
/// else copied by the kernel's helper (a socket filter, or headers past the linear part).
#[inline(always)]
fn read_bytes<F: Frame, const N: usize>(frame: &F, offset: u32) -> Option<[u8; N]> {
    if let Some((start, end)) = frame.linear() {
        let at = start + offset as usize;
        if at + N <= end {
            // SAFETY: [at, at + N) lies within the linear part, as checked just above (the
            // check the verifier needs); the bytes are plain data, read unaligned.
            return Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) });
        }
    }
    let mut out = [0u8; N];
    frame
        .load(offset, out.as_mut_ptr(), N as u32)
        .then_some(out)
}

macro_rules! skb_frame {
    ($ctx:ty, $tstamp:ident, $cookie:ident, $linear:ident) => {
        impl Frame for $ctx {
            #[inline(always)]
            fn wire_len(&self) -> u32 {
                // SAFETY: the context pointer the kernel passed in.
                unsafe { (*self.skb.skb).len }
            }
            #[inline(always)]
            fn load(&self, offset: u32, dst: *mut u8, len: u32) -> bool {
                // SAFETY: `dst` points to at least `len` writable bytes.
                unsafe { bpf_skb_load_bytes(self.as_ptr(), offset, dst.cast(), len) == 0 }
            }
            #[inline(always)]
            fn stripped_vlan(&self) -> Option<(u16, u16)> {
                // SAFETY: the context pointer the kernel passed in.
                let skb = unsafe { &*self.skb.skb };
                #[allow(clippy::cast_possible_truncation)]
                (skb.vlan_present != 0)
                    .then(|| (skb.vlan_tci as u16, u16::from_be(skb.vlan_proto as u16)))
            }
            #[inline(always)]
            fn realtime_stamp(&self) -> Option<u64> {
                // SAFETY: the context pointer the kernel passed in.
                $tstamp(unsafe { &*self.skb.skb })
            }
            #[inline(always)]
            fn socket_cookie(&self) -> u64 {
                $cookie(self)
            }
            #[inline(always)]
            fn linear(&self) -> Option<(usize, usize)> {
                $linear(self)
            }
        }
    };
}
skb_frame!(SkBuffContext, no_tstamp, no_socket, no_linear);
skb_frame!(TcContext, realtime_tstamp, skb_socket, tc_linear);

#[inline(always)]
fn tc_linear(ctx: &TcContext) -> Option<(usize, usize)> {
    Some((ctx.data(), ctx.data_end()))
}

/// Socket filters may not read packet memory in place.
#[inline(always)]
fn no_linear<C>(_: &C) -> Option<(usize, usize)> {
    None
}

/// The sending socket's cookie, on TC egress (ingress runs before the stack found one),
/// when `--attribute` asked for it.
#[inline(always)]
fn skb_socket<C: EbpfContext>(ctx: &C) -> u64 {
    if load_global(&CAPSTREAM_ATTRIBUTE) == 0 {
        return 0;
    }
    // SAFETY: the context pointer the kernel passed in; 0 when the skb has no socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A socket filter's frame is a clone, which carries no socket.
#[inline(always)]
fn no_socket<C: EbpfContext>(_: &C) -> u64 {
    0
}

/// `__sk_buff.tstamp_type` of a receive time on CLOCK_REALTIME.
const BPF_SKB_CLOCK_REALTIME: u32 = 0;

/// skb->tstamp when it is a receive time on the real-time clock: the stamp tcpdump gets
/// for the same frame. On egress it is usually unset, or a delivery time on another clock.
#[inline(always)]
fn realtime_tstamp(skb: &__sk_buff) -> Option<u64> {
    (skb.tstamp != 0 && u32::from(skb.tstamp_type) == BPF_SKB_CLOCK_REALTIME).then_some(skb.tstamp)
}

/// Socket filters may not read skb->tstamp.
#[inline(always)]
fn no_tstamp(_: &__sk_buff) -> Option<u64> {
    None
}

impl Frame for XdpContext {
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)]
    fn wire_len(&self) -> u32 {
        // SAFETY: the context pointer the kernel passed in.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }
    #[inline(always)]
    fn load(&self, offset: u32, dst: *mut u8, len: u32) -> bool {
        // SAFETY: `dst` points to at least `len` writable bytes.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, dst.cast(), len) == 0 }
    }
    /// XDP runs before the kernel takes tags out: they are still in the bytes.
    #[inline(always)]
    fn stripped_vlan(&self) -> Option<(u16, u16)> {
        None
    }
    #[inline(always)]
    fn linear(&self) -> Option<(usize, usize)> {
        Some((self.data(), self.data_end()))
    }
}

const HEADER_LEN: usize = core::mem::size_of::<PacketHeader>();

const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Waking the sensor for every frame costs more than capturing it: the sensor is woken
/// once the ring holds this many bytes, and otherwise finds the frames at its next poll
/// timeout (it polls every few tens of milliseconds anyway).
#[no_mangle]
static CAPSTREAM_WAKEUP_BYTES: u64 = 1 << 20;

/// Bytes a ring record takes beside its data: the kernel's own 8-byte header.
const RINGBUF_RECORD_HEADER: u64 = 8;

/// Wakes the sensor when this record (`record_bytes` of data, already reserved) carries
/// the ring past a multiple of the threshold, not on every record past it: a wakeup costs
/// about 2.5 µs, 15 times a 1500-byte frame's copy, and a sensor that lags behind a flood
/// would otherwise pay it per frame, just when it can least afford to. A sensor that is
/// awake reads on while the ring holds data (its poll sees it at once); one asleep is woken
/// at each crossing, so two producers racing past one crossing delay it by a threshold at
/// most, or by the sensor's poll timeout on a trickle. Past half the ring every record
/// wakes it again, as before: a guard against a wakeup missed, when the rest of the ring
/// lasts less than the poll timeout at a high rate.
#[inline(always)]
fn wakeup_flag(ring: &Ring, record_bytes: u64) -> u64 {
    let threshold = load_global(&CAPSTREAM_WAKEUP_BYTES);
    if threshold == 0 {
        return BPF_RB_FORCE_WAKEUP;
    }
    // SAFETY: the ring is a map the kernel handed out, looked up in CAPSTREAM_RINGS.
    let after = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(ring).cast_mut().cast(),
            BPF_RB_AVAIL_DATA,
        )
    };
    let before = after.saturating_sub(record_bytes + RINGBUF_RECORD_HEADER);
    // The threshold is an eighth of a ring, whose size is a power of two: a mask finds the
    // multiple, where a division would cost more than the rest of this function.
    let crossed = if threshold.is_power_of_two() {
        let multiple = !(threshold - 1);
        after & multiple != before & multiple
    } else {
        after / threshold != before / threshold
    };
    if crossed || after >= threshold.saturating_mul(4) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Copies the frame into a ring record of a fixed size class: the kernel wants a constant
/// reservation size, and classes in powers of two waste at most half the space.
#[inline(always)]
fn copy_class<F: Frame, const N: usize>(frame: &F, ring: &Ring, header: &PacketHeader) -> bool {
    let Some(mut record) = ring.reserve_bytes(HEADER_LEN + N, 0) else {
        return false;
    };
    // The verifier needs the length proven within [1, N], one bound at a time. The
    // volatile read keeps the compiler from dropping the bounds it can prove from the
    // caller's size test, which the verifier does not connect to this register.
    // SAFETY: a read of a field of a live reference.
    let mut len = unsafe { core::ptr::read_volatile(&header.captured_len) };
    if len > N as u32 {
        len = N as u32;
    }
    if len == 0 {
        record.discard(0);
        return true;
    }
    let base = record.as_mut_ptr();
    // SAFETY: the reservation holds HEADER_LEN + N bytes and is 8-byte aligned.
    unsafe { base.cast::<PacketHeader>().write(*header) };
    // SAFETY: HEADER_LEN < HEADER_LEN + N.
    if frame.copy_to(unsafe { base.add(HEADER_LEN) }, len) {
        record.submit(wakeup_flag(ring, (HEADER_LEN + N) as u64));
    } else {
        record.discard(0);
    }
    true
}

/// Copies an accepted frame into the ring, or counts it lost when the ring is full.
#[inline(always)]
fn emit<F: Frame>(frame: &F) {
    let Some(scratch) = CAPSTREAM_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, written by this packet's entry and filter programs.
    let scratch = unsafe { *scratch };
    let owner_cookie = owner_cookie(frame, scratch.direction == u32::from(DIRECTION_OUTBOUND));
    if !selected(owner_cookie) {
        return;
    }
    count(COUNTER_MATCHED);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ring) = CAPSTREAM_RINGS.get(cpu) else {
        count(COUNTER_RING_FULL);
        return;
    };
    let wire_len = frame.wire_len();
    let snaplen = load_global(&CAPSTREAM_SNAPLEN);
    let mut header = PacketHeader {
        // SAFETY: a helper without arguments.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        wire_len,
        captured_len: wire_len.min(scratch.snap).min(snaplen).min(MAX_CAPTURE),
        direction: scratch.direction as u8,
        socket_cookie: owner_cookie,
        ..PacketHeader::default()
    };
    if let Some(stamp) = frame.realtime_stamp() {
        header.boot_ns = stamp;
        header.flags |= FLAG_REALTIME;
    }
    if let Some((tci, tpid)) = frame.stripped_vlan() {
        header.flags |= FLAG_VLAN_STRIPPED;
        header.vlan_tci = tci;
        header.vlan_tpid = tpid;
    }
    let len = header.captured_len;
    let copied = if len <= 128 {
        copy_class::<F, 128>(frame, ring, &header)
    } else if len <= 256 {
        copy_class::<F, 256>(frame, ring, &header)
    } else if len <= 512 {
        copy_class::<F, 512>(frame, ring, &header)
    } else if len <= 1024 {
        copy_class::<F, 1024>(frame, ring, &header)
    } else if len <= 2048 {
        copy_class::<F, 2048>(frame, ring, &header)
    } else if len <= 4096 {
        copy_class::<F, 4096>(frame, ring, &header)
    } else if len <= 9216 {
        copy_class::<F, 9216>(frame, ring, &header)
    } else if len <= 16384 {
        copy_class::<F, 16384>(frame, ring, &header)
    } else if len <= 32768 {
        copy_class::<F, 32768>(frame, ring, &header)
    } else if len <= 65536 {
        copy_class::<F, 65536>(frame, ring, &header)
    } else {
        copy_class::<F, { MAX_CAPTURE as usize }>(frame, ring, &header)
    };
    if !copied {
        count(COUNTER_RING_FULL);
    }
}

#[socket_filter]
pub fn capstream_socket(ctx: SkBuffContext) -> i64 {
    // SAFETY: the context pointer the kernel passed in.
    let outgoing = unsafe { (*ctx.skb.skb).pkt_type } == PACKET_OUTGOING;
    if outgoing && load_global(&CAPSTREAM_LOOPBACK) != 0 {
        return SOCKET_KEEP_NOTHING;
    }
    enter(
        &ctx,
        if outgoing {
            DIRECTION_OUTBOUND
        } else {
            DIRECTION_INBOUND
        },
    );
    SOCKET_KEEP_NOTHING
}

#[socket_filter]
pub fn capstream_socket_emit(ctx: SkBuffContext) -> i64 {
    emit(&ctx);
    SOCKET_KEEP_NOTHING
}

#[classifier]
pub fn capstream_tc_ingress(ctx: TcContext) -> i32 {
    enter(&ctx, DIRECTION_INBOUND);
    TC_NEXT
}

#[classifier]
pub fn capstream_tc_egress(ctx: TcContext) -> i32 {
    enter(&ctx, DIRECTION_OUTBOUND);
    TC_NEXT
}

#[classifier]
pub fn capstream_tc_emit(ctx: TcContext) -> i32 {
    emit(&ctx);
    TC_NEXT
}

#[xdp(frags)]
pub fn capstream_xdp(ctx: XdpContext) -> u32 {
    enter(&ctx, DIRECTION_INBOUND);
    XDP_PASS
}

#[xdp(frags)]
pub fn capstream_xdp_emit(ctx: XdpContext) -> u32 {
    emit(&ctx);
    XDP_PASS
}

/// `--mode afxdp`: hands an accepted frame to the AF_XDP socket of its RX queue, whole
/// (the sensor applies the snap length). Without a socket there, the frame goes on to the
/// stack; a socket that cannot take it counts the drop (XDP_STATISTICS).
#[xdp(frags)]
pub fn capstream_afxdp_emit(ctx: XdpContext) -> u32 {
    count(COUNTER_MATCHED);
    // SAFETY: the context pointer the kernel passed in.
    let queue = unsafe { (*ctx.ctx).rx_queue_index };
    CAPSTREAM_XSKS
        .redirect(queue, u64::from(XDP_PASS))
        .unwrap_or(XDP_PASS)
}

/// The cookie of the socket a frame belongs to, with `--attribute`: an outbound frame's own
/// socket when its owner is known (TC egress), else the socket of its flow (a reply, a
/// frame seen without its socket, a socket older than the sensor). 0 if unknown.
#[inline(always)]
fn owner_cookie<F: Frame>(frame: &F, outbound: bool) -> u64 {
    if load_global(&CAPSTREAM_ATTRIBUTE) == 0 {
        return 0;
    }
    let cookie = if outbound { frame.socket_cookie() } else { 0 };
    // SAFETY: map values are read, not kept.
    if cookie != 0 && unsafe { CAPSTREAM_OWNERS.get(&cookie) }.is_some() {
        return cookie;
    }
    match flow_of(frame, outbound) {
        // SAFETY: as above.
        Some(flow) => unsafe { CAPSTREAM_FLOWS.get(&flow) }.copied().unwrap_or(0),
        None => 0,
    }
}

/// `--attribute`, on the cgroup2 root: learns the flow of every packet a socket with a
/// known owner sends, on any interface, before any capture hook sees the packet, so that
/// every mode finds replies and socketless copies by flow. Always lets the packet go.
#[cgroup_skb(egress)]
pub fn capstream_owner_flows(ctx: SkBuffContext) -> i32 {
    // SAFETY: a helper on the context pointer the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map values are read, not kept.
    if cookie == 0 || unsafe { CAPSTREAM_OWNERS.get(&cookie) }.is_none() {
        return ALLOW;
    }
    // The packet starts at its IP header here.
    let mut version = 0u8;
    if !Frame::load(&ctx, 0, &mut version, 1) {
        return ALLOW;
    }
    if let Some(flow) = flow_from_ip(&ctx, 0, version >> 4 == 6, true) {
        // SAFETY: as above.
        if unsafe { CAPSTREAM_FLOWS.get(&flow) }.copied() != Some(cookie) {
            let _ = CAPSTREAM_FLOWS.insert(&flow, &cookie, 0);
        }
    }
    ALLOW
}

/// Whether the frame's owner matches a process selector (always, without selectors).
#[inline(always)]
fn selected(cookie: u64) -> bool {
    if load_global(&CAPSTREAM_SELECTING) == 0 {
        return true;
    }
    // SAFETY: map values are read, not kept.
    let Some(owner) = (unsafe { CAPSTREAM_OWNERS.get(&cookie) }) else {
        return false;
    };
    // SAFETY: as above.
    unsafe {
        CAPSTREAM_SELECT_PIDS.get(&owner.tgid).is_some()
            || CAPSTREAM_SELECT_COMMS.get(&owner.comm).is_some()
            || CAPSTREAM_SELECT_CGROUPS.get(&owner.cgroup_id).is_some()
    }
}

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The TCP or UDP flow of an Ethernet frame, from this host's end.
#[inline(always)]
fn flow_of<F: Frame>(frame: &F, outbound: bool) -> Option<FlowKey> {
    let ethertype: [u8; 2] = read_bytes(frame, 12)?;
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => flow_from_ip(frame, ETH_HLEN, false, outbound),
        ETH_P_IPV6 => flow_from_ip(frame, ETH_HLEN, true, outbound),
        _ => None,
    }
}

/// The TCP or UDP flow of an IPv4 or IPv6 packet at offset `l3`, from this host's end.
#[inline(always)]
fn flow_from_ip<F: Frame>(frame: &F, l3: u32, v6: bool, outbound: bool) -> Option<FlowKey> {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let protocol;
    let l4;
    match v6 {
        false => {
            let ip: [u8; 20] = read_bytes(frame, l3)?;
            protocol = ip[9];
            l4 = l3 + u32::from(ip[0] & 0x0f) * 4;
            src[10] = 0xff;
            src[11] = 0xff;
            dst[10] = 0xff;
            dst[11] = 0xff;
            src[12..].copy_from_slice(&ip[12..16]);
            dst[12..].copy_from_slice(&ip[16..20]);
        }
        true => {
            let ip: [u8; 40] = read_bytes(frame, l3)?;
            protocol = ip[6];
            l4 = l3 + 40;
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
        }
    }
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let ports: [u8; 4] = read_bytes(frame, l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Some(if outbound {
        FlowKey {
            local: src,
            remote: dst,
            local_port: sport,
            remote_port: dport,
            protocol,
            _reserved: [0; 3],
        }
    } else {
        FlowKey {
            local: dst,
            remote: src,
            local_port: dport,
            remote_port: sport,
            protocol,
            _reserved: [0; 3],
        }
    })
}

/// Remembers the current task as the owner of the hook's socket, and returns it (none for
/// the sensor's own sockets).
#[inline(always)]
fn remember_owner<C: EbpfContext>(ctx: &C) -> Option<Owner> {
    // SAFETY: a helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    #[allow(clippy::cast_possible_truncation)]
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == load_global(&CAPSTREAM_SENSOR_TGID) {
        return None;
    }
    // SAFETY: helpers on the context pointer the kernel passed in, or without arguments.
    let (cookie, netns_cookie, uid_gid, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_uid_gid(),
            bpf_get_current_cgroup_id(),
        )
    };
    #[allow(clippy::cast_possible_truncation)]
    let owner = Owner {
        tgid,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        _reserved: 0,
        cgroup_id,
        netns_cookie,
        comm: aya_ebpf::helpers::bpf_get_current_comm().unwrap_or_default(),
    };
    let _ = CAPSTREAM_OWNERS.insert(&cookie, &owner, 0);
    Some(owner)
}

/// [`remember_owner`], and for a TCP socket the port it bound, for the connections it may
/// accept. Always lets the bind go on.
#[inline(always)]
fn remember_binder(ctx: &SockContext) -> i32 {
    let Some(owner) = remember_owner(ctx) else {
        return ALLOW;
    };
    // SAFETY: the socket the kernel passed in.
    let (protocol, port) = unsafe { ((*ctx.sock).protocol, (*ctx.sock).src_port) };
    if protocol == u32::from(IPPROTO_TCP) {
        let key = ListenerKey {
            netns_cookie: owner.netns_cookie,
            #[allow(clippy::cast_possible_truncation)]
            port: port as u16,
            _reserved: [0; 6],
        };
        let _ = CAPSTREAM_LISTENERS.insert(&key, &owner, 0);
    }
    ALLOW
}

/// What a cgroup socket hook returns to let the operation proceed.
const ALLOW: i32 = 1;

#[cgroup_sock(sock_create)]
pub fn capstream_owner_create(ctx: SockContext) -> i32 {
    remember_owner(&ctx);
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn capstream_owner_post_bind4(ctx: SockContext) -> i32 {
    remember_binder(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn capstream_owner_post_bind6(ctx: SockContext) -> i32 {
    remember_binder(&ctx)
}

/// `bpf_sock_ops.op` when a connection the host accepted is established.
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// `--attribute`: an accepted TCP connection, once established (in the softirq, with no
/// task of the server at hand), gets the owner of the port it was accepted on, and its
/// flow, so that its frames find it both ways.
#[sock_ops]
pub fn capstream_owner_accepted(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        remember_accepted(&ctx);
    }
    1
}

#[inline(always)]
fn remember_accepted(ctx: &SockOpsContext) {
    // Context fields are loaded whole (4 bytes), not narrowed: the volatile read keeps the
    // compiler from loading only the half it keeps.
    // SAFETY: a read of a field of the context the kernel passed in.
    #[allow(clippy::cast_possible_truncation)]
    let local_port = unsafe { core::ptr::read_volatile(&(*ctx.ops).local_port) } as u16;
    let key = ListenerKey {
        // SAFETY: a helper on the context pointer the kernel passed in.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: local_port,
        _reserved: [0; 6],
    };
    // SAFETY: map values are read, not kept.
    let Some(owner) = (unsafe { CAPSTREAM_LISTENERS.get(&key) }).copied() else {
        return;
    };
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    match ctx.family() {
        AF_INET => {
            local[10..12].copy_from_slice(&[0xff, 0xff]);
            remote[10..12].copy_from_slice(&[0xff, 0xff]);
            // Both in network order: their bytes as they lie in memory.
            local[12..].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
            remote[12..].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
        }
        AF_INET6 => {
            // The verifier takes context fields one at a time, at constant offsets.
            // SAFETY: reads of fields of the context the kernel passed in.
            let (l, r) = unsafe {
                let ops = &*ctx.ops;
                (
                    [
                        core::ptr::read_volatile(&ops.local_ip6[0]),
                        core::ptr::read_volatile(&ops.local_ip6[1]),
                        core::ptr::read_volatile(&ops.local_ip6[2]),
                        core::ptr::read_volatile(&ops.local_ip6[3]),
                    ],
                    [
                        core::ptr::read_volatile(&ops.remote_ip6[0]),
                        core::ptr::read_volatile(&ops.remote_ip6[1]),
                        core::ptr::read_volatile(&ops.remote_ip6[2]),
                        core::ptr::read_volatile(&ops.remote_ip6[3]),
                    ],
                )
            };
            for i in 0..4 {
                local[i * 4..i * 4 + 4].copy_from_slice(&l[i].to_ne_bytes());
                remote[i * 4..i * 4 + 4].copy_from_slice(&r[i].to_ne_bytes());
            }
        }
        _ => return,
    }
    // The remote port is in network order, in the upper half on little-endian hosts.
    let raw = ctx.remote_port();
    #[allow(clippy::cast_possible_truncation)]
    let remote_port = u16::from_be(if raw > 0xffff {
        (raw >> 16) as u16
    } else {
        raw as u16
    });
    let flow = FlowKey {
        local,
        remote,
        local_port,
        remote_port,
        protocol: IPPROTO_TCP,
        _reserved: [0; 3],
    };
    // SAFETY: a helper on the context pointer the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CAPSTREAM_OWNERS.insert(&cookie, &owner, 0);
    let _ = CAPSTREAM_FLOWS.insert(&flow, &cookie, 0);
}

#[cgroup_sock_addr(connect4)]
pub fn capstream_owner_connect4(ctx: SockAddrContext) -> i32 {
    remember_owner(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn capstream_owner_connect6(ctx: SockAddrContext) -> i32 {
    remember_owner(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn capstream_owner_sendmsg4(ctx: SockAddrContext) -> i32 {
    remember_owner(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn capstream_owner_sendmsg6(ctx: SockAddrContext) -> i32 {
    remember_owner(&ctx);
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
