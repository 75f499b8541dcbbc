//! A CNI runtime (spec 1.0): runs the plugins of a network configuration list against a
//! network namespace and reads their results.
//!
//! Plugins are executables found in the plugin directories by their `type`; each gets its
//! command in `CNI_*` environment variables and its configuration on stdin, with `name`,
//! `cniVersion`, `prevResult` and the `runtimeConfig` it asked for injected.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

/// The CNI spec version we speak. Debian's plugins (1.1.1) accept it.
pub const CNI_VERSION: &str = "1.0.0";
/// How long one plugin invocation may run before it is killed and reported as failed.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Where plugins are looked up unless configured: Debian's package, then the upstream tarball's.
pub const DEFAULT_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// The interface name of a sandbox's network attachment.
pub const DEFAULT_IFNAME: &str = "eth0";
/// The network name of the default bridge configuration.
pub const DEFAULT_NETWORK_NAME: &str = "sandboxd";
/// The host bridge of the default configuration.
pub const DEFAULT_BRIDGE: &str = "sandboxd0";
/// The sandbox subnet of the default configuration, away from Docker's and CNI's usual ranges.
pub const DEFAULT_SUBNET: &str = "10.213.0.0/16";
/// Stdout kept from a plugin: results and errors are small JSON documents.
const MAX_PLUGIN_OUTPUT: usize = 1 << 20;
/// Linux's limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// Everything that can go wrong running CNI plugins.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The network configuration list is malformed.
    #[error("invalid CNI network configuration: {0}")]
    InvalidConfig(String),

    /// An attachment parameter is malformed; `field` names it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// No executable for the plugin's `type` exists in the plugin directories.
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },

    /// The plugin reported an error (a CNI error object, or a non-zero exit with text).
    #[error("CNI plugin {plugin:?} failed on {command}{}: {msg}{}",
        .code.map(|c| format!(" (code {c})")).unwrap_or_default(),
        if .details.is_empty() { String::new() } else { format!(" ({})", .details) })]
    PluginFailed {
        plugin: String,
        command: Command,
        /// The CNI error code, absent when the plugin printed no error object.
        code: Option<u64>,
        msg: String,
        details: String,
    },

    /// The plugin ran longer than the runner's timeout and was killed.
    #[error("CNI plugin {plugin:?} did not finish {command} within {timeout:?}")]
    Timeout {
        plugin: String,
        command: Command,
        timeout: Duration,
    },

    /// The plugin succeeded but its result is not a CNI result.
    #[error("CNI plugin {plugin:?} returned an unreadable {command} result: {reason}")]
    BadResult {
        plugin: String,
        command: Command,
        reason: String,
    },

    /// Starting or talking to the plugin process failed.
    #[error("running CNI plugin {plugin:?}: {source}")]
    Io {
        plugin: String,
        #[source]
        source: std::io::Error,
    },

    /// An ADD failed and so did the DEL that undoes it: both are reported.
    #[error("{error}; cleanup also failed: {cleanup}")]
    CleanupFailed {
        #[source]
        error: Box<CniError>,
        cleanup: Box<CniError>,
    },
}

/// The CNI operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed network configuration list: its name, version and plugin configurations.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    name: String,
    cni_version: String,
    disable_check: bool,
    plugins: Vec<Map<String, Value>>,
}

impl NetworkConfigList {
    /// Parses a conflist document; each plugin needs a string `type`.
    pub fn from_json(text: &[u8]) -> Result<Self, CniError> {
        let doc: Value = serde_json::from_slice(text)
            .map_err(|e| CniError::InvalidConfig(format!("not JSON: {e}")))?;
        Self::from_value(doc)
    }

    /// Reads and parses a conflist file.
    pub async fn load(path: &Path) -> Result<Self, CniError> {
        let text = tokio::fs::read(path)
            .await
            .map_err(|e| CniError::InvalidConfig(format!("reading {}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    fn from_value(doc: Value) -> Result<Self, CniError> {
        let invalid = |m: &str| CniError::InvalidConfig(m.to_string());
        let Value::Object(mut doc) = doc else {
            return Err(invalid("the conflist is not a JSON object"));
        };
        let name = match doc.remove("name") {
            Some(Value::String(n)) if !n.is_empty() => n,
            _ => return Err(invalid("\"name\" must be a non-empty string")),
        };
        let cni_version = match doc.remove("cniVersion") {
            Some(Value::String(v)) if !v.is_empty() => v,
            _ => return Err(invalid("\"cniVersion\" must be a non-empty string")),
        };
        let disable_check = matches!(doc.get("disableCheck"), Some(Value::Bool(true)));
        let plugins = match doc.remove("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p,
            _ => return Err(invalid("\"plugins\" must be a non-empty array")),
        };
        let plugins = plugins
            .into_iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::Object(p) if matches!(p.get("type"), Some(Value::String(t)) if !t.is_empty() && !t.contains('/')) => Ok(p),
                _ => Err(CniError::InvalidConfig(format!(
                    "plugins[{i}] must be an object with a plain \"type\" name"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CNI version the plugins are asked to speak.
    pub fn cni_version(&self) -> &str {
        &self.cni_version
    }

    /// The host bridge of the list's `bridge` plugin (the plugin's default, `cni0`, when it
    /// names none); `None` without a bridge plugin.
    pub fn bridge_name(&self) -> Option<&str> {
        self.plugins
            .iter()
            .find(|p| plugin_type(p) == "bridge")
            .map(|p| p.get("bridge").and_then(Value::as_str).unwrap_or("cni0"))
    }

    /// The plugin types in invocation order.
    pub fn plugin_types(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().map(plugin_type)
    }

    /// The conflist as a JSON document (for writing it to disk or logging it).
    pub fn to_json(&self) -> Value {
        json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        })
    }
}

fn plugin_type(p: &Map<String, Value>) -> &str {
    p.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// The default BRIDGE-mode network: a bridge with host-local IPAM, port mappings and loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNetwork {
    /// The network name (also names the masquerade chains and the IPAM store).
    pub name: String,
    /// The host bridge.
    pub bridge: String,
    /// The sandbox subnet (CIDR); the bridge gets its first address as the gateway.
    pub subnet: String,
    /// Where host-local keeps its allocations; the plugin's default (/var/lib/cni/networks) if
    /// `None`.
    pub ipam_data_dir: Option<PathBuf>,
}

impl Default for BridgeNetwork {
    fn default() -> Self {
        BridgeNetwork {
            name: DEFAULT_NETWORK_NAME.into(),
            bridge: DEFAULT_BRIDGE.into(),
            subnet: DEFAULT_SUBNET.into(),
            ipam_data_dir: None,
        }
    }
}

impl BridgeNetwork {
    /// The configuration list: bridge (+ host-local), portmap, loopback.
    pub fn conflist(&self) -> NetworkConfigList {
        let mut ipam = json!({
            "type": "host-local",
            "ranges": [[{ "subnet": self.subnet }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
        });
        if let Some(dir) = &self.ipam_data_dir {
            ipam["dataDir"] = json!(dir);
        }
        let doc = json!({
            "cniVersion": CNI_VERSION,
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": ipam,
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                // Last, because it passes its prevResult through unchanged.
                { "type": "loopback" },
            ],
        });
        NetworkConfigList::from_value(doc).expect("the built-in bridge conflist is valid")
    }
}

/// One attachment of a network to a namespace: what the spec calls (container ID, netns, ifname).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    container_id: String,
    netns: PathBuf,
    ifname: String,
}

impl Attachment {
    /// The same attachment with no namespace, for a DEL after the namespace is gone (the CNI
    /// spec lets DEL run without one; plugins then release only what lives outside it).
    pub fn without_netns(self) -> Self {
        Attachment {
            netns: PathBuf::new(),
            ..self
        }
    }

    /// Validates the container ID (alphanumerics, `_`, `.`, `-`; alphanumeric first) and the
    /// interface name (at most 15 bytes, no `/`, `:` or whitespace).
    pub fn new(
        container_id: impl Into<String>,
        netns: impl Into<PathBuf>,
        ifname: impl Into<String>,
    ) -> Result<Self, CniError> {
        let container_id = container_id.into();
        let ifname = ifname.into();
        let id_ok = container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !id_ok {
            return Err(CniError::InvalidArgument {
                field: "container id",
                reason: format!("{container_id:?} is not a valid CNI container ID"),
            });
        }
        if ifname.is_empty()
            || ifname.len() > MAX_IFNAME_LEN
            || ifname == "."
            || ifname == ".."
            || ifname.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(CniError::InvalidArgument {
                field: "interface name",
                reason: format!("{ifname:?} is not a valid interface name"),
            });
        }
        Ok(Attachment {
            container_id,
            netns: netns.into(),
            ifname,
        })
    }
}

/// Per-invocation data for plugins that declare the matching capability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Host ports forwarded into the sandbox (the `portMappings` capability).
    pub port_mappings: Vec<PortMapping>,
}

impl RuntimeConfig {
    /// The `runtimeConfig` object for a plugin with `capabilities`, or `None` when it asks for
    /// nothing we have.
    fn for_plugin(&self, capabilities: Option<&Value>) -> Option<Value> {
        let wants = |cap: &str| {
            capabilities
                .and_then(|c| c.get(cap))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let mut rc = Map::new();
        if wants("portMappings") && !self.port_mappings.is_empty() {
            rc.insert("portMappings".into(), json!(self.port_mappings));
        }
        (!rc.is_empty()).then_some(Value::Object(rc))
    }
}

/// A host port forwarded to a port of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// Bind only this host address; all when `None`.
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// The final result of an ADD.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    /// The interfaces the plugins created or touched.
    pub interfaces: Vec<Interface>,
    /// The addresses assigned.
    pub ips: Vec<IpConfig>,
    /// The result document as the last plugin printed it: cache it, DEL and CHECK need it.
    pub raw: Value,
}

/// An interface in a CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    /// The namespace path for interfaces inside the sandbox; `None` for host-side ones.
    pub sandbox: Option<String>,
}

/// An address in a CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    pub interface: Option<usize>,
}

impl CniResult {
    /// The first address on an interface inside the sandbox namespace, if any.
    pub fn sandbox_ip(&self) -> Option<&IpConfig> {
        self.ips.iter().find(|ip| {
            ip.interface
                .and_then(|i| self.interfaces.get(i))
                .is_some_and(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        })
    }

    /// A result as plugins print it (CNI spec), e.g. one cached from an earlier ADD.
    pub fn parse(raw: Value) -> Result<Self, String> {
        let interfaces = match raw.get("interfaces") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|i| {
                    let s = |k: &str| i.get(k).and_then(Value::as_str).map(str::to_owned);
                    Ok(Interface {
                        name: s("name").ok_or("an interface has no name")?,
                        mac: s("mac"),
                        sandbox: s("sandbox"),
                    })
                })
                .collect::<Result<_, String>>()?,
            Some(_) => return Err("\"interfaces\" is not an array".into()),
        };
        let ips = match raw.get("ips") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|ip| {
                    let cidr = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .ok_or("an ip has no address")?;
                    let (address, prefix_len) = parse_cidr(cidr)?;
                    let gateway = match ip.get("gateway").and_then(Value::as_str) {
                        Some(g) => Some(
                            g.parse()
                                .map_err(|_| format!("gateway {g:?} is not an address"))?,
                        ),
                        None => None,
                    };
                    let interface = ip
                        .get("interface")
                        .and_then(Value::as_u64)
                        .and_then(|i| usize::try_from(i).ok());
                    Ok(IpConfig {
                        address,
                        prefix_len,
                        gateway,
                        interface,
                    })
                })
                .collect::<Result<_, String>>()?,
            Some(_) => return Err("\"ips\" is not an array".into()),
        };
        Ok(CniResult {
            interfaces,
            ips,
            raw,
        })
    }
}

/// Parses `ADDRESS/PREFIX`.
fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{cidr:?} is not ADDRESS/PREFIX");
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((addr, len))
}

/// Runs CNI plugins from a set of plugin directories.
#[derive(Debug, Clone)]
pub struct CniRunner {
    plugin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl Default for CniRunner {
    fn default() -> Self {
        CniRunner::new(DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect())
    }
}

impl CniRunner {
    /// A runner looking plugins up in `plugin_dirs`, in order.
    pub fn new(plugin_dirs: Vec<PathBuf>) -> Self {
        CniRunner {
            plugin_dirs,
            timeout: PLUGIN_TIMEOUT,
        }
    }

    /// Replaces [`PLUGIN_TIMEOUT`] for each plugin invocation.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attaches `net` to the attachment's namespace: ADD through every plugin in order, each
    /// seeing the previous one's result. On failure the plugins that ran are deleted again
    /// (in reverse order) before the error is returned.
    pub async fn add(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        rc: &RuntimeConfig,
    ) -> Result<CniResult, CniError> {
        let (ran, error) = match self.add_chain(net, att, rc).await {
            Ok(result) => return Ok(result),
            Err(failure) => failure,
        };
        let undo = self
            .del_plugins(net, &net.plugins[..ran], att, rc, None)
            .await;
        Err(match undo {
            Ok(()) => error,
            Err(cleanup) => CniError::CleanupFailed {
                error: Box::new(error),
                cleanup: Box::new(cleanup),
            },
        })
    }

    /// ADD through the chain; on failure also says how many plugins ran (and need a DEL).
    async fn add_chain(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        rc: &RuntimeConfig,
    ) -> Result<CniResult, (usize, CniError)> {
        let mut prev: Option<Value> = None;
        for (i, plugin) in net.plugins.iter().enumerate() {
            let bad_result = |reason: String| CniError::BadResult {
                plugin: plugin_type(plugin).into(),
                command: Command::Add,
                reason,
            };
            let out = match self
                .invoke(Command::Add, net, plugin, att, rc, prev.as_ref())
                .await
            {
                Ok(out) => out,
                // One that could not be found never ran.
                Err(e @ CniError::PluginNotFound { .. }) => return Err((i, e)),
                // DEL must tolerate what was never made, so a plugin that failed is included.
                Err(e) => return Err((i + 1, e)),
            };
            let result: Value = serde_json::from_slice(&out)
                .map_err(|e| (i + 1, bad_result(format!("not JSON: {e}"))))?;
            if i + 1 == net.plugins.len() {
                return CniResult::parse(result).map_err(|reason| (i + 1, bad_result(reason)));
            }
            prev = Some(result);
        }
        unreachable!("a conflist has at least one plugin")
    }

    /// Detaches `net`: DEL through every plugin in reverse order, each given `cached` (the raw
    /// result of the ADD, when the caller kept it) as `prevResult`. Safe to repeat, and safe
    /// after the namespace is gone, as far as the plugins honour the spec.
    pub async fn del(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        rc: &RuntimeConfig,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        self.del_plugins(net, &net.plugins, att, rc, cached).await
    }

    /// Verifies the attachment is as ADD left it: CHECK through every plugin in order with the
    /// cached ADD result. Does nothing when the conflist sets `disableCheck`.
    pub async fn check(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        rc: &RuntimeConfig,
        cached: &Value,
    ) -> Result<(), CniError> {
        if net.disable_check {
            return Ok(());
        }
        for plugin in &net.plugins {
            self.invoke(Command::Check, net, plugin, att, rc, Some(cached))
                .await?;
        }
        Ok(())
    }

    async fn del_plugins(
        &self,
        net: &NetworkConfigList,
        plugins: &[Map<String, Value>],
        att: &Attachment,
        rc: &RuntimeConfig,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        // Every plugin gets its DEL even when one fails, so one stuck plugin does not leak the
        // others' resources; the first error is reported.
        let mut first_err = None;
        for plugin in plugins.iter().rev() {
            if let Err(e) = self
                .invoke(Command::Del, net, plugin, att, rc, cached)
                .await
            {
                tracing::warn!(error = %e, "CNI DEL failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The configuration one plugin reads on stdin.
    fn plugin_stdin(
        net: &NetworkConfigList,
        plugin: &Map<String, Value>,
        rc: &RuntimeConfig,
        prev: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.clone();
        conf.insert("name".into(), json!(net.name));
        conf.insert("cniVersion".into(), json!(net.cni_version));
        conf.remove("runtimeConfig");
        if let Some(rc) = rc.for_plugin(plugin.get("capabilities")) {
            conf.insert("runtimeConfig".into(), rc);
        }
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        Value::Object(conf)
    }

    fn find_plugin(&self, name: &str) -> Result<PathBuf, CniError> {
        self.plugin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: name.into(),
                dirs: self
                    .plugin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            })
    }

    /// Runs one plugin and returns its stdout on success.
    async fn invoke(
        &self,
        command: Command,
        net: &NetworkConfigList,
        plugin: &Map<String, Value>,
        att: &Attachment,
        rc: &RuntimeConfig,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>, CniError> {
        let name = plugin_type(plugin).to_owned();
        let exe = self.find_plugin(&name)?;
        let stdin = serde_json::to_vec(&Self::plugin_stdin(net, plugin, rc, prev))
            .expect("a JSON value serializes");
        let cni_path = std::env::join_paths(&self.plugin_dirs).map_err(|e| {
            CniError::InvalidConfig(format!("plugin directories cannot form CNI_PATH: {e}"))
        })?;
        let io_err = |source| CniError::Io {
            plugin: name.clone(),
            source,
        };
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&exe)
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err)?;
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let write = async move {
            pipe.write_all(&stdin).await?;
            pipe.shutdown().await
        };
        let run = async { tokio::join!(write, child.wait_with_output()) };
        let (written, output) = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            // Dropping the future drops the child, and kill_on_drop kills it.
            Err(_) => {
                return Err(CniError::Timeout {
                    plugin: name,
                    command,
                    timeout: self.timeout,
                })
            }
        };
        let output = output.map_err(io_err)?;
        tracing::debug!(plugin = %name, %command, elapsed = ?started.elapsed(), status = %output.status, "CNI plugin ran");
        let mut stdout = output.stdout;
        stdout.truncate(MAX_PLUGIN_OUTPUT);
        let error_object = serde_json::from_slice::<Value>(&stdout)
            .ok()
            .filter(|v| v.get("code").is_some() && v.get("msg").is_some());
        if let Some(err) = error_object {
            return Err(CniError::PluginFailed {
                plugin: name,
                command,
                code: err.get("code").and_then(Value::as_u64),
                msg: err["msg"].as_str().unwrap_or_default().to_owned(),
                details: err
                    .get("details")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let text = String::from_utf8_lossy(&stdout);
            let msg = [stderr.trim(), text.trim()]
                .into_iter()
                .find(|t| !t.is_empty())
                .map_or_else(|| format!("exited with {}", output.status), str::to_owned);
            return Err(CniError::PluginFailed {
                plugin: name,
                command,
                code: None,
                msg,
                details: String::new(),
            });
        }
        // A plugin may succeed without reading all of its stdin; only other write errors count.
        match written {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(io_err(e)),
            _ => {}
        }
        Ok(stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Results as hostile or broken plugins might print them: every one parses or is refused
    /// with a reason, and reading the sandbox's address never panics.
    #[test]
    fn any_result_json_parses_or_is_refused_without_panicking() {
        let values = [
            serde_json::json!(null),
            serde_json::json!(7),
            serde_json::json!(-1),
            serde_json::json!(u64::MAX),
            serde_json::json!("10.0.0.2/24"),
            serde_json::json!("10.0.0.2/99"),
            serde_json::json!("::1/200"),
            serde_json::json!("10.0.0.2"),
            serde_json::json!("/"),
            serde_json::json!(""),
            serde_json::json!("1.2.3.4/-1"),
            serde_json::json!("é/é"),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!([{"name": "eth0", "sandbox": "/proc/1/ns/net"}]),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut pick = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..2000 {
            let mut ip = serde_json::Map::new();
            for key in ["address", "gateway", "interface"] {
                if pick(3) != 0 {
                    ip.insert(key.into(), values[pick(values.len())].clone());
                }
            }
            let ips = match pick(4) {
                0 => values[pick(values.len())].clone(),
                _ => serde_json::Value::Array(vec![serde_json::Value::Object(ip)]),
            };
            let raw = serde_json::json!({
                "interfaces": values[pick(values.len())].clone(),
                "ips": ips,
            });
            if let Ok(result) = CniResult::parse(raw) {
                let _ = result.sandbox_ip();
            }
        }
    }

    /// Writes an executable shell plugin that logs its command and stdin to `log`, then runs
    /// `body`.
    fn fake_plugin(dir: &Path, name: &str, body: &str) {
        let log = dir.join("calls.log");
        let script = format!(
            "#!/bin/sh\nin=$(cat)\nprintf '%s %s %s %s %s\\n' {name} \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_IFNAME\" \"$CNI_PATH\" >> {log}\nprintf '%s\\n' \"$in\" > {dir}/{name}.$CNI_COMMAND.stdin\n{body}\n",
            log = log.display(),
            dir = dir.display(),
        );
        let path = dir.join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn stdin_of(dir: &Path, name: &str, cmd: &str) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.{cmd}.stdin"))).unwrap(),
        )
        .unwrap()
    }

    fn calls(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }

    const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"br0","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","mac":"11:22:33:44:55:66","sandbox":"/run/netns/x"}],"ips":[{"address":"10.9.0.2/24","gateway":"10.9.0.1","interface":1}]}"#;

    fn conflist(types: &[&str]) -> NetworkConfigList {
        let plugins: Vec<Value> = types
            .iter()
            .map(|t| json!({"type": t, "capabilities": {"portMappings": *t == "second"}}))
            .collect();
        NetworkConfigList::from_value(
            json!({"cniVersion": "1.0.0", "name": "testnet", "plugins": plugins}),
        )
        .unwrap()
    }

    fn attachment() -> Attachment {
        Attachment::new("sbx-1", "/run/netns/x", "eth0").unwrap()
    }

    #[tokio::test]
    async fn add_chains_prev_results_and_injects_name_version_and_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake_plugin(d, "first", &format!("echo '{RESULT}'"));
        // The final result is the last plugin's, whatever earlier ones printed.
        fake_plugin(
            d,
            "second",
            &format!("echo '{}'", RESULT.replace("10.9.0.2", "10.9.0.3")),
        );
        let runner = CniRunner::new(vec![d.join("missing"), d.to_path_buf()]);
        let rc = RuntimeConfig {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None,
            }],
        };
        let result = runner
            .add(&conflist(&["first", "second"]), &attachment(), &rc)
            .await
            .unwrap();

        assert_eq!(calls(d), ["first ADD", "second ADD"]);
        let first = stdin_of(d, "first", "ADD");
        assert_eq!(first["name"], "testnet");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(
            first.get("runtimeConfig").is_none(),
            "first has no portMappings capability"
        );
        let second = stdin_of(d, "second", "ADD");
        assert_eq!(
            second["prevResult"],
            serde_json::from_str::<Value>(RESULT).unwrap()
        );
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        let log = std::fs::read_to_string(d.join("calls.log")).unwrap();
        let cni_path = format!("{}:{}", d.join("missing").display(), d.display());
        assert!(
            log.lines()
                .all(|l| l.ends_with(&format!("sbx-1 eth0 {cni_path}"))),
            "{log}"
        );

        let ip = result.sandbox_ip().unwrap();
        assert_eq!(ip.address, "10.9.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(ip.prefix_len, 24);
        assert_eq!(ip.gateway, Some("10.9.0.1".parse().unwrap()));
        assert_eq!(result.interfaces[1].name, "eth0");
    }

    #[tokio::test]
    async fn del_runs_in_reverse_with_the_cached_result() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake_plugin(d, "first", "exit 0");
        fake_plugin(d, "second", "exit 0");
        let cached: Value = serde_json::from_str(RESULT).unwrap();
        CniRunner::new(vec![d.to_path_buf()])
            .del(
                &conflist(&["first", "second"]),
                &attachment(),
                &RuntimeConfig::default(),
                Some(&cached),
            )
            .await
            .unwrap();
        assert_eq!(calls(d), ["second DEL", "first DEL"]);
        assert_eq!(stdin_of(d, "first", "DEL")["prevResult"], cached);
    }

    #[tokio::test]
    async fn a_plugin_error_object_names_the_plugin_and_undoes_the_add() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake_plugin(
            d,
            "first",
            &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}'; exit 0"),
        );
        fake_plugin(
            d,
            "second",
            r#"[ "$CNI_COMMAND" = DEL ] && exit 0; echo '{"cniVersion":"1.0.0","code":11,"msg":"no luck","details":"try later"}'; exit 1"#,
        );
        fake_plugin(d, "third", "exit 0");
        let err = CniRunner::new(vec![d.to_path_buf()])
            .add(
                &conflist(&["first", "second", "third"]),
                &attachment(),
                &RuntimeConfig::default(),
            )
            .await
            .unwrap_err();
        match &err {
            CniError::PluginFailed {
                plugin,
                command,
                code,
                msg,
                details,
            } => {
                assert_eq!(
                    (plugin.as_str(), *command, *code),
                    ("second", Command::Add, Some(11))
                );
                assert_eq!((msg.as_str(), details.as_str()), ("no luck", "try later"));
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "CNI plugin \"second\" failed on ADD (code 11): no luck (try later)"
        );
        assert_eq!(
            calls(d),
            ["first ADD", "second ADD", "second DEL", "first DEL"]
        );
    }

    #[tokio::test]
    async fn a_plugin_failing_without_an_error_object_reports_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path(), "bad", "echo 'kaput' >&2; exit 3");
        let err = CniRunner::new(vec![dir.path().to_path_buf()])
            .del(
                &conflist(&["bad"]),
                &attachment(),
                &RuntimeConfig::default(),
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "CNI plugin \"bad\" failed on DEL: kaput");
    }

    #[tokio::test]
    async fn an_unreadable_add_result_is_an_error_and_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path(), "garbage", "echo 'not json'");
        let err = CniRunner::new(vec![dir.path().to_path_buf()])
            .add(
                &conflist(&["garbage"]),
                &attachment(),
                &RuntimeConfig::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CniError::BadResult { plugin, .. } if plugin == "garbage"),
            "{err}"
        );
        assert_eq!(calls(dir.path()), ["garbage ADD", "garbage DEL"]);
    }

    #[tokio::test]
    async fn a_missing_plugin_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = CniRunner::new(vec![dir.path().to_path_buf()])
            .add(
                &conflist(&["nosuch"]),
                &attachment(),
                &RuntimeConfig::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CniError::PluginNotFound { plugin, .. } if plugin == "nosuch"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_hanging_plugin_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path(), "slow", "exec sleep 30");
        let started = Instant::now();
        let err = CniRunner::new(vec![dir.path().to_path_buf()])
            .with_timeout(Duration::from_millis(300))
            .check(
                &conflist(&["slow"]),
                &attachment(),
                &RuntimeConfig::default(),
                &json!({}),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                CniError::Timeout {
                    command: Command::Check,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn conflists_and_attachments_are_validated() {
        for bad in [
            json!([]),
            json!({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}),
            json!({"name": "n", "plugins": [{"type": "bridge"}]}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": []}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../evil"}]}),
            json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"bridge": "x"}]}),
        ] {
            assert!(
                NetworkConfigList::from_value(bad.clone()).is_err(),
                "{bad} was accepted"
            );
        }
        assert!(Attachment::new("", "/x", "eth0").is_err());
        assert!(Attachment::new("-a", "/x", "eth0").is_err());
        assert!(Attachment::new("a b", "/x", "eth0").is_err());
        assert!(Attachment::new("a", "/x", "sixteen-chars-xx").is_err());
        assert!(Attachment::new("a", "/x", "et/h0").is_err());
    }

    #[test]
    fn the_default_bridge_conflist_round_trips() {
        let net = BridgeNetwork::default().conflist();
        assert_eq!(
            net.plugin_types().collect::<Vec<_>>(),
            ["bridge", "portmap", "loopback"]
        );
        let doc = net.to_json();
        assert_eq!(doc["plugins"][0]["bridge"], DEFAULT_BRIDGE);
        assert_eq!(
            doc["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            DEFAULT_SUBNET
        );
        assert_eq!(
            NetworkConfigList::from_json(doc.to_string().as_bytes()).unwrap(),
            net
        );
    }
}
