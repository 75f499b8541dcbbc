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

/// Largest `max_output_bytes` of ExecSync, per stream (the response must fit a gRPC message).
pub const MAX_EXEC_SYNC_OUTPUT: i64 = 16 << 20;
/// Default `max_output_bytes` of ExecSync.
pub const DEFAULT_EXEC_SYNC_OUTPUT: i64 = 1 << 20;

fn exec_timeout(d: Option<prost_types::Duration>) -> Result<Option<std::time::Duration>> {
    match d {
        None => Ok(None),
        Some(d) => match crate::util::duration(&d) {
            None => Err(Error::invalid("timeout", "a timeout cannot be negative")),
            Some(t) if t.is_zero() => Ok(None),
            Some(t) => Ok(Some(t)),
        },
    }
}

/// The fields Exec and ExecSync share, validated.
struct ExecCommon {
    sandbox_id: SandboxId,
    args: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
    working_dir: Option<String>,
    user: Option<String>,
}

fn exec_common(
    sandbox_id: &str,
    args: Vec<String>,
    env: std::collections::HashMap<String, String>,
    working_dir: String,
    user: String,
) -> Result<ExecCommon> {
    let id = SandboxId::parse("sandbox_id", sandbox_id)?;
    let args = sandbox::parse_args("args", args)?;
    if args.is_empty() {
        return Err(Error::invalid("args", "a command is required"));
    }
    let env = sandbox::parse_env("env", env)?;
    let working_dir = if working_dir.is_empty() {
        None
    } else {
        Some(sandbox::parse_abs_path("working_dir", &working_dir)?)
    };
    let user = if user.is_empty() { None } else { Some(user) };
    if let Some(u) = &user {
        if u.len() > 256 || u.split(':').count() > 2 || u.split(':').any(str::is_empty) {
            return Err(Error::invalid(
                "user",
                format!("{u:?} is not user, uid, user:group or uid:gid"),
            ));
        }
    }
    Ok(ExecCommon {
        sandbox_id: id,
        args,
        env,
        working_dir,
        user,
    })
}

/// Exec's start message → ExecSpec.
pub fn exec_spec(s: pb::ExecStart) -> Result<sandbox::ExecSpec> {
    let ExecCommon {
        sandbox_id,
        args,
        env,
        working_dir,
        user,
    } = exec_common(&s.sandbox_id, s.args, s.env, s.working_dir, s.user)?;
    let tty_size = match s.tty_size {
        None => None,
        Some(t) if t.rows == 0 || t.cols == 0 || t.rows > 10_000 || t.cols > 10_000 => {
            return Err(Error::invalid(
                "tty_size",
                format!("{}x{} is not a terminal size", t.rows, t.cols),
            ))
        }
        Some(t) => Some((t.rows, t.cols)),
    };
    Ok(sandbox::ExecSpec {
        sandbox_id,
        args,
        env,
        working_dir,
        user,
        tty: s.tty,
        stdin: s.stdin,
        timeout: exec_timeout(s.timeout)?,
        tty_size,
    })
}

/// ExecSyncRequest → (ExecSpec, stdin, max output per stream).
pub fn exec_sync_spec(r: pb::ExecSyncRequest) -> Result<(sandbox::ExecSpec, bytes::Bytes, usize)> {
    let ExecCommon {
        sandbox_id,
        args,
        env,
        working_dir,
        user,
    } = exec_common(&r.sandbox_id, r.args, r.env, r.working_dir, r.user)?;
    let max = match r.max_output_bytes {
        0 => DEFAULT_EXEC_SYNC_OUTPUT,
        m if m < 0 => return Err(Error::invalid("max_output_bytes", "cannot be negative")),
        m if m > MAX_EXEC_SYNC_OUTPUT => {
            return Err(Error::invalid(
                "max_output_bytes",
                format!("at most {MAX_EXEC_SYNC_OUTPUT}; use Exec to stream more"),
            ))
        }
        m => m,
    };
    let spec = sandbox::ExecSpec {
        sandbox_id,
        args,
        env,
        working_dir,
        user,
        tty: false,
        stdin: !r.stdin.is_empty(),
        timeout: exec_timeout(r.timeout)?,
        tty_size: None,
    };
    Ok((spec, bytes::Bytes::from(r.stdin), max as usize))
}

/// A later Exec client message → domain input (`None` for messages to ignore). `stdin_allowed`
/// is the start message's `stdin`.
pub fn exec_input(r: pb::ExecRequest, stdin_allowed: bool) -> Result<Option<sandbox::ExecInput>> {
    use pb::exec_request::Request;
    let Some(request) = r.request else {
        return Ok(None);
    };
    Ok(match request {
        Request::Start(_) => {
            return Err(Error::invalid(
                "start",
                "only the first message may be start",
            ))
        }
        Request::Stdin(_) if !stdin_allowed => {
            return Err(Error::invalid(
                "stdin",
                "start.stdin was false: this exec takes no input",
            ))
        }
        Request::Stdin(data) => Some(sandbox::ExecInput::Stdin(bytes::Bytes::from(data))),
        Request::CloseStdin(_) => Some(sandbox::ExecInput::CloseStdin),
        Request::Resize(t) if t.rows > 0 && t.cols > 0 => {
            Some(sandbox::ExecInput::Resize(t.rows, t.cols))
        }
        Request::Resize(t) => {
            return Err(Error::invalid(
                "resize",
                format!("{}x{} is not a terminal size", t.rows, t.cols),
            ))
        }
        Request::Signal(s) if (1..=64).contains(&s) => Some(sandbox::ExecInput::Signal(s)),
        Request::Signal(s) => {
            return Err(Error::invalid(
                "signal",
                format!("{s} is not a signal number (1-64)"),
            ))
        }
    })
}

/// Domain exec event → proto.
pub fn exec_event(ev: sandbox::ExecEvent) -> pb::ExecResponse {
    use pb::exec_response::Response;
    let response = match ev {
        sandbox::ExecEvent::Stdout(d) => Response::Stdout(d.to_vec()),
        sandbox::ExecEvent::Stderr(d) => Response::Stderr(d.to_vec()),
        sandbox::ExecEvent::Exited(e) => Response::Exited(pb::ExecExited {
            exit_code: e.exit_code,
            signal: e.signal,
            timed_out: e.timed_out,
            oom_killed: e.oom_killed,
        }),
    };
    pb::ExecResponse {
        response: Some(response),
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
