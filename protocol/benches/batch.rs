//! Cost per MB of packet data of the wire format: batches of the sensor's default size
//! through the real encoder (`BatchBuilder`, Snappy included) and decoder (`decode_frame`,
//! `Batch::packets` and the iteration), and Snappy alone on the same record streams. Two
//! payloads of about 1.7 MB: every frame of the shared corpus in order (realistic,
//! compressible, as `sensor --read` sends it) and random 1500-byte frames
//! (incompressible).
//!
//! Run by `cargo xtask bench --only micro`; see BENCHMARKS.md.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pcap_file::pcap::PcapReader;
use protocol::{decode_frame, Batch, BatchBuilder, BatchEncoding, Direction, Message, PushOutcome};
use rand::RngCore;

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/corpus/tcpdump-tests.pcap"
);
/// The sensor's default `--batch-size`.
const BATCH_SIZE: usize = 256 * 1024;
const RANDOM_FRAME_LEN: usize = 1500;
/// About as many bytes as the corpus.
const RANDOM_FRAMES: usize = 1200;

/// Frames (timestamp, bytes) to send.
struct Payload {
    name: &'static str,
    frames: Vec<(u64, Vec<u8>)>,
}

impl Payload {
    fn corpus() -> Self {
        let file = std::fs::File::open(CORPUS).unwrap_or_else(|e| {
            panic!("{CORPUS}: {e} (the shared corpus; see its README)");
        });
        let mut reader = PcapReader::new(std::io::BufReader::new(file)).expect("a pcap file");
        let mut frames = Vec::new();
        while let Some(packet) = reader.next_packet() {
            let packet = packet.expect("a readable corpus");
            frames.push((packet.timestamp().as_nanos() as u64, packet.data().to_vec()));
        }
        Self {
            name: "corpus",
            frames,
        }
    }

    fn random() -> Self {
        let mut rng = rand::rng();
        let frames = (0..RANDOM_FRAMES)
            .map(|i| {
                let mut frame = vec![0u8; RANDOM_FRAME_LEN];
                rng.fill_bytes(&mut frame);
                (i as u64 * 1000, frame)
            })
            .collect();
        Self {
            name: "random",
            frames,
        }
    }

    fn data_len(&self) -> u64 {
        self.frames.iter().map(|(_, f)| f.len() as u64).sum()
    }

    /// Pushes every frame into `builder`, sending a batch whenever it is ready as the
    /// sensor does, into `out` (emptied first).
    fn encode(&self, builder: &mut BatchBuilder, out: &mut Vec<Bytes>) {
        out.clear();
        for (ts, frame) in &self.frames {
            let outcome = builder.push(*ts, frame.len() as u32, Direction::Inbound, frame);
            assert_eq!(outcome, PushOutcome::Added, "a batch holds a frame");
            if builder.is_ready() {
                out.push(builder.finish(1, out.len() as u64 + 1, 0).frame);
            }
        }
        if !builder.is_empty() {
            out.push(builder.finish(1, out.len() as u64 + 1, 0).frame);
        }
    }
}

fn decode(frame: &[u8]) -> Batch {
    let mut frame = BytesMut::from(frame);
    match decode_frame(&mut frame) {
        Ok(Some(Message::Batch(batch))) => batch,
        other => panic!("not a batch: {other:?}"),
    }
}

fn protocol(c: &mut Criterion) {
    let mut group = c.benchmark_group("protocol");
    for payload in [Payload::corpus(), Payload::random()] {
        group.throughput(Throughput::Bytes(payload.data_len()));
        let mut builder = BatchBuilder::new(BATCH_SIZE);
        let mut frames = Vec::new();
        group.bench_function(format!("encode/{}", payload.name), |b| {
            b.iter(|| payload.encode(&mut builder, black_box(&mut frames)))
        });
        // What arrives: the receiver reads each frame into a buffer of its own.
        let received: Vec<BytesMut> = frames.iter().map(|f| BytesMut::from(&f[..])).collect();
        group.bench_function(format!("decode/{}", payload.name), |b| {
            b.iter_batched(
                || received.clone(),
                |mut received| {
                    let mut bytes = 0;
                    for buf in &mut received {
                        let Ok(Some(Message::Batch(batch))) = decode_frame(buf) else {
                            panic!("not a batch");
                        };
                        let packets = batch.packets().expect("a valid batch");
                        bytes += packets.map(|p| p.data.len()).sum::<usize>();
                    }
                    bytes
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn snappy(c: &mut Criterion) {
    let mut group = c.benchmark_group("snappy");
    for payload in [Payload::corpus(), Payload::random()] {
        // The exact record streams the encoder compresses: a batch sent as Snappy is
        // decompressed back; a stored one carries its records as they are.
        let mut frames = Vec::new();
        payload.encode(&mut BatchBuilder::new(BATCH_SIZE), &mut frames);
        let records: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let batch = decode(f);
                match batch.encoding {
                    BatchEncoding::Stored => batch.body.to_vec(),
                    BatchEncoding::Snappy => snap::raw::Decoder::new()
                        .decompress_vec(&batch.body)
                        .expect("the encoder's own output"),
                }
            })
            .collect();
        let raw: usize = records.iter().map(Vec::len).sum();
        group.throughput(Throughput::Bytes(raw as u64));
        let mut encoder = snap::raw::Encoder::new();
        let largest = records.iter().map(Vec::len).max().unwrap_or(0);
        let mut compressed = vec![0u8; snap::raw::max_compress_len(largest)];
        group.bench_function(format!("compress/{}", payload.name), |b| {
            b.iter(|| {
                for r in &records {
                    black_box(encoder.compress(r, &mut compressed).expect("fits"));
                }
            })
        });
        let packed: Vec<Vec<u8>> = records
            .iter()
            .map(|r| encoder.compress_vec(r).expect("compresses"))
            .collect();
        let mut decoder = snap::raw::Decoder::new();
        let mut out = vec![0u8; largest];
        group.bench_function(format!("decompress/{}", payload.name), |b| {
            b.iter(|| {
                for p in &packed {
                    black_box(decoder.decompress(p, &mut out).expect("valid"));
                }
            })
        });
        let packed_len: usize = packed.iter().map(Vec::len).sum();
        eprintln!(
            "snappy/{}: {} batches, {raw} bytes of records -> {packed_len} ({:.2}x)",
            payload.name,
            records.len(),
            raw as f64 / packed_len as f64
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Shorter than criterion's default, so that the whole micro run stays brief.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .sample_size(30);
    targets = protocol, snappy
}
criterion_main!(benches);
