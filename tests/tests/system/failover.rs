//! Several receivers: four sensors spread over three by rendezvous hashing of their ids, one
//! receiver killed (`kill -9`) halfway through the replay, its sensors failing over to the
//! next in their order within 10 s, and every packet of every sensor in the union of the
//! three outputs (duplicates allowed: a batch written but not acknowledged before the kill
//! is sent again to the next receiver; counted and reported).
//!
//! The receivers share what authentication needs, as a fleet does: one token file, and a CA
//! (`receiver certs init`) that signed each receiver's own certificate; every sensor has
//! the same `--ca` and `--token-file`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testbed::capstream::{
    assert_refused, pcapng_interfaces, start_tcpdump, stop_reference, Receiver, Record, Scratch,
};
use testbed::fleet::{
    assert_failed_over_in_time, busiest, documented_order, fleet_pki, placement, receiver_metrics,
    receiver_options, sensor_in, shared_token,
};
use testbed::prometheus::{count, scrape, sum};
use testbed::{corpus, require_root, run, wait_until, Lab, Netns, Proc};

const RECEIVERS: usize = 3;
const SENSORS: usize = 4;
/// Packets per second each sensor's link is replayed at: the corpus lasts about 20 s.
const PPS: u32 = 400;
/// Into the replay when a receiver is killed.
const KILL_AFTER: Duration = Duration::from_secs(9);

/// Where sensor `i` serves its metrics, in the capture namespace.
fn sensor_metrics(i: usize) -> String {
    format!("127.0.0.1:{}", 9451 + i)
}

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The whole blocks of a pcapng file that a `kill -9` may have cut short, in a copy.
fn whole_blocks(file: &Path, dir: &Scratch) -> PathBuf {
    let bytes = std::fs::read(file).unwrap();
    let mut end = 0;
    while let Some(len) = bytes.get(end + 4..end + 8) {
        // The receiver writes pcapng in this host's (little-endian) order.
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        if len < 12 || end + len > bytes.len() {
            break;
        }
        end += len;
    }
    let copy = dir.join("whole-blocks.pcapng");
    std::fs::write(&copy, &bytes[..end]).unwrap();
    copy
}

/// Every packet of each capture interface (`cap0`...), over all the outputs.
fn packets_by_interface(outputs: &[PathBuf]) -> HashMap<String, Vec<Record>> {
    let mut by_interface: HashMap<String, Vec<Record>> = HashMap::new();
    for out in outputs {
        for interface in pcapng_interfaces(out).unwrap() {
            let iface = interface
                .name
                .rsplit_once('/')
                .map_or(interface.name.clone(), |(_, i)| i.to_string());
            by_interface
                .entry(iface)
                .or_default()
                .extend(interface.records);
        }
    }
    by_interface
}

/// `(missing, duplicates, unexpected)`: reference packets not in `got`, packets of `got`
/// there more often than in the reference, and packets the reference never had.
fn union_against(reference: &[Record], got: &[Record]) -> (usize, usize, usize) {
    // (Record has no Hash: its fields are the key.)
    let key = |r: &Record| (r.timestamp_ns, r.original_len, r.data.clone());
    let mut wanted: HashMap<_, usize> = HashMap::new();
    for r in reference {
        *wanted.entry(key(r)).or_default() += 1;
    }
    let mut seen: HashMap<_, usize> = HashMap::new();
    for r in got {
        *seen.entry(key(r)).or_default() += 1;
    }
    let (mut missing, mut duplicates, mut unexpected) = (0, 0, 0);
    for (r, n) in &wanted {
        let have = seen.get(r).copied().unwrap_or(0);
        missing += n.saturating_sub(have);
        duplicates += have.saturating_sub(*n);
    }
    for (r, n) in &seen {
        if !wanted.contains_key(r) {
            unexpected += n;
        }
    }
    (missing, duplicates, unexpected)
}

#[test]
fn failover_a_killed_receivers_sensors_move_on_and_nothing_is_missing() {
    require_root();
    let lab = Lab::new(SENSORS).unwrap();
    let dir = Scratch::new("failover").unwrap();
    let (ca, issued) = fleet_pki(&dir, RECEIVERS);
    let token = shared_token(&dir);

    let mut receivers = Vec::new();
    let mut outputs = Vec::new();
    for j in 0..RECEIVERS {
        let out = dir.join(&format!("rx{j}.pcapng"));
        let mut args = vec!["--out".to_string(), arg(&out)];
        args.extend(receiver_options(&issued, &token, j));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let receiver = Receiver::start_listening(
            Some(&lab.cap),
            &dir.join(&format!("state{j}")),
            &format!("127.0.0.1:{}", 4441 + j),
            &args,
        )
        .unwrap();
        let metrics = receiver_metrics(j);
        receivers.push((receiver, metrics));
        outputs.push(out);
    }

    let references: Vec<PathBuf> = (0..SENSORS)
        .map(|i| dir.join(&format!("ref{i}.pcap")))
        .collect();
    let tcpdumps: Vec<Proc> = (0..SENSORS)
        .map(|i| start_tcpdump(&lab.cap, &lab.links[i].1, "", &[], &references[i]).unwrap())
        .collect();

    // Every sensor is given the receivers in the same order: each finds its own.
    let mut sensors = Vec::new();
    let mut placements = Vec::new();
    for i in 0..SENSORS {
        let id = format!("s{i}");
        let metrics = sensor_metrics(i);
        let mut sensor = sensor_in(
            &lab.cap,
            &[
                "--metrics",
                &metrics,
                "-i",
                &lab.links[i].1,
                "--sensor-id",
                &id,
                "--receiver",
                "127.0.0.1:4441",
                "--receiver",
                "127.0.0.1:4442",
                "--receiver",
                "127.0.0.1:4443",
                "--ca",
                &arg(&ca),
                "--token-file",
                &arg(&token),
            ],
        );
        sensor.wait_for("ready:", Duration::from_secs(20)).unwrap();
        let p = placement(&mut sensor, &id);
        // The sensor is on the first of its own order, the order the README documents.
        let all: Vec<String> = (0..RECEIVERS)
            .map(|j| format!("127.0.0.1:{}", 4441 + j))
            .collect();
        assert_eq!(p.order, documented_order(&id, &all), "{id}");
        assert_eq!(p.first, p.order[0], "{id}: {:?}", p.order);
        sensors.push(sensor);
        placements.push(p);
    }
    let addresses: Vec<String> = (0..RECEIVERS)
        .map(|j| format!("127.0.0.1:{}", 4441 + j))
        .collect();
    let (victim, moved) = busiest(&placements, &addresses);
    assert!(!moved.is_empty());

    let replays: Vec<_> = (0..SENSORS)
        .map(|i| {
            let gen = lab.gen.name.clone();
            let link = lab.links[i].0.clone();
            std::thread::spawn(move || {
                let pps = PPS.to_string();
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &gen,
                        "tcpreplay",
                        "-q",
                        "--pps",
                        &pps,
                        "-i",
                        &link,
                        &corpus::pcap_arg(),
                    ],
                )
            })
        })
        .collect();
    std::thread::sleep(KILL_AFTER);
    let killed_at = Instant::now();
    receivers[victim].0.proc.signal("KILL").unwrap();

    // Each of its sensors: the next receiver of its own order writes its packets.
    for i in &moved {
        let next = &placements[*i].order[1];
        let j = (0..RECEIVERS)
            .find(|j| *next == format!("127.0.0.1:{}", 4441 + j))
            .unwrap();
        let id = format!("s{i}");
        assert_failed_over_in_time(
            &lab.cap,
            &sensors[*i],
            &id,
            next,
            &receivers[j].1,
            killed_at,
        );
        let line = format!(
            "failover from receiver {} to {next}",
            placements[*i].order[0]
        );
        assert!(
            sensors[*i].stderr().contains(&line),
            "{}",
            sensors[*i].stderr()
        );
    }
    // The sensors' metrics say it: one failover each for those that moved, and which
    // receiver each is on now.
    for (i, p) in placements.iter().enumerate() {
        let moved_here = moved.contains(&i);
        let now_on = &p.order[usize::from(moved_here)];
        let said = wait_until(Duration::from_secs(5), || {
            scrape(Some(&lab.cap), &sensor_metrics(i)).is_ok_and(|text| {
                let on = |r: &str| sum(&text, "capstream_sensor_receiver", &[("receiver", r)]);
                count(&text, "capstream_sensor_failovers_total", &[]) == u64::from(moved_here)
                    && on(now_on) == Some(1.0)
                    && (!moved_here || on(&p.order[0]) == Some(0.0))
            })
        });
        assert!(
            said,
            "s{i}: {}",
            scrape(Some(&lab.cap), &sensor_metrics(i)).unwrap_or_default()
        );
    }

    for replay in replays {
        replay.join().unwrap().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    for (i, sensor) in sensors.iter_mut().enumerate() {
        sensor.stop().unwrap();
        let summary = sensor.summary().unwrap();
        let failovers = summary["failovers"].as_u64().unwrap();
        let expected = u64::from(moved.contains(&i));
        assert_eq!(failovers, expected, "s{i}: {summary:#}");
        let last = summary["receiver"].as_str().unwrap();
        let wanted = &placements[i].order[usize::from(moved.contains(&i))];
        assert_eq!(last, wanted, "s{i}: {summary:#}");
        let log = sensor.stderr();
        let session = log
            .lines()
            .find(|l| l.starts_with("summary: session "))
            .unwrap();
        assert!(
            session.contains(&format!("{failovers} failover(s)")) || failovers == 0,
            "{session}"
        );
    }
    let references: Vec<Vec<Record>> = tcpdumps
        .into_iter()
        .zip(&references)
        .map(|(tcpdump, file)| stop_reference(tcpdump, file))
        .collect();
    for (j, (receiver, _)) in receivers.iter_mut().enumerate() {
        if j != victim {
            receiver.stop().unwrap();
        }
    }

    let cut = Scratch::new("failover-cut").unwrap();
    let mut readable = outputs.clone();
    readable[victim] = whole_blocks(&outputs[victim], &cut);
    let got = packets_by_interface(&readable);
    let mut total_duplicates = 0;
    for (i, reference) in references.iter().enumerate() {
        assert!(
            reference.len() >= corpus::PACKETS,
            "s{i}: {}",
            reference.len()
        );
        let iface = &lab.links[i].1;
        let mine = got.get(iface).map_or(&[][..], Vec::as_slice);
        let (missing, duplicates, unexpected) = union_against(reference, mine);
        eprintln!(
            "s{i} ({iface}): {} reference packets, {} in the outputs: {missing} missing, \
             {duplicates} duplicates, {unexpected} unexpected",
            reference.len(),
            mine.len()
        );
        assert_eq!(missing, 0, "s{i}: packets missing from every output");
        assert_eq!(unexpected, 0, "s{i}: packets no reference has");
        total_duplicates += duplicates;
    }
    eprintln!(
        "duplicates over all outputs (allowed, for a lake query to drop): {total_duplicates}"
    );
}

/// `/etc/netns/<namespace>`, which `ip netns exec` shows as `/etc` (its `hosts`), removed
/// on drop.
struct NamespaceEtc(PathBuf);

impl Drop for NamespaceEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A name with three addresses is three receivers, in the sensor's hash order; with none
/// of them up, the sensor goes round them in that order, one per --failover-after, and a
/// fourth address the name gets meanwhile is taken in at the next failover.
#[test]
fn failover_a_name_of_several_addresses_is_several_receivers_followed_as_it_changes() {
    require_root();
    let ns = Netns::new("fodns").unwrap();
    let etc = NamespaceEtc(PathBuf::from("/etc/netns").join(&ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    let hosts = etc.0.join("hosts");
    let addresses = |n: u8| -> String {
        (1..=n)
            .map(|i| format!("127.0.0.{i} fleet.test\n"))
            .collect()
    };
    std::fs::write(&hosts, addresses(3)).unwrap();
    let dir = Scratch::new("failover-dns").unwrap();
    let (ca, _) = fleet_pki(&dir, RECEIVERS);

    let mut sensor = sensor_in(
        &ns,
        &[
            "--read",
            &corpus::pcap_arg(),
            "--sensor-id",
            "tap-1",
            "--receiver",
            "fleet.test:4433",
            "--ca",
            &arg(&ca),
            "--failover-after",
            "1s",
            "--give-up-after",
            "9s",
        ],
    );
    sensor
        .wait_for("receivers in the order", Duration::from_secs(20))
        .unwrap();
    // The answer changes: the next failover sees it.
    std::fs::write(&hosts, addresses(4)).unwrap();
    let three: Vec<String> = (1..=3).map(|i| format!("127.0.0.{i}:4433")).collect();
    let four: Vec<String> = (1..=4).map(|i| format!("127.0.0.{i}:4433")).collect();
    let status = sensor.wait(Duration::from_secs(40)).unwrap();
    let log = sensor.stderr();
    assert_eq!(
        status.code(),
        Some(1),
        "gave up after --give-up-after:
{log}"
    );
    let first = documented_order("tap-1", &three);
    assert!(
        log.contains(&format!(
            "receivers in the order of sensor id \"tap-1\": {}",
            first.join(", ")
        )),
        "{log}"
    );
    let moves: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| l.split_once("failover from receiver ").map(|(_, m)| m))
        .map(|m| {
            let mut words = m.split_whitespace();
            let from = words.next().unwrap().to_string();
            let to = words.nth(1).unwrap().trim_end_matches(':').to_string();
            (from, to)
        })
        .collect();
    assert!(
        moves.len() >= 5,
        "one failover a second:
{log}"
    );
    // The first leaves the most preferred for the next in the (new) order; each one after
    // goes on round the four.
    let second = documented_order("tap-1", &four);
    assert_eq!(moves[0].0, first[0], "{log}");
    for (from, to) in &moves {
        let at = second.iter().position(|a| a == from).unwrap();
        assert_eq!(to, &second[(at + 1) % second.len()], "{log}");
    }
    assert!(
        moves.iter().any(|(_, to)| to == "127.0.0.4:4433"),
        "the new address was never tried:\n{log}"
    );
    let summary = sensor.summary().unwrap();
    assert_eq!(
        summary["failovers"].as_u64(),
        Some(moves.len() as u64),
        "{summary:#}"
    );
}

#[test]
fn failover_a_bad_failover_time_is_refused() {
    for bad in ["0", "soon"] {
        assert_refused(
            "sensor",
            &[
                "-i",
                "lo",
                "--receiver",
                "127.0.0.1:4433",
                "--receiver",
                "127.0.0.1:4434",
                "--ca",
                "ca.crt",
                "--failover-after",
                bad,
            ],
            "--failover-after",
        );
    }
}
