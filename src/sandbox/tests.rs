//! The domain's rules against the in-memory backend: what a create makes and how its failures
//! undo it, lifecycle decisions, the TTL reaper and what recovery removes. No containerd: each
//! test runs in milliseconds. The integration tests (tests/) hold the same rules against a real
//! containerd and runc.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::model::*;
use super::record::{L_EXPIRES, L_MANAGED, L_SNAPSHOT_OWNER};
use super::{Manager, ManagerConfig};
use crate::config::{Config, ServeArgs};
use crate::error::Error;
use crate::image::ImageRef;
use crate::net::Network;
use crate::runtime::fake::Fake;
use crate::runtime::{Descriptor, ImageRecord, SnapshotInfo, TaskState};
use crate::tenants::Quotas;

/// A tenant without quotas, as every caller is when none are configured.
const NO_QUOTAS: Quotas = Quotas {
    max_sandboxes: None,
    max_memory_bytes: None,
    max_cpu_millis: None,
};

const IMAGE: &str = "docker.io/library/busybox:latest";
/// The test image's only layer: its chain id is its diff id.
const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A manager on a fresh fake, with its data dir (and an idle init file) in a temp dir.
struct Fixture {
    fake: Arc<Fake>,
    manager: Arc<Manager>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        add_image(&fake);
        let manager = Self::manager(fake.clone(), dir.path());
        Fixture { fake, manager, dir }
    }

    /// A second manager on the same backend and data dir: sandboxd after a restart.
    fn new_on(fake: Arc<Fake>, dir: &tempfile::TempDir) -> Fixture {
        let manager = Self::manager(fake.clone(), dir.path());
        let dir = tempfile::tempdir_in(dir.path()).expect("temp dir");
        Fixture { fake, manager, dir }
    }

    fn manager(fake: Arc<Fake>, dir: &std::path::Path) -> Arc<Manager> {
        let mut config = Config::resolve(&ServeArgs::default(), &|_| None).expect("config");
        config.data_dir = dir.join("data");
        config.idle_init = dir.join("catatonit");
        std::fs::write(&config.idle_init, b"").expect("idle init");
        config.network.netns_dir = dir.join("netns");
        config.network.instance = format!("unit-{}", crate::util::random_hex(4));
        Manager::new(
            fake,
            ManagerConfig::from(&config),
            Network::new(config.network.clone()),
            Arc::new(super::Unobserved),
        )
    }

    fn files_dir(&self, id: &str) -> std::path::PathBuf {
        self.dir.path().join("data/sandboxes").join(id)
    }
}

/// Stores busybox's records as a pull would: config, manifest, image record, one layer.
fn add_image(fake: &Fake) {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [LAYER]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = fake.add_blob(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::MEDIA_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": LAYER, "size": 1}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = fake.add_blob(&manifest);
    fake.add_image(ImageRecord {
        name: IMAGE.into(),
        target: Descriptor {
            media_type: crate::image::MEDIA_OCI_MANIFEST.into(),
            digest: manifest_digest,
            size: manifest.len() as i64,
            annotations: HashMap::new(),
        },
        labels: HashMap::new(),
        created_at: None,
    });
    fake.add_layer(LAYER);
}

fn spec(id: &str) -> CreateSpec {
    CreateSpec {
        id: SandboxId::parse("sandbox_id", id).unwrap(),
        id_generated: false,
        source: Source::Image(ImageRef::parse("image", "busybox").unwrap()),
        command: vec![],
        env: Default::default(),
        working_dir: None,
        user: None,
        hostname: id.to_string(),
        labels: HashMap::from([("team".to_string(), "a".to_string())]),
        resources: Resources::default(),
        network: NetworkMode::None,
        net_policy: Default::default(),
        start: true,
        ttl: None,
        pool: None,
        request: None,
    }
}

fn id(s: &str) -> SandboxId {
    SandboxId::parse("sandbox_id", s).unwrap()
}

/// The position of the first call of `op` on `id` in the fake's log.
fn position(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("{call} was never called: {calls:?}"))
}

#[tokio::test]
async fn create_records_the_sandbox_in_labels_and_starts_it() {
    let f = Fixture::new();
    let sandbox = f
        .manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    assert_eq!(sandbox.state, State::Running);
    assert_eq!(sandbox.image, IMAGE);
    assert_eq!(sandbox.labels.get("team").map(String::as_str), Some("a"));
    assert!(sandbox.pid > 0);
    assert_eq!(f.fake.container_ids(), vec!["box-1"]);
    // The writable snapshot is on the image's top layer and names its owner.
    let snapshots = f.fake.snapshot_names();
    let rw: Vec<_> = snapshots.iter().filter(|n| n.as_str() != LAYER).collect();
    assert_eq!(rw.len(), 1, "{snapshots:?}");
    assert!(rw[0].starts_with("sandboxd-rw-box-1-"));
    assert_eq!(f.fake.open_leases(), 0, "the create lease is released");
    assert!(f.files_dir("box-1").join("resolv.conf").is_file());
    // The same sandbox is read back from its record alone.
    let again = f.manager.get(&id("box-1")).await.unwrap();
    assert_eq!(again.labels, sandbox.labels);
    assert_eq!(again.hostname, "box-1");
}

#[tokio::test]
async fn a_failed_start_undoes_the_create_in_reverse_order() {
    let f = Fixture::new();
    f.fake.fail("tasks.start");
    let err = f
        .manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(f.fake.container_ids().is_empty());
    assert_eq!(f.fake.snapshot_names(), vec![LAYER.to_string()]);
    assert_eq!(f.fake.open_leases(), 0);
    assert!(!f.files_dir("box-1").exists());
    let calls = f.fake.calls();
    let created = position(&calls, "containers.create box-1");
    let task_deleted = position(&calls, "tasks.delete box-1");
    let container_deleted = position(&calls, "containers.delete box-1");
    assert!(
        created < task_deleted && task_deleted < container_deleted,
        "{calls:?}"
    );
    let snapshot_removed = calls
        .iter()
        .position(|c| c.starts_with("snapshots.remove sandboxd-rw-box-1-"))
        .expect("the writable snapshot is removed");
    assert!(snapshot_removed < container_deleted, "{calls:?}");
}

#[tokio::test]
async fn a_failed_container_create_removes_the_prepared_snapshot() {
    let f = Fixture::new();
    f.fake.fail("containers.create");
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap_err();
    assert!(f.fake.container_ids().is_empty());
    assert_eq!(f.fake.snapshot_names(), vec![LAYER.to_string()]);
    assert!(!f.files_dir("box-1").exists());
    assert!(!f.fake.calls().iter().any(|c| c.starts_with("tasks.create")));
}

#[tokio::test]
async fn creating_an_existing_id_is_already_exists_and_leaves_it_alone() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let before = f.fake.snapshot_names();
    let err = f
        .manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert_eq!(f.fake.snapshot_names(), before);
    let sandbox = f.manager.get(&id("box-1")).await.unwrap();
    assert_eq!(sandbox.state, State::Running);
}

#[tokio::test]
async fn a_created_but_not_started_sandbox_has_no_task() {
    let f = Fixture::new();
    let mut s = spec("box-1");
    s.start = false;
    let sandbox = f.manager.create(s, &NO_QUOTAS, None).await.unwrap();
    assert_eq!(sandbox.state, State::Created);
    assert!(!f.fake.calls().iter().any(|c| c.starts_with("tasks.create")));
}

#[tokio::test]
async fn stop_records_the_exit_and_start_runs_it_again() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let stopped = f
        .manager
        .stop(id("box-1"), libc::SIGTERM, Duration::from_millis(50), true)
        .await
        .unwrap();
    assert_eq!(stopped.state, State::Stopped);
    assert_eq!(stopped.exit_status, Some(137));
    assert!(stopped.exited_at.is_some());
    let started = f.manager.start(id("box-1")).await.unwrap();
    assert_eq!(started.state, State::Running);
    assert_eq!(started.exit_status, None);
}

#[tokio::test]
async fn a_task_in_unknown_state_is_never_taken_for_an_exited_one() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    f.fake.set_task_state("box-1", TaskState::Unknown);
    let err = f.manager.start(id("box-1")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        !f.fake.calls().iter().any(|c| c == "tasks.delete box-1"),
        "the task of a sandbox in UNKNOWN state must not be deleted"
    );
    let err = f.manager.delete(id("box-1"), false).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
}

#[tokio::test]
async fn delete_of_a_running_sandbox_needs_force_and_then_removes_everything() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let err = f.manager.delete(id("box-1"), false).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(f.fake.container_ids(), vec!["box-1"]);
    f.manager.delete(id("box-1"), true).await.unwrap();
    assert!(f.fake.container_ids().is_empty());
    assert_eq!(f.fake.snapshot_names(), vec![LAYER.to_string()]);
    assert!(!f.files_dir("box-1").exists());
    let err = f.manager.get(&id("box-1")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn the_reaper_deletes_expired_sandboxes_only() {
    let f = Fixture::new();
    let mut expiring = spec("old-1");
    expiring.ttl = Some(Duration::ZERO);
    f.manager.create(expiring, &NO_QUOTAS, None).await.unwrap();
    let mut later = spec("later-1");
    later.ttl = Some(Duration::from_secs(3600));
    f.manager.create(later, &NO_QUOTAS, None).await.unwrap();
    f.manager
        .create(spec("forever-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let reaped = f.manager.reap_expired().await.unwrap();
    assert_eq!(reaped, 1);
    assert_eq!(f.fake.container_ids(), vec!["forever-1", "later-1"]);
}

#[tokio::test]
async fn recovery_removes_what_interrupted_operations_left() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let owned = |name: &str, owner: &str| SnapshotInfo {
        name: name.into(),
        parent: LAYER.into(),
        labels: HashMap::from([(L_SNAPSHOT_OWNER.to_string(), owner.to_string())]),
        committed: false,
    };
    // A create that died after its snapshot and before its container.
    f.fake
        .add_snapshot(owned("sandboxd-rw-gone-1-abcd", "gone-1"));
    // A pull or commit that died mid-unpack.
    f.fake.add_snapshot(SnapshotInfo {
        name: "sandboxd-unpack-0123".into(),
        parent: LAYER.into(),
        ..Default::default()
    });
    // Files of a sandbox whose container is gone.
    std::fs::create_dir_all(f.files_dir("gone-1")).unwrap();
    let before: Vec<String> = f
        .fake
        .snapshot_names()
        .into_iter()
        .filter(|n| n.starts_with("sandboxd-rw-box-1-"))
        .collect();
    f.manager.recover().await.unwrap();
    let mut expect = before;
    expect.push(LAYER.to_string());
    expect.sort();
    assert_eq!(f.fake.snapshot_names(), expect);
    assert!(!f.files_dir("gone-1").exists());
    assert!(f.files_dir("box-1").exists());
    let sandbox = f.manager.get(&id("box-1")).await.unwrap();
    assert_eq!(sandbox.state, State::Running);
}

#[tokio::test]
async fn records_carry_the_schema_that_recovery_and_the_reaper_read() {
    let f = Fixture::new();
    let mut s = spec("box-1");
    s.ttl = Some(Duration::from_secs(60));
    f.manager.create(s, &NO_QUOTAS, None).await.unwrap();
    let container = f
        .manager
        .backend()
        .container("box-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        container.labels.get(L_MANAGED).map(String::as_str),
        Some("true")
    );
    let expires = container.labels.get(L_EXPIRES).expect("expires-at label");
    assert!(crate::util::parse_rfc3339(expires).is_some());
}

#[tokio::test]
async fn recovery_rolls_back_a_create_whose_lease_is_still_open() {
    let f = Fixture::new();
    // A create that died after its container was written: its lease is still held.
    f.fake.fail("tasks.create");
    f.fake.fail("leases.delete");
    f.fake.fail("containers.delete");
    f.manager
        .create(spec("half-1"), &NO_QUOTAS, None)
        .await
        .unwrap_err();
    assert_eq!(f.fake.container_ids(), vec!["half-1"]);
    let fresh = Fixture::new_on(f.fake.clone(), &f.dir);
    f.fake.heal();
    f.manager
        .create(spec("whole-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    fresh.manager.recover().await.unwrap();
    assert_eq!(f.fake.container_ids(), vec!["whole-1"]);
    let err = fresh.manager.get(&id("half-1")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(
        fresh.manager.get(&id("whole-1")).await.unwrap().state,
        State::Running
    );
}

#[tokio::test]
async fn recovery_finishes_a_delete_that_removed_the_snapshot_only() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    f.fake.fail("containers.delete");
    f.manager.delete(id("box-1"), true).await.unwrap_err();
    assert_eq!(f.fake.container_ids(), vec!["box-1"]);
    f.fake.heal();
    f.manager.recover().await.unwrap();
    assert!(f.fake.container_ids().is_empty());
}

#[tokio::test]
async fn recovery_resumes_a_task_a_dead_commit_left_paused() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    f.fake.set_task_state("box-1", TaskState::Paused);
    f.manager.recover().await.unwrap();
    let sandbox = f.manager.get(&id("box-1")).await.unwrap();
    assert_eq!(sandbox.state, State::Running);
}

#[tokio::test]
async fn recovery_removes_a_dead_commits_view_and_unpack_snapshots() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    for key in ["sandboxd-view-aaaa", "sandboxd-unpack-bbbb"] {
        f.fake.add_snapshot(SnapshotInfo {
            name: key.into(),
            parent: LAYER.into(),
            ..Default::default()
        });
    }
    f.manager.recover().await.unwrap();
    let left: Vec<String> = f
        .fake
        .snapshot_names()
        .into_iter()
        .filter(|n| n.starts_with("sandboxd-view-") || n.starts_with("sandboxd-unpack-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn with_request(mut s: CreateSpec, id: &str, canonical: &str) -> CreateSpec {
    s.request = super::RequestKey::parse("request_id", id, canonical).unwrap();
    s
}

#[tokio::test]
async fn a_retried_create_returns_the_first_sandbox_and_makes_no_second() {
    let f = Fixture::new();
    // A generated id differs between the call and its retry: the request id ties them.
    let first = f
        .manager
        .create(
            with_request(spec("gen-aaaa"), "req-1", "create busybox"),
            &NO_QUOTAS,
            None,
        )
        .await
        .unwrap();
    let again = f
        .manager
        .create(
            with_request(spec("gen-bbbb"), "req-1", "create busybox"),
            &NO_QUOTAS,
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(f.fake.container_ids(), vec!["gen-aaaa"]);
    let err = f
        .manager
        .create(
            with_request(spec("gen-cccc"), "req-1", "create alpine"),
            &NO_QUOTAS,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    assert_eq!(f.fake.container_ids(), vec!["gen-aaaa"]);
}

#[tokio::test]
async fn concurrent_retries_of_one_create_make_one_sandbox() {
    let f = Fixture::new();
    let calls = (0..4).map(|i| {
        let manager = f.manager.clone();
        let s = with_request(spec(&format!("gen-{i}")), "req-1", "create busybox");
        tokio::spawn(async move { manager.create(s, &NO_QUOTAS, None).await })
    });
    let ids: std::collections::BTreeSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().id.to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(f.fake.container_ids().len(), 1);
}

#[tokio::test]
async fn a_retried_commit_returns_the_first_snapshot() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let key = |c: &str| super::RequestKey::parse("request_id", "commit-1", c).unwrap();
    let first = f
        .manager
        .commit_snapshot(id("box-1"), HashMap::new(), key("commit box-1"))
        .await
        .unwrap();
    let again = f
        .manager
        .commit_snapshot(id("box-1"), HashMap::new(), key("commit box-1"))
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    let (all, _) = f
        .manager
        .list_snapshots(None, &LabelSelector::default(), &Page::all())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let err = f
        .manager
        .commit_snapshot(id("box-1"), HashMap::new(), key("commit box-1 labelled"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
}

#[tokio::test]
async fn recovery_removes_exec_scratch_of_an_earlier_run_only() {
    let f = Fixture::new();
    let exec = f.dir.path().join("data/exec");
    let (old, new) = (exec.join("box-1-exec-old"), exec.join("box-1-exec-new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(&old)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    f.manager.recover().await.unwrap();
    assert!(!old.exists(), "a dead run's FIFO directory is removed");
    assert!(new.exists(), "this run's FIFO directory is left alone");
}

#[tokio::test]
async fn recovery_abandons_content_writes_of_an_earlier_run_only() {
    let f = Fixture::new();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    f.fake.add_ingest("sandboxd-sha256-dead-0001", hour_ago);
    f.fake.add_ingest(
        "sandboxd-sha256-live-0002",
        std::time::SystemTime::now() + Duration::from_secs(1),
    );
    f.manager.recover().await.unwrap();
    assert_eq!(
        f.fake.ingest_refs(),
        ["sandboxd-sha256-live-0002"],
        "only the earlier run's write is abandoned"
    );
}

#[tokio::test]
async fn a_commit_tries_a_busy_freezer_again_then_answers_unavailable() {
    let f = Fixture::new();
    f.manager
        .create(spec("box-1"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let pauses = |f: &Fixture| {
        f.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with("tasks.pause"))
            .count()
    };
    // Two transient failures: the third try freezes and the commit succeeds.
    f.fake.fail_transiently("tasks.pause", 2);
    f.manager
        .commit_snapshot(id("box-1"), HashMap::new(), None)
        .await
        .unwrap();
    assert_eq!(pauses(&f), 3);
    // Never settling: UNAVAILABLE naming the sandbox, and the task is left running.
    f.fake.fail_transiently("tasks.pause", 100);
    let err = f
        .manager
        .commit_snapshot(id("box-1"), HashMap::new(), None)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("box-1"), "{err}");
    assert_eq!(pauses(&f), 3 + 4);
    let task = f.fake.task_state("box-1");
    assert_eq!(task, Some(TaskState::Running));
}

#[tokio::test]
async fn update_network_records_a_stopped_bridge_sandboxs_policy_and_refuses_none() {
    use crate::net::policy::Egress;
    let f = Fixture::new();
    // Made but not started: no network is attached, so only the record changes.
    let mut s = spec("br");
    s.network = NetworkMode::Bridge;
    s.start = false;
    f.manager.create(s, &NO_QUOTAS, None).await.unwrap();
    let sb = f
        .manager
        .update_network(id("br"), Egress::DenyAll)
        .await
        .unwrap();
    assert_eq!(sb.net_policy.unwrap().egress, Egress::DenyAll);
    // Read back from the container's record, as a restarted sandboxd would.
    let again = Fixture::new_on(f.fake.clone(), &f.dir);
    let kept = again.manager.get(&id("br")).await.unwrap();
    assert_eq!(kept.net_policy.unwrap().egress, Egress::DenyAll);

    f.manager
        .create(spec("plain"), &NO_QUOTAS, None)
        .await
        .unwrap();
    let err = f
        .manager
        .update_network(id("plain"), Egress::DenyAll)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    let err = f
        .manager
        .update_network(id("gone"), Egress::DenyAll)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn a_create_publishing_a_port_outside_the_range_makes_nothing() {
    use crate::net::cni::{PortMapping, Protocol};
    let f = Fixture::new();
    let mut s = spec("pub");
    s.network = NetworkMode::Bridge;
    s.net_policy.ports = vec![PortMapping {
        host_port: 80,
        container_port: 80,
        protocol: Protocol::Tcp,
        host_ip: None,
    }];
    let err = f.manager.create(s, &NO_QUOTAS, None).await.unwrap_err();
    match &err {
        Error::InvalidArgument { field, reason } => {
            assert_eq!(field, "network.ports[0].host_port");
            assert!(reason.contains("20000-29999"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(f.fake.container_ids().is_empty());
}
// ---- tenants and quotas ----

fn quotas(sandboxes: Option<u64>, memory: Option<u64>, cpu: Option<u64>) -> Quotas {
    Quotas {
        max_sandboxes: sandboxes,
        max_memory_bytes: memory,
        max_cpu_millis: cpu,
    }
}

fn is_exhausted(r: &Result<Sandbox, Error>) -> bool {
    matches!(r, Err(Error::ResourceExhausted(_)))
}

#[tokio::test]
async fn concurrent_creates_never_overshoot_max_sandboxes() {
    let f = Fixture::new();
    let q = quotas(Some(5), None, None);
    let calls = (0..20).map(|i| {
        let manager = f.manager.clone();
        let q = q.clone();
        tokio::spawn(async move { manager.create(spec(&format!("box-{i}")), &q, None).await })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let made = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter(|r| is_exhausted(r)).collect();
    assert_eq!(made, 5, "{results:?}");
    assert_eq!(refused.len(), 15, "{results:?}");
    let Err(e) = refused[0] else { unreachable!() };
    assert!(
        e.to_string().contains("max_sandboxes = 5 and uses 5"),
        "{e}"
    );
    assert_eq!(f.fake.container_ids().len(), 5);
    assert_eq!(f.manager.usage().await.unwrap().sandboxes, 5);
}

#[tokio::test]
async fn a_failed_create_gives_its_reservation_back() {
    let f = Fixture::new();
    let q = quotas(Some(1), None, None);
    f.fake.fail("tasks.start");
    f.manager.create(spec("box-1"), &q, None).await.unwrap_err();
    assert_eq!(f.manager.usage().await.unwrap(), Default::default());
    f.fake.heal();
    f.manager.create(spec("box-1"), &q, None).await.unwrap();
    let second = f.manager.create(spec("box-2"), &q, None).await;
    assert!(is_exhausted(&second), "{second:?}");
    // Deleting one frees its place.
    f.manager.delete(id("box-1"), true).await.unwrap();
    f.manager.create(spec("box-2"), &q, None).await.unwrap();
}

#[tokio::test]
async fn memory_and_cpu_quotas_count_the_limits_that_apply_defaults_included() {
    let f = Fixture::new();
    let gib = 1u64 << 30;
    // The default limits (1 GiB, 1000 millicores) apply to sandboxes that ask for none.
    let q = quotas(None, Some(2 * gib), None);
    f.manager.create(spec("box-1"), &q, None).await.unwrap();
    let mut small = spec("box-2");
    small.resources.memory_bytes = Some(512 << 20);
    f.manager.create(small, &q, None).await.unwrap();
    let third = f.manager.create(spec("box-3"), &q, None).await;
    let Err(e) = &third else { panic!("{third:?}") };
    assert!(
        e.to_string().contains(&format!(
            "max_memory_bytes = {} bytes and uses {} bytes",
            2 * gib,
            gib + (512 << 20)
        )),
        "{e}"
    );
    let mut tiny = spec("box-3");
    tiny.resources.memory_bytes = Some(512 << 20);
    f.manager.create(tiny, &q, None).await.unwrap();

    let q = quotas(None, None, Some(2500));
    let cpu = f.manager.create(spec("box-4"), &q, None).await;
    assert!(
        matches!(&cpu, Err(Error::ResourceExhausted(m)) if m.contains("max_cpu_millis = 2500 millicores and uses 3000 millicores")),
        "{cpu:?}"
    );
    assert_eq!(f.fake.container_ids().len(), 3);
}

#[tokio::test]
async fn use_is_counted_from_containerd_after_a_restart() {
    let f = Fixture::new();
    let none = quotas(None, None, None);
    f.manager.create(spec("box-1"), &none, None).await.unwrap();
    f.manager.create(spec("box-2"), &none, None).await.unwrap();
    let again = Fixture::new_on(f.fake.clone(), &f.dir);
    again.manager.recover().await.unwrap();
    let used = again.manager.usage().await.unwrap();
    assert_eq!(used.sandboxes, 2);
    assert_eq!(used.memory_bytes, 2 << 30);
    let third = again
        .manager
        .create(spec("box-3"), &quotas(Some(2), None, None), None)
        .await;
    assert!(is_exhausted(&third), "{third:?}");
}

/// The tenancy of fixture `f`, with tenant `name`'s manager and the test image in its
/// namespace.
async fn tenant(t: &Arc<super::Tenancy>, f: &Fixture, name: &str) -> Arc<Manager> {
    let tenant = crate::caller::Tenant::new(name).unwrap();
    let m = t.manager(&tenant).await.unwrap();
    let ns = super::Scope::of(&tenant, crate::runtime::fake::FAKE_NAMESPACE);
    add_image(
        &f.fake
            .space(ns.namespace())
            .expect("the tenant's namespace"),
    );
    m
}

#[tokio::test]
async fn tenants_see_only_their_own_sandboxes_and_may_share_ids() {
    let f = Fixture::new();
    let t = super::Tenancy::new(f.manager.clone(), None);
    let alice = tenant(&t, &f, "alice").await;
    let bob = tenant(&t, &f, "bob").await;
    alice.create(spec("box-1"), &NO_QUOTAS, None).await.unwrap();
    // Missing to everyone else, as if it did not exist.
    for other in [&bob, &f.manager] {
        let e = other.get(&id("box-1")).await.unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        let e = other.delete(id("box-1"), true).await.unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        let (listed, _) = other
            .list(&LabelSelector::default(), &Page::all())
            .await
            .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
    }
    // The same id in another tenant is another sandbox, on other host names.
    bob.create(spec("box-1"), &NO_QUOTAS, None).await.unwrap();
    assert_ne!(alice.host_key("box-1"), bob.host_key("box-1"));
    assert!(f
        .dir
        .path()
        .join("data/sandboxes")
        .join(alice.host_key("box-1"))
        .is_dir());
    assert!(f
        .dir
        .path()
        .join("data/sandboxes")
        .join(bob.host_key("box-1"))
        .is_dir());
    bob.delete(id("box-1"), true).await.unwrap();
    assert_eq!(alice.get(&id("box-1")).await.unwrap().state, State::Running);
    // A quota counts the tenant's own sandboxes only.
    assert_eq!(bob.usage().await.unwrap().sandboxes, 0);
    assert_eq!(alice.usage().await.unwrap().sandboxes, 1);
    assert!(f.fake.container_ids().is_empty());
}

#[tokio::test]
async fn a_restart_finds_every_tenants_namespace_and_recovery_keeps_the_others_files() {
    let f = Fixture::new();
    let t = super::Tenancy::new(f.manager.clone(), None);
    let alice = tenant(&t, &f, "alice").await;
    alice.create(spec("box-1"), &NO_QUOTAS, None).await.unwrap();
    f.manager
        .create(spec("box-2"), &NO_QUOTAS, None)
        .await
        .unwrap();
    // sandboxd restarts: a new default manager on the same containerd and data dir.
    let again = Fixture::new_on(f.fake.clone(), &f.dir);
    let t2 = super::Tenancy::new(again.manager.clone(), None);
    t2.recover().await.unwrap();
    let tenants: Vec<String> = t2
        .managers()
        .iter()
        .map(|m| m.tenant().to_string())
        .collect();
    assert_eq!(tenants, ["default", "alice"]);
    let alice2 = t2.managers()[1].clone();
    assert_eq!(
        alice2.get(&id("box-1")).await.unwrap().state,
        State::Running
    );
    // Neither tenant's recovery removed the other's files.
    let files = f.dir.path().join("data/sandboxes");
    assert!(files.join(alice.host_key("box-1")).is_dir());
    assert!(files.join("box-2").is_dir());
}
