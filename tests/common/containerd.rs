//! A private containerd in a temp dir, plus the leak checks that read it back.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{Kind, ListSnapshotsRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    ListContainersRequest, ListNamespacesRequest, ListRequest, ListStatusesRequest,
    ListTasksRequest,
};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Request;

use super::host;

/// How long containerd gets to answer Version after it is started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The snapshotter sandboxd and ctr use by default.
pub const SNAPSHOTTER: &str = "overlayfs";
/// How much of containerd's log a failure message shows.
const LOG_TAIL_BYTES: usize = 16 * 1024;

/// A containerd daemon private to one test: its own root, state, sockets and log in a temp dir.
///
/// Drop kills containerd, every shim started for its socket (with the containers below them),
/// unmounts everything under the temp dir and removes it. The host's /run/containerd is never
/// configured or cleaned by us (containerd 1.6 shims still put their sockets in
/// /run/containerd/s, named by a hash that includes our socket path).
pub struct Containerd {
    dir: Option<TempDir>,
    root: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Containerd {
    /// Writes config.toml, starts containerd and waits until its Version RPC answers.
    ///
    /// Panics with containerd's log if it exits or does not answer within 20 s.
    pub async fn start() -> Containerd {
        host::require_prerequisites();
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-ctrd-")
            .tempdir()
            .expect("create containerd temp dir");
        let root = fs::canonicalize(dir.path()).expect("canonicalize containerd temp dir");
        let containerd = Containerd {
            dir: Some(dir),
            root,
            child: Mutex::new(None),
        };
        fs::write(containerd.config_path(), containerd.config_toml())
            .expect("write containerd config.toml");
        containerd.spawn();
        containerd.wait_ready().await;
        containerd
    }

    /// The containerd gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.root.join("containerd.sock")
    }

    /// The temp dir holding config, root, state, sockets and log.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// containerd's combined stdout/stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("containerd.log")
    }

    /// The end of containerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        host::log_tail(&self.log_path(), LOG_TAIL_BYTES)
    }

    /// containerd's pid, or None after [`Containerd::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().map(Child::id)
    }

    /// SIGKILLs containerd alone (shims and containers live on), for "containerd died" tests.
    pub fn kill(&self) {
        if let Some(mut child) = self.lock_child().take() {
            // ESRCH/ECHILD only mean it is already gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts containerd again on the same config and directories and waits for Version.
    ///
    /// Kills the running one first if there is one.
    pub async fn restart(&self) {
        self.kill();
        let mut log = self.open_log();
        let _ = writeln!(log, "=== test harness: restarting containerd ===");
        self.spawn();
        self.wait_ready().await;
    }

    /// A fresh gRPC channel to containerd's socket.
    pub async fn channel(&self) -> Channel {
        containerd_client::connect(self.address())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.address().display()))
    }

    /// Runs `ctr -a <socket> -n <namespace> <args>` and returns its output (whatever the status).
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new(host::binary("ctr"))
            .arg("--address")
            .arg(self.address())
            .args(["--namespace", namespace])
            .args(args)
            .env("PATH", host::DAEMON_PATH)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ctr")
    }

    /// Like [`Containerd::ctr`], but panics with ctr's output unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, namespace: &str, args: &[&str]) -> String {
        let out = self.ctr(namespace, args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pids of the containerd-shim-runc-v2 processes serving this containerd.
    pub fn shim_pids(&self) -> Vec<i32> {
        let address = self.address();
        let address = address.to_string_lossy();
        host::processes()
            .into_iter()
            .filter(|p| {
                p.cmdline
                    .first()
                    .is_some_and(|argv0| argv0.contains("containerd-shim"))
                    && p.cmdline.iter().any(|arg| arg.contains(address.as_ref()))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// Ids of the containers in `namespace` that match any of containerd's `filters` (all of
    /// them when there are none).
    pub async fn container_ids(&self, namespace: &str, filters: Vec<String>) -> Vec<String> {
        ContainersClient::new(self.channel().await)
            .list(namespaced(namespace, ListContainersRequest { filters }))
            .await
            .expect("containerd Containers.List")
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    /// The namespaces sandboxd made for the tenants of the sandboxd whose `--namespace` is
    /// `instance` (labelled `sandboxd.io/instance`), its own among them once it has
    /// recovered; sorted.
    pub async fn sandboxd_namespaces(&self, instance: &str) -> Vec<String> {
        let reply = NamespacesClient::new(self.channel().await)
            .list(namespaced(instance, ListNamespacesRequest::default()))
            .await
            .unwrap_or_else(|e| panic!("listing namespaces: {e}"));
        let mut names: Vec<String> = reply
            .into_inner()
            .namespaces
            .into_iter()
            .filter(|ns| {
                ns.labels
                    .get("sandboxd.io/instance")
                    .is_some_and(|v| v == instance)
            })
            .map(|ns| ns.name)
            .collect();
        names.sort();
        names
    }

    /// What `namespace` still holds: containers, tasks, active overlayfs snapshots and leases.
    /// The `cgroups` field is left empty (see `TestEnv::leaks`).
    pub async fn leaks(&self, namespace: &str) -> Leaks {
        let channel = self.channel().await;
        let containers = self.container_ids(namespace, Vec::new()).await;

        let tasks = TasksClient::new(channel.clone())
            .list(namespaced(namespace, ListTasksRequest::default()))
            .await
            .expect("containerd Tasks.List")
            .into_inner()
            .tasks
            .into_iter()
            .map(|t| format!("{} (pid {}, status {})", t.id, t.pid, t.status))
            .collect();

        let mut active_snapshots = Vec::new();
        let mut stream = SnapshotsClient::new(channel.clone())
            .list(namespaced(
                namespace,
                ListSnapshotsRequest {
                    snapshotter: SNAPSHOTTER.to_owned(),
                    filters: Vec::new(),
                },
            ))
            .await
            .expect("containerd Snapshots.List")
            .into_inner();
        while let Some(page) = stream
            .message()
            .await
            .expect("containerd Snapshots.List stream")
        {
            active_snapshots.extend(
                page.info
                    .into_iter()
                    .filter(|s| s.kind == Kind::Active as i32)
                    .map(|s| s.name),
            );
        }

        let ingests = ContentClient::new(channel.clone())
            .list_statuses(namespaced(namespace, ListStatusesRequest::default()))
            .await
            .expect("containerd Content.ListStatuses")
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| format!("{} ({} of {} bytes)", s.r#ref, s.offset, s.total))
            .collect();

        let leases = LeasesClient::new(channel)
            .list(namespaced(namespace, ListRequest::default()))
            .await
            .expect("containerd Leases.List")
            .into_inner()
            .leases
            .into_iter()
            .map(|l| l.id)
            .collect();

        Leaks {
            containers,
            tasks,
            active_snapshots,
            leases,
            ingests,
            cgroups: Vec::new(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    fn config_toml(&self) -> String {
        let path = |name: &str| toml_string(&self.root.join(name));
        format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             \n\
             [grpc]\n  address = {grpc}\n\
             \n\
             [ttrpc]\n  address = {ttrpc}\n\
             \n\
             [debug]\n  address = {debug}\n  level = \"info\"\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = path("root"),
            state = path("state"),
            grpc = toml_string(&self.address()),
            ttrpc = path("containerd.sock.ttrpc"),
            debug = path("debug.sock"),
            opt = path("opt"),
        )
    }

    fn open_log(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open containerd log")
    }

    fn spawn(&self) {
        let log = self.open_log();
        let child = Command::new(host::binary("containerd"))
            .arg("--config")
            .arg(self.config_path())
            .env("PATH", host::DAEMON_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone containerd log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        *self.lock_child() = Some(child);
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "containerd exited during startup ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            if self.answers_version().await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer Version within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(host::POLL_INTERVAL).await;
        }
    }

    async fn answers_version(&self) -> bool {
        let attempt = async {
            let channel = containerd_client::connect(self.address()).await.ok()?;
            VersionClient::new(channel).version(()).await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(_))
        )
    }

    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.lock_child().as_mut()?.try_wait().ok().flatten()
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock must not stop Drop from cleaning up.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- containerd log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail()
            );
        }
        // containerd first, so it cannot start new shims or run shim cleanup meanwhile.
        self.kill();
        host::kill_process_trees(&self.shim_pids());
        if let Some(dir) = self.dir.take() {
            host::remove_fixture_dir(dir);
        }
    }
}

/// A request carrying the `containerd-namespace` header every containerd call needs.
pub fn namespaced<T>(namespace: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        namespace
            .parse()
            .unwrap_or_else(|e| panic!("namespace {namespace:?} is not a header value: {e}")),
    );
    request
}

/// A TOML basic string holding `path`.
fn toml_string(path: &Path) -> String {
    let s = path.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Resources a test left behind. Every list is empty after a clean test.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leaks {
    /// Container ids in the namespace.
    pub containers: Vec<String>,
    /// Tasks in the namespace, as "id (pid N, status S)".
    pub tasks: Vec<String>,
    /// Names of ACTIVE snapshots in the overlayfs snapshotter (committed image layers are fine).
    pub active_snapshots: Vec<String>,
    /// Lease ids in the namespace.
    pub leases: Vec<String>,
    /// Unfinished content writes in the namespace, as "ref (offset of total bytes)".
    pub ingests: Vec<String>,
    /// Cgroup directories below the test's cgroup parent.
    pub cgroups: Vec<PathBuf>,
}

impl Leaks {
    /// Whether nothing leaked.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
            && self.tasks.is_empty()
            && self.active_snapshots.is_empty()
            && self.leases.is_empty()
            && self.ingests.is_empty()
            && self.cgroups.is_empty()
    }
}

impl fmt::Display for Leaks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "no leaks");
        }
        let lists: [(&str, Vec<String>); 6] = [
            ("containers", self.containers.clone()),
            ("tasks", self.tasks.clone()),
            ("active snapshots", self.active_snapshots.clone()),
            ("leases", self.leases.clone()),
            ("unfinished content writes", self.ingests.clone()),
            (
                "cgroups",
                self.cgroups
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            ),
        ];
        for (what, items) in lists.iter().filter(|(_, items)| !items.is_empty()) {
            writeln!(f, "{what}: {}", items.join(", "))?;
        }
        Ok(())
    }
}
