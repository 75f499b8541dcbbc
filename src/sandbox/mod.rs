//! The sandbox domain: validated types and the lifecycle manager.

mod locks;
mod manager;
mod model;

pub use manager::{Manager, ManagerConfig, L_MANAGED, L_SNAPSHOT_OWNER};
pub use model::*;
