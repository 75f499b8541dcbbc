//! A local docker-registry (CNCF distribution 2.8) on 127.0.0.1, and pushes into it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::host;

/// How long the registry gets to answer `GET /v2/`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with a fresh port when another process grabbed ours first.
const PORT_ATTEMPTS: usize = 5;
/// Per-request timeout of the readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A registry serving plain HTTP on a free loopback port, storing blobs in a temp dir.
/// Drop kills it and removes the storage.
pub struct Registry {
    child: Child,
    addr: String,
    dir: Option<TempDir>,
    options: RegistryOptions,
}

/// How a [`Registry`] guards itself.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// The one user, whose credentials `push` sends: an htpasswd user (bcrypt, as `htpasswd
    /// -B` makes it, Basic auth for every request), or with `token` the account the token
    /// service knows.
    pub user: Option<(String, String)>,
    /// Serve TLS with this certificate and key (PEM) instead of plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Bearer tokens instead: issued at a realm, signed by a certificate the registry trusts.
    pub token: Option<TokenAuth>,
}

/// The registry's `auth: token` settings: where clients get tokens, and whom it trusts.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// URL clients fetch tokens from.
    pub realm: String,
    /// The `service` (token audience).
    pub service: String,
    /// The `iss` tokens carry.
    pub issuer: String,
    /// PEM certificate(s) token signatures chain to.
    pub root_cert: PathBuf,
}

impl Registry {
    /// Where the registry keeps blob `digest` ("sha256:<hex>") on disk: tests corrupt it there.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let dir = self.dir.as_ref().expect("registry dir present");
        dir.path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Starts docker-registry and waits until `GET /v2/` answers 200.
    ///
    /// Panics with the registry's log if it cannot start within 20 s.
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    /// Like [`Registry::start`], with htpasswd auth and/or TLS.
    pub fn start_with(options: RegistryOptions) -> Registry {
        host::require_prerequisites();
        let mut dir = tempfile::Builder::new()
            .prefix("sandboxd-registry-")
            .tempdir()
            .expect("create registry temp dir");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            fs::write(&config, config_yaml(dir.path(), &addr, &options))
                .expect("write registry config.yml");
            let log_path = dir.path().join("registry.log");
            let log = File::create(&log_path).expect("create registry log");
            let child = Command::new(host::binary("docker-registry"))
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone registry log handle"))
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let mut registry = Registry {
                child,
                addr,
                dir: Some(dir),
                options: options.clone(),
            };
            match registry.wait_ready() {
                Ok(()) => return registry,
                Err(log) if log.contains("address already in use") => {
                    // Someone took the port between our probe and the registry's bind.
                    dir = registry.dir.take().expect("registry dir present");
                }
                Err(log) => panic!("docker-registry did not start; log:\n{log}"),
            }
        }
        panic!("docker-registry: no free port after {PORT_ATTEMPTS} attempts");
    }

    /// `127.0.0.1:PORT`, the registry host for image references.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        match &self.dir {
            Some(dir) => host::log_tail(&dir.path().join("registry.log"), 64 * 1024),
            None => String::new(),
        }
    }

    /// Pushes the OCI layout at `layout` (tag [`super::image::LAYOUT_TAG`]) as `name_tag`
    /// (like `busybox:latest`) with skopeo; panics with skopeo's stderr on failure.
    pub fn push(&self, layout: &Path, name_tag: &str) {
        let source = format!("oci:{}:{}", layout.display(), super::image::LAYOUT_TAG);
        let dest = format!("docker://{}/{name_tag}", self.addr);
        let mut command = Command::new(host::binary("skopeo"));
        command.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.options.user {
            command.arg(format!("--dest-creds={user}:{password}"));
        }
        let out = command
            .arg(&source)
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .expect("spawn skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {source} {dest} failed ({}):\n{}\nregistry log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Polls `GET /v2/` until 200; on failure returns the log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr: SocketAddr = self.addr.parse().expect("registry address parses");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            let ready = if self.options.tls.is_some() {
                // No TLS client here: the registry says when it listens.
                self.log().contains("listening on")
                    && TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
            } else {
                // 401: up, and asking for the credentials it was told to.
                http_get_status(addr, "/v2/").is_some_and(|code| code == 200 || code == 401)
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "(no 200 on /v2/ within {STARTUP_TIMEOUT:?})\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(host::POLL_INTERVAL);
        }
    }

    fn stop(&mut self) {
        // Errors only mean it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            host::remove_fixture_dir(dir);
        }
    }
}

/// A loopback port that was free a moment ago (the caller retries if it is taken meanwhile).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// The status code of an HTTP/1.0 `GET path` to `addr`, or None if there is no answer.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let status_line = String::from_utf8_lossy(&response);
    let mut parts = status_line.lines().next()?.split_whitespace();
    let _version = parts.next()?;
    parts.next()?.parse().ok()
}

fn config_yaml(dir: &Path, addr: &str, options: &RegistryOptions) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        storage = dir.join("storage").display(),
    );
    if let Some((cert, key)) = &options.tls {
        yaml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    if let (Some((user, password)), None) = (&options.user, &options.token) {
        let htpasswd = dir.join("htpasswd");
        let out = Command::new(host::binary("htpasswd"))
            .args(["-Bbn", user, password])
            .output()
            .expect("run htpasswd (apache2-utils)");
        assert!(
            out.status.success(),
            "htpasswd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: sandboxd-test\n    path: {}\n",
            htpasswd.display()
        ));
    }
    if let Some(token) = &options.token {
        yaml.push_str(&format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
             rootcertbundle: {}\n",
            token.realm,
            token.service,
            token.issuer,
            token.root_cert.display()
        ));
    }
    yaml.push_str("health:\n  storagedriver:\n    enabled: false\n");
    yaml
}
