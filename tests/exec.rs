//! Exec and ExecSync against a real containerd: no byte lost, timeouts and kills that work.

mod common;

use std::time::{Duration, Instant};

use common::{Clients, TestEnv};
use futures::StreamExt;
use sandboxd::pb::{self, exec_request, exec_response};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// What one exec produced.
#[derive(Debug, Default)]
struct Outcome {
    pid: u32,
    exec_id: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exited: Option<pb::ExecExited>,
    after_exit: usize,
}

fn start(id: &str, args: &[&str]) -> pb::ExecStart {
    pb::ExecStart {
        sandbox_id: id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn msg(r: exec_request::Request) -> pb::ExecRequest {
    pb::ExecRequest { request: Some(r) }
}

/// Runs an exec, sending `inputs` after the start message, and collects everything.
async fn run(
    c: &mut Clients,
    start: pb::ExecStart,
    inputs: Vec<exec_request::Request>,
) -> Result<Outcome, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(exec_request::Request::Start(start)))
        .await
        .unwrap();
    let feeder = tokio::spawn(async move {
        for i in inputs {
            if tx.send(msg(i)).await.is_err() {
                return;
            }
        }
    });
    let mut stream = c.sb.exec(ReceiverStream::new(rx)).await?.into_inner();
    let mut out = Outcome::default();
    while let Some(m) = stream.next().await {
        match m?.response.expect("response") {
            exec_response::Response::Started(s) => {
                out.pid = s.pid;
                out.exec_id = s.exec_id;
            }
            exec_response::Response::Stdout(d) => {
                out.after_exit += usize::from(out.exited.is_some());
                out.stdout.extend(d)
            }
            exec_response::Response::Stderr(d) => {
                out.after_exit += usize::from(out.exited.is_some());
                out.stderr.extend(d)
            }
            exec_response::Response::Exited(e) => out.exited = Some(e),
        }
    }
    feeder.abort();
    Ok(out)
}

/// Clients of `env`'s sandboxd, with sandbox `id` created and running.
async fn sandbox(env: &TestEnv, id: &str) -> Clients {
    let mut c = env.clients().await;
    c.create_running(id).await;
    c
}

fn exec_dirs(env: &TestEnv) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(env.sandboxd.data_dir().join("exec"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Pids of the exec output relay helpers serving this env's sandboxd.
fn relay_helpers(env: &TestEnv) -> Vec<u32> {
    let socket = env.sandboxd.data_dir().join("exec-relay.sock");
    let wanted = format!("exec-io-relay\0{}\0", socket.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&wanted))
        })
        .collect()
}

/// No exec process remains in the task, no FIFO directory on disk, no relay helper running.
async fn assert_no_exec_leftovers(env: &TestEnv, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ps = env.containerd.ctr_ok(&env.namespace, &["task", "ps", id]);
        let procs = ps.lines().skip(1).filter(|l| !l.trim().is_empty()).count();
        let dirs = exec_dirs(env);
        let helpers = relay_helpers(env);
        if procs <= 1 && dirs.is_empty() && helpers.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "exec leftovers: processes\n{ps}\nfifo dirs {dirs:?}\nrelay helpers {helpers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The end of a test with one sandbox: no exec leftovers, then the sandbox deleted and nothing
/// leaked.
async fn finish(env: &TestEnv, c: &mut Clients, id: &str) {
    assert_no_exec_leftovers(env, id).await;
    c.force_delete(id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_streams_output_exit_codes_and_signals() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "ex").await;
    let out = run(&mut c, start("ex", &["echo", "hello"]), vec![])
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert!(out.pid > 0 && out.exec_id.starts_with("exec-"));
    assert_eq!(out.exited.unwrap().exit_code, 0);
    assert_eq!(out.after_exit, 0, "output arrived after exited");

    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done";
    let out = run(&mut c, start("ex", &["sh", "-c", script]), vec![])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "out1\nout2\nout3\nout4\nout5\n"
    );
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "err1\nerr2\nerr3\nerr4\nerr5\n"
    );

    for code in [0, 1, 255] {
        let out = run(
            &mut c,
            start("ex", &["sh", "-c", &format!("exit {code}")]),
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(out.exited.unwrap().exit_code, code);
    }
    let out = run(&mut c, start("ex", &["sh", "-c", "kill -TERM $$"]), vec![])
        .await
        .unwrap();
    let exited = out.exited.unwrap();
    assert_eq!((exited.exit_code, exited.signal), (143, 15));

    // A signal sent over the stream reaches the process.
    let out = run(
        &mut c,
        start("ex", &["sleep", "30"]),
        vec![exec_request::Request::Signal(libc::SIGINT)],
    )
    .await
    .unwrap();
    assert_eq!(out.exited.unwrap().signal, libc::SIGINT);

    // Env merges over the sandbox's, working_dir and user apply.
    let mut s = start("ex", &["sh", "-c", "echo $FOO:$PATH; pwd; id -u; id -g"]);
    s.env.insert("FOO".into(), "bar".into());
    s.working_dir = "/tmp".into();
    s.user = "65534:65534".into();
    let out = run(&mut c, s, vec![]).await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("bar:/usr/local/sbin"), "{text}");
    assert_eq!(&lines[1..], ["/tmp", "65534", "65534"]);
    let mut s = start("ex", &["id", "-un"]);
    s.user = "nobody".into();
    assert_eq!(run(&mut c, s, vec![]).await.unwrap().stdout, b"nobody\n");
    finish(&env, &mut c, "ex").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_errors_are_prompt_and_clear() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "errs").await;
    let cases: Vec<(pb::ExecStart, Code, &str)> = vec![
        (start("missing", &["true"]), Code::NotFound, "missing"),
        (
            start("errs", &["/no/such/program"]),
            Code::InvalidArgument,
            "/no/such/program",
        ),
        (start("errs", &[]), Code::InvalidArgument, "args"),
        (
            pb::ExecStart {
                working_dir: "/no/such/dir".into(),
                ..start("errs", &["true"])
            },
            Code::InvalidArgument,
            "working_dir",
        ),
        (
            pb::ExecStart {
                user: "ghost".into(),
                ..start("errs", &["true"])
            },
            Code::InvalidArgument,
            "ghost",
        ),
        (
            start("Bad!", &["true"]),
            Code::InvalidArgument,
            "sandbox_id",
        ),
    ];
    for (s, code, needle) in cases {
        let t = Instant::now();
        let err = run(&mut c, s.clone(), vec![])
            .await
            .expect_err(&format!("{s:?}"));
        assert_eq!(err.code(), code, "{s:?}: {err}");
        assert!(err.message().contains(needle), "{s:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(5), "slow error for {s:?}");
    }
    // The first message must be start.
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(exec_request::Request::Stdin(b"x".to_vec())))
        .await
        .unwrap();
    let err =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .map(|_| ())
            .expect_err("not start first");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Bad messages after start end the stream with INVALID_ARGUMENT and kill the process.
    for (what, bad) in [
        (
            "stdin without start.stdin",
            exec_request::Request::Stdin(b"x".to_vec()),
        ),
        (
            "a second start",
            exec_request::Request::Start(start("errs", &["true"])),
        ),
        ("an invalid signal", exec_request::Request::Signal(99)),
    ] {
        let err = run(&mut c, start("errs", &["sleep", "30"]), vec![bad])
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }
    assert_no_exec_leftovers(&env, "errs").await;

    c.force_stop("errs").await;
    let err = run(&mut c, start("errs", &["true"]), vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(exec_dirs(&env).is_empty());
    c.force_delete("errs").await;
    env.leak_check().await;
}

/// Runs `f`, failing the test (instead of hanging it) when it takes over 10 s; returns how
/// long it took.
async fn within_10s<T>(what: &str, f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"));
    (out, t.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_planted_at_etc_passwd_fails_user_lookups_fast() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "fifo").await;
    let plant = start(
        "fifo",
        &["sh", "-c", "rm /etc/passwd && mkfifo /etc/passwd"],
    );
    let out = run(&mut c, plant, vec![]).await.unwrap();
    assert_eq!(out.exited.unwrap().exit_code, 0, "{:?}", out.stderr);
    // No exec is started in this sandbox from here on: runc itself opens /etc/passwd for every
    // exec it starts, even as a numeric user, and blocks on the FIFO inside the sandbox.

    // A name needs /etc/passwd: the lookup refuses the FIFO instead of waiting for a writer.
    let mut s = start("fifo", &["id", "-u"]);
    s.user = "nobody".into();
    let (result, took) = within_10s("exec as nobody", run(&mut c, s, vec![])).await;
    let err = result.expect_err("exec as nobody with a FIFO for /etc/passwd");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    for needle in ["\"nobody\"", "/etc/passwd", "not a regular file"] {
        assert!(err.message().contains(needle), "{needle}: {err}");
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // The sandbox's files are a snapshot's: a create from it looks the name up in the same
    // FIFO, through the snapshot mounted on the host, and refuses it as fast.
    let snapshot = c.commit("fifo").await;
    let create = c.try_create(pb::CreateSandboxRequest {
        sandbox_id: "fifo-fork".into(),
        snapshot_id: snapshot.snapshot_id.clone(),
        user: "nobody".into(),
        ..Default::default()
    });
    let (result, took) = within_10s("create as nobody", create).await;
    let err = result.expect_err("create as nobody from a snapshot with a FIFO for /etc/passwd");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("/etc/passwd"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    c.force_delete("fifo").await;
    c.delete_snapshot(&snapshot.snapshot_id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_round_trips_256_mib_through_cat_on_both_streams() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "cat").await;
    const TOTAL: usize = 256 << 20;
    const CHUNK: usize = 256 << 10;
    for (label, script) in [("stdout", "cat"), ("stderr", "cat >&2")] {
        let mut data = vec![0u8; CHUNK];
        let mut hasher = Sha256::new();
        let mut inputs = Vec::with_capacity(TOTAL / CHUNK + 1);
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..TOTAL / CHUNK {
            for b in data.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            hasher.update(&data);
            inputs.push(exec_request::Request::Stdin(data.clone()));
        }
        inputs.push(exec_request::Request::CloseStdin(pb::CloseStdin {}));
        let want = hex::encode(hasher.finalize());
        let s = pb::ExecStart {
            stdin: true,
            ..start("cat", &["sh", "-c", script])
        };
        let out = run(&mut c, s, inputs).await.unwrap();
        let got = if label == "stdout" {
            &out.stdout
        } else {
            &out.stderr
        };
        assert_eq!(got.len(), TOTAL, "{label}");
        assert_eq!(hex::encode(Sha256::digest(got)), want, "{label}");
        assert_eq!(out.exited.unwrap().exit_code, 0);
    }
    finish(&env, &mut c, "cat").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sequential_and_concurrent_execs_are_all_exact() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "many").await;
    for n in 0..1000 {
        let out = run(&mut c, start("many", &["echo", &n.to_string()]), vec![])
            .await
            .unwrap();
        assert_eq!(out.stdout, format!("{n}\n").as_bytes());
        assert_eq!(out.exited.unwrap().exit_code, 0);
    }
    let mut tasks = Vec::new();
    for n in 0..100 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let out = run(
                &mut c,
                start("many", &["sh", "-c", &format!("echo {n}; echo e{n} >&2")]),
                vec![],
            )
            .await
            .unwrap();
            assert_eq!(out.stdout, format!("{n}\n").as_bytes());
            assert_eq!(out.stderr, format!("e{n}\n").as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 10 execs on each of 10 sandboxes at once.
    for i in 0..10 {
        c.create_running(&format!("m{i}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..10 {
        for n in 0..10 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let out = run(
                    &mut c,
                    start(&format!("m{i}"), &["echo", &format!("{i}-{n}")]),
                    vec![],
                )
                .await
                .unwrap();
                assert_eq!(out.stdout, format!("{i}-{n}\n").as_bytes());
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_no_exec_leftovers(&env, "many").await;
    for id in std::iter::once("many".to_string()).chain((0..10).map(|i| format!("m{i}"))) {
        c.force_delete(&id).await;
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_and_cancellation_kill_the_process() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "kill").await;
    let t = Instant::now();
    let s = pb::ExecStart {
        timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..start("kill", &["sleep", "60"])
    };
    let out = run(&mut c, s, vec![]).await.unwrap();
    let exited = out.exited.unwrap();
    assert!(exited.timed_out);
    assert_eq!(exited.signal, libc::SIGKILL);
    assert!(t.elapsed() < Duration::from_secs(10));

    // A client that goes away mid-stream gets its process killed.
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(exec_request::Request::Start(start(
        "kill",
        &["sh", "-c", "echo ready; sleep 300"],
    ))))
    .await
    .unwrap();
    let mut stream =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let mut pid = 0;
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            exec_response::Response::Started(s) => pid = s.pid,
            exec_response::Response::Stdout(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(stream);
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the exec outlived its client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An expired gRPC deadline also kills the command.
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(exec_request::Request::Start(start(
        "kill",
        &["sh", "-c", "sleep 300"],
    ))))
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.set_timeout(Duration::from_secs(1));
    let mut stream = c.sb.exec(req).await.unwrap().into_inner();
    let mut pid = 0;
    let mut err = None;
    while let Some(m) = stream.next().await {
        match m {
            Ok(m) => {
                if let Some(exec_response::Response::Started(s)) = m.response {
                    pid = s.pid;
                }
            }
            Err(e) => err = Some(e),
        }
    }
    drop(tx);
    assert_eq!(err.expect("deadline error").code(), Code::DeadlineExceeded);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the exec outlived its deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    finish(&env, &mut c, "kill").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_merges_output_and_follows_resize() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "tty").await;
    let s = pb::ExecStart {
        tty: true,
        stdin: true,
        tty_size: Some(pb::TtySize {
            rows: 30,
            cols: 100,
        }),
        ..start(
            "tty",
            &["sh", "-c", "stty size; echo err >&2; read x; stty size"],
        )
    };
    let inputs = vec![
        exec_request::Request::Resize(pb::TtySize {
            rows: 50,
            cols: 132,
        }),
        exec_request::Request::Stdin(b"go\n".to_vec()),
    ];
    // Give the first stty a moment before the resize arrives.
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(exec_request::Request::Start(s))).await.unwrap();
    let mut stream =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let mut text = String::new();
    let mut exited = None;
    let mut sent = false;
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            exec_response::Response::Stdout(d) => {
                text.push_str(&String::from_utf8_lossy(&d));
                if !sent && text.contains("err") {
                    sent = true;
                    for i in inputs.clone() {
                        tx.send(msg(i)).await.unwrap();
                    }
                }
            }
            exec_response::Response::Stderr(_) => panic!("a tty merges stderr into stdout"),
            exec_response::Response::Exited(e) => exited = Some(e),
            exec_response::Response::Started(_) => {}
        }
    }
    assert!(text.contains("30 100"), "{text:?}");
    assert!(text.contains("50 132"), "{text:?}");
    assert_eq!(exited.unwrap().exit_code, 0);
    finish(&env, &mut c, "tty").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_captures_truncates_and_times_out() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "sync").await;
    let req = |args: &[&str]| pb::ExecSyncRequest {
        sandbox_id: "sync".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let r =
        c.sb.exec_sync(req(&["sh", "-c", "echo out; echo err >&2; exit 7"]))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    assert!(!r.stdout_truncated && !r.timed_out);

    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            stdin: b"piped input".to_vec(),
            ..req(&["cat"])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"piped input");

    // 8 MiB of output with a 1 KiB cap: the rest is drained, the process is not blocked.
    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            max_output_bytes: 1024,
            ..req(&["sh", "-c", "head -c 8388608 /dev/zero; echo done >&2"])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout.len(), 1024);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.stderr, b"done\n");
    assert_eq!(r.exit_code, 0);
    // The default cap is 1 MiB.
    let r =
        c.sb.exec_sync(req(&["head", "-c", "3000000", "/dev/zero"]))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.stdout.len(), 1 << 20);
    assert!(r.stdout_truncated);

    let t = Instant::now();
    let r =
        c.sb.exec_sync(pb::ExecSyncRequest {
            timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..req(&["sleep", "60"])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.timed_out);
    assert!(t.elapsed() < Duration::from_secs(10));
    let err =
        c.sb.exec_sync(pb::ExecSyncRequest {
            max_output_bytes: -1,
            ..req(&["true"])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    finish(&env, &mut c, "sync").await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_reader_of_1_gib_keeps_server_memory_bounded() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "slow").await;
    let server = env.sandboxd.pid();
    let before = rss_kib(server);
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(exec_request::Request::Start(start(
        "slow",
        &["head", "-c", "1073741824", "/dev/zero"],
    ))))
    .await
    .unwrap();
    let mut stream =
        c.sb.exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let mut total = 0usize;
    let mut peak = before;
    let mut n = 0u64;
    let mut exited = None;
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            exec_response::Response::Stdout(d) => total += d.len(),
            exec_response::Response::Exited(e) => exited = Some(e),
            _ => {}
        }
        n += 1;
        // Read slowly for a while: the process must wait for us, not pile up in our memory.
        if n < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if n % 64 == 0 {
            peak = peak.max(rss_kib(server));
        }
    }
    drop(tx);
    assert_eq!(total, 1 << 30);
    assert_eq!(exited.unwrap().exit_code, 0);
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 64,
        "server RSS grew by {growth_mib} MiB while streaming 1 GiB"
    );
    c.force_delete("slow").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn children_holding_the_pipes_do_not_hold_the_exit_forever() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "bg").await;
    let t = Instant::now();
    let out = run(
        &mut c,
        start("bg", &["sh", "-c", "sleep 30 & echo started"]),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.exited.unwrap().exit_code, 0);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "exit held for {:?}",
        t.elapsed()
    );
    c.force_delete("bg").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn output_comes_straight_from_the_process_pipes_through_the_relay() {
    let env = TestEnv::new().await;
    let mut c = sandbox(&env, "rl").await;
    // While an exec without stdin runs, its output goes through a relay helper, not FIFOs.
    let (probe_tx, probe_rx) = tokio::sync::oneshot::channel();
    let runner = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let out = run(
                &mut c,
                start("rl", &["sh", "-c", "echo up; sleep 2; echo done"]),
                vec![],
            )
            .await;
            let _ = probe_tx.send(());
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        relay_helpers(&env).len(),
        1,
        "one relay helper while the exec runs"
    );
    assert!(exec_dirs(&env).is_empty(), "no FIFOs for a relayed exec");
    let out = runner.await.unwrap().unwrap();
    probe_rx.await.unwrap();
    assert_eq!(out.stdout, b"up\ndone\n");
    assert_eq!(out.exited.unwrap().exit_code, 0);
    assert_eq!(out.after_exit, 0);

    // stdin still works: that exec uses FIFOs beside relayed ones.
    let mut with_stdin = start("rl", &["cat"]);
    with_stdin.stdin = true;
    let input = vec![
        exec_request::Request::Stdin(b"typed".to_vec()),
        exec_request::Request::CloseStdin(pb::CloseStdin {}),
    ];
    let out = run(&mut c, with_stdin, input).await.unwrap();
    assert_eq!(out.stdout, b"typed");
    finish(&env, &mut c, "rl").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_binary_the_shim_cannot_run_falls_back_to_fifos() {
    let env = TestEnv::with_args(&["--exec-io-relay", "/nonexistent/sandboxd"]).await;
    let mut c = sandbox(&env, "fb").await;
    for i in 0..3 {
        let out = run(&mut c, start("fb", &["echo", &i.to_string()]), vec![])
            .await
            .unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.exited.unwrap().exit_code, 0);
    }
    let sync = c.exec_sh("fb", "echo o; echo e >&2; exit 3").await;
    assert_eq!(
        (sync.stdout.as_slice(), sync.stderr.as_slice()),
        (&b"o\n"[..], &b"e\n"[..])
    );
    assert_eq!(sync.exit_code, 3);
    finish(&env, &mut c, "fb").await;
}
