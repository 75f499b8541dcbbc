//! StatFile, ListFiles, MakeDirectory and RemovePath: entries described and changed with the
//! `*at` calls, never following a symlink or crossing a mount of a running sandbox.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::path::{cstring, join, split_last, SandboxPath};
use super::root::{
    fail, file_type, is_mount_point, mount_point_error, open_child_dir, read_names, FileType, Root,
};
use crate::error::{Error, Kind, Result};

/// Deepest ListFiles `depth` accepted.
pub const MAX_LIST_DEPTH: u32 = 32;
/// Most entries one ListFiles returns; a larger listing is FAILED_PRECONDITION, never truncated.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// Deepest directory tree a recursive RemovePath descends (each level holds a descriptor).
pub const MAX_REMOVE_DEPTH: usize = 256;
/// Mode of the directories MakeDirectory creates when the request gives none.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// One filesystem entry inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Absolute path inside the sandbox (names that are not UTF-8 are shown lossily).
    pub path: String,
    /// Its type.
    pub file_type: FileType,
    /// Content length of a file, target length of a symlink, the filesystem's size otherwise.
    pub size: u64,
    /// Permission bits (`mode & 07777`).
    pub mode: u32,
    /// Last modification of the content.
    pub modified_at: SystemTime,
    /// The target of a symlink as stored; `None` for other types.
    pub link_target: Option<String>,
}

fn entry(path: String, st: &FileStat, link_target: Option<String>) -> FileEntry {
    let nanos = Duration::from_nanos(u64::try_from(st.st_mtime_nsec).unwrap_or(0));
    let modified_at = if st.st_mtime >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.unsigned_abs()) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(st.st_mtime.unsigned_abs()) + nanos
    };
    FileEntry {
        path,
        file_type: file_type(st),
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        modified_at,
        link_target,
    }
}

fn lossy(name: &OsStr) -> String {
    String::from_utf8_lossy(name.as_bytes()).into_owned()
}

/// StatFile: describes `path`; a symlink as the last component is described, not followed.
pub fn stat(root: &Root, path: &SandboxPath) -> Result<FileEntry> {
    let p = path.as_str();
    let fd = root
        .open(p, OFlag::O_PATH | OFlag::O_NOFOLLOW)
        .map_err(|e| fail(p, e))?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| fail(p, e))?;
    let target = if file_type(&st) == FileType::Symlink {
        // An O_PATH descriptor of the link itself: the empty name reads it.
        let t = nix::fcntl::readlinkat(&fd, "").map_err(|e| fail(p, e))?;
        Some(lossy(&t))
    } else {
        None
    };
    Ok(entry(p.to_string(), &st, target))
}

/// How far ListFiles descends: 1 to [`MAX_LIST_DEPTH`] levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListDepth(u32);

impl ListDepth {
    /// Parses request field `field`: 0 means 1, negative or above the cap is invalid.
    pub fn parse(field: &str, depth: i32) -> Result<ListDepth> {
        match depth {
            0 => Ok(ListDepth(1)),
            d if d < 0 => Err(Error::invalid(field, "cannot be negative")),
            d if d as u32 > MAX_LIST_DEPTH => {
                Err(Error::invalid(field, format!("at most {MAX_LIST_DEPTH}")))
            }
            d => Ok(ListDepth(d as u32)),
        }
    }
}

/// ListFiles: the entries below directory `path` down to `depth` levels, sorted by path.
/// Symlinks are listed, never followed (the directory `path` itself may be reached through one).
pub fn list(root: &Root, path: &SandboxPath, depth: ListDepth) -> Result<Vec<FileEntry>> {
    let p = path.as_str();
    let dir = root
        .open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .map_err(|e| match e {
            Errno::ENOTDIR => Error::FailedPrecondition(format!("path {p:?} is not a directory")),
            e => fail(p, e),
        })?;
    let mut out = Vec::new();
    walk(&dir, p, 1, depth.0, &mut out, p)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(
    dir: &OwnedFd,
    dir_path: &str,
    level: u32,
    depth: u32,
    out: &mut Vec<FileEntry>,
    top: &str,
) -> Result<()> {
    for name in read_names(dir, dir_path)? {
        let shown = join(dir_path, &lossy(OsStr::from_bytes(name.to_bytes())));
        let st = match nix::sys::stat::fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed since the directory was read.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(fail(&shown, e)),
        };
        let kind = file_type(&st);
        let target = if kind == FileType::Symlink {
            match nix::fcntl::readlinkat(dir, name.as_c_str()) {
                Ok(t) => Some(lossy(&t)),
                Err(Errno::ENOENT | Errno::EINVAL) => continue,
                Err(e) => return Err(fail(&shown, e)),
            }
        } else {
            None
        };
        out.push(entry(shown.clone(), &st, target));
        if out.len() > MAX_LIST_ENTRIES {
            return Err(Error::FailedPrecondition(format!(
                "path {top:?} holds more than {MAX_LIST_ENTRIES} entries within depth {depth}; list a subdirectory or a smaller depth"
            )));
        }
        if kind == FileType::Directory && level < depth {
            match open_child_dir(dir, &name, true) {
                Ok(child) => walk(&child, &shown, level + 1, depth, out, top)?,
                // Replaced or removed since it was examined: list what is there now, no more.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {}
                Err(e) => return Err(fail(&shown, e)),
            }
        }
    }
    Ok(())
}

/// MakeDirectory: creates `path` with `mode`; with `parents`, also its missing parents, and an
/// existing directory is fine.
pub fn make_dir(root: &Root, path: &SandboxPath, parents: bool, mode: u32) -> Result<()> {
    let p = path.as_str();
    let exists = || Error::AlreadyExists {
        kind: Kind::Path,
        id: p.to_string(),
    };
    let Some((parent, name)) = split_last(p) else {
        return if parents { Ok(()) } else { Err(exists()) };
    };
    if !parents {
        if name == ".." {
            root.open(p, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(|e| fail(p, e))?;
            return Err(exists());
        }
        let dir = root.dir(parent)?;
        return mkdir_at(&dir, name, mode).map_err(|e| fail(p, e));
    }
    let mut prefix = String::from("/");
    let components: Vec<&str> = p[1..].split('/').collect();
    for (i, component) in components.iter().enumerate() {
        let this = join(&prefix, component);
        let last = i + 1 == components.len();
        let not_dir = || {
            if last {
                exists()
            } else {
                Error::FailedPrecondition(format!("path {this:?} exists and is not a directory"))
            }
        };
        match root.open(&this, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(_) => {}
            Err(Errno::ENOENT) if *component != ".." => {
                let dir = root.dir(&prefix)?;
                match mkdir_at(&dir, component, mode) {
                    // EEXIST: made meanwhile, or a dangling symlink (checked below).
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(fail(&this, e)),
                }
                match root.open(&this, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                    Ok(_) => {}
                    Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(not_dir()),
                    Err(e) => return Err(fail(&this, e)),
                }
            }
            Err(Errno::ENOTDIR) => return Err(not_dir()),
            Err(e) => return Err(fail(&this, e)),
        }
        prefix = this;
    }
    Ok(())
}

/// Creates directory `name` in `dir` with exactly `mode` (mkdir alone would apply the umask).
fn mkdir_at(dir: &OwnedFd, name: &str, mode: u32) -> nix::Result<()> {
    let c_name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    nix::sys::stat::mkdirat(dir, c_name.as_c_str(), Mode::from_bits_truncate(0o700))?;
    let made = nix::fcntl::openat(
        dir,
        c_name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    nix::unistd::fchown(&made, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))?;
    nix::sys::stat::fchmod(&made, Mode::from_bits_truncate(mode))
}

/// RemovePath: removes a file, a symlink (not its target) or a directory; a non-empty directory
/// only when `recursive`. Never follows a symlink or enters another mount while removing.
pub fn remove(root: &Root, path: &SandboxPath, recursive: bool) -> Result<()> {
    let p = path.as_str();
    let Some((parent, name)) = split_last(p) else {
        return Err(Error::invalid("path", "\"/\" cannot be removed"));
    };
    if name == ".." {
        return Err(Error::invalid(
            "path",
            format!("{p:?} ends in \"..\"; name the directory to remove"),
        ));
    }
    let dir = root.dir(parent)?;
    let c_name = cstring(name)?;
    let st = nix::sys::stat::fstatat(&dir, c_name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| fail(p, e))?;
    if is_mount_point(&dir, c_name.as_c_str()).map_err(|e| fail(p, e))? {
        return Err(mount_point_error(p));
    }
    if file_type(&st) != FileType::Directory {
        return nix::unistd::unlinkat(&dir, c_name.as_c_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| fail(p, e));
    }
    match nix::unistd::unlinkat(&dir, c_name.as_c_str(), UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(()),
        Err(Errno::ENOTEMPTY | Errno::EEXIST) if recursive => {
            match remove_tree(&dir, &c_name, p, 0)? {
                None => Ok(()),
                Some(mount) => Err(Error::FailedPrecondition(format!(
                    "path {p:?} holds mount point {mount:?} of the running sandbox, which is left alone; everything else below it was removed"
                ))),
            }
        }
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => Err(Error::FailedPrecondition(format!(
            "path {p:?} is a non-empty directory; set recursive to remove it"
        ))),
        Err(e) => Err(fail(p, e)),
    }
}

/// Removes directory `name` of `parent` and everything below it, descriptor by descriptor. Like
/// `rm -r` meeting a busy mount, it removes all it can and leaves mount points (and the
/// directories holding them) in place: returns the first mount point left, if any.
fn remove_tree(parent: &OwnedFd, name: &CStr, path: &str, level: usize) -> Result<Option<String>> {
    if level >= MAX_REMOVE_DEPTH {
        return Err(Error::FailedPrecondition(format!(
            "path {path:?} is more than {MAX_REMOVE_DEPTH} directories deep; remove its deepest parts first"
        )));
    }
    let dir = match open_child_dir(parent, name, false) {
        Ok(dir) => dir,
        Err(Errno::EXDEV) => return Ok(Some(path.to_string())),
        Err(e) => return Err(fail(path, e)),
    };
    let mut left = None;
    for child in read_names(&dir, path)? {
        let shown = join(path, &lossy(OsStr::from_bytes(child.to_bytes())));
        let st = match nix::sys::stat::fstatat(&dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(fail(&shown, e)),
        };
        let kept = if file_type(&st) == FileType::Directory {
            remove_tree(&dir, &child, &shown, level + 1)?
        } else if is_mount_point(&dir, child.as_c_str()).map_err(|e| fail(&shown, e))? {
            Some(shown)
        } else {
            match nix::unistd::unlinkat(&dir, child.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => None,
                Err(e) => return Err(fail(&shown, e)),
            }
        };
        left = left.or(kept);
    }
    if left.is_some() {
        return Ok(left);
    }
    match nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(fail(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::{path, Fixture};
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn directory_operations_through_escapes_stay_inside() {
        let f = Fixture::new();
        for p in f.escapes().into_iter().filter(|p| p != "/abs") {
            let r = remove(&f.root(), &path(&p), true);
            assert!(matches!(r, Err(Error::NotFound { .. })), "{p}: {r:?}");
        }
        for p in f.escapes() {
            // Where it succeeds, it created directories inside the root.
            let _ = make_dir(&f.root(), &path(&format!("{p}/x")), true, 0o755);
            let _ = list(&f.root(), &path(&p), ListDepth(2));
        }
        // Removing the symlinks removes the links only.
        remove(&f.root(), &path("/abs"), false).unwrap();
        remove(&f.root(), &path("/hostdir"), true).unwrap();
        f.assert_host_intact();
        // A recursive remove never follows a symlink inside the tree.
        std::fs::create_dir_all(f.root_dir.path().join("tree/sub")).unwrap();
        symlink(f.host.path(), f.root_dir.path().join("tree/sub/host")).unwrap();
        assert!(matches!(
            remove(&f.root(), &path("/tree"), false),
            Err(Error::FailedPrecondition(_))
        ));
        remove(&f.root(), &path("/tree"), true).unwrap();
        assert!(!f.root_dir.path().join("tree").exists());
        f.assert_host_intact();
        assert!(matches!(
            remove(&f.root(), &path("/"), true),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            remove(&f.root(), &path("/up/.."), true),
            Err(Error::InvalidArgument { .. })
        ));
    }
    #[test]
    fn list_and_stat_describe_without_following() {
        let f = Fixture::new();
        let r = f.root_dir.path();
        std::fs::create_dir_all(r.join("t/a/b")).unwrap();
        std::fs::write(r.join("t/a/f"), "12345").unwrap();
        symlink("/etc/passwd", r.join("t/l")).unwrap();
        symlink(f.host.path(), r.join("t/a/b/host")).unwrap();
        let names = |d: u32| -> Vec<String> {
            list(&f.root(), &path("/t"), ListDepth(d))
                .unwrap()
                .into_iter()
                .map(|e| e.path)
                .collect()
        };
        assert_eq!(names(1), ["/t/a", "/t/l"]);
        assert_eq!(names(2), ["/t/a", "/t/a/b", "/t/a/f", "/t/l"]);
        assert_eq!(
            names(3),
            ["/t/a", "/t/a/b", "/t/a/b/host", "/t/a/f", "/t/l"]
        );
        let l = stat(&f.root(), &path("/t/l")).unwrap();
        assert_eq!(l.file_type, FileType::Symlink);
        assert_eq!(l.link_target.as_deref(), Some("/etc/passwd"));
        assert_eq!(l.size, "/etc/passwd".len() as u64);
        let file = stat(&f.root(), &path("/t/a/f")).unwrap();
        assert_eq!((file.file_type, file.size), (FileType::Regular, 5));
        assert_eq!(
            stat(&f.root(), &path("/")).unwrap().file_type,
            FileType::Directory
        );
        assert!(matches!(
            list(&f.root(), &path("/t/a/f"), ListDepth(1)),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(ListDepth::parse("depth", 33).is_err() && ListDepth::parse("depth", -1).is_err());
        assert_eq!(ListDepth::parse("depth", 0).unwrap(), ListDepth(1));
    }

    #[test]
    fn make_dir_with_and_without_parents() {
        let f = Fixture::new();
        let r = f.root_dir.path();
        assert!(matches!(
            make_dir(&f.root(), &path("/x/y"), false, 0o755),
            Err(Error::NotFound { .. })
        ));
        make_dir(&f.root(), &path("/x/y/z"), true, 0o750).unwrap();
        let m = std::fs::metadata(r.join("x/y/z")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o750);
        make_dir(&f.root(), &path("/x/y/z"), true, 0o750).unwrap();
        assert!(matches!(
            make_dir(&f.root(), &path("/x/y/z"), false, 0o755),
            Err(Error::AlreadyExists { .. })
        ));
        assert!(matches!(
            make_dir(&f.root(), &path("/etc/passwd/d"), true, 0o755),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            make_dir(&f.root(), &path("/etc/passwd"), true, 0o755),
            Err(Error::AlreadyExists { .. })
        ));
        make_dir(&f.root(), &path("/x/w"), false, 0o1777).unwrap();
        let m = std::fs::metadata(r.join("x/w")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o1777);
    }
}
