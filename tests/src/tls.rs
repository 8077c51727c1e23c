//! An `openssl s_server -www` for the TLS key tests (`sensor --keylog`), the curl requests
//! that log their keys, and what tshark reads back: the decrypted request paths and the
//! Decryption Secrets Blocks of a capture.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::capstream::Scratch;
use crate::{run, Lab, Proc};

/// The server's address, in the generating namespace.
pub const SERVER: &str = "198.18.0.1";
/// Its port.
pub const PORT: &str = "4443";

/// The server in the generating namespace, its certificate in `dir`.
pub struct TlsServer {
    proc: Proc,
    pub cert: PathBuf,
}

impl TlsServer {
    pub fn start(lab: &Lab, dir: &Scratch, tls: &str) -> Self {
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=capstream-test",
                "-addext",
                &format!("subjectAltName=IP:{SERVER}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        )
        .unwrap();
        // Its "ACCEPT" goes to stdout: to stderr, where the test bed waits for it.
        let mut argv = lab.gen.command("sh");
        argv.extend([
            "-c".to_string(),
            format!(
                "exec openssl s_server -accept {SERVER}:{PORT} -www {tls} -cert {} -key {} 1>&2",
                cert.display(),
                key.display()
            ),
        ]);
        let mut proc = Proc::start("s_server", &argv, Stdio::null()).unwrap();
        proc.wait_for("ACCEPT", Duration::from_secs(10)).unwrap();
        Self { proc, cert }
    }

    /// `curl https://SERVER/secret-path-<n>` from the capturing namespace, logging keys to
    /// `keylog`.
    pub fn request(&self, lab: &Lab, keylog: &Path, n: usize) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.cap.name,
                "env",
                &format!("SSLKEYLOGFILE={}", keylog.display()),
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--cacert",
                self.cert.to_str().unwrap(),
                &format!("https://{SERVER}:{PORT}/secret-path-{n}"),
            ],
        )
        .unwrap();
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.proc.stop();
    }
}

/// The request paths tshark reads from `file` in one pass, with `extra` options.
pub fn request_paths(file: &Path, extra: &[&str]) -> BTreeSet<String> {
    let mut args = vec!["-r", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "http.request.uri",
    ]);
    run("tshark", &args)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

/// The Decryption Secrets Blocks of a pcapng file (little-endian, as the receiver writes
/// here) and the key log lines they hold.
pub fn secrets_blocks(file: &Path) -> (usize, usize) {
    let bytes = std::fs::read(file).unwrap();
    let (mut at, mut blocks, mut lines) = (0, 0, 0);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    while at + 8 <= bytes.len() {
        let (kind, len) = (u32_at(at), u32_at(at + 4));
        if kind == 0x0a {
            blocks += 1;
            let data = &bytes[at + 16..at + 16 + u32_at(at + 12)];
            lines += data.iter().filter(|&&b| b == b'\n').count();
        }
        if len < 12 {
            break;
        }
        at += len;
    }
    (blocks, lines)
}

/// The paths [`TlsServer::request`] asks for, of the requests numbered in `requests`.
pub fn secret_paths(requests: Range<usize>) -> BTreeSet<String> {
    requests.map(|n| format!("/secret-path-{n}")).collect()
}

/// A copy of the pcapng `file` without its Decryption Secrets Blocks (`editcap
/// --discard-all-secrets`), beside it: the control that shows the keys decrypt.
pub fn without_secrets(file: &Path) -> PathBuf {
    let stripped = file.with_extension("stripped.pcapng");
    run(
        "editcap",
        &[
            "--discard-all-secrets",
            file.to_str().unwrap(),
            stripped.to_str().unwrap(),
        ],
    )
    .unwrap();
    stripped
}
