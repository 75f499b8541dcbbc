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

    /// SIGKILLs sandboxd, as a crash or the OOM killer would, and reaps it.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("sandboxd is running");
        child.kill().expect("SIGKILL sandboxd");
        child.wait().expect("reap sandboxd");
    }

    /// Where the private containerd lives.
    fn private_dir(&self) -> PathBuf {
        self.data_dir().join("containerd")
    }

    /// The pid the private containerd's pid file names, if the file exists.
    fn pid_file_pid(&self) -> Option<i32> {
        let path = self.private_dir().join("containerd.pid");
        let text = std::fs::read_to_string(&path).ok()?;
        let pid = text.split_whitespace().next().and_then(|p| p.parse().ok());
        Some(pid.unwrap_or_else(|| panic!("{} holds no pid: {text:?}", path.display())))
    }

    /// Live private containerds under this daemon's data dir.
    fn private_containerds(&self) -> Vec<i32> {
        let dir = self.private_dir().to_string_lossy().into_owned();
        host::processes()
            .into_iter()
            .filter(|p| {
                p.cmdline
                    .first()
                    .is_some_and(|argv0| argv0.ends_with("/containerd") || argv0 == "containerd")
                    && p.cmdline.iter().any(|a| a.contains(&dir))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// Starts sandboxd with nothing answering at the configured socket (so it runs a private
    /// containerd) on a free port, and waits until it serves; returns where it listens.
    async fn serve_embedded(&mut self, namespace: &str) -> Listen {
        let nothing = self.root.join("nothing.sock");
        for attempt in 1..=PORT_ATTEMPTS {
            let listen = Listen::Tcp(format!("127.0.0.1:{}", common::registry::free_port()));
            let args = self.serve_args(&listen, &nothing, namespace, &self.root.join("runc"));
            self.spawn(&args);
            match self.wait_serving(&listen).await {
                Ok(()) => return listen,
                Err(log) if log.contains("ddress already in use") && attempt < PORT_ATTEMPTS => {}
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
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
    let listen = daemon.serve_embedded(&namespace).await;

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
    let containerds = daemon.private_containerds();
    assert_eq!(
        containerds.len(),
        1,
        "expected one private containerd under {}, found {containerds:?}",
        private_dir.display()
    );
    assert_eq!(
        daemon.pid_file_pid(),
        Some(containerds[0]),
        "the pid file does not name the private containerd"
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
        let now = daemon.private_containerds();
        let restarted = matches!(now.as_slice(), [pid] if !containerds.contains(pid))
            && daemon.pid_file_pid() == now.first().copied();
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
    assert_eq!(
        daemon.pid_file_pid(),
        None,
        "the pid file outlives shutdown"
    );
    let mounts = host::mounts_under(&daemon.root);
    assert!(
        mounts.is_empty(),
        "mounts left under the data dir: {mounts:?}"
    );
}

/// Waits until sandboxd's private containerds are exactly one, other than `not`, that the pid
/// file names; returns its pid.
fn wait_one_private_containerd(daemon: &Daemon, not: Option<i32>) -> i32 {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let now = daemon.private_containerds();
        let recorded = daemon.pid_file_pid();
        match now.as_slice() {
            [pid] if Some(*pid) != not && recorded == Some(*pid) => return *pid,
            _ => assert!(
                Instant::now() < deadline,
                "expected one private containerd (not {not:?}) named by the pid file; \
                 running: {now:?}, pid file: {recorded:?}\nlog:\n{}",
                daemon.run_log()
            ),
        }
        std::thread::sleep(host::POLL_INTERVAL);
    }
}

/// Asserts SIGTERM stops sandboxd, its private containerd (pid `containerd`) and removes the
/// pid file.
fn terminate_with_private_containerd(daemon: &mut Daemon, containerd: i32) {
    daemon.terminate_cleanly();
    let left = wait_empty(GONE_TIMEOUT, || daemon.private_containerds());
    assert!(
        left.is_empty() && !host::is_alive(containerd),
        "private containerds survive sandboxd's exit: {left:?} (was {containerd})"
    );
    assert_eq!(
        daemon.pid_file_pid(),
        None,
        "the pid file outlives shutdown"
    );
}

/// Field 22 of /proc/PID/stat, the process's start time.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_comm = &stat[stat.rfind(')').expect("stat has a command name") + 1..];
    after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .expect("stat has a start time")
}

/// A child process killed (and reaped) on drop, whatever the test did.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leftover_embedded_containerd_is_reused_after_sigkill() {
    host::require_prerequisites();
    let registry = common::Registry::start();
    registry.push(&common::busybox_layout(), common::BUSYBOX_NAME_TAG);
    let image = format!("{}/{}", registry.addr(), common::BUSYBOX_NAME_TAG);
    let namespace = common::unique_name("sbx-reuse");
    let mut daemon = Daemon::new("sandboxd-reuse-");
    let listen = daemon.serve_embedded(&namespace).await;
    let containerd = wait_one_private_containerd(&daemon, None);
    let mut c = Clients::new(listen.channel().await.expect("connect"), image.clone());
    let sandbox = c.create_running("survivor").await;
    assert_eq!(sandbox.state(), SandboxState::Running, "{sandbox:?}");

    // sandboxd dies without a chance to stop its containerd, which keeps running.
    daemon.kill();
    assert!(
        host::is_alive(containerd),
        "the private containerd (pid {containerd}) died with sandboxd"
    );

    // The next sandboxd on the same data dir uses it rather than starting a second one.
    let listen = daemon.serve_embedded(&namespace).await;
    assert_eq!(
        daemon.private_containerds(),
        vec![containerd],
        "expected the earlier private containerd, and only it\nlog:\n{}",
        daemon.run_log()
    );
    assert_eq!(daemon.pid_file_pid(), Some(containerd));
    let reused = format!("reusing the private containerd left by an earlier run, pid {containerd}");
    assert!(
        daemon.run_log().contains(&reused),
        "the log does not say {reused:?}:\n{}",
        daemon.run_log()
    );
    let channel = listen.channel().await.expect("connect after restart");
    for service in SERVICES {
        assert_eq!(
            health(channel.clone(), service).await,
            Ok(ServingStatus::Serving),
            "health of {service}"
        );
    }
    let mut c = Clients::new(channel, image);
    let listed: Vec<(String, SandboxState)> = c
        .list()
        .await
        .iter()
        .map(|s| (s.sandbox_id.clone(), s.state()))
        .collect();
    assert_eq!(listed, vec![("survivor".to_owned(), SandboxState::Running)]);
    assert_eq!(c.sh_ok("survivor", "echo still here").await, "still here\n");
    c.force_delete("survivor").await;
    drop(c);

    // SIGTERM stops the reused containerd too, and removes its pid file.
    terminate_with_private_containerd(&mut daemon, containerd);
}

#[tokio::test(flavor = "multi_thread")]
async fn leftover_pid_file_naming_an_unrelated_process_is_ignored() {
    host::require_prerequisites();
    let namespace = common::unique_name("sbx-stale-pid");
    let mut daemon = Daemon::new("sandboxd-stale-pid-");
    // The pid file names a live process, with its true start time: only its command line
    // says it is no containerd of ours.
    let sleeper = KillOnDrop(
        Command::new(host::binary("sleep"))
            .arg("1000")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep"),
    );
    let sleep_pid = sleeper.0.id();
    std::fs::create_dir_all(daemon.private_dir()).expect("create the private dir");
    std::fs::write(
        daemon.private_dir().join("containerd.pid"),
        format!("{sleep_pid} {}\n", start_time(sleep_pid)),
    )
    .expect("write a stale pid file");

    daemon.serve_embedded(&namespace).await;
    let containerd = wait_one_private_containerd(&daemon, Some(sleep_pid as i32));
    assert!(
        daemon.run_log().contains("started a private containerd"),
        "the log does not say a private containerd was started:\n{}",
        daemon.run_log()
    );
    terminate_with_private_containerd(&mut daemon, containerd);
    assert!(
        host::is_alive(sleep_pid as i32),
        "the unrelated process the stale pid file named (pid {sleep_pid}) was killed"
    );
    drop(sleeper);
}

#[tokio::test(flavor = "multi_thread")]
async fn leftover_embedded_containerd_that_hangs_is_replaced() {
    host::require_prerequisites();
    let namespace = common::unique_name("sbx-hung");
    let mut daemon = Daemon::new("sandboxd-hung-");
    daemon.serve_embedded(&namespace).await;
    let hung = wait_one_private_containerd(&daemon, None);

    // sandboxd dies, and its containerd, left behind, stops answering.
    daemon.kill();
    host::send_signal(hung as u32, Signal::SIGSTOP);

    daemon.serve_embedded(&namespace).await;
    assert!(
        !host::is_alive(hung),
        "the hung private containerd (pid {hung}) still runs\nlog:\n{}",
        daemon.run_log()
    );
    let containerd = wait_one_private_containerd(&daemon, Some(hung));
    assert!(
        daemon.run_log().contains("does not answer"),
        "the log does not say the old containerd did not answer:\n{}",
        daemon.run_log()
    );
    terminate_with_private_containerd(&mut daemon, containerd);
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
