//! FileService handlers: take the request, convert, call the file domain, convert back.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, FileTarget, MakeDirectorySpec, RemovePathSpec};
use crate::error::{Error, Result};
use crate::files::{self, AtomicWriter, FileReader, WriteInput, READ_QUEUE, WRITE_QUEUE};
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
        let root = self.manager.open_root(id).await?;
        let held = match access {
            Access::Read => None,
            Access::Change => self.manager.hold_still(id, &root).await?,
        };
        let result = sys::blocking(move || {
            let result = op(&root);
            drop(root);
            result
        })
        .await
        .map_err(Status::from);
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

// ---- handlers ----

#[tonic::async_trait]
impl FileService for FileApi {
    type ReadFileStream = Pin<Box<dyn Stream<Item = Result<pb::ReadFileResponse, Status>> + Send>>;

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let (FileTarget { sandbox_id, path }, range) = convert::read_file_spec(req.into_inner())?;
        let root = self.manager.open_root(&sandbox_id).await?;
        // Opening errors (missing, not a file) are the call's status, not a stream item.
        let mut reader = sys::blocking(move || FileReader::open(root, &path, range)).await?;
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
                    Err(e) => break Some(Status::from(e)),
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
        let mut inbound = req.into_inner();
        let (id, spec) = convert::write_file_first(inbound.message().await?)?;
        let root = self.manager.open_root(&id).await?;
        // Should this call be dropped from here on, dropping the writer removes its temporary
        // file; once `run` owns it, `run` does.
        let writer = sys::blocking(move || AtomicWriter::create(root, &spec)).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let task = tokio::task::spawn_blocking(move || writer.run(rx));
        let stream_result = loop {
            match inbound.message().await {
                Ok(Some(msg)) => match convert::write_file_input(msg) {
                    Ok(Some(input)) => {
                        if tx.send(input).await.is_err() {
                            // The writer failed; its result says why.
                            break Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break Err(Status::from(e)),
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
            .map_err(|e| Error::Internal(format!("file writer failed: {e}")))?;
        stream_result?;
        let writer = synced?;
        // The content is on disk; only the rename into place waits for a commit to finish.
        let held = self.manager.hold_still(&id, writer.root()).await?;
        let written = sys::blocking(move || writer.publish()).await?;
        drop(held);
        Ok(Response::new(pb::WriteFileResponse {
            bytes_written: i64::try_from(written).unwrap_or(i64::MAX),
        }))
    }

    async fn list_files(
        &self,
        req: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let (FileTarget { sandbox_id, path }, depth) = convert::list_files_spec(req.into_inner())?;
        let entries = self
            .with_root(&sandbox_id, Access::Read, move |root| {
                files::list(root, &path, depth)
            })
            .await?;
        Ok(Response::new(pb::ListFilesResponse {
            entries: entries.into_iter().map(convert::file_entry).collect(),
        }))
    }

    async fn stat_file(
        &self,
        req: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::StatFileResponse>, Status> {
        let FileTarget { sandbox_id, path } = convert::stat_file_spec(req.into_inner())?;
        let entry = self
            .with_root(&sandbox_id, Access::Read, move |root| {
                files::stat(root, &path)
            })
            .await?;
        Ok(Response::new(pb::StatFileResponse {
            entry: Some(convert::file_entry(entry)),
        }))
    }

    async fn make_directory(
        &self,
        req: Request<pb::MakeDirectoryRequest>,
    ) -> Result<Response<pb::MakeDirectoryResponse>, Status> {
        let MakeDirectorySpec {
            target: FileTarget { sandbox_id, path },
            parents,
            mode,
        } = convert::make_directory_spec(req.into_inner())?;
        self.with_root(&sandbox_id, Access::Change, move |root| {
            files::make_dir(root, &path, parents, mode)
        })
        .await?;
        Ok(Response::new(pb::MakeDirectoryResponse {}))
    }

    async fn remove_path(
        &self,
        req: Request<pb::RemovePathRequest>,
    ) -> Result<Response<pb::RemovePathResponse>, Status> {
        let RemovePathSpec {
            target: FileTarget { sandbox_id, path },
            recursive,
        } = convert::remove_path_spec(req.into_inner())?;
        self.with_root(&sandbox_id, Access::Change, move |root| {
            files::remove(root, &path, recursive)
        })
        .await?;
        Ok(Response::new(pb::RemovePathResponse {}))
    }
}
