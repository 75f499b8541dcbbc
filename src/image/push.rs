//! Pushing an image held in containerd to a registry (ExportSnapshot): each blob streamed from
//! the content store unless the registry has it, then the manifest.

use futures::{FutureExt, StreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use oci_spec::image::ImageManifest;

use super::content;
use super::{ImageRef, MEDIA_OCI_MANIFEST};
use crate::error::{Error, Result};
use crate::runtime::Backend;

/// Pushes the single-platform image whose manifest is `manifest_digest` to `target`; returns the
/// pushed manifest digest.
pub async fn push(cd: &dyn Backend, manifest_digest: &str, target: &ImageRef) -> Result<String> {
    // As in a pull: a registry answer the client panics on fails the push, not the caller's task.
    std::panic::AssertUnwindSafe(push_unguarded(cd, manifest_digest, target))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(Error::Registry(format!(
                "pushing to {target}: the registry client failed on the registry's answer: {}",
                super::pull::panic_message(panic.as_ref())
            )))
        })
}

async fn push_unguarded(
    cd: &dyn Backend,
    manifest_digest: &str,
    target: &ImageRef,
) -> Result<String> {
    let protocol = if target.is_local_registry() {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = oci_client::Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let reference = target.reference();
    let registry_err =
        |e: OciDistributionError| Error::Registry(format!("pushing to {target}: {e}"));
    client
        .auth(reference, &RegistryAuth::Anonymous, RegistryOperation::Push)
        .await
        .map_err(registry_err)?;

    let manifest_bytes = content::read(cd, manifest_digest).await?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        Error::Internal(format!("stored manifest {manifest_digest} is corrupt: {e}"))
    })?;
    let blobs = std::iter::once(manifest.config()).chain(manifest.layers().iter());
    for blob in blobs {
        let digest = blob.digest().to_string();
        if client
            .blob_exists(reference, &digest)
            .await
            .map_err(registry_err)?
        {
            continue;
        }
        let stream = cd.read_blob_stream(&digest).await?.map(|chunk| {
            chunk.map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))
        });
        client
            .push_blob_stream(reference, stream, &digest, Some(blob.size()))
            .await
            .map_err(registry_err)?;
    }
    let content_type = http::HeaderValue::from_static(MEDIA_OCI_MANIFEST);
    client
        .push_manifest_raw(reference, manifest_bytes, content_type)
        .await
        .map_err(registry_err)?;
    Ok(manifest_digest.to_string())
}
