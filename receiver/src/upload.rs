//! `--upload s3://bucket/prefix`: finished output files go to an S3-compatible store as
//! `prefix/<file name>`, streamed in parts so a 1 GiB segment never sits in memory. An
//! object is never replaced: where the key is taken (a restarted receiver continuing its
//! file, say), the file goes to `prefix/<name>-1.pcap` (the first free counter), checked
//! just before the upload (two receivers sharing a prefix could still race there).
//!
//! Files arrive in an unbounded list of paths ([`Submitter::submit`]) and go out one at a
//! time. A failed upload is logged once with the reason and retried with backoff until it
//! succeeds or [`Uploader::finish`] runs out of time (a file that cannot be read, a few
//! times, then given up on); every file that did not make it is named in the log and in the
//! exit summary, and stays on disk: `--keep` deletes only uploaded files.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::sink::files::naming::with_counter;

/// Tries of a file that cannot be read (EMFILE, a transient EIO) before it is given up on.
const LOCAL_TRIES: u32 = 3;
/// Counters tried for a free key.
const MAX_KEY_COUNTER: u32 = 10_000;
/// Size of one multipart part: 1 GiB is 128 parts, well under S3's 10,000.
const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once: with the part being filled, at most 3 parts' memory.
const PARTS_IN_FLIGHT: usize = 2;
/// How much of the file is read at a time.
const READ_BYTES: usize = 1 << 20;
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
    ledger: Arc<Ledger>,
}

impl Uploader {
    /// Configures the store from `url` and the standard AWS environment variables and
    /// checks that the bucket answers. Every error is one line about what to fix.
    /// `allow_http`: a plain-HTTP endpoint on another host is allowed.
    pub async fn start(url: &str, allow_http: bool) -> Result<Self> {
        let (store, prefix) = open_store(url, allow_http, "--upload").await?;
        let ledger = Arc::new(Ledger::new(url));
        let worker = tokio::spawn(run(store, prefix, Arc::clone(&ledger)));
        tracing::info!("uploading finished files to {url}");
        Ok(Self {
            submitter: Submitter { ledger },
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
        ledger.close();
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
    /// Adds a finished file to the uploads: never refused, however many wait.
    pub fn submit(&self, path: PathBuf) {
        self.ledger.pending(&path);
        lock(&self.ledger.queue).push_back(path);
        self.ledger.wake.notify_one();
    }

    /// Whether `path` was submitted and is not uploaded (waiting, or given up on): such a
    /// file is never deleted by `--keep`.
    pub fn is_pending(&self, path: &Path) -> bool {
        lock(&self.ledger.pending).iter().any(|(p, _)| p == path)
            || lock(&self.ledger.lost).iter().any(|(p, _)| p == path)
    }
}

/// The store and key prefix of `url` (`s3://bucket/prefix`), configured from the standard
/// AWS environment variables, with object_store's retries, once the bucket answered. Every
/// error is one line about what to fix, starting with `flag` (the option that gave `url`).
/// `allow_http`: a plain-HTTP endpoint on another host is allowed. The uploader and the
/// lake (`--lake`, `receiver query --lake`) share it.
pub async fn open_store(url: &str, allow_http: bool, flag: &str) -> Result<(AmazonS3, ObjectPath)> {
    let target = Target::parse(url, flag)?;
    let builder = builder_from_env(&target.bucket, allow_http, flag)?;
    check_reachable(&builder, &target, flag).await?;
    let store = builder
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
        })
        .build()
        .with_context(|| format!("{flag} {url}"))?;
    Ok((store, target.prefix))
}

/// Bucket and key prefix of `s3://bucket/prefix`.
#[derive(Debug, PartialEq)]
struct Target {
    bucket: String,
    prefix: ObjectPath,
}

impl Target {
    fn parse(url: &str, flag: &str) -> Result<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            anyhow!("{flag} {url}: use s3://BUCKET/PREFIX (e.g. s3://captures/site-a)")
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{flag} {url}: no bucket name (use s3://BUCKET/PREFIX)");
        }
        let prefix = ObjectPath::parse(prefix.trim_end_matches('/'))
            .map_err(|e| anyhow!("{flag} {url}: bad prefix: {e}"))?;
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

/// The builder from the AWS_* variables, refusing a start without credentials, where the
/// first upload would otherwise fail only after the capture, and plain HTTP to another host
/// unless `allow_http`.
fn builder_from_env(bucket: &str, allow_http: bool, flag: &str) -> Result<AmazonS3Builder> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let set = |key| builder.get_config_value(&key).is_some();
    let has_keys = set(AmazonS3ConfigKey::AccessKeyId) && set(AmazonS3ConfigKey::SecretAccessKey);
    let has_role = set(AmazonS3ConfigKey::WebIdentityTokenFile)
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri);
    if !has_keys && !has_role {
        bail!("{flag} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    }
    let endpoint = [AmazonS3ConfigKey::S3Endpoint, AmazonS3ConfigKey::Endpoint]
        .into_iter()
        .find_map(|key| builder.get_config_value(&key));
    if let Some(rest) = endpoint.as_deref().and_then(|e| e.strip_prefix("http://")) {
        // Plain HTTP that stays on this host (a local MinIO, moto) is as private as a
        // file; to another host it carries the captures in clear: only when asked for.
        if !allow_http && !is_loopback_host(rest) {
            bail!(
                "{flag}: AWS_ENDPOINT_URL http://{rest} would send the captures unencrypted \
                 to another host: use https://, or pass {flag}-allow-http"
            );
        }
        builder = builder.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
            "true",
        );
    }
    Ok(builder)
}

/// Whether the host of `host[:port][/path]` is `localhost` or a loopback address.
fn is_loopback_host(authority_and_path: &str) -> bool {
    let authority = authority_and_path
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or(v6, |(h, _)| h),
        None => authority.split_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Lists the prefix once, with few retries, so a wrong endpoint, bucket or key is said at
/// start rather than after the capture.
async fn check_reachable(builder: &AmazonS3Builder, target: &Target, flag: &str) -> Result<()> {
    let store = builder
        .clone()
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 1,
            retry_timeout: CHECK_TIMEOUT,
        })
        .build()
        .map_err(|e| anyhow!("{flag}: {e}"))?;
    let bucket = &target.bucket;
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        store.list_with_delimiter(Some(&target.prefix)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("{flag}: cannot reach bucket {bucket}: {}", one_line(&e)),
        Err(_) => bail!(
            "{flag}: bucket {bucket} did not answer within {}s",
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

/// The worker: uploads each submitted file until it is done or given up on, and ends once
/// the uploads are closed and none waits.
async fn run(store: AmazonS3, prefix: ObjectPath, ledger: Arc<Ledger>) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let next = lock(&ledger.queue).pop_front();
        let Some(path) = next else {
            if ledger.closed.load(Ordering::Acquire) {
                return;
            }
            ledger.wake.notified().await;
            continue;
        };
        if path.file_name().and_then(|n| n.to_str()).is_none() {
            let reason = "its file name is not UTF-8".to_string();
            tracing::error!("not uploading {}: {reason}", path.display());
            ledger.lost(&path, reason);
            continue;
        }
        upload_with_retries(&store, &prefix, &path, &mut buf, &ledger).await;
    }
}

/// `prefix/<file name>`, or the first `prefix/<name>-N.<ext>` not taken: an object is never
/// replaced.
async fn free_key(
    store: &AmazonS3,
    prefix: &ObjectPath,
    path: &Path,
) -> Result<ObjectPath, Failure> {
    for n in 0..=MAX_KEY_COUNTER {
        let named = if n == 0 {
            path.to_path_buf()
        } else {
            with_counter(path, n)
        };
        let name = named
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let key = prefix.clone().join(name);
        match store.head(&key).await {
            Err(object_store::Error::NotFound { .. }) => return Ok(key),
            Err(e) => return Err(Failure::Store(e)),
            Ok(_) => {}
        }
    }
    Err(Failure::Local(std::io::Error::other(format!(
        "{MAX_KEY_COUNTER} numbered keys for it are taken"
    ))))
}

async fn upload_with_retries(
    store: &AmazonS3,
    prefix: &ObjectPath,
    path: &Path,
    buf: &mut [u8],
    ledger: &Ledger,
) {
    // The uploader's own retry of a whole file, after object_store's retries of each request.
    let mut retry = receiver::sink::lake::STORE_RETRY;
    let mut failures = 0u32;
    let mut local_failures = 0u32;
    loop {
        let key = match free_key(store, prefix, path).await {
            Ok(key) => key,
            Err(e) => {
                // Named as the key it would have had.
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let key = prefix.clone().join(name);
                if !retry_or_give_up(e, &key, path, ledger, &mut failures, &mut local_failures) {
                    return;
                }
                tokio::time::sleep(retry.delay()).await;
                continue;
            }
        };
        match upload(store, &key, path, buf).await {
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
            Err(e) => {
                if !retry_or_give_up(e, &key, path, ledger, &mut failures, &mut local_failures) {
                    return;
                }
                tokio::time::sleep(retry.delay()).await;
            }
        }
    }
}

/// Logs and counts a failed attempt; says whether to try again: always for the store, a
/// few times for the file itself.
fn retry_or_give_up(
    failure: Failure,
    key: &ObjectPath,
    path: &Path,
    ledger: &Ledger,
    failures: &mut u32,
    local_failures: &mut u32,
) -> bool {
    let reason = match failure {
        Failure::Local(e) => {
            *local_failures += 1;
            let reason = format!("cannot read it: {e}");
            if *local_failures >= LOCAL_TRIES {
                tracing::error!(
                    "not uploading {} after {LOCAL_TRIES} tries: {reason}; it stays on disk",
                    path.display()
                );
                ledger.lost(path, reason);
                return false;
            }
            reason
        }
        Failure::Store(e) => one_line(&e),
    };
    if *failures == 0 {
        tracing::warn!(
            "upload of {} to {key} failed, retrying until --upload-timeout at exit: {reason}",
            path.display()
        );
    }
    *failures += 1;
    ledger.failed_attempt(path, reason);
    true
}

enum Failure {
    /// The file itself: retrying helps only with transient errors (EMFILE, EIO).
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
    /// Files waiting for the worker, in order.
    queue: Mutex<VecDeque<PathBuf>>,
    wake: Notify,
    /// No more files come: the worker ends once the queue is empty.
    closed: AtomicBool,
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
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
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
        let mut not_uploaded = lock(&self.lost).clone();
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

    /// The figures of [`UploadReport::line`] for `--summary-json`, with the files not
    /// uploaded by name.
    pub fn json(&self) -> serde_json::Value {
        let not_uploaded: Vec<String> = self
            .not_uploaded
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        serde_json::json!({
            "url": self.url,
            "files": self.files,
            "bytes": self.bytes,
            "failed_attempts": self.failed_attempts,
            "not_uploaded": not_uploaded,
        })
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
        let t = Target::parse("s3://captures/site-a/day1/", "--upload").unwrap();
        assert_eq!(t.bucket, "captures");
        assert_eq!(t.prefix.as_ref(), "site-a/day1");
        assert_eq!(
            t.prefix.clone().join("out.pcap").as_ref(),
            "site-a/day1/out.pcap"
        );
        let t = Target::parse("s3://captures", "--upload").unwrap();
        assert_eq!((t.bucket.as_str(), t.prefix.as_ref()), ("captures", ""));
        assert_eq!(t.prefix.clone().join("out.pcap").as_ref(), "out.pcap");
        for bad in [
            "ftp://x/y",
            "s3://",
            "s3:///prefix",
            "captures/x",
            "s3://b/a//c",
        ] {
            let e = Target::parse(bad, "--upload").unwrap_err().to_string();
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

    #[test]
    fn plain_http_is_allowed_on_loopback_only() {
        for local in [
            "127.0.0.1:9000",
            "127.8.0.1",
            "localhost:5000/",
            "LOCALHOST",
            "[::1]:9000/x",
            "user@127.0.0.1:9",
        ] {
            assert!(is_loopback_host(local), "{local}");
        }
        for remote in [
            "minio:9000",
            "198.18.0.1:9000",
            "[2001:db8::1]:9000",
            "localhost.example.com",
            "127.0.0.1.example.com:80",
        ] {
            assert!(!is_loopback_host(remote), "{remote}");
        }
    }

    /// A file given up on (unreadable, or left when the uploads stop) is never free for
    /// `--keep` to delete; an uploaded one is.
    #[test]
    fn only_uploaded_files_are_free_to_delete() {
        let submitter = Submitter {
            ledger: Arc::new(Ledger::new("s3://b/p")),
        };
        for n in 0..1000 {
            submitter.submit(PathBuf::from(format!("f{n}.pcap")));
        }
        let ledger = &submitter.ledger;
        assert_eq!(lock(&ledger.queue).len(), 1000, "never refused");
        ledger.uploaded(Path::new("f0.pcap"), 1);
        ledger.lost(Path::new("f1.pcap"), "cannot read it".into());
        assert!(!submitter.is_pending(Path::new("f0.pcap")));
        assert!(submitter.is_pending(Path::new("f1.pcap")));
        assert!(submitter.is_pending(Path::new("f999.pcap")));
    }
}
