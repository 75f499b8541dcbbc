//! SnapshotService against a real containerd: commit keeps a running sandbox running, restore
//! and fork see exactly the committed files, delete refuses while in use and then frees storage.

mod common;

use std::time::Duration;

use common::TestEnv;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;
use sandboxd::pb::{self, SandboxState};
use tonic::transport::Channel;
use tonic::Code;

struct Clients {
    sb: SandboxServiceClient<Channel>,
    snap: SnapshotServiceClient<Channel>,
}

async fn clients(env: &TestEnv) -> Clients {
    let ch = env.channel().await;
    Clients {
        sb: SandboxServiceClient::new(ch.clone()),
        snap: SnapshotServiceClient::new(ch),
    }
}

async fn sh(c: &mut Clients, id: &str, script: &str) -> (i32, String) {
    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            sandbox_id: id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("exec in {id}: {e}"))
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr),
    )
}

async fn commit(c: &mut Clients, id: &str) -> pb::Snapshot {
    c.snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("commit_snapshot")
        .into_inner()
        .snapshot
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_keeps_a_running_sandbox_running_and_restore_rolls_back() {
    let env = TestEnv::new().await;
    let mut c = clients(&env).await;
    // Written beside and renamed over: a reader never sees the file truncated mid-update.
    let counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done";
    let sb =
        c.sb.create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "live".into(),
            image: env.image_ref(),
            command: vec!["sh".into(), "-c".into(), counter.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(
        sh(&mut c, "live", "mkdir -p /data && echo kept > /data/before")
            .await
            .0,
        0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: u64 = sh(&mut c, "live", "cat /tmp/count")
        .await
        .1
        .trim()
        .parse()
        .unwrap();
    let snap = commit(&mut c, "live").await;
    assert!(snap.snapshot_id.starts_with("snap-"));
    assert_eq!(snap.sandbox_id, "live");
    assert_eq!(snap.image, env.image_ref());
    assert!(snap.size_bytes > 0);
    // Same PID 1, still counting from where it was: its memory survived the capture.
    let after_commit =
        c.sb.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "live".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(after_commit.state(), SandboxState::Running);
    assert_eq!(after_commit.pid, sb.pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later: u64 = sh(&mut c, "live", "cat /tmp/count")
        .await
        .1
        .trim()
        .parse()
        .unwrap();
    assert!(later > before, "the counter stopped: {before} then {later}");

    sh(&mut c, "live", "echo gone > /data/after; rm /data/before").await;
    let restored = c
        .snap
        .restore_sandbox(pb::RestoreSandboxRequest {
            sandbox_id: "live".into(),
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(restored.state(), SandboxState::Running);
    assert_eq!(restored.snapshot_id, snap.snapshot_id);
    assert_eq!(
        sh(&mut c, "live", "cat /data/before").await,
        (0, "kept\n".into())
    );
    assert_ne!(
        sh(&mut c, "live", "cat /data/after").await.0,
        0,
        "a file written after the commit survived the restore"
    );

    let got = c
        .snap
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, snap);
    // In use by the restored sandbox: refused.
    let err = c
        .snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "live".into(),
        force: true,
    })
    .await
    .unwrap();
    c.snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .unwrap();
    let err = c
        .snap
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_forks_see_the_snapshot_and_diverge() {
    let env = TestEnv::new().await;
    let mut c = clients(&env).await;
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "origin".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    sh(&mut c, "origin", "echo shared > /seed").await;
    // A stopped sandbox commits too.
    c.sb.stop_sandbox(pb::StopSandboxRequest {
        sandbox_id: "origin".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = commit(&mut c, "origin").await;
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
        let fork =
            c.sb.create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: format!("fork-{i}"),
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap();
        assert_eq!(fork.snapshot_id, snap.snapshot_id);
        assert_eq!(fork.image, env.image_ref());
    }
    for i in 0..20 {
        let id = format!("fork-{i}");
        assert_eq!(sh(&mut c, &id, "cat /seed").await, (0, "shared\n".into()));
        sh(&mut c, &id, &format!("echo {i} > /mine")).await;
    }
    for i in 0..20 {
        assert_eq!(
            sh(&mut c, &format!("fork-{i}"), "cat /mine").await.1,
            format!("{i}\n")
        );
    }
    // A snapshot of a fork names its parent, and a parent with children cannot go.
    let child = commit(&mut c, "fork-0").await;
    assert_eq!(child.parent_snapshot_id, snap.snapshot_id);
    let fork_of_child =
        c.sb.create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "grandchild".into(),
            snapshot_id: child.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(fork_of_child.state(), SandboxState::Running);
    assert_eq!(
        sh(&mut c, "grandchild", "cat /seed /mine").await.1,
        "shared\n0\n"
    );
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
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "legacy".into(),
        snapshot_id: child.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        sh(&mut c, "legacy", "cat /seed /mine").await.1,
        "shared\n0\n"
    );
    for id in ["grandchild".to_string(), "legacy".to_string()]
        .into_iter()
        .chain((0..20).map(|i| format!("fork-{i}")))
        .chain(["origin".to_string()])
    {
        c.sb.delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id,
            force: true,
        })
        .await
        .unwrap();
    }
    let err = c
        .snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    c.snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: child.snapshot_id,
        })
        .await
        .unwrap();
    c.snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await
        .unwrap();
    // Every snapshot layer was freed by GC: only the base image's committed snapshot remains.
    let snaps = env.containerd.ctr_ok(&env.namespace, &["snapshots", "ls"]);
    assert_eq!(snaps.lines().count(), 2, "snapshots left:\n{snaps}");
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_errors_are_clear() {
    let env = TestEnv::new().await;
    let mut c = clients(&env).await;
    let err = c
        .snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .snap
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "snap-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .snap
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "BAD ID".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "s".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .snap
        .restore_sandbox(pb::RestoreSandboxRequest {
            sandbox_id: "s".into(),
            snapshot_id: "snap-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The failed restore left the sandbox as it was.
    let sb =
        c.sb.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "s".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
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
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "s".into(),
        force: true,
    })
    .await
    .unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_snapshot_forks_on_a_second_node() {
    let env = TestEnv::new().await;
    let mut c = clients(&env).await;
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "src".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    sh(
        &mut c,
        "src",
        "mkdir -p /work && echo from-node-1 > /work/state",
    )
    .await;
    let snap = commit(&mut c, "src").await;
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
    })
    .await;
    let mut c2 = Clients {
        sb: SandboxServiceClient::new(node2.channel().await),
        snap: SnapshotServiceClient::new(node2.channel().await),
    };
    let fork = c2
        .sb
        .create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "remote-fork".into(),
            image: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(fork.state(), SandboxState::Running);
    assert_eq!(
        sh(&mut c2, "remote-fork", "cat /work/state").await,
        (0, "from-node-1\n".into())
    );
    c2.sb
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: "remote-fork".into(),
            force: true,
        })
        .await
        .unwrap();
    let leaks = containerd2.leaks(&ns2).await;
    assert!(leaks.is_empty(), "node 2 leaked: {leaks}");
    drop(node2);
    drop(containerd2);
    drop(cgroup2);
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "src".into(),
        force: true,
    })
    .await
    .unwrap();
    c.snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await
        .unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_generations_keep_working() {
    let env = TestEnv::new().await;
    let mut c = clients(&env).await;
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "deep".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    sh(&mut c, "deep", "mkdir /gen").await;
    let mut last = String::new();
    for g in 0..200 {
        assert_eq!(
            sh(&mut c, "deep", &format!("echo {g} > /gen/{g}")).await.0,
            0,
            "generation {g}"
        );
        let snap = commit(&mut c, "deep").await;
        // Alternate: restore the sandbox onto its snapshot, or fork a new one from it.
        if g % 2 == 0 {
            c.snap
                .restore_sandbox(pb::RestoreSandboxRequest {
                    sandbox_id: "deep".into(),
                    snapshot_id: snap.snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("restore at generation {g}: {e}"));
        } else {
            c.sb.delete_sandbox(pb::DeleteSandboxRequest {
                sandbox_id: "deep".into(),
                force: true,
            })
            .await
            .unwrap();
            c.sb.create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: "deep".into(),
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("fork at generation {g}: {e}"));
        }
        last = snap.snapshot_id;
    }
    let (code, out) = sh(&mut c, "deep", "ls /gen | wc -l; cat /gen/0 /gen/199").await;
    assert_eq!(code, 0);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["200", "0", "199"]
    );
    // Squashing kept the chain short enough for overlayfs.
    let snaps = env.containerd.ctr_ok(&env.namespace, &["snapshots", "ls"]);
    assert!(!last.is_empty());
    let mut c2 = clients(&env).await;
    c2.sb
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: "deep".into(),
            force: true,
        })
        .await
        .unwrap();
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
            if c2
                .snap
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: s.snapshot_id.clone(),
                })
                .await
                .is_err()
            {
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
    let mut c = clients(&env).await;
    // Written beside and renamed over: a reader never sees the file truncated mid-update.
    let counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done";
    let sb =
        c.sb.create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "fragile".into(),
            image: env.image_ref(),
            command: vec!["sh".into(), "-c".into(), counter.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    sh(&mut c, "fragile", "echo precious > /keep").await;
    let err = c
        .snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "fragile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("commit.diff"), "{err}");
    // Still running, same PID 1, resumed (the counter moves), files intact, no snapshot made.
    let after =
        c.sb.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "fragile".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!((after.state(), after.pid), (SandboxState::Running, sb.pid));
    let a: u64 = sh(&mut c, "fragile", "cat /tmp/count")
        .await
        .1
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b: u64 = sh(&mut c, "fragile", "cat /tmp/count")
        .await
        .1
        .trim()
        .parse()
        .unwrap();
    assert!(b > a, "the sandbox stayed paused after a failed commit");
    assert_eq!(sh(&mut c, "fragile", "cat /keep").await.1, "precious\n");
    let listed = c
        .snap
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.snapshots.is_empty());
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "fragile".into(),
        force: true,
    })
    .await
    .unwrap();
    env.leak_check().await;
    drop(env);

    // Apply failing after the diff, and a restore failing after the old task was stopped.
    let env = TestEnv::with_args(&["--failpoints", "commit.apply,create.start"]).await;
    let mut c = clients(&env).await;
    let err =
        c.sb.create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "never".into(),
            image: env.image_ref(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("create.start"), "{err}");
    assert_eq!(
        c.sb.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "never".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    env.leak_check().await;
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "f2".into(),
        image: env.image_ref(),
        start: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "f2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("commit.apply"), "{err}");
    assert!(c
        .snap
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .is_empty());
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "f2".into(),
        force: true,
    })
    .await
    .unwrap();
    env.leak_check().await;
    drop(env);

    // A restore that fails after stopping the old task brings the sandbox back as it was.
    let env = TestEnv::with_args(&["--failpoints", "restore.swap"]).await;
    let mut c = clients(&env).await;
    c.sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "r".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = commit(&mut c, "r").await;
    sh(&mut c, "r", "echo newer > /newer").await;
    let err = c
        .snap
        .restore_sandbox(pb::RestoreSandboxRequest {
            sandbox_id: "r".into(),
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("restore.swap"), "{err}");
    let after =
        c.sb.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "r".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(after.state(), SandboxState::Running);
    assert_eq!(
        after.snapshot_id, "",
        "the failed restore must not have switched the sandbox"
    );
    assert_eq!(sh(&mut c, "r", "cat /newer").await.1, "newer\n");
    c.sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "r".into(),
        force: true,
    })
    .await
    .unwrap();
    c.snap
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
        })
        .await
        .unwrap();
    env.leak_check().await;
}
