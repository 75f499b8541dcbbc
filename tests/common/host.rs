//! Host-level helpers for the fixtures: prerequisites, /proc scans, signals, mounts and cgroups.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// PATH given to every daemon we start: the shim looks runc up on containerd's PATH.
pub const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Binaries the fixtures run; each comes from a Debian package that scripts/install-deps.sh installs.
const REQUIRED_BINARIES: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "runc",
    "docker-registry",
    "skopeo",
    "busybox",
    "catatonit",
];

/// How long cleanup waits for killed processes to vanish and cgroups to empty.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between two looks at something we wait for.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Panics unless we run as root and every binary the fixtures need is installed.
///
/// Checked once per test binary; the message names the script that installs what is missing.
pub fn require_prerequisites() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = CHECKED.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err(
                "sandboxd's integration tests must run as root: they start containerd, \
                        runc containers and cgroups (run them with sudo or in a root container)"
                    .to_owned(),
            );
        }
        let missing: Vec<&str> = REQUIRED_BINARIES
            .iter()
            .copied()
            .filter(|name| find_binary(name).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "missing test prerequisites: {}; run `scripts/install-deps.sh` as root \
                 (or `make deps`) to install them",
                missing.join(", ")
            ))
        }
    });
    if let Err(message) = verdict {
        panic!("{message}");
    }
}

/// Finds `name` on our PATH or on [`DAEMON_PATH`].
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(DAEMON_PATH.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
}

/// Like [`find_binary`], but panics with the install hint when it is missing.
pub fn binary(name: &str) -> PathBuf {
    find_binary(name).unwrap_or_else(|| {
        panic!("{name} not found: run `scripts/install-deps.sh` as root (or `make deps`)")
    })
}

/// A short name that no other fixture in this or another test process will pick.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.update(nanos.to_le_bytes());
    format!("{prefix}-{}", &hex::encode(hasher.finalize())[..10])
}

/// The last `max` bytes of a log file, for failure messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            let prefix = if start > 0 { "[...]\n" } else { "" };
            format!("{prefix}{}", String::from_utf8_lossy(&bytes[start..]))
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// One process as /proc shows it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Arguments, argv[0] first (empty for kernel threads and zombies).
    pub cmdline: Vec<String>,
}

/// Every live (non-zombie) process on the host except ourselves.
pub fn processes() -> Vec<ProcessInfo> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let (state, ppid) = stat_state_ppid(pid)?;
            if state == 'Z' || state == 'X' {
                return None;
            }
            let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = raw
                .split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            Some(ProcessInfo { pid, ppid, cmdline })
        })
        .collect()
}

/// State letter and parent pid from /proc/PID/stat (the command name may hold spaces and parens).
fn stat_state_ppid(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a process that has not exited yet (zombies count as exited).
pub fn is_alive(pid: i32) -> bool {
    matches!(stat_state_ppid(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// The files `pid` holds open that have no name: what `O_TMPFILE` makes (`/proc/PID/fd` shows
/// them as `DIR/#INODE (deleted)`).
pub fn anonymous_files(pid: u32) -> Vec<String> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.contains("/#") && target.ends_with(" (deleted)"))
        .collect()
}

/// Live processes any of whose arguments contains `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.cmdline.iter().any(|arg| arg.contains(needle)))
        .map(|p| p.pid)
        .collect()
}

/// `roots` plus all their live descendants.
pub fn process_trees(roots: &[i32]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in processes() {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: HashSet<i32> = HashSet::new();
    let mut stack: Vec<i32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if seen.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    seen.into_iter().collect()
}

/// SIGKILLs `roots` and all their descendants (thawing frozen cgroups first, since a frozen task
/// never handles SIGKILL), then waits until they are gone.
pub fn kill_process_trees(roots: &[i32]) {
    let pids = process_trees(roots);
    for &pid in &pids {
        thaw_cgroups_of(pid);
    }
    for &pid in &pids {
        // ESRCH only means it already exited.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait_gone(&pids);
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub fn send_signal(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// Waits until none of `pids` is alive; warns (without panicking inside a Drop) on timeout.
pub fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("test harness: processes {alive:?} survived SIGKILL");
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Thaws the freezer cgroup (v1) or cgroup.freeze (v2) that `pid` sits in, best effort.
fn thaw_cgroups_of(pid: i32) {
    let Ok(table) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return;
    };
    for line in table.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            let _ = fs::write(
                Path::new("/sys/fs/cgroup/freezer")
                    .join(path)
                    .join("freezer.state"),
                "THAWED",
            );
        } else if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let _ = fs::write(Path::new(root).join(path).join("cgroup.freeze"), "0");
            }
        }
    }
}

/// Mount points at or below `dir` in our mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir`, deepest first, including stacked mounts.
pub fn unmount_all_under(dir: &Path) {
    // Each pass removes the top mount at every point; stacked mounts need more passes.
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for mount_point in mounts {
            match umount2(&mount_point, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(e) => eprintln!("test harness: umount {}: {e}", mount_point.display()),
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!(
            "test harness: mounts left under {}: {left:?}",
            dir.display()
        );
    }
}

/// Removes a fixture's directory after unmounting whatever is below it, reporting (not panicking
/// on) failure since this runs inside Drop.
pub fn remove_fixture_dir(dir: tempfile::TempDir) {
    unmount_all_under(dir.path());
    let path = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        eprintln!("test harness: cannot remove {}: {e}", path.display());
    }
}

/// A cgroup parent path unique to one test (like `/sandboxd-test-1a2b3c4d5e`), removed from every
/// hierarchy on drop after killing anything left inside it.
#[derive(Debug)]
pub struct CgroupParent {
    path: String,
}

impl CgroupParent {
    /// Picks a fresh parent path; nothing is created until runc puts a container below it.
    pub fn new() -> Self {
        CgroupParent {
            path: format!("/{}", unique_name("sandboxd-test")),
        }
    }

    /// The path as given to runc's `cgroupsPath` / sandboxd's `--cgroup-parent`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The memory limit, pids limit and CPU quota (µs per 100 ms) set on sandbox `id`'s cgroup
    /// below this parent, as the kernel shows them (cgroup v1 or v2); `None` where unreadable.
    pub fn limits(&self, id: &str) -> (Option<String>, Option<String>, Option<String>) {
        let cgroup = format!("{}/{id}", self.path);
        let read = |ctrl: &str, file: &str| {
            fs::read_to_string(format!("/sys/fs/cgroup/{ctrl}{cgroup}/{file}"))
                .ok()
                .map(|s| s.trim().to_string())
        };
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let quota = read("", "cpu.max").map(|q| q.split(' ').next().unwrap_or("").to_string());
            (read("", "memory.max"), read("", "pids.max"), quota)
        } else {
            let quota =
                read("cpu,cpuacct", "cpu.cfs_quota_us").or_else(|| read("cpu", "cpu.cfs_quota_us"));
            (
                read("memory", "memory.limit_in_bytes"),
                read("pids", "pids.max"),
                quota,
            )
        }
    }

    /// The parent's directory in every mounted hierarchy where it exists (v1 controllers, the
    /// hybrid `unified` v2 tree, or a pure v2 root).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let relative = self.path.trim_start_matches('/');
        let mut dirs = vec![Path::new("/sys/fs/cgroup").join(relative)];
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            dirs.extend(entries.flatten().map(|e| e.path().join(relative)));
        }
        dirs.retain(|d| d.is_dir());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Cgroup directories strictly below the parent in any hierarchy: a sandbox that was
    /// deleted must leave none.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for dir in self.dirs() {
            let mut below = subdirs_recursive(&dir);
            found.append(&mut below);
        }
        found
    }
}

impl Default for CgroupParent {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for root in self.dirs() {
            let mut tree = subdirs_recursive(&root);
            tree.push(root.clone());
            // Leaked container processes would keep the cgroups busy: kill them first.
            let stragglers: Vec<i32> = tree.iter().flat_map(|d| cgroup_procs(d)).collect();
            if !stragglers.is_empty() {
                for dir in &tree {
                    let _ = fs::write(dir.join("freezer.state"), "THAWED");
                    let _ = fs::write(dir.join("cgroup.freeze"), "0");
                }
                kill_process_trees(&stragglers);
            }
            tree.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for dir in tree {
                rmdir_when_empty(&dir);
            }
        }
    }
}

/// All directories below `dir` (not `dir` itself).
fn subdirs_recursive(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(entry.path());
                stack.push(entry.path());
            }
        }
    }
    out
}

/// Pids listed in a cgroup directory's `cgroup.procs`.
fn cgroup_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// rmdir a cgroup, retrying while the kernel still counts exiting tasks in it.
fn rmdir_when_empty(dir: &Path) {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("test harness: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Runs a client process (grpcurl, a Python client) to completion with its output captured,
/// killing it after `timeout`; panics, naming `what`, if it cannot run or does not finish.
pub async fn run_client(
    command: &mut tokio::process::Command,
    what: &str,
    timeout: Duration,
) -> std::process::Output {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {what}: {e}"),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// A process's exit status and both its outputs, for assertion messages.
pub fn describe_output(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A gRPC channel over the unix socket at `path` (the URI is a placeholder).
pub async fn unix_channel(path: PathBuf) -> Result<tonic::transport::Channel, String> {
    let shown = path.display().to_string();
    tonic::transport::Endpoint::from_static("http://[::1]:0")
        .connect_timeout(Duration::from_secs(1))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("connect to unix:{shown}: {e}"))
}
