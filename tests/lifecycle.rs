//! Sandbox lifecycle against a real containerd + runc, a real registry and the real binary.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Clients, TestEnv, SMALL_LIMITS};
use sandboxd::pb::{self, SandboxState};
use tonic::Code;

async fn wait_state(
    c: &mut Clients,
    id: &str,
    want: SandboxState,
    within: Duration,
) -> pb::Sandbox {
    let deadline = Instant::now() + within;
    loop {
        let sb = c.try_get(id).await.expect("get_sandbox");
        if sb.state() == want {
            return sb;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox {id} is {:?}, wanted {want:?}",
            sb.state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_proc_root(pid: u32, path: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/root{path}"))
        .unwrap_or_else(|e| panic!("reading {path} of pid {pid}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_walks_created_running_stopped_and_deleted() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    // The image is not pulled yet: create pulls it.
    let sb = c
        .create(pb::CreateSandboxRequest {
            hostname: "box1".into(),
            ..c.request("life")
        })
        .await;
    assert_eq!(sb.state(), SandboxState::Running);
    assert!(sb.pid > 0);
    assert_eq!(sb.image, env.image_ref());
    assert_eq!(sb.command, ["/.sandboxd/init", "-P"]);
    assert!(sb.created_at.is_some() && sb.started_at.is_some());
    // PID 1 is the idle init and sees the files the service provided.
    assert_eq!(read_proc_root(sb.pid, "/etc/hostname"), "box1\n");
    assert!(read_proc_root(sb.pid, "/etc/hosts").contains("box1"));
    assert!(std::fs::read_to_string(format!("/proc/{}/cmdline", sb.pid))
        .unwrap()
        .starts_with("/.sandboxd/init"));

    let listed =
        c.sb.list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        listed
            .sandboxes
            .iter()
            .map(|s| s.sandbox_id.as_str())
            .collect::<Vec<_>>(),
        ["life"]
    );
    assert_eq!(
        listed.sandboxes[0].state(),
        SandboxState::Running,
        "List reports what Get does"
    );
    assert_eq!(listed.sandboxes[0].pid, sb.pid);

    let err = c.try_delete("life", false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    let stopped = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stopped.state(), SandboxState::Stopped);
    assert_eq!(stopped.pid, 0);
    assert!(stopped.exit_status.is_some());
    assert!(stopped.exited_at.is_some());
    // Stopping a stopped sandbox is a no-op.
    let again = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.state(), SandboxState::Stopped);

    let started = c.start("life").await;
    assert_eq!(started.state(), SandboxState::Running);
    assert!(started.pid > 0 && started.pid != sb.pid);
    // Starting a running sandbox is a no-op.
    let same = c.start("life").await;
    assert_eq!(same.pid, started.pid);

    c.try_delete("life", true).await.expect("forced delete");
    assert_eq!(c.try_get("life").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        c.try_delete("life", true).await.unwrap_err().code(),
        Code::NotFound
    );
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_only_then_start_and_a_command_that_exits() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let sb = c
        .create(pb::CreateSandboxRequest {
            start: Some(false),
            ..c.request("later")
        })
        .await;
    assert_eq!(sb.state(), SandboxState::Created);
    assert_eq!(sb.pid, 0);
    let sb = c.start("later").await;
    assert_eq!(sb.state(), SandboxState::Running);

    let cmd = pb::CreateSandboxRequest {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo $GREETING > /tmp/out; exit 3".into(),
        ],
        env: HashMap::from([("GREETING".to_string(), "hi".to_string())]),
        ..c.request("exits")
    };
    c.create(cmd).await;
    let done = wait_state(
        &mut c,
        "exits",
        SandboxState::Stopped,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(done.exit_status, Some(3));
    // A stopped sandbox (exited by itself) deletes without force.
    c.try_delete("exits", false).await.unwrap();
    c.try_delete("later", true).await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_without_force_times_out_and_force_kills() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    // PID 1 in its own pid namespace ignores SIGTERM unless it installs a handler.
    let req = pb::CreateSandboxRequest {
        command: vec!["/bin/sleep".into(), "1000".into()],
        ..c.request("stubborn")
    };
    c.create(req).await;
    let timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let err = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "stubborn".into(),
            timeout,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert_eq!(
        c.try_get("stubborn").await.unwrap().state(),
        SandboxState::Running
    );
    let sb = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "stubborn".into(),
            timeout,
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sb.state(), SandboxState::Stopped);
    assert_eq!(sb.exit_status, Some(137));
    c.try_delete("stubborn", false).await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn label_selector_and_pagination_cover_every_sandbox_once() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let mut want = Vec::new();
    for i in 0..7 {
        let id = format!("page-{i}");
        let team = if i % 2 == 0 { "even" } else { "odd" };
        let labels = HashMap::from([
            ("team".to_string(), team.to_string()),
            ("n".to_string(), i.to_string()),
        ]);
        c.create(pb::CreateSandboxRequest {
            labels,
            start: Some(false),
            ..c.request(&id)
        })
        .await;
        want.push(id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let resp =
            c.sb.list_sandboxes(pb::ListSandboxesRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(resp.sandboxes.len() <= 3);
        seen.extend(resp.sandboxes.into_iter().map(|s| s.sandbox_id));
        pages += 1;
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    assert_eq!(seen, want);
    assert_eq!(pages, 3);

    let even =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            label_selector: "team=even".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        even.sandboxes
            .iter()
            .map(|s| s.sandbox_id.as_str())
            .collect::<Vec<_>>(),
        ["page-0", "page-2", "page-4", "page-6"]
    );
    assert_eq!(
        even.sandboxes[0].labels.get("team").map(String::as_str),
        Some("even")
    );
    let one =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            label_selector: "team=odd,n=3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.sandboxes.len(), 1);
    assert_eq!(one.sandboxes[0].sandbox_id, "page-3");
    let bad =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            label_selector: "novalue".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // A token only continues the query it came from.
    let first =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            page_size: 1,
            label_selector: "team=even".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            page_size: 1,
            label_selector: "team=odd".into(),
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let bad =
        c.sb.list_sandboxes(pb::ListSandboxesRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    for id in &want {
        c.try_delete(id, false).await.unwrap();
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_expiry_deletes_the_sandbox_even_across_a_restart() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let ttl = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    let sb = c
        .create(pb::CreateSandboxRequest {
            ttl,
            ..c.request("short")
        })
        .await;
    let expires = sb.expires_at.expect("expires_at");
    let created = sb.created_at.expect("created_at");
    assert!((expires.seconds - created.seconds - 3).abs() <= 1);
    // The expiry is stored in containerd: a restarted service still honours it.
    env.sandboxd.restart().await;
    let mut c = env.clients().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.try_get("short").await {
            Err(s) if s.code() == Code::NotFound => break,
            Ok(_) => assert!(Instant::now() < deadline, "sandbox outlived its ttl"),
            Err(s) => panic!("get_sandbox: {s}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_sandboxd_sees_and_deletes_old_sandboxes() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let running = c.create(c.request("survivor")).await;
    c.create(pb::CreateSandboxRequest {
        start: Some(false),
        labels: HashMap::from([("k".into(), "v".into())]),
        ..c.request("idle")
    })
    .await;
    env.sandboxd.restart().await;
    let mut c = env.clients().await;
    let after = c.try_get("survivor").await.unwrap();
    assert_eq!(after.state(), SandboxState::Running);
    assert_eq!(
        after.pid, running.pid,
        "the sandbox's processes survive a service restart"
    );
    let idle = c.try_get("idle").await.unwrap();
    assert_eq!(idle.state(), SandboxState::Created);
    assert_eq!(idle.labels.get("k").map(String::as_str), Some("v"));
    c.try_delete("survivor", true).await.unwrap();
    c.try_delete("idle", false).await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_containerd_and_sandboxes_survive_its_restart() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let sb = c.create(c.request("steady")).await;
    assert_eq!(
        env.sandboxd.health().await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    env.containerd.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.sandboxd.health().await
        != Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    {
        assert!(Instant::now() < deadline, "health never went NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = c.try_get("steady").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    env.containerd.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.sandboxd.health().await
        != Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
    {
        assert!(
            Instant::now() < deadline,
            "health never came back to SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = c.try_get("steady").await.unwrap();
    assert_eq!(after.state(), SandboxState::Running);
    assert_eq!(after.pid, sb.pid);
    c.try_delete("steady", true).await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resources_reach_the_cgroup() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let resources = Some(SMALL_LIMITS);
    let sb = c
        .create(pb::CreateSandboxRequest {
            resources,
            ..c.request("limited")
        })
        .await;
    assert_eq!(sb.resources, resources);
    env.assert_small_limits("limited");
    // runc keeps the sandbox's state where sandboxd was told (the test's own directory),
    // not in the host's /run/containerd.
    let runc_state = env
        .containerd
        .dir()
        .join("runc")
        .join(&env.namespace)
        .join("limited")
        .join("state.json");
    assert!(
        runc_state.is_file(),
        "no runc state at {}",
        runc_state.display()
    );
    assert!(!std::path::Path::new("/run/containerd/runc")
        .join(&env.namespace)
        .exists());
    // The default pids limit applies when none is asked for.
    let dflt = c.create(c.request("default-limits")).await;
    assert_eq!(dflt.resources.unwrap().pids_limit, 1024);
    c.try_delete("limited", true).await.unwrap();
    c.try_delete("default-limits", true).await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_create_requests_are_rejected_and_leave_nothing_behind() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let base = c.request("ok");
    let with_resources = |resources| pb::CreateSandboxRequest {
        resources: Some(resources),
        ..base.clone()
    };
    let cases: Vec<(&str, pb::CreateSandboxRequest, Code, &str)> = vec![
        (
            "bad id",
            pb::CreateSandboxRequest {
                sandbox_id: "Bad_ID".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "sandbox_id",
        ),
        (
            "long id",
            pb::CreateSandboxRequest {
                sandbox_id: "a".repeat(64),
                ..base.clone()
            },
            Code::InvalidArgument,
            "sandbox_id",
        ),
        (
            "bad image",
            pb::CreateSandboxRequest {
                image: "no spaces allowed".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "image",
        ),
        (
            "no image",
            pb::CreateSandboxRequest {
                image: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "image",
        ),
        (
            "missing image",
            pb::CreateSandboxRequest {
                image: format!("{}/nope:latest", env.registry.addr()),
                ..base.clone()
            },
            Code::NotFound,
            "nope",
        ),
        (
            "unknown snapshot",
            pb::CreateSandboxRequest {
                image: String::new(),
                snapshot_id: "snap-x".into(),
                ..base.clone()
            },
            Code::NotFound,
            "snap-x",
        ),
        (
            "negative cpu",
            with_resources(pb::Resources {
                cpu_millis: -5,
                ..Default::default()
            }),
            Code::InvalidArgument,
            "cpu_millis",
        ),
        (
            "absurd memory",
            with_resources(pb::Resources {
                memory_bytes: i64::MAX,
                ..Default::default()
            }),
            Code::InvalidArgument,
            "memory_bytes",
        ),
        (
            "negative pids",
            with_resources(pb::Resources {
                pids_limit: -1,
                ..Default::default()
            }),
            Code::InvalidArgument,
            "pids_limit",
        ),
        (
            "oversized label",
            pb::CreateSandboxRequest {
                labels: HashMap::from([("k".into(), "v".repeat(5000))]),
                ..base.clone()
            },
            Code::InvalidArgument,
            "labels",
        ),
        (
            "reserved label",
            pb::CreateSandboxRequest {
                labels: HashMap::from([("sandboxd.io/image".into(), "x".into())]),
                ..base.clone()
            },
            Code::InvalidArgument,
            "labels",
        ),
        (
            "negative ttl",
            pb::CreateSandboxRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -3,
                    nanos: 0,
                }),
                ..base.clone()
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            "relative workdir",
            pb::CreateSandboxRequest {
                working_dir: "tmp".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "working_dir",
        ),
        (
            "unknown user",
            pb::CreateSandboxRequest {
                user: "ghost".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "user",
        ),
        (
            "missing program",
            pb::CreateSandboxRequest {
                command: vec!["/no/such/program".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "command",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = c.try_create(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(err.message().contains(needle), "{what}: {err}");
    }
    // Every rejected request left nothing: the namespace is empty.
    let listed =
        c.sb.list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(listed.sandboxes.is_empty(), "{:?}", listed.sandboxes);
    env.leak_check().await;

    c.create(base.clone()).await;
    let dup = c.try_create(base).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert_eq!(
        c.try_get("ok").await.unwrap().state(),
        SandboxState::Running,
        "a duplicate create must not harm the original"
    );
    for (what, err) in [
        ("get bad id", c.try_get("UPPER").await.unwrap_err()),
        ("get missing", c.try_get("missing").await.unwrap_err()),
        (
            "delete missing",
            c.try_delete("missing", false).await.unwrap_err(),
        ),
    ] {
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "{what}: {err}"
        );
    }
    c.try_delete("ok", true).await.unwrap();
    env.leak_check().await;
}
