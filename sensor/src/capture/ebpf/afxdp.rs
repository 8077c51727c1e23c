//! `--mode afxdp`: the XDP program redirects matching frames to one AF_XDP socket per RX
//! queue (xsk-rs over libxdp); this side reads their descriptors in batches, copies the
//! frames into protocol batches and hands the frames straight back to the fill ring.
//!
//! libxdp is told not to load its own XDP program: the sensor's Aya-loaded program is the
//! only one, and the sockets are registered in its XSKMAP. Frames larger than one UMEM
//! frame arrive in several descriptors (multi-buffer, XDP_USE_SG) and are joined here.
//! AF_XDP carries no timestamp: frames are stamped with the wall clock when read.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::maps::{MapData, XskMap};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{FillQueue, FrameDesc, RxQueue, Socket, Umem};

use crate::batcher::{Batcher, Closed};
use crate::capture::AfxdpFlags;
use crate::error::{Error, Result};
use protocol::Direction;

/// UMEM frames per socket, and ring sizes: 16 MiB of frames per RX queue. Frames of 2 KiB
/// (a 1514-byte frame fits after the headroom; larger ones span several, joined below) so
/// that the RX ring can hold 4096: 2048 overflowed at 270 kpps of 1500-byte frames on a busy
/// 2-core host (bench).
const FRAMES: u32 = 8192;
const FRAME_SIZE: u32 = 2048;
const RX_RING: u32 = 4096;
const FILL_RING: u32 = 8192;
/// Descriptors read per call.
const BATCH: usize = 64;
/// While frames flow, the loop naps this long instead of waiting to be woken per frame:
/// a wake-up costs more than a frame, and the RX ring holds several milliseconds of
/// traffic even at a million frames a second.
const NAP_WHILE_BUSY: std::time::Duration = std::time::Duration::from_millis(1);
/// Multi-buffer bind flag and its descriptor option (uapi if_xdp.h), which xsk-rs does
/// not name.
const XDP_USE_SG: u16 = 1 << 4;
const XDP_PKT_CONTD: u32 = 1;

/// One RX queue's socket, with its UMEM and fill ring.
struct QueueSocket {
    queue: u32,
    // Field order matters: the socket goes before the UMEM it uses.
    rx: RxQueue,
    fill: FillQueue,
    umem: Umem,
    descs: Vec<FrameDesc>,
}

pub struct Sockets {
    sockets: Vec<QueueSocket>,
    busy_poll: bool,
    /// A frame being joined from several descriptors.
    joined: Vec<u8>,
    /// Whether the last drain found frames.
    busy: bool,
}

impl Sockets {
    /// Opens a socket on each requested RX queue of `iface` and registers it in `xsks`.
    pub fn open(iface: &str, opts: AfxdpFlags, xsks: &mut XskMap<&mut MapData>) -> Result<Self> {
        let available = rx_queues(iface);
        let queues = match opts.queues {
            None => available,
            Some(n) if n <= available => n,
            Some(n) => {
                return Err(Error::input(format!(
                    "--queues {n}: {iface} has {available} RX queue(s)"
                )))
            }
        };
        let name = CString::new(iface)
            .map_err(|_| Error::input(format!("bad interface name {iface:?}")))?;
        let interface = Interface::new(name);
        let mut sockets = Vec::new();
        for queue in 0..queues {
            let socket = match open_queue(&interface, queue, opts.zero_copy) {
                Err(SocketError { text: e, .. }) if opts.zero_copy => {
                    tracing::info!(
                        "{iface} queue {queue}: no zero-copy AF_XDP ({e}); using copy mode"
                    );
                    open_queue(&interface, queue, false)
                }
                other => other,
            }
            .map_err(|SocketError { text: e, errno }| {
                // The kernel charges the UMEM to RLIMIT_MEMLOCK unless CAP_IPC_LOCK.
                let hint = if errno == Some(libc::ENOBUFS) {
                    format!(
                        "its UMEM, {} MiB, is locked memory: grant CAP_IPC_LOCK or raise the \
                         memlock limit (ulimit -l, systemd's LimitMEMLOCK=)",
                        (FRAMES * FRAME_SIZE) >> 20
                    )
                } else {
                    "the kernel needs XDP sockets; try --mode xdp".to_string()
                };
                Error::runtime(format!(
                    "cannot open an AF_XDP socket on {iface} queue {queue}: {e} ({hint})"
                ))
            })?;
            xsks.set(queue, socket.rx.fd().as_raw_fd(), 0)
                .map_err(|e| {
                    Error::runtime(format!(
                        "cannot register the AF_XDP socket of queue {queue}: {e}"
                    ))
                })?;
            sockets.push(socket);
        }
        Ok(Self {
            sockets,
            busy_poll: opts.busy_poll,
            joined: Vec::with_capacity(64 * 1024),
            busy: false,
        })
    }

    fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.sockets
            .iter()
            // SAFETY: the descriptor lives as long as the socket, which outlives the borrow.
            .map(|s| unsafe { BorrowedFd::borrow_raw(s.rx.fd().as_raw_fd()) })
            .collect()
    }

    /// Waits before the next drain, unless busy-polling: a short nap while frames flow,
    /// else until a socket is readable, `idle` at most.
    pub fn wait(&self, idle: &rustix::event::Timespec) {
        use rustix::event::{poll, PollFd, PollFlags};
        if self.busy_poll {
            return;
        }
        if self.busy {
            std::thread::sleep(NAP_WHILE_BUSY);
            return;
        }
        let fds = self.poll_fds();
        let mut fds: Vec<PollFd> = fds
            .iter()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        // EINTR only means an earlier look at the stop flag.
        let _ = poll(&mut fds, Some(idle));
    }

    /// Reads every frame the sockets hold into the batcher, truncated to `snaplen`, and
    /// returns their UMEM frames to the fill rings.
    pub fn drain(
        &mut self,
        snaplen: usize,
        now_ns: u64,
        batcher: &mut Batcher,
    ) -> Result<(), Closed> {
        self.busy = false;
        for s in &mut self.sockets {
            loop {
                // SAFETY: `descs` came from this socket's own UMEM.
                let n = unsafe { s.rx.consume(&mut s.descs[..BATCH]) };
                if n == 0 {
                    break;
                }
                self.busy = true;
                for desc in &s.descs[..n] {
                    // SAFETY: a descriptor the kernel just filled, from this UMEM.
                    let data = unsafe { s.umem.data(desc) };
                    let bytes = data.contents();
                    if desc.options() & XDP_PKT_CONTD != 0 {
                        self.joined.extend_from_slice(bytes);
                        continue;
                    }
                    let frame = if self.joined.is_empty() {
                        bytes
                    } else {
                        self.joined.extend_from_slice(bytes);
                        &self.joined[..]
                    };
                    let wire_len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                    let result = batcher.push(
                        now_ns,
                        wire_len,
                        Direction::Inbound,
                        &frame[..frame.len().min(snaplen)],
                    );
                    self.joined.clear();
                    result?;
                }
                // SAFETY: the frames were copied out above and go back to the kernel.
                let given = unsafe { s.fill.produce(&s.descs[..n]) };
                if given < n {
                    tracing::warn!(
                        "AF_XDP queue {}: the fill ring took {given} of {n} frames",
                        s.queue
                    );
                }
                if s.fill.needs_wakeup() {
                    let _ = s.fill.wakeup(s.rx.fd_mut(), 0);
                }
            }
        }
        Ok(())
    }

    /// Frames the sockets dropped (no room in the RX ring, or none in the fill ring).
    pub fn dropped(&self) -> u64 {
        self.sockets
            .iter()
            .filter_map(|s| s.rx.fd().xdp_statistics().ok())
            .map(|st| st.rx_dropped() + st.rx_ring_full())
            .sum()
    }
}

/// Why a socket could not be opened, for the caller to explain.
struct SocketError {
    text: String,
    /// The failed system call's, when there was one.
    errno: Option<i32>,
}

impl SocketError {
    fn new(text: String) -> Self {
        Self { text, errno: None }
    }

    /// `text`, about `e`, which may come from a system call.
    fn of(text: String, e: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            text,
            errno: super::errno(e),
        }
    }
}

fn open_queue(
    interface: &Interface,
    queue: u32,
    zero_copy: bool,
) -> Result<QueueSocket, SocketError> {
    let size = |n: u32| QueueSize::new(n).expect("a power of two");
    let umem_config = UmemConfig::builder()
        .frame_size(FrameSize::new(FRAME_SIZE).expect("a valid frame size"))
        .fill_queue_size(size(FILL_RING))
        .comp_queue_size(size(64))
        .build()
        .map_err(|e| SocketError::new(format!("UMEM configuration: {e}")))?;
    let (umem, mut descs) = Umem::new(
        umem_config,
        NonZeroU32::new(FRAMES).expect("non-zero"),
        false,
    )
    .map_err(|e| SocketError::of(format!("cannot create the UMEM: {}", super::chain(&e)), &e))?;
    let mode = if zero_copy {
        BindFlags::XDP_ZEROCOPY
    } else {
        BindFlags::XDP_COPY
    };
    let bind = mode | BindFlags::XDP_USE_NEED_WAKEUP | BindFlags::from_bits_retain(XDP_USE_SG);
    let config = SocketConfig::builder()
        .rx_queue_size(size(RX_RING))
        .tx_queue_size(size(64))
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(bind)
        .build();
    // SAFETY: each socket has a UMEM of its own (nothing is shared), and libxdp loads no
    // program (INHIBIT_PROG_LOAD).
    let (_tx, rx, fill_comp) = unsafe { Socket::new(config, &umem, interface, queue) }
        .map_err(|e| SocketError::of(super::chain(&e), &e))?;
    let (mut fill, _comp) = fill_comp.ok_or_else(|| SocketError::new("no fill ring".into()))?;
    // SAFETY: every frame of this UMEM, none yet given to the kernel.
    let given = unsafe { fill.produce(&descs) };
    if given != descs.len() {
        return Err(SocketError::new(format!(
            "the fill ring took {given} of {} frames",
            descs.len()
        )));
    }
    descs.truncate(BATCH);
    Ok(QueueSocket {
        queue,
        rx,
        fill,
        umem,
        descs,
    })
}

/// The interface's RX queues, from sysfs (1 when unknown).
fn rx_queues(iface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// Refuses an interface with IP addresses unless the user said it is dedicated: frames
/// redirected to AF_XDP never reach the host's stack.
pub fn check_dedicated(iface: &str, dedicated: bool) -> Result<()> {
    if dedicated {
        return Ok(());
    }
    let addresses: Vec<String> = pcap::Device::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.name == iface)
        .flat_map(|d| d.addresses)
        .map(|a| a.addr.to_string())
        .collect();
    if addresses.is_empty() {
        return Ok(());
    }
    Err(Error::input(format!(
        "--mode afxdp takes the frames it captures away from {iface}'s network stack, and \
         {iface} has addresses ({}); capture on a dedicated mirror port, or pass --dedicated \
         if that is what you want",
        addresses.join(", ")
    )))
}
