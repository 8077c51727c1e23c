//! Wireshark on demand: sensors with no standing capture (`--on-demand`), the receiver's
//! viewer role (`--viewer-listen`) and `capstream-extcap`, installed as Wireshark finds it,
//! driven by tshark and run as Wireshark runs it; captures compared with tcpdump's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use testbed::capstream::{
    compare_captures, pcapng_interfaces, start_sensor, start_tcpdump, stop_reference,
    tcpdump_records, Receiver, Scratch,
};
use testbed::{corpus, prometheus, require_root, require_tool, run, wait_until, workspace_bin};
use testbed::{Lab, Proc};

/// Replay rate: tcpdump, the reference, drops nothing at it on a 2-core machine.
const PPS: u32 = 8000;
const VIEWERS: &str = "127.0.0.1:4434";

/// A receiver with the viewer role and two on-demand sensors, `s1` on cap0 and `s2` on
/// cap1, all in the lab's capture namespace; and capstream-extcap installed for Wireshark
/// in a home directory of the test's own.
struct OnDemandLab {
    lab: Lab,
    dir: Scratch,
    receiver: Receiver,
    sensors: Vec<Proc>,
    home: PathBuf,
}

impl OnDemandLab {
    fn new() -> Self {
        Self::with_receiver_args(Scratch::new("on-demand").unwrap(), &[])
    }

    /// [`OnDemandLab::new`] with a receiver given `args` too, in `dir`.
    fn with_receiver_args(dir: Scratch, args: &[&str]) -> Self {
        require_root();
        require_tool("tshark", "tshark");
        let lab = Lab::new(2).unwrap();
        let out = dir.join("standing.pcapng").to_string_lossy().into_owned();
        let mut all = vec!["--out", &out, "--viewer-listen", VIEWERS];
        all.extend_from_slice(args);
        let receiver = Receiver::start(Some(&lab.cap), &dir.join("state"), 4433, &all).unwrap();
        let sensors = [("s1", "9101"), ("s2", "9102")]
            .iter()
            .map(|(id, port)| {
                let metrics = format!("127.0.0.1:{port}");
                start_sensor(
                    Some(&lab.cap),
                    &receiver,
                    &[
                        "--on-demand",
                        "--allow-on-demand",
                        "--sensor-id",
                        id,
                        "--metrics",
                        &metrics,
                    ],
                )
                .unwrap()
            })
            .collect();
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        // As a user installs it, into this home's personal extcap folder.
        let extcap = workspace_bin("capstream-extcap");
        let installed = std::process::Command::new(workspace_bin("xtask"))
            .args(["install-extcap", "--binary"])
            .arg(&extcap)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .output()
            .unwrap();
        assert!(
            installed.status.success(),
            "install-extcap failed: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        Self {
            lab,
            dir,
            receiver,
            sensors,
            home,
        }
    }

    fn state(&self, file: &str) -> String {
        self.dir
            .join("state")
            .join(file)
            .to_string_lossy()
            .into_owned()
    }

    /// The environment that configures capstream-extcap (`CAPSTREAM_EXTCAP_*`), with
    /// `token` as its viewer token file (none: no token).
    fn env(&self, token: Option<&str>) -> Vec<String> {
        let mut env = vec![
            "env".to_string(),
            // Wireshark's folders and the extcap's file follow HOME alone.
            "-u".into(),
            "XDG_CONFIG_HOME".into(),
            format!("HOME={}", self.home.display()),
            format!("CAPSTREAM_EXTCAP_RECEIVER={VIEWERS}"),
            format!("CAPSTREAM_EXTCAP_CA={}", self.state("receiver.crt")),
        ];
        if let Some(token) = token {
            env.push(format!("CAPSTREAM_EXTCAP_TOKEN_FILE={token}"));
        }
        env
    }

    /// `program args` in the capture namespace with the extcap's environment.
    fn command(&self, token: Option<&str>, program: &str, args: &[&str]) -> Vec<String> {
        let mut argv = self.lab.cap.command("env");
        argv.pop();
        argv.extend(self.env(token));
        argv.push(program.to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Runs capstream-extcap as Wireshark does, with the viewer token.
    fn extcap(&self, token: Option<&str>, args: &[&str]) -> Proc {
        let bin = workspace_bin("capstream-extcap");
        let argv = self.command(token, &bin.to_string_lossy(), args);
        Proc::start("capstream-extcap", &argv, Stdio::null()).unwrap()
    }

    fn viewer_token(&self) -> String {
        self.state("viewer-token")
    }

    /// The sensor's on-demand gauge for `iface`.
    fn running_on(&self, metrics_port: &str, iface: &str) -> u64 {
        let text = prometheus::scrape(Some(&self.lab.cap), &format!("127.0.0.1:{metrics_port}"))
            .unwrap_or_default();
        prometheus::count(
            &text,
            "capstream_sensor_on_demand_captures",
            &[("interface", iface)],
        )
    }
}

/// Waits for a capture process to exit by itself; its stderr when it failed.
fn exits_cleanly(proc: &mut Proc, within: Duration) {
    let status = proc.wait(within).unwrap();
    assert!(status.success(), "exited with {status}: {}", proc.stderr());
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn tshark_lists_the_interfaces_of_two_sensors_and_captures_on_demand_like_tcpdump() {
    let mut t = OnDemandLab::new();
    // Listing: the extcap configured by the environment alone, as Wireshark runs it.
    let argv = t.command(Some(&t.viewer_token()), "tshark", &["-D"]);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let listed = run(&argv[0], &args).unwrap();
    for name in ["s1/cap0", "s1/cap1", "s2/cap0", "s2/cap1"] {
        assert!(
            listed.contains(&format!("capstream:{name} (capstream: {name})")),
            "tshark -D does not list {name}:\n{listed}"
        );
    }

    // Or configured by the user's file alone, as the Wireshark GUI finds it.
    let config = t.home.join(".config/capstream");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("extcap.toml"),
        format!(
            "receiver = \"{VIEWERS}\"\nca = \"{}\"\ntoken-file = \"{}\"\n",
            t.state("receiver.crt"),
            t.viewer_token()
        ),
    )
    .unwrap();
    let mut argv = t.lab.cap.command("env");
    argv.extend(["-u".into(), "XDG_CONFIG_HOME".into()]);
    argv.extend([
        format!("HOME={}", t.home.display()),
        "tshark".into(),
        "-D".into(),
    ]);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let listed = run(&argv[0], &args).unwrap();
    assert!(
        listed.contains("capstream:s2/cap1 (capstream: s2/cap1)"),
        "not listed from ~/.config/capstream/extcap.toml:\n{listed}"
    );

    // On-demand capture: tshark on s1's cap0 with a capture filter, beside tcpdump.
    let reference = t.dir.join("tcpdump.pcap");
    let tcpdump = start_tcpdump(&t.lab.cap, "cap0", "udp", &[], &reference).unwrap();
    let captured = t.dir.join("x.pcapng");
    let argv = t.command(
        Some(&t.viewer_token()),
        "tshark",
        &[
            "-i",
            "capstream:s1/cap0",
            "-f",
            "udp",
            "-a",
            "packets:500",
            "-w",
            &path(&captured),
        ],
    );
    let mut tshark = Proc::start("tshark", &argv, Stdio::null()).unwrap();
    let s1 = &mut t.sensors[0];
    s1.wait_for("on-demand capture 1 started", Duration::from_secs(30))
        .unwrap();
    let log = s1.stderr();
    assert!(log.contains("capture asked by viewer"), "{log}");
    // The filter runs in the kernel (auto: tc), opened as nobody with the capabilities kept.
    assert!(log.contains("cap0: --mode auto chose tc"), "{log}");
    assert!(
        log.contains("running as nobody") && log.contains("CAP_NET_RAW (to open on-demand"),
        "{log}"
    );
    t.lab.replay(0, &corpus::pcap(), PPS).unwrap();
    exits_cleanly(&mut tshark, Duration::from_secs(30));
    // tshark stopping stops the sensor's capture.
    assert!(
        wait_until(Duration::from_secs(10), || t.running_on("9101", "cap0")
            == 0),
        "the capture outlived tshark"
    );
    std::thread::sleep(Duration::from_millis(600));
    let expected = stop_reference(tcpdump, &reference);
    assert!(
        expected.len() >= 500,
        "the corpus has {} udp packets",
        expected.len()
    );
    let got = tcpdump_records(&captured, "").unwrap();
    // TC (the sensor's default mode here) reads the skb's own stamp, as tcpdump does.
    let skew = compare_captures(&expected[..500], &got, 0).unwrap();
    eprintln!("tshark on capstream:s1/cap0 -f udp: 500 packets equal to tcpdump's ({skew} ns)");
    // Logged on both sides with who asked.
    let receiver_log = t.receiver.proc.stderr();
    assert!(
        receiver_log.contains("asks for an on-demand capture on s1/cap0"),
        "{receiver_log}"
    );
}

#[test]
fn two_sensors_at_once_merged_in_time_order() {
    let t = OnDemandLab::new();
    let udp = tcpdump_records(&corpus::pcap(), "udp").unwrap().len();
    let out = t.dir.join("merged.pcapng");
    let limit = udp.to_string();
    let mut extcap = t.extcap(
        Some(&t.viewer_token()),
        &[
            "--capture",
            "--extcap-interface",
            "capstream:s1/cap0",
            "--also",
            "s2/cap1",
            "--extcap-capture-filter",
            "udp",
            "--limit-packets",
            &limit,
            "--fifo",
            &path(&out),
        ],
    );
    let receiver_log = || t.receiver.proc.stderr();
    assert!(
        wait_until(Duration::from_secs(30), || receiver_log()
            .contains("on-demand capture started on s1/cap0, s2/cap1")),
        "{}",
        receiver_log()
    );
    std::thread::scope(|scope| {
        let first = scope.spawn(|| t.lab.replay(0, &corpus::pcap(), PPS));
        t.lab.replay(1, &corpus::pcap(), PPS).unwrap();
        first.join().unwrap().unwrap();
    });
    // Each sensor stops at its packet limit: the whole udp part of the corpus.
    exits_cleanly(&mut extcap, Duration::from_secs(30));
    let names: Vec<String> = pcapng_interfaces(&out)
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["s1/cap0", "s2/cap1"]);
    let per_interface = |i: &str| {
        run(
            "tshark",
            &[
                "-r",
                &path(&out),
                "-Y",
                &format!("frame.interface_id == {i}"),
            ],
        )
        .unwrap()
        .lines()
        .count()
    };
    assert_eq!((per_interface("0"), per_interface("1")), (udp, udp));
    let times = run(
        "tshark",
        &["-r", &path(&out), "-T", "fields", "-e", "frame.time_epoch"],
    )
    .unwrap();
    let times: Vec<f64> = times.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(times.len(), 2 * udp);
    let out_of_order = times.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(out_of_order, 0, "packets out of time order");
    eprintln!("two sensors: {} packets merged in time order", times.len());
}

#[test]
fn refusals_are_one_clear_line_and_leave_the_sensors_untouched() {
    let t = OnDemandLab::new();
    // A sensor with a standing capture and no --allow-on-demand.
    let standing = start_sensor(
        Some(&t.lab.cap),
        &t.receiver,
        &["-i", "cap1", "--bpf", "udp", "--sensor-id", "s3"],
    )
    .unwrap();
    let wrong = t.dir.join("wrong-token");
    std::fs::write(&wrong, format!("{}\n", "5a".repeat(32))).unwrap();
    let (viewer, sensor_token, wrong) = (t.viewer_token(), t.state("token"), path(&wrong));
    let capture = |iface: &str, filter: &str| {
        vec![
            "--capture".to_string(),
            "--extcap-interface".into(),
            iface.into(),
            "--extcap-capture-filter".into(),
            filter.into(),
            "--fifo".into(),
            path(&t.dir.join("refused.pcapng")),
        ]
    };
    let cases: Vec<(Option<&str>, Vec<String>, &str)> = vec![
        (None, capture("capstream:s1/cap0", "udp"), "no viewer token"),
        (Some(&wrong), capture("capstream:s1/cap0", "udp"), "wrong viewer token"),
        (Some(&sensor_token), capture("capstream:s1/cap0", "udp"), "wrong viewer token"),
        (
            Some(&viewer),
            capture("capstream:s3/cap1", "udp"),
            "sensor s3: this sensor does not take on-demand captures (start it with --allow-on-demand)",
        ),
        (Some(&viewer), capture("capstream:s1/cap0", "udp and and"), "sensor s1: invalid filter"),
        (
            Some(&viewer),
            capture("capstream:s1/nope0", "udp"),
            "sensor s1: no interface \"nope0\" on this sensor",
        ),
    ];
    for (token, args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut extcap = t.extcap(*token, &args);
        let status = extcap.wait(Duration::from_secs(30)).unwrap();
        let stderr = extcap.stderr();
        assert!(!status.success(), "{needle}: accepted");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{needle}: not one line: {stderr}");
        assert!(
            lines[0].starts_with("capstream-extcap: error: the receiver refused: ")
                && lines[0].contains(needle),
            "expected {needle:?}, got {stderr}"
        );
        eprintln!("{}", lines[0]);
    }
    // Untouched: all three still connected and listed, none capturing.
    let mut list = t.extcap(Some(&viewer), &["--extcap-interfaces"]);
    exits_cleanly(&mut list, Duration::from_secs(30));
    assert_eq!(t.running_on("9101", "cap0"), 0);
    for mut sensor in t.sensors.into_iter().chain([standing]) {
        assert!(
            !sensor.stderr().contains("started for"),
            "a refused capture started: {}",
            sensor.stderr()
        );
        sensor.stop().unwrap();
    }
}

#[test]
fn captures_stop_at_their_packet_or_duration_limit_and_leave_the_sensors_tables() {
    let t = OnDemandLab::new();
    let token = t.viewer_token();
    // A packet limit: 100 of the replay's udp packets, then the capture is gone.
    let out = t.dir.join("limited.pcapng");
    let mut extcap = t.extcap(
        Some(&token),
        &[
            "--capture",
            "--extcap-interface",
            "capstream:s1/cap0",
            "--extcap-capture-filter",
            "udp",
            "--limit-packets",
            "100",
            "--fifo",
            &path(&out),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || t.running_on("9101", "cap0")
            == 1),
        "the capture never showed in the sensor's metrics"
    );
    t.lab.replay(0, &corpus::pcap(), PPS).unwrap();
    exits_cleanly(&mut extcap, Duration::from_secs(30));
    assert_eq!(tcpdump_records(&out, "").unwrap().len(), 100);
    assert!(
        wait_until(Duration::from_secs(10), || t.running_on("9101", "cap0")
            == 0),
        "the sensor still shows the capture"
    );
    // A duration limit, on a quiet interface.
    let mut extcap = t.extcap(
        Some(&token),
        &[
            "--capture",
            "--extcap-interface",
            "capstream:s2/cap1",
            "--limit-duration",
            "2s",
            "--fifo",
            &path(&t.dir.join("quiet.pcapng")),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || t.running_on("9102", "cap1")
            == 1),
        "the capture never showed in the sensor's metrics"
    );
    exits_cleanly(&mut extcap, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || t.running_on("9102", "cap1")
            == 0),
        "the sensor still shows the capture"
    );
    let text = prometheus::scrape(Some(&t.lab.cap), "127.0.0.1:9101").unwrap();
    let sent = prometheus::count(
        &text,
        "capstream_sensor_on_demand_packets_sent_total",
        &[("interface", "cap0")],
    );
    assert_eq!(sent, 100);
    let logs: Vec<String> = t.sensors.iter().map(Proc::stderr).collect();
    assert!(
        logs[0].contains("ended (packet limit (100))"),
        "{}",
        logs[0]
    );
    assert!(
        logs[1].contains("ended (duration limit (2000 ms))"),
        "{}",
        logs[1]
    );
    // And in the exit summary.
    for mut sensor in t.sensors {
        sensor.stop().unwrap();
        let log = sensor.stderr();
        assert!(
            log.contains("summary: on-demand: 1 capture(s) ended"),
            "{log}"
        );
    }
    // The receiver, which held two sessions of no interface, ends cleanly too.
    let mut receiver = t.receiver;
    receiver.stop().unwrap();
}

#[test]
fn a_viewer_certificate_from_viewer_ca_stands_for_the_token_and_a_sensor_certificate_does_not() {
    let dir = Scratch::new("on-demand-mtls").unwrap();
    let certs = |args: &[&str]| {
        let mut all = vec!["certs"];
        all.extend_from_slice(args);
        run(&path(&workspace_bin("receiver")), &all).unwrap();
    };
    let (viewers, sensors) = (path(&dir.join("viewer-pki")), path(&dir.join("sensor-pki")));
    certs(&["init", "--dir", &viewers]);
    certs(&["sensor", "alice", "--dir", &viewers]);
    certs(&["init", "--dir", &sensors]);
    certs(&["sensor", "tap-9", "--dir", &sensors]);
    let viewer_ca = format!("{viewers}/ca.crt");
    let t = OnDemandLab::with_receiver_args(dir, &["--viewer-ca", &viewer_ca]);
    let with_cert = |pki: &str, name: &str| {
        let (cert, key) = (format!("{pki}/{name}.crt"), format!("{pki}/{name}.key"));
        let mut extcap = t.extcap(
            None,
            &["--extcap-interfaces", "--cert", &cert, "--key", &key],
        );
        let status = extcap.wait(Duration::from_secs(30)).unwrap();
        (status.success(), extcap.stderr())
    };
    let (listed, log) = with_cert(&viewers, "alice");
    assert!(listed, "alice's certificate was refused: {log}");
    assert!(
        wait_until(Duration::from_secs(5), || t
            .receiver
            .proc
            .stderr()
            .contains("(certificate alice) listed 2 sensor(s)")),
        "{}",
        t.receiver.proc.stderr()
    );
    let (listed, log) = with_cert(&sensors, "tap-9");
    assert!(!listed, "a sensor certificate opened the viewer role");
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.contains("was not issued by the receiver's --viewer-ca"),
        "{log}"
    );
    eprintln!("{log}");
}

#[test]
fn several_captures_at_once_each_with_its_own_filter_and_counts() {
    let t = OnDemandLab::new();
    let token = t.viewer_token();
    let filters = ["udp", "tcp", "icmp or arp"];
    let mut running = Vec::new();
    for (i, filter) in filters.iter().enumerate() {
        // The reference filters live too: a VLAN tag the driver took off is no header then.
        let reference = t.dir.join(&format!("tcpdump-{i}.pcap"));
        let tcpdump = start_tcpdump(&t.lab.cap, "cap0", filter, &[], &reference).unwrap();
        // Each stops half way through its packets of the replay.
        let limit = tcpdump_records(&corpus::pcap(), filter).unwrap().len() / 2;
        assert!(limit > 10, "the corpus has few packets of {filter}");
        let out = t.dir.join(&format!("several-{i}.pcapng"));
        let extcap = t.extcap(
            Some(&token),
            &[
                "--capture",
                "--extcap-interface",
                "capstream:s1/cap0",
                "--extcap-capture-filter",
                filter,
                "--limit-packets",
                &limit.to_string(),
                "--fifo",
                &path(&out),
            ],
        );
        running.push((extcap, out, filter, limit, tcpdump, reference));
    }
    assert!(
        wait_until(Duration::from_secs(30), || t.running_on("9101", "cap0")
            == 3),
        "three captures never ran at once"
    );
    t.lab.replay(0, &corpus::pcap(), PPS).unwrap();
    for (extcap, ..) in &mut running {
        exits_cleanly(extcap, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_millis(600));
    for (_, out, filter, limit, tcpdump, reference) in running {
        let expected = stop_reference(tcpdump, &reference);
        assert!(
            expected.len() > limit,
            "{filter}: the reference has {}",
            expected.len()
        );
        let expected = &expected[..limit];
        let got = tcpdump_records(&out, "").unwrap();
        if let Err(difference) = compare_captures(expected, &got, 0) {
            panic!("filter {filter:?}: {difference}");
        }
        eprintln!(
            "filter {filter:?}: {} packets equal to tcpdump's",
            got.len()
        );
    }
    let log = t.sensors[0].stderr();
    for n in 1..=3 {
        assert!(
            log.contains(&format!("on-demand capture {n} for viewer")),
            "{log}"
        );
    }
}

#[test]
fn viewers_that_read_nothing_never_hold_a_sensors_standing_capture() {
    let t = OnDemandLab::new();
    // A sensor with its standing capture and on-demand captures on the same connection.
    let standing = start_sensor(
        Some(&t.lab.cap),
        &t.receiver,
        &[
            "-i",
            "cap0",
            "--bpf",
            "udp",
            "--allow-on-demand",
            "--sensor-id",
            "s4",
            "--metrics",
            "127.0.0.1:9104",
        ],
    )
    .unwrap();
    // Three viewers whose fifos nobody opens: they take nothing of their captures, which
    // together could fill the sensor connection's flow-control window (32 MiB).
    let mut viewers = Vec::new();
    for i in 0..3 {
        let fifo = t.dir.join(&format!("unread-{i}"));
        run("mkfifo", &[&path(&fifo)]).unwrap();
        viewers.push(t.extcap(
            Some(&t.viewer_token()),
            &[
                "--capture",
                "--extcap-interface",
                "capstream:s4/cap0",
                "--fifo",
                &path(&fifo),
            ],
        ));
    }
    assert!(
        wait_until(Duration::from_secs(30), || t.running_on("9104", "cap0")
            == 3),
        "the three captures never ran"
    );
    // 60 MB of UDP frames.
    let mac = t
        .lab
        .cap
        .exec("cat", &["/sys/class/net/cap0/address"])
        .unwrap();
    let xtask = path(&workspace_bin("xtask"));
    t.lab
        .gen
        .exec(
            &xtask,
            &[
                "generate",
                "--iface",
                "gen0",
                "--dst-mac",
                mac.trim(),
                "--size",
                "1500",
                "--count",
                "40000",
                "--rate",
                "10000",
            ],
        )
        .unwrap();
    // The standing capture gets every frame it matched to the receiver (those the kernel
    // ring could not take are counted apart) while the viewers still read nothing.
    let figures = || {
        let text = prometheus::scrape(Some(&t.lab.cap), "127.0.0.1:9104").unwrap_or_default();
        let of = |name, labels: &[(&str, &str)]| {
            prometheus::count(&text, name, &[&[("interface", "cap0")], labels].concat())
        };
        (
            of("capstream_sensor_packets_matched_total", &[]),
            of(
                "capstream_sensor_drops_total",
                &[("reason", "kernel_buffer")],
            ),
            of("capstream_sensor_packets_delivered_total", &[]),
        )
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            let (matched, kernel, delivered) = figures();
            matched + kernel == 40_000 && delivered == matched
        }),
        "the standing capture was held: {:?} (matched, kernel drops, delivered)",
        figures()
    );
    // Stopped as Wireshark stops them, they leave at once, and the receiver says what their
    // captures lost.
    for mut viewer in viewers {
        viewer.signal("TERM").unwrap();
        exits_cleanly(&mut viewer, Duration::from_secs(10));
    }
    let receiver = &t.receiver.proc;
    assert!(
        wait_until(Duration::from_secs(15), || receiver
            .stderr()
            .contains("packets dropped: the viewer read too slowly")),
        "{}",
        receiver.stderr()
    );
    drop(standing);
}
