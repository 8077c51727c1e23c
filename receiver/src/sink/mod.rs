//! Outputs, each behind the [`Sink`] trait; the merge feeds one sink packets in timestamp
//! order. Formats (pcap, pcapng) are sinks over any writer; outputs are stdout, files (with
//! rotation and a file per sensor), the live pcap stream and a Kafka topic; a tee feeds
//! several outputs.

pub mod files;
pub mod kafka;
pub mod lake;
pub mod live;
mod pcap;
mod pcapng;
pub mod secrets;
mod tee;

use std::io::{self, BufWriter, Write};
use std::path::Path;

use protocol::{Attribution, Direction, InterfaceStats};

pub use self::files::journal::{Frontier, PartialBatch};
pub use self::pcap::{PcapSink, Precision};
pub use self::pcapng::PcapNgSink;
pub use self::tee::Tee;

/// An output file's format (`--format`, else from the file's extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Classic pcap with nanosecond timestamps; one link type for all sensors.
    Pcap,
    /// pcapng: one interface block per sensor interface, with names, filters and counters.
    Pcapng,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pcap => "pcap",
            Self::Pcapng => "pcapng",
        }
    }
}

/// One capture interface of one sensor, as the output describes it.
#[derive(Debug, Clone)]
pub struct SinkInterface {
    /// `HOST/IFACE`, already free of control characters.
    pub name: String,
    pub link_type: u16,
    pub snaplen: u32,
    pub filter: String,
    pub description: String,
    /// The sensor's name (its certificate's, else the id it gives), free of control
    /// characters; it keys the file of each sensor with `--split-by sensor`.
    pub sensor: String,
    /// The sensor session's public tag (8 hex digits), as logs and metrics name it: Kafka
    /// messages carry it, so that a batch sent again after a restart is recognised.
    pub session: String,
    /// The session's full id, which the lake indexes.
    pub session_id: u64,
}

/// A packet on its way out. `data` borrows the batch buffer.
#[derive(Clone, Copy)]
pub struct OutPacket<'a> {
    pub interface: u32,
    pub timestamp_ns: u64,
    pub original_len: u32,
    pub direction: Direction,
    pub data: &'a [u8],
    /// Who sent or received it (`sensor --attribute`): pcapng writes it as the packet's
    /// comment (ptcpdump's format) and a custom option (JSON), classic pcap has no place
    /// for it; the lake indexes its fields.
    pub process: Option<&'a Attribution>,
    /// Its place in the sensor's stream, which the lake indexes so that a batch sent twice
    /// (to two receivers, after a failover) is kept once.
    pub batch: BatchPosition,
}

/// A packet's batch and its place in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchPosition {
    pub sequence: u64,
    /// Counting the batch's packets from 0.
    pub record: u32,
}

/// Why an output cannot take a sensor's interfaces; the text tells the user what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another link type than the output holds: the sensor is refused as it is.
    LinkType(String),
    /// The output holds all it may for now (files per sensor, interfaces per file): the
    /// sensor tries again later.
    Full(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LinkType(why) | Self::Full(why) => f.write_str(why),
        }
    }
}

pub trait Sink: Send {
    /// Checks that the output can hold all of a sensor's interfaces, before any is added,
    /// so that a sensor is accepted or refused whole.
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal>;

    /// Adds an interface and returns the index packets refer to.
    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32>;

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()>;

    /// Writes TLS key log lines (each ending in a newline) of the sensor of `interface`
    /// where the output holds them (pcapng, as a Decryption Secrets Block), ahead of
    /// what it writes next. Returns whether the output kept them.
    fn write_secrets(&mut self, _interface: u32, _lines: &[u8]) -> io::Result<bool> {
        Ok(false)
    }

    /// The last packet of the sensor's batch `sequence` on `interface` has been written:
    /// outputs that keep batches whole (Kafka, a message each) send it on.
    fn end_batch(&mut self, _interface: u32, _sequence: u64) -> io::Result<()> {
        Ok(())
    }

    /// Records an interface's final counters (where the format has a place for them).
    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()>;

    /// Takes note of an interface's latest counters, for outputs that end each file they
    /// complete with them (rotated pcapng). Writes nothing.
    fn update_stats(&mut self, _interface: u32, _stats: &InterfaceStats) {}

    /// Pushes buffered bytes to the file, pipe or clients: a record boundary. Once it
    /// returns Ok, everything written so far is in the output (sensors get acknowledgements).
    fn flush(&mut self) -> io::Result<()>;

    /// Completes the output; it is valid afterwards even if no sensor ever came.
    fn finish(self: Box<Self>) -> io::Result<()>;

    /// [`Self::flush`], after recording in the output's journal (files have one) what the
    /// flush appends and, from `frontiers`, how much of each sensor session the output holds
    /// once it is done. Returns whether anything was written.
    fn flush_journaled(
        &mut self,
        _frontiers: &mut dyn FnMut(&mut Vec<Frontier>),
    ) -> io::Result<bool> {
        self.flush().map(|()| false)
    }

    /// At a clean exit, before [`Self::finish`]: the journal keeps only the sessions
    /// `frontiers` names (none: it is removed).
    fn close_journal(&mut self, _frontiers: &mut dyn FnMut(&mut Vec<Frontier>)) -> io::Result<()> {
        Ok(())
    }

    /// The interfaces of sessions that closed: no packet comes for them any more. Outputs
    /// stop describing them in files they start, and close a file no one else writes.
    fn close_interfaces(&mut self, _interfaces: &[u32]) {}

    /// What an earlier run's journal says the output holds of each session; taken once.
    fn take_recovered(&mut self) -> Vec<Frontier> {
        Vec::new()
    }
}

/// A format writer over `W`: what a file or stdout holds.
pub enum FormatSink<W: Write> {
    Pcap(PcapSink<W>),
    Pcapng(PcapNgSink<W>),
}

impl<W: Write + Send> FormatSink<W> {
    /// Starts `format` on `out` (pcapng writes its section header now).
    pub fn new(format: Format, out: W) -> io::Result<Self> {
        Self::continuing(format, out, None)
    }

    /// Goes on after what `out` holds: pcap records of `link_type` (its header is there
    /// already when that is given), or a new pcapng section.
    pub fn continuing(format: Format, out: W, link_type: Option<u16>) -> io::Result<Self> {
        Ok(match format {
            Format::Pcap => Self::Pcap(PcapSink::continuing(out, link_type)),
            Format::Pcapng => Self::Pcapng(PcapNgSink::new(out)?),
        })
    }

    /// Writes what ends a file, short of flushing: pcap's header if no interface came.
    pub fn complete(&mut self) -> io::Result<()> {
        match self {
            Self::Pcap(s) => s.complete(),
            Self::Pcapng(_) => Ok(()),
        }
    }

    /// The key log lines waiting for their ClientHello, handed over to the next file.
    pub fn take_pending_secrets(&mut self) -> secrets::Pending {
        match self {
            Self::Pcap(_) => secrets::Pending::default(),
            Self::Pcapng(s) => s.take_pending_secrets(),
        }
    }

    /// Starts the file with the lines the previous one left waiting.
    pub fn carry_secrets(&mut self, pending: secrets::Pending) -> io::Result<()> {
        match self {
            Self::Pcap(_) => Ok(()),
            Self::Pcapng(s) => s.carry_secrets(pending),
        }
    }

    pub fn output(&self) -> &W {
        match self {
            Self::Pcap(s) => s.output(),
            Self::Pcapng(s) => s.output(),
        }
    }

    pub fn output_mut(&mut self) -> &mut W {
        match self {
            Self::Pcap(s) => s.output_mut(),
            Self::Pcapng(s) => s.output_mut(),
        }
    }

    pub fn into_output(self) -> W {
        match self {
            Self::Pcap(s) => s.into_output(),
            Self::Pcapng(s) => s.into_output(),
        }
    }

    fn inner(&self) -> &dyn Sink {
        match self {
            Self::Pcap(s) => s,
            Self::Pcapng(s) => s,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Sink {
        match self {
            Self::Pcap(s) => s,
            Self::Pcapng(s) => s,
        }
    }
}

impl<W: Write + Send> Sink for FormatSink<W> {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        self.inner().check(interfaces)
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        self.inner_mut().add_interface(interface)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        self.inner_mut().write_packet(packet)
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        self.inner_mut().write_stats(interface, stats)
    }

    fn write_secrets(&mut self, interface: u32, lines: &[u8]) -> io::Result<bool> {
        self.inner_mut().write_secrets(interface, lines)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner_mut().flush()
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        match *self {
            Self::Pcap(s) => Box::new(s).finish(),
            Self::Pcapng(s) => Box::new(s).finish(),
        }
    }
}

/// A stream output: stdout for `-`, else a character device or FIFO that is there already
/// (opened for writing, never created). An error there is final (the reader went away).
pub fn stream(out: &Path, format: Format) -> io::Result<Box<dyn Sink>> {
    let writer: Box<dyn Write + Send> = if out.as_os_str() == "-" {
        Box::new(io::stdout())
    } else {
        #[cfg(unix)]
        if std::fs::metadata(out).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_fifo()
        }) {
            // Opening a FIFO waits for its reader, as `tcpdump -w FIFO` does.
            tracing::info!("{}: waiting for a reader of the FIFO", out.display());
        }
        Box::new(std::fs::OpenOptions::new().write(true).open(out)?)
    };
    let out = BufWriter::with_capacity(1 << 20, writer);
    Ok(Box::new(FormatSink::new(format, out)?))
}

/// Tools read either byte order; the host's costs nothing to write.
fn native_endianness() -> pcap_file::Endianness {
    if cfg!(target_endian = "little") {
        pcap_file::Endianness::Little
    } else {
        pcap_file::Endianness::Big
    }
}

fn to_io<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

/// For the binary's tests as well as these, hence compiled always.
#[doc(hidden)]
pub mod testing {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::SinkInterface;

    /// Sensor s1's interface `name`.
    pub fn interface(name: &str, link_type: u16, filter: &str) -> SinkInterface {
        SinkInterface {
            name: name.into(),
            link_type,
            snaplen: 262_144,
            filter: filter.into(),
            description: "sensor s1 on h (linux)".into(),
            sensor: "s1".into(),
            session: "0a1b2c3d".into(),
            session_id: 0x0a1b_2c3d,
        }
    }

    /// An Ethernet frame holding a TLS ClientHello of `random`, as a client sends it.
    pub fn client_hello(random: [u8; 32]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        // IPv4, 20 bytes, TCP.
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
        frame.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[12] = 5 << 4;
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0, 1, 0xfc, 0x03, 0x03]);
        frame.extend_from_slice(&random);
        frame.extend_from_slice(&[0; 8]);
        frame
    }

    /// A Write that keeps what was written, shared with the test.
    #[derive(Clone, Default)]
    pub struct Shared(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        pub fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }
}
