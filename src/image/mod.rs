//! Images: references, pull, and reading what containerd holds.

mod content;
mod pull;
mod push;
mod reference;
pub mod registry;
#[cfg(test)]
mod robust;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

pub use content::write_labelled;
pub use pull::{go_arch, pull, Progress, ProgressSink};
pub use push::push;
pub use reference::ImageRef;
pub use registry::{Access, AuthFile, Registries, RegistrySettings};

use crate::error::{Error, Kind, Result};
use crate::runtime::{Backend, ImageRecord};

/// Where snapshots are named as images: `<prefix><snapshot id>:latest`. Listed by
/// SnapshotService, never as images.
pub const SNAPSHOT_IMAGE_PREFIX: &str = "sandboxd.local/snapshots/";

/// OCI image index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list media type.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest media type.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// An image as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// Normalised reference.
    pub name: String,
    /// Digest of the target manifest or index.
    pub digest: String,
    /// Sum of the sizes of its blobs.
    pub size_bytes: i64,
    /// When containerd recorded it.
    pub created_at: Option<std::time::SystemTime>,
}

/// What a sandbox needs from its image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Normalised reference.
    pub name: String,
    /// The image configuration (entrypoint, env, user...).
    pub config: ImageConfiguration,
    /// Chain id of the top layer: the parent of a sandbox's writable snapshot.
    pub top_chain_id: String,
    /// Image info for reporting.
    pub info: ImageInfo,
    /// The platform manifest (layers and config descriptors).
    pub manifest: ImageManifest,
    /// Its digest.
    pub manifest_digest: String,
    /// The labels of containerd's image record.
    pub labels: std::collections::HashMap<String, String>,
}

/// What creating a sandbox needs from an image: a subset of [`ResolvedImage`] small enough for
/// a snapshot's own record to carry, so a fork needs no manifest or config reads.
#[derive(Debug, Clone)]
pub struct RunImage {
    /// Normalised reference.
    pub name: String,
    /// The `config` section of the image configuration (env, user, working dir...).
    pub run_config: oci_spec::image::Config,
    /// Chain id of the top layer: the parent of a sandbox's writable snapshot.
    pub top_chain_id: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
}

impl From<ResolvedImage> for RunImage {
    fn from(r: ResolvedImage) -> Self {
        RunImage {
            run_config: r.config.config().clone().unwrap_or_default(),
            name: r.name,
            top_chain_id: r.top_chain_id,
            manifest_digest: r.manifest_digest,
        }
    }
}

/// Chain ids per the OCI image spec: `chain[0] = diff[0]`, `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {diff}")))
            ),
        };
        out.push(next);
    }
    out
}

/// Reads the manifest behind an image target, descending through an index to this platform's entry.
async fn load_manifest(
    cd: &dyn Backend,
    media_type: &str,
    digest: &str,
) -> Result<(ImageManifest, String, i64)> {
    let bytes = content::read(cd, digest).await?;
    let mut size = bytes.len() as i64;
    let is_index = media_type == MEDIA_OCI_INDEX
        || media_type == MEDIA_DOCKER_LIST
        || serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|v| v.get("manifests").is_some());
    let (manifest_bytes, manifest_digest) = if is_index {
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("stored index {digest} is corrupt: {e}")))?;
        let mut chosen = None;
        for m in index.manifests() {
            let platform_ok = m.platform().as_ref().is_none_or(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == go_arch()
            });
            if platform_ok && cd.has_blob(m.digest().as_ref()).await? {
                chosen = Some(m.digest().to_string());
                break;
            }
        }
        let chosen = chosen.ok_or_else(|| {
            Error::Internal(format!(
                "index {digest} has no manifest for this platform in the content store"
            ))
        })?;
        let bytes = content::read(cd, &chosen).await?;
        size += bytes.len() as i64;
        (bytes, chosen)
    } else {
        (bytes, digest.to_string())
    };
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Error::Internal(format!("stored manifest is corrupt: {e}")))?;
    // A size is only reported here: one that does not fit (or a sum that overflows) saturates.
    let declared = |d: &oci_spec::image::Descriptor| i64::try_from(d.size()).unwrap_or(i64::MAX);
    let blobs = std::iter::once(manifest.config()).chain(manifest.layers());
    let size = blobs.fold(size, |sum, d| sum.saturating_add(declared(d)));
    Ok((manifest, manifest_digest, size))
}

fn info_of(record: &ImageRecord, size: i64) -> ImageInfo {
    ImageInfo {
        name: record.name.clone(),
        digest: record.target.digest.clone(),
        size_bytes: size,
        created_at: record.created_at,
    }
}

/// GetImage: the image named `image`, NOT_FOUND when containerd does not hold it.
pub async fn get(cd: &dyn Backend, image: &ImageRef) -> Result<ImageInfo> {
    Ok(resolve(cd, image).await?.info)
}

/// Reads an image's configuration and top chain id, NOT_FOUND when it is not held.
pub async fn resolve(cd: &dyn Backend, image: &ImageRef) -> Result<ResolvedImage> {
    let record = cd
        .image(&image.name())
        .await?
        .ok_or_else(|| Error::not_found(Kind::Image, image.name()))?;
    let target = record.target.clone();
    if target.digest.is_empty() {
        return Err(Error::Internal(format!(
            "image {} has no target",
            image.name()
        )));
    }
    let (manifest, manifest_digest, size) =
        load_manifest(cd, &target.media_type, &target.digest).await?;
    let config_bytes = content::read(cd, manifest.config().digest().as_ref()).await?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes).map_err(|e| {
        Error::Internal(format!("stored config of {} is corrupt: {e}", image.name()))
    })?;
    let chain = chain_ids(config.rootfs().diff_ids());
    Ok(ResolvedImage {
        name: image.name(),
        top_chain_id: chain.last().cloned().unwrap_or_default(),
        config,
        info: info_of(&record, size),
        manifest,
        manifest_digest,
        labels: record.labels,
    })
}

/// ListImages, ordered by name.
pub async fn list(cd: &dyn Backend) -> Result<Vec<ImageInfo>> {
    let records = cd.images(None).await?;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let target = &record.target;
        // Snapshots are images internally but are listed by SnapshotService, not here.
        if target.digest.is_empty() || record.name.starts_with(SNAPSHOT_IMAGE_PREFIX) {
            continue;
        }
        // An image whose blobs are gone (a pull in progress elsewhere) is listed without a size.
        let size = match load_manifest(cd, &target.media_type, &target.digest).await {
            Ok((_, _, size)) => size,
            Err(_) => target.size,
        };
        out.push(info_of(&record, size));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// DeleteImage; containerd's GC then frees blobs and snapshots nothing else references.
/// Sandboxes already created from it keep working: their snapshots pin their parents.
pub async fn delete(cd: &dyn Backend, image: &ImageRef) -> Result<()> {
    if cd.delete_image(&image.name()).await? {
        Ok(())
    } else {
        Err(Error::not_found(Kind::Image, image.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_formula() {
        let diffs = vec!["sha256:aaa".to_string(), "sha256:bbb".to_string()];
        let chain = chain_ids(&diffs);
        assert_eq!(chain[0], "sha256:aaa");
        let expect = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aaa sha256:bbb"))
        );
        assert_eq!(chain[1], expect);
        assert!(chain_ids(&[]).is_empty());
    }
}
