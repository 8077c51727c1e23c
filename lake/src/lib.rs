//! The capture lake: what `receiver --lake` writes and `receiver query` reads, in a local
//! directory or under an S3 prefix alike (through `object_store`).
//!
//! Layout, under the lake's root:
//! `date=YYYY-MM-DD/hour=HH/receiver=NAME/STEM.{pcapng,parquet,manifest.json}`, the date
//! and hour (UTC) of when the segment was started. A segment is immutable pcapng; its
//! Parquet index ([`index`]) has a row per packet; its manifest ([`manifest`]), written
//! last, makes it visible. Receivers name their own directories, so they never collide.

pub mod dissect;
pub mod index;
pub mod layout;
pub mod manifest;
pub mod pcapng;
pub mod prune;
pub mod query;

pub use layout::Lake;
