//! Registries as users have them: credentials from a Docker `config.json`, mirrors, private
//! CAs, plain-HTTP hosts, an allow-list, and a client that trusts no registry further than it
//! must (timeouts on every wait, bounded reads, checked token realms; see `guard`).
//!
//! [`Registries`] is built once from the settings; each pull or push asks it for an
//! [`Access`] (whose credentials a tenant may override) and from that for a `Session` per
//! registry endpoint and repository, which carries the authorization it negotiated.

mod auth;
mod guard;
mod session;
mod settings;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

pub use auth::{AuthFile, Credential};
pub(super) use session::{declared_length, BlobBody, Session};
pub use settings::{
    is_loopback_host, normalize_host, parse_host_file, parse_mirror, Mirror, RegistrySettings,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_LAYER_SIZE, DEFAULT_READ_TIMEOUT, DOCKER_HUB,
};

use crate::error::{Error, Result};
use crate::watched::{Reload, Watched};
use settings::{url_host, DOCKER_HUB_API};

/// What a session does at a repository: the scope its token asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Actions {
    Pull,
    Push,
}

/// One place sandboxd sends a repository's requests to: a registry host or one of its mirrors.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// `scheme://host[:port][/base]`, without a trailing slash.
    pub base: reqwest::Url,
    /// `host[:port]` of `base` in normal form: the key of its credentials and CA.
    pub host: String,
    /// Whether the endpoint is on this machine's loopback.
    pub loopback: bool,
    /// Whether it is a mirror (a failure there falls through to the next endpoint).
    pub mirror: bool,
}

/// The registry settings in force, with an HTTP client per CA setup.
pub struct Registries {
    settings: RegistrySettings,
    auth: Option<Watched<AuthFile>>,
    client: reqwest::Client,
    /// Clients of hosts with a `--registry-ca` of their own.
    ca_clients: HashMap<String, reqwest::Client>,
    /// Tenants' own credentials files (the tenants file's `registry_auth`), by path: what was
    /// last read and the file's modification time and size then.
    tenant_files: std::sync::Mutex<HashMap<std::path::PathBuf, TenantFile>>,
}

/// A tenant's credentials file as last read.
struct TenantFile {
    stamp: (std::time::SystemTime, u64),
    auth: Arc<AuthFile>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Registries {
    /// Reads the auth file and the CA files; the error names the file or setting at fault.
    pub fn new(settings: RegistrySettings) -> std::result::Result<Registries, String> {
        let auth = match &settings.auth_file {
            None => None,
            Some(path) => {
                let shown = path.display().to_string();
                let parse: crate::watched::Parse<AuthFile> = Box::new(move |files| {
                    AuthFile::parse(&files[0]).map_err(|e| format!("{shown}: {e}"))
                });
                Some(
                    Watched::load(vec![path.clone()], parse)
                        .map_err(|e| format!("registry_auth: {e}"))?,
                )
            }
        };
        let client = session::build_client(&settings, Vec::new())
            .map_err(|e| format!("registry client: {e}"))?;
        let mut cas: HashMap<String, Vec<reqwest::Certificate>> = HashMap::new();
        for (host, path) in &settings.cas {
            let pem = std::fs::read(path)
                .map_err(|e| format!("registry_ca: cannot read {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("registry_ca: {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "registry_ca: {} holds no PEM certificate",
                    path.display()
                ));
            }
            cas.entry(host.clone()).or_default().extend(certs);
        }
        let mut ca_clients = HashMap::new();
        for (host, certs) in cas {
            let client = session::build_client(&settings, certs)
                .map_err(|e| format!("registry_ca for {host}: {e}"))?;
            ca_clients.insert(host, client);
        }
        Ok(Registries {
            settings,
            auth,
            client,
            ca_clients,
            tenant_files: Default::default(),
        })
    }

    /// Anonymous access with default settings (tests, tools).
    pub fn anonymous() -> Arc<Registries> {
        Arc::new(Registries::new(RegistrySettings::default()).expect("defaults are valid"))
    }

    /// The settings in force.
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    /// A tenant's own credentials file (`path`, from the tenants file), read again whenever
    /// it changed since it was last read. A version that does not parse is logged and the
    /// last good one stays in force; one never read successfully fails the call with
    /// FAILED_PRECONDITION naming the file (never the credentials).
    pub fn tenant_auth(&self, path: Option<&std::path::Path>) -> Result<Option<Arc<AuthFile>>> {
        let Some(path) = path else { return Ok(None) };
        let stamp = std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        let mut files = self.tenant_files.lock().unwrap_or_else(|e| e.into_inner());
        let known = files.get(path);
        if let (Some(k), Some(s)) = (known, stamp) {
            if k.stamp == s {
                return Ok(Some(k.auth.clone()));
            }
        }
        let read = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| AuthFile::parse(&bytes));
        match (read, stamp) {
            (Ok(auth), Some(stamp)) => {
                let auth = Arc::new(auth);
                files.insert(
                    path.to_path_buf(),
                    TenantFile {
                        stamp,
                        auth: auth.clone(),
                    },
                );
                Ok(Some(auth))
            }
            (Ok(auth), None) => Ok(Some(Arc::new(auth))),
            (Err(e), _) => match files.get(path) {
                Some(k) => {
                    tracing::warn!(file = %path.display(), error = %e, "a tenant's registry_auth file does not read; the last good version stays in force");
                    Ok(Some(k.auth.clone()))
                }
                None => Err(Error::FailedPrecondition(format!(
                    "the tenant's registry_auth file {} cannot be used: {e}",
                    path.display()
                ))),
            },
        }
    }

    /// Access for one operation. `tenant_auth`, when given, replaces the node's auth file (a
    /// tenant's own `registry_auth`).
    pub fn access(self: &Arc<Self>, tenant_auth: Option<Arc<AuthFile>>) -> Access {
        Access {
            registries: self.clone(),
            tenant_auth,
        }
    }

    /// The one lookup of credentials for registry `host`: a tenant's file when the caller has
    /// one, else the node's `--registry-auth`.
    pub fn credential(&self, host: &str, tenant: Option<&AuthFile>) -> Option<Credential> {
        match tenant {
            Some(file) => file.get(host).cloned(),
            None => self
                .auth
                .as_ref()
                .and_then(|w| w.current().get(host).cloned()),
        }
    }

    /// Reads the auth file again if it changed; a version that does not parse is logged and
    /// the last good one stays in force.
    async fn refresh_auth(self: &Arc<Self>) {
        if self.auth.is_none() {
            return;
        }
        let this = self.clone();
        let reload = tokio::task::spawn_blocking(move || match &this.auth {
            Some(w) => w.reload(),
            None => Reload::Unchanged,
        })
        .await;
        match reload {
            Ok(Reload::Unchanged) => {}
            Ok(Reload::Reloaded) => tracing::info!("registry auth file reloaded"),
            Ok(Reload::Rejected(why)) => {
                tracing::warn!(%why, "registry auth file not reloaded; the last good one stays")
            }
            Err(e) => tracing::warn!(error = %e, "registry auth file reload failed"),
        }
    }

    fn client_for(&self, host: &str) -> &reqwest::Client {
        self.ca_clients.get(host).unwrap_or(&self.client)
    }

    /// PERMISSION_DENIED unless `host` is on the allow-list (or there is none).
    fn check_allowed(&self, host: &str, what: &str) -> Result<()> {
        match &self.settings.allow {
            Some(allow) if !allow.iter().any(|h| h == host) => {
                Err(Error::PermissionDenied(format!(
                    "{what}: registry {host} is not in --registry-allow ({})",
                    allow.join(",")
                )))
            }
            _ => Ok(()),
        }
    }

    /// The endpoint of registry `host` itself.
    fn host_endpoint(&self, host: &str) -> Result<Endpoint> {
        let loopback = is_loopback_host(host);
        // Loopback speaks plain HTTP, as Docker and containerd assume, unless a CA is given
        // for it: then it is a TLS registry like any other.
        let plain = (loopback && !self.ca_clients.contains_key(host))
            || self.settings.insecure.iter().any(|h| h == host);
        let api = if host == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            host
        };
        let scheme = if plain { "http" } else { "https" };
        let base = reqwest::Url::parse(&format!("{scheme}://{api}")).map_err(|e| {
            Error::invalid(
                "image",
                format!("registry {host:?} is not a host to reach: {e}"),
            )
        })?;
        Ok(Endpoint {
            base,
            host: host.to_string(),
            loopback,
            mirror: false,
        })
    }
}

/// What one operation may use: the registries, and whose credentials.
#[derive(Clone, Debug)]
pub struct Access {
    registries: Arc<Registries>,
    tenant_auth: Option<Arc<AuthFile>>,
}

impl Access {
    /// Where pulls of `host`'s images go, in order: its mirrors, then the host itself.
    /// PERMISSION_DENIED, before any connection, when the host is not allowed.
    pub(super) async fn pull_endpoints(&self, host: &str, what: &str) -> Result<Vec<Endpoint>> {
        let host = normalize_host(host).map_err(|e| Error::invalid("image", e))?;
        self.registries.check_allowed(&host, what)?;
        self.registries.refresh_auth().await;
        let mut out: Vec<Endpoint> = self
            .registries
            .settings
            .mirrors
            .iter()
            .filter(|m| m.host == host)
            .map(|m| {
                let mirror_host = url_host(&m.url);
                Endpoint {
                    loopback: is_loopback_host(&mirror_host),
                    base: m.url.clone(),
                    host: mirror_host,
                    mirror: true,
                }
            })
            .collect();
        out.push(self.registries.host_endpoint(&host)?);
        Ok(out)
    }

    /// Where a push to `host` goes (never a mirror); PERMISSION_DENIED when not allowed.
    pub(super) async fn push_endpoint(&self, host: &str, what: &str) -> Result<Endpoint> {
        let host = normalize_host(host).map_err(|e| Error::invalid("image", e))?;
        self.registries.check_allowed(&host, what)?;
        self.registries.refresh_auth().await;
        self.registries.host_endpoint(&host)
    }

    /// A session at `repository` of `endpoint`, with the credentials of its host.
    pub(super) fn session(
        &self,
        endpoint: Endpoint,
        repository: &str,
        actions: Actions,
        what: String,
    ) -> Session {
        let credential = self
            .registries
            .credential(&endpoint.host, self.tenant_auth.as_deref());
        Session::new(
            self.registries.client_for(&endpoint.host).clone(),
            &self.registries.settings,
            endpoint,
            repository,
            actions,
            credential,
            what,
        )
    }

    /// Largest layer a manifest may declare.
    pub(super) fn max_layer_size(&self) -> u64 {
        self.registries.settings.max_layer_size
    }
}
