//! FileService handlers: take the request, convert, call the file domain, convert back.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status::to_status;
use crate::error::{Error, Result};
use crate::files::{
    self, AtomicWriter, FileEntry, FileReader, FileType, ListDepth, ReadRange, SandboxPath,
    WriteInput, WriteSpec, DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, READ_QUEUE, WRITE_QUEUE,
};
use crate::pb;
use crate::pb::file_service_server::FileService;
use crate::sandbox::{Manager, SandboxId};
use crate::sys;

/// The FileService implementation.
#[derive(Debug, Clone)]
pub struct FileApi {
    manager: Arc<Manager>,
}

impl FileApi {
    /// Serves the files of `manager`'s sandboxes.
    pub fn new(manager: Arc<Manager>) -> Self {
        FileApi { manager }
    }

    /// Opens the root of sandbox `id` and runs blocking `op` on it. An `op` that changes files
    /// runs while the sandbox is held still (see [`Manager::hold_still`]), so a commit never
    /// captures it half done. The root (and a stopped sandbox's temporary mount) is released
    /// before the answer is sent.
    async fn with_root<T: Send + 'static>(
        &self,
        id: &SandboxId,
        access: Access,
        op: impl FnOnce(&files::Root) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let root = self.manager.open_root(id).await.map_err(to_status)?;
        let held = match access {
            Access::Read => None,
            Access::Change => self
                .manager
                .hold_still(id, &root)
                .await
                .map_err(to_status)?,
        };
        let result = sys::blocking(move || {
            let result = op(&root);
            drop(root);
            result
        })
        .await
        .map_err(to_status);
        drop(held);
        result
    }
}

/// Whether an operation reads a sandbox's files or changes them.
#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Change,
}

// ---- conversions ----

fn sandbox_id(field: &str, s: &str) -> Result<SandboxId, Status> {
    SandboxId::parse(field, s).map_err(to_status)
}

fn path(field: &str, s: &str) -> Result<SandboxPath, Status> {
    SandboxPath::parse(field, s).map_err(to_status)
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

fn write_spec(h: pb::WriteFileHeader) -> Result<(SandboxId, WriteSpec)> {
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

fn file_entry(e: FileEntry) -> pb::FileEntry {
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

// ---- handlers ----

#[tonic::async_trait]
impl FileService for FileApi {
    type ReadFileStream = Pin<Box<dyn Stream<Item = Result<pb::ReadFileResponse, Status>> + Send>>;

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = req.into_inner();
        let id = sandbox_id("sandbox_id", &r.sandbox_id)?;
        let path = path("path", &r.path)?;
        let range = ReadRange::parse(r.offset, r.length).map_err(to_status)?;
        let root = self.manager.open_root(&id).await.map_err(to_status)?;
        // Opening errors (missing, not a file) are the call's status, not a stream item.
        let mut reader = sys::blocking(move || FileReader::open(root, &path, range))
            .await
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        // The reader owns the root: a stopped sandbox stays mounted until the stream ends, and
        // is unmounted before the client sees the end.
        tokio::task::spawn_blocking(move || {
            let last = loop {
                match reader.next_chunk() {
                    Ok(Some(data)) => {
                        if tx.blocking_send(Ok(pb::ReadFileResponse { data })).is_err() {
                            // The client went away.
                            return;
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(to_status(e)),
                }
            };
            drop(reader);
            if let Some(status) = last {
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        use pb::write_file_request::Request as Msg;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("invalid header: the stream ended before the header message")
        })?;
        let Some(Msg::Header(header)) = first.request else {
            return Err(Status::invalid_argument(
                "invalid header: the first message must be the header",
            ));
        };
        let (id, spec) = write_spec(header).map_err(to_status)?;
        let root = self.manager.open_root(&id).await.map_err(to_status)?;
        // Should this call be dropped from here on, dropping the writer removes its temporary
        // file; once `run` owns it, `run` does.
        let writer = sys::blocking(move || AtomicWriter::create(root, &spec))
            .await
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let task = tokio::task::spawn_blocking(move || writer.run(rx));
        let stream_result = loop {
            match inbound.message().await {
                Ok(Some(msg)) => match msg.request {
                    Some(Msg::Data(data)) => {
                        let sent = tx.send(WriteInput::Data(data.into())).await;
                        if sent.is_err() {
                            // The writer failed; its result says why.
                            break Ok(());
                        }
                    }
                    Some(Msg::Header(_)) => {
                        break Err(Status::invalid_argument(
                            "invalid header: only the first message may be a header",
                        ))
                    }
                    None => {}
                },
                Ok(None) => {
                    // tonic reports a client's RST_STREAM(CANCEL) as a clean end of the request
                    // stream. hyper checks for that reset whenever this call is pending, and then
                    // drops it: yield once, so a cancelled call ends here, before Finish, and
                    // leaves the file untouched.
                    tokio::task::yield_now().await;
                    let _ = tx.send(WriteInput::Finish).await;
                    break Ok(());
                }
                Err(status) => break Err(status),
            }
        };
        // Without Finish the writer abandons the file; wait for it to clean up either way.
        drop(tx);
        let synced = task
            .await
            .map_err(|e| to_status(Error::Internal(format!("file writer failed: {e}"))))?;
        stream_result?;
        let writer = synced.map_err(to_status)?;
        // The content is on disk; only the rename into place waits for a commit to finish.
        let held = self
            .manager
            .hold_still(&id, writer.root())
            .await
            .map_err(to_status)?;
        let written = sys::blocking(move || writer.publish())
            .await
            .map_err(to_status)?;
        drop(held);
        Ok(Response::new(pb::WriteFileResponse {
            bytes_written: i64::try_from(written).unwrap_or(i64::MAX),
        }))
    }

    async fn list_files(
        &self,
        req: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let r = req.into_inner();
        let id = sandbox_id("sandbox_id", &r.sandbox_id)?;
        let path = path("path", &r.path)?;
        let depth = ListDepth::parse("depth", r.depth).map_err(to_status)?;
        let entries = self
            .with_root(&id, Access::Read, move |root| {
                files::list(root, &path, depth)
            })
            .await?;
        Ok(Response::new(pb::ListFilesResponse {
            entries: entries.into_iter().map(file_entry).collect(),
        }))
    }

    async fn stat_file(
        &self,
        req: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::StatFileResponse>, Status> {
        let r = req.into_inner();
        let id = sandbox_id("sandbox_id", &r.sandbox_id)?;
        let path = path("path", &r.path)?;
        let entry = self
            .with_root(&id, Access::Read, move |root| files::stat(root, &path))
            .await?;
        Ok(Response::new(pb::StatFileResponse {
            entry: Some(file_entry(entry)),
        }))
    }

    async fn make_directory(
        &self,
        req: Request<pb::MakeDirectoryRequest>,
    ) -> Result<Response<pb::MakeDirectoryResponse>, Status> {
        let r = req.into_inner();
        let id = sandbox_id("sandbox_id", &r.sandbox_id)?;
        let path = path("path", &r.path)?;
        let mode = mode(r.mode, DEFAULT_DIR_MODE);
        let parents = r.parents;
        self.with_root(&id, Access::Change, move |root| {
            files::make_dir(root, &path, parents, mode)
        })
        .await?;
        Ok(Response::new(pb::MakeDirectoryResponse {}))
    }

    async fn remove_path(
        &self,
        req: Request<pb::RemovePathRequest>,
    ) -> Result<Response<pb::RemovePathResponse>, Status> {
        let r = req.into_inner();
        let id = sandbox_id("sandbox_id", &r.sandbox_id)?;
        let path = path("path", &r.path)?;
        if path.as_str() == "/" {
            return Err(to_status(Error::invalid("path", "\"/\" cannot be removed")));
        }
        let recursive = r.recursive;
        self.with_root(&id, Access::Change, move |root| {
            files::remove(root, &path, recursive)
        })
        .await?;
        Ok(Response::new(pb::RemovePathResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_validated_and_named() {
        let ok = pb::WriteFileHeader {
            sandbox_id: "sb".into(),
            path: "/a".into(),
            ..Default::default()
        };
        let (_, spec) = write_spec(ok.clone()).unwrap();
        assert_eq!((spec.mode, spec.uid, spec.gid), (0o644, 0, 0));
        let (_, spec) = write_spec(pb::WriteFileHeader {
            mode: 0o100_755,
            uid: Some(1000),
            gid: Some(50),
            ..ok.clone()
        })
        .unwrap();
        assert_eq!((spec.mode, spec.uid, spec.gid), (0o755, 1000, 50));
        for (h, field) in [
            (
                pb::WriteFileHeader {
                    path: "rel".into(),
                    ..ok.clone()
                },
                "header.path",
            ),
            (
                pb::WriteFileHeader {
                    sandbox_id: "Bad!".into(),
                    ..ok.clone()
                },
                "header.sandbox_id",
            ),
            (
                pb::WriteFileHeader {
                    uid: Some(u32::MAX),
                    ..ok.clone()
                },
                "header.uid",
            ),
        ] {
            let e = write_spec(h).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("invalid {field}")),
                "{e}"
            );
        }
    }
}
