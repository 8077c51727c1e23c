//! What PCAP-over-IP readers that cannot run here accept of a stream, applied to the bytes a
//! test read: Arkime's `capture/reader-pcapoverip.c` and Zeek's `zeek -r -` (libpcap's
//! offline reader, which tcpdump applies as well, plus Zeek's own check of empty records).

use anyhow::{bail, ensure, Result};

/// The largest record data every Arkime release takes: before 5.0 its reader's buffer held
/// 0xffff bytes, record header included, and a larger record never fit (the reader stalled);
/// later ones close the connection past 0xffff bytes of data.
pub const ARKIME_MAX_CAPLEN: u32 = 0xffff - 16;

/// Checks `stream` (a whole pcap stream as a client read it) against what every Arkime
/// release's PCAP-over-IP reader requires, and returns its record count:
/// - the microsecond magic, in either byte order (the bytes a1 b2 c3 d4 or d4 c3 b2 a1);
///   before 5.0 no other magic is taken (the connection is dropped at the header), and
///   before 6.6 a nanosecond stream is read with its nanoseconds taken as microseconds;
/// - Ethernet: releases before 5.0 take every stream as Ethernet whatever its header says;
/// - every record's captured length equal to its original length (before 5.0 the capture
///   process exits on the first that is not, later releases skip the record) and at most
///   [`ARKIME_MAX_CAPLEN`];
/// - whole records up to the end (Zeek's libpcap would report a truncated one), none empty
///   (Zeek reports an `empty_pcap_header` weird for those).
pub fn arkime_records(stream: &[u8]) -> Result<usize> {
    ensure!(stream.len() >= 24, "{} bytes: no pcap header", stream.len());
    let big_endian = match stream[..4] {
        [0xa1, 0xb2, 0xc3, 0xd4] => true,
        [0xd4, 0xc3, 0xb2, 0xa1] => false,
        _ => bail!(
            "magic {:02x?}: not microsecond pcap, which Arkime before 5.0 drops at the header",
            &stream[..4]
        ),
    };
    let u32_at = |at: usize| {
        let b: [u8; 4] = stream[at..at + 4].try_into().expect("4 bytes");
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    ensure!(u32_at(20) == 1, "link type {}, not Ethernet", u32_at(20));
    let mut at = 24;
    let mut records = 0;
    while at < stream.len() {
        ensure!(at + 16 <= stream.len(), "record {records}: torn header");
        let (usec, caplen, origlen) = (u32_at(at + 4), u32_at(at + 8), u32_at(at + 12));
        ensure!(usec < 1_000_000, "record {records}: {usec} microseconds");
        ensure!(
            caplen == origlen,
            "record {records}: caplen {caplen} != origlen {origlen}"
        );
        ensure!(caplen > 0, "record {records}: empty");
        ensure!(
            caplen <= ARKIME_MAX_CAPLEN,
            "record {records}: {caplen} bytes, more than Arkime takes"
        );
        at += 16 + caplen as usize;
        ensure!(at <= stream.len(), "record {records}: torn data");
        records += 1;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(magic: [u8; 4], link_type: u32, records: &[(u32, u32)]) -> Vec<u8> {
        let mut s = magic.to_vec();
        s.extend_from_slice(&[0, 2, 0, 4]);
        s.extend_from_slice(&[0; 8]);
        s.extend_from_slice(&262_144u32.to_be_bytes());
        s.extend_from_slice(&link_type.to_be_bytes());
        for &(caplen, origlen) in records {
            for v in [1u32, 5, caplen, origlen] {
                s.extend_from_slice(&v.to_be_bytes());
            }
            s.extend(std::iter::repeat_n(0u8, caplen as usize));
        }
        s
    }

    #[test]
    fn the_rules_refuse_what_arkime_refuses() {
        let micro = [0xa1, 0xb2, 0xc3, 0xd4];
        assert_eq!(
            arkime_records(&stream(micro, 1, &[(60, 60), (1514, 1514)])).unwrap(),
            2
        );
        for bad in [
            stream([0xa1, 0xb2, 0x3c, 0x4d], 1, &[(60, 60)]),
            stream(micro, 276, &[(60, 60)]),
            stream(micro, 1, &[(60, 61)]),
            stream(micro, 1, &[(0, 0)]),
            stream(micro, 1, &[(70_000, 70_000)]),
            stream(micro, 1, &[(60, 60)])[..24 + 16 + 59].to_vec(),
        ] {
            assert!(arkime_records(&bad).is_err());
        }
    }
}
