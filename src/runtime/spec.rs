//! The OCI runtime spec of a sandbox: containerd's defaults for hardening, our choices for the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use oci_spec::runtime::{LinuxSeccomp, Spec};
use serde_json::json;

use super::seccomp;
use crate::config::SeccompProfile;
use crate::error::{Error, Result};
pub use crate::sys::User;

/// Type URL under which containerd expects a runtime spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Type URL under which containerd expects a task's new cgroup limits.
pub const RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// Where the idle init is bind-mounted inside a sandbox.
pub const IDLE_INIT_PATH: &str = "/.sandboxd/init";
/// CPU CFS period used to turn millicores into a quota.
const CPU_PERIOD_US: u64 = 100_000;
/// Size of the /dev, /run and /dev/shm tmpfs mounts.
const TMPFS_SIZE: &str = "size=65536k";

/// Docker's default capability set without CAP_NET_RAW: raw sockets would let a sandbox forge
/// frames on the shared bridge, and ping works without it (see [`PING_GROUP_RANGE`]).
/// Inheritable and ambient sets stay empty, as Docker keeps them.
pub const DEFAULT_CAPABILITIES: [&str; 13] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every group may open ICMP echo ("ping") sockets, which need no capability; set in the
/// sandbox's own network namespace, so it changes nothing on the node.
pub const PING_GROUP_RANGE: &str = "0 2147483647";

/// /proc and /sys paths hidden from sandboxes.
const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// /proc paths sandboxes may read but not write.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Everything that varies between sandboxes' specs.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// PID 1 argv (already resolved from the image or the request).
    pub args: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User of PID 1.
    pub user: User,
    /// Hostname.
    pub hostname: String,
    /// cgroup path (absolute, under the configured parent).
    pub cgroups_path: String,
    /// CPU limit in millicores.
    pub cpu_millis: Option<i64>,
    /// Memory limit.
    pub memory_bytes: Option<i64>,
    /// pids limit.
    pub pids_limit: i64,
    /// Host directory holding the sandbox's hosts, hostname and resolv.conf.
    pub etc_dir: PathBuf,
    /// The idle init to bind-mount, when PID 1 is the idle init.
    pub idle_init: Option<PathBuf>,
    /// A network namespace to join; `None` makes a new one with loopback only.
    pub netns_path: Option<PathBuf>,
    /// The seccomp filter of every process; `None` for none.
    pub seccomp: Option<Arc<LinuxSeccomp>>,
    /// oom_score_adj of PID 1 (and, through [`process`], of exec'd processes).
    pub oom_score_adj: i32,
}

/// The seccomp filter `profile` asks for, for processes holding [`DEFAULT_CAPABILITIES`] on
/// the running kernel; `None` when unconfined.
pub fn seccomp_of(profile: &SeccompProfile) -> Option<Arc<LinuxSeccomp>> {
    match profile {
        SeccompProfile::Default => Some(Arc::new(seccomp::default_profile(
            &DEFAULT_CAPABILITIES,
            seccomp::kernel_version(),
        ))),
        SeccompProfile::Unconfined => None,
        SeccompProfile::Custom(p) => Some(Arc::new((**p).clone())),
    }
}

fn bind(dest: &str, source: &Path, ro: bool) -> serde_json::Value {
    let mut options = vec!["rbind", "rprivate", "nosuid", "nodev"];
    if ro {
        options.push("ro");
    }
    json!({"destination": dest, "type": "bind", "source": source, "options": options})
}

/// Builds the runtime spec as containerd expects it (JSON bytes, validated through oci-spec).
pub fn build(s: &SandboxSpec) -> Result<Vec<u8>> {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", TMPFS_SIZE]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", TMPFS_SIZE]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", TMPFS_SIZE]}),
        // Read-only: these files live in sandboxd's data dir on the node's disk, outside the
        // sandbox's writable layer, so a sandbox that could write them could fill that disk.
        bind("/etc/hosts", &s.etc_dir.join("hosts"), true),
        bind("/etc/hostname", &s.etc_dir.join("hostname"), true),
        bind("/etc/resolv.conf", &s.etc_dir.join("resolv.conf"), true),
    ];
    if let Some(init) = &s.idle_init {
        mounts.push(bind(IDLE_INIT_PATH, init, true));
    }

    let mut resources = limits(s.cpu_millis, s.memory_bytes, s.pids_limit);
    resources["devices"] = json!([{"allow": false, "access": "rwm"}]);
    let mut netns = json!({"type": "network"});
    let mut sysctl = serde_json::Map::new();
    // Every sandbox has a network namespace of its own (NONE makes one, BRIDGE joins its own).
    sysctl.insert("net.ipv4.ping_group_range".into(), json!(PING_GROUP_RANGE));
    if let Some(path) = &s.netns_path {
        netns["path"] = json!(path);
        // The bridge network is IPv4 only and its egress rules are iptables (IPv4) rules:
        // without IPv6, link-local IPv6 cannot carry traffic around them.
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            sysctl.insert(key.into(), json!("1"));
        }
    }

    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": s.user.uid, "gid": s.user.gid},
            "args": s.args,
            "env": s.env,
            "cwd": s.cwd,
            "capabilities": {
                "bounding": DEFAULT_CAPABILITIES,
                "effective": DEFAULT_CAPABILITIES,
                "permitted": DEFAULT_CAPABILITIES,
            },
            "noNewPrivileges": true,
            "oomScoreAdj": s.oom_score_adj,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": s.hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": s.cgroups_path,
            "resources": resources,
            // A cgroup namespace: the sandbox sees its own cgroup as the root, nothing of the
            // node's or other sandboxes' cgroups.
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}, netns],
            "sysctl": sysctl,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    if let Some(filter) = &s.seccomp {
        // runc applies the container's filter to exec'd processes too.
        spec["linux"]["seccomp"] = serde_json::to_value(filter.as_ref())
            .map_err(|e| Error::Internal(format!("seccomp profile: {e}")))?;
    }
    // Round-trip through oci-spec so that a malformed spec fails here, not inside runc.
    let typed: Spec =
        serde_json::from_value(spec).map_err(|e| Error::Internal(format!("runtime spec: {e}")))?;
    serde_json::to_vec(&typed).map_err(|e| Error::Internal(format!("runtime spec: {e}")))
}

/// Type URL of the runc shim's options (`containerd.runc.v1.Options`).
const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

/// The part of the runc shim's options we set (containerd's `runtime/v2/runc/options`).
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    /// runc's state directory (`runc --root`); the shim appends the namespace.
    #[prost(string, tag = "7")]
    root: String,
}

/// The runtime options of a sandbox's container: runc keeps its state under `root`.
pub fn runc_options(root: &Path) -> prost_types::Any {
    let options = RuncOptions {
        root: root.display().to_string(),
    };
    prost_types::Any {
        type_url: RUNC_OPTIONS_TYPE_URL.into(),
        value: prost::Message::encode_to_vec(&options),
    }
}

/// The cgroup limits of a sandbox, as the spec's `linux.resources` (without its device rules).
fn limits(
    cpu_millis: Option<i64>,
    memory_bytes: Option<i64>,
    pids_limit: i64,
) -> serde_json::Value {
    let mut resources = json!({"pids": {"limit": pids_limit}});
    if let Some(mem) = memory_bytes {
        resources["memory"] = json!({"limit": mem});
    }
    if let Some(milli) = cpu_millis {
        let quota = (milli as u64 * CPU_PERIOD_US / 1000).max(1000);
        resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD_US});
    }
    resources
}

/// The `KEY=VALUE` environment of a spec's `process` (JSON); empty when it has none.
pub fn env_of(process: &serde_json::Value) -> Vec<String> {
    process["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets `overrides` in `env` (`KEY=VALUE` entries), replacing entries of the same key.
pub fn merge_env(env: &mut Vec<String>, overrides: &BTreeMap<String, String>) {
    for (k, v) in overrides {
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
}

/// What a claim from the warm pool changes in a started sandbox's stored spec.
#[derive(Debug, Default)]
pub struct Overrides<'a> {
    /// Environment merged over the spec's.
    pub env: Option<&'a BTreeMap<String, String>>,
    /// New working directory.
    pub cwd: Option<&'a str>,
    /// New user.
    pub user: Option<User>,
    /// New limits: cpu millicores, memory bytes, pids.
    pub limits: Option<(Option<i64>, Option<i64>, i64)>,
}

/// Applies `o` to the runtime spec `spec` (JSON bytes); returns the new spec, and the
/// `LinuxResources` (JSON bytes) that a running task must be updated with when the limits
/// change.
pub fn apply(spec: &[u8], o: &Overrides<'_>) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let bad = |e: serde_json::Error| Error::Internal(format!("stored runtime spec: {e}"));
    let mut spec: serde_json::Value = serde_json::from_slice(spec).map_err(bad)?;
    if let Some(env) = o.env {
        let mut merged = env_of(&spec["process"]);
        merge_env(&mut merged, env);
        spec["process"]["env"] = json!(merged);
    }
    if let Some(cwd) = o.cwd {
        spec["process"]["cwd"] = json!(cwd);
    }
    if let Some(user) = o.user {
        spec["process"]["user"] = json!({"uid": user.uid, "gid": user.gid});
    }
    let mut update = None;
    if let Some((cpu, memory, pids)) = o.limits {
        let new = limits(cpu, memory, pids);
        let devices = spec["linux"]["resources"]["devices"].take();
        spec["linux"]["resources"] = new.clone();
        spec["linux"]["resources"]["devices"] = devices;
        update = Some(serde_json::to_vec(&new).map_err(bad)?);
    }
    let typed: Spec = serde_json::from_value(spec).map_err(bad)?;
    Ok((serde_json::to_vec(&typed).map_err(bad)?, update))
}

/// The spec of an exec'd process inside a sandbox (same hardening as PID 1).
pub fn process(
    args: &[String],
    env: &[String],
    cwd: &str,
    user: User,
    terminal: bool,
    console_size: Option<(u32, u32)>,
    oom_score_adj: i32,
) -> Result<Vec<u8>> {
    let mut process = json!({
        "terminal": terminal,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": DEFAULT_CAPABILITIES,
            "effective": DEFAULT_CAPABILITIES,
            "permitted": DEFAULT_CAPABILITIES,
        },
        "noNewPrivileges": true,
        "oomScoreAdj": oom_score_adj,
    });
    if let Some((rows, cols)) = console_size {
        process["consoleSize"] = json!({"height": rows, "width": cols});
    }
    let typed: oci_spec::runtime::Process = serde_json::from_value(process)
        .map_err(|e| Error::Internal(format!("process spec: {e}")))?;
    serde_json::to_vec(&typed).map_err(|e| Error::Internal(format!("process spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SandboxSpec {
        SandboxSpec {
            args: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: User {
                uid: 1000,
                gid: 1000,
            },
            hostname: "box".into(),
            cgroups_path: "/sandboxd/box".into(),
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            pids_limit: 100,
            etc_dir: PathBuf::from("/var/lib/sandboxd/sandboxes/box"),
            idle_init: Some(PathBuf::from("/usr/bin/catatonit")),
            netns_path: None,
            seccomp: seccomp_of(&SeccompProfile::Default),
            oom_score_adj: 500,
        }
    }

    #[test]
    fn overrides_change_env_cwd_user_and_limits_only() {
        let mut base = sample();
        base.env = vec!["PATH=/bin".into(), "KEEP=1".into(), "GREETING=old".into()];
        base.cpu_millis = None;
        base.memory_bytes = None;
        let stored = build(&base).unwrap();
        let env: BTreeMap<String, String> = [("GREETING".into(), "new".into())].into();
        // oci-spec keeps capabilities in a set: their order is not kept, their members are.
        let without_caps = |bytes: &[u8]| {
            let mut spec: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            let caps = spec["process"]["capabilities"].take();
            let caps: std::collections::BTreeSet<String> = caps["bounding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            (spec, caps)
        };
        let (bytes, update) = apply(&stored, &Overrides::default()).unwrap();
        assert!(update.is_none());
        assert_eq!(without_caps(&bytes), without_caps(&stored));
        let o = Overrides {
            env: Some(&env),
            cwd: Some("/work"),
            user: Some(User { uid: 7, gid: 8 }),
            limits: Some((Some(250), Some(32 << 20), 10)),
        };
        let (bytes, update) = apply(&stored, &o).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            spec["process"]["env"],
            json!(["PATH=/bin", "KEEP=1", "GREETING=new"])
        );
        assert_eq!(spec["process"]["cwd"], "/work");
        assert_eq!(spec["process"]["user"], json!({"uid": 7, "gid": 8}));
        let r = &spec["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["cpu"]["quota"], 25_000);
        assert_eq!(r["pids"]["limit"], 10);
        assert_eq!(r["devices"], json!([{"allow": false, "access": "rwm"}]));
        assert_eq!(spec["process"]["args"], json!(["/bin/sh"]));
        let update: serde_json::Value = serde_json::from_slice(&update.unwrap()).unwrap();
        assert_eq!(update["pids"]["limit"], 10);
        assert!(update.get("devices").is_none(), "{update}");
    }

    #[test]
    fn spec_carries_limits_hardening_and_mounts() {
        let bytes = build(&sample()).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(spec["hostname"], "box");
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(spec["process"]["user"]["uid"], 1000);
        assert_eq!(spec["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(spec["linux"]["cgroupsPath"], "/sandboxd/box");
        assert_eq!(spec["root"]["readonly"], false);
        let caps = spec["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert_eq!(caps.len(), 13);
        assert!(!caps
            .iter()
            .any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_NET_RAW"));
        assert_eq!(spec["process"]["oomScoreAdj"], 500);
        assert_eq!(
            spec["linux"]["sysctl"]["net.ipv4.ping_group_range"],
            PING_GROUP_RANGE
        );
        let seccomp = &spec["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(seccomp["defaultErrnoRet"], libc::EPERM);
        let dests: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for d in [
            "/proc",
            "/dev/pts",
            "/etc/hosts",
            "/etc/resolv.conf",
            IDLE_INIT_PATH,
        ] {
            assert!(dests.contains(&d), "{d} missing");
        }
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "cgroup", "network"]);
        assert!(spec["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/proc/kcore"));
    }

    #[test]
    fn no_limits_means_no_cpu_or_memory_section() {
        let mut s = sample();
        s.cpu_millis = None;
        s.memory_bytes = None;
        s.idle_init = None;
        let spec: serde_json::Value = serde_json::from_slice(&build(&s).unwrap()).unwrap();
        assert!(spec["linux"]["resources"].get("memory").is_none());
        assert!(spec["linux"]["resources"].get("cpu").is_none());
    }

    #[test]
    fn unconfined_means_no_seccomp_section_and_execs_get_the_oom_priority() {
        let mut s = sample();
        s.seccomp = seccomp_of(&SeccompProfile::Unconfined);
        let spec: serde_json::Value = serde_json::from_slice(&build(&s).unwrap()).unwrap();
        assert!(spec["linux"].get("seccomp").is_none());
        let p = process(
            &["true".into()],
            &[],
            "/",
            User { uid: 0, gid: 0 },
            false,
            None,
            300,
        )
        .unwrap();
        let p: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(p["oomScoreAdj"], 300);
        assert!(!p["capabilities"]["effective"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "CAP_NET_RAW"));
    }
}
