//! Streams a client cannot hold open by going quiet.
//!
//! A stream holds server resources (a sandbox's root, for a stopped sandbox its mount and
//! lock; an exec's process) for as long as the client keeps it open. HTTP/2 keepalive notices
//! a client that is gone, not one that is alive and idle: so a client stream ends when no
//! message arrives for the idle timeout ([`next_message`]), and a server stream ends when the
//! client takes nothing of what is queued for it for as long ([`Outbound::send`]). Both end
//! with DEADLINE_EXCEEDED naming `--stream-idle-timeout`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::{Status, Streaming};

use crate::error::Error;

/// The status of a stream ended because the client sent nothing for `idle`.
pub fn client_idle(idle: Duration) -> Status {
    Error::DeadlineExceeded(format!(
        "no message from the client for {idle:?} (--stream-idle-timeout); the call was ended \
         and nothing it started was kept"
    ))
    .into()
}

/// The status of a stream ended because the client took nothing it was sent for `idle`.
pub fn client_stalled(idle: Duration) -> Status {
    Error::DeadlineExceeded(format!(
        "the client received nothing for {idle:?} while output waited (--stream-idle-timeout); \
         the call was ended"
    ))
    .into()
}

/// The next message of a client stream; DEADLINE_EXCEEDED when none comes within `idle`.
pub async fn next_message<T>(
    inbound: &mut Streaming<T>,
    idle: Duration,
) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, inbound.message()).await {
        Ok(message) => message,
        Err(_) => Err(client_idle(idle)),
    }
}

/// Why [`Outbound::send`] could not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client went away.
    Gone,
    /// The client took nothing for the idle timeout: the stream has been ended.
    Stalled,
}

/// The sending half of a server stream whose client must keep reading: see [`outbound`].
#[derive(Debug)]
pub struct Outbound<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    abort: Option<oneshot::Sender<Status>>,
    idle: Duration,
}

/// A server stream of at most `capacity` queued messages whose sender gives up on a client
/// that takes none of them for `idle`.
pub fn outbound<T>(capacity: usize, idle: Duration) -> (Outbound<T>, OutboundStream<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (abort_tx, abort_rx) = oneshot::channel();
    (
        Outbound {
            tx,
            abort: Some(abort_tx),
            idle,
        },
        OutboundStream {
            rx,
            abort: Some(abort_rx),
            done: false,
        },
    )
}

impl<T> Outbound<T> {
    /// Queues `item` for the client. A client that takes nothing for the idle timeout while
    /// the queue is full has its stream ended with DEADLINE_EXCEEDED ([`Ended::Stalled`]).
    pub async fn send(&mut self, item: Result<T, Status>) -> Result<(), Ended> {
        match tokio::time::timeout(self.idle, self.tx.send(item)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Gone),
            Err(_) => {
                self.abort(client_stalled(self.idle));
                Err(Ended::Stalled)
            }
        }
    }

    /// Queues `item` if there is room now: `Ok(false)` when the queue is full (the item is
    /// dropped), [`Ended::Gone`] when the client went away.
    pub fn try_send(&self, item: Result<T, Status>) -> Result<bool, Ended> {
        match self.tx.try_send(item) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Ended::Gone),
        }
    }

    /// Ends the stream with `status` ahead of anything still queued (which the client then
    /// never sees): for endings that cannot wait for a client that does not read.
    pub fn abort(&mut self, status: Status) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(status);
        }
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The receiving half of [`outbound`], handed to tonic as the response stream.
#[derive(Debug)]
pub struct OutboundStream<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    abort: Option<oneshot::Receiver<Status>>,
    done: bool,
}

impl<T> Stream for OutboundStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(abort) = &mut self.abort {
            match Pin::new(abort).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                // The sender finished without aborting: what is queued is the rest.
                Poll::Ready(Err(_)) => self.abort = None,
                Poll::Pending => {}
            }
        }
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_client_that_stops_reading_is_ended_ahead_of_the_queue() {
        let idle = Duration::from_millis(50);
        let (mut tx, mut rx) = outbound::<u32>(2, idle);
        tx.send(Ok(1)).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        tx.send(Ok(2)).await.unwrap();
        tx.send(Ok(3)).await.unwrap();
        // The queue is full and nobody reads: the send gives up after the idle timeout.
        let started = tokio::time::Instant::now();
        assert_eq!(tx.send(Ok(4)).await, Err(Ended::Stalled));
        assert!(started.elapsed() >= idle);
        let status = rx.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("--stream-idle-timeout"),
            "{status:?}"
        );
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn a_finished_sender_leaves_the_queue_to_drain() {
        let (mut tx, mut rx) = outbound::<u32>(4, Duration::from_secs(1));
        tx.send(Ok(1)).await.unwrap();
        tx.send(Err(Status::internal("last"))).await.unwrap();
        drop(tx);
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        assert_eq!(rx.next().await.unwrap().unwrap_err().message(), "last");
        assert!(rx.next().await.is_none());
        // And a client gone is told apart from a stalled one.
        let (mut tx, rx) = outbound::<u32>(1, Duration::from_secs(1));
        drop(rx);
        assert_eq!(tx.send(Ok(1)).await, Err(Ended::Gone));
    }
}
