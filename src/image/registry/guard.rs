//! Where a registry may send sandboxd. A registry names URLs sandboxd then fetches (its token
//! realm, redirects, upload locations): fetched blindly, that is a request forgery from the
//! node's position, against cloud metadata services or the node's own loopback. Every name is
//! resolved through [`GuardedResolver`], which never yields a link-local or metadata address,
//! and a realm is checked before it is contacted: https (or the registry's own host), and not
//! loopback unless the registry itself is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use super::settings::{host_part, url_host};
use crate::net::policy::Ipv4Net;

/// Alibaba Cloud's metadata service (AWS, GCP and Azure use 169.254.169.254, link-local).
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata service.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
/// Time a realm's name gets to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why sandboxd never sends a registry request to `ip`, if it does not.
pub(super) fn refused_ip(
    ip: IpAddr,
    loopback_ok: bool,
    denied: &[Ipv4Net],
) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4 == METADATA_V4 || v4 == Ipv4Addr::new(169, 254, 169, 254) {
                Some("a cloud metadata address")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Some("not a host address")
            } else if v4.is_loopback() && !loopback_ok {
                Some("loopback, and the registry is not")
            } else if denied.iter().any(|net| net.contains(v4)) {
                Some("in a --deny-egress range")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_ip(IpAddr::V4(v4), loopback_ok, denied);
            }
            if v6 == METADATA_V6 {
                Some("a cloud metadata address")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("not a host address")
            } else if v6.is_loopback() && !loopback_ok {
                Some("loopback, and the registry is not")
            } else {
                None
            }
        }
    }
}

/// Checks a token realm named by the registry at `registry` (whose requests go to loopback
/// when `registry_loopback`): returns the URL to fetch, or why it is refused.
pub(super) async fn check_realm(
    registry: &Url,
    registry_loopback: bool,
    realm: &str,
    denied: &[Ipv4Net],
) -> Result<Url, String> {
    let url = Url::parse(realm).map_err(|e| format!("{realm:?} is not a URL ({e})"))?;
    // An address named outright is judged first: the worst reason is the one reported.
    check_literal(&url, registry_loopback, denied).map_err(|why| format!("the realm {why}"))?;
    let same_host = url.host_str() == registry.host_str();
    match url.scheme() {
        "https" => {}
        "http" if same_host => {}
        other => {
            return Err(format!(
                "{realm:?} is {other}: a realm on another host than the registry must be https"
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{realm:?} carries credentials"));
    }
    let host = url_host(&url);
    let name = host_part(&host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addrs: Vec<IpAddr> = match name.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let port = url.port_or_known_default().unwrap_or(443);
            let lookup = tokio::net::lookup_host((name, port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                Ok(Err(e)) => return Err(format!("{name} does not resolve: {e}")),
                Err(_) => return Err(format!("{name} did not resolve within {RESOLVE_TIMEOUT:?}")),
            }
        }
    };
    for ip in addrs {
        if let Some(why) = refused_ip(ip, registry_loopback, denied) {
            return Err(format!("{realm:?} reaches {ip}, {why}"));
        }
    }
    Ok(url)
}

/// Refuses a redirect or upload location that names a refused address literally (names are
/// covered by [`GuardedResolver`]).
pub(super) fn check_literal(
    url: &Url,
    loopback_ok: bool,
    denied: &[Ipv4Net],
) -> Result<(), String> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return Ok(()),
    };
    match refused_ip(ip, loopback_ok, denied) {
        Some(why) => Err(format!("{url} reaches {ip}, {why}")),
        None => Ok(()),
    }
}

/// The system resolver, minus the addresses no registry request may reach whatever name leads
/// there (link-local and metadata addresses): a name the registry controls cannot rebind a
/// checked realm to them.
#[derive(Debug, Default)]
pub(super) struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| refused_ip(a.ip(), true, &[]).is_none())
                .collect();
            if kept.is_empty() {
                let why = format!(
                    "{host} resolves to {found:?}: link-local or metadata addresses, which no \
                     registry request reaches"
                );
                return Err(why.into());
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(url: &str) -> Url {
        Url::parse(url).unwrap()
    }

    #[test]
    fn metadata_link_local_and_foreign_loopback_are_refused() {
        let refused = |ip: &str, lo: bool| refused_ip(ip.parse().unwrap(), lo, &[]);
        assert!(refused("169.254.169.254", true).is_some());
        assert!(refused("169.254.1.1", true).is_some());
        assert!(refused("100.100.100.200", true).is_some());
        assert!(refused("fd00:ec2::254", true).is_some());
        assert!(refused("fe80::1", true).is_some());
        assert!(refused("::ffff:169.254.169.254", true).is_some());
        assert!(refused("0.0.0.0", true).is_some());
        assert!(refused("127.0.0.1", false).is_some());
        assert!(refused("::1", false).is_some());
        assert!(refused("127.0.0.1", true).is_none());
        assert!(refused("10.1.2.3", false).is_none());
        assert!(refused("2001:db8::1", false).is_none());
        let denied = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(refused_ip("10.1.2.3".parse().unwrap(), false, &denied).is_some());
    }

    #[tokio::test]
    async fn realms_must_be_https_or_the_registry_itself_and_never_metadata() {
        let local = registry("http://127.0.0.1:5000");
        let remote = registry("https://registry.example.com");
        // The registry's own host over http, and https to a public address, are fine.
        assert!(
            check_realm(&local, true, "http://127.0.0.1:5000/token", &[])
                .await
                .is_ok()
        );
        assert!(
            check_realm(&remote, false, "https://93.184.216.34/token", &[])
                .await
                .is_ok()
        );
        for realm in [
            "http://169.254.169.254/latest/meta-data",
            "https://169.254.169.254/token",
            "https://[fe80::1]/token",
            "https://100.100.100.200/token",
            "ftp://127.0.0.1/token",
            "not a url",
            "",
        ] {
            assert!(
                check_realm(&local, true, realm, &[]).await.is_err(),
                "{realm:?}"
            );
        }
        // Loopback only when the registry is, and plain http only to the registry's host.
        for realm in [
            "https://127.0.0.1/token",
            "https://localhost/token",
            "http://93.184.216.34/token",
        ] {
            assert!(
                check_realm(&remote, false, realm, &[]).await.is_err(),
                "{realm:?}"
            );
        }
    }

    #[test]
    fn literal_locations_are_checked() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(check_literal(&url("http://169.254.169.254/x"), true, &[]).is_err());
        assert!(check_literal(&url("http://127.0.0.1/x"), false, &[]).is_err());
        assert!(check_literal(&url("http://127.0.0.1/x"), true, &[]).is_ok());
        assert!(check_literal(&url("https://s3.example.com/x"), false, &[]).is_ok());
    }
}
