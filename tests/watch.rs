//! WatchSandboxes and WatchFiles against a real containerd: sandbox events arrive in order
//! (an OOM-killed PID 1 among them) and filtered by selector; a watcher resumes after a
//! dropped stream with no gap and no duplicate, and a revision the history no longer holds is
//! OUT_OF_RANGE; file changes inside a running sandbox stream as they happen, a client that
//! does not read gets OVERFLOW, escapes are refused, and the streams end with their sandbox.
//! The CLI prints both.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Clients, TestEnv};
use sandboxd::pb;
use sandboxd::pb::{FileEventType as F, SandboxEventType as T};
use tonic::{Code, Streaming};

/// How long any one awaited event may take before the test fails.
const EVENT_WAIT: Duration = Duration::from_secs(60);

async fn watch(
    c: &mut Clients,
    selector: &str,
    resume_after: i64,
) -> (Streaming<pb::SandboxEvent>, i64) {
    let r =
        c.sb.watch_sandboxes(pb::WatchSandboxesRequest {
            label_selector: selector.into(),
            resume_after,
        })
        .await
        .unwrap_or_else(|e| panic!("watch after {resume_after}: {e:?}"));
    let latest = r
        .metadata()
        .get("sandboxd-revision")
        .expect("the revision header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (r.into_inner(), latest)
}

async fn try_watch(c: &mut Clients, resume_after: i64) -> Result<(), tonic::Status> {
    c.sb.watch_sandboxes(pb::WatchSandboxesRequest {
        label_selector: String::new(),
        resume_after,
    })
    .await
    .map(|_| ())
}

async fn next<M>(s: &mut Streaming<M>) -> M {
    tokio::time::timeout(EVENT_WAIT, s.message())
        .await
        .expect("an event within the wait")
        .expect("the stream is healthy")
        .expect("the stream goes on")
}

/// The next `n` events as (type, sandbox id), checking that revisions go up one by one from
/// `after`; returns them and the last revision.
async fn events(
    s: &mut Streaming<pb::SandboxEvent>,
    n: usize,
    after: i64,
) -> (Vec<(T, String)>, Vec<pb::SandboxEvent>) {
    let mut got = Vec::new();
    let mut raw = Vec::new();
    let mut last = after;
    for _ in 0..n {
        let e = next(s).await;
        assert_eq!(e.revision, last + 1, "revisions follow each other: {e:?}");
        last = e.revision;
        got.push((e.r#type(), e.sandbox.clone().unwrap().sandbox_id));
        raw.push(e);
    }
    (got, raw)
}

fn pairs(list: &[(T, &str)]) -> Vec<(T, String)> {
    list.iter().map(|(t, id)| (*t, id.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_in_order_for_create_exec_oom_stop_delete_and_by_selector() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let (mut all, start) = watch(&mut c, "", 0).await;
    let (mut mine, _) = watch(&mut c, "watch=me", 0).await;

    let mut a = c.request("ev-a");
    a.labels.insert("watch".into(), "me".into());
    c.create(a).await;
    assert_eq!(c.sh_ok("ev-a", "echo hi").await, "hi\n");
    let mut oom = c.request("ev-oom");
    oom.resources = Some(pb::Resources {
        memory_bytes: 64 << 20,
        ..Default::default()
    });
    oom.command = ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]
        .map(String::from)
        .to_vec();
    c.create(oom).await;
    let (got, raw) = events(&mut all, 5, start).await;
    assert_eq!(
        got,
        pairs(&[
            (T::Created, "ev-a"),
            (T::Started, "ev-a"),
            (T::Created, "ev-oom"),
            (T::Started, "ev-oom"),
            (T::Exited, "ev-oom"),
        ])
    );
    let exited = raw[4].sandbox.clone().unwrap();
    assert!(exited.oom_killed, "{exited:?}");
    assert_eq!(exited.exit_status, Some(137));
    assert_eq!(exited.state(), pb::SandboxState::Stopped);

    c.force_stop("ev-a").await;
    c.force_delete("ev-a").await;
    c.force_delete("ev-oom").await;
    let (got, raw) = events(&mut all, 3, start + 5).await;
    assert_eq!(
        got,
        pairs(&[
            (T::Stopped, "ev-a"),
            (T::Deleted, "ev-a"),
            (T::Deleted, "ev-oom"),
        ])
    );
    assert!(raw.iter().all(|e| e.time.is_some()));

    // The selector's watcher saw ev-a only, with the same revisions.
    let seen: Vec<(T, String, i64)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let e = next(&mut mine).await;
            v.push((
                e.r#type(),
                e.sandbox.unwrap().sandbox_id,
                e.revision - start,
            ));
        }
        v
    };
    assert_eq!(
        seen,
        vec![
            (T::Created, "ev-a".to_string(), 1),
            (T::Started, "ev-a".to_string(), 2),
            (T::Stopped, "ev-a".to_string(), 6),
            (T::Deleted, "ev-a".to_string(), 7),
        ]
    );

    // The CLI replays the same events, one JSON object a line.
    let mut cli = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--server", &env.endpoint(), "events", "-o", "json"])
        .args(["--resume-after", &start.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(cli.stdout.take().unwrap()).lines();
    let mut types = Vec::new();
    for _ in 0..8 {
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        types.push(format!(
            "{} {}",
            v["type"].as_str().unwrap(),
            v["sandbox"]["sandbox_id"].as_str().unwrap()
        ));
        if v["type"] == "EXITED" {
            assert_eq!(v["sandbox"]["oom_killed"], true, "{v}");
        }
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    assert_eq!(
        types,
        [
            "CREATED ev-a",
            "STARTED ev-a",
            "CREATED ev-oom",
            "STARTED ev-oom",
            "EXITED ev-oom",
            "STOPPED ev-a",
            "DELETED ev-a",
            "DELETED ev-oom"
        ]
    );
    drop((all, mine));
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_resumes_without_gaps_or_duplicates_and_a_lost_revision_is_out_of_range() {
    let env = TestEnv::with_args(&["--event-history", "6", "--max-streams-per-tenant", "2"]).await;
    let mut c = env.clients().await;
    let (mut s, start) = watch(&mut c, "", 0).await;
    for id in ["rs-a", "rs-b"] {
        let mut r = c.request(id);
        r.start = Some(false);
        c.create(r).await;
    }
    let (got, _) = events(&mut s, 2, start).await;
    assert_eq!(got, pairs(&[(T::Created, "rs-a"), (T::Created, "rs-b")]));
    // The client goes away; what happens meanwhile is kept for it.
    drop(s);
    c.start("rs-a").await;
    c.force_stop("rs-a").await;
    let (mut s, latest) = watch(&mut c, "", start + 2).await;
    assert_eq!(latest, start + 4);
    let (got, _) = events(&mut s, 2, start + 2).await;
    assert_eq!(got, pairs(&[(T::Started, "rs-a"), (T::Stopped, "rs-a")]));
    // Then live ones, right after.
    c.force_delete("rs-a").await;
    let (got, _) = events(&mut s, 1, start + 4).await;
    assert_eq!(got, pairs(&[(T::Deleted, "rs-a")]));
    drop(s);

    // Three more push the history (6 events) past revision start + 2.
    c.force_delete("rs-b").await;
    c.create_running("rs-c").await;
    c.force_delete("rs-c").await;
    let too_old = try_watch(&mut c, start + 1).await.unwrap_err();
    assert_eq!(too_old.code(), Code::OutOfRange, "{too_old:?}");
    assert!(too_old.message().contains("re-list"), "{too_old:?}");
    let (mut s, _) = watch(&mut c, "", start + 3).await;
    let (got, _) = events(&mut s, 6, start + 3).await;
    assert_eq!(
        got,
        pairs(&[
            (T::Stopped, "rs-a"),
            (T::Deleted, "rs-a"),
            (T::Deleted, "rs-b"),
            (T::Created, "rs-c"),
            (T::Started, "rs-c"),
            (T::Deleted, "rs-c"),
        ])
    );
    // A revision from the future (another run) and a negative one are refused too.
    assert_eq!(
        try_watch(&mut c, start + 1000).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(
        try_watch(&mut c, -1).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let bad =
        c.sb.watch_sandboxes(pb::WatchSandboxesRequest {
            label_selector: "novalue".into(),
            resume_after: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("label_selector"), "{bad:?}");

    // Watches count against the tenant's open streams: with two open (a closed one's slot
    // may take a moment to come back), a WatchFiles is refused before it looks for anything.
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    let second = loop {
        match c
            .sb
            .watch_sandboxes(pb::WatchSandboxesRequest::default())
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e)
                if e.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline =>
            {
                tokio::task::yield_now().await
            }
            Err(e) => panic!("a second watch: {e:?}"),
        }
    };
    let refused = watch_files(&mut c, "nope", "/", false).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop((s, second));
    env.leak_check().await;
}

async fn watch_files(
    c: &mut Clients,
    id: &str,
    path: &str,
    recursive: bool,
) -> Result<Streaming<pb::WatchFilesResponse>, tonic::Status> {
    c.fs.watch_files(pb::WatchFilesRequest {
        sandbox_id: id.into(),
        path: path.into(),
        recursive,
    })
    .await
    .map(|r| r.into_inner())
}

/// Events until one of type `last` at `path`, repeats of the same event in a row folded.
async fn file_events_until(
    s: &mut Streaming<pb::WatchFilesResponse>,
    last: F,
    path: &str,
) -> Vec<(F, String, String)> {
    let mut got: Vec<(F, String, String)> = Vec::new();
    loop {
        let e = next(s).await;
        let item = (e.r#type(), e.path.clone(), e.old_path.clone());
        let done = item.0 == last && item.1 == path;
        if got.last() != Some(&item) {
            got.push(item);
        }
        if done {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn file_events_stream_create_modify_rename_delete_until_the_sandbox_stops() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("fw").await;
    c.sh_ok("fw", "mkdir -p /w/old").await;
    let mut s = watch_files(&mut c, "fw", "/w", true).await.unwrap();
    // In steps, each awaited: a directory's own watch is in place once its CREATED arrives,
    // so what happens in it afterwards is all seen.
    c.sh_ok(
        "fw",
        "echo hi > /w/a && echo more >> /w/a && mv /w/a /w/b && mkdir /w/d",
    )
    .await;
    let mut got = file_events_until(&mut s, F::Created, "/w/d").await;
    c.sh_ok("fw", "echo x > /w/d/x && echo y > /w/old/y && mv /w/d /w/e")
        .await;
    got.extend(file_events_until(&mut s, F::Renamed, "/w/e").await);
    c.sh_ok("fw", "echo z > /w/e/z && rm /w/b").await;
    got.extend(file_events_until(&mut s, F::Deleted, "/w/b").await);
    let e = |t: F, p: &str, o: &str| (t, p.to_string(), o.to_string());
    assert_eq!(
        got,
        vec![
            e(F::Created, "/w/a", ""),
            e(F::Modified, "/w/a", ""),
            e(F::Renamed, "/w/b", "/w/a"),
            e(F::Created, "/w/d", ""),
            e(F::Created, "/w/d/x", ""),
            e(F::Modified, "/w/d/x", ""),
            e(F::Created, "/w/old/y", ""),
            e(F::Modified, "/w/old/y", ""),
            e(F::Renamed, "/w/e", "/w/d"),
            e(F::Created, "/w/e/z", ""),
            e(F::Modified, "/w/e/z", ""),
            e(F::Deleted, "/w/b", ""),
        ]
    );

    // The CLI prints the same, one line an event, until the sandbox stops.
    let mut cli = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--server", &env.endpoint(), "watch-files", "fw", "/w", "-r"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(cli.stdout.take().unwrap()).lines();
    // Markers are written until the CLI, once its watch is in place, reports one.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, mut c) = (done.clone(), c.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !done.load(Ordering::SeqCst) {
                c.sh_ok("fw", &format!("echo > /w/marker{i}")).await;
                i += 1;
            }
        })
    };
    let (line, lines) = tokio::task::spawn_blocking(move || {
        let line = lines.next().unwrap().unwrap();
        (line, lines)
    })
    .await
    .unwrap();
    done.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(
        line.starts_with("CREATED") && line.contains("/w/marker"),
        "{line}"
    );

    // Stopping the sandbox ends both streams with OK.
    c.force_stop("fw").await;
    loop {
        match tokio::time::timeout(EVENT_WAIT, s.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(status) => panic!("the watch ended with {status:?}"),
        }
    }
    let status = cli.wait().unwrap();
    assert!(status.success(), "{status:?}");
    drop(lines);
    // A stopped sandbox cannot be watched.
    let err = watch_files(&mut c, "fw", "/w", false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    c.force_delete("fw").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_that_does_not_read_gets_overflow() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("fo").await;
    c.sh_ok("fo", "mkdir /w").await;
    // The watch has a connection of its own whose stream window, not h2's budget for unread
    // small DATA frames (half the connection window), is what stops the server: a Rust h2
    // client that buffers more unread small frames than that budget drops the connection.
    let channel = tonic::transport::Endpoint::from_shared(env.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(64 << 10))
        .initial_connection_window_size(Some(64 << 20))
        .connect()
        .await
        .unwrap();
    let mut watcher = Clients::new(channel, env.image_ref());
    let mut s = watch_files(&mut watcher, "fo", "/w", false).await.unwrap();
    // Far more events than the server queues or the connection buffers, while the client
    // reads nothing.
    c.sh_ok(
        "fo",
        "cd /w && seq 1 30000 | sed 's/^/a-file-with-a-rather-long-name-/' | xargs touch",
    )
    .await;
    let mut created = 0;
    loop {
        let e = next(&mut s).await;
        match e.r#type() {
            F::Created => created += 1,
            F::Overflow => {
                assert_eq!(e.path, "/w");
                break;
            }
            other => panic!("{other:?} {e:?}"),
        }
    }
    assert!(created < 30000, "{created}");
    // After the overflow, events flow again.
    c.sh_ok("fo", "rm /w/a-file-with-a-rather-long-name-1")
        .await;
    loop {
        let e = next(&mut s).await;
        if e.r#type() == F::Deleted && e.path == "/w/a-file-with-a-rather-long-name-1" {
            break;
        }
    }
    drop(s);
    c.force_delete("fo").await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_files_refuses_escapes_and_bad_targets_and_a_delete_ends_it() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("fe").await;
    // A host directory that no path inside the sandbox may reach.
    let host = tempfile::tempdir().unwrap();
    let host_path = host.path().to_str().unwrap().to_string();
    c.sh_ok(
        "fe",
        &format!(
            "ln -s {host_path} /abs && ln -s ../../../../../..{host_path} /rel && \
             ln -s /proc/1/root{host_path} /magic"
        ),
    )
    .await;
    for path in [
        "/abs".to_string(),
        "/rel".to_string(),
        "/magic".to_string(),
        format!("/../../../..{host_path}"),
    ] {
        let err = watch_files(&mut c, "fe", &path, true).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::NotFound | Code::PermissionDenied),
            "{path}: {err:?}"
        );
    }
    for (id, path, code) in [
        ("fe", "relative", Code::InvalidArgument),
        ("fe", "", Code::InvalidArgument),
        ("fe", "/missing", Code::NotFound),
        ("nope", "/", Code::NotFound),
        ("BAD ID", "/", Code::InvalidArgument),
    ] {
        let err = watch_files(&mut c, id, path, false).await.unwrap_err();
        assert_eq!(err.code(), code, "{id} {path}: {err:?}");
    }
    // A single file can be watched.
    c.sh_ok("fe", "echo 1 > /one").await;
    let mut one = watch_files(&mut c, "fe", "/one", false).await.unwrap();
    c.sh_ok("fe", "echo 2 >> /one").await;
    let e = next(&mut one).await;
    assert_eq!((e.r#type(), e.path.as_str()), (F::Modified, "/one"));

    // Deleting the sandbox ends its watches with ABORTED, at once.
    let mut s = watch_files(&mut c, "fe", "/", true).await.unwrap();
    c.force_delete("fe").await;
    for stream in [&mut s, &mut one] {
        let end = loop {
            match tokio::time::timeout(EVENT_WAIT, stream.message())
                .await
                .unwrap()
            {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        match end {
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
            Ok(_) => panic!("the watch of a deleted sandbox ended without ABORTED"),
        }
    }
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_ends_open_watches_with_unavailable_instead_of_waiting_for_them() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("sd").await;
    let (mut events, _) = watch(&mut c, "", 0).await;
    let mut files = watch_files(&mut c, "sd", "/", true).await.unwrap();
    let started = std::time::Instant::now();
    let status = env.sandboxd.shutdown().await.expect("sandboxd ran");
    assert!(status.success(), "{status:?}\n{}", env.sandboxd.log_tail());
    // Well inside the 30 s grace an open stream would otherwise be given.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let ended = events.message().await.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    let ended = loop {
        match files.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let ended = ended.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    env.sandboxd.restart().await;
    let mut c = env.clients().await;
    c.force_delete("sd").await;
    env.leak_check().await;
}
