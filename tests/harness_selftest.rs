//! Pins the test harness itself (tests/common) without sandboxd's server: containerd, the
//! registry, the offline busybox image and the cleanup guarantees every other test relies on.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::host::{self, CgroupParent};
use common::image::{self, LayoutInfo};
use common::registry::http_get_status;
use common::{Containerd, Registry};
use containerd_client::services::v1::version_client::VersionClient;
use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};

/// The namespace the ctr-driven checks use.
const NS: &str = "harness";

/// Runs `ctr run flags...` with runc state, FIFOs and the cgroup inside the test's own places;
/// returns its stdout.
fn ctr_run(containerd: &Containerd, cgroup: &CgroupParent, id: &str, flags: &[&str]) -> String {
    let dir = containerd.dir();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--runc-root".into(),
        dir.join("runc").to_string_lossy().into_owned(),
        "--fifo-dir".into(),
        dir.join("fifo").to_string_lossy().into_owned(),
        "--cgroup".into(),
        format!("{}/{id}", cgroup.path()),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    containerd.ctr_ok(NS, &args)
}

/// Starts busybox `sleep 1000` from `reference` as container `id`, detached with no I/O.
fn run_sleeper(containerd: &Containerd, cgroup: &CgroupParent, reference: &str, id: &str) {
    ctr_run(
        containerd,
        cgroup,
        id,
        &["-d", "--null-io", reference, id, "sleep", "1000"],
    );
}

/// Pushes `layout` as `name_tag` and pulls it into `containerd`; returns the reference.
fn push_and_pull(
    registry: &Registry,
    containerd: &Containerd,
    layout: &Path,
    name_tag: &str,
) -> String {
    registry.push(layout, name_tag);
    let reference = format!("{}/{name_tag}", registry.addr());
    containerd.ctr_ok(NS, &["images", "pull", "--plain-http", &reference]);
    reference
}

/// Pushes the busybox layout as `busybox:latest` and pulls it into `containerd`; returns the
/// reference.
fn pull_busybox(registry: &Registry, containerd: &Containerd) -> String {
    push_and_pull(
        registry,
        containerd,
        &image::busybox_layout(),
        "busybox:latest",
    )
}

/// The pid of task `id` according to `ctr task ls`.
fn task_pid(containerd: &Containerd, id: &str) -> i32 {
    let listing = containerd.ctr_ok(NS, &["task", "ls"]);
    listing
        .lines()
        .skip(1)
        .find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next() == Some(id)).then(|| cols.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("task {id} not in ctr task ls:\n{listing}"))
}

/// Asserts nothing of a fixture directory survived: no process names it, nothing is mounted
/// below it, and it is gone.
fn assert_fully_cleaned(dir: &Path) {
    let dir_str = dir.to_string_lossy();
    let procs = host::pids_mentioning(&dir_str);
    assert!(
        procs.is_empty(),
        "processes still mention {dir_str}: {procs:?}"
    );
    let mounts = host::mounts_under(dir);
    assert!(mounts.is_empty(), "mounts left under {dir_str}: {mounts:?}");
    assert!(!dir.exists(), "{dir_str} still exists");
}

#[tokio::test]
async fn containerd_starts_and_answers_version() {
    let containerd = Containerd::start().await;
    let version = VersionClient::new(containerd.channel().await)
        .version(())
        .await
        .expect("Version RPC")
        .into_inner();
    assert!(
        version.version.contains("1."),
        "unexpected containerd version {version:?}"
    );
    assert!(containerd.address().starts_with(containerd.dir()));
}

#[tokio::test]
async fn containerd_restarts_on_the_same_state_after_kill() {
    let containerd = Containerd::start().await;
    let layout = image::busybox_layout();
    let registry = Registry::start();
    let reference = push_and_pull(&registry, &containerd, &layout, "busybox:latest");

    containerd.kill();
    assert_eq!(containerd.pid(), None);
    assert!(
        containerd.ctr(NS, &["version"]).status.code() != Some(0),
        "ctr still reaches a killed containerd"
    );

    containerd.restart().await;
    let images = containerd.ctr_ok(NS, &["images", "ls", "-q"]);
    assert!(
        images.lines().any(|l| l == reference),
        "image {reference} lost across restart; images:\n{images}"
    );
}

#[test]
fn registry_serves_v2_on_loopback() {
    let registry = Registry::start();
    let addr = registry.addr();
    assert!(addr.starts_with("127.0.0.1:"), "registry address {addr}");
    let status = http_get_status(addr.parse().expect("registry addr parses"), "/v2/");
    assert_eq!(status, Some(200));
}

#[test]
fn busybox_layout_has_exact_digests_sizes_and_diff_ids() {
    let layout = image::busybox_layout();
    let info = LayoutInfo::read(&layout);
    assert_eq!(info.layer_digests.len(), 1);
    assert_eq!(info.diff_ids.len(), 1);

    // Every blob is named by its content's digest.
    let blobs = layout.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).expect("list blobs") {
        let path = entry.expect("blob entry").path();
        let bytes = std::fs::read(&path).expect("read blob");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("blob name");
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            name,
            "blob {}",
            path.display()
        );
    }

    // Descriptor sizes are the blobs' sizes.
    let blob = |digest: &str| blobs.join(digest.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&info.manifest_digest)).expect("manifest"))
            .expect("manifest is JSON");
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(manifest["schemaVersion"], 2);
    let descriptors =
        std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().expect("layers"));
    for d in descriptors {
        let digest = d["digest"].as_str().expect("digest");
        let size = std::fs::metadata(blob(digest)).expect("blob exists").len();
        assert_eq!(d["size"].as_u64(), Some(size), "size of {digest}");
    }

    // The diff ID is the digest of the uncompressed tar.
    let mut tar_bytes = Vec::new();
    GzDecoder::new(std::fs::File::open(blob(&info.layer_digests[0])).expect("layer blob"))
        .read_to_end(&mut tar_bytes)
        .expect("gunzip layer");
    assert_eq!(image::sha256_digest(&tar_bytes), info.diff_ids[0]);

    // The tar holds busybox, its applets, the skeleton directories and users.
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut seen = std::collections::HashMap::new();
    for entry in archive.entries().expect("tar entries") {
        let entry = entry.expect("tar entry");
        let path = entry
            .path()
            .expect("entry path")
            .to_string_lossy()
            .into_owned();
        let link = entry
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned());
        seen.insert(
            path.trim_end_matches('/').to_owned(),
            (entry.header().mode().expect("mode"), link),
        );
    }
    assert_eq!(seen["bin/busybox"].0 & 0o7777, 0o755);
    assert_eq!(seen["bin/sh"].1.as_deref(), Some("busybox"));
    assert_eq!(seen["tmp"].0 & 0o7777, 0o1777);
    for dir in [
        "etc",
        "root",
        "proc",
        "sys",
        "dev",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(seen.contains_key(dir), "{dir} missing from the layer");
    }

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&info.config_digest)).expect("config"))
            .expect("config is JSON");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Cmd"][0], "sh");
    assert_eq!(config["history"].as_array().map(Vec::len), Some(1));
}

#[test]
fn layouts_are_cached_by_content() {
    let first = image::busybox_layout();
    let again = image::busybox_layout();
    assert_eq!(first, again);
    assert!(first.starts_with(image::image_cache_dir()));

    let a = image::build_layout_with(&[("/etc/motd", b"a")]);
    let b = image::build_layout_with(&[("/etc/motd", b"b")]);
    assert_ne!(a, b, "different extra files must give different layouts");
    let (info_a, info_b) = (LayoutInfo::read(&a), LayoutInfo::read(&b));
    assert_eq!(
        info_a.layer_digests[0], info_b.layer_digests[0],
        "base layer is shared"
    );
    assert_ne!(info_a.layer_digests[1], info_b.layer_digests[1]);
    assert_eq!(info_a.chain_ids()[0], info_a.diff_ids[0]);
}

#[tokio::test]
async fn busybox_image_pulls_from_the_registry_and_runs() {
    let containerd = Containerd::start().await;
    let registry = Registry::start();
    let cgroup = CgroupParent::new();
    let reference = pull_busybox(&registry, &containerd);

    let out = ctr_run(
        &containerd,
        &cgroup,
        "t1",
        &["--rm", &reference, "t1", "/bin/echo", "hello"],
    );
    assert_eq!(out.trim(), "hello");
}

#[tokio::test]
async fn extra_layer_files_are_visible_and_snapshots_follow_chain_ids() {
    let containerd = Containerd::start().await;
    let registry = Registry::start();
    let cgroup = CgroupParent::new();
    let layout = image::build_layout_with(&[
        ("/data/greeting.txt", b"hi from layer 2\n"),
        (
            "/usr/local/bin/greet",
            b"#!/bin/sh\ncat /data/greeting.txt\n",
        ),
    ]);
    let reference = push_and_pull(&registry, &containerd, &layout, "layered:v1");

    let out = ctr_run(
        &containerd,
        &cgroup,
        "t1",
        &["--rm", &reference, "t1", "greet"],
    );
    assert_eq!(out, "hi from layer 2\n");

    let info = LayoutInfo::read(&layout);
    assert_eq!(info.diff_ids.len(), 2);
    let snapshots = containerd.ctr_ok(NS, &["snapshots", "ls"]);
    for chain_id in info.chain_ids() {
        assert!(
            snapshots
                .lines()
                .any(|l| l.starts_with(&chain_id) && l.contains("Committed")),
            "no committed snapshot {chain_id}:\n{snapshots}"
        );
    }
}

#[tokio::test]
async fn leaks_lists_what_a_namespace_still_holds() {
    let containerd = Containerd::start().await;
    let registry = Registry::start();
    let cgroup = CgroupParent::new();
    let reference = pull_busybox(&registry, &containerd);
    assert!(
        containerd.leaks(NS).await.is_empty(),
        "a pulled image is not a leak"
    );

    run_sleeper(&containerd, &cgroup, &reference, "t2");
    let leaks = containerd.leaks(NS).await;
    assert_eq!(leaks.containers, vec!["t2".to_owned()]);
    assert_eq!(leaks.tasks.len(), 1, "{leaks}");
    assert_eq!(leaks.active_snapshots, vec!["t2".to_owned()]);
    assert_eq!(
        cgroup.leftovers().len(),
        cgroup.dirs().len(),
        "one t2 dir per hierarchy"
    );

    containerd.ctr_ok(NS, &["task", "kill", "-s", "SIGKILL", "t2"]);
    // `task rm` refuses a task until its exit has been recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !containerd.ctr(NS, &["task", "rm", "t2"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "task t2 would not go away"
        );
        tokio::time::sleep(host::POLL_INTERVAL).await;
    }
    containerd.ctr_ok(NS, &["containers", "rm", "t2"]);
    let leaks = containerd.leaks(NS).await;
    assert!(leaks.is_empty(), "{leaks}");
    assert!(
        cgroup.leftovers().is_empty(),
        "runc removes the container's cgroup"
    );
}

#[tokio::test]
async fn drop_kills_shims_and_containers_and_unmounts_everything() {
    let registry = Registry::start();
    let containerd = Containerd::start().await;
    let cgroup = CgroupParent::new();
    let reference = pull_busybox(&registry, &containerd);
    run_sleeper(&containerd, &cgroup, &reference, "t3");

    let dir: PathBuf = containerd.dir().to_path_buf();
    let shims = containerd.shim_pids();
    let task = task_pid(&containerd, "t3");
    assert_eq!(shims.len(), 1, "one shim for one container");
    assert!(host::is_alive(task));
    assert!(
        !host::mounts_under(&dir).is_empty(),
        "the running container's rootfs is mounted"
    );
    let cgroup_dirs = cgroup.dirs();
    assert!(!cgroup_dirs.is_empty(), "runc made the cgroup parent");

    drop(containerd);
    assert!(!host::is_alive(task), "container process survived");
    assert!(shims.iter().all(|&p| !host::is_alive(p)), "shim survived");
    assert_fully_cleaned(&dir);

    drop(cgroup);
    for d in cgroup_dirs {
        assert!(!d.exists(), "cgroup {} survived", d.display());
    }
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build runtime");
        runtime.block_on(async {
            let containerd = Containerd::start().await;
            let cgroup = CgroupParent::new();
            let registry = Registry::start();
            let reference = pull_busybox(&registry, &containerd);
            run_sleeper(&containerd, &cgroup, &reference, "t4");
            let task = task_pid(&containerd, "t4");
            tx.send((containerd.dir().to_path_buf(), task, cgroup.dirs()))
                .expect("send fixture facts");
            panic!("deliberate panic with fixtures alive");
        })
    })
    .join();
    assert!(outcome.is_err(), "the fixture thread should have panicked");

    let (dir, task, cgroup_dirs) = rx.recv().expect("fixture facts");
    assert!(
        !host::is_alive(task),
        "container process survived the panic"
    );
    assert_fully_cleaned(&dir);
    for d in cgroup_dirs {
        assert!(!d.exists(), "cgroup {} survived the panic", d.display());
    }
}
