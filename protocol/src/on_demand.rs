//! The messages of on-demand captures and of the viewer role.
//!
//! A viewer (Wireshark's extcap program, say) connects to the receiver's viewer endpoint,
//! opens one stream and sends [`ViewerHello`]; the receiver answers with a [`SensorList`].
//! The viewer may then send one [`CaptureRequest`]: the receiver asks each chosen sensor
//! for it on a stream of its own that the receiver opens on the sensor's connection. A
//! sensor answers [`CaptureStarted`] (or an error saying why not), then [`Batch`]es of
//! the capture, and [`CaptureEnded`] when a limit is reached or the receiver stops it. The
//! viewer gets [`CaptureStarted`] naming every interface, then the packets of all of them
//! merged in time order as a pcapng stream, to the end of the stream.
//!
//! [`Batch`]: crate::Batch

use bytes::{Bytes, BytesMut};

use crate::codec::{
    get_bytes, get_count, get_str, get_u16, get_u32, get_u64, put_str, DecodeError,
};
use crate::message::{InterfaceInfo, InterfaceStats};
use crate::{AuthToken, MAX_SNAPLEN, MAX_TOKEN_LEN, PROTOCOL_VERSION};

const MAX_NAME: usize = 256;
const MAX_FILTER: usize = 16 * 1024;
const MAX_TEXT: usize = 1024;
/// Sensors in a [`SensorList`].
pub const MAX_LISTED_SENSORS: usize = 1024;
/// Interfaces a sensor lists for on-demand captures.
pub const MAX_LISTED_INTERFACES: usize = 64;
/// Sensors one [`CaptureRequest`] may name.
pub const MAX_TARGETS: usize = 64;

/// A viewer's first message: who it is and the viewer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerHello {
    /// [`crate::PROTOCOL_VERSION`] of the viewer.
    pub version: u16,
    /// Who asks, as the viewer says (its user and host), for the logs on both sides.
    pub user: String,
    /// The receiver's viewer token (never a sensor token).
    pub token: Option<AuthToken>,
}

/// The sensors connected to the receiver and the interfaces each offers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SensorList {
    /// One entry per connected sensor.
    pub sensors: Vec<ListedSensor>,
}

/// One connected sensor in a [`SensorList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSensor {
    /// Its name at the receiver (certificate name, else its sensor id).
    pub name: String,
    /// Whether it accepts on-demand captures (`sensor --allow-on-demand`).
    pub on_demand: bool,
    /// Its host's interfaces.
    pub interfaces: Vec<String>,
}

/// One interface of one sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureTarget {
    /// The sensor's name, as listed.
    pub sensor: String,
    /// The interface on its host.
    pub interface: String,
}

/// When an on-demand capture stops by itself; 0: no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureLimits {
    /// Milliseconds after it started.
    pub duration_ms: u64,
    /// Packets captured.
    pub packets: u64,
    /// Bytes of packets captured.
    pub bytes: u64,
}

/// Asks for an on-demand capture: viewer to receiver (any number of targets), and receiver
/// to sensor (one target, `requested_by` set by the receiver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    /// What to capture on.
    pub targets: Vec<CaptureTarget>,
    /// A tcpdump filter expression (empty: everything).
    pub filter: String,
    /// Bytes kept of each packet, 1 to [`MAX_SNAPLEN`].
    pub snaplen: u32,
    /// When it stops.
    pub limits: CaptureLimits,
    /// Who asked, as the receiver authenticated the viewer (empty from a viewer).
    pub requested_by: String,
}

/// The capture runs; its packets follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureStarted {
    /// What is captured: from a sensor, its one interface (batch interface 0); to a
    /// viewer, every interface, as `SENSOR/IFACE`.
    pub interfaces: Vec<InterfaceInfo>,
}

/// A sensor's on-demand capture has stopped: nothing follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureEnded {
    /// Why it stopped, for a person ("packet limit", "stopped by the receiver").
    pub reason: String,
    /// Its counters (interface 0).
    pub stats: InterfaceStats,
}

impl ViewerHello {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        use bytes::BufMut;
        out.put_u16(self.version);
        put_str(out, &self.user, MAX_NAME);
        let token = self.token.as_ref().map_or(&[][..], AuthToken::as_bytes);
        out.put_u16(token.len() as u16);
        out.put_slice(token);
    }

    pub(crate) fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let version = get_u16(buf, "protocol version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(Self {
            version,
            user: get_str(buf, MAX_NAME, "viewer user")?,
            token: AuthToken::new(get_bytes(buf, MAX_TOKEN_LEN, "token")?),
        })
    }
}

impl SensorList {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        use bytes::BufMut;
        let n = self.sensors.len().min(MAX_LISTED_SENSORS);
        out.put_u16(n as u16);
        for sensor in &self.sensors[..n] {
            put_str(out, &sensor.name, MAX_NAME);
            out.put_u8(sensor.on_demand.into());
            put_names(out, &sensor.interfaces);
        }
    }

    pub(crate) fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let n = get_count(buf, MAX_LISTED_SENSORS, "sensor count")?;
        let mut sensors = Vec::with_capacity(n);
        for _ in 0..n {
            sensors.push(ListedSensor {
                name: get_str(buf, MAX_NAME, "sensor name")?,
                on_demand: get_flag(buf, "on-demand flag")?,
                interfaces: get_names(buf)?,
            });
        }
        Ok(Self { sensors })
    }
}

/// A list of interface names, at most [`MAX_LISTED_INTERFACES`] (more are left out).
pub(crate) fn put_names(out: &mut BytesMut, names: &[String]) {
    use bytes::BufMut;
    let n = names.len().min(MAX_LISTED_INTERFACES);
    out.put_u16(n as u16);
    for name in &names[..n] {
        put_str(out, name, MAX_NAME);
    }
}

pub(crate) fn get_names(buf: &mut Bytes) -> Result<Vec<String>, DecodeError> {
    let n = get_count(buf, MAX_LISTED_INTERFACES, "listed interface count")?;
    (0..n)
        .map(|_| get_str(buf, MAX_NAME, "listed interface"))
        .collect()
}

pub(crate) fn get_flag(buf: &mut Bytes, field: &'static str) -> Result<bool, DecodeError> {
    match crate::codec::get_u8(buf, field)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::BadValue {
            field,
            value: other.into(),
        }),
    }
}

impl CaptureRequest {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        use bytes::BufMut;
        let n = self.targets.len().min(MAX_TARGETS);
        out.put_u16(n as u16);
        for target in &self.targets[..n] {
            put_str(out, &target.sensor, MAX_NAME);
            put_str(out, &target.interface, MAX_NAME);
        }
        put_str(out, &self.filter, MAX_FILTER);
        out.put_u32(self.snaplen);
        out.put_u64(self.limits.duration_ms);
        out.put_u64(self.limits.packets);
        out.put_u64(self.limits.bytes);
        put_str(out, &self.requested_by, MAX_TEXT);
    }

    pub(crate) fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let n = get_count(buf, MAX_TARGETS, "target count")?;
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            targets.push(CaptureTarget {
                sensor: get_str(buf, MAX_NAME, "target sensor")?,
                interface: get_str(buf, MAX_NAME, "target interface")?,
            });
        }
        let filter = get_str(buf, MAX_FILTER, "filter")?;
        let snaplen = get_u32(buf, "snap length")?;
        if snaplen == 0 || snaplen > MAX_SNAPLEN {
            return Err(DecodeError::BadValue {
                field: "snap length",
                value: snaplen.into(),
            });
        }
        let limits = CaptureLimits {
            duration_ms: get_u64(buf, "duration limit")?,
            packets: get_u64(buf, "packet limit")?,
            bytes: get_u64(buf, "byte limit")?,
        };
        Ok(Self {
            targets,
            filter,
            snaplen,
            limits,
            requested_by: get_str(buf, MAX_TEXT, "requested by")?,
        })
    }
}

impl CaptureStarted {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        crate::message::put_interfaces(out, &self.interfaces);
    }

    pub(crate) fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            interfaces: crate::message::get_interfaces(buf)?,
        })
    }
}

impl CaptureEnded {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        put_str(out, &self.reason, MAX_TEXT);
        crate::message::put_interface_stats(out, &self.stats);
    }

    pub(crate) fn decode_body(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            reason: get_str(buf, MAX_TEXT, "end reason")?,
            stats: crate::message::get_interface_stats(buf)?,
        })
    }
}
