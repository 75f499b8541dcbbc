//! `sandboxd stats ID`: what a sandbox uses, once or every interval (`--watch`).

use std::time::Duration;

use super::Transport;
use serde_json::{json, Value};

use super::output;
use super::parse;
use super::{Format, Result};
use crate::pb;
use crate::pb::sandbox_service_client::SandboxServiceClient;

/// `sandboxd stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sandbox's id.
    id: String,
    /// Keep printing a reading every --interval until the sandbox stops (Ctrl-C ends it).
    #[arg(short, long)]
    watch: bool,
    /// Time between readings with --watch [server default: 1s].
    #[arg(long, value_parser = parse::duration, value_name = "DURATION", requires = "watch")]
    interval: Option<Duration>,
}

/// Runs `sandboxd stats`.
pub async fn run(channel: Transport, format: Format, args: Args) -> Result<()> {
    let mut client = SandboxServiceClient::new(channel);
    if !args.watch {
        let stats = client
            .get_sandbox_stats(pb::GetSandboxStatsRequest {
                sandbox_id: args.id,
            })
            .await?
            .into_inner()
            .stats
            .unwrap_or_default();
        return print(format, &stats);
    }
    let mut stream = client
        .watch_sandbox_stats(pb::WatchSandboxStatsRequest {
            sandbox_id: args.id,
            interval: args.interval.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
        })
        .await?
        .into_inner();
    while let Some(reading) = stream.message().await? {
        print(format, &reading.stats.unwrap_or_default())?;
    }
    Ok(())
}

fn print(format: Format, s: &pb::SandboxStats) -> Result<()> {
    match format {
        Format::Json => output::json(&to_json(s)),
        Format::Table => output::emit(&format!("{}\n", details(s))),
    }
}

/// A reading as JSON, every field spelled out.
pub fn to_json(s: &pb::SandboxStats) -> Value {
    let cpu = s.cpu.unwrap_or_default();
    let m = s.memory.unwrap_or_default();
    let p = s.pids.unwrap_or_default();
    let io = s.io.unwrap_or_default();
    let n = s.network.unwrap_or_default();
    json!({
        "time": output::time_json(s.time.as_ref()),
        "cpu": {
            "usage_nanos": cpu.usage_nanos,
            "user_nanos": cpu.user_nanos,
            "system_nanos": cpu.system_nanos,
            "periods": cpu.periods,
            "throttled_periods": cpu.throttled_periods,
            "throttled_nanos": cpu.throttled_nanos,
        },
        "memory": {
            "usage_bytes": m.usage_bytes,
            "working_set_bytes": m.working_set_bytes,
            "limit_bytes": m.limit_bytes,
            "limit_hits": m.limit_hits,
            "oom_kills": m.oom_kills,
        },
        "pids": { "current": p.current, "limit": p.limit },
        "io": {
            "read_bytes": io.read_bytes,
            "write_bytes": io.write_bytes,
            "read_ops": io.read_ops,
            "write_ops": io.write_ops,
        },
        "network": {
            "rx_bytes": n.rx_bytes,
            "rx_packets": n.rx_packets,
            "rx_errors": n.rx_errors,
            "rx_dropped": n.rx_dropped,
            "tx_bytes": n.tx_bytes,
            "tx_packets": n.tx_packets,
            "tx_errors": n.tx_errors,
            "tx_dropped": n.tx_dropped,
        },
        "writable_layer_bytes": s.writable_layer_bytes,
    })
}

fn details(s: &pb::SandboxStats) -> String {
    let cpu = s.cpu.unwrap_or_default();
    let m = s.memory.unwrap_or_default();
    let p = s.pids.unwrap_or_default();
    let io = s.io.unwrap_or_default();
    let n = s.network.unwrap_or_default();
    let size = |b: u64| output::size(i64::try_from(b).unwrap_or(i64::MAX));
    let secs = |ns: u64| format!("{:.3}s", ns as f64 / 1e9);
    output::fields(&[
        ("Time", output::time_text(s.time.as_ref())),
        (
            "CPU",
            format!(
                "{} (user {}, system {}), throttled {} in {} of {} periods",
                secs(cpu.usage_nanos),
                secs(cpu.user_nanos),
                secs(cpu.system_nanos),
                secs(cpu.throttled_nanos),
                cpu.throttled_periods,
                cpu.periods
            ),
        ),
        (
            "Memory",
            format!(
                "{} (working set {}) of {}, limit hit {} times, {} OOM kills",
                size(m.usage_bytes),
                size(m.working_set_bytes),
                m.limit_bytes.map_or("no limit".into(), size),
                m.limit_hits,
                m.oom_kills
            ),
        ),
        (
            "PIDs",
            format!(
                "{} of {}",
                p.current,
                p.limit.map_or("no limit".into(), |l| l.to_string())
            ),
        ),
        (
            "Block I/O",
            format!(
                "read {} in {} ops, written {} in {} ops",
                size(io.read_bytes),
                io.read_ops,
                size(io.write_bytes),
                io.write_ops
            ),
        ),
        (
            "Network",
            format!(
                "rx {} in {} packets, tx {} in {} packets",
                size(n.rx_bytes),
                n.rx_packets,
                size(n.tx_bytes),
                n.tx_packets
            ),
        ),
        (
            "Writable layer",
            size(u64::try_from(s.writable_layer_bytes).unwrap_or(0)),
        ),
    ])
}
