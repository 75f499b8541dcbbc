//! Typed configuration: defaults, an optional TOML file, environment variables and flags, each
//! overriding the one before. The environment is read through an injectable lookup so tests never
//! touch the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::net::cni::BridgeNetwork;
use crate::net::{DnsConfig, NetConfig};

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Default containerd socket.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Default containerd namespace holding everything sandboxd makes.
pub const DEFAULT_NAMESPACE: &str = "sandboxd";
/// Default state directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandboxd";
/// Default parent cgroup of every sandbox.
pub const DEFAULT_CGROUP_PARENT: &str = "/sandboxd";
/// Default pids limit of a sandbox whose request sets none.
pub const DEFAULT_PIDS_LIMIT: i64 = 1024;
/// Default path of the idle PID 1 bind-mounted into sandboxes without a command.
pub const DEFAULT_IDLE_INIT: &str = "/usr/bin/catatonit";
/// Default runc state directory (containerd's own default for the runc shim).
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// Default of how long a stream may wait on an idle client (see [`Config::stream_idle_timeout`]).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default of how many streaming calls one tenant may have open at once.
pub const DEFAULT_MAX_STREAMS_PER_TENANT: usize = 1024;
/// Default of how much output all ExecSync calls together may hold, in bytes.
pub const DEFAULT_EXEC_SYNC_MEMORY: u64 = 512 << 20;
/// Sandbox events kept per tenant for resuming watchers, unless configured otherwise.
pub const DEFAULT_EVENT_HISTORY: usize = 4096;
/// The most sandbox events a tenant's history may be configured to keep.
pub const MAX_EVENT_HISTORY: usize = 1 << 20;

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (`unix:/path`).
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/sandboxd.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/path ({e})"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Whether sandboxd may start a private containerd when none answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedContainerd {
    /// Start one when nothing answers at the configured address (the default).
    Auto,
    /// Never: wait for the configured containerd (reported NOT_SERVING meanwhile).
    Never,
}

impl FromStr for EmbeddedContainerd {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EmbeddedContainerd::Auto),
            "never" => Ok(EmbeddedContainerd::Never),
            other => Err(format!("{other:?} is not one of: auto, never")),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not one of: human, json")),
        }
    }
}

/// The settings as given on the command line (all optional: unset falls through to env, file,
/// default).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Optional TOML file with any of the settings below (keys as the flags, with underscores)
    /// [env: SANDBOXD_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT or unix:/path [env: SANDBOXD_LISTEN] [default: 127.0.0.1:7878]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// containerd socket [env: SANDBOXD_CONTAINERD_ADDRESS] [default: /run/containerd/containerd.sock]
    #[arg(long, value_name = "PATH")]
    pub containerd_address: Option<PathBuf>,
    /// containerd namespace holding everything sandboxd makes for the default tenant; another
    /// tenant T's objects live in the namespace <this>.tenant.<T> (e.g. sandboxd.tenant.alice)
    /// [env: SANDBOXD_NAMESPACE] [default: sandboxd]
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,
    /// State directory (sandbox files, embedded containerd) [env: SANDBOXD_DATA_DIR] [default: /var/lib/sandboxd]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Parent cgroup path of every sandbox [env: SANDBOXD_CGROUP_PARENT] [default: /sandboxd]
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<String>,
    /// Start a private containerd under the data dir when none answers: auto or never
    /// [env: SANDBOXD_EMBEDDED_CONTAINERD] [default: auto]
    #[arg(long, value_name = "MODE")]
    pub embedded_containerd: Option<String>,
    /// Idle PID 1 for sandboxes without a command [env: SANDBOXD_IDLE_INIT] [default: /usr/bin/catatonit]
    #[arg(long, value_name = "PATH")]
    pub idle_init: Option<PathBuf>,
    /// Log format: human or json [env: SANDBOXD_LOG_FORMAT] [default: human]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set) [env: SANDBOXD_METRICS_LISTEN]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Directory for the network namespaces of BRIDGE sandboxes (and host-local's IP
    /// allocations) [env: SANDBOXD_NETNS_DIR] [default: /run/sandboxd/netns]
    #[arg(long, value_name = "DIR")]
    pub netns_dir: Option<PathBuf>,
    /// CNI conflist used for BRIDGE sandboxes instead of the built-in bridge + host-local +
    /// portmap + loopback network [env: SANDBOXD_CNI_CONFLIST]
    #[arg(long, value_name = "FILE")]
    pub cni_conflist: Option<PathBuf>,
    /// Colon-separated directories holding the CNI plugins [env: SANDBOXD_CNI_PLUGIN_DIRS]
    /// [default: /usr/lib/cni:/opt/cni/bin]
    #[arg(long, value_name = "DIRS")]
    pub cni_plugin_dirs: Option<String>,
    /// Host bridge of the built-in BRIDGE network [env: SANDBOXD_BRIDGE_NAME] [default: sandboxd0]
    #[arg(long, value_name = "NAME")]
    pub bridge_name: Option<String>,
    /// IPv4 subnet of the built-in BRIDGE network; the bridge takes its first address
    /// [env: SANDBOXD_BRIDGE_SUBNET] [default: 10.213.0.0/16]
    #[arg(long, value_name = "CIDR")]
    pub bridge_subnet: Option<String>,
    /// Comma-separated resolvers for sandboxes when the host has none they can reach
    /// [env: SANDBOXD_DNS_FALLBACK] [default: 1.1.1.1,8.8.8.8]
    #[arg(long, value_name = "ADDRS")]
    pub dns_fallback: Option<String>,
    /// systemd-resolved's upstream resolv.conf, preferred when present
    /// [env: SANDBOXD_RESOLVED_RESOLV_CONF] [default: /run/systemd/resolve/resolv.conf]
    #[arg(long, value_name = "FILE")]
    pub resolved_resolv_conf: Option<PathBuf>,
    /// The host's resolv.conf, used with loopback resolvers removed
    /// [env: SANDBOXD_HOST_RESOLV_CONF] [default: /etc/resolv.conf]
    #[arg(long, value_name = "FILE")]
    pub host_resolv_conf: Option<PathBuf>,
    /// Keep COUNT started sandboxes of IMAGE ready, comma-separated IMAGE=COUNT entries, e.g.
    /// busybox:1.36=4: a create that sets no id, command, hostname or network gets one at once,
    /// made to have the env, working dir, user and resources it asks for. Serves the default
    /// tenant only [env: SANDBOXD_WARM_POOL] [default: none]
    #[arg(long, value_name = "IMAGE=COUNT,...")]
    pub warm_pool: Option<String>,
    /// How exec output leaves the shim: `auto` (the shim hands the process's pipes to this
    /// binary, run as a relay, and sandboxd reads them directly; FIFOs when the shim cannot run
    /// it), a path to the sandboxd binary as containerd's shim sees it, or `off` (the shim copies
    /// output into FIFOs: about half the throughput) [env: SANDBOXD_EXEC_IO_RELAY] [default: auto]
    #[arg(long, value_name = "auto|off|PATH")]
    pub exec_io_relay: Option<String>,
    /// runc's state directory for sandboxes, as containerd's shim sees it (runc --root; the
    /// namespace is a directory below it). Keep it on a tmpfs: runc state must not outlive a
    /// reboot [env: SANDBOXD_RUNC_ROOT] [default: /run/containerd/runc]
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<PathBuf>,
    /// How long a stream may wait on an idle client before it ends with DEADLINE_EXCEEDED and
    /// lets go of what it holds: WriteFile without a message, ReadFile and Exec with output the
    /// client does not take, e.g. 30s, 5m [env: SANDBOXD_STREAM_IDLE_TIMEOUT] [default: 5m]
    #[arg(long, value_name = "DURATION")]
    pub stream_idle_timeout: Option<String>,
    /// Streaming calls (Exec, ReadFile, WriteFile, PullImage, reflection) one tenant may have
    /// open at once; past it RESOURCE_EXHAUSTED. Health is exempt
    /// [env: SANDBOXD_MAX_STREAMS_PER_TENANT] [default: 1024]
    #[arg(long, value_name = "COUNT")]
    pub max_streams_per_tenant: Option<String>,
    /// Output all running ExecSync calls together may hold in memory, e.g. 512Mi; a call that
    /// would go past it is killed and ends with RESOURCE_EXHAUSTED
    /// [env: SANDBOXD_EXEC_SYNC_MEMORY] [default: 512Mi]
    #[arg(long, value_name = "BYTES")]
    pub exec_sync_memory: Option<String>,
    /// Sandbox events each tenant keeps in memory for WatchSandboxes clients that resume after
    /// a dropped stream; older revisions get OUT_OF_RANGE
    /// [env: SANDBOXD_EVENT_HISTORY] [default: 4096]
    #[arg(long, value_name = "COUNT")]
    pub event_history: Option<String>,
    /// PEM certificate (chain) to serve gRPC over TLS with, together with --tls-key; both are
    /// re-read when they change (new connections get the new certificate). TCP only
    /// [env: SANDBOXD_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [env: SANDBOXD_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): a client certificate signed by one authenticates its caller as
    /// the tenant its Subject CN names; a certificate from another CA is refused at the
    /// handshake. Needs --tls-cert [env: SANDBOXD_TLS_CLIENT_CA]
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// TOML file of tenants: `[tenants.NAME]` with `tokens_sha256 = ["<hex>"]` (callers send
    /// `authorization: Bearer <token>`), optional `max_sandboxes`, `max_memory_bytes`,
    /// `max_cpu_millis` and `spiffe_ids`; re-read when it changes and on SIGHUP. Each tenant
    /// sees only its own sandboxes, snapshots and images (its own containerd namespace); a
    /// create or fork past a quota is RESOURCE_EXHAUSTED, limits counted as they apply
    /// (--default-memory, --default-cpu-millis included) [env: SANDBOXD_TENANTS]
    #[arg(long, value_name = "FILE")]
    pub tenants: Option<PathBuf>,
    /// Take the tenant of a call from a loopback peer's `x-forwarded-client-cert` header (a
    /// mesh sidecar's): its URI SAN, mapped by the tenants file's `spiffe_ids`. Needs
    /// --tenants; the header is ignored from any other peer
    /// [env: SANDBOXD_TRUST_FORWARDED_CLIENT_CERT]
    #[arg(long)]
    pub trust_forwarded_client_cert: bool,
    /// Serve a non-loopback --listen address with no authentication: anyone who can reach it
    /// may do anything. Without it sandboxd refuses to start that way
    #[command(flatten)]
    pub isolation: IsolationArgs,
    /// [env: SANDBOXD_ALLOW_UNAUTHENTICATED]
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Test-only: how often the tenants and TLS files are looked at for changes (default 1s;
    /// SIGHUP always reloads at once). Hidden from --help.
    #[arg(long, hide = true, value_name = "DURATION")]
    pub reload_interval: Option<String>,
    #[command(flatten)]
    pub walls: WallArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Test-only fault injection: comma-separated steps that fail on purpose (see
    /// `sandbox::failpoint`). Hidden from --help; never set it in production.
    #[arg(long, hide = true, value_name = "STEPS")]
    pub failpoints: Option<String>,
}

/// The TOML file's shape: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    containerd_address: Option<PathBuf>,
    namespace: Option<String>,
    data_dir: Option<PathBuf>,
    cgroup_parent: Option<String>,
    embedded_containerd: Option<String>,
    idle_init: Option<PathBuf>,
    log_format: Option<String>,
    metrics_listen: Option<String>,
    netns_dir: Option<PathBuf>,
    cni_conflist: Option<PathBuf>,
    cni_plugin_dirs: Option<String>,
    bridge_name: Option<String>,
    bridge_subnet: Option<String>,
    dns_fallback: Option<String>,
    resolved_resolv_conf: Option<PathBuf>,
    host_resolv_conf: Option<PathBuf>,
    warm_pool: Option<String>,
    exec_io_relay: Option<String>,
    runc_root: Option<PathBuf>,
    // A duration (bare seconds), a count or a size may be a TOML number or a string.
    stream_idle_timeout: Option<NumberOrString>,
    max_streams_per_tenant: Option<NumberOrString>,
    exec_sync_memory: Option<NumberOrString>,
    event_history: Option<NumberOrString>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    // Network isolation (see `IsolationArgs`).
    host_port_range: Option<String>,
    deny_egress: Option<StringOrList>,
    tls_client_ca: Option<PathBuf>,
    tenants: Option<PathBuf>,
    trust_forwarded_client_cert: Option<bool>,
    allow_unauthenticated: Option<bool>,
    // The walls of every sandbox (see `WallArgs`).
    seccomp_profile: Option<String>,
    oom_score_adj: Option<NumberOrString>,
    default_memory: Option<NumberOrString>,
    default_cpu_millis: Option<NumberOrString>,
    default_pids: Option<NumberOrString>,
    total_memory: Option<NumberOrString>,
    total_cpu_millis: Option<NumberOrString>,
    // Registries (see `RegistryArgs`); the repeatable ones as a TOML array or a comma list.
    registry_auth: Option<PathBuf>,
    registry_mirror: Option<StringOrList>,
    registry_ca: Option<StringOrList>,
    insecure_registry: Option<StringOrList>,
    registry_allow: Option<StringOrList>,
    registry_connect_timeout: Option<NumberOrString>,
    registry_read_timeout: Option<NumberOrString>,
    registry_max_layer_size: Option<NumberOrString>,
    min_free_disk: Option<NumberOrString>,
}

/// A TOML value that is a number (`1024`) or a string (`"512Mi"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(i64),
    String(String),
}

impl NumberOrString {
    fn into_string(self) -> String {
        match self {
            NumberOrString::Number(n) => n.to_string(),
            NumberOrString::String(s) => s,
        }
    }
}

/// The resolved configuration of `sandboxd serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: ListenAddr,
    /// containerd socket to use (or to start a private containerd at, see `embedded_containerd`).
    pub containerd_address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// State directory.
    pub data_dir: PathBuf,
    /// Parent cgroup of sandboxes.
    pub cgroup_parent: String,
    /// Private containerd policy.
    pub embedded_containerd: EmbeddedContainerd,
    /// Idle PID 1 binary.
    pub idle_init: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// How often containerd's health is checked.
    pub health_interval: Duration,
    /// How often expired sandboxes are looked for.
    pub ttl_sweep_interval: Duration,
    /// Steps that fail on purpose (tests only).
    pub failpoints: Vec<String>,
    /// Address of the Prometheus endpoint, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// BRIDGE networking and DNS.
    pub network: NetConfig,
    /// Warm pool sizes per image.
    pub warm_pool: Vec<(crate::image::ImageRef, usize)>,
    /// The sandboxd binary the shim runs as exec output relay; `None` for FIFOs only.
    pub exec_io_relay: Option<PathBuf>,
    /// runc's state directory for sandboxes.
    pub runc_root: PathBuf,
    /// How long a stream waits on a client that neither sends (WriteFile) nor takes what it
    /// is sent (ReadFile, Exec) before it ends and releases its sandbox.
    pub stream_idle_timeout: Duration,
    /// Streaming calls one tenant may have open at once.
    pub max_streams_per_tenant: usize,
    /// Bytes of output all ExecSync calls together may buffer.
    pub exec_sync_memory: u64,
    /// Sandbox events each tenant keeps for resuming watchers.
    pub event_history: usize,
    /// Who may call: TLS, client certificates, tenants.
    pub auth: AuthConfig,
    /// How often the tenants and TLS files are looked at for changes.
    pub reload_interval: Duration,
    /// What confines every sandbox (seccomp, OOM priority, default and total limits).
    pub walls: Walls,
    /// How registries are reached: credentials, mirrors, CAs, allow-list, timeouts.
    pub registries: crate::image::RegistrySettings,
}

/// Who may call, and over what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Serve gRPC over TLS with these files.
    pub tls: Option<TlsConfig>,
    /// The tenants file (bearer tokens, SPIFFE IDs, quotas).
    pub tenants: Option<PathBuf>,
    /// Believe a loopback peer's `x-forwarded-client-cert` (needs `tenants`).
    pub trust_forwarded_client_cert: bool,
    /// Serve a non-loopback address without authentication.
    pub allow_unauthenticated: bool,
}

impl AuthConfig {
    /// Whether callers must authenticate: a tenants file or client certificates are set up.
    pub fn authenticates(&self) -> bool {
        self.tenants.is_some() || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }
}

/// The files TLS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates client certificates are verified against.
    pub client_ca: Option<PathBuf>,
}

/// A configuration problem, naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ConfigError {
    setting: &'static str,
    reason: String,
}

impl Config {
    /// Resolves flags over `env` over the TOML file over defaults.
    pub fn resolve(
        args: &ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let config_path = args
            .config
            .clone()
            .or_else(|| env("SANDBOXD_CONFIG").map(PathBuf::from));
        let file = match config_path {
            Some(path) => read_file(&path)?,
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<String>, var: &str, file: &Option<String>, default: &str| {
            flag.clone()
                .or_else(|| env(var))
                .or_else(|| file.clone())
                .unwrap_or_else(|| default.to_string())
        };
        let pick_path =
            |flag: &Option<PathBuf>, var: &str, file: &Option<PathBuf>, default: &str| {
                flag.clone()
                    .or_else(|| env(var).map(PathBuf::from))
                    .or_else(|| file.clone())
                    .unwrap_or_else(|| PathBuf::from(default))
            };

        let listen = pick(
            &args.listen,
            "SANDBOXD_LISTEN",
            &file.listen,
            DEFAULT_LISTEN,
        );
        let listen = listen.parse().map_err(|reason| ConfigError {
            setting: "listen",
            reason,
        })?;
        let namespace = pick(
            &args.namespace,
            "SANDBOXD_NAMESPACE",
            &file.namespace,
            DEFAULT_NAMESPACE,
        );
        if namespace.is_empty()
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError {
                setting: "namespace",
                reason: format!("{namespace:?} must be letters, digits, '-', '_' or '.'"),
            });
        }
        let cgroup_parent = pick(
            &args.cgroup_parent,
            "SANDBOXD_CGROUP_PARENT",
            &file.cgroup_parent,
            DEFAULT_CGROUP_PARENT,
        );
        if !cgroup_parent.starts_with('/') || cgroup_parent.contains("..") {
            return Err(ConfigError {
                setting: "cgroup_parent",
                reason: format!("{cgroup_parent:?} must be an absolute cgroup path"),
            });
        }
        let embedded_containerd = pick(
            &args.embedded_containerd,
            "SANDBOXD_EMBEDDED_CONTAINERD",
            &file.embedded_containerd,
            "auto",
        )
        .parse()
        .map_err(|reason| ConfigError {
            setting: "embedded_containerd",
            reason,
        })?;
        let log_format = pick(
            &args.log_format,
            "SANDBOXD_LOG_FORMAT",
            &file.log_format,
            "human",
        )
        .parse()
        .map_err(|reason| ConfigError {
            setting: "log_format",
            reason,
        })?;
        let metrics_listen = match args
            .metrics_listen
            .clone()
            .or_else(|| env("SANDBOXD_METRICS_LISTEN"))
            .or_else(|| file.metrics_listen.clone())
        {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| ConfigError {
                setting: "metrics_listen",
                reason: format!("{s:?} is not HOST:PORT ({e})"),
            })?),
        };
        let data_dir = pick_path(
            &args.data_dir,
            "SANDBOXD_DATA_DIR",
            &file.data_dir,
            DEFAULT_DATA_DIR,
        );
        if !data_dir.is_absolute() {
            return Err(ConfigError {
                setting: "data_dir",
                reason: format!("{} must be an absolute path", data_dir.display()),
            });
        }
        let mut network = resolve_network(args, env, &file, &namespace, &pick, &pick_path)?;
        resolve_isolation(
            &args.isolation,
            env,
            &file,
            &listen,
            metrics_listen,
            &mut network,
        )?;
        let pool: Vec<String> = pick(&args.warm_pool, "SANDBOXD_WARM_POOL", &file.warm_pool, "")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        let warm_pool = crate::sandbox::parse_pool(&pool).map_err(|e| ConfigError {
            setting: "warm_pool",
            reason: e.to_string(),
        })?;
        let exec_io_relay = match pick(
            &args.exec_io_relay,
            "SANDBOXD_EXEC_IO_RELAY",
            &file.exec_io_relay,
            "auto",
        )
        .as_str()
        {
            "off" => None,
            // Without a path to ourselves there is nothing for the shim to run.
            "auto" => std::env::current_exe().ok(),
            path if Path::new(path).is_absolute() => Some(PathBuf::from(path)),
            other => {
                return Err(ConfigError {
                    setting: "exec_io_relay",
                    reason: format!("{other:?} is not auto, off or an absolute path"),
                })
            }
        };
        let runc_root = pick_path(
            &args.runc_root,
            "SANDBOXD_RUNC_ROOT",
            &file.runc_root,
            DEFAULT_RUNC_ROOT,
        );
        if !runc_root.is_absolute() {
            return Err(ConfigError {
                setting: "runc_root",
                reason: format!("{} must be an absolute path", runc_root.display()),
            });
        }
        let limits = resolve_limits(args, env, &file)?;
        let auth = resolve_auth(args, env, &file, &listen)?;
        let reload_interval = match &args.reload_interval {
            None => crate::server::DEFAULT_RELOAD_INTERVAL,
            Some(s) => crate::util::parse_duration(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| ConfigError {
                    setting: "reload_interval",
                    reason: format!("{s:?} is not a duration longer than zero"),
                })?,
        };
        let walls = resolve_walls(&args.walls, env, &file)?;
        let mut registries = resolve_registries(&args.registry, env, &file)?;
        // A token realm, redirect or mirror never reaches the ranges sandboxes may not reach.
        registries.denied_networks = network.deny_egress.clone();
        Ok(Config {
            registries,
            auth,
            reload_interval,
            walls,
            stream_idle_timeout: limits.stream_idle_timeout,
            max_streams_per_tenant: limits.max_streams_per_tenant,
            exec_sync_memory: limits.exec_sync_memory,
            event_history: limits.event_history,
            runc_root,
            exec_io_relay,
            warm_pool,
            network,
            listen,
            containerd_address: pick_path(
                &args.containerd_address,
                "SANDBOXD_CONTAINERD_ADDRESS",
                &file.containerd_address,
                DEFAULT_CONTAINERD_ADDRESS,
            ),
            namespace,
            data_dir,
            cgroup_parent,
            embedded_containerd,
            idle_init: pick_path(
                &args.idle_init,
                "SANDBOXD_IDLE_INIT",
                &file.idle_init,
                DEFAULT_IDLE_INIT,
            ),
            log_format,
            health_interval: Duration::from_secs(1),
            ttl_sweep_interval: Duration::from_secs(1),
            metrics_listen,
            failpoints: args
                .failpoints
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// The limits that keep slow and hostile clients from holding resources.
struct Limits {
    stream_idle_timeout: Duration,
    max_streams_per_tenant: usize,
    exec_sync_memory: u64,
    event_history: usize,
}

fn resolve_limits(
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
) -> Result<Limits, ConfigError> {
    let pick = |flag: &Option<String>, var: &str, file: Option<String>| {
        flag.clone().or_else(|| env(var)).or(file)
    };
    let stream_idle_timeout = match pick(
        &args.stream_idle_timeout,
        "SANDBOXD_STREAM_IDLE_TIMEOUT",
        file.stream_idle_timeout
            .clone()
            .map(NumberOrString::into_string),
    ) {
        None => DEFAULT_STREAM_IDLE_TIMEOUT,
        Some(s) => match crate::util::parse_duration(&s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                return Err(ConfigError {
                    setting: "stream_idle_timeout",
                    reason: format!("{s:?} must be longer than zero"),
                })
            }
            Err(reason) => {
                return Err(ConfigError {
                    setting: "stream_idle_timeout",
                    reason,
                })
            }
        },
    };
    let max_streams_per_tenant = match pick(
        &args.max_streams_per_tenant,
        "SANDBOXD_MAX_STREAMS_PER_TENANT",
        file.max_streams_per_tenant
            .clone()
            .map(NumberOrString::into_string),
    ) {
        None => DEFAULT_MAX_STREAMS_PER_TENANT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(ConfigError {
                    setting: "max_streams_per_tenant",
                    reason: format!("{s:?} is not a count of at least 1"),
                })
            }
        },
    };
    let exec_sync_memory = match pick(
        &args.exec_sync_memory,
        "SANDBOXD_EXEC_SYNC_MEMORY",
        file.exec_sync_memory
            .clone()
            .map(NumberOrString::into_string),
    ) {
        None => DEFAULT_EXEC_SYNC_MEMORY,
        Some(s) => match crate::util::parse_size(&s) {
            Ok(n) if n > 0 => n as u64,
            Ok(_) => {
                return Err(ConfigError {
                    setting: "exec_sync_memory",
                    reason: format!("{s:?} must be more than zero"),
                })
            }
            Err(reason) => {
                return Err(ConfigError {
                    setting: "exec_sync_memory",
                    reason,
                })
            }
        },
    };
    let event_history = match pick(
        &args.event_history,
        "SANDBOXD_EVENT_HISTORY",
        file.event_history.clone().map(NumberOrString::into_string),
    ) {
        None => DEFAULT_EVENT_HISTORY,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_EVENT_HISTORY).contains(&n) => n,
            _ => {
                return Err(ConfigError {
                    setting: "event_history",
                    reason: format!("{s:?} is not a count from 1 to {MAX_EVENT_HISTORY}"),
                })
            }
        },
    };
    Ok(Limits {
        stream_idle_timeout,
        max_streams_per_tenant,
        exec_sync_memory,
        event_history,
    })
}

/// A boolean setting from an environment variable: `true`/`1`/`yes`/`on` or
/// `false`/`0`/`no`/`off`/empty.
fn parse_bool(setting: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        other => Err(ConfigError {
            setting,
            reason: format!("{other:?} is not true or false"),
        }),
    }
}

/// The authentication settings, checked against each other and against `listen`: TLS needs
/// both files and TCP; nobody may listen beyond loopback unauthenticated unless told to.
fn resolve_auth(
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
    listen: &ListenAddr,
) -> Result<AuthConfig, ConfigError> {
    // An empty value (as a chart may render) is unset.
    let path = |flag: &Option<PathBuf>, var: &str, file: &Option<PathBuf>| {
        flag.clone()
            .or_else(|| env(var).map(PathBuf::from))
            .or_else(|| file.clone())
            .filter(|p| !p.as_os_str().is_empty())
    };
    let flag = |flag: bool, setting: &'static str, var: &str, file: Option<bool>| {
        if flag {
            return Ok(true);
        }
        match env(var) {
            Some(v) => parse_bool(setting, &v),
            None => Ok(file.unwrap_or(false)),
        }
    };
    let cert = path(&args.tls_cert, "SANDBOXD_TLS_CERT", &file.tls_cert);
    let key = path(&args.tls_key, "SANDBOXD_TLS_KEY", &file.tls_key);
    let client_ca = path(
        &args.tls_client_ca,
        "SANDBOXD_TLS_CLIENT_CA",
        &file.tls_client_ca,
    );
    let tenants = path(&args.tenants, "SANDBOXD_TENANTS", &file.tenants);
    let trust_forwarded_client_cert = flag(
        args.trust_forwarded_client_cert,
        "trust_forwarded_client_cert",
        "SANDBOXD_TRUST_FORWARDED_CLIENT_CERT",
        file.trust_forwarded_client_cert,
    )?;
    let allow_unauthenticated = flag(
        args.allow_unauthenticated,
        "allow_unauthenticated",
        "SANDBOXD_ALLOW_UNAUTHENTICATED",
        file.allow_unauthenticated,
    )?;
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            client_ca,
        }),
        (None, None) if client_ca.is_some() => {
            return Err(ConfigError {
                setting: "tls_client_ca",
                reason: "client certificates need TLS: set --tls-cert and --tls-key too".into(),
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError {
                setting: "tls_key",
                reason: "--tls-cert needs --tls-key (the certificate's private key)".into(),
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError {
                setting: "tls_cert",
                reason: "--tls-key needs --tls-cert (the certificate it belongs to)".into(),
            })
        }
    };
    if let (Some(_), ListenAddr::Unix(path)) = (&tls, listen) {
        return Err(ConfigError {
            setting: "tls_cert",
            reason: format!(
                "TLS is served on TCP only, not on the unix socket {}: the socket's file mode \
                 already keeps its traffic on this host. Authenticate socket callers with \
                 --tenants, or listen on HOST:PORT for TLS",
                path.display()
            ),
        });
    }
    if trust_forwarded_client_cert && tenants.is_none() {
        return Err(ConfigError {
            setting: "trust_forwarded_client_cert",
            reason: "needs --tenants: its spiffe_ids map a forwarded certificate to a tenant"
                .into(),
        });
    }
    let auth = AuthConfig {
        tls,
        tenants,
        trust_forwarded_client_cert,
        allow_unauthenticated,
    };
    if let ListenAddr::Tcp(addr) = listen {
        if !addr.ip().is_loopback() && !auth.authenticates() && !allow_unauthenticated {
            return Err(ConfigError {
                setting: "listen",
                reason: format!(
                    "{addr} is reachable from other hosts and no caller authenticates: set \
                     --tenants FILE (bearer tokens) and/or --tls-cert, --tls-key and \
                     --tls-client-ca (client certificates), or --allow-unauthenticated to let \
                     anyone who reaches it do anything"
                ),
            });
        }
    }
    Ok(auth)
}

// ---- The walls of every sandbox: seccomp, OOM priority, default and total limits ----

/// Default `oom_score_adj` of sandbox processes: the kernel kills them before node daemons.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = 500;
/// Default memory limit of a sandbox that asks for none.
pub const DEFAULT_MEMORY: i64 = 1 << 30;
/// Default CPU limit, in millicores, of a sandbox that asks for none.
pub const DEFAULT_CPU_MILLIS: i64 = 1000;

/// Flags of the walls around every sandbox.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WallArgs {
    /// Seccomp profile of every sandbox and exec: `default` (Docker's default profile: an
    /// allow-list, everything else EPERM), `unconfined`, or the path of an OCI seccomp JSON
    /// file (the `linux.seccomp` object of a runtime spec) [env: SANDBOXD_SECCOMP_PROFILE]
    /// [default: default]
    #[arg(long, value_name = "default|unconfined|FILE")]
    pub seccomp_profile: Option<String>,
    /// oom_score_adj of sandbox processes (-1000 to 1000): positive makes the kernel's OOM
    /// killer pick them before the node's daemons [env: SANDBOXD_OOM_SCORE_ADJ] [default: 500]
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub oom_score_adj: Option<String>,
    /// Memory limit of a sandbox that asks for none, e.g. 512Mi; 0 for none
    /// [env: SANDBOXD_DEFAULT_MEMORY] [default: 1Gi]
    #[arg(long, value_name = "BYTES")]
    pub default_memory: Option<String>,
    /// CPU limit in millicores of a sandbox that asks for none; 0 for none
    /// [env: SANDBOXD_DEFAULT_CPU_MILLIS] [default: 1000]
    #[arg(long, value_name = "MILLIS")]
    pub default_cpu_millis: Option<String>,
    /// Most processes of a sandbox that asks for no pids limit
    /// [env: SANDBOXD_DEFAULT_PIDS] [default: 1024]
    #[arg(long, value_name = "COUNT")]
    pub default_pids: Option<String>,
    /// Memory all sandboxes together may use (a limit on the parent cgroup), e.g. 8Gi
    /// [env: SANDBOXD_TOTAL_MEMORY] [default: none]
    #[arg(long, value_name = "BYTES")]
    pub total_memory: Option<String>,
    /// CPU all sandboxes together may use, in millicores (a limit on the parent cgroup)
    /// [env: SANDBOXD_TOTAL_CPU_MILLIS] [default: none]
    #[arg(long, value_name = "MILLIS")]
    pub total_cpu_millis: Option<String>,
    /// Free space to keep on the filesystems of containerd's snapshots and of --data-dir: a
    /// percentage (`5%`) or a size (`10Gi`); below it creates, forks, restores, commits and
    /// WriteFile are RESOURCE_EXHAUSTED. `0` turns the guard off
    /// [env: SANDBOXD_MIN_FREE_DISK] [default: 5%]
    #[arg(long, value_name = "PERCENT%|BYTES")]
    pub min_free_disk: Option<String>,
}

/// How much free space the disk guard keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// This share of the filesystem, in percent (above 0, below 100).
    Percent(f64),
    /// At least this many bytes.
    Bytes(u64),
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
        }
    }
}

/// The default of --min-free-disk.
pub const DEFAULT_MIN_FREE_DISK: MinFree = MinFree::Percent(5.0);

/// Which seccomp filter sandboxes run under.
#[derive(Debug, Clone, PartialEq)]
pub enum SeccompProfile {
    /// Docker's default profile, for the sandbox's capabilities and the running kernel.
    Default,
    /// None at all.
    Unconfined,
    /// An operator's profile, read at startup.
    Custom(Box<oci_spec::runtime::LinuxSeccomp>),
}

/// What confines every sandbox beyond its namespaces.
#[derive(Debug, Clone, PartialEq)]
pub struct Walls {
    /// Seccomp filter of every sandbox and exec.
    pub seccomp: SeccompProfile,
    /// oom_score_adj of every sandbox process.
    pub oom_score_adj: i32,
    /// Memory limit of sandboxes that ask for none.
    pub default_memory: Option<i64>,
    /// CPU limit (millicores) of sandboxes that ask for none.
    pub default_cpu_millis: Option<i64>,
    /// pids limit of sandboxes that ask for none.
    pub default_pids: i64,
    /// Memory limit of the parent cgroup.
    pub total_memory: Option<i64>,
    /// CPU limit (millicores) of the parent cgroup.
    pub total_cpu_millis: Option<i64>,
    /// Free space below which writes to the node's disk are refused; `None`: no guard.
    pub min_free_disk: Option<MinFree>,
}

impl Default for Walls {
    fn default() -> Self {
        Walls {
            seccomp: SeccompProfile::Default,
            oom_score_adj: DEFAULT_OOM_SCORE_ADJ,
            default_memory: Some(DEFAULT_MEMORY),
            default_cpu_millis: Some(DEFAULT_CPU_MILLIS),
            default_pids: DEFAULT_PIDS_LIMIT,
            total_memory: None,
            total_cpu_millis: None,
            min_free_disk: Some(DEFAULT_MIN_FREE_DISK),
        }
    }
}

fn resolve_walls(
    args: &WallArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
) -> Result<Walls, ConfigError> {
    let pick = |flag: &Option<String>, var: &str, file: &Option<NumberOrString>| {
        flag.clone()
            .or_else(|| env(var))
            .or_else(|| file.clone().map(NumberOrString::into_string))
    };
    let bad = |setting: &'static str| move |reason: String| ConfigError { setting, reason };
    // A limit in [min, max]; 0 (or absent with no default) means none.
    let limit = |setting: &'static str,
                 value: Option<String>,
                 default: Option<i64>,
                 size: bool,
                 (min, max): (i64, i64)|
     -> Result<Option<i64>, ConfigError> {
        let Some(s) = value else { return Ok(default) };
        let n = if size {
            crate::util::parse_size(&s).map_err(bad(setting))?
        } else {
            s.parse::<i64>()
                .map_err(|_| bad(setting)(format!("{s:?} is not a whole number")))?
        };
        match n {
            0 => Ok(None),
            n if (min..=max).contains(&n) => Ok(Some(n)),
            n => Err(bad(setting)(format!(
                "{n} is not 0 or between {min} and {max}"
            ))),
        }
    };
    use crate::sandbox::{MAX_CPU_MILLIS, MAX_MEMORY_BYTES, MAX_PIDS, MIN_MEMORY_BYTES};
    let seccomp = match args
        .seccomp_profile
        .clone()
        .or_else(|| env("SANDBOXD_SECCOMP_PROFILE"))
        .or_else(|| file.seccomp_profile.clone())
        .as_deref()
    {
        None | Some("default") => SeccompProfile::Default,
        Some("unconfined") => SeccompProfile::Unconfined,
        Some(path) if Path::new(path).is_absolute() => SeccompProfile::Custom(Box::new(
            crate::runtime::seccomp::load_profile(Path::new(path))
                .map_err(bad("seccomp_profile"))?,
        )),
        Some(other) => {
            return Err(bad("seccomp_profile")(format!(
                "{other:?} is not default, unconfined or an absolute path"
            )))
        }
    };
    let oom = pick(
        &args.oom_score_adj,
        "SANDBOXD_OOM_SCORE_ADJ",
        &file.oom_score_adj,
    );
    let oom_score_adj = match oom {
        None => DEFAULT_OOM_SCORE_ADJ,
        Some(s) => match s.parse::<i32>() {
            Ok(n) if (-1000..=1000).contains(&n) => n,
            _ => {
                return Err(bad("oom_score_adj")(format!(
                    "{s:?} is not a whole number from -1000 to 1000"
                )))
            }
        },
    };
    let memory_range = (MIN_MEMORY_BYTES, MAX_MEMORY_BYTES);
    let cpu_range = (10, MAX_CPU_MILLIS);
    Ok(Walls {
        seccomp,
        oom_score_adj,
        default_memory: limit(
            "default_memory",
            pick(
                &args.default_memory,
                "SANDBOXD_DEFAULT_MEMORY",
                &file.default_memory,
            ),
            Some(DEFAULT_MEMORY),
            true,
            memory_range,
        )?,
        default_cpu_millis: limit(
            "default_cpu_millis",
            pick(
                &args.default_cpu_millis,
                "SANDBOXD_DEFAULT_CPU_MILLIS",
                &file.default_cpu_millis,
            ),
            Some(DEFAULT_CPU_MILLIS),
            false,
            cpu_range,
        )?,
        default_pids: limit(
            "default_pids",
            pick(
                &args.default_pids,
                "SANDBOXD_DEFAULT_PIDS",
                &file.default_pids,
            ),
            Some(DEFAULT_PIDS_LIMIT),
            false,
            (1, MAX_PIDS),
        )?
        .ok_or_else(|| bad("default_pids")("0: a sandbox needs a pids limit".into()))?,
        total_memory: limit(
            "total_memory",
            pick(
                &args.total_memory,
                "SANDBOXD_TOTAL_MEMORY",
                &file.total_memory,
            ),
            None,
            true,
            memory_range,
        )?,
        total_cpu_millis: limit(
            "total_cpu_millis",
            pick(
                &args.total_cpu_millis,
                "SANDBOXD_TOTAL_CPU_MILLIS",
                &file.total_cpu_millis,
            ),
            None,
            false,
            cpu_range,
        )?,
        min_free_disk: match pick(
            &args.min_free_disk,
            "SANDBOXD_MIN_FREE_DISK",
            &file.min_free_disk,
        ) {
            None => Some(DEFAULT_MIN_FREE_DISK),
            Some(s) => parse_min_free(&s).map_err(bad("min_free_disk"))?,
        },
    })
}

/// `5%`, `0.5%`, `10Gi`, `1073741824` or `0` (no guard).
fn parse_min_free(s: &str) -> Result<Option<MinFree>, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(0.0) => Ok(None),
            Ok(p) if p > 0.0 && p < 100.0 => Ok(Some(MinFree::Percent(p))),
            _ => Err(format!("{s:?} is not a percentage from 0% to below 100%")),
        };
    }
    match crate::util::parse_size(s)? {
        0 => Ok(None),
        n => Ok(Some(MinFree::Bytes(n as u64))),
    }
}

// ---- end of the walls ----

// ---- Registries: credentials, mirrors, CAs, plain-HTTP hosts, allow-list, limits ----

/// Flags of how registries are reached.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Docker config.json with registry credentials (`auths`: `auth`, or `username` and
    /// `password`, or `identitytoken`), as a kubernetes.io/dockerconfigjson Secret holds it;
    /// re-read when it changes [env: SANDBOXD_REGISTRY_AUTH]
    #[arg(long, value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
    /// Pull HOST's images (docker.io for short names) from URL first; repeatable, tried in
    /// order, then HOST itself [env: SANDBOXD_REGISTRY_MIRRORS, comma-separated]
    #[arg(long, value_name = "HOST=URL")]
    pub registry_mirror: Vec<String>,
    /// Trust the PEM CA certificate(s) in FILE for HOST, beside the system's roots; repeatable
    /// [env: SANDBOXD_REGISTRY_CAS, comma-separated]
    #[arg(long, value_name = "HOST=FILE")]
    pub registry_ca: Vec<String>,
    /// Reach HOST over plain HTTP (loopback hosts always are); repeatable
    /// [env: SANDBOXD_INSECURE_REGISTRIES, comma-separated]
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// The only registry hosts pulls and exports may reach (their mirrors too); others are
    /// PERMISSION_DENIED before any connection [env: SANDBOXD_REGISTRY_ALLOW] [default: any]
    #[arg(long, value_name = "HOST,...")]
    pub registry_allow: Option<String>,
    /// Time to connect to a registry [env: SANDBOXD_REGISTRY_CONNECT_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub registry_connect_timeout: Option<String>,
    /// Time a registry may send nothing before the pull or export fails UNAVAILABLE
    /// [env: SANDBOXD_REGISTRY_READ_TIMEOUT] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub registry_read_timeout: Option<String>,
    /// Largest layer a manifest may declare [env: SANDBOXD_REGISTRY_MAX_LAYER_SIZE]
    /// [default: 16Gi]
    #[arg(long, value_name = "BYTES")]
    pub registry_max_layer_size: Option<String>,
}

/// A TOML value that is a list of strings or one comma-separated string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    List(Vec<String>),
    String(String),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::List(items) => items,
            StringOrList::String(s) => split_list(&s),
        }
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

fn resolve_registries(
    args: &RegistryArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
) -> Result<crate::image::RegistrySettings, ConfigError> {
    use crate::image::registry;
    let bad = |setting: &'static str| move |reason: String| ConfigError { setting, reason };
    // Repeatable flags win whole over the variable, which wins over the file.
    let list = |flag: &Vec<String>, var: &str, file: &Option<StringOrList>| -> Vec<String> {
        if !flag.is_empty() {
            return flag.clone();
        }
        if let Some(v) = env(var) {
            return split_list(&v);
        }
        file.clone().map(StringOrList::into_vec).unwrap_or_default()
    };
    let one = |flag: &Option<String>, var: &str, file: &Option<NumberOrString>| {
        flag.clone()
            .or_else(|| env(var))
            .or_else(|| file.clone().map(NumberOrString::into_string))
    };
    let duration = |setting: &'static str, value: Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(s) => match crate::util::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(bad(setting)(format!("{s:?} must be longer than zero"))),
            Err(reason) => Err(bad(setting)(reason)),
        },
    };
    let auth_file = args
        .registry_auth
        .clone()
        .or_else(|| env("SANDBOXD_REGISTRY_AUTH").map(PathBuf::from))
        .or_else(|| file.registry_auth.clone())
        .filter(|p| !p.as_os_str().is_empty());
    if let Some(path) = &auth_file {
        if !path.is_absolute() {
            return Err(bad("registry_auth")(format!(
                "{} must be an absolute path",
                path.display()
            )));
        }
    }
    let mirrors = list(
        &args.registry_mirror,
        "SANDBOXD_REGISTRY_MIRRORS",
        &file.registry_mirror,
    )
    .iter()
    .map(|m| registry::parse_mirror(m).map_err(bad("registry_mirror")))
    .collect::<Result<Vec<_>, _>>()?;
    let cas = list(
        &args.registry_ca,
        "SANDBOXD_REGISTRY_CAS",
        &file.registry_ca,
    )
    .iter()
    .map(|c| registry::parse_host_file(c).map_err(bad("registry_ca")))
    .collect::<Result<Vec<_>, _>>()?;
    let insecure = list(
        &args.insecure_registry,
        "SANDBOXD_INSECURE_REGISTRIES",
        &file.insecure_registry,
    )
    .iter()
    .map(|h| registry::normalize_host(h).map_err(bad("insecure_registry")))
    .collect::<Result<Vec<_>, _>>()?;
    let allow = match args
        .registry_allow
        .clone()
        .map(|s| split_list(&s))
        .or_else(|| env("SANDBOXD_REGISTRY_ALLOW").map(|s| split_list(&s)))
        .or_else(|| file.registry_allow.clone().map(StringOrList::into_vec))
    {
        None => None,
        Some(hosts) if hosts.is_empty() => None,
        Some(hosts) => Some(
            hosts
                .iter()
                .map(|h| registry::normalize_host(h).map_err(bad("registry_allow")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let connect_timeout = duration(
        "registry_connect_timeout",
        one(
            &args.registry_connect_timeout,
            "SANDBOXD_REGISTRY_CONNECT_TIMEOUT",
            &file.registry_connect_timeout,
        ),
        registry::DEFAULT_CONNECT_TIMEOUT,
    )?;
    let read_timeout = duration(
        "registry_read_timeout",
        one(
            &args.registry_read_timeout,
            "SANDBOXD_REGISTRY_READ_TIMEOUT",
            &file.registry_read_timeout,
        ),
        registry::DEFAULT_READ_TIMEOUT,
    )?;
    let max_layer_size = match one(
        &args.registry_max_layer_size,
        "SANDBOXD_REGISTRY_MAX_LAYER_SIZE",
        &file.registry_max_layer_size,
    ) {
        None => registry::DEFAULT_MAX_LAYER_SIZE,
        Some(s) => match crate::util::parse_size(&s) {
            Ok(n) if n > 0 => n as u64,
            Ok(_) => {
                return Err(bad("registry_max_layer_size")(format!(
                    "{s:?} must be more than zero"
                )))
            }
            Err(reason) => return Err(bad("registry_max_layer_size")(reason)),
        },
    };
    Ok(crate::image::RegistrySettings {
        auth_file,
        mirrors,
        cas,
        insecure,
        allow,
        connect_timeout,
        read_timeout,
        max_layer_size,
        // --deny-egress, set by `Config::resolve` once the network settings are read.
        denied_networks: Vec::new(),
    })
}

// ---- end of registries ----

// ---- Network isolation: published host ports and closed egress ranges ----

/// Flags of the isolation between sandboxes, the node and the networks around it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IsolationArgs {
    /// Host ports sandboxes may publish, LOW-HIGH; sandboxd's own gRPC and metrics ports are
    /// refused even inside it [env: SANDBOXD_HOST_PORT_RANGE] [default: 20000-29999]
    #[arg(long, value_name = "LOW-HIGH")]
    pub host_port_range: Option<String>,
    /// Comma-separated IPv4 CIDRs no sandbox reaches, whatever its egress mode, unless an
    /// ALLOW_LIST rule names something inside one (e.g. a cluster's pod and service ranges)
    /// [env: SANDBOXD_DENY_EGRESS] [default: none]
    #[arg(long, value_name = "CIDR,...")]
    pub deny_egress: Option<String>,
}

fn resolve_isolation(
    args: &IsolationArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
    listen: &ListenAddr,
    metrics_listen: Option<SocketAddr>,
    network: &mut NetConfig,
) -> Result<(), ConfigError> {
    if let Some(range) = args
        .host_port_range
        .clone()
        .or_else(|| env("SANDBOXD_HOST_PORT_RANGE"))
        .or_else(|| file.host_port_range.clone())
    {
        network.host_ports = range.parse().map_err(|reason| ConfigError {
            setting: "host_port_range",
            reason,
        })?;
    }
    let deny: Vec<String> = match args
        .deny_egress
        .clone()
        .or_else(|| env("SANDBOXD_DENY_EGRESS"))
    {
        Some(s) => s.split(',').map(str::to_string).collect(),
        None => match &file.deny_egress {
            Some(StringOrList::List(l)) => l.clone(),
            Some(StringOrList::String(s)) => s.split(',').map(str::to_string).collect(),
            None => Vec::new(),
        },
    };
    network.deny_egress = deny
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse().map_err(|reason| ConfigError {
                setting: "deny_egress",
                reason,
            })
        })
        .collect::<Result<_, _>>()?;
    network.reserved_ports = match listen {
        ListenAddr::Tcp(addr) => vec![addr.port()],
        ListenAddr::Unix(_) => Vec::new(),
    };
    network
        .reserved_ports
        .extend(metrics_listen.map(|m| m.port()));
    Ok(())
}

// ---- end of network isolation ----

/// Picks a setting: flag, then environment variable, then file, then default.
type PickFn<'a, T> = &'a dyn Fn(&Option<T>, &str, &Option<T>, &str) -> T;

/// The network settings (see [`NetConfig`]).
fn resolve_network(
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
    file: &FileConfig,
    namespace: &str,
    pick: PickFn<'_, String>,
    pick_path: PickFn<'_, PathBuf>,
) -> Result<NetConfig, ConfigError> {
    let netns_dir = pick_path(
        &args.netns_dir,
        "SANDBOXD_NETNS_DIR",
        &file.netns_dir,
        crate::net::DEFAULT_NETNS_DIR,
    );
    if !netns_dir.is_absolute() {
        return Err(ConfigError {
            setting: "netns_dir",
            reason: format!("{} must be an absolute path", netns_dir.display()),
        });
    }
    let conflist = args
        .cni_conflist
        .clone()
        .or_else(|| env("SANDBOXD_CNI_CONFLIST").map(PathBuf::from))
        .or_else(|| file.cni_conflist.clone())
        .filter(|p| !p.as_os_str().is_empty());
    let plugin_dirs = pick(
        &args.cni_plugin_dirs,
        "SANDBOXD_CNI_PLUGIN_DIRS",
        &file.cni_plugin_dirs,
        &crate::net::cni::DEFAULT_PLUGIN_DIRS.join(":"),
    )
    .split(':')
    .filter(|d| !d.is_empty())
    .map(PathBuf::from)
    .collect();
    let bridge = pick(
        &args.bridge_name,
        "SANDBOXD_BRIDGE_NAME",
        &file.bridge_name,
        crate::net::cni::DEFAULT_BRIDGE,
    );
    if bridge.is_empty()
        || bridge.len() > 15
        || !bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError {
            setting: "bridge_name",
            reason: format!(
                "{bridge:?} must be 1-15 letters, digits, '-', '_' or '.' (a Linux interface name)"
            ),
        });
    }
    let subnet = pick(
        &args.bridge_subnet,
        "SANDBOXD_BRIDGE_SUBNET",
        &file.bridge_subnet,
        crate::net::cni::DEFAULT_SUBNET,
    );
    let parsed: crate::net::policy::Ipv4Net = subnet.parse().map_err(|reason| ConfigError {
        setting: "bridge_subnet",
        reason,
    })?;
    if parsed.prefix() > 30 || !subnet.contains('/') {
        return Err(ConfigError {
            setting: "bridge_subnet",
            reason: format!(
                "{subnet:?} must be an IPv4 CIDR with room for sandboxes (/30 or wider)"
            ),
        });
    }
    let fallback = pick(
        &args.dns_fallback,
        "SANDBOXD_DNS_FALLBACK",
        &file.dns_fallback,
        &crate::net::DEFAULT_DNS_FALLBACK.join(","),
    )
    .split(',')
    .map(str::trim)
    .filter(|a| !a.is_empty())
    .map(|a| {
        a.parse::<std::net::IpAddr>().map_err(|_| ConfigError {
            setting: "dns_fallback",
            reason: format!("{a:?} is not an IP address"),
        })
    })
    .collect::<Result<Vec<_>, _>>()?;
    Ok(NetConfig {
        instance: namespace.to_string(),
        netns_dir,
        conflist,
        bridge: BridgeNetwork {
            bridge,
            subnet,
            ..BridgeNetwork::default()
        },
        plugin_dirs,
        dns: DnsConfig {
            resolved_conf: pick_path(
                &args.resolved_resolv_conf,
                "SANDBOXD_RESOLVED_RESOLV_CONF",
                &file.resolved_resolv_conf,
                crate::net::DEFAULT_RESOLVED_CONF,
            ),
            host_conf: pick_path(
                &args.host_resolv_conf,
                "SANDBOXD_HOST_RESOLV_CONF",
                &file.host_resolv_conf,
                crate::net::DEFAULT_HOST_RESOLV_CONF,
            ),
            fallback,
        },
        deny_egress: Vec::new(),
        host_ports: crate::net::policy::DEFAULT_HOST_PORT_RANGE,
        reserved_ports: Vec::new(),
    })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        setting: "config",
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        setting: "config",
        reason: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let cfg = Config::resolve(&ServeArgs::default(), &env_of(&[])).unwrap();
        assert_eq!(
            cfg.listen,
            ListenAddr::Tcp("127.0.0.1:7878".parse().unwrap())
        );
        assert_eq!(
            cfg.containerd_address,
            PathBuf::from(DEFAULT_CONTAINERD_ADDRESS)
        );
        assert_eq!(cfg.namespace, "sandboxd");
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/sandboxd"));
        assert_eq!(cfg.embedded_containerd, EmbeddedContainerd::Auto);
        assert_eq!(cfg.runc_root, PathBuf::from("/run/containerd/runc"));
        assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(300));
        assert_eq!(cfg.max_streams_per_tenant, 1024);
        assert_eq!(cfg.exec_sync_memory, 512 << 20);
        assert_eq!(cfg.event_history, DEFAULT_EVENT_HISTORY);
    }

    #[test]
    fn event_history_is_a_count_from_flag_env_or_file() {
        let args = ServeArgs {
            event_history: Some("10".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(&args, &env_of(&[])).unwrap().event_history,
            10
        );
        let env = env_of(&[("SANDBOXD_EVENT_HISTORY", "20")]);
        let cfg = Config::resolve(&ServeArgs::default(), &env).unwrap();
        assert_eq!(cfg.event_history, 20);
        for bad in ["0", "-1", "many", "2000000"] {
            let args = ServeArgs {
                event_history: Some(bad.into()),
                ..Default::default()
            };
            let e = Config::resolve(&args, &env_of(&[])).unwrap_err();
            assert!(e.to_string().contains("event_history"), "{bad}: {e}");
        }
    }

    #[test]
    fn stream_and_memory_limits_come_from_flag_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "stream_idle_timeout = \"90s\"\nmax_streams_per_tenant = 7\nexec_sync_memory = \"64Mi\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.max_streams_per_tenant, 7);
        assert_eq!(cfg.exec_sync_memory, 64 << 20);
        let env = env_of(&[
            ("SANDBOXD_STREAM_IDLE_TIMEOUT", "2s"),
            ("SANDBOXD_MAX_STREAMS_PER_TENANT", "3"),
            ("SANDBOXD_EXEC_SYNC_MEMORY", "1048576"),
        ]);
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(2));
        assert_eq!(cfg.max_streams_per_tenant, 3);
        assert_eq!(cfg.exec_sync_memory, 1 << 20);
        let args = ServeArgs {
            config: Some(file),
            stream_idle_timeout: Some("500ms".into()),
            max_streams_per_tenant: Some("2".into()),
            exec_sync_memory: Some("1Gi".into()),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.stream_idle_timeout, Duration::from_millis(500));
        assert_eq!(cfg.max_streams_per_tenant, 2);
        assert_eq!(cfg.exec_sync_memory, 1 << 30);
        // A byte count may be a TOML number too.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "exec_sync_memory = 4096\nstream_idle_timeout = 45\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(cfg.exec_sync_memory, 4096);
        assert_eq!(cfg.stream_idle_timeout, Duration::from_secs(45));
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"unix:/tmp/file.sock\"\nnamespace = \"fromfile\"\ndata_dir = \"/srv/file\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            listen: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let env = env_of(&[
            ("SANDBOXD_LISTEN", "127.0.0.1:9001"),
            ("SANDBOXD_NAMESPACE", "fromenv"),
        ]);
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(
            cfg.listen,
            ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(cfg.namespace, "fromenv");
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/file"));
    }

    #[test]
    fn unix_listen_address_parses() {
        assert_eq!(
            "unix:/run/s.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/s.sock".into())
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn bad_values_name_the_setting() {
        let env = env_of(&[("SANDBOXD_EMBEDDED_CONTAINERD", "sometimes")]);
        let err = Config::resolve(&ServeArgs::default(), &env).unwrap_err();
        assert!(err.to_string().starts_with("embedded_containerd:"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let err = Config::resolve(&args, &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let env = env_of(&[("SANDBOXD_RUNC_ROOT", "runc")]);
        let err = Config::resolve(&ServeArgs::default(), &env).unwrap_err();
        assert!(err.to_string().starts_with("runc_root:"), "{err}");
        for (var, value, setting) in [
            ("SANDBOXD_STREAM_IDLE_TIMEOUT", "0s", "stream_idle_timeout:"),
            (
                "SANDBOXD_STREAM_IDLE_TIMEOUT",
                "soon",
                "stream_idle_timeout:",
            ),
            (
                "SANDBOXD_MAX_STREAMS_PER_TENANT",
                "0",
                "max_streams_per_tenant:",
            ),
            (
                "SANDBOXD_MAX_STREAMS_PER_TENANT",
                "-1",
                "max_streams_per_tenant:",
            ),
            ("SANDBOXD_EXEC_SYNC_MEMORY", "0", "exec_sync_memory:"),
            ("SANDBOXD_EXEC_SYNC_MEMORY", "lots", "exec_sync_memory:"),
        ] {
            let err = Config::resolve(&ServeArgs::default(), &env_of(&[(var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(setting), "{var}={value}: {err}");
        }
    }
    #[test]
    fn auth_settings_come_from_flag_env_or_file() {
        let cfg = Config::resolve(&ServeArgs::default(), &env_of(&[])).unwrap();
        assert_eq!(cfg.auth, AuthConfig::default());
        assert!(!cfg.auth.authenticates());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "tls_cert = \"/f/cert.pem\"\ntls_key = \"/f/key.pem\"\ntls_client_ca = \"/f/ca.pem\"\n\
             tenants = \"/f/tenants.toml\"\ntrust_forwarded_client_cert = true\n\
             allow_unauthenticated = false\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(
            cfg.auth,
            AuthConfig {
                tls: Some(TlsConfig {
                    cert: "/f/cert.pem".into(),
                    key: "/f/key.pem".into(),
                    client_ca: Some("/f/ca.pem".into()),
                }),
                tenants: Some("/f/tenants.toml".into()),
                trust_forwarded_client_cert: true,
                allow_unauthenticated: false,
            }
        );
        assert!(cfg.auth.authenticates());
        let env = env_of(&[
            ("SANDBOXD_TLS_CERT", "/e/cert.pem"),
            ("SANDBOXD_TLS_CLIENT_CA", ""),
            ("SANDBOXD_TENANTS", "/e/tenants.toml"),
            ("SANDBOXD_TRUST_FORWARDED_CLIENT_CERT", "false"),
            ("SANDBOXD_ALLOW_UNAUTHENTICATED", "yes"),
        ]);
        let cfg = Config::resolve(&args, &env).unwrap();
        let tls = cfg.auth.tls.clone().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/e/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/f/key.pem"));
        // An empty value unsets: only the file's client CA would set it, and env wins.
        assert_eq!(tls.client_ca, None);
        assert_eq!(cfg.auth.tenants, Some("/e/tenants.toml".into()));
        assert!(!cfg.auth.trust_forwarded_client_cert);
        assert!(cfg.auth.allow_unauthenticated);
        let args = ServeArgs {
            tls_key: Some("/a/key.pem".into()),
            trust_forwarded_client_cert: true,
            ..args
        };
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.auth.tls.unwrap().key, PathBuf::from("/a/key.pem"));
        assert!(cfg.auth.trust_forwarded_client_cert);
    }

    #[test]
    fn tls_and_auth_settings_are_checked_against_each_other() {
        for (pairs, setting, says) in [
            (&[("SANDBOXD_TLS_CERT", "/c")][..], "tls_key:", "--tls-key"),
            (&[("SANDBOXD_TLS_KEY", "/k")][..], "tls_cert:", "--tls-cert"),
            (
                &[("SANDBOXD_TLS_CLIENT_CA", "/ca")][..],
                "tls_client_ca:",
                "--tls-cert",
            ),
            (
                &[
                    ("SANDBOXD_TLS_CERT", "/c"),
                    ("SANDBOXD_TLS_KEY", "/k"),
                    ("SANDBOXD_LISTEN", "unix:/run/s.sock"),
                ][..],
                "tls_cert:",
                "unix socket",
            ),
            (
                &[("SANDBOXD_TRUST_FORWARDED_CLIENT_CERT", "1")][..],
                "trust_forwarded_client_cert:",
                "--tenants",
            ),
            (
                &[("SANDBOXD_ALLOW_UNAUTHENTICATED", "maybe")][..],
                "allow_unauthenticated:",
                "true or false",
            ),
        ] {
            let err = Config::resolve(&ServeArgs::default(), &env_of(pairs))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(setting), "{pairs:?}: {err}");
            assert!(err.contains(says), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn a_non_loopback_listen_needs_authentication_or_an_explicit_opt_out() {
        for listen in [
            "127.0.0.1:7878",
            "127.0.0.2:1",
            "[::1]:7878",
            "unix:/run/s.sock",
        ] {
            let env = env_of(&[("SANDBOXD_LISTEN", listen)]);
            assert!(
                Config::resolve(&ServeArgs::default(), &env).is_ok(),
                "{listen}"
            );
        }
        for listen in ["0.0.0.0:7878", "[::]:7878", "10.1.2.3:7878"] {
            let env = env_of(&[("SANDBOXD_LISTEN", listen)]);
            let err = Config::resolve(&ServeArgs::default(), &env)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("listen:"), "{err}");
            for hint in ["--tenants", "--tls-client-ca", "--allow-unauthenticated"] {
                assert!(err.contains(hint), "{err}");
            }
            // TLS alone authenticates nobody.
            let tls_only = env_of(&[
                ("SANDBOXD_LISTEN", listen),
                ("SANDBOXD_TLS_CERT", "/c"),
                ("SANDBOXD_TLS_KEY", "/k"),
            ]);
            assert!(Config::resolve(&ServeArgs::default(), &tls_only).is_err());
            for pairs in [
                &[("SANDBOXD_LISTEN", listen), ("SANDBOXD_TENANTS", "/t")][..],
                &[
                    ("SANDBOXD_LISTEN", listen),
                    ("SANDBOXD_TLS_CERT", "/c"),
                    ("SANDBOXD_TLS_KEY", "/k"),
                    ("SANDBOXD_TLS_CLIENT_CA", "/ca"),
                ][..],
                &[
                    ("SANDBOXD_LISTEN", listen),
                    ("SANDBOXD_ALLOW_UNAUTHENTICATED", "true"),
                ][..],
            ] {
                assert!(
                    Config::resolve(&ServeArgs::default(), &env_of(pairs)).is_ok(),
                    "{pairs:?}"
                );
            }
            let args = ServeArgs {
                listen: Some(listen.into()),
                allow_unauthenticated: true,
                ..Default::default()
            };
            assert!(Config::resolve(&args, &env_of(&[])).is_ok());
        }
    }

    #[test]
    fn walls_default_to_docker_seccomp_oom_500_and_limits() {
        let cfg = Config::resolve(&ServeArgs::default(), &env_of(&[])).unwrap();
        assert_eq!(cfg.walls, Walls::default());
        assert_eq!(cfg.walls.seccomp, SeccompProfile::Default);
        assert_eq!(cfg.walls.oom_score_adj, 500);
        assert_eq!(cfg.walls.default_memory, Some(1 << 30));
        assert_eq!(cfg.walls.default_cpu_millis, Some(1000));
        assert_eq!(cfg.walls.default_pids, 1024);
        assert_eq!(cfg.walls.total_memory, None);
        assert_eq!(cfg.walls.min_free_disk, Some(MinFree::Percent(5.0)));
    }

    #[test]
    fn walls_come_from_flag_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("seccomp.json");
        std::fs::write(
            &profile,
            r#"{"defaultAction":"SCMP_ACT_LOG","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            format!(
                "seccomp_profile = {:?}\noom_score_adj = -10\ndefault_memory = \"256Mi\"\n\
                 default_cpu_millis = 250\ndefault_pids = 64\ntotal_memory = \"4Gi\"\n\
                 total_cpu_millis = 1500\nmin_free_disk = \"10Gi\"\n",
                profile.display().to_string()
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        let SeccompProfile::Custom(p) = &cfg.walls.seccomp else {
            panic!("{:?}", cfg.walls.seccomp)
        };
        assert_eq!(
            p.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActLog
        );
        assert_eq!(cfg.walls.oom_score_adj, -10);
        assert_eq!(cfg.walls.default_memory, Some(256 << 20));
        assert_eq!(cfg.walls.default_cpu_millis, Some(250));
        assert_eq!(cfg.walls.default_pids, 64);
        assert_eq!(cfg.walls.total_memory, Some(4 << 30));
        assert_eq!(cfg.walls.total_cpu_millis, Some(1500));
        assert_eq!(cfg.walls.min_free_disk, Some(MinFree::Bytes(10 << 30)));
        let env = env_of(&[
            ("SANDBOXD_SECCOMP_PROFILE", "unconfined"),
            ("SANDBOXD_OOM_SCORE_ADJ", "900"),
            ("SANDBOXD_DEFAULT_MEMORY", "0"),
            ("SANDBOXD_DEFAULT_PIDS", "10"),
        ]);
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.walls.seccomp, SeccompProfile::Unconfined);
        assert_eq!(cfg.walls.oom_score_adj, 900);
        assert_eq!(cfg.walls.default_memory, None, "0 turns the default off");
        assert_eq!(cfg.walls.default_pids, 10);
        let off = env_of(&[("SANDBOXD_MIN_FREE_DISK", "0")]);
        assert_eq!(
            Config::resolve(&args, &off).unwrap().walls.min_free_disk,
            None
        );
        let pct = env_of(&[("SANDBOXD_MIN_FREE_DISK", "2.5%")]);
        assert_eq!(
            Config::resolve(&args, &pct).unwrap().walls.min_free_disk,
            Some(MinFree::Percent(2.5))
        );
        let args = ServeArgs {
            walls: WallArgs {
                seccomp_profile: Some("default".into()),
                oom_score_adj: Some("-1000".into()),
                default_cpu_millis: Some("0".into()),
                ..Default::default()
            },
            ..args
        };
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.walls.seccomp, SeccompProfile::Default);
        assert_eq!(cfg.walls.oom_score_adj, -1000);
        assert_eq!(cfg.walls.default_cpu_millis, None);
    }

    #[test]
    fn bad_walls_name_the_setting() {
        for (var, value, setting) in [
            ("SANDBOXD_SECCOMP_PROFILE", "strict", "seccomp_profile:"),
            (
                "SANDBOXD_SECCOMP_PROFILE",
                "/nonexistent.json",
                "seccomp_profile:",
            ),
            ("SANDBOXD_OOM_SCORE_ADJ", "1001", "oom_score_adj:"),
            ("SANDBOXD_OOM_SCORE_ADJ", "high", "oom_score_adj:"),
            ("SANDBOXD_DEFAULT_MEMORY", "1Ki", "default_memory:"),
            ("SANDBOXD_DEFAULT_MEMORY", "lots", "default_memory:"),
            ("SANDBOXD_DEFAULT_CPU_MILLIS", "5", "default_cpu_millis:"),
            ("SANDBOXD_DEFAULT_PIDS", "0", "default_pids:"),
            ("SANDBOXD_DEFAULT_PIDS", "-3", "default_pids:"),
            ("SANDBOXD_TOTAL_MEMORY", "x", "total_memory:"),
            ("SANDBOXD_TOTAL_CPU_MILLIS", "1.5", "total_cpu_millis:"),
            ("SANDBOXD_MIN_FREE_DISK", "100%", "min_free_disk:"),
            ("SANDBOXD_MIN_FREE_DISK", "-1%", "min_free_disk:"),
            ("SANDBOXD_MIN_FREE_DISK", "lots", "min_free_disk:"),
        ] {
            let err = Config::resolve(&ServeArgs::default(), &env_of(&[(var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(setting), "{var}={value}: {err}");
        }
    }

    #[test]
    fn registry_settings_come_from_flags_env_and_file_in_that_order() {
        let cfg = Config::resolve(&ServeArgs::default(), &env_of(&[])).unwrap();
        let r = &cfg.registries;
        assert!(r.auth_file.is_none() && r.mirrors.is_empty() && r.allow.is_none());
        assert_eq!(r.read_timeout, crate::image::registry::DEFAULT_READ_TIMEOUT);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sandboxd.toml");
        std::fs::write(
            &file,
            "registry_auth = \"/etc/sandboxd/auth.json\"\n\
             registry_mirror = [\"docker.io=https://a.example.com\", \"docker.io=http://10.0.0.5:5000\"]\n\
             registry_ca = \"reg.internal:5000=/etc/ca.pem\"\n\
             insecure_registry = [\"10.0.0.5:5000\"]\n\
             registry_allow = \"docker.io, Reg.Internal:5000\"\n\
             registry_read_timeout = 5\n\
             registry_max_layer_size = \"1Gi\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        let r = &cfg.registries;
        assert_eq!(
            r.auth_file.as_deref(),
            Some(Path::new("/etc/sandboxd/auth.json"))
        );
        let mirrors: Vec<(&str, &str)> = r
            .mirrors
            .iter()
            .map(|m| (m.host.as_str(), m.url.as_str()))
            .collect();
        assert_eq!(
            mirrors,
            [
                ("docker.io", "https://a.example.com/"),
                ("docker.io", "http://10.0.0.5:5000/")
            ]
        );
        assert_eq!(
            r.cas,
            [(
                "reg.internal:5000".to_string(),
                PathBuf::from("/etc/ca.pem")
            )]
        );
        assert_eq!(r.insecure, ["10.0.0.5:5000"]);
        assert_eq!(
            r.allow.as_deref(),
            Some(&["docker.io".to_string(), "reg.internal:5000".to_string()][..])
        );
        assert_eq!(r.read_timeout, Duration::from_secs(5));
        assert_eq!(r.max_layer_size, 1 << 30);

        // The variable (comma-separated) over the file, a repeated flag over both.
        let env = env_of(&[("SANDBOXD_REGISTRY_MIRRORS", "ghcr.io=https://b.example.com")]);
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.registries.mirrors.len(), 1);
        assert_eq!(cfg.registries.mirrors[0].host, "ghcr.io");
        let flags = ServeArgs {
            registry: RegistryArgs {
                registry_mirror: vec![
                    "index.docker.io=https://c.example.com".into(),
                    "quay.io=https://d.example.com".into(),
                ],
                ..Default::default()
            },
            ..args.clone()
        };
        let cfg = Config::resolve(&flags, &env).unwrap();
        let hosts: Vec<&str> = cfg
            .registries
            .mirrors
            .iter()
            .map(|m| m.host.as_str())
            .collect();
        assert_eq!(hosts, ["docker.io", "quay.io"]);
    }

    #[test]
    fn bad_registry_settings_name_the_setting() {
        for (var, value, setting) in [
            ("SANDBOXD_REGISTRY_AUTH", "relative.json", "registry_auth:"),
            ("SANDBOXD_REGISTRY_MIRRORS", "docker.io", "registry_mirror:"),
            (
                "SANDBOXD_REGISTRY_MIRRORS",
                "docker.io=ftp://x",
                "registry_mirror:",
            ),
            ("SANDBOXD_REGISTRY_CAS", "reg=ca.pem", "registry_ca:"),
            ("SANDBOXD_INSECURE_REGISTRIES", "a b", "insecure_registry:"),
            (
                "SANDBOXD_REGISTRY_ALLOW",
                "docker.io,x/y",
                "registry_allow:",
            ),
            (
                "SANDBOXD_REGISTRY_READ_TIMEOUT",
                "0s",
                "registry_read_timeout:",
            ),
            (
                "SANDBOXD_REGISTRY_CONNECT_TIMEOUT",
                "soon",
                "registry_connect_timeout:",
            ),
            (
                "SANDBOXD_REGISTRY_MAX_LAYER_SIZE",
                "0",
                "registry_max_layer_size:",
            ),
        ] {
            let err = Config::resolve(&ServeArgs::default(), &env_of(&[(var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(setting), "{var}={value}: {err}");
        }
    }

    #[test]
    fn isolation_settings_come_from_flags_env_and_file() {
        let cfg = Config::resolve(&ServeArgs::default(), &env_of(&[])).unwrap();
        assert_eq!(cfg.network.host_ports.to_string(), "20000-29999");
        assert!(cfg.network.deny_egress.is_empty());
        assert_eq!(cfg.network.reserved_ports, [7878]);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "host_port_range = \"30000-30010\"\ndeny_egress = [\"10.96.0.0/12\", \"10.244.0.0/16\"]\nmetrics_listen = \"127.0.0.1:9100\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        let cfg = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(cfg.network.host_ports.to_string(), "30000-30010");
        let deny: Vec<String> = cfg
            .network
            .deny_egress
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(deny, ["10.96.0.0/12", "10.244.0.0/16"]);
        assert_eq!(cfg.network.reserved_ports, [7878, 9100]);

        let env = env_of(&[
            ("SANDBOXD_HOST_PORT_RANGE", "1000-2000"),
            ("SANDBOXD_DENY_EGRESS", "192.0.2.0/24"),
        ]);
        let cfg = Config::resolve(&args, &env).unwrap();
        assert_eq!(cfg.network.host_ports.to_string(), "1000-2000");
        assert_eq!(cfg.network.deny_egress[0].to_string(), "192.0.2.0/24");
        let flags = ServeArgs {
            isolation: IsolationArgs {
                host_port_range: Some("40000-40001".into()),
                deny_egress: Some("".into()),
            },
            ..args
        };
        let cfg = Config::resolve(&flags, &env).unwrap();
        assert_eq!(cfg.network.host_ports.to_string(), "40000-40001");
        assert!(cfg.network.deny_egress.is_empty());

        for (var, value, setting) in [
            ("SANDBOXD_HOST_PORT_RANGE", "2000-1000", "host_port_range"),
            ("SANDBOXD_HOST_PORT_RANGE", "80", "host_port_range"),
            ("SANDBOXD_DENY_EGRESS", "10.0.0.0/8,nope", "deny_egress"),
        ] {
            let err = Config::resolve(&ServeArgs::default(), &env_of(&[(var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(setting), "{var}={value}: {err}");
        }
    }
}
