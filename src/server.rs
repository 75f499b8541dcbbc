//! The gRPC server: our services, health, reflection, background duties and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::{FileApi, ImageApi, SandboxApi, SnapshotApi};
use crate::caller::Authenticator;
use crate::config::{AuthConfig, Config, ListenAddr};
use crate::net::Network;
use crate::pb;
use crate::runtime::{supervisor, Containerd, Store};
use crate::sandbox::{Manager, ManagerConfig, Tenancy};
use crate::tls::ServerTls;
use crate::watched::Reload;

mod audit;
mod auth;
mod authority;
mod hpack;
mod ready;
mod streams;
mod transport;

/// Services whose health is reported (besides the overall "").
pub const SERVICE_NAMES: [&str; 4] = [
    "sandboxd.v1.SandboxService",
    "sandboxd.v1.SnapshotService",
    "sandboxd.v1.FileService",
    "sandboxd.v1.ImageService",
];
/// How long in-flight calls get to finish after SIGTERM before the server exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long one health probe of containerd may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes containerd and reports health. Each time containerd answers after not answering (at
/// start, and after it restarted), first reconciles what was left half-done; until then the
/// API answers UNAVAILABLE and health is NOT_SERVING.
async fn health_loop(
    cd: Containerd,
    tenancy: Arc<Tenancy>,
    reporter: HealthReporter,
    ready: ready::Ready,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut serving = None;
    let mut recovered = false;
    loop {
        let reachable = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, cd.version()).await,
            Ok(Ok(_))
        );
        if !reachable {
            recovered = false;
        }
        if reachable && !recovered {
            ready.set(false);
            match tenancy.recover().await {
                Ok(()) => recovered = true,
                Err(e) => {
                    tracing::warn!(error = %e, "reconciling after a (re)connect failed; will retry")
                }
            }
        }
        crate::metrics::metrics()
            .containerd_up
            .set(i64::from(reachable));
        let up = reachable && recovered;
        ready.set(up);
        if serving != Some(up) {
            if up {
                tracing::info!("containerd is reachable: SERVING");
            } else {
                tracing::warn!(address = %cd.address().display(), "containerd is unreachable: NOT_SERVING");
            }
            set_health(
                &reporter,
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                },
            )
            .await;
            serving = Some(up);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How often an idle HTTP/2 connection is pinged.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent calls (streams) one client connection may have open.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// How many TTL sweeps pass between two network sweeps: exit events tear networks down at
/// once, this sweep only catches what they missed, and it lists every task.
const NETWORK_SWEEP_EVERY: u32 = 10;

async fn ttl_loop(tenancy: Arc<Tenancy>, interval: Duration, mut stop: watch::Receiver<bool>) {
    for tick in 1u32.. {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = tenancy.reap_expired().await {
            tracing::debug!(error = %e, "ttl sweep failed");
        }
        if tick % NETWORK_SWEEP_EVERY == 0 {
            if let Err(e) = tenancy.reconcile_networks().await {
                tracing::warn!(error = %e, "network sweep failed");
            }
        }
    }
}

/// How often the tenants file and the TLS files are looked at for changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Who may call, as loaded at start: the authenticator and the TLS certificate, both re-read
/// when their files change.
pub struct Security {
    authenticator: Arc<Authenticator>,
    tls: Option<Arc<ServerTls>>,
}

impl Security {
    /// Reads the tenants file and the TLS files. A file that cannot be read or used is an
    /// error naming it (sandboxd then exits 2, as for any bad setting).
    pub fn load(config: &AuthConfig) -> Result<Security, String> {
        let tenants = match &config.tenants {
            Some(path) => Some(Arc::new(crate::tenants::load(path)?)),
            None => None,
        };
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(crate::tls::load_server(files)?)),
            None => None,
        };
        let client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        Ok(Security {
            authenticator: Arc::new(Authenticator::new(
                tenants,
                client_certificates,
                config.trust_forwarded_client_cert,
            )),
            tls,
        })
    }

    /// One line on how callers authenticate, for the log.
    fn describe(&self) -> String {
        let mut ways = Vec::new();
        if let Some(tenants) = self.authenticator.tenants() {
            ways.push(format!(
                "bearer tokens of {} tenants",
                tenants.current().entries().len()
            ));
        }
        if self.authenticator.client_certificates() {
            ways.push("client certificates".into());
        }
        if ways.is_empty() {
            "none: every caller is tenant default".into()
        } else {
            ways.join(" or ")
        }
    }
}

/// Re-reads the tenants file and the TLS files when they change (looked at every `interval`)
/// and at once on SIGHUP. A version that cannot be used is logged and the previous one kept.
async fn reload_loop(
    security: (
        Option<Arc<crate::tenants::Registry>>,
        Option<Arc<ServerTls>>,
    ),
    mut hangup: Signal,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let signalled = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = hangup.recv() => true,
            _ = stop.changed() => return,
        };
        if signalled {
            tracing::info!("SIGHUP: re-reading the tenants file and the TLS files");
        }
        let (tenants, tls) = security.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            (
                tenants.map(|t| (t.paths().to_vec(), t.reload())),
                tls.map(|t| (t.paths().to_vec(), t.reload())),
            )
        })
        .await;
        let Ok((tenants, tls)) = reloaded else {
            continue;
        };
        for (what, outcome) in [("tenants file", tenants), ("TLS certificate", tls)] {
            let Some((paths, outcome)) = outcome else {
                continue;
            };
            let files = paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            match outcome {
                Reload::Unchanged if signalled => {
                    tracing::info!(files = %files, "{what} unchanged")
                }
                Reload::Unchanged => {}
                Reload::Reloaded => tracing::info!(files = %files, "{what} reloaded"),
                Reload::Rejected(why) => tracing::warn!(
                    files = %files,
                    error = %why,
                    "{what} not reloaded: keeping the previous version"
                ),
            }
        }
    }
}

/// Runs the server until `shutdown` resolves, then stops gracefully.
pub async fn serve(
    config: Config,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Registered before anything else: from here on SIGHUP reloads instead of killing us.
    let hangup = signal(SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot listen for SIGHUP: {e}"))?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display())
    })?;
    let (address, supervisor) = supervisor::ensure(&config).await?;
    let cd = Containerd::new(&address, &config.namespace)?;
    let manager = Manager::new(
        std::sync::Arc::new(cd.clone()),
        ManagerConfig::from(&config),
        Network::new(config.network.clone()),
        std::sync::Arc::new(crate::metrics::Prometheus),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each tenant's manager, made when the tenant first calls or recovery finds its
    // namespace, watches its own sandboxes' exits until `stop`.
    let tenancy = Tenancy::new(manager.clone(), Some(stop_rx.clone()));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let ready = ready::Ready::default();
    let health_task = tokio::spawn(health_loop(
        cd.clone(),
        tenancy.clone(),
        reporter.clone(),
        ready.clone(),
        config.health_interval,
        stop_rx.clone(),
    ));
    let exits_task = tokio::spawn(manager.clone().watch_exits(stop_rx.clone()));
    let ttl_task = tokio::spawn(ttl_loop(
        tenancy.clone(),
        config.ttl_sweep_interval,
        stop_rx.clone(),
    ));
    let reload_task = tokio::spawn(reload_loop(
        (
            security.authenticator.tenants().cloned(),
            security.tls.clone(),
        ),
        hangup,
        config.reload_interval,
        stop_rx.clone(),
    ));

    let metrics_task = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
            tracing::info!(metrics = %addr, "serving Prometheus metrics at /metrics");
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            let ready = ready.clone();
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                tenancy.clone(),
                move || ready.get(),
                shutdown,
            )))
        }
    };

    let router = Server::builder()
        // Dead peers (a client host that vanished, a dropped NAT entry) are noticed and their
        // streams ended, instead of holding execs and file streams open for good.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Outermost first: metrics and the audit log see every call, refused ones included,
        // and read the caller the auth layer inside them decided.
        .layer(crate::metrics::RpcMetricsLayer)
        .layer(audit::AuditLayer)
        .layer(auth::AuthLayer(security.authenticator.clone()))
        .layer(ready::ReadyLayer(ready))
        .layer(streams::StreamLimitLayer(streams::TenantStreams::new(
            config.max_streams_per_tenant,
        )))
        .trace_fn(crate::telemetry::rpc_span)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::sandbox_service_server::SandboxServiceServer::new(
            SandboxApi::new(tenancy.clone(), config.stream_idle_timeout),
        ))
        .add_service(pb::image_service_server::ImageServiceServer::new(
            ImageApi::new(tenancy.clone()),
        ))
        .add_service(pb::snapshot_service_server::SnapshotServiceServer::new(
            SnapshotApi::new(tenancy.clone()),
        ))
        .add_service(pb::file_service_server::FileServiceServer::new(
            FileApi::new(tenancy.clone(), config.stream_idle_timeout),
        ));

    let (drain_tx, mut drain_rx) = watch::channel(false);
    let reporter_for_shutdown = reporter.clone();
    let signalled = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        set_health(&reporter_for_shutdown, ServingStatus::NotServing).await;
        let _ = drain_tx.send(true);
    };
    let auth = security.describe();
    let server = async {
        match &config.listen {
            ListenAddr::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
                let local = listener.local_addr()?;
                tracing::info!(listen = %local, tls = security.tls.is_some(), auth = %auth, containerd = %address.display(), namespace = %config.namespace, "sandboxd ready");
                match &security.tls {
                    Some(tls) => {
                        router
                            .serve_with_incoming_shutdown(
                                transport::tls(listener, tls.clone()),
                                signalled,
                            )
                            .await?
                    }
                    None => {
                        router
                            .serve_with_incoming_shutdown(transport::tcp(listener), signalled)
                            .await?
                    }
                }
            }
            ListenAddr::Unix(path) => {
                let listener = transport::bind_unix(path).map_err(|e| {
                    anyhow::anyhow!("cannot listen on unix:{}: {e}", path.display())
                })?;
                tracing::info!(listen = %config.listen, tls = false, auth = %auth, containerd = %address.display(), namespace = %config.namespace, "sandboxd ready");
                router
                    .serve_with_incoming_shutdown(transport::unix(listener), signalled)
                    .await?;
            }
        }
        anyhow::Ok(())
    };
    let grace_expired = async {
        let _ = drain_rx.wait_for(|d| *d).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = server => r,
        _ = grace_expired => {
            tracing::warn!("in-flight calls did not finish within {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = health_task.await;
    let _ = ttl_task.await;
    let _ = reload_task.await;
    let _ = exits_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(supervisor) = supervisor {
        supervisor.shutdown().await;
    }
    if let ListenAddr::Unix(path) = &config.listen {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("sandboxd stopped");
    result
}
