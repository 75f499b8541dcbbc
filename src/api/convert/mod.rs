//! Conversions between proto messages and domain types. Invalid input stops here. Sandboxes,
//! images and snapshots are converted here; Exec's messages in `exec`, FileService's in `file`.

mod exec;
mod file;
#[cfg(test)]
mod robust;

pub use exec::*;
pub use file::*;

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::image::{ImageInfo, ImageRef};
use crate::net::cni::{PortMapping, Protocol};
use crate::net::policy::{Egress, EgressRule, NetPolicy};
use crate::pb;
use crate::sandbox::{
    self, CreateSpec, NetworkMode, RequestKey, Resources, SandboxId, Source, State,
};

fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(crate::util::timestamp)
}

/// The text a request's digest is taken of: the Debug form of the request with its
/// `request_id` and its maps cleared, and then the maps in key order (protobuf maps have no
/// order, so two equal requests may print or encode differently).
pub fn canonical<T: std::fmt::Debug>(
    without_maps: &T,
    maps: &[&std::collections::HashMap<String, String>],
) -> String {
    let sorted: Vec<std::collections::BTreeMap<&String, &String>> =
        maps.iter().map(|m| m.iter().collect()).collect();
    format!("{without_maps:?}|{sorted:?}")
}

/// CreateSandboxRequest → CreateSpec.
pub fn create_spec(mut r: pb::CreateSandboxRequest) -> Result<CreateSpec> {
    let request_id = std::mem::take(&mut r.request_id);
    let (env, labels) = (std::mem::take(&mut r.env), std::mem::take(&mut r.labels));
    let request = RequestKey::parse("request_id", &request_id, &canonical(&r, &[&env, &labels]))?;
    r.env = env;
    r.labels = labels;
    let id_generated = r.sandbox_id.is_empty();
    let id = if r.sandbox_id.is_empty() {
        SandboxId::generate()
    } else {
        SandboxId::parse("sandbox_id", &r.sandbox_id)?
    };
    let source = match (r.image.is_empty(), r.snapshot_id.is_empty()) {
        (false, true) => Source::Image(ImageRef::parse("image", &r.image)?),
        (true, false) => Source::Snapshot(r.snapshot_id),
        (false, false) => {
            return Err(Error::invalid(
                "image",
                "set either image or snapshot_id, not both",
            ))
        }
        (true, true) => {
            return Err(Error::invalid(
                "image",
                "an image or a snapshot_id is required",
            ))
        }
    };
    let resources = match r.resources {
        Some(res) => Resources::parse(res.cpu_millis, res.memory_bytes, res.pids_limit)?,
        None => Resources::default(),
    };
    let (network, net_policy) = network_spec(r.network.unwrap_or_default())?;
    let ttl = match r.ttl {
        None => None,
        Some(d) => {
            let negative = d.seconds < 0 || d.nanos < 0;
            sandbox::parse_ttl("ttl", crate::util::duration(&d), negative)?
        }
    };
    let working_dir = if r.working_dir.is_empty() {
        None
    } else {
        Some(sandbox::parse_abs_path("working_dir", &r.working_dir)?)
    };
    let user = if r.user.is_empty() {
        None
    } else {
        Some(r.user)
    };
    if let Some(u) = &user {
        if u.len() > 256
            || u.contains('\0')
            || u.split(':').count() > 2
            || u.split(':').any(str::is_empty)
        {
            return Err(Error::invalid(
                "user",
                format!("{u:?} is not user, uid, user:group or uid:gid"),
            ));
        }
    }
    let hostname = if r.hostname.is_empty() {
        id.as_str().chars().take(63).collect()
    } else {
        sandbox::parse_hostname("hostname", &r.hostname)?
    };
    Ok(CreateSpec {
        source,
        command: sandbox::parse_args("command", r.command)?,
        env: sandbox::parse_env("env", r.env)?,
        working_dir,
        user,
        hostname,
        labels: sandbox::parse_labels("labels", r.labels)?,
        resources,
        network,
        net_policy,
        start: r.start.unwrap_or(true),
        ttl,
        pool: None,
        request,
        id_generated,
        id,
    })
}

/// NetworkSpec → mode and policy. Egress and ports are BRIDGE-only.
fn network_spec(n: pb::NetworkSpec) -> Result<(NetworkMode, NetPolicy)> {
    let mode = match pb::NetworkMode::try_from(n.mode) {
        Ok(pb::NetworkMode::Unspecified | pb::NetworkMode::None) => NetworkMode::None,
        Ok(pb::NetworkMode::Bridge) => NetworkMode::Bridge,
        Err(_) => {
            return Err(Error::invalid(
                "network.mode",
                format!("{} is not a NetworkMode", n.mode),
            ))
        }
    };
    let egress = egress_spec("network.egress", n.egress)?;
    let ports = n
        .ports
        .into_iter()
        .enumerate()
        .map(|(i, p)| port_mapping_spec(i, p))
        .collect::<Result<Vec<_>>>()?;
    let policy = NetPolicy { egress, ports };
    if mode == NetworkMode::None && policy != NetPolicy::default() {
        return Err(Error::invalid(
            "network",
            "egress and ports apply to mode BRIDGE only; a NONE sandbox has no network",
        ));
    }
    policy.validate()?;
    Ok((mode, policy))
}

/// An EgressPolicy (the field `field`) → Egress; unset means ALLOW_ALL.
fn egress_spec(field: &str, e: Option<pb::EgressPolicy>) -> Result<Egress> {
    let Some(e) = e else {
        return Ok(Egress::AllowAll);
    };
    let rules = e
        .allow
        .into_iter()
        .enumerate()
        .map(|(i, r)| egress_rule(field, i, r))
        .collect::<Result<Vec<_>>>()?;
    match pb::EgressMode::try_from(e.mode) {
        Ok(pb::EgressMode::Unspecified | pb::EgressMode::AllowAll) if rules.is_empty() => {
            Ok(Egress::AllowAll)
        }
        Ok(pb::EgressMode::DenyAll) if rules.is_empty() => Ok(Egress::DenyAll),
        Ok(pb::EgressMode::AllowList) => Ok(Egress::AllowList { allow: rules }),
        Ok(_) => Err(Error::invalid(
            format!("{field}.allow"),
            "rules are only meaningful with mode ALLOW_LIST",
        )),
        Err(_) => Err(Error::invalid(
            format!("{field}.mode"),
            format!("{} is not an EgressMode", e.mode),
        )),
    }
}

/// UpdateSandboxNetworkRequest → the sandbox and its new egress policy.
pub fn update_network(r: pb::UpdateSandboxNetworkRequest) -> Result<(SandboxId, Egress)> {
    let id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
    if r.egress.is_none() {
        return Err(Error::invalid(
            "egress",
            "the new egress policy is required (mode ALLOW_ALL to open everything but \
             node-local destinations)",
        ));
    }
    let egress = egress_spec("egress", r.egress)?;
    NetPolicy {
        egress: egress.clone(),
        ports: Vec::new(),
    }
    .validate()?;
    Ok((id, egress))
}

fn protocol(field: &str, p: i32, default: Option<Protocol>) -> Result<Option<Protocol>> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Unspecified) => Ok(default),
        Ok(pb::Protocol::Tcp) => Ok(Some(Protocol::Tcp)),
        Ok(pb::Protocol::Udp) => Ok(Some(Protocol::Udp)),
        Err(_) => Err(Error::invalid(field, format!("{p} is not a Protocol"))),
    }
}

fn port(field: &str, p: u32) -> Result<u16> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::invalid(
            field,
            format!("{p} is not a port (1-65535)"),
        )),
    }
}

fn egress_rule(parent: &str, i: usize, r: pb::EgressRule) -> Result<EgressRule> {
    let field = |f: &str| format!("{parent}.allow[{i}].{f}");
    if r.cidr.is_empty() {
        return Err(Error::invalid(field("cidr"), "a CIDR is required"));
    }
    let net = r
        .cidr
        .parse()
        .map_err(|reason: String| Error::invalid(field("cidr"), reason))?;
    let ports = r
        .ports
        .iter()
        .map(|p| port(&field("ports"), *p))
        .collect::<Result<Vec<_>>>()?;
    Ok(EgressRule {
        net,
        ports,
        protocol: protocol(&field("protocol"), r.protocol, None)?,
    })
}

fn port_mapping_spec(i: usize, p: pb::PortMapping) -> Result<PortMapping> {
    let field = |f: &str| format!("network.ports[{i}].{f}");
    let host_ip = if p.host_ip.is_empty() {
        None
    } else {
        match p.host_ip.parse::<std::net::IpAddr>() {
            Ok(ip @ std::net::IpAddr::V4(_)) => Some(ip),
            _ => {
                return Err(Error::invalid(
                    field("host_ip"),
                    format!("{:?} is not an IPv4 address", p.host_ip),
                ))
            }
        }
    };
    Ok(PortMapping {
        host_port: port(&field("host_port"), p.host_port)?,
        container_port: port(&field("container_port"), p.container_port)?,
        protocol: protocol(&field("protocol"), p.protocol, Some(Protocol::Tcp))?
            .unwrap_or(Protocol::Tcp),
        host_ip,
    })
}

fn pb_protocol(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
    }
}

fn egress_policy(e: &Egress) -> pb::EgressPolicy {
    match e {
        Egress::AllowAll => pb::EgressPolicy {
            mode: pb::EgressMode::AllowAll as i32,
            allow: vec![],
        },
        Egress::DenyAll => pb::EgressPolicy {
            mode: pb::EgressMode::DenyAll as i32,
            allow: vec![],
        },
        Egress::AllowList { allow } => pb::EgressPolicy {
            mode: pb::EgressMode::AllowList as i32,
            allow: allow
                .iter()
                .map(|r| pb::EgressRule {
                    cidr: r.net.to_string(),
                    ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                    protocol: r.protocol.map_or(pb::Protocol::Unspecified, pb_protocol) as i32,
                })
                .collect(),
        },
    }
}

fn port_mapping(p: &PortMapping) -> pb::PortMapping {
    pb::PortMapping {
        host_port: u32::from(p.host_port),
        container_port: u32::from(p.container_port),
        protocol: pb_protocol(p.protocol) as i32,
        host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
    }
}

/// Domain sandbox → proto.
pub fn sandbox(s: sandbox::Sandbox) -> pb::Sandbox {
    let state = match s.state {
        State::Created => pb::SandboxState::Created,
        State::Running => pb::SandboxState::Running,
        State::Paused => pb::SandboxState::Paused,
        State::Stopped => pb::SandboxState::Stopped,
        State::Unknown => pb::SandboxState::Unknown,
    };
    let mode = match s.network {
        NetworkMode::None => pb::NetworkMode::None,
        NetworkMode::Bridge => pb::NetworkMode::Bridge,
    };
    pb::Sandbox {
        sandbox_id: s.id.to_string(),
        image: s.image,
        snapshot_id: s.snapshot_id,
        state: state as i32,
        pid: s.pid,
        exit_status: s.exit_status,
        oom_killed: s.oom_killed,
        labels: s.labels,
        resources: Some(pb::Resources {
            cpu_millis: s.resources.cpu_millis.unwrap_or(0),
            memory_bytes: s.resources.memory_bytes.unwrap_or(0),
            pids_limit: s.resources.pids_limit.unwrap_or(0),
        }),
        network: Some(pb::NetworkStatus {
            mode: mode as i32,
            ip_address: s.ip_address,
            gateway: s.gateway,
            egress: s.net_policy.as_ref().map(|p| egress_policy(&p.egress)),
            ports: s
                .net_policy
                .map(|p| p.ports.iter().map(port_mapping).collect())
                .unwrap_or_default(),
        }),
        command: s.command,
        hostname: s.hostname,
        created_at: ts(s.created_at),
        started_at: ts(s.started_at),
        expires_at: ts(s.expires_at),
        exited_at: ts(s.exited_at),
    }
}

/// Domain image → proto.
pub fn image(i: ImageInfo) -> pb::Image {
    pb::Image {
        name: i.name,
        digest: i.digest,
        size_bytes: i.size_bytes,
        created_at: ts(i.created_at),
    }
}

/// Domain snapshot → proto.
pub fn snapshot(s: sandbox::Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: s.id,
        sandbox_id: s.sandbox_id,
        parent_snapshot_id: s.parent_snapshot_id,
        image: s.image,
        size_bytes: s.size_bytes,
        created_at: ts(s.created_at),
        labels: s.labels,
    }
}

/// Default grace period of StopSandbox.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest grace period StopSandbox accepts.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

/// StopSandbox's request, validated: what the manager's `stop` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopSpec {
    /// The sandbox to stop.
    pub sandbox_id: SandboxId,
    /// The signal sent first (SIGTERM unless the request names one).
    pub signal: i32,
    /// How long the sandbox gets to exit before SIGKILL.
    pub timeout: Duration,
    /// SIGKILL everything once the grace period is over, instead of failing with
    /// DEADLINE_EXCEEDED.
    pub force: bool,
}

/// StopSandboxRequest → StopSpec.
pub fn stop_spec(r: pb::StopSandboxRequest) -> Result<StopSpec> {
    let sandbox_id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
    let signal = match r.signal {
        0 => libc::SIGTERM,
        s => signal("signal", s)?,
    };
    let timeout = match r.timeout {
        None => DEFAULT_STOP_TIMEOUT,
        Some(d) => match crate::util::duration(&d) {
            Some(d) if d <= MAX_STOP_TIMEOUT => d,
            Some(_) => return Err(Error::invalid("timeout", "longer than one hour")),
            None => return Err(Error::invalid("timeout", "negative")),
        },
    };
    Ok(StopSpec {
        sandbox_id,
        signal,
        timeout,
        force: r.force,
    })
}

/// WatchSandboxesRequest → the selector and the revision to resume after.
pub fn watch_sandboxes_spec(r: pb::WatchSandboxesRequest) -> Result<(sandbox::LabelSelector, i64)> {
    let selector = sandbox::LabelSelector::parse("label_selector", &r.label_selector)?;
    if r.resume_after < 0 {
        return Err(Error::invalid("resume_after", "must not be negative"));
    }
    Ok((selector, r.resume_after))
}

/// A sandbox event for WatchSandboxes.
pub fn sandbox_event(e: &sandbox::SandboxEvent) -> pb::SandboxEvent {
    use pb::SandboxEventType as T;
    use sandbox::EventKind as K;
    let kind = match e.kind {
        K::Created => T::Created,
        K::Started => T::Started,
        K::Exited => T::Exited,
        K::Stopped => T::Stopped,
        K::Deleted => T::Deleted,
        K::SnapshotCommitted => T::SnapshotCommitted,
        K::Restored => T::Restored,
    };
    pb::SandboxEvent {
        r#type: kind as i32,
        sandbox: Some(sandbox(e.sandbox.clone())),
        revision: e.revision,
        time: ts(Some(e.time)),
        snapshot_id: e.snapshot_id.clone(),
    }
}

/// Time between WatchSandboxStats readings when the request sets none.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest and longest WatchSandboxStats interval.
pub const STATS_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));

/// WatchSandboxStatsRequest → the sandbox and the interval.
pub fn watch_stats_spec(r: pb::WatchSandboxStatsRequest) -> Result<(SandboxId, Duration)> {
    let id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
    let (min, max) = STATS_INTERVAL_RANGE;
    let interval = match r.interval {
        None => DEFAULT_STATS_INTERVAL,
        Some(d) => match crate::util::duration(&d) {
            Some(d) if (min..=max).contains(&d) => d,
            _ => return Err(Error::invalid("interval", "must be from 100 ms to 1 hour")),
        },
    };
    Ok((id, interval))
}

/// A stats reading, for the API.
pub fn stats(s: crate::sandbox::stats::Stats) -> pb::SandboxStats {
    pb::SandboxStats {
        time: ts(Some(s.at)),
        cpu: Some(pb::CpuStats {
            usage_nanos: s.cpu.usage_nanos,
            user_nanos: s.cpu.user_nanos,
            system_nanos: s.cpu.system_nanos,
            periods: s.cpu.periods,
            throttled_periods: s.cpu.throttled_periods,
            throttled_nanos: s.cpu.throttled_nanos,
        }),
        memory: Some(pb::MemoryStats {
            usage_bytes: s.memory.usage_bytes,
            working_set_bytes: s.memory.working_set_bytes,
            limit_bytes: s.memory.limit_bytes,
            limit_hits: s.memory.limit_hits,
            oom_kills: s.memory.oom_kills,
        }),
        pids: Some(pb::PidsStats {
            current: s.pids.current,
            limit: s.pids.limit,
        }),
        io: Some(pb::IoStats {
            read_bytes: s.io.read_bytes,
            write_bytes: s.io.write_bytes,
            read_ops: s.io.read_ops,
            write_ops: s.io.write_ops,
        }),
        network: Some(pb::NetworkStats {
            rx_bytes: s.network.rx_bytes,
            rx_packets: s.network.rx_packets,
            rx_errors: s.network.rx_errors,
            rx_dropped: s.network.rx_dropped,
            tx_bytes: s.network.tx_bytes,
            tx_packets: s.network.tx_packets,
            tx_errors: s.network.tx_errors,
            tx_dropped: s.network.tx_dropped,
        }),
        writable_layer_bytes: i64::try_from(s.writable_layer_bytes).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::DEFAULT_DIR_MODE;

    #[test]
    fn stats_intervals_default_and_stay_in_range() {
        let req = |interval| pb::WatchSandboxStatsRequest {
            sandbox_id: "s".into(),
            interval,
        };
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(
            watch_stats_spec(req(None)).unwrap().1,
            DEFAULT_STATS_INTERVAL
        );
        assert_eq!(
            watch_stats_spec(req(d(0, 250_000_000))).unwrap().1,
            Duration::from_millis(250)
        );
        for bad in [d(0, 50_000_000), d(3601, 0), d(-1, 0)] {
            let e = watch_stats_spec(req(bad)).unwrap_err();
            assert!(e.to_string().contains("interval"), "{e}");
        }
        assert!(watch_stats_spec(pb::WatchSandboxStatsRequest::default()).is_err());
    }

    fn req() -> pb::CreateSandboxRequest {
        pb::CreateSandboxRequest {
            image: "busybox".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in_id_hostname_and_start() {
        let spec = create_spec(req()).unwrap();
        assert!(spec.start);
        assert_eq!(spec.hostname, spec.id.as_str());
        assert_eq!(
            spec.source,
            Source::Image(ImageRef::parse("image", "docker.io/library/busybox:latest").unwrap())
        );
        let spec = create_spec(pb::CreateSandboxRequest {
            start: Some(false),
            ..req()
        })
        .unwrap();
        assert!(!spec.start);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(pb::CreateSandboxRequest, &str)> = vec![
            (
                pb::CreateSandboxRequest {
                    sandbox_id: "Bad!".into(),
                    ..req()
                },
                "sandbox_id",
            ),
            (
                pb::CreateSandboxRequest {
                    image: "NOT VALID".into(),
                    ..req()
                },
                "image",
            ),
            (
                pb::CreateSandboxRequest {
                    image: String::new(),
                    ..req()
                },
                "image",
            ),
            (
                pb::CreateSandboxRequest {
                    working_dir: "relative".into(),
                    ..req()
                },
                "working_dir",
            ),
            (
                pb::CreateSandboxRequest {
                    hostname: "-bad".into(),
                    ..req()
                },
                "hostname",
            ),
            (
                pb::CreateSandboxRequest {
                    user: "a:b:c".into(),
                    ..req()
                },
                "user",
            ),
            (
                pb::CreateSandboxRequest {
                    command: vec![String::new()],
                    ..req()
                },
                "command",
            ),
            (
                pb::CreateSandboxRequest {
                    env: [("A=B".into(), "x".into())].into(),
                    ..req()
                },
                "env",
            ),
            (
                pb::CreateSandboxRequest {
                    labels: [("sandboxd.io/x".into(), "x".into())].into(),
                    ..req()
                },
                "labels",
            ),
            (
                pb::CreateSandboxRequest {
                    resources: Some(pb::Resources {
                        cpu_millis: -1,
                        ..Default::default()
                    }),
                    ..req()
                },
                "resources.cpu_millis",
            ),
            (
                pb::CreateSandboxRequest {
                    ttl: Some(prost_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    }),
                    ..req()
                },
                "ttl",
            ),
            (
                pb::CreateSandboxRequest {
                    network: Some(pb::NetworkSpec {
                        mode: 42,
                        ..Default::default()
                    }),
                    ..req()
                },
                "network.mode",
            ),
            (
                pb::CreateSandboxRequest {
                    network: Some(pb::NetworkSpec {
                        mode: pb::NetworkMode::None as i32,
                        egress: Some(pb::EgressPolicy {
                            mode: pb::EgressMode::DenyAll as i32,
                            allow: vec![],
                        }),
                        ..Default::default()
                    }),
                    ..req()
                },
                "network",
            ),
            (
                bridge(
                    pb::EgressMode::AllowList,
                    vec![pb::EgressRule {
                        cidr: "10.0.0.0/40".into(),
                        ..Default::default()
                    }],
                    vec![],
                ),
                "network.egress.allow[0].cidr",
            ),
            (
                bridge(
                    pb::EgressMode::AllowList,
                    vec![pb::EgressRule {
                        cidr: "10.0.0.1".into(),
                        ports: vec![70000],
                        ..Default::default()
                    }],
                    vec![],
                ),
                "network.egress.allow[0].ports",
            ),
            (
                bridge(
                    pb::EgressMode::DenyAll,
                    vec![pb::EgressRule {
                        cidr: "10.0.0.1".into(),
                        ..Default::default()
                    }],
                    vec![],
                ),
                "network.egress.allow",
            ),
            (
                bridge(
                    pb::EgressMode::AllowAll,
                    vec![],
                    vec![pb::PortMapping {
                        host_port: 8080,
                        container_port: 0,
                        ..Default::default()
                    }],
                ),
                "network.ports[0].container_port",
            ),
            (
                bridge(
                    pb::EgressMode::AllowAll,
                    vec![],
                    vec![pb::PortMapping {
                        host_port: 8080,
                        container_port: 80,
                        host_ip: "::1".into(),
                        ..Default::default()
                    }],
                ),
                "network.ports[0].host_ip",
            ),
        ];
        fn bridge(
            mode: pb::EgressMode,
            allow: Vec<pb::EgressRule>,
            ports: Vec<pb::PortMapping>,
        ) -> pb::CreateSandboxRequest {
            pb::CreateSandboxRequest {
                network: Some(pb::NetworkSpec {
                    mode: pb::NetworkMode::Bridge as i32,
                    egress: Some(pb::EgressPolicy {
                        mode: mode as i32,
                        allow,
                    }),
                    ports,
                }),
                ..req()
            }
        }
        for (r, field) in cases {
            let err = create_spec(r).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("invalid {field}")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn stop_defaults_to_sigterm_and_ten_seconds() {
        let spec = stop_spec(pb::StopSandboxRequest {
            sandbox_id: "sb".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (spec.signal, spec.timeout, spec.force),
            (libc::SIGTERM, DEFAULT_STOP_TIMEOUT, false)
        );
        let spec = stop_spec(pb::StopSandboxRequest {
            sandbox_id: "sb".into(),
            signal: libc::SIGKILL,
            timeout: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            force: true,
        })
        .unwrap();
        assert_eq!(
            (spec.signal, spec.timeout, spec.force),
            (libc::SIGKILL, MAX_STOP_TIMEOUT, true)
        );
    }

    #[test]
    fn stop_rejects_bad_signal_and_timeout_naming_the_field() {
        let d = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
        for (r, field) in [
            (
                pb::StopSandboxRequest {
                    sandbox_id: "Bad!".into(),
                    ..Default::default()
                },
                "sandbox_id",
            ),
            (
                pb::StopSandboxRequest {
                    signal: 65,
                    ..Default::default()
                },
                "signal",
            ),
            (
                pb::StopSandboxRequest {
                    signal: -9,
                    ..Default::default()
                },
                "signal",
            ),
            (
                pb::StopSandboxRequest {
                    timeout: d(3601),
                    ..Default::default()
                },
                "timeout",
            ),
            (
                pb::StopSandboxRequest {
                    timeout: d(-1),
                    ..Default::default()
                },
                "timeout",
            ),
        ] {
            let r = pb::StopSandboxRequest {
                sandbox_id: if r.sandbox_id.is_empty() {
                    "sb".into()
                } else {
                    r.sandbox_id
                },
                ..r
            };
            let err = stop_spec(r).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("invalid {field}")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn exec_and_write_streams_must_open_with_their_first_message() {
        for first in [
            None,
            Some(pb::ExecRequest {
                request: Some(pb::exec_request::Request::Stdin(b"x".to_vec())),
            }),
        ] {
            let err = exec_first(first).unwrap_err();
            assert!(err.to_string().starts_with("invalid request"), "{err}");
        }
        for first in [
            None,
            Some(pb::WriteFileRequest {
                request: Some(pb::write_file_request::Request::Data(b"x".to_vec())),
            }),
        ] {
            let err = write_file_first(first).unwrap_err();
            assert!(err.to_string().starts_with("invalid header"), "{err}");
        }
        let err = write_file_input(pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                pb::WriteFileHeader::default(),
            )),
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("invalid header"), "{err}");
        assert!(write_file_input(pb::WriteFileRequest { request: None })
            .unwrap()
            .is_none());
    }

    #[test]
    fn write_header_fields_are_validated_and_named() {
        let ok = pb::WriteFileHeader {
            sandbox_id: "sb".into(),
            path: "/a".into(),
            ..Default::default()
        };
        let (_, spec) = write_spec(ok.clone()).unwrap();
        assert_eq!((spec.mode, spec.uid, spec.gid), (0o644, 0, 0));
        let (_, spec) = write_spec(pb::WriteFileHeader {
            mode: 0o100_755,
            uid: Some(1000),
            gid: Some(50),
            ..ok.clone()
        })
        .unwrap();
        assert_eq!((spec.mode, spec.uid, spec.gid), (0o755, 1000, 50));
        for (h, field) in [
            (
                pb::WriteFileHeader {
                    path: "rel".into(),
                    ..ok.clone()
                },
                "header.path",
            ),
            (
                pb::WriteFileHeader {
                    sandbox_id: "Bad!".into(),
                    ..ok.clone()
                },
                "header.sandbox_id",
            ),
            (
                pb::WriteFileHeader {
                    uid: Some(u32::MAX),
                    ..ok.clone()
                },
                "header.uid",
            ),
        ] {
            let e = write_spec(h).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("invalid {field}")),
                "{e}"
            );
        }
    }

    #[test]
    fn file_requests_are_validated_and_named() {
        let spec = make_directory_spec(pb::MakeDirectoryRequest {
            sandbox_id: "sb".into(),
            path: "/a/./b/".into(),
            mode: 0,
            parents: true,
        })
        .unwrap();
        assert_eq!(spec.target.path.as_str(), "/a/b");
        assert_eq!((spec.mode, spec.parents), (DEFAULT_DIR_MODE, true));
        let err = remove_path_spec(pb::RemovePathRequest {
            sandbox_id: "sb".into(),
            path: "//./".into(),
            recursive: true,
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("invalid path"), "{err}");
        let errors = [
            read_file_spec(pb::ReadFileRequest {
                sandbox_id: "sb".into(),
                path: "/f".into(),
                offset: -1,
                ..Default::default()
            })
            .map(|_| ())
            .unwrap_err(),
            list_files_spec(pb::ListFilesRequest {
                sandbox_id: "sb".into(),
                path: "/".into(),
                depth: -1,
            })
            .map(|_| ())
            .unwrap_err(),
            stat_file_spec(pb::StatFileRequest {
                sandbox_id: "sb".into(),
                path: "f".into(),
            })
            .map(|_| ())
            .unwrap_err(),
            stat_file_spec(pb::StatFileRequest {
                sandbox_id: String::new(),
                path: "/f".into(),
            })
            .map(|_| ())
            .unwrap_err(),
        ];
        for (err, field) in errors.iter().zip(["offset", "depth", "path", "sandbox_id"]) {
            assert!(
                err.to_string().starts_with(&format!("invalid {field}")),
                "{field}: {err}"
            );
        }
    }
}
