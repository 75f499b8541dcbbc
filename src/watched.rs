//! A value read from files and read again when their content changes: the tenants file, the
//! TLS certificate and key. Content, not modification time, decides what changed (a file
//! rewritten within the same clock tick with the same length is still noticed), and each
//! version is parsed once: a bad one is reported once and the last good value stays in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

/// Turns the files' contents (in the order of their paths) into the value, or says what is
/// wrong, naming the file.
pub type Parse<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync>;

/// What a [`Watched::reload`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were last looked at.
    Unchanged,
    /// A new version is in force.
    Reloaded,
    /// The new version cannot be used (why); the previous one stays in force.
    Rejected(String),
}

/// The last good value of some files.
pub struct Watched<T> {
    paths: Vec<PathBuf>,
    parse: Option<Parse<T>>,
    current: RwLock<Arc<T>>,
    /// Digest of the contents last looked at, good or bad.
    seen: Mutex<[u8; 32]>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Watched<T> {
    /// Reads `paths` and parses them; the error names the file that cannot be read or used.
    pub fn load(paths: Vec<PathBuf>, parse: Parse<T>) -> Result<Watched<T>, String> {
        let contents = read_all(&paths)?;
        let value = parse(&contents)?;
        Ok(Watched {
            seen: Mutex::new(digest(&contents)),
            paths,
            parse: Some(parse),
            current: RwLock::new(Arc::new(value)),
        })
    }

    /// A value that never changes.
    pub fn fixed(value: T) -> Watched<T> {
        Watched {
            paths: Vec::new(),
            parse: None,
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new([0; 32]),
        }
    }

    /// The files it reads.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again and puts a changed version in force if it parses. Blocking.
    pub fn reload(&self) -> Reload {
        let Some(parse) = &self.parse else {
            return Reload::Unchanged;
        };
        // A missing file (mid-rotation, say) is reported each time: it is not a version.
        let contents = match read_all(&self.paths) {
            Ok(c) => c,
            Err(e) => return Reload::Rejected(e),
        };
        let digest = digest(&contents);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == digest {
                return Reload::Unchanged;
            }
            *seen = digest;
        }
        match parse(&contents) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                Reload::Reloaded
            }
            Err(why) => Reload::Rejected(why),
        }
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths.iter().map(|p| read(p)).collect()
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))
}

fn digest(contents: &[Vec<u8>]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for c in contents {
        hasher.update((c.len() as u64).to_le_bytes());
        hasher.update(c);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(paths: Vec<PathBuf>) -> Result<Watched<String>, String> {
        Watched::load(
            paths,
            Box::new(|c: &[Vec<u8>]| {
                let text: Vec<String> = c
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect();
                let joined = text.join("+");
                if joined.contains("bad") {
                    Err(format!("{joined} is bad"))
                } else {
                    Ok(joined)
                }
            }),
        )
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "x").unwrap();
        let w = watched(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(*w.current(), "one+x");
        assert_eq!(w.reload(), Reload::Unchanged);
        // Same length, written at once: only the content tells it apart.
        std::fs::write(&a, "two").unwrap();
        assert_eq!(w.reload(), Reload::Reloaded);
        assert_eq!(*w.current(), "two+x");
        std::fs::write(&b, "bad").unwrap();
        assert_eq!(w.reload(), Reload::Rejected("two+bad is bad".into()));
        assert_eq!(*w.current(), "two+x");
        // Reported once.
        assert_eq!(w.reload(), Reload::Unchanged);
        std::fs::remove_file(&a).unwrap();
        assert!(matches!(w.reload(), Reload::Rejected(why) if why.contains("cannot read")));
        std::fs::write(&a, "two").unwrap();
        std::fs::write(&b, "y").unwrap();
        assert_eq!(w.reload(), Reload::Reloaded);
        assert_eq!(*w.current(), "two+y");
    }

    #[test]
    fn loading_fails_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = watched(vec![missing.clone()]).unwrap_err();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
        let fixed = Watched::fixed(7);
        assert_eq!(fixed.reload(), Reload::Unchanged);
        assert_eq!(*fixed.current(), 7);
    }
}
