//! The file output: one file of all sensors, or one per sensor (`--split-by sensor`), per
//! process or per container (`--split-by process|container`, chosen packet by packet), each
//! optionally rotated by size or age, names from a strftime pattern, old files deleted
//! beyond `--keep`/`--keep-bytes`, and every completed file handed to `on_finished`.
//!
//! Sensors are acknowledged only once their packets are flushed to a file: a rotated-out
//! file is completed in memory and written, closed and reported at the next flush, before
//! the file that follows it.

mod committed;
mod existing;
pub mod journal;
pub mod naming;
mod series;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use protocol::InterfaceStats;

use self::journal::{Extent, Journal};
use self::naming::Pattern;
pub use self::series::Rotation;
use self::series::Series;
use super::{FormatSink, Frontier, OutPacket, Refusal, Sink, SinkInterface};
use crate::sink::Format;

/// Called with each file once it is complete and closed: rotated out, or the last at exit.
/// It runs on the writer task, so it must return at once (hand the path to a queue or a
/// task, e.g. the uploader's channel with `try_send`).
pub type OnFinished = Box<dyn FnMut(PathBuf) + Send>;

/// Whether a completed file is still in use elsewhere (being uploaded): retention leaves
/// it, and deletes it at a later pass once it is free.
pub type InUse = Box<dyn Fn(&Path) -> bool + Send>;

/// What `--split-by` keeps apart, each in files of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitBy {
    /// One file per sensor.
    Sensor,
    /// One file per process (sensors run with --attribute): its sensor, name and pid;
    /// packets of no known process in the file "unattributed".
    Process,
    /// One file per container (sensors run with --attribute), by container id; processes
    /// in no container in "no-container", packets of no known process in "unattributed".
    Container,
}

/// What the file output writes and keeps.
pub struct FileConfig {
    pub pattern: Pattern,
    pub format: Format,
    pub split_by: Option<SplitBy>,
    pub rotation: Rotation,
    pub keep: Keep,
    pub on_finished: Option<OnFinished>,
    pub in_use: Option<InUse>,
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
    split_by: Option<SplitBy>,
    /// `None` where a file per sensor was closed, its sensor gone.
    series: Vec<Option<Series>>,
    /// With a file per sensor: each sensor's series, and the safe names given out (to
    /// sensors with a file open).
    by_sensor: HashMap<String, usize>,
    names: HashSet<String>,
    /// For each interface: its series and its index there.
    interfaces: Vec<(usize, u32)>,
    finished: Finished,
    journal: Journal,
    /// What the journal an earlier run left says, until the writer takes it.
    recovered: Vec<Frontier>,
    /// The extents of the flush under way, kept for their allocation.
    extents: Vec<Extent>,
    /// Slots of `series` free again.
    free: Vec<usize>,
    /// With `--split-by process|container`: which file each packet goes to.
    per_packet: PerPacket,
}

/// Files of their own open at once with `--split-by`: with `sensor`, a sensor beyond them
/// is refused until one leaves; with `process` or `container`, the packets of one more go
/// to a shared file ("more-processes", "more-containers"), counted, until one is closed.
/// So no number of names exhausts the descriptors.
pub const MAX_OPEN_FILES: usize = 512;

/// With `--split-by process|container`, a file that took no packet for this long is
/// completed and closed (a process that comes back goes on in it, in a new section).
const IDLE_FILE: Duration = Duration::from_secs(60);

/// Packets written to the shared "more-processes" or "more-containers" file because
/// [`MAX_OPEN_FILES`] files of their own were open.
pub static SPLIT_OVERFLOW: AtomicU64 = AtomicU64::new(0);

/// Whose file a packet goes to with `--split-by process|container`. Fixed-size, so that
/// finding a packet's file allocates nothing: names longer than these (never from a sensor's
/// kernel: names have 15 bytes, container ids 64) are cut.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum FileKey {
    Process {
        sensor: u32,
        pid: u32,
        comm: [u8; 16],
    },
    Container([u8; 64]),
    NoContainer,
    Unattributed,
    /// The shared file of the processes or containers beyond [`MAX_OPEN_FILES`].
    More,
}

fn cut<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = text.len().min(N);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

/// `--split-by process|container`: the interfaces, described in a file when its first
/// packet of them comes, and the files by key.
#[derive(Default)]
struct PerPacket {
    /// Each interface added (`None` once closed) and its sensor's number.
    interfaces: Vec<(Option<SinkInterface>, u32)>,
    sensors: HashMap<String, u32>,
    files: HashMap<FileKey, usize>,
    /// (series, interface) → the interface's index in that series.
    local: HashMap<(usize, u32), u32>,
    /// Each interface's (series, index there), for what goes to every file holding it.
    holders: Vec<Vec<(usize, u32)>>,
}

impl Files {
    /// Opens the output. An earlier run's journal is applied first (files cut back to the
    /// last complete write). One file for all sensors is created (or continued) now, so
    /// that a bad path is said at start; a file per sensor when that sensor comes.
    pub fn open(config: FileConfig) -> io::Result<Self> {
        let (journal, recovered) = Journal::open(config.pattern.journal_path())?;
        let mut files = Self {
            pattern: config.pattern,
            format: config.format,
            rotation: config.rotation,
            split_by: config.split_by,
            series: Vec::new(),
            by_sensor: HashMap::new(),
            names: HashSet::new(),
            interfaces: Vec::new(),
            finished: Finished {
                on_finished: config.on_finished,
                in_use: config.in_use,
                keep: config.keep,
                kept: VecDeque::new(),
                kept_bytes: 0,
            },
            journal,
            recovered,
            extents: Vec::new(),
            free: Vec::new(),
            per_packet: PerPacket::default(),
        };
        if files.split_by.is_none() {
            let mut all = Series::new(&files.pattern, None, files.format, files.rotation)?;
            all.flush(&files.pattern, &mut files.finished)?;
            files.series.push(Some(all));
        }
        Ok(files)
    }

    fn series_mut(&mut self, index: usize) -> io::Result<&mut Series> {
        self.series
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or_else(|| io::Error::other("packet of a closed file"))
    }

    /// With a file per sensor, completes the files whose sensors are all gone (a sensor
    /// that comes back continues its file, or starts a new one when rotating): open files
    /// are as many as sensors connected, never one per sensor ever seen.
    fn close_idle_series(&mut self) -> io::Result<()> {
        if self.split_by.is_none() {
            return Ok(());
        }
        let per_packet = self.per_packet();
        for index in 0..self.series.len() {
            let Some(series) = self.series[index].as_mut() else {
                continue;
            };
            if !(series.is_idle() || (per_packet && series.idle_for() >= IDLE_FILE)) {
                continue;
            }
            // Written whole first, while it can still be retried; then closed and reported.
            series.complete_and_flush(&self.pattern, &mut self.finished)?;
            let Some(series) = self.series[index].take() else {
                continue;
            };
            if let Some(name) = series.sensor_name() {
                self.names.remove(name);
            }
            self.by_sensor.retain(|_, i| *i != index);
            self.per_packet.forget(index);
            self.free.push(index);
            series.finish(&mut self.finished)?;
        }
        Ok(())
    }

    fn per_packet(&self) -> bool {
        matches!(self.split_by, Some(SplitBy::Process | SplitBy::Container))
    }

    /// The series that takes `sensor`'s interfaces, made when the sensor first comes.
    fn series_of(&mut self, sensor: &str) -> io::Result<usize> {
        if self.split_by != Some(SplitBy::Sensor) {
            return Ok(0);
        }
        if let Some(&i) = self.by_sensor.get(sensor) {
            return Ok(i);
        }
        let index = self.new_series(sensor)?;
        self.by_sensor.insert(sensor.to_string(), index);
        Ok(index)
    }

    /// A series of its own for `name` (made safe and unique), in a free slot.
    fn new_series(&mut self, name: &str) -> io::Result<usize> {
        let name = naming::unique(&program::names::clean(name), &mut self.names);
        let series = match Series::new(
            &self.pattern,
            Some(name.clone()),
            self.format,
            self.rotation,
        ) {
            Ok(series) => series,
            Err(e) => {
                self.names.remove(&name);
                return Err(e);
            }
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.series[index] = Some(series);
                index
            }
            None => {
                self.series.push(Some(series));
                self.series.len() - 1
            }
        };
        Ok(index)
    }

    /// `--split-by process|container`: the series of a packet's file, made when its
    /// first packet comes (the shared one beyond [`MAX_OPEN_FILES`]), and the packet's
    /// interface there, described when the file's first packet of it comes.
    fn file_of(&mut self, packet: &OutPacket) -> io::Result<(usize, u32)> {
        let global = packet.interface;
        let sensor = self
            .per_packet
            .interfaces
            .get(global as usize)
            .map(|(_, sensor)| *sensor)
            .ok_or_else(|| io::Error::other("packet of an unknown interface"))?;
        let key = match (self.split_by, packet.process) {
            (_, None) => FileKey::Unattributed,
            (Some(SplitBy::Container), Some(a)) if a.process.container_id.is_empty() => {
                FileKey::NoContainer
            }
            (Some(SplitBy::Container), Some(a)) => FileKey::Container(cut(&a.process.container_id)),
            (_, Some(a)) => FileKey::Process {
                sensor,
                pid: a.process.pid,
                comm: cut(&a.process.thread_name),
            },
        };
        let series = match self.per_packet.files.get(&key) {
            Some(&series) => series,
            None => self.open_file(key, packet)?,
        };
        if let Some(&local) = self.per_packet.local.get(&(series, global)) {
            return Ok((series, local));
        }
        let interface = self.per_packet.interfaces[global as usize]
            .0
            .clone()
            .ok_or_else(|| io::Error::other("packet of a closed interface"))?;
        let local = self.series_mut(series)?.add_interface(&interface)?;
        self.per_packet.local.insert((series, global), local);
        self.per_packet.holders[global as usize].push((series, local));
        Ok((series, local))
    }

    /// Makes the file of `key`, or finds the shared one when [`MAX_OPEN_FILES`] are open.
    fn open_file(&mut self, key: FileKey, packet: &OutPacket) -> io::Result<usize> {
        let fixed = matches!(
            key,
            FileKey::NoContainer | FileKey::Unattributed | FileKey::More
        );
        if !fixed && self.per_packet.files.len() >= MAX_OPEN_FILES {
            if SPLIT_OVERFLOW.fetch_add(1, Relaxed) == 0 {
                tracing::warn!(
                    "--split-by: {MAX_OPEN_FILES} files of their own are open; the packets of \
                     more go to a shared file until one closes (idle for {}s)",
                    IDLE_FILE.as_secs()
                );
            }
            return match self.per_packet.files.get(&FileKey::More) {
                Some(&series) => Ok(series),
                None => self.open_file(FileKey::More, packet),
            };
        }
        let name = match (key, packet.process) {
            (FileKey::Process { .. }, Some(a)) => {
                let sensor = self.per_packet.interfaces[packet.interface as usize]
                    .0
                    .as_ref()
                    .map_or("", |i| i.sensor.as_str());
                format!("{sensor}-{}-{}", a.process.thread_name, a.process.pid)
            }
            (FileKey::Container(_), Some(a)) => a.process.container_id.clone(),
            (FileKey::NoContainer, _) => "no-container".into(),
            (FileKey::More, _) if self.split_by == Some(SplitBy::Container) => {
                "more-containers".into()
            }
            (FileKey::More, _) => "more-processes".into(),
            _ => "unattributed".into(),
        };
        let series = self.new_series(&name)?;
        self.per_packet.files.insert(key, series);
        Ok(series)
    }

    fn interface(&self, interface: u32) -> io::Result<(usize, u32)> {
        self.interfaces
            .get(interface as usize)
            .copied()
            .ok_or_else(|| io::Error::other("packet of an unknown interface"))
    }

    /// The (series, index there) of every file that holds the interface: its one file,
    /// or with `--split-by process|container` those its packets went to so far.
    fn holders(&self, interface: u32) -> io::Result<Vec<(usize, u32)>> {
        if self.per_packet() {
            return self
                .per_packet
                .holders
                .get(interface as usize)
                .cloned()
                .ok_or_else(|| io::Error::other("an unknown interface"));
        }
        self.interface(interface).map(|held| vec![held])
    }
}

impl PerPacket {
    fn add_interface(&mut self, interface: &SinkInterface) -> u32 {
        let next = self.sensors.len() as u32;
        let sensor = *self.sensors.entry(interface.sensor.clone()).or_insert(next);
        self.interfaces.push((Some(interface.clone()), sensor));
        self.holders.push(Vec::new());
        self.interfaces.len() as u32 - 1
    }

    /// The series in slot `index` is closed: its key and interfaces are forgotten.
    fn forget(&mut self, index: usize) {
        self.files.retain(|_, i| *i != index);
        self.local.retain(|(series, _), _| *series != index);
        for holders in &mut self.holders {
            holders.retain(|(series, _)| *series != index);
        }
    }
}

impl Sink for Files {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        let Some(first) = interfaces.first() else {
            return Ok(());
        };
        let existing = match self.split_by {
            None => Some(0),
            Some(SplitBy::Sensor) => self.by_sensor.get(&first.sensor).copied(),
            // Each file describes an interface when its first packet of it comes.
            Some(SplitBy::Process | SplitBy::Container) => None,
        };
        match existing
            .and_then(|i| self.series.get(i))
            .and_then(Option::as_ref)
        {
            Some(series) => series.check(interfaces),
            None if !self.per_packet() && self.by_sensor.len() >= MAX_OPEN_FILES => {
                Err(Refusal::Full(format!(
                "{MAX_OPEN_FILES} sensors have a file of their own open already, the most this \
                 receiver keeps open; try again once one has left"
            )))
            }
            // A sensor new to a file per sensor: as a file of its own would take it.
            None => FormatSink::new(self.format, io::sink())
                .map_err(|e| Refusal::Full(e.to_string()))?
                .check(interfaces),
        }
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        if self.per_packet() {
            return Ok(self.per_packet.add_interface(interface));
        }
        let series = self.series_of(&interface.sensor)?;
        let local = self.series_mut(series)?.add_interface(interface)?;
        self.interfaces.push((series, local));
        Ok(self.interfaces.len() as u32 - 1)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        let (series, interface) = if self.per_packet() {
            self.file_of(packet)?
        } else {
            self.interface(packet.interface)?
        };
        let pattern = &self.pattern;
        let series = self
            .series
            .get_mut(series)
            .and_then(Option::as_mut)
            .ok_or_else(|| io::Error::other("packet of a closed file"))?;
        series.write_packet(
            pattern,
            &OutPacket {
                interface,
                ..*packet
            },
        )
    }

    /// With `--split-by process|container`, to the files that hold the interface so far.
    fn write_secrets(&mut self, interface: u32, lines: &[u8]) -> io::Result<bool> {
        let mut kept = false;
        for (series, interface) in self.holders(interface)? {
            kept |= self.series_mut(series)?.write_secrets(interface, lines)?;
        }
        Ok(kept)
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        for (series, interface) in self.holders(interface)? {
            self.series_mut(series)?.write_stats(interface, stats)?;
        }
        Ok(())
    }

    fn update_stats(&mut self, interface: u32, stats: &InterfaceStats) {
        for (series, interface) in self.holders(interface).unwrap_or_default() {
            if let Ok(series) = self.series_mut(series) {
                series.update_stats(interface, stats);
            }
        }
    }

    fn close_interfaces(&mut self, interfaces: &[u32]) {
        for &interface in interfaces {
            for (series, local) in self.holders(interface).unwrap_or_default() {
                if let Ok(series) = self.series_mut(series) {
                    series.close_interface(local);
                }
            }
            if let Some((slot, _)) = self.per_packet.interfaces.get_mut(interface as usize) {
                *slot = None;
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for series in self.series.iter_mut().flatten() {
            series.flush(&self.pattern, &mut self.finished)?;
        }
        self.journal.committed();
        self.close_idle_series()
    }

    fn flush_journaled(
        &mut self,
        frontiers: &mut dyn FnMut(&mut Vec<Frontier>),
    ) -> io::Result<bool> {
        self.extents.clear();
        for series in self.series.iter_mut().flatten() {
            series.rotate_if_due(&self.pattern)?;
            series.extents(&mut self.extents)?;
        }
        let wrote = !self.extents.is_empty();
        if wrote {
            self.journal.record(&self.extents, frontiers)?;
        }
        self.flush()?;
        Ok(wrote)
    }

    fn close_journal(&mut self, frontiers: &mut dyn FnMut(&mut Vec<Frontier>)) -> io::Result<()> {
        self.journal.close(frontiers)
    }

    fn take_recovered(&mut self) -> Vec<Frontier> {
        std::mem::take(&mut self.recovered)
    }

    /// Completes every file; the first failure is returned once all were tried.
    fn finish(self: Box<Self>) -> io::Result<()> {
        let Files {
            series,
            mut finished,
            ..
        } = *self;
        let mut result = Ok(());
        for series in series.into_iter().flatten() {
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
    in_use: Option<InUse>,
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
        // Oldest first; the newest always stays, and so does a file still in use.
        let mut next = 0;
        while next + 1 < self.kept.len() && self.over_limit() {
            let in_use = self
                .in_use
                .as_ref()
                .is_some_and(|in_use| in_use(&self.kept[next].0));
            if in_use {
                next += 1;
                continue;
            }
            let Some((old, size)) = self.kept.remove(next) else {
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use pcap_file::pcapng::{Block, PcapNgReader};
    use protocol::{Direction, DropReason};

    use super::*;

    /// A scratch directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(label: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("capstream-files-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn iface(sensor: &str) -> SinkInterface {
        SinkInterface {
            name: format!("{sensor}/eth0"),
            link_type: 1,
            snaplen: 262_144,
            filter: String::new(),
            description: String::new(),
            sensor: sensor.into(),
            session: "0a1b2c3d".into(),
            session_id: 0x0a1b_2c3d,
        }
    }

    fn stats() -> InterfaceStats {
        InterfaceStats {
            interface_id: 0,
            seen: 100,
            matched: 90,
            delivered: 80,
            drops: vec![(DropReason::KERNEL_BUFFER, 3)],
        }
    }

    fn open_format(out: &Path, format: Format) -> Box<Files> {
        Box::new(
            Files::open(FileConfig {
                pattern: Pattern::parse(out, None).unwrap(),
                format,
                split_by: None,
                rotation: Rotation::default(),
                keep: Keep::default(),
                on_finished: None,
                in_use: None,
            })
            .unwrap(),
        )
    }

    fn pcap_times(path: &Path) -> Vec<u64> {
        let bytes = std::fs::read(path).unwrap();
        let mut reader = pcap_file::pcap::PcapReader::new(&bytes[..]).unwrap();
        let mut times = Vec::new();
        while let Some(p) = reader.next_packet() {
            times.push(p.unwrap().timestamp().as_nanos() as u64);
        }
        times
    }

    /// A restart goes on where the last run's file ended (torn end cut), never over it.
    #[test]
    fn a_restart_continues_the_file() {
        let dir = Dir::new("continue");
        for format in [Format::Pcap, Format::Pcapng] {
            let out = dir.0.join(format!("cap.{format:?}"));
            let mut files = open_format(&out, format);
            let a = files.add_interface(&iface("a")).unwrap();
            write(&mut files, a, 1);
            write(&mut files, a, 2);
            files.finish().unwrap();
            // A torn last record, as a crash mid-write leaves: its start.
            let first_run = std::fs::read(&out).unwrap();
            let mut record = Vec::new();
            let mut sink = FormatSink::new(format, &mut record).unwrap();
            sink.add_interface(&iface("a")).unwrap();
            let header_len = sink.output().len();
            write_to(&mut sink, 0, 9);
            drop(sink);
            std::fs::OpenOptions::new()
                .append(true)
                .open(&out)
                .unwrap()
                .write_all(&record[header_len..header_len + 30])
                .unwrap();
            let mut files = open_format(&out, format);
            let now = std::fs::read(&out).unwrap();
            assert!(now.starts_with(&first_run), "{format:?}");
            let torn = &record[header_len..header_len + 30];
            assert!(
                !now[first_run.len()..].starts_with(torn),
                "{format:?}: torn end cut"
            );
            let b = files.add_interface(&iface("b")).unwrap();
            write(&mut files, b, 3);
            files.finish().unwrap();
            let times = match format {
                Format::Pcap => pcap_times(&out),
                Format::Pcapng => read(&out).1,
            };
            assert_eq!(times, [1, 2, 3], "{format:?}");
            let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{format:?}");
        }
        // Two sections: each describes its interface.
        assert_eq!(read(&dir.0.join("cap.Pcapng")).0, 2);
    }

    /// A pcap file keeps its link type: a sensor of another is refused, not mixed in.
    #[test]
    fn a_continued_pcap_file_keeps_its_link_type() {
        let dir = Dir::new("linktype");
        let out = dir.0.join("cap.pcap");
        let mut files = open_format(&out, Format::Pcap);
        files.add_interface(&iface("a")).unwrap();
        files.finish().unwrap();
        let files = open_format(&out, Format::Pcap);
        let mut other = iface("b");
        other.link_type = 276;
        assert!(files.check(&[other]).is_err());
        assert!(files.check(&[iface("c")]).is_ok());
    }

    /// What it cannot continue (another format, precision, garbage, a symlink) stays as
    /// it is; the output goes beside it.
    #[test]
    fn what_cannot_be_continued_is_left_and_written_beside() {
        let dir = Dir::new("beside");
        let target = dir.0.join("target");
        std::fs::write(&target, b"not yours").unwrap();
        let out = dir.0.join("cap.pcap");
        let mut micro = Vec::new();
        crate::sink::pcap::write_header(&mut micro, 1, crate::sink::Precision::Micro).unwrap();
        for existing in [b"garbage that is no capture".to_vec(), micro] {
            std::fs::write(&out, &existing).unwrap();
            let mut files = open_format(&out, Format::Pcap);
            let a = files.add_interface(&iface("a")).unwrap();
            write(&mut files, a, 1);
            files.finish().unwrap();
            assert_eq!(std::fs::read(&out).unwrap(), existing);
            assert_eq!(pcap_times(&dir.0.join("cap-1.pcap")), [1]);
            std::fs::remove_file(dir.0.join("cap-1.pcap")).unwrap();
        }
        std::fs::remove_file(&out).unwrap();
        std::os::unix::fs::symlink(&target, &out).unwrap();
        let mut files = open_format(&out, Format::Pcapng);
        let a = files.add_interface(&iface("a")).unwrap();
        write(&mut files, a, 1);
        files.finish().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"not yours");
        assert_eq!(read(&dir.0.join("cap-1.pcap")).1, [1]);
    }

    fn rotating_at(size: u64) -> Rotation {
        Rotation {
            size: Some(size),
            every: None,
        }
    }

    /// Files with a hook that records what it is handed.
    fn open(
        out: &Path,
        split: bool,
        rotation: Rotation,
        keep: Keep,
    ) -> (Box<Files>, Arc<Mutex<Vec<PathBuf>>>) {
        let split_by = split.then_some(SplitBy::Sensor);
        open_with(out, split_by, rotation, keep, None)
    }

    fn open_with(
        out: &Path,
        split_by: Option<SplitBy>,
        rotation: Rotation,
        keep: Keep,
        in_use: Option<InUse>,
    ) -> (Box<Files>, Arc<Mutex<Vec<PathBuf>>>) {
        let reported = Arc::new(Mutex::new(Vec::new()));
        let hook = Arc::clone(&reported);
        let files = Files::open(FileConfig {
            pattern: Pattern::parse(out, split_by).unwrap(),
            format: Format::Pcapng,
            split_by,
            rotation,
            keep,
            on_finished: Some(Box::new(move |p| hook.lock().unwrap().push(p))),
            in_use,
        })
        .unwrap();
        (Box::new(files), reported)
    }

    fn write(files: &mut Files, interface: u32, timestamp_ns: u64) {
        write_to(files, interface, timestamp_ns);
    }

    fn write_to(sink: &mut dyn Sink, interface: u32, timestamp_ns: u64) {
        sink.write_packet(&OutPacket {
            interface,
            timestamp_ns,
            original_len: 200,
            direction: Direction::Inbound,
            data: &[7u8; 200],
            batch: Default::default(),
            process: None,
        })
        .unwrap();
    }

    /// (interface names, packet timestamps, statistics blocks, whether they all come after
    /// the last packet) of a pcapng file.
    fn read(path: &Path) -> (usize, Vec<u64>, usize, bool) {
        let bytes = std::fs::read(path).unwrap();
        let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
        let (mut idbs, mut times, mut isbs, mut stats_last) = (0, Vec::new(), 0, true);
        while let Some(block) = reader.next_block() {
            match block.unwrap().0 {
                Block::InterfaceDescription(_) => idbs += 1,
                Block::EnhancedPacket(epb) => {
                    times.push(epb.timestamp.as_nanos() as u64);
                    stats_last &= isbs == 0;
                }
                Block::InterfaceStatistics(_) => isbs += 1,
                _ => {}
            }
        }
        (idbs, times, isbs, stats_last)
    }

    #[test]
    fn rotated_files_are_complete_on_their_own_and_reported_in_order() {
        let dir = Dir::new("rotate");
        let rotation = rotating_at(2_000);
        let (mut files, reported) =
            open(&dir.0.join("cap.pcapng"), false, rotation, Keep::default());
        let a = files.add_interface(&iface("a")).unwrap();
        let b = files.add_interface(&iface("b")).unwrap();
        files.update_stats(a, &stats());
        for t in 0..40u64 {
            write(&mut files, if t % 2 == 0 { a } else { b }, t);
            if t % 10 == 9 {
                files.flush().unwrap();
            }
        }
        files.write_stats(b, &stats()).unwrap();
        files.finish().unwrap();

        let reported = reported.lock().unwrap().clone();
        assert!(reported.len() >= 4, "{reported:?}");
        assert_eq!(reported[0], dir.0.join("cap.pcapng"));
        assert_eq!(reported[1], dir.0.join("cap-1.pcapng"));
        let mut all = Vec::new();
        for (i, path) in reported.iter().enumerate() {
            let (idbs, times, isbs, stats_last) = read(path);
            assert_eq!(idbs, 2, "every file describes both interfaces");
            let last = i == reported.len() - 1;
            // a's latest counters end every file; b's final ones the last.
            assert_eq!(isbs, if last { 2 } else { 1 }, "{}", path.display());
            assert!(stats_last);
            all.extend(times);
        }
        assert_eq!(
            all,
            (0..40).collect::<Vec<u64>>(),
            "no packet lost or doubled"
        );
    }

    #[test]
    fn keep_deletes_the_oldest_completed_files() {
        let dir = Dir::new("keep");
        let rotation = rotating_at(2_000);
        let keep = Keep {
            files: Some(2),
            bytes: None,
        };
        let (mut files, reported) = open(&dir.0.join("cap.pcapng"), false, rotation, keep);
        let a = files.add_interface(&iface("a")).unwrap();
        for t in 0..40u64 {
            write(&mut files, a, t);
            files.flush().unwrap();
        }
        files.finish().unwrap();
        let reported = reported.lock().unwrap().clone();
        let left: Vec<PathBuf> = reported.iter().filter(|p| p.exists()).cloned().collect();
        assert_eq!(left, reported[reported.len() - 2..]);
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 2);
    }

    /// A file still being uploaded outlives --keep until it is free; the others go first.
    #[test]
    fn keep_leaves_a_file_in_use_until_it_is_free() {
        let dir = Dir::new("keep-in-use");
        let rotation = rotating_at(2_000);
        let keep = Keep {
            files: Some(1),
            bytes: None,
        };
        let uploading: Arc<Mutex<Option<PathBuf>>> = Arc::new(Mutex::new(None));
        let pinned = Arc::clone(&uploading);
        let in_use: InUse = Box::new(move |p| {
            let mut first = pinned.lock().unwrap();
            // The first file asked about stays in use until the test frees it.
            first.get_or_insert_with(|| p.to_path_buf()) == p
        });
        let out = dir.0.join("cap.pcapng");
        let (mut files, reported) = open_with(&out, None, rotation, keep, Some(in_use));
        let a = files.add_interface(&iface("a")).unwrap();
        for t in 0..40u64 {
            write(&mut files, a, t);
            files.flush().unwrap();
        }
        let first = reported.lock().unwrap()[0].clone();
        assert!(reported.lock().unwrap().len() >= 3);
        assert!(first.exists(), "the file in use is kept");
        let others_left = reported.lock().unwrap()[1..]
            .iter()
            .filter(|p| p.exists())
            .count();
        assert_eq!(
            others_left, 1,
            "the newest completed file, besides the one in use"
        );
        // Freed: the next completed file's pass deletes it.
        *uploading.lock().unwrap() = Some(PathBuf::new());
        for t in 40..80u64 {
            write(&mut files, a, t);
            files.flush().unwrap();
        }
        assert!(!first.exists(), "deleted once no longer in use");
        files.finish().unwrap();
    }

    #[test]
    fn time_rotation_waits_for_packets() {
        let dir = Dir::new("time");
        let rotation = Rotation {
            size: None,
            every: Some(Duration::from_millis(50)),
        };
        let (mut files, reported) = open(&dir.0.join("t.pcapng"), false, rotation, Keep::default());
        let a = files.add_interface(&iface("a")).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        files.flush().unwrap();
        assert!(
            reported.lock().unwrap().is_empty(),
            "an empty file is not rotated"
        );
        write(&mut files, a, 1);
        files.flush().unwrap();
        assert_eq!(reported.lock().unwrap().len(), 1);
        files.finish().unwrap();
        assert_eq!(reported.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_file_per_sensor_rotates_on_its_own() {
        let dir = Dir::new("splitrotate");
        let rotation = rotating_at(2_000);
        let out = dir.0.join("{sensor}-%Y.pcapng");
        let (mut files, reported) = open(&out, true, rotation, Keep::default());
        let a = files.add_interface(&iface("a")).unwrap();
        let b = files.add_interface(&iface("b")).unwrap();
        for t in 0..30u64 {
            write(&mut files, a, t);
            if t % 3 == 0 {
                write(&mut files, b, t);
            }
        }
        files.finish().unwrap();
        let reported = reported.lock().unwrap().clone();
        let of = |sensor: &str| -> Vec<u64> {
            reported
                .iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(sensor))
                .flat_map(|p| read(p).1)
                .collect()
        };
        assert_eq!(of("a-"), (0..30).collect::<Vec<u64>>());
        assert_eq!(of("b-"), (0..30).step_by(3).collect::<Vec<u64>>());
        assert!(reported.len() > 4, "both rotated: {reported:?}");
    }

    /// A file never rotated whose pcapng interface blocks reach the cap goes on in a new
    /// section describing only the interfaces still open: no sensor is refused for the
    /// interfaces of sessions gone, and packets of an open one go on in the new section.
    #[test]
    fn a_full_file_goes_on_in_a_section_of_the_open_interfaces() {
        let dir = Dir::new("sections");
        let out = dir.0.join("cap.pcapng");
        let (mut files, _) = open(&out, false, Rotation::default(), Keep::default());
        let kept = files.add_interface(&iface("kept")).unwrap();
        let gone: Vec<u32> = (1..crate::sink::pcapng::MAX_INTERFACES)
            .map(|_| files.add_interface(&iface("gone")).unwrap())
            .collect();
        write(&mut files, kept, 1);
        assert!(
            files.check(&[iface("new")]).is_err(),
            "every interface is open: full"
        );
        files.close_interfaces(&gone);
        assert!(files.check(&[iface("new")]).is_ok());
        let new = files.add_interface(&iface("new")).unwrap();
        write(&mut files, kept, 2);
        write(&mut files, new, 3);
        files.finish().unwrap();
        let (idbs, times, _, _) = read(&out);
        assert_eq!(times, [1, 2, 3], "no packet lost across the sections");
        assert_eq!(
            idbs,
            crate::sink::pcapng::MAX_INTERFACES + 2,
            "the new section describes the open interface and the new one only"
        );
        let sections = std::fs::read(&out)
            .unwrap()
            .windows(4)
            .filter(|w| *w == [0x0a, 0x0d, 0x0d, 0x0a])
            .count();
        assert!(sections >= 2, "{sections} section header(s)");
    }

    #[test]
    fn a_file_per_sensor() {
        let dir = Dir::new("split");
        let (mut files, reported) = open(
            &dir.0.join("cap.pcapng"),
            true,
            Rotation::default(),
            Keep::default(),
        );
        assert!(files.check(&[iface("../../x")]).is_ok());
        let x = files.add_interface(&iface("../../x")).unwrap();
        let y = files.add_interface(&iface("y")).unwrap();
        let x2 = files.add_interface(&iface("../../x")).unwrap();
        write(&mut files, x, 1);
        write(&mut files, y, 2);
        write(&mut files, x2, 3);
        files.finish().unwrap();
        let mut reported = reported.lock().unwrap().clone();
        reported.sort();
        assert_eq!(
            reported,
            [dir.0.join("cap-_._.__x.pcapng"), dir.0.join("cap-y.pcapng")]
        );
        let (idbs, times, _, _) = read(&reported[0]);
        assert_eq!((idbs, times), (2, vec![1, 3]));
        let (idbs, times, _, _) = read(&reported[1]);
        assert_eq!((idbs, times), (1, vec![2]));
    }

    /// Files split packet by packet, neither rotated nor pruned.
    fn open_split(out: &Path, by: SplitBy) -> (Box<Files>, Arc<Mutex<Vec<PathBuf>>>) {
        open_with(out, Some(by), Rotation::default(), Keep::default(), None)
    }

    fn attribution(pid: u32, comm: &str, container: &str) -> protocol::Attribution {
        protocol::Attribution::new(protocol::Process {
            pid,
            thread_name: comm.into(),
            container_id: container.into(),
            ..protocol::Process::default()
        })
    }

    fn write_of(
        files: &mut Files,
        interface: u32,
        t: u64,
        process: Option<&protocol::Attribution>,
    ) {
        files
            .write_packet(&OutPacket {
                interface,
                timestamp_ns: t,
                original_len: 200,
                direction: Direction::Inbound,
                data: &[7u8; 200],
                process,
                batch: Default::default(),
            })
            .unwrap();
    }

    /// `--split-by process`: a file per sensor, name and pid, describing only the
    /// interfaces of its packets; the rest in "unattributed"; a file per container with
    /// `--split-by container`, processes in none in "no-container".
    #[test]
    fn a_file_per_process_or_container() {
        let dir = Dir::new("per-process");
        let curl = attribution(41, "curl", "");
        let curl_again = attribution(42, "curl", "");
        let boxed = attribution(7, "nginx", &"ab".repeat(32));
        let (mut files, reported) = open_split(&dir.0.join("cap.pcapng"), SplitBy::Process);
        let a = files.add_interface(&iface("a")).unwrap();
        let b = files.add_interface(&iface("b")).unwrap();
        write_of(&mut files, a, 1, Some(&curl));
        write_of(&mut files, a, 2, None);
        write_of(&mut files, b, 3, Some(&curl));
        write_of(&mut files, a, 4, Some(&curl_again));
        write_of(&mut files, a, 5, Some(&curl));
        write_of(&mut files, b, 6, Some(&boxed));
        files.write_stats(a, &stats()).unwrap();
        files.finish().unwrap();
        let mut reported = reported.lock().unwrap().clone();
        reported.sort();
        let names: Vec<String> = reported
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "cap-a-curl-41.pcapng",
                "cap-a-curl-42.pcapng",
                "cap-b-curl-41.pcapng",
                "cap-b-nginx-7.pcapng",
                "cap-unattributed.pcapng"
            ]
        );
        let (idbs, times, isbs, _) = read(&reported[0]);
        assert_eq!((idbs, times, isbs), (1, vec![1, 5], 1));
        assert_eq!(read(&reported[1]).1, [4]);
        assert_eq!(read(&reported[2]).1, [3]);
        assert_eq!(read(&reported[4]).1, [2]);

        let dir = Dir::new("per-container");
        let (mut files, reported) =
            open_split(&dir.0.join("{container}.pcapng"), SplitBy::Container);
        let a = files.add_interface(&iface("a")).unwrap();
        write_of(&mut files, a, 1, Some(&boxed));
        write_of(&mut files, a, 2, Some(&curl));
        write_of(&mut files, a, 3, None);
        write_of(&mut files, a, 4, Some(&boxed));
        files.finish().unwrap();
        let reported = reported.lock().unwrap().clone();
        let times = |name: &str| read(&dir.0.join(name)).1;
        assert_eq!(reported.len(), 3);
        assert_eq!(times(&format!("{}.pcapng", "ab".repeat(32))), [1, 4]);
        assert_eq!(times("no-container.pcapng"), [2]);
        assert_eq!(times("unattributed.pcapng"), [3]);
    }

    /// Past [`MAX_OPEN_FILES`] processes at once, the packets of more go to the shared
    /// "more-processes" file, counted; nothing is lost.
    #[test]
    fn files_per_process_are_capped() {
        let dir = Dir::new("per-process-cap");
        let (mut files, _) = open_split(&dir.0.join("cap.pcapng"), SplitBy::Process);
        let a = files.add_interface(&iface("a")).unwrap();
        let before = SPLIT_OVERFLOW.load(Relaxed);
        for pid in 0..MAX_OPEN_FILES as u32 + 3 {
            write_of(
                &mut files,
                a,
                u64::from(pid),
                Some(&attribution(pid, "p", "")),
            );
        }
        assert_eq!(files.series.iter().flatten().count(), MAX_OPEN_FILES + 1);
        files.finish().unwrap();
        assert_eq!(read(&dir.0.join("cap-more-processes.pcapng")).1.len(), 3);
        assert!(SPLIT_OVERFLOW.load(Relaxed) - before >= 3);
    }

    /// A closed session's interfaces are not repeated into the files rotation starts.
    #[test]
    fn rotation_drops_the_interfaces_of_closed_sessions() {
        let dir = Dir::new("dropidb");
        let rotation = rotating_at(2_000);
        let (mut files, reported) =
            open(&dir.0.join("cap.pcapng"), false, rotation, Keep::default());
        let a = files.add_interface(&iface("a")).unwrap();
        let b = files.add_interface(&iface("b")).unwrap();
        write(&mut files, b, 0);
        files.close_interfaces(&[b]);
        for t in 1..40u64 {
            write(&mut files, a, t);
        }
        files.finish().unwrap();
        let reported = reported.lock().unwrap().clone();
        assert!(reported.len() >= 3, "{reported:?}");
        assert_eq!(read(&reported[0]).0, 2);
        for later in &reported[1..] {
            assert_eq!(read(later).0, 1, "{}: only a's", later.display());
        }
    }

    /// Interface blocks larger than the rotation size do not make a file per packet.
    #[test]
    fn interface_blocks_past_the_size_do_not_rotate_every_packet() {
        let dir = Dir::new("storm");
        let rotation = rotating_at(64 * 1024);
        let (mut files, reported) =
            open(&dir.0.join("cap.pcapng"), false, rotation, Keep::default());
        let mut big = iface("a");
        big.filter = "x".repeat(16 * 1024);
        let ids: Vec<u32> = (0..8).map(|_| files.add_interface(&big).unwrap()).collect();
        for t in 0..400u64 {
            write(&mut files, ids[0], t);
        }
        files.finish().unwrap();
        let reported = reported.lock().unwrap().clone();
        // 128 KiB of interface blocks per file, 80 KB of packets: at most a file per
        // 128 KiB of packets, not one per packet.
        assert!(reported.len() <= 2, "{} files", reported.len());
        let packets: usize = reported.iter().map(|p| read(p).1.len()).sum();
        assert_eq!(packets, 400);
    }

    /// With a file per sensor, a sensor's file is completed once its sessions are gone, so
    /// 1,000 sensors coming and going never hold 1,000 files open; and no more than
    /// [`MAX_OPEN_FILES`] sensors have one open at once.
    #[test]
    fn files_per_sensor_are_closed_when_their_sensor_leaves_and_capped() {
        let dir = Dir::new("lru");
        let out = dir.0.join("cap.pcapng");
        let (mut files, reported) = open(&out, true, Rotation::default(), Keep::default());
        for n in 0..1000 {
            let name = format!("s{n}");
            let i = files.add_interface(&iface(&name)).unwrap();
            write(&mut files, i, n);
            files.flush().unwrap();
            files.close_interfaces(&[i]);
            files.flush().unwrap();
            assert!(files.series.iter().flatten().count() <= 1);
        }
        assert_eq!(reported.lock().unwrap().len(), 1000);
        assert!(files.names.is_empty() && files.by_sensor.is_empty());
        // The same sensor again: its file goes on (a new section).
        let i = files.add_interface(&iface("s7")).unwrap();
        write(&mut files, i, 5000);
        for n in 0..MAX_OPEN_FILES {
            files.add_interface(&iface(&format!("live{n}"))).unwrap();
        }
        assert!(files.check(&[iface("one-more")]).is_err());
        assert!(files.check(&[iface("s7")]).is_ok(), "one with a file open");
        files.finish().unwrap();
        assert_eq!(read(&dir.0.join("cap-s7.pcapng")).1, [7, 5000]);
    }
}
