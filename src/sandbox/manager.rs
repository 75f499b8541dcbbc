//! The sandbox lifecycle on containerd. All state lives in containerd (container labels, the
//! task, the writable snapshot); the files under the data dir are derived and rebuilt as needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest, ListContainersRequest,
    ListTasksRequest, ResumeTaskRequest, StartRequest, UpdateContainerRequest, UpdateTaskRequest,
    WaitRequest,
};
use containerd_client::types::v1::{Process, Status as TaskStatus};
use futures::StreamExt;
use tracing::Instrument;

use super::locks::{KeyGuard, KeyedLocks};
use super::model::*;
use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::image;
use crate::net::policy::NetPolicy;
use crate::net::Network;
use crate::runtime::lease::Lease;
use crate::runtime::spec::{self, SandboxSpec, IDLE_INIT_PATH, RESOURCES_TYPE_URL, SPEC_TYPE_URL};
use crate::runtime::{Containerd, SNAPSHOTTER};
use crate::sys;

/// Label marking containers sandboxd manages.
pub const L_MANAGED: &str = "sandboxd.io/managed";
pub(super) const L_IMAGE: &str = "sandboxd.io/image";
pub(super) const L_SNAPSHOT: &str = "sandboxd.io/snapshot";
pub(super) const L_EXPIRES: &str = "sandboxd.io/expires-at";
/// On a warm-pool sandbox not yet handed out: the image it was made for. Hides it from RPCs.
pub(super) const L_POOL: &str = "sandboxd.io/pool";
/// When a warm-pool sandbox was handed out (its creation time as its owner sees it).
pub(super) const L_CLAIMED: &str = "sandboxd.io/claimed-at";
const L_STARTED: &str = "sandboxd.io/started-at";
const L_EXITED: &str = "sandboxd.io/exited-at";
const L_EXIT_STATUS: &str = "sandboxd.io/exit-status";
const L_CPU: &str = "sandboxd.io/cpu-millis";
const L_MEMORY: &str = "sandboxd.io/memory-bytes";
const L_PIDS: &str = "sandboxd.io/pids-limit";
const L_NETWORK: &str = "sandboxd.io/network";
/// The BRIDGE sandbox's address while its network is attached.
const L_NET_IP: &str = "sandboxd.io/net-ip";
const L_NET_GATEWAY: &str = "sandboxd.io/net-gateway";
/// The CNI ADD result (compact JSON), given back to the plugins on DEL.
const L_NET_RESULT: &str = "sandboxd.io/net-result";
/// containerd limits a label to 4096 bytes; a larger CNI result is not cached (DEL works
/// without it).
const MAX_RESULT_LABEL: usize = 3500;
/// Container extension holding a BRIDGE sandbox's [`NetPolicy`] (too large for a label).
const EXT_NET_POLICY: &str = "sandboxd.io/net-policy";
const NET_POLICY_TYPE_URL: &str = "sandboxd.io/NetPolicy";
const L_COMMAND: &str = "sandboxd.io/command";
const L_HOSTNAME: &str = "sandboxd.io/hostname";
/// containerd's GC reference from a sandbox to its image's manifest (the manifest digest).
pub(super) const L_MANIFEST_REF: &str = "containerd.io/gc.ref.content.m";
/// Label on a writable snapshot naming its sandbox.
pub const L_SNAPSHOT_OWNER: &str = "sandboxd.io/sandbox";

/// The runtime shim every sandbox uses.
const RUNTIME: &str = "io.containerd.runc.v2";
/// Default PATH for images that set none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a SIGKILLed sandbox may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Prefix of the snapshot keys used while unpacking layers.
const UNPACK_KEY_PREFIX: &str = "sandboxd-unpack-";

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
        }
    }
}

/// Creates, inspects, starts, stops and deletes sandboxes.
#[derive(Debug)]
pub struct Manager {
    cd: Containerd,
    cfg: ManagerConfig,
    net: Network,
    pub(super) pool: super::pool::WarmPool,
    locks: Arc<KeyedLocks>,
    /// Exec output straight from the process's pipes, when the shim can run the relay.
    pub(super) relay: Option<Arc<super::relay::ExecRelay>>,
}

/// A sandbox's root filesystem as seen from the host, for file access. A running sandbox is
/// reached through its PID 1's root; a stopped one through a temporary mount of its writable
/// snapshot, unmounted (and the sandbox unlocked) when this is dropped.
pub enum SandboxRoot {
    /// `/proc/<pid>/root` of the running PID 1.
    Running(PathBuf),
    /// A temporary mount; holds the sandbox's lock so it cannot start meanwhile.
    Mounted(sys::MountGuard, KeyGuard),
}

impl SandboxRoot {
    /// The directory that is the sandbox's `/`.
    pub fn path(&self) -> &std::path::Path {
        match self {
            SandboxRoot::Running(p) => p,
            SandboxRoot::Mounted(m, _) => m.path(),
        }
    }
}

/// The undo steps of a create, run in reverse when a later step fails.
#[derive(Default)]
struct Undo {
    files: Option<PathBuf>,
    snapshot: Option<String>,
    container: Option<String>,
    task: Option<String>,
}

impl Manager {
    /// A manager on `cd`; call inside the tokio runtime (the exec relay listens on it).
    pub fn new(cd: Containerd, cfg: ManagerConfig, net: Network) -> Arc<Manager> {
        let relay = cfg.exec_io_relay.as_ref().and_then(|binary| {
            let socket = cfg.data_dir.join("exec-relay.sock");
            super::relay::ExecRelay::start(binary, &socket)
                .inspect_err(|e| {
                    tracing::warn!(socket = %socket.display(), error = %e, "exec output relay unavailable; execs use FIFOs")
                })
                .ok()
        });
        Arc::new(Manager {
            relay,
            pool: super::pool::WarmPool::new(cfg.warm_pool.clone()),
            cd,
            cfg,
            net,
            locks: Arc::new(KeyedLocks::default()),
        })
    }

    /// The containerd client.
    pub fn containerd(&self) -> &Containerd {
        &self.cd
    }

    fn files_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id.as_str())
    }

    pub(super) fn exec_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("exec")
    }

    /// Sandbox `id`'s cgroup path (below each controller's mount on v1).
    pub(super) fn sandbox_cgroup(&self, id: &str) -> String {
        format!("{}/{}", self.cfg.cgroup_parent.trim_end_matches('/'), id)
    }

    fn mount_base(&self) -> PathBuf {
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
        let req = GetContainerRequest {
            id: id.as_str().to_string(),
        };
        match self.cd.containers().get(self.cd.req(req)).await {
            Ok(resp) => Ok(resp
                .into_inner()
                .container
                .filter(|c| c.labels.contains_key(L_MANAGED))),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(Error::containerd("containers.get", s)),
        }
    }

    pub(super) async fn task(&self, id: &str) -> Result<Option<Process>> {
        let req = GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        match self.cd.tasks().get(self.cd.req(req)).await {
            Ok(resp) => Ok(resp.into_inner().process),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(Error::containerd("tasks.get", s)),
        }
    }

    /// GetSandbox.
    pub async fn get(&self, id: &SandboxId) -> Result<Sandbox> {
        let container = self
            .container(id)
            .await?
            .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
        let task = self.task(id.as_str()).await?;
        Ok(view(&container, task.as_ref()))
    }

    /// Every sandbox's container but unclaimed warm-pool ones, ordered by id.
    async fn managed_containers(&self) -> Result<Vec<Container>> {
        let mut all = self.all_containers().await?;
        all.retain(|c| !c.labels.contains_key(L_POOL));
        Ok(all)
    }

    /// Every sandbox's container, warm-pool ones included, ordered by id.
    async fn all_containers(&self) -> Result<Vec<Container>> {
        let req = ListContainersRequest {
            filters: vec![format!("labels.\"{L_MANAGED}\"==true")],
        };
        let mut containers = self
            .cd
            .containers()
            .list(self.cd.req(req))
            .await
            .map_err(|s| Error::containerd("containers.list", s))?
            .into_inner()
            .containers;
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
            .filter(|c| selector.matches(&user_labels(&c.labels)))
            .collect();
        let (containers, next) = page.apply(containers, |c| c.id.as_str());
        let tasks = self.tasks_by_container().await?;
        let sandboxes = containers
            .iter()
            .map(|c| view(c, tasks.get(&c.id)))
            .collect();
        Ok((sandboxes, next))
    }

    /// The root of sandbox `id` for file access (see [`SandboxRoot`]).
    pub async fn sandbox_root(&self, id: &SandboxId) -> Result<SandboxRoot> {
        let container = self
            .container(id)
            .await?
            .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
        if let Some(t) = self.task(id.as_str()).await? {
            if t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Paused as i32 {
                return Ok(SandboxRoot::Running(PathBuf::from(format!(
                    "/proc/{}/root",
                    t.pid
                ))));
            }
        }
        let guard = self.locks.lock(id.as_str()).await;
        // Re-check under the lock: it may have started while we waited.
        if let Some(t) = self.task(id.as_str()).await? {
            if t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Paused as i32 {
                return Ok(SandboxRoot::Running(PathBuf::from(format!(
                    "/proc/{}/root",
                    t.pid
                ))));
            }
        }
        let mounts = self
            .cd
            .snapshots()
            .mounts(self.cd.req(MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: container.snapshot_key.clone(),
            }))
            .await
            .map_err(|s| Error::containerd("snapshots.mounts", s))?
            .into_inner()
            .mounts;
        let mounts: Vec<sys::MountSpec> = mounts.iter().map(Into::into).collect();
        let base = self.mount_base();
        let mount = sys::blocking(move || sys::mount_snapshot(&mounts, &base)).await?;
        Ok(SandboxRoot::Mounted(mount, guard))
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
    pub async fn lock(&self, id: &str) -> KeyGuard {
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

    pub(super) async fn remove_snapshot_key(&self, key: &str) -> Result<()> {
        self.remove_snapshot(key).await
    }

    /// Gives sandbox `id` a new writable snapshot on `parent_chain` (a restore): prepared first,
    /// so that a failure before the swap leaves the sandbox untouched; then the task is stopped,
    /// the container switched over, and the old writable snapshot removed.
    pub(super) async fn swap_rootfs(
        &self,
        id: &SandboxId,
        container: &Container,
        new_key: &str,
        parent_chain: &str,
        snapshot_id: &str,
        lease: &Lease,
    ) -> Result<()> {
        let prepare = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: new_key.to_string(),
            parent: parent_chain.to_string(),
            labels: [(L_SNAPSHOT_OWNER.to_string(), id.to_string())].into(),
        };
        self.cd
            .snapshots()
            .prepare(self.cd.req_leased(prepare, lease.id()))
            .await
            .map_err(|s| Error::containerd("snapshots.prepare", s))?;
        self.kill_and_delete_task(id.as_str(), Some(container))
            .await?;
        self.failpoint("restore.swap")?;
        let labels = HashMap::from([(L_SNAPSHOT.to_string(), snapshot_id.to_string())]);
        let req = UpdateContainerRequest {
            container: Some(Container {
                id: id.to_string(),
                snapshot_key: new_key.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["snapshotkey".into(), format!("labels.{L_SNAPSHOT}")],
            }),
        };
        self.cd
            .containers()
            .update(self.cd.req(req))
            .await
            .map_err(|s| Error::containerd("containers.update", s))?;
        if let Err(e) = self.remove_snapshot(&container.snapshot_key).await {
            tracing::warn!(error = %e, key = %container.snapshot_key, "removing the replaced writable snapshot failed");
        }
        Ok(())
    }

    // ---- create ----

    /// CreateSandbox. Runs to completion (or full undo) even if the caller goes away.
    pub async fn create(self: &Arc<Self>, spec: CreateSpec) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("create_sandbox", sandbox_id = %spec.id);
        detach(
            async move {
                if let Some(sandbox) = this.claim_pooled(&spec).await? {
                    return Ok(sandbox);
                }
                this.create_inner(spec).await
            }
            .instrument(span),
        )
        .await
    }

    async fn create_inner(&self, spec: CreateSpec) -> Result<Sandbox> {
        let _guard = self.locks.lock(spec.id.as_str()).await;
        // The id check and the source's resolution are independent: one round trip. A snapshot
        // is resolved from its image record alone; a missing image is pulled only once the id
        // is known to be free.
        let resolve = async {
            match &spec.source {
                Source::Image(image) => (
                    image::resolve(&self.cd, image).await.map(Into::into),
                    image.name(),
                ),
                Source::Snapshot(snapshot) => match self.resolve_snapshot(snapshot).await {
                    Ok((snap, image)) => (Ok(image), snap.image),
                    Err(e) => (Err(e), String::new()),
                },
            }
        };
        let (existing, (resolved, base_image)) = tokio::join!(self.container(&spec.id), resolve);
        if existing?.is_some() {
            return Err(Error::AlreadyExists {
                kind: Kind::Sandbox,
                id: spec.id.to_string(),
            });
        }
        let image = match (resolved, &spec.source) {
            (Ok(image), _) => image,
            (Err(Error::NotFound { .. }), Source::Image(image_ref)) => {
                tracing::info!(image = %image_ref, "pulling a missing image");
                image::pull(&self.cd, image_ref, None).await?;
                image::resolve(&self.cd, image_ref).await?.into()
            }
            (Err(e), _) => return Err(e),
        };

        let lease = Lease::acquire(&self.cd, "create").await?;
        let mut undo = Undo::default();
        let result = self
            .create_steps(&spec, &image, &base_image, &lease, &mut undo)
            .await;
        let released = lease.release(&self.cd).await;
        match result {
            Ok(()) => {
                if let Err(e) = released {
                    tracing::warn!(error = %e, "releasing the create lease failed; it will expire");
                }
                if spec.pool.is_some() {
                    // Hidden from get() until claimed.
                    let container = self
                        .any_container(&spec.id)
                        .await?
                        .ok_or_else(|| Error::not_found(Kind::Sandbox, spec.id.as_str()))?;
                    let task = self.task(spec.id.as_str()).await?;
                    return Ok(view(&container, task.as_ref()));
                }
                self.get(&spec.id).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "create failed; undoing");
                let cleanup = self.undo(undo).await;
                Err(e.with_cleanup(cleanup))
            }
        }
    }

    async fn create_steps(
        &self,
        spec: &CreateSpec,
        image: &image::RunImage,
        base_image: &str,
        lease: &Lease,
        undo: &mut Undo,
    ) -> Result<()> {
        let id = &spec.id;
        let files = self.files_dir(id);
        undo.files = Some(files.clone());
        let bridge = spec.network == NetworkMode::Bridge;
        if !bridge {
            // A BRIDGE sandbox's files are written when its network is attached.
            let resolv = self.net.resolv_conf();
            write_etc_files(&files, &spec.hostname, None, &resolv.text).await?;
        }

        let key = format!("sandboxd-rw-{id}-{}", crate::util::random_hex(4));
        let prepare = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
            parent: image.top_chain_id.clone(),
            labels: [(L_SNAPSHOT_OWNER.to_string(), id.to_string())].into(),
        };
        let mounts = self
            .cd
            .snapshots()
            .prepare(self.cd.req_leased(prepare, lease.id()))
            .await
            .map_err(|s| Error::containerd("snapshots.prepare", s))?
            .into_inner()
            .mounts;
        undo.snapshot = Some(key.clone());

        let config = &image.run_config;
        let user_spec = spec
            .user
            .clone()
            .or_else(|| config.user().clone().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "0".to_string());
        let user = if sys::user_needs_lookup(&user_spec) {
            let mounts: Vec<sys::MountSpec> = mounts.iter().map(Into::into).collect();
            let base = self.mount_base();
            sys::blocking(move || {
                let root = sys::mount_snapshot(&mounts, &base)?;
                sys::resolve_user("user", &user_spec, Some(root.path()))
            })
            .await?
        } else {
            sys::resolve_user("user", &user_spec, None)?
        };

        let mut env: Vec<String> = config.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        spec::merge_env(&mut env, &spec.env);
        let idle = spec.command.is_empty();
        let args = if idle {
            vec![IDLE_INIT_PATH.to_string(), "-P".to_string()]
        } else {
            spec.command.clone()
        };
        let cwd = spec
            .working_dir
            .clone()
            .or_else(|| config.working_dir().clone().filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".to_string());
        let runtime_spec = spec::build(&SandboxSpec {
            args: args.clone(),
            env,
            cwd,
            user,
            hostname: spec.hostname.clone(),
            cgroups_path: self.sandbox_cgroup(id.as_str()),
            cpu_millis: spec.resources.cpu_millis,
            memory_bytes: spec.resources.memory_bytes,
            pids_limit: spec.resources.pids(),
            etc_dir: files.clone(),
            idle_init: idle.then(|| self.cfg.idle_init.clone()),
            netns_path: bridge.then(|| self.net.netns_path(id.as_str())),
        })?;
        if idle && !self.cfg.idle_init.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "the idle init {} is not installed on this node; install catatonit or pass a command",
                self.cfg.idle_init.display()
            )));
        }

        let now = SystemTime::now();
        let mut labels = spec.labels.clone();
        labels.insert(L_MANAGED.into(), "true".into());
        labels.insert(L_IMAGE.into(), base_image.to_string());
        if let Some(pool) = &spec.pool {
            labels.insert(L_POOL.into(), pool.clone());
        }
        if let Source::Snapshot(snapshot) = &spec.source {
            labels.insert(L_SNAPSHOT.into(), snapshot.clone());
        }
        // Pins the image's manifest (and through its labels config and layers) against GC for
        // as long as the sandbox exists, so that a snapshot of it can still be made an image.
        labels.insert(L_MANIFEST_REF.into(), image.manifest_digest.clone());
        labels.insert(L_HOSTNAME.into(), spec.hostname.clone());
        labels.insert(L_NETWORK.into(), spec.network.as_str().into());
        labels.insert(
            L_COMMAND.into(),
            serde_json::to_string(&args).unwrap_or_default(),
        );
        labels.extend(
            resource_labels(&spec.resources)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        if let Some(ttl) = spec.ttl {
            labels.insert(L_EXPIRES.into(), crate::util::rfc3339(now + ttl));
        }
        if spec.start {
            labels.insert(L_STARTED.into(), crate::util::rfc3339(now));
        }
        let mut extensions = HashMap::new();
        if bridge {
            extensions.insert(
                EXT_NET_POLICY.to_string(),
                prost_types::Any {
                    type_url: NET_POLICY_TYPE_URL.into(),
                    value: serde_json::to_vec(&spec.net_policy).map_err(|e| {
                        Error::Internal(format!("encoding the network policy: {e}"))
                    })?,
                },
            );
        }
        let container = Container {
            id: id.to_string(),
            labels,
            extensions,
            image: image.name.clone(),
            runtime: Some(Runtime {
                name: RUNTIME.into(),
                options: Some(spec::runc_options(&self.cfg.runc_root)),
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: runtime_spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: key.clone(),
            ..Default::default()
        };
        self.cd
            .containers()
            .create(self.cd.req_leased(
                CreateContainerRequest {
                    container: Some(container),
                },
                lease.id(),
            ))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::AlreadyExists => Error::AlreadyExists {
                    kind: Kind::Sandbox,
                    id: id.to_string(),
                },
                _ => Error::containerd("containers.create", s),
            })?;
        undo.container = Some(id.to_string());

        if spec.start {
            undo.task = Some(id.to_string());
            self.failpoint("create.start")?;
            // The prepared mounts and a started-at label written with the container save two
            // round trips on the hot path; a failed start undoes the container anyway.
            let net = bridge.then(|| NetCtx {
                policy: &spec.net_policy,
                hostname: &spec.hostname,
            });
            self.run_task(id, mounts, net).await?;
        }
        Ok(())
    }

    async fn undo(&self, undo: Undo) -> Result<()> {
        let mut first_err = Ok(());
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::error!(error = %e, "undo step failed");
                if first_err.is_ok() {
                    first_err = Err(e);
                }
            }
        };
        if let Some(id) = &undo.task {
            note(self.kill_and_delete_task(id, None).await);
        }
        if let Some(key) = &undo.snapshot {
            note(self.remove_snapshot(key).await);
        }
        if let Some(id) = &undo.container {
            note(self.delete_container(id).await);
        }
        if let Some(dir) = &undo.files {
            note(remove_dir(dir).await);
        }
        first_err
    }

    // ---- start / stop ----

    /// StartSandbox: starts a created or stopped sandbox; a running one is returned unchanged.
    pub async fn start(self: &Arc<Self>, id: SandboxId) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("start_sandbox", sandbox_id = %id);
        detach(
            async move {
                let _guard = this.locks.lock(id.as_str()).await;
                let container = this
                    .container(&id)
                    .await?
                    .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
                match this.task(id.as_str()).await? {
                    Some(t) if t.status == TaskStatus::Running as i32 => {
                        return this.get(&id).await
                    }
                    Some(t)
                        if t.status == TaskStatus::Paused as i32
                            || t.status == TaskStatus::Pausing as i32 =>
                    {
                        return Err(Error::FailedPrecondition(format!("sandbox {id} is paused")));
                    }
                    Some(_) => this.finish_task(&id, &container).await?,
                    None => this.detach_network(id.as_str(), Some(&container)).await?,
                }
                if let Err(e) = this
                    .start_task_of(&id, &container, &container.snapshot_key)
                    .await
                {
                    let cleanup = this
                        .kill_and_delete_task(id.as_str(), Some(&container))
                        .await;
                    return Err(e.with_cleanup(cleanup));
                }
                this.get(&id).await
            }
            .instrument(span),
        )
        .await
    }

    /// Starts sandbox `id`'s task on the writable snapshot `snapshot_key`.
    pub(super) async fn start_task(&self, id: &SandboxId, snapshot_key: &str) -> Result<u32> {
        let container = self
            .container(id)
            .await?
            .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
        self.start_task_of(id, &container, snapshot_key).await
    }

    async fn start_task_of(
        &self,
        id: &SandboxId,
        container: &Container,
        snapshot_key: &str,
    ) -> Result<u32> {
        let hostname = container
            .labels
            .get(L_HOSTNAME)
            .map_or(id.as_str(), |h| h.as_str());
        let policy = net_policy(container);
        if policy.is_none() {
            let resolv = self.net.resolv_conf();
            write_etc_files(&self.files_dir(id), hostname, None, &resolv.text).await?;
        }
        let mounts = self
            .cd
            .snapshots()
            .mounts(self.cd.req(MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: snapshot_key.to_string(),
            }))
            .await
            .map_err(|s| Error::containerd("snapshots.mounts", s))?
            .into_inner()
            .mounts;
        let net = policy.as_ref().map(|policy| NetCtx { policy, hostname });
        let pid = self.run_task(id, mounts, net).await?;
        let now = crate::util::rfc3339(SystemTime::now());
        self.update_labels(
            id.as_str(),
            &[
                (L_STARTED, Some(now)),
                (L_EXITED, None),
                (L_EXIT_STATUS, None),
            ],
        )
        .await?;
        Ok(pid)
    }

    /// Creates and starts the task on `mounts` (the writable snapshot's); returns PID 1's pid.
    /// A BRIDGE sandbox (`net`) has its network attached first, so PID 1 never sees it
    /// half-made; if the task then fails to start, the network is detached again.
    async fn run_task(
        &self,
        id: &SandboxId,
        mounts: Vec<containerd_client::types::Mount>,
        net: Option<NetCtx<'_>>,
    ) -> Result<u32> {
        let Some(net) = net else {
            return self.create_and_start_task(id, mounts).await;
        };
        self.attach_network(id, &net).await?;
        match self.create_and_start_task(id, mounts).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let cleanup = self.kill_and_delete_task(id.as_str(), None).await;
                Err(e.with_cleanup(cleanup))
            }
        }
    }

    /// Attaches a BRIDGE sandbox's network and records its address; undone on failure.
    async fn attach_network(&self, id: &SandboxId, net: &NetCtx<'_>) -> Result<()> {
        let _ports = if net.policy.ports.is_empty() {
            None
        } else {
            let guard = self.net.port_lock().await;
            self.check_ports_free(id, &net.policy.ports).await?;
            Some(guard)
        };
        let resolv = self.net.resolv_conf();
        let attached = self
            .net
            .attach(id.as_str(), net.policy, &resolv.nameservers)
            .await?;
        let recorded = async {
            write_etc_files(
                &self.files_dir(id),
                net.hostname,
                Some(attached.ip),
                &resolv.text,
            )
            .await?;
            let result = serde_json::to_string(&attached.result).unwrap_or_default();
            self.update_labels(
                id.as_str(),
                &[
                    (L_NET_IP, Some(attached.ip.to_string())),
                    (L_NET_GATEWAY, attached.gateway.map(|g| g.to_string())),
                    (
                        L_NET_RESULT,
                        (result.len() <= MAX_RESULT_LABEL).then_some(result),
                    ),
                ],
            )
            .await
        }
        .await;
        if let Err(e) = recorded {
            let cleanup = self
                .net
                .detach(id.as_str(), Some(&attached.result), &net.policy.ports)
                .await;
            return Err(e.with_cleanup(cleanup));
        }
        Ok(())
    }

    /// FAILED_PRECONDITION when another attached sandbox forwards one of `ports` already.
    async fn check_ports_free(
        &self,
        id: &SandboxId,
        ports: &[crate::net::cni::PortMapping],
    ) -> Result<()> {
        for c in self.managed_containers().await? {
            if c.id == id.as_str() || !c.labels.contains_key(L_NET_IP) {
                continue;
            }
            let Some(other) = net_policy(&c) else {
                continue;
            };
            for p in ports {
                let clash = other.ports.iter().find(|q| {
                    q.host_port == p.host_port
                        && q.protocol == p.protocol
                        && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
                });
                if clash.is_some() {
                    return Err(Error::FailedPrecondition(format!(
                        "host port {}/{} is already forwarded to sandbox {}",
                        p.host_port,
                        crate::net::policy::protocol_name(p.protocol),
                        c.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Tears down sandbox `id`'s network if it has one (see [`Network::detach`]) and forgets
    /// its address.
    async fn detach_network(&self, id: &str, container: Option<&Container>) -> Result<()> {
        if !self.net.is_attached(id) {
            return Ok(());
        }
        let cached: Option<serde_json::Value> = container
            .and_then(|c| c.labels.get(L_NET_RESULT))
            .and_then(|r| serde_json::from_str(r).ok());
        let ports = container
            .and_then(net_policy)
            .map(|p| p.ports)
            .unwrap_or_default();
        self.net.detach(id, cached.as_ref(), &ports).await?;
        match self
            .update_labels(
                id,
                &[
                    (L_NET_IP, None),
                    (L_NET_GATEWAY, None),
                    (L_NET_RESULT, None),
                ],
            )
            .await
        {
            Err(Error::Containerd { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(())
            }
            other => other,
        }
    }

    async fn create_and_start_task(
        &self,
        id: &SandboxId,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<u32> {
        let create = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            ..Default::default()
        };
        self.cd
            .tasks()
            .create(self.cd.req(create))
            .await
            .map_err(|s| task_error("tasks.create", s))?;
        let pid = self
            .cd
            .tasks()
            .start(self.cd.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| task_error("tasks.start", s))?
            .into_inner()
            .pid;
        Ok(pid)
    }

    /// StopSandbox: `signal` to PID 1, wait `timeout`; then SIGKILL to everything if `force`,
    /// else DEADLINE_EXCEEDED with the sandbox still running.
    pub async fn stop(
        self: &Arc<Self>,
        id: SandboxId,
        signal: i32,
        timeout: Duration,
        force: bool,
    ) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("stop_sandbox", sandbox_id = %id);
        detach(async move {
            let _guard = this.locks.lock(id.as_str()).await;
            let container = this.container(&id).await?.ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
            let Some(task) = this.task(id.as_str()).await? else {
                // A teardown that failed before is finished now.
                this.detach_network(id.as_str(), Some(&container)).await?;
                return this.get(&id).await;
            };
            if task.status == TaskStatus::Paused as i32 || task.status == TaskStatus::Pausing as i32 {
                this.resume(id.as_str()).await?;
            }
            if task.status == TaskStatus::Running as i32 || task.status == TaskStatus::Paused as i32 {
                this.kill(id.as_str(), signal as u32, false).await?;
                if !this.wait_exit(id.as_str(), timeout).await? {
                    if !force {
                        return Err(Error::DeadlineExceeded(format!(
                            "sandbox {id} did not exit within {timeout:?} of signal {signal}; retry with force to SIGKILL it"
                        )));
                    }
                    this.kill(id.as_str(), libc::SIGKILL as u32, true).await?;
                    if !this.wait_exit(id.as_str(), KILL_WAIT).await? {
                        return Err(Error::Internal(format!("sandbox {id} survived SIGKILL for {KILL_WAIT:?}")));
                    }
                }
            }
            this.finish_task(&id, &container).await?;
            this.get(&id).await
        }.instrument(span))
        .await
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let req = KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal,
            all,
        };
        match self.cd.tasks().kill(self.cd.req(req)).await {
            Ok(_) => Ok(()),
            // Already gone: nothing to signal.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                Ok(())
            }
            Err(s) => Err(Error::containerd("tasks.kill", s)),
        }
    }

    async fn resume(&self, id: &str) -> Result<()> {
        match self
            .cd
            .tasks()
            .resume(self.cd.req(ResumeTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                Ok(())
            }
            Err(s) => Err(Error::containerd("tasks.resume", s)),
        }
    }

    /// Waits up to `timeout` for PID 1 to exit; false on timeout.
    async fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool> {
        let req = WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        let mut tasks = self.cd.tasks();
        match tokio::time::timeout(timeout, tasks.wait(self.cd.req(req))).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(true),
            Ok(Err(s)) => Err(Error::containerd("tasks.wait", s)),
        }
    }

    /// Deletes an exited task, tears its network down and records its exit status in the
    /// container's labels.
    async fn finish_task(&self, id: &SandboxId, container: &Container) -> Result<()> {
        let resp = match self
            .cd
            .tasks()
            .delete(self.cd.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return self.detach_network(id.as_str(), Some(container)).await
            }
            Err(s) => return Err(Error::containerd("tasks.delete", s)),
        };
        self.detach_network(id.as_str(), Some(container)).await?;
        let exited = resp
            .exited_at
            .map(|t| crate::util::system_time(&t))
            .unwrap_or_else(SystemTime::now);
        self.update_labels(
            id.as_str(),
            &[
                (L_EXITED, Some(crate::util::rfc3339(exited))),
                (L_EXIT_STATUS, Some(resp.exit_status.to_string())),
            ],
        )
        .await
    }

    /// Kills and deletes sandbox `id`'s task, whatever its state, then tears its network down
    /// (given the container when at hand, for the cached CNI result).
    pub(super) async fn kill_and_delete_task(
        &self,
        id: &str,
        container: Option<&Container>,
    ) -> Result<()> {
        if let Some(task) = self.task(id).await? {
            self.kill_and_delete(id, &task).await?;
        }
        self.detach_network(id, container).await
    }

    async fn kill_and_delete(&self, id: &str, task: &Process) -> Result<()> {
        // A frozen task cannot die: thaw it first.
        if task.status == TaskStatus::Paused as i32 || task.status == TaskStatus::Pausing as i32 {
            self.resume(id).await?;
        }
        self.kill(id, libc::SIGKILL as u32, true).await?;
        self.wait_exit(id, KILL_WAIT).await?;
        match self
            .cd
            .tasks()
            .delete(self.cd.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(Error::containerd("tasks.delete", s)),
        }
    }

    pub(super) async fn update_labels(
        &self,
        id: &str,
        changes: &[(&str, Option<String>)],
    ) -> Result<()> {
        self.update_container(id, changes, None).await
    }

    /// Applies `resources` (a `LinuxResources` as JSON) to the running task of sandbox `id`.
    pub(super) async fn update_task_resources(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(prost_types::Any {
                type_url: RESOURCES_TYPE_URL.into(),
                value: resources,
            }),
            annotations: HashMap::new(),
        };
        self.cd
            .tasks()
            .update(self.cd.req(req))
            .await
            .map_err(|s| Error::containerd("tasks.update", s))?;
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) labels of container `id`, and replaces its runtime spec
    /// when `spec` is given, in one update.
    pub(super) async fn update_container(
        &self,
        id: &str,
        changes: &[(&str, Option<String>)],
        spec: Option<Vec<u8>>,
    ) -> Result<()> {
        let labels = changes
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
            .collect();
        let mut paths: Vec<String> = changes.iter().map(|(k, _)| format!("labels.{k}")).collect();
        if spec.is_some() {
            paths.push("spec".into());
        }
        let req = UpdateContainerRequest {
            container: Some(Container {
                id: id.to_string(),
                labels,
                spec: spec.map(|value| prost_types::Any {
                    type_url: SPEC_TYPE_URL.into(),
                    value,
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.cd
            .containers()
            .update(self.cd.req(req))
            .await
            .map_err(|s| Error::containerd("containers.update", s))?;
        Ok(())
    }

    // ---- delete ----

    /// DeleteSandbox: task, writable snapshot, container, files. A running sandbox needs `force`.
    pub async fn delete(self: &Arc<Self>, id: SandboxId, force: bool) -> Result<()> {
        let this = self.clone();
        let span = tracing::info_span!("delete_sandbox", sandbox_id = %id);
        detach(
            async move {
                let _guard = this.locks.lock(id.as_str()).await;
                let container = this
                    .container(&id)
                    .await?
                    .ok_or_else(|| Error::not_found(Kind::Sandbox, id.as_str()))?;
                this.delete_locked(&id, &container, force).await
            }
            .instrument(span),
        )
        .await
    }

    /// Force-deletes sandbox `id` whatever it is, a warm-pool one included; a missing one is
    /// fine.
    pub(super) async fn delete_any(&self, id: SandboxId) -> Result<()> {
        let _guard = self.locks.lock(id.as_str()).await;
        match self.any_container(&id).await? {
            Some(container) => self.delete_locked(&id, &container, true).await,
            None => Ok(()),
        }
    }

    async fn delete_locked(
        &self,
        id: &SandboxId,
        container: &Container,
        force: bool,
    ) -> Result<()> {
        if let Some(task) = self.task(id.as_str()).await? {
            let live = task.status != TaskStatus::Stopped as i32;
            if live && !force {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is running; stop it first or delete with force"
                )));
            }
            self.kill_and_delete_task(id.as_str(), Some(container))
                .await?;
        }
        // A network whose earlier teardown failed goes now, before what identifies it.
        self.detach_network(id.as_str(), Some(container)).await?;
        // Snapshot before container: an interrupted delete leaves a container to delete again,
        // never an orphaned snapshot.
        self.remove_snapshot(&container.snapshot_key).await?;
        self.delete_container(id.as_str()).await?;
        remove_dir(&self.files_dir(id)).await
    }

    async fn remove_snapshot(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Ok(());
        }
        let req = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
        };
        match self.cd.snapshots().remove(self.cd.req(req)).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(Error::containerd("snapshots.remove", s)),
        }
    }

    async fn delete_container(&self, id: &str) -> Result<()> {
        match self
            .cd
            .containers()
            .delete(self.cd.req(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(Error::containerd("containers.delete", s)),
        }
    }

    // ---- background duties ----

    /// Deletes every sandbox whose TTL has passed; returns how many.
    pub async fn reap_expired(self: &Arc<Self>) -> Result<usize> {
        let now = SystemTime::now();
        let mut reaped = 0;
        for c in self.managed_containers().await? {
            let expired = c
                .labels
                .get(L_EXPIRES)
                .and_then(|v| crate::util::parse_rfc3339(v))
                .is_some_and(|t| t <= now);
            if !expired {
                continue;
            }
            let Ok(id) = SandboxId::parse("sandbox_id", &c.id) else {
                continue;
            };
            match self.delete(id.clone(), true).await {
                Ok(()) | Err(Error::NotFound { .. }) => {
                    tracing::info!(sandbox_id = %id, "deleted an expired sandbox");
                    reaped += 1;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "deleting an expired sandbox failed")
                }
            }
        }
        Ok(reaped)
    }

    /// Tears down the networks of BRIDGE sandboxes whose task is gone or has exited. Exit
    /// events ([`Manager::watch_exits`]) do this at once; this sweep catches what they miss
    /// (sandboxd down at the time, a dropped subscription, an interrupted create).
    pub async fn reconcile_networks(&self) -> Result<()> {
        let attached = self.net.attached_ids();
        if attached.is_empty() {
            return Ok(());
        }
        let live = self.live_task_ids().await?;
        for id in attached.iter().filter(|id| !live.contains(*id)) {
            match SandboxId::parse("sandbox_id", id) {
                Ok(id) => self.settle_network(&id).await?,
                Err(_) => {
                    tracing::warn!(netns = %id, "a network namespace with a malformed sandbox id; left alone")
                }
            }
        }
        Ok(())
    }

    /// Every task of the namespace, by container id.
    async fn tasks_by_container(&self) -> Result<HashMap<String, Process>> {
        Ok(self
            .cd
            .tasks()
            .list(self.cd.req(ListTasksRequest {
                filter: String::new(),
            }))
            .await
            .map_err(|s| Error::containerd("tasks.list", s))?
            .into_inner()
            .tasks
            .into_iter()
            .map(|t| {
                // containerd's ListTasks fills in the task id, not container_id (they are equal).
                let id = if t.container_id.is_empty() {
                    t.id.clone()
                } else {
                    t.container_id.clone()
                };
                (id, t)
            })
            .collect())
    }

    async fn live_task_ids(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .tasks_by_container()
            .await?
            .into_iter()
            .filter(|(_, t)| {
                t.status == TaskStatus::Running as i32
                    || t.status == TaskStatus::Paused as i32
                    || t.status == TaskStatus::Pausing as i32
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// Detaches sandbox `id`'s network unless its task runs (checked under its lock, so a
    /// start in progress is never disturbed).
    async fn settle_network(&self, id: &SandboxId) -> Result<()> {
        let _guard = self.locks.lock(id.as_str()).await;
        if !self.net.is_attached(id.as_str()) {
            return Ok(());
        }
        if let Some(t) = self.task(id.as_str()).await? {
            if t.status != TaskStatus::Stopped as i32 && t.status != TaskStatus::Unknown as i32 {
                return Ok(());
            }
        }
        let container = self.container(id).await?;
        tracing::info!(sandbox_id = %id, "tearing down the network of an exited sandbox");
        self.detach_network(id.as_str(), container.as_ref()).await
    }

    /// Follows containerd's task-exit events and tears down the network of each BRIDGE
    /// sandbox whose PID 1 exited by itself, until `stop` changes. Resubscribes after errors.
    pub async fn watch_exits(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        use containerd_client::services::v1::SubscribeRequest;
        use prost::Message;
        let filter = format!(
            "namespace==\"{}\",topic==\"/tasks/exit\"",
            self.cd.namespace()
        );
        loop {
            let mut events = self.cd.events();
            // containerd sends the response headers with the first event, so even subscribing
            // waits until something exits: never past a shutdown.
            let subscribed = tokio::select! {
                s = events.subscribe(self.cd.req(SubscribeRequest {
                    filters: vec![filter.clone()],
                })) => s,
                _ = stop.changed() => return,
            };
            if let Ok(stream) = subscribed {
                let mut stream = stream.into_inner();
                loop {
                    let envelope = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.changed() => return,
                    };
                    let Ok(Some(envelope)) = envelope else { break };
                    let Some(exit) = envelope.event.and_then(|any| {
                        containerd_client::events::TaskExit::decode(any.value.as_slice()).ok()
                    }) else {
                        continue;
                    };
                    // Only PID 1's exit (its exec id is the container id) ends the sandbox.
                    if exit.id != exit.container_id || !self.net.is_attached(&exit.container_id) {
                        continue;
                    }
                    let Ok(id) = SandboxId::parse("sandbox_id", &exit.container_id) else {
                        continue;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.settle_network(&id).await {
                            tracing::warn!(sandbox_id = %id, error = %e, "tearing down the network after exit failed; the sweep will retry");
                        }
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// After a restart: removes what an interrupted operation left behind (writable snapshots
    /// without a container, unpack snapshots, files of sandboxes that are gone).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let containers = self.all_containers().await?;
        let keys: std::collections::HashSet<&str> =
            containers.iter().map(|c| c.snapshot_key.as_str()).collect();
        let req = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        };
        let mut stream = self
            .cd
            .snapshots()
            .list(self.cd.req(req))
            .await
            .map_err(|s| Error::containerd("snapshots.list", s))?
            .into_inner();
        let mut orphans = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|s| Error::containerd("snapshots.list", s))?;
            for info in batch.info {
                let ours = info.labels.contains_key(L_SNAPSHOT_OWNER)
                    || info.name.starts_with(UNPACK_KEY_PREFIX);
                if ours && !keys.contains(info.name.as_str()) {
                    orphans.push(info.name);
                }
            }
        }
        for key in orphans {
            tracing::info!(snapshot = %key, "removing a snapshot left by an interrupted operation");
            if let Err(e) = self.remove_snapshot(&key).await {
                tracing::warn!(snapshot = %key, error = %e, "could not remove a leftover snapshot");
            }
        }
        self.reconcile_networks().await?;
        let attached = self.net.attached_ids();
        if let Err(e) = self.net.sweep_firewall(&attached).await {
            tracing::debug!(error = %e, "no egress chains swept");
        }
        let ids: std::collections::HashSet<&str> =
            containers.iter().map(|c| c.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("sandboxes")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !ids.contains(name.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.adopt_pool(&containers).await?;
        Ok(())
    }
}

/// What [`Manager::run_task`] needs to attach a BRIDGE sandbox's network.
struct NetCtx<'a> {
    policy: &'a NetPolicy,
    hostname: &'a str,
}

/// A BRIDGE sandbox's policy, from its container; `None` for NONE sandboxes.
fn net_policy(c: &Container) -> Option<NetPolicy> {
    if c.labels.get(L_NETWORK).map(String::as_str) != Some(NetworkMode::Bridge.as_str()) {
        return None;
    }
    Some(
        c.extensions
            .get(EXT_NET_POLICY)
            .and_then(|any| serde_json::from_slice(&any.value).ok())
            .unwrap_or_default(),
    )
}

/// Runs `fut` on its own task so that a cancelled caller cannot stop it half-way.
pub(super) async fn detach<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut)
        .await
        .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?
}

/// Task errors caused by the request (a missing program, a bad working dir) are the caller's.
fn task_error(op: &'static str, s: tonic::Status) -> Error {
    let msg = s.message();
    if msg.contains("executable file not found")
        || msg.contains("no such file or directory") && msg.contains("exec")
    {
        Error::invalid("command", msg.to_string())
    } else if msg.contains("chdir") || msg.contains("cwd") {
        Error::invalid("working_dir", msg.to_string())
    } else {
        Error::containerd(op, s)
    }
}

/// The labels recording a sandbox's limits: the pids limit that applies, CPU and memory when set.
pub(super) fn resource_labels(r: &Resources) -> Vec<(&'static str, String)> {
    let mut labels = vec![(L_PIDS, r.pids().to_string())];
    labels.extend(r.cpu_millis.map(|c| (L_CPU, c.to_string())));
    labels.extend(r.memory_bytes.map(|m| (L_MEMORY, m.to_string())));
    labels
}

fn user_labels(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !RESERVED_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn view(c: &Container, task: Option<&Process>) -> Sandbox {
    let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
    let time = |k: &str| c.labels.get(k).and_then(|v| crate::util::parse_rfc3339(v));
    let num = |k: &str| c.labels.get(k).and_then(|v| v.parse::<i64>().ok());
    let (state, pid, exit_status, exited_at) = match task {
        Some(t) => match TaskStatus::try_from(t.status).unwrap_or(TaskStatus::Unknown) {
            TaskStatus::Created => (State::Created, t.pid, None, None),
            TaskStatus::Running => (State::Running, t.pid, None, None),
            TaskStatus::Paused | TaskStatus::Pausing => (State::Paused, t.pid, None, None),
            TaskStatus::Stopped => (
                State::Stopped,
                0,
                Some(t.exit_status as i32),
                t.exited_at.as_ref().map(crate::util::system_time),
            ),
            TaskStatus::Unknown => (State::Unknown, t.pid, None, None),
        },
        None if c.labels.contains_key(L_STARTED) => (
            State::Stopped,
            0,
            num(L_EXIT_STATUS).map(|s| s as i32),
            time(L_EXITED),
        ),
        None => (State::Created, 0, None, None),
    };
    Sandbox {
        id: SandboxId::parse("sandbox_id", &c.id).unwrap_or_else(|_| SandboxId::generate()),
        image: label(L_IMAGE),
        snapshot_id: label(L_SNAPSHOT),
        state,
        pid,
        exit_status,
        labels: user_labels(&c.labels),
        resources: Resources {
            cpu_millis: num(L_CPU),
            memory_bytes: num(L_MEMORY),
            pids_limit: num(L_PIDS),
        },
        network: if label(L_NETWORK) == "bridge" {
            NetworkMode::Bridge
        } else {
            NetworkMode::None
        },
        ip_address: label(L_NET_IP),
        gateway: label(L_NET_GATEWAY),
        net_policy: net_policy(c),
        command: serde_json::from_str(&label(L_COMMAND)).unwrap_or_default(),
        hostname: label(L_HOSTNAME),
        created_at: time(L_CLAIMED).or_else(|| c.created_at.as_ref().map(crate::util::system_time)),
        started_at: time(L_STARTED),
        expires_at: time(L_EXPIRES),
        exited_at,
    }
}

/// Writes the sandbox's /etc/hosts (naming its hostname and, on a bridge, its `ip`),
/// /etc/hostname and /etc/resolv.conf sources.
async fn write_etc_files(
    dir: &std::path::Path,
    hostname: &str,
    ip: Option<std::net::Ipv4Addr>,
    resolv: &str,
) -> Result<()> {
    let dir = dir.to_path_buf();
    let hostname = hostname.to_string();
    let resolv = resolv.to_string();
    sys::blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let own = ip.map_or_else(|| "127.0.1.1".to_string(), |ip| ip.to_string());
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{own}\t{hostname}\n"
        );
        let files = [
            ("hosts", hosts),
            ("hostname", format!("{hostname}\n")),
            ("resolv.conf", resolv),
        ];
        for (name, content) in files {
            let path = dir.join(name);
            std::fs::write(&path, content)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    })
    .await
}

async fn remove_dir(dir: &std::path::Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}
