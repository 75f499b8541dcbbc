//! Sandbox event latency: from a PID 1's exit to its EXITED event at a WatchSandboxes client.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, and the sandboxd binary) and opens one WatchSandboxes stream. Then, `BENCH_N`
//! (default 30) times, it creates a sandbox whose PID 1 is `sleep 0.2` (so the create has
//! answered before it exits), waits for that sandbox's EXITED event and takes the latency as
//! the time the event arrived minus the exit time containerd recorded for the task
//! (`sandbox.exited_at`, stamped by the shim when it reaped PID 1): everything between the
//! kernel's exit and the client, containerd's event service included. Both clocks are this
//! machine's. The sandbox is deleted before the next round.
//!
//! It prints p50, p99 and mean in ms against the target (p50 ≤ 50 ms) and writes the figures
//! to `target/bench-events.json`.
//!
//! Run it as root with `cargo bench --bench events`. Run without `--bench` (as `cargo test
//! --benches` does) it only prints how to run it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use sandboxd::pb;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use serde::Serialize;

use common::TestEnv;
use support::{
    announce, bench_main, create_running, delete_forced, env_count, publish, pulled_channel,
    verdict, LoadAverages, MachineFacts, Summary,
};

/// Environment variable: how many exits are measured.
const ENV_N: &str = "BENCH_N";
/// Default of [`ENV_N`].
const DEFAULT_N: usize = 30;
/// The goal: the p50 of exit → event at the watcher, in ms.
const TARGET_P50_MS: f64 = 50.0;
/// How long one EXITED event may take before the run fails.
const EVENT_WAIT: Duration = Duration::from_secs(30);
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-events.json";

fn main() -> Result<()> {
    bench_main(
        "events",
        || env_count(ENV_N, DEFAULT_N),
        |n| async move { run(n).await },
    )
}

#[derive(Serialize)]
struct Report {
    machine: MachineFacts,
    samples: usize,
    exit_to_event: Summary,
    target_p50_ms: f64,
    met: bool,
    load: LoadAverages,
}

async fn run(n: usize) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let (machine, load_before) = announce(
        &env.containerd,
        &format!("exits measured: {n} (set {ENV_N}); image {image}"),
    )
    .await?;
    let channel = pulled_channel(&env, &image).await?;
    let client = SandboxServiceClient::new(channel);
    let mut events = client
        .clone()
        .watch_sandboxes(pb::WatchSandboxesRequest::default())
        .await
        .context("WatchSandboxes")?
        .into_inner();

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("bench-exit-{i}");
        create_running(
            &client,
            pb::CreateSandboxRequest {
                sandbox_id: id.clone(),
                image: image.clone(),
                command: vec!["sleep".into(), "0.2".into()],
                ..Default::default()
            },
        )
        .await?;
        let (arrived, exited_at) = loop {
            let e = tokio::time::timeout(EVENT_WAIT, events.message())
                .await
                .with_context(|| format!("no EXITED event for {id} within {EVENT_WAIT:?}"))?
                .context("the event stream failed")?
                .context("the event stream ended")?;
            let arrived = SystemTime::now();
            let exited = e.r#type() == pb::SandboxEventType::Exited;
            let sandbox = e.sandbox.unwrap_or_default();
            if exited && sandbox.sandbox_id == id {
                break (arrived, sandbox.exited_at);
            }
        };
        let Some(at) = exited_at else {
            bail!("the EXITED event of {id} has no exited_at");
        };
        let exited = SystemTime::UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32);
        latencies.push(arrived.duration_since(exited).unwrap_or_default());
        delete_forced(&client, &id).await?;
    }

    let summary = Summary::of(&latencies).context("no samples")?;
    let met = summary.p50_ms <= TARGET_P50_MS;
    let load = LoadAverages::since(load_before)?;
    let table = format!(
        "{:<32} {:>9} {:>9} {:>9} {:>8}\n{}\n{:<32} {:>9.1} {:>9.1} {:>9.1} {:>8}\n{}\n",
        "latency (ms)",
        "p50",
        "p99",
        "mean",
        "target",
        "-".repeat(71),
        "task exit -> EXITED at watcher",
        summary.p50_ms,
        summary.p99_ms,
        summary.mean_ms,
        verdict(met),
        load.render(),
    );
    let report = Report {
        machine,
        samples: latencies.len(),
        exit_to_event: summary,
        target_p50_ms: TARGET_P50_MS,
        met,
        load,
    };
    publish(&table, &report, JSON_FILE_NAME)?;
    drop(events);
    env.leak_check().await;
    Ok(())
}
