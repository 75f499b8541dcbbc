//! Parsers for command-line values (clap `value_parser`s): `k=v`, durations, sizes, signals.

use std::collections::HashMap;
use std::time::Duration;

/// `KEY=VALUE` with a non-empty key; the value may be empty or contain `=`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Collects repeated `KEY=VALUE` flags; a later key wins.
pub fn to_map(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}

pub use crate::util::{parse_duration as duration, parse_size as bytes};

/// A signal given as a number (`9`) or a name with or without `SIG` (`KILL`, `SIGTERM`).
pub fn signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("unknown signal {s:?}"))
}

/// Converts a local duration to the protobuf one.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below one billion, so it always fits.
        nanos: d.subsec_nanos() as i32,
    }
}

/// `PORTS/PROTO` suffix parsing shared by the two network flags: the protocol, if any.
fn split_protocol(s: &str) -> Result<(&str, i32), String> {
    match s.rsplit_once('/') {
        Some((rest, "tcp")) => Ok((rest, crate::pb::Protocol::Tcp as i32)),
        Some((rest, "udp")) => Ok((rest, crate::pb::Protocol::Udp as i32)),
        Some((_, other)) if !other.chars().all(|c| c.is_ascii_digit()) => {
            Err(format!("{other:?} is not tcp or udp"))
        }
        _ => Ok((s, crate::pb::Protocol::Unspecified as i32)),
    }
}

fn port_number(s: &str) -> Result<u32, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(u32::from(p)),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// `--allow-egress CIDR[:PORT,PORT...][/tcp|udp]`.
pub fn egress_rule(s: &str) -> Result<crate::pb::EgressRule, String> {
    let (cidr, ports) = match s.split_once(':') {
        Some((cidr, ports)) => (cidr, Some(ports)),
        None => (s, None),
    };
    let (ports, protocol) = match ports {
        Some(p) => {
            let (list, protocol) = split_protocol(p)?;
            let ports = list
                .split(',')
                .map(port_number)
                .collect::<Result<Vec<_>, _>>()?;
            (ports, protocol)
        }
        None => (Vec::new(), crate::pb::Protocol::Unspecified as i32),
    };
    if cidr.is_empty() {
        return Err("a CIDR is required, e.g. 10.0.0.0/8".into());
    }
    Ok(crate::pb::EgressRule {
        cidr: cidr.to_string(),
        ports,
        protocol,
    })
}

/// `--publish [IP:]HOST:PORT[/tcp|udp]`.
pub fn port_mapping(s: &str) -> Result<crate::pb::PortMapping, String> {
    let (rest, protocol) = split_protocol(s)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, host, container) = match parts.as_slice() {
        [host, container] => ("", *host, *container),
        [ip, host, container] => (*ip, *host, *container),
        _ => return Err(format!("{s:?} is not [IP:]HOST_PORT:PORT[/PROTO]")),
    };
    Ok(crate::pb::PortMapping {
        host_port: port_number(host)?,
        container_port: port_number(container)?,
        protocol,
        host_ip: host_ip.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_accept_numbers_and_names() {
        assert_eq!(signal("9").unwrap(), 9);
        assert_eq!(signal("KILL").unwrap(), 9);
        assert_eq!(signal("sigterm").unwrap(), 15);
        assert_eq!(signal("SIGINT").unwrap(), 2);
        assert!(signal("NOPE").is_err());
        assert!(signal("999").is_err());
    }

    #[test]
    fn key_values_need_a_key() {
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(key_value("a=").unwrap(), ("a".into(), "".into()));
        assert!(key_value("=b").is_err());
        assert!(key_value("ab").is_err());
    }

    #[test]
    fn network_flags_parse() {
        let r = egress_rule("192.0.2.1:443,8443/tcp").unwrap();
        assert_eq!(r.cidr, "192.0.2.1");
        assert_eq!(r.ports, [443, 8443]);
        assert_eq!(r.protocol, crate::pb::Protocol::Tcp as i32);
        let r = egress_rule("10.0.0.0/8").unwrap();
        assert_eq!((r.cidr.as_str(), r.ports.len()), ("10.0.0.0/8", 0));
        assert!(egress_rule("10.0.0.1:0").is_err());
        assert!(egress_rule(":80").is_err());

        let p = port_mapping("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.container_port),
            ("127.0.0.1", 5353, 53)
        );
        assert_eq!(p.protocol, crate::pb::Protocol::Udp as i32);
        let p = port_mapping("8080:80").unwrap();
        assert_eq!((p.host_port, p.container_port), (8080, 80));
        assert!(port_mapping("8080").is_err());
        assert!(port_mapping("8080:80/sctp").is_err());
    }
}
