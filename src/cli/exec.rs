//! `sandboxd exec [-i] [-t] SANDBOX -- CMD...` over the bidirectional Exec stream.
//!
//! The main task only reads the server's messages and writes them to stdout/stderr; stdin,
//! window-size changes and signals reach the server through their own tasks, so a command that
//! stops reading its input can never block its output (or the other way round).

use std::io::IsTerminal;
use std::time::Duration;

use super::Transport;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::{parse, stdio, term};
use super::{Error, Result};
use crate::pb;
use crate::pb::exec_request::Request;
use crate::pb::exec_response::Response;
use crate::pb::sandbox_service_client::SandboxServiceClient;

/// Client messages (stdin chunks, resizes, signals) queued toward the server.
const REQUEST_QUEUE: usize = 16;
/// stdin chunks queued between the thread reading stdin and the stream.
const STDIN_QUEUE: usize = 4;
/// The most bytes one `stdin` message carries.
const STDIN_CHUNK: usize = 32 * 1024;
/// Local signals passed on to the remote command instead of ending the client.
const FORWARDED_SIGNALS: [(fn() -> SignalKind, i32); 3] = [
    (SignalKind::interrupt, libc::SIGINT),
    (SignalKind::terminate, libc::SIGTERM),
    (SignalKind::hangup, libc::SIGHUP),
];

/// Arguments of `exec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Send stdin to the command (EOF on stdin closes the command's stdin).
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal: the local terminal goes into raw mode and its size
    /// follows the local window.
    #[arg(short, long)]
    tty: bool,
    /// An environment variable (repeatable).
    #[arg(short, long = "env", value_parser = parse::key_value, value_name = "K=V")]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: name, uid or uid:gid.
    #[arg(short, long)]
    user: Option<String>,
    /// Kill the command after this long, e.g. 30s or 5m.
    #[arg(long, value_parser = parse::duration, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// The sandbox to run in.
    sandbox: String,
    /// The command and its arguments (put `--` before it when it has options of its own).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Aborts the helper tasks when the exec ends, however it ends.
struct Helpers(Vec<JoinHandle<()>>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the command and returns its exit code (128 + N when signal N killed it).
pub async fn run(channel: Transport, args: Args) -> Result<u8> {
    let raw_wanted = args.tty && std::io::stdin().is_terminal();
    // Registered before the size is read, so a resize in between is not lost.
    let winch = if args.tty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut env = parse::to_map(args.env);
    if args.tty {
        // Like `docker exec -t`: the remote terminal is driven by the local one, so programs
        // inside should speak its TERM.
        if let Ok(term) = std::env::var("TERM") {
            env.entry("TERM".into()).or_insert(term);
        }
    }
    let start = pb::ExecStart {
        sandbox_id: args.sandbox,
        args: args.command,
        env,
        working_dir: args.workdir.unwrap_or_default(),
        user: args.user.unwrap_or_default(),
        tty: args.tty,
        stdin: args.interactive,
        timeout: args.timeout.map(parse::proto_duration),
        tty_size: args.tty.then(term::size).flatten().map(tty_size),
    };
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    tx.try_send(message(Request::Start(start)))
        .expect("an empty queue has room for the first message");
    let mut client = SandboxServiceClient::new(channel);
    let mut responses = client.exec(ReceiverStream::new(rx)).await?.into_inner();

    let mut helpers = Helpers(Vec::new());
    let mut winch = winch;
    // Declared after `helpers`, so the terminal is restored before helpers are aborted.
    let mut raw_mode = None;
    let mut exited = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(msg) = responses.message().await? {
        match msg.response {
            Some(Response::Started(_)) => {
                if raw_wanted {
                    raw_mode = Some(
                        term::RawMode::enable()
                            .map_err(Error::io("put the terminal into raw mode"))?,
                    );
                }
                if args.interactive {
                    helpers.0.push(tokio::spawn(forward_stdin(tx.clone())));
                }
                if let Some(winch) = winch.take() {
                    helpers
                        .0
                        .push(tokio::spawn(forward_resizes(winch, tx.clone())));
                }
                for (kind, number) in FORWARDED_SIGNALS {
                    if let Ok(sig) = signal(kind()) {
                        helpers
                            .0
                            .push(tokio::spawn(forward_signal(sig, number, tx.clone())));
                    }
                }
            }
            Some(Response::Stdout(data)) => stdio::write(&mut stdout, &data, "stdout")?,
            Some(Response::Stderr(data)) => stdio::write(&mut stderr, &data, "stderr")?,
            Some(Response::Exited(e)) => exited = Some(e),
            None => {}
        }
    }
    drop(raw_mode);
    let exited = exited.ok_or_else(|| {
        Error::Protocol("the exec stream ended without the command's exit status".into())
    })?;
    if exited.timed_out {
        eprintln!("sandboxd: the command was killed: its --timeout expired");
    }
    if exited.oom_killed {
        eprintln!("sandboxd: the command was killed by the OOM killer (sandbox memory limit)");
    }
    Ok(exit_code(&exited))
}

/// The process exit code for a remote exit: its code, or 128 + the signal that killed it.
fn exit_code(e: &pb::ExecExited) -> u8 {
    let code = if e.exit_code == 0 && e.signal != 0 {
        128 + e.signal
    } else {
        e.exit_code
    };
    u8::try_from(code).unwrap_or(u8::MAX)
}

fn message(r: Request) -> pb::ExecRequest {
    pb::ExecRequest { request: Some(r) }
}

fn tty_size((rows, cols): (u16, u16)) -> pb::TtySize {
    pb::TtySize {
        rows: rows.into(),
        cols: cols.into(),
    }
}

/// Sends stdin in chunks as it arrives, then `close_stdin` at EOF (or when stdin fails).
async fn forward_stdin(tx: mpsc::Sender<pb::ExecRequest>) {
    if let Ok(mut chunks) = stdio::read_chunks(std::io::stdin(), STDIN_CHUNK, STDIN_QUEUE) {
        while let Some(Ok(chunk)) = chunks.recv().await {
            if tx.send(message(Request::Stdin(chunk))).await.is_err() {
                return;
            }
        }
    }
    let _ = tx
        .send(message(Request::CloseStdin(pb::CloseStdin {})))
        .await;
}

/// Sends the local window size on every SIGWINCH.
async fn forward_resizes(mut winch: Signal, tx: mpsc::Sender<pb::ExecRequest>) {
    while winch.recv().await.is_some() {
        if let Some(size) = term::size() {
            if tx
                .send(message(Request::Resize(tty_size(size))))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Passes a local signal on to the remote command.
async fn forward_signal(mut sig: Signal, number: i32, tx: mpsc::Sender<pb::ExecRequest>) {
    while sig.recv().await.is_some() {
        if tx.send(message(Request::Signal(number))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_pass_through_and_signals_become_128_plus() {
        let exited = |exit_code, signal| pb::ExecExited {
            exit_code,
            signal,
            ..Default::default()
        };
        assert_eq!(exit_code(&exited(0, 0)), 0);
        assert_eq!(exit_code(&exited(3, 0)), 3);
        assert_eq!(exit_code(&exited(137, 9)), 137);
        assert_eq!(exit_code(&exited(0, 15)), 143);
        assert_eq!(exit_code(&exited(300, 0)), 255);
    }
}
