//! Prometheus metrics: RPCs by method and code, latency histograms of the operations users wait
//! on, sandboxes by state, containerd reachability, exec bytes. Served on `--metrics-listen`.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::sandbox::{LabelSelector, Page, State, Tenancy};

/// Labels of `sandboxd_rpc_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// Full gRPC method path.
    pub method: String,
    /// gRPC status code name.
    pub code: String,
    /// The caller's tenant (`default` without authentication); empty for a call refused as
    /// UNAUTHENTICATED. Tenants come from configuration, so the label stays bounded.
    pub tenant: String,
}

/// Direction of exec bytes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Client to process (stdin).
    In,
    /// Process to client (stdout, stderr).
    Out,
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> std::fmt::Result {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

/// Labels of `sandboxd_exec_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// in or out.
    pub direction: Direction,
}

/// Labels of `sandboxd_sandboxes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Lifecycle state, lowercase.
    pub state: String,
}

/// Every metric sandboxd exports.
pub struct Metrics {
    registry: Registry,
    /// RPCs by method and status code.
    pub rpcs: Family<RpcLabels, Counter>,
    /// CreateSandbox latency.
    pub create_seconds: Histogram,
    /// Exec: from the start message to the first output byte.
    pub exec_first_byte_seconds: Histogram,
    /// CommitSnapshot latency.
    pub commit_seconds: Histogram,
    /// RestoreSandbox latency.
    pub restore_seconds: Histogram,
    /// Sandboxes by state (computed at scrape time).
    pub sandboxes: Family<StateLabels, Gauge>,
    /// 1 while containerd answers.
    pub containerd_up: Gauge,
    /// Exec stdio bytes.
    pub exec_bytes: Family<DirectionLabels, Counter>,
}

fn latency() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandboxd");
        let m = Metrics {
            rpcs: Family::default(),
            create_seconds: latency(),
            exec_first_byte_seconds: latency(),
            commit_seconds: latency(),
            restore_seconds: latency(),
            sandboxes: Family::default(),
            containerd_up: Gauge::default(),
            exec_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rpc_requests",
            "gRPC requests by method, status code and tenant",
            m.rpcs.clone(),
        );
        registry.register(
            "create_duration_seconds",
            "CreateSandbox latency",
            m.create_seconds.clone(),
        );
        registry.register(
            "exec_first_byte_seconds",
            "Exec start to first output byte",
            m.exec_first_byte_seconds.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "CommitSnapshot latency",
            m.commit_seconds.clone(),
        );
        registry.register(
            "restore_duration_seconds",
            "RestoreSandbox latency",
            m.restore_seconds.clone(),
        );
        registry.register("sandboxes", "Sandboxes by state", m.sandboxes.clone());
        registry.register(
            "containerd_up",
            "1 while containerd answers, else 0",
            m.containerd_up.clone(),
        );
        registry.register(
            "exec_bytes",
            "Exec stdio bytes by direction",
            m.exec_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts exec bytes.
    pub fn exec_bytes(&self, direction: Direction, n: usize) {
        self.exec_bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(n as u64);
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Observes the time since `start` into `h`.
pub fn observe_since(h: &Histogram, start: Instant) {
    h.observe(start.elapsed().as_secs_f64());
}

async fn render(
    tenancy: Arc<Tenancy>,
) -> (
    http::StatusCode,
    [(http::HeaderName, &'static str); 1],
    String,
) {
    let m = metrics();
    let mut sandboxes = Vec::new();
    let mut listed = true;
    // Every tenant's sandboxes: the gauge is the node's.
    for manager in tenancy.managers() {
        match manager.list(&LabelSelector::default(), &Page::all()).await {
            Ok((some, _)) => sandboxes.extend(some),
            Err(_) => listed = false,
        }
    }
    if listed {
        for state in ["created", "running", "paused", "stopped", "unknown"] {
            let n = sandboxes
                .iter()
                .filter(|s| state_name(s.state) == state)
                .count();
            m.sandboxes
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(n as i64);
        }
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        return (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            [(http::header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        );
    }
    (
        http::StatusCode::OK,
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Created => "created",
        State::Running => "running",
        State::Paused => "paused",
        State::Stopped => "stopped",
        State::Unknown => "unknown",
    }
}

/// `GET /healthz`: 200 while sandboxd serves its API (containerd answers and it has
/// reconciled), else 503. For probes that cannot speak gRPC over TLS, as Kubernetes' cannot.
async fn healthz(serving: bool) -> (http::StatusCode, &'static str) {
    if serving {
        (http::StatusCode::OK, "SERVING\n")
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}

/// Serves `GET /metrics` and `GET /healthz` (whether `serving()`) on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tenancy: Arc<Tenancy>,
    serving: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || render(tenancy.clone())),
        )
        .route("/healthz", axum::routing::get(move || healthz(serving())));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A tower layer counting RPCs by method, status code and tenant (the caller the auth layer
/// inside it recorded in the response). The code is read from the response
/// headers: errors returned before any message (the usual case) carry it there; a stream that
/// fails after it started is counted by how it started.
#[derive(Clone, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
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
        let method = req.uri().path().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
                .unwrap_or(tonic::Code::Ok);
            let tenant = resp
                .extensions()
                .get::<crate::caller::Caller>()
                .map(|c| c.tenant().to_string())
                .unwrap_or_default();
            metrics()
                .rpcs
                .get_or_create(&RpcLabels {
                    method,
                    code: format!("{code:?}"),
                    tenant,
                })
                .inc();
            Ok(resp)
        })
    }
}

/// The domain's measurements (see [`crate::sandbox::Observer`]) recorded in [`metrics`].
#[derive(Debug, Default)]
pub struct Prometheus;

impl crate::sandbox::Observer for Prometheus {
    fn exec_input(&self, bytes: usize) {
        metrics().exec_bytes(Direction::In, bytes);
    }

    fn exec_output(&self, bytes: usize) {
        metrics().exec_bytes(Direction::Out, bytes);
    }

    fn exec_first_output(&self, after: std::time::Duration) {
        metrics()
            .exec_first_byte_seconds
            .observe(after.as_secs_f64());
    }
}
