//! Networking of sandboxes. Until CNI support lands every sandbox has its own network namespace
//! with loopback only; this module provides the DNS configuration it sees.

pub mod cni;
pub mod netns;

/// The host's resolv.conf with loopback nameservers removed: inside a sandbox's network
/// namespace 127.0.0.0/8 and ::1 are the sandbox's own, where no resolver listens.
pub fn filter_resolv_conf(host: &str) -> String {
    host.lines()
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

fn is_loopback(addr: &str) -> bool {
    addr.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_dropped() {
        let host = "search example.com\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\noptions edns0\n";
        assert_eq!(
            filter_resolv_conf(host),
            "search example.com\nnameserver 10.0.0.2\noptions edns0\n"
        );
    }
}
