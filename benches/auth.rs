//! What authentication costs: the same calls against a plaintext sandboxd and one serving TLS
//! with a bearer token (`--tls-cert`, `--tls-key`, `--tenants`), both on one containerd, in one
//! run.
//!
//! One run starts the integration-test fixtures (a private containerd, a local registry holding
//! busybox, the plaintext sandboxd), makes a CA and a server certificate with `openssl`, starts a
//! second sandboxd with TLS and a tenants file on the same containerd (its own namespace), pulls
//! the image through each (not timed), then times on both, the two sides taking turns sample by
//! sample (and swapping who goes first each time):
//!
//! * exec round trip: an `Exec` stream of `true` in a running sandbox, from the call to `exited`
//!   (`BENCH_ROUND_TRIPS`, default 200 per side);
//! * create → RUNNING: `CreateSandbox` with the idle PID 1 until the response says RUNNING, each
//!   deleted afterwards, not timed (`BENCH_CREATES`, default 40 per side);
//! * a unary call that does almost nothing (`GetSandbox` of a missing id, NOT_FOUND;
//!   `BENCH_UNARY`, default 1000 per side): the per-call cost of authentication without runc's
//!   noise around it.
//!
//! Besides the difference of the p50s, each row shows the median of the paired differences:
//! for each two consecutive iterations (one with each side first, so going first or second
//! costs both sides alike), the mean of their two (auth − plaintext) differences. On a loaded
//! 2-core machine it moves much less than the difference of two medians.
//!
//! Each side talks over one channel, so TLS handshakes happen once: what is timed is what every
//! call pays (record encryption, the token's hash and comparison, the audit line of a create).
//! The target: authentication adds at most 1 ms at p50. It prints a table, writes
//! `target/bench-auth.json` and checks that neither sandboxd left anything behind.
//!
//! Run it as root with `cargo bench --bench auth`. Run without `--bench` (as `cargo test
//! --benches` does) it only prints how to run it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandboxd::cli::Credentials;
use sandboxd::pb;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::{exec_request, exec_response};
use sandboxd::tls::ClientFiles;
use serde::Serialize;
use tonic::codegen::{Body, Bytes, StdError};

use common::pki::{tenants_toml, Pki};
use common::{Sandboxd, SandboxdOptions, TestEnv};
use support::{
    announce, bench_main, env_count, publish, status_error, verdict, LoadAverages, MachineFacts,
    Summary,
};

/// Environment variable: exec round trips per side.
const ENV_ROUND_TRIPS: &str = "BENCH_ROUND_TRIPS";
const DEFAULT_ROUND_TRIPS: usize = 200;
/// Environment variable: creates per side.
const ENV_CREATES: &str = "BENCH_CREATES";
const DEFAULT_CREATES: usize = 40;
/// Environment variable: unary calls per side.
const ENV_UNARY: &str = "BENCH_UNARY";
const DEFAULT_UNARY: usize = 1000;
/// Untimed round trips and creates per side first (connection set-up, first-use costs).
const WARMUP: usize = 10;
/// The most authentication may add at p50, in milliseconds.
const TARGET_MS: f64 = 1.0;
/// The bearer token of the TLS side's one tenant.
const TOKEN: &str = "bench-token-5b0c1e";
const JSON_FILE_NAME: &str = "bench-auth.json";

fn main() -> Result<()> {
    bench_main("auth", Settings::from_env, run)
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Settings {
    round_trips: usize,
    creates: usize,
    unary: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            round_trips: env_count(ENV_ROUND_TRIPS, DEFAULT_ROUND_TRIPS)?,
            creates: env_count(ENV_CREATES, DEFAULT_CREATES)?,
            unary: env_count(ENV_UNARY, DEFAULT_UNARY)?,
        })
    }
}

async fn run(settings: Settings) -> Result<()> {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let pki = Pki::new();
    let ca = pki.ca("bench-ca");
    let server = pki.server(&ca, "bench-server");
    let tenants = pki.dir().join("tenants.toml");
    std::fs::write(&tenants, tenants_toml(&[("bench", &[TOKEN], "")]))?;
    let secure_ns = common::unique_name("sbx-bench-tls");
    let secure = Sandboxd::start(SandboxdOptions {
        containerd_address: env.containerd.address(),
        namespace: secure_ns.clone(),
        cgroup_parent: env.cgroup.path().to_owned(),
        extra_args: [
            "--tls-cert",
            path(&server.cert)?,
            "--tls-key",
            path(&server.key)?,
            "--tenants",
            path(&tenants)?,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        extra_env: vec![],
        tls: Some(ClientFiles {
            ca: Some(ca.cert.clone()),
            identity: None,
        }),
    })
    .await;
    let (machine, load_before) = announce(
        &env.containerd,
        &format!(
            "settings: {} exec round trips, {} creates and {} unary calls per side, {WARMUP} \
             untimed of each first; image {image}",
            settings.round_trips, settings.creates, settings.unary
        ),
    )
    .await?;

    let plain = SandboxServiceClient::new(support::pulled_channel(&env, &image).await?);
    let transport = secure.transport(&Credentials {
        token: Some(TOKEN.into()),
        tls: ClientFiles {
            ca: Some(ca.cert.clone()),
            identity: None,
        },
    });
    pull(transport.clone(), &image).await?;
    let tls = SandboxServiceClient::new(transport);

    let mut samples = Samples::default();
    for i in 0..WARMUP + settings.unary {
        let (a, b) = if i % 2 == 0 {
            let a = get_missing(&plain).await?;
            (a, get_missing(&tls).await?)
        } else {
            let b = get_missing(&tls).await?;
            (get_missing(&plain).await?, b)
        };
        if i >= WARMUP {
            samples.unary_plain.push(a);
            samples.unary_tls.push(b);
        }
    }
    create(&plain, &image, "plain-exec").await?;
    create(&tls, &image, "tls-exec").await?;
    for i in 0..WARMUP + settings.round_trips {
        let (a, b) = if i % 2 == 0 {
            let a = exec_true(&plain, "plain-exec").await?;
            (a, exec_true(&tls, "tls-exec").await?)
        } else {
            let b = exec_true(&tls, "tls-exec").await?;
            (exec_true(&plain, "plain-exec").await?, b)
        };
        if i >= WARMUP {
            samples.exec_plain.push(a);
            samples.exec_tls.push(b);
        }
    }
    delete(&plain, "plain-exec").await?;
    delete(&tls, "tls-exec").await?;
    for i in 0..WARMUP + settings.creates {
        let (pid, tid) = (format!("plain-{i}"), format!("tls-{i}"));
        let (a, b) = if i % 2 == 0 {
            let a = create(&plain, &image, &pid).await?;
            (a, create(&tls, &image, &tid).await?)
        } else {
            let b = create(&tls, &image, &tid).await?;
            (create(&plain, &image, &pid).await?, b)
        };
        delete(&plain, &pid).await?;
        delete(&tls, &tid).await?;
        if i >= WARMUP {
            samples.create_plain.push(a);
            samples.create_tls.push(b);
        }
    }
    let load = LoadAverages::since(load_before)?;
    let report = Report::new(machine, load, settings, &samples)?;
    publish(&report.render(), &report, JSON_FILE_NAME)?;

    env.leak_check().await;
    let leaks = env.containerd.leaks(&secure_ns).await;
    ensure!(leaks.is_empty(), "the TLS sandboxd left:\n{leaks}");
    drop(secure);
    Ok(())
}

fn path(p: &std::path::Path) -> Result<&str> {
    p.to_str().context("a temp path that is not UTF-8")
}

#[derive(Default)]
struct Samples {
    unary_plain: Vec<Duration>,
    unary_tls: Vec<Duration>,
    exec_plain: Vec<Duration>,
    exec_tls: Vec<Duration>,
    create_plain: Vec<Duration>,
    create_tls: Vec<Duration>,
}

/// Pulls `image` through ImageService over `transport` (not timed).
async fn pull(transport: sandboxd::cli::Transport, image: &str) -> Result<()> {
    let mut stream = pb::image_service_client::ImageServiceClient::new(transport)
        .pull_image(pb::PullImageRequest {
            image: image.to_owned(),
        })
        .await
        .map_err(|s| status_error("PullImage", image, &s))?
        .into_inner();
    while stream
        .message()
        .await
        .map_err(|s| status_error("PullImage stream", image, &s))?
        .is_some()
    {}
    Ok(())
}

/// Creates sandbox `id` with the idle PID 1; the time until the response says RUNNING.
async fn create<T>(client: &SandboxServiceClient<T>, image: &str, id: &str) -> Result<Duration>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let start = Instant::now();
    let sandbox = client
        .clone()
        .create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: id.to_owned(),
            image: image.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("CreateSandbox", id, &s))?
        .into_inner()
        .sandbox
        .context("CreateSandbox: no sandbox in the response")?;
    let took = start.elapsed();
    ensure!(
        sandbox.state() == pb::SandboxState::Running,
        "CreateSandbox {id} answered {:?}",
        sandbox.state()
    );
    Ok(took)
}

async fn delete<T>(client: &SandboxServiceClient<T>, id: &str) -> Result<()>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    client
        .clone()
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id.to_owned(),
            force: true,
        })
        .await
        .map_err(|s| status_error("DeleteSandbox", id, &s))?;
    Ok(())
}

/// `GetSandbox` of an id that does not exist: the time to its NOT_FOUND.
async fn get_missing<T>(client: &SandboxServiceClient<T>) -> Result<Duration>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let start = Instant::now();
    let err = client
        .clone()
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "no-such-sandbox".into(),
        })
        .await
        .expect_err("a missing sandbox");
    let took = start.elapsed();
    ensure!(err.code() == tonic::Code::NotFound, "GetSandbox: {err}");
    Ok(took)
}

/// An `Exec` stream of `true` in sandbox `id`, from the call to `exited`.
async fn exec_true<T>(client: &SandboxServiceClient<T>, id: &str) -> Result<Duration>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let request = pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: id.to_owned(),
            args: vec!["true".into()],
            ..Default::default()
        })),
    };
    let start = Instant::now();
    let mut stream = client
        .clone()
        .exec(futures::stream::iter([request]))
        .await
        .map_err(|s| status_error("Exec true in", id, &s))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| status_error("Exec true in", id, &s))?
    {
        if let Some(exec_response::Response::Exited(exit)) = message.response {
            let took = start.elapsed();
            ensure!(exit.exit_code == 0, "true exited {}", exit.exit_code);
            return Ok(took);
        }
    }
    bail!("Exec true in {id}: the stream ended without `exited`")
}

#[derive(Debug, Serialize)]
struct Row {
    operation: &'static str,
    plaintext: Summary,
    tls_token: Summary,
    added_p50_ms: f64,
    /// Median over iteration pairs (one with each side first) of the mean auth − plaintext.
    paired_median_ms: f64,
    target: String,
    met: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineFacts,
    load: LoadAverages,
    settings: Settings,
    rows: Vec<Row>,
}

impl Report {
    fn new(
        machine: MachineFacts,
        load: LoadAverages,
        settings: Settings,
        s: &Samples,
    ) -> Result<Report> {
        let row = |operation, plain: &[Duration], tls: &[Duration]| -> Result<Row> {
            let plaintext = Summary::of(plain).context("no samples")?;
            let tls_token = Summary::of(tls).context("no samples")?;
            let added = tls_token.p50_ms - plaintext.p50_ms;
            let diffs: Vec<f64> = plain
                .iter()
                .zip(tls)
                .map(|(p, t)| (t.as_secs_f64() - p.as_secs_f64()) * 1e3)
                .collect();
            let mut paired: Vec<f64> = diffs.chunks_exact(2).map(|d| (d[0] + d[1]) / 2.0).collect();
            paired.sort_by(f64::total_cmp);
            Ok(Row {
                operation,
                plaintext,
                tls_token,
                added_p50_ms: added,
                paired_median_ms: support::nearest_rank(&paired, 0.5),
                target: format!("≤ +{TARGET_MS} ms at p50"),
                met: added <= TARGET_MS,
            })
        };
        Ok(Report {
            machine,
            load,
            settings,
            rows: vec![
                row("unary call (NOT_FOUND)", &s.unary_plain, &s.unary_tls)?,
                row("exec `true` round trip", &s.exec_plain, &s.exec_tls)?,
                row("create → RUNNING", &s.create_plain, &s.create_tls)?,
            ],
        })
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{:<24} {:>9} {:>9} | {:>9} {:>9} | {:>10} {:>10} {:>7}\n",
            "operation (ms)",
            "plain p50",
            "plain p99",
            "auth p50",
            "auth p99",
            "added p50",
            "paired med",
            "target"
        );
        out.push_str(&"-".repeat(out.chars().count() - 1));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&format!(
                "{:<24} {:>9.2} {:>9.2} | {:>9.2} {:>9.2} | {:>+10.2} {:>+10.2} {:>7}\n",
                r.operation,
                r.plaintext.p50_ms,
                r.plaintext.p99_ms,
                r.tls_token.p50_ms,
                r.tls_token.p99_ms,
                r.added_p50_ms,
                r.paired_median_ms,
                verdict(r.met)
            ));
        }
        out.push_str("auth = TLS (rustls, aws-lc-rs) + bearer token, one connection per side\n");
        out.push_str(&self.load.render());
        out
    }
}
