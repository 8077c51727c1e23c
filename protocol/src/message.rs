//! The typed messages and their framing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{
    expect_end, get_bytes, get_count, get_str, get_u16, get_u32, get_u64, get_u8, need, put_str,
    DecodeError,
};
use crate::on_demand::{
    get_flag, get_names, put_names, CaptureEnded, CaptureRequest, CaptureStarted, SensorList,
    ViewerHello,
};
use crate::{HELLO_MAGIC, MAX_FRAME_LEN, MAX_SNAPLEN, MAX_TOKEN_LEN, PROTOCOL_VERSION};

/// `type: u8` + `length: u32`.
pub const FRAME_HEADER_LEN: usize = 5;

const MAX_ID: usize = 128;
const MAX_HOSTNAME: usize = 255;
const MAX_OS: usize = 128;
const MAX_IFACE_NAME: usize = 256;
const MAX_FILTER: usize = 16 * 1024;
const MAX_INTERFACES: usize = 64;
/// Length of [`Hello::session_secret`].
pub const SESSION_SECRET_LEN: usize = 16;
/// Largest Hello body: a receiver buffers no more than this of a peer that has not yet
/// proved who it is.
pub const MAX_HELLO_LEN: usize = 256 * 1024;
const MAX_DROP_REASONS: usize = 32;
const MAX_ERROR_TEXT: usize = 1024;

/// A frame's type, its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// [`Hello`].
    Hello = 1,
    /// [`Batch`].
    Batch = 2,
    /// [`Stats`].
    Stats = 3,
    /// [`Ack`].
    Ack = 4,
    /// [`Goodbye`].
    Goodbye = 5,
    /// [`ErrorMsg`].
    Error = 6,
    /// [`ViewerHello`].
    ViewerHello = 8,
    /// [`SensorList`].
    SensorList = 9,
    /// [`CaptureRequest`].
    CaptureRequest = 10,
    /// [`CaptureStarted`].
    CaptureStarted = 11,
    /// [`CaptureEnded`].
    CaptureEnded = 12,
}

impl TryFrom<u8> for MessageType {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Batch,
            3 => Self::Stats,
            4 => Self::Ack,
            5 => Self::Goodbye,
            6 => Self::Error,
            8 => Self::ViewerHello,
            9 => Self::SensorList,
            10 => Self::CaptureRequest,
            11 => Self::CaptureStarted,
            12 => Self::CaptureEnded,
            other => return Err(DecodeError::UnknownType(other)),
        })
    }
}

/// One capture interface of a sensor, as announced in [`Hello`]. Its position in
/// `Hello::interfaces` is the `interface_id` that batches and stats refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// The interface's name on the sensor's host (or the file read).
    pub name: String,
    /// A libpcap `LINKTYPE_*` value.
    pub link_type: u16,
    /// The most bytes of a packet captured.
    pub snaplen: u32,
    /// The libpcap filter expression the user gave (empty: everything).
    pub filter: String,
}

/// The sensor's first message: who it is and what it captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the sensor.
    pub version: u16,
    /// Random per sensor session; batches and stats carry it. Never published by a
    /// receiver (logs, metrics and files show only a hash of it).
    pub session_id: u64,
    /// Random per session and never published: only a sensor holding it may resume the
    /// session on a new connection, so a known session id is not enough to take it over.
    pub session_secret: [u8; SESSION_SECRET_LEN],
    /// The name the sensor gives itself (`--sensor-id`, by default its hostname).
    pub sensor_id: String,
    /// The sensor's host name.
    pub hostname: String,
    /// Its operating system and architecture, for the output's descriptions.
    pub os: String,
    /// What it captures; a batch's `interface_id` is an index here.
    pub interfaces: Vec<InterfaceInfo>,
    /// The shared secret of `--token-file`, for a receiver that requires one.
    pub token: Option<AuthToken>,
    /// The host's interfaces, which viewers may list and capture on on demand.
    pub available: Vec<String>,
    /// Whether the sensor accepts on-demand captures (`--allow-on-demand`). Such a sensor
    /// may name no interface of its own (`--on-demand`).
    pub on_demand: bool,
    /// Whether the sensor follows TLS key logs (`--keylog`) and sends their lines in
    /// batches of [`crate::RecordKind::TlsKeyLog`] records: the receiver then holds this
    /// sensor's packets for its reorder window, so that a key, logged once the handshake
    /// is under way, is written before the packets it decrypts.
    pub tls_key_log: bool,
}

/// A shared secret that authenticates a sensor: 1 to [`MAX_TOKEN_LEN`] bytes. Its `Debug`
/// never shows it, so neither does a logged [`Hello`]. `==` is for tests: a receiver
/// compares tokens in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Bytes);

impl AuthToken {
    /// `None` when empty or longer than [`MAX_TOKEN_LEN`].
    pub fn new(secret: impl Into<Bytes>) -> Option<Self> {
        let secret = secret.into();
        (!secret.is_empty() && secret.len() <= MAX_TOKEN_LEN).then_some(Self(secret))
    }

    /// The secret itself.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How a batch body is stored on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BatchEncoding {
    /// Sent as is: compression would not have saved enough, or was not tried.
    Stored = 0,
    /// Snappy raw format (`snap::raw`).
    Snappy = 1,
}

/// A run of captured packets from one interface. `body` is the encoded (possibly
/// compressed) record stream; [`Batch::packets`] decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The session it belongs to ([`Hello::session_id`]).
    pub session_id: u64,
    /// Starts at 1 and grows by one per batch on a session, across all interfaces.
    pub sequence: u64,
    /// The interface the packets come from: an index into [`Hello::interfaces`].
    pub interface_id: u16,
    /// Packets in the body.
    pub packet_count: u32,
    /// How the body is stored.
    pub encoding: BatchEncoding,
    /// The record stream, as `encoding` says.
    pub body: Bytes,
}

/// Why packets were lost before reaching the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropReason(pub u8);

impl DropReason {
    /// The kernel's capture buffer was full (libpcap `ps_drop`, eBPF ring full).
    pub const KERNEL_BUFFER: Self = Self(1);
    /// The network interface or its driver dropped them (libpcap `ps_ifdrop`).
    pub const INTERFACE: Self = Self(2);
    /// The sensor's buffer of unacknowledged batches (`--buffer`, `--spool-dir`) was full:
    /// the receiver or the link was slower than the capture.
    pub const SENSOR_BUFFER: Self = Self(3);
    /// Batches held in the sensor's spool that could not be read back (a damaged or
    /// missing segment): sent on as empty batches so that the session goes on.
    pub const SPOOL_DAMAGED: Self = Self(4);
    /// An on-demand capture passed the sensor's rate cap (`--on-demand-max-rate`).
    pub const RATE_CAP: Self = Self(5);
    /// Packets of an on-demand capture the receiver dropped because its viewer read too
    /// slowly (never from a sensor: the receiver counts them itself).
    pub const VIEWER_SLOW: Self = Self(6);

    /// The reason as the exit summaries say it (`kernel buffer full`).
    pub fn name(self) -> &'static str {
        match self {
            Self::KERNEL_BUFFER => "kernel buffer full",
            Self::INTERFACE => "interface/driver",
            Self::SENSOR_BUFFER => "sensor buffer full",
            Self::SPOOL_DAMAGED => "spool damaged",
            Self::RATE_CAP => "on-demand rate cap",
            Self::VIEWER_SLOW => "viewer too slow",
            _ => "other",
        }
    }

    /// The same reason as a metrics label value (`reason="kernel_buffer"`).
    pub fn label(self) -> &'static str {
        match self {
            Self::KERNEL_BUFFER => "kernel_buffer",
            Self::INTERFACE => "interface",
            Self::SENSOR_BUFFER => "sensor_buffer",
            Self::SPOOL_DAMAGED => "spool_damaged",
            Self::RATE_CAP => "rate_cap",
            Self::VIEWER_SLOW => "viewer_slow",
            _ => "other",
        }
    }
}

/// Cumulative counters of one interface since the sensor started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    /// The interface: an index into [`Hello::interfaces`].
    pub interface_id: u16,
    /// Packets the capture saw (before the filter, where the backend can tell).
    pub seen: u64,
    /// Packets that matched the filter and reached the sensor.
    pub matched: u64,
    /// Packets the receiver has acknowledged (written to its output).
    pub delivered: u64,
    /// Packets lost, by reason. Reasons are unique.
    pub drops: Vec<(DropReason, u64)>,
}

impl InterfaceStats {
    /// Packets lost for any reason.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }
}

/// The sensor's counters, sent about once a second and before Goodbye.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// The session they belong to.
    pub session_id: u64,
    /// One entry per interface.
    pub interfaces: Vec<InterfaceStats>,
}

/// Every batch of the session up to and including `sequence` is in the receiver's output.
/// The receiver sends one right after accepting a Hello, before any batch: it tells a
/// reconnecting sensor where to resume (0 for a session it has not seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The highest batch written with every batch before it.
    pub sequence: u64,
}

/// A clean end of the session: nothing more will be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Goodbye;

/// Why a peer ends the session with [`ErrorMsg`]; unknown codes are kept as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The peer broke the protocol (a malformed frame, a message out of place).
    pub const PROTOCOL: Self = Self(1);
    /// Another protocol version, or not a Capstream peer.
    pub const VERSION: Self = Self(2);
    /// The receiver's output cannot hold the sensor's link type.
    pub const UNSUPPORTED_LINK_TYPE: Self = Self(3);
    /// The receiver is stopping; the sensor resumes with it, or another, later.
    pub const SHUTTING_DOWN: Self = Self(4);
    /// Something failed inside the peer.
    pub const INTERNAL: Self = Self(5);
    /// The sensor did not prove who it is: a missing or wrong token. Trying again is
    /// refused again.
    pub const UNAUTHENTICATED: Self = Self(6);
    /// The receiver cannot take the sensor now (its output cannot be written, or it holds
    /// too many sessions): the sensor keeps its data and tries again later.
    pub const UNAVAILABLE: Self = Self(7);
    /// The session cannot be resumed (it ended, or belongs to another sensor): the sensor
    /// starts a new session and sends what it holds there.
    pub const SESSION_REFUSED: Self = Self(8);
    /// An on-demand capture, or a viewer, was refused: not allowed, not authenticated, a
    /// filter libpcap rejects, an unknown sensor or interface. The message says which.
    pub const CAPTURE_REFUSED: Self = Self(9);
}

/// A fatal error: the sender closes the session after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// What the receiving side should do about it.
    pub code: ErrorCode,
    /// Why, for a person.
    pub message: String,
}

/// Any message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The sensor's first message.
    Hello(Hello),
    /// Packets.
    Batch(Batch),
    /// The sensor's counters.
    Stats(Stats),
    /// What the receiver has written.
    Ack(Ack),
    /// A clean end.
    Goodbye(Goodbye),
    /// A fatal error.
    Error(ErrorMsg),
    /// A viewer's first message.
    ViewerHello(ViewerHello),
    /// The sensors a viewer may capture on.
    SensorList(SensorList),
    /// An on-demand capture asked for.
    CaptureRequest(CaptureRequest),
    /// An on-demand capture runs.
    CaptureStarted(CaptureStarted),
    /// An on-demand capture stopped.
    CaptureEnded(CaptureEnded),
}

impl Message {
    /// The frame type it is sent as.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::Batch(_) => MessageType::Batch,
            Self::Stats(_) => MessageType::Stats,
            Self::Ack(_) => MessageType::Ack,
            Self::Goodbye(_) => MessageType::Goodbye,
            Self::Error(_) => MessageType::Error,
            Self::ViewerHello(_) => MessageType::ViewerHello,
            Self::SensorList(_) => MessageType::SensorList,
            Self::CaptureRequest(_) => MessageType::CaptureRequest,
            Self::CaptureStarted(_) => MessageType::CaptureStarted,
            Self::CaptureEnded(_) => MessageType::CaptureEnded,
        }
    }

    /// Appends the whole frame (header and body) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(self.message_type() as u8);
        out.put_u32(0); // length, patched below
        match self {
            Self::Hello(h) => h.encode_body(out),
            Self::Batch(b) => b.encode_body(out),
            Self::Stats(s) => s.encode_body(out),
            Self::Ack(a) => out.put_u64(a.sequence),
            Self::Goodbye(_) => {}
            Self::Error(e) => {
                out.put_u16(e.code.0);
                put_str(out, &e.message, MAX_ERROR_TEXT);
            }
            Self::ViewerHello(m) => m.encode_body(out),
            Self::SensorList(m) => m.encode_body(out),
            Self::CaptureRequest(m) => m.encode_body(out),
            Self::CaptureStarted(m) => m.encode_body(out),
            Self::CaptureEnded(m) => m.encode_body(out),
        }
        let body_len = out.len() - start - FRAME_HEADER_LEN;
        debug_assert!(
            body_len <= MAX_FRAME_LEN,
            "encoder produced an oversized frame"
        );
        out[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    }

    /// The whole frame in a buffer of its own.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// Decodes one frame body of the given type. The whole body must be consumed.
    pub fn decode(kind: MessageType, mut body: Bytes) -> Result<Self, DecodeError> {
        let msg = match kind {
            MessageType::Hello => Self::Hello(Hello::decode_body(&mut body)?),
            MessageType::Batch => Self::Batch(Batch::decode_body(&mut body)?),
            MessageType::Stats => Self::Stats(Stats::decode_body(&mut body)?),
            MessageType::Ack => Self::Ack(Ack {
                sequence: get_u64(&mut body, "ack sequence")?,
            }),
            MessageType::Goodbye => Self::Goodbye(Goodbye),
            MessageType::Error => Self::Error(ErrorMsg {
                code: ErrorCode(get_u16(&mut body, "error code")?),
                message: get_str(&mut body, MAX_ERROR_TEXT, "error text")?,
            }),
            MessageType::ViewerHello => Self::ViewerHello(ViewerHello::decode_body(&mut body)?),
            MessageType::SensorList => Self::SensorList(SensorList::decode_body(&mut body)?),
            MessageType::CaptureRequest => {
                Self::CaptureRequest(CaptureRequest::decode_body(&mut body)?)
            }
            MessageType::CaptureStarted => {
                Self::CaptureStarted(CaptureStarted::decode_body(&mut body)?)
            }
            MessageType::CaptureEnded => Self::CaptureEnded(CaptureEnded::decode_body(&mut body)?),
        };
        expect_end(&body)?;
        Ok(msg)
    }
}

/// Parses a frame header; refuses an unknown type or an oversized length before any body
/// is read.
pub fn decode_frame_header(
    header: [u8; FRAME_HEADER_LEN],
) -> Result<(MessageType, usize), DecodeError> {
    let kind = MessageType::try_from(header[0])?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            field: "frame",
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if matches!(kind, MessageType::Hello | MessageType::ViewerHello) && len > MAX_HELLO_LEN {
        return Err(DecodeError::TooLong {
            field: "hello",
            len,
            max: MAX_HELLO_LEN,
        });
    }
    Ok((kind, len))
}

/// Takes one whole frame off the front of `buf`, if one is there. Returns `Ok(None)` when
/// more bytes are needed. Errors are final: the stream cannot be resynchronised.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    header.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
    let (kind, len) = decode_frame_header(header)?;
    if buf.len() < FRAME_HEADER_LEN + len {
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let body = buf.split_to(len).freeze();
    Message::decode(kind, body).map(Some)
}

impl Hello {
    fn encode_body(&self, out: &mut BytesMut) {
        out.put_slice(&HELLO_MAGIC);
        out.put_u16(self.version);
        out.put_u64(self.session_id);
        out.put_slice(&self.session_secret);
        put_str(out, &self.sensor_id, MAX_ID);
        put_str(out, &self.hostname, MAX_HOSTNAME);
        put_str(out, &self.os, MAX_OS);
        put_interfaces(out, &self.interfaces);
        // Length 0: no token.
        let token = self.token.as_ref().map_or(&[][..], AuthToken::as_bytes);
        out.put_u16(token.len() as u16);
        out.put_slice(token);
        put_names(out, &self.available);
        out.put_u8(self.on_demand.into());
        out.put_u8(self.tls_key_log.into());
    }

    fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        need(buf, HELLO_MAGIC.len(), "hello magic")?;
        if buf.split_to(HELLO_MAGIC.len()) != HELLO_MAGIC[..] {
            return Err(DecodeError::BadMagic);
        }
        let version = get_u16(buf, "protocol version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let session_id = get_u64(buf, "session id")?;
        need(buf, SESSION_SECRET_LEN, "session secret")?;
        let mut session_secret = [0u8; SESSION_SECRET_LEN];
        buf.copy_to_slice(&mut session_secret);
        let sensor_id = get_str(buf, MAX_ID, "sensor id")?;
        let hostname = get_str(buf, MAX_HOSTNAME, "hostname")?;
        let os = get_str(buf, MAX_OS, "os")?;
        let interfaces = get_interfaces(buf)?;
        let token = AuthToken::new(get_bytes(buf, MAX_TOKEN_LEN, "token")?);
        let available = get_names(buf)?;
        let on_demand = get_flag(buf, "on-demand flag")?;
        let tls_key_log = get_flag(buf, "tls key log flag")?;
        Ok(Self {
            version,
            session_id,
            session_secret,
            sensor_id,
            hostname,
            os,
            interfaces,
            token,
            available,
            on_demand,
            tls_key_log,
        })
    }
}

/// Interface descriptions, at most [`MAX_INTERFACES`] (more are left out).
pub(crate) fn put_interfaces(out: &mut BytesMut, interfaces: &[InterfaceInfo]) {
    let n = interfaces.len().min(MAX_INTERFACES);
    out.put_u16(n as u16);
    for iface in &interfaces[..n] {
        put_str(out, &iface.name, MAX_IFACE_NAME);
        out.put_u16(iface.link_type);
        out.put_u32(iface.snaplen);
        put_str(out, &iface.filter, MAX_FILTER);
    }
}

pub(crate) fn get_interfaces(buf: &mut Bytes) -> Result<Vec<InterfaceInfo>, DecodeError> {
    let n = get_count(buf, MAX_INTERFACES, "interface count")?;
    let mut interfaces = Vec::with_capacity(n);
    for _ in 0..n {
        let name = get_str(buf, MAX_IFACE_NAME, "interface name")?;
        let link_type = get_u16(buf, "link type")?;
        let snaplen = get_u32(buf, "snap length")?;
        if snaplen == 0 || snaplen > MAX_SNAPLEN {
            return Err(DecodeError::BadValue {
                field: "snap length",
                value: snaplen.into(),
            });
        }
        let filter = get_str(buf, MAX_FILTER, "filter")?;
        interfaces.push(InterfaceInfo {
            name,
            link_type,
            snaplen,
            filter,
        });
    }
    Ok(interfaces)
}

impl Batch {
    /// Bytes of a batch frame before its body: frame header plus the batch fields.
    pub const HEADER_LEN: usize = FRAME_HEADER_LEN + 8 + 8 + 2 + 4 + 1;

    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u64(self.session_id);
        out.put_u64(self.sequence);
        out.put_u16(self.interface_id);
        out.put_u32(self.packet_count);
        out.put_u8(self.encoding as u8);
        out.put_slice(&self.body);
    }

    fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let session_id = get_u64(buf, "session id")?;
        let sequence = get_u64(buf, "batch sequence")?;
        let interface_id = get_u16(buf, "interface id")?;
        let packet_count = get_u32(buf, "packet count")?;
        let encoding = match get_u8(buf, "batch encoding")? {
            0 => BatchEncoding::Stored,
            1 => BatchEncoding::Snappy,
            other => {
                return Err(DecodeError::BadValue {
                    field: "batch encoding",
                    value: other.into(),
                })
            }
        };
        let body = buf.split_off(0);
        Ok(Self {
            session_id,
            sequence,
            interface_id,
            packet_count,
            encoding,
            body,
        })
    }
}

impl Stats {
    fn encode_body(&self, out: &mut BytesMut) {
        out.put_u64(self.session_id);
        let n = self.interfaces.len().min(MAX_INTERFACES);
        out.put_u16(n as u16);
        for s in &self.interfaces[..n] {
            put_interface_stats(out, s);
        }
    }

    fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let session_id = get_u64(buf, "session id")?;
        let n = get_count(buf, MAX_INTERFACES, "stats interface count")?;
        let mut interfaces = Vec::with_capacity(n);
        for _ in 0..n {
            interfaces.push(get_interface_stats(buf)?);
        }
        Ok(Self {
            session_id,
            interfaces,
        })
    }
}

pub(crate) fn put_interface_stats(out: &mut BytesMut, s: &InterfaceStats) {
    out.put_u16(s.interface_id);
    out.put_u64(s.seen);
    out.put_u64(s.matched);
    out.put_u64(s.delivered);
    let d = s.drops.len().min(MAX_DROP_REASONS);
    out.put_u16(d as u16);
    for (reason, count) in &s.drops[..d] {
        out.put_u8(reason.0);
        out.put_u64(*count);
    }
}

pub(crate) fn get_interface_stats(buf: &mut Bytes) -> Result<InterfaceStats, DecodeError> {
    let interface_id = get_u16(buf, "interface id")?;
    let seen = get_u64(buf, "seen")?;
    let matched = get_u64(buf, "matched")?;
    let delivered = get_u64(buf, "delivered")?;
    let d = get_count(buf, MAX_DROP_REASONS, "drop reason count")?;
    let mut drops = Vec::with_capacity(d);
    for _ in 0..d {
        let reason = DropReason(get_u8(buf, "drop reason")?);
        let count = get_u64(buf, "drop count")?;
        if drops.iter().any(|(r, _)| *r == reason) {
            return Err(DecodeError::BadValue {
                field: "duplicate drop reason",
                value: reason.0.into(),
            });
        }
        drops.push((reason, count));
    }
    Ok(InterfaceStats {
        interface_id,
        seen,
        matched,
        delivered,
        drops,
    })
}
