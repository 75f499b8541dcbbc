//! What the benches share: machine facts, load averages, order statistics, where results go.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use containerd_client::services::v1::version_client::VersionClient;
use serde::Serialize;

use crate::common::{host, Containerd, TestEnv};

pub mod ctr;

/// The argument cargo passes to a `harness = false` bench target under `cargo bench`.
const CARGO_BENCH_FLAG: &str = "--bench";

/// A bench's `main`: without cargo bench's `--bench` flag (as under `cargo test --benches`) it only
/// prints how to run bench `name`, so a bench never takes part in CI's pass/fail; with it, reads
/// the settings and runs `run` on a multi-threaded runtime.
pub fn bench_main<S, F>(
    name: &str,
    settings: impl FnOnce() -> Result<S>,
    run: impl FnOnce(S) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    if !std::env::args().any(|arg| arg == CARGO_BENCH_FLAG) {
        println!("{name} bench: skipped (run it as root with `cargo bench --bench {name}`)");
        return Ok(());
    }
    let settings = settings()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime")?
        .block_on(run(settings))
}

/// Collects the machine facts and the load average before the run and prints them with the
/// bench's `settings`; returns both.
pub async fn announce(containerd: &Containerd, settings: &str) -> Result<(MachineFacts, f64)> {
    let machine = MachineFacts::collect(containerd).await?;
    let load_before = load_average()?;
    println!("{}", machine.render());
    println!("load average (1 min) before: {load_before:.2}");
    println!("{settings}\n");
    Ok((machine, load_before))
}

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

impl LoadAverages {
    /// The load average `before` the run and now.
    pub fn since(before: f64) -> Result<LoadAverages> {
        Ok(LoadAverages {
            before,
            after: load_average()?,
        })
    }

    /// The report's load line.
    pub fn render(&self) -> String {
        format!(
            "load average (1 min): {:.2} before, {:.2} after (after includes the bench's own processes)\n",
            self.before, self.after
        )
    }
}

/// A gRPC failure as an error naming the call, the object and the exact status.
pub fn status_error(call: &str, id: &str, status: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{call} {id} failed: {:?}: {}",
        status.code(),
        status.message()
    )
}

/// "met" or "MISSED".
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The header, with its rule, of a table of latencies measured on both sides.
pub fn latency_header() -> String {
    let mut out = format!(
        "{:<28} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} {:>10} {:>6}\n",
        "operation (ms)",
        "sbx p50",
        "sbx p99",
        "sbx mean",
        "ctr p50",
        "ctr p99",
        "ctr mean",
        "ratio p50",
        "ratio mean",
        "target"
    );
    out.push_str(&"-".repeat(out.chars().count() - 1));
    out.push('\n');
    out
}

/// One row of the table [`latency_header`] heads.
pub fn latency_row(
    operation: &str,
    sandboxd: &Summary,
    ctr: &Summary,
    ratio_p50: f64,
    ratio_mean: f64,
    meets_target: bool,
) -> String {
    format!(
        "{:<28} {:>9.1} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} | {:>8.2}x {:>9.2}x {:>6}\n",
        operation,
        sandboxd.p50_ms,
        sandboxd.p99_ms,
        sandboxd.mean_ms,
        ctr.p50_ms,
        ctr.p99_ms,
        ctr.mean_ms,
        ratio_p50,
        ratio_mean,
        verdict(meets_target)
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

/// A channel to `env`'s sandboxd, once `image` is pulled through ImageService (not timed).
pub async fn pulled_channel(env: &TestEnv, image: &str) -> Result<tonic::transport::Channel> {
    pull_on(env.channel().await, image).await
}

/// `channel`, once `image` is pulled through its server's ImageService (not timed).
pub async fn pull_on(
    channel: tonic::transport::Channel,
    image: &str,
) -> Result<tonic::transport::Channel> {
    let mut pull = sandboxd::pb::image_service_client::ImageServiceClient::new(channel.clone())
        .pull_image(sandboxd::pb::PullImageRequest {
            image: image.to_owned(),
        })
        .await
        .map_err(|s| status_error("PullImage", image, &s))?
        .into_inner();
    while pull
        .message()
        .await
        .map_err(|s| status_error("PullImage stream", image, &s))?
        .is_some()
    {}
    Ok(channel)
}

/// Prints a bench's `tables`, then writes its `report` as JSON to `file_name` in cargo's target
/// directory and says where.
pub fn publish(tables: &str, report: &impl Serialize, file_name: &str) -> Result<()> {
    println!("\n{tables}");
    let path = target_dir().join(file_name);
    let json = serde_json::to_string_pretty(report).context("serialize the report")?;
    std::fs::write(&path, json + "\n").with_context(|| format!("write {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
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
