//! Bounded readers and writers for the primitive field types.

use bytes::{Buf, BufMut, Bytes};

/// Why a frame could not be decoded. Every variant names what was wrong so that the
/// receiver can log it and tell the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated: {field} needs {needed} more bytes")]
    Truncated { field: &'static str, needed: usize },
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("invalid value {value} for {field}")]
    BadValue { field: &'static str, value: u64 },
    #[error("not a Capstream peer (the first message lacks the CAPS magic)")]
    BadMagic,
    #[error("protocol version {got} is not supported; this build speaks version {supported}")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("batch body does not decompress: {0}")]
    Decompress(String),
}

pub(crate) fn need(buf: &Bytes, n: usize, field: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        return Err(DecodeError::Truncated {
            field,
            needed: n - buf.remaining(),
        });
    }
    Ok(())
}

pub(crate) fn get_u8(buf: &mut Bytes, field: &'static str) -> Result<u8, DecodeError> {
    need(buf, 1, field)?;
    Ok(buf.get_u8())
}

pub(crate) fn get_u16(buf: &mut Bytes, field: &'static str) -> Result<u16, DecodeError> {
    need(buf, 2, field)?;
    Ok(buf.get_u16())
}

pub(crate) fn get_u32(buf: &mut Bytes, field: &'static str) -> Result<u32, DecodeError> {
    need(buf, 4, field)?;
    Ok(buf.get_u32())
}

pub(crate) fn get_u64(buf: &mut Bytes, field: &'static str) -> Result<u64, DecodeError> {
    need(buf, 8, field)?;
    Ok(buf.get_u64())
}

/// A string: `u16` length, then UTF-8 bytes. `max` bounds the length before anything is
/// copied.
pub(crate) fn get_str(
    buf: &mut Bytes,
    max: usize,
    field: &'static str,
) -> Result<String, DecodeError> {
    let raw = get_bytes(buf, max, field)?;
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadUtf8 { field })
}

/// Opaque bytes: `u16` length, then the bytes. `max` bounds the length before anything is
/// copied.
pub(crate) fn get_bytes(
    buf: &mut Bytes,
    max: usize,
    field: &'static str,
) -> Result<Bytes, DecodeError> {
    let len = get_u16(buf, field)? as usize;
    if len > max {
        return Err(DecodeError::TooLong { field, len, max });
    }
    need(buf, len, field)?;
    Ok(buf.split_to(len))
}

/// A count of items, bounded before any item is decoded.
pub(crate) fn get_count(
    buf: &mut Bytes,
    max: usize,
    field: &'static str,
) -> Result<usize, DecodeError> {
    let n = get_u16(buf, field)? as usize;
    if n > max {
        return Err(DecodeError::TooLong { field, len: n, max });
    }
    Ok(n)
}

/// Writes a string, cutting it at `max` bytes (on a character boundary) so that the
/// encoder never produces what the decoder would refuse.
pub(crate) fn put_str(out: &mut impl BufMut, s: &str, max: usize) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
}

pub(crate) fn expect_end(buf: &Bytes) -> Result<(), DecodeError> {
    match buf.remaining() {
        0 => Ok(()),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}
