//! The few pcapng blocks the query reads (segments are written by the receiver in the
//! host's byte order, with nanosecond timestamps) and the capture it writes.

use std::io::{self, Write};

use crate::index::Candidate;

const SECTION_HEADER: u32 = 0x0A0D_0D0A;
const INTERFACE_DESCRIPTION: u32 = 1;
const ENHANCED_PACKET: u32 = 6;
/// Fixed part of an Enhanced Packet Block ahead of the data.
const EPB_HEADER: usize = 28;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// An Enhanced Packet Block's parts.
pub struct Packet<'a> {
    pub interface: u32,
    pub timestamp_ns: u64,
    pub original_len: u32,
    pub data: &'a [u8],
    /// The options, as they are (direction flags, the process comment).
    pub options: &'a [u8],
}

/// The Enhanced Packet Block `block` (exactly one block), if it is one.
pub fn packet(block: &[u8]) -> Option<Packet<'_>> {
    if u32_at(block, 0)? != ENHANCED_PACKET || u32_at(block, 4)? as usize != block.len() {
        return None;
    }
    let captured = u32_at(block, 20)? as usize;
    let padded = captured.div_ceil(4) * 4;
    let data = block.get(EPB_HEADER..EPB_HEADER + captured)?;
    let options = block.get(EPB_HEADER + padded..block.len().checked_sub(4)?)?;
    let timestamp = (u64::from(u32_at(block, 12)?) << 32) | u64::from(u32_at(block, 16)?);
    Some(Packet {
        interface: u32_at(block, 8)?,
        timestamp_ns: timestamp,
        original_len: u32_at(block, 24)?,
        data,
        options,
    })
}

/// Every packet of a whole segment, as the index would list them (without the batch keys,
/// which only the index holds): what a segment whose index is lost is read by. Stops at
/// the first block that is cut short.
pub fn scan(segment: &[u8]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let (Some(kind), Some(len)) = (u32_at(segment, at), u32_at(segment, at + 4)) {
        let len = len as usize;
        if len < 12 || at + len > segment.len() {
            break;
        }
        if kind == ENHANCED_PACKET {
            if let Some(p) = packet(&segment[at..at + len]) {
                out.push(Candidate {
                    timestamp_ns: p.timestamp_ns,
                    interface: p.interface,
                    key: None,
                    offset: at as u64,
                    length: len as u32,
                });
            }
        }
        at += len;
    }
    out
}

/// The end of the last whole block of `segment`: where a segment cut short by a crash is
/// cut to.
pub fn whole_blocks_len(segment: &[u8]) -> usize {
    let mut at = 0usize;
    while let Some(len) = u32_at(segment, at + 4) {
        let len = len as usize;
        if len < 12 || at + len > segment.len() {
            break;
        }
        at += len;
    }
    at
}

/// The capture a query writes.
pub enum Output<W: Write> {
    /// pcapng: a section header, then interfaces as they come.
    Pcapng(W),
    /// Classic pcap with nanosecond timestamps, of one link type.
    Pcap { out: W, link_type: Option<u16> },
}

impl<W: Write> Output<W> {
    pub fn pcapng(mut out: W) -> io::Result<Self> {
        let mut shb = Vec::with_capacity(28);
        shb.extend_from_slice(&SECTION_HEADER.to_ne_bytes());
        shb.extend_from_slice(&28u32.to_ne_bytes());
        shb.extend_from_slice(&0x1A2B_3C4Du32.to_ne_bytes());
        shb.extend_from_slice(&1u16.to_ne_bytes());
        shb.extend_from_slice(&0u16.to_ne_bytes());
        shb.extend_from_slice(&u64::MAX.to_ne_bytes());
        shb.extend_from_slice(&28u32.to_ne_bytes());
        out.write_all(&shb)?;
        Ok(Self::Pcapng(out))
    }

    pub fn pcap(out: W) -> Self {
        Self::Pcap {
            out,
            link_type: None,
        }
    }

    /// Describes an interface (pcapng), or fixes the link type (pcap: a second one is
    /// refused). The interfaces are numbered in the order they are added.
    pub fn add_interface(&mut self, name: &str, link_type: u16, snaplen: u32) -> io::Result<()> {
        match self {
            Self::Pcapng(out) => {
                let mut options = Vec::new();
                option(&mut options, 2, name.as_bytes());
                option(&mut options, 9, &[9]);
                options.extend_from_slice(&[0; 4]);
                let len = (20 + options.len()) as u32;
                let mut idb = Vec::with_capacity(len as usize);
                idb.extend_from_slice(&INTERFACE_DESCRIPTION.to_ne_bytes());
                idb.extend_from_slice(&len.to_ne_bytes());
                idb.extend_from_slice(&link_type.to_ne_bytes());
                idb.extend_from_slice(&0u16.to_ne_bytes());
                idb.extend_from_slice(&snaplen.to_ne_bytes());
                idb.extend_from_slice(&options);
                idb.extend_from_slice(&len.to_ne_bytes());
                out.write_all(&idb)
            }
            Self::Pcap { out, link_type: lt } => match lt {
                Some(lt) if *lt != link_type => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the answer holds link types {lt} and {link_type}: classic pcap takes \
                         one (use --format pcapng)"
                    ),
                )),
                Some(_) => Ok(()),
                None => {
                    *lt = Some(link_type);
                    let mut header = Vec::with_capacity(24);
                    header.extend_from_slice(&0xA1B2_3C4Du32.to_ne_bytes());
                    header.extend_from_slice(&2u16.to_ne_bytes());
                    header.extend_from_slice(&4u16.to_ne_bytes());
                    header.extend_from_slice(&[0; 8]);
                    header.extend_from_slice(&snaplen.max(262_144).to_ne_bytes());
                    header.extend_from_slice(&u32::from(link_type).to_ne_bytes());
                    out.write_all(&header)
                }
            },
        }
    }

    /// Writes `packet` as a packet of the output's interface `interface`.
    pub fn write(&mut self, interface: u32, packet: &Packet<'_>) -> io::Result<()> {
        let seconds = (packet.timestamp_ns / 1_000_000_000) as u32;
        let nanos = (packet.timestamp_ns % 1_000_000_000) as u32;
        let captured = packet.data.len() as u32;
        match self {
            Self::Pcapng(out) => {
                let padded = packet.data.len().div_ceil(4) * 4;
                let len = (EPB_HEADER + padded + packet.options.len() + 4) as u32;
                let mut head = [0u8; EPB_HEADER];
                head[0..4].copy_from_slice(&ENHANCED_PACKET.to_ne_bytes());
                head[4..8].copy_from_slice(&len.to_ne_bytes());
                head[8..12].copy_from_slice(&interface.to_ne_bytes());
                head[12..16].copy_from_slice(&((packet.timestamp_ns >> 32) as u32).to_ne_bytes());
                head[16..20].copy_from_slice(&(packet.timestamp_ns as u32).to_ne_bytes());
                head[20..24].copy_from_slice(&captured.to_ne_bytes());
                head[24..28].copy_from_slice(&packet.original_len.to_ne_bytes());
                out.write_all(&head)?;
                out.write_all(packet.data)?;
                out.write_all(&[0; 3][..padded - packet.data.len()])?;
                out.write_all(packet.options)?;
                out.write_all(&len.to_ne_bytes())
            }
            Self::Pcap { out, .. } => {
                let mut head = [0u8; 16];
                head[0..4].copy_from_slice(&seconds.to_ne_bytes());
                head[4..8].copy_from_slice(&nanos.to_ne_bytes());
                head[8..12].copy_from_slice(&captured.to_ne_bytes());
                head[12..16].copy_from_slice(&packet.original_len.to_ne_bytes());
                out.write_all(&head)?;
                out.write_all(packet.data)
            }
        }
    }

    /// Ends the capture: a classic pcap that got no packet still gets its header, of
    /// `link_type`.
    pub fn complete(&mut self, link_type: u16) -> io::Result<()> {
        if let Self::Pcap {
            link_type: None, ..
        } = self
        {
            self.add_interface("", link_type, 0)?;
        }
        self.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Pcapng(out) | Self::Pcap { out, .. } => out.flush(),
        }
    }
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_ne_bytes());
    out.extend_from_slice(&(value.len() as u16).to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (4 - value.len() % 4) % 4, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_packet_reads_back() {
        let mut out = Output::pcapng(Vec::new()).unwrap();
        out.add_interface("h/eth0", 1, 65535).unwrap();
        let p = Packet {
            interface: 7,
            timestamp_ns: 1_700_000_000_123_456_789,
            original_len: 60,
            data: &[1, 2, 3, 4, 5],
            options: &[],
        };
        out.write(0, &p).unwrap();
        let Output::Pcapng(bytes) = out else { panic!() };
        let found = scan(&bytes);
        assert_eq!(found.len(), 1);
        let c = found[0];
        let back =
            packet(&bytes[c.offset as usize..(c.offset + u64::from(c.length)) as usize]).unwrap();
        assert_eq!(back.timestamp_ns, p.timestamp_ns);
        assert_eq!(back.data, p.data);
        assert_eq!(back.original_len, 60);
        assert_eq!(
            whole_blocks_len(&bytes[..bytes.len() - 1]),
            c.offset as usize
        );
    }
}
