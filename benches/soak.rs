//! Soak: many concurrent clients doing mixed work for a long time against one sandboxd, to find
//! what short tests cannot: errors that appear only under sustained concurrency, and resources
//! (memory, file descriptors, containerd objects) that leak a little per operation.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, and the sandboxd binary), pulls the image, and starts `SOAK_CLIENTS` (default 16)
//! clients, each on its own gRPC channel. For `SOAK_DURATION` (default 10 min) every client
//! repeats a session drawn from a weighted mix (the weights are printed with the settings):
//!
//! * create a sandbox (idle PID 1), which must answer RUNNING and then exec;
//! * 1 to 4 execs, each checked byte for byte: ExecSync of arithmetic with a chosen exit code,
//!   ExecSync of `cat` fed stdin, an Exec stream of `cat` fed stdin in chunks, and an Exec stream
//!   without stdin (the output relay) of `seq`;
//! * WriteFile of random bytes in random chunks, read back with ReadFile, found by ListFiles and
//!   by an exec;
//! * CommitSnapshot, then the file overwritten, then a fork from the snapshot (which must hold
//!   the committed content and exec) and sometimes a RestoreSandbox onto it;
//! * sometimes StopSandbox, a file read and write while stopped, and StartSandbox;
//! * deletes of everything the session made: forks, the sandbox, then the snapshot.
//!
//! Sprinkled in are calls that must fail because of the caller (a second create of a live id,
//! an exec in a stopped sandbox, a snapshot deleted while a fork builds on it, a relative path,
//! a missing file, a running sandbox deleted without force, a Get after delete); each must fail
//! with exactly its documented code.
//!
//! Every status is classified. The caller's: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
//! RESOURCE_EXHAUSTED and FAILED_PRECONDITION. Not the caller's: every other code (INTERNAL,
//! UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS...), a call without an answer within
//! 2 minutes, a wrong exit code, output or file content, a broken Exec stream protocol, a
//! created sandbox that does not exec, and a deliberate misuse answered with the wrong code. A
//! client never races itself, so a caller-class status outside the deliberate misuses is listed
//! too (as "unprovoked"), though it does not fail the run. Each failure is printed as it happens
//! and again at the end, with the client, the time, the call and the sandbox. A call still
//! unanswered after 30 s gets a diagnosis while it hangs: the sandbox's freezer state, its
//! processes with their state, wait channel and stdio, its shim, and sandboxd's log lines about
//! it.
//!
//! sandboxd's and containerd's RSS (`VmRSS`), open fds and threads are sampled before the load,
//! after `SOAK_WARMUP` (default 1 min, at most half the duration) and at the end, both times
//! with every client held between sessions (nothing of theirs alive) and the shims gone, so the
//! two figures compare like with like; the load's peak is sampled every 15 s. A figure is flat
//! when end ≤ warm-up × 1.2 + slack (8 MiB of RSS, 8 fds); threads are shown, not judged, as
//! tokio's blocking threads come and go with idle time. At the end it checks that sandboxd lists
//! no sandbox or snapshot, that its containerd namespace holds no container, task, active
//! snapshot or lease, and that no cgroup, exec FIFO dir or shim remains.
//!
//! It prints operation counts with p50/p99/max latencies, the errors, the resource table and the
//! verdicts, writes them to `target/bench-soak.json`, and exits non-zero when a failure that is
//! not the caller's happened, something was left behind, or a figure is not flat; sandboxd's and
//! containerd's logs are then kept in `target/soak-logs/`.
//!
//! Settings come from the environment or from arguments after `--`, which win:
//! `cargo bench --bench soak -- --duration 2m --clients 16 --warmup 60s --seed 7`
//! (`SOAK_DURATION`, `SOAK_CLIENTS`, `SOAK_WARMUP`, `SOAK_SEED`; durations as `600`, `90s`,
//! `10m` or `1h`). Run it as root; it needs the packages of `scripts/install-deps.sh`. Run
//! without `--bench` (as `cargo test --benches` does) it only prints how to run it, so it never
//! takes part in CI's pass/fail.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use sandboxd::pb::{self, exec_request, exec_response, write_file_request, SandboxState};
use serde::Serialize;
use tokio::sync::{mpsc, RwLock};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use common::{Clients, TestEnv};
use support::{announce, bench_main, publish, LoadAverages, MachineFacts, Summary};

/// Environment variable: how long the clients run (`600`, `90s`, `10m`, `1h`).
const ENV_DURATION: &str = "SOAK_DURATION";
/// Default of [`ENV_DURATION`].
const DEFAULT_DURATION: Duration = Duration::from_secs(600);
/// Environment variable: concurrent clients.
const ENV_CLIENTS: &str = "SOAK_CLIENTS";
/// Default of [`ENV_CLIENTS`].
const DEFAULT_CLIENTS: usize = 16;
/// Environment variable: load before the first resource figure is taken.
const ENV_WARMUP: &str = "SOAK_WARMUP";
/// Default of [`ENV_WARMUP`] (clamped to half the duration).
const DEFAULT_WARMUP: Duration = Duration::from_secs(60);
/// Environment variable: seed of the clients' choices.
const ENV_SEED: &str = "SOAK_SEED";
/// Default of [`ENV_SEED`].
const DEFAULT_SEED: u64 = 0x50a4_2026;

/// A call with no answer after this long is a failure (the server hung).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A call still without an answer after this long has its sandbox's processes and sandboxd's
/// log lines about it recorded, while it still hangs.
const DIAGNOSE_AFTER: Duration = Duration::from_secs(30);
/// sandboxd log lines naming the sandbox kept in a hang's diagnosis.
const DIAGNOSIS_LOG_LINES: usize = 40;
/// Where sandboxd's and containerd's logs are copied when the verdict fails, below cargo's
/// target directory (the fixtures remove their own directories).
const LOGS_DIR: &str = "soak-logs";
/// Pause with every client held before a resource figure, for shims and relays to exit.
const SETTLE: Duration = Duration::from_secs(3);
/// How long shims may take to exit, and containerd objects to go, before they count as left.
const GONE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the load's peak resources are sampled and a progress line printed.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(15);
/// Flat: end ≤ warm-up × this + slack.
const FLAT_FACTOR: f64 = 1.2;
/// Slack of the flatness rule for RSS, KiB.
const RSS_SLACK_KIB: u64 = 8 * 1024;
/// Slack of the flatness rule for open fds.
const FD_SLACK: u64 = 8;
/// Caller-class statuses listed in full at the end (all are counted).
const CALLER_EXAMPLES: usize = 20;
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-soak.json";

/// Probability that a session commits a snapshot.
const P_COMMIT: f64 = 0.5;
/// Given a commit: probability of a fork from it.
const P_FORK: f64 = 0.8;
/// Given a commit: probability of restoring the sandbox onto it.
const P_RESTORE: f64 = 0.25;
/// Probability that a session stops and restarts its sandbox.
const P_STOP_START: f64 = 0.2;
/// Probability that a session writes and reads files.
const P_FILES: f64 = 0.8;
/// Probability of each deliberate misuse where one fits.
const P_MISUSE: f64 = 0.15;
/// Most execs per sandbox per session (at least 1).
const MAX_EXECS: u64 = 4;
/// Exec kinds and their weights: ExecSync arithmetic, ExecSync `cat` with stdin, Exec stream
/// `cat` with stdin, Exec stream `seq` without stdin.
const EXEC_WEIGHTS: [(ExecKind, u64); 4] = [
    (ExecKind::SyncArithmetic, 40),
    (ExecKind::SyncStdin, 20),
    (ExecKind::StreamStdin, 25),
    (ExecKind::StreamSeq, 15),
];
/// Largest file written (bytes).
const MAX_FILE: u64 = 256 << 10;
/// Largest WriteFile data message and Exec stdin chunk (bytes).
const MAX_CHUNK: u64 = 64 << 10;
/// Largest stdin fed to one exec (bytes).
const MAX_STDIN: u64 = 128 << 10;
/// Largest `seq` count of an Exec stream.
const MAX_SEQ: u64 = 20_000;
/// Exec stream queue towards the server (messages).
const EXEC_QUEUE: usize = 4;

fn main() -> Result<()> {
    bench_main("soak", Settings::read, run)
}

// ---- settings ----

/// What the run does, from the environment and the arguments.
#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    /// How long clients start new sessions.
    #[serde(serialize_with = "secs")]
    duration: Duration,
    /// Concurrent clients.
    clients: usize,
    /// Load before the warm-up figure.
    #[serde(serialize_with = "secs")]
    warmup: Duration,
    /// Seed of every choice.
    seed: u64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Settings {
    /// The environment, then `--duration`, `--clients`, `--warmup`, `--seed` arguments over it.
    fn read() -> Result<Settings> {
        let env = |name: &str| match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {name}")),
        };
        let mut duration = env(ENV_DURATION)?;
        let mut clients = env(ENV_CLIENTS)?;
        let mut warmup = env(ENV_WARMUP)?;
        let mut seed = env(ENV_SEED)?;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let slot = match arg.as_str() {
                "--duration" => &mut duration,
                "--clients" => &mut clients,
                "--warmup" => &mut warmup,
                "--seed" => &mut seed,
                // cargo's own `--bench`, and anything meant for another bench.
                _ => continue,
            };
            *slot = Some(
                args.next()
                    .with_context(|| format!("{arg} needs a value"))?,
            );
        }
        let duration = match duration {
            Some(v) => parse_duration(&v).with_context(|| format!("duration {v:?}"))?,
            None => DEFAULT_DURATION,
        };
        let clients = match clients {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("clients {v:?} is not a count"))?,
            None => DEFAULT_CLIENTS,
        };
        let warmup = match warmup {
            Some(v) => parse_duration(&v).with_context(|| format!("warmup {v:?}"))?,
            None => DEFAULT_WARMUP,
        };
        let seed = match seed {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("seed {v:?} is not a number"))?,
            None => DEFAULT_SEED,
        };
        ensure!(clients > 0, "at least one client is needed");
        ensure!(!duration.is_zero(), "the duration must be positive");
        Ok(Settings {
            duration,
            clients,
            warmup: warmup.min(duration / 2),
            seed,
        })
    }

    fn render(&self, image: &str) -> String {
        format!(
            "workload: image {image}; {} clients for {:.0} s, resources after a {:.0} s warm-up \
             and at the end; seed {}\nmix per session: create, 1-{MAX_EXECS} execs (weights: \
             ExecSync arithmetic 40, ExecSync stdin 20, Exec stream stdin 25, Exec stream seq 15), \
             files {P_FILES}, commit {P_COMMIT} (then fork {P_FORK}, restore {P_RESTORE}), \
             stop/start {P_STOP_START}, each deliberate misuse {P_MISUSE}; deletes of all",
            self.clients,
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64(),
            self.seed
        )
    }
}

/// `600`, `600s`, `10m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().context("not a whole number")?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => bail!("unknown unit {other:?} (s, m or h)"),
    };
    Ok(Duration::from_secs(secs))
}

// ---- the run ----

/// Starts the fixtures, runs the clients, checks for leftovers and judges the figures.
async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let (machine, load_before) = announce(&env.containerd, &settings.render(&image)).await?;
    support::pulled_channel(&env, &image).await?;

    let shared = Arc::new(Shared::new(Diagnostics::of(&env)));
    let mut resources = Resources {
        before: Some(Figures::sample(&env).await?),
        ..Default::default()
    };

    let started = Instant::now();
    let deadline = started + settings.duration;
    let mut clients = Vec::with_capacity(settings.clients);
    // The clients' connections stay open until the end figure, as they were at the warm-up one.
    let mut connections = Vec::with_capacity(settings.clients);
    for n in 0..settings.clients {
        let c = Clients::new(env.channel().await, image.clone());
        connections.push(c.clone());
        let client = Client {
            n,
            c,
            rng: Rng::new(settings.seed, n),
            shared: shared.clone(),
            started,
            sessions: 0,
        };
        clients.push(tokio::spawn(client.run(deadline)));
    }

    // Warm-up, then the first figure with every client held between sessions.
    let warm_at = started + settings.warmup;
    let mut next_sample = started + SAMPLE_INTERVAL;
    let mut warmed = false;
    while clients.iter().any(|c| !c.is_finished()) {
        let now = Instant::now();
        if !warmed && now >= warm_at {
            let held = shared.hold.write().await;
            tokio::time::sleep(SETTLE).await;
            wait_shims_gone(&env).await;
            let figures = Figures::sample(&env).await?;
            println!(
                "[{:>5.0} s] warm-up figure (clients held): {}",
                started.elapsed().as_secs_f64(),
                figures.render_short()
            );
            resources.warm = Some(figures);
            drop(held);
            warmed = true;
        }
        if now >= next_sample {
            let figures = Figures::sample(&env).await?;
            println!(
                "[{:>5.0} s] {}; {}",
                started.elapsed().as_secs_f64(),
                shared.progress(),
                figures.render_short()
            );
            resources.peak.max_with(&figures);
            next_sample += SAMPLE_INTERVAL;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (n, client) in clients.into_iter().enumerate() {
        if let Err(e) = client.await {
            shared.fail(Failure {
                client: n,
                at_s: started.elapsed().as_secs_f64(),
                call: "client task".into(),
                subject: String::new(),
                detail: format!("panicked or was cancelled: {e}"),
            });
        }
    }
    let ran = started.elapsed();
    println!(
        "[{:>5.0} s] all clients finished; {}",
        ran.as_secs_f64(),
        shared.progress()
    );

    tokio::time::sleep(SETTLE).await;
    let leftovers = leftovers(&env, &mut connections[0]).await?;
    resources.end = Some(Figures::sample(&env).await?);
    drop(connections);
    let load = LoadAverages::since(load_before)?;

    let report = Report::new(
        machine, load, settings, &image, ran, &shared, resources, leftovers,
    );
    publish(&report.render(), &report, JSON_FILE_NAME)?;
    let verdict = report.verdict();
    if verdict.is_err() {
        keep_logs(&env)?;
    }
    verdict
}

/// What all clients share: the statistics, and the lock that holds them between sessions.
struct Shared {
    stats: Mutex<Stats>,
    diagnostics: Diagnostics,
    /// Clients hold it for reading during a session; the controller takes it for writing to
    /// hold them all between sessions.
    hold: RwLock<()>,
}

impl Shared {
    fn new(diagnostics: Diagnostics) -> Shared {
        Shared {
            stats: Mutex::new(Stats::default()),
            diagnostics,
            hold: RwLock::new(()),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a failure that is not the caller's and prints it at once.
    fn fail(&self, failure: Failure) {
        eprintln!("FAILURE {}", failure.render());
        self.stats().failures.push(failure);
    }

    fn progress(&self) -> String {
        let s = self.stats();
        let calls: usize = s.ops.values().map(|o| o.latencies.len() + o.errors).sum();
        format!(
            "{} sessions, {calls} calls, {} caller-class, {} failures",
            s.sessions,
            s.caller.values().sum::<usize>(),
            s.failures.len()
        )
    }
}

/// Everything counted during the run.
#[derive(Default)]
struct Stats {
    /// Per call: latencies of the calls that answered as expected, and the count of the rest.
    ops: BTreeMap<&'static str, OpStats>,
    /// Caller-class statuses by code.
    caller: BTreeMap<String, usize>,
    /// The first caller-class statuses, with their context.
    caller_examples: Vec<String>,
    /// Caller-class statuses outside the deliberate misuses.
    unprovoked: Vec<Failure>,
    /// Failures that are not the caller's.
    failures: Vec<Failure>,
    /// Sessions completed (cleaned up).
    sessions: usize,
}

#[derive(Default)]
struct OpStats {
    latencies: Vec<Duration>,
    errors: usize,
}

/// One failure, with where and when.
#[derive(Debug, Clone, Serialize)]
struct Failure {
    client: usize,
    /// Seconds since the clients started.
    at_s: f64,
    call: String,
    subject: String,
    detail: String,
}

impl Failure {
    fn render(&self) -> String {
        format!(
            "client {:02} at {:.1} s: {} {}: {}",
            self.client, self.at_s, self.call, self.subject, self.detail
        )
    }
}

/// Whether a status is the caller's doing.
fn is_callers(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
    )
}

// ---- one client ----

/// Why a session stops early: the failure is recorded already.
struct Abort;

type Step<T> = std::result::Result<T, Abort>;

/// What a session made and has not deleted yet, in creation order.
#[derive(Default)]
struct Made {
    sandboxes: Vec<String>,
    snapshots: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExecKind {
    SyncArithmetic,
    SyncStdin,
    StreamStdin,
    StreamSeq,
}

/// A client: its own channel, its own choices, one session at a time.
struct Client {
    n: usize,
    c: Clients,
    rng: Rng,
    shared: Arc<Shared>,
    started: Instant,
    sessions: usize,
}

impl Client {
    /// Runs sessions until `deadline`; the last one runs to its end, cleanup included.
    async fn run(mut self, deadline: Instant) {
        while Instant::now() < deadline {
            let shared = self.shared.clone();
            let hold = shared.hold.read().await;
            let mut made = Made::default();
            let _ = self.session(&mut made).await;
            self.clean_up(&mut made).await;
            drop(hold);
            self.sessions += 1;
            self.shared.stats().sessions += 1;
        }
    }

    fn at_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn fail(&self, call: &str, subject: &str, detail: String) -> Abort {
        self.shared.fail(Failure {
            client: self.n,
            at_s: self.at_s(),
            call: call.into(),
            subject: subject.into(),
            detail,
        });
        Abort
    }

    /// Fails the session unless `ok`.
    fn check(
        &self,
        ok: bool,
        call: &str,
        subject: &str,
        detail: impl FnOnce() -> String,
    ) -> Step<()> {
        if ok {
            Ok(())
        } else {
            Err(self.fail(call, subject, detail()))
        }
    }

    /// Runs `call` (named `op`, on `subject`) with the call timeout; records its latency, or
    /// classifies its error.
    async fn call<T>(
        &mut self,
        op: &'static str,
        subject: &str,
        call: impl Future<Output = std::result::Result<T, Status>>,
    ) -> Step<T> {
        let start = Instant::now();
        tokio::pin!(call);
        let mut diagnosis = None;
        let result = match tokio::time::timeout(DIAGNOSE_AFTER, &mut call).await {
            Ok(result) => Ok(result),
            Err(_) => {
                diagnosis = Some(self.shared.diagnostics.describe(subject));
                tokio::time::timeout(CALL_TIMEOUT - DIAGNOSE_AFTER, &mut call).await
            }
        };
        let took = start.elapsed();
        match result {
            Ok(Ok(value)) => {
                if let Some(diagnosis) = diagnosis {
                    eprintln!(
                        "slow call: client {:02} {op} {subject} answered after {:.0} s; at {:.0} \
                         s:\n{diagnosis}",
                        self.n,
                        took.as_secs_f64(),
                        DIAGNOSE_AFTER.as_secs_f64()
                    );
                }
                self.shared
                    .stats()
                    .ops
                    .entry(op)
                    .or_default()
                    .latencies
                    .push(took);
                Ok(value)
            }
            Ok(Err(status)) => {
                self.shared.stats().ops.entry(op).or_default().errors += 1;
                if is_callers(status.code()) {
                    let failure = Failure {
                        client: self.n,
                        at_s: self.at_s(),
                        call: op.into(),
                        subject: subject.into(),
                        detail: format!("{:?}: {}", status.code(), status.message()),
                    };
                    eprintln!("unprovoked caller-class status: {}", failure.render());
                    let mut stats = self.shared.stats();
                    stats.record_caller(status.code(), &failure);
                    stats.unprovoked.push(failure);
                    Err(Abort)
                } else {
                    Err(self.fail(
                        op,
                        subject,
                        format!(
                            "{:?} after {:.0} ms: {}",
                            status.code(),
                            took.as_secs_f64() * 1e3,
                            status.message()
                        ),
                    ))
                }
            }
            Err(_) => {
                self.shared.stats().ops.entry(op).or_default().errors += 1;
                let diagnosis = diagnosis.unwrap_or_default();
                Err(self.fail(
                    op,
                    subject,
                    format!(
                        "no answer within {CALL_TIMEOUT:?}; after {DIAGNOSE_AFTER:?}:\n{diagnosis}"
                    ),
                ))
            }
        }
    }

    /// A deliberate misuse: `call` must fail with `expected`. Anything else is a failure; the
    /// session goes on either way, since the misuse changes nothing.
    async fn misuse<T>(
        &mut self,
        op: &'static str,
        subject: &str,
        expected: Code,
        call: impl Future<Output = std::result::Result<T, Status>>,
    ) {
        let start = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
        let took = start.elapsed();
        let detail = match result {
            Ok(Err(status)) if status.code() == expected => {
                let mut stats = self.shared.stats();
                stats.ops.entry(op).or_default().latencies.push(took);
                let failure = Failure {
                    client: self.n,
                    at_s: self.at_s(),
                    call: op.into(),
                    subject: subject.into(),
                    detail: format!("{:?} as meant: {}", status.code(), status.message()),
                };
                stats.record_caller(expected, &failure);
                return;
            }
            Ok(Err(status)) => format!(
                "meant to be {expected:?}, got {:?}: {}",
                status.code(),
                status.message()
            ),
            Ok(Ok(_)) => format!("meant to be {expected:?}, but it succeeded"),
            Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
        };
        self.shared.stats().ops.entry(op).or_default().errors += 1;
        self.fail(op, subject, detail);
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.chance(p)
    }

    /// One session: everything it makes is in `made` for [`Client::clean_up`].
    async fn session(&mut self, made: &mut Made) -> Step<()> {
        let id = format!("soak-c{:02}-s{:05}", self.n, self.sessions);
        self.create(&id, None, made).await?;
        if self.chance(P_MISUSE) {
            let request = self.c.request(&id);
            let mut sb = self.c.sb.clone();
            self.misuse(
                "CreateSandbox (id in use)",
                &id,
                Code::AlreadyExists,
                async move { sb.create_sandbox(request).await },
            )
            .await;
        }
        self.execs(&id).await?;

        let file = format!("/tmp/soak-{}.bin", self.rng.below(1 << 20));
        let mut content = Vec::new();
        if self.chance(P_FILES) {
            content = self.rng.bytes_up_to(MAX_FILE);
            self.write_file(&id, &file, &content).await?;
            self.check_file(&id, &file, &content).await?;
            if self.chance(P_MISUSE) {
                let mut fs = self.c.fs.clone();
                let request = pb::ReadFileRequest {
                    sandbox_id: id.clone(),
                    path: format!("{file}.missing"),
                    ..Default::default()
                };
                self.misuse("ReadFile (missing)", &id, Code::NotFound, async move {
                    let mut stream = fs.read_file(request).await?.into_inner();
                    while stream.message().await?.is_some() {}
                    Ok(())
                })
                .await;
            }
            if self.chance(P_MISUSE) {
                let mut fs = self.c.fs.clone();
                let messages = vec![pb::WriteFileRequest {
                    request: Some(write_file_request::Request::Header(pb::WriteFileHeader {
                        sandbox_id: id.clone(),
                        path: "tmp/relative".into(),
                        mode: 0o644,
                        ..Default::default()
                    })),
                }];
                self.misuse(
                    "WriteFile (relative path)",
                    &id,
                    Code::InvalidArgument,
                    async move { fs.write_file(tokio_stream::iter(messages)).await },
                )
                .await;
            }
        }

        if self.chance(P_COMMIT) {
            let snapshot = self.commit(&id, made).await?;
            // What the snapshot holds; the sandbox moves on.
            let committed = content.clone();
            if !committed.is_empty() {
                content = self.rng.bytes_up_to(MAX_FILE);
                self.write_file(&id, &file, &content).await?;
            }
            if self.chance(P_FORK) {
                let fork = format!("{id}-f");
                self.create(&fork, Some(&snapshot), made).await?;
                if !committed.is_empty() {
                    self.check_file(&fork, &file, &committed).await?;
                }
                self.execs(&fork).await?;
                if self.chance(P_MISUSE) {
                    let mut snap = self.c.snap.clone();
                    let request = pb::DeleteSnapshotRequest {
                        snapshot_id: snapshot.clone(),
                    };
                    self.misuse(
                        "DeleteSnapshot (fork builds on it)",
                        &snapshot,
                        Code::FailedPrecondition,
                        async move { snap.delete_snapshot(request).await },
                    )
                    .await;
                }
            }
            if self.chance(P_RESTORE) {
                self.restore(&id, &snapshot).await?;
                content = committed;
                if !content.is_empty() {
                    self.check_file(&id, &file, &content).await?;
                }
                self.execs(&id).await?;
            }
        }

        if self.chance(P_STOP_START) {
            self.stop_start(&id, &file, &mut content).await?;
        }

        if self.chance(P_MISUSE) {
            let mut sb = self.c.sb.clone();
            let request = pb::DeleteSandboxRequest {
                sandbox_id: id.clone(),
                force: false,
            };
            self.misuse(
                "DeleteSandbox (running, no force)",
                &id,
                Code::FailedPrecondition,
                async move { sb.delete_sandbox(request).await },
            )
            .await;
        }
        // Deletes happen in clean_up; a Get afterwards must not find the sandbox.
        self.clean_up(made).await;
        if self.chance(P_MISUSE) {
            let mut sb = self.c.sb.clone();
            let request = pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            };
            self.misuse("GetSandbox (deleted)", &id, Code::NotFound, async move {
                sb.get_sandbox(request).await
            })
            .await;
        }
        Ok(())
    }

    /// Deletes what `made` holds: sandboxes newest first (forks before their source), then
    /// snapshots newest first. A NOT_FOUND is fine here (an earlier failed call may have done
    /// the work); anything else is a failure.
    async fn clean_up(&mut self, made: &mut Made) {
        while let Some(id) = made.sandboxes.pop() {
            let mut sb = self.c.sb.clone();
            let request = pb::DeleteSandboxRequest {
                sandbox_id: id.clone(),
                force: true,
            };
            let _ = self
                .call("DeleteSandbox", &id, async move {
                    match sb.delete_sandbox(request).await {
                        Err(s) if s.code() == Code::NotFound => Ok(()),
                        other => other.map(|_| ()),
                    }
                })
                .await;
        }
        while let Some(snapshot) = made.snapshots.pop() {
            let mut snap = self.c.snap.clone();
            let request = pb::DeleteSnapshotRequest {
                snapshot_id: snapshot.clone(),
            };
            let _ = self
                .call("DeleteSnapshot", &snapshot, async move {
                    match snap.delete_snapshot(request).await {
                        Err(s) if s.code() == Code::NotFound => Ok(()),
                        other => other.map(|_| ()),
                    }
                })
                .await;
        }
    }

    /// Creates sandbox `id` from the image or from `snapshot`; it must answer RUNNING.
    async fn create(&mut self, id: &str, snapshot: Option<&str>, made: &mut Made) -> Step<()> {
        let request = match snapshot {
            None => self.c.request(id),
            Some(snapshot) => pb::CreateSandboxRequest {
                sandbox_id: id.into(),
                snapshot_id: snapshot.into(),
                ..Default::default()
            },
        };
        let op = if snapshot.is_some() {
            "CreateSandbox (fork)"
        } else {
            "CreateSandbox"
        };
        let mut sb = self.c.sb.clone();
        // Recorded before the call: a create that fails part-way must leave nothing, and the
        // cleanup's NOT_FOUND says so.
        made.sandboxes.push(id.to_owned());
        let sandbox = self
            .call(op, id, async move { sb.create_sandbox(request).await })
            .await?
            .into_inner()
            .sandbox;
        let state = sandbox.as_ref().map(|s| s.state());
        self.check(state == Some(SandboxState::Running), op, id, || {
            format!("answered state {state:?}, not RUNNING")
        })
    }

    /// 1 to [`MAX_EXECS`] execs of kinds drawn by [`EXEC_WEIGHTS`], each checked exactly.
    async fn execs(&mut self, id: &str) -> Step<()> {
        let n = 1 + self.rng.below(MAX_EXECS);
        for _ in 0..n {
            let kind = self.rng.weighted(&EXEC_WEIGHTS);
            match kind {
                ExecKind::SyncArithmetic => self.exec_arithmetic(id).await?,
                ExecKind::SyncStdin => self.exec_sync_stdin(id).await?,
                ExecKind::StreamStdin => self.exec_stream_stdin(id).await?,
                ExecKind::StreamSeq => self.exec_stream_seq(id).await?,
            }
        }
        Ok(())
    }

    /// ExecSync of `sh -c 'echo $((A + B)); echo err-C >&2; exit C'`.
    async fn exec_arithmetic(&mut self, id: &str) -> Step<()> {
        let (a, b, code) = (
            self.rng.below(1000),
            self.rng.below(1000),
            self.rng.below(4),
        );
        let script = format!("echo $(({a} + {b})); echo err-{code} >&2; exit {code}");
        let response = self.exec_sync(id, "ExecSync", &script, Vec::new()).await?;
        let want_out = format!("{}\n", a + b);
        let want_err = format!("err-{code}\n");
        self.check(
            response.exit_code == code as i32
                && response.stdout == want_out.as_bytes()
                && response.stderr == want_err.as_bytes(),
            "ExecSync",
            id,
            || {
                format!(
                    "{script:?}: exit {} (want {code}), stdout {:?} (want {want_out:?}), stderr \
                     {:?} (want {want_err:?})",
                    response.exit_code,
                    String::from_utf8_lossy(&response.stdout),
                    String::from_utf8_lossy(&response.stderr)
                )
            },
        )
    }

    /// ExecSync of `cat` fed random stdin, which must come back whole.
    async fn exec_sync_stdin(&mut self, id: &str) -> Step<()> {
        let input = self.rng.bytes_up_to(MAX_STDIN);
        let response = self
            .exec_sync(id, "ExecSync (stdin)", "cat", input.clone())
            .await?;
        self.check(
            response.exit_code == 0 && response.stdout == input && response.stderr.is_empty(),
            "ExecSync (stdin)",
            id,
            || {
                format!(
                    "cat of {} bytes: exit {}, {} bytes back (equal: {}), stderr {:?}",
                    input.len(),
                    response.exit_code,
                    response.stdout.len(),
                    response.stdout == input,
                    String::from_utf8_lossy(&response.stderr)
                )
            },
        )
    }

    async fn exec_sync(
        &mut self,
        id: &str,
        op: &'static str,
        script: &str,
        stdin: Vec<u8>,
    ) -> Step<pb::ExecSyncResponse> {
        let request = pb::ExecSyncRequest {
            sandbox_id: id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            stdin,
            ..Default::default()
        };
        let mut sb = self.c.sb.clone();
        Ok(self
            .call(op, id, async move { sb.exec_sync(request).await })
            .await?
            .into_inner())
    }

    /// An Exec stream of `cat; echo done >&2; exit C` fed random stdin in random chunks.
    async fn exec_stream_stdin(&mut self, id: &str) -> Step<()> {
        let input = self.rng.bytes_up_to(MAX_STDIN);
        let code = self.rng.below(4) as i32;
        let mut inputs = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let n = (1 + self.rng.below(MAX_CHUNK) as usize).min(rest.len());
            inputs.push(exec_request::Request::Stdin(rest[..n].to_vec()));
            rest = &rest[n..];
        }
        inputs.push(exec_request::Request::CloseStdin(pb::CloseStdin {}));
        let start = pb::ExecStart {
            sandbox_id: id.into(),
            args: vec![
                "sh".into(),
                "-c".into(),
                format!("cat; echo done >&2; exit {code}"),
            ],
            stdin: true,
            ..Default::default()
        };
        let out = self.exec_stream("Exec (stdin)", id, start, inputs).await?;
        self.check(
            out.exit_code == Some(code) && out.stdout == input && out.stderr == b"done\n",
            "Exec (stdin)",
            id,
            || {
                format!(
                    "cat of {} bytes: exit {:?} (want {code}), {} bytes back (equal: {}), \
                     stderr {:?}",
                    input.len(),
                    out.exit_code,
                    out.stdout.len(),
                    out.stdout == input,
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        )
    }

    /// An Exec stream without stdin (the output relay) of `seq 1 N`.
    async fn exec_stream_seq(&mut self, id: &str) -> Step<()> {
        let n = 1 + self.rng.below(MAX_SEQ);
        let start = pb::ExecStart {
            sandbox_id: id.into(),
            args: vec!["seq".into(), "1".into(), n.to_string()],
            ..Default::default()
        };
        let out = self
            .exec_stream("Exec (seq)", id, start, Vec::new())
            .await?;
        let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
        self.check(
            out.exit_code == Some(0) && out.stdout == want.as_bytes() && out.stderr.is_empty(),
            "Exec (seq)",
            id,
            || {
                format!(
                    "seq 1 {n}: exit {:?}, {} bytes (want {}, equal: {}), stderr {:?}",
                    out.exit_code,
                    out.stdout.len(),
                    want.len(),
                    out.stdout == want.as_bytes(),
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        )
    }

    /// Runs an Exec stream: `start`, then `inputs` from a feeder task; checks the protocol
    /// (`started` first, `exited` last and once) and returns what came back.
    async fn exec_stream(
        &mut self,
        op: &'static str,
        id: &str,
        start: pb::ExecStart,
        inputs: Vec<exec_request::Request>,
    ) -> Step<StreamOutcome> {
        let mut sb = self.c.sb.clone();
        let outcome = self
            .call(op, id, async move {
                let (tx, rx) = mpsc::channel(EXEC_QUEUE);
                let message = |r| pb::ExecRequest { request: Some(r) };
                tx.send(message(exec_request::Request::Start(start)))
                    .await
                    .map_err(|_| Status::internal("client: exec queue closed"))?;
                let feeder = tokio::spawn(async move {
                    for input in inputs {
                        if tx.send(message(input)).await.is_err() {
                            return;
                        }
                    }
                });
                let result = async {
                    let mut stream = sb.exec(ReceiverStream::new(rx)).await?.into_inner();
                    let mut out = StreamOutcome::default();
                    while let Some(m) = stream.next().await {
                        let Some(response) = m?.response else {
                            out.protocol.push("a message without a response".into());
                            continue;
                        };
                        if out.exit_code.is_some() {
                            out.protocol.push("a message after exited".into());
                        }
                        match response {
                            exec_response::Response::Started(_) if out.started => {
                                out.protocol.push("a second started".into())
                            }
                            exec_response::Response::Started(_) => out.started = true,
                            _ if !out.started => out.protocol.push("output before started".into()),
                            exec_response::Response::Stdout(d) => out.stdout.extend(d),
                            exec_response::Response::Stderr(d) => out.stderr.extend(d),
                            exec_response::Response::Exited(e) => out.exit_code = Some(e.exit_code),
                        }
                    }
                    Ok(out)
                }
                .await;
                feeder.abort();
                result
            })
            .await?;
        let protocol = outcome.protocol.join("; ");
        self.check(
            outcome.protocol.is_empty() && outcome.exit_code.is_some(),
            op,
            id,
            || {
                format!(
                    "stream protocol broken: {}{}",
                    protocol,
                    if outcome.exit_code.is_none() {
                        " (ended without exited)"
                    } else {
                        ""
                    }
                )
            },
        )?;
        Ok(outcome)
    }

    /// WriteFile of `content` in random chunks; the answer must count every byte.
    async fn write_file(&mut self, id: &str, path: &str, content: &[u8]) -> Step<()> {
        let mut messages = vec![pb::WriteFileRequest {
            request: Some(write_file_request::Request::Header(pb::WriteFileHeader {
                sandbox_id: id.into(),
                path: path.into(),
                mode: 0o644,
                ..Default::default()
            })),
        }];
        let mut rest = content;
        while !rest.is_empty() {
            let n = (1 + self.rng.below(MAX_CHUNK) as usize).min(rest.len());
            messages.push(pb::WriteFileRequest {
                request: Some(write_file_request::Request::Data(rest[..n].to_vec())),
            });
            rest = &rest[n..];
        }
        let mut fs = self.c.fs.clone();
        let written = self
            .call("WriteFile", id, async move {
                fs.write_file(tokio_stream::iter(messages)).await
            })
            .await?
            .into_inner()
            .bytes_written;
        self.check(written == content.len() as i64, "WriteFile", id, || {
            format!("{path}: {written} bytes written, {} sent", content.len())
        })
    }

    /// The file must read back as `content` through ReadFile, ListFiles and an exec.
    async fn check_file(&mut self, id: &str, path: &str, content: &[u8]) -> Step<()> {
        let read = self.read_file(id, path).await?;
        self.check(read == content, "ReadFile", id, || {
            format!(
                "{path}: {} bytes read, {} written (equal prefix: {})",
                read.len(),
                content.len(),
                read.iter().zip(content).take_while(|(a, b)| a == b).count()
            )
        })?;
        let mut fs = self.c.fs.clone();
        let request = pb::ListFilesRequest {
            sandbox_id: id.into(),
            path: "/tmp".into(),
            depth: 1,
        };
        let entries = self
            .call("ListFiles", id, async move { fs.list_files(request).await })
            .await?
            .into_inner()
            .entries;
        let entry = entries.iter().find(|e| e.path == path);
        self.check(
            entry.is_some_and(|e| {
                e.r#type() == pb::FileType::Regular && e.size == content.len() as i64
            }),
            "ListFiles",
            id,
            || {
                format!(
                    "/tmp lists {path} as {entry:?}, want a regular file of {} bytes",
                    content.len()
                )
            },
        )?;
        let response = self
            .exec_sync(
                id,
                "ExecSync (file size)",
                &format!("wc -c < {path}"),
                Vec::new(),
            )
            .await?;
        let got = String::from_utf8_lossy(&response.stdout).trim().to_owned();
        self.check(
            response.exit_code == 0 && got == content.len().to_string(),
            "ExecSync (file size)",
            id,
            || {
                format!(
                    "wc -c < {path}: exit {}, {got:?}, want {}; stderr {:?}",
                    response.exit_code,
                    content.len(),
                    String::from_utf8_lossy(&response.stderr)
                )
            },
        )
    }

    async fn read_file(&mut self, id: &str, path: &str) -> Step<Vec<u8>> {
        let mut fs = self.c.fs.clone();
        let request = pb::ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
            ..Default::default()
        };
        self.call("ReadFile", id, async move {
            let mut stream = fs.read_file(request).await?.into_inner();
            let mut data = Vec::new();
            while let Some(message) = stream.message().await? {
                data.extend(message.data);
            }
            Ok(data)
        })
        .await
    }

    /// CommitSnapshot of `id`; the snapshot must name it as its source.
    async fn commit(&mut self, id: &str, made: &mut Made) -> Step<String> {
        let mut snap = self.c.snap.clone();
        let request = pb::CommitSnapshotRequest {
            sandbox_id: id.into(),
            labels: [("soak-client".to_owned(), self.n.to_string())].into(),
            ..Default::default()
        };
        let snapshot = self
            .call("CommitSnapshot", id, async move {
                snap.commit_snapshot(request).await
            })
            .await?
            .into_inner()
            .snapshot;
        let Some(snapshot) = snapshot else {
            return Err(self.fail(
                "CommitSnapshot",
                id,
                "the response holds no snapshot".into(),
            ));
        };
        made.snapshots.push(snapshot.snapshot_id.clone());
        self.check(snapshot.sandbox_id == id, "CommitSnapshot", id, || {
            format!(
                "snapshot {} names sandbox {:?}",
                snapshot.snapshot_id, snapshot.sandbox_id
            )
        })?;
        Ok(snapshot.snapshot_id)
    }

    /// RestoreSandbox of `id` onto `snapshot`; it must answer RUNNING.
    async fn restore(&mut self, id: &str, snapshot: &str) -> Step<()> {
        let mut snap = self.c.snap.clone();
        let request = pb::RestoreSandboxRequest {
            sandbox_id: id.into(),
            snapshot_id: snapshot.into(),
            ..Default::default()
        };
        let sandbox = self
            .call("RestoreSandbox", id, async move {
                snap.restore_sandbox(request).await
            })
            .await?
            .into_inner()
            .sandbox;
        let state = sandbox.as_ref().map(|s| s.state());
        self.check(
            state == Some(SandboxState::Running),
            "RestoreSandbox",
            id,
            || format!("answered state {state:?}, not RUNNING"),
        )
    }

    /// StopSandbox (SIGTERM to the idle init), an exec that must be refused, the file read and
    /// rewritten while stopped, StartSandbox, and the file and an exec checked again.
    async fn stop_start(&mut self, id: &str, file: &str, content: &mut Vec<u8>) -> Step<()> {
        let mut sb = self.c.sb.clone();
        let request = pb::StopSandboxRequest {
            sandbox_id: id.into(),
            ..Default::default()
        };
        let stopped = self
            .call(
                "StopSandbox",
                id,
                async move { sb.stop_sandbox(request).await },
            )
            .await?
            .into_inner()
            .sandbox;
        let state = stopped.as_ref().map(|s| s.state());
        self.check(
            state == Some(SandboxState::Stopped),
            "StopSandbox",
            id,
            || format!("answered state {state:?}, not STOPPED"),
        )?;
        if self.chance(P_MISUSE) {
            let mut sb = self.c.sb.clone();
            let request = pb::ExecSyncRequest {
                sandbox_id: id.into(),
                args: vec!["true".into()],
                ..Default::default()
            };
            self.misuse(
                "ExecSync (stopped)",
                id,
                Code::FailedPrecondition,
                async move { sb.exec_sync(request).await },
            )
            .await;
        }
        if !content.is_empty() {
            let read = self.read_file(id, file).await?;
            self.check(read == *content, "ReadFile (stopped)", id, || {
                format!(
                    "{file}: {} bytes read, {} written",
                    read.len(),
                    content.len()
                )
            })?;
            *content = self.rng.bytes_up_to(MAX_FILE);
            self.write_file(id, file, content).await?;
        }
        let mut sb = self.c.sb.clone();
        let request = pb::StartSandboxRequest {
            sandbox_id: id.into(),
        };
        let started = self
            .call("StartSandbox", id, async move {
                sb.start_sandbox(request).await
            })
            .await?
            .into_inner()
            .sandbox;
        let state = started.as_ref().map(|s| s.state());
        self.check(
            state == Some(SandboxState::Running),
            "StartSandbox",
            id,
            || format!("answered state {state:?}, not RUNNING"),
        )?;
        if !content.is_empty() {
            self.check_file(id, file, content).await?;
        }
        self.execs(id).await
    }
}

/// What an Exec stream returned.
#[derive(Default)]
struct StreamOutcome {
    started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: Option<i32>,
    /// Breaches of the stream protocol.
    protocol: Vec<String>,
}

impl Stats {
    fn record_caller(&mut self, code: Code, failure: &Failure) {
        *self.caller.entry(format!("{code:?}")).or_default() += 1;
        if self.caller_examples.len() < CALLER_EXAMPLES {
            self.caller_examples.push(failure.render());
        }
    }
}

/// xorshift64*: deterministic per client, so a seed replays a run's choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, client: usize) -> Rng {
        // splitmix64 of the pair, so neighbouring clients diverge at once; never zero.
        let mut z = seed ^ (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn weighted<T: Copy>(&mut self, choices: &[(T, u64)]) -> T {
        let total: u64 = choices.iter().map(|(_, w)| w).sum();
        let mut pick = self.below(total);
        for (choice, weight) in choices {
            if pick < *weight {
                return *choice;
            }
            pick -= weight;
        }
        choices[choices.len() - 1].0
    }

    /// 0 to `max` random bytes.
    fn bytes_up_to(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max + 1) as usize;
        self.bytes(n)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

// ---- resources and leftovers ----

/// One process's figures, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ProcFigures {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

impl ProcFigures {
    fn read(pid: u32) -> Result<ProcFigures> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
            let number = line.split_whitespace().next().unwrap_or_default();
            number
                .parse()
                .with_context(|| format!("/proc/{pid}/status {name} {line:?}"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("list /proc/{pid}/fd"))?
            .count() as u64;
        Ok(ProcFigures {
            rss_kib: field("VmRSS:")?,
            fds,
            threads: field("Threads:")?,
        })
    }

    fn max_with(&mut self, other: &ProcFigures) {
        self.rss_kib = self.rss_kib.max(other.rss_kib);
        self.fds = self.fds.max(other.fds);
        self.threads = self.threads.max(other.threads);
    }
}

/// sandboxd's and containerd's figures at one moment, with the shims alive then.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Figures {
    sandboxd: ProcFigures,
    containerd: ProcFigures,
    shims: u64,
}

impl Figures {
    async fn sample(env: &TestEnv) -> Result<Figures> {
        let containerd = env.containerd.pid().context("containerd is not running")?;
        ensure!(env.sandboxd.is_running(), "sandboxd is not running");
        Ok(Figures {
            sandboxd: ProcFigures::read(env.sandboxd.pid())?,
            containerd: ProcFigures::read(containerd)?,
            shims: env.containerd.shim_pids().len() as u64,
        })
    }

    fn max_with(&mut self, other: &Figures) {
        self.sandboxd.max_with(&other.sandboxd);
        self.containerd.max_with(&other.containerd);
        self.shims = self.shims.max(other.shims);
    }

    fn render_short(&self) -> String {
        format!(
            "sandboxd {:.1} MiB {} fds {} threads, containerd {:.1} MiB {} fds {} threads, {} shims",
            self.sandboxd.rss_kib as f64 / 1024.0,
            self.sandboxd.fds,
            self.sandboxd.threads,
            self.containerd.rss_kib as f64 / 1024.0,
            self.containerd.fds,
            self.containerd.threads,
            self.shims
        )
    }
}

/// The figures of the run.
#[derive(Debug, Clone, Default, Serialize)]
struct Resources {
    /// Before any load.
    before: Option<Figures>,
    /// After the warm-up, every client held.
    warm: Option<Figures>,
    /// The highest of the periodic samples under load.
    peak: Figures,
    /// After every client finished and cleaned up.
    end: Option<Figures>,
}

/// Waits (bounded) until containerd runs no shim: a figure taken with shims still exiting
/// would count their fds.
async fn wait_shims_gone(env: &TestEnv) {
    let deadline = Instant::now() + GONE_TIMEOUT;
    while !env.containerd.shim_pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the run left behind.
#[derive(Debug, Clone, Default, Serialize)]
struct Leftovers {
    sandboxes: Vec<String>,
    snapshots: Vec<String>,
    /// containerd's namespace and the cgroup parent, as the tests' leak check reads them.
    containerd: Vec<String>,
    /// Entries of sandboxd's per-sandbox and exec FIFO directories.
    files: Vec<String>,
    shims: usize,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        self.sandboxes.is_empty()
            && self.snapshots.is_empty()
            && self.containerd.is_empty()
            && self.files.is_empty()
            && self.shims == 0
    }

    fn render(&self) -> String {
        if self.is_empty() {
            return "leftovers: none (no sandbox or snapshot listed; no container, task, active \
                    snapshot, lease or cgroup; no exec or per-sandbox files; no shim)\n"
                .to_owned();
        }
        format!(
            "LEFTOVERS:\n  sandboxes: {:?}\n  snapshots: {:?}\n  containerd: {}\n  files: {:?}\n  \
             shims: {}\n",
            self.sandboxes,
            self.snapshots,
            self.containerd.join("; "),
            self.files,
            self.shims
        )
    }
}

/// What the run left behind, listed through `c` (an open connection, so that reading it opens
/// none), waiting (bounded) for asynchronous teardown to finish.
async fn leftovers(env: &TestEnv, c: &mut Clients) -> Result<Leftovers> {
    let deadline = Instant::now() + GONE_TIMEOUT;
    loop {
        let found = read_leftovers(env, c).await?;
        if found.is_empty() || Instant::now() >= deadline {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn read_leftovers(env: &TestEnv, c: &mut Clients) -> Result<Leftovers> {
    let sandboxes = c.list().await.into_iter().map(|s| s.sandbox_id).collect();
    let snapshots = c
        .list_snapshots()
        .await
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    let leaks = env.leaks().await;
    let containerd = if leaks.is_empty() {
        Vec::new()
    } else {
        leaks.to_string().lines().map(str::to_owned).collect()
    };
    let data = env.sandboxd.data_dir();
    let mut files = Vec::new();
    for dir in ["exec", "sandboxes"] {
        files.extend(dir_entries(&data.join(dir)));
    }
    Ok(Leftovers {
        sandboxes,
        snapshots,
        containerd,
        files,
        shims: env.containerd.shim_pids().len(),
    })
}

/// The entries of `dir` (none when it does not exist).
fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

// ---- diagnosis of a hang ----

/// What is needed to describe a sandbox whose call hangs.
struct Diagnostics {
    /// The cgroup parent's path, as `--cgroup-parent` has it.
    cgroup_parent: String,
    sandboxd_log: PathBuf,
    exec_dir: PathBuf,
}

impl Diagnostics {
    fn of(env: &TestEnv) -> Diagnostics {
        Diagnostics {
            cgroup_parent: env.cgroup.path().trim_start_matches('/').to_owned(),
            sandboxd_log: env.sandboxd.log_path(),
            exec_dir: env.sandboxd.data_dir().join("exec"),
        }
    }

    /// Sandbox `id`'s freezer state and processes (state, wait channel, stdio), its shim, the
    /// exec FIFO dirs, and sandboxd's last log lines naming it.
    fn describe(&self, id: &str) -> String {
        let mut out = String::new();
        let cgroup = |controller: &str| {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&self.cgroup_parent)
                .join(id)
        };
        let freezer = std::fs::read_to_string(cgroup("freezer").join("freezer.state"))
            .unwrap_or_else(|e| format!("unreadable ({e})"));
        out.push_str(&format!("  freezer.state: {}\n", freezer.trim()));
        let procs = ["pids", "memory", "freezer", ""]
            .iter()
            .find_map(|c| std::fs::read_to_string(cgroup(c).join("cgroup.procs")).ok())
            .unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            out.push_str(&format!("  {}\n", describe_process(pid)));
        }
        for p in common::host::processes() {
            let is_shim = p
                .cmdline
                .first()
                .is_some_and(|a| a.contains("containerd-shim"));
            if is_shim && p.cmdline.iter().any(|a| a == id) {
                out.push_str(&format!("  shim {}\n", describe_process(p.pid as u32)));
            }
        }
        out.push_str(&format!("  exec dirs: {:?}\n", dir_entries(&self.exec_dir)));
        let log = std::fs::read_to_string(&self.sandboxd_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        out.push_str(&format!(
            "  sandboxd's last {} of {} log lines naming it:\n",
            lines.len().min(DIAGNOSIS_LOG_LINES),
            lines.len()
        ));
        for line in &lines[lines.len().saturating_sub(DIAGNOSIS_LOG_LINES)..] {
            out.push_str(&format!("    {}\n", strip_ansi(line)));
        }
        out
    }
}

/// `pid comm state wchan [fd 0, 1, 2 targets] cmdline`, from /proc.
fn describe_process(pid: u32) -> String {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    // The state follows the parenthesised comm, which may itself hold spaces.
    let stat = read("stat");
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    let fds: Vec<String> = (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map_or("-".to_owned(), |t| t.display().to_string())
        })
        .collect();
    format!(
        "{pid} {} state {state} wchan {} fds {:?} cmd {:?}",
        read("comm").trim(),
        read("wchan").trim(),
        fds,
        read("cmdline").replace('\0', " ").trim()
    )
}

/// `line` without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
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

/// Copies sandboxd's and containerd's logs below cargo's target directory and says where.
fn keep_logs(env: &TestEnv) -> Result<()> {
    let dir = support::target_dir().join(LOGS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for (from, name) in [
        (env.sandboxd.log_path(), "sandboxd.log"),
        (env.containerd.log_path(), "containerd.log"),
    ] {
        let to = dir.join(name);
        std::fs::copy(&from, &to)
            .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    }
    eprintln!("logs kept in {}", dir.display());
    Ok(())
}

// ---- report ----

/// Reads one figure of a sample.
type Pick = fn(&Figures) -> u64;

/// One call's figures.
#[derive(Debug, Clone, Serialize)]
struct OpRow {
    call: String,
    ok: usize,
    errors: usize,
    latency: Option<Summary>,
    max_ms: f64,
}

/// One resource's verdict.
#[derive(Debug, Clone, Serialize)]
struct FlatRow {
    figure: String,
    warm: u64,
    end: u64,
    limit: u64,
    flat: bool,
}

/// Everything the run found, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: MachineFacts,
    load_average_1min: LoadAverages,
    settings: Settings,
    image: String,
    ran_s: f64,
    sessions: usize,
    ops: Vec<OpRow>,
    caller_statuses: BTreeMap<String, usize>,
    caller_examples: Vec<String>,
    unprovoked_caller_statuses: Vec<Failure>,
    failures: Vec<Failure>,
    resources: Resources,
    flatness: Vec<FlatRow>,
    leftovers: Leftovers,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        machine: MachineFacts,
        load: LoadAverages,
        settings: Settings,
        image: &str,
        ran: Duration,
        shared: &Shared,
        resources: Resources,
        leftovers: Leftovers,
    ) -> Report {
        let stats = shared.stats();
        let ops = stats
            .ops
            .iter()
            .map(|(call, s)| OpRow {
                call: (*call).to_owned(),
                ok: s.latencies.len(),
                errors: s.errors,
                latency: Summary::of(&s.latencies),
                max_ms: s
                    .latencies
                    .iter()
                    .max()
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3),
            })
            .collect();
        let flatness = match (&resources.warm, &resources.end) {
            (Some(warm), Some(end)) => flatness(warm, end),
            _ => Vec::new(),
        };
        Report {
            machine,
            load_average_1min: load,
            settings,
            image: image.to_owned(),
            ran_s: ran.as_secs_f64(),
            sessions: stats.sessions,
            ops,
            caller_statuses: stats.caller.clone(),
            caller_examples: stats.caller_examples.clone(),
            unprovoked_caller_statuses: stats.unprovoked.clone(),
            failures: stats.failures.clone(),
            resources,
            flatness,
            leftovers,
        }
    }

    fn render(&self) -> String {
        let mut out = format!(
            "soak: {} clients, {:.0} s of load ({} sessions)\n\n",
            self.settings.clients, self.ran_s, self.sessions
        );
        let header = format!(
            "{:<36} {:>8} {:>7} {:>9} {:>9} {:>9}\n",
            "call", "ok", "errors", "p50 ms", "p99 ms", "max ms"
        );
        out.push_str(&header);
        out.push_str(&"-".repeat(header.chars().count() - 1));
        out.push('\n');
        for row in &self.ops {
            let (p50, p99) = row.latency.map_or((0.0, 0.0), |s| (s.p50_ms, s.p99_ms));
            out.push_str(&format!(
                "{:<36} {:>8} {:>7} {:>9.1} {:>9.1} {:>9.1}\n",
                row.call, row.ok, row.errors, p50, p99, row.max_ms
            ));
        }
        out.push_str(
            "(errors of a deliberate misuse count as ok when its code is the one meant)\n\n",
        );

        let caller: usize = self.caller_statuses.values().sum();
        out.push_str(&format!(
            "caller's errors: {caller} ({})\n",
            self.caller_statuses
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !self.unprovoked_caller_statuses.is_empty() {
            out.push_str(&format!(
                "  of which unprovoked (outside the deliberate misuses): {}\n",
                self.unprovoked_caller_statuses.len()
            ));
            for f in &self.unprovoked_caller_statuses {
                out.push_str(&format!("    {}\n", f.render()));
            }
        }
        out.push_str(&format!(
            "errors that are not the caller's: {}\n",
            self.failures.len()
        ));
        for f in &self.failures {
            out.push_str(&format!("  {}\n", f.render()));
        }
        out.push('\n');

        out.push_str(&self.render_resources());
        out.push('\n');
        out.push_str(&self.leftovers.render());
        out.push_str(&self.load_average_1min.render());
        out
    }

    fn render_resources(&self) -> String {
        let r = &self.resources;
        let mut out = format!(
            "{:<24} {:>10} {:>10} {:>10} {:>10}\n",
            "resource", "before", "warm-up", "peak", "end"
        );
        let rule = "-".repeat(out.chars().count() - 1);
        out.push_str(&rule);
        out.push('\n');
        let cell = |f: &Option<Figures>, get: Pick| {
            f.as_ref().map_or("-".to_owned(), |f| get(f).to_string())
        };
        let rows: [(&str, Pick); 7] = [
            ("sandboxd RSS (KiB)", |f| f.sandboxd.rss_kib),
            ("sandboxd open fds", |f| f.sandboxd.fds),
            ("sandboxd threads", |f| f.sandboxd.threads),
            ("containerd RSS (KiB)", |f| f.containerd.rss_kib),
            ("containerd open fds", |f| f.containerd.fds),
            ("containerd threads", |f| f.containerd.threads),
            ("shims", |f| f.shims),
        ];
        for (name, get) in rows {
            out.push_str(&format!(
                "{:<24} {:>10} {:>10} {:>10} {:>10}\n",
                name,
                cell(&r.before, get),
                cell(&r.warm, get),
                get(&r.peak),
                cell(&r.end, get)
            ));
        }
        out.push_str(&format!(
            "flat: end ≤ warm-up × {FLAT_FACTOR} + slack ({} MiB RSS, {FD_SLACK} fds); warm-up and \
             end are taken with every client held between sessions and no shim left; threads \
             are shown, not judged (tokio's blocking threads come and go with idle time)\n",
            RSS_SLACK_KIB / 1024
        ));
        for row in &self.flatness {
            out.push_str(&format!(
                "  {:<22} warm-up {:>8} end {:>8} limit {:>8}  {}\n",
                row.figure,
                row.warm,
                row.end,
                row.limit,
                if row.flat { "flat" } else { "NOT FLAT" }
            ));
        }
        out
    }

    /// Ok only with no failure that is not the caller's, no leftovers and flat figures.
    fn verdict(&self) -> Result<()> {
        let not_flat: Vec<&str> = self
            .flatness
            .iter()
            .filter(|r| !r.flat)
            .map(|r| r.figure.as_str())
            .collect();
        let mut problems = Vec::new();
        if !self.failures.is_empty() {
            problems.push(format!(
                "{} errors that are not the caller's",
                self.failures.len()
            ));
        }
        if !self.leftovers.is_empty() {
            problems.push("resources left behind".to_owned());
        }
        if self.flatness.is_empty() {
            problems.push("no warm-up or end figure".to_owned());
        }
        if !not_flat.is_empty() {
            problems.push(format!("not flat: {}", not_flat.join(", ")));
        }
        if problems.is_empty() {
            println!("soak verdict: PASS (0 errors that are not the caller's, no leftovers, flat)");
            Ok(())
        } else {
            bail!("soak verdict: FAIL: {}", problems.join("; "))
        }
    }
}

/// The flatness rule for each of sandboxd's and containerd's figures.
fn flatness(warm: &Figures, end: &Figures) -> Vec<FlatRow> {
    let rule = |figure: &str, warm: u64, end: u64, slack: u64| {
        let limit = (warm as f64 * FLAT_FACTOR) as u64 + slack;
        FlatRow {
            figure: figure.to_owned(),
            warm,
            end,
            limit,
            flat: end <= limit,
        }
    };
    vec![
        rule(
            "sandboxd RSS (KiB)",
            warm.sandboxd.rss_kib,
            end.sandboxd.rss_kib,
            RSS_SLACK_KIB,
        ),
        rule(
            "sandboxd fds",
            warm.sandboxd.fds,
            end.sandboxd.fds,
            FD_SLACK,
        ),
        rule(
            "containerd RSS (KiB)",
            warm.containerd.rss_kib,
            end.containerd.rss_kib,
            RSS_SLACK_KIB,
        ),
        rule(
            "containerd fds",
            warm.containerd.fds,
            end.containerd.fds,
            FD_SLACK,
        ),
    ]
}
