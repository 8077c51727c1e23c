//! What a libpcap packet header says, in the protocol's terms: the sensor's conversions of
//! each packet libpcap hands over (`sensor/src/capture/pcap.rs`), in a crate of their own so
//! that the capture-file fuzz target (`fuzz/src/pcap_read.rs`) runs exactly this code.
#![deny(missing_docs)]

use protocol::Direction;

/// Linux cooked capture v1: a 16-byte header, the packet type in its first two bytes.
pub const LINKTYPE_LINUX_SLL: i32 = 113;
/// Linux cooked capture v2: a 20-byte header, the packet type in byte 10.
pub const LINKTYPE_LINUX_SLL2: i32 = 276;

/// Nanoseconds since the epoch; the handles are opened with nanosecond precision, so
/// `tv_usec` holds nanoseconds.
///
/// pcap files store seconds as an unsigned 32-bit number, and libpcap hands them over in a
/// signed `time_t` that turns times past January 2038 negative. The low 32 bits are the
/// file's own value (and live times fit in them until 2106), so they are what we keep.
#[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
pub fn timestamp_ns(h: &pcap::PacketHeader) -> u64 {
    let secs = u64::from(h.ts.tv_sec as u32);
    let nanos = u64::from(h.ts.tv_usec as u32);
    secs * 1_000_000_000 + nanos
}

/// The Linux cooked headers say which way a packet went; other link types do not.
pub fn direction(link_type: i32, data: &[u8]) -> Direction {
    let packet_type = match link_type {
        LINKTYPE_LINUX_SLL => data.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])),
        LINKTYPE_LINUX_SLL2 => data.get(10).map(|b| u16::from(*b)),
        _ => None,
    };
    match packet_type {
        // PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST
        Some(0..=3) => Direction::Inbound,
        // PACKET_OUTGOING
        Some(4) => Direction::Outbound,
        _ => Direction::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooked_directions() {
        let mut sll = [0u8; 16];
        assert_eq!(direction(LINKTYPE_LINUX_SLL, &sll), Direction::Inbound);
        sll[1] = 4;
        assert_eq!(direction(LINKTYPE_LINUX_SLL, &sll), Direction::Outbound);
        sll[1] = 7;
        assert_eq!(direction(LINKTYPE_LINUX_SLL, &sll), Direction::Unknown);
        let mut sll2 = [0u8; 20];
        sll2[10] = 4;
        assert_eq!(direction(LINKTYPE_LINUX_SLL2, &sll2), Direction::Outbound);
        assert_eq!(
            direction(LINKTYPE_LINUX_SLL2, &sll2[..5]),
            Direction::Unknown
        );
        assert_eq!(direction(1, &sll2), Direction::Unknown);
    }
}
