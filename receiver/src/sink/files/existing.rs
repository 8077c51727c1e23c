//! A capture file found where the output goes, left by an earlier run: continued if this
//! receiver can append to it (a torn last record or block cut off), else left as it is.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::sink::Format;

/// pcap magic for nanosecond timestamps, as this receiver writes it (host byte order).
const PCAP_NANO_MAGIC: u32 = 0xa1b2_3c4d;
const PCAP_MICRO_MAGIC: u32 = 0xa1b2_c3d4;
const PCAP_HEADER_LEN: u64 = 24;
const PCAP_RECORD_HEADER_LEN: u64 = 16;
const PCAPNG_SHB: u32 = 0x0A0D_0D0A;
const PCAPNG_BYTE_ORDER: u32 = 0x1A2B_3C4D;
/// Smallest pcapng block: type, two lengths.
const PCAPNG_MIN_BLOCK: u64 = 12;

/// What is at the output's path.
#[derive(Debug)]
pub enum Found {
    /// Nothing: the file is made new.
    Nothing,
    /// A capture this receiver continues (or an empty file): `file` is open for writing at
    /// its end, `len` long (`cut`: the torn tail cut off); `link_type` is a pcap file's.
    Continue {
        file: File,
        len: u64,
        cut: u64,
        link_type: Option<u16>,
    },
    /// Something it must not touch: why.
    Other(String),
}

/// Looks at `path` as `format` output. Never follows a symlink there (that is "other").
pub fn inspect(path: &Path, format: Format) -> Found {
    let file = match program::private_file::open_existing(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::Nothing,
        Err(e) => return Found::Other(format!("cannot open it ({e})")),
    };
    match scan(&file, format) {
        Ok(Scan::Valid {
            len,
            file_len,
            link_type,
        }) => {
            let ready = file.set_len(len).and_then(|()| {
                let mut f = &file;
                f.seek(SeekFrom::Start(len)).map(drop)
            });
            match ready {
                Ok(()) => Found::Continue {
                    file,
                    len,
                    cut: file_len - len,
                    link_type,
                },
                Err(e) => Found::Other(format!("cannot cut its torn end ({e})")),
            }
        }
        Ok(Scan::Foreign(why)) => Found::Other(why),
        Err(e) => Found::Other(format!("cannot read it ({e})")),
    }
}

enum Scan {
    /// Whole records up to `len` of `file_len` bytes.
    Valid {
        len: u64,
        file_len: u64,
        link_type: Option<u16>,
    },
    Foreign(String),
}

fn scan(file: &File, format: Format) -> io::Result<Scan> {
    let file_len = file.metadata()?.len();
    if file_len == 0 {
        return Ok(Scan::Valid {
            len: 0,
            file_len,
            link_type: None,
        });
    }
    let mut reader = BufReader::with_capacity(1 << 20, file);
    match format {
        Format::Pcap => scan_pcap(&mut reader, file_len),
        Format::Pcapng => scan_pcapng(&mut reader, file_len),
    }
}

/// Checks the header is one this receiver writes (nanoseconds, host byte order, a snap
/// length that takes any packet) and finds the end of the last whole record.
fn scan_pcap<R: Read + Seek>(r: &mut BufReader<R>, file_len: u64) -> io::Result<Scan> {
    if file_len < PCAP_HEADER_LEN {
        return Ok(Scan::Foreign("shorter than a pcap header".into()));
    }
    let mut header = [0u8; PCAP_HEADER_LEN as usize];
    r.read_exact(&mut header)?;
    let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let magic = word(0);
    if magic != PCAP_NANO_MAGIC {
        let why = if magic == PCAP_MICRO_MAGIC {
            "a pcap file with microsecond timestamps (this receiver writes nanoseconds)"
        } else if magic.swap_bytes() == PCAP_NANO_MAGIC || magic.swap_bytes() == PCAP_MICRO_MAGIC {
            "a pcap file of the other byte order"
        } else {
            "not a pcap file"
        };
        return Ok(Scan::Foreign(why.into()));
    }
    let (major, snaplen, link) = (header[4..6].to_vec(), word(16), word(20));
    if u16::from_ne_bytes([major[0], major[1]]) != 2 {
        return Ok(Scan::Foreign("a pcap file of another version".into()));
    }
    if snaplen < protocol::MAX_SNAPLEN {
        return Ok(Scan::Foreign(format!(
            "a pcap file with snap length {snaplen}, below the {} this receiver writes",
            protocol::MAX_SNAPLEN
        )));
    }
    // The upper bits hold FCS information, which this receiver never writes.
    let Ok(link_type) = u16::try_from(link) else {
        return Ok(Scan::Foreign(format!("a pcap file of link type {link:#x}")));
    };
    let mut pos = PCAP_HEADER_LEN;
    let mut record = [0u8; PCAP_RECORD_HEADER_LEN as usize];
    while file_len - pos >= PCAP_RECORD_HEADER_LEN {
        r.read_exact(&mut record)?;
        let captured = u32::from_ne_bytes(record[8..12].try_into().expect("4 bytes"));
        if captured > snaplen {
            return Ok(Scan::Foreign(format!(
                "a record at byte {pos} is longer than the snap length: not a capture this \
                 receiver wrote"
            )));
        }
        let end = pos + PCAP_RECORD_HEADER_LEN + u64::from(captured);
        if end > file_len {
            break;
        }
        r.seek_relative(i64::from(captured))?;
        pos = end;
    }
    Ok(Scan::Valid {
        len: pos,
        file_len,
        link_type: Some(link_type),
    })
}

/// Walks the blocks (any sections, either byte order) and finds the end of the last whole
/// one.
fn scan_pcapng<R: Read + Seek>(r: &mut BufReader<R>, file_len: u64) -> io::Result<Scan> {
    let mut pos = 0u64;
    let mut big_endian = false;
    let mut head = [0u8; 8];
    while file_len - pos >= PCAPNG_MIN_BLOCK {
        r.read_exact(&mut head)?;
        let mut consumed = 8u64;
        let raw_type = u32::from_ne_bytes(head[0..4].try_into().expect("4 bytes"));
        if raw_type == PCAPNG_SHB {
            // The section's byte order, from its magic; the type reads the same either way.
            let mut magic = [0u8; 4];
            r.read_exact(&mut magic)?;
            consumed += 4;
            if magic == PCAPNG_BYTE_ORDER.to_be_bytes() {
                big_endian = true;
            } else if magic == PCAPNG_BYTE_ORDER.to_le_bytes() {
                big_endian = false;
            } else {
                return Ok(Scan::Foreign(format!(
                    "a section at byte {pos} has no byte-order magic"
                )));
            }
        } else if pos == 0 {
            return Ok(Scan::Foreign("not a pcapng file".into()));
        }
        let read_u32 = |b: [u8; 4]| {
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        let len = u64::from(read_u32(head[4..8].try_into().expect("4 bytes")));
        if len < PCAPNG_MIN_BLOCK.max(consumed + 4) || !len.is_multiple_of(4) {
            return Ok(Scan::Foreign(format!(
                "a block at byte {pos} has length {len}: not a capture this receiver wrote"
            )));
        }
        if pos + len > file_len {
            break;
        }
        r.seek_relative(i64::try_from(len - consumed - 4).unwrap_or(i64::MAX))?;
        let mut trailer = [0u8; 4];
        r.read_exact(&mut trailer)?;
        if u64::from(read_u32(trailer)) != len {
            return Ok(Scan::Foreign(format!(
                "the block at byte {pos} ends with another length: not a capture this \
                 receiver wrote"
            )));
        }
        pos += len;
    }
    if pos == 0 {
        return Ok(Scan::Foreign("shorter than a pcapng section header".into()));
    }
    Ok(Scan::Valid {
        len: pos,
        file_len,
        link_type: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn pcap(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::sink::pcap::write_header(&mut out, 113, crate::sink::pcap::Precision::Nano).unwrap();
        for data in records {
            crate::sink::pcap::write_record(
                &mut out,
                &crate::sink::OutPacket {
                    interface: 0,
                    timestamp_ns: 5,
                    original_len: data.len() as u32,
                    direction: protocol::Direction::Unknown,
                    data,
                    batch: Default::default(),
                    process: None,
                },
                crate::sink::pcap::Precision::Nano,
            )
            .unwrap();
        }
        out
    }

    fn scan_bytes(bytes: &[u8], format: Format) -> Scan {
        let mut r = BufReader::new(Cursor::new(bytes));
        match format {
            Format::Pcap => scan_pcap(&mut r, bytes.len() as u64).unwrap(),
            Format::Pcapng => scan_pcapng(&mut r, bytes.len() as u64).unwrap(),
        }
    }

    fn valid_len(scan: Scan) -> (u64, Option<u16>) {
        match scan {
            Scan::Valid { len, link_type, .. } => (len, link_type),
            Scan::Foreign(why) => panic!("foreign: {why}"),
        }
    }

    #[test]
    fn a_torn_pcap_record_is_cut_and_the_link_type_kept() {
        let whole = pcap(&[b"abc", b"defgh"]);
        assert_eq!(
            valid_len(scan_bytes(&whole, Format::Pcap)),
            (whole.len() as u64, Some(113))
        );
        let first_end = 24 + 16 + 3;
        for torn in [first_end + 1, first_end + 16, whole.len() - 1] {
            assert_eq!(
                valid_len(scan_bytes(&whole[..torn], Format::Pcap)).0,
                first_end as u64,
                "torn at {torn}"
            );
        }
    }

    #[test]
    fn other_pcap_files_are_not_continued() {
        let mut micro = pcap(&[b"x"]);
        micro[..4].copy_from_slice(&PCAP_MICRO_MAGIC.to_ne_bytes());
        let mut swapped = pcap(&[]);
        swapped[..4].copy_from_slice(&PCAP_NANO_MAGIC.to_be_bytes());
        if cfg!(target_endian = "big") {
            swapped[..4].copy_from_slice(&PCAP_NANO_MAGIC.to_le_bytes());
        }
        let mut small_snap = pcap(&[]);
        small_snap[16..20].copy_from_slice(&96u32.to_ne_bytes());
        let mut garbage = pcap(&[b"abc", b"def"]);
        garbage[24 + 8..24 + 12].copy_from_slice(&u32::MAX.to_ne_bytes());
        for (bytes, what) in [
            (micro, "microsecond"),
            (swapped, "byte order"),
            (small_snap, "snap length"),
            (garbage, "longer than the snap length"),
            (b"hello world, not a capture".to_vec(), "not a pcap"),
            (b"short".to_vec(), "shorter"),
        ] {
            match scan_bytes(&bytes, Format::Pcap) {
                Scan::Foreign(why) => assert!(why.contains(what), "{why}"),
                _ => panic!("{what}: continued"),
            }
        }
    }

    #[test]
    fn a_torn_pcapng_block_is_cut_and_sections_of_either_byte_order_walked() {
        let mut bytes = Vec::new();
        // A big-endian section (as another tool may have written), then one of ours.
        let mut shb_be = Vec::new();
        shb_be.extend_from_slice(&PCAPNG_SHB.to_be_bytes());
        shb_be.extend_from_slice(&28u32.to_be_bytes());
        shb_be.extend_from_slice(&PCAPNG_BYTE_ORDER.to_be_bytes());
        shb_be.extend_from_slice(&[0, 1, 0, 0]);
        shb_be.extend_from_slice(&u64::MAX.to_be_bytes());
        shb_be.extend_from_slice(&28u32.to_be_bytes());
        bytes.extend_from_slice(&shb_be);
        let mut sink = crate::sink::PcapNgSink::new(Vec::new()).unwrap();
        crate::sink::Sink::add_interface(
            &mut sink,
            &crate::sink::SinkInterface {
                name: "h/eth0".into(),
                link_type: 1,
                snaplen: 65535,
                filter: String::new(),
                description: String::new(),
                sensor: "h".into(),
                session: "0a1b2c3d".into(),
                session_id: 0x0a1b_2c3d,
            },
        )
        .unwrap();
        bytes.extend_from_slice(&sink.into_output());
        let whole = bytes.len();
        assert_eq!(
            valid_len(scan_bytes(&bytes, Format::Pcapng)).0,
            whole as u64
        );
        bytes.extend_from_slice(&[6, 0, 0, 0, 200, 0, 0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(
            valid_len(scan_bytes(&bytes, Format::Pcapng)).0,
            whole as u64,
            "a torn block is cut"
        );
        match scan_bytes(b"not a pcapng file at all", Format::Pcapng) {
            Scan::Foreign(why) => assert!(why.contains("not a pcapng"), "{why}"),
            _ => panic!("continued"),
        }
    }
}
