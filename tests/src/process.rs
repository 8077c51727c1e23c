//! Processes under test: started with their stderr collected, stopped with signals.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

/// A running process whose stderr is collected as it arrives. Killed on drop if still running.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Log>,
    /// Where it writes its `--summary-json`, when started with one (see [`Proc::summary`]).
    summary: Option<SummaryFile>,
}

/// A `--summary-json` file in a directory of its own, removed with the process: any user
/// may create files there (a sensor writes it as `--user`, nobody by default).
pub struct SummaryFile {
    /// Removed on drop.
    _dir: crate::capstream::Scratch,
    path: std::path::PathBuf,
}

impl SummaryFile {
    pub fn new(program: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::capstream::Scratch::new(&format!("{program}-summary"))?;
        // Sticky and open to all, as /tmp.
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o1777))?;
        let path = dir.join("summary.json");
        Ok(Self { _dir: dir, path })
    }

    /// The path to pass as `--summary-json`.
    pub fn arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The summary the program wrote, once it exited.
    pub fn read(&self) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("no summary in {}", self.path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("the summary is not JSON: {text}"))
    }
}

impl Proc {
    /// Starts `argv` with stdout sent to `stdout` (a file, a pipe, or null).
    pub fn start(name: &str, argv: &[String], stdout: Stdio) -> Result<Self> {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", argv[0]))?;
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.text.lock().expect("log lock");
                text.push_str(&line);
                text.push('\n');
                sink.grew.notify_all();
            }
        });
        Ok(Self {
            name: name.to_string(),
            child,
            log,
            summary: None,
        })
    }

    /// The process writes its exit summary to `file` (it was started with
    /// `--summary-json` and [`SummaryFile::arg`]); [`Proc::summary`] reads it.
    pub fn with_summary(mut self, file: SummaryFile) -> Self {
        self.summary = Some(file);
        self
    }

    /// The exit summary it wrote to its `--summary-json` file: read after it exited.
    pub fn summary(&self) -> Result<serde_json::Value> {
        let file = self
            .summary
            .as_ref()
            .with_context(|| format!("{} was started without --summary-json", self.name))?;
        file.read()
            .with_context(|| format!("{}'s stderr:\n{}", self.name, self.stderr()))
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.text.lock().expect("log lock").clone()
    }

    /// Waits until stderr contains `needle`; fails with the log if the process exits first
    /// or the time runs out.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut text = self.log.text.lock().expect("log lock");
        loop {
            if text.contains(needle) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; stderr:\n{text}",
                    self.name
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                drop(text);
                thread::sleep(Duration::from_millis(100));
                bail!(
                    "{} exited ({status}) before printing {needle:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            text = self.log.grew.wait_timeout(text, wait).expect("log lock").0;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (TERM, INT, KILL).
    pub fn signal(&self, sig: &str) -> Result<()> {
        run("kill", &[&format!("-{sig}"), &self.pid().to_string()]).map(drop)
    }

    /// Waits for exit, killing the process if it outlives `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits; fails unless the exit status is 0.
    pub fn stop(&mut self) -> Result<()> {
        self.signal("TERM")?;
        let status = self.wait(Duration::from_secs(20))?;
        if !status.success() {
            bail!(
                "{} exited with {status}; stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
        Ok(())
    }

    /// Takes the process's stdout pipe (when started with `Stdio::piped()`).
    pub fn take_stdout(&mut self) -> Option<impl Read> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
