//! CNI bridge networking against Debian's real plugins.
//!
//! The test runs in a network namespace of its own (`common::netns`), so every bridge, veth,
//! iptables rule, sysctl and route the plugins make lives and dies with that namespace, and the
//! sandbox namespaces' bind mounts with its private mount namespace.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::netns::{run, run_in_netns};

use sandboxd::net::cni::{
    Attachment, BridgeNetwork, CniError, CniResult, CniRunner, NetworkConfigList, PortMapping,
    Protocol, RuntimeConfig,
};
use sandboxd::net::netns::NetNs;

const PLUGIN_DIR: &str = "/usr/lib/cni";
const PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "loopback"];
const TOOLS: &[&str] = &["ip", "nsenter", "iptables", "busybox"];
const TEST_NAME: &str = "bridge_network_connects_two_sandboxes_and_del_leaves_nothing";
const HOST_PORT: u16 = 18080;

#[test]
fn bridge_network_connects_two_sandboxes_and_del_leaves_nothing() {
    require_prerequisites();
    run_in_netns(TEST_NAME, body);
}

async fn body() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime_dir = tmp.path().join("netns");
    let ipam_dir = tmp.path().join("ipam");
    let mut cleanup = MountCleanup(Vec::new());

    // The namespace is the test's alone: fixed names cannot collide.
    let octet = 42;
    let subnet = Ipv4Addr::new(10, 213, octet, 0);
    let network = BridgeNetwork {
        name: "sandboxd-test".into(),
        bridge: "sbxt0".into(),
        subnet: format!("{subnet}/24"),
        ipam_data_dir: Some(ipam_dir.clone()),
    };
    let net = network.conflist();
    let runner = CniRunner::new(vec![PathBuf::from(PLUGIN_DIR)]);

    let ns_a = NetNs::create(&runtime_dir, "sbx-a").await.unwrap();
    cleanup.0.push(ns_a.path().to_owned());
    let ns_b = NetNs::create(&runtime_dir, "sbx-b").await.unwrap();
    cleanup.0.push(ns_b.path().to_owned());
    assert!(is_mounted(ns_a.path()) && is_mounted(ns_b.path()));
    assert_ne!(
        std::fs::metadata(ns_a.path()).unwrap().ino(),
        std::fs::metadata("/proc/self/ns/net").unwrap().ino(),
        "the sandbox namespace is the test's own"
    );

    let att_a = Attachment::new("sbx-a", ns_a.path(), "eth0").unwrap();
    let att_b = Attachment::new("sbx-b", ns_b.path(), "eth0").unwrap();
    let rc_a = RuntimeConfig {
        port_mappings: vec![PortMapping {
            host_port: HOST_PORT,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        }],
    };
    let rc_b = RuntimeConfig::default();

    let res_a = runner.add(&net, &att_a, &rc_a).await.unwrap();
    let res_b = runner.add(&net, &att_b, &rc_b).await.unwrap();
    let gateway = IpAddr::V4(Ipv4Addr::new(10, 213, octet, 1));
    let ip_a = assert_in_subnet(&res_a, subnet, gateway);
    let ip_b = assert_in_subnet(&res_b, subnet, gateway);
    assert_ne!(ip_a, ip_b);
    assert_eq!(allocated_ips(&ipam_dir, &net), sorted(vec![ip_a, ip_b]));

    // Only B: portmap 1.1.1's CHECK looks for IPv6 rules an IPv4-only mapping never made
    // (containernetworking/plugins#819), so A's CHECK fails there.
    runner.check(&net, &att_b, &rc_b, &res_b.raw).await.unwrap();

    assert_pings(ns_a.path(), ip_b);
    assert_pings(ns_b.path(), ip_a);
    let nat = iptables_nat();
    assert!(
        nat.contains(&format!("--dport {HOST_PORT}")),
        "no port mapping rule:\n{nat}"
    );
    assert!(
        nat.contains("\\\"sbx-a\\\"") && nat.contains("\\\"sbx-b\\\""),
        "no masquerade rules:\n{nat}"
    );
    assert_eq!(veths().len(), 2, "one veth per sandbox");

    // A plugin type that does not exist is named.
    let missing = NetworkConfigList::from_json(
        br#"{"cniVersion":"1.0.0","name":"broken","plugins":[{"type":"no-such-plugin"}]}"#,
    )
    .unwrap();
    let err = runner.add(&missing, &att_a, &rc_b).await.unwrap_err();
    assert!(
        matches!(&err, CniError::PluginNotFound { plugin, .. } if plugin == "no-such-plugin"),
        "{err}"
    );

    // A plugin's own error comes back with its name and message, and the failed ADD leaves
    // nothing behind.
    let ns_c = NetNs::create(&runtime_dir, "sbx-c").await.unwrap();
    cleanup.0.push(ns_c.path().to_owned());
    let att_c = Attachment::new("sbx-c", ns_c.path(), "eth0").unwrap();
    let bad = BridgeNetwork {
        subnet: "10.213.300.0/24".into(),
        ..network.clone()
    }
    .conflist();
    let err = runner.add(&bad, &att_c, &rc_b).await.unwrap_err();
    eprintln!("broken bridge config fails with: {err}");
    // The undoing DEL reads the same invalid config and fails too; both are reported.
    let primary = match &err {
        CniError::CleanupFailed { error, .. } => error.as_ref(),
        other => other,
    };
    match primary {
        CniError::PluginFailed { plugin, msg, .. } => {
            assert_eq!(plugin, "bridge");
            assert!(msg.contains("10.213.300.0"), "{err}");
        }
        other => panic!("expected the bridge plugin's error, got {other}"),
    }
    assert!(err.to_string().contains("\"bridge\""), "{err}");
    assert_eq!(veths().len(), 2, "the failed ADD left a veth");
    ns_c.remove().await.unwrap();

    // DEL twice with the namespaces present, once more after they are gone.
    for _ in 0..2 {
        runner
            .del(&net, &att_a, &rc_a, Some(&res_a.raw))
            .await
            .unwrap();
        runner
            .del(&net, &att_b, &rc_b, Some(&res_b.raw))
            .await
            .unwrap();
    }
    assert_eq!(veths(), Vec::<String>::new(), "veths remain after DEL");
    assert_eq!(allocated_ips(&ipam_dir, &net), Vec::<IpAddr>::new());
    let nat = iptables_nat();
    assert!(
        !nat.contains("sbx-a") && !nat.contains("sbx-b"),
        "rules remain after DEL:\n{nat}"
    );
    assert!(
        !nat.contains(&format!("--dport {HOST_PORT}")),
        "port mapping remains:\n{nat}"
    );

    for ns in [&ns_a, &ns_b] {
        ns.remove().await.unwrap();
        ns.remove().await.unwrap();
        assert!(!ns.path().exists());
    }
    runner
        .del(&net, &att_a, &rc_a, Some(&res_a.raw))
        .await
        .unwrap();
    runner.del(&net, &att_b, &rc_b, None).await.unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(runtime_dir.to_str().unwrap()),
        "namespace mounts remain:\n{mounts}"
    );
}

/// Checks the result's sandbox address and gateway and returns the address.
fn assert_in_subnet(res: &CniResult, subnet: Ipv4Addr, gateway: IpAddr) -> IpAddr {
    let ip = res
        .sandbox_ip()
        .unwrap_or_else(|| panic!("no sandbox ip in {}", res.raw));
    let IpAddr::V4(v4) = ip.address else {
        panic!("not IPv4: {}", ip.address)
    };
    assert_eq!(
        v4.octets()[..3],
        subnet.octets()[..3],
        "{v4} is outside {subnet}/24"
    );
    assert_eq!(ip.prefix_len, 24);
    assert_eq!(ip.gateway, Some(gateway));
    assert!(
        res.interfaces.iter().any(|i| i.name == "eth0"),
        "{}",
        res.raw
    );
    ip.address
}

fn assert_pings(from: &Path, to: IpAddr) {
    let ping = || {
        Command::new("nsenter")
            .arg(format!("--net={}", from.display()))
            .args(["busybox", "ping", "-c1", "-W2"])
            .arg(to.to_string())
            .output()
            .unwrap()
    };
    // The first packet may wait for ARP; one retry absorbs that.
    let out = ping();
    if !out.status.success() {
        let again = ping();
        assert!(
            again.status.success(),
            "{} cannot ping {to}: {}{}",
            from.display(),
            String::from_utf8_lossy(&again.stdout),
            String::from_utf8_lossy(&again.stderr)
        );
    }
}

/// Addresses host-local has on record for the network (its files named by address).
fn allocated_ips(data_dir: &Path, net: &NetworkConfigList) -> Vec<IpAddr> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(net.name())) else {
        return Vec::new();
    };
    sorted(
        entries
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .collect(),
    )
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

fn veths() -> Vec<String> {
    let out = run("ip", &["-o", "link", "show", "type", "veth"]);
    out.lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect()
}

fn iptables_nat() -> String {
    run("iptables", &["-t", "nat", "-S"])
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the CNI test must run as root: it creates network namespaces, bridges and iptables rules"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing: Vec<String> = TOOLS
        .iter()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .map(|t| t.to_string())
        .collect();
    missing.extend(
        PLUGINS
            .iter()
            .filter(|p| !Path::new(PLUGIN_DIR).join(p).is_file())
            .map(|p| format!("{PLUGIN_DIR}/{p}")),
    );
    assert!(
        missing.is_empty(),
        "missing CNI test prerequisites: {}; install them with `apt-get install \
         containernetworking-plugins iproute2 util-linux iptables busybox-static`",
        missing.join(", ")
    );
}

/// Unmounts namespace files left behind by a failing test, so the temp dir can be removed.
struct MountCleanup(Vec<PathBuf>);

impl Drop for MountCleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(path);
        }
    }
}
