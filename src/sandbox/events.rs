//! What happens to a tenant's sandboxes, in order, for WatchSandboxes.
//!
//! Each tenant's [`Manager`](super::Manager) owns one [`EventLog`]: its operations publish as
//! they complete, and the exit watcher publishes PID 1 exits seen on containerd's event
//! stream. Every event gets the tenant's next revision and goes into a bounded history (for
//! clients resuming after a dropped stream) and to every watcher through one broadcast ring.
//!
//! Publishing and subscribing take the same lock, so a subscriber's replay (from the history)
//! and its live events (from the ring) meet exactly: no gap, no duplicate. A watcher that
//! falls behind by more than [`WATCHER_QUEUE`] events is told so ([`Next::Lagged`]) instead of
//! holding memory for it: the ring is shared and its size is fixed.
//!
//! Revisions of a run start at its start time in microseconds, so a revision a client kept
//! from an earlier run is always below this run's history and is refused as too old, never
//! replayed from the wrong place.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::broadcast;

use super::model::Sandbox;
use crate::error::{Error, Result};

/// Events one watcher may have pending before it is ended as too slow.
pub const WATCHER_QUEUE: usize = 1024;

/// What happened to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created (a fork included).
    Created,
    /// PID 1 started.
    Started,
    /// PID 1 exited by itself.
    Exited,
    /// StopSandbox stopped it.
    Stopped,
    /// Deleted; the sandbox is as it was just before.
    Deleted,
    /// CommitSnapshot captured it.
    SnapshotCommitted,
    /// RestoreSandbox reset and restarted it.
    Restored,
}

/// One event of a tenant's sequence.
#[derive(Debug, Clone)]
pub struct SandboxEvent {
    /// What happened.
    pub kind: EventKind,
    /// The sandbox right after the change (before it, for a delete).
    pub sandbox: Sandbox,
    /// Place in the tenant's sequence.
    pub revision: i64,
    /// When it was published.
    pub time: SystemTime,
    /// The snapshot committed or restored.
    pub snapshot_id: String,
}

#[derive(Debug)]
struct LogState {
    history: VecDeque<Arc<SandboxEvent>>,
    /// The revision the next event gets.
    next: i64,
    /// The newest revision no longer in the history (nothing after it is lost).
    floor: i64,
}

/// A tenant's event sequence: history and live fan-out.
#[derive(Debug)]
pub struct EventLog {
    state: Mutex<LogState>,
    tx: broadcast::Sender<Arc<SandboxEvent>>,
    capacity: usize,
    /// Set when the server shuts down: every subscription then ends.
    closed: tokio::sync::watch::Sender<bool>,
}

/// A watcher's view of the log: a replay, then live events.
#[derive(Debug)]
pub struct EventSubscription {
    replay: std::collections::vec_deque::IntoIter<Arc<SandboxEvent>>,
    rx: broadcast::Receiver<Arc<SandboxEvent>>,
    closed: tokio::sync::watch::Receiver<bool>,
    /// The latest revision when the subscription was made.
    pub latest: i64,
}

/// What a subscription yields next.
#[derive(Debug)]
pub enum Next {
    /// The next event.
    Event(Arc<SandboxEvent>),
    /// The watcher fell more than [`WATCHER_QUEUE`] events behind; events were dropped after
    /// the last one it got.
    Lagged,
    /// The log is gone (the server is shutting down).
    Closed,
}

impl EventLog {
    /// A log keeping `capacity` events (at least one), whose first revision is `base`.
    pub fn new(capacity: usize, base: i64) -> EventLog {
        EventLog {
            state: Mutex::new(LogState {
                history: VecDeque::new(),
                next: base,
                floor: base - 1,
            }),
            tx: broadcast::channel(WATCHER_QUEUE).0,
            capacity: capacity.max(1),
            closed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// A log whose first revision is `started` in microseconds since the epoch.
    pub fn starting_at(capacity: usize, started: SystemTime) -> EventLog {
        let micros = started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2))
            .unwrap_or(1);
        EventLog::new(capacity, micros.max(1))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes that `kind` happened to `sandbox`; returns its revision.
    pub fn publish(&self, kind: EventKind, sandbox: Sandbox, snapshot_id: &str) -> i64 {
        let mut s = self.state();
        let revision = s.next;
        s.next += 1;
        let event = Arc::new(SandboxEvent {
            kind,
            sandbox,
            revision,
            time: SystemTime::now(),
            snapshot_id: snapshot_id.to_string(),
        });
        if s.history.len() == self.capacity {
            if let Some(old) = s.history.pop_front() {
                s.floor = old.revision;
            }
        }
        s.history.push_back(event.clone());
        // No receiver is no error: nobody watches.
        let _ = self.tx.send(event);
        revision
    }

    /// Ends every subscription, present and future ([`Next::Closed`]): the server is stopping.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Whether [`EventLog::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Events after `resume_after` (0: none, only live ones), then live ones. OUT_OF_RANGE
    /// when the history no longer holds the event after `resume_after`, or never did.
    pub fn subscribe(&self, resume_after: i64) -> Result<EventSubscription> {
        if resume_after < 0 {
            return Err(Error::invalid("resume_after", "must not be negative"));
        }
        let s = self.state();
        let latest = s.next - 1;
        let replay: VecDeque<Arc<SandboxEvent>> = if resume_after == 0 {
            VecDeque::new()
        } else if resume_after < s.floor {
            return Err(Error::OutOfRange(format!(
                "resume_after {resume_after} is older than the event history, which begins \
                 after revision {} (or it is from before a restart of sandboxd); re-list \
                 with ListSandboxes, then watch with resume_after unset",
                s.floor
            )));
        } else if resume_after > latest {
            return Err(Error::OutOfRange(format!(
                "resume_after {resume_after} is past the latest revision {latest} (a revision \
                 of another run of sandboxd?); re-list with ListSandboxes, then watch with \
                 resume_after unset"
            )));
        } else {
            s.history
                .iter()
                .filter(|e| e.revision > resume_after)
                .cloned()
                .collect()
        };
        Ok(EventSubscription {
            replay: replay.into_iter(),
            rx: self.tx.subscribe(),
            closed: self.closed.subscribe(),
            latest,
        })
    }
}

impl EventSubscription {
    /// The next event: first the replay, then live ones as they come.
    pub async fn next(&mut self) -> Next {
        if *self.closed.borrow() {
            return Next::Closed;
        }
        if let Some(e) = self.replay.next() {
            return Next::Event(e);
        }
        let closed = &mut self.closed;
        tokio::select! {
            r = self.rx.recv() => match r {
                Ok(e) => Next::Event(e),
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Lagged,
                Err(broadcast::error::RecvError::Closed) => Next::Closed,
            },
            _ = closed.wait_for(|c| *c) => Next::Closed,
        }
    }
}

impl super::Manager {
    /// WatchSandboxes: the tenant's events after `resume_after` (0: from now on), then live.
    pub fn watch_events(&self, resume_after: i64) -> Result<EventSubscription> {
        self.events.subscribe(resume_after)
    }

    /// Publishes that `kind` happened to `sandbox` (as it is now).
    pub(super) fn publish(&self, kind: EventKind, sandbox: &Sandbox, snapshot_id: &str) {
        self.events.publish(kind, sandbox.clone(), snapshot_id);
    }

    /// Ends every WatchSandboxes and WatchFiles stream of the tenant: the server is stopping.
    pub fn close_events(&self) {
        self.events.close();
    }

    /// Whether the server is stopping (see [`Manager::close_events`]).
    pub fn events_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Resolves once sandbox `id` is not running (or not there): at once if it is not now,
    /// else when it exits, stops, is restored (restarted) or deleted.
    pub async fn until_stopped(&self, id: &super::SandboxId) {
        use crate::sandbox::State;
        loop {
            // Subscribed before the state is read: no change falls between the two.
            let Ok(mut sub) = self.events.subscribe(0) else {
                return;
            };
            match self.get(id).await {
                Ok(s) if matches!(s.state, State::Running | State::Paused) => {}
                _ => return,
            }
            loop {
                match sub.next().await {
                    Next::Event(e) if &e.sandbox.id == id => {
                        if !matches!(
                            e.kind,
                            EventKind::Created | EventKind::Started | EventKind::SnapshotCommitted
                        ) {
                            return;
                        }
                    }
                    Next::Event(_) => {}
                    // Read the state again.
                    Next::Lagged => break,
                    Next::Closed => return,
                }
            }
        }
    }

    /// Publishes that PID 1 of sandbox `id` exited by itself, unless a stop, delete, start or
    /// restore already dealt with that exit. Taken under the sandbox's lock, so the event
    /// follows the CREATED and STARTED of a PID 1 that exits at once, and a PID 1 that a stop
    /// or delete ended (its task is gone by the time the lock is free) gives no EXITED.
    pub(super) async fn publish_exit(&self, id: &super::SandboxId) {
        let Ok(_guard) = self.locks.lock(id.as_str()).await else {
            return;
        };
        let Ok(Some(container)) = self.container(id).await else {
            return;
        };
        let Ok(Some(task)) = self.task(id.as_str()).await else {
            return;
        };
        // A PID 1 started again meanwhile is running: its earlier exit was dealt with.
        if task.state != crate::runtime::TaskState::Stopped {
            return;
        }
        let sandbox = self.describe(&container, Some(&task));
        self.publish(EventKind::Exited, &sandbox, "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{NetworkMode, Resources, SandboxId, State};

    fn sandbox(id: &str) -> Sandbox {
        Sandbox {
            id: SandboxId::parse("sandbox_id", id).unwrap(),
            image: String::new(),
            snapshot_id: String::new(),
            state: State::Running,
            pid: 0,
            exit_status: None,
            oom_killed: false,
            labels: Default::default(),
            resources: Resources::default(),
            network: NetworkMode::None,
            ip_address: String::new(),
            gateway: String::new(),
            net_policy: None,
            command: Vec::new(),
            hostname: String::new(),
            created_at: None,
            started_at: None,
            expires_at: None,
            exited_at: None,
        }
    }

    async fn revisions(sub: &mut EventSubscription, n: usize) -> Vec<i64> {
        let mut got = Vec::new();
        for _ in 0..n {
            match sub.next().await {
                Next::Event(e) => got.push(e.revision),
                other => panic!("{other:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn a_resumed_subscription_replays_then_follows_without_gap_or_duplicate() {
        let log = EventLog::new(10, 100);
        for i in 0..3 {
            log.publish(EventKind::Created, sandbox(&format!("b{i}")), "");
        }
        let mut sub = log.subscribe(100).unwrap();
        assert_eq!(sub.latest, 102);
        log.publish(EventKind::Started, sandbox("b0"), "");
        assert_eq!(revisions(&mut sub, 3).await, vec![101, 102, 103]);
        let mut fresh = log.subscribe(0).unwrap();
        log.publish(EventKind::Deleted, sandbox("b0"), "");
        assert_eq!(revisions(&mut fresh, 1).await, vec![104]);
    }

    #[tokio::test]
    async fn closing_the_log_ends_its_subscriptions() {
        let log = EventLog::new(4, 1);
        let mut sub = log.subscribe(0).unwrap();
        log.close();
        assert!(matches!(sub.next().await, Next::Closed));
        assert!(matches!(
            log.subscribe(0).unwrap().next().await,
            Next::Closed
        ));
    }

    #[test]
    fn revisions_the_history_no_longer_holds_are_out_of_range() {
        let log = EventLog::new(2, 10);
        for _ in 0..4 {
            log.publish(EventKind::Created, sandbox("a"), "");
        }
        // History holds 12 and 13: resuming after 11 is fine, after 10 lost 11.
        assert!(log.subscribe(11).is_ok());
        assert!(matches!(log.subscribe(10), Err(Error::OutOfRange(_))));
        assert!(matches!(log.subscribe(14), Err(Error::OutOfRange(_))));
        assert!(matches!(
            log.subscribe(-1),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_the_ring_is_told_it_lagged() {
        let log = EventLog::new(1, 1);
        let mut sub = log.subscribe(0).unwrap();
        for _ in 0..WATCHER_QUEUE + 1 {
            log.publish(EventKind::Created, sandbox("a"), "");
        }
        assert!(matches!(sub.next().await, Next::Lagged));
    }
}
