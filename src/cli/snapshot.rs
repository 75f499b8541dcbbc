//! `sandboxd snapshot commit|ls|get|restore|rm|export`.

use super::Transport;
use clap::Subcommand;
use serde_json::{json, Value};

use super::output::{self, Table};
use super::{parse, sandbox};
use super::{Format, Result};
use crate::pb;
use crate::pb::snapshot_service_client::SnapshotServiceClient;

/// Snapshots asked for per ListSnapshots page by default; `ls` follows every page.
const LIST_PAGE_SIZE: i32 = 500;

/// The `snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture a sandbox's filesystem (a running one keeps running); prints the snapshot id.
    Commit {
        /// The sandbox to capture.
        sandbox: String,
        /// A label (repeatable).
        #[arg(short, long = "label", value_parser = parse::key_value, value_name = "K=V")]
        labels: Vec<(String, String)>,
    },
    /// List snapshots.
    #[command(visible_alias = "list")]
    Ls {
        /// Only snapshots taken from this sandbox.
        #[arg(long, value_name = "SANDBOX_ID")]
        sandbox: Option<String>,
        /// Only snapshots with all these labels: k=v[,k2=v2].
        #[arg(short = 'l', long, value_name = "K=V,...")]
        selector: Option<String>,
        /// Entries asked for per page (all pages are listed either way).
        #[arg(long, hide = true, default_value_t = LIST_PAGE_SIZE)]
        page_size: i32,
    },
    /// Show one snapshot.
    #[command(visible_alias = "inspect")]
    Get {
        /// The snapshot's id.
        snapshot: String,
    },
    /// Reset a sandbox's filesystem to a snapshot and restart it; prints the sandbox id.
    Restore {
        /// The sandbox to reset.
        sandbox: String,
        /// The snapshot to reset it to.
        snapshot: String,
    },
    /// Delete a snapshot nothing builds on any more; prints its id.
    #[command(visible_alias = "delete")]
    Rm {
        /// The snapshot's id.
        snapshot: String,
    },
    /// Push a snapshot to a registry as an OCI image; prints the pushed digest.
    Export {
        /// The snapshot's id.
        snapshot: String,
        /// The target reference, e.g. registry.example:5000/team/app:v1.
        image: String,
    },
}

/// Runs one `snapshot` subcommand.
pub async fn run(channel: Transport, format: Format, command: Command) -> Result<()> {
    let mut client = SnapshotServiceClient::new(channel);
    match command {
        Command::Commit { sandbox, labels } => {
            let snapshot = client
                .commit_snapshot(pb::CommitSnapshotRequest {
                    request_id: String::new(),
                    sandbox_id: sandbox,
                    labels: parse::to_map(labels),
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            match format {
                Format::Json => output::json(&json(&snapshot)),
                Format::Table => output::line(&snapshot.snapshot_id),
            }
        }
        Command::Ls {
            sandbox,
            selector,
            page_size,
        } => {
            let sandbox_id = sandbox.unwrap_or_default();
            let label_selector = selector.unwrap_or_default();
            let mut snapshots = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_snapshots(pb::ListSnapshotsRequest {
                        sandbox_id: sandbox_id.clone(),
                        label_selector: label_selector.clone(),
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                snapshots.extend(page.snapshots);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            match format {
                Format::Json => output::json(&Value::Array(snapshots.iter().map(json).collect())),
                Format::Table => {
                    let mut table = Table::new(&[
                        "SNAPSHOT ID",
                        "SANDBOX",
                        "PARENT",
                        "SIZE",
                        "CREATED",
                        "LABELS",
                    ]);
                    for s in &snapshots {
                        table.row(vec![
                            s.snapshot_id.clone(),
                            dash(&s.sandbox_id),
                            dash(&s.parent_snapshot_id),
                            output::size(s.size_bytes),
                            output::relative(s.created_at.as_ref()),
                            output::labels_text(&s.labels),
                        ]);
                    }
                    table.print()
                }
            }
        }
        Command::Get { snapshot } => {
            let s = client
                .get_snapshot(pb::GetSnapshotRequest {
                    snapshot_id: snapshot,
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            match format {
                Format::Json => output::json(&json(&s)),
                Format::Table => output::emit(&output::fields(&[
                    ("Snapshot ID", s.snapshot_id.clone()),
                    ("Sandbox", dash(&s.sandbox_id)),
                    ("Parent", dash(&s.parent_snapshot_id)),
                    ("Image", s.image.clone()),
                    ("Size", output::size(s.size_bytes)),
                    ("Created", output::time_text(s.created_at.as_ref())),
                    ("Labels", output::labels_text(&s.labels)),
                ])),
            }
        }
        Command::Restore { sandbox, snapshot } => {
            let restored = client
                .restore_sandbox(pb::RestoreSandboxRequest {
                    request_id: String::new(),
                    sandbox_id: sandbox,
                    snapshot_id: snapshot,
                })
                .await?
                .into_inner()
                .sandbox;
            sandbox::print_sandbox_id(format, restored)
        }
        Command::Rm { snapshot } => {
            client
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: snapshot.clone(),
                })
                .await?;
            match format {
                Format::Json => output::json(&json!({ "snapshot_id": snapshot, "deleted": true })),
                Format::Table => output::line(&snapshot),
            }
        }
        Command::Export { snapshot, image } => {
            let exported = client
                .export_snapshot(pb::ExportSnapshotRequest {
                    request_id: String::new(),
                    snapshot_id: snapshot,
                    image,
                })
                .await?
                .into_inner();
            match format {
                Format::Json => output::json(&json!({
                    "image": exported.image,
                    "digest": exported.digest,
                })),
                Format::Table => output::line(&exported.digest),
            }
        }
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// A snapshot as JSON: the proto's field names and RFC 3339 times.
fn json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "sandbox_id": s.sandbox_id,
        "parent_snapshot_id": s.parent_snapshot_id,
        "image": s.image,
        "size_bytes": s.size_bytes,
        "created_at": output::time_json(s.created_at.as_ref()),
        "labels": s.labels,
    })
}
