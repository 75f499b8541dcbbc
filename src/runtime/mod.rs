//! The backend seam: everything that talks to containerd.

mod client;
pub mod content;
pub mod lease;
pub mod spec;
pub mod supervisor;

pub use client::{Containerd, SNAPSHOTTER};
