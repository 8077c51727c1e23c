//! The Capstream wire protocol, sans-IO.
//!
//! Everything here works on byte buffers only: no sockets, no async, no clocks. The sensor
//! and the receiver put these messages on a QUIC stream; tests and fuzzers drive them from
//! plain bytes. The shape follows quinn-proto: typed messages, an encoder, and a strict
//! decoder that bounds every length before it is used.
//!
//! A stream carries frames: `type: u8`, `length: u32` (big-endian), then `length` bytes of
//! body. The sensor's first frame is always [`Hello`]. The receiver answers with an [`Ack`]
//! saying where the session resumes, further [`Ack`]s as batches reach its output, and ends
//! with [`Goodbye`] or [`ErrorMsg`].
//!
//! Delivery survives reconnection: a sensor keeps every batch until it is acknowledged and,
//! on a new connection with the same session id, resends those after the resume point; the
//! receiver ignores a batch whose sequence it already has.

#![deny(missing_docs)]

mod batch;
pub mod cgroup;
mod codec;
#[doc(hidden)]
pub mod decode_check;
mod key_log;
mod message;
mod on_demand;
mod process;

pub use batch::{
    BatchBuilder, Direction, EncodedBatch, Packet, PacketIter, PushOutcome, RecordKind,
};
pub use codec::DecodeError;
pub use key_log::{KeyLogLine, MAX_KEY_LOG_LINE};
pub use message::{
    decode_frame, decode_frame_header, Ack, AuthToken, Batch, BatchEncoding, DropReason, ErrorCode,
    ErrorMsg, Goodbye, Hello, InterfaceInfo, InterfaceStats, Message, MessageType, Stats,
    FRAME_HEADER_LEN, MAX_HELLO_LEN, SESSION_SECRET_LEN,
};
pub use on_demand::{
    CaptureEnded, CaptureLimits, CaptureRequest, CaptureStarted, CaptureTarget, ListedSensor,
    SensorList, ViewerHello, MAX_LISTED_INTERFACES, MAX_LISTED_SENSORS, MAX_TARGETS,
};
pub use process::{Attribution, Process, MAX_PROCESS_FIELD};

/// The protocol version this build speaks. A peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 5;

/// Four bytes at the start of every Hello, so that a peer speaking another protocol is
/// recognised at once rather than misread.
pub const HELLO_MAGIC: [u8; 4] = *b"CAPS";

/// Largest decompressed batch body. A batch must hold at least one full-size packet.
pub const MAX_BATCH_BODY: usize = 8 * 1024 * 1024;

/// Largest frame body a peer may send: a whole batch stored uncompressed, plus its header
/// fields. Bounds memory per connection.
pub const MAX_FRAME_LEN: usize = MAX_BATCH_BODY + 64;

/// Largest snap length a sensor may announce (tcpdump's default and maximum).
pub const MAX_SNAPLEN: u32 = 262_144;

/// Largest shared token (`--token-file`) a Hello may carry.
pub const MAX_TOKEN_LEN: usize = 1024;

/// ALPN protocol name carried in the TLS handshake, so a QUIC peer of another
/// application is refused during the handshake.
pub const ALPN: &[u8] = b"capstream/1";

/// ALPN of the receiver's viewer endpoint (`receiver --viewer-listen`), where viewers list
/// sensors and start on-demand captures.
pub const VIEWER_ALPN: &[u8] = b"capstream-viewer/1";
