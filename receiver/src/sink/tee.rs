//! Several outputs fed the same packets (a file or stdout, and the live stream), and what
//! all of them require of a sensor's interfaces: `--link-type` for classic pcap.

use std::io;

use protocol::InterfaceStats;

use super::{Frontier, OutPacket, Refusal, Sink, SinkInterface};

pub struct Tee {
    outputs: Vec<Box<dyn Sink>>,
    /// For each interface, its index in each output.
    interfaces: Vec<Vec<u32>>,
    /// `--link-type` for a classic pcap output: interfaces of another are refused.
    link_type: Option<u16>,
}

impl Tee {
    /// Outputs that may fail (a file waits out a full disk) go last, so that the others
    /// are flushed before a failing flush returns.
    pub fn new(outputs: Vec<Box<dyn Sink>>) -> Self {
        Self {
            outputs,
            interfaces: Vec::new(),
            link_type: None,
        }
    }

    /// Refuses interfaces of another link type than `link_type` (`--link-type`, for a
    /// classic pcap file or stdout), whoever comes first.
    pub fn requiring_link_type(mut self, link_type: u16) -> Self {
        self.link_type = Some(link_type);
        self
    }
}

impl Tee {
    /// Calls `f` on every output with the interface's index there.
    fn each_output(
        &mut self,
        interface: u32,
        mut f: impl FnMut(&mut dyn Sink, u32) -> io::Result<()>,
    ) -> io::Result<()> {
        let indexes = self
            .interfaces
            .get(interface as usize)
            .ok_or_else(unknown_interface)?;
        for (output, &idx) in self.outputs.iter_mut().zip(indexes) {
            f(output.as_mut(), idx)?;
        }
        Ok(())
    }
}

impl Sink for Tee {
    fn check(&self, interfaces: &[SinkInterface]) -> Result<(), Refusal> {
        if let Some(required) = self.link_type {
            if let Some(other) = interfaces.iter().find(|i| i.link_type != required) {
                return Err(Refusal::LinkType(format!(
                    "interface {} has link type {}, and this receiver writes classic pcap of \
                     link type {required} (--link-type): restart it with --format pcapng to \
                     merge different link types",
                    other.name, other.link_type
                )));
            }
        }
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

    fn write_secrets(&mut self, interface: u32, lines: &[u8]) -> io::Result<bool> {
        let mut kept = false;
        self.each_output(interface, |output, idx| {
            kept |= output.write_secrets(idx, lines)?;
            Ok(())
        })?;
        Ok(kept)
    }

    fn end_batch(&mut self, interface: u32, sequence: u64) -> io::Result<()> {
        self.each_output(interface, |output, idx| output.end_batch(idx, sequence))
    }

    fn write_stats(&mut self, interface: u32, stats: &InterfaceStats) -> io::Result<()> {
        self.each_output(interface, |output, idx| output.write_stats(idx, stats))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing::Shared;
    use crate::sink::PcapSink;

    fn iface(link_type: u16) -> SinkInterface {
        SinkInterface {
            name: format!("h/if{link_type}"),
            link_type,
            snaplen: 262_144,
            filter: String::new(),
            description: String::new(),
            sensor: "s".into(),
            session: "0a1b2c3d".into(),
            session_id: 0x0a1b_2c3d,
        }
    }

    /// With --link-type, the first sensor does not decide: one of another link type is
    /// refused even when it comes first, and one of the given type is taken.
    #[test]
    fn a_required_link_type_is_not_decided_by_the_first_sensor() {
        let pcap: Box<dyn Sink> = Box::new(PcapSink::new(Shared::default()));
        let mut tee = Tee::new(vec![pcap]).requiring_link_type(1);
        let Err(Refusal::LinkType(refused)) = tee.check(&[iface(147)]) else {
            panic!("another link type is refused as such");
        };
        assert!(refused.contains("--link-type"), "{refused}");
        assert!(tee.check(&[iface(1)]).is_ok());
        tee.add_interface(&iface(1)).unwrap();
        assert!(tee.check(&[iface(276)]).is_err());
    }
}
