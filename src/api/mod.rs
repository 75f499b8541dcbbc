//! The gRPC edge: the only place proto types meet the domain.

pub mod convert;
mod file;
mod image;
mod sandbox;
mod snapshot;
pub mod status;
mod stream;

use std::sync::Arc;

use crate::caller::Caller;
use crate::sandbox::{Manager, Tenancy};

/// The manager of the calling tenant's sandboxes: every handler acts through it, so a call
/// sees only its own tenant's objects (another tenant's are NOT_FOUND, as missing ones).
async fn tenant_manager<T>(
    tenancy: &Tenancy,
    req: &tonic::Request<T>,
) -> Result<Arc<Manager>, tonic::Status> {
    let caller = Caller::of(req.extensions());
    Ok(tenancy.manager(caller.tenant()).await?)
}

pub use file::FileApi;
pub use image::ImageApi;
pub use sandbox::SandboxApi;
pub use snapshot::SnapshotApi;
