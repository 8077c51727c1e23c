//! One series of files: the output of all sensors, or of one with `--split-by sensor`. It
//! writes one file at a time and, when rotating, completes it and starts the next.

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use protocol::InterfaceStats;
use time::OffsetDateTime;

use super::committed::Committed;
use super::existing::{self, Found};
use super::journal::Extent;
use super::naming::Pattern;
use super::Finished;
use crate::sink::pcapng::MAX_INTERFACES as PCAPNG_MAX_INTERFACES;
use crate::sink::Format;
use crate::sink::{FormatSink, OutPacket, Refusal, Sink, SinkInterface};

/// When a file is complete and the next begins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Before a packet is written to a file this large or larger (as tcpdump -C).
    pub size: Option<u64>,
    /// Once a file holding packets is this old.
    pub every: Option<Duration>,
}

impl Rotation {
    pub fn is_on(&self) -> bool {
        self.size.is_some() || self.every.is_some()
    }
}

/// The file being written.
struct Segment {
    sink: FormatSink<Committed>,
    /// The format's index of each of the series' interfaces.
    map: Vec<u32>,
    /// Which interfaces have their counters in this file already.
    stats_written: Vec<bool>,
    opened: Instant,
    packets: u64,
    /// Its length at its first packet: the header and interface blocks.
    start_len: u64,
}

pub struct Series {
    /// The sensor's safe name, for `{sensor}` in the pattern.
    sensor: Option<String>,
    format: Format,
    rotation: Rotation,
    /// `None` once closed (its session gone): files started after leave it out.
    interfaces: Vec<Option<SinkInterface>>,
    /// The latest counters of each interface, and the packets written of it over all files.
    stats: Vec<Option<InterfaceStats>>,
    delivered: Vec<u64>,
    /// The name the pattern gave the current file, and the counter it starts from: when
    /// the next name is the same (no time field changed), the counter goes on from there,
    /// so names sort in the order of the files.
    named: (PathBuf, u32),
    current: Segment,
    /// Completed files whose bytes are not all flushed yet: flushed, closed and reported
    /// in order, before the current file.
    closing: Vec<Committed>,
    /// When it was last found to have taken packets ([`Series::idle_for`]), and whether it
    /// took any since.
    active: Instant,
    written_since: bool,
}

impl Series {
    pub fn new(
        pattern: &Pattern,
        sensor: Option<String>,
        format: Format,
        rotation: Rotation,
    ) -> io::Result<Self> {
        let path = pattern.path(sensor.as_deref(), OffsetDateTime::now_utc());
        // Rotated files never replace one another, nor older ones; one file for the whole
        // run goes on where an earlier run's ended.
        let current = if rotation.is_on() {
            Segment::open(path.clone(), 0, format)?
        } else {
            Segment::continue_or_beside(path.clone(), format)?
        };
        Ok(Self {
            named: (path, 0),
            sensor,
            format,
            rotation,
            interfaces: Vec::new(),
            stats: Vec::new(),
            delivered: Vec::new(),
            current,
            closing: Vec::new(),
            active: Instant::now(),
            written_since: false,
        })
    }

    pub fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        match self.current.sink.check(interfaces) {
            // A pcapng file that describes all the interfaces it may goes on in a new
            // section, which describes only those still open: full only if they alone are
            // too many.
            Err(Refusal::Full(_))
                if self.format == Format::Pcapng
                    && self.interfaces.iter().flatten().count() + interfaces.len()
                        <= PCAPNG_MAX_INTERFACES =>
            {
                Ok(())
            }
            other => other,
        }
    }

    pub fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        if let Err(Refusal::Full(_)) = self.current.sink.check(std::slice::from_ref(interface)) {
            self.new_section()?;
        }
        let idx = self.current.sink.add_interface(interface)?;
        self.current.map.push(idx);
        self.current.stats_written.push(false);
        self.interfaces.push(Some(interface.clone()));
        self.stats.push(None);
        self.delivered.push(0);
        Ok(self.interfaces.len() as u32 - 1)
    }

    /// The interface's session is gone: no packet comes for it any more.
    pub fn close_interface(&mut self, interface: u32) {
        let i = interface as usize;
        if let Some(slot) = self.interfaces.get_mut(i) {
            *slot = None;
            self.stats[i] = None;
        }
    }

    /// Whether every interface it had is closed: no one writes to it any more.
    pub fn is_idle(&self) -> bool {
        !self.interfaces.is_empty() && self.interfaces.iter().all(Option::is_none)
    }

    /// The sensor's safe name, with a file per sensor.
    pub fn sensor_name(&self) -> Option<&str> {
        self.sensor.as_deref()
    }

    /// How long it has taken no packet, as seen at each call (the flushes): no clock is
    /// read per packet.
    pub fn idle_for(&mut self) -> Duration {
        if std::mem::take(&mut self.written_since) {
            self.active = Instant::now();
        }
        self.active.elapsed()
    }

    pub fn write_packet(&mut self, pattern: &Pattern, packet: &OutPacket) -> io::Result<()> {
        if let Some(size) = self.rotation.size {
            // A file whose interface blocks alone pass the size still takes as many bytes
            // of packets: never a file per packet.
            let len = self.current.sink.output().len();
            let full = size.max(self.current.start_len.saturating_mul(2));
            if self.current.packets > 0 && len >= full {
                self.rotate(pattern)?;
            }
        }
        if self.current.packets == 0 {
            self.current.start_len = self.current.sink.output().len();
        }
        let i = packet.interface as usize;
        let interface = *self
            .current
            .map
            .get(i)
            .ok_or_else(|| io::Error::other("packet of an unknown interface"))?;
        self.current.sink.write_packet(&OutPacket {
            interface,
            ..*packet
        })?;
        self.current.packets += 1;
        self.written_since = true;
        self.delivered[i] = self.delivered[i].saturating_add(1);
        Ok(())
    }

    pub fn write_secrets(&mut self, interface: u32, lines: &[u8]) -> io::Result<bool> {
        let i = interface as usize;
        let interface = *self
            .current
            .map
            .get(i)
            .ok_or_else(|| io::Error::other("key log lines of an unknown interface"))?;
        self.current.sink.write_secrets(interface, lines)
    }

    pub fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        let i = interface as usize;
        self.update_stats(interface, stats);
        self.current.stats_written[i] = true;
        self.current.sink.write_stats(self.current.map[i], stats)
    }

    pub fn update_stats(&mut self, interface: u32, stats: &InterfaceStats) {
        match &mut self.stats[interface as usize] {
            Some(latest) => latest.clone_from(stats),
            slot => *slot = Some(stats.clone()),
        }
    }

    /// Rotates by time if due.
    pub fn rotate_if_due(&mut self, pattern: &Pattern) -> io::Result<()> {
        if let Some(every) = self.rotation.every {
            if self.current.packets > 0 && self.current.opened.elapsed() >= every {
                self.rotate(pattern)?;
            }
        }
        Ok(())
    }

    /// What the next flush appends to each file, in the order it does.
    pub fn extents(&mut self, out: &mut Vec<Extent>) -> io::Result<()> {
        for file in &mut self.closing {
            out.extend(file.extent()?);
        }
        out.extend(self.current.sink.output_mut().extent()?);
        Ok(())
    }

    /// Rotates by time if due, then flushes the completed files (closing and reporting
    /// each) and the current one. On an error, what is left is tried again next time.
    pub fn flush(&mut self, pattern: &Pattern, finished: &mut Finished) -> io::Result<()> {
        self.rotate_if_due(pattern)?;
        while let Some(first) = self.closing.first_mut() {
            first.flush()?;
            finished.done(self.closing.remove(0).close());
        }
        self.current.sink.flush()
    }

    /// Writes what ends the current file and flushes it, keeping the series: where that
    /// fails (disk full), nothing is lost and it is tried again.
    pub fn complete_and_flush(
        &mut self,
        pattern: &Pattern,
        finished: &mut Finished,
    ) -> io::Result<()> {
        self.complete_current()?;
        self.flush(pattern, finished)
    }

    /// Completes the current file and reports it.
    pub fn finish(mut self, finished: &mut Finished) -> io::Result<()> {
        self.current.sink.take_pending_secrets().give_up();
        self.complete_current()?;
        let last = self.current.sink.into_output();
        self.closing.push(last);
        for mut file in self.closing {
            file.flush()?;
            finished.done(file.close());
        }
        Ok(())
    }

    /// Ends the current file and starts the next, in memory: the files are written at the
    /// next flush, so a failing disk is waited out there, like any write.
    fn rotate(&mut self, pattern: &Pattern) -> io::Result<()> {
        self.complete_current()?;
        let path = pattern.path(self.sensor.as_deref(), OffsetDateTime::now_utc());
        let counter = if path == self.named.0 {
            self.named.1 + 1
        } else {
            0
        };
        let mut next = self.next_segment(Committed::new(path.clone(), counter))?;
        next.sink
            .carry_secrets(self.current.sink.take_pending_secrets())?;
        self.named = (path, counter);
        let done = std::mem::replace(&mut self.current, next);
        self.closing.push(done.sink.into_output());
        Ok(())
    }

    /// Ends the current pcapng section and starts another in the same file, which
    /// describes only the interfaces still open: the blocks of sessions gone stop adding up
    /// in a file that is never rotated, and no sensor is refused for them.
    fn new_section(&mut self) -> io::Result<()> {
        self.complete_current()?;
        // Stands in while the file's writer moves to the new section.
        let placeholder = Segment::open(PathBuf::new(), 0, self.format)?;
        let mut done = std::mem::replace(&mut self.current, placeholder);
        let pending = done.sink.take_pending_secrets();
        self.current = self.next_segment(done.sink.into_output())?;
        self.current.sink.carry_secrets(pending)?;
        Ok(())
    }

    /// A file's next part on `output`, describing the interfaces still open.
    fn next_segment(&self, output: Committed) -> io::Result<Segment> {
        let mut next = Segment::with(FormatSink::new(self.format, output)?);
        for interface in &self.interfaces {
            let index = match interface {
                Some(interface) => next.sink.add_interface(interface)?,
                // Its session is gone: not described again.
                None => u32::MAX,
            };
            next.map.push(index);
            next.stats_written.push(false);
        }
        Ok(next)
    }

    /// Ends the current file with each interface's latest counters (pcapng), if not there.
    fn complete_current(&mut self) -> io::Result<()> {
        for (i, stats) in self.stats.iter().enumerate() {
            let Some(stats) = stats else { continue };
            if self.current.stats_written[i] {
                continue;
            }
            let mut stats = stats.clone();
            stats.delivered = self.delivered[i];
            self.current.sink.write_stats(self.current.map[i], &stats)?;
            self.current.stats_written[i] = true;
        }
        self.current.sink.complete()
    }
}

impl Segment {
    /// A new file: `path`, or with a counter from `counter` on where that exists.
    fn open(path: PathBuf, counter: u32, format: Format) -> io::Result<Self> {
        Ok(Self::with(FormatSink::new(
            format,
            Committed::new(path, counter),
        )?))
    }

    /// The capture at `path` continued, if this receiver can append to it (pcapng: in a
    /// new section); else a new file beside it, never over it.
    fn continue_or_beside(path: PathBuf, format: Format) -> io::Result<Self> {
        let shown = path.display().to_string();
        match existing::inspect(&path, format) {
            Found::Nothing => Self::open(path, 0, format),
            Found::Continue {
                file,
                len,
                cut,
                link_type,
            } => {
                if len > 0 {
                    tracing::info!("{shown}: continuing the capture there ({len} bytes)");
                }
                if cut > 0 {
                    tracing::warn!("{shown}: cut {cut} bytes of a torn last record");
                }
                let out = Committed::continuing(path, file, len);
                Ok(Self::with(FormatSink::continuing(format, out, link_type)?))
            }
            Found::Other(why) => {
                tracing::warn!(
                    "{shown}: {why}; left as it is, this run writes beside it (a numbered name)"
                );
                Self::open(path, 1, format)
            }
        }
    }

    fn with(sink: FormatSink<Committed>) -> Self {
        Self {
            sink,
            map: Vec::new(),
            stats_written: Vec::new(),
            opened: Instant::now(),
            packets: 0,
            start_len: 0,
        }
    }
}
