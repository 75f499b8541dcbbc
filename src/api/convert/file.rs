//! FileService messages to and from the domain.

use crate::error::{Error, Result};
use crate::files::{
    FileEntry, FileEvent, FileEventKind, FileType, ListDepth, ReadRange, SandboxPath, WriteInput,
    WriteSpec, DEFAULT_DIR_MODE, DEFAULT_FILE_MODE,
};
use crate::pb;
use crate::sandbox::SandboxId;

/// A path in a sandbox, as most FileService requests name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    /// The sandbox whose files are meant.
    pub sandbox_id: SandboxId,
    /// The path inside it, normalised.
    pub path: SandboxPath,
}

fn file_target(sandbox_id: &str, path: &str) -> Result<FileTarget> {
    Ok(FileTarget {
        sandbox_id: SandboxId::parse("sandbox_id", sandbox_id)?,
        path: SandboxPath::parse("path", path)?,
    })
}

/// ReadFileRequest → the file and the range to read.
pub fn read_file_spec(r: pb::ReadFileRequest) -> Result<(FileTarget, ReadRange)> {
    Ok((
        file_target(&r.sandbox_id, &r.path)?,
        ReadRange::parse(r.offset, r.length)?,
    ))
}

/// ListFilesRequest → the directory and how deep to list.
pub fn list_files_spec(r: pb::ListFilesRequest) -> Result<(FileTarget, ListDepth)> {
    Ok((
        file_target(&r.sandbox_id, &r.path)?,
        ListDepth::parse("depth", r.depth)?,
    ))
}

/// StatFileRequest → the path to describe.
pub fn stat_file_spec(r: pb::StatFileRequest) -> Result<FileTarget> {
    file_target(&r.sandbox_id, &r.path)
}

/// MakeDirectoryRequest, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MakeDirectorySpec {
    /// The directory to create.
    pub target: FileTarget,
    /// Create missing parents too.
    pub parents: bool,
    /// Permission bits of what is created.
    pub mode: u32,
}

/// MakeDirectoryRequest → MakeDirectorySpec.
pub fn make_directory_spec(r: pb::MakeDirectoryRequest) -> Result<MakeDirectorySpec> {
    Ok(MakeDirectorySpec {
        target: file_target(&r.sandbox_id, &r.path)?,
        parents: r.parents,
        mode: mode(r.mode, DEFAULT_DIR_MODE),
    })
}

/// RemovePathRequest, validated: never the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovePathSpec {
    /// What to remove (never `/`).
    pub target: FileTarget,
    /// Remove a directory with its content.
    pub recursive: bool,
}

/// RemovePathRequest → RemovePathSpec.
pub fn remove_path_spec(r: pb::RemovePathRequest) -> Result<RemovePathSpec> {
    let target = file_target(&r.sandbox_id, &r.path)?;
    if target.path.as_str() == "/" {
        return Err(Error::invalid("path", "\"/\" cannot be removed"));
    }
    Ok(RemovePathSpec {
        target,
        recursive: r.recursive,
    })
}

/// 0 means `default`; otherwise the permission bits (`mode & 07777`), as the proto documents.
fn mode(m: u32, default: u32) -> u32 {
    if m == 0 {
        default
    } else {
        m & 0o7777
    }
}

/// An owner id; -1 (`u32::MAX`) means "unchanged" to chown, so it is not an id.
fn owner(field: &str, id: Option<u32>) -> Result<u32> {
    match id {
        None => Ok(0),
        Some(u32::MAX) => Err(Error::invalid(field, "4294967295 is not a valid id")),
        Some(id) => Ok(id),
    }
}

/// WriteFile's first message (`None`: the stream ended before it) → the sandbox and the write.
pub fn write_file_first(first: Option<pb::WriteFileRequest>) -> Result<(SandboxId, WriteSpec)> {
    use pb::write_file_request::Request;
    let first = first
        .ok_or_else(|| Error::invalid("header", "the stream ended before the header message"))?;
    match first.request {
        Some(Request::Header(header)) => write_spec(header),
        _ => Err(Error::invalid(
            "header",
            "the first message must be the header",
        )),
    }
}

pub(super) fn write_spec(h: pb::WriteFileHeader) -> Result<(SandboxId, WriteSpec)> {
    Ok((
        SandboxId::parse("header.sandbox_id", &h.sandbox_id)?,
        WriteSpec {
            path: SandboxPath::parse("header.path", &h.path)?,
            mode: mode(h.mode, DEFAULT_FILE_MODE),
            append: h.append,
            uid: owner("header.uid", h.uid)?,
            gid: owner("header.gid", h.gid)?,
        },
    ))
}

/// A later WriteFile message → writer input (`None` for messages to ignore).
pub fn write_file_input(r: pb::WriteFileRequest) -> Result<Option<WriteInput>> {
    use pb::write_file_request::Request;
    match r.request {
        Some(Request::Data(data)) => Ok(Some(WriteInput::Data(data.into()))),
        Some(Request::Header(_)) => Err(Error::invalid(
            "header",
            "only the first message may be a header",
        )),
        None => Ok(None),
    }
}

/// Domain file entry → proto.
pub fn file_entry(e: FileEntry) -> pb::FileEntry {
    let file_type = match e.file_type {
        FileType::Regular => pb::FileType::Regular,
        FileType::Directory => pb::FileType::Directory,
        FileType::Symlink => pb::FileType::Symlink,
        FileType::Other => pb::FileType::Other,
    };
    pb::FileEntry {
        path: e.path,
        r#type: file_type as i32,
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        mode: e.mode,
        modified_at: Some(crate::util::timestamp(e.modified_at)),
        link_target: e.link_target.unwrap_or_default(),
    }
}

/// WatchFilesRequest → the sandbox, the path and whether to watch its whole tree.
pub fn watch_files_spec(r: pb::WatchFilesRequest) -> Result<(FileTarget, bool)> {
    Ok((file_target(&r.sandbox_id, &r.path)?, r.recursive))
}

/// A change under a watched path, for WatchFiles.
pub fn file_event(e: FileEvent) -> pb::WatchFilesResponse {
    use pb::FileEventType as T;
    let kind = match e.kind {
        FileEventKind::Created => T::Created,
        FileEventKind::Modified => T::Modified,
        FileEventKind::Deleted => T::Deleted,
        FileEventKind::Renamed => T::Renamed,
        FileEventKind::Overflow => T::Overflow,
    };
    pb::WatchFilesResponse {
        path: e.path,
        r#type: kind as i32,
        old_path: e.old_path.unwrap_or_default(),
        is_directory: e.is_dir,
    }
}
