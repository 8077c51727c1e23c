//! A fleet of receivers as the several-receiver tests set it up: one CA that signed each
//! receiver's certificate and one token file they all share, so that every sensor has the
//! same `--ca` and `--token-file`; sensors given every receiver, and where each went.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::capstream::Scratch;
use crate::prometheus::{count, scrape};
use crate::{run, wait_until, workspace_bin, Netns, Proc, SummaryFile};

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `receiver certs init` `receivers` times in one directory: one CA, and a certificate of
/// its own (for 127.0.0.1 and localhost) for each receiver; returns the CA's path and each
/// receiver's certificate and key.
pub fn fleet_pki(dir: &Scratch, receivers: usize) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    let pki = dir.join("pki");
    let mut issued = Vec::new();
    for j in 0..receivers {
        run(
            &arg(&workspace_bin("receiver")),
            &["certs", "init", "--dir", &arg(&pki)],
        )
        .unwrap();
        let (cert, key) = (
            dir.join(&format!("rx{j}.crt")),
            dir.join(&format!("rx{j}.key")),
        );
        std::fs::copy(pki.join("receiver.crt"), &cert).unwrap();
        std::fs::copy(pki.join("receiver.key"), &key).unwrap();
        issued.push((cert, key));
    }
    (pki.join("ca.crt"), issued)
}

/// A token file every receiver and sensor shares (mode 0600).
pub fn shared_token(dir: &Scratch) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("token");
    let token: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
        .collect();
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `sensor <args> --summary-json ...` started inside `ns` (not waited for).
pub fn sensor_in(ns: &Netns, args: &[&str]) -> Proc {
    let summary = SummaryFile::new("sensor").unwrap();
    let summary_arg = summary.arg();
    let mut argv = ns.command(&arg(&workspace_bin("sensor")));
    argv.extend(
        args.iter()
            .chain(&["--summary-json", summary_arg.as_str()])
            .map(|a| a.to_string()),
    );
    Proc::start("sensor", &argv, Stdio::null())
        .unwrap()
        .with_summary(summary)
}

/// What a sensor says of its receivers: its order, and the one it connected to first.
pub struct Placement {
    pub order: Vec<String>,
    pub first: String,
}

pub fn placement(sensor: &mut Proc, id: &str) -> Placement {
    let intro = format!("receivers in the order of sensor id \"{id}\": ");
    sensor
        .wait_for("connected to receiver ", Duration::from_secs(20))
        .unwrap();
    let log = sensor.stderr();
    let order = log
        .lines()
        .find_map(|l| l.split_once(&intro).map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no order in the log of {id}:\n{log}"));
    let first = log
        .split("connected to receiver ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    Placement {
        order: order.split(", ").map(str::to_string).collect(),
        first,
    }
}

/// The order the README promises: receivers by descending first 8 bytes (big-endian) of
/// SHA-256(sensor id, 0, IP:PORT).
pub fn documented_order(id: &str, receivers: &[String]) -> Vec<String> {
    let weight = |r: &String| {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[id.as_bytes(), &[0], r.as_bytes()].concat(),
        );
        u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap())
    };
    let mut order = receivers.to_vec();
    order.sort_by_key(|r| std::cmp::Reverse(weight(r)));
    order
}

/// The requirement: from a receiver's kill to the first batch of each of its
/// sensors that the next receiver writes.
pub const FAILOVER_WITHIN: Duration = Duration::from_secs(10);

/// The receiver (of `receivers`, by address) the most sensors went to first, the first such
/// on a tie, and those sensors (indexes into `placements`).
pub fn busiest(placements: &[Placement], receivers: &[String]) -> (usize, Vec<usize>) {
    let on = |j: usize| -> Vec<usize> {
        (0..placements.len())
            .filter(|i| placements[*i].first == receivers[j])
            .collect()
    };
    let spread: Vec<usize> = (0..receivers.len()).map(|j| on(j).len()).collect();
    eprintln!(
        "spread of {} sensors over the receivers: {spread:?}",
        placements.len()
    );
    let victim = (0..receivers.len())
        .max_by_key(|j| (spread[*j], receivers.len() - j))
        .expect("receivers");
    (victim, on(victim))
}

/// Checks that sensor `id`, whose receiver was killed at `killed_at`, had a batch written
/// by `next` (its Prometheus endpoint `metrics`, inside `ns`) within [`FAILOVER_WITHIN`].
pub fn assert_failed_over_in_time(
    ns: &Netns,
    sensor: &Proc,
    id: &str,
    next: &str,
    metrics: &str,
    killed_at: Instant,
) {
    let written = wait_until(Duration::from_secs(30), || {
        scrape(Some(ns), metrics).is_ok_and(|text| {
            count(
                &text,
                "capstream_receiver_packets_written_total",
                &[("sensor", id)],
            ) > 0
        })
    });
    let took = killed_at.elapsed();
    assert!(written, "{id} never reached {next}:\n{}", sensor.stderr());
    eprintln!("{id}: from the kill to its first batch written by {next}: {took:.1?}");
    assert!(
        took <= FAILOVER_WITHIN,
        "{id} took {took:?} to fail over to {next}:\n{}",
        sensor.stderr()
    );
}

/// Where receiver `j` of a fleet serves its metrics.
pub fn receiver_metrics(j: usize) -> String {
    format!("127.0.0.1:{}", 9441 + j)
}

/// What receiver `j` of a fleet is started with besides its output: its own certificate
/// and key (of [`fleet_pki`]'s `issued`), the shared token, and its metrics endpoint
/// ([`receiver_metrics`]).
pub fn receiver_options(issued: &[(PathBuf, PathBuf)], token: &Path, j: usize) -> Vec<String> {
    let (cert, key) = &issued[j];
    vec![
        "--cert".into(),
        arg(cert),
        "--key".into(),
        arg(key),
        "--token-file".into(),
        arg(token),
        "--metrics".into(),
        receiver_metrics(j),
    ]
}
