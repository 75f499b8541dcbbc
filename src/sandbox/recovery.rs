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

/// Prefix of the snapshot keys used while unpacking layers.
const UNPACK_KEY_PREFIX: &str = "sandboxd-unpack-";

impl Manager {
    // ---- background duties ----

    /// Deletes every sandbox whose TTL has passed; returns how many.
    pub async fn reap_expired(self: &Arc<Self>) -> Result<usize> {
        let now = SystemTime::now();
        let mut reaped = 0;
        for c in self.managed_containers().await? {
            let expired = c
                .labels
                .get(L_EXPIRES)
                .and_then(|v| crate::util::parse_rfc3339(v))
                .is_some_and(|t| t <= now);
            if !expired {
                continue;
            }
            let Ok(id) = SandboxId::parse("sandbox_id", &c.id) else {
                continue;
            };
            match self.delete(id.clone(), true).await {
                Ok(()) | Err(Error::NotFound { .. }) => {
                    tracing::info!(sandbox_id = %id, "deleted an expired sandbox");
                    reaped += 1;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "deleting an expired sandbox failed")
                }
            }
        }
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
                    if !exit.is_init() || !self.net.is_attached(&exit.container_id) {
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

    /// After a restart: removes what an interrupted operation left behind (writable snapshots
    /// without a container, unpack snapshots, files of sandboxes that are gone).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let containers = self.all_containers().await?;
        let keys: HashSet<&str> = containers.iter().map(|c| c.snapshot_key.as_str()).collect();
        let orphans: Vec<String> = self
            .cd
            .snapshots()
            .await?
            .into_iter()
            .filter(|info| {
                let ours = info.labels.contains_key(L_SNAPSHOT_OWNER)
                    || info.name.starts_with(UNPACK_KEY_PREFIX);
                ours && !keys.contains(info.name.as_str())
            })
            .map(|info| info.name)
            .collect();
        for key in orphans {
            tracing::info!(snapshot = %key, "removing a snapshot left by an interrupted operation");
            if let Err(e) = self.cd.remove(&key).await {
                tracing::warn!(snapshot = %key, error = %e, "could not remove a leftover snapshot");
            }
        }
        self.reconcile_networks().await?;
        let attached = self.net.attached_ids();
        if let Err(e) = self.net.sweep_firewall(&attached).await {
            tracing::debug!(error = %e, "no egress chains swept");
        }
        let ids: HashSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("sandboxes")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !ids.contains(name.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.adopt_pool(&containers).await?;
        Ok(())
    }
}
