//! BRIDGE networking end to end with Debian's real CNI plugins and iptables.
//!
//! Each test that makes bridges runs with containerd and sandboxd inside a network namespace
//! of its own (see `common::netns`): the bridge, veths, addresses, rules and sysctls live and
//! die with it, and all traffic stays between addresses inside namespaces the test made.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::bridge::*;
use common::netns::{run, run_in_netns, TestNamespace};
use common::TestEnv;
use sandboxd::pb::{self, SandboxState};
use tonic::Code;

#[test]
fn bridge_sandboxes_connect_and_the_egress_policy_holds() {
    run_in_netns(
        "bridge_sandboxes_connect_and_the_egress_policy_holds",
        || async {
            let mut n = NetEnv::start(&[]).await;

            let b = n
                .create(
                    "b",
                    bridge(),
                    &["nc", "-ll", "-p", "9000", "-e", "echo", "from-b"],
                )
                .await;
            let b_ip = b.network.as_ref().unwrap().ip_address.clone();
            let a = n.create("a", bridge(), &[]).await;
            let net = a.network.clone().unwrap();
            assert_eq!(net.mode, pb::NetworkMode::Bridge as i32);
            assert_eq!(net.gateway, GATEWAY.to_string());
            assert_eq!(
                net.egress.unwrap().mode,
                pb::EgressMode::AllowAll as i32,
                "allow-all is the BRIDGE default"
            );
            let a_ip: Ipv4Addr = net.ip_address.parse().unwrap();
            assert_eq!(a_ip.octets()[..3], GATEWAY.octets()[..3]);
            assert_ne!(net.ip_address, b_ip);

            // Inside: the address on eth0, /etc/hosts naming it, the filtered resolv.conf.
            let (_, addrs) = n.c.sh("a", "ip -4 -o addr show dev eth0").await;
            assert!(addrs.contains(&format!("{a_ip}/24")), "{addrs}");
            let (_, hosts) = n.c.sh("a", "cat /etc/hosts").await;
            assert!(hosts.contains(&format!("{a_ip}\ta\n")), "{hosts}");
            assert_eq!(n.c.sh("a", "cat /etc/resolv.conf").await.1, SANDBOX_RESOLV);
            // IPv4 only: no IPv6 path around the egress rules.
            assert_eq!(
                n.c.sh("a", "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6")
                    .await
                    .1,
                "1\n"
            );
            assert_eq!(n.c.sh("a", "ip -6 -o addr").await.1, "");

            // Servers on the host side: the bridge's gateway address and the metadata address.
            serve((GATEWAY, 18080).into(), "gw18080", None);
            serve((GATEWAY, 18081).into(), "gw18081", None);
            run("ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
            serve(
                ("169.254.169.254".parse::<Ipv4Addr>().unwrap(), 80).into(),
                "metadata",
                None,
            );

            // A network beyond the bridge with no route back to the sandboxes: only MASQUERADE
            // lets a sandbox's connection there be answered.
            let outside = TestNamespace::add(&common::unique_name("sbxo"));
            let outside_path = PathBuf::from("/run/netns").join(outside.name());
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
            serve(
                "192.168.77.2:18200".parse().unwrap(),
                "outside",
                Some(outside_path.clone()),
            );

            // Allow-all: beyond the node (masqueraded); not the other sandbox, the node or the
            // metadata (see tests/isolation.rs for the whole table).
            assert!(n.connect("a", &b_ip, 9000).await.is_err());
            assert!(n.connect("a", &GATEWAY.to_string(), 18080).await.is_err());
            assert_eq!(
                n.connect("a", "192.168.77.2", 18200).await.unwrap(),
                "outside 192.168.77.1\n",
                "egress beyond the bridge must be masqueraded behind the host's address"
            );
            let err = n.connect("a", "169.254.169.254", 80).await.unwrap_err();
            assert!(
                err.contains("host") || err.contains("unreachable") || err.contains("refused"),
                "{err}"
            );

            // Deny-all: nothing, not even the other sandbox; root inside cannot undo it.
            n.create("deny", bridge_with(pb::EgressMode::DenyAll, vec![]), &[])
                .await;
            for (addr, port) in [
                (b_ip.as_str(), 9000),
                ("10.213.7.1", 18080),
                ("192.168.77.2", 18200),
            ] {
                let r = n.connect("deny", addr, port).await;
                assert!(r.is_err(), "deny-all reached {addr}:{port}: {r:?}");
            }
            let (code, out) =
                n.c.sh(
                    "deny",
                    "ip addr add 10.213.7.250/24 dev eth0 && ip route flush all",
                )
                .await;
            assert_ne!(code, 0, "root inside changed the network: {out}");
            assert!(out.contains("not permitted"), "{out}");

            // Allow-list: exactly its CIDR and port.
            n.create(
                "list",
                bridge_with(
                    pb::EgressMode::AllowList,
                    vec![rule("10.213.7.1/32", &[18080])],
                ),
                &[],
            )
            .await;
            let list_ip = n.c.get("list").await.network.unwrap().ip_address;
            assert_eq!(
                n.connect("list", "10.213.7.1", 18080).await.unwrap(),
                format!("gw18080 {list_ip}\n"),
                "towards the node the sandbox's own address arrives, not masqueraded"
            );
            for (addr, port) in [
                ("10.213.7.1", 18081),
                (b_ip.as_str(), 9000),
                ("192.168.77.2", 18200),
            ] {
                let r = n.connect("list", addr, port).await;
                assert!(r.is_err(), "the allow-list admitted {addr}:{port}: {r:?}");
            }
            // A whole network admits every port in it; the catch-all opens none of the ranges
            // closed by default (the node, the metadata).
            n.create(
                "wide",
                bridge_with(pb::EgressMode::AllowList, vec![rule("0.0.0.0/0", &[])]),
                &[],
            )
            .await;
            assert!(n.connect("wide", "10.213.7.1", 18081).await.is_err());
            assert!(n.connect("wide", "192.168.77.2", 18200).await.is_ok());
            assert!(n.connect("wide", "169.254.169.254", 80).await.is_err());
            // Named explicitly, the metadata address is reachable.
            n.create(
                "meta",
                bridge_with(
                    pb::EgressMode::AllowList,
                    vec![rule("169.254.169.254/32", &[80])],
                ),
                &[],
            )
            .await;
            assert!(n
                .connect("meta", "169.254.169.254", 80)
                .await
                .unwrap()
                .starts_with("metadata"));

            // Port exposure through portmap, from the host and from beyond it.
            let mut published = bridge();
            published.ports = vec![pb::PortMapping {
                host_port: 20300,
                container_port: 8080,
                ..Default::default()
            }];
            let srv = server_cmd(8080, "published");
            let srv: Vec<&str> = srv.iter().map(String::as_str).collect();
            n.create("pub", published.clone(), &srv).await;
            let reply = connect_with_retry(|| {
                let mut s =
                    TcpStream::connect_timeout(&(GATEWAY, 20300).into(), Duration::from_secs(3))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            });
            assert_eq!(reply, "published\n");
            let from_outside = connect_with_retry(|| {
                connect_from(&outside_path, "192.168.77.1:20300".parse().unwrap())
            });
            assert_eq!(from_outside, "published\n");
            // An allow-list names what the sandbox addresses: a node address and published port
            // admits that port's sandbox behind it, the sandbox's own address does not.
            n.create(
                "via",
                bridge_with(
                    pb::EgressMode::AllowList,
                    vec![rule("10.213.7.1/32", &[20300])],
                ),
                &[],
            )
            .await;
            assert_eq!(
                n.connect("via", "10.213.7.1", 20300).await.unwrap(),
                "published\n"
            );
            let pub_ip = n.c.get("pub").await.network.unwrap().ip_address;
            assert!(n.connect("via", &pub_ip, 8080).await.is_err());
            // The same host port twice is refused, naming the holder.
            let err =
                n.c.try_create(pb::CreateSandboxRequest {
                    network: Some(published),
                    ..n.c.request("pub2")
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains("20300") && err.message().contains("pub"),
                "{err:?}"
            );

            // The CLI's network flags reach the API and come back in the sandbox's JSON.
            let endpoint = n.env.endpoint();
            let cli = |args: &[&str]| {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"))
                    .args(["--server", &endpoint])
                    .args(args)
                    .env_remove("SANDBOXD_SERVER")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "sandboxd {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            };
            let image = n.env.image_ref();
            cli(&[
                "sandbox",
                "create",
                &image,
                "--id",
                "cli",
                "--network",
                "bridge",
                "--allow-egress",
                "10.213.7.1/32:18080,18081/tcp",
                "--publish",
                "20400:8080",
            ]);
            let json: serde_json::Value =
                serde_json::from_str(&cli(&["-o", "json", "sandbox", "get", "cli"])).unwrap();
            let network = &json["network"];
            assert_eq!(network["mode"], "BRIDGE");
            assert_eq!(network["egress"]["mode"], "ALLOW_LIST");
            assert_eq!(network["egress"]["allow"][0]["cidr"], "10.213.7.1/32");
            assert_eq!(
                network["egress"]["allow"][0]["ports"],
                serde_json::json!([18080, 18081])
            );
            assert_eq!(network["ports"][0]["host_port"], 20400);
            assert!(n.connect("cli", "10.213.7.1", 18081).await.is_ok());
            assert!(n.connect("cli", "192.168.77.2", 18200).await.is_err());
            cli(&["sandbox", "rm", "-f", "cli"]);

            // NONE has loopback only.
            n.create("none", pb::NetworkSpec::default(), &[]).await;
            let (_, links) = n.c.sh("none", "ip -o link").await;
            assert_eq!(links.lines().count(), 1, "{links}");
            assert!(links.contains(": lo:"), "{links}");
            assert_eq!(
                n.c.sh("none", "cat /etc/resolv.conf").await.1,
                SANDBOX_RESOLV
            );
            let none = n.c.get("none").await.network.unwrap();
            assert!(none.ip_address.is_empty() && none.egress.is_none());

            for id in [
                "a", "b", "deny", "list", "wide", "meta", "pub", "via", "none",
            ] {
                n.c.force_delete(id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
            drop(outside);
        },
    );
}

#[test]
fn network_is_torn_down_on_stop_delete_exit_and_adopted_after_restart() {
    run_in_netns(
        "network_is_torn_down_on_stop_delete_exit_and_adopted_after_restart",
        || async {
            let mut n = NetEnv::start(&[]).await;
            n.create("first", bridge(), &[]).await;
            // The gateway address appears with the first sandbox's bridge.
            serve((GATEWAY, 18080).into(), "gw", None);

            // Stop releases everything; start attaches again.
            let s = n.create("s", bridge_open(), &[]).await;
            assert!(!s.network.unwrap().ip_address.is_empty());
            let stopped =
                n.c.try_stop(pb::StopSandboxRequest {
                    sandbox_id: "s".into(),
                    force: true,
                    timeout: Some(prost_types::Duration {
                        seconds: 2,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(stopped.state, SandboxState::Stopped as i32);
            assert!(
                stopped.network.unwrap().ip_address.is_empty(),
                "a stopped sandbox keeps no address"
            );
            assert_eq!(
                n.netns_files().len(),
                1,
                "only 'first' is attached: {:?}",
                n.netns_files()
            );
            assert_eq!(n.leased_ips().len(), 1);
            let restarted = n.c.start("s").await;
            let ip = restarted.network.unwrap().ip_address;
            assert!(n
                .connect("s", "10.213.7.1", 18080)
                .await
                .unwrap()
                .contains(&ip));

            // A PID 1 that exits by itself loses its network without anyone asking.
            n.create("brief", bridge(), &["sleep", "1"]).await;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let sb = n.c.get("brief").await;
                let attached = n.netns_files().iter().any(|f| f.ends_with("-brief"));
                // The namespace goes before the labels holding the address (they keep the
                // cached CNI result until the teardown is done): wait for both.
                let addressed = sb
                    .network
                    .as_ref()
                    .is_some_and(|net| !net.ip_address.is_empty());
                if sb.state == SandboxState::Stopped as i32 && !attached && !addressed {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the exited sandbox kept its network: {sb:?} {:?}",
                    n.netns_files()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                n.leased_ips().len(),
                2,
                "first and s hold leases: {:?}",
                n.leased_ips()
            );

            // A restarted sandboxd adopts running sandboxes' networks as they are.
            n.env.sandboxd.restart().await;
            n.c = n.env.clients().await;
            assert_eq!(n.c.get("s").await.network.unwrap().ip_address, ip);
            assert!(n.connect("s", "10.213.7.1", 18080).await.is_ok());

            // One that died while sandboxd was down is cleaned when it comes back.
            n.env.sandboxd.kill();
            n.env.containerd.ctr_ok(
                &n.env.namespace,
                &["task", "kill", "-s", "SIGKILL", "first"],
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while !n
                .env
                .containerd
                .ctr_ok(&n.env.namespace, &["task", "ls"])
                .lines()
                .any(|l| l.starts_with("first") && l.contains("STOPPED"))
            {
                assert!(Instant::now() < deadline, "first did not die");
                std::thread::sleep(Duration::from_millis(100));
            }
            n.env.sandboxd.restart().await;
            n.c = n.env.clients().await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while n.netns_files().iter().any(|f| f.ends_with("-first")) {
                assert!(
                    Instant::now() < deadline,
                    "the network of a sandbox that died meanwhile was kept"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(n.leased_ips().len(), 1, "{:?}", n.leased_ips());

            for id in ["first", "s", "brief"] {
                n.c.force_delete(id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[test]
fn cni_failures_fail_create_with_the_plugin_message_and_leave_nothing() {
    run_in_netns(
        "cni_failures_fail_create_with_the_plugin_message_and_leave_nothing",
        || async {
            let conf_dir = tempfile::tempdir().unwrap();
            let conflist = conf_dir.path().join("net.conflist");
            let write = |plugins: &str| {
                std::fs::write(
                    &conflist,
                    format!(r#"{{"cniVersion":"1.0.0","name":"custom","plugins":[{plugins}]}}"#),
                )
                .unwrap()
            };
            let bridge_plugin = |subnet: &str| {
                format!(
                    r#"{{"type":"bridge","bridge":"sbxcustom0","isGateway":true,"ipMasq":true,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],"dataDir":"{}"}}}}"#,
                    conf_dir.path().join("ipam").display()
                )
            };
            write(&bridge_plugin("10.213.300.0/24"));
            let mut n = NetEnv::start(&["--cni-conflist", conflist.to_str().unwrap()]).await;
            let create = |id: &str| pb::CreateSandboxRequest {
                sandbox_id: id.into(),
                image: n.env.image_ref(),
                network: Some(bridge()),
                ..Default::default()
            };

            let err = n.c.try_create(create("bad")).await.unwrap_err();
            assert_eq!(err.code(), Code::Internal, "{err:?}");
            assert!(
                err.message().contains("\"bridge\"") && err.message().contains("10.213.300.0"),
                "the plugin's message is lost: {err:?}"
            );

            write(r#"{"type":"no-such-plugin"}"#);
            let err = n.c.try_create(create("bad")).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(err.message().contains("no-such-plugin"), "{err:?}");

            std::fs::write(&conflist, "{not json").unwrap();
            let err = n.c.try_create(create("bad")).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(err.message().contains("not JSON"), "{err:?}");

            let sandboxes = n.c.list().await;
            assert!(sandboxes.is_empty(), "a failed create left {sandboxes:?}");
            assert!(
                n.network_leftovers().is_empty(),
                "{:?}",
                n.network_leftovers()
            );
            n.env.leak_check().await;

            // Fixed, the operator's own conflist is used; the bridge the failed ADD left behind
            // (with no MAC address: see net::remove_unusable_bridge) does not get in the way.
            write(&bridge_plugin("10.213.9.0/24"));
            let sb = n.c.try_create(create("good")).await.unwrap();
            assert!(sb.network.unwrap().ip_address.starts_with("10.213.9."));
            assert!(run("ip", &["-o", "link"]).contains("sbxcustom0:"));
            n.c.force_delete("good").await;
            assert!(veths().is_empty(), "{:?}", veths());
            assert!(n.netns_files().is_empty());
            n.env.leak_check().await;
        },
    );
}

#[test]
fn five_hundred_bridge_sandboxes_come_and_go_without_a_trace() {
    run_in_netns(
        "five_hundred_bridge_sandboxes_come_and_go_without_a_trace",
        || async {
            let n = NetEnv::start(&[]).await;
            let started = Instant::now();
            // Two workers: both cores busy, and concurrent attaches and detaches exercised.
            let workers: Vec<_> = (0..2)
                .map(|w| {
                    let mut c = n.c.clone();
                    tokio::spawn(async move {
                        for i in 0..250 {
                            let id = format!("cycle-{w}-{i}");
                            let mut spec = bridge();
                            if i % 5 == 0 {
                                spec.ports = vec![pb::PortMapping {
                                    host_port: 20000 + w,
                                    container_port: 80,
                                    ..Default::default()
                                }];
                                spec.egress = Some(pb::EgressPolicy {
                                    mode: pb::EgressMode::AllowList as i32,
                                    allow: vec![rule("10.0.0.0/8", &[443])],
                                });
                            }
                            c.create(pb::CreateSandboxRequest {
                                network: Some(spec),
                                ..c.request(&id)
                            })
                            .await;
                            c.force_delete(&id).await;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
            eprintln!(
                "500 BRIDGE create/delete cycles took {:?}",
                started.elapsed()
            );
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resolv_conf_comes_from_resolved_then_the_host_then_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let resolved = dir.path().join("resolved.conf");
    let host = dir.path().join("host.conf");
    std::fs::write(
        &resolved,
        "nameserver 10.1.1.1\nnameserver 10.1.1.2\nsearch corp\n",
    )
    .unwrap();
    std::fs::write(&host, "nameserver 127.0.0.53\noptions edns0\n").unwrap();
    let env = TestEnv::with_args(&[
        "--resolved-resolv-conf",
        resolved.to_str().unwrap(),
        "--host-resolv-conf",
        host.to_str().unwrap(),
        "--dns-fallback",
        "192.0.2.53,192.0.2.54",
    ])
    .await;
    let mut c = env.clients().await;
    let resolv_of = |id: &'static str| {
        let mut c = c.clone();
        async move {
            c.create_running(id).await;
            let out =
                c.sb.exec_sync(pb::ExecSyncRequest {
                    sandbox_id: id.into(),
                    args: vec!["cat".into(), "/etc/resolv.conf".into()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            String::from_utf8(out.stdout).unwrap()
        }
    };
    // systemd-resolved's upstream file wins over the host's stub-only file.
    assert_eq!(
        resolv_of("resolved").await,
        "nameserver 10.1.1.1\nnameserver 10.1.1.2\nsearch corp\n"
    );
    // Without it, the host's file minus loopback; here nothing is left, so the fallback.
    std::fs::remove_file(&resolved).unwrap();
    assert_eq!(
        resolv_of("fallback").await,
        "options edns0\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n"
    );
    // A host file with a reachable resolver is used, its loopback entries dropped.
    std::fs::write(&host, "nameserver ::1\nnameserver 10.2.2.2\nsearch lan\n").unwrap();
    assert_eq!(resolv_of("host").await, "nameserver 10.2.2.2\nsearch lan\n");
    for id in ["resolved", "fallback", "host"] {
        c.force_delete(id).await;
    }
    env.leak_check().await;
}
