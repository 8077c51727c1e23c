//! Command line: what to capture, where to send it, how to trust the receiver.
//!
//! Every value is checked here, so that a bad flag is a usage error (exit 2) before any
//! capture or network work starts.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};

use program::units::{parse_duration, parse_size};

use crate::capture::{AfxdpFlags, Mode, Selectors, XdpAttach};

/// Largest --batch-size: a batch may overshoot its target by one full-size packet, and the
/// resulting frame must stay below protocol::MAX_FRAME_LEN even when stored uncompressed.
pub const MAX_BATCH_SIZE: u64 = 4 * 1024 * 1024;
const MAX_BUFFER_SIZE: u64 = 64 << 30;

const AFTER_HELP: &str = "\
Examples:
  Stream DNS traffic of eth0, trusting the receiver's certificate file (the filter
  as --bpf, or after the options as in tcpdump):
    sensor -i eth0 --bpf 'port 53' --receiver collector.example:4433 --ca receiver.crt
    sensor -i eth0 --receiver collector.example:4433 --ca receiver.crt port 53

  Take the options from a file (e.g. iface = [\"eth0\"]), checked first:
    sensor --config /etc/capstream/sensor.toml --check-config
    sensor --config /etc/capstream/sensor.toml

  Stream everything seen on two interfaces, pinning the receiver by fingerprint:
    sensor -i eth0 -i eth1 --receiver 192.0.2.10:4433 --fingerprint 3f9a...e1

  Ride out receiver outages: 256 MiB in memory, then up to 20 GiB on disk:
    sensor -i eth0 --receiver collector:4433 --ca receiver.crt --buffer 256MiB \\
      --spool-dir /var/spool/capstream --spool-size 20GiB

  Replay a capture file (nothing is dropped; the sensor exits at its end):
    sensor -r trace.pcap --receiver [2001:db8::1]:4433 --ca receiver.crt

  Prove who this sensor is to a receiver that asks (receiver --client-ca, --token-file):
    sensor -i eth0 --receiver collector:4433 --ca ca.crt --cert tap-1.crt --key tap-1.key
    sensor -i eth0 --receiver collector:4433 --ca receiver.crt --token-file token

  Spread a fleet of sensors over three receivers (each sensor picks its own by hashing
  its --sensor-id) and move to the next when one is unreachable for 5s; the receivers
  share the token and a CA that signed their certificates (receiver certs init):
    sensor -i eth0 --receiver rx-1:4433 --receiver rx-2:4433 --receiver rx-3:4433 \\
      --ca ca.crt --token-file token --failover-after 5s

Live capture needs CAP_NET_RAW (--mode pcap) or CAP_NET_RAW, CAP_BPF and CAP_NET_ADMIN
(the eBPF modes; afxdp also CAP_IPC_LOCK), or root. Once attached, the sensor drops them
and switches to --user (started as root: nobody, unless --user root).

On the receiver's host, no --receiver, --ca or --token-file is needed: the sensor sends
to localhost:4433 and trusts the certificate (and sends the token) that the receiver
keeps in its state directory (--state-dir, default ~/.local/share/capstream). For
another host, the receiver prints its certificate's path and SHA-256 fingerprint when
it starts.";

/// Captures frames matching a tcpdump filter and streams them to a Capstream receiver
/// over QUIC.
#[derive(Debug, Parser)]
#[command(name = "sensor", version, after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("source").required(true).args(["iface", "read", "on_demand"])))]
#[command(group(ArgGroup::new("trust").args(["ca", "fingerprint"])))]
// Where no receiver runs on this host (no certificate in the default state directory), the
// receiver must be named: checked here so that --check-config refuses it too.
#[command(group(
    ArgGroup::new("which_receiver")
        .args(["receiver", "ca", "fingerprint", "state_dir"])
        .multiple(true)
        .required(default_local_receiver().is_none())
))]
pub struct Cli {
    /// The filter as tcpdump takes it, after the options: `sensor -i eth0 ... port 53` is
    /// `sensor -i eth0 ... --bpf 'port 53'` (one or the other; put `--` before an
    /// expression that starts with `-`).
    #[arg(value_name = "EXPRESSION", num_args = 1.., conflicts_with = "bpf")]
    pub expression: Vec<String>,

    /// Network interface to capture on; repeat for several (e.g. `-i eth0 -i eth1`).
    #[arg(
        short = 'i',
        long = "iface",
        value_name = "IFACE",
        conflicts_with = "read"
    )]
    pub iface: Vec<String>,

    /// Read packets from a pcap/pcapng file instead of an interface (e.g. `-r trace.pcap`).
    #[arg(short = 'r', long = "read", value_name = "FILE")]
    pub read: Option<PathBuf>,

    /// libpcap filter, as tcpdump understands it (e.g. `--bpf 'tcp port 443'`).
    /// Empty: everything.
    #[arg(
        long,
        value_name = "EXPR",
        default_value = "",
        hide_default_value = true,
        value_parser = parse_filter
    )]
    pub bpf: String,

    /// Receiver address as HOST:PORT; HOST may be a name, an IPv4 address or a bracketed
    /// IPv6 address (e.g. `--receiver collector.example:4433`, `--receiver [::1]:4433`);
    /// default: the receiver on this host, localhost:4433, trusted and authenticated with
    /// the certificate and token in its state directory (see --state-dir).
    /// Repeatable, and every address of a name counts as one more receiver: the sensor
    /// sends to one at a time, the first in its own order (rendezvous hashing of
    /// --sensor-id and each receiver's IP:PORT, so that a fleet of sensors spreads evenly
    /// over the receivers with no coordinator), and fails over to the next after
    /// --failover-after (e.g. `--receiver rx-1:4433 --receiver rx-2:4433`, or
    /// `--receiver rx.example:4433` for a name with three addresses).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_receiver)]
    pub receiver: Vec<ReceiverAddr>,

    /// With several receivers: how long the current one may be unreachable (connection
    /// lost and not made again, or never made; a receiver killed under a connection is
    /// unreachable from its last word) before the sensor moves to the next in its order,
    /// sends it every unacknowledged batch, and stays there until that one fails in turn
    /// or the sensor restarts: it does not go back when the first comes back, so that a
    /// receiver that comes and goes does not pull sensors to and fro (restart sensors to
    /// rebalance). At least 1s (e.g. `--failover-after 10s`).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_failover_after)]
    pub failover_after: Duration,

    /// Trust the receiver certificate(s) or CA(s) in this PEM file; repeatable
    /// (e.g. `--ca /var/lib/capstream/receiver.crt`). Default without --receiver (or with
    /// --state-dir): the receiver.crt in the receiver's state directory.
    #[arg(long, value_name = "FILE")]
    pub ca: Vec<PathBuf>,

    /// Trust only the receiver certificate with this SHA-256 fingerprint: 64 hex digits,
    /// colons and a `sha256:` prefix allowed (e.g. `--fingerprint sha256:3f9a...e1`).
    #[arg(long, value_name = "SHA256", value_parser = parse_fingerprint)]
    pub fingerprint: Option<Fingerprint>,

    /// TLS name to verify in the receiver's certificate; default: HOST of each --receiver
    /// (e.g. `--server-name collector.example`).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Present this PEM client certificate to a receiver that requires one
    /// (`receiver --client-ca`); the receiver names the sensor by it
    /// (e.g. `--cert tap-1.crt --key tap-1.key`, from `receiver certs sensor tap-1`).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// The PEM private key for --cert (e.g. `--key /etc/capstream/tap-1.key`).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Send the shared token in this file to a receiver that requires one
    /// (`receiver --token-file`; e.g. `--token-file /etc/capstream/token`). Default without
    /// --receiver (or with --state-dir): the token in the receiver's state directory, if
    /// there is one.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The state directory of a receiver on this host, where its receiver.crt and token
    /// are found (e.g. `--state-dir /var/lib/capstream`); default: the per-user data
    /// directory, e.g. ~/.local/share/capstream, as the receiver's.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Capture backend (e.g. `--mode ebpf`). auto: tc on Linux when the kernel and
    /// privileges allow it (the log says which and why), else pcap.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Each CPU's kernel ring for captured frames in the eBPF modes, a power of two of at
    /// least 64KiB (default 8MiB, less with more than 8 online CPUs, so that all the rings
    /// take 64MiB at most); frames that find their CPU's ring full are counted as kernel
    /// drops (e.g. `--ring-size 64MiB`).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,

    /// Where --mode xdp attaches (e.g. `--xdp-attach skb`): native (in the driver), skb
    /// (generic, works everywhere) or auto (native, else skb).
    #[arg(long, value_enum, value_name = "HOW", default_value_t = XdpAttach::Auto)]
    pub xdp_attach: XdpAttach,

    /// --mode afxdp: read this many RX queues, from queue 0 (e.g. `--queues 4`);
    /// default: all of them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queues: Option<u32>,

    /// --mode afxdp: capture even though the interface has IP addresses. The frames the
    /// filter matches leave the host's network stack, so use this on a mirror port only
    /// (e.g. `--mode afxdp --dedicated -i mirror0`).
    #[arg(long)]
    pub dedicated: bool,

    /// --mode afxdp: ask for zero-copy AF_XDP; falls back to copy mode (with a log line)
    /// where the driver lacks it (e.g. `--mode afxdp --zero-copy`).
    #[arg(long)]
    pub zero_copy: bool,

    /// --mode afxdp: spin on the rings instead of sleeping until woken; one busy core per
    /// interface for the last bit of rate (e.g. `--mode afxdp --busy-poll`).
    #[arg(long)]
    pub busy_poll: bool,

    /// Attribute every packet to the process that sent or received it (--mode tc, ebpf,
    /// xdp or pcap, Linux; e.g. `--mode tc --attribute`). Cgroup socket hooks on the cgroup2
    /// root (mounted privately if the host has none) record each socket's owner; replies and
    /// sockets opened before the start are matched by flow (in --mode pcap the sensor looks
    /// each flow up itself). The receiver writes pid, executable, command line, thread,
    /// user, cgroup, container id and pod UID as each packet's pcapng comment, in
    /// ptcpdump's format (`tshark -T fields -e frame.comment`); classic pcap output has no
    /// place for them. Off by default: the hooks see every socket of the host.
    #[arg(long)]
    pub attribute: bool,

    /// Take only the packets of process N (repeatable; --mode tc, ebpf, xdp or pcap;
    /// implies --attribute; e.g. `--pid 1234`). A packet is taken when it matches the filter
    /// and one of --pid, --comm, --cgroup or --container; the kernel checks before copying
    /// (in --mode pcap the sensor does, after libpcap's filter: counted as filtered).
    #[arg(long = "pid", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Take only the packets of threads with this name, as /proc/PID/comm shows it, at most
    /// 15 bytes (repeatable; e.g. `--comm curl`).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,

    /// Take only the packets of processes in this cgroup or below it, the path as
    /// /proc/PID/cgroup shows it (repeatable; e.g. `--cgroup /system.slice/nginx.service`).
    /// Cgroups made after the start are not included.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,

    /// Take only the packets of this container (docker, containerd, CRI-O, podman), by id
    /// or id prefix, found from the cgroup paths at start (repeatable; e.g.
    /// `--container 3f2504e04f89`).
    #[arg(long = "container", value_name = "ID")]
    pub containers: Vec<String>,

    /// Bytes kept of each packet, 1..=262144 (e.g. `-s 128` for headers only).
    #[arg(short = 's', long, value_name = "N", default_value_t = protocol::MAX_SNAPLEN,
          value_parser = clap::value_parser!(u32).range(1..=protocol::MAX_SNAPLEN as i64))]
    pub snaplen: u32,

    /// Send a partial batch after this long (e.g. `--flush-interval 250ms`, `1s`, `2.5s`).
    #[arg(long, value_name = "DUR", default_value = "100ms", value_parser = parse_flush_interval)]
    pub flush_interval: Duration,

    /// Send a batch once it holds this many bytes of packets (e.g. `--batch-size 64KiB`,
    /// `1MiB`, `65536`); at most 4MiB.
    #[arg(long, value_name = "BYTES", default_value = "256KiB", value_parser = parse_batch_size)]
    pub batch_size: usize,

    /// Memory for batches the receiver has not acknowledged yet, kept to be sent again after
    /// a reconnect (e.g. `--buffer 256MiB`). When it (and the spool) is full, live captures
    /// drop whole batches and count them as "sensor buffer full".
    #[arg(long, value_name = "BYTES", default_value = "32MiB", value_parser = parse_buffer_size)]
    pub buffer: usize,

    /// Once --buffer is full, keep further unacknowledged batches in files in this directory
    /// (e.g. `--spool-dir /var/spool/capstream`), to ride out longer outages.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Disk space the spool may use (e.g. `--spool-size 10GiB`).
    #[arg(long, value_name = "BYTES", default_value = "1GiB", requires = "spool_dir",
          value_parser = parse_spool_size)]
    pub spool_size: u64,

    /// Stop (exit 1) after the receiver has been unreachable this long
    /// (e.g. `--give-up-after 10m`); default: keep capturing and retrying for ever. After
    /// SIGINT/SIGTERM the sensor waits this long (default 30s) to deliver what it holds.
    #[arg(long, value_name = "DUR", value_parser = parse_give_up)]
    pub give_up_after: Option<Duration>,

    /// Name of this sensor in the receiver's output; default: the hostname
    /// (e.g. `--sensor-id dmz-tap-1`).
    #[arg(long, value_name = "ID", value_parser = parse_sensor_id)]
    pub sensor_id: Option<String>,

    /// Linux: once the capture is attached, run as this user (name or uid) and its primary
    /// group, with no supplementary groups (e.g. `--user capstream`). Default when started
    /// as root: nobody; `--user root` stays root. Capabilities are dropped either way; a
    /// --spool-dir that exists must then be writable by that user.
    #[arg(long, value_name = "NAME", value_parser = crate::privileges::parse_user)]
    pub user: Option<crate::privileges::User>,

    /// Serve Prometheus metrics over HTTP on this address (e.g. `--metrics 127.0.0.1:9101`,
    /// then `curl -s 127.0.0.1:9101/metrics | grep capstream_`); default: none.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    /// No live status line on stderr (shown only when stderr is a terminal), e.g. when
    /// running in tmux with logs you want to copy (`--no-status`).
    #[arg(long)]
    pub no_status: bool,

    /// At exit, write the exit summary's figures as JSON to this file (mode 0600, replaced
    /// whole; e.g. `--summary-json /run/capstream/sensor-summary.json`): the session, its
    /// batches sent, acknowledged and sent again, reconnects, and per interface what was
    /// seen, matched, delivered, dropped by reason and left unacknowledged. Written by
    /// --user: its directory must let that user create files. Also written when the run
    /// fails after capture started.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,

    /// Follow this NSS TLS key log and send its new lines to the receiver, which writes
    /// them into pcapng output as Decryption Secrets Blocks ahead of the packets they
    /// decrypt: Wireshark and tshark then open the capture decrypted, with no key file.
    /// It is the file programs write when SSLKEYLOGFILE is set (curl, Firefox, Chrome,
    /// OpenSSL s_client, Go, rustls). A path or a glob (`--keylog '/run/keys/*.log'`, new
    /// matching files are picked up); repeatable. Files are followed as they grow, and
    /// through truncation, deletion and re-creation; lines already in a file when the
    /// sensor starts are skipped (their handshakes were not captured), but with --read
    /// (`sensor --read tls.pcap --keylog keys.log`) read whole. A pattern that
    /// matches nothing yet is a warning: the file is read once it appears. Malformed lines
    /// are counted and skipped. Lines travel with the packets (acknowledged, kept in
    /// --buffer and --spool-dir, dropped and counted when those are full). Read as --user
    /// once privileges are given up. Not with --on-demand: key lines travel with a
    /// standing capture's packets.
    #[arg(long, value_name = "PATH|GLOB", conflicts_with = "on_demand")]
    pub keylog: Vec<String>,
    // On-demand captures (README "Wireshark on demand").
    /// Capture nothing of your own: stay connected and idle, and capture only what the
    /// receiver's viewers ask for (needs --allow-on-demand; e.g.
    /// `sensor --on-demand --allow-on-demand --receiver collector:4433 --ca receiver.crt`).
    #[arg(long, requires = "allow_on_demand", conflicts_with_all = ["iface", "read", "bpf", "expression"])]
    pub on_demand: bool,

    /// Take on-demand captures that the receiver's viewers (Wireshark's capstream-extcap)
    /// ask for: an interface of this host, a tcpdump filter (run in the kernel as --mode
    /// says) and a limit; several at once, each logged with who asked. The sensor then keeps
    /// the capabilities its --mode needs to open a capture (as --user, nobody by default)
    /// and runs without the seccomp fence.
    #[arg(long, conflicts_with = "read")]
    pub allow_on_demand: bool,

    /// The longest an on-demand capture runs; a longer or unlimited request is cut to it
    /// (e.g. `--on-demand-max-duration 10m`).
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_give_up)]
    pub on_demand_max_duration: Duration,

    /// Most bytes per second one on-demand capture may send; batches beyond are dropped
    /// and counted as "on-demand rate cap" (e.g. `--on-demand-max-rate 10MiB`); default: no
    /// cap.
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    pub on_demand_max_rate: Option<u64>,

    /// Most on-demand captures running at once; more are refused
    /// (e.g. `--on-demand-max-captures 2`).
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub on_demand_max_captures: u32,
}

/// `--receiver` split into host and port; the host is resolved later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverAddr {
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

impl Cli {
    pub fn selectors(&self) -> Selectors {
        Selectors {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            cgroups: self.cgroups.clone(),
            containers: self.containers.clone(),
        }
    }

    pub fn afxdp(&self) -> AfxdpFlags {
        AfxdpFlags {
            queues: self.queues,
            dedicated: self.dedicated,
            zero_copy: self.zero_copy,
            busy_poll: self.busy_poll,
        }
    }
}

impl fmt::Display for ReceiverAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

pub fn parse_receiver(s: &str) -> Result<ReceiverAddr, String> {
    const HINT: &str = "expected HOST:PORT, e.g. 127.0.0.1:4433 or [::1]:4433";
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']' ({HINT})"))?;
        let port = rest
            .strip_prefix(':')
            .ok_or_else(|| format!("missing port ({HINT})"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{host}' is not an IPv6 address ({HINT})"));
        }
        (host, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("missing port ({HINT})"))?;
        if host.contains(':') {
            return Err(format!("put an IPv6 address in brackets ({HINT})"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(format!("missing host ({HINT})"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid port '{port}' ({HINT})"))?;
    Ok(ReceiverAddr {
        host: host.to_string(),
        port,
    })
}

pub use sensor::fingerprint::{parse_fingerprint, Fingerprint};

fn parse_flush_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(60) {
        return Err(format!("flush interval '{s}' must be between 1ms and 60s"));
    }
    Ok(d)
}

fn parse_buffer_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    // At least one largest batch, so that the buffer can always hold what it sends.
    if !(MAX_BATCH_SIZE..=MAX_BUFFER_SIZE).contains(&n) {
        return Err(format!("buffer size '{s}' must be between 4MiB and 64GiB"));
    }
    usize::try_from(n).map_err(|_| format!("buffer size '{s}' is too large for this machine"))
}

fn parse_spool_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < MAX_BATCH_SIZE {
        return Err(format!("spool size '{s}' must be at least 4MiB"));
    }
    Ok(n)
}

fn parse_failover_after(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("failover time '{s}' must be at least 1s"));
    }
    Ok(d)
}

fn parse_give_up(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("give-up time '{s}' must be at least 1s"));
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < 1024 {
        return Err(format!(
            "rate '{s}' must be at least 1KiB (bytes per second)"
        ));
    }
    Ok(n)
}

fn parse_batch_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n == 0 || n > MAX_BATCH_SIZE {
        return Err(format!("batch size '{s}' must be between 1 byte and 4MiB"));
    }
    usize::try_from(n).map_err(|_| format!("batch size '{s}' is too large"))
}

/// Largest --ring-size: the kernel's limit for a ring buffer map is below 4 GiB.
const MAX_RING_SIZE: u64 = 1 << 30;

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    if !(64 * 1024..=MAX_RING_SIZE).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "{s} is not a power of two between 64KiB and 1GiB (e.g. 8MiB, 64MiB)"
        ));
    }
    u32::try_from(n).map_err(|_| format!("{s} is too large"))
}

/// The Hello carries the filter text; the protocol bounds it at 16 KiB.
fn parse_filter(s: &str) -> Result<String, String> {
    if s.len() > 16 * 1024 {
        return Err("a filter expression may be at most 16 KiB long".into());
    }
    Ok(s.trim().to_string())
}

fn parse_sensor_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 128 {
        return Err("a sensor id has 1 to 128 bytes".into());
    }
    Ok(s.to_string())
}

impl Cli {
    /// The filter: --bpf, or the trailing expression's words joined as tcpdump joins them.
    pub fn filter(&self) -> Result<String, String> {
        if self.expression.is_empty() {
            return Ok(self.bpf.clone());
        }
        parse_filter(&self.expression.join(" "))
    }

    /// The receivers: every --receiver, or the one on this host.
    pub fn receivers(&self) -> Vec<ReceiverAddr> {
        if !self.receiver.is_empty() {
            return self.receiver.clone();
        }
        vec![ReceiverAddr {
            host: DEFAULT_RECEIVER_HOST.into(),
            port: DEFAULT_RECEIVER_PORT,
        }]
    }

    /// Whether the certificate and token of a receiver on this host apply when no --ca,
    /// --fingerprint or --token-file says otherwise: for the default receiver, or when
    /// --state-dir names one. A remote --receiver never gets this host's token.
    pub fn uses_local_receiver(&self) -> bool {
        self.receiver.is_empty() || self.state_dir.is_some()
    }
}

/// The receiver's default state directory, as the receiver finds it.
pub fn default_state_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("capstream"))
}

/// The default state directory of a receiver on this host, if its certificate is readable
/// there.
pub fn default_local_receiver() -> Option<PathBuf> {
    default_state_dir().filter(|dir| std::fs::File::open(dir.join("receiver.crt")).is_ok())
}

/// Where a sensor sends without --receiver: the receiver's default port on this host.
pub const DEFAULT_RECEIVER_HOST: &str = "localhost";
pub const DEFAULT_RECEIVER_PORT: u16 = 4433;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sensor").chain(args.iter().copied()))
    }

    #[test]
    fn minimal_live() {
        let cli = parse(&["-i", "eth0", "--receiver", "h:1", "--ca", "c.pem"]).unwrap();
        assert_eq!(cli.iface, ["eth0"]);
        assert_eq!(cli.bpf, "");
        assert_eq!(cli.snaplen, 262_144);
        assert_eq!(cli.flush_interval, Duration::from_millis(100));
        assert_eq!(cli.batch_size, 256 * 1024);
        assert_eq!(cli.buffer, 32 << 20);
        assert_eq!(cli.give_up_after, None);
        assert_eq!(cli.mode, Mode::Auto);
        // The TLS name: the receiver's host.
        assert_eq!(cli.server_name, None);
        assert_eq!(cli.receivers()[0].host, "h");
        assert_eq!(cli.failover_after, Duration::from_secs(5));
    }

    #[test]
    fn several_receivers_and_failover_time() {
        let cli = parse(&[
            "-i",
            "eth0",
            "--ca",
            "ca.pem",
            "--receiver",
            "rx-1:4433",
            "--receiver",
            "[::1]:4434",
            "--failover-after",
            "2s",
        ])
        .unwrap();
        let given: Vec<String> = cli.receivers().iter().map(|r| r.to_string()).collect();
        assert_eq!(given, ["rx-1:4433", "[::1]:4434"]);
        assert_eq!(cli.failover_after, Duration::from_secs(2));
        for bad in ["0", "0s", "500ms", "soon", "-1s", ""] {
            let e = parse(&["-i", "e", "--ca", "c", "--failover-after", bad]);
            assert!(e.is_err(), "{bad}");
        }
    }

    #[test]
    fn repeated_iface_and_options() {
        let cli = parse(&[
            "-i",
            "a",
            "--iface",
            "b",
            "--receiver",
            "[::1]:4433",
            "--fingerprint",
            &"ab".repeat(32),
            "--bpf",
            "port 53",
            "-s",
            "128",
            "--flush-interval",
            "2.5s",
            "--batch-size",
            "1MiB",
            "--mode",
            "pcap",
            "--server-name",
            "x.example",
        ])
        .unwrap();
        assert_eq!(cli.iface, ["a", "b"]);
        assert_eq!(cli.receivers()[0].host, "::1");
        assert_eq!(cli.receivers()[0].to_string(), "[::1]:4433");
        assert_eq!(cli.snaplen, 128);
        assert_eq!(cli.flush_interval, Duration::from_millis(2500));
        assert_eq!(cli.batch_size, 1 << 20);
        assert_eq!(cli.mode, Mode::Pcap);
        assert_eq!(cli.server_name.as_deref(), Some("x.example"));
    }

    #[test]
    fn on_demand_flags() {
        let base = ["--receiver", "h:1", "--ca", "c"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        // No standing capture: no interface needed, but requests must be allowed.
        let cli = with(&["--on-demand", "--allow-on-demand"]).unwrap();
        assert!(cli.on_demand && cli.iface.is_empty());
        assert_eq!(cli.on_demand_max_duration, Duration::from_secs(3600));
        assert!(with(&["--on-demand"]).is_err());
        // Or a standing capture and requests.
        assert!(with(&["-i", "eth0", "--allow-on-demand"]).is_ok());
        for bad in [
            &["--on-demand", "--allow-on-demand", "-i", "eth0"][..],
            &["--on-demand", "--allow-on-demand", "--bpf", "udp"],
            &["-r", "f.pcap", "--allow-on-demand"],
            &[
                "-i",
                "eth0",
                "--allow-on-demand",
                "--on-demand-max-rate",
                "10",
            ],
            &[
                "-i",
                "eth0",
                "--allow-on-demand",
                "--on-demand-max-captures",
                "0",
            ],
        ] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_errors() {
        let fp = "ab".repeat(32);
        // No source, both sources, no trust, both trusts.
        assert!(parse(&["--receiver", "h:1", "--ca", "c"]).is_err());
        assert!(parse(&["-i", "a", "-r", "f", "--receiver", "h:1", "--ca", "c"]).is_err());
        // No trust is not a usage error with a state directory: the receiver's own
        // certificate may be found there (main checks).
        assert!(parse(&["-i", "a", "--state-dir", "/nowhere"]).is_ok());
        assert!(parse(&[
            "-i",
            "a",
            "--receiver",
            "h:1",
            "--ca",
            "c",
            "--fingerprint",
            &fp
        ])
        .is_err());
        // Out of range values.
        assert!(parse(&["-i", "a", "--receiver", "h:1", "--ca", "c", "-s", "0"]).is_err());
        assert!(parse(&["-i", "a", "--receiver", "h:1", "--ca", "c", "-s", "262145"]).is_err());
        assert!(parse(&[
            "-i",
            "a",
            "--receiver",
            "h:1",
            "--ca",
            "c",
            "--batch-size",
            "9MiB"
        ])
        .is_err());
        for bad in [
            &["--buffer", "1MiB"][..],
            &["--buffer", "lots"],
            &["--spool-size", "1GiB"],
            &["--spool-dir", "/tmp/s", "--spool-size", "1KiB"],
            &["--give-up-after", "0s"],
            &["--give-up-after", "soon"],
            // A client certificate needs its key, and a key its certificate.
            &["--cert", "tap-1.crt"],
            &["--key", "tap-1.key"],
        ] {
            let mut args = vec!["-i", "a", "--receiver", "h:1", "--ca", "c"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?}");
        }
        assert!(parse(&["-i", "a", "--receiver", "h", "--ca", "c"]).is_err());
    }

    #[test]
    fn a_trailing_expression_is_the_filter() {
        let base = ["-i", "a", "--receiver", "h:1", "--ca", "c"];
        let with = |tail: &[&str]| parse(&[&base[..], tail].concat());
        assert_eq!(with(&["port", "53"]).unwrap().filter().unwrap(), "port 53");
        assert_eq!(with(&["--bpf", " tcp "]).unwrap().filter().unwrap(), "tcp");
        assert_eq!(with(&[]).unwrap().filter().unwrap(), "");
        // Options may follow it, as they may in tcpdump.
        let cli = parse(&["-i", "a", "udp", "--receiver", "h:1", "--ca", "c"]).unwrap();
        assert_eq!(cli.filter().unwrap(), "udp");
        assert!(with(&["--bpf", "tcp", "port", "53"]).is_err());
        assert!(with(&["port", "53", "--bpf", "tcp"]).is_err());
    }

    #[test]
    fn receiver_addresses() {
        let r = parse_receiver("127.0.0.1:4433").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 4433));
        let r = parse_receiver("collector.example:1").unwrap();
        assert_eq!(r.host, "collector.example");
        let r = parse_receiver("[2001:db8::1]:4433").unwrap();
        assert_eq!(r.host, "2001:db8::1");
        for bad in [
            "::1:4433",
            "[::1]",
            "[::1]4433",
            "[nothex]:1",
            "host",
            ":4433",
            "h:0",
            "h:65536",
            "h:x",
        ] {
            assert!(parse_receiver(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprints() {
        let hex = "0123456789abcdef".repeat(4);
        let want = parse_fingerprint(&hex).unwrap();
        assert_eq!(want.to_string(), hex);
        assert_eq!(want.0[0], 0x01);
        assert_eq!(want.0[31], 0xef);
        let upper = hex.to_uppercase();
        assert_eq!(parse_fingerprint(&upper).unwrap(), want);
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let colons = colons.join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), want);
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{colons}")).unwrap(),
            want
        );
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")).unwrap(), want);
        assert!(parse_fingerprint(&hex[..62]).is_err());
        assert!(parse_fingerprint(&format!("{hex}00")).is_err());
        assert!(parse_fingerprint(&hex.replace('a', "g")).is_err());
        assert!(parse_fingerprint("sha1:abcd").is_err());
        assert!(parse_fingerprint("").is_err());
        // Multi-byte characters must not panic the prefix check.
        assert!(parse_fingerprint("ééééé").is_err());
    }

    #[test]
    fn durations() {
        assert!(parse_flush_interval("0ms").is_err());
        assert!(parse_flush_interval("61s").is_err());
    }

    #[test]
    fn sizes() {
        assert!(parse_batch_size("0").is_err());
        assert_eq!(parse_batch_size("4MiB").unwrap(), 4 << 20);
    }
}
