//! Least privilege: once every capture is open and attached, the sensor gives up what it no
//! longer needs. It keeps only the capabilities a capture still uses (none on kernels from
//! 6.6 on), switches to `--user` when given, empties the bounding and ambient sets, and sets
//! no_new_privs, so that nothing it later executes could regain them.
//!
//! Linux keeps credentials per thread. The C library applies the uid and gid calls to every
//! thread, but capabilities, the bounding set and no_new_privs are the calling thread's
//! own. So this runs while the sensor still has one thread: after the captures are
//! attached and before the async runtime and the capture threads start, which inherit the
//! reduced credentials. [`give_up`] refuses to run otherwise.
//!
//! Elsewhere this is a no-op with a log line, and `--user` is refused.

use std::fmt;
use std::path::Path;

use crate::error::Result;

/// A capability a capture may still need after it is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(
    not(target_os = "linux"),
    allow(
        dead_code,
        reason = "captures need capabilities after attaching on Linux only"
    )
)]
pub enum Capability {
    /// Detaching TC or XDP programs that were attached through netlink (TC before 6.6, XDP
    /// before 5.9); attaching them (on-demand captures).
    NetAdmin,
    /// bpf() on existing maps (the kernel counters) before 6.5, while
    /// kernel.unprivileged_bpf_disabled is set; loading programs (on-demand captures).
    Bpf,
    /// Opening packet sockets (on-demand captures).
    NetRaw,
    /// AF_XDP memory beyond RLIMIT_MEMLOCK (on-demand captures in --mode afxdp).
    IpcLock,
}

impl Capability {
    pub fn name(self) -> &'static str {
        match self {
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::Bpf => "CAP_BPF",
            Self::NetRaw => "CAP_NET_RAW",
            Self::IpcLock => "CAP_IPC_LOCK",
        }
    }

    /// The number in linux/capability.h.
    #[cfg(target_os = "linux")]
    fn number(self) -> u32 {
        match self {
            Self::NetAdmin => 12,
            Self::Bpf => 39,
            Self::NetRaw => 13,
            Self::IpcLock => 14,
        }
    }
}

/// A capability a capture still needs once attached, and why (for the log line).
#[derive(Debug, Clone)]
#[cfg_attr(
    not(target_os = "linux"),
    allow(
        dead_code,
        reason = "captures need capabilities after attaching on Linux only"
    )
)]
pub struct Need {
    pub cap: Capability,
    pub why: String,
}

impl Need {
    #[cfg_attr(
        not(target_os = "linux"),
        allow(
            dead_code,
            reason = "captures need capabilities after attaching on Linux only"
        )
    )]
    pub fn new(cap: Capability, why: impl Into<String>) -> Self {
        Self {
            cap,
            why: why.into(),
        }
    }
}

/// `--user`, resolved when the command line is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    not(target_os = "linux"),
    allow(dead_code, reason = "--user is refused outside Linux")
)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// The user's primary group, the only group the sensor keeps.
    pub gid: u32,
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

/// Resolves `--user NAME` (or a numeric uid) in the user database, so that an unknown user
/// is a usage error before any capture starts.
#[cfg(target_os = "linux")]
pub fn parse_user(s: &str) -> Result<User, String> {
    let found = linux::lookup_name(s).map_err(|e| format!("cannot look up user {s}: {e}"))?;
    let found = match found {
        Some(user) => Some(user),
        None => match s.parse::<u32>() {
            Ok(uid) => {
                linux::lookup_uid(uid).map_err(|e| format!("cannot look up uid {uid}: {e}"))?
            }
            Err(_) => None,
        },
    };
    found.ok_or_else(|| format!("no user named {s} on this system (see /etc/passwd)"))
}

#[cfg(not(target_os = "linux"))]
pub fn parse_user(_: &str) -> Result<User, String> {
    Err("--user is supported on Linux only".into())
}

/// Whom the sensor runs as once attached: `--user`, or `nobody` when started as root
/// without it, so that a compromised sensor does not own root's files. `--user root` keeps
/// root, explicitly (capabilities are dropped either way).
#[cfg(target_os = "linux")]
pub fn run_as(user: Option<&User>) -> Result<Option<User>> {
    if user.is_some() || linux::current_uid() != 0 {
        return Ok(user.cloned());
    }
    parse_user(DEFAULT_USER).map(Some).map_err(|e| {
        crate::error::Error::input(format!(
            "{e}: started as root, the sensor switches to user {DEFAULT_USER} once attached; \
             give --user NAME, or --user root to stay root"
        ))
    })
}

#[cfg(not(target_os = "linux"))]
pub fn run_as(user: Option<&User>) -> Result<Option<User>> {
    Ok(user.cloned())
}

/// The user a sensor started as root runs as, without --user.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const DEFAULT_USER: &str = "nobody";

/// Gives up every privilege but the capabilities in `needs`, as `user` when given, and
/// logs one line saying what is kept and why. `created`, a directory the sensor has just
/// made (the spool's), is handed over to `user` first. Must run while the process has
/// one thread.
#[cfg(target_os = "linux")]
pub fn give_up(user: Option<&User>, needs: &[Need], created: Option<&Path>) -> Result<()> {
    linux::give_up(user, needs, created)
}

#[cfg(not(target_os = "linux"))]
pub fn give_up(_user: Option<&User>, _needs: &[Need], _created: Option<&Path>) -> Result<()> {
    tracing::info!("privileges: unchanged (dropping capabilities is Linux-only)");
    Ok(())
}

/// The kept capabilities with their reasons, for the log line: `CAP_X (why), CAP_Y (why)`,
/// or `no capabilities`.
#[cfg_attr(
    not(target_os = "linux"),
    allow(dead_code, reason = "capabilities are dropped on Linux only")
)]
fn describe(needs: &[Need]) -> String {
    let mut caps: Vec<Capability> = needs.iter().map(|n| n.cap).collect();
    caps.sort();
    caps.dedup();
    if caps.is_empty() {
        return "no capabilities".into();
    }
    caps.iter()
        .map(|cap| {
            let mut whys: Vec<&str> = needs
                .iter()
                .filter(|n| n.cap == *cap)
                .map(|n| n.why.as_str())
                .collect();
            whys.dedup();
            format!("{} ({})", cap.name(), whys.join("; "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::{CStr, CString};
    use std::io;
    use std::path::Path;

    use super::{describe, Need, User};
    use crate::error::{Error, Result};

    /// linux/capability.h: 64-bit sets in two 32-bit halves.
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_SETPCAP: u32 = 8;
    /// Used when /proc/sys/kernel/cap_last_cap cannot be read (CAP_CHECKPOINT_RESTORE).
    const DEFAULT_LAST_CAP: u32 = 40;

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    /// One thread's capability sets, as bit masks (bit n = capability n).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Sets {
        effective: u64,
        permitted: u64,
        inheritable: u64,
    }

    fn capget() -> io::Result<Sets> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: a version 3 header with pid 0 (this thread) and room for the two
        // CapData the kernel writes for that version.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
        Ok(Sets {
            effective: join(|d| d.effective),
            permitted: join(|d| d.permitted),
            inheritable: join(|d| d.inheritable),
        })
    }

    fn capset(sets: Sets) -> io::Result<()> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let split = |mask: u64, half: u32| (mask >> (32 * half)) as u32;
        let data: [CapData; 2] = [0, 1].map(|half| CapData {
            effective: split(sets.effective, half),
            permitted: split(sets.permitted, half),
            inheritable: split(sets.inheritable, half),
        });
        // SAFETY: a version 3 header with pid 0 (this thread) and the two CapData the
        // kernel reads for that version.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// prctl(2) with integer arguments.
    fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
        // SAFETY: the options used here take plain integers, no pointers.
        let rc = unsafe {
            libc::prctl(
                option,
                arg,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn last_cap() -> u32 {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_LAST_CAP)
            .min(63)
    }

    fn thread_count() -> Option<usize> {
        std::fs::read_dir("/proc/self/task")
            .ok()
            .map(|dir| dir.count())
    }

    pub(super) fn give_up(
        user: Option<&User>,
        needs: &[Need],
        created: Option<&Path>,
    ) -> Result<()> {
        if let Some(n) = thread_count().filter(|&n| n > 1) {
            return Err(Error::runtime(format!(
                "internal error: privileges must be given up while the sensor has one thread, \
                 and it has {n}"
            )));
        }
        let failed = |what: &str, e: io::Error| Error::runtime(format!("cannot {what}: {e}"));
        let before = capget().map_err(|e| failed("read the capabilities", e))?;
        let wanted = needs
            .iter()
            .fold(0u64, |mask, n| mask | (1 << n.cap.number()));
        // A capability the sensor was not given cannot be kept (nor was it needed to attach).
        let keep = wanted & before.permitted;
        let kept: Vec<Need> = needs
            .iter()
            .filter(|n| keep & (1 << n.cap.number()) != 0)
            .cloned()
            .collect();

        // The bounding set first, while CAP_SETPCAP is still effective. Without it (a
        // service manager started the sensor unprivileged), that manager set the bound.
        if before.effective & (1 << CAP_SETPCAP) != 0 {
            for cap in 0..=last_cap() {
                if keep & (1 << cap) == 0 {
                    match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
                        // A capability this kernel does not know.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                        other => other.map_err(|e| failed("empty the bounding set", e))?,
                    }
                }
            }
        }
        if let Some(user) = user {
            if let Some(dir) = created {
                hand_over(dir, user).map_err(|e| {
                    failed(&format!("hand {} over to user {user}", dir.display()), e)
                })?;
            }
            switch_user(user, keep != 0)?;
        }
        // Ambient capabilities (e.g. from systemd's AmbientCapabilities=) would pass to
        // programs the sensor executes; kernels before 4.3 have none (EINVAL).
        match prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            other => other.map_err(|e| failed("clear the ambient capabilities", e))?,
        }
        let target = Sets {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        };
        capset(target).map_err(|e| failed("drop capabilities", e))?;
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| failed("set no_new_privs", e))?;
        let after = capget().map_err(|e| failed("read the capabilities", e))?;
        if after != target {
            return Err(Error::runtime(format!(
                "dropping capabilities left {after:x?}, not {target:x?}"
            )));
        }

        let (uid, gid) = (current_uid(), current_gid());
        let name = lookup_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| "uid".to_string(), |u| u.name);
        tracing::info!(
            "privileges: running as {name} (uid {uid}, gid {gid}) with {}; no_new_privs set",
            describe(&kept)
        );
        Ok(())
    }

    /// Gives the directory the sensor just made to `user`, through a descriptor of the
    /// directory itself: a symlink swapped in for it is not followed.
    fn hand_over(dir: &Path, user: &User) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)?;
        std::os::unix::fs::fchown(&fd, Some(user.uid), Some(user.gid))
    }

    /// Switches to `user` and its primary group alone; with `keep_caps`, the permitted
    /// capabilities survive the switch (the effective ones are restored by the caller).
    fn switch_user(user: &User, keep_caps: bool) -> Result<()> {
        if current_uid() == user.uid && current_gid() == user.gid {
            return Ok(());
        }
        let failed = |e: io::Error| {
            Error::runtime(format!(
                "cannot switch to user {user}: {e} (that needs CAP_SETUID and CAP_SETGID, as \
                 root has; or start the sensor as that user and leave out --user)"
            ))
        };
        if keep_caps {
            prctl(libc::PR_SET_KEEPCAPS, 1).map_err(failed)?;
        }
        // SAFETY: an empty group list; the pointer is not read.
        let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
        check(rc).map_err(failed)?;
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::setresgid(user.gid, user.gid, user.gid) };
        check(rc).map_err(failed)?;
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::setresuid(user.uid, user.uid, user.uid) };
        check(rc).map_err(failed)?;
        if keep_caps {
            prctl(libc::PR_SET_KEEPCAPS, 0).map_err(failed)?;
        }
        Ok(())
    }

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn current_uid() -> u32 {
        // SAFETY: getuid cannot fail.
        unsafe { libc::getuid() }
    }

    fn current_gid() -> u32 {
        // SAFETY: getgid cannot fail.
        unsafe { libc::getgid() }
    }

    /// Largest buffer tried for one user database entry.
    const MAX_ENTRY: usize = 1 << 20;

    /// Looks up a user with getpwnam_r or getpwuid_r, growing the buffer as they ask.
    fn lookup(
        call: impl Fn(
            *mut libc::passwd,
            *mut libc::c_char,
            usize,
            *mut *mut libc::passwd,
        ) -> libc::c_int,
    ) -> io::Result<Option<User>> {
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: passwd is plain data; all-zero is a valid start.
            let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = call(
                &raw mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut found,
            );
            if rc == libc::ERANGE && buf.len() < MAX_ENTRY {
                buf.resize(buf.len() * 2, 0);
                continue;
            }
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            if found.is_null() {
                return Ok(None);
            }
            // SAFETY: on success pw_name points to a NUL-terminated string in `buf`,
            // which is still alive.
            let name = unsafe { CStr::from_ptr(entry.pw_name) }
                .to_string_lossy()
                .into_owned();
            return Ok(Some(User {
                name,
                uid: entry.pw_uid,
                gid: entry.pw_gid,
            }));
        }
    }

    pub(super) fn lookup_name(name: &str) -> io::Result<Option<User>> {
        let Ok(c_name) = CString::new(name) else {
            return Ok(None);
        };
        lookup(|entry, buf, len, found| {
            // SAFETY: a NUL-terminated name, an entry and a buffer of `len` bytes that
            // outlive the call, and a place for the result.
            unsafe { libc::getpwnam_r(c_name.as_ptr(), entry, buf, len, found) }
        })
    }

    pub(super) fn lookup_uid(uid: u32) -> io::Result<Option<User>> {
        lookup(|entry, buf, len, found| {
            // SAFETY: an entry and a buffer of `len` bytes that outlive the call, and a
            // place for the result.
            unsafe { libc::getpwuid_r(uid, entry, buf, len, found) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_names_each_kept_capability_once_with_its_reasons() {
        assert_eq!(describe(&[]), "no capabilities");
        let needs = [
            Need::new(Capability::Bpf, "to read eth0's kernel counters"),
            Need::new(Capability::NetAdmin, "to detach the TC programs from eth0"),
            Need::new(Capability::NetAdmin, "to detach the TC programs from eth1"),
        ];
        assert_eq!(
            describe(&needs),
            "CAP_NET_ADMIN (to detach the TC programs from eth0; to detach the TC programs \
             from eth1), CAP_BPF (to read eth0's kernel counters)"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn users_are_resolved_by_name_or_uid() {
        let root = parse_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(parse_user("0").unwrap(), root);
        let err = parse_user("no-such-user-here").unwrap_err();
        assert!(err.contains("no user named no-such-user-here"), "{err}");
        assert!(parse_user("a\0b").is_err());
    }
}
