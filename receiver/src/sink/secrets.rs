//! TLS key log lines on their way into pcapng Decryption Secrets Blocks (DSB), and what
//! tells which of them a file needs.
//!
//! Wireshark reads a capture in one pass: a key must come before the handshake it opens.
//! Sensors that follow key logs send each line as soon as it is logged, and the merge holds
//! their packets for the reorder window, so a line reaches the file before the ClientHello
//! that names its client random. Each file keeps the lines whose ClientHello it has not
//! written yet ([`Pending`]), and a file that rotation or a new section starts begins with
//! them: every file carries the keys of the handshakes it holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use protocol::KeyLogLine;

/// Lines waiting for their ClientHello, per file: past it, the oldest are given up
/// (about 4,000 TLS 1.3 handshakes that a file has not reached yet).
const MAX_PENDING_BYTES: usize = 4 << 20;

/// Key log lines of the whole run, for the exit summary and the metrics.
#[derive(Debug, Default)]
pub struct SecretsCounters {
    /// Lines written in a DSB (once each; rotation's repeats are `carried`).
    pub written: AtomicU64,
    /// Lines written again at the start of a later file, whose handshake went there.
    pub carried: AtomicU64,
    /// Lines no ClientHello written after them named: at exit, or given up for room.
    pub without_packets: AtomicU64,
    /// Lines not written: `--drop-secrets`, or an output that cannot hold them (pcap).
    pub not_written: AtomicU64,
}

impl SecretsCounters {
    /// Each figure by its name in the summary and the metrics.
    pub fn figures(&self) -> [(&'static str, u64); 4] {
        [
            ("written", self.written.load(Relaxed)),
            ("carried", self.carried.load(Relaxed)),
            ("without_packets", self.without_packets.load(Relaxed)),
            ("not_written", self.not_written.load(Relaxed)),
        ]
    }

    /// The exit summary's line, if any key came.
    pub fn line(&self) -> Option<String> {
        let [written, carried, without, not_written] = self.figures().map(|(_, n)| n);
        (written + not_written > 0).then(|| {
            format!(
                "TLS keys: {written} key log lines written, {carried} written again in later \
                 files, {without} without packets (no ClientHello after them), {not_written} \
                 not written (--drop-secrets, or an output that cannot hold them)"
            )
        })
    }

    pub fn json(&self) -> serde_json::Value {
        self.figures()
            .into_iter()
            .map(|(name, n)| (name.to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

pub static COUNTERS: SecretsCounters = SecretsCounters {
    written: AtomicU64::new(0),
    carried: AtomicU64::new(0),
    without_packets: AtomicU64::new(0),
    not_written: AtomicU64::new(0),
};

/// Lines of one file whose ClientHello has not been written after them yet.
#[derive(Default)]
pub struct Pending {
    /// By client random: when the first of them came (a number from `next`), and the lines.
    lines: HashMap<[u8; 32], (u64, Vec<u8>)>,
    /// Client randoms in the order their first line came: the oldest go first. An entry
    /// whose ClientHello came (or whose random came again since) stays until compacted
    /// away, so that a match costs no search.
    order: VecDeque<(u64, [u8; 32])>,
    next: u64,
    bytes: usize,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Keeps a line written (with its newline) until the ClientHello it names is.
    pub fn add(&mut self, line: &[u8]) {
        let KeyLogLine::Secret {
            client_random: Some(random),
        } = KeyLogLine::parse(line.strip_suffix(b"\n").unwrap_or(line))
        else {
            return;
        };
        let (_, lines) = self.lines.entry(random).or_insert_with(|| {
            self.next += 1;
            self.order.push_back((self.next, random));
            (self.next, Vec::new())
        });
        lines.extend_from_slice(line);
        self.bytes += line.len();
        while self.bytes > MAX_PENDING_BYTES {
            let Some((since, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.lines.get(&oldest).is_some_and(|(s, _)| *s == since) {
                if let Some((_, lines)) = self.lines.remove(&oldest) {
                    self.bytes -= lines.len();
                    COUNTERS
                        .without_packets
                        .fetch_add(count_lines(&lines), Relaxed);
                }
            }
        }
    }

    /// A packet is being written: if it is a ClientHello whose keys wait, they are in the
    /// file before it and no longer need carrying.
    pub fn packet(&mut self, link_type: u16, frame: &[u8]) {
        if self.lines.is_empty() {
            return;
        }
        let Some(random) = client_hello_random(link_type, frame) else {
            return;
        };
        if let Some((_, lines)) = self.lines.remove(&random) {
            self.bytes -= lines.len();
            if self.order.len() > 2 * self.lines.len() + 64 {
                let lines = &self.lines;
                self.order
                    .retain(|(since, r)| lines.get(r).is_some_and(|(s, _)| s == since));
            }
        }
    }

    /// Every line still waiting, oldest first, for the file that follows.
    pub fn lines(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.bytes);
        for (since, random) in &self.order {
            match self.lines.get(random) {
                Some((s, lines)) if s == since => all.extend_from_slice(lines),
                _ => {}
            }
        }
        all
    }

    /// The file is complete and no other follows: what still waits had no packets.
    pub fn give_up(&mut self) {
        for (_, lines) in self.lines.values() {
            COUNTERS
                .without_packets
                .fetch_add(count_lines(lines), Relaxed);
        }
        *self = Self::default();
    }
}

pub fn count_lines(lines: &[u8]) -> u64 {
    lines.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The client random of a TLS ClientHello starting a TCP segment, if `frame` (of
/// `link_type`) is one: Ethernet (with VLAN tags), raw IP, Linux cooked v1 and v2.
pub fn client_hello_random(link_type: u16, frame: &[u8]) -> Option<[u8; 32]> {
    let (ethertype, mut ip) = match link_type {
        1 => {
            let mut at = 12;
            let mut ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
            while ethertype == 0x8100 || ethertype == 0x88a8 {
                at += 4;
                ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
            }
            (ethertype, frame.get(at + 2..)?)
        }
        101 | 12 | 14 => (0, frame),
        228 => (0x0800, frame),
        229 => (0x86dd, frame),
        113 => (
            u16::from_be_bytes(frame.get(14..16)?.try_into().ok()?),
            frame.get(16..)?,
        ),
        276 => (
            u16::from_be_bytes(frame.get(0..2)?.try_into().ok()?),
            frame.get(20..)?,
        ),
        _ => return None,
    };
    let version = ip.first()? >> 4;
    let tcp = match (ethertype, version) {
        (0x0800 | 0, 4) => {
            let header = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 {
                return None;
            }
            ip = ip.get(header..)?;
            ip
        }
        (0x86dd | 0, 6) => {
            if *ip.get(6)? != 6 {
                return None;
            }
            ip.get(40..)?
        }
        _ => return None,
    };
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let tls = tcp.get(data_offset..)?;
    // Handshake record of TLS 1.x, holding a ClientHello: the random follows the
    // handshake header (4 bytes) and the client version (2).
    if tls.len() < 43 || tls[0] != 0x16 || tls[1] != 0x03 || tls[5] != 0x01 {
        return None;
    }
    tls[11..43].try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing::client_hello;

    #[test]
    fn a_client_hello_names_its_random() {
        let random = [7u8; 32];
        assert_eq!(client_hello_random(1, &client_hello(random)), Some(random));
        let mut not_hello = client_hello(random);
        not_hello[54 + 5] = 0x02;
        assert_eq!(client_hello_random(1, &not_hello), None);
        assert_eq!(client_hello_random(1, &not_hello[..40]), None);
        // Raw IPv4: the same frame without its Ethernet header.
        assert_eq!(
            client_hello_random(228, &client_hello(random)[14..]),
            Some(random)
        );
    }

    #[test]
    fn lines_wait_for_their_client_hello() {
        let random = [7u8; 32];
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let line = format!("CLIENT_RANDOM {hex} {}\n", "ab".repeat(48));
        let other = format!("CLIENT_RANDOM {} {}\n", "01".repeat(32), "cd".repeat(48));
        let mut pending = Pending::default();
        pending.add(line.as_bytes());
        pending.add(other.as_bytes());
        assert_eq!(pending.lines(), format!("{line}{other}").into_bytes());
        pending.packet(1, &client_hello(random));
        assert_eq!(pending.lines(), other.clone().into_bytes());
        // A line of a random whose ClientHello was written waits again, once.
        pending.add(line.as_bytes());
        assert_eq!(pending.lines(), format!("{other}{line}").into_bytes());
    }
}
