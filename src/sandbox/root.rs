//! A sandbox's root filesystem opened for file access, and held still while it is changed.
//!
//! The manager knows where a root is (a running PID 1's, or a temporary mount of a stopped
//! sandbox's snapshot) and which locks keep it valid; `files` only ever sees the open directory
//! and an opaque keep-alive, so confinement does not depend on the sandbox layer.

use super::locks::KeyGuard;
use super::manager::{Manager, SandboxRoot};
use super::model::{SandboxId, State};
use crate::error::{Error, Result};
use crate::files::{self, Root};
use crate::sys;

impl Manager {
    /// Registers a file stream on sandbox `id`: [`super::FileStream::ended`] resolves when a
    /// delete of the sandbox begins, and the stream must then let go of its root.
    pub fn file_stream(&self, id: &SandboxId) -> super::FileStream {
        self.streams.open(id.as_str())
    }

    /// Opens the root of sandbox `id`, in any state. A stopped sandbox stays mounted and locked
    /// (it cannot start) until every root open on its mount is dropped.
    pub async fn open_root(&self, id: &SandboxId) -> Result<Root> {
        let guard = self.sandbox_root(id).await?;
        let SandboxRoot::Running(root_path) = &guard else {
            let dir = guard.path().to_path_buf();
            return sys::blocking(move || Root::open_dir(&dir, Some(Box::new(guard)))).await;
        };
        let pid: u32 = root_path
            .parent()
            .and_then(|proc_dir| proc_dir.file_name()?.to_str()?.parse().ok())
            .ok_or_else(|| Error::Internal(format!("unexpected root {}", root_path.display())))?;
        let still_pid1 = || async {
            let now = self.get(id).await?;
            Ok(matches!(now.state, State::Running | State::Paused) && now.pid == pid)
        };
        files::open_process_root(pid, None, still_pid1)
            .await
            .map_err(|e| match e {
                Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
                    "sandbox {id} stopped while its files were being opened; retry"
                )),
                e => e,
            })
    }

    /// Holds sandbox `id` still while `root` is changed: no commit, restore, stop or delete runs
    /// on it until the guard drops, so a snapshot holds each change of FileService whole or not
    /// at all. A stopped sandbox's root holds that lock already; for a running one it is taken
    /// here, and the sandbox must still run the PID 1 whose root `root` is (a restore in between
    /// would otherwise let the change land in the filesystem it replaced).
    pub async fn hold_still(&self, id: &SandboxId, root: &Root) -> Result<Option<KeyGuard>> {
        let Some(pid) = root.pid() else {
            return Ok(None);
        };
        let guard = self.lock(id.as_str()).await?;
        let now = self.get(id).await?;
        if !matches!(now.state, State::Running | State::Paused) || now.pid != pid {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} was restarted or stopped during the call; nothing was changed, retry"
            )));
        }
        Ok(Some(guard))
    }
}
