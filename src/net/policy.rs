//! A BRIDGE sandbox's network policy: what it may connect to (egress) and which host ports are
//! forwarded to it, and the iptables rules that enforce the egress part outside the sandbox.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::cni::{PortMapping, Protocol};
use crate::error::{Error, Result};

/// The cloud metadata service's address, blocked unless a rule names it explicitly.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Most rules in an allow-list.
pub const MAX_RULES: usize = 64;
/// Most ports in one rule.
pub const MAX_RULE_PORTS: usize = 64;
/// Most forwarded ports of one sandbox.
pub const MAX_PORT_MAPPINGS: usize = 32;
/// The verdict for refused packets: the sender learns at once that policy refused it
/// (EHOSTUNREACH), instead of waiting for a timeout.
const REJECT: &str = "-j REJECT --reject-with icmp-admin-prohibited";
/// The last verdict of a policy for TCP: a reset, so that a connection a policy change closes
/// ends at once on its next packet instead of retrying into a timeout.
const RESET: &str = "-p tcp -j REJECT --reject-with tcp-reset";

/// An IPv4 network in CIDR form, stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network `addr/prefix` (host bits cleared).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        (prefix <= 32).then(|| Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>().map_err(|_| format!("{s:?}: bad prefix"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        Ipv4Net::new(addr, prefix).ok_or_else(|| format!("{s:?}: prefix longer than 32"))
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One destination of an allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    /// Destination network.
    pub net: Ipv4Net,
    /// Destination ports; empty admits every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Protocol of `ports`; `None` means both TCP and UDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// What a sandbox may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Egress {
    /// Anything but the metadata address.
    #[default]
    AllowAll,
    /// Nothing.
    DenyAll,
    /// Only these destinations (and the sandbox's DNS resolvers).
    AllowList {
        /// The admitted destinations.
        allow: Vec<EgressRule>,
    },
}

/// A BRIDGE sandbox's policy, kept with its container and applied at each start.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetPolicy {
    /// Outbound connections.
    #[serde(default)]
    pub egress: Egress,
    /// Host ports forwarded into the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
}

impl NetPolicy {
    /// Checks the limits and that no host port and protocol is forwarded twice.
    pub fn validate(&self) -> Result<()> {
        if let Egress::AllowList { allow } = &self.egress {
            if allow.len() > MAX_RULES {
                return Err(Error::invalid(
                    "network.egress.allow",
                    format!("{} rules; at most {MAX_RULES}", allow.len()),
                ));
            }
            for (i, rule) in allow.iter().enumerate() {
                let field = format!("network.egress.allow[{i}].ports");
                if rule.ports.len() > MAX_RULE_PORTS {
                    return Err(Error::invalid(
                        field,
                        format!("{} ports; at most {MAX_RULE_PORTS}", rule.ports.len()),
                    ));
                }
                if rule.ports.contains(&0) {
                    return Err(Error::invalid(field, "port 0 is not a port"));
                }
                if rule.ports.is_empty() && rule.protocol.is_some() {
                    return Err(Error::invalid(
                        format!("network.egress.allow[{i}].protocol"),
                        "a protocol needs ports; leave it unset to admit every port and protocol",
                    ));
                }
            }
        }
        if self.ports.len() > MAX_PORT_MAPPINGS {
            return Err(Error::invalid(
                "network.ports",
                format!("{} mappings; at most {MAX_PORT_MAPPINGS}", self.ports.len()),
            ));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.host_port == 0 || p.container_port == 0 {
                return Err(Error::invalid(
                    format!("network.ports[{i}]"),
                    "host_port and container_port must be 1-65535",
                ));
            }
            if self.ports[..i]
                .iter()
                .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            {
                return Err(Error::invalid(
                    format!("network.ports[{i}].host_port"),
                    format!(
                        "host port {}/{} is listed twice",
                        p.host_port,
                        protocol_name(p.protocol)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Host ports sandboxes may publish, `LOW-HIGH` inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The lowest port.
    pub low: u16,
    /// The highest port.
    pub high: u16,
}

/// The host ports sandboxes may publish unless `--host-port-range` says otherwise.
pub const DEFAULT_HOST_PORT_RANGE: PortRange = PortRange {
    low: 20000,
    high: 29999,
};

impl PortRange {
    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        DEFAULT_HOST_PORT_RANGE
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not LOW-HIGH with ports 1-65535, LOW <= HIGH");
        let (low, high) = s.trim().split_once('-').ok_or_else(bad)?;
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
        match (port(low), port(high)) {
            (Some(low), Some(high)) if low <= high => Ok(PortRange { low, high }),
            _ => Err(bad()),
        }
    }
}

impl NetPolicy {
    /// INVALID_ARGUMENT, naming the field and the range, unless every host port lies in
    /// `range` and is none of `reserved` (sandboxd's own ports: a port forward would win over
    /// its listener).
    pub fn check_host_ports(&self, range: PortRange, reserved: &[u16]) -> Result<()> {
        for (i, p) in self.ports.iter().enumerate() {
            let field = format!("network.ports[{i}].host_port");
            if !range.contains(p.host_port) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} is outside the host port range {range} (--host-port-range)",
                        p.host_port
                    ),
                ));
            }
            if reserved.contains(&p.host_port) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} is one of sandboxd's own ports (its gRPC or metrics listener); \
                         pick another port of {range}",
                        p.host_port
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `tcp` or `udp`.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Addresses of cloud metadata services (AWS's IMDS and ECS task endpoints, Alibaba's): each
/// opens only for a rule naming that one address, never for a wider range holding it.
pub const METADATA_ADDRS: [Ipv4Addr; 4] = [
    METADATA_ADDR,
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(169, 254, 170, 23),
    Ipv4Addr::new(100, 100, 100, 200),
];
/// IPv4 link-local, where metadata services and node agents live.
pub const LINK_LOCAL: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};

/// What a sandbox's rules need to know besides its policy: the destinations closed to every
/// sandbox whatever its egress mode, and the resolvers it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closed {
    /// The sandboxes' network (other sandboxes, the bridge's own address).
    pub subnet: Option<Ipv4Net>,
    /// The operator's `--deny-egress` ranges (a cluster's pod and service ranges).
    pub deny: Vec<Ipv4Net>,
    /// The resolvers in the sandbox's resolv.conf: port 53 on them stays open (not in
    /// DENY_ALL), wherever they are.
    pub resolvers: Vec<Ipv4Addr>,
}

impl Closed {
    /// The closed ranges (node addresses aside, which the rules match by address type).
    pub fn ranges(&self) -> Vec<Ipv4Net> {
        let mut out: Vec<Ipv4Net> = self.subnet.into_iter().collect();
        out.push(LINK_LOCAL);
        out.extend(
            METADATA_ADDRS
                .iter()
                .map(|a| Ipv4Net::new(*a, 32).expect("a /32")),
        );
        out.extend(self.deny.iter().copied());
        out
    }
}

impl Ipv4Net {
    /// Whether every address of `self` lies in `outer`.
    pub fn within(&self, outer: &Ipv4Net) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.addr)
    }
}

/// The rules of a sandbox's own chain `chain`, as `iptables-restore` lines (`-A chain ...`).
/// Every packet the sandbox sends through the host (forwarded, or to the host itself) passes
/// them, in this order:
/// 1. packets of connections made *to* the sandbox (its replies) and related ICMP errors;
/// 2. DNS (port 53) to the resolvers it was given (not in DENY_ALL);
/// 3. ALLOW_LIST rules naming one address (/32): exactly that address, even a node-local one;
/// 4. the metadata addresses, closed;
/// 5. ALLOW_LIST ranges inside a closed range: that part of it;
/// 6. node-local destinations, closed: the node's own addresses (by address type, so every
///    address of sandboxd's namespace, present or future), port forwards on the node, the
///    sandbox subnet, 169.254.0.0/16, and the `--deny-egress` ranges;
/// 7. the mode: ALLOW_ALL accepts the rest, ALLOW_LIST its remaining rules, then rejects.
///
/// Every packet of a connection the sandbox opened is checked, not only the first: a policy
/// change takes effect on the next packet of connections already open. Destinations are
/// matched as the sandbox addressed them (conntrack's original destination), not as a port
/// forward rewrote them: allowing a node address and port admits what is published there.
pub fn egress_rules(chain: &str, egress: &Egress, closed: &Closed) -> Vec<String> {
    let mut out = vec![
        format!("-A {chain} -m conntrack --ctdir REPLY -j ACCEPT"),
        format!("-A {chain} -m conntrack --ctstate RELATED -j ACCEPT"),
    ];
    let allow = match egress {
        Egress::DenyAll => {
            out.push(format!("-A {chain} {RESET}"));
            out.push(format!("-A {chain} {REJECT}"));
            return out;
        }
        Egress::AllowAll => &[][..],
        Egress::AllowList { allow } => &allow[..],
    };
    for ns in &closed.resolvers {
        for proto in ["udp", "tcp"] {
            out.push(format!(
                "-A {chain} -p {proto} -m conntrack --ctorigdst {ns}/32 --ctorigdstport 53 -j ACCEPT"
            ));
        }
    }
    let ranges = closed.ranges();
    let (exact, wider): (Vec<&EgressRule>, Vec<&EgressRule>) =
        allow.iter().partition(|r| r.net.prefix() == 32);
    let (inside, others): (Vec<&EgressRule>, Vec<&EgressRule>) = wider
        .into_iter()
        .partition(|r| ranges.iter().any(|c| r.net.within(c)));
    for rule in exact {
        accept_rule(&mut out, chain, rule);
    }
    for addr in METADATA_ADDRS {
        out.push(format!(
            "-A {chain} -m conntrack --ctorigdst {addr}/32 {REJECT}"
        ));
    }
    for rule in inside {
        accept_rule(&mut out, chain, rule);
    }
    for kind in ["LOCAL", "BROADCAST", "MULTICAST"] {
        out.push(format!("-A {chain} -m addrtype --dst-type {kind} {REJECT}"));
    }
    out.push(format!("-A {chain} -m conntrack --ctstate DNAT {REJECT}"));
    let mut nets: Vec<Ipv4Net> = closed.subnet.into_iter().collect();
    nets.push(LINK_LOCAL);
    nets.extend(closed.deny.iter().copied());
    for net in nets {
        out.push(format!(
            "-A {chain} -m conntrack --ctorigdst {net} {REJECT}"
        ));
    }
    match egress {
        Egress::AllowAll => out.push(format!("-A {chain} -j ACCEPT")),
        _ => {
            for rule in others {
                accept_rule(&mut out, chain, rule);
            }
            out.push(format!("-A {chain} {RESET}"));
            out.push(format!("-A {chain} {REJECT}"));
        }
    }
    out
}

/// The rules of a sandbox's own ebtables chain `chain`, jumped to for every frame entering the
/// bridge from its veth: the frame must carry the sandbox's own `mac`, and ARP and IPv4 its
/// own `ip`; anything else (another source, IPv6, other protocols) is dropped. The bridge thus
/// forwards nothing spoofed, and no IPv6 (fe80::/10, fd00:ec2::254) leaves a sandbox.
pub fn guard_rules(chain: &str, mac: &str, ip: Ipv4Addr) -> Vec<String> {
    vec![
        format!("-A {chain} -s ! {mac} -j DROP"),
        format!("-A {chain} -p ARP --arp-ip-src {ip} --arp-mac-src {mac} -j RETURN"),
        format!("-A {chain} -p IPv4 --ip-src {ip} -j RETURN"),
        format!("-A {chain} -j DROP"),
    ]
}

fn accept_rule(out: &mut Vec<String>, chain: &str, rule: &EgressRule) {
    if rule.ports.is_empty() {
        out.push(format!(
            "-A {chain} -m conntrack --ctorigdst {} -j ACCEPT",
            rule.net
        ));
        return;
    }
    let protocols: &[Protocol] = match rule.protocol {
        Some(p) => &[p][..],
        None => &[Protocol::Tcp, Protocol::Udp],
    };
    for proto in protocols {
        for port in &rule.ports {
            out.push(format!(
                "-A {chain} -p {p} -m conntrack --ctorigdst {} --ctorigdstport {port} -j ACCEPT",
                rule.net,
                p = protocol_name(*proto),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_normalise_and_contain() {
        assert_eq!(net("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert!(net("0.0.0.0/0").contains(METADATA_ADDR));
        assert!(!net("10.0.0.0/8").contains(Ipv4Addr::new(11, 0, 0, 1)));
        for bad in ["10.0.0.0/33", "::1/128", "example.com", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad:?} parsed");
        }
    }

    fn closed() -> Closed {
        Closed {
            subnet: Some(net("10.213.7.0/24")),
            deny: vec![net("10.96.0.0/12")],
            resolvers: vec![Ipv4Addr::new(10, 213, 7, 1)],
        }
    }

    const HEAD: [&str; 2] = [
        "-A C -m conntrack --ctdir REPLY -j ACCEPT",
        "-A C -m conntrack --ctstate RELATED -j ACCEPT",
    ];
    const DNS: [&str; 2] = [
        "-A C -p udp -m conntrack --ctorigdst 10.213.7.1/32 --ctorigdstport 53 -j ACCEPT",
        "-A C -p tcp -m conntrack --ctorigdst 10.213.7.1/32 --ctorigdstport 53 -j ACCEPT",
    ];
    const R: &str = "-j REJECT --reject-with icmp-admin-prohibited";

    fn closed_rules() -> Vec<String> {
        let mut out: Vec<String> = [
            "169.254.169.254/32",
            "169.254.170.2/32",
            "169.254.170.23/32",
            "100.100.100.200/32",
        ]
        .iter()
        .map(|a| format!("-A C -m conntrack --ctorigdst {a} {R}"))
        .collect();
        out.extend(closed_tail());
        out
    }

    fn closed_tail() -> Vec<String> {
        let mut out: Vec<String> = ["LOCAL", "BROADCAST", "MULTICAST"]
            .iter()
            .map(|t| format!("-A C -m addrtype --dst-type {t} {R}"))
            .collect();
        out.push(format!("-A C -m conntrack --ctstate DNAT {R}"));
        for n in ["10.213.7.0/24", "169.254.0.0/16", "10.96.0.0/12"] {
            out.push(format!("-A C -m conntrack --ctorigdst {n} {R}"));
        }
        out
    }

    #[test]
    fn allow_all_admits_everything_but_node_local_destinations() {
        let rules = egress_rules("C", &Egress::AllowAll, &closed());
        let mut want: Vec<String> = HEAD.iter().chain(&DNS).map(|s| s.to_string()).collect();
        want.extend(closed_rules());
        want.push("-A C -j ACCEPT".into());
        assert_eq!(rules, want);
    }

    #[test]
    fn deny_all_admits_only_replies() {
        let rules = egress_rules("C", &Egress::DenyAll, &closed());
        assert_eq!(rules[..2], HEAD);
        assert_eq!(rules[2], "-A C -p tcp -j REJECT --reject-with tcp-reset");
        assert_eq!(rules[3], format!("-A C {R}"));
        assert_eq!(rules.len(), 4, "not even DNS: {rules:?}");
    }

    #[test]
    fn allow_list_opens_exact_addresses_and_ranges_inside_closed_ones_before_closing_them() {
        let egress = Egress::AllowList {
            allow: vec![
                EgressRule {
                    net: net("0.0.0.0/0"),
                    ports: vec![],
                    protocol: None,
                },
                EgressRule {
                    net: net("10.213.7.9"),
                    ports: vec![8080],
                    protocol: Some(Protocol::Tcp),
                },
                EgressRule {
                    net: net("169.254.0.0/16"),
                    ports: vec![],
                    protocol: None,
                },
                EgressRule {
                    net: net("100.100.100.200/32"),
                    ports: vec![80, 443],
                    protocol: None,
                },
                EgressRule {
                    net: net("10.100.0.0/16"),
                    ports: vec![53],
                    protocol: Some(Protocol::Udp),
                },
            ],
        };
        let rules = egress_rules("C", &egress, &closed());
        let mut want: Vec<String> = HEAD.iter().chain(&DNS).map(|s| s.to_string()).collect();
        want.extend([
            "-A C -p tcp -m conntrack --ctorigdst 10.213.7.9/32 --ctorigdstport 8080 -j ACCEPT"
                .to_string(),
            "-A C -p tcp -m conntrack --ctorigdst 100.100.100.200/32 --ctorigdstport 80 -j ACCEPT"
                .into(),
            "-A C -p tcp -m conntrack --ctorigdst 100.100.100.200/32 --ctorigdstport 443 -j ACCEPT"
                .into(),
            "-A C -p udp -m conntrack --ctorigdst 100.100.100.200/32 --ctorigdstport 80 -j ACCEPT"
                .into(),
            "-A C -p udp -m conntrack --ctorigdst 100.100.100.200/32 --ctorigdstport 443 -j ACCEPT"
                .into(),
        ]);
        let closed_rules = closed_rules();
        want.extend(closed_rules[..4].iter().cloned());
        // Inside a closed range (link-local, the deny list), after the metadata addresses.
        want.push("-A C -m conntrack --ctorigdst 169.254.0.0/16 -j ACCEPT".into());
        want.push(
            "-A C -p udp -m conntrack --ctorigdst 10.100.0.0/16 --ctorigdstport 53 -j ACCEPT"
                .into(),
        );
        want.extend(closed_tail());
        // The catch-all comes after every closed range: it opens none of them.
        want.push("-A C -m conntrack --ctorigdst 0.0.0.0/0 -j ACCEPT".into());
        want.push("-A C -p tcp -j REJECT --reject-with tcp-reset".into());
        want.push(format!("-A C {R}"));
        assert_eq!(rules, want);
    }

    #[test]
    fn ranges_know_what_lies_within_them() {
        assert!(net("10.213.7.9/32").within(&net("10.213.7.0/24")));
        assert!(net("10.213.7.0/24").within(&net("10.213.7.0/24")));
        assert!(!net("10.213.0.0/16").within(&net("10.213.7.0/24")));
        assert!(!net("10.214.7.9/32").within(&net("10.213.7.0/24")));
        assert!(!net("0.0.0.0/0").within(&LINK_LOCAL));
    }

    #[test]
    fn the_guard_admits_only_the_sandboxs_own_addresses() {
        let rules = guard_rules("G", "0a:58:0a:d5:07:02", Ipv4Addr::new(10, 213, 7, 2));
        assert_eq!(
            rules,
            [
                "-A G -s ! 0a:58:0a:d5:07:02 -j DROP",
                "-A G -p ARP --arp-ip-src 10.213.7.2 --arp-mac-src 0a:58:0a:d5:07:02 -j RETURN",
                "-A G -p IPv4 --ip-src 10.213.7.2 -j RETURN",
                "-A G -j DROP",
            ]
        );
    }

    #[test]
    fn host_ports_come_from_the_range_and_never_sandboxds_own() {
        let range: PortRange = "20000-20010".parse().unwrap();
        assert_eq!(range.to_string(), "20000-20010");
        for bad in ["", "20000", "0-10", "10-5", "a-b", "1-65536"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} parsed");
        }
        let publish = |host_port| NetPolicy {
            egress: Egress::AllowAll,
            ports: vec![PortMapping {
                host_port,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None,
            }],
        };
        publish(20000).check_host_ports(range, &[20005]).unwrap();
        publish(20010).check_host_ports(range, &[20005]).unwrap();
        let err = publish(8080)
            .check_host_ports(range, &[20005])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("network.ports[0].host_port") && err.contains("20000-20010"),
            "{err}"
        );
        let err = publish(20005)
            .check_host_ports(range, &[20005])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandboxd's own"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let dup = NetPolicy {
            egress: Egress::AllowAll,
            ports: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                },
                PortMapping {
                    host_port: 8080,
                    container_port: 81,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                },
            ],
        };
        let err = dup.validate().unwrap_err().to_string();
        assert!(err.contains("network.ports[1].host_port"), "{err}");

        let proto_without_ports = NetPolicy {
            egress: Egress::AllowList {
                allow: vec![EgressRule {
                    net: net("10.0.0.0/8"),
                    ports: vec![],
                    protocol: Some(Protocol::Tcp),
                }],
            },
            ports: vec![],
        };
        let err = proto_without_ports.validate().unwrap_err().to_string();
        assert!(err.contains("network.egress.allow[0].protocol"), "{err}");
    }

    #[test]
    fn policy_round_trips_through_json() {
        let p = NetPolicy {
            egress: Egress::AllowList {
                allow: vec![EgressRule {
                    net: net("10.0.0.0/8"),
                    ports: vec![22],
                    protocol: Some(Protocol::Tcp),
                }],
            },
            ports: vec![PortMapping {
                host_port: 2222,
                container_port: 22,
                protocol: Protocol::Tcp,
                host_ip: Some("127.0.0.1".parse().unwrap()),
            }],
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<NetPolicy>(&json).unwrap(), p);
    }
}
