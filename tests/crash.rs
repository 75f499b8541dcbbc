//! sandboxd killed with SIGKILL in the middle of creates, deletes, commits and restores, then
//! started again: every sandbox is either whole and working or NOT_FOUND, no snapshot is
//! half-made, no task is left frozen, and once the API deletes what it shows, containerd holds
//! nothing (no container, task, active snapshot or lease).
//!
//! containerd killed and restarted under a running sandboxd with BRIDGE sandboxes and open exec
//! streams: the streams end UNAVAILABLE (their processes killed), and sandboxes, addresses and
//! routes carry on once it is back.
//!
//! The kill lands at a pseudo-random instant of each round (the seed is printed, so a failure
//! can be replayed with `CRASH_SEED`); the checks hold whatever the instant, so the rounds do
//! not depend on timing to pass.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::bridge::{bridge_open, serve, server_cmd, NetEnv, GATEWAY};
use common::netns::run_in_netns;
use common::{host, Clients, TestEnv};
use sandboxd::pb;
use sandboxd::pb::exec_request::Request as ExecReq;
use sandboxd::pb::exec_response::Response as ExecResp;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;

/// Kill-and-restart rounds per test.
const ROUNDS: u64 = 8;
/// The latest instant of a round at which sandboxd is killed.
const MAX_KILL_DELAY_MS: u64 = 150;

/// A small deterministic generator (xorshift64*): instants differ per round and per seed.
struct Instants(u64);

impl Instants {
    fn from_env() -> Instants {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("crash test seed: CRASH_SEED={seed}");
        Instants(seed)
    }

    fn next_delay(&mut self) -> Duration {
        self.next_delay_below(MAX_KILL_DELAY_MS)
    }

    fn next_delay_below(&mut self, max_ms: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Duration::from_millis(r % max_ms)
    }
}

/// Kills sandboxd after `delay` while `work` runs, then starts it again (and waits for it to
/// serve). The work's own results are whatever the crash made of them.
async fn crash_during<F>(env: &TestEnv, delay: Duration, work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let work = tokio::spawn(work);
    tokio::time::sleep(delay).await;
    env.sandboxd.kill();
    let _ = work.await;
    env.sandboxd.restart().await;
}

/// Every sandbox the API lists works: a running one execs, any other starts and then execs.
/// Returns their ids.
async fn assert_all_whole(c: &mut Clients) -> BTreeSet<String> {
    let listed = c.list().await;
    let mut ids = BTreeSet::new();
    for s in listed {
        if s.state() != pb::SandboxState::Running {
            c.start(&s.sandbox_id).await;
        }
        let out = c.sh_ok(&s.sandbox_id, "echo whole").await;
        assert_eq!(
            out.trim(),
            "whole",
            "sandbox {} does not work",
            s.sandbox_id
        );
        ids.insert(s.sandbox_id);
    }
    ids
}

/// Every snapshot the API lists forks into a working sandbox.
async fn assert_snapshots_fork(c: &mut Clients) {
    let snapshots = c.list_snapshots().await;
    for (i, s) in snapshots.iter().enumerate() {
        let fork = format!("fork-check-{i}");
        c.create_from_snapshot(&fork, &s.snapshot_id).await;
        assert_eq!(c.sh_ok(&fork, "cat /data/mark").await.trim(), "mark");
        c.force_delete(&fork).await;
    }
}

/// Deletes every sandbox and snapshot the API shows, then checks containerd holds nothing.
async fn assert_nothing_hidden(env: &TestEnv, c: &mut Clients) {
    let ids = assert_all_whole(c).await;
    for id in ids {
        c.force_delete(&id).await;
    }
    // Children before their parents: each pass deletes the snapshots nothing builds on.
    for _ in 0..=ROUNDS + 1 {
        let snapshots = c.list_snapshots().await;
        if snapshots.is_empty() {
            break;
        }
        for s in &snapshots {
            if snapshots
                .iter()
                .all(|o| o.parent_snapshot_id != s.snapshot_id)
            {
                c.delete_snapshot(&s.snapshot_id).await;
            }
        }
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_creates_and_deletes_leaves_whole_sandboxes_or_none() {
    let env = TestEnv::new().await;
    let mut instants = Instants::from_env();
    for round in 0..ROUNDS {
        let c = env.clients().await;
        // Sandboxes of the previous round are deleted while new ones are made.
        let previous: Vec<String> = (0..3)
            .map(|k| format!("r{}-{k}", round.wrapping_sub(1)))
            .collect();
        let work = async move {
            let mut tasks = Vec::new();
            for k in 0..3 {
                let mut c = c.clone();
                let id = format!("r{round}-{k}");
                tasks.push(tokio::spawn(async move {
                    let _ = c.try_create(c.request(&id)).await;
                }));
            }
            for id in previous {
                let mut c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = c.try_delete(&id, true).await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        };
        crash_during(&env, instants.next_delay(), work).await;
        let mut c = env.clients().await;
        assert_all_whole(&mut c).await;
    }
    let mut c = env.clients().await;
    assert_nothing_hidden(&env, &mut c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_commits_and_restores_leaves_no_frozen_task_or_half_snapshot() {
    let env = TestEnv::new().await;
    let mut instants = Instants::from_env();
    let mut c = env.clients().await;
    c.create_running("src").await;
    // 32 MiB of changes make the commit's pause window long enough to be hit.
    c.sh_ok(
        "src",
        "mkdir -p /data && echo mark > /data/mark && dd if=/dev/urandom of=/data/blob bs=1M count=32 2>/dev/null",
    )
    .await;
    let base = c.commit("src").await;
    for _ in 0..ROUNDS {
        let c = env.clients().await;
        let base_id = base.snapshot_id.clone();
        let work = async move {
            let mut commit = c.clone();
            let mut restore = c.clone();
            let committing = tokio::spawn(async move {
                let _ = commit.try_commit("src").await;
            });
            let restoring = tokio::spawn(async move {
                let _ = restore.try_restore("src", &base_id).await;
            });
            let _ = committing.await;
            let _ = restoring.await;
        };
        crash_during(&env, instants.next_delay(), work).await;
        let mut c = env.clients().await;
        let src = c.get("src").await;
        assert_ne!(
            src.state(),
            pb::SandboxState::Paused,
            "a commit killed mid-pause must not leave the sandbox frozen"
        );
        assert_all_whole(&mut c).await;
        assert_eq!(c.sh_ok("src", "cat /data/mark").await.trim(), "mark");
        assert_snapshots_fork(&mut c).await;
    }
    let mut c = env.clients().await;
    assert_nothing_hidden(&env, &mut c).await;
}

/// The latest instant of a BRIDGE round at which sandboxd is killed: a BRIDGE create spends
/// most of its time after the container exists (namespace, CNI plugins, firewall chain).
const MAX_BRIDGE_KILL_DELAY_MS: u64 = 600;
/// Where the test's gateway listener answers.
const GATEWAY_PORT: u16 = 18090;

/// Every listed BRIDGE sandbox works and, running, has an address from which it reaches the
/// gateway (a half-attached network would have none, or no route).
async fn assert_bridges_whole(n: &mut NetEnv) {
    let ids = assert_all_whole(&mut n.c).await;
    for id in ids {
        let sb = n.c.get(&id).await;
        let ip = sb.network.map(|net| net.ip_address).unwrap_or_default();
        assert!(!ip.is_empty(), "running BRIDGE sandbox {id} has no address");
        let reply = n
            .connect(&id, &GATEWAY.to_string(), GATEWAY_PORT)
            .await
            .unwrap_or_else(|e| panic!("{id} ({ip}) cannot reach the gateway: {e}"));
        assert!(reply.contains(&ip), "{id}: {reply}");
    }
}

#[test]
fn a_kill_during_bridge_creates_and_deletes_leaves_whole_networks_or_none() {
    run_in_netns(
        "a_kill_during_bridge_creates_and_deletes_leaves_whole_networks_or_none",
        || async {
            let mut n = NetEnv::start(&[]).await;
            let mut instants = Instants::from_env();
            // The first sandbox brings the bridge (and so the gateway address) up.
            n.create("anchor", bridge_open(), &[]).await;
            serve((GATEWAY, GATEWAY_PORT).into(), "gw", None);
            for round in 0..ROUNDS {
                let c = n.env.clients().await;
                let previous: Vec<String> = (0..2)
                    .map(|k| format!("b{}-{k}", round.wrapping_sub(1)))
                    .collect();
                let work = async move {
                    let mut tasks = Vec::new();
                    for k in 0..2 {
                        let mut c = c.clone();
                        let request = pb::CreateSandboxRequest {
                            network: Some(bridge_open()),
                            ..c.request(&format!("b{round}-{k}"))
                        };
                        tasks.push(tokio::spawn(async move {
                            let _ = c.try_create(request).await;
                        }));
                    }
                    for id in previous {
                        let mut c = c.clone();
                        tasks.push(tokio::spawn(async move {
                            let _ = c.try_delete(&id, true).await;
                        }));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                };
                let delay = instants.next_delay_below(MAX_BRIDGE_KILL_DELAY_MS);
                crash_during(&n.env, delay, work).await;
                n.c = n.env.clients().await;
                let prefix = format!("b{round}-");
                let made =
                    n.c.list()
                        .await
                        .iter()
                        .filter(|s| s.sandbox_id.starts_with(&prefix))
                        .count();
                eprintln!("round {round}: killed after {delay:?}, {made} of 2 creates kept");
                assert_bridges_whole(&mut n).await;
            }
            for s in n.c.list().await {
                n.c.force_delete(&s.sandbox_id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

/// An open exec stream: its input half (kept open) and its output.
struct OpenExec {
    _input: tokio::sync::mpsc::Sender<pb::ExecRequest>,
    output: tonic::Streaming<pb::ExecResponse>,
    pid: u32,
}

/// Starts `sh -c script` in `id` with stdin open and reads until it printed `ready`.
async fn open_exec(c: &mut Clients, id: &str, script: &str) -> OpenExec {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let start = pb::ExecStart {
        sandbox_id: id.into(),
        args: vec!["sh".into(), "-c".into(), script.into()],
        stdin: true,
        ..Default::default()
    };
    tx.send(pb::ExecRequest {
        request: Some(ExecReq::Start(start)),
    })
    .await
    .unwrap();
    let mut output =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let mut pid = 0;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        match output.next().await {
            Some(Ok(m)) => match m.response {
                Some(ExecResp::Started(s)) => pid = s.pid,
                Some(ExecResp::Stdout(d)) => seen.extend_from_slice(&d),
                other => panic!("exec in {id} before ready: {other:?}"),
            },
            other => panic!("exec in {id} ended before ready: {other:?}"),
        }
    }
    assert_ne!(pid, 0, "no Started message");
    OpenExec {
        _input: tx,
        output,
        pid,
    }
}

#[test]
fn a_containerd_restart_ends_open_execs_unavailable_and_bridge_sandboxes_carry_on() {
    run_in_netns(
        "a_containerd_restart_ends_open_execs_unavailable_and_bridge_sandboxes_carry_on",
        || async {
            let mut n = NetEnv::start(&[]).await;
            let a = n.create("a", bridge_open(), &[]).await;
            let server = server_cmd(8080, "from-b");
            let server: Vec<&str> = server.iter().map(String::as_str).collect();
            let b = n.create("b", bridge_open(), &server).await;
            // c's PID 1 dies while containerd is away: nobody hears its exit event.
            let c = n.create("c", bridge_open(), &[]).await;
            serve((GATEWAY, GATEWAY_PORT).into(), "gw", None);
            let ip_a = a.network.unwrap().ip_address;
            let ip_b = b.network.unwrap().ip_address;
            // b's server may not listen yet.
            let deadline = Instant::now() + Duration::from_secs(10);
            while n.connect("a", &ip_b, 8080).await.is_err() {
                assert!(Instant::now() < deadline, "a never reached b's server");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            let mut execs = Vec::new();
            for id in ["a", "b"] {
                execs.push(open_exec(&mut n.c, id, "echo ready; exec sleep 1000").await);
                execs.push(open_exec(&mut n.c, id, "echo ready; exec cat").await);
            }

            n.env.containerd.kill();
            host::send_signal(c.pid, nix::sys::signal::Signal::SIGKILL);
            for (i, exec) in execs.iter_mut().enumerate() {
                let end = tokio::time::timeout(Duration::from_secs(60), async {
                    loop {
                        match exec.output.next().await {
                            Some(Ok(m)) => match m.response {
                                Some(ExecResp::Exited(e)) => {
                                    panic!("exec {i} reported an exit it cannot know: {e:?}")
                                }
                                _ => continue,
                            },
                            Some(Err(status)) => return status,
                            None => panic!("exec {i} ended without a status"),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("exec {i} still open a minute after containerd died"));
                assert_eq!(end.code(), Code::Unavailable, "exec {i}: {end}");
            }
            // The processes were killed: a retry must not find the first attempt running.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let alive: Vec<u32> = execs
                    .iter()
                    .map(|e| e.pid)
                    .filter(|&p| host::is_alive(p as i32))
                    .collect();
                if alive.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "exec processes {alive:?} outlived their streams"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            n.env.containerd.restart().await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while n.env.sandboxd.health().await
                != Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
            {
                assert!(
                    Instant::now() < deadline,
                    "health never came back to SERVING"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for (id, ip) in [("a", &ip_a), ("b", &ip_b)] {
                let sb = n.c.get(id).await;
                assert_eq!(sb.state(), pb::SandboxState::Running, "{id}");
                assert_eq!(&sb.network.unwrap().ip_address, ip, "{id} kept its address");
            }
            assert!(n
                .connect("a", &ip_b, 8080)
                .await
                .unwrap()
                .contains("from-b"));
            assert!(n
                .connect("b", &GATEWAY.to_string(), GATEWAY_PORT)
                .await
                .unwrap()
                .contains(&ip_b));
            // The exit missed during the outage is found: c is STOPPED and its network gone.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let sb = n.c.get("c").await;
                let addressed = sb
                    .network
                    .as_ref()
                    .is_some_and(|net| !net.ip_address.is_empty());
                let attached = n.netns_files().iter().any(|f| f.ends_with("-c"));
                if sb.state() == pb::SandboxState::Stopped && !addressed && !attached {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "c's exit during the outage was never noticed: {:?} {:?}",
                    sb.state(),
                    n.netns_files()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let again = open_exec(&mut n.c, "a", "echo ready; exec sleep 1000").await;
            drop(again);
            for id in ["a", "b", "c"] {
                n.c.force_delete(id).await;
            }
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}

#[test]
fn a_namespace_file_with_no_namespace_on_it_does_not_stop_a_restart() {
    run_in_netns(
        "a_namespace_file_with_no_namespace_on_it_does_not_stop_a_restart",
        || async {
            let mut n = NetEnv::start(&[]).await;
            n.create("anchor", bridge_open(), &[]).await;
            serve((GATEWAY, GATEWAY_PORT).into(), "gw", None);
            // What a sandboxd killed between making a namespace file and mounting the namespace
            // on it leaves: a plain file named like a sandbox's namespace, for a sandbox with no
            // running task.
            let anchor = n
                .netns_files()
                .into_iter()
                .next()
                .expect("anchor's namespace");
            let prefix = anchor
                .strip_suffix("anchor")
                .expect("named after the sandbox");
            n.env.sandboxd.kill();
            let ghost = n.netns_dir().join(format!("{prefix}ghost"));
            std::fs::write(&ghost, b"").unwrap();
            n.env.sandboxd.restart().await;
            n.c = n.env.clients().await;
            assert!(
                !ghost.exists(),
                "the empty namespace file is left:\n{}",
                n.env.sandboxd.log_tail()
            );
            assert_bridges_whole(&mut n).await;
            n.c.force_delete("anchor").await;
            n.assert_no_network_leftovers().await;
            n.env.leak_check().await;
        },
    );
}
