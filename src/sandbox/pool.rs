//! The warm pool: sandboxes created and started ahead of demand, so that a CreateSandbox that
//! asks for nothing a running sandbox cannot still become costs a label update instead of a
//! runc create and start.
//!
//! A pooled sandbox is an ordinary sandbox of the configured image with an idle PID 1, a
//! generated id (which is also its hostname) and the `sandboxd.io/pool` label, which hides it
//! from every RPC. A create qualifies when it sets no id, command, hostname or network, and asks
//! for a started sandbox: it then gets a pooled one, with its labels and TTL, its env, working
//! dir and user in the stored spec and its limits on the running cgroup, and the pool is topped
//! up in the background. Everything lives in containerd, so a restarted sandboxd adopts the
//! pooled sandboxes still running and deletes the rest (and those of images no longer
//! configured).
//!
//! The pool is the default tenant's alone. A pooled sandbox lives in the default tenant's
//! containerd namespace, and containerd cannot move a container between namespaces; pools
//! per tenant would keep warm sandboxes for callers that may never come. So another tenant's
//! manager has an empty pool and its creates take the ordinary path: a claim can never hand one
//! tenant a sandbox that another tenant's namespace held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::model::*;
use super::record::{resource_labels, L_CLAIMED, L_EXPIRES, L_MANIFEST_REF, L_POOL};
use super::retry;
use crate::error::{Error, Result};
use crate::image::ImageRef;
use crate::runtime::spec::{self, Overrides, User};
use crate::runtime::{Container, TaskState};
use crate::sys;

/// Mode of a working directory a claim makes (runc's, at a cold start).
const WORKING_DIR_MODE: u32 = 0o755;
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

    /// Returns `id`, taken but not used, to the front of `image`'s queue.
    fn put_back(&self, image: &str, id: String) {
        self.state()
            .ready
            .entry(image.to_string())
            .or_default()
            .push_front(id);
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

/// Whether `spec` asks for nothing a pooled sandbox of its image cannot still become: its id,
/// hostname, PID 1 and network are fixed when it starts; environment, working directory, user
/// and limits are set when it is claimed.
fn qualifies(spec: &CreateSpec) -> bool {
    spec.id_generated
        && spec.hostname == spec.id.as_str()
        && matches!(spec.source, Source::Image(_))
        && spec.command.is_empty()
        && spec.network == NetworkMode::None
        && spec.start
        && spec.pool.is_none()
}

/// How a claim of one pooled sandbox went.
enum Claim {
    /// It is the caller's now.
    Served(Box<Sandbox>),
    /// It cannot be handed out (stopped, or its image was pulled anew since): delete it.
    Stale,
    /// It is fine but cannot become what this request asks (a user its image does not know):
    /// it stays in the pool and the cold path answers the request.
    Unfit,
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
            let id = SandboxId::parse("sandbox_id", &id)?;
            match self.make_pooled_yours(&id, image, spec).await {
                Ok(Claim::Served(sandbox)) => {
                    self.refill(image.clone());
                    return Ok(Some(*sandbox));
                }
                Ok(Claim::Unfit) => {
                    self.pool.put_back(&name, id.to_string());
                    return Ok(None);
                }
                Ok(Claim::Stale) => {
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

    /// Turns pooled sandbox `id` into the caller's: its environment, working directory, user
    /// and limits (the stored spec, and the running task's cgroup), labels and TTL, no pool
    /// label.
    async fn make_pooled_yours(
        &self,
        id: &SandboxId,
        image: &ImageRef,
        spec: &CreateSpec,
    ) -> Result<Claim> {
        let _guard = self.lock(id.as_str()).await?;
        let (container, task, current) = tokio::try_join!(
            self.any_container(id),
            self.task(id.as_str()),
            crate::image::resolve(self.cd.as_ref(), image),
        )?;
        let Some(container) = container.filter(|c| c.labels.contains_key(L_POOL)) else {
            return Ok(Claim::Stale);
        };
        let Some(task) = task.filter(|t| t.state == TaskState::Running) else {
            return Ok(Claim::Stale);
        };
        if container.labels.get(L_MANIFEST_REF) != Some(&current.manifest_digest) {
            return Ok(Claim::Stale);
        }
        let now = SystemTime::now();
        let mut changes: Vec<(&str, Option<String>)> =
            vec![(L_POOL, None), (L_CLAIMED, Some(crate::util::rfc3339(now)))];
        if let Some(ttl) = spec.ttl {
            changes.push((L_EXPIRES, Some(crate::util::rfc3339(now + ttl))));
        }
        if let Some(key) = &spec.request {
            changes.extend(retry::CREATE.of(key, now).map(|(k, v)| (k, Some(v))));
        }
        for (k, v) in &spec.labels {
            changes.push((k.as_str(), Some(v.clone())));
        }
        let overrides = match self.overrides(id, spec, task.pid).await {
            Ok(o) => o,
            Err(claim) => return Ok(claim),
        };
        let new_spec = match &overrides {
            None => None,
            Some(o) => {
                let (new_spec, resources) = spec::apply(&container.spec, o)?;
                if let Some(resources) = resources {
                    self.cd.update_resources(id.as_str(), resources).await?;
                }
                Some(new_spec)
            }
        };
        if spec.resources != Resources::default() {
            let limits = resource_labels(&self.applied_limits(spec.resources));
            changes.extend(limits.into_iter().map(|(k, v)| (k, Some(v))));
        }
        self.update_container(id.as_str(), &changes, new_spec)
            .await?;
        tracing::info!(sandbox_id = %id, image = %image, "served create from the warm pool");
        let sandbox = self.get(id).await?;
        Ok(Claim::Served(Box::new(sandbox)))
    }

    /// What `spec` changes in pooled sandbox `id` whose PID 1 is `pid` (`None`: nothing), having
    /// made the working directory it asks for; else what to do with the sandbox instead.
    async fn overrides<'a>(
        &self,
        id: &SandboxId,
        spec: &'a CreateSpec,
        pid: u32,
    ) -> std::result::Result<Option<Overrides<'a>>, Claim> {
        // Limits left unset get the defaults, which the pooled sandbox was made with.
        let r = &self.applied_limits(spec.resources);
        let mut o = Overrides {
            env: (!spec.env.is_empty()).then_some(&spec.env),
            cwd: spec.working_dir.as_deref(),
            user: None,
            limits: (spec.resources != Resources::default())
                .then(|| (r.cpu_millis, r.memory_bytes, r.pids())),
        };
        if spec.working_dir.is_some() || spec.user.is_some() {
            // The pooled sandbox's files are its image's, untouched: what a cold create finds
            // in its fresh snapshot.
            let still_pid1 = || async {
                let task = self.task(id.as_str()).await?;
                Ok(task.is_some_and(|t| t.state == TaskState::Running && t.pid == pid))
            };
            let root = crate::files::open_process_root(pid, None, still_pid1)
                .await
                .map_err(|_| Claim::Stale)?;
            let (cwd, user) = (spec.working_dir.clone(), spec.user.clone());
            o.user =
                sys::blocking(move || Ok(prepare_root(&root, cwd.as_deref(), user.as_deref())))
                    .await
                    .unwrap_or(Err(Claim::Stale))?;
        }
        let nothing = o.env.is_none() && o.cwd.is_none() && o.user.is_none() && o.limits.is_none();
        Ok((!nothing).then_some(o))
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
                    request: None,
                };
                match this.create(spec, &crate::tenants::Quotas::default()).await {
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
                .is_some_and(|t| t.state == TaskState::Running);
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

/// In the root of a pooled sandbox: resolves `user` (a user it does not know is the cold path's
/// to report) and makes the working directory `cwd` when missing, as runc does at a cold start
/// (a failure there may leave part of it behind: the sandbox is then discarded).
fn prepare_root(
    root: &crate::files::Root,
    cwd: Option<&str>,
    user: Option<&str>,
) -> std::result::Result<Option<User>, Claim> {
    let user = match user {
        None => None,
        Some(u) => Some(crate::files::resolve_user_in(root, "user", u).map_err(|_| Claim::Unfit)?),
    };
    if let Some(cwd) = cwd.filter(|cwd| !root.is_dir(cwd)) {
        let made = crate::files::SandboxPath::parse("working_dir", cwd)
            .and_then(|dir| crate::files::make_dir(root, &dir, true, WORKING_DIR_MODE));
        made.map_err(|e| {
            tracing::warn!(error = %e, "making the working directory of a pooled sandbox failed");
            Claim::Stale
        })?;
    }
    Ok(user)
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
