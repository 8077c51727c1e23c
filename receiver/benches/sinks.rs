//! MB/s of packet data through the receiver's own sinks (`receiver::sink`), pcap and pcapng,
//! on the frames of the shared corpus: into memory that discards them (the formatting
//! alone), and into a file opened as the receiver opens its output (`Files`, written into
//! the page cache, flushed once per pass as the writer task does per round).
//!
//! Run by `cargo xtask bench --only micro`; see BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pcap_file::pcap::PcapReader;
use protocol::Direction;
use receiver::sink::files::naming::Pattern;
use receiver::sink::files::{FileConfig, Files};
use receiver::sink::Format;
use receiver::sink::{FormatSink, OutPacket, Sink, SinkInterface};

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/corpus/tcpdump-tests.pcap"
);

/// Every frame of the corpus: (timestamp ns, original length, bytes).
fn corpus() -> Vec<(u64, u32, Vec<u8>)> {
    let file = std::fs::File::open(CORPUS)
        .unwrap_or_else(|e| panic!("{CORPUS}: {e} (the shared corpus; see its README)"));
    let mut reader = PcapReader::new(std::io::BufReader::new(file)).expect("a pcap file");
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let p = packet.expect("a readable corpus");
        let ts = p.timestamp().as_nanos() as u64;
        frames.push((ts, p.orig_len(), p.data().to_vec()));
    }
    frames
}

fn interface() -> SinkInterface {
    SinkInterface {
        name: "sensor-1/eth0".into(),
        link_type: 1,
        snaplen: protocol::MAX_SNAPLEN,
        filter: "tcp or udp".into(),
        description: "benchmark".into(),
        sensor: "sensor-1".into(),
        session: "0a1b2c3d".into(),
        session_id: 0x0a1b_2c3d,
    }
}

/// One pass: every frame, then a flush.
fn write_all(sink: &mut dyn Sink, interface: u32, frames: &[(u64, u32, Vec<u8>)]) {
    for (timestamp_ns, original_len, data) in frames {
        let packet = OutPacket {
            interface,
            timestamp_ns: *timestamp_ns,
            original_len: *original_len,
            direction: Direction::Inbound,
            data,
            batch: Default::default(),
            process: None,
        };
        sink.write_packet(&packet).expect("write");
    }
    sink.flush().expect("flush");
}

fn sinks(c: &mut Criterion) {
    let frames = corpus();
    let bytes: u64 = frames.iter().map(|(_, _, d)| d.len() as u64).sum();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sink-bench.out");
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Bytes(bytes));
    for format in [Format::Pcap, Format::Pcapng] {
        let name = format.name();
        let mut discard: Box<dyn Sink> =
            Box::new(FormatSink::new(format, std::io::sink()).expect("header"));
        let index = discard.add_interface(&interface()).expect("interface");
        group.bench_function(format!("{name}/memory"), |b| {
            b.iter(|| write_all(discard.as_mut(), index, black_box(&frames)))
        });
        group.bench_function(format!("{name}/file"), |b| {
            b.iter_batched(
                || open_file(&out, format),
                |mut sink| {
                    let index = sink.add_interface(&interface()).expect("interface");
                    write_all(sink.as_mut(), index, &frames);
                    sink.finish().expect("finish");
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    let _ = std::fs::remove_file(&out);
}

/// The file output as the receiver opens it for `--out FILE`: no rotation, one file.
fn open_file(out: &Path, format: Format) -> Box<dyn Sink> {
    let config = FileConfig {
        pattern: Pattern::parse(out, None).expect("a plain file name"),
        format,
        split_by: None,
        rotation: Default::default(),
        keep: Default::default(),
        on_finished: None,
        in_use: None,
    };
    Box::new(Files::open(config).expect("the benchmark's output file"))
}

criterion_group! {
    name = benches;
    // Shorter than criterion's default, so that the whole micro run stays brief.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .sample_size(30);
    targets = sinks
}
criterion_main!(benches);
