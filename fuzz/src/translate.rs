//! What the `translate` target does with its input: an arbitrary classic BPF program and
//! packet. The program is translated by `cbpf_to_ebpf` for TC or XDP; where the translator
//! and then the kernel's verifier accept it, the kernel runs it on the packet
//! (BPF_PROG_TEST_RUN), and its result must be what libpcap's interpreter (`bpf_filter`)
//! returns for the same program and packet.
//!
//! Needs root (CAP_BPF and CAP_NET_ADMIN): without, the first load panics and says so.
//!
//! Left uncompared, as the known differences between the kernel's classic BPF (which the
//! translation follows) and libpcap's interpreter, not faults:
//! - programs with an ancillary load: libpcap's interpreter has no packet metadata;
//! - programs that may read scratch memory before writing it: libpcap's is uninitialised,
//!   and the kernel refuses such classic programs;
//! - runs where an indirect load's X + k overflows 32 bits (in XDP, X + k + 4, the
//!   hidden VLAN tag's length, to be sure): the kernel wraps around, libpcap rejects (the
//!   translator's `indirect_offset_wraps_around` test);
//! - packets a test run refuses (too short for their headers, too long for an skb), and
//!   XDP packets with an outer VLAN tag cut short, which the kernel would not untag;
//! - programs the verifier refuses.

use std::os::fd::AsFd;

use cbpf_to_ebpf::{CbpfInsn, Hook, OnAccept, Target};

extern "C" {
    /// libpcap's classic BPF interpreter (linked through the pcap crate).
    fn bpf_filter(pc: *const CbpfInsn, p: *const u8, wirelen: u32, buflen: u32) -> u32;
}

/// The size of one instruction in the input.
pub const INSN_LEN: usize = 8;

/// The fuzz input: byte 0 the hook (even: TC, odd: XDP), byte 1 the number of
/// instructions `n`, then `n` instructions of [`INSN_LEN`] bytes, each as `struct bpf_insn`
/// little-endian (code `u16`, jt `u8`, jf `u8`, k `u32`), then the packet (an Ethernet
/// frame). `cargo xtask fuzz` writes its seeds in this layout.
pub struct Input<'a> {
    /// Where the program runs.
    pub hook: Hook,
    /// The classic program.
    pub program: Vec<CbpfInsn>,
    /// The frame it runs on.
    pub packet: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads the layout above; `None` if `data` is too short for its instructions.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[hook, count], rest) = data.split_first_chunk::<2>()?;
        let hook = if hook % 2 == 0 {
            Hook::Tc
        } else {
            Hook::Xdp { frags: true }
        };
        let (insns, packet) = rest.split_at_checked(usize::from(count) * INSN_LEN)?;
        let program = insns
            .chunks_exact(INSN_LEN)
            .map(|b| CbpfInsn {
                code: u16::from_le_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            })
            .collect();
        Some(Self {
            hook,
            program,
            packet,
        })
    }
}

/// Translates, loads and runs the input's program, and compares with libpcap.
pub fn run(data: &[u8]) {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let prog = &input.program;
    let target = Target {
        hook: input.hook,
        // As classic BPF rejects: the run's result is then the classic program's.
        pass: 0,
        on_accept: OnAccept::Return,
    };
    let Ok(insns) = cbpf_to_ebpf::translate(prog, &target) else {
        return;
    };
    // Translated, so every jump lands inside the program, which ends with a return, and
    // every scratch memory index is below 16: what libpcap's interpreter trusts.
    if has_ancillary_load(prog) || !memory_written_before_read(prog) {
        return;
    }
    // What libpcap's interpreter sees: in XDP, the frame as the kernel's taps would show it.
    let seen = match input.hook {
        Hook::Xdp { .. } => match untagged(input.packet) {
            Some(frame) => frame,
            None => return,
        },
        Hook::SocketFilter | Hook::Tc => input.packet.to_vec(),
    };
    let slack = match input.hook {
        Hook::Xdp { .. } => 4,
        Hook::SocketFilter | Hook::Tc => 0,
    };
    if indirect_load_wraps(prog, &seen, slack) {
        return;
    }
    let fd = match cbpf_to_ebpf::load_program(input.hook, &insns, "cbpf_fuzz") {
        Ok(fd) => fd,
        Err(e) if e.errno() == libc::EPERM => {
            panic!("{e}: the translate target needs root (CAP_BPF and CAP_NET_ADMIN)")
        }
        // Refused by the verifier, or too complex for it.
        Err(e) if [libc::EACCES, libc::EINVAL, libc::E2BIG].contains(&e.errno()) => return,
        Err(e) => panic!("{e:#}"),
    };
    let kernel = match cbpf_to_ebpf::test_run(fd.as_fd(), input.packet, 1) {
        Ok(run) => run.retval,
        // A packet too short for its headers, or too long for a test run.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) => return,
        Err(e) => panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", input.packet.len()),
    };
    let len = u32::try_from(seen.len()).expect("a fuzz input is far below 4 GiB");
    // SAFETY: CbpfInsn has struct bpf_insn's layout; the program translated, so it is one
    // the interpreter may run (see above); `seen` is `len` bytes.
    let libpcap = unsafe { bpf_filter(prog.as_ptr(), seen.as_ptr(), len, len) };
    assert_eq!(
        kernel,
        libpcap,
        "{:?} on a {}-byte packet: the kernel returned {kernel:#x}, libpcap {libpcap:#x}; \
         program {prog:?}",
        input.hook,
        input.packet.len()
    );
}

const LD_ABS: [u16; 3] = [0x20, 0x28, 0x30];
const LD_IND: [u16; 3] = [0x40, 0x48, 0x50];
const LD_MEM: u16 = 0x60;
const LDX_MEM: u16 = 0x61;
const ST: u16 = 0x02;
const STX: u16 = 0x03;

/// Whether the program loads from a negative offset: an ancillary load (Linux packet
/// metadata) once translated.
fn has_ancillary_load(prog: &[CbpfInsn]) -> bool {
    prog.iter()
        .any(|i| LD_ABS.contains(&i.code) && (i.k as i32) < 0)
}

/// Where control may go after `pc` (jumps only go forward).
fn successors(prog: &[CbpfInsn], pc: usize) -> Vec<usize> {
    let i = prog[pc];
    let next = pc + 1;
    match i.code & 0x07 {
        0x06 => vec![],
        0x05 if i.code & 0xf0 == 0 => vec![next.saturating_add(i.k as usize)],
        0x05 => vec![next + usize::from(i.jt), next + usize::from(i.jf)],
        _ => vec![next],
    }
}

/// Whether every path writes M[k] before it reads it, as the kernel checks a classic
/// program (`check_load_and_stores`).
fn memory_written_before_read(prog: &[CbpfInsn]) -> bool {
    // The words written on every path to each instruction; None: not reached (yet).
    let mut written: Vec<Option<u16>> = vec![None; prog.len()];
    written[0] = Some(0);
    for pc in 0..prog.len() {
        let Some(mut words) = written[pc] else {
            continue;
        };
        let i = prog[pc];
        let word = 1u16 << (i.k & 0xf);
        match i.code {
            LD_MEM | LDX_MEM if words & word == 0 => return false,
            ST | STX => words |= word,
            _ => {}
        }
        for to in successors(prog, pc) {
            if let Some(w) = written.get_mut(to) {
                *w = Some(w.map_or(words, |before| before & words));
            }
        }
    }
    true
}

/// `frame` without its outer 802.1Q or 802.1ad tag, as the kernel's taps show it (and the
/// XDP translation reads it); `None` for a tagged frame too short to hold the tag.
fn untagged(frame: &[u8]) -> Option<Vec<u8>> {
    match frame.get(12..14) {
        Some([0x81, 0x00] | [0x88, 0xa8]) if frame.len() < 18 => None,
        Some([0x81, 0x00] | [0x88, 0xa8]) => Some([&frame[..12], &frame[16..]].concat()),
        _ => Some(frame.to_vec()),
    }
}

/// Runs the (translated, hence valid) program as libpcap's interpreter does and says
/// whether it comes to an indirect load whose X + k + `slack` overflows 32 bits, where the
/// kernel and libpcap part ways.
fn indirect_load_wraps(prog: &[CbpfInsn], packet: &[u8], slack: u32) -> bool {
    let len = packet.len() as u32;
    // The big-endian value of `size` bytes at `at`, if the packet holds them.
    let load = |at: u32, size: u32| -> Option<u32> {
        if at > len || size > len - at {
            return None;
        }
        let bytes = &packet[at as usize..(at + size) as usize];
        Some(bytes.iter().fold(0, |v, &b| v << 8 | u32::from(b)))
    };
    let size = |code: u16| match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        _ => 1,
    };
    let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0;
    loop {
        let i = prog[pc];
        pc += 1;
        let k = i.k;
        match i.code {
            // Every return, and every load past the end, ends the run.
            c if c & 0x07 == 0x06 => return false,
            c if LD_ABS.contains(&c) => match load(k, size(c)) {
                Some(v) => a = v,
                None => return false,
            },
            c if LD_IND.contains(&c) => {
                let Some(at) = x
                    .checked_add(k)
                    .filter(|at| at.checked_add(slack).is_some())
                else {
                    return true;
                };
                match load(at, size(c)) {
                    Some(v) => a = v,
                    None => return false,
                }
            }
            0x00 => a = k,
            0x01 => x = k,
            LD_MEM => a = mem[k as usize],
            LDX_MEM => x = mem[k as usize],
            0x80 => a = len,
            0x81 => x = len,
            0xb1 => match load(k, 1) {
                Some(v) => x = (v & 0xf) << 2,
                None => return false,
            },
            ST => mem[k as usize] = a,
            STX => mem[k as usize] = x,
            0x07 => x = a,
            0x87 => a = x,
            c if c & 0x07 == 0x04 => {
                let operand = if c & 0x08 != 0 { x } else { k };
                a = match c & 0xf0 {
                    0x00 => a.wrapping_add(operand),
                    0x10 => a.wrapping_sub(operand),
                    0x20 => a.wrapping_mul(operand),
                    0x30 | 0x90 if operand == 0 => return false,
                    0x30 => a / operand,
                    0x90 => a % operand,
                    0x40 => a | operand,
                    0x50 => a & operand,
                    0x60 | 0x70 if operand >= 32 => 0,
                    0x60 => a << operand,
                    0x70 => a >> operand,
                    0x80 => a.wrapping_neg(),
                    _ => a ^ operand,
                };
            }
            0x05 => pc += k as usize,
            // The conditional jumps: what remains of a translated program.
            c => {
                let operand = if c & 0x08 != 0 { x } else { k };
                let holds = match c & 0xf0 {
                    0x10 => a == operand,
                    0x20 => a > operand,
                    0x30 => a >= operand,
                    _ => a & operand != 0,
                };
                pc += usize::from(if holds { i.jt } else { i.jf });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> CbpfInsn {
        CbpfInsn { code, jt, jf, k }
    }

    #[test]
    fn reads_the_documented_layout() {
        let mut data = vec![1, 2];
        data.extend_from_slice(&[0x28, 0, 0, 0, 12, 0, 0, 0]);
        data.extend_from_slice(&[0x16, 0, 0, 0, 0, 0, 0, 0]);
        data.extend_from_slice(&[0xaa; 14]);
        let input = Input::parse(&data).unwrap();
        assert_eq!(input.hook, Hook::Xdp { frags: true });
        assert_eq!(input.program, [insn(0x28, 0, 0, 12), insn(0x16, 0, 0, 0)]);
        assert_eq!(input.packet, [0xaa; 14]);
        assert!(Input::parse(&data[..17]).is_none());
        assert!(Input::parse(&[0]).is_none());
    }

    #[test]
    fn memory_read_before_write_on_some_path() {
        let (st, ld, ret) = (
            insn(ST, 0, 0, 3),
            insn(LD_MEM, 0, 0, 3),
            insn(0x16, 0, 0, 0),
        );
        assert!(memory_written_before_read(&[st, ld, ret]));
        assert!(!memory_written_before_read(&[ld, ret]));
        // Written on the true branch only, read where both branches meet.
        let jeq = insn(0x15, 0, 1, 0);
        assert!(!memory_written_before_read(&[jeq, st, ld, ret]));
        assert!(memory_written_before_read(&[
            st,
            jeq,
            insn(ST, 0, 0, 4),
            ld,
            ret
        ]));
    }

    #[test]
    fn indirect_loads_that_wrap_around() {
        let packet = [0u8; 60];
        let ldx = |k| insn(0x01, 0, 0, k);
        let (ind, ret) = (insn(0x50, 0, 0, 0x20), insn(0x16, 0, 0, 0));
        assert!(indirect_load_wraps(
            &[ldx(0xffff_fff0), ind, ret],
            &packet,
            0
        ));
        assert!(!indirect_load_wraps(&[ldx(0x10), ind, ret], &packet, 0));
        assert!(!indirect_load_wraps(
            &[ldx(0xffff_ffd0), ind, ret],
            &packet,
            0
        ));
        assert!(indirect_load_wraps(
            &[ldx(0xffff_ffdd), ind, ret],
            &packet,
            4
        ));
        // Not reached: a return comes first.
        assert!(!indirect_load_wraps(
            &[ldx(0xffff_fff0), insn(0x06, 0, 0, 1), ind, ret],
            &packet,
            0
        ));
    }
}
