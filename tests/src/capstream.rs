//! Starting the receiver and sensors as the built binaries, and reading their output with
//! the reference tools.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{run, workspace_bin, Netns, Proc, SummaryFile};

/// A scratch directory, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(label: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("capstream-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn argv(ns: Option<&Netns>, program: &Path, args: &[&str]) -> Vec<String> {
    wrapped_argv(ns, &[], program, args)
}

/// `program args...` run through `wrapper` (e.g. `setpriv --reuid nobody`), inside `ns`.
fn wrapped_argv(
    ns: Option<&Netns>,
    wrapper: &[&str],
    program: &Path,
    args: &[&str],
) -> Vec<String> {
    let program = program.to_string_lossy().into_owned();
    let (first, rest): (String, Vec<String>) = match wrapper.split_first() {
        Some((w, more)) => (
            w.to_string(),
            more.iter()
                .map(|s| s.to_string())
                .chain([program])
                .collect(),
        ),
        None => (program, Vec::new()),
    };
    let mut v = match ns {
        Some(ns) => ns.command(&first),
        None => vec![first],
    };
    v.extend(rest);
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// A running receiver on 127.0.0.1 (inside `ns` when given).
pub struct Receiver {
    pub proc: Proc,
    pub addr: String,
    pub cert: PathBuf,
    pub fingerprint: String,
    /// The token it generated in its state directory and requires (none when it was given
    /// `--token-file`, `--client-ca` or `--allow-unauthenticated`): sensors started here
    /// pass it.
    pub token: Option<PathBuf>,
}

impl Receiver {
    /// Starts `receiver --listen 127.0.0.1:<port> --state-dir <state> <args>` and waits until
    /// it listens.
    pub fn start(ns: Option<&Netns>, state: &Path, port: u16, args: &[&str]) -> Result<Self> {
        Self::start_with_stdout(ns, state, port, args, Stdio::null())
    }

    pub fn start_with_stdout(
        ns: Option<&Netns>,
        state: &Path,
        port: u16,
        args: &[&str],
        stdout: Stdio,
    ) -> Result<Self> {
        let listen = format!("127.0.0.1:{port}");
        Self::spawn(ns, &[], state, &listen, args, stdout)
    }

    /// [`Receiver::start`] through `wrapper` (e.g. `env AWS_REGION=eu-west-1`).
    pub fn start_through(
        ns: Option<&Netns>,
        wrapper: &[&str],
        state: &Path,
        port: u16,
        args: &[&str],
    ) -> Result<Self> {
        let listen = format!("127.0.0.1:{port}");
        Self::spawn(ns, wrapper, state, &listen, args, Stdio::null())
    }

    fn spawn(
        ns: Option<&Netns>,
        wrapper: &[&str],
        state: &Path,
        listen: &str,
        args: &[&str],
        stdout: Stdio,
    ) -> Result<Self> {
        let state_arg = state.to_string_lossy().into_owned();
        let summary = SummaryFile::new("receiver")?;
        let summary_arg = summary.arg();
        let mut all = vec![
            "--listen",
            listen,
            "--state-dir",
            &state_arg,
            "--summary-json",
            &summary_arg,
        ];
        all.extend_from_slice(args);
        let argv = wrapped_argv(ns, wrapper, &workspace_bin("receiver"), &all);
        let mut proc = Proc::start("receiver", &argv, stdout)?.with_summary(summary);
        proc.wait_for("listening on", Duration::from_secs(20))?;
        proc.wait_for("fingerprint", Duration::from_secs(5))?;
        let log = proc.stderr();
        let fingerprint = log
            .split("fingerprint")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .context("no fingerprint in the receiver's log")?
            .trim_matches(|c: char| !c.is_ascii_hexdigit())
            .to_string();
        let own_proof = ["--token-file", "--client-ca", "--allow-unauthenticated"];
        let token = state.join("token");
        let token =
            (!args.iter().any(|a| own_proof.contains(a)) && token.exists()).then_some(token);
        Ok(Self {
            proc,
            addr: listen.to_string(),
            cert: state.join("receiver.crt"),
            fingerprint,
            token,
        })
    }

    /// What a sensor started with `args` must add to be admitted: `--token-file` and the
    /// receiver's generated token, unless `args` give a token. `user`: the user the sensor
    /// runs as, when not root; it gets a copy of the token of its own (mode 0600).
    pub fn credentials(&self, args: &[&str], user: Option<&str>) -> Result<Vec<String>> {
        let Some(token) = self
            .token
            .as_ref()
            .filter(|_| !args.contains(&"--token-file"))
        else {
            return Ok(Vec::new());
        };
        let path = match user {
            None => token.clone(),
            Some(user) => {
                use std::os::unix::fs::PermissionsExt;
                let copy = token.with_file_name(format!("token-of-{user}"));
                let _ = std::fs::remove_file(&copy);
                std::fs::copy(token, &copy)?;
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))?;
                let uid: u32 = run("id", &["-u", user])?.trim().parse()?;
                let gid: u32 = run("id", &["-g", user])?.trim().parse()?;
                std::os::unix::fs::chown(&copy, Some(uid), Some(gid))?;
                // Its directory (the state directory) must let that user in.
                if let Some(dir) = copy.parent() {
                    let mode = std::fs::metadata(dir)?.permissions().mode();
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
                }
                copy
            }
        };
        Ok(vec![
            "--token-file".into(),
            path.to_string_lossy().into_owned(),
        ])
    }

    /// A receiver on port 4433 writing `dir/<file>` (plus `args`), its state in `dir/state`;
    /// returns it with the output's path.
    pub fn writing(
        ns: Option<&Netns>,
        dir: &Scratch,
        file: &str,
        args: &[&str],
    ) -> Result<(Self, PathBuf)> {
        let out = dir.join(file);
        let out_arg = out.to_string_lossy().into_owned();
        let mut all = vec!["--out", out_arg.as_str()];
        all.extend_from_slice(args);
        let receiver = Self::start(ns, &dir.join("state"), 4433, &all)?;
        Ok((receiver, out))
    }

    /// [`Receiver::writing`] on 127.0.0.1:4433, started through `wrapper` (e.g. `setpriv
    /// --reuid nobody ...`): `state` and `out` are its state directory and output file.
    pub fn writing_through(
        ns: Option<&Netns>,
        wrapper: &[&str],
        state: &Path,
        out: &Path,
        args: &[&str],
    ) -> Result<Self> {
        let out_arg = out.to_string_lossy().into_owned();
        let mut all = vec!["--out", out_arg.as_str()];
        all.extend_from_slice(args);
        Self::spawn(ns, wrapper, state, "127.0.0.1:4433", &all, Stdio::null())
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop()
    }
}

/// The user `wrapper` runs a program as (`setpriv --reuid USER`, `runuser -u USER`), if any.
fn wrapper_user<'a>(wrapper: &[&'a str]) -> Option<&'a str> {
    wrapper
        .windows(2)
        .find(|w| matches!(w[0], "--reuid" | "-u"))
        .map(|w| w[1])
}

/// Starts `sensor --receiver <addr> --ca <cert> <args>` and waits for its `ready:` line.
pub fn start_sensor(ns: Option<&Netns>, receiver: &Receiver, args: &[&str]) -> Result<Proc> {
    start_sensor_through(ns, &[], receiver, args)
}

/// [`start_sensor`] through `wrapper` (e.g. `setpriv --reuid nobody ...`).
pub fn start_sensor_through(
    ns: Option<&Netns>,
    wrapper: &[&str],
    receiver: &Receiver,
    args: &[&str],
) -> Result<Proc> {
    spawn_sensor(ns, wrapper, &receiver.addr, receiver, args)
}

/// `sensor --receiver <addr> --ca <receiver's certificate> --summary-json <file>`, the
/// receiver's credentials and `args`, through `wrapper`; waits for `ready:`.
fn spawn_sensor(
    ns: Option<&Netns>,
    wrapper: &[&str],
    addr: &str,
    receiver: &Receiver,
    args: &[&str],
) -> Result<Proc> {
    let cert = receiver.cert.to_string_lossy().into_owned();
    let credentials = receiver.credentials(args, wrapper_user(wrapper))?;
    let summary = SummaryFile::new("sensor")?;
    let summary_arg = summary.arg();
    let mut all = vec![
        "--receiver",
        addr,
        "--ca",
        &cert,
        "--summary-json",
        &summary_arg,
    ];
    all.extend(credentials.iter().map(String::as_str));
    all.extend_from_slice(args);
    let argv = wrapped_argv(ns, wrapper, &workspace_bin("sensor"), &all);
    let mut proc = Proc::start("sensor", &argv, Stdio::null())?.with_summary(summary);
    proc.wait_for("ready:", Duration::from_secs(20))?;
    Ok(proc)
}

/// tcpdump capturing live on `iface` inside `ns` into `out`, as a user would run it, with
/// nanosecond timestamps. Waits until it listens.
/// `extra` goes before the filter (e.g. `-Q in`).
pub fn start_tcpdump(
    ns: &Netns,
    iface: &str,
    filter: &str,
    extra: &[&str],
    out: &Path,
) -> Result<Proc> {
    let out = out.to_string_lossy().into_owned();
    let mut args = vec![
        "-i",
        iface,
        "-s",
        "262144",
        "-B",
        "32768",
        "-w",
        &out,
        "--time-stamp-precision=nano",
        "--immediate-mode",
        "-Z",
        "root",
    ];
    args.extend_from_slice(extra);
    if !filter.is_empty() {
        args.push(filter);
    }
    let mut proc = Proc::start(
        "tcpdump",
        &argv(Some(ns), Path::new("tcpdump"), &args),
        Stdio::null(),
    )?;
    proc.wait_for("listening on", Duration::from_secs(10))?;
    Ok(proc)
}

/// Stops the reference tcpdump and reads what it captured; it must have dropped nothing,
/// or comparing with it means nothing.
pub fn stop_reference(mut tcpdump: Proc, file: &Path) -> Vec<Record> {
    tcpdump.stop().unwrap();
    let log = tcpdump.stderr();
    assert!(
        log.lines()
            .any(|l| l.trim() == "0 packets dropped by kernel"),
        "the reference dropped packets, so the comparison means nothing: {log}"
    );
    tcpdump_records(file, "").unwrap()
}

/// One packet as tcpdump reads it: nanosecond timestamp, original length and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub timestamp_ns: u128,
    pub original_len: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: String = self
            .data
            .iter()
            .take(24)
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(
            f,
            "t={} len={}/{} {head}..",
            self.timestamp_ns,
            self.data.len(),
            self.original_len
        )
    }
}

/// Every packet of a capture file (pcap or pcapng) as tcpdump reads it, optionally through
/// a filter: tcpdump re-writes the file as nanosecond pcap, whose records are then split.
/// Two files with equal records hold the same packets, bytes and times, in the same order.
pub fn tcpdump_records(file: &Path, filter: &str) -> Result<Vec<Record>> {
    let scratch = Scratch::new("records")?;
    let copy = scratch.join("copy.pcap");
    let (file, copy_arg) = (
        file.to_string_lossy().into_owned(),
        copy.to_string_lossy().into_owned(),
    );
    let mut args = vec!["-r", &file, "--time-stamp-precision=nano", "-w", &copy_arg];
    if !filter.is_empty() {
        args.push(filter);
    }
    run("tcpdump", &args)?;
    let bytes = std::fs::read(&copy)?;
    let u32_at = |at: usize| -> Result<u32> {
        let b = bytes
            .get(at..at + 4)
            .context("truncated pcap written by tcpdump")?;
        Ok(u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    if u32_at(0)? != 0xa1b2_3c4d {
        bail!("tcpdump did not write a native-order nanosecond pcap");
    }
    let mut records = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let (secs, nanos, captured, original) = (
            u32_at(at)?,
            u32_at(at + 4)?,
            u32_at(at + 8)?,
            u32_at(at + 12)?,
        );
        let data = bytes
            .get(at + 16..at + 16 + captured as usize)
            .context("truncated packet in the pcap written by tcpdump")?;
        records.push(Record {
            timestamp_ns: u128::from(secs) * 1_000_000_000 + u128::from(nanos),
            original_len: original,
            data: data.to_vec(),
        });
        at += 16 + captured as usize;
    }
    Ok(records)
}

/// Where two record lists first differ, for a failure message.
pub fn first_difference(expected: &[Record], got: &[Record]) -> String {
    let i = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    let show = |r: Option<&Record>| r.map_or("(none)".to_string(), |r| r.to_string());
    format!(
        "{} vs {} packets; first difference at packet {i}:\n  expected: {}\n  got:      {}",
        expected.len(),
        got.len(),
        show(expected.get(i)),
        show(got.get(i))
    )
}

/// Compares two captures of the same traffic made by different means: the same packets,
/// bytes and lengths in the same order, and timestamps at most `tolerance_ns` apart.
/// Returns the largest timestamp difference seen, or what first differs.
pub fn compare_captures(
    expected: &[Record],
    got: &[Record],
    tolerance_ns: u128,
) -> Result<u128, String> {
    let mut max_skew = 0;
    for (i, (a, b)) in expected.iter().zip(got).enumerate() {
        let skew = a.timestamp_ns.abs_diff(b.timestamp_ns);
        if a.data != b.data || a.original_len != b.original_len || skew > tolerance_ns {
            return Err(format!(
                "{} vs {} packets; packet {i} differs (timestamps {skew} ns apart):\n  \
                 expected: {a}\n  got:      {b}",
                expected.len(),
                got.len()
            ));
        }
        max_skew = max_skew.max(skew);
    }
    if expected.len() != got.len() {
        return Err(first_difference(expected, got));
    }
    Ok(max_skew)
}

/// The number of packets tshark reads from a file; fails if tshark cannot read it.
pub fn tshark_count(file: &Path) -> Result<usize> {
    let file = file.to_string_lossy().into_owned();
    let out = run(
        "tshark",
        &["-r", &file, "-n", "-T", "fields", "-e", "frame.number"],
    )?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Runs a program that must refuse its arguments: exit code 2, one line naming the problem,
/// no panic. `timeout` turns a program that wrongly starts running into a failure.
pub fn assert_refused(program: &str, args: &[&str], needle: &str) {
    let bin = crate::workspace_bin(program);
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(&bin)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{program} {args:?}: exit code; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{program} {args:?}: one line: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{program} {args:?}: should mention {needle:?}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{program} {args:?} panicked: {stderr}"
    );
}

/// The filter expressions of `filters-dev.txt` (the first is empty: no filter).
pub fn dev_filters() -> Result<Vec<String>> {
    let path = crate::corpus_dir().join("filters-dev.txt");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: the shared corpus must sit beside the repository",
            path.display()
        )
    })?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}

// Helpers for the fault tests: receivers on any address, sensors sent to any address (a
// relay), the summaries' figures, peak memory, and captures cut short by a kill.

impl Receiver {
    /// Starts `receiver --listen <listen> --state-dir <state> <args>` (inside `ns` when
    /// given) and waits until it listens. Sensors reach it by `listen`, so the certificate
    /// must name that address: pass `--cert-name` for anything but 127.0.0.1 and localhost.
    pub fn start_listening(
        ns: Option<&Netns>,
        state: &Path,
        listen: &str,
        args: &[&str],
    ) -> Result<Self> {
        Self::spawn(ns, &[], state, listen, args, Stdio::null())
    }
}

/// Starts `sensor --receiver <addr> --ca <receiver's certificate> <args>`, for a sensor
/// that reaches `receiver` through something in between (a relay), and waits for `ready:`.
pub fn start_sensor_to(
    ns: Option<&Netns>,
    addr: &str,
    receiver: &Receiver,
    args: &[&str],
) -> Result<Proc> {
    spawn_sensor(ns, &[], addr, receiver, args)
}

// The programs' exit summaries, as they write them to `--summary-json` (the harness starts
// every receiver and sensor with one: [`Proc::summary`] reads it once the program exited).

/// A number in a program's summary, by JSON pointer (e.g. `/batches/resent`).
pub fn summary_figure(summary: &Value, pointer: &str) -> Result<u64> {
    summary
        .pointer(pointer)
        .and_then(Value::as_u64)
        .with_context(|| format!("no number at {pointer} in the summary:\n{summary:#}"))
}

/// The number right after the first `label` in a line of a program's log (e.g. a live
/// client's drop line), or in its prose exit summary.
pub fn number_after(text: &str, label: &str) -> Result<u64> {
    text.split_once(label)
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .with_context(|| format!("no number after {label:?} in {text:?}"))
}

/// One interface of the sensor's exit summary (an element of its `interfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceFigures {
    pub seen: u64,
    pub matched: u64,
    pub delivered: u64,
    pub dropped: u64,
    /// Each drop reason with its count, named by `DropReason::label` (`kernel_buffer`,
    /// `interface`, `sensor_buffer`, `spool_damaged`).
    pub reasons: Vec<(String, u64)>,
    /// Packets still held, unacknowledged, at exit; `None` if the summary does not say.
    pub unacknowledged: Option<u64>,
    /// Batches acknowledged, and their bytes before and after compression.
    pub batches: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// The interface's summary as JSON, for messages.
    pub line: String,
}

impl InterfaceFigures {
    /// The count of a drop reason, 0 when the summary does not name it.
    pub fn reason(&self, label: &str) -> u64 {
        self.reasons
            .iter()
            .find(|(r, _)| r == label)
            .map_or(0, |(_, n)| *n)
    }
}

/// The figures of `iface` in a sensor's exit summary.
pub fn sensor_figures(summary: &Value, iface: &str) -> Result<InterfaceFigures> {
    let interface = summary["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == iface)
        .with_context(|| format!("no interface {iface} in the sensor's summary:\n{summary:#}"))?;
    let figure = |name: &str| summary_figure(interface, &format!("/{name}"));
    let reasons = interface["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(reason, n)| Some((reason.clone(), n.as_u64()?)))
        .collect();
    Ok(InterfaceFigures {
        seen: figure("seen")?,
        matched: figure("matched")?,
        delivered: figure("delivered")?,
        dropped: figure("dropped")?,
        reasons,
        unacknowledged: figure("unacknowledged").ok(),
        batches: figure("batches")?,
        raw_bytes: figure("raw_bytes")?,
        wire_bytes: figure("wire_bytes")?,
        line: interface.to_string(),
    })
}

/// One sensor session of the receiver's exit summary (an element of its `sessions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverSession {
    /// From its label, `sensor <id> (<host>, <peer>)`.
    pub sensor_id: String,
    /// Packets and bytes written to the output.
    pub packets: u64,
    pub bytes: u64,
    /// Batches received, and their bytes before and after compression.
    pub batches: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// The session's summary as JSON, for messages.
    pub line: String,
}

/// Every sensor session of the receiver's exit summary (none when the run failed before
/// it could list them).
pub fn receiver_sessions(summary: &Value) -> Vec<ReceiverSession> {
    summary["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let (id, _) = s["label"]
                .as_str()?
                .strip_prefix("sensor ")?
                .split_once(" (")?;
            let figure = |pointer: &str| s.pointer(pointer).and_then(Value::as_u64);
            Some(ReceiverSession {
                sensor_id: id.to_string(),
                packets: figure("/written/packets")?,
                bytes: figure("/written/bytes")?,
                batches: figure("/received/batches")?,
                raw_bytes: figure("/received/raw_bytes")?,
                wire_bytes: figure("/received/wire_bytes")?,
                line: s.to_string(),
            })
        })
        .collect()
}

/// Packets the receiver's exit summary says it wrote for `sensor_id`, over all of that
/// sensor's sessions.
pub fn receiver_packets_of(summary: &Value, sensor_id: &str) -> Result<u64> {
    let sessions: Vec<_> = receiver_sessions(summary)
        .into_iter()
        .filter(|s| s.sensor_id == sensor_id)
        .collect();
    if sessions.is_empty() {
        bail!("no session of sensor {sensor_id:?} in the receiver's summary:\n{summary:#}");
    }
    Ok(sessions.iter().map(|s| s.packets).sum())
}

/// A process's peak resident memory in KiB (`VmHWM` in /proc/<pid>/status).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}

/// The records of a classic pcap file that a killed writer may have left with a partial
/// last record: the complete records, as tcpdump reads them, and the number of bytes after
/// the last complete one. A file too short for its header holds no records.
pub fn complete_records(file: &Path) -> Result<(Vec<Record>, usize)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() < 24 {
        return Ok((Vec::new(), bytes.len()));
    }
    let big_endian = match &bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => bail!("{} is not a classic pcap file", file.display()),
    };
    let mut end = 24;
    while let Some(header) = bytes.get(end..end + 16) {
        let len: [u8; 4] = header[8..12].try_into().expect("4 bytes");
        let captured = if big_endian {
            u32::from_be_bytes(len)
        } else {
            u32::from_le_bytes(len)
        } as usize;
        if end + 16 + captured > bytes.len() {
            break;
        }
        end += 16 + captured;
    }
    let scratch = Scratch::new("complete")?;
    let copy = scratch.join("complete.pcap");
    std::fs::write(&copy, &bytes[..end])?;
    Ok((tcpdump_records(&copy, "")?, bytes.len() - end))
}

/// One interface of a pcapng file with the packets recorded on it, in file order.
#[derive(Debug, Clone)]
pub struct PcapngInterface {
    /// `if_name` (the receiver writes `HOST/IFACE`).
    pub name: String,
    /// `if_description` (the receiver writes `sensor <id> on <host> (<os>)`).
    pub description: String,
    pub records: Vec<Record>,
}

/// Every interface of a pcapng file (Interface Description Blocks in order, over all
/// sections) with its Enhanced Packet Blocks, read directly: the receiver's pcapng output
/// tells each sensor's packets apart, which tcpdump's pcap rewrite cannot.
pub fn pcapng_interfaces(file: &Path) -> Result<Vec<PcapngInterface>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut interfaces: Vec<(PcapngInterface, u8)> = Vec::new();
    let mut section_base = 0;
    let mut big_endian = false;
    let mut at = 0;
    while at < bytes.len() {
        let kind = u32::from_le_bytes(
            bytes
                .get(at..at + 4)
                .context("truncated pcapng block")?
                .try_into()
                .expect("4 bytes"),
        );
        if kind == 0x0A0D_0D0A {
            big_endian = match bytes.get(at + 8..at + 12) {
                Some([0x4d, 0x3c, 0x2b, 0x1a]) => false,
                Some([0x1a, 0x2b, 0x3c, 0x4d]) => true,
                _ => bail!("bad pcapng byte-order magic at offset {at}"),
            };
            section_base = interfaces.len();
        }
        let word = |off: usize| -> Result<u32> {
            let b: [u8; 4] = bytes
                .get(off..off + 4)
                .context("truncated pcapng block")?
                .try_into()
                .expect("4 bytes");
            Ok(if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        let len = word(at + 4)? as usize;
        if len < 12 || len & 3 != 0 || at + len > bytes.len() {
            bail!("bad pcapng block length {len} at offset {at}");
        }
        let body = &bytes[at + 8..at + len - 4];
        let half = |b: &[u8]| -> u16 {
            let b: [u8; 2] = b.try_into().expect("2 bytes");
            if big_endian {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }
        };
        let full = |b: &[u8]| -> u32 {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        match word(at)? {
            // Interface Description Block: link type, reserved, snap length, options.
            1 => {
                let mut iface = PcapngInterface {
                    name: String::new(),
                    description: String::new(),
                    records: Vec::new(),
                };
                let mut resolution = 6;
                let mut opt = 8;
                while opt + 4 <= body.len() {
                    let (code, olen) = (half(&body[opt..opt + 2]), half(&body[opt + 2..opt + 4]));
                    let value = body
                        .get(opt + 4..opt + 4 + olen as usize)
                        .context("truncated pcapng option")?;
                    match code {
                        0 => break,
                        2 => iface.name = String::from_utf8_lossy(value).into_owned(),
                        3 => iface.description = String::from_utf8_lossy(value).into_owned(),
                        9 => resolution = *value.first().context("empty if_tsresol")?,
                        _ => {}
                    }
                    opt += 4 + (olen as usize).div_ceil(4) * 4;
                }
                interfaces.push((iface, resolution));
            }
            // Enhanced Packet Block: interface, timestamp, lengths, data.
            6 => {
                if body.len() < 20 {
                    bail!("short enhanced packet block at offset {at}");
                }
                let id = section_base + full(&body[0..4]) as usize;
                let units = (u64::from(full(&body[4..8])) << 32) | u64::from(full(&body[8..12]));
                let (captured, original) = (full(&body[12..16]), full(&body[16..20]));
                let data = body
                    .get(20..20 + captured as usize)
                    .context("truncated packet data")?;
                let (iface, resolution) = interfaces
                    .get_mut(id)
                    .with_context(|| format!("packet of undeclared interface {id}"))?;
                let timestamp_ns = match *resolution {
                    r if r & 0x80 != 0 => {
                        (u128::from(units) * 1_000_000_000) >> u32::from(r & 0x7f)
                    }
                    r if r <= 9 => u128::from(units) * 10u128.pow(9 - u32::from(r)),
                    r => u128::from(units) / 10u128.pow(u32::from(r) - 9),
                };
                iface.records.push(Record {
                    timestamp_ns,
                    original_len: original,
                    data: data.to_vec(),
                });
            }
            _ => {}
        }
        at += len;
    }
    Ok(interfaces.into_iter().map(|(i, _)| i).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pcapng and partial-pcap readers agree with tcpdump on the corpus.
    #[test]
    fn own_readers_agree_with_tcpdump() {
        let corpus = crate::corpus::pcap();
        let expected = tcpdump_records(&corpus, "").unwrap();
        let dir = Scratch::new("readers").unwrap();

        // Two files, so two interfaces, merged by mergecap into one pcapng.
        let (a, b, merged) = (dir.join("a.pcap"), dir.join("b.pcap"), dir.join("m.pcapng"));
        let arg = |p: &PathBuf| p.to_string_lossy().into_owned();
        let corpus_arg = arg(&corpus);
        run("editcap", &["-r", &corpus_arg, &arg(&a), "1-100"]).unwrap();
        let rest = format!("101-{}", crate::corpus::PACKETS);
        run("editcap", &["-r", &corpus_arg, &arg(&b), &rest]).unwrap();
        run(
            "mergecap",
            &[
                "-a",
                "-F",
                "pcapng",
                "-w",
                &arg(&merged),
                &arg(&a),
                &arg(&b),
            ],
        )
        .unwrap();
        let interfaces = pcapng_interfaces(&merged).unwrap();
        let counts: Vec<usize> = interfaces.iter().map(|i| i.records.len()).collect();
        let all: Vec<Record> = interfaces.into_iter().flat_map(|i| i.records).collect();
        assert_eq!(all.len(), expected.len(), "{counts:?}");
        assert!(all == expected, "{}", first_difference(&expected, &all));

        // A pcap cut in the middle of a record: the records before the cut.
        let bytes = std::fs::read(&corpus).unwrap();
        let cut = dir.join("cut.pcap");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        let (records, tail) = complete_records(&cut).unwrap();
        assert_eq!(records.len(), expected.len() - 1);
        assert_eq!(records[..], expected[..expected.len() - 1]);
        assert!(tail > 0);
        let (records, tail) = complete_records(&corpus).unwrap();
        assert_eq!((records.len(), tail), (expected.len(), 0));
    }
}
