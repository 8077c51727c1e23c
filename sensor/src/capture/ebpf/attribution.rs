//! `--attribute`: who sent or received each frame.
//!
//! The cgroup socket hooks (see `sensor-ebpf`), attached to the cgroup2 root, remember each
//! socket's owner by socket cookie; TC egress frames carry their socket's cookie. Here:
//!
//! - a frame with a cookie gets the owner the kernel remembered (kept here too, by cookie,
//!   for the frames a socket sends after its release, such as its FIN);
//! - every attributed frame teaches the flow table its 5-tuple, so the replies (ingress, no
//!   socket yet) find the same owner;
//! - sockets that existed before the sensor started are found at start as `ss -p` finds
//!   them: `/proc/net/{tcp,udp}{,6}` by inode, the inode in some `/proc/PID/fd`.
//!
//! A process's command line, executable and cgroup are read from `/proc` once per process;
//! a process gone by then keeps its kernel-side name, and its cgroup is found by id in the
//! cgroup2 tree.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use protocol::cgroup::{parse_cgroup_path, path_from_proc_cgroup};
use protocol::Process;
use sensor_ebpf::Owner;

use crate::error::{Error, Result};

/// Entries each table holds before it starts afresh (bounded memory on a busy host).
const MAX_ENTRIES: usize = 65_536;

/// A flow as its local end sees it: protocol, local address and port, remote ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    protocol: u8,
    local: [u8; 16],
    local_port: u16,
    remote: [u8; 16],
    remote_port: u16,
}

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

pub struct Attributor {
    owners: BpfHashMap<MapData, u64, Owner>,
    cgroup_root: CgroupRoot,
    /// Socket cookie → owner key (`tgid << 32 | tid`).
    cookies: HashMap<u64, u64>,
    flows: HashMap<FlowKey, u64>,
    /// Owner key → its record.
    processes: HashMap<u64, Process>,
    /// Per process (tgid): what `/proc` said.
    infos: HashMap<u32, ProcessInfo>,
    /// Cgroup id → path, found by walking the cgroup2 tree.
    cgroup_paths: HashMap<u64, String>,
    /// Frames attributed, and not.
    pub attributed: u64,
    pub unattributed: u64,
}

impl Attributor {
    pub fn new(owners: BpfHashMap<MapData, u64, Owner>, cgroup_root: CgroupRoot) -> Self {
        let mut a = Self {
            owners,
            cgroup_root,
            cookies: HashMap::new(),
            flows: HashMap::new(),
            processes: HashMap::new(),
            infos: HashMap::new(),
            cgroup_paths: HashMap::new(),
            attributed: 0,
            unattributed: 0,
        };
        a.learn_existing_sockets();
        a
    }

    /// The owner of an Ethernet frame: by its socket cookie, else by its flow. An inbound
    /// frame's cookie is the sender's, when it came from another namespace of this host
    /// over a veth: not the local end's, so only outbound frames use theirs.
    pub fn owner(&mut self, cookie: u64, outbound: bool, frame: &[u8]) -> Option<(u64, &Process)> {
        let flow = flow_of(frame, outbound);
        let mut key = None;
        if cookie != 0 && outbound {
            key = self.cookies.get(&cookie).copied();
            if let Ok(owner) = self.owners.get(&cookie, 0) {
                let k = owner_key(&owner);
                if key != Some(k) {
                    self.remember_owner(k, &owner);
                    bounded_insert(&mut self.cookies, cookie, k);
                }
                key = Some(k);
            }
        }
        match (key, flow) {
            (Some(k), Some(flow)) if self.flows.get(&flow) != Some(&k) => {
                bounded_insert(&mut self.flows, flow, k);
            }
            (None, Some(flow)) => key = self.flows.get(&flow).copied(),
            _ => {}
        }
        match key.and_then(|k| self.processes.get(&k).map(|p| (k, p))) {
            Some(found) => {
                self.attributed += 1;
                Some(found)
            }
            None => {
                self.unattributed += 1;
                None
            }
        }
    }

    fn remember_owner(&mut self, key: u64, owner: &Owner) {
        if self.processes.contains_key(&key) {
            return;
        }
        let thread_name = comm_text(&owner.comm);
        let cgroup_fallback = self.cgroup_path(owner.cgroup_id);
        let info = self.info(owner.tgid, &thread_name, cgroup_fallback);
        let process = process_record(owner.tgid, owner.tid, owner.uid, thread_name, info);
        bounded_insert(&mut self.processes, key, process);
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
    /// root, found by walking the tree once per unknown id.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.path();
        let found = find_inode(&root, &root, id, 0)?;
        bounded_insert(&mut self.cgroup_paths, id, found.clone());
        Some(found)
    }

    /// Sockets opened before the sensor started: their flows, and the process holding each.
    fn learn_existing_sockets(&mut self) {
        let mut by_inode: HashMap<u64, FlowKey> = HashMap::new();
        for (file, protocol, v6) in [
            ("/proc/net/tcp", TCP, false),
            ("/proc/net/tcp6", TCP, true),
            ("/proc/net/udp", UDP, false),
            ("/proc/net/udp6", UDP, true),
        ] {
            if let Ok(text) = std::fs::read_to_string(file) {
                for (inode, flow) in text
                    .lines()
                    .skip(1)
                    .filter_map(|l| socket_line(l, protocol, v6))
                {
                    by_inode.insert(inode, flow);
                }
            }
        }
        if by_inode.is_empty() {
            return;
        }
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let Some(tgid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
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
                    let key = u64::from(tgid) << 32 | u64::from(tgid);
                    if !self.processes.contains_key(&key) {
                        let name = std::fs::read_to_string(entry.path().join("comm"))
                            .map(|s| s.trim_end().to_string())
                            .unwrap_or_default();
                        let uid = proc_uid(tgid).unwrap_or(0);
                        let info = self.info(tgid, &name, None);
                        let process = process_record(tgid, tgid, uid, name, info);
                        self.processes.insert(key, process);
                    }
                    self.flows.insert(flow, key);
                }
            }
        }
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

/// Depth-first search of the cgroup2 tree for the directory with inode `id`.
fn find_inode(root: &Path, dir: &Path, id: u64, depth: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if depth > 16 {
        return None;
    }
    if std::fs::metadata(dir).ok()?.ino() == id {
        let rel = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", rel.display()));
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Some(found) = find_inode(root, &entry.path(), id, depth + 1) {
                return Some(found);
            }
        }
    }
    None
}

/// One line of `/proc/net/{tcp,udp}{,6}`: its inode and its flow (local first).
fn socket_line(line: &str, protocol: u8, v6: bool) -> Option<(u64, FlowKey)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, local_port) = proc_address(fields.get(1)?, v6)?;
    let (remote, remote_port) = proc_address(fields.get(2)?, v6)?;
    let inode = fields.get(9)?.parse::<u64>().ok()?;
    (inode != 0 && remote_port != 0).then_some((
        inode,
        FlowKey {
            protocol,
            local,
            local_port,
            remote,
            remote_port,
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

/// The flow of an Ethernet frame carrying TCP or UDP over IPv4 or IPv6, oriented from the
/// host's end (the source of an outbound frame, the destination of an inbound one).
fn flow_of(frame: &[u8], outbound: bool) -> Option<FlowKey> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (protocol, src, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let addr = |at: usize| -> Option<[u8; 16]> {
                let b: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
                Some(Ipv4Addr::from(b).to_ipv6_mapped().octets())
            };
            (*ip.get(9)?, addr(12)?, addr(16)?, ip.get(ihl..)?)
        }
        0x86dd => {
            let addr = |at: usize| -> Option<[u8; 16]> {
                let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(b).octets())
            };
            (*ip.get(6)?, addr(8)?, addr(24)?, ip.get(40..)?)
        }
        _ => return None,
    };
    if protocol != TCP && protocol != UDP {
        return None;
    }
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    Some(if outbound {
        FlowKey {
            protocol,
            local: src,
            local_port: sport,
            remote: dst,
            remote_port: dport,
        }
    } else {
        FlowKey {
            protocol,
            local: dst,
            local_port: dport,
            remote: src,
            remote_port: sport,
        }
    })
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
        // A listener has no remote end: no flow.
        let listener = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1";
        assert_eq!(socket_line(listener, TCP, false), None);
    }

    #[test]
    fn a_reply_has_the_flow_of_its_request() {
        let mut out = vec![0u8; 14 + 20 + 20];
        out[12..14].copy_from_slice(&[0x08, 0x00]);
        out[14] = 0x45;
        out[14 + 9] = TCP;
        out[14 + 12..14 + 16].copy_from_slice(&[198, 18, 0, 1]);
        out[14 + 16..14 + 20].copy_from_slice(&[198, 18, 0, 2]);
        out[34..36].copy_from_slice(&40000u16.to_be_bytes());
        out[36..38].copy_from_slice(&8000u16.to_be_bytes());
        let mut reply = out.clone();
        reply[14 + 12..14 + 16].copy_from_slice(&[198, 18, 0, 2]);
        reply[14 + 16..14 + 20].copy_from_slice(&[198, 18, 0, 1]);
        reply[34..36].copy_from_slice(&8000u16.to_be_bytes());
        reply[36..38].copy_from_slice(&40000u16.to_be_bytes());
        assert_eq!(flow_of(&out, true), flow_of(&reply, false));
        assert!(flow_of(&out, true).is_some());
        assert_eq!(flow_of(&out[..20], true), None);
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
