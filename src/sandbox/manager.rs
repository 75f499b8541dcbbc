//! The sandbox manager: its settings, its reads, and the helpers every operation shares. The
//! operations live beside it, one file each (`create`, `lifecycle`, `network`, `recovery`,
//! `exec`, `snapshot`, `pool`). All state lives in containerd (container labels, the task, the
//! writable snapshot) behind [`Backend`]; the files under the data dir are derived and rebuilt
//! as needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use super::locks::{KeyGuard, KeyedLocks};
use super::model::*;
use super::observe::Observer;
use super::record::{self, L_POOL};
use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::image;
use crate::net::Network;
use crate::runtime::{Backend, Container, ContainerUpdate, Task, TaskState};
use crate::sys;

/// Settings of the manager, taken from the service config.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where per-sandbox files live.
    pub data_dir: PathBuf,
    /// Parent cgroup.
    pub cgroup_parent: String,
    /// Idle PID 1 binary on the host.
    pub idle_init: PathBuf,
    /// Steps that fail on purpose, to test that failures undo cleanly (tests only).
    pub failpoints: Vec<String>,
    /// Warm pool sizes per image.
    pub warm_pool: Vec<(image::ImageRef, usize)>,
    /// The binary the shim runs as exec output relay (`None`: FIFOs only).
    pub exec_io_relay: Option<PathBuf>,
    /// runc's state directory, given to the shim with each sandbox.
    pub runc_root: PathBuf,
    /// Bytes of output all ExecSync calls together may buffer.
    pub exec_sync_memory: u64,
    /// Seccomp, OOM priority and default limits of every sandbox.
    pub walls: crate::config::Walls,
    /// How images are pulled and snapshots exported.
    pub registries: Arc<image::Registries>,
    /// Sandbox events each tenant keeps for resuming watchers.
    pub event_history: usize,
}

impl From<&Config> for ManagerConfig {
    fn from(c: &Config) -> Self {
        ManagerConfig {
            data_dir: c.data_dir.clone(),
            cgroup_parent: c.cgroup_parent.clone(),
            idle_init: c.idle_init.clone(),
            failpoints: c.failpoints.clone(),
            warm_pool: c.warm_pool.clone(),
            exec_io_relay: c.exec_io_relay.clone(),
            runc_root: c.runc_root.clone(),
            exec_sync_memory: c.exec_sync_memory,
            walls: c.walls.clone(),
            registries: image::Registries::anonymous(),
            event_history: c.event_history,
        }
    }
}

/// Creates, inspects, starts, stops and deletes sandboxes.
#[derive(Debug)]
pub struct Manager {
    pub(super) cd: Arc<dyn Backend>,
    pub(super) cfg: ManagerConfig,
    pub(super) net: Arc<Network>,
    /// The tenant whose sandboxes this manager holds: its namespace and host keys.
    pub(super) scope: super::tenancy::Scope,
    pub(super) pool: super::pool::WarmPool,
    pub(super) locks: Arc<KeyedLocks>,
    /// Exec output straight from the process's pipes, when the shim can run the relay.
    pub(super) relay: Option<Arc<super::relay::ExecRelay>>,
    /// Where measurements go.
    pub(super) observer: Arc<dyn Observer>,
    /// When this manager was made: leases older than this belong to an earlier run.
    pub(super) started_at: std::time::SystemTime,
    /// Open file streams by sandbox, which a delete ends.
    pub(super) streams: Arc<super::streams::FileStreams>,
    /// The temporary mounts of stopped sandboxes, shared by the file accesses open on them.
    mounts: Mutex<HashMap<String, Weak<SharedMount>>>,
    /// What ExecSync calls buffer, in KiB (see `budget::ExecSyncBudget`).
    pub(super) exec_sync_budget: super::budget::ExecSyncBudget,
    /// The tenant's creates in progress, held against its quotas.
    pub(super) ledger: super::quota::Ledger,
    /// The seccomp filter of every sandbox, built once from `cfg.walls`.
    pub(super) seccomp: Option<Arc<oci_spec::runtime::LinuxSeccomp>>,
    /// The snapshotter's snapshots directory, once a writable layer has shown it (for the
    /// free-space guard, see `disk`).
    pub(super) snapshots_dir: std::sync::OnceLock<PathBuf>,
    /// What happens to the tenant's sandboxes, for WatchSandboxes.
    pub(super) events: Arc<super::events::EventLog>,
}

/// A sandbox's root filesystem as seen from the host, for file access. A running sandbox is
/// reached through its PID 1's root; a stopped one through a temporary mount of its writable
/// snapshot, unmounted (and the sandbox unlocked) when the last access to it is dropped.
pub enum SandboxRoot {
    /// `/proc/<pid>/root` of the running PID 1.
    Running(PathBuf),
    /// A temporary mount, shared; holds the sandbox's lock so it cannot start meanwhile.
    Mounted(Arc<SharedMount>),
}

impl SandboxRoot {
    /// The directory that is the sandbox's `/`.
    pub fn path(&self) -> &std::path::Path {
        match self {
            SandboxRoot::Running(p) => p,
            SandboxRoot::Mounted(m) => m.mount.path(),
        }
    }
}

/// A stopped sandbox's temporary mount with the sandbox's lock: no start, commit, restore or
/// delete runs on it until the last file access using it drops it. Many streams on one stopped
/// sandbox share one mount instead of queueing for the lock one after the other.
pub struct SharedMount {
    // Declared first: unmounted before the lock is released.
    mount: sys::MountGuard,
    _lock: KeyGuard,
}

impl std::fmt::Debug for SharedMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMount")
            .field("path", &self.mount.path())
            .finish()
    }
}

impl Manager {
    /// A manager on `cd`; call inside the tokio runtime (the exec relay listens on it).
    pub fn new(
        cd: Arc<dyn Backend>,
        cfg: ManagerConfig,
        net: Network,
        observer: Arc<dyn Observer>,
    ) -> Arc<Manager> {
        let relay = cfg.exec_io_relay.as_ref().and_then(|binary| {
            let socket = cfg.data_dir.join("exec-relay.sock");
            super::relay::ExecRelay::start(binary, &socket)
                .inspect_err(|e| {
                    tracing::warn!(socket = %socket.display(), error = %e, "exec output relay unavailable; execs use FIFOs")
                })
                .ok()
        });
        let exec_sync_budget = super::budget::ExecSyncBudget::new(cfg.exec_sync_memory);
        let seccomp = crate::runtime::spec::seccomp_of(&cfg.walls.seccomp);
        let started_at = std::time::SystemTime::now();
        Arc::new(Manager {
            events: Arc::new(super::events::EventLog::starting_at(
                cfg.event_history,
                started_at,
            )),
            seccomp,
            relay,
            observer,
            started_at,
            pool: super::pool::WarmPool::new(cfg.warm_pool.clone()),
            scope: super::tenancy::Scope::default_tenant(cd.namespace()),
            cd,
            cfg,
            net: Arc::new(net),
            locks: Arc::new(KeyedLocks::default()),
            streams: Arc::default(),
            mounts: Mutex::default(),
            exec_sync_budget,
            snapshots_dir: std::sync::OnceLock::new(),
            ledger: Default::default(),
        })
    }

    /// A manager of `scope`'s sandboxes on `cd` (acting in its namespace), sharing this one's
    /// settings, network, exec relay, ExecSync budget and start time. It has no warm pool:
    /// only the default tenant's sandboxes are pooled (see `pool.rs`).
    pub(super) fn for_scope(&self, cd: Arc<dyn Backend>, scope: super::tenancy::Scope) -> Manager {
        Manager {
            cd,
            scope,
            cfg: self.cfg.clone(),
            net: self.net.clone(),
            pool: super::pool::WarmPool::new(Vec::new()),
            locks: Arc::new(KeyedLocks::default()),
            relay: self.relay.clone(),
            observer: self.observer.clone(),
            started_at: self.started_at,
            streams: Arc::default(),
            mounts: Mutex::default(),
            exec_sync_budget: self.exec_sync_budget.clone(),
            seccomp: self.seccomp.clone(),
            ledger: Default::default(),
            // One snapshotter for every namespace.
            snapshots_dir: self.snapshots_dir.clone(),
            events: Arc::new(super::events::EventLog::starting_at(
                self.cfg.event_history,
                self.started_at,
            )),
        }
    }

    /// The backend, acting in this manager's tenant's namespace.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.cd
    }

    /// The registry settings pulls and exports use.
    pub fn registries(&self) -> &Arc<crate::image::Registries> {
        &self.cfg.registries
    }

    /// The tenant whose sandboxes this manager holds.
    pub fn tenant(&self) -> &crate::caller::Tenant {
        self.scope.tenant()
    }

    /// The name sandbox `id` has on the host (cgroup, network namespace, files): unique
    /// across tenants.
    pub(super) fn host_key(&self, id: &str) -> String {
        self.scope.host_key(id)
    }

    pub(super) fn files_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg
            .data_dir
            .join("sandboxes")
            .join(self.host_key(id.as_str()))
    }

    pub(super) fn exec_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("exec")
    }

    /// Sandbox `id`'s cgroup path (below each controller's mount on v1).
    pub(super) fn sandbox_cgroup(&self, id: &str) -> String {
        format!(
            "{}/{}",
            self.cfg.cgroup_parent.trim_end_matches('/'),
            self.host_key(id)
        )
    }

    /// `r` with the configured default of each limit it leaves unset: what applies to it.
    pub(super) fn applied_limits(&self, r: Resources) -> Resources {
        let w = &self.cfg.walls;
        Resources {
            cpu_millis: r.cpu_millis.or(w.default_cpu_millis),
            memory_bytes: r.memory_bytes.or(w.default_memory),
            pids_limit: r.pids_limit.or(Some(w.default_pids)),
        }
    }

    pub(super) fn mount_base(&self) -> PathBuf {
        self.cfg.data_dir.join("mnt")
    }

    // ---- reading ----

    /// Sandbox `id`'s container; `None` for a missing one and for an unclaimed warm-pool one.
    pub(super) async fn container(&self, id: &SandboxId) -> Result<Option<Container>> {
        Ok(self
            .any_container(id)
            .await?
            .filter(|c| !c.labels.contains_key(L_POOL)))
    }

    /// Sandbox `id`'s container, warm-pool ones included.
    pub(super) async fn any_container(&self, id: &SandboxId) -> Result<Option<Container>> {
        Ok(self
            .cd
            .container(id.as_str())
            .await?
            .filter(record::is_managed))
    }

    /// Sandbox `id`'s container, NOT_FOUND when there is none.
    pub(super) async fn existing(&self, id: &SandboxId) -> Result<Container> {
        self.container(id)
            .await?
            .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))
    }

    /// Sandbox `id`'s task (PID 1), if it has one.
    pub(super) async fn task(&self, id: &str) -> Result<Option<Task>> {
        self.cd.task(id).await
    }

    /// GetSandbox.
    pub async fn get(&self, id: &SandboxId) -> Result<Sandbox> {
        let container = self.existing(id).await?;
        let task = self.task(id.as_str()).await?;
        Ok(self.describe(&container, task.as_ref()))
    }

    /// The sandbox that container `c` and its task stand for, with `oom_killed` read from the
    /// sandbox's cgroup while an exited PID 1's task (and so its cgroup) is still kept.
    pub(super) fn describe(&self, c: &Container, task: Option<&Task>) -> Sandbox {
        let mut sandbox = record::sandbox_of(c, task);
        if let Some(t) = task {
            sandbox.oom_killed =
                t.state == TaskState::Stopped && self.pid1_oom_killed(&sandbox.id, t.exit_status);
        }
        sandbox
    }

    /// Whether PID 1, which exited with `status`, was the OOM killer's: it died of SIGKILL,
    /// which only the kernel or sandboxd can send to a namespace's init, while the sandbox's
    /// cgroup counts an OOM kill. Callers ask only when sandboxd did not kill it itself.
    pub(super) fn pid1_oom_killed(&self, id: &SandboxId, status: u32) -> bool {
        status == 128 + libc::SIGKILL as u32 && self.oom_kills(id) > 0
    }

    /// The sandbox's count of OOM kills so far (0 when the cgroup does not say).
    pub(super) fn oom_kills(&self, id: &SandboxId) -> u64 {
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

    /// Every sandbox's container but unclaimed warm-pool ones, ordered by id.
    pub(super) async fn managed_containers(&self) -> Result<Vec<Container>> {
        let mut all = self.all_containers().await?;
        all.retain(|c| !c.labels.contains_key(L_POOL));
        Ok(all)
    }

    /// Every sandbox's container, warm-pool ones included, ordered by id.
    pub(super) async fn all_containers(&self) -> Result<Vec<Container>> {
        let mut containers = self
            .cd
            .containers_labelled(record::L_MANAGED, "true")
            .await?;
        containers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(containers)
    }

    /// ListSandboxes: those matching `selector`, ordered by id, one page.
    pub async fn list(
        &self,
        selector: &LabelSelector,
        page: &Page,
    ) -> Result<(Vec<Sandbox>, String)> {
        let containers: Vec<Container> = self
            .managed_containers()
            .await?
            .into_iter()
            .filter(|c| selector.matches(&record::user_labels(&c.labels)))
            .collect();
        let (containers, next) = page.apply(containers, |c| c.id.as_str());
        let tasks = self.cd.tasks().await?;
        let sandboxes = containers
            .iter()
            .map(|c| self.describe(c, tasks.get(&c.id)))
            .collect();
        Ok((sandboxes, next))
    }

    /// The root of sandbox `id` for file access (see [`SandboxRoot`]).
    pub async fn sandbox_root(&self, id: &SandboxId) -> Result<SandboxRoot> {
        // A missing sandbox is NOT_FOUND at once, without waiting for any lock.
        self.existing(id).await?;
        let running = |t: Option<Task>| {
            t.filter(|t| matches!(t.state, TaskState::Running | TaskState::Paused))
                .map(|t| SandboxRoot::Running(PathBuf::from(format!("/proc/{}/root", t.pid))))
        };
        if let Some(root) = running(self.task(id.as_str()).await?) {
            return Ok(root);
        }
        // One opener at a time per sandbox, so that the others find its mount and share it.
        let _opening = self.locks.lock(&format!("mount:{id}")).await?;
        if let Some(shared) = self.shared_mount(id) {
            return Ok(SandboxRoot::Mounted(shared));
        }
        let guard = self.locks.lock(id.as_str()).await?;
        // Re-read under the lock: it may have been started, restored or deleted meanwhile.
        let container = self.existing(id).await?;
        if let Some(root) = running(self.task(id.as_str()).await?) {
            return Ok(root);
        }
        let mounts = self.cd.mounts(&container.snapshot_key).await?;
        let mount = self.mount_snapshot(&mounts).await?;
        let shared = Arc::new(SharedMount {
            mount,
            _lock: guard,
        });
        let mut map = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, m| m.strong_count() > 0);
        map.insert(id.to_string(), Arc::downgrade(&shared));
        Ok(SandboxRoot::Mounted(shared))
    }

    /// The mount of stopped sandbox `id` that open file accesses hold, to share. None when
    /// there is none, or when another operation (a start, commit or delete) waits for the
    /// sandbox's lock: new accesses then queue behind it instead of keeping it waiting.
    fn shared_mount(&self, id: &SandboxId) -> Option<Arc<SharedMount>> {
        if self.locks.contended(id.as_str()) {
            return None;
        }
        let map = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id.as_str()).and_then(Weak::upgrade)
    }

    /// Mounts a snapshot's `mounts` at a temporary directory, unmounted when the guard drops.
    pub(super) async fn mount_snapshot(
        &self,
        mounts: &[crate::runtime::Mount],
    ) -> Result<sys::MountGuard> {
        let mounts: Vec<sys::MountSpec> = mounts.iter().map(Into::into).collect();
        let base = self.mount_base();
        sys::blocking(move || sys::mount_snapshot(&mounts, &base)).await
    }

    /// Fails when the test-only failpoint `step` is set: it stands in for a real failure of
    /// that step so tests can check that the operation undoes itself.
    pub(super) fn failpoint(&self, step: &str) -> Result<()> {
        if self.cfg.failpoints.iter().any(|f| f == step) {
            return Err(Error::Internal(format!("failpoint {step}")));
        }
        Ok(())
    }

    /// Waits for sandbox `id`'s operation lock: until the guard drops, no create, start, stop,
    /// delete, commit or restore runs on it.
    pub async fn lock(&self, id: &str) -> Result<KeyGuard> {
        self.locks.lock(id).await
    }

    /// Ids of managed sandboxes whose label `key` is `value`.
    pub(super) async fn containers_with_label(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>> {
        Ok(self
            .managed_containers()
            .await?
            .into_iter()
            .filter(|c| c.labels.get(key).is_some_and(|v| v == value))
            .map(|c| c.id)
            .collect())
    }

    /// Sets (`Some`) or removes (`None`) labels of container `id`.
    pub(super) async fn update_labels(
        &self,
        id: &str,
        changes: &[(&str, Option<String>)],
    ) -> Result<()> {
        self.update_container(id, changes, None).await
    }

    /// Sets (`Some`) or removes (`None`) labels of container `id`, and replaces its runtime spec
    /// when `spec` is given, in one update.
    pub(super) async fn update_container(
        &self,
        id: &str,
        changes: &[(&str, Option<String>)],
        spec: Option<Vec<u8>>,
    ) -> Result<()> {
        let update = ContainerUpdate {
            labels: changes
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            spec,
            snapshot_key: None,
            extensions: Vec::new(),
        };
        self.cd.update_container(id, update).await
    }
}

impl Manager {
    /// Serialises calls with the request id of `key`, if there is one.
    pub(super) async fn lock_request(&self, key: Option<&RequestKey>) -> Result<Option<KeyGuard>> {
        match key {
            Some(k) => Ok(Some(self.locks.lock(&format!("request:{}", k.id())).await?)),
            None => Ok(None),
        }
    }
}

/// Runs `fut` on its own task to completion, so that a cancelled caller cannot stop a
/// multi-step operation half-way; awaits its result.
pub(super) async fn run_to_completion<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut)
        .await
        .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?
}

/// Removes `dir` and what it holds; a missing one is fine.
pub(super) async fn remove_dir(dir: &std::path::Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}
