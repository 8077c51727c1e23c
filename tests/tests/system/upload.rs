//! `receiver --upload s3://bucket/prefix` against a real S3-compatible server (moto), with
//! boto3 as the reference client and tcpdump reading what came back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testbed::capstream::{
    first_difference, start_sensor, tcpdump_records, Receiver, Record, Scratch,
};
use testbed::{corpus, Moto};

const BUCKET: &str = "captures";

/// A receiver on `port` with moto's AWS_* settings, writing `dir/<file>` with `args`.
fn start_receiver(moto: &Moto, dir: &Scratch, port: u16, file: &str, args: &[&str]) -> Receiver {
    let env = moto.aws_env();
    let mut wrapper = vec!["env"];
    wrapper.extend(env.iter().map(String::as_str));
    let out = dir.join(file).to_string_lossy().into_owned();
    let mut all = vec!["--out", out.as_str()];
    all.extend_from_slice(args);
    Receiver::start_through(None, &wrapper, &dir.join("state"), port, &all).unwrap()
}

/// Streams the whole corpus into `receiver` from `times` sensors in turn, each acknowledged
/// (so written) before the next starts: the output holds the corpus `times` over.
fn stream_corpus(receiver: &Receiver, times: usize) {
    for n in 1..=times {
        let id = format!("tap-{n}");
        let args = ["--read", &corpus::pcap_arg(), "--sensor-id", &id];
        let mut sensor = start_sensor(None, receiver, &args).unwrap();
        let status = sensor.wait(Duration::from_secs(60)).unwrap();
        assert!(status.success(), "sensor failed: {}", sensor.stderr());
    }
}

/// Downloads `key` and checks it is `local` byte for byte, holding the corpus `times` over.
fn assert_uploaded(moto: &Moto, key: &str, local: &Path, dir: &Scratch, times: usize) {
    let keys = moto.keys(BUCKET).unwrap();
    assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    let downloaded = dir.join("downloaded.pcap");
    moto.download(BUCKET, key, &downloaded).unwrap();
    let (got, want) = (
        std::fs::read(&downloaded).unwrap(),
        std::fs::read(local).unwrap(),
    );
    assert!(
        got == want,
        "the object ({} bytes) differs from {} ({} bytes)",
        got.len(),
        local.display(),
        want.len()
    );
    let once = tcpdump_records(Path::new(&corpus::pcap_arg()), "").unwrap();
    let expected: Vec<Record> = std::iter::repeat_n(once, times).flatten().collect();
    let records = tcpdump_records(&downloaded, "").unwrap();
    assert!(
        records == expected,
        "tcpdump reads the object: {}",
        first_difference(&expected, &records)
    );
}

#[test]
fn the_finished_capture_is_uploaded_byte_for_byte_in_parts() {
    let moto = Moto::start(5400).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let dir = Scratch::new("upload").unwrap();
    let mut receiver = start_receiver(
        &moto,
        &dir,
        5401,
        "all.pcap",
        &["--upload", "s3://captures/site-a/day1"],
    );
    // Over 8 MiB: the upload takes more than one part.
    stream_corpus(&receiver, 6);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let out = dir.join("all.pcap");
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(size > 8 << 20, "{size} bytes fit in one part");
    assert!(
        log.contains(&format!(
            "uploaded {} to site-a/day1/all.pcap",
            out.display()
        )),
        "{log}"
    );
    // The prose and the JSON summary say the same.
    assert!(
        log.contains(&format!(
            "upload to s3://captures/site-a/day1: 1 file(s), {size} bytes uploaded, \
             0 failed attempt(s), 0 not uploaded"
        )),
        "exit summary: {log}"
    );
    let upload = &receiver.proc.summary().unwrap()["upload"];
    assert_eq!(
        upload,
        &serde_json::json!({
            "url": "s3://captures/site-a/day1",
            "files": 1,
            "bytes": size,
            "failed_attempts": 0,
            "not_uploaded": [],
        }),
        "exit summary: {log}"
    );
    assert_uploaded(&moto, "site-a/day1/all.pcap", &out, &dir, 6);
    let etag = moto.etag(BUCKET, "site-a/day1/all.pcap").unwrap();
    assert!(
        etag.ends_with("-2\""),
        "not uploaded in 2 parts: ETag {etag}"
    );
}

/// Rotated files each go up as they complete, the last at exit; `--keep 1` deletes local
/// files only once uploaded, and the objects together hold every packet once, in order.
#[test]
fn every_rotated_file_is_uploaded_and_keep_deletes_only_uploaded_ones() {
    let moto = Moto::start(5409).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let dir = Scratch::new("upload-rotated").unwrap();
    let mut receiver = start_receiver(
        &moto,
        &dir,
        5410,
        "seg.pcap",
        &[
            "--rotate-size",
            "1MiB",
            "--keep",
            "1",
            "--upload",
            "s3://captures/rotated",
        ],
    );
    stream_corpus(&receiver, 3);
    receiver.stop().unwrap();
    let log = receiver.proc.stderr();
    let completed: Vec<PathBuf> = log
        .lines()
        .filter_map(|l| {
            l.split_once("completed ")
                .map(|(_, p)| PathBuf::from(p.trim()))
        })
        .collect();
    assert!(completed.len() >= 4, "3 x 1.8 MB in 1 MiB files: {log}");
    let mut keys = moto.keys(BUCKET).unwrap();
    keys.sort();
    let mut expected_keys: Vec<String> = completed
        .iter()
        .map(|p| format!("rotated/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    expected_keys.sort();
    assert_eq!(keys, expected_keys, "one object per completed file");
    let upload = &receiver.proc.summary().unwrap()["upload"];
    assert_eq!(
        (&upload["files"], &upload["not_uploaded"]),
        (&completed.len().into(), &serde_json::json!([])),
        "exit summary: {upload:#}\n{log}"
    );
    let left: Vec<&PathBuf> = completed.iter().filter(|p| p.exists()).collect();
    assert!(
        left.len() <= 2,
        "--keep 1 leaves the newest, and at most one still uploading: {left:?}"
    );
    // The objects, in completion order, hold the corpus three times over.
    let mut records = Vec::new();
    for (n, path) in completed.iter().enumerate() {
        let key = format!("rotated/{}", path.file_name().unwrap().to_string_lossy());
        let downloaded = dir.join(&format!("object-{n}.pcap"));
        moto.download(BUCKET, &key, &downloaded).unwrap();
        records.extend(tcpdump_records(&downloaded, "").unwrap());
    }
    let once = tcpdump_records(Path::new(&corpus::pcap_arg()), "").unwrap();
    let expected: Vec<Record> = std::iter::repeat_n(once, 3).flatten().collect();
    assert!(
        records == expected,
        "the uploaded segments: {}",
        first_difference(&expected, &records)
    );
}

/// A restarted receiver continues its file and uploads it again at exit: the first run's
/// object is never replaced, the second goes beside it under a numbered key.
#[test]
fn a_restart_never_overwrites_an_uploaded_object() {
    let moto = Moto::start(5411).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let dir = Scratch::new("upload-restart").unwrap();
    for _ in 0..2 {
        let mut receiver = start_receiver(
            &moto,
            &dir,
            5412,
            "all.pcap",
            &["--upload", "s3://captures/r"],
        );
        stream_corpus(&receiver, 1);
        receiver.stop().unwrap();
    }
    let mut keys = moto.keys(BUCKET).unwrap();
    keys.sort();
    assert_eq!(keys, ["r/all-1.pcap", "r/all.pcap"]);
    let first = dir.join("first-object.pcap");
    moto.download(BUCKET, "r/all.pcap", &first).unwrap();
    let once = tcpdump_records(Path::new(&corpus::pcap_arg()), "").unwrap();
    let records = tcpdump_records(&first, "").unwrap();
    assert!(
        records == once,
        "the first run's object is as it was uploaded: {}",
        first_difference(&once, &records)
    );
    // The file, continued by the second run, holds both.
    assert_uploaded(&moto, "r/all-1.pcap", &dir.join("all.pcap"), &dir, 2);
}

/// Runs the receiver to its start's end with `env` (AWS_* cleared first) and `args`;
/// expects exit 2 and one error line naming `expected`, and no output file left behind.
fn assert_refused(env: &[String], args: &[&str], expected: &str) {
    let dir = Scratch::new("upload-refused").unwrap();
    let out = dir.join("never.pcap");
    let mut command = Command::new(testbed::workspace_bin("receiver"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    for setting in env {
        let (key, value) = setting.split_once('=').unwrap();
        command.env(key, value);
    }
    command
        .args(["--listen", "127.0.0.1:5404", "--state-dir"])
        .arg(dir.join("state"))
        .args(args);
    if !args.contains(&"--out") {
        command.arg("--out").arg(&out);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    // Info lines (a certificate created) may come first; the error is one line.
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(
        errors.len() == 1
            && errors[0].starts_with("receiver: error: ")
            && errors[0].contains(expected),
        "{args:?}: want one line naming {expected:?}, got:\n{stderr}"
    );
    assert!(!out.exists(), "{args:?} left {} behind", out.display());
}

#[test]
fn bad_urls_missing_credentials_and_unreachable_stores_are_refused_at_start() {
    let moto = Moto::start(5403).unwrap();
    let env = moto.aws_env();
    assert_refused(&env, &["--upload", "ftp://x"], "use s3://BUCKET/PREFIX");
    assert_refused(&env, &["--upload", "s3://"], "no bucket name");
    assert_refused(&env, &["--upload", "s3://captures/a//b"], "bad prefix");
    assert_refused(
        &env[2..],
        &["--upload", "s3://captures/x"],
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    );
    // The bucket does not exist yet.
    assert_refused(&env, &["--upload", "s3://captures/x"], "NoSuchBucket");
    let mut nobody_there = env.clone();
    nobody_there[3] = "AWS_ENDPOINT_URL=http://127.0.0.1:5402".into();
    assert_refused(
        &nobody_there,
        &["--upload", "s3://captures/x"],
        "cannot reach bucket captures",
    );
    // Plain HTTP to another host only when asked for (nothing is sent: refused first).
    let mut remote_http = env.clone();
    remote_http[3] = "AWS_ENDPOINT_URL=http://198.18.0.1:9000".into();
    assert_refused(
        &remote_http,
        &["--upload", "s3://captures/x"],
        "--upload-allow-http",
    );
    moto.create_bucket(BUCKET).unwrap();
    assert_refused(
        &env,
        &["--upload", "s3://captures/x", "--out", "-"],
        "--upload needs --out FILE",
    );
    assert_refused(&env, &["--upload-timeout", "5s"], "--upload");
}

/// SIGTERM, then waits until the upload of `dir/file` to `p/file` has failed once;
/// returns the file's path.
fn stop_until_upload_fails(receiver: &mut Receiver, dir: &Scratch, file: &str) -> PathBuf {
    receiver.proc.signal("TERM").unwrap();
    let path = dir.join(file);
    let failed = format!("upload of {} to p/{file} failed", path.display());
    receiver
        .proc
        .wait_for(&failed, Duration::from_secs(60))
        .unwrap();
    path
}

#[test]
fn a_store_down_at_exit_fails_loudly_and_a_store_back_in_time_gets_the_file() {
    let mut moto = Moto::start(5405).unwrap();
    moto.create_bucket(BUCKET).unwrap();

    // Down for good: the file is named and the exit code says so, when --upload-timeout
    // runs out and when a second signal gives up sooner.
    let dir = Scratch::new("upload-down").unwrap();
    let upload = ["--upload", "s3://captures/p", "--upload-timeout"];
    let mut timed_out = start_receiver(
        &moto,
        &dir,
        5406,
        "lost.pcap",
        &[&upload[..], &["3s"]].concat(),
    );
    let mut given_up = start_receiver(
        &moto,
        &dir,
        5408,
        "dropped.pcap",
        &[&upload[..], &["10m"]].concat(),
    );
    stream_corpus(&timed_out, 1);
    stream_corpus(&given_up, 1);
    moto.stop().unwrap();
    timed_out.proc.signal("TERM").unwrap();
    stop_until_upload_fails(&mut given_up, &dir, "dropped.pcap");
    given_up.proc.signal("TERM").unwrap();
    for (receiver, file) in [
        (&mut timed_out, "lost.pcap"),
        (&mut given_up, "dropped.pcap"),
    ] {
        let status = receiver.proc.wait(Duration::from_secs(30)).unwrap();
        let log = receiver.proc.stderr();
        let lost: PathBuf = dir.join(file);
        assert_eq!(status.code(), Some(1), "{log}");
        for needle in [
            format!("upload of {} to p/{file} failed", lost.display()),
            format!("not uploaded: {}", lost.display()),
            "0 file(s), 0 bytes uploaded".to_string(),
            format!(
                "receiver: error: 1 file(s) not uploaded to s3://captures/p: {}",
                lost.display()
            ),
        ] {
            assert!(log.contains(&needle), "no {needle:?} in:\n{log}");
        }
        assert!(lost.exists(), "the local file stays");
    }
    assert!(timed_out
        .proc
        .stderr()
        .contains("after --upload-timeout 3s"));
    assert!(given_up
        .proc
        .stderr()
        .contains("given up on a second signal"));

    // Back within --upload-timeout: the retry delivers it.
    let mut moto = Moto::start(5405).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let dir = Scratch::new("upload-back").unwrap();
    let mut receiver = start_receiver(
        &moto,
        &dir,
        5407,
        "late.pcap",
        &["--upload", "s3://captures/p", "--upload-timeout", "2m"],
    );
    stream_corpus(&receiver, 1);
    moto.stop().unwrap();
    let late = stop_until_upload_fails(&mut receiver, &dir, "late.pcap");
    let moto = Moto::start(5405).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let status = receiver.proc.wait(Duration::from_secs(120)).unwrap();
    let log = receiver.proc.stderr();
    assert!(status.success(), "{log}");
    assert!(log.contains("failed attempt(s), 0 not uploaded"), "{log}");
    assert_uploaded(&moto, "p/late.pcap", &late, &dir, 1);
}
