//! Other gRPC stacks on sandboxd's unix socket, with their defaults: grpcurl `-unix` (no
//! `-authority`) and Python grpcio (`unix:` target, no `grpc.default_authority`). Both send the
//! socket's path as `:authority`, which h2 alone rejects with PROTOCOL_ERROR. And the status of
//! a request that echoes a 10,000-byte label key stays well within grpcio's metadata limits.
//!
//! Needs python3 with grpcio and grpcio-health-checking, and grpcurl (`scripts/install-deps.sh`);
//! the tests panic, never skip, when they are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{host, CgroupParent, Containerd};
use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long sandboxd may take to report SERVING.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long sandboxd gets after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one client process may run (its own calls time out after 30 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest status message sandboxd sends (`api::status::MAX_STATUS_MESSAGE`).
const MAX_STATUS_MESSAGE: usize = 1024;

/// containerd and a sandboxd serving on a unix socket in a temp dir of its own. Drop stops
/// sandboxd (SIGTERM, then SIGKILL) and removes its directory; containerd and the cgroup parent
/// clean up after themselves.
struct UnixSandboxd {
    child: Option<Child>,
    socket: PathBuf,
    dir: Option<TempDir>,
    root: PathBuf,
    _cgroup: CgroupParent,
    _containerd: Containerd,
}

impl UnixSandboxd {
    async fn start() -> UnixSandboxd {
        let containerd = Containerd::start().await;
        let cgroup = CgroupParent::new();
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-interop-")
            .tempdir()
            .expect("create sandboxd temp dir");
        let root = std::fs::canonicalize(dir.path()).expect("canonicalize temp dir");
        let socket = root.join("sandboxd.sock");
        let log = std::fs::File::create(root.join("sandboxd.log")).expect("create sandboxd log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--containerd-address")
            .arg(containerd.address())
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--namespace")
            .arg(host::unique_name("sbx-interop"))
            .arg("--cgroup-parent")
            .arg(cgroup.path())
            .args(["--embedded-containerd", "never", "--runc-root"])
            .arg(containerd.dir().join("runc"))
            .env("PATH", host::DAEMON_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SANDBOXD_") {
                command.env_remove(key);
            }
        }
        let child = command.spawn().expect("spawn sandboxd");
        let mut sandboxd = UnixSandboxd {
            child: Some(child),
            socket,
            dir: Some(dir),
            root,
            _cgroup: cgroup,
            _containerd: containerd,
        };
        sandboxd.wait_serving().await;
        sandboxd
    }

    fn log(&self) -> String {
        host::log_tail(&self.root.join("sandboxd.log"), 32 * 1024)
    }

    /// Polls health `Check("")` over the socket with tonic (which sends a valid authority).
    async fn wait_serving(&mut self) {
        let deadline = Instant::now() + SERVING_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sandboxd exited during startup ({status}):\n{}", self.log());
            }
            let last = match self.tonic_health().await {
                Ok(ServingStatus::Serving) => return,
                Ok(other) => format!("{other:?}"),
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "sandboxd not SERVING within {SERVING_TIMEOUT:?} (last: {last}):\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn tonic_health(&self) -> Result<ServingStatus, String> {
        let channel = host::unix_channel(self.socket.clone()).await?;
        let mut client = HealthClient::new(channel);
        let check = client.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().status()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }
}

impl Drop for UnixSandboxd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            host::send_signal(child.id(), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(host::POLL_INTERVAL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- sandboxd log ---\n{}", self.log());
        }
        if let Some(dir) = self.dir.take() {
            host::remove_fixture_dir(dir);
        }
    }
}

/// `grpcurl -plaintext -unix -max-time 30 [flags] SOCKET [rest]`: no `-authority`.
async fn grpcurl(socket: &Path, flags: &[&str], rest: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(host::binary("grpcurl"));
    command
        .args(["-plaintext", "-unix", "-max-time", "30"])
        .args(flags)
        .arg(socket)
        .args(rest);
    host::run_client(
        &mut command,
        &format!("grpcurl {}", rest.join(" ")),
        CLIENT_TIMEOUT,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_over_the_unix_socket_needs_no_authority_flag() {
    let sandboxd = UnixSandboxd::start().await;

    let listed = grpcurl(&sandboxd.socket, &[], &["list"]).await;
    let services = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && services.lines().any(|l| l == "sandboxd.v1.SandboxService"),
        "grpcurl -unix list (reflection): {}",
        host::describe_output(&listed)
    );

    let health = grpcurl(&sandboxd.socket, &[], &["grpc.health.v1.Health/Check"]).await;
    assert!(
        health.status.success() && String::from_utf8_lossy(&health.stdout).contains("SERVING"),
        "grpcurl -unix health check: {}",
        host::describe_output(&health)
    );

    // One of our own services answers with its own status, not a transport error.
    let missing = grpcurl(
        &sandboxd.socket,
        &["-d", r#"{"sandbox_id":"no-such-sandbox"}"#],
        &["sandboxd.v1.SandboxService/GetSandbox"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success()
            && stderr.contains("NotFound")
            && stderr.contains("no-such-sandbox"),
        "grpcurl -unix GetSandbox of a missing id should be NotFound: {}",
        host::describe_output(&missing)
    );
}

/// Runs tests/python/unix_client.py against the socket and returns its JSON report.
async fn python_client(socket: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/unix_client.py");
    let mut command = tokio::process::Command::new(host::binary("python3"));
    command
        .arg(&script)
        .arg(socket)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = host::run_client(
        &mut command,
        "the Python unix-socket client",
        CLIENT_TIMEOUT,
    )
    .await;
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        host::describe_output(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the Python client printed no JSON ({e}): {}",
            host::describe_output(&out)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_unix_channel_needs_no_default_authority() {
    let sandboxd = UnixSandboxd::start().await;
    let report = python_client(&sandboxd.socket).await;
    assert_eq!(report["health"]["status"], "SERVING", "{report}");
    assert_eq!(report["missing"]["code"], "NOT_FOUND", "{report}");
    assert!(
        report["missing"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("no-such-sandbox")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_10000_byte_label_key_is_a_short_invalid_argument_naming_the_field() {
    let sandboxd = UnixSandboxd::start().await;
    let report = python_client(&sandboxd.socket).await;
    let long_label = &report["long_label"];
    // Unbounded, the message echoed the whole key (10 KB). grpcio rejects received metadata
    // above 8 KiB with rising probability up to a hard 16 KiB: such a call could come back as
    // RESOURCE_EXHAUSTED instead, hiding the error.
    assert_eq!(long_label["code"], "INVALID_ARGUMENT", "{report}");
    let details = long_label["details"].as_str().expect("details");
    assert!(
        details.len() <= MAX_STATUS_MESSAGE,
        "{} bytes: {details}",
        details.len()
    );
    assert!(details.starts_with("invalid labels: "), "{details}");
    assert!(details.contains("…(10000 bytes)"), "{details}");
}
