//! The warm pool against a real containerd: creates are served from started sandboxes kept
//! ready (with the environment, working directory, user and limits they ask for), the pool
//! refills, stays invisible, survives restarts and shrinks when told.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::{Clients, TestEnv, SMALL_LIMITS};
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
    let mut c = env.clients().await;

    // Unclaimed, they are nobody's: invisible to every RPC.
    let listed = c.list().await;
    assert!(listed.is_empty(), "{listed:?}");
    let hidden = before.iter().next().unwrap().clone();
    let err = c.try_get(&hidden).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        c.sb.exec_sync(pb::ExecSyncRequest {
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
        .create(pb::CreateSandboxRequest {
            image: image.clone(),
            labels: [("team".to_string(), "pool".to_string())].into(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
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
    let out =
        c.sb.exec_sync(pb::ExecSyncRequest {
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
        .create(pb::CreateSandboxRequest {
            image: image.clone(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await;
    assert!(!refilled.contains(&cold.sandbox_id));
    let named = c.create_running("named").await;
    assert_eq!(named.sandbox_id, "named");
    assert_eq!(env.pooled().await, refilled);

    // A pooled sandbox that died is never handed out.
    let dead = refilled.iter().next().unwrap().clone();
    env.containerd
        .ctr_ok(&env.namespace, &["task", "kill", "-s", "SIGKILL", &dead]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let sb = c
            .create(pb::CreateSandboxRequest {
                image: image.clone(),
                ..Default::default()
            })
            .await;
        assert_ne!(sb.sandbox_id, dead);
        assert_eq!(sb.state, SandboxState::Running as i32);
        c.force_delete(&sb.sandbox_id).await;
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

    let mut c = env.clients().await;
    for id in [sb.sandbox_id, cold.sandbox_id, named.sandbox_id] {
        c.force_delete(&id).await;
    }
    env.leak_check().await;
}

/// Runs `script` with `sh -c` in sandbox `id`; returns stdout.
async fn sh(c: &mut Clients, id: &str, script: &str) -> String {
    String::from_utf8_lossy(&c.exec_sh(id, script).await.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_creates_take_env_working_dir_user_and_limits() {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    env.sandboxd
        .restart_with_args(&["--warm-pool".to_string(), format!("{image}=1")])
        .await;
    let pooled = wait_pooled(&env, 1).await;
    let mut c = env.clients().await;
    let resources = Some(SMALL_LIMITS);
    let sb = c
        .create(pb::CreateSandboxRequest {
            image: image.clone(),
            env: [("GREETING".to_string(), "hello".to_string())].into(),
            working_dir: "/tmp".into(),
            user: "nobody".into(),
            resources,
            ..Default::default()
        })
        .await;
    assert!(
        pooled.contains(&sb.sandbox_id),
        "{} is not from the pool {pooled:?}",
        sb.sandbox_id
    );
    assert_eq!(sb.resources, resources);
    let id = sb.sandbox_id.clone();
    assert_eq!(
        sh(&mut c, &id, "echo $GREETING; pwd; id -u").await,
        "hello\n/tmp\n65534\n"
    );
    env.assert_small_limits(&id);
    // The spec it keeps is the one asked for: a restart runs PID 1 with it too.
    c.force_stop(&id).await;
    c.start(&id).await;
    assert_eq!(
        sh(
            &mut c,
            &id,
            "tr '\\0' '\\n' < /proc/1/environ | grep GREETING; stat -c %u /proc/1"
        )
        .await,
        "GREETING=hello\n65534\n"
    );
    assert_eq!(env.cgroup.limits(&id).0.as_deref(), Some("67108864"));

    // A user the image does not know goes the cold way (which reports it); the pooled
    // sandbox stays in the pool.
    let refilled = wait_pooled(&env, 1).await;
    let err =
        c.sb.create_sandbox(pb::CreateSandboxRequest {
            image: image.clone(),
            user: "no-such-user".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("user"), "{err}");
    assert_eq!(env.pooled().await, refilled);
    // A working directory the image lacks is made, as runc makes it at a cold start.
    let made = c
        .create(pb::CreateSandboxRequest {
            image: image.clone(),
            working_dir: "/made/for/this".into(),
            ..Default::default()
        })
        .await;
    assert!(
        refilled.contains(&made.sandbox_id),
        "{} is not from the pool {refilled:?}",
        made.sandbox_id
    );
    assert_eq!(
        sh(&mut c, &made.sandbox_id, "pwd; stat -c %a /made/for/this").await,
        "/made/for/this\n755\n"
    );
    wait_pooled(&env, 1).await;

    for id in [id, made.sandbox_id] {
        c.force_delete(&id).await;
    }
    env.sandboxd.restart_with_args(&[]).await;
    wait_pooled(&env, 0).await;
    env.leak_check().await;
}
