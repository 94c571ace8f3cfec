//! The per-thread seccomp allowlists (x86-64). Derived by tracing the real workloads (`strace
//! -f` of `shoji boot` with the probe guest's blk/fs/vsock modes, the Linux guest under `shoji
//! run`) and kept as small as those need; see docs in [`super`]. Anything else traps (see
//! `super::sigsys`).
//!
//! Argument filters where cheap, as Firecracker does: `ioctl` by request number (the vCPU
//! threads may only run KVM_RUN and the few VM ioctls an MSI-X or device reset needs), `fcntl`
//! by command, `mmap`/`mprotect` without `PROT_EXEC`, `socket` for `AF_UNIX` only.
use super::ThreadKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// KVM ioctl request numbers (`linux/kvm.h`, x86-64 structure sizes).
pub mod kvm_ioctl {
    pub const KVM_RUN: u64 = 0xae80;
    pub const KVM_GET_REGS: u64 = 0x8090_ae81;
    pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
    pub const KVM_IRQFD: u64 = 0x4020_ae76;
    pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    pub const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;
    pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
}

/// Syscalls every VMM thread makes: memory, futexes, signals, its own exit, reads and writes on
/// descriptors it already holds (eventfds, the console, logs).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The device thread: the event loop, virtio-blk I/O, the in-process virtio-fs server (path
/// operations below the shared directory by fd) and the vsock muxer (unix sockets).
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_umask,
    libc::SYS_flock,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    // vsock: connect to the host's `PATH_<port>` sockets, accept host-initiated ones.
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_eventfd2,
];

/// The VM's own thread ([`crate::vm::spawn`]) once the vCPU and device threads run: it waits
/// for the VM to stop, then kicks and joins them and drops every fd and mapping.
const VMM: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_epoll_ctl,
    libc::SYS_ftruncate,
    libc::SYS_exit_group,
];

/// The vCPU threads: KVM_RUN and the exits they serve (PIO/MMIO to the serial console, the
/// i8042, PCI config space, virtio registers, MSI-X). A virtio-fs reset (a status write of 0)
/// builds the device's FUSE server again on this thread: it opens `/proc/self/fd`,
/// `/proc/self/mountinfo` and the shared directory (Landlock bounds those opens).
/// A vsock reset drops the device's connections (`shutdown` of its host streams) here too.
const VCPU: &[i64] = &[libc::SYS_epoll_ctl, libc::SYS_eventfd2, libc::SYS_openat, libc::SYS_umask, libc::SYS_shutdown];

fn cond(arg: u8, op: Op, v: u64) -> Cond {
    // The only errors are an argument index above 5, which these constants never are.
    Cond::new(arg, Len::Dword, op, v).expect("valid seccomp condition")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("non-empty seccomp rule")
}

fn one_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values.iter().map(|v| rule(vec![cond(arg, Op::Eq, *v)])).collect()
}

/// `mmap`/`mprotect` without PROT_EXEC: no thread maps new code.
fn no_exec() -> Vec<SeccompRule> {
    vec![rule(vec![cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)])]
}

/// The rule set for one thread kind.
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra = match kind {
        ThreadKind::Vcpu(_) => VCPU,
        ThreadKind::Devices => DEVICES,
        ThreadKind::Vmm => VMM,
    };
    for nr in COMMON.iter().chain(extra) {
        m.insert(*nr, vec![]);
    }
    m.insert(libc::SYS_mmap, no_exec());
    m.insert(libc::SYS_mprotect, no_exec());
    let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC];
    m.insert(libc::SYS_fcntl, one_of(1, &fcntl.map(|c| c as u64)));
    use kvm_ioctl::*;
    match kind {
        ThreadKind::Vcpu(_) => {
            let ioctls =
                [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_IRQFD, KVM_SET_GSI_ROUTING, KVM_SIGNAL_MSI, KVM_IOEVENTFD];
            m.insert(libc::SYS_ioctl, one_of(1, &ioctls));
            m.insert(libc::SYS_unshare, vec![rule(vec![cond(0, Op::Eq, libc::CLONE_FS as u64)])]);
        }
        ThreadKind::Devices => {
            m.insert(libc::SYS_ioctl, one_of(1, &[libc::FIONBIO, libc::FIOCLEX]));
            m.insert(libc::SYS_socket, vec![rule(vec![cond(0, Op::Eq, libc::AF_UNIX as u64)])]);
            // virtio-fs serves each request with the thread's own umask (CLONE_FS) only.
            m.insert(libc::SYS_unshare, vec![rule(vec![cond(0, Op::Eq, libc::CLONE_FS as u64)])]);
        }
        ThreadKind::Vmm => {
            m.insert(libc::SYS_ioctl, one_of(1, &[KVM_IRQFD, KVM_IOEVENTFD]));
        }
    }
    m
}

/// The compiled filter for `kind`: allow the listed calls, trap everything else.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    SeccompFilter::new(rules(kind), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

/// A syscall's name for the report line (the calls a filter names, plus the usual suspects).
pub fn syscall_name(nr: i64) -> &'static str {
    macro_rules! names {
        ($($n:ident),* $(,)?) => {
            $(if nr == libc::$n { return &stringify!($n)[4..]; })*
        };
    }
    names!(
        SYS_read,
        SYS_write,
        SYS_open,
        SYS_close,
        SYS_stat,
        SYS_fstat,
        SYS_lstat,
        SYS_poll,
        SYS_lseek,
        SYS_mmap,
        SYS_mprotect,
        SYS_munmap,
        SYS_brk,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_ioctl,
        SYS_pread64,
        SYS_pwrite64,
        SYS_readv,
        SYS_writev,
        SYS_access,
        SYS_pipe,
        SYS_select,
        SYS_sched_yield,
        SYS_mremap,
        SYS_madvise,
        SYS_dup,
        SYS_dup2,
        SYS_nanosleep,
        SYS_getpid,
        SYS_socket,
        SYS_connect,
        SYS_accept,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_shutdown,
        SYS_bind,
        SYS_listen,
        SYS_getsockname,
        SYS_getpeername,
        SYS_socketpair,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_clone,
        SYS_fork,
        SYS_vfork,
        SYS_execve,
        SYS_exit,
        SYS_wait4,
        SYS_kill,
        SYS_uname,
        SYS_fcntl,
        SYS_flock,
        SYS_fsync,
        SYS_fdatasync,
        SYS_truncate,
        SYS_ftruncate,
        SYS_getdents64,
        SYS_getcwd,
        SYS_chdir,
        SYS_fchdir,
        SYS_rename,
        SYS_mkdir,
        SYS_rmdir,
        SYS_link,
        SYS_unlink,
        SYS_symlink,
        SYS_readlink,
        SYS_chmod,
        SYS_fchmod,
        SYS_chown,
        SYS_fchown,
        SYS_umask,
        SYS_ptrace,
        SYS_getuid,
        SYS_setuid,
        SYS_setgid,
        SYS_setresuid,
        SYS_setresgid,
        SYS_capget,
        SYS_capset,
        SYS_sigaltstack,
        SYS_mknod,
        SYS_statfs,
        SYS_fstatfs,
        SYS_prctl,
        SYS_arch_prctl,
        SYS_setrlimit,
        SYS_chroot,
        SYS_mount,
        SYS_umount2,
        SYS_reboot,
        SYS_init_module,
        SYS_gettid,
        SYS_tkill,
        SYS_futex,
        SYS_sched_getaffinity,
        SYS_epoll_create1,
        SYS_epoll_wait,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_tgkill,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_exit_group,
        SYS_openat,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_fchownat,
        SYS_newfstatat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_linkat,
        SYS_symlinkat,
        SYS_readlinkat,
        SYS_fchmodat,
        SYS_ppoll,
        SYS_unshare,
        SYS_utimensat,
        SYS_fallocate,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_eventfd2,
        SYS_accept4,
        SYS_dup3,
        SYS_pipe2,
        SYS_preadv,
        SYS_pwritev,
        SYS_name_to_handle_at,
        SYS_open_by_handle_at,
        SYS_setns,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_renameat2,
        SYS_seccomp,
        SYS_getrandom,
        SYS_memfd_create,
        SYS_bpf,
        SYS_execveat,
        SYS_copy_file_range,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_statx,
        SYS_rseq,
        SYS_pidfd_open,
        SYS_clone3,
        SYS_openat2,
        SYS_pidfd_getfd,
        SYS_landlock_create_ruleset,
        SYS_landlock_add_rule,
        SYS_landlock_restrict_self,
        SYS_fgetxattr,
        SYS_fsetxattr,
        SYS_flistxattr,
        SYS_fremovexattr,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_open_tree,
        SYS_move_mount,
        SYS_fsopen,
        SYS_mount_setattr,
        SYS_kexec_load,
        SYS_perf_event_open,
    );
    "unknown"
}
