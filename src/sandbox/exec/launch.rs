//! Making an exec process: its FIFOs or its registration with the output relay, the exec and
//! start calls, and what is learnt about it on the way (its pid, its pipes, OOM kills so far).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::unix::pipe;

use crate::error::{Error, Result};
use crate::runtime::{ExecIo as ProcessIo, NewExec};
use crate::sandbox::manager::Manager;
use crate::sandbox::model::SandboxId;
use crate::sandbox::relay::{enlarge_pipe, ExecRelay, Pending, RelayedIo, RELAY_HANDOFF_TIMEOUT};

use super::session::kill_tree;
use super::{exec_error, ExecSpec, WaitHandle};

/// An exec's stdio on our side, and what keeps it alive.
pub(super) struct ExecIo {
    pub(super) stdin: Option<pipe::Sender>,
    pub(super) stdout: pipe::Receiver,
    pub(super) stderr: Option<pipe::Receiver>,
    /// The FIFO files, removed when the session ends.
    pub(super) _dir: Option<FifoDir>,
    /// The relay helper's connection: it stays until this closes.
    pub(super) _relay: Option<std::os::unix::net::UnixStream>,
    /// Output reaches EOF only once the exec is deleted (the shim holds the pipes' write ends).
    pub(super) eof_after_delete: bool,
    /// Inodes of the relayed pipes, to tell whether anything in the sandbox still holds them.
    pub(super) pipe_inodes: Vec<u64>,
}

/// A created and started exec process.
pub(super) struct Launched {
    pub(super) exec_id: String,
    pub(super) pid: u32,
    pub(super) io: ExecIo,
    pub(super) oom_before: u64,
    pub(super) wait: WaitHandle,
}

/// Why a launch failed: the relay's I/O could not be set up (nothing ran; FIFOs will do), or
/// anything else.
pub(super) enum LaunchError {
    RelayIo(String),
    Failed(Error),
}

impl From<Error> for LaunchError {
    fn from(e: Error) -> Self {
        LaunchError::Failed(e)
    }
}

/// How a launch's output leaves the shim: FIFOs, or the relay with the exec's registration.
pub(super) enum Plumbing<'a> {
    Fifos(Fifos),
    Relay(&'a Arc<ExecRelay>, Pending),
}

/// An exec's opened FIFOs, with writers held open until the shim has opened its own.
pub(super) struct Fifos {
    pub(super) dir: FifoDir,
    pub(super) stdin: Option<pipe::Sender>,
    pub(super) stdout: pipe::Receiver,
    pub(super) stderr: Option<pipe::Receiver>,
    pub(super) holds: Vec<pipe::Sender>,
}

impl Fifos {
    /// The stdin, stdout and stderr paths for containerd ("" for a stream not used).
    pub(super) fn uris(&self, spec: &ExecSpec) -> (String, String, String) {
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

    pub(super) fn into_io(self) -> ExecIo {
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
pub(super) fn relayed_io(r: RelayedIo) -> std::io::Result<ExecIo> {
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
pub(super) struct FifoDir(PathBuf);

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
    /// Creates and starts the exec process with its stdio on FIFOs, or on the relay if given.
    pub(super) async fn launch(
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
    pub(super) fn fifos(&self, spec: &ExecSpec, id: &SandboxId, exec_id: &str) -> Result<Fifos> {
        let dir = FifoDir(
            self.exec_dir()
                .join(format!("{}-{exec_id}", self.host_key(id.as_str()))),
        );
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

    pub(super) async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        self.cd.resize_pty(id, exec_id, rows, cols).await
    }

    /// Whether a process of sandbox `id` holds one of the pipes `inodes` (true when unknown).
    pub(super) fn sandbox_holds_pipes(&self, id: &str, inodes: &[u64]) -> bool {
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
}
