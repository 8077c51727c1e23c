//! The header fields an index row keeps, read from a packet's first bytes: VLAN id, IP
//! version, addresses, protocol and ports. Link types: Ethernet, Linux cooked (v1, v2),
//! raw IP and BSD loopback; anything else gets no fields (the query still finds it by time,
//! and the exact filter decides).

/// Link types (LINKTYPE_*).
const ETHERNET: u16 = 1;
const NULL: u16 = 0;
const RAW: u16 = 101;
const RAW_DLT: u16 = 12;
const IPV4: u16 = 228;
const IPV6: u16 = 229;
const LINUX_SLL: u16 = 113;
const LINUX_SLL2: u16 = 276;

/// What a packet's headers say, as far as they are there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headers {
    /// The frame's own (outermost) EtherType, or 802.3 length, of an Ethernet or Linux
    /// cooked frame: what libpcap's `ip`, `arp` and the like test.
    pub ethertype: Option<u16>,
    /// The outermost 802.1Q / 802.1ad tag's VLAN id.
    pub vlan: Option<u16>,
    /// 4 or 6, with the addresses (IPv4 in the first 4 bytes).
    pub ip_version: Option<u8>,
    /// An ARP or RARP frame's sender and target protocol addresses (in `src` and `dst`),
    /// where libpcap's `host` reads them (bytes 14 and 24 of the ARP header).
    pub arp: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: Option<u8>,
    /// TCP, UDP and SCTP ports, of a first (or only) fragment.
    pub ports: Option<(u16, u16)>,
}

impl Headers {
    /// Reads what `data` (a packet of `link_type`) holds.
    pub fn of(link_type: u16, data: &[u8]) -> Self {
        let mut h = Self::default();
        let (ethertype, rest) = match link_type {
            ETHERNET => match ethernet(data, &mut h) {
                Some(x) => x,
                None => return h,
            },
            LINUX_SLL if data.len() >= 16 => {
                h.ethertype = Some(be16(data, 14));
                (be16(data, 14), &data[16..])
            }
            LINUX_SLL2 if data.len() >= 20 => {
                h.ethertype = Some(be16(data, 0));
                (be16(data, 0), &data[20..])
            }
            RAW | RAW_DLT | IPV4 | IPV6 => match data.first().map(|b| b >> 4) {
                Some(4) => (0x0800, data),
                Some(6) => (0x86dd, data),
                _ => return h,
            },
            NULL if data.len() >= 4 => {
                let family = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                match family {
                    2 => (0x0800, &data[4..]),
                    24 | 28 | 30 => (0x86dd, &data[4..]),
                    _ => return h,
                }
            }
            _ => return h,
        };
        match ethertype {
            0x0800 => ipv4(rest, &mut h),
            0x86dd => ipv6(rest, &mut h),
            // Untagged only: libpcap's `host` does not look past a VLAN tag either.
            0x0806 | 0x8035 if h.ethertype == Some(ethertype) && rest.len() >= 28 => {
                h.arp = true;
                h.src[..4].copy_from_slice(&rest[14..18]);
                h.dst[..4].copy_from_slice(&rest[24..28]);
            }
            _ => {}
        }
        h
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The ethertype after any VLAN tags, and what follows.
fn ethernet<'a>(data: &'a [u8], h: &mut Headers) -> Option<(u16, &'a [u8])> {
    let mut at = 12;
    h.ethertype = Some(be16(data.get(..14)?, 12));
    loop {
        if data.len() < at + 2 {
            return None;
        }
        let ethertype = be16(data, at);
        if matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) && data.len() >= at + 6 {
            if h.vlan.is_none() {
                h.vlan = Some(be16(data, at + 2) & 0x0fff);
            }
            at += 4;
            continue;
        }
        return Some((ethertype, &data[at + 2..]));
    }
}

fn ipv4(b: &[u8], h: &mut Headers) {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return;
    }
    let header_len = usize::from(b[0] & 0x0f) * 4;
    // A header or total length below the minimum is no IPv4 packet to tcpdump or tshark;
    // a total length of 0 is a segmentation offload's (its length is the frame's).
    let total_len = usize::from(be16(b, 2));
    if header_len < 20 || (total_len != 0 && total_len < header_len) {
        return;
    }
    h.ip_version = Some(4);
    h.src[..4].copy_from_slice(&b[12..16]);
    h.dst[..4].copy_from_slice(&b[16..20]);
    h.protocol = Some(b[9]);
    let fragment_offset = be16(b, 6) & 0x1fff;
    if fragment_offset == 0 {
        if let Some(l4) = b.get(header_len..) {
            h.ports = ports(b[9], l4);
        }
    }
}

fn ipv6(b: &[u8], h: &mut Headers) {
    if b.len() < 40 || b[0] >> 4 != 6 {
        return;
    }
    h.ip_version = Some(6);
    h.src.copy_from_slice(&b[8..24]);
    h.dst.copy_from_slice(&b[24..40]);
    let mut next = b[6];
    let mut at = 40;
    // Hop-by-hop, routing, destination options and fragment headers, up to a few.
    for _ in 0..8 {
        match next {
            0 | 43 | 60 if b.len() >= at + 2 => {
                next = b[at];
                at += (usize::from(b[at + 1]) + 1) * 8;
            }
            44 if b.len() >= at + 8 => {
                let offset = be16(b, at + 2) >> 3;
                next = b[at];
                at += 8;
                if offset != 0 {
                    h.protocol = Some(next);
                    return;
                }
            }
            _ => break,
        }
    }
    h.protocol = Some(next);
    if let Some(l4) = b.get(at..) {
        h.ports = ports(next, l4);
    }
}

fn ports(protocol: u8, l4: &[u8]) -> Option<(u16, u16)> {
    match protocol {
        6 | 17 | 132 if l4.len() >= 4 => Some((be16(l4, 0), be16(l4, 2))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethernet_vlan_ipv4_udp() {
        let mut p = vec![0u8; 12];
        p.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a, 0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        ip.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
        p.extend_from_slice(&ip);
        let h = Headers::of(ETHERNET, &p);
        assert_eq!(h.ethertype, Some(0x8100));
        assert_eq!(h.vlan, Some(42));
        assert_eq!(h.ip_version, Some(4));
        assert_eq!(&h.src[..4], &[198, 18, 0, 1]);
        assert_eq!(&h.dst[..4], &[198, 18, 0, 2]);
        assert_eq!(h.protocol, Some(17));
        assert_eq!(h.ports, Some((12345, 53)));
    }

    #[test]
    fn truncated_packets_give_what_they_hold() {
        assert_eq!(Headers::of(ETHERNET, &[0; 10]), Headers::default());
        let h = Headers::of(RAW, &[0x60; 20]);
        assert_eq!(h.ip_version, None);
    }
}
