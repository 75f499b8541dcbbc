//! Services whose RPCs are specified in the contract but not built yet: they answer UNIMPLEMENTED
//! so that clients and reflection see the whole API today.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use crate::pb::file_service_server::FileService;

fn pending(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented yet"))
}

/// FileService, pending.
#[derive(Debug, Clone, Default)]
pub struct FileApi;

#[tonic::async_trait]
impl FileService for FileApi {
    type ReadFileStream = Pin<Box<dyn Stream<Item = Result<pb::ReadFileResponse, Status>> + Send>>;

    async fn read_file(
        &self,
        _: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(pending("ReadFile"))
    }
    async fn write_file(
        &self,
        _: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        Err(pending("WriteFile"))
    }
    async fn list_files(
        &self,
        _: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        Err(pending("ListFiles"))
    }
    async fn stat_file(
        &self,
        _: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::StatFileResponse>, Status> {
        Err(pending("StatFile"))
    }
    async fn make_directory(
        &self,
        _: Request<pb::MakeDirectoryRequest>,
    ) -> Result<Response<pb::MakeDirectoryResponse>, Status> {
        Err(pending("MakeDirectory"))
    }
    async fn remove_path(
        &self,
        _: Request<pb::RemovePathRequest>,
    ) -> Result<Response<pb::RemovePathResponse>, Status> {
        Err(pending("RemovePath"))
    }
}
