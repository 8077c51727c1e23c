//! The project's own traffic generator, faster than `tcpreplay --topspeed`, so that capture
//! and not generation is the limit: one prebuilt Ethernet/IPv4/UDP frame sent again and
//! again out of an interface through an AF_PACKET socket that bypasses the qdisc
//! (PACKET_QDISC_BYPASS), [`BATCH`] frames per `sendmmsg` call.
//!
//! The bench runs it as `cargo xtask generate` inside the generator's namespace. When the
//! link cannot take a frame (the peer's backlog or ring is full), the kernel refuses it
//! with ENOBUFS before any capture saw it; the generator counts the refusal and sends that
//! frame again, so every frame of `--count` reaches the capture end exactly once.
//!
//! With `--xdp-live` it sends through XDP "live frames" instead (BPF_PROG_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES, as xdp-trafficgen does): a two-instruction XDP program
//! returns XDP_TX for each copy of the frame, which the kernel turns into a transmission out
//! of the interface, without sockets or skbs. A veth peer takes such frames only when it runs
//! NAPI (an XDP program attached, or GRO on). The kernel does not say which frames the peer
//! refused; its counters do ([`super::ndr`] reads them).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Frames per `sendmmsg` call.
const BATCH: usize = 1024;

/// What to send.
pub struct Options {
    pub iface: String,
    pub dst_mac: [u8; 6],
    /// Frame size in bytes, without the FCS.
    pub size: usize,
    pub count: u64,
    /// Frames per second; as fast as possible when `None`.
    pub rate: Option<u64>,
    /// Through XDP live frames rather than an AF_PACKET socket.
    pub xdp_live: bool,
    /// The CPU to run on, if pinned.
    pub cpu: Option<usize>,
}

/// What was sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    pub frames: u64,
    pub seconds: f64,
    /// Frames the link refused (ENOBUFS) and the generator sent again.
    pub refused: u64,
}

impl Sent {
    pub fn pps(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }

    /// The line `cargo xtask generate` prints, which [`Sent::parse`] reads back.
    pub fn line(&self) -> String {
        format!(
            "generator: sent {} frames in {:.3} s, {:.0} pps, refused by the link and sent again {}",
            self.frames,
            self.seconds,
            self.pps(),
            self.refused
        )
    }

    fn parse(text: &str) -> Result<Self> {
        let line = text
            .lines()
            .find(|l| l.starts_with("generator: sent "))
            .with_context(|| format!("no summary from the generator in {text:?}"))?;
        let number = |label: &str| -> Result<&str> {
            let at = line.find(label).context("incomplete generator summary")? + label.len();
            Ok(line[at..].split([' ', ',']).next().unwrap_or(""))
        };
        Ok(Self {
            frames: number("sent ")?.parse()?,
            seconds: number(" in ")?.parse()?,
            refused: number("sent again ")?.parse()?,
        })
    }
}

/// Runs the generator inside `ns` (`ip netns exec NS <this program> generate ...`) and
/// returns what it says it sent.
pub fn run_in(ns: &testbed::Netns, opts: &Options) -> Result<Sent> {
    let exe = std::env::current_exe().context("cannot find the xtask executable")?;
    let mac = opts.dst_mac.map(|b| format!("{b:02x}")).join(":");
    let (size, count) = (opts.size.to_string(), opts.count.to_string());
    let mut args = vec![
        "generate",
        "--iface",
        &opts.iface,
        "--dst-mac",
        &mac,
        "--size",
        &size,
        "--count",
        &count,
    ];
    let rate = opts.rate.map(|r| r.to_string());
    if let Some(rate) = &rate {
        args.extend(["--rate", rate]);
    }
    let cpu = opts.cpu.map(|c| c.to_string());
    if let Some(cpu) = &cpu {
        args.extend(["--cpu", cpu]);
    }
    if opts.xdp_live {
        args.push("--xdp-live");
    }
    let out = ns.exec(&exe.to_string_lossy(), &args)?;
    let sent = Sent::parse(&out)?;
    if sent.frames != opts.count {
        bail!(
            "the generator sent {} of {} frames",
            sent.frames,
            opts.count
        );
    }
    Ok(sent)
}

/// Sends `opts.count` copies of the bench's UDP frame out of `opts.iface`.
pub fn send(opts: &Options) -> Result<Sent> {
    if let Some(cpu) = opts.cpu {
        pin_to(cpu)?;
    }
    let frame = super::udp_frame(opts.size, opts.dst_mac)?;
    if opts.xdp_live {
        return send_live(opts, &frame);
    }
    let socket = PacketSocket::bind(&opts.iface)?;
    // Every message of a batch points at the same frame: nothing is built per packet.
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: mmsghdr is plain data for which all-zero is a valid value (no name, no
    // control data); the iovec pointer is set just below.
    let mut messages: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for m in &mut messages {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    paced(opts, BATCH as u64, |want, sent| {
        // SAFETY: `messages` holds `want` <= BATCH initialised headers whose single iovec
        // points at `frame`, which outlives the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                socket.0.as_raw_fd(),
                messages.as_mut_ptr(),
                want as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) => {
                    sent.refused += 1;
                    std::thread::yield_now();
                }
                Some(libc::EINTR) => {}
                _ => bail!("cannot send on {}: {e}", opts.iface),
            }
            return Ok(());
        }
        let n = n as u64;
        sent.frames += n;
        // A blocking sendmmsg returns short only when a frame failed: the link refused it.
        if n < want {
            sent.refused += 1;
        }
        Ok(())
    })
}

/// Calls `send(want, sent)` until `opts.count` frames are out; `send` adds what it sent
/// (and what the link refused) to `sent`. `want` is at most `max_batch`, and with a rate a
/// millisecond's worth, each call after a sleep while it is ahead of the schedule, which
/// keeps the pace even.
fn paced(
    opts: &Options,
    max_batch: u64,
    mut send: impl FnMut(u64, &mut Sent) -> Result<()>,
) -> Result<Sent> {
    let batch = opts
        .rate
        .map_or(max_batch, |r| (r / 1000).clamp(1, max_batch));
    let mut sent = Sent::default();
    let started = Instant::now();
    while sent.frames < opts.count {
        if let Some(rate) = opts.rate {
            let due = started + Duration::from_secs_f64(sent.frames as f64 / rate as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        send(batch.min(opts.count - sent.frames), &mut sent)?;
    }
    sent.seconds = started.elapsed().as_secs_f64();
    Ok(sent)
}

/// Frames per BPF_PROG_RUN call at full speed: a few milliseconds' worth.
const LIVE_CHUNK: u64 = 1 << 16;
/// Frames per flush to the interface in live frames mode (the kernel's default, NAPI's
/// budget).
const LIVE_BATCH: u32 = 64;

/// [`send`] through XDP live frames, [`LIVE_CHUNK`] frames per call at full speed.
fn send_live(opts: &Options, frame: &[u8]) -> Result<Sent> {
    use std::os::fd::AsFd;

    use cbpf_to_ebpf::{EbpfInsn, Hook};
    const XDP_TX: i32 = 3;
    // r0 = XDP_TX; exit
    let program = [
        EbpfInsn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: XDP_TX,
        },
        EbpfInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let prog = cbpf_to_ebpf::load_program(Hook::Xdp { frags: false }, &program, "cs_trafficgen")
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let index = if_index(&opts.iface)?;
    paced(opts, LIVE_CHUNK, |want, sent| {
        cbpf_to_ebpf::xdp_live_frames(prog.as_fd(), frame, index, want as u32, LIVE_BATCH)
            .with_context(|| format!("XDP live frames out of {} failed", opts.iface))?;
        sent.frames += want;
        Ok(())
    })
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`, which it bounds by the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t that lives through the call, passed with its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!(
            "cannot pin the generator to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The index of interface `iface` in this network namespace.
fn if_index(iface: &str) -> Result<u32> {
    let name = CString::new(iface).context("interface name holds a NUL byte")?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!(
            "no interface {iface} here: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(index)
}

/// An AF_PACKET raw socket bound to one interface, sending past the qdisc and receiving
/// nothing (protocol 0).
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(iface: &str) -> Result<Self> {
        let index = if_index(iface)?;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!(
                "cannot open an AF_PACKET socket (are you root?): {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let one: libc::c_int = 1;
        // SAFETY: the option value points at a c_int that lives through the call, with its
        // size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "cannot set PACKET_QDISC_BYPASS: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: sockaddr_ll is plain data for which all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a sockaddr_ll that lives through the call, passed with its size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "cannot bind to {iface}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(socket)
    }
}

/// tcpreplay's rate on the same frames, for one reference line: `tcpreplay --topspeed`'s
/// own "Rated: ... pps" figure for `file`, replayed out of `iface` in `ns`.
pub fn tcpreplay_pps(ns: &testbed::Netns, iface: &str, file: &std::path::Path) -> Result<f64> {
    let file = file.to_str().context("traffic path is not UTF-8")?;
    let out = ns.exec("tcpreplay", &["--topspeed", "-K", "-i", iface, file])?;
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Rated:"))
        .with_context(|| format!("no \"Rated:\" line from tcpreplay in:\n{out}"))?;
    let pps = line
        .split(',')
        .find(|part| part.trim_end().ends_with("pps"))
        .and_then(|part| part.split_whitespace().next())
        .with_context(|| format!("no pps in {line:?}"))?;
    Ok(pps.parse()?)
}
