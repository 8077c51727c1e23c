//! `--attribute`: who sent or received each frame.
//!
//! The cgroup socket hooks (see `sensor-ebpf`), attached to the cgroup2 root, remember each
//! socket's owner by socket cookie, and the emit program gives each frame the cookie of its
//! socket: its own on TC egress, its flow's otherwise (replies). Here:
//!
//! - sockets that existed before the sensor started are found at start as `ss -p` finds
//!   them (`/proc/net/{tcp,udp}{,6}` by inode, the inode in some `/proc/PID/fd`) and put in
//!   the kernel's tables under cookies of their own;
//! - the process selectors (`--pid`, `--comm`, `--cgroup`, `--container`) are checked and
//!   put in the kernel's sets;
//! - a frame's cookie gives its owner, and the owner its process record;
//! - in `--mode pcap`, which has no program on the packet path, a frame's flow gives its
//!   cookie ([`FrameOwners`]), and the selectors are applied here.
//!
//! A process's command line, executable and cgroup are read from `/proc` once per process;
//! a process gone by then keeps its kernel-side name, and its cgroup is found by id in the
//! cgroup2 tree.

use std::collections::HashMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use protocol::cgroup::{parse_cgroup_path, path_from_proc_cgroup};
use protocol::{Direction, Process};
use sensor_ebpf::{FlowKey, ListenerKey, Owner, SYNTHETIC_COOKIE};

use super::super::{FrameOwner, Selectors};

use crate::error::{Error, Result};

/// Entries each table holds before it starts afresh (bounded memory on a busy host).
const MAX_ENTRIES: usize = 65_536;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// The cgroup2 hierarchy's root, open: the hooks attach to it and cgroup ids are found in
/// it. Mounted privately (and detached at once) when the host has no cgroup2 mount.
pub struct CgroupRoot {
    dir: File,
}

impl CgroupRoot {
    pub fn open() -> Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::runtime(format!("cannot read /proc/self/mountinfo: {e}")))?;
        if let Some(path) = cgroup2_mount(&mounts) {
            let dir = File::open(&path).map_err(|e| {
                Error::runtime(format!(
                    "cannot open the cgroup2 root {}: {e}",
                    path.display()
                ))
            })?;
            return Ok(Self { dir });
        }
        Self::mount_private()
    }

    /// Mounts cgroup2 on a fresh directory, opens it and detaches the mount: the open
    /// directory keeps the hierarchy reachable, and nothing stays mounted.
    fn mount_private() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("capstream-cgroup2.{}", std::process::id()));
        let fail = |what: &str, e: std::io::Error| {
            Error::runtime(format!(
                "--attribute needs the cgroup2 hierarchy, and cannot {what}: {e}"
            ))
        };
        std::fs::create_dir(&path).map_err(|e| fail("make a mount point", e))?;
        let opened = mount_cgroup2(&path).and_then(|()| {
            let dir = File::open(&path);
            // SAFETY: a NUL-terminated path that lives through the call.
            let _ = unsafe { libc::umount2(c_path(&path).as_ptr(), libc::MNT_DETACH) };
            dir
        });
        let _ = std::fs::remove_dir(&path);
        Ok(Self {
            dir: opened.map_err(|e| fail("mount it", e))?,
        })
    }

    pub fn file(&self) -> &File {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }
}

fn c_path(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn mount_cgroup2(path: &Path) -> std::io::Result<()> {
    let target = c_path(path);
    // SAFETY: NUL-terminated strings that live through the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The mount point of the cgroup2 hierarchy's root, from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let is_root = fs.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/");
        is_root.then(|| fields.get(4).map(PathBuf::from)).flatten()
    })
}

/// What `/proc` said about one process, read once.
struct ProcessInfo {
    cmd: String,
    args: String,
    cgroup: String,
}

/// A process the frames of some socket belong to.
pub struct Known {
    pub process: Process,
    /// Whether it matches a selector (always, without a [`Selection`] here).
    pub selected: bool,
}

/// The process selectors, as the kernel's sets hold them: thread group ids, names
/// (NUL-padded) and cgroup ids.
#[derive(Default)]
pub struct Selection {
    pub pids: Vec<u32>,
    pub comms: Vec<[u8; 16]>,
    pub cgroups: Vec<u64>,
}

impl Selection {
    fn matches(&self, owner: &Owner) -> bool {
        self.pids.contains(&owner.tgid)
            || self.comms.contains(&owner.comm)
            || self.cgroups.contains(&owner.cgroup_id)
    }
}

pub struct Attributor {
    owners: BpfHashMap<MapData, u64, Owner>,
    /// The sensor's network namespace: that of the interfaces it captures on.
    netns_cookie: Option<u64>,
    cgroup_root: CgroupRoot,
    /// Applied here (`--mode pcap`) rather than in the kernel.
    selection: Option<Selection>,
    /// Socket cookie → owner key (`tgid << 32 | tid`).
    cookies: HashMap<u64, u64>,
    /// Owner key → its record.
    processes: HashMap<u64, Known>,
    /// Per process (tgid): what `/proc` said.
    infos: HashMap<u32, ProcessInfo>,
    /// Cgroup id → path, found by walking the cgroup2 tree.
    cgroup_paths: HashMap<u64, String>,
}

impl Attributor {
    /// Puts the sockets older than the sensor in the kernel's tables: connections by flow,
    /// listening TCP sockets by port (for the connections they will accept). With
    /// `selection`, [`Known::selected`] says whether a process matches it.
    pub fn new(
        mut owners: BpfHashMap<MapData, u64, Owner>,
        flows: &mut BpfHashMap<MapData, FlowKey, u64>,
        listeners: &mut BpfHashMap<MapData, ListenerKey, Owner>,
        cgroup_root: CgroupRoot,
        selection: Option<Selection>,
    ) -> Self {
        let netns_cookie = own_netns_cookie();
        for (inode, flow, owner) in existing_sockets(&cgroup_root) {
            // /proc/net shows the sensor's own namespace.
            let owner = Owner {
                netns_cookie: netns_cookie.unwrap_or(0),
                ..owner
            };
            if flow.protocol == TCP && flow.remote_port == 0 {
                if let Some(netns_cookie) = netns_cookie {
                    let key = ListenerKey {
                        netns_cookie,
                        port: flow.local_port,
                        _reserved: [0; 6],
                    };
                    let _ = listeners.insert(key, owner, 0);
                }
                continue;
            }
            let cookie = SYNTHETIC_COOKIE | inode;
            if owners.insert(cookie, owner, 0).is_ok() {
                let _ = flows.insert(flow, cookie, 0);
            }
        }
        Self {
            owners,
            netns_cookie,
            cgroup_root,
            selection,
            cookies: HashMap::new(),
            processes: HashMap::new(),
            infos: HashMap::new(),
            cgroup_paths: HashMap::new(),
        }
    }

    /// The process of the socket with this cookie (see the module documentation), and its
    /// key. The owner is kept here by cookie too: the kernel may forget it first.
    pub fn owner(&mut self, cookie: u64) -> Option<(u64, &Known)> {
        if cookie == 0 {
            return None;
        }
        let key = match self.cookies.get(&cookie) {
            Some(&key) => key,
            None => {
                let owner = self.owners.get(&cookie, 0).ok()?;
                let key = owner_key(&owner);
                self.remember_owner(key, &owner);
                bounded_insert(&mut self.cookies, cookie, key);
                key
            }
        };
        self.processes.get(&key).map(|p| (key, p))
    }

    /// Whether the socket with this cookie lives in the sensor's network namespace.
    fn in_own_netns(&self, cookie: u64) -> bool {
        self.netns_cookie.is_some_and(|own| {
            self.owners
                .get(&cookie, 0)
                .is_ok_and(|owner| owner.netns_cookie == own)
        })
    }

    fn remember_owner(&mut self, key: u64, owner: &Owner) {
        if self.processes.contains_key(&key) {
            return;
        }
        let thread_name = comm_text(&owner.comm);
        let cgroup_fallback = self.cgroup_path(owner.cgroup_id);
        let info = self.info(owner.tgid, &thread_name, cgroup_fallback);
        let process = process_record(owner.tgid, owner.tid, owner.uid, thread_name, info);
        let selected = self.selection.as_ref().is_none_or(|s| s.matches(owner));
        bounded_insert(&mut self.processes, key, Known { process, selected });
    }

    fn info(&mut self, tgid: u32, name: &str, cgroup_fallback: Option<String>) -> &ProcessInfo {
        if self.infos.len() >= MAX_ENTRIES {
            self.infos.clear();
        }
        self.infos
            .entry(tgid)
            .or_insert_with(|| read_process(tgid, name, cgroup_fallback))
    }

    /// The path of the cgroup with this id (its cgroup2 directory's inode), relative to the
    /// root, found by listing the tree again when the id is unknown.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if !self.cgroup_paths.contains_key(&id) {
            if self.cgroup_paths.len() >= MAX_ENTRIES {
                self.cgroup_paths.clear();
            }
            self.cgroup_paths.extend(
                cgroup_tree(&self.cgroup_root)
                    .into_iter()
                    .map(|(p, i)| (i, p)),
            );
        }
        self.cgroup_paths.get(&id).cloned()
    }
}

/// How long the frames' flows are taken as found: a flow unknown at first (an inbound
/// connection's SYN, before its socket answered) is looked up again after this, and so is a
/// flow whose 5-tuple a newer socket may have reused.
const FLOW_CACHE_LIFETIME: Duration = Duration::from_millis(500);
/// Flows the cache holds before it starts afresh.
const FLOW_CACHE_ENTRIES: usize = 4096;

/// `--mode pcap --attribute`: libpcap's frames pass no program of ours, so their owners are
/// found here, from the same tables the eBPF modes read: a frame's flow (either way round)
/// gives its socket's cookie in the kernel's flow table, the cookie its owner. Flows are
/// cached for a while, so that a steady flow costs no system call per frame.
pub struct FrameOwners {
    /// Keeps the cgroup hooks attached and the tables alive.
    _programs: Ebpf,
    attributor: Attributor,
    flows: BpfHashMap<MapData, FlowKey, u64>,
    /// A frame's flow as seen (source first) → its socket's cookie, 0 if none.
    cache: HashMap<FlowKey, u64, foldhash::fast::RandomState>,
    cache_since: Instant,
    /// The last frame's flow and cookie: frames come in bursts of one flow.
    last: Option<(FlowKey, u64)>,
}

impl FrameOwners {
    pub fn new(
        programs: Ebpf,
        attributor: Attributor,
        flows: BpfHashMap<MapData, FlowKey, u64>,
    ) -> Self {
        Self {
            _programs: programs,
            attributor,
            flows,
            cache: HashMap::with_capacity_and_hasher(
                FLOW_CACHE_ENTRIES,
                foldhash::fast::RandomState::default(),
            ),
            cache_since: Instant::now(),
            last: None,
        }
    }

    /// The owner of a frame of `link_type` (libpcap's), which went `direction` (unknown:
    /// either way is tried, this host's end as the source first).
    pub fn of(&mut self, link_type: i32, frame: &[u8], direction: Direction) -> FrameOwner<'_> {
        let cookie = match frame_flow(link_type, frame) {
            Some((seen, opening)) => match self.last.filter(|(last, _)| *last == seen) {
                Some((_, cookie)) => cookie,
                None => {
                    let cookie = self.cached(seen, direction, opening);
                    if !opening {
                        self.last = Some((seen, cookie));
                    }
                    cookie
                }
            },
            None => 0,
        };
        let selecting = self.attributor.selection.is_some();
        match self.attributor.owner(cookie) {
            Some((_, known)) if !known.selected => FrameOwner::NotSelected,
            Some((key, known)) => FrameOwner::Process(key, &known.process),
            None if selecting => FrameOwner::NotSelected,
            None => FrameOwner::Unattributed,
        }
    }

    /// The cookie of the flow `seen`, from the cache or else the kernel's table. What a
    /// frame `opening` a TCP connection (SYN, SYN-ACK) finds is not cached: an accepted
    /// connection enters the table only once established, and until then a lookup finds
    /// nothing or, when the client is on this host too, only the client's end. (The
    /// handshake's last ACK reaches the sensor after the kernel established the connection
    /// in the same softirq.)
    fn cached(&mut self, seen: FlowKey, direction: Direction, opening: bool) -> u64 {
        if let Some(&cookie) = self.cache.get(&seen) {
            return cookie;
        }
        let cookie = self.look_up(&seen, direction);
        if opening {
            return cookie;
        }
        if self.cache.len() >= FLOW_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(seen, cookie);
        // The other way's frames were not found before (an inbound SYN, ahead of the
        // answer that taught the table the flow): look them up again.
        let reply = reversed(&seen);
        if cookie != 0 && self.cache.get(&reply) == Some(&0) {
            self.cache.remove(&reply);
        }
        cookie
    }

    /// The cookie of the flow a frame `seen` (source first) belongs to, from the kernel's
    /// table (which holds flows from this host's end, of every network namespace).
    fn look_up(&self, seen: &FlowKey, direction: Direction) -> u64 {
        let from_source = || self.flows.get(seen, 0).ok();
        let from_destination = || self.flows.get(&reversed(seen), 0).ok();
        match direction {
            Direction::Outbound => from_source(),
            Direction::Inbound => from_destination(),
            // Both ends may be this host's, in two namespaces (a container and its
            // peer): the end in the capture's own namespace is the one whose frame this
            // is; else the source's. A source in it needs no second lookup.
            Direction::Unknown => match from_source() {
                Some(source) if self.attributor.in_own_netns(source) => Some(source),
                source => match (source, from_destination()) {
                    (Some(_), Some(destination)) if self.attributor.in_own_netns(destination) => {
                        Some(destination)
                    }
                    (source, destination) => source.or(destination),
                },
            },
        }
        .unwrap_or(0)
    }

    /// What reading the tables while capturing takes (see `map_reads_need`).
    pub fn needs(&self) -> Vec<crate::privileges::Need> {
        super::map_reads_need("to read the owners of libpcap's frames".into())
            .into_iter()
            .collect()
    }

    /// Forgets the cached flows once they are [`FLOW_CACHE_LIFETIME`] old. Called between
    /// reads, not per frame.
    pub fn tick(&mut self) {
        if self.cache_since.elapsed() >= FLOW_CACHE_LIFETIME {
            self.cache.clear();
            self.last = None;
            self.cache_since = Instant::now();
        }
    }
}

fn reversed(flow: &FlowKey) -> FlowKey {
    FlowKey {
        local: flow.remote,
        remote: flow.local,
        local_port: flow.remote_port,
        remote_port: flow.local_port,
        ..*flow
    }
}

const LINKTYPE_ETHERNET: i32 = 1;
const LINKTYPE_RAW: i32 = 101;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 2] = [0x8100, 0x88a8];

/// The TCP or UDP flow of a frame, source first (in `local`), as libpcap hands it over on
/// Linux: Ethernet (one VLAN tag at most), cooked (SLL, SLL2) or raw IP; and whether the
/// frame opens a TCP connection (SYN set).
fn frame_flow(link_type: i32, frame: &[u8]) -> Option<(FlowKey, bool)> {
    let ethertype_at = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (ethertype, l3) = match link_type {
        LINKTYPE_ETHERNET => match ethertype_at(12)? {
            tagged if ETHERTYPE_VLAN.contains(&tagged) => (ethertype_at(16)?, 18),
            ethertype => (ethertype, 14),
        },
        pcap_record::LINKTYPE_LINUX_SLL => (ethertype_at(14)?, 16),
        pcap_record::LINKTYPE_LINUX_SLL2 => (ethertype_at(0)?, 20),
        LINKTYPE_RAW => match frame.first()? >> 4 {
            4 => (ETHERTYPE_IPV4, 0),
            6 => (ETHERTYPE_IPV6, 0),
            _ => return None,
        },
        _ => return None,
    };
    let ip = frame.get(l3..)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (protocol, l4) = match ethertype {
        ETHERTYPE_IPV4 => {
            let header = ip.get(..20)?;
            // A later fragment carries no ports.
            if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
                return None;
            }
            src[10..12].fill(0xff);
            dst[10..12].fill(0xff);
            src[12..].copy_from_slice(&header[12..16]);
            dst[12..].copy_from_slice(&header[16..20]);
            (header[9], usize::from(header[0] & 0x0f) * 4)
        }
        ETHERTYPE_IPV6 => {
            let header = ip.get(..40)?;
            src.copy_from_slice(&header[8..24]);
            dst.copy_from_slice(&header[24..40]);
            (header[6], 40)
        }
        _ => return None,
    };
    if protocol != TCP && protocol != UDP {
        return None;
    }
    let ports = ip.get(l4..l4 + 4)?;
    let flow = FlowKey {
        local: src,
        remote: dst,
        local_port: u16::from_be_bytes([ports[0], ports[1]]),
        remote_port: u16::from_be_bytes([ports[2], ports[3]]),
        protocol,
        _reserved: [0; 3],
    };
    let opening = protocol == TCP && ip.get(l4 + 13).is_some_and(|flags| flags & 0x02 != 0);
    Some((flow, opening))
}

/// The inode of the initial PID namespace (the kernel's PROC_PID_INIT_INO).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// The sensor's process id as the kernel's hooks see it (in the initial PID namespace),
/// for them to skip its sockets; 0 (skip nothing) when the sensor runs in a PID namespace
/// of its own, where its own id would name another process to the hooks.
pub fn tgid_for_hooks() -> u32 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(ns) if ns.ino() == INITIAL_PID_NAMESPACE => std::process::id(),
        _ => {
            tracing::debug!(
                "the sensor runs in a PID namespace of its own: its own sockets are attributed \
                 too"
            );
            0
        }
    }
}

/// The cookie of the network namespace the sensor runs in (the one `/proc/net` shows),
/// which the kernel's hooks key listening ports by; none before Linux 5.14.
fn own_netns_cookie() -> Option<u64> {
    // SAFETY: plain socket calls on a descriptor this function owns and closes; the option
    // value is a u64 written within its length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        libc::close(fd);
        (rc == 0).then_some(cookie)
    }
}

/// Sockets opened before the sensor started: their inode, flow (a listening socket's has
/// no remote end), and the process holding each (as `ss -p` finds them).
fn existing_sockets(root: &CgroupRoot) -> Vec<(u64, FlowKey, Owner)> {
    let mut by_inode: HashMap<u64, FlowKey> = HashMap::new();
    for (file, protocol, v6) in [
        ("/proc/net/tcp", TCP, false),
        ("/proc/net/tcp6", TCP, true),
        ("/proc/net/udp", UDP, false),
        ("/proc/net/udp6", UDP, true),
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            by_inode.extend(
                text.lines()
                    .skip(1)
                    .filter_map(|l| socket_line(l, protocol, v6)),
            );
        }
    }
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        if by_inode.is_empty() {
            break;
        }
        // The sensor's own sockets get no owner, as in the kernel's hooks.
        let Some(tgid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&tgid| tgid != std::process::id())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut owner = None;
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path()).ok().and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) else {
                continue;
            };
            if let Some(flow) = by_inode.remove(&inode) {
                let owner = *owner.get_or_insert_with(|| proc_owner(tgid, root));
                found.push((inode, flow, owner));
            }
        }
    }
    found
}

/// What the kernel would have recorded for a process's socket, read from `/proc`.
fn proc_owner(tgid: u32, root: &CgroupRoot) -> Owner {
    use std::os::unix::fs::MetadataExt;
    let dir = PathBuf::from(format!("/proc/{tgid}"));
    let mut comm = [0u8; 16];
    if let Ok(name) = std::fs::read_to_string(dir.join("comm")) {
        let name = name.trim_end().as_bytes();
        let n = name.len().min(15);
        comm[..n].copy_from_slice(&name[..n]);
    }
    let cgroup_id = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| {
            let path = path_from_proc_cgroup(&text)?
                .trim_start_matches('/')
                .to_string();
            std::fs::metadata(root.path().join(path)).ok()
        })
        .map_or(0, |m| m.ino());
    Owner {
        tgid,
        tid: tgid,
        uid: proc_uid(tgid).unwrap_or(0),
        cgroup_id,
        comm,
        ..Owner::default()
    }
}

fn owner_key(owner: &Owner) -> u64 {
    u64::from(owner.tgid) << 32 | u64::from(owner.tid)
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(k, v);
}

fn comm_text(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn process_record(
    tgid: u32,
    tid: u32,
    uid: u32,
    thread_name: String,
    info: &ProcessInfo,
) -> Process {
    let parsed = parse_cgroup_path(&info.cgroup);
    Process {
        pid: tgid,
        tid,
        uid,
        cmd: info.cmd.clone(),
        args: info.args.clone(),
        thread_name,
        cgroup: info.cgroup.clone(),
        container_id: parsed
            .as_ref()
            .and_then(|o| o.container_id)
            .unwrap_or_default()
            .to_string(),
        pod_uid: parsed.and_then(|o| o.pod_uid).unwrap_or_default(),
    }
}

fn read_process(tgid: u32, name: &str, cgroup_fallback: Option<String>) -> ProcessInfo {
    let dir = PathBuf::from(format!("/proc/{tgid}"));
    let args = std::fs::read(dir.join("cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(raw.strip_suffix(&[0]).unwrap_or(&raw)).replace('\0', " ")
        })
        .unwrap_or_default();
    let cmd = std::fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| name.to_string());
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| path_from_proc_cgroup(&text).map(str::to_string))
        .or(cgroup_fallback)
        .unwrap_or_default();
    ProcessInfo { cmd, args, cgroup }
}

fn proc_uid(tgid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tgid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every cgroup of the tree: its path from the root (`/a/b`) and id (inode).
fn cgroup_tree(root: &CgroupRoot) -> Vec<(String, u64)> {
    fn walk(dir: &Path, rel: &str, depth: u32, out: &mut Vec<(String, u64)>) {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(dir) else {
            return;
        };
        out.push((
            if rel.is_empty() {
                "/".into()
            } else {
                rel.into()
            },
            meta.ino(),
        ));
        if depth >= 32 {
            return;
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name();
                let rel = format!("{rel}/{}", name.to_string_lossy());
                walk(&entry.path(), &rel, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.path(), "", 0, &mut out);
    out
}

/// The cgroup ids `--cgroup` and `--container` select: each named cgroup and its
/// descendants as they are at start. An unknown path or container is bad input.
pub fn selected_cgroups(root: &CgroupRoot, selectors: &Selectors) -> Result<Vec<u64>> {
    if selectors.cgroups.is_empty() && selectors.containers.is_empty() {
        return Ok(Vec::new());
    }
    let tree = cgroup_tree(root);
    let under = |top: &str| -> Vec<u64> {
        let prefix = format!("{}/", top.trim_end_matches('/'));
        tree.iter()
            .filter(|(p, _)| p == top || p.starts_with(&prefix))
            .map(|(_, id)| *id)
            .collect()
    };
    let mut ids = Vec::new();
    for path in &selectors.cgroups {
        let path = format!("/{}", path.trim_matches('/'));
        if !tree.iter().any(|(p, _)| *p == path) {
            return Err(Error::input(format!(
                "--cgroup {path}: no such cgroup in the cgroup2 hierarchy (paths are as \
                 /proc/PID/cgroup shows them, e.g. /system.slice/nginx.service)"
            )));
        }
        ids.extend(under(&path));
    }
    for id in &selectors.containers {
        let tops: Vec<&str> = tree
            .iter()
            .filter(|(p, _)| {
                parse_cgroup_path(p)
                    .and_then(|o| o.container_id)
                    .is_some_and(|c| c.starts_with(id.as_str()))
            })
            .map(|(p, _)| p.as_str())
            .collect();
        if tops.is_empty() {
            return Err(Error::input(format!(
                "--container {id}: no container with this id (or id prefix) is running"
            )));
        }
        for top in tops {
            ids.extend(under(top));
        }
    }
    Ok(ids)
}

/// One line of `/proc/net/{tcp,udp}{,6}`: its inode and its flow (local first).
fn socket_line(line: &str, protocol: u8, v6: bool) -> Option<(u64, FlowKey)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, local_port) = proc_address(fields.get(1)?, v6)?;
    let (remote, remote_port) = proc_address(fields.get(2)?, v6)?;
    let inode = fields.get(9)?.parse::<u64>().ok()?;
    // A connection, or a listening TCP socket (state 0A), whose remote end is all zeros.
    let listening = protocol == TCP && fields.get(3) == Some(&"0A");
    (inode != 0 && (remote_port != 0 || listening)).then_some((
        inode,
        FlowKey {
            protocol,
            local,
            local_port,
            remote,
            remote_port,
            _reserved: [0; 3],
        },
    ))
}

/// `0100007F:1F90`: the address as the kernel stores it (32-bit words in host order),
/// then the port in hex.
fn proc_address(text: &str, v6: bool) -> Option<([u8; 16], u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut words = [0u8; 16];
    let n = if v6 { 4 } else { 1 };
    if addr.len() != 8 * n {
        return None;
    }
    for i in 0..n {
        let word = u32::from_str_radix(&addr[8 * i..8 * i + 8], 16).ok()?;
        words[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let bytes = if v6 {
        words
    } else {
        Ipv4Addr::new(words[0], words[1], words[2], words[3])
            .to_ipv6_mapped()
            .octets()
    };
    Some((bytes, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines_give_the_local_end_first() {
        let line = "   1: 0100007F:1F90 020012C6:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1";
        let (inode, flow) = socket_line(line, TCP, false).unwrap();
        assert_eq!(inode, 4242);
        assert_eq!(flow.local_port, 8080);
        assert_eq!(flow.remote_port, 50000);
        assert_eq!(
            flow.local,
            Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets()
        );
        assert_eq!(
            flow.remote,
            Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets()
        );
        // A TCP listener has no remote end, and is kept (by its port); a bound UDP socket or
        // a TCP socket in another state without a remote end is not.
        let listener = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1";
        let (inode, flow) = socket_line(listener, TCP, false).unwrap();
        assert_eq!((inode, flow.local_port, flow.remote_port), (77, 8080, 0));
        assert_eq!(socket_line(listener, UDP, false), None);
        let closed = listener.replace(" 0A ", " 07 ");
        assert_eq!(socket_line(&closed, TCP, false), None);
    }

    /// The flow of an Ethernet (tagged or not), cooked or raw frame, source first; none for
    /// a later fragment or another protocol.
    #[test]
    fn frames_give_their_flow_source_first() {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, TCP, 0, 0];
        ip.extend_from_slice(&[198, 18, 0, 2, 198, 18, 0, 1]);
        ip.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x40, 0, 0, 0, 0]);
        let want = FlowKey {
            local: Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets(),
            remote: Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped().octets(),
            local_port: 40000,
            remote_port: 8000,
            protocol: TCP,
            _reserved: [0; 3],
        };
        let ethernet = [&[0u8; 12][..], &[0x08, 0x00], &ip].concat();
        let tagged = [&[0u8; 12][..], &[0x81, 0x00, 0, 5, 0x08, 0x00], &ip].concat();
        let sll = [&[0u8; 14][..], &[0x08, 0x00], &ip].concat();
        let sll2 = [&[0x08, 0x00][..], &[0u8; 18], &ip].concat();
        for (link_type, frame) in [
            (LINKTYPE_ETHERNET, &ethernet),
            (LINKTYPE_ETHERNET, &tagged),
            (pcap_record::LINKTYPE_LINUX_SLL, &sll),
            (pcap_record::LINKTYPE_LINUX_SLL2, &sll2),
            (LINKTYPE_RAW, &ip),
        ] {
            assert_eq!(
                frame_flow(link_type, frame),
                Some((want, false)),
                "{link_type}"
            );
        }
        assert_eq!(reversed(&reversed(&want)), want);
        assert_eq!(reversed(&want).local_port, 8000);
        let mut later_fragment = ethernet.clone();
        later_fragment[14 + 7] = 1;
        assert_eq!(frame_flow(LINKTYPE_ETHERNET, &later_fragment), None);
        let mut icmp = ethernet.clone();
        icmp[14 + 9] = 1;
        assert_eq!(frame_flow(LINKTYPE_ETHERNET, &icmp), None);
        assert_eq!(frame_flow(LINKTYPE_ETHERNET, &ethernet[..36]), None);
        // A SYN, with the whole TCP header.
        let syn = [&ethernet[..], &[0, 0, 0, 0, 0x50, 0x02]].concat();
        assert_eq!(frame_flow(LINKTYPE_ETHERNET, &syn), Some((want, true)));
    }

    #[test]
    fn the_cgroup2_root_is_found_in_mountinfo() {
        let info = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                    36 24 0:31 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A container's view of a sub-tree is not the root.
        let sub = "35 24 0:30 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(sub), None);
    }
}
