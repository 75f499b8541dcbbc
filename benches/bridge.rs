//! BRIDGE create cost: what a BRIDGE `CreateSandbox` (→ RUNNING) takes with this build's
//! network isolation (per-sandbox iptables chain with the closed ranges, ebtables guard,
//! ingress rules), against a baseline build of sandboxd.
//!
//! The baseline is another sandboxd binary named by `BENCH_BASELINE_BIN` (for example main's,
//! built with `cargo build --release --bin sandboxd` in its own worktree); without it only this
//! build is measured. Each side runs in rounds (`BENCH_ROUNDS`, default 3) of `BENCH_N`
//! (default 20) sequential BRIDGE creates, each followed by an untimed delete, the two sides
//! taking turns round by round so that load drifts affect both. Each round starts the fixtures
//! afresh (private containerd, registry, sandboxd) inside a network namespace of its own, as
//! the network tests do, so nothing touches the host's network. One untimed create/delete
//! warms each round up.
//!
//! It prints p50/p99/mean per side and the p50 difference against the target of at most 5 ms,
//! and writes `target/bench-bridge.json`. Run it as root with `cargo bench --bench bridge`;
//! without `--bench` (as `cargo test --benches` runs it) it only prints how to run it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use common::bridge::{bridge, NetEnv};
use common::netns::run_in_netns;
use common::sandboxd::BINARY_ENV;
use support::{env_count, load_average, publish, target_dir, LoadAverages, Summary};

/// Environment variable: creates per round and side.
const ENV_N: &str = "BENCH_N";
/// Default of [`ENV_N`].
const DEFAULT_N: usize = 20;
/// Environment variable: rounds per side.
const ENV_ROUNDS: &str = "BENCH_ROUNDS";
/// Default of [`ENV_ROUNDS`].
const DEFAULT_ROUNDS: usize = 3;
/// Environment variable: the baseline sandboxd binary.
const ENV_BASELINE: &str = "BENCH_BASELINE_BIN";
/// Set in the child that measures one round: where it writes its samples (milliseconds).
const ENV_SAMPLES: &str = "BENCH_BRIDGE_SAMPLES";
/// The most the isolation may add to a BRIDGE create's p50.
const TARGET_DELTA_MS: f64 = 5.0;
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-bridge.json";
/// The name run_in_netns re-executes this binary under.
const ROUND: &str = "bridge_round";

fn main() -> Result<()> {
    if let Ok(out) = std::env::var(ENV_SAMPLES) {
        // Inside the round's namespace: measure and hand the samples back.
        run_in_netns(ROUND, || measure_round(PathBuf::from(out)));
        return Ok(());
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("bridge bench: skipped (run it as root with `cargo bench --bench bridge`)");
        return Ok(());
    }
    let n = env_count(ENV_N, DEFAULT_N)?;
    let rounds = env_count(ENV_ROUNDS, DEFAULT_ROUNDS)?;
    ensure!(
        n > 0 && rounds > 0,
        "{ENV_N} and {ENV_ROUNDS} must be above 0"
    );
    let baseline = std::env::var_os(ENV_BASELINE).map(PathBuf::from);
    let load_before = load_average()?;
    println!(
        "BRIDGE create→RUNNING: {rounds} rounds of {n} per side; baseline: {}",
        baseline
            .as_ref()
            .map_or("none".into(), |b| b.display().to_string())
    );
    let mut this_build = Vec::new();
    let mut before = Vec::new();
    for round in 0..rounds {
        if let Some(bin) = &baseline {
            before.extend(run_round(Some(bin), n, round)?);
        }
        this_build.extend(run_round(None, n, round)?);
    }
    let report = Report::new(&this_build, &before, LoadAverages::since(load_before)?);
    publish(&report.render(), &report, JSON_FILE_NAME)?;
    if let Some(delta) = report.delta_p50_ms {
        ensure!(
            delta <= TARGET_DELTA_MS,
            "BRIDGE create p50 grew by {delta:.2} ms (target: at most {TARGET_DELTA_MS} ms)"
        );
    }
    Ok(())
}

/// Runs one round in a network namespace of its own (a child process) with `binary` or this
/// build's sandboxd; returns its samples.
fn run_round(binary: Option<&PathBuf>, n: usize, round: usize) -> Result<Vec<Duration>> {
    let out = target_dir().join(format!("bench-bridge-round-{round}.txt"));
    // Single-threaded here: no runtime runs yet, so changing the environment is safe; the
    // child inherits it.
    std::env::set_var(ENV_SAMPLES, &out);
    std::env::set_var(ENV_N, n.to_string());
    match binary {
        Some(b) => std::env::set_var(BINARY_ENV, b),
        None => std::env::remove_var(BINARY_ENV),
    }
    let child_out = out.clone();
    run_in_netns(ROUND, || measure_round(child_out));
    std::env::remove_var(ENV_SAMPLES);
    std::env::remove_var(BINARY_ENV);
    let text = std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?;
    std::fs::remove_file(&out).ok();
    text.lines()
        .map(|l| {
            l.parse::<f64>()
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .with_context(|| format!("sample {l:?}"))
        })
        .collect()
}

/// One round: sandboxd with the test bridge, one warm-up, then N timed creates (each deleted
/// untimed); writes the samples to `out`, one per line in milliseconds.
async fn measure_round(out: PathBuf) {
    let n: usize = std::env::var(ENV_N).unwrap().parse().unwrap();
    let mut env = NetEnv::start(&[]).await;
    env.create("warm", bridge(), &[]).await;
    env.c.force_delete("warm").await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("b{i}");
        let started = Instant::now();
        let sb = env.create(&id, bridge(), &[]).await;
        samples.push(started.elapsed());
        assert_eq!(sb.state, sandboxd::pb::SandboxState::Running as i32);
        env.c.force_delete(&id).await;
    }
    env.assert_no_network_leftovers().await;
    let text: String = samples
        .iter()
        .map(|d| format!("{}\n", d.as_secs_f64() * 1e3))
        .collect();
    std::fs::write(&out, text).unwrap();
}

#[derive(Debug, Serialize)]
struct Report {
    this_build: Option<Summary>,
    baseline: Option<Summary>,
    delta_p50_ms: Option<f64>,
    target_delta_ms: f64,
    load_average_1min: LoadAverages,
}

impl Report {
    fn new(this_build: &[Duration], baseline: &[Duration], load: LoadAverages) -> Report {
        let (this_build, baseline) = (Summary::of(this_build), Summary::of(baseline));
        let delta_p50_ms = match (&this_build, &baseline) {
            (Some(t), Some(b)) => Some(t.p50_ms - b.p50_ms),
            _ => None,
        };
        Report {
            this_build,
            baseline,
            delta_p50_ms,
            target_delta_ms: TARGET_DELTA_MS,
            load_average_1min: load,
        }
    }

    fn render(&self) -> String {
        let row = |name: &str, s: &Option<Summary>| match s {
            Some(s) => format!(
                "{name:<34} {:>5} {:>9.2} {:>9.2} {:>9.2}\n",
                s.samples, s.p50_ms, s.p99_ms, s.mean_ms
            ),
            None => format!("{name:<34} (not measured)\n"),
        };
        let mut out = format!(
            "{:<34} {:>5} {:>9} {:>9} {:>9}\n",
            "BRIDGE create→RUNNING (ms)", "n", "p50", "p99", "mean"
        );
        out.push_str(&row("this build (isolation)", &self.this_build));
        out.push_str(&row("baseline", &self.baseline));
        if let Some(d) = self.delta_p50_ms {
            out.push_str(&format!(
                "p50 difference: {d:+.2} ms (target: at most +{TARGET_DELTA_MS} ms) {}\n",
                if d <= TARGET_DELTA_MS {
                    "met"
                } else {
                    "MISSED"
                }
            ));
        }
        out.push_str(&format!(
            "load average (1 min): {:.2} before, {:.2} after\n",
            self.load_average_1min.before, self.load_average_1min.after
        ));
        out
    }
}
