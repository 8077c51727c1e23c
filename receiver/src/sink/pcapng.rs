//! pcapng: one Interface Description Block per sensor interface, Enhanced Packet Blocks
//! with the direction in epb_flags, and Interface Statistics Blocks with each sensor's
//! counters.

use std::borrow::Cow;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use pcap_file::pcapng::blocks::custom::CustomUtf8Option;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption, InterfaceTsResolution,
};
use pcap_file::pcapng::blocks::interface_statistics::{
    InterfaceStatisticsBlock, InterfaceStatisticsOption,
};
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::{Block, PcapNgWriter};
use pcap_file::DataLink;
use protocol::{Direction, DropReason, InterfaceStats};

use super::secrets::{self, Pending, COUNTERS as SECRETS};
use super::{native_endianness, to_io, OutPacket, Refusal, Sink, SinkInterface};
use std::sync::atomic::Ordering::Relaxed;

/// The Private Enterprise Number of capstream's custom options. Provisional: capstream has
/// no number of its own yet, and this is the one IANA reserves for documentation (RFC 5612),
/// which no one else's options use; it changes once capstream is registered.
pub const CAPSTREAM_PEN: u32 = 32473;

/// Interface blocks one file (section) takes: a sensor whose interfaces would pass it is
/// refused. Rotated files describe only the interfaces of sessions still open.
pub const MAX_INTERFACES: usize = 16_384;

pub struct PcapNgSink<W: Write> {
    writer: PcapNgWriter<W>,
    interfaces: u32,
    /// The option list of the packet being written, kept so that it is allocated once.
    epb_options: Vec<EnhancedPacketOption<'static>>,
    /// Each interface's link type, to find the ClientHellos that TLS keys wait for.
    link_types: Vec<u16>,
    /// Key log lines written whose ClientHello has not been (boxed: most files hold none,
    /// and the sink stays small).
    pending: Box<Pending>,
    /// A Decryption Secrets Block being made, kept so that it is allocated once.
    block: Vec<u8>,
}

impl<W: Write + Send> PcapNgSink<W> {
    pub fn new(out: W) -> io::Result<Self> {
        let section = SectionHeaderBlock {
            endianness: native_endianness(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Borrowed(
                concat!("Capstream receiver ", env!("CARGO_PKG_VERSION")),
            ))],
            ..SectionHeaderBlock::default()
        };
        let writer = PcapNgWriter::with_section_header(out, section).map_err(to_io)?;
        Ok(Self {
            writer,
            interfaces: 0,
            epb_options: Vec::with_capacity(3),
            link_types: Vec::new(),
            pending: Box::default(),
            block: Vec::new(),
        })
    }

    /// The key log lines this file wrote whose ClientHello it has not: the next file
    /// (rotation, a new section) starts with them. They leave this file's care.
    pub fn take_pending_secrets(&mut self) -> Pending {
        std::mem::take(&mut *self.pending)
    }

    /// Starts the file with the lines an earlier one left waiting.
    pub fn carry_secrets(&mut self, pending: Pending) -> io::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let lines = pending.lines();
        self.write_block(&lines)?;
        SECRETS
            .carried
            .fetch_add(secrets::count_lines(&lines), Relaxed);
        *self.pending = pending;
        Ok(())
    }

    fn write_block(&mut self, lines: &[u8]) -> io::Result<()> {
        self.block.clear();
        ::lake::pcapng::encode_secrets(lines, &mut self.block);
        self.writer.get_mut().write_all(&self.block)
    }

    pub fn output(&self) -> &W {
        self.writer.get_ref()
    }

    pub fn output_mut(&mut self) -> &mut W {
        self.writer.get_mut()
    }

    pub fn into_output(self) -> W {
        self.writer.into_inner()
    }
}

impl<W: Write + Send> Sink for PcapNgSink<W> {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        if self.interfaces as usize + interfaces.len() > MAX_INTERFACES {
            return Err(Refusal::Full(format!(
                "this pcapng file describes {} interfaces, the most one file takes is \
                 {MAX_INTERFACES}; rotate files (--rotate-size, --rotate-time) to drop those \
                 of sensors gone",
                self.interfaces
            )));
        }
        Ok(())
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        let mut options = vec![
            InterfaceDescriptionOption::IfName(Cow::Borrowed(&interface.name)),
            InterfaceDescriptionOption::IfDescription(Cow::Borrowed(&interface.description)),
            InterfaceDescriptionOption::IfTsResol(InterfaceTsResolution::NANO),
        ];
        if !interface.filter.is_empty() {
            // if_filter: a first octet of 0 says "libpcap filter string".
            let mut filter = Vec::with_capacity(interface.filter.len() + 1);
            filter.push(0);
            filter.extend_from_slice(interface.filter.as_bytes());
            options.push(InterfaceDescriptionOption::IfFilter(Cow::Owned(filter)));
        }
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::from(u32::from(interface.link_type)),
            snaplen: interface.snaplen,
            options,
        };
        self.writer.write_pcapng_block(idb).map_err(to_io)?;
        self.link_types.push(interface.link_type);
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        if !self.pending.is_empty() {
            if let Some(&link_type) = self.link_types.get(packet.interface as usize) {
                self.pending.packet(link_type, packet.data);
            }
        }
        let flags = match packet.direction {
            Direction::Unknown => None,
            Direction::Inbound => Some(1),
            Direction::Outbound => Some(2),
        };
        let mut options = std::mem::take(&mut self.epb_options);
        options.clear();
        options.extend(flags.map(EnhancedPacketOption::Flags));
        if let Some(attribution) = packet.process {
            options.push(EnhancedPacketOption::Common(CommonOption::Comment(
                Cow::Borrowed(&attribution.comment),
            )));
            options.push(EnhancedPacketOption::Common(
                CommonOption::CustomUtf8Copiable(CustomUtf8Option {
                    pen: CAPSTREAM_PEN,
                    value: Cow::Borrowed(&attribution.fields),
                }),
            ));
        }
        let block = Block::EnhancedPacket(EnhancedPacketBlock {
            interface_id: packet.interface,
            // 64-bit nanoseconds: every u64 value fits.
            timestamp: Duration::from_nanos(packet.timestamp_ns),
            original_len: packet.original_len,
            data: Cow::Borrowed(packet.data),
            options,
        });
        let result = self.writer.write_block(&block).map(drop).map_err(to_io);
        if let Block::EnhancedPacket(epb) = block {
            // Take the list's allocation back. It holds nothing borrowed once emptied; the
            // collect reuses the allocation in place (same element type but for lifetime).
            let mut options = epb.options;
            options.clear();
            // filter_map, not filter: the element type changes (to the 'static lifetime).
            #[allow(clippy::unnecessary_filter_map)]
            let reused = options.into_iter().filter_map(|_| None).collect();
            self.epb_options = reused;
        }
        result
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        let kernel = stats
            .drops
            .iter()
            .find(|(r, _)| *r == DropReason::KERNEL_BUFFER)
            .map_or(0, |(_, n)| *n);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let isb = InterfaceStatisticsBlock {
            interface_id: interface,
            timestamp: now,
            options: vec![
                InterfaceStatisticsOption::IsbIfRecv(stats.seen),
                InterfaceStatisticsOption::IsbIfDrop(stats.dropped()),
                InterfaceStatisticsOption::IsbFilterAccept(stats.matched),
                InterfaceStatisticsOption::IsbOsDrop(kernel),
                InterfaceStatisticsOption::IsbUsrDeliv(stats.delivered),
            ],
        };
        self.writer.write_pcapng_block(isb).map(drop).map_err(to_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.get_mut().flush()
    }

    fn write_secrets(&mut self, _interface: u32, lines: &[u8]) -> io::Result<bool> {
        self.write_block(lines)?;
        for line in lines.split_inclusive(|&b| b == b'\n') {
            self.pending.add(line);
        }
        SECRETS
            .written
            .fetch_add(secrets::count_lines(lines), Relaxed);
        Ok(true)
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.pending.give_up();
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing::{interface as iface, Shared};
    use pcap_file::pcapng::PcapNgReader;

    #[test]
    fn interfaces_packets_and_stats_read_back() {
        let out = Shared::default();
        let mut sink = Box::new(PcapNgSink::new(out.clone()).unwrap());
        let a = sink.add_interface(&iface("h1/eth0", 1, "port 53")).unwrap();
        let b = sink.add_interface(&iface("h2/any", 276, "")).unwrap();
        assert_eq!((a, b), (0, 1));
        sink.write_packet(&OutPacket {
            interface: b,
            timestamp_ns: 1_700_000_000_000_000_007,
            original_len: 100,
            direction: Direction::Outbound,
            data: &[9u8; 20],
            batch: Default::default(),
            process: None,
        })
        .unwrap();
        assert!(
            sink.epb_options.capacity() >= 1,
            "the option list's allocation is reused from packet to packet"
        );
        let stats = InterfaceStats {
            interface_id: 0,
            seen: 10,
            matched: 5,
            delivered: 4,
            drops: vec![(DropReason::KERNEL_BUFFER, 1)],
        };
        sink.write_stats(a, &stats).unwrap();
        sink.finish().unwrap();

        let bytes = out.bytes();
        let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
        let mut names = Vec::new();
        let mut packets = 0;
        let mut isbs = 0;
        while let Some(block) = reader.next_block() {
            match block.unwrap().0 {
                Block::InterfaceDescription(idb) => {
                    for o in &idb.options {
                        if let InterfaceDescriptionOption::IfName(n) = o {
                            names.push(n.to_string());
                        }
                        if let InterfaceDescriptionOption::IfFilter(f) = o {
                            assert_eq!(&f[..], b"\0port 53");
                        }
                    }
                }
                Block::EnhancedPacket(epb) => {
                    packets += 1;
                    assert_eq!(epb.interface_id, 1);
                    assert_eq!(epb.timestamp.as_nanos(), 1_700_000_000_000_000_007);
                    assert!(epb.options.contains(&EnhancedPacketOption::Flags(2)));
                }
                Block::InterfaceStatistics(isb) => {
                    isbs += 1;
                    assert!(isb
                        .options
                        .contains(&InterfaceStatisticsOption::IsbFilterAccept(5)));
                    assert!(isb
                        .options
                        .contains(&InterfaceStatisticsOption::IsbOsDrop(1)));
                }
                _ => {}
            }
        }
        assert_eq!(names, ["h1/eth0", "h2/any"]);
        assert_eq!((packets, isbs), (1, 1));
    }

    /// An attributed packet carries its process twice: as the comment (ptcpdump's format)
    /// and as capstream's custom option (JSON, under [`CAPSTREAM_PEN`]).
    #[test]
    fn attributed_packets_carry_a_comment_and_a_custom_option() {
        let attribution = protocol::Attribution::new(protocol::Process {
            pid: 41,
            thread_name: "curl".into(),
            ..protocol::Process::default()
        });
        let out = Shared::default();
        let mut sink = Box::new(PcapNgSink::new(out.clone()).unwrap());
        let a = sink.add_interface(&iface("h1/eth0", 1, "")).unwrap();
        for process in [Some(&attribution), None] {
            sink.write_packet(&OutPacket {
                interface: a,
                timestamp_ns: 1,
                original_len: 20,
                direction: Direction::Inbound,
                data: &[9u8; 20],
                process,
                batch: Default::default(),
            })
            .unwrap();
        }
        sink.finish().unwrap();
        let bytes = out.bytes();
        let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
        let mut options = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Block::EnhancedPacket(epb) = block.unwrap().0 {
                options.push(
                    epb.options
                        .into_iter()
                        .map(|o| o.into_owned())
                        .collect::<Vec<_>>(),
                );
            }
        }
        let custom =
            EnhancedPacketOption::Common(CommonOption::CustomUtf8Copiable(CustomUtf8Option {
                pen: CAPSTREAM_PEN,
                value: Cow::Owned(attribution.fields.clone()),
            }));
        let comment = EnhancedPacketOption::Common(CommonOption::Comment(Cow::Owned(
            attribution.comment.clone(),
        )));
        assert_eq!(
            options,
            [
                vec![EnhancedPacketOption::Flags(1), comment, custom],
                vec![EnhancedPacketOption::Flags(1)]
            ]
        );
    }

    #[test]
    fn a_file_takes_a_bounded_number_of_interfaces() {
        let mut sink = PcapNgSink::new(io::sink()).unwrap();
        let one = iface("h/eth0", 1, "");
        for _ in 0..MAX_INTERFACES - 1 {
            sink.add_interface(&one).unwrap();
        }
        assert!(sink.check(std::slice::from_ref(&one)).is_ok());
        let Err(Refusal::Full(err)) = sink.check(&[one.clone(), one]) else {
            panic!("past the cap, the file is full for now");
        };
        assert!(err.contains("--rotate-size"), "{err}");
    }
}
