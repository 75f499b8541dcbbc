//! Exec and ExecSync messages to and from the domain.

use crate::error::{Error, Result};
use crate::pb;
use crate::sandbox::{self, SandboxId};

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

/// Exec's first message (`None`: the stream ended before it) → ExecSpec.
pub fn exec_first(first: Option<pb::ExecRequest>) -> Result<sandbox::ExecSpec> {
    let first = first
        .ok_or_else(|| Error::invalid("request", "the stream ended before the start message"))?;
    match first.request {
        Some(pb::exec_request::Request::Start(start)) => exec_spec(start),
        _ => Err(Error::invalid("request", "the first message must be start")),
    }
}

/// Exec's start message → ExecSpec.
fn exec_spec(s: pb::ExecStart) -> Result<sandbox::ExecSpec> {
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
        Request::Signal(s) => Some(sandbox::ExecInput::Signal(signal("signal", s)?)),
    })
}

/// A signal number (1-64) from request field `field`.
pub(super) fn signal(field: &str, s: i32) -> Result<i32> {
    if (1..=64).contains(&s) {
        Ok(s)
    } else {
        Err(Error::invalid(
            field,
            format!("{s} is not a signal number (1-64)"),
        ))
    }
}

/// Domain exec event → proto; a failure ends the stream with its status.
pub fn exec_event(ev: sandbox::ExecEvent) -> Result<pb::ExecResponse, tonic::Status> {
    use pb::exec_response::Response;
    let response = match ev {
        sandbox::ExecEvent::Stdout(d) => Response::Stdout(d),
        sandbox::ExecEvent::Stderr(d) => Response::Stderr(d),
        sandbox::ExecEvent::Exited(e) => Response::Exited(pb::ExecExited {
            exit_code: e.exit_code,
            signal: e.signal,
            timed_out: e.timed_out,
            oom_killed: e.oom_killed,
        }),
        sandbox::ExecEvent::Failed(e) => return Err(e.into()),
    };
    Ok(pb::ExecResponse {
        response: Some(response),
    })
}
