//! Domain types of sandboxes: valid by construction (parse, don't validate).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::image::ImageRef;
use sha2::{Digest, Sha256};

/// Label keys sandboxd reserves for itself.
pub const RESERVED_LABEL_PREFIXES: [&str; 2] = ["sandboxd.io/", "containerd.io/"];
/// Most labels a sandbox may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 128;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 1024;
/// Most environment variables of one process.
pub const MAX_ENV: usize = 1024;
/// Longest argv element or env value.
pub const MAX_ARG_LEN: usize = 128 * 1024;
/// Largest memory limit accepted (1 TiB): anything above is a typo.
pub const MAX_MEMORY_BYTES: i64 = 1 << 40;
/// Smallest memory limit accepted: runc cannot start a process in less.
pub const MIN_MEMORY_BYTES: i64 = 6 << 20;
/// Largest CPU limit accepted, in millicores.
pub const MAX_CPU_MILLIS: i64 = 1024 * 1000;
/// Largest pids limit accepted.
pub const MAX_PIDS: i64 = 4_194_304;
/// Longest TTL accepted (one year).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A sandbox id: `[a-z0-9][a-z0-9_.-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Parses `s`, naming `field` in the error.
    pub fn parse(field: &str, s: &str) -> Result<SandboxId> {
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'_' | b'.' | b'-'))
            });
        if valid {
            Ok(SandboxId(s.to_string()))
        } else if s.is_empty() {
            Err(Error::invalid(field, "a sandbox id is required"))
        } else {
            Err(Error::invalid(
                field,
                format!("{s:?} does not match [a-z0-9][a-z0-9_.-]{{0,62}}"),
            ))
        }
    }

    /// A fresh random id.
    pub fn generate() -> SandboxId {
        SandboxId(format!("sb-{}", crate::util::random_hex(8)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lifecycle state of a sandbox, derived from containerd's container and task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Made, never started.
    Created,
    /// PID 1 is running.
    Running,
    /// Frozen (while a snapshot is captured).
    Paused,
    /// PID 1 has exited or the sandbox was stopped.
    Stopped,
    /// containerd reported something we do not recognise.
    Unknown,
}

/// Resource limits; `None` means the service default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// CPU limit in millicores.
    pub cpu_millis: Option<i64>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// Most processes at once.
    pub pids_limit: Option<i64>,
}

impl Resources {
    /// The pids limit that applies: the one asked for, else the default.
    pub fn pids(&self) -> i64 {
        self.pids_limit.unwrap_or(crate::config::DEFAULT_PIDS_LIMIT)
    }

    /// Validates raw request values (0 = default).
    pub fn parse(cpu_millis: i64, memory_bytes: i64, pids_limit: i64) -> Result<Resources> {
        fn opt(field: &str, v: i64, min: i64, max: i64, unit: &str) -> Result<Option<i64>> {
            match v {
                0 => Ok(None),
                v if v < 0 => Err(Error::invalid(field, format!("{v} is negative"))),
                v if v < min => Err(Error::invalid(
                    field,
                    format!("{v} is below the minimum of {min} {unit}"),
                )),
                v if v > max => Err(Error::invalid(
                    field,
                    format!("{v} exceeds the maximum of {max} {unit}"),
                )),
                v => Ok(Some(v)),
            }
        }
        Ok(Resources {
            cpu_millis: opt(
                "resources.cpu_millis",
                cpu_millis,
                10,
                MAX_CPU_MILLIS,
                "millicores",
            )?,
            memory_bytes: opt(
                "resources.memory_bytes",
                memory_bytes,
                MIN_MEMORY_BYTES,
                MAX_MEMORY_BYTES,
                "bytes",
            )?,
            pids_limit: opt("resources.pids_limit", pids_limit, 1, MAX_PIDS, "processes")?,
        })
    }
}

/// Network mode of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Own network namespace with loopback only.
    None,
    /// Attached to the node's bridge through CNI.
    Bridge,
}

impl NetworkMode {
    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Bridge => "bridge",
        }
    }
}

/// Where a sandbox's filesystem comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An image reference.
    Image(ImageRef),
    /// A committed snapshot id (a fork).
    Snapshot(String),
}

/// A validated CreateSandbox request.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Requested or generated id.
    pub id: SandboxId,
    /// Whether `id` was generated (the caller named none).
    pub id_generated: bool,
    /// Image or snapshot.
    pub source: Source,
    /// PID 1 argv; empty = idle init.
    pub command: Vec<String>,
    /// Extra environment, merged over the image's.
    pub env: BTreeMap<String, String>,
    /// Working directory override.
    pub working_dir: Option<String>,
    /// User override: `name`, `uid`, `uid:gid`, `name:group`.
    pub user: Option<String>,
    /// Hostname; defaults to the id.
    pub hostname: String,
    /// User labels.
    pub labels: HashMap<String, String>,
    /// Limits.
    pub resources: Resources,
    /// Network mode.
    pub network: NetworkMode,
    /// Egress policy and port forwards (BRIDGE only; the default for NONE).
    pub net_policy: crate::net::policy::NetPolicy,
    /// Start right away.
    pub start: bool,
    /// Delete after this long.
    pub ttl: Option<Duration>,
    /// Set on warm-pool sandboxes: the image name whose pool it fills.
    pub pool: Option<String>,
    /// The client's request id, for safe retries.
    pub request: Option<RequestKey>,
}

/// Validates user labels.
pub fn parse_labels(
    field: &str,
    labels: HashMap<String, String>,
) -> Result<HashMap<String, String>> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(
            field,
            format!("{} labels exceed the limit of {MAX_LABELS}", labels.len()),
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY {
            return Err(Error::invalid(
                field,
                format!("label key {k:?} must be 1 to {MAX_LABEL_KEY} bytes"),
            ));
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return Err(Error::invalid(
                field,
                format!("label key {k:?} may only hold letters, digits, '.', '_', '-' and '/'"),
            ));
        }
        if let Some(p) = RESERVED_LABEL_PREFIXES.iter().find(|p| k.starts_with(*p)) {
            return Err(Error::invalid(
                field,
                format!("label key {k:?} uses the reserved prefix {p:?}"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE {
            return Err(Error::invalid(
                field,
                format!("value of label {k:?} exceeds {MAX_LABEL_VALUE} bytes"),
            ));
        }
        if v.contains(',') || v.chars().any(char::is_control) {
            return Err(Error::invalid(
                field,
                format!("value of label {k:?} may not contain ',' or control characters"),
            ));
        }
    }
    Ok(labels)
}

/// Validates environment variables.
pub fn parse_env(field: &str, env: HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if env.len() > MAX_ENV {
        return Err(Error::invalid(
            field,
            format!("{} variables exceed the limit of {MAX_ENV}", env.len()),
        ));
    }
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::invalid(
                field,
                format!("variable name {k:?} must be non-empty without '=' or NUL"),
            ));
        }
        if v.contains('\0') || v.len() > MAX_ARG_LEN {
            return Err(Error::invalid(
                field,
                format!("value of {k:?} contains NUL or is too long"),
            ));
        }
    }
    Ok(env.into_iter().collect())
}

/// Validates an argv.
pub fn parse_args(field: &str, args: Vec<String>) -> Result<Vec<String>> {
    if let Some(bad) = args
        .iter()
        .find(|a| a.contains('\0') || a.len() > MAX_ARG_LEN)
    {
        return Err(Error::invalid(
            field,
            format!(
                "argument {:?} contains NUL or is too long",
                bad.chars().take(40).collect::<String>()
            ),
        ));
    }
    if args.first().is_some_and(|a| a.is_empty()) {
        return Err(Error::invalid(
            field,
            "the program (first argument) is empty",
        ));
    }
    Ok(args)
}

/// Validates an absolute path inside the sandbox.
pub fn parse_abs_path(field: &str, p: &str) -> Result<String> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(Error::invalid(
            field,
            format!("{p:?} must be an absolute path"),
        ));
    }
    Ok(p.to_string())
}

/// Validates a hostname (RFC 1123 label-ish, up to 64 bytes).
pub fn parse_hostname(field: &str, h: &str) -> Result<String> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with('-')
        && !h.starts_with('.');
    if ok {
        Ok(h.to_string())
    } else {
        Err(Error::invalid(
            field,
            format!("{h:?} is not a valid hostname"),
        ))
    }
}

/// Validates a TTL.
pub fn parse_ttl(field: &str, ttl: Option<Duration>, negative: bool) -> Result<Option<Duration>> {
    if negative {
        return Err(Error::invalid(field, "a ttl cannot be negative"));
    }
    match ttl {
        Some(d) if d.is_zero() => Ok(None),
        Some(d) if d > MAX_TTL => Err(Error::invalid(field, "a ttl cannot exceed one year")),
        other => Ok(other),
    }
}

/// A sandbox as reported to callers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    /// Its id.
    pub id: SandboxId,
    /// Normalised image reference.
    pub image: String,
    /// Source snapshot, when forked or restored.
    pub snapshot_id: String,
    /// Lifecycle state.
    pub state: State,
    /// Host pid of PID 1 while running.
    pub pid: u32,
    /// Exit status of PID 1 once it exited.
    pub exit_status: Option<i32>,
    /// PID 1 was killed by the kernel's OOM killer (the sandbox reached its memory limit).
    pub oom_killed: bool,
    /// User labels.
    pub labels: HashMap<String, String>,
    /// Effective limits.
    pub resources: Resources,
    /// Network mode.
    pub network: NetworkMode,
    /// IP address on the bridge.
    pub ip_address: String,
    /// Gateway on the bridge.
    pub gateway: String,
    /// Egress policy and port forwards (BRIDGE only).
    pub net_policy: Option<crate::net::policy::NetPolicy>,
    /// PID 1 argv.
    pub command: Vec<String>,
    /// Hostname.
    pub hostname: String,
    /// Creation time.
    pub created_at: Option<SystemTime>,
    /// Last start.
    pub started_at: Option<SystemTime>,
    /// Expiry.
    pub expires_at: Option<SystemTime>,
    /// When PID 1 last exited.
    pub exited_at: Option<SystemTime>,
}

/// A parsed `k=v,k2=v2` selector: all pairs must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<(String, String)>);

impl LabelSelector {
    /// Parses `s`; empty selects everything.
    pub fn parse(field: &str, s: &str) -> Result<LabelSelector> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| Error::invalid(field, format!("{part:?} is not key=value")))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(Error::invalid(field, format!("{part:?} has an empty key")));
            }
            pairs.push((k.to_string(), v.trim().to_string()));
        }
        Ok(LabelSelector(pairs))
    }

    /// True when every pair is in `labels`.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Default page size of list calls.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of list calls.
pub const MAX_PAGE_SIZE: usize = 1000;

/// A validated page request: size and the id to continue after.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// How many to return.
    pub size: usize,
    /// Return ids strictly greater than this.
    pub after: Option<String>,
    /// The query the token belongs to (selector and filters): a token is only valid for it.
    pub scope: String,
}

impl Page {
    /// Parses page_size and page_token for a query described by `scope`; a token issued for
    /// another query is INVALID_ARGUMENT.
    pub fn parse(size: i32, token: &str, scope: &str) -> Result<Page> {
        let size = match size {
            s if s < 0 => return Err(Error::invalid("page_size", format!("{s} is negative"))),
            0 => DEFAULT_PAGE_SIZE,
            s => (s as usize).min(MAX_PAGE_SIZE),
        };
        let foreign = || {
            Error::invalid(
                "page_token",
                "not a token this service issued for this query",
            )
        };
        let after = if token.is_empty() {
            None
        } else {
            let bytes = hex::decode(token).map_err(|_| foreign())?;
            let text = String::from_utf8(bytes).map_err(|_| foreign())?;
            // Ids never hold a newline; the scope may.
            let (token_scope, id) = text.rsplit_once('\n').ok_or_else(foreign)?;
            if token_scope != scope {
                return Err(Error::invalid(
                    "page_token",
                    "the token belongs to a different query (label_selector or filter changed)",
                ));
            }
            Some(id.to_string())
        };
        Ok(Page {
            size,
            after,
            scope: scope.to_string(),
        })
    }

    /// Every item at once (internal callers).
    pub fn all() -> Page {
        Page {
            size: usize::MAX,
            after: None,
            scope: String::new(),
        }
    }

    /// The opaque token that continues after `id`.
    fn token_after(&self, id: &str) -> String {
        hex::encode(format!("{}\n{id}", self.scope))
    }

    /// Applies the page to items sorted by key; returns the page and the next token.
    pub fn apply<T>(&self, sorted: Vec<T>, key: impl Fn(&T) -> &str) -> (Vec<T>, String) {
        let mut items: Vec<T> = sorted
            .into_iter()
            .filter(|t| self.after.as_deref().is_none_or(|a| key(t) > a))
            .collect();
        let next = if items.len() > self.size {
            items.truncate(self.size);
            items
                .last()
                .map(|t| self.token_after(key(t)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        (items, next)
    }
}

/// The longest request id.
const MAX_REQUEST_ID: usize = 128;

/// A client's request id and a digest of its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    id: String,
    digest: String,
}

impl RequestKey {
    /// `None` for an empty `id`; else the key of `id` with the request's canonical text
    /// `canonical` (every field but the id, maps in key order). INVALID_ARGUMENT for an id
    /// that is too long or has characters outside `[A-Za-z0-9._:-]`.
    pub fn parse(field: &str, id: &str, canonical: &str) -> Result<Option<RequestKey>> {
        if id.is_empty() {
            return Ok(None);
        }
        let valid = id.len() <= MAX_REQUEST_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !valid {
            return Err(Error::invalid(
                field,
                format!("{id:?} is not 1-{MAX_REQUEST_ID} characters of [A-Za-z0-9._:-]"),
            ));
        }
        Ok(Some(RequestKey {
            id: id.to_string(),
            digest: hex::encode(&Sha256::digest(canonical.as_bytes())[..16]),
        }))
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The digest of the request.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_follow_the_contract_pattern() {
        for ok in ["a", "0", "a-b_c.d", &"x".repeat(63)] {
            assert!(SandboxId::parse("sandbox_id", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".a",
            "A",
            "a b",
            "a/b",
            &"x".repeat(64),
            "é",
        ] {
            let err = SandboxId::parse("sandbox_id", bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid sandbox_id"),
                "{bad}: {err}"
            );
        }
        assert!(SandboxId::parse("x", SandboxId::generate().as_str()).is_ok());
    }

    #[test]
    fn resources_reject_negative_and_absurd_values() {
        assert_eq!(Resources::parse(0, 0, 0).unwrap(), Resources::default());
        assert!(Resources::parse(-1, 0, 0)
            .unwrap_err()
            .to_string()
            .contains("resources.cpu_millis"));
        assert!(Resources::parse(0, 1 << 50, 0)
            .unwrap_err()
            .to_string()
            .contains("resources.memory_bytes"));
        assert!(Resources::parse(0, 1024, 0)
            .unwrap_err()
            .to_string()
            .contains("minimum"));
        assert!(Resources::parse(0, 0, -5)
            .unwrap_err()
            .to_string()
            .contains("resources.pids_limit"));
        assert_eq!(
            Resources::parse(500, 64 << 20, 100).unwrap().cpu_millis,
            Some(500)
        );
    }

    #[test]
    fn labels_reject_reserved_and_oversized_keys() {
        let one = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert!(parse_labels("labels", one("team", "a")).is_ok());
        assert!(parse_labels("labels", one("sandboxd.io/x", "a")).is_err());
        assert!(parse_labels("labels", one("containerd.io/gc.root", "a")).is_err());
        assert!(parse_labels("labels", one(&"k".repeat(200), "a")).is_err());
        assert!(parse_labels("labels", one("k", &"v".repeat(2000))).is_err());
        assert!(parse_labels("labels", one("a=b", "v")).is_err());
        assert!(parse_labels("labels", one("k", "a,b")).is_err());
    }

    #[test]
    fn selector_requires_every_pair() {
        let sel = LabelSelector::parse("label_selector", "a=1, b=2").unwrap();
        let labels = HashMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        assert!(sel.matches(&labels));
        let partial = HashMap::from([("a".to_string(), "1".to_string())]);
        assert!(!sel.matches(&partial));
        assert!(LabelSelector::parse("label_selector", "")
            .unwrap()
            .matches(&HashMap::new()));
        assert!(LabelSelector::parse("label_selector", "novalue").is_err());
    }

    #[test]
    fn pages_walk_every_item_once() {
        let ids: Vec<String> = (0..25).map(|i| format!("s{i:02}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = Page::parse(10, &token, "team=a").unwrap();
            let (items, next) = page.apply(ids.clone(), |s| s.as_str());
            seen.extend(items);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, ids);
        assert!(Page::parse(-1, "", "").is_err());
        assert!(Page::parse(1, "zz", "").is_err());
        assert_eq!(Page::parse(5000, "", "").unwrap().size, MAX_PAGE_SIZE);
        // A token only continues the query it came from.
        let first = Page::parse(1, "", "team=a").unwrap();
        let (_, token) = first.apply(ids.clone(), |s| s.as_str());
        assert!(Page::parse(1, &token, "team=b").is_err());
        assert!(Page::parse(1, &token, "team=a").is_ok());
    }
}
