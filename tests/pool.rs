//! The warm pool against a real containerd: plain creates are served from started sandboxes
//! kept ready, the pool refills, stays invisible, survives restarts and shrinks when told.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::TestEnv;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::{self, SandboxState};
use tonic::Code;

/// Waits until exactly `n` pooled sandboxes exist and stay so for a moment; returns them.
async fn wait_pooled(env: &TestEnv, n: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids = env.pooled().await;
        if ids.len() == n {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if env.pooled().await == ids {
                return ids;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the pool has {ids:?}, not {n}\n{}",
            env.sandboxd.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_serves_plain_creates_refills_and_follows_its_configuration() {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    let pool_of = |n: usize| vec!["--warm-pool".to_string(), format!("{image}={n}")];
    env.sandboxd.restart_with_args(&pool_of(2)).await;
    let before = wait_pooled(&env, 2).await;
    let mut c = SandboxServiceClient::new(env.channel().await);

    // Unclaimed, they are nobody's: invisible to every RPC.
    let listed = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert!(listed.is_empty(), "{listed:?}");
    let hidden = before.iter().next().unwrap().clone();
    let err = c
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: hidden.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .exec_sync(pb::ExecSyncRequest {
            sandbox_id: hidden.clone(),
            args: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A plain create gets one, with its labels and TTL, created "now".
    let asked = SystemTime::now();
    let sb = c
        .create_sandbox(pb::CreateSandboxRequest {
            image: image.clone(),
            labels: [("team".to_string(), "pool".to_string())].into(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert!(
        before.contains(&sb.sandbox_id),
        "{} is not from the pool {before:?}",
        sb.sandbox_id
    );
    assert_eq!(sb.state, SandboxState::Running as i32);
    assert_eq!(sb.labels.get("team").map(String::as_str), Some("pool"));
    assert!(sb.expires_at.is_some());
    let created = sandboxd::util::system_time(sb.created_at.as_ref().unwrap());
    assert!(
        created >= asked - Duration::from_secs(1),
        "created_at is the pool's, not the claim's"
    );
    let out = c
        .exec_sync(pb::ExecSyncRequest {
            sandbox_id: sb.sandbox_id.clone(),
            args: vec!["hostname".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", sb.sandbox_id)
    );
    let refilled = wait_pooled(&env, 2).await;
    assert!(!refilled.contains(&sb.sandbox_id));

    // Anything a pooled sandbox is not goes the cold way.
    let cold = c
        .create_sandbox(pb::CreateSandboxRequest {
            image: image.clone(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert!(!refilled.contains(&cold.sandbox_id));
    let named = c
        .create_sandbox(pb::CreateSandboxRequest {
            sandbox_id: "named".into(),
            image: image.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(named.sandbox_id, "named");
    assert_eq!(env.pooled().await, refilled);

    // A pooled sandbox that died is never handed out.
    let dead = refilled.iter().next().unwrap().clone();
    env.containerd
        .ctr_ok(&env.namespace, &["task", "kill", "-s", "SIGKILL", &dead]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let sb = c
            .create_sandbox(pb::CreateSandboxRequest {
                image: image.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap();
        assert_ne!(sb.sandbox_id, dead);
        assert_eq!(sb.state, SandboxState::Running as i32);
        c.delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: sb.sandbox_id,
            force: true,
        })
        .await
        .unwrap();
    }
    let now = wait_pooled(&env, 2).await;
    assert!(
        !now.contains(&dead),
        "the dead pooled sandbox stayed: {now:?}"
    );

    // A restart adopts the pool as it is; a smaller pool deletes the surplus; none, all.
    env.sandboxd.restart().await;
    assert_eq!(wait_pooled(&env, 2).await, now);
    env.sandboxd.restart_with_args(&pool_of(1)).await;
    let one = wait_pooled(&env, 1).await;
    assert!(one.is_subset(&now));
    env.sandboxd.restart_with_args(&[]).await;
    wait_pooled(&env, 0).await;

    let mut c = SandboxServiceClient::new(env.channel().await);
    for id in [sb.sandbox_id, cold.sandbox_id, named.sandbox_id] {
        c.delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id,
            force: true,
        })
        .await
        .unwrap();
    }
    env.leak_check().await;
}
