//! Registries as users have them, against real registries the tests start: htpasswd
//! credentials from a Docker config.json (re-read when it changes), a registry with a CA made
//! here, a mirror serving Docker Hub's short names behind an allow-list, and a small fake
//! registry that stalls, declares absurd sizes, serves a wrong digest and points its token
//! realm at the cloud metadata address. Every case ends in a clear status with the server up,
//! the sandbox id free again and nothing left in containerd.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::registry::RegistryOptions;
use common::{Registry, TestEnv};
use futures::StreamExt;
use sandboxd::pb;
use sandboxd::pb::image_service_client::ImageServiceClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pass";

/// PullImage to its end: the image, or the status it ended with.
async fn pull(env: &TestEnv, image: &str) -> Result<pb::Image, tonic::Status> {
    let mut c = ImageServiceClient::new(env.channel().await);
    let mut stream = c
        .pull_image(pb::PullImageRequest {
            image: image.into(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(msg) = stream.next().await {
        last = msg?.image.or(last);
    }
    Ok(last.expect("a pull that ends without error ends with the image"))
}

/// Writes a Docker config.json at `path` atomically (rename), as a Secret update lands.
fn write_auth(path: &Path, auths: serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&json!({ "auths": auths })).unwrap(),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Asserts that sandboxd still serves and that `id` is free: no sandbox by that name.
async fn assert_up_and_free(env: &TestEnv, id: &str) {
    assert_eq!(env.sandboxd.health().await, Ok(ServingStatus::Serving));
    let mut c = env.clients().await;
    let err = c.try_get(id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{id}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_registry_pulls_and_exports_with_credentials_and_refuses_without() {
    let private = Registry::start_with(RegistryOptions {
        user: Some((USER.into(), PASSWORD.into())),
        tls: None,
        token: None,
    });
    private.push(&common::busybox_layout(), "team/busybox:1");
    let host = private.addr();
    let image = format!("{host}/team/busybox:1");
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("config.json");
    write_auth(&auth, json!({}));
    let env = TestEnv::with_args(&["--registry-auth", auth.to_str().unwrap()]).await;
    let mut c = env.clients().await;

    // No credentials for the host: the registry's own reason, UNAUTHENTICATED.
    let err = pull(&env, &image).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains(&host), "{err}");
    assert!(err.message().contains("UNAUTHORIZED"), "{err}");

    // A wrong password (as `username`/`password`): refused, and a create fails with the same
    // status and leaves its id free.
    write_auth(
        &auth,
        json!({ host.clone(): {"username": USER, "password": "wrong"} }),
    );
    let err = pull(&env, &image).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("refused"), "{err}");
    let mut request = c.request("private-1");
    request.image = image.clone();
    let err = c.try_create(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert_up_and_free(&env, "private-1").await;

    // The right one (as `auth`, under a URL key), picked up without a restart.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    write_auth(
        &auth,
        json!({ format!("http://{host}/v2/"): {"auth": basic} }),
    );
    let pulled = pull(&env, &image).await.unwrap();
    assert_eq!(pulled.name, image);
    c.create(request).await;
    assert_eq!(c.sh_ok("private-1", "echo in").await.trim(), "in");

    // Export pushes with the same credentials.
    let snap = c.commit("private-1").await;
    let target = format!("{host}/team/exported:v1");
    let exported = c
        .snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exported.image, target);
    assert!(exported.digest.starts_with("sha256:"));
    // ... and what it pushed pulls back.
    pull(&env, &target).await.unwrap();

    // Without credentials the push is refused before any blob moves.
    write_auth(&auth, json!({}));
    let err = c
        .snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: format!("{host}/team/exported:v2"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    c.force_delete("private-1").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_with_its_own_ca_is_trusted_for_its_host_only() {
    let pki = common::pki::Pki::new();
    let ca = pki.ca("registry-ca");
    let other_ca = pki.ca("other-ca");
    let server = pki.server(&ca, "registry");
    let registry = Registry::start_with(RegistryOptions {
        user: None,
        tls: Some((server.cert.clone(), server.key.clone())),
        token: None,
    });
    registry.push(&common::busybox_layout(), "tls/busybox:1");
    let port = registry.addr().rsplit(':').next().unwrap().to_string();
    // One registry under two names: trusted through its CA as 127.0.0.1, and given the
    // wrong CA as localhost.
    let trusted = format!("127.0.0.1:{port}");
    let mistrusted = format!("localhost:{port}");
    let env = TestEnv::with_args(&[
        "--registry-ca",
        &format!("{trusted}={}", ca.cert.display()),
        "--registry-ca",
        &format!("{mistrusted}={}", other_ca.cert.display()),
    ])
    .await;

    let image = format!("{trusted}/tls/busybox:1");
    assert_eq!(pull(&env, &image).await.unwrap().name, image);
    let mut c = env.clients().await;
    let mut request = c.request("tls-1");
    request.image = image;
    c.create(request).await;
    assert_eq!(c.sh_ok("tls-1", "echo tls").await.trim(), "tls");

    let err = pull(&env, &format!("{mistrusted}/tls/busybox:1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().to_lowercase().contains("certificate"),
        "{err}"
    );

    c.force_delete("tls-1").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_an_allow_list_short_names_pull_through_their_mirror_and_other_hosts_are_refused() {
    let mirror = Registry::start();
    mirror.push(&common::busybox_layout(), "library/busybox:1.36");
    // A mirror that is down comes first: the pull goes on to the next.
    let dead = format!("127.0.0.1:{}", common::registry::free_port());
    let env = TestEnv::with_args(&[
        "--registry-mirror",
        &format!("docker.io=http://{dead}"),
        "--registry-mirror",
        &format!("docker.io=http://{}", mirror.addr()),
        "--registry-allow",
        "docker.io",
    ])
    .await;
    let mut c = env.clients().await;

    let pulled = pull(&env, "busybox:1.36").await.unwrap();
    assert_eq!(pulled.name, "docker.io/library/busybox:1.36");
    let mut request = c.request("mirrored");
    request.image = "busybox:1.36".into();
    let sandbox = c.create(request).await;
    assert_eq!(sandbox.image, "docker.io/library/busybox:1.36");
    assert_eq!(c.sh_ok("mirrored", "echo hub").await.trim(), "hub");

    // The env's own registry is not on the list: refused before any connection.
    let err = pull(&env, &env.image_ref()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("--registry-allow"), "{err}");
    let err = c.try_create(c.request("not-allowed")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_up_and_free(&env, "not-allowed").await;
    let snap = c.commit("mirrored").await;
    let err = c
        .snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: format!("{}/exported:v1", env.registry.addr()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        !env.registry.log().contains("GET /v2/busybox")
            && !env.registry.log().contains("/v2/exported"),
        "the refused registry was contacted:\n{}",
        env.registry.log()
    );

    c.force_delete("mirrored").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}

// ---- a fake registry that misbehaves in one way per repository ----

/// What the fake registry answers for one `GET path`.
#[derive(Clone)]
enum Answer {
    /// Status, headers and body, whole.
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// 200 with a Content-Length of `declared`, the first `sent` bytes of `body`, then silence
    /// on an open connection.
    StallAfter { body: Vec<u8>, sent: usize },
}

/// A few lines of HTTP/1.1 on loopback answering `GET path` from a table; the connections it
/// holds open stay open until it is dropped.
struct FakeRegistry {
    addr: String,
    task: tokio::task::JoinHandle<()>,
    held: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
}

impl FakeRegistry {
    async fn start(script: impl Fn(&str, &str) -> Option<Answer> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
        let script = Arc::new(script);
        let keep = held.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (script, keep) = (script.clone(), keep.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let mut words = head.split_whitespace();
                    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let path = target.split('?').next().unwrap_or("");
                    match script(method, path) {
                        Some(Answer::Full(status, headers, body)) => {
                            let mut out = format!("HTTP/1.1 {status} Fake\r\n");
                            for (k, v) in headers {
                                out.push_str(&format!("{k}: {v}\r\n"));
                            }
                            out.push_str(&format!(
                                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            ));
                            let mut bytes = out.into_bytes();
                            bytes.extend(body);
                            let _ = conn.write_all(&bytes).await;
                        }
                        Some(Answer::StallAfter { body, sent }) => {
                            let out = format!(
                                "HTTP/1.1 200 Fake\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            );
                            let _ = conn.write_all(out.as_bytes()).await;
                            let _ = conn.write_all(&body[..sent]).await;
                            let _ = conn.flush().await;
                            keep.lock().unwrap().push(conn);
                        }
                        None => keep.lock().unwrap().push(conn),
                    }
                });
            }
        });
        FakeRegistry { addr, task, held }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
        self.held.lock().unwrap().clear();
    }
}

/// A valid image as its registry documents: manifest, config and layers by digest, and the
/// top layer (the one the fake spoils).
struct Docs {
    manifest: serde_json::Value,
    config: Vec<u8>,
    layers: HashMap<String, Vec<u8>>,
    top: Vec<u8>,
}

fn docs_of(layout: &Path) -> Docs {
    let info = common::LayoutInfo::read(layout);
    let blob = |d: &str| -> PathBuf {
        layout
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&info.manifest_digest)).unwrap()).unwrap();
    let layers: HashMap<String, Vec<u8>> = info
        .layer_digests
        .iter()
        .map(|d| (d.clone(), std::fs::read(blob(d)).unwrap()))
        .collect();
    Docs {
        manifest,
        config: std::fs::read(blob(&info.config_digest)).unwrap(),
        top: layers[info.layer_digests.last().unwrap()].clone(),
        layers,
    }
}

fn ok(content_type: &str, body: Vec<u8>) -> Answer {
    Answer::Full(
        200,
        vec![("Content-Type".into(), content_type.into())],
        body,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_registry_ends_each_pull_with_a_clear_status_and_frees_the_sandbox() {
    let layout = common::build_layout_with(&[("/hostile", &[7u8; 64 << 10][..])]);
    let docs = docs_of(&layout);
    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
    let config_digest = common::image::sha256_digest(&docs.config);
    let layer_digest = common::image::sha256_digest(&docs.top);
    let valid = serde_json::to_vec(&docs.manifest).unwrap();
    let mut huge = docs.manifest.clone();
    let top = huge["layers"].as_array().unwrap().len() - 1;
    huge["layers"][top]["size"] = json!(1u64 << 40);
    let huge = serde_json::to_vec(&huge).unwrap();
    let mut spoiled = docs.top.clone();
    let middle = spoiled.len() / 2;
    spoiled[middle] ^= 0xff;
    let layer_len = docs.top.len();

    let (config, layer, layers) = (docs.config.clone(), docs.top.clone(), docs.layers.clone());
    let fake = FakeRegistry::start(move |_method, path| {
        let (repo, rest) = path.strip_prefix("/v2/")?.split_once('/')?;
        let blob = rest.strip_prefix("blobs/");
        Some(match (repo, rest, blob) {
            // Accepts, reads the request, and never answers.
            ("stall", "manifests/t", _) => return None,
            // Answers half a layer, then nothing.
            ("stall-body", "manifests/t", _) => ok(manifest_type, valid.clone()),
            ("stall-body", _, Some(d)) if d == layer_digest => Answer::StallAfter {
                body: layer.clone(),
                sent: layer_len / 2,
            },
            // A layer of 1 TiB.
            ("huge", "manifests/t", _) => ok(manifest_type, huge.clone()),
            // A layer whose bytes are not the ones its digest names.
            ("wrong-digest", "manifests/t", _) => ok(manifest_type, valid.clone()),
            ("wrong-digest", _, Some(d)) if d == layer_digest => {
                ok("application/octet-stream", spoiled.clone())
            }
            // A token realm at the cloud metadata service.
            ("metadata-realm", _, _) => Answer::Full(
                401,
                vec![(
                    "WWW-Authenticate".into(),
                    "Bearer realm=\"http://169.254.169.254/latest/api/token\",service=\"x\"".into(),
                )],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"token please"}]}"#.to_vec(),
            ),
            (_, _, Some(d)) if d == config_digest => ok("application/json", config.clone()),
            (_, _, Some(d)) if layers.contains_key(d) => {
                ok("application/octet-stream", layers[d].clone())
            }
            _ => Answer::Full(404, Vec::new(), Vec::new()),
        })
    })
    .await;

    let env = TestEnv::with_args(&[
        "--registry-connect-timeout",
        "1s",
        "--registry-read-timeout",
        "2s",
    ])
    .await;
    let mut c = env.clients().await;
    let cases: [(&str, Code, &str); 5] = [
        ("stall", Code::Unavailable, "sent nothing"),
        ("stall-body", Code::Unavailable, "sent nothing"),
        ("huge", Code::Unavailable, "--registry-max-layer-size"),
        (
            "wrong-digest",
            Code::Unavailable,
            "does not match its digest",
        ),
        ("metadata-realm", Code::PermissionDenied, "169.254.169.254"),
    ];
    let mut outcomes = HashMap::new();
    for (repo, code, says) in cases {
        let image = format!("{}/{repo}:t", fake.addr);
        let mut request = c.request("hostile");
        request.image = image.clone();
        let err = c.try_create(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{repo}: {err}");
        assert!(err.message().contains(says), "{repo}: {err}");
        assert_up_and_free(&env, "hostile").await;
        let err = pull(&env, &image).await.unwrap_err();
        assert_eq!(err.code(), code, "{repo} via PullImage: {err}");
        outcomes.insert(repo, err.message().to_string());
    }
    assert_eq!(outcomes.len(), 5);

    // The id is free for a sandbox from a good image, and nothing half-made stayed behind
    // (the leak check lists unfinished content writes too).
    c.create_running("hostile").await;
    c.force_delete("hostile").await;
    env.leak_check().await;
}

#[test]
fn bad_registry_settings_stop_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let not_json = dir.path().join("auth.json");
    std::fs::write(&not_json, b"{\"auths\": {\"r\": {\"auth\": \"!!\"}}}").unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, b"not a certificate").unwrap();
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--registry-mirror", "docker.io"], 2, "registry_mirror"),
        (&["--registry-allow", "a b"], 2, "registry_allow"),
        (
            &["--registry-auth", not_json.to_str().unwrap()],
            1,
            "registry_auth",
        ),
        (
            &[
                "--registry-ca",
                &format!("reg.example.com={}", not_pem.display()),
            ],
            1,
            "registry_ca",
        ),
    ];
    for (args, code, setting) in cases {
        let out = std::process::Command::new(common::sandboxd::sandboxd_binary())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--embedded-containerd", "never"])
            .args(["--containerd-address", "/nonexistent/containerd.sock"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(setting), "{args:?}: {stderr}");
    }
}

// ---- a registry with bearer tokens, and the token service of a few lines it trusts ----

/// A token service on loopback: for `user:password` (Basic) it signs an RS256 JWT granting the
/// scopes asked for, with the certificate that signs it in `x5c`; anything else is 401.
struct TokenService {
    realm: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(common::host::binary("openssl"))
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl TokenService {
    async fn start(dir: &Path, issuer: &str, service: &str, user: &str, password: &str) -> Self {
        let (key, cert) = (dir.join("token.key"), dir.join("token.pem"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=token-issuer",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        let der = openssl(&["x509", "-in", cert.to_str().unwrap(), "-outform", "DER"]);
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (issuer, service, user) = (issuer.to_string(), service.to_string(), user.to_string());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let authorized = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == basic);
                let (status, body) = if authorized {
                    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                    let access: Vec<serde_json::Value> = url::form_urlencoded::parse(query.as_bytes())
                        .filter(|(k, _)| k == "scope")
                        .filter_map(|(_, scope)| {
                            let mut parts = scope.splitn(3, ':');
                            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                        })
                        .collect();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let b64 = |v: &serde_json::Value| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .encode(serde_json::to_vec(v).unwrap())
                    };
                    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
                    let claims = json!({
                        "iss": issuer, "sub": user, "aud": service, "exp": now + 600,
                        "nbf": now - 60, "iat": now, "jti": format!("t{now}"), "access": access,
                    });
                    let input = format!("{}.{}", b64(&header), b64(&claims));
                    let mut sign = std::process::Command::new(common::host::binary("openssl"))
                        .args(["dgst", "-sha256", "-sign", key.to_str().unwrap()])
                        .stdin(std::process::Stdio::piped())
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap();
                    use std::io::Write as _;
                    sign.stdin
                        .take()
                        .unwrap()
                        .write_all(input.as_bytes())
                        .unwrap();
                    let signature = sign.wait_with_output().unwrap().stdout;
                    let jwt = format!(
                        "{input}.{}",
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
                    );
                    (200, json!({"token": jwt, "expires_in": 600}).to_string())
                } else {
                    (
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad or no credentials"}]}"#
                            .to_string(),
                    )
                };
                let out = format!(
                    "HTTP/1.1 {status} Token\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(out.as_bytes()).await;
            }
        });
        TokenService { realm, task }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bearer_token_registry_pulls_and_exports_with_credentials_and_refuses_without() {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, service) = ("sandboxd-test-issuer", "sandboxd-test-registry");
    let tokens = TokenService::start(dir.path(), issuer, service, USER, PASSWORD).await;
    let registry = Registry::start_with(RegistryOptions {
        user: Some((USER.into(), PASSWORD.into())),
        tls: None,
        token: Some(common::registry::TokenAuth {
            realm: tokens.realm.clone(),
            service: service.into(),
            issuer: issuer.into(),
            root_cert: dir.path().join("token.pem"),
        }),
    });
    registry.push(&common::busybox_layout(), "team/busybox:1");
    let host = registry.addr();
    let image = format!("{host}/team/busybox:1");
    let auth = dir.path().join("config.json");
    write_auth(
        &auth,
        json!({ host.clone(): {"username": USER, "password": PASSWORD} }),
    );
    let env = TestEnv::with_args(&["--registry-auth", auth.to_str().unwrap()]).await;
    let mut c = env.clients().await;

    let mut request = c.request("bearer-1");
    request.image = image.clone();
    c.create(request).await;
    assert_eq!(c.sh_ok("bearer-1", "echo bearer").await.trim(), "bearer");
    let snap = c.commit("bearer-1").await;
    let target = format!("{host}/team/exported:v1");
    c.snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    pull(&env, &target).await.unwrap();

    // The token service refuses a wrong password, and no credentials at all.
    for auths in [
        json!({ host.clone(): {"username": USER, "password": "wrong"} }),
        json!({}),
    ] {
        write_auth(&auth, auths.clone());
        let err = pull(&env, &format!("{host}/team/busybox:2"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{auths}: {err}");
        assert!(err.message().contains("bad or no credentials"), "{err}");
        let err = c
            .snap
            .export_snapshot(pb::ExportSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                image: format!("{host}/team/exported:v2"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{auths}: {err}");
    }

    c.force_delete("bearer-1").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}

/// A tenant's own `registry_auth` (the tenants file) is used for its pulls, creates and
/// exports instead of the node's file; another tenant without one does not get it; a change
/// to the tenant's file is picked up without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_pulls_and_exports_with_its_own_credentials_and_no_one_else_does() {
    use sandboxd::cli::Credentials;
    use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
    use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;
    use sha2::Digest as _;

    let private = Registry::start_with(RegistryOptions {
        user: Some((USER.into(), PASSWORD.into())),
        tls: None,
        token: None,
    });
    private.push(&common::busybox_layout(), "team/busybox:1");
    let host = private.addr();
    let image = format!("{host}/team/busybox:1");
    let dir = tempfile::tempdir().unwrap();
    let alice_auth = dir.path().join("alice-config.json");
    write_auth(
        &alice_auth,
        json!({ host.clone(): {"username": USER, "password": "wrong"} }),
    );
    let hash = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[tenants.alice]\ntokens_sha256 = [\"{}\"]\nregistry_auth = {:?}\n\n\
             [tenants.bob]\ntokens_sha256 = [\"{}\"]\n",
            hash("alice-token"),
            alice_auth.display().to_string(),
            hash("bob-token"),
        ),
    )
    .unwrap();
    let env = TestEnv::with_args(&["--tenants", tenants.to_str().unwrap()]).await;
    let transport = |token: &str| {
        env.sandboxd.transport(&Credentials {
            token: Some(token.into()),
            tls: Default::default(),
        })
    };
    let pull_as = |token: &str| {
        let mut images = ImageServiceClient::new(transport(token));
        let image = image.clone();
        async move {
            let mut stream = images
                .pull_image(pb::PullImageRequest { image })
                .await?
                .into_inner();
            let mut last = None;
            while let Some(msg) = stream.next().await {
                last = msg?.image.or(last);
            }
            Ok::<_, tonic::Status>(last.expect("the image"))
        }
    };

    // alice's file holds a wrong password: the registry refuses her; bob has no credentials.
    let err = pull_as("alice-token").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("refused"), "{err}");
    let err = pull_as("bob-token").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Her file is fixed: picked up at her next call, no restart. A create of the private image
    // pulls it with her credentials.
    write_auth(
        &alice_auth,
        json!({ host.clone(): {"username": USER, "password": PASSWORD} }),
    );
    let mut alice = SandboxServiceClient::new(transport("alice-token"));
    alice
        .create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "alices".into(),
            image: image.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // bob still cannot: his pulls never use her credentials (nor does he see her image).
    let err = pull_as("bob-token").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let mut bob = SandboxServiceClient::new(transport("bob-token"));
    let err = bob
        .create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "bobs".into(),
            image: image.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Her export pushes with her credentials.
    let mut snaps = SnapshotServiceClient::new(transport("alice-token"));
    let snap = snaps
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "alices".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let target = format!("{host}/team/alices:v1");
    snaps
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pull_as("alice-token").await.unwrap().name, image);

    // A file that stops parsing keeps the last good version in force.
    std::fs::write(&alice_auth, b"{ not json").unwrap();
    assert_eq!(pull_as("alice-token").await.unwrap().name, image);

    alice
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: "alices".into(),
            force: true,
        })
        .await
        .unwrap();
    snaps
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await
        .unwrap();
    // bob's refused create left his id free.
    let err = bob
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "bobs".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    env.leak_check().await;
}
