//! The deployment files, checked since no init system, container runtime or cluster runs
//! here. The systemd units in `deploy/systemd/`: neither runs as root, the sensor's
//! capability set is the one README.md documents for the default mode, the receiver has
//! none, and each starts a binary this workspace builds. The Kubernetes manifests in
//! `deploy/kubernetes/`: the sensor DaemonSet on the host network with that same set and not
//! privileged, the receiver Deployment and Service agreeing on ports with the receiver's
//! configuration, which the real binaries accept (`--check-config`). The Dockerfile: both
//! programs with the eBPF object, run unprivileged.
//!
//! `systemd-analyze verify` parses them too (it needs the binaries at the ExecStart paths):
//!
//! ```sh
//! systemd-analyze verify --man=no deploy/systemd/*.service
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// A unit file's `[Service]` assignments, in order (a key may repeat).
fn service_section(unit: &str) -> Vec<(String, String)> {
    let path = repo().join("deploy/systemd").join(unit);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{unit}: keep each setting on one line"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{unit}: not an assignment: {line}"));
        if section == "Service" {
            out.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    out
}

/// The last value of `key` (systemd's rule for single-valued settings).
fn value<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn words(value: Option<&str>) -> BTreeSet<String> {
    value
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The capabilities README.md lists as needed to start `mode` in its "Privileges" table.
fn documented_start_set(mode: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n### Privileges")
        .nth(1)
        .expect("README.md has a Privileges section");
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| `{mode}`")))
        .unwrap_or_else(|| panic!("no row for {mode} in README.md's Privileges table"));
    let start = row.split('|').nth(2).expect("a 'needs to start' column");
    start
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("CAP_"))
        .collect()
}

/// Whether `name` is a binary of this workspace: a member package of that name with a
/// `src/main.rs`.
fn is_workspace_bin(name: &str) -> bool {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let member = manifest.contains(&format!("\"{name}\""));
    let package = std::fs::read_to_string(repo().join(name).join("Cargo.toml"))
        .is_ok_and(|m| m.contains(&format!("name = \"{name}\"")));
    member && package && repo().join(name).join("src/main.rs").exists()
}

/// Checks what both units must have: a dedicated unprivileged user, no_new_privs, a
/// read-only system, and an ExecStart running `binary` (a workspace binary).
fn check_common(unit: &str, settings: &[(String, String)], binary: &str) {
    let user = value(settings, "User");
    let dynamic = value(settings, "DynamicUser") == Some("yes");
    assert!(
        dynamic || user.is_some_and(|u| !u.is_empty()),
        "{unit}: runs as root (set User= or DynamicUser=yes)"
    );
    assert!(
        !matches!(user, Some("root" | "0")),
        "{unit}: must not run as root"
    );
    assert_eq!(value(settings, "NoNewPrivileges"), Some("yes"), "{unit}");
    assert_eq!(value(settings, "ProtectSystem"), Some("strict"), "{unit}");
    assert_eq!(value(settings, "ProtectHome"), Some("yes"), "{unit}");
    assert_eq!(value(settings, "PrivateTmp"), Some("yes"), "{unit}");
    let exec = value(settings, "ExecStart").unwrap_or_else(|| panic!("{unit}: no ExecStart"));
    let program = exec
        .trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .next()
        .unwrap();
    let name = Path::new(program).file_name().unwrap().to_string_lossy();
    assert_eq!(name, binary, "{unit}: ExecStart={exec}");
    assert!(
        is_workspace_bin(&name),
        "{unit}: {name} is not a binary of this workspace"
    );
}

#[test]
fn the_sensor_unit_grants_exactly_what_the_default_mode_needs_and_nothing_as_root() {
    let unit = "capstream-sensor.service";
    let settings = service_section(unit);
    check_common(unit, &settings, "sensor");
    // The default --mode auto picks tc.
    let documented = documented_start_set("tc");
    assert_eq!(
        documented,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"]
            .map(String::from)
            .into(),
        "README.md's tc row changed: update the units and this test"
    );
    assert_eq!(
        words(value(&settings, "CapabilityBoundingSet")),
        documented,
        "{unit}"
    );
    assert_eq!(
        words(value(&settings, "AmbientCapabilities")),
        documented,
        "{unit}"
    );
    let exec = value(&settings, "ExecStart").unwrap();
    for flag in ["--iface", "--receiver", "--ca"] {
        assert!(exec.contains(flag), "{unit}: ExecStart lacks {flag}");
    }
    assert!(
        value(&settings, "EnvironmentFile").is_some(),
        "{unit}: the interface and receiver come from an EnvironmentFile"
    );
    assert!(
        !exec.contains("--user"),
        "{unit}: systemd already starts it unprivileged"
    );
}

#[test]
fn the_receiver_unit_has_no_capabilities_and_its_own_state_directory() {
    let unit = "capstream-receiver.service";
    let settings = service_section(unit);
    check_common(unit, &settings, "receiver");
    assert_eq!(value(&settings, "DynamicUser"), Some("yes"), "{unit}");
    assert_eq!(
        value(&settings, "CapabilityBoundingSet"),
        Some(""),
        "{unit}"
    );
    assert!(
        words(value(&settings, "AmbientCapabilities")).is_empty(),
        "{unit}"
    );
    assert_eq!(
        value(&settings, "StateDirectory"),
        Some("capstream"),
        "{unit}"
    );
    let exec = value(&settings, "ExecStart").unwrap();
    assert!(
        exec.contains("--state-dir /var/lib/capstream"),
        "{unit}: --state-dir must be the StateDirectory: {exec}"
    );
    // Its output, by default, is in the one directory a dynamic user may write.
    let environment = value(&settings, "Environment").unwrap_or("");
    assert!(
        exec.contains("--out ${CAPSTREAM_OUT}")
            && environment.contains("CAPSTREAM_OUT=/var/lib/capstream/"),
        "{unit}: ExecStart={exec} Environment={environment}"
    );
}

/// The documents of every manifest in `deploy/kubernetes/`.
fn manifests() -> Vec<Yaml> {
    let dir = repo().join("deploy/kubernetes");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let parsed = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            docs.extend(parsed);
        }
    }
    docs
}

/// The one document of `kind` named `name`.
fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in deploy/kubernetes");
    found[0]
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(y: &Yaml) -> Vec<String> {
    list(y)
        .iter()
        .filter_map(|s| s.as_str())
        .map(str::to_string)
        .collect()
}

/// The only container of a workload.
fn container(workload: &Yaml) -> &Yaml {
    let containers = list(&workload["spec"]["template"]["spec"]["containers"]);
    assert_eq!(containers.len(), 1, "{:?}", workload["metadata"]["name"]);
    &containers[0]
}

/// The image the Dockerfile's own build line tags: `capstream:<workspace version>`.
fn image() -> String {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the workspace version");
    format!("capstream:{version}")
}

/// A workload's config file: its container runs `PROGRAM --config PATH`, and PATH is a key
/// of a ConfigMap mounted there by subPath. Returns the ConfigMap's text for that key.
fn config_file(docs: &[Yaml], workload: &Yaml) -> String {
    let c = container(workload);
    let args = strings(&c["args"]);
    let path = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("the container's args name its --config file");
    let mount = list(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(path.as_str()))
        .unwrap_or_else(|| panic!("nothing mounted at {path}"));
    let volume = list(&workload["spec"]["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map = volume["configMap"]["name"]
        .as_str()
        .expect("a ConfigMap volume");
    let key = mount["subPath"].as_str().expect("mounted by subPath");
    object(docs, "ConfigMap", map)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map} has no {key}"))
        .to_string()
}

/// Runs the workload's program with its container args, its config file in a scratch
/// directory, and `--check-config`; it must accept them. Returns what it would run with.
fn check_with_real_binary(docs: &[Yaml], workload: &Yaml, program: &str) -> String {
    let c = container(workload);
    assert_eq!(strings(&c["command"]), [program]);
    let dir =
        std::env::temp_dir().join(format!("capstream-deploy-{program}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{program}.toml"));
    std::fs::write(&file, config_file(docs, workload)).unwrap();
    let mut args = strings(&c["args"]);
    let at = args.iter().position(|a| a == "--config").unwrap() + 1;
    args[at] = file.to_string_lossy().into_owned();
    let out = std::process::Command::new(testbed::workspace_bin(program))
        .args(&args)
        .arg("--check-config")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{program} refuses the manifest's configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(name, port, protocol)` of a container's ports.
fn container_ports(c: &Yaml) -> Vec<(String, i64, String)> {
    list(&c["ports"])
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_i64().unwrap(),
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            )
        })
        .collect()
}

/// The value of `--long=...` in a `--check-config` command line.
fn option<'a>(line: &'a str, long: &str) -> Option<&'a str> {
    let prefix = format!("--{long}=");
    line.split_whitespace()
        .find_map(|w| w.trim_matches('\'').strip_prefix(prefix.as_str()))
}

fn memory(c: &Yaml, which: &str) -> Option<String> {
    c["resources"][which]["memory"].as_str().map(str::to_string)
}

#[test]
fn the_sensor_daemonset_runs_on_the_host_network_with_exactly_the_documented_capabilities() {
    let docs = manifests();
    let ds = object(&docs, "DaemonSet", "capstream-sensor");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    let c = container(ds);
    assert_eq!(c["image"].as_str(), Some(image().as_str()));
    let security = &c["securityContext"];
    assert_ne!(
        security["privileged"].as_bool(),
        Some(true),
        "no privileged: true"
    );
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"])
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    assert_eq!(
        added,
        documented_start_set("tc"),
        "the default mode's set, README.md"
    );
    assert_eq!(
        memory(c, "requests").as_deref(),
        Some("64Mi"),
        "the sensor's memory target"
    );
    assert!(memory(c, "limits").is_some(), "a memory limit");

    let line = check_with_real_binary(&docs, ds, "sensor");
    // It reaches the receiver's Service on its QUIC port, trusting the mounted CA and
    // sending the token from Secrets.
    let service = object(&docs, "Service", "capstream-receiver");
    let quic = list(&service["spec"]["ports"])
        .iter()
        .find(|p| p["protocol"].as_str() == Some("UDP"))
        .expect("a UDP port for QUIC")["port"]
        .as_i64()
        .unwrap();
    let receiver = option(&line, "receiver").expect("--receiver");
    assert!(
        receiver.starts_with("capstream-receiver.capstream.svc")
            && receiver.ends_with(&format!(":{quic}")),
        "{receiver}"
    );
    for long in ["ca", "token-file"] {
        let path = option(&line, long).unwrap_or_else(|| panic!("--{long}"));
        assert_secret_mounted(ds, path);
    }
    // Its metrics port, on the host's network, is the one it serves.
    for (_, port, protocol) in container_ports(c) {
        assert_eq!(protocol, "TCP");
        let metrics = option(&line, "metrics").expect("--metrics");
        assert!(
            metrics.ends_with(&format!(":{port}")),
            "{metrics} vs {port}"
        );
    }
}

/// `path` lies in a volume mounted from a Secret.
fn assert_secret_mounted(workload: &Yaml, path: &str) {
    let pod = &workload["spec"]["template"]["spec"];
    let mount = list(&container(workload)["volumeMounts"])
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|dir| path.starts_with(&format!("{dir}/")))
        })
        .unwrap_or_else(|| panic!("{path} is not in a mounted volume"));
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(
        volume["secret"]["secretName"].as_str().is_some(),
        "{path} comes from a Secret"
    );
}

#[test]
fn the_receiver_deployment_and_service_agree_on_ports_with_its_configuration() {
    let docs = manifests();
    let deployment = object(&docs, "Deployment", "capstream-receiver");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    assert_eq!(c["image"].as_str(), Some(image().as_str()));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_ne!(pod["securityContext"]["runAsUser"].as_i64(), Some(0));
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert_ne!(c["securityContext"]["privileged"].as_bool(), Some(true));
    assert_eq!(
        memory(c, "requests").as_deref(),
        Some("256Mi"),
        "the receiver's memory target"
    );
    assert!(memory(c, "limits").is_some(), "a memory limit");

    let line = check_with_real_binary(&docs, deployment, "receiver");
    // Each container port is what one option listens on, with its protocol.
    let ports = container_ports(c);
    for (long, protocol) in [("listen", "UDP"), ("metrics", "TCP"), ("serve-pcap", "TCP")] {
        let addr = option(&line, long).unwrap_or_else(|| panic!("--{long}: {line}"));
        let port: i64 = addr.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            ports
                .iter()
                .any(|(_, p, proto)| *p == port && proto == protocol),
            "--{long} {addr}: no {protocol} container port {port} in {ports:?}"
        );
    }
    // The Service exposes each, by name, with the same protocol.
    let service = object(&docs, "Service", "capstream-receiver");
    let selector = &service["spec"]["selector"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector.as_hash().expect("a selector") {
        assert_eq!(
            &labels[key.as_str().unwrap()],
            value,
            "the Service selects the pods"
        );
    }
    let exposed = list(&service["spec"]["ports"]);
    assert_eq!(exposed.len(), ports.len());
    for p in exposed {
        let target = p["targetPort"].as_str().expect("a named targetPort");
        let (_, port, protocol) = ports
            .iter()
            .find(|(name, _, _)| name == target)
            .unwrap_or_else(|| panic!("no container port named {target}"));
        assert_eq!(p["protocol"].as_str(), Some(protocol.as_str()), "{target}");
        assert_eq!(p["port"].as_i64(), Some(*port), "{target}");
    }
    // Output and state on the volume; certificate and token from Secrets.
    let out = option(&line, "out").expect("--out");
    let volume_dir = list(&c["volumeMounts"])
        .iter()
        .find(|m| {
            let name = &m["name"];
            list(&pod["volumes"]).iter().any(|v| {
                &v["name"] == name
                    && (!v["persistentVolumeClaim"].is_badvalue() || !v["emptyDir"].is_badvalue())
            })
        })
        .and_then(|m| m["mountPath"].as_str())
        .expect("a volume for the output");
    assert!(
        out.starts_with(&format!("{volume_dir}/")),
        "{out} not under {volume_dir}"
    );
    // The live stream is read over TLS by holders of the viewer token, never plain to
    // the whole pod network.
    assert!(
        line.contains("--serve-pcap-tls") && !line.contains("--serve-pcap-allow-remote"),
        "the live stream is served over TLS: {line}"
    );
    for long in ["cert", "key", "token-file", "viewer-token-file"] {
        assert_secret_mounted(
            deployment,
            option(&line, long).unwrap_or_else(|| panic!("--{long}")),
        );
    }
}

#[test]
fn the_dockerfile_builds_both_programs_with_the_ebpf_object_and_runs_unprivileged() {
    let path = repo().join("deploy/Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap();
    // Instructions, with continuation lines joined and comments left out.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<(&str, &str)> = joined
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .collect();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(i, _)| *i == "FROM")
        .map(|(_, a)| *a)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let build = stages[0].split_whitespace().last().unwrap();
    let runs: Vec<&str> = instructions
        .iter()
        .filter(|(i, _)| *i == "RUN")
        .map(|(_, a)| *a)
        .collect();
    for needed in [
        "libpcap-dev",
        "clang",
        "cargo xtask build-ebpf",
        "cargo build --release",
    ] {
        assert!(
            runs.iter().any(|r| r.contains(needed)),
            "no RUN with {needed}"
        );
    }
    // The runtime stage: after the last FROM.
    let last_from = instructions
        .iter()
        .rposition(|(i, _)| *i == "FROM")
        .unwrap();
    let runtime = &instructions[last_from..];
    assert!(
        runtime
            .iter()
            .any(|(i, a)| *i == "RUN" && a.contains("libpcap0.8")),
        "the runtime image installs libpcap"
    );
    for program in ["sensor", "receiver"] {
        assert!(
            runtime.iter().any(|(i, a)| *i == "COPY"
                && a.contains(&format!("--from={build}"))
                && a.contains(&format!("target/release/{program}"))),
            "the runtime image copies {program} from the {build} stage"
        );
    }
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| *i == "USER")
        .map(|(_, a)| *a)
        .expect("a USER");
    assert!(
        !matches!(user.split(':').next(), Some("root" | "0")),
        "runs as root: USER {user}"
    );
    assert!(
        text.contains(&format!("-t {} ", image())),
        "the build line in its header tags {}, the manifests' image",
        image()
    );
}

/// The receiver's metrics carry no authentication and its live stream reads everything: a
/// NetworkPolicy on the receiver's pods lets in QUIC from anywhere (the sensors, which send
/// the token) and those two ports only from selected pods; and a live stream on the pod's
/// address is served over TLS (readers send the viewer token).
#[test]
fn a_network_policy_keeps_the_live_stream_and_metrics_from_the_whole_cluster() {
    let docs = manifests();
    let deployment = object(&docs, "Deployment", "capstream-receiver");
    let policy = object(&docs, "NetworkPolicy", "capstream-receiver");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = policy["spec"]["podSelector"]["matchLabels"]
        .as_hash()
        .expect("the policy selects pods by label");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            &labels[key.as_str().unwrap()],
            value,
            "it selects the receiver"
        );
    }
    assert!(strings(&policy["spec"]["policyTypes"]).contains(&"Ingress".to_string()));
    let line = check_with_real_binary(&docs, deployment, "receiver");
    let port_of = |long: &str| -> i64 {
        let addr = option(&line, long).unwrap_or_else(|| panic!("--{long}: {line}"));
        addr.rsplit(':').next().unwrap().parse().unwrap()
    };
    let rules = list(&policy["spec"]["ingress"]);
    // The rules that let a port in, and whether each limits who.
    let admitting = |port: i64, protocol: &str| -> Vec<bool> {
        rules
            .iter()
            .filter(|r| {
                list(&r["ports"]).iter().any(|p| {
                    p["port"].as_i64() == Some(port) && p["protocol"].as_str() == Some(protocol)
                })
            })
            .map(|r| !list(&r["from"]).is_empty())
            .collect()
    };
    assert_eq!(
        admitting(port_of("listen"), "UDP"),
        [false],
        "sensors reach QUIC"
    );
    for long in ["metrics", "serve-pcap"] {
        let limited = admitting(port_of(long), "TCP");
        assert!(
            !limited.is_empty() && limited.iter().all(|l| *l),
            "--{long}: only from selected peers, never from anywhere: {limited:?}"
        );
    }
    // No rule admits every port from everyone.
    assert!(rules.iter().all(|r| !list(&r["ports"]).is_empty()));
    let serve = option(&line, "serve-pcap").unwrap();
    if !serve.starts_with("127.") && !serve.starts_with("[::1]") {
        assert!(line.contains("--serve-pcap-tls"), "{line}");
    }
}
