//! The walls around every sandbox, tried from inside real sandboxes: seccomp, capabilities,
//! the cgroup namespace, OOM priority, default limits and the read-only etc files.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Clients, TestEnv};
use futures::StreamExt;
use sandboxd::pb::{self, exec_request, exec_response};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Where perl lands in the test image: its `syscall` builtin makes any raw syscall.
const PERL: &str = "/usr/bin/perl";

/// Runs each syscall number with zero arguments and prints `NR=ERRNO` (or `NR=ok`).
const RAW_SYSCALLS: &str = r#"for $n (@ARGV) { $r = syscall($n, 0, 0, 0, 0, 0); print "$n=", ($r == -1 ? $!+0 : "ok"), " " }"#;

/// x86_64 numbers of syscalls the default profile denies: keyctl, kexec_load,
/// open_by_handle_at, add_key, bpf, userfaultfd.
const DENIED: [(&str, u32); 6] = [
    ("keyctl", 250),
    ("kexec_load", 246),
    ("open_by_handle_at", 304),
    ("add_key", 248),
    ("bpf", 321),
    ("userfaultfd", 323),
];

/// What `ping` does without CAP_NET_RAW: an ICMP echo over a datagram ("ping") socket to
/// 127.0.0.1, which the sandbox's `net.ipv4.ping_group_range` allows.
const ICMP_ECHO: &str = r#"
socket(my $s, 2, 2, 1) or die "socket: $!\n";
my $to = pack("S n C4 x8", 2, 0, 127, 0, 0, 1);
send($s, pack("C C n n n a*", 8, 0, 0, 0, 1, "sandboxd"), 0, $to) or die "send: $!\n";
my $rin = ''; vec($rin, fileno($s), 1) = 1;
select(my $rout = $rin, undef, undef, 5) or die "no reply\n";
recv($s, my $buf, 1500, 0);
my ($type) = unpack("C", $buf);
print "type=$type payload=", substr($buf, 8), "\n";
"#;

/// CAP_NET_RAW's bit in the capability masks of /proc/PID/status.
const CAP_NET_RAW_BIT: u64 = 1 << 13;
/// Docker's default capabilities without CAP_NET_RAW, as /proc shows them.
const EXPECTED_CAPS: u64 = 0xa804_05fb;

/// Clients of `env` using an image of busybox plus the host's perl.
async fn perl_clients(env: &TestEnv) -> Clients {
    let perl = common::image::host_binaries_layer(&[PERL]);
    let perl: Vec<(&str, &[u8])> = perl
        .iter()
        .map(|(path, data)| (path.as_str(), data.as_slice()))
        .collect();
    let layout = common::build_layout_layers(&common::image::image_cache_dir(), &[&perl]);
    let image = env.push_image(&layout, "walls-perl:latest");
    Clients::new(env.channel().await, image)
}

/// `perl -e RAW_SYSCALLS NR...` in sandbox `id`: the errno of each (`ok` on success).
async fn raw_syscalls(c: &mut Clients, id: &str, numbers: &[u32]) -> String {
    let mut args = vec![PERL.to_string(), "-e".into(), RAW_SYSCALLS.into()];
    args.extend(numbers.iter().map(u32::to_string));
    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            sandbox_id: id.into(),
            args,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("perl in {id}: {e}"))
        .into_inner();
    assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8(r.stdout).unwrap()
}

/// The value of `field` (e.g. `CapEff`) in `status`, the text of /proc/PID/status.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_and_its_execs_run_under_the_default_seccomp_profile() {
    let env = TestEnv::new().await;
    let mut c = perl_clients(&env).await;
    c.create_running("sec").await;
    // PID 1 (the idle init) and an exec'd process are both filtered.
    let status = c.sh_ok("sec", "cat /proc/1/status").await;
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");
    let status = c.sh_ok("sec", "cat /proc/self/status").await;
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");

    // No new user namespace (the door to most container escapes), no mount.
    let (code, out) = c.sh("sec", "unshare -r true").await;
    assert_ne!(code, 0, "unshare -r succeeded: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (code, out) = c.sh("sec", "unshare -U true").await;
    assert_ne!(code, 0, "unshare -U succeeded: {out}");
    let (code, out) = c
        .sh("sec", "mkdir -p /mnt/t && mount -t tmpfs none /mnt/t")
        .await;
    assert_ne!(code, 0, "mount succeeded: {out}");

    // Raw syscalls: each denied one fails with EPERM; an allowed one still works.
    let numbers: Vec<u32> = DENIED.iter().map(|(_, nr)| *nr).collect();
    let got = raw_syscalls(&mut c, "sec", &numbers).await;
    for (name, nr) in DENIED {
        assert!(
            got.contains(&format!("{nr}={} ", libc::EPERM)),
            "{name} ({nr}) was not denied with EPERM: {got}"
        );
    }
    let got = raw_syscalls(&mut c, "sec", &[libc::SYS_getpid as u32]).await;
    assert_eq!(got, format!("{}=ok ", libc::SYS_getpid));
    c.force_delete("sec").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_profile_replaces_the_default_one() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("seccomp.json");
    // Everything allowed but getppid, which fails with EACCES.
    std::fs::write(
        &profile,
        format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":{}}}]}}"#,
            libc::EACCES
        ),
    )
    .unwrap();
    let env = TestEnv::with_args(&["--seccomp-profile", profile.to_str().unwrap()]).await;
    let mut c = perl_clients(&env).await;
    c.create_running("custom").await;
    let status = c.sh_ok("custom", "cat /proc/self/status").await;
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");
    let got = raw_syscalls(
        &mut c,
        "custom",
        &[libc::SYS_getppid as u32, libc::SYS_keyctl as u32],
    )
    .await;
    assert!(
        got.starts_with(&format!("{}={} ", libc::SYS_getppid, libc::EACCES)),
        "{got}"
    );
    // keyctl is not denied by this profile: the kernel itself answers (not EPERM).
    assert!(
        !got.contains(&format!("{}={} ", libc::SYS_keyctl, libc::EPERM)),
        "{got}"
    );
    c.force_delete("custom").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_lack_net_raw_yet_ping_works_and_oom_priority_is_500() {
    let env = TestEnv::new().await;
    let mut c = perl_clients(&env).await;
    c.create_running("caps").await;
    for who in ["1", "self"] {
        let status = c.sh_ok("caps", &format!("cat /proc/{who}/status")).await;
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let mask = u64::from_str_radix(status_field(&status, field), 16).unwrap();
            assert_eq!(mask & CAP_NET_RAW_BIT, 0, "{who} {field} {mask:x}");
            assert_eq!(mask, EXPECTED_CAPS, "{who} {field} {mask:x}");
        }
        assert_eq!(status_field(&status, "CapInh"), "0000000000000000");
        assert_eq!(status_field(&status, "CapAmb"), "0000000000000000");
        let adj = c
            .sh_ok("caps", &format!("cat /proc/{who}/oom_score_adj"))
            .await;
        assert_eq!(adj, "500\n", "oom_score_adj of {who}");
    }
    // Raw sockets are gone, ICMP echo sockets are not.
    assert_eq!(
        c.sh_ok("caps", "cat /proc/sys/net/ipv4/ping_group_range")
            .await,
        "0\t2147483647\n"
    );
    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            sandbox_id: "caps".into(),
            args: vec![PERL.into(), "-e".into(), ICMP_ECHO.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let out = String::from_utf8_lossy(&r.stdout) + String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.exit_code, 0, "ping failed: {out}");
    assert_eq!(out, "type=0 payload=sandboxd\n", "an echo reply");
    // A raw socket is refused.
    let (code, out) = c.sh("caps", "ping -c1 -W2 127.0.0.1").await;
    assert_ne!(code, 0, "busybox ping (raw sockets only) worked: {out}");
    c.force_delete("caps").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_namespace_hides_the_node_and_other_sandboxes() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("walls-left").await;
    c.create_running("walls-right").await;
    let parent = env.cgroup.path().trim_start_matches('/').to_string();
    for (me, other) in [("walls-left", "walls-right"), ("walls-right", "walls-left")] {
        let cgroup = c.sh_ok(me, "cat /proc/self/cgroup").await;
        for line in cgroup.lines() {
            let path = line.splitn(3, ':').nth(2).unwrap();
            assert_eq!(path, "/", "{me} sees a path outside its cgroup: {cgroup}");
        }
        let found = c
            .sh_ok(
                me,
                "find /sys/fs/cgroup 2>/dev/null; grep ' - cgroup' /proc/self/mountinfo",
            )
            .await;
        for needle in [other, me, parent.as_str()] {
            assert!(
                !found.contains(needle),
                "{me} sees {needle} under /sys/fs/cgroup:\n{found}"
            );
        }
    }
    c.force_delete("walls-left").await;
    c.force_delete("walls-right").await;
    env.leak_check().await;
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn etc_files_are_read_only_so_writes_cannot_grow_the_data_dir() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create(pb::CreateSandboxRequest {
        hostname: "etcbox".into(),
        ..c.request("etc")
    })
    .await;
    let data_dir = env.sandboxd.data_dir();
    let before = dir_bytes(&data_dir);
    for file in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
        let (code, out) = c
            .sh(
                "etc",
                &format!("dd if=/dev/zero of={file} bs=1M count=100 conv=notrunc"),
            )
            .await;
        assert_ne!(code, 0, "writing {file} succeeded: {out}");
        assert!(out.contains("Read-only file system"), "{file}: {out}");
        let (code, out) = c.sh("etc", &format!("echo more >> {file}")).await;
        assert_ne!(code, 0, "appending to {file} succeeded: {out}");
    }
    let after = dir_bytes(&data_dir);
    assert!(
        after < before + (1 << 20),
        "the data dir grew from {before} to {after} bytes"
    );
    // The files still say what the service wrote.
    assert_eq!(c.sh_ok("etc", "cat /etc/hostname").await, "etcbox\n");
    assert!(c.sh_ok("etc", "cat /etc/hosts").await.contains("etcbox"));
    c.force_delete("etc").await;
    env.leak_check().await;
}

/// sandbox `id`'s `file` in the pids controller, read on the host (cgroup v1 or v2).
fn pids_file(env: &TestEnv, id: &str, file: &str) -> Option<String> {
    let cgroup = format!("{}/{id}", env.cgroup.path());
    [
        format!("/sys/fs/cgroup/pids{cgroup}/{file}"),
        format!("/sys/fs/cgroup{cgroup}/{file}"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .map(|s| s.trim().to_string())
}

/// The exit of `args` run through the streaming Exec in sandbox `id`.
async fn exec_exit(c: &mut Clients, id: &str, args: &[&str]) -> pb::ExecExited {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: id.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let mut exited = None;
    while let Some(m) = stream.next().await {
        if let exec_response::Response::Exited(e) = m.unwrap().response.unwrap() {
            exited = Some(e);
        }
    }
    drop(tx);
    exited.expect("an Exited message")
}

#[tokio::test(flavor = "multi_thread")]
async fn default_limits_contain_a_fork_bomb_and_report_a_memory_bomb() {
    let env = TestEnv::with_args(&[
        "--default-pids",
        "64",
        "--default-memory",
        "64Mi",
        "--default-cpu-millis",
        "500",
        "--oom-score-adj",
        "321",
    ])
    .await;
    let mut c = env.clients().await;
    let bomb = c.create_running("bomb").await;
    c.create_running("calm").await;
    // What applies is what the sandbox reports, and what its cgroup holds.
    let applied = pb::Resources {
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        pids_limit: 64,
    };
    assert_eq!(bomb.resources, Some(applied));
    let (memory, pids, quota) = env.cgroup.limits("bomb");
    assert_eq!(
        (memory.as_deref(), pids.as_deref(), quota.as_deref()),
        (Some("67108864"), Some("64"), Some("50000"))
    );
    assert_eq!(
        c.sh_ok("calm", "cat /proc/self/oom_score_adj").await,
        "321\n"
    );

    // A fork bomb, left running in the background.
    c.sh_ok(
        "bomb",
        "(while :; do sleep 1000 & done) </dev/null >/dev/null 2>&1 &",
    )
    .await;
    // It reaches the limit: forks fail (pids.events counts them) and no more run.
    let refused = || {
        pids_file(&env, "bomb", "pids.events")
            .and_then(|e| e.strip_prefix("max ").and_then(|n| n.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused() == 0 {
        assert!(
            Instant::now() < deadline,
            "the bomb never reached its limit: {:?}",
            pids_file(&env, "bomb", "pids.current")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = |env: &TestEnv| -> u64 {
        pids_file(env, "bomb", "pids.current")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!((60..=64).contains(&running(&env)), "{}", running(&env));
    // The other sandbox keeps serving execs while the bomb is at its limit.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(c.sh_ok("calm", "echo alive").await, "alive\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(running(&env) <= 64, "{}", running(&env));
    assert!(refused() > 0);
    c.force_delete("bomb").await;

    // A memory bomb past 64 MiB is killed by the OOM killer, and the exec says so.
    let exited = exec_exit(
        &mut c,
        "calm",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
    )
    .await;
    assert!(exited.oom_killed, "{exited:?}");
    assert_eq!(exited.signal, libc::SIGKILL, "{exited:?}");
    // The sandbox lives on.
    assert_eq!(c.sh_ok("calm", "echo still").await, "still\n");
    // Its cgroup has counted an OOM kill, yet a SIGKILL that StopSandbox sends is not one.
    let stopped = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "calm".into(),
            signal: libc::SIGKILL,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stopped.exit_status, Some(137));
    assert!(!stopped.oom_killed, "{stopped:?}");
    c.force_delete("calm").await;

    // A PID 1 that blows its memory limit ends the sandbox, and the sandbox says why: first
    // from the kept task's cgroup, then, once StopSandbox has removed the task, from what was
    // recorded.
    let mut hog = c.request("hog");
    hog.command = vec![
        "dd".into(),
        "if=/dev/zero".into(),
        "of=/dev/null".into(),
        "bs=256M".into(),
        "count=1".into(),
    ];
    c.create(hog).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        let s = c.get("hog").await;
        if s.state() == pb::SandboxState::Stopped {
            break s;
        }
        assert!(Instant::now() < deadline, "PID 1 still runs: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exited.exit_status, Some(137), "{exited:?}");
    assert!(exited.oom_killed, "{exited:?}");
    let stopped = c
        .try_stop(pb::StopSandboxRequest {
            sandbox_id: "hog".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(stopped.oom_killed, "{stopped:?}");
    assert!(c.get("hog").await.oom_killed);
    let listed = c.list().await;
    assert!(listed.iter().any(|s| s.sandbox_id == "hog" && s.oom_killed));
    c.force_delete("hog").await;
    env.leak_check().await;
}

/// The parent cgroup's memory limit and CPU quota as the kernel shows them (v1 or v2).
fn parent_limits(env: &TestEnv) -> (String, String) {
    let parent = env.cgroup.path();
    let read = |path: String| std::fs::read_to_string(&path).map(|s| s.trim().to_string());
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let cpu = read(format!("/sys/fs/cgroup{parent}/cpu.max")).unwrap();
        return (
            read(format!("/sys/fs/cgroup{parent}/memory.max")).unwrap(),
            cpu.split(' ').next().unwrap().to_string(),
        );
    }
    let quota = read(format!(
        "/sys/fs/cgroup/cpu,cpuacct{parent}/cpu.cfs_quota_us"
    ))
    .or_else(|_| read(format!("/sys/fs/cgroup/cpu{parent}/cpu.cfs_quota_us")))
    .unwrap();
    (
        read(format!(
            "/sys/fs/cgroup/memory{parent}/memory.limit_in_bytes"
        ))
        .unwrap(),
        quota,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn total_limits_cap_all_sandboxes_together() {
    let env = TestEnv::with_args(&["--total-memory", "128Mi", "--total-cpu-millis", "1500"]).await;
    let mut c = env.clients().await;
    assert_eq!(
        parent_limits(&env),
        ((128u64 << 20).to_string(), "150000".to_string())
    );
    // A sandbox allowed 1 GiB still cannot take more than the total.
    c.create(pb::CreateSandboxRequest {
        resources: Some(pb::Resources {
            memory_bytes: 1 << 30,
            ..Default::default()
        }),
        ..c.request("big")
    })
    .await;
    let exited = exec_exit(
        &mut c,
        "big",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
    )
    .await;
    assert_eq!(exited.signal, libc::SIGKILL, "{exited:?}");
    assert_eq!(c.sh_ok("big", "echo still").await, "still\n");
    c.force_delete("big").await;
    env.leak_check().await;
}

/// WriteFile of `data` to `path` in sandbox `id`.
async fn write_file(c: &mut Clients, id: &str, path: &str, data: &[u8]) -> Result<i64, Status> {
    use pb::write_file_request::Request;
    let msgs = [
        pb::WriteFileRequest {
            request: Some(Request::Header(pb::WriteFileHeader {
                sandbox_id: id.into(),
                path: path.into(),
                ..Default::default()
            })),
        },
        pb::WriteFileRequest {
            request: Some(Request::Data(data.to_vec())),
        },
    ];
    c.fs.write_file(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().bytes_written)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nearly_full_disk_refuses_creates_commits_restores_and_writes() {
    let env = TestEnv::new().await;
    // sandboxd's data dir on a small filesystem of its own: the guard must look there.
    env.sandboxd.shutdown().await;
    let data = env.sandboxd.data_dir();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "sandboxd-guard"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success());
    env.sandboxd
        .restart_with_args(&["--min-free-disk".into(), "30Mi".into()])
        .await;
    let mut c = env.clients().await;
    c.create_running("kept").await;
    assert_eq!(
        write_file(&mut c, "kept", "/tmp/a", b"before")
            .await
            .unwrap(),
        6
    );
    let snap = c.commit("kept").await;

    // 40 of 64 MiB taken by something else on that filesystem: 24 MiB left, less than 30.
    let filler = data.join("filler");
    std::fs::write(&filler, vec![1u8; 40 << 20]).unwrap();
    let refused = |what: &str, r: Result<(), Status>| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
        assert!(
            e.message().contains(&data.display().to_string())
                && e.message().contains("--min-free-disk (31457280 bytes)"),
            "{what}: {}",
            e.message()
        );
    };
    refused("create", c.try_create(c.request("new")).await.map(|_| ()));
    refused(
        "fork",
        c.try_create(pb::CreateSandboxRequest {
            sandbox_id: "fork".into(),
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    );
    refused("commit", c.try_commit("kept").await.map(|_| ()));
    refused(
        "restore",
        c.try_restore("kept", &snap.snapshot_id).await.map(|_| ()),
    );
    refused(
        "write",
        write_file(&mut c, "kept", "/tmp/b", b"after")
            .await
            .map(|_| ()),
    );
    // Nothing was half-made, and the sandbox that was there works as it did.
    let ids: Vec<String> = c.list().await.into_iter().map(|s| s.sandbox_id).collect();
    assert_eq!(ids, ["kept"]);
    assert_eq!(c.sh_ok("kept", "cat /tmp/a; ls /tmp").await, "beforea\n");

    // Room again: everything goes through.
    std::fs::remove_file(&filler).unwrap();
    c.create_running("new").await;
    assert_eq!(
        write_file(&mut c, "kept", "/tmp/b", b"after")
            .await
            .unwrap(),
        5
    );
    let second = c.commit("kept").await;
    c.try_restore("kept", &snap.snapshot_id).await.unwrap();
    for id in ["kept", "new"] {
        c.force_delete(id).await;
    }
    for s in [snap, second] {
        c.delete_snapshot(&s.snapshot_id).await;
    }
    env.leak_check().await;
}
