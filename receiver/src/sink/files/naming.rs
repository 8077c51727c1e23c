//! File names: the `--out` pattern (strftime fields and `{sensor}` in the file name), the
//! path-safe form of a sensor's name, and counters that keep names apart.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use time::format_description::OwnedFormatItem;
use time::OffsetDateTime;

/// Where `{sensor}` goes in a file name.
const SENSOR: &str = "{sensor}";
/// Longest sensor part of a file name, counter included.
const MAX_SENSOR_LEN: usize = 64;

/// The `--out` path as a pattern: the directory as given, the file name with strftime
/// fields (`%Y%m%d-%H%M%S`, in UTC) and, with `--split-by sensor`, `{sensor}`.
pub struct Pattern {
    dir: PathBuf,
    /// The file name; formatted when it has `%` fields.
    name: String,
    format: Option<OwnedFormatItem>,
}

impl Pattern {
    /// Checks `out` and, for a file per sensor, puts `{sensor}` before the extension when
    /// the name has none.
    pub fn parse(out: &Path, split_by_sensor: bool) -> Result<Self, String> {
        let shown = out.display();
        let name = out
            .file_name()
            .ok_or_else(|| format!("--out {shown} names no file"))?
            .to_str()
            .ok_or_else(|| format!("--out {shown}: the file name must be UTF-8"))?;
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir_text = dir.to_string_lossy();
        if dir_text.contains('%') || dir_text.contains(SENSOR) {
            return Err(format!(
                "--out {shown}: put % fields and {SENSOR} in the file name, not the directory"
            ));
        }
        let name = match (split_by_sensor, name.contains(SENSOR)) {
            (true, true) | (false, false) => name.to_string(),
            (true, false) => match name.rsplit_once('.') {
                Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{SENSOR}.{ext}"),
                _ => format!("{name}-{SENSOR}"),
            },
            (false, true) => {
                return Err(format!("--out {shown}: {SENSOR} needs --split-by sensor"))
            }
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
        Ok(Self { dir, name, format })
    }

    /// The output's journal: beside its files, hidden, named after the pattern.
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(format!(".{}.capstream-journal", self.name))
    }

    /// The path for a file opened at `now`, of the sensor whose safe name is `sensor`.
    pub fn path(&self, sensor: Option<&str>, now: OffsetDateTime) -> PathBuf {
        let name = match &self.format {
            // Checked when parsed: formatting a valid description does not fail.
            Some(items) => now.format(items).unwrap_or_else(|_| self.name.clone()),
            None => self.name.clone(),
        };
        let name = match sensor {
            Some(sensor) => name.replace(SENSOR, sensor),
            None => name,
        };
        self.dir.join(name)
    }
}

/// A sensor's name as a file name part: letters, digits, `_`, `-` and single dots; other
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
        let p = Pattern::parse(Path::new("/data/cap-%Y%m%d-%H%M%S.pcapng"), false).unwrap();
        assert_eq!(
            p.path(None, now),
            Path::new("/data/cap-20231114-221320.pcapng")
        );
        let p = Pattern::parse(Path::new("d/{sensor}/x.pcap"), true);
        assert!(p.is_err(), "a placeholder in the directory is refused");
        let p = Pattern::parse(Path::new("%Y/x.pcap"), false);
        assert!(p.is_err());
        let p = Pattern::parse(Path::new("d/cap.pcap"), true).unwrap();
        assert_eq!(p.path(Some("tap-1"), now), Path::new("d/cap-tap-1.pcap"));
        let p = Pattern::parse(Path::new("d/{sensor}-%H.pcap"), true).unwrap();
        assert_eq!(p.path(Some("s"), now), Path::new("d/s-22.pcap"));
        assert!(Pattern::parse(Path::new("d/{sensor}.pcap"), false).is_err());
        assert!(Pattern::parse(Path::new("d/x-%Q.pcap"), false).is_err());
        let slash = Pattern::parse(Path::new("d/cap-%D.pcap"), true)
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
