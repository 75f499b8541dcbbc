//! The gRPC edge: the only place proto types meet the domain.

pub mod convert;
mod image;
mod pending;
mod sandbox;
mod snapshot;
pub mod status;

pub use image::ImageApi;
pub use pending::FileApi;
pub use sandbox::SandboxApi;
pub use snapshot::SnapshotApi;
