//! The gRPC edge: the only place proto types meet the domain.

pub mod convert;
mod file;
mod image;
mod sandbox;
mod snapshot;
pub mod status;
mod stream;

pub use file::FileApi;
pub use image::ImageApi;
pub use sandbox::SandboxApi;
pub use snapshot::SnapshotApi;
