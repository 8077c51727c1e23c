//! A segment's manifest, written last: a segment is in the lake once its manifest is. It
//! names the segment and its index, the time range and size, and the segment's interfaces
//! in the order of its Interface Description Blocks.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The manifest format this build writes and reads. Still 1 with `secrets`: the field is
/// only added, with a default, so a manifest of an older build reads (no key ranges), and
/// an older build reads a newer manifest (serde skips the field it does not know) and
/// answers as before, without keys. A version 2 would have made every newer segment
/// invisible to older queries, for nothing they could not read.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The receiver that wrote it (`--receiver-name`).
    pub receiver: String,
    /// The segment's and the index's file names, beside the manifest.
    pub segment: String,
    pub index: String,
    /// Time of the first and the last packet (ns since the epoch; by the packets' clocks).
    pub first_ns: u64,
    pub last_ns: u64,
    pub packets: u64,
    pub segment_bytes: u64,
    pub index_bytes: u64,
    pub interfaces: Vec<Interface>,
    /// The byte ranges of the segment's TLS key log Decryption Secrets Blocks, in order:
    /// what a query fetches to carry the keys, without reading the segment. A segment
    /// with keys and no packet has `packets` 0, and its time range is the receiver's
    /// (when it was started and closed), as no packet dates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<Range<u64>>,
}

/// One of a segment's interfaces (a sensor's capture interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// `HOST/IFACE`.
    pub name: String,
    pub sensor: String,
    pub link_type: u16,
    pub snaplen: u32,
    /// The sensor session it came in.
    pub session: u64,
}

impl Manifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        text
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let manifest: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.version != VERSION {
            return Err(format!(
                "manifest version {} (this build reads {VERSION})",
                manifest.version
            ));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: VERSION,
            receiver: "rx1".into(),
            segment: "rx1-1.pcapng".into(),
            index: "rx1-1.parquet".into(),
            first_ns: 10,
            last_ns: 20,
            packets: 2,
            segment_bytes: 400,
            index_bytes: 100,
            interfaces: vec![Interface {
                name: "h/eth0".into(),
                sensor: "h".into(),
                link_type: 1,
                snaplen: 262_144,
                session: 7,
            }],
            secrets: vec![100..140, 300..380],
        }
    }

    #[test]
    fn secrets_ranges_read_back() {
        let m = manifest();
        assert_eq!(Manifest::from_bytes(&m.to_bytes()).unwrap(), m);
    }

    /// A manifest without keys is written as before `secrets` existed, and such a
    /// manifest reads, with no ranges.
    #[test]
    fn a_manifest_without_secrets_reads_as_before() {
        let m = Manifest {
            secrets: Vec::new(),
            ..manifest()
        };
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert!(!text.contains("secrets"), "{text}");
        assert_eq!(Manifest::from_bytes(text.as_bytes()).unwrap(), m);
    }
}
