//! Network isolation by default, end to end with the real CNI plugins, iptables and ebtables:
//! what a BRIDGE sandbox reaches with no rule (the internet only), what a rule opens (exactly
//! what it names), published ports, policy changes on running sandboxes, and rules that stay.
//!
//! Each test runs with containerd and sandboxd inside a network namespace of its own (see
//! `common::netns`); sandboxd listens on TCP there, and all traffic stays between addresses
//! inside namespaces the test made.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bridge::*;
use common::netns::{run, run_in_netns, TestNamespace};
use common::registry::free_port;
use sandboxd::pb;
use tonic::Code;

/// The HTTP/2 client preface: a gRPC server answers it with a SETTINGS frame.
const H2_PREFACE: &str = r"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What the metrics endpoint answers.
const HTTP_GET: &str = r"GET /metrics HTTP/1.0\r\n\r\n";

/// How many bytes sandbox `id` reads back after sending `payload` to `addr:port` (0 when it
/// cannot connect). busybox nc hangs up when its input ends: the input stays open a second
/// for the server's answer.
async fn probe(n: &mut NetEnv, id: &str, addr: &str, port: u16, payload: &str) -> usize {
    let (_, out) =
        n.c.sh(
            id,
            &format!("(printf '{payload}'; sleep 1) | nc -w 3 {addr} {port} 2>/dev/null | wc -c"),
        )
        .await;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("probe from {id}: {out:?}"))
}

/// Every IPv4 address of the namespace sandboxd runs in, loopback aside (a sandbox's own
/// loopback is its own).
fn node_addresses() -> Vec<String> {
    run("ip", &["-4", "-o", "addr", "show"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|a| !a.starts_with("127."))
        .map(str::to_string)
        .collect()
}

fn allow(rules: Vec<pb::EgressRule>) -> pb::NetworkSpec {
    bridge_with(pb::EgressMode::AllowList, rules)
}

fn published(host_port: u16) -> pb::NetworkSpec {
    pb::NetworkSpec {
        ports: vec![pb::PortMapping {
            host_port: host_port.into(),
            container_port: 8080,
            ..Default::default()
        }],
        ..bridge()
    }
}

async fn update(
    n: &mut NetEnv,
    id: &str,
    egress: Option<pb::EgressPolicy>,
) -> Result<pb::Sandbox, tonic::Status> {
    n.c.sb
        .update_sandbox_network(pb::UpdateSandboxNetworkRequest {
            sandbox_id: id.into(),
            egress,
        })
        .await
        .map(|r| r.into_inner().sandbox.unwrap())
}

fn policy(mode: pb::EgressMode, allow: Vec<pb::EgressRule>) -> Option<pb::EgressPolicy> {
    Some(pb::EgressPolicy {
        mode: mode as i32,
        allow,
    })
}

/// Waits until sandbox `id`'s own server on `port` answers (on its own loopback).
async fn wait_listening(n: &mut NetEnv, id: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.connect(id, "127.0.0.1", port).await.is_err() {
        assert!(Instant::now() < deadline, "{id}'s server never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_default_sandbox_reaches_neither_sandboxd_nor_the_node_nor_metadata() {
    run_in_netns(
        "a_default_sandbox_reaches_neither_sandboxd_nor_the_node_nor_metadata",
        || async {
            let metrics_port = free_port();
            let metrics = format!("0.0.0.0:{metrics_port}");
            let mut n = NetEnv::start(&[
                "--listen",
                "0.0.0.0:0",
                "--allow-unauthenticated",
                "--metrics-listen",
                &metrics,
            ])
            .await;
            let grpc_port = n.env.sandboxd.addr().port();
            // Another address of the node, a stand-in for ECS's metadata endpoint, and the
            // resolver sandboxes are given (SANDBOX_RESOLV), here on the node itself.
            for addr in ["10.250.0.1/32", "169.254.170.2/32", "10.99.0.53/32"] {
                run("ip", &["addr", "add", addr, "dev", "lo"]);
            }
            let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
            serve((ip("169.254.170.2"), 80).into(), "metadata", None);
            serve((ip("10.99.0.53"), 53).into(), "dns", None);
            serve((ip("10.99.0.53"), 54).into(), "not-dns", None);

            let a = n.create("a", bridge(), &[]).await;
            let a_ip = a.network.unwrap().ip_address;
            let addrs = node_addresses();
            assert!(
                addrs.contains(&GATEWAY.to_string()) && addrs.contains(&"10.250.0.1".to_string()),
                "{addrs:?}"
            );

            // The listeners answer from a bridge when a rule names them: what follows fails
            // because of the policy, not for want of a server.
            let ctl_rules = addrs
                .iter()
                .map(|a| rule(&format!("{a}/32"), &[grpc_port.into(), metrics_port.into()]))
                .collect();
            n.create("ctl", allow(ctl_rules), &[]).await;
            for addr in &addrs {
                assert!(
                    probe(&mut n, "ctl", addr, grpc_port, H2_PREFACE).await > 0,
                    "sandboxd's gRPC port does not answer on {addr}"
                );
                assert!(
                    probe(&mut n, "ctl", addr, metrics_port, HTTP_GET).await > 0,
                    "the metrics port does not answer on {addr}"
                );
            }

            // A default sandbox reaches neither on any address of sandboxd's namespace.
            for addr in &addrs {
                for (port, payload) in [(grpc_port, H2_PREFACE), (metrics_port, HTTP_GET)] {
                    assert_eq!(
                        probe(&mut n, "a", addr, port, payload).await,
                        0,
                        "a default sandbox reached {addr}:{port}"
                    );
                }
            }
            // Metadata: closed by default, and a rule for the whole of 169.254.0.0/16 does not
            // open a metadata address; a rule naming it does.
            assert!(n.connect("a", "169.254.170.2", 80).await.is_err());
            n.create("ll", allow(vec![rule("169.254.0.0/16", &[])]), &[])
                .await;
            assert!(n.connect("ll", "169.254.170.2", 80).await.is_err());
            n.create("meta", allow(vec![rule("169.254.170.2/32", &[80])]), &[])
                .await;
            assert_eq!(
                n.connect("meta", "169.254.170.2", 80).await.unwrap(),
                format!(
                    "metadata {}\n",
                    n.c.get("meta").await.network.unwrap().ip_address
                )
            );
            // DNS to the resolver it was given stays open, even on the node; nothing else there.
            assert_eq!(
                n.connect("a", "10.99.0.53", 53).await.unwrap(),
                format!("dns {a_ip}\n")
            );
            assert!(n.connect("a", "10.99.0.53", 54).await.is_err());

            // The anti-spoofing guard holds the sandbox's own MAC and address.
            let mac = n.c.sh_ok("a", "cat /sys/class/net/eth0/address").await;
            let guards = run("ebtables-save", &[]);
            assert!(
                guards.contains(&format!("--ip-src {a_ip} "))
                    && guards.contains(&format!("--arp-ip-src {a_ip} "))
                    && guards.contains(&format!("-s ! {} ", mac.trim())),
                "{guards}"
            );

            for id in ["a", "ctl", "ll", "meta"] {
                n.c.force_delete(id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[test]
fn sandboxes_reach_each_other_only_when_one_names_the_other() {
    run_in_netns(
        "sandboxes_reach_each_other_only_when_one_names_the_other",
        || async {
            let mut n = NetEnv::start(&[]).await;
            let a = n
                .create("a", bridge(), &as_strs(&server_cmd(9000, "from-a")))
                .await;
            let b = n
                .create("b", bridge(), &as_strs(&server_cmd(9000, "from-b")))
                .await;
            let a_ip = a.network.unwrap().ip_address;
            let b_ip = b.network.unwrap().ip_address;
            wait_listening(&mut n, "a", 9000).await;
            wait_listening(&mut n, "b", 9000).await;
            assert!(n.connect("a", &b_ip, 9000).await.is_err());
            assert!(n.connect("b", &a_ip, 9000).await.is_err());

            // a names b: a reaches b, b still not a (a rule opens its sandbox's way out only).
            let updated = update(
                &mut n,
                "a",
                policy(
                    pb::EgressMode::AllowList,
                    vec![rule(&format!("{b_ip}/32"), &[9000])],
                ),
            )
            .await
            .unwrap();
            let egress = updated.network.unwrap().egress.unwrap();
            assert_eq!(egress.mode, pb::EgressMode::AllowList as i32);
            assert_eq!(egress.allow[0].cidr, format!("{b_ip}/32"));
            assert_eq!(n.connect("a", &b_ip, 9000).await.unwrap(), "from-b\n");
            assert!(n.connect("b", &a_ip, 9000).await.is_err());
            // Exactly what the rule names: b's other ports stay closed.
            assert!(n.connect("a", &b_ip, 9001).await.is_err());

            // A sandbox created naming a reaches a, and only a.
            n.create("c", allow(vec![rule(&format!("{a_ip}/32"), &[9000])]), &[])
                .await;
            assert_eq!(n.connect("c", &a_ip, 9000).await.unwrap(), "from-a\n");
            assert!(n.connect("c", &b_ip, 9000).await.is_err());

            // The policy is kept with the sandbox: a restarted sandboxd re-applies it as set.
            n.env.sandboxd.restart().await;
            n.c = n.env.clients().await;
            let kept = n.c.get("a").await.network.unwrap().egress.unwrap();
            assert_eq!(kept, egress);
            assert_eq!(n.connect("a", &b_ip, 9000).await.unwrap(), "from-b\n");

            // Back to the default closes b again.
            update(&mut n, "a", policy(pb::EgressMode::AllowAll, vec![]))
                .await
                .unwrap();
            assert!(n.connect("a", &b_ip, 9000).await.is_err());

            // A stopped sandbox gets its new policy at its next start.
            n.c.try_stop(pb::StopSandboxRequest {
                sandbox_id: "c".into(),
                force: true,
                timeout: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap();
            update(
                &mut n,
                "c",
                policy(
                    pb::EgressMode::AllowList,
                    vec![rule(&format!("{b_ip}/32"), &[9000])],
                ),
            )
            .await
            .unwrap();
            n.c.start("c").await;
            assert_eq!(n.connect("c", &b_ip, 9000).await.unwrap(), "from-b\n");
            assert!(n.connect("c", &a_ip, 9000).await.is_err());

            // Bad requests: clear statuses, nothing changed.
            n.create("none", pb::NetworkSpec::default(), &[]).await;
            let cases = [
                (
                    "none",
                    policy(pb::EgressMode::DenyAll, vec![]),
                    Code::FailedPrecondition,
                ),
                (
                    "missing",
                    policy(pb::EgressMode::DenyAll, vec![]),
                    Code::NotFound,
                ),
                ("a", None, Code::InvalidArgument),
                (
                    "a",
                    policy(pb::EgressMode::AllowList, vec![rule("10.0.0.0/33", &[])]),
                    Code::InvalidArgument,
                ),
                (
                    "a",
                    policy(pb::EgressMode::DenyAll, vec![rule("10.0.0.0/8", &[])]),
                    Code::InvalidArgument,
                ),
            ];
            for (id, egress, code) in cases {
                let err = update(&mut n, id, egress.clone()).await.unwrap_err();
                assert_eq!(err.code(), code, "{id} {egress:?}: {err:?}");
            }
            assert_eq!(
                n.c.get("a").await.network.unwrap().egress.unwrap().mode,
                pb::EgressMode::AllowAll as i32
            );

            for id in ["a", "b", "c", "none"] {
                n.c.force_delete(id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

/// A TCP server on `addr` inside the namespace at `netns` counting the lines it receives.
fn counting_server(addr: SocketAddr, netns: PathBuf) -> Arc<AtomicUsize> {
    let lines = Arc::new(AtomicUsize::new(0));
    let counter = lines.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let listener = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                for _ in BufReader::new(conn).lines().map_while(Result::ok) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    ready_rx.recv().unwrap();
    lines
}

/// A network beyond the node (in a namespace of its own, joined by a veth pair) standing in
/// for the internet: 192.168.77.2 there, 192.168.77.1 on the node.
fn outside_network() -> (TestNamespace, PathBuf) {
    let outside = TestNamespace::add(&common::unique_name("sbxo"));
    let path = Path::new("/run/netns").join(outside.name());
    run(
        "ip",
        &[
            "link", "add", "sbxo0", "type", "veth", "peer", "name", "sbxo1",
        ],
    );
    run("ip", &["link", "set", "sbxo1", "netns", outside.name()]);
    run("ip", &["addr", "add", "192.168.77.1/24", "dev", "sbxo0"]);
    run("ip", &["link", "set", "sbxo0", "up"]);
    outside.exec("ip", &["addr", "add", "192.168.77.2/24", "dev", "sbxo1"]);
    outside.exec("ip", &["link", "set", "sbxo1", "up"]);
    outside.exec("ip", &["link", "set", "lo", "up"]);
    (outside, path)
}

#[test]
fn a_policy_change_reaches_open_connections_on_their_next_packet() {
    run_in_netns(
        "a_policy_change_reaches_open_connections_on_their_next_packet",
        || async {
            let mut n = NetEnv::start(&[]).await;
            let (outside, outside_path) = outside_network();
            let received = counting_server("192.168.77.2:18500".parse().unwrap(), outside_path);
            n.create("a", bridge(), &[]).await;

            // One connection, open for as long as the policy lets it: a line every 100 ms.
            let mut c = n.c.clone();
            let writer = tokio::spawn(async move {
                c.sh(
                    "a",
                    "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done \
                     | nc 192.168.77.2 18500; echo nc-exit=$?",
                )
                .await
            });
            let deadline = Instant::now() + Duration::from_secs(15);
            while received.load(Ordering::SeqCst) < 5 {
                assert!(Instant::now() < deadline, "the connection carried nothing");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(!writer.is_finished());

            update(&mut n, "a", policy(pb::EgressMode::DenyAll, vec![]))
                .await
                .unwrap();
            // The next packet of the open connection meets the new policy: a reset ends it at
            // once (without one, TCP would retry for many minutes).
            let (_, out) = tokio::time::timeout(Duration::from_secs(30), writer)
                .await
                .expect("the open connection outlived the policy that forbids it")
                .unwrap();
            assert!(out.contains("nc-exit="), "{out}");
            assert!(n.connect("a", "192.168.77.2", 18500).await.is_err());

            // And back: new connections pass again.
            update(&mut n, "a", policy(pb::EgressMode::AllowAll, vec![]))
                .await
                .unwrap();
            let before = received.load(Ordering::SeqCst);
            let (code, out) = n.c.sh("a", "echo again | nc -w 2 192.168.77.2 18500").await;
            assert_eq!(code, 0, "{out}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::SeqCst) == before {
                assert!(
                    Instant::now() < deadline,
                    "the new connection carried nothing"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            n.c.force_delete("a").await;
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
            drop(outside);
        },
    );
}

#[test]
fn published_ports_come_from_the_range_and_never_are_sandboxds_own() {
    run_in_netns(
        "published_ports_come_from_the_range_and_never_are_sandboxds_own",
        || async {
            // The default range.
            let mut n = NetEnv::start(&[]).await;
            for port in [18300, 19999, 30000, 1] {
                let err =
                    n.c.try_create(pb::CreateSandboxRequest {
                        network: Some(published(port)),
                        ..n.c.request("p")
                    })
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{port}: {err:?}");
                assert!(
                    err.message().contains("network.ports[0].host_port")
                        && err.message().contains("20000-29999"),
                    "{port}: {err:?}"
                );
            }
            n.create("p", published(29999), &[]).await;
            n.c.force_delete("p").await;
            assert!(n.c.list().await.is_empty());
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
            drop(n);

            // A range holding sandboxd's own ports: they are refused all the same.
            let metrics_port = free_port();
            let metrics = format!("127.0.0.1:{metrics_port}");
            let mut n = NetEnv::start(&[
                "--host-port-range",
                "1025-65535",
                "--metrics-listen",
                &metrics,
            ])
            .await;
            let grpc_port = n.env.sandboxd.addr().port();
            for (port, needle) in [
                (80, "1025-65535"),
                (grpc_port, "sandboxd's own"),
                (metrics_port, "sandboxd's own"),
            ] {
                let err =
                    n.c.try_create(pb::CreateSandboxRequest {
                        network: Some(published(port)),
                        ..n.c.request("p")
                    })
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{port}: {err:?}");
                assert!(err.message().contains(needle), "{port}: {err:?}");
            }
            // sandboxd still answers on its port: no forward took it over.
            assert!(n.c.list().await.is_empty());
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[test]
fn rules_flushed_by_hand_are_put_back_by_the_next_sweep() {
    run_in_netns(
        "rules_flushed_by_hand_are_put_back_by_the_next_sweep",
        || async {
            let mut n = NetEnv::start(&[]).await;
            let a = n.create("a", bridge(), &[]).await;
            let a_ip = a.network.unwrap().ip_address;
            serve((GATEWAY, 18080).into(), "gw", None);
            assert!(n.connect("a", &GATEWAY.to_string(), 18080).await.is_err());

            // Everything flushed, the built-in chains included: the sandbox is unguarded until
            // a sweep (every 10 s) notices. One may run at any moment, so the test counts the
            // restorations logged instead of timing it.
            const RESTORED: &str = "firewall rules were missing or changed; restored";
            let restored = |n: &NetEnv| {
                std::fs::read_to_string(n.env.sandboxd.log_path())
                    .unwrap()
                    .matches(RESTORED)
                    .count()
            };
            let before = restored(&n);
            run("iptables", &["-F"]);
            run("ebtables", &["-F"]);
            let unguarded = n.connect("a", &GATEWAY.to_string(), 18080).await;
            assert!(
                unguarded == Ok(format!("gw {a_ip}\n")) || restored(&n) > before,
                "flushed rules still refused the sandbox: {unguarded:?}"
            );

            // The sweep notices, says so, and puts everything back.
            let deadline = Instant::now() + Duration::from_secs(60);
            while restored(&n) == before {
                assert!(
                    Instant::now() < deadline,
                    "no sweep restored the rules:\n{}",
                    n.env.sandboxd.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(n.connect("a", &GATEWAY.to_string(), 18080).await.is_err());
            let guards = run("ebtables-save", &[]);
            assert!(guards.contains(&format!("--ip-src {a_ip} ")), "{guards}");
            let filter = run("iptables-save", &["-t", "filter"]);
            for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
                assert!(
                    filter
                        .lines()
                        .any(|l| l.starts_with(&format!("-A {builtin} -j SBXD-"))),
                    "{filter}"
                );
            }

            n.c.force_delete("a").await;
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[test]
fn a_create_whose_rules_cannot_be_installed_fails_and_leaves_nothing() {
    run_in_netns(
        "a_create_whose_rules_cannot_be_installed_fails_and_leaves_nothing",
        || async {
            // sandboxd finds ebtables-restore first in a directory of the test's: a stand-in
            // that fails until the test lets it run the real one.
            let bin = tempfile::tempdir().unwrap();
            let tool = bin.path().join("ebtables-restore");
            let write_tool = |body: &str| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::write(&tool, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
            };
            write_tool("echo 'refused by the test' >&2; exit 1");
            let path = format!("{}:{}", bin.path().display(), common::host::DAEMON_PATH);
            let mut n = NetEnv::start_with_env(&[], &[("PATH", &path)]).await;

            let err =
                n.c.try_create(pb::CreateSandboxRequest {
                    network: Some(bridge()),
                    ..n.c.request("a")
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Internal, "{err:?}");
            assert!(err.message().contains("refused by the test"), "{err:?}");
            assert!(
                n.c.list().await.is_empty(),
                "a failed create left a sandbox"
            );
            assert!(
                n.network_leftovers().is_empty(),
                "{:?}",
                n.network_leftovers()
            );
            n.env.leak_check().await;

            // With the tool working, the same create succeeds and is policed.
            write_tool("exec /usr/sbin/ebtables-restore \"$@\"");
            let a = n.create("a", bridge(), &[]).await;
            let ip = a.network.unwrap().ip_address;
            assert!(run("ebtables-save", &[]).contains(&format!("--ip-src {ip} ")));
            n.c.force_delete("a").await;
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
