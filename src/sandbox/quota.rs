//! A tenant's quotas (`max_sandboxes`, `max_memory_bytes`, `max_cpu_millis` in the tenants
//! file), held at create and fork.
//!
//! Use is counted from containerd (the tenant's sandboxes and the limits that apply to them,
//! defaults included, as their records hold them) plus what creates in progress in this process
//! have reserved. The count and the reservation happen under one lock per tenant, and a
//! reservation lives until its create has finished (made or undone), so concurrent creates
//! never overshoot a quota. Nothing is cached: after a restart, or a quota changed by a
//! reload of the tenants file, the next create counts afresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::manager::Manager;
use super::model::*;
use super::record::{L_CPU, L_MEMORY};
use crate::error::{Error, Result};
use crate::tenants::Quotas;

/// What counts against a tenant's quotas: sandboxes and the sums of their limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sandboxes.
    pub sandboxes: u64,
    /// Sum of memory limits, bytes.
    pub memory_bytes: u64,
    /// Sum of CPU limits, millicores.
    pub cpu_millis: u64,
}

impl Usage {
    /// One sandbox with the limits `r` (the ones that apply; an unlimited one counts 0).
    pub fn of(r: &Resources) -> Usage {
        Usage {
            sandboxes: 1,
            memory_bytes: r.memory_bytes.unwrap_or(0).max(0) as u64,
            cpu_millis: r.cpu_millis.unwrap_or(0).max(0) as u64,
        }
    }

    fn add(self, o: Usage) -> Usage {
        Usage {
            sandboxes: self.sandboxes.saturating_add(o.sandboxes),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
        }
    }
}

/// RESOURCE_EXHAUSTED when `adding` to a tenant's `used` passes one of `quotas`, naming the
/// limit, its value and the use; INVALID_ARGUMENT when the new sandbox has no limit of a kind
/// the tenant has a quota of (it could use any amount).
pub fn check(
    tenant: &crate::caller::Tenant,
    quotas: &Quotas,
    used: Usage,
    adding: &Resources,
) -> Result<()> {
    if quotas.max_memory_bytes.is_some() && adding.memory_bytes.is_none() {
        return Err(Error::invalid(
            "resources.memory_bytes",
            format!(
                "tenant {tenant} has a memory quota (max_memory_bytes) and the server sets no \
                 default memory limit (--default-memory): ask for a memory limit"
            ),
        ));
    }
    if quotas.max_cpu_millis.is_some() && adding.cpu_millis.is_none() {
        return Err(Error::invalid(
            "resources.cpu_millis",
            format!(
                "tenant {tenant} has a CPU quota (max_cpu_millis) and the server sets no \
                 default CPU limit (--default-cpu-millis): ask for a CPU limit"
            ),
        ));
    }
    let add = Usage::of(adding);
    let limits = [
        (
            "max_sandboxes",
            quotas.max_sandboxes,
            used.sandboxes,
            add.sandboxes,
            "",
        ),
        (
            "max_memory_bytes",
            quotas.max_memory_bytes,
            used.memory_bytes,
            add.memory_bytes,
            " bytes",
        ),
        (
            "max_cpu_millis",
            quotas.max_cpu_millis,
            used.cpu_millis,
            add.cpu_millis,
            " millicores",
        ),
    ];
    for (name, limit, used, add, unit) in limits {
        let Some(limit) = limit else { continue };
        if used.saturating_add(add) > limit {
            return Err(Error::ResourceExhausted(format!(
                "quota exceeded: tenant {tenant} has {name} = {limit}{unit} and uses \
                 {used}{unit}; this sandbox needs {add}{unit} more"
            )));
        }
    }
    Ok(())
}

/// Creates in progress of one tenant and what each will use.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Held while use is counted and a reservation made.
    counting: tokio::sync::Mutex<()>,
    held: Arc<Mutex<HashMap<u64, (String, Usage)>>>,
    next: AtomicU64,
}

/// A create's reservation against its tenant's quotas; given back when dropped.
#[derive(Debug)]
pub(super) struct Reservation {
    held: Arc<Mutex<HashMap<u64, (String, Usage)>>>,
    ticket: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(&self.ticket);
    }
}

impl Manager {
    /// Reserves what sandbox `id` with the limits `applied` will use against `quotas`, or
    /// fails (see [`check`]). `None` when the tenant has no quota: nothing is counted.
    pub(super) async fn reserve(
        &self,
        id: &SandboxId,
        applied: &Resources,
        quotas: &Quotas,
    ) -> Result<Option<Reservation>> {
        if quotas == &Quotas::default() {
            return Ok(None);
        }
        let _counting = self.ledger.counting.lock().await;
        let used = self.usage().await?;
        check(self.tenant(), quotas, used, applied)?;
        let ticket = self.ledger.next.fetch_add(1, Ordering::Relaxed);
        let mut held = self.ledger.held.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(ticket, (id.to_string(), Usage::of(applied)));
        Ok(Some(Reservation {
            held: self.ledger.held.clone(),
            ticket,
        }))
    }

    /// What the tenant uses now: its sandboxes (warm-pool ones not yet claimed aside) and the
    /// creates in progress, a create whose sandbox exists already counted once.
    pub async fn usage(&self) -> Result<Usage> {
        let containers = self.managed_containers().await?;
        let mut used = Usage::default();
        for c in &containers {
            let num = |k: &str| c.labels.get(k).and_then(|v| v.parse::<i64>().ok());
            // A record from before limits were recorded: the defaults applied to it.
            let applied = self.applied_limits(Resources {
                cpu_millis: num(L_CPU),
                memory_bytes: num(L_MEMORY),
                pids_limit: None,
            });
            used = used.add(Usage::of(&applied));
        }
        let held = self.ledger.held.lock().unwrap_or_else(|p| p.into_inner());
        for (id, reserved) in held.values() {
            if !containers.iter().any(|c| &c.id == id) {
                used = used.add(*reserved);
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> crate::caller::Tenant {
        crate::caller::Tenant::new("alice").unwrap()
    }

    fn limits(cpu: i64, mem: i64) -> Resources {
        Resources {
            cpu_millis: Some(cpu),
            memory_bytes: Some(mem),
            pids_limit: None,
        }
    }

    #[test]
    fn a_create_within_every_quota_passes() {
        let q = Quotas {
            max_sandboxes: Some(2),
            max_memory_bytes: Some(2 << 30),
            max_cpu_millis: Some(2000),
        };
        let used = Usage::of(&limits(1000, 1 << 30));
        assert!(check(&tenant(), &q, used, &limits(1000, 1 << 30)).is_ok());
    }

    #[test]
    fn each_limit_is_named_with_its_value_and_use() {
        let used = Usage {
            sandboxes: 3,
            memory_bytes: 3 << 30,
            cpu_millis: 1500,
        };
        let cases = [
            (
                Quotas {
                    max_sandboxes: Some(3),
                    ..Default::default()
                },
                "max_sandboxes = 3 and uses 3",
            ),
            (
                Quotas {
                    max_memory_bytes: Some(4 << 30),
                    ..Default::default()
                },
                "max_memory_bytes = 4294967296 bytes and uses 3221225472 bytes",
            ),
            (
                Quotas {
                    max_cpu_millis: Some(2000),
                    ..Default::default()
                },
                "max_cpu_millis = 2000 millicores and uses 1500 millicores",
            ),
        ];
        for (q, expected) in cases {
            let e = check(&tenant(), &q, used, &limits(1000, 2 << 30)).unwrap_err();
            assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
            assert!(e.to_string().contains(expected), "{e}");
            assert!(e.to_string().contains("tenant alice"), "{e}");
        }
    }

    #[test]
    fn an_unlimited_sandbox_under_a_quota_of_its_kind_is_invalid() {
        let q = Quotas {
            max_memory_bytes: Some(1 << 30),
            ..Default::default()
        };
        let unlimited = Resources {
            cpu_millis: Some(100),
            ..Default::default()
        };
        let e = check(&tenant(), &q, Usage::default(), &unlimited).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains("resources.memory_bytes"), "{e}");
    }
}
