//! The real backend: containerd's gRPC API behind [`super::Backend`]. The only module that
//! speaks containerd's generated types; each file implements one part of the seam.

mod containers;
mod namespaces;
mod snapshots;
mod store;
mod tasks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    events_client::EventsClient, images_client::ImagesClient, leases_client::LeasesClient,
    namespaces_client::NamespacesClient, snapshots::snapshots_client::SnapshotsClient,
    tasks_client::TasksClient, version_client::VersionClient,
};
use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::types::{Descriptor, Mount};
use crate::error::{Error, Result};

/// The only snapshotter sandboxd uses.
pub const SNAPSHOTTER: &str = "overlayfs";

/// How long one connection attempt to containerd's socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a containerd call: a hung containerd or shim fails the call (UNAVAILABLE, which
/// a caller may retry) instead of holding the request, its locks and its lease forever.
const CALL_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline of a call to a task (create, start, exec, kill, delete...): the shim runs runc for
/// each in turn, so under a burst of execs one waits behind all the others.
const TASK_DEADLINE: Duration = Duration::from_secs(300);
/// Deadline of a diff or an apply, whose work grows with the size of the layer.
const BULK_DEADLINE: Duration = Duration::from_secs(600);

/// A cheap-to-clone containerd client bound to one namespace.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    address: PathBuf,
}

impl Containerd {
    /// Makes a client for the socket at `address`; the connection is opened on first use and
    /// re-opened after containerd restarts.
    pub fn new(address: &Path, namespace: &str) -> Result<Self> {
        let path = address.to_path_buf();
        // The URI is ignored: every connection goes to the unix socket.
        let endpoint = Endpoint::from_static("http://[::1]:0").connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }));
        Ok(Containerd {
            channel,
            namespace: namespace.to_string(),
            address: address.to_path_buf(),
        })
    }

    /// The socket this client talks to.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The same client acting in namespace `namespace` (one connection for all).
    pub fn with_namespace(&self, namespace: &str) -> Containerd {
        Containerd {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// Wraps `msg` in a request carrying the namespace header.
    /// Every such call has [`CALL_DEADLINE`]; see [`Self::req_for`] for others.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        self.req_for(msg, Some(CALL_DEADLINE))
    }

    /// Like [`Self::req`] with `deadline` instead; `None` for calls that last as long as what
    /// they wait for (a process's exit, an event subscription, a blob's stream).
    fn req_for<T>(&self, msg: T, deadline: Option<Duration>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(ns) = MetadataValue::try_from(self.namespace.as_str()) {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(deadline) = deadline {
            req.set_timeout(deadline);
        }
        req
    }

    /// Like [`Self::req`], and attaches the lease so that what the call creates is protected from GC.
    fn req_leased<T>(&self, msg: T, lease: &str) -> tonic::Request<T> {
        self.lease_on(self.req(msg), lease)
    }

    /// Attaches `lease` to `req`.
    fn lease_on<T>(&self, mut req: tonic::Request<T>, lease: &str) -> tonic::Request<T> {
        if let Ok(lease) = MetadataValue::try_from(lease) {
            req.metadata_mut().insert("containerd-lease", lease);
        }
        req
    }

    /// Containers service.
    fn containers(&self) -> ContainersClient<Traced> {
        ContainersClient::new(Traced(self.channel.clone()))
    }
    /// Like [`Self::req`] for a call that goes through a task's shim ([`TASK_DEADLINE`]).
    fn task_req<T>(&self, msg: T) -> tonic::Request<T> {
        self.req_for(msg, Some(TASK_DEADLINE))
    }

    /// Tasks service.
    fn tasks(&self) -> TasksClient<Traced> {
        TasksClient::new(Traced(self.channel.clone()))
    }
    /// Snapshots service.
    fn snapshots(&self) -> SnapshotsClient<Traced> {
        SnapshotsClient::new(Traced(self.channel.clone()))
    }
    /// Content service.
    fn content(&self) -> ContentClient<Traced> {
        ContentClient::new(Traced(self.channel.clone())).max_decoding_message_size(64 << 20)
    }
    /// Images service.
    fn images(&self) -> ImagesClient<Traced> {
        ImagesClient::new(Traced(self.channel.clone()))
    }
    /// Diff service.
    fn diff(&self) -> DiffClient<Traced> {
        DiffClient::new(Traced(self.channel.clone()))
    }
    /// Leases service.
    fn leases(&self) -> LeasesClient<Traced> {
        LeasesClient::new(Traced(self.channel.clone()))
    }
    /// Namespaces service.
    fn namespaces(&self) -> NamespacesClient<Traced> {
        NamespacesClient::new(Traced(self.channel.clone()))
    }
    /// Version service.
    fn version_service(&self) -> VersionClient<Traced> {
        VersionClient::new(Traced(self.channel.clone()))
    }
    /// Events service (untraced: a subscription is one call that lasts for hours).
    fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }
}

/// containerd's channel with one tracing span per call, so that containerd calls appear as
/// children of the RPC that made them.
#[derive(Clone, Debug)]
struct Traced(Channel);

impl tower::Service<http::Request<tonic::body::Body>> for Traced {
    type Response = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = tracing::instrument::Instrumented<
        <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        use tracing::Instrument;
        let span =
            tracing::info_span!("containerd", method = %req.uri().path(), otel.kind = "client");
        self.0.call(req).instrument(span)
    }
}

/// Maps NOT_FOUND to `missing` and every other failure of `op` to an error: the one place
/// where "already gone" is told apart from a real failure.
fn ok_if_missing<T>(
    op: &'static str,
    result: std::result::Result<T, tonic::Status>,
    missing: T,
) -> Result<T> {
    match result {
        Ok(v) => Ok(v),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(missing),
        Err(s) => Err(cd_error(op, s)),
    }
}

/// `op`'s failure as an error; a call past its deadline is UNAVAILABLE (worth a retry), not an
/// internal error.
fn cd_error(op: &'static str, s: tonic::Status) -> Error {
    let timed_out = s.code() == tonic::Code::DeadlineExceeded
        || (s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired"));
    if timed_out {
        return Error::Unavailable {
            op,
            message: format!("containerd did not answer in time: {}", s.message()),
        };
    }
    Error::containerd(op, s)
}

/// `result`'s value, or `op`'s error.
fn call<T>(
    op: &'static str,
    result: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| cd_error(op, s))
}

fn mount_from(m: containerd_client::types::Mount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        options: m.options,
    }
}

fn mounts_from(ms: Vec<containerd_client::types::Mount>) -> Vec<Mount> {
    ms.into_iter().map(mount_from).collect()
}

fn mounts_to(ms: &[Mount]) -> Vec<containerd_client::types::Mount> {
    ms.iter()
        .map(|m| containerd_client::types::Mount {
            r#type: m.kind.clone(),
            source: m.source.clone(),
            target: String::new(),
            options: m.options.clone(),
        })
        .collect()
}

fn descriptor_from(d: containerd_client::types::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations,
    }
}

fn descriptor_to(d: &Descriptor) -> containerd_client::types::Descriptor {
    containerd_client::types::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
    }
}

fn time_from(t: Option<prost_types::Timestamp>) -> Option<std::time::SystemTime> {
    t.as_ref().map(crate::util::system_time)
}
