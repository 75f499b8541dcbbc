//! Pushing an image held in containerd to a registry (ExportSnapshot): each blob streamed from
//! the content store unless the registry has it, then the manifest. Authorization is
//! negotiated before the first upload, whose body cannot be sent twice.

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use oci_spec::image::ImageManifest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;

use super::content;
use super::registry::{Access, Actions, Session};
use super::{ImageRef, MEDIA_OCI_MANIFEST};
use crate::error::{Error, Result};
use crate::runtime::Backend;

/// Chunks of a blob in flight between the content store and the upload.
const UPLOAD_QUEUE: usize = 4;

/// Pushes the single-platform image whose manifest is `manifest_digest` to `target`; returns the
/// pushed manifest digest.
pub async fn push(
    access: &Access,
    cd: &dyn Backend,
    manifest_digest: &str,
    target: &ImageRef,
) -> Result<String> {
    // As in a pull: a registry answer something panics on fails the push, not the caller's task.
    std::panic::AssertUnwindSafe(push_unguarded(access, cd, manifest_digest, target))
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
    access: &Access,
    cd: &dyn Backend,
    manifest_digest: &str,
    target: &ImageRef,
) -> Result<String> {
    let what = format!("pushing to {target}");
    let reference = target.reference();
    let endpoint = access.push_endpoint(reference.registry(), &what).await?;
    let session = access.session(endpoint, reference.repository(), Actions::Push, what);
    session.authorize_up_front().await?;

    let manifest_bytes = content::read(cd, manifest_digest).await?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        Error::Internal(format!("stored manifest {manifest_digest} is corrupt: {e}"))
    })?;
    let blobs = std::iter::once(manifest.config()).chain(manifest.layers().iter());
    for blob in blobs {
        let digest = blob.digest().to_string();
        if blob_exists(&session, &digest).await? {
            continue;
        }
        upload_blob(&session, cd, &digest, blob.size()).await?;
    }
    let tag = reference
        .tag()
        .map(str::to_string)
        .unwrap_or_else(|| manifest_digest.to_string());
    let url = session.url(&format!("manifests/{tag}"));
    let body = Bytes::from(manifest_bytes);
    let response = session
        .send(&|c| {
            c.put(url.clone())
                .header(CONTENT_TYPE, MEDIA_OCI_MANIFEST)
                .body(body.clone())
        })
        .await?;
    if !response.status().is_success() {
        return Err(session.unexpected(response, "manifest upload").await);
    }
    Ok(manifest_digest.to_string())
}

async fn blob_exists(session: &Session, digest: &str) -> Result<bool> {
    let url = session.url(&format!("blobs/{digest}"));
    let response = session.send(&|c| c.head(url.clone())).await?;
    match response.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(session
            .unexpected(response, &format!("blob {digest}"))
            .await),
    }
}

/// Uploads blob `digest` in one request (`POST` for a location, `PUT` of the body), streamed
/// from the content store.
async fn upload_blob(session: &Session, cd: &dyn Backend, digest: &str, size: u64) -> Result<()> {
    let start = session.url("blobs/uploads/");
    let response = session
        .send(&|c| c.post(start.clone()).header(CONTENT_LENGTH, 0))
        .await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(session.unexpected(response, "starting an upload").await);
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::Registry(format!(
                "{}: the registry started an upload without a Location",
                session.what()
            ))
        })?
        .to_string();
    let mut url = session.location(&location)?;
    url.query_pairs_mut().append_pair("digest", digest);

    let mut source = cd.read_blob_stream(digest).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(UPLOAD_QUEUE);
    let feed = async move {
        while let Some(chunk) = source.next().await {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    };
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    // The body can be sent once only; authorization was negotiated up front, so a 401 here
    // is a refusal, not a challenge to answer.
    let body = std::sync::Mutex::new(Some(body));
    let make = move |c: &reqwest::Client| {
        let body = body
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| reqwest::Body::from(Vec::new()));
        c.put(url.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body)
    };
    let upload = session.send(&make);
    let ((), response) = tokio::join!(feed, upload);
    let response = response?;
    if response.status() != StatusCode::CREATED {
        return Err(session
            .unexpected(response, &format!("uploading blob {digest}"))
            .await);
    }
    Ok(())
}
