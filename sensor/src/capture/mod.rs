//! Capture backends: where packets come from.
//!
//! A backend opens its source (activating it and installing the filter, so that every
//! input error shows up before the sensor connects), describes itself for the Hello, and
//! then runs on its own thread, feeding a [`Batcher`]: libpcap everywhere (and for files),
//! eBPF socket filter, TC, XDP and AF_XDP on Linux.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use protocol::InterfaceInfo;

use crate::batcher::{Backpressure, Batcher};
use crate::error::{Error, Result};
use crate::privileges::Need;

#[cfg(target_os = "linux")]
mod ebpf;
mod pcap;

#[cfg(target_os = "linux")]
use ebpf::FrameOwners;

/// Off Linux, no frame has an owner: `--attribute` is refused there.
#[cfg(not(target_os = "linux"))]
pub enum FrameOwners {}

#[cfg(not(target_os = "linux"))]
impl FrameOwners {
    fn of(&mut self, _: i32, _: &[u8], _: protocol::Direction) -> FrameOwner<'_> {
        match *self {}
    }

    fn tick(&mut self) {
        match *self {}
    }

    fn needs(&self) -> Vec<Need> {
        match *self {}
    }
}

/// Whose a frame libpcap captured is (`--mode pcap --attribute`).
#[cfg_attr(
    not(target_os = "linux"),
    allow(dead_code, reason = "attribution is refused off Linux")
)]
pub enum FrameOwner<'a> {
    /// This process's, by the key the batch's process table knows it by.
    Process(u64, &'a protocol::Process),
    /// No process's that the tables know, and no selector asks for one.
    Unattributed,
    /// Not a process's the selectors take: the frame is left out, as the filter would.
    NotSelected,
}

/// Which backend captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// On Linux, tc when the kernel and privileges allow it, else pcap.
    Auto,
    /// libpcap, as tcpdump uses it; files are always read this way.
    Pcap,
    /// Linux: a socket filter runs the filter in the kernel; both directions.
    Ebpf,
    /// Linux: TC (clsact) ingress and egress programs; direction recorded, and the
    /// kernel's own receive timestamps, as tcpdump gets them.
    Tc,
    /// Linux: an XDP program; ingress only, earliest in the stack.
    Xdp,
    /// Linux: XDP redirecting matching frames to AF_XDP sockets; for a dedicated mirror
    /// port, as the frames it takes leave the host's stack.
    Afxdp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Pcap => "pcap",
            Self::Ebpf => "ebpf",
            Self::Tc => "tc",
            Self::Xdp => "xdp",
            Self::Afxdp => "afxdp",
        }
    }
}

/// How an XDP program is attached (`--xdp-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// In the driver when it supports XDP, else in the generic (skb) path.
    Auto,
    /// In the driver; fails where the driver has no XDP support.
    Native,
    /// In the generic path, after the driver built an skb: works everywhere, slower.
    Skb,
}

/// What to capture from.
#[derive(Debug, Clone)]
pub enum Source {
    Interfaces(Vec<String>),
    File(PathBuf),
}

#[derive(Debug, Clone)]
#[cfg_attr(
    not(target_os = "linux"),
    allow(dead_code, reason = "the eBPF modes' options are read on Linux only")
)]
pub struct Options {
    pub snaplen: u32,
    /// The user's filter expression, as given (empty: everything).
    pub filter: String,
    /// The sensor's own flow to the receiver, which live captures must not pick up.
    pub exclude: Option<OwnFlow>,
    /// Bytes of each CPU's kernel ring in the eBPF modes (a power of two); `None`: chosen
    /// from the number of CPUs.
    pub ring_size: Option<u32>,
    pub xdp_attach: XdpAttach,
    #[cfg_attr(
        not(all(target_os = "linux", feature = "afxdp")),
        allow(dead_code, reason = "read by --mode afxdp only")
    )]
    pub afxdp: AfxdpFlags,
    /// `--attribute`: each frame's process; on with any selector.
    pub attribute: bool,
    /// Take only the frames of these processes.
    pub selectors: Selectors,
}

/// The process selectors (`--pid`, `--comm`, `--cgroup`, `--container`): with any, a frame
/// is taken when it matches the filter and its process matches one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    not(target_os = "linux"),
    allow(dead_code, reason = "the eBPF modes' options are read on Linux only")
)]
pub struct Selectors {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    /// Cgroup paths as `/proc/PID/cgroup` shows them.
    pub cgroups: Vec<String>,
    /// Container ids, or prefixes of them.
    pub containers: Vec<String>,
}

/// The kernel keeps 15 bytes of a task's name (16 with the NUL).
const MAX_COMM: usize = 15;

impl Selectors {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Refuses what can never match: a process that does not exist, a name longer than the
    /// kernel keeps, an empty name or id. (Cgroups and containers are looked up at start.)
    pub fn check(&self) -> std::result::Result<(), String> {
        for pid in &self.pids {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(format!("--pid {pid}: no such process"));
            }
        }
        for comm in &self.comms {
            if comm.is_empty() || comm.len() > MAX_COMM {
                return Err(format!(
                    "--comm {comm:?}: a process name has 1 to {MAX_COMM} bytes (the kernel \
                     keeps no more; see /proc/PID/comm)"
                ));
            }
        }
        if let Some(id) = self.containers.iter().find(|id| id.is_empty()) {
            return Err(format!("--container {id:?}: an empty id"));
        }
        Ok(())
    }
}

/// `--mode afxdp`'s own flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    not(all(target_os = "linux", feature = "afxdp")),
    allow(dead_code, reason = "read by --mode afxdp only")
)]
pub struct AfxdpFlags {
    /// RX queues to read, from queue 0 (None: all).
    pub queues: Option<u32>,
    /// The user confirmed the interface is a dedicated capture port.
    pub dedicated: bool,
    pub zero_copy: bool,
    pub busy_poll: bool,
}

/// Makes a running capture return soon; callable from any thread.
pub type Stopper = Box<dyn Fn() + Send + Sync>;

pub trait CaptureBackend: Send {
    /// How the capture is announced in the Hello (its filter is the user's text).
    fn info(&self) -> &InterfaceInfo;

    /// The link type's name, e.g. "EN10MB", for humans.
    fn link_type_name(&self) -> &str;

    /// Whether a full queue makes this capture wait (replays) or drop (live traffic).
    fn backpressure(&self) -> Backpressure;

    fn stopper(&mut self) -> Stopper;

    /// The capabilities this capture still needs once attached, and why (see
    /// [`crate::privileges`]): none unless a mode says otherwise.
    fn needs_after_attach(&self) -> Vec<Need> {
        Vec::new()
    }

    /// The packet sockets this capture keeps open once attached, which nothing may send
    /// on or rebind from then on (see `crate::seccomp`).
    #[cfg_attr(
        not(target_os = "linux"),
        allow(dead_code, reason = "the seccomp filter is Linux-only")
    )]
    fn packet_sockets(&self) -> Vec<std::os::raw::c_int> {
        Vec::new()
    }

    /// Captures until stopped or at the end of the input, then flushes the last batch.
    fn run(self: Box<Self>, batcher: Batcher) -> Result<()>;
}

/// Opens one backend per interface (or one for the file).
pub fn open(mode: Mode, source: &Source, opts: &Options) -> Result<Vec<Box<dyn CaptureBackend>>> {
    match source {
        Source::File(path) => {
            if !matches!(mode, Mode::Auto | Mode::Pcap) {
                return Err(Error::input(format!(
                    "--mode {} captures live interfaces; files are read with libpcap \
                     (drop --mode or use --mode pcap)",
                    mode.name()
                )));
            }
            if opts.attribute {
                return Err(Error::input(
                    "--attribute and the process selectors need live traffic; a file's packets \
                     have no process",
                ));
            }
            Ok(vec![Box::new(pcap::PcapCapture::file(path, opts)?)])
        }
        Source::Interfaces(names) => {
            let mut out: Vec<Box<dyn CaptureBackend>> = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                if names[..i].contains(name) {
                    return Err(Error::input(format!(
                        "interface {name} is given twice (name each interface once)"
                    )));
                }
                if names.len() > usize::from(u16::MAX) {
                    return Err(Error::input("too many interfaces"));
                }
                out.push(open_live(mode, name, opts)?);
            }
            Ok(out)
        }
    }
}

#[cfg(target_os = "linux")]
fn open_live(mode: Mode, name: &str, opts: &Options) -> Result<Box<dyn CaptureBackend>> {
    use ebpf::{EbpfCapture, Hook};
    if opts.attribute && mode == Mode::Afxdp {
        return Err(Error::input(
            "--attribute and the process selectors work with --mode tc, ebpf, xdp or pcap, not \
             --mode afxdp (its frames leave the kernel without the owner lookup)",
        ));
    }
    let hook =
        match mode {
            Mode::Pcap => {
                let capture = pcap::PcapCapture::live(name, opts)?;
                return Ok(Box::new(if opts.attribute {
                    capture.with_owners(ebpf::frame_owners(&opts.selectors)?)
                } else {
                    capture
                }));
            }
            Mode::Ebpf => Hook::Socket,
            Mode::Tc => Hook::Tc,
            Mode::Xdp => Hook::Xdp(opts.xdp_attach),
            #[cfg(feature = "afxdp")]
            Mode::Afxdp => {
                ebpf::afxdp::check_dedicated(name, opts.afxdp.dedicated)?;
                Hook::Afxdp(opts.xdp_attach, opts.afxdp)
            }
            #[cfg(not(feature = "afxdp"))]
            Mode::Afxdp => return Err(Error::input(
                "this sensor was built without AF_XDP support (the afxdp feature); use --mode xdp",
            )),
            Mode::Auto if opts.attribute => Hook::Tc,
            Mode::Auto => {
                let why = match EbpfCapture::open(name, Hook::Tc, opts) {
                    Ok(capture) => {
                        tracing::info!(
                            "{name}: --mode auto chose tc: the filter runs in the kernel, both \
                             directions are seen, with the kernel's own timestamps"
                        );
                        return Ok(Box::new(capture));
                    }
                    Err(e) => e,
                };
                // libpcap reports a bad filter or an unknown interface in the user's terms.
                let capture = pcap::PcapCapture::live(name, opts)?;
                tracing::info!("{name}: --mode auto chose pcap: eBPF capture unavailable ({why})");
                return Ok(Box::new(capture));
            }
        };
    Ok(Box::new(EbpfCapture::open(name, hook, opts)?))
}

#[cfg(not(target_os = "linux"))]
fn open_live(mode: Mode, name: &str, opts: &Options) -> Result<Box<dyn CaptureBackend>> {
    if opts.attribute {
        return Err(Error::input(
            "--attribute and the process selectors need Linux (--mode tc, ebpf, xdp or pcap there)",
        ));
    }
    match mode {
        Mode::Auto | Mode::Pcap => Ok(Box::new(pcap::PcapCapture::live(name, opts)?)),
        _ => Err(Error::input(format!(
            "--mode {} needs Linux; use --mode pcap here",
            mode.name()
        ))),
    }
}

/// The sensor's own QUIC flows: its UDP socket's local port and the receivers' addresses
/// (all of one family, that of the socket), as resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnFlow {
    pub receivers: Vec<SocketAddr>,
    pub local_port: u16,
}

/// The filter a live capture installs: the sensor's own QUIC flow excluded FIRST, so that
/// `vlan` or `mpls` in the user's expression keep their meaning (they shift the offsets of
/// everything after them). Only that flow, both ways: other traffic to or from the
/// receiver's port (an attack on it, say) is still captured.
///
/// In classic BPF a load past the end of the packet rejects the packet outright, even under
/// `not`. So every load of the exclusion is guarded by a length test: on a short or
/// truncated frame the exclusion is simply false, and the user's filter alone decides, as
/// it does for tcpdump.
pub fn compose_filter(user: &str, exclude: Option<&OwnFlow>) -> String {
    let user = user.trim();
    let Some(OwnFlow {
        receivers,
        local_port: local,
    }) = exclude
    else {
        return user.to_string();
    };
    let Some(first) = receivers.first() else {
        return user.to_string();
    };
    let flows: Vec<String> = receivers
        .iter()
        .map(|receiver| {
            let port = receiver.port();
            let ip = receiver.ip().to_canonical();
            format!(
                "(dst host {ip} and src port {local} and dst port {port}) or \
                 (src host {ip} and src port {port} and dst port {local})"
            )
        })
        .collect();
    let flow = format!("({})", flows.join(" or "));
    let own = match first.ip().to_canonical() {
        // Addresses end at byte 34; the UDP ports follow an IPv4 header of ihl*4 bytes.
        IpAddr::V4(_) => format!(
            "not (ip and len >= 34 and udp \
             and len >= 18 + ((ip[0] & 15) << 2) and {flow})"
        ),
        // A fixed 40-byte header: addresses and ports end by byte 58.
        IpAddr::V6(_) => format!("not (ip6 and len >= 58 and udp and {flow})"),
    };
    if user.is_empty() {
        own
    } else {
        format!("{own} and ({user})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_composition() {
        let flow = |addr: &str| OwnFlow {
            receivers: vec![addr.parse().unwrap()],
            local_port: 50000,
        };
        let own_v4 = "not (ip and len >= 34 and udp \
                      and len >= 18 + ((ip[0] & 15) << 2) and \
                      ((dst host 127.0.0.1 and src port 50000 and dst port 4433) or \
                      (src host 127.0.0.1 and src port 4433 and dst port 50000)))";
        assert_eq!(compose_filter("", None), "");
        assert_eq!(compose_filter("port 53", None), "port 53");
        assert_eq!(compose_filter("", Some(&flow("127.0.0.1:4433"))), own_v4);
        assert_eq!(compose_filter("  ", Some(&flow("127.0.0.1:4433"))), own_v4);
        assert_eq!(
            compose_filter("vlan and port 53", Some(&flow("127.0.0.1:4433"))),
            format!("{own_v4} and (vlan and port 53)")
        );
        assert_eq!(
            compose_filter("tcp or udp", Some(&flow("[2001:db8::1]:443"))),
            "not (ip6 and len >= 58 and udp and \
             ((dst host 2001:db8::1 and src port 50000 and dst port 443) or \
             (src host 2001:db8::1 and src port 443 and dst port 50000))) and (tcp or udp)"
        );
        let mapped = compose_filter("", Some(&flow("[::ffff:192.0.2.1]:1")));
        assert!(mapped.contains("dst host 192.0.2.1 "), "{mapped}");
    }

    /// Only the sensor's own flow is left out: another peer of the receiver's port, or the
    /// receiver's port answering someone else, is still captured (libpcap compiles and
    /// runs the filter on crafted frames, as a live capture would).
    #[test]
    fn only_the_own_flow_is_excluded() {
        let filter = compose_filter(
            "udp",
            Some(&OwnFlow {
                receivers: vec![
                    "192.0.2.10:4433".parse().unwrap(),
                    "192.0.2.11:4434".parse().unwrap(),
                ],
                local_port: 50000,
            }),
        );
        let capture = ::pcap::Capture::dead(::pcap::Linktype::ETHERNET).unwrap();
        let program = capture.compile(&filter, true).unwrap();
        let frame = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut f = vec![0u8; 14 + 20 + 8];
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[14 + 9] = 17;
            f[14 + 12..14 + 16].copy_from_slice(&src);
            f[14 + 16..14 + 20].copy_from_slice(&dst);
            f[34..36].copy_from_slice(&sport.to_be_bytes());
            f[36..38].copy_from_slice(&dport.to_be_bytes());
            f
        };
        let (me, receiver, other) = ([198, 18, 0, 1], [192, 0, 2, 10], [198, 18, 0, 9]);
        assert!(!program.filter(&frame(me, receiver, 50000, 4433)));
        assert!(!program.filter(&frame(receiver, me, 4433, 50000)));
        assert!(program.filter(&frame(other, receiver, 40000, 4433)));
        assert!(program.filter(&frame(receiver, other, 4433, 40000)));
        assert!(program.filter(&frame(me, receiver, 50001, 4433)));
        // The second receiver's flow too, and only on its own port.
        let second = [192, 0, 2, 11];
        assert!(!program.filter(&frame(me, second, 50000, 4434)));
        assert!(!program.filter(&frame(second, me, 4434, 50000)));
        assert!(program.filter(&frame(me, second, 50000, 4433)));
    }
}
