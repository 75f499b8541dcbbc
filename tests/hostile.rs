//! Slow and hostile clients against a real containerd: hundreds of idle file streams hold no
//! thread and keep no other caller waiting, a delete ends the streams of its sandbox, silent
//! streams time out and let go of what they hold, a tenant's streams are counted, and ExecSync
//! output is held to one memory budget.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{Clients, TestEnv};
use futures::StreamExt;
use sandboxd::pb::{self, exec_request, exec_response, write_file_request};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Idle writers of the first test.
const IDLE_WRITERS: usize = 300;
/// Writers opened at a time while the idle ones are set up.
const OPEN_BATCH: usize = 25;
/// What the issue allows a call made next to the idle writers.
const PROMPT: Duration = Duration::from_secs(1);
/// How long any awaited event may take before a test fails.
const EVENT_WAIT: Duration = Duration::from_secs(30);

fn header_msg(id: &str, path: &str) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        request: Some(write_file_request::Request::Header(pb::WriteFileHeader {
            sandbox_id: id.into(),
            path: path.into(),
            ..Default::default()
        })),
    }
}

fn data_msg(data: &[u8]) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        request: Some(write_file_request::Request::Data(data.to_vec())),
    }
}

/// A WriteFile whose stream stays open: its first messages sent, then nothing until `tx` is
/// dropped (which finishes the write) or the task is aborted (which cancels it).
struct OpenWrite {
    tx: mpsc::Sender<pb::WriteFileRequest>,
    call: JoinHandle<Result<i64, Status>>,
}

async fn open_write(c: &Clients, id: &str, path: &str, data: Option<&[u8]>) -> OpenWrite {
    let (tx, rx) = mpsc::channel(4);
    tx.send(header_msg(id, path)).await.unwrap();
    if let Some(data) = data {
        tx.send(data_msg(data)).await.unwrap();
    }
    let mut fs = c.fs.clone();
    let call = tokio::spawn(async move {
        fs.write_file(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().bytes_written)
    });
    OpenWrite { tx, call }
}

/// A whole WriteFile of `data`, sent in messages of 1 MiB.
async fn write(c: &mut Clients, id: &str, path: &str, data: &[u8]) -> Result<i64, Status> {
    let msgs: Vec<_> = std::iter::once(header_msg(id, path))
        .chain(data.chunks(1 << 20).map(data_msg))
        .collect();
    c.fs.write_file(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().bytes_written)
}

async fn list(c: &mut Clients, id: &str, path: &str) -> Vec<String> {
    c.fs.list_files(pb::ListFilesRequest {
        sandbox_id: id.into(),
        path: path.into(),
        depth: 1,
    })
    .await
    .unwrap_or_else(|e| panic!("list {path} in {id}: {e}"))
    .into_inner()
    .entries
    .into_iter()
    .map(|e| e.path)
    .collect()
}

/// Waits until `done` holds, polling; panics naming `what` after [`EVENT_WAIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENT_WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(common::host::POLL_INTERVAL).await;
    }
}

/// Runs `call`, returning its output and how long it took; fails after [`EVENT_WAIT`].
async fn timed<T>(what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(EVENT_WAIT, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within {EVENT_WAIT:?}"));
    (out, started.elapsed())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn mounts(env: &TestEnv) -> usize {
    common::host::mounts_under(&env.sandboxd.data_dir().join("mnt")).len()
}

/// Lets this process (and the sandboxd it starts) open as many files as the hard limit allows:
/// every idle writer holds a few descriptors in sandboxd.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 8 * IDLE_WRITERS as u64,
        "RLIMIT_NOFILE's hard limit {} is too low for {IDLE_WRITERS} idle writers",
        limit.rlim_max
    );
}

async fn exec_echo(c: &mut Clients, id: &str, word: &str) -> Vec<u8> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: id.into(),
            args: vec!["echo".into(), word.into()],
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
    let mut out = Vec::new();
    let mut exit = None;
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            exec_response::Response::Stdout(d) => out.extend(d),
            exec_response::Response::Exited(e) => exit = Some(e.exit_code),
            _ => {}
        }
    }
    assert_eq!(exit, Some(0));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_idle_writers_hold_no_thread_and_keep_nobody_waiting() {
    raise_fd_limit();
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let running = ["idle-run-a", "idle-run-b"];
    let stopped = ["idle-stop-a", "idle-stop-b"];
    for id in running.iter().chain(&stopped) {
        c.create_running(id).await;
    }
    for id in stopped {
        c.force_stop(id).await;
    }
    let sandboxd = env.sandboxd.pid();
    let baseline_threads = threads(sandboxd);

    // 300 writers, spread over the four sandboxes, each with its header sent and then silent.
    let sandboxes: Vec<&str> = running.iter().chain(&stopped).copied().collect();
    let mut writers: Vec<(&str, OpenWrite)> = Vec::new();
    for batch in (0..IDLE_WRITERS).collect::<Vec<_>>().chunks(OPEN_BATCH) {
        for &i in batch {
            let id = sandboxes[i % sandboxes.len()];
            writers.push((id, open_write(&c, id, &format!("/idle-{i}"), None).await));
        }
        // Each open writer holds its anonymous temporary file.
        let opened = writers.len();
        wait_until(&format!("{opened} writers are open"), || {
            common::host::anonymous_files(sandboxd).len() >= opened
        })
        .await;
    }
    assert!(writers.iter().all(|(_, w)| !w.call.is_finished()));
    assert_eq!(
        mounts(&env),
        stopped.len(),
        "one shared mount per stopped sandbox"
    );
    // No thread waits on a client: what the setup used returns to the pool and goes idle.
    wait_until(
        "sandboxd's threads are no more than a waiting writer's few",
        || threads(sandboxd) < baseline_threads + 64,
    )
    .await;

    // Meanwhile other callers are served at once: create, exec and delete of another sandbox.
    let mut other = Clients::new(env.channel().await, env.image_ref());
    let (created, took_create) = timed("create", other.try_create(other.request("other"))).await;
    created.unwrap();
    let (out, took_exec) = timed("exec", exec_echo(&mut other, "other", "prompt")).await;
    assert_eq!(out, b"prompt\n");
    let (deleted, took_delete) = timed("delete", other.try_delete("other", true)).await;
    deleted.unwrap();
    eprintln!(
        "next to {IDLE_WRITERS} idle writers ({} sandboxd threads): create {took_create:?}, \
         exec {took_exec:?}, delete {took_delete:?}",
        threads(sandboxd)
    );
    for (what, took) in [
        ("CreateSandbox", took_create),
        ("Exec", took_exec),
        ("DeleteSandbox", took_delete),
    ] {
        assert!(
            took < PROMPT,
            "{what} took {took:?} next to {IDLE_WRITERS} idle writers"
        );
    }

    // Deleting a stopped sandbox with idle writers ends them and finishes; so does a forced
    // delete of a running one.
    for (id, force) in [(stopped[0], false), (running[0], true)] {
        let (deleted, took) = timed("delete", c.try_delete(id, force)).await;
        deleted.unwrap_or_else(|e| panic!("delete {id}: {e}"));
        assert!(
            took < Duration::from_secs(10),
            "deleting {id} took {took:?}"
        );
        let (ended, kept): (Vec<_>, Vec<_>) = writers.into_iter().partition(|(w, _)| *w == id);
        writers = kept;
        for (_, w) in ended {
            let (result, _) = timed("an ended writer", w.call).await;
            let e = result.unwrap().expect_err("a writer of a deleted sandbox");
            assert_eq!(e.code(), Code::Aborted, "{e:?}");
            assert!(e.message().contains(id), "{e:?}");
        }
    }
    assert_eq!(mounts(&env), 1);

    // Writers abandoned by their clients leave nothing behind.
    for (_, w) in &writers {
        w.call.abort();
    }
    wait_until("the abandoned writers' temporary files are closed", || {
        common::host::anonymous_files(sandboxd).is_empty()
    })
    .await;
    wait_until("the stopped sandbox is unmounted", || mounts(&env) == 0).await;
    for id in [running[1], stopped[1]] {
        let left: Vec<_> = list(&mut c, id, "/")
            .await
            .into_iter()
            .filter(|p| p.starts_with("/idle-") || p.contains(sandboxd::files::TEMP_PREFIX))
            .collect();
        assert!(left.is_empty(), "{id}: {left:?}");
        c.force_delete(id).await;
    }
    drop(writers);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_streams_time_out_and_let_go_of_their_sandbox() {
    let idle = Duration::from_secs(2);
    let env = TestEnv::with_args(&["--stream-idle-timeout", "2s"]).await;
    let mut c = env.clients().await;
    c.create_running("quiet-run").await;
    c.create_running("quiet-stop").await;
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    write(&mut c, "quiet-stop", "/big", &big).await.unwrap();
    c.force_stop("quiet-stop").await;

    // A writer that goes quiet after its first data ends with DEADLINE_EXCEEDED, and nothing
    // of it remains.
    let started = Instant::now();
    let writers = [
        open_write(&c, "quiet-run", "/tmp/quiet", Some(b"partial")).await,
        open_write(&c, "quiet-stop", "/quiet", Some(b"partial")).await,
    ];
    for w in writers {
        let (result, _) = timed("an idle writer", w.call).await;
        let e = result.unwrap().expect_err("an idle writer");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("--stream-idle-timeout"), "{e:?}");
        drop(w.tx);
    }
    assert!(started.elapsed() >= idle);
    wait_until("the stopped sandbox is unmounted", || mounts(&env) == 0).await;
    for (id, dir) in [("quiet-run", "/tmp"), ("quiet-stop", "/")] {
        let left: Vec<_> = list(&mut c, id, dir)
            .await
            .into_iter()
            .filter(|p| p.ends_with("/quiet") || p.contains(sandboxd::files::TEMP_PREFIX))
            .collect();
        assert!(left.is_empty(), "{id}: {left:?}");
    }

    // A reader that stops reading lets go of the stopped sandbox's mount, and its client,
    // reading again, gets what was sent and then the status.
    let mut stream =
        c.fs.read_file(pb::ReadFileRequest {
            sandbox_id: "quiet-stop".into(),
            path: "/big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = stream.next().await.unwrap().unwrap().data.len();
    assert_eq!(mounts(&env), 1);
    wait_until("the stalled reader is unmounted", || mounts(&env) == 0).await;
    let mut end = None;
    while let Some(m) = stream.next().await {
        match m {
            Ok(m) => got += m.data.len(),
            Err(e) => end = Some(e),
        }
    }
    let e = end.expect("a stalled read ends with a status");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(got < big.len(), "all {got} bytes arrived");

    // An exec whose client takes none of its output is killed ...
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: "quiet-run".into(),
            args: vec!["yes".into(), "never read".into()],
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
    let pid = match stream.next().await.unwrap().unwrap().response.unwrap() {
        exec_response::Response::Started(s) => s.pid,
        other => panic!("expected started, got {other:?}"),
    };
    wait_until("the unread exec is killed", || {
        !common::host::is_alive(pid as i32)
    })
    .await;
    let mut end = None;
    while let Some(m) = stream.next().await {
        if let Err(e) = m {
            end = Some(e);
        }
    }
    assert_eq!(end.expect("a status").code(), Code::DeadlineExceeded);
    drop(tx);
    // ... but a quiet process with a quiet client is not idle: it runs to its end.
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: "quiet-run".into(),
            args: vec!["sh".into(), "-c".into(), "sleep 4; echo woke".into()],
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
    let (mut out, mut exit) = (Vec::new(), None);
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            exec_response::Response::Stdout(d) => out.extend(d),
            exec_response::Response::Exited(e) => exit = Some(e.exit_code),
            _ => {}
        }
    }
    assert_eq!((out.as_slice(), exit), (&b"woke\n"[..], Some(0)));
    drop(tx);

    for id in ["quiet-run", "quiet-stop"] {
        c.force_delete(id).await;
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_past_its_stream_limit_is_refused_until_one_ends() {
    let env = TestEnv::with_args(&["--max-streams-per-tenant", "3"]).await;
    let mut c = env.clients().await;
    c.create_running("limited").await;
    let sandboxd = env.sandboxd.pid();
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(open_write(&c, "limited", &format!("/tmp/open-{i}"), None).await);
    }
    wait_until("three writers are open", || {
        common::host::anonymous_files(sandboxd).len() == 3
    })
    .await;

    // A fourth stream of any kind is refused; unary calls are not counted.
    let e = write(&mut c, "limited", "/tmp/fourth", b"x")
        .await
        .expect_err("a fourth stream");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams-per-tenant"), "{e:?}");
    let e =
        c.fs.read_file(pb::ReadFileRequest {
            sandbox_id: "limited".into(),
            path: "/etc/hostname".into(),
            ..Default::default()
        })
        .await
        .expect_err("a fourth stream");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(c.sh_ok("limited", "echo unary").await, "unary\n");
    assert_eq!(c.get("limited").await.sandbox_id, "limited");

    // Closing one frees a slot.
    open.pop().unwrap().call.abort();
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        match write(&mut c, "limited", "/tmp/fourth", b"fits").await {
            Ok(n) => {
                assert_eq!(n, 4);
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(common::host::POLL_INTERVAL).await;
            }
            Err(e) => panic!("a write after a stream ended: {e:?}"),
        }
    }
    assert_eq!(c.sh_ok("limited", "cat /tmp/fourth").await, "fits");
    for w in &open {
        w.call.abort();
    }
    c.force_delete("limited").await;
    env.leak_check().await;
}

/// ExecSync of `sh -c script` keeping up to `max` bytes of each stream.
async fn exec_sync(
    c: &mut Clients,
    id: &str,
    script: &str,
    max: i64,
) -> Result<pb::ExecSyncResponse, Status> {
    c.sb.exec_sync(pb::ExecSyncRequest {
        sandbox_id: id.into(),
        args: vec!["sh".into(), "-c".into(), script.into()],
        max_output_bytes: max,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_output_past_the_memory_budget_is_refused_alone() {
    // 1 MiB and a little, so that output read in whole pages never fills it to the last KiB.
    let env = TestEnv::with_args(&["--exec-sync-memory", "1049000"]).await;
    let mut c = env.clients().await;
    c.create_running("budget").await;

    // A small call that holds its share until told to finish.
    let mut small_client = c.clone();
    let small = tokio::spawn(async move {
        exec_sync(
            &mut small_client,
            "budget",
            "echo small; touch /tmp/small-ready; \
             while [ ! -e /tmp/small-go ]; do usleep 10000; done; echo done",
            0,
        )
        .await
    });
    let deadline = Instant::now() + EVENT_WAIT;
    while c.sh("budget", "test -e /tmp/small-ready").await.0 != 0 {
        assert!(Instant::now() < deadline, "the small call never started");
        tokio::time::sleep(common::host::POLL_INTERVAL).await;
    }

    // A call whose output goes past the budget is refused and its process killed.
    let e = exec_sync(
        &mut c,
        "budget",
        "head -c 4194304 /dev/zero; echo hostile-budget-marker",
        4 << 20,
    )
    .await
    .expect_err("output past the budget");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--exec-sync-memory"), "{e:?}");
    assert!(
        common::host::pids_mentioning("hostile-budget-marker").is_empty(),
        "the refused call's process is still running"
    );

    // The small call, running all along, is unaffected.
    c.sh_ok("budget", "touch /tmp/small-go").await;
    let r = small.await.unwrap().expect("the small concurrent call");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"small\ndone\n"[..])
    );

    // Its memory is back: output just under the budget fits.
    let r = exec_sync(&mut c, "budget", "head -c 900000 /dev/zero", 4 << 20)
        .await
        .expect("a call within the budget");
    assert_eq!((r.exit_code, r.stdout.len()), (0, 900_000));
    c.force_delete("budget").await;
    env.leak_check().await;
}
