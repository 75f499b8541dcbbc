//! What the sandbox walls cost: sandboxd with its default walls beside the same binary without
//! them, and both beside raw containerd driven by `ctr` with and without the same seccomp filter.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox) and two sandboxd processes on that containerd, each with its own namespace and
//! cgroup parent:
//!
//! * **walls**: the defaults (Docker's seccomp profile, `--oom-score-adj 500`, default memory,
//!   CPU and pids limits);
//! * **open**: `--seccomp-profile unconfined --oom-score-adj 0 --default-memory 0
//!   --default-cpu-millis 0`: the same code without the walls that have a run-time price. (The
//!   capability set, the cgroup namespace and the read-only etc files cannot be switched off;
//!   they cost nothing per call.)
//!
//! and two `ctr run -d` containers in a `ctr` namespace of the same containerd: one plain, one
//! with `--seccomp --seccomp-profile FILE`, FILE being exactly the filter sandboxd's walls give
//! (so that "the same work" includes the same filter).
//!
//! Then, the four sides taking turns sample by sample (the order rotates):
//! * exec `true` round trip, `BENCH_N` (default 200) times: an `Exec` stream from `start` until
//!   `exited` against `ctr task exec true`;
//! * cold create, `BENCH_CREATE_N` (default 30) times: `CreateSandbox` (image pulled, idle PID 1)
//!   until RUNNING, then `Exec echo hi` until its first stdout byte (create + first command),
//!   against `ctr run --rm IMAGE ID echo hi` until its first stdout byte. The sandboxes are
//!   deleted after each sample (not timed).
//!
//! It prints the latencies (p50, p99, mean in ms) and the verdicts: walls minus open at p50 at
//! most 3 ms for the exec round trip and for create (the seccomp budget of the walls issue), and
//! sandboxd's exec round trip at most 0.5x ctr's at p50, with walls against ctr with the same
//! filter and open against plain ctr. The figures go to `target/bench-walls.json`; neither side
//! may leave anything behind.
//!
//! Run it as root with `cargo bench --bench walls`. Without `--bench` (as under
//! `cargo test --benches`) it only prints how to run it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandboxd::config::SeccompProfile;
use sandboxd::pb::{
    self, exec_request, exec_response, sandbox_service_client::SandboxServiceClient,
};
use serde::Serialize;
use tonic::transport::Channel;

use common::host::{unique_name, CgroupParent};
use common::sandboxd::{Sandboxd, SandboxdOptions};
use common::TestEnv;
use support::ctr::{check_no_leftovers, CtrSide, DetachedIo};
use support::{
    announce, bench_main, env_count, publish, status_error, verdict, LoadAverages, Summary,
};

/// Exec round trips per side (env).
const ENV_N: &str = "BENCH_N";
const DEFAULT_N: usize = 200;
/// Cold creates per side (env).
const ENV_CREATE_N: &str = "BENCH_CREATE_N";
const DEFAULT_CREATE_N: usize = 30;
/// Untimed samples per side before the timed ones.
const WARMUP: usize = 5;
/// What the walls may add at p50 (ms), for the exec round trip and for create.
const WALLS_BUDGET_MS: f64 = 3.0;
/// sandboxd's exec round trip p50 at most this fraction of ctr's.
const ROUND_TRIP_TARGET_RATIO: f64 = 0.5;
/// The flags that take sandboxd's walls down, for the "open" side.
const OPEN_FLAGS: &[&str] = &[
    "--seccomp-profile",
    "unconfined",
    "--oom-score-adj",
    "0",
    "--default-memory",
    "0",
    "--default-cpu-millis",
    "0",
];
/// The long-lived exec target on every side.
const EXEC_TARGET_ID: &str = "bench-walls-exec";
/// ctr's second exec target, under the walls' seccomp filter.
const CTR_SECCOMP_TARGET_ID: &str = "bench-walls-exec-seccomp";
/// What `ctr run -d` keeps running in its exec targets.
const CTR_IDLE_COMMAND: &[&str] = &["/bin/sleep", "1000000"];
/// The first command of a cold create, and what it prints.
const FIRST_COMMAND: &[&str] = &["echo", "hi"];
const FIRST_OUTPUT: &[u8] = b"hi\n";
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-walls.json";

fn main() -> Result<()> {
    bench_main("walls", Settings::from_env, run)
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    round_trips: usize,
    creates: usize,
    warmup: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            round_trips: env_count(ENV_N, DEFAULT_N)?,
            creates: env_count(ENV_CREATE_N, DEFAULT_CREATE_N)?,
            warmup: WARMUP,
        })
    }
}

async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let (machine, load_before) = announce(
        &env.containerd,
        &format!(
            "workload: image {image}; {} exec round trips and {} cold creates per side, {} \
             warm-up; open side: {}",
            settings.round_trips,
            settings.creates,
            settings.warmup,
            OPEN_FLAGS.join(" ")
        ),
    )
    .await?;

    let open_cgroup = CgroupParent::new();
    let open_namespace = unique_name("sbx-open");
    let open_server = Sandboxd::start(SandboxdOptions {
        containerd_address: env.containerd.address(),
        namespace: open_namespace.clone(),
        cgroup_parent: open_cgroup.path().to_owned(),
        extra_args: OPEN_FLAGS.iter().map(|s| s.to_string()).collect(),
        extra_env: Vec::new(),
        tls: None,
    })
    .await;
    let walls = SandboxdSide::pulled(env.channel().await, &image).await?;
    let open = SandboxdSide::pulled(open_server.channel().await, &image).await?;

    // ctr's seccomp target gets exactly the filter of sandboxd's walls.
    let profile_dir = tempfile::tempdir().context("temp dir for the seccomp profile")?;
    let profile_path = profile_dir.path().join("walls-seccomp.json");
    let profile = sandboxd::runtime::spec::seccomp_of(&SeccompProfile::Default)
        .context("the default walls have a seccomp filter")?;
    std::fs::write(&profile_path, serde_json::to_vec(&*profile)?)
        .context("write the seccomp profile")?;
    let ctr = CtrSide::pulled(&env.containerd, &image).await?;
    ctr.run_detached(EXEC_TARGET_ID, DetachedIo::Null, CTR_IDLE_COMMAND)
        .await
        .context("ctr: run the plain exec target")?;
    run_detached_seccomp(
        &ctr,
        CTR_SECCOMP_TARGET_ID,
        &profile_path.display().to_string(),
    )
    .await
    .context("ctr: run the seccomp exec target")?;
    walls.create(EXEC_TARGET_ID).await?;
    open.create(EXEC_TARGET_ID).await?;

    let mut s = Samples::default();
    println!(
        "exec `true` round trips: {} per side ...",
        settings.round_trips
    );
    for i in 0..settings.warmup + settings.round_trips {
        let times = rotate(
            i,
            [
                Box::pin(async { walls.exec_round_trip(EXEC_TARGET_ID).await }),
                Box::pin(async { open.exec_round_trip(EXEC_TARGET_ID).await }),
                Box::pin(ctr_exec(&ctr, CTR_SECCOMP_TARGET_ID, i)),
                Box::pin(ctr_exec(&ctr, EXEC_TARGET_ID, i)),
            ],
        )
        .await?;
        if i >= settings.warmup {
            s.round_trip.push_all(times);
        }
    }
    walls.delete(EXEC_TARGET_ID).await?;
    open.delete(EXEC_TARGET_ID).await?;
    ctr.delete(EXEC_TARGET_ID).await?;
    ctr.delete(CTR_SECCOMP_TARGET_ID).await?;

    println!("cold creates: {} per side ...", settings.creates);
    let seccomp_flags = [
        "--seccomp".to_owned(),
        "--seccomp-profile".to_owned(),
        profile_path.display().to_string(),
    ];
    for i in 0..settings.warmup + settings.creates {
        let id = format!("bench-walls-create-{i:03}");
        let ctr_seccomp_id = format!("{id}-seccomp");
        let (create_walls, create_open) = (Cell::new(Duration::ZERO), Cell::new(Duration::ZERO));
        let times = rotate(
            i,
            [
                Box::pin(async {
                    let (c, first) = walls.create_first_command(&id).await?;
                    create_walls.set(c);
                    Ok(first)
                }),
                Box::pin(async {
                    let (c, first) = open.create_first_command(&id).await?;
                    create_open.set(c);
                    Ok(first)
                }),
                Box::pin(ctr_run_rm(&ctr, &ctr_seccomp_id, &seccomp_flags)),
                Box::pin(ctr_run_rm(&ctr, &id, &[])),
            ],
        )
        .await?;
        if i >= settings.warmup {
            s.first_command.push_all(times);
            s.create.walls.push(create_walls.get());
            s.create.open.push(create_open.get());
        }
    }
    let load = LoadAverages::since(load_before)?;

    let report = Report::new(machine, load, settings, &s)?;
    publish(&report.render(), &report, JSON_FILE_NAME)?;

    let open_leaks = env.containerd.leaks(&open_namespace).await;
    ensure!(
        open_leaks.is_empty(),
        "the open sandboxd left:\n{open_leaks}"
    );
    drop(open_server);
    check_no_leftovers(&env, &ctr).await
}

/// `ctr run -d --seccomp --seccomp-profile PROFILE` of the idle command as container `id`.
async fn run_detached_seccomp(ctr: &CtrSide<'_>, id: &str, profile: &str) -> Result<()> {
    let cgroup = ctr.cgroup_of(id);
    let runc_root = ctr.runc_root();
    let mut args = vec![
        "run",
        "-d",
        "--runc-root",
        &runc_root,
        "--null-io",
        "--seccomp",
        "--seccomp-profile",
        profile,
        "--cgroup",
        &cgroup,
        ctr.image(),
        id,
    ];
    args.extend_from_slice(CTR_IDLE_COMMAND);
    ctr.track(id);
    ctr.ctr(&args).await
}

/// `ctr task exec true` in container `id`, timed.
async fn ctr_exec(ctr: &CtrSide<'_>, id: &str, i: usize) -> Result<Duration> {
    let start = Instant::now();
    ctr.exec(id, &format!("true-{i:04}"), &["true"], false)
        .await?;
    Ok(start.elapsed())
}

/// `ctr run --rm [flags] IMAGE ID echo hi` until its first stdout byte, then to the end.
async fn ctr_run_rm(ctr: &CtrSide<'_>, id: &str, flags: &[String]) -> Result<Duration> {
    use tokio::io::AsyncReadExt;
    let cgroup = ctr.cgroup_of(id);
    let runc_root = ctr.runc_root();
    let mut args: Vec<&str> = vec!["run", "--rm", "--runc-root", &runc_root];
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(&["--cgroup", &cgroup, ctr.image(), id]);
    args.extend_from_slice(FIRST_COMMAND);
    ctr.track(id);
    let start = Instant::now();
    let mut child = ctr
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn ctr {args:?}"))?;
    let mut stdout = child.stdout.take().context("ctr's stdout is not piped")?;
    let mut output = vec![0u8; 64];
    let first = stdout.read(&mut output).await?;
    let latency = start.elapsed();
    output.truncate(first);
    stdout.read_to_end(&mut output).await?;
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success() && output == FIRST_OUTPUT,
        "ctr {args:?} failed ({}): printed {:?}, {}",
        out.status,
        String::from_utf8_lossy(&output),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ctr.forget(id);
    Ok(latency)
}

/// Runs the four samples of round `i` one after the other, starting with side `i % 4`;
/// returns them in side order (walls, open, ctr seccomp, ctr plain).
async fn rotate<'a>(
    i: usize,
    mut sides: [std::pin::Pin<Box<dyn std::future::Future<Output = Result<Duration>> + 'a>>; 4],
) -> Result<[Duration; 4]> {
    const NAMES: [&str; 4] = [
        "sandboxd walls",
        "sandboxd open",
        "ctr seccomp",
        "ctr plain",
    ];
    let mut out = [Duration::ZERO; 4];
    for k in 0..4 {
        let side = (i + k) % 4;
        out[side] = (&mut sides[side]).await.context(NAMES[side])?;
    }
    Ok(out)
}

/// sandboxd through its generated client over one channel.
struct SandboxdSide {
    client: SandboxServiceClient<Channel>,
    image: String,
}

impl SandboxdSide {
    /// Pulls `image` through ImageService on `channel` (not timed).
    async fn pulled(channel: Channel, image: &str) -> Result<SandboxdSide> {
        let channel = support::pull_on(channel, image).await?;
        Ok(SandboxdSide {
            client: SandboxServiceClient::new(channel),
            image: image.to_owned(),
        })
    }

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

    /// Runs `args` in `id`; returns (time to the first stdout byte, time to `exited`, stdout),
    /// both from `since`. Fails unless it exits 0.
    async fn exec(
        &self,
        id: &str,
        args: &[&str],
        since: Instant,
    ) -> Result<(Option<Duration>, Duration, Vec<u8>)> {
        let start = pb::ExecRequest {
            request: Some(exec_request::Request::Start(pb::ExecStart {
                sandbox_id: id.to_owned(),
                args: args.iter().map(|a| a.to_string()).collect(),
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
        let (mut first, mut stdout, mut stderr) = (None, Vec::new(), Vec::new());
        while let Some(message) = stream
            .message()
            .await
            .map_err(|s| status_error(&call, id, &s))?
        {
            match message.response {
                Some(exec_response::Response::Stdout(data)) => {
                    if first.is_none() && !data.is_empty() {
                        first = Some(since.elapsed());
                    }
                    stdout.extend_from_slice(&data);
                }
                Some(exec_response::Response::Stderr(data)) => stderr.extend_from_slice(&data),
                Some(exec_response::Response::Exited(exit)) => {
                    ensure!(
                        exit.exit_code == 0 && exit.signal == 0,
                        "{call} {id}: exit {} signal {}: {}",
                        exit.exit_code,
                        exit.signal,
                        String::from_utf8_lossy(&stderr)
                    );
                    return Ok((first, since.elapsed(), stdout));
                }
                Some(exec_response::Response::Started(_)) | None => {}
            }
        }
        bail!("{call} {id}: the stream ended without `exited`")
    }

    /// Exec `true`: from `start` until `exited`.
    async fn exec_round_trip(&self, id: &str) -> Result<Duration> {
        let since = Instant::now();
        Ok(self.exec(id, &["true"], since).await?.1)
    }

    /// CreateSandbox then `Exec echo hi`: (create until RUNNING, until the first stdout byte).
    /// Deletes the sandbox afterwards (not timed).
    async fn create_first_command(&self, id: &str) -> Result<(Duration, Duration)> {
        let since = Instant::now();
        self.create(id).await?;
        let created = since.elapsed();
        let (first, _, stdout) = self.exec(id, FIRST_COMMAND, since).await?;
        self.delete(id).await?;
        ensure!(stdout == FIRST_OUTPUT, "echo printed {stdout:?}");
        Ok((created, first.context("no stdout byte arrived")?))
    }
}

/// One operation's samples on the four sides.
#[derive(Debug, Default)]
struct Four {
    walls: Vec<Duration>,
    open: Vec<Duration>,
    ctr_seccomp: Vec<Duration>,
    ctr_plain: Vec<Duration>,
}

impl Four {
    fn push_all(&mut self, [w, o, cs, cp]: [Duration; 4]) {
        self.walls.push(w);
        self.open.push(o);
        self.ctr_seccomp.push(cs);
        self.ctr_plain.push(cp);
    }
}

#[derive(Debug, Default)]
struct Samples {
    round_trip: Four,
    create: Four,
    first_command: Four,
}

/// One operation's figures.
#[derive(Debug, Serialize)]
struct Row {
    operation: &'static str,
    walls: Summary,
    open: Summary,
    ctr_seccomp: Option<Summary>,
    ctr_plain: Option<Summary>,
    /// walls p50 - open p50, ms.
    walls_cost_p50_ms: f64,
}

impl Row {
    fn of(operation: &'static str, four: &Four) -> Result<Row> {
        let walls = Summary::of(&four.walls).context("no samples")?;
        let open = Summary::of(&four.open).context("no samples")?;
        Ok(Row {
            operation,
            walls_cost_p50_ms: walls.p50_ms - open.p50_ms,
            walls,
            open,
            ctr_seccomp: Summary::of(&four.ctr_seccomp),
            ctr_plain: Summary::of(&four.ctr_plain),
        })
    }
}

#[derive(Debug, Serialize)]
struct Verdict {
    what: String,
    met: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: support::MachineFacts,
    load: LoadAverages,
    settings: Settings,
    rows: Vec<Row>,
    verdicts: Vec<Verdict>,
}

impl Report {
    fn new(
        machine: support::MachineFacts,
        load: LoadAverages,
        settings: Settings,
        s: &Samples,
    ) -> Result<Report> {
        let rows = vec![
            Row::of("exec round trip", &s.round_trip)?,
            Row::of("create", &s.create)?,
            Row::of("create + first command", &s.first_command)?,
        ];
        let rt = &rows[0];
        let mut verdicts = Vec::new();
        for row in &rows[..2] {
            verdicts.push(Verdict {
                what: format!(
                    "{}: walls add {:.1} ms at p50 (budget {WALLS_BUDGET_MS} ms)",
                    row.operation, row.walls_cost_p50_ms
                ),
                met: row.walls_cost_p50_ms <= WALLS_BUDGET_MS,
            });
        }
        for (side, sbx, ctr) in [
            (
                "walls vs ctr with the same filter",
                &rt.walls,
                &rt.ctr_seccomp,
            ),
            ("open vs plain ctr", &rt.open, &rt.ctr_plain),
        ] {
            let ctr = ctr.as_ref().context("no ctr samples")?;
            let ratio = sbx.p50_ms / ctr.p50_ms;
            verdicts.push(Verdict {
                what: format!(
                    "exec round trip, {side}: {ratio:.2}x at p50 (target {ROUND_TRIP_TARGET_RATIO}x)"
                ),
                met: ratio <= ROUND_TRIP_TARGET_RATIO,
            });
        }
        Ok(Report {
            machine,
            load,
            settings,
            rows,
            verdicts,
        })
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{:<24} {:>22} {:>22} {:>22} {:>22} {:>10}\n",
            "p50 / p99 / mean (ms)",
            "sandboxd walls",
            "sandboxd open",
            "ctr seccomp",
            "ctr plain",
            "walls cost"
        );
        out.push_str(&"-".repeat(out.chars().count() - 1));
        out.push('\n');
        let cell = |s: Option<&Summary>| match s {
            Some(s) => format!("{:.1} / {:.1} / {:.1}", s.p50_ms, s.p99_ms, s.mean_ms),
            None => "-".to_owned(),
        };
        for row in &self.rows {
            out.push_str(&format!(
                "{:<24} {:>22} {:>22} {:>22} {:>22} {:>7.1} ms\n",
                row.operation,
                cell(Some(&row.walls)),
                cell(Some(&row.open)),
                cell(row.ctr_seccomp.as_ref()),
                cell(row.ctr_plain.as_ref()),
                row.walls_cost_p50_ms
            ));
        }
        out.push_str(
            "create: CreateSandbox until RUNNING (ctr: none); create + first command: the same \
             then Exec `echo hi` to its first stdout byte, vs `ctr run --rm IMAGE ID echo hi`; \
             walls cost: walls p50 - open p50\n",
        );
        for v in &self.verdicts {
            out.push_str(&format!("{:<6} {}\n", verdict(v.met), v.what));
        }
        out.push_str(&self.load.render());
        out
    }
}
