//! Blocking system calls (mounts, processes) behind async wrappers.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

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

/// Drops `value` on a blocking thread and waits for it: for values whose drop makes system
/// calls (closing a large file, unmounting a sandbox's root).
pub async fn drop_blocking<T: Send + 'static>(value: T) {
    if let Err(e) = tokio::task::spawn_blocking(move || drop(value)).await {
        tracing::warn!(error = %e, "releasing a resource failed");
    }
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

/// Where the kernel's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CPU CFS period of the parent cgroup's quota, as for sandboxes.
const PARENT_CPU_PERIOD_US: i64 = 100_000;

/// Caps the cgroup `parent` (an absolute cgroup path, made if missing) at `memory` bytes and
/// `cpu_millis` millicores, on cgroup v2 or v1's memory and cpu hierarchies; `None` leaves a
/// limit as it is. Every sandbox's cgroup is below it, so together they cannot go past it.
pub fn limit_cgroup(parent: &str, memory: Option<i64>, cpu_millis: Option<i64>) -> Result<()> {
    let relative = parent.trim_start_matches('/');
    let write = |dir: PathBuf, file: &str, value: String| -> Result<()> {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(file), &value))
            .map_err(|e| {
                Error::Internal(format!(
                    "setting {file} of the cgroup parent {} to {value}: {e}",
                    dir.display()
                ))
            })
    };
    let root = Path::new(CGROUP_ROOT);
    let quota = cpu_millis.map(|m| (m * PARENT_CPU_PERIOD_US / 1000).max(1000));
    if root.join("cgroup.controllers").exists() {
        let dir = root.join(relative);
        if let Some(bytes) = memory {
            write(dir.clone(), "memory.max", bytes.to_string())?;
        }
        if let Some(quota) = quota {
            write(dir, "cpu.max", format!("{quota} {PARENT_CPU_PERIOD_US}"))?;
        }
        return Ok(());
    }
    if let Some(bytes) = memory {
        write(
            root.join("memory").join(relative),
            "memory.limit_in_bytes",
            bytes.to_string(),
        )?;
    }
    if let Some(quota) = quota {
        let cpu = ["cpu,cpuacct", "cpu"]
            .iter()
            .map(|c| root.join(c))
            .find(|c| c.join("cpu.cfs_quota_us").exists())
            .ok_or_else(|| Error::Internal("no cgroup v1 cpu hierarchy is mounted".into()))?;
        let dir = cpu.join(relative);
        write(
            dir.clone(),
            "cpu.cfs_period_us",
            PARENT_CPU_PERIOD_US.to_string(),
        )?;
        write(dir, "cpu.cfs_quota_us", quota.to_string())?;
    }
    Ok(())
}

/// Free bytes (as an unprivileged writer sees them: without the root reserve) and total bytes
/// of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let block = st.fragment_size() as u64;
    Ok((
        st.blocks_available() as u64 * block,
        st.blocks() as u64 * block,
    ))
}
