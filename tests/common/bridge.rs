//! BRIDGE test fixtures: sandboxd wired to a test bridge inside the test's own network
//! namespace (see [`super::netns`]), network specs, TCP servers and clients in namespaces, and
//! the list of what a sandbox's network may leave behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::netns::run;
use super::{Clients, TestEnv};
use sandboxd::pb;

pub const BRIDGE: &str = "sbxtest0";
pub const SUBNET: &str = "10.213.7.0/24";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);
/// What the host's resolv.conf says; sandboxes must see it without the loopback stub.
pub const HOST_RESOLV: &str =
    "search test.example\nnameserver 127.0.0.53\nnameserver 10.99.0.53\noptions ndots:2\n";
pub const SANDBOX_RESOLV: &str = "search test.example\nnameserver 10.99.0.53\noptions ndots:2\n";

/// sandboxd with the test bridge, a private namespace directory and a known host resolv.conf.
pub struct NetEnv {
    pub env: TestEnv,
    pub dir: tempfile::TempDir,
    pub c: Clients,
}

impl NetEnv {
    pub async fn start(extra: &[&str]) -> NetEnv {
        NetEnv::start_with_env(extra, &[]).await
    }

    /// Like [`NetEnv::start`], also setting environment variables for sandboxd.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> NetEnv {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("host-resolv.conf");
        std::fs::write(&resolv, HOST_RESOLV).unwrap();
        let netns_dir = dir.path().join("netns");
        let mut args = vec![
            "--netns-dir".to_string(),
            netns_dir.to_string_lossy().into_owned(),
            "--bridge-name".into(),
            BRIDGE.into(),
            "--bridge-subnet".into(),
            SUBNET.into(),
            "--host-resolv-conf".into(),
            resolv.to_string_lossy().into_owned(),
            "--resolved-resolv-conf".into(),
            dir.path()
                .join("no-resolved")
                .to_string_lossy()
                .into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = TestEnv::with_args_env(&args, env).await;
        let c = env.clients().await;
        NetEnv { env, dir, c }
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.dir.path().join("netns")
    }

    /// Namespace files sandboxd holds (the IPAM store beside them excluded).
    pub fn netns_files(&self) -> Vec<String> {
        std::fs::read_dir(self.netns_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "ipam")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Addresses host-local has leased.
    pub fn leased_ips(&self) -> Vec<String> {
        std::fs::read_dir(self.netns_dir().join("ipam").join("sandboxd"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn create(
        &mut self,
        id: &str,
        network: pb::NetworkSpec,
        command: &[&str],
    ) -> pb::Sandbox {
        let request = pb::CreateSandboxRequest {
            network: Some(network),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..self.c.request(id)
        };
        self.c
            .try_create(request)
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}\n{}", self.env.sandboxd.log_tail()))
    }

    /// Whether sandbox `id` can open a TCP connection to `addr`, and what it read.
    pub async fn connect(&mut self, id: &str, addr: &str, port: u16) -> Result<String, String> {
        let (code, out) = self
            .c
            .sh(id, &format!("nc -w 3 {addr} {port} </dev/null"))
            .await;
        if code == 0 && !out.is_empty() {
            Ok(out)
        } else {
            Err(out)
        }
    }

    /// Everything a sandbox's network may leave behind, empty when nothing is.
    pub fn network_leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .netns_files()
            .into_iter()
            .map(|f| format!("netns file {f}"))
            .collect();
        left.extend(
            self.leased_ips()
                .into_iter()
                .map(|ip| format!("IP lease {ip}")),
        );
        left.extend(veths().into_iter().map(|v| format!("veth {v}")));
        let filter = run("iptables-save", &["-t", "filter"]);
        left.extend(
            filter
                .lines()
                // The instance chain (SBXD-<instance>) stays; per-sandbox ones must go.
                .filter_map(|l| l.strip_prefix(':')?.split(' ').next())
                .filter(|chain| chain.starts_with("SBXD-") && chain.matches('-').count() >= 2)
                .map(|l| format!("egress chain {l}")),
        );
        let guards = run("ebtables-save", &[]);
        left.extend(
            guards
                .lines()
                .filter_map(|l| l.strip_prefix(':')?.split(' ').next())
                .filter(|chain| chain.starts_with("SBXD-") && chain.matches('-').count() >= 2)
                .map(|l| format!("anti-spoofing chain {l}")),
        );
        let nat = run("iptables-save", &["-t", "nat"]);
        left.extend(
            nat.lines()
                .filter(|l| l.starts_with(":CNI-") && !l.starts_with(":CNI-HOSTPORT-"))
                .map(|l| format!("nat chain {l}")),
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.netns_dir().to_string_lossy().into_owned();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&dir))
                .map(|l| format!("mount {l}")),
        );
        left
    }

    pub async fn assert_no_network_leftovers(&self) {
        // Teardown after an exit event runs in the background: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.network_leftovers();
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "network resources leaked:\n{}\n--- sandboxd log ---\n{}",
                    left.join("\n"),
                    self.env.sandboxd.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn bridge() -> pb::NetworkSpec {
    pb::NetworkSpec {
        mode: pb::NetworkMode::Bridge as i32,
        ..Default::default()
    }
}

pub fn bridge_with(mode: pb::EgressMode, allow: Vec<pb::EgressRule>) -> pb::NetworkSpec {
    pb::NetworkSpec {
        mode: pb::NetworkMode::Bridge as i32,
        egress: Some(pb::EgressPolicy {
            mode: mode as i32,
            allow,
        }),
        ports: vec![],
    }
}

/// BRIDGE with an ALLOW_LIST naming the whole sandbox subnet: reaches the other sandboxes and
/// the bridge's gateway address (closed to a default sandbox), nothing beyond.
pub fn bridge_open() -> pb::NetworkSpec {
    bridge_with(pb::EgressMode::AllowList, vec![rule(SUBNET, &[])])
}

pub fn rule(cidr: &str, ports: &[u32]) -> pb::EgressRule {
    pb::EgressRule {
        cidr: cidr.into(),
        ports: ports.to_vec(),
        protocol: if ports.is_empty() {
            pb::Protocol::Unspecified
        } else {
            pb::Protocol::Tcp
        } as i32,
    }
}

/// A sandbox command serving `reply` to every TCP connection on `port`.
pub fn server_cmd(port: u16, reply: &str) -> Vec<String> {
    ["nc", "-ll", "-p", &port.to_string(), "-e", "echo", reply]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A TCP server on `addr` (in the calling thread's network namespace when the thread is
/// started) answering each connection with "<name> <peer address>".
pub fn serve(addr: SocketAddr, name: &'static str, netns: Option<PathBuf>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        ready_tx.send(()).unwrap();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = writeln!(conn, "{name} {peer}");
        }
    });
    ready_rx.recv().unwrap();
}

/// Moves the calling thread (only) into the network namespace at `path`.
pub fn enter_netns(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Connects from inside the namespace at `netns` (on a thread of its own) and reads the reply.
pub fn connect_from(netns: &Path, addr: SocketAddr) -> std::io::Result<String> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap()
}

pub fn veths() -> Vec<String> {
    run("ip", &["-o", "link", "show", "type", "veth"])
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .filter(|n| !n.starts_with("sbxo"))
        .collect()
}

/// Retries a connection briefly: a fresh sandbox's server may not listen yet.
pub fn connect_with_retry(mut f: impl FnMut() -> std::io::Result<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(s) if !s.is_empty() => return s,
            other if Instant::now() > deadline => panic!("no connection: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
