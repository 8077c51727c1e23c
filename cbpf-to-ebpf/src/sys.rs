//! The bpf() system calls a translated program needs, which loaders built around object
//! files (Aya, libbpf) do not offer for a bare instruction array: loading it, putting it
//! into a program array, and running it on a packet (BPF_PROG_TEST_RUN).
//!
//! Each call fills its own `#[repr(C)]` copy of the part of `union bpf_attr` it uses
//! (uapi `linux/bpf.h`), zero-initialised and without implicit padding, and passes that
//! size: the kernel treats the missing tail as zeros.

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{EbpfInsn, Hook};

// Commands.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

// Program types, attach types and flags.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_ANY: u64 = 0;
const BPF_OBJ_NAME_LEN: usize = 16;

/// First verifier log buffer; doubled while the kernel says it is too small.
const LOG_START: usize = 4 << 20;
const LOG_MAX: usize = 64 << 20;
/// How many lines of the verifier log an error keeps.
const LOG_TAIL_LINES: usize = 20;

/// `bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr` for BPF_MAP_CREATE, up to `map_name`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; BPF_OBJ_NAME_LEN],
}

/// `bpf_attr` for the BPF_MAP_*_ELEM commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for BPF_PROG_TEST_RUN, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Calls bpf(2) with `attr`, returning its non-negative result.
///
/// # Safety
///
/// Every pointer stored in `attr` must be valid for what `cmd` does with it (read or
/// write, for the sizes stored beside it) for the duration of the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] bpf_attr prefix of the
    // size passed; the caller vouches for the pointers inside it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Wraps a descriptor that bpf(2) just returned.
fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just created this descriptor for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A name for the kernel's listings (bpftool): truncated to 15 bytes, NUL-terminated.
fn object_name(name: &str) -> [u8; BPF_OBJ_NAME_LEN] {
    let mut out = [0; BPF_OBJ_NAME_LEN];
    // The kernel accepts only alphanumerics, '_' and '.'.
    let allowed = name
        .bytes()
        .filter(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.');
    for (slot, b) in out[..BPF_OBJ_NAME_LEN - 1].iter_mut().zip(allowed) {
        *slot = b;
    }
    out
}

/// Why the kernel refused a program: its errno and the end of the verifier's log.
#[derive(Debug)]
pub struct LoadError {
    errno: i32,
    log_tail: String,
}

impl LoadError {
    /// What BPF_PROG_LOAD failed with: EACCES or EINVAL when the verifier refused the
    /// program, EPERM without the privileges (CAP_BPF, and CAP_NET_ADMIN for TC and XDP),
    /// E2BIG for too many instructions, ENOMEM, ...
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The last lines of the verifier log (empty if the kernel wrote none).
    pub fn log_tail(&self) -> &str {
        &self.log_tail
    }
}

/// One line; the alternate form (`{:#}`) adds the end of the verifier log below it.
impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let error = io::Error::from_raw_os_error(self.errno);
        write!(f, "the kernel refused the filter program: {error}")?;
        // The verifier ends with statistics; the reason is the line before.
        let mut lines = self.log_tail().lines().rev();
        let last = lines
            .clone()
            .find(|l| !l.starts_with("processed "))
            .or_else(|| lines.next());
        if let Some(last) = last {
            write!(f, "; verifier: {last}")?;
        }
        if f.alternate() && !self.log_tail().is_empty() {
            write!(f, "\n{}", self.log_tail())?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Loads `insns` (as [`translate`](crate::translate) made them for `hook`) as a GPL
/// program of the hook's type, named `name` in the kernel's listings (bpftool; cut to
/// 15 bytes of letters, digits, `_` and `.`). The descriptor keeps it loaded.
///
/// A refused program is loaded a second time with the verifier log on, so that the error
/// can say why; the first attempt goes without, since a log costs verification time.
pub fn load_program(hook: Hook, insns: &[EbpfInsn], name: &str) -> Result<OwnedFd, LoadError> {
    let errno = match load_with_log(hook, insns, name, &mut []) {
        Ok(fd) => return Ok(fd),
        // bpf() failures always carry one; EIO stands for the impossible other case.
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    };
    let mut log = vec![0u8; LOG_START];
    loop {
        match load_with_log(hook, insns, name, &mut log) {
            // Refused once, accepted now: the first refusal was transient (memory, a signal).
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && log.len() < LOG_MAX => {
                log = vec![0u8; log.len() * 2];
            }
            Err(_) => break,
        }
    }
    Err(LoadError {
        errno,
        log_tail: log_tail(&log),
    })
}

/// One BPF_PROG_LOAD; `log` empty means no verifier log.
fn load_with_log(
    hook: Hook,
    insns: &[EbpfInsn],
    name: &str,
    log: &mut [u8],
) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"GPL\0";
    let (prog_type, expected_attach_type, prog_flags) = match hook {
        Hook::SocketFilter => (BPF_PROG_TYPE_SOCKET_FILTER, 0, 0),
        Hook::Tc => (BPF_PROG_TYPE_SCHED_CLS, 0, 0),
        Hook::Xdp { frags } => (
            BPF_PROG_TYPE_XDP,
            BPF_XDP,
            if frags { BPF_F_XDP_HAS_FRAGS } else { 0 },
        ),
    };
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_flags,
        prog_name: object_name(name),
        expected_attach_type,
        ..Default::default()
    };
    if !log.is_empty() {
        attr.log_level = 1;
        attr.log_size = u32::try_from(log.len()).unwrap_or(u32::MAX);
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    // SAFETY: `insns` (insn_cnt entries), the NUL-terminated licence and `log` (log_size
    // writable bytes) outlive the call.
    unsafe { bpf(BPF_PROG_LOAD, &mut attr) }.and_then(owned_fd)
}

/// The last lines of a NUL-terminated verifier log.
fn log_tail(log: &[u8]) -> String {
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Puts `prog` at `index` of the BPF_MAP_TYPE_PROG_ARRAY `map`, where a translated
/// program's [`OnAccept::TailCall`](crate::OnAccept::TailCall) finds the next program.
pub fn prog_array_set(map: BorrowedFd, index: u32, prog: BorrowedFd) -> io::Result<()> {
    let bad_fd = |_| io::Error::from_raw_os_error(libc::EBADF);
    let value: u32 = prog.as_raw_fd().try_into().map_err(bad_fd)?;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd().try_into().map_err(bad_fd)?,
        key: std::ptr::from_ref(&index) as u64,
        value: std::ptr::from_ref(&value) as u64,
        flags: BPF_ANY,
        ..Default::default()
    };
    // SAFETY: the kernel reads the map's key size from `key` and its value size from
    // `value`, both 4 bytes in a program array (a map with larger ones would make it read
    // past them, but only read); both outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Creates a map of `map_type` (BPF_MAP_TYPE_*).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_name: object_name(name),
        ..Default::default()
    };
    // SAFETY: the attribute holds no pointers.
    unsafe { bpf(BPF_MAP_CREATE, &mut attr) }.and_then(owned_fd)
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (of the last run).
    pub retval: u32,
    /// Average run time over the repetitions.
    pub duration_ns: u32,
}

/// Runs `prog` on `data` `repeat` times in the kernel (BPF_PROG_TEST_RUN; `repeat` 0
/// runs it once).
///
/// `data` is a frame from its Ethernet header on. TC and XDP programs see it whole; a
/// socket filter sees it from after the Ethernet header. The kernel refuses data shorter
/// than an Ethernet header and, for skb programs, shorter than the IPv4 or IPv6 header its
/// EtherType announces, or longer than fits a page (XDP takes more, in fragments, when
/// loaded with `frags`).
pub fn test_run(prog: BorrowedFd, data: &[u8], repeat: u32) -> io::Result<TestRun> {
    let mut attr = TestRunAttr {
        prog_fd: prog
            .as_raw_fd()
            .try_into()
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        data_size_in: u32::try_from(data.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: the kernel reads data_size_in bytes from `data`, which outlives the call;
    // data_out and ctx_out are null, so it writes nothing through pointers.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
    })
}

/// `struct xdp_md`, the context BPF_PROG_TEST_RUN takes for an XDP program.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs the XDP program `prog` `repeat` times on copies of `frame` as if each had arrived
/// on interface `ifindex` of the caller's network namespace, in "live frames" mode
/// (BPF_F_TEST_XDP_LIVE_FRAMES, Linux 5.18+): what the program returns happens for real,
/// so XDP_TX sends each frame out of that interface (and XDP_REDIRECT where it says),
/// `batch_size` frames (1 to 256) per flush, as xdp-trafficgen generates traffic.
///
/// The kernel reports nothing per frame: a frame the interface refused is gone without a
/// trace here (the interface's counters show it).
pub fn xdp_live_frames(
    prog: BorrowedFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    batch_size: u32,
) -> io::Result<()> {
    let size = u32::try_from(frame.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let ctx = XdpMd {
        data_end: size,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog
            .as_raw_fd()
            .try_into()
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        data_size_in: size,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: std::ptr::from_ref(&ctx) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size,
        ..Default::default()
    };
    // SAFETY: the kernel reads data_size_in bytes from `frame` and ctx_size_in bytes from
    // `ctx`, both of which outlive the call; live frames mode takes no output buffers
    // (data_out and ctx_out are null).
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    const EXIT: EbpfInsn = EbpfInsn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    };
    const R0_IS_0: EbpfInsn = EbpfInsn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm: 0,
    };

    /// The verifier refuses a program that returns without setting R0; the error says so
    /// on one line, and the alternate form adds the log.
    #[test]
    fn load_error_carries_the_verifier_log() {
        let err = load_program(Hook::SocketFilter, &[EXIT], "cbpf_bad").unwrap_err();
        assert_eq!(err.errno(), libc::EACCES);
        let line = err.to_string();
        assert!(
            line.starts_with("the kernel refused the filter program: Permission denied"),
            "{line}"
        );
        assert!(line.contains("; verifier: R0 !read_ok"), "{line}");
        assert!(!line.contains('\n'));
        let lines = err.log_tail().lines().count();
        assert!((2..=LOG_TAIL_LINES).contains(&lines), "{err:#}");
        assert_eq!(format!("{err:#}").lines().count(), lines + 1);
    }

    #[test]
    fn prog_array_set_puts_programs_in_range_only() {
        const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
        let prog = load_program(Hook::Tc, &[R0_IS_0, EXIT], "cbpf_ok").unwrap();
        let map = map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2, "cbpf_progs").unwrap();
        prog_array_set(map.as_fd(), 1, prog.as_fd()).unwrap();
        let err = prog_array_set(map.as_fd(), 2, prog.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::E2BIG));
    }

    #[test]
    fn object_names_are_what_the_kernel_accepts() {
        assert_eq!(&object_name("capstream-filter!"), b"capstreamfilter\0");
        assert_eq!(object_name("a_very_long_program_name")[15], 0);
    }
}
