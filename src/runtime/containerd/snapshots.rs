//! [`Snapshots`] on containerd's Snapshots and Diff services.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Kind as SnapshotKind, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{AddResourceRequest, ApplyRequest, DiffRequest, Resource};
use futures::StreamExt;

use super::{
    call, cd_error, descriptor_from, descriptor_to, mounts_from, mounts_to, ok_if_missing,
    Containerd, BULK_DEADLINE, SNAPSHOTTER,
};
use crate::error::{Error, Result};
use crate::runtime::backend::Snapshots;
use crate::runtime::types::{Descriptor, Lease, Mount, SnapshotInfo};

/// Media type of the layers a diff makes (uncompressed: its digest is its diff id).
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

fn info_from(i: containerd_client::services::v1::snapshots::Info) -> SnapshotInfo {
    SnapshotInfo {
        committed: i.kind == SnapshotKind::Committed as i32,
        name: i.name,
        parent: i.parent,
        labels: i.labels,
    }
}

#[async_trait::async_trait]
impl Snapshots for Containerd {
    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        lease: Option<&Lease>,
    ) -> Result<Vec<Mount>> {
        let msg = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels,
        };
        let req = match lease {
            Some(lease) => self.req_leased(msg, lease.id()),
            None => self.req(msg),
        };
        let resp = call("snapshots.prepare", self.snapshots().prepare(req).await)?;
        Ok(mounts_from(resp.mounts))
    }

    async fn view(&self, key: &str, parent: &str, lease: &Lease) -> Result<Vec<Mount>> {
        let msg = ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        };
        let req = self.req_leased(msg, lease.id());
        let resp = call("snapshots.view", self.snapshots().view(req).await)?;
        Ok(mounts_from(resp.mounts))
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let req = MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
        };
        let resp = call(
            "snapshots.mounts",
            self.snapshots().mounts(self.req(req)).await,
        )?;
        Ok(mounts_from(resp.mounts))
    }

    async fn stat(&self, key: &str) -> Result<Option<SnapshotInfo>> {
        let req = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
        };
        let resp = self.snapshots().stat(self.req(req)).await;
        Ok(
            ok_if_missing("snapshots.stat", resp.map(|r| r.into_inner().info), None)?
                .map(info_from),
        )
    }

    async fn hold(&self, key: &str, lease: &Lease) -> Result<()> {
        let req = AddResourceRequest {
            id: lease.id().to_string(),
            resource: Some(Resource {
                id: key.to_string(),
                r#type: format!("snapshots/{SNAPSHOTTER}"),
            }),
        };
        call(
            "leases.add_resource",
            self.leases().add_resource(self.req(req)).await,
        )
        .map(|_| ())
    }

    async fn commit(&self, name: &str, key: &str, lease: &Lease) -> Result<bool> {
        let req = CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.to_string(),
            key: key.to_string(),
            labels: HashMap::new(),
        };
        match self
            .snapshots()
            .commit(self.req_leased(req, lease.id()))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(false),
            Err(s) => Err(cd_error("snapshots.commit", s)),
        }
    }

    async fn remove(&self, key: &str) -> Result<()> {
        if key.is_empty() {
            return Ok(());
        }
        let req = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
        };
        let resp = self.snapshots().remove(self.req(req)).await;
        ok_if_missing("snapshots.remove", resp.map(|_| ()), ())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let req = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        };
        let mut stream = call("snapshots.list", self.snapshots().list(self.req(req)).await)?;
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|s| cd_error("snapshots.list", s))?;
            out.extend(batch.info.into_iter().map(info_from));
        }
        Ok(out)
    }

    async fn diff(&self, lower: &[Mount], upper: &[Mount], lease: &Lease) -> Result<Descriptor> {
        let req = DiffRequest {
            left: mounts_to(lower),
            right: mounts_to(upper),
            media_type: LAYER_MEDIA_TYPE.into(),
            r#ref: format!("sandboxd-commit-{}", crate::util::random_hex(6)),
            labels: HashMap::new(),
            source_date_epoch: None,
        };
        let resp = call(
            "diff.diff",
            self.diff()
                .diff(self.lease_on(self.req_for(req, Some(BULK_DEADLINE)), lease.id()))
                .await,
        )?;
        resp.diff
            .map(descriptor_from)
            .ok_or_else(|| Error::Internal("diff.diff returned nothing".into()))
    }

    async fn apply(&self, layer: &Descriptor, mounts: &[Mount], lease: &Lease) -> Result<String> {
        let req = ApplyRequest {
            diff: Some(descriptor_to(layer)),
            mounts: mounts_to(mounts),
            ..Default::default()
        };
        let resp = call(
            "diff.apply",
            self.diff()
                .apply(self.lease_on(self.req_for(req, Some(BULK_DEADLINE)), lease.id()))
                .await,
        )?;
        resp.applied
            .map(|d| d.digest)
            .ok_or_else(|| Error::Internal("diff.apply returned no descriptor".into()))
    }
}
