//! `sandboxd events` and `sandboxd watch-files`: changes printed as they happen, one line
//! each (with `-o json`, one JSON object per line), until Ctrl-C or the server ends the stream.

use serde_json::{json, Value};

use super::output;
use super::{Format, Result, Transport};
use crate::pb;
use crate::pb::file_service_client::FileServiceClient;
use crate::pb::sandbox_service_client::SandboxServiceClient;

/// `sandboxd events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only sandboxes whose labels match: k=v,k2=v2 (all must match).
    #[arg(short = 'l', long, value_name = "SELECTOR", default_value = "")]
    selector: String,
    /// Replay the events after this revision first (the last one seen by an earlier run).
    #[arg(long, value_name = "REVISION", default_value_t = 0)]
    resume_after: i64,
}

/// `sandboxd watch-files`.
#[derive(Debug, clap::Args)]
pub struct WatchFilesArgs {
    /// The sandbox's id (a running one).
    id: String,
    /// The directory (or file) inside the sandbox to watch.
    path: String,
    /// Watch the whole tree under PATH.
    #[arg(short, long)]
    recursive: bool,
}

/// Runs `sandboxd events`.
pub async fn events(channel: Transport, format: Format, args: EventsArgs) -> Result<()> {
    let mut client = SandboxServiceClient::new(channel);
    let mut stream = client
        .watch_sandboxes(pb::WatchSandboxesRequest {
            label_selector: args.selector,
            resume_after: args.resume_after,
        })
        .await?
        .into_inner();
    while let Some(e) = stream.message().await? {
        match format {
            Format::Json => output::line(&event_json(&e).to_string())?,
            Format::Table => output::line(&event_text(&e))?,
        }
    }
    Ok(())
}

/// Runs `sandboxd watch-files`.
pub async fn watch_files(channel: Transport, format: Format, args: WatchFilesArgs) -> Result<()> {
    let mut client = FileServiceClient::new(channel);
    let mut stream = client
        .watch_files(pb::WatchFilesRequest {
            sandbox_id: args.id,
            path: args.path,
            recursive: args.recursive,
        })
        .await?
        .into_inner();
    while let Some(e) = stream.message().await? {
        match format {
            Format::Json => output::line(&file_event_json(&e).to_string())?,
            Format::Table => output::line(&file_event_text(&e))?,
        }
    }
    Ok(())
}

fn event_type(t: i32) -> &'static str {
    pb::SandboxEventType::try_from(t)
        .map(|t| t.as_str_name().trim_start_matches("SANDBOX_EVENT_TYPE_"))
        .unwrap_or("UNKNOWN")
}

fn file_event_type(t: i32) -> &'static str {
    pb::FileEventType::try_from(t)
        .map(|t| t.as_str_name().trim_start_matches("FILE_EVENT_TYPE_"))
        .unwrap_or("UNKNOWN")
}

/// An event as JSON: the proto's field names, the type without its prefix, the revision as a
/// number.
pub fn event_json(e: &pb::SandboxEvent) -> Value {
    json!({
        "type": event_type(e.r#type),
        "revision": e.revision,
        "time": output::time_json(e.time.as_ref()),
        "snapshot_id": e.snapshot_id,
        "sandbox": e.sandbox.as_ref().map(super::sandbox::json),
    })
}

fn event_text(e: &pb::SandboxEvent) -> String {
    let s = e.sandbox.clone().unwrap_or_default();
    let mut line = format!(
        "{}  {}  {:<18}  {}",
        output::time_text(e.time.as_ref()),
        e.revision,
        event_type(e.r#type),
        s.sandbox_id
    );
    if e.r#type == pb::SandboxEventType::Exited as i32 {
        if let Some(status) = s.exit_status {
            line.push_str(&format!("  exit_status={status}"));
        }
        if s.oom_killed {
            line.push_str("  oom_killed");
        }
    }
    if !e.snapshot_id.is_empty() {
        line.push_str(&format!("  snapshot={}", e.snapshot_id));
    }
    line
}

fn file_event_json(e: &pb::WatchFilesResponse) -> Value {
    json!({
        "type": file_event_type(e.r#type),
        "path": e.path,
        "old_path": e.old_path,
        "is_directory": e.is_directory,
    })
}

fn file_event_text(e: &pb::WatchFilesResponse) -> String {
    let mut path = e.path.clone();
    if e.is_directory && path != "/" {
        path.push('/');
    }
    if e.old_path.is_empty() {
        format!("{:<8}  {path}", file_event_type(e.r#type))
    } else {
        format!("{:<8}  {} -> {path}", file_event_type(e.r#type), e.old_path)
    }
}
