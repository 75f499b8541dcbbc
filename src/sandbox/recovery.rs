//! Background duties and restarts: the TTL reaper, the exit watcher that tears down networks
//! of sandboxes whose PID 1 exited by itself, and the recovery that runs before serving.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;

use super::manager::Manager;
use super::model::*;
use super::record::*;
use crate::error::{Error, Result};
use crate::runtime::{Container, TaskState};

/// Scratch files are an earlier run's only when older than this run's start by this much.
const SCRATCH_MARGIN: Duration = Duration::from_secs(2);
/// Expired sandboxes deleted at once.
const REAP_CONCURRENCY: usize = 8;
/// How long the reaper waits for one delete before it moves on.
const REAP_WAIT: Duration = Duration::from_secs(30);
/// Prefixes of the keys of snapshots that live only as long as one operation: an unpack (pull,
/// commit) and the view a commit diffs against.
const TEMPORARY_KEY_PREFIXES: [&str; 2] = ["sandboxd-unpack-", "sandboxd-view-"];

impl Manager {
    // ---- background duties ----

    /// Deletes every sandbox whose TTL has passed, several at a time; returns how many. A
    /// delete that hangs (a stuck shim) is left to finish on its own after [`REAP_WAIT`]: it
    /// never holds up the others or the next round.
    pub async fn reap_expired(self: &Arc<Self>) -> Result<usize> {
        let expired = expired(&self.managed_containers().await?, SystemTime::now());
        let reaped = futures::stream::iter(expired)
            .map(|id| async move {
                match tokio::time::timeout(REAP_WAIT, self.delete(id.clone(), true)).await {
                    Ok(Ok(()) | Err(Error::NotFound { .. })) => {
                        tracing::info!(sandbox_id = %id, "deleted an expired sandbox");
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(sandbox_id = %id, error = %e, "deleting an expired sandbox failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(sandbox_id = %id, wait = ?REAP_WAIT, "deleting an expired sandbox is taking long; it goes on in the background");
                        false
                    }
                }
            })
            .buffer_unordered(REAP_CONCURRENCY)
            .filter(|done| std::future::ready(*done))
            .count()
            .await;
        Ok(reaped)
    }

    /// Follows containerd's task-exit events and tears down the network of each BRIDGE
    /// sandbox whose PID 1 exited by itself, until `stop` changes. Resubscribes after errors.
    pub async fn watch_exits(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            // containerd sends the response headers with the first event, so even subscribing
            // waits until something exits: never past a shutdown.
            let subscribed = tokio::select! {
                s = self.cd.exits() => s,
                _ = stop.changed() => return,
            };
            if let Ok(mut exits) = subscribed {
                loop {
                    let exit = tokio::select! {
                        e = exits.next() => e,
                        _ = stop.changed() => return,
                    };
                    let Some(Ok(exit)) = exit else { break };
                    // Only PID 1's exit ends the sandbox.
                    if !exit.is_init() || !self.net.is_attached(&self.host_key(&exit.container_id))
                    {
                        continue;
                    }
                    let Ok(id) = SandboxId::parse("sandbox_id", &exit.container_id) else {
                        continue;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.settle_network(&id).await {
                            tracing::warn!(sandbox_id = %id, error = %e, "tearing down the network after exit failed; the sweep will retry");
                        }
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Before serving, after a restart or a containerd reconnect: finishes or undoes what
    /// interrupted operations left. Each sandbox is settled under its lock, so an operation
    /// still running in this process (after a reconnect) is waited for, never undone.
    /// - a create whose lease still exists did not finish: rolled back;
    /// - a paused task was paused by a commit that died (the API has no pause): resumed;
    /// - a container whose writable snapshot is gone was being deleted: the delete finishes;
    /// - writable, view and unpack snapshots that no container uses are removed;
    /// - networks of sandboxes whose task is gone are torn down, firewall chains swept;
    /// - files of gone sandboxes are removed; leases and unfinished content writes of
    ///   operations of an earlier run released;
    /// - the warm pool is adopted or emptied.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        // The cap on all sandboxes together is in place before any sandbox starts (the
        // default tenant's manager recovers first; the cap is the node's, not a tenant's).
        let walls = &self.cfg.walls;
        let node_wide = self.scope.is_default();
        if node_wide && (walls.total_memory.is_some() || walls.total_cpu_millis.is_some()) {
            let (parent, memory, cpu) = (
                self.cfg.cgroup_parent.clone(),
                walls.total_memory,
                walls.total_cpu_millis,
            );
            crate::sys::blocking(move || crate::sys::limit_cgroup(&parent, memory, cpu)).await?;
        }
        let leases = self.cd.leases().await?;
        let open: HashSet<&str> = leases.iter().map(|(l, _)| l.id()).collect();
        for c in self.all_containers().await? {
            let Ok(id) = SandboxId::parse("sandbox_id", &c.id) else {
                continue;
            };
            let unfinished = c
                .labels
                .get(L_CREATE_LEASE)
                .is_some_and(|l| open.contains(l.as_str()));
            if let Err(e) = self.settle(&id, unfinished).await {
                tracing::warn!(sandbox_id = %id, error = %e, "settling a sandbox after a restart failed; will retry");
            }
        }
        drop(open);

        let containers = self.all_containers().await?;
        let keys: HashSet<&str> = containers.iter().map(|c| c.snapshot_key.as_str()).collect();
        let orphans: Vec<String> = self
            .cd
            .snapshots()
            .await?
            .into_iter()
            .filter(|info| {
                let ours = info.labels.contains_key(L_SNAPSHOT_OWNER)
                    || TEMPORARY_KEY_PREFIXES
                        .iter()
                        .any(|p| info.name.starts_with(p));
                ours && !info.committed && !keys.contains(info.name.as_str())
            })
            .map(|info| info.name)
            .collect();
        for key in orphans {
            tracing::info!(snapshot = %key, "removing a snapshot left by an interrupted operation");
            if let Err(e) = self.cd.remove(&key).await {
                tracing::warn!(snapshot = %key, error = %e, "could not remove a leftover snapshot");
            }
        }
        // One sandbox's network that cannot be torn down must not keep every other sandbox from
        // being served: the periodic sweep tries it again.
        if let Err(e) = self.reconcile_networks().await {
            tracing::warn!(error = %e, "reconciling networks after a restart failed; the sweep retries");
        }
        let attached = self.net.attached_ids();
        if let Err(e) = self.net.sweep_firewall(&attached).await {
            tracing::debug!(error = %e, "no egress chains swept");
        }
        let ids: HashSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("sandboxes")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                // Only this tenant's files: another tenant's key never maps to an id here.
                let Some(id) = self.scope.id_of_key(&name) else {
                    continue;
                };
                if !ids.contains(id.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        if node_wide {
            self.remove_stale_scratch().await;
        }
        // Content writes of an earlier run (a pull, export or commit that died mid-blob) keep
        // their partial data until aborted. One that has not moved since this process started
        // belongs to no live operation.
        for (write_ref, moved) in self.cd.ingests().await? {
            if moved.is_some_and(|t| t < self.started_at) {
                tracing::info!(%write_ref, "abandoning a content write left by an interrupted operation");
                if let Err(e) = self.cd.abort_ingest(&write_ref).await {
                    tracing::warn!(%write_ref, error = %e, "could not abandon a leftover content write");
                }
            }
        }
        // Leases made before this process started belong to operations that died with an
        // earlier one; what they kept alive and nothing else references goes to containerd's GC.
        for (lease, made) in leases {
            if made.is_some_and(|t| t < self.started_at) {
                if let Err(e) = self.cd.release(lease).await {
                    tracing::debug!(error = %e, "releasing a leftover lease failed; it will expire");
                }
            }
        }
        self.adopt_pool(&containers).await?;
        Ok(())
    }

    /// Removes the scratch an earlier run of sandboxd left: exec FIFO directories and
    /// temporary snapshot mounts made before this process started (this process's own are in
    /// use and newer).
    async fn remove_stale_scratch(&self) {
        // File times come from a coarse clock: a margin keeps this run's newest from looking
        // older than its start. What an earlier run made within it waits for the next restart.
        let started = self.started_at - SCRATCH_MARGIN;
        let (exec_dir, mount_base) = (self.exec_dir(), self.mount_base());
        let _ = crate::sys::blocking(move || {
            for (dir, mounted) in [(exec_dir, false), (mount_base, true)] {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let made = entry.metadata().and_then(|m| m.modified());
                    if !made.is_ok_and(|t| t < started) {
                        continue;
                    }
                    let path = entry.path();
                    if mounted {
                        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                        let _ = std::fs::remove_dir(&path);
                    } else {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    tracing::info!(path = %path.display(), "removed scratch an earlier run left");
                }
            }
            Ok(())
        })
        .await;
    }

    /// Finishes or undoes an interrupted operation on sandbox `id` (see [`Self::recover`]).
    async fn settle(self: &Arc<Self>, id: &SandboxId, unfinished_create: bool) -> Result<()> {
        let _guard = self.locks.lock(id.as_str()).await?;
        let Some(container) = self.any_container(id).await? else {
            return Ok(());
        };
        // Read again under the lock: a create of this process may have finished meanwhile.
        let lease_open = match container.labels.get(L_CREATE_LEASE) {
            Some(l) if unfinished_create => {
                let open = self.cd.leases().await?;
                open.iter().any(|(o, _)| o.id() == l)
            }
            _ => false,
        };
        let snapshot_gone = self.cd.stat(&container.snapshot_key).await?.is_none();
        if lease_open || snapshot_gone {
            let why = if lease_open {
                "its create did not finish"
            } else {
                "its delete did not finish"
            };
            tracing::info!(sandbox_id = %id, why, "removing a half-made sandbox");
            return self.delete_locked(id, &container, true).await;
        }
        if self
            .task(id.as_str())
            .await?
            .is_some_and(|t| t.state == TaskState::Paused)
        {
            tracing::info!(sandbox_id = %id, "resuming a sandbox a commit left paused");
            self.cd.resume(id.as_str()).await?;
        }
        Ok(())
    }
}

/// The sandboxes among `containers` whose TTL has passed at `now`, in id order.
fn expired(containers: &[Container], now: SystemTime) -> Vec<SandboxId> {
    containers
        .iter()
        .filter(|c| {
            c.labels
                .get(L_EXPIRES)
                .and_then(|v| crate::util::parse_rfc3339(v))
                .is_some_and(|t| t <= now)
        })
        .filter_map(|c| SandboxId::parse("sandbox_id", &c.id).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, expires: Option<SystemTime>) -> Container {
        let mut c = Container {
            id: id.into(),
            ..Default::default()
        };
        if let Some(t) = expires {
            c.labels.insert(L_EXPIRES.into(), crate::util::rfc3339(t));
        }
        c
    }

    #[test]
    fn only_sandboxes_past_their_expiry_are_due() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let containers = [
            container("past-1", Some(now - hour)),
            container("now-1", Some(now)),
            container("future-1", Some(now + hour)),
            container("never-1", None),
        ];
        let due: Vec<String> = expired(&containers, now)
            .iter()
            .map(|id| id.to_string())
            .collect();
        assert_eq!(due, ["past-1", "now-1"]);
    }

    #[test]
    fn an_unreadable_expiry_never_deletes() {
        let mut c = container("odd-1", None);
        c.labels.insert(L_EXPIRES.into(), "tomorrow".into());
        assert!(expired(&[c], SystemTime::now()).is_empty());
    }
}
