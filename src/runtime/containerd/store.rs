//! [`Store`] on containerd's Content, Images, Leases and Version services.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{
    AbortRequest, CreateImageRequest, CreateRequest, DeleteImageRequest, DeleteRequest,
    GetImageRequest, Image as CdImage, Info, InfoRequest, ListImagesRequest, ListRequest,
    ListStatusesRequest, ReadContentRequest, UpdateImageRequest, UpdateRequest, WriteAction,
    WriteContentRequest,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{call, cd_error, descriptor_from, descriptor_to, ok_if_missing, time_from, Containerd};
use crate::error::{Error, Result};
use crate::runtime::backend::{BlobWrite, ByteStream, Store};
use crate::runtime::types::{ImageRecord, Lease};

/// Requests buffered towards containerd while a blob streams in.
const WRITE_QUEUE: usize = 8;
/// What the id of every lease sandboxd makes starts with.
const LEASE_PREFIX: &str = "sandboxd-";
/// What the ref of every content write sandboxd makes starts with.
const INGEST_PREFIX: &str = "sandboxd-";
/// A lease that outlives a crash by at most this long, after which containerd's GC drops it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

fn image_from(i: CdImage) -> ImageRecord {
    ImageRecord {
        name: i.name,
        target: i.target.map(descriptor_from).unwrap_or_default(),
        labels: i.labels,
        created_at: time_from(i.created_at),
    }
}

#[async_trait::async_trait]
impl Store for Containerd {
    async fn has_blob(&self, digest: &str) -> Result<bool> {
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        let resp = self.content().info(self.req(req)).await;
        Ok(ok_if_missing("content.info", resp.map(|r| r.into_inner().info), None)?.is_some())
    }

    async fn read_blob(&self, digest: &str, limit: i64) -> Result<Vec<u8>> {
        // One round trip: the read is capped just past the limit instead of asking the size.
        let missing =
            || Error::Internal(format!("blob {digest} is missing from the content store"));
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: limit + 1,
        };
        let mut stream = match self.content().read(self.req(req)).await {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Err(missing()),
            Err(s) => return Err(cd_error("content.read", s)),
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(s) if s.code() == tonic::Code::NotFound => return Err(missing()),
                Err(s) => return Err(cd_error("content.read", s)),
            };
            out.extend_from_slice(&chunk.data);
            if out.len() as i64 > limit {
                return Err(Error::Internal(format!(
                    "blob {digest} is over {limit} bytes, too large to read whole"
                )));
            }
        }
        Ok(out)
    }

    async fn read_blob_stream(&self, digest: &str) -> Result<ByteStream<'static>> {
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        };
        // Paced by the registry the blob is pushed to.
        let stream = call(
            "content.read",
            self.content().read(self.req_for(req, None)).await,
        )?;
        Ok(Box::pin(stream.map(|chunk| {
            chunk
                .map(|c| bytes::Bytes::from(c.data))
                .map_err(|s| std::io::Error::other(format!("reading from containerd: {s}")))
        })))
    }

    async fn write_blob(&self, blob: BlobWrite<'_>, lease: &Lease) -> Result<bool> {
        // A unique ref keeps concurrent writers of one blob from locking each other out.
        let write_ref = format!(
            "{INGEST_PREFIX}{}-{}",
            blob.digest.replace(':', "-"),
            crate::util::random_hex(4)
        );
        let written = write_new(self, lease.id(), &write_ref, blob).await;
        if written.is_err() {
            // containerd keeps a failed write's partial data until it is aborted.
            if let Err(e) = self.abort_ingest(&write_ref).await {
                tracing::debug!(error = %e, %write_ref, "aborting a failed content write failed; recovery retries");
            }
        }
        written
    }

    async fn hold_blob(&self, digest: &str, lease: &Lease) -> Result<()> {
        let req = containerd_client::services::v1::AddResourceRequest {
            id: lease.id().to_string(),
            resource: Some(containerd_client::services::v1::Resource {
                id: digest.to_string(),
                r#type: "content".to_string(),
            }),
        };
        call(
            "leases.add_resource",
            self.leases().add_resource(self.req(req)).await,
        )
        .map(|_| ())
    }

    async fn ingests(&self) -> Result<Vec<(String, Option<SystemTime>)>> {
        let req = ListStatusesRequest { filters: vec![] };
        let resp = call(
            "content.list_statuses",
            self.content().list_statuses(self.req(req)).await,
        )?;
        Ok(resp
            .statuses
            .into_iter()
            .map(|s| (s.r#ref, time_from(s.updated_at)))
            .collect())
    }

    async fn abort_ingest(&self, write_ref: &str) -> Result<()> {
        let req = AbortRequest {
            r#ref: write_ref.to_string(),
        };
        let resp = self.content().abort(self.req(req)).await;
        ok_if_missing("content.abort", resp.map(|_| ()), ())
    }

    async fn label_blob(&self, digest: &str, labels: &HashMap<String, String>) -> Result<()> {
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
        call("content.update", self.content().update(self.req(req)).await).map(|_| ())
    }

    async fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        let req = GetImageRequest {
            name: name.to_string(),
        };
        let resp = self.images().get(self.req(req)).await;
        Ok(ok_if_missing("images.get", resp.map(|r| r.into_inner().image), None)?.map(image_from))
    }

    async fn images(&self, label: Option<&str>) -> Result<Vec<ImageRecord>> {
        let req = ListImagesRequest {
            filters: label
                .map(|l| format!("labels.\"{l}\""))
                .into_iter()
                .collect(),
        };
        let resp = call("images.list", self.images().list(self.req(req)).await)?;
        Ok(resp.images.into_iter().map(image_from).collect())
    }

    async fn put_image(&self, record: ImageRecord, lease: &Lease) -> Result<ImageRecord> {
        let image = CdImage {
            name: record.name,
            labels: record.labels,
            target: Some(descriptor_to(&record.target)),
            ..Default::default()
        };
        let req = CreateImageRequest {
            image: Some(image.clone()),
            ..Default::default()
        };
        let stored = match self.images().create(self.req_leased(req, lease.id())).await {
            Ok(resp) => resp.into_inner().image,
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let mut paths = vec!["target".to_string()];
                paths.extend(image.labels.keys().map(|k| format!("labels.{k}")));
                let req = UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    ..Default::default()
                };
                call(
                    "images.update",
                    self.images().update(self.req_leased(req, lease.id())).await,
                )?
                .image
            }
            Err(s) => return Err(cd_error("images.create", s)),
        };
        stored
            .map(image_from)
            .ok_or_else(|| Error::Internal("images.create returned nothing".into()))
    }

    async fn delete_image(&self, name: &str) -> Result<bool> {
        let req = DeleteImageRequest {
            name: name.to_string(),
            sync: true,
            target: None,
        };
        let resp = self.images().delete(self.req(req)).await;
        ok_if_missing("images.delete", resp.map(|_| true), false)
    }

    async fn lease(&self, purpose: &str) -> Result<Lease> {
        let id = format!("{LEASE_PREFIX}{purpose}-{}", crate::util::random_hex(8));
        let expire = prost_types::Timestamp::from(SystemTime::now() + LEASE_EXPIRY);
        let req = CreateRequest {
            id: id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), expire.to_string())].into(),
        };
        call("leases.create", self.leases().create(self.req(req)).await)?;
        Ok(Lease { id })
    }

    async fn release(&self, lease: Lease) -> Result<()> {
        let req = DeleteRequest {
            id: lease.id,
            sync: false,
        };
        let resp = self.leases().delete(self.req(req)).await;
        ok_if_missing("leases.delete", resp.map(|_| ()), ())
    }

    async fn leases(&self) -> Result<Vec<(Lease, Option<SystemTime>)>> {
        let req = ListRequest { filters: vec![] };
        let resp = call("leases.list", self.leases().list(self.req(req)).await)?;
        Ok(resp
            .leases
            .into_iter()
            .filter(|l| l.id.starts_with(LEASE_PREFIX))
            .map(|l| (Lease { id: l.id }, time_from(l.created_at)))
            .collect())
    }

    async fn version(&self) -> Result<String> {
        let resp = self
            .version_service()
            .version(tonic::Request::new(()))
            .await;
        Ok(call("version", resp)?.version)
    }
}

/// Streams a blob into the content store under `lease`; containerd verifies size and digest
/// at commit. True when this call committed it (false: it was there already).
async fn write_new(
    cd: &Containerd,
    lease: &str,
    write_ref: &str,
    blob: BlobWrite<'_>,
) -> Result<bool> {
    let BlobWrite {
        digest,
        total,
        labels,
        mut data,
        on_progress,
    } = blob;
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let stat = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: write_ref.to_string(),
        ..Default::default()
    };
    tx.send(stat)
        .await
        .map_err(|_| Error::Internal("content write queue closed".into()))?;
    let mut responses = match cd
        .content()
        .write(cd.lease_on(cd.req_for(ReceiverStream::new(rx), None), lease))
        .await
    {
        Ok(resp) => resp.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(false),
        Err(s) => return Err(cd_error("content.write", s)),
    };
    // Each request gets one response; read them as we go so that neither side stalls.
    let expect_response = |resp: Option<Result<_, tonic::Status>>| -> Result<bool> {
        match resp {
            Some(Ok(_)) => Ok(false),
            Some(Err(s)) if s.code() == tonic::Code::AlreadyExists => Ok(true),
            Some(Err(s)) => Err(cd_error("content.write", s)),
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
            r#ref: write_ref.to_string(),
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
        r#ref: write_ref.to_string(),
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
