//! What the in-kernel programs and the sensor share: map and program names, counter
//! indices, and the record each captured frame becomes in its CPU's ring buffer.
//!
//! `#![no_std]` so that the eBPF programs (built for `bpfel-unknown-none`) and the sensor
//! use the very same definitions; the `user` feature adds the `aya::Pod` impls the sensor
//! needs to read them from maps.
#![no_std]

/// The rings of captured frames, one per CPU (BPF_MAP_TYPE_ARRAY_OF_MAPS of
/// BPF_MAP_TYPE_RINGBUF, indexed by CPU number): a frame goes into the ring of the CPU that
/// captures it, as two CPUs reserving in one ring serialise on its lock. The sensor creates
/// the rings and merges them by timestamp.
pub const RINGS_MAP: &str = "CAPSTREAM_RINGS";
/// Per-CPU packet counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "CAPSTREAM_COUNTERS";
/// The tail-call chain: [`PROG_FILTER`] and [`PROG_EMIT`].
pub const PROGRAMS_MAP: &str = "CAPSTREAM_PROGRAMS";
/// AF_XDP sockets by RX queue (BPF_MAP_TYPE_XSKMAP), for `--mode afxdp`.
pub const XSKS_MAP: &str = "CAPSTREAM_XSKS";
/// The most RX queues `--mode afxdp` serves.
pub const MAX_QUEUES: u32 = 256;
/// Per-CPU [`Scratch`]: how the entry, filter and emit programs of one packet talk.
pub const SCRATCH_MAP: &str = "CAPSTREAM_SCRATCH";
/// The global holding the snap length (a `u32`), set at load time.
pub const SNAPLEN_GLOBAL: &str = "CAPSTREAM_SNAPLEN";
/// Who owns each socket, by socket cookie (BPF_MAP_TYPE_LRU_HASH of [`Owner`]), filled by
/// the cgroup socket hooks for `--attribute`.
///
/// A released socket is not forgotten at once: its last frames (a FIN after `close()`) and
/// the frames still in the ring when it goes need its owner. Cookies are never reused, so
/// the least recently used entries are forgotten when the map is full instead.
pub const OWNERS_MAP: &str = "CAPSTREAM_OWNERS";
/// Sockets [`OWNERS_MAP`] remembers; the least recently used is forgotten first.
pub const MAX_OWNERS: u32 = 65_536;
/// The cgroup socket hooks of `--attribute`, attached to the cgroup2 root: a socket's
/// creation and its binds; with [`OWNER_ADDR_HOOKS`], its `connect()`s and UDP
/// `sendmsg()`s (the caller may differ from the creator: a socket passed on, or inherited
/// over fork).
pub const OWNER_SOCK_HOOKS: [&str; 3] = [
    "capstream_owner_create",
    "capstream_owner_post_bind4",
    "capstream_owner_post_bind6",
];
/// The egress hook (cgroup_skb) of `--attribute` that learns each owned socket's flows.
pub const OWNER_FLOWS_HOOK: &str = "capstream_owner_flows";
/// The TCP ports processes bound, by network namespace (BPF_MAP_TYPE_LRU_HASH of
/// [`ListenerKey`] → [`Owner`]), filled by the bind hooks and at start from the listening
/// sockets: a connection a server accepts passes no hook in a task of the server, so it
/// gets the owner of the port it was accepted on, once established ([`OWNER_ACCEPT_HOOK`]).
pub const LISTENERS_MAP: &str = "CAPSTREAM_LISTENERS";
/// Ports [`LISTENERS_MAP`] remembers.
pub const MAX_LISTENERS: u32 = 16_384;
/// The sock_ops hook of `--attribute`: a passively established (accepted) TCP connection
/// gets its listener's owner and its flow.
pub const OWNER_ACCEPT_HOOK: &str = "capstream_owner_accepted";
/// The address hooks of `--attribute` (cgroup/connect4 … sendmsg6).
pub const OWNER_ADDR_HOOKS: [&str; 4] = [
    "capstream_owner_connect4",
    "capstream_owner_connect6",
    "capstream_owner_sendmsg4",
    "capstream_owner_sendmsg6",
];

/// Flows to their owner's socket cookie (BPF_MAP_TYPE_LRU_HASH of [`FlowKey`] to `u64`):
/// learnt from the packets owned sockets send ([`OWNER_FLOWS_HOOK`]), and filled at start with the
/// sockets older than the sensor (under cookies of their own, [`SYNTHETIC_COOKIE`]); the
/// replies and the frames without a socket find their owner here.
pub const FLOWS_MAP: &str = "CAPSTREAM_FLOWS";
/// Flows [`FLOWS_MAP`] remembers.
pub const MAX_FLOWS: u32 = 65_536;
/// Set in the cookies the sensor gives sockets older than itself (the kernel's count up
/// from 1 and never get there).
pub const SYNTHETIC_COOKIE: u64 = 1 << 63;
/// Process selectors (`--pid`, `--comm`, `--cgroup`, `--container`): hash sets (value
/// unused) of thread group ids (`u32`), names (`[u8; 16]`, NUL-padded) and cgroup ids.
pub const SELECT_PIDS_MAP: &str = "CAPSTREAM_SELECT_PIDS";
pub const SELECT_COMMS_MAP: &str = "CAPSTREAM_SELECT_COMMS";
pub const SELECT_CGROUPS_MAP: &str = "CAPSTREAM_SELECT_CGROUPS";
/// Entries each selector map holds.
pub const MAX_SELECTED: u32 = 4096;
/// The global (a `u32`) saying, non-zero, that frames are taken only when their owner
/// matches a selector.
pub const SELECTING_GLOBAL: &str = "CAPSTREAM_SELECTING";

/// The global (a `u64`) with how many bytes in the ring wake the sensor, set at load time.
pub const WAKEUP_BYTES_GLOBAL: &str = "CAPSTREAM_WAKEUP_BYTES";
/// The global saying (non-zero) that frames carry their socket's cookie (`--attribute`).
pub const ATTRIBUTE_GLOBAL: &str = "CAPSTREAM_ATTRIBUTE";
/// The global (a `u32`) with the sensor's own process id, whose sockets get no owner.
pub const SENSOR_TGID_GLOBAL: &str = "CAPSTREAM_SENSOR_TGID";
/// The global saying (non-zero) that the interface is a loopback, set at load time.
pub const LOOPBACK_GLOBAL: &str = "CAPSTREAM_LOOPBACK";

/// Program array slot of the translated tcpdump filter (loaded by the sensor).
pub const PROG_FILTER: u32 = 0;
/// Program array slot of the mode's emit program, which copies a frame into the ring.
pub const PROG_EMIT: u32 = 1;

/// Packets the entry program saw.
pub const COUNTER_SEEN: u32 = 0;
/// Packets the filter accepted.
pub const COUNTER_MATCHED: u32 = 1;
/// Accepted packets lost because the ring buffer was full.
pub const COUNTER_RING_FULL: u32 = 2;
/// Packets not filtered because a tail call failed (never expected; counted to be sure).
pub const COUNTER_CHAIN_FAILED: u32 = 3;
pub const COUNTERS: u32 = 4;

/// Program names in the object, per mode: (entry programs, emit program).
pub const SOCKET_ENTRY: &str = "capstream_socket";
pub const SOCKET_EMIT: &str = "capstream_socket_emit";
pub const TC_INGRESS: &str = "capstream_tc_ingress";
pub const TC_EGRESS: &str = "capstream_tc_egress";
pub const TC_EMIT: &str = "capstream_tc_emit";
pub const XDP_ENTRY: &str = "capstream_xdp";
pub const XDP_EMIT: &str = "capstream_xdp_emit";
/// `--mode afxdp` runs the XDP entry program with this emit program.
pub const AFXDP_EMIT: &str = "capstream_afxdp_emit";

/// Written by the entry program (direction) and the filter (snap), read by emit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Scratch {
    /// The classic filter's result: how many bytes to keep (never 0 when emit runs).
    /// The translated filter writes it at offset 0.
    pub snap: u32,
    /// One of the `DIRECTION_*` values.
    pub direction: u32,
}

pub const DIRECTION_UNKNOWN: u8 = 0;
pub const DIRECTION_INBOUND: u8 = 1;
pub const DIRECTION_OUTBOUND: u8 = 2;

/// `PacketHeader::flags`: the kernel had moved the frame's VLAN tag into metadata; the
/// sensor puts it back after the MAC addresses, as libpcap does.
pub const FLAG_VLAN_STRIPPED: u8 = 1;

/// `PacketHeader::flags`: `boot_ns` holds the kernel's own receive timestamp on
/// CLOCK_REALTIME (TC ingress), not CLOCK_BOOTTIME.
pub const FLAG_REALTIME: u8 = 2;

/// One captured frame in the ring: this header, then `captured_len` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketHeader {
    /// CLOCK_BOOTTIME in nanoseconds (bpf_ktime_get_boot_ns) when the program ran; the
    /// sensor adds the REALTIME - BOOTTIME offset. With `FLAG_REALTIME`, the skb's own
    /// CLOCK_REALTIME receive stamp instead.
    pub boot_ns: u64,
    /// The frame's length on the wire (without a stripped VLAN tag).
    pub wire_len: u32,
    /// How many bytes follow.
    pub captured_len: u32,
    /// The stripped tag's TCI and TPID (host order), if `FLAG_VLAN_STRIPPED`.
    pub vlan_tci: u16,
    pub vlan_tpid: u16,
    pub flags: u8,
    pub direction: u8,
    pub _reserved: [u8; 2],
    /// With `--attribute`, the cookie of the socket the frame belongs to (its own on TC
    /// egress, its flow's otherwise), 0 if unknown: the key of [`OWNERS_MAP`].
    pub socket_cookie: u64,
}

/// A TCP or UDP flow seen from this host's end. Addresses are IPv6, IPv4 ones mapped
/// (`::ffff:a.b.c.d`); ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub _reserved: [u8; 3],
}

/// A bound TCP port: the network namespace's cookie and the port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub _reserved: [u8; 6],
}

/// Who owns a socket: the task that last created, bound, connected or sent on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    /// The process (thread group) id.
    pub tgid: u32,
    /// The thread id.
    pub tid: u32,
    pub uid: u32,
    pub _reserved: u32,
    /// The task's cgroup v2 id (the inode number of its cgroup2 directory).
    pub cgroup_id: u64,
    /// The socket's network namespace cookie.
    pub netns_cookie: u64,
    /// The thread's name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}

/// Largest frame copied into the ring; equals the protocol's MAX_SNAPLEN.
pub const MAX_CAPTURE: u32 = 262_144;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are #[repr(C)], Copy, made only of integers, and have no padding
    // (the reserved bytes are explicit), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Scratch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PacketHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Owner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
}
