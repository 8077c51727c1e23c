//! `receiver --kafka`: every sensor batch as one message on a real Kafka-protocol broker
//! (tansu), read back from the earliest offset by an independent client (kafka-python),
//! each message's value opened by tshark and tcpdump on its own, all of them together
//! compared with tcpdump's reading of the same traffic. And a broker frozen (SIGSTOP) for
//! 10 s mid-run, a broker not there at start, and the bad input that must be refused.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    assert_refused, compare_captures, first_difference, sensor_figures, start_sensor,
    start_tcpdump, stop_reference, summary_figure, tcpdump_records, tshark_count, Receiver, Record,
    Scratch,
};
use testbed::kafka::{ClientTls, Consumed, Tansu};
use testbed::prometheus::{scrape, sum};
use testbed::{corpus, require_root, Lab, Netns, Proc};

const TOPIC: &str = "packets";
const PARTITIONS: u32 = 3;

/// The messages of one sensor interface (one key), in partition order.
struct Stream<'a> {
    key: String,
    messages: Vec<&'a Consumed>,
}

/// The consumed messages grouped by key; each key's messages in offset order.
fn by_key(consumed: &[Consumed]) -> Vec<Stream<'_>> {
    let mut keys: BTreeMap<&str, Vec<&Consumed>> = BTreeMap::new();
    for m in consumed {
        keys.entry(&m.key).or_default().push(m);
    }
    keys.into_iter()
        .map(|(key, mut messages)| {
            messages.sort_by_key(|m| (m.partition, m.offset));
            Stream {
                key: key.to_string(),
                messages,
            }
        })
        .collect()
}

/// Checks one key's messages: one partition, the one Kafka's own partitioner gives the
/// key; one session; batch sequences rising by one; each message a pcapng that tshark and
/// tcpdump read on their own, holding what its headers say. Returns its packets, in order.
fn check_stream(stream: &Stream, sensor: &str) -> Vec<Record> {
    let what = &stream.key;
    let first = stream.messages[0];
    assert!(
        stream
            .messages
            .iter()
            .all(|m| m.partition == first.partition),
        "{what}: messages in several partitions"
    );
    assert_eq!(
        first.partition, first.keyed_partition,
        "{what}: not in the partition Kafka's partitioner gives its key"
    );
    let sessions: HashSet<&str> = stream
        .messages
        .iter()
        .map(|m| m.headers["session"].as_str())
        .collect();
    assert_eq!(sessions.len(), 1, "{what}: sessions {sessions:?}");
    let sequences: Vec<u64> = stream
        .messages
        .iter()
        .map(|m| m.number("sequence").unwrap())
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: batch sequences do not rise without gaps (a batch lost or twice): \
         {sequences:?}"
    );
    let mut packets = Vec::new();
    for m in &stream.messages {
        assert_eq!(m.headers["sensor"], sensor, "{what}: {m:?}");
        assert_eq!(m.headers["link_type"], "1", "{what}: {m:?}");
        let count = m.number("packets").unwrap() as usize;
        assert_eq!(
            tshark_count(&m.file).unwrap(),
            count,
            "{what}: tshark reads message {m:?}"
        );
        let records = tcpdump_records(&m.file, "").unwrap();
        assert_eq!(records.len(), count, "{what}: tcpdump reads {m:?}");
        assert_eq!(
            records[0].timestamp_ns,
            u128::from(m.number("first_timestamp_ns").unwrap()),
            "{what}: {m:?}"
        );
        assert_eq!(
            records[count - 1].timestamp_ns,
            u128::from(m.number("last_timestamp_ns").unwrap()),
            "{what}: {m:?}"
        );
        packets.extend(records);
    }
    packets
}

/// The one stream of `sensor`'s messages.
fn stream_of<'a>(streams: &'a [Stream<'a>], sensor: &str) -> &'a Stream<'a> {
    let prefix = format!("{sensor}/");
    let mine: Vec<&Stream> = streams
        .iter()
        .filter(|s| s.key.starts_with(&prefix))
        .collect();
    assert_eq!(mine.len(), 1, "one key for sensor {sensor}");
    mine[0]
}

/// Waits for a `sensor --read` to deliver everything and exit 0.
fn wait_done(sensor: &mut Proc, receiver: &Receiver) {
    let status = sensor.wait(Duration::from_secs(120)).unwrap();
    assert!(
        status.success(),
        "sensor: {}\nreceiver:\n{}",
        sensor.stderr(),
        receiver.proc.stderr()
    );
}

/// Every message of the topic, read back by kafka-python (over `tls` when given), values
/// in `dir/messages`.
fn read_back(broker: &Tansu, dir: &Scratch, tls: Option<&ClientTls>) -> Vec<Consumed> {
    let messages = dir.join("messages");
    std::fs::create_dir_all(&messages).unwrap();
    broker.consume_all_over(TOPIC, &messages, tls).unwrap()
}

/// The receiver's Kafka figures from its exit summary: messages acknowledged, broker
/// errors, messages never acknowledged.
fn kafka_figures(receiver: &Receiver) -> (u64, u64, u64) {
    let summary = receiver.proc.summary().unwrap();
    let figure = |name: &str| summary_figure(&summary, &format!("/kafka/{name}")).unwrap();
    (
        figure("messages"),
        figure("errors"),
        figure("unacknowledged"),
    )
}

/// Two sensors replay the corpus (each under its own filter) into a receiver producing to
/// a Kafka topic of three partitions, zstd-compressed, beside a pcapng file. Every message
/// read back is one batch, a pcapng on its own; each sensor's messages together are
/// tcpdump's reading of the corpus under that sensor's filter, packet for packet; the file
/// beside holds them all.
#[test]
fn two_sensors_one_readable_message_per_batch_equal_to_tcpdump() {
    require_root();
    let ns = Netns::new("cskafka").unwrap();
    let mut broker = Tansu::start(Some(&ns), 9092).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    let dir = Scratch::new("kafka").unwrap();
    let bootstrap = broker.bootstrap();
    let out = dir.join("beside.pcapng");
    let out_arg = out.to_string_lossy().into_owned();
    let mut receiver = Receiver::start(
        Some(&ns),
        &dir.join("state"),
        4433,
        &[
            "--out",
            &out_arg,
            "--kafka",
            &bootstrap,
            "--kafka-topic",
            TOPIC,
            "--kafka-compression",
            "zstd",
        ],
    )
    .unwrap();
    let corpus = corpus::pcap_arg();
    let sensors = [("s1", "tcp"), ("s2", "not tcp")];
    let mut running: Vec<Proc> = sensors
        .iter()
        .map(|(id, filter)| {
            let args = [
                "--read",
                corpus.as_str(),
                "--bpf",
                filter,
                "--sensor-id",
                id,
                "--batch-size",
                "64KiB",
            ];
            start_sensor(Some(&ns), &receiver, &args).unwrap()
        })
        .collect();
    for sensor in &mut running {
        wait_done(sensor, &receiver);
    }
    receiver.stop().unwrap();
    let consumed = read_back(&broker, &dir, None);
    let streams = by_key(&consumed);
    assert_eq!(streams.len(), sensors.len(), "one key per sensor interface");
    let mut total = 0;
    for (sensor, filter) in sensors {
        let got = check_stream(stream_of(&streams, sensor), sensor);
        let expected = tcpdump_records(&corpus::pcap(), filter).unwrap();
        assert!(
            got == expected,
            "{sensor} ({filter}): the messages together != tcpdump -r: {}",
            first_difference(&expected, &got)
        );
        total += got.len();
    }
    assert_eq!(total, corpus::PACKETS, "the two filters split the corpus");
    assert_eq!(
        tcpdump_records(&out, "").unwrap().len(),
        corpus::PACKETS,
        "the file beside the topic holds every packet"
    );
    let (acknowledged, errors, unacknowledged) = kafka_figures(&receiver);
    assert_eq!(
        acknowledged,
        consumed.len() as u64,
        "the receiver's summary counts the messages in the topic"
    );
    assert_eq!((errors, unacknowledged), (0, 0));
    broker.stop().unwrap();
}

/// Two live sensors, each with tcpdump beside it, while the corpus is replayed at them;
/// the broker is frozen (SIGSTOP) for 10 s in the middle. The receiver holds what the
/// broker has not acknowledged, the sensors hold their batches meanwhile, and afterwards
/// each sensor's messages are exactly tcpdump's capture: nothing lost, nothing twice, and
/// each sensor's accounting identity holds.
#[test]
fn a_broker_frozen_for_10s_loses_and_doubles_nothing() {
    require_root();
    let lab = Lab::new(2).unwrap();
    let mut broker = Tansu::start(Some(&lab.cap), 9092).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    let dir = Scratch::new("kafka-freeze").unwrap();
    let bootstrap = broker.bootstrap();
    let mut receiver = Receiver::start(
        Some(&lab.cap),
        &dir.join("state"),
        4433,
        &["--kafka", &bootstrap, "--kafka-topic", TOPIC],
    )
    .unwrap();
    let ids = ["f0", "f1"];
    let mut sensors = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let iface = lab.links[i].1.as_str();
        // Batches of half a second: fewer messages for tshark to open one by one.
        let args = [
            "--iface",
            iface,
            "--mode",
            "pcap",
            "--sensor-id",
            id,
            "--flush-interval",
            "500ms",
        ];
        let sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
        let reference = dir.join(&format!("{id}.pcap"));
        let tcpdump = start_tcpdump(&lab.cap, iface, "", &[], &reference).unwrap();
        sensors.push((sensor, tcpdump, reference));
    }
    // About 8 s of traffic on each link; the freeze falls 2 s in and outlasts it.
    let corpus = corpus::pcap_arg();
    let mut replays: Vec<Proc> = lab
        .links
        .iter()
        .map(|(gen, _)| {
            let mut argv = lab.gen.command("tcpreplay");
            argv.extend(["-q", "--pps", "1000", "-i", gen, &corpus].map(String::from));
            Proc::start("tcpreplay", &argv, Stdio::null()).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    broker.freeze().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    broker.thaw().unwrap();
    for replay in &mut replays {
        let status = replay.wait(Duration::from_secs(120)).unwrap();
        assert!(status.success(), "tcpreplay: {}", replay.stderr());
    }
    // The last frames pass the sensor's batch timer and the receiver's reorder window.
    std::thread::sleep(Duration::from_millis(1500));
    // Each sensor with what tcpdump captured beside it.
    let mut stopped = Vec::new();
    for (mut sensor, tcpdump, reference) in sensors {
        let expected = stop_reference(tcpdump, &reference);
        sensor
            .stop()
            .unwrap_or_else(|e| panic!("{e:#}\nreceiver:\n{}", receiver.proc.stderr()));
        stopped.push((expected, sensor));
    }
    receiver.stop().unwrap();
    let receiver_log = receiver.proc.stderr();
    assert!(
        receiver_log.contains("has not acknowledged"),
        "the freeze fell mid-run: the receiver waited for the broker:\n{receiver_log}"
    );

    let consumed = read_back(&broker, &dir, None);
    let batches: HashSet<(&str, &str)> = consumed
        .iter()
        .map(|m| {
            (
                m.headers["session"].as_str(),
                m.headers["sequence"].as_str(),
            )
        })
        .collect();
    assert_eq!(batches.len(), consumed.len(), "a batch in the topic twice");
    let streams = by_key(&consumed);
    for (i, id) in ids.iter().enumerate() {
        let got = check_stream(stream_of(&streams, id), id);
        let (expected, sensor) = &stopped[i];
        assert_eq!(expected.len(), corpus::PACKETS, "tcpdump saw the replay");
        if let Err(difference) = compare_captures(expected, &got, 0) {
            panic!("{id}: the topic != tcpdump: {difference}\nreceiver:\n{receiver_log}");
        }
        let iface = lab.links[i].1.as_str();
        let f = sensor_figures(&sensor.summary().unwrap(), iface).unwrap();
        assert_eq!(
            f.unacknowledged,
            Some(0),
            "{id}: nothing left unacknowledged"
        );
        assert_eq!(
            f.matched,
            f.delivered + f.reason("sensor_buffer"),
            "{id}: matched != delivered + dropped after matching: {}",
            f.line
        );
        assert_eq!(
            f.delivered,
            got.len() as u64,
            "{id}: delivered != packets in the topic: {}",
            f.line
        );
    }
    let (acknowledged, _, unacknowledged) = kafka_figures(&receiver);
    assert_eq!(acknowledged, consumed.len() as u64);
    assert_eq!(unacknowledged, 0);
    broker.stop().unwrap();
}

/// A receiver started before its broker: it says it cannot reach it, runs anyway, holds
/// the sensor's batches, and delivers them all once the broker is there (and has the
/// topic).
#[test]
fn a_broker_unreachable_at_start_is_retried_not_fatal() {
    require_root();
    let ns = Netns::new("cskafkalate").unwrap();
    let dir = Scratch::new("kafka-late").unwrap();
    let mut receiver = Receiver::start(
        Some(&ns),
        &dir.join("state"),
        4433,
        &["--kafka", "127.0.0.1:9092", "--kafka-topic", TOPIC],
    )
    .unwrap();
    let log = receiver.proc.stderr();
    assert!(
        log.contains("127.0.0.1:9092") && log.contains("trying again in the background"),
        "the receiver says it cannot reach the broker yet:\n{log}"
    );
    let corpus = corpus::pcap_arg();
    let mut sensor = start_sensor(
        Some(&ns),
        &receiver,
        &["--read", &corpus, "--sensor-id", "late"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut broker = Tansu::start(Some(&ns), 9092).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    receiver
        .proc
        .wait_for("kafka: connected to", Duration::from_secs(60))
        .unwrap();
    wait_done(&mut sensor, &receiver);
    receiver.stop().unwrap();
    let consumed = read_back(&broker, &dir, None);
    let streams = by_key(&consumed);
    let got = check_stream(stream_of(&streams, "late"), "late");
    assert_eq!(got, tcpdump_records(&corpus::pcap(), "").unwrap());
    let (_, errors, unacknowledged) = kafka_figures(&receiver);
    assert!(errors > 0, "the failed attempts are counted");
    assert_eq!(unacknowledged, 0);
    broker.stop().unwrap();
}

/// A receiver killed (SIGKILL) while the broker, frozen, has not acknowledged what it
/// produced, then started again: its sensor sends again what it never saw acknowledged, so
/// batches may be in the topic twice. They carry the same session and sequence, and the
/// README's rule (per key, drop a message of the last session whose sequence is not
/// higher) leaves exactly tcpdump's reading of the replay.
#[test]
fn batches_sent_again_after_a_receiver_restart_are_recognised_by_their_headers() {
    require_root();
    let ns = Netns::new("cskafkakill").unwrap();
    let mut broker = Tansu::start(Some(&ns), 9092).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    let dir = Scratch::new("kafka-kill").unwrap();
    let bootstrap = broker.bootstrap();
    let args = ["--kafka", bootstrap.as_str(), "--kafka-topic", TOPIC];
    let state = dir.join("state");
    let mut receiver = Receiver::start(Some(&ns), &state, 4433, &args).unwrap();
    let corpus = corpus::pcap_arg();
    let sensor_args = |filter: &'static str| {
        [
            "--read",
            corpus.as_str(),
            "--bpf",
            filter,
            "--sensor-id",
            "again",
            "--batch-size",
            "64KiB",
        ]
    };
    // A first session of the same sensor and interface (so the same key and partition)
    // while the broker answers: the receiver then holds a connection to that partition's
    // leader, and the second session's first message goes straight to the frozen broker.
    let mut warm_up = start_sensor(Some(&ns), &receiver, &sensor_args("udp")).unwrap();
    wait_done(&mut warm_up, &receiver);
    broker.freeze().unwrap();
    let mut sensor = start_sensor(Some(&ns), &receiver, &sensor_args("")).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    receiver.proc.signal("KILL").unwrap();
    receiver.proc.wait(Duration::from_secs(10)).unwrap();
    // Started again while the broker is still frozen: it goes on without it.
    let mut receiver = Receiver::start(Some(&ns), &state, 4433, &args).unwrap();
    broker.thaw().unwrap();
    wait_done(&mut sensor, &receiver);
    receiver.stop().unwrap();

    let consumed = read_back(&broker, &dir, None);
    let mut ordered: Vec<&Consumed> = consumed.iter().collect();
    ordered.sort_by_key(|m| (m.partition, m.offset));
    let mut last: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    let mut first_copy: BTreeMap<(String, u64), Vec<u8>> = BTreeMap::new();
    let mut got = Vec::new();
    let mut dropped = 0;
    for m in ordered {
        let (session, sequence) = (m.headers["session"].as_str(), m.number("sequence").unwrap());
        let value = std::fs::read(&m.file).unwrap();
        match first_copy.get(&(session.to_string(), sequence)) {
            Some(copy) => assert!(
                *copy == value,
                "batch {sequence} of session {session} sent again with other packets"
            ),
            None => {
                first_copy.insert((session.to_string(), sequence), value);
            }
        }
        if last
            .get(m.key.as_str())
            .is_some_and(|&(s, q)| s == session && sequence <= q)
        {
            dropped += 1;
            continue;
        }
        last.insert(&m.key, (session, sequence));
        got.extend(tcpdump_records(&m.file, "").unwrap());
    }
    let mut expected = tcpdump_records(&corpus::pcap(), "udp").unwrap();
    expected.extend(tcpdump_records(&corpus::pcap(), "").unwrap());
    assert!(
        got == expected,
        "after dropping {dropped} message(s) sent again: {}",
        first_difference(&expected, &got)
    );
    // The message in flight to the frozen broker when the receiver died lands there when
    // the broker wakes, and its batch comes again through the restarted receiver.
    assert!(
        dropped >= 1,
        "no batch in the topic twice: the restart did not fall between produce and \
         acknowledgement"
    );
    broker.stop().unwrap();
}

/// TLS to the broker, verified against the user's CA, with a client certificate that the
/// broker requires (socat terminates TLS in front of tansu, which advertises socat's port):
/// every batch arrives, and kafka-python reads it back over TLS. Metrics count the
/// messages.
#[test]
fn tls_with_a_ca_and_a_client_certificate() {
    require_root();
    let ns = Netns::new("cskafkatls").unwrap();
    let dir = Scratch::new("kafka-tls").unwrap();
    let pki = dir.join("pki");
    let pki_arg = pki.to_string_lossy().into_owned();
    let receiver_bin = testbed::workspace_bin("receiver");
    let receiver_bin = receiver_bin.to_string_lossy();
    testbed::run(&receiver_bin, &["certs", "init", "--dir", &pki_arg]).unwrap();
    testbed::run(
        &receiver_bin,
        &["certs", "sensor", "kafka-client", "--dir", &pki_arg],
    )
    .unwrap();
    let path = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let (ca, cert, key) = (
        path("ca.crt"),
        path("kafka-client.crt"),
        path("kafka-client.key"),
    );
    let mut broker = Tansu::advertising(Some(&ns), 9092, 9093).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    // The broker's certificate: the one `certs init` made for 127.0.0.1.
    let listen = format!(
        "OPENSSL-LISTEN:9093,bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={ca},verify=1",
        path("receiver.crt"),
        path("receiver.key")
    );
    let mut argv = ns.command("socat");
    argv.extend(["-d", "-d", &listen, "TCP:127.0.0.1:9092"].map(String::from));
    let mut tls_proxy = Proc::start("socat", &argv, Stdio::null()).unwrap();
    tls_proxy
        .wait_for("listening on", Duration::from_secs(10))
        .unwrap();

    let bootstrap = broker.bootstrap();
    let mut receiver = Receiver::start(
        Some(&ns),
        &dir.join("state"),
        4433,
        &[
            "--kafka",
            &bootstrap,
            "--kafka-topic",
            TOPIC,
            "--kafka-ca",
            &ca,
            "--kafka-cert",
            &cert,
            "--kafka-key",
            &key,
            "--metrics",
            "127.0.0.1:9100",
        ],
    )
    .unwrap();
    let corpus = corpus::pcap_arg();
    let mut sensor = start_sensor(
        Some(&ns),
        &receiver,
        &["--read", &corpus, "--bpf", "udp", "--sensor-id", "tls"],
    )
    .unwrap();
    wait_done(&mut sensor, &receiver);
    let metrics = scrape(Some(&ns), "127.0.0.1:9100").unwrap();
    receiver.stop().unwrap();

    let tls = ClientTls {
        ca: &pki.join("ca.crt"),
        cert: &pki.join("kafka-client.crt"),
        key: &pki.join("kafka-client.key"),
    };
    let consumed = read_back(&broker, &dir, Some(&tls));
    let streams = by_key(&consumed);
    let got = check_stream(stream_of(&streams, "tls"), "tls");
    assert_eq!(got, tcpdump_records(&corpus::pcap(), "udp").unwrap());
    let (acknowledged, errors, _) = kafka_figures(&receiver);
    assert_eq!((acknowledged, errors), (consumed.len() as u64, 0));
    assert_eq!(
        sum(&metrics, "capstream_receiver_kafka_messages_total", &[]),
        Some(consumed.len() as f64),
        "the metrics count the messages:\n{metrics}"
    );
    assert_eq!(
        sum(
            &metrics,
            "capstream_receiver_kafka_unacknowledged_messages",
            &[]
        ),
        Some(0.0)
    );
    tls_proxy.signal("TERM").unwrap();
    broker.stop().unwrap();
}

/// A free TCP port on loopback, for a broker in this namespace.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A bad broker address, an empty or illegal topic name, and a broker that answers
/// without the topic: one line each, exit code 2.
#[test]
fn bad_kafka_input_gives_one_line_errors_and_exit_code_2() {
    require_root();
    let dir = Scratch::new("kafka-bad").unwrap();
    let state = dir.join("state").to_string_lossy().into_owned();
    let receiver = |kafka: &[&str], needle: &str| {
        let mut args = vec!["--listen", "127.0.0.1:0", "--state-dir", &state];
        args.extend_from_slice(kafka);
        assert_refused("receiver", &args, needle);
    };
    receiver(&["--kafka", "nohost", "--kafka-topic", TOPIC], "nohost");
    receiver(&["--kafka", "k1:99999", "--kafka-topic", TOPIC], "k1:99999");
    receiver(&["--kafka", "127.0.0.1:9092", "--kafka-topic", ""], "empty");
    receiver(
        &["--kafka", "127.0.0.1:9092", "--kafka-topic", "a/b"],
        "a/b",
    );
    receiver(
        &["--kafka", "kafka.example:9092", "--kafka-topic", TOPIC],
        "--kafka-allow-plaintext",
    );
    let port = free_port();
    let mut broker = Tansu::start(None, port).unwrap();
    let bootstrap = broker.bootstrap();
    receiver(
        &["--kafka", &bootstrap, "--kafka-topic", "absent"],
        "absent",
    );
    broker.stop().unwrap();
}
