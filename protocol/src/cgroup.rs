//! What a cgroup path says about the container that owns a process: the runtime, the
//! container id and the Kubernetes pod UID.
//!
//! Runtimes name their cgroups in a handful of shapes, under either cgroup driver
//! (`cgroupfs` or `systemd`) and either cgroup version:
//!
//! | runtime | cgroupfs driver | systemd driver |
//! |---|---|---|
//! | docker | `/docker/<id>` | `/system.slice/docker-<id>.scope` |
//! | containerd (Kubernetes) | `/kubepods/<qos>/pod<uid>/<id>` | `…/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | CRI-O | `/kubepods/<qos>/pod<uid>/crio-<id>` | `…/kubepods-<qos>-pod<uid_>.slice/crio-<id>.scope` |
//! | podman | `/libpod_parent/libpod-<id>` | `/machine.slice/libpod-<id>.scope[/container]` |
//!
//! The systemd driver writes the pod UID with `_` for `-` (a `-` means nesting in a slice
//! name); it is given back with dashes. A path that names no container but systemd units
//! (`/system.slice/nginx.service`) gives the unit. Parsing is done once per process, never
//! per packet.

/// The container runtime a cgroup path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Docker (`docker-<id>.scope`, `/docker/<id>`), also behind Kubernetes' cri-dockerd.
    Docker,
    /// containerd: Kubernetes' `cri-containerd-<id>.scope`, nerdctl's `nerdctl-<id>.scope`.
    Containerd,
    /// CRI-O (`crio-<id>`, and `crio-conmon-<id>` for its monitor process).
    CriO,
    /// podman (`libpod-<id>`, and `libpod-conmon-<id>` for its monitor process).
    Podman,
    /// A Kubernetes container under the cgroupfs driver (`/kubepods/…/pod<uid>/<id>`): the
    /// path does not say which CRI runtime (containerd, CRI-O or cri-dockerd) made it.
    Kubernetes,
    /// No container: a process in a plain systemd unit or slice.
    Systemd,
}

impl Runtime {
    /// The name shown to users (`docker`, `containerd`, `cri-o`, `podman`, `kubernetes`,
    /// `systemd`).
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Kubernetes => "kubernetes",
            Runtime::Systemd => "systemd",
        }
    }
}

/// What [`parse_cgroup_path`] found in a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupOwner<'a> {
    /// Who made the cgroup.
    pub runtime: Runtime,
    /// The container's id (64 hex digits), unless the runtime is [`Runtime::Systemd`].
    pub container_id: Option<&'a str>,
    /// The Kubernetes pod's UID, with dashes, when the container is in a pod.
    pub pod_uid: Option<String>,
    /// The innermost systemd unit or slice (`nginx.service`, `session-3.scope`), for
    /// [`Runtime::Systemd`].
    pub unit: Option<&'a str>,
}

/// Container-naming prefixes of a path component, innermost match wins. Longer prefixes
/// come before the shorter ones they extend (`crio-conmon-` before `crio-`).
const PREFIXES: [(&str, Runtime); 7] = [
    ("docker-", Runtime::Docker),
    ("cri-containerd-", Runtime::Containerd),
    ("nerdctl-", Runtime::Containerd),
    ("crio-conmon-", Runtime::CriO),
    ("crio-", Runtime::CriO),
    ("libpod-conmon-", Runtime::Podman),
    ("libpod-", Runtime::Podman),
];

/// Runtimes' container ids are 64 lowercase hex digits (a SHA-256).
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A pod UID: a UUID (`8-4-4-4-12` hex), or 32 hex digits (a static pod's config hash).
fn is_pod_uid(s: &str) -> bool {
    let hex = |b: u8| b.is_ascii_hexdigit();
    match s.len() {
        32 => s.bytes().all(hex),
        36 => s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => hex(b),
        }),
        _ => false,
    }
}

/// The container a path component names, if it names one.
fn container_in<'a>(component: &'a str, parent: Option<&str>) -> Option<(Runtime, &'a str)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some((runtime, id));
            }
        }
    }
    // cgroupfs driver: the bare id, under `docker` or under a pod.
    if !is_container_id(name) {
        return None;
    }
    match parent {
        Some("docker") => Some((Runtime::Docker, name)),
        Some(p) if pod_uid_in(p).is_some() => Some((Runtime::Kubernetes, name)),
        _ => None,
    }
}

/// The pod UID a path component names: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_>.slice` (systemd, `_` for `-`).
fn pod_uid_in(component: &str) -> Option<String> {
    let raw = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit('-').next()?.strip_prefix("pod")?,
        None => component.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// The runtime, container id and pod UID a cgroup path names (as in `/proc/PID/cgroup`),
/// or `None` for the root cgroup and paths that name neither a container nor a systemd unit.
pub fn parse_cgroup_path(path: &str) -> Option<CgroupOwner<'_>> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // Innermost first: a container nested in another (kind, docker-in-docker) is the inner one.
    for (i, component) in components.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|p| components[p]);
        if let Some((runtime, id)) = container_in(component, parent) {
            let pod_uid = components[..i].iter().rev().find_map(|c| pod_uid_in(c));
            return Some(CgroupOwner {
                runtime,
                container_id: Some(id),
                pod_uid,
                unit: None,
            });
        }
    }
    let unit = components
        .iter()
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope") || c.ends_with(".slice"))?;
    Some(CgroupOwner {
        runtime: Runtime::Systemd,
        container_id: None,
        pod_uid: None,
        unit: Some(unit),
    })
}

/// The cgroup path of a process from its `/proc/PID/cgroup`: the unified (cgroup v2) line
/// `0::PATH` when it has one, else the v1 `name=systemd` line, else the first v1 line.
pub fn path_from_proc_cgroup(contents: &str) -> Option<&str> {
    let mut systemd = None;
    let mut first = None;
    for line in contents.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            return Some(path);
        }
        if controllers == "name=systemd" {
            systemd.get_or_insert(path);
        }
        first.get_or_insert(path);
    }
    systemd.or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2504e04f8911d39a0c0305e82c33013f2504e04f8911d39a0c0305e82c3301";
    const UID: &str = "6b7e2f0a-1c3d-4e5f-8a9b-0c1d2e3f4a5b";

    fn container(path: &str) -> (Runtime, Option<String>, Option<String>) {
        let owner = parse_cgroup_path(path).unwrap_or_else(|| panic!("no owner in {path}"));
        (
            owner.runtime,
            owner.container_id.map(str::to_owned),
            owner.pod_uid,
        )
    }

    fn expect(path: &str, runtime: Runtime, pod: Option<&str>) {
        assert_eq!(
            container(path),
            (runtime, Some(ID.to_owned()), pod.map(str::to_owned)),
            "{path}"
        );
    }

    #[test]
    fn docker_both_drivers_and_versions() {
        // cgroup v1, cgroupfs driver (every controller's line looks like this).
        expect(&format!("/docker/{ID}"), Runtime::Docker, None);
        // systemd driver, v1 and v2 alike.
        expect(
            &format!("/system.slice/docker-{ID}.scope"),
            Runtime::Docker,
            None,
        );
        // Rootless docker under the user's systemd.
        expect(
            &format!("/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope"),
            Runtime::Docker,
            None,
        );
        // Docker in docker: the inner container.
        let outer = "a".repeat(64);
        expect(
            &format!("/docker/{outer}/docker/{ID}"),
            Runtime::Docker,
            None,
        );
    }

    #[test]
    fn containerd_in_kubernetes() {
        let systemd_uid = UID.replace('-', "_");
        for qos in ["burstable", "besteffort"] {
            expect(
                &format!(
                    "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
                ),
                Runtime::Containerd,
                Some(UID),
            );
        }
        // Guaranteed QoS has no QoS slice.
        expect(
            &format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"),
            Runtime::Containerd,
            Some(UID),
        );
        // kind: the node is itself a docker container; the pod's container is inside.
        expect(
            &format!(
                "/system.slice/docker-{}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{systemd_uid}.slice/cri-containerd-{ID}.scope",
                "b".repeat(64)
            ),
            Runtime::Containerd,
            Some(UID),
        );
        // nerdctl (containerd without Kubernetes).
        expect(
            &format!("/system.slice/nerdctl-{ID}.scope"),
            Runtime::Containerd,
            None,
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver_names_no_runtime() {
        // cgroup v1 and v2 (k3s, kubeadm with cgroupDriver: cgroupfs).
        expect(
            &format!("/kubepods/burstable/pod{UID}/{ID}"),
            Runtime::Kubernetes,
            Some(UID),
        );
        expect(
            &format!("/kubepods/pod{UID}/{ID}"),
            Runtime::Kubernetes,
            Some(UID),
        );
        // A static pod's UID is its config hash.
        let hash = "0123456789abcdef0123456789abcdef";
        expect(
            &format!("/kubepods/besteffort/pod{hash}/{ID}"),
            Runtime::Kubernetes,
            Some(hash),
        );
        // The pod's own cgroup (its sandbox's processes are in a container below it).
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}")),
            None
        );
    }

    #[test]
    fn cri_o() {
        let systemd_uid = UID.replace('-', "_");
        expect(
            &format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/crio-{ID}.scope"
            ),
            Runtime::CriO,
            Some(UID),
        );
        // conmon, the monitor CRI-O starts beside each container.
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/crio-conmon-{ID}.scope"
            ),
            Runtime::CriO,
            Some(UID),
        );
        // cgroupfs driver.
        expect(
            &format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            Runtime::CriO,
            Some(UID),
        );
    }

    #[test]
    fn podman() {
        expect(
            &format!("/machine.slice/libpod-{ID}.scope"),
            Runtime::Podman,
            None,
        );
        // cgroup v2: the container's processes sit in a `container` child.
        expect(
            &format!("/machine.slice/libpod-{ID}.scope/container"),
            Runtime::Podman,
            None,
        );
        expect(
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            Runtime::Podman,
            None,
        );
        // Rootless.
        expect(
            &format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            Runtime::Podman,
            None,
        );
        // cgroupfs driver.
        expect(
            &format!("/libpod_parent/libpod-{ID}"),
            Runtime::Podman,
            None,
        );
    }

    #[test]
    fn systemd_units_and_plain_paths() {
        fn unit(path: &str) -> Option<(Runtime, Option<String>, Option<String>)> {
            parse_cgroup_path(path).map(|o| {
                (
                    o.runtime,
                    o.unit.map(str::to_owned),
                    o.container_id.map(str::to_owned),
                )
            })
        }
        let systemd = |name: &str| Some((Runtime::Systemd, Some(name.to_owned()), None));
        assert_eq!(
            unit("/system.slice/nginx.service"),
            systemd("nginx.service")
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/session-3.scope"),
            systemd("session-3.scope")
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-42.scope"),
            systemd("app-gnome-firefox-42.scope")
        );
        assert_eq!(unit("/"), None);
        assert_eq!(unit(""), None);
        assert_eq!(unit("/capstream-test/clients"), None);
        // Not quite an id: too short, upper case, or not hex.
        assert_eq!(unit("/docker/3f2504e04f89"), None);
        assert_eq!(unit(&format!("/docker/{}", ID.to_uppercase())), None);
        assert_eq!(unit(&format!("/docker/{}", "g".repeat(64))), None);
        // A bare id under neither docker nor a pod names no runtime.
        assert_eq!(unit(&format!("/somewhere/{ID}")), None);
    }

    #[test]
    fn proc_cgroup_picks_the_unified_line() {
        let v1 = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/system.slice/docker-{ID}.scope\n"
        );
        assert_eq!(
            path_from_proc_cgroup(&v1),
            Some(format!("/system.slice/docker-{ID}.scope").as_str())
        );
        // Hybrid: v1 controllers plus the unified hierarchy.
        let hybrid = format!("{v1}0::/system.slice/ssh.service\n");
        assert_eq!(
            path_from_proc_cgroup(&hybrid),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(path_from_proc_cgroup("0::/\n"), Some("/"));
        assert_eq!(path_from_proc_cgroup("3:cpu,cpuacct:/a\n"), Some("/a"));
        assert_eq!(path_from_proc_cgroup(""), None);
        assert_eq!(path_from_proc_cgroup("garbage"), None);
    }
}
