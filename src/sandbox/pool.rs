//! The warm pool: sandboxes created and started ahead of demand, so that a CreateSandbox that
//! asks for nothing a running sandbox cannot still become costs a label update instead of a
//! runc create and start.
//!
//! A pooled sandbox is an ordinary sandbox of the configured image with an idle PID 1, a
//! generated id (which is also its hostname) and the `sandboxd.io/pool` label, which hides it
//! from every RPC. A create qualifies when it sets no id, command, env, working dir, user,
//! hostname, resources or network, and asks for a started sandbox: it then gets a pooled one,
//! its labels and TTL applied, and the pool is topped up in the background. Everything lives
//! in containerd, so a restarted sandboxd adopts the pooled sandboxes still running and deletes
//! the rest (and those of images no longer configured).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::Container;
use containerd_client::types::v1::Status as TaskStatus;

use super::manager::{L_EXPIRES, L_MANIFEST_REF, L_POOL};
use super::model::*;
use crate::error::{Error, Result};
use crate::image::ImageRef;

/// How long a failed refill waits before trying again.
const REFILL_BACKOFF: Duration = Duration::from_secs(5);

/// The pool's bookkeeping: which pooled sandboxes are ready, per image name.
#[derive(Debug, Default)]
pub(super) struct WarmPool {
    /// Configured images and how many ready sandboxes each should have.
    sizes: Vec<(ImageRef, usize)>,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: HashMap<String, VecDeque<String>>,
    filling: HashMap<String, bool>,
}

impl WarmPool {
    pub(super) fn new(sizes: Vec<(ImageRef, usize)>) -> WarmPool {
        WarmPool {
            sizes,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state is a few plain collections: a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn size_of(&self, image: &str) -> Option<usize> {
        self.sizes
            .iter()
            .find(|(r, _)| r.name() == image)
            .map(|(_, n)| *n)
    }

    fn take(&self, image: &str) -> Option<String> {
        self.state().ready.get_mut(image)?.pop_front()
    }

    fn ready_count(&self, image: &str) -> usize {
        self.state().ready.get(image).map_or(0, VecDeque::len)
    }

    fn push(&self, image: &str, id: String) {
        self.state()
            .ready
            .entry(image.to_string())
            .or_default()
            .push_back(id);
    }

    /// Marks `image` as being filled; false if a fill already runs.
    fn start_filling(&self, image: &str) -> bool {
        let mut st = self.state();
        let filling = st.filling.entry(image.to_string()).or_default();
        !std::mem::replace(filling, true)
    }

    fn stop_filling(&self, image: &str) {
        self.state().filling.insert(image.to_string(), false);
    }
}

/// Whether `spec` asks for nothing a pooled sandbox of its image does not already have.
fn qualifies(spec: &CreateSpec) -> bool {
    spec.id_generated
        && spec.hostname == spec.id.as_str()
        && matches!(spec.source, Source::Image(_))
        && spec.command.is_empty()
        && spec.env.is_empty()
        && spec.working_dir.is_none()
        && spec.user.is_none()
        && spec.resources == Resources::default()
        && spec.network == NetworkMode::None
        && spec.start
        && spec.pool.is_none()
}

impl super::Manager {
    /// A pooled sandbox made into the one `spec` asks for, if `spec` qualifies and one is
    /// ready; `None` sends the caller down the cold path.
    pub(super) async fn claim_pooled(
        self: &Arc<Self>,
        spec: &CreateSpec,
    ) -> Result<Option<Sandbox>> {
        let Source::Image(image) = &spec.source else {
            return Ok(None);
        };
        let name = image.name();
        if !qualifies(spec) || self.pool.size_of(&name).is_none() {
            return Ok(None);
        }
        while let Some(id) = self.pool.take(&name) {
            self.refill(image.clone());
            let id = SandboxId::parse("sandbox_id", &id)?;
            match self.make_pooled_yours(&id, image, spec).await {
                Ok(Some(sandbox)) => return Ok(Some(sandbox)),
                Ok(None) => {
                    tracing::info!(sandbox_id = %id, "discarding a stale pooled sandbox");
                    self.discard_pooled(id);
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "claiming a pooled sandbox failed; discarding it");
                    self.discard_pooled(id);
                }
            }
        }
        self.refill(image.clone());
        Ok(None)
    }

    /// Turns pooled sandbox `id` into the caller's: its labels and TTL, no pool label. `None`
    /// when it no longer fits (stopped, or its image was pulled anew since it was made).
    async fn make_pooled_yours(
        &self,
        id: &SandboxId,
        image: &ImageRef,
        spec: &CreateSpec,
    ) -> Result<Option<Sandbox>> {
        let _guard = self.lock(id.as_str()).await;
        let (container, task, current) = tokio::try_join!(
            self.any_container(id),
            self.task(id.as_str()),
            crate::image::resolve(self.containerd(), image),
        )?;
        let Some(container) = container.filter(|c| c.labels.contains_key(L_POOL)) else {
            return Ok(None);
        };
        let running = task.is_some_and(|t| t.status == TaskStatus::Running as i32);
        let same_image = container.labels.get(L_MANIFEST_REF) == Some(&current.manifest_digest);
        if !running || !same_image {
            return Ok(None);
        }
        let now = SystemTime::now();
        let mut changes: Vec<(&str, Option<String>)> = vec![
            (L_POOL, None),
            (super::manager::L_CLAIMED, Some(crate::util::rfc3339(now))),
        ];
        if let Some(ttl) = spec.ttl {
            changes.push((L_EXPIRES, Some(crate::util::rfc3339(now + ttl))));
        }
        for (k, v) in &spec.labels {
            changes.push((k.as_str(), Some(v.clone())));
        }
        self.update_labels(id.as_str(), &changes).await?;
        tracing::info!(sandbox_id = %id, image = %image, "served create from the warm pool");
        self.get(id).await.map(Some)
    }

    /// Deletes a pooled sandbox in the background.
    fn discard_pooled(self: &Arc<Self>, id: SandboxId) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.delete_any(id.clone()).await {
                tracing::warn!(sandbox_id = %id, error = %e, "deleting a pooled sandbox failed");
            }
        });
    }

    /// Tops the pool of `image` up to its size in the background (one filler per image).
    pub(super) fn refill(self: &Arc<Self>, image: ImageRef) {
        let name = image.name();
        let Some(want) = self.pool.size_of(&name) else {
            return;
        };
        if self.pool.ready_count(&name) >= want || !self.pool.start_filling(&name) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            while this.pool.ready_count(&name) < want {
                let id = SandboxId::generate();
                let spec = CreateSpec {
                    hostname: id.to_string(),
                    id: id.clone(),
                    id_generated: true,
                    source: Source::Image(image.clone()),
                    command: vec![],
                    env: Default::default(),
                    working_dir: None,
                    user: None,
                    labels: Default::default(),
                    resources: Resources::default(),
                    network: NetworkMode::None,
                    net_policy: Default::default(),
                    start: true,
                    ttl: None,
                    pool: Some(name.clone()),
                };
                match this.create(spec).await {
                    Ok(_) => this.pool.push(&name, id.to_string()),
                    Err(e) => {
                        tracing::warn!(image = %name, error = %e, "filling the warm pool failed; retrying later");
                        tokio::time::sleep(REFILL_BACKOFF).await;
                    }
                }
            }
            this.pool.stop_filling(&name);
        });
    }

    /// After a restart: adopts the pooled sandboxes that still run and belong to a configured
    /// image (up to its size), deletes the others, and starts filling every configured pool.
    pub(super) async fn adopt_pool(self: &Arc<Self>, containers: &[Container]) -> Result<()> {
        for c in containers {
            let Some(image) = c.labels.get(L_POOL) else {
                continue;
            };
            let id = SandboxId::parse("sandbox_id", &c.id)?;
            let running = self
                .task(&c.id)
                .await?
                .is_some_and(|t| t.status == TaskStatus::Running as i32);
            let room = self
                .pool
                .size_of(image)
                .is_some_and(|n| self.pool.ready_count(image) < n);
            if running && room {
                self.pool.push(image, c.id.clone());
            } else {
                tracing::info!(sandbox_id = %id, image = %image, "deleting a pooled sandbox no longer wanted");
                self.delete_any(id).await?;
            }
        }
        for (image, _) in self.pool.sizes.clone() {
            self.refill(image);
        }
        Ok(())
    }
}

/// Parses `--warm-pool` entries, `IMAGE=COUNT`.
pub fn parse_pool(entries: &[String]) -> Result<Vec<(ImageRef, usize)>> {
    entries
        .iter()
        .map(|e| {
            let (image, n) = e
                .rsplit_once('=')
                .ok_or_else(|| Error::invalid("warm_pool", format!("{e:?} is not IMAGE=COUNT")))?;
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| Error::invalid("warm_pool", format!("{e:?}: COUNT must be 1-64")))?;
            Ok((ImageRef::parse("warm_pool", image)?, n))
        })
        .collect()
}
