//! File names: the `--out` pattern (strftime fields and `{sensor}`, `{process}` or
//! `{container}` in the file name), the path-safe form of a sensor's, process's or
//! container's name, and counters that keep names apart.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use time::format_description::OwnedFormatItem;
use time::OffsetDateTime;

use super::SplitBy;

/// Where the split's own part goes in a file name, per `--split-by`.
const PLACEHOLDERS: [(&str, SplitBy, &str); 3] = [
    ("{sensor}", SplitBy::Sensor, "sensor"),
    ("{process}", SplitBy::Process, "process"),
    ("{container}", SplitBy::Container, "container"),
];
/// Longest split part of a file name, counter included.
const MAX_SENSOR_LEN: usize = 64;

/// The `--out` path as a pattern: the directory as given, the file name with strftime
/// fields (`%Y%m%d-%H%M%S`, in UTC) and, with `--split-by`, its placeholder (`{sensor}`,
/// `{process}`, `{container}`).
pub struct Pattern {
    dir: PathBuf,
    /// The file name; formatted when it has `%` fields.
    name: String,
    format: Option<OwnedFormatItem>,
    /// The placeholder of `--split-by`, which the name holds.
    placeholder: Option<&'static str>,
}

impl Pattern {
    /// Checks `out` and, for a split output, puts its placeholder before the extension
    /// when the name has none.
    pub fn parse(out: &Path, split_by: Option<SplitBy>) -> Result<Self, String> {
        let shown = out.display();
        let name = out
            .file_name()
            .ok_or_else(|| format!("--out {shown} names no file"))?
            .to_str()
            .ok_or_else(|| format!("--out {shown}: the file name must be UTF-8"))?;
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir_text = dir.to_string_lossy();
        for (placeholder, by, flag) in PLACEHOLDERS {
            if dir_text.contains('%') || dir_text.contains(placeholder) {
                return Err(format!(
                    "--out {shown}: put % fields and {placeholder} in the file name, not the \
                     directory"
                ));
            }
            if name.contains(placeholder) && split_by != Some(by) {
                return Err(format!(
                    "--out {shown}: {placeholder} needs --split-by {flag}"
                ));
            }
        }
        let placeholder = PLACEHOLDERS
            .iter()
            .find(|(_, by, _)| split_by == Some(*by))
            .map(|(placeholder, _, _)| *placeholder);
        let name = match placeholder {
            Some(placeholder) if !name.contains(placeholder) => match name.rsplit_once('.') {
                Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{placeholder}.{ext}"),
                _ => format!("{name}-{placeholder}"),
            },
            _ => name.to_string(),
        };
        let format = if name.contains('%') {
            let items = time::format_description::parse_strftime_owned(&name)
                .map_err(|e| format!("--out {shown}: bad % field: {e}"))?;
            let formatted = OffsetDateTime::now_utc()
                .format(&items)
                .map_err(|e| format!("--out {shown}: bad % field: {e}"))?;
            // A field's output has a '/' at every time if at any (e.g. %D).
            if formatted.contains('/') {
                return Err(format!(
                    "--out {shown}: a % field puts '/' in the file name (as %D does); use \
                     fields such as %Y%m%d"
                ));
            }
            Some(items)
        } else {
            None
        };
        Ok(Self {
            dir,
            name,
            format,
            placeholder,
        })
    }

    /// The output's journal: beside its files, hidden, named after the pattern.
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(format!(".{}.capstream-journal", self.name))
    }

    /// The path for a file opened at `now`, of the sensor (process, container) whose safe
    /// name is `sensor`.
    pub fn path(&self, sensor: Option<&str>, now: OffsetDateTime) -> PathBuf {
        let name = match &self.format {
            // Checked when parsed: formatting a valid description does not fail.
            Some(items) => now.format(items).unwrap_or_else(|_| self.name.clone()),
            None => self.name.clone(),
        };
        let name = match sensor.zip(self.placeholder) {
            Some((sensor, placeholder)) => name.replace(placeholder, sensor),
            None => name,
        };
        self.dir.join(name)
    }
}

/// A sensor's (process's, container's) name as a file name part: letters, digits, `_`, `-` and single dots; other
/// characters (`/`, control characters, spaces, non-ASCII) become `_`; never `..`, never a
/// leading `.` or `-`, at most 64 bytes, never empty.
pub fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_SENSOR_LEN));
    for c in name.chars() {
        if out.len() >= MAX_SENSOR_LEN {
            break;
        }
        let keep = c.is_ascii_alphanumeric()
            || c == '_'
            || c == '-'
            || (c == '.' && !out.is_empty() && !out.ends_with('.'));
        out.push(if keep { c } else { '_' });
    }
    if out.starts_with('-') {
        out.replace_range(..1, "_");
    }
    if out.is_empty() {
        out.push_str("sensor");
    }
    out
}

/// `sanitize(name)`, made different from every name in `used` by a counter (`-2`, `-3`...),
/// and added to it: two sensors whose names look alike still get files of their own.
pub fn unique(name: &str, used: &mut HashSet<String>) -> String {
    let base = sanitize(name);
    let mut candidate = base.clone();
    let mut n = 1u32;
    while used.contains(&candidate) {
        n += 1;
        let suffix = format!("-{n}");
        let mut stem = base.clone();
        stem.truncate(MAX_SENSOR_LEN - suffix.len());
        candidate = stem + &suffix;
    }
    used.insert(candidate.clone());
    candidate
}

/// `dir/cap-20260101.pcap` with counter 2 is `dir/cap-20260101-2.pcap`: the counter goes
/// before the extension.
pub fn with_counter(path: &Path, n: u32) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let numbered = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{n}.{ext}"),
        _ => format!("{name}-{n}"),
    };
    path.with_file_name(OsString::from(numbered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitized_names_are_safe_file_name_parts() {
        for (raw, safe) in [
            ("tap-1", "tap-1"),
            ("dmz.tap_2", "dmz.tap_2"),
            ("../../x", "_._.__x"),
            ("..", "_."),
            ("a/b\\c", "a_b_c"),
            (".hidden", "_hidden"),
            ("-rf", "_rf"),
            ("a\nb\u{7f}c", "a_b_c"),
            ("tête", "t_te"),
            ("", "sensor"),
            ("a..b", "a._b"),
        ] {
            assert_eq!(sanitize(raw), safe, "{raw:?}");
        }
        let long = sanitize(&"x".repeat(500));
        assert_eq!(long.len(), MAX_SENSOR_LEN);
        for hostile in [
            "../../x",
            "/etc/passwd",
            "..",
            ".",
            "-",
            "\u{0}",
            "a/../../b",
        ] {
            let s = sanitize(hostile);
            assert!(
                !s.contains('/') && !s.contains("..") && !s.starts_with(['.', '-']),
                "{hostile:?} -> {s:?}"
            );
            assert!(!s.chars().any(char::is_control), "{hostile:?} -> {s:?}");
        }
    }

    #[test]
    fn look_alike_names_get_their_own() {
        let mut used = HashSet::new();
        assert_eq!(unique("a/b", &mut used), "a_b");
        assert_eq!(unique("a_b", &mut used), "a_b-2");
        assert_eq!(unique("a:b", &mut used), "a_b-3");
        let long = "y".repeat(100);
        let first = unique(&long, &mut used);
        let second = unique(&format!("{long}z"), &mut used);
        assert_ne!(first, second);
        assert!(second.len() <= MAX_SENSOR_LEN && second.ends_with("-2"));
    }

    #[test]
    fn patterns_take_time_fields_and_the_sensor() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let sensor = Some(SplitBy::Sensor);
        let p = Pattern::parse(Path::new("/data/cap-%Y%m%d-%H%M%S.pcapng"), None).unwrap();
        assert_eq!(
            p.path(None, now),
            Path::new("/data/cap-20231114-221320.pcapng")
        );
        let p = Pattern::parse(Path::new("d/{sensor}/x.pcap"), sensor);
        assert!(p.is_err(), "a placeholder in the directory is refused");
        let p = Pattern::parse(Path::new("%Y/x.pcap"), None);
        assert!(p.is_err());
        let p = Pattern::parse(Path::new("d/cap.pcap"), sensor).unwrap();
        assert_eq!(p.path(Some("tap-1"), now), Path::new("d/cap-tap-1.pcap"));
        let p = Pattern::parse(Path::new("d/{sensor}-%H.pcap"), sensor).unwrap();
        assert_eq!(p.path(Some("s"), now), Path::new("d/s-22.pcap"));
        assert!(Pattern::parse(Path::new("d/{sensor}.pcap"), None).is_err());
        assert!(Pattern::parse(Path::new("d/x-%Q.pcap"), None).is_err());
        // Each split has its own placeholder, put in when the name has none.
        let p = Pattern::parse(Path::new("d/cap.pcapng"), Some(SplitBy::Process)).unwrap();
        assert_eq!(
            p.path(Some("h-curl-7"), now),
            Path::new("d/cap-h-curl-7.pcapng")
        );
        let p = Pattern::parse(Path::new("d/{container}.pcapng"), Some(SplitBy::Container));
        assert_eq!(p.unwrap().path(Some("ab"), now), Path::new("d/ab.pcapng"));
        let wrong = Pattern::parse(Path::new("d/{process}.pcap"), sensor)
            .err()
            .unwrap();
        assert!(wrong.contains("--split-by process"), "{wrong}");
        let slash = Pattern::parse(Path::new("d/cap-%D.pcap"), sensor)
            .err()
            .unwrap();
        assert!(slash.contains("'/'"), "{slash}");
    }

    #[test]
    fn counters_keep_the_extension() {
        assert_eq!(
            with_counter(Path::new("/d/cap-1200.pcapng"), 2),
            Path::new("/d/cap-1200-2.pcapng")
        );
        assert_eq!(with_counter(Path::new("cap"), 3), Path::new("cap-3"));
    }
}
