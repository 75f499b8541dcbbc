//! Users named in a sandbox's `/etc/passwd` and `/etc/group`, looked up through its confined
//! root.
//!
//! Those files belong to the sandbox (or its image) and may be anything it planted: they are
//! opened inside the [`Root`] like every FileService read (no symlink or `..` leaves it), read
//! only when they are regular files (a FIFO or device fails at once instead of blocking the
//! lookup or touching a device), and only up to [`MAX_ACCOUNT_FILE`] bytes.

use std::io::Read;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;

use super::root::{fail, reopen_regular, Root};
use crate::error::{Error, Result};
use crate::sys::User;

/// Largest `/etc/passwd` or `/etc/group` read for a lookup, in bytes.
pub const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Resolves `spec` (`name`, `uid`, `uid:gid`, `name:group` or `uid:group`) against the
/// `/etc/passwd` and `/etc/group` inside host directory `root`, opened as a confined root
/// (blocking). Without a root only numbers resolve (the primary group then defaults to 0).
/// `field` names the request field in errors.
pub fn resolve_user(field: &str, spec: &str, root: Option<&Path>) -> Result<User> {
    let root = root.map(|dir| Root::open_dir(dir, None)).transpose()?;
    resolve(field, spec, root.as_ref())
}

/// Resolves `spec` like [`resolve_user`] in an open sandbox root (blocking).
pub fn resolve_user_in(root: &Root, field: &str, spec: &str) -> Result<User> {
    resolve(field, spec, Some(root))
}

/// True when `spec` names a user or group (not just numbers), so the sandbox's files are needed.
pub fn user_needs_lookup(spec: &str) -> bool {
    spec.split(':').any(|part| part.parse::<u32>().is_err())
}

/// Splits `spec` into its user and group parts.
fn parse<'a>(field: &str, spec: &'a str) -> Result<(&'a str, Option<&'a str>)> {
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
    Ok((user_part, group_part))
}

fn resolve(field: &str, spec: &str, root: Option<&Root>) -> Result<User> {
    let (user_part, group_part) = parse(field, spec)?;
    let read = |file: &str| -> Result<String> {
        match root {
            Some(root) => read_account_file(root, file).map_err(|e| lookup_failed(field, spec, e)),
            None => Ok(String::new()),
        }
    };
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        // A group given with the uid makes its passwd entry irrelevant.
        Ok(uid) if group_part.is_some() => (uid, 0),
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

/// Reads account file `path` of `root`; a missing one reads as empty.
fn read_account_file(root: &Root, path: &str) -> Result<String> {
    let opath = match root.open(path, OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(String::new()),
        Err(e) => return Err(fail(path, e)),
    };
    // O_NONBLOCK: should anything but a regular file ever get this far, it cannot block us.
    let file = reopen_regular(&opath, OFlag::O_RDONLY | OFlag::O_NONBLOCK, path)?;
    let too_big = || {
        Error::FailedPrecondition(format!(
            "path {path:?} is larger than {MAX_ACCOUNT_FILE} bytes"
        ))
    };
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("stat of {path:?}"), e))?
        .len();
    if size > MAX_ACCOUNT_FILE {
        return Err(too_big());
    }
    // Bounded again while reading: the sandbox may grow the file meanwhile.
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {path:?} in the sandbox"), e))?;
    if bytes.len() as u64 > MAX_ACCOUNT_FILE {
        return Err(too_big());
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Says which lookup an unreadable account file stopped; the sandbox's state, not the request,
/// is at fault, so it is FAILED_PRECONDITION.
fn lookup_failed(field: &str, spec: &str, e: Error) -> Error {
    match e {
        Error::FailedPrecondition(why) | Error::PermissionDenied(why) => Error::FailedPrecondition(
            format!("cannot look up {field} {spec:?} in the sandbox: {why}"),
        ),
        e => e,
    }
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
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    use nix::sys::stat::{makedev, mknod, Mode, SFlag};

    fn root_with(passwd: &str, group: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("etc/group"), group).unwrap();
        dir
    }

    /// Runs a lookup of `spec` in `root` on its own thread; `None` when it takes over 5 s (a
    /// lookup that blocks).
    fn resolve_within_5s(root: &Path, spec: &str) -> Option<Result<User>> {
        let (root, spec) = (root.to_path_buf(), spec.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(resolve_user("user", &spec, Some(&root)));
        });
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }

    fn failed_precondition(r: Result<User>) -> String {
        match r {
            Err(Error::FailedPrecondition(why)) => why,
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        }
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let root = root_with(
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
            "root:x:0:\nstaff:x:50:\n",
        );
        let r = Some(root.path());
        let app = User {
            uid: 1000,
            gid: 1001,
        };
        assert_eq!(resolve_user("user", "app", r).unwrap(), app);
        assert_eq!(resolve_user("user", "1000", r).unwrap(), app);
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
        let opened = Root::open_dir(root.path(), None).unwrap();
        assert_eq!(resolve_user_in(&opened, "user", "app").unwrap(), app);
        let err = resolve_user("user", "ghost", r).unwrap_err();
        assert!(err.to_string().starts_with("invalid user"), "{err}");
        assert!(resolve_user("user", "app:", r).is_err());
        assert!(user_needs_lookup("app") && user_needs_lookup("0:staff"));
        assert!(!user_needs_lookup("0") && !user_needs_lookup("1:2"));
    }

    #[test]
    fn account_files_cannot_escape_the_root_through_symlinks_or_dots() {
        // The host's file would resolve the user, were it ever read.
        let host = tempfile::tempdir().unwrap();
        let host_passwd = host.path().join("passwd");
        std::fs::write(&host_passwd, "hostonly:x:4242:4242::/:/bin/sh\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let up = format!("/../../../../../../..{}", host_passwd.display());
        for target in [host_passwd.display().to_string(), up] {
            let link = root.path().join("etc/passwd");
            let _ = std::fs::remove_file(&link);
            symlink(&target, &link).unwrap();
            // The link resolves inside the root, where its target does not exist.
            let err = resolve_user("user", "hostonly", Some(root.path())).unwrap_err();
            assert!(
                err.to_string().contains("not in the sandbox's /etc/passwd"),
                "{target}: {err}"
            );
        }
        // A directory named like the host's, inside the root, is what the link reaches.
        let inside = root.path().join(host.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("passwd"), "hostonly:x:7:8::/:/bin/sh\n").unwrap();
        assert_eq!(
            resolve_user("user", "hostonly", Some(root.path())).unwrap(),
            User { uid: 7, gid: 8 }
        );
    }

    #[test]
    fn a_fifo_as_passwd_fails_fast_instead_of_blocking() {
        let root = root_with("", "");
        let passwd = root.path().join("etc/passwd");
        std::fs::remove_file(&passwd).unwrap();
        nix::unistd::mkfifo(&passwd, Mode::from_bits_truncate(0o644)).unwrap();
        let outcome = resolve_within_5s(root.path(), "nobody");
        // Unblock a lookup that opened the FIFO, so the test ends either way.
        let _ = nix::fcntl::open(&passwd, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty());
        let why = failed_precondition(outcome.expect("the lookup blocked on a FIFO"));
        assert!(
            why.contains("\"nobody\"")
                && why.contains("/etc/passwd")
                && why.contains("not a regular file"),
            "{why}"
        );
        // Numbers alone need no file, FIFO or not.
        assert_eq!(
            resolve_user("user", "5:6", Some(root.path())).unwrap(),
            User { uid: 5, gid: 6 }
        );
    }

    #[test]
    fn a_device_as_group_is_never_read() {
        let root = root_with("app:x:1000:1001::/home/app:/bin/sh\n", "");
        let group = root.path().join("etc/group");
        std::fs::remove_file(&group).unwrap();
        // /dev/zero: reading it would never end. Creating it needs CAP_MKNOD.
        let zero = makedev(1, 5);
        if let Err(e) = mknod(
            &group,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o644),
            zero,
        ) {
            eprintln!("skipping: mknod: {e}");
            return;
        }
        let outcome = resolve_within_5s(root.path(), "app:staff");
        let why = failed_precondition(outcome.expect("the lookup read a device"));
        assert!(
            why.contains("/etc/group") && why.contains("not a regular file"),
            "{why}"
        );
    }

    #[test]
    fn an_oversized_passwd_is_refused() {
        let root = root_with("", "");
        let passwd = root.path().join("etc/passwd");
        std::fs::write(&passwd, "big:x:1:1::/:/bin/sh\n").unwrap();
        // Sparse: the size is what counts, not what the disk holds.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&passwd)
            .unwrap();
        file.set_len(MAX_ACCOUNT_FILE + 1).unwrap();
        let why = failed_precondition(resolve_user("user", "big", Some(root.path())));
        assert!(
            why.contains("/etc/passwd") && why.contains("larger than"),
            "{why}"
        );
        file.set_len(MAX_ACCOUNT_FILE).unwrap();
        assert_eq!(
            resolve_user("user", "big", Some(root.path())).unwrap(),
            User { uid: 1, gid: 1 }
        );
    }
}
