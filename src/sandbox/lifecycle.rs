//! Start, stop and delete of a sandbox's task, and the swap of its writable snapshot that a
//! restore makes. Each runs under the sandbox's lock, to completion even if the caller goes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use super::events::EventKind;
use super::manager::{remove_dir, run_to_completion, Manager};
use super::model::*;
use super::network::{write_etc_files, NetCtx};
use super::record::*;
use crate::error::{Error, Result};
use crate::runtime::{Container, ContainerUpdate, LaunchFault, Lease, Mount, Task, TaskState};

/// How long a SIGKILLed sandbox may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The first wait for an interrupted task create to settle in containerd; doubled each try.
const STALE_CREATE_BACKOFF: Duration = Duration::from_millis(50);
/// Past this wait a task create that keeps finding the leftovers of another fails.
const STALE_CREATE_WAIT: Duration = Duration::from_secs(5);

impl Manager {
    // ---- start / stop ----

    /// StartSandbox: starts a created or stopped sandbox; a running one is returned unchanged.
    pub async fn start(self: &Arc<Self>, id: SandboxId) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("start_sandbox", sandbox_id = %id);
        run_to_completion(
            async move {
                let _guard = this.locks.lock(id.as_str()).await?;
                let container = this.existing(&id).await?;
                match this.task(id.as_str()).await?.map(|t| t.state) {
                    Some(TaskState::Running) => return this.get(&id).await,
                    Some(TaskState::Paused) => {
                        return Err(Error::FailedPrecondition(format!("sandbox {id} is paused")));
                    }
                    // A slow shim says UNKNOWN of a live task: never treat it as exited.
                    Some(TaskState::Unknown) => {
                        return Err(Error::Unavailable {
                            op: "tasks.get",
                            message: format!("the state of sandbox {id}'s task is unknown; retry"),
                        });
                    }
                    Some(TaskState::Created | TaskState::Stopped) => {
                        this.finish_task(&id, &container, true).await?
                    }
                    None => this.detach_network(id.as_str(), Some(&container)).await?,
                }
                if let Err(e) = this
                    .start_task_of(&id, &container, &container.snapshot_key)
                    .await
                {
                    let cleanup = this
                        .kill_and_delete_task(id.as_str(), Some(&container))
                        .await;
                    return Err(e.with_cleanup(cleanup));
                }
                let sandbox = this.get(&id).await?;
                this.publish(EventKind::Started, &sandbox, "");
                Ok(sandbox)
            }
            .instrument(span),
        )
        .await
    }

    /// Starts sandbox `id`'s task on the writable snapshot `snapshot_key`.
    pub(super) async fn start_task(&self, id: &SandboxId, snapshot_key: &str) -> Result<u32> {
        let container = self.existing(id).await?;
        self.start_task_of(id, &container, snapshot_key).await
    }

    async fn start_task_of(
        &self,
        id: &SandboxId,
        container: &Container,
        snapshot_key: &str,
    ) -> Result<u32> {
        let hostname = container
            .labels
            .get(L_HOSTNAME)
            .map_or(id.as_str(), |h| h.as_str());
        let policy = net_policy(container);
        if policy.is_none() {
            let resolv = self.net.resolv_conf();
            write_etc_files(&self.files_dir(id), hostname, None, &resolv.text).await?;
        }
        let mounts = self.cd.mounts(snapshot_key).await?;
        let net = policy.as_ref().map(|policy| NetCtx { policy, hostname });
        let pid = self.run_task(id, mounts, net).await?;
        let now = crate::util::rfc3339(SystemTime::now());
        self.update_labels(
            id.as_str(),
            &[
                (L_STARTED, Some(now)),
                (L_EXITED, None),
                (L_EXIT_STATUS, None),
                (L_OOM_KILLED, None),
            ],
        )
        .await?;
        Ok(pid)
    }

    /// Creates and starts the task on `mounts` (the writable snapshot's); returns PID 1's pid.
    /// A BRIDGE sandbox (`net`) has its network attached first, so PID 1 never sees it
    /// half-made; if the task then fails to start, the network is detached again.
    pub(super) async fn run_task(
        &self,
        id: &SandboxId,
        mounts: Vec<Mount>,
        net: Option<NetCtx<'_>>,
    ) -> Result<u32> {
        let Some(net) = net else {
            return self.create_and_start_task(id, mounts).await;
        };
        self.attach_network(id, &net).await?;
        match self.create_and_start_task(id, mounts).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let cleanup = self.kill_and_delete_task(id.as_str(), None).await;
                Err(e.with_cleanup(cleanup))
            }
        }
    }

    /// Creates and starts sandbox `id`'s task on `mounts`; returns PID 1's pid.
    async fn create_and_start_task(&self, id: &SandboxId, mounts: Vec<Mount>) -> Result<u32> {
        let mut backoff = STALE_CREATE_BACKOFF;
        loop {
            match self.cd.create_task(id.as_str(), &mounts).await {
                Ok(()) => break,
                // A create cut short by a killed sandboxd may still be running (or being undone)
                // in containerd: wait for it to settle, remove a task it left, and try again.
                Err(e) if crate::runtime::create_in_progress(&e) && backoff < STALE_CREATE_WAIT => {
                    tracing::info!(sandbox_id = %id, "an earlier create of this task is still settling; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    match self.task(id.as_str()).await? {
                        Some(task) => self.kill_and_delete(id.as_str(), &task).await?,
                        // Registered, but with no process behind it (the shim never ran runc):
                        // Get says NOT_FOUND while Create says ALREADY_EXISTS. A delete clears
                        // the registration.
                        None => {
                            if let Err(e) = self.cd.delete_task(id.as_str()).await {
                                tracing::debug!(sandbox_id = %id, error = %e, "clearing a half-made task failed");
                            }
                        }
                    }
                }
                Err(e) => return Err(launch_error(e)),
            }
        }
        self.cd.start(id.as_str(), None).await.map_err(launch_error)
    }

    /// StopSandbox: `signal` to PID 1, wait `timeout`; then SIGKILL to everything if `force`,
    /// else DEADLINE_EXCEEDED with the sandbox still running.
    pub async fn stop(
        self: &Arc<Self>,
        id: SandboxId,
        signal: i32,
        timeout: Duration,
        force: bool,
    ) -> Result<Sandbox> {
        let this = self.clone();
        let span = tracing::info_span!("stop_sandbox", sandbox_id = %id);
        run_to_completion(async move {
            let _guard = this.locks.lock(id.as_str()).await?;
            let container = this.existing(&id).await?;
            let Some(task) = this.task(id.as_str()).await? else {
                // A teardown that failed before is finished now.
                this.detach_network(id.as_str(), Some(&container)).await?;
                return this.get(&id).await;
            };
            if task.state == TaskState::Paused {
                this.cd.resume(id.as_str()).await?;
            }
            // PID 1 that exited before this call may have been the OOM killer's; one killed
            // here was not.
            let exited_by_itself = !task.state.may_be_alive();
            if task.state.may_be_alive() {
                this.cd.kill(id.as_str(), None, signal as u32, false).await?;
                if !this.wait_exit(id.as_str(), timeout).await? {
                    if !force {
                        return Err(Error::DeadlineExceeded(format!(
                            "sandbox {id} did not exit within {timeout:?} of signal {signal}; retry with force to SIGKILL it"
                        )));
                    }
                    this.cd.kill(id.as_str(), None, libc::SIGKILL as u32, true).await?;
                    if !this.wait_exit(id.as_str(), KILL_WAIT).await? {
                        return Err(Error::Internal(format!("sandbox {id} survived SIGKILL for {KILL_WAIT:?}")));
                    }
                }
            }
            this.finish_task(&id, &container, exited_by_itself).await?;
            let sandbox = this.get(&id).await?;
            this.publish(EventKind::Stopped, &sandbox, "");
            Ok(sandbox)
        }.instrument(span))
        .await
    }

    /// Waits up to `timeout` for PID 1 to exit; false on timeout.
    async fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool> {
        match tokio::time::timeout(timeout, self.cd.wait(id, None)).await {
            Err(_) => Ok(false),
            Ok(result) => result.map(|_| true),
        }
    }

    /// Deletes an exited task, tears its network down and records its exit status in the
    /// container's labels, and whether the OOM killer ended it when it `exited_by_itself`
    /// (read before the delete takes the cgroup away).
    async fn finish_task(
        &self,
        id: &SandboxId,
        container: &Container,
        exited_by_itself: bool,
    ) -> Result<()> {
        let oom_killed = exited_by_itself
            && self.task(id.as_str()).await?.is_some_and(|t| {
                t.state == TaskState::Stopped && self.pid1_oom_killed(id, t.exit_status)
            });
        let exit = self.cd.delete_task(id.as_str()).await?;
        self.detach_network(id.as_str(), Some(container)).await?;
        let Some(exit) = exit else {
            return Ok(());
        };
        let exited = exit.at.unwrap_or_else(SystemTime::now);
        self.update_labels(
            id.as_str(),
            &[
                (L_EXITED, Some(crate::util::rfc3339(exited))),
                (L_EXIT_STATUS, Some(exit.status.to_string())),
                (L_OOM_KILLED, oom_killed.then(|| "true".to_owned())),
            ],
        )
        .await
    }

    /// Kills and deletes sandbox `id`'s task, whatever its state, then tears its network down
    /// (given the container when at hand, for the cached CNI result).
    pub(super) async fn kill_and_delete_task(
        &self,
        id: &str,
        container: Option<&Container>,
    ) -> Result<()> {
        if let Some(task) = self.task(id).await? {
            self.kill_and_delete(id, &task).await?;
        }
        self.detach_network(id, container).await
    }

    async fn kill_and_delete(&self, id: &str, task: &Task) -> Result<()> {
        // A frozen task cannot die: thaw it first.
        if task.state == TaskState::Paused {
            self.cd.resume(id).await?;
        }
        self.cd.kill(id, None, libc::SIGKILL as u32, true).await?;
        self.wait_exit(id, KILL_WAIT).await?;
        self.cd.delete_task(id).await.map(|_| ())
    }

    // ---- delete ----

    /// DeleteSandbox: task, writable snapshot, container, files. A running sandbox needs `force`.
    /// The sandbox's open file streams are ended first (ABORTED), so that an idle one never
    /// holds the delete up (a stopped sandbox's mount holds its lock).
    pub async fn delete(self: &Arc<Self>, id: SandboxId, force: bool) -> Result<()> {
        let this = self.clone();
        let span = tracing::info_span!("delete_sandbox", sandbox_id = %id);
        run_to_completion(
            async move {
                let _deleting = this.streams.delete(id.as_str());
                let _guard = this.locks.lock(id.as_str()).await?;
                let container = this.existing(&id).await?;
                let task = this.task(id.as_str()).await?;
                let before = this.describe(&container, task.as_ref());
                this.delete_locked(&id, &container, force).await?;
                this.publish(EventKind::Deleted, &before, "");
                Ok(())
            }
            .instrument(span),
        )
        .await
    }

    /// Force-deletes sandbox `id` whatever it is, a warm-pool one included; a missing one is
    /// fine.
    pub(super) async fn delete_any(&self, id: SandboxId) -> Result<()> {
        let _deleting = self.streams.delete(id.as_str());
        let _guard = self.locks.lock(id.as_str()).await?;
        match self.any_container(&id).await? {
            Some(container) => self.delete_locked(&id, &container, true).await,
            None => Ok(()),
        }
    }

    pub(super) async fn delete_locked(
        &self,
        id: &SandboxId,
        container: &Container,
        force: bool,
    ) -> Result<()> {
        if let Some(task) = self.task(id.as_str()).await? {
            let live = task.state != TaskState::Stopped;
            if live && !force {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is running; stop it first or delete with force"
                )));
            }
            self.kill_and_delete_task(id.as_str(), Some(container))
                .await?;
        }
        // A network whose earlier teardown failed goes now, before what identifies it.
        self.detach_network(id.as_str(), Some(container)).await?;
        // Snapshot before container: an interrupted delete leaves a container to delete again,
        // never an orphaned snapshot.
        self.cd.remove(&container.snapshot_key).await?;
        self.cd.delete_container(id.as_str()).await?;
        remove_dir(&self.files_dir(id)).await
    }

    /// Gives sandbox `id` a new writable snapshot on `parent_chain` (a restore): prepared first,
    /// so that a failure before the swap leaves the sandbox untouched; then the task is stopped,
    /// the container switched over, and the old writable snapshot removed.
    pub(super) async fn swap_rootfs(
        &self,
        id: &SandboxId,
        container: &Container,
        new_key: &str,
        parent_chain: &str,
        snapshot_id: &str,
        lease: &Lease,
    ) -> Result<()> {
        let owner = [(L_SNAPSHOT_OWNER.to_string(), id.to_string())].into();
        let mounts = self
            .cd
            .prepare(new_key, parent_chain, owner, Some(lease))
            .await?;
        // The restored sandbox writes to the disk this layer is on (the caller undoes the
        // prepare).
        self.disk_room(Some(&mounts))?;
        self.kill_and_delete_task(id.as_str(), Some(container))
            .await?;
        self.failpoint("restore.swap")?;
        let update = ContainerUpdate {
            snapshot_key: Some(new_key.to_string()),
            labels: vec![(L_SNAPSHOT.to_string(), Some(snapshot_id.to_string()))],
            spec: None,
            extensions: Vec::new(),
        };
        self.cd.update_container(id.as_str(), update).await?;
        if let Err(e) = self.cd.remove(&container.snapshot_key).await {
            tracing::warn!(error = %e, key = %container.snapshot_key, "removing the replaced writable snapshot failed");
        }
        Ok(())
    }
}

/// A failed task start, as the caller's fault (a missing program, a bad working dir) when
/// runc says so.
fn launch_error(e: Error) -> Error {
    match LaunchFault::of(&e) {
        Some(LaunchFault::Program(msg)) => Error::invalid("command", msg),
        Some(LaunchFault::WorkingDir(msg)) => Error::invalid("working_dir", msg),
        None => e,
    }
}
