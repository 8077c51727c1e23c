//! Classic pcap: files with nanosecond timestamps (magic a1b23c4d), the live stream with
//! microsecond ones by default (magic a1b2c3d4, which every reader takes). It holds one link
//! type, fixed by the first interface; the header waits for it.

use std::io::{self, Write};
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapTsResolution};
use pcap_file::DataLink;
use protocol::InterfaceStats;

use super::{native_endianness, to_io, OutPacket, Refusal, Sink, SinkInterface};

/// Link type written when no sensor ever connected: Ethernet, the common case.
const DEFAULT_LINK_TYPE: u16 = 1;

pub struct PcapSink<W: Write> {
    out: W,
    /// Set once the header is written, by the first interface.
    link_type: Option<u16>,
}

impl<W: Write + Send> PcapSink<W> {
    pub fn new(out: W) -> Self {
        Self::continuing(out, None)
    }

    /// Goes on after a header for `link_type` that `out` holds already, if given.
    pub fn continuing(out: W, link_type: Option<u16>) -> Self {
        Self { out, link_type }
    }

    pub fn output(&self) -> &W {
        &self.out
    }

    pub fn output_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_output(self) -> W {
        self.out
    }

    /// Makes the output a valid file even if no interface came: the header, for Ethernet.
    pub fn complete(&mut self) -> io::Result<()> {
        self.start(DEFAULT_LINK_TYPE)
    }

    /// Writes the header once, for the first link type.
    fn start(&mut self, link_type: u16) -> io::Result<()> {
        if self.link_type.is_none() {
            write_header(&mut self.out, link_type, Precision::Nano)?;
            self.link_type = Some(link_type);
        }
        Ok(())
    }
}

impl<W: Write + Send> Sink for PcapSink<W> {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        check_link_type(
            self.link_type,
            interfaces,
            "this receiver writes classic pcap",
            "restart the receiver with --format pcapng to merge different link types",
        )
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        self.start(interface.link_type)?;
        Ok(0)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        if self.link_type.is_none() {
            return Err(io::Error::other("pcap header not written"));
        }
        write_record(&mut self.out, packet, Precision::Nano)
    }

    fn write_stats(&mut self, _interface: u32, _stats: &InterfaceStats) -> io::Result<()> {
        // Classic pcap has no place for counters; the exit summary shows them.
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.complete()?;
        self.flush()
    }
}

/// What the timestamps of a classic pcap stream count below the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// Microseconds (magic a1b2c3d4): every reader takes it, Arkime's PCAP-over-IP reader
    /// only this one before its version 5, and correctly only this one before 6.6.
    #[value(name = "us")]
    Micro,
    /// Nanoseconds (magic a1b23c4d), as the sensors stamp packets.
    #[value(name = "ns")]
    Nano,
}

/// The 24-byte file header: timestamps of `precision`, the host's byte order.
pub(super) fn write_header<W: Write>(
    out: &mut W,
    link_type: u16,
    precision: Precision,
) -> io::Result<()> {
    let header = PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: protocol::MAX_SNAPLEN,
        datalink: DataLink::from(u32::from(link_type)),
        ts_resolution: match precision {
            Precision::Micro => PcapTsResolution::MicroSecond,
            Precision::Nano => PcapTsResolution::NanoSecond,
        },
        endianness: native_endianness(),
    };
    header.write_to(out).map(drop).map_err(to_io)
}

/// One record: its 16-byte header in the host's byte order (as the file header says), then
/// the data. The captured length is the data's, the original length the sensor's: they are
/// equal unless the sensor's snap length (or the file it read) cut the packet.
pub(super) fn write_record<W: Write>(
    out: &mut W,
    packet: &OutPacket,
    precision: Precision,
) -> io::Result<()> {
    let captured = u32::try_from(packet.data.len())
        .ok()
        .filter(|&n| n <= protocol::MAX_SNAPLEN)
        .ok_or_else(|| io::Error::other("packet longer than the snap length"))?;
    let ts = pcap_timestamp(packet.timestamp_ns);
    // Pinned to u32::MAX seconds above, so the cast keeps the value.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&(ts.as_secs() as u32).to_ne_bytes());
    let fraction = match precision {
        Precision::Micro => ts.subsec_micros(),
        Precision::Nano => ts.subsec_nanos(),
    };
    header[4..8].copy_from_slice(&fraction.to_ne_bytes());
    header[8..12].copy_from_slice(&captured.to_ne_bytes());
    header[12..16].copy_from_slice(&packet.original_len.to_ne_bytes());
    out.write_all(&header)?;
    out.write_all(packet.data)
}

/// Refuses interfaces whose link type differs from the output's (`current`, else the first
/// of them): a classic pcap stream holds one. `what` and `remedy` frame the message.
pub(super) fn check_link_type(
    current: Option<u16>,
    interfaces: &[SinkInterface],
    what: &str,
    remedy: &str,
) -> Result<(), Refusal> {
    let Some(first) = current.or_else(|| interfaces.first().map(|i| i.link_type)) else {
        return Ok(());
    };
    match interfaces.iter().find(|i| i.link_type != first) {
        None => Ok(()),
        Some(other) => Err(Refusal::LinkType(format!(
            "{what} with link type {}; sensor interface '{}' has link type {}; {remedy}",
            link_type_name(first),
            other.name,
            number_and_name(other.link_type)
        ))),
    }
}

/// Classic pcap keeps seconds in 32 bits: a sensor clock past 2106 is pinned there rather
/// than stopping the whole output.
fn pcap_timestamp(ns: u64) -> Duration {
    let t = Duration::from_nanos(ns);
    if t.as_secs() > u64::from(u32::MAX) {
        Duration::new(u64::from(u32::MAX), t.subsec_nanos())
    } else {
        t
    }
}

/// "EN10MB (1)": libpcap's name where we know it, and the number.
pub fn link_type_name(link_type: u16) -> String {
    let name = match link_type {
        0 => "NULL",
        1 => "EN10MB",
        101 => "RAW",
        105 => "IEEE802_11",
        113 => "LINUX_SLL",
        127 => "IEEE802_11_RADIO",
        228 => "IPV4",
        229 => "IPV6",
        276 => "LINUX_SLL2",
        _ => return format!("{link_type}"),
    };
    format!("{name} ({link_type})")
}

/// "113 (LINUX_SLL)": the number first, as the sensor's interface reports it.
fn number_and_name(link_type: u16) -> String {
    match link_type_name(link_type).split_once(' ') {
        Some((name, _)) => format!("{link_type} ({name})"),
        None => link_type.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing::Shared;
    use pcap_file::pcap::PcapReader;
    use protocol::Direction;

    fn iface(name: &str, link_type: u16) -> SinkInterface {
        SinkInterface {
            name: name.into(),
            link_type,
            snaplen: 262_144,
            filter: String::new(),
            description: String::new(),
            sensor: name.into(),
            session: "0a1b2c3d".into(),
            session_id: 0x0a1b_2c3d,
        }
    }

    #[test]
    fn writes_nanosecond_pcap_readable_back() {
        let out = Shared::default();
        let mut sink = Box::new(PcapSink::new(out.clone()));
        let idx = sink.add_interface(&iface("h/eth0", 1)).unwrap();
        // A second interface of the same link type shares the file.
        assert_eq!(sink.add_interface(&iface("h2/eth1", 1)).unwrap(), 0);
        for (ts, data) in [
            (1_700_000_000_123_456_789u64, &[1u8, 2, 3][..]),
            (1_700_000_001_000_000_001, &[4u8][..]),
        ] {
            sink.write_packet(&OutPacket {
                interface: idx,
                timestamp_ns: ts,
                original_len: 60,
                direction: Direction::Unknown,
                data,
                batch: Default::default(),
                process: None,
            })
            .unwrap();
        }
        sink.finish().unwrap();
        let bytes = out.bytes();
        assert_eq!(&bytes[..4], &0xa1b23c4du32.to_ne_bytes());
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        assert_eq!(reader.header().datalink, DataLink::ETHERNET);
        let first = reader.next_packet().unwrap().unwrap();
        assert_eq!(first.timestamp().as_nanos(), 1_700_000_000_123_456_789);
        assert_eq!((first.orig_len(), first.data()), (60, &[1u8, 2, 3][..]));
        assert!(reader.next_packet().unwrap().is_ok());
        assert!(reader.next_packet().is_none());
    }

    #[test]
    fn refuses_a_second_link_type_and_points_to_pcapng() {
        let mut sink = PcapSink::new(Shared::default());
        assert!(sink
            .check(&[iface("a/eth0", 1), iface("a/any", 276)])
            .is_err());
        sink.add_interface(&iface("a/eth0", 1)).unwrap();
        let Err(Refusal::LinkType(err)) = sink.check(&[iface("b/any", 276)]) else {
            panic!("a second link type is refused as such");
        };
        assert!(
            err.contains("link type EN10MB (1)")
                && err.contains("link type 276 (LINUX_SLL2)")
                && err.contains("--format pcapng"),
            "{err}"
        );
        assert!(sink.check(&[iface("b/eth1", 1)]).is_ok());
    }

    #[test]
    fn a_clock_past_2106_is_pinned_not_fatal() {
        let out = Shared::default();
        let mut sink = Box::new(PcapSink::new(out.clone()));
        sink.add_interface(&iface("h/eth0", 1)).unwrap();
        sink.write_packet(&OutPacket {
            interface: 0,
            timestamp_ns: u64::MAX,
            original_len: 1,
            direction: Direction::Unknown,
            data: &[0],
            batch: Default::default(),
            process: None,
        })
        .unwrap();
        sink.finish().unwrap();
        let bytes = out.bytes();
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        let p = reader.next_packet().unwrap().unwrap();
        assert_eq!(p.timestamp().as_secs(), u64::from(u32::MAX));
    }

    #[test]
    fn an_empty_capture_is_still_a_valid_file() {
        let out = Shared::default();
        Box::new(PcapSink::new(out.clone())).finish().unwrap();
        let bytes = out.bytes();
        let mut reader = PcapReader::new(&bytes[..]).unwrap();
        assert!(reader.next_packet().is_none());
    }
}
