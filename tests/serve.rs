//! The `sandboxd` binary itself: starting a private containerd when none answers, graceful
//! SIGTERM, refusing bad configuration, and serving on a unix socket.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{host, CgroupParent, Clients, TestEnv};
use nix::sys::signal::Signal;
use sandboxd::pb::{self, SandboxState};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long sandboxd may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long sandboxd may take to report SERVING (starting a private containerd included).
const SERVING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command that must fail at once (bad configuration) may run.
const QUICK_EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long processes of a stopped sandboxd get to disappear.
const GONE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts with a fresh port when another process grabbed ours first.
const PORT_ATTEMPTS: usize = 5;
/// The log line sandboxd prints last on a clean shutdown.
const STOPPED_LINE: &str = "sandboxd stopped";
/// Services whose health sandboxd reports besides "".
const SERVICES: [&str; 4] = [
    "sandboxd.v1.SandboxService",
    "sandboxd.v1.SnapshotService",
    "sandboxd.v1.FileService",
    "sandboxd.v1.ImageService",
];

/// A `sandboxd` command with the daemon PATH and none of the test's own SANDBOXD_* variables.
fn sandboxd_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    command
        .env("PATH", host::DAEMON_PATH)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SANDBOXD_") {
            command.env_remove(key);
        }
    }
    command
}

/// Where a test's sandboxd listens.
#[derive(Debug, Clone)]
enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl Listen {
    /// The `--listen` value.
    fn flag(&self) -> String {
        match self {
            Listen::Tcp(addr) => addr.clone(),
            Listen::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// A fresh connected channel.
    async fn channel(&self) -> Result<Channel, String> {
        match self {
            Listen::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .map_err(|e| format!("connect to {addr}: {e}")),
            Listen::Unix(path) => common::host::unix_channel(path.clone()).await,
        }
    }
}

/// One gRPC health `Check(service)`.
async fn health(channel: Channel, service: &str) -> Result<ServingStatus, String> {
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(response)) => Ok(response.into_inner().status()),
        Ok(Err(status)) => Err(format!("health check {service:?}: {status}")),
        Err(_) => Err(format!("health check {service:?} timed out")),
    }
}

/// A sandboxd this file starts itself (the shared fixture always passes
/// `--embedded-containerd never` and a TCP port), in a temp dir of its own.
///
/// Drop SIGKILLs sandboxd and every process whose command line names the temp dir (a private
/// containerd, its shims, and with them the sandboxes' processes), unmounts whatever is below the
/// temp dir and removes it; then the cgroup parent removes its leftovers. It prints sandboxd's
/// log (and a private containerd's) when the test is panicking.
struct Daemon {
    root: PathBuf,
    dir: Option<TempDir>,
    child: Option<Child>,
    /// Length of the log before the current run, to find this run's lines.
    log_start: u64,
    /// Unique parent cgroup of the sandboxes (`--cgroup-parent`); dropped after the rest.
    cgroup: CgroupParent,
}

impl Daemon {
    fn new(prefix: &str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create sandboxd temp dir");
        let root = std::fs::canonicalize(dir.path()).expect("canonicalize temp dir");
        Daemon {
            root,
            dir: Some(dir),
            child: None,
            log_start: 0,
            cgroup: CgroupParent::new(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("sandboxd.log")
    }

    /// The whole log.
    fn log(&self) -> String {
        host::log_tail(&self.log_path(), 256 * 1024)
    }

    /// The log of the current (or last) run only.
    fn run_log(&self) -> String {
        let bytes = std::fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(self.log_start as usize..).unwrap_or_default())
            .into_owned()
    }

    /// `serve` arguments listening on `listen`, with this daemon's data dir and cgroup parent,
    /// containerd at `containerd`, `namespace` and runc's state in `runc_root`.
    fn serve_args(
        &self,
        listen: &Listen,
        containerd: &Path,
        namespace: &str,
        runc_root: &Path,
    ) -> Vec<String> {
        vec![
            "serve".into(),
            "--listen".into(),
            listen.flag(),
            "--containerd-address".into(),
            containerd.display().to_string(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--namespace".into(),
            namespace.to_owned(),
            "--cgroup-parent".into(),
            self.cgroup.path().to_owned(),
            "--runc-root".into(),
            runc_root.display().to_string(),
        ]
    }

    /// Starts `sandboxd <args>`, output appended to the log.
    fn spawn(&mut self, args: &[String]) {
        assert!(self.child.is_none(), "sandboxd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open sandboxd log");
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = sandboxd_command()
            .args(args)
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn sandboxd");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("sandboxd is running").id()
    }

    /// The exit status if sandboxd has exited (it is then reaped and forgotten).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .as_mut()?
            .try_wait()
            .expect("wait for sandboxd")?;
        self.child = None;
        Some(status)
    }

    /// Waits until health `Check("")` on `listen` reports SERVING. Returns Err(log of this run)
    /// if sandboxd exits first; panics on timeout.
    async fn wait_serving(&mut self, listen: &Listen) -> Result<(), String> {
        let deadline = Instant::now() + SERVING_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "sandboxd exited during startup ({status}):\n{}",
                    self.run_log()
                ));
            }
            let last = match listen.channel().await {
                Ok(channel) => match health(channel, "").await {
                    Ok(ServingStatus::Serving) => return Ok(()),
                    Ok(other) => format!("health {other:?}"),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "sandboxd on {} not SERVING within {SERVING_TIMEOUT:?} (last: {last})",
                listen.flag()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits up to [`EXIT_TIMEOUT`] for the exit; panics (after SIGKILL) if
    /// sandboxd is still running then.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let pid = self.pid();
        let sent = Instant::now();
        host::send_signal(pid, Signal::SIGTERM);
        loop {
            if let Some(status) = self.exited() {
                return (status, sent.elapsed());
            }
            if sent.elapsed() > EXIT_TIMEOUT {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                panic!("sandboxd (pid {pid}) did not exit within {EXIT_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(host::POLL_INTERVAL);
        }
    }

    /// [`Daemon::terminate`], asserting sandboxd exits 0 and logs [`STOPPED_LINE`] first.
    fn terminate_cleanly(&mut self) {
        let (status, took) = self.terminate();
        assert!(
            status.success(),
            "sandboxd exited with {status} after SIGTERM; log:\n{}",
            self.run_log()
        );
        assert!(
            self.run_log().contains(STOPPED_LINE),
            "no {STOPPED_LINE:?} in the log after SIGTERM ({took:?}):\n{}",
            self.run_log()
        );
    }

    /// Live processes whose command line names our temp dir.
    fn processes_left(&self) -> Vec<String> {
        let root = self.root.to_string_lossy().into_owned();
        host::processes()
            .into_iter()
            .filter(|p| p.cmdline.iter().any(|a| a.contains(&root)))
            .map(|p| format!("{} {}", p.pid, p.cmdline.join(" ")))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- sandboxd log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
            let containerd_log = self.data_dir().join("containerd/containerd.log");
            if containerd_log.exists() {
                eprintln!(
                    "--- private containerd log ({}) ---\n{}",
                    containerd_log.display(),
                    host::log_tail(&containerd_log, 32 * 1024)
                );
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A private containerd and its shims name the temp dir; the sandboxes' processes are
        // their descendants.
        let stragglers = host::pids_mentioning(&self.root.to_string_lossy());
        host::kill_process_trees(&stragglers);
        if let Some(dir) = self.dir.take() {
            host::remove_fixture_dir(dir);
        }
        // `cgroup` drops after this body: it kills whatever is left in the cgroups and
        // removes them.
    }
}

/// Creates a sandbox, checks it runs, force-deletes it and checks it is gone.
async fn create_and_delete(channel: Channel, id: &str, image: &str, log: impl Fn() -> String) {
    let mut c = Clients::new(channel, image.to_owned());
    let sandbox = c
        .try_create(c.request(id))
        .await
        .unwrap_or_else(|s| panic!("create_sandbox {id} from {image}: {s}\nlog:\n{}", log()));
    assert_eq!(sandbox.state(), SandboxState::Running, "{sandbox:?}");
    assert!(sandbox.pid > 0, "{sandbox:?}");
    assert!(
        host::is_alive(sandbox.pid as i32),
        "sandbox {id}'s PID 1 ({}) is not alive",
        sandbox.pid
    );
    c.try_delete(id, true)
        .await
        .unwrap_or_else(|s| panic!("delete_sandbox {id}: {s}\nlog:\n{}", log()));
    let err = c.try_get(id).await.expect_err("get_sandbox after delete");
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

/// Runs `ctr -a <socket> -n <namespace> <args>` and returns its stdout's non-empty lines.
fn ctr_lines(socket: &Path, namespace: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new(host::binary("ctr"))
        .arg("-a")
        .arg(socket)
        .args(["-n", namespace])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Waits until `f` returns an empty list or the timeout passes; returns the last list.
fn wait_empty<T>(timeout: Duration, f: impl Fn() -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = f();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(host::POLL_INTERVAL);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_containerd_starts_when_none_answers() {
    host::require_prerequisites();
    let registry = common::Registry::start();
    registry.push(&common::busybox_layout(), common::BUSYBOX_NAME_TAG);
    let image = format!("{}/{}", registry.addr(), common::BUSYBOX_NAME_TAG);
    let namespace = common::unique_name("sbx-embedded");

    let mut daemon = Daemon::new("sandboxd-embedded-");
    let nothing = daemon.root.join("nothing.sock");
    let mut listen = Listen::Tcp(String::new());
    for attempt in 1..=PORT_ATTEMPTS {
        listen = Listen::Tcp(format!("127.0.0.1:{}", common::registry::free_port()));
        let args = daemon.serve_args(&listen, &nothing, &namespace, &daemon.root.join("runc"));
        daemon.spawn(&args);
        match daemon.wait_serving(&listen).await {
            Ok(()) => break,
            Err(log) if log.contains("ddress already in use") && attempt < PORT_ATTEMPTS => {}
            Err(log) => panic!("{log}"),
        }
    }

    // A private containerd runs with its socket under <data>/containerd/.
    let private_dir = daemon.data_dir().join("containerd");
    let socket = private_dir.join("containerd.sock");
    let socket_type = std::fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("no private containerd socket {}: {e}", socket.display()))
        .file_type();
    assert!(
        socket_type.is_socket(),
        "{} is not a socket",
        socket.display()
    );
    let private_dir_text = private_dir.to_string_lossy().into_owned();
    let containerds: Vec<i32> = host::processes()
        .into_iter()
        .filter(|p| {
            p.cmdline
                .first()
                .is_some_and(|argv0| argv0.ends_with("/containerd") || argv0 == "containerd")
                && p.cmdline.iter().any(|a| a.contains(&private_dir_text))
        })
        .map(|p| p.pid)
        .collect();
    assert_eq!(
        containerds.len(),
        1,
        "expected one private containerd under {private_dir_text}, found {containerds:?}"
    );
    assert!(
        daemon.run_log().contains("started a private containerd"),
        "the log does not say a private containerd was started:\n{}",
        daemon.run_log()
    );
    assert!(
        !nothing.exists(),
        "sandboxd created the configured socket path {}",
        nothing.display()
    );
    let channel = listen.channel().await.expect("connect to sandboxd");
    for service in SERVICES {
        assert_eq!(
            health(channel.clone(), service).await,
            Ok(ServingStatus::Serving),
            "health of {service}"
        );
    }

    // A sandbox runs on the private containerd, from a registry image.
    let log_path = daemon.log_path();
    create_and_delete(channel.clone(), "embedded", &image, || {
        host::log_tail(&log_path, 64 * 1024)
    })
    .await;
    for (what, args) in [
        ("containers", &["containers", "ls", "-q"][..]),
        ("tasks", &["tasks", "ls", "-q"][..]),
        ("leases", &["leases", "ls", "-q"][..]),
    ] {
        let left = ctr_lines(&socket, &namespace, args);
        assert!(
            left.is_empty(),
            "{what} left in the private containerd: {left:?}"
        );
    }
    let active: Vec<String> = ctr_lines(&socket, &namespace, &["snapshots", "ls"])
        .into_iter()
        .filter(|l| l.split_whitespace().last() == Some("Active"))
        .collect();
    assert!(active.is_empty(), "active snapshots left: {active:?}");
    let cgroups = daemon.cgroup.leftovers();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");

    // The private containerd dies: sandboxd restarts it and serves again.
    host::send_signal(containerds[0] as u32, nix::sys::signal::Signal::SIGKILL);
    host::wait_gone(&containerds);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let restarted = host::processes().into_iter().any(|p| {
            p.cmdline
                .first()
                .is_some_and(|a| a.ends_with("/containerd") || a == "containerd")
                && p.cmdline.iter().any(|a| a.contains(&private_dir_text))
                && !containerds.contains(&p.pid)
        });
        if restarted && health(channel.clone(), "").await == Ok(ServingStatus::Serving) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the private containerd was not restarted after it died:\n{}",
            daemon.run_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    create_and_delete(channel.clone(), "after-restart", &image, || {
        host::log_tail(&log_path, 64 * 1024)
    })
    .await;
    drop(channel);

    // SIGTERM stops sandboxd and its private containerd.
    daemon.terminate_cleanly();
    let left = wait_empty(GONE_TIMEOUT, || daemon.processes_left());
    assert!(
        left.is_empty(),
        "processes naming {} survive sandboxd's exit: {left:#?}",
        daemon.root.display()
    );
    for &pid in &containerds {
        assert!(
            !host::is_alive(pid),
            "the private containerd (pid {pid}) is still alive"
        );
    }
    let mounts = host::mounts_under(&daemon.root);
    assert!(
        mounts.is_empty(),
        "mounts left under the data dir: {mounts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_gracefully_and_exit_code_is_zero() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.try_create(c.request("graceful"))
        .await
        .unwrap_or_else(|s| panic!("create_sandbox: {s}\nlog:\n{}", env.sandboxd.log_tail()));

    // A unary call in flight when SIGTERM arrives still gets its answer: this one runs for a
    // second, and SIGTERM comes while it runs.
    let mut exec_client = c.sb.clone();
    let in_flight = tokio::spawn(async move {
        exec_client
            .exec_sync(pb::ExecSyncRequest {
                sandbox_id: "graceful".into(),
                args: vec!["sh".into(), "-c".into(), "sleep 1; echo finished".into()],
                timeout: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !in_flight.is_finished(),
        "ExecSync of `sleep 1` returned within 300 ms"
    );

    let log_before = std::fs::metadata(env.sandboxd.log_path())
        .map(|m| m.len())
        .unwrap_or(0);
    let sent = Instant::now();
    let status = tokio::task::block_in_place(|| env.sandboxd.stop()).expect("sandboxd was running");
    let took = sent.elapsed();
    let log = std::fs::read(env.sandboxd.log_path()).unwrap_or_default();
    let run_log = String::from_utf8_lossy(&log[log_before as usize..]).into_owned();
    assert!(
        status.success(),
        "sandboxd exited with {status} after SIGTERM (after {took:?}); log:\n{}",
        env.sandboxd.log_tail()
    );
    assert!(took < EXIT_TIMEOUT, "sandboxd took {took:?} to stop");
    assert!(
        run_log.contains(STOPPED_LINE),
        "no {STOPPED_LINE:?} logged on SIGTERM:\n{}",
        env.sandboxd.log_tail()
    );
    let exec = in_flight
        .await
        .expect("exec task")
        .unwrap_or_else(|s| {
            panic!(
                "ExecSync in flight during SIGTERM failed: {s}\nlog:\n{}",
                env.sandboxd.log_tail()
            )
        })
        .into_inner();
    assert_eq!(
        (
            exec.exit_code,
            String::from_utf8_lossy(&exec.stdout).as_ref()
        ),
        (0, "finished\n"),
        "in-flight ExecSync: {exec:?}"
    );

    // Nothing was left half-made: a new sandboxd finds the sandbox and deletes it cleanly.
    env.sandboxd.restart().await;
    let mut c = env.clients().await;
    let sandbox = c
        .try_get("graceful")
        .await
        .expect("get_sandbox after restart");
    assert_eq!(sandbox.state(), SandboxState::Running, "{sandbox:?}");
    c.try_delete("graceful", true)
        .await
        .expect("delete_sandbox after restart");
    env.leak_check().await;
}

/// Runs a sandboxd command that must exit promptly; returns (status, stdout, stderr).
fn run_quick(command: &mut Command) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("create output dir");
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let mut child = command
        .stdout(std::fs::File::create(&stdout_path).expect("create stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("create stderr file"))
        .spawn()
        .expect("spawn sandboxd");
    let deadline = Instant::now() + QUICK_EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sandboxd") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} still ran after {QUICK_EXIT_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(host::POLL_INTERVAL);
    };
    (
        status,
        std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

/// `sandboxd serve <extra>` plus harmless settings for whatever `extra` does not set, so that
/// nothing starts at a real path should parsing wrongly succeed. (A flag may not be given twice.)
fn serve_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["serve".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    for (flag, value) in [
        (
            "--containerd-address",
            dir.join("nothing.sock").display().to_string(),
        ),
        ("--data-dir", dir.join("data").display().to_string()),
        ("--embedded-containerd", "never".to_owned()),
    ] {
        if !extra.contains(&flag) {
            args.push(flag.into());
            args.push(value);
        }
    }
    args
}

/// Asserts exit code 2 and that stderr mentions every one of `words`.
fn assert_config_error(what: &str, out: (ExitStatus, String, String), words: &[&str]) {
    let (status, stdout, stderr) = out;
    assert_eq!(
        status.code(),
        Some(2),
        "{what}: expected exit code 2, got {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for word in words {
        assert!(
            stderr.contains(word),
            "{what}: stderr does not name {word:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_configuration_exits_nonzero_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("create temp dir");

    let out = run_quick(sandboxd_command().args(serve_args(dir.path(), &["--listen", "nonsense"])));
    assert_config_error("--listen nonsense", out, &["listen", "nonsense"]);

    let out = run_quick(
        sandboxd_command()
            .args(serve_args(dir.path(), &[]))
            .env("SANDBOXD_LISTEN", "also-nonsense"),
    );
    assert_config_error(
        "SANDBOXD_LISTEN=also-nonsense",
        out,
        &["listen", "also-nonsense"],
    );

    let config = dir.path().join("sandboxd.toml");
    std::fs::write(
        &config,
        "namespace = \"fine\"\ncontainerd_adress = \"/run/typo.sock\"\n",
    )
    .expect("write config");
    let config_arg = config.display().to_string();
    let out =
        run_quick(sandboxd_command().args(serve_args(dir.path(), &["--config", &config_arg])));
    assert_config_error("a config with an unknown key", out, &["containerd_adress"]);

    let out = run_quick(sandboxd_command().args(serve_args(
        dir.path(),
        &[
            "--config",
            &dir.path().join("missing.toml").display().to_string(),
        ],
    )));
    assert_config_error("a missing config file", out, &["missing.toml"]);

    let out =
        run_quick(sandboxd_command().args(serve_args(dir.path(), &["--data-dir", "relative/dir"])));
    assert_config_error("a relative --data-dir", out, &["data_dir"]);

    let out = run_quick(sandboxd_command().args(serve_args(dir.path(), &["--no-such-flag"])));
    assert_config_error("an unknown flag", out, &["--no-such-flag"]);

    let (status, help, stderr) = run_quick(sandboxd_command().args(["serve", "--help"]));
    assert!(status.success(), "serve --help exited {status}: {stderr}");
    for (flag, env) in [
        ("--listen", "SANDBOXD_LISTEN"),
        ("--containerd-address", "SANDBOXD_CONTAINERD_ADDRESS"),
        ("--namespace", "SANDBOXD_NAMESPACE"),
        ("--data-dir", "SANDBOXD_DATA_DIR"),
        ("--config", "SANDBOXD_CONFIG"),
    ] {
        assert!(
            help.contains(flag),
            "serve --help does not list {flag}:\n{help}"
        );
        assert!(
            help.contains(env),
            "serve --help does not name {env}:\n{help}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "a rejected configuration still created the data dir"
    );
}

#[test]
fn occupied_listen_address_exits_nonzero_naming_it() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local addr").to_string();
    let (status, stdout, stderr) =
        run_quick(sandboxd_command().args(serve_args(dir.path(), &["--listen", &addr])));
    assert!(
        !status.success() && status.code().is_some(),
        "sandboxd on an occupied port exited {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&addr) && stderr.to_lowercase().contains("address already in use"),
        "stderr does not say {addr} is in use:\n{stderr}\nstdout:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listens_on_a_unix_socket() {
    let env = TestEnv::new().await;
    let mut daemon = Daemon::new("sandboxd-unix-");
    let socket = daemon.root.join("s.sock");
    let listen = Listen::Unix(socket.clone());
    let namespace = common::unique_name("sbx-unix");
    let mut args = daemon.serve_args(
        &listen,
        &env.containerd.address(),
        &namespace,
        &env.containerd.dir().join("runc"),
    );
    args.extend(["--embedded-containerd".into(), "never".into()]);
    daemon.spawn(&args);
    if let Err(log) = daemon.wait_serving(&listen).await {
        panic!("{log}");
    }
    let socket_type = std::fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("stat {}: {e}", socket.display()))
        .file_type();
    assert!(
        socket_type.is_socket(),
        "{} is not a socket",
        socket.display()
    );

    let channel = listen
        .channel()
        .await
        .expect("connect over the unix socket");
    for service in SERVICES {
        assert_eq!(
            health(channel.clone(), service).await,
            Ok(ServingStatus::Serving),
            "health of {service} over unix:{}",
            socket.display()
        );
    }
    let log_path = daemon.log_path();
    create_and_delete(channel.clone(), "over-unix", &env.image_ref(), || {
        host::log_tail(&log_path, 64 * 1024)
    })
    .await;
    let mut leaks = env.containerd.leaks(&namespace).await;
    leaks.cgroups = daemon.cgroup.leftovers();
    assert!(leaks.is_empty(), "resources leaked:\n{leaks}");
    drop(channel);

    daemon.terminate_cleanly();
    assert!(
        !socket.exists(),
        "the unix socket {} is still there after sandboxd stopped",
        socket.display()
    );
}
