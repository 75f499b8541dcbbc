//! Image pull throughput: sandboxd's PullImage against `ctr images pull`, same image, same
//! registry, same containerd, same run.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry and the
//! sandboxd binary), pushes an image of 5 layers (busybox plus 4 layers of incompressible data,
//! about 50 MB compressed in all) and then, `BENCH_ROUNDS` times (default 5), times a cold pull
//! on each side in turn: sandboxd's `PullImage` to its last message (fetched, verified and
//! unpacked), and `ctr images pull --plain-http` (fetch and unpack) in a namespace of its own.
//! After each pull the side deletes the image with a synchronous garbage collection, so every
//! pull fetches and unpacks everything again, and the other side never finds a blob left over.
//!
//! It prints p50, min and mean in ms with the sandboxd/ctr ratio (target: ≤ 1.0, at least as
//! fast as ctr), writes them to `target/bench-pull.json`, and checks nothing was left behind.
//!
//! Run it as root with `cargo bench --bench pull`; it needs the packages of
//! `scripts/install-deps.sh`. Run without `--bench` it only prints how to run it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sandboxd::pb;
use sandboxd::pb::image_service_client::ImageServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use common::TestEnv;
use support::ctr::{check_no_leftovers, CtrSide};
use support::{announce, bench_main, env_count, publish, status_error, verdict, LoadAverages};

/// Environment variable: how many cold pulls each side makes.
const ENV_ROUNDS: &str = "BENCH_ROUNDS";
/// Default of [`ENV_ROUNDS`].
const DEFAULT_ROUNDS: usize = 5;
/// Layers beside busybox's, each this many bytes of incompressible data.
const EXTRA_LAYERS: usize = 4;
const EXTRA_LAYER_BYTES: usize = 12 << 20;
/// The goal: sandboxd's pull at most this fraction of ctr's (compared on p50).
const TARGET_RATIO: f64 = 1.0;
/// Where the JSON results go, below cargo's target directory.
const JSON_FILE_NAME: &str = "bench-pull.json";

fn main() -> Result<()> {
    bench_main("pull", || env_count(ENV_ROUNDS, DEFAULT_ROUNDS), run)
}

async fn run(rounds: usize) -> Result<()> {
    ensure!(rounds > 0, "{ENV_ROUNDS}=0: nothing to measure");
    let env = TestEnv::new().await;
    let cache = tempfile::Builder::new()
        .prefix("bench-pull-layers-")
        .tempdir()
        .context("create the layout dir")?;
    let data: Vec<Vec<u8>> = (0..EXTRA_LAYERS)
        .map(|i| incompressible(EXTRA_LAYER_BYTES, i as u64 + 1))
        .collect();
    let files: Vec<Vec<(String, &[u8])>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| vec![(format!("/data/layer-{i}"), d.as_slice())])
        .collect();
    let borrowed: Vec<Vec<(&str, &[u8])>> = files
        .iter()
        .map(|layer| layer.iter().map(|(p, d)| (p.as_str(), *d)).collect())
        .collect();
    let layers: Vec<&[(&str, &[u8])]> = borrowed.iter().map(Vec::as_slice).collect();
    let layout = common::build_layout_layers(cache.path(), &layers);
    let image = env.push_image(&layout, "bench/five-layers:1");
    let compressed: u64 = common::LayoutInfo::read(&layout)
        .layer_digests
        .iter()
        .map(|d| {
            let path = layout
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap_or(d));
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        })
        .sum();
    let settings = format!(
        "image: {image}, {} layers, {:.1} MB compressed; {rounds} cold pulls per side",
        EXTRA_LAYERS + 1,
        compressed as f64 / 1e6
    );
    let (machine, load_before) = announce(&env.containerd, &settings).await?;

    let channel = env.channel().await;
    let ctr = CtrSide::new(&env.containerd, &image)?;
    let mut sandboxd_ms = Vec::new();
    let mut ctr_ms = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first, so neither always meets a warmer page cache.
        let sides: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for sandboxd_side in sides {
            if sandboxd_side {
                let took = pull_sandboxd(&channel, &image).await?;
                sandboxd_ms.push(ms(took));
                delete_sandboxd(&channel, &image).await?;
            } else {
                let start = Instant::now();
                ctr.pull().await?;
                ctr_ms.push(ms(start.elapsed()));
                ctr.ctr(&["images", "rm", "--sync", &image]).await?;
            }
        }
    }
    let load = LoadAverages::since(load_before)?;
    let report = Report {
        machine: machine.render(),
        load: load.render(),
        image,
        layers: EXTRA_LAYERS + 1,
        compressed_bytes: compressed,
        sandboxd: Stats::of(&sandboxd_ms),
        ctr: Stats::of(&ctr_ms),
        target_ratio: TARGET_RATIO,
    };
    publish(&report.render(), &report, JSON_FILE_NAME)?;
    check_no_leftovers(&env, &ctr).await
}

/// `len` bytes no compressor shrinks (xorshift64*), different per `seed`.
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One timed PullImage, to its last message.
async fn pull_sandboxd(channel: &Channel, image: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = ImageServiceClient::new(channel.clone())
        .pull_image(pb::PullImageRequest {
            image: image.to_owned(),
        })
        .await
        .map_err(|s| status_error("PullImage", image, &s))?
        .into_inner();
    let mut done = false;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| status_error("PullImage stream", image, &s))?
    {
        done |= msg.image.is_some();
    }
    ensure!(done, "PullImage {image} ended without the image");
    Ok(start.elapsed())
}

/// DeleteImage; sandboxd's delete collects garbage synchronously.
async fn delete_sandboxd(channel: &Channel, image: &str) -> Result<()> {
    ImageServiceClient::new(channel.clone())
        .delete_image(pb::DeleteImageRequest {
            image: image.to_owned(),
        })
        .await
        .map_err(|s| status_error("DeleteImage", image, &s))?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct Stats {
    p50_ms: f64,
    min_ms: f64,
    mean_ms: f64,
    samples_ms: Vec<f64>,
}

impl Stats {
    fn of(samples: &[f64]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Stats {
            p50_ms: support::nearest_rank(&sorted, 0.5),
            min_ms: sorted[0],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            samples_ms: samples.to_vec(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    load: String,
    image: String,
    layers: usize,
    compressed_bytes: u64,
    sandboxd: Stats,
    ctr: Stats,
    target_ratio: f64,
}

impl Report {
    fn render(&self) -> String {
        let ratio = self.sandboxd.p50_ms / self.ctr.p50_ms;
        let row = |name: &str, s: &Stats| {
            format!(
                "{name:<28} {:>9.0} {:>9.0} {:>9.0} {:>9.1}\n",
                s.p50_ms,
                s.min_ms,
                s.mean_ms,
                self.compressed_bytes as f64 / 1e6 / (s.p50_ms / 1000.0)
            )
        };
        format!(
            "cold pull of {} layers, {:.1} MB ({})\n\
             {:<28} {:>9} {:>9} {:>9} {:>9}\n{}{}\
             sandboxd/ctr (p50): {ratio:.2} (target ≤ {:.1}: {})\n{}\n",
            self.layers,
            self.compressed_bytes as f64 / 1e6,
            self.image,
            "side",
            "p50 ms",
            "min ms",
            "mean ms",
            "MB/s",
            row("sandboxd PullImage", &self.sandboxd),
            row("ctr images pull", &self.ctr),
            self.target_ratio,
            verdict(ratio <= self.target_ratio),
            self.load,
        )
    }
}
