//! WriteFile: a file replaced (or appended to) atomically.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use tokio::sync::mpsc;

use super::path::{cstring, join, normalize, split_last, SandboxPath, MAX_PATH_LEN};
use super::root::{fail, is_mount_point, mount_point_error, reopen_regular, Root};
use super::root::{file_type, require_regular, FileType};
use crate::error::{Error, Result};
use crate::sys;

/// Data messages a WriteFile stream runs ahead of the disk, and the most written in one
/// blocking call.
pub const WRITE_QUEUE: usize = 4;
/// Mode of a file WriteFile creates when the request gives none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Prefix of WriteFile's temporary files, created next to their target.
pub const TEMP_PREFIX: &str = ".sandboxd-write-";
/// Symlinks WriteFile follows at the last component before giving up (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;

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
            require_regular(st, &path)?;
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

    /// Writes and syncs what `input` brings until [`WriteInput::Finish`], then returns the
    /// writer for [`Self::publish`]. No thread waits on the client: the chunks that queued up
    /// meanwhile (up to [`WRITE_QUEUE`]) are written in one short blocking call at a time. When
    /// the channel closes first (the stream failed or the caller went away), nothing changes
    /// and the temporary file is removed before this returns.
    pub async fn run(self, mut input: mpsc::Receiver<WriteInput>) -> Result<AtomicWriter> {
        let mut writer = self;
        loop {
            let Some(first) = input.recv().await else {
                let path = writer.path.clone();
                // Closing the file (and, for a stopped sandbox, unmounting) blocks.
                sys::drop_blocking(writer).await;
                return Err(Error::FailedPrecondition(format!(
                    "the write of {path:?} was abandoned before the stream ended"
                )));
            };
            let mut batch = vec![first];
            while batch.len() < WRITE_QUEUE && !matches!(batch.last(), Some(WriteInput::Finish)) {
                match input.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let finish = matches!(batch.last(), Some(WriteInput::Finish));
            if finish {
                // Nothing follows Finish: free the sender before the slow part.
                drop(input);
                return sys::blocking(move || {
                    writer.write_batch(batch)?;
                    writer.sync()?;
                    Ok(writer)
                })
                .await;
            }
            // A failed write drops the writer (and its temporary file) on the blocking thread.
            writer = sys::blocking(move || {
                writer.write_batch(batch)?;
                Ok(writer)
            })
            .await?;
        }
    }

    /// Writes the data of `batch` in order (blocking).
    fn write_batch(&mut self, batch: Vec<WriteInput>) -> Result<()> {
        for input in batch {
            if let WriteInput::Data(data) = input {
                self.write(&data)?;
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::{path, Fixture};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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

    #[tokio::test(flavor = "multi_thread")]
    async fn run_writes_queued_chunks_in_order_and_cleans_up_when_abandoned() {
        let f = Fixture::new();
        let r = f.root_dir.path().to_path_buf();
        let spec = WriteSpec {
            path: path("/etc/streamed"),
            mode: DEFAULT_FILE_MODE,
            append: false,
            uid: 0,
            gid: 0,
        };
        let w = AtomicWriter::create(f.root(), &spec).unwrap();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let run = tokio::spawn(w.run(rx));
        for i in 0..10u8 {
            tx.send(WriteInput::Data(bytes::Bytes::from(vec![i; 3])))
                .await
                .unwrap();
        }
        tx.send(WriteInput::Finish).await.unwrap();
        let w = run.await.unwrap().unwrap();
        assert!(!r.join("etc/streamed").exists(), "visible before publish");
        assert_eq!(
            tokio::task::spawn_blocking(|| w.publish())
                .await
                .unwrap()
                .unwrap(),
            30
        );
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(std::fs::read(r.join("etc/streamed")).unwrap(), expected);

        // Abandoned after some data: an error, and the file as it was.
        let w = AtomicWriter::create(f.root(), &spec).unwrap();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let run = tokio::spawn(w.run(rx));
        tx.send(WriteInput::Data(bytes::Bytes::from_static(b"partial")))
            .await
            .unwrap();
        drop(tx);
        let err = run.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert_eq!(std::fs::read(r.join("etc/streamed")).unwrap(), expected);
        let names: Vec<_> = std::fs::read_dir(r.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
