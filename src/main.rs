//! The `sandboxd` binary: the server (`serve`: parse flags, set up telemetry, serve) and its
//! command-line client (every other command, in `sandboxd::cli`).

use clap::{Parser, Subcommand};

use sandboxd::config::{Config, ServeArgs};

/// sandboxd manages isolated sandboxes on this node over containerd, through a gRPC API
/// (sandboxd.v1) with health and reflection. The same binary is the server (`serve`) and its
/// client (every other command).
#[derive(Debug, Parser)]
#[command(name = "sandboxd", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    client: sandboxd::cli::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server. Settings: flag, else environment variable, else --config TOML key,
    /// else default. Starts a private containerd under --data-dir when none answers.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Client(sandboxd::cli::Command),
}

fn main() -> std::process::ExitCode {
    // containerd's shim runs this binary as an exec's output relay (see sandbox::relay); that
    // mode takes no flags and must start fast, so it is recognised before anything else.
    let mut raw = std::env::args_os().skip(1);
    if let (Some(mode), Some(socket), None) = (raw.next(), raw.next(), raw.next()) {
        if mode == sandboxd::sandbox::RELAY_ARG {
            return sandboxd::sandbox::relay_helper_main(&socket);
        }
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Client(command) => sandboxd::cli::main(cli.client, command),
        Command::Serve(args) => {
            let config = match Config::resolve(&args, &|k| std::env::var(k).ok()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sandboxd: invalid configuration: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let security = match sandboxd::server::Security::load(&config.auth) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sandboxd: invalid configuration: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("sandboxd: cannot start the async runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                let telemetry = match sandboxd::telemetry::init(
                    config.log_format,
                    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok(),
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("sandboxd: cannot set up telemetry: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                };
                let result = sandboxd::server::serve(config, security, shutdown_signal()).await;
                telemetry.shutdown();
                match result {
                    Ok(()) => std::process::ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "sandboxd failed");
                        eprintln!("sandboxd: {e:#}");
                        std::process::ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
