//! FileService against a real containerd: large files round-trip in every sandbox state, writes
//! are atomic and visible at once, trees list and remove as documented, and no path, `..` or
//! symlink ever reaches a host file.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Clients, TestEnv};
use futures::StreamExt;
use sandboxd::pb::{self, write_file_request, FileType};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// Size of the data messages the tests send.
const SEND_CHUNK: usize = 1 << 20;
/// Size of the large round-trip files.
const LARGE: usize = 100 << 20;

fn header(id: &str, path: &str) -> pb::WriteFileHeader {
    pb::WriteFileHeader {
        sandbox_id: id.into(),
        path: path.into(),
        ..Default::default()
    }
}

fn data_msg(data: Vec<u8>) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        request: Some(write_file_request::Request::Data(data)),
    }
}

fn header_msg(h: pb::WriteFileHeader) -> pb::WriteFileRequest {
    pb::WriteFileRequest {
        request: Some(write_file_request::Request::Header(h)),
    }
}

/// WriteFile with `header` then `chunks`.
async fn write_chunks(
    c: &mut Clients,
    header: pb::WriteFileHeader,
    chunks: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> Result<i64, Status> {
    let msgs = std::iter::once(header_msg(header)).chain(chunks.map(data_msg));
    c.fs.write_file(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().bytes_written)
}

async fn write(c: &mut Clients, h: pb::WriteFileHeader, data: &[u8]) -> Result<i64, Status> {
    let chunks: Vec<Vec<u8>> = data.chunks(SEND_CHUNK).map(<[u8]>::to_vec).collect();
    write_chunks(c, h, chunks.into_iter()).await
}

async fn read_range(
    c: &mut Clients,
    id: &str,
    path: &str,
    offset: i64,
    length: i64,
) -> Result<Vec<u8>, Status> {
    let mut stream =
        c.fs.read_file(pb::ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        out.extend(m?.data);
    }
    Ok(out)
}

async fn read(c: &mut Clients, id: &str, path: &str) -> Result<Vec<u8>, Status> {
    read_range(c, id, path, 0, 0).await
}

/// Length and sha256 of a file, streamed.
async fn read_digest(c: &mut Clients, id: &str, path: &str) -> (usize, String) {
    let mut stream =
        c.fs.read_file(pb::ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("read {path} in {id}: {e}"))
        .into_inner();
    let (mut len, mut hash) = (0, Sha256::new());
    while let Some(m) = stream.next().await {
        let data = m.unwrap().data;
        assert!(
            data.len() <= sandboxd::files::READ_CHUNK,
            "chunk of {}",
            data.len()
        );
        len += data.len();
        hash.update(&data);
    }
    (len, hex::encode(hash.finalize()))
}

async fn stat(c: &mut Clients, id: &str, path: &str) -> Result<pb::FileEntry, Status> {
    c.fs.stat_file(pb::StatFileRequest {
        sandbox_id: id.into(),
        path: path.into(),
    })
    .await
    .map(|r| r.into_inner().entry.unwrap())
}

async fn list(
    c: &mut Clients,
    id: &str,
    path: &str,
    depth: i32,
) -> Result<Vec<pb::FileEntry>, Status> {
    c.fs.list_files(pb::ListFilesRequest {
        sandbox_id: id.into(),
        path: path.into(),
        depth,
    })
    .await
    .map(|r| r.into_inner().entries)
}

async fn mkdir(
    c: &mut Clients,
    id: &str,
    path: &str,
    parents: bool,
    mode: u32,
) -> Result<(), Status> {
    c.fs.make_directory(pb::MakeDirectoryRequest {
        sandbox_id: id.into(),
        path: path.into(),
        parents,
        mode,
    })
    .await
    .map(drop)
}

async fn remove(c: &mut Clients, id: &str, path: &str, recursive: bool) -> Result<(), Status> {
    c.fs.remove_path(pb::RemovePathRequest {
        sandbox_id: id.into(),
        path: path.into(),
        recursive,
    })
    .await
    .map(drop)
}

/// Deterministic pseudo-random content: chunk `i` of stream `seed`.
fn chunk(seed: u64, i: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_add(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn large_chunks(seed: u64) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    (0..(LARGE / SEND_CHUNK) as u64).map(move |i| chunk(seed, i, SEND_CHUNK))
}

fn large_digest(seed: u64) -> String {
    let mut h = Sha256::new();
    for c in large_chunks(seed) {
        h.update(&c);
    }
    hex::encode(h.finalize())
}

fn mount_dir(env: &TestEnv) -> PathBuf {
    env.sandboxd.data_dir().join("mnt")
}

fn mounts(env: &TestEnv) -> usize {
    common::host::mounts_under(&mount_dir(env)).len()
}

/// Waits until the temporary mounts under the data dir number `n`.
async fn wait_mounts(env: &TestEnv, n: usize, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounts(env) != n {
        assert!(
            Instant::now() < deadline,
            "{why}: {} temporary mounts, expected {n}: {:?}",
            mounts(env),
            common::host::mounts_under(&mount_dir(env))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, codes: &[Code], what: &str) -> Status {
    let e = r.expect_err(what);
    assert!(codes.contains(&e.code()), "{what}: {e:?}");
    e
}

/// Waits until sandboxd holds the anonymous temporary file of a write in progress in `dir` (a
/// path inside the sandbox ending in `/`): the data is arriving.
async fn wait_writing(env: &TestEnv, dir: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = common::host::anonymous_files(env.sandboxd.pid());
        if open.iter().any(|f| f.contains(&format!("{dir}#"))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no anonymous temporary file under {dir} appeared (open: {open:?}); writes need \
             O_TMPFILE on overlayfs (Linux 6.6 or later)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn temp_files(entries: &[pb::FileEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.path.clone())
        .filter(|p| p.contains(sandboxd::files::TEMP_PREFIX))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn large_files_round_trip_in_every_state() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("run").await;
    c.create_running("stopped").await;
    c.force_stop("stopped").await;
    c.create(pb::CreateSandboxRequest {
        start: Some(false),
        ..c.request("created")
    })
    .await;
    let baseline = mounts(&env);
    for (seed, id) in [(1u64, "run"), (2, "stopped"), (3, "created")] {
        let written = write_chunks(&mut c, header(id, "/big.bin"), large_chunks(seed))
            .await
            .unwrap_or_else(|e| panic!("write in {id}: {e}"));
        assert_eq!(written, LARGE as i64, "{id}");
        let (len, digest) = read_digest(&mut c, id, "/big.bin").await;
        assert_eq!((len, digest), (LARGE, large_digest(seed)), "{id}");
        assert_eq!(mounts(&env), baseline, "{id}: a temporary mount was left");
    }

    // A streaming read keeps a stopped sandbox mounted until the stream ends, no longer.
    let mut stream =
        c.fs.read_file(pb::ReadFileRequest {
            sandbox_id: "stopped".into(),
            path: "/big.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.data.len(), sandboxd::files::READ_CHUNK);
    assert_eq!(mounts(&env), baseline + 1, "mounted while streaming");
    drop(stream);
    wait_mounts(&env, baseline, "after the client dropped a read").await;

    // The files landed in the sandboxes' own filesystems.
    let sum = c.sh_ok("run", "sha256sum /big.bin").await;
    assert!(sum.starts_with(&large_digest(1)), "{sum}");
    for (seed, id) in [(2u64, "stopped"), (3, "created")] {
        c.start(id).await;
        let sum = c.sh_ok(id, "sha256sum /big.bin").await;
        assert!(sum.starts_with(&large_digest(seed)), "{id}: {sum}");
    }
    for id in ["run", "stopped", "created"] {
        c.force_delete(id).await;
    }
    assert_eq!(mounts(&env), baseline);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_writes_ranges_append_and_ownership() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("rw").await;

    // Visible inside at once.
    write(&mut c, header("rw", "/tmp/hello"), b"hi from FileService\n")
        .await
        .unwrap();
    assert_eq!(
        c.sh_ok("rw", "cat /tmp/hello").await,
        "hi from FileService\n"
    );
    // And the other way round.
    c.sh_ok("rw", "printf inside > /tmp/made-inside").await;
    assert_eq!(
        read(&mut c, "rw", "/tmp/made-inside").await.unwrap(),
        b"inside"
    );

    // Ranges.
    write(&mut c, header("rw", "/tmp/digits"), b"0123456789")
        .await
        .unwrap();
    assert_eq!(
        read_range(&mut c, "rw", "/tmp/digits", 3, 4).await.unwrap(),
        b"3456"
    );
    assert_eq!(
        read_range(&mut c, "rw", "/tmp/digits", 8, 0).await.unwrap(),
        b"89"
    );
    assert_eq!(
        read_range(&mut c, "rw", "/tmp/digits", 8, 100)
            .await
            .unwrap(),
        b"89"
    );
    assert!(read_range(&mut c, "rw", "/tmp/digits", 100, 0)
        .await
        .unwrap()
        .is_empty());
    write(&mut c, header("rw", "/tmp/empty"), b"")
        .await
        .unwrap();
    assert!(read(&mut c, "rw", "/tmp/empty").await.unwrap().is_empty());
    // A range across chunk boundaries of a larger file.
    let big = chunk(7, 0, 300_000);
    write(&mut c, header("rw", "/tmp/big"), &big).await.unwrap();
    assert_eq!(
        read_range(&mut c, "rw", "/tmp/big", 65_000, 200_000)
            .await
            .unwrap(),
        &big[65_000..265_000]
    );

    // Append keeps the content and adds; on a missing file it creates it.
    let append = |p: &str| pb::WriteFileHeader {
        append: true,
        ..header("rw", p)
    };
    assert_eq!(
        write(&mut c, append("/tmp/digits"), b"abc").await.unwrap(),
        3
    );
    assert_eq!(
        read(&mut c, "rw", "/tmp/digits").await.unwrap(),
        b"0123456789abc"
    );
    assert_eq!(c.sh_ok("rw", "cat /tmp/digits").await, "0123456789abc");
    write(&mut c, append("/tmp/new-by-append"), b"x")
        .await
        .unwrap();
    assert_eq!(
        read(&mut c, "rw", "/tmp/new-by-append").await.unwrap(),
        b"x"
    );
    // Without append the content is replaced.
    write(&mut c, header("rw", "/tmp/digits"), b"xyz")
        .await
        .unwrap();
    assert_eq!(c.sh_ok("rw", "cat /tmp/digits").await, "xyz");

    // Mode and owner of a new file; an existing file keeps both.
    let stat_inside = |p: &str| format!("stat -c '%a %u %g' {p}");
    write(&mut c, header("rw", "/tmp/default"), b"d")
        .await
        .unwrap();
    assert_eq!(
        c.sh_ok("rw", &stat_inside("/tmp/default")).await,
        "644 0 0\n"
    );
    let owned = pb::WriteFileHeader {
        mode: 0o640,
        uid: Some(1234),
        gid: Some(5678),
        ..header("rw", "/tmp/owned")
    };
    write(&mut c, owned, b"o").await.unwrap();
    assert_eq!(
        c.sh_ok("rw", &stat_inside("/tmp/owned")).await,
        "640 1234 5678\n"
    );
    write(&mut c, header("rw", "/tmp/owned"), b"again")
        .await
        .unwrap();
    write(&mut c, append("/tmp/owned"), b"+").await.unwrap();
    assert_eq!(
        c.sh_ok("rw", &stat_inside("/tmp/owned")).await,
        "640 1234 5678\n"
    );
    assert_eq!(c.sh_ok("rw", "cat /tmp/owned").await, "again+");
    let setuid = pb::WriteFileHeader {
        mode: 0o4755,
        uid: Some(1000),
        ..header("rw", "/tmp/setuid")
    };
    write(&mut c, setuid, b"#!/bin/sh\n").await.unwrap();
    assert_eq!(
        c.sh_ok("rw", &stat_inside("/tmp/setuid")).await,
        "4755 1000 0\n"
    );
    let entry = stat(&mut c, "rw", "/tmp/owned").await.unwrap();
    assert_eq!((entry.mode, entry.size), (0o640, 6));

    // A write through a symlink writes its target, inside.
    c.sh_ok("rw", "ln -s /tmp/target /tmp/link-to-target").await;
    write(&mut c, header("rw", "/tmp/link-to-target"), b"via link")
        .await
        .unwrap();
    assert_eq!(c.sh_ok("rw", "cat /tmp/target").await, "via link");
    assert_eq!(
        stat(&mut c, "rw", "/tmp/link-to-target")
            .await
            .unwrap()
            .r#type,
        FileType::Symlink as i32
    );

    // A client that goes away mid-stream changes nothing and leaves no temporary file. The
    // temporary file is anonymous: nothing in the directory shows it even while it is written.
    write(&mut c, header("rw", "/tmp/cancelled"), b"before")
        .await
        .unwrap();
    let listed_before = c.sh_ok("rw", "ls -a /tmp").await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(header_msg(header("rw", "/tmp/cancelled")))
        .await
        .unwrap();
    let mut fs = c.fs.clone();
    let call = tokio::spawn(async move { fs.write_file(ReceiverStream::new(rx)).await });
    for i in 0..4 {
        tx.send(data_msg(chunk(9, i, SEND_CHUNK))).await.unwrap();
    }
    wait_writing(&env, "/tmp/").await;
    assert!(temp_files(&list(&mut c, "rw", "/tmp", 1).await.unwrap()).is_empty());
    assert_eq!(c.sh_ok("rw", "ls -a /tmp").await, listed_before);
    // The sender stays open: the call ends by the client's reset, not by a finished stream.
    call.abort();
    let _ = call.await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::host::anonymous_files(env.sandboxd.pid()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the abandoned write's file stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(temp_files(&list(&mut c, "rw", "/tmp", 1).await.unwrap()).is_empty());
    assert_eq!(c.sh_ok("rw", "ls -a /tmp").await, listed_before);
    assert_eq!(
        read(&mut c, "rw", "/tmp/cancelled").await.unwrap(),
        b"before"
    );
    drop(tx);

    c.force_delete("rw").await;
    env.leak_check().await;
}

/// A WriteFile whose stream is still open, with `chunks` of [`SEND_CHUNK`] sent; `finish` ends
/// the stream (the write then publishes), the handle answers with the call's result.
async fn open_write(
    c: &Clients,
    header: pb::WriteFileHeader,
    seed: u64,
    chunks: u64,
) -> (
    mpsc::Sender<pb::WriteFileRequest>,
    tokio::task::JoinHandle<Result<i64, Status>>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(header_msg(header)).await.unwrap();
    let mut fs = c.fs.clone();
    let call = tokio::spawn(async move {
        fs.write_file(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().bytes_written)
    });
    for i in 0..chunks {
        tx.send(data_msg(chunk(seed, i, SEND_CHUNK))).await.unwrap();
    }
    (tx, call)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_during_a_write_holds_none_of_it() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("w").await;
    c.sh_ok("w", "mkdir /data && echo old > /data/file").await;

    // Commit while a write of /data/file streams: the snapshot has the old file and nothing
    // else; the write then lands whole in the running sandbox.
    let (tx, call) = open_write(&c, header("w", "/data/file"), 21, 4).await;
    wait_writing(&env, "/data/").await;
    assert_eq!(c.sh_ok("w", "ls -a /data").await, ".\n..\nfile\n");
    let snap = c.commit("w").await;
    for i in 4..8 {
        tx.send(data_msg(chunk(21, i, SEND_CHUNK))).await.unwrap();
    }
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap(), 8 * SEND_CHUNK as i64);
    let expected: Vec<u8> = (0..8).flat_map(|i| chunk(21, i, SEND_CHUNK)).collect();
    assert_eq!(read(&mut c, "w", "/data/file").await.unwrap(), expected);
    assert_eq!(c.sh_ok("w", "ls -a /data").await, ".\n..\nfile\n");
    c.create_from_snapshot("fork", &snap.snapshot_id).await;
    assert_eq!(c.sh_ok("fork", "ls -a /data").await, ".\n..\nfile\n");
    assert_eq!(c.sh_ok("fork", "cat /data/file").await, "old\n");

    // A restore while a write streams: the write lands nowhere (the filesystem it was made in
    // is gone) and says so.
    let (tx, call) = open_write(&c, header("w", "/data/other"), 22, 2).await;
    wait_writing(&env, "/data/").await;
    c.try_restore("w", &snap.snapshot_id).await.unwrap();
    drop(tx);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("restarted"), "{err}");
    assert_eq!(c.sh_ok("w", "ls -a /data").await, ".\n..\nfile\n");
    assert_eq!(c.sh_ok("w", "cat /data/file").await, "old\n");

    for id in ["w", "fork"] {
        c.force_delete(id).await;
    }
    c.delete_snapshot(&snap.snapshot_id).await;
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_follow_the_contract() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("errs").await;
    let inv = &[Code::InvalidArgument];

    // Requests.
    let e = assert_code(
        read(&mut c, "missing", "/etc/passwd").await,
        &[Code::NotFound],
        "no sandbox",
    );
    assert!(e.message().contains("missing"), "{e:?}");
    let too_long = format!("/{}", "a/".repeat(2100));
    for bad in ["", "etc/passwd", "/a\0b", too_long.as_str()] {
        let e = assert_code(read(&mut c, "errs", bad).await, inv, bad);
        assert!(e.message().contains("path"), "{e:?}");
        let e = assert_code(stat(&mut c, "errs", bad).await, inv, bad);
        assert!(e.message().contains("path"), "{e:?}");
        assert_code(list(&mut c, "errs", bad, 1).await, inv, bad);
        assert_code(mkdir(&mut c, "errs", bad, true, 0).await, inv, bad);
        assert_code(remove(&mut c, "errs", bad, true).await, inv, bad);
        let e = assert_code(write(&mut c, header("errs", bad), b"x").await, inv, bad);
        assert!(e.message().contains("path"), "{e:?}");
    }
    let e = assert_code(
        read_range(&mut c, "errs", "/etc/passwd", -1, 0).await,
        inv,
        "offset",
    );
    assert!(e.message().contains("offset"), "{e:?}");
    let e = assert_code(
        read_range(&mut c, "errs", "/etc/passwd", 0, -1).await,
        inv,
        "length",
    );
    assert!(e.message().contains("length"), "{e:?}");
    for depth in [-1, 33] {
        let e = assert_code(list(&mut c, "errs", "/", depth).await, inv, "depth");
        assert!(e.message().contains("depth"), "{e:?}");
    }
    let e = assert_code(remove(&mut c, "errs", "/", true).await, inv, "remove /");
    assert!(e.message().contains("path"), "{e:?}");
    assert_code(
        remove(&mut c, "errs", "//./", true).await,
        inv,
        "remove //./",
    );

    // The WriteFile stream.
    let e = assert_code(
        c.fs.write_file(futures::stream::iter(Vec::<pb::WriteFileRequest>::new()))
            .await,
        inv,
        "empty stream",
    );
    assert!(e.message().contains("header"), "{e:?}");
    assert_code(
        c.fs.write_file(futures::stream::iter(vec![data_msg(b"x".to_vec())]))
            .await,
        inv,
        "data first",
    );
    assert_code(
        c.fs.write_file(futures::stream::iter(vec![
            header_msg(header("errs", "/tmp/twice")),
            data_msg(b"x".to_vec()),
            header_msg(header("errs", "/tmp/twice")),
        ]))
        .await,
        inv,
        "second header",
    );
    assert_code(
        read(&mut c, "errs", "/tmp/twice").await,
        &[Code::NotFound],
        "not written",
    );
    let listed = list(&mut c, "errs", "/tmp", 1).await.unwrap();
    assert!(temp_files(&listed).is_empty(), "{listed:?}");

    // Paths.
    let nf = &[Code::NotFound];
    let fp = &[Code::FailedPrecondition];
    assert_code(read(&mut c, "errs", "/no/such").await, nf, "read missing");
    assert_code(read(&mut c, "errs", "/etc").await, fp, "read a directory");
    assert_code(read(&mut c, "errs", "/dev/null").await, fp, "read a device");
    assert_code(
        read(&mut c, "errs", "/etc/passwd/x").await,
        fp,
        "read below a file",
    );
    assert_code(stat(&mut c, "errs", "/no/such").await, nf, "stat missing");
    assert_code(
        write(&mut c, header("errs", "/etc"), b"x").await,
        fp,
        "write a directory",
    );
    assert_code(
        write(&mut c, header("errs", "/"), b"x").await,
        fp,
        "write /",
    );
    assert_code(
        write(&mut c, header("errs", "/no/such"), b"x").await,
        nf,
        "write no parent",
    );
    assert_code(
        write(&mut c, header("errs", "/etc/passwd/x"), b"x").await,
        fp,
        "write below a file",
    );
    assert_code(
        list(&mut c, "errs", "/etc/passwd", 1).await,
        fp,
        "list a file",
    );
    assert_code(
        list(&mut c, "errs", "/no/such", 1).await,
        nf,
        "list missing",
    );
    assert_code(
        mkdir(&mut c, "errs", "/no/such", false, 0).await,
        nf,
        "mkdir no parent",
    );
    assert_code(
        mkdir(&mut c, "errs", "/etc", false, 0).await,
        &[Code::AlreadyExists],
        "mkdir exists",
    );
    assert_code(
        mkdir(&mut c, "errs", "/etc/passwd", true, 0).await,
        &[Code::AlreadyExists],
        "mkdir -p over a file",
    );
    assert_code(
        remove(&mut c, "errs", "/no/such", false).await,
        nf,
        "remove missing",
    );
    // Kernel filesystems of a running sandbox are not read as host root.
    assert_code(
        read(&mut c, "errs", "/proc/1/environ").await,
        &[Code::PermissionDenied],
        "read procfs",
    );
    // Mounts of a running sandbox are read through but never removed or replaced.
    let e = assert_code(
        remove(&mut c, "errs", "/proc", true).await,
        fp,
        "remove /proc",
    );
    assert!(e.message().contains("mount point"), "{e:?}");
    assert_code(
        remove(&mut c, "errs", "/etc/hostname", false).await,
        fp,
        "remove a bind mount",
    );
    assert_code(
        write(&mut c, header("errs", "/etc/hosts"), b"x").await,
        fp,
        "replace a bind mount",
    );
    let hostname = c.sh_ok("errs", "cat /etc/hostname").await;
    assert_eq!(
        read(&mut c, "errs", "/etc/hostname").await.unwrap(),
        hostname.as_bytes()
    );
    assert!(c.sh_ok("errs", "ls /proc/1").await.contains("environ"));
    assert!(c.sh_ok("errs", "cat /etc/passwd").await.contains("root"));

    // A recursive remove of a tree holding mounts removes the rest, like `rm -r`.
    let e = assert_code(
        remove(&mut c, "errs", "/etc", true).await,
        fp,
        "remove a tree holding mounts",
    );
    assert!(e.message().contains("mount point"), "{e:?}");
    assert_code(
        read(&mut c, "errs", "/etc/passwd").await,
        nf,
        "removed around the mounts",
    );
    assert_eq!(c.sh_ok("errs", "cat /etc/hostname").await, hostname);

    c.force_delete("errs").await;
    assert_code(
        read(&mut c, "errs", "/etc/passwd").await,
        nf,
        "deleted sandbox",
    );
    env.leak_check().await;
}

/// Runs the tree checks on sandbox `id`; `running` says whether it can exec.
async fn tree_checks(c: &mut Clients, id: &str, running: bool) {
    // MakeDirectory.
    assert_code(
        mkdir(c, id, "/u/a/b", false, 0).await,
        &[Code::NotFound],
        "no parents",
    );
    mkdir(c, id, "/t/a/b", true, 0).await.unwrap();
    mkdir(c, id, "/t/a/b", true, 0).await.unwrap();
    assert_code(
        mkdir(c, id, "/t/a/b", false, 0).await,
        &[Code::AlreadyExists],
        "exists",
    );
    mkdir(c, id, "/t/private", false, 0o700).await.unwrap();
    mkdir(c, id, "/t/sticky", false, 0o1777).await.unwrap();
    write(c, header(id, "/t/a/f1"), b"12345").await.unwrap();
    write(c, header(id, "/t/a/b/f2"), b"").await.unwrap();
    mkdir(c, id, "/t/a/b/c/d", true, 0).await.unwrap();

    // StatFile.
    let dir = stat(c, id, "/t/a").await.unwrap();
    assert_eq!((dir.r#type, dir.mode), (FileType::Directory as i32, 0o755));
    assert_eq!(stat(c, id, "/t/private").await.unwrap().mode, 0o700);
    assert_eq!(stat(c, id, "/t/sticky").await.unwrap().mode, 0o1777);
    let file = stat(c, id, "/t/a/f1").await.unwrap();
    assert_eq!(
        (
            file.path.as_str(),
            file.r#type,
            file.size,
            file.mode,
            file.link_target.as_str()
        ),
        ("/t/a/f1", FileType::Regular as i32, 5, 0o644, "")
    );
    let age = std::time::SystemTime::now()
        .duration_since(sandboxd::util::system_time(
            file.modified_at.as_ref().unwrap(),
        ))
        .unwrap_or_default();
    assert!(age < Duration::from_secs(300), "modified {age:?} ago");

    if running {
        c.sh_ok(id, "ln -s /t/a/f1 /t/link && ln -s missing /t/a/dangling")
            .await;
        assert_eq!(
            c.sh_ok(id, "stat -c %a /t/private /t/sticky").await,
            "700\n1777\n"
        );
    } else {
        // Planted while it ran; see below.
    }
    let link = stat(c, id, "/t/link").await.unwrap();
    assert_eq!(
        (link.r#type, link.link_target.as_str(), link.size),
        (FileType::Symlink as i32, "/t/a/f1", 7)
    );
    assert_eq!(
        stat(c, id, "/t/a/dangling").await.unwrap().link_target,
        "missing"
    );
    // Read follows the link (inside the sandbox).
    assert_eq!(read(c, id, "/t/link").await.unwrap(), b"12345");

    // ListFiles.
    let paths = |entries: Vec<pb::FileEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.path).collect()
    };
    let one = list(c, id, "/t", 1).await.unwrap();
    assert_eq!(
        paths(one.clone()),
        ["/t/a", "/t/link", "/t/private", "/t/sticky"]
    );
    assert_eq!(
        paths(list(c, id, "/t/", 0).await.unwrap()),
        paths(one.clone())
    );
    let link = one.iter().find(|e| e.path == "/t/link").unwrap();
    assert_eq!(
        (link.r#type, link.link_target.as_str()),
        (FileType::Symlink as i32, "/t/a/f1")
    );
    assert_eq!(
        paths(list(c, id, "/t", 2).await.unwrap()),
        [
            "/t/a",
            "/t/a/b",
            "/t/a/dangling",
            "/t/a/f1",
            "/t/link",
            "/t/private",
            "/t/sticky"
        ]
    );
    let deep = list(c, id, "/t", 32).await.unwrap();
    assert!(deep.iter().any(|e| e.path == "/t/a/b/c/d"), "{deep:?}");
    let f1 = deep.iter().find(|e| e.path == "/t/a/f1").unwrap();
    assert_eq!(
        (f1.r#type, f1.size, f1.mode),
        (FileType::Regular as i32, 5, 0o644)
    );
    // Entries are named below the path as given.
    assert_eq!(
        paths(list(c, id, "/t/a/b/c", 1).await.unwrap()),
        ["/t/a/b/c/d"]
    );

    // RemovePath.
    let e = assert_code(
        remove(c, id, "/t/a", false).await,
        &[Code::FailedPrecondition],
        "non-empty",
    );
    assert!(e.message().contains("recursive"), "{e:?}");
    remove(c, id, "/t/link", false).await.unwrap();
    assert_eq!(
        read(c, id, "/t/a/f1").await.unwrap(),
        b"12345",
        "the target stays"
    );
    remove(c, id, "/t/private", false).await.unwrap();
    remove(c, id, "/t/a/f1", false).await.unwrap();
    remove(c, id, "/t/a", true).await.unwrap();
    assert_code(stat(c, id, "/t/a").await, &[Code::NotFound], "removed");
    assert_code(
        remove(c, id, "/t/a", true).await,
        &[Code::NotFound],
        "removed twice",
    );
    assert_eq!(paths(list(c, id, "/t", 3).await.unwrap()), ["/t/sticky"]);
    remove(c, id, "/t", true).await.unwrap();
    if running {
        c.sh_ok(id, "test ! -e /t").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trees_list_stat_make_and_remove_in_running_and_stopped_sandboxes() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    c.create_running("tree").await;
    tree_checks(&mut c, "tree", true).await;

    // The same on a stopped sandbox; its symlinks are planted while it runs.
    c.create_running("cold").await;
    c.sh_ok(
        "cold",
        "mkdir -p /t/a && ln -s /t/a/f1 /t/link && ln -s missing /t/a/dangling",
    )
    .await;
    c.force_stop("cold").await;
    let baseline = mounts(&env);
    tree_checks(&mut c, "cold", false).await;
    assert_eq!(mounts(&env), baseline, "a temporary mount was left");
    // Errors unmount too.
    assert_code(
        read(&mut c, "cold", "/no/such").await,
        &[Code::NotFound],
        "missing",
    );
    assert_code(
        remove(&mut c, "cold", "/etc", false).await,
        &[Code::FailedPrecondition],
        "etc",
    );
    assert_eq!(
        mounts(&env),
        baseline,
        "a temporary mount was left after errors"
    );

    c.force_delete("tree").await;
    c.force_delete("cold").await;
    env.leak_check().await;
}

/// A directory on the host, outside every sandbox, removed on drop.
struct HostDir {
    path: PathBuf,
    secret: String,
}

impl HostDir {
    fn new() -> HostDir {
        let tag = common::unique_name("sandboxd-escape");
        let path = PathBuf::from("/tmp").join(&tag);
        std::fs::create_dir(&path).unwrap();
        let secret = format!("HOST-SECRET-{tag}");
        std::fs::write(path.join("secret"), &secret).unwrap();
        HostDir { path, secret }
    }

    fn dir(&self) -> String {
        self.path.display().to_string()
    }

    /// The secret is unchanged and nothing else appeared next to it.
    fn assert_intact(&self) {
        assert_eq!(
            std::fs::read_to_string(self.path.join("secret")).unwrap(),
            self.secret,
            "the host secret was changed"
        );
        let names: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["secret"], "something was created on the host");
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn host_file_digest(path: &str) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|d| hex::encode(Sha256::digest(d)))
}

/// Plants escape symlinks in running sandbox `id`.
async fn plant(c: &mut Clients, id: &str, host: &HostDir) {
    let d = host.dir();
    let script = format!(
        "set -e
         ln -s {d}/secret /abs
         ln -s ../../../../../../../..{d}/secret /rel
         ln -s {d} /dirlink
         ln -s ../../../../../../../.. /up
         mkdir -p /chain
         ln -s /chain/2 /chain/1
         ln -s ../chain/3 /chain/2
         ln -s /up/..{d}/secret /chain/3
         ln -s /etc/shadow /shadowlink
         ln -s ../../../../../../etc/passwd /pwlink"
    );
    c.sh_ok(id, &script).await;
}

/// Every FileService RPC through every planted escape, on sandbox `id`.
async fn escape_checks(c: &mut Clients, id: &str, host: &HostDir, running: bool) {
    let d = host.dir();
    let denied = &[Code::NotFound, Code::PermissionDenied];
    // Paths whose resolution passes through an escape (a last-component symlink included).
    let through = vec![
        "/abs".to_string(),
        "/rel".to_string(),
        "/chain/1".to_string(),
        "/dirlink/secret".to_string(),
        format!(
            "/dirlink/../{}/secret",
            host.path.file_name().unwrap().to_string_lossy()
        ),
        format!("/up{d}/secret"),
        format!("/../../../..{d}/secret"),
        format!("/etc/../../..{d}/secret"),
        format!("/proc/1/root{d}/secret"),
        format!("/proc/self/root{d}/secret"),
        format!("/proc/1/cwd/..{d}/secret"),
    ];
    let dirs = vec![
        "/dirlink".to_string(),
        format!("/up{d}"),
        format!("/../..{d}"),
        format!("/proc/1/root{d}"),
    ];
    let host_shadow = host_file_digest("/etc/shadow");
    let host_passwd = host_file_digest("/etc/passwd");

    for p in &through {
        // ReadFile.
        let e = assert_code(read(c, id, p).await, denied, &format!("read {p}"));
        assert!(!e.message().contains(&host.secret), "{e:?}");
        assert_code(
            read_range(c, id, p, 1, 5).await,
            denied,
            &format!("read range {p}"),
        );
        // StatFile: a last-component symlink is described itself; nothing else resolves.
        match stat(c, id, p).await {
            Ok(e) => assert_eq!(e.r#type, FileType::Symlink as i32, "stat {p}: {e:?}"),
            Err(e) => assert!(denied.contains(&e.code()), "stat {p}: {e:?}"),
        }
        // ListFiles.
        assert_code(list(c, id, p, 2).await, denied, &format!("list {p}"));
        // WriteFile, replacing and appending.
        let w = write(c, header(id, p), b"PWNED").await;
        assert_code(w, denied, &format!("write {p}"));
        let appended = pb::WriteFileHeader {
            append: true,
            ..header(id, p)
        };
        assert_code(
            write(c, appended, b"PWNED").await,
            denied,
            &format!("append {p}"),
        );
        // MakeDirectory without parents below it.
        let below = format!("{p}/sub");
        assert_code(
            mkdir(c, id, &below, false, 0).await,
            denied,
            &format!("mkdir {below}"),
        );
        host.assert_intact();
    }
    for p in &dirs {
        assert_code(list(c, id, p, 3).await, denied, &format!("list {p}"));
        let e = write(c, header(id, &format!("{p}/planted")), b"PWNED").await;
        assert_code(e, denied, &format!("write into {p}"));
        assert_code(
            remove(c, id, &format!("{p}/secret"), false).await,
            denied,
            &format!("remove in {p}"),
        );
        host.assert_intact();
    }
    // RemovePath through the escapes, where the last component is not itself a planted link.
    for p in through
        .iter()
        .filter(|p| !["/abs", "/rel", "/chain/1"].contains(&p.as_str()))
    {
        assert_code(remove(c, id, p, true).await, denied, &format!("remove {p}"));
        host.assert_intact();
    }
    // A listing of the whole sandbox shows the links and does not follow them.
    let all = list(c, id, "/", 2).await.unwrap();
    let dirlink = all.iter().find(|e| e.path == "/dirlink").expect("listed");
    assert_eq!(
        (dirlink.r#type, dirlink.link_target.as_str()),
        (FileType::Symlink as i32, d.as_str())
    );
    assert!(
        !all.iter()
            .any(|e| e.path.starts_with("/dirlink/") || e.path.starts_with("/up/")),
        "a symlink was followed"
    );

    // MakeDirectory -p through the escapes creates inside the sandbox, or nothing.
    for p in through.iter().chain(&dirs) {
        let _ = mkdir(c, id, &format!("{p}/made"), true, 0).await;
        host.assert_intact();
    }

    // Files that exist on the host and in the sandbox: the sandbox's own is used.
    assert_code(
        read(c, id, "/shadowlink").await,
        denied,
        "read /etc/shadow via a link",
    );
    write(c, header(id, "/shadowlink"), b"sandbox shadow\n")
        .await
        .unwrap();
    assert_eq!(
        read(c, id, "/shadowlink").await.unwrap(),
        b"sandbox shadow\n"
    );
    assert_eq!(
        read(c, id, "/etc/shadow").await.unwrap(),
        b"sandbox shadow\n"
    );
    let passwd = read(c, id, "/pwlink").await.unwrap();
    assert_eq!(passwd, read(c, id, "/etc/passwd").await.unwrap());
    if running {
        assert_eq!(c.sh_ok(id, "cat /etc/shadow").await, "sandbox shadow\n");
        assert_eq!(c.sh_ok(id, "cat /etc/passwd").await.as_bytes(), passwd);
    }
    assert_eq!(
        host_file_digest("/etc/shadow"),
        host_shadow,
        "host /etc/shadow changed"
    );
    assert_eq!(
        host_file_digest("/etc/passwd"),
        host_passwd,
        "host /etc/passwd changed"
    );

    // With the host's directory mirrored inside, writes through the links land inside.
    let _ = remove(c, id, &d, true).await;
    mkdir(c, id, &d, true, 0).await.unwrap();
    write(c, header(id, "/abs"), b"sandbox's own")
        .await
        .unwrap();
    assert_eq!(
        read(c, id, &format!("{d}/secret")).await.unwrap(),
        b"sandbox's own"
    );
    assert_eq!(read(c, id, "/chain/1").await.unwrap(), b"sandbox's own");
    assert_eq!(
        read(c, id, "/dirlink/secret").await.unwrap(),
        b"sandbox's own"
    );
    if running {
        assert_eq!(
            c.sh_ok(id, &format!("cat {d}/secret")).await,
            "sandbox's own"
        );
    }
    host.assert_intact();

    // Removing the links removes the links, never what they point at.
    for p in ["/abs", "/rel", "/chain/1", "/dirlink", "/up", "/shadowlink"] {
        remove(c, id, p, true)
            .await
            .unwrap_or_else(|e| panic!("remove {p}: {e}"));
        assert_code(
            stat(c, id, p).await,
            &[Code::NotFound],
            &format!("{p} removed"),
        );
    }
    assert_eq!(
        read(c, id, &format!("{d}/secret")).await.unwrap(),
        b"sandbox's own"
    );
    remove(c, id, &d, true).await.unwrap();
    host.assert_intact();
    assert_eq!(
        host_file_digest("/etc/shadow"),
        host_shadow,
        "host /etc/shadow changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_rpc_reaches_a_host_file_through_paths_or_symlinks() {
    let env = TestEnv::new().await;
    let mut c = env.clients().await;
    let host = HostDir::new();
    c.create_running("esc-run").await;
    c.create_running("esc-stop").await;
    plant(&mut c, "esc-run", &host).await;
    plant(&mut c, "esc-stop", &host).await;
    c.force_stop("esc-stop").await;

    escape_checks(&mut c, "esc-run", &host, true).await;
    let baseline = mounts(&env);
    escape_checks(&mut c, "esc-stop", &host, false).await;
    assert_eq!(mounts(&env), baseline, "a temporary mount was left");
    host.assert_intact();

    c.force_delete("esc-run").await;
    c.force_delete("esc-stop").await;
    host.assert_intact();
    drop(host);
    env.leak_check().await;
}
