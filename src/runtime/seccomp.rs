//! The seccomp filter of every sandbox: Docker's default profile (an allow-list, everything else
//! failing with EPERM), kept here as our own table so that it is reviewed like code, and turned
//! into an OCI `LinuxSeccomp` for the capabilities a sandbox holds and the kernel it runs on.
//!
//! The profile's point is to close the kernel interfaces that containers do not need and that
//! keep producing local privilege escalations: new user namespaces (`unshare`, `clone` with
//! namespace flags), `mount`, the keyring, BPF, perf, module loading, `kexec_load`,
//! `open_by_handle_at` (the "shocker" escape). Those become available only to a sandbox given
//! the capability that guards them, exactly as Docker decides.

use std::path::Path;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// What a syscall outside the allow-list returns: EPERM, as Docker's profile does.
pub const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// The namespace flags a plain `clone` may not carry without CAP_SYS_ADMIN.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// `AF_VSOCK`: sockets to the hypervisor, denied to containers.
const AF_VSOCK: u64 = 40;

/// When a rule is part of the profile.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Always.
    Always,
    /// Only for processes holding this capability (in their bounding set).
    Cap(&'static str),
    /// Only for processes without this capability.
    NoCap(&'static str),
    /// Only on kernels at least this version (major, minor).
    Kernel(u32, u32),
    /// Only on this architecture (`std::env::consts::ARCH`).
    Arch(&'static str),
}

/// What a matching syscall does.
#[derive(Debug, Clone, Copy)]
enum Act {
    Allow,
    Errno(i32),
}

/// A condition on one argument: `args[index] op value` (`MaskedEq`: `args[index] & value == two`).
#[derive(Debug, Clone, Copy)]
struct Arg {
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    two: u64,
}

/// One entry of the profile: syscalls, their action, argument conditions and when it applies.
#[derive(Debug, Clone, Copy)]
struct Rule {
    names: &'static [&'static str],
    act: Act,
    args: &'static [Arg],
    when: When,
}

const fn allow(names: &'static [&'static str], when: When) -> Rule {
    Rule {
        names,
        act: Act::Allow,
        args: &[],
        when,
    }
}

const fn arg_eq(index: usize, value: u64) -> Arg {
    Arg {
        index,
        op: LinuxSeccompOperator::ScmpCmpEq,
        value,
        two: 0,
    }
}

/// Syscalls every sandbox may make whatever it holds.
const ALWAYS_ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Names in the profile that the x86_64 ABI does not have (32-bit variants, other
/// architectures' calls). runc hands each name to libseccomp, which turns one it cannot map
/// to the native ABI into a rule it then drops, and that costs far more than a real rule:
/// measured here with libseccomp 2.5.4, adding the profile's rules took ~6 ms with these
/// names and ~0.7 ms without, at every start and every exec. Leaving them out changes nothing
/// the filter allows. (The kernel's syscall tables, as libseccomp 2.5 maps them.)
const NOT_ON_X86_64: &[&str] = &[
    "_llseek",
    "_newselect",
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "breakpoint",
    "cacheflush",
    "chown32",
    "clock_adjtime64",
    "clock_getres_time64",
    "clock_gettime64",
    "clock_nanosleep_time64",
    "clock_settime64",
    "fadvise64_64",
    "fchown32",
    "fcntl64",
    "fstat64",
    "fstatat64",
    "fstatfs64",
    "ftruncate64",
    "futex_time64",
    "getegid32",
    "geteuid32",
    "getgid32",
    "getgroups32",
    "getresgid32",
    "getresuid32",
    "getuid32",
    "io_pgetevents_time64",
    "ipc",
    "lchown32",
    "lstat64",
    "mmap2",
    "mq_timedreceive_time64",
    "mq_timedsend_time64",
    "ppoll_time64",
    "pselect6_time64",
    "recv",
    "recvmmsg_time64",
    "riscv_flush_icache",
    "rt_sigtimedwait_time64",
    "s390_pci_mmio_read",
    "s390_pci_mmio_write",
    "s390_runtime_instr",
    "sched_rr_get_interval_time64",
    "semtimedop_time64",
    "send",
    "sendfile64",
    "set_tls",
    "setfsgid32",
    "setfsuid32",
    "setgid32",
    "setgroups32",
    "setregid32",
    "setresgid32",
    "setresuid32",
    "setreuid32",
    "setuid32",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "stat64",
    "statfs64",
    "stime",
    "swapcontext",
    "sync_file_range2",
    "timer_gettime64",
    "timer_settime64",
    "timerfd_gettime64",
    "timerfd_settime64",
    "truncate64",
    "ugetrlimit",
    "umount",
    "utimensat_time64",
    "waitpid",
];

/// The same for the aarch64 ABI, which also lacks the legacy calls its generic table
/// replaced (`open`, `stat`, `fork`, ...).
const NOT_ON_AARCH64: &[&str] = &[
    "_llseek",
    "_newselect",
    "access",
    "alarm",
    "arch_prctl",
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "breakpoint",
    "cacheflush",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime64",
    "clock_getres_time64",
    "clock_gettime64",
    "clock_nanosleep_time64",
    "clock_settime64",
    "creat",
    "dup2",
    "epoll_create",
    "epoll_ctl_old",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "fadvise64_64",
    "fchown32",
    "fcntl64",
    "fork",
    "fstat64",
    "fstatat64",
    "fstatfs64",
    "ftruncate64",
    "futex_time64",
    "futimesat",
    "get_thread_area",
    "getdents",
    "getegid32",
    "geteuid32",
    "getgid32",
    "getgroups32",
    "getpgrp",
    "getresgid32",
    "getresuid32",
    "getuid32",
    "inotify_init",
    "io_pgetevents_time64",
    "ioperm",
    "iopl",
    "ipc",
    "lchown",
    "lchown32",
    "link",
    "lstat",
    "lstat64",
    "mkdir",
    "mknod",
    "mmap2",
    "modify_ldt",
    "mq_timedreceive_time64",
    "mq_timedsend_time64",
    "open",
    "pause",
    "pipe",
    "poll",
    "ppoll_time64",
    "pselect6_time64",
    "readlink",
    "recv",
    "recvmmsg_time64",
    "rename",
    "riscv_flush_icache",
    "rmdir",
    "rt_sigtimedwait_time64",
    "s390_pci_mmio_read",
    "s390_pci_mmio_write",
    "s390_runtime_instr",
    "sched_rr_get_interval_time64",
    "select",
    "semtimedop_time64",
    "send",
    "sendfile64",
    "set_thread_area",
    "set_tls",
    "setfsgid32",
    "setfsuid32",
    "setgid32",
    "setgroups32",
    "setregid32",
    "setresgid32",
    "setresuid32",
    "setreuid32",
    "setuid32",
    "signalfd",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "stat",
    "stat64",
    "statfs64",
    "stime",
    "swapcontext",
    "symlink",
    "sync_file_range2",
    "time",
    "timer_gettime64",
    "timer_settime64",
    "timerfd_gettime64",
    "timerfd_settime64",
    "truncate64",
    "ugetrlimit",
    "umount",
    "unlink",
    "utime",
    "utimensat_time64",
    "utimes",
    "vfork",
    "waitpid",
];

/// Docker's default profile as rules, in its order.
const RULES: &[Rule] = &[
    allow(ALWAYS_ALLOWED, When::Always),
    // Every socket family but the hypervisor's.
    Rule {
        names: &["socket"],
        act: Act::Allow,
        args: &[Arg {
            index: 0,
            op: LinuxSeccompOperator::ScmpCmpNe,
            value: AF_VSOCK,
            two: 0,
        }],
        when: When::Always,
    },
    // personality(2) only for the Linux and 32-bit-compat personalities and the query.
    Rule {
        names: &["personality"],
        act: Act::Allow,
        args: &[arg_eq(0, 0x0)],
        when: When::Always,
    },
    Rule {
        names: &["personality"],
        act: Act::Allow,
        args: &[arg_eq(0, 0x0008)],
        when: When::Always,
    },
    Rule {
        names: &["personality"],
        act: Act::Allow,
        args: &[arg_eq(0, 0x20000)],
        when: When::Always,
    },
    Rule {
        names: &["personality"],
        act: Act::Allow,
        args: &[arg_eq(0, 0x20008)],
        when: When::Always,
    },
    Rule {
        names: &["personality"],
        act: Act::Allow,
        args: &[arg_eq(0, 0xffff_ffff)],
        when: When::Always,
    },
    allow(
        &["sync_file_range2", "swapcontext"],
        When::Arch("powerpc64"),
    ),
    allow(
        &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ],
        When::Arch("arm"),
    ),
    allow(
        &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ],
        When::Arch("aarch64"),
    ),
    allow(&["arch_prctl", "modify_ldt"], When::Arch("x86_64")),
    allow(&["modify_ldt"], When::Arch("x86")),
    allow(
        &[
            "s390_pci_mmio_read",
            "s390_pci_mmio_write",
            "s390_runtime_instr",
        ],
        When::Arch("s390x"),
    ),
    allow(&["riscv_flush_icache"], When::Arch("riscv64")),
    // Since 4.8 seccomp runs after ptrace's changes, so ptrace cannot be used to skip it.
    allow(
        &["process_vm_readv", "process_vm_writev", "ptrace"],
        When::Kernel(4, 8),
    ),
    allow(&["open_by_handle_at"], When::Cap("CAP_DAC_READ_SEARCH")),
    allow(
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
        When::Cap("CAP_SYS_ADMIN"),
    ),
    // Without CAP_SYS_ADMIN, clone may make threads and processes but no namespaces.
    Rule {
        names: &["clone"],
        act: Act::Allow,
        args: &[Arg {
            index: if cfg!(target_arch = "s390x") { 1 } else { 0 },
            op: LinuxSeccompOperator::ScmpCmpMaskedEq,
            value: CLONE_NAMESPACE_FLAGS,
            two: 0,
        }],
        when: When::NoCap("CAP_SYS_ADMIN"),
    },
    // clone3's flags live in memory seccomp cannot read: ENOSYS makes libc fall back to clone.
    Rule {
        names: &["clone3"],
        act: Act::Errno(libc::ENOSYS),
        args: &[],
        when: When::NoCap("CAP_SYS_ADMIN"),
    },
    allow(&["reboot"], When::Cap("CAP_SYS_BOOT")),
    allow(&["chroot"], When::Cap("CAP_SYS_CHROOT")),
    allow(
        &["delete_module", "init_module", "finit_module"],
        When::Cap("CAP_SYS_MODULE"),
    ),
    allow(&["acct"], When::Cap("CAP_SYS_PACCT")),
    allow(
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
        When::Cap("CAP_SYS_PTRACE"),
    ),
    allow(&["iopl", "ioperm"], When::Cap("CAP_SYS_RAWIO")),
    allow(
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
        When::Cap("CAP_SYS_TIME"),
    ),
    allow(&["vhangup"], When::Cap("CAP_SYS_TTY_CONFIG")),
    allow(
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
        When::Cap("CAP_SYS_NICE"),
    ),
    allow(&["syslog"], When::Cap("CAP_SYSLOG")),
    allow(&["bpf"], When::Cap("CAP_BPF")),
    allow(&["perf_event_open"], When::Cap("CAP_PERFMON")),
];

/// The seccomp architecture of the machine we run on: its native ABI only. Docker also lists
/// the compat ABIs (x86 and x32 beside x86_64), but runc compiles the filter at every start and
/// every exec and each ABI multiplies that work (measured here: ~12 ms more per exec, a third of
/// a round trip); a sandbox then cannot make 32-bit syscalls at all, which also closes the
/// compat syscall layer. An operator who needs 32-bit binaries passes a profile listing them.
fn architectures() -> Vec<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64],
        "aarch64" => vec![Arch::ScmpArchAarch64],
        "s390x" => vec![Arch::ScmpArchS390x],
        "riscv64" => vec![Arch::ScmpArchRiscv64],
        _ => vec![],
    }
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`; (0, 0) if unknown,
/// which leaves out the rules that need a newer kernel.
pub fn kernel_version() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| parse_kernel_version(&r))
        .unwrap_or((0, 0))
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()
        .and_then(|m| {
            let digits: String = m.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or(0);
    Some((major, minor))
}

/// Docker's default profile for a process whose bounding set is `caps`, on kernel `kernel`.
pub fn default_profile(caps: &[&str], kernel: (u32, u32)) -> LinuxSeccomp {
    let applies = |when: When| match when {
        When::Always => true,
        When::Cap(cap) => caps.contains(&cap),
        When::NoCap(cap) => !caps.contains(&cap),
        When::Kernel(major, minor) => kernel >= (major, minor),
        When::Arch(arch) => std::env::consts::ARCH == arch,
    };
    let absent = not_native();
    let syscalls: Vec<LinuxSyscall> = RULES
        .iter()
        .filter(|r| applies(r.when))
        .filter_map(|r| syscall_of(r, absent))
        .collect();
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(DEFAULT_ERRNO)
        .architectures(architectures())
        .syscalls(syscalls)
        .build()
        .expect("every field of the profile is set")
}

/// The profile's names that the native ABI lacks (see `NOT_ON_X86_64`).
fn not_native() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => NOT_ON_X86_64,
        "aarch64" => NOT_ON_AARCH64,
        _ => &[],
    }
}

/// The OCI form of `rule` without the names in `absent`; None when no name is left.
fn syscall_of(rule: &Rule, absent: &[&str]) -> Option<LinuxSyscall> {
    let names: Vec<String> = rule
        .names
        .iter()
        .filter(|n| !absent.contains(n))
        .map(|n| n.to_string())
        .collect();
    if names.is_empty() {
        return None;
    }
    let args: Vec<LinuxSeccompArg> = rule
        .args
        .iter()
        .map(|a| {
            let b = LinuxSeccompArgBuilder::default()
                .index(a.index)
                .value(a.value)
                .op(a.op);
            let b = if a.op == LinuxSeccompOperator::ScmpCmpMaskedEq {
                b.value_two(a.two)
            } else {
                b
            };
            b.build().expect("index, value and op are set")
        })
        .collect();
    let mut b = LinuxSyscallBuilder::default().names(names);
    b = match rule.act {
        Act::Allow => b.action(LinuxSeccompAction::ScmpActAllow),
        Act::Errno(errno) => b
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(errno as u32),
    };
    if !args.is_empty() {
        b = b.args(args);
    }
    Some(b.build().expect("names and action are set"))
}

/// Reads an operator's profile: the `linux.seccomp` object of an OCI runtime spec, as JSON.
pub fn load_profile(path: &Path) -> Result<LinuxSeccomp, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not an OCI seccomp profile: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(profile: &LinuxSeccomp, name: &str) -> Vec<LinuxSyscall> {
        profile
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.names().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    #[test]
    fn default_denies_escapes_with_eperm_and_keeps_the_basics() {
        let p = default_profile(&["CAP_CHOWN", "CAP_SYS_CHROOT"], (6, 1));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        for name in [
            "mount",
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "request_key",
            "kexec_load",
            "open_by_handle_at",
            "bpf",
            "perf_event_open",
            "init_module",
            "userfaultfd",
        ] {
            assert!(allowed(&p, name).is_empty(), "{name} must not be allowed");
        }
        for name in ["read", "execve", "socket", "chroot", "ptrace", "arch_prctl"] {
            if name == "arch_prctl" && std::env::consts::ARCH != "x86_64" {
                continue;
            }
            assert!(!allowed(&p, name).is_empty(), "{name} must be allowed");
        }
        // clone only without namespace flags; clone3 says ENOSYS so libc uses clone.
        let clone = allowed(&p, "clone");
        assert_eq!(clone.len(), 1);
        let arg = clone[0].args().as_ref().unwrap()[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_ne!(arg.value() & libc::CLONE_NEWUSER as u64, 0);
        assert_eq!(arg.value_two(), Some(0));
        let clone3 = allowed(&p, "clone3");
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(libc::ENOSYS as u32));
        // Sockets, but not to the hypervisor.
        let socket = allowed(&p, "socket");
        assert_eq!(socket[0].args().as_ref().unwrap()[0].value(), AF_VSOCK);
    }

    #[test]
    fn capabilities_and_kernel_version_open_their_groups() {
        let admin = default_profile(&["CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"], (6, 1));
        assert!(!allowed(&admin, "mount").is_empty());
        assert!(!allowed(&admin, "open_by_handle_at").is_empty());
        // With CAP_SYS_ADMIN clone is allowed without the flag condition, clone3 too.
        assert!(allowed(&admin, "clone").iter().all(|s| s.args().is_none()));
        assert!(allowed(&admin, "clone3")
            .iter()
            .all(|s| s.action() == LinuxSeccompAction::ScmpActAllow));
        let old = default_profile(&[], (4, 4));
        assert!(allowed(&old, "ptrace").is_empty());
        assert!(allowed(&old, "chroot").is_empty());
    }

    #[test]
    fn profile_names_only_the_native_architecture() {
        let p = default_profile(&[], (6, 1));
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(
                p.architectures().as_deref(),
                Some(&[Arch::ScmpArchX86_64][..])
            );
            // The 32-bit and other architectures' names are gone, the native ones stay.
            for name in [
                "socketcall",
                "_llseek",
                "fcntl64",
                "setuid32",
                "clock_gettime64",
            ] {
                assert!(allowed(&p, name).is_empty(), "{name} is not an x86_64 call");
            }
            for name in ["fcntl", "setuid", "clock_gettime", "arch_prctl", "open"] {
                assert!(!allowed(&p, name).is_empty(), "{name} must stay");
            }
        }
        let names = |p: &LinuxSeccomp| -> usize {
            p.syscalls()
                .as_ref()
                .unwrap()
                .iter()
                .map(|s| s.names().len())
                .sum()
        };
        assert!(names(&p) > 250, "{} names", names(&p));
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v1300\n"), Some((6, 18)));
        assert_eq!(parse_kernel_version("4.8"), Some((4, 8)));
        assert_eq!(parse_kernel_version("5.10.0+"), Some((5, 10)));
        assert_eq!(parse_kernel_version("weird"), None);
    }

    #[test]
    fn operator_profiles_load_from_oci_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let p = load_profile(&path).unwrap();
        assert_eq!(allowed(&p, "read").len(), 1);
        std::fs::write(&path, "{\"defaultAction\": 7}").unwrap();
        assert!(load_profile(&path).is_err());
        assert!(load_profile(&dir.path().join("missing")).is_err());
    }
}
