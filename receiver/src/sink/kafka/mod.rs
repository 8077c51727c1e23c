//! The Kafka output (`--kafka BROKER --kafka-topic TOPIC`): one message per sensor batch.
//!
//! Each message holds the packets of one batch of one sensor interface as a self-contained
//! pcapng fragment (a section header, the interface's description block, its packets), so
//! that any single message, written to a file, opens in Wireshark. The key is the sensor
//! and the interface (`SENSOR/HOST/IFACE`): an interface's messages stay in one partition,
//! in order (the partition is chosen as Kafka's own clients choose it, murmur2 of the key).
//! Headers say what the message holds: see [`headers`].
//!
//! Delivery: a flush returns once the broker has acknowledged (acks from all in-sync
//! replicas) every message handed over before it, so the writer acknowledges a sensor's
//! batch only once its message is in the topic. While the broker does not answer, the flush
//! fails after [`FLUSH_WAIT`]; the writer then holds everything and retries, and the
//! sensors buffer (back-pressure). The client (rskafka) has no idempotent producer: a
//! produce request whose answer is lost (the connection breaks) is sent again, and the
//! message may then be in the topic twice, as after a receiver restart; the headers
//! `session` and `sequence` recognise both (README, "Kafka output").

mod murmur2;
mod producer;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use protocol::InterfaceStats;
use tokio::sync::mpsc;

use super::{OutPacket, PcapNgSink, Refusal, Sink, SinkInterface};

pub use producer::{reach, start, Kafka, KafkaStartError, KafkaSummary, Reached};

/// How long a flush waits for the broker's acknowledgements before it reports a failure
/// (the writer then retries it every second, holding everything meanwhile).
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Compression of the messages by the client (`--kafka-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KafkaCompression {
    /// None: the least CPU.
    #[default]
    None,
    Snappy,
    Lz4,
    Zstd,
}

impl KafkaCompression {
    fn client(self) -> rskafka::client::partition::Compression {
        use rskafka::client::partition::Compression;
        match self {
            Self::None => Compression::NoCompression,
            Self::Snappy => Compression::Snappy,
            Self::Lz4 => Compression::Lz4,
            Self::Zstd => Compression::Zstd,
        }
    }
}

/// Where and how to produce.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `HOST:PORT` of each bootstrap broker.
    pub brokers: Vec<String>,
    pub topic: String,
    pub compression: KafkaCompression,
    /// TLS to the brokers, when given.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), when given.
    pub sasl: Option<rskafka::client::SaslConfig>,
}

/// The names of the headers every message carries; values are ASCII text (decimal
/// numbers, names), readable by any consumer.
pub mod headers {
    /// The sensor's name (its certificate's, else the id it gives).
    pub const SENSOR: &str = "sensor";
    /// The interface, `HOST/IFACE` as the pcapng interface block names it.
    pub const INTERFACE: &str = "interface";
    /// The sensor session's tag (8 hex digits): a sensor keeps it across reconnects and
    /// receiver restarts, and starts a new one when it starts anew.
    pub const SESSION: &str = "session";
    /// The batch's sequence number in the session: it rises by one from batch to batch of
    /// a sensor (the interfaces of one sensor share the numbering).
    pub const SEQUENCE: &str = "sequence";
    /// Packets in the message.
    pub const PACKETS: &str = "packets";
    /// The first and last packet's timestamps, nanoseconds since the Unix epoch.
    pub const FIRST_TIMESTAMP: &str = "first_timestamp_ns";
    pub const LAST_TIMESTAMP: &str = "last_timestamp_ns";
    /// The interface's LINKTYPE_ number (1: Ethernet).
    pub const LINK_TYPE: &str = "link_type";
}

/// What the sink and the producer task share: how many messages were handed over and how
/// many the broker acknowledged, which a flush waits on.
#[derive(Default)]
struct Progress {
    counts: Mutex<Counts>,
    acknowledged: Condvar,
}

#[derive(Default)]
struct Counts {
    handed: u64,
    acked: u64,
    /// The latest broker error, for the flush's failure.
    last_error: Option<String>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // A panicking holder leaves plain counters behind: still usable.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A message on its way to the producer task.
struct Message {
    /// The key's murmur2 hash, made positive: the partition is this modulo their number.
    hash: u32,
    record: rskafka::record::Record,
}

/// One sensor interface, as the topic describes it.
struct Interface {
    description: SinkInterface,
    key: Vec<u8>,
    hash: u32,
    /// The batch being gathered: its packets come before its end is known.
    batch: Option<OpenBatch>,
}

struct OpenBatch {
    pcapng: PcapNgSink<Vec<u8>>,
    packets: u64,
    first_ns: u64,
    last_ns: u64,
}

/// Gathers each batch into its message and hands it to the producer task.
pub struct KafkaSink {
    /// By output index; `None` once the interface's session closed.
    interfaces: Vec<Option<Interface>>,
    /// Unbounded, yet bounded by the writer: it flushes after every round, and a flush
    /// waits for everything handed over, so at most one round's batches are queued.
    messages: mpsc::UnboundedSender<Message>,
    progress: Arc<Progress>,
}

/// Messages are gathered at about this size before the first packet tells more.
const MESSAGE_CAPACITY: usize = 64 << 10;

impl KafkaSink {
    fn interface(&mut self, index: u32) -> io::Result<&mut Interface> {
        self.interfaces
            .get_mut(index as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| io::Error::other("packet of an unknown interface"))
    }

    /// Waits for the broker's acknowledgement of every message handed over, at most
    /// `wait`.
    fn wait_acknowledged(&self, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        let progress = &self.progress;
        // The writer is a task of the multi-threaded runtime: its worker lets the other
        // tasks move elsewhere while it waits.
        tokio::task::block_in_place(|| {
            let mut counts = progress.lock();
            while counts.acked < counts.handed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let waiting = counts.handed - counts.acked;
                    let why = counts
                        .last_error
                        .as_deref()
                        .map_or_else(|| "no answer".to_string(), |e| format!("last error: {e}"));
                    return Err(io::Error::other(format!(
                        "the Kafka broker has not acknowledged {waiting} message(s) for {}s \
                         ({why})",
                        wait.as_secs()
                    )));
                }
                counts = progress
                    .acknowledged
                    .wait_timeout(counts, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            Ok(())
        })
    }
}

impl Sink for KafkaSink {
    /// Any link type: each message describes its own interface.
    fn check(&self, _interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        Ok(())
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        let key = format!("{}/{}", interface.sensor, interface.name).into_bytes();
        let hash = murmur2::positive(&key);
        self.interfaces.push(Some(Interface {
            description: interface.clone(),
            key,
            hash,
            batch: None,
        }));
        u32::try_from(self.interfaces.len() - 1).map_err(io::Error::other)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        let interface = self.interface(packet.interface)?;
        let batch = match &mut interface.batch {
            Some(batch) => batch,
            None => {
                let mut pcapng = PcapNgSink::new(Vec::with_capacity(MESSAGE_CAPACITY))?;
                pcapng.add_interface(&interface.description)?;
                interface.batch.insert(OpenBatch {
                    pcapng,
                    packets: 0,
                    first_ns: packet.timestamp_ns,
                    last_ns: packet.timestamp_ns,
                })
            }
        };
        batch.pcapng.write_packet(&OutPacket {
            interface: 0,
            ..*packet
        })?;
        batch.packets += 1;
        batch.last_ns = packet.timestamp_ns;
        Ok(())
    }

    fn end_batch(&mut self, interface: u32, sequence: u64) -> io::Result<()> {
        let interface = self.interface(interface)?;
        // A batch none of whose packets came this way (an earlier run wrote them) has no
        // message.
        let Some(batch) = interface.batch.take() else {
            return Ok(());
        };
        let d = &interface.description;
        let headers = BTreeMap::from([
            (headers::SENSOR.to_string(), d.sensor.clone().into_bytes()),
            (headers::INTERFACE.to_string(), d.name.clone().into_bytes()),
            (headers::SESSION.to_string(), d.session.clone().into_bytes()),
            (
                headers::SEQUENCE.to_string(),
                sequence.to_string().into_bytes(),
            ),
            (
                headers::PACKETS.to_string(),
                batch.packets.to_string().into_bytes(),
            ),
            (
                headers::FIRST_TIMESTAMP.to_string(),
                batch.first_ns.to_string().into_bytes(),
            ),
            (
                headers::LAST_TIMESTAMP.to_string(),
                batch.last_ns.to_string().into_bytes(),
            ),
            (
                headers::LINK_TYPE.to_string(),
                d.link_type.to_string().into_bytes(),
            ),
        ]);
        let record = rskafka::record::Record {
            key: Some(interface.key.clone()),
            value: Some(batch.pcapng.into_output()),
            headers,
            // When it was produced, not captured: retention counts from here, so that a
            // replayed old capture is not deleted at once.
            timestamp: produced_at(),
        };
        let message = Message {
            hash: interface.hash,
            record,
        };
        self.progress.lock().handed += 1;
        self.messages.send(message).map_err(|_| {
            io::Error::other("the Kafka producer has stopped; nothing more can be sent")
        })
    }

    /// Nothing: the counters are in the sensors' summary lines and files.
    fn write_stats(&mut self, _interface: u32, _stats: &InterfaceStats) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.wait_acknowledged(FLUSH_WAIT)
    }

    /// Waits for the last acknowledgements, then lets the producer task end.
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.wait_acknowledged(FLUSH_WAIT)
    }

    fn close_interfaces(&mut self, interfaces: &[u32]) {
        for &index in interfaces {
            if let Some(slot) = self.interfaces.get_mut(index as usize) {
                *slot = None;
            }
        }
    }
}

/// The time now, as Kafka record timestamps take it (milliseconds).
fn produced_at() -> chrono::DateTime<chrono::Utc> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let millis = i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

#[cfg(test)]
mod tests;
