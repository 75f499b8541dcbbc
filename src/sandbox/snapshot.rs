//! Snapshots: a sandbox's filesystem captured as an OCI image in containerd (the base image's
//! layers plus one layer holding the sandbox's changes) with its unpacked committed chain, so a
//! fork is a snapshot `Prepare` without copying and an export is a registry push.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::Instrument;

use super::manager::{run_to_completion, Manager};
use super::model::{LabelSelector, Page, SandboxId};
use super::record::L_SNAPSHOT;
use super::retry::{self, RequestKey};
use crate::error::{Error, Kind, Result};
use crate::image::{self, ImageRef};
use crate::runtime::{Backend, ImageRecord};

/// Where snapshot images are named: `<prefix><snapshot id>:latest`.
pub use crate::image::SNAPSHOT_IMAGE_PREFIX;
/// Media type of the layers sandboxd writes (uncompressed: capture speed beats size on one node).
pub(super) const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Most layers a snapshot image may have before commits squash it into one. overlayfs takes the
/// lower directories in one mount-option page; containerd 1.6's paths fit about 40 of them.
pub const MAX_LAYERS: usize = 24;
pub(super) const L_SNAPSHOT_ID: &str = "sandboxd.io/snapshot-id";
pub(super) const L_FROM_SANDBOX: &str = "sandboxd.io/sandbox-id";
pub(super) const L_PARENT: &str = "sandboxd.io/parent-snapshot";
pub(super) const L_BASE_IMAGE: &str = "sandboxd.io/base-image";
pub(super) const L_SIZE: &str = "sandboxd.io/size-bytes";
/// The committed chain a fork prepares on.
pub(super) const L_CHAIN: &str = "sandboxd.io/chain-id";
/// The image config's `config` section as JSON, when it fits in a label.
pub(super) const L_RUN_CONFIG: &str = "sandboxd.io/run-config";
/// containerd refuses a label whose key and value together are longer.
pub(super) const MAX_LABEL_LEN: usize = 4096;

/// A committed snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Its id.
    pub id: String,
    /// The sandbox it was taken from.
    pub sandbox_id: String,
    /// The snapshot that sandbox was built on, if any.
    pub parent_snapshot_id: String,
    /// The base image.
    pub image: String,
    /// Bytes this snapshot adds over its parent.
    pub size_bytes: i64,
    /// When it was taken.
    pub created_at: Option<SystemTime>,
    /// User labels.
    pub labels: HashMap<String, String>,
}

/// Validates a snapshot id (`snap-` ids are generated; the same charset as sandbox ids).
pub fn parse_snapshot_id(field: &str, s: &str) -> Result<String> {
    SandboxId::parse(field, s).map(|id| id.to_string())
}

/// The image name a snapshot is stored under.
pub fn snapshot_image_name(id: &str) -> String {
    format!("{SNAPSHOT_IMAGE_PREFIX}{id}:latest")
}

/// What a fork needs, from the labels a commit wrote on the snapshot's record.
fn run_image_of(record: &ImageRecord) -> Option<image::RunImage> {
    Some(image::RunImage {
        name: record.name.clone(),
        run_config: serde_json::from_str(record.labels.get(L_RUN_CONFIG)?).ok()?,
        top_chain_id: record.labels.get(L_CHAIN)?.clone(),
        manifest_digest: Some(record.target.digest.clone()).filter(|d| !d.is_empty())?,
    })
}

/// The snapshot an image record stands for, if it is one.
pub(super) fn snapshot_of(record: &ImageRecord) -> Option<Snapshot> {
    let l = &record.labels;
    Some(Snapshot {
        id: l.get(L_SNAPSHOT_ID)?.clone(),
        sandbox_id: l.get(L_FROM_SANDBOX).cloned().unwrap_or_default(),
        parent_snapshot_id: l.get(L_PARENT).cloned().unwrap_or_default(),
        image: l.get(L_BASE_IMAGE).cloned().unwrap_or_default(),
        size_bytes: l.get(L_SIZE).and_then(|v| v.parse().ok()).unwrap_or(0),
        created_at: record.created_at,
        labels: l
            .iter()
            .filter(|(k, _)| {
                !super::model::RESERVED_LABEL_PREFIXES
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

impl Manager {
    pub(super) async fn snapshot_records(&self) -> Result<Vec<ImageRecord>> {
        self.cd.images(Some(L_SNAPSHOT_ID)).await
    }

    /// GetSnapshot: one lookup of the image record the snapshot is stored as.
    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        self.cd
            .image(&snapshot_image_name(id))
            .await?
            .as_ref()
            .and_then(snapshot_of)
            .filter(|s| s.id == id)
            .ok_or_else(|| Error::not_found(Kind::Snapshot, id))
    }

    /// Snapshot `id` and what a fork or a restore needs of its image. A snapshot's record
    /// carries that in its labels (one read); one committed before they existed, or whose
    /// config is too large for a label, is resolved through its manifest and config.
    pub(super) async fn resolve_snapshot(&self, id: &str) -> Result<(Snapshot, image::RunImage)> {
        let name = ImageRef::parse("snapshot_id", &snapshot_image_name(id))?;
        let record = self
            .cd
            .image(&name.name())
            .await?
            .ok_or_else(|| Error::not_found(Kind::Snapshot, id))?;
        let snap = snapshot_of(&record)
            .filter(|s| s.id == id)
            .ok_or_else(|| Error::not_found(Kind::Snapshot, id))?;
        if let Some(run) = run_image_of(&record) {
            return Ok((snap, run));
        }
        let image = image::resolve(self.cd.as_ref(), &name)
            .await
            .map_err(|e| match e {
                Error::NotFound { .. } => Error::not_found(Kind::Snapshot, id),
                e => e,
            })?;
        Ok((snap, image.into()))
    }

    /// ListSnapshots: optionally of one sandbox, matching `selector`, ordered by id, one page.
    pub async fn list_snapshots(
        &self,
        sandbox: Option<&str>,
        selector: &LabelSelector,
        page: &Page,
    ) -> Result<(Vec<Snapshot>, String)> {
        let mut all: Vec<Snapshot> = self
            .snapshot_records()
            .await?
            .iter()
            .filter_map(snapshot_of)
            .filter(|s| sandbox.is_none_or(|id| s.sandbox_id == id))
            .filter(|s| selector.matches(&s.labels))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(page.apply(all, |s| s.id.as_str()))
    }

    /// DeleteSnapshot: refused while a sandbox or another snapshot builds on it; then its image
    /// record goes and containerd's GC frees what nothing else references.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let records = self.snapshot_records().await?;
        let snaps: Vec<Snapshot> = records.iter().filter_map(snapshot_of).collect();
        if !snaps.iter().any(|s| s.id == id) {
            return Err(Error::not_found(Kind::Snapshot, id));
        }
        if let Some(child) = snaps.iter().find(|s| s.parent_snapshot_id == id) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} is the parent of snapshot {}",
                child.id
            )));
        }
        if let Some(user) = self.containers_with_label(L_SNAPSHOT, id).await?.first() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {user} is built on snapshot {id}"
            )));
        }
        if self.cd.delete_image(&snapshot_image_name(id)).await? {
            Ok(())
        } else {
            Err(Error::not_found(Kind::Snapshot, id))
        }
    }

    /// ExportSnapshot: pushes the snapshot's image to `target`; returns the pushed digest.
    /// A snapshot always exports to the same digest, so a retry simply pushes again (blobs the
    /// registry has are skipped); `request` is remembered on the snapshot's record so that the
    /// same id with another request is refused.
    /// `registry_auth`: the tenant's own credentials, when it has them.
    pub async fn export_snapshot(
        &self,
        id: &str,
        target: &ImageRef,
        request: Option<RequestKey>,
        registry_auth: Option<Arc<crate::image::AuthFile>>,
    ) -> Result<String> {
        let cd = self.cd.as_ref();
        let _retries = self.lock_request(request.as_ref()).await?;
        let name = ImageRef::parse("snapshot_id", &snapshot_image_name(id))?;
        let now = SystemTime::now();
        let mut replayed = false;
        if let (Some(key), Some(record)) = (&request, cd.image(&name.name()).await?) {
            replayed = retry::EXPORT.replays(&record.labels, key, now)?;
        }
        let resolved = image::resolve(cd, &name).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found(Kind::Snapshot, id),
            e => e,
        })?;
        let access = self.cfg.registries.access(registry_auth);
        let digest = image::push(&access, cd, &resolved.manifest_digest, target).await?;
        if let (Some(key), false) = (&request, replayed) {
            if let Some(mut record) = cd.image(&name.name()).await? {
                record
                    .labels
                    .extend(retry::EXPORT.of(key, now).map(|(k, v)| (k.to_string(), v)));
                let lease = cd.lease("export").await?;
                let stored = cd.put_image(record, &lease).await;
                let released = cd.release(lease).await;
                stored?;
                released?;
            }
        }
        Ok(digest)
    }

    /// RestoreSandbox: the sandbox's filesystem becomes the snapshot's and its task restarts
    /// with the same spec; the old writable snapshot is removed. On failure it is left as it was.
    pub async fn restore_sandbox(
        self: &Arc<Self>,
        id: SandboxId,
        snapshot_id: String,
        request: Option<RequestKey>,
    ) -> Result<super::Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("restore_sandbox", sandbox_id = %id, %snapshot_id);
        run_to_completion(
            async move {
                let _retries = this.lock_request(request.as_ref()).await?;
                let _guard = this.lock(id.as_str()).await?;
                let container = this.existing(&id).await?;
                let now = SystemTime::now();
                if let Some(key) = &request {
                    if retry::RESTORE.replays(&container.labels, key, now)? {
                        tracing::info!(
                            request_id = key.id(),
                            "a retried restore returns the first call's result"
                        );
                        return this.get(&id).await;
                    }
                }
                let (snap, image) = this.resolve_snapshot(&snapshot_id).await?;
                let was_running =
                    matches!(this.task(id.as_str()).await?, Some(t) if t.state.may_be_alive());
                let lease = this.cd.lease("restore").await?;
                let new_key = format!("sandboxd-rw-{id}-{}", crate::util::random_hex(4));
                let result = this
                    .swap_rootfs(
                        &id,
                        &container,
                        &new_key,
                        &image.top_chain_id,
                        &snap.id,
                        &lease,
                    )
                    .await;
                let released = this.cd.release(lease).await;
                if let Err(e) = result {
                    // Undo: the old snapshot is still in place; bring the task back if it ran.
                    let cleanup = this.cd.remove(&new_key).await;
                    let restarted = if was_running && this.task(id.as_str()).await?.is_none() {
                        this.start_task(&id, &container.snapshot_key)
                            .await
                            .map(|_| ())
                    } else {
                        Ok(())
                    };
                    return Err(e
                        .with_cleanup(cleanup.and(restarted))
                        .with_cleanup(released));
                }
                this.start_task(&id, &new_key).await?;
                if let Some(key) = &request {
                    let remembered: Vec<(&str, Option<String>)> = retry::RESTORE
                        .of(key, now)
                        .into_iter()
                        .map(|(k, v)| (k, Some(v)))
                        .collect();
                    this.update_labels(id.as_str(), &remembered).await?;
                }
                let sandbox = this.get(&id).await?;
                this.publish(super::EventKind::Restored, &sandbox, &snap.id);
                Ok(sandbox)
            }
            .instrument(span),
        )
        .await
    }
}

/// Removes snapshot `key`, if it exists; a failure only leaves it to the lease's expiry.
pub(super) async fn remove_quietly(cd: &dyn Backend, key: &str) {
    if let Err(e) = cd.remove(key).await {
        tracing::warn!(error = %e, %key, "removing a temporary snapshot failed");
    }
}
