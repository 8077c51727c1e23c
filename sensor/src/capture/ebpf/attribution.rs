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
//! - a frame's cookie gives its owner, and the owner its process record.
//!
//! A process's command line, executable and cgroup are read from `/proc` once per process;
//! a process gone by then keeps its kernel-side name, and its cgroup is found by id in the
//! cgroup2 tree.

use std::collections::HashMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use protocol::cgroup::{parse_cgroup_path, path_from_proc_cgroup};
use protocol::Process;
use sensor_ebpf::{FlowKey, Owner, SYNTHETIC_COOKIE};

use super::super::Selectors;

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

pub struct Attributor {
    owners: BpfHashMap<MapData, u64, Owner>,
    cgroup_root: CgroupRoot,
    /// Socket cookie → owner key (`tgid << 32 | tid`).
    cookies: HashMap<u64, u64>,
    /// Owner key → its record.
    processes: HashMap<u64, Process>,
    /// Per process (tgid): what `/proc` said.
    infos: HashMap<u32, ProcessInfo>,
    /// Cgroup id → path, found by walking the cgroup2 tree.
    cgroup_paths: HashMap<u64, String>,
}

impl Attributor {
    /// Puts the sockets older than the sensor in the kernel's tables (`flows`, then
    /// dropped: the programs keep it).
    pub fn new(
        mut owners: BpfHashMap<MapData, u64, Owner>,
        mut flows: BpfHashMap<MapData, FlowKey, u64>,
        cgroup_root: CgroupRoot,
    ) -> Self {
        for (inode, flow, owner) in existing_sockets(&cgroup_root) {
            let cookie = SYNTHETIC_COOKIE | inode;
            if owners.insert(cookie, owner, 0).is_ok() {
                let _ = flows.insert(flow, cookie, 0);
            }
        }
        Self {
            owners,
            cgroup_root,
            cookies: HashMap::new(),
            processes: HashMap::new(),
            infos: HashMap::new(),
            cgroup_paths: HashMap::new(),
        }
    }

    /// The process of the socket with this cookie (see the module documentation), and its
    /// key. The owner is kept here by cookie too: the kernel may forget it first.
    pub fn owner(&mut self, cookie: u64) -> Option<(u64, &Process)> {
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

/// Sockets opened before the sensor started: their inode, flow, and the process holding
/// each (as `ss -p` finds them).
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
    (inode != 0 && remote_port != 0).then_some((
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
        // A listener has no remote end: no flow.
        let listener = "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1";
        assert_eq!(socket_line(listener, TCP, false), None);
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
