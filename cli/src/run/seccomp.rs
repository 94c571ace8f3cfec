//! The seccomp profile of `shoji run`'s container: Docker's default profile for a container with
//! Docker's default capabilities (an allowlist, everything else EPERM), plus the one rule that
//! matters most inside a Shoji VM: no `AF_VSOCK` sockets, so a container cannot even open the
//! transport the agent listens on (docs/security.md).
//!
//! Rules this profile keeps from Docker's: `clone` only without namespace flags (no
//! `CAP_SYS_ADMIN`), `clone3` answers ENOSYS so libc falls back to `clone` where the flags can be
//! checked, `personality` only for the harmless personas, no `mount`, `unshare`, `setns`,
//! `bpf`, `keyctl`, kernel-module, kexec, clock-setting, swap, reboot, perf or io_uring calls.
//! The agent compiles the profile to BPF (guest-agent/src/runtime/seccomp.rs) and skips names its
//! kernel does not know, as runc does; syscalls through the i386 or x32 ABIs kill the process.
use anyhow::Result;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscall, LinuxSyscallBuilder,
};

/// `AF_VSOCK` from linux/socket.h.
pub const AF_VSOCK: u64 = 40;
/// CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
/// CLONE_NEWNET: the flags only `CAP_SYS_ADMIN` may pass to `clone`.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
const ENOSYS: u32 = 38;

/// Allowed unconditionally (Docker's default list for x86_64 and its default capabilities,
/// `chroot` included because CAP_SYS_CHROOT is in the set, `ptrace` and `process_vm_*` because
/// the guest kernel is newer than 4.8).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chroot",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
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
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
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
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_setup",
    "io_submit",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
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
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_getfd",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
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
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
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
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
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
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// `personality(2)` values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
/// and the query 0xffffffff.
const PERSONAS: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn rule(
    names_: &[&str],
    action: LinuxSeccompAction,
    arg: Option<(usize, u64, u64, LinuxSeccompOperator)>,
) -> Result<LinuxSyscall> {
    let mut b = LinuxSyscallBuilder::default().names(names(names_)).action(action);
    if let Some((index, value, value_two, op)) = arg {
        let mut a = LinuxSeccompArgBuilder::default().index(index).value(value).op(op);
        if value_two != 0 {
            a = a.value_two(value_two);
        }
        b = b.args(vec![a.build()?]);
    }
    Ok(b.build()?)
}

/// The profile, as it goes into `linux.seccomp`.
pub fn default_profile() -> Result<LinuxSeccomp> {
    use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
    use LinuxSeccompOperator::{ScmpCmpEq as Eq, ScmpCmpMaskedEq as MaskedEq, ScmpCmpNe as Ne};
    let mut syscalls = vec![rule(ALLOWED, Allow, None)?];
    // socket(2) for every family but AF_VSOCK.
    syscalls.push(rule(&["socket"], Allow, Some((0, AF_VSOCK, 0, Ne)))?);
    for &p in PERSONAS {
        syscalls.push(rule(&["personality"], Allow, Some((0, p, 0, Eq)))?);
    }
    // clone(flags, ...) with no namespace flag: (flags & mask) == 0.
    syscalls.push(rule(&["clone"], Allow, Some((0, CLONE_NAMESPACE_FLAGS, 0, MaskedEq)))?);
    let mut clone3 = rule(&["clone3"], Errno, None)?;
    clone3.set_errno_ret(Some(ENOSYS));
    syscalls.push(clone3);
    Ok(LinuxSeccompBuilder::default()
        .default_action(Errno)
        .architectures(vec![Arch::ScmpArchX86_64])
        .syscalls(syscalls)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for<'a>(p: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        p.syscalls().as_ref().unwrap().iter().filter(|s| s.names().iter().any(|n| n == name)).collect()
    }

    #[test]
    fn vsock_sockets_are_not_allowed_other_families_are() {
        let p = default_profile().unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        let socket = rules_for(&p, "socket");
        assert_eq!(socket.len(), 1, "one conditional rule, never an unconditional allow");
        let args = socket[0].args().as_ref().unwrap();
        assert_eq!((args[0].index(), args[0].value(), args[0].op()), (0, AF_VSOCK, LinuxSeccompOperator::ScmpCmpNe));
        assert_eq!(socket[0].action(), LinuxSeccompAction::ScmpActAllow);
    }

    #[test]
    fn privileged_calls_are_left_to_the_default_errno() {
        let p = default_profile().unwrap();
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "bpf",
            "keyctl",
            "add_key",
            "init_module",
            "finit_module",
            "kexec_load",
            "reboot",
            "swapon",
            "settimeofday",
            "clock_settime",
            "perf_event_open",
            "io_uring_setup",
            "userfaultfd",
            "open_by_handle_at",
            "open_tree",
            "move_mount",
            "fsopen",
        ] {
            assert!(rules_for(&p, name).is_empty(), "{name} must not be allowed");
        }
        let clone = rules_for(&p, "clone");
        assert_eq!(clone.len(), 1);
        let a = &clone[0].args().as_ref().unwrap()[0];
        assert_eq!((a.value(), a.op()), (CLONE_NAMESPACE_FLAGS, LinuxSeccompOperator::ScmpCmpMaskedEq));
        assert_eq!(a.value_two(), None, "masked_eq against 0");
        assert_eq!(rules_for(&p, "clone3")[0].errno_ret(), Some(ENOSYS));
        assert_eq!(rules_for(&p, "personality").len(), PERSONAS.len());
    }

    #[test]
    fn the_allowlist_has_no_duplicates_and_round_trips_as_json() {
        let mut v = ALLOWED.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), ALLOWED.len());
        let p = default_profile().unwrap();
        let back: LinuxSeccomp = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
