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

/// The calling tenant's own registry credentials (the tenants file's `registry_auth`), read
/// through `registries`; `None` when it has none (the node's `--registry-auth` then applies).
fn tenant_registry_auth<T>(
    registries: &crate::image::Registries,
    req: &tonic::Request<T>,
) -> Result<Option<Arc<crate::image::AuthFile>>, tonic::Status> {
    let caller = Caller::of(req.extensions());
    Ok(registries.tenant_auth(caller.registry_auth())?)
}

pub use file::FileApi;
pub use image::ImageApi;
pub use sandbox::SandboxApi;
pub use snapshot::SnapshotApi;
