//! The file output: one file of all sensors, or one per sensor (`--split-by sensor`), each
//! optionally rotated by size or age, names from a strftime pattern, old files deleted
//! beyond `--keep`/`--keep-bytes`, and every completed file handed to `on_finished`.
//!
//! Sensors are acknowledged only once their packets are flushed to a file: a rotated-out
//! file is completed in memory and written, closed and reported at the next flush, before
//! the file that follows it.

mod committed;
pub mod naming;
mod series;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::PathBuf;

use common::InterfaceStats;

use self::naming::Pattern;
pub use self::series::Rotation;
use self::series::Series;
use super::{FormatSink, OutPacket, Sink, SinkInterface};
use crate::cli::Format;

/// Called with each file once it is complete and closed: rotated out, or the last at exit.
/// It runs on the writer task, so it must return at once (hand the path to a queue or a
/// task, e.g. the uploader's channel with `try_send`).
pub type OnFinished = Box<dyn FnMut(PathBuf) + Send>;

/// What the file output writes and keeps.
pub struct FileConfig {
    pub pattern: Pattern,
    pub format: Format,
    pub split_by_sensor: bool,
    pub rotation: Rotation,
    pub keep: Keep,
    pub on_finished: Option<OnFinished>,
}

/// How many completed files of this receiver stay on disk (besides those being written):
/// the oldest are deleted beyond either limit; the newest completed one always stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    pub files: Option<usize>,
    pub bytes: Option<u64>,
}

pub struct Files {
    pattern: Pattern,
    format: Format,
    rotation: Rotation,
    split_by_sensor: bool,
    series: Vec<Series>,
    /// With a file per sensor: each sensor's series, and the safe names given out.
    by_sensor: HashMap<String, usize>,
    names: HashSet<String>,
    /// For each interface: its series and its index there.
    interfaces: Vec<(usize, u32)>,
    finished: Finished,
}

impl Files {
    /// Opens the output. One file for all sensors is created now, so that a bad path is
    /// said at start; a file per sensor is created when that sensor comes.
    pub fn open(config: FileConfig) -> io::Result<Self> {
        let mut files = Self {
            pattern: config.pattern,
            format: config.format,
            rotation: config.rotation,
            split_by_sensor: config.split_by_sensor,
            series: Vec::new(),
            by_sensor: HashMap::new(),
            names: HashSet::new(),
            interfaces: Vec::new(),
            finished: Finished {
                on_finished: config.on_finished,
                keep: config.keep,
                kept: VecDeque::new(),
                kept_bytes: 0,
            },
        };
        if !files.split_by_sensor {
            let mut all = Series::new(&files.pattern, None, files.format, files.rotation)?;
            all.flush(&files.pattern, &mut files.finished)?;
            files.series.push(all);
        }
        Ok(files)
    }

    /// The series that takes `sensor`'s interfaces, made when the sensor first comes.
    fn series_of(&mut self, sensor: &str) -> io::Result<usize> {
        if !self.split_by_sensor {
            return Ok(0);
        }
        if let Some(&i) = self.by_sensor.get(sensor) {
            return Ok(i);
        }
        let name = naming::unique(sensor, &mut self.names);
        let series = Series::new(&self.pattern, Some(name), self.format, self.rotation)?;
        self.series.push(series);
        self.by_sensor
            .insert(sensor.to_string(), self.series.len() - 1);
        Ok(self.series.len() - 1)
    }

    fn interface(&self, interface: u32) -> io::Result<(usize, u32)> {
        self.interfaces
            .get(interface as usize)
            .copied()
            .ok_or_else(|| io::Error::other("packet of an unknown interface"))
    }
}

impl Sink for Files {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), String> {
        let Some(first) = interfaces.first() else {
            return Ok(());
        };
        let existing = if self.split_by_sensor {
            self.by_sensor.get(&first.sensor).copied()
        } else {
            Some(0)
        };
        match existing.and_then(|i| self.series.get(i)) {
            Some(series) => series.check(interfaces),
            // A sensor new to a file per sensor: as a file of its own would take it.
            None => FormatSink::new(self.format, io::sink())
                .map_err(|e| e.to_string())?
                .check(interfaces),
        }
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        let series = self.series_of(&interface.sensor)?;
        let local = self.series[series].add_interface(interface)?;
        self.interfaces.push((series, local));
        Ok(self.interfaces.len() as u32 - 1)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        let (series, interface) = self.interface(packet.interface)?;
        self.series[series].write_packet(
            &self.pattern,
            &OutPacket {
                interface,
                ..*packet
            },
        )
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        let (series, interface) = self.interface(interface)?;
        self.series[series].write_stats(interface, stats)
    }

    fn update_stats(&mut self, interface: u32, stats: &InterfaceStats) {
        if let Ok((series, interface)) = self.interface(interface) {
            self.series[series].update_stats(interface, stats);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for series in &mut self.series {
            series.flush(&self.pattern, &mut self.finished)?;
        }
        Ok(())
    }

    /// Completes every file; the first failure is returned once all were tried.
    fn finish(self: Box<Self>) -> io::Result<()> {
        let Files {
            series,
            mut finished,
            ..
        } = *self;
        let mut result = Ok(());
        for series in series {
            if let Err(e) = series.finish(&mut finished) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

/// Completed files: reported to the hook, then kept within `--keep`/`--keep-bytes`.
struct Finished {
    on_finished: Option<OnFinished>,
    keep: Keep,
    /// Completed files still on disk, oldest first, with their sizes.
    kept: VecDeque<(PathBuf, u64)>,
    kept_bytes: u64,
}

impl Finished {
    fn done(&mut self, path: PathBuf) {
        tracing::info!("completed {}", path.display());
        if let Some(hook) = &mut self.on_finished {
            hook(path.clone());
        }
        if self.keep == Keep::default() {
            return;
        }
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        self.kept.push_back((path, size));
        self.kept_bytes += size;
        while self.kept.len() > 1 && self.over_limit() {
            let Some((old, size)) = self.kept.pop_front() else {
                break;
            };
            self.kept_bytes -= size;
            match std::fs::remove_file(&old) {
                Ok(()) => tracing::info!("deleted {} (beyond --keep)", old.display()),
                Err(e) => tracing::warn!("cannot delete {}: {e}", old.display()),
            }
        }
    }

    fn over_limit(&self) -> bool {
        self.keep.files.is_some_and(|n| self.kept.len() > n)
            || self.keep.bytes.is_some_and(|b| self.kept_bytes > b)
    }
}
