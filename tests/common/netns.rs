//! Running a test inside a network namespace of its own, so that the bridges, veths, addresses,
//! routes, iptables rules and sysctls it makes (through sandboxd and the CNI plugins) live and
//! die with that namespace and never touch the host's network.
//!
//! [`run_in_netns`] re-executes the test binary, filtered to the one test, under
//! `ip netns exec`. That also gives the child a private mount namespace (so namespace bind
//! mounts cannot outlive it) with a fresh /sys; the child mounts the host's cgroup hierarchies
//! there again so that containerd and runc work as they do outside.

use std::future::Future;
use std::path::Path;
use std::process::Command;

/// Set in the re-executed child: the name of the namespace it runs in.
const INNER_ENV: &str = "SANDBOXD_TEST_NETNS";

/// Runs `body` inside a new network namespace named after the test. `test_name` must be the
/// test function's name (it is passed to `--exact`).
pub fn run_in_netns<F: Future<Output = ()>>(test_name: &str, body: impl FnOnce() -> F) {
    if let Ok(name) = std::env::var(INNER_ENV) {
        assert_inside(&name);
        remount_cgroups();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
        // Fixtures' drops ran inside block_on's future; the runtime goes last.
        drop(rt);
        return;
    }
    let name = super::host::unique_name("sbxt");
    let ns = TestNamespace::add(&name);
    run(
        "ip",
        &["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
    );
    let status = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, &name)
        .status()
        .expect("running the test inside its namespace");
    drop(ns);
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "test namespace {name} was not deleted"
    );
    assert!(
        status.success(),
        "the test body failed inside {name}: {status}"
    );
}

/// Refuses to go on unless this process really is inside the namespace made for it.
fn assert_inside(name: &str) {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata(Path::new("/run/netns").join(name)).unwrap();
    let current = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_eq!(
        (ours.dev(), ours.ino()),
        (current.dev(), current.ino()),
        "not inside the test network namespace {name}"
    );
}

/// `ip netns exec` replaced /sys with a sysfs of the new namespace, without the cgroup
/// mounts below it: mount the same hierarchies (v1, hybrid or v2) again, as PID 1 sees them.
fn remount_cgroups() {
    use nix::mount::{mount, MsFlags};
    let mountinfo = std::fs::read_to_string("/proc/1/mountinfo").unwrap();
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let fields: Vec<&str> = left.split(' ').collect();
        let (root, point) = (fields[3], fields[4]);
        if !point.starts_with("/sys/fs/cgroup") || root != "/" {
            continue;
        }
        let mut r = right.split(' ');
        let (fstype, source, opts) = (r.next().unwrap(), r.next().unwrap(), r.next().unwrap());
        if !matches!(fstype, "tmpfs" | "cgroup" | "cgroup2") {
            continue;
        }
        let data: Vec<&str> = opts
            .split(',')
            .filter(|o| *o != "rw" && *o != "ro")
            .collect();
        std::fs::create_dir_all(point).unwrap();
        mount(
            Some(source),
            point,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(data.join(",").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting {fstype} at {point}: {e}"));
    }
}

/// A network namespace of the test's own, deleted on drop (so also when the test fails).
pub struct TestNamespace(String);

impl TestNamespace {
    /// `ip netns add name`.
    pub fn add(name: &str) -> Self {
        run("ip", &["netns", "add", name]);
        TestNamespace(name.to_owned())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip netns exec <name> cmd args...`, panicking on failure; returns stdout.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.0, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let status = Command::new("ip").args(["netns", "del", &self.0]).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("deleting test namespace {} failed: {status:?}", self.0);
        }
    }
}

/// Runs `cmd args...`, panicking with its stderr on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
