//! The sandbox domain: validated types and the lifecycle manager.

mod exec;
mod locks;
mod manager;
mod model;
mod pool;
mod relay;
mod root;
mod snapshot;

pub use exec::{
    ExecEvent, ExecInput, ExecSession, ExecSpec, ExecSyncResult, ExitInfo, EXEC_INPUT_QUEUE,
    EXEC_OUTPUT_QUEUE,
};
pub use locks::KeyGuard;
pub use manager::{Manager, ManagerConfig, SandboxRoot, L_MANAGED, L_SNAPSHOT_OWNER};
pub use model::*;
pub use pool::parse_pool;
pub use relay::{helper_main as relay_helper_main, RELAY_ARG};
pub use snapshot::{parse_snapshot_id, Snapshot, SNAPSHOT_IMAGE_PREFIX};
