//! PullImage: the registry protocol (our `registry` client) feeding containerd's content store,
//! layers fetched a few at a time and each unpacked into a committed overlayfs snapshot as soon
//! as it and the layers below it are in, all under one lease.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use super::content;
use super::registry::{Access, Actions, BlobBody, Session};
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
/// Largest manifest or index read (containerd's own limit for manifests is 4 MiB too).
pub(super) const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Layers downloaded at once; each is unpacked when it and the ones below it are in.
const PARALLEL_LAYERS: usize = 4;

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
    access: &Access,
    cd: &dyn Backend,
    image: &ImageRef,
    sink: Option<ProgressSink>,
) -> Result<ImageInfo> {
    let lease = cd.lease("pull").await?;
    // A panic on some registry answer fails this pull like any bad answer, and its lease is
    // still released.
    let result = std::panic::AssertUnwindSafe(pull_leased(access, cd, image, &sink, &lease))
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

/// Refuses a digest that is not `sha256:` and 64 hex digits: it becomes part of a URL path and
/// a containerd key, and only sha256 is verified.
pub(super) fn check_digest(image: &ImageRef, digest: &str) -> Result<()> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Registry(format!(
            "{}: {digest:?} is not a sha256 digest",
            image.name()
        )))
    }
}

/// A manifest or index as fetched: its bytes, digest and media type.
struct Fetched {
    bytes: Bytes,
    digest: String,
    media_type: String,
}

/// Fetches manifest `reference` (a tag or a digest), at most [`MAX_MANIFEST_SIZE`] bytes, and
/// checks it against the digest asked for, or the one the registry declares.
async fn fetch_manifest(
    session: &Session,
    image: &ImageRef,
    reference: &str,
    accepted: &[&str],
) -> Result<Fetched> {
    let url = session.url(&format!("manifests/{reference}"));
    let accept = HeaderValue::from_str(&accepted.join(", "))
        .map_err(|e| Error::Internal(format!("accept header: {e}")))?;
    let response = session
        .send(&|c| c.get(url.clone()).header(ACCEPT, accept.clone()))
        .await?;
    if response.status() == StatusCode::NOT_FOUND {
        let reason = session.reason(response).await;
        tracing::debug!(image = %image, %reason, "manifest not found");
        return Err(Error::not_found(Kind::Image, image.name()));
    }
    if !response.status().is_success() {
        return Err(session.unexpected(response, "manifest").await);
    }
    let declared_digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default();
    let bytes = session
        .read_bounded(response, MAX_MANIFEST_SIZE, "the manifest")
        .await?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let expected = if reference.starts_with("sha256:") {
        Some(reference.to_string())
    } else {
        declared_digest.filter(|d| d.starts_with("sha256:"))
    };
    if let Some(expected) = expected {
        if expected != digest {
            return Err(Error::Registry(format!(
                "{}: the manifest served as {expected} has digest {digest}",
                session.what()
            )));
        }
    }
    let from_body = media_type_of(&bytes);
    let media_type = if from_body.is_empty() && accepted.contains(&content_type.as_str()) {
        content_type
    } else {
        from_body
    };
    Ok(Fetched {
        bytes: Bytes::from(bytes),
        digest,
        media_type,
    })
}

/// Finds the top manifest (or index) of `image` at the first endpoint that has it: its mirrors
/// in order, then its registry. Returns the session that found it, for the blobs.
async fn resolve_top(access: &Access, image: &ImageRef) -> Result<(Session, Fetched)> {
    let reference = image.reference();
    let tag_or_digest = reference
        .digest()
        .or(reference.tag())
        .unwrap_or("latest")
        .to_string();
    if tag_or_digest.starts_with("sha256:") {
        check_digest(image, &tag_or_digest)?;
    }
    let accepted = [
        MEDIA_OCI_INDEX,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_MANIFEST,
        MEDIA_DOCKER_MANIFEST,
    ];
    let endpoints = access
        .pull_endpoints(reference.registry(), &image.name())
        .await?;
    let mut failures = Vec::new();
    for endpoint in endpoints {
        let session = access.session(
            endpoint,
            reference.repository(),
            Actions::Pull,
            image.name(),
        );
        match fetch_manifest(&session, image, &tag_or_digest, &accepted).await {
            Ok(top) => {
                if !failures.is_empty() {
                    tracing::info!(image = %image, from = session.endpoint(), "pulling past failed mirrors");
                }
                return Ok((session, top));
            }
            Err(e) if session.is_mirror() => {
                tracing::warn!(image = %image, mirror = session.endpoint(), error = %e, "mirror failed; trying the next");
                failures.push(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Internal(format!(
        "{}: no endpoint to pull from",
        image.name()
    )))
}

async fn pull_leased(
    access: &Access,
    cd: &dyn Backend,
    image: &ImageRef,
    sink: &Option<ProgressSink>,
    lease: &Lease,
) -> Result<ImageInfo> {
    report(
        sink,
        Progress {
            status: "resolving".into(),
            ..Default::default()
        },
    );
    let (session, top) = resolve_top(access, image).await?;
    let top_media = top.media_type.clone();

    // For an index, pick this platform's manifest; the index stays the image's target.
    let (index, manifest) = if is_index(&top_media, &top.bytes) {
        let index = parse_index(image, &top.bytes)?;
        let chosen = select_platform(&index).ok_or_else(|| {
            Error::Registry(format!(
                "{}: no manifest for linux/{}",
                image.name(),
                go_arch()
            ))
        })?;
        let digest = chosen.digest().to_string();
        check_digest(image, &digest)?;
        let manifest = fetch_manifest(
            &session,
            image,
            &digest,
            &[MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST],
        )
        .await?;
        (Some((index, top)), manifest)
    } else {
        (None, top)
    };
    let top_digest = index
        .as_ref()
        .map_or(&manifest.digest, |(_, top)| &top.digest)
        .clone();
    report(
        sink,
        Progress {
            status: "resolved".into(),
            digest: top_digest.clone(),
            ..Default::default()
        },
    );
    let manifest_bytes = manifest.bytes.clone();
    let manifest_digest = manifest.digest.clone();

    let (parsed, blobs_size) = parse_manifest(image, &manifest_bytes)?;
    check_layers(access, image, &parsed)?;
    let config_desc = parsed.config().clone();
    let config_bytes = fetch_small_blob(&session, image, &config_desc).await?;
    let diff_ids = parse_config(image, &config_bytes, &parsed)?;
    let chain = chain_ids(&diff_ids);

    // Layers first, then config, manifest and index: a blob's GC labels may only name what exists.
    let layers = Layers {
        descriptors: parsed.layers(),
        diff_ids: &diff_ids,
        chain: &chain,
    };
    fetch_and_unpack(cd, &session, lease, &layers, sink).await?;

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
    for (i, layer) in parsed.layers().iter().enumerate() {
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
    let target = if let Some((index, top)) = index {
        let mut labels = HashMap::new();
        for (i, m) in index.manifests().iter().enumerate() {
            if m.digest().to_string() == manifest_digest {
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    manifest_digest.clone(),
                );
            }
        }
        size = size.saturating_add(top.bytes.len() as i64);
        let len = top.bytes.len() as i64;
        store_blob(cd, lease, &top.digest, top.bytes, labels).await?;
        CdDescriptor {
            media_type: top_media.clone(),
            digest: top.digest,
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

/// Checks every layer's digest and declared size (against `--registry-max-layer-size`) before
/// anything is fetched.
fn check_layers(access: &Access, image: &ImageRef, manifest: &ImageManifest) -> Result<()> {
    check_digest(image, manifest.config().digest().as_ref())?;
    let max = access.max_layer_size();
    for layer in manifest.layers() {
        check_digest(image, layer.digest().as_ref())?;
        if layer.size() > max {
            return Err(Error::Registry(format!(
                "{}: layer {} declares {} bytes, more than the {max} a layer may have                  (--registry-max-layer-size)",
                image.name(),
                layer.digest(),
                layer.size()
            )));
        }
    }
    Ok(())
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
/// with the bytes that arrive, never with the size the descriptor claims; the body must be
/// exactly that size and match its digest.
async fn fetch_small_blob(
    session: &Session,
    image: &ImageRef,
    desc: &Descriptor,
) -> Result<Vec<u8>> {
    let declared = desc.size().min(MAX_CONFIG_SIZE);
    let digest = desc.digest().to_string();
    let response = get_blob(session, &image.name(), &digest).await?;
    let (_never, cancel) = watch::channel(false);
    let mut stream = BlobBody::stream(session, response, &digest, declared, cancel);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Registry(e.to_string()))?;
        out.extend_from_slice(&chunk);
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
    cd.hold_blob(digest, lease).await?;
    if cd.has_blob(digest).await? {
        return cd.label_blob(digest, &labels).await;
    }
    content::write_labelled(cd, lease, digest, data, labels).await
}

/// The layers of a manifest with their diff ids and chain ids, index by index.
struct Layers<'a> {
    descriptors: &'a [Descriptor],
    diff_ids: &'a [String],
    chain: &'a [String],
}

/// The first failure of a pull whose layers move at once: it calls the others off, and is
/// what the pull reports (not the "called off" of the layers it stopped).
struct Failure {
    first: Mutex<Option<Error>>,
    cancel: watch::Sender<bool>,
}

impl Failure {
    fn record(&self, e: Error) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
        self.cancel.send_replace(true);
    }

    fn is_set(&self) -> bool {
        *self.cancel.borrow()
    }

    fn take(&self) -> Option<Error> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Downloads the layers, [`PARALLEL_LAYERS`] at a time, and unpacks each as soon as it and
/// the layers below it are in. On a failure the downloads under way are called off and run
/// to their end (each aborts its content write), so nothing is left half-written.
async fn fetch_and_unpack(
    cd: &dyn Backend,
    session: &Session,
    lease: &Lease,
    layers: &Layers<'_>,
    sink: &Option<ProgressSink>,
) -> Result<()> {
    let (cancel, _) = watch::channel(false);
    let failure = Arc::new(Failure {
        first: Mutex::new(None),
        cancel,
    });
    // Room for every result: downloads never wait on an unpack.
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(layers.descriptors.len().max(1));
    // Boxed as `dyn Send` one by one: a combinator over borrowing closures is not provably
    // Send to the compiler.
    let mut each: Vec<Pin<Box<dyn Future<Output = Option<usize>> + Send + '_>>> = Vec::new();
    for (i, layer) in layers.descriptors.iter().enumerate() {
        let failure = failure.clone();
        let diff_id = &layers.diff_ids[i];
        each.push(Box::pin(async move {
            if failure.is_set() {
                return None;
            }
            let cancel = failure.cancel.subscribe();
            match fetch_layer(cd, session, lease, layer, diff_id, sink, cancel).await {
                Ok(()) => Some(i),
                Err(e) => {
                    failure.record(e);
                    None
                }
            }
        }));
    }
    let downloads = futures::stream::iter(each).buffered(PARALLEL_LAYERS);
    let download_all = async move {
        futures::pin_mut!(downloads);
        // Run every download to its end, even after a failure: a dropped one would leave its
        // content write unfinished.
        while let Some(done) = downloads.next().await {
            if let Some(i) = done {
                let _ = done_tx.send(i).await;
            }
        }
    };
    let unpack_in_order = async {
        let mut next = 0;
        while let Some(i) = done_rx.recv().await {
            // `buffered` yields in order, so `i` is the next layer unless one failed.
            if failure.is_set() || i != next {
                continue;
            }
            if let Err(e) = unpack_layer(cd, lease, layers, i, sink).await {
                failure.record(e);
                continue;
            }
            next += 1;
        }
    };
    tokio::join!(download_all, unpack_in_order);
    match failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn fetch_layer(
    cd: &dyn Backend,
    session: &Session,
    lease: &Lease,
    layer: &Descriptor,
    diff_id: &str,
    sink: &Option<ProgressSink>,
    cancel: watch::Receiver<bool>,
) -> Result<()> {
    let digest = layer.digest().to_string();
    let total = layer.size() as i64;
    let labels: HashMap<String, String> = [(
        "containerd.io/uncompressed".to_string(),
        diff_id.to_string(),
    )]
    .into();
    // Held before it is looked at: a blob another pull wrote (and may see collected when
    // that pull fails) stays while this one unpacks it.
    cd.hold_blob(&digest, lease).await?;
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
    let image_name = session.what().to_string();
    let response = get_blob(session, &image_name, &digest).await?;
    if super::registry::declared_length(&response).is_some_and(|n| n != layer.size()) {
        return Err(Error::Registry(format!(
            "{image_name}: blob {digest} is served with a length other than the {total} bytes \
             its descriptor declares"
        )));
    }
    let stream = BlobBody::stream(session, response, &digest, layer.size(), cancel);
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
        data: stream,
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

/// `GET` of blob `digest` of image `image_name`: the answer whose body is the blob.
async fn get_blob(session: &Session, image_name: &str, digest: &str) -> Result<reqwest::Response> {
    let url = session.url(&format!("blobs/{digest}"));
    let response = session.send(&|c| c.get(url.clone())).await?;
    if response.status() == StatusCode::NOT_FOUND {
        let reason = session.reason(response).await;
        return Err(Error::Registry(format!(
            "{image_name}: blob {digest} is missing from the registry: {reason}"
        )));
    }
    if !response.status().is_success() {
        return Err(session
            .unexpected(response, &format!("blob {digest}"))
            .await);
    }
    Ok(response)
}

/// Applies layer `i` onto its parent and commits it under its chain id, unless it exists.
async fn unpack_layer(
    cd: &dyn Backend,
    lease: &Lease,
    layers: &Layers<'_>,
    i: usize,
    sink: &Option<ProgressSink>,
) -> Result<()> {
    let layer = &layers.descriptors[i];
    let chain_id = &layers.chain[i];
    let parent = if i == 0 {
        String::new()
    } else {
        layers.chain[i - 1].clone()
    };
    // Held before it is looked at: a layer some other image unpacked stays while this
    // pull builds on it, even if that image is deleted meanwhile.
    cd.hold(chain_id, lease).await?;
    if cd.stat(chain_id).await?.is_some() {
        return Ok(());
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
    let result = apply_and_commit(
        cd,
        lease,
        layer,
        &layers.diff_ids[i],
        chain_id,
        &key,
        mounts,
    )
    .await;
    if let Err(e) = result {
        let cleanup = cd.remove(&key).await;
        return Err(e.with_cleanup(cleanup));
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
