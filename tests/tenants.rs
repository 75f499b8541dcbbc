//! Tenants walled off from each other, and their quotas, against a real containerd: every RPC
//! of every service probed with another tenant's ids answers NOT_FOUND and leaves that
//! tenant's objects as they were; the same id lives in two tenants at once; a DeleteImage by
//! one tenant never breaks another's sandboxes; quotas hold under concurrent creates, count
//! the limits that apply (defaults included), reload with the tenants file and survive a
//! restart of sandboxd; the leak check reads every tenant's namespace.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pki::tenants_toml;
use common::TestEnv;
use futures::StreamExt;
use sandboxd::cli::{Credentials, Transport};
use sandboxd::pb;
use sandboxd::pb::file_service_client::FileServiceClient;
use sandboxd::pb::image_service_client::ImageServiceClient;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;
use sandboxd::pb::{exec_request, write_file_request};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

const ALICE: &str = "alice-token-3d1f";
const BOB: &str = "bob-token-88ac";
const CAROL: &str = "carol-token-51e0";
const DAVE: &str = "dave-token-0b7d";

/// One tenant's clients of every service, each call carrying its bearer token.
#[derive(Clone)]
struct Tenant {
    sb: SandboxServiceClient<Transport>,
    fs: FileServiceClient<Transport>,
    snap: SnapshotServiceClient<Transport>,
    img: ImageServiceClient<Transport>,
    image: String,
}

impl Tenant {
    fn new(env: &TestEnv, token: &str) -> Tenant {
        let t = env.sandboxd.transport(&Credentials {
            token: Some(token.into()),
            tls: Default::default(),
        });
        Tenant {
            sb: SandboxServiceClient::new(t.clone()),
            fs: FileServiceClient::new(t.clone()),
            snap: SnapshotServiceClient::new(t.clone()),
            img: ImageServiceClient::new(t),
            image: env.image_ref(),
        }
    }

    fn request(&self, id: &str) -> pb::CreateSandboxRequest {
        pb::CreateSandboxRequest {
            sandbox_id: id.into(),
            image: self.image.clone(),
            ..Default::default()
        }
    }

    async fn try_create(&mut self, r: pb::CreateSandboxRequest) -> Result<pb::Sandbox, Status> {
        let reply = self.sb.create_sandbox(r).await?;
        Ok(reply.into_inner().sandbox.expect("a sandbox"))
    }

    async fn create(&mut self, id: &str) -> pb::Sandbox {
        let r = self.request(id);
        self.try_create(r)
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e:?}"))
    }

    async fn get(&mut self, id: &str) -> Result<pb::Sandbox, Status> {
        let r = pb::GetSandboxRequest {
            sandbox_id: id.into(),
        };
        Ok(self
            .sb
            .get_sandbox(r)
            .await?
            .into_inner()
            .sandbox
            .expect("a sandbox"))
    }

    async fn list(&mut self) -> Vec<String> {
        let reply = self
            .sb
            .list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .expect("list");
        let mut ids: Vec<String> = reply
            .into_inner()
            .sandboxes
            .into_iter()
            .map(|s| s.sandbox_id)
            .collect();
        ids.sort();
        ids
    }

    async fn sh(&mut self, id: &str, script: &str) -> Result<String, Status> {
        let r = pb::ExecSyncRequest {
            sandbox_id: id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        };
        let out = self.sb.exec_sync(r).await?.into_inner();
        assert_eq!(out.exit_code, 0, "{out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn delete(&mut self, id: &str) -> Result<(), Status> {
        let r = pb::DeleteSandboxRequest {
            sandbox_id: id.into(),
            force: true,
        };
        self.sb.delete_sandbox(r).await.map(|_| ())
    }

    async fn snapshots(&mut self) -> Vec<String> {
        let reply = self
            .snap
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .expect("list snapshots");
        reply
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect()
    }

    async fn images(&mut self) -> Vec<String> {
        let reply = self
            .img
            .list_images(pb::ListImagesRequest::default())
            .await
            .expect("list images");
        reply
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.name)
            .collect()
    }
}

/// A tenants file with alice, bob and dave unlimited and carol at `carol_max` sandboxes.
fn tenants_file(dir: &Path, carol_max: u64) -> PathBuf {
    let file = dir.join("tenants.toml");
    let text = tenants_toml(&[
        ("alice", &[ALICE], ""),
        ("bob", &[BOB], ""),
        ("carol", &[CAROL], &format!("max_sandboxes = {carol_max}")),
        (
            "dave",
            &[DAVE],
            "max_memory_bytes = 268435456\nmax_cpu_millis = 1000",
        ),
    ]);
    // Through a rename, as a Secret update does: the reload never reads half a file.
    let tmp = dir.join("tenants.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file
}

async fn env_with_tenants(dir: &Path, carol_max: u64) -> TestEnv {
    let file = tenants_file(dir, carol_max);
    TestEnv::with_args(&["--tenants", file.to_str().unwrap()]).await
}

/// Asserts that `r` failed NOT_FOUND: what a call naming another tenant's object must get.
#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(what: &str, r: Result<T, Status>) {
    match r {
        Err(s) if s.code() == Code::NotFound => {}
        other => panic!("{what}: expected NOT_FOUND, got {other:?}"),
    }
}

/// An Exec stream's first answer (or its status) after the `first` message.
async fn exec_first(t: &mut Tenant, first: exec_request::Request) -> Result<(), Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(first),
    })
    .await
    .unwrap();
    let mut stream = t.sb.exec(ReceiverStream::new(rx)).await?.into_inner();
    let first = stream.next().await;
    drop(tx);
    match first {
        Some(Err(s)) => Err(s),
        Some(Ok(m)) => panic!("an Exec into another tenant's sandbox answered {m:?}"),
        None => panic!("an Exec stream ended without a status"),
    }
}

async fn write_file(t: &mut Tenant, id: &str, path: &str, data: &[u8]) -> Result<(), Status> {
    let msgs = vec![
        pb::WriteFileRequest {
            request: Some(write_file_request::Request::Header(pb::WriteFileHeader {
                sandbox_id: id.into(),
                path: path.into(),
                ..Default::default()
            })),
        },
        pb::WriteFileRequest {
            request: Some(write_file_request::Request::Data(data.to_vec())),
        },
    ];
    t.fs.write_file(futures::stream::iter(msgs))
        .await
        .map(|_| ())
}

async fn read_file(t: &mut Tenant, id: &str, path: &str) -> Result<Vec<u8>, Status> {
    let r = pb::ReadFileRequest {
        sandbox_id: id.into(),
        path: path.into(),
        ..Default::default()
    };
    let mut stream = t.fs.read_file(r).await?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend(chunk?.data);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rpc_of_any_service_reaches_another_tenants_objects() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_with_tenants(dir.path(), 100).await;
    let mut alice = Tenant::new(&env, ALICE);
    let mut bob = Tenant::new(&env, BOB);
    // Each watches every event of their tenant from the start; neither may see the other's.
    let watch_all = pb::WatchSandboxesRequest::default();
    let mut bob_events = bob
        .sb
        .watch_sandboxes(watch_all.clone())
        .await
        .unwrap()
        .into_inner();
    let mut alice_events = alice
        .sb
        .watch_sandboxes(watch_all)
        .await
        .unwrap()
        .into_inner();

    // alice: a running and a stopped sandbox, a file in each, a snapshot, her image.
    alice.create("running-1").await;
    let mut stopped = alice.request("stopped-1");
    stopped.start = Some(false);
    alice.try_create(stopped).await.unwrap();
    write_file(&mut alice, "running-1", "/secret.txt", b"alice's")
        .await
        .unwrap();
    write_file(&mut alice, "stopped-1", "/secret.txt", b"alice's")
        .await
        .unwrap();
    let snap = alice
        .snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "running-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    // bob has a sandbox of his own to aim a restore at.
    bob.create("bobs-1").await;

    for id in ["running-1", "stopped-1"] {
        let sid = || id.to_string();
        // SandboxService.
        assert_not_found("GetSandbox", bob.get(id).await);
        assert_not_found(
            "StartSandbox",
            bob.sb
                .start_sandbox(pb::StartSandboxRequest { sandbox_id: sid() })
                .await,
        );
        assert_not_found(
            "StopSandbox",
            bob.sb
                .stop_sandbox(pb::StopSandboxRequest {
                    sandbox_id: sid(),
                    force: true,
                    ..Default::default()
                })
                .await,
        );
        assert_not_found("DeleteSandbox", bob.delete(id).await);
        assert_not_found(
            "GetSandboxStats",
            bob.sb
                .get_sandbox_stats(pb::GetSandboxStatsRequest { sandbox_id: sid() })
                .await,
        );
        assert_not_found(
            "WatchSandboxStats",
            bob.sb
                .watch_sandbox_stats(pb::WatchSandboxStatsRequest {
                    sandbox_id: sid(),
                    interval: None,
                })
                .await
                .map(|_| ()),
        );
        assert_not_found("ExecSync", bob.sh(id, "echo in").await);
        assert_not_found(
            "Exec",
            exec_first(
                &mut bob,
                exec_request::Request::Start(pb::ExecStart {
                    sandbox_id: sid(),
                    args: vec!["true".into()],
                    ..Default::default()
                }),
            )
            .await,
        );
        // FileService.
        assert_not_found("ReadFile", read_file(&mut bob, id, "/secret.txt").await);
        assert_not_found(
            "WatchFiles",
            bob.fs
                .watch_files(pb::WatchFilesRequest {
                    sandbox_id: sid(),
                    path: "/".into(),
                    recursive: true,
                })
                .await,
        );
        assert_not_found(
            "WriteFile",
            write_file(&mut bob, id, "/secret.txt", b"bob's").await,
        );
        assert_not_found(
            "ListFiles",
            bob.fs
                .list_files(pb::ListFilesRequest {
                    sandbox_id: sid(),
                    path: "/".into(),
                    depth: 1,
                })
                .await,
        );
        assert_not_found(
            "StatFile",
            bob.fs
                .stat_file(pb::StatFileRequest {
                    sandbox_id: sid(),
                    path: "/secret.txt".into(),
                })
                .await,
        );
        assert_not_found(
            "MakeDirectory",
            bob.fs
                .make_directory(pb::MakeDirectoryRequest {
                    sandbox_id: sid(),
                    path: "/bobs-dir".into(),
                    ..Default::default()
                })
                .await,
        );
        assert_not_found(
            "RemovePath",
            bob.fs
                .remove_path(pb::RemovePathRequest {
                    sandbox_id: sid(),
                    path: "/secret.txt".into(),
                    recursive: true,
                })
                .await,
        );
        // SnapshotService on the sandbox.
        assert_not_found(
            "CommitSnapshot",
            bob.snap
                .commit_snapshot(pb::CommitSnapshotRequest {
                    sandbox_id: sid(),
                    ..Default::default()
                })
                .await,
        );
        assert_not_found(
            "RestoreSandbox",
            bob.snap
                .restore_sandbox(pb::RestoreSandboxRequest {
                    sandbox_id: sid(),
                    snapshot_id: snap.clone(),
                    ..Default::default()
                })
                .await,
        );
        match bob
            .snap
            .list_snapshots(pb::ListSnapshotsRequest {
                sandbox_id: sid(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => assert!(r.into_inner().snapshots.is_empty()),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
        }
    }
    // SnapshotService on the snapshot.
    assert_not_found(
        "GetSnapshot",
        bob.snap
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: snap.clone(),
            })
            .await,
    );
    assert_not_found(
        "DeleteSnapshot",
        bob.snap
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.clone(),
            })
            .await,
    );
    assert_not_found(
        "ExportSnapshot",
        bob.snap
            .export_snapshot(pb::ExportSnapshotRequest {
                snapshot_id: snap.clone(),
                image: format!("{}/stolen:1", env.registry.addr()),
                ..Default::default()
            })
            .await,
    );
    assert_not_found(
        "RestoreSandbox onto his own sandbox",
        bob.snap
            .restore_sandbox(pb::RestoreSandboxRequest {
                sandbox_id: "bobs-1".into(),
                snapshot_id: snap.clone(),
                ..Default::default()
            })
            .await,
    );
    let mut fork = bob.request("forked-1");
    fork.image.clear();
    fork.snapshot_id = snap.clone();
    assert_not_found(
        "CreateSandbox from her snapshot",
        bob.try_create(fork).await,
    );
    // Lists hold only the caller's own.
    assert_eq!(bob.list().await, ["bobs-1"]);
    assert!(bob.snapshots().await.is_empty());
    assert_eq!(alice.list().await, ["running-1", "stopped-1"]);
    assert_eq!(alice.snapshots().await, std::slice::from_ref(&snap));
    // ImageService: bob's images are his own pulls; hers are not his to see or delete.
    let other_image = env.push_image(&common::busybox_layout(), "alices-only:1");
    alice
        .img
        .pull_image(pb::PullImageRequest {
            image: other_image.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .for_each(|_| async {})
        .await;
    assert_not_found(
        "GetImage",
        bob.img
            .get_image(pb::GetImageRequest {
                image: other_image.clone(),
            })
            .await,
    );
    assert_not_found(
        "DeleteImage",
        bob.img
            .delete_image(pb::DeleteImageRequest {
                image: other_image.clone(),
            })
            .await,
    );
    assert!(!bob.images().await.contains(&other_image));
    assert!(alice.images().await.contains(&other_image));

    // Nothing of alice's was touched.
    assert_eq!(
        alice.get("running-1").await.unwrap().state,
        pb::SandboxState::Running as i32
    );
    assert_eq!(
        alice.get("stopped-1").await.unwrap().state,
        pb::SandboxState::Created as i32
    );
    for id in ["running-1", "stopped-1"] {
        assert_eq!(
            read_file(&mut alice, id, "/secret.txt").await.unwrap(),
            b"alice's"
        );
    }
    assert_eq!(
        alice
            .sh("running-1", "ls /bobs-dir 2>&1 || echo none")
            .await
            .unwrap()
            .trim_end(),
        "ls: /bobs-dir: No such file or directory\nnone"
    );
    alice
        .snap
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: snap.clone(),
        })
        .await
        .unwrap();

    // The same calls by alice reach her objects: each RPC acts for its caller's tenant, not
    // just for someone other than bob.
    let stopped_id = || "stopped-1".to_string();
    let dir = pb::MakeDirectoryRequest {
        sandbox_id: stopped_id(),
        path: "/alices-dir".into(),
        ..Default::default()
    };
    alice.fs.make_directory(dir).await.unwrap();
    let listed = alice
        .fs
        .list_files(pb::ListFilesRequest {
            sandbox_id: stopped_id(),
            path: "/".into(),
            depth: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.iter().any(|e| e.path == "/alices-dir"), "{listed:?}");
    let stat = pb::StatFileRequest {
        sandbox_id: stopped_id(),
        path: "/secret.txt".into(),
    };
    assert_eq!(
        alice
            .fs
            .stat_file(stat)
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap()
            .size,
        7
    );
    let remove = pb::RemovePathRequest {
        sandbox_id: stopped_id(),
        path: "/alices-dir".into(),
        recursive: true,
    };
    alice.fs.remove_path(remove).await.unwrap();
    let start = pb::StartSandboxRequest {
        sandbox_id: stopped_id(),
    };
    alice.sb.start_sandbox(start).await.unwrap();
    let stop = pb::StopSandboxRequest {
        sandbox_id: stopped_id(),
        force: true,
        ..Default::default()
    };
    alice.sb.stop_sandbox(stop).await.unwrap();
    let restore = pb::RestoreSandboxRequest {
        sandbox_id: stopped_id(),
        snapshot_id: snap.clone(),
        ..Default::default()
    };
    alice.snap.restore_sandbox(restore).await.unwrap();
    assert_eq!(
        alice.sh("stopped-1", "cat /secret.txt").await.unwrap(),
        "alice's"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ExecRequest {
        request: Some(exec_request::Request::Start(pb::ExecStart {
            sandbox_id: "running-1".into(),
            args: vec!["cat".into(), "/secret.txt".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = alice
        .sb
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut stdout = Vec::new();
    let mut exited = None;
    while let Some(m) = stream.next().await {
        match m.unwrap().response.unwrap() {
            pb::exec_response::Response::Stdout(d) => stdout.extend(d),
            pb::exec_response::Response::Exited(e) => exited = Some(e.exit_code),
            _ => {}
        }
    }
    drop(tx);
    assert_eq!((stdout.as_slice(), exited), (&b"alice's"[..], Some(0)));
    let watch = pb::WatchFilesRequest {
        sandbox_id: "running-1".into(),
        path: "/".into(),
        recursive: false,
    };
    let mut files = alice.fs.watch_files(watch).await.unwrap().into_inner();
    write_file(&mut alice, "running-1", "/watched.txt", b"seen")
        .await
        .unwrap();
    let seen = files.message().await.unwrap().unwrap();
    assert!(seen.path.starts_with("/"), "{seen:?}");
    drop(files);
    let export = pb::ExportSnapshotRequest {
        snapshot_id: snap.clone(),
        image: format!("{}/alices-export:1", env.registry.addr()),
        ..Default::default()
    };
    let exported = alice
        .snap
        .export_snapshot(export)
        .await
        .unwrap()
        .into_inner();
    assert!(exported.digest.starts_with("sha256:"), "{exported:?}");
    let image = pb::GetImageRequest {
        image: other_image.clone(),
    };
    alice.img.get_image(image).await.unwrap();
    let image = pb::DeleteImageRequest {
        image: other_image.clone(),
    };
    alice.img.delete_image(image).await.unwrap();

    // The leak check reads every tenant's namespace: alice's leftovers would show there.
    let leaks = env.leaks().await;
    let alice_ns = env.tenant_namespace("alice");
    assert!(
        leaks.containers.contains(&format!("{alice_ns}/running-1")),
        "{leaks}"
    );
    for id in ["running-1", "stopped-1"] {
        alice.delete(id).await.unwrap();
    }
    alice
        .snap
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: snap })
        .await
        .unwrap();
    bob.delete("bobs-1").await.unwrap();
    // bob's watch saw his own sandbox's life and nothing of alice's; alice's saw hers.
    let mut bobs = Vec::new();
    while !bobs.contains(&(pb::SandboxEventType::Deleted, "bobs-1".to_string())) {
        let e = bob_events.message().await.unwrap().unwrap();
        bobs.push((e.r#type(), e.sandbox.unwrap().sandbox_id));
    }
    assert!(bobs.iter().all(|(_, id)| id == "bobs-1"), "{bobs:?}");
    let first = alice_events.message().await.unwrap().unwrap();
    assert_eq!(
        (first.r#type(), first.sandbox.unwrap().sandbox_id.as_str()),
        (pb::SandboxEventType::Created, "running-1")
    );
    drop((bob_events, alice_events));
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_lives_in_two_tenants_and_a_delete_image_by_one_keeps_the_other_working() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_with_tenants(dir.path(), 100).await;
    let mut alice = Tenant::new(&env, ALICE);
    let mut bob = Tenant::new(&env, BOB);
    let mut anonymous_default = Tenant::new(&env, "not-a-token");

    // One id, three sandboxes: alice's, bob's, and (with no credentials needed for none)
    // nobody else's.
    alice.create("box-1").await;
    bob.create("box-1").await;
    assert_eq!(
        anonymous_default.get("box-1").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    alice.sh("box-1", "echo alice > /who").await.unwrap();
    bob.sh("box-1", "echo bob > /who").await.unwrap();
    assert_eq!(alice.sh("box-1", "cat /who").await.unwrap(), "alice\n");
    assert_eq!(bob.sh("box-1", "cat /who").await.unwrap(), "bob\n");
    // Each in a cgroup of its own, named by its tenant's host key.
    let mut cgroups: Vec<String> = env
        .cgroup
        .leftovers()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".box-1"))
        .collect();
    cgroups.sort();
    cgroups.dedup();
    assert_eq!(cgroups.len(), 2, "{cgroups:?}");
    assert!(cgroups.iter().all(|n| n.starts_with('T')), "{cgroups:?}");

    // alice deletes the image both sandboxes came from: only her record goes.
    alice
        .img
        .delete_image(pb::DeleteImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap();
    assert!(!alice.images().await.contains(&env.image_ref()));
    assert!(bob.images().await.contains(&env.image_ref()));
    bob.img
        .get_image(pb::GetImageRequest {
            image: env.image_ref(),
        })
        .await
        .unwrap();
    // bob's sandbox goes on, stops and starts again, and he makes another of the image.
    assert_eq!(bob.sh("box-1", "cat /who").await.unwrap(), "bob\n");
    bob.sb
        .stop_sandbox(pb::StopSandboxRequest {
            sandbox_id: "box-1".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    bob.sb
        .start_sandbox(pb::StartSandboxRequest {
            sandbox_id: "box-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(bob.sh("box-1", "cat /who").await.unwrap(), "bob\n");
    bob.create("box-2").await;
    assert_eq!(bob.sh("box-2", "echo up").await.unwrap(), "up\n");
    // alice's own sandbox keeps running too (its snapshot holds its layers).
    assert_eq!(alice.sh("box-1", "cat /who").await.unwrap(), "alice\n");

    // A request id is the tenant's own: bob's create with alice's request id makes his own
    // sandbox instead of replaying hers.
    let retried = |t: &Tenant| pb::CreateSandboxRequest {
        request_id: "create-once".into(),
        ..t.request("")
    };
    let hers = alice.try_create(retried(&alice)).await.unwrap();
    let his = bob.try_create(retried(&bob)).await.unwrap();
    assert_ne!(hers.sandbox_id, his.sandbox_id);
    let again = alice.try_create(retried(&alice)).await.unwrap();
    assert_eq!(again.sandbox_id, hers.sandbox_id);
    alice.delete(&hers.sandbox_id).await.unwrap();
    bob.delete(&his.sandbox_id).await.unwrap();

    alice.delete("box-1").await.unwrap();
    assert_eq!(bob.get("box-1").await.unwrap().sandbox_id, "box-1");
    bob.delete("box-1").await.unwrap();
    bob.delete("box-2").await.unwrap();
    env.leak_check().await;
}

/// Creates `n` sandboxes for `t` at once; how many were made, and the statuses of the rest.
async fn create_at_once(t: &Tenant, prefix: &str, n: usize) -> (Vec<String>, Vec<Status>) {
    let calls = (0..n).map(|i| {
        let mut t = t.clone();
        let id = format!("{prefix}-{i}");
        tokio::spawn(async move {
            let r = t.request(&id);
            t.try_create(r).await.map(|s| s.sandbox_id)
        })
    });
    let mut made = Vec::new();
    let mut refused = Vec::new();
    for r in futures::future::join_all(calls).await {
        match r.unwrap() {
            Ok(id) => made.push(id),
            Err(s) => refused.push(s),
        }
    }
    made.sort();
    (made, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_concurrent_creates_reload_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_with_tenants(dir.path(), 3).await;
    let carol = Tenant::new(&env, CAROL);
    let mut alice = Tenant::new(&env, ALICE);
    alice.create("alices-1").await;
    // A tenant's sandbox with a TTL: the sweep of its namespace deletes it, across a restart.
    let short = pb::CreateSandboxRequest {
        ttl: Some(prost_types::Duration {
            seconds: 4,
            nanos: 0,
        }),
        ..alice.request("short")
    };
    alice.try_create(short).await.unwrap();

    // 20 at once against max_sandboxes = 3: exactly 3 are made.
    let (made, refused) = create_at_once(&carol, "c", 20).await;
    assert_eq!(made.len(), 3, "made {made:?}, refused {refused:?}");
    assert_eq!(refused.len(), 17, "{refused:?}");
    for s in &refused {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(
            s.message()
                .contains("tenant carol has max_sandboxes = 3 and uses 3"),
            "{s:?}"
        );
    }
    let mut carol = carol;
    assert_eq!(carol.list().await, made);

    // sandboxd restarts: the sandboxes are still carol's (and only hers), and still count.
    env.sandboxd.restart().await;
    assert_eq!(carol.list().await, made);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alice.get("short").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "alice's sandbox outlived its ttl"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(alice.list().await, ["alices-1"]);
    assert_eq!(carol.sh(&made[0], "echo still").await.unwrap(), "still\n");
    let again = carol.create_refused("c-after-restart").await;
    assert!(again.message().contains("uses 3"), "{again:?}");

    // A higher quota in the tenants file applies without a restart.
    tenants_file(dir.path(), 4);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = carol.request("c-after-reload");
        match carol.try_create(r).await {
            Ok(_) => break,
            Err(s)
                if s.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("the raised quota did not apply: {s:?}"),
        }
    }
    let fifth = carol.create_refused("c-fifth").await;
    assert!(
        fifth.message().contains("max_sandboxes = 4 and uses 4"),
        "{fifth:?}"
    );

    // A delete frees a place at once.
    carol.delete(&made[0]).await.unwrap();
    carol.create("c-in-the-freed-place").await;
    for id in carol.list().await {
        carol.delete(&id).await.unwrap();
    }
    alice.delete("alices-1").await.unwrap();
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_cpu_quotas_count_the_limits_that_apply() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_with_tenants(dir.path(), 3).await;
    let mut dave = Tenant::new(&env, DAVE);
    let sized = |t: &Tenant, id: &str, cpu: i64, mem: i64| pb::CreateSandboxRequest {
        resources: Some(pb::Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            ..Default::default()
        }),
        ..t.request(id)
    };
    // With no limits asked for, the service's defaults (1 GiB) apply and count: over 256 MiB.
    let s = dave.create_refused_with(dave.request("d-default")).await;
    assert!(
        s.message()
            .contains("max_memory_bytes = 268435456 bytes and uses 0 bytes; this sandbox needs 1073741824 bytes more"),
        "{s:?}"
    );
    dave.try_create(sized(&dave, "d-1", 500, 128 << 20))
        .await
        .unwrap();
    let cpu = dave
        .create_refused_with(sized(&dave, "d-2", 600, 64 << 20))
        .await;
    assert!(
        cpu.message()
            .contains("max_cpu_millis = 1000 millicores and uses 500 millicores"),
        "{cpu:?}"
    );
    let mem = dave
        .create_refused_with(sized(&dave, "d-3", 100, 192 << 20))
        .await;
    assert!(
        mem.message()
            .contains("max_memory_bytes = 268435456 bytes and uses 134217728 bytes"),
        "{mem:?}"
    );
    // What fits exactly is made.
    dave.try_create(sized(&dave, "d-4", 500, 128 << 20))
        .await
        .unwrap();
    assert_eq!(dave.list().await, ["d-1", "d-4"]);
    for id in ["d-1", "d-4"] {
        dave.delete(id).await.unwrap();
    }
    env.leak_check().await;
}

impl Tenant {
    async fn create_refused(&mut self, id: &str) -> Status {
        let r = self.request(id);
        self.create_refused_with(r).await
    }

    async fn create_refused_with(&mut self, r: pb::CreateSandboxRequest) -> Status {
        let id = r.sandbox_id.clone();
        match self.try_create(r).await {
            Err(s) if s.code() == Code::ResourceExhausted => s,
            other => panic!("create {id}: expected RESOURCE_EXHAUSTED, got {other:?}"),
        }
    }
}

#[test]
fn bridge_sandboxes_of_one_id_in_two_tenants_get_networks_of_their_own() {
    common::netns::run_in_netns(
        "bridge_sandboxes_of_one_id_in_two_tenants_get_networks_of_their_own",
        || async {
            let dir = tempfile::tempdir().unwrap();
            let file = tenants_file(dir.path(), 100);
            let n = common::bridge::NetEnv::start(&["--tenants", file.to_str().unwrap()]).await;
            let mut alice = Tenant::new(&n.env, ALICE);
            let mut bob = Tenant::new(&n.env, BOB);
            let forwarded = |t: &Tenant, id: &str, host_port: u32| pb::CreateSandboxRequest {
                network: Some(pb::NetworkSpec {
                    ports: vec![pb::PortMapping {
                        host_port,
                        container_port: 8080,
                        protocol: pb::Protocol::Tcp as i32,
                        ..Default::default()
                    }],
                    ..common::bridge::bridge()
                }),
                ..t.request(id)
            };
            let a = alice
                .try_create(forwarded(&alice, "net-1", 28090))
                .await
                .unwrap();
            // bob's sandbox of the same id cannot take alice's host port, and is not told
            // whose it is.
            let clash = bob
                .try_create(forwarded(&bob, "net-1", 28090))
                .await
                .unwrap_err();
            assert_eq!(clash.code(), Code::FailedPrecondition, "{clash:?}");
            assert!(
                clash.message().contains("another sandbox") && !clash.message().contains("net-1"),
                "{clash:?}"
            );
            let b = bob
                .try_create(forwarded(&bob, "net-1", 28091))
                .await
                .unwrap();
            let (a_ip, b_ip) = (a.network.unwrap().ip_address, b.network.unwrap().ip_address);
            assert_ne!(a_ip, b_ip);
            assert!(alice
                .sh("net-1", "ip -4 -o addr show dev eth0")
                .await
                .unwrap()
                .contains(&format!("{a_ip}/")));
            assert!(bob
                .sh("net-1", "ip -4 -o addr show dev eth0")
                .await
                .unwrap()
                .contains(&format!("{b_ip}/")));
            let mut files = n.netns_files();
            files.sort();
            assert_eq!(files.len(), 2, "{files:?}");
            assert!(files.iter().all(|f| f.ends_with(".net-1")), "{files:?}");
            assert_eq!(n.leased_ips().len(), 2);

            // bob's delete takes only his network; a restart's recovery keeps alice's.
            bob.delete("net-1").await.unwrap();
            assert_eq!(n.netns_files().len(), 1);
            assert_eq!(n.leased_ips(), std::slice::from_ref(&a_ip));
            n.env.sandboxd.restart().await;
            assert_eq!(n.netns_files().len(), 1);
            assert!(alice
                .sh("net-1", "ip -4 -o addr show dev eth0")
                .await
                .unwrap()
                .contains(&format!("{a_ip}/")));
            // A tenant's PID 1 that exits by itself loses its network: the exit watcher of
            // alice's namespace (started by the restarted sandboxd's recovery) sees it.
            let brief = pb::CreateSandboxRequest {
                network: Some(common::bridge::bridge()),
                command: vec!["sleep".into(), "1".into()],
                ..alice.request("brief")
            };
            alice.try_create(brief).await.unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                let sb = alice.get("brief").await.unwrap();
                let attached = n.netns_files().iter().any(|f| f.ends_with(".brief"));
                let addressed = sb
                    .network
                    .as_ref()
                    .is_some_and(|net| !net.ip_address.is_empty());
                if sb.state == pb::SandboxState::Stopped as i32 && !attached && !addressed {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "alice's exited sandbox kept its network: {sb:?} {:?}",
                    n.netns_files()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            alice.delete("brief").await.unwrap();
            alice.delete("net-1").await.unwrap();
            assert!(n.netns_files().is_empty());
            assert!(n.leased_ips().is_empty());
            n.env.leak_check().await;
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_in_a_tenant_undoes_itself_there_and_gives_its_quota_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = tenants_file(dir.path(), 1);
    let env = TestEnv::with_args(&[
        "--tenants",
        file.to_str().unwrap(),
        "--failpoints",
        "create.start",
    ])
    .await;
    let mut carol = Tenant::new(&env, CAROL);
    // The start fails after the snapshot, the container and the task were made in carol's
    // namespace: all of it is undone, and her one place is free again each time.
    for attempt in 0..2 {
        let r = carol.request("never");
        let e = carol.try_create(r).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "attempt {attempt}: {e:?}");
        assert!(e.message().contains("create.start"), "{e:?}");
        assert_not_found("GetSandbox", carol.get("never").await);
        env.leak_check().await;
    }
    // A sandbox that is not started takes the place.
    let created_only = pb::CreateSandboxRequest {
        start: Some(false),
        ..carol.request("idle-1")
    };
    carol.try_create(created_only).await.unwrap();
    let full = carol.create_refused("idle-2").await;
    assert!(
        full.message().contains("max_sandboxes = 1 and uses 1"),
        "{full:?}"
    );
    carol.delete("idle-1").await.unwrap();
    env.leak_check().await;
}
