//! The command-line client: `sandboxd sandbox|exec|snapshot|image|cp` talk to a sandboxd server
//! over its public gRPC API, the same binary that serves it.
//!
//! Each command group lives in its own file; this module holds what they share: the global
//! options, the connection, the error type and the process exit code.

mod connect;
mod cp;
mod exec;
mod image;
mod output;
mod parse;
mod sandbox;
mod snapshot;
mod stats;
mod stdio;
mod term;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

pub use connect::{Credentials, Server, Transport};

/// The server client commands talk to when neither `--server` nor `SANDBOXD_SERVER` is set.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

/// Options shared by every client command (ignored by `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The sandboxd server of client commands: http://HOST:PORT, HOST:PORT, https://HOST:PORT
    /// (TLS) or unix:/path.sock.
    #[arg(
        long,
        global = true,
        env = "SANDBOXD_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "URL"
    )]
    pub server: String,
    /// Bearer token client commands send (`authorization: Bearer <token>`)
    #[arg(
        long,
        global = true,
        env = "SANDBOXD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate(s), PEM, that an https:// server's certificate must chain to
    /// [default: the system's trusted roots]
    #[arg(long, global = true, env = "SANDBOXD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) client commands present to an https:// server; its CN is
    /// the tenant. Needs --tls-key
    #[arg(long, global = true, env = "SANDBOXD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, global = true, env = "SANDBOXD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Output of client commands: human-readable tables, or JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// How commands print what they return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables and plain ids, for people.
    Table,
    /// One JSON document on stdout (an array for lists), for scripts.
    Json,
}

/// The client commands, next to `serve` in the binary's command list.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect, stop, start and delete sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::Command),
    /// Run a command in a running sandbox; exits with the command's exit code.
    Exec(exec::Args),
    /// Commit a sandbox's filesystem, list, restore, delete and export snapshots.
    #[command(subcommand)]
    Snapshot(snapshot::Command),
    /// Pull, list and delete images on the server's node.
    #[command(subcommand)]
    Image(image::Command),
    /// Copy one file between the local disk and a sandbox (`SANDBOX:/path` names the sandbox
    /// side; `-` is stdin or stdout).
    Cp(cp::Args),
    /// What a running sandbox uses: CPU, memory, processes, block I/O, network, disk.
    Stats(stats::Args),
}

/// What can make a client command fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status.
    #[error("{}: {}", output::code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// A local file or stream failed.
    #[error("{what}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The command line asks for something impossible (exit code 2, as clap's own errors).
    #[error("{0}")]
    Usage(String),
    /// The command cannot do what was asked, for example copy a directory.
    #[error("{0}")]
    Refused(String),
    /// The server broke the API contract (for example an Exec stream without `exited`).
    #[error("{0}")]
    Protocol(String),
}

impl Error {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The result of every client command.
pub type Result<T> = std::result::Result<T, Error>;

/// Runs one client command to completion and returns the process's exit code: the remote
/// command's for `exec`, 1 for errors (printed as `sandboxd: CODE: message`), 2 for usage errors.
pub fn main(args: ClientArgs, command: Command) -> ExitCode {
    let server: Server = match args.server.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandboxd: invalid --server {:?}: {e}", args.server);
            return ExitCode::from(2);
        }
    };
    let identity = match (args.tls_cert.clone(), args.tls_key.clone()) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            eprintln!("sandboxd: --tls-cert and --tls-key go together");
            return ExitCode::from(2);
        }
    };
    let credentials = Credentials {
        token: args.token.clone().filter(|t| !t.is_empty()),
        tls: crate::tls::ClientFiles {
            ca: args.tls_ca.clone(),
            identity,
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandboxd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(&server, &credentials, args.output, command));
    // A stdin reader may still be blocked in read(2); it must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sandboxd: {}", describe(&e, &server));
            match e {
                Error::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// One line for an error: `CODE: message` for a status, the cause chain for anything else.
fn describe(e: &Error, server: &Server) -> String {
    let Error::Status(status) = e else {
        let mut line = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            line.push_str(&format!(": {s}"));
            source = s.source();
        }
        return line;
    };
    let mut line = format!("{}: ", output::code_name(status.code()));
    // A status with a source was made on this side: the request never reached the server.
    // Its innermost cause (e.g. "Connection refused") is what the user needs.
    let mut cause = std::error::Error::source(status);
    if cause.is_some() {
        line.push_str(&format!("cannot connect to {server}: "));
    }
    line.push_str(status.message());
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    if let Some(inner) = innermost.filter(|i| !status.message().contains(i.as_str())) {
        line.push_str(&format!(": {inner}"));
    }
    line
}

async fn run(
    server: &Server,
    credentials: &Credentials,
    format: Format,
    command: Command,
) -> Result<u8> {
    let channel = server.channel(credentials).map_err(Error::Usage)?;
    match command {
        Command::Sandbox(c) => sandbox::run(channel, format, c).await.map(|()| 0),
        Command::Exec(a) => exec::run(channel, a).await,
        Command::Snapshot(c) => snapshot::run(channel, format, c).await.map(|()| 0),
        Command::Image(c) => image::run(channel, format, c).await.map(|()| 0),
        Command::Cp(a) => cp::run(channel, a).await.map(|()| 0),
        Command::Stats(a) => stats::run(channel, format, a).await.map(|()| 0),
    }
}
