//! The translator checked against libpcap: its interpreter on hand-written programs, its
//! compiler and matcher on real traffic, all run in the kernel with BPF_PROG_TEST_RUN.
//! Needs root (CAP_BPF, CAP_NET_ADMIN) and fails without it.

use std::os::fd::{AsFd, OwnedFd};

use super::*;
use crate::sys;

extern "C" {
    /// libpcap's classic BPF interpreter (linked through the pcap crate).
    fn bpf_filter(pc: *const CbpfInsn, p: *const u8, wirelen: u32, buflen: u32) -> u32;
}

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus");
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

// Classic opcodes, spelled out.
const LD_IMM: u16 = 0x00;
const LD_W_ABS: u16 = 0x20;
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const LD_W_IND: u16 = 0x40;
const LD_H_IND: u16 = 0x48;
const LD_B_IND: u16 = 0x50;
const LD_W_MEM: u16 = 0x60;
const LD_W_LEN: u16 = 0x80;
const LDX_IMM: u16 = 0x01;
const LDX_W_MEM: u16 = 0x61;
const LDX_W_LEN: u16 = 0x81;
const LDX_B_MSH: u16 = 0xb1;
const ST: u16 = 0x02;
const STX: u16 = 0x03;
const ALU_K: u16 = 0x04;
const ALU_X: u16 = 0x0c;
const JMP_JA: u16 = 0x05;
const JMP_K: u16 = 0x05;
const JMP_X: u16 = 0x0d;
const RET_K: u16 = 0x06;
const RET_A: u16 = 0x16;
const TAX: u16 = 0x07;
const TXA: u16 = 0x87;
const ALU_OPS: [u8; 10] = [
    OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_OR, OP_AND, OP_LSH, OP_RSH, OP_MOD, OP_XOR,
];
const JUMP_OPS: [u8; 4] = [JEQ, JGT, JGE, JSET];

fn s(code: u16, k: u32) -> CbpfInsn {
    CbpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn j(code: u16, k: u32, jt: u8, jf: u8) -> CbpfInsn {
    CbpfInsn { code, jt, jf, k }
}

fn ebpf(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> EbpfInsn {
    EbpfInsn {
        code,
        regs: dst | src << 4,
        off,
        imm,
    }
}

/// What libpcap's interpreter returns for `prog` on `packet`.
fn oracle(prog: &[CbpfInsn], packet: &[u8]) -> u32 {
    // Validated: the interpreter trusts its program.
    translate(prog, &return_target(Context::Skb)).unwrap_or_else(|e| panic!("{e}"));
    let len = u32::try_from(packet.len()).unwrap();
    // SAFETY: CbpfInsn has struct bpf_insn's layout; `prog` translated, so every jump
    // stays inside it and it ends with a return; `packet` is `len` bytes.
    unsafe { bpf_filter(prog.as_ptr(), packet.as_ptr(), len, len) }
}

fn return_target(context: Context) -> Target<'static> {
    Target {
        hook: test_hook(context),
        pass: 0,
        on_accept: OnAccept::Return,
    }
}

/// The hook the tests load a program of `context` for.
fn test_hook(context: Context) -> Hook {
    match context {
        // SCHED_CLS test runs start at the Ethernet header, like XDP and unlike socket filters.
        Context::Skb => Hook::Tc,
        Context::Xdp => Hook::Xdp { frags: true },
    }
}

fn load(insns: &[EbpfInsn], hook: Hook) -> OwnedFd {
    sys::load_program(hook, insns, "cbpf_test").unwrap_or_else(|e| panic!("{hook:?}: {e:#}"))
}

/// Translates `prog` to return its own result in `context` and loads it.
fn load_classic(prog: &[CbpfInsn], context: Context) -> OwnedFd {
    let insns =
        translate(prog, &return_target(context)).unwrap_or_else(|e| panic!("{e} in {prog:?}"));
    load(&insns, test_hook(context))
}

fn run(prog: &OwnedFd, packet: &[u8]) -> u32 {
    sys::test_run(prog.as_fd(), packet, 1)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", packet.len()))
        .retval
}

/// An Ethernet frame of `len` bytes to ff:ff:ff:ff:ff:ff, then bytes that vary with the
/// seed (high bits set in some). IPv4 if there is room for its header (a test run refuses
/// a shorter IPv4 frame), else ARP.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ 0x5a)
        .collect();
    let ethertype: u16 = if len >= 34 { 0x0800 } else { 0x0806 };
    f[..12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    if len > 14 {
        f[14] = 0x45 + (seed & 0x3); // version 4, header length 5 to 8 words
    }
    f
}

fn packets() -> Vec<Vec<u8>> {
    vec![
        frame(14, 0),
        frame(15, 1),
        frame(60, 2),
        frame(98, 3),
        frame(1514, 4),
    ]
}

/// Hand-written programs covering every classic instruction and its edge cases.
fn oracle_programs() -> Vec<Vec<CbpfInsn>> {
    let mut progs = vec![
        // Loads of every size, in and out of bounds.
        vec![s(LD_H_ABS, 12), s(RET_A, 0)],
        vec![s(LD_W_ABS, 14), s(RET_A, 0)],
        vec![s(LD_B_ABS, 0), s(RET_A, 0)],
        vec![s(LD_W_ABS, 11), s(RET_A, 0)],
        vec![s(LD_W_ABS, 56), s(RET_A, 0)],
        vec![s(LD_B_ABS, 59), s(RET_A, 0)],
        vec![s(LD_H_ABS, 1513), s(RET_K, 7)],
        vec![s(LD_W_ABS, 0x7fff_ffff), s(RET_K, 7)],
        vec![s(LD_W_LEN, 0), s(RET_A, 0)],
        vec![s(LDX_W_LEN, 0), s(TXA, 0), s(RET_A, 0)],
        vec![s(LD_IMM, 0xdead_beef), s(RET_A, 0)],
        vec![s(LDX_IMM, 0x8000_0001), s(TXA, 0), s(RET_A, 0)],
        // Indirect loads, including past the end (X + k wrapping around: see below).
        vec![s(LDX_IMM, 14), s(LD_H_IND, 2), s(RET_A, 0)],
        vec![s(LDX_IMM, 10), s(LD_W_IND, 4), s(RET_A, 0)],
        vec![s(LDX_W_LEN, 0), s(LD_B_IND, 0), s(RET_K, 9)],
        // MSH: an IPv4 header length, then a load past it; and out of bounds.
        vec![s(LDX_B_MSH, 14), s(LD_H_IND, 14), s(RET_A, 0)],
        vec![s(LDX_B_MSH, 14), s(TXA, 0), s(RET_A, 0)],
        vec![s(LDX_B_MSH, 60), s(TXA, 0), s(RET_K, 3)],
        // Scratch memory.
        vec![
            s(LD_W_ABS, 26),
            s(ST, 3),
            s(LD_IMM, 0),
            s(LDX_W_MEM, 3),
            s(TXA, 0),
            s(RET_A, 0),
        ],
        vec![
            s(LDX_IMM, 77),
            s(STX, 15),
            s(LDX_IMM, 1),
            s(ST, 0),
            s(LD_W_MEM, 15),
            s(ALU_X | u16::from(OP_ADD), 0),
            s(LDX_W_MEM, 0),
            s(ALU_X | u16::from(OP_ADD), 0),
            s(RET_A, 0),
        ],
        // Division and modulo by a zero X reject; by a non-zero X they do not.
        vec![
            s(LDX_IMM, 0),
            s(LD_IMM, 5),
            s(ALU_X | u16::from(OP_DIV), 0),
            s(RET_K, 1),
        ],
        vec![
            s(LDX_IMM, 0),
            s(LD_IMM, 5),
            s(ALU_X | u16::from(OP_MOD), 0),
            s(RET_K, 1),
        ],
        vec![
            s(LDX_IMM, 7),
            s(LD_IMM, 50),
            s(ALU_X | u16::from(OP_DIV), 0),
            s(RET_A, 0),
        ],
        vec![
            s(LD_W_ABS, 26),
            s(ALU_K | u16::from(OP_NEG), 0),
            s(RET_A, 0),
        ],
        vec![s(LD_IMM, 0), s(ALU_K | u16::from(OP_NEG), 0), s(RET_A, 0)],
        // Jumps: JA over instructions, a JA of 0, and RET of the two constants.
        vec![s(LD_IMM, 1), s(JMP_JA, 1), s(LD_IMM, 2), s(RET_A, 0)],
        vec![s(LD_IMM, 1), s(JMP_JA, 0), s(RET_A, 0)],
        vec![s(RET_K, 0xffff_ffff)],
        vec![s(RET_K, 0)],
        vec![s(LD_IMM, 0), s(RET_A, 0)],
        vec![
            s(LD_B_ABS, 23),
            j(JMP_K | u16::from(JEQ), 0x5a, 3, 0),
            j(JMP_K | u16::from(JSET), 0x80, 1, 1),
            s(RET_K, 11),
            s(RET_K, 12),
            s(RET_K, 13),
        ],
    ];
    // Every ALU operation on a packet word, with constants and with X.
    let constants = [1, 3, 31, 0x8000_0000, 0xffff_ffff];
    for op in ALU_OPS {
        for k in constants {
            let shift = op == OP_LSH || op == OP_RSH;
            if !(shift && k >= 32) {
                progs.push(vec![
                    s(LD_W_ABS, 26),
                    s(ALU_K | u16::from(op), k),
                    s(RET_A, 0),
                ]);
            }
        }
        for x in [1, 3, 31, 32, 33, 1000, 0x8000_0000, 0xffff_ffff] {
            progs.push(vec![
                s(LDX_IMM, x),
                s(LD_W_ABS, 26),
                s(ALU_X | u16::from(op), 0),
                s(RET_A, 0),
            ]);
        }
        // X from the packet, sometimes zero.
        progs.push(vec![
            s(LD_B_ABS, 30),
            s(TAX, 0),
            s(LD_W_ABS, 26),
            s(ALU_X | u16::from(op), 0),
            s(RET_A, 0),
        ]);
    }
    // Every conditional jump, with K and X, true and false, either branch falling through.
    for op in JUMP_OPS {
        for k in [0, 0x5a, 0x8000_0000, 0xffff_ffff] {
            for (jt, jf) in [(0, 1), (1, 0), (0, 0)] {
                for code in [JMP_K, JMP_X] {
                    progs.push(vec![
                        s(LD_W_ABS, 22),
                        s(LDX_IMM, k),
                        j(code | u16::from(op), k, jt, jf),
                        s(RET_K, 10),
                        s(RET_K, 20),
                    ]);
                }
            }
        }
    }
    progs
}

#[test]
fn matches_libpcap_interpreter() {
    let packets = packets();
    let mut compared = 0;
    for prog in oracle_programs() {
        for context in [Context::Skb, Context::Xdp] {
            let fd = load_classic(&prog, context);
            for packet in &packets {
                let expected = oracle(&prog, packet);
                let got = run(&fd, packet);
                assert_eq!(
                    got,
                    expected,
                    "{context:?} on a {}-byte packet: {prog:?}",
                    packet.len()
                );
                compared += 1;
            }
        }
    }
    eprintln!("{compared} runs matched libpcap's interpreter");
}

/// An indirect load's offset is X + k in 32 bits, as in the kernel, where it wraps around;
/// libpcap's interpreter rejects the packet instead.
#[test]
fn indirect_offset_wraps_around() {
    let packet = frame(60, 2);
    let byte = |at: usize| u32::from(packet[at]);
    for (prog, expected) in [
        (
            vec![s(LDX_IMM, 0xffff_fff0), s(LD_B_IND, 0x20), s(RET_A, 0)],
            byte(0x10),
        ),
        (
            vec![s(LDX_W_LEN, 0), s(LD_H_IND, 0xffff_fffe), s(RET_A, 0)],
            byte(58) << 8 | byte(59),
        ),
    ] {
        assert_eq!(oracle(&prog, &packet), 0);
        for context in [Context::Skb, Context::Xdp] {
            let fd = load_classic(&prog, context);
            assert_eq!(run(&fd, &packet), expected, "{context:?} {prog:?}");
        }
    }
}

/// XDP hands frames longer than a page over in fragments: loads there go through them.
#[test]
fn xdp_loads_from_fragments() {
    let packet = frame(9014, 7);
    for prog in [
        vec![s(LD_W_ABS, 9010), s(RET_A, 0)],
        vec![s(LD_W_ABS, 9011), s(RET_K, 1)],
        vec![s(LDX_IMM, 4000), s(LD_H_IND, 95), s(RET_A, 0)],
        vec![s(LD_W_LEN, 0), s(RET_A, 0)],
    ] {
        let fd = load_classic(&prog, Context::Xdp);
        assert_eq!(run(&fd, &packet), oracle(&prog, &packet), "{prog:?}");
    }
}

/// Every frame of the corpus through every filter of filters-dev.txt, compiled by libpcap,
/// in both contexts: the kernel's verdict must be libpcap's.
#[test]
fn corpus_matches_libpcap() {
    let frames = corpus_frames();
    let filters = std::fs::read_to_string(format!("{CORPUS}/filters-dev.txt")).unwrap();
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();

    let mut compared = 0usize;
    let mut too_short = std::collections::BTreeSet::new();
    let mut truncated = std::collections::BTreeSet::new();
    let mut mismatches = Vec::new();
    let mut biggest = Vec::new();
    let mut run_ns = 0u64;
    for expr in filters.lines() {
        let program = dead.compile(expr, true).unwrap();
        let classic = CbpfInsn::from_pcap(&program);
        assert_eq!(classic.len(), program.get_instructions().len());
        for context in [Context::Skb, Context::Xdp] {
            let insns = translate(&classic, &return_target(context))
                .unwrap_or_else(|e| panic!("\"{expr}\": {e}"));
            biggest.push((
                insns.len(),
                classic.len(),
                format!("{context:?} \"{expr}\""),
            ));
            let fd = load(&insns, test_hook(context));
            let limit = match context {
                Context::Skb => skb_test_limit(&fd),
                Context::Xdp => usize::MAX,
            };
            for (index, frame) in frames.iter().enumerate() {
                if frame.len() < min_test_len(context, frame) {
                    too_short.insert(index);
                    continue;
                }
                // Longer frames do not fit the linear skb a test run builds: both sides
                // then judge the same prefix (its length becoming the packet's length).
                let data = &frame[..frame.len().min(limit)];
                if data.len() < frame.len() {
                    truncated.insert(index);
                }
                let expected = match context {
                    Context::Skb => program.filter(data),
                    Context::Xdp => program.filter(&as_tapped(data)),
                };
                let result = sys::test_run(fd.as_fd(), data, 1).unwrap();
                run_ns += u64::from(result.duration_ns);
                compared += 1;
                let accepted = result.retval != 0;
                if accepted != expected {
                    mismatches.push(format!(
                        "\"{expr}\" {context:?} frame {index} ({} bytes): kernel {accepted}, \
                         libpcap {expected}",
                        data.len()
                    ));
                }
            }
        }
    }
    biggest.sort_by(|a, b| b.cmp(a));
    eprintln!(
        "{} filters x {} frames x 2 contexts: {compared} verdicts compared, {} mismatches, \
         {} ns per run on average; skipped for skb: {} frames too short for a test run \
         {too_short:?}; {} frames truncated to fit an skb test run; biggest filters \
         (eBPF, classic instructions): {:?}",
        filters.lines().count(),
        frames.len(),
        mismatches.len(),
        run_ns / compared as u64,
        too_short.len(),
        truncated.len(),
        &biggest[..4],
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(too_short.len() <= 5, "{} frames skipped", too_short.len());
}

/// Every frame of the shared corpus.
fn corpus_frames() -> Vec<Vec<u8>> {
    let mut capture = pcap::Capture::from_file(format!("{CORPUS}/tcpdump-tests.pcap"))
        .expect("the corpus at ../shared/corpus (see its README)");
    let mut frames = Vec::new();
    while let Ok(packet) = capture.next_packet() {
        frames.push(packet.data.to_vec());
    }
    assert!(
        frames.len() > 7000,
        "only {} frames in the corpus",
        frames.len()
    );
    frames
}

/// A socket filter reads with LD_ABS and LD_IND: on the hand-written programs, on indirect
/// offsets that wrap around 32 bits or reach past 2 GiB, and on the corpus through every
/// dev filter, it gets libpcap's answer (the kernel's where an offset wraps around).
#[test]
fn socket_filter_matches_libpcap() {
    let socket = Target {
        hook: Hook::SocketFilter,
        ..return_target(Context::Skb)
    };
    let load_socket = |prog: &[CbpfInsn]| {
        let insns = translate(prog, &socket).unwrap_or_else(|e| panic!("{e} in {prog:?}"));
        load(&insns, Hook::SocketFilter)
    };
    // A socket filter's test run starts the packet after the Ethernet header it is given:
    // each packet goes in behind a copy of its own first 14 bytes.
    let run_socket = |fd: &OwnedFd, packet: &[u8]| {
        sys::test_run(fd.as_fd(), &[&packet[..14], packet].concat(), 1).map(|r| r.retval)
    };
    let packets = packets();
    let mut progs = oracle_programs();
    // Past 2 GiB: LD_IND's helper would read before the packet (SKF_LL_OFF).
    progs.push(vec![
        s(LDX_IMM, 0xffe0_0000),
        s(LD_B_IND, 0x10),
        s(RET_K, 9),
    ]);
    let mut compared = 0;
    for prog in &progs {
        let fd = load_socket(prog);
        for packet in &packets {
            let got = run_socket(&fd, packet).unwrap();
            assert_eq!(
                got,
                oracle(prog, packet),
                "{prog:?} on {} bytes",
                packet.len()
            );
            compared += 1;
        }
    }
    let packet = frame(60, 2);
    let wraps = [s(LDX_IMM, 0xffff_fff0), s(LD_B_IND, 0x20), s(RET_A, 0)];
    let got = run_socket(&load_socket(&wraps), &packet).unwrap();
    assert_eq!(got, u32::from(packet[0x10]), "{wraps:?}");

    let frames = corpus_frames();
    let filters = std::fs::read_to_string(format!("{CORPUS}/filters-dev.txt")).unwrap();
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();
    let mut refused = 0;
    for expr in filters.lines() {
        let program = dead.compile(expr, true).unwrap();
        let fd = load_socket(&CbpfInsn::from_pcap(&program));
        let limit = skb_test_limit(&fd) - 14;
        for frame in &frames {
            let data = &frame[..frame.len().min(limit)];
            match run_socket(&fd, data) {
                Ok(retval) => assert_eq!(
                    retval != 0,
                    program.filter(data),
                    "\"{expr}\" on {} bytes",
                    data.len()
                ),
                Err(_) => refused += 1,
            }
            compared += 1;
        }
    }
    eprintln!("{compared} socket filter runs matched libpcap; {refused} refused by the test run");
    assert!(refused <= 5 * filters.lines().count(), "{refused} refused");
}

/// A frame as the kernel's taps see it: without the outer 802.1Q or 802.1ad tag, which
/// the kernel moves into metadata (and which the XDP translation hides likewise).
fn as_tapped(frame: &[u8]) -> Vec<u8> {
    match frame.get(12..14) {
        Some([0x81, 0x00] | [0x88, 0xa8]) if frame.len() >= 18 => {
            [&frame[..12], &frame[16..]].concat()
        }
        _ => frame.to_vec(),
    }
}

/// The shortest frame BPF_PROG_TEST_RUN takes: an Ethernet header and, for an skb, the
/// whole IPv4 or IPv6 header that its Ethernet type announces.
fn min_test_len(context: Context, frame: &[u8]) -> usize {
    match (context, frame.get(12..14)) {
        (Context::Skb, Some([0x08, 0x00])) => 14 + 20,
        (Context::Skb, Some([0x86, 0xdd])) => 14 + 40,
        _ => 14,
    }
}

/// The longest data a SCHED_CLS test run takes (a page minus the skb's head and tail
/// room), found by asking the kernel.
fn skb_test_limit(prog: &OwnedFd) -> usize {
    let fits = |len: usize| sys::test_run(prog.as_fd(), &vec![0; len], 1).is_ok();
    let (mut good, mut bad) = (14, 65536);
    assert!(fits(good), "a test run of {good} bytes fails");
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

/// The filter stores its result in the scratch map and tail-calls the next program, which
/// here returns that result + 1000; without a next program, or on reject, it returns pass.
#[test]
fn tail_call_on_accept() {
    let is_ipv4 = [
        s(LD_H_ABS, 12),
        j(JMP_K | u16::from(JEQ), 0x0800, 0, 1),
        s(RET_K, 0x1234),
        s(RET_K, 0),
    ];
    let ipv4 = frame(60, 0);
    let mut arp = ipv4.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for (context, pass) in [(Context::Skb, -1), (Context::Xdp, 2)] {
        let programs = sys::map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 4, "cbpf_progs").unwrap();
        let scratch = sys::map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, "cbpf_scratch").unwrap();
        let target = Target {
            hook: test_hook(context),
            pass,
            on_accept: OnAccept::TailCall {
                prog_array: programs.as_fd(),
                index: 2,
                scratch: scratch.as_fd(),
            },
        };
        let filter = load(&translate(&is_ipv4, &target).unwrap(), test_hook(context));
        let emit = load(&emit_program(&scratch), test_hook(context));
        let pass = pass as u32;
        assert_eq!(
            run(&filter, &ipv4),
            pass,
            "{context:?}: no program to call yet"
        );
        sys::prog_array_set(programs.as_fd(), 2, emit.as_fd()).unwrap();
        assert_eq!(run(&filter, &ipv4), 0x1234 + 1000, "{context:?}: accepted");
        assert_eq!(run(&filter, &arp), pass, "{context:?}: rejected");
    }
}

/// Returns scratch[0] + 1000 (or 7 if the lookup fails).
fn emit_program(scratch: &OwnedFd) -> Vec<EbpfInsn> {
    use std::os::fd::AsRawFd;
    vec![
        ebpf(EBPF_ST | EBPF_MEM, FP, 0, -4, 0),
        ebpf(EBPF_LD_IMM64, R1, PSEUDO_MAP_FD, 0, scratch.as_raw_fd()),
        ebpf(0, 0, 0, 0, 0),
        ebpf(EBPF_ALU64 | EBPF_MOV | EBPF_SRC_X, R2, FP, 0, 0),
        ebpf(EBPF_ALU64 | OP_ADD, R2, 0, 0, -4),
        ebpf(EBPF_JMP | EBPF_CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        ebpf(EBPF_JMP | JEQ, R0, 0, 3, 0),
        ebpf(EBPF_LDX | EBPF_MEM, R0, R0, 0, 0),
        ebpf(EBPF_ALU | OP_ADD, R0, 0, 0, 1000),
        ebpf(EBPF_JMP | EBPF_EXIT, 0, 0, 0, 0),
        ebpf(EBPF_ALU64 | EBPF_MOV, R0, 0, 0, 7),
        ebpf(EBPF_JMP | EBPF_EXIT, 0, 0, 0, 0),
    ]
}

/// `ld <ancillary n>; add #0x100000; ret a`: the value, made non-zero.
fn ancillary_program(n: i32) -> Vec<CbpfInsn> {
    vec![
        s(LD_W_ABS, (SKF_AD_OFF + n) as u32),
        s(ALU_K | u16::from(OP_ADD), 0x10_0000),
        s(RET_A, 0),
    ]
}

fn ancillary_value(context: Context, n: i32, packet: &[u8]) -> u32 {
    run(&load_classic(&ancillary_program(n), context), packet) - 0x10_0000
}

/// A test run's skb comes from the loopback device (ifindex 1), with its protocol and
/// packet type set from the Ethernet header and no VLAN tag in the metadata.
#[test]
fn ancillary_loads_read_skb_metadata() {
    let ipv4 = frame(60, 0);
    let skb = |n| ancillary_value(Context::Skb, n, &ipv4);
    assert_eq!(skb(SKF_AD_PROTOCOL), 0x0800);
    // Loopback's broadcast address is all zeros: ff:ff:ff:ff:ff:ff is just multicast.
    assert_eq!(skb(SKF_AD_PKTTYPE), 2, "PACKET_MULTICAST");
    assert_eq!(skb(SKF_AD_IFINDEX), 1);
    assert_eq!(skb(SKF_AD_VLAN_TAG_PRESENT), 0);
    assert_eq!(skb(SKF_AD_VLAN_TAG), 0);
    assert_eq!(skb(SKF_AD_VLAN_TPID), 0);
    assert_eq!(skb(SKF_AD_MARK), 0);
    assert_eq!(skb(SKF_AD_QUEUE), 0);
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!((skb(SKF_AD_CPU) as usize) < cpus.max(1024));
    let mut arp = ipv4.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[0] = 0x02; // unicast to another host
    assert_eq!(ancillary_value(Context::Skb, SKF_AD_PROTOCOL, &arp), 0x0806);
    assert_eq!(
        ancillary_value(Context::Skb, SKF_AD_PKTTYPE, &arp),
        3,
        "PACKET_OTHERHOST"
    );

    // RANDOM: not the same eight times in a row.
    let random = load_classic(
        &[
            s(LD_W_ABS, (SKF_AD_OFF + SKF_AD_RANDOM) as u32),
            s(RET_A, 0),
        ],
        Context::Skb,
    );
    let values: std::collections::HashSet<u32> = (0..8).map(|_| run(&random, &ipv4)).collect();
    assert!(values.len() > 1);

    let xdp = |n| ancillary_value(Context::Xdp, n, &ipv4);
    assert_eq!(xdp(SKF_AD_IFINDEX), 1);
    assert_eq!(xdp(SKF_AD_VLAN_TAG_PRESENT), 0);
    assert!((xdp(SKF_AD_CPU) as usize) < cpus.max(1024));
}

/// Every metadata field read by an ancillary load is readable by a socket filter too, and
/// the tail-call ending loads in every program kind.
#[test]
fn loads_as_every_program_kind() {
    let anc = |n: i32| s(LD_W_ABS, (SKF_AD_OFF + n) as u32);
    let all_skb = [
        anc(SKF_AD_PROTOCOL),
        anc(SKF_AD_PKTTYPE),
        anc(SKF_AD_IFINDEX),
        anc(SKF_AD_MARK),
        anc(SKF_AD_QUEUE),
        anc(SKF_AD_RXHASH),
        anc(SKF_AD_CPU),
        anc(SKF_AD_VLAN_TAG),
        anc(SKF_AD_VLAN_TAG_PRESENT),
        anc(SKF_AD_RANDOM),
        anc(SKF_AD_VLAN_TPID),
        s(LD_W_LEN, 0),
        s(LDX_B_MSH, 14),
        s(LD_H_IND, 14),
        s(ST, 0),
        s(LD_W_MEM, 0),
        s(RET_A, 0),
    ];
    let scratch = sys::map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, "cbpf_scratch").unwrap();
    for (hook, pass) in [(Hook::SocketFilter, 0), (Hook::Tc, -1)] {
        // A program array takes programs of one kind only: a fresh one for each.
        let programs = sys::map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "cbpf_progs").unwrap();
        let tail_call = OnAccept::TailCall {
            prog_array: programs.as_fd(),
            index: 0,
            scratch: scratch.as_fd(),
        };
        for on_accept in [OnAccept::Return, tail_call] {
            let target = Target {
                hook,
                pass,
                on_accept,
            };
            load(&translate(&all_skb, &target).unwrap(), hook);
        }
    }
    let all_xdp = [
        anc(SKF_AD_IFINDEX),
        anc(SKF_AD_VLAN_TAG_PRESENT),
        anc(SKF_AD_CPU),
        anc(SKF_AD_RANDOM),
        s(LD_W_LEN, 0),
        s(RET_A, 0),
    ];
    for frags in [false, true] {
        let programs = sys::map_create(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "cbpf_progs").unwrap();
        let target = Target {
            hook: Hook::Xdp { frags },
            pass: 2,
            on_accept: OnAccept::TailCall {
                prog_array: programs.as_fd(),
                index: 0,
                scratch: scratch.as_fd(),
            },
        };
        load(&translate(&all_xdp, &target).unwrap(), Hook::Xdp { frags });
    }
}

/// What libpcap compiles for a live Linux capture uses ancillary loads (VLAN tag in the
/// metadata, packet type for the direction): they translate for skbs, and XDP says why not.
/// A test run's frame is neither tagged nor outgoing.
#[test]
fn live_filters_with_ancillary_loads() {
    let live = pcap::Capture::from_device("lo")
        .unwrap()
        .open()
        .expect("open lo (needs root)");
    for (expr, accepted) in [("vlan 100 or outbound", false), ("vlan or inbound", true)] {
        let program = live.compile(expr, true).unwrap();
        let classic = CbpfInsn::from_pcap(&program);
        assert!(
            classic.iter().any(|i| i.k >= SKF_AD_OFF as u32),
            "no ancillary load in \"{expr}\": {classic:?}"
        );
        // Each hook its own translation: TC reads the packet in place, a socket filter may not.
        let socket = Target {
            hook: Hook::SocketFilter,
            ..return_target(Context::Skb)
        };
        load(&translate(&classic, &socket).unwrap(), Hook::SocketFilter);
        let insns = translate(&classic, &return_target(Context::Skb)).unwrap();
        let fd = load(&insns, Hook::Tc);
        assert_eq!(run(&fd, &frame(60, 0)) != 0, accepted, "\"{expr}\"");
        let err = translate(&classic, &return_target(Context::Xdp)).unwrap_err();
        assert!(
            err.to_string().contains("not available in XDP mode"),
            "{err}"
        );
    }
}

/// XDP sees a frame before the kernel moves its outer VLAN tag into metadata; the
/// translation hides the tag as the kernel's taps would, so that tcpdump's live filters
/// mean the same in every mode.
#[test]
fn xdp_hides_the_outer_vlan_tag() {
    let untagged = frame(64, 5);
    // PCP 1, VID 100.
    let tagged = [&untagged[..12], &[0x81, 0x00, 0x20, 0x64], &untagged[12..]].concat();
    let xdp = |prog: &[CbpfInsn], packet: &[u8]| run(&load_classic(prog, Context::Xdp), packet);
    let anc = |n: i32| {
        [
            s(LD_W_ABS, (SKF_AD_OFF + n) as u32),
            s(ALU_K | u16::from(OP_ADD), 0x10_0000),
            s(RET_A, 0),
        ]
    };
    for (n, value) in [
        (SKF_AD_VLAN_TAG_PRESENT, 1),
        (SKF_AD_VLAN_TAG, 0x2064),
        (SKF_AD_VLAN_TPID, 0x8100),
        (SKF_AD_PROTOCOL, 0x0800),
    ] {
        assert_eq!(
            xdp(&anc(n), &tagged) - 0x10_0000,
            value,
            "{}",
            ancillary_name(n)
        );
    }
    assert_eq!(xdp(&anc(SKF_AD_VLAN_TAG_PRESENT), &untagged), 0x10_0000);
    for prog in [
        vec![s(LD_H_ABS, 12), s(RET_A, 0)],
        vec![s(LD_W_ABS, 8), s(RET_A, 0)],
        vec![s(LD_W_ABS, 60), s(RET_A, 0)],
        vec![s(LD_W_LEN, 0), s(RET_A, 0)],
        vec![s(LDX_B_MSH, 14), s(LD_B_IND, 9), s(RET_A, 0)],
        // Loads that span the hidden tag's place.
        vec![s(LD_W_ABS, 10), s(RET_A, 0)],
        vec![s(LD_H_ABS, 11), s(RET_A, 0)],
        vec![s(LD_W_ABS, 11), s(RET_A, 0)],
    ] {
        assert_eq!(xdp(&prog, &tagged), oracle(&prog, &untagged), "{prog:?}");
    }

    // An 802.3 length field instead of an EtherType: the protocol is 802.3 raw when the
    // payload starts 0xffff, else 802.2, as the kernel says for the same frame in an skb.
    let skb = |prog: &[CbpfInsn], packet: &[u8]| run(&load_classic(prog, Context::Skb), packet);
    for (payload, protocol) in [([0xff, 0xff], 0x0001), ([0xaa, 0xaa], 0x0004)] {
        let mut frame_802_3 = untagged.clone();
        frame_802_3[12..14].copy_from_slice(&46u16.to_be_bytes());
        frame_802_3[14..16].copy_from_slice(&payload);
        let tagged_802_3 = [
            &frame_802_3[..12],
            &[0x81, 0x00, 0x00, 0x07],
            &frame_802_3[12..],
        ]
        .concat();
        assert_eq!(
            skb(&anc(SKF_AD_PROTOCOL), &frame_802_3) - 0x10_0000,
            protocol
        );
        assert_eq!(
            xdp(&anc(SKF_AD_PROTOCOL), &frame_802_3) - 0x10_0000,
            protocol
        );
        assert_eq!(
            xdp(&anc(SKF_AD_PROTOCOL), &tagged_802_3) - 0x10_0000,
            protocol
        );
    }

    let live = pcap::Capture::from_device("lo")
        .unwrap()
        .open()
        .expect("open lo (needs root)");
    for (expr, on_tagged, on_untagged) in [
        ("vlan 100 and ip", true, false),
        ("vlan 200", false, false),
        // As live tcpdump on Linux: "ip" alone also matches a tagged IPv4 frame.
        ("ip", true, true),
    ] {
        let classic = CbpfInsn::from_pcap(&live.compile(expr, true).unwrap());
        let fd = load_classic(&classic, Context::Xdp);
        assert_eq!(
            run(&fd, &tagged) != 0,
            on_tagged,
            "\"{expr}\" on the tagged frame"
        );
        assert_eq!(run(&fd, &untagged) != 0, on_untagged, "\"{expr}\" untagged");
    }
}

/// An indirect load's offset is known only at run time: in XDP, one that spans the hidden
/// tag's place must read the bytes on both sides of it, as a constant offset does.
#[test]
fn xdp_indirect_loads_across_the_hidden_tag() {
    let untagged = frame(64, 6);
    let tagged = [&untagged[..12], &[0x81, 0x00, 0x20, 0x64], &untagged[12..]].concat();
    for (x, load) in [
        (8, LD_W_IND),
        (9, LD_W_IND),
        (10, LD_W_IND),
        (11, LD_W_IND),
        (12, LD_W_IND),
        (10, LD_H_IND),
        (11, LD_H_IND),
        (12, LD_H_IND),
        (11, LD_B_IND),
        (12, LD_B_IND),
    ] {
        let prog = [s(LDX_IMM, x), s(load, 0), s(RET_A, 0)];
        let fd = load_classic(&prog, Context::Xdp);
        assert_eq!(run(&fd, &tagged), oracle(&prog, &untagged), "{prog:?}");
        assert_eq!(run(&fd, &untagged), oracle(&prog, &untagged), "{prog:?}");
    }
}

/// A load reads in place what lies in the linear part and calls the helper for the rest:
/// at every offset around where an XDP test run's linear part ends (a page less the head
/// and tail room), constant and indirect, it gets libpcap's answer either way.
#[test]
fn xdp_loads_across_the_end_of_the_linear_part() {
    let packet = frame(9014, 8);
    let x = 3000;
    for at in 3400..3700 {
        for (abs, ind) in [(LD_W_ABS, LD_W_IND), (LD_H_ABS, LD_H_IND)] {
            for prog in [
                vec![s(abs, at), s(RET_A, 0)],
                vec![s(LDX_IMM, x), s(ind, at - x), s(RET_A, 0)],
            ] {
                let fd = load_classic(&prog, Context::Xdp);
                assert_eq!(run(&fd, &packet), oracle(&prog, &packet), "{prog:?}");
            }
        }
    }
}

/// At TC a failed load must leave the packet to the programs after this one
/// (TC_ACT_UNSPEC, TC's pass), not end their chain with TC_ACT_OK (0), which is what
/// LD_IND's hidden `return 0` would do; the other tests pass with 0 and cannot tell.
/// Constant and indirect loads of every size at every offset around the packet's end, and
/// indirect offsets that wrap around 32 bits or reach past 2 GiB, return libpcap's value or
/// TC's pass (the kernel's value where an offset wraps around).
#[test]
fn tc_loads_past_the_end_leave_the_packet_to_the_next_program() {
    let tc = Target {
        hook: Hook::Tc,
        pass: Hook::Tc.pass(),
        on_accept: OnAccept::Return,
    };
    let pass = Hook::Tc.pass() as u32;
    let packet = frame(98, 5);
    let len = packet.len() as u32;
    let x = 40;
    let mut progs: Vec<(Vec<CbpfInsn>, u32)> = Vec::new();
    for at in len - 6..len + 2 {
        for (abs, ind) in [
            (LD_W_ABS, LD_W_IND),
            (LD_H_ABS, LD_H_IND),
            (LD_B_ABS, LD_B_IND),
        ] {
            for prog in [
                vec![s(abs, at), s(RET_A, 0)],
                vec![s(LDX_IMM, x), s(ind, at - x), s(RET_A, 0)],
            ] {
                let expected = match oracle(&prog, &packet) {
                    0 => pass,
                    value => value,
                };
                progs.push((prog, expected));
            }
        }
    }
    progs.push((
        vec![s(LDX_IMM, 0xffff_fff0), s(LD_B_IND, 0x20), s(RET_A, 0)],
        u32::from(packet[0x10]),
    ));
    progs.push((
        vec![s(LDX_IMM, 0xffe0_0000), s(LD_B_IND, 0x10), s(RET_K, 9)],
        pass,
    ));
    for (prog, expected) in progs {
        let insns = translate(&prog, &tc).unwrap_or_else(|e| panic!("{e} in {prog:?}"));
        let fd = load(&insns, Hook::Tc);
        assert_eq!(run(&fd, &packet), expected, "{prog:?}");
    }
}

/// At TC and XDP a packet load reads __sk_buff's or xdp_md's data pointer (the bytes in
/// place); a socket filter may not, so it keeps the helper alone.
#[test]
fn reads_in_place_where_the_hook_allows() {
    let prog = [s(LD_H_ABS, 12), s(RET_A, 0)];
    let reads_data = |hook: Hook, data: i16| {
        let target = Target {
            hook,
            ..return_target(Context::Skb)
        };
        let insns = translate(&prog, &target).unwrap();
        load(&insns, hook);
        insns
            .iter()
            .any(|i| i.code == EBPF_LDX | EBPF_MEM && i.regs == (R2 | CTX << 4) && i.off == data)
    };
    assert!(reads_data(Hook::Tc, skb::DATA));
    assert!(reads_data(Hook::Xdp { frags: true }, XDP_DATA));
    assert!(reads_data(Hook::Xdp { frags: false }, XDP_DATA));
    assert!(!reads_data(Hook::SocketFilter, skb::DATA));
}

fn translate_error(prog: &[CbpfInsn], context: Context) -> TranslateError {
    translate(prog, &return_target(context)).expect_err("accepted an invalid program")
}

#[test]
fn rejects_invalid_programs() {
    let cases: Vec<(Vec<CbpfInsn>, usize, &str)> = vec![
        (vec![], 0, "empty"),
        (vec![s(LD_IMM, 1)], 0, "does not end with a return"),
        (vec![s(JMP_JA, 1), s(RET_K, 1)], 0, "past the end"),
        (
            vec![j(JMP_K | u16::from(JEQ), 0, 0, 1), s(RET_K, 1)],
            0,
            "past the end",
        ),
        (
            vec![j(JMP_K | u16::from(JEQ), 0, 5, 0), s(RET_K, 1)],
            0,
            "past the end",
        ),
        (
            vec![s(LD_W_MEM, 16), s(RET_A, 0)],
            0,
            "scratch memory index 16",
        ),
        (
            vec![s(LD_IMM, 0), s(STX, 16), s(RET_A, 0)],
            1,
            "scratch memory index 16",
        ),
        (
            vec![s(ALU_K | u16::from(OP_DIV), 0), s(RET_A, 0)],
            0,
            "constant 0",
        ),
        (
            vec![s(ALU_K | u16::from(OP_MOD), 0), s(RET_A, 0)],
            0,
            "constant 0",
        ),
        (
            vec![s(ALU_K | u16::from(OP_LSH), 32), s(RET_A, 0)],
            0,
            "shift by 32",
        ),
        (
            vec![s(ALU_X | u16::from(OP_NEG), 0), s(RET_A, 0)],
            0,
            "unknown ALU opcode",
        ),
        (vec![s(0x0e, 0)], 0, "unknown return opcode"),
        (vec![s(0xc7, 0), s(RET_A, 0)], 0, "unknown opcode"),
        (vec![s(0x21, 0), s(RET_A, 0)], 0, "unknown load opcode"),
        (vec![s(0x105, 0), s(RET_A, 0)], 0, "unknown"),
        (
            vec![s(LD_W_ABS, (-0x10_0000i32) as u32), s(RET_A, 0)],
            0,
            "negative packet offset",
        ),
        (
            vec![s(LD_B_ABS, (SKF_AD_OFF + 12) as u32), s(RET_A, 0)],
            0,
            "SKF_AD_NLATTR is not supported",
        ),
        (
            vec![s(LD_W_ABS, (SKF_AD_OFF + 40) as u32), s(RET_A, 0)],
            0,
            "SKF_AD_ALU_XOR_X is not supported",
        ),
        (
            vec![s(LD_W_ABS, (SKF_AD_OFF + 2) as u32), s(RET_A, 0)],
            0,
            "SKF_AD_OFF + 2 is not supported",
        ),
    ];
    for (prog, index, text) in cases {
        let err = translate_error(&prog, Context::Skb);
        assert_eq!(err.index, index, "{err} for {prog:?}");
        assert!(err.to_string().contains(text), "{err} for {prog:?}");
    }
    let err = translate_error(
        &[
            s(LD_IMM, 0),
            s(LD_H_ABS, (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32),
            s(RET_A, 0),
        ],
        Context::Xdp,
    );
    assert_eq!(
        err,
        TranslateError {
            index: 1,
            refusal: Refusal::AncillaryNotInXdp {
                ancillary: SKF_AD_PKTTYPE
            }
        }
    );
    // The sensor adds which of its modes to use instead.
    assert_eq!(
        err.to_string(),
        "classic BPF instruction 1: the ancillary load SKF_AD_PKTTYPE is not available in \
         XDP mode"
    );
}

/// A jump over more eBPF instructions than a 16-bit offset reaches.
#[test]
fn rejects_jumps_too_long() {
    // The loads are reachable: the verifier would refuse them otherwise.
    let mut prog = vec![j(JMP_K | u16::from(JEQ), 0, 0, 1), s(JMP_JA, 5000)];
    prog.extend(std::iter::repeat_n(s(LD_W_ABS, 0), 5000));
    prog.push(s(RET_A, 0));
    let err = translate_error(&prog, Context::Skb);
    assert_eq!(err.index, 1);
    assert!(err.to_string().contains("too long"), "{err}");
}

#[test]
fn parses_pcap_instructions() {
    assert_eq!(
        CbpfInsn::parse("40 0 0 12"),
        Some(CbpfInsn {
            code: 40,
            jt: 0,
            jf: 0,
            k: 12
        })
    );
    assert_eq!(
        CbpfInsn::parse("21 0 5 4294963200").map(|i| i.k),
        Some(0xffff_f000)
    );
    assert_eq!(CbpfInsn::parse("40 0 0"), None);
    assert_eq!(CbpfInsn::parse("40 0 0 12 1"), None);
    assert_eq!(CbpfInsn::parse("40 256 0 12"), None);

    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();
    let program = dead.compile("ip", true).unwrap();
    assert_eq!(
        CbpfInsn::from_pcap(&program),
        [
            j(LD_H_ABS, 12, 0, 0),
            j(JMP_K | u16::from(JEQ), 0x0800, 0, 1),
            s(RET_K, 65535),
            s(RET_K, 0),
        ]
    );
}
