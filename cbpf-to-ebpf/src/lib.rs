//! Classic BPF, as libpcap compiles a tcpdump expression, translated to eBPF programs for
//! a socket filter, a TC classifier or XDP, and loaded into the kernel.
//!
//! The kernel runs classic BPF only as a socket filter (converting it itself). To run a
//! tcpdump filter at TC or XDP, or in a chain of eBPF programs, it has to become eBPF: this
//! crate translates libpcap's program instruction by instruction, with the semantics of
//! the kernel's classic BPF and libpcap's interpreter (32-bit unsigned A and X, scratch
//! memory, big-endian loads, a failed load or a division by zero ending the program
//! without accepting, the Linux ancillary loads of packet metadata). The translation is
//! checked against libpcap's interpreter on hand-written programs covering every
//! instruction and on a corpus of real traffic through real filters, run in the kernel.
//!
//! - [`translate`] takes the classic instructions ([`CbpfInsn::from_pcap`] reads them out
//!   of a libpcap program) and a [`Target`]: the [`Hook`], what to return when the filter
//!   does not accept, and what to do when it does ([`OnAccept`]: return the classic
//!   result, or hand it to the next program by a tail call). It refuses what it cannot
//!   translate with a [`TranslateError`] saying which instruction and why ([`Refusal`]).
//! - On Linux, [`load_program`] loads the result (BPF_PROG_LOAD; a refusal is a
//!   [`LoadError`] with the errno and the end of the verifier's log), [`prog_array_set`]
//!   chains it, and [`test_run`] runs it on a packet (BPF_PROG_TEST_RUN). Attaching it is
//!   left to the caller (Aya, libbpf, `SO_ATTACH_BPF`).
//!
//! # Example
//!
//! ```no_run
//! use std::os::fd::AsFd;
//!
//! use cbpf_to_ebpf::{load_program, test_run, translate, CbpfInsn, Hook, OnAccept, Target};
//!
//! let libpcap = pcap::Capture::dead(pcap::Linktype::ETHERNET)?;
//! let classic = CbpfInsn::from_pcap(&libpcap.compile("tcp port 443", true)?);
//! let hook = Hook::Tc;
//! let target = Target {
//!     hook,
//!     // As classic BPF rejects, so that a test run's result is the classic verdict; a
//!     // program attached for real would let the packet through: `hook.pass()`.
//!     pass: 0,
//!     on_accept: OnAccept::Return,
//! };
//! let program = translate(&classic, &target)?;
//! // Needs CAP_BPF and CAP_NET_ADMIN (or root).
//! let fd = load_program(hook, &program, "https_only")?;
//! let frame = [0u8; 60]; // an Ethernet frame
//! let accepted = test_run(fd.as_fd(), &frame, 1)?.retval != 0;
//! assert!(!accepted); // not even IPv4
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
mod sys;
mod translate;

#[cfg(target_os = "linux")]
pub use sys::{
    load_program, map_create, prog_array_set, test_run, xdp_live_frames, LoadError, TestRun,
};
pub use translate::{
    translate, CbpfInsn, EbpfInsn, Hook, OnAccept, OpcodeKind, Refusal, Target, TranslateError,
};
