//! Scraping the programs' Prometheus endpoints over HTTP with curl, and reading figures out
//! of the text exposition format.

use anyhow::{Context, Result};

use crate::{require_tool, Netns};

/// `curl http://ADDR/metrics`, inside `ns` when given.
pub fn scrape(ns: Option<&Netns>, addr: &str) -> Result<String> {
    require_tool("curl", "curl");
    let url = format!("http://{addr}/metrics");
    let args = ["-sSf", "--max-time", "5", url.as_str()];
    match ns {
        Some(ns) => ns.exec("curl", &args),
        None => crate::run("curl", &args),
    }
    .with_context(|| format!("scraping {url}"))
}

/// The sum of the samples of `name` whose labels include every one of `labels`; `None`
/// when there is no such series.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, inner) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let wanted = labels.iter().all(|(k, v)| {
            let pair = format!("{k}=\"{v}\"");
            inner.split(',').any(|p| p == pair)
        });
        if series_name == name && wanted {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// [`sum`] as a whole number, 0 when the series is absent.
pub fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    sum(text, name, labels).unwrap_or(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_series_that_have_the_labels() {
        let text =
            "# TYPE a counter\na{x=\"1\",r=\"k\"} 2\na{x=\"1\",r=\"s\"} 3\na{x=\"2\"} 7\nb 1.5\n";
        assert_eq!(sum(text, "a", &[("x", "1")]), Some(5.0));
        assert_eq!(sum(text, "a", &[("x", "1"), ("r", "s")]), Some(3.0));
        assert_eq!(sum(text, "a", &[]), Some(12.0));
        assert_eq!(sum(text, "b", &[]), Some(1.5));
        assert_eq!(sum(text, "a", &[("x", "3")]), None);
        assert_eq!(count(text, "c", &[]), 0);
    }
}
