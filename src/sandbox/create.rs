//! CreateSandbox: a writable snapshot on the image, a container holding the sandbox's record,
//! and (unless asked not to) a running task; each step's undo is recorded as it succeeds and
//! run in reverse when a later one fails, so a failed create leaves nothing behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::Instrument;

use super::manager::{remove_dir, run_to_completion, Manager};
use super::model::*;
use super::network::{write_etc_files, NetCtx};
use super::record::*;
use super::retry::{self, RequestKey};
use crate::error::{Error, Result};
use crate::image;
use crate::runtime::spec::{self, SandboxSpec, IDLE_INIT_PATH};
use crate::runtime::{Container, Lease, NewContainer};
use crate::tenants::Quotas;
use crate::{files, sys};

/// Default PATH for images that set none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The undo steps of a create, run in reverse when a later step fails.
#[derive(Default)]
struct Undo {
    files: Option<PathBuf>,
    snapshot: Option<String>,
    container: Option<String>,
    task: Option<String>,
}

impl Manager {
    // ---- create ----

    /// CreateSandbox (a fork when its source is a snapshot), held against the tenant's
    /// `quotas`; a missing image is pulled with the tenant's `registry_auth` when it has its
    /// own. Runs to completion (or full undo) even if the caller goes away.
    pub async fn create(
        self: &Arc<Self>,
        spec: CreateSpec,
        quotas: &Quotas,
        registry_auth: Option<Arc<image::AuthFile>>,
    ) -> Result<Sandbox> {
        let quotas = quotas.clone();
        let this = self.clone();
        let span = tracing::info_span!("create_sandbox", sandbox_id = %spec.id);
        if spec.network == NetworkMode::Bridge {
            self.net.check_host_ports(&spec.net_policy)?;
        }
        run_to_completion(
            async move {
                let _retries = this.lock_request(spec.request.as_ref()).await?;
                if let Some(key) = &spec.request {
                    if let Some(sandbox) = this.replay_create(key).await? {
                        return Ok(sandbox);
                    }
                }
                // Held until the sandbox is made or undone; a retry above adds nothing.
                let applied = this.applied_limits(spec.resources);
                let _reserved = this.reserve(&spec.id, &applied, &quotas).await?;
                let sandbox = match this.claim_pooled(&spec).await? {
                    Some(sandbox) => sandbox,
                    None => this.create_inner(spec, registry_auth).await?,
                };
                this.publish(super::EventKind::Created, &sandbox, "");
                if sandbox.started_at.is_some() {
                    this.publish(super::EventKind::Started, &sandbox, "");
                }
                Ok(sandbox)
            }
            .instrument(span),
        )
        .await
    }

    /// The sandbox an earlier CreateSandbox with request `key` made, if it still exists.
    async fn replay_create(&self, key: &RequestKey) -> Result<Option<Sandbox>> {
        let now = SystemTime::now();
        for c in self.managed_containers().await? {
            if retry::CREATE.replays(&c.labels, key, now)? {
                tracing::info!(sandbox_id = %c.id, request_id = key.id(), "a retried create returns the first call's sandbox");
                let task = self.task(&c.id).await?;
                return Ok(Some(self.describe(&c, task.as_ref())));
            }
        }
        Ok(None)
    }

    async fn create_inner(
        &self,
        mut spec: CreateSpec,
        registry_auth: Option<Arc<image::AuthFile>>,
    ) -> Result<Sandbox> {
        // The limits recorded (and reported) are the ones that apply, defaults included.
        spec.resources = self.applied_limits(spec.resources);
        let _guard = self.locks.lock(spec.id.as_str()).await?;
        // The id check and the source's resolution are independent: one round trip. A snapshot
        // is resolved from its image record alone; a missing image is pulled only once the id
        // is known to be free.
        let resolve = async {
            match &spec.source {
                Source::Image(image) => (
                    image::resolve(self.cd.as_ref(), image)
                        .await
                        .map(Into::into),
                    image.name(),
                ),
                Source::Snapshot(snapshot) => match self.resolve_snapshot(snapshot).await {
                    Ok((snap, image)) => (Ok(image), snap.image),
                    Err(e) => (Err(e), String::new()),
                },
            }
        };
        let (existing, (resolved, base_image)) = tokio::join!(self.container(&spec.id), resolve);
        if existing?.is_some() {
            return Err(Error::AlreadyExists {
                kind: crate::error::Kind::Sandbox,
                id: spec.id.to_string(),
            });
        }
        let image = match (resolved, &spec.source) {
            (Ok(image), _) => image,
            (Err(Error::NotFound { .. }), Source::Image(image_ref)) => {
                tracing::info!(image = %image_ref, "pulling a missing image");
                let access = self.cfg.registries.access(registry_auth);
                image::pull(&access, self.cd.as_ref(), image_ref, None).await?;
                image::resolve(self.cd.as_ref(), image_ref).await?.into()
            }
            (Err(e), _) => return Err(e),
        };

        let lease = self.cd.lease("create").await?;
        let mut undo = Undo::default();
        let result = self
            .create_steps(&spec, &image, &base_image, &lease, &mut undo)
            .await;
        let released = self.cd.release(lease).await;
        match result {
            Ok(()) => {
                if let Err(e) = released {
                    tracing::warn!(error = %e, "releasing the create lease failed; it will expire");
                }
                if spec.pool.is_some() {
                    // Hidden from get() until claimed.
                    let container = self.any_container(&spec.id).await?.ok_or_else(|| {
                        Error::not_found(crate::error::Kind::Sandbox, spec.id.as_str())
                    })?;
                    let task = self.task(spec.id.as_str()).await?;
                    return Ok(self.describe(&container, task.as_ref()));
                }
                self.get(&spec.id).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "create failed; undoing");
                let cleanup = self.undo(undo).await;
                Err(e.with_cleanup(cleanup))
            }
        }
    }

    async fn create_steps(
        &self,
        spec: &CreateSpec,
        image: &image::RunImage,
        base_image: &str,
        lease: &Lease,
        undo: &mut Undo,
    ) -> Result<()> {
        let id = &spec.id;
        let files = self.files_dir(id);
        undo.files = Some(files.clone());
        let bridge = spec.network == NetworkMode::Bridge;
        if !bridge {
            // A BRIDGE sandbox's files are written when its network is attached.
            let resolv = self.net.resolv_conf();
            write_etc_files(&files, &spec.hostname, None, &resolv.text).await?;
        }

        let key = format!("sandboxd-rw-{id}-{}", crate::util::random_hex(4));
        let owner = [(L_SNAPSHOT_OWNER.to_string(), id.to_string())].into();
        let mounts = self
            .cd
            .prepare(&key, &image.top_chain_id, owner, Some(lease))
            .await?;
        undo.snapshot = Some(key.clone());
        // The new sandbox will write to the disk this layer is on.
        self.disk_room(Some(&mounts))?;

        let config = &image.run_config;
        let user_spec = spec
            .user
            .clone()
            .or_else(|| config.user().clone().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "0".to_string());
        let user = if files::user_needs_lookup(&user_spec) {
            let root = self.mount_snapshot(&mounts).await?;
            sys::blocking(move || files::resolve_user("user", &user_spec, Some(root.path())))
                .await?
        } else {
            files::resolve_user("user", &user_spec, None)?
        };

        let mut env: Vec<String> = config.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }
        spec::merge_env(&mut env, &spec.env);
        let idle = spec.command.is_empty();
        let args = if idle {
            vec![IDLE_INIT_PATH.to_string(), "-P".to_string()]
        } else {
            spec.command.clone()
        };
        let cwd = spec
            .working_dir
            .clone()
            .or_else(|| config.working_dir().clone().filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".to_string());
        let runtime_spec = spec::build(&SandboxSpec {
            args: args.clone(),
            env,
            cwd,
            user,
            hostname: spec.hostname.clone(),
            cgroups_path: self.sandbox_cgroup(id.as_str()),
            cpu_millis: spec.resources.cpu_millis,
            memory_bytes: spec.resources.memory_bytes,
            pids_limit: spec.resources.pids(),
            etc_dir: files.clone(),
            idle_init: idle.then(|| self.cfg.idle_init.clone()),
            netns_path: bridge.then(|| self.net.netns_path(&self.host_key(id.as_str()))),
            seccomp: self.seccomp.clone(),
            oom_score_adj: self.cfg.walls.oom_score_adj,
        })?;
        if idle && !self.cfg.idle_init.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "the idle init {} is not installed on this node; install catatonit or pass a command",
                self.cfg.idle_init.display()
            )));
        }

        let now = SystemTime::now();
        let mut labels = spec.labels.clone();
        labels.insert(L_MANAGED.into(), "true".into());
        labels.insert(L_IMAGE.into(), base_image.to_string());
        labels.insert(L_CREATE_LEASE.into(), lease.id().to_string());
        if let Some(key) = &spec.request {
            labels.extend(retry::CREATE.of(key, now).map(|(k, v)| (k.to_string(), v)));
        }
        if let Some(pool) = &spec.pool {
            labels.insert(L_POOL.into(), pool.clone());
        }
        if let Source::Snapshot(snapshot) = &spec.source {
            labels.insert(L_SNAPSHOT.into(), snapshot.clone());
        }
        // Pins the image's manifest (and through its labels config and layers) against GC for
        // as long as the sandbox exists, so that a snapshot of it can still be made an image.
        labels.insert(L_MANIFEST_REF.into(), image.manifest_digest.clone());
        labels.insert(L_HOSTNAME.into(), spec.hostname.clone());
        labels.insert(L_NETWORK.into(), spec.network.as_str().into());
        labels.insert(
            L_COMMAND.into(),
            serde_json::to_string(&args).unwrap_or_default(),
        );
        labels.extend(
            resource_labels(&spec.resources)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        if let Some(ttl) = spec.ttl {
            labels.insert(L_EXPIRES.into(), crate::util::rfc3339(now + ttl));
        }
        if spec.start {
            labels.insert(L_STARTED.into(), crate::util::rfc3339(now));
        }
        let mut extensions = HashMap::new();
        if bridge {
            let policy = serde_json::to_vec(&spec.net_policy)
                .map_err(|e| Error::Internal(format!("encoding the network policy: {e}")))?;
            extensions.insert(EXT_NET_POLICY.to_string(), policy);
        }
        let container = Container {
            id: id.to_string(),
            labels,
            extensions,
            image: image.name.clone(),
            spec: runtime_spec,
            snapshot_key: key.clone(),
            created_at: None,
        };
        let new = NewContainer {
            container,
            runc_root: self.cfg.runc_root.clone(),
        };
        self.cd.create_container(new, lease).await?;
        undo.container = Some(id.to_string());

        if spec.start {
            undo.task = Some(id.to_string());
            self.failpoint("create.start")?;
            // The prepared mounts and a started-at label written with the container save two
            // round trips on the hot path; a failed start undoes the container anyway.
            let net = bridge.then(|| NetCtx {
                policy: &spec.net_policy,
                hostname: &spec.hostname,
            });
            self.run_task(id, mounts, net).await?;
        }
        Ok(())
    }

    /// Runs the recorded undo steps in reverse order of their doing; reports the first failure.
    async fn undo(&self, undo: Undo) -> Result<()> {
        let mut first_err = Ok(());
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::error!(error = %e, "undo step failed");
                if first_err.is_ok() {
                    first_err = Err(e);
                }
            }
        };
        if let Some(id) = &undo.task {
            note(self.kill_and_delete_task(id, None).await);
        }
        if let Some(key) = &undo.snapshot {
            note(self.cd.remove(key).await);
        }
        if let Some(id) = &undo.container {
            note(self.cd.delete_container(id).await);
        }
        if let Some(dir) = &undo.files {
            note(remove_dir(dir).await);
        }
        first_err
    }
}
