//! An in-memory [`Backend`] for unit tests of the domain's rules: containers, tasks, snapshots,
//! blobs, images and leases kept in maps, every call logged, and any call made to fail on
//! purpose. Tasks do not run anything: a started task is RUNNING until it is killed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::broadcast;

use super::backend::*;
use super::types::*;
use crate::error::{Error, Kind, Result};

/// The fake backend. `Default` gives an empty one.
#[derive(Debug)]
pub struct Fake {
    state: Mutex<State>,
    exits: broadcast::Sender<TaskExit>,
    /// Where snapshots' directories are (a snapshot mounts as a bind of its directory).
    root: tempfile::TempDir,
    /// The namespace this handle acts in.
    namespace: String,
    /// The namespaces of this fake containerd, shared by every handle on it.
    spaces: Arc<Mutex<Spaces>>,
}

/// A fake containerd's namespaces: the labels of those that exist, and the handles given out.
/// The first handle's own namespace has its state there and is not reachable through
/// [`Namespaces::in_namespace`]: each other name gets a handle (and state) of its own.
#[derive(Debug, Default)]
struct Spaces {
    labels: HashMap<String, HashMap<String, String>>,
    handles: HashMap<String, Arc<Fake>>,
}

/// The namespace of a fake made with `Default`, as sandboxd's default `--namespace`.
pub const FAKE_NAMESPACE: &str = "sandboxd";

impl Default for Fake {
    fn default() -> Self {
        Fake::in_space(FAKE_NAMESPACE, Arc::default())
    }
}

#[derive(Debug, Default)]
struct State {
    containers: HashMap<String, Container>,
    tasks: HashMap<String, Task>,
    snapshots: HashMap<String, SnapshotInfo>,
    blobs: HashMap<String, Vec<u8>>,
    images: HashMap<String, ImageRecord>,
    leases: HashSet<String>,
    ingests: HashMap<String, std::time::SystemTime>,
    calls: Vec<String>,
    failing: HashSet<String>,
    /// Calls that fail the next N times as a busy runtime does (UNKNOWN from containerd).
    flaky: HashMap<String, u32>,
    next_pid: u32,
}

impl Fake {
    fn in_space(namespace: &str, spaces: Arc<Mutex<Spaces>>) -> Fake {
        Fake {
            state: Mutex::default(),
            exits: broadcast::channel(64).0,
            root: tempfile::tempdir().expect("a temp dir for the fake's snapshots"),
            namespace: namespace.to_string(),
            spaces,
        }
    }

    /// The handle on namespace `name` given out by [`Namespaces::in_namespace`], if any.
    pub fn space(&self, name: &str) -> Option<Arc<Fake>> {
        let spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        spaces.handles.get(name).cloned()
    }

    /// Makes every later call of `op` (e.g. `"tasks.start"`) fail with INTERNAL.
    pub fn fail(&self, op: &str) {
        self.state().failing.insert(op.to_string());
    }

    /// Makes the next `times` calls of `op` fail as containerd relays a runtime's transient
    /// failure (UNKNOWN, e.g. runc's "unable to freeze" under load).
    pub fn fail_transiently(&self, op: &str, times: u32) {
        self.state().flaky.insert(op.to_string(), times);
    }

    /// Calls fail no more.
    pub fn heal(&self) {
        let mut s = self.state();
        s.failing.clear();
        s.flaky.clear();
    }

    /// The calls made so far, in order, as `op id`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Every container.
    pub fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state().containers.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every snapshot's name.
    pub fn snapshot_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.state().snapshots.keys().cloned().collect();
        names.sort();
        names
    }

    /// Leases not released.
    pub fn open_leases(&self) -> usize {
        self.state().leases.len()
    }

    /// Adds a committed snapshot `name` (an image layer) with no parent.
    pub fn add_layer(&self, name: &str) {
        self.state().snapshots.insert(
            name.to_string(),
            SnapshotInfo {
                name: name.to_string(),
                committed: true,
                ..Default::default()
            },
        );
    }

    /// Takes a lease as an operation that died while holding it would leave it.
    pub fn add_lease(&self, id: &str) {
        self.state().leases.insert(id.to_string());
    }

    /// Adds an unfinished content write `write_ref` that last moved at `at`.
    pub fn add_ingest(&self, write_ref: &str, at: std::time::SystemTime) {
        self.state().ingests.insert(write_ref.to_string(), at);
    }

    /// Refs of unfinished content writes, sorted.
    pub fn ingest_refs(&self) -> Vec<String> {
        let mut refs: Vec<String> = self.state().ingests.keys().cloned().collect();
        refs.sort();
        refs
    }

    /// Adds an active snapshot as an interrupted operation would leave it.
    pub fn add_snapshot(&self, info: SnapshotInfo) {
        self.state().snapshots.insert(info.name.clone(), info);
    }

    /// Stores a blob under its sha256 digest; returns the digest.
    pub fn add_blob(&self, data: &[u8]) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
        self.state().blobs.insert(digest.clone(), data.to_vec());
        digest
    }

    /// Adds an image record.
    pub fn add_image(&self, record: ImageRecord) {
        self.state().images.insert(record.name.clone(), record);
    }

    /// PID 1 of `id` exits with `status` by itself (an exit event is sent).
    pub fn exit(&self, id: &str, status: u32) {
        if let Some(t) = self.state().tasks.get_mut(id) {
            t.state = TaskState::Stopped;
            t.exit_status = status;
            t.exited_at = Some(std::time::SystemTime::now());
        }
        let _ = self.exits.send(TaskExit {
            container_id: id.to_string(),
            process_id: id.to_string(),
            status,
        });
    }

    /// The state of task `id`, if it has one.
    pub fn task_state(&self, id: &str) -> Option<TaskState> {
        self.state().tasks.get(id).map(|t| t.state)
    }

    /// Sets the state containerd reports for `id`'s task (e.g. UNKNOWN, as a slow shim does).
    pub fn set_task_state(&self, id: &str, state: TaskState) {
        if let Some(t) = self.state().tasks.get_mut(id) {
            t.state = state;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs the call and fails it if asked to.
    fn enter(&self, op: &str, id: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state();
        s.calls.push(format!("{op} {id}"));
        if s.failing.contains(op) {
            return Err(Error::Internal(format!("fake: {op} fails on purpose")));
        }
        if let Some(left) = s.flaky.get_mut(op).filter(|n| **n > 0) {
            *left -= 1;
            let status = tonic::Status::unknown(format!("fake: {op} fails for now"));
            return Err(Error::containerd("fake", status));
        }
        Ok(s)
    }
}

fn missing(what: &str, id: &str) -> Error {
    Error::Internal(format!("fake: {what} {id} does not exist"))
}

impl Fake {
    /// A snapshot's mounts: a bind of its own directory, made on first use.
    fn mounts_of(&self, key: &str) -> Vec<Mount> {
        let dir = self.root.path().join(key);
        let _ = std::fs::create_dir_all(&dir);
        vec![Mount {
            kind: "bind".into(),
            source: dir.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "rw".into()],
        }]
    }
}

#[async_trait::async_trait]
impl Containers for Fake {
    async fn container(&self, id: &str) -> Result<Option<Container>> {
        Ok(self
            .enter("containers.get", id)?
            .containers
            .get(id)
            .cloned())
    }

    async fn containers_labelled(&self, key: &str, value: &str) -> Result<Vec<Container>> {
        let s = self.enter("containers.list", key)?;
        Ok(s.containers
            .values()
            .filter(|c| c.labels.get(key).is_some_and(|v| v == value))
            .cloned()
            .collect())
    }

    async fn create_container(&self, new: NewContainer, _lease: &Lease) -> Result<()> {
        let id = new.container.id.clone();
        let mut s = self.enter("containers.create", &id)?;
        if s.containers.contains_key(&id) {
            return Err(Error::AlreadyExists {
                kind: Kind::Sandbox,
                id,
            });
        }
        let mut c = new.container;
        c.created_at = Some(std::time::SystemTime::now());
        s.containers.insert(id, c);
        Ok(())
    }

    async fn update_container(&self, id: &str, update: ContainerUpdate) -> Result<()> {
        let mut s = self.enter("containers.update", id)?;
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| Error::not_found(Kind::Sandbox, id))?;
        for (k, v) in update.labels {
            match v {
                Some(v) => c.labels.insert(k, v),
                None => c.labels.remove(&k),
            };
        }
        if let Some(spec) = update.spec {
            c.spec = spec;
        }
        if let Some(key) = update.snapshot_key {
            c.snapshot_key = key;
        }
        c.extensions.extend(update.extensions);
        Ok(())
    }

    async fn delete_container(&self, id: &str) -> Result<()> {
        self.enter("containers.delete", id)?.containers.remove(id);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Tasks for Fake {
    async fn task(&self, id: &str) -> Result<Option<Task>> {
        Ok(self.enter("tasks.get", id)?.tasks.get(id).cloned())
    }

    async fn tasks(&self) -> Result<HashMap<String, Task>> {
        Ok(self.enter("tasks.list", "")?.tasks.clone())
    }

    async fn create_task(&self, id: &str, _rootfs: &[Mount]) -> Result<()> {
        let mut s = self.enter("tasks.create", id)?;
        if !s.containers.contains_key(id) {
            return Err(missing("container", id));
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        s.tasks.insert(
            id.to_string(),
            Task {
                pid,
                state: TaskState::Created,
                exit_status: 0,
                exited_at: None,
            },
        );
        Ok(())
    }

    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32> {
        let mut s = self.enter("tasks.start", id)?;
        let t = s.tasks.get_mut(id).ok_or_else(|| missing("task", id))?;
        if exec_id.is_none() {
            t.state = TaskState::Running;
        }
        Ok(t.pid)
    }

    async fn kill(&self, id: &str, exec_id: Option<&str>, _signal: u32, _all: bool) -> Result<()> {
        let mut s = self.enter("tasks.kill", id)?;
        if exec_id.is_none() {
            if let Some(t) = s.tasks.get_mut(id) {
                if t.state != TaskState::Paused {
                    t.state = TaskState::Stopped;
                    t.exit_status = 137;
                }
            }
        }
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let mut s = self.enter("tasks.pause", id)?;
        let t = s.tasks.get_mut(id).ok_or_else(|| missing("task", id))?;
        t.state = TaskState::Paused;
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let mut s = self.enter("tasks.resume", id)?;
        if let Some(t) = s.tasks.get_mut(id).filter(|t| t.state == TaskState::Paused) {
            t.state = TaskState::Running;
        }
        Ok(())
    }

    async fn wait(&self, id: &str, _exec_id: Option<&str>) -> Result<Option<Exit>> {
        let exited = {
            let s = self.enter("tasks.wait", id)?;
            match s.tasks.get(id) {
                None => return Ok(None),
                Some(t) if t.state == TaskState::Stopped => Some(Exit {
                    status: t.exit_status,
                    at: t.exited_at,
                }),
                Some(_) => None,
            }
        };
        match exited {
            Some(exit) => Ok(Some(exit)),
            // A running task never exits by itself here: the caller's timeout decides.
            None => std::future::pending().await,
        }
    }

    async fn delete_task(&self, id: &str) -> Result<Option<Exit>> {
        let mut s = self.enter("tasks.delete", id)?;
        Ok(s.tasks.remove(id).map(|t| Exit {
            status: t.exit_status,
            at: t.exited_at,
        }))
    }

    async fn update_resources(&self, id: &str, _resources: Vec<u8>) -> Result<()> {
        self.enter("tasks.update", id).map(|_| ())
    }

    async fn exec(&self, id: &str, _exec: NewExec<'_>) -> Result<()> {
        self.enter("tasks.exec", id).map(|_| ())
    }

    async fn delete_process(&self, id: &str, _exec_id: &str) -> Result<()> {
        self.enter("tasks.delete_process", id).map(|_| ())
    }

    async fn resize_pty(&self, id: &str, _exec_id: &str, _rows: u32, _cols: u32) -> Result<()> {
        self.enter("tasks.resize_pty", id).map(|_| ())
    }

    async fn close_stdin(&self, id: &str, _exec_id: &str) -> Result<()> {
        self.enter("tasks.close_io", id).map(|_| ())
    }

    async fn exits(&self) -> Result<ExitStream> {
        let rx = self.exits.subscribe();
        drop(self.enter("events.subscribe", "")?);
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|e| async move { e.ok().map(Ok) });
        Ok(Box::pin(stream))
    }
}

#[async_trait::async_trait]
impl Snapshots for Fake {
    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        _lease: Option<&Lease>,
    ) -> Result<Vec<Mount>> {
        let mut s = self.enter("snapshots.prepare", key)?;
        if !parent.is_empty() && !s.snapshots.get(parent).is_some_and(|p| p.committed) {
            return Err(missing("parent snapshot", parent));
        }
        if s.snapshots.contains_key(key) {
            return Err(Error::Internal(format!("fake: snapshot {key} exists")));
        }
        s.snapshots.insert(
            key.to_string(),
            SnapshotInfo {
                name: key.to_string(),
                parent: parent.to_string(),
                labels,
                committed: false,
            },
        );
        drop(s);
        Ok(self.mounts_of(key))
    }

    async fn view(&self, key: &str, parent: &str, lease: &Lease) -> Result<Vec<Mount>> {
        self.prepare(key, parent, HashMap::new(), Some(lease)).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.enter("snapshots.mounts", key)?;
        if !s.snapshots.contains_key(key) {
            return Err(missing("snapshot", key));
        }
        drop(s);
        Ok(self.mounts_of(key))
    }

    async fn stat(&self, key: &str) -> Result<Option<SnapshotInfo>> {
        Ok(self
            .enter("snapshots.stat", key)?
            .snapshots
            .get(key)
            .cloned())
    }

    async fn hold(&self, key: &str, _lease: &Lease) -> Result<()> {
        self.enter("leases.add_resource", key).map(|_| ())
    }

    async fn commit(&self, name: &str, key: &str, _lease: &Lease) -> Result<bool> {
        let mut s = self.enter("snapshots.commit", key)?;
        if s.snapshots.contains_key(name) {
            return Ok(false);
        }
        let mut info = s
            .snapshots
            .remove(key)
            .ok_or_else(|| missing("snapshot", key))?;
        info.name = name.to_string();
        info.committed = true;
        s.snapshots.insert(name.to_string(), info);
        Ok(true)
    }

    async fn remove(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Ok(());
        }
        self.enter("snapshots.remove", key)?.snapshots.remove(key);
        Ok(())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .enter("snapshots.list", "")?
            .snapshots
            .values()
            .cloned()
            .collect())
    }

    async fn diff(&self, _lower: &[Mount], _upper: &[Mount], _lease: &Lease) -> Result<Descriptor> {
        drop(self.enter("diff.diff", "")?);
        let digest = self.add_blob(b"layer");
        Ok(Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest,
            size: 5,
            annotations: HashMap::new(),
        })
    }

    async fn apply(&self, layer: &Descriptor, _mounts: &[Mount], _lease: &Lease) -> Result<String> {
        drop(self.enter("diff.apply", "")?);
        Ok(layer.digest.clone())
    }
}

#[async_trait::async_trait]
impl Store for Fake {
    async fn hold_blob(&self, digest: &str, _lease: &Lease) -> Result<()> {
        self.enter("leases.add_resource", digest).map(|_| ())
    }

    async fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self
            .enter("content.info", digest)?
            .blobs
            .contains_key(digest))
    }

    async fn read_blob(&self, digest: &str, limit: i64) -> Result<Vec<u8>> {
        let s = self.enter("content.read", digest)?;
        let blob = s.blobs.get(digest).ok_or_else(|| missing("blob", digest))?;
        if blob.len() as i64 > limit {
            return Err(Error::Internal(format!(
                "fake: blob {digest} is over {limit}"
            )));
        }
        Ok(blob.clone())
    }

    async fn read_blob_stream(&self, digest: &str) -> Result<ByteStream<'static>> {
        let data = self.read_blob(digest, i64::MAX).await?;
        Ok(Box::pin(futures::stream::iter([Ok(bytes::Bytes::from(
            data,
        ))])))
    }

    async fn write_blob(&self, mut blob: BlobWrite<'_>, _lease: &Lease) -> Result<bool> {
        drop(self.enter("content.write", blob.digest)?);
        let mut data = Vec::new();
        while let Some(chunk) = blob.data.next().await {
            data.extend_from_slice(&chunk.map_err(|e| Error::io("fake blob", e))?);
            (blob.on_progress)(data.len() as i64);
        }
        let mut s = self.state();
        if s.blobs.contains_key(blob.digest) {
            return Ok(false);
        }
        s.blobs.insert(blob.digest.to_string(), data);
        Ok(true)
    }

    async fn label_blob(&self, digest: &str, _labels: &HashMap<String, String>) -> Result<()> {
        self.enter("content.update", digest).map(|_| ())
    }

    async fn ingests(&self) -> Result<Vec<(String, Option<std::time::SystemTime>)>> {
        let s = self.enter("content.list_statuses", "")?;
        Ok(s.ingests
            .iter()
            .map(|(r, t)| (r.clone(), Some(*t)))
            .collect())
    }

    async fn abort_ingest(&self, write_ref: &str) -> Result<()> {
        self.enter("content.abort", write_ref)?
            .ingests
            .remove(write_ref);
        Ok(())
    }

    async fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        Ok(self.enter("images.get", name)?.images.get(name).cloned())
    }

    async fn images(&self, label: Option<&str>) -> Result<Vec<ImageRecord>> {
        let s = self.enter("images.list", label.unwrap_or_default())?;
        Ok(s.images
            .values()
            .filter(|i| label.is_none_or(|l| i.labels.contains_key(l)))
            .cloned()
            .collect())
    }

    async fn put_image(&self, mut record: ImageRecord, _lease: &Lease) -> Result<ImageRecord> {
        let mut s = self.enter("images.create", &record.name)?;
        record.created_at = Some(std::time::SystemTime::now());
        s.images.insert(record.name.clone(), record.clone());
        Ok(record)
    }

    async fn delete_image(&self, name: &str) -> Result<bool> {
        Ok(self
            .enter("images.delete", name)?
            .images
            .remove(name)
            .is_some())
    }

    async fn lease(&self, purpose: &str) -> Result<Lease> {
        let mut s = self.enter("leases.create", purpose)?;
        let id = format!("fake-{purpose}-{}", s.calls.len());
        s.leases.insert(id.clone());
        Ok(Lease { id })
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        self.enter("leases.delete", &lease.id)?
            .leases
            .remove(&lease.id);
        Ok(())
    }

    async fn leases(&self) -> Result<Vec<(Lease, Option<std::time::SystemTime>)>> {
        let s = self.enter("leases.list", "")?;
        Ok(s.leases
            .iter()
            .map(|id| (Lease { id: id.clone() }, None))
            .collect())
    }

    async fn version(&self) -> Result<String> {
        Ok("fake".into())
    }
}

#[async_trait::async_trait]
impl Namespaces for Fake {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn in_namespace(&self, name: &str) -> Arc<dyn Backend> {
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        let spaces = &mut *spaces;
        spaces
            .handles
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Fake::in_space(name, self.spaces.clone())))
            .clone()
    }

    async fn ensure_namespace(&self, name: &str, labels: &HashMap<String, String>) -> Result<()> {
        drop(self.enter("namespaces.ensure", name)?);
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        spaces
            .labels
            .entry(name.to_string())
            .or_default()
            .extend(labels.clone());
        Ok(())
    }

    async fn namespaces_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>> {
        drop(self.enter("namespaces.list", "")?);
        let spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<_> = spaces
            .labels
            .iter()
            .filter(|(_, l)| l.get(key).is_some_and(|v| v == value))
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}
