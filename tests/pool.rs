//! The warm pool against a real containerd: creates are served from started sandboxes kept
//! ready (with the environment, working directory, user and limits they ask for), the pool
//! refills, stays invisible, survives restarts and shrinks when told.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::TestEnv;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::{self, SandboxState};
use tonic::Code;

/// CreateSandbox, asserting it succeeds; returns the sandbox.
async fn create(
    c: &mut SandboxServiceClient<tonic::transport::Channel>,
    request: pb::CreateSandboxRequest,
) -> pb::Sandbox {
    c.create_sandbox(request)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
        .into_inner()
        .sandbox
        .unwrap()
}

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
    let sb = create(
        &mut c,
        pb::CreateSandboxRequest {
            image: image.clone(),
            labels: [("team".to_string(), "pool".to_string())].into(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
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
    let cold = create(
        &mut c,
        pb::CreateSandboxRequest {
            image: image.clone(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(!refilled.contains(&cold.sandbox_id));
    let named = create(
        &mut c,
        pb::CreateSandboxRequest {
            sandbox_id: "named".into(),
            image: image.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(named.sandbox_id, "named");
    assert_eq!(env.pooled().await, refilled);

    // A pooled sandbox that died is never handed out.
    let dead = refilled.iter().next().unwrap().clone();
    env.containerd
        .ctr_ok(&env.namespace, &["task", "kill", "-s", "SIGKILL", &dead]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        let sb = create(
            &mut c,
            pb::CreateSandboxRequest {
                image: image.clone(),
                ..Default::default()
            },
        )
        .await;
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

/// Runs `script` with `sh -c` in sandbox `id`; returns stdout.
async fn sh(
    c: &mut SandboxServiceClient<tonic::transport::Channel>,
    id: &str,
    script: &str,
) -> String {
    let out = c
        .exec_sync(pb::ExecSyncRequest {
            sandbox_id: id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("exec in {id}: {e}"))
        .into_inner();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_creates_take_env_working_dir_user_and_limits() {
    let env = TestEnv::new().await;
    let image = env.image_ref();
    env.sandboxd
        .restart_with_args(&["--warm-pool".to_string(), format!("{image}=1")])
        .await;
    let pooled = wait_pooled(&env, 1).await;
    let mut c = SandboxServiceClient::new(env.channel().await);
    let resources = Some(pb::Resources {
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        pids_limit: 50,
    });
    let sb = create(
        &mut c,
        pb::CreateSandboxRequest {
            image: image.clone(),
            env: [("GREETING".to_string(), "hello".to_string())].into(),
            working_dir: "/tmp".into(),
            user: "nobody".into(),
            resources,
            ..Default::default()
        },
    )
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
    let (memory, pids, quota) = env.cgroup.limits(&id);
    assert_eq!(memory.as_deref(), Some("67108864"));
    assert_eq!(pids.as_deref(), Some("50"));
    assert_eq!(quota.as_deref(), Some("50000"));
    // The spec it keeps is the one asked for: a restart runs PID 1 with it too.
    c.stop_sandbox(pb::StopSandboxRequest {
        sandbox_id: id.clone(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    c.start_sandbox(pb::StartSandboxRequest {
        sandbox_id: id.clone(),
    })
    .await
    .unwrap();
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
    let err = c
        .create_sandbox(pb::CreateSandboxRequest {
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
    let made = create(
        &mut c,
        pb::CreateSandboxRequest {
            image: image.clone(),
            working_dir: "/made/for/this".into(),
            ..Default::default()
        },
    )
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
        c.delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id,
            force: true,
        })
        .await
        .unwrap();
    }
    env.sandboxd.restart_with_args(&[]).await;
    wait_pooled(&env, 0).await;
    env.leak_check().await;
}
