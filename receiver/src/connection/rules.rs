//! The protocol rules of one sensor connection, sans-IO: fed the decoded messages (and
//! the outcomes of the token check and of the writer's join), they say what to do with
//! each: pass it to the writer, ignore it, acknowledge, leave, or refuse the sensor with an
//! [`ErrorCode`] that tells it what to do next. No I/O and no clock: [`super`] reads the
//! stream, keeps the timeouts and talks to the writer; the tests below call these rules
//! directly.
//!
//! The rules, in order:
//! - before its Hello is accepted, a peer's first frame must be a Hello of at most
//!   [`protocol::MAX_HELLO_LEN`] bytes, refused from its header alone;
//! - a Hello with the wrong token is refused (`UNAUTHENTICATED`), one naming no interface
//!   too (`PROTOCOL`);
//! - the writer's refusal to take the sensor in maps to the code of what the sensor does
//!   next ([`Refusal::join`]);
//! - once joined, batches must be of this session, on an interface the Hello named,
//!   numbered from 1, one after another: a sequence below the next expected is a batch sent
//!   again after a reconnect (ignored, counted); above it, a gap (refused);
//! - statistics must be of this session; Goodbye ends the session; anything else is
//!   refused.

use protocol::{
    decode_frame_header, Batch, DecodeError, ErrorCode, Hello, Message, MessageType, PacketIter,
    Stats, FRAME_HEADER_LEN,
};

use crate::auth::TOKEN_REFUSAL;
use crate::writer::JoinRefusal;

/// Why a session ended early, and what to tell the sensor.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What the sensor does next (see the sensor's delivery).
    pub code: ErrorCode,
    /// Why, in words for the sensor's operator.
    pub message: String,
}

impl Refusal {
    /// A frame that does not decode: another protocol version, or a broken peer.
    pub fn protocol(e: DecodeError) -> Self {
        let code = match e {
            DecodeError::UnsupportedVersion { .. } | DecodeError::BadMagic => ErrorCode::VERSION,
            _ => ErrorCode::PROTOCOL,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }

    /// A refusal with `code`, saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// What a sensor the writer did not take in is told: the code says what it does next.
    pub fn join(refusal: JoinRefusal) -> Self {
        let code = match &refusal {
            JoinRefusal::LinkType(_) => ErrorCode::UNSUPPORTED_LINK_TYPE,
            JoinRefusal::Unavailable(_) => ErrorCode::UNAVAILABLE,
            JoinRefusal::Session(_) => ErrorCode::SESSION_REFUSED,
        };
        Self::new(code, refusal.to_string())
    }

    /// The receiver is stopping: the sensor keeps its session and comes back.
    pub fn shutting_down() -> Self {
        Self::new(ErrorCode::SHUTTING_DOWN, "the receiver is shutting down")
    }
}

/// Where the connection is in the protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// Nothing accepted yet: only a Hello may come.
    #[default]
    AwaitingHello,
    /// The Hello passed these rules; the writer decides.
    Joining,
    /// The writer took the sensor in.
    Joined,
}

/// What to do with a message of a joined sensor.
pub enum Accepted {
    /// A new batch for the writer.
    Batch {
        sequence: u64,
        interface_id: u16,
        packets: PacketIter,
        /// Its size on the wire (compressed).
        wire_len: usize,
    },
    /// Sent again after a reconnect, and already here: ignored (and counted).
    Duplicate,
    /// The sensor's counters, for the writer.
    Stats(Stats),
    /// The sensor said Goodbye: close the session once all of it is written.
    Goodbye,
}

/// The rules of one connection: see the module documentation.
#[derive(Debug, Default)]
pub struct SensorProtocol {
    phase: Phase,
    /// The session the Hello named.
    session: u64,
    /// How many interfaces the Hello named.
    interfaces: usize,
    /// The next new batch; `None`: the first may have any sequence.
    expected: Option<u64>,
    /// Batches the receiver already had, sent again after a reconnect: ignored.
    duplicates: u64,
}

impl SensorProtocol {
    /// Whether the writer took the sensor in.
    pub fn joined(&self) -> bool {
        self.phase == Phase::Joined
    }

    /// Batches ignored as already received.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Checks the header at the front of `buffered` as soon as it is there: until the
    /// writer took the sensor in, only a Hello, of bounded size, is read, so a peer that
    /// proved nothing never gets room reserved for a larger frame.
    pub fn check_header(&self, buffered: &[u8]) -> Result<(), Refusal> {
        if self.joined() {
            return Ok(());
        }
        let Some(header) = buffered.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(());
        };
        match decode_frame_header(*header) {
            Ok((MessageType::Hello, _)) => Ok(()),
            Ok((other, _)) => Err(Refusal::new(
                ErrorCode::PROTOCOL,
                format!("expected Hello first, got {other:?}"),
            )),
            Err(e) => Err(Refusal::protocol(e)),
        }
    }

    /// The connection's first message, which must be a Hello.
    pub fn hello(&self, first: Message) -> Result<Hello, Refusal> {
        match first {
            Message::Hello(hello) => Ok(hello),
            other => Err(Refusal::new(
                ErrorCode::PROTOCOL,
                format!("expected Hello first, got {:?}", other.message_type()),
            )),
        }
    }

    /// Admits the Hello for the writer to decide on, given the outcome of its token check
    /// (see [`crate::auth::Auth::check_token`]), which comes first: nothing of a sensor
    /// that did not prove itself reaches the writer.
    pub fn admit(&mut self, hello: &Hello, token: Result<(), &str>) -> Result<(), Refusal> {
        if token.is_err() {
            return Err(Refusal::new(ErrorCode::UNAUTHENTICATED, TOKEN_REFUSAL));
        }
        // A sensor with no standing capture (`--on-demand`) names none.
        if hello.interfaces.is_empty() && !hello.on_demand {
            return Err(Refusal::new(
                ErrorCode::PROTOCOL,
                "Hello names no interface",
            ));
        }
        self.phase = Phase::Joining;
        self.session = hello.session_id;
        self.interfaces = hello.interfaces.len();
        Ok(())
    }

    /// The writer took the sensor in; `received`: the highest batch of the session it has
    /// taken in, after which the next new batch follows (any first one when `None`).
    pub fn on_join(&mut self, received: Option<u64>) {
        self.phase = Phase::Joined;
        self.expected = received.map(|r| r + 1);
    }

    /// A message of a joined sensor.
    pub fn on_message(&mut self, message: Message) -> Result<Accepted, Refusal> {
        if self.phase != Phase::Joined {
            return Err(Refusal::new(
                ErrorCode::PROTOCOL,
                format!(
                    "unexpected {:?} message before the session was joined",
                    message.message_type()
                ),
            ));
        }
        match message {
            Message::Batch(batch) => {
                let accepted = check_batch(&batch, self.session, self.interfaces, self.expected)?;
                if let Accepted::Duplicate = accepted {
                    self.duplicates += 1;
                } else {
                    self.expected = batch.sequence.checked_add(1);
                }
                Ok(accepted)
            }
            Message::Stats(stats) if stats.session_id != self.session => Err(Refusal::new(
                ErrorCode::PROTOCOL,
                "statistics of another session",
            )),
            Message::Stats(stats) => Ok(Accepted::Stats(stats)),
            Message::Goodbye(_) => Ok(Accepted::Goodbye),
            other => Err(Refusal::new(
                ErrorCode::PROTOCOL,
                format!(
                    "unexpected {:?} message from a sensor",
                    other.message_type()
                ),
            )),
        }
    }
}

/// The rules for a batch of `session`, whose Hello named `interfaces` interfaces, when
/// `expected` is the next new sequence.
fn check_batch(
    batch: &Batch,
    session: u64,
    interfaces: usize,
    expected: Option<u64>,
) -> Result<Accepted, Refusal> {
    if batch.session_id != session {
        return Err(Refusal::new(
            ErrorCode::PROTOCOL,
            "batch of another session",
        ));
    }
    match expected {
        Some(e) if batch.sequence < e => return Ok(Accepted::Duplicate),
        Some(e) if batch.sequence > e => {
            return Err(Refusal::new(
                ErrorCode::PROTOCOL,
                format!(
                    "batch sequence {} where {e} was expected (sequences grow by one)",
                    batch.sequence
                ),
            ))
        }
        _ => {}
    }
    if batch.sequence == 0 {
        return Err(Refusal::new(
            ErrorCode::PROTOCOL,
            "batch sequence 0 (sequences start at 1)",
        ));
    }
    if usize::from(batch.interface_id) >= interfaces {
        return Err(Refusal::new(
            ErrorCode::PROTOCOL,
            format!("batch for interface {} of {interfaces}", batch.interface_id),
        ));
    }
    let packets = batch.packets().map_err(Refusal::protocol)?;
    Ok(Accepted::Batch {
        sequence: batch.sequence,
        interface_id: batch.interface_id,
        packets,
        wire_len: batch.body.len(),
    })
}

#[cfg(test)]
mod tests;
