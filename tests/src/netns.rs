//! Network namespaces and veth pairs.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::process::run;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>-<n>` with loopback up and IPv6 off, so the
    /// kernel sends nothing of its own (no router solicitations, no DAD) on its links.
    pub fn new(prefix: &str) -> Result<Self> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]).context("ip netns add (are you root?)")?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The argument vector that runs `program` inside the namespace (for [`crate::Proc`]).
    pub fn command(&self, program: &str) -> Vec<String> {
        command_in(Some(&self.name), program)
    }
}

/// The argument vector that runs `program` inside the namespace named `ns`, or where the
/// test runs without one.
pub fn command_in(ns: Option<&str>, program: &str) -> Vec<String> {
    match ns {
        Some(ns) => ["ip", "netns", "exec", ns, program]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        None => vec![program.to_string()],
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Two namespaces joined by veth pairs: frames replayed on `gen`'s end of pair `i` arrive on
/// `cap`'s end, where the sensor and tcpdump capture them.
pub struct Lab {
    pub gen: Netns,
    pub cap: Netns,
    pub links: Vec<(String, String)>,
}

impl Lab {
    /// `pairs` veth pairs named gen0/cap0, gen1/cap1, ... with MTU 9000 (the corpus holds
    /// jumbo frames). Each pair gets a /30 from 198.18.0.0/15 so the hosts can reach each
    /// other; replayed traffic never leaves the pair.
    pub fn new(pairs: usize) -> Result<Self> {
        let gen = Netns::new("csgen")?;
        let cap = Netns::new("cscap")?;
        let mut links = Vec::new();
        for i in 0..pairs {
            let (g, c) = (format!("gen{i}"), format!("cap{i}"));
            run(
                "ip",
                &[
                    "link", "add", &g, "netns", &gen.name, "type", "veth", "peer", "name", &c,
                    "netns", &cap.name,
                ],
            )?;
            for (ns, dev, host) in [(&gen, &g, 1), (&cap, &c, 2)] {
                ns.ip(&["link", "set", dev, "mtu", "9000", "up"])?;
                let addr = format!("198.18.{i}.{host}/30");
                ns.ip(&["addr", "add", &addr, "dev", dev])?;
            }
            links.push((g, c));
        }
        Ok(Self { gen, cap, links })
    }

    /// Replays a capture file out of gen end `i` at `pps` packets per second and waits for it.
    pub fn replay(&self, i: usize, file: &std::path::Path, pps: u32) -> Result<String> {
        let pps = pps.to_string();
        let file = file.to_str().context("replay file path is not UTF-8")?;
        self.gen.exec(
            "tcpreplay",
            &["-q", "--pps", &pps, "-i", &self.links[i].0, file],
        )
    }
}
