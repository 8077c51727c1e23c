//! A faulty UDP relay for QUIC: one client on one side, one server on the other, and a
//! chosen share of datagrams lost or held back so that later ones overtake them. It can
//! also play an attacker on the path ([`Relay::answer`]): answer every client packet with
//! a forged QUIC Version Negotiation, or hand the client to another server (an impostor).
//!
//! The relay learns its client from the datagrams it receives (the latest source wins, so a
//! client that reconnects from a new port is followed) and forwards the server's answers to
//! it. It runs in two plain threads, one per direction, and stops and joins them on drop.
//! Its sockets can be opened inside a network namespace ([`Relay::start`] with `Some(ns)`):
//! a short-lived thread enters the namespace with `setns(2)` (which moves only the calling
//! thread) and binds them there; a socket stays in the namespace it was made in, so the
//! forwarding threads, in the test's own namespace, use them unchanged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Netns;

/// What the relay does to each datagram, in both directions independently.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram (not dropped) is held back for `delay`, so that the
    /// datagrams that follow it go first.
    pub reorder: f64,
    pub delay: Duration,
    /// Seed of the random choices, printed by the tests so that a run can be repeated.
    pub seed: u64,
}

impl Faults {
    /// A faithful relay: everything forwarded at once, in order.
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            reorder: 0.0,
            delay: Duration::ZERO,
            seed: 0,
        }
    }

    /// 5% of datagrams lost and 5% held back by 5 ms, seeded from the clock.
    pub fn lossy_reordering() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            loss: 0.05,
            reorder: 0.05,
            delay: Duration::from_millis(5),
            seed,
        }
    }
}

/// The counters of one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams that arrived to be relayed.
    pub received: u64,
    /// Datagrams sent on (held-back ones included, once released).
    pub forwarded: u64,
    /// Datagrams dropped on purpose (or for want of a client to send them to).
    pub dropped: u64,
    /// Datagrams held back for the delay.
    pub held_back: u64,
    /// Held-back datagrams that a later datagram overtook.
    pub reordered: u64,
}

/// Both directions' counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub to_server: DirectionStats,
    pub to_client: DirectionStats,
}

impl std::fmt::Display for RelayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let one = |d: &DirectionStats| {
            format!(
                "{} received, {} forwarded, {} dropped, {} held back of which {} overtaken",
                d.received, d.forwarded, d.dropped, d.held_back, d.reordered
            )
        };
        write!(
            f,
            "client->server: {}; server->client: {}",
            one(&self.to_server),
            one(&self.to_client)
        )
    }
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    held_back: AtomicU64,
    reordered: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            received: self.received.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            held_back: self.held_back.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
        }
    }
}

/// What the relay does with the client's datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Relay them to the server given at start.
    Forward,
    /// Answer each long-header (handshake) packet with a Version Negotiation packet that
    /// offers no version the client speaks, as anyone on the path can; drop the rest.
    VersionNegotiation,
    /// Relay them to this server instead (and its answers back).
    ForwardTo(SocketAddr),
    /// Drop everything, both ways: a network partition.
    Drop,
    /// Answer each client Initial with a server Initial that closes the connection with
    /// this TLS alert (a CONNECTION_CLOSE with error 0x100 + alert), as anyone who sees the
    /// Initial can: its keys derive from the connection id it carries. Drop the rest.
    CloseWithAlert(u8),
}

/// A running relay; stopped and joined on drop.
pub struct Relay {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    stop: Arc<AtomicBool>,
    counters: Arc<[Counters; 2]>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer = 0,
    ToClient = 1,
}

/// Longest a forwarding thread sleeps in `recv` before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(20);

impl Relay {
    /// Listens on `listen` (port 0 picks one: see [`Relay::addr`]) and relays to `server`,
    /// with its sockets inside `netns` when given.
    pub fn start(
        netns: Option<&Netns>,
        listen: SocketAddr,
        server: SocketAddr,
        faults: Faults,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&faults.loss) || !(0.0..=1.0).contains(&faults.reorder) {
            bail!("loss and reorder are probabilities: {faults:?}");
        }
        let (front, back) = match netns {
            None => bind_pair(listen, server)?,
            Some(ns) => {
                let path = format!("/run/netns/{}", ns.name);
                thread::spawn(move || -> Result<(UdpSocket, UdpSocket)> {
                    enter_netns(&path)?;
                    bind_pair(listen, server)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the relay's setup thread panicked"))??
            }
        };
        let addr = front.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Arc<[Counters; 2]> = Arc::new(Default::default());
        let client = Arc::new(Mutex::new(None));
        let answer = Arc::new(Mutex::new(Answer::Forward));
        let mut threads = Vec::new();
        for (direction, input, output) in [
            (Direction::ToServer, front.try_clone()?, back.try_clone()?),
            (Direction::ToClient, back, front),
        ] {
            let pump = Pump {
                direction,
                input,
                output,
                server,
                answer: Arc::clone(&answer),
                client: Arc::clone(&client),
                faults,
                counters: Arc::clone(&counters),
                stop: Arc::clone(&stop),
            };
            let name = match direction {
                Direction::ToServer => "relay-to-server",
                Direction::ToClient => "relay-to-client",
            };
            threads.push(
                thread::Builder::new()
                    .name(name.into())
                    .spawn(move || pump.run())?,
            );
        }
        Ok(Self {
            addr,
            answer,
            stop,
            counters,
            threads,
        })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, answers the client's datagrams as `answer` says.
    pub fn answer(&self, answer: Answer) {
        *self.answer.lock().expect("answer lock") = answer;
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats {
            to_server: self.counters[Direction::ToServer as usize].snapshot(),
            to_client: self.counters[Direction::ToClient as usize].snapshot(),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter_netns(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open during the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The client-facing socket on `listen`, and the server-facing one on an ephemeral port of
/// the same family. The server-facing socket stays unconnected: it then never reports the
/// ICMP errors of a server that is down, it just hears nothing.
fn bind_pair(listen: SocketAddr, server: SocketAddr) -> Result<(UdpSocket, UdpSocket)> {
    let front = UdpSocket::bind(listen).with_context(|| format!("relay: bind {listen}"))?;
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let back = UdpSocket::bind(any).context("relay: bind the server-facing socket")?;
    Ok((front, back))
}

struct Held {
    data: Vec<u8>,
    to: SocketAddr,
    due: Instant,
    overtaken: bool,
}

struct Pump {
    direction: Direction,
    input: UdpSocket,
    output: UdpSocket,
    server: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    faults: Faults,
    counters: Arc<[Counters; 2]>,
    stop: Arc<AtomicBool>,
}

impl Pump {
    fn run(self) {
        let counters = &self.counters[self.direction as usize];
        let mut rng = StdRng::seed_from_u64(self.faults.seed ^ (self.direction as u64 + 1));
        let mut held: VecDeque<Held> = VecDeque::new();
        let mut buf = vec![0u8; 65_536];
        while !self.stop.load(Relaxed) {
            let wait = held.front().map_or(POLL, |h| {
                h.due
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), POLL)
            });
            let _ = self.input.set_read_timeout(Some(wait));
            match self.input.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let server = match *self.answer.lock().expect("answer lock") {
                        Answer::Forward => self.server,
                        Answer::ForwardTo(other) => other,
                        Answer::Drop => {
                            counters.received.fetch_add(1, Relaxed);
                            counters.dropped.fetch_add(1, Relaxed);
                            continue;
                        }
                        forged @ (Answer::VersionNegotiation | Answer::CloseWithAlert(_)) => {
                            if self.direction == Direction::ToServer {
                                counters.received.fetch_add(1, Relaxed);
                                counters.dropped.fetch_add(1, Relaxed);
                                let answer = match forged {
                                    Answer::CloseWithAlert(alert) => {
                                        initial_close(&buf[..n], alert)
                                    }
                                    _ => version_negotiation(&buf[..n]),
                                };
                                if let Some(answer) = answer {
                                    let _ = self.input.send_to(&answer, from);
                                }
                            }
                            continue;
                        }
                    };
                    let to = match self.direction {
                        Direction::ToServer => {
                            *self.client.lock().expect("client lock") = Some(from);
                            Some(server)
                        }
                        Direction::ToClient if from != server => continue,
                        Direction::ToClient => *self.client.lock().expect("client lock"),
                    };
                    counters.received.fetch_add(1, Relaxed);
                    let Some(to) = to else {
                        counters.dropped.fetch_add(1, Relaxed);
                        continue;
                    };
                    if rng.random_bool(self.faults.loss) {
                        counters.dropped.fetch_add(1, Relaxed);
                    } else if rng.random_bool(self.faults.reorder) {
                        counters.held_back.fetch_add(1, Relaxed);
                        held.push_back(Held {
                            data: buf[..n].to_vec(),
                            to,
                            due: Instant::now() + self.faults.delay,
                            overtaken: false,
                        });
                    } else {
                        let _ = self.output.send_to(&buf[..n], to);
                        counters.forwarded.fetch_add(1, Relaxed);
                        held.iter_mut().for_each(|h| h.overtaken = true);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
            // Every datagram is held for the same delay: the queue is in order of release.
            let now = Instant::now();
            while held.front().is_some_and(|h| h.due <= now) {
                let h = held.pop_front().expect("front exists");
                let _ = self.output.send_to(&h.data, h.to);
                counters.forwarded.fetch_add(1, Relaxed);
                if h.overtaken {
                    counters.reordered.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// The Version Negotiation packet (RFC 9000, 17.2.1) a server would send in answer to the
/// long-header packet `datagram`, offering only a reserved version no client speaks; `None`
/// for a short-header or truncated packet.
pub fn version_negotiation(datagram: &[u8]) -> Option<Vec<u8>> {
    let first = *datagram.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    let dcid_len = usize::from(*datagram.get(5)?);
    let dcid = datagram.get(6..6 + dcid_len)?;
    let scid_len = usize::from(*datagram.get(6 + dcid_len)?);
    let scid = datagram.get(7 + dcid_len..7 + dcid_len + scid_len)?;
    let mut vn = vec![0x80 | (first & 0x7f), 0, 0, 0, 0];
    // The client's source connection id is the destination here, and the other way round.
    vn.push(scid_len as u8);
    vn.extend_from_slice(scid);
    vn.push(dcid_len as u8);
    vn.extend_from_slice(dcid);
    // A reserved version (0x?a?a?a?a), to exercise negotiation.
    vn.extend_from_slice(&0x1a2a_3a4a_u32.to_be_bytes());
    Some(vn)
}

/// QUIC v1's salt for Initial secrets (RFC 9001, 5.2).
const INITIAL_SALT: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];

/// An output length for HKDF-Expand.
struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446, 7.1).
fn expand_label(prk: &ring::hkdf::Prk, label: &str, len: usize) -> Vec<u8> {
    let full = format!("tls13 {label}");
    let info = [
        &(len as u16).to_be_bytes()[..],
        &[full.len() as u8],
        full.as_bytes(),
        &[0],
    ];
    let mut out = vec![0u8; len];
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF lengths are valid");
    out
}

/// A QUIC variable-length integer (RFC 9000, 16), in two bytes (values below 16384).
fn varint2(v: u16) -> [u8; 2] {
    (0x4000 | v).to_be_bytes()
}

/// The server Initial packet (RFC 9000 17.2.2, protected as RFC 9001 5 says) that answers
/// the client Initial `datagram` with a CONNECTION_CLOSE carrying TLS alert `alert`; `None`
/// when `datagram` is not a QUIC v1 Initial.
pub fn initial_close(datagram: &[u8], alert: u8) -> Option<Vec<u8>> {
    use ring::aead::{quic, Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    use ring::hkdf::{Salt, HKDF_SHA256};
    let first = *datagram.first()?;
    // Long header, type Initial (0), version 1.
    if first & 0xb0 != 0x80 || datagram.get(1..5)? != [0, 0, 0, 1] {
        return None;
    }
    let dcid_len = usize::from(*datagram.get(5)?);
    let client_dcid = datagram.get(6..6 + dcid_len)?;
    let scid_len = usize::from(*datagram.get(6 + dcid_len)?);
    let client_scid = datagram.get(7 + dcid_len..7 + dcid_len + scid_len)?;

    let initial = Salt::new(HKDF_SHA256, &INITIAL_SALT).extract(client_dcid);
    let server = expand_label(&initial, "server in", 32);
    let server = ring::hkdf::Prk::new_less_safe(HKDF_SHA256, &server);
    let key = expand_label(&server, "quic key", 16);
    let iv = expand_label(&server, "quic iv", 12);
    let hp = expand_label(&server, "quic hp", 16);

    // CONNECTION_CLOSE (0x1c): error 0x100 + alert, frame type 0, no reason; then PADDING
    // so that there is a header protection sample.
    let mut payload = vec![0x1c];
    payload.extend_from_slice(&varint2(0x100 + u16::from(alert)));
    payload.extend_from_slice(&[0, 0]);
    payload.resize(32, 0);
    let pn: u8 = 0;
    let mut header = vec![0xc0, 0, 0, 0, 1, scid_len as u8];
    // The client's source connection id is the destination here; the server picks its own
    // (the client's original destination id will do).
    header.extend_from_slice(client_scid);
    header.push(dcid_len as u8);
    header.extend_from_slice(client_dcid);
    header.push(0); // no token
    header.extend_from_slice(&varint2((1 + payload.len() + 16) as u16));
    let pn_at = header.len();
    header.push(pn);

    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&iv);
    nonce[11] ^= pn;
    let sealing = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).ok()?);
    sealing
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header),
            &mut payload,
        )
        .ok()?;
    let mut packet = header;
    packet.extend_from_slice(&payload);
    // Header protection: the sample starts 4 bytes after the packet number's start.
    let hp = quic::HeaderProtectionKey::new(&quic::AES_128, &hp).ok()?;
    let mask = hp.new_mask(packet.get(pn_at + 4..pn_at + 20)?).ok()?;
    packet[0] ^= mask[0] & 0x0f;
    packet[pn_at] ^= mask[1];
    Some(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A server that echoes every datagram back, until `stop`; returns what it received.
    fn echo_server(stop: Arc<AtomicBool>) -> (SocketAddr, JoinHandle<Vec<Vec<u8>>>) {
        let socket = UdpSocket::bind(localhost()).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    got.push(buf[..n].to_vec());
                    socket.send_to(&buf[..n], from).unwrap();
                }
            }
            got
        });
        (addr, handle)
    }

    /// Sends `count` numbered datagrams through the relay, paced so that no socket buffer
    /// overflows, and collects the echoes that come back within a moment.
    fn exchange(relay: &Relay, count: u32) -> Vec<u32> {
        let client = UdpSocket::bind(localhost()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let reader = client.try_clone().unwrap();
        let collector = thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(n) = reader.recv(&mut buf) {
                got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
            }
            got
        });
        for i in 0..count {
            client.send_to(&i.to_be_bytes(), relay.addr()).unwrap();
            thread::sleep(Duration::from_micros(200));
        }
        collector.join().unwrap()
    }

    #[test]
    fn a_faithful_relay_forwards_everything_both_ways_in_order() {
        let stop = Arc::new(AtomicBool::new(false));
        let (server, echo) = echo_server(Arc::clone(&stop));
        let relay = Relay::start(None, localhost(), server, Faults::none()).unwrap();
        let got = exchange(&relay, 300);
        stop.store(true, Relaxed);
        assert_eq!(echo.join().unwrap().len(), 300);
        assert_eq!(got, (0..300).collect::<Vec<_>>());
        let stats = relay.stats();
        let all = DirectionStats {
            received: 300,
            forwarded: 300,
            dropped: 0,
            held_back: 0,
            reordered: 0,
        };
        assert_eq!(stats.to_server, all, "{stats}");
        assert_eq!(stats.to_client, all, "{stats}");
    }

    #[test]
    fn a_lossy_reordering_relay_counts_what_it_does() {
        let stop = Arc::new(AtomicBool::new(false));
        let (server, echo) = echo_server(Arc::clone(&stop));
        let faults = Faults {
            loss: 0.1,
            reorder: 0.1,
            delay: Duration::from_millis(3),
            seed: 7,
        };
        let relay = Relay::start(None, localhost(), server, faults).unwrap();
        let sent = 2000;
        let got = exchange(&relay, sent);
        stop.store(true, Relaxed);
        let at_server = echo.join().unwrap().len() as u64;
        let stats = relay.stats();
        let (up, down) = (stats.to_server, stats.to_client);

        // Every datagram is either forwarded or counted as dropped, and what is forwarded
        // arrives (loopback loses nothing at this pace).
        assert_eq!(up.received, u64::from(sent), "{stats}");
        assert_eq!(up.forwarded + up.dropped, up.received, "{stats}");
        assert_eq!(at_server, up.forwarded, "{stats}");
        assert_eq!(down.received, at_server, "{stats}");
        assert_eq!(down.forwarded + down.dropped, down.received, "{stats}");
        assert_eq!(got.len() as u64, down.forwarded, "{stats}");

        // Roughly the asked-for shares (binomial, n = 2000: far more than 5 sigma apart).
        for d in [up, down] {
            let share = d.dropped as f64 / d.received as f64;
            assert!((0.05..0.15).contains(&share), "loss share {share}: {stats}");
            assert!(d.reordered > 0, "nothing was overtaken: {stats}");
        }

        // Nothing duplicated, and datagrams really arrived out of order.
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "duplicates arrived");
        let inversions = got.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 0, "everything arrived in order: {stats}");
    }

    #[test]
    fn the_relay_follows_a_client_that_moves_to_a_new_port() {
        let stop = Arc::new(AtomicBool::new(false));
        let (server, echo) = echo_server(Arc::clone(&stop));
        let relay = Relay::start(None, localhost(), server, Faults::none()).unwrap();
        let first = exchange(&relay, 10);
        let second = exchange(&relay, 10);
        stop.store(true, Relaxed);
        echo.join().unwrap();
        assert_eq!((first.len(), second.len()), (10, 10), "{}", relay.stats());
    }

    #[test]
    fn version_negotiation_mirrors_the_connection_ids() {
        // Long header, version 1, DCID 8 bytes, SCID 4 bytes, then the rest of an Initial.
        let mut initial = vec![0xc3, 0, 0, 0, 1, 8];
        initial.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        initial.push(4);
        initial.extend_from_slice(&[9, 10, 11, 12]);
        initial.extend_from_slice(&[0u8; 20]);
        let vn = version_negotiation(&initial).unwrap();
        assert_eq!(
            vn,
            [
                0xc3, 0, 0, 0, 0, 4, 9, 10, 11, 12, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0x1a, 0x2a, 0x3a,
                0x4a
            ]
        );
        assert_eq!(version_negotiation(&[0x43, 1, 2, 3]), None, "short header");
        assert_eq!(version_negotiation(&initial[..10]), None, "truncated");
    }

    /// RFC 9001, Appendix A.1: the server's Initial keys for connection id 8394c8f03e515708.
    #[test]
    fn initial_keys_match_rfc_9001() {
        use ring::hkdf::{Prk, Salt, HKDF_SHA256};
        let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
        let initial = Salt::new(HKDF_SHA256, &INITIAL_SALT).extract(&dcid);
        let server = Prk::new_less_safe(HKDF_SHA256, &expand_label(&initial, "server in", 32));
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(expand_label(&server, "quic key", 16)),
            "cf3a5331653c364c88f0f379b6067e37"
        );
        assert_eq!(
            hex(expand_label(&server, "quic iv", 12)),
            "0ac1493ca1905853b0bba03e"
        );
        assert_eq!(
            hex(expand_label(&server, "quic hp", 16)),
            "c206b8d9b9f0f37644430b490eeaa314"
        );
        // And a close is made for a v1 Initial only.
        let mut initial_packet = vec![0xc3, 0, 0, 0, 1, 8];
        initial_packet.extend_from_slice(&dcid);
        initial_packet.push(0);
        initial_packet.extend_from_slice(&[0u8; 40]);
        assert!(initial_close(&initial_packet, 116).is_some());
        initial_packet[4] = 2;
        assert!(initial_close(&initial_packet, 116).is_none());
    }
}
