//! The `ctr` side of every bench: the same work done through containerd's own CLI, one process
//! per call, against the same containerd sandboxd uses, so each figure has a baseline measured
//! on the same machine at the same moment.

use std::collections::BTreeSet;
use std::fs::File;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

use crate::common::{host, CgroupParent, Containerd, Leaks, TestEnv};

/// Where `ctr run -d` connects the task's stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachedIo {
    /// `--null-io`: no FIFOs at all.
    Null,
    /// ctr's default: FIFOs the shim keeps open after ctr exits.
    Fifos,
}

/// Raw containerd through the `ctr` CLI in a namespace of its own on the same containerd, with
/// its FIFOs in a temp dir of its own. Containers it still tracks are force-deleted on drop.
pub struct CtrSide<'a> {
    containerd: &'a Containerd,
    namespace: String,
    image: String,
    /// Parent of the containers' cgroups, as sandboxd has one; removed on drop.
    cgroup: CgroupParent,
    /// `--fifo-dir` of every attached `ctr run`/`ctr task exec`; removed on drop.
    fifo_dir: TempDir,
    /// Containers created and not deleted yet.
    live: Mutex<BTreeSet<String>>,
}

impl<'a> CtrSide<'a> {
    /// A side running `image` in a new namespace of `containerd` (nothing pulled yet).
    pub fn new(containerd: &'a Containerd, image: &str) -> Result<CtrSide<'a>> {
        let fifo_dir = tempfile::Builder::new()
            .prefix("bench-ctr-fifo-")
            .tempdir()
            .context("create the ctr FIFO dir")?;
        Ok(CtrSide {
            containerd,
            namespace: host::unique_name("bench-ctr"),
            image: image.to_owned(),
            cgroup: CgroupParent::new(),
            fifo_dir,
            live: Mutex::new(BTreeSet::new()),
        })
    }

    /// [`CtrSide::new`] with the image pulled (not timed).
    pub async fn pulled(containerd: &'a Containerd, image: &str) -> Result<CtrSide<'a>> {
        let side = CtrSide::new(containerd, image)?;
        side.pull().await?;
        Ok(side)
    }

    /// The image every container of this side runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Pulls (and unpacks) the image into the ctr namespace over plain HTTP (not timed).
    pub async fn pull(&self) -> Result<()> {
        self.ctr(&["images", "pull", "--plain-http", &self.image])
            .await
    }

    /// `ctr --address SOCK --namespace NS args...` with stdin on /dev/null, not started yet.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(host::binary("ctr"));
        command
            .arg("--address")
            .arg(self.containerd.address())
            .args(["--namespace", &self.namespace])
            .args(args)
            .env("PATH", host::DAEMON_PATH)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs `ctr args...` to completion, its stdout on a pipe (read and dropped); an error
    /// carries ctr's stderr.
    pub async fn ctr(&self, args: &[&str]) -> Result<()> {
        self.complete(args, self.command(args)).await
    }

    /// Like [`CtrSide::ctr`] with ctr's stdout on /dev/null, so that copying it costs nothing.
    pub async fn ctr_stdout_to_null(&self, args: &[&str]) -> Result<()> {
        let mut command = self.command(args);
        command.stdout(File::create("/dev/null").context("open /dev/null")?);
        self.complete(args, command).await
    }

    /// Waits for `command` (ctr with `args`) and fails unless it exits 0.
    async fn complete(&self, args: &[&str], mut command: tokio::process::Command) -> Result<()> {
        let out = command
            .output()
            .await
            .with_context(|| format!("spawn ctr {args:?}"))?;
        ensure!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The FIFO dir as an argument.
    pub fn fifo_dir(&self) -> &str {
        self.fifo_dir.path().to_str().unwrap_or("/tmp")
    }

    /// The `--cgroup` of container `id`.
    pub fn cgroup_of(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup.path())
    }

    /// The `--runc-root` of every container: the one sandboxd's sandboxes use.
    pub fn runc_root(&self) -> String {
        super::runc_root(self.containerd)
    }

    /// `ctr run -d` of `command` as container `id`, its stdio as `io` says.
    pub async fn run_detached(&self, id: &str, io: DetachedIo, command: &[&str]) -> Result<()> {
        let cgroup = self.cgroup_of(id);
        let runc_root = self.runc_root();
        let mut args = vec!["run", "-d", "--runc-root", &runc_root];
        if io == DetachedIo::Null {
            args.push("--null-io");
        }
        args.extend_from_slice(&["--cgroup", &cgroup, &self.image, id]);
        args.extend_from_slice(command);
        self.track(id);
        self.ctr(&args).await
    }

    /// `ctr task exec --exec-id EXEC_ID ID args...` to completion, its stdout on a pipe (read
    /// and dropped) or, with `stdout_to_null`, on /dev/null.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
        stdout_to_null: bool,
    ) -> Result<()> {
        let mut full = vec![
            "task",
            "exec",
            "--fifo-dir",
            self.fifo_dir(),
            "--exec-id",
            exec_id,
            id,
        ];
        full.extend_from_slice(args);
        if stdout_to_null {
            self.ctr_stdout_to_null(&full).await
        } else {
            self.ctr(&full).await
        }
    }

    /// Deletes container `id` with its task (force) and writable snapshot.
    pub async fn delete(&self, id: &str) -> Result<()> {
        self.ctr(&["tasks", "delete", "--force", id]).await?;
        self.ctr(&["containers", "delete", id]).await?;
        self.forget(id);
        Ok(())
    }

    /// Records that container `id` is about to exist: drop deletes it unless it is forgotten.
    pub fn track(&self, id: &str) {
        self.live().insert(id.to_owned());
    }

    /// Records that container `id` is gone.
    pub fn forget(&self, id: &str) {
        self.live().remove(id);
    }

    /// What this side's namespace still holds (containers, tasks, active snapshots, leases).
    pub async fn leaks(&self) -> Leaks {
        self.containerd.leaks(&self.namespace).await
    }

    /// Containers still tracked as live.
    fn live(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for CtrSide<'_> {
    fn drop(&mut self) {
        let leftovers: Vec<String> = self.live().iter().cloned().collect();
        for id in leftovers {
            for args in [
                ["tasks", "delete", "--force", id.as_str()].as_slice(),
                ["containers", "delete", id.as_str()].as_slice(),
            ] {
                let out = self.containerd.ctr(&self.namespace, args);
                if !out.status.success() {
                    eprintln!(
                        "bench cleanup: ctr {args:?} failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
    }
}

/// Fails, listing them, if sandboxd's or ctr's namespace still holds containers, tasks, active
/// snapshots or leases (and, for sandboxd, cgroups): both sides must remove the same things.
pub async fn check_no_leftovers(env: &TestEnv, ctr: &CtrSide<'_>) -> Result<()> {
    let sandboxd_leaks = env.leaks().await;
    let ctr_leaks = ctr.leaks().await;
    ensure!(
        sandboxd_leaks.is_empty() && ctr_leaks.is_empty(),
        "leftovers after the run:\nsandboxd: {sandboxd_leaks}\nctr: {ctr_leaks}"
    );
    println!("leftover check: both namespaces hold no container, task, active snapshot or lease");
    Ok(())
}
