//! The embedded containerd: when nothing answers at the configured socket and `containerd` is
//! installed, sandboxd runs a private one under its data dir, restarts it when it dies and stops it
//! on shutdown. Sandboxes (their shims) outlive both restarts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::{Containerd, Store};
use crate::config::{Config, EmbeddedContainerd};
use crate::error::{Error, Result};

/// How long a started containerd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the configured socket is probed before falling back to a private containerd.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
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
    let dir = config.data_dir.join("containerd");
    let address = write_config(&dir)?;
    let mut child = spawn(&binary, &dir)?;
    wait_ready(&address, &config.namespace, &mut child, &dir).await?;
    tracing::info!(address = %address.display(), "started a private containerd");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(supervise(binary, dir, child, stop_rx));
    Ok((address, Some(Supervisor { stop, task })))
}

impl Supervisor {
    /// Stops the private containerd (SIGTERM, then SIGKILL after a grace period).
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

/// Writes the private containerd's config; returns its gRPC socket.
fn write_config(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let address = dir.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
         [grpc]\n  address = {grpc:?}\n\n[ttrpc]\n  address = {ttrpc:?}\n\n[debug]\n  address = {debug:?}\n",
        root = dir.join("root").display().to_string(),
        state = dir.join("state").display().to_string(),
        grpc = address.display().to_string(),
        ttrpc = dir.join("containerd.sock.ttrpc").display().to_string(),
        debug = dir.join("debug.sock").display().to_string(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(address)
}

fn spawn(binary: &Path, dir: &Path) -> Result<Child> {
    let log_path = dir.join("containerd.log");
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
    Command::new(binary)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path.trim_start_matches(':'))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(format!("starting {}", binary.display()), e))
}

async fn wait_ready(address: &Path, namespace: &str, child: &mut Child, dir: &Path) -> Result<()> {
    let client = Containerd::new(address, namespace)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, client.version()).await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Internal(format!(
                "the private containerd exited with {status}; see {}",
                dir.join("containerd.log").display()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "the private containerd did not answer within {START_TIMEOUT:?}; see {}",
                dir.join("containerd.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn supervise(
    binary: PathBuf,
    dir: PathBuf,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            status = child.wait() => {
                tracing::error!(status = ?status.ok(), "the private containerd exited; restarting it");
                tokio::time::sleep(RESTART_BACKOFF).await;
                if *stop.borrow() {
                    return;
                }
                match spawn(&binary, &dir) {
                    Ok(c) => child = c,
                    Err(e) => {
                        tracing::error!(error = %e, "restarting the private containerd failed");
                        tokio::select! {
                            _ = tokio::time::sleep(RESTART_BACKOFF) => continue,
                            _ = stop.changed() => return,
                        }
                    }
                }
            }
            _ = stop.changed() => {
                terminate(&mut child).await;
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
