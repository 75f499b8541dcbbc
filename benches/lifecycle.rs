//! Sandbox lifecycle latency: sandboxd against raw containerd driven by `ctr`.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, and the sandboxd binary), pulls the image into sandboxd's namespace and into a
//! separate `ctr` namespace of the same containerd (not timed), then times the same work on both:
//!
//! * create → RUNNING: `CreateSandbox` with no command (the idle PID 1) until the response says
//!   RUNNING, against `ctr run -d IMAGE ID /bin/sleep 1000000`;
//! * delete: `DeleteSandbox{force: true}`, against `ctr tasks delete --force ID` (wait, SIGKILL
//!   to all processes, wait for exit, delete the task) followed by `ctr containers delete ID`
//!   (container and its writable snapshot);
//!
//! first `BENCH_N` (default 50) sandboxes one after another (all created, then all deleted),
//! then `BENCH_ROUNDS` (default 3) rounds of 20 concurrent creates followed by 20 concurrent
//! deletes. sandboxd is called through one gRPC channel; `ctr` is one process per call, so the
//! concurrent rounds start 20 `ctr` processes at once. The two sides take turns phase by phase,
//! and the load average is recorded before and after, since other work skews a 2-core machine.
//!
//! It prints a table (p50, p99, mean in ms and the sandboxd/ctr ratios) with the target of
//! sandboxd ≤ 0.8× ctr, writes the same figures to `target/bench-lifecycle.json`, and checks that
//! neither side left a container, task, active snapshot or lease behind.
//!
//! Run it as root with `cargo bench --bench lifecycle`; it needs the packages of
//! `scripts/install-deps.sh`. Run without `--bench` (as `cargo test --benches` does) it only
//! prints how to run it, so it never takes part in CI's pass/fail.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::future::join_all;
use sandboxd::pb;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use common::TestEnv;
use support::ctr::{check_no_leftovers, CtrSide, DetachedIo};
use support::{
    announce, bench_main, env_count, latency_header, latency_row, publish, LoadAverages,
    MachineFacts, Summary,
};

/// Environment variable: how many sandboxes the sequential phase creates and deletes.
const ENV_N: &str = "BENCH_N";
/// Default of [`ENV_N`].
const DEFAULT_N: usize = 50;
/// Environment variable: how many concurrent create/delete rounds run.
const ENV_ROUNDS: &str = "BENCH_ROUNDS";
/// Default of [`ENV_ROUNDS`].
const DEFAULT_ROUNDS: usize = 3;
/// Sandboxes created (then deleted) at once in each concurrent round.
const CONCURRENCY: usize = 20;
/// Untimed create/delete pairs per side before measuring (first-use costs: cgroup parents,
/// connection set-up, page cache).
const WARMUP: usize = 2;
/// The goal: sandboxd's latency at most this fraction of ctr's (compared on p50).
const TARGET_RATIO: f64 = 0.8;
/// The command `ctr run` gives the container: busybox's sleep, long enough to outlive the run.
const CTR_COMMAND: &[&str] = &["/bin/sleep", "1000000"];
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-lifecycle.json";

fn main() -> Result<()> {
    bench_main("lifecycle", Settings::from_env, run)
}

/// Starts the fixtures, measures both sides, reports, and checks for leftovers.
async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let (machine, load_before) = announce(&env.containerd, &settings.render(&image)).await?;

    let sandboxd = SandboxdSide::connect(&env, &image).await?;
    let ctr = CtrSide::pulled(&env.containerd, &image).await?;

    let (sandboxd_samples, ctr_samples) = measure_both(&sandboxd, &ctr, &settings).await?;
    let load = LoadAverages::since(load_before)?;

    let report = Report::new(
        machine,
        load,
        &settings,
        &image,
        &sandboxd_samples,
        &ctr_samples,
    );
    publish(&report.render_table(), &report, JSON_FILE_NAME)?;

    check_no_leftovers(&env, &ctr).await
}

// ---- settings and machine facts ----

/// What the run does, from the environment.
#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    /// Sandboxes in the sequential phase.
    sequential: usize,
    /// Concurrent rounds.
    rounds: usize,
    /// Sandboxes per concurrent round.
    concurrency: usize,
    /// Untimed warm-up create/delete pairs per side.
    warmup: usize,
}

impl Settings {
    /// Reads [`ENV_N`] and [`ENV_ROUNDS`], falling back to the defaults.
    fn from_env() -> Result<Settings> {
        let sequential = env_count(ENV_N, DEFAULT_N)?;
        let rounds = env_count(ENV_ROUNDS, DEFAULT_ROUNDS)?;
        ensure!(
            sequential > 0 || rounds > 0,
            "{ENV_N} and {ENV_ROUNDS} are both 0: nothing to measure"
        );
        Ok(Settings {
            sequential,
            rounds,
            concurrency: CONCURRENCY,
            warmup: WARMUP,
        })
    }

    fn render(&self, image: &str) -> String {
        format!(
            "workload: image {image}; {} sequential, {} rounds of {} concurrent, {} warm-up per side",
            self.sequential, self.rounds, self.concurrency, self.warmup
        )
    }
}

// ---- the two sides ----

/// Something that creates running sandboxes and deletes them, the thing being timed.
trait Side {
    /// Short name for messages and the table.
    const NAME: &'static str;

    /// Creates sandbox `id` and returns once it runs.
    async fn create(&self, id: &str) -> Result<()>;

    /// Deletes sandbox `id` with everything it holds (task, container, writable snapshot).
    async fn delete(&self, id: &str) -> Result<()>;
}

/// sandboxd through its generated tonic client, all calls over one channel.
struct SandboxdSide {
    client: SandboxServiceClient<Channel>,
    image: String,
}

impl SandboxdSide {
    /// Connects one channel and pulls `image` through ImageService (not timed).
    async fn connect(env: &TestEnv, image: &str) -> Result<SandboxdSide> {
        let channel = support::pulled_channel(env, image).await?;
        Ok(SandboxdSide {
            client: SandboxServiceClient::new(channel),
            image: image.to_owned(),
        })
    }
}

impl Side for SandboxdSide {
    const NAME: &'static str = "sandboxd";

    async fn create(&self, id: &str) -> Result<()> {
        let request = pb::CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            image: self.image.clone(),
            ..Default::default()
        };
        support::create_running(&self.client, request).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        support::delete_forced(&self.client, id).await
    }
}

impl Side for CtrSide<'_> {
    const NAME: &'static str = "ctr";

    async fn create(&self, id: &str) -> Result<()> {
        self.run_detached(id, DetachedIo::Fifos, CTR_COMMAND).await
    }

    async fn delete(&self, id: &str) -> Result<()> {
        CtrSide::delete(self, id).await
    }
}

// ---- measuring ----

/// Latencies of one side, per operation.
#[derive(Debug, Default)]
struct Samples {
    create_sequential: Vec<Duration>,
    delete_sequential: Vec<Duration>,
    create_concurrent: Vec<Duration>,
    delete_concurrent: Vec<Duration>,
    /// Wall time of each concurrent create round (first start to last finish).
    create_round_walls: Vec<Duration>,
    /// Wall time of each concurrent delete round.
    delete_round_walls: Vec<Duration>,
}

/// Runs the warm-up, the sequential phase and the concurrent rounds, alternating between the
/// sides phase by phase so that a slow spell of the machine does not fall on one side only.
async fn measure_both(
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
    settings: &Settings,
) -> Result<(Samples, Samples)> {
    let (mut sandboxd_samples, mut ctr_samples) = (Samples::default(), Samples::default());
    println!("warming up ...");
    warm_up(sandboxd, settings.warmup).await?;
    warm_up(ctr, settings.warmup).await?;
    println!("sequential: {} sandboxes per side ...", settings.sequential);
    sequential(sandboxd, settings.sequential, &mut sandboxd_samples).await?;
    sequential(ctr, settings.sequential, &mut ctr_samples).await?;
    for round in 0..settings.rounds {
        println!(
            "concurrent round {}/{}: {} at once per side ...",
            round + 1,
            settings.rounds,
            settings.concurrency
        );
        concurrent_round(sandboxd, round, settings.concurrency, &mut sandboxd_samples).await?;
        concurrent_round(ctr, round, settings.concurrency, &mut ctr_samples).await?;
    }
    Ok((sandboxd_samples, ctr_samples))
}

/// Creates and deletes `count` sandboxes on `side` without timing them.
async fn warm_up<S: Side>(side: &S, count: usize) -> Result<()> {
    for i in 0..count {
        let id = format!("bench-warmup-{i}");
        side.create(&id)
            .await
            .with_context(|| format!("{}: warm-up", S::NAME))?;
        side.delete(&id)
            .await
            .with_context(|| format!("{}: warm-up", S::NAME))?;
    }
    Ok(())
}

/// Creates `count` sandboxes one after another, then deletes them one after another.
async fn sequential<S: Side>(side: &S, count: usize, samples: &mut Samples) -> Result<()> {
    let ids: Vec<String> = (0..count).map(|i| format!("bench-seq-{i:04}")).collect();
    for id in &ids {
        let latency = timed(side.create(id))
            .await
            .with_context(|| format!("{}: sequential create", S::NAME))?;
        samples.create_sequential.push(latency);
    }
    for id in &ids {
        let latency = timed(side.delete(id))
            .await
            .with_context(|| format!("{}: sequential delete", S::NAME))?;
        samples.delete_sequential.push(latency);
    }
    Ok(())
}

/// Creates `concurrency` sandboxes at once, then deletes them all at once.
async fn concurrent_round<S: Side>(
    side: &S,
    round: usize,
    concurrency: usize,
    samples: &mut Samples,
) -> Result<()> {
    let ids: Vec<String> = (0..concurrency)
        .map(|i| format!("bench-r{round}-{i:02}"))
        .collect();
    let (latencies, wall) = concurrently(&ids, |id| side.create(id))
        .await
        .with_context(|| format!("{}: concurrent create round {round}", S::NAME))?;
    samples.create_concurrent.extend(latencies);
    samples.create_round_walls.push(wall);
    let (latencies, wall) = concurrently(&ids, |id| side.delete(id))
        .await
        .with_context(|| format!("{}: concurrent delete round {round}", S::NAME))?;
    samples.delete_concurrent.extend(latencies);
    samples.delete_round_walls.push(wall);
    Ok(())
}

/// How long `operation` takes to succeed.
async fn timed(operation: impl Future<Output = Result<()>>) -> Result<Duration> {
    let start = Instant::now();
    operation.await?;
    Ok(start.elapsed())
}

/// Starts `operation` for every id at once; returns each one's latency and the wall time of the
/// whole batch, or every failure (all operations run to completion first).
async fn concurrently<'a, F, Fut>(
    ids: &'a [String],
    operation: F,
) -> Result<(Vec<Duration>, Duration)>
where
    F: Fn(&'a str) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let results = join_all(ids.iter().map(|id| timed(operation(id)))).await;
    let wall = start.elapsed();
    let mut latencies = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(latency) => latencies.push(latency),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} operations failed:\n  {}",
            failures.len(),
            ids.len(),
            failures.join("\n  ")
        );
    }
    Ok((latencies, wall))
}

// ---- statistics and report ----

/// One row of the table: an operation on both sides.
#[derive(Debug, Clone, Serialize)]
struct Row {
    operation: String,
    sandboxd: Summary,
    ctr: Summary,
    /// sandboxd p50 / ctr p50.
    ratio_p50: f64,
    /// sandboxd mean / ctr mean.
    ratio_mean: f64,
    /// Whether `ratio_p50` ≤ [`TARGET_RATIO`].
    meets_target: bool,
}

impl Row {
    fn new(operation: String, sandboxd: &[Duration], ctr: &[Duration]) -> Option<Row> {
        let (sandboxd, ctr) = (Summary::of(sandboxd)?, Summary::of(ctr)?);
        let ratio_p50 = sandboxd.p50_ms / ctr.p50_ms;
        Some(Row {
            operation,
            sandboxd,
            ctr,
            ratio_p50,
            ratio_mean: sandboxd.mean_ms / ctr.mean_ms,
            meets_target: ratio_p50 <= TARGET_RATIO,
        })
    }
}

/// Wall times of the concurrent rounds, in milliseconds.
#[derive(Debug, Clone, Serialize)]
struct RoundWalls {
    create_ms: Vec<f64>,
    delete_ms: Vec<f64>,
}

impl RoundWalls {
    fn of(samples: &Samples) -> RoundWalls {
        let ms = |walls: &[Duration]| walls.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        RoundWalls {
            create_ms: ms(&samples.create_round_walls),
            delete_ms: ms(&samples.delete_round_walls),
        }
    }
}

/// Everything the run found, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: MachineFacts,
    load_average_1min: LoadAverages,
    settings: Settings,
    image: String,
    target_ratio: f64,
    rows: Vec<Row>,
    sandboxd_round_walls: RoundWalls,
    ctr_round_walls: RoundWalls,
}

impl Report {
    fn new(
        machine: MachineFacts,
        load: LoadAverages,
        settings: &Settings,
        image: &str,
        sandboxd: &Samples,
        ctr: &Samples,
    ) -> Report {
        let concurrent =
            |operation: &str| format!("{operation} concurrent({})", settings.concurrency);
        let rows = [
            Row::new(
                "create→RUNNING sequential".to_owned(),
                &sandboxd.create_sequential,
                &ctr.create_sequential,
            ),
            Row::new(
                "delete sequential".to_owned(),
                &sandboxd.delete_sequential,
                &ctr.delete_sequential,
            ),
            Row::new(
                concurrent("create"),
                &sandboxd.create_concurrent,
                &ctr.create_concurrent,
            ),
            Row::new(
                concurrent("delete"),
                &sandboxd.delete_concurrent,
                &ctr.delete_concurrent,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        Report {
            machine,
            load_average_1min: load,
            settings: *settings,
            image: image.to_owned(),
            target_ratio: TARGET_RATIO,
            rows,
            sandboxd_round_walls: RoundWalls::of(sandboxd),
            ctr_round_walls: RoundWalls::of(ctr),
        }
    }

    /// The plain-text table with the target verdicts and the round wall times.
    fn render_table(&self) -> String {
        let mut out = latency_header();
        for row in &self.rows {
            out.push_str(&latency_row(
                &row.operation,
                &row.sandboxd,
                &row.ctr,
                row.ratio_p50,
                row.ratio_mean,
                row.meets_target,
            ));
        }
        out.push_str(&self.load_average_1min.render());
        out.push_str(&format!(
            "target: sandboxd ≤ {TARGET_RATIO}× ctr on p50 (sbx = sandboxd over one gRPC channel; \
             ctr = one ctr process per call; p99 by nearest rank)\n"
        ));
        for (name, walls) in [
            ("sandboxd", &self.sandboxd_round_walls),
            ("ctr", &self.ctr_round_walls),
        ] {
            out.push_str(&format!(
                "wall time per round of {} concurrent, {name}: create {} ms, delete {} ms\n",
                self.settings.concurrency,
                join_ms(&walls.create_ms),
                join_ms(&walls.delete_ms)
            ));
        }
        out
    }
}

/// Milliseconds joined for display, like "412 / 398 / 405".
fn join_ms(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
