//! Outputs. Each format is one module behind the [`Sink`] trait; the merge feeds it packets
//! in timestamp order.

mod pcap;
mod pcapng;

use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use common::{Direction, InterfaceStats};

pub use self::pcap::PcapSink;
pub use self::pcapng::PcapNgSink;
use crate::cli::Format;

/// One capture interface of one sensor, as the output describes it.
#[derive(Debug, Clone)]
pub struct SinkInterface {
    /// `HOST/IFACE`, already free of control characters.
    pub name: String,
    pub link_type: u16,
    pub snaplen: u32,
    pub filter: String,
    pub description: String,
}

/// A packet on its way out. `data` borrows the batch buffer.
pub struct OutPacket<'a> {
    pub interface: u32,
    pub timestamp_ns: u64,
    pub original_len: u32,
    pub direction: Direction,
    pub data: &'a [u8],
}

pub trait Sink: Send {
    /// Checks that the output can hold all of a sensor's interfaces, before any is added,
    /// so that a sensor is accepted or refused whole. The error tells the user what to do.
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), String>;

    /// Adds an interface and returns the index packets refer to.
    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32>;

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()>;

    /// Records an interface's counters (where the format has a place for them).
    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()>;

    /// Pushes buffered bytes to the file or pipe.
    fn flush(&mut self) -> io::Result<()>;

    /// Completes the output; it is valid afterwards even if no sensor ever came.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// Opens the output at `path` (`-` is stdout) in `format`.
pub fn open(path: &Path, format: Format) -> io::Result<Box<dyn Sink>> {
    let out = if path.as_os_str() == "-" {
        Output::Stdout(BufWriter::with_capacity(1 << 20, io::stdout()))
    } else {
        Output::File(Committed::new(std::fs::File::create(path)?))
    };
    Ok(match format {
        Format::Pcap => Box::new(PcapSink::new(out)),
        Format::Pcapng => Box::new(PcapNgSink::new(out)?),
    })
}

/// Where a sink's bytes go. Sinks write whole records and flush between them, so a flush
/// is a record boundary.
pub enum Output {
    /// A pipe: an error there is final (the reader went away).
    Stdout(BufWriter<io::Stdout>),
    File(Committed),
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(w) => w.write(buf),
            Self::File(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(w) => w.flush(),
            Self::File(w) => w.flush(),
        }
    }
}

/// A file that only ever holds whole flushes. Writes collect in memory; a flush appends
/// them. When the append fails (disk full), the file is cut back to the end of the last
/// good flush and the bytes are kept for the next try: a reader never finds a torn record,
/// and nothing is lost while space is short.
pub struct Committed {
    file: std::fs::File,
    pending: Vec<u8>,
    /// Length of the file's complete part.
    committed: u64,
}

impl Committed {
    fn new(file: std::fs::File) -> Self {
        Self {
            file,
            pending: Vec::with_capacity(1 << 20),
            committed: 0,
        }
    }
}

impl Write for Committed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.pending) {
            // Cut the torn tail, so that the file ends on a record boundary again.
            self.file.set_len(self.committed)?;
            self.file.seek(SeekFrom::Start(self.committed))?;
            return Err(e);
        }
        self.committed += self.pending.len() as u64;
        self.pending.clear();
        if self.pending.capacity() > 8 << 20 {
            // A burst grew it; give the memory back.
            self.pending.shrink_to(1 << 20);
        }
        Ok(())
    }
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
