//! moto's S3 server, from PyPI, as the real S3-compatible store of the upload tests; boto3
//! (installed with it) is the reference client that creates buckets and downloads objects.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::{run, Proc};

/// The moto release `cargo xtask setup` installs.
pub const MOTO_REQUIREMENT: &str = "moto[server]==5.2.5";

/// The virtualenv holding moto and boto3 (Debian's pip refuses system-wide installs).
pub fn moto_venv() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/capstream/moto")
}

/// True when the virtualenv has moto's server and boto3.
pub fn moto_installed() -> bool {
    let python = moto_venv().join("bin/python");
    python.exists()
        && run(
            &python.to_string_lossy(),
            &["-c", "import moto.server, boto3"],
        )
        .is_ok()
}

/// A moto server on 127.0.0.1:`port`, stopped on drop. It keeps everything in memory: a
/// restarted one has no buckets.
pub struct Moto {
    proc: Proc,
    pub port: u16,
}

impl Moto {
    /// Starts the server and waits until it answers; fails saying how to install moto.
    pub fn start(port: u16) -> Result<Self> {
        if !moto_installed() {
            bail!(
                "moto is missing from {}: `cargo xtask setup` installs it",
                moto_venv().display()
            );
        }
        let server = moto_venv().join("bin/moto_server");
        let argv = [
            server.to_string_lossy().into_owned(),
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let mut proc = Proc::start("moto_server", &argv, Stdio::null())?;
        proc.wait_for("Running on", Duration::from_secs(60))?;
        Ok(Self { proc, port })
    }

    /// SIGTERM and wait; moto's own exit status after a signal does not matter.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.signal("TERM")?;
        self.proc.wait(Duration::from_secs(20))?;
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `KEY=VALUE` settings that point an S3 client at this server, for `env`.
    pub fn aws_env(&self) -> Vec<String> {
        vec![
            "AWS_ACCESS_KEY_ID=testing".into(),
            "AWS_SECRET_ACCESS_KEY=testing".into(),
            "AWS_REGION=us-east-1".into(),
            format!("AWS_ENDPOINT_URL={}", self.endpoint()),
        ]
    }

    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.boto3("s3.create_bucket(Bucket=sys.argv[2])", &[bucket])
            .map(drop)
    }

    /// Downloads `bucket/key` to `to`.
    pub fn download(&self, bucket: &str, key: &str, to: &Path) -> Result<()> {
        self.boto3(
            "s3.download_file(sys.argv[2], sys.argv[3], sys.argv[4])",
            &[bucket, key, &to.to_string_lossy()],
        )
        .map(drop)
    }

    /// The object's ETag; a multipart upload's ends in `-<parts>"`.
    pub fn etag(&self, bucket: &str, key: &str) -> Result<String> {
        let out = self.boto3(
            "print(s3.head_object(Bucket=sys.argv[2], Key=sys.argv[3])['ETag'])",
            &[bucket, key],
        )?;
        Ok(out.trim().to_string())
    }

    /// The keys under `bucket`.
    pub fn keys(&self, bucket: &str) -> Result<Vec<String>> {
        let out = self.boto3(
            "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket=sys.argv[2])\
             .get('Contents', [])))",
            &[bucket],
        )?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// Runs one boto3 statement with `s3` a client of this server; `sys.argv[2..]` are `args`.
    fn boto3(&self, statement: &str, args: &[&str]) -> Result<String> {
        let script = format!(
            "import sys, boto3\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='testing', \
             aws_secret_access_key='testing', region_name='us-east-1')\n\
             {statement}\n"
        );
        let python = moto_venv().join("bin/python");
        let endpoint = self.endpoint();
        let mut all = vec!["-c", script.as_str(), endpoint.as_str()];
        all.extend_from_slice(args);
        run(&python.to_string_lossy(), &all)
    }
}
