//! Blobs in the content store, as the image code uses them: small documents read whole, and
//! in-memory blobs written with their GC labels.

use std::collections::HashMap;

use bytes::Bytes;

use crate::error::Result;
use crate::runtime::{Backend, BlobWrite, Lease};

/// Largest blob read whole into memory (manifests, indexes, configs).
pub(super) const MAX_METADATA_BLOB: i64 = 16 << 20;

/// Reads a small blob (manifest, index, config) whole; refused past [`MAX_METADATA_BLOB`].
pub async fn read(cd: &dyn Backend, digest: &str) -> Result<Vec<u8>> {
    cd.read_blob(digest, MAX_METADATA_BLOB).await
}

/// Writes an in-memory blob; true when this call stored it (false: it was there already).
pub async fn write_bytes(
    cd: &dyn Backend,
    lease: &Lease,
    digest: &str,
    data: Bytes,
    labels: HashMap<String, String>,
) -> Result<bool> {
    let blob = BlobWrite {
        digest,
        total: data.len() as i64,
        labels,
        data: Box::pin(futures::stream::iter([Ok(data)])),
        on_progress: &mut |_| {},
    };
    cd.write_blob(blob, lease).await
}

/// Writes an in-memory blob carrying `labels`: they go with the commit, and are set separately
/// only when the blob was already there (committed by another writer, perhaps without them).
pub async fn write_labelled(
    cd: &dyn Backend,
    lease: &Lease,
    digest: &str,
    data: Bytes,
    labels: HashMap<String, String>,
) -> Result<()> {
    if !write_bytes(cd, lease, digest, data, labels.clone()).await? {
        cd.label_blob(digest, &labels).await?;
    }
    Ok(())
}
