//! A sandbox's record: the label schema of its container, and the mapping between that record
//! (plus its task) and the [`Sandbox`] the API reports. Labels are the durable state: whatever
//! sandboxd knows of a sandbox after a restart, it reads from here.

use std::collections::HashMap;

use super::model::*;
use crate::net::policy::NetPolicy;
use crate::runtime::{Container, Task, TaskState};

/// Label marking containers sandboxd manages.
pub const L_MANAGED: &str = "sandboxd.io/managed";
pub(super) const L_IMAGE: &str = "sandboxd.io/image";
pub(super) const L_SNAPSHOT: &str = "sandboxd.io/snapshot";
pub(super) const L_EXPIRES: &str = "sandboxd.io/expires-at";
/// On a warm-pool sandbox not yet handed out: the image it was made for. Hides it from RPCs.
pub(super) const L_POOL: &str = "sandboxd.io/pool";
/// When a warm-pool sandbox was handed out (its creation time as its owner sees it).
pub(super) const L_CLAIMED: &str = "sandboxd.io/claimed-at";
pub(super) const L_STARTED: &str = "sandboxd.io/started-at";
pub(super) const L_EXITED: &str = "sandboxd.io/exited-at";
pub(super) const L_EXIT_STATUS: &str = "sandboxd.io/exit-status";
/// "true" when PID 1's last exit was the OOM killer's doing (recorded once its task is gone).
pub(super) const L_OOM_KILLED: &str = "sandboxd.io/oom-killed";
pub(super) const L_CPU: &str = "sandboxd.io/cpu-millis";
pub(super) const L_MEMORY: &str = "sandboxd.io/memory-bytes";
pub(super) const L_PIDS: &str = "sandboxd.io/pids-limit";
pub(super) const L_NETWORK: &str = "sandboxd.io/network";
/// The BRIDGE sandbox's address while its network is attached.
pub(super) const L_NET_IP: &str = "sandboxd.io/net-ip";
pub(super) const L_NET_GATEWAY: &str = "sandboxd.io/net-gateway";
/// The CNI ADD result (compact JSON), given back to the plugins on DEL.
pub(super) const L_NET_RESULT: &str = "sandboxd.io/net-result";
/// What ties a running BRIDGE sandbox to its firewall rules (veth, MAC, address; JSON), so
/// that the sweep can put back rules someone removed, after a restart too.
pub(super) const L_NET_GUARD: &str = "sandboxd.io/net-guard";
/// containerd limits a label to 4096 bytes; a larger CNI result is not cached (DEL works
/// without it).
pub(super) const MAX_RESULT_LABEL: usize = 3500;
/// Container extension holding a BRIDGE sandbox's [`NetPolicy`] (too large for a label).
pub(super) const EXT_NET_POLICY: &str = "sandboxd.io/net-policy";
pub(super) const L_COMMAND: &str = "sandboxd.io/command";
pub(super) const L_HOSTNAME: &str = "sandboxd.io/hostname";
/// containerd's GC reference from a sandbox to its image's manifest (the manifest digest).
pub(super) const L_MANIFEST_REF: &str = "containerd.io/gc.ref.content.m";
/// The lease the sandbox's create ran under. While that lease exists the create has not
/// finished: after a crash, recovery rolls such a sandbox back.
pub(super) const L_CREATE_LEASE: &str = "sandboxd.io/create-lease";
/// Label on a writable snapshot naming its sandbox.
pub const L_SNAPSHOT_OWNER: &str = "sandboxd.io/sandbox";

/// Whether container `c` is a sandbox (sandboxd made it).
pub(super) fn is_managed(c: &Container) -> bool {
    c.labels.contains_key(L_MANAGED)
}

/// A BRIDGE sandbox's policy, from its container; `None` for NONE sandboxes.
pub(super) fn net_policy(c: &Container) -> Option<NetPolicy> {
    if c.labels.get(L_NETWORK).map(String::as_str) != Some(NetworkMode::Bridge.as_str()) {
        return None;
    }
    Some(
        c.extensions
            .get(EXT_NET_POLICY)
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default(),
    )
}

/// What ties a running BRIDGE sandbox to its firewall rules, when it is attached.
pub(super) fn net_guard(c: &Container) -> Option<crate::net::firewall::Guard> {
    serde_json::from_str(c.labels.get(L_NET_GUARD)?).ok()
}

/// The labels recording a sandbox's limits: the pids limit that applies, CPU and memory when set.
pub(super) fn resource_labels(r: &Resources) -> Vec<(&'static str, String)> {
    let mut labels = vec![(L_PIDS, r.pids().to_string())];
    labels.extend(r.cpu_millis.map(|c| (L_CPU, c.to_string())));
    labels.extend(r.memory_bytes.map(|m| (L_MEMORY, m.to_string())));
    labels
}

pub(super) fn user_labels(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !RESERVED_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The sandbox that container `c` and its task (PID 1) stand for.
pub(super) fn sandbox_of(c: &Container, task: Option<&Task>) -> Sandbox {
    let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
    let time = |k: &str| c.labels.get(k).and_then(|v| crate::util::parse_rfc3339(v));
    let num = |k: &str| c.labels.get(k).and_then(|v| v.parse::<i64>().ok());
    let (state, pid, exit_status, exited_at) = match task {
        Some(t) => match t.state {
            TaskState::Created => (State::Created, t.pid, None, None),
            TaskState::Running => (State::Running, t.pid, None, None),
            TaskState::Paused => (State::Paused, t.pid, None, None),
            TaskState::Stopped => (State::Stopped, 0, Some(t.exit_status as i32), t.exited_at),
            TaskState::Unknown => (State::Unknown, t.pid, None, None),
        },
        None if c.labels.contains_key(L_STARTED) => (
            State::Stopped,
            0,
            num(L_EXIT_STATUS).map(|s| s as i32),
            time(L_EXITED),
        ),
        None => (State::Created, 0, None, None),
    };
    Sandbox {
        id: SandboxId::parse("sandbox_id", &c.id).unwrap_or_else(|_| SandboxId::generate()),
        image: label(L_IMAGE),
        snapshot_id: label(L_SNAPSHOT),
        state,
        pid,
        exit_status,
        // While the exited task is kept its cgroup says (see `Manager::describe`); after, the
        // label does.
        oom_killed: task.is_none()
            && state == State::Stopped
            && c.labels.get(L_OOM_KILLED).is_some_and(|v| v == "true"),
        labels: user_labels(&c.labels),
        resources: Resources {
            cpu_millis: num(L_CPU),
            memory_bytes: num(L_MEMORY),
            pids_limit: num(L_PIDS),
        },
        network: if label(L_NETWORK) == "bridge" {
            NetworkMode::Bridge
        } else {
            NetworkMode::None
        },
        ip_address: label(L_NET_IP),
        gateway: label(L_NET_GATEWAY),
        net_policy: net_policy(c),
        command: serde_json::from_str(&label(L_COMMAND)).unwrap_or_default(),
        hostname: label(L_HOSTNAME),
        created_at: time(L_CLAIMED).or(c.created_at),
        started_at: time(L_STARTED),
        expires_at: time(L_EXPIRES),
        exited_at,
    }
}
