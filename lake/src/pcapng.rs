//! The few pcapng blocks the query reads (segments are written by the receiver in the
//! host's byte order, with nanosecond timestamps) and the capture it writes.

use std::io::{self, Write};
use std::ops::Range;

use crate::index::Candidate;

const SECTION_HEADER: u32 = 0x0A0D_0D0A;
const INTERFACE_DESCRIPTION: u32 = 1;
const ENHANCED_PACKET: u32 = 6;
const DECRYPTION_SECRETS: u32 = 0x0A;
/// A Decryption Secrets Block's secrets type: TLS key log (NSS key log lines).
const TLS_KEY_LOG: u32 = 0x544c_534b;
/// Fixed part of a Decryption Secrets Block ahead of the secrets.
const DSB_HEADER: usize = 16;
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

/// The whole blocks of a segment, in order: where each starts, its type and its bytes.
/// Ends at the first block that is cut short.
struct Blocks<'a> {
    segment: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Blocks<'a> {
    type Item = (usize, u32, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let kind = u32_at(self.segment, self.at)?;
        let len = u32_at(self.segment, self.at + 4)? as usize;
        if len < 12 || self.at + len > self.segment.len() {
            return None;
        }
        let at = self.at;
        self.at += len;
        Some((at, kind, &self.segment[at..at + len]))
    }
}

fn blocks(segment: &[u8]) -> Blocks<'_> {
    Blocks { segment, at: 0 }
}

/// Every packet of a whole segment, as the index would list them (without the batch keys,
/// which only the index holds): what a segment whose index is lost is read by. Stops at
/// the first block that is cut short.
pub fn scan(segment: &[u8]) -> Vec<Candidate> {
    blocks(segment)
        .filter(|&(_, kind, _)| kind == ENHANCED_PACKET)
        .filter_map(|(at, _, block)| {
            let p = packet(block)?;
            Some(Candidate {
                timestamp_ns: p.timestamp_ns,
                interface: p.interface,
                key: None,
                offset: at as u64,
                length: block.len() as u32,
            })
        })
        .collect()
}

/// The end of the last whole block of `segment`: where a segment cut short by a crash is
/// cut to.
pub fn whole_blocks_len(segment: &[u8]) -> usize {
    blocks(segment)
        .last()
        .map_or(0, |(at, _, block)| at + block.len())
}

/// The byte ranges of the TLS key log Decryption Secrets Blocks among the whole blocks of
/// `segment`: what a segment recovered after a crash lists in its manifest.
pub fn secrets_ranges(segment: &[u8]) -> Vec<Range<u64>> {
    blocks(segment)
        .filter(|&(_, _, block)| secrets(block).is_some())
        .map(|(at, _, block)| at as u64..(at + block.len()) as u64)
        .collect()
}

/// The key log lines of a TLS key log Decryption Secrets Block `block` (exactly one
/// block), if it is one.
pub fn secrets(block: &[u8]) -> Option<&[u8]> {
    if u32_at(block, 0)? != DECRYPTION_SECRETS
        || u32_at(block, 4)? as usize != block.len()
        || u32_at(block, 8)? != TLS_KEY_LOG
    {
        return None;
    }
    let len = u32_at(block, 12)? as usize;
    block
        .get(DSB_HEADER..(DSB_HEADER + len).min(block.len().checked_sub(4)?))
        .filter(|lines| lines.len() == len)
}

/// Appends a Decryption Secrets Block holding the TLS key log `lines` (each ending in a
/// newline) to `out`, in the host's byte order.
pub fn encode_secrets(lines: &[u8], out: &mut Vec<u8>) {
    let padded = lines.len().next_multiple_of(4);
    let total = u32::try_from(DSB_HEADER + padded + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&DECRYPTION_SECRETS.to_ne_bytes());
    out.extend_from_slice(&total.to_ne_bytes());
    out.extend_from_slice(&TLS_KEY_LOG.to_ne_bytes());
    out.extend_from_slice(&u32::try_from(lines.len()).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(lines);
    out.resize(out.len() + padded - lines.len(), 0);
    out.extend_from_slice(&total.to_ne_bytes());
}

/// The capture a query writes.
pub enum Output<W: Write> {
    /// pcapng: a section header, then interfaces as they come.
    Pcapng {
        out: W,
        /// Key log blocks that came before the first interface, held until it is
        /// described: Wireshark's tools (editcap, mergecap) take a file's interfaces from
        /// the blocks right after its section header, and refuse to rewrite a file that
        /// starts with another block. None once an interface is described.
        held_secrets: Option<Vec<u8>>,
    },
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
        Ok(Self::Pcapng {
            out,
            held_secrets: Some(Vec::new()),
        })
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
            Self::Pcapng { out, held_secrets } => {
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
                out.write_all(&idb)?;
                // Still ahead of every packet: packets need an interface first.
                match held_secrets.take() {
                    Some(held) => out.write_all(&held),
                    None => Ok(()),
                }
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
            Self::Pcapng { out, .. } => {
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

    /// Writes TLS key log `lines` in a Decryption Secrets Block (pcapng); false for a
    /// classic pcap, which has no place for them.
    pub fn write_secrets(&mut self, lines: &[u8]) -> io::Result<bool> {
        match self {
            Self::Pcapng { out, held_secrets } => {
                match held_secrets {
                    Some(held) => encode_secrets(lines, held),
                    None => {
                        let mut block = Vec::with_capacity(DSB_HEADER + lines.len() + 8);
                        encode_secrets(lines, &mut block);
                        out.write_all(&block)?;
                    }
                }
                Ok(true)
            }
            Self::Pcap { .. } => Ok(false),
        }
    }

    /// Ends the capture: a classic pcap that got no packet still gets its header, of
    /// `link_type`; a pcapng that got none still gets the key log lines it holds.
    pub fn complete(&mut self, link_type: u16) -> io::Result<()> {
        match self {
            Self::Pcap {
                link_type: None, ..
            } => self.add_interface("", link_type, 0)?,
            Self::Pcapng {
                out,
                held_secrets: Some(held),
            } => out.write_all(&std::mem::take(held))?,
            _ => {}
        }
        self.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Pcapng { out, .. } | Self::Pcap { out, .. } => out.flush(),
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

    /// A pcapng capture describing one Ethernet interface.
    fn capture() -> Output<Vec<u8>> {
        let mut out = Output::pcapng(Vec::new()).unwrap();
        out.add_interface("h/eth0", 1, 65535).unwrap();
        out
    }

    impl Output<Vec<u8>> {
        fn bytes(&self) -> &[u8] {
            match self {
                Self::Pcapng { out, .. } | Self::Pcap { out, .. } => out,
            }
        }
    }

    #[test]
    fn a_written_packet_reads_back() {
        let mut out = capture();
        let p = Packet {
            interface: 7,
            timestamp_ns: 1_700_000_000_123_456_789,
            original_len: 60,
            data: &[1, 2, 3, 4, 5],
            options: &[],
        };
        out.write(0, &p).unwrap();
        let bytes = out.bytes();
        let found = scan(bytes);
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

    #[test]
    fn a_secrets_block_is_padded_and_framed() {
        let mut out = Vec::new();
        encode_secrets(b"CLIENT_RANDOM 00 11\n", &mut out);
        assert_eq!(out.len(), 16 + 20 + 4);
        assert_eq!(&out[4..8], &40u32.to_ne_bytes());
        assert_eq!(&out[36..40], &40u32.to_ne_bytes());
        assert_eq!(secrets(&out), Some(&b"CLIENT_RANDOM 00 11\n"[..]));
    }

    /// Key log lines between packets are found by the block walker, each block's exact
    /// range, and read back; a block cut short by a crash is not listed.
    #[test]
    fn secrets_ranges_are_found_among_packets() {
        let mut out = capture();
        let p = Packet {
            interface: 0,
            timestamp_ns: 1,
            original_len: 3,
            data: &[1, 2, 3],
            options: &[],
        };
        let first = b"CLIENT_RANDOM aa bb\n";
        let second = b"SERVER_HANDSHAKE_TRAFFIC_SECRET cc dd\nEXPORTER_SECRET cc ee\n";
        out.write(0, &p).unwrap();
        assert!(out.write_secrets(first).unwrap());
        assert!(out.write_secrets(second).unwrap());
        out.write(0, &p).unwrap();
        assert!(out.write_secrets(first).unwrap());
        let bytes = out.bytes();
        let ranges = secrets_ranges(bytes);
        assert_eq!(ranges.len(), 3);
        let lines: Vec<&[u8]> = ranges
            .iter()
            .map(|r| secrets(&bytes[r.start as usize..r.end as usize]).unwrap())
            .collect();
        assert_eq!(lines, [&first[..], &second[..], &first[..]]);
        assert!(scan(bytes)[0].offset < ranges[0].start);
        // Packets are no secrets, and the walker still finds them all.
        assert_eq!(scan(bytes).len(), 2);
        assert!(ranges
            .iter()
            .all(|r| packet(&bytes[r.start as usize..r.end as usize]).is_none()));
        // Cut inside the last block: only the two whole ones are left.
        assert_eq!(secrets_ranges(&bytes[..bytes.len() - 4]), ranges[..2]);
        // Classic pcap has no place for them.
        assert!(!Output::pcap(Vec::new()).write_secrets(first).unwrap());
    }

    /// Keys that come before any interface wait for the first one: an answer starts with
    /// its interfaces, as Wireshark's tools need, and its keys still precede its packets;
    /// an answer of keys only gets them at its end.
    #[test]
    fn keys_before_the_first_interface_follow_it() {
        let line = b"CLIENT_RANDOM aa bb\n";
        let mut out = Output::pcapng(Vec::new()).unwrap();
        assert!(out.write_secrets(line).unwrap());
        out.add_interface("h/eth0", 1, 65535).unwrap();
        let kinds: Vec<u32> = blocks(out.bytes()).map(|(_, kind, _)| kind).collect();
        assert_eq!(
            kinds,
            [SECTION_HEADER, INTERFACE_DESCRIPTION, DECRYPTION_SECRETS]
        );

        let mut out = Output::pcapng(Vec::new()).unwrap();
        assert!(out.write_secrets(line).unwrap());
        out.complete(1).unwrap();
        assert_eq!(secrets_ranges(out.bytes()).len(), 1);
    }
}
