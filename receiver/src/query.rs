//! `receiver query`: the command line side of the lake's query (the `lake` crate): times,
//! the lake's location, the output, the progress bar and `--list`.

use anyhow::{anyhow, Context, Result};
use lake::query::{Progress, Query, QueryError};
use lake::Lake;
use receiver::cli::QueryArgs;
use receiver::sink::Format;
use std::io::{IsTerminal, Write};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::BadInput;

pub async fn run(args: &QueryArgs) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let from = match &args.from {
        Some(s) => Some(parse_time(s, now, now).map_err(|e| BadInput(anyhow!("--from: {e}")))?),
        None => None,
    };
    let to = match &args.to {
        Some(s) => Some(
            parse_time(s, now, from.unwrap_or(now)).map_err(|e| BadInput(anyhow!("--to: {e}")))?,
        ),
        None => None,
    };
    if let (Some(from), Some(to)) = (from, to) {
        if to < from {
            return Err(BadInput(anyhow!(
                "--to {} is before --from {}",
                format_ns(ns(to)),
                format_ns(ns(from))
            ))
            .into());
        }
    }
    let filter = args.filter.join(" ");
    lake::query::check_filter(&filter).map_err(|e| BadInput(anyhow!(e)))?;
    let lake = open(&args.lake, args.allow_http).await.map_err(BadInput)?;
    if args.list {
        return list(&lake).await;
    }
    let query = Query {
        from: from.map_or(0, ns),
        to: to.map_or(u64::MAX, ns),
        sensors: args.sensor.clone(),
        filter,
    };
    let path = args.write.as_deref().unwrap_or(std::path::Path::new("-"));
    let out: Box<dyn Write> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(path)
                .map_err(|e| BadInput(anyhow!("cannot create {}: {e}", path.display())))?,
        )
    };
    let out = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut output = match args.format {
        Format::Pcapng => lake::pcapng::Output::pcapng(out)?,
        Format::Pcap => lake::pcapng::Output::pcap(out),
    };
    let mut progress = Bar::new();
    let result = lake::query::run(&lake, &query, &mut output, &mut progress).await;
    progress.done();
    let stats = result.map_err(|e| match e {
        QueryError::Store { .. } => anyhow::Error::new(BadInput(anyhow!(e))),
        e => anyhow!(e),
    })?;
    if stats.key_lines_not_written > 0 {
        eprintln!(
            "receiver: query: classic pcap cannot hold TLS keys: {} key log line(s) of the \
             answer not written (--format pcapng carries them)",
            stats.key_lines_not_written
        );
    }
    if args.stats {
        eprintln!("receiver: query: {}", stats.line());
    }
    Ok(())
}

/// The lake at `url`: a directory, or s3://BUCKET/PREFIX.
pub async fn open(url: &str, allow_http: bool) -> Result<Lake> {
    if url.starts_with("s3://") {
        let (store, prefix) = crate::upload::open_store(url, allow_http, "--lake").await?;
        return Ok(Lake::in_store(
            std::sync::Arc::new(store),
            prefix,
            url.to_string(),
        ));
    }
    if url.contains("://") {
        return Err(anyhow!(
            "--lake {url}: use a directory or s3://BUCKET/PREFIX"
        ));
    }
    let dir = std::path::Path::new(url);
    std::fs::read_dir(dir).with_context(|| format!("--lake {url}: cannot read the directory"))?;
    Lake::local(dir).with_context(|| format!("--lake {url}"))
}

/// `--list`: each sensor's interfaces and the time range it covers, and the lake's.
async fn list(lake: &Lake) -> Result<()> {
    let listing = lake
        .list()
        .await
        .map_err(|e| BadInput(anyhow!("cannot read the lake {}: {e}", lake.url)))?;
    let mut sensors: std::collections::BTreeMap<&str, (u64, u64, u64, usize)> = Default::default();
    for s in &listing.segments {
        let m = &s.manifest;
        let mut names: Vec<&str> = m.interfaces.iter().map(|i| i.sensor.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let e = sensors.entry(name).or_insert((u64::MAX, 0, 0, 0));
            e.0 = e.0.min(m.first_ns);
            e.1 = e.1.max(m.last_ns);
            e.2 += m.segment_bytes;
            e.3 += 1;
        }
    }
    let mut out = std::io::stdout().lock();
    let first = listing.segments.iter().map(|s| s.manifest.first_ns).min();
    let last = listing.segments.iter().map(|s| s.manifest.last_ns).max();
    match (first, last) {
        (Some(first), Some(last)) => writeln!(
            out,
            "lake {}: {} segment(s), {} to {}",
            lake.url,
            listing.segments.len(),
            format_ns(first),
            format_ns(last)
        )?,
        _ => writeln!(out, "lake {}: no segments", lake.url)?,
    }
    for (name, (first, last, bytes, segments)) in sensors {
        writeln!(
            out,
            "  sensor {name}: {} to {}, {segments} segment(s), {bytes} bytes",
            format_ns(first),
            format_ns(last)
        )?;
    }
    for (path, why) in &listing.unreadable {
        tracing::warn!("ignoring manifest {path}: {why}");
    }
    Ok(())
}

fn ns(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos()).unwrap_or(0)
}

fn format_ns(ns: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ns.to_string())
}

/// RFC 3339; `now`; `-DURATION` before now; `HH:MM[:SS]` (UTC) on `date`'s day.
fn parse_time(
    s: &str,
    now: OffsetDateTime,
    date: OffsetDateTime,
) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if let Some(ago) = s.strip_prefix('-') {
        let ago = receiver::cli::parse_long_duration(ago)?;
        return Ok(now - ago);
    }
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let parts: Vec<&str> = s.split(':').collect();
    let number = |p: &str, max: u8| p.parse::<u8>().ok().filter(|&n| n <= max && p.len() == 2);
    let time = match parts.as_slice() {
        [h, m] => number(h, 23).zip(number(m, 59)).map(|(h, m)| (h, m, 0)),
        [h, m, sec] => number(h, 23)
            .zip(number(m, 59))
            .zip(number(sec, 59))
            .map(|((h, m), s)| (h, m, s)),
        _ => None,
    };
    match time.and_then(|(h, m, sec)| time::Time::from_hms(h, m, sec).ok()) {
        Some(t) => Ok(date.to_offset(time::UtcOffset::UTC).replace_time(t)),
        None => Err(format!(
            "malformed time '{s}': use RFC 3339 (2026-12-05T10:00:00Z), HH:MM[:SS] (UTC), \
             now, or -15m"
        )),
    }
}

/// The progress bar, on a terminal only; warnings go to the log either way.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    fetched: u64,
}

impl Bar {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} segments, {msg} fetched",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar, fetched: 0 }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn segments(&mut self, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
        }
    }

    fn segment_done(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            self.fetched += bytes;
            bar.inc(1);
            bar.set_message(format!("{} bytes", self.fetched));
        }
    }

    fn warn(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::warn!("{message}")),
            None => tracing::warn!("{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times() {
        let now = OffsetDateTime::parse("2026-12-06T05:00:00Z", &Rfc3339).unwrap();
        let from = parse_time("2026-12-05T10:00:00Z", now, now).unwrap();
        assert_eq!(
            parse_time("10:05", now, from).unwrap(),
            OffsetDateTime::parse("2026-12-05T10:05:00Z", &Rfc3339).unwrap()
        );
        assert_eq!(
            parse_time("-15m", now, now).unwrap(),
            now - Duration::from_secs(900)
        );
        assert_eq!(parse_time("now", now, now).unwrap(), now);
        for bad in ["yesterday", "25:00", "10:5", "-15x", "2026-13-01T00:00:00Z"] {
            assert!(parse_time(bad, now, now).is_err(), "{bad}");
        }
    }
}
