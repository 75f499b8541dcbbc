//! Conversions between proto messages and domain types. Invalid input stops here.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::image::{ImageInfo, ImageRef};
use crate::pb;
use crate::sandbox::{self, CreateSpec, NetworkMode, Resources, SandboxId, Source, State};

fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(crate::util::timestamp)
}

/// CreateSandboxRequest → CreateSpec.
pub fn create_spec(r: pb::CreateSandboxRequest) -> Result<CreateSpec> {
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
    let network = match r.network.map(|n| n.mode) {
        None => NetworkMode::None,
        Some(m) => match pb::NetworkMode::try_from(m) {
            Ok(pb::NetworkMode::Unspecified | pb::NetworkMode::None) => NetworkMode::None,
            Ok(pb::NetworkMode::Bridge) => {
                return Err(Error::FailedPrecondition(
                    "network.mode BRIDGE is not available on this node yet: CNI networking is not configured".into(),
                ))
            }
            Err(_) => return Err(Error::invalid("network.mode", format!("{m} is not a NetworkMode"))),
        },
    };
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
        start: r.start.unwrap_or(true),
        ttl,
        id,
    })
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
        created_at: i.created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    network: Some(pb::NetworkSpec { mode: 42 }),
                    ..req()
                },
                "network.mode",
            ),
        ];
        for (r, field) in cases {
            let err = create_spec(r).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("invalid {field}")),
                "{field}: {err}"
            );
        }
    }
}
