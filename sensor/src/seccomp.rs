//! Linux: what the sensor may no longer do once its captures are attached, enforced by a
//! seccomp filter (installed after the privileges are given up, inherited by every thread).
//!
//! After the drop, the sensor still holds its packet sockets: in the eBPF modes the socket
//! that carries the filter or holds promiscuous mode, in `pcap` mode libpcap's. Without a
//! capability, such a socket could still be rebound to every interface (sniffing past
//! `--iface` and `--bpf`), or send frames (injection); and the writable program array would
//! let the in-kernel filter be swapped for a program that passes everything. The filter
//! refuses, with EPERM:
//!
//! * `socket` for AF_PACKET and AF_XDP;
//! * `bind`, `connect`, `sendto`, `sendmsg`, `sendmmsg`, `write`, `writev` on the packet
//!   sockets;
//! * `setsockopt` at level SOL_PACKET;
//! * `bpf` map updates and deletions, and program loads;
//! * system calls of another architecture's ABI (x32, i386), which would go round it.
//!
//! Everything else is allowed: it is a fence around the capture, not a sandbox. The
//! filter runs on every system call of the process; its cost is a few dozen classic BPF
//! instructions per call (see README "Privileges" for the measurement).

use std::os::fd::RawFd;

use crate::error::{Error, Result};

// linux/filter.h and linux/seccomp.h.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `struct seccomp_data`: nr, arch, instruction pointer, then six 64-bit arguments (their
/// low halves first on little-endian machines).
const NR_AT: u32 = 0;
const ARCH_AT: u32 = 4;
const ARG0_AT: u32 = 16;
const ARG1_AT: u32 = 24;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;

/// Installs the filter; `packet_fds`: the packet sockets the captures keep.
pub fn restrict(packet_fds: &[RawFd]) -> Result<()> {
    let program = filter(packet_fds)?;
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| Error::runtime("seccomp filter too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, alive for the call; the kernel copies it.
    // no_new_privs is set already (see privileges), as an unprivileged filter requires.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(Error::runtime(format!(
            "cannot install the seccomp filter: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The classic BPF program: see the module documentation.
fn filter(packet_fds: &[RawFd]) -> Result<Vec<libc::sock_filter>> {
    let fds: Vec<u32> = packet_fds
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| Error::runtime("bad packet socket descriptor")))
        .collect::<Result<_>>()?;
    let deny = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut p = Blocks::default();
    p.load(ARCH_AT);
    p.unless_eq(AUDIT_ARCH, deny);
    p.load(NR_AT);
    p.push(jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
    p.ret(deny);
    // Each checked call: load its argument, refuse the listed values, else allow.
    let checks: Vec<(i64, u32, Vec<u32>)> = [
        (
            libc::SYS_socket,
            ARG0_AT,
            vec![libc::AF_PACKET as u32, libc::AF_XDP as u32],
        ),
        (libc::SYS_setsockopt, ARG1_AT, vec![libc::SOL_PACKET as u32]),
        (
            libc::SYS_bpf,
            ARG0_AT,
            vec![BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD],
        ),
    ]
    .into_iter()
    .chain(
        [
            libc::SYS_bind,
            libc::SYS_connect,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_sendmmsg,
            libc::SYS_write,
            libc::SYS_writev,
        ]
        .map(|nr| (nr, ARG0_AT, fds.clone())),
    )
    .collect();
    for (nr, at, refused) in checks {
        let nr = u32::try_from(nr).map_err(|_| Error::runtime("bad system call number"))?;
        // Not this call: skip its check (2 + 2 per refused value + the allow).
        let len = u8::try_from(2 + 2 * refused.len())
            .map_err(|_| Error::runtime("too many packet sockets for the seccomp filter"))?;
        p.push(jump(BPF_JEQ_K, nr, 0, len));
        p.load(at);
        for value in refused {
            p.push(jump(BPF_JEQ_K, value, 0, 1));
            p.ret(deny);
        }
        p.ret(SECCOMP_RET_ALLOW);
    }
    p.ret(SECCOMP_RET_ALLOW);
    Ok(p.0)
}

#[derive(Default)]
struct Blocks(Vec<libc::sock_filter>);

impl Blocks {
    fn push(&mut self, i: libc::sock_filter) {
        self.0.push(i);
    }

    fn load(&mut self, at: u32) {
        self.push(libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: at,
        });
    }

    fn ret(&mut self, value: u32) {
        self.push(libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: value,
        });
    }

    /// Returns `value` unless the accumulator is `k`.
    fn unless_eq(&mut self, k: u32, value: u32) {
        self.push(jump(BPF_JEQ_K, k, 1, 0));
        self.ret(value);
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on one system call as the kernel would, with a tiny interpreter of
    /// the instructions it uses.
    fn verdict(program: &[libc::sock_filter], arch: u32, nr: u32, args: [u32; 2]) -> u32 {
        let word = |at: u32| match at {
            NR_AT => nr,
            ARCH_AT => arch,
            ARG0_AT => args[0],
            ARG1_AT => args[1],
            _ => panic!("load at {at}"),
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => acc = word(i.k),
                BPF_RET_K => return i.k,
                BPF_JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_JGE_K => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
                other => panic!("instruction {other:#x}"),
            }
        }
    }

    #[test]
    fn refuses_what_the_capture_must_not_do_and_allows_the_rest() {
        let program = filter(&[7, 9]).unwrap();
        let deny = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let call = |nr: i64, a0: u32, a1: u32| verdict(&program, AUDIT_ARCH, nr as u32, [a0, a1]);
        let packet = libc::AF_PACKET as u32;
        assert_eq!(call(libc::SYS_socket, packet, 3), deny);
        assert_eq!(call(libc::SYS_socket, libc::AF_XDP as u32, 3), deny);
        assert_eq!(
            call(libc::SYS_socket, libc::AF_INET as u32, 2),
            SECCOMP_RET_ALLOW
        );
        for nr in [
            libc::SYS_bind,
            libc::SYS_sendto,
            libc::SYS_write,
            libc::SYS_sendmmsg,
        ] {
            assert_eq!(call(nr, 7, 0), deny, "{nr}");
            assert_eq!(call(nr, 9, 0), deny, "{nr}");
            assert_eq!(call(nr, 8, 0), SECCOMP_RET_ALLOW, "{nr}");
        }
        let sol_packet = libc::SOL_PACKET as u32;
        assert_eq!(call(libc::SYS_setsockopt, 3, sol_packet), deny);
        assert_eq!(
            call(libc::SYS_setsockopt, 3, libc::SOL_SOCKET as u32),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(call(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, 0), deny);
        assert_eq!(call(libc::SYS_bpf, BPF_PROG_LOAD, 0), deny);
        assert_eq!(
            call(libc::SYS_bpf, 1, 0),
            SECCOMP_RET_ALLOW,
            "map lookups stay"
        );
        assert_eq!(call(libc::SYS_read, 7, 0), SECCOMP_RET_ALLOW);
        assert_eq!(call(libc::SYS_recvfrom, 7, 0), SECCOMP_RET_ALLOW);
        // Another ABI, or x32 numbers, are refused outright.
        assert_eq!(verdict(&program, 0x4000_0003, 0, [0, 0]), deny);
        assert_eq!(call(i64::from(X32_SYSCALL_BIT) + 1, 0, 0), deny);
    }

    #[test]
    fn without_packet_sockets_only_the_socket_and_bpf_calls_are_checked() {
        let program = filter(&[]).unwrap();
        let call = |nr: i64, a0: u32| verdict(&program, AUDIT_ARCH, nr as u32, [a0, 0]);
        assert_eq!(call(libc::SYS_write, 1), SECCOMP_RET_ALLOW);
        assert_ne!(
            call(libc::SYS_socket, libc::AF_PACKET as u32),
            SECCOMP_RET_ALLOW
        );
    }
}
