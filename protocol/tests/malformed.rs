//! Malformed inputs, kept as regression tests: every file in `tests/malformed/` goes through
//! the code of the `decode_frame` fuzz target (`protocol::decode_check`, which the target
//! calls too), and every file in `tests/malformed/batch_body/` through that of the
//! `batch_body` target.
//! Each must be refused with an error, never a panic, and with the kind of error its name
//! starts with.
//!
//! # The files
//!
//! A file is named `<Kind>-<what>.hex` or `<Kind>-<what>.bin`. `<Kind>` is the expected
//! refusal: a [`DecodeError`] variant (`Truncated`, `TooLong`, `BadUtf8`, `UnknownType`,
//! `BadValue`, `BadMagic`, `UnsupportedVersion`, `TrailingBytes`, `Decompress`),
//! `EndedInsideFrame` when the input stops inside a frame (the receiver's "stream ended
//! inside a message"), or `Any` where only the refusal itself is stable.
//!
//! `.bin` files are raw bytes, as the fuzzer writes its crash inputs. `.hex` files are text,
//! written against the encoding in `protocol/src/message.rs` and `batch.rs`:
//!
//! - `#` starts a comment; a comment line `# expect-field: NAME` also requires the error to
//!   name that field (`DecodeError`'s `field`), where the field is what the case is about;
//! - hex digits, any even number per word (`04`, `0000002a`);
//! - `'text'` for its ASCII bytes (no spaces);
//! - a word followed by `*N` is repeated N times (`00*10`, `'x'*129`);
//! - `VERSION` is `PROTOCOL_VERSION` as a `u16`, `VERSION+1` the next version, so a version
//!   bump leaves every case but the version ones unchanged;
//! - `MAX_FRAME_LEN+1` is that number as a `u32`;
//! - `LEN` is a frame's length field (`u32`) counting the bytes after it up to the end of
//!   the frame: a line `---` ends a frame, and the file's end does. Where the length is the
//!   lie, it is written out instead.
//!
//! Every file starts with a comment saying what it holds. The cases: stream and frame
//! header (ended inside a header or a body, frame length above the limit, unknown types,
//! trailing bytes); Hello (short, bad magic, other versions, non-UTF-8 and over-long
//! strings, too many interfaces, zero or oversized snap length, missing interface, a token
//! too long, cut short or missing); Batch (short header, bad encoding, Snappy garbage, bad
//! copies and length mismatch, Snappy claiming more than 8 MiB, stored body above 8 MiB,
//! records whose header or data run past the body, captured length above the snap length or
//! the original length, bad direction, packet counts that do not match the records, before
//! and after Snappy); Stats (duplicate drop reason, too many reasons or interfaces, short);
//! Error (over-long and non-UTF-8 text).
//!
//! # Adding a fuzzer's crash input
//!
//! Copy `fuzz/artifacts/<target>/crash-*` here as `<Kind>-<what>.bin` (into `batch_body/`
//! for that target), fix the bug, and give it the kind it is refused with. See
//! `fuzz/README.md`.

use std::path::{Path, PathBuf};

use protocol::decode_check::{self, Refusal};
use protocol::{DecodeError, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// One input: its bytes and what it must be refused with.
struct Case {
    path: PathBuf,
    bytes: Vec<u8>,
    kind: String,
    field: Option<String>,
}

fn cases(dir: &Path) -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let kind = name
                .split_once('-')
                .map(|(k, _)| k.to_string())
                .unwrap_or_else(|| panic!("{name}: the name must start with the error kind"));
            let (bytes, field) = match path.extension().and_then(|e| e.to_str()) {
                Some("hex") => {
                    let text = std::fs::read_to_string(&path).unwrap();
                    parse_hex(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
                }
                Some("bin") => (std::fs::read(&path).unwrap(), None),
                _ => panic!("{name}: only .hex and .bin files belong here"),
            };
            Case {
                path,
                bytes,
                kind,
                field,
            }
        })
        .collect()
}

/// The `.hex` format described at the top; returns the bytes and the expected field.
fn parse_hex(text: &str) -> Result<(Vec<u8>, Option<String>), String> {
    let mut field = None;
    let mut out = Vec::new();
    // Frame being written: where its LEN field is, if it has one.
    let mut len_at: Option<usize> = None;
    let close_frame = |out: &mut Vec<u8>, len_at: &mut Option<usize>| {
        if let Some(at) = len_at.take() {
            let len = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    };
    for line in text.lines() {
        let (code, comment) = line.split_once('#').unwrap_or((line, ""));
        if let Some(f) = comment.trim().strip_prefix("expect-field:") {
            field = Some(f.trim().to_string());
        }
        for word in code.split_whitespace() {
            let (word, times) = match word.rsplit_once('*') {
                Some((w, n)) => (w, n.parse::<usize>().map_err(|e| format!("{word}: {e}"))?),
                None => (word, 1),
            };
            let bytes: Vec<u8> = match word {
                "---" => {
                    close_frame(&mut out, &mut len_at);
                    continue;
                }
                "LEN" => {
                    if len_at.is_some() {
                        return Err("two LEN in one frame (separate frames with ---)".into());
                    }
                    len_at = Some(out.len());
                    vec![0; 4]
                }
                "VERSION" => PROTOCOL_VERSION.to_be_bytes().to_vec(),
                "VERSION+1" => PROTOCOL_VERSION.wrapping_add(1).to_be_bytes().to_vec(),
                "MAX_FRAME_LEN+1" => (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec(),
                w if w.len() >= 2 && w.starts_with('\'') && w.ends_with('\'') => {
                    w.as_bytes()[1..w.len() - 1].to_vec()
                }
                w => {
                    if w.len() % 2 != 0 {
                        return Err(format!("{w}: odd number of hex digits"));
                    }
                    (0..w.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&w[i..i + 2], 16))
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("{w}: {e}"))?
                }
            };
            for _ in 0..times {
                out.extend_from_slice(&bytes);
            }
        }
    }
    close_frame(&mut out, &mut len_at);
    Ok((out, field))
}

/// The `field` a decode error names, if it names one.
fn field_of(e: &DecodeError) -> Option<&'static str> {
    match e {
        DecodeError::Truncated { field, .. }
        | DecodeError::TooLong { field, .. }
        | DecodeError::BadUtf8 { field }
        | DecodeError::BadValue { field, .. } => Some(field),
        _ => None,
    }
}

/// Runs every case through `run`, catching panics, and reports all failures at once.
fn check_all(dir: &Path, run: impl Fn(&[u8]) -> Result<(), Refusal> + std::panic::RefUnwindSafe) {
    let cases = cases(dir);
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.path.file_name().unwrap().to_string_lossy();
        let result = std::panic::catch_unwind(|| run(&case.bytes));
        let problem = match result {
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("panicked: {what}"))
            }
            Ok(Ok(())) => Some("was accepted".to_string()),
            Ok(Err(refusal)) => {
                eprintln!("{name}: {refusal:?}");
                let field = match &refusal {
                    Refusal::Decode(e) => field_of(e),
                    Refusal::EndedInsideFrame { .. } => None,
                };
                if case.kind != "Any" && refusal.kind() != case.kind {
                    Some(format!("refused as {refusal:?}, not {}", case.kind))
                } else if case.field.is_some() && case.field.as_deref() != field {
                    Some(format!(
                        "refused as {refusal:?}, not for field {:?}",
                        case.field.as_deref().unwrap_or_default()
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(p) = problem {
            failures.push(format!("{name}: {p}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} malformed inputs failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed")
}

#[test]
fn malformed_streams_are_refused_without_panicking() {
    check_all(&corpus(), |bytes| decode_check::decode_stream(bytes).1);
}

#[test]
fn malformed_batch_bodies_are_refused_without_panicking() {
    check_all(&corpus().join("batch_body"), |bytes| {
        let batch = decode_check::batch_from_input(bytes).expect("a batch_body input has 5 bytes");
        decode_check::check_batch(&batch).map_err(Refusal::Decode)
    });
}

/// The templates the malformed cases are cut from, whole: if one of these stops decoding,
/// the encoding changed and the cases built on it may no longer test what their comments
/// say. Update the `.hex` files with it.
#[test]
fn templates_of_the_cases_are_valid() {
    let templates = [
        // Hello: one interface, no token, no interface listed, no on-demand captures, no
        // TLS key log.
        "01 LEN 'CAPS' VERSION 0000000000000001 00*16 0001 's' 0001 'h' 0001 'o' 0001
         0004 'eth0' 0001 00040000 0000 0000 0000 00 00",
        // Hello: one interface, a token, one interface listed, on-demand captures, a TLS
        // key log.
        "01 LEN 'CAPS' VERSION 0000000000000001 00*16 0001 's' 0001 'h' 0001 'o' 0001
         0004 'eth0' 0001 00040000 0000 0010 't'*16 0001 0004 'eth0' 01 01",
        // Stored batch of one record.
        "02 LEN 0000000000000001 0000000000000001 0000 00000001 00
         0000000000000001 00000001 00000001 01 ab",
        // Snappy batch: one 18-byte literal holding one record.
        "02 LEN 0000000000000001 0000000000000001 0000 00000001 01
         12 44 0000000000000001 00000001 00000001 00 ab",
        // Stats: one interface, two drop reasons.
        "03 LEN 0000000000000001 0001 0000 0000000000000064 0000000000000064 0000000000000064
         0002 01 0000000000000001 02 0000000000000002",
        "04 LEN 0000000000000007",
        "05 LEN",
        "06 LEN 0001 0004 'oops'",
    ];
    for t in templates {
        let (bytes, _) = parse_hex(t).unwrap();
        let (messages, result) = decode_check::decode_stream(&bytes);
        assert_eq!(result, Ok(()), "template {t}");
        assert_eq!(messages.len(), 1, "template {t}");
    }
}

/// The `.hex` reader itself: lengths, repeats and the version stand where they should.
#[test]
fn hex_format_reads_as_documented() {
    let (bytes, field) = parse_hex(
        "# a comment\n# expect-field: f\n04 LEN 'ab'*2 # tail\n---\n05 LEN\n01 VERSION 00*3",
    )
    .unwrap();
    let v = PROTOCOL_VERSION.to_be_bytes();
    assert_eq!(
        bytes,
        [
            &[4, 0, 0, 0, 4][..],
            b"abab",
            &[5, 0, 0, 0, 6, 1, v[0], v[1], 0, 0, 0]
        ]
        .concat()
    );
    assert_eq!(field.as_deref(), Some("f"));
}
