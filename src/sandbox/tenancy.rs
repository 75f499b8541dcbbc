//! Tenants walled off from each other: each tenant's sandboxes, snapshots and images live in a
//! containerd namespace of its own, and each has its own [`Manager`] acting there.
//!
//! Why namespaces rather than a label scope: containerd itself then keeps tenants apart.
//! Every read, list, delete and garbage collection of containers, tasks, snapshots, image
//! records and leases is confined to one namespace, so no code path of ours can reach another
//! tenant's object by a forgotten filter, and the same sandbox or snapshot id can exist in two
//! tenants. Content blobs are shared by containerd between namespaces (its default sharing
//! policy), but each namespace holds its own references to them: a DeleteImage in one never
//! takes a blob another still references.
//!
//! The default tenant keeps the configured `--namespace`, so an existing node and its
//! sandboxes carry on as before. Another tenant `T` gets `<namespace>.tenant.<T>` (containerd's
//! identifier rule allows `.` between runs of letters and digits, as tenant names do; a name
//! that would pass containerd's 76-byte limit is replaced by a hash). Every namespace sandboxd
//! makes carries the labels [`NS_INSTANCE`] (the configured namespace) and [`NS_TENANT`], so a
//! restarted sandboxd finds every tenant's namespace and recovers it.
//!
//! Host-side names (cgroup, network namespace file and with it the CNI container id, the
//! address lease and the firewall chain, the per-sandbox files and exec FIFOs) are a sandbox's
//! "host key" ([`Scope::host_key`]): the id itself for the default tenant, as before, and
//! `T<12 hex of the tenant's sha256>.<id>` for another. Sandbox ids are lower case, so no id of
//! the default tenant ever looks like another tenant's key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::manager::Manager;
use super::model::SandboxId;
use crate::caller::Tenant;
use crate::error::Result;

/// Label on each namespace sandboxd made: the configured `--namespace` it belongs to.
pub const NS_INSTANCE: &str = "sandboxd.io/instance";
/// Label on each namespace sandboxd made: the tenant whose objects it holds.
pub const NS_TENANT: &str = "sandboxd.io/tenant";
/// containerd's limit on the length of a namespace name.
const MAX_NAMESPACE: usize = 76;

/// Whose sandboxes a manager holds, and the names they have in containerd and on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    tenant: Tenant,
    namespace: String,
    /// The configured namespace: the default tenant's, and the mark on every tenant's.
    base: String,
    /// Prefix of every host key; empty for the default tenant.
    key_prefix: String,
}

impl Scope {
    /// The default tenant's scope: the configured namespace, host keys are the ids.
    pub fn default_tenant(namespace: &str) -> Scope {
        Scope {
            tenant: Tenant::default_tenant(),
            namespace: namespace.to_string(),
            base: namespace.to_string(),
            key_prefix: String::new(),
        }
    }

    /// `tenant`'s scope on a node whose configured namespace is `base`.
    pub fn of(tenant: &Tenant, base: &str) -> Scope {
        if tenant.as_str() == Tenant::DEFAULT {
            return Scope::default_tenant(base);
        }
        let hash = crate::util::sha256_hex(tenant.as_str().as_bytes());
        let mut namespace = format!("{base}.tenant.{tenant}");
        if namespace.len() > MAX_NAMESPACE {
            namespace = format!("{base}.tenant.{}", &hash[..32]);
        }
        if namespace.len() > MAX_NAMESPACE {
            let both = crate::util::sha256_hex(format!("{base}\n{tenant}").as_bytes());
            namespace = format!("sandboxd-tenant-{}", &both[..40]);
        }
        Scope {
            tenant: tenant.clone(),
            namespace,
            base: base.to_string(),
            key_prefix: format!("T{}.", &hash[..12]),
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The containerd namespace holding the tenant's objects.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The configured namespace (the default tenant's), whose name marks every tenant's.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether this is the default tenant's scope.
    pub fn is_default(&self) -> bool {
        self.key_prefix.is_empty()
    }

    /// The host-side name of the tenant's sandbox `id`.
    pub fn host_key(&self, id: &str) -> String {
        format!("{}{id}", self.key_prefix)
    }

    /// The id of the tenant's sandbox whose host key is `key`; `None` for another tenant's.
    pub fn id_of_key(&self, key: &str) -> Option<SandboxId> {
        let id = key.strip_prefix(&self.key_prefix)?;
        SandboxId::parse("sandbox_id", id).ok()
    }

    /// The labels that mark the tenant's namespace as sandboxd's.
    fn labels(&self, base: &str) -> HashMap<String, String> {
        HashMap::from([
            (NS_INSTANCE.to_string(), base.to_string()),
            (NS_TENANT.to_string(), self.tenant.to_string()),
        ])
    }
}

/// Every tenant's manager: the default tenant's made at start, another's when the tenant
/// first calls or when recovery finds its namespace.
#[derive(Debug)]
pub struct Tenancy {
    default: Arc<Manager>,
    base: String,
    others: Mutex<BTreeMap<Tenant, Arc<Manager>>>,
    /// Ends the exit watchers of the managers made later; `None`: none is started (tests).
    stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Tenancy {
    /// Tenants on the node whose default tenant's manager is `default` (acting in the
    /// configured namespace). With `stop`, each manager made later watches its sandboxes'
    /// exits until `stop` changes; the default's watcher is the caller's to start.
    pub fn new(
        default: Arc<Manager>,
        stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Arc<Tenancy> {
        Arc::new(Tenancy {
            base: default.backend().namespace().to_string(),
            default,
            others: Mutex::default(),
            stop,
        })
    }

    /// The default tenant's manager.
    pub fn default_manager(&self) -> &Arc<Manager> {
        &self.default
    }

    /// `tenant`'s manager; its namespace is made (and labelled) the first time.
    pub async fn manager(&self, tenant: &Tenant) -> Result<Arc<Manager>> {
        if tenant.as_str() == Tenant::DEFAULT {
            return Ok(self.default.clone());
        }
        if let Some(m) = self.known(tenant) {
            return Ok(m);
        }
        let scope = Scope::of(tenant, &self.base);
        // Made before the manager is published: a manager is never seen without its namespace.
        self.default
            .backend()
            .ensure_namespace(scope.namespace(), &scope.labels(&self.base))
            .await?;
        Ok(self.adopt(scope))
    }

    fn known(&self, tenant: &Tenant) -> Option<Arc<Manager>> {
        let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        others.get(tenant).cloned()
    }

    /// The manager of `scope`, made (and its exit watcher started) if there is none yet.
    fn adopt(&self, scope: Scope) -> Arc<Manager> {
        let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = others.get(scope.tenant()) {
            return m.clone();
        }
        let cd = self.default.backend().in_namespace(scope.namespace());
        let tenant = scope.tenant().clone();
        let manager = Arc::new(self.default.for_scope(cd, scope));
        if let Some(stop) = &self.stop {
            tokio::spawn(manager.clone().watch_exits(stop.clone()));
        }
        others.insert(tenant, manager.clone());
        manager
    }

    /// Every tenant's manager known so far, the default's first.
    pub fn managers(&self) -> Vec<Arc<Manager>> {
        let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.default.clone())
            .chain(others.values().cloned())
            .collect()
    }

    /// Finds the namespaces of every tenant that has one (labelled by an earlier run) and
    /// makes their managers. The default tenant's namespace gets the labels too.
    pub async fn discover(&self) -> Result<()> {
        let cd = self.default.backend();
        let default = Scope::default_tenant(&self.base);
        cd.ensure_namespace(&self.base, &default.labels(&self.base))
            .await?;
        for (name, labels) in cd.namespaces_labelled(NS_INSTANCE, &self.base).await? {
            let Some(tenant) = labels.get(NS_TENANT).and_then(|t| Tenant::new(t).ok()) else {
                tracing::warn!(namespace = %name, "a namespace of this sandboxd names no valid tenant; left alone");
                continue;
            };
            if tenant.as_str() == Tenant::DEFAULT {
                continue;
            }
            let scope = Scope::of(&tenant, &self.base);
            if scope.namespace() != name {
                tracing::warn!(namespace = %name, %tenant, "a namespace whose name does not match its tenant; left alone");
                continue;
            }
            self.adopt(scope);
        }
        Ok(())
    }

    /// Before serving (after a start or a containerd reconnect): finds every tenant's
    /// namespace and recovers each (see [`Manager::recover`]), the default tenant's first
    /// (it also does the node-wide part). One tenant that fails does not keep the others
    /// from being recovered; the first failure is returned, so the whole is tried again.
    pub async fn recover(&self) -> Result<()> {
        self.discover().await?;
        let mut failed = None;
        for m in self.managers() {
            if let Err(e) = m.recover().await {
                tracing::warn!(tenant = %m.tenant(), error = %e, "recovering a tenant's sandboxes failed");
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The TTL sweep of every tenant; how many sandboxes were deleted.
    pub async fn reap_expired(&self) -> Result<usize> {
        let mut reaped = 0;
        let mut failed = None;
        for m in self.managers() {
            match m.reap_expired().await {
                Ok(n) => reaped += n,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(reaped), Err)
    }

    /// The network sweep of every tenant (see [`Manager::reconcile_networks`]).
    pub async fn reconcile_networks(&self) -> Result<()> {
        let mut failed = None;
        for m in self.managers() {
            if let Err(e) = m.reconcile_networks().await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> Tenant {
        Tenant::new(name).unwrap()
    }

    #[test]
    fn the_default_tenant_keeps_the_configured_namespace_and_ids_as_keys() {
        let s = Scope::of(&tenant("default"), "sandboxd");
        assert_eq!(s.namespace(), "sandboxd");
        assert_eq!(s.host_key("box-1"), "box-1");
        assert_eq!(s.id_of_key("box-1").unwrap().as_str(), "box-1");
        assert!(s.is_default());
    }

    #[test]
    fn another_tenant_gets_its_own_namespace_and_keys_no_default_id_can_take() {
        let alice = Scope::of(&tenant("alice"), "sandboxd");
        let bob = Scope::of(&tenant("bob"), "sandboxd");
        let default = Scope::default_tenant("sandboxd");
        assert_eq!(alice.namespace(), "sandboxd.tenant.alice");
        assert_ne!(alice.host_key("box-1"), bob.host_key("box-1"));
        let key = alice.host_key("box-1");
        assert!(key.starts_with('T') && key.ends_with(".box-1"), "{key}");
        // Each scope recognises only its own keys.
        assert_eq!(alice.id_of_key(&key).unwrap().as_str(), "box-1");
        assert!(bob.id_of_key(&key).is_none());
        assert!(default.id_of_key(&key).is_none());
        assert!(alice.id_of_key("box-1").is_none());
    }

    #[test]
    fn long_names_still_make_valid_namespaces() {
        let long = "a".repeat(63);
        let s = Scope::of(&tenant(&long), "sandboxd");
        assert!(s.namespace().len() <= MAX_NAMESPACE, "{}", s.namespace());
        assert_ne!(
            s.namespace(),
            Scope::of(&tenant(&"b".repeat(63)), "sandboxd").namespace()
        );
        let base = "n".repeat(60);
        let s = Scope::of(&tenant(&long), &base);
        assert!(s.namespace().len() <= MAX_NAMESPACE, "{}", s.namespace());
        // containerd's identifier rule: runs of letters and digits joined by single . _ -
        assert!(s
            .namespace()
            .split(['.', '_', '-'])
            .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_alphanumeric())));
    }
}
