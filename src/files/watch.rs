//! Changes under a path inside a sandbox, from inotify.
//!
//! Confinement is the same rule as every other access: the watched path is opened with
//! `openat2(RESOLVE_IN_ROOT)` against the root's descriptor, and subdirectories (recursive
//! watches) one entry at a time from their parent's descriptor without following symlinks or
//! crossing mounts. The watch itself is added through `/proc/self/fd/N` of the descriptor
//! already open, so no path inside the sandbox is ever resolved by name on the host.
//!
//! A watch reports paths by name, so it keeps each watched directory's path inside the
//! sandbox and rewrites it when a watched directory is renamed within the tree. A rename is
//! one inotify MOVED_FROM/MOVED_TO pair with one cookie, queued together by the kernel: a
//! MOVED_FROM left unpaired at the end of what one read returns moved out of the tree.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::path::SandboxPath;
use super::root::{fail, file_type, open_child_dir, read_names, FileType, Root};
use crate::error::{Error, Result};

/// Directories one watch may follow; past it, newer ones are not watched (OVERFLOW).
pub const MAX_WATCHED_DIRS: usize = 8192;
/// Events queued for a slow client before they are dropped (and OVERFLOW sent).
pub const WATCH_QUEUE: usize = 256;
/// Reads of the inotify queue one call to [`FileWatch::read`] makes at most, so a busy tree
/// cannot keep it from returning.
const READS_PER_CALL: usize = 64;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEventKind {
    /// Created, or moved into the tree.
    Created,
    /// Written.
    Modified,
    /// Removed, or moved out of the tree.
    Deleted,
    /// Renamed within the tree.
    Renamed,
    /// Events were lost.
    Overflow,
}

/// One change, with paths inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    /// What happened.
    pub kind: FileEventKind,
    /// The path (the new one for a rename; the watched path for an overflow).
    pub path: String,
    /// The old path of a rename.
    pub old_path: Option<String>,
    /// Whether the entry is a directory.
    pub is_dir: bool,
}

/// A watch on a path inside a sandbox's root. Its descriptor is non-blocking: poll it for
/// readability, then [`FileWatch::read`] (which may open new subdirectories: blocking).
pub struct FileWatch {
    inotify: Inotify,
    root: Root,
    /// The watched directories' paths, by watch.
    dirs: HashMap<WatchDescriptor, String>,
    /// The watched path and its watch.
    top: String,
    top_wd: WatchDescriptor,
    recursive: bool,
    /// A directory was left unwatched (the cap) since the last read: report an overflow.
    missed: bool,
    /// The watched path itself is gone: the watch is over.
    ended: bool,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("top", &self.top)
            .field("dirs", &self.dirs.len())
            .field("recursive", &self.recursive)
            .finish()
    }
}

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);
const FILE_MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn watch_error(path: &str, e: Errno) -> Error {
    match e {
        Errno::ENOSPC | Errno::EMFILE => Error::ResourceExhausted(format!(
            "watching {path:?}: the node's inotify limits are reached \
             (fs.inotify.max_user_watches / max_user_instances)"
        )),
        e => fail(path, e),
    }
}

impl FileWatch {
    /// Starts watching `path` inside `root` (blocking): a directory's entries (its whole tree
    /// when `recursive`), or a single file. RESOURCE_EXHAUSTED when the tree has more than
    /// [`MAX_WATCHED_DIRS`] directories.
    pub fn open(root: Root, path: &SandboxPath, recursive: bool) -> Result<FileWatch> {
        let top = path.as_str().to_string();
        let fd = root.open(&top, OFlag::O_PATH).map_err(|e| fail(&top, e))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| fail(&top, e))?;
        let is_dir = file_type(&st) == FileType::Directory;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| watch_error(&top, e))?;
        let mask = if is_dir { DIR_MASK } else { FILE_MASK };
        let top_wd = add_watch(&inotify, &fd, mask).map_err(|e| watch_error(&top, e))?;
        let mut watch = FileWatch {
            inotify,
            root,
            dirs: HashMap::from([(top_wd, top.clone())]),
            top: top.clone(),
            top_wd,
            recursive: recursive && is_dir,
            missed: false,
            ended: false,
        };
        if watch.recursive {
            let dir = watch.root.dir(&top)?;
            watch.watch_tree(dir, &top, None)?;
            if watch.missed {
                return Err(Error::ResourceExhausted(format!(
                    "{top:?} holds more than {MAX_WATCHED_DIRS} directories, more than one \
                     recursive watch follows; watch a smaller tree"
                )));
            }
        }
        Ok(watch)
    }

    /// True once the watched path itself was deleted or moved: nothing more will come.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The watched path.
    pub fn path(&self) -> &str {
        &self.top
    }

    /// The events queued so far (empty when there are none: never waits). Directories
    /// created in a recursive watch are watched from here on, and what they already hold is
    /// reported as created.
    pub fn read(&mut self) -> Result<Vec<FileEvent>> {
        let mut raw = Vec::new();
        for _ in 0..READS_PER_CALL {
            match self.inotify.read_events() {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => raw.extend(batch),
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("reading inotify events", e.into())),
            }
        }
        let mut out = Vec::new();
        let mut moved_from: Option<(u32, String, bool)> = None;
        for ev in raw {
            let mask = ev.mask;
            if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                self.flush_moved(&mut moved_from, &mut out);
                out.push(self.overflow());
                continue;
            }
            if mask.contains(AddWatchFlags::IN_IGNORED) {
                self.dirs.remove(&ev.wd);
                if ev.wd == self.top_wd && !self.ended {
                    self.ended = true;
                    out.push(FileEvent {
                        kind: FileEventKind::Deleted,
                        path: self.top.clone(),
                        old_path: None,
                        is_dir: self.recursive,
                    });
                }
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let is_dir = mask.contains(AddWatchFlags::IN_ISDIR);
            let name = ev.name.as_ref().map(|n| n.to_string_lossy().into_owned());
            let path = match &name {
                Some(n) => join(&dir, n),
                None => dir.clone(),
            };
            if !mask.contains(AddWatchFlags::IN_MOVED_TO) {
                self.flush_moved(&mut moved_from, &mut out);
            }
            let event = |kind| FileEvent {
                kind,
                path: path.clone(),
                old_path: None,
                is_dir,
            };
            if mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF) {
                if ev.wd == self.top_wd && !self.ended {
                    self.ended = true;
                    out.push(FileEvent {
                        kind: FileEventKind::Deleted,
                        path: self.top.clone(),
                        old_path: None,
                        is_dir: self.recursive,
                    });
                }
                // A subdirectory's own removal or move was reported by its parent.
                continue;
            }
            if mask.contains(AddWatchFlags::IN_CREATE) {
                out.push(event(FileEventKind::Created));
                if is_dir && self.recursive {
                    self.watch_new_dir(&dir, name.as_deref(), &path, &mut out);
                }
            } else if mask.contains(AddWatchFlags::IN_MODIFY) {
                // A long write is many MODIFY events in a row: one is enough.
                let repeated = out.last().is_some_and(|l: &FileEvent| {
                    l.kind == FileEventKind::Modified && l.path == path
                });
                if !repeated {
                    out.push(event(FileEventKind::Modified));
                }
            } else if mask.contains(AddWatchFlags::IN_DELETE) {
                out.push(event(FileEventKind::Deleted));
            } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                self.flush_moved(&mut moved_from, &mut out);
                moved_from = Some((ev.cookie, path, is_dir));
            } else if mask.contains(AddWatchFlags::IN_MOVED_TO) {
                match moved_from.take() {
                    Some((cookie, old, _)) if cookie == ev.cookie => {
                        if is_dir && self.recursive {
                            self.rename_dirs(&old, &path);
                        }
                        out.push(FileEvent {
                            kind: FileEventKind::Renamed,
                            path: path.clone(),
                            old_path: Some(old),
                            is_dir,
                        });
                    }
                    other => {
                        moved_from = other;
                        self.flush_moved(&mut moved_from, &mut out);
                        out.push(event(FileEventKind::Created));
                        if is_dir && self.recursive {
                            self.watch_new_dir(&dir, name.as_deref(), &path, &mut out);
                        }
                    }
                }
            }
        }
        self.flush_moved(&mut moved_from, &mut out);
        if std::mem::take(&mut self.missed) {
            out.push(self.overflow());
        }
        Ok(out)
    }

    fn overflow(&self) -> FileEvent {
        FileEvent {
            kind: FileEventKind::Overflow,
            path: self.top.clone(),
            old_path: None,
            is_dir: self.recursive,
        }
    }

    /// A MOVED_FROM with no MOVED_TO left the tree: deleted, and its watches with it.
    fn flush_moved(&mut self, moved: &mut Option<(u32, String, bool)>, out: &mut Vec<FileEvent>) {
        if let Some((_, path, is_dir)) = moved.take() {
            if is_dir && self.recursive {
                self.unwatch_under(&path);
            }
            out.push(FileEvent {
                kind: FileEventKind::Deleted,
                path,
                old_path: None,
                is_dir,
            });
        }
    }

    /// Watches directory `name` just created in watched directory `parent` (at `path`), and
    /// its tree, reporting what it already holds as created.
    fn watch_new_dir(
        &mut self,
        parent: &str,
        name: Option<&str>,
        path: &str,
        out: &mut Vec<FileEvent>,
    ) {
        let (Some(name), Ok(parent_fd)) = (name, self.root.dir(parent)) else {
            return;
        };
        let Ok(cname) = CString::new(name) else {
            return;
        };
        // Gone already, replaced by a symlink or a mount: nothing to follow.
        let Ok(dir) = open_child_dir(&parent_fd, &cname, false) else {
            return;
        };
        let _ = self.watch_tree(dir, path, Some(out));
    }

    /// Adds watches to directory `dir` (at `path`) and every directory below it, up to the
    /// cap; with `found`, reports each entry below it as created.
    fn watch_tree(
        &mut self,
        dir: OwnedFd,
        path: &str,
        mut found: Option<&mut Vec<FileEvent>>,
    ) -> Result<()> {
        let mut queue = vec![(dir, path.to_string())];
        while let Some((dir, path)) = queue.pop() {
            if path != self.top {
                if self.dirs.len() >= MAX_WATCHED_DIRS {
                    self.missed = true;
                    return Ok(());
                }
                match add_watch(&self.inotify, &dir, DIR_MASK) {
                    Ok(wd) => {
                        self.dirs.insert(wd, path.clone());
                    }
                    Err(Errno::ENOSPC) => {
                        self.missed = true;
                        return Ok(());
                    }
                    Err(_) => continue,
                }
            }
            let Ok(names) = read_names(&dir, &path) else {
                continue;
            };
            for name in names {
                let child = join(&path, &name.to_string_lossy());
                let sub = open_child_dir(&dir, &name, false);
                if let Some(found) = found.as_deref_mut() {
                    found.push(FileEvent {
                        kind: FileEventKind::Created,
                        path: child.clone(),
                        old_path: None,
                        is_dir: sub.is_ok(),
                    });
                }
                if let Ok(sub) = sub {
                    queue.push((sub, child));
                }
            }
        }
        Ok(())
    }

    /// A watched directory moved from `old` to `new`: its watches' paths follow.
    fn rename_dirs(&mut self, old: &str, new: &str) {
        let prefix = format!("{old}/");
        for path in self.dirs.values_mut() {
            if path == old {
                *path = new.to_string();
            } else if let Some(rest) = path.strip_prefix(&prefix) {
                *path = format!("{new}/{rest}");
            }
        }
    }

    /// Stops watching `path` and everything below it (it left the tree).
    fn unwatch_under(&mut self, path: &str) {
        let prefix = format!("{path}/");
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, p)| *p == path || p.starts_with(&prefix))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }
}

impl AsRawFd for FileWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

/// Watches the very file `fd` is open on, by its `/proc/self/fd` link: nothing is looked up
/// by name.
fn add_watch(inotify: &Inotify, fd: &OwnedFd, mask: AddWatchFlags) -> nix::Result<WatchDescriptor> {
    inotify.add_watch(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, path: &str, recursive: bool) -> Result<FileWatch> {
        let root = Root::open_dir(dir, None).unwrap();
        FileWatch::open(root, &SandboxPath::parse("path", path).unwrap(), recursive)
    }

    /// Reads until `n` events came (inotify queues them at once: a few reads at most).
    fn events(w: &mut FileWatch, n: usize) -> Vec<FileEvent> {
        let mut got = Vec::new();
        for _ in 0..100 {
            got.extend(w.read().unwrap());
            if got.len() >= n {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        got
    }

    fn kinds(evs: &[FileEvent]) -> Vec<(FileEventKind, &str)> {
        evs.iter().map(|e| (e.kind, e.path.as_str())).collect()
    }

    #[test]
    fn create_modify_rename_delete_are_reported_with_sandbox_paths() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = open(tmp.path(), "/d", false).unwrap();
        std::fs::write(tmp.path().join("d/a"), b"x").unwrap();
        std::fs::rename(tmp.path().join("d/a"), tmp.path().join("d/b")).unwrap();
        std::fs::remove_file(tmp.path().join("d/b")).unwrap();
        let got = events(&mut w, 4);
        assert_eq!(
            kinds(&got),
            vec![
                (FileEventKind::Created, "/d/a"),
                (FileEventKind::Modified, "/d/a"),
                (FileEventKind::Renamed, "/d/b"),
                (FileEventKind::Deleted, "/d/b"),
            ]
        );
        assert_eq!(got[2].old_path.as_deref(), Some("/d/a"));
    }

    #[test]
    fn a_recursive_watch_follows_new_and_renamed_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = open(tmp.path(), "/", true).unwrap();
        std::fs::create_dir(tmp.path().join("x")).unwrap();
        assert_eq!(
            kinds(&events(&mut w, 1)),
            vec![(FileEventKind::Created, "/x")]
        );
        std::fs::rename(tmp.path().join("x"), tmp.path().join("y")).unwrap();
        assert_eq!(
            kinds(&events(&mut w, 1)),
            vec![(FileEventKind::Renamed, "/y")]
        );
        std::fs::write(tmp.path().join("y/f"), b"").unwrap();
        assert_eq!(
            kinds(&events(&mut w, 1)),
            vec![(FileEventKind::Created, "/y/f")]
        );
    }

    #[test]
    fn a_path_through_a_symlink_stays_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("esc")).unwrap();
        // Resolved inside the root, the link's absolute target does not exist there.
        let err = open(tmp.path(), "/esc", false).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        // `..` at the root stays at the root: the root itself is watched.
        assert!(open(tmp.path(), "/../../..", false).is_ok());
    }

    #[test]
    fn deleting_the_watched_directory_ends_the_watch() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = open(tmp.path(), "/d", false).unwrap();
        std::fs::remove_dir(tmp.path().join("d")).unwrap();
        let got = events(&mut w, 1);
        assert_eq!(kinds(&got), vec![(FileEventKind::Deleted, "/d")]);
        assert!(w.ended());
    }
}
