//! A fleet on one S3 lake (a real SeaweedFS): three receivers sharing nothing but the lake
//! (and the fleet's CA and token), four sensors spread over them by rendezvous hashing,
//! a minute of traffic so that every receiver closes several segments, one receiver killed
//! (`kill -9`) halfway: its sensors fail over within 10 s and resend what it had not
//! acknowledged, it is started again and publishes what it had staged, and one query for
//! everything gives the union of the sensors' tcpdump captures, 0 missing and 0 duplicated
//! (a batch both receivers wrote is one answer).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use testbed::capstream::{number_after, start_tcpdump, stop_reference, Receiver, Scratch};
use testbed::fleet::{
    assert_failed_over_in_time, busiest, fleet_pki, placement, receiver_metrics, receiver_options,
    sensor_in, shared_token, Placement,
};
use testbed::lake::{assert_same_in_time_order, in_time_order, query_in};
use testbed::seaweedfs::SeaweedFs;
use testbed::{corpus, require_root, Lab, Proc};

const RECEIVERS: usize = 3;
const SENSORS: usize = 4;
/// Packets per second each link is replayed at: the corpus then lasts about a minute.
const PPS: u32 = 130;
/// Into the replay when the busiest receiver is killed, and when it is started again.
const KILL_AFTER: Duration = Duration::from_secs(20);
const RESTART_AFTER: Duration = Duration::from_secs(12);
const LAKE: &str = "s3://captures/fleet";

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn address(j: usize) -> String {
    format!("127.0.0.1:{}", 4441 + j)
}

#[test]
fn s3_lake_fleet_three_receivers_four_sensors_one_killed_nothing_missing_or_twice() {
    require_root();
    let lab = Lab::new(SENSORS).unwrap();
    let store = SeaweedFs::start(Some(&lab.cap)).unwrap();
    store.create_bucket("captures").unwrap();
    let env = store.aws_env();
    let wrapper = store.env_command();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let dir = Scratch::new("lakefleet").unwrap();
    let (ca, issued) = fleet_pki(&dir, RECEIVERS);
    let token = shared_token(&dir);

    // Receiver j: its own name, state and staging; the same lake.
    let start_receiver = |j: usize| -> Receiver {
        let name = format!("rx{j}");
        let staging = arg(&dir.join(&format!("staging{j}")));
        let mut args: Vec<String> = [
            "--lake",
            LAKE,
            "--receiver-name",
            &name,
            "--lake-staging",
            &staging,
            "--segment-time",
            "5s",
        ]
        .map(String::from)
        .into();
        args.extend(receiver_options(&issued, &token, j));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Receiver::start_through(
            Some(&lab.cap),
            &wrapper,
            &dir.join(&format!("state{j}")),
            4441 + j as u16,
            &args,
        )
        .unwrap()
    };
    let mut receivers: Vec<Receiver> = (0..RECEIVERS).map(start_receiver).collect();

    let references: Vec<PathBuf> = (0..SENSORS)
        .map(|i| dir.join(&format!("ref{i}.pcap")))
        .collect();
    let tcpdumps: Vec<Proc> = (0..SENSORS)
        .map(|i| start_tcpdump(&lab.cap, &lab.links[i].1, "", &[], &references[i]).unwrap())
        .collect();
    let every_receiver: Vec<String> = (0..RECEIVERS)
        .flat_map(|j| ["--receiver".to_string(), address(j)])
        .collect();
    let mut sensors = Vec::new();
    let mut placements: Vec<Placement> = Vec::new();
    for i in 0..SENSORS {
        let id = format!("s{i}");
        let mut args = vec![
            "-i",
            &lab.links[i].1,
            "--sensor-id",
            &id,
            "--ca",
            &arg(&ca),
            "--token-file",
            &arg(&token),
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
        args.extend(every_receiver.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut sensor = sensor_in(&lab.cap, &args);
        sensor.wait_for("ready:", Duration::from_secs(20)).unwrap();
        placements.push(placement(&mut sensor, &id));
        sensors.push(sensor);
    }
    let addresses: Vec<String> = (0..RECEIVERS).map(address).collect();
    let (victim, moved) = busiest(&placements, &addresses);

    let replays: Vec<Proc> = (0..SENSORS)
        .map(|i| {
            let mut argv = lab.gen.command("tcpreplay");
            argv.extend(
                [
                    "-q",
                    "--pps",
                    &PPS.to_string(),
                    "-i",
                    &lab.links[i].0,
                    &corpus::pcap_arg(),
                ]
                .map(String::from),
            );
            Proc::start("tcpreplay", &argv, Stdio::null()).unwrap()
        })
        .collect();
    std::thread::sleep(KILL_AFTER);
    let killed_at = Instant::now();
    receivers[victim].proc.signal("KILL").unwrap();
    receivers[victim]
        .proc
        .wait(Duration::from_secs(10))
        .unwrap();

    // Each of its sensors: the next receiver of its own order writes its packets.
    for i in &moved {
        let next = &placements[*i].order[1];
        let j = (0..RECEIVERS).find(|j| *next == address(*j)).unwrap();
        let id = format!("s{i}");
        assert_failed_over_in_time(
            &lab.cap,
            &sensors[*i],
            &id,
            next,
            &receiver_metrics(j),
            killed_at,
        );
    }
    // Started again with its state and staging: it publishes what the kill left staged.
    std::thread::sleep(RESTART_AFTER.saturating_sub(killed_at.elapsed()));
    receivers[victim] = start_receiver(victim);

    for mut replay in replays {
        replay.wait(Duration::from_secs(180)).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut expected = Vec::new();
    for (i, (tcpdump, file)) in tcpdumps.into_iter().zip(&references).enumerate() {
        let captured = stop_reference(tcpdump, file);
        assert_eq!(
            captured.len(),
            corpus::PACKETS,
            "s{i}: tcpdump saw the whole replay"
        );
        expected.extend(captured);
    }
    for sensor in &mut sensors {
        sensor.stop().unwrap();
    }
    // Every receiver closed several segments; the restarted one published the staged ones.
    for (j, receiver) in receivers.iter_mut().enumerate() {
        receiver.stop().unwrap();
        let log = receiver.proc.stderr();
        let published = number_after(&log, &format!("lake {LAKE}: ")).unwrap_or(0);
        eprintln!("rx{j}: {published} segment(s) published in its last run");
        if j == victim {
            assert!(log.contains("staged by an earlier run"), "rx{j}:\n{log}");
            assert!(published >= 1, "rx{j}:\n{log}");
        } else {
            assert!(published >= 3, "rx{j} closed several segments:\n{log}");
        }
    }

    let out = dir.join("answer.pcapng");
    let (got, stats) = query_in(Some(&lab.cap), &env, LAKE, &out, &["--stats"]).unwrap();
    eprintln!("{stats}");
    assert_same_in_time_order(&in_time_order(expected), &got, "the fleet's lake");
}
