//! What a sandbox uses: CPU, memory, pids and block I/O from its cgroup (v1, where each
//! controller has its own hierarchy, or v2, one unified hierarchy), network counters from its
//! network namespace, and its writable layer's size from the snapshotter.
//!
//! The parsers take a function that reads a file of the sandbox's cgroup by controller and
//! name, so the cgroup v2 layout is tested with the same code that reads v1 on a real node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// CPU time, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// All CPU time the sandbox's processes used.
    pub usage_nanos: u64,
    /// Of which in user mode.
    pub user_nanos: u64,
    /// Of which in the kernel.
    pub system_nanos: u64,
    /// Scheduling periods (when a CPU limit is set).
    pub periods: u64,
    /// Periods in which the sandbox hit its CPU limit.
    pub throttled_periods: u64,
    /// Time spent throttled.
    pub throttled_nanos: u64,
}

/// Memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Charged to the sandbox, page cache included.
    pub usage_bytes: u64,
    /// Usage less inactive file cache: what the OOM killer weighs (as the kubelet counts it).
    pub working_set_bytes: u64,
    /// The limit; `None` when there is none.
    pub limit_bytes: Option<u64>,
    /// Times the sandbox hit its limit (v1 `memory.failcnt`, v2 `memory.events` oom).
    pub limit_hits: u64,
    /// Processes the OOM killer killed.
    pub oom_kills: u64,
}

/// Processes (tasks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    /// `None` when unlimited.
    pub limit: Option<u64>,
}

/// Block device I/O (bytes and operations), summed over devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// Network counters of the sandbox's interfaces other than loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// One reading of a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub at: SystemTime,
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    pub io: IoStats,
    pub network: NetStats,
    /// Bytes in the sandbox's writable layer.
    pub writable_layer_bytes: u64,
}

/// A cgroup controller, as v1 names its hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Memory,
    Pids,
    Blkio,
}

impl Controller {
    fn v1_dir(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Blkio => "blkio",
        }
    }
}

/// Reads `file` of the sandbox's cgroup in `controller`'s hierarchy; `None` when it is not there.
pub type CgroupReader<'a> = &'a dyn Fn(Controller, &str) -> Option<String>;

/// Which cgroup layout the sandbox's cgroup `path` (below the hierarchy roots) has under
/// `root` (`/sys/fs/cgroup`): v1 when the memory controller has its own hierarchy holding it.
pub fn reader_for(root: &Path, path: &str) -> impl Fn(Controller, &str) -> Option<String> {
    let rel = path.trim_start_matches('/').to_owned();
    let v1 = root.join("memory").join(&rel).is_dir();
    let root = root.to_path_buf();
    move |controller: Controller, file: &str| {
        let dir: PathBuf = if v1 {
            // Some systems join cpu and cpuacct into one hierarchy named after both.
            let own = root.join(controller.v1_dir()).join(&rel);
            if own.is_dir() || !matches!(controller, Controller::Cpu | Controller::Cpuacct) {
                own
            } else {
                root.join("cpu,cpuacct").join(&rel)
            }
        } else {
            root.join(&rel)
        };
        std::fs::read_to_string(dir.join(file)).ok()
    }
}

/// The cgroup figures, from either layout.
pub fn cgroup_stats(read: CgroupReader<'_>) -> (CpuStats, MemoryStats, PidsStats, IoStats) {
    let v2 = read(Controller::Memory, "memory.current").is_some();
    if v2 {
        (cpu_v2(read), memory_v2(read), pids(read), io_v2(read))
    } else {
        (cpu_v1(read), memory_v1(read), pids(read), io_v1(read))
    }
}

/// `key value` lines as a map.
fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?, it.next()?.parse().ok()?))
        })
        .collect()
}

fn number(text: Option<String>) -> Option<u64> {
    text?.trim().parse().ok()
}

/// A limit file's value: `max` (v2) or a value at or above this (v1's "unlimited", a page-
/// rounded i64::MAX) means none.
fn limit(text: Option<String>) -> Option<u64> {
    let t = text?;
    let t = t.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&n| n < (1 << 62))
}

/// USER_HZ: the unit of cpuacct.stat (100 on every Linux architecture sandboxd runs on).
const USER_HZ_NANOS: u64 = 10_000_000;

fn cpu_v1(read: CgroupReader<'_>) -> CpuStats {
    let stat = read(Controller::Cpu, "cpu.stat").unwrap_or_default();
    let stat = flat_keyed(&stat);
    let acct = read(Controller::Cpuacct, "cpuacct.stat").unwrap_or_default();
    let acct = flat_keyed(&acct);
    CpuStats {
        usage_nanos: number(read(Controller::Cpuacct, "cpuacct.usage")).unwrap_or(0),
        user_nanos: acct.get("user").copied().unwrap_or(0) * USER_HZ_NANOS,
        system_nanos: acct.get("system").copied().unwrap_or(0) * USER_HZ_NANOS,
        periods: stat.get("nr_periods").copied().unwrap_or(0),
        throttled_periods: stat.get("nr_throttled").copied().unwrap_or(0),
        throttled_nanos: stat.get("throttled_time").copied().unwrap_or(0),
    }
}

fn cpu_v2(read: CgroupReader<'_>) -> CpuStats {
    let stat = read(Controller::Cpu, "cpu.stat").unwrap_or_default();
    let s = flat_keyed(&stat);
    let us = |k: &str| s.get(k).copied().unwrap_or(0) * 1000;
    CpuStats {
        usage_nanos: us("usage_usec"),
        user_nanos: us("user_usec"),
        system_nanos: us("system_usec"),
        periods: s.get("nr_periods").copied().unwrap_or(0),
        throttled_periods: s.get("nr_throttled").copied().unwrap_or(0),
        throttled_nanos: us("throttled_usec"),
    }
}

fn memory_v1(read: CgroupReader<'_>) -> MemoryStats {
    let usage = number(read(Controller::Memory, "memory.usage_in_bytes")).unwrap_or(0);
    let stat = read(Controller::Memory, "memory.stat").unwrap_or_default();
    let stat = flat_keyed(&stat);
    let inactive = stat.get("total_inactive_file").copied().unwrap_or(0);
    let oom = read(Controller::Memory, "memory.oom_control").unwrap_or_default();
    let oom = flat_keyed(&oom);
    MemoryStats {
        usage_bytes: usage,
        working_set_bytes: usage.saturating_sub(inactive),
        limit_bytes: limit(read(Controller::Memory, "memory.limit_in_bytes")),
        limit_hits: number(read(Controller::Memory, "memory.failcnt")).unwrap_or(0),
        oom_kills: oom.get("oom_kill").copied().unwrap_or(0),
    }
}

fn memory_v2(read: CgroupReader<'_>) -> MemoryStats {
    let usage = number(read(Controller::Memory, "memory.current")).unwrap_or(0);
    let stat = read(Controller::Memory, "memory.stat").unwrap_or_default();
    let stat = flat_keyed(&stat);
    let inactive = stat.get("inactive_file").copied().unwrap_or(0);
    let events = read(Controller::Memory, "memory.events").unwrap_or_default();
    let events = flat_keyed(&events);
    MemoryStats {
        usage_bytes: usage,
        working_set_bytes: usage.saturating_sub(inactive),
        limit_bytes: limit(read(Controller::Memory, "memory.max")),
        limit_hits: events.get("oom").copied().unwrap_or(0),
        oom_kills: events.get("oom_kill").copied().unwrap_or(0),
    }
}

fn pids(read: CgroupReader<'_>) -> PidsStats {
    PidsStats {
        current: number(read(Controller::Pids, "pids.current")).unwrap_or(0),
        limit: limit(read(Controller::Pids, "pids.max")),
    }
}

/// v1: `MAJ:MIN Read|Write|... N` lines (and a `Total` line) of the throttle files, which count
/// every request whatever the I/O scheduler.
fn io_v1(read: CgroupReader<'_>) -> IoStats {
    let mut io = IoStats::default();
    let mut add = |file: &str,
                   read_to: fn(&mut IoStats) -> &mut u64,
                   write_to: fn(&mut IoStats) -> &mut u64| {
        let text = read(Controller::Blkio, file).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, op, n] = f[..] else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            match op {
                "Read" => *read_to(&mut io) += n,
                "Write" => *write_to(&mut io) += n,
                _ => {}
            }
        }
    };
    add(
        "blkio.throttle.io_service_bytes",
        |s| &mut s.read_bytes,
        |s| &mut s.write_bytes,
    );
    add(
        "blkio.throttle.io_serviced",
        |s| &mut s.read_ops,
        |s| &mut s.write_ops,
    );
    io
}

/// v2: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...` lines.
fn io_v2(read: CgroupReader<'_>) -> IoStats {
    let mut io = IoStats::default();
    let text = read(Controller::Blkio, "io.stat").unwrap_or_default();
    for field in text.lines().flat_map(|l| l.split_whitespace().skip(1)) {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let Ok(v) = v.parse::<u64>() else { continue };
        match k {
            "rbytes" => io.read_bytes += v,
            "wbytes" => io.write_bytes += v,
            "rios" => io.read_ops += v,
            "wios" => io.write_ops += v,
            _ => {}
        }
    }
    io
}

/// The counters of `/proc/<pid>/net/dev` (the network namespace of `pid`), loopback left out.
pub fn net_dev(text: &str) -> NetStats {
    let mut n = NetStats::default();
    for line in text.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let c: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if c.len() < 12 {
            continue;
        }
        n.rx_bytes += c[0];
        n.rx_packets += c[1];
        n.rx_errors += c[2];
        n.rx_dropped += c[3];
        n.tx_bytes += c[8];
        n.tx_packets += c[9];
        n.tx_errors += c[10];
        n.tx_dropped += c[11];
    }
    n
}

/// Bytes the files below `dir` take on disk (allocated blocks, each inode once), as `du`
/// and containerd's snapshot usage count them; entries that vanish meanwhile are skipped.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

impl super::manager::Manager {
    /// GetSandboxStats: one reading of running (or paused) sandbox `id`.
    pub async fn stats(&self, id: &super::model::SandboxId) -> crate::error::Result<Stats> {
        use crate::error::Error;
        use crate::runtime::TaskState;
        let container = self.existing(id).await?;
        let (task, mounts) = tokio::join!(
            self.task(id.as_str()),
            self.cd.mounts(&container.snapshot_key)
        );
        let task = match task? {
            Some(t) if matches!(t.state, TaskState::Running | TaskState::Paused) => t,
            other => {
                let state = other.map_or("STOPPED".to_owned(), |t| {
                    format!("{:?}", t.state).to_uppercase()
                });
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} is not running ({state}): only a running or paused sandbox has a cgroup to read"
                )));
            }
        };
        let layer = super::disk::writable_dir(&mounts?);
        let cgroup = self.sandbox_cgroup(id.as_str());
        let pid = task.pid;
        crate::sys::blocking(move || {
            let read = reader_for(Path::new("/sys/fs/cgroup"), &cgroup);
            let (cpu, memory, pids, io) = cgroup_stats(&read);
            let network = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
                .map(|t| net_dev(&t))
                .unwrap_or_default();
            Ok(Stats {
                at: SystemTime::now(),
                cpu,
                memory,
                pids,
                io,
                network,
                writable_layer_bytes: layer.as_deref().map_or(0, disk_usage),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(Controller, &str, &str)]) -> impl Fn(Controller, &str) -> Option<String> {
        let map: Vec<(Controller, String, String)> = list
            .iter()
            .map(|(c, f, t)| (*c, f.to_string(), t.to_string()))
            .collect();
        move |c, f| {
            map.iter()
                .find(|(mc, mf, _)| *mc == c && mf == f)
                .map(|(_, _, t)| t.clone())
        }
    }

    #[test]
    fn cgroup_v1_files_add_up() {
        use Controller::*;
        let read = files(&[
            (Cpuacct, "cpuacct.usage", "2500000000\n"),
            (Cpuacct, "cpuacct.stat", "user 150\nsystem 50\n"),
            (
                Cpu,
                "cpu.stat",
                "nr_periods 40\nnr_throttled 7\nthrottled_time 350000000\n",
            ),
            (Memory, "memory.usage_in_bytes", "104857600\n"),
            (Memory, "memory.limit_in_bytes", "9223372036854771712\n"),
            (
                Memory,
                "memory.stat",
                "cache 1\ntotal_inactive_file 4194304\n",
            ),
            (Memory, "memory.failcnt", "3\n"),
            (
                Memory,
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            (Pids, "pids.current", "5\n"),
            (Pids, "pids.max", "64\n"),
            (
                Blkio,
                "blkio.throttle.io_service_bytes",
                "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 1\n8:16 Read 1024\nTotal 13313\n",
            ),
            (
                Blkio,
                "blkio.throttle.io_serviced",
                "8:0 Read 2\n8:0 Write 3\nTotal 5\n",
            ),
        ]);
        let (cpu, memory, pids, io) = cgroup_stats(&read);
        assert_eq!(
            cpu,
            CpuStats {
                usage_nanos: 2_500_000_000,
                user_nanos: 1_500_000_000,
                system_nanos: 500_000_000,
                periods: 40,
                throttled_periods: 7,
                throttled_nanos: 350_000_000,
            }
        );
        assert_eq!(
            memory,
            MemoryStats {
                usage_bytes: 100 << 20,
                working_set_bytes: 96 << 20,
                limit_bytes: None,
                limit_hits: 3,
                oom_kills: 2,
            }
        );
        assert_eq!(
            pids,
            PidsStats {
                current: 5,
                limit: Some(64)
            }
        );
        assert_eq!(
            io,
            IoStats {
                read_bytes: 5120,
                write_bytes: 8192,
                read_ops: 2,
                write_ops: 3,
            }
        );
    }

    #[test]
    fn cgroup_v2_files_add_up() {
        use Controller::*;
        let read = files(&[
            (
                Cpu,
                "cpu.stat",
                "usage_usec 2500000\nuser_usec 1500000\nsystem_usec 1000000\nnr_periods 10\nnr_throttled 1\nthrottled_usec 20000\n",
            ),
            (Memory, "memory.current", "67108864\n"),
            (Memory, "memory.max", "134217728\n"),
            (Memory, "memory.stat", "anon 1\ninactive_file 1048576\n"),
            (Memory, "memory.events", "low 0\nhigh 0\nmax 9\noom 4\noom_kill 1\n"),
            (Pids, "pids.current", "3\n"),
            (Pids, "pids.max", "max\n"),
            (
                Blkio,
                "io.stat",
                "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=1 wbytes=2 rios=3 wios=4\n",
            ),
        ]);
        let (cpu, memory, pids, io) = cgroup_stats(&read);
        assert_eq!(cpu.usage_nanos, 2_500_000_000);
        assert_eq!(cpu.system_nanos, 1_000_000_000);
        assert_eq!((cpu.periods, cpu.throttled_periods), (10, 1));
        assert_eq!(cpu.throttled_nanos, 20_000_000);
        assert_eq!(
            memory,
            MemoryStats {
                usage_bytes: 64 << 20,
                working_set_bytes: 63 << 20,
                limit_bytes: Some(128 << 20),
                limit_hits: 4,
                oom_kills: 1,
            }
        );
        assert_eq!(
            pids,
            PidsStats {
                current: 3,
                limit: None
            }
        );
        assert_eq!(
            io,
            IoStats {
                read_bytes: 101,
                write_bytes: 202,
                read_ops: 4,
                write_ops: 6,
            }
        );
    }

    #[test]
    fn missing_files_read_as_zero() {
        let none = |_: Controller, _: &str| None;
        let (cpu, memory, pids, io) = cgroup_stats(&none);
        assert_eq!(cpu, CpuStats::default());
        assert_eq!(memory, MemoryStats::default());
        assert_eq!(pids, PidsStats::default());
        assert_eq!(io, IoStats::default());
    }

    #[test]
    fn net_dev_sums_all_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:     500       5    0    0    0     0          0         0      500       5    0    0    0     0       0          0\n  \
            eth0:    1000      10    1    2    0     0          0         0     2000      20    3    4    0     0       0          0\n";
        assert_eq!(
            net_dev(text),
            NetStats {
                rx_bytes: 1000,
                rx_packets: 10,
                rx_errors: 1,
                rx_dropped: 2,
                tx_bytes: 2000,
                tx_packets: 20,
                tx_errors: 3,
                tx_dropped: 4,
            }
        );
    }

    #[test]
    fn disk_usage_counts_blocks_and_each_inode_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/a"), vec![1u8; 64 << 10]).unwrap();
        std::fs::hard_link(dir.path().join("d/a"), dir.path().join("b")).unwrap();
        let used = disk_usage(dir.path());
        assert!(
            (64 << 10..(64 << 10) + (64 << 10)).contains(&used),
            "{used}"
        );
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }

    #[test]
    fn the_layout_is_found_on_disk() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("memory/sbx/a")).unwrap();
        std::fs::create_dir_all(root.path().join("cpu,cpuacct/sbx/a")).unwrap();
        std::fs::write(
            root.path().join("memory/sbx/a/memory.usage_in_bytes"),
            "7\n",
        )
        .unwrap();
        std::fs::write(root.path().join("cpu,cpuacct/sbx/a/cpuacct.usage"), "9\n").unwrap();
        let read = reader_for(root.path(), "/sbx/a");
        assert_eq!(
            read(Controller::Memory, "memory.usage_in_bytes").as_deref(),
            Some("7\n")
        );
        assert_eq!(
            read(Controller::Cpuacct, "cpuacct.usage").as_deref(),
            Some("9\n")
        );
        let v2 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v2.path().join("sbx/a")).unwrap();
        std::fs::write(v2.path().join("sbx/a/memory.current"), "5\n").unwrap();
        let read = reader_for(v2.path(), "/sbx/a");
        assert_eq!(
            read(Controller::Memory, "memory.current").as_deref(),
            Some("5\n")
        );
    }
}
