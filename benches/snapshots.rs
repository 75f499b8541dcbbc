//! Snapshot latency: CommitSnapshot of a running sandbox (against the nearest raw containerd
//! steps driven by `ctr`), RestoreSandbox of a shallow against a deep snapshot, and forking a
//! sandbox from a snapshot against creating it cold from its image.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, and the sandboxd binary), pulls the image into sandboxd's namespace and into a
//! separate `ctr` namespace of the same containerd (not timed), then measures:
//!
//! * commit, `BENCH_N` (default 10) samples for each of 1 MiB and 100 MiB changed: before each
//!   sample `head -c SIZE /dev/urandom > /data/f` overwrites the same file in a running sandbox
//!   (idle PID 1) through ExecSync, then `CommitSnapshot` is timed and its pause window is read
//!   from sandboxd's log ("captured the sandbox's changes", `pause_window`). ctr has no
//!   one-command commit of a running container; its nearest equivalent, in a container started
//!   with `ctr run -d IMAGE ID /bin/sleep 1000000` and written the same way with
//!   `ctr task exec`, is `ctr tasks pause` + `ctr snapshots diff` (uncompressed tar, to
//!   /dev/null) + `ctr tasks resume`: the capture only, without sandboxd's unpack of the layer
//!   into a committed snapshot and its image record. The host's dirty pages are flushed (not
//!   timed) before each write, so each side's commit meets only its own unwritten data;
//!   sandboxd's commit calls syncfs(2) on the sandbox's writable layer inside its pause window,
//!   ctr's diff does not sync;
//! * restore, `BENCH_N` samples per snapshot: `RestoreSandbox` of one sandbox onto a shallow
//!   snapshot (one commit over the image), onto the last of a chain of `BENCH_DEPTH` (default 30)
//!   generations (write, commit, restore onto it, repeated) and onto the generation of that chain
//!   with the most layers (sandboxd squashes a snapshot into one layer past 24); the overlayfs
//!   lower-layer count of each is read back from containerd and printed;
//! * fork, `BENCH_FORK_N` (default 20) samples: `CreateSandbox{snapshot_id}` of the shallow
//!   snapshot until RUNNING against `CreateSandbox{image}` (cold, image already pulled), each
//!   sandbox deleted after its sample (not timed).
//!
//! Samples of the compared operations alternate one by one (and which goes first) so that a slow
//! spell of the machine does not fall on one side only; the load average is recorded before and
//! after. It prints tables (p50, p99, mean in ms and ratios) with the targets (commit ≤ 50 ms +
//! time proportional to the diff, deep restore ≤ 2× shallow, fork ≤ cold create), writes the same
//! figures to `target/bench-snapshots.json`, deletes every sandbox, snapshot and container it
//! made, and checks that neither namespace holds a container, task, active snapshot, lease or
//! snapshot.
//!
//! Run it as root with `cargo bench --bench snapshots`; it needs the packages of
//! `scripts/install-deps.sh`. Run without `--bench` (as `cargo test --benches` does) it only
//! prints how to run it, so it never takes part in CI's pass/fail.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::GetContainerRequest;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;
use sandboxd::pb::{self, SandboxState};
use serde::Serialize;
use tonic::transport::Channel;

use common::{namespaced, TestEnv};
use support::ctr::{CtrSide, DetachedIo};
use support::{
    announce, bench_main, env_count, publish, status_error, verdict, LoadAverages, MachineFacts,
    Summary,
};

/// Environment variable: commit samples per size and restore samples per snapshot.
const ENV_N: &str = "BENCH_N";
/// Default of [`ENV_N`].
const DEFAULT_N: usize = 10;
/// Environment variable: fork and cold-create samples.
const ENV_FORK_N: &str = "BENCH_FORK_N";
/// Default of [`ENV_FORK_N`].
const DEFAULT_FORK_N: usize = 20;
/// Environment variable: generations of the deep snapshot chain.
const ENV_DEPTH: &str = "BENCH_DEPTH";
/// Default of [`ENV_DEPTH`].
const DEFAULT_DEPTH: usize = 30;
/// Untimed samples per operation and side before measuring.
const WARMUP: usize = 1;
/// Untimed fork and cold-create samples before measuring (more: creates warm up slowly).
const FORK_WARMUP: usize = 2;
/// Bytes changed before each commit sample: 1 MiB and 100 MiB.
const COMMIT_SIZES: [u64; 2] = [1 << 20, 100 << 20];
/// Goal for commit: the fixed part (the line through both sizes' p50s, at zero bytes) at most
/// this many milliseconds.
const COMMIT_FIXED_TARGET_MS: f64 = 50.0;
/// Goal for restore: deep p50 at most this multiple of shallow p50.
const RESTORE_TARGET_RATIO: f64 = 2.0;
/// Goal for fork: fork p50 at most this multiple of cold create p50.
const FORK_TARGET_RATIO: f64 = 1.0;
/// The command `ctr run -d` gives its container: busybox's sleep, outliving the run.
const CTR_IDLE_COMMAND: &[&str] = &["/bin/sleep", "1000000"];
/// Layer media type for `ctr snapshots diff`: uncompressed, as sandboxd writes its layers.
const CTR_DIFF_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The running sandbox (and ctr container) the commits capture.
const COMMIT_ID: &str = "bench-commit";
/// The sandbox the shallow snapshot is taken from.
const SHALLOW_ID: &str = "bench-shallow";
/// The sandbox the deep chain is grown in.
const DEEP_ID: &str = "bench-deep";
/// The sandbox the restores are timed on.
const RESTORE_ID: &str = "bench-restore";
/// What sandboxd logs once a commit's diff is taken, with the `pause_window` field.
const PAUSE_LOG_MESSAGE: &str = "captured the sandbox's changes";
/// The log field holding the pause window (a Rust `Duration` in Debug form, like `12.3ms`).
const PAUSE_LOG_FIELD: &str = "pause_window";
/// containerd's overlayfs mount option listing the lower layers.
const LOWERDIR_OPTION: &str = "lowerdir=";
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-snapshots.json";
/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Result<()> {
    bench_main("snapshots", Settings::from_env, run)
}

/// Starts the fixtures, measures, cleans up, reports, and checks for leftovers.
async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let (machine, load_before) = announce(&env.containerd, &settings.render(&image)).await?;

    let sandboxd = SandboxdSide::connect(&env, &image).await?;
    let ctr = CtrSide::pulled(&env.containerd, &image).await?;

    let mut made = Made::default();
    let measured = measure(&env, &sandboxd, &ctr, &settings, &mut made).await;
    // Clean up whatever was made, also after a failed measurement.
    let cleaned = clean_up(&sandboxd, &ctr, &made).await;
    let measured = measured?;
    cleaned?;
    let load = LoadAverages::since(load_before)?;

    let report = Report::new(machine, load, &settings, &image, &measured);
    publish(&report.render_tables(), &report, JSON_FILE_NAME)?;

    check_no_leftovers(&env, &sandboxd, &ctr).await
}

// ---- settings and machine facts ----

/// What the run does, from the environment.
#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    /// Commit samples per size and side.
    commits: usize,
    /// Restore samples per snapshot.
    restores: usize,
    /// Fork and cold-create samples.
    forks: usize,
    /// Generations of the deep chain.
    depth: usize,
    /// Untimed commit and restore samples per operation and side.
    warmup: usize,
    /// Untimed fork and cold-create samples.
    fork_warmup: usize,
}

impl Settings {
    /// Reads [`ENV_N`], [`ENV_FORK_N`] and [`ENV_DEPTH`], falling back to the defaults.
    fn from_env() -> Result<Settings> {
        let n = env_count(ENV_N, DEFAULT_N)?;
        let settings = Settings {
            commits: n,
            restores: n,
            forks: env_count(ENV_FORK_N, DEFAULT_FORK_N)?,
            depth: env_count(ENV_DEPTH, DEFAULT_DEPTH)?,
            warmup: WARMUP,
            fork_warmup: FORK_WARMUP,
        };
        ensure!(settings.depth > 0, "{ENV_DEPTH} must be at least 1");
        ensure!(
            n > 0 || settings.forks > 0,
            "{ENV_N} and {ENV_FORK_N} are both 0: nothing to measure"
        );
        Ok(settings)
    }

    fn render(&self, image: &str) -> String {
        format!(
            "workload: image {image}; {} commits per size per side (1 MiB, 100 MiB), {} restores \
             per snapshot (deep chain of {} generations), {} forks and {} cold creates; \
             {} warm-up per operation ({} for fork/cold)",
            self.commits,
            self.restores,
            self.depth,
            self.forks,
            self.forks,
            self.warmup,
            self.fork_warmup
        )
    }
}

/// Flushes the host's dirty pages (`sync`), so that the next timed step meets only its own.
async fn flush_host() -> Result<()> {
    let status = tokio::process::Command::new("sync")
        .stdin(Stdio::null())
        .status()
        .await
        .context("run sync")?;
    ensure!(status.success(), "sync failed ({status})");
    Ok(())
}

/// The shell line that overwrites /data/f with `bytes` random bytes.
fn write_script(bytes: u64) -> String {
    format!("mkdir -p /data && head -c {bytes} /dev/urandom > /data/f")
}

// ---- sandboxd ----

/// sandboxd through its generated tonic clients, all calls over one channel, plus a reader of
/// its log for the pause windows.
struct SandboxdSide {
    sandboxes: SandboxServiceClient<Channel>,
    snapshots: SnapshotServiceClient<Channel>,
    image: String,
    log: LogCursor,
}

impl SandboxdSide {
    /// Connects one channel and pulls `image` through ImageService (not timed).
    async fn connect(env: &TestEnv, image: &str) -> Result<SandboxdSide> {
        let channel = support::pulled_channel(env, image).await?;
        Ok(SandboxdSide {
            sandboxes: SandboxServiceClient::new(channel.clone()),
            snapshots: SnapshotServiceClient::new(channel),
            image: image.to_owned(),
            log: LogCursor::new(env.sandboxd.log_path()),
        })
    }

    /// Creates sandbox `id` (idle PID 1) from the image, or from `snapshot` when given, and
    /// returns once the response says RUNNING.
    async fn create(&self, id: &str, snapshot: Option<&str>) -> Result<()> {
        let request = match snapshot {
            Some(snapshot) => pb::CreateSandboxRequest {
                sandbox_id: id.to_owned(),
                snapshot_id: snapshot.to_owned(),
                ..Default::default()
            },
            None => pb::CreateSandboxRequest {
                sandbox_id: id.to_owned(),
                image: self.image.clone(),
                ..Default::default()
            },
        };
        support::create_running(&self.sandboxes, request).await
    }

    /// Deletes sandbox `id` with `force`.
    async fn delete(&self, id: &str) -> Result<()> {
        support::delete_forced(&self.sandboxes, id).await
    }

    /// Runs `sh -c script` in sandbox `id` through ExecSync; fails unless it exits 0.
    async fn sh(&self, id: &str, script: &str) -> Result<()> {
        let response = self
            .sandboxes
            .clone()
            .exec_sync(pb::ExecSyncRequest {
                sandbox_id: id.to_owned(),
                args: vec!["sh".into(), "-c".into(), script.to_owned()],
                ..Default::default()
            })
            .await
            .map_err(|s| status_error(&format!("ExecSync {script:?} in"), id, &s))?
            .into_inner();
        ensure!(
            response.exit_code == 0,
            "ExecSync {script:?} in {id}: exit code {}, stderr: {}",
            response.exit_code,
            String::from_utf8_lossy(&response.stderr).trim()
        );
        Ok(())
    }

    /// CommitSnapshot of sandbox `id`; returns the new snapshot's id.
    async fn commit(&self, id: &str) -> Result<String> {
        let snapshot = self
            .snapshots
            .clone()
            .commit_snapshot(pb::CommitSnapshotRequest {
                sandbox_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| status_error("CommitSnapshot", id, &s))?
            .into_inner()
            .snapshot
            .with_context(|| format!("CommitSnapshot {id}: the response holds no snapshot"))?;
        Ok(snapshot.snapshot_id)
    }

    /// RestoreSandbox of sandbox `id` onto `snapshot`; fails unless it answers RUNNING.
    async fn restore(&self, id: &str, snapshot: &str) -> Result<()> {
        let sandbox = self
            .snapshots
            .clone()
            .restore_sandbox(pb::RestoreSandboxRequest {
                sandbox_id: id.to_owned(),
                snapshot_id: snapshot.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| status_error(&format!("RestoreSandbox onto {snapshot} of"), id, &s))?
            .into_inner()
            .sandbox
            .with_context(|| format!("RestoreSandbox {id}: the response holds no sandbox"))?;
        ensure!(
            sandbox.state() == SandboxState::Running,
            "RestoreSandbox {id} answered state {:?}, not RUNNING",
            sandbox.state()
        );
        Ok(())
    }

    /// DeleteSnapshot.
    async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        self.snapshots
            .clone()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snapshot.to_owned(),
            })
            .await
            .map_err(|s| status_error("DeleteSnapshot", snapshot, &s))?;
        Ok(())
    }

    /// How many snapshots sandboxd lists (up to one page of 1000).
    async fn snapshot_count(&self) -> Result<usize> {
        let listed = self
            .snapshots
            .clone()
            .list_snapshots(pb::ListSnapshotsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .map_err(|s| status_error("ListSnapshots", "", &s))?
            .into_inner();
        Ok(listed.snapshots.len())
    }
}

/// Reads what sandboxd appends to its log after a point.
struct LogCursor {
    path: PathBuf,
    offset: Mutex<u64>,
}

impl LogCursor {
    fn new(path: PathBuf) -> LogCursor {
        LogCursor {
            path,
            offset: Mutex::new(0),
        }
    }

    /// Moves the cursor to the log's current end.
    fn skip_to_end(&self) -> Result<()> {
        let len = std::fs::metadata(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .len();
        *self.lock() = len;
        Ok(())
    }

    /// What was appended since the cursor; moves the cursor past it.
    fn read_new(&self) -> Result<String> {
        let mut offset = self.lock();
        let mut file =
            File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(*offset))
            .with_context(|| format!("seek in {}", self.path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("read {}", self.path.display()))?;
        *offset += bytes.len() as u64;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.offset
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The pause window of the last "captured the sandbox's changes" line in `log`, human or JSON.
fn pause_window_in(log: &str) -> Option<Duration> {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(PAUSE_LOG_MESSAGE))?;
    let line = strip_ansi(line);
    let after = &line[line.find(PAUSE_LOG_FIELD)? + PAUSE_LOG_FIELD.len()..];
    let value = after.trim_start_matches(['"', ':', '=', ' ']);
    let end = value
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == 'µ'))
        .unwrap_or(value.len());
    parse_debug_duration(&value[..end])
}

/// `line` without ANSI escape sequences (sandboxd's human log format colours field names).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `Duration` from its Debug form: `1.5s`, `12.3ms`, `800µs`, `950ns`.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

// ---- ctr ----

/// What only this bench asks of the shared ctr side.
impl CtrSide<'_> {
    /// The nearest equivalent of a commit of running container `id`: pause, diff its writable
    /// snapshot against its parent (uncompressed, to /dev/null), resume. Returns the total and the
    /// window from the pause command's exit to the resume command's exit.
    async fn pause_diff_resume(&self, id: &str) -> Result<(Duration, Duration)> {
        let start = Instant::now();
        self.ctr(&["tasks", "pause", id]).await?;
        let paused = Instant::now();
        let diff = self
            .ctr_stdout_to_null(&["snapshots", "diff", "--media-type", CTR_DIFF_MEDIA_TYPE, id])
            .await;
        // Resume even when the diff failed: the container must not stay frozen.
        let resumed = self.ctr(&["tasks", "resume", id]).await;
        let end = Instant::now();
        diff?;
        resumed?;
        Ok((end - start, end - paused))
    }
}

// ---- measuring ----

/// What the run made and has not deleted yet, for the cleanup.
#[derive(Debug, Default)]
struct Made {
    /// sandboxd sandboxes.
    sandboxes: BTreeSet<String>,
    /// sandboxd snapshots, oldest first (a later one may build on an earlier one).
    snapshots: Vec<String>,
    /// ctr containers.
    containers: BTreeSet<String>,
}

/// Commit samples of one size on both sides.
#[derive(Debug, Default)]
struct CommitSamples {
    bytes: u64,
    sandboxd: Vec<Duration>,
    sandboxd_pause: Vec<Duration>,
    /// Commits whose log line held no readable pause window.
    sandboxd_pause_missing: usize,
    ctr: Vec<Duration>,
    ctr_pause: Vec<Duration>,
}

/// A snapshot restores were timed on, with how deep it is.
#[derive(Debug, Clone, Serialize)]
struct RestoreTarget {
    /// What it is, for the table.
    name: String,
    /// Its id.
    snapshot_id: String,
    /// Generations of commits behind it.
    generations: usize,
    /// overlayfs lower layers of a sandbox restored onto it.
    layers: usize,
}

/// Everything measured.
#[derive(Debug, Default)]
struct Measured {
    commits: Vec<CommitSamples>,
    restore_targets: Vec<RestoreTarget>,
    /// Per restore target, in the same order.
    restores: Vec<Vec<Duration>>,
    forks: Vec<Duration>,
    colds: Vec<Duration>,
    /// overlayfs lower layers of the deep chain's sandbox after each generation.
    chain_layers: Vec<usize>,
}

impl Measured {
    /// [`Measured::chain_layers`] for display, like "1 2 3 2".
    fn chain_layers_text(&self) -> String {
        self.chain_layers
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs the commit, restore and fork phases, recording in `made` what needs deleting.
async fn measure(
    env: &TestEnv,
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
    settings: &Settings,
    made: &mut Made,
) -> Result<Measured> {
    let mut measured = Measured::default();
    if settings.commits > 0 {
        measure_commits(sandboxd, ctr, settings, made, &mut measured).await?;
    }
    if settings.restores > 0 || settings.forks > 0 {
        build_snapshots(env, sandboxd, settings, made, &mut measured).await?;
    }
    if settings.restores > 0 {
        measure_restores(env, sandboxd, settings, made, &mut measured).await?;
    }
    if settings.forks > 0 {
        measure_forks(sandboxd, settings, &mut measured).await?;
    }
    Ok(measured)
}

/// Commit samples of every size, the sides alternating.
async fn measure_commits(
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
    settings: &Settings,
    made: &mut Made,
    measured: &mut Measured,
) -> Result<()> {
    made.sandboxes.insert(COMMIT_ID.to_owned());
    sandboxd.create(COMMIT_ID, None).await?;
    made.containers.insert(COMMIT_ID.to_owned());
    ctr.run_detached(COMMIT_ID, DetachedIo::Null, CTR_IDLE_COMMAND)
        .await?;
    let mut exec_serial = 0usize;
    for bytes in COMMIT_SIZES {
        println!(
            "commit with {:.0} MiB changed: {} per side ...",
            bytes as f64 / MIB,
            settings.commits
        );
        let mut samples = CommitSamples {
            bytes,
            ..Default::default()
        };
        for i in 0..settings.warmup + settings.commits {
            let script = write_script(bytes);
            exec_serial += 1;
            let exec_id = format!("bench-write-{exec_serial:03}");
            let sandboxd_sample = async {
                flush_host().await?;
                sandboxd.sh(COMMIT_ID, &script).await?;
                sandboxd.log.skip_to_end()?;
                let start = Instant::now();
                let snapshot = sandboxd.commit(COMMIT_ID).await?;
                let latency = start.elapsed();
                let pause = pause_window_in(&sandboxd.log.read_new()?);
                sandboxd.delete_snapshot(&snapshot).await?;
                Ok((latency, pause))
            };
            let ctr_sample = async {
                flush_host().await?;
                ctr.exec(COMMIT_ID, &exec_id, &["sh", "-c", &script], false)
                    .await?;
                ctr.pause_diff_resume(COMMIT_ID).await
            };
            let ((latency, pause), (ctr_latency, ctr_pause)) =
                alternate(i, sandboxd_sample, ctr_sample).await?;
            if i < settings.warmup {
                continue;
            }
            samples.sandboxd.push(latency);
            match pause {
                Some(pause) => samples.sandboxd_pause.push(pause),
                None => samples.sandboxd_pause_missing += 1,
            }
            samples.ctr.push(ctr_latency);
            samples.ctr_pause.push(ctr_pause);
        }
        measured.commits.push(samples);
    }
    sandboxd.delete(COMMIT_ID).await?;
    made.sandboxes.remove(COMMIT_ID);
    ctr.delete(COMMIT_ID).await?;
    made.containers.remove(COMMIT_ID);
    Ok(())
}

/// Makes the shallow snapshot (one commit over the image) and the deep chain (write, commit,
/// restore onto it, `depth` times), recording the layer count of each generation.
async fn build_snapshots(
    env: &TestEnv,
    sandboxd: &SandboxdSide,
    settings: &Settings,
    made: &mut Made,
    measured: &mut Measured,
) -> Result<()> {
    println!(
        "building the shallow snapshot and a chain of {} generations ...",
        settings.depth
    );
    made.sandboxes.insert(SHALLOW_ID.to_owned());
    sandboxd.create(SHALLOW_ID, None).await?;
    sandboxd
        .sh(SHALLOW_ID, "mkdir -p /data && echo shallow > /data/gen")
        .await?;
    let shallow = sandboxd.commit(SHALLOW_ID).await?;
    made.snapshots.push(shallow.clone());
    sandboxd.restore(SHALLOW_ID, &shallow).await?;
    let shallow_layers = lower_layers(env, SHALLOW_ID).await?;
    measured.restore_targets.push(RestoreTarget {
        name: "shallow".to_owned(),
        snapshot_id: shallow,
        generations: 1,
        layers: shallow_layers,
    });

    made.sandboxes.insert(DEEP_ID.to_owned());
    sandboxd.create(DEEP_ID, None).await?;
    sandboxd.sh(DEEP_ID, "mkdir -p /gen").await?;
    let mut chain = Vec::with_capacity(settings.depth);
    for generation in 0..settings.depth {
        sandboxd
            .sh(DEEP_ID, &format!("echo {generation} > /gen/{generation}"))
            .await?;
        let snapshot = sandboxd.commit(DEEP_ID).await?;
        made.snapshots.push(snapshot.clone());
        sandboxd.restore(DEEP_ID, &snapshot).await?;
        measured
            .chain_layers
            .push(lower_layers(env, DEEP_ID).await?);
        chain.push(snapshot);
    }
    let last = settings.depth - 1;
    measured.restore_targets.push(RestoreTarget {
        name: format!("deep ({} gen)", settings.depth),
        snapshot_id: chain[last].clone(),
        generations: settings.depth,
        layers: measured.chain_layers[last],
    });
    // The generation with the most layers, when squashing left the last one shallower.
    let widest = (0..settings.depth)
        .max_by_key(|&g| (measured.chain_layers[g], g))
        .unwrap_or(last);
    if measured.chain_layers[widest] > measured.chain_layers[last] {
        measured.restore_targets.push(RestoreTarget {
            name: format!("widest (gen {})", widest + 1),
            snapshot_id: chain[widest].clone(),
            generations: widest + 1,
            layers: measured.chain_layers[widest],
        });
    }
    println!(
        "lower layers after each generation: {}",
        measured.chain_layers_text()
    );
    Ok(())
}

/// Restores one sandbox onto each target in turn (the order rotating per sample).
async fn measure_restores(
    env: &TestEnv,
    sandboxd: &SandboxdSide,
    settings: &Settings,
    made: &mut Made,
    measured: &mut Measured,
) -> Result<()> {
    let targets = measured.restore_targets.clone();
    println!(
        "restore: {} per snapshot ({}) ...",
        settings.restores,
        targets
            .iter()
            .map(|t| format!("{}: {} layers", t.name, t.layers))
            .collect::<Vec<_>>()
            .join(", ")
    );
    made.sandboxes.insert(RESTORE_ID.to_owned());
    sandboxd.create(RESTORE_ID, None).await?;
    measured.restores = vec![Vec::new(); targets.len()];
    for i in 0..settings.warmup + settings.restores {
        for k in 0..targets.len() {
            let t = (i + k) % targets.len();
            let start = Instant::now();
            sandboxd
                .restore(RESTORE_ID, &targets[t].snapshot_id)
                .await?;
            let latency = start.elapsed();
            if i >= settings.warmup {
                measured.restores[t].push(latency);
            }
        }
    }
    // The restored filesystems have the layers counted when the chain was built.
    for target in &targets {
        sandboxd.restore(RESTORE_ID, &target.snapshot_id).await?;
        let layers = lower_layers(env, RESTORE_ID).await?;
        ensure!(
            layers == target.layers,
            "restored onto {} ({}): {layers} lower layers, {} when it was made",
            target.name,
            target.snapshot_id,
            target.layers
        );
    }
    Ok(())
}

/// Forks of the shallow snapshot against cold creates from the image, alternating.
async fn measure_forks(
    sandboxd: &SandboxdSide,
    settings: &Settings,
    measured: &mut Measured,
) -> Result<()> {
    let shallow = measured
        .restore_targets
        .first()
        .context("no shallow snapshot to fork")?
        .snapshot_id
        .clone();
    println!("fork vs cold create: {} each ...", settings.forks);
    for i in 0..settings.fork_warmup + settings.forks {
        let fork_id = format!("bench-fork-{i:03}");
        let cold_id = format!("bench-cold-{i:03}");
        let (fork, cold) = alternate(
            i,
            timed_create(sandboxd, &fork_id, Some(&shallow)),
            timed_create(sandboxd, &cold_id, None),
        )
        .await?;
        if i >= settings.fork_warmup {
            measured.forks.push(fork);
            measured.colds.push(cold);
        }
    }
    Ok(())
}

/// Creates sandbox `id` (from `snapshot` or the image) and times it to RUNNING; deletes it
/// afterwards (not timed).
async fn timed_create(
    sandboxd: &SandboxdSide,
    id: &str,
    snapshot: Option<&str>,
) -> Result<Duration> {
    let start = Instant::now();
    let created = sandboxd.create(id, snapshot).await;
    let latency = start.elapsed();
    match created {
        Ok(()) => {
            sandboxd.delete(id).await?;
            Ok(latency)
        }
        Err(e) => {
            // A failed create leaves nothing behind by contract; delete in case it did.
            let _ = sandboxd.delete(id).await;
            Err(e)
        }
    }
}

/// Runs sample `i` of two operations one after the other, the first one first on even `i`, the
/// second first on odd; returns (first, second).
async fn alternate<A, B>(
    i: usize,
    first: impl Future<Output = Result<A>>,
    second: impl Future<Output = Result<B>>,
) -> Result<(A, B)> {
    if i % 2 == 0 {
        let a = first.await?;
        let b = second.await?;
        Ok((a, b))
    } else {
        let b = second.await?;
        let a = first.await?;
        Ok((a, b))
    }
}

/// The number of overlayfs lower layers of sandbox `id`'s writable snapshot, from containerd.
async fn lower_layers(env: &TestEnv, id: &str) -> Result<usize> {
    let channel = env.containerd.channel().await;
    let container = ContainersClient::new(channel.clone())
        .get(namespaced(
            &env.namespace,
            GetContainerRequest { id: id.to_owned() },
        ))
        .await
        .with_context(|| format!("containerd Containers.Get {id}"))?
        .into_inner()
        .container
        .with_context(|| format!("containerd has no container {id}"))?;
    let mounts = SnapshotsClient::new(channel)
        .mounts(namespaced(
            &env.namespace,
            MountsRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            },
        ))
        .await
        .with_context(|| format!("containerd Snapshots.Mounts {}", container.snapshot_key))?
        .into_inner()
        .mounts;
    Ok(mounts
        .iter()
        .flat_map(|m| m.options.iter())
        .find_map(|option| option.strip_prefix(LOWERDIR_OPTION))
        .map_or(0, |dirs| dirs.split(':').count()))
}

/// Deletes every sandbox, snapshot (newest first) and ctr container in `made`; reports all
/// failures at once.
async fn clean_up(sandboxd: &SandboxdSide, ctr: &CtrSide<'_>, made: &Made) -> Result<()> {
    let mut failures = Vec::new();
    for id in &made.sandboxes {
        if let Err(e) = sandboxd.delete(id).await {
            failures.push(format!("{e:#}"));
        }
    }
    for snapshot in made.snapshots.iter().rev() {
        if let Err(e) = sandboxd.delete_snapshot(snapshot).await {
            failures.push(format!("{e:#}"));
        }
    }
    for id in &made.containers {
        if let Err(e) = ctr.delete(id).await {
            failures.push(format!("{e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("cleanup failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Fails, listing them, if sandboxd still lists a snapshot or if sandboxd's or ctr's namespace
/// still holds containers, tasks, active snapshots or leases (and, for sandboxd, cgroups).
async fn check_no_leftovers(
    env: &TestEnv,
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
) -> Result<()> {
    let snapshots = sandboxd.snapshot_count().await?;
    let sandboxd_leaks = env.leaks().await;
    let ctr_leaks = ctr.leaks().await;
    ensure!(
        snapshots == 0 && sandboxd_leaks.is_empty() && ctr_leaks.is_empty(),
        "leftovers after the run:\nsandboxd: {snapshots} snapshots; {sandboxd_leaks}\nctr: {ctr_leaks}"
    );
    println!(
        "leftover check: no sandboxd snapshot; both namespaces hold no container, task, active \
         snapshot or lease"
    );
    Ok(())
}

// ---- statistics and report ----

/// One row: an operation measured two ways (sandboxd/ctr, deep/shallow, fork/cold).
#[derive(Debug, Clone, Serialize)]
struct Row {
    operation: String,
    left: Summary,
    right: Summary,
    /// left p50 / right p50.
    ratio_p50: f64,
    /// left mean / right mean.
    ratio_mean: f64,
    /// left p50 ≤ this × right p50 is the goal, when the row has one.
    target_ratio: Option<f64>,
    meets_target: Option<bool>,
}

impl Row {
    fn new(
        operation: String,
        left: &[Duration],
        right: &[Duration],
        target: Option<f64>,
    ) -> Option<Row> {
        let (left, right) = (Summary::of(left)?, Summary::of(right)?);
        let ratio_p50 = left.p50_ms / right.p50_ms;
        Some(Row {
            operation,
            left,
            right,
            ratio_p50,
            ratio_mean: left.mean_ms / right.mean_ms,
            target_ratio: target,
            meets_target: target.map(|t| ratio_p50 <= t),
        })
    }
}

/// A table: rows comparing a left and a right column group.
#[derive(Debug, Clone, Serialize)]
struct Table {
    title: String,
    left: String,
    right: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Table {
    fn render(&self) -> String {
        let mut out = format!(
            "{:<36} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} {:>10} {:>6}\n",
            self.title,
            format!("{} p50", self.left),
            format!("{} p99", self.left),
            format!("{} mean", self.left),
            format!("{} p50", self.right),
            format!("{} p99", self.right),
            format!("{} mean", self.right),
            "ratio p50",
            "ratio mean",
            "target"
        );
        out.push_str(&"-".repeat(out.chars().count() - 1));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!(
                "{:<36} {:>9.1} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} | {:>8.2}x {:>9.2}x {:>6}\n",
                row.operation,
                row.left.p50_ms,
                row.left.p99_ms,
                row.left.mean_ms,
                row.right.p50_ms,
                row.right.p99_ms,
                row.right.mean_ms,
                row.ratio_p50,
                row.ratio_mean,
                match row.meets_target {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "-",
                }
            ));
        }
        for note in &self.notes {
            out.push_str(note);
            out.push('\n');
        }
        out
    }
}

/// The commit target, judged on the line through the two sizes' p50s.
#[derive(Debug, Clone, Copy, Serialize)]
struct CommitFit {
    /// Extrapolated p50 at zero bytes changed.
    fixed_ms: f64,
    /// p50 added per MiB changed.
    ms_per_mib: f64,
    /// The fixed part as a goal.
    target_fixed_ms: f64,
    meets_target: bool,
}

impl CommitFit {
    /// The line through (size, p50) of the smallest and the largest size; `None` with fewer than
    /// two sizes measured.
    fn of(commits: &[CommitSamples]) -> Option<CommitFit> {
        let (small, large) = (commits.first()?, commits.last()?);
        let (s, l) = (Summary::of(&small.sandboxd)?, Summary::of(&large.sandboxd)?);
        let (s_mib, l_mib) = (small.bytes as f64 / MIB, large.bytes as f64 / MIB);
        if l_mib <= s_mib {
            return None;
        }
        let ms_per_mib = (l.p50_ms - s.p50_ms) / (l_mib - s_mib);
        let fixed_ms = s.p50_ms - ms_per_mib * s_mib;
        Some(CommitFit {
            fixed_ms,
            ms_per_mib,
            target_fixed_ms: COMMIT_FIXED_TARGET_MS,
            meets_target: fixed_ms <= COMMIT_FIXED_TARGET_MS,
        })
    }
}

/// Everything the run found, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: MachineFacts,
    load_average_1min: LoadAverages,
    settings: Settings,
    image: String,
    tables: Vec<Table>,
    commit_fit: Option<CommitFit>,
    restore_targets: Vec<RestoreTarget>,
    /// overlayfs lower layers of the deep chain's sandbox after each generation.
    chain_layers: Vec<usize>,
}

impl Report {
    fn new(
        machine: MachineFacts,
        load: LoadAverages,
        settings: &Settings,
        image: &str,
        measured: &Measured,
    ) -> Report {
        let mut tables = Vec::new();
        let commit_fit = CommitFit::of(&measured.commits);
        if !measured.commits.is_empty() {
            tables.push(commit_table(measured, commit_fit));
        }
        if let Some(table) = restore_table(measured) {
            tables.push(table);
        }
        if let Some(row) = Row::new(
            "create → RUNNING".to_owned(),
            &measured.forks,
            &measured.colds,
            Some(FORK_TARGET_RATIO),
        ) {
            tables.push(Table {
                title: "fork vs cold create (ms)".to_owned(),
                left: "fork".to_owned(),
                right: "cold".to_owned(),
                rows: vec![row],
                notes: vec![format!(
                    "fork = CreateSandbox{{snapshot_id}} of the shallow snapshot; cold = \
                     CreateSandbox{{image}}, image already pulled; both idle PID 1, to RUNNING; \
                     target: fork p50 ≤ {FORK_TARGET_RATIO}× cold p50"
                )],
            });
        }
        Report {
            machine,
            load_average_1min: load,
            settings: *settings,
            image: image.to_owned(),
            tables,
            commit_fit,
            restore_targets: measured.restore_targets.clone(),
            chain_layers: measured.chain_layers.clone(),
        }
    }

    /// The plain-text tables with the target verdicts.
    fn render_tables(&self) -> String {
        let mut out = String::new();
        for table in &self.tables {
            out.push_str(&table.render());
            out.push('\n');
        }
        out.push_str(&self.load_average_1min.render());
        out
    }
}

/// The commit table: full CommitSnapshot and pause window per size, against ctr's capture.
fn commit_table(measured: &Measured, fit: Option<CommitFit>) -> Table {
    // All commit rows, then all pause-window rows.
    let mut rows = Vec::new();
    let mut pause_rows = Vec::new();
    for samples in &measured.commits {
        let mib = samples.bytes as f64 / MIB;
        rows.extend(Row::new(
            format!("commit, {mib:.0} MiB changed"),
            &samples.sandboxd,
            &samples.ctr,
            None,
        ));
        pause_rows.extend(Row::new(
            format!("pause window, {mib:.0} MiB"),
            &samples.sandboxd_pause,
            &samples.ctr_pause,
            None,
        ));
    }
    rows.append(&mut pause_rows);
    let mut notes = vec![
        "commit: sbx = CommitSnapshot RPC (pause, syncfs, diff, resume, unpack into a committed \
         snapshot, image record); ctr = `ctr tasks pause` + `ctr snapshots diff` (uncompressed \
         tar to /dev/null) + `ctr tasks resume`, capture only: ctr has no commit of a running \
         container"
            .to_owned(),
        "pause window: sbx = pause_window from sandboxd's log (Pause RPC to Resume RPC); ctr = \
         from `ctr tasks pause` exiting to `ctr tasks resume` exiting"
            .to_owned(),
    ];
    let missing: usize = measured
        .commits
        .iter()
        .map(|s| s.sandboxd_pause_missing)
        .sum();
    if missing > 0 {
        notes.push(format!(
            "{missing} commits logged no readable pause_window (left out of the pause rows)"
        ));
    }
    notes.push(match fit {
        Some(fit) => format!(
            "target: commit ≤ {} ms + time proportional to the diff: fixed part {:.1} ms, \
             {:.2} ms per MiB changed (≈ {:.0} MiB/s) from the line through both p50s → {}",
            fit.target_fixed_ms,
            fit.fixed_ms,
            fit.ms_per_mib,
            if fit.ms_per_mib > 0.0 {
                1e3 / fit.ms_per_mib
            } else {
                f64::INFINITY
            },
            verdict(fit.meets_target)
        ),
        None => "target: commit ≤ 50 ms + proportional: needs both sizes measured".to_owned(),
    });
    Table {
        title: "commit, running sandbox (ms)".to_owned(),
        left: "sbx".to_owned(),
        right: "ctr".to_owned(),
        rows,
        notes,
    }
}

/// The restore table: every deeper target against the shallow one.
fn restore_table(measured: &Measured) -> Option<Table> {
    let shallow = measured.restores.first()?;
    let shallow_target = measured.restore_targets.first()?;
    let rows: Vec<Row> = measured
        .restore_targets
        .iter()
        .zip(&measured.restores)
        .skip(1)
        .filter_map(|(target, samples)| {
            Row::new(
                format!("restore {}, {} layers", target.name, target.layers),
                samples,
                shallow,
                Some(RESTORE_TARGET_RATIO),
            )
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    Some(Table {
        title: "restore (ms)".to_owned(),
        left: "deep".to_owned(),
        right: "shal".to_owned(),
        rows,
        notes: vec![
            format!(
                "shal = RestoreSandbox onto a snapshot of one commit ({} lower layers); deep = onto \
                 the snapshot named in the row (a chain of write, commit, restore); a running \
                 sandbox with idle PID 1, restored to RUNNING",
                shallow_target.layers
            ),
            format!(
                "lower layers after each generation of the chain: {}",
                measured.chain_layers_text()
            ),
            format!("target: deep p50 ≤ {RESTORE_TARGET_RATIO}× shallow p50"),
        ],
    })
}
