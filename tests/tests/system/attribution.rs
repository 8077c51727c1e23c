//! `sensor --attribute`: every packet carries the process that sent or received it, to the
//! receiver's pcapng comments, read back with tshark.
//!
//! Two cgroups (on a cgroup2 mount of the test's own): `curl` runs in one, Python HTTP
//! clients in the other, all in the capture namespace, talking to `python3 -m http.server`
//! across the veth. One Python connection is opened before the sensor starts.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use testbed::capstream::{
    assert_refused, start_sensor, start_tcpdump, stop_reference, tcpdump_records, Receiver, Record,
    Scratch,
};

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use testbed::{require_root, run, wait_until, Lab, Proc};

/// The server's port, in the generator namespace (198.18.0.1).
const SERVER_PORT: u16 = 8000;
/// The clients' source ports: each flow is known by its own.
const LONG_LIVED_PORT: u16 = 40100;
const CURL_PORTS: [u16; 3] = [40001, 40002, 40003];
const PYTHON_PORT: u16 = 40200;

/// A cgroup2 hierarchy mounted in a scratch directory, with child cgroups; the children
/// are removed and the mount undone on drop.
struct Cgroups {
    mount: PathBuf,
    children: Vec<String>,
}

impl Cgroups {
    /// Child cgroups named `children`, at the top of the hierarchy.
    fn new(dir: &Scratch, children: Vec<String>) -> Self {
        let mount = dir.join("cgroup2");
        std::fs::create_dir_all(&mount).unwrap();
        run("mount", &["-t", "cgroup2", "none", mount.to_str().unwrap()]).unwrap();
        for child in &children {
            std::fs::create_dir(mount.join(child)).unwrap();
        }
        Self { mount, children }
    }

    /// The cgroup path of child `i`, as `/proc/PID/cgroup` shows it.
    fn path(&self, i: usize) -> String {
        format!("/{}", self.children[i])
    }

    /// The argument vector that runs `argv` in child `i`: a shell moves itself there, then
    /// becomes the program (same pid).
    fn command(&self, i: usize, argv: &[String]) -> Vec<String> {
        let procs = self.mount.join(&self.children[i]).join("cgroup.procs");
        let mut v: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > {} && exec \"$@\"", procs.display()),
            "sh".into(),
        ];
        v.extend_from_slice(argv);
        v
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for child in &self.children {
            let dir = self.mount.join(child);
            // The processes are gone once their Proc dropped: wait for the kernel to see it.
            wait_until(Duration::from_secs(5), || std::fs::remove_dir(&dir).is_ok());
        }
        let _ = run("umount", &[self.mount.to_str().unwrap()]);
    }
}

/// One packet as tshark reads it from the receiver's pcapng.
struct Row {
    src_port: u16,
    dst_port: u16,
    flags: u16,
    comment: String,
}

fn rows(file: &Path) -> Vec<Row> {
    let out = run(
        "tshark",
        &[
            "-r",
            file.to_str().unwrap(),
            "-n",
            "-Y",
            "tcp",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "tcp.flags",
            "-e",
            "frame.comment",
        ],
    )
    .unwrap();
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, '|').collect();
            Row {
                src_port: f[0].parse().unwrap(),
                dst_port: f[1].parse().unwrap(),
                flags: u16::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap(),
                // tshark shows the comment's line breaks as "\n".
                comment: f.get(3).unwrap_or(&"").replace("\\n", "\n"),
            }
        })
        .collect()
}

/// capstream's Private Enterprise Number in the pcapng custom option (provisional: RFC 5612's
/// documentation number, see the README).
const CAPSTREAM_PEN: u32 = 32473;

/// Reads a pcapng file back on its own (not through tshark): every packet with a comment
/// has capstream's custom option too (and none without), its JSON naming the process the
/// comment names. Returns how many packets carry both; tshark's dissection of the file's
/// blocks must find as many custom UTF-8 options (code 2988).
fn custom_options(file: &Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
    let mut both = 0;
    while let Some(block) = reader.next_block() {
        let Block::EnhancedPacket(epb) = block.unwrap().0 else {
            continue;
        };
        let (mut comment, mut fields) = (None, None);
        for option in &epb.options {
            match option {
                EnhancedPacketOption::Common(CommonOption::Comment(c)) => {
                    comment = Some(c.to_string());
                }
                EnhancedPacketOption::Common(CommonOption::CustomUtf8Copiable(custom))
                    if custom.pen == CAPSTREAM_PEN =>
                {
                    fields =
                        Some(serde_json::from_str::<serde_json::Value>(&custom.value).unwrap());
                }
                _ => {}
            }
        }
        match (comment, fields) {
            (None, None) => {}
            (Some(comment), Some(fields)) => {
                let pid = fields["pid"].as_u64().unwrap() as u32;
                let comm = fields["thread_name"].as_str().unwrap();
                let cgroup = fields["cgroup"].as_str().unwrap();
                assert!(
                    names(&comment, pid, comm, cgroup),
                    "the custom option's {fields} against the comment {comment:?}"
                );
                both += 1;
            }
            other => panic!("a comment without the custom option, or the reverse: {other:?}"),
        }
    }
    let codes = run(
        "tshark",
        &[
            "-r",
            file.to_str().unwrap(),
            "-X",
            "read_format:MIME Files Format",
            "-T",
            "fields",
            "-e",
            "pcapng.options.option.code",
        ],
    )
    .unwrap();
    let seen_by_tshark = codes
        .split([',', '\n', '\t'])
        .filter(|code| code.trim() == "2988")
        .count();
    assert_eq!(seen_by_tshark, both, "custom options tshark finds");
    both
}

/// The client's end of a row's flow (the port that is not the server's).
fn client_port(row: &Row) -> u16 {
    if row.src_port == SERVER_PORT {
        row.dst_port
    } else {
        row.src_port
    }
}

/// Asserts that every row's comment names the process (pid, name, cgroup); `what` says
/// which flow, for the message.
fn all_name(what: &str, rows: &[&Row], (pid, comm, cgroup): (u32, &str, &str)) {
    for row in rows {
        assert!(
            names(&row.comment, pid, comm, cgroup),
            "{what} ({comm}, pid {pid}, {cgroup}): packet {} -> {} flags {:#x} has {:?}",
            row.src_port,
            row.dst_port,
            row.flags,
            row.comment
        );
    }
}

/// Whether a comment names this process.
fn names(comment: &str, pid: u32, comm: &str, cgroup: &str) -> bool {
    let lines: Vec<&str> = comment.lines().collect();
    lines.contains(&format!("PID: {pid}").as_str())
        && lines.contains(&format!("ThreadName: {comm}").as_str())
        && lines.contains(&format!("Cgroup: {cgroup}").as_str())
}

/// A Python client holding one keep-alive connection from `port`: one request per line of
/// its stdin.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, sys
c = http.client.HTTPConnection("198.18.0.1", 8000, source_address=("198.18.0.2", int(sys.argv[1])))
for line in sys.stdin:
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    print(r.status, flush=True)
c.close()
"#;

/// A container id of this test's own: docker's shape (64 hex digits).
fn container_id(i: usize) -> String {
    format!("{:064x}", u128::from(std::process::id()) << 8 | i as u128)
}

/// The client port of a connection no process of the capture namespace owns: from the
/// generator's side to a port nobody listens on (a SYN in, a RST out).
const STRAY_PORT: u16 = 40300;

/// One run of the set-up: the sensor's mode and flags, the receiver's, and what happens.
#[derive(Clone, Copy, Default)]
struct Setup<'a> {
    mode: &'a str,
    sensor_args: &'a [&'a str],
    /// An expression tcpdump's packets are restricted with, for [`Outcome::reference`].
    restrict: &'a str,
    fate: ReceiverFate,
    /// `receiver --split-by` this: [`Outcome::files`] instead of one file.
    split_by: Option<&'a str>,
    /// The two cgroups are named as docker names its containers' (`docker-<id>.scope`).
    containers: bool,
    /// Also a connection no process owns ([`STRAY_PORT`]).
    stray: bool,
    /// The sensor keeps what its memory buffer (4 MiB) cannot hold in a spool on disk, and
    /// while the receiver is dead curl fetches [`BIG_FILE`] bytes from [`BIG_PORT`]: more
    /// than the buffer holds.
    spool: bool,
    /// Two servers in the capture namespace, in the second cgroup: one listening before the
    /// sensor starts ([`SERVED_PORTS`]`[0]`), one after; a client in the other namespace
    /// fetches from each ([`Outcome::served`]).
    servers: bool,
}

/// The capture side's own servers ([`Setup::servers`]), and the client ports of the
/// connections they accept.
const SERVED_PORTS: [u16; 2] = [8001, 8002];
const SERVED_CLIENT_PORTS: [u16; 2] = [40401, 40402];

/// The download that fills the sensor's buffer while the receiver is dead: random bytes,
/// which do not compress.
const BIG_FILE: usize = 8 << 20;
const BIG_PORT: u16 = 40004;

/// What one run of the set-up gave: the receiver's packets (as tshark and tcpdump read
/// them), tcpdump's on the same interface restricted by `restrict`, and who ran what.
struct Outcome {
    rows: Vec<Row>,
    got: Vec<Record>,
    reference: Vec<Record>,
    /// Client port → (pid, name, cgroup) of the flows opened after the sensor started.
    expected: HashMap<u16, (u32, &'static str, String)>,
    /// Client port → (pid, name, cgroup) of the server that accepted the connection
    /// ([`Setup::servers`]).
    served: HashMap<u16, (u32, &'static str, String)>,
    long_lived: (u32, String),
    /// Packets with capstream's custom option beside their comment ([`custom_options`]).
    custom_options: usize,
    /// With `--split-by`: each file the receiver wrote (its name) and its packets; tcpdump's
    /// packets of each client port.
    files: Vec<(String, Vec<Record>)>,
    by_port: HashMap<u16, Vec<Record>>,
}

/// The set-up of the module documentation, with a sensor in `--mode <mode>` plus
/// `sensor_args` and tcpdump beside it (inbound only for xdp, which sees only that);
/// tcpdump's packets are then restricted with `restrict`. The selectors may name the
/// cgroups: `{curl}` and `{python}` stand for their paths.
fn run_clients(mode: &str, sensor_args: &[&str], restrict: &str) -> Outcome {
    run_clients_with(Setup {
        mode,
        sensor_args,
        restrict,
        ..Setup::default()
    })
}

/// Whether the receiver lives through the run, or is killed (SIGKILL) before the new flows
/// and started again after them: the sensor keeps their batches and sends them again.
#[derive(Clone, Copy, PartialEq, Default)]
enum ReceiverFate {
    #[default]
    Lives,
    KilledAndRestarted,
}

fn run_clients_with(setup: Setup) -> Outcome {
    let Setup {
        mode,
        sensor_args,
        restrict,
        fate,
        ..
    } = setup;
    let lab = Lab::new(1).unwrap();
    let dir = Scratch::new("attribution").unwrap();
    let children = if setup.containers {
        (0..2)
            .map(|i| format!("docker-{}.scope", container_id(i)))
            .collect()
    } else {
        ["curl", "python"]
            .map(|n| format!("capstream-attr-{}-{n}", std::process::id()))
            .to_vec()
    };
    let cgroups = Cgroups::new(&dir, children);
    std::fs::write(dir.join("index.html"), "capstream\n".repeat(200)).unwrap();

    let mut server_argv = lab.gen.command("python3");
    server_argv.extend(
        [
            "-m",
            "http.server",
            "--protocol",
            "HTTP/1.1",
            "--bind",
            "198.18.0.1",
            "--directory",
            dir.join("").to_str().unwrap(),
            "8000",
        ]
        .map(String::from),
    );
    let _server = Proc::start("http.server", &server_argv, Stdio::null()).unwrap();
    assert!(wait_until(Duration::from_secs(10), || lab
        .cap
        .exec(
            "curl",
            &["-s", "-o", "/dev/null", "http://198.18.0.1:8000/"]
        )
        .is_ok()));

    // The long-lived connection, opened before the sensor starts.
    let mut py = lab.cap.command("python3");
    py.extend(["-c", KEEP_ALIVE_CLIENT, &LONG_LIVED_PORT.to_string()].map(String::from));
    let py = cgroups.command(1, &py);
    let mut long_lived = Command::new(&py[0])
        .args(&py[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let long_lived_pid = long_lived.id();
    let mut requests = long_lived.stdin.take().unwrap();
    let mut replies = std::io::BufReader::new(long_lived.stdout.take().unwrap());
    let mut request = || {
        use std::io::BufRead;
        writeln!(requests, "GET").unwrap();
        let mut status = String::new();
        replies.read_line(&mut status).unwrap();
        assert_eq!(status.trim(), "200");
    };
    request();

    let receiver_args: Vec<&str> = match setup.split_by {
        Some(by) => vec!["--split-by", by],
        None => Vec::new(),
    };
    let (mut receiver, out) =
        Receiver::writing(Some(&lab.cap), &dir, "capture.pcapng", &receiver_args).unwrap();
    // A server of the capture side, in the second cgroup, on `port`.
    let serve = |port: u16| {
        let mut argv = lab.cap.command("python3");
        argv.extend(
            [
                "-m",
                "http.server",
                "--bind",
                "198.18.0.2",
                "--directory",
                dir.join("").to_str().unwrap(),
                &port.to_string(),
            ]
            .map(String::from),
        );
        let server = Proc::start(
            "capture-side server",
            &cgroups.command(1, &argv),
            Stdio::null(),
        )
        .unwrap();
        let listening = format!("ss -Htln 'sport = :{port}' | grep -q LISTEN");
        assert!(wait_until(Duration::from_secs(10), || lab
            .cap
            .exec("sh", &["-c", &listening])
            .is_ok()));
        server
    };
    let mut servers = Vec::new();
    if setup.servers {
        servers.push(serve(SERVED_PORTS[0]));
    }
    let filter = if setup.servers {
        format!(
            "tcp port {SERVER_PORT} or tcp port {} or tcp port {}",
            SERVED_PORTS[0], SERVED_PORTS[1]
        )
    } else {
        format!("tcp port {SERVER_PORT}")
    };
    let (curl_cgroup, python_cgroup) = (cgroups.path(0), cgroups.path(1));
    let spool_dir = dir.join("spool");
    let spool_arg = spool_dir.to_string_lossy().into_owned();
    let mut args: Vec<&str> = vec!["--iface", "cap0", "--mode", mode, "--bpf", &filter];
    if setup.spool {
        args.extend(["--spool-dir", &spool_arg, "--buffer", "4MiB"]);
        let mut random = vec![0u8; BIG_FILE];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
            .unwrap();
        std::fs::write(dir.join("big.bin"), random).unwrap();
    }
    args.extend(sensor_args.iter().map(|a| match *a {
        "{curl}" => curl_cgroup.as_str(),
        "{python}" => python_cgroup.as_str(),
        other => other,
    }));
    let mut sensor = start_sensor(Some(&lab.cap), &receiver, &args).unwrap();
    let reference_file = dir.join("tcpdump.pcap");
    let direction: &[&str] = if mode == "xdp" { &["-Q", "in"] } else { &[] };
    let tcpdump = start_tcpdump(&lab.cap, "cap0", &filter, direction, &reference_file).unwrap();

    for _ in 0..5 {
        request();
    }
    let mut served = HashMap::new();
    if setup.servers {
        servers.push(serve(SERVED_PORTS[1]));
        for ((server, port), client_port) in
            servers.iter().zip(SERVED_PORTS).zip(SERVED_CLIENT_PORTS)
        {
            let mut argv = lab.gen.command("curl");
            argv.extend(
                [
                    "-sf",
                    "-o",
                    "/dev/null",
                    "--local-port",
                    &client_port.to_string(),
                    &format!("http://198.18.0.2:{port}/"),
                ]
                .map(String::from),
            );
            let mut curl = Proc::start("curl to the capture side", &argv, Stdio::null()).unwrap();
            assert!(curl.wait(Duration::from_secs(30)).unwrap().success());
            served.insert(client_port, (server.pid(), "python3", cgroups.path(1)));
        }
    }
    if fate == ReceiverFate::KilledAndRestarted {
        receiver.proc.signal("KILL").unwrap();
        receiver.proc.wait(Duration::from_secs(10)).unwrap();
    }
    // New flows: curl in one cgroup, a Python client in the other.
    let mut expected = HashMap::new();
    // curl in the first cgroup, fetching `path` from `port`: its pid once it is done.
    let curl = |port: u16, path: &str| {
        let mut argv = lab.cap.command("curl");
        argv.extend(
            [
                "-s",
                "-o",
                "/dev/null",
                "--local-port",
                &port.to_string(),
                &format!("http://198.18.0.1:8000/{path}"),
            ]
            .map(String::from),
        );
        let argv = cgroups.command(0, &argv);
        let mut curl = Proc::start("curl", &argv, Stdio::null()).unwrap();
        let pid = curl.pid();
        assert!(curl.wait(Duration::from_secs(60)).unwrap().success());
        pid
    };
    for port in CURL_PORTS {
        expected.insert(port, (curl(port, ""), "curl", cgroups.path(0)));
    }
    let mut argv = lab.cap.command("python3");
    argv.extend(["-c", &python_client(PYTHON_PORT)].map(String::from));
    let argv = cgroups.command(1, &argv);
    let mut client = Proc::start("python client", &argv, Stdio::null()).unwrap();
    let python_pid = client.pid();
    assert!(client.wait(Duration::from_secs(20)).unwrap().success());
    expected.insert(PYTHON_PORT, (python_pid, "python3", cgroups.path(1)));
    if setup.spool {
        let pid = curl(BIG_PORT, "big.bin");
        expected.insert(BIG_PORT, (pid, "curl", cgroups.path(0)));
        // Past the 4 MiB buffer: on disk, while the receiver is away.
        let spooled: u64 = std::fs::read_dir(&spool_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        assert!(spooled > 0, "nothing in the spool");
    }
    if setup.stray {
        let mut argv = lab.gen.command("curl");
        argv.extend(
            [
                "-s",
                "--local-port",
                &STRAY_PORT.to_string(),
                "http://198.18.0.2:8000/",
            ]
            .map(String::from),
        );
        // Refused: nobody listens there.
        let mut stray = Proc::start("stray curl", &argv, Stdio::null()).unwrap();
        stray.wait(Duration::from_secs(20)).unwrap();
    }
    if fate == ReceiverFate::KilledAndRestarted {
        (receiver, _) =
            Receiver::writing(Some(&lab.cap), &dir, "capture.pcapng", &receiver_args).unwrap();
        sensor
            .wait_for("reconnected", Duration::from_secs(90))
            .unwrap();
    }

    request();
    drop(requests);
    long_lived.wait().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    stop_reference(tcpdump, &reference_file);
    sensor.stop().unwrap();
    receiver.stop().unwrap();
    let reference = tcpdump_records(&reference_file, restrict).unwrap();
    let long_lived = (long_lived_pid, cgroups.path(1));
    if setup.split_by.is_some() {
        let mut files: Vec<(String, Vec<Record>)> = std::fs::read_dir(&dir.path)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("capture-") && name.ends_with(".pcapng"))
            .map(|name| {
                let records = tcpdump_records(&dir.join(&name), "").unwrap();
                (name, records)
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let ports = expected
            .keys()
            .copied()
            .chain([LONG_LIVED_PORT, STRAY_PORT]);
        let by_port = ports
            .map(|port| {
                let filter = format!("tcp port {port}");
                (port, tcpdump_records(&reference_file, &filter).unwrap())
            })
            .collect();
        return Outcome {
            rows: Vec::new(),
            custom_options: 0,
            got: Vec::new(),
            reference,
            expected,
            served,
            long_lived,
            files,
            by_port,
        };
    }
    Outcome {
        rows: rows(&out),
        custom_options: custom_options(&out),
        got: tcpdump_records(&out, "").unwrap(),
        reference,
        expected,
        served,
        long_lived,
        files: Vec::new(),
        by_port: HashMap::new(),
    }
}

/// A Python client that makes one request from `port` and leaves.
fn python_client(port: u16) -> String {
    format!(
        "import http.client\n\
         c = http.client.HTTPConnection('198.18.0.1', 8000, source_address=('198.18.0.2', {port}))\n\
         c.request('GET', '/')\n\
         assert c.getresponse().read()\n\
         c.close()"
    )
}

#[test]
fn every_packet_carries_its_process_in_tc_mode() {
    every_packet_carries_its_process("tc");
}

#[test]
fn every_packet_carries_its_process_in_ebpf_mode() {
    every_packet_carries_its_process("ebpf");
}

/// XDP sees the inbound half: the replies, found by flow.
#[test]
fn every_packet_carries_its_process_in_xdp_mode() {
    every_packet_carries_its_process("xdp");
}

/// libpcap's frames pass no program of ours: the sensor finds their owners itself, by flow,
/// in the tables the cgroup hooks fill.
#[test]
fn every_packet_carries_its_process_in_pcap_mode() {
    every_packet_carries_its_process("pcap");
}

fn every_packet_carries_its_process(mode: &str) {
    require_root();
    check_attribution(mode, run_clients(mode, &["--attribute"], ""));
}

/// A connection a server of the capture side accepted carries the server's process, both
/// ways, from the end of its handshake (the kernel's sock_ops hook gives it the owner of the
/// port it was accepted on): for a server listening before the sensor started (found in
/// /proc) and for one started after (found by the bind hook).
#[test]
fn accepted_connections_carry_the_servers_process_in_tc_mode() {
    accepted_connections_carry_the_servers_process("tc");
}

#[test]
fn accepted_connections_carry_the_servers_process_in_ebpf_mode() {
    accepted_connections_carry_the_servers_process("ebpf");
}

/// libpcap's frames are looked up by the sensor, in the same tables.
#[test]
fn accepted_connections_carry_the_servers_process_in_pcap_mode() {
    accepted_connections_carry_the_servers_process("pcap");
}

fn accepted_connections_carry_the_servers_process(mode: &str) {
    require_root();
    let outcome = run_clients_with(Setup {
        mode,
        sensor_args: &["--attribute"],
        servers: true,
        ..Setup::default()
    });
    assert_eq!(outcome.served.len(), 2);
    for (port, (pid, comm, cgroup)) in &outcome.served {
        let flow: Vec<&Row> = outcome
            .rows
            .iter()
            .filter(|r| r.src_port == *port || r.dst_port == *port)
            .collect();
        let fin = flow.iter().filter(|r| r.flags & 0x01 != 0).count();
        assert!(
            flow.len() >= 8 && fin >= 2,
            "{mode}: served flow {port}: {} packets, {fin} FIN",
            flow.len()
        );
        // SYN, SYN-ACK and the client's first ACK pass the capture before the connection
        // is established; every packet after them names the server.
        let (handshake, established) = flow.split_at(3);
        assert!(handshake[0].flags & 0x02 != 0 && handshake[1].flags & 0x12 == 0x12);
        let what = format!("{mode}: served flow {port}");
        all_name(&what, established, (*pid, *comm, cgroup.as_str()));
    }
    // Nothing lost for the comments: the receiver has every packet tcpdump saw.
    assert_eq!(sorted(&outcome.got), sorted(&outcome.reference));
}

/// The flows opened while the receiver was dead reach it when the sensor sends their
/// batches again, each with its process table.
#[test]
fn attribution_survives_a_receiver_killed_and_restarted() {
    require_root();
    let outcome = run_clients_with(Setup {
        mode: "tc",
        sensor_args: &["--attribute"],
        fate: ReceiverFate::KilledAndRestarted,
        ..Setup::default()
    });
    check_attribution("tc", outcome);
}

/// Every packet of the flows opened after the sensor started names its process; the flow
/// opened before, at least 99% of its packets; and no packet is missing.
fn check_attribution(mode: &str, outcome: Outcome) {
    let rows = &outcome.rows;
    // SYN (or SYN-ACK) to FIN, both ways, or inbound only.
    let ways = if mode == "xdp" { 1 } else { 2 };
    for (port, (pid, comm, cgroup)) in &outcome.expected {
        let flow: Vec<&Row> = rows.iter().filter(|r| client_port(r) == *port).collect();
        let syn = flow.iter().filter(|r| r.flags & 0x02 != 0).count();
        let fin = flow.iter().filter(|r| r.flags & 0x01 != 0).count();
        assert!(
            syn >= ways && fin >= ways,
            "{mode}: flow {port}: {syn} SYN, {fin} FIN of {}",
            flow.len()
        );
        all_name(
            &format!("{mode}: flow {port}"),
            &flow,
            (*pid, *comm, cgroup.as_str()),
        );
    }
    let commented = rows.iter().filter(|r| !r.comment.is_empty()).count();
    assert_eq!(
        outcome.custom_options, commented,
        "{mode}: every commented packet has the custom option"
    );
    // Nothing lost for the comments: the receiver has every packet tcpdump saw.
    assert_eq!(sorted(&outcome.got), sorted(&outcome.reference));
    let (long_lived_pid, long_lived_cgroup) = &outcome.long_lived;
    let long: Vec<&Row> = rows
        .iter()
        .filter(|r| client_port(r) == LONG_LIVED_PORT)
        .collect();
    let right = long
        .iter()
        .filter(|r| names(&r.comment, *long_lived_pid, "python3", long_lived_cgroup))
        .count();
    let share = right as f64 * 100.0 / long.len().max(1) as f64;
    eprintln!(
        "attribution, --mode {mode}: the flow opened before the sensor: {right} of {} packets \
         attributed ({share:.1}%)",
        long.len()
    );
    assert!(
        long.len() >= 5 * ways,
        "{mode}: the long-lived flow: {} packets",
        long.len()
    );
    assert!(
        share >= 99.0,
        "{mode}: the long-lived flow: {share:.1}% attributed"
    );
}

/// Packets as a multiset: the two directions may interleave differently at the two taps.
fn sorted(records: &[Record]) -> Vec<(u32, Vec<u8>)> {
    let mut v: Vec<(u32, Vec<u8>)> = records
        .iter()
        .map(|r| (r.original_len, r.data.clone()))
        .collect();
    v.sort();
    v
}

/// While the receiver is dead, the batches past the sensor's memory buffer wait in its
/// spool on disk; read back and sent once it is back, they still carry their processes.
#[test]
fn attribution_survives_the_spool() {
    require_root();
    let outcome = run_clients_with(Setup {
        mode: "tc",
        sensor_args: &["--attribute"],
        fate: ReceiverFate::KilledAndRestarted,
        spool: true,
        ..Setup::default()
    });
    check_attribution("tc", outcome);
}

/// `receiver --split-by process`: a file per process, each exactly tcpdump's capture of
/// that process's connections (by port), the connection no process owns in "unattributed".
#[test]
fn split_by_process_gives_each_process_its_file() {
    require_root();
    let outcome = run_clients_with(Setup {
        mode: "tc",
        sensor_args: &["--attribute"],
        split_by: Some("process"),
        stray: true,
        ..Setup::default()
    });
    let mut want: Vec<(String, Vec<u16>)> = outcome
        .expected
        .iter()
        .map(|(port, (pid, comm, _))| (format!("-{comm}-{pid}.pcapng"), vec![*port]))
        .collect();
    want.push((
        format!("-python3-{}.pcapng", outcome.long_lived.0),
        vec![LONG_LIVED_PORT],
    ));
    want.push(("capture-unattributed.pcapng".into(), vec![STRAY_PORT]));
    check_split(&outcome, &want);
}

/// `receiver --split-by container`: the two cgroups, named as docker's containers, each
/// get a file with exactly tcpdump's capture of their processes' connections (by port).
#[test]
fn split_by_container_gives_each_container_its_file() {
    require_root();
    let outcome = run_clients_with(Setup {
        mode: "tc",
        sensor_args: &["--attribute"],
        split_by: Some("container"),
        containers: true,
        stray: true,
        ..Setup::default()
    });
    let want = [
        (
            format!("capture-{}.pcapng", container_id(0)),
            CURL_PORTS.to_vec(),
        ),
        (
            format!("capture-{}.pcapng", container_id(1)),
            vec![LONG_LIVED_PORT, PYTHON_PORT],
        ),
        ("capture-unattributed.pcapng".into(), vec![STRAY_PORT]),
    ];
    check_split(&outcome, &want);
}

/// The receiver wrote exactly one file per entry of `want` (named `capture-…` ending in
/// the entry's name), each holding exactly tcpdump's packets of the entry's client ports.
fn check_split(outcome: &Outcome, want: &[(String, Vec<u16>)]) {
    let names: Vec<&String> = outcome.files.iter().map(|(name, _)| name).collect();
    assert_eq!(outcome.files.len(), want.len(), "files: {names:?}");
    for (suffix, ports) in want {
        let Some((name, records)) = outcome
            .files
            .iter()
            .find(|(n, _)| n.ends_with(suffix.as_str()))
        else {
            panic!("no file ending in {suffix}: {names:?}");
        };
        let reference: Vec<Record> = ports
            .iter()
            .flat_map(|port| outcome.by_port[port].iter().cloned())
            .collect();
        assert!(
            !reference.is_empty(),
            "{name}: tcpdump saw none of {ports:?}"
        );
        assert!(
            sorted(records) == sorted(&reference),
            "{name}: {} packets, tcpdump on ports {ports:?}: {}",
            records.len(),
            reference.len()
        );
    }
}

/// `--comm curl` takes exactly the packets of curl's connections, both ways.
#[test]
fn comm_selector_takes_exactly_curls_connections() {
    let ports: Vec<String> = CURL_PORTS.iter().map(|p| format!("port {p}")).collect();
    selector_takes_exactly("tc", &["--comm", "curl"], &ports.join(" or "), 3 * 10);
}

/// In `--mode pcap` the sensor applies the selector itself, after libpcap's filter.
#[test]
fn comm_selector_in_pcap_mode_takes_exactly_curls_connections() {
    let ports: Vec<String> = CURL_PORTS.iter().map(|p| format!("port {p}")).collect();
    selector_takes_exactly("pcap", &["--comm", "curl"], &ports.join(" or "), 3 * 10);
}

/// `--cgroup` of the Python clients' cgroup takes exactly their connections, the one opened
/// before the sensor included.
#[test]
fn cgroup_selector_takes_exactly_that_cgroups_connections() {
    let ports = format!("port {LONG_LIVED_PORT} or port {PYTHON_PORT}");
    selector_takes_exactly("tc", &["--cgroup", "{python}"], &ports, 20);
}

/// With `selector`, the sensor's packets (in `--mode <mode>`) are exactly tcpdump's on the
/// client ports `ports` (a tcpdump expression), at least `at_least` of them.
fn selector_takes_exactly(mode: &str, selector: &[&str], ports: &str, at_least: usize) {
    require_root();
    let restrict = format!("tcp port {SERVER_PORT} and ({ports})");
    let outcome = run_clients(mode, selector, &restrict);
    let (got, reference) = (sorted(&outcome.got), sorted(&outcome.reference));
    assert!(reference.len() >= at_least, "{} packets", reference.len());
    assert!(
        got == reference,
        "{selector:?}: {} packets, tcpdump restricted to {ports}: {}",
        got.len(),
        reference.len()
    );
}

/// Both programs' `--help` say that classic pcap has no place for a packet's process.
#[test]
fn help_says_classic_pcap_has_no_place_for_the_process() {
    for program in ["receiver", "sensor"] {
        let binary = testbed::bin_dir().join(program);
        let help = run(binary.to_str().unwrap(), &["--help"]).unwrap();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("classic pcap has no place for it")
                || help.contains("classic pcap output has no place for them"),
            "{program} --help"
        );
    }
}

/// Bad selectors, and attribution in the mode without an owner lookup (AF_XDP, whose
/// frames leave the kernel before any): one line, exit code 2.
#[test]
fn bad_input_is_refused_in_one_line() {
    require_root();
    let fingerprint = "ab".repeat(32);
    let sensor = |mode: &str, args: &[&str], needle: &str| {
        let mut all = vec![
            "--receiver",
            "127.0.0.1:4433",
            "--fingerprint",
            &fingerprint,
            "--iface",
            "lo",
            "--mode",
            mode,
        ];
        all.extend_from_slice(args);
        assert_refused("sensor", &all, needle);
    };
    sensor("tc", &["--pid", "0"], "--pid");
    sensor("tc", &["--pid", "many"], "--pid");
    // Past pid_max: no such process can exist.
    sensor("tc", &["--pid", "4194305"], "no such process");
    sensor("tc", &["--comm", "a-name-of-16-bytes"], "15 bytes");
    sensor(
        "tc",
        &["--cgroup", "/capstream-no-such-cgroup"],
        "no such cgroup",
    );
    sensor("tc", &["--container", "0123456789ab"], "no container");
    sensor("afxdp", &["--attribute"], "work with --mode tc");
    sensor("afxdp", &["--comm", "curl"], "work with --mode tc");
}
