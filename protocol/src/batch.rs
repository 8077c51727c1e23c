//! Packet records inside a batch body, and the Snappy compression around them.
//!
//! A record is `timestamp_ns: u64`, `original_length: u32`, `captured_length: u32`,
//! `kind: u8`, then `captured_length` bytes. `kind` 0, 1 and 2 is a captured frame and the
//! [`Direction`] it crossed the interface; 3 is one line of an NSS TLS key log
//! ([`RecordKind::TlsKeyLog`], without its newline), which the receiver writes ahead of the
//! packets it decrypts. A batch holds records of one kind only.
//!
//! With `--attribute`, a frame's `kind` has [`ATTRIBUTED`] set and two more bytes follow
//! it, before the data: `process: u16`, the index of the process in the batch's table, made
//! of the batch's process records (kind 0x40, see [`Process`]) in order. Process records come
//! before the first frame that refers to them and do not count as packets.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::DecodeError;
use crate::message::{Batch, BatchEncoding, MessageType};
use crate::{Attribution, Process, MAX_BATCH_BODY, MAX_SNAPLEN};

const RECORD_HEADER_LEN: usize = 8 + 4 + 4 + 1;

/// The `kind` byte of a TLS key log record (those of frames are their [`Direction`]).
const TLS_KEY_LOG_KIND: u8 = 3;
/// The `kind` byte of a process record.
const PROCESS_KIND: u8 = 0x40;
/// Set in a frame's `kind` byte when a process index follows it.
const ATTRIBUTED: u8 = 0x80;
/// Most processes one batch's table holds; a packet of one more starts a new batch.
const MAX_BATCH_PROCESSES: usize = 1024;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A captured frame.
    Frame,
    /// One line of an NSS key log (`LABEL <client_random hex> <secret hex>`), as the sensor
    /// read it from a `--keylog` file.
    TlsKeyLog,
}

impl RecordKind {
    fn of_byte(v: u8) -> Result<Self, DecodeError> {
        if v == TLS_KEY_LOG_KIND {
            return Ok(Self::TlsKeyLog);
        }
        Direction::from_u8(v).map(|_| Self::Frame)
    }
}

/// Which way a packet crossed the capture interface, where the backend can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// The backend cannot tell.
    Unknown = 0,
    /// Received by the interface.
    Inbound = 1,
    /// Sent by the host.
    Outbound = 2,
}

impl Direction {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Self::Unknown),
            1 => Ok(Self::Inbound),
            2 => Ok(Self::Outbound),
            other => Err(DecodeError::BadValue {
                field: "direction",
                value: other.into(),
            }),
        }
    }
}

/// One record: a captured packet, or a key log line. `data` shares the batch's buffer: no
/// copy per packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// A frame, or a key log line (whose direction is [`Direction::Unknown`]).
    pub kind: RecordKind,
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Its length on the wire; `data` may be shorter (cut at the snap length).
    pub original_len: u32,
    /// Which way it crossed the interface.
    pub direction: Direction,
    /// The captured bytes.
    pub data: Bytes,
    /// Who sent or received it, when the sensor attributes packets (`--attribute`).
    pub process: Option<Arc<Attribution>>,
}

/// Whether [`BatchBuilder::push`] took the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum PushOutcome {
    /// The packet is in the batch.
    Added,
    /// The batch has no room left: take it with [`BatchBuilder::finish`] and push again.
    Full,
}

/// An encoded batch frame, ready to write to the stream.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// The whole frame: header, batch fields and body.
    pub frame: Bytes,
    /// Packets (frames) in it.
    pub packets: u32,
    /// Key log lines in it (a batch holds packets or lines, not both).
    pub tls_key_log_lines: u32,
    /// Size of the record stream before compression.
    pub raw_len: usize,
}

/// Accumulates packet records and turns them into one batch frame. Its buffers are kept
/// and reused from batch to batch, so pushing a packet never allocates.
pub struct BatchBuilder {
    records: Vec<u8>,
    count: u32,
    /// The kind of the records pushed since the last batch.
    kind: RecordKind,
    target_len: usize,
    compressed: Vec<u8>,
    encoder: snap::raw::Encoder,
    /// The sensor's key of each process already in this batch's table, and its index.
    processes: HashMap<u64, u16>,
    /// Batches still to send without trying Snappy, after recent ones did not shrink.
    skip_compression: u32,
    /// How many to skip after the next batch that does not shrink: doubles while the
    /// traffic stays incompressible, so trying costs little on encrypted or random payloads.
    skip_after_miss: u32,
}

/// Most batches sent stored, without trying Snappy, between two tries on traffic that
/// does not compress.
const MAX_COMPRESSION_SKIP: u32 = 32;

impl BatchBuilder {
    /// `target_len` is the record-stream size at which [`Self::is_ready`] says to send.
    pub fn new(target_len: usize) -> Self {
        let target_len = target_len.clamp(RECORD_HEADER_LEN, MAX_BATCH_BODY);
        Self {
            records: Vec::with_capacity(target_len + RECORD_HEADER_LEN + MAX_SNAPLEN as usize),
            count: 0,
            kind: RecordKind::Frame,
            target_len,
            compressed: Vec::new(),
            processes: HashMap::new(),
            encoder: snap::raw::Encoder::new(),
            skip_compression: 0,
            skip_after_miss: 1,
        }
    }

    /// Adds one packet (cut at [`MAX_SNAPLEN`]), unless the batch has no room for it.
    pub fn push(
        &mut self,
        timestamp_ns: u64,
        original_len: u32,
        direction: Direction,
        data: &[u8],
    ) -> PushOutcome {
        self.push_record(
            RecordKind::Frame,
            timestamp_ns,
            original_len,
            direction as u8,
            data,
        )
    }

    /// Adds one packet that `process` sent or received. `key` identifies the process for
    /// the sensor (the same key, the same process): its record is added ahead of the
    /// packet once per batch.
    pub fn push_attributed(
        &mut self,
        timestamp_ns: u64,
        original_len: u32,
        direction: Direction,
        data: &[u8],
        key: u64,
        process: &Process,
    ) -> PushOutcome {
        let data = &data[..data.len().min(MAX_SNAPLEN as usize)];
        let index = match self.processes.get(&key) {
            Some(&index) => index,
            None => {
                let before = self.records.len();
                if self.processes.len() >= MAX_BATCH_PROCESSES
                    || (self.count > 0 && self.kind != RecordKind::Frame)
                {
                    return PushOutcome::Full;
                }
                self.records.put_u64(0);
                self.records.put_u64(0);
                self.records.put_u8(PROCESS_KIND);
                process.encode(&mut self.records);
                let len = (self.records.len() - before - RECORD_HEADER_LEN) as u32;
                if before + RECORD_HEADER_LEN + len as usize + RECORD_HEADER_LEN + 2 + data.len()
                    > MAX_BATCH_BODY
                {
                    self.records.truncate(before);
                    return PushOutcome::Full;
                }
                self.records[before + 8..before + 12].copy_from_slice(&len.to_be_bytes());
                self.records[before + 12..before + 16].copy_from_slice(&len.to_be_bytes());
                let index = self.processes.len() as u16;
                self.processes.insert(key, index);
                index
            }
        };
        if self.records.len() + RECORD_HEADER_LEN + 2 + data.len() > MAX_BATCH_BODY {
            return PushOutcome::Full;
        }
        self.kind = RecordKind::Frame;
        self.records.put_u64(timestamp_ns);
        self.records.put_u32(original_len.max(data.len() as u32));
        self.records.put_u32(data.len() as u32);
        self.records.put_u8(direction as u8 | ATTRIBUTED);
        self.records.put_u16(index);
        self.records.put_slice(data);
        self.count += 1;
        PushOutcome::Added
    }

    /// Adds one TLS key log line (without its newline; cut at [`MAX_SNAPLEN`]), read at
    /// `timestamp_ns`. A batch holds packets or lines: after packets, it says
    /// [`PushOutcome::Full`], so that the caller sends them first.
    pub fn push_tls_key_log(&mut self, timestamp_ns: u64, line: &[u8]) -> PushOutcome {
        self.push_record(
            RecordKind::TlsKeyLog,
            timestamp_ns,
            0,
            TLS_KEY_LOG_KIND,
            line,
        )
    }

    fn push_record(
        &mut self,
        kind: RecordKind,
        timestamp_ns: u64,
        original_len: u32,
        kind_byte: u8,
        data: &[u8],
    ) -> PushOutcome {
        let data = &data[..data.len().min(MAX_SNAPLEN as usize)];
        if self.records.len() + RECORD_HEADER_LEN + data.len() > MAX_BATCH_BODY
            || (self.count > 0 && kind != self.kind)
        {
            return PushOutcome::Full;
        }
        self.kind = kind;
        self.records.put_u64(timestamp_ns);
        self.records.put_u32(original_len.max(data.len() as u32));
        self.records.put_u32(data.len() as u32);
        self.records.put_u8(kind_byte);
        self.records.put_slice(data);
        self.count += 1;
        PushOutcome::Added
    }

    /// Discards the accumulated packets without encoding them (the caller counts them as
    /// dropped).
    pub fn clear(&mut self) {
        self.records.clear();
        self.processes.clear();
        self.count = 0;
    }

    /// Whether no packet was pushed since the last batch.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records (packets or key log lines) pushed since the last batch.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the records reached the target size: time to finish the batch.
    pub fn is_ready(&self) -> bool {
        self.records.len() >= self.target_len
    }

    /// Encodes the accumulated packets as one batch frame and empties the builder.
    ///
    /// The body is stored uncompressed when Snappy would not make it at least an eighth
    /// smaller: the receiver's decompression would cost more than the bytes saved. After
    /// such a batch, the next 1, 2, 4 ... up to 32 batches are stored without trying.
    pub fn finish(&mut self, session_id: u64, sequence: u64, interface_id: u16) -> EncodedBatch {
        let raw_len = self.records.len();
        let compressed_len = if self.skip_compression > 0 {
            self.skip_compression -= 1;
            None
        } else {
            self.compressed
                .resize(snap::raw::max_compress_len(raw_len), 0);
            match self.encoder.compress(&self.records, &mut self.compressed) {
                Ok(n) if n < raw_len - raw_len / 8 => {
                    self.skip_after_miss = 1;
                    Some(n)
                }
                _ => {
                    self.skip_compression = self.skip_after_miss;
                    self.skip_after_miss = (self.skip_after_miss * 2).min(MAX_COMPRESSION_SKIP);
                    None
                }
            }
        };
        let (encoding, body): (BatchEncoding, &[u8]) = match compressed_len {
            Some(n) => (BatchEncoding::Snappy, &self.compressed[..n]),
            None => (BatchEncoding::Stored, &self.records),
        };
        let mut frame = BytesMut::with_capacity(Batch::HEADER_LEN + body.len());
        frame.put_u8(MessageType::Batch as u8);
        frame.put_u32((Batch::HEADER_LEN - crate::FRAME_HEADER_LEN + body.len()) as u32);
        frame.put_u64(session_id);
        frame.put_u64(sequence);
        frame.put_u16(interface_id);
        frame.put_u32(self.count);
        frame.put_u8(encoding as u8);
        frame.put_slice(body);
        let (packets, tls_key_log_lines) = match self.kind {
            RecordKind::Frame => (self.count, 0),
            RecordKind::TlsKeyLog => (0, self.count),
        };
        self.clear();
        EncodedBatch {
            frame: frame.freeze(),
            packets,
            tls_key_log_lines,
            raw_len,
        }
    }
}

impl Batch {
    /// Decompresses and checks the whole record stream, then returns an iterator over it.
    /// Every record is validated here, so the iteration itself cannot fail.
    pub fn packets(&self) -> Result<PacketIter, DecodeError> {
        let records = match self.encoding {
            BatchEncoding::Stored => {
                if self.body.len() > MAX_BATCH_BODY {
                    return Err(DecodeError::TooLong {
                        field: "batch body",
                        len: self.body.len(),
                        max: MAX_BATCH_BODY,
                    });
                }
                self.body.clone()
            }
            BatchEncoding::Snappy => decompress(&self.body)?,
        };
        let summary = validate_records(&records, self.packet_count)?;
        Ok(PacketIter {
            records,
            processes: summary.processes,
            remaining: self.packet_count,
            kind: summary.kind,
            newest: summary.newest,
            data_len: summary.data_len,
        })
    }
}

fn decompress(body: &[u8]) -> Result<Bytes, DecodeError> {
    let len =
        snap::raw::decompress_len(body).map_err(|e| DecodeError::Decompress(e.to_string()))?;
    if len > MAX_BATCH_BODY {
        return Err(DecodeError::TooLong {
            field: "decompressed batch body",
            len,
            max: MAX_BATCH_BODY,
        });
    }
    let mut out = vec![0u8; len];
    let n = snap::raw::Decoder::new()
        .decompress(body, &mut out)
        .map_err(|e| DecodeError::Decompress(e.to_string()))?;
    out.truncate(n);
    Ok(Bytes::from(out))
}

/// What validating a record stream learns on the way.
struct RecordsSummary {
    /// Of every record ([`RecordKind::Frame`] for none).
    kind: RecordKind,
    newest: Option<u64>,
    data_len: usize,
    /// The batch's process table.
    processes: Vec<Arc<Attribution>>,
}

fn validate_records(mut records: &[u8], expected: u32) -> Result<RecordsSummary, DecodeError> {
    let mut count: u32 = 0;
    let mut summary = RecordsSummary {
        kind: RecordKind::Frame,
        newest: None,
        data_len: 0,
        processes: Vec::new(),
    };
    while !records.is_empty() {
        if records.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Truncated {
                field: "packet record header",
                needed: RECORD_HEADER_LEN - records.len(),
            });
        }
        let original_len = u32::from_be_bytes(records[8..12].try_into().expect("4 bytes"));
        let captured_len = u32::from_be_bytes(records[12..16].try_into().expect("4 bytes"));
        if records[16] == PROCESS_KIND {
            let total = RECORD_HEADER_LEN + captured_len as usize;
            if captured_len != original_len || records.len() < total {
                return Err(DecodeError::BadValue {
                    field: "process record length",
                    value: captured_len.into(),
                });
            }
            if summary.processes.len() >= MAX_BATCH_PROCESSES {
                return Err(DecodeError::BadValue {
                    field: "processes in a batch",
                    value: summary.processes.len() as u64,
                });
            }
            let process = Process::decode(&records[RECORD_HEADER_LEN..total])?;
            summary.processes.push(Arc::new(Attribution::new(process)));
            records = &records[total..];
            continue;
        }
        let attributed = records[16] & ATTRIBUTED != 0;
        let kind = RecordKind::of_byte(records[16] & !ATTRIBUTED)?;
        if attributed {
            if kind != RecordKind::Frame {
                return Err(DecodeError::BadValue {
                    field: "attributed key log line",
                    value: records[16].into(),
                });
            }
            let index = match records.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + 2) {
                Some(b) => u16::from_be_bytes([b[0], b[1]]),
                None => {
                    return Err(DecodeError::Truncated {
                        field: "process index",
                        needed: 2,
                    })
                }
            };
            if usize::from(index) >= summary.processes.len() {
                return Err(DecodeError::BadValue {
                    field: "process index",
                    value: index.into(),
                });
            }
        }
        if count == 0 {
            summary.kind = kind;
        } else if kind != summary.kind {
            return Err(DecodeError::BadValue {
                field: "record kind (a batch holds packets or key log lines, not both)",
                value: records[16].into(),
            });
        }
        if captured_len > MAX_SNAPLEN {
            return Err(DecodeError::TooLong {
                field: "captured length",
                len: captured_len as usize,
                max: MAX_SNAPLEN as usize,
            });
        }
        if captured_len > original_len {
            return Err(DecodeError::BadValue {
                field: "captured length above original length",
                value: captured_len.into(),
            });
        }
        if kind == RecordKind::TlsKeyLog && captured_len != original_len {
            return Err(DecodeError::BadValue {
                field: "key log line length",
                value: original_len.into(),
            });
        }
        let total = RECORD_HEADER_LEN + 2 * usize::from(attributed) + captured_len as usize;
        if records.len() < total {
            return Err(DecodeError::Truncated {
                field: "packet data",
                needed: total - records.len(),
            });
        }
        let timestamp_ns = u64::from_be_bytes(records[..8].try_into().expect("8 bytes"));
        summary.newest = Some(summary.newest.map_or(timestamp_ns, |n| n.max(timestamp_ns)));
        summary.data_len += captured_len as usize;
        records = &records[total..];
        count += 1;
        if count > expected {
            break;
        }
    }
    if count != expected {
        return Err(DecodeError::BadValue {
            field: "packet count",
            value: expected.into(),
        });
    }
    Ok(summary)
}

/// Iterates over a validated batch's packets.
pub struct PacketIter {
    records: Bytes,
    processes: Vec<Arc<Attribution>>,
    remaining: u32,
    kind: RecordKind,
    newest: Option<u64>,
    data_len: usize,
}

impl PacketIter {
    /// Bytes of records not yet iterated: the whole decompressed body before the first
    /// `next`.
    pub fn records_len(&self) -> usize {
        self.records.len()
    }

    /// What every record of the batch holds.
    pub fn kind(&self) -> RecordKind {
        self.kind
    }

    /// The highest timestamp in the batch (`None` if it holds no packet).
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    /// Captured bytes of the batch's packets, without record headers.
    pub fn data_len(&self) -> usize {
        self.data_len
    }
}

impl Iterator for PacketIter {
    type Item = Packet;

    fn next(&mut self) -> Option<Packet> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let r = &mut self.records;
        // Process records were read into the table by validation.
        while r.len() > RECORD_HEADER_LEN && r[16] == PROCESS_KIND {
            let len = u32::from_be_bytes([r[12], r[13], r[14], r[15]]) as usize;
            r.advance(RECORD_HEADER_LEN + len);
        }
        let timestamp_ns = r.get_u64();
        let original_len = r.get_u32();
        let captured_len = r.get_u32() as usize;
        let kind = r.get_u8();
        let direction = Direction::from_u8(kind & !ATTRIBUTED).unwrap_or(Direction::Unknown);
        let process = if kind & ATTRIBUTED != 0 {
            self.processes.get(usize::from(r.get_u16())).cloned()
        } else {
            None
        };
        let data = r.split_to(captured_len);
        Some(Packet {
            kind: self.kind,
            timestamp_ns,
            original_len,
            direction,
            data,
            process,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

impl ExactSizeIterator for PacketIter {}
