//! The translation: classic instructions in, eBPF instructions out.
//!
//! The result behaves like the kernel's classic BPF on a socket (and libpcap's own
//! interpreter): 32-bit unsigned A and X, scratch memory M[0..16], big-endian packet loads,
//! and any failed load or division by zero ends the program without accepting.
//!
//! Register use: R6 holds the context, R7 is A and R8 is X, all callee-saved so that they
//! survive helper calls. At TC and XDP a packet load at a constant offset reads the bytes
//! in place when a bounds check against data_end (which the verifier asks for) finds them
//! in the linear part, as the kernel's own classic BPF does for an skb; otherwise (and for
//! an indirect load, since a variable offset into the packet takes CAP_PERFMON) it calls
//! bpf_skb_load_bytes or bpf_xdp_load_bytes into a stack buffer: that works on non-linear
//! skbs and XDP frags alike, and a failure is an ordinary return code. (Not LD_IND at TC,
//! though cheaper: its hidden `return 0` on a failed load is TC_ACT_OK there, which ends
//! the chain of TC programs after ours, and a load within the packet's length still fails
//! where the payload is unreadable, as with devmem TCP.) A socket filter may not read the
//! packet directly: it uses LD_ABS and LD_IND, whose hidden `return 0` on a failed load is
//! its not accepting (and a socket filter that should return something else then calls
//! bpf_skb_load_bytes too).
//!
//! XDP runs before the kernel moves a frame's outer VLAN tag into metadata, but tcpdump's
//! live filter (and the one translated here) expects the frame as the kernel's taps see it:
//! tag taken out, its presence and TCI in ancillary loads. So in XDP, R9 holds 4 when the
//! frame carries such a tag (else 0), packet loads at offset 12 and beyond skip it, the
//! length excludes it, and the VLAN ancillary loads read it from the bytes.
//!
//! Stack (below the frame pointer R10): M[i] at -64 + 4i, the load buffer at -72, the
//! scratch map key at -80.

use std::os::fd::{AsRawFd, BorrowedFd};

#[cfg(all(test, target_os = "linux"))]
mod tests;

/// One classic instruction, laid out as `struct bpf_insn` (`linux/filter.h`, libpcap's
/// `pcap/bpf.h`), so that a slice of them can be handed to C.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbpfInsn {
    /// The opcode: class in bits 0-2, then size and mode, operation and source, or the
    /// return value's source.
    pub code: u16,
    /// How many instructions a conditional jump skips when its test holds.
    pub jt: u8,
    /// How many instructions a conditional jump skips when its test fails.
    pub jf: u8,
    /// The constant operand: an offset, an immediate, a jump distance or a return value.
    pub k: u32,
}

impl CbpfInsn {
    /// The instructions of a program libpcap compiled.
    pub fn from_pcap(program: &pcap::BpfProgram) -> Vec<CbpfInsn> {
        // The pcap crate keeps the fields private; its Display shows them all.
        program
            .get_instructions()
            .iter()
            .map(|insn| {
                Self::parse(&insn.to_string())
                    .expect("pcap's BpfInstruction displays as \"code jt jf k\" in decimal")
            })
            .collect()
    }

    /// Parses "code jt jf k", four decimal numbers.
    fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let insn = Self {
            code: fields.next()?.parse().ok()?,
            jt: fields.next()?.parse().ok()?,
            jf: fields.next()?.parse().ok()?,
            k: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(insn)
    }
}

/// One eBPF instruction, laid out as `struct bpf_insn` (`linux/bpf.h`), as BPF_PROG_LOAD
/// takes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EbpfInsn {
    /// The opcode: class, then operation or size and mode, and source.
    pub code: u8,
    /// Destination register in the low nibble, source register in the high one.
    pub regs: u8,
    /// A jump's distance or a memory access's offset.
    pub off: i16,
    /// The immediate operand.
    pub imm: i32,
}

/// Where the translated program runs: the kernel hook, which decides its program type,
/// its context argument and what it may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// BPF_PROG_TYPE_SOCKET_FILTER, on an (AF_PACKET) socket, as tcpdump's own filter runs.
    SocketFilter,
    /// BPF_PROG_TYPE_SCHED_CLS: a TC classifier (clsact or TCX), ingress or egress.
    Tc,
    /// BPF_PROG_TYPE_XDP, ingress only, before the kernel builds an skb. `frags`: the
    /// program accepts multi-buffer frames (jumbo frames, GRO in generic XDP), which loads
    /// from any offset support.
    Xdp {
        /// Loaded with BPF_F_XDP_HAS_FRAGS.
        frags: bool,
    },
}

impl Hook {
    /// What a program at this hook returns to let a packet through untouched: 0 for a
    /// socket filter (which then delivers nothing to its socket), TC_ACT_UNSPEC (-1) for
    /// TC, XDP_PASS (2) for XDP.
    pub const fn pass(self) -> i32 {
        match self {
            Self::SocketFilter => 0,
            Self::Tc => -1,
            Self::Xdp { .. } => 2,
        }
    }

    fn context(self) -> Context {
        match self {
            Self::SocketFilter | Self::Tc => Context::Skb,
            Self::Xdp { .. } => Context::Xdp,
        }
    }
}

/// What the program's context argument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// `struct __sk_buff`: socket filters and TC.
    Skb,
    /// `struct xdp_md`.
    Xdp,
}

/// What the program does when the classic program accepts (returns non-zero).
#[derive(Debug, Clone, Copy)]
pub enum OnAccept<'a> {
    /// Return the classic program's own non-zero result.
    Return,
    /// Store the result (u32) at offset 0 of the value of key 0 of the
    /// BPF_MAP_TYPE_PERCPU_ARRAY `scratch` (value size >= 4), then tail-call `index` of
    /// the BPF_MAP_TYPE_PROG_ARRAY `prog_array`. If either fails, return the target's
    /// `pass`. The descriptors' numbers go into the instructions: they must still name
    /// these maps when the program is loaded, which then holds its own references.
    TailCall {
        /// The program array holding the next program.
        prog_array: BorrowedFd<'a>,
        /// Where in `prog_array` the next program sits.
        index: u32,
        /// The per-CPU array that hands the classic result to the next program.
        scratch: BorrowedFd<'a>,
    },
}

/// What to translate for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The hook the program is loaded for.
    pub hook: Hook,
    /// What the program returns whenever it does not accept (classic result 0, a load
    /// out of bounds, a division by zero): usually [`Hook::pass`].
    pub pass: i32,
    /// What it does when it accepts.
    pub on_accept: OnAccept<'a>,
}

/// Why a classic program cannot be translated: which instruction, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("classic BPF instruction {index}: {refusal}")]
pub struct TranslateError {
    /// The classic instruction at fault (0 for an empty program).
    pub index: usize,
    /// What is wrong with it.
    pub refusal: Refusal,
}

/// What makes a classic program untranslatable. The kernel would refuse the same programs
/// as classic BPF, except for the ancillary loads an XDP program cannot make and the jumps
/// that grow too long in eBPF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No instructions at all.
    #[error("the program is empty")]
    Empty,
    /// The last instruction is not a return, so a path could run past the end.
    #[error("the program does not end with a return")]
    NoFinalReturn,
    /// A jump lands at or beyond the end of the program.
    #[error("jump to {to}, past the end of the program")]
    JumpPastEnd {
        /// The instruction it would land on.
        to: usize,
    },
    /// A load or store of scratch memory `M[index]`, which has 16 words.
    #[error("scratch memory index {index} is not below {}", MEMWORDS)]
    ScratchIndex {
        /// The index asked for.
        index: u32,
    },
    /// An opcode that is no classic BPF instruction (`kind`: which class, if the class
    /// is known).
    #[error("unknown {}opcode {code:#06x}", kind.prefix())]
    UnknownOpcode {
        /// The class the opcode claims.
        kind: OpcodeKind,
        /// The opcode.
        code: u16,
    },
    /// A division or modulo by the constant 0.
    #[error("division by the constant 0")]
    DivisionByZero,
    /// A shift by a constant of 32 or more.
    #[error("shift by {shift}, not below 32")]
    ShiftTooFar {
        /// The shift asked for.
        shift: u32,
    },
    /// A load at a negative offset below the ancillary area (SKF_NET_OFF, SKF_LL_OFF).
    #[error("negative packet offset {offset} (SKF_NET_OFF, SKF_LL_OFF) is not supported")]
    NegativeOffset {
        /// The offset, as a signed number.
        offset: i32,
    },
    /// A Linux ancillary load of skb metadata that an XDP program cannot read (the
    /// metadata does not exist yet at that hook).
    #[error("the ancillary load {} is not available in XDP mode", ancillary_name(*.ancillary))]
    AncillaryNotInXdp {
        /// The load, as an offset from SKF_AD_OFF (`SKF_AD_PKTTYPE` is 4).
        ancillary: i32,
    },
    /// A Linux ancillary load this translator does not implement (netlink attributes,
    /// SKF_AD_ALU_XOR_X, ...), or no ancillary load at all.
    #[error("the ancillary load {} is not supported", ancillary_name(*.ancillary))]
    AncillaryUnsupported {
        /// The load, as an offset from SKF_AD_OFF.
        ancillary: i32,
    },
    /// A jump that spans more eBPF instructions than a 16-bit offset reaches.
    #[error("a jump over {distance} eBPF instructions is too long")]
    JumpTooLong {
        /// How many eBPF instructions it would jump over.
        distance: i64,
    },
}

/// The class of an unknown opcode, for [`Refusal::UnknownOpcode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcodeKind {
    /// A load (LD, LDX).
    Load,
    /// An arithmetic or logic operation (ALU).
    Alu,
    /// A jump (JMP).
    Jump,
    /// A return (RET).
    Return,
    /// Any other: above 0xff, a store with mode bits, or a MISC operation.
    Other,
}

impl OpcodeKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Load => "load ",
            Self::Alu => "ALU ",
            Self::Jump => "jump ",
            Self::Return => "return ",
            Self::Other => "",
        }
    }
}

/// Translates `prog` into an eBPF program for `target`.
///
/// Every instruction is checked, reachable or not; unreachable ones are then left out,
/// since the verifier refuses dead code.
pub fn translate(prog: &[CbpfInsn], target: &Target) -> Result<Vec<EbpfInsn>, TranslateError> {
    let error = |index: usize, refusal: Refusal| TranslateError { index, refusal };
    let Some(last) = prog.last() else {
        return Err(error(0, Refusal::Empty));
    };
    if last.code & 0x07 != class::RET {
        return Err(error(prog.len() - 1, Refusal::NoFinalReturn));
    }

    let live = reachable(prog);
    let mut e = Emitter::new(target);
    e.prologue(prog.iter().any(|i| i.code == LD_MEM || i.code == LDX_MEM));
    let mut starts = Vec::with_capacity(prog.len());
    for (pc, insn) in prog.iter().enumerate() {
        let start = e.insns.len();
        starts.push(start);
        e.classic = pc;
        e.instruction(insn, prog.len())
            .map_err(|refusal| error(pc, refusal))?;
        if !live[pc] {
            // Checked like the rest, but the verifier refuses unreachable code.
            e.discard_from(start);
        }
    }
    // Likewise, the shared endings only if something jumps there.
    let accept = e.insns.len();
    if e.jumps_to(Label::Accept) {
        e.accept_block();
    }
    let pass = e.insns.len();
    if e.jumps_to(Label::Pass) {
        e.pass_block();
    }
    e.resolve(&starts, accept, pass)
}

/// Which instructions some path from the first one reaches (jumps only go forward).
fn reachable(prog: &[CbpfInsn]) -> Vec<bool> {
    let mut live = vec![false; prog.len()];
    live[0] = true;
    for (pc, insn) in prog.iter().enumerate() {
        if !live[pc] {
            continue;
        }
        let next = pc + 1;
        let successors = match insn.code & 0x07 {
            class::RET => vec![],
            class::JMP if insn.code & 0xf0 == u16::from(JA) => {
                vec![next.saturating_add(insn.k as usize)]
            }
            class::JMP => vec![next + usize::from(insn.jt), next + usize::from(insn.jf)],
            _ => vec![next],
        };
        // Targets out of range are reported when the instruction is translated.
        for to in successors {
            if let Some(l) = live.get_mut(to) {
                *l = true;
            }
        }
    }
    live
}

// Classic opcodes: class in bits 0-2, then size and mode (loads), operation and source
// (ALU, jumps), or return value source.
mod class {
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ST: u16 = 0x02;
    pub const STX: u16 = 0x03;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const MISC: u16 = 0x07;
}
const SIZE_W: u16 = 0x00;
const SIZE_H: u16 = 0x08;
const SIZE_B: u16 = 0x10;
const MODE_IMM: u16 = 0x00;
const MODE_ABS: u16 = 0x20;
const MODE_IND: u16 = 0x40;
const MODE_MEM: u16 = 0x60;
const MODE_LEN: u16 = 0x80;
const MODE_MSH: u16 = 0xa0;
const SRC_X: u16 = 0x08;
const RET_A: u16 = 0x10;
const MISC_TXA: u16 = 0x80;
const LD_MEM: u16 = class::LD | SIZE_W | MODE_MEM;
const LDX_MEM: u16 = class::LDX | SIZE_W | MODE_MEM;

// ALU operations and jump tests, shared by classic BPF and eBPF.
const OP_ADD: u8 = 0x00;
const OP_SUB: u8 = 0x10;
const OP_MUL: u8 = 0x20;
const OP_DIV: u8 = 0x30;
const OP_OR: u8 = 0x40;
const OP_AND: u8 = 0x50;
const OP_LSH: u8 = 0x60;
const OP_RSH: u8 = 0x70;
const OP_NEG: u8 = 0x80;
const OP_MOD: u8 = 0x90;
const OP_XOR: u8 = 0xa0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JGE: u8 = 0x30;
const JSET: u8 = 0x40;
const JNE: u8 = 0x50;

// eBPF-only encodings.
const EBPF_LDX: u8 = 0x01;
const EBPF_ST: u8 = 0x02;
const EBPF_STX: u8 = 0x03;
const EBPF_ALU: u8 = 0x04;
const EBPF_JMP: u8 = 0x05;
const EBPF_JMP32: u8 = 0x06;
const EBPF_ALU64: u8 = 0x07;
const EBPF_MEM: u8 = 0x60;
const EBPF_SIZE_DW: u8 = 0x18;
const EBPF_SRC_X: u8 = 0x08;
const EBPF_MOV: u8 = 0xb0;
const EBPF_END_TO_BE: u8 = 0xd8;
const EBPF_CALL: u8 = 0x80;
const EBPF_EXIT: u8 = 0x90;
const EBPF_LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const CTX: u8 = 6;
const A: u8 = 7;
const X: u8 = 8;
/// XDP only: the length of the outer VLAN tag the kernel would take out (0 or 4).
const TAG: u8 = 9;
const FP: u8 = 10;
/// Where the EtherType sits, and the ones the kernel moves into metadata (802.1Q, 802.1ad).
const ETHERTYPE_OFF: u32 = 12;
const ETH_P_8021Q: i32 = 0x8100;
const ETH_P_8021AD: i32 = 0x88a8;
/// EtherTypes start here; below, the field is an 802.3 length.
const ETH_P_802_3_MIN: i32 = 0x600;
const ETH_P_802_3: i32 = 0x0001;
const ETH_P_802_2: i32 = 0x0004;
const JLT: u8 = 0xa0;
const JSLT: u8 = 0xc0;

/// M[0] below the frame pointer; M[i] is 4i bytes above.
const MEM_OFF: i16 = -64;
const MEMWORDS: u32 = 16;
const BUF_OFF: i16 = -72;
const KEY_OFF: i16 = -80;

// Helper ids (uapi enum bpf_func_id).
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_PRANDOM_U32: i32 = 7;
const GET_SMP_PROCESSOR_ID: i32 = 8;
const TAIL_CALL: i32 = 12;
const SKB_LOAD_BYTES: i32 = 26;
const XDP_GET_BUFF_LEN: i32 = 188;
const XDP_LOAD_BYTES: i32 = 189;

/// Linux ancillary loads: LD ABS at SKF_AD_OFF + one of these reads packet metadata.
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_MAX: i32 = 64;
const SKF_AD_PROTOCOL: i32 = 0;
const SKF_AD_PKTTYPE: i32 = 4;
const SKF_AD_IFINDEX: i32 = 8;
const SKF_AD_MARK: i32 = 20;
const SKF_AD_QUEUE: i32 = 24;
const SKF_AD_RXHASH: i32 = 32;
const SKF_AD_CPU: i32 = 36;
const SKF_AD_VLAN_TAG: i32 = 44;
const SKF_AD_VLAN_TAG_PRESENT: i32 = 48;
const SKF_AD_RANDOM: i32 = 56;
const SKF_AD_VLAN_TPID: i32 = 60;

/// The __sk_buff fields the ancillary loads read (offsets from uapi linux/bpf.h).
mod skb {
    pub const LEN: i16 = 0;
    pub const PKT_TYPE: i16 = 4;
    pub const MARK: i16 = 8;
    pub const QUEUE_MAPPING: i16 = 12;
    pub const PROTOCOL: i16 = 16;
    pub const VLAN_PRESENT: i16 = 20;
    pub const VLAN_TCI: i16 = 24;
    pub const VLAN_PROTO: i16 = 28;
    pub const IFINDEX: i16 = 40;
    pub const HASH: i16 = 68;
    pub const DATA: i16 = 76;
    pub const DATA_END: i16 = 80;
}
/// xdp_md.data, .data_end and .ingress_ifindex.
const XDP_DATA: i16 = 0;
const XDP_DATA_END: i16 = 4;
const XDP_INGRESS_IFINDEX: i16 = 12;
/// Packet loads read in place end at most here: the verifier tracks the bounds of packet
/// pointers up to MAX_PACKET_OFF (0xffff) only, and this keeps well inside.
const IN_PLACE_END: u32 = 0x8000;
/// The most the hidden VLAN tag adds to an XDP load's offset.
const TAG_LEN: u32 = 4;

/// The name of ancillary load `n` (an offset from SKF_AD_OFF), for error messages.
fn ancillary_name(n: i32) -> String {
    const NAMES: [&str; 16] = [
        "PROTOCOL",
        "PKTTYPE",
        "IFINDEX",
        "NLATTR",
        "NLATTR_NEST",
        "MARK",
        "QUEUE",
        "HATYPE",
        "RXHASH",
        "CPU",
        "ALU_XOR_X",
        "VLAN_TAG",
        "VLAN_TAG_PRESENT",
        "PAY_OFFSET",
        "RANDOM",
        "VLAN_TPID",
    ];
    usize::try_from(n)
        .ok()
        .filter(|n| n % 4 == 0)
        .and_then(|n| NAMES.get(n / 4))
        .map_or_else(
            || format!("SKF_AD_OFF + {n}"),
            |name| format!("SKF_AD_{name}"),
        )
}

/// A jump destination, known once everything is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    /// The first eBPF instruction of a classic instruction.
    Classic(usize),
    Accept,
    Pass,
}

/// Where a packet load reads.
#[derive(Debug, Clone, Copy)]
enum Offset {
    Const(u32),
    /// X + k, in 32-bit arithmetic.
    XPlus(u32),
}

/// A jump waiting for its offset.
struct Fixup {
    at: usize,
    to: Label,
    /// The classic instruction that emitted it, for errors.
    classic: usize,
}

struct Emitter<'t, 'a> {
    target: &'t Target<'a>,
    /// The target's, looked at by most instructions.
    context: Context,
    insns: Vec<EbpfInsn>,
    fixups: Vec<Fixup>,
    /// The classic instruction being translated.
    classic: usize,
}

impl<'t, 'a> Emitter<'t, 'a> {
    fn new(target: &'t Target<'a>) -> Self {
        Self {
            target,
            context: target.hook.context(),
            insns: Vec::new(),
            fixups: Vec::new(),
            classic: 0,
        }
    }

    fn emit(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(EbpfInsn {
            code,
            regs: dst | src << 4,
            off,
            imm,
        });
    }

    fn alu32_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.emit(EBPF_ALU | op, dst, 0, 0, imm);
    }

    fn alu32_reg(&mut self, op: u8, dst: u8, src: u8) {
        self.emit(EBPF_ALU | op | EBPF_SRC_X, dst, src, 0, 0);
    }

    fn mov32_imm(&mut self, dst: u8, imm: i32) {
        self.alu32_imm(EBPF_MOV, dst, imm);
    }

    fn mov32_reg(&mut self, dst: u8, src: u8) {
        self.alu32_reg(EBPF_MOV, dst, src);
    }

    fn mov64_reg(&mut self, dst: u8, src: u8) {
        self.emit(EBPF_ALU64 | EBPF_MOV | EBPF_SRC_X, dst, src, 0, 0);
    }

    /// dst = the stack address FP + off.
    fn stack_addr(&mut self, dst: u8, off: i16) {
        self.mov64_reg(dst, FP);
        self.emit(EBPF_ALU64 | OP_ADD, dst, 0, 0, off.into());
    }

    /// A 32-bit load from `base + off`.
    fn ldx_w(&mut self, dst: u8, base: u8, off: i16) {
        self.emit(EBPF_LDX | EBPF_MEM, dst, base, off, 0);
    }

    /// A 32-bit store of `src` at `base + off`.
    fn stx_w(&mut self, base: u8, off: i16, src: u8) {
        self.emit(EBPF_STX | EBPF_MEM, base, src, off, 0);
    }

    fn call(&mut self, helper: i32) {
        self.emit(EBPF_JMP | EBPF_CALL, 0, 0, 0, helper);
    }

    fn exit(&mut self) {
        self.emit(EBPF_JMP | EBPF_EXIT, 0, 0, 0, 0);
    }

    fn ld_map_fd(&mut self, dst: u8, map: BorrowedFd) {
        self.emit(EBPF_LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd());
        self.emit(0, 0, 0, 0, 0);
    }

    fn fixup(&mut self, to: Label) {
        self.fixups.push(Fixup {
            at: self.insns.len() - 1,
            to,
            classic: self.classic,
        });
    }

    fn jumps_to(&self, to: Label) -> bool {
        self.fixups.iter().any(|f| f.to == to)
    }

    /// Drops the code emitted from `start` on.
    fn discard_from(&mut self, start: usize) {
        self.insns.truncate(start);
        self.fixups.retain(|f| f.at < start);
    }

    fn jump(&mut self, to: Label) {
        self.emit(EBPF_JMP | JA, 0, 0, 0, 0);
        self.fixup(to);
    }

    /// If `reg op imm` (unsigned, 32-bit) goto `to`.
    fn jump_if_imm(&mut self, op: u8, reg: u8, imm: i32, to: Label) {
        self.emit(EBPF_JMP32 | op, reg, 0, 0, imm);
        self.fixup(to);
    }

    /// If `dst op src` (unsigned, 32-bit) goto `to`.
    fn jump_if_reg(&mut self, op: u8, dst: u8, src: u8, to: Label) {
        self.emit(EBPF_JMP32 | op | EBPF_SRC_X, dst, src, 0, 0);
        self.fixup(to);
    }

    /// Leaves without accepting.
    fn ret_pass(&mut self) {
        self.jump(Label::Pass);
    }

    /// Keeps the context, zeroes A and X and, if the program reads it, M[] (the verifier
    /// rejects reads of stack it cannot prove written).
    fn prologue(&mut self, reads_memory: bool) {
        self.mov64_reg(CTX, R1);
        self.mov32_imm(A, 0);
        self.mov32_imm(X, 0);
        if self.context == Context::Xdp {
            // TAG = 4 if the EtherType says 802.1Q or 802.1ad; a frame too short for one
            // has no tag.
            self.mov32_imm(TAG, 0);
            let short = self.load_bytes_else(SIZE_H, Offset::Const(ETHERTYPE_OFF), R0, false);
            let q = self.forward_jump(EBPF_JMP | JEQ, R0, ETH_P_8021Q);
            let ad = self.forward_jump(EBPF_JMP | JEQ, R0, ETH_P_8021AD);
            let untagged = self.forward_jump(EBPF_JMP | JA, 0, 0);
            self.land(q);
            self.land(ad);
            self.mov32_imm(TAG, 4);
            self.land(short);
            self.land(untagged);
        }
        if reads_memory {
            for off in (MEM_OFF..0).step_by(8) {
                self.emit(EBPF_ST | EBPF_MEM | EBPF_SIZE_DW, FP, 0, off, 0);
            }
        }
    }

    /// A jump to be aimed later with [`Self::land`] (within one classic instruction).
    fn forward_jump(&mut self, code: u8, reg: u8, imm: i32) -> usize {
        self.emit(code, reg, 0, 0, imm);
        self.insns.len() - 1
    }

    /// As `forward_jump`, comparing with register `src`.
    fn forward_jump_reg(&mut self, code: u8, dst: u8, src: u8) -> usize {
        self.emit(code | EBPF_SRC_X, dst, src, 0, 0);
        self.insns.len() - 1
    }

    /// Aims the jump at `at` at the next instruction.
    fn land(&mut self, at: usize) {
        let distance = self.insns.len() - at - 1;
        self.insns[at].off = i16::try_from(distance).expect("a short local jump");
    }

    /// `dst` = the `size`-byte big-endian value at `offset` in the packet as the kernel's
    /// taps see it, or pass if the packet is too short.
    fn load_packet(&mut self, size: u16, offset: Offset, dst: u8) {
        let bytes = match size {
            SIZE_W => 4,
            SIZE_H => 2,
            _ => 1,
        };
        match offset {
            // In XDP a load that spans the EtherType's start reads bytes on both sides of
            // a hidden tag: one byte at a time, each placed where the kernel's taps see it.
            Offset::Const(k)
                if self.context == Context::Xdp
                    && k < ETHERTYPE_OFF
                    && k + bytes > ETHERTYPE_OFF =>
            {
                self.load_bytewise(bytes, |i| Offset::Const(k + i), dst);
            }
            // The same where X + k says at run time whether the load spans it.
            Offset::XPlus(k) if self.context == Context::Xdp && bytes > 1 => {
                self.offset_into_r2(offset);
                let after = self.forward_jump(EBPF_JMP32 | JGE, R2, ETHERTYPE_OFF as i32);
                let before =
                    self.forward_jump(EBPF_JMP32 | JLT, R2, (ETHERTYPE_OFF + 1 - bytes) as i32);
                self.load_bytewise(bytes, |i| Offset::XPlus(k.wrapping_add(i)), dst);
                let done = self.forward_jump(EBPF_JMP | JA, 0, 0);
                self.land(after);
                self.land(before);
                self.load_bytes(size, offset, dst, true);
                self.land(done);
            }
            _ => self.load_bytes(size, offset, dst, true),
        }
    }

    /// `dst` = the `bytes` bytes at `at(0)`, `at(1)`, ... as the kernel's taps see them,
    /// big-endian, loaded one at a time.
    fn load_bytewise(&mut self, bytes: u32, at: impl Fn(u32) -> Offset, dst: u8) {
        self.load_bytes(SIZE_B, at(0), dst, true);
        for i in 1..bytes {
            self.load_bytes(SIZE_B, at(i), R0, true);
            self.alu32_imm(OP_LSH, dst, 8);
            self.alu32_reg(OP_OR, dst, R0);
        }
    }

    /// As `load_packet`; `untagged` false reads an XDP frame's bytes as they are.
    fn load_bytes(&mut self, size: u16, offset: Offset, dst: u8, untagged: bool) {
        if self.target.hook == Hook::SocketFilter && self.target.pass == 0 {
            self.load_abs(size, offset, dst);
            return;
        }
        let failed = self.load_bytes_else(size, offset, dst, untagged);
        self.fixups.push(Fixup {
            at: failed,
            to: Label::Pass,
            classic: self.classic,
        });
    }

    /// As `load_bytes`, but a load past the packet's end takes the jump at the returned
    /// index, for the caller to aim.
    ///
    /// At TC and XDP the bytes at a constant offset are read in place when they lie in the
    /// linear part (the bounds check the verifier asks for decides); the helper reads the
    /// rest: non-linear skb data, XDP fragments, indirect and far offsets, and a packet
    /// too short, which it refuses.
    fn load_bytes_else(&mut self, size: u16, offset: Offset, dst: u8, untagged: bool) -> usize {
        let bytes = match size {
            SIZE_W => 4,
            SIZE_H => 2,
            _ => 1,
        };
        let ebpf_size = match size {
            SIZE_W => 0x00,
            SIZE_H => 0x08,
            _ => 0x10,
        };
        let tagged = untagged && self.context == Context::Xdp;
        let in_place = if self.target.hook == Hook::SocketFilter {
            None
        } else {
            self.load_in_place(ebpf_size, bytes, offset, dst, tagged)
        };
        let read = in_place.map(|short| {
            let read = self.forward_jump(EBPF_JMP | JA, 0, 0);
            self.land(short);
            read
        });
        self.mov64_reg(R1, CTX);
        self.offset_into_r2(offset);
        if tagged {
            let before_tag = self.forward_jump(EBPF_JMP32 | JLT, R2, ETHERTYPE_OFF as i32);
            self.alu32_reg(OP_ADD, R2, TAG);
            self.land(before_tag);
        }
        self.stack_addr(R3, BUF_OFF);
        self.mov32_imm(R4, bytes as i32);
        self.call(match self.context {
            Context::Skb => SKB_LOAD_BYTES,
            Context::Xdp => XDP_LOAD_BYTES,
        });
        let failed = self.forward_jump(EBPF_JMP | JNE, R0, 0);
        self.emit(EBPF_LDX | EBPF_MEM | ebpf_size, dst, FP, BUF_OFF, 0);
        if let Some(read) = read {
            self.land(read);
        }
        if bytes > 1 {
            self.emit(EBPF_ALU | EBPF_END_TO_BE, dst, 0, 0, bytes as i32 * 8);
        }
        failed
    }

    /// A socket filter's load: LD_ABS or LD_IND, what the kernel's own classic BPF becomes,
    /// a helper call that reads the linear part in place and returns the value (no stack
    /// buffer). A load past the end ends the program returning 0, which is why only a
    /// target that passes with 0 takes it.
    fn load_abs(&mut self, size: u16, offset: Offset, dst: u8) {
        let ebpf_size = size as u8;
        match offset {
            Offset::Const(k) => self.emit(MODE_ABS as u8 | ebpf_size, 0, 0, 0, k as i32),
            Offset::XPlus(_) => {
                self.offset_into_r2(offset);
                // The helper takes a signed offset and reads below 0 from the network or
                // link-layer header (SKF_NET_OFF, SKF_LL_OFF); bpf_skb_load_bytes refuses
                // offsets past 2 GiB, and so does this.
                self.jump_if_imm(JSLT, R2, 0, Label::Pass);
                self.emit(MODE_IND as u8 | ebpf_size, 0, R2, 0, 0);
            }
        }
        self.mov32_reg(dst, R0);
    }

    /// R2 = the load's offset, in 32 bits (X + k wraps around, as in the kernel).
    fn offset_into_r2(&mut self, offset: Offset) {
        match offset {
            Offset::Const(k) => self.mov32_imm(R2, k as i32),
            Offset::XPlus(k) => {
                self.mov32_reg(R2, X);
                self.alu32_imm(OP_ADD, R2, k as i32);
            }
        }
    }

    /// `dst` = the `bytes` bytes at constant offset `k` (plus TAG past the EtherType's
    /// start if `tagged`), read straight from the packet's linear part as they lie there
    /// (the caller swaps them); the returned jump is taken when they are not all there.
    /// `None`, nothing emitted: an indirect offset, or one too far. Adding a register to
    /// a packet pointer takes CAP_PERFMON (the verifier's Spectre rules), which the sensor
    /// does not keep, so indirect loads, whose offsets are known only at run time, take
    /// the helper.
    fn load_in_place(
        &mut self,
        ebpf_size: u8,
        bytes: u32,
        offset: Offset,
        dst: u8,
        tagged: bool,
    ) -> Option<usize> {
        let Offset::Const(k) = offset else {
            return None;
        };
        if k.checked_add(bytes + TAG_LEN)? > IN_PLACE_END {
            return None;
        }
        let (data, data_end) = match self.context {
            Context::Skb => (skb::DATA, skb::DATA_END),
            Context::Xdp => (XDP_DATA, XDP_DATA_END),
        };
        self.ldx_w(R2, CTX, data);
        self.ldx_w(R3, CTX, data_end);
        if tagged && k >= ETHERTYPE_OFF {
            // A constant added, for the same reason.
            let untagged = self.forward_jump(EBPF_JMP32 | JEQ, TAG, 0);
            self.emit(EBPF_ALU64 | OP_ADD, R2, 0, 0, TAG_LEN as i32);
            self.land(untagged);
        }
        // R1 = the end of the bytes: the verifier learns from `R1 <= data_end` that they
        // are in the packet.
        self.mov64_reg(R1, R2);
        self.emit(EBPF_ALU64 | OP_ADD, R1, 0, 0, (k + bytes) as i32);
        let short = self.forward_jump_reg(EBPF_JMP | JGT, R1, R3);
        self.emit(EBPF_LDX | EBPF_MEM | ebpf_size, dst, R1, -(bytes as i16), 0);
        Some(short)
    }

    /// `dst` = the packet's length.
    fn load_len(&mut self, dst: u8) {
        match self.context {
            Context::Skb => self.ldx_w(dst, CTX, skb::LEN),
            Context::Xdp => {
                self.mov64_reg(R1, CTX);
                self.call(XDP_GET_BUFF_LEN);
                self.mov32_reg(dst, R0);
                self.alu32_reg(OP_SUB, dst, TAG);
            }
        }
    }

    /// A = the Linux ancillary value `n` (an offset from SKF_AD_OFF).
    fn load_ancillary(&mut self, n: i32) -> Result<(), Refusal> {
        let field = |e: &mut Self, off| e.ldx_w(A, CTX, off);
        // __sk_buff holds protocol and vlan_proto in network order; classic BPF shows them
        // in host order.
        let field_be16 = |e: &mut Self, off| {
            e.ldx_w(A, CTX, off);
            e.emit(EBPF_ALU | EBPF_END_TO_BE, A, 0, 0, 16);
        };
        match (self.context, n) {
            (Context::Skb, SKF_AD_PROTOCOL) => field_be16(self, skb::PROTOCOL),
            (Context::Skb, SKF_AD_PKTTYPE) => field(self, skb::PKT_TYPE),
            (Context::Skb, SKF_AD_IFINDEX) => field(self, skb::IFINDEX),
            (Context::Skb, SKF_AD_MARK) => field(self, skb::MARK),
            (Context::Skb, SKF_AD_QUEUE) => field(self, skb::QUEUE_MAPPING),
            (Context::Skb, SKF_AD_RXHASH) => field(self, skb::HASH),
            (Context::Skb, SKF_AD_VLAN_TAG) => field(self, skb::VLAN_TCI),
            (Context::Skb, SKF_AD_VLAN_TAG_PRESENT) => field(self, skb::VLAN_PRESENT),
            (Context::Skb, SKF_AD_VLAN_TPID) => field_be16(self, skb::VLAN_PROTO),
            (_, SKF_AD_CPU) => {
                self.call(GET_SMP_PROCESSOR_ID);
                self.mov32_reg(A, R0);
            }
            (_, SKF_AD_RANDOM) => {
                self.call(GET_PRANDOM_U32);
                self.mov32_reg(A, R0);
            }
            (Context::Xdp, SKF_AD_IFINDEX) => field(self, XDP_INGRESS_IFINDEX),
            // In XDP the tag is still in the bytes (see the module comment).
            (Context::Xdp, SKF_AD_VLAN_TAG_PRESENT) => {
                self.mov32_reg(A, TAG);
                self.alu32_imm(OP_RSH, A, 2);
            }
            (Context::Xdp, SKF_AD_VLAN_TAG | SKF_AD_VLAN_TPID) => {
                let at = if n == SKF_AD_VLAN_TAG { 14 } else { 12 };
                self.mov32_imm(A, 0);
                let untagged = self.forward_jump(EBPF_JMP | JEQ, TAG, 0);
                self.load_bytes(SIZE_H, Offset::Const(at), A, false);
                self.land(untagged);
            }
            // As eth_type_trans and the VLAN untagging set skb->protocol: the EtherType,
            // or for an 802.3 length field, 802.3 raw (payload starting 0xffff) or 802.2.
            (Context::Xdp, SKF_AD_PROTOCOL) => {
                self.load_packet(SIZE_H, Offset::Const(ETHERTYPE_OFF), A);
                let ethernet_ii = self.forward_jump(EBPF_JMP32 | JGE, A, ETH_P_802_3_MIN);
                self.load_packet(SIZE_H, Offset::Const(ETHERTYPE_OFF + 2), A);
                let raw = self.forward_jump(EBPF_JMP32 | JEQ, A, 0xffff);
                self.mov32_imm(A, ETH_P_802_2);
                let done = self.forward_jump(EBPF_JMP | JA, 0, 0);
                self.land(raw);
                self.mov32_imm(A, ETH_P_802_3);
                self.land(done);
                self.land(ethernet_ii);
            }
            (Context::Xdp, SKF_AD_PKTTYPE | SKF_AD_MARK | SKF_AD_QUEUE | SKF_AD_RXHASH) => {
                return Err(Refusal::AncillaryNotInXdp { ancillary: n })
            }
            _ => return Err(Refusal::AncillaryUnsupported { ancillary: n }),
        }
        Ok(())
    }

    /// Translates one classic instruction of a `len`-instruction program.
    fn instruction(&mut self, insn: &CbpfInsn, len: usize) -> Result<(), Refusal> {
        let CbpfInsn { code, jt, jf, k } = *insn;
        let unknown = |kind| Refusal::UnknownOpcode { kind, code };
        if code > 0xff {
            return Err(unknown(OpcodeKind::Other));
        }
        let pc = self.classic;
        // Targets must stay inside the program; the last instruction is a return.
        let target = |skip: u32| {
            let to = (pc + 1).saturating_add(skip as usize);
            if to < len {
                Ok(Label::Classic(to))
            } else {
                Err(Refusal::JumpPastEnd { to })
            }
        };
        let mem_off = || {
            if k < MEMWORDS {
                Ok(MEM_OFF + 4 * k as i16)
            } else {
                Err(Refusal::ScratchIndex { index: k })
            }
        };
        let size = code & 0x18;
        let class = code & 0x07;
        match class {
            class::LD | class::LDX => {
                let dst = if class == class::LD { A } else { X };
                match (class, code & 0xe0, size) {
                    (_, MODE_IMM, SIZE_W) => self.mov32_imm(dst, k as i32),
                    (_, MODE_MEM, SIZE_W) => self.ldx_w(dst, FP, mem_off()?),
                    (_, MODE_LEN, SIZE_W) => self.load_len(dst),
                    (class::LD, MODE_ABS, SIZE_W | SIZE_H | SIZE_B) => {
                        if (k as i32) >= 0 {
                            self.load_packet(size, Offset::Const(k), A);
                        } else if (SKF_AD_OFF..SKF_AD_OFF + SKF_AD_MAX).contains(&(k as i32)) {
                            // Like the kernel, the size of an ancillary load is ignored.
                            self.load_ancillary(k as i32 - SKF_AD_OFF)?;
                        } else {
                            return Err(Refusal::NegativeOffset { offset: k as i32 });
                        }
                    }
                    (class::LD, MODE_IND, SIZE_W | SIZE_H | SIZE_B) => {
                        self.load_packet(size, Offset::XPlus(k), A);
                    }
                    (class::LDX, MODE_MSH, SIZE_B) => {
                        // X = 4 * (P[k] & 0xf): an IPv4 header length.
                        self.load_packet(SIZE_B, Offset::Const(k), X);
                        self.alu32_imm(OP_AND, X, 0xf);
                        self.alu32_imm(OP_LSH, X, 2);
                    }
                    _ => return Err(unknown(OpcodeKind::Load)),
                }
            }
            class::ST | class::STX if code & !0x07 == 0 => {
                let src = if class == class::ST { A } else { X };
                self.stx_w(FP, mem_off()?, src);
            }
            class::ALU => self.alu(code, k)?,
            class::JMP => {
                let op = (code & 0xf0) as u8;
                if op == JA && code & SRC_X == 0 {
                    if k != 0 {
                        self.jump(target(k)?);
                    }
                    return Ok(());
                }
                if !matches!(op, JEQ | JGT | JGE | JSET) {
                    return Err(unknown(OpcodeKind::Jump));
                }
                let (on_true, on_false) = (target(jt.into())?, target(jf.into())?);
                if jt == jf {
                    if jt != 0 {
                        self.jump(on_true);
                    }
                    return Ok(());
                }
                if code & SRC_X != 0 {
                    self.jump_if_reg(op, A, X, on_true);
                } else {
                    self.jump_if_imm(op, A, k as i32, on_true);
                }
                if jf != 0 {
                    self.jump(on_false);
                }
            }
            class::RET => match code & !0x07 {
                0 if k == 0 => self.ret_pass(),
                0 => {
                    self.mov32_imm(A, k as i32);
                    self.jump(Label::Accept);
                }
                RET_A => {
                    self.jump_if_imm(JEQ, A, 0, Label::Pass);
                    self.jump(Label::Accept);
                }
                _ => return Err(unknown(OpcodeKind::Return)),
            },
            class::MISC => match code & !0x07 {
                0 => self.mov32_reg(X, A),
                MISC_TXA => self.mov32_reg(A, X),
                _ => return Err(unknown(OpcodeKind::Other)),
            },
            _ => return Err(unknown(OpcodeKind::Other)),
        }
        Ok(())
    }

    /// An ALU instruction: A = A op (k or X), in 32 bits.
    fn alu(&mut self, code: u16, k: u32) -> Result<(), Refusal> {
        let op = (code & 0xf0) as u8;
        let by_x = code & SRC_X != 0;
        match op {
            OP_NEG if !by_x => self.alu32_imm(OP_NEG, A, 0),
            OP_DIV | OP_MOD if !by_x && k == 0 => {
                return Err(Refusal::DivisionByZero);
            }
            OP_LSH | OP_RSH if !by_x && k >= 32 => {
                return Err(Refusal::ShiftTooFar { shift: k });
            }
            OP_DIV | OP_MOD if by_x => {
                self.jump_if_imm(JEQ, X, 0, Label::Pass);
                self.alu32_reg(op, A, X);
            }
            // libpcap's interpreter gives 0 for a shift by 32 or more; eBPF would mask it.
            OP_LSH | OP_RSH if by_x => {
                let too_far = self.forward_jump(EBPF_JMP32 | JGE, X, 32);
                self.alu32_reg(op, A, X);
                let done = self.forward_jump(EBPF_JMP | JA, 0, 0);
                self.land(too_far);
                self.mov32_imm(A, 0);
                self.land(done);
            }
            OP_ADD | OP_SUB | OP_MUL | OP_DIV | OP_OR | OP_AND | OP_LSH | OP_RSH | OP_MOD
            | OP_XOR => {
                if by_x {
                    self.alu32_reg(op, A, X);
                } else {
                    self.alu32_imm(op, A, k as i32);
                }
            }
            _ => {
                return Err(Refusal::UnknownOpcode {
                    kind: OpcodeKind::Alu,
                    code,
                })
            }
        }
        Ok(())
    }

    /// Where an accepting return goes, with the result in A.
    fn accept_block(&mut self) {
        match self.target.on_accept {
            OnAccept::Return => {
                self.mov32_reg(R0, A);
                self.exit();
            }
            OnAccept::TailCall {
                prog_array,
                index,
                scratch,
            } => {
                // scratch[0] = A, for the next program.
                self.emit(EBPF_ST | EBPF_MEM, FP, 0, KEY_OFF, 0);
                self.ld_map_fd(R1, scratch);
                self.stack_addr(R2, KEY_OFF);
                self.call(MAP_LOOKUP_ELEM);
                self.emit(EBPF_JMP | JEQ, R0, 0, 0, 0);
                self.fixup(Label::Pass);
                self.stx_w(R0, 0, A);
                self.mov64_reg(R1, CTX);
                self.ld_map_fd(R2, prog_array);
                self.mov32_imm(R3, index as i32);
                self.call(TAIL_CALL);
                // A tail call that returns has failed: fall through to pass.
            }
        }
    }

    fn pass_block(&mut self) {
        // 64-bit move: sign-extends a negative `pass` (TC_ACT_UNSPEC) as an int return.
        self.emit(EBPF_ALU64 | EBPF_MOV, R0, 0, 0, self.target.pass);
        self.exit();
    }

    /// Fills in every jump offset.
    fn resolve(
        mut self,
        starts: &[usize],
        accept: usize,
        pass: usize,
    ) -> Result<Vec<EbpfInsn>, TranslateError> {
        for fixup in &self.fixups {
            let to = match fixup.to {
                Label::Classic(pc) => starts[pc],
                Label::Accept => accept,
                Label::Pass => pass,
            };
            let distance = to as i64 - fixup.at as i64 - 1;
            self.insns[fixup.at].off = i16::try_from(distance).map_err(|_| TranslateError {
                index: fixup.classic,
                refusal: Refusal::JumpTooLong { distance },
            })?;
        }
        Ok(self.insns)
    }
}
