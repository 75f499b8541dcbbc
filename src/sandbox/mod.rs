//! The sandbox domain: validated types and the lifecycle manager.

mod budget;
mod commit;
mod create;
mod disk;
mod exec;
mod lifecycle;
mod locks;
mod manager;
mod model;
mod network;
mod observe;
mod pool;
mod quota;
mod record;
mod recovery;
mod relay;
mod retry;
mod root;
mod snapshot;
pub mod stats;
mod streams;
mod tenancy;
#[cfg(test)]
mod tests;

pub use exec::{
    ExecEvent, ExecInput, ExecSession, ExecSpec, ExecSyncResult, ExitInfo, EXEC_INPUT_QUEUE,
    EXEC_OUTPUT_QUEUE,
};
pub use locks::KeyGuard;
pub use manager::{Manager, ManagerConfig, SandboxRoot, SharedMount};
pub use model::*;
pub use observe::{Observer, Unobserved};
pub use pool::parse_pool;
pub use quota::Usage;
pub use record::{L_MANAGED, L_SNAPSHOT_OWNER};
pub use relay::{helper_main as relay_helper_main, RELAY_ARG};
pub use retry::{RequestKey, REQUEST_ID_TTL};
pub use snapshot::{parse_snapshot_id, Snapshot, SNAPSHOT_IMAGE_PREFIX};
pub use streams::FileStream;
pub use tenancy::{Scope, Tenancy, NS_INSTANCE, NS_TENANT};
