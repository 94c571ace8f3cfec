//! The per-thread seccomp allowlists (x86-64). Derived by tracing the real workloads (`strace
//! -f` of `shoji boot` with the probe guest's blk/fs/vsock modes, the Linux guest under `shoji
//! run`) and kept as small as those need; see docs in [`super`]. Anything else traps (see
//! `super::sigsys`).
//!
//! Argument filters where cheap, as Firecracker does: `ioctl` by request number (the vCPU
//! threads may only run KVM_RUN and the few VM ioctls an MSI-X or device reset needs), `fcntl`
//! by command, `mmap`/`mprotect` without `PROT_EXEC`, `socket` for `AF_UNIX` only.
//!
//! The program is laid out for the kernel ([`program`]): seccompiler alone emits one linear
//! chain of syscall-number tests, and when a filter is attached the kernel walks it for every
//! syscall number to find the calls it may allow without running the filter again (its
//! per-thread action cache), so attaching cost ≈ (syscall table) × (chain length): 0.15–0.3 ms
//! per thread here, on the boot's path. A binary search on the number in front of the chain
//! makes every walk ~20 instructions and attaching 2–4× faster; the calls with argument rules
//! still go through seccompiler's code for those rules (BENCHMARKS.md, confinement).
use super::ThreadKind;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
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
            // TUNSETOFFLOAD: a virtio-net device hands its tap the offloads the guest accepted.
            let tun = shoji_devices::virtio::net::tap::TUNSETOFFLOAD;
            m.insert(libc::SYS_ioctl, one_of(1, &[libc::FIONBIO, libc::FIOCLEX, tun]));
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

/// The compiled filter for `kind`: allow the listed calls, trap everything else. It decides as
/// [`linear_program`] does, for every syscall number, architecture and argument (tested), but
/// finds the number by binary search ([`dispatch`]).
pub fn program(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    dispatch(rules(kind))
}

/// seccompiler's program for `kind` as it is: one linear chain (the reference [`program`] is
/// checked against, and what it cost before).
pub fn linear_program(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    linear(rules(kind))
}

fn linear(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, seccompiler::BackendError> {
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

/// Classic BPF opcodes (`linux/bpf_common.h`) of the dispatch code.
mod op {
    /// BPF_LD | BPF_W | BPF_ABS: load a 32-bit word of `seccomp_data`.
    pub const LD_ABS: u16 = 0x20;
    /// BPF_JMP | BPF_JA: jump by k (32 bits).
    pub const JA: u16 = 0x05;
    /// BPF_JMP | BPF_JEQ | BPF_K.
    pub const JEQ: u16 = 0x15;
    /// BPF_JMP | BPF_JGE | BPF_K.
    pub const JGE: u16 = 0x35;
    /// BPF_RET | BPF_K.
    pub const RET: u16 = 0x06;
}
/// `seccomp_data` offsets: the syscall number, then the architecture.
const NR: u32 = 0;
const ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What the filter does for a range of syscall numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Trap,
    /// On to seccompiler's code for the call's argument rules.
    Args,
}

/// The verdict for every syscall number (a u32 in `seccomp_data`), as ranges: each starts at
/// its number and runs to the next one's; the first starts at 0, the last runs to u32::MAX.
fn ranges(rules: &BTreeMap<i64, Vec<SeccompRule>>) -> Vec<(u32, Verdict)> {
    let mut v: Vec<(u32, Verdict)> = vec![(0, Verdict::Trap)];
    let mut push = |start: u32, verdict: Verdict| match v.last_mut() {
        Some(last) if last.0 == start => last.1 = verdict,
        _ => v.push((start, verdict)),
    };
    for (&nr, chain) in rules {
        // x86-64 numbers are small and non-negative; seccompiler refuses anything else anyway.
        let Ok(nr) = u32::try_from(nr) else { continue };
        push(nr, if chain.is_empty() { Verdict::Allow } else { Verdict::Args });
        if let Some(next) = nr.checked_add(1) {
            push(next, Verdict::Trap);
        }
    }
    // Merge neighbours with the same verdict (read, write, ... are 0, 1, ...).
    v.dedup_by(|b, a| a.1 == b.1);
    v
}

/// The same decisions as [`linear`]'s program, in front of it: check the architecture, load
/// the number, binary-search its range ([`ranges`]) and return its verdict, or jump into
/// seccompiler's program, built for the calls with argument rules only, which checks the
/// architecture and the number again and then the arguments. A foreign architecture jumps
/// there too, so seccompiler decides it as before.
fn dispatch(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, seccompiler::BackendError> {
    let ranges = ranges(&rules);
    let with_args: BTreeMap<i64, Vec<SeccompRule>> = rules.into_iter().filter(|(_, c)| !c.is_empty()).collect();
    let tail = linear(with_args)?;
    let (allow, trap) = (u32::from(SeccompAction::Allow), u32::from(SeccompAction::Trap));
    let mut out = vec![
        insn(op::LD_ABS, 0, 0, ARCH),
        insn(op::JEQ, 1, 0, AUDIT_ARCH_X86_64),
        insn(op::JA, 0, 0, 0), // to the tail, patched below
        insn(op::LD_ABS, 0, 0, NR),
    ];
    let mut to_tail = vec![2];
    search(&ranges, &mut out, &mut to_tail, allow, trap);
    for at in to_tail {
        out[at].k = (out.len() - at - 1) as u32;
    }
    out.extend(tail);
    Ok(out)
}

/// Appends the search over `ranges` (at least one), the number in the accumulator. Indices of
/// the jumps to the tail go to `to_tail`.
fn search(ranges: &[(u32, Verdict)], out: &mut Vec<sock_filter>, to_tail: &mut Vec<usize>, allow: u32, trap: u32) {
    if let [(_, verdict)] = ranges {
        match verdict {
            Verdict::Allow => out.push(insn(op::RET, 0, 0, allow)),
            Verdict::Trap => out.push(insn(op::RET, 0, 0, trap)),
            Verdict::Args => {
                to_tail.push(out.len());
                out.push(insn(op::JA, 0, 0, 0));
            }
        }
        return;
    }
    let mid = ranges.len() / 2;
    let at = out.len();
    // Below the middle range's start: the lower half, which follows; else the upper half. A
    // conditional jump reaches 255 instructions; past that it goes through a JA.
    out.push(insn(op::JGE, 0, 0, ranges[mid].0));
    let mut lower = Vec::new();
    let base = at + 1;
    let mut lower_tail = Vec::new();
    search(&ranges[..mid], &mut lower, &mut lower_tail, allow, trap);
    match u8::try_from(lower.len()) {
        Ok(n) => out[at].jt = n,
        Err(_) => {
            out[at].jf = 1;
            out.push(insn(op::JA, 0, 0, lower.len() as u32));
        }
    }
    let shift = out.len() - base;
    to_tail.extend(lower_tail.into_iter().map(|i| i + base + shift));
    out.extend(lower);
    search(&ranges[mid..], out, to_tail, allow, trap);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program as the kernel would on `seccomp_data` (the opcodes seccompiler
    /// and [`dispatch`] emit): its return value and how many instructions ran.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> (u32, usize) {
        let mut data = Vec::with_capacity(64);
        data.extend(nr.to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let (mut acc, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = &prog[pc];
            steps += 1;
            let k = i.k as usize;
            match i.code {
                op::LD_ABS => acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap()),
                op::RET => return (i.k, steps),
                op::JA => pc += k,
                op::JEQ => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                op::JGE => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
                0x54 => acc &= i.k, // BPF_ALU | BPF_AND | BPF_K
                c => panic!("opcode {c:#x} at {pc}"),
            }
            pc += 1;
        }
    }

    const KINDS: [ThreadKind; 3] = [ThreadKind::Vcpu(0), ThreadKind::Devices, ThreadKind::Vmm];

    /// Argument values worth trying: every value a rule names, neighbours, high bits set.
    fn values() -> Vec<u64> {
        use kvm_ioctl::*;
        let mut v = vec![0, 1, 2, 3, 4, 5, 6, 7, u64::MAX, 1 << 32, (1 << 32) | KVM_RUN];
        v.extend([KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_IRQFD, KVM_SET_GSI_ROUTING, KVM_SIGNAL_MSI, KVM_IOEVENTFD]);
        v.extend([KVM_RUN + 1, 0xae81, 0xae03, 0x4010_ae67]);
        v.extend([libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX, libc::TIOCSTI]);
        let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC, libc::F_SETLK];
        v.extend(fcntl.map(|c| c as u64));
        let prot = [libc::PROT_READ, libc::PROT_EXEC, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC];
        v.extend(prot.map(|c| c as u64));
        v.extend([libc::AF_UNIX, libc::AF_INET, libc::AF_NETLINK].map(|c| c as u64));
        v.extend([libc::CLONE_FS, libc::CLONE_NEWNS, libc::CLONE_FS | libc::CLONE_NEWUSER].map(|c| c as u64));
        v
    }

    #[test]
    fn the_search_decides_as_seccompilers_chain_for_every_number_arch_and_argument() {
        let numbers: Vec<u32> =
            (0..600).chain([0x4000_0000, 0x4000_0010, 0x7fff_ffff, u32::MAX - 1, u32::MAX]).collect();
        let arches = [AUDIT_ARCH_X86_64, 0x4000_0003 /* i386 */, 0];
        let values = values();
        let mut checked = 0;
        for kind in KINDS {
            let (fast, slow) = (program(kind).unwrap(), linear_program(kind).unwrap());
            for &nr in &numbers {
                for arch in arches {
                    let mut args = vec![[0u64; 6]];
                    if arch == AUDIT_ARCH_X86_64 && rules(kind).get(&i64::from(nr)).is_some_and(|c| !c.is_empty()) {
                        for i in 0..3 {
                            for &v in &values {
                                let mut a = [0u64; 6];
                                a[i] = v;
                                args.push(a);
                            }
                        }
                    }
                    for a in args {
                        let (f, s) = (run(&fast, nr, arch, a).0, run(&slow, nr, arch, a).0);
                        assert_eq!(f, s, "{kind:?}: syscall {nr} arch {arch:#x} args {a:x?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 5_000, "{checked}");
        // The cases that matter, so the test cannot pass on two equally wrong programs.
        let (allow, trap) = (u32::from(SeccompAction::Allow), u32::from(SeccompAction::Trap));
        let vcpu = program(ThreadKind::Vcpu(0)).unwrap();
        let ioctl = libc::SYS_ioctl as u32;
        assert_eq!(run(&vcpu, ioctl, AUDIT_ARCH_X86_64, [3, kvm_ioctl::KVM_RUN, 0, 0, 0, 0]).0, allow);
        assert_eq!(run(&vcpu, ioctl, AUDIT_ARCH_X86_64, [3, 0xae01, 0, 0, 0, 0]).0, trap);
        assert_eq!(run(&vcpu, libc::SYS_read as u32, AUDIT_ARCH_X86_64, [0; 6]).0, allow);
        assert_eq!(run(&vcpu, libc::SYS_execve as u32, AUDIT_ARCH_X86_64, [0; 6]).0, trap);
        let mmap = libc::SYS_mmap as u32;
        assert_eq!(run(&vcpu, mmap, AUDIT_ARCH_X86_64, [0, 4096, libc::PROT_EXEC as u64, 0, 0, 0]).0, trap);
        assert_eq!(run(&vcpu, libc::SYS_read as u32, 0x4000_0003, [0; 6]).0, libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn every_number_is_found_in_a_few_instructions() {
        // What the kernel walks per syscall number when the filter is attached, and what a
        // call without argument rules runs (the walk stops at an argument rule). seccompiler's
        // chain alone needs 2 per listed call.
        for kind in KINDS {
            let (fast, slow) = (program(kind).unwrap(), linear_program(kind).unwrap());
            let rules = rules(kind);
            let plain = |nr: &u32| rules.get(&i64::from(*nr)).is_none_or(|c| c.is_empty());
            let worst = |p: &[sock_filter]| {
                (0..500).filter(plain).map(|nr| run(p, nr, AUDIT_ARCH_X86_64, [0; 6]).1).max().unwrap()
            };
            let (f, s) = (worst(&fast), worst(&slow));
            assert!(f <= 24, "{kind:?}: {f} instructions at worst");
            assert!(s > 60, "{kind:?}: seccompiler's chain is long: {s}");
            assert!(fast.len() < 4096, "{kind:?}: {} instructions", fast.len());
        }
    }

    #[test]
    fn ranges_merge_neighbours_and_end_in_trap() {
        let r: BTreeMap<i64, Vec<SeccompRule>> =
            [(0, vec![]), (1, vec![]), (3, one_of(1, &[7])), (4, vec![])].into_iter().collect();
        use Verdict::*;
        assert_eq!(ranges(&r), [(0, Allow), (2, Trap), (3, Args), (4, Allow), (5, Trap)]);
        let r: BTreeMap<i64, Vec<SeccompRule>> = [(2, vec![])].into_iter().collect();
        assert_eq!(ranges(&r), [(0, Trap), (2, Allow), (3, Trap)]);
    }
}
