//! SandboxService handlers: take the request, convert, call the manager, convert back.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{metrics, observe_since};

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::stream;
use crate::pb;
use crate::pb::sandbox_service_server::SandboxService;
use crate::sandbox::Tenancy;
use crate::sandbox::{
    ExecInput, LabelSelector, Manager, Next, Page, SandboxId, EXEC_INPUT_QUEUE, EXEC_OUTPUT_QUEUE,
    WATCHER_QUEUE,
};
use crate::tenants::Quotas;

/// Events queued between a WatchSandboxes watcher and its client; the watcher's own backlog
/// is the event log's ring ([`WATCHER_QUEUE`]).
const EVENT_STREAM_QUEUE: usize = 16;
/// Response header of WatchSandboxes: the tenant's latest revision when the call began.
pub const REVISION_HEADER: &str = "sandboxd-revision";

/// The SandboxService implementation.
#[derive(Debug, Clone)]
pub struct SandboxApi {
    tenancy: Arc<Tenancy>,
    /// How long an Exec's output may wait on a client that takes none of it.
    idle: Duration,
}

/// The service bound to one caller: the only way a handler reaches a manager.
#[derive(Debug, Clone)]
struct ForCaller {
    /// The caller's tenant's.
    manager: Arc<Manager>,
    /// The caller's tenant's quotas.
    quotas: Quotas,
    /// The caller's tenant's own registry credentials, if it has them.
    registry_auth: Option<Arc<crate::image::AuthFile>>,
    idle: Duration,
}

impl SandboxApi {
    /// Serves each tenant's sandboxes of `tenancy`; an Exec whose client takes no output for
    /// `idle` is ended.
    pub fn new(tenancy: Arc<Tenancy>, idle: Duration) -> Self {
        SandboxApi { tenancy, idle }
    }

    /// This service bound to the calling tenant's sandboxes and quotas.
    async fn for_caller<T>(&self, req: &Request<T>) -> Result<ForCaller, Status> {
        let manager = super::tenant_manager(&self.tenancy, req).await?;
        Ok(ForCaller {
            registry_auth: super::tenant_registry_auth(manager.registries(), req)?,
            manager,
            quotas: crate::caller::Caller::of(req.extensions()).quotas().clone(),
            idle: self.idle,
        })
    }
}

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    async fn create_sandbox(
        &self,
        req: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let spec = convert::create_spec(req.into_inner())?;
        let started = Instant::now();
        let sandbox = this
            .manager
            .create(spec, &this.quotas, this.registry_auth.clone())
            .await?;
        observe_since(&metrics().create_seconds, started);
        Ok(Response::new(pb::CreateSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn update_sandbox_network(
        &self,
        req: Request<pb::UpdateSandboxNetworkRequest>,
    ) -> Result<Response<pb::UpdateSandboxNetworkResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let (id, egress) = convert::update_network(req.into_inner())?;
        let sandbox = this.manager.update_network(id, egress).await?;
        Ok(Response::new(pb::UpdateSandboxNetworkResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::GetSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let id = SandboxId::parse("sandbox_id", &req.into_inner().sandbox_id)?;
        let sandbox = this.manager.get(&id).await?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let r = req.into_inner();
        let selector = LabelSelector::parse("label_selector", &r.label_selector)?;
        let page = Page::parse(r.page_size, &r.page_token, &r.label_selector)?;
        let (sandboxes, next_page_token) = this.manager.list(&selector, &page).await?;
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: sandboxes.into_iter().map(convert::sandbox).collect(),
            next_page_token,
        }))
    }

    async fn start_sandbox(
        &self,
        req: Request<pb::StartSandboxRequest>,
    ) -> Result<Response<pb::StartSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let id = SandboxId::parse("sandbox_id", &req.into_inner().sandbox_id)?;
        let sandbox = this.manager.start(id).await?;
        Ok(Response::new(pb::StartSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn stop_sandbox(
        &self,
        req: Request<pb::StopSandboxRequest>,
    ) -> Result<Response<pb::StopSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let convert::StopSpec {
            sandbox_id,
            signal,
            timeout,
            force,
        } = convert::stop_spec(req.into_inner())?;
        let sandbox = this
            .manager
            .stop(sandbox_id, signal, timeout, force)
            .await?;
        Ok(Response::new(pb::StopSandboxResponse {
            sandbox: Some(convert::sandbox(sandbox)),
        }))
    }

    async fn delete_sandbox(
        &self,
        req: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let r = req.into_inner();
        let id = SandboxId::parse("sandbox_id", &r.sandbox_id)?;
        this.manager.delete(id, r.force).await?;
        Ok(Response::new(pb::DeleteSandboxResponse {}))
    }

    async fn get_sandbox_stats(
        &self,
        req: Request<pb::GetSandboxStatsRequest>,
    ) -> Result<Response<pb::GetSandboxStatsResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let id = SandboxId::parse("sandbox_id", &req.into_inner().sandbox_id)?;
        let stats = this.manager.stats(&id).await?;
        Ok(Response::new(pb::GetSandboxStatsResponse {
            stats: Some(convert::stats(stats)),
        }))
    }

    type WatchSandboxStatsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchSandboxStatsResponse, Status>> + Send>>;

    async fn watch_sandbox_stats(
        &self,
        req: Request<pb::WatchSandboxStatsRequest>,
    ) -> Result<Response<Self::WatchSandboxStatsStream>, Status> {
        let this = self.for_caller(&req).await?;
        let (id, interval) = convert::watch_stats_spec(req.into_inner())?;
        // The first reading answers the call, so a bad id fails it at once.
        let first = this.manager.stats(&id).await?;
        let manager = this.manager.clone();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.reset();
        // A reading is taken when the client can take it (the stream is pulled), so nothing
        // queues up for a slow client.
        let later = futures::stream::unfold(
            (manager, id, ticks, false),
            |(manager, id, mut ticks, done)| async move {
                if done {
                    return None;
                }
                ticks.tick().await;
                match manager.stats(&id).await {
                    Ok(s) => Some((
                        Ok(pb::WatchSandboxStatsResponse {
                            stats: Some(convert::stats(s)),
                        }),
                        (manager, id, ticks, false),
                    )),
                    // The sandbox stopped: the watch is over.
                    Err(crate::error::Error::FailedPrecondition(_)) => None,
                    Err(e) => Some((Err(Status::from(e)), (manager, id, ticks, true))),
                }
            },
        );
        let first = pb::WatchSandboxStatsResponse {
            stats: Some(convert::stats(first)),
        };
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            later,
        ))))
    }

    type WatchSandboxesStream =
        Pin<Box<dyn Stream<Item = Result<pb::SandboxEvent, Status>> + Send>>;

    async fn watch_sandboxes(
        &self,
        req: Request<pb::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let this = self.for_caller(&req).await?;
        let (selector, resume_after) = convert::watch_sandboxes_spec(req.into_inner())?;
        // A resume that cannot be served fails the call itself, before any event.
        let mut events = this.manager.watch_events(resume_after)?;
        let latest = events.latest;
        let (mut tx, rx) = stream::outbound(EVENT_STREAM_QUEUE, this.idle);
        tokio::spawn(async move {
            let mut last = resume_after;
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = tx.closed() => return,
                };
                match next {
                    Next::Event(e) => {
                        last = e.revision;
                        if !selector.matches(&e.sandbox.labels) {
                            continue;
                        }
                        if tx.send(Ok(convert::sandbox_event(&e))).await.is_err() {
                            return;
                        }
                    }
                    Next::Lagged => {
                        // Its place in the shared ring is lost: no memory is held for it.
                        tx.abort(Status::aborted(format!(
                            "this watcher fell more than {WATCHER_QUEUE} events behind (after revision \
                             {last}) and was ended; call again with resume_after = the last revision \
                             received to continue"
                        )));
                        return;
                    }
                    Next::Closed => {
                        tx.abort(Status::unavailable(
                            "the server is shutting down; resume later",
                        ));
                        return;
                    }
                }
            }
        });
        let mut response = Response::new(Box::pin(rx) as Self::WatchSandboxesStream);
        if let Ok(v) = latest.to_string().parse() {
            response.metadata_mut().insert(REVISION_HEADER, v);
        }
        Ok(response)
    }

    type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecResponse, Status>> + Send>>;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let this = self.for_caller(&req).await?;
        let deadline = grpc_timeout(req.metadata());
        let mut inbound = req.into_inner();
        let spec = convert::exec_first(inbound.message().await?)?;
        let spec_stdin = spec.stdin;
        let session = this.manager.exec_start(spec).await?;
        let started = pb::ExecResponse {
            response: Some(pb::exec_response::Response::Started(pb::ExecStarted {
                exec_id: session.exec_id.clone(),
                pid: session.pid,
            })),
        };
        let stdin_allowed = spec_stdin;
        let (in_tx, in_rx) = mpsc::channel(EXEC_INPUT_QUEUE);
        let (ev_tx, mut ev_rx) = mpsc::channel(EXEC_OUTPUT_QUEUE);
        // A bad message from the client ends the stream with this status (and kills the process).
        let (abort_tx, mut abort_rx) = mpsc::channel::<Status>(1);
        tokio::spawn(session.run(in_rx, ev_tx));
        tokio::spawn(async move {
            loop {
                // No idle timeout on input: it may rightly stay idle for as long as the
                // process runs. The client ends this half (or the connection does).
                match inbound.message().await {
                    Ok(Some(msg)) => match convert::exec_input(msg, stdin_allowed) {
                        Ok(Some(input)) => {
                            if in_tx.send(input).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = abort_tx.send(Status::from(e)).await;
                            return;
                        }
                    },
                    // Half-close: dropping the sender tells the session input has ended.
                    Ok(None) => return,
                    Err(_) => {
                        let _ = in_tx.send(ExecInput::Cancel).await;
                        return;
                    }
                }
            }
        });
        // Forward events to the client; end the stream early on a bad client message, on the
        // call's deadline (tonic does not enforce it for streams), or when output has waited
        // for the idle timeout on a client that takes none of it. Either way dropping the
        // events' receiver kills the process.
        let (mut out_tx, out_rx) = stream::outbound(EXEC_OUTPUT_QUEUE, this.idle);
        let _ = out_tx.send(Ok(started)).await;
        tokio::spawn(async move {
            let expiry = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expiry);
            loop {
                tokio::select! {
                    ev = ev_rx.recv() => match ev {
                        Some(ev) => {
                            // Gone, or stalled (the stream is ended already): the process is
                            // killed as the events' receiver drops.
                            if out_tx.send(convert::exec_event(ev)).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    // The client went away: dropping the events' receiver kills the process.
                    () = out_tx.closed() => return,
                    Some(status) = abort_rx.recv() => {
                        drop(ev_rx);
                        let _ = out_tx.send(Err(status)).await;
                        return;
                    }
                    _ = &mut expiry => {
                        drop(ev_rx);
                        out_tx.abort(Status::deadline_exceeded("the call's deadline expired; the process was killed"));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(out_rx)))
    }

    async fn exec_sync(
        &self,
        req: Request<pb::ExecSyncRequest>,
    ) -> Result<Response<pb::ExecSyncResponse>, Status> {
        let this = self.for_caller(&req).await?;
        let (spec, stdin, max) = convert::exec_sync_spec(req.into_inner())?;
        let r = this.manager.exec_sync(spec, stdin, max).await?;
        Ok(Response::new(pb::ExecSyncResponse {
            exit_code: r.exit.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            timed_out: r.exit.timed_out,
            signal: r.exit.signal,
        }))
    }
}

/// The caller's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses_every_unit() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        for (v, d) in [
            ("2S", Duration::from_secs(2)),
            ("150m", Duration::from_millis(150)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), Some(d), "{v}");
        }
        md.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
