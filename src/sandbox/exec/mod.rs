//! Exec: processes started in a running sandbox through containerd's task API (no agent inside),
//! their stdio carried over FIFOs with bounded buffers, so a slow client slows the process down
//! instead of growing our memory. This file holds the request and its start; `launch` makes
//! the process and its plumbing, `session` drives it to its end.

mod launch;
mod session;

use launch::{ExecIo, LaunchError};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::manager::Manager;
use super::model::SandboxId;
use crate::error::{Error, Result};
use crate::files;
use crate::runtime::spec::{self, User};
use crate::runtime::{LaunchFault, TaskState};
use crate::sys;

/// The largest output message: what is read from an output pipe at a time.
pub const EXEC_CHUNK: usize = 128 * 1024;
/// Output events queued towards one client before the process is slowed down.
pub const EXEC_OUTPUT_QUEUE: usize = 8;
/// How long output of a busy process is gathered into one message (see `pump`).
pub const EXEC_COALESCE: Duration = Duration::from_millis(1);
/// Input events queued from one client.
pub const EXEC_INPUT_QUEUE: usize = 16;
/// How long output may keep flowing after the process exited (its children may hold the pipes).
pub const EXEC_OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Default terminal size.
const DEFAULT_TTY: (u32, u32) = (24, 80);

/// A validated exec request.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Target sandbox.
    pub sandbox_id: SandboxId,
    /// argv; never empty.
    pub args: Vec<String>,
    /// Environment merged over the sandbox's.
    pub env: BTreeMap<String, String>,
    /// Working directory override.
    pub working_dir: Option<String>,
    /// User override.
    pub user: Option<String>,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
    /// Whether the client sends input.
    pub stdin: bool,
    /// Kill the process after this long.
    pub timeout: Option<Duration>,
    /// Initial terminal size (rows, cols).
    pub tty_size: Option<(u32, u32)>,
}

/// What the client sends after the start message.
#[derive(Debug)]
pub enum ExecInput {
    /// Bytes for the process's stdin.
    Stdin(Bytes),
    /// End of input.
    CloseStdin,
    /// New terminal size (rows, cols).
    Resize(u32, u32),
    /// A signal number for the process.
    Signal(i32),
    /// The client went away: kill the process.
    Cancel,
}

/// What the server sends.
#[derive(Debug)]
pub enum ExecEvent {
    /// Output of stdout (or the terminal).
    Stdout(Bytes),
    /// Output of stderr.
    Stderr(Bytes),
    /// The last event.
    Exited(ExitInfo),
    /// The last event when the exit could not be known (containerd went away): the call ends
    /// with this error.
    Failed(Error),
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code (128 + signal when killed by one).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: i32,
    /// Killed because its timeout ran out.
    pub timed_out: bool,
    /// Killed by the kernel's OOM killer.
    pub oom_killed: bool,
}

/// A started exec: its identity, and the halves that [`ExecSession::run`] drives.
pub struct ExecSession {
    manager: Arc<Manager>,
    sandbox: String,
    /// containerd's exec id.
    pub exec_id: String,
    /// Host pid of the process.
    pub pid: u32,
    spec: ExecSpec,
    io: ExecIo,
    oom_before: u64,
    requested_at: std::time::Instant,
    /// containerd's Wait on the process, issued before it was started.
    wait: WaitHandle,
}

pub(super) type WaitHandle = tokio::task::JoinHandle<Result<Option<crate::runtime::Exit>>>;

impl Manager {
    /// Starts a process in a running sandbox. Errors that stop it from starting (no such
    /// sandbox, not running, bad program, bad user) are returned here, before any output.
    pub async fn exec_start(self: &Arc<Self>, spec: ExecSpec) -> Result<ExecSession> {
        let requested_at = std::time::Instant::now();
        let id = spec.sandbox_id.clone();
        // Independent reads: one round trip instead of two (the container's error still wins).
        let (container, task) = tokio::join!(self.existing(&id), self.task(id.as_str()));
        let container = container?;
        let pid1 = match task? {
            Some(t) if t.state == TaskState::Running => t.pid,
            Some(t) if t.state == TaskState::Paused => {
                return Err(Error::FailedPrecondition(format!("sandbox {id} is paused")))
            }
            // A slow shim reports UNKNOWN for a live task: an exec may well succeed, so try it
            // (a dead PID 1 fails the exec with a clear error of its own).
            Some(t) if t.state == TaskState::Unknown && t.pid != 0 => t.pid,
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is not running; start it first"
                )))
            }
        };
        let base: serde_json::Value = serde_json::from_slice(&container.spec).unwrap_or_default();
        let base = &base["process"];
        let mut env = spec::env_of(base);
        spec::merge_env(&mut env, &spec.env);
        if spec.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".to_string());
        }
        let cwd = spec
            .working_dir
            .clone()
            .unwrap_or_else(|| base["cwd"].as_str().unwrap_or("/").to_string());
        let base_user = User {
            uid: base["user"]["uid"].as_u64().unwrap_or(0) as u32,
            gid: base["user"]["gid"].as_u64().unwrap_or(0) as u32,
        };
        // The user and the working dir are looked up in the sandbox's own files, through the
        // same confined (and pinned) root as FileService: they are the sandbox's to plant.
        let still_pid1 = || async {
            let task = self.task(id.as_str()).await?;
            Ok(task.is_some_and(|t| {
                matches!(t.state, TaskState::Running | TaskState::Unknown) && t.pid == pid1
            }))
        };
        let root = files::open_process_root(pid1, None, still_pid1)
            .await
            .map_err(|e| match e {
                Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
                    "sandbox {id} is not running; start it first"
                )),
                e => e,
            })?;
        let (user, check_cwd) = (spec.user.clone(), cwd.clone());
        let (user, cwd_ok) = sys::blocking(move || {
            let user = match user {
                None => base_user,
                Some(u) => files::resolve_user_in(&root, "user", &u)?,
            };
            // A working dir that does not exist would fail deep inside runc with a vague message.
            Ok((user, root.is_dir(&check_cwd)))
        })
        .await?;
        if !cwd_ok {
            return Err(Error::invalid(
                "working_dir",
                format!("{cwd:?} is not a directory in sandbox {id}"),
            ));
        }
        let size = spec.tty_size.unwrap_or(DEFAULT_TTY);
        let process = spec::process(
            &spec.args,
            &env,
            &cwd,
            user,
            spec.tty,
            spec.tty.then_some(size),
            self.cfg.walls.oom_score_adj,
        )?;

        // The relay reads the process's own pipes (no copy in the shim); the shim offers it no
        // stdin and no terminal, so those execs keep the FIFOs.
        let relay = self
            .relay
            .clone()
            .filter(|r| !spec.tty && !spec.stdin && r.usable());
        let launched = match self.launch(&spec, &id, &process, relay.as_ref()).await {
            Err(LaunchError::RelayIo(why)) => {
                // Nothing ran: the shim could not start the helper. FIFOs work everywhere.
                if let Some(r) = &relay {
                    r.disable(&why);
                }
                self.launch(&spec, &id, &process, None).await
            }
            other => other,
        }
        .map_err(|e| match e {
            LaunchError::Failed(e) => e,
            LaunchError::RelayIo(why) => Error::Internal(why),
        })?;
        if spec.tty {
            let (rows, cols) = size;
            let _ = self
                .resize(id.as_str(), &launched.exec_id, rows, cols)
                .await;
        }
        Ok(ExecSession {
            manager: self.clone(),
            sandbox: id.to_string(),
            exec_id: launched.exec_id,
            pid: launched.pid,
            spec,
            io: launched.io,
            oom_before: launched.oom_before,
            requested_at,
            wait: launched.wait,
        })
    }
}

/// Start failures caused by the request are the caller's to fix.
pub(super) fn exec_error(spec: &ExecSpec, e: Error) -> Error {
    match LaunchFault::of(&e) {
        Some(LaunchFault::Program(msg)) => {
            Error::invalid("args", format!("cannot run {:?}: {msg}", spec.args[0]))
        }
        Some(LaunchFault::WorkingDir(msg)) => Error::invalid("working_dir", msg),
        None => e,
    }
}

/// Output of [`Manager::exec_sync`].
#[derive(Debug, Default, PartialEq)]
pub struct ExecSyncResult {
    /// How it ended.
    pub exit: ExitInfo,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// stdout had more than the limit.
    pub stdout_truncated: bool,
    /// stderr had more than the limit.
    pub stderr_truncated: bool,
}

impl Manager {
    /// ExecSync: runs to completion, feeding `stdin` then closing it, capturing up to `max_output`
    /// bytes of each stream and draining (discarding) the rest so the process never blocks.
    /// What is captured counts against the budget all ExecSync calls share: a call that would
    /// go past it is killed and fails with RESOURCE_EXHAUSTED.
    pub async fn exec_sync(
        self: &Arc<Self>,
        mut spec: ExecSpec,
        stdin: Bytes,
        max_output: usize,
    ) -> Result<ExecSyncResult> {
        spec.stdin = !stdin.is_empty();
        spec.tty = false;
        let session = self.exec_start(spec).await?;
        let (in_tx, in_rx) = mpsc::channel(EXEC_INPUT_QUEUE);
        let (out_tx, mut out_rx) = mpsc::channel(EXEC_OUTPUT_QUEUE);
        let runner = tokio::spawn(session.run(in_rx, out_tx));
        if !stdin.is_empty() {
            let _ = in_tx.send(ExecInput::Stdin(stdin)).await;
            let _ = in_tx.send(ExecInput::CloseStdin).await;
        }
        let mut result = ExecSyncResult::default();
        let mut share = self.exec_sync_budget.share();
        while let Some(ev) = out_rx.recv().await {
            let (buf, truncated, data) = match ev {
                ExecEvent::Stdout(d) => (&mut result.stdout, &mut result.stdout_truncated, d),
                ExecEvent::Stderr(d) => (&mut result.stderr, &mut result.stderr_truncated, d),
                ExecEvent::Exited(info) => {
                    result.exit = info;
                    break;
                }
                ExecEvent::Failed(e) => {
                    drop(in_tx);
                    let _ = runner.await;
                    return Err(e);
                }
            };
            let room = max_output.saturating_sub(buf.len());
            let kept = room.min(data.len());
            if !share.cover(share.bytes() + kept) {
                // Dropping the output kills the process; the session then cleans it up.
                drop((out_rx, in_tx));
                let _ = runner.await;
                return Err(self.exec_sync_budget.exhausted());
            }
            buf.extend_from_slice(&data[..kept]);
            *truncated |= data.len() > room;
        }
        drop(in_tx);
        let _ = runner.await;
        Ok(result)
    }
}
