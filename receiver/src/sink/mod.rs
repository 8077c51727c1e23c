//! Outputs. Each format is one module behind the [`Sink`] trait; the merge feeds it packets
//! in timestamp order.

mod pcap;
mod pcapng;

use std::io::{self, BufWriter, Write};
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
    let out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
        Box::new(io::stdout())
    } else {
        Box::new(std::fs::File::create(path)?)
    };
    // Large writes: the merge hands over one packet at a time.
    let out = BufWriter::with_capacity(1 << 20, out);
    Ok(match format {
        Format::Pcap => Box::new(PcapSink::new(out)),
        Format::Pcapng => Box::new(PcapNgSink::new(out)?),
    })
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

#[cfg(test)]
pub(crate) mod testing {
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
