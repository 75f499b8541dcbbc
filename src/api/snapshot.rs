//! SnapshotService handlers.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::image::ImageRef;
use crate::pb;
use crate::pb::snapshot_service_server::SnapshotService;
use crate::sandbox::Tenancy;
use crate::sandbox::{
    self, parse_snapshot_id, LabelSelector, Manager, Page, RequestKey, SandboxId,
};

/// The SnapshotService implementation.
#[derive(Debug, Clone)]
pub struct SnapshotApi {
    tenancy: Arc<Tenancy>,
}

/// The service bound to one caller: the only way a handler reaches a manager.
struct ForCaller {
    /// The caller's tenant's.
    manager: Arc<Manager>,
}

impl SnapshotApi {
    /// Serves snapshots of each tenant's sandboxes of `tenancy`.
    pub fn new(tenancy: Arc<Tenancy>) -> Self {
        SnapshotApi { tenancy }
    }

    /// This service bound to the calling tenant's snapshots.
    async fn for_caller<T>(&self, req: &Request<T>) -> Result<ForCaller, Status> {
        Ok(ForCaller {
            manager: super::tenant_manager(&self.tenancy, req).await?,
        })
    }
}

fn snapshot_id(s: &str) -> Result<String, Status> {
    Ok(parse_snapshot_id("snapshot_id", s)?)
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn commit_snapshot(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let mut r = req.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let labels = std::mem::take(&mut r.labels);
        let request = RequestKey::parse(
            "request_id",
            &request_id,
            &convert::canonical(&r, &[&labels]),
        )?;
        let id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
        let labels = sandbox::parse_labels("labels", labels)?;
        let started = std::time::Instant::now();
        let snap = this.manager.commit_snapshot(id, labels, request).await?;
        crate::metrics::observe_since(&crate::metrics::metrics().commit_seconds, started);
        Ok(Response::new(pb::CommitSnapshotResponse {
            snapshot: Some(convert::snapshot(snap)),
        }))
    }

    async fn restore_sandbox(
        &self,
        req: Request<pb::RestoreSandboxRequest>,
    ) -> Result<Response<pb::RestoreSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let mut r = req.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let request = RequestKey::parse("request_id", &request_id, &convert::canonical(&r, &[]))?;
        let id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
        let snap = snapshot_id(&r.snapshot_id)?;
        let started = std::time::Instant::now();
        let sb = this.manager.restore_sandbox(id, snap, request).await?;
        crate::metrics::observe_since(&crate::metrics::metrics().restore_seconds, started);
        Ok(Response::new(pb::RestoreSandboxResponse {
            sandbox: Some(convert::sandbox(sb)),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let id = snapshot_id(&req.into_inner().snapshot_id)?;
        let snap = this.manager.get_snapshot(&id).await?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(convert::snapshot(snap)),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let r = req.into_inner();
        let sandbox = if r.sandbox_id.is_empty() {
            None
        } else {
            Some(SandboxId::parse("sandbox_id", &r.sandbox_id)?)
        };
        let selector = LabelSelector::parse("label_selector", &r.label_selector)?;
        let scope = format!("{}\n{}", r.sandbox_id, r.label_selector);
        let page = Page::parse(r.page_size, &r.page_token, &scope)?;
        let (snaps, next_page_token) = this
            .manager
            .list_snapshots(sandbox.as_ref().map(SandboxId::as_str), &selector, &page)
            .await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.into_iter().map(convert::snapshot).collect(),
            next_page_token,
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let id = snapshot_id(&req.into_inner().snapshot_id)?;
        this.manager.delete_snapshot(&id).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn export_snapshot(
        &self,
        req: Request<pb::ExportSnapshotRequest>,
    ) -> Result<Response<pb::ExportSnapshotResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let mut r = req.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let request = RequestKey::parse("request_id", &request_id, &convert::canonical(&r, &[]))?;
        let id = snapshot_id(&r.snapshot_id)?;
        let target = ImageRef::parse("image", &r.image)?;
        if target.reference().digest().is_some() {
            return Err(Status::invalid_argument(
                "invalid image: the target must be a tag, not a digest",
            ));
        }
        let digest = this.manager.export_snapshot(&id, &target, request).await?;
        Ok(Response::new(pb::ExportSnapshotResponse {
            image: target.name(),
            digest,
        }))
    }
}
