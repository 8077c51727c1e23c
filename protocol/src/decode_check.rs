//! The decoder's self-checks: what the `decode_frame` and `batch_body` fuzz targets
//! (`fuzz/`) do with their input, and what the malformed-input regression test
//! (`tests/malformed.rs`) runs each of its files through, so that a file kept there is
//! checked by exactly the code that fuzzed it.
//!
//! Not for the programs: every check that fails panics, which is what the fuzzer reports as
//! a crash and what fails the regression test.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

use crate::{
    decode_frame, Batch, BatchBuilder, BatchEncoding, DecodeError, Message, PushOutcome,
    RecordKind, MAX_SNAPLEN,
};

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `decode_frame` or `Batch::packets` returned this error.
    Decode(DecodeError),
    /// The input ended inside a frame: the receiver reports "stream ended inside a message".
    EndedInsideFrame {
        /// The bytes of the unfinished frame.
        buffered: usize,
    },
}

impl Refusal {
    /// The error's variant name (`Truncated`, `TooLong`, ...), or `EndedInsideFrame`: what
    /// the regression files are named by.
    pub fn kind(&self) -> String {
        match self {
            Self::Decode(e) => {
                let debug = format!("{e:?}");
                let end = debug
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(debug.len());
                debug[..end].to_string()
            }
            Self::EndedInsideFrame { .. } => "EndedInsideFrame".to_string(),
        }
    }
}

/// The receiver's reading of a whole stream: frames are taken off the front of the buffer
/// until it needs more bytes or refuses one, and each batch's packets are decoded and
/// iterated. Every accepted message must survive a round trip through `Message::encode`.
/// The same bytes arriving in two pieces must decode the same way.
///
/// Returns the messages, or why the stream was refused (with the messages accepted before).
pub fn decode_stream(data: &[u8]) -> (Vec<Message>, Result<(), Refusal>) {
    let whole = decode_chunks(&[data]);
    let (a, b) = data.split_at(data.len() / 2);
    let split = decode_chunks(&[a, b]);
    assert_eq!(whole, split, "input split in two decodes differently");
    whole
}

fn decode_chunks(chunks: &[&[u8]]) -> (Vec<Message>, Result<(), Refusal>) {
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(msg)) => {
                    if let Err(e) = check_message(&msg) {
                        return (messages, Err(Refusal::Decode(e)));
                    }
                    messages.push(msg);
                }
                Ok(None) => break,
                Err(e) => return (messages, Err(Refusal::Decode(e))),
            }
        }
    }
    let result = match buf.len() {
        0 => Ok(()),
        buffered => Err(Refusal::EndedInsideFrame { buffered }),
    };
    (messages, result)
}

/// Round-trips one decoded message and, for a batch, decodes its packets as the receiver
/// does; the batch's refusal is returned.
fn check_message(msg: &Message) -> Result<(), DecodeError> {
    let mut again = BytesMut::new();
    msg.encode(&mut again);
    let encoded_len = again.len();
    match decode_frame(&mut again) {
        Ok(Some(m)) => assert_eq!(&m, msg, "re-encoded message decodes to another value"),
        other => panic!("re-encoded message ({encoded_len} bytes) does not decode: {other:?}"),
    }
    assert!(again.is_empty(), "re-encoded message leaves bytes behind");
    match msg {
        Message::Batch(batch) => check_batch(batch),
        _ => Ok(()),
    }
}

/// `batch_body`'s input: first byte the encoding (even: stored, odd: Snappy), then the
/// packet count (`u32`, big-endian), then the body.
pub fn batch_from_input(data: &[u8]) -> Option<Batch> {
    let (&first, rest) = data.split_first()?;
    let count: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    Some(Batch {
        session_id: 1,
        sequence: 1,
        interface_id: 0,
        packet_count: u32::from_be_bytes(count),
        encoding: if first % 2 == 0 {
            BatchEncoding::Stored
        } else {
            BatchEncoding::Snappy
        },
        body: Bytes::copy_from_slice(&rest[4..]),
    })
}

/// Decodes a batch's packets and iterates them all, checking what validation promises.
/// An accepted batch's packets, pushed into a fresh `BatchBuilder`, must come back the same.
pub fn check_batch(batch: &Batch) -> Result<(), DecodeError> {
    let iter = batch.packets()?;
    let records_len = iter.records_len();
    assert_eq!(iter.len(), batch.packet_count as usize, "size_hint");
    let mut data_len = 0usize;
    let mut packets = Vec::with_capacity(iter.len());
    for p in iter {
        assert!(p.data.len() <= MAX_SNAPLEN as usize, "packet above snaplen");
        assert!(
            p.data.len() as u64 <= u64::from(p.original_len),
            "captured > original"
        );
        data_len += p.data.len();
        packets.push(p);
    }
    assert_eq!(packets.len(), batch.packet_count as usize, "packet count");
    assert!(data_len <= records_len, "packets longer than their records");

    // One builder, reused: a new one reserves room for a full-size packet (256 KiB), which
    // costs more than the rest of a small input.
    thread_local!(static BUILDER: RefCell<BatchBuilder> = RefCell::new(BatchBuilder::new(0)));
    let frame = BUILDER.with_borrow_mut(|builder| {
        builder.clear();
        for p in &packets {
            let added = match p.kind {
                RecordKind::Frame => {
                    builder.push(p.timestamp_ns, p.original_len, p.direction, &p.data)
                }
                RecordKind::TlsKeyLog => builder.push_tls_key_log(p.timestamp_ns, &p.data),
            };
            assert_eq!(added, PushOutcome::Added, "an accepted batch must fit");
        }
        builder.finish(batch.session_id, batch.sequence, batch.interface_id)
    });
    let mut buf = BytesMut::from(&frame.frame[..]);
    let Ok(Some(Message::Batch(rebuilt))) = decode_frame(&mut buf) else {
        panic!("rebuilt batch does not decode");
    };
    let again: Vec<_> = rebuilt.packets().expect("rebuilt batch is valid").collect();
    assert_eq!(again, packets, "packets do not survive a rebuild");
    Ok(())
}
