//! The sandboxd binary under test, run as a child process against a test's containerd.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::host;
use super::registry::free_port;

/// How long sandboxd gets to report SERVING after it is started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a fresh port when another process grabbed ours first.
const PORT_ATTEMPTS: usize = 5;
/// Environment variable: a sandboxd binary to run instead of this build's (benches comparing
/// two builds set it).
pub const BINARY_ENV: &str = "SANDBOXD_TEST_BINARY";
/// How much of sandboxd's log a failure message shows.
const LOG_TAIL_BYTES: usize = 64 * 1024;

/// What a [`Sandboxd`] is started with; `--listen` and `--data-dir` are the fixture's own.
#[derive(Debug, Clone)]
pub struct SandboxdOptions {
    /// containerd socket (`--containerd-address`).
    pub containerd_address: PathBuf,
    /// containerd namespace (`--namespace`).
    pub namespace: String,
    /// Parent cgroup of every sandbox (`--cgroup-parent`), unique per test.
    pub cgroup_parent: String,
    /// Further arguments appended after the fixture's own.
    pub extra_args: Vec<String>,
    /// Environment variables set for sandboxd (e.g. OTEL_EXPORTER_OTLP_ENDPOINT).
    pub extra_env: Vec<(String, String)>,
    /// When sandboxd serves TLS (`--tls-cert` among the extra arguments): the CA its
    /// certificate chains to, with which the harness checks health over `https://`.
    pub tls: Option<::sandboxd::tls::ClientFiles>,
}

/// A running `sandboxd serve` with a private data dir and a free loopback port, its output
/// captured to `<data dir>/../sandboxd.log`. Drop stops it (SIGTERM, then SIGKILL after 10 s),
/// unmounts whatever it left under its directory and removes that; the log is printed when the
/// test is panicking.
pub struct Sandboxd {
    options: Mutex<SandboxdOptions>,
    dir: Option<TempDir>,
    root: PathBuf,
    addr: SocketAddr,
    child: Mutex<Option<Child>>,
}

impl Sandboxd {
    /// Starts sandboxd and waits until gRPC health `Check("")` reports SERVING.
    ///
    /// Panics with sandboxd's log if it exits or is not serving within 20 s.
    pub async fn start(options: SandboxdOptions) -> Sandboxd {
        host::require_prerequisites();
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-svc-")
            .tempdir()
            .expect("create sandboxd temp dir");
        let root = std::fs::canonicalize(dir.path()).expect("canonicalize sandboxd temp dir");
        std::fs::create_dir(root.join("data")).expect("create sandboxd data dir");
        let mut sandboxd = Sandboxd {
            options: Mutex::new(options),
            dir: Some(dir),
            root,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Mutex::new(None),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            sandboxd.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log_start = sandboxd.spawn();
            match sandboxd.wait_serving().await {
                Ok(()) => return sandboxd,
                Err(e) if e.port_taken(&sandboxd, log_start) && attempt < PORT_ATTEMPTS => {}
                Err(e) => panic!("{}", e.message(&sandboxd)),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `http://127.0.0.1:PORT`, for tonic clients (`https://` when it serves TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.options().tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A channel to sandboxd that presents `credentials` (a token, TLS files), built the way
    /// the CLI builds its own; it connects on first use.
    pub fn transport(
        &self,
        credentials: &::sandboxd::cli::Credentials,
    ) -> ::sandboxd::cli::Transport {
        self.endpoint()
            .parse::<::sandboxd::cli::Server>()
            .and_then(|server| server.channel(credentials))
            .unwrap_or_else(|e| panic!("a channel to {}: {e}", self.endpoint()))
    }

    /// The address sandboxd listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connected gRPC channel to sandboxd.
    ///
    /// Its connection is driven by the harness's own runtime, not the test's, so it answers
    /// sandboxd's graceful-shutdown GOAWAY/PING (and closes once dropped) even while the test's
    /// runtime is blocked in a fixture's Drop. Prefer it over `XClient::connect(endpoint)`: on a
    /// current-thread test runtime such a client keeps `stop()` waiting its full 10 s.
    pub async fn channel(&self) -> Channel {
        let endpoint = self.endpoint();
        let connected = harness_runtime()
            .spawn(async move {
                Endpoint::from_shared(endpoint)
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .expect("connect task panicked");
        connected.unwrap_or_else(|e| {
            panic!(
                "connect to sandboxd at {}: {e}\n{}",
                self.addr,
                self.log_tail()
            )
        })
    }

    /// sandboxd's `--data-dir` (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The options it was (last) started with.
    pub fn options(&self) -> SandboxdOptions {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Like [`Sandboxd::restart`], with `extra_args` in place of the previous extra arguments.
    pub async fn restart_with_args(&self, extra_args: &[String]) {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extra_args = extra_args.to_vec();
        self.restart().await;
    }

    /// sandboxd's combined stdout/stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("sandboxd.log")
    }

    /// The end of sandboxd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        host::log_tail(&self.log_path(), LOG_TAIL_BYTES)
    }

    /// sandboxd's pid. Panics if it is stopped.
    pub fn pid(&self) -> u32 {
        self.lock_child()
            .as_ref()
            .map(Child::id)
            .expect("sandboxd is not running (stopped or killed)")
    }

    /// Whether the process is still running (it may have crashed).
    pub fn is_running(&self) -> bool {
        matches!(
            self.lock_child().as_mut().map(Child::try_wait),
            Some(Ok(None))
        )
    }

    /// SIGTERM, wait up to 10 s for exit, then SIGKILL. Returns the exit status, or None if it
    /// was not running.
    ///
    /// Blocks the calling thread: gRPC clients whose connections run on the same current-thread
    /// runtime cannot finish sandboxd's graceful shutdown meanwhile. Use [`Sandboxd::channel`]
    /// (never affected) or, from async code, [`Sandboxd::shutdown`].
    pub fn stop(&self) -> Option<ExitStatus> {
        let mut child = self.lock_child().take()?;
        host::send_signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(host::POLL_INTERVAL),
                _ => return Some(force_kill(child)),
            }
        }
    }

    /// Like [`Sandboxd::stop`], but waits asynchronously, so the test's own runtime keeps
    /// serving its clients while sandboxd shuts down gracefully.
    pub async fn shutdown(&self) -> Option<ExitStatus> {
        let pid = self.lock_child().as_ref().map(Child::id)?;
        host::send_signal(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            {
                let mut guard = self.lock_child();
                let child = guard.as_mut()?;
                match child.try_wait() {
                    Ok(Some(status)) => {
                        guard.take();
                        return Some(status);
                    }
                    Ok(None) if Instant::now() < deadline => {}
                    _ => return guard.take().map(force_kill),
                }
            }
            tokio::time::sleep(host::POLL_INTERVAL).await;
        }
    }

    /// SIGKILLs sandboxd (a crash: no shutdown code runs) and reaps it.
    pub fn kill(&self) -> Option<ExitStatus> {
        let mut child = self.lock_child().take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Stops sandboxd if it runs, then starts it with the same arguments, port and data dir and
    /// waits for SERVING.
    pub async fn restart(&self) {
        self.shutdown().await;
        // The port is ours to reuse; a socket of the old process may linger briefly.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let log_start = self.spawn();
            match self.wait_serving().await {
                Ok(()) => return,
                Err(e) if e.port_taken(self, log_start) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("restart: {}", e.message(self)),
            }
        }
    }

    /// The command line after the binary, as the fixture passes it.
    pub fn args(&self) -> Vec<String> {
        let o = self.options();
        // runc's state belongs with the containerd whose shims run it, in that test's temp dir.
        let runc_root = o
            .containerd_address
            .parent()
            .expect("the containerd socket is in a directory")
            .join("runc");
        // `--listen IP:0` among the extra arguments: listen on IP (e.g. every address,
        // 0.0.0.0) with the fixture's port, which its health checks reach on loopback.
        let mut extra = o.extra_args.clone();
        let mut listen = self.addr.to_string();
        if let Some(i) = extra.iter().position(|a| a == "--listen") {
            let ip = extra[i + 1]
                .strip_suffix(":0")
                .expect("an extra --listen is IP:0 (the fixture picks the port)")
                .to_string();
            listen = format!("{ip}:{}", self.addr.port());
            extra.drain(i..=i + 1);
        }
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &listen,
            "--containerd-address",
            &o.containerd_address.to_string_lossy(),
            "--data-dir",
            &self.data_dir().to_string_lossy(),
            "--namespace",
            &o.namespace,
            "--cgroup-parent",
            &o.cgroup_parent,
            "--embedded-containerd",
            "never",
            "--runc-root",
            &runc_root.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra);
        args
    }

    /// Spawns the process; returns the log length before it, to find this run's output.
    fn spawn(&self) -> u64 {
        let mut log = self.open_log();
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            log,
            "=== test harness: sandboxd {} ===",
            self.args().join(" ")
        );
        // A bench comparing builds names the other build's binary here.
        let binary = std::env::var_os(BINARY_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sandboxd")));
        let mut command = Command::new(binary);
        command
            .args(self.args())
            .env("PATH", host::DAEMON_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone sandboxd log handle"))
            .stderr(log);
        // The test's own environment must not configure the service under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SANDBOXD_") {
                command.env_remove(key);
            }
        }
        for (key, value) in self.options().extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn sandboxd");
        *self.lock_child() = Some(child);
        log_start
    }

    async fn wait_serving(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let exited = self
                .lock_child()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.lock_child().take();
                return Err(StartError::Exited(status));
            }
            let last = match self.health().await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(other) => format!("health status {other:?}"),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(StartError::Timeout(last));
            }
            tokio::time::sleep(host::POLL_INTERVAL).await;
        }
    }

    /// One gRPC health `Check("")` (the whole server), on a connection closed on return.
    pub async fn health(&self) -> Result<ServingStatus, String> {
        let endpoint = self.endpoint();
        if let Some(tls) = self.options().tls {
            // Health needs no credentials, only trust in the server's certificate.
            let credentials = ::sandboxd::cli::Credentials { token: None, tls };
            let attempt = async move {
                let transport = endpoint
                    .parse::<::sandboxd::cli::Server>()
                    .and_then(|s| s.channel(&credentials))?;
                let response = HealthClient::new(transport)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|s| format!("health check: {s}"))?;
                Ok(response.into_inner().status())
            };
            return harness_runtime()
                .spawn(tokio::time::timeout(Duration::from_secs(2), attempt))
                .await
                .expect("health check task panicked")
                .unwrap_or_else(|_| Err("health check timed out".to_owned()));
        }
        let attempt = async move {
            let channel = Endpoint::from_shared(endpoint)
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| format!("health check: {s}"))?;
            Ok(response.into_inner().status())
        };
        // On the harness runtime, which keeps running, so the connection really gets closed.
        harness_runtime()
            .spawn(tokio::time::timeout(Duration::from_secs(2), attempt))
            .await
            .expect("health check task panicked")
            .unwrap_or_else(|_| Err("health check timed out".to_owned()))
    }

    fn open_log(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open sandboxd log")
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock must not stop Drop from cleaning up.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Sandboxd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- sandboxd log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail()
            );
        }
        if let Some(dir) = self.dir.take() {
            host::remove_fixture_dir(dir);
        }
    }
}

/// Why sandboxd did not become SERVING.
enum StartError {
    Exited(ExitStatus),
    Timeout(String),
}

impl StartError {
    /// Whether the run that started at `log_start` died because the port was taken.
    fn port_taken(&self, sandboxd: &Sandboxd, log_start: u64) -> bool {
        let StartError::Exited(_) = self else {
            return false;
        };
        let log = std::fs::read(sandboxd.log_path()).unwrap_or_default();
        let this_run = log.get(log_start as usize..).unwrap_or_default();
        String::from_utf8_lossy(this_run)
            .to_lowercase()
            .contains("address already in use")
    }

    fn message(&self, sandboxd: &Sandboxd) -> String {
        let what = match self {
            StartError::Exited(status) => format!("sandboxd exited during startup ({status})"),
            StartError::Timeout(last) => {
                format!("sandboxd not SERVING within {STARTUP_TIMEOUT:?} (last: {last})")
            }
        };
        format!(
            "{what}; command: {} {}\nlog:\n{}",
            env!("CARGO_BIN_EXE_sandboxd"),
            sandboxd.args().join(" "),
            sandboxd.log_tail()
        )
    }
}

/// SIGKILLs and reaps a sandboxd that did not stop on SIGTERM.
fn force_kill(mut child: Child) -> ExitStatus {
    eprintln!("test harness: sandboxd ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL");
    let _ = child.kill();
    child.wait().expect("reap sandboxd")
}

/// The harness's own runtime for client connections to sandboxd: it keeps polling them while a
/// test's runtime is blocked (in a Drop, say), so sandboxd's graceful shutdown never waits on us.
fn harness_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-harness-io")
            .enable_all()
            .build()
            .expect("build the harness runtime")
    })
}

/// Path of the sandboxd binary under test.
pub fn sandboxd_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sandboxd"))
}
