//! Starting the receiver and sensors as the built binaries, and reading their output with
//! the reference tools.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{run, workspace_bin, Netns, Proc};

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
    let program = program.to_string_lossy().into_owned();
    let mut v = match ns {
        Some(ns) => ns.command(&program),
        None => vec![program],
    };
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// A running receiver on 127.0.0.1 (inside `ns` when given).
pub struct Receiver {
    pub proc: Proc,
    pub addr: String,
    pub cert: PathBuf,
    pub fingerprint: String,
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
        let addr = format!("127.0.0.1:{port}");
        let state_arg = state.to_string_lossy().into_owned();
        let mut all = vec!["--listen", &addr, "--state-dir", &state_arg];
        all.extend_from_slice(args);
        let argv = argv(ns, &workspace_bin("receiver"), &all);
        let mut proc = Proc::start("receiver", &argv, stdout)?;
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
        Ok(Self {
            proc,
            addr,
            cert: state.join("receiver.crt"),
            fingerprint,
        })
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

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.stop()
    }
}

/// Starts `sensor --receiver <addr> --ca <cert> <args>` and waits for its `ready:` line.
pub fn start_sensor(ns: Option<&Netns>, receiver: &Receiver, args: &[&str]) -> Result<Proc> {
    let cert = receiver.cert.to_string_lossy().into_owned();
    let mut all = vec!["--receiver", &receiver.addr, "--ca", &cert];
    all.extend_from_slice(args);
    let argv = argv(ns, &workspace_bin("sensor"), &all);
    let mut proc = Proc::start("sensor", &argv, Stdio::null())?;
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

/// The number right after the last `label` in a log, e.g. ", dropped " or
/// "kernel buffer full: " in the sensor's exit summary.
pub fn summary_figure(log: &str, label: &str) -> Result<u64> {
    let at = log
        .rfind(label)
        .with_context(|| format!("no {label:?} in:\n{log}"))?;
    log[at + label.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .with_context(|| format!("no number after {label:?} in:\n{log}"))
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
