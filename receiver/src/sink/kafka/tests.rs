use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use protocol::Direction;

use super::*;

fn iface(sensor: &str, name: &str) -> SinkInterface {
    SinkInterface {
        name: name.into(),
        link_type: 1,
        snaplen: 65_535,
        filter: "tcp".into(),
        description: format!("sensor {sensor}"),
        sensor: sensor.into(),
        session: "0a1b2c3d".into(),
        session_id: 0x0a1b_2c3d,
    }
}

/// A sink whose producer is the test: it takes the messages, and acknowledges them (or
/// not) by hand.
fn sink() -> (KafkaSink, mpsc::UnboundedReceiver<Message>) {
    let (messages, incoming) = mpsc::unbounded_channel();
    let sink = KafkaSink {
        interfaces: Vec::new(),
        messages,
        progress: Arc::new(Progress::default()),
    };
    (sink, incoming)
}

fn packet(interface: u32, timestamp_ns: u64, data: &[u8]) -> OutPacket<'_> {
    OutPacket {
        interface,
        timestamp_ns,
        original_len: data.len() as u32,
        direction: Direction::Inbound,
        data,
        batch: Default::default(),
        process: None,
    }
}

fn header(record: &rskafka::record::Record, name: &str) -> String {
    String::from_utf8(record.headers[name].clone()).unwrap()
}

/// Each batch becomes one message: a pcapng of its own (section, the interface's block,
/// its packets) keyed by sensor and interface, with the headers that describe it; batches
/// of two interfaces interleaved by the merge stay apart.
#[test]
fn each_batch_is_one_readable_pcapng_message() {
    let (mut sink, mut incoming) = sink();
    let a = sink.add_interface(&iface("s1", "h1/eth0")).unwrap();
    let b = sink.add_interface(&iface("s2", "h2/eth1")).unwrap();
    sink.write_packet(&packet(a, 1_000, b"first")).unwrap();
    sink.write_packet(&packet(b, 1_500, b"other")).unwrap();
    sink.write_packet(&packet(a, 2_000, b"second")).unwrap();
    sink.end_batch(a, 7).unwrap();
    sink.end_batch(b, 3).unwrap();
    // A batch with nothing of it written here sends nothing.
    sink.end_batch(a, 8).unwrap();

    let first = incoming.try_recv().unwrap();
    let second = incoming.try_recv().unwrap();
    assert!(incoming.try_recv().is_err());
    let record = &first.record;
    assert_eq!(record.key.as_deref(), Some(&b"s1/h1/eth0"[..]));
    assert_eq!(first.hash, murmur2::positive(b"s1/h1/eth0"));
    assert_eq!(header(record, headers::SENSOR), "s1");
    assert_eq!(header(record, headers::INTERFACE), "h1/eth0");
    assert_eq!(header(record, headers::SESSION), "0a1b2c3d");
    assert_eq!(header(record, headers::SEQUENCE), "7");
    assert_eq!(header(record, headers::PACKETS), "2");
    assert_eq!(header(record, headers::FIRST_TIMESTAMP), "1000");
    assert_eq!(header(record, headers::LAST_TIMESTAMP), "2000");
    assert_eq!(header(record, headers::LINK_TYPE), "1");
    assert_eq!(header(&second.record, headers::SEQUENCE), "3");

    let value = record.value.as_deref().unwrap();
    let mut reader = PcapNgReader::new(value).unwrap();
    let mut names = Vec::new();
    let mut packets = Vec::new();
    while let Some(block) = reader.next_block() {
        match block.unwrap().0 {
            Block::InterfaceDescription(idb) => {
                assert_eq!(idb.snaplen, 65_535);
                for option in idb.options {
                    if let InterfaceDescriptionOption::IfName(name) = option {
                        names.push(name.to_string());
                    }
                }
            }
            Block::EnhancedPacket(epb) => {
                assert_eq!(epb.interface_id, 0);
                packets.push((epb.timestamp.as_nanos() as u64, epb.data.to_vec()));
            }
            _ => {}
        }
    }
    assert_eq!(names, ["h1/eth0"]);
    assert_eq!(
        packets,
        [(1_000, b"first".to_vec()), (2_000, b"second".to_vec())]
    );
    assert_eq!(sink.progress.lock().handed, 2);
}

/// A flush returns once every message handed over is acknowledged, and fails, saying why,
/// while the broker has not acknowledged them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waits_for_the_brokers_acknowledgements() {
    let (mut sink, _incoming) = sink();
    let a = sink.add_interface(&iface("s1", "h1/eth0")).unwrap();
    sink.flush().unwrap();
    sink.write_packet(&packet(a, 1, b"x")).unwrap();
    sink.end_batch(a, 1).unwrap();
    sink.progress.lock().last_error = Some("connection refused".into());
    let err = sink
        .wait_acknowledged(Duration::from_millis(50))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("1 message(s)"), "{text}");
    assert!(text.contains("connection refused"), "{text}");

    let progress = Arc::clone(&sink.progress);
    let acknowledger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        progress.lock().acked += 1;
        progress.acknowledged.notify_all();
    });
    sink.wait_acknowledged(Duration::from_secs(10)).unwrap();
    acknowledger.join().unwrap();
}

/// With the producer gone, a batch cannot be handed over: an error, never a silent loss.
#[test]
fn a_stopped_producer_is_an_error() {
    let (mut sink, incoming) = sink();
    drop(incoming);
    let a = sink.add_interface(&iface("s1", "h1/eth0")).unwrap();
    sink.write_packet(&packet(a, 1, b"x")).unwrap();
    assert!(sink.end_batch(a, 1).is_err());
}
