//! ReadFile: a regular file read in bounded chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::fcntl::OFlag;

use super::path::SandboxPath;
use super::root::{fail, reopen_regular, Root};
use crate::error::{Error, Result};

/// Size of the chunks ReadFile streams.
pub const READ_CHUNK: usize = 64 * 1024;
/// Chunks a ReadFile reader runs ahead of a slow client.
pub const READ_QUEUE: usize = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::{path, Fixture};
    use nix::sys::stat::Mode;

    fn read_all(root: Root, p: &str, range: ReadRange) -> Result<Vec<u8>> {
        let mut r = FileReader::open(root, &path(p), range)?;
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk()? {
            assert!(c.len() <= READ_CHUNK);
            out.extend(c);
        }
        Ok(out)
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
}
