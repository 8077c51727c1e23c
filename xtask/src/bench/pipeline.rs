//! The reference architecture as a baseline: `tcpdump -U -w -` piped through a TLS tunnel
//! (socat OPENSSL) into a writer (socat OPENSSL-LISTEN with its stdout in a file).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::capstream::{Receiver, Scratch};
use testbed::Netns;

/// Where the writer listens, on the loopback of the namespace it runs in.
const PORT: u16 = 4434;

/// The tunnel's certificate and key (PEM): those a receiver generates in its state
/// directory, self-signed for 127.0.0.1 and localhost, so that both sides use the same kind
/// of key.
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPair {
    /// Starts and stops a receiver in `ns` with its state in `dir/state`, which leaves the
    /// pair there.
    pub fn create(ns: Option<&Netns>, dir: &Scratch) -> Result<Self> {
        let (mut receiver, _) = Receiver::writing(ns, dir, "unused.pcap", &[])?;
        receiver.stop()?;
        let state = dir.join("state");
        let pair = Self {
            cert: state.join("receiver.crt"),
            key: state.join("receiver.key"),
        };
        if !pair.cert.exists() || !pair.key.exists() {
            bail!(
                "the receiver left no receiver.crt and receiver.key in {}",
                state.display()
            );
        }
        Ok(pair)
    }
}

pub fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `program` inside `ns` when given.
pub fn command_in(ns: Option<&Netns>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let argv = ns.command(program);
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            cmd
        }
        None => Command::new(program),
    }
}

/// The writer end: `socat -u OPENSSL-LISTEN:PORT,... STDOUT > out`, listening on 127.0.0.1
/// once this returns (its stderr, in `log`, says so); it exits when the tunnel closes.
pub fn start_writer(ns: Option<&Netns>, tls: &TlsPair, out: &Path, log: &Path) -> Result<Child> {
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = command_in(ns, "socat");
    cmd.args([
        "-d".to_string(),
        "-d".to_string(),
        "-u".to_string(),
        format!(
            "OPENSSL-LISTEN:{PORT},bind=127.0.0.1,reuseaddr,cert={},key={},verify=0",
            tls.cert.display(),
            tls.key.display()
        ),
        "STDOUT".to_string(),
    ]);
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(File::create(log)?);
    let mut child = cmd.spawn().context("cannot start socat (writer)")?;
    wait_for_log(&mut child, log, "listening on", "socat (writer)")?;
    Ok(child)
}

/// Waits until `log` (a child's stderr) contains `needle`; kills the child and fails if it
/// exits first or 10 s pass.
pub fn wait_for_log(child: &mut Child, log: &Path, needle: &str, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if Instant::now() >= deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} did not print {needle:?}: {}", text.trim());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tunnel's entrance: `socat -u STDIN OPENSSL:127.0.0.1:PORT,verify=1,cafile=...`,
/// reading `stdin`; its stderr goes to `log`.
pub fn start_tunnel(ns: Option<&Netns>, tls: &TlsPair, stdin: Stdio, log: &Path) -> Result<Child> {
    let mut cmd = command_in(ns, "socat");
    cmd.args([
        "-u".to_string(),
        "STDIN".to_string(),
        format!(
            "OPENSSL:127.0.0.1:{PORT},verify=1,cafile={}",
            tls.cert.display()
        ),
    ]);
    cmd.stdin(stdin)
        .stdout(Stdio::null())
        .stderr(File::create(log)?);
    cmd.spawn().context("cannot start socat (tunnel)")
}

/// Waits for a child and fails, with its log, unless it exits 0.
pub fn wait_ok(child: &mut Child, name: &str, log: &Path) -> Result<()> {
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{name} exited with {status}: {}",
            std::fs::read_to_string(log).unwrap_or_default().trim()
        );
    }
    Ok(())
}
