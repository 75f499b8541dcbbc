//! PullImage: the registry protocol (oci-client) feeding containerd's content store, then the
//! layers unpacked into committed overlayfs snapshots, all under one lease.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use tokio::sync::mpsc;

use super::content;
use super::{
    chain_ids, ImageInfo, ImageRef, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
};
use crate::error::{Error, Kind, Result};
use crate::runtime::{
    Backend, BlobWrite, Descriptor as CdDescriptor, ImageRecord, Lease, SNAPSHOTTER,
};

/// How often a download reports progress at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Largest image config fetched: it is held in memory whole, as containerd's own reads of it are.
pub(super) const MAX_CONFIG_SIZE: u64 = content::MAX_METADATA_BLOB as u64;

/// One step of a pull, as streamed to the caller.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// What is happening: resolving, downloading, exists, unpacking, done.
    pub status: String,
    /// The blob the message is about, if any.
    pub digest: String,
    /// Bytes of that blob (or of the whole image for `done`) so far.
    pub bytes_done: i64,
    /// Its size.
    pub bytes_total: i64,
}

/// Where progress goes; a caller that went away does not stop the pull.
pub type ProgressSink = mpsc::Sender<Progress>;

fn report(sink: &Option<ProgressSink>, p: Progress) {
    if let Some(sink) = sink {
        // Dropping a progress message under back-pressure is fine; the final image is not.
        let _ = sink.try_send(p);
    }
}

/// Pulls `image` into containerd and returns it. Idempotent: blobs and snapshots that exist are
/// reused; the image record is created or updated last, so a failed pull leaves no image.
pub async fn pull(
    cd: &dyn Backend,
    image: &ImageRef,
    sink: Option<ProgressSink>,
) -> Result<ImageInfo> {
    let lease = cd.lease("pull").await?;
    // The registry client (oci-client) panics on some answers, e.g. a token that is no valid
    // header value: such a pull fails like any bad answer, and its lease is still released.
    let result = std::panic::AssertUnwindSafe(pull_leased(cd, image, &sink, &lease))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(Error::Registry(format!(
                "{}: the registry client failed on the registry's answer: {}",
                image.name(),
                panic_message(panic.as_ref())
            )))
        });
    let released = cd.release(lease).await;
    match result {
        Ok(info) => {
            released?;
            Ok(info)
        }
        Err(e) => Err(e.with_cleanup(released)),
    }
}

/// What a caught panic says, when it says it as text.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic")
}

fn registry_client(image: &ImageRef) -> oci_client::Client {
    let protocol = if image.is_local_registry() {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    oci_client::Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

fn registry_error(image: &ImageRef, e: OciDistributionError) -> Error {
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            Error::not_found(Kind::Image, image.name())
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    format!("{:?}", e.code).as_str(),
                    "ManifestUnknown" | "NameUnknown" | "BlobUnknown"
                )
            }) =>
        {
            Error::not_found(Kind::Image, image.name())
        }
        _ => Error::Registry(format!("{}: {e}", image.name())),
    }
}

async fn pull_leased(
    cd: &dyn Backend,
    image: &ImageRef,
    sink: &Option<ProgressSink>,
    lease: &Lease,
) -> Result<ImageInfo> {
    let client = registry_client(image);
    let auth = RegistryAuth::Anonymous;
    let reference = image.reference();
    report(
        sink,
        Progress {
            status: "resolving".into(),
            ..Default::default()
        },
    );
    let accepted = [
        MEDIA_OCI_INDEX,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_MANIFEST,
        MEDIA_DOCKER_MANIFEST,
    ];
    let (top_bytes, top_digest) = client
        .pull_manifest_raw(reference, &auth, &accepted)
        .await
        .map_err(|e| registry_error(image, e))?;
    let top_media = media_type_of(&top_bytes);

    // For an index, pick this platform's manifest; the index stays the image's target.
    let (index, manifest_bytes, manifest_digest) = if is_index(&top_media, &top_bytes) {
        let index = parse_index(image, &top_bytes)?;
        let chosen = select_platform(&index).ok_or_else(|| {
            Error::Registry(format!(
                "{}: no manifest for linux/{}",
                image.name(),
                go_arch()
            ))
        })?;
        let child_ref = reference.clone_with_digest(chosen.digest().to_string());
        let (bytes, digest) = client
            .pull_manifest_raw(
                &child_ref,
                &auth,
                &[MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST],
            )
            .await
            .map_err(|e| registry_error(image, e))?;
        (
            Some((index, top_bytes.clone(), top_digest.clone())),
            bytes,
            digest,
        )
    } else {
        (None, top_bytes.clone(), top_digest.clone())
    };
    report(
        sink,
        Progress {
            status: "resolved".into(),
            digest: top_digest.clone(),
            ..Default::default()
        },
    );

    let (manifest, blobs_size) = parse_manifest(image, &manifest_bytes)?;
    let config_desc = manifest.config().clone();
    let config_bytes = fetch_small_blob(&client, image, &config_desc).await?;
    let diff_ids = parse_config(image, &config_bytes, &manifest)?;
    let chain = chain_ids(&diff_ids);

    // Layers first, then config, manifest and index: a blob's GC labels may only name what exists.
    for (layer, diff_id) in manifest.layers().iter().zip(&diff_ids) {
        fetch_layer(cd, &client, image, lease, layer, diff_id, sink).await?;
    }
    unpack(cd, lease, manifest.layers(), &diff_ids, &chain, sink).await?;

    let top_chain = chain.last().cloned().unwrap_or_default();
    let config_labels: HashMap<String, String> = if top_chain.is_empty() {
        HashMap::new()
    } else {
        [(
            format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            top_chain,
        )]
        .into()
    };
    store_blob(
        cd,
        lease,
        config_desc.digest().as_ref(),
        Bytes::from(config_bytes),
        config_labels,
    )
    .await?;

    let mut manifest_labels: HashMap<String, String> = [(
        "containerd.io/gc.ref.content.config".to_string(),
        config_desc.digest().to_string(),
    )]
    .into();
    for (i, layer) in manifest.layers().iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest().to_string(),
        );
    }
    store_blob(
        cd,
        lease,
        &manifest_digest,
        manifest_bytes.clone(),
        manifest_labels,
    )
    .await?;

    let mut size = blobs_size.saturating_add(manifest_bytes.len() as i64);
    let target = if let Some((index, bytes, digest)) = index {
        let mut labels = HashMap::new();
        for (i, m) in index.manifests().iter().enumerate() {
            if m.digest().to_string() == manifest_digest {
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    manifest_digest.clone(),
                );
            }
        }
        size = size.saturating_add(bytes.len() as i64);
        let len = bytes.len() as i64;
        store_blob(cd, lease, &digest, bytes, labels).await?;
        CdDescriptor {
            media_type: top_media.clone(),
            digest: digest.clone(),
            size: len,
            annotations: HashMap::new(),
        }
    } else {
        CdDescriptor {
            media_type: if top_media.is_empty() {
                MEDIA_OCI_MANIFEST.to_string()
            } else {
                top_media.clone()
            },
            digest: manifest_digest.clone(),
            size: manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        }
    };

    let record = ImageRecord {
        name: image.name(),
        target,
        labels: HashMap::new(),
        created_at: None,
    };
    let created_at = cd.put_image(record, lease).await?.created_at;
    report(
        sink,
        Progress {
            status: "done".into(),
            digest: top_digest.clone(),
            bytes_done: size,
            bytes_total: size,
        },
    );
    Ok(ImageInfo {
        name: image.name(),
        digest: top_digest,
        size_bytes: size,
        created_at,
    })
}

/// Parses an image index from a registry.
pub(super) fn parse_index(image: &ImageRef, bytes: &[u8]) -> Result<ImageIndex> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Registry(format!("{}: bad image index: {e}", image.name())))
}

/// Parses a registry's image manifest and checks what it declares before anything is fetched:
/// the config small enough to hold in memory, every size and their sum within containerd's
/// int64. Returns the manifest and the bytes its config and layers declare in all.
pub(super) fn parse_manifest(image: &ImageRef, bytes: &[u8]) -> Result<(ImageManifest, i64)> {
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::Registry(format!("{}: bad image manifest: {e}", image.name())))?;
    let config = manifest.config();
    if config.size() > MAX_CONFIG_SIZE {
        return Err(Error::Registry(format!(
            "{}: the image config {} declares {} bytes, more than the {MAX_CONFIG_SIZE} a config \
             may have",
            image.name(),
            config.digest(),
            config.size()
        )));
    }
    let mut total = config.size() as i64;
    for layer in manifest.layers() {
        total = i64::try_from(layer.size())
            .ok()
            .and_then(|size| total.checked_add(size))
            .ok_or_else(|| {
                Error::Registry(format!(
                    "{}: layer {} declares {} bytes, more than an image may hold in all",
                    image.name(),
                    layer.digest(),
                    layer.size()
                ))
            })?;
    }
    Ok((manifest, total))
}

/// Parses a registry's image config for `manifest`; returns its diff ids, one per layer.
pub(super) fn parse_config(
    image: &ImageRef,
    bytes: &[u8],
    manifest: &ImageManifest,
) -> Result<Vec<String>> {
    let config: ImageConfiguration = serde_json::from_slice(bytes)
        .map_err(|e| Error::Registry(format!("{}: bad image config: {e}", image.name())))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::Registry(format!(
            "{}: manifest has {} layers but config lists {} diff ids",
            image.name(),
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    Ok(diff_ids)
}

pub(super) fn media_type_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: String,
    }
    serde_json::from_slice::<Probe>(bytes)
        .map(|p| p.media_type)
        .unwrap_or_default()
}

pub(super) fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    if media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST {
        return true;
    }
    // OCI allows an index without mediaType; it is told apart by its "manifests" array.
    media_type.is_empty()
        && serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some())
}

/// This host's architecture in Go's naming, as used by OCI platforms.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

pub(super) fn select_platform(index: &ImageIndex) -> Option<&Descriptor> {
    index.manifests().iter().find(|m| {
        m.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == go_arch()
        })
    })
}

/// Fetches a blob [`parse_manifest`] checked to be small (the config) into memory. Memory grows
/// with the bytes that arrive, never with the size the descriptor claims, and a body longer than
/// that size is cut off; the digest is checked at the end.
async fn fetch_small_blob(
    client: &oci_client::Client,
    image: &ImageRef,
    desc: &Descriptor,
) -> Result<Vec<u8>> {
    let declared = desc.size().min(MAX_CONFIG_SIZE) as usize;
    let digest = desc.digest().to_string();
    let mut stream = client
        .pull_blob_stream(image.reference(), digest.as_str())
        .await
        .map_err(|e| registry_error(image, e))?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::Registry(format!("{}: blob {digest}: {e}", image.name())))?;
        if out.len() + chunk.len() > declared {
            return Err(Error::Registry(format!(
                "{}: blob {digest} is longer than its descriptor's {declared} bytes",
                image.name()
            )));
        }
        out.extend_from_slice(&chunk);
    }
    if out.len() != declared {
        return Err(Error::Registry(format!(
            "{}: blob {digest} has {} bytes, its descriptor says {declared}",
            image.name(),
            out.len()
        )));
    }
    Ok(out)
}

/// Stores a small blob with `labels`; one already there only gets the labels.
async fn store_blob(
    cd: &dyn Backend,
    lease: &Lease,
    digest: &str,
    data: Bytes,
    labels: HashMap<String, String>,
) -> Result<()> {
    if cd.has_blob(digest).await? {
        return cd.label_blob(digest, &labels).await;
    }
    content::write_labelled(cd, lease, digest, data, labels).await
}

async fn fetch_layer(
    cd: &dyn Backend,
    client: &oci_client::Client,
    image: &ImageRef,
    lease: &Lease,
    layer: &Descriptor,
    diff_id: &str,
    sink: &Option<ProgressSink>,
) -> Result<()> {
    let digest = layer.digest().to_string();
    let total = layer.size() as i64;
    let labels: HashMap<String, String> = [(
        "containerd.io/uncompressed".to_string(),
        diff_id.to_string(),
    )]
    .into();
    if cd.has_blob(&digest).await? {
        report(
            sink,
            Progress {
                status: "exists".into(),
                digest,
                bytes_done: total,
                bytes_total: total,
            },
        );
        return Ok(());
    }
    report(
        sink,
        Progress {
            status: "downloading".into(),
            digest: digest.clone(),
            bytes_done: 0,
            bytes_total: total,
        },
    );
    let stream = client
        .pull_blob_stream(image.reference(), digest.as_str())
        .await
        .map_err(|e| registry_error(image, e))?
        .stream
        .map_err(std::io::Error::other);
    let mut last = Instant::now();
    let mut on_progress = |done| {
        if last.elapsed() >= PROGRESS_INTERVAL {
            last = Instant::now();
            report(
                sink,
                Progress {
                    status: "downloading".into(),
                    digest: digest.clone(),
                    bytes_done: done,
                    bytes_total: total,
                },
            );
        }
    };
    let blob = BlobWrite {
        digest: &digest,
        total,
        labels,
        data: Box::pin(stream),
        on_progress: &mut on_progress,
    };
    cd.write_blob(blob, lease).await?;
    report(
        sink,
        Progress {
            status: "downloaded".into(),
            digest: digest.clone(),
            bytes_done: total,
            bytes_total: total,
        },
    );
    Ok(())
}

/// Applies each layer onto its parent and commits it under its chain id, skipping what exists.
async fn unpack(
    cd: &dyn Backend,
    lease: &Lease,
    layers: &[Descriptor],
    diff_ids: &[String],
    chain: &[String],
    sink: &Option<ProgressSink>,
) -> Result<()> {
    for (i, layer) in layers.iter().enumerate() {
        let chain_id = &chain[i];
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        // Held before it is looked at: a layer some other image unpacked stays while this
        // pull builds on it, even if that image is deleted meanwhile.
        cd.hold(chain_id, lease).await?;
        if cd.stat(chain_id).await?.is_some() {
            continue;
        }
        report(
            sink,
            Progress {
                status: "unpacking".into(),
                digest: layer.digest().to_string(),
                bytes_done: 0,
                bytes_total: layer.size() as i64,
            },
        );
        let key = format!(
            "sandboxd-unpack-{}-{}",
            crate::util::random_hex(6),
            chain_id
        );
        let mounts = cd
            .prepare(&key, &parent, HashMap::new(), Some(lease))
            .await?;
        let result = apply_and_commit(cd, lease, layer, &diff_ids[i], chain_id, &key, mounts).await;
        if let Err(e) = result {
            let cleanup = cd.remove(&key).await;
            return Err(e.with_cleanup(cleanup));
        }
    }
    Ok(())
}

async fn apply_and_commit(
    cd: &dyn Backend,
    lease: &Lease,
    layer: &Descriptor,
    diff_id: &str,
    chain_id: &str,
    key: &str,
    mounts: Vec<crate::runtime::Mount>,
) -> Result<()> {
    let desc = CdDescriptor {
        media_type: layer.media_type().to_string(),
        digest: layer.digest().to_string(),
        size: layer.size() as i64,
        annotations: HashMap::new(),
    };
    let applied = cd.apply(&desc, &mounts, lease).await?;
    if applied != diff_id {
        return Err(Error::Registry(format!(
            "layer {} unpacked to {applied} but the image config says {diff_id}",
            layer.digest(),
        )));
    }
    if !cd.commit(chain_id, key, lease).await? {
        // Another pull committed the same chain id first; ours is redundant.
        let _ = cd.remove(key).await;
    }
    Ok(())
}
