//! A real Kafka-protocol broker for the Kafka output's tests: tansu (built from crates.io by
//! `cargo xtask setup`, kept in memory), and kafka-python from PyPI as the independent
//! consumer that reads every message back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{run, Netns, Proc};

/// The tansu release `cargo xtask setup` builds, and the features it builds it with (the
/// memory storage engine is in `dynostore`).
pub const TANSU_VERSION: &str = "0.6.0";
pub const TANSU_FEATURES: &str = "dynostore";
/// The kafka-python release `cargo xtask setup` installs, and zstandard, with which it
/// reads zstd-compressed messages.
pub const KAFKA_PYTHON_REQUIREMENTS: &[&str] = &["kafka-python==3.0.12", "zstandard==0.25.0"];

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/capstream")
}

/// Where `cargo install --root` puts tansu (its binary in `bin/`).
pub fn tansu_root() -> PathBuf {
    cache_dir().join("tansu")
}

pub fn tansu_bin() -> PathBuf {
    tansu_root().join("bin/tansu")
}

/// The virtualenv holding kafka-python (Debian's pip refuses system-wide installs).
pub fn kafka_venv() -> PathBuf {
    cache_dir().join("kafka")
}

/// True when the virtualenv has kafka-python and zstandard.
pub fn kafka_python_installed() -> bool {
    let python = kafka_venv().join("bin/python");
    python.exists()
        && run(
            &python.to_string_lossy(),
            &["-c", "import kafka, zstandard"],
        )
        .is_ok()
}

/// `program` inside `ns` when given.
fn in_ns(ns: Option<&str>, program: &Path) -> Vec<String> {
    crate::netns::command_in(ns, &program.to_string_lossy())
}

/// A tansu broker on 127.0.0.1:`port` (inside `ns` when given), its data in memory; killed
/// on drop.
pub struct Tansu {
    proc: Proc,
    ns: Option<String>,
    pub port: u16,
    /// Where it tells clients to reach it, when that is not `port` (a TLS proxy in front).
    advertised: u16,
}

/// TLS for a client: the CA that verifies the broker, and the client's certificate and key.
pub struct ClientTls<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

impl Tansu {
    /// Starts the broker and waits until it is ready; fails saying how to install it.
    pub fn start(ns: Option<&Netns>, port: u16) -> Result<Self> {
        Self::advertising(ns, port, port)
    }

    /// [`Tansu::start`], telling clients to reach it on `advertised` (where a TLS proxy
    /// in front of it listens).
    pub fn advertising(ns: Option<&Netns>, port: u16, advertised: u16) -> Result<Self> {
        if !tansu_bin().exists() {
            bail!(
                "tansu is missing from {}: `cargo xtask setup` builds it",
                tansu_bin().display()
            );
        }
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://127.0.0.1:{advertised}");
        // It says it is ready on stdout: sent to stderr, which the harness reads.
        let mut argv = in_ns(ns.map(|n| n.name.as_str()), Path::new("sh"));
        let tansu = tansu_bin().to_string_lossy().into_owned();
        argv.extend(
            [
                "-c",
                "exec \"$0\" \"$@\" >&2",
                &tansu,
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised_url,
                "--storage-engine",
                "memory://tansu/",
            ]
            .map(String::from),
        );
        let mut proc = Proc::start("tansu", &argv, Stdio::null())?;
        proc.wait_for("ready in", Duration::from_secs(30))?;
        Ok(Self {
            proc,
            ns: ns.map(|n| n.name.clone()),
            port,
            advertised,
        })
    }

    /// `127.0.0.1:PORT`, as `receiver --kafka` takes it: where clients reach it.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    fn ns_argv(&self, program: &Path) -> Vec<String> {
        in_ns(self.ns.as_deref(), program)
    }

    /// Creates `topic` with `partitions` partitions, with tansu's own client.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let mut argv = self.ns_argv(&tansu_bin());
        argv.extend([
            "topic".into(),
            "create".into(),
            "--broker".into(),
            format!("tcp://127.0.0.1:{}", self.port),
            "--partitions".into(),
            partitions.to_string(),
            topic.into(),
        ]);
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        run(&argv[0], &args).map(drop)
    }

    /// SIGSTOP: the broker keeps its connections and answers nothing until [`Self::thaw`].
    pub fn freeze(&self) -> Result<()> {
        self.proc.signal("STOP")
    }

    /// SIGCONT.
    pub fn thaw(&self) -> Result<()> {
        self.proc.signal("CONT")
    }

    /// SIGTERM and wait; its exit status after a signal does not matter.
    pub fn stop(&mut self) -> Result<()> {
        let _ = self.proc.signal("CONT");
        self.proc.signal("TERM")?;
        self.proc.wait(Duration::from_secs(20))?;
        Ok(())
    }

    /// Reads every message of `topic` from the earliest offset with kafka-python (over TLS
    /// when `tls` is given), each value into a file in `dir`, in partition and offset order.
    pub fn consume_all_over(
        &self,
        topic: &str,
        dir: &Path,
        tls: Option<&ClientTls>,
    ) -> Result<Vec<Consumed>> {
        if !kafka_python_installed() {
            bail!(
                "kafka-python is missing from {}: `cargo xtask setup` installs it",
                kafka_venv().display()
            );
        }
        let mut argv = self.ns_argv(&kafka_venv().join("bin/python"));
        argv.extend([
            "-c".into(),
            CONSUMER.into(),
            self.bootstrap(),
            topic.into(),
            dir.to_string_lossy().into_owned(),
        ]);
        if let Some(tls) = tls {
            argv.extend([tls.ca, tls.cert, tls.key].map(|p| p.to_string_lossy().into_owned()));
        }
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let out = run(&argv[0], &args).context("the kafka-python consumer failed")?;
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(Consumed::parse)
            .collect()
    }
}

/// One message as the consumer read it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: u32,
    pub offset: u64,
    pub key: String,
    /// The partition kafka-python's own (Java-compatible) partitioner gives the key.
    pub keyed_partition: u32,
    pub headers: BTreeMap<String, String>,
    /// Its value, written as it came.
    pub file: PathBuf,
}

impl Consumed {
    fn parse(line: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("the consumer printed {line:?}"))?;
        let number = |name: &str| {
            v[name]
                .as_u64()
                .with_context(|| format!("no {name} in {line}"))
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(Self {
            partition: u32::try_from(number("partition")?)?,
            offset: number("offset")?,
            key: text(&v["key"]),
            keyed_partition: u32::try_from(number("keyed_partition")?)?,
            headers: v["headers"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), text(v)))
                .collect(),
            file: PathBuf::from(text(&v["file"])),
        })
    }

    /// A header as a number.
    pub fn number(&self, name: &str) -> Result<u64> {
        self.headers
            .get(name)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no numeric header {name} in {self:?}"))
    }
}

/// kafka-python: every partition of the topic from its earliest offset to the end it has
/// when the consumer starts; one JSON line per message, its value in a file.
const CONSUMER: &str = r#"
import json, os, sys, time
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

bootstrap, topic, out = sys.argv[1], sys.argv[2], sys.argv[3]
tls = {}
if len(sys.argv) > 4:
    tls = dict(security_protocol="SSL", ssl_cafile=sys.argv[4], ssl_certfile=sys.argv[5],
               ssl_keyfile=sys.argv[6])
consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         auto_offset_reset="earliest", request_timeout_ms=30000, **tls)
partitions = sorted(consumer.partitions_for_topic(topic) or [])
if not partitions:
    sys.exit("no partitions for topic " + topic)
assigned = [TopicPartition(topic, p) for p in partitions]
consumer.assign(assigned)
consumer.seek_to_beginning()
end = consumer.end_offsets(assigned)
records = {p: [] for p in partitions}
deadline = time.time() + 120
while any(consumer.position(tp) < end[tp] for tp in assigned):
    if time.time() > deadline:
        sys.exit("timed out reading the topic to its end")
    for tp, batch in consumer.poll(timeout_ms=1000).items():
        records[tp.partition].extend(batch)
for p in partitions:
    for r in records[p]:
        if r.offset >= end[TopicPartition(topic, p)]:
            continue
        path = os.path.join(out, "p%d-o%d.pcapng" % (p, r.offset))
        with open(path, "wb") as f:
            f.write(r.value)
        print(json.dumps({
            "partition": p,
            "offset": r.offset,
            "key": r.key.decode(),
            "keyed_partition": (murmur2(r.key) & 0x7fffffff) % len(partitions),
            "headers": {k: v.decode() for k, v in r.headers},
            "file": path,
        }))
"#;
