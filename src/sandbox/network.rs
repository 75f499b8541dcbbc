//! A BRIDGE sandbox's network: attached (CNI, firewall, /etc files, address labels) before its
//! PID 1 starts, detached when its task is gone, and settled after exits and restarts.

use std::collections::HashSet;

use std::sync::Arc;

use super::manager::{run_to_completion, Manager};
use super::model::*;
use super::record::*;
use crate::error::{Error, Result};
use crate::net::policy::{Egress, NetPolicy};
use crate::runtime::Container;
use crate::sys;

impl Manager {
    /// Attaches a BRIDGE sandbox's network and records its address; undone on failure.
    pub(super) async fn attach_network(&self, id: &SandboxId, net: &NetCtx<'_>) -> Result<()> {
        // Checked again at each start: the range or sandboxd's own ports may have changed
        // since the sandbox was made.
        self.net.check_host_ports(net.policy)?;
        let _ports = if net.policy.ports.is_empty() {
            None
        } else {
            let guard = self.net.port_lock().await;
            self.check_ports_free(id, &net.policy.ports).await?;
            Some(guard)
        };
        let resolv = self.net.resolv_conf();
        let attached = self
            .net
            .attach(&self.host_key(id.as_str()), net.policy, &resolv.nameservers)
            .await?;
        let recorded = async {
            write_etc_files(
                &self.files_dir(id),
                net.hostname,
                Some(attached.ip),
                &resolv.text,
            )
            .await?;
            let result = serde_json::to_string(&attached.result).unwrap_or_default();
            self.update_labels(
                id.as_str(),
                &[
                    (L_NET_IP, Some(attached.ip.to_string())),
                    (L_NET_GATEWAY, attached.gateway.map(|g| g.to_string())),
                    (
                        L_NET_RESULT,
                        (result.len() <= MAX_RESULT_LABEL).then_some(result),
                    ),
                    (L_NET_GUARD, serde_json::to_string(&attached.guard).ok()),
                ],
            )
            .await
        }
        .await;
        if let Err(e) = recorded {
            let cleanup = self
                .net
                .detach(
                    &self.host_key(id.as_str()),
                    Some(&attached.result),
                    &net.policy.ports,
                )
                .await;
            return Err(e.with_cleanup(cleanup));
        }
        Ok(())
    }

    /// UpdateSandboxNetwork: replaces BRIDGE sandbox `id`'s egress policy. A running sandbox's
    /// rules are swapped in one firewall transaction (each packet meets the old policy or the
    /// new one, never none), then the new policy is recorded; if recording fails the old
    /// rules are put back. A stopped sandbox gets the new policy at its next start. Runs to
    /// completion even if the caller goes away.
    pub async fn update_network(
        self: &Arc<Self>,
        id: SandboxId,
        egress: Egress,
    ) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("update_sandbox_network", sandbox_id = %id);
        run_to_completion(tracing::Instrument::instrument(
            async move {
                this.update_network_inner(&id, egress).await?;
                this.get(&id).await
            },
            span,
        ))
        .await
    }

    async fn update_network_inner(&self, id: &SandboxId, egress: Egress) -> Result<()> {
        let _guard = self.locks.lock(id.as_str()).await?;
        let container = self.existing(id).await?;
        let Some(old) = net_policy(&container) else {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} has network mode NONE: it has no network whose egress could change"
            )));
        };
        let new = NetPolicy {
            egress,
            ports: old.ports.clone(),
        };
        new.validate()?;
        let encoded = serde_json::to_vec(&new)
            .map_err(|e| Error::Internal(format!("encoding the network policy: {e}")))?;
        let key = self.host_key(id.as_str());
        let live = match self.guard_of(&container) {
            Some(guard) if self.net.is_attached(&key) => {
                let resolvers = self.sandbox_resolvers(id).await;
                self.net
                    .update_egress(&key, &guard, &new.egress, &resolvers)
                    .await?;
                Some((guard, resolvers))
            }
            _ => None,
        };
        let update = crate::runtime::ContainerUpdate {
            extensions: vec![(EXT_NET_POLICY.to_string(), encoded)],
            ..Default::default()
        };
        if let Err(e) = self.cd.update_container(id.as_str(), update).await {
            let cleanup = match &live {
                Some((guard, resolvers)) => {
                    self.net
                        .update_egress(&key, guard, &old.egress, resolvers)
                        .await
                }
                None => Ok(()),
            };
            return Err(e.with_cleanup(cleanup));
        }
        tracing::info!(sandbox_id = %id, running = live.is_some(), "egress policy replaced");
        Ok(())
    }

    /// FAILED_PRECONDITION when another attached sandbox forwards one of `ports` already.
    async fn check_ports_free(
        &self,
        id: &SandboxId,
        ports: &[crate::net::cni::PortMapping],
    ) -> Result<()> {
        // Host ports are the node's: every tenant's sandboxes are looked at.
        for (own, c) in self.every_tenants_containers().await? {
            if own && c.id == id.as_str() || !c.labels.contains_key(L_NET_IP) {
                continue;
            }
            let Some(other) = net_policy(&c) else {
                continue;
            };
            for p in ports {
                let clash = other.ports.iter().find(|q| {
                    q.host_port == p.host_port
                        && q.protocol == p.protocol
                        && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
                });
                if clash.is_some() {
                    // Another tenant's sandbox is not named: its existence is not ours to tell.
                    let to = if own {
                        format!("sandbox {}", c.id)
                    } else {
                        "another sandbox".to_string()
                    };
                    return Err(Error::FailedPrecondition(format!(
                        "host port {}/{} is already forwarded to {to}",
                        p.host_port,
                        crate::net::policy::protocol_name(p.protocol),
                    )));
                }
            }
        }
        Ok(())
    }

    /// The sandboxes of every tenant on the node (this one's flagged `true`): for what is
    /// the node's rather than a tenant's, like host ports.
    async fn every_tenants_containers(&self) -> Result<Vec<(bool, Container)>> {
        let mut all: Vec<(bool, Container)> = self
            .managed_containers()
            .await?
            .into_iter()
            .map(|c| (true, c))
            .collect();
        let base = self.scope.base();
        let mut namespaces: Vec<String> = self
            .cd
            .namespaces_labelled(super::tenancy::NS_INSTANCE, base)
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        namespaces.push(base.to_string());
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces.iter().filter(|ns| *ns != self.cd.namespace()) {
            let others = self
                .cd
                .in_namespace(ns)
                .containers_labelled(L_MANAGED, "true")
                .await?;
            all.extend(
                others
                    .into_iter()
                    .filter(|c| !c.labels.contains_key(L_POOL))
                    .map(|c| (false, c)),
            );
        }
        Ok(all)
    }

    /// Tears down sandbox `id`'s network if it has one (see [`Network::detach`]) and forgets
    /// its address.
    pub(super) async fn detach_network(
        &self,
        id: &str,
        container: Option<&Container>,
    ) -> Result<()> {
        let key = self.host_key(id);
        if !self.net.is_attached(&key) {
            return Ok(());
        }
        let cached: Option<serde_json::Value> = container
            .and_then(|c| c.labels.get(L_NET_RESULT))
            .and_then(|r| serde_json::from_str(r).ok());
        let ports = container
            .and_then(net_policy)
            .map(|p| p.ports)
            .unwrap_or_default();
        self.net.detach(&key, cached.as_ref(), &ports).await?;
        match self
            .update_labels(
                id,
                &[
                    (L_NET_IP, None),
                    (L_NET_GATEWAY, None),
                    (L_NET_RESULT, None),
                    (L_NET_GUARD, None),
                ],
            )
            .await
        {
            // The container is gone with its labels: nothing left to forget.
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Tears down the networks of BRIDGE sandboxes whose task is gone or has exited. Exit
    /// events ([`Manager::watch_exits`]) do this at once; this sweep catches what they miss
    /// (sandboxd down at the time, a dropped subscription, an interrupted create).
    pub async fn reconcile_networks(&self) -> Result<()> {
        // Only this tenant's: the others' are their managers' to settle.
        let attached: Vec<SandboxId> = self
            .net
            .attached_ids()
            .iter()
            .filter_map(|key| self.scope.id_of_key(key))
            .collect();
        if attached.is_empty() {
            return Ok(());
        }
        let live = self.live_task_ids().await?;
        // Each sandbox on its own: one that fails does not keep the others' networks up.
        let mut failed = None;
        for id in attached.iter().filter(|id| live.contains(id.as_str())) {
            if let Err(e) = self.repair_firewall(id).await {
                tracing::warn!(sandbox_id = %id, error = %e, "checking a sandbox's firewall rules failed; the sweep retries");
                failed.get_or_insert(e);
            }
        }
        for id in attached.iter().filter(|id| !live.contains(id.as_str())) {
            if let Err(e) = self.settle_network(id).await {
                tracing::warn!(sandbox_id = %id, error = %e, "tearing down a network failed; the sweep retries");
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Puts back running sandbox `id`'s firewall rules (and the base rules) if someone removed
    /// or changed them, and says so in the log. A sandbox busy with another operation is
    /// left to the next sweep.
    async fn repair_firewall(&self, id: &SandboxId) -> Result<()> {
        let Ok(_guard) = self
            .locks
            .lock_within(id.as_str(), std::time::Duration::ZERO)
            .await
        else {
            return Ok(());
        };
        let Some(container) = self.container(id).await? else {
            return Ok(());
        };
        let (Some(guard), Some(policy)) = (self.guard_of(&container), net_policy(&container))
        else {
            return Ok(());
        };
        let key = self.host_key(id.as_str());
        if !self.net.is_attached(&key) {
            return Ok(());
        }
        let resolvers = self.sandbox_resolvers(id).await;
        let repair = self
            .net
            .repair_firewall(&key, &guard, &policy.egress, &resolvers)
            .await?;
        if repair == crate::net::firewall::Repair::Restored {
            tracing::warn!(sandbox_id = %id, "firewall rules were missing or changed; restored");
        }
        Ok(())
    }

    /// What ties attached sandbox `c` to its firewall rules: as recorded, or (attached by an
    /// older sandboxd) from its cached CNI result.
    fn guard_of(&self, c: &Container) -> Option<crate::net::firewall::Guard> {
        net_guard(c).or_else(|| {
            let raw = serde_json::from_str(c.labels.get(L_NET_RESULT)?).ok()?;
            self.net.guard_from_result(&raw)
        })
    }

    /// The resolvers sandbox `id` was given (its resolv.conf's nameservers).
    pub(super) async fn sandbox_resolvers(&self, id: &SandboxId) -> Vec<std::net::IpAddr> {
        let path = self.files_dir(id).join("resolv.conf");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => crate::net::nameservers(&text),
            Err(_) => self.net.resolv_conf().nameservers,
        }
    }

    /// Ids of sandboxes whose PID 1 may be alive (running, paused, or not known to be dead).
    async fn live_task_ids(&self) -> Result<HashSet<String>> {
        Ok(self
            .cd
            .tasks()
            .await?
            .into_iter()
            .filter(|(_, t)| t.state.may_be_alive())
            .map(|(id, _)| id)
            .collect())
    }

    /// Detaches sandbox `id`'s network unless its task runs (checked under its lock, so a
    /// start in progress is never disturbed).
    pub(super) async fn settle_network(&self, id: &SandboxId) -> Result<()> {
        let _guard = self.locks.lock(id.as_str()).await?;
        if !self.net.is_attached(&self.host_key(id.as_str())) {
            return Ok(());
        }
        if self
            .task(id.as_str())
            .await?
            .is_some_and(|t| t.state.may_be_alive())
        {
            return Ok(());
        }
        let container = self.container(id).await?;
        tracing::info!(sandbox_id = %id, "tearing down the network of an exited sandbox");
        self.detach_network(id.as_str(), container.as_ref()).await
    }
}

/// What [`Manager::run_task`] needs to attach a BRIDGE sandbox's network.
pub(super) struct NetCtx<'a> {
    pub(super) policy: &'a NetPolicy,
    pub(super) hostname: &'a str,
}

/// Writes the sandbox's /etc/hosts (naming its hostname and, on a bridge, its `ip`),
/// /etc/hostname and /etc/resolv.conf sources.
pub(super) async fn write_etc_files(
    dir: &std::path::Path,
    hostname: &str,
    ip: Option<std::net::Ipv4Addr>,
    resolv: &str,
) -> Result<()> {
    let dir = dir.to_path_buf();
    let hostname = hostname.to_string();
    let resolv = resolv.to_string();
    sys::blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let own = ip.map_or_else(|| "127.0.1.1".to_string(), |ip| ip.to_string());
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{own}\t{hostname}\n"
        );
        let files = [
            ("hosts", hosts),
            ("hostname", format!("{hostname}\n")),
            ("resolv.conf", resolv),
        ];
        for (name, content) in files {
            let path = dir.join(name);
            std::fs::write(&path, content)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    })
    .await
}
