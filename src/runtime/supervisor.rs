//! The embedded containerd: when nothing answers at the configured socket and `containerd` is
//! installed, sandboxd runs a private one under its data dir, restarts it when it dies and stops it
//! on shutdown. Sandboxes (their shims) outlive both restarts.
//!
//! A sandboxd killed with SIGKILL cannot stop its containerd, which keeps running. So the next
//! run looks for it (`containerd.pid`, else /proc) before starting one: it reuses it if it
//! answers and replaces it if not, since two containerds on one root fight over its database.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::{Containerd, Store};
use crate::config::{Config, EmbeddedContainerd};
use crate::error::{Error, Result};

mod process;

use process::{Ident, PidFile, Process};

/// How long a started containerd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the configured socket is probed before falling back to a private containerd.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a private containerd left by an earlier run may take to answer before it is taken
/// for hung and replaced. Generous: that run may have been killed while its containerd started.
const REUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before restarting a private containerd that died.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// How long containerd gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running private containerd; [`Supervisor::shutdown`] stops it.
#[derive(Debug)]
pub struct Supervisor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Where a private containerd keeps everything: `<data_dir>/containerd/`.
#[derive(Debug, Clone)]
struct Private {
    dir: PathBuf,
    config: PathBuf,
    address: PathBuf,
    pid_file: PidFile,
}

impl Private {
    /// Creates the directory. Its path is canonical, so that the config path on a containerd's
    /// command line identifies it whatever spelling of the data dir a later run is given.
    fn new(data_dir: &Path) -> Result<Private> {
        let dir = data_dir.join("containerd");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
        Ok(Private {
            config: dir.join("config.toml"),
            address: dir.join("containerd.sock"),
            pid_file: PidFile::new(&dir),
            dir,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// Points the pid file at child `pid`. A failure is only logged: a later run still finds
    /// the process through /proc.
    fn record(&self, pid: Option<u32>) {
        let Some(ident) = pid.and_then(|pid| Ident::of(pid as i32)) else {
            return;
        };
        if let Err(e) = self.pid_file.write(ident) {
            tracing::warn!(error = %e, "cannot record the private containerd's pid");
        }
    }

    /// Removes the pid file once its process is gone.
    fn forget(&self) {
        if let Err(e) = self.pid_file.remove() {
            tracing::warn!(error = %e, "cannot remove the private containerd's pid file");
        }
    }
}

/// The private containerd under supervision: our child, or one an earlier run left behind.
#[derive(Debug)]
enum Running {
    Child(Child),
    Adopted(Process),
}

impl Running {
    /// Resolves when the process exits, describing how.
    async fn exited(&mut self) -> String {
        match self {
            Running::Child(child) => match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            },
            Running::Adopted(process) => {
                process.exited().await;
                format!("pid {} is gone", process.ident().pid)
            }
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after a grace period); true once it is gone.
    async fn stop(self) -> bool {
        match self {
            Running::Child(mut child) => {
                terminate(&mut child).await;
                true
            }
            Running::Adopted(process) => match process.stop(STOP_GRACE).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "stopping the private containerd failed");
                    false
                }
            },
        }
    }
}

/// Decides which containerd to use: the configured one if it answers, else (when allowed and
/// installed) a private one. Returns the socket and the supervisor of a private containerd.
pub async fn ensure(config: &Config) -> Result<(PathBuf, Option<Supervisor>)> {
    let configured = config.containerd_address.clone();
    let probe = Containerd::new(&configured, &config.namespace)?;
    if let Ok(Ok(version)) = tokio::time::timeout(PROBE_TIMEOUT, probe.version()).await {
        tracing::info!(address = %configured.display(), %version, "using containerd");
        return Ok((configured, None));
    }
    if config.embedded_containerd == EmbeddedContainerd::Never {
        tracing::warn!(address = %configured.display(), "containerd does not answer; waiting for it (embedded containerd is off)");
        return Ok((configured, None));
    }
    let Some(binary) = find_in_path("containerd") else {
        tracing::warn!(address = %configured.display(), "containerd does not answer and is not installed; waiting for it");
        return Ok((configured, None));
    };
    let private = Private::new(&config.data_dir)?;
    let running = match take_over_leftover(&private, &config.namespace).await? {
        Some(process) => Running::Adopted(process),
        None => {
            write_config(&private)?;
            let mut child = spawn(&binary, &private)?;
            // Recorded before it answers: a run killed while it starts leaves it findable.
            private.record(child.id());
            if let Err(e) = wait_ready(&private, &config.namespace, &mut child).await {
                private.forget();
                return Err(e);
            }
            tracing::info!(address = %private.address.display(), pid = child.id(), "started a private containerd");
            Running::Child(child)
        }
    };
    let (stop, stop_rx) = watch::channel(false);
    let address = private.address.clone();
    let task = tokio::spawn(supervise(binary, private, running, stop_rx));
    Ok((address, Some(Supervisor { stop, task })))
}

/// Deals with private containerds that an earlier run (killed before it could stop them) left
/// on our root, so that the root never has two: a single one that answers is returned for
/// reuse; any other is stopped.
async fn take_over_leftover(private: &Private, namespace: &str) -> Result<Option<Process>> {
    let (pid_file, config) = (private.pid_file.clone(), private.config.clone());
    let found = crate::sys::blocking(move || Ok(process::find(&pid_file, &config))).await?;
    let mut leftovers = Vec::with_capacity(found.len());
    for ident in found {
        leftovers.extend(Process::open(ident)?);
    }
    if leftovers.len() == 1 {
        let process = leftovers.remove(0);
        let pid = process.ident().pid;
        if answers(&private.address, namespace, &process).await? {
            tracing::info!(pid, address = %private.address.display(), "reusing the private containerd left by an earlier run, pid {pid}");
            // Found through /proc, the pid file was lost or stale: make it name this one.
            if let Err(e) = private.pid_file.write(process.ident()) {
                tracing::warn!(error = %e, "cannot record the private containerd's pid");
            }
            return Ok(Some(process));
        }
        tracing::warn!(pid, "the private containerd left by an earlier run does not answer within {REUSE_TIMEOUT:?}; replacing it");
        leftovers.push(process);
    } else if leftovers.len() > 1 {
        let pids: Vec<i32> = leftovers.iter().map(|p| p.ident().pid).collect();
        tracing::warn!(
            ?pids,
            "several private containerds run on one root; stopping them all"
        );
    }
    futures::future::try_join_all(leftovers.iter().map(|p| p.stop(STOP_GRACE))).await?;
    Ok(None)
}

/// Whether `process`, serving `address`, answers Version within [`REUSE_TIMEOUT`].
async fn answers(address: &Path, namespace: &str, process: &Process) -> Result<bool> {
    let client = Containerd::new(address, namespace)?;
    let probe = async {
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, client.version()).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    Ok(tokio::select! {
        answered = tokio::time::timeout(REUSE_TIMEOUT, probe) => answered.is_ok(),
        () = process.exited() => false,
    })
}

impl Supervisor {
    /// Stops the private containerd (SIGTERM, then SIGKILL after a grace period), whether this
    /// run started it or reused it, and removes its pid file once it is gone.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Writes the private containerd's config.
fn write_config(private: &Private) -> Result<()> {
    let dir = &private.dir;
    let config = format!(
        "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
         [grpc]\n  address = {grpc:?}\n\n[ttrpc]\n  address = {ttrpc:?}\n\n[debug]\n  address = {debug:?}\n",
        root = dir.join("root").display().to_string(),
        state = dir.join("state").display().to_string(),
        grpc = private.address.display().to_string(),
        ttrpc = dir.join("containerd.sock.ttrpc").display().to_string(),
        debug = dir.join("debug.sock").display().to_string(),
    );
    std::fs::write(&private.config, config)
        .map_err(|e| Error::io(format!("writing {}", private.config.display()), e))
}

fn spawn(binary: &Path, private: &Private) -> Result<Child> {
    let log_path = private.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io("duplicating the log handle", e))?;
    let mut path = std::env::var("PATH").unwrap_or_default();
    // The shim runs runc from containerd's PATH.
    for extra in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        if !path.split(':').any(|p| p == extra) {
            path = format!("{path}:{extra}");
        }
    }
    // `--config <path>` is how a later run recognises this process (see `process`).
    Command::new(binary)
        .arg("--config")
        .arg(&private.config)
        .env("PATH", path.trim_start_matches(':'))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(format!("starting {}", binary.display()), e))
}

async fn wait_ready(private: &Private, namespace: &str, child: &mut Child) -> Result<()> {
    let client = Containerd::new(&private.address, namespace)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, client.version()).await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Internal(format!(
                "the private containerd exited with {status}; see {}",
                private.log_path().display()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "the private containerd did not answer within {START_TIMEOUT:?}; see {}",
                private.log_path().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restarts the private containerd whenever it dies (as a child of ours, whatever it was
/// before), keeping the pid file on the live one; stops it when `stop` fires.
async fn supervise(
    binary: PathBuf,
    private: Private,
    mut running: Running,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            how = running.exited() => {
                tracing::error!(status = %how, "the private containerd exited; restarting it");
                tokio::time::sleep(RESTART_BACKOFF).await;
                if *stop.borrow() {
                    private.forget();
                    return;
                }
                match spawn(&binary, &private) {
                    Ok(child) => {
                        private.record(child.id());
                        tracing::info!(pid = child.id(), "restarted the private containerd");
                        running = Running::Child(child);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "restarting the private containerd failed");
                        tokio::select! {
                            _ = tokio::time::sleep(RESTART_BACKOFF) => continue,
                            _ = stop.changed() => {
                                private.forget();
                                return;
                            }
                        }
                    }
                }
            }
            _ = stop.changed() => {
                // One that outlived SIGKILL keeps its pid file, for the next run to find.
                if running.stop().await {
                    private.forget();
                }
                return;
            }
        }
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            tracing::info!("the private containerd stopped");
            return;
        }
    }
    let _ = child.kill().await;
}
