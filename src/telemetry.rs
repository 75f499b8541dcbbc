//! Logs (human or JSON) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OTLP trace export.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber. Call inside the multi-threaded runtime (the OTLP exporter
/// needs it). `otlp_endpoint` comes from `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn init(format: LogFormat, otlp_endpoint: Option<String>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let fmt = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
    };
    let provider = match otlp_endpoint {
        Some(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("sandboxd")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        _ => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("sandboxd")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    // A caller's W3C traceparent continues through sandboxd (see `rpc_span`).
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes and stops trace export.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("sandboxd: flushing traces failed: {e}");
            }
        }
    }
}

/// Reads W3C trace context from gRPC request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one RPC: named after its method (with the caller's tenant), child of the caller's `traceparent` if any.
pub fn rpc_span<B>(req: &http::Request<B>) -> tracing::Span {
    // The auth layer records the caller's tenant once it is decided.
    let span = tracing::info_span!("rpc", method = %req.uri().path(), tenant = tracing::field::Empty, otel.name = %req.uri().path(), otel.kind = "server");
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    let _ = span.set_parent(parent);
    span
}
