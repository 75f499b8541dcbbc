//! The private containerd as a process we may not have started: a sandboxd killed with SIGKILL
//! leaves its containerd running, and the next run must find it rather than start a second one
//! on the same root. A pid file names it; its command line (naming our config) says it is ours,
//! and its start time tells it apart from an unrelated process that got the same pid later. A
//! pidfd watches and signals it without the parent-child bond `Child::wait` needs.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{Error, Result};

/// Interval between two looks at /proc for an exit, on kernels without pidfds (before 5.3).
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a process may take to vanish after SIGKILL before we give up on it.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// One process: its pid and the kernel's start time, which a reused pid does not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    /// Process id.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot when the process started.
    pub start_time: u64,
}

impl Ident {
    /// The live process that `pid` names now, if any (a zombie has exited).
    pub fn of(pid: i32) -> Option<Ident> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start_time = live_start_time(&stat)?;
        Some(Ident { pid, start_time })
    }

    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        Ident::of(self.pid) == Some(*self)
    }
}

/// The start time in a /proc/PID/stat line, unless the process is a zombie.
fn live_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" || state == "x" {
        return None;
    }
    // `state` was field 3; field 22 comes 19 fields later.
    fields.nth(18)?.parse().ok()
}

/// Whether a /proc/PID/cmdline (NUL-separated) is containerd started with `--config config`.
fn cmdline_runs_config(raw: &[u8], config: &Path) -> bool {
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let Some(argv0) = args.first() else {
        return false;
    };
    if Path::new(OsStr::from_bytes(argv0)).file_name() != Some(OsStr::new("containerd")) {
        return false;
    }
    let config = config.as_os_str().as_bytes();
    args.windows(2)
        .any(|w| (w[0] == b"--config" || w[0] == b"-c") && w[1] == config)
        || args
            .iter()
            .any(|a| a.strip_prefix(b"--config=".as_slice()) == Some(config))
}

/// The live process `pid` if it is a containerd running with `config`.
fn ours(pid: i32, config: &Path) -> Option<Ident> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !cmdline_runs_config(&raw, config) {
        return None;
    }
    Ident::of(pid)
}

/// `containerd.pid`: the private containerd's pid and start time, as `"<pid> <start time>\n"`.
#[derive(Debug, Clone)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// The pid file in the private containerd's directory `dir`.
    pub fn new(dir: &Path) -> PidFile {
        PidFile {
            path: dir.join("containerd.pid"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The process the file names; `None` when there is no file.
    pub fn read(&self) -> Result<Option<Ident>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", self.path.display()), e)),
        };
        let mut fields = text.split_whitespace();
        match (
            fields.next().and_then(|p| p.parse().ok()),
            fields.next().and_then(|t| t.parse().ok()),
            fields.next(),
        ) {
            (Some(pid), Some(start_time), None) if pid > 0 => Ok(Some(Ident { pid, start_time })),
            _ => Err(Error::Internal(format!(
                "{} does not hold a pid and a start time: {text:?}",
                self.path.display()
            ))),
        }
    }

    /// Records `ident`. Written aside and renamed over, so a reader never sees half of it.
    pub fn write(&self, ident: Ident) -> Result<()> {
        let temp = self.path.with_extension("pid.tmp");
        fs::write(&temp, format!("{} {}\n", ident.pid, ident.start_time))
            .map_err(|e| Error::io(format!("writing {}", temp.display()), e))?;
        fs::rename(&temp, &self.path).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", temp.display(), self.path.display()),
                e,
            )
        })
    }

    /// Removes the file; a missing one is fine.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", self.path.display()), e))
            }
            _ => Ok(()),
        }
    }
}

/// Every private containerd running with `config` (blocking: reads /proc): the one the pid file
/// names first, then any other (a lost pid file, an earlier doubled start). A pid file naming a
/// gone or unrelated process is only logged: that process is never touched.
pub fn find(pid_file: &PidFile, config: &Path) -> Vec<Ident> {
    let mut found = Vec::new();
    match pid_file.read() {
        Ok(None) => {}
        Ok(Some(recorded)) => match ours(recorded.pid, config) {
            Some(ident) if ident == recorded => found.push(ident),
            // Expected after a reboot, when the pid may name anything: informative only.
            _ => tracing::info!(
                pid = recorded.pid,
                pid_file = %pid_file.path().display(),
                "ignoring a stale pid file: the process it names is gone or is not our private containerd"
            ),
        },
        Err(e) => tracing::warn!(error = %e, "ignoring an unreadable pid file"),
    }
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        if pid == me || found.iter().any(|f| f.pid == pid) {
            continue;
        }
        if let Some(ident) = ours(pid, config) {
            found.push(ident);
        }
    }
    found
}

/// A process that need not be our child, watched and signalled through a pidfd (so a pid
/// reused after its exit is never signalled), or through /proc where the kernel has no pidfds.
#[derive(Debug)]
pub struct Process {
    ident: Ident,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl Process {
    /// Takes hold of `ident`; `None` if it has exited meanwhile. Needs a tokio runtime.
    pub fn open(ident: Ident) -> Result<Option<Process>> {
        let pidfd = match pidfd_open(ident.pid) {
            // SAFETY: an OwnedFd is an open descriptor that stays open, and the same one,
            // until the AsyncFd drops it; nothing here reaches it mutably.
            Ok(fd) => Some(
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(
                    |e| {
                        Error::io(
                            format!("watching pid {}", ident.pid),
                            std::io::Error::from(e),
                        )
                    },
                )?,
            ),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(Error::io(format!("pidfd_open({})", ident.pid), e)),
        };
        // Checked once the pidfd exists: from then on it names this process even if the pid is
        // reused, so the check cannot go stale.
        if !ident.alive() {
            return Ok(None);
        }
        Ok(Some(Process { ident, pidfd }))
    }

    /// Its pid and start time.
    pub fn ident(&self) -> Ident {
        self.ident
    }

    /// Resolves once the process has exited.
    pub async fn exited(&self) {
        if let Some(pidfd) = &self.pidfd {
            // A pidfd becomes readable when its process exits, and only then.
            if pidfd.readable().await.is_ok() {
                return;
            }
        }
        while self.ident.alive() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Sends `signal`; a process that has exited already is not an error.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let result = match &self.pidfd {
            Some(pidfd) => {
                // SAFETY: pidfd_send_signal reads no memory of ours: a pidfd we own, a valid
                // signal number, a null siginfo (meaning "as kill() would") and no flags.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        signal as libc::c_int,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            // Without a pidfd the pid is checked just before: a narrow race, on old kernels only.
            None if self.ident.alive() => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.ident.pid), signal)
                    .map_err(std::io::Error::from)
            }
            None => return Ok(()),
        };
        match result {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(Error::io(
                format!("sending {signal} to pid {}", self.ident.pid),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Stops the process: SIGTERM (with SIGCONT, so a stopped process can act on it), SIGKILL
    /// after `grace`; fails if it still runs [`KILL_WAIT`] after that.
    pub async fn stop(&self, grace: Duration) -> Result<()> {
        let pid = self.ident.pid;
        self.signal(Signal::SIGTERM)?;
        self.signal(Signal::SIGCONT)?;
        if tokio::time::timeout(grace, self.exited()).await.is_ok() {
            tracing::info!(pid, "the private containerd stopped");
            return Ok(());
        }
        tracing::warn!(
            pid,
            "the private containerd ignored SIGTERM for {grace:?}; killing it"
        );
        self.signal(Signal::SIGKILL)?;
        tokio::time::timeout(KILL_WAIT, self.exited())
            .await
            .map_err(|_| {
                Error::Internal(format!(
                    "the private containerd (pid {pid}) still runs {KILL_WAIT:?} after SIGKILL"
                ))
            })
    }
}

/// `pidfd_open(2)`: a file descriptor that names process `pid` for good.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_when_the_name_holds_parentheses() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 \
                    1000 10 18446744073709551615";
        assert_eq!(live_start_time(stat), Some(987654));
        let zombie = stat.replace(")) S ", ")) Z ");
        assert_eq!(live_start_time(&zombie), None);
        assert_eq!(live_start_time("42 (trunc"), None);
    }

    #[test]
    fn only_containerd_with_our_config_is_ours() {
        let config = Path::new("/var/lib/sandboxd/containerd/config.toml");
        let ours = b"/usr/bin/containerd\0--config\0/var/lib/sandboxd/containerd/config.toml\0";
        assert!(cmdline_runs_config(ours, config));
        assert!(cmdline_runs_config(
            b"containerd\0--config=/var/lib/sandboxd/containerd/config.toml\0",
            config
        ));
        // Another root, another program naming our config, and no config at all.
        assert!(!cmdline_runs_config(
            b"/usr/bin/containerd\0--config\0/other/containerd/config.toml\0",
            config
        ));
        assert!(!cmdline_runs_config(
            b"/usr/bin/vi\0--config\0/var/lib/sandboxd/containerd/config.toml\0",
            config
        ));
        assert!(!cmdline_runs_config(b"/usr/bin/containerd\0", config));
        assert!(!cmdline_runs_config(b"", config));
    }

    #[test]
    fn pid_file_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = PidFile::new(dir.path());
        assert_eq!(file.read().expect("read a missing pid file"), None);
        let ident = Ident {
            pid: 1234,
            start_time: 56789,
        };
        file.write(ident).expect("write pid file");
        assert_eq!(file.read().expect("read pid file"), Some(ident));
        assert!(!dir.path().join("containerd.pid.tmp").exists());
        fs::write(file.path(), "1234\n").expect("write garbage");
        assert!(file.read().is_err());
        file.remove().expect("remove pid file");
        file.remove().expect("remove a missing pid file");
        assert!(!file.path().exists());
    }

    #[tokio::test]
    async fn a_process_that_is_not_our_child_is_watched_and_stopped() {
        // `sh` forks `sleep` and exits at once: the sleep is a grandchild, not our child.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
            .output()
            .expect("run sh");
        let pid: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid of sleep");
        let ident = Ident::of(pid).expect("sleep runs");
        let process = Process::open(ident)
            .expect("open the sleep")
            .expect("sleep still runs");
        process
            .stop(Duration::from_secs(10))
            .await
            .expect("stop the sleep");
        assert!(!ident.alive(), "sleep (pid {pid}) still runs");
        // A gone process: opening it finds nothing, signalling it is no error.
        assert!(Process::open(ident).expect("open a gone process").is_none());
        process
            .signal(Signal::SIGTERM)
            .expect("signal a gone process");
    }
}
