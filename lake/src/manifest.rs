//! A segment's manifest, written last: a segment is in the lake once its manifest is. It
//! names the segment and its index, the time range and size, and the segment's interfaces
//! in the order of its Interface Description Blocks.

use serde::{Deserialize, Serialize};

/// The manifest format this build writes and reads.
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
