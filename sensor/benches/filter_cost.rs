//! The in-kernel filter's cost per packet, measured by the kernel itself: BPF_PROG_TEST_RUN
//! with `repeat` reports the mean run time, and criterion collects those means.
//!
//! For every filter of the shared corpus's filters-dev.txt, compiled by libpcap for
//! Ethernet and translated as the sensor translates it (by the `cbpf_to_ebpf` crate, for
//! the sensor's hooks), on the smallest and the largest corpus frame the filter
//! matches (or, if it matches none, that it rejects), in each mode's programs:
//! - `chain`: the mode's entry program with the filter and emit programs in its program
//!   array, as the sensor loads them: entry → filter → emit, which copies a matching frame
//!   into the ring buffer (drained between test runs, so it never fills);
//! - `filter`: the translated filter program alone (on accept, its tail call finds no emit
//!   program and it returns).
//!
//! And the floor under every filter: the empty expression (accept all, reading nothing),
//! by libpcap and in each mode's `filter`: in the kernel, the test run's own cost per
//! repetition with the translation's prologue and accepting end.
//!
//! The kernel cannot test-run classic BPF: BPF_PROG_LOAD takes eBPF only, and a classic
//! filter attached with SO_ATTACH_FILTER, which the kernel converts to eBPF itself, gets no
//! program fd to run. The comparison for the same classic program is therefore `libpcap`:
//! libpcap's own interpreter (`pcap_offline_filter`, what the sensor's tests take as the
//! oracle) on the same frame, timed by criterion in user space.
//!
//! Needs root (or CAP_BPF with CAP_NET_ADMIN) and the eBPF object (cargo xtask build-ebpf).
//! Run by `cargo xtask bench --only micro`; see BENCHMARKS.md.

#[cfg(all(target_os = "linux", capstream_ebpf))]
criterion::criterion_main!(kernel::benches);

#[cfg(not(all(target_os = "linux", capstream_ebpf)))]
fn main() {
    eprintln!("filter_cost: needs Linux and the eBPF object; run cargo xtask build-ebpf");
    std::process::exit(1);
}

#[cfg(all(target_os = "linux", capstream_ebpf))]
mod kernel {
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::Duration;

    use aya::maps::{ArrayOfMaps, Map, MapData, PerCpuArray, ProgramArray, RingBuf};
    use aya::programs::Program;
    use aya::{Ebpf, EbpfLoader};
    use criterion::{criterion_group, Criterion};
    use sensor_ebpf as shared;

    use cbpf_to_ebpf::{CbpfInsn, Hook, OnAccept, Target};

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor-ebpf.o"));
    const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus");
    /// The sensor's default --ring-size.
    const RING_SIZE: u32 = 8 << 20;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    /// Runs per BPF_PROG_TEST_RUN: at most 500 frames of ~1.5 KB enter the ring before it
    /// is drained, fewer bytes than the wakeup threshold (an eighth of the ring), past which
    /// every record would also pay for waking a reader.
    const REPEAT: u64 = 500;
    /// Frames a test run takes in every mode: an Ethernet + IPv6 header at least, one
    /// Ethernet MTU at most.
    const FRAME_LENS: std::ops::RangeInclusive<usize> = 54..=1514;

    /// A sensor mode's programs, as `--mode` names it.
    #[derive(Clone, Copy)]
    enum Mode {
        Ebpf,
        Tc,
        Xdp,
    }

    impl Mode {
        const ALL: [Mode; 3] = [Mode::Ebpf, Mode::Tc, Mode::Xdp];

        fn name(self) -> &'static str {
            match self {
                Self::Ebpf => "ebpf",
                Self::Tc => "tc",
                Self::Xdp => "xdp",
            }
        }

        /// (entry, emit) program names; TC egress runs the same code as ingress.
        fn programs(self) -> (&'static str, &'static str) {
            match self {
                Self::Ebpf => (shared::SOCKET_ENTRY, shared::SOCKET_EMIT),
                Self::Tc => (shared::TC_INGRESS, shared::TC_EMIT),
                Self::Xdp => (shared::XDP_ENTRY, shared::XDP_EMIT),
            }
        }

        /// The translation target, with the pass value of the sensor's hook.
        fn target<'a>(self, programs: &'a OwnedFd, scratch: &'a OwnedFd) -> Target<'a> {
            Target {
                hook: self.hook(),
                pass: self.hook().pass(),
                on_accept: OnAccept::TailCall {
                    prog_array: programs.as_fd(),
                    index: shared::PROG_EMIT,
                    scratch: scratch.as_fd(),
                },
            }
        }

        fn hook(self) -> Hook {
            match self {
                Self::Ebpf => Hook::SocketFilter,
                Self::Tc => Hook::Tc,
                Self::Xdp => Hook::Xdp { frags: true },
            }
        }

        /// The test-run input that makes the program see `frame` as on the wire. A socket
        /// filter's test run starts the packet after the Ethernet header it is given, where
        /// an AF_PACKET socket shows the filter the whole frame: so the frame goes behind a
        /// copy of its own Ethernet header.
        fn test_input(self, frame: &[u8]) -> Vec<u8> {
            match self {
                Self::Ebpf => [&frame[..14], frame].concat(),
                Self::Tc | Self::Xdp => frame.to_vec(),
            }
        }
    }

    /// A mode's programs loaded with one filter in their chain.
    struct Chain {
        ebpf: Ebpf,
        entry: OwnedFd,
        filter: OwnedFd,
        /// The rings the CPUs' slots point at: one for all, or one each.
        rings: Vec<RingBuf<MapData>>,
        counters: PerCpuArray<MapData, u64>,
    }

    /// Where the CPUs' frames go.
    #[derive(Clone, Copy, PartialEq)]
    enum Rings {
        /// One ring shared by every CPU.
        Shared,
        /// A ring per CPU (the sensor's layout, with every ring this bench's size).
        PerCpu,
    }

    impl Chain {
        fn load(mode: Mode, classic: &[CbpfInsn]) -> Self {
            Self::load_with(mode, classic, false, Rings::Shared)
        }

        /// [`Self::load`], with `--attribute`'s global as `attribute` says, and the rings
        /// as `rings` says.
        fn load_with(mode: Mode, classic: &[CbpfInsn], attribute: bool, rings: Rings) -> Self {
            let cpus = aya::util::nr_cpus().expect("the possible CPUs") as u32;
            let mut ebpf = EbpfLoader::new()
                .map_max_entries(shared::RINGS_MAP, cpus)
                .override_global(shared::SNAPLEN_GLOBAL, &protocol::MAX_SNAPLEN, true)
                .override_global(shared::LOOPBACK_GLOBAL, &0u32, true)
                .override_global(shared::ATTRIBUTE_GLOBAL, &u32::from(attribute), true)
                .override_global(shared::WAKEUP_BYTES_GLOBAL, &u64::from(RING_SIZE / 8), true)
                .load(OBJECT)
                .expect("the sensor's eBPF object loads (as root)");
            let (entry, emit) = mode.programs();
            let entry = load_program(&mut ebpf, entry);
            let emit = load_program(&mut ebpf, emit);
            let programs = map_fd(&ebpf, shared::PROGRAMS_MAP);
            let scratch = map_fd(&ebpf, shared::SCRATCH_MAP);
            let insns = cbpf_to_ebpf::translate(classic, &mode.target(&programs, &scratch))
                .expect("the filter translates");
            let filter = cbpf_to_ebpf::load_program(mode.hook(), &insns, "capstream_filter")
                .expect("the kernel takes the filter");
            for (index, prog) in [(shared::PROG_FILTER, &filter), (shared::PROG_EMIT, &emit)] {
                cbpf_to_ebpf::prog_array_set(programs.as_fd(), index, prog.as_fd())
                    .expect("chained");
            }
            let mut slots: ArrayOfMaps<MapData, MapData> = ebpf
                .take_map(shared::RINGS_MAP)
                .expect("the rings' array")
                .try_into()
                .expect("an array of maps");
            let mut ring_maps: Vec<MapData> = Vec::new();
            for cpu in 0..cpus {
                if ring_maps.is_empty() || rings == Rings::PerCpu {
                    let fd = cbpf_to_ebpf::map_create(
                        BPF_MAP_TYPE_RINGBUF,
                        0,
                        0,
                        RING_SIZE,
                        "bench_ring",
                    )
                    .expect("a ring buffer");
                    ring_maps.push(MapData::from_fd(fd).expect("the ring's map"));
                }
                let ring = ring_maps.last().expect("a ring");
                slots.set(cpu, ring, 0).expect("the ring in its slot");
            }
            let rings = ring_maps
                .into_iter()
                .map(|m| RingBuf::try_from(Map::RingBuf(m)).expect("a ring buffer"))
                .collect();
            let counters =
                PerCpuArray::try_from(ebpf.take_map(shared::COUNTERS_MAP).expect("counters"))
                    .expect("per-CPU counters");
            Self {
                ebpf,
                entry,
                filter,
                rings,
                counters,
            }
        }

        /// Takes the emit program out of the chain: the filter then returns on accept.
        fn unchain_emit(&mut self) {
            let mut programs: ProgramArray<_> = self
                .ebpf
                .map_mut(shared::PROGRAMS_MAP)
                .expect("program array")
                .try_into()
                .expect("a program array");
            programs
                .clear_index(&shared::PROG_EMIT)
                .expect("emit removed");
        }

        fn matched(&self) -> u64 {
            let per_cpu = self.counters.get(&shared::COUNTER_MATCHED, 0);
            per_cpu.expect("the matched counter").iter().sum()
        }

        fn ring_full(&self) -> u64 {
            let per_cpu = self.counters.get(&shared::COUNTER_RING_FULL, 0);
            per_cpu.expect("the ring-full counter").iter().sum()
        }

        fn drain(&mut self) {
            for ring in &mut self.rings {
                while ring.next().is_some() {}
            }
        }

        /// Whether the chain emits `input` (one run, judged by the matched counter).
        fn accepts(&mut self, input: &[u8]) -> bool {
            let before = self.matched();
            cbpf_to_ebpf::test_run(self.entry.as_fd(), input, 1).expect("BPF_PROG_TEST_RUN");
            self.drain();
            self.matched() > before
        }

        /// The socket cookie of the record one run of the chain on `input` emits, if any.
        fn emitted_cookie(&mut self, input: &[u8]) -> Option<u64> {
            self.drain();
            cbpf_to_ebpf::test_run(self.entry.as_fd(), input, 1).expect("BPF_PROG_TEST_RUN");
            let record = self.rings.iter_mut().find_map(|r| r.next())?;
            let header = record.get(..std::mem::size_of::<shared::PacketHeader>())?;
            // SAFETY: a whole PacketHeader's bytes, read unaligned; it is plain data.
            let header: shared::PacketHeader =
                unsafe { std::ptr::read_unaligned(header.as_ptr().cast()) };
            Some(header.socket_cookie)
        }

        /// `iters` runs of `prog` on `input`: the kernel's mean run time, times `iters`.
        fn time(&mut self, prog: &OwnedFd, input: &[u8], iters: u64) -> Duration {
            self.time_draining_every(prog, input, iters, REPEAT)
        }

        /// [`Self::time`], the ring drained every `repeat` runs.
        fn time_draining_every(
            &mut self,
            prog: &OwnedFd,
            input: &[u8],
            iters: u64,
            repeat: u64,
        ) -> Duration {
            let mut total_ns = 0;
            let mut left = iters;
            while left > 0 {
                let n = left.min(repeat);
                let run = cbpf_to_ebpf::test_run(prog.as_fd(), input, n as u32)
                    .expect("BPF_PROG_TEST_RUN");
                total_ns += u64::from(run.duration_ns) * n;
                self.drain();
                left -= n;
            }
            Duration::from_nanos(total_ns)
        }
    }

    fn load_program(ebpf: &mut Ebpf, name: &str) -> OwnedFd {
        let prog = ebpf
            .program_mut(name)
            .expect("the program is in the object");
        match prog {
            Program::SocketFilter(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            _ => panic!("{name}: an unexpected program type"),
        }
        .unwrap_or_else(|e| panic!("{name} loads: {e}"));
        let fd = prog.fd().expect("loaded");
        fd.as_fd().try_clone_to_owned().expect("fd")
    }

    fn map_fd(ebpf: &Ebpf, name: &str) -> OwnedFd {
        let data = match ebpf.map(name).expect("the map is in the object") {
            aya::maps::Map::ProgramArray(d) | aya::maps::Map::PerCpuArray(d) => d,
            _ => panic!("{name}: an unexpected map type"),
        };
        data.fd().as_fd().try_clone_to_owned().expect("fd")
    }

    /// Every frame of the corpus.
    fn corpus_frames() -> Vec<Vec<u8>> {
        let mut capture = pcap::Capture::from_file(format!("{CORPUS}/tcpdump-tests.pcap"))
            .unwrap_or_else(|e| panic!("{CORPUS}: {e} (the shared corpus; see its README)"));
        let mut frames = Vec::new();
        while let Ok(packet) = capture.next_packet() {
            frames.push(packet.data.to_vec());
        }
        frames
    }

    /// The smallest and the largest frame `program` matches, or rejects if it matches none
    /// (one frame when they are the same size).
    /// Frames with an outer VLAN tag are left out: the kernel moves that tag into metadata
    /// before a socket filter or TC program sees the frame, a test run does not.
    fn small_and_large<'a>(
        program: &pcap::BpfProgram,
        frames: &'a [Vec<u8>],
    ) -> Vec<(&'a [u8], bool)> {
        let usable = || frames.iter().filter(|f| usable(f));
        let matching = usable().any(|f| program.filter(f));
        let chosen = || usable().filter(|f| program.filter(f) == matching);
        let small = chosen().min_by_key(|f| f.len()).expect("a usable frame");
        let large = chosen().max_by_key(|f| f.len()).expect("a usable frame");
        let mut chosen = vec![(small.as_slice(), matching), (large.as_slice(), matching)];
        chosen.dedup_by_key(|(frame, _)| frame.len());
        chosen
    }

    /// Whether a test run can take `frame` in every mode and show it as the wire did.
    fn usable(frame: &[u8]) -> bool {
        FRAME_LENS.contains(&frame.len()) && !matches!(&frame[12..14], [0x81, 0x00] | [0x88, 0xa8])
    }

    /// The floor under every filter: the empty expression (one instruction, accept all),
    /// which reads nothing, on the smallest usable frame, by libpcap's interpreter and
    /// translated for each mode. In the kernel that is the test run's own cost per
    /// repetition, the translation's prologue and its accepting end.
    fn floor_cost(c: &mut Criterion, dead: &pcap::Capture<pcap::Dead>, frames: &[Vec<u8>]) {
        let program = dead
            .compile("", true)
            .expect("libpcap compiles the empty filter");
        let classic = CbpfInsn::from_pcap(&program);
        let frame = frames
            .iter()
            .filter(|f| usable(f))
            .min_by_key(|f| f.len())
            .expect("a usable frame");
        let case = format!("(empty: the floor)/{}B match", frame.len());
        let mut group = c.benchmark_group("bpf");
        group.bench_function(format!("libpcap/{case}"), |b| {
            b.iter(|| program.filter(std::hint::black_box(frame)))
        });
        for mode in Mode::ALL {
            let mut chain = Chain::load(mode, &classic);
            chain.unchain_emit();
            let input = mode.test_input(frame);
            let filter = chain.filter.try_clone().expect("fd");
            group.bench_function(format!("{}-filter/{case}", mode.name()), |b| {
                b.iter_custom(|iters| chain.time(&filter, &input, iters))
            });
        }
        group.finish();
    }

    fn filter_cost(c: &mut Criterion) {
        let frames = corpus_frames();
        let filters = std::fs::read_to_string(format!("{CORPUS}/filters-dev.txt"))
            .expect("filters-dev.txt in the shared corpus");
        let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).expect("libpcap");
        let mut group = c.benchmark_group("bpf");
        for expr in filters.lines().filter(|l| !l.trim().is_empty()) {
            let program = dead
                .compile(expr, true)
                .expect("libpcap compiles the filter");
            let classic = CbpfInsn::from_pcap(&program);
            for (frame, matching) in small_and_large(&program, &frames) {
                let verdict = if matching { "match" } else { "reject" };
                let case = format!("{expr}/{}B {verdict}", frame.len());
                group.bench_function(format!("libpcap/{case}"), |b| {
                    b.iter(|| program.filter(std::hint::black_box(frame)))
                });
                for mode in Mode::ALL {
                    let mut chain = Chain::load(mode, &classic);
                    let input = mode.test_input(frame);
                    assert_eq!(
                        chain.accepts(&input),
                        matching,
                        "--mode {} on \"{expr}\", {} bytes: the kernel disagrees with libpcap",
                        mode.name(),
                        frame.len()
                    );
                    let entry = chain.entry.try_clone().expect("fd");
                    group.bench_function(format!("{}-chain/{case}", mode.name()), |b| {
                        b.iter_custom(|iters| chain.time(&entry, &input, iters))
                    });
                    chain.unchain_emit();
                    let filter = chain.filter.try_clone().expect("fd");
                    group.bench_function(format!("{}-filter/{case}", mode.name()), |b| {
                        b.iter_custom(|iters| chain.time(&filter, &input, iters))
                    });
                }
            }
        }
        group.finish();
        floor_cost(c, &dead, &frames);
    }

    /// The ring (issue 19, item 4), on TC (`ring/` cases; `--bench ring/` runs them alone),
    /// for a 64-byte and a 1500-byte frame, every frame accepted:
    /// - `shared`/`per-cpu`: the sensor's own chain (entry, the empty filter, emit) test-run
    ///   on both CPUs at once, two threads pinned to CPU 0 and CPU 1, into one shared ring
    ///   (one load of the object) or into a ring per CPU (one load per thread: its own
    ///   ring), beside `one-cpu` (one thread); ns per frame, the mean of the threads;
    /// - `past-wakeup-threshold`: `one-cpu`, the ring drained only when 7/16 full, so that
    ///   most records land past the wakeup threshold (a lagging sensor);
    /// - `copy`: three hand-written TC programs that copy the frame and a packet header
    ///   into a ring, per byte: `reserve-load` (what emit does: bpf_ringbuf_reserve, then
    ///   bpf_skb_load_bytes into the reservation), `stage-output` (bpf_skb_load_bytes into a
    ///   per-CPU map value, then bpf_ringbuf_output: what a helper-based copy needs for a
    ///   record of header and frame). (bpf_ringbuf_output straight from the packet, which
    ///   would save the staging copy, is refused at TC: "helper access to the packet is not
    ///   allowed".)
    mod ring {
        use std::os::fd::{AsFd, AsRawFd, OwnedFd};
        use std::sync::Barrier;
        use std::time::Duration;

        use aya::maps::{Map, MapData, RingBuf};
        use cbpf_to_ebpf::{EbpfInsn, Hook};
        use criterion::Criterion;

        use super::{Chain, Mode, Rings, BPF_MAP_TYPE_RINGBUF, RING_SIZE};

        const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
        const HEADER_LEN: i32 = std::mem::size_of::<sensor_ebpf::PacketHeader>() as i32;
        pub(super) const FRAME_SIZES: [usize; 2] = [64, 1500];
        /// Test runs per thread between drains: both threads' frames fit the ring.
        const REPEAT: u32 = 500;

        /// An Ethernet/IPv4/UDP frame of `len` bytes (the bench generator's kind), from
        /// 198.18.0.1 port 0 to 198.18.0.3 port 9.
        pub(super) fn frame(len: usize) -> Vec<u8> {
            let mut f = vec![0u8; len];
            f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
            f[22] = 64;
            f[23] = 17;
            f[26..30].copy_from_slice(&[198, 18, 0, 1]);
            f[30..34].copy_from_slice(&[198, 18, 0, 3]);
            f[36..38].copy_from_slice(&9u16.to_be_bytes());
            f[38..40].copy_from_slice(&((len - 34) as u16).to_be_bytes());
            f
        }

        fn pin_to(cpu: usize) {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it;
            // sched_setaffinity reads it for the calling thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
            }
        }

        /// Test-runs `progs[i]` on CPU `i`, all at once, `iters` times each (drained in
        /// between by `drain`): the mean of the kernel's mean run times, times `iters`.
        fn concurrently(
            progs: &[&OwnedFd],
            input: &[u8],
            iters: u64,
            drain: &mut dyn FnMut(),
        ) -> Duration {
            let barrier = Barrier::new(progs.len());
            let mut total_ns = 0u64;
            let mut left = iters;
            while left > 0 {
                let n = left.min(u64::from(REPEAT)) as u32;
                let sums: Vec<u64> = std::thread::scope(|scope| {
                    let runs: Vec<_> = progs
                        .iter()
                        .enumerate()
                        .map(|(cpu, prog)| {
                            let barrier = &barrier;
                            scope.spawn(move || {
                                pin_to(cpu);
                                barrier.wait();
                                let run = cbpf_to_ebpf::test_run(prog.as_fd(), input, n)
                                    .expect("BPF_PROG_TEST_RUN");
                                u64::from(run.duration_ns) * u64::from(n)
                            })
                        })
                        .collect();
                    runs.into_iter()
                        .map(|r| r.join().expect("a test run"))
                        .collect()
                });
                total_ns += sums.iter().sum::<u64>() / sums.len() as u64;
                drain();
                left -= u64::from(n);
            }
            Duration::from_nanos(total_ns)
        }

        pub fn shared_against_per_cpu(c: &mut Criterion, empty: &[cbpf_to_ebpf::CbpfInsn]) {
            let mut group = c.benchmark_group("bpf");
            for len in FRAME_SIZES {
                let input = frame(len);
                let mut a = Chain::load(Mode::Tc, empty);
                let mut b = Chain::load_with(Mode::Tc, empty, false, Rings::PerCpu);
                assert!(
                    a.accepts(&input) && b.accepts(&input),
                    "the empty filter accepts"
                );
                let (entry_a, entry_b) = (
                    a.entry.try_clone().expect("fd"),
                    b.entry.try_clone().expect("fd"),
                );
                let full_before = a.ring_full() + b.ring_full();
                group.bench_function(format!("ring/one-cpu/{len}B"), |bench| {
                    bench.iter_custom(|iters| {
                        concurrently(&[&entry_a], &input, iters, &mut || a.drain())
                    })
                });
                // Seven sixteenths of the ring between drains: most records land past the
                // wakeup threshold (an eighth), short of half the ring, past which every
                // record wakes the reader again (a sensor lagging behind a flood).
                let record = len.max(128).next_power_of_two() + 40;
                let lagging = u64::from(RING_SIZE) * 7 / 16 / record as u64;
                group.bench_function(format!("ring/past-wakeup-threshold/{len}B"), |bench| {
                    bench.iter_custom(|iters| {
                        a.time_draining_every(&entry_a, &input, iters, lagging)
                    })
                });
                group.bench_function(format!("ring/shared/{len}B"), |bench| {
                    bench.iter_custom(|iters| {
                        concurrently(&[&entry_a, &entry_a], &input, iters, &mut || a.drain())
                    })
                });
                group.bench_function(format!("ring/per-cpu/{len}B"), |bench| {
                    bench.iter_custom(|iters| {
                        concurrently(&[&entry_b, &entry_b], &input, iters, &mut || b.drain())
                    })
                });
                assert_eq!(
                    a.ring_full() + b.ring_full(),
                    full_before,
                    "the ring never filled"
                );
            }
            group.finish();
        }

        /// How a hand-written program copies the frame into the ring.
        #[derive(Clone, Copy)]
        enum Copy {
            ReserveLoad,
            StageOutput,
        }

        impl Copy {
            const ALL: [Copy; 2] = [Copy::ReserveLoad, Copy::StageOutput];

            fn name(self) -> &'static str {
                match self {
                    Self::ReserveLoad => "reserve-load",
                    Self::StageOutput => "stage-output",
                }
            }
        }

        fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> EbpfInsn {
            EbpfInsn {
                code,
                regs: dst | (src << 4),
                off,
                imm,
            }
        }

        /// `ld_imm64 dst, map` (BPF_PSEUDO_MAP_FD): two instructions.
        fn load_map(dst: u8, map: &OwnedFd) -> [EbpfInsn; 2] {
            [insn(0x18, dst, 1, 0, map.as_raw_fd()), insn(0, 0, 0, 0, 0)]
        }

        const MOV_X: u8 = 0xbf;
        const MOV_K: u8 = 0xb7;
        const ADD_K: u8 = 0x07;
        const CALL: u8 = 0x85;
        const EXIT: u8 = 0x95;
        const JEQ_K: u8 = 0x15;
        const JNE_K: u8 = 0x55;
        const ST_DW: u8 = 0x7a;
        const ST_W: u8 = 0x62;
        const MAP_LOOKUP: i32 = 1;
        const SKB_LOAD_BYTES: i32 = 26;
        const RINGBUF_OUTPUT: i32 = 130;
        const RINGBUF_RESERVE: i32 = 131;
        const RINGBUF_SUBMIT: i32 = 132;
        const RINGBUF_DISCARD: i32 = 133;
        const BPF_RB_NO_WAKEUP: i32 = 1;

        /// Writes a zero packet header at `reg` + 0 (every field, as emit writes one).
        fn header_at(reg: u8) -> Vec<EbpfInsn> {
            (0..HEADER_LEN / 8)
                .map(|i| insn(ST_DW, reg, 0, (i * 8) as i16, 0))
                .collect()
        }

        /// From the memory r0 points to (kept in r7): a zero packet header, then `len` bytes
        /// of the frame (the context in r6) by bpf_skb_load_bytes, whose result is in r0.
        fn header_and_frame(len: i32) -> Vec<EbpfInsn> {
            let mut insns = vec![insn(MOV_X, 7, 0, 0, 0)];
            insns.extend(header_at(7));
            insns.extend([
                insn(MOV_X, 1, 6, 0, 0),
                insn(MOV_K, 2, 0, 0, 0),
                insn(MOV_X, 3, 7, 0, 0),
                insn(ADD_K, 3, 0, 0, HEADER_LEN),
                insn(MOV_K, 4, 0, 0, len),
                insn(CALL, 0, 0, 0, SKB_LOAD_BYTES),
            ]);
            insns
        }

        /// The program: copies a header and `len` bytes of the frame into `ring`; `stage` is
        /// a per-CPU map value of header + frame.
        fn program(copy: Copy, len: i32, ring: &OwnedFd, stage: &OwnedFd) -> Vec<EbpfInsn> {
            let mut p = vec![insn(MOV_X, 6, 1, 0, 0)];
            let mut body = Vec::new();
            match copy {
                Copy::ReserveLoad => {
                    body.extend(load_map(1, ring));
                    body.push(insn(MOV_K, 2, 0, 0, HEADER_LEN + len));
                    body.push(insn(MOV_K, 3, 0, 0, 0));
                    body.push(insn(CALL, 0, 0, 0, RINGBUF_RESERVE));
                    let mut rest = header_and_frame(len);
                    rest.extend([
                        insn(JNE_K, 0, 0, 4, 0),
                        insn(MOV_X, 1, 7, 0, 0),
                        insn(MOV_K, 2, 0, 0, BPF_RB_NO_WAKEUP),
                        insn(CALL, 0, 0, 0, RINGBUF_SUBMIT),
                        insn(0x05, 0, 0, 3, 0), // goto out
                        insn(MOV_X, 1, 7, 0, 0),
                        insn(MOV_K, 2, 0, 0, 0),
                        insn(CALL, 0, 0, 0, RINGBUF_DISCARD),
                    ]);
                    body.push(insn(JEQ_K, 0, 0, rest.len() as i16, 0));
                    body.extend(rest);
                }
                Copy::StageOutput => {
                    body.push(insn(ST_W, 10, 0, -4, 0));
                    body.extend(load_map(1, stage));
                    body.push(insn(MOV_X, 2, 10, 0, 0));
                    body.push(insn(ADD_K, 2, 0, 0, -4));
                    body.push(insn(CALL, 0, 0, 0, MAP_LOOKUP));
                    let mut rest = header_and_frame(len);
                    rest.extend([insn(JNE_K, 0, 0, 6, 0)]);
                    rest.extend(load_map(1, ring));
                    rest.extend([
                        insn(MOV_X, 2, 7, 0, 0),
                        insn(MOV_K, 3, 0, 0, HEADER_LEN + len),
                        insn(MOV_K, 4, 0, 0, BPF_RB_NO_WAKEUP),
                        insn(CALL, 0, 0, 0, RINGBUF_OUTPUT),
                    ]);
                    body.push(insn(JEQ_K, 0, 0, rest.len() as i16, 0));
                    body.extend(rest);
                }
            }
            p.extend(body);
            p.extend([insn(MOV_K, 0, 0, 0, -1), insn(EXIT, 0, 0, 0, 0)]);
            p
        }

        pub fn copy_per_byte(c: &mut Criterion) {
            let mut group = c.benchmark_group("bpf");
            for len in FRAME_SIZES {
                let input = frame(len);
                for copy in Copy::ALL {
                    let ring_fd = cbpf_to_ebpf::map_create(
                        BPF_MAP_TYPE_RINGBUF,
                        0,
                        0,
                        RING_SIZE,
                        "bench_ring",
                    )
                    .expect("a ring buffer (as root)");
                    let stage = cbpf_to_ebpf::map_create(
                        BPF_MAP_TYPE_PERCPU_ARRAY,
                        4,
                        (HEADER_LEN + len as i32) as u32,
                        1,
                        "bench_stage",
                    )
                    .expect("a per-CPU array");
                    let insns = program(copy, len as i32, &ring_fd, &stage);
                    let prog = cbpf_to_ebpf::load_program(Hook::Tc, &insns, "bench_copy")
                        .unwrap_or_else(|e| panic!("{}: {e}", copy.name()));
                    let data = MapData::from_fd(ring_fd).expect("the ring's map");
                    let mut ring = RingBuf::try_from(Map::RingBuf(data)).expect("a ring");
                    cbpf_to_ebpf::test_run(prog.as_fd(), &input, 1).expect("BPF_PROG_TEST_RUN");
                    let record = ring.next().map(|r| r.len());
                    let want = HEADER_LEN as usize + len;
                    assert_eq!(
                        record,
                        Some(want),
                        "{}: one record of header and frame",
                        copy.name()
                    );
                    group.bench_function(format!("ring/copy-{}/{len}B", copy.name()), |bench| {
                        bench.iter_custom(|iters| {
                            concurrently(&[&prog], &input, iters, &mut || {
                                while ring.next().is_some() {}
                            })
                        })
                    });
                }
            }
            group.finish();
        }
    }

    /// Attribution's cost in the kernel (issue 17; `attribution/` cases): the sensor's chain
    /// (entry, the empty filter, emit) on the bench generator's frame, without `--attribute`
    /// (`off`), with it on a frame of a flow the flow table lacks (`unknown-flow`: a lookup
    /// that misses, what the capture bench's traffic costs) and on one of a flow it holds
    /// (`known-flow`: the lookup hits and the frame carries its socket's cookie).
    mod attribution {
        use aya::maps::HashMap;
        use criterion::Criterion;
        use sensor_ebpf::FlowKey;

        use super::ring::{frame, FRAME_SIZES};
        use super::{shared, Chain, Mode, Rings};

        /// The frame's flow from the receiving host's end, and from the sender's: the
        /// table is keyed from this host's end, and a test run's direction depends on the
        /// hook.
        fn both_ends() -> [FlowKey; 2] {
            let v4 = |last: u8| {
                let mut a = [0u8; 16];
                a[10..12].fill(0xff);
                a[12..].copy_from_slice(&[198, 18, 0, last]);
                a
            };
            let key = |local, remote, local_port, remote_port| FlowKey {
                local,
                remote,
                local_port,
                remote_port,
                protocol: 17,
                _reserved: [0; 3],
            };
            [key(v4(3), v4(1), 9, 0), key(v4(1), v4(3), 0, 9)]
        }

        pub fn with_and_without(c: &mut Criterion, empty: &[cbpf_to_ebpf::CbpfInsn]) {
            let mut group = c.benchmark_group("bpf");
            for mode in Mode::ALL {
                for len in FRAME_SIZES {
                    let input = mode.test_input(&frame(len));
                    for case in ["off", "unknown-flow", "known-flow"] {
                        let mut chain = Chain::load_with(mode, empty, case != "off", Rings::Shared);
                        if case == "known-flow" {
                            let mut flows: HashMap<_, FlowKey, u64> = chain
                                .ebpf
                                .map_mut(shared::FLOWS_MAP)
                                .expect("the flow table")
                                .try_into()
                                .expect("a hash map");
                            for key in both_ends() {
                                flows.insert(key, 42, 0).expect("a flow");
                            }
                        }
                        let expected = if case == "known-flow" { 42 } else { 0 };
                        assert_eq!(
                            chain.emitted_cookie(&input),
                            Some(expected),
                            "--mode {} {case}: the frame's socket cookie",
                            mode.name()
                        );
                        let entry = chain.entry.try_clone().expect("fd");
                        let id = format!("attribution/{} {case}/{len}B", mode.name());
                        group.bench_function(id, |b| {
                            b.iter_custom(|iters| chain.time(&entry, &input, iters))
                        });
                    }
                }
            }
            group.finish();
        }
    }

    fn ring_cost(c: &mut Criterion) {
        let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).expect("libpcap");
        let empty = dead
            .compile("", true)
            .expect("libpcap compiles the empty filter");
        ring::shared_against_per_cpu(c, &CbpfInsn::from_pcap(&empty));
        ring::copy_per_byte(c);
        attribution::with_and_without(c, &CbpfInsn::from_pcap(&empty));
    }

    criterion_group! {
        name = benches;
        // The kernel averages each test run already; short phases keep 150 cases brief.
        config = Criterion::default()
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        targets = filter_cost, ring_cost
    }
}
