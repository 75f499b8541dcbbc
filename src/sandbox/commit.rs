//! CommitSnapshot: a sandbox's filesystem captured as one more layer on its image, the task
//! paused only for the syncfs and the diff, the layer then unpacked as a committed snapshot and
//! the image (config, manifest, record) written, the record last so a snapshot is whole or absent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::manager::{run_to_completion, Manager};
use super::model::SandboxId;
use super::record::{L_IMAGE, L_SNAPSHOT};
use super::retry::{self, RequestKey};
use super::snapshot::*;
use crate::error::{Error, Kind, Result};
use crate::image::{self, ImageRef, MEDIA_OCI_MANIFEST};
use crate::runtime::{Container, Descriptor, ImageRecord, Lease, Mount, TaskState, SNAPSHOTTER};
use crate::sys;

/// How often a commit tries to freeze a sandbox, and the pause after the first failure
/// (doubling after each).
const PAUSE_ATTEMPTS: u32 = 4;
const PAUSE_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

impl Manager {
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
        // The layer and its unpacked copy land on the snapshotter's disk.
        self.disk_room(Some(&right))?;
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
            match super::disk::writable_dir(&right) {
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
            (Ok(_), true) => self.pause_for_commit(id).await,
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

    /// Freezes the sandbox for the capture. Under heavy load the kernel's freezer may not settle
    /// in the time runc gives it ("unable to freeze"; runc thaws the task again): that is tried
    /// again a few times, and then reported as UNAVAILABLE, which clients retry.
    async fn pause_for_commit(&self, id: &SandboxId) -> Result<()> {
        let (mut attempt, mut backoff) = (1, PAUSE_BACKOFF);
        loop {
            let e = match self.cd.pause(id.as_str()).await {
                Err(e) if e.containerd_code() == Some(tonic::Code::Unknown) => e,
                other => return other,
            };
            if attempt == PAUSE_ATTEMPTS {
                return Err(Error::Unavailable {
                    op: "tasks.pause",
                    message: format!(
                        "sandbox {id} could not be frozen for the commit (the node is busy: {e}); retry"
                    ),
                });
            }
            tracing::info!(sandbox_id = %id, attempt, error = %e, "freezing for the commit failed; trying again");
            tokio::time::sleep(backoff).await;
            (attempt, backoff) = (attempt + 1, backoff * 2);
        }
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
            // The chain is held under the lease first: one this commit did not make would
            // otherwise be collected should the snapshot that made it be deleted meanwhile.
            let exists = async {
                cd.hold(&chain, lease).await?;
                Ok::<_, Error>(matches!(cd.stat(&chain).await, Ok(Some(_))))
            };
            let apply = async {
                self.failpoint("commit.apply")?;
                cd.apply(&layer, &unpack_mounts, lease).await.map(|_| ())
            };
            let (exists, applied) = tokio::join!(exists, apply);
            let committed = match (applied, exists) {
                (Err(e), _) | (Ok(()), Err(e)) => Err(e),
                (Ok(()), Ok(true)) => Ok(false),
                (Ok(()), Ok(false)) => cd.commit(&chain, unpack_key, lease).await,
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
