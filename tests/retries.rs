//! Safe retries with a real client: the same `request_id` and request returns the first call's
//! sandbox or snapshot (also after a restart of sandboxd, also for concurrent retries), and the
//! same id with another request is INVALID_ARGUMENT.

mod common;

use common::TestEnv;
use sandboxd::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_create_returns_the_first_sandbox_even_across_a_restart() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    // No sandbox_id: each call would generate its own, so only the request id ties them.
    let request = pb::CreateSandboxRequest {
        request_id: "create-7f3a".into(),
        labels: [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into(),
        ..c.request("")
    };
    let first = c.create(request.clone()).await;
    // Concurrent retries (a mesh that retried twice) wait for and return the same sandbox.
    let retries = (0..3).map(|_| {
        let (mut c, request) = (c.clone(), request.clone());
        tokio::spawn(async move { c.create(request).await })
    });
    for retry in futures::future::join_all(retries).await {
        assert_eq!(retry.unwrap().sandbox_id, first.sandbox_id);
    }
    env.sandboxd.restart().await;
    let mut c = env.clients().await;
    let after = c.create(request.clone()).await;
    assert_eq!(after.sandbox_id, first.sandbox_id);
    let listed = c.list().await;
    assert_eq!(listed.len(), 1, "retries made no second sandbox");

    let changed = pb::CreateSandboxRequest {
        hostname: "other".into(),
        ..request
    };
    let err = c.try_create(changed).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("request_id"), "{err}");

    c.force_delete(&first.sandbox_id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_commit_and_restore_do_the_work_once() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("src").await;
    c.sh_ok("src", "echo one > /marker").await;
    let commit = pb::CommitSnapshotRequest {
        sandbox_id: "src".into(),
        request_id: "commit-1".into(),
        ..Default::default()
    };
    let commit_once = |c: &mut common::Clients| {
        let mut snap = c.snap.clone();
        let req = commit.clone();
        async move {
            snap.commit_snapshot(req)
                .await
                .map(|r| r.into_inner().snapshot.unwrap())
        }
    };
    let first = commit_once(&mut c).await.unwrap();
    c.sh_ok("src", "echo two > /marker").await;
    let again = commit_once(&mut c).await.unwrap();
    assert_eq!(again.snapshot_id, first.snapshot_id);
    let snapshots = c.list_snapshots().await;
    assert_eq!(snapshots.len(), 1, "the retry made no second snapshot");

    let restore = pb::RestoreSandboxRequest {
        sandbox_id: "src".into(),
        snapshot_id: first.snapshot_id.clone(),
        request_id: "restore-1".into(),
    };
    let restored = c.snap.restore_sandbox(restore.clone()).await.unwrap();
    let pid = restored.into_inner().sandbox.unwrap().pid;
    assert_eq!(c.sh_ok("src", "cat /marker").await.trim(), "one");
    c.sh_ok("src", "echo three > /marker").await;
    // The retry finds the restore done: it neither restarts the sandbox nor resets its files.
    let again = c.snap.restore_sandbox(restore).await.unwrap();
    assert_eq!(again.into_inner().sandbox.unwrap().pid, pid);
    assert_eq!(c.sh_ok("src", "cat /marker").await.trim(), "three");

    let err = c
        .snap
        .restore_sandbox(pb::RestoreSandboxRequest {
            sandbox_id: "src".into(),
            snapshot_id: "snap-other".into(),
            request_id: "restore-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    c.force_delete("src").await;
    c.delete_snapshot(&first.snapshot_id).await;
    env.leak_check().await;
}
