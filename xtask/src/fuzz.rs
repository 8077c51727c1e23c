//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets in `fuzz/`,
//! first installing what a fresh machine lacks (the pinned nightly, cargo-fuzz) and
//! writing the seed corpora. Fails if any target finds a crash, and says where its input is.
//! See fuzz/README.md.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use protocol::{
    decode_frame, Ack, AuthToken, BatchBuilder, CaptureEnded, CaptureLimits, CaptureRequest,
    CaptureStarted, CaptureTarget, Direction, DropReason, ErrorCode, ErrorMsg, Goodbye, Hello,
    InterfaceInfo, InterfaceStats, ListedSensor, Message, PushOutcome, SensorList, Stats,
    ViewerHello, PROTOCOL_VERSION,
};

use crate::system::cmd;

pub const TARGETS: &[&str] = &["decode_frame", "batch_body", "pcap_read", "translate"];

/// The target that loads programs into the kernel, so needs root.
const ROOT_TARGET: &str = "translate";

/// The cargo-fuzz release installed (with its own Cargo.lock) when it is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds per target of `cargo xtask fuzz` without `--seconds`.
pub const DEFAULT_SECONDS: u64 = 60;

/// Seconds per target in `cargo xtask test`.
pub const CI_SECONDS: u64 = 30;

/// An input that runs longer than this is reported as a hang (each takes microseconds).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Capture files from the shared corpus used as pcap_read seeds: small ones, for speed.
const PCAP_SEED_MAX_BYTES: u64 = 2048;
const PCAP_SEEDS_FROM_CORPUS: usize = 24;

/// Corpus frames used as translate seeds: long enough for an IPv6 header (a test run refuses
/// a shorter IPv6 frame), short for speed.
const TRANSLATE_FRAME_LENS: std::ops::RangeInclusive<usize> = 54..=600;
/// translate's input: the hook byte (TC; XDP is odd), the instruction count, then each
/// instruction as `struct bpf_insn` little-endian (see fuzz/src/translate.rs).
const TRANSLATE_HOOKS: [(u8, &str); 2] = [(0, "tc"), (1, "xdp")];

/// What one target's run reported.
#[derive(Default)]
struct Report {
    target: String,
    seconds: f64,
    done: Option<String>,
    executions: Option<String>,
    crashes: Vec<PathBuf>,
    failed: Option<String>,
}

pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target {t}; the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if targets.contains(&ROOT_TARGET) && unsafe { libc::geteuid() } != 0 {
        bail!(
            "the {ROOT_TARGET} fuzz target loads programs into the kernel: run as root, or name \
             the other targets ({})",
            TARGETS
                .iter()
                .filter(|t| **t != ROOT_TARGET)
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let fuzz_dir = root.join("fuzz");
    let toolchain = crate::ebpf::nightly(root)?.name;
    ensure_cargo_fuzz()?;
    write_seeds(&fuzz_dir.join("corpus"))?;

    eprintln!("xtask: building the fuzz targets ({toolchain}, AddressSanitizer)");
    let build = fuzz_command(root, &toolchain)
        .arg("build")
        .status()
        .with_context(|| format!("cannot run cargo +{toolchain} fuzz"))?;
    if !build.success() {
        bail!("building the fuzz targets failed ({build})");
    }
    // The targets' own checks (what translate compares, its input layout), without
    // sanitizers: the fuzzer relies on them.
    eprintln!("xtask: testing the fuzz targets' library ({toolchain})");
    let tests = nightly_cargo(&fuzz_dir, &toolchain)
        .args(["test", "--lib"])
        .status()
        .with_context(|| format!("cannot run cargo +{toolchain} test"))?;
    if !tests.success() {
        bail!("the fuzz targets' unit tests failed ({tests})");
    }

    let reports = targets
        .iter()
        .map(|t| run_target(root, &toolchain, &fuzz_dir, t, seconds))
        .collect::<Result<Vec<_>>>()?;

    eprintln!("\nxtask: fuzzing summary ({seconds} s per target)");
    for r in &reports {
        eprintln!(
            "  {:<13} {:>5.0} s  {}  {}",
            r.target,
            r.seconds,
            r.executions.as_deref().unwrap_or("? runs"),
            r.done.as_deref().unwrap_or("(no final line)"),
        );
    }
    let mut failed = false;
    for r in &reports {
        let keep = match r.target.as_str() {
            "decode_frame" => "protocol/tests/malformed/",
            "batch_body" => "protocol/tests/malformed/batch_body/",
            "translate" => "a test in cbpf-to-ebpf/src/translate/tests.rs",
            _ => "a sensor test (tests/data/)",
        };
        for crash in &r.crashes {
            failed = true;
            eprintln!(
                "xtask: {} crashed on {}\n       reproduce: cargo +{toolchain} fuzz run {} {}\n       \
                 once fixed, keep the input in {keep} (see fuzz/README.md)",
                r.target,
                crash.display(),
                r.target,
                crash.display()
            );
        }
        if let Some(why) = &r.failed {
            failed = true;
            eprintln!("xtask: {} failed: {why}", r.target);
        }
    }
    if failed {
        bail!("fuzzing found problems (see above)");
    }
    Ok(())
}

/// `cargo +TOOLCHAIN fuzz` in the workspace root, with the caller's toolchain overrides
/// removed (as for the eBPF build).
fn fuzz_command(root: &Path, toolchain: &str) -> Command {
    let mut c = nightly_cargo(root, toolchain);
    c.arg("fuzz");
    c
}

/// `cargo +TOOLCHAIN` in `dir`, likewise.
fn nightly_cargo(dir: &Path, toolchain: &str) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{toolchain}"))
        .current_dir(dir)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim()
                    == format!("cargo-fuzz {CARGO_FUZZ_VERSION}")
        });
    if !works {
        eprintln!(
            "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets), from \
             crates.io"
        );
        cmd(
            "cargo",
            &[
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
                "--force",
            ],
        )?;
    }
    Ok(())
}

fn artifacts(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Runs one target for `seconds`. libFuzzer's progress goes to stderr; the lines for each
/// new corpus entry are left out, the rest passes through.
fn run_target(
    root: &Path,
    toolchain: &str,
    fuzz_dir: &Path,
    target: &str,
    seconds: u64,
) -> Result<Report> {
    let artifact_dir = fuzz_dir.join("artifacts").join(target);
    let before = artifacts(&artifact_dir);
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let start = Instant::now();
    let mut child = fuzz_command(root, toolchain)
        .args(["run", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run cargo +{toolchain} fuzz"))?;
    let mut report = Report {
        target: target.to_string(),
        ..Report::default()
    };
    let stderr = child.stderr.take().context("no stderr")?;
    let mut in_dictionary = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading the fuzzer's output")?;
        // `#123\tNEW    cov: ...`: the event is the second word.
        let event = line
            .starts_with('#')
            .then(|| line.split_whitespace().nth(1))
            .flatten();
        if event == Some("DONE") {
            report.done = line.split_once("DONE").map(|(_, s)| s.trim().to_string());
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            report.executions = Some(format!("{} runs", n.trim()));
        }
        if line.starts_with("###### Recommended dictionary") {
            in_dictionary = true;
        }
        let quiet = in_dictionary || matches!(event, Some("NEW" | "REDUCE"));
        if line.starts_with("###### End of recommended dictionary") {
            in_dictionary = false;
        }
        if !quiet {
            eprintln!("{line}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    report.seconds = start.elapsed().as_secs_f64();
    report.crashes = artifacts(&artifact_dir)
        .difference(&before)
        .cloned()
        .collect();
    if !status.success() && report.crashes.is_empty() {
        report.failed = Some(format!("cargo fuzz run {target} exited with {status}"));
    }
    Ok(report)
}

/// Writes the seed inputs of every target into `corpus/<target>/seed-*`, built with the
/// protocol's own encoder, plus small capture files from the shared corpus for pcap_read,
/// and for translate the dev filters compiled by libpcap with frames they match and reject.
pub fn write_seeds(corpus: &Path) -> Result<()> {
    let write = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };

    let messages = seed_messages();
    let mut stream = BytesMut::new();
    for (name, msg) in &messages {
        write("decode_frame", name, &msg.to_bytes())?;
        msg.encode(&mut stream);
        if let Message::Batch(b) = msg {
            let mut input = vec![b.encoding as u8];
            input.extend_from_slice(&b.packet_count.to_be_bytes());
            input.extend_from_slice(&b.body);
            write("batch_body", name, &input)?;
        }
    }
    write("decode_frame", "stream", &stream)?;
    write("batch_body", "empty", &[0, 0, 0, 0, 0])?;

    for (name, bytes) in seed_captures() {
        write("pcap_read", name, &bytes)?;
    }
    let shared = testbed::corpus_dir().join("tcpdump-tests");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&shared) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.metadata().is_ok_and(|m| m.len() <= PCAP_SEED_MAX_BYTES))
            .map(|e| e.path())
            .collect(),
        Err(_) => {
            eprintln!(
                "xtask: no shared corpus at {}; pcap_read starts from its own seeds only",
                shared.display()
            );
            Vec::new()
        }
    };
    files.sort();
    // Spread over the alphabet: many protocols rather than one family.
    let step = files.len().div_ceil(PCAP_SEEDS_FROM_CORPUS).max(1);
    for path in files.iter().step_by(step) {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        write("pcap_read", &format!("tcpdump-{name}"), &bytes)?;
    }

    for (name, bytes) in translate_seeds()? {
        write("translate", &name, &bytes)?;
    }
    Ok(())
}

/// Each filter of the shared corpus's filters-dev.txt, compiled by libpcap for Ethernet, on
/// the shortest corpus frame it matches and the shortest it rejects, in each hook. Without
/// the shared corpus: a few filters on the frames of `seed_captures`.
fn translate_seeds() -> Result<Vec<(String, Vec<u8>)>> {
    let corpus = testbed::corpus_dir();
    let (filters, frames): (Vec<String>, Vec<Vec<u8>>) =
        match std::fs::read_to_string(corpus.join("filters-dev.txt")) {
            Ok(text) => (
                text.lines().map(str::to_string).collect(),
                corpus_frames(&corpus.join("tcpdump-tests.pcap"))?,
            ),
            Err(_) => {
                eprintln!(
                    "xtask: no shared corpus at {}; translate starts from a few filters only",
                    corpus.display()
                );
                let frames = [
                    ethernet(0x0800, &ipv4(6, &tcp(b"hello"))),
                    ethernet(0x0806, &[0; 28]),
                ];
                (
                    vec![String::new(), "tcp".into(), "arp".into()],
                    frames
                        .into_iter()
                        .map(|mut f| {
                            f.resize(60, 0);
                            f
                        })
                        .collect(),
                )
            }
        };
    let libpcap = pcap::Capture::dead(pcap::Linktype::ETHERNET).context("libpcap")?;
    let mut seeds = Vec::new();
    for (index, expr) in filters.iter().enumerate() {
        let program = libpcap
            .compile(expr, true)
            .with_context(|| format!("libpcap cannot compile \"{expr}\""))?;
        let classic = cbpf_to_ebpf::CbpfInsn::from_pcap(&program);
        let Ok(count) = u8::try_from(classic.len()) else {
            continue;
        };
        for matching in [true, false] {
            let Some(frame) = frames
                .iter()
                .filter(|f| program.filter(f) == matching)
                .min_by_key(|f| f.len())
            else {
                continue;
            };
            for (hook, hook_name) in TRANSLATE_HOOKS {
                let mut input = vec![hook, count];
                for insn in &classic {
                    input.extend_from_slice(&insn.code.to_le_bytes());
                    input.extend_from_slice(&[insn.jt, insn.jf]);
                    input.extend_from_slice(&insn.k.to_le_bytes());
                }
                input.extend_from_slice(frame);
                let verdict = if matching { "match" } else { "reject" };
                seeds.push((format!("filter{index}-{verdict}-{hook_name}"), input));
            }
        }
    }
    Ok(seeds)
}

/// The frames of a capture file with a length in TRANSLATE_FRAME_LENS.
fn corpus_frames(path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut capture = pcap::Capture::from_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut frames = Vec::new();
    while let Ok(packet) = capture.next_packet() {
        if TRANSLATE_FRAME_LENS.contains(&packet.data.len()) {
            frames.push(packet.data.to_vec());
        }
    }
    Ok(frames)
}

/// One valid message of each kind, batches in both encodings.
fn seed_messages() -> Vec<(&'static str, Message)> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        session_id: 0x0123_4567_89ab_cdef,
        session_secret: [7; 16],
        sensor_id: "edge-1".into(),
        hostname: "edge-1.example.net".into(),
        os: "linux 6.1 x86_64".into(),
        interfaces: vec![
            InterfaceInfo {
                name: "eth0".into(),
                link_type: 1,
                snaplen: 262_144,
                filter: "tcp port 443 or udp".into(),
            },
            InterfaceInfo {
                name: "any".into(),
                link_type: 113,
                snaplen: 96,
                filter: String::new(),
            },
        ],
        token: AuthToken::new(&b"a shared token of 32 bytes......"[..]),
        available: vec!["eth0".into(), "eth1".into()],
        on_demand: true,
        tls_key_log: false,
    };
    let mut snappy = BatchBuilder::new(64 * 1024);
    let mut stored = BatchBuilder::new(64 * 1024);
    let mut noise = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..12u32 {
        let dir = [Direction::Unknown, Direction::Inbound, Direction::Outbound][i as usize % 3];
        let frame = ethernet(0x0800, &ipv4(6, &tcp(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")));
        assert_eq!(
            snappy.push(1_700_000_000_000_000_000 + u64::from(i), 1514, dir, &frame),
            PushOutcome::Added
        );
        let random: Vec<u8> = (0..40 + i * 7)
            .map(|_| {
                // xorshift: incompressible bytes, so the batch is stored.
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                noise as u8
            })
            .collect();
        assert_eq!(
            stored.push(u64::from(i) * 1_000, 60 + i, dir, &random),
            PushOutcome::Added
        );
    }
    let batch = |b: &mut BatchBuilder, seq| {
        let frame = b.finish(0x0123_4567_89ab_cdef, seq, 0).frame;
        match decode_frame(&mut BytesMut::from(&frame[..])) {
            Ok(Some(m @ Message::Batch(_))) => m,
            other => panic!("the seed batch does not decode: {other:?}"),
        }
    };
    let mut key_log = BatchBuilder::new(64 * 1024);
    for i in 0..6u64 {
        let line = format!("CLIENT_TRAFFIC_SECRET_0 {i:064x} {:096x}", i * 7);
        assert_eq!(
            key_log.push_tls_key_log(1_700_000_000_000_000_000 + i, line.as_bytes()),
            PushOutcome::Added
        );
    }
    let snappy = batch(&mut snappy, 1);
    let stored = batch(&mut stored, 2);
    let key_log = batch(&mut key_log, 3);
    vec![
        ("hello", Message::Hello(hello)),
        ("batch-snappy", snappy),
        ("batch-stored", stored),
        ("batch-tls-key-log", key_log),
        (
            "stats",
            Message::Stats(Stats {
                session_id: 0x0123_4567_89ab_cdef,
                interfaces: vec![InterfaceStats {
                    interface_id: 0,
                    seen: 1000,
                    matched: 900,
                    delivered: 890,
                    drops: vec![
                        (DropReason::KERNEL_BUFFER, 4),
                        (DropReason::INTERFACE, 1),
                        (DropReason(3), 5),
                    ],
                }],
            }),
        ),
        ("ack", Message::Ack(Ack { sequence: 2 })),
        (
            "error",
            Message::Error(ErrorMsg {
                code: ErrorCode::UNSUPPORTED_LINK_TYPE,
                message: "link type 147 is not supported".into(),
            }),
        ),
        ("goodbye", Message::Goodbye(Goodbye)),
        (
            "viewer-hello",
            Message::ViewerHello(ViewerHello {
                version: PROTOCOL_VERSION,
                user: "analyst@desk".into(),
                token: AuthToken::new(&b"a viewer token of 32 bytes......"[..]),
            }),
        ),
        (
            "sensor-list",
            Message::SensorList(SensorList {
                sensors: vec![ListedSensor {
                    name: "edge-1".into(),
                    on_demand: true,
                    interfaces: vec!["eth0".into(), "lo".into()],
                }],
            }),
        ),
        (
            "capture-request",
            Message::CaptureRequest(CaptureRequest {
                targets: vec![CaptureTarget {
                    sensor: "edge-1".into(),
                    interface: "eth0".into(),
                }],
                filter: "udp port 53".into(),
                snaplen: 262_144,
                limits: CaptureLimits {
                    duration_ms: 60_000,
                    packets: 500,
                    bytes: 0,
                },
                requested_by: "viewer analyst@desk at 198.18.0.1:50000 (viewer token)".into(),
            }),
        ),
        (
            "capture-started",
            Message::CaptureStarted(CaptureStarted {
                interfaces: vec![InterfaceInfo {
                    name: "edge-1/eth0".into(),
                    link_type: 1,
                    snaplen: 262_144,
                    filter: "udp port 53".into(),
                }],
            }),
        ),
        (
            "capture-ended",
            Message::CaptureEnded(CaptureEnded {
                reason: "packet limit (500)".into(),
                stats: InterfaceStats {
                    interface_id: 0,
                    seen: 900,
                    matched: 520,
                    delivered: 500,
                    drops: vec![(DropReason::RATE_CAP, 20)],
                },
            }),
        ),
    ]
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
    p.extend_from_slice(payload);
    p
}

fn tcp(data: &[u8]) -> Vec<u8> {
    let mut s = vec![
        0xc0, 0x01, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    s.extend_from_slice(data);
    s
}

fn udp(data: &[u8]) -> Vec<u8> {
    let mut s = vec![0xc0, 0x02, 0, 53];
    s.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(data);
    s
}

/// Linux cooked header (`LINKTYPE_LINUX_SLL`) of the given packet type, IPv4.
fn sll(packet_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = packet_type.to_be_bytes().to_vec();
    f.extend_from_slice(&[0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

/// Linux cooked header v2 (`LINKTYPE_LINUX_SLL2`) of the given packet type, IPv4.
fn sll2(packet_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, packet_type, 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A classic pcap file; `nano` picks the nanosecond magic, `big` the byte order.
fn pcap_file(nano: bool, big: bool, link_type: u32, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let put = |v: u32, out: &mut Vec<u8>| {
        out.extend_from_slice(&if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        })
    };
    put(if nano { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }, &mut out);
    // Version 2.4: two u16s.
    out.extend_from_slice(if big { &[0, 2, 0, 4] } else { &[2, 0, 4, 0] });
    put(0, &mut out);
    put(0, &mut out);
    put(262_144, &mut out);
    put(link_type, &mut out);
    for (i, f) in frames.iter().enumerate() {
        put(1_700_000_000 + i as u32, &mut out);
        put(123_456 * (i as u32 + 1), &mut out);
        put(f.len() as u32, &mut out);
        put(f.len() as u32 + 4 * i as u32, &mut out);
        out.extend_from_slice(f);
    }
    out
}

/// A pcapng file: a section header, one interface with nanosecond timestamps, and an
/// enhanced packet block per frame.
fn pcapng_file(link_type: u16, frames: &[Vec<u8>]) -> Vec<u8> {
    let block = |kind: u32, body: &[u8]| {
        let len = (12 + body.len()) as u32;
        let mut b = kind.to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(body);
        b.extend_from_slice(&len.to_le_bytes());
        b
    };
    let mut shb = 0x1a2b_3c4d_u32.to_le_bytes().to_vec();
    shb.extend_from_slice(&[1, 0, 0, 0]);
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &shb);
    let mut idb = link_type.to_le_bytes().to_vec();
    idb.extend_from_slice(&[0, 0]);
    idb.extend_from_slice(&65_535u32.to_le_bytes());
    // if_tsresol = 9 (nanoseconds), then opt_endofopt.
    idb.extend_from_slice(&[9, 0, 1, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
    out.extend(block(1, &idb));
    for (i, f) in frames.iter().enumerate() {
        let ts = 1_700_000_000_123_456_789u64 + i as u64 * 1_000;
        let mut epb = 0u32.to_le_bytes().to_vec();
        epb.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(ts as u32).to_le_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_le_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_le_bytes());
        epb.extend_from_slice(f);
        epb.resize(epb.len().next_multiple_of(4), 0);
        out.extend(block(6, &epb));
    }
    out
}

/// Small capture files of each format and byte order the sensor reads, with TCP, UDP and
/// ARP frames, and the link types whose headers carry a direction.
fn seed_captures() -> Vec<(&'static str, Vec<u8>)> {
    let tcp4 = ipv4(6, &tcp(b"hello"));
    let udp4 = ipv4(
        17,
        &udp(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
    );
    let arp = [
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0,
    ];
    let eth = vec![
        ethernet(0x0800, &tcp4),
        ethernet(0x0800, &udp4),
        ethernet(0x0806, &arp),
    ];
    vec![
        ("ethernet-usec-le.pcap", pcap_file(false, false, 1, &eth)),
        ("ethernet-nsec-be.pcap", pcap_file(true, true, 1, &eth)),
        (
            "linux-sll.pcap",
            pcap_file(false, false, 113, &[sll(0, &tcp4), sll(4, &udp4)]),
        ),
        ("ethernet.pcapng", pcapng_file(1, &eth)),
        (
            "linux-sll2.pcapng",
            pcapng_file(276, &[sll2(0, &udp4), sll2(4, &tcp4)]),
        ),
    ]
}
