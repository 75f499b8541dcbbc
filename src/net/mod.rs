//! Networking of sandboxes.
//!
//! NONE sandboxes get a fresh network namespace from runc with loopback only. BRIDGE sandboxes
//! get a named namespace made here before their task starts ([`netns`]), attached to the node's
//! bridge by the CNI plugins ([`cni`]), with an egress policy enforced in the host's firewall
//! ([`firewall`], [`policy`]); all of it is torn down again when the task exits. The DNS
//! configuration every sandbox sees comes from [`resolv_conf`].

pub mod cni;
pub mod firewall;
pub mod netns;
pub mod policy;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

use self::cni::{
    Attachment, BridgeNetwork, CniError, CniRunner, NetworkConfigList, PortMapping, RuntimeConfig,
    DEFAULT_IFNAME,
};
use self::firewall::{Firewall, Guard, Repair};
use self::netns::NetNs;
use self::policy::{Closed, Egress, Ipv4Net, NetPolicy, PortRange};
use crate::error::{Error, Result};

/// Where systemd-resolved writes the upstream resolvers it forwards to.
pub const DEFAULT_RESOLVED_CONF: &str = "/run/systemd/resolve/resolv.conf";
/// The host's resolver configuration.
pub const DEFAULT_HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Resolvers used when the host has none a sandbox can reach.
pub const DEFAULT_DNS_FALLBACK: &[&str] = &["1.1.1.1", "8.8.8.8"];
/// Where sandbox network namespaces are bind-mounted.
pub const DEFAULT_NETNS_DIR: &str = "/run/sandboxd/netns";

/// Where a sandbox's /etc/resolv.conf comes from.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// systemd-resolved's upstream file, used when present.
    pub resolved_conf: PathBuf,
    /// The host's resolv.conf, used (loopback resolvers removed) otherwise.
    pub host_conf: PathBuf,
    /// Resolvers used when neither file names one a sandbox can reach.
    pub fallback: Vec<IpAddr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            resolved_conf: DEFAULT_RESOLVED_CONF.into(),
            host_conf: DEFAULT_HOST_RESOLV_CONF.into(),
            fallback: DEFAULT_DNS_FALLBACK
                .iter()
                .map(|a| a.parse().expect("valid fallback address"))
                .collect(),
        }
    }
}

/// A sandbox's resolv.conf and the resolvers it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// The file's content.
    pub text: String,
    /// Its nameserver addresses.
    pub nameservers: Vec<IpAddr>,
}

/// The resolv.conf a sandbox sees: systemd-resolved's upstream file when present (the host's
/// own file then names only the 127.0.0.53 stub, unreachable from a sandbox's namespace), else
/// the host's file with loopback resolvers removed, else the host file's other lines with the
/// fallback resolvers.
pub fn resolv_conf(cfg: &DnsConfig) -> ResolvConf {
    let mut base = String::new();
    for path in [&cfg.resolved_conf, &cfg.host_conf] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let filtered = filter_resolv_conf(&text);
        let nameservers = nameservers(&filtered);
        if !nameservers.is_empty() {
            return ResolvConf {
                text: filtered,
                nameservers,
            };
        }
        if base.is_empty() {
            base = filtered;
        }
    }
    for ns in &cfg.fallback {
        base.push_str(&format!("nameserver {ns}\n"));
    }
    ResolvConf {
        nameservers: cfg.fallback.clone(),
        text: base,
    }
}

/// `text` with loopback nameservers removed: inside a sandbox's network namespace 127.0.0.0/8
/// and ::1 are the sandbox's own, where no resolver listens.
pub fn filter_resolv_conf(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => !is_loopback(addr),
                _ => true,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The nameserver addresses a resolv.conf names.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Settings of BRIDGE networking.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Tags everything this instance makes (its containerd namespace).
    pub instance: String,
    /// Where named network namespaces are bind-mounted.
    pub netns_dir: PathBuf,
    /// A CNI conflist file to use instead of the built-in bridge network.
    pub conflist: Option<PathBuf>,
    /// The built-in bridge network (used when `conflist` is unset).
    pub bridge: BridgeNetwork,
    /// Where CNI plugins are looked up.
    pub plugin_dirs: Vec<PathBuf>,
    /// DNS sources.
    pub dns: DnsConfig,
    /// Ranges no sandbox may reach unless a rule names something inside them
    /// (`--deny-egress`), beside the node-local destinations closed to every sandbox.
    pub deny_egress: Vec<Ipv4Net>,
    /// Host ports sandboxes may publish (`--host-port-range`).
    pub host_ports: PortRange,
    /// Host ports never published, even inside the range: sandboxd's own.
    pub reserved_ports: Vec<u16>,
}

/// A sandbox's attachment to the bridge, as made by [`Network::attach`].
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    /// The sandbox's address.
    pub ip: Ipv4Addr,
    /// Its default gateway, when the network has one.
    pub gateway: Option<IpAddr>,
    /// The CNI result, for DEL.
    pub result: Value,
    /// What ties the sandbox to its firewall rules.
    pub guard: Guard,
}

/// BRIDGE networking: namespaces, CNI and the egress firewall of one sandboxd instance.
#[derive(Debug)]
pub struct Network {
    cfg: NetConfig,
    tag: String,
    runner: CniRunner,
    firewall: Firewall,
    ports: Mutex<()>,
}

impl Network {
    /// BRIDGE networking per `cfg`. Nothing is touched until the first BRIDGE sandbox starts.
    pub fn new(cfg: NetConfig) -> Network {
        let tag = crate::util::sha256_hex(cfg.instance.as_bytes())[..8].to_string();
        let bridge = match &cfg.conflist {
            None => Some(cfg.bridge.bridge.clone()),
            // Read again at each attach; this only tells the firewall which bridge to admit
            // replies towards.
            Some(path) => std::fs::read(path)
                .ok()
                .and_then(|t| NetworkConfigList::from_json(&t).ok())
                .and_then(|c| c.bridge_name().map(str::to_string)),
        };
        Network {
            runner: CniRunner::new(cfg.plugin_dirs.clone()),
            firewall: Firewall::new(&tag, bridge),
            tag,
            cfg,
            ports: Mutex::new(()),
        }
    }

    /// The DNS configuration sandboxes get.
    pub fn resolv_conf(&self) -> ResolvConf {
        resolv_conf(&self.cfg.dns)
    }

    /// Held while checking that host ports are free and forwarding them, so that two sandboxes
    /// never claim one port.
    pub async fn port_lock(&self) -> MutexGuard<'_, ()> {
        self.ports.lock().await
    }

    fn netns_prefix(&self) -> String {
        format!("sbx-{}-", self.tag)
    }

    /// The namespace file (and CNI container ID) of sandbox `id`.
    fn netns_name(&self, id: &str) -> String {
        format!("{}{id}", self.netns_prefix())
    }

    /// The path of sandbox `id`'s network namespace, as its OCI spec names it.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        self.cfg.netns_dir.join(self.netns_name(id))
    }

    /// Whether sandbox `id` has a network namespace (is attached or half-attached).
    pub fn is_attached(&self, id: &str) -> bool {
        self.netns_path(id).exists()
    }

    /// Sandboxes that have a network namespace of this instance.
    pub fn attached_ids(&self) -> Vec<String> {
        let prefix = self.netns_prefix();
        let Ok(entries) = std::fs::read_dir(&self.cfg.netns_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(&prefix))
                    .map(str::to_string)
            })
            .collect()
    }

    async fn conflist(&self) -> Result<NetworkConfigList> {
        match &self.cfg.conflist {
            None => {
                let mut bridge = self.cfg.bridge.clone();
                if bridge.ipam_data_dir.is_none() {
                    bridge.ipam_data_dir = Some(self.cfg.netns_dir.join("ipam"));
                }
                Ok(bridge.conflist())
            }
            Some(path) => Ok(NetworkConfigList::load(path).await?),
        }
    }

    fn attachment(&self, id: &str) -> Result<Attachment> {
        Ok(Attachment::new(
            self.netns_name(id),
            self.netns_path(id),
            DEFAULT_IFNAME,
        )?)
    }

    /// Makes sandbox `id`'s network namespace, attaches it (CNI ADD) and installs its egress
    /// rules (admitting `resolvers` on port 53 in allow-list mode). On failure everything made
    /// is undone before the error returns.
    pub async fn attach(
        &self,
        id: &str,
        policy: &NetPolicy,
        resolvers: &[IpAddr],
    ) -> Result<Attached> {
        let conflist = self.conflist().await?;
        if self.is_attached(id) {
            // Left by a crash between attach and task start: start from scratch.
            self.detach(id, None, &policy.ports).await?;
        }
        let ns = NetNs::create(&self.cfg.netns_dir, &self.netns_name(id)).await?;
        match self.attach_in(id, &conflist, policy, resolvers).await {
            Ok(attached) => Ok(attached),
            Err(e) => {
                let cleanup = ns.remove().await;
                if let Some(bridge) = conflist.bridge_name() {
                    remove_unusable_bridge(bridge).await;
                }
                Err(e.with_cleanup(cleanup))
            }
        }
    }

    async fn attach_in(
        &self,
        id: &str,
        conflist: &NetworkConfigList,
        policy: &NetPolicy,
        resolvers: &[IpAddr],
    ) -> Result<Attached> {
        let att = self.attachment(id)?;
        let rc = RuntimeConfig {
            port_mappings: policy.ports.clone(),
        };
        let result = self.runner.add(conflist, &att, &rc).await?;
        let undo_cni = || async {
            self.runner
                .del(conflist, &att, &rc, Some(&result.raw))
                .await
                .map_err(Error::from)
        };
        let Some(ip) = result.sandbox_ip().and_then(|c| match c.address {
            IpAddr::V4(v4) => Some((v4, c.gateway, c.prefix_len)),
            IpAddr::V6(_) => None,
        }) else {
            let e = Error::FailedPrecondition(format!(
                "CNI network {:?} gave the sandbox no IPv4 address",
                conflist.name()
            ));
            return Err(e.with_cleanup(undo_cni().await));
        };
        let bridge = conflist.bridge_name();
        let Some(veth) = result
            .interfaces
            .iter()
            .find(|i| {
                i.sandbox.as_deref().unwrap_or("").is_empty() && Some(i.name.as_str()) != bridge
            })
            .map(|i| i.name.clone())
        else {
            let e = Error::FailedPrecondition(format!(
                "CNI network {:?} reported no host-side interface; the egress policy needs one",
                conflist.name()
            ));
            return Err(e.with_cleanup(undo_cni().await));
        };
        let mac = result
            .interfaces
            .iter()
            .find(|i| i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
            .and_then(|i| i.mac.clone());
        let Some(mac) = mac else {
            let e = Error::FailedPrecondition(format!(
                "CNI network {:?} reported no MAC address of the sandbox's interface; the \
                 anti-spoofing guard needs one",
                conflist.name()
            ));
            return Err(e.with_cleanup(undo_cni().await));
        };
        let guard = Guard {
            veth,
            mac,
            ip: ip.0,
            prefix: ip.2,
        };
        let rules = self.egress_rules(id, &guard, &policy.egress, resolvers);
        if let Err(e) = self.firewall.add(id, &guard, &rules).await {
            let cleanup = match self.firewall.remove(id).await {
                Ok(()) => undo_cni().await,
                Err(fw) => Err(fw),
            };
            return Err(e.with_cleanup(cleanup));
        }
        Ok(Attached {
            ip: ip.0,
            gateway: ip.1,
            result: result.raw,
            guard,
        })
    }

    /// Tears sandbox `id`'s network down: egress rules, CNI DEL (in reverse plugin order, given
    /// the `cached` ADD result when known), namespace. Idempotent; a sandbox without a
    /// namespace has nothing to tear down. On failure the namespace stays, so a later call can
    /// finish the work.
    pub async fn detach(
        &self,
        id: &str,
        cached: Option<&Value>,
        ports: &[PortMapping],
    ) -> Result<()> {
        if !self.is_attached(id) {
            return Ok(());
        }
        self.firewall.remove(id).await?;
        let conflist = self.conflist().await?;
        let rc = RuntimeConfig {
            port_mappings: ports.to_vec(),
        };
        let netns = NetNs::at(self.netns_path(id));
        let mut attachment = self.attachment(id)?;
        if !netns.is_mounted().await {
            // A file with no namespace on it (a daemon killed mid-attach or mid-detach): the
            // plugins are told there is no namespace, as the CNI spec allows for DEL, and
            // release what lives outside it (the address, host-side rules).
            tracing::info!(sandbox_id = %id, "the network namespace file holds no namespace; detaching without it");
            attachment = attachment.without_netns();
        }
        self.runner.del(&conflist, &attachment, &rc, cached).await?;
        netns.remove().await
    }

    /// The rules of sandbox `id`'s egress chain for `egress`.
    fn egress_rules(
        &self,
        id: &str,
        guard: &Guard,
        egress: &Egress,
        resolvers: &[IpAddr],
    ) -> Vec<String> {
        let closed = Closed {
            subnet: Ipv4Net::new(guard.ip, guard.prefix),
            deny: self.cfg.deny_egress.clone(),
            resolvers: resolvers
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        };
        policy::egress_rules(&self.firewall.chain_for(id), egress, &closed)
    }

    /// The guard of a sandbox attached by an earlier sandboxd that recorded none, from its
    /// cached CNI ADD result: its rules can then be brought up to date by the sweep.
    pub fn guard_from_result(&self, raw: &Value) -> Option<Guard> {
        let result = cni::CniResult::parse(raw.clone()).ok()?;
        let ip = result.sandbox_ip()?;
        let IpAddr::V4(addr) = ip.address else {
            return None;
        };
        let bridge = self.firewall.bridge();
        let veth = result
            .interfaces
            .iter()
            .find(|i| {
                i.sandbox.as_deref().unwrap_or("").is_empty() && Some(i.name.as_str()) != bridge
            })?
            .name
            .clone();
        let mac = result
            .interfaces
            .iter()
            .find(|i| i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))?
            .mac
            .clone()?;
        Some(Guard {
            veth,
            mac,
            ip: addr,
            prefix: ip.prefix_len,
        })
    }

    /// INVALID_ARGUMENT unless every host port of `policy` may be published here.
    pub fn check_host_ports(&self, policy: &NetPolicy) -> Result<()> {
        policy.check_host_ports(self.cfg.host_ports, &self.cfg.reserved_ports)
    }

    /// Replaces the egress policy of attached sandbox `id` in one transaction (see
    /// [`Firewall::replace`]). `resolvers` are those its resolv.conf names.
    pub async fn update_egress(
        &self,
        id: &str,
        guard: &Guard,
        egress: &Egress,
        resolvers: &[IpAddr],
    ) -> Result<()> {
        let rules = self.egress_rules(id, guard, egress, resolvers);
        self.firewall.replace(id, &rules).await
    }

    /// Puts back the base rules and attached sandbox `id`'s rules where someone removed or
    /// changed them.
    pub async fn repair_firewall(
        &self,
        id: &str,
        guard: &Guard,
        egress: &Egress,
        resolvers: &[IpAddr],
    ) -> Result<Repair> {
        let base = self.firewall.repair_base().await?;
        let rules = self.egress_rules(id, guard, egress, resolvers);
        let own = self.firewall.repair(id, guard, &rules).await?;
        Ok(if base == Repair::Restored {
            Repair::Restored
        } else {
            own
        })
    }

    /// Removes the egress chains of sandboxes other than `live` (a crash's leftovers).
    pub async fn sweep_firewall(&self, live: &[String]) -> Result<usize> {
        self.firewall.sweep(live).await
    }
}

/// The bridge plugin gives a bridge it creates a fixed MAC only once it gets an address. When
/// an ADD fails before that, the bridge is left with no port, and the kernel then zeroes its
/// MAC, which every later ADD fails to set again ("could not set bridge's mac"): one failure
/// would break the network for good. Such a bridge carries nothing and is deleted, so that the
/// next ADD makes it afresh.
async fn remove_unusable_bridge(bridge: &str) {
    let ip = |args: Vec<&str>| {
        tokio::process::Command::new("ip")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
    };
    let Ok(link) = ip(vec!["-o", "link", "show", "dev", bridge]).await else {
        return;
    };
    let zero_mac = String::from_utf8_lossy(&link.stdout).contains("link/ether 00:00:00:00:00:00");
    if !link.status.success() || !zero_mac {
        return;
    }
    match ip(vec!["-o", "link", "show", "master", bridge]).await {
        Ok(ports) if ports.status.success() && ports.stdout.is_empty() => {}
        _ => return,
    }
    tracing::warn!(
        bridge,
        "deleting a bridge a failed CNI ADD left without a MAC address"
    );
    if let Ok(out) = ip(vec!["link", "del", "dev", bridge]).await {
        if !out.status.success() {
            tracing::warn!(bridge, stderr = %String::from_utf8_lossy(&out.stderr), "could not delete the bridge");
        }
    }
}

impl From<CniError> for Error {
    fn from(e: CniError) -> Error {
        match e {
            CniError::InvalidConfig(_) | CniError::PluginNotFound { .. } => {
                Error::FailedPrecondition(format!("BRIDGE networking is not usable here: {e}"))
            }
            other => Error::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn loopback_resolvers_are_dropped() {
        let host = "search example.com\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\noptions edns0\n";
        assert_eq!(
            filter_resolv_conf(host),
            "search example.com\nnameserver 10.0.0.2\noptions edns0\n"
        );
    }

    fn dns(dir: &Path, resolved: Option<&str>, host: Option<&str>) -> DnsConfig {
        let write = |name: &str, text: Option<&str>| {
            let p = dir.join(name);
            if let Some(t) = text {
                std::fs::write(&p, t).unwrap();
            }
            p
        };
        DnsConfig {
            resolved_conf: write("resolved.conf", resolved),
            host_conf: write("host.conf", host),
            fallback: vec!["192.0.2.53".parse().unwrap()],
        }
    }

    #[test]
    fn resolved_upstream_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dns(
            dir.path(),
            Some("nameserver 10.1.1.1\nsearch corp\n"),
            Some("nameserver 127.0.0.53\n"),
        );
        let r = resolv_conf(&cfg);
        assert_eq!(r.text, "nameserver 10.1.1.1\nsearch corp\n");
        assert_eq!(r.nameservers, ["10.1.1.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn host_file_without_loopback_is_next() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dns(
            dir.path(),
            None,
            Some("nameserver 127.0.0.1\nnameserver 10.2.2.2\n"),
        );
        assert_eq!(resolv_conf(&cfg).text, "nameserver 10.2.2.2\n");
    }

    #[test]
    fn fallback_when_only_loopback_resolvers_exist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dns(
            dir.path(),
            None,
            Some("search lan\nnameserver 127.0.0.53\noptions edns0\n"),
        );
        let r = resolv_conf(&cfg);
        assert_eq!(r.text, "search lan\noptions edns0\nnameserver 192.0.2.53\n");
        assert_eq!(r.nameservers, ["192.0.2.53".parse::<IpAddr>().unwrap()]);
        let none = dns(dir.path(), None, None);
        std::fs::remove_file(&none.host_conf).unwrap();
        assert_eq!(resolv_conf(&none).text, "nameserver 192.0.2.53\n");
    }
}
