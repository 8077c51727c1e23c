//! Helpers for the capture lake's tests (`receiver --lake`, `receiver query`): running a
//! query, writing the expected union of references as a pcap for tcpdump to filter, and
//! comparing answers in time order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::capstream::{first_difference, tcpdump_records, Record};
use crate::Netns;

/// Runs `receiver query --lake LAKE -w OUT ARGS` and returns the answer's records, with
/// its stderr; fails unless it exits 0.
pub fn query(lake: &str, out: &Path, args: &[&str]) -> Result<(Vec<Record>, String)> {
    query_in(None, &[], lake, out, args)
}

/// [`query`] inside `ns`, with environment variables set (the S3 credentials).
pub fn query_in(
    ns: Option<&Netns>,
    env: &[(String, String)],
    lake: &str,
    out: &Path,
    args: &[&str],
) -> Result<(Vec<Record>, String)> {
    let stderr = query_answer(ns, env, lake, out, args)?;
    Ok((tcpdump_records(out, "")?, stderr))
}

/// Runs `receiver query` as [`query_in`] does and returns its stderr, leaving the answer
/// in `out` unread (tcpdump reads no pcapng without an interface, as an answer of keys
/// only is).
pub fn query_answer(
    ns: Option<&Netns>,
    env: &[(String, String)],
    lake: &str,
    out: &Path,
    args: &[&str],
) -> Result<String> {
    let receiver = crate::workspace_bin("receiver")
        .to_string_lossy()
        .into_owned();
    let argv = match ns {
        Some(ns) => ns.command(&receiver),
        None => vec![receiver],
    };
    let output = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .args(["query", "--lake", lake, "-w"])
        .arg(out)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!("receiver query {args:?} failed: {stderr}");
    }
    Ok(stderr)
}

/// Every file of the lake whose name ends in `suffix`.
pub fn lake_files(lake: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![lake.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Writes `records` as a nanosecond Ethernet pcap, for tcpdump to read.
pub fn write_pcap(records: &[Record], path: &Path) -> Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_3c4du32.to_ne_bytes());
    out.extend_from_slice(&2u16.to_ne_bytes());
    out.extend_from_slice(&4u16.to_ne_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&262_144u32.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes());
    for r in records {
        let secs = u32::try_from(r.timestamp_ns / 1_000_000_000).context("timestamp")?;
        out.extend_from_slice(&secs.to_ne_bytes());
        out.extend_from_slice(&((r.timestamp_ns % 1_000_000_000) as u32).to_ne_bytes());
        out.extend_from_slice(&(r.data.len() as u32).to_ne_bytes());
        out.extend_from_slice(&r.original_len.to_ne_bytes());
        out.extend_from_slice(&r.data);
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// `records` in time order; packets of equal time (from different sensors, whose order
/// between them nothing fixes) by their bytes.
pub fn in_time_order(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_by(|a, b| {
        (a.timestamp_ns, &a.data, a.original_len).cmp(&(b.timestamp_ns, &b.data, b.original_len))
    });
    records
}

/// Checks that `got` is in time order and holds exactly `expected` (in time order).
pub fn assert_same_in_time_order(expected: &[Record], got: &[Record], what: &str) {
    if let Some(i) = got
        .windows(2)
        .position(|w| w[1].timestamp_ns < w[0].timestamp_ns)
    {
        panic!("{what}: packet {} is older than packet {i}", i + 1);
    }
    let got = in_time_order(got.to_vec());
    assert!(
        got == expected,
        "{what}: {}",
        first_difference(expected, &got)
    );
}

/// DuckDB from PyPI, the independent reader of the lake's index (`cargo xtask setup`).
pub const DUCKDB_REQUIREMENT: &str = "duckdb==2.0.1";

/// The virtualenv holding DuckDB.
pub fn duckdb_venv() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/capstream/duckdb")
}

/// True when the virtualenv has DuckDB.
pub fn duckdb_installed() -> bool {
    let python = duckdb_venv().join("bin/python");
    std::process::Command::new(python)
        .args(["-c", "import duckdb"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The rows of `sql` as DuckDB answers it, each a list of its values as text.
pub fn duckdb_rows(sql: &str) -> Result<Vec<Vec<String>>> {
    let python = duckdb_venv().join("bin/python");
    let script = "import duckdb, sys\nfor row in duckdb.sql(sys.argv[1]).fetchall():\n    \
                  print('\\t'.join(str(v) for v in row))\n";
    let output = std::process::Command::new(&python)
        .args(["-c", script, sql])
        .output()
        .with_context(|| format!("{} (run `cargo xtask setup`)", python.display()))?;
    if !output.status.success() {
        bail!("duckdb: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.split('\t').map(String::from).collect())
        .collect())
}
