//! The tenants file (`--tenants`): who may call with which bearer token or SPIFFE ID, and each
//! tenant's quotas.
//!
//! ```toml
//! [tenants.alice]
//! tokens_sha256 = ["<hex sha256 of a token>"]   # never the token itself
//! max_sandboxes = 20                              # optional quotas, absent = no limit
//! max_memory_bytes = 17179869184
//! max_cpu_millis = 8000
//! spiffe_ids = ["spiffe://cluster.local/ns/agents/sa/alice"]
//! registry_auth = "/etc/sandboxd/alice-registries.json"   # Docker config.json: her credentials
//! ```
//!
//! The file holds only hashes: a token is looked up by hashing what the caller sent and
//! comparing it with every hash in constant time. The [`Registry`] keeps the last good version
//! and re-reads the file when its content changes (and on SIGHUP, see the server's reload
//! loop); a file that does not parse is reported and the previous version stays in force.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::caller::Tenant;
use crate::watched::Watched;

/// What the URI SAN of a mesh workload's certificate starts with.
const SPIFFE_SCHEME: &str = "spiffe://";

/// A tenant's limits from the tenants file; `None` is no limit. Read by quota enforcement;
/// authentication only carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Sandboxes the tenant may have at once.
    pub max_sandboxes: Option<u64>,
    /// Sum of the memory limits of the tenant's sandboxes, in bytes.
    pub max_memory_bytes: Option<u64>,
    /// Sum of the CPU limits of the tenant's sandboxes, in thousandths of a CPU.
    pub max_cpu_millis: Option<u64>,
}

/// No limits: the quotas of a tenant without an entry.
const NO_QUOTAS: Quotas = Quotas {
    max_sandboxes: None,
    max_memory_bytes: None,
    max_cpu_millis: None,
};

/// One tenant's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantEntry {
    /// Its limits.
    pub quotas: Quotas,
    /// SPIFFE IDs whose forwarded certificates are this tenant's.
    pub spiffe_ids: Vec<String>,
    /// How many tokens it has (the hashes themselves stay private).
    pub tokens: usize,
    /// Its own registry credentials (a Docker `config.json`), used instead of the node's
    /// `--registry-auth` for its pulls and exports.
    pub registry_auth: Option<std::path::PathBuf>,
}

/// A parsed tenants file.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    entries: BTreeMap<Tenant, TenantEntry>,
    /// Every token hash with its tenant, scanned whole on each lookup.
    tokens: Vec<([u8; 32], Tenant)>,
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tenants: BTreeMap<String, Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    tokens_sha256: Vec<String>,
    max_sandboxes: Option<u64>,
    max_memory_bytes: Option<u64>,
    max_cpu_millis: Option<u64>,
    #[serde(default)]
    spiffe_ids: Vec<String>,
    registry_auth: Option<std::path::PathBuf>,
}

impl Tenants {
    /// Parses the file's text; the error says what is wrong and where.
    pub fn parse(text: &str) -> Result<Tenants, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        let mut tenants = Tenants::default();
        let mut spiffe_seen = HashSet::new();
        for (name, entry) in file.tenants {
            let tenant = Tenant::new(&name).map_err(|e| format!("[tenants.{name}]: {e}"))?;
            for hex_hash in &entry.tokens_sha256 {
                let hash = parse_sha256(hex_hash).map_err(|e| {
                    format!("[tenants.{name}] tokens_sha256: {e} (give `sha256sum` of each token)")
                })?;
                if let Some((_, other)) = tenants.tokens.iter().find(|(h, _)| *h == hash) {
                    return Err(format!(
                        "[tenants.{name}] tokens_sha256: the same token hash is also listed for \
                         tenant {other:?}; a token must name one tenant"
                    ));
                }
                tenants.tokens.push((hash, tenant.clone()));
            }
            for id in &entry.spiffe_ids {
                if !id.starts_with(SPIFFE_SCHEME) || id.len() == SPIFFE_SCHEME.len() {
                    return Err(format!(
                        "[tenants.{name}] spiffe_ids: {id:?} is not a SPIFFE ID (spiffe://...)"
                    ));
                }
                if !spiffe_seen.insert(id.clone()) {
                    return Err(format!(
                        "[tenants.{name}] spiffe_ids: {id:?} is listed for two tenants"
                    ));
                }
            }
            if let Some(path) = &entry.registry_auth {
                if !path.is_absolute() {
                    return Err(format!(
                        "[tenants.{name}] registry_auth: {} is not an absolute path",
                        path.display()
                    ));
                }
            }
            tenants.entries.insert(
                tenant,
                TenantEntry {
                    registry_auth: entry.registry_auth,
                    quotas: Quotas {
                        max_sandboxes: entry.max_sandboxes,
                        max_memory_bytes: entry.max_memory_bytes,
                        max_cpu_millis: entry.max_cpu_millis,
                    },
                    spiffe_ids: entry.spiffe_ids,
                    tokens: entry.tokens_sha256.len(),
                },
            );
        }
        Ok(tenants)
    }

    /// The tenant whose token is `token`. The token's hash is compared with every hash in the
    /// file in constant time, so how long this takes says nothing about how close a guess was.
    pub fn by_token(&self, token: &str) -> Option<&Tenant> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (hash, tenant) in &self.tokens {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(tenant);
            }
        }
        found
    }

    /// The tenant a SPIFFE ID belongs to.
    pub fn by_spiffe_id(&self, id: &str) -> Option<&Tenant> {
        self.entries
            .iter()
            .find(|(_, e)| e.spiffe_ids.iter().any(|s| s == id))
            .map(|(t, _)| t)
    }

    /// `tenant`'s quotas; none when it has no entry (an mTLS tenant need not have one).
    pub fn quotas(&self, tenant: &Tenant) -> &Quotas {
        self.entries.get(tenant).map_or(&NO_QUOTAS, |e| &e.quotas)
    }

    /// `tenant`'s own registry credentials file, if it has one.
    pub fn registry_auth(&self, tenant: &Tenant) -> Option<&Path> {
        self.entries.get(tenant)?.registry_auth.as_deref()
    }

    /// Every tenant with an entry, by name.
    pub fn entries(&self) -> &BTreeMap<Tenant, TenantEntry> {
        &self.entries
    }
}

/// 64 hex digits as 32 bytes.
fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let wrong = || format!("{s:?} is not a hex SHA-256 (64 hex digits)");
    let bytes = hex::decode(s.trim()).map_err(|_| wrong())?;
    bytes.try_into().map_err(|_| wrong())
}

/// The tenants in force, replaced whole when the file changes.
pub type Registry = Watched<Tenants>;

/// Reads and parses the tenants file at `path`; a problem names the file.
pub fn load(path: &Path) -> Result<Registry, String> {
    let shown = path.display().to_string();
    Watched::load(
        vec![path.to_path_buf()],
        Box::new(move |contents: &[Vec<u8>]| {
            let text = std::str::from_utf8(&contents[0])
                .map_err(|_| format!("tenants file {shown}: it is not UTF-8 text"))?;
            Tenants::parse(text).map_err(|e| format!("tenants file {shown}: {e}"))
        }),
    )
    .map_err(|e| {
        if e.starts_with("tenants file") {
            e
        } else {
            format!("tenants file {e}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    #[test]
    fn the_issue_example_parses_with_its_quotas() {
        let text = format!(
            "[tenants.alice]\ntokens_sha256 = [\"{}\", \"{}\"]\nmax_sandboxes = 20\n\
             max_memory_bytes = 17179869184\nmax_cpu_millis = 8000\n\n[tenants.bob]\n\
             tokens_sha256 = [\"{}\"]\n",
            sha("a1"),
            sha("a2").to_uppercase(),
            sha("b1")
        );
        let t = Tenants::parse(&text).unwrap();
        let alice = Tenant::new("alice").unwrap();
        assert_eq!(t.by_token("a1"), Some(&alice));
        assert_eq!(t.by_token("a2"), Some(&alice));
        assert_eq!(t.by_token("b1").map(Tenant::as_str), Some("bob"));
        assert_eq!(t.by_token("a3"), None);
        assert_eq!(t.by_token(""), None);
        assert_eq!(
            t.quotas(&alice),
            &Quotas {
                max_sandboxes: Some(20),
                max_memory_bytes: Some(17179869184),
                max_cpu_millis: Some(8000),
            }
        );
        assert_eq!(t.quotas(&Tenant::new("bob").unwrap()), &Quotas::default());
        assert_eq!(
            t.quotas(&Tenant::new("nobody").unwrap()),
            &Quotas::default()
        );
        assert_eq!(t.entries()[&alice].tokens, 2);
        assert!(Tenants::parse("").unwrap().entries().is_empty());
    }

    #[test]
    fn spiffe_ids_map_to_their_tenant() {
        let t = Tenants::parse(
            "[tenants.a]\nspiffe_ids = [\"spiffe://td/ns/x/sa/a\"]\n[tenants.b]\n\
             spiffe_ids = [\"spiffe://td/ns/x/sa/b\", \"spiffe://td/b2\"]\n",
        )
        .unwrap();
        assert_eq!(
            t.by_spiffe_id("spiffe://td/b2").map(Tenant::as_str),
            Some("b")
        );
        assert_eq!(
            t.by_spiffe_id("spiffe://td/ns/x/sa/a").map(Tenant::as_str),
            Some("a")
        );
        assert_eq!(t.by_spiffe_id("spiffe://td/ns/x/sa/c"), None);
    }

    #[test]
    fn bad_files_say_what_is_wrong_where() {
        let h = sha("t");
        for (text, expect) in [
            ("[tenants.a]\ntokens_sha256 = [\"abc\"]\n", "tokens_sha256"),
            ("[tenants.a]\ntokens_sha256 = [\"zz\"]\n", "not a hex SHA-256"),
            ("[tenants.a]\ntoken = [\"x\"]\n", "token"),
            ("[tenants.a]\nmax_sandboxes = -1\n", "max_sandboxes"),
            ("[tenants.a]\nmax_sandboxes = \"lots\"\n", "max_sandboxes"),
            ("[tenants.\"a b\"]\n", "not a tenant name"),
            ("[tenants.a]\nspiffe_ids = [\"https://x\"]\n", "not a SPIFFE ID"),
            (
                "[tenants.a]\nregistry_auth = \"relative.json\"\n",
                "registry_auth: relative.json is not an absolute path",
            ),
            (
                "[tenants.a]\nspiffe_ids = [\"spiffe://x\"]\n[tenants.b]\nspiffe_ids = [\"spiffe://x\"]\n",
                "two tenants",
            ),
            (
                &format!("[tenants.a]\ntokens_sha256 = [\"{h}\"]\n[tenants.b]\ntokens_sha256 = [\"{h}\"]\n"),
                "one tenant",
            ),
            ("[tenants.a\n", "expected"),
            ("users = 1\n", "users"),
        ] {
            let err = Tenants::parse(text).unwrap_err();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }

    #[test]
    fn reload_puts_a_changed_file_in_force_and_keeps_the_last_good_one() {
        use crate::watched::Reload;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        let version = |token: &str| format!("[tenants.a]\ntokens_sha256 = [\"{}\"]\n", sha(token));
        std::fs::write(&path, version("one")).unwrap();
        let registry = load(&path).unwrap();
        assert!(registry.current().by_token("one").is_some());
        std::fs::write(&path, version("two")).unwrap();
        assert_eq!(registry.reload(), Reload::Reloaded);
        assert!(registry.current().by_token("one").is_none());
        assert!(registry.current().by_token("two").is_some());
        std::fs::write(&path, "[tenants.a\n").unwrap();
        let Reload::Rejected(why) = registry.reload() else {
            panic!("a bad file was not rejected")
        };
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert!(registry.current().by_token("two").is_some());
    }

    #[test]
    fn a_bad_file_at_load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        std::fs::write(&path, "[tenants.a]\ntokens_sha256 = [\"nope\"]\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.starts_with("tenants file "), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("tokens_sha256"), "{err}");
        let err = load(&dir.path().join("missing")).unwrap_err();
        assert!(
            err.contains("missing") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(load(&path).unwrap_err().contains("UTF-8"));
    }
}
