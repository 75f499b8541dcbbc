//! The gRPC edge: the only place proto types meet the domain.

pub mod convert;
mod image;
mod pending;
mod sandbox;
pub mod status;

pub use image::ImageApi;
pub use pending::{FileApi, SnapshotApi};
pub use sandbox::SandboxApi;
