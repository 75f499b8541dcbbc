//! GetSandboxStats and WatchSandboxStats against real sandboxes: the figures move when a
//! process burns CPU, allocates memory, starts processes and writes to the writable layer;
//! the watch streams readings until the sandbox stops; and the CLI prints them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Clients, TestEnv};
use sandboxd::pb;
use tonic::Code;

async fn stats(c: &mut Clients, id: &str) -> pb::SandboxStats {
    c.sb.get_sandbox_stats(pb::GetSandboxStatsRequest {
        sandbox_id: id.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("stats of {id}: {e:?}"))
    .into_inner()
    .stats
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_move_with_what_the_sandbox_does() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let mut req = c.request("busy");
    req.resources = Some(pb::Resources {
        cpu_millis: 1000,
        memory_bytes: 256 << 20,
        pids_limit: 100,
    });
    c.create(req).await;

    let before = stats(&mut c, "busy").await;
    let mem = before.memory.unwrap();
    assert_eq!(mem.limit_bytes, Some(256 << 20));
    let pids = before.pids.unwrap();
    assert_eq!(pids.limit, Some(100));
    assert!(pids.current >= 1, "{pids:?}");
    // A NONE sandbox has only loopback, which is not counted.
    assert_eq!(before.network.unwrap(), pb::NetworkStats::default());

    // CPU: a busy loop of about a second.
    c.sh_ok("busy", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
        .await;
    // Memory: 48 MiB in a tmpfs file, charged to the sandbox while it exists.
    c.sh_ok("busy", "head -c 50331648 /dev/zero > /dev/shm/hog")
        .await;
    // Disk: 8 MiB in the writable layer.
    c.sh_ok("busy", "head -c 8388608 /dev/urandom > /root/blob")
        .await;
    // Processes: three sleepers in the background.
    c.sh_ok(
        "busy",
        "for i in 1 2 3; do sleep 1000 </dev/null >/dev/null 2>&1 & done",
    )
    .await;

    let after = stats(&mut c, "busy").await;
    let (cpu0, cpu1) = (before.cpu.unwrap(), after.cpu.unwrap());
    assert!(
        cpu1.usage_nanos >= cpu0.usage_nanos + 100_000_000,
        "{cpu0:?} -> {cpu1:?}"
    );
    assert!(cpu1.user_nanos + cpu1.system_nanos > 0, "{cpu1:?}");
    let mem1 = after.memory.unwrap();
    assert!(
        mem1.usage_bytes >= mem.usage_bytes + (40 << 20),
        "{mem:?} -> {mem1:?}"
    );
    assert!(mem1.working_set_bytes >= 40 << 20, "{mem1:?}");
    // The three sleepers, once the exec that started them has been reaped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = stats(&mut c, "busy").await.pids.unwrap().current;
        if now == pids.current + 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} processes, expected {} + 3",
            pids.current
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        after.writable_layer_bytes >= 8 << 20,
        "{}",
        after.writable_layer_bytes
    );
    assert!(after.time.unwrap().seconds >= before.time.unwrap().seconds);

    // The CLI shows the same reading, as JSON and as text.
    let out = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--server", &env.endpoint(), "stats", "busy", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["memory"]["limit_bytes"], 256 << 20);
    assert!(json["pids"]["current"].as_u64().unwrap() >= 4, "{json}");
    let out = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--server", &env.endpoint(), "stats", "busy"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Memory") && text.contains("of 256.0 MiB"),
        "{text}"
    );

    c.force_delete("busy").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_streams_readings_until_the_sandbox_stops() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("watched").await;
    let mut stream =
        c.sb.watch_sandbox_stats(pb::WatchSandboxStatsRequest {
            sandbox_id: "watched".into(),
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut times = Vec::new();
    for _ in 0..3 {
        let reading = stream.message().await.unwrap().expect("a reading");
        let t = reading.stats.unwrap().time.unwrap();
        times.push((t.seconds, t.nanos));
    }
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    // Stopping the sandbox ends the watch, cleanly.
    c.try_stop(pb::StopSandboxRequest {
        sandbox_id: "watched".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends after the stop");
    assert!(matches!(end, Ok(None)), "{end:?}");

    // A stopped sandbox has no cgroup to read; a missing one is NOT_FOUND; intervals are
    // bounded.
    let e =
        c.sb.get_sandbox_stats(pb::GetSandboxStatsRequest {
            sandbox_id: "watched".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e =
        c.sb.get_sandbox_stats(pb::GetSandboxStatsRequest {
            sandbox_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e =
        c.sb.watch_sandbox_stats(pb::WatchSandboxStatsRequest {
            sandbox_id: "watched".into(),
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("interval"), "{e:?}");
    c.force_delete("watched").await;
    env.leak_check().await;
}
