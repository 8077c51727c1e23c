//! Bounded readers and writers for the primitive field types.

use bytes::{Buf, BufMut, Bytes};

/// Why a frame could not be decoded. Every variant names what was wrong so that the
/// receiver can log it and tell the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("message truncated: {field} needs {needed} more bytes")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it still needed.
        needed: usize,
    },
    /// A length or count above its limit, refused before anything is allocated for it.
    #[error("{field} is {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The field whose length was claimed.
        field: &'static str,
        /// The length claimed.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A text field that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A frame type this build does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A value outside what its field allows.
    #[error("invalid value {value} for {field}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A first message without the Hello magic: not a Capstream peer.
    #[error("not a Capstream peer (the first message lacks the CAPS magic)")]
    BadMagic,
    /// A Hello of another protocol version.
    #[error("protocol version {got} is not supported; this build speaks version {supported}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
        /// This build's version, [`crate::PROTOCOL_VERSION`].
        supported: u16,
    },
    /// Bytes left in a frame body after its message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A Snappy body that does not decompress, or not to what it claims.
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
