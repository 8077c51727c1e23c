//! The capture lake: `receiver --lake DIR` writes pcapng segments with a Parquet index and
//! a manifest each; `receiver query` reads them back. Its answers are compared with what
//! tcpdump reads from the references, filter by filter; a receiver killed mid-stream
//! leaves nothing half-written in sight, and a segment whose index is lost is still read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    assert_refused, dev_filters, start_sensor, start_tcpdump, stop_reference, tcpdump_records,
    Receiver, Record, Scratch,
};
use testbed::lake::{assert_same_in_time_order, in_time_order, lake_files, query, write_pcap};
use testbed::seaweedfs::SeaweedFs;
use testbed::{corpus, require_root, Lab, Netns, Proc};

/// A directory for the lake, created.
fn lake_dir(dir: &Scratch) -> (PathBuf, String) {
    let lake = dir.join("lake");
    std::fs::create_dir_all(&lake).unwrap();
    let arg = lake.to_string_lossy().into_owned();
    (lake, arg)
}

/// `receiver --lake LAKE --receiver-name rx1 EXTRA` in `ns`, its state in `dir`.
fn lake_receiver(ns: &Netns, dir: &Scratch, lake_arg: &str, extra: &[&str]) -> Receiver {
    let mut args = vec!["--lake", lake_arg, "--receiver-name", "rx1"];
    args.extend_from_slice(extra);
    Receiver::start(Some(ns), &dir.join("state"), 4433, &args).unwrap()
}

/// The two sensors of [`SENSORS`] replay the corpus (`--read`), one its TCP packets and
/// one the rest, into a receiver writing a local lake in small segments; returns the lake
/// and each sensor's tcpdump reference.
fn two_sensor_lake(dir: &Scratch) -> (PathBuf, String, Vec<Vec<Record>>) {
    let ns = Netns::new("cslake").unwrap();
    let (lake, lake_arg) = lake_dir(dir);
    let mut receiver = lake_receiver(&ns, dir, &lake_arg, &["--segment-size", "256KiB"]);
    let corpus = corpus::pcap_arg();
    for (id, filter) in SENSORS {
        let mut sensor = start_sensor(
            Some(&ns),
            &receiver,
            &["--read", &corpus, "--sensor-id", id, "--bpf", filter],
        )
        .unwrap();
        let status = sensor.wait(Duration::from_secs(60)).unwrap();
        assert!(status.success(), "sensor {id}: {}", sensor.stderr());
    }
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(log.contains("segment(s) published"), "{log}");
    let segments = lake_files(&lake, ".manifest.json").len();
    assert!(
        segments > 2,
        "small segments: {segments} in the lake\n{log}"
    );
    let references = SENSORS
        .iter()
        .map(|(_, filter)| tcpdump_records(&corpus::pcap(), filter).unwrap())
        .collect();
    (lake, lake_arg, references)
}

/// The sensors of [`two_sensor_lake`] and the half of the corpus each sends.
const SENSORS: [(&str, &str); 2] = [("tcp-sensor", "tcp"), ("other-sensor", "not tcp")];

/// Querying the lake of [`two_sensor_lake`] for everything gives the union of the sensors'
/// tcpdump references in time order (bytes, lengths, ns timestamps); each dev filter gives
/// what `tcpdump -r` of that union gives with it; `--sensor` and `--list` name the sensors.
#[test]
fn local_lake_answers_as_tcpdump_for_every_dev_filter() {
    require_root();
    let dir = Scratch::new("lake").unwrap();
    let (_, lake_arg, references) = two_sensor_lake(&dir);
    let union = in_time_order(references.concat());
    assert_eq!(union.len(), corpus::PACKETS);
    let out = dir.join("answer.pcapng");
    let (got, stderr) = query(&lake_arg, &out, &["--stats"]).unwrap();
    assert_same_in_time_order(&union, &got, "everything");
    assert!(
        stderr.contains(&format!(
            "{} packet(s) matched, 0 duplicate",
            corpus::PACKETS
        )),
        "{stderr}"
    );
    // One interface block per sensor interface, however many segments.
    let interfaces = testbed::capstream::pcapng_interfaces(&out).unwrap();
    assert_eq!(interfaces.len(), 2, "{interfaces:?}");

    let union_file = dir.join("union.pcap");
    write_pcap(&union, &union_file).unwrap();
    // The dev filters, and conjunctions of hosts and ports the index prunes by.
    let pruned = [
        "host 192.0.0.1 and udp port 53",
        "src host 140.211.9.206",
        "dst port 8080",
        "host 2605:bc80:3010:104::8cd3:9ce and port 53",
        "tcp and dst port 53 and host 192.168.1.11",
        "src port 53 && ip",
    ];
    let filters = dev_filters().unwrap();
    for filter in filters.iter().map(String::as_str).chain(pruned) {
        let expected = in_time_order(tcpdump_records(&union_file, filter).unwrap());
        let mut args = vec!["--format", "pcap", "--stats"];
        if !filter.is_empty() {
            args.push(filter);
        }
        let (got, stderr) = query(&lake_arg, &dir.join("filtered.pcap"), &args).unwrap();
        assert!(!expected.is_empty(), "{filter}");
        assert_same_in_time_order(&expected, &got, &format!("filter {filter:?}"));
        // A host or port the index knows: a small part of the lake is fetched.
        if pruned.contains(&filter) {
            let fetched = number_before(&stderr, " of ");
            let total = number_before(&stderr, " bytes fetched");
            assert!(fetched * 4 < total, "{filter}: {stderr}");
        }
    }

    let (got, _) = query(&lake_arg, &out, &["--sensor", "tcp-sensor"]).unwrap();
    assert_same_in_time_order(&in_time_order(references[0].clone()), &got, "--sensor");
    let list = std::process::Command::new(testbed::workspace_bin("receiver"))
        .args(["query", "--lake", &lake_arg, "--list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("sensor tcp-sensor") && list.contains("sensor other-sensor"),
        "{list}"
    );
}

/// DuckDB, an independent Parquet reader, reads the lake's index: its packet counts per
/// destination port equal tshark's over the same segments (the transport header right
/// after the outermost IP header, as the index records it; fragments not reassembled).
#[test]
fn duckdb_reads_the_index_as_tshark_reads_the_segments() {
    require_root();
    let dir = Scratch::new("lakeduck").unwrap();
    let (lake, lake_arg, _) = two_sensor_lake(&dir);
    let sql = format!(
        "SELECT dst_port, count(*) FROM read_parquet('{lake_arg}/**/*.parquet') \
         WHERE dst_port IS NOT NULL GROUP BY 1 ORDER BY 1"
    );
    let duckdb = testbed::lake::duckdb_rows(&sql).unwrap();
    let mut tshark: BTreeMap<u64, u64> = BTreeMap::new();
    for segment in lake_files(&lake, ".pcapng") {
        let segment = segment.to_string_lossy().into_owned();
        let fields = testbed::run(
            "tshark",
            &[
                "-r",
                &segment,
                "-n",
                "-o",
                "ip.defragment:FALSE",
                "-o",
                "ipv6.defragment:FALSE",
                "-T",
                "fields",
                "-E",
                "occurrence=f",
                "-e",
                "frame.protocols",
                "-e",
                "tcp.dstport",
                "-e",
                "udp.dstport",
                "-e",
                "sctp.dstport",
            ],
        )
        .unwrap();
        for line in fields.lines() {
            if let Some(port) = outer_transport_port(line) {
                *tshark.entry(port).or_default() += 1;
            }
        }
    }
    let duckdb: BTreeMap<u64, u64> = duckdb
        .iter()
        .map(|row| (row[0].parse().unwrap(), row[1].parse().unwrap()))
        .collect();
    assert!(duckdb.len() > 20, "{duckdb:?}");
    assert_eq!(
        duckdb, tshark,
        "per-port packet counts: DuckDB (left), tshark (right)"
    );
}

/// The destination port of a tshark line (protocols, tcp, udp and sctp ports) when the
/// transport header follows the outermost IP header of an Ethernet frame (VLAN tags and
/// IPv6 extension headers aside), as the lake's index reads packets.
fn outer_transport_port(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split('\t').collect();
    let mut protocols = fields.first()?.split(':').peekable();
    (protocols.next()? == "eth").then_some(())?;
    loop {
        match protocols.next()? {
            "ethertype" | "vlan" => continue,
            "ip" | "ipv6" => break,
            _ => return None,
        }
    }
    while protocols.peek()?.starts_with("ipv6.") {
        protocols.next();
    }
    let column = match protocols.next()? {
        "tcp" => 1,
        "udp" => 2,
        "sctp" => 3,
        _ => return None,
    };
    fields.get(column)?.parse().ok()
}

/// Bad input to `receiver query` and to `receiver --lake`: one line, exit 2.
#[test]
fn lake_bad_input_is_one_line_and_exit_2() {
    let dir = Scratch::new("lakebad").unwrap();
    let (_, lake) = lake_dir(&dir);
    let out = dir.join("out.pcapng").to_string_lossy().into_owned();
    let a_file = dir.join("not-a-dir");
    std::fs::write(&a_file, b"x").unwrap();
    let a_file = a_file.to_string_lossy().into_owned();
    let q = |extra: &[&str]| {
        let mut args = vec!["query", "-w", &out];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let state = dir.join("state").to_string_lossy().into_owned();
    let r = |extra: &[&str]| {
        let mut args = vec!["--state-dir", &state];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (q(&["--lake", "ftp://bucket/x"]), "use a directory or s3://"),
        (q(&["--lake", "s3://"]), "no bucket name"),
        (q(&["--lake", "/nonexistent/lake"]), "cannot read"),
        (q(&["--lake", &a_file]), "cannot read"),
        (
            q(&["--lake", &lake, "--from", "yesterday"]),
            "malformed time",
        ),
        (q(&["--lake", &lake, "--from", "10:61"]), "malformed time"),
        (
            q(&[
                "--lake",
                &lake,
                "--from",
                "2026-12-05T10:00:00Z",
                "--to",
                "09:00",
            ]),
            "is before --from",
        ),
        (q(&["--lake", &lake, "tcp", "port"]), "bad filter"),
        (
            q(&["--lake", &lake, "host", "nosuchhost.invalid"]),
            "bad filter",
        ),
        (
            r(&["--lake", &lake, "--format", "pcap"]),
            "--format applies to --out",
        ),
        (r(&["--lake", "ftp://x"]), "use a directory or s3://"),
        (r(&["--lake", "/nonexistent/lake"]), "cannot read"),
        (r(&["--segment-size", "1MiB"]), "--lake"),
        (r(&["--lake", &lake, "--lake-keep", "7x"]), "--lake-keep"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused("receiver", &args, needle);
    }
    assert!(
        !Path::new(&state).exists(),
        "a refused start created its state directory"
    );
}

/// A `--mode pcap` sensor on the lab's capture end into `receiver`, tcpdump beside it.
fn sensor_beside_tcpdump(lab: &Lab, receiver: &Receiver, reference: &Path) -> (Proc, Proc) {
    let iface = lab.links[0].1.as_str();
    let args = ["--iface", iface, "--mode", "pcap", "--sensor-id", "edge"];
    let sensor = start_sensor(Some(&lab.cap), receiver, &args).unwrap();
    let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], reference).unwrap();
    (sensor, tcpdump)
}

/// The receiver is killed (SIGKILL) while it closes segments every few hundred packets:
/// what a query sees meanwhile is whole (no warning, every packet one of the reference's);
/// a segment file without its manifest stays invisible; the receiver started again
/// publishes what it had staged, and the lake then holds tcpdump's capture exactly, each
/// packet once (the resent batches dropped by their keys). A segment whose index is
/// missing or corrupt is then read whole, with a warning naming it, and the answer is
/// still exact.
#[test]
fn lake_survives_a_receiver_killed_mid_commit() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("lakekill").unwrap();
    let (lake, lake_arg) = lake_dir(&dir);
    let state = dir.join("state");
    let args = [
        "--lake",
        &lake_arg,
        "--receiver-name",
        "rx1",
        "--segment-size",
        "64KiB",
        "--segment-time",
        "1s",
    ];
    let mut killed = Receiver::start(Some(&lab.cap), &state, 4433, &args).unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let (mut sensor, tcpdump) = sensor_beside_tcpdump(&lab, &killed, &reference_file);
    // 7907 frames at 900 per second: about 9 s.
    let corpus = corpus::pcap_arg();
    let mut argv = lab.gen.command("tcpreplay");
    for arg in ["-q", "--pps", "900", "-i", &lab.links[0].0, &corpus] {
        argv.push(arg.to_string());
    }
    let mut replay = Proc::start("tcpreplay", &argv, Stdio::null()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    killed.proc.signal("KILL").unwrap();
    killed.proc.wait(Duration::from_secs(10)).unwrap();

    // Meanwhile: only whole segments are in sight.
    let during = dir.join("during.pcapng");
    let (seen, stderr) = query(&lake_arg, &during, &[]).unwrap();
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(!seen.is_empty(), "no segment was published before the kill");
    // A segment without its manifest (as a crash between the two would leave) is invisible.
    let segment = lake_files(&lake, ".pcapng").remove(0);
    let orphan = segment.with_file_name("rx1-1.pcapng");
    std::fs::copy(&segment, &orphan).unwrap();
    let (again, _) = query(&lake_arg, &during, &[]).unwrap();
    assert_eq!(
        again.len(),
        seen.len(),
        "a segment without manifest was read"
    );

    let mut receiver = Receiver::start(Some(&lab.cap), &state, 4433, &args).unwrap();
    sensor
        .wait_for("reconnected", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", receiver.proc.stderr()));
    replay.wait(Duration::from_secs(120)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let expected = stop_reference(tcpdump, &reference_file);
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(log.contains("staged by an earlier run"), "{log}");
    assert_eq!(
        expected.len(),
        corpus::PACKETS,
        "tcpdump saw the whole replay"
    );
    let expected = in_time_order(expected);
    for r in &seen {
        assert!(
            expected
                .binary_search_by(|e| (e.timestamp_ns, &e.data).cmp(&(r.timestamp_ns, &r.data)))
                .is_ok(),
            "seen during the outage but not captured: {r}"
        );
    }
    let out = dir.join("after.pcapng");
    let (got, stderr) = query(&lake_arg, &out, &["--stats"]).unwrap();
    assert_same_in_time_order(&expected, &got, "after the restart");
    eprintln!("{stderr}");

    // Indexes lost or damaged: those segments are read whole, each named once.
    let indexes = lake_files(&lake, ".parquet");
    assert!(indexes.len() >= 2);
    std::fs::remove_file(&indexes[0]).unwrap();
    std::fs::write(&indexes[1], b"PAR1 not an index").unwrap();
    let (got, stderr) = query(&lake_arg, &out, &["--stats"]).unwrap();
    assert_same_in_time_order(&expected, &got, "with two indexes lost");
    for index in &indexes[..2] {
        let name = index.file_stem().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            stderr.matches(&name).count(),
            1,
            "one warning naming {name}:\n{stderr}"
        );
    }
    assert!(stderr.contains("2 scanned without index"), "{stderr}");
}

/// An S3 lake on a real SeaweedFS: two sensors capture the corpus replayed on their own
/// interfaces into one receiver closing segments every second; the receiver is killed
/// (SIGKILL) mid-stream and started again, and publishes what it had staged. A query over
/// S3 then gives the union of the sensors' tcpdump captures: 0 missing, 0 duplicated.
#[test]
fn s3_lake_on_seaweedfs_survives_a_receiver_killed_mid_stream() {
    require_root();
    let lab = Lab::new(2).unwrap();
    let store = SeaweedFs::start(Some(&lab.cap)).unwrap();
    store.create_bucket("captures").unwrap();
    let env = store.aws_env();
    let wrapper = store.env_command();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let dir = Scratch::new("lakes3").unwrap();
    let state = dir.join("state");
    let staging = dir.join("staging");
    let staging_arg = staging.to_string_lossy().into_owned();
    let lake = "s3://captures/prod";
    let args = [
        "--lake",
        lake,
        "--receiver-name",
        "rx1",
        "--lake-staging",
        &staging_arg,
        "--segment-size",
        "64KiB",
        "--segment-time",
        "1s",
    ];
    let start = || Receiver::start_through(Some(&lab.cap), &wrapper, &state, 4433, &args).unwrap();
    let mut killed = start();
    let corpus = corpus::pcap_arg();
    let mut captures = Vec::new();
    for (i, (gen, cap)) in lab.links.iter().enumerate() {
        let id = format!("edge-{i}");
        let sensor_args = ["--iface", cap, "--mode", "pcap", "--sensor-id", &id];
        let sensor = start_sensor(Some(&lab.cap), &killed, &sensor_args).unwrap();
        let reference = dir.join(&format!("tcpdump-{i}.pcap"));
        let tcpdump = start_tcpdump(&lab.cap, cap, "", &[], &reference).unwrap();
        let mut argv = lab.gen.command("tcpreplay");
        argv.extend(["-q", "--pps", "900", "-i", gen, &corpus].map(String::from));
        let replay = Proc::start("tcpreplay", &argv, Stdio::null()).unwrap();
        captures.push((sensor, tcpdump, reference, replay));
    }
    std::thread::sleep(Duration::from_secs(4));
    killed.proc.signal("KILL").unwrap();
    killed.proc.wait(Duration::from_secs(10)).unwrap();
    let mut receiver = start();
    let mut expected = Vec::new();
    let mut sensors = Vec::new();
    for (mut sensor, tcpdump, reference, mut replay) in captures {
        sensor
            .wait_for("reconnected", Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", receiver.proc.stderr()));
        replay.wait(Duration::from_secs(120)).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let captured = stop_reference(tcpdump, &reference);
        assert_eq!(
            captured.len(),
            corpus::PACKETS,
            "tcpdump saw the whole replay"
        );
        expected.extend(captured);
        sensors.push(sensor);
    }
    for sensor in &mut sensors {
        sensor.stop().unwrap();
    }
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    assert!(log.contains("staged by an earlier run"), "{log}");
    assert!(
        std::fs::read_dir(&staging).unwrap().next().is_none(),
        "staging left non-empty:\n{log}"
    );
    let out = dir.join("answer.pcapng");
    let (got, stderr) =
        testbed::lake::query_in(Some(&lab.cap), &env, lake, &out, &["--stats"]).unwrap();
    assert_same_in_time_order(&in_time_order(expected), &got, "the S3 lake");
    let segments = number_before(&stderr, " segment(s):");
    assert!(segments >= 8, "several segments per receiver run: {stderr}");
    eprintln!("{stderr}");
}

/// The number just before `label` in `text`.
fn number_before(text: &str, label: &str) -> u64 {
    let head = &text[..text.find(label).unwrap_or(0)];
    let digits: String = head
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().unwrap_or(0)
}

/// `--lake-keep BYTES` deletes the receiver's oldest whole segments (manifest, index and
/// segment) once the lake holds more: what stays is whole, and the newest segments.
#[test]
fn lake_keep_deletes_whole_old_segments() {
    require_root();
    let ns = Netns::new("cslakekeep").unwrap();
    let dir = Scratch::new("lakekeep").unwrap();
    let (lake, lake_arg) = lake_dir(&dir);
    let keep = ["--segment-size", "64KiB", "--lake-keep", "300KiB"];
    let mut receiver = lake_receiver(&ns, &dir, &lake_arg, &keep);
    let corpus = corpus::pcap_arg();
    let mut sensor = start_sensor(Some(&ns), &receiver, &["--read", &corpus]).unwrap();
    assert!(sensor.wait(Duration::from_secs(60)).unwrap().success());
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let manifests = lake_files(&lake, ".manifest.json");
    let (segments, indexes) = (lake_files(&lake, ".pcapng"), lake_files(&lake, ".parquet"));
    assert!(!manifests.is_empty(), "{log}");
    assert_eq!(segments.len(), manifests.len(), "whole segments only");
    assert_eq!(indexes.len(), manifests.len(), "whole segments only");
    let bytes: u64 = segments
        .iter()
        .chain(&indexes)
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(bytes <= 300 << 10, "{bytes} bytes kept\n{log}");
    assert!(!log.contains(" 0 deleted by --lake-keep"), "{log}");
    // What stays reads as the corpus's last packets.
    let (got, _) = query(&lake_arg, &dir.join("kept.pcapng"), &[]).unwrap();
    let all = tcpdump_records(&corpus::pcap(), "").unwrap();
    assert!(!got.is_empty() && got.len() < all.len());
    let tail = in_time_order(all[all.len() - got.len()..].to_vec());
    assert_same_in_time_order(&tail, &got, "the segments kept");
}

/// Packets attributed to their process (`sensor --mode tc --attribute`) carry its pid and
/// executable into the index; DuckDB reads them back: curl's connections are curl's, with
/// its pid, and no container.
#[test]
fn the_index_names_the_process_of_attributed_packets() {
    require_root();
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("lakeproc").unwrap();
    std::fs::write(dir.join("index.html"), "capstream\n".repeat(200)).unwrap();
    let mut server_argv = lab.gen.command("python3");
    let root = dir.join("");
    server_argv.extend(
        ["-m", "http.server", "--bind", "198.18.0.1", "--directory"]
            .iter()
            .map(|s| s.to_string())
            .chain([root.to_string_lossy().into_owned(), "8000".into()]),
    );
    let _server = Proc::start("http.server", &server_argv, Stdio::null()).unwrap();
    let url = "http://198.18.0.1:8000/";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab
        .cap
        .exec("curl", &["-s", "-o", "/dev/null", url])
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "no HTTP server");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (lake, lake_arg) = lake_dir(&dir);
    let mut receiver = lake_receiver(&lab.cap, &dir, &lake_arg, &[]);
    let args = [
        "--iface",
        "cap0",
        "--mode",
        "tc",
        "--attribute",
        "--bpf",
        "tcp port 8000",
    ];
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
    let mut pids = Vec::new();
    for port in ["40001", "40002", "40003"] {
        let mut argv = lab.cap.command("curl");
        argv.extend(["-s", "-o", "/dev/null", "--local-port", port, url].map(String::from));
        let mut curl = Proc::start("curl", &argv, Stdio::null()).unwrap();
        pids.push(curl.pid());
        assert!(curl.wait(Duration::from_secs(10)).unwrap().success());
    }
    std::thread::sleep(Duration::from_millis(1500));
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    assert!(!lake_files(&lake, ".parquet").is_empty());
    let rows = testbed::lake::duckdb_rows(&format!(
        "SELECT src_port, pid, comm, container_id FROM read_parquet('{lake_arg}/**/*.parquet') \
         WHERE src_port BETWEEN 40001 AND 40003 AND pid IS NOT NULL ORDER BY timestamp_ns"
    ))
    .unwrap();
    assert!(rows.len() >= 9, "{rows:?}");
    for row in &rows {
        assert!(row[2].ends_with("curl"), "{row:?}");
        assert_eq!(row[3], "None", "no container: {row:?}");
    }
    // Each connection is its own curl's: `ip netns exec` runs curl as the pid started.
    for (port, pid) in ["40001", "40002", "40003"].iter().zip(&pids) {
        let of_port: Vec<&Vec<String>> = rows.iter().filter(|r| r[0] == *port).collect();
        assert!(
            !of_port.is_empty(),
            "no attributed packet from port {port}: {rows:?}"
        );
        for row in of_port {
            assert_eq!(row[1], pid.to_string(), "{row:?}");
        }
    }
}
