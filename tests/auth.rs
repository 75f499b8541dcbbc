//! Who may call: TLS, client certificates, bearer tokens and a trusted mesh sidecar, with real
//! TLS material made in the test (`openssl`), against a real sandboxd, with tonic, grpcurl,
//! Python grpcio and the sandboxd CLI. Also what stops sandboxd from starting (exit 2, naming
//! the file or the setting), reloads of the tenants file (on change and on SIGHUP; a bad
//! version keeps the last good one) and a certificate rotation under an open exec stream.
//!
//! Needs openssl, grpcurl and python3 with grpcio and grpcio-health-checking
//! (`scripts/install-deps.sh`); the tests panic, never skip, when they are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pki::{tenants_toml, Issued, Pki};
use common::{host, TestEnv};
use sandboxd::cli::Credentials;
use sandboxd::pb;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::{exec_request, exec_response};
use sandboxd::tls::ClientFiles;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;

/// How long a change (a reload, a rotation, a log line) may take to show.
const EVENT_WAIT: Duration = Duration::from_secs(15);
/// How long one client process may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a sandboxd that must refuse to start may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(20);

const ALICE_TOKEN: &str = "alice-token-7f3a";
const BOB_TOKEN: &str = "bob-token-91c2";
const CAROL_SPIFFE: &str = "spiffe://cluster.local/ns/agents/sa/carol";

/// Polls `check` until it returns `Some`, panicking with `what` after [`EVENT_WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(host::POLL_INTERVAL).await;
    }
}

fn token(t: &str) -> Credentials {
    Credentials {
        token: Some(t.into()),
        tls: ClientFiles::default(),
    }
}

fn tls(ca: &Path, token: Option<&str>, identity: Option<&Issued>) -> Credentials {
    Credentials {
        token: token.map(str::to_string),
        tls: ClientFiles {
            ca: Some(ca.to_path_buf()),
            identity: identity.map(|i| (i.cert.clone(), i.key.clone())),
        },
    }
}

/// ListSandboxes as `credentials`: the ids, or the status.
async fn list(env: &TestEnv, credentials: &Credentials) -> Result<Vec<String>, tonic::Status> {
    let mut client = SandboxServiceClient::new(env.sandboxd.transport(credentials));
    let reply = client
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await?;
    Ok(reply
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.sandbox_id)
        .collect())
}

/// The code of a call that must fail.
fn code_of(r: Result<Vec<String>, tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

/// sandboxd's log so far, without the terminal colours of its human format.
fn log_of(env: &TestEnv) -> String {
    let raw = std::fs::read_to_string(env.sandboxd.log_path()).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `grpcurl -max-time 30 ARGS`.
async fn grpcurl(args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(host::binary("grpcurl"));
    command.args(["-max-time", "30"]).args(args);
    host::run_client(
        &mut command,
        &format!("grpcurl {}", args.join(" ")),
        CLIENT_TIMEOUT,
    )
    .await
}

/// The sandboxd CLI with `args` and `envs` (and no SANDBOXD_ variable of ours).
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SANDBOXD_") {
            command.env_remove(key);
        }
    }
    command.args(args).envs(envs.iter().copied());
    host::run_client(
        &mut command,
        &format!("sandboxd {}", args.join(" ")),
        CLIENT_TIMEOUT,
    )
    .await
}

/// TLS material for a server that authenticates: a CA, the server's certificate, alice's
/// client certificate, and one for "alice" from a CA the server does not trust.
struct Material {
    pki: Pki,
    ca: PathBuf,
    server: Issued,
    alice: Issued,
    impostor: Issued,
    tenants: PathBuf,
}

impl Material {
    fn new() -> Material {
        let pki = Pki::new();
        let ca = pki.ca("ca");
        let other = pki.ca("other-ca");
        let server = pki.server(&ca, "server");
        let alice = pki.client(&ca, "alice", "alice");
        let impostor = pki.client(&other, "impostor", "alice");
        let tenants = pki.dir().join("tenants.toml");
        std::fs::write(
            &tenants,
            tenants_toml(&[
                ("alice", &[ALICE_TOKEN], "max_sandboxes = 5"),
                ("bob", &[BOB_TOKEN], ""),
                ("carol", &[], &format!("spiffe_ids = [\"{CAROL_SPIFFE}\"]")),
            ]),
        )
        .unwrap();
        Material {
            ca: ca.cert,
            pki,
            server,
            alice,
            impostor,
            tenants,
        }
    }

    /// sandboxd's arguments: TLS, client certificates, tenants, and `extra`.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--tls-cert",
            path(&self.server.cert),
            "--tls-key",
            path(&self.server.key),
            "--tls-client-ca",
            path(&self.ca),
            "--tenants",
            path(&self.tenants),
        ];
        args.extend_from_slice(extra);
        args
    }

    async fn env(&self, extra: &[&str]) -> TestEnv {
        TestEnv::with_tls(
            &self.args(extra),
            ClientFiles {
                ca: Some(self.ca.clone()),
                identity: None,
            },
        )
        .await
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `HOST:PORT` of the env's sandboxd.
fn target(env: &TestEnv) -> String {
    env.sandboxd.addr().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn tonic_and_grpcurl_authenticate_by_token_client_certificate_or_forwarded_certificate() {
    let m = Material::new();
    let metrics_port = common::registry::free_port().to_string();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let env = m
        .env(&[
            "--trust-forwarded-client-cert",
            "--metrics-listen",
            &metrics,
        ])
        .await;

    // Without credentials, or with wrong ones: UNAUTHENTICATED, the token never echoed.
    let none = tls(&m.ca, None, None);
    assert_eq!(code_of(list(&env, &none).await), Code::Unauthenticated);
    let wrong = list(&env, &tls(&m.ca, Some("guessed-token-1234"), None))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains("guessed-token-1234"), "{wrong:?}");

    // A token, a client certificate, or both naming the same tenant.
    assert!(list(&env, &tls(&m.ca, Some(ALICE_TOKEN), None))
        .await
        .is_ok());
    assert!(list(&env, &tls(&m.ca, None, Some(&m.alice))).await.is_ok());
    assert!(list(&env, &tls(&m.ca, Some(ALICE_TOKEN), Some(&m.alice)))
        .await
        .is_ok());
    // alice's certificate with bob's token names two tenants.
    assert_eq!(
        code_of(list(&env, &tls(&m.ca, Some(BOB_TOKEN), Some(&m.alice))).await),
        Code::Unauthenticated
    );
    // A certificate from another CA does not get past the handshake.
    let refused = code_of(list(&env, &tls(&m.ca, None, Some(&m.impostor))).await);
    assert!(
        !matches!(refused, Code::Ok | Code::Unauthenticated),
        "{refused:?}"
    );

    // A loopback peer's forwarded certificate (a mesh sidecar's) names carol.
    let mut client = SandboxServiceClient::new(env.sandboxd.transport(&none));
    let mut req = tonic::Request::new(pb::ListSandboxesRequest::default());
    req.metadata_mut().insert(
        "x-forwarded-client-cert",
        format!("Hash=abc;URI={CAROL_SPIFFE}").parse().unwrap(),
    );
    client
        .list_sandboxes(req)
        .await
        .expect("carol by SPIFFE ID");

    // A mutating call is audited with its tenant and sandbox; the counter has a tenant label.
    let mut sb =
        SandboxServiceClient::new(env.sandboxd.transport(&tls(&m.ca, Some(ALICE_TOKEN), None)));
    sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "audited".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .expect("create as alice");
    sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "audited".into(),
        force: true,
    })
    .await
    .expect("delete as alice");
    let line = wait_for("the create's audit line is logged", || async {
        log_of(&env)
            .lines()
            .find(|l| {
                l.contains("audit")
                    && l.contains("/sandboxd.v1.SandboxService/CreateSandbox")
                    && l.contains("\"audited\"")
            })
            .map(str::to_string)
    })
    .await;
    for field in [
        "tenant=\"alice\"",
        "code=Ok",
        "duration_ms=",
        "peer=127.0.0.1:",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    let text = http_get(&metrics, "/metrics").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("sandboxd_rpc_requests_total{")
                && l.contains("CreateSandbox")
                && l.contains("tenant=\"alice\"")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("code=\"Unauthenticated\"") && l.contains("tenant=\"\"")),
        "{text}"
    );

    // Probes that cannot speak gRPC over TLS (Kubernetes') ask the metrics port.
    let healthz = http_get(&metrics, "/healthz").await;
    assert!(
        healthz.starts_with("HTTP/1.1 200") && healthz.ends_with("SERVING\n"),
        "{healthz}"
    );

    // grpcurl: reflection and calls with a token or a client certificate; nothing without.
    let addr = target(&env);
    let bearer = format!("authorization: Bearer {ALICE_TOKEN}");
    let listed = grpcurl(&["-cacert", path(&m.ca), "-H", &bearer, &addr, "list"]).await;
    assert!(
        listed.status.success()
            && String::from_utf8_lossy(&listed.stdout).contains("sandboxd.v1.SandboxService"),
        "{}",
        host::describe_output(&listed)
    );
    let by_cert = grpcurl(&[
        "-cacert",
        path(&m.ca),
        "-cert",
        path(&m.alice.cert),
        "-key",
        path(&m.alice.key),
        &addr,
        "sandboxd.v1.SandboxService/ListSandboxes",
    ])
    .await;
    assert!(
        by_cert.status.success(),
        "{}",
        host::describe_output(&by_cert)
    );
    let anonymous = grpcurl(&["-cacert", path(&m.ca), &addr, "list"]).await;
    assert!(
        !anonymous.status.success()
            && String::from_utf8_lossy(&anonymous.stderr).contains("Unauthenticated"),
        "{}",
        host::describe_output(&anonymous)
    );
    let impostor = grpcurl(&[
        "-cacert",
        path(&m.ca),
        "-cert",
        path(&m.impostor.cert),
        "-key",
        path(&m.impostor.key),
        &addr,
        "sandboxd.v1.SandboxService/ListSandboxes",
    ])
    .await;
    // Go's TLS client withholds a certificate the server's CA list does not name, so the
    // call arrives without credentials; tonic (rustls) sends it and fails the handshake.
    assert!(
        !impostor.status.success(),
        "{}",
        host::describe_output(&impostor)
    );
    // Health needs no credentials at all (its schema from a protoset, not reflection).
    let protoset = m.pki.dir().join("health.protoset");
    std::fs::write(&protoset, tonic_health::pb::FILE_DESCRIPTOR_SET).unwrap();
    let health = grpcurl(&[
        "-cacert",
        path(&m.ca),
        "-protoset",
        path(&protoset),
        &addr,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert!(
        health.status.success() && String::from_utf8_lossy(&health.stdout).contains("SERVING"),
        "{}",
        host::describe_output(&health)
    );
    env.leak_check().await;
}

/// The response (status line, headers and body) to `GET http://ADDR/PATH`.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: sandboxd\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_and_the_cli_authenticate_over_tls() {
    let m = Material::new();
    let env = m.env(&[]).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/auth_client.py");
    let mut command = tokio::process::Command::new(host::binary("python3"));
    command
        .arg(&script)
        .args([
            &target(&env),
            path(&m.ca),
            ALICE_TOKEN,
            path(&m.alice.cert),
            path(&m.alice.key),
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = host::run_client(&mut command, "the Python TLS client", CLIENT_TIMEOUT).await;
    assert!(out.status.success(), "{}", host::describe_output(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", host::describe_output(&out)));
    assert_eq!(report["health"], "SERVING", "{report}");
    assert_eq!(report["no_token"], "UNAUTHENTICATED", "{report}");
    assert_eq!(report["wrong_token"], "UNAUTHENTICATED", "{report}");
    assert_eq!(report["token"], "OK", "{report}");
    assert_eq!(report["client_cert"], "OK", "{report}");

    // The CLI: https:// with --tls-ca and --token (or SANDBOXD_TOKEN), or a client certificate.
    let server = format!("https://{}", target(&env));
    let ok = cli(
        &[
            "--server",
            &server,
            "--tls-ca",
            path(&m.ca),
            "--token",
            ALICE_TOKEN,
            "sandbox",
            "ls",
        ],
        &[],
    )
    .await;
    assert!(ok.status.success(), "{}", host::describe_output(&ok));
    let by_env = cli(
        &["sandbox", "ls"],
        &[
            ("SANDBOXD_SERVER", &server),
            ("SANDBOXD_TLS_CA", path(&m.ca)),
            ("SANDBOXD_TOKEN", BOB_TOKEN),
        ],
    )
    .await;
    assert!(
        by_env.status.success(),
        "{}",
        host::describe_output(&by_env)
    );
    let by_cert = cli(
        &[
            "--server",
            &server,
            "--tls-ca",
            path(&m.ca),
            "--tls-cert",
            path(&m.alice.cert),
            "--tls-key",
            path(&m.alice.key),
            "sandbox",
            "ls",
        ],
        &[],
    )
    .await;
    assert!(
        by_cert.status.success(),
        "{}",
        host::describe_output(&by_cert)
    );
    let refused = cli(
        &[
            "--server",
            &server,
            "--tls-ca",
            path(&m.ca),
            "sandbox",
            "ls",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{}",
        host::describe_output(&refused)
    );
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let wrong = cli(
        &[
            "--server",
            &server,
            "--tls-ca",
            path(&m.ca),
            "--token",
            "wrong-9d1e",
            "sandbox",
            "ls",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("UNAUTHENTICATED") && !stderr.contains("wrong-9d1e"),
        "{stderr}"
    );
}

/// Rewrites the tenants file at `path` with `text`, through a rename as a Secret update does.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_stops_working_and_an_added_one_starts_without_a_restart() {
    let pki = Pki::new();
    let file = pki.dir().join("tenants.toml");
    std::fs::write(&file, tenants_toml(&[("alice", &[ALICE_TOKEN], "")])).unwrap();
    let env = TestEnv::with_args(&["--tenants", path(&file)]).await;
    let pid = env.sandboxd.pid();
    assert!(list(&env, &token(ALICE_TOKEN)).await.is_ok());
    assert_eq!(
        code_of(list(&env, &token(BOB_TOKEN)).await),
        Code::Unauthenticated
    );

    // alice's token revoked, bob's added: both take effect on their own.
    rewrite(&file, &tenants_toml(&[("bob", &[BOB_TOKEN], "")]));
    wait_for("alice's revoked token is refused", || async {
        (code_of(list(&env, &token(ALICE_TOKEN)).await) == Code::Unauthenticated).then_some(())
    })
    .await;
    assert!(list(&env, &token(BOB_TOKEN)).await.is_ok());

    // A file that does not parse is reported and changes nothing.
    rewrite(&file, "[tenants.bob\ntokens_sha256 = [\n");
    wait_for("the bad tenants file is reported", || async {
        log_of(&env)
            .contains("tenants file not reloaded: keeping the previous version")
            .then_some(())
    })
    .await;
    let logged = log_of(&env);
    assert!(logged.contains(path(&file)), "the log names the file");
    assert!(list(&env, &token(BOB_TOKEN)).await.is_ok());
    assert_eq!(
        code_of(list(&env, &token(ALICE_TOKEN)).await),
        Code::Unauthenticated
    );
    assert_eq!(env.sandboxd.pid(), pid, "sandboxd was restarted");
    assert!(env.sandboxd.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_tenants_file_at_once() {
    let pki = Pki::new();
    let file = pki.dir().join("tenants.toml");
    std::fs::write(&file, tenants_toml(&[("alice", &[ALICE_TOKEN], "")])).unwrap();
    // Changes are looked for once an hour: only the signal can bring this one in.
    let env = TestEnv::with_args(&["--tenants", path(&file), "--reload-interval", "1h"]).await;
    assert!(list(&env, &token(ALICE_TOKEN)).await.is_ok());

    rewrite(&file, &tenants_toml(&[("alice", &[BOB_TOKEN], "")]));
    host::send_signal(env.sandboxd.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_for("the new token works after SIGHUP", || async {
        list(&env, &token(BOB_TOKEN)).await.ok().map(|_| ())
    })
    .await;
    assert_eq!(
        code_of(list(&env, &token(ALICE_TOKEN)).await),
        Code::Unauthenticated
    );

    rewrite(&file, "tokens_sha256 = 7\n");
    host::send_signal(env.sandboxd.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_for("the bad file is reported after SIGHUP", || async {
        log_of(&env)
            .contains("tenants file not reloaded: keeping the previous version")
            .then_some(())
    })
    .await;
    assert!(list(&env, &token(BOB_TOKEN)).await.is_ok());
    assert!(env.sandboxd.is_running(), "SIGHUP must not stop sandboxd");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_certificate_reaches_new_connections_while_an_open_exec_stream_keeps_running() {
    let pki = Pki::new();
    let (ca1, ca2) = (pki.ca("ca1"), pki.ca("ca2"));
    let (first, second) = (pki.server(&ca1, "first"), pki.server(&ca2, "second"));
    // The paths sandboxd reads, as a cert-manager Secret's tls.crt and tls.key.
    let (cert, key) = (pki.dir().join("tls.crt"), pki.dir().join("tls.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let env = TestEnv::with_tls(
        &["--tls-cert", path(&cert), "--tls-key", path(&key)],
        ClientFiles {
            ca: Some(ca1.cert.clone()),
            identity: None,
        },
    )
    .await;
    let old = tls(&ca1.cert, None, None);
    let new = tls(&ca2.cert, None, None);
    let transport = env.sandboxd.transport(&old);
    let mut sb = SandboxServiceClient::new(transport.clone());
    sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "rotation".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .expect("create");

    // An exec that waits for a line of input, opened before the rotation.
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: "rotation".into(),
            args: vec!["sh".into(), "-c".into(), "read line; echo got:$line".into()],
            stdin: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = sb
        .exec(ReceiverStream::new(rx))
        .await
        .expect("exec")
        .into_inner();
    match stream
        .next()
        .await
        .expect("a first message")
        .expect("started")
        .response
    {
        Some(exec_response::Response::Started(_)) => {}
        other => panic!("expected started, got {other:?}"),
    }

    // Rotate to a certificate from another CA; new connections get it.
    std::fs::copy(&second.key, pki.dir().join("tls.key.new")).unwrap();
    std::fs::copy(&second.cert, pki.dir().join("tls.crt.new")).unwrap();
    std::fs::rename(pki.dir().join("tls.key.new"), &key).unwrap();
    std::fs::rename(pki.dir().join("tls.crt.new"), &cert).unwrap();
    wait_for("a new connection is served the new certificate", || async {
        list(&env, &new).await.ok().map(|_| ())
    })
    .await;
    assert_ne!(
        code_of(list(&env, &old).await),
        Code::Ok,
        "the old certificate is still served"
    );

    // The stream opened before goes on, and so does the old connection.
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Stdin(b"after-rotation\n".to_vec())),
    })
    .await
    .unwrap();
    let mut stdout = Vec::new();
    let mut exited = None;
    while let Some(message) = stream.next().await {
        match message.expect("exec stream").response {
            Some(exec_response::Response::Stdout(d)) => stdout.extend(d),
            Some(exec_response::Response::Exited(e)) => exited = Some(e),
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&stdout), "got:after-rotation\n");
    assert_eq!(exited.expect("exited").exit_code, 0);
    drop(tx);
    sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "rotation".into(),
        force: true,
    })
    .await
    .expect("delete over the connection made before the rotation");
    env.leak_check().await;
}

/// `sandboxd serve` with `args` that must make it exit at once: its exit code and stderr. No
/// containerd is needed: it must not get that far.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SANDBOXD_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args([
            "serve",
            "--data-dir",
            path(&data),
            "--embedded-containerd",
            "never",
        ])
        .arg("--containerd-address")
        .arg(dir.path().join("no-containerd.sock"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandboxd");
    let deadline = Instant::now() + EXIT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sandboxd {args:?} did not exit within {EXIT_WAIT:?}");
        }
        std::thread::sleep(host::POLL_INTERVAL);
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn a_bad_tenants_file_or_certificate_stops_the_start_with_exit_2_naming_it() {
    let m = Material::new();
    let dir = m.pki.dir();
    let bad_tenants = dir.join("bad-tenants.toml");
    std::fs::write(
        &bad_tenants,
        "[tenants.alice]\ntokens_sha256 = [\"not-hex\"]\n",
    )
    .unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.join("missing.pem");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--tenants", path(&bad_tenants)],
            vec![path(&bad_tenants), "tokens_sha256"],
        ),
        (vec!["--tenants", path(&missing)], vec![path(&missing)]),
        (
            vec![
                "--tls-cert",
                path(&garbage),
                "--tls-key",
                path(&m.server.key),
            ],
            vec![path(&garbage)],
        ),
        (
            vec![
                "--tls-cert",
                path(&m.server.cert),
                "--tls-key",
                path(&m.server.cert),
            ],
            vec![path(&m.server.cert), "private key"],
        ),
        (
            // A key that is not the certificate's.
            vec![
                "--tls-cert",
                path(&m.server.cert),
                "--tls-key",
                path(&m.alice.key),
            ],
            vec![path(&m.alice.key)],
        ),
        (
            vec![
                "--tls-cert",
                path(&m.server.cert),
                "--tls-key",
                path(&m.server.key),
                "--tls-client-ca",
                path(&m.tenants),
            ],
            vec![path(&m.tenants)],
        ),
    ];
    for (args, names) in cases {
        let (code, stderr) = refused_start(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        for name in names {
            assert!(
                stderr.contains(name),
                "{args:?} should name {name}: {stderr}"
            );
        }
    }
}

#[test]
fn listening_beyond_loopback_without_authentication_stops_the_start_with_exit_2() {
    let (code, stderr) = refused_start(&["--listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{stderr}");
    for hint in ["--tenants", "--tls-client-ca", "--allow-unauthenticated"] {
        assert!(stderr.contains(hint), "{hint}: {stderr}");
    }
    let m = Material::new();
    let (code, stderr) = refused_start(&[
        "--listen",
        &format!("unix:{}", m.pki.dir().join("s.sock").display()),
        "--tls-cert",
        path(&m.server.cert),
        "--tls-key",
        path(&m.server.key),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unix socket"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unix_socket_is_created_for_owner_and_group_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sandboxd.sock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(
        Command::new(env!("CARGO_BIN_EXE_sandboxd"))
            .args(["serve", "--embedded-containerd", "never", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--containerd-address")
            .arg(dir.path().join("no-containerd.sock"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sandboxd"),
    );
    let mode = wait_for("the socket exists", || async {
        std::fs::metadata(&socket)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    })
    .await;
    assert_eq!(mode, 0o660);
}
