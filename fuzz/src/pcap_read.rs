//! What `sensor --read FILE` does with a capture file, on fuzz input: libpcap opens it (as
//! pcap or pcapng), a filter is compiled and set, and every packet is read until libpcap
//! says the file ends or fails. Each packet goes through the sensor's own conversions
//! (the `pcap_record` crate) and into a `protocol::BatchBuilder`, whose batches must decode to
//! the same packets.
//!
//! libpcap itself is not instrumented: this mainly shows that nothing we do with what
//! libpcap returns panics, and it catches libpcap's own crashes (and, under AddressSanitizer,
//! the memory errors that pass through the allocator or the intercepted `mem*` functions).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::BytesMut;
use pcap::{Activated, Capture, Linktype, Precision};
use pcap_record::{direction, timestamp_ns};
use protocol::{decode_frame, BatchBuilder, Direction, Message, PushOutcome, MAX_SNAPLEN};

/// The filter the second reading sets, as a user's `--bpf` would.
const FILTER: &str = "tcp or udp";

/// Small batches, so that several are built and decoded from one input.
const BATCH_TARGET: usize = 4096;

/// Reads the capture file `data` twice, without and with a filter.
pub fn run(data: &[u8]) {
    let path = scratch_path();
    std::fs::write(path, data).expect("cannot write the scratch capture file");
    let all = read(path, None);
    let filtered = read(path, Some(FILTER));
    if let (Some((all, true)), Some((filtered, true))) = (all, filtered) {
        assert!(
            filtered <= all,
            "the filter let through {filtered} packets of {all}"
        );
    }
}

/// A file per process (libFuzzer's `-fork` and `-jobs` run several), in memory when
/// `/dev/shm` is there.
fn scratch_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("capstream-fuzz-{}.pcap", std::process::id()))
    })
}

/// Opens and reads the file; `None` when libpcap refuses to open it (or the filter), else
/// the number of packets read and whether the file ended cleanly.
fn read(path: &Path, filter: Option<&str>) -> Option<(u64, bool)> {
    let mut cap = Capture::from_file_with_precision(path, Precision::Nano).ok()?;
    if let Some(f) = filter {
        // As the sensor does: compile the user's expression alone, then set it.
        cap.compile(f, true).ok()?;
        cap.filter(f, true).ok()?;
    }
    let link_type = cap.get_datalink().0;
    // The sensor names the link type and refuses one that does not fit in a u16.
    let _ = Linktype(link_type).get_name();
    let _ = Linktype(link_type).get_description();
    let _ = u16::try_from(link_type);
    Some(pump(&mut cap, link_type))
}

fn pump<T: Activated + ?Sized>(cap: &mut Capture<T>, link_type: i32) -> (u64, bool) {
    let snaplen = MAX_SNAPLEN as usize;
    let mut builder = BatchBuilder::new(BATCH_TARGET);
    let mut pushed = Vec::new();
    let mut count = 0u64;
    let clean = loop {
        match cap.next_packet() {
            Ok(p) => {
                count += 1;
                let data = &p.data[..p.data.len().min(snaplen)];
                let ts = timestamp_ns(p.header);
                let dir = direction(link_type, data);
                if builder.push(ts, p.header.len, dir, data) == PushOutcome::Full {
                    flush(&mut builder, &mut pushed);
                    assert_eq!(
                        builder.push(ts, p.header.len, dir, data),
                        PushOutcome::Added,
                        "an empty batch takes any packet"
                    );
                }
                pushed.push((ts, p.header.len.max(data.len() as u32), dir, data.to_vec()));
                if builder.is_ready() {
                    flush(&mut builder, &mut pushed);
                }
            }
            Err(pcap::Error::NoMorePackets) => break true,
            Err(_) => break false,
        }
    };
    flush(&mut builder, &mut pushed);
    (count, clean)
}

type Pushed = (u64, u32, Direction, Vec<u8>);

/// Encodes the batch, decodes it as the receiver would, and compares the packets.
fn flush(builder: &mut BatchBuilder, pushed: &mut Vec<Pushed>) {
    if builder.is_empty() {
        return;
    }
    let encoded = builder.finish(1, 1, 0);
    let mut buf = BytesMut::from(&encoded.frame[..]);
    let Ok(Some(Message::Batch(batch))) = decode_frame(&mut buf) else {
        panic!("a batch built from libpcap's packets does not decode");
    };
    let packets = batch
        .packets()
        .expect("a batch built from libpcap's packets is valid");
    assert_eq!(packets.len(), pushed.len());
    for (p, (ts, len, dir, data)) in packets.zip(pushed.drain(..)) {
        assert_eq!(
            (p.timestamp_ns, p.original_len, p.direction, &p.data[..]),
            (ts, len, dir, &data[..])
        );
    }
}
