//! sandboxd killed with SIGKILL in the middle of creates, deletes, commits and restores, then
//! started again: every sandbox is either whole and working or NOT_FOUND, no snapshot is
//! half-made, no task is left frozen, and once the API deletes what it shows, containerd holds
//! nothing (no container, task, active snapshot or lease).
//!
//! The kill lands at a pseudo-random instant of each round (the seed is printed, so a failure
//! can be replayed with `CRASH_SEED`); the checks hold whatever the instant, so the rounds do
//! not depend on timing to pass.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Clients, TestEnv};
use sandboxd::pb;

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
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Duration::from_millis(r % MAX_KILL_DELAY_MS)
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
