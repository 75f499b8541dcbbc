//! Named network namespaces, made the way `ip netns add` makes them: a new namespace kept alive
//! by a bind mount of its `/proc/.../ns/net` file onto a file under a runtime directory.
//!
//! The namespace is entered by a short-lived thread of our own, so the daemon's threads never
//! leave the host's namespace.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::error::{Error, Result};
use crate::sys::blocking;

/// Where `ip netns` keeps its namespaces; the daemon's default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/netns";

/// A network namespace held open by a bind mount at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates a new, empty network namespace named `name` under `runtime_dir` (created if
    /// missing). Fails if a file of that name exists already.
    pub async fn create(runtime_dir: &Path, name: &str) -> Result<NetNs> {
        validate_name(name)?;
        let dir = runtime_dir.to_path_buf();
        let path = dir.join(name);
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::io(
                    format!("creating network namespace directory {}", dir.display()),
                    e,
                )
            })?;
            // O_EXCL as `ip netns add` does: two sandboxes never share a namespace by accident.
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| {
                    Error::io(
                        format!("creating network namespace file {}", path.display()),
                        e,
                    )
                })?;
            if let Err(e) = bind_new_netns(&path) {
                return Err(e.with_cleanup(remove_blocking(&path)));
            }
            Ok(NetNs { path })
        })
        .await
    }

    /// Refers to a namespace created earlier (for example before a daemon restart).
    pub fn at(path: impl Into<PathBuf>) -> NetNs {
        NetNs { path: path.into() }
    }

    /// The bind-mounted namespace file, as passed to CNI plugins and the OCI spec.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a namespace is mounted at the path. A plain file there is what a daemon killed
    /// between making the file and mounting the namespace on it leaves (or one killed between
    /// the unmount and the unlink): it names no namespace.
    pub async fn is_mounted(&self) -> bool {
        let path = self.path.clone();
        blocking(move || {
            Ok(nix::sys::statfs::statfs(&path)
                .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC))
        })
        .await
        .unwrap_or(false)
    }

    /// Unmounts and deletes the namespace file. Idempotent: a missing mount or file is fine.
    /// The namespace itself lives on while a process still runs in it.
    pub async fn remove(&self) -> Result<()> {
        let path = self.path.clone();
        blocking(move || remove_blocking(&path)).await
    }
}

/// Rejects names that are not a single plain path component.
fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Error::invalid(
            "network namespace name",
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

/// Makes a new namespace on a dedicated thread and bind-mounts it onto `target`.
///
/// The thread is ours alone (not a pooled blocking thread) and exits right after, so no other
/// work ever runs in the namespace it switched to.
fn bind_new_netns(target: &Path) -> Result<()> {
    let target = target.to_path_buf();
    std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io("unsharing the network namespace", e.into()))?;
            let source = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
            nix::mount::mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                Error::io(
                    format!("bind-mounting {source} onto {}", target.display()),
                    e.into(),
                )
            })
        })
        .map_err(|e| Error::io("starting the network namespace thread", e))?
        .join()
        .map_err(|_| Error::Internal("the network namespace thread panicked".into()))?
}

fn remove_blocking(path: &Path) -> Result<()> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (never mounted or unmounted already).
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::io(
                format!("unmounting network namespace {}", path.display()),
                e.into(),
            ))
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing network namespace file {}", path.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_one_path_component() {
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?} was accepted");
        }
        validate_name("sandbox-1").unwrap();
    }

    #[tokio::test]
    async fn a_plain_file_is_no_mounted_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("half-made");
        std::fs::write(&path, b"").unwrap();
        assert!(!NetNs::at(&path).is_mounted().await);
        assert!(!NetNs::at(dir.path().join("missing")).is_mounted().await);
        // This process's own namespace file is one.
        assert!(NetNs::at("/proc/self/ns/net").is_mounted().await);
    }

    #[tokio::test]
    async fn removing_a_missing_namespace_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NetNs::at(dir.path().join("never-made"));
        ns.remove().await.unwrap();
        ns.remove().await.unwrap();
    }
}
