//! `sandboxd sandbox create|ls|get|rm|stop|start|set-egress`.

use std::time::Duration;

use super::Transport;
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::output::{self, Table};
use super::parse;
use super::{Format, Result};
use crate::pb;
use crate::pb::sandbox_service_client::SandboxServiceClient;

/// Sandboxes asked for per ListSandboxes page by default; `ls` follows every page.
const LIST_PAGE_SIZE: i32 = 500;

/// The `sandbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox from an image (or a snapshot) and start it; prints its id.
    Create(Box<CreateArgs>),
    /// List sandboxes, optionally only those carrying some labels.
    #[command(visible_alias = "list")]
    Ls {
        /// Only sandboxes with all these labels: k=v[,k2=v2].
        #[arg(short = 'l', long, value_name = "K=V,...")]
        selector: Option<String>,
        /// Entries asked for per page (all pages are listed either way).
        #[arg(long, hide = true, default_value_t = LIST_PAGE_SIZE)]
        page_size: i32,
    },
    /// Show one sandbox.
    #[command(visible_alias = "inspect")]
    Get {
        /// The sandbox's id.
        id: String,
    },
    /// Delete a sandbox and everything made for it; prints its id.
    #[command(visible_alias = "delete")]
    Rm {
        /// The sandbox's id.
        id: String,
        /// Delete it even when running (its processes are killed).
        #[arg(short, long)]
        force: bool,
    },
    /// Stop a sandbox's processes; prints its id.
    Stop {
        /// The sandbox's id.
        id: String,
        /// SIGKILL every process when PID 1 outlives --timeout (else the call fails).
        #[arg(short, long)]
        force: bool,
        /// How long PID 1 gets to exit after the signal [server default: 10s].
        #[arg(long, value_parser = parse::duration, value_name = "DURATION")]
        timeout: Option<Duration>,
        /// The signal sent to PID 1, by number or name [server default: TERM].
        #[arg(short, long, value_parser = parse::signal, value_name = "SIGNAL")]
        signal: Option<i32>,
    },
    /// Start a created or stopped sandbox again; prints its id.
    Start {
        /// The sandbox's id.
        id: String,
    },
    /// Replace a BRIDGE sandbox's egress policy (a running one's at once, open connections
    /// included); prints its id. Without --deny-egress or --allow-egress: allow all.
    #[command(name = "set-egress")]
    SetEgress {
        /// The sandbox's id.
        id: String,
        /// Refuse every outbound connection.
        #[arg(long, conflicts_with = "allow_egress")]
        deny_egress: bool,
        /// Admit outbound connections to CIDR only (repeatable), optionally to some ports:
        /// 10.0.0.0/8, 192.0.2.1:443,8443/tcp. Naming an address inside a range closed by
        /// default (another sandbox, the node, 169.254.0.0/16) opens exactly that.
        #[arg(long, value_parser = parse::egress_rule, value_name = "CIDR[:PORTS][/PROTO]")]
        allow_egress: Vec<pb::EgressRule>,
    },
}

/// Arguments of `sandbox create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The image, e.g. busybox:1.36 (pulled when missing).
    #[arg(required_unless_present = "snapshot")]
    image: Option<String>,
    /// Fork the sandbox from this snapshot instead of an image.
    #[arg(long, conflicts_with = "image", value_name = "SNAPSHOT_ID")]
    snapshot: Option<String>,
    /// The sandbox's id [default: generated].
    #[arg(long)]
    id: Option<String>,
    /// A label (repeatable).
    #[arg(short, long = "label", value_parser = parse::key_value, value_name = "K=V")]
    labels: Vec<(String, String)>,
    /// An environment variable of PID 1 and every exec (repeatable).
    #[arg(short, long = "env", value_parser = parse::key_value, value_name = "K=V")]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: name, uid or uid:gid.
    #[arg(short, long)]
    user: Option<String>,
    /// Hostname [default: the id].
    #[arg(long)]
    hostname: Option<String>,
    /// CPU limit in thousandths of a CPU (500 = half a CPU).
    #[arg(long, value_name = "MILLIS", value_parser = clap::value_parser!(i64).range(0..))]
    cpu: Option<i64>,
    /// Memory limit: bytes, or with a suffix such as 256Mi or 1G.
    #[arg(long, value_parser = parse::bytes, value_name = "BYTES")]
    memory: Option<i64>,
    /// Maximum number of processes [server default: 1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
    pids: Option<i64>,
    /// Network: none (loopback only) or bridge.
    #[arg(long, value_enum, value_name = "MODE")]
    network: Option<Network>,
    /// Bridge only: refuse every outbound connection.
    #[arg(long, conflicts_with = "allow_egress")]
    deny_egress: bool,
    /// Bridge only: admit outbound connections to CIDR only (repeatable; anything not listed
    /// is refused), optionally to some ports: 10.0.0.0/8, 192.0.2.1:443,8443/tcp.
    #[arg(long, value_parser = parse::egress_rule, value_name = "CIDR[:PORTS][/PROTO]")]
    allow_egress: Vec<pb::EgressRule>,
    /// Bridge only: forward a host port to a port of the sandbox (repeatable):
    /// 8080:80, 127.0.0.1:5353:53/udp.
    #[arg(short, long, value_parser = parse::port_mapping, value_name = "[IP:]HOST:PORT[/PROTO]")]
    publish: Vec<pb::PortMapping>,
    /// Delete the sandbox this long after creation, e.g. 30s, 10m, 2h.
    #[arg(long, value_parser = parse::duration, value_name = "DURATION")]
    ttl: Option<Duration>,
    /// Create it without starting it (state CREATED).
    #[arg(long)]
    no_start: bool,
    /// PID 1's command, after `--` [default: an idle init that keeps the sandbox up].
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `--network` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Network {
    /// Loopback only.
    None,
    /// A bridge with its own IP address.
    Bridge,
}

/// Runs one `sandbox` subcommand.
pub async fn run(channel: Transport, format: Format, command: Command) -> Result<()> {
    let mut client = SandboxServiceClient::new(channel);
    match command {
        Command::Create(args) => {
            let req = create_request(*args);
            let sandbox = client.create_sandbox(req).await?.into_inner().sandbox;
            print_sandbox_id(format, sandbox)
        }
        Command::Ls {
            selector,
            page_size,
        } => {
            let label_selector = selector.unwrap_or_default();
            let mut sandboxes = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_sandboxes(pb::ListSandboxesRequest {
                        label_selector: label_selector.clone(),
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                sandboxes.extend(page.sandboxes);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            match format {
                Format::Json => output::json(&Value::Array(sandboxes.iter().map(json).collect())),
                Format::Table => {
                    let mut table =
                        Table::new(&["SANDBOX ID", "IMAGE", "STATE", "PID", "CREATED", "LABELS"]);
                    for s in &sandboxes {
                        table.row(vec![
                            s.sandbox_id.clone(),
                            source(s),
                            state_name(s.state).into(),
                            if s.pid == 0 {
                                "-".into()
                            } else {
                                s.pid.to_string()
                            },
                            output::relative(s.created_at.as_ref()),
                            output::labels_text(&s.labels),
                        ]);
                    }
                    table.print()
                }
            }
        }
        Command::SetEgress {
            id,
            deny_egress,
            allow_egress,
        } => {
            let mode = if deny_egress {
                pb::EgressMode::DenyAll
            } else if allow_egress.is_empty() {
                pb::EgressMode::AllowAll
            } else {
                pb::EgressMode::AllowList
            };
            let sandbox = client
                .update_sandbox_network(pb::UpdateSandboxNetworkRequest {
                    sandbox_id: id,
                    egress: Some(pb::EgressPolicy {
                        mode: mode as i32,
                        allow: allow_egress,
                    }),
                })
                .await?
                .into_inner()
                .sandbox;
            print_sandbox_id(format, sandbox)
        }
        Command::Get { id } => {
            let sandbox = client
                .get_sandbox(pb::GetSandboxRequest { sandbox_id: id })
                .await?
                .into_inner()
                .sandbox
                .unwrap_or_default();
            match format {
                Format::Json => output::json(&json(&sandbox)),
                Format::Table => output::emit(&details(&sandbox)),
            }
        }
        Command::Rm { id, force } => {
            client
                .delete_sandbox(pb::DeleteSandboxRequest {
                    sandbox_id: id.clone(),
                    force,
                })
                .await?;
            match format {
                Format::Json => output::json(&json!({ "sandbox_id": id, "deleted": true })),
                Format::Table => output::line(&id),
            }
        }
        Command::Stop {
            id,
            force,
            timeout,
            signal,
        } => {
            let sandbox = client
                .stop_sandbox(pb::StopSandboxRequest {
                    sandbox_id: id,
                    signal: signal.unwrap_or(0),
                    timeout: timeout.map(parse::proto_duration),
                    force,
                })
                .await?
                .into_inner()
                .sandbox;
            print_sandbox_id(format, sandbox)
        }
        Command::Start { id } => {
            let sandbox = client
                .start_sandbox(pb::StartSandboxRequest { sandbox_id: id })
                .await?
                .into_inner()
                .sandbox;
            print_sandbox_id(format, sandbox)
        }
    }
}

fn create_request(a: CreateArgs) -> pb::CreateSandboxRequest {
    let resources =
        (a.cpu.is_some() || a.memory.is_some() || a.pids.is_some()).then(|| pb::Resources {
            cpu_millis: a.cpu.unwrap_or(0),
            memory_bytes: a.memory.unwrap_or(0),
            pids_limit: a.pids.unwrap_or(0),
        });
    pb::CreateSandboxRequest {
        request_id: String::new(),
        sandbox_id: a.id.unwrap_or_default(),
        image: a.image.unwrap_or_default(),
        snapshot_id: a.snapshot.unwrap_or_default(),
        command: a.command,
        env: parse::to_map(a.env),
        working_dir: a.workdir.unwrap_or_default(),
        user: a.user.unwrap_or_default(),
        hostname: a.hostname.unwrap_or_default(),
        labels: parse::to_map(a.labels),
        resources,
        network: network_spec(a.network, a.deny_egress, a.allow_egress, a.publish),
        start: a.no_start.then_some(false),
        ttl: a.ttl.map(parse::proto_duration),
    }
}

/// The request's network; the server refuses egress or ports without `--network bridge`.
fn network_spec(
    mode: Option<Network>,
    deny_egress: bool,
    allow: Vec<pb::EgressRule>,
    ports: Vec<pb::PortMapping>,
) -> Option<pb::NetworkSpec> {
    let egress = if deny_egress {
        Some(pb::EgressMode::DenyAll)
    } else if !allow.is_empty() {
        Some(pb::EgressMode::AllowList)
    } else {
        None
    };
    if mode.is_none() && egress.is_none() && ports.is_empty() {
        return None;
    }
    Some(pb::NetworkSpec {
        mode: match mode {
            None | Some(Network::None) => pb::NetworkMode::Unspecified,
            Some(Network::Bridge) => pb::NetworkMode::Bridge,
        } as i32,
        egress: egress.map(|m| pb::EgressPolicy {
            mode: m as i32,
            allow,
        }),
        ports,
    })
}

/// Prints a returned sandbox: its id for people, the whole sandbox as JSON.
pub fn print_sandbox_id(format: Format, sandbox: Option<pb::Sandbox>) -> Result<()> {
    let sandbox = sandbox.unwrap_or_default();
    match format {
        Format::Json => output::json(&json(&sandbox)),
        Format::Table => output::line(&sandbox.sandbox_id),
    }
}

/// A sandbox's state without the enum prefix, as in `RUNNING`.
pub fn state_name(state: i32) -> &'static str {
    match pb::SandboxState::try_from(state) {
        Ok(pb::SandboxState::Unspecified) | Err(_) => "UNSPECIFIED",
        Ok(pb::SandboxState::Created) => "CREATED",
        Ok(pb::SandboxState::Running) => "RUNNING",
        Ok(pb::SandboxState::Paused) => "PAUSED",
        Ok(pb::SandboxState::Stopped) => "STOPPED",
        Ok(pb::SandboxState::Unknown) => "UNKNOWN",
    }
}

fn network_mode_name(mode: i32) -> &'static str {
    match pb::NetworkMode::try_from(mode) {
        Ok(pb::NetworkMode::Bridge) => "BRIDGE",
        Ok(pb::NetworkMode::None) | Ok(pb::NetworkMode::Unspecified) | Err(_) => "NONE",
    }
}

fn egress_mode_name(mode: i32) -> &'static str {
    match pb::EgressMode::try_from(mode) {
        Ok(pb::EgressMode::DenyAll) => "DENY_ALL",
        Ok(pb::EgressMode::AllowList) => "ALLOW_LIST",
        Ok(pb::EgressMode::AllowAll) | Ok(pb::EgressMode::Unspecified) | Err(_) => "ALLOW_ALL",
    }
}

fn protocol_name(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Tcp) => "TCP",
        Ok(pb::Protocol::Udp) => "UDP",
        Ok(pb::Protocol::Unspecified) | Err(_) => "",
    }
}

/// What a sandbox was made from, for tables: its image, plus the snapshot of a fork.
fn source(s: &pb::Sandbox) -> String {
    if s.snapshot_id.is_empty() {
        s.image.clone()
    } else {
        format!("{} (snapshot {})", s.image, s.snapshot_id)
    }
}

/// A sandbox as JSON: the proto's field names, enums without their prefix, RFC 3339 times and
/// `null` for unset optional fields.
pub fn json(s: &pb::Sandbox) -> Value {
    let resources = s.resources.unwrap_or_default();
    let network = s.network.clone().unwrap_or_default();
    json!({
        "sandbox_id": s.sandbox_id,
        "image": s.image,
        "snapshot_id": s.snapshot_id,
        "state": state_name(s.state),
        "pid": s.pid,
        "exit_status": s.exit_status,
        "oom_killed": s.oom_killed,
        "labels": s.labels,
        "resources": {
            "cpu_millis": resources.cpu_millis,
            "memory_bytes": resources.memory_bytes,
            "pids_limit": resources.pids_limit,
        },
        "network": {
            "mode": network_mode_name(network.mode),
            "ip_address": network.ip_address,
            "gateway": network.gateway,
            "egress": network.egress.as_ref().map(|e| json!({
                "mode": egress_mode_name(e.mode),
                "allow": e.allow.iter().map(|r| json!({
                    "cidr": r.cidr,
                    "ports": r.ports,
                    "protocol": protocol_name(r.protocol),
                })).collect::<Vec<_>>(),
            })),
            "ports": network.ports.iter().map(|p| json!({
                "host_port": p.host_port,
                "container_port": p.container_port,
                "protocol": protocol_name(p.protocol),
                "host_ip": p.host_ip,
            })).collect::<Vec<_>>(),
        },
        "command": s.command,
        "hostname": s.hostname,
        "created_at": output::time_json(s.created_at.as_ref()),
        "started_at": output::time_json(s.started_at.as_ref()),
        "expires_at": output::time_json(s.expires_at.as_ref()),
        "exited_at": output::time_json(s.exited_at.as_ref()),
    })
}

fn details(s: &pb::Sandbox) -> String {
    let r = s.resources.unwrap_or_default();
    let n = s.network.clone().unwrap_or_default();
    let or_dash = |v: &str| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    let limit = |v: i64, text: String| if v == 0 { "none".into() } else { text };
    let mut network = network_mode_name(n.mode).to_string();
    if !n.ip_address.is_empty() {
        network.push_str(&format!(" {} via {}", n.ip_address, n.gateway));
    }
    if let Some(e) = &n.egress {
        network.push_str(&format!(", egress {}", egress_mode_name(e.mode)));
        let rules: Vec<String> = e
            .allow
            .iter()
            .map(|r| {
                let ports: Vec<String> = r.ports.iter().map(u32::to_string).collect();
                match (ports.is_empty(), protocol_name(r.protocol)) {
                    (true, _) => r.cidr.clone(),
                    (false, "") => format!("{}:{}", r.cidr, ports.join(",")),
                    (false, p) => format!("{}:{}/{}", r.cidr, ports.join(","), p.to_lowercase()),
                }
            })
            .collect();
        if !rules.is_empty() {
            network.push_str(&format!(" {}", rules.join(" ")));
        }
    }
    for p in &n.ports {
        let ip = if p.host_ip.is_empty() {
            String::new()
        } else {
            format!("{}:", p.host_ip)
        };
        network.push_str(&format!(
            ", publishes {ip}{}->{}/{}",
            p.host_port,
            p.container_port,
            protocol_name(p.protocol).to_lowercase()
        ));
    }
    output::fields(&[
        ("Sandbox ID", s.sandbox_id.clone()),
        ("Image", s.image.clone()),
        ("Snapshot", or_dash(&s.snapshot_id)),
        ("State", state_name(s.state).into()),
        (
            "PID",
            if s.pid == 0 {
                "-".into()
            } else {
                s.pid.to_string()
            },
        ),
        (
            "Exit status",
            match s.exit_status {
                None => "-".into(),
                Some(c) if s.oom_killed => format!("{c} (OOM killed)"),
                Some(c) => c.to_string(),
            },
        ),
        ("Command", shell_words(&s.command)),
        ("Hostname", s.hostname.clone()),
        ("Labels", output::labels_text(&s.labels)),
        (
            "CPU",
            limit(r.cpu_millis, format!("{} millis", r.cpu_millis)),
        ),
        (
            "Memory",
            limit(r.memory_bytes, output::size(r.memory_bytes)),
        ),
        ("PIDs", limit(r.pids_limit, r.pids_limit.to_string())),
        ("Network", network),
        ("Created", output::time_text(s.created_at.as_ref())),
        ("Started", output::time_text(s.started_at.as_ref())),
        ("Exited", output::time_text(s.exited_at.as_ref())),
        ("Expires", output::time_text(s.expires_at.as_ref())),
    ])
}

/// An argv as one line, quoting the words a shell would split or expand.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
