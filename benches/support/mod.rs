//! What the benches share: machine facts, load averages, order statistics, where results go.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use containerd_client::services::v1::version_client::VersionClient;
use serde::Serialize;

use crate::common::{host, Containerd};

/// A non-negative count from environment variable `name`, or `default` when it is unset.
pub fn env_count(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value:?} is not a non-negative integer")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(e).with_context(|| format!("reading {name}")),
    }
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineFacts {
    /// CPUs available to this process (what `nproc` prints).
    pub nproc: usize,
    /// Kernel release.
    pub kernel: String,
    /// cgroup hierarchy in use ("v1" or "v2").
    pub cgroup: String,
    /// containerd's version and revision as its Version RPC reports them.
    pub containerd: String,
    /// First line of `runc --version`.
    pub runc: String,
}

impl MachineFacts {
    pub async fn collect(containerd: &Containerd) -> Result<MachineFacts> {
        let nproc = std::thread::available_parallelism()
            .context("query the number of CPUs")?
            .get();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("read /proc/sys/kernel/osrelease")?
            .trim()
            .to_owned();
        let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "v2"
        } else {
            "v1"
        };
        let version = VersionClient::new(containerd.channel().await)
            .version(())
            .await
            .context("containerd Version RPC")?
            .into_inner();
        let runc = first_line_of(&host::binary("runc"), &["--version"]).await?;
        Ok(MachineFacts {
            nproc,
            kernel,
            cgroup: cgroup.to_owned(),
            containerd: format!("{} ({})", version.version, version.revision),
            runc,
        })
    }

    pub fn render(&self) -> String {
        format!(
            "machine: nproc {}, kernel {}, cgroup {}, containerd {}, {}",
            self.nproc, self.kernel, self.cgroup, self.containerd, self.runc
        )
    }
}

/// The first line of what `program args` prints on stdout.
pub async fn first_line_of(program: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", program.display()))?;
    ensure!(
        out.status.success(),
        "{} {args:?} failed ({})",
        program.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The 1-minute load average: other work on a 2-core machine skews every figure.
pub fn load_average() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").context("read /proc/loadavg")?;
    let first = text.split_whitespace().next().unwrap_or_default();
    first
        .parse()
        .with_context(|| format!("/proc/loadavg starts with {first:?}, not a number"))
}

/// The machine's 1-minute load average when the run started and when it ended (the latter
/// includes the bench's own containerd, shims and `ctr` processes).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadAverages {
    pub before: f64,
    pub after: f64,
}

/// A gRPC failure as an error naming the call, the object and the exact status.
pub fn status_error(call: &str, id: &str, status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{call} {id} failed: {:?}: {}",
        status.code(),
        status.message()
    )
}

/// p50, p99 and mean of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Percentiles by nearest rank; `None` when there are no samples.
    pub fn of(latencies: &[Duration]) -> Option<Summary> {
        if latencies.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let mean_ms = ms.iter().sum::<f64>() / ms.len() as f64;
        Some(Summary {
            samples: ms.len(),
            p50_ms: nearest_rank(&ms, 0.50),
            p99_ms: nearest_rank(&ms, 0.99),
            mean_ms,
        })
    }
}

/// The `q` quantile of sorted, non-empty `values` by the nearest-rank method.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` of this package.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Sends `request` and fails unless the response says the sandbox is RUNNING.
pub async fn create_running(
    client: &sandboxd::pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    request: sandboxd::pb::CreateSandboxRequest,
) -> Result<()> {
    create_running_id(client, request).await.map(|_| ())
}

/// Like [`create_running`], returning the sandbox's id (generated when the request has none).
pub async fn create_running_id(
    client: &sandboxd::pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    request: sandboxd::pb::CreateSandboxRequest,
) -> Result<String> {
    let id = request.sandbox_id.clone();
    let sandbox = client
        .clone()
        .create_sandbox(request)
        .await
        .map_err(|s| status_error("CreateSandbox", &id, &s))?
        .into_inner()
        .sandbox
        .with_context(|| format!("CreateSandbox {id}: the response holds no sandbox"))?;
    ensure!(
        sandbox.state() == sandboxd::pb::SandboxState::Running,
        "CreateSandbox {id} answered state {:?}, not RUNNING",
        sandbox.state()
    );
    Ok(sandbox.sandbox_id)
}

/// Deletes sandbox `id` with `force`.
pub async fn delete_forced(
    client: &sandboxd::pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Result<()> {
    let request = sandboxd::pb::DeleteSandboxRequest {
        sandbox_id: id.to_owned(),
        force: true,
    };
    client
        .clone()
        .delete_sandbox(request)
        .await
        .map_err(|s| status_error("DeleteSandbox", id, &s))?;
    Ok(())
}

/// The runc state directory the sandboxd fixture gives its sandboxes (next to the containerd
/// socket, in the test's directory), as `ctr run --runc-root` takes it, so both sides keep
/// runc's state on the same filesystem.
pub fn runc_root(containerd: &Containerd) -> String {
    containerd.dir().join("runc").display().to_string()
}
