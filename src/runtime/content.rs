//! containerd's content store: read small blobs, stream large ones in with a checked digest.

use std::collections::HashMap;

use bytes::Bytes;
use containerd_client::services::v1::{
    Info, InfoRequest, ReadContentRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Containerd;
use crate::error::{Error, Result};

/// Largest blob read whole into memory (manifests, indexes, configs).
const MAX_METADATA_BLOB: i64 = 16 << 20;
/// Requests buffered towards containerd while a blob streams in.
const WRITE_QUEUE: usize = 8;

/// The content store's record of `digest`, or `None` when it is absent.
pub async fn info(cd: &Containerd, digest: &str) -> Result<Option<Info>> {
    let req = InfoRequest {
        digest: digest.to_string(),
    };
    match cd.content().info(cd.req(req)).await {
        Ok(resp) => Ok(resp.into_inner().info),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(Error::containerd("content.info", s)),
    }
}

/// Reads a small blob (manifest, index, config) whole. One round trip: the read is capped just
/// past the limit instead of asking for the size first.
pub async fn read(cd: &Containerd, digest: &str) -> Result<Vec<u8>> {
    let missing = || Error::Internal(format!("blob {digest} is missing from the content store"));
    let req = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: MAX_METADATA_BLOB + 1,
    };
    let mut stream = match cd.content().read(cd.req(req)).await {
        Ok(resp) => resp.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Err(missing()),
        Err(s) => return Err(Error::containerd("content.read", s)),
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(s) if s.code() == tonic::Code::NotFound => return Err(missing()),
            Err(s) => return Err(Error::containerd("content.read", s)),
        };
        out.extend_from_slice(&chunk.data);
        if out.len() as i64 > MAX_METADATA_BLOB {
            return Err(Error::Internal(format!(
                "blob {digest} is over {MAX_METADATA_BLOB} bytes, too large to read whole"
            )));
        }
    }
    Ok(out)
}

/// Sets `labels` on an existing blob, leaving its other labels alone.
pub async fn set_labels(
    cd: &Containerd,
    digest: &str,
    labels: &HashMap<String, String>,
) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let req = UpdateRequest {
        info: Some(Info {
            digest: digest.to_string(),
            labels: labels.clone(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
        }),
    };
    cd.content()
        .update(cd.req(req))
        .await
        .map_err(|s| Error::containerd("content.update", s))?;
    Ok(())
}

/// Streams `data` into the content store as `digest` (exactly `total` bytes) under `lease`.
/// containerd verifies size and digest at commit; a blob that exists already is success.
/// `on_progress` sees the running byte count.
pub async fn write<S>(
    cd: &Containerd,
    lease: &str,
    digest: &str,
    total: i64,
    labels: HashMap<String, String>,
    data: S,
    on_progress: impl FnMut(i64),
) -> Result<()>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    write_new(cd, lease, digest, total, labels, data, on_progress)
        .await
        .map(|_| ())
}

/// [`write`], telling whether this call committed the blob (false: it was there already).
async fn write_new<S>(
    cd: &Containerd,
    lease: &str,
    digest: &str,
    total: i64,
    labels: HashMap<String, String>,
    mut data: S,
    mut on_progress: impl FnMut(i64),
) -> Result<bool>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    // A unique ref keeps concurrent writers of one blob from locking each other out.
    let write_ref = format!(
        "sandboxd-{}-{}",
        digest.replace(':', "-"),
        crate::util::random_hex(4)
    );
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let stat = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: write_ref.clone(),
        ..Default::default()
    };
    tx.send(stat)
        .await
        .map_err(|_| Error::Internal("content write queue closed".into()))?;
    let mut responses = match cd
        .content()
        .write(cd.req_leased(ReceiverStream::new(rx), lease))
        .await
    {
        Ok(resp) => resp.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(false),
        Err(s) => return Err(Error::containerd("content.write", s)),
    };
    // Each request gets one response; read them as we go so that neither side stalls.
    let expect_response = |resp: Option<Result<_, tonic::Status>>| -> Result<bool> {
        match resp {
            Some(Ok(_)) => Ok(false),
            Some(Err(s)) if s.code() == tonic::Code::AlreadyExists => Ok(true),
            Some(Err(s)) => Err(Error::containerd("content.write", s)),
            None => Err(Error::Internal("content.write ended early".into())),
        }
    };
    if expect_response(responses.next().await)? {
        return Ok(false);
    }
    let mut offset = 0i64;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Error::Registry(format!("reading blob {digest}: {e}")))?;
        let len = chunk.len() as i64;
        if offset + len > total {
            return Err(Error::Registry(format!(
                "blob {digest} is longer than its descriptor's {total} bytes"
            )));
        }
        let req = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: write_ref.clone(),
            total,
            expected: digest.to_string(),
            offset,
            data: chunk.to_vec(),
            ..Default::default()
        };
        tx.send(req)
            .await
            .map_err(|_| Error::Internal("content write stream closed".into()))?;
        if expect_response(responses.next().await)? {
            return Ok(false);
        }
        offset += len;
        on_progress(offset);
    }
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: write_ref,
        total,
        expected: digest.to_string(),
        offset,
        labels,
        ..Default::default()
    };
    tx.send(commit)
        .await
        .map_err(|_| Error::Internal("content write stream closed".into()))?;
    let existed = expect_response(responses.next().await)?;
    drop(tx);
    Ok(!existed)
}

/// Writes an in-memory blob (see [`write`]).
pub async fn write_bytes(
    cd: &Containerd,
    lease: &str,
    digest: &str,
    data: Bytes,
    labels: HashMap<String, String>,
) -> Result<()> {
    let total = data.len() as i64;
    let stream = futures::stream::iter([Ok(data)]);
    write(cd, lease, digest, total, labels, stream, |_| {}).await
}

/// Writes an in-memory blob carrying `labels`: they go with the commit, and are set separately
/// only when the blob was already there (committed by another writer, perhaps without them).
pub async fn write_labelled(
    cd: &Containerd,
    lease: &str,
    digest: &str,
    data: Bytes,
    labels: HashMap<String, String>,
) -> Result<()> {
    let total = data.len() as i64;
    let stream = futures::stream::iter([Ok(data)]);
    if !write_new(cd, lease, digest, total, labels.clone(), stream, |_| {}).await? {
        set_labels(cd, digest, &labels).await?;
    }
    Ok(())
}
