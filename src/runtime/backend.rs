//! The backend seam: every containerd operation the domain uses, typed in our own terms.
//!
//! [`Backend`] is implemented by [`super::Containerd`] for real, and by an in-memory fake for
//! unit tests of the domain's rules. Conventions, the same for every method:
//! - "ok if missing": removing, deleting, killing or resuming what is already gone succeeds;
//!   reads of a missing object return `None`.
//! - A `lease` names the lease that keeps what the call makes from containerd's GC.
//! - Errors are [`crate::error::Error`]s; containerd's UNAVAILABLE becomes
//!   [`crate::error::Error::Unavailable`] (retryable) in one place.

use std::collections::HashMap;
use std::fmt::Debug;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use super::types::*;
use crate::error::Result;

/// A stream of blob bytes (a registry download, an in-memory buffer).
pub type ByteStream<'a> = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + 'a>>;
/// A stream of process exits.
pub type ExitStream = Pin<Box<dyn Stream<Item = Result<TaskExit>> + Send>>;

/// A blob to write into the content store.
pub struct BlobWrite<'a> {
    /// Expected digest; containerd verifies it at commit.
    pub digest: &'a str,
    /// Exact size in bytes.
    pub total: i64,
    /// Labels set with the commit.
    pub labels: HashMap<String, String>,
    /// The bytes.
    pub data: ByteStream<'a>,
    /// Sees the running byte count.
    pub on_progress: &'a mut (dyn FnMut(i64) + Send),
}

/// A container to create.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    /// The record; `created_at` is ignored.
    pub container: Container,
    /// runc's state directory for the shim.
    pub runc_root: std::path::PathBuf,
}

/// An exec process to add to a running task.
#[derive(Debug, Clone)]
pub struct NewExec<'a> {
    /// Unique per task.
    pub exec_id: &'a str,
    /// The OCI process spec (JSON).
    pub process: &'a [u8],
    /// Its stdio.
    pub io: ExecIo,
}

/// Containers: the sandboxes' durable records.
#[async_trait::async_trait]
pub trait Containers: Send + Sync + Debug + 'static {
    /// Container `id`, or `None`.
    async fn container(&self, id: &str) -> Result<Option<Container>>;
    /// Every container carrying label `key` with value `value`.
    async fn containers_labelled(&self, key: &str, value: &str) -> Result<Vec<Container>>;
    /// Creates a container; `ALREADY_EXISTS` as [`crate::error::Error::AlreadyExists`].
    async fn create_container(&self, new: NewContainer, lease: &Lease) -> Result<()>;
    /// Applies `update` in one call.
    async fn update_container(&self, id: &str, update: ContainerUpdate) -> Result<()>;
    /// Deletes container `id` (ok if missing).
    async fn delete_container(&self, id: &str) -> Result<()>;
}

/// Tasks: running PID 1 and exec processes.
#[async_trait::async_trait]
pub trait Tasks: Send + Sync + Debug + 'static {
    /// The task of container `id`, or `None`.
    async fn task(&self, id: &str) -> Result<Option<Task>>;
    /// Every task, by container id.
    async fn tasks(&self) -> Result<HashMap<String, Task>>;
    /// Creates the task of container `id` on `rootfs` (not started).
    async fn create_task(&self, id: &str, rootfs: &[Mount]) -> Result<()>;
    /// Starts PID 1 (`exec_id` `None`) or an exec process; returns its pid.
    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32>;
    /// Signals PID 1 (or every process with `all`) or an exec process (ok if missing).
    async fn kill(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()>;
    /// Freezes the task.
    async fn pause(&self, id: &str) -> Result<()>;
    /// Thaws the task (ok if missing or not paused).
    async fn resume(&self, id: &str) -> Result<()>;
    /// Waits for PID 1 or an exec process to exit; `None` when it is gone already.
    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<Option<Exit>>;
    /// Deletes an exited task; its exit, or `None` when it was gone already.
    async fn delete_task(&self, id: &str) -> Result<Option<Exit>>;
    /// Applies `resources` (an OCI `LinuxResources`, JSON) to the running task.
    async fn update_resources(&self, id: &str, resources: Vec<u8>) -> Result<()>;
    /// Adds an exec process to task `id` (not started).
    async fn exec(&self, id: &str, exec: NewExec<'_>) -> Result<()>;
    /// Deletes an exec process (ok if missing).
    async fn delete_process(&self, id: &str, exec_id: &str) -> Result<()>;
    /// Resizes an exec process's terminal.
    async fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()>;
    /// Closes an exec process's stdin.
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()>;
    /// Exits of processes in this namespace, from now on, until the stream is dropped.
    async fn exits(&self) -> Result<ExitStream>;
}

/// Snapshots and the diff service.
#[async_trait::async_trait]
pub trait Snapshots: Send + Sync + Debug + 'static {
    /// A new active (writable) snapshot `key` on `parent`; its mounts.
    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        lease: Option<&Lease>,
    ) -> Result<Vec<Mount>>;
    /// A new read-only view `key` of `parent`; its mounts.
    async fn view(&self, key: &str, parent: &str, lease: &Lease) -> Result<Vec<Mount>>;
    /// The mounts of snapshot `key`.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// Snapshot `key`'s record, or `None`.
    async fn stat(&self, key: &str) -> Result<Option<SnapshotInfo>>;
    /// Holds snapshot `key` under `lease` (whether or not it exists yet), so that garbage
    /// collection keeps it while the lease lives: for a snapshot this operation did not make.
    async fn hold(&self, key: &str, lease: &Lease) -> Result<()>;
    /// Commits active snapshot `key` as `name`; false when `name` exists already.
    async fn commit(&self, name: &str, key: &str, lease: &Lease) -> Result<bool>;
    /// Removes snapshot `key` (ok if missing).
    async fn remove(&self, key: &str) -> Result<()>;
    /// Every snapshot.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    /// The changes of `upper` over `lower` as an uncompressed layer blob.
    async fn diff(&self, lower: &[Mount], upper: &[Mount], lease: &Lease) -> Result<Descriptor>;
    /// Unpacks `layer` onto `mounts`; the applied (uncompressed) digest.
    async fn apply(&self, layer: &Descriptor, mounts: &[Mount], lease: &Lease) -> Result<String>;
}

/// The content store, image records and leases.
#[async_trait::async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// Whether blob `digest` is in the content store.
    async fn has_blob(&self, digest: &str) -> Result<bool>;
    /// Reads blob `digest` whole; refused past `limit` bytes.
    async fn read_blob(&self, digest: &str, limit: i64) -> Result<Vec<u8>>;
    /// Streams blob `digest` from `offset` in chunks.
    async fn read_blob_stream(&self, digest: &str) -> Result<ByteStream<'static>>;
    /// Writes a blob; false when it was there already (then its labels are not set).
    async fn write_blob(&self, blob: BlobWrite<'_>, lease: &Lease) -> Result<bool>;
    /// Sets `labels` on blob `digest`, leaving its others alone.
    async fn label_blob(&self, digest: &str, labels: &HashMap<String, String>) -> Result<()>;
    /// Unfinished content writes in the namespace (a failed or interrupted pull, export or
    /// commit; containerd's Diff service writes there too): their refs and when each last moved.
    async fn ingests(&self) -> Result<Vec<(String, Option<std::time::SystemTime>)>>;
    /// Abandons unfinished write `write_ref` and its partial data; gone already is fine.
    async fn abort_ingest(&self, write_ref: &str) -> Result<()>;
    /// Image record `name`, or `None`.
    async fn image(&self, name: &str) -> Result<Option<ImageRecord>>;
    /// Every image record carrying label `key` (any value), or all with `None`.
    async fn images(&self, label: Option<&str>) -> Result<Vec<ImageRecord>>;
    /// Creates an image record, or replaces one of the same name; the stored record.
    async fn put_image(&self, record: ImageRecord, lease: &Lease) -> Result<ImageRecord>;
    /// Deletes image record `name`; false when it was missing.
    async fn delete_image(&self, name: &str) -> Result<bool>;
    /// A new lease named after `purpose`.
    async fn lease(&self, purpose: &str) -> Result<Lease>;
    /// Releases `lease` (ok if missing).
    async fn release(&self, lease: Lease) -> Result<()>;
    /// Every lease sandboxd made (`sandboxd-` ids), with when it was made.
    async fn leases(&self) -> Result<Vec<(Lease, Option<std::time::SystemTime>)>>;
    /// containerd's version: the health probe.
    async fn version(&self) -> Result<String>;
}

/// containerd namespaces: the wall between tenants. A handle acts in one namespace; every
/// other method of [`Backend`] reads and writes only there.
#[async_trait::async_trait]
pub trait Namespaces: Send + Sync + Debug + 'static {
    /// The namespace this handle acts in.
    fn namespace(&self) -> &str;
    /// A handle on the same containerd (one connection) acting in namespace `name`, whether
    /// or not it exists yet: see [`Namespaces::ensure_namespace`].
    fn in_namespace(&self, name: &str) -> Arc<dyn Backend>;
    /// Makes namespace `name` if it is missing and sets `labels` on it (others left alone).
    async fn ensure_namespace(&self, name: &str, labels: &HashMap<String, String>) -> Result<()>;
    /// Every namespace whose label `key` is `value`, with its labels.
    async fn namespaces_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>>;
}

/// Everything sandboxd asks of containerd.
pub trait Backend: Containers + Tasks + Snapshots + Store + Namespaces {}

impl<T: Containers + Tasks + Snapshots + Store + Namespaces> Backend for T {}
