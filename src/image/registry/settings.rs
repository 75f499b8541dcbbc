//! The registry settings as the operator gives them (`--registry-*` flags), parsed into hosts,
//! URLs and files. Hosts are compared in one normal form: lowercase `host[:port]`, with Docker
//! Hub's aliases folded into `docker.io` (what short image names mean).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::net::policy::Ipv4Net;

/// Default time to open a TCP (and TLS) connection to a registry.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a registry may send nothing while sandboxd waits on an answer or a body.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest layer a manifest may declare.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 16 << 30;

/// Registry host of short image names.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API answers.
pub(super) const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// How sandboxd reaches registries.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Docker `config.json` with credentials per registry host; re-read when it changes.
    pub auth_file: Option<PathBuf>,
    /// Mirrors tried in order before a host itself, for pulls.
    pub mirrors: Vec<Mirror>,
    /// PEM CA certificates trusted for one host each (beside the system's roots).
    pub cas: Vec<(String, PathBuf)>,
    /// Hosts reached over plain HTTP.
    pub insecure: Vec<String>,
    /// When set, the only hosts pulls and exports reach (with their mirrors).
    pub allow: Option<Vec<String>>,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Time without a byte before a request is given up.
    pub read_timeout: Duration,
    /// Largest layer a manifest may declare.
    pub max_layer_size: u64,
    /// Addresses a token realm must never be (the node's `--deny-egress` ranges).
    pub denied_networks: Vec<Ipv4Net>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            auth_file: None,
            mirrors: Vec::new(),
            cas: Vec::new(),
            insecure: Vec::new(),
            allow: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
            denied_networks: Vec::new(),
        }
    }
}

/// A mirror of a registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The host whose images it serves (`docker.io` for short names).
    pub host: String,
    /// Its base URL; `/v2/...` is appended.
    pub url: Url,
}

/// A registry host in normal form: lowercase `host[:port]`, Docker Hub's aliases as `docker.io`.
pub fn normalize_host(input: &str) -> Result<String, String> {
    let host = input.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
    if !valid {
        return Err(format!(
            "{input:?} is not a registry host (HOST or HOST:PORT)"
        ));
    }
    Ok(match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    })
}

/// The host part of `host[:port]` (brackets of an IPv6 literal removed).
pub fn host_part(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    }
}

/// Whether `host[:port]` names this machine's loopback (which speaks plain HTTP, as Docker and
/// containerd assume).
pub fn is_loopback_host(host: &str) -> bool {
    let name = host_part(host);
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `HOST=URL`, as `--registry-mirror` takes it.
pub fn parse_mirror(input: &str) -> Result<Mirror, String> {
    let (host, url) = input
        .split_once('=')
        .ok_or_else(|| format!("{input:?} is not HOST=URL"))?;
    let host = normalize_host(host)?;
    let mut url = Url::parse(url.trim()).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{url} must be an http:// or https:// URL with a host"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{url}: a mirror URL carries no query, fragment or credentials (put those in \
             --registry-auth)"
        ));
    }
    // A base path keeps no trailing slash: `/v2/...` is appended to it.
    let path = url.path().trim_end_matches('/').to_string();
    url.set_path(&path);
    Ok(Mirror { host, url })
}

/// `HOST=FILE`, as `--registry-ca` takes it.
pub fn parse_host_file(input: &str) -> Result<(String, PathBuf), String> {
    let (host, file) = input
        .split_once('=')
        .ok_or_else(|| format!("{input:?} is not HOST=FILE"))?;
    let path = PathBuf::from(file.trim());
    if !path.is_absolute() {
        return Err(format!("{file:?} must be an absolute path"));
    }
    Ok((normalize_host(host)?, path))
}

/// The `host[:port]` a URL names, in normal form.
pub(super) fn url_host(url: &Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    normalize_host(&host).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_normalise_docker_hub_aliases_and_case() {
        assert_eq!(normalize_host("Index.Docker.IO").unwrap(), "docker.io");
        assert_eq!(normalize_host("registry-1.docker.io").unwrap(), "docker.io");
        assert_eq!(
            normalize_host("Registry.Example.com:5000").unwrap(),
            "registry.example.com:5000"
        );
        for bad in ["", "a b", "host/path", "x@y"] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn loopback_hosts_are_told_apart() {
        for h in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "registry.example.com"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn mirrors_parse_as_host_and_base_url() {
        let m = parse_mirror("docker.io=https://mirror.example.com/hub/").unwrap();
        assert_eq!(m.host, "docker.io");
        assert_eq!(m.url.as_str(), "https://mirror.example.com/hub");
        let m = parse_mirror("index.docker.io=http://127.0.0.1:5001").unwrap();
        assert_eq!(m.host, "docker.io");
        assert_eq!(url_host(&m.url), "127.0.0.1:5001");
        for bad in [
            "docker.io",
            "docker.io=ftp://x",
            "docker.io=not a url",
            "=https://x",
            "docker.io=https://u:p@x",
        ] {
            assert!(parse_mirror(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cas_need_a_host_and_an_absolute_file() {
        assert_eq!(
            parse_host_file("Reg.example.com:443=/etc/ca.pem").unwrap(),
            (
                "reg.example.com:443".to_string(),
                PathBuf::from("/etc/ca.pem")
            )
        );
        for bad in ["reg=ca.pem", "reg", "=/ca.pem"] {
            assert!(parse_host_file(bad).is_err(), "{bad:?}");
        }
    }
}
