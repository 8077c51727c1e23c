//! Several outputs fed the same packets: a file (or stdout) and the live stream.

use std::io;

use common::InterfaceStats;

use super::{Frontier, OutPacket, Sink, SinkInterface};

pub struct Tee {
    outputs: Vec<Box<dyn Sink>>,
    /// For each interface, its index in each output.
    interfaces: Vec<Vec<u32>>,
}

impl Tee {
    /// Outputs that may fail (a file waits out a full disk) go last, so that the others
    /// are flushed before a failing flush returns.
    pub fn new(outputs: Vec<Box<dyn Sink>>) -> Self {
        Self {
            outputs,
            interfaces: Vec::new(),
        }
    }
}

impl Sink for Tee {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), String> {
        self.outputs.iter().try_for_each(|o| o.check(interfaces))
    }

    fn add_interface(&mut self, interface: &SinkInterface) -> io::Result<u32> {
        let indexes = self
            .outputs
            .iter_mut()
            .map(|o| o.add_interface(interface))
            .collect::<io::Result<Vec<u32>>>()?;
        self.interfaces.push(indexes);
        Ok(self.interfaces.len() as u32 - 1)
    }

    fn write_packet(&mut self, packet: &OutPacket) -> io::Result<()> {
        let indexes = self
            .interfaces
            .get(packet.interface as usize)
            .ok_or_else(unknown_interface)?;
        for (output, &interface) in self.outputs.iter_mut().zip(indexes) {
            output.write_packet(&OutPacket {
                interface,
                ..*packet
            })?;
        }
        Ok(())
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        let indexes = self
            .interfaces
            .get(interface as usize)
            .ok_or_else(unknown_interface)?;
        for (output, &idx) in self.outputs.iter_mut().zip(indexes) {
            output.write_stats(idx, stats)?;
        }
        Ok(())
    }

    fn update_stats(&mut self, interface: u32, stats: &InterfaceStats) {
        if let Some(indexes) = self.interfaces.get(interface as usize) {
            for (output, &idx) in self.outputs.iter_mut().zip(indexes) {
                output.update_stats(idx, stats);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.outputs.iter_mut().try_for_each(|o| o.flush())
    }

    fn flush_journaled(
        &mut self,
        frontiers: &mut dyn FnMut(&mut Vec<Frontier>),
    ) -> io::Result<bool> {
        let mut wrote = false;
        for output in &mut self.outputs {
            wrote |= output.flush_journaled(frontiers)?;
        }
        Ok(wrote)
    }

    fn close_journal(&mut self, frontiers: &mut dyn FnMut(&mut Vec<Frontier>)) -> io::Result<()> {
        self.outputs
            .iter_mut()
            .try_for_each(|o| o.close_journal(frontiers))
    }

    fn close_interfaces(&mut self, interfaces: &[u32]) {
        for (i, output) in self.outputs.iter_mut().enumerate() {
            let own: Vec<u32> = interfaces
                .iter()
                .filter_map(|&id| self.interfaces.get(id as usize).map(|idx| idx[i]))
                .collect();
            output.close_interfaces(&own);
        }
    }

    fn take_recovered(&mut self) -> Vec<Frontier> {
        self.outputs
            .iter_mut()
            .flat_map(|o| o.take_recovered())
            .collect()
    }

    /// Completes every output; the first failure is returned once all were tried.
    fn finish(self: Box<Self>) -> io::Result<()> {
        let mut result = Ok(());
        for output in self.outputs {
            result = result.and(output.finish());
        }
        result
    }
}

fn unknown_interface() -> io::Error {
    io::Error::other("packet of an unknown interface")
}
