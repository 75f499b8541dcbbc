//! How many streams each tenant may hold open.
//!
//! After the auth layer has recorded the [`Caller`] of a request in its extensions,
//! [`StreamLimitLayer`] counts the open streaming calls of each tenant: a stream holds its
//! slot from the moment the request arrives until its response body is finished or dropped
//! (the client went away), and the call past the limit is answered RESOURCE_EXHAUSTED at once.
//! The per-connection limit (HTTP/2 `max_concurrent_streams`) bounds one connection; this
//! bounds a tenant across all of its connections. Health is exempt: probes always get through.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::caller::{Caller, Tenant};
use crate::error::Error;

/// The streaming calls, by path. Health's Watch is left out on purpose.
pub const STREAMING_METHODS: [&str; 7] = [
    "/sandboxd.v1.SandboxService/Exec",
    "/sandboxd.v1.SandboxService/WatchSandboxStats",
    "/sandboxd.v1.FileService/ReadFile",
    "/sandboxd.v1.FileService/WriteFile",
    "/sandboxd.v1.ImageService/PullImage",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Open streaming calls by tenant, against one limit for each.
#[derive(Debug)]
pub struct TenantStreams {
    max: usize,
    open: Mutex<HashMap<Tenant, usize>>,
}

/// One open stream's place in its tenant's count, given back on drop.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<TenantStreams>,
    tenant: Tenant,
}

impl TenantStreams {
    /// At most `max` open streams per tenant.
    pub fn new(max: usize) -> Arc<TenantStreams> {
        Arc::new(TenantStreams {
            max,
            open: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Tenant, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more stream of `tenant`, unless it has `max` open.
    pub fn try_open(self: &Arc<Self>, tenant: &Tenant) -> Option<StreamSlot> {
        let mut open = self.counts();
        let n = open.entry(tenant.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            streams: self.clone(),
            tenant: tenant.clone(),
        })
    }

    /// The error of a stream past `tenant`'s limit.
    fn exhausted(&self, tenant: &Tenant) -> Error {
        Error::ResourceExhausted(format!(
            "tenant {tenant:?} has {} streaming calls open, the most --max-streams-per-tenant \
             allows; end one and retry",
            self.max
        ))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.counts();
        if let Some(n) = open.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

/// A tower layer holding each streaming call to its tenant's limit (see the module docs).
#[derive(Clone, Debug)]
pub struct StreamLimitLayer(pub Arc<TenantStreams>);

impl<S> tower::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StreamLimit {
            inner,
            streams: self.0.clone(),
        }
    }
}

/// See [`StreamLimitLayer`].
#[derive(Clone, Debug)]
pub struct StreamLimit<S> {
    inner: S,
    streams: Arc<TenantStreams>,
}

impl<S, B, R> tower::Service<http::Request<B>> for StreamLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let slot = if STREAMING_METHODS.contains(&req.uri().path()) {
            let caller = Caller::of(req.extensions());
            match self.streams.try_open(caller.tenant()) {
                Some(slot) => Some(slot),
                None => {
                    let status = tonic::Status::from(self.streams.exhausted(caller.tenant()));
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        } else {
            None
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| {
                let body = tonic::body::Body::new(body);
                match slot {
                    Some(slot) => tonic::body::Body::new(Holding { body, _slot: slot }),
                    None => body,
                }
            }))
        })
    }
}

/// A response body that keeps its stream's slot until it is finished or dropped.
struct Holding {
    body: tonic::body::Body,
    _slot: StreamSlot,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use prost::Message;
    use tower::{Layer, ServiceExt};

    use super::*;

    /// A response body that never ends on its own, as an open stream's.
    struct Open;

    impl http_body::Body for Open {
        type Data = bytes::Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
            Poll::Pending
        }
    }

    /// A service answering every call with an [`Open`] stream.
    fn endless() -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<Open>,
        Error = std::convert::Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Open))
        })
    }

    fn status_of(resp: &http::Response<tonic::body::Body>) -> Option<tonic::Code> {
        resp.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            .map(tonic::Code::from_i32)
    }

    async fn call(
        svc: impl tower::Service<
            http::Request<()>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
        path: &str,
    ) -> http::Response<tonic::body::Body> {
        let req = http::Request::post(path).body(()).unwrap();
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn the_stream_past_the_limit_is_refused_until_one_ends() {
        let streams = TenantStreams::new(2);
        let svc = StreamLimitLayer(streams.clone()).layer(endless());
        let exec = "/sandboxd.v1.SandboxService/Exec";
        let a = call(svc.clone(), exec).await;
        let b = call(svc.clone(), "/sandboxd.v1.FileService/WriteFile").await;
        assert_eq!((status_of(&a), status_of(&b)), (None, None));
        assert!(!a.body().is_end_stream());
        let refused = call(svc.clone(), "/sandboxd.v1.FileService/ReadFile").await;
        assert_eq!(status_of(&refused), Some(tonic::Code::ResourceExhausted));
        let message = refused.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(message.contains("max-streams-per-tenant"), "{message}");
        // Unary calls and health are not counted.
        let unary = call(svc.clone(), "/sandboxd.v1.SandboxService/GetSandbox").await;
        let watch = call(svc.clone(), "/grpc.health.v1.Health/Watch").await;
        assert_eq!((status_of(&unary), status_of(&watch)), (None, None));
        // A stream that ends gives its slot back.
        drop(a);
        let c = call(svc.clone(), exec).await;
        assert_eq!(status_of(&c), None);
        drop((b, c));
        assert!(streams.counts().is_empty());
    }

    #[test]
    fn every_streaming_rpc_of_ours_is_counted() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut streaming = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    if method.client_streaming() || method.server_streaming() {
                        streaming.push(path);
                    }
                }
            }
        }
        let ours: Vec<_> = STREAMING_METHODS
            .iter()
            .filter(|m| m.starts_with("/sandboxd."))
            .map(|m| m.to_string())
            .collect();
        streaming.sort();
        let mut expected = ours.clone();
        expected.sort();
        assert_eq!(streaming, expected);
    }
}
