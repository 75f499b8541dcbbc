//! The auth gate: each request's [`Caller`] is decided once ([`Authenticator::identify`]) and
//! recorded in the request's extensions for the services and in the response's for the layers
//! outside (metrics, audit); a request without valid credentials is answered UNAUTHENTICATED
//! before any service sees it. Health is open to everyone: Kubernetes' gRPC probes send no
//! credentials. Reflection is not: with authentication configured it needs credentials like
//! every other call (grpcurl sends its `-H` headers on reflection requests too).

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::caller::{Authenticator, Caller, Peer};

/// Calls anyone may make.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// A tower layer deciding each request's caller (see the module docs).
#[derive(Clone, Debug)]
pub struct AuthLayer(pub Arc<Authenticator>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            auth: self.0.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let caller = if req.uri().path().starts_with(OPEN_PREFIX) {
            Ok(Caller::anonymous())
        } else {
            let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
            self.auth.identify(req.headers(), &peer)
        };
        let caller = match caller {
            Ok(caller) => caller,
            Err(e) => {
                tracing::debug!(method = %req.uri().path(), error = %e, "call refused");
                let status = tonic::Status::from(e);
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        req.extensions_mut().insert(caller.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Polled inside the call's span: every line it logs names the tenant.
            tracing::Span::current().record("tenant", caller.tenant().as_str());
            let mut resp = fut.await?;
            resp.extensions_mut().insert(caller);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::tenants::{Registry, Tenants};

    async fn call(
        auth: &Arc<Authenticator>,
        path: &str,
        token: Option<&str>,
    ) -> http::Response<String> {
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let tenant = Caller::of(req.extensions()).tenant().to_string();
            Ok::<_, std::convert::Infallible>(http::Response::new(tenant))
        });
        let mut req = http::Request::post(path).body(()).unwrap();
        if let Some(token) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        AuthLayer(auth.clone())
            .layer(inner)
            .oneshot(req)
            .await
            .unwrap()
    }

    fn status(resp: &http::Response<String>) -> Option<String> {
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn calls_need_credentials_but_health_does_not() {
        use sha2::Digest;
        let hash = hex::encode(sha2::Sha256::digest(b"tok"));
        let tenants =
            Tenants::parse(&format!("[tenants.t1]\ntokens_sha256 = [\"{hash}\"]\n")).unwrap();
        let auth = Arc::new(Authenticator::new(
            Some(Arc::new(Registry::fixed(tenants))),
            false,
            false,
        ));
        let unauthenticated = Some((tonic::Code::Unauthenticated as i32).to_string());
        for path in [
            "/sandboxd.v1.SandboxService/GetSandbox",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let refused = call(&auth, path, None).await;
            assert_eq!(status(&refused), unauthenticated, "{path}");
            assert!(refused.extensions().get::<Caller>().is_none());
            let wrong = call(&auth, path, Some("nope")).await;
            assert_eq!(status(&wrong), unauthenticated, "{path}");
            let served = call(&auth, path, Some("tok")).await;
            assert_eq!(status(&served), None);
            assert_eq!(served.body(), "t1");
            assert_eq!(
                served
                    .extensions()
                    .get::<Caller>()
                    .unwrap()
                    .tenant()
                    .as_str(),
                "t1"
            );
        }
        let health = call(&auth, "/grpc.health.v1.Health/Check", None).await;
        assert_eq!((status(&health), health.body().as_str()), (None, "default"));
        let open = Arc::new(Authenticator::open());
        let anyone = call(&open, "/sandboxd.v1.SandboxService/GetSandbox", None).await;
        assert_eq!((status(&anyone), anyone.body().as_str()), (None, "default"));
    }
}
