//! Blocking system calls (mounts, confined file reads) behind async wrappers.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;

use crate::error::{Error, Result};

/// A resolved user: the ids a sandbox's process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Runs blocking work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// A mount description as containerd's snapshotter returns it.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Filesystem type (`overlay`, `bind`).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Options, including flags like `ro` and `rbind`.
    pub options: Vec<String>,
}

impl From<&containerd_client::types::Mount> for MountSpec {
    fn from(m: &containerd_client::types::Mount) -> Self {
        MountSpec {
            fstype: m.r#type.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        }
    }
}

/// A mounted snapshot, unmounted (and its directory removed) on drop.
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
}

impl MountGuard {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH) {
            tracing::warn!(target = %self.target.display(), error = %e, "unmounting a temporary snapshot mount failed");
        }
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// Mounts a snapshot's mounts at a fresh directory under `base` (blocking).
pub fn mount_snapshot(mounts: &[MountSpec], base: &Path) -> Result<MountGuard> {
    let [mount] = mounts else {
        return Err(Error::Internal(format!(
            "expected one snapshot mount, got {}",
            mounts.len()
        )));
    };
    std::fs::create_dir_all(base)
        .map_err(|e| Error::io(format!("creating {}", base.display()), e))?;
    let target = base.join(crate::util::random_hex(8));
    std::fs::create_dir(&target)
        .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in &mount.options {
        match opt.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    let fstype = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(mount.fstype.as_str())
    };
    let data = data.join(",");
    let result = nix::mount::mount(
        Some(mount.source.as_str()),
        &target,
        fstype,
        flags,
        if data.is_empty() {
            None
        } else {
            Some(data.as_str())
        },
    );
    if let Err(e) = result {
        let _ = std::fs::remove_dir(&target);
        return Err(Error::io(
            format!("mounting snapshot at {}", target.display()),
            e.into(),
        ));
    }
    Ok(MountGuard { target })
}

/// Opens `path` for reading with every component resolved inside `root`, so neither `..` nor a
/// symlink can reach outside it.
pub fn open_in_root(root: &Path, path: &str) -> std::io::Result<OwnedFd> {
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(nix::fcntl::openat2(&dir, path, how)?)
}

/// True when `path` is a directory inside `root` (resolved confined to it).
pub fn is_dir_in_root(root: &Path, path: &str) -> bool {
    let Ok(dir) = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(&dir, path, how).is_ok()
}

/// Every process on the host as (pid, parent pid).
pub fn process_parents() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// Reads a small text file confined to `root`; a missing file is `None`.
pub fn read_in_root(root: &Path, path: &str) -> Result<Option<String>> {
    let fd = match open_in_root(root, path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {path} in the sandbox"), e)),
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(format!("reading {path} in the sandbox"), e))?;
    Ok(Some(text))
}

/// Resolves `name`, `uid`, `uid:gid`, `name:group` or `uid:group` against the sandbox's
/// /etc/passwd and /etc/group read inside `root` (only needed for names). `field` names the
/// request field in errors.
pub fn resolve_user(field: &str, spec: &str, root: Option<&Path>) -> Result<User> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(Error::invalid(
            field,
            format!("{spec:?} is not user, uid, user:group or uid:gid"),
        ));
    }
    let read = |file: &str| -> Result<String> {
        match root {
            Some(root) => Ok(read_in_root(root, file)?.unwrap_or_default()),
            None => Ok(String::new()),
        }
    };
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let passwd = read("/etc/passwd")?;
            let gid = lookup(&passwd, |f| f[2] == user_part).and_then(|f| f[3].parse().ok());
            (uid, gid.unwrap_or(0))
        }
        Err(_) => {
            let passwd = read("/etc/passwd")?;
            let entry = lookup(&passwd, |f| f[0] == user_part).ok_or_else(|| {
                Error::invalid(
                    field,
                    format!("user {user_part:?} is not in the sandbox's /etc/passwd"),
                )
            })?;
            let uid = entry[2].parse().map_err(|_| {
                Error::invalid(field, format!("bad /etc/passwd entry for {user_part:?}"))
            })?;
            let gid = entry[3].parse().map_err(|_| {
                Error::invalid(field, format!("bad /etc/passwd entry for {user_part:?}"))
            })?;
            (uid, gid)
        }
    };
    let gid = match group_part {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("/etc/group")?;
                lookup(&groups, |f| f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            field,
                            format!("group {g:?} is not in the sandbox's /etc/group"),
                        )
                    })?
            }
        },
    };
    Ok(User { uid, gid })
}

/// True when `spec` names a user or group (not just numbers), so the sandbox's files are needed.
pub fn user_needs_lookup(spec: &str) -> bool {
    spec.split(':').any(|part| part.parse::<u32>().is_err())
}

fn lookup(text: &str, pred: impl Fn(&[&str]) -> bool) -> Option<Vec<&str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .find(|f| pred(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(passwd: &str, group: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("etc/group"), group).unwrap();
        dir
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let root = root_with(
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
            "root:x:0:\nstaff:x:50:\n",
        );
        let r = Some(root.path());
        assert_eq!(
            resolve_user("user", "app", r).unwrap(),
            User {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            resolve_user("user", "1000", r).unwrap(),
            User {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            resolve_user("user", "app:staff", r).unwrap(),
            User { uid: 1000, gid: 50 }
        );
        assert_eq!(
            resolve_user("user", "42:43", None).unwrap(),
            User { uid: 42, gid: 43 }
        );
        assert_eq!(
            resolve_user("user", "0", None).unwrap(),
            User { uid: 0, gid: 0 }
        );
        let err = resolve_user("user", "ghost", r).unwrap_err();
        assert!(err.to_string().starts_with("invalid user"), "{err}");
        assert!(resolve_user("user", "app:", r).is_err());
    }

    #[test]
    fn reads_cannot_escape_the_root_through_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.path().join("etc/passwd"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../../../../..", root.path().join("up")).unwrap();
        // The absolute link resolves inside the root, where its target does not exist.
        assert_eq!(read_in_root(root.path(), "/etc/passwd").unwrap(), None);
        let via_dots = format!("/up{}", outside.path().join("secret").display());
        assert_eq!(read_in_root(root.path(), &via_dots).unwrap(), None);
    }
}
