//! Exec: processes started in a running sandbox through containerd's task API (no agent inside),
//! their stdio carried over FIFOs with bounded buffers, so a slow client slows the process down
//! instead of growing our memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::manager::Manager;
use super::model::SandboxId;
use super::observe::Observer;
use super::relay::{enlarge_pipe, ExecRelay, Pending, RelayedIo, RELAY_HANDOFF_TIMEOUT};
use crate::error::{Error, Result};
use crate::files;
use crate::runtime::spec::{self, User};
use crate::runtime::{ExecIo as ProcessIo, LaunchFault, NewExec, TaskState};
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
#[derive(Debug, PartialEq)]
pub enum ExecEvent {
    /// Output of stdout (or the terminal).
    Stdout(Bytes),
    /// Output of stderr.
    Stderr(Bytes),
    /// The last event.
    Exited(ExitInfo),
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

type WaitHandle = tokio::task::JoinHandle<Result<Option<crate::runtime::Exit>>>;

/// An exec's stdio on our side, and what keeps it alive.
struct ExecIo {
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    stderr: Option<pipe::Receiver>,
    /// The FIFO files, removed when the session ends.
    _dir: Option<FifoDir>,
    /// The relay helper's connection: it stays until this closes.
    _relay: Option<std::os::unix::net::UnixStream>,
    /// Output reaches EOF only once the exec is deleted (the shim holds the pipes' write ends).
    eof_after_delete: bool,
    /// Inodes of the relayed pipes, to tell whether anything in the sandbox still holds them.
    pipe_inodes: Vec<u64>,
}

/// A created and started exec process.
struct Launched {
    exec_id: String,
    pid: u32,
    io: ExecIo,
    oom_before: u64,
    wait: WaitHandle,
}

/// Why a launch failed: the relay's I/O could not be set up (nothing ran; FIFOs will do), or
/// anything else.
enum LaunchError {
    RelayIo(String),
    Failed(Error),
}

impl From<Error> for LaunchError {
    fn from(e: Error) -> Self {
        LaunchError::Failed(e)
    }
}

/// How a launch's output leaves the shim: FIFOs, or the relay with the exec's registration.
enum Plumbing<'a> {
    Fifos(Fifos),
    Relay(&'a Arc<ExecRelay>, Pending),
}

/// An exec's opened FIFOs, with writers held open until the shim has opened its own.
struct Fifos {
    dir: FifoDir,
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    stderr: Option<pipe::Receiver>,
    holds: Vec<pipe::Sender>,
}

impl Fifos {
    /// The stdin, stdout and stderr paths for containerd ("" for a stream not used).
    fn uris(&self, spec: &ExecSpec) -> (String, String, String) {
        let (stdin, stdout, stderr) = self.dir.paths();
        let shown = |p: PathBuf, on: bool| match on {
            true => p.display().to_string(),
            false => String::new(),
        };
        (
            shown(stdin, spec.stdin),
            shown(stdout, true),
            shown(stderr, !spec.tty),
        )
    }

    fn into_io(self) -> ExecIo {
        ExecIo {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            _dir: Some(self.dir),
            _relay: None,
            eof_after_delete: false,
            pipe_inodes: Vec::new(),
        }
    }
}

/// The process's own pipes from the relay, as async readers.
fn relayed_io(r: RelayedIo) -> std::io::Result<ExecIo> {
    enlarge_pipe(&r.stdout);
    enlarge_pipe(&r.stderr);
    let inode = |fd: &std::os::fd::OwnedFd| nix::sys::stat::fstat(fd).map(|st| st.st_ino);
    let pipe_inodes = vec![inode(&r.stdout)?, inode(&r.stderr)?];
    Ok(ExecIo {
        pipe_inodes,
        stdin: None,
        stdout: pipe::Receiver::from_owned_fd(r.stdout)?,
        stderr: Some(pipe::Receiver::from_owned_fd(r.stderr)?),
        _dir: None,
        _relay: Some(r.conn),
        eof_after_delete: true,
    })
}

/// The FIFO directory of one exec, removed on drop.
struct FifoDir(PathBuf);

impl FifoDir {
    fn paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.0.join("stdin"),
            self.0.join("stdout"),
            self.0.join("stderr"),
        )
    }
}

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) -> Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| Error::io(format!("creating fifo {}", path.display()), e.into()))
}

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

    /// Creates and starts the exec process with its stdio on FIFOs, or on the relay if given.
    async fn launch(
        &self,
        spec: &ExecSpec,
        id: &SandboxId,
        process: &[u8],
        relay: Option<&Arc<ExecRelay>>,
    ) -> std::result::Result<Launched, LaunchError> {
        let exec_id = format!("exec-{}", crate::util::random_hex(8));
        let mut plumbing = match relay {
            Some(r) => Plumbing::Relay(r, r.register(&exec_id)),
            None => Plumbing::Fifos(self.fifos(spec, id, &exec_id)?),
        };
        let (stdin, stdout, stderr) = match &plumbing {
            Plumbing::Fifos(f) => f.uris(spec),
            Plumbing::Relay(r, _) => (String::new(), r.uri().to_string(), r.uri().to_string()),
        };
        let exec = NewExec {
            exec_id: &exec_id,
            process,
            io: ProcessIo {
                stdin,
                stdout,
                stderr,
                terminal: spec.tty,
            },
        };
        let cd = &self.cd;
        cd.exec(id.as_str(), exec)
            .await
            .map_err(|e| exec_error(spec, e))?;
        let oom_before = self.oom_kills(id);
        // Waiting before starting (as ctr does) overlaps the Wait round trip with the start, so a
        // short process's exit is known as soon as the start returns; a created exec's wait
        // simply blocks until it has run.
        let wait = {
            let (cd, id, exec_id) = (cd.clone(), id.to_string(), exec_id.clone());
            tokio::spawn(async move { cd.wait(&id, Some(&exec_id)).await })
        };
        let started = cd.start(id.as_str(), Some(&exec_id)).await;
        if let Plumbing::Fifos(f) = &mut plumbing {
            f.holds.clear();
        }
        let delete = || async {
            let _ = cd.delete_process(id.as_str(), &exec_id).await;
        };
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                wait.abort();
                delete().await;
                // The shim names its I/O setup in the error when it could not run the helper.
                if relay.is_some() && e.to_string().contains("process I/O") {
                    return Err(LaunchError::RelayIo(e.to_string()));
                }
                return Err(exec_error(spec, e).into());
            }
        };
        let io = match plumbing {
            Plumbing::Fifos(f) => f.into_io(),
            Plumbing::Relay(r, pending) => match pending.wait_for_pipes().await.map(relayed_io) {
                Some(Ok(io)) => io,
                failed => {
                    // The process runs with nobody reading its output: it must not stay.
                    kill_tree(pid, libc::SIGKILL);
                    let _ = wait.await;
                    delete().await;
                    let why = match failed {
                        Some(Err(e)) => format!("the exec output relay's pipes are unusable: {e}"),
                        _ => format!(
                            "the exec output relay did not hand over the pipes within {RELAY_HANDOFF_TIMEOUT:?}"
                        ),
                    };
                    r.disable(&why);
                    return Err(Error::Internal(why).into());
                }
            },
        };
        Ok(Launched {
            exec_id,
            pid,
            io,
            oom_before,
            wait,
        })
    }

    /// Makes and opens an exec's FIFOs.
    fn fifos(&self, spec: &ExecSpec, id: &SandboxId, exec_id: &str) -> Result<Fifos> {
        let dir = FifoDir(self.exec_dir().join(format!("{id}-{exec_id}")));
        std::fs::create_dir_all(&dir.0)
            .map_err(|e| Error::io(format!("creating {}", dir.0.display()), e))?;
        let (stdin_path, stdout_path, stderr_path) = dir.paths();
        mkfifo(&stdout_path)?;
        if !spec.tty {
            mkfifo(&stderr_path)?;
        }
        if spec.stdin {
            mkfifo(&stdin_path)?;
        }
        let open_err =
            |what: &str, e: std::io::Error| Error::io(format!("opening the {what} fifo"), e);
        let receiver = |path: &Path, what: &str| {
            pipe::OpenOptions::new()
                .open_receiver(path)
                .map_err(|e| open_err(what, e))
        };
        let sender = |path: &Path, what: &str| {
            pipe::OpenOptions::new()
                .open_sender(path)
                .map_err(|e| open_err(what, e))
        };
        let stdout = receiver(&stdout_path, "stdout")?;
        let stderr = match spec.tty {
            true => None,
            false => Some(receiver(&stderr_path, "stderr")?),
        };
        // Until the shim has opened its write ends, a reader alone would see EOF: hold writers.
        let mut holds = vec![sender(&stdout_path, "stdout")?];
        if !spec.tty {
            holds.push(sender(&stderr_path, "stderr")?);
        }
        // Read-write, so that opening does not wait for (or fail without) the shim's reader.
        let stdin = match spec.stdin {
            true => Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&stdin_path)
                    .map_err(|e| open_err("stdin", e))?,
            ),
            false => None,
        };
        Ok(Fifos {
            dir,
            stdin,
            stdout,
            stderr,
            holds,
        })
    }

    async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        self.cd.resize_pty(id, exec_id, rows, cols).await
    }

    /// Whether a process of sandbox `id` holds one of the pipes `inodes` (true when unknown).
    fn sandbox_holds_pipes(&self, id: &str, inodes: &[u64]) -> bool {
        let cgroup = self.sandbox_cgroup(id);
        let v1 = format!("/sys/fs/cgroup/pids{cgroup}/cgroup.procs");
        let v2 = format!("/sys/fs/cgroup{cgroup}/cgroup.procs");
        let Ok(procs) = std::fs::read_to_string(v1).or_else(|_| std::fs::read_to_string(v2)) else {
            return true;
        };
        let wanted: Vec<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
        procs.lines().any(|pid| {
            std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        })
    }

    /// The sandbox's count of OOM kills so far (0 when the cgroup does not say).
    fn oom_kills(&self, id: &SandboxId) -> u64 {
        let cgroup = self.sandbox_cgroup(id.as_str());
        let v1 = format!("/sys/fs/cgroup/memory{cgroup}/memory.oom_control");
        let v2 = format!("/sys/fs/cgroup{cgroup}/memory.events");
        let text = std::fs::read_to_string(v1)
            .or_else(|_| std::fs::read_to_string(v2))
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Start failures caused by the request are the caller's to fix.
fn exec_error(spec: &ExecSpec, e: Error) -> Error {
    match LaunchFault::of(&e) {
        Some(LaunchFault::Program(msg)) => {
            Error::invalid("args", format!("cannot run {:?}: {msg}", spec.args[0]))
        }
        Some(LaunchFault::WorkingDir(msg)) => Error::invalid("working_dir", msg),
        None => e,
    }
}

impl ExecSession {
    /// Drives the process to its end: input from `input`, output and the final exit to `output`.
    /// A closed `output` (client gone) kills the process. Always cleans up the FIFOs and deletes
    /// the process from the task.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<ExecInput>,
        output: mpsc::Sender<ExecEvent>,
    ) {
        let span = tracing::info_span!("exec", sandbox_id = %self.sandbox, exec_id = %self.exec_id);
        async move {
            let cd = self.manager.backend().clone();
            let (sandbox, exec_id) = (self.sandbox.clone(), self.exec_id.clone());
            let first = Arc::new(std::sync::Once::new());
            let at = self.requested_at;
            // Set once every byte is known to be in the pipes: the pumps then stop at empty.
            let (finish_tx, finish) = tokio::sync::watch::channel(false);
            let observer = self.manager.observer.clone();
            let out_pump = tokio::spawn(pump(self.io.stdout, output.clone(), ExecEvent::Stdout, first.clone(), at, finish.clone(), observer.clone()));
            let err_pump = self.io.stderr.take().map(|rx| tokio::spawn(pump(rx, output.clone(), ExecEvent::Stderr, first.clone(), at, finish, observer)));
            let wait = &mut self.wait;
            let timeout = async {
                match self.spec.timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(timeout);
            let mut stdin = self.io.stdin.take();
            let mut timed_out = false;
            let mut input_open = true;
            let mut client_gone = false;
            let wait_result = loop {
                tokio::select! {
                    res = &mut *wait => break res,
                    _ = &mut timeout, if !timed_out => {
                        timed_out = true;
                        tracing::info!("exec timed out; killing it");
                        kill_tree(self.pid, libc::SIGKILL);
                    }
                    _ = output.closed(), if !client_gone => {
                        tracing::info!("client went away; killing the exec");
                        kill_tree(self.pid, libc::SIGKILL);
                        client_gone = true;
                        input_open = false;
                    }
                    msg = input.recv(), if input_open => match msg {
                        Some(ExecInput::Stdin(data)) => {
                            if let Some(w) = stdin.as_mut() {
                                self.manager.observer.exec_input(data.len());
                                if w.write_all(&data).await.is_err() {
                                    stdin = None;
                                }
                            }
                        }
                        Some(ExecInput::CloseStdin) => {
                            if stdin.take().is_some() {
                                let _ = cd.close_stdin(&sandbox, &exec_id).await;
                            }
                        }
                        Some(ExecInput::Resize(rows, cols)) => {
                            if self.spec.tty {
                                let _ = self.manager.resize(&sandbox, &exec_id, rows, cols).await;
                            }
                        }
                        Some(ExecInput::Signal(sig)) => {
                            let _ = cd.kill(&sandbox, Some(&exec_id), sig as u32, false).await;
                        }
                        Some(ExecInput::Cancel) => {
                            tracing::info!("client cancelled; killing the exec");
                            kill_tree(self.pid, libc::SIGKILL);
                            input_open = false;
                        }
                        None => {
                            // The client half-closed: that ends its input.
                            input_open = false;
                            if stdin.take().is_some() {
                                let _ = cd.close_stdin(&sandbox, &exec_id).await;
                            }
                        }
                    },
                }
            };
            drop(stdin);
            let status = match wait_result {
                Ok(Ok(Some(exit))) => exit.status,
                Ok(Ok(None)) => {
                    tracing::warn!("the exec process was gone before its exit was seen");
                    255
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "waiting for the exec failed");
                    255
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the wait task failed");
                    255
                }
            };
            let delete = async {
                if let Err(e) = cd.delete_process(&sandbox, &exec_id).await {
                    tracing::warn!(error = %e, "deleting the exec process failed");
                }
            };
            tokio::pin!(delete);
            // Every byte before the exit. The shim closes its ends of the FIFOs when the process's
            // pipes reach EOF, usually by the time Wait returns: then `exited` goes out at once
            // and the process is deleted after it. When a child still holds the pipes, deleting
            // the process is what closes them; the drain is then bounded by the grace period.
            // Relayed pipes reach EOF only at the delete (the shim holds their write ends), but
            // a dead process has written all it will: unless something left in the sandbox holds
            // them, what is in the pipes now is everything, and `exited` need not wait.
            let pumps: Vec<_> = std::iter::once(out_pump).chain(err_pump).collect();
            let aborts: Vec<_> = pumps.iter().map(|p| p.abort_handle()).collect();
            let drain = futures::future::join_all(pumps);
            tokio::pin!(drain);
            let deleted = if self.io.eof_after_delete {
                let (manager, inodes) = (self.manager.clone(), std::mem::take(&mut self.io.pipe_inodes));
                let id = sandbox.clone();
                let held = sys::blocking(move || Ok(manager.sandbox_holds_pipes(&id, &inodes))).await.unwrap_or(true);
                if held {
                    (&mut delete).await;
                    true
                } else {
                    let _ = finish_tx.send(true);
                    (&mut drain).await;
                    false
                }
            } else {
                tokio::select! {
                    _ = &mut drain => false,
                    () = &mut delete => true,
                }
            };
            if deleted && tokio::time::timeout(EXEC_OUTPUT_GRACE, &mut drain).await.is_err() {
                tracing::info!("output still open {EXEC_OUTPUT_GRACE:?} after exit (a child holds it); closing");
                aborts.iter().for_each(|a| a.abort());
            }
            let signal = if status > 128 && status <= 128 + 64 { status as i32 - 128 } else { 0 };
            let oom_killed = signal == libc::SIGKILL && !timed_out && self.manager.oom_kills(&self.spec.sandbox_id) > self.oom_before;
            let info = ExitInfo { exit_code: status as i32, signal, timed_out, oom_killed };
            let _ = output.send(ExecEvent::Exited(info)).await;
            if !deleted {
                delete.await;
            }
            drop((self.io._dir, self.io._relay));
        }
        .instrument(span)
        .await
    }
}

/// Copies one pipe into the output channel until EOF, or until it is empty once `finish` is
/// set; stops reading while the channel is full.
///
/// Output after a quiet spell goes out at once. During a burst (the previous chunk left less
/// than [`EXEC_COALESCE`] ago) reads gather into one chunk until it is full or its first byte is
/// that old: a program writing 4 KiB at a time would otherwise cost one message per write.
async fn pump(
    mut rx: pipe::Receiver,
    output: mpsc::Sender<ExecEvent>,
    wrap: fn(Bytes) -> ExecEvent,
    first_byte: Arc<std::sync::Once>,
    requested_at: std::time::Instant,
    mut finish: tokio::sync::watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
) {
    let mut buf = bytes::BytesMut::new();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        buf.reserve(EXEC_CHUNK);
        let mut eof = !read_more(&mut rx, &mut buf, &mut finish).await;
        if !eof && last_sent.is_some_and(|t| t.elapsed() < EXEC_COALESCE) {
            let until = tokio::time::Instant::now() + EXEC_COALESCE;
            while buf.len() < EXEC_CHUNK {
                match tokio::time::timeout_at(until, read_more(&mut rx, &mut buf, &mut finish))
                    .await
                {
                    Err(_) => break,
                    Ok(false) => {
                        eof = true;
                        break;
                    }
                    Ok(true) => {}
                }
            }
        }
        if !buf.is_empty() {
            first_byte.call_once(|| observer.exec_first_output(requested_at.elapsed()));
            observer.exec_output(buf.len());
            if output.send(wrap(buf.split().freeze())).await.is_err() {
                return;
            }
            last_sent = Some(tokio::time::Instant::now());
        }
        if eof {
            return;
        }
    }
}

/// Reads into `buf` (straight into the buffer the message will carry: no copy on our side), up
/// to [`EXEC_CHUNK`] in all. False at the end: EOF, an error, or an empty pipe once `finish` is
/// set. A full buffer returns at once.
async fn read_more(
    rx: &mut pipe::Receiver,
    buf: &mut bytes::BytesMut,
    finish: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let room = EXEC_CHUNK.saturating_sub(buf.len());
    if room == 0 {
        return true;
    }
    if *finish.borrow() {
        return matches!(read_now(rx, buf, room), Ok(n) if n > 0);
    }
    let mut limited = (&mut *buf).limit(room);
    tokio::select! {
        read = rx.read_buf(&mut limited) => matches!(read, Ok(n) if n > 0),
        // Re-checked above on the next call: the pipe is then drained without waiting.
        _ = finish.wait_for(|f| *f) => true,
    }
}

/// One read(2) of what the pipe holds now, into `buf`'s spare room. Not tokio's `try_read`:
/// that trusts the reactor's last readiness event and can answer "would block" for a pipe whose
/// data arrived after it, which here would drop a dead process's last output.
fn read_now(rx: &pipe::Receiver, buf: &mut bytes::BytesMut, room: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    let len = room.min(spare.len());
    // SAFETY: read(2) writes at most `len` bytes into `spare`, memory `buf` owns and nothing
    // else borrows; the pipe's fd stays open for the call (`rx` is borrowed).
    let got = unsafe { libc::read(rx.as_raw_fd(), spare.as_mut_ptr().cast(), len) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: read(2) initialised exactly `got` bytes after the current length.
    unsafe { buf.set_len(buf.len() + got as usize) };
    Ok(got as usize)
}

/// Sends `signal` to `pid` and every descendant (host pids), children first seen first killed.
pub fn kill_tree(pid: u32, signal: i32) {
    let mut pids = vec![pid as i32];
    let mut i = 0;
    let all = sys::process_parents();
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    for p in pids {
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
        unsafe {
            libc::kill(p, signal);
        }
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
        let keep = |buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8]| {
            let room = max_output.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..room.min(data.len())]);
            *truncated |= data.len() > room;
        };
        while let Some(ev) = out_rx.recv().await {
            match ev {
                ExecEvent::Stdout(d) => keep(&mut result.stdout, &mut result.stdout_truncated, &d),
                ExecEvent::Stderr(d) => keep(&mut result.stderr, &mut result.stderr_truncated, &d),
                ExecEvent::Exited(info) => {
                    result.exit = info;
                    break;
                }
            }
        }
        drop(in_tx);
        let _ = runner.await;
        Ok(result)
    }
}
