//! SnapshotService against a real containerd: commit keeps a running sandbox running, restore
//! and fork see exactly the committed files, delete refuses while in use and then frees storage.

mod common;

use std::time::Duration;

use common::{Clients, TestEnv};
use sandboxd::pb::{self, SandboxState};
use tonic::Code;

/// A PID 1 counting up in /tmp/count, written beside and renamed over: a reader never sees the
/// file truncated mid-update.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done";

/// Creates sandbox `id` running [`COUNTER`].
async fn create_counting(c: &mut Clients, id: &str) -> pb::Sandbox {
    c.create(pb::CreateSandboxRequest {
        command: vec!["sh".into(), "-c".into(), COUNTER.into()],
        ..c.request(id)
    })
    .await
}

/// What [`COUNTER`] has counted to in sandbox `id`.
async fn count(c: &mut Clients, id: &str) -> u64 {
    c.sh(id, "cat /tmp/count").await.1.trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_keeps_a_running_sandbox_running_and_restore_rolls_back() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let sb = create_counting(&mut c, "live").await;
    assert_eq!(
        c.sh("live", "mkdir -p /data && echo kept > /data/before")
            .await
            .0,
        0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: u64 = count(&mut c, "live").await;
    let snap = c.commit("live").await;
    assert!(snap.snapshot_id.starts_with("snap-"));
    assert_eq!(snap.sandbox_id, "live");
    assert_eq!(snap.image, env.image_ref());
    assert!(snap.size_bytes > 0);
    // Same PID 1, still counting from where it was: its memory survived the capture.
    let after_commit = c.get("live").await;
    assert_eq!(after_commit.state(), SandboxState::Running);
    assert_eq!(after_commit.pid, sb.pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later: u64 = count(&mut c, "live").await;
    assert!(later > before, "the counter stopped: {before} then {later}");

    c.sh("live", "echo gone > /data/after; rm /data/before")
        .await;
    let restored = c.try_restore("live", &snap.snapshot_id).await.unwrap();
    assert_eq!(restored.state(), SandboxState::Running);
    assert_eq!(restored.snapshot_id, snap.snapshot_id);
    assert_eq!(c.sh("live", "cat /data/before").await, (0, "kept\n".into()));
    assert_ne!(
        c.sh("live", "cat /data/after").await.0,
        0,
        "a file written after the commit survived the restore"
    );

    let got = c.try_get_snapshot(&snap.snapshot_id).await.unwrap();
    assert_eq!(got, snap);
    // In use by the restored sandbox: refused.
    let err = c.try_delete_snapshot(&snap.snapshot_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    c.force_delete("live").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    let err = c.try_get_snapshot(&snap.snapshot_id).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_forks_see_the_snapshot_and_diverge() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("origin").await;
    c.sh("origin", "echo shared > /seed").await;
    // A stopped sandbox commits too.
    c.force_stop("origin").await;
    let snap = c.commit("origin").await;
    let listed = c
        .snap
        .list_snapshots(pb::ListSnapshotsRequest {
            sandbox_id: "origin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.snapshots.len(), 1);
    for i in 0..20 {
        let fork = c
            .create_from_snapshot(&format!("fork-{i}"), &snap.snapshot_id)
            .await;
        assert_eq!(fork.snapshot_id, snap.snapshot_id);
        assert_eq!(fork.image, env.image_ref());
    }
    for i in 0..20 {
        let id = format!("fork-{i}");
        assert_eq!(c.sh(&id, "cat /seed").await, (0, "shared\n".into()));
        c.sh(&id, &format!("echo {i} > /mine")).await;
    }
    for i in 0..20 {
        assert_eq!(
            c.sh(&format!("fork-{i}"), "cat /mine").await.1,
            format!("{i}\n")
        );
    }
    // A snapshot of a fork names its parent, and a parent with children cannot go.
    let child = c.commit("fork-0").await;
    assert_eq!(child.parent_snapshot_id, snap.snapshot_id);
    let fork_of_child = c
        .create_from_snapshot("grandchild", &child.snapshot_id)
        .await;
    assert_eq!(fork_of_child.state(), SandboxState::Running);
    assert_eq!(c.sh("grandchild", "cat /seed /mine").await.1, "shared\n0\n");
    // A snapshot whose record lacks the fork labels (committed by an older sandboxd) still
    // forks, through its manifest and config.
    let record = format!("sandboxd.local/snapshots/{}:latest", child.snapshot_id);
    env.containerd.ctr_ok(
        &env.namespace,
        &[
            "images",
            "label",
            &record,
            "sandboxd.io/run-config=",
            "sandboxd.io/chain-id=",
        ],
    );
    let images = env.containerd.ctr_ok(&env.namespace, &["images", "ls"]);
    let line = images.lines().find(|l| l.starts_with(&record)).unwrap();
    assert!(!line.contains("sandboxd.io/chain-id"), "{line}");
    c.create_from_snapshot("legacy", &child.snapshot_id).await;
    assert_eq!(c.sh("legacy", "cat /seed /mine").await.1, "shared\n0\n");
    for id in ["grandchild".to_string(), "legacy".to_string()]
        .into_iter()
        .chain((0..20).map(|i| format!("fork-{i}")))
        .chain(["origin".to_string()])
    {
        c.force_delete(&id).await;
    }
    let err = c.try_delete_snapshot(&snap.snapshot_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    c.delete_snapshot(&child.snapshot_id).await;
    c.delete_snapshot(&snap.snapshot_id).await;
    // Every snapshot layer was freed by GC: only the base image's committed snapshot remains.
    let snaps = env.containerd.ctr_ok(&env.namespace, &["snapshots", "ls"]);
    assert_eq!(snaps.lines().count(), 2, "snapshots left:\n{snaps}");
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_errors_are_clear() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let err = c.try_commit("missing").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.try_get_snapshot("snap-nope").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.try_get_snapshot("BAD ID").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.create_running("s").await;
    let err = c.try_restore("s", "snap-nope").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The failed restore left the sandbox as it was.
    let sb = c.get("s").await;
    assert_eq!(sb.state(), SandboxState::Running);
    let err = c
        .snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "s".into(),
            labels: [("sandboxd.io/x".to_string(), "y".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.force_delete("s").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_snapshot_forks_on_a_second_node() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("src").await;
    c.sh("src", "mkdir -p /work && echo from-node-1 > /work/state")
        .await;
    let snap = c.commit("src").await;
    let target = format!("{}/exported/agent:v1", env.registry.addr());
    let exported = c
        .snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exported.image, target);
    assert!(exported.digest.starts_with("sha256:"));
    let err = c
        .snap
        .export_snapshot(pb::ExportSnapshotRequest {
            snapshot_id: "snap-missing".into(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A second node: its own containerd and sandboxd, sharing only the registry.
    let containerd2 = common::Containerd::start().await;
    let cgroup2 = common::CgroupParent::new();
    let ns2 = common::unique_name("node2");
    let node2 = common::Sandboxd::start(common::SandboxdOptions {
        containerd_address: containerd2.address(),
        namespace: ns2.clone(),
        cgroup_parent: cgroup2.path().to_owned(),
        extra_args: vec![],
        extra_env: vec![],
        tls: None,
    })
    .await;
    let mut c2 = Clients::new(node2.channel().await, target.clone());
    let fork = c2.create_running("remote-fork").await;
    assert_eq!(fork.state(), SandboxState::Running);
    assert_eq!(
        c2.sh("remote-fork", "cat /work/state").await,
        (0, "from-node-1\n".into())
    );
    c2.force_delete("remote-fork").await;
    let leaks = containerd2.leaks(&ns2).await;
    assert!(leaks.is_empty(), "node 2 leaked: {leaks}");
    drop(node2);
    drop(containerd2);
    drop(cgroup2);
    c.force_delete("src").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_generations_keep_working() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("deep").await;
    c.sh("deep", "mkdir /gen").await;
    let mut last = String::new();
    for g in 0..200 {
        assert_eq!(
            c.sh("deep", &format!("echo {g} > /gen/{g}")).await.0,
            0,
            "generation {g}"
        );
        let snap = c.commit("deep").await;
        // Alternate: restore the sandbox onto its snapshot, or fork a new one from it.
        if g % 2 == 0 {
            c.try_restore("deep", &snap.snapshot_id)
                .await
                .unwrap_or_else(|e| panic!("restore at generation {g}: {e}"));
        } else {
            c.force_delete("deep").await;
            c.try_create(pb::CreateSandboxRequest {
                sandbox_id: "deep".into(),
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("fork at generation {g}: {e}"));
        }
        last = snap.snapshot_id;
    }
    let (code, out) = c.sh("deep", "ls /gen | wc -l; cat /gen/0 /gen/199").await;
    assert_eq!(code, 0);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["200", "0", "199"]
    );
    // Squashing kept the chain short enough for overlayfs.
    let snaps = env.containerd.ctr_ok(&env.namespace, &["snapshots", "ls"]);
    assert!(!last.is_empty());
    let mut c2 = env.clients().await;
    c2.force_delete("deep").await;
    // Snapshots delete newest first (each is the parent of the next).
    let mut all = c2
        .snap
        .list_snapshots(pb::ListSnapshotsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(all.len(), 200, "{snaps}");
    all.sort_by_key(|s| std::cmp::Reverse(s.created_at.map(|t| (t.seconds, t.nanos))));
    let mut remaining = all;
    while !remaining.is_empty() {
        let before = remaining.len();
        let mut next = Vec::new();
        for s in remaining {
            if c2.try_delete_snapshot(&s.snapshot_id).await.is_err() {
                next.push(s);
            }
        }
        assert!(next.len() < before, "no snapshot could be deleted");
        remaining = next;
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_mid_commit_and_restore_leave_the_sandbox_as_it_was() {
    let env = TestEnv::with_args(&["--failpoints", "commit.diff"]).await;
    let mut c = env.clients().await;
    let sb = create_counting(&mut c, "fragile").await;
    c.sh("fragile", "echo precious > /keep").await;
    let err = c.try_commit("fragile").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("commit.diff"), "{err}");
    // Still running, same PID 1, resumed (the counter moves), files intact, no snapshot made.
    let after = c.get("fragile").await;
    assert_eq!((after.state(), after.pid), (SandboxState::Running, sb.pid));
    let a: u64 = count(&mut c, "fragile").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b: u64 = count(&mut c, "fragile").await;
    assert!(b > a, "the sandbox stayed paused after a failed commit");
    assert_eq!(c.sh("fragile", "cat /keep").await.1, "precious\n");
    let listed = c
        .snap
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.snapshots.is_empty());
    c.force_delete("fragile").await;
    env.leak_check().await;
    drop(env);

    // Apply failing after the diff, and a restore failing after the old task was stopped.
    let env = TestEnv::with_args(&["--failpoints", "commit.apply,create.start"]).await;
    let mut c = env.clients().await;
    let err = c.try_create(c.request("never")).await.unwrap_err();
    assert!(err.message().contains("create.start"), "{err}");
    assert_eq!(c.try_get("never").await.unwrap_err().code(), Code::NotFound);
    env.leak_check().await;
    c.create(pb::CreateSandboxRequest {
        start: Some(false),
        ..c.request("f2")
    })
    .await;
    let err = c.try_commit("f2").await.unwrap_err();
    assert!(err.message().contains("commit.apply"), "{err}");
    assert!(c.list_snapshots().await.is_empty());
    c.force_delete("f2").await;
    env.leak_check().await;
    drop(env);

    // A restore that fails after stopping the old task brings the sandbox back as it was.
    let env = TestEnv::with_args(&["--failpoints", "restore.swap"]).await;
    let mut c = env.clients().await;
    c.create_running("r").await;
    let snap = c.commit("r").await;
    c.sh("r", "echo newer > /newer").await;
    let err = c.try_restore("r", &snap.snapshot_id).await.unwrap_err();
    assert!(err.message().contains("restore.swap"), "{err}");
    let after = c.get("r").await;
    assert_eq!(after.state(), SandboxState::Running);
    assert_eq!(
        after.snapshot_id, "",
        "the failed restore must not have switched the sandbox"
    );
    assert_eq!(c.sh("r", "cat /newer").await.1, "newer\n");
    c.force_delete("r").await;
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}
