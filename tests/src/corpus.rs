//! The shared test corpus (`../shared/corpus`, see its README) and the figures the tests
//! rely on about it, named once here. The test below recomputes them from the files with
//! tcpdump, so that a changed corpus fails here, by name, rather than as a wrong count deep
//! in a system test.

use std::path::PathBuf;

/// The corpus file the system tests replay and read: tcpdump's regression captures merged
/// into one Ethernet pcap that tcpreplay can put on a veth.
pub fn pcap() -> PathBuf {
    crate::corpus_dir().join("tcpdump-tests.pcap")
}

/// [`pcap`] as a command-line argument.
pub fn pcap_arg() -> String {
    pcap().to_string_lossy().into_owned()
}

/// Packets in [`pcap`]: `tcpdump -r tcpdump-tests.pcap | wc -l` (the corpus README says
/// 7,907 frames).
pub const PACKETS: usize = 7907;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capstream::tcpdump_records;

    #[test]
    fn the_named_figures_are_the_corpus_as_tcpdump_reads_it() {
        assert_eq!(tcpdump_records(&pcap(), "").unwrap().len(), PACKETS);
    }
}
