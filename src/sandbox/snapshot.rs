//! Snapshots: a sandbox's filesystem captured as an OCI image in containerd (the base image's
//! layers plus one layer holding the sandbox's changes) with its unpacked committed chain, so a
//! fork is a snapshot `Prepare` without copying and an export is a registry push.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::manager::{run_to_completion, Manager};
use super::model::{LabelSelector, Page, SandboxId};
use super::record::{L_IMAGE, L_SNAPSHOT};
use super::retry::{self, RequestKey};
use crate::error::{Error, Kind, Result};
use crate::image::{self, ImageRef, MEDIA_OCI_MANIFEST};
use crate::runtime::{
    Backend, Container, Descriptor, ImageRecord, Lease, Mount, TaskState, SNAPSHOTTER,
};
use crate::sys;

/// Where snapshot images are named: `<prefix><snapshot id>:latest`.
pub use crate::image::SNAPSHOT_IMAGE_PREFIX;
/// Media type of the layers sandboxd writes (uncompressed: capture speed beats size on one node).
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Most layers a snapshot image may have before commits squash it into one. overlayfs takes the
/// lower directories in one mount-option page; containerd 1.6's paths fit about 40 of them.
pub const MAX_LAYERS: usize = 24;
const L_SNAPSHOT_ID: &str = "sandboxd.io/snapshot-id";
const L_FROM_SANDBOX: &str = "sandboxd.io/sandbox-id";
const L_PARENT: &str = "sandboxd.io/parent-snapshot";
const L_BASE_IMAGE: &str = "sandboxd.io/base-image";
const L_SIZE: &str = "sandboxd.io/size-bytes";
/// The committed chain a fork prepares on.
const L_CHAIN: &str = "sandboxd.io/chain-id";
/// The image config's `config` section as JSON, when it fits in a label.
const L_RUN_CONFIG: &str = "sandboxd.io/run-config";
/// containerd refuses a label whose key and value together are longer.
const MAX_LABEL_LEN: usize = 4096;

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
fn snapshot_of(record: &ImageRecord) -> Option<Snapshot> {
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
    async fn snapshot_records(&self) -> Result<Vec<ImageRecord>> {
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

    /// CommitSnapshot: captures the sandbox's filesystem; a running sandbox is paused only for
    /// the diff and keeps running with its processes and memory untouched.
    pub async fn commit_snapshot(
        self: &Arc<Self>,
        id: SandboxId,
        mut labels: HashMap<String, String>,
        request: Option<RequestKey>,
    ) -> Result<Snapshot> {
        let this = self.clone();
        let span = tracing::info_span!("commit_snapshot", sandbox_id = %id);
        run_to_completion(
            async move {
                let _retries = this.lock_request(request.as_ref()).await?;
                if let Some(key) = &request {
                    let now = SystemTime::now();
                    for record in this.snapshot_records().await? {
                        if retry::COMMIT.replays(&record.labels, key, now)? {
                            if let Some(snap) = snapshot_of(&record) {
                                tracing::info!(snapshot_id = %snap.id, request_id = key.id(), "a retried commit returns the first call's snapshot");
                                return Ok(snap);
                            }
                        }
                    }
                    labels.extend(retry::COMMIT.of(key, now).map(|(k, v)| (k.to_string(), v)));
                }
                let _guard = this.lock(id.as_str()).await?;
                // Independent: the lease and the container record in one round trip.
                let (lease, container) = tokio::join!(this.cd.lease("commit"), this.container(&id));
                let lease = lease?;
                let result = match container {
                    Ok(Some(container)) => this.commit_locked(&id, &container, labels, &lease).await,
                    Ok(None) => Err(Error::not_found(Kind::Sandbox, id.as_str())),
                    Err(e) => Err(e),
                };
                let released = this.cd.release(lease).await;
                match result {
                    Ok(s) => {
                        if let Err(e) = released {
                            tracing::warn!(error = %e, "releasing the commit lease failed; it will expire");
                        }
                        Ok(s)
                    }
                    Err(e) => Err(e.with_cleanup(released)),
                }
            }
            .instrument(span),
        )
        .await
    }

    /// The commit proper, in three phases. Before the pause, everything the capture needs is
    /// read and prepared concurrently (and undone if any of it fails). While paused: a syncfs
    /// of the sandbox's writable layer and the diff, nothing else. After the resume: the unpack
    /// of the layer and the writes of the image's config and manifest run concurrently; the
    /// image record, which makes the snapshot visible, comes last.
    async fn commit_locked(
        &self,
        id: &SandboxId,
        container: &Container,
        labels: HashMap<String, String>,
        lease: &Lease,
    ) -> Result<Snapshot> {
        let cd = self.cd.as_ref();
        let key = container.snapshot_key.clone();
        let base_name = container.labels.get(L_IMAGE).cloned().unwrap_or_default();
        let parent_snapshot = container
            .labels
            .get(L_SNAPSHOT)
            .cloned()
            .unwrap_or_default();
        // The image the sandbox was made from: the source snapshot's image when it was forked.
        let source_ref = if parent_snapshot.is_empty() {
            base_name.clone()
        } else {
            snapshot_image_name(&parent_snapshot)
        };
        let source_name = ImageRef::parse("image", &source_ref)?;

        // Independent reads, one round trip; their errors are reported in this order.
        let stat = async {
            cd.stat(&key)
                .await?
                .ok_or_else(|| Error::Internal(format!("sandbox {id}'s snapshot {key} is gone")))
        };
        let resolve = async {
            image::resolve(cd, &source_name).await.map_err(|e| match e {
                Error::NotFound { .. } => Error::FailedPrecondition(format!(
                    "the image {source_ref} this sandbox was built from is gone"
                )),
                e => e,
            })
        };
        let (info, source, right, task) =
            tokio::join!(stat, resolve, cd.mounts(&key), self.task(id.as_str()));
        let parent_chain = info?.parent;
        let source = source?;
        if source.top_chain_id != parent_chain {
            return Err(Error::Internal(format!(
                "sandbox {id}'s snapshot parent {parent_chain} is not the top of {source_ref}"
            )));
        }
        let right = right?;
        let running = matches!(task?, Some(t) if t.state == TaskState::Running);

        // Deep chains hit overlayfs' limit on lower layers (the mount options fit one page):
        // past MAX_LAYERS the snapshot becomes one layer holding the whole filesystem.
        let squash = source.manifest.layers().len() + 1 > MAX_LAYERS;
        let base_chain = if squash {
            String::new()
        } else {
            parent_chain.clone()
        };

        // The diff's left side, the snapshot the layer will be unpacked into and a handle on
        // the sandbox's writable layer (for syncfs, flushed once already), made concurrently
        // before the pause: the task is frozen for the capture alone.
        let view_key = format!("sandboxd-view-{}", crate::util::random_hex(6));
        let unpack_key = format!("sandboxd-unpack-{}", crate::util::random_hex(6));
        let view = cd.view(&view_key, &base_chain, lease);
        let prepare = cd.prepare(&unpack_key, &base_chain, HashMap::new(), Some(lease));
        let upper = async {
            match writable_dir(&right) {
                Some(dir) => {
                    sys::blocking(move || {
                        let upper = std::fs::File::open(&dir)
                            .map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
                        // Flushed once while the task still runs, beside the rest of the
                        // set-up: the syncfs inside the pause then has only the last moment's
                        // writes to flush. Its own failure is reported there.
                        let _ = nix::unistd::syncfs(&upper);
                        Ok(Some(upper))
                    })
                    .await
                }
                None => Ok(None),
            }
        };
        let (left, unpack_mounts, upper) = tokio::join!(view, prepare, upper);
        let set_up = match (left, unpack_mounts, upper) {
            (Ok(left), Ok(mounts), Ok(upper)) => Ok((left, mounts, upper)),
            (left, mounts, upper) => Err(left
                .err()
                .or(mounts.err())
                .or(upper.err())
                .unwrap_or_else(|| Error::Internal("commit set-up failed".into()))),
        };
        let pause_started = Instant::now();
        let paused = match (&set_up, running) {
            (Ok(_), true) => cd.pause(id.as_str()).await,
            _ => Ok(()),
        };
        let (left, unpack_mounts, upper) = match set_up.and_then(|s| paused.map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                tokio::join!(
                    remove_quietly(cd, &view_key),
                    remove_quietly(cd, &unpack_key)
                );
                return Err(e);
            }
        };

        // Paused (if running) just long enough for a consistent view. The sandbox's writes are
        // flushed with syncfs of its own filesystem, not a host-wide sync(2).
        let captured = async {
            match upper {
                Some(dir) => {
                    sys::blocking(move || {
                        nix::unistd::syncfs(&dir).map_err(|e| {
                            Error::io("syncfs of the sandbox's writable layer", e.into())
                        })
                    })
                    .await?
                }
                None => {
                    sys::blocking(|| {
                        // SAFETY: sync(2) takes no arguments and cannot fail.
                        unsafe { libc::sync() };
                        Ok(())
                    })
                    .await?
                }
            }
            self.failpoint("commit.diff")?;
            cd.diff(&left, &right, lease).await
        }
        .await;

        // Resumed before anything else runs: work beside it would compete with runc for the CPU
        // and keep the task frozen longer.
        let resumed = if running {
            cd.resume(id.as_str()).await
        } else {
            Ok(())
        };
        let pause_window = pause_started.elapsed();
        let stored = match captured {
            Ok(layer) => {
                let store = self.store_layer(
                    id,
                    &source,
                    layer,
                    (&parent_chain, squash),
                    (&unpack_key, unpack_mounts),
                    lease,
                );
                tokio::join!(remove_quietly(cd, &view_key), store).1
            }
            Err(e) => {
                tokio::join!(
                    remove_quietly(cd, &view_key),
                    remove_quietly(cd, &unpack_key)
                );
                Err(e)
            }
        };
        tracing::info!(?pause_window, running, "captured the sandbox's changes");
        resumed?;
        let stored = stored?;

        let mut image_labels = labels;
        image_labels.insert(L_SNAPSHOT_ID.into(), stored.snap_id.clone());
        image_labels.insert(L_FROM_SANDBOX.into(), id.to_string());
        image_labels.insert(L_BASE_IMAGE.into(), base_name);
        image_labels.insert(L_SIZE.into(), stored.layer_size.to_string());
        image_labels.insert(L_CHAIN.into(), stored.chain.clone());
        let run_config = serde_json::to_string(&source.config.config().clone().unwrap_or_default())
            .map_err(|e| Error::Internal(format!("image config: {e}")))?;
        if L_RUN_CONFIG.len() + run_config.len() <= MAX_LABEL_LEN {
            image_labels.insert(L_RUN_CONFIG.into(), run_config);
        }
        if !parent_snapshot.is_empty() {
            image_labels.insert(L_PARENT.into(), parent_snapshot);
        }
        let record = ImageRecord {
            name: snapshot_image_name(&stored.snap_id),
            labels: image_labels,
            target: Descriptor {
                media_type: MEDIA_OCI_MANIFEST.into(),
                digest: stored.manifest_digest,
                size: stored.manifest_size,
                annotations: HashMap::new(),
            },
            created_at: None,
        };
        let created = cd.put_image(record, lease).await?;
        snapshot_of(&created)
            .ok_or_else(|| Error::Internal("the snapshot record lost its labels".into()))
    }

    /// After the capture: unpacks `layer` into `unpack_key` (prepared on the parent chain,
    /// removed on failure) as a committed snapshot named by its chain id, and, concurrently,
    /// writes the snapshot image's config and manifest (the source's layers plus this one).
    async fn store_layer(
        &self,
        id: &SandboxId,
        source: &image::ResolvedImage,
        layer: Descriptor,
        (parent_chain, squash): (&str, bool),
        (unpack_key, unpack_mounts): (&str, Vec<Mount>),
        lease: &Lease,
    ) -> Result<StoredLayer> {
        let cd = self.cd.as_ref();
        // Uncompressed: the layer digest is its diff id.
        let diff_id = layer.digest.clone();
        let chain = if squash {
            diff_id.clone()
        } else {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent_chain} {diff_id}")))
            )
        };

        let unpack = async {
            // The same layer may be unpacked already (an identical diff): then the prepared
            // snapshot is not needed. The check runs beside the apply, which it rarely saves.
            let exists = async { matches!(cd.stat(&chain).await, Ok(Some(_))) };
            let apply = async {
                self.failpoint("commit.apply")?;
                cd.apply(&layer, &unpack_mounts, lease).await.map(|_| ())
            };
            let (exists, applied) = tokio::join!(exists, apply);
            let committed = match applied {
                Err(e) => Err(e),
                Ok(()) if exists => Ok(false),
                Ok(()) => cd.commit(&chain, unpack_key, lease).await,
            };
            // Whatever did not become the chain's snapshot goes.
            if !matches!(committed, Ok(true)) {
                remove_quietly(cd, unpack_key).await;
            }
            committed.map(|_| ())
        };

        // The snapshot as an image: the source's layers plus ours.
        let snap_id = format!("snap-{}", crate::util::random_hex(8));
        let mut config = serde_json::to_value(&source.config)
            .map_err(|e| Error::Internal(format!("image config: {e}")))?;
        if squash {
            config["rootfs"]["diff_ids"] = json!([]);
            config["history"] = json!([]);
        }
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .ok_or_else(|| Error::Internal("image config has no diff_ids".into()))?
            .push(json!(diff_id));
        let history =
            json!({"created_by": format!("sandboxd commit of sandbox {id}"), "comment": snap_id});
        match config["history"].as_array_mut() {
            Some(h) => h.push(history),
            None => config["history"] = json!([history]),
        }
        let config_bytes = Bytes::from(
            serde_json::to_vec(&config)
                .map_err(|e| Error::Internal(format!("image config: {e}")))?,
        );
        let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
        let config_labels = HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            chain.clone(),
        )]);

        let mut layers: Vec<serde_json::Value> = source
            .manifest
            .layers()
            .iter()
            .filter(|_| !squash)
            .map(|l| json!({"mediaType": l.media_type().to_string(), "digest": l.digest().to_string(), "size": l.size()}))
            .collect();
        layers.push(
            json!({"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": layers,
        });
        let manifest_bytes = Bytes::from(
            serde_json::to_vec(&manifest).map_err(|e| Error::Internal(format!("manifest: {e}")))?,
        );
        let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest_bytes)));
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            config_digest.clone(),
        )]);
        for (i, l) in layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l["digest"].as_str().unwrap_or_default().to_string(),
            );
        }
        let manifest_size = manifest_bytes.len() as i64;

        let (unpacked, config_written, manifest_written) = tokio::join!(
            unpack,
            image::write_labelled(cd, lease, &config_digest, config_bytes, config_labels),
            image::write_labelled(cd, lease, &manifest_digest, manifest_bytes, manifest_labels),
        );
        unpacked?;
        config_written?;
        manifest_written?;
        Ok(StoredLayer {
            snap_id,
            chain,
            layer_size: layer.size,
            manifest_digest,
            manifest_size,
        })
    }

    /// ExportSnapshot: pushes the snapshot's image to `target`; returns the pushed digest.
    /// A snapshot always exports to the same digest, so a retry simply pushes again (blobs the
    /// registry has are skipped); `request` is remembered on the snapshot's record so that the
    /// same id with another request is refused.
    pub async fn export_snapshot(
        &self,
        id: &str,
        target: &ImageRef,
        request: Option<RequestKey>,
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
        let digest = image::push(cd, &resolved.manifest_digest, target).await?;
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
                this.get(&id).await
            }
            .instrument(span),
        )
        .await
    }
}

/// What [`Manager::store_layer`] made, for the image record.
struct StoredLayer {
    snap_id: String,
    /// The committed snapshot's chain id.
    chain: String,
    layer_size: i64,
    manifest_digest: String,
    manifest_size: i64,
}

/// The directory that takes a sandbox's writes, from its writable snapshot's mounts: overlay's
/// upper dir, or a bind mount's source.
fn writable_dir(mounts: &[Mount]) -> Option<std::path::PathBuf> {
    mounts.iter().find_map(|m| match m.kind.as_str() {
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(std::path::PathBuf::from),
        "bind" => Some(std::path::PathBuf::from(&m.source)),
        _ => None,
    })
}

/// Removes snapshot `key`, if it exists; a failure only leaves it to the lease's expiry.
async fn remove_quietly(cd: &dyn Backend, key: &str) {
    if let Err(e) = cd.remove(key).await {
        tracing::warn!(error = %e, %key, "removing a temporary snapshot failed");
    }
}
