//! `--upload s3://bucket/prefix`: finished output files go to an S3-compatible store as
//! `prefix/<file name>`, streamed in parts so a 1 GiB segment never sits in memory.
//!
//! Files arrive through a bounded queue ([`Uploader::submit`]) and go out one at a time. A
//! failed upload is logged once with the reason and retried with backoff until it succeeds
//! or [`Uploader::finish`] runs out of time; every file that did not make it is named in
//! the log and in the exit summary.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Files waiting to be uploaded; one more is refused, named and counted as not uploaded.
const QUEUE_FILES: usize = 64;
/// Size of one multipart part: 1 GiB is 128 parts, well under S3's 10,000.
const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once: with the part being filled, at most 3 parts' memory.
const PARTS_IN_FLIGHT: usize = 2;
/// How much of the file is read at a time.
const READ_BYTES: usize = 1 << 20;
/// The uploader's own retry of a whole file, after object_store's retries of each request.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// How long the start may take to reach the bucket.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Uploads finished files to one bucket and prefix, on the runtime it was started on.
pub struct Uploader {
    submitter: Submitter,
    worker: JoinHandle<()>,
}

/// Hands finished files to the uploader from anywhere (the writer task's `on_finished`),
/// without waiting.
#[derive(Clone)]
pub struct Submitter {
    queue: mpsc::Sender<PathBuf>,
    ledger: Arc<Ledger>,
}

impl Uploader {
    /// Configures the store from `url` and the standard AWS environment variables and
    /// checks that the bucket answers. Every error is one line about what to fix.
    pub async fn start(url: &str) -> Result<Self> {
        let target = Target::parse(url)?;
        let builder = builder_from_env(&target.bucket)?;
        check_reachable(&builder, &target).await?;
        let store = builder
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(60),
            })
            .build()
            .with_context(|| format!("--upload {url}"))?;
        let (queue, files) = mpsc::channel(QUEUE_FILES);
        let ledger = Arc::new(Ledger::new(url));
        let worker = tokio::spawn(run(store, target.prefix, files, Arc::clone(&ledger)));
        tracing::info!("uploading finished files to {url}");
        Ok(Self {
            submitter: Submitter { queue, ledger },
            worker,
        })
    }

    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Waits up to `timeout` for the queued files to be uploaded, or until `give_up` (a
    /// second signal), then gives up on the rest. Every [`Submitter`] must be gone (the
    /// sink that held one closed): the worker ends once the queue is closed and empty.
    pub async fn finish(
        self,
        timeout: Duration,
        give_up: impl std::future::Future<Output = ()>,
    ) -> UploadReport {
        let Self {
            submitter,
            mut worker,
        } = self;
        let ledger = Arc::clone(&submitter.ledger);
        drop(submitter);
        let waiting = lock(&ledger.pending).len();
        if waiting > 0 {
            tracing::info!(
                "waiting up to {}s for {waiting} upload(s); SIGINT or SIGTERM again to give up",
                timeout.as_secs()
            );
        }
        tokio::select! {
            _ = &mut worker => {}
            _ = tokio::time::sleep(timeout) => {
                worker.abort();
                tracing::error!(
                    "uploads unfinished after --upload-timeout {}s",
                    timeout.as_secs()
                );
            }
            _ = give_up => {
                worker.abort();
                tracing::error!("uploads given up on a second signal");
            }
        }
        ledger.report()
    }
}

impl Submitter {
    /// Queues a finished file; if the queue is full it is logged and counted as not
    /// uploaded, never dropped silently.
    pub fn submit(&self, path: PathBuf) {
        self.ledger.pending(&path);
        if let Err(e) = self.queue.try_send(path) {
            let (path, reason) = match e {
                mpsc::error::TrySendError::Full(p) => (
                    p,
                    format!("upload queue full ({QUEUE_FILES} files waiting)"),
                ),
                mpsc::error::TrySendError::Closed(p) => (p, "uploader stopped".to_string()),
            };
            tracing::error!("not uploading {}: {reason}", path.display());
            self.ledger.lost(&path, reason);
        }
    }

    /// Whether `path` was submitted and is neither uploaded nor given up on yet.
    pub fn is_pending(&self, path: &Path) -> bool {
        lock(&self.ledger.pending).iter().any(|(p, _)| p == path)
    }
}

/// Bucket and key prefix of `s3://bucket/prefix`.
#[derive(Debug, PartialEq)]
struct Target {
    bucket: String,
    prefix: ObjectPath,
}

impl Target {
    fn parse(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            anyhow!("--upload {url}: use s3://BUCKET/PREFIX (e.g. s3://captures/site-a)")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--upload {url}: no bucket name (use s3://BUCKET/PREFIX)");
        }
        let prefix = ObjectPath::parse(prefix.trim_end_matches('/'))
            .map_err(|e| anyhow!("--upload {url}: bad prefix: {e}"))?;
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

/// The builder from the AWS_* variables, refusing a start without credentials, where the
/// first upload would otherwise fail only after the capture.
fn builder_from_env(bucket: &str) -> Result<AmazonS3Builder> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let set = |key| builder.get_config_value(&key).is_some();
    let has_keys = set(AmazonS3ConfigKey::AccessKeyId) && set(AmazonS3ConfigKey::SecretAccessKey);
    let has_role = set(AmazonS3ConfigKey::WebIdentityTokenFile)
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri);
    if !has_keys && !has_role {
        bail!("--upload needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    }
    // Whoever names a plain-HTTP endpoint (a local MinIO, moto) means it.
    let endpoint = [AmazonS3ConfigKey::S3Endpoint, AmazonS3ConfigKey::Endpoint]
        .into_iter()
        .find_map(|key| builder.get_config_value(&key));
    if endpoint.is_some_and(|e| e.starts_with("http://")) {
        builder = builder.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
            "true",
        );
    }
    Ok(builder)
}

/// Lists the prefix once, with few retries, so a wrong endpoint, bucket or key is said at
/// start rather than after the capture.
async fn check_reachable(builder: &AmazonS3Builder, target: &Target) -> Result<()> {
    let store = builder
        .clone()
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 1,
            retry_timeout: CHECK_TIMEOUT,
        })
        .build()
        .map_err(|e| anyhow!("--upload: {e}"))?;
    let bucket = &target.bucket;
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        store.list_with_delimiter(Some(&target.prefix)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("--upload: cannot reach bucket {bucket}: {}", one_line(&e)),
        Err(_) => bail!(
            "--upload: bucket {bucket} did not answer within {}s",
            CHECK_TIMEOUT.as_secs()
        ),
    }
}

/// The error with its causes (where "connection refused" hides), on one line: object_store's
/// errors may carry the server's reply over several.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The worker: uploads each queued file until it is done or given up on.
async fn run(
    store: AmazonS3,
    prefix: ObjectPath,
    mut files: mpsc::Receiver<PathBuf>,
    ledger: Arc<Ledger>,
) {
    let mut buf = vec![0u8; READ_BYTES];
    while let Some(path) = files.recv().await {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            let reason = "its file name is not UTF-8".to_string();
            tracing::error!("not uploading {}: {reason}", path.display());
            ledger.lost(&path, reason);
            continue;
        };
        let key = prefix.clone().join(name);
        upload_with_retries(&store, &key, &path, &mut buf, &ledger).await;
    }
}

async fn upload_with_retries(
    store: &AmazonS3,
    key: &ObjectPath,
    path: &Path,
    buf: &mut [u8],
    ledger: &Ledger,
) {
    let mut delay = FIRST_RETRY;
    let mut failures = 0u32;
    loop {
        match upload(store, key, path, buf).await {
            Ok(bytes) => {
                tracing::info!(
                    "uploaded {} to {key} ({bytes} bytes{})",
                    path.display(),
                    match failures {
                        0 => String::new(),
                        n => format!(", after {n} failed attempt(s)"),
                    }
                );
                ledger.uploaded(path, bytes);
                return;
            }
            Err(Failure::Local(e)) => {
                let reason = format!("cannot read it: {e}");
                tracing::error!("not uploading {}: {reason}", path.display());
                ledger.lost(path, reason);
                return;
            }
            Err(Failure::Store(e)) => {
                let reason = one_line(&e);
                if failures == 0 {
                    tracing::warn!(
                        "upload of {} to {key} failed, retrying until --upload-timeout at \
                         exit: {reason}",
                        path.display()
                    );
                }
                failures += 1;
                ledger.failed_attempt(path, reason);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(LAST_RETRY);
            }
        }
    }
}

enum Failure {
    /// The file itself: retrying will not help.
    Local(std::io::Error),
    /// The store: it may come back.
    Store(object_store::Error),
}

/// Streams `path` to `key` in parts; returns the bytes sent.
async fn upload(
    store: &AmazonS3,
    key: &ObjectPath,
    path: &Path,
    buf: &mut [u8],
) -> Result<u64, Failure> {
    let mut file = tokio::fs::File::open(path).await.map_err(Failure::Local)?;
    let upload = store.put_multipart(key).await.map_err(Failure::Store)?;
    let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut sent = 0u64;
    loop {
        let n = match file.read(buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // Best effort: the store may keep the parts until its lifecycle rules clear them.
                let _ = parts.abort().await;
                return Err(Failure::Local(e));
            }
        };
        if let Err(e) = parts.wait_for_capacity(PARTS_IN_FLIGHT).await {
            let _ = parts.abort().await;
            return Err(Failure::Store(e));
        }
        parts.write(&buf[..n]);
        sent += n as u64;
    }
    parts.finish().await.map_err(Failure::Store)?;
    Ok(sent)
}

/// What became of each submitted file, shared by the submitter and the worker.
struct Ledger {
    url: String,
    files: AtomicU64,
    bytes: AtomicU64,
    failed_attempts: AtomicU64,
    /// Submitted and not yet uploaded or given up on, with the last failure's reason.
    pending: Mutex<Vec<(PathBuf, Option<String>)>>,
    /// Given up on, with the reason.
    lost: Mutex<Vec<(PathBuf, String)>>,
}

impl Ledger {
    fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            lost: Mutex::new(Vec::new()),
        }
    }

    fn pending(&self, path: &Path) {
        lock(&self.pending).push((path.to_path_buf(), None));
    }

    fn take_pending(&self, path: &Path) {
        lock(&self.pending).retain(|(p, _)| p != path);
    }

    fn uploaded(&self, path: &Path, bytes: u64) {
        self.take_pending(path);
        self.files.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn failed_attempt(&self, path: &Path, reason: String) {
        self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = lock(&self.pending).iter_mut().find(|(p, _)| p == path) {
            entry.1 = Some(reason);
        }
    }

    fn lost(&self, path: &Path, reason: String) {
        self.take_pending(path);
        lock(&self.lost).push((path.to_path_buf(), reason));
    }

    /// The final account: whatever is still pending was not uploaded.
    fn report(&self) -> UploadReport {
        let mut not_uploaded = std::mem::take(&mut *lock(&self.lost));
        not_uploaded.extend(lock(&self.pending).drain(..).map(|(path, reason)| {
            let reason = reason.unwrap_or_else(|| "not attempted before the timeout".into());
            (path, reason)
        }));
        for (path, reason) in &not_uploaded {
            tracing::error!("not uploaded: {} ({reason})", path.display());
        }
        UploadReport {
            url: self.url.clone(),
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            not_uploaded: not_uploaded.into_iter().map(|(path, _)| path).collect(),
        }
    }
}

/// A poisoned lock still holds a usable list: the account must survive a panicked task.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The uploads' part of the exit summary.
#[derive(Debug)]
pub struct UploadReport {
    url: String,
    files: u64,
    bytes: u64,
    failed_attempts: u64,
    not_uploaded: Vec<PathBuf>,
}

impl UploadReport {
    pub fn line(&self) -> String {
        format!(
            "upload to {}: {} file(s), {} bytes uploaded, {} failed attempt(s), {} not uploaded",
            self.url,
            self.files,
            self.bytes,
            self.failed_attempts,
            self.not_uploaded.len()
        )
    }

    /// An error naming every file that did not reach the store.
    pub fn result(&self) -> Result<()> {
        if self.not_uploaded.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self
            .not_uploaded
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        bail!(
            "{} file(s) not uploaded to {}: {}",
            names.len(),
            self.url,
            names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        let t = Target::parse("s3://captures/site-a/day1/").unwrap();
        assert_eq!(t.bucket, "captures");
        assert_eq!(t.prefix.as_ref(), "site-a/day1");
        assert_eq!(
            t.prefix.clone().join("out.pcap").as_ref(),
            "site-a/day1/out.pcap"
        );
        let t = Target::parse("s3://captures").unwrap();
        assert_eq!((t.bucket.as_str(), t.prefix.as_ref()), ("captures", ""));
        assert_eq!(t.prefix.clone().join("out.pcap").as_ref(), "out.pcap");
        for bad in [
            "ftp://x/y",
            "s3://",
            "s3:///prefix",
            "captures/x",
            "s3://b/a//c",
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn the_report_names_what_was_not_uploaded() {
        let ledger = Ledger::new("s3://b/p");
        for name in ["a.pcap", "b.pcap", "c.pcap"] {
            ledger.pending(Path::new(name));
        }
        ledger.uploaded(Path::new("a.pcap"), 100);
        ledger.failed_attempt(Path::new("b.pcap"), "connection refused".into());
        ledger.lost(Path::new("c.pcap"), "cannot read it".into());
        let report = ledger.report();
        assert_eq!(
            report.line(),
            "upload to s3://b/p: 1 file(s), 100 bytes uploaded, 1 failed attempt(s), \
             2 not uploaded"
        );
        let e = report.result().unwrap_err().to_string();
        assert_eq!(e, "2 file(s) not uploaded to s3://b/p: c.pcap, b.pcap");
    }
}
