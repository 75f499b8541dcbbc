//! File access inside a sandbox's root filesystem, confined to it.
//!
//! Confinement rests on one rule: a path inside the sandbox is only ever resolved by the kernel
//! with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to a descriptor of the
//! sandbox's root, so `..`, absolute or relative symlinks, chains of them and symlinks swapped in
//! during a call all stay inside the root. Changes act on the last component with the `*at`
//! system calls relative to a descriptor of its parent (opened the same way), which never follow
//! a symlink there. Trees are walked descriptor by descriptor without following symlinks (and a
//! removal never enters or removes a mount of a running sandbox). No host path string of a file
//! inside the sandbox is ever built; the only path strings opened on the host are the sandbox's
//! root itself and `/proc/self/fd/N`, which names a descriptor already open.
//!
//! Regular files are opened for I/O only after their type is checked on an `O_PATH` descriptor,
//! by re-opening that very descriptor through `/proc/self/fd`: opening a device node or FIFO that
//! an image or a sandbox planted could have effects on the host, so it never happens.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use tokio::sync::mpsc;

use crate::error::{Error, Kind, Result};
use crate::sandbox::{KeyGuard, Manager, SandboxId, SandboxRoot, State};
use crate::sys;

/// Size of the chunks ReadFile streams.
pub const READ_CHUNK: usize = 64 * 1024;
/// Chunks a ReadFile reader runs ahead of a slow client.
pub const READ_QUEUE: usize = 4;
/// Data messages a WriteFile stream runs ahead of the disk.
pub const WRITE_QUEUE: usize = 4;
/// Deepest ListFiles `depth` accepted.
pub const MAX_LIST_DEPTH: u32 = 32;
/// Most entries one ListFiles returns; a larger listing is FAILED_PRECONDITION, never truncated.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// Deepest directory tree a recursive RemovePath descends (each level holds a descriptor).
pub const MAX_REMOVE_DEPTH: usize = 256;
/// Longest path accepted, in bytes (the kernel's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Mode of a file WriteFile creates when the request gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of the directories MakeDirectory creates when the request gives none.
pub const DEFAULT_DIR_MODE: u32 = 0o755;
/// Symlinks WriteFile follows at the last component before giving up (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;
/// Times a resolution is retried when the kernel aborts it (EAGAIN) over a concurrent rename.
const RESOLVE_RETRIES: usize = 16;
/// Prefix of WriteFile's temporary files, created next to their target.
pub const TEMP_PREFIX: &str = ".sandboxd-write-";

/// Kernel pseudo-filesystems whose "regular files" are windows on the host kernel, not files of
/// the sandbox. The sandbox's own processes see them masked or read-only; sandboxd, as host
/// root, would not, so it never reads them.
const PSEUDO_FILESYSTEMS: [libc::c_long; 8] = [
    libc::PROC_SUPER_MAGIC,
    libc::SYSFS_MAGIC,
    libc::CGROUP_SUPER_MAGIC,
    libc::CGROUP2_SUPER_MAGIC,
    libc::DEBUGFS_MAGIC,
    libc::SECURITYFS_MAGIC,
    libc::TRACEFS_MAGIC,
    libc::BPF_FS_MAGIC,
];

// ---- paths ----

/// An absolute path inside a sandbox: non-empty, no NUL, at most [`MAX_PATH_LEN`] bytes and
/// [`MAX_NAME_LEN`] per component. Stored normalised: repeated slashes, `.` components and a
/// trailing slash are dropped; `..` is kept, since only the kernel can resolve it correctly
/// (`a/..` is not `.` when `a` is a symlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath(String);

impl SandboxPath {
    /// Parses request field `field`.
    pub fn parse(field: &str, p: &str) -> Result<SandboxPath> {
        if p.is_empty() {
            return Err(Error::invalid(field, "an absolute path is required"));
        }
        if !p.starts_with('/') {
            return Err(Error::invalid(
                field,
                format!("{p:?} is relative; an absolute path is required"),
            ));
        }
        if p.contains('\0') {
            return Err(Error::invalid(field, "contains a NUL byte"));
        }
        if p.len() > MAX_PATH_LEN {
            return Err(Error::invalid(
                field,
                format!("longer than {MAX_PATH_LEN} bytes"),
            ));
        }
        if p.split('/').any(|c| c.len() > MAX_NAME_LEN) {
            return Err(Error::invalid(
                field,
                format!("a component is longer than {MAX_NAME_LEN} bytes"),
            ));
        }
        Ok(SandboxPath(normalize(p)))
    }

    /// The normalised path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SandboxPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Drops empty and `.` components of an absolute path.
fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// A normalised path's parent and last component; `None` for `/`.
fn split_last(p: &str) -> Option<(&str, &str)> {
    let i = p.rfind('/')?;
    let name = &p[i + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if i == 0 { "/" } else { &p[..i] }, name))
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn cstring(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::invalid("path", "contains a NUL byte"))
}

// ---- errors ----

/// Maps a failed system call on `path` to the contract's error kinds.
fn fail(path: &str, e: Errno) -> Error {
    match e {
        Errno::ENOENT => Error::not_found(Kind::Path, path),
        Errno::EEXIST => Error::AlreadyExists {
            kind: Kind::Path,
            id: path.to_string(),
        },
        Errno::ENOTDIR => Error::FailedPrecondition(format!(
            "path {path:?}: a component of the path is not a directory"
        )),
        Errno::EISDIR => Error::FailedPrecondition(format!("path {path:?} is a directory")),
        Errno::ENOTEMPTY => {
            Error::FailedPrecondition(format!("path {path:?} is a non-empty directory"))
        }
        Errno::EBUSY => Error::FailedPrecondition(format!(
            "path {path:?} is a mount point or otherwise busy"
        )),
        Errno::EXDEV => Error::FailedPrecondition(format!(
            "path {path:?} is or holds a mount point, which is left alone"
        )),
        Errno::EROFS => {
            Error::FailedPrecondition(format!("path {path:?} is on a read-only filesystem"))
        }
        Errno::ETXTBSY => Error::FailedPrecondition(format!("path {path:?} is busy")),
        Errno::ENOSPC | Errno::EDQUOT => Error::FailedPrecondition(format!(
            "path {path:?}: no space left in the sandbox's filesystem"
        )),
        Errno::ELOOP => Error::PermissionDenied(format!(
            "path {path:?}: too many levels of symbolic links, or a /proc magic link, which is never followed"
        )),
        Errno::EACCES | Errno::EPERM => {
            Error::PermissionDenied(format!("path {path:?}: {}", e.desc()))
        }
        Errno::ENAMETOOLONG => Error::invalid("path", format!("{path:?} resolves to a path that is too long")),
        e => Error::io(format!("file access to {path:?} in the sandbox"), e.into()),
    }
}

// ---- the root ----

/// An open sandbox root: a descriptor of the directory that is the sandbox's `/`, and the guard
/// that keeps it reachable (for a stopped sandbox, its temporary mount and lock).
pub struct Root {
    fd: OwnedFd,
    /// The running PID 1 whose root this is; `None` for a mounted (stopped) sandbox.
    pid: Option<u32>,
    // Declared after `fd`: the descriptor closes before a temporary mount is detached.
    _guard: SandboxRoot,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("path", &self._guard.path())
            .finish()
    }
}

/// Opens the root of sandbox `id`, in any state.
pub async fn open_root(manager: &Manager, id: &SandboxId) -> Result<Root> {
    let guard = manager.sandbox_root(id).await?;
    let SandboxRoot::Running(root_path) = &guard else {
        return sys::blocking(move || Root::new(guard)).await;
    };
    let pid: u32 = root_path
        .parent()
        .and_then(|proc_dir| proc_dir.file_name()?.to_str()?.parse().ok())
        .ok_or_else(|| Error::Internal(format!("unexpected root {}", root_path.display())))?;
    let still_pid1 = || async {
        let now = manager.get(id).await?;
        Ok(matches!(now.state, State::Running | State::Paused) && now.pid == pid)
    };
    open_process_root(pid, guard, still_pid1)
        .await
        .map_err(|e| match e {
            Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
                "sandbox {id} stopped while its files were being opened; retry"
            )),
            e => e,
        })
}

/// Opens the root of the running process `pid` as the root of a sandbox, once `still_pid1`
/// confirms that `pid` is still the sandbox's PID 1. `/proc/<pid>/root` names whatever process
/// holds that pid when it is opened, so the process is pinned first by a descriptor of its /proc
/// directory: a pid recycled by a host process in between must never lend us the host's root.
/// FAILED_PRECONDITION when the process is gone.
pub async fn open_process_root<F, Fut>(pid: u32, guard: SandboxRoot, still_pid1: F) -> Result<Root>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let gone = || Error::FailedPrecondition(format!("process {pid} is gone"));
    let proc_fd = sys::blocking(move || {
        nix::fcntl::open(
            format!("/proc/{pid}").as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("opening /proc/{pid}"), e.into()))
    })
    .await
    .map_err(|_| gone())?;
    if !still_pid1().await? {
        return Err(gone());
    }
    let fd = sys::blocking(move || {
        nix::fcntl::openat(
            &proc_fd,
            "root",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("opening the root of a running sandbox", e.into()))
    })
    .await
    .map_err(|_| gone())?;
    Ok(Root {
        fd,
        pid: Some(pid),
        _guard: guard,
    })
}

/// Holds sandbox `id` still while `root` is changed: no commit, restore, stop or delete runs on
/// it until the guard drops, so a snapshot holds each change of FileService whole or not at
/// all. A stopped sandbox's root holds that lock already; for a running one it is taken here,
/// and the sandbox must still run the PID 1 whose root `root` is (a restore in between would
/// otherwise let the change land in the filesystem it replaced).
pub async fn hold_still(
    manager: &Manager,
    id: &SandboxId,
    root: &Root,
) -> Result<Option<KeyGuard>> {
    let Some(pid) = root.pid else {
        return Ok(None);
    };
    let guard = manager.lock(id.as_str()).await;
    let now = manager.get(id).await?;
    if !matches!(now.state, State::Running | State::Paused) || now.pid != pid {
        return Err(Error::FailedPrecondition(format!(
            "sandbox {id} was restarted or stopped during the call; nothing was changed, retry"
        )));
    }
    Ok(Some(guard))
}

impl Root {
    /// Opens the directory `guard` names (blocking).
    pub fn new(guard: SandboxRoot) -> Result<Root> {
        let fd = nix::fcntl::open(
            guard.path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("opening {}", guard.path().display()), e.into()))?;
        Ok(Root {
            fd,
            pid: None,
            _guard: guard,
        })
    }

    /// A path naming the root's directory while this `Root` lives (`/proc/self/fd/N`), for
    /// reads that take a root path.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Opens `path`, resolved inside the root. `O_CREAT` is never used here: files are created
    /// with the `*at` calls relative to their parent.
    fn open(&self, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        retry(|| nix::fcntl::openat2(&self.fd, path, how))
    }

    /// Opens directory `path` (following symlinks inside the root), for the `*at` calls.
    fn dir(&self, path: &str) -> Result<OwnedFd> {
        self.open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(|e| fail(path, e))
    }
}

/// Retries a resolution the kernel aborted because of a concurrent rename or mount.
fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    let mut n = 0;
    loop {
        match f() {
            Err(Errno::EAGAIN) if n < RESOLVE_RETRIES => n += 1,
            r => return r,
        }
    }
}

/// Opens a single directory entry `name` of `dir` as a directory, never following a symlink,
/// leaving `dir` or crossing into another mount.
fn open_child_dir(dir: &impl AsFd, name: &CStr, cross_mounts: bool) -> nix::Result<OwnedFd> {
    let mut resolve = ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    if !cross_mounts {
        resolve |= ResolveFlag::RESOLVE_NO_XDEV;
    }
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(resolve);
    retry(|| nix::fcntl::openat2(dir, name, how))
}

/// True when entry `name` of `dir` is a mount point in the namespace `dir` was reached through.
/// Such a mount (a running sandbox's /proc or its bind-mounted /etc/hosts) is invisible to the
/// kernel's own busy checks from sandboxd's namespace: unlinking or renaming over it would
/// silently detach it from the sandbox, so it is left alone.
fn is_mount_point(dir: &impl AsFd, name: &CStr) -> nix::Result<bool> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    match retry(|| nix::fcntl::openat2(dir, name, how)) {
        Ok(_) => Ok(false),
        Err(Errno::EXDEV) => Ok(true),
        Err(e) => Err(e),
    }
}

fn mount_point_error(path: &str) -> Error {
    Error::FailedPrecondition(format!(
        "path {path:?} is a mount point of the running sandbox, which is left alone"
    ))
}

/// The names in directory `fd`, without `.` and `..`.
fn read_names(fd: &OwnedFd, path: &str) -> Result<Vec<CString>> {
    let dup = fd.try_clone().map_err(|e| Error::io("dup", e))?;
    let mut dir = Dir::from_fd(dup).map_err(|e| fail(path, e))?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| fail(path, e))?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Re-opens the regular file behind `opath` (an `O_PATH` descriptor) for I/O. Anything else is
/// refused before it is opened, so no device or FIFO is ever opened.
fn reopen_regular(opath: &OwnedFd, flags: OFlag, path: &str) -> Result<File> {
    let st = nix::sys::stat::fstat(opath).map_err(|e| fail(path, e))?;
    match file_type(&st) {
        FileType::Regular => {}
        FileType::Directory => {
            return Err(Error::FailedPrecondition(format!(
                "path {path:?} is a directory"
            )))
        }
        _ => {
            return Err(Error::FailedPrecondition(format!(
                "path {path:?} is not a regular file"
            )))
        }
    }
    let fs = nix::sys::statfs::fstatfs(opath).map_err(|e| fail(path, e))?;
    if PSEUDO_FILESYSTEMS.contains(&fs.filesystem_type().0) {
        return Err(Error::PermissionDenied(format!(
            "path {path:?} is on a kernel pseudo-filesystem, which is not read through FileService"
        )));
    }
    // The magic link re-opens exactly this inode: no name is resolved again.
    let link = format!("/proc/self/fd/{}", opath.as_raw_fd());
    let fd = nix::fcntl::open(
        link.as_str(),
        flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| fail(path, e))?;
    let file = File::from(fd);
    let again = nix::sys::stat::fstat(&file).map_err(|e| fail(path, e))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Error::Internal(format!(
            "re-opening {path:?} reached another file"
        )));
    }
    Ok(file)
}

// ---- entries ----

/// The type of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

fn file_type(st: &FileStat) -> FileType {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileType::Regular,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    }
}

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

// ---- reading ----

/// Which bytes ReadFile returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    offset: u64,
    /// `None`: up to the end.
    length: Option<u64>,
}

impl ReadRange {
    /// Parses ReadFile's `offset` and `length` (0 = to the end); negative values are invalid.
    pub fn parse(offset: i64, length: i64) -> Result<ReadRange> {
        let offset =
            u64::try_from(offset).map_err(|_| Error::invalid("offset", "cannot be negative"))?;
        let length =
            u64::try_from(length).map_err(|_| Error::invalid("length", "cannot be negative"))?;
        Ok(ReadRange {
            offset,
            length: (length > 0).then_some(length),
        })
    }
}

/// An open regular file being read in chunks. Holds the sandbox root (and so a stopped
/// sandbox's mount) until dropped.
#[derive(Debug)]
pub struct FileReader {
    file: File,
    position: u64,
    remaining: Option<u64>,
    path: String,
    _root: Root,
}

impl FileReader {
    /// Opens regular file `path` (following symlinks inside the root) for `range` (blocking).
    pub fn open(root: Root, path: &SandboxPath, range: ReadRange) -> Result<FileReader> {
        let p = path.as_str();
        let opath = root.open(p, OFlag::O_PATH).map_err(|e| fail(p, e))?;
        let file = reopen_regular(&opath, OFlag::O_RDONLY, p)?;
        Ok(FileReader {
            file,
            position: range.offset,
            remaining: range.length,
            path: p.to_string(),
            _root: root,
        })
    }

    /// The next chunk of at most [`READ_CHUNK`] bytes, or `None` at the end (blocking).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let want = match self.remaining {
            Some(0) => return Ok(None),
            Some(r) => usize::try_from(r).unwrap_or(READ_CHUNK).min(READ_CHUNK),
            None => READ_CHUNK,
        };
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match self.file.read_at(&mut buf[filled..], self.position) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    self.position += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {:?}", self.path), e)),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        if let Some(r) = &mut self.remaining {
            *r -= filled as u64;
        }
        buf.truncate(filled);
        Ok(Some(buf))
    }
}

// ---- writing ----

/// What WriteFile writes, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSpec {
    /// The file; a symlink there is followed inside the root.
    pub path: SandboxPath,
    /// Permission bits of a new file.
    pub mode: u32,
    /// Keep the current content and add to it.
    pub append: bool,
    /// Owner of a new file.
    pub uid: u32,
    /// Group of a new file.
    pub gid: u32,
}

/// Input to [`AtomicWriter::run`].
#[derive(Debug)]
pub enum WriteInput {
    /// The next bytes.
    Data(bytes::Bytes),
    /// The stream ended well: make the file visible.
    Finish,
}

/// Writes a file atomically: the content goes to a temporary file in the target's directory,
/// which is fsynced and renamed over the target only when the stream ended well. Until then the
/// target is untouched; a writer dropped before [`AtomicWriter::publish`] leaves nothing behind.
/// The temporary file is anonymous (`O_TMPFILE`) where the filesystem allows it (overlayfs from
/// Linux 6.6): nothing inside the sandbox, and no snapshot taken meanwhile, sees it until it is
/// linked and renamed into place in one step. Elsewhere it is a hidden file named
/// [`TEMP_PREFIX`]`….tmp`, removed on failure. Append copies the current content into the
/// temporary file first, so it is atomic too (but two concurrent appends to one file can lose
/// one of them, as two writes can). Replacing the file gives it a new inode: hard links to the
/// old one keep the old content, and extended attributes are not carried over; mode and owner
/// are.
#[derive(Debug)]
pub struct AtomicWriter {
    dir: OwnedFd,
    name: CString,
    /// The temporary file's name in `dir`; `None` while it is anonymous.
    temp: Option<CString>,
    file: Option<File>,
    path: String,
    written: u64,
    committed: bool,
    root: Root,
}

impl AtomicWriter {
    /// Prepares writing `spec` in `root` (blocking): resolves the target, creates the temporary
    /// file with its mode and owner and, to append, copies the current content into it.
    pub fn create(root: Root, spec: &WriteSpec) -> Result<AtomicWriter> {
        let (dir, name, path) = resolve_for_write(&root, spec.path.as_str())?;
        let existing =
            match nix::sys::stat::fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Some(st),
                Err(Errno::ENOENT) => None,
                Err(e) => return Err(fail(&path, e)),
            };
        if existing.is_some()
            && is_mount_point(&dir, name.as_c_str()).map_err(|e| fail(&path, e))?
        {
            return Err(mount_point_error(&path));
        }
        if let Some(st) = &existing {
            match file_type(st) {
                FileType::Regular => {}
                FileType::Directory => {
                    return Err(Error::FailedPrecondition(format!(
                        "path {path:?} is a directory"
                    )))
                }
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "path {path:?} is not a regular file"
                    )))
                }
            }
        }
        let (fd, temp) = create_temp(&dir).map_err(|e| fail(&path, e))?;
        // From here on, dropping `writer` removes a named temporary file.
        let mut writer = AtomicWriter {
            dir,
            name,
            temp,
            file: Some(File::from(fd)),
            path,
            written: 0,
            committed: false,
            root,
        };
        let (mode, uid, gid) = match &existing {
            Some(st) => (st.st_mode & 0o7777, st.st_uid, st.st_gid),
            None => (spec.mode, spec.uid, spec.gid),
        };
        let file = writer
            .file
            .as_ref()
            .expect("the file is open until published");
        // chown first: it clears setuid and setgid bits that chmod then sets.
        nix::unistd::fchown(file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| fail(&writer.path, e))?;
        nix::sys::stat::fchmod(file, Mode::from_bits_truncate(mode))
            .map_err(|e| fail(&writer.path, e))?;
        if spec.append && existing.is_some() {
            writer.copy_existing()?;
        }
        Ok(writer)
    }

    fn copy_existing(&mut self) -> Result<()> {
        let opath = nix::fcntl::openat(
            &self.dir,
            self.name.as_c_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(&self.path, e))?;
        let mut src = reopen_regular(&opath, OFlag::O_RDONLY, &self.path)?;
        let dst = self
            .file
            .as_mut()
            .expect("the file is open until published");
        // std copies file to file in the kernel (copy_file_range) where it can.
        std::io::copy(&mut src, dst)
            .map(drop)
            .map_err(|e| Error::io(format!("copying {:?} to append to it", self.path), e))
    }

    /// The root the file is written in.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Adds `data` to the file (blocking).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .expect("the file is open until published");
        file.write_all(data).map_err(|e| match e.raw_os_error() {
            Some(n) => fail(&self.path, Errno::from_raw(n)),
            None => Error::io(format!("writing {:?}", self.path), e),
        })?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Flushes the written content to disk (blocking): what stays to do is [`Self::publish`].
    pub fn sync(&mut self) -> Result<()> {
        let file = self
            .file
            .as_ref()
            .expect("the file is open until published");
        file.sync_all()
            .map_err(|e| Error::io(format!("syncing {:?}", self.path), e))
    }

    /// Makes the synced content the file's in one rename (blocking) and returns the bytes
    /// written by this call (not counting appended-to content).
    pub fn publish(mut self) -> Result<u64> {
        let file = self.file.take().expect("the file is open until published");
        let temp = match self.temp.take() {
            Some(temp) => temp,
            None => {
                // An anonymous file gets a name only now, for the rename that follows at once.
                let temp = temp_name()?;
                let link = format!("/proc/self/fd/{}", file.as_raw_fd());
                nix::unistd::linkat(
                    &self.dir,
                    link.as_str(),
                    &self.dir,
                    temp.as_c_str(),
                    AtFlags::AT_SYMLINK_FOLLOW,
                )
                .map_err(|e| fail(&self.path, e))?;
                temp
            }
        };
        drop(file);
        let temp = self.temp.insert(temp);
        nix::fcntl::renameat(&self.dir, temp.as_c_str(), &self.dir, self.name.as_c_str())
            .map_err(|e| fail(&self.path, e))?;
        self.committed = true;
        // The rename itself is durable once the directory is.
        nix::unistd::fsync(&self.dir).map_err(|e| fail(&self.path, e))?;
        Ok(self.written)
    }

    /// Writes and syncs what `input` brings until [`WriteInput::Finish`] (blocking), then returns
    /// the writer for [`Self::publish`]. When the channel closes first (the stream failed or the
    /// caller went away), nothing changes and the temporary file is removed.
    pub fn run(mut self, mut input: mpsc::Receiver<WriteInput>) -> Result<AtomicWriter> {
        loop {
            match input.blocking_recv() {
                Some(WriteInput::Data(data)) => self.write(&data)?,
                Some(WriteInput::Finish) => {
                    // Free the sender before the slow part.
                    drop(input);
                    self.sync()?;
                    return Ok(self);
                }
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "the write of {:?} was abandoned before the stream ended",
                        self.path
                    )))
                }
            }
        }
    }
}

/// A fresh name for a temporary file: hidden, and recognisable as ours.
fn temp_name() -> Result<CString> {
    cstring(&format!("{TEMP_PREFIX}{}.tmp", crate::util::random_hex(8)))
}

/// Creates the temporary file of a write in `dir`: anonymous where the filesystem can, else
/// named (the name returned).
fn create_temp(dir: &OwnedFd) -> nix::Result<(OwnedFd, Option<CString>)> {
    let mode = Mode::from_bits_truncate(0o600);
    match nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        mode,
    ) {
        Ok(fd) => return Ok((fd, None)),
        // No O_TMPFILE on this filesystem (EOPNOTSUPP), or a kernel that predates it and
        // treats the flag as O_DIRECTORY (EISDIR) or rejects it (EINVAL).
        Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
        Err(e) => return Err(e),
    }
    let temp = temp_name().map_err(|_| Errno::EINVAL)?;
    let fd = nix::fcntl::openat(
        dir,
        temp.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )?;
    Ok((fd, Some(temp)))
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.file.take();
        let Some(temp) = &self.temp else {
            // Anonymous: closing it was all it took.
            return;
        };
        if let Err(e) =
            nix::unistd::unlinkat(&self.dir, temp.as_c_str(), UnlinkatFlags::NoRemoveDir)
        {
            tracing::warn!(path = %self.path, error = %e, "removing a WriteFile temporary file failed");
        }
    }
}

/// The parent directory and last component of the file `path` names, following symlinks at
/// the last component inside the root (like `echo > link`), and the resolved path for messages.
fn resolve_for_write(root: &Root, path: &str) -> Result<(OwnedFd, CString, String)> {
    let mut current = path.to_string();
    for _ in 0..MAX_SYMLINK_HOPS {
        let Some((parent, name)) = split_last(&current) else {
            return Err(Error::FailedPrecondition(format!(
                "path {current:?} is a directory"
            )));
        };
        if name == ".." {
            // Always a directory, when it exists.
            root.open(&current, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(|e| fail(&current, e))?;
            return Err(Error::FailedPrecondition(format!(
                "path {current:?} is a directory"
            )));
        }
        let dir = root.dir(parent)?;
        let c_name = cstring(name)?;
        match nix::sys::stat::fstatat(&dir, c_name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if file_type(&st) == FileType::Symlink => {
                let target = nix::fcntl::readlinkat(&dir, c_name.as_c_str())
                    .map_err(|e| fail(&current, e))?;
                let target = target.to_str().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "path {current:?} is a symlink whose target is not UTF-8"
                    ))
                })?;
                let next = if target.starts_with('/') {
                    target.to_string()
                } else {
                    join(parent, target)
                };
                if next.len() > MAX_PATH_LEN {
                    return Err(fail(&current, Errno::ENAMETOOLONG));
                }
                current = normalize(&next);
            }
            Ok(_) | Err(Errno::ENOENT) => return Ok((dir, c_name, current)),
            Err(e) => return Err(fail(&current, e)),
        }
    }
    Err(fail(path, Errno::ELOOP))
}

// ---- directories ----

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
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// A fake sandbox root and, beside it, a host directory holding a secret.
    struct Fixture {
        root_dir: tempfile::TempDir,
        host: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let root_dir = tempfile::tempdir().unwrap();
            let host = tempfile::tempdir().unwrap();
            std::fs::write(host.path().join("secret"), "host secret").unwrap();
            let r = root_dir.path();
            std::fs::create_dir_all(r.join("etc")).unwrap();
            std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
            symlink(host.path().join("secret"), r.join("abs")).unwrap();
            symlink(host.path(), r.join("hostdir")).unwrap();
            symlink("../../../../../../../..", r.join("up")).unwrap();
            symlink("chain1", r.join("chain0")).unwrap();
            symlink("/up/..", r.join("chain1")).unwrap();
            Fixture { root_dir, host }
        }

        fn root(&self) -> Root {
            Root::new(SandboxRoot::Running(self.root_dir.path().to_path_buf())).unwrap()
        }

        fn host_secret(&self) -> String {
            self.host.path().join("secret").display().to_string()
        }

        fn escapes(&self) -> Vec<String> {
            let h = self.host.path().display().to_string();
            vec![
                "/abs".into(),
                format!("/hostdir/secret"),
                format!("/up{}", self.host_secret()),
                format!("/../../../..{}", self.host_secret()),
                format!("/chain0{}", self.host_secret()),
                format!("/etc/../../..{h}/secret"),
            ]
        }

        fn assert_host_intact(&self) {
            assert_eq!(
                std::fs::read_to_string(self.host.path().join("secret")).unwrap(),
                "host secret"
            );
            let names: Vec<_> = std::fs::read_dir(self.host.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["secret"]);
        }
    }

    fn path(p: &str) -> SandboxPath {
        SandboxPath::parse("path", p).unwrap()
    }

    fn read_all(root: Root, p: &str, range: ReadRange) -> Result<Vec<u8>> {
        let mut r = FileReader::open(root, &path(p), range)?;
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk()? {
            assert!(c.len() <= READ_CHUNK);
            out.extend(c);
        }
        Ok(out)
    }

    fn write(root: Root, p: &str, data: &[u8], append: bool) -> Result<u64> {
        let spec = WriteSpec {
            path: path(p),
            mode: DEFAULT_FILE_MODE,
            append,
            uid: 0,
            gid: 0,
        };
        let mut w = AtomicWriter::create(root, &spec)?;
        w.write(data)?;
        w.sync()?;
        w.publish()
    }

    #[test]
    fn paths_are_validated_and_normalised() {
        for bad in ["", "rel", "./x", "/a\0b"] {
            let e = SandboxPath::parse("path", bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid path"), "{bad:?}: {e}");
        }
        assert!(SandboxPath::parse("path", &format!("/{}", "a".repeat(256))).is_err());
        assert!(SandboxPath::parse("path", &"/a".repeat(2049)).is_err());
        assert_eq!(path("/").as_str(), "/");
        assert_eq!(path("//a/./b//").as_str(), "/a/b");
        assert_eq!(path("/a/../b").as_str(), "/a/../b");
        assert_eq!(split_last("/"), None);
        assert_eq!(split_last("/a"), Some(("/", "a")));
        assert_eq!(split_last("/a/b"), Some(("/a", "b")));
    }

    #[test]
    fn reads_through_escapes_never_reach_the_host() {
        let f = Fixture::new();
        for p in f.escapes() {
            match read_all(f.root(), &p, ReadRange::parse(0, 0).unwrap()) {
                Err(Error::NotFound { .. }) => {}
                other => panic!("{p}: {other:?}"),
            }
        }
        // `..` past the root stays at the root.
        let passwd = read_all(f.root(), "/up/etc/passwd", ReadRange::parse(0, 0).unwrap());
        assert_eq!(passwd.unwrap(), b"root:x:0:0::/root:/bin/sh\n");
    }

    #[test]
    fn writes_through_escapes_stay_inside() {
        let f = Fixture::new();
        for p in f.escapes() {
            match write(f.root(), &p, b"pwned", false) {
                Err(Error::NotFound { .. }) => {}
                other => panic!("{p}: {other:?}"),
            }
            let _ = write(f.root(), &p, b"pwned", true);
        }
        f.assert_host_intact();
        // With the host's directory mirrored inside, the write lands on the sandbox's own file.
        let inside = f
            .root_dir
            .path()
            .join(f.host.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        assert_eq!(write(f.root(), "/abs", b"mine", false).unwrap(), 4);
        assert_eq!(std::fs::read(inside.join("secret")).unwrap(), b"mine");
        // The symlink itself is still a symlink.
        assert!(f.root_dir.path().join("abs").is_symlink());
        f.assert_host_intact();
    }

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
    fn write_keeps_mode_and_owner_appends_and_leaves_no_temp_file() {
        let f = Fixture::new();
        let r = f.root_dir.path();
        assert_eq!(write(f.root(), "/etc/new", b"abc", false).unwrap(), 3);
        let m = std::fs::metadata(r.join("etc/new")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o644);
        std::fs::set_permissions(r.join("etc/new"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::chown(r.join("etc/new"), Some(12), Some(34)).unwrap();
        assert_eq!(write(f.root(), "/etc/new", b"def", true).unwrap(), 3);
        assert_eq!(std::fs::read(r.join("etc/new")).unwrap(), b"abcdef");
        let m = std::fs::metadata(r.join("etc/new")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 12, 34));
        // Abandoned: nothing changes and no temporary file remains.
        let spec = WriteSpec {
            path: path("/etc/new"),
            mode: 0o644,
            append: false,
            uid: 0,
            gid: 0,
        };
        let names = || -> Vec<_> {
            std::fs::read_dir(r.join("etc"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        let mut w = AtomicWriter::create(f.root(), &spec).unwrap();
        w.write(b"partial").unwrap();
        // The temporary file is anonymous (ext4 has O_TMPFILE): the directory does not show it.
        assert_eq!(names().len(), 2, "{:?}", names());
        drop(w);
        assert_eq!(std::fs::read(r.join("etc/new")).unwrap(), b"abcdef");
        assert_eq!(names().len(), 2, "{:?}", names());
        assert!(matches!(
            write(f.root(), "/etc", b"x", false),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            write(f.root(), "/nodir/x", b"x", false),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn reads_honour_offset_and_length_and_refuse_non_files() {
        let f = Fixture::new();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        std::fs::write(f.root_dir.path().join("big"), &data).unwrap();
        let all = read_all(f.root(), "/big", ReadRange::parse(0, 0).unwrap()).unwrap();
        assert_eq!(all, data);
        let part = read_all(f.root(), "/big", ReadRange::parse(70_000, 100_000).unwrap()).unwrap();
        assert_eq!(part, &data[70_000..170_000]);
        let tail = read_all(f.root(), "/big", ReadRange::parse(199_990, 100).unwrap()).unwrap();
        assert_eq!(tail, &data[199_990..]);
        assert!(
            read_all(f.root(), "/big", ReadRange::parse(300_000, 0).unwrap())
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            read_all(f.root(), "/etc", ReadRange::parse(0, 0).unwrap()),
            Err(Error::FailedPrecondition(_))
        ));
        nix::unistd::mkfifo(
            &f.root_dir.path().join("fifo"),
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(
            read_all(f.root(), "/fifo", ReadRange::parse(0, 0).unwrap()),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(ReadRange::parse(-1, 0).is_err() && ReadRange::parse(0, -1).is_err());
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
