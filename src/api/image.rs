//! ImageService handlers.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::error::Error;
use crate::image::{self, ImageRef, Progress};
use crate::pb;
use crate::pb::image_service_server::ImageService;
use crate::runtime::Backend;
use crate::sandbox::Tenancy;
use std::sync::Arc;

/// Progress messages buffered per PullImage stream (older ones are dropped when the client lags).
const PULL_PROGRESS_QUEUE: usize = 64;

/// The ImageService implementation.
#[derive(Debug, Clone)]
pub struct ImageApi {
    tenancy: Arc<Tenancy>,
}

/// The service bound to one caller: the only way a handler reaches a store.
struct ForCaller {
    /// The caller's tenant's namespace.
    cd: Arc<dyn Backend>,
}

impl ImageApi {
    /// Serves each tenant's images of `tenancy`: a tenant's image records live in its own
    /// namespace, so a DeleteImage by one never takes another's.
    pub fn new(tenancy: Arc<Tenancy>) -> Self {
        ImageApi { tenancy }
    }

    /// This service bound to the calling tenant's images.
    async fn for_caller<T>(&self, req: &Request<T>) -> Result<ForCaller, Status> {
        Ok(ForCaller {
            cd: super::tenant_manager(&self.tenancy, req)
                .await?
                .backend()
                .clone(),
        })
    }
}

fn progress_msg(p: Progress) -> pb::PullImageResponse {
    pb::PullImageResponse {
        status: p.status,
        digest: p.digest,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        image: None,
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    type PullImageStream =
        Pin<Box<dyn Stream<Item = Result<pb::PullImageResponse, Status>> + Send>>;

    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let this = self.for_caller(&req).await?;
        let image = ImageRef::parse("image", &req.into_inner().image)?;
        let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(PULL_PROGRESS_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(PULL_PROGRESS_QUEUE);
        let cd = this.cd.clone();
        // The pull runs on its own task: a client that disconnects does not leave it half-done.
        let pull =
            tokio::spawn(async move { image::pull(cd.as_ref(), &image, Some(progress_tx)).await });
        tokio::spawn(async move {
            while let Some(p) = progress_rx.recv().await {
                if out_tx.send(Ok(progress_msg(p))).await.is_err() {
                    break;
                }
            }
            let last = match pull.await {
                Ok(Ok(info)) => Ok(pb::PullImageResponse {
                    status: "done".into(),
                    digest: info.digest.clone(),
                    bytes_done: info.size_bytes,
                    bytes_total: info.size_bytes,
                    image: Some(convert::image(info)),
                }),
                Ok(Err(e)) => Err(Status::from(e)),
                Err(e) => Err(Error::Internal(format!("pull task failed: {e}")).into()),
            };
            let _ = out_tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn get_image(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::GetImageResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let image = ImageRef::parse("image", &req.into_inner().image)?;
        let info = image::get(this.cd.as_ref(), &image).await?;
        Ok(Response::new(pb::GetImageResponse {
            image: Some(convert::image(info)),
        }))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let images = image::list(this.cd.as_ref()).await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(convert::image).collect(),
        }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let image = ImageRef::parse("image", &req.into_inner().image)?;
        image::delete(this.cd.as_ref(), &image).await?;
        Ok(Response::new(pb::DeleteImageResponse {}))
    }
}
