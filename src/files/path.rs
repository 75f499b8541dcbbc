//! Paths inside a sandbox: parsed once at the edge, normalised, never resolved by us.

use std::ffi::CString;

use crate::error::{Error, Result};

/// Longest path accepted, in bytes (the kernel's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

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
pub(super) fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// A normalised path's parent and last component; `None` for `/`.
pub(super) fn split_last(p: &str) -> Option<(&str, &str)> {
    let i = p.rfind('/')?;
    let name = &p[i + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if i == 0 { "/" } else { &p[..i] }, name))
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

pub(super) fn cstring(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::invalid("path", "contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::path;

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
}
