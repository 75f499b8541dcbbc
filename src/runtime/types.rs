//! The backend's vocabulary: what the domain reads from and hands to containerd, in our own
//! types. containerd's generated messages are converted to these once, in `containerd/`.

use std::collections::HashMap;
use std::time::SystemTime;

/// A task's (or exec process's) state as the domain sees it. containerd's PAUSING counts as
/// paused: both mean "frozen or freezing", and neither may be signalled or exec'd into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Made, not started.
    Created,
    /// Running.
    Running,
    /// Frozen, or being frozen.
    Paused,
    /// Exited; not yet deleted.
    Stopped,
    /// The shim did not say (slow under load, or gone). Not proof that the task is dead.
    Unknown,
}

impl TaskState {
    /// Whether PID 1 may still be alive: running, paused, or not known to have exited.
    pub fn may_be_alive(self) -> bool {
        matches!(
            self,
            TaskState::Running | TaskState::Paused | TaskState::Unknown
        )
    }
}

/// A sandbox's task (PID 1), as containerd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// PID 1's host pid (0 once it is gone).
    pub pid: u32,
    /// Its state.
    pub state: TaskState,
    /// Exit status, meaningful when [`TaskState::Stopped`].
    pub exit_status: u32,
    /// When it exited, if it did.
    pub exited_at: Option<SystemTime>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal for a killed process).
    pub status: u32,
    /// When it exited.
    pub at: Option<SystemTime>,
}

/// One mount of a snapshot, as the snapshotter describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type (`overlay`, `bind`).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options, including flags like `ro` and `rbind`.
    pub options: Vec<String>,
}

impl From<&Mount> for crate::sys::MountSpec {
    fn from(m: &Mount) -> Self {
        crate::sys::MountSpec {
            fstype: m.kind.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        }
    }
}

/// A container record: a sandbox's durable state (labels, spec, writable snapshot).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Container {
    /// Container id (the sandbox id).
    pub id: String,
    /// Labels: the sandbox's record (see `sandbox::record`).
    pub labels: HashMap<String, String>,
    /// Extensions by name (values too large for labels).
    pub extensions: HashMap<String, Vec<u8>>,
    /// The image name.
    pub image: String,
    /// The OCI runtime spec (JSON).
    pub spec: Vec<u8>,
    /// Key of the writable snapshot.
    pub snapshot_key: String,
    /// When containerd recorded it.
    pub created_at: Option<SystemTime>,
}

/// What [`Container`] fields an update replaces; labels set to `None` are removed.
#[derive(Debug, Clone, Default)]
pub struct ContainerUpdate {
    /// A new writable snapshot key.
    pub snapshot_key: Option<String>,
    /// A new OCI runtime spec.
    pub spec: Option<Vec<u8>>,
    /// Labels to set (`Some`) or remove (`None`); others are left alone.
    pub labels: Vec<(String, Option<String>)>,
    /// Extensions to set (replaced whole); others are left alone.
    pub extensions: Vec<(String, Vec<u8>)>,
}

/// A snapshot's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotInfo {
    /// Key or name.
    pub name: String,
    /// Parent's name (empty for a base layer).
    pub parent: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Committed (not active or a view).
    pub committed: bool,
}

/// A content-store descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Annotations.
    pub annotations: HashMap<String, String>,
}

/// An image record (images and committed sandbox snapshots alike).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageRecord {
    /// Full name (`docker.io/library/busybox:latest`).
    pub name: String,
    /// The manifest or index it points at.
    pub target: Descriptor,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// When containerd recorded it.
    pub created_at: Option<SystemTime>,
}

/// Where an exec process's stdio goes (FIFO paths or a binary-logger URI; empty: none).
#[derive(Debug, Clone, Default)]
pub struct ExecIo {
    /// stdin.
    pub stdin: String,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// Allocate a terminal.
    pub terminal: bool,
}

/// A process exit seen on containerd's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    /// The container (sandbox) id.
    pub container_id: String,
    /// The process id: the container id for PID 1, the exec id otherwise.
    pub process_id: String,
    /// Exit status.
    pub status: u32,
}

impl TaskExit {
    /// Whether this is PID 1's exit, which ends the sandbox.
    pub fn is_init(&self) -> bool {
        self.process_id == self.container_id
    }
}

/// A lease held by a multi-step operation: what it makes is kept from containerd's GC until
/// it is released (or expires, after a crash).
#[derive(Debug)]
pub struct Lease {
    pub(super) id: String,
}

impl Lease {
    /// The lease id.
    pub fn id(&self) -> &str {
        &self.id
    }
}
