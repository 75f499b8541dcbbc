//! Exec latency, exec stdout throughput and time-to-first-command: sandboxd against raw
//! containerd driven by `ctr`.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, and the sandboxd binary), pulls the image into sandboxd's namespace and into a
//! separate `ctr` namespace of the same containerd (not timed), then times the same work on both:
//!
//! * exec `true` round trip, `BENCH_N` (default 200) times: an `Exec` stream from sending
//!   `start` until `exited` arrives, in a sandbox whose PID 1 is the idle init, against
//!   `ctr task exec --exec-id UNIQUE CONTAINER true` in a container started with
//!   `ctr run -d IMAGE ID /bin/sleep 1000000`;
//! * time to first command, `BENCH_TTFC_N` (default 30) times: `CreateSandbox` (idle PID 1, image
//!   already pulled) then `Exec echo hi` until the first stdout byte arrives, against
//!   `ctr run --rm IMAGE ID echo hi` spawned with piped stdout until its first byte; the
//!   sandboxes are deleted after each sample (not timed), `--rm` removes ctr's;
//! * time to first command from the warm pool, as many times: sandboxd restarted with
//!   `--warm-pool IMAGE=2`, then a plain `CreateSandbox` (no id, served from the pool) and
//!   `Exec echo hi` until the first stdout byte, against `ctr run --rm` again; then (sandboxd
//!   only, beside the same ctr samples) an agent's create from the pool: an env entry, a working
//!   dir the image lacks, CPU and memory limits. Before each sample (not timed) the pool is given
//!   time to refill, as it would between requests that do not outpace it;
//! * stdout throughput, `BENCH_THROUGHPUT_RUNS` (default 3) times per workload: 1 GiB of
//!   `head -c 1073741824 /dev/zero` (the workload) with busybox's `head` and with GNU
//!   coreutils' (the `head` of Debian- and Ubuntu-based images), and of
//!   `dd if=/dev/zero bs=1048576 count=1024` through `Exec`, the client counting and discarding
//!   the bytes (the total is checked), against `ctr task exec ...` of the same command with ctr's
//!   stdout on /dev/null (ctr's own process copies the bytes there). busybox's `head -c` writes
//!   4 KiB at a time and burns CPU per byte, so it is also timed alone in the sandbox with its
//!   output on /dev/null (`sh -c '/bin/head -c ... > /dev/null'`): the most that workload can
//!   show through any exec path. GNU `head` and `dd` with 1 MiB writes show what the exec path
//!   itself carries.
//!
//! Every phase uses one image: the busybox test image plus a layer with the host's GNU `head`
//! (Debian's coreutils) at /usr/bin/head and the shared libraries it loads; busybox's stays at
//! /bin/head. Workloads name the program by its path.
//!
//! `BENCH_SANDBOXD_ARGS` adds flags to the sandboxd under test, for A/B runs (e.g.
//! `BENCH_SANDBOXD_ARGS='--exec-io-relay off'` for exec output through FIFOs).
//!
//! The two sides alternate sample by sample so that a slow spell of the machine does not fall on
//! one side only; the load average is recorded before and after. sandboxd is called through one
//! gRPC channel; `ctr` is one process per call. ctr's FIFOs go to a temp dir of the bench, not to
//! the host's /run/containerd.
//!
//! It prints two tables (latencies: p50, p99, mean in ms with sandboxd/ctr ratios; throughput in
//! MiB/s) with the targets (exec round trip p50 ≤ 0.5× ctr, TTFC p50 ≤ 60 ms, throughput
//! ≥ 1 GiB/s), writes the same figures to `target/bench-exec.json`, and checks that neither side
//! left a container, task, active snapshot or lease behind.
//!
//! Run it as root with `cargo bench --bench exec`; it needs the packages of
//! `scripts/install-deps.sh`. Run without `--bench` (as `cargo test --benches` does) it only
//! prints how to run it, so it never takes part in CI's pass/fail.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::{self, exec_request, exec_response};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use common::TestEnv;
use support::ctr::{check_no_leftovers, CtrSide, DetachedIo};
use support::{
    announce, bench_main, env_count, latency_header, latency_row, nearest_rank, publish,
    status_error, verdict, LoadAverages, MachineFacts, Summary,
};

/// Environment variable: how many exec `true` round trips each side makes.
const ENV_N: &str = "BENCH_N";
/// Default of [`ENV_N`].
const DEFAULT_N: usize = 200;
/// Environment variable: how many time-to-first-command samples each side takes.
const ENV_TTFC_N: &str = "BENCH_TTFC_N";
/// Default of [`ENV_TTFC_N`].
const DEFAULT_TTFC_N: usize = 30;
/// Environment variable: how many 1 GiB transfers each side makes.
const ENV_THROUGHPUT_RUNS: &str = "BENCH_THROUGHPUT_RUNS";
/// Environment variable: extra flags for the sandboxd under test, whitespace-separated.
const ENV_SANDBOXD_ARGS: &str = "BENCH_SANDBOXD_ARGS";
/// Default of [`ENV_THROUGHPUT_RUNS`].
const DEFAULT_THROUGHPUT_RUNS: usize = 3;
/// Untimed round trips and TTFC samples per side before measuring (first-use costs: cgroup
/// parents, connection set-up, page cache).
const WARMUP: usize = 3;
/// Bytes the throughput phase moves per transfer: 1 GiB.
const THROUGHPUT_BYTES: u64 = 1 << 30;
/// The throughput workloads: a name and a command printing [`THROUGHPUT_BYTES`] to stdout.
const WORKLOADS: [(&str, &[&str]); 3] = [
    (
        "1 GiB stdout, busybox head -c",
        &[BUSYBOX_HEAD, "-c", "1073741824", "/dev/zero"],
    ),
    (
        "1 GiB stdout, GNU head -c",
        &[GNU_HEAD, "-c", "1073741824", "/dev/zero"],
    ),
    (
        "1 GiB stdout, dd bs=1M",
        &["dd", "if=/dev/zero", "bs=1048576", "count=1024"],
    ),
];
/// busybox's `head` in the bench image.
const BUSYBOX_HEAD: &str = "/bin/head";
/// The host's GNU coreutils `head`, at the same path in the bench image.
const GNU_HEAD: &str = "/usr/bin/head";
/// Name and tag of the bench image in the fixtures' registry.
const BENCH_IMAGE: &str = "busybox-gnu-head:latest";
/// busybox's `head -c` of the same size with its output on /dev/null inside the sandbox.
const HEAD_ALONE: &[&str] = &["sh", "-c", "/bin/head -c 1073741824 /dev/zero > /dev/null"];
/// Goal for the exec round trip: sandboxd's p50 at most this fraction of ctr's.
const ROUND_TRIP_TARGET_RATIO: f64 = 0.5;
/// Warm-pool size for the pooled time-to-first-command phase.
const WARM_POOL_SIZE: usize = 2;
/// How long the pool may take to refill before a pooled sample.
const POOL_REFILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Goal for time to first command: sandboxd's p50 at most this many milliseconds.
const TTFC_TARGET_MS: f64 = 60.0;
/// Goal for exec stdout throughput: sandboxd's median at least this many MiB/s (1 GiB/s).
const THROUGHPUT_TARGET_MIB_S: f64 = 1024.0;
/// The command `ctr run -d` gives the exec container: busybox's sleep, outliving the run.
const CTR_IDLE_COMMAND: &[&str] = &["/bin/sleep", "1000000"];
/// Id of the long-lived sandbox (and ctr container) the round trips and transfers exec in.
const EXEC_TARGET_ID: &str = "bench-exec";
/// What time to first command runs, and what it must print.
const TTFC_COMMAND: &[&str] = &["echo", "hi"];
/// The output of [`TTFC_COMMAND`].
const TTFC_OUTPUT: &[u8] = b"hi\n";
/// How much of an exec's stdout and stderr is kept for checks and error messages.
const KEPT_OUTPUT_BYTES: usize = 4096;
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-exec.json";
/// Bytes in a MiB, for throughput figures.
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Result<()> {
    bench_main("exec", Settings::from_env, run)
}

/// Starts the fixtures, measures both sides, reports, and checks for leftovers.
async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let gnu_head = common::image::host_binaries_layer(&[GNU_HEAD]);
    let gnu_head: Vec<(&str, &[u8])> = gnu_head
        .iter()
        .map(|(path, data)| (path.as_str(), data.as_slice()))
        .collect();
    let layout =
        common::image::build_layout_layers(&common::image::image_cache_dir(), &[&gnu_head]);
    let image = env.push_image(&layout, BENCH_IMAGE);
    let (machine, load_before) = announce(&env.containerd, &settings.render(&image)).await?;

    // Extra flags for the sandboxd under test, for A/B runs (e.g. `--exec-io-relay off`).
    let extra: Vec<String> = std::env::var(ENV_SANDBOXD_ARGS)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !extra.is_empty() {
        println!("sandboxd flags: {}", extra.join(" "));
        env.sandboxd.restart_with_args(&extra).await;
    }
    let sandboxd = SandboxdSide::connect(&env, &image).await?;
    let ctr = CtrSide::pulled(&env.containerd, &image).await?;

    let mut samples = measure_both(&sandboxd, &ctr, &settings).await?;
    drop(sandboxd);
    env.sandboxd
        .restart_with_args(
            &[
                vec![
                    "--warm-pool".to_owned(),
                    format!("{image}={WARM_POOL_SIZE}"),
                ],
                extra,
            ]
            .concat(),
        )
        .await;
    let pooled_side = SandboxdSide::connect(&env, &image).await?;
    measure_pooled_ttfc(&env, &pooled_side, &ctr, &settings, &mut samples).await?;
    drop(pooled_side);
    // Without the setting, sandboxd deletes the pool: nothing is left for the leak check.
    env.sandboxd.restart_with_args(&[]).await;
    wait_pool_size(&env, 0).await?;
    let load = LoadAverages::since(load_before)?;

    let report = Report::new(machine, load, &settings, &image, &samples);
    publish(&report.render_tables(), &report, JSON_FILE_NAME)?;

    check_no_leftovers(&env, &ctr).await
}

// ---- settings and machine facts ----

/// What the run does, from the environment.
#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    /// Exec `true` round trips per side.
    round_trips: usize,
    /// Time-to-first-command samples per side.
    ttfc: usize,
    /// 1 GiB transfers per side.
    throughput_runs: usize,
    /// Untimed warm-up round trips and TTFC samples per side.
    warmup: usize,
}

impl Settings {
    /// Reads [`ENV_N`], [`ENV_TTFC_N`] and [`ENV_THROUGHPUT_RUNS`], falling back to the defaults.
    fn from_env() -> Result<Settings> {
        let settings = Settings {
            round_trips: env_count(ENV_N, DEFAULT_N)?,
            ttfc: env_count(ENV_TTFC_N, DEFAULT_TTFC_N)?,
            throughput_runs: env_count(ENV_THROUGHPUT_RUNS, DEFAULT_THROUGHPUT_RUNS)?,
            warmup: WARMUP,
        };
        ensure!(
            settings.round_trips + settings.ttfc + settings.throughput_runs > 0,
            "{ENV_N}, {ENV_TTFC_N} and {ENV_THROUGHPUT_RUNS} are all 0: nothing to measure"
        );
        Ok(settings)
    }

    fn render(&self, image: &str) -> String {
        format!(
            "workload: image {image}; {} exec round trips, {} time-to-first-command samples, \
             {} transfers of 1 GiB, {} warm-up per side",
            self.round_trips, self.ttfc, self.throughput_runs, self.warmup
        )
    }
}

// ---- sandboxd ----

/// What one `Exec` stream delivered, with times measured from a caller-chosen instant.
#[derive(Debug)]
struct ExecRecord {
    /// When the first non-empty stdout chunk arrived; `None` when there was no stdout.
    first_stdout: Option<Duration>,
    /// When `exited` arrived.
    exited: Duration,
    /// Total stdout bytes (all counted, only the first [`KEPT_OUTPUT_BYTES`] kept).
    stdout_bytes: u64,
    /// The start of stdout.
    stdout_head: Vec<u8>,
    /// The start of stderr, for error messages.
    stderr_head: Vec<u8>,
    /// How the process ended.
    exit: pb::ExecExited,
}

impl ExecRecord {
    /// Fails, naming the command and showing its stderr, unless it exited 0.
    fn ensure_success(&self, what: &str) -> Result<()> {
        ensure!(
            self.exit.exit_code == 0 && self.exit.signal == 0,
            "{what}: exit code {}, signal {}, stderr: {}",
            self.exit.exit_code,
            self.exit.signal,
            String::from_utf8_lossy(&self.stderr_head).trim()
        );
        Ok(())
    }
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

    /// Creates sandbox `id` with the idle PID 1 and returns once the response says RUNNING.
    async fn create(&self, id: &str) -> Result<()> {
        let request = pb::CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            image: self.image.clone(),
            ..Default::default()
        };
        support::create_running(&self.client, request).await
    }

    /// Deletes sandbox `id` with `force`.
    async fn delete(&self, id: &str) -> Result<()> {
        support::delete_forced(&self.client, id).await
    }

    /// Runs `args` in sandbox `id` over an `Exec` stream (no stdin, no tty) and reads it to the
    /// end; times are measured from `since`.
    async fn exec(&self, id: &str, args: &[&str], since: Instant) -> Result<ExecRecord> {
        let start = pb::ExecRequest {
            request: Some(exec_request::Request::Start(pb::ExecStart {
                sandbox_id: id.to_owned(),
                args: args.iter().map(|arg| arg.to_string()).collect(),
                ..Default::default()
            })),
        };
        let call = format!("Exec {args:?} in");
        let mut stream = self
            .client
            .clone()
            .exec(futures::stream::iter([start]))
            .await
            .map_err(|s| status_error(&call, id, &s))?
            .into_inner();
        let mut first_stdout = None;
        let mut stdout_bytes = 0u64;
        let (mut stdout_head, mut stderr_head) = (Vec::new(), Vec::new());
        let mut exited = None;
        while let Some(message) = stream
            .message()
            .await
            .map_err(|s| status_error(&call, id, &s))?
        {
            match message.response {
                Some(exec_response::Response::Stdout(data)) => {
                    if first_stdout.is_none() && !data.is_empty() {
                        first_stdout = Some(since.elapsed());
                    }
                    stdout_bytes += data.len() as u64;
                    keep_head(&mut stdout_head, &data);
                }
                Some(exec_response::Response::Stderr(data)) => keep_head(&mut stderr_head, &data),
                Some(exec_response::Response::Exited(exit)) => {
                    exited = Some((since.elapsed(), exit));
                }
                Some(exec_response::Response::Started(_)) | None => {}
            }
        }
        let Some((exited, exit)) = exited else {
            bail!("{call} {id}: the stream ended without `exited`");
        };
        Ok(ExecRecord {
            first_stdout,
            exited,
            stdout_bytes,
            stdout_head,
            stderr_head,
            exit,
        })
    }
}

/// Appends to `head` what fits of `data` below [`KEPT_OUTPUT_BYTES`].
fn keep_head(head: &mut Vec<u8>, data: &[u8]) {
    let room = KEPT_OUTPUT_BYTES.saturating_sub(head.len());
    head.extend_from_slice(&data[..room.min(data.len())]);
}

// ---- ctr ----

/// What only this bench asks of the shared ctr side.
impl CtrSide<'_> {
    /// `ctr run --rm IMAGE ID args...` with piped stdout: the time from spawning ctr until the
    /// first stdout byte. Reads on to the end, waits for ctr (which removes the container) and
    /// checks the whole output is `expected`.
    async fn run_rm_first_byte(
        &self,
        id: &str,
        args: &[&str],
        expected: &[u8],
    ) -> Result<Duration> {
        let cgroup = self.cgroup_of(id);
        let runc_root = self.runc_root();
        let mut full = vec![
            "run",
            "--rm",
            "--runc-root",
            &runc_root,
            "--fifo-dir",
            self.fifo_dir(),
            "--cgroup",
            &cgroup,
            self.image(),
            id,
        ];
        full.extend_from_slice(args);
        let mut command = self.command(&full);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.track(id);
        let start = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn ctr {full:?}"))?;
        let mut stdout = child.stdout.take().context("ctr's stdout is not piped")?;
        let mut output = vec![0u8; KEPT_OUTPUT_BYTES];
        let first = stdout
            .read(&mut output)
            .await
            .with_context(|| format!("read ctr {full:?}'s stdout"))?;
        let latency = start.elapsed();
        output.truncate(first);
        stdout
            .read_to_end(&mut output)
            .await
            .with_context(|| format!("read ctr {full:?}'s stdout"))?;
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_end(&mut stderr).await.ok();
        }
        let status = child
            .wait()
            .await
            .with_context(|| format!("wait for ctr {full:?}"))?;
        ensure!(
            status.success() && first > 0,
            "ctr {full:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
        ensure!(
            output == expected,
            "ctr {full:?} printed {:?}, expected {:?}",
            String::from_utf8_lossy(&output),
            String::from_utf8_lossy(expected)
        );
        self.forget(id);
        Ok(latency)
    }
}

// ---- measuring ----

/// One 1 GiB transfer.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    bytes: u64,
    elapsed: Duration,
}

impl Transfer {
    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64()
    }
}

/// Everything measured on one side.
#[derive(Debug, Default)]
struct Samples {
    round_trip: Vec<Duration>,
    ttfc: Vec<Duration>,
    ttfc_pool: Vec<Duration>,
    /// From the pool with an agent's create (see [`agent_request`]); sandboxd only.
    ttfc_pool_agent: Vec<Duration>,
    /// Per workload (see [`WORKLOADS`]).
    transfers: [Vec<Transfer>; WORKLOADS.len()],
    /// `head -c` alone, output to /dev/null inside the sandbox (sandboxd side only).
    head_alone: Vec<Transfer>,
}

/// Both sides' samples.
#[derive(Debug, Default)]
struct BothSamples {
    sandboxd: Samples,
    ctr: Samples,
}

/// Runs the three phases, alternating between the sides sample by sample (and which side goes
/// first), then deletes the exec targets.
async fn measure_both(
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
    settings: &Settings,
) -> Result<BothSamples> {
    let mut samples = BothSamples::default();
    sandboxd
        .create(EXEC_TARGET_ID)
        .await
        .context("sandboxd: create the exec target")?;
    ctr.run_detached(EXEC_TARGET_ID, DetachedIo::Null, CTR_IDLE_COMMAND)
        .await
        .context("ctr: run the exec target")?;

    println!(
        "exec `true` round trips: {} per side ...",
        settings.round_trips
    );
    let total = settings.warmup + settings.round_trips;
    for i in 0..total {
        let exec_id = format!("bench-true-{i:04}");
        let (s, c) = alternate(
            i,
            async {
                let start = Instant::now();
                let record = sandboxd.exec(EXEC_TARGET_ID, &["true"], start).await?;
                record.ensure_success("sandboxd exec `true`")?;
                Ok(record.exited)
            },
            async {
                let start = Instant::now();
                ctr.exec(EXEC_TARGET_ID, &exec_id, &["true"], false).await?;
                Ok(start.elapsed())
            },
        )
        .await?;
        if i >= settings.warmup {
            samples.sandboxd.round_trip.push(s);
            samples.ctr.round_trip.push(c);
        }
    }

    println!("time to first command: {} per side ...", settings.ttfc);
    let total = settings.warmup + settings.ttfc;
    for i in 0..total {
        let id = format!("bench-ttfc-{i:03}");
        let (s, c) = alternate(
            i,
            sandboxd_ttfc(sandboxd, &id),
            ctr.run_rm_first_byte(&id, TTFC_COMMAND, TTFC_OUTPUT),
        )
        .await?;
        if i >= settings.warmup {
            samples.sandboxd.ttfc.push(s);
            samples.ctr.ttfc.push(c);
        }
    }

    println!(
        "stdout throughput: {} transfers of 1 GiB per side and workload ...",
        settings.throughput_runs
    );
    for (w, (name, command)) in WORKLOADS.iter().enumerate() {
        for i in 0..settings.throughput_runs {
            let exec_id = format!("bench-bulk-{w}-{i:02}");
            let (s, c) = alternate(
                i,
                async {
                    let start = Instant::now();
                    let record = sandboxd.exec(EXEC_TARGET_ID, command, start).await?;
                    record.ensure_success(&format!("sandboxd exec {name}"))?;
                    ensure!(
                        record.stdout_bytes == THROUGHPUT_BYTES,
                        "sandboxd exec {name}: received {} stdout bytes, expected {THROUGHPUT_BYTES}",
                        record.stdout_bytes
                    );
                    Ok(Transfer {
                        bytes: record.stdout_bytes,
                        elapsed: record.exited,
                    })
                },
                async {
                    let start = Instant::now();
                    ctr.exec(EXEC_TARGET_ID, &exec_id, command, true).await?;
                    Ok(Transfer {
                        bytes: THROUGHPUT_BYTES,
                        elapsed: start.elapsed(),
                    })
                },
            )
            .await?;
            println!(
                "  {name}, transfer {}: sandboxd {:.0} MiB/s, ctr {:.0} MiB/s",
                i + 1,
                s.mib_per_s(),
                c.mib_per_s()
            );
            samples.sandboxd.transfers[w].push(s);
            samples.ctr.transfers[w].push(c);
        }
    }
    for i in 0..settings.throughput_runs {
        let start = Instant::now();
        let record = sandboxd.exec(EXEC_TARGET_ID, HEAD_ALONE, start).await?;
        record.ensure_success("sandboxd exec head alone")?;
        let alone = Transfer {
            bytes: THROUGHPUT_BYTES,
            elapsed: record.exited,
        };
        println!(
            "  busybox head alone to /dev/null, run {}: {:.0} MiB/s",
            i + 1,
            alone.mib_per_s()
        );
        samples.sandboxd.head_alone.push(alone);
    }

    sandboxd
        .delete(EXEC_TARGET_ID)
        .await
        .context("sandboxd: delete the exec target")?;
    ctr.delete(EXEC_TARGET_ID)
        .await
        .context("ctr: delete the exec target")?;
    Ok(samples)
}

/// Time to first command with the warm pool: a plain create (no id) then `Exec echo hi`,
/// beside `ctr run --rm` again. The pool is full before each sample (not timed).
async fn measure_pooled_ttfc(
    env: &TestEnv,
    sandboxd: &SandboxdSide,
    ctr: &CtrSide<'_>,
    settings: &Settings,
    samples: &mut BothSamples,
) -> Result<()> {
    println!(
        "time to first command from a warm pool of {WARM_POOL_SIZE}: {} per side ...",
        settings.ttfc
    );
    for i in 0..settings.warmup + settings.ttfc {
        wait_pool_size(env, WARM_POOL_SIZE).await?;
        let id = format!("bench-ttfc-pool-{i:03}");
        let (s, c) = alternate(
            i,
            sandboxd_ttfc_pooled(
                sandboxd,
                env,
                pb::CreateSandboxRequest {
                    image: sandboxd.image.clone(),
                    ..Default::default()
                },
            ),
            ctr.run_rm_first_byte(&id, TTFC_COMMAND, TTFC_OUTPUT),
        )
        .await?;
        wait_pool_size(env, WARM_POOL_SIZE).await?;
        let agent = sandboxd_ttfc_pooled(sandboxd, env, agent_request(&sandboxd.image)).await?;
        if i >= settings.warmup {
            samples.sandboxd.ttfc_pool.push(s);
            samples.sandboxd.ttfc_pool_agent.push(agent);
            samples.ctr.ttfc_pool.push(c);
        }
    }
    Ok(())
}

/// The create an agent platform typically makes: a key in the environment, a working dir the
/// image lacks, memory and CPU limits.
fn agent_request(image: &str) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        image: image.to_owned(),
        env: [("AGENT_TOKEN".to_owned(), "bench".to_owned())].into(),
        working_dir: "/workspace".into(),
        resources: Some(pb::Resources {
            cpu_millis: 1000,
            memory_bytes: 256 << 20,
            pids_limit: 0,
        }),
        ..Default::default()
    }
}

/// Waits until sandboxd's warm pool holds exactly `n` sandboxes.
async fn wait_pool_size(env: &TestEnv, n: usize) -> Result<()> {
    let deadline = Instant::now() + POOL_REFILL_TIMEOUT;
    loop {
        let have = env.pooled().await.len();
        if have == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the warm pool holds {have} sandboxes after {POOL_REFILL_TIMEOUT:?}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `request` (a CreateSandbox without id, served from the pool), then `Exec echo hi`: until the
/// first stdout byte. Checks the sandbox came from the pool; deletes it afterwards (not timed).
async fn sandboxd_ttfc_pooled(
    sandboxd: &SandboxdSide,
    env: &TestEnv,
    request: pb::CreateSandboxRequest,
) -> Result<Duration> {
    let pool = env.pooled().await;
    let start = Instant::now();
    let id = support::create_running_id(&sandboxd.client, request).await?;
    let record = sandboxd.exec(&id, TTFC_COMMAND, start).await?;
    sandboxd.delete(&id).await?;
    ensure!(
        pool.contains(&id),
        "sandbox {id} was not served from the warm pool {pool:?}"
    );
    record.ensure_success("sandboxd exec echo")?;
    record
        .first_stdout
        .context("sandboxd exec echo: no stdout byte arrived")
}

/// Runs sample `i` of both sides one after the other, sandboxd first on even `i`, ctr first on
/// odd; returns (sandboxd, ctr).
async fn alternate<T>(
    i: usize,
    sandboxd: impl std::future::Future<Output = Result<T>>,
    ctr: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, T)> {
    if i % 2 == 0 {
        let s = sandboxd.await.context("sandboxd")?;
        let c = ctr.await.context("ctr")?;
        Ok((s, c))
    } else {
        let c = ctr.await.context("ctr")?;
        let s = sandboxd.await.context("sandboxd")?;
        Ok((s, c))
    }
}

/// CreateSandbox, then `Exec echo hi`: the time from the create call until the first stdout byte.
/// The sandbox is deleted afterwards (not timed).
async fn sandboxd_ttfc(sandboxd: &SandboxdSide, id: &str) -> Result<Duration> {
    let start = Instant::now();
    sandboxd.create(id).await?;
    let record = sandboxd.exec(id, TTFC_COMMAND, start).await?;
    sandboxd.delete(id).await?;
    record.ensure_success("sandboxd exec echo")?;
    ensure!(
        record.stdout_head == TTFC_OUTPUT,
        "sandboxd exec echo printed {:?}",
        String::from_utf8_lossy(&record.stdout_head)
    );
    record
        .first_stdout
        .context("sandboxd exec echo: no stdout byte arrived")
}

// ---- statistics and report ----

/// One latency row: an operation on both sides.
#[derive(Debug, Clone, Serialize)]
struct Row {
    operation: String,
    sandboxd: Summary,
    ctr: Summary,
    /// sandboxd p50 / ctr p50.
    ratio_p50: f64,
    /// sandboxd mean / ctr mean.
    ratio_mean: f64,
    /// The goal, in words.
    target: String,
    meets_target: bool,
}

impl Row {
    /// A row whose target is sandboxd p50 ≤ `ratio` × ctr p50.
    fn relative(
        operation: &str,
        sandboxd: &[Duration],
        ctr: &[Duration],
        ratio: f64,
    ) -> Option<Row> {
        let (s, c) = (Summary::of(sandboxd)?, Summary::of(ctr)?);
        Some(Row::build(
            operation,
            s,
            c,
            format!("sandboxd p50 ≤ {ratio}× ctr p50"),
            s.p50_ms <= ratio * c.p50_ms,
        ))
    }

    /// A row whose target is sandboxd p50 ≤ `limit_ms`.
    fn absolute(
        operation: &str,
        sandboxd: &[Duration],
        ctr: &[Duration],
        limit_ms: f64,
    ) -> Option<Row> {
        let (s, c) = (Summary::of(sandboxd)?, Summary::of(ctr)?);
        Some(Row::build(
            operation,
            s,
            c,
            format!("sandboxd p50 ≤ {limit_ms} ms"),
            s.p50_ms <= limit_ms,
        ))
    }

    fn build(operation: &str, sandboxd: Summary, ctr: Summary, target: String, met: bool) -> Row {
        Row {
            operation: operation.to_owned(),
            sandboxd,
            ctr,
            ratio_p50: sandboxd.p50_ms / ctr.p50_ms,
            ratio_mean: sandboxd.mean_ms / ctr.mean_ms,
            target,
            meets_target: met,
        }
    }
}

/// Median, minimum and maximum throughput of a set of transfers, in MiB/s.
#[derive(Debug, Clone, Copy, Serialize)]
struct Rate {
    transfers: usize,
    median_mib_s: f64,
    min_mib_s: f64,
    max_mib_s: f64,
    /// Median wall time of one transfer.
    median_seconds: f64,
}

impl Rate {
    fn of(transfers: &[Transfer]) -> Option<Rate> {
        if transfers.is_empty() {
            return None;
        }
        let mut rates: Vec<f64> = transfers.iter().map(Transfer::mib_per_s).collect();
        rates.sort_by(f64::total_cmp);
        let mut seconds: Vec<f64> = transfers.iter().map(|t| t.elapsed.as_secs_f64()).collect();
        seconds.sort_by(f64::total_cmp);
        Some(Rate {
            transfers: rates.len(),
            median_mib_s: nearest_rank(&rates, 0.5),
            min_mib_s: rates[0],
            max_mib_s: rates[rates.len() - 1],
            median_seconds: nearest_rank(&seconds, 0.5),
        })
    }
}

/// The throughput row: both sides moving 1 GiB of exec stdout.
#[derive(Debug, Clone, Serialize)]
struct ThroughputRow {
    operation: String,
    bytes_per_transfer: u64,
    sandboxd: Rate,
    ctr: Rate,
    /// sandboxd median / ctr median.
    ratio_median: f64,
    target: String,
    meets_target: bool,
}

/// Everything the run found, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: MachineFacts,
    load_average_1min: LoadAverages,
    settings: Settings,
    image: String,
    rows: Vec<Row>,
    throughput: Vec<ThroughputRow>,
    /// busybox `head -c` alone in the sandbox, output to /dev/null: that workload's ceiling.
    head_alone: Option<Rate>,
}

impl Report {
    fn new(
        machine: MachineFacts,
        load: LoadAverages,
        settings: &Settings,
        image: &str,
        samples: &BothSamples,
    ) -> Report {
        let (s, c) = (&samples.sandboxd, &samples.ctr);
        let rows = [
            Row::relative(
                "exec `true` round trip",
                &s.round_trip,
                &c.round_trip,
                ROUND_TRIP_TARGET_RATIO,
            ),
            Row::absolute("create+exec → 1st stdout", &s.ttfc, &c.ttfc, TTFC_TARGET_MS),
            Row::absolute(
                "same, from the warm pool",
                &s.ttfc_pool,
                &c.ttfc_pool,
                TTFC_TARGET_MS,
            ),
            Row::absolute(
                "same, pool, env+dir+limits",
                &s.ttfc_pool_agent,
                &c.ttfc_pool,
                TTFC_TARGET_MS,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        let throughput = WORKLOADS
            .iter()
            .enumerate()
            .filter_map(|(w, (name, _))| {
                let (sandboxd, ctr) = (Rate::of(&s.transfers[w])?, Rate::of(&c.transfers[w])?);
                Some(ThroughputRow {
                    operation: (*name).to_owned(),
                    bytes_per_transfer: THROUGHPUT_BYTES,
                    sandboxd,
                    ctr,
                    ratio_median: sandboxd.median_mib_s / ctr.median_mib_s,
                    target: format!("sandboxd ≥ {THROUGHPUT_TARGET_MIB_S} MiB/s"),
                    meets_target: sandboxd.median_mib_s >= THROUGHPUT_TARGET_MIB_S,
                })
            })
            .collect();
        Report {
            machine,
            load_average_1min: load,
            settings: *settings,
            image: image.to_owned(),
            rows,
            throughput,
            head_alone: Rate::of(&s.head_alone),
        }
    }

    /// The plain-text tables with the target verdicts.
    fn render_tables(&self) -> String {
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
        for row in &self.rows {
            out.push_str(&format!("target, {}: {}\n", row.operation, row.target));
        }
        out.push_str(
            "sbx = sandboxd over one gRPC channel; ctr = one ctr process per call; p99 by nearest \
             rank.\nround trip: Exec `true` start → exited vs `ctr task exec true`; \
             create+exec: CreateSandbox (idle PID 1) + Exec `echo hi` vs `ctr run --rm IMAGE ID \
             echo hi`, both to the first stdout byte; from the warm pool: the same with \
             sandboxd serving --warm-pool IMAGE=2 and a plain CreateSandbox (no id) taken from \
             the refilled pool; env+dir+limits: the same with an env entry, working_dir \
             /workspace (made) and CPU and memory limits in the create\n",
        );
        if !self.throughput.is_empty() {
            out.push('\n');
            let header = format!(
                "{:<30} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} {:>6}\n",
                "throughput (MiB/s)",
                "sbx med",
                "sbx min",
                "sbx max",
                "ctr med",
                "ctr min",
                "ctr max",
                "ratio med",
                "target"
            );
            out.push_str(&header);
            out.push_str(&"-".repeat(header.chars().count() - 1));
            out.push('\n');
            for t in &self.throughput {
                out.push_str(&format!(
                    "{:<30} {:>9.0} {:>9.0} {:>9.0} | {:>9.0} {:>9.0} {:>9.0} | {:>8.2}x {:>6}\n",
                    t.operation,
                    t.sandboxd.median_mib_s,
                    t.sandboxd.min_mib_s,
                    t.sandboxd.max_mib_s,
                    t.ctr.median_mib_s,
                    t.ctr.min_mib_s,
                    t.ctr.max_mib_s,
                    t.ratio_median,
                    verdict(t.meets_target)
                ));
            }
            if let Some(a) = &self.head_alone {
                out.push_str(&format!(
                    "{:<30} {:>9.0} {:>9.0} {:>9.0} | (no output crosses any exec path: the busybox row's ceiling)\n",
                    "busybox head alone, /dev/null", a.median_mib_s, a.min_mib_s, a.max_mib_s
                ));
            }
            out.push_str(&format!(
                "target: sandboxd ≥ {THROUGHPUT_TARGET_MIB_S} MiB/s; sandboxd: the client counts \
                 and discards the bytes, total checked; ctr: its process copies to /dev/null. \
                 sandboxd reads the process's pipes directly (exec output relay); ctr gets what \
                 the shim copies into FIFOs 4 KiB at a time\n"
            ));
        }
        out.push_str(&self.load_average_1min.render());
        out
    }
}
