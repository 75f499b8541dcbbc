//! The readiness gate: until sandboxd has reconciled what an earlier run (or a containerd
//! restart) left half-done, its own services answer UNAVAILABLE, so no caller sees a sandbox
//! that recovery is about to roll back. Health and reflection stay open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The path prefix of sandboxd's own services.
const GATED_PREFIX: &str = "/sandboxd.v1.";

/// Whether sandboxd serves its API; shared by the health loop (which sets it) and the gate.
#[derive(Clone, Debug, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    /// Opens or closes the gate.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the gate is open.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A tower layer answering UNAVAILABLE to sandboxd.v1 calls while [`Ready`] is false.
#[derive(Clone, Debug)]
pub struct ReadyLayer(pub Ready);

impl<S> tower::Layer<S> for ReadyLayer {
    type Service = ReadyGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ReadyGate {
            inner,
            ready: self.0.clone(),
        }
    }
}

/// See [`ReadyLayer`].
#[derive(Clone, Debug)]
pub struct ReadyGate<S> {
    inner: S,
    ready: Ready,
}

impl<S, B, R> tower::Service<http::Request<B>> for ReadyGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.ready.get() && req.uri().path().starts_with(GATED_PREFIX) {
            let status = tonic::Status::unavailable(
                "sandboxd is reconciling after a restart or a containerd reconnect; retry shortly",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, ServiceExt};

    use super::*;

    async fn call(ready: &Ready, path: &str) -> Option<String> {
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        });
        let resp = ReadyLayer(ready.clone())
            .layer(inner)
            .oneshot(http::Request::get(path).body(()).unwrap())
            .await
            .unwrap();
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn the_api_is_unavailable_until_ready_and_health_never_is() {
        let ready = Ready::default();
        let unavailable = Some((tonic::Code::Unavailable as i32).to_string());
        assert_eq!(
            call(&ready, "/sandboxd.v1.SandboxService/GetSandbox").await,
            unavailable
        );
        assert_eq!(call(&ready, "/grpc.health.v1.Health/Check").await, None);
        ready.set(true);
        assert_eq!(
            call(&ready, "/sandboxd.v1.SandboxService/GetSandbox").await,
            None
        );
        ready.set(false);
        assert_eq!(
            call(&ready, "/sandboxd.v1.FileService/ReadFile").await,
            unavailable
        );
    }
}
