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

impl EgressRule {
    /// Whether this rule names the metadata address explicitly: a network inside
    /// 169.254.0.0/16 that contains it (a catch-all like 0.0.0.0/0 does not count).
    fn admits_metadata(&self) -> bool {
        // A /16 or longer prefix containing it lies inside 169.254.0.0/16.
        self.net.prefix() >= 16 && self.net.contains(METADATA_ADDR)
    }
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

/// `tcp` or `udp`.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// The rules of a sandbox's own chain `chain`, as `iptables-restore` lines (`-A chain ...`).
/// Every packet the sandbox sends through the host (forwarded, or to the host itself) passes
/// them: replies are admitted first, then the policy decides, and anything not admitted is
/// rejected. `resolvers` are admitted on port 53 in allow-list mode.
///
/// Destinations are matched as the sandbox addressed them (conntrack's original destination),
/// not as a port forward rewrote them: allowing a node address and port admits what is
/// published there, wherever it leads, and nothing else.
pub fn egress_rules(chain: &str, egress: &Egress, resolvers: &[Ipv4Addr]) -> Vec<String> {
    let mut out = vec![format!(
        "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )];
    let no_rules = Vec::new();
    let allow = match egress {
        Egress::AllowList { allow } => allow,
        _ => &no_rules,
    };
    let (metadata, others): (Vec<&EgressRule>, Vec<&EgressRule>) =
        allow.iter().partition(|r| r.admits_metadata());
    for rule in metadata {
        accept_rule(&mut out, chain, rule);
    }
    out.push(format!(
        "-A {chain} -m conntrack --ctorigdst {METADATA_ADDR}/32 {REJECT}"
    ));
    match egress {
        Egress::AllowAll => out.push(format!("-A {chain} -j ACCEPT")),
        Egress::DenyAll => out.push(format!("-A {chain} {REJECT}")),
        Egress::AllowList { .. } => {
            for rule in others {
                accept_rule(&mut out, chain, rule);
            }
            for ns in resolvers {
                for proto in ["udp", "tcp"] {
                    out.push(format!(
                        "-A {chain} -p {proto} -m conntrack --ctorigdst {ns}/32 --ctorigdstport 53 -j ACCEPT"
                    ));
                }
            }
            out.push(format!("-A {chain} {REJECT}"));
        }
    }
    out
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

    #[test]
    fn allow_all_admits_everything_but_metadata() {
        let rules = egress_rules("C", &Egress::AllowAll, &[]);
        assert_eq!(
            rules,
            [
                "-A C -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A C -m conntrack --ctorigdst 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited",
                "-A C -j ACCEPT",
            ]
        );
    }

    #[test]
    fn deny_all_admits_only_replies() {
        let rules = egress_rules("C", &Egress::DenyAll, &[Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(rules.len(), 3);
        assert!(rules[2].ends_with("-j REJECT --reject-with icmp-admin-prohibited"));
        assert!(!rules.iter().any(|r| r.contains("--dport 53")));
    }

    #[test]
    fn allow_list_admits_its_rules_and_resolvers_then_rejects() {
        let egress = Egress::AllowList {
            allow: vec![
                EgressRule {
                    net: net("10.0.0.0/8"),
                    ports: vec![],
                    protocol: None,
                },
                EgressRule {
                    net: net("192.0.2.1"),
                    ports: vec![443, 8443],
                    protocol: Some(Protocol::Tcp),
                },
                EgressRule {
                    net: net("198.51.100.0/24"),
                    ports: vec![53],
                    protocol: None,
                },
            ],
        };
        let rules = egress_rules("C", &egress, &[Ipv4Addr::new(10, 9, 9, 9)]);
        assert_eq!(
            &rules[2..],
            [
                "-A C -m conntrack --ctorigdst 10.0.0.0/8 -j ACCEPT",
                "-A C -p tcp -m conntrack --ctorigdst 192.0.2.1/32 --ctorigdstport 443 -j ACCEPT",
                "-A C -p tcp -m conntrack --ctorigdst 192.0.2.1/32 --ctorigdstport 8443 -j ACCEPT",
                "-A C -p tcp -m conntrack --ctorigdst 198.51.100.0/24 --ctorigdstport 53 -j ACCEPT",
                "-A C -p udp -m conntrack --ctorigdst 198.51.100.0/24 --ctorigdstport 53 -j ACCEPT",
                "-A C -p udp -m conntrack --ctorigdst 10.9.9.9/32 --ctorigdstport 53 -j ACCEPT",
                "-A C -p tcp -m conntrack --ctorigdst 10.9.9.9/32 --ctorigdstport 53 -j ACCEPT",
                "-A C -j REJECT --reject-with icmp-admin-prohibited",
            ]
        );
    }

    #[test]
    fn metadata_needs_an_explicit_rule() {
        let catch_all = Egress::AllowList {
            allow: vec![EgressRule {
                net: net("0.0.0.0/0"),
                ports: vec![],
                protocol: None,
            }],
        };
        let rules = egress_rules("C", &catch_all, &[]);
        let block = rules.iter().position(|r| r.contains("169.254.169.254"));
        let accept = rules.iter().position(|r| r.contains("0.0.0.0/0"));
        assert!(
            block < accept,
            "the catch-all must not admit metadata: {rules:?}"
        );

        let explicit = Egress::AllowList {
            allow: vec![EgressRule {
                net: net("169.254.169.254/32"),
                ports: vec![80],
                protocol: Some(Protocol::Tcp),
            }],
        };
        let rules = egress_rules("C", &explicit, &[]);
        assert_eq!(
            rules[1],
            "-A C -p tcp -m conntrack --ctorigdst 169.254.169.254/32 --ctorigdstport 80 -j ACCEPT"
        );
        assert!(rules[2].contains("--ctorigdst 169.254.169.254/32 -j REJECT"));
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
