//! The confined root: a descriptor of a sandbox's `/` and the only ways paths are opened
//! against it.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, Kind, Result};
use crate::sys;

/// Times a resolution is retried when the kernel aborts it (EAGAIN) over a concurrent rename.
const RESOLVE_RETRIES: usize = 16;

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

/// Maps a failed system call on `path` to the contract's error kinds.
pub(super) fn fail(path: &str, e: Errno) -> Error {
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

/// Whatever keeps a root reachable while it is open (for a stopped sandbox, its temporary mount
/// and lock), handed over by the layer that found the root and dropped after the descriptor.
pub type KeepAlive = Box<dyn Send + Sync>;

/// An open sandbox root: a descriptor of the directory that is the sandbox's `/`, and what keeps
/// it reachable.
pub struct Root {
    fd: OwnedFd,
    /// The running PID 1 whose root this is; `None` for a directory (a stopped sandbox's mount).
    pid: Option<u32>,
    // Declared after `fd`: the descriptor closes before a temporary mount is detached.
    _keep: Option<KeepAlive>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("fd", &self.fd.as_raw_fd())
            .field("pid", &self.pid)
            .finish()
    }
}

/// Opens the root of the running process `pid` as the root of a sandbox, once `still_pid1`
/// confirms that `pid` is still the sandbox's PID 1. `/proc/<pid>/root` names whatever process
/// holds that pid when it is opened, so the process is pinned first by a descriptor of its /proc
/// directory: a pid recycled by a host process in between must never lend us the host's root.
/// FAILED_PRECONDITION when the process is gone.
pub async fn open_process_root<F, Fut>(
    pid: u32,
    keep: Option<KeepAlive>,
    still_pid1: F,
) -> Result<Root>
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
        _keep: keep,
    })
}

impl Root {
    /// Opens host directory `dir` as a root (blocking); `keep` lives as long as the root. `dir`
    /// is a path the caller trusts (a mount point it made): only paths inside it are confined.
    pub fn open_dir(dir: &Path, keep: Option<KeepAlive>) -> Result<Root> {
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(format!("opening {}", dir.display()), e.into()))?;
        Ok(Root {
            fd,
            pid: None,
            _keep: keep,
        })
    }

    /// The running PID 1 whose root this is; `None` for a root opened as a directory.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// True when `path` is a directory inside the root (following symlinks inside it; blocking).
    pub fn is_dir(&self, path: &str) -> bool {
        self.open(path, OFlag::O_PATH | OFlag::O_DIRECTORY).is_ok()
    }

    /// Opens `path`, resolved inside the root. `O_CREAT` is never used here: files are created
    /// with the `*at` calls relative to their parent.
    pub(super) fn open(&self, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        retry(|| nix::fcntl::openat2(&self.fd, path, how))
    }

    /// Opens directory `path` (following symlinks inside the root), for the `*at` calls.
    pub(super) fn dir(&self, path: &str) -> Result<OwnedFd> {
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
pub(super) fn open_child_dir(
    dir: &impl AsFd,
    name: &CStr,
    cross_mounts: bool,
) -> nix::Result<OwnedFd> {
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
pub(super) fn is_mount_point(dir: &impl AsFd, name: &CStr) -> nix::Result<bool> {
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

pub(super) fn mount_point_error(path: &str) -> Error {
    Error::FailedPrecondition(format!(
        "path {path:?} is a mount point of the running sandbox, which is left alone"
    ))
}

/// The names in directory `fd`, without `.` and `..`.
pub(super) fn read_names(fd: &OwnedFd, path: &str) -> Result<Vec<CString>> {
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
pub(super) fn reopen_regular(opath: &OwnedFd, flags: OFlag, path: &str) -> Result<File> {
    let st = nix::sys::stat::fstat(opath).map_err(|e| fail(path, e))?;
    require_regular(&st, path)?;
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

/// FAILED_PRECONDITION unless `st` is a regular file's, naming `path` and what it is instead.
pub(super) fn require_regular(st: &nix::sys::stat::FileStat, path: &str) -> Result<()> {
    match file_type(st) {
        FileType::Regular => Ok(()),
        FileType::Directory => Err(Error::FailedPrecondition(format!(
            "path {path:?} is a directory"
        ))),
        _ => Err(Error::FailedPrecondition(format!(
            "path {path:?} is not a regular file"
        ))),
    }
}

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

pub(super) fn file_type(st: &nix::sys::stat::FileStat) -> FileType {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileType::Regular,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    }
}
