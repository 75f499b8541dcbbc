//! FileService handlers: take the request, convert, call the file domain, convert back.
//!
//! ReadFile and WriteFile are streams a client controls: neither holds a thread while it waits
//! on the client (each chunk is read or written in a short blocking call), each ends after the
//! idle timeout of a silent client (see [`super::stream`]), and each lets go of the sandbox
//! when a delete of it begins.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, FileTarget, MakeDirectorySpec, RemovePathSpec};
use super::stream::{self, Outbound};
use crate::error::{Error, Result};
use crate::files::{self, AtomicWriter, FileReader, WriteInput, READ_QUEUE, WRITE_QUEUE};
use crate::pb;
use crate::pb::file_service_server::FileService;
use crate::sandbox::{FileStream, Manager, SandboxId, Tenancy};
use crate::sys;

/// The FileService implementation.
#[derive(Debug, Clone)]
pub struct FileApi {
    tenancy: Arc<Tenancy>,
    /// How long a stream waits on a client that sends or takes nothing.
    idle: Duration,
}

/// The service bound to one caller: the only way a handler reaches a manager.
#[derive(Debug, Clone)]
struct ForCaller {
    /// The caller's tenant's.
    manager: Arc<Manager>,
    idle: Duration,
}

impl FileApi {
    /// Serves the files of each tenant's sandboxes of `tenancy`; streams end after `idle` of
    /// a silent client.
    pub fn new(tenancy: Arc<Tenancy>, idle: Duration) -> Self {
        FileApi { tenancy, idle }
    }

    /// This service bound to the calling tenant's sandboxes.
    async fn for_caller<T>(&self, req: &Request<T>) -> Result<ForCaller, Status> {
        Ok(ForCaller {
            manager: super::tenant_manager(&self.tenancy, req).await?,
            idle: self.idle,
        })
    }
}

impl ForCaller {
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

    /// Opens the root of sandbox `id` for file stream `stream`, unless a delete of the sandbox
    /// begins first.
    async fn open_stream_root(
        &self,
        id: &SandboxId,
        stream: &mut FileStream,
    ) -> Result<files::Root, Status> {
        tokio::select! {
            root = self.manager.open_root(id) => Ok(root?),
            () = stream.ended() => Err(deleting(id)),
        }
    }
}

/// Whether an operation reads a sandbox's files or changes them.
#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Change,
}

/// The status of a file stream ended because its sandbox is being deleted.
fn deleting(id: &SandboxId) -> Status {
    Error::Aborted(format!(
        "sandbox {id} is being deleted: its file streams were ended, and a write in progress \
         was discarded"
    ))
    .into()
}

/// Streams `reader`'s chunks to `tx`, each read in a short blocking call, until the end of the
/// range, a read error, the client going away or stalling, or a delete of the sandbox. The
/// reader, and with it a stopped sandbox's mount, is released before the stream ends.
async fn send_file(
    reader: FileReader,
    mut tx: Outbound<pb::ReadFileResponse>,
    mut stream: FileStream,
    id: SandboxId,
) {
    let mut reader = Some(reader);
    let last = loop {
        let Some(mut r) = reader.take() else {
            break None;
        };
        let read = sys::blocking(move || {
            let chunk = r.next_chunk();
            Ok((r, chunk))
        })
        .await;
        let chunk = match read {
            Ok((r, chunk)) => {
                reader = Some(r);
                chunk
            }
            Err(e) => break Some(Status::from(e)),
        };
        let data = match chunk {
            Ok(Some(data)) => data,
            Ok(None) => break None,
            Err(e) => break Some(Status::from(e)),
        };
        tokio::select! {
            sent = tx.send(Ok(pb::ReadFileResponse { data })) => {
                // Gone, or stalled (the stream is ended already): either way, stop here.
                if sent.is_err() {
                    break None;
                }
            }
            () = stream.ended() => {
                tx.abort(deleting(&id));
                break None;
            }
        }
    };
    sys::drop_blocking(reader).await;
    if let Some(status) = last {
        let _ = tx.send(Err(status)).await;
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
        let this = self.for_caller(&req).await?;
        let (FileTarget { sandbox_id, path }, range) = convert::read_file_spec(req.into_inner())?;
        let mut stream = this.manager.file_stream(&sandbox_id);
        let root = this.open_stream_root(&sandbox_id, &mut stream).await?;
        // Opening errors (missing, not a file) are the call's status, not a stream item.
        let reader = sys::blocking(move || FileReader::open(root, &path, range)).await?;
        let (tx, rx) = stream::outbound(READ_QUEUE, this.idle);
        // The reader owns the root: a stopped sandbox stays mounted until the stream ends, and
        // is unmounted before the client sees the end.
        tokio::spawn(send_file(reader, tx, stream, sandbox_id));
        Ok(Response::new(Box::pin(rx)))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let mut inbound = req.into_inner();
        let first = stream::next_message(&mut inbound, this.idle).await?;
        let (id, spec) = convert::write_file_first(first)?;
        this.manager.disk_room_for(&id).await?;
        let mut stream = this.manager.file_stream(&id);
        let root = this.open_stream_root(&id, &mut stream).await?;
        // Should this call be dropped from here on, dropping the writer removes its temporary
        // file; once `run` owns it, `run` does.
        let writer = sys::blocking(move || AtomicWriter::create(root, &spec)).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let task = tokio::spawn(writer.run(rx));
        let stream_result = loop {
            let message = tokio::select! {
                message = stream::next_message(&mut inbound, this.idle) => message,
                () = stream.ended() => break Err(deleting(&id)),
            };
            match message {
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
        let held = match this.manager.hold_still(&id, writer.root()).await {
            Ok(held) => held,
            Err(e) => {
                sys::drop_blocking(writer).await;
                return Err(e.into());
            }
        };
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
        let this = self.for_caller(&req).await?;
        let (FileTarget { sandbox_id, path }, depth) = convert::list_files_spec(req.into_inner())?;
        let entries = this
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
        let this = self.for_caller(&req).await?;
        let FileTarget { sandbox_id, path } = convert::stat_file_spec(req.into_inner())?;
        let entry = this
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
        let this = self.for_caller(&req).await?;
        let MakeDirectorySpec {
            target: FileTarget { sandbox_id, path },
            parents,
            mode,
        } = convert::make_directory_spec(req.into_inner())?;
        this.with_root(&sandbox_id, Access::Change, move |root| {
            files::make_dir(root, &path, parents, mode)
        })
        .await?;
        Ok(Response::new(pb::MakeDirectoryResponse {}))
    }

    async fn remove_path(
        &self,
        req: Request<pb::RemovePathRequest>,
    ) -> Result<Response<pb::RemovePathResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let RemovePathSpec {
            target: FileTarget { sandbox_id, path },
            recursive,
        } = convert::remove_path_spec(req.into_inner())?;
        this.with_root(&sandbox_id, Access::Change, move |root| {
            files::remove(root, &path, recursive)
        })
        .await?;
        Ok(Response::new(pb::RemovePathResponse {}))
    }
}
