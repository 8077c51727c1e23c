//! Protocol frames read from an async byte stream (a QUIC stream): what the sensor's
//! on-demand captures, the receiver's viewer role and the extcap program share.

use protocol::{decode_frame, Message};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes asked of the stream at a time.
const READ_CHUNK: usize = 64 * 1024;

/// The next whole message of `stream`, `buf` holding what was read past the last one.
/// `Ok(None)`: the stream ended cleanly between messages. `Err`: why it cannot go on, for a
/// person (the stream broke, ended inside a message, or sent a malformed one).
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut bytes::BytesMut,
) -> Result<Option<Message>, String> {
    loop {
        if let Some(message) = decode_frame(buf).map_err(|e| format!("bad message: {e}"))? {
            return Ok(Some(message));
        }
        buf.reserve(READ_CHUNK);
        match stream.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("the stream ended inside a message".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
