//! The audit log: one structured line (target `sandboxd::audit`) per call that changes
//! something or runs something, with the tenant, the method, the ids the request (or, for an
//! id the server picks, the response) names, the final status code and the duration.
//!
//! The layer reads the first gRPC message of the request and of the response as tonic passes
//! them along (no extra buffering on the way; a copy of that one message is decoded with the
//! API's own types), and writes the line when the response ends: after its trailers, or when
//! it is dropped because the client went away. Reads are not audited.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use prost::Message;

use crate::caller::{Caller, Peer};
use crate::pb;

/// The largest first message copied to read its ids: tonic's own limit on a decoded message.
const MAX_AUDITED_MESSAGE: usize = 4 << 20;
/// Length of a gRPC message's prefix: compression flag and length.
const PREFIX_LEN: usize = 5;

/// The objects a call names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    /// The sandbox it acts on or creates.
    pub sandbox_id: Option<String>,
    /// The snapshot it acts on, creates or forks from.
    pub snapshot_id: Option<String>,
    /// The image reference it pulls, deletes, creates from or exports to.
    pub image: Option<String>,
}

impl Ids {
    fn merge(&mut self, other: Ids) {
        let keep = |mine: &mut Option<String>, theirs: Option<String>| {
            if mine.is_none() {
                *mine = theirs;
            }
        };
        keep(&mut self.sandbox_id, other.sandbox_id);
        keep(&mut self.snapshot_id, other.snapshot_id);
        keep(&mut self.image, other.image);
    }
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn ids(sandbox_id: String, snapshot_id: String, image: String) -> Ids {
    Ids {
        sandbox_id: some(sandbox_id),
        snapshot_id: some(snapshot_id),
        image: some(image),
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    M::decode(bytes).ok()
}

/// Reads a message's ids.
type Extract = fn(&[u8]) -> Ids;

/// An audited method: its path and how to read ids from its first request message and, when
/// the server picks an id, from its first response message.
struct Audited {
    path: &'static str,
    request: Extract,
    response: Option<Extract>,
}

/// Every method that changes or runs something.
const AUDITED: &[Audited] = &[
    Audited {
        path: "/sandboxd.v1.SandboxService/CreateSandbox",
        request: |b| {
            decode::<pb::CreateSandboxRequest>(b)
                .map(|r| ids(r.sandbox_id, r.snapshot_id, r.image))
                .unwrap_or_default()
        },
        response: Some(|b| {
            decode::<pb::CreateSandboxResponse>(b)
                .and_then(|r| r.sandbox)
                .map(|s| ids(s.sandbox_id, String::new(), String::new()))
                .unwrap_or_default()
        }),
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/StartSandbox",
        request: |b| sandbox(decode::<pb::StartSandboxRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/StopSandbox",
        request: |b| sandbox(decode::<pb::StopSandboxRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/DeleteSandbox",
        request: |b| sandbox(decode::<pb::DeleteSandboxRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/UpdateSandboxNetwork",
        request: |b| sandbox(decode::<pb::UpdateSandboxNetworkRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/Exec",
        request: |b| {
            sandbox(decode::<pb::ExecRequest>(b).and_then(|r| match r.request {
                Some(pb::exec_request::Request::Start(start)) => Some(start.sandbox_id),
                _ => None,
            }))
        },
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SandboxService/ExecSync",
        request: |b| sandbox(decode::<pb::ExecSyncRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SnapshotService/CommitSnapshot",
        request: |b| sandbox(decode::<pb::CommitSnapshotRequest>(b).map(|r| r.sandbox_id)),
        response: Some(|b| {
            decode::<pb::CommitSnapshotResponse>(b)
                .and_then(|r| r.snapshot)
                .map(|s| ids(String::new(), s.snapshot_id, String::new()))
                .unwrap_or_default()
        }),
    },
    Audited {
        path: "/sandboxd.v1.SnapshotService/RestoreSandbox",
        request: |b| {
            decode::<pb::RestoreSandboxRequest>(b)
                .map(|r| ids(r.sandbox_id, r.snapshot_id, String::new()))
                .unwrap_or_default()
        },
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SnapshotService/DeleteSnapshot",
        request: |b| {
            decode::<pb::DeleteSnapshotRequest>(b)
                .map(|r| ids(String::new(), r.snapshot_id, String::new()))
                .unwrap_or_default()
        },
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.SnapshotService/ExportSnapshot",
        request: |b| {
            decode::<pb::ExportSnapshotRequest>(b)
                .map(|r| ids(String::new(), r.snapshot_id, r.image))
                .unwrap_or_default()
        },
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.FileService/WriteFile",
        request: |b| {
            sandbox(
                decode::<pb::WriteFileRequest>(b).and_then(|r| match r.request {
                    Some(pb::write_file_request::Request::Header(h)) => Some(h.sandbox_id),
                    _ => None,
                }),
            )
        },
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.FileService/MakeDirectory",
        request: |b| sandbox(decode::<pb::MakeDirectoryRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.FileService/RemovePath",
        request: |b| sandbox(decode::<pb::RemovePathRequest>(b).map(|r| r.sandbox_id)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.ImageService/PullImage",
        request: |b| image(decode::<pb::PullImageRequest>(b).map(|r| r.image)),
        response: None,
    },
    Audited {
        path: "/sandboxd.v1.ImageService/DeleteImage",
        request: |b| image(decode::<pb::DeleteImageRequest>(b).map(|r| r.image)),
        response: None,
    },
];

fn sandbox(id: Option<String>) -> Ids {
    Ids {
        sandbox_id: id.and_then(some),
        ..Ids::default()
    }
}

fn image(reference: Option<String>) -> Ids {
    Ids {
        image: reference.and_then(some),
        ..Ids::default()
    }
}

/// Gathers the first gRPC message of a body from its data frames, as they pass.
#[derive(Debug)]
struct FirstMessage {
    buf: Vec<u8>,
    extract: Option<Extract>,
}

impl FirstMessage {
    fn new(extract: Extract) -> FirstMessage {
        FirstMessage {
            buf: Vec::new(),
            extract: Some(extract),
        }
    }

    /// Takes in the next bytes of the body; once the first message is whole, its ids.
    fn feed(&mut self, mut chunk: impl Buf) -> Option<Ids> {
        let extract = self.extract?;
        while chunk.has_remaining() {
            let wanted = match self.message_len() {
                // A compressed message (we accept none) or one past tonic's limit: no ids.
                Some((compressed, len)) if compressed || len > MAX_AUDITED_MESSAGE => {
                    self.extract = None;
                    self.buf = Vec::new();
                    return None;
                }
                Some((_, len)) => PREFIX_LEN + len,
                None => PREFIX_LEN,
            };
            let take = (wanted - self.buf.len()).min(chunk.remaining());
            let start = self.buf.len();
            self.buf.resize(start + take, 0);
            chunk.copy_to_slice(&mut self.buf[start..]);
            if let Some((_, len)) = self.message_len() {
                if self.buf.len() == PREFIX_LEN + len {
                    self.extract = None;
                    let ids = extract(&self.buf[PREFIX_LEN..]);
                    self.buf = Vec::new();
                    return Some(ids);
                }
            }
        }
        None
    }

    /// The compression flag and length of the message, once its prefix is in.
    fn message_len(&self) -> Option<(bool, usize)> {
        let prefix = self.buf.get(..PREFIX_LEN)?;
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        Some((prefix[0] != 0, len))
    }
}

/// A body that shows its first message to a [`FirstMessage`] on the way through.
struct Peek<B> {
    inner: B,
    first: FirstMessage,
    ids: Arc<Mutex<Ids>>,
}

impl<B> http_body::Body for Peek<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(data) = frame.data_ref() {
                if let Some(found) = this.first.feed(data.clone()) {
                    lock(&this.ids).merge(found);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn lock(ids: &Mutex<Ids>) -> std::sync::MutexGuard<'_, Ids> {
    ids.lock().unwrap_or_else(|p| p.into_inner())
}

/// One audited call; logged when dropped (the response ended, or was abandoned).
struct Record {
    method: &'static str,
    start: Instant,
    peer: Peer,
    caller: Option<Caller>,
    ids: Arc<Mutex<Ids>>,
    code: Option<tonic::Code>,
}

impl Drop for Record {
    fn drop(&mut self) {
        let ids = lock(&self.ids).clone();
        // A response that ended without a status was cut off: the client went away.
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let peer = self
            .peer
            .remote
            .map_or_else(|| "unix".to_string(), |a| a.to_string());
        tracing::info!(
            target: "sandboxd::audit",
            tenant = self.caller.as_ref().map(|c| c.tenant().as_str()).unwrap_or(""),
            method = self.method,
            sandbox_id = ids.sandbox_id.as_deref(),
            snapshot_id = ids.snapshot_id.as_deref(),
            image = ids.image.as_deref(),
            code = ?code,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            peer = %peer,
            "audit"
        );
    }
}

/// The status code in a header map (trailers, or the headers of a trailers-only response).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// A response body that records its call's status and response ids, and logs the call when it
/// is done.
struct Audit {
    body: tonic::body::Body,
    first: Option<FirstMessage>,
    record: Record,
}

impl http_body::Body for Audit {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let (Some(data), Some(first)) = (frame.data_ref(), &mut this.first) {
                if let Some(found) = first.feed(data.clone()) {
                    lock(&this.record.ids).merge(found);
                }
            }
            if let Some(trailers) = frame.trailers_ref() {
                if let Some(code) = grpc_status(trailers) {
                    this.record.code = Some(code);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A tower layer writing the audit log (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct AuditLayer;

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditService { inner }
    }
}

/// See [`AuditLayer`].
#[derive(Clone, Debug)]
pub struct AuditService<S> {
    inner: S,
}

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for AuditService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
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

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(audited) = AUDITED.iter().find(|a| a.path == req.uri().path()) else {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(tonic::body::Body::new)) });
        };
        let ids = Arc::new(Mutex::new(Ids::default()));
        let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
        let req = req.map(|body| {
            tonic::body::Body::new(Peek {
                inner: body,
                first: FirstMessage::new(audited.request),
                ids: ids.clone(),
            })
        });
        let mut record = Record {
            method: audited.path,
            start: Instant::now(),
            peer,
            caller: None,
            ids,
            code: None,
        };
        let response = audited.response;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            record.caller = resp.extensions().get::<Caller>().cloned();
            record.code = grpc_status(resp.headers());
            Ok(resp.map(|body| {
                tonic::body::Body::new(Audit {
                    body: tonic::body::Body::new(body),
                    first: response.map(FirstMessage::new),
                    record,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `msg` framed as one gRPC message.
    fn framed(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn extract(path: &str, request: bool) -> Extract {
        let a = AUDITED.iter().find(|a| a.path == path).unwrap();
        if request {
            a.request
        } else {
            a.response.unwrap()
        }
    }

    #[test]
    fn the_first_message_is_read_across_frames_of_any_size() {
        let msg = pb::CreateSandboxRequest {
            sandbox_id: "sb-1".into(),
            image: "busybox:1.36".into(),
            labels: [("k".to_string(), "v".repeat(1000))].into(),
            ..Default::default()
        };
        let mut bytes = framed(&msg);
        // A second message after it is never looked at.
        bytes.extend(framed(&pb::CreateSandboxRequest::default()));
        let path = "/sandboxd.v1.SandboxService/CreateSandbox";
        let want = Ids {
            sandbox_id: Some("sb-1".into()),
            snapshot_id: None,
            image: Some("busybox:1.36".into()),
        };
        for size in [1, 3, 5, 7, 100, bytes.len()] {
            let mut first = FirstMessage::new(extract(path, true));
            let found: Vec<Ids> = bytes
                .chunks(size)
                .filter_map(|c| first.feed(bytes::Bytes::copy_from_slice(c)))
                .collect();
            assert_eq!(found, vec![want.clone()], "chunks of {size}");
        }
        // Compressed: not read.
        let mut compressed = framed(&msg);
        compressed[0] = 1;
        let mut first = FirstMessage::new(extract(path, true));
        assert_eq!(first.feed(bytes::Bytes::from(compressed)), None);
    }

    #[test]
    fn ids_come_from_each_audited_method() {
        let read = |path: &str, request: bool, bytes: Vec<u8>| {
            extract(path, request)(&bytes[PREFIX_LEN..])
        };
        let exec = pb::ExecRequest {
            request: Some(pb::exec_request::Request::Start(pb::ExecStart {
                sandbox_id: "e1".into(),
                args: vec!["true".into()],
                ..Default::default()
            })),
        };
        assert_eq!(
            read("/sandboxd.v1.SandboxService/Exec", true, framed(&exec)).sandbox_id,
            Some("e1".into())
        );
        let write = pb::WriteFileRequest {
            request: Some(pb::write_file_request::Request::Header(
                pb::WriteFileHeader {
                    sandbox_id: "w1".into(),
                    path: "/x".into(),
                    ..Default::default()
                },
            )),
        };
        assert_eq!(
            read("/sandboxd.v1.FileService/WriteFile", true, framed(&write)).sandbox_id,
            Some("w1".into())
        );
        let created = pb::CreateSandboxResponse {
            sandbox: Some(pb::Sandbox {
                sandbox_id: "generated".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            read(
                "/sandboxd.v1.SandboxService/CreateSandbox",
                false,
                framed(&created)
            )
            .sandbox_id,
            Some("generated".into())
        );
        let restore = pb::RestoreSandboxRequest {
            sandbox_id: "r1".into(),
            snapshot_id: "s1".into(),
            ..Default::default()
        };
        let ids = read(
            "/sandboxd.v1.SnapshotService/RestoreSandbox",
            true,
            framed(&restore),
        );
        assert_eq!(
            (ids.sandbox_id.as_deref(), ids.snapshot_id.as_deref()),
            (Some("r1"), Some("s1"))
        );
        let pull = pb::PullImageRequest {
            image: "busybox:1.36".into(),
        };
        assert_eq!(
            read("/sandboxd.v1.ImageService/PullImage", true, framed(&pull)).image,
            Some("busybox:1.36".into())
        );
        // Garbage is no ids, not a panic.
        assert_eq!(
            extract("/sandboxd.v1.SandboxService/DeleteSandbox", true)(&[0xff, 0xff]),
            Ids::default()
        );
    }

    #[test]
    fn every_audited_path_is_a_method_of_ours_and_no_read_is_audited() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        for a in AUDITED {
            assert!(methods.contains(&a.path.to_string()), "{}", a.path);
            let name = a.path.rsplit('/').next().unwrap();
            assert!(
                !["Get", "List", "Stat", "Read", "Watch"]
                    .iter()
                    .any(|p| name.starts_with(p)),
                "{name}"
            );
        }
        // Everything else that is not a read is audited.
        for m in &methods {
            let name = m.rsplit('/').next().unwrap();
            let read = ["Get", "List", "Stat", "Read", "Watch"]
                .iter()
                .any(|p| name.starts_with(p));
            assert_eq!(AUDITED.iter().any(|a| a.path == m), !read, "{m}");
        }
    }
}
