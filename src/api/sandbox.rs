//! SandboxService handlers: take the request, convert, call the manager, convert back.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, status::to_status};
use crate::pb;
use crate::pb::sandbox_service_server::SandboxService;
use crate::sandbox::{LabelSelector, Manager, Page, SandboxId};

/// Default grace period of StopSandbox.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest grace period StopSandbox accepts.
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

/// The SandboxService implementation.
#[derive(Debug, Clone)]
pub struct SandboxApi {
    manager: Arc<Manager>,
}

impl SandboxApi {
    /// Serves `manager`.
    pub fn new(manager: Arc<Manager>) -> Self {
        SandboxApi { manager }
    }
}

fn id(field: &str, s: &str) -> Result<SandboxId, Status> {
    SandboxId::parse(field, s).map_err(to_status)
}

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    async fn create_sandbox(
        &self,
        req: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        let spec = convert::create_spec(req.into_inner()).map_err(to_status)?;
        let sandbox = self.manager.create(spec).await.map_err(to_status)?;
        Ok(Response::new(pb::CreateSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::GetSandboxResponse>, Status> {
        let id = id("sandbox_id", &req.into_inner().sandbox_id)?;
        let sandbox = self.manager.get(&id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let r = req.into_inner();
        let selector =
            LabelSelector::parse("label_selector", &r.label_selector).map_err(to_status)?;
        let page = Page::parse(r.page_size, &r.page_token).map_err(to_status)?;
        let (sandboxes, next_page_token) = self
            .manager
            .list(&selector, &page)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: sandboxes.into_iter().map(convert::sandbox).collect(),
            next_page_token,
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<pb::StartSandboxRequest>,
    ) -> Result<Response<pb::StartSandboxResponse>, Status> {
        let id = id("sandbox_id", &req.into_inner().sandbox_id)?;
        let sandbox = self.manager.start(id).await.map_err(to_status)?;
        Ok(Response::new(pb::StartSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn stop_sandbox(
        &self,
        req: Request<pb::StopSandboxRequest>,
    ) -> Result<Response<pb::StopSandboxResponse>, Status> {
        let r = req.into_inner();
        let id = id("sandbox_id", &r.sandbox_id)?;
        let signal = match r.signal {
            0 => libc::SIGTERM,
            s if (1..=64).contains(&s) => s,
            s => {
                return Err(Status::invalid_argument(format!(
                    "invalid signal: {s} is not a signal number (1-64)"
                )))
            }
        };
        let timeout = match r.timeout {
            None => DEFAULT_STOP_TIMEOUT,
            Some(d) => match crate::util::duration(&d) {
                Some(d) if d <= MAX_STOP_TIMEOUT => d,
                Some(_) => {
                    return Err(Status::invalid_argument(
                        "invalid timeout: longer than one hour",
                    ))
                }
                None => return Err(Status::invalid_argument("invalid timeout: negative")),
            },
        };
        let sandbox = self
            .manager
            .stop(id, signal, timeout, r.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StopSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn delete_sandbox(
        &self,
        req: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let r = req.into_inner();
        let id = id("sandbox_id", &r.sandbox_id)?;
        self.manager.delete(id, r.force).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteSandboxResponse {}))
    }

    type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send>>;

    async fn exec(
        &self,
        _req: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Err(Status::unimplemented("Exec is not implemented yet"))
    }

    async fn exec_sync(
        &self,
        _req: Request<pb::ExecSyncRequest>,
    ) -> Result<Response<pb::ExecSyncResponse>, Status> {
        Err(Status::unimplemented("ExecSync is not implemented yet"))
    }
}
