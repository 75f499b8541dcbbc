//! The free-space guard: work that writes to the node's disk (a create, fork or restore, a
//! commit, WriteFile) is refused while a filesystem it lands on is nearly full, so that one
//! sandbox's writes cannot take the disk from every other sandbox and the node. What a running
//! sandbox writes through its own processes is bounded by disk limits, not by this guard.

use std::path::{Path, PathBuf};

use super::manager::Manager;
use super::model::SandboxId;
use crate::config::MinFree;
use crate::error::{Error, Result};
use crate::runtime::Mount;

impl Manager {
    /// RESOURCE_EXHAUSTED when sandboxd's data dir or the snapshotter's filesystem (that of
    /// the writable layer in `mounts`, else the one seen last) has less free space than
    /// `--min-free-disk`.
    pub(super) fn disk_room(&self, mounts: Option<&[Mount]>) -> Result<()> {
        let Some(min) = self.cfg.walls.min_free_disk else {
            return Ok(());
        };
        if let Some(dir) = mounts
            .and_then(writable_dir)
            .and_then(|d| snapshots_dir(&d))
        {
            let _ = self.snapshots_dir.set(dir);
        }
        let data = self.cfg.data_dir.as_path();
        for path in std::iter::once(data).chain(self.snapshots_dir.get().map(PathBuf::as_path)) {
            match crate::sys::disk_space(path) {
                Ok((free, total)) if short(free, total, min) => {
                    let percent = free as f64 * 100.0 / total.max(1) as f64;
                    return Err(Error::ResourceExhausted(format!(
                        "the filesystem holding {} has {free} of {total} bytes free ({percent:.1}%), \
                         less than --min-free-disk ({min}): free some space or lower the setting",
                        path.display()
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "no free-space figure")
                }
            }
        }
        Ok(())
    }

    /// [`Self::disk_room`] before writing into sandbox `id`'s writable layer (WriteFile).
    pub async fn disk_room_for(&self, id: &SandboxId) -> Result<()> {
        if self.cfg.walls.min_free_disk.is_none() {
            return Ok(());
        }
        if self.snapshots_dir.get().is_some() {
            return self.disk_room(None);
        }
        let container = self.existing(id).await?;
        let mounts = self.cd.mounts(&container.snapshot_key).await?;
        self.disk_room(Some(&mounts))
    }
}

/// Whether `free` of `total` bytes is below `min`.
fn short(free: u64, total: u64, min: MinFree) -> bool {
    match min {
        MinFree::Bytes(b) => free < b,
        MinFree::Percent(p) => (free as f64) < total as f64 * p / 100.0,
    }
}

/// The host directory a sandbox writes into: the overlay's upper dir, or a bind mount's source.
pub(super) fn writable_dir(mounts: &[Mount]) -> Option<PathBuf> {
    mounts.iter().find_map(|m| match m.kind.as_str() {
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        "bind" => Some(PathBuf::from(&m.source)),
        _ => None,
    })
}

/// The snapshotter's `snapshots` directory above a writable layer's dir: it outlives any one
/// snapshot, so the guard can keep looking at it.
fn snapshots_dir(layer: &Path) -> Option<PathBuf> {
    layer
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "snapshots"))
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_by_percent_or_bytes() {
        assert!(short(4, 100, MinFree::Percent(5.0)));
        assert!(!short(5, 100, MinFree::Percent(5.0)));
        assert!(short(99, 1000, MinFree::Bytes(100)));
        assert!(!short(100, 1000, MinFree::Bytes(100)));
    }

    #[test]
    fn the_snapshots_dir_is_found_above_the_layer() {
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "lowerdir=/r/snapshots/1/fs".into(),
                "upperdir=/r/io.containerd.snapshotter.v1.overlayfs/snapshots/12/fs".into(),
            ],
        };
        let dir = writable_dir(&[m]).unwrap();
        assert_eq!(
            snapshots_dir(&dir).unwrap(),
            Path::new("/r/io.containerd.snapshotter.v1.overlayfs/snapshots")
        );
        assert_eq!(snapshots_dir(Path::new("/elsewhere/fs")), None);
    }
}
