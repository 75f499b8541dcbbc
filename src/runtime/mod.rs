//! The backend seam: everything that talks to containerd.
//!
//! The domain (`sandbox`, `image`) sees only [`Backend`] and the types in [`types`]; the
//! `containerd` module is the one place that speaks containerd's generated messages, and
//! [`fake`] an in-memory stand-in for unit tests of the domain's rules.

mod backend;
mod containerd;
#[cfg(test)]
pub mod fake;
pub mod seccomp;
pub mod spec;
pub mod supervisor;
pub mod types;

pub use backend::{
    Backend, BlobWrite, ByteStream, Containers, ExitStream, Namespaces, NewContainer, NewExec,
    Snapshots, Store, Tasks,
};
pub use containerd::{Containerd, SNAPSHOTTER};
pub use types::*;

use crate::error::Error;

/// Whether a failed task create met another create of the same task that containerd is still
/// carrying out or undoing, or that registered a task after its caller (a killed sandboxd)
/// had gone: worth removing that task and trying again.
pub fn create_in_progress(e: &Error) -> bool {
    matches!(e, Error::Containerd { status, .. }
        if status.code() == tonic::Code::AlreadyExists
            || status.message().contains("file exists") && status.message().contains("shim"))
}

/// What a failed task or exec start says about the request, from containerd's message: runc's
/// words are the only account of a bad program or working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchFault {
    /// The program is missing or cannot be executed.
    Program(String),
    /// The working directory is unusable.
    WorkingDir(String),
}

impl LaunchFault {
    /// The caller's fault behind `e`, if it was one.
    pub fn of(e: &Error) -> Option<LaunchFault> {
        let Error::Containerd { status, .. } = e else {
            return None;
        };
        let msg = status.message();
        if msg.contains("executable file not found")
            || msg.contains("permission denied")
            || msg.contains("no such file or directory") && msg.contains("exec")
        {
            Some(LaunchFault::Program(msg.to_string()))
        } else if msg.contains("chdir") || msg.contains("cwd") {
            Some(LaunchFault::WorkingDir(msg.to_string()))
        } else {
            None
        }
    }
}
