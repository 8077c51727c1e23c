//! The producer task: connects (retrying with backoff, logged), keeps one queue per
//! partition, and produces each partition's messages in order, one request (one message)
//! in flight per partition, so that an interface's batches reach its partition in
//! sequence. A failed request is sent again after a backoff; nothing is given up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use program::backoff::Backoff;
use rskafka::client::error::{Error as ClientError, ProtocolError};
use rskafka::client::partition::{PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::BackoffConfig;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::murmur2;
use super::{KafkaConfig, KafkaSink, Message, Progress};

/// How long the start waits for the brokers before going on without them (they are then
/// tried again in the background).
const START_WAIT: Duration = Duration::from_secs(5);
/// Backoff between connection attempts and between tries of a failed request.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF: Backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
/// Failures are logged at once, then at most this often while they go on.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// How long the client itself retries one operation before it reports a failure here.
const CLIENT_RETRY_DEADLINE: Duration = Duration::from_secs(10);

/// Why the Kafka output cannot start; the text is one line for the user.
#[derive(Debug)]
pub enum KafkaStartError {
    /// The brokers answered, without the topic.
    NoTopic { topic: String, brokers: String },
}

impl std::fmt::Display for KafkaStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoTopic { topic, brokers } => write!(
                f,
                "the Kafka broker(s) {brokers} have no topic '{topic}' (or refuse it to this \
                 client): create it first (e.g. kafka-topics.sh --create --topic {topic} \
                 --partitions 3), or check --kafka-topic"
            ),
        }
    }
}

impl std::error::Error for KafkaStartError {}

/// Counts over the whole run, for the exit summary and the metrics.
struct Totals {
    messages: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    messages_metric: metrics::Counter,
    bytes_metric: metrics::Counter,
    errors_metric: metrics::Counter,
    unacknowledged_metric: metrics::Gauge,
}

impl Totals {
    fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.errors_metric.increment(1);
    }

    fn register() -> Self {
        const MESSAGES: &str = "capstream_receiver_kafka_messages_total";
        const BYTES: &str = "capstream_receiver_kafka_bytes_total";
        const ERRORS: &str = "capstream_receiver_kafka_errors_total";
        const UNACKNOWLEDGED: &str = "capstream_receiver_kafka_unacknowledged_messages";
        metrics::describe_counter!(
            MESSAGES,
            "Messages (one per sensor batch) the Kafka broker acknowledged."
        );
        metrics::describe_counter!(
            BYTES,
            "Bytes of message values (pcapng) the Kafka broker acknowledged."
        );
        metrics::describe_counter!(
            ERRORS,
            "Failed connections to the Kafka brokers and failed produce requests (each tried \
             again)."
        );
        metrics::describe_gauge!(
            UNACKNOWLEDGED,
            "Messages handed to the Kafka producer and not yet acknowledged by the broker."
        );
        Self {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            messages_metric: metrics::counter!(MESSAGES),
            bytes_metric: metrics::counter!(BYTES),
            errors_metric: metrics::counter!(ERRORS),
            unacknowledged_metric: metrics::gauge!(UNACKNOWLEDGED),
        }
    }
}

/// The producer's side held by main: ends it at exit and sums it up.
pub struct Kafka {
    pub topic: String,
    pub brokers: String,
    task: JoinHandle<()>,
    totals: Arc<Totals>,
    progress: Arc<Progress>,
}

/// The Kafka output's part of the exit summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSummary {
    pub topic: String,
    pub brokers: String,
    /// Messages the broker acknowledged, and the bytes of their values.
    pub messages: u64,
    pub bytes: u64,
    /// Failed connections and produce requests (each tried again).
    pub errors: u64,
    /// Handed over and never acknowledged: the sensors keep these batches (not
    /// acknowledged to them either).
    pub unacknowledged: u64,
}

impl KafkaSummary {
    pub fn line(&self) -> String {
        let mut line = format!(
            "kafka topic {} on {}: {} messages, {} bytes acknowledged by the broker, {} broker \
             error(s)",
            self.topic, self.brokers, self.messages, self.bytes, self.errors
        );
        if self.unacknowledged > 0 {
            line += &format!(
                ", {} message(s) not acknowledged at exit (their sensors keep those batches)",
                self.unacknowledged
            );
        }
        line
    }

    /// The figures of [`KafkaSummary::line`] for `--summary-json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "topic": self.topic,
            "brokers": self.brokers,
            "messages": self.messages,
            "bytes": self.bytes,
            "errors": self.errors,
            "unacknowledged": self.unacknowledged,
        })
    }
}

impl Kafka {
    /// Stops the producer (the sink has waited for what it could) and sums it up.
    pub async fn close(self) -> KafkaSummary {
        self.task.abort();
        let _ = self.task.await;
        let counts = self.progress.lock();
        let total = |n: &AtomicU64| n.load(Ordering::Relaxed);
        KafkaSummary {
            topic: self.topic,
            brokers: self.brokers,
            messages: total(&self.totals.messages),
            bytes: total(&self.totals.bytes),
            errors: total(&self.totals.errors),
            unacknowledged: counts.handed - counts.acked,
        }
    }
}

/// The brokers as the start found them, before the output runs.
pub struct Reached {
    config: KafkaConfig,
    /// The client and the topic's partition count, if the brokers answered.
    client: Option<(Arc<Client>, u32)>,
}

/// Tries the brokers for a few seconds and checks the topic, before anything else starts.
/// A broker that answers without the topic fails the start; one that does not answer (or
/// refuses the connection, TLS or the login) is logged, and tried again in the background
/// once the output runs, meanwhile the sink's flushes fail, so sensors' batches are held.
pub async fn reach(config: KafkaConfig) -> Result<Reached, KafkaStartError> {
    let brokers = config.brokers.join(",");
    let client = match tokio::time::timeout(START_WAIT, open_client(&config)).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(Failure::NoTopic)) => {
            return Err(KafkaStartError::NoTopic {
                topic: config.topic,
                brokers,
            })
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "cannot reach the Kafka broker(s) {brokers}: {e}; trying again in the \
                 background with backoff, and holding sensors' batches until the broker \
                 acknowledges them"
            );
            None
        }
        Err(_) => {
            tracing::warn!(
                "the Kafka broker(s) {brokers} did not answer within {}s; trying again in \
                 the background with backoff, and holding sensors' batches until the \
                 broker acknowledges them",
                START_WAIT.as_secs()
            );
            None
        }
    };
    Ok(Reached { config, client })
}

/// Starts the producer (after the metrics endpoint, which its counters register with).
pub fn start(reached: Reached) -> (KafkaSink, Kafka) {
    let Reached { config, client } = reached;
    let totals = Arc::new(Totals::register());
    if client.is_none() {
        // The start's failed attempt.
        totals.count_error();
    }
    let (messages, incoming) = mpsc::unbounded_channel();
    let progress = Arc::new(Progress::default());
    let topic = config.topic.clone();
    let brokers = config.brokers.join(",");
    let producer = Producer {
        config,
        client,
        incoming,
        progress: Arc::clone(&progress),
        totals: Arc::clone(&totals),
        unassigned: VecDeque::new(),
        partitions: Vec::new(),
        produces: JoinSet::new(),
        connect_backoff: BACKOFF,
        reports: Reports::default(),
    };
    let task = tokio::spawn(producer.run());
    (
        KafkaSink {
            interfaces: Vec::new(),
            messages,
            progress: Arc::clone(&progress),
        },
        Kafka {
            topic,
            brokers,
            task,
            totals,
            progress,
        },
    )
}

/// What a connection attempt meets.
#[derive(Debug)]
enum Failure {
    Client(ClientError),
    NoTopic,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::NoTopic => f.write_str("the broker has no such topic"),
        }
    }
}

/// A client, and the number of partitions of the topic.
async fn open_client(config: &KafkaConfig) -> Result<(Arc<Client>, u32), Failure> {
    let mut builder = ClientBuilder::new(config.brokers.clone())
        .client_id(concat!("capstream-receiver/", env!("CARGO_PKG_VERSION")))
        .backoff_config(BackoffConfig {
            init_backoff: BACKOFF_FIRST,
            max_backoff: BACKOFF_MAX,
            base: 2.0,
            deadline: Some(CLIENT_RETRY_DEADLINE),
        });
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(Arc::clone(tls));
    }
    if let Some(sasl) = &config.sasl {
        builder = builder.sasl_config(sasl.clone());
    }
    let client = builder.build().await.map_err(Failure::Client)?;
    let topics = client.list_topics().await.map_err(Failure::Client)?;
    let partitions = topics
        .iter()
        .find(|t| t.name == config.topic)
        .map(|t| t.partitions.len())
        .filter(|&n| n > 0)
        .ok_or(Failure::NoTopic)?;
    Ok((
        Arc::new(client),
        u32::try_from(partitions).unwrap_or(u32::MAX),
    ))
}

/// Logs a run of failures once at its start, then every [`REPORT_EVERY`], and its end.
#[derive(Default)]
struct Reports {
    failing_since: Option<Instant>,
    reported: Option<Instant>,
    failures: u64,
}

impl Reports {
    fn failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(now);
        if self
            .reported
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY)
        {
            self.reported = Some(now);
            tracing::error!(
                "kafka: {what}: {error} ({} failure(s) in {:.0}s; trying again with backoff, \
                 holding sensors' batches meanwhile)",
                self.failures,
                now.saturating_duration_since(since).as_secs_f64()
            );
        }
    }

    fn succeeded(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::warn!(
                "kafka: the broker answers again after {:.0}s; resuming",
                since.elapsed().as_secs_f64()
            );
        }
        self.reported = None;
        self.failures = 0;
    }
}

/// One partition's queue.
struct PartitionQueue {
    waiting: VecDeque<Message>,
    in_flight: bool,
    client: Option<Arc<PartitionClient>>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl Default for PartitionQueue {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            in_flight: false,
            client: None,
            retry_at: None,
            backoff: BACKOFF,
        }
    }
}

/// The outcome of one produce request.
struct Produced {
    partition: u32,
    client: Option<Arc<PartitionClient>>,
    messages: Vec<Message>,
    result: Result<(), ClientError>,
}

struct Producer {
    config: KafkaConfig,
    client: Option<(Arc<Client>, u32)>,
    incoming: mpsc::UnboundedReceiver<Message>,
    progress: Arc<Progress>,
    totals: Arc<Totals>,
    /// Messages taken in before the partitions are known.
    unassigned: VecDeque<Message>,
    partitions: Vec<PartitionQueue>,
    produces: JoinSet<Produced>,
    connect_backoff: Backoff,
    reports: Reports,
}

impl Producer {
    /// Runs until the sink is gone and everything it handed over is acknowledged.
    async fn run(mut self) {
        let mut next_connect = Instant::now();
        let mut closed = false;
        loop {
            if self.client.is_none() && Instant::now() >= next_connect {
                match open_client(&self.config).await {
                    Ok(connected) => {
                        self.reports.succeeded();
                        self.connect_backoff.reset();
                        tracing::info!(
                            "kafka: connected to {} (topic {}, {} partition(s))",
                            self.config.brokers.join(","),
                            self.config.topic,
                            connected.1
                        );
                        self.client = Some(connected);
                    }
                    Err(e) => {
                        self.totals.count_error();
                        self.progress.lock().last_error = Some(e.to_string());
                        self.reports.failed("cannot connect", &e);
                        next_connect = Instant::now() + self.connect_backoff.delay();
                    }
                }
            }
            self.assign();
            self.send_ready();
            if closed && self.is_idle() {
                return;
            }
            let wake = self.next_wake(next_connect);
            tokio::select! {
                message = self.incoming.recv(), if !closed => match message {
                    Some(message) => self.unassigned.push_back(message),
                    None => closed = true,
                },
                Some(done) = self.produces.join_next() => match done {
                    Ok(produced) => self.produced(produced),
                    // A produce task panicked: its messages are lost to this run and
                    // never acknowledged (the flush reports them, the sensors keep them).
                    Err(e) => tracing::error!("kafka: a produce task failed: {e}"),
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.unassigned.is_empty()
            && self.produces.is_empty()
            && self.partitions.iter().all(|p| p.waiting.is_empty())
    }

    /// The next time something is due (a connection attempt, a retry).
    fn next_wake(&self, next_connect: Instant) -> Instant {
        let later = Instant::now() + BACKOFF_MAX;
        let connect = if self.client.is_none() {
            next_connect
        } else {
            later
        };
        self.partitions
            .iter()
            .filter(|p| !p.in_flight && !p.waiting.is_empty())
            .filter_map(|p| p.retry_at)
            .fold(connect.min(later), Instant::min)
    }

    /// Puts waiting messages in their partitions' queues, once the partitions are known.
    fn assign(&mut self) {
        let Some((_, count)) = &self.client else {
            return;
        };
        let count = *count;
        if self.partitions.len() < count as usize {
            self.partitions
                .resize_with(count as usize, PartitionQueue::default);
        }
        while let Some(message) = self.unassigned.pop_front() {
            let partition = murmur2::partition(message.hash, count);
            self.partitions[partition as usize]
                .waiting
                .push_back(message);
        }
    }

    /// Starts a request on every partition that has messages, none in flight, and no retry
    /// pending.
    fn send_ready(&mut self) {
        let Some((client, _)) = &self.client else {
            return;
        };
        let now = Instant::now();
        for (index, queue) in self.partitions.iter_mut().enumerate() {
            if queue.in_flight
                || queue.waiting.is_empty()
                || queue.retry_at.is_some_and(|t| t > now)
            {
                continue;
            }
            // One message per request: a record batch of several records is what tansu
            // 0.6.0 misreports (its high watermark then stays one short, so consumers do
            // not see the last message), and one message stays below any broker's
            // record-batch limit that a sensor batch fits.
            let messages: Vec<Message> = queue.waiting.pop_front().into_iter().collect();
            queue.in_flight = true;
            let partition = u32::try_from(index).unwrap_or(u32::MAX);
            let client = Arc::clone(client);
            let partition_client = queue.client.clone();
            let topic = self.config.topic.clone();
            let compression = self.config.compression.client();
            self.produces.spawn(async move {
                let records = messages.iter().map(|m| m.record.clone()).collect();
                let result = async {
                    let partition_client = match partition_client {
                        Some(c) => c,
                        None => Arc::new(
                            client
                                .partition_client(
                                    topic,
                                    i32::try_from(partition).unwrap_or(i32::MAX),
                                    UnknownTopicHandling::Error,
                                )
                                .await?,
                        ),
                    };
                    partition_client.produce(records, compression).await?;
                    Ok::<_, ClientError>(partition_client)
                }
                .await;
                match result {
                    Ok(client) => Produced {
                        partition,
                        client: Some(client),
                        messages,
                        result: Ok(()),
                    },
                    Err(e) => Produced {
                        partition,
                        client: None,
                        messages,
                        result: Err(e),
                    },
                }
            });
        }
    }

    fn produced(&mut self, produced: Produced) {
        let Some(queue) = self.partitions.get_mut(produced.partition as usize) else {
            return;
        };
        queue.in_flight = false;
        match produced.result {
            Ok(()) => {
                queue.client = produced.client;
                queue.retry_at = None;
                queue.backoff.reset();
                self.reports.succeeded();
                let n = produced.messages.len() as u64;
                let bytes: u64 = produced
                    .messages
                    .iter()
                    .map(|m| m.record.value.as_ref().map_or(0, Vec::len) as u64)
                    .sum();
                let t = &self.totals;
                t.messages.fetch_add(n, Ordering::Relaxed);
                t.bytes.fetch_add(bytes, Ordering::Relaxed);
                t.messages_metric.increment(n);
                t.bytes_metric.increment(bytes);
                let mut counts = self.progress.lock();
                counts.acked += n;
                counts.last_error = None;
                t.unacknowledged_metric
                    .set((counts.handed - counts.acked) as f64);
                drop(counts);
                self.progress.acknowledged.notify_all();
            }
            Err(e) => {
                // The same messages go first again, in their order.
                for message in produced.messages.into_iter().rev() {
                    queue.waiting.push_front(message);
                }
                queue.retry_at = Some(Instant::now() + queue.backoff.delay());
                let hint = match &e {
                    ClientError::ServerError {
                        protocol_error: ProtocolError::MessageTooLarge,
                        ..
                    } => {
                        " (a batch is larger than the topic takes: raise its max.message.bytes, \
                         or lower the sensors' --batch-size)"
                    }
                    _ => "",
                };
                let text = format!("{e}{hint}");
                self.progress.lock().last_error = Some(text.clone());
                self.totals.count_error();
                self.reports.failed(
                    &format!("producing to partition {}", produced.partition),
                    &text,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages the broker never acknowledged are said at exit, and where they are.
    #[test]
    fn the_summary_says_what_was_not_acknowledged() {
        let mut summary = KafkaSummary {
            topic: "packets".into(),
            brokers: "k1:9092".into(),
            messages: 12,
            bytes: 3_000_000,
            errors: 2,
            unacknowledged: 0,
        };
        let line = summary.line();
        assert!(line.contains("12 messages") && line.contains("2 broker error(s)"));
        assert!(!line.contains("not acknowledged"), "{line}");
        summary.unacknowledged = 3;
        assert!(summary
            .line()
            .contains("3 message(s) not acknowledged at exit"));
        assert_eq!(summary.json()["unacknowledged"], 3);
    }
}
