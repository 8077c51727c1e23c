//! What a tcpdump filter says about the index rows it can match, read conservatively: only
//! a filter that is a plain conjunction (`and` only; no `or`, `not` or parentheses) gives
//! constraints, from its `[src|dst] host ADDRESS` and `[tcp|udp|sctp] [src|dst] port N`
//! terms; every other term is ignored, which only weakens them. A row is dropped only when
//! libpcap could not match its packet: an IP packet (as the index reads it) without the
//! address or port. Rows of packets the index has no IP header for are always kept; the
//! exact filter decides on every packet fetched.

use std::net::IpAddr;

/// Which end of a packet a term names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
    Either,
}

/// The terms of a filter the index can check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Each address as the index writes it (`198.18.0.5`, `2001:db8::1`).
    pub hosts: Vec<(End, String)>,
    pub ports: Vec<(End, u16)>,
}

impl Constraints {
    /// The constraints of `filter` (none for a filter not read here).
    pub fn of(filter: &str) -> Self {
        let mut out = Self::default();
        let words: Vec<&str> = filter.split_whitespace().collect();
        let refused = ["or", "||", "not", "!"];
        // After these libpcap's `host` and `port` test the encapsulated headers, which the
        // index does not hold: nothing can be pruned.
        let inner = ["mpls", "pppoes", "geneve", "vxlan"];
        if words
            .iter()
            .any(|w| refused.contains(w) || inner.contains(w) || w.contains(['(', ')', '!', '|']))
        {
            return out;
        }
        for term in words.split(|w| *w == "and" || *w == "&&") {
            let mut term = term;
            if let [proto, rest @ ..] = term {
                if matches!(*proto, "tcp" | "udp" | "sctp") && !rest.is_empty() {
                    term = rest;
                }
            }
            let (end, rest) = match term {
                ["src", rest @ ..] => (End::Src, rest),
                ["dst", rest @ ..] => (End::Dst, rest),
                rest => (End::Either, rest),
            };
            match rest {
                ["host", address] => {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        out.hosts.push((end, ip.to_string()));
                    }
                }
                ["port", port] => {
                    if let Ok(port) = port.parse::<u16>() {
                        out.ports.push((end, port));
                    }
                }
                _ => {}
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.ports.is_empty()
    }

    /// Whether libpcap could match a frame of this EtherType (an 802.3 length included)
    /// whose IP or ARP header the index could not read: only an IP one (libpcap reads it its
    /// own way); an ARP frame too short for its addresses, no.
    pub fn may_match_ethertype(&self, ethertype: u16) -> bool {
        matches!(ethertype, 0x0800 | 0x86dd)
    }

    /// Whether libpcap could match a packet the index reads as an IP packet with these
    /// addresses and ports (ports `None`: not a first fragment of TCP, UDP or SCTP).
    pub fn may_match(&self, src: &[u8], dst: &[u8], ports: Option<(u16, u16)>) -> bool {
        let hosts = self.hosts.iter().all(|(end, host)| {
            let host = host.as_bytes();
            match end {
                End::Src => src == host,
                End::Dst => dst == host,
                End::Either => src == host || dst == host,
            }
        });
        hosts
            && self.ports.iter().all(|&(end, port)| match ports {
                None => false,
                Some((s, d)) => match end {
                    End::Src => s == port,
                    End::Dst => d == port,
                    End::Either => s == port || d == port,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conjunctions_of_hosts_and_ports_constrain() {
        let c = Constraints::of("host 198.18.0.5 and tcp port 443");
        assert_eq!(c.hosts, vec![(End::Either, "198.18.0.5".to_string())]);
        assert_eq!(c.ports, vec![(End::Either, 443)]);
        let c = Constraints::of("ip && src host 2001:DB8::1 && udp dst port 53 and greater 100");
        assert_eq!(c.hosts, vec![(End::Src, "2001:db8::1".to_string())]);
        assert_eq!(c.ports, vec![(End::Dst, 53)]);
        assert!(c.may_match(b"2001:db8::1", b"x", Some((1, 53))));
        assert!(!c.may_match(b"2001:db8::1", b"x", Some((53, 1))));
        assert!(!c.may_match(b"2001:db8::1", b"x", None));
        for open in [
            "host 1.2.3.4 or port 80",
            "not port 80",
            "(port 80)",
            "host name.example",
            "mpls and host 1.2.3.4",
            "pppoes and port 80",
            "udp port 4789 and vxlan and host 1.2.3.4",
            "",
        ] {
            assert!(Constraints::of(open).is_empty(), "{open}");
        }
    }
}
