//! Starting a container process: the parent side (`spawn`) and the code that runs in the forked
//! children.
//!
//! Everything a child needs is computed by the agent beforehand into a [`Plan`] of C strings,
//! numbers and fds, so the children only make system calls: they never allocate, lock or panic
//! (the agent is multi-threaded; a fork copies only the calling thread).
//!
//! Stage 1 is a `fork()` of the agent. It closes every fd the plan does not name, joins the
//! container's cgroup (writes "0" to each `cgroup.procs`), joins the namespaces given by path
//! (`setns`), then `clone()`s stage 2 with `CLONE_PARENT` (so stage 2 is the agent's child) and the
//! flags of the namespaces to create, reports stage 2's pid on a pipe and exits. The clone puts
//! stage 2 in a new (or joined) pid namespace, which a process cannot enter itself.
//!
//! Stage 2 resets signals, becomes a session leader, sets up stdio (pipes, or a pty as the
//! controlling terminal), the root filesystem (mounts, devices, pivot_root, masked and read-only
//! paths), hostname, sysctls, cwd and rlimits. A container's init then reports "ready" and blocks
//! until `start`. Last come seccomp (before the credentials change when no_new_privs is off, as
//! runc does), uid/gid/groups, capabilities, no_new_privs, and execve. Any failure is written to
//! the report pipe as (step, index, errno); a successful execve closes the pipe (close-on-exec).
use super::reaper::{ExitCallback, Reaper};
use super::seccomp;
use super::sys;
use std::ffi::{c_char, c_int, c_ulong, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// What a child failed at (the `step` of a report). Listed once: the macro makes the enum and
/// the table `from_u32` searches.
macro_rules! steps {
    ($first:ident, $($step:ident),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub(crate) enum Step {
            $first = 1,
            $($step),*
        }

        impl Step {
            fn from_u32(v: u32) -> Option<Step> {
                [Step::$first, $(Step::$step),*].into_iter().find(|s| *s as u32 == v)
            }
        }
    };
}

steps!(
    CloseFds,
    JoinCgroup,
    Setns,
    Clone,
    Setsid,
    Stdio,
    Propagation,
    BindRoot,
    MountTarget,
    Mount,
    Remount,
    MountPropagation,
    Device,
    DevLink,
    Console,
    Sysctl,
    OomScoreAdj,
    PivotRoot,
    MaskPath,
    ReadonlyPath,
    ReadonlyRoot,
    Chroot,
    Hostname,
    Domainname,
    Chdir,
    Rlimit,
    Seccomp,
    Groups,
    Gid,
    Uid,
    Bounding,
    Caps,
    Ambient,
    NoNewPrivs,
    Exec,
    Start,
);

/// A failure reported by a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub step: Step,
    pub index: u32,
    pub errno: i32,
}

#[derive(Debug)]
pub(crate) enum MountKind {
    /// mount(source, target, fstype, flags, data)
    Mount,
    /// A bind mount, then a remount with `flags` when `remount`.
    Bind { remount: bool },
    /// Only a remount of an existing mount point with `flags`.
    Remount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Create {
    Dir,
    File,
}

#[derive(Debug)]
pub(crate) struct MountOp {
    pub kind: MountKind,
    pub source: Option<CString>,
    /// The destination relative to the rootfs, as resolved when planning (see `open_in_root`).
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: c_ulong,
    pub data: Option<CString>,
    pub propagation: Vec<c_ulong>,
    pub create: Create,
    /// Index of the spec's `mounts[]` entry (for error messages).
    pub spec_index: u32,
}

#[derive(Debug)]
pub(crate) struct DeviceOp {
    /// Relative to the rootfs.
    pub path: CString,
    pub mode: libc::mode_t,
    pub dev: libc::dev_t,
    pub uid: u32,
    pub gid: u32,
}

/// The root filesystem of a new container.
#[derive(Debug)]
pub(crate) struct RootSetup {
    pub rootfs: CString,
    /// Propagation applied to every mount of the new mount namespace first (MS_SLAVE|MS_REC).
    pub propagation: c_ulong,
    pub mounts: Vec<MountOp>,
    pub devices: Vec<DeviceOp>,
    /// (link target, link path relative to the rootfs) symlinks made in /dev; existing ones are
    /// left.
    pub links: Vec<(CString, CString)>,
    /// /dev/console relative to the rootfs: created before pivot_root; the pty is bind-mounted on it
    /// (terminal inits only).
    pub console: Option<CString>,
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
    pub readonly_root: bool,
    /// Skip pivot_root and go straight to MS_MOVE + chroot.
    pub no_pivot: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Caps {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
    pub last_cap: u32,
}

#[derive(Debug)]
pub(crate) enum StdioFds {
    Pipes {
        stdin: RawFd,
        stdout: RawFd,
        stderr: RawFd,
    },
    /// The process opens a pty from its own /dev/ptmx (after entering its root, so the pty
    /// belongs to the container's devpts and ttyname works), sends the master over `sock`, and
    /// makes the slave its controlling terminal and stdio.
    Tty {
        sock: RawFd,
        rows: u16,
        cols: u16,
    },
}

/// Everything a child needs; fds are numbers valid in the agent at fork time.
#[derive(Debug)]
pub(crate) struct Plan {
    pub join_cgroup: Vec<RawFd>,
    pub setns: Vec<(RawFd, c_int)>,
    pub clone_flags: c_ulong,
    pub stdio: StdioFds,
    pub report: RawFd,
    pub pid_pipe: RawFd,
    /// Container init: wait for a byte here before exec.
    pub start: Option<RawFd>,
    pub root: Option<RootSetup>,
    /// Exec: chroot to the container's root (an fd of `/proc/<init>/root`).
    pub chroot: Option<RawFd>,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub sysctls: Vec<(CString, CString)>,
    pub oom_score_adj: Option<CString>,
    pub cwd: CString,
    pub rlimits: Vec<(c_int, libc::rlimit)>,
    pub umask: Option<libc::mode_t>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub caps: Option<Caps>,
    pub no_new_privs: bool,
    pub seccomp: Option<Arc<seccomp::Program>>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Paths to try execve on, in order ($PATH lookup done ahead).
    pub exec_paths: Vec<CString>,
}

impl Plan {
    /// The fds stage 1 must keep open.
    fn keep_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = Vec::new();
        v.extend(&self.join_cgroup);
        v.extend(self.setns.iter().map(|(fd, _)| *fd));
        match self.stdio {
            StdioFds::Pipes { stdin, stdout, stderr } => v.extend([stdin, stdout, stderr]),
            StdioFds::Tty { sock, .. } => v.push(sock),
        }
        v.push(self.report);
        v.push(self.pid_pipe);
        v.extend(self.start);
        v.extend(self.chroot);
        v.retain(|fd| *fd > 2);
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// What `spawn` waits for after the process exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// The init reported ready (it now waits for start).
    Ready,
    /// The process exec'd the user program.
    Exec,
}

#[derive(Debug)]
pub(crate) enum SpawnError {
    Child(Failure),
    Other(String),
}

pub(crate) struct Spawned {
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
    /// The pty master a terminal process sent.
    pub tty: Option<OwnedFd>,
}

/// Parent ends and child ends of the sync pipes.
pub(crate) struct SyncPipes {
    pub report_r: OwnedFd,
    pub report_w: OwnedFd,
    pub pid_r: OwnedFd,
    pub pid_w: OwnedFd,
}

impl SyncPipes {
    pub fn new() -> std::io::Result<Self> {
        let (report_r, report_w) = sys::pipe()?;
        let (pid_r, pid_w) = sys::pipe()?;
        Ok(SyncPipes { report_r, report_w, pid_r, pid_w })
    }
}

/// Reads one report: Ok(true) for "ready", Ok(false) for end of file (the child exec'd or
/// exited), or the failure it reported.
pub(crate) fn read_report(fd: RawFd) -> Result<bool, SpawnError> {
    let mut tag = [0u8; 1];
    let n = sys::read_full(fd, &mut tag).map_err(|e| SpawnError::Other(format!("reading the child's report: {e}")))?;
    if n == 0 {
        return Ok(false);
    }
    match tag[0] {
        b'R' => Ok(true),
        b'E' => {
            let mut rec = [0u8; 12];
            let n = sys::read_full(fd, &mut rec)
                .map_err(|e| SpawnError::Other(format!("reading the child's report: {e}")))?;
            if n != rec.len() {
                return Err(SpawnError::Other("the child's report was cut short".into()));
            }
            let word = |i: usize| [rec[i], rec[i + 1], rec[i + 2], rec[i + 3]];
            let step = u32::from_ne_bytes(word(0));
            let index = u32::from_ne_bytes(word(4));
            let errno = i32::from_ne_bytes(word(8));
            match Step::from_u32(step) {
                Some(step) => Err(SpawnError::Child(Failure { step, index, errno })),
                None => Err(SpawnError::Other(format!("the child reported an unknown step {step}"))),
            }
        }
        t => Err(SpawnError::Other(format!("the child sent an unknown report {t:#x}"))),
    }
}

/// Forks the process described by `plan` (blocking: call from `spawn_blocking`). `child_fds` are
/// the child ends of pipes and sockets, closed in the agent right after the fork. `tty_sock` is
/// the agent's end of the socket a terminal process sends its pty master on. `on_exit` receives
/// the exit status. Waits `until` the child is ready or has exec'd.
pub(crate) fn spawn(
    plan: &Plan,
    pipes: SyncPipes,
    child_fds: Vec<OwnedFd>,
    tty_sock: Option<OwnedFd>,
    on_exit: ExitCallback,
    until: Until,
) -> Result<Spawned, SpawnError> {
    // Pointer arrays for execve, built before the fork (the children never allocate).
    let argv: Vec<*const c_char> = plan.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const c_char> = plan.envp.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let keep = plan.keep_fds();
    let SyncPipes { report_r, report_w, pid_r, pid_w } = pipes;
    debug_assert_eq!(plan.report, report_w.as_raw_fd());
    debug_assert_eq!(plan.pid_pipe, pid_w.as_raw_fd());

    // Stage 1's exit, so that spawn returns only once it is gone (it sits in the cgroup).
    let (stage1_tx, stage1_rx) = std::sync::mpsc::channel::<()>();
    let spawned = Reaper::global().with_registry(|reg| {
        // SAFETY: sigset_t values are plain data; sigfillset/pthread_sigmask only touch them and
        // this thread's mask. Signals stay blocked across the fork so no handler of the agent
        // runs in the child; the child resets them.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // SAFETY: fork(); the child only runs `stage1`, which makes system calls on data prepared
        // above and never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child; see stage1.
            unsafe { stage1(plan, &keep, argv.as_ptr(), envp.as_ptr()) }
        }
        let fork_err = std::io::Error::last_os_error();
        // SAFETY: restores this thread's signal mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        drop(child_fds);
        drop(report_w);
        drop(pid_w);
        if pid < 0 {
            return Err(SpawnError::Other(format!("fork: {fork_err}")));
        }
        reg.register(
            pid,
            Box::new(move |_| {
                let _ = stage1_tx.send(());
            }),
        );
        let mut buf = [0u8; 4];
        let n = sys::read_full(pid_r.as_raw_fd(), &mut buf)
            .map_err(|e| SpawnError::Other(format!("reading the child's pid: {e}")))?;
        if n != 4 {
            // Stage 1 failed before the clone: its report says why.
            return match read_report(report_r.as_raw_fd()) {
                Err(e) => Err(e),
                Ok(_) => Err(SpawnError::Other("the container process exited during setup".into())),
            };
        }
        let child = i32::from_ne_bytes(buf);
        reg.register(child, on_exit);
        let pidfd = sys::pidfd_open(child);
        Ok(Spawned { pid: child, pidfd, tty: None })
    });
    // Stage 1 exits right after reporting (or failing); a sender dropped unsent means fork failed.
    let _ = stage1_rx.recv_timeout(std::time::Duration::from_secs(5));
    let spawned = spawned?;

    let mut spawned = spawned;
    match read_report(report_r.as_raw_fd()) {
        Ok(r) if r == (until == Until::Ready) => {
            if let Some(sock) = tty_sock {
                // Sent before the ready report / the exec, so it is there now.
                match sys::recv_fd(sock.as_raw_fd()) {
                    Ok(fd) => spawned.tty = Some(fd),
                    Err(e) => {
                        kill(&spawned);
                        return Err(SpawnError::Other(format!("receiving the pty: {e}")));
                    }
                }
            }
            Ok(spawned)
        }
        Ok(_) => {
            kill(&spawned);
            Err(SpawnError::Other("the container process exited during setup".into()))
        }
        Err(e) => {
            kill(&spawned);
            Err(e)
        }
    }
}

fn kill(s: &Spawned) {
    let _ = sys::send_signal(s.pid, s.pidfd.as_ref(), libc::SIGKILL);
}

/// Lets a container init that reported ready go on to exec, and waits for the outcome.
pub(crate) fn release(start: OwnedFd, report: OwnedFd) -> Result<(), SpawnError> {
    if let Err(e) = sys::write_all(start.as_raw_fd(), b"S") {
        return Err(SpawnError::Other(format!("the init process is gone ({e})")));
    }
    drop(start);
    match read_report(report.as_raw_fd()) {
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Child side. Only system calls from here on.

/// Reports a failure and exits.
fn fail(report: RawFd, step: Step, index: u32, errno: i32) -> ! {
    let mut rec = [0u8; 13];
    rec[0] = b'E';
    rec[1..5].copy_from_slice(&(step as u32).to_ne_bytes());
    rec[5..9].copy_from_slice(&index.to_ne_bytes());
    rec[9..13].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write from a stack buffer; _exit never returns.
    unsafe {
        libc::write(report, rec.as_ptr().cast(), rec.len());
        libc::_exit(127)
    }
}

fn errno() -> i32 {
    sys::errno()
}

/// `r == -1` → fail with errno.
fn check(r: c_int, report: RawFd, step: Step, index: u32) {
    if r == -1 {
        fail(report, step, index, errno());
    }
}

fn checkl(r: libc::c_long, report: RawFd, step: Step, index: u32) {
    if r == -1 {
        fail(report, step, index, errno());
    }
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Closes every fd >= 3 not in `keep` (sorted).
unsafe fn close_fds_except(keep: &[RawFd]) -> c_int {
    let mut lo: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > lo {
            // SAFETY: close_range on a range of our own fd table.
            if unsafe { libc::syscall(libc::SYS_close_range, lo, fd - 1, 0) } != 0 {
                return close_fds_slow(keep);
            }
        }
        lo = fd + 1;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) } != 0 {
        return close_fds_slow(keep);
    }
    0
}

/// close_range is missing (Linux < 5.9): close one by one.
fn close_fds_slow(keep: &[RawFd]) -> c_int {
    // SAFETY: sysconf has no preconditions.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(1024, 1 << 16) as RawFd;
    for fd in 3..max {
        if !keep.contains(&fd) {
            // SAFETY: closing fds of our own table.
            unsafe { libc::close(fd) };
        }
    }
    0
}

/// Stage 1 (see the module doc). Never returns.
unsafe fn stage1(p: &Plan, keep: &[RawFd], argv: *const *const c_char, envp: *const *const c_char) -> ! {
    let r = p.report;
    // SAFETY: fd table of this (single-threaded) child.
    unsafe { close_fds_except(keep) };
    for (i, fd) in p.join_cgroup.iter().enumerate() {
        // SAFETY: write "0" (this process) to an open cgroup.procs.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            fail(r, Step::JoinCgroup, i as u32, errno());
        }
    }
    for (i, (fd, nstype)) in p.setns.iter().enumerate() {
        // SAFETY: setns on an fd of a namespace file.
        check(unsafe { libc::setns(*fd, *nstype) }, r, Step::Setns, i as u32);
    }
    let flags = p.clone_flags | libc::CLONE_PARENT as c_ulong | libc::SIGCHLD as c_ulong;
    // SAFETY: a raw clone without CLONE_VM and without a new stack behaves like fork: the child
    // continues here on a copy of our memory. This process is single-threaded.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        fail(r, Step::Clone, 0, errno());
    }
    if pid == 0 {
        // SAFETY: in the new child.
        unsafe { stage2(p, argv, envp) }
    }
    let pid = pid as i32;
    // SAFETY: write four bytes from a local; then exit.
    unsafe {
        libc::write(p.pid_pipe, (&pid as *const i32).cast(), 4);
        libc::_exit(0)
    }
}

/// Stage 2 (see the module doc). Never returns.
unsafe fn stage2(p: &Plan, argv: *const *const c_char, envp: *const *const c_char) -> ! {
    let r = p.report;
    // SAFETY: every call below is a plain system call on data prepared by the agent.
    unsafe {
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        check(libc::setsid(), r, Step::Setsid, 0);
        match p.stdio {
            StdioFds::Pipes { stdin, stdout, stderr } => {
                check(libc::dup2(stdin, 0), r, Step::Stdio, 0);
                check(libc::dup2(stdout, 1), r, Step::Stdio, 1);
                check(libc::dup2(stderr, 2), r, Step::Stdio, 2);
            }
            // After the root is set up (below).
            StdioFds::Tty { .. } => {}
        }
        if let Some(v) = &p.oom_score_adj {
            write_file(c"/proc/self/oom_score_adj".as_ptr(), v, r, Step::OomScoreAdj, 0);
        }
        for (i, (path, value)) in p.sysctls.iter().enumerate() {
            write_file(path.as_ptr(), value, r, Step::Sysctl, i as u32);
        }
        if let Some(h) = &p.hostname {
            check(libc::sethostname(h.as_ptr(), h.as_bytes().len()), r, Step::Hostname, 0);
        }
        if let Some(d) = &p.domainname {
            check(libc::setdomainname(d.as_ptr(), d.as_bytes().len()), r, Step::Domainname, 0);
        }
        if let Some(root) = &p.root {
            setup_root(root, r);
        }
        if let Some(fd) = p.chroot {
            check(libc::fchdir(fd), r, Step::Chroot, 0);
            check(libc::chroot(c".".as_ptr()), r, Step::Chroot, 1);
        }
        if let StdioFds::Tty { sock, rows, cols } = p.stdio {
            let console = p.root.as_ref().is_some_and(|root| root.console.is_some());
            setup_tty(sock, rows, cols, console, r);
        }
        check(libc::chdir(p.cwd.as_ptr()), r, Step::Chdir, 0);
        for (i, (res, lim)) in p.rlimits.iter().enumerate() {
            check(libc::setrlimit(*res as _, lim), r, Step::Rlimit, i as u32);
        }
        if let Some(start) = p.start {
            libc::write(r, b"R".as_ptr().cast(), 1);
            let mut b = [0u8; 1];
            loop {
                let n = libc::read(start, b.as_mut_ptr().cast(), 1);
                if n == 1 {
                    break;
                }
                if n == 0 || errno() != libc::EINTR {
                    // The agent gave up on this container.
                    libc::_exit(1);
                }
            }
            libc::close(start);
        }
        if let Some(u) = p.umask {
            libc::umask(u);
        }
        if !p.no_new_privs {
            if let Some(prog) = &p.seccomp {
                load_seccomp(prog, r);
            }
        }
        if let Some(c) = &p.caps {
            for cap in 0..=c.last_cap.min(63) {
                if c.bounding & (1u64 << cap) == 0 {
                    let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0);
                    if rc != 0 && errno() != libc::EINVAL {
                        fail(r, Step::Bounding, cap, errno());
                    }
                }
            }
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), r, Step::Caps, 0);
        }
        checkl(libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()), r, Step::Groups, 0);
        checkl(libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid), r, Step::Gid, 0);
        checkl(libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid), r, Step::Uid, 0);
        if let Some(c) = &p.caps {
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), r, Step::Caps, 1);
            #[repr(C)]
            struct Header {
                version: u32,
                pid: c_int,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let hdr = Header { version: 0x2008_0522, pid: 0 };
            let data = [
                Data {
                    effective: c.effective as u32,
                    permitted: c.permitted as u32,
                    inheritable: c.inheritable as u32,
                },
                Data {
                    effective: (c.effective >> 32) as u32,
                    permitted: (c.permitted >> 32) as u32,
                    inheritable: (c.inheritable >> 32) as u32,
                },
            ];
            checkl(libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()), r, Step::Caps, 2);
            check(
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong, 0, 0, 0),
                r,
                Step::Ambient,
                64,
            );
            for cap in 0..=c.last_cap.min(63) {
                if c.ambient & (1u64 << cap) != 0 {
                    let rc =
                        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as c_ulong, cap as c_ulong, 0, 0);
                    check(rc, r, Step::Ambient, cap);
                }
            }
        }
        if p.no_new_privs {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), r, Step::NoNewPrivs, 0);
            if let Some(prog) = &p.seccomp {
                load_seccomp(prog, r);
            }
        }
        let mut err = libc::ENOENT;
        for path in &p.exec_paths {
            libc::execve(path.as_ptr(), argv, envp);
            let e = errno();
            // Like execvp: keep looking after ENOENT/ENOTDIR; remember a more telling error.
            if e != libc::ENOENT && e != libc::ENOTDIR {
                err = e;
            }
        }
        fail(r, Step::Exec, 0, err)
    }
}

unsafe fn load_seccomp(prog: &seccomp::Program, r: RawFd) {
    let fprog =
        libc::sock_fprog { len: prog.insns.len() as u16, filter: prog.insns.as_ptr() as *mut libc::sock_filter };
    // SAFETY: seccomp(SET_MODE_FILTER) reads the program; Insn has sock_filter's layout.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, prog.flags as c_ulong, &fprog as *const _)
    };
    checkl(rc, r, Step::Seccomp, 0);
}

/// open(path, O_WRONLY) + one write of `value`.
unsafe fn write_file(path: *const c_char, value: &CString, r: RawFd, step: Step, index: u32) {
    // SAFETY: open/write/close with valid pointers.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        check(fd, r, step, index);
        let b = value.as_bytes();
        if libc::write(fd, b.as_ptr().cast(), b.len()) < 0 {
            fail(r, step, index, errno());
        }
        libc::close(fd);
    }
}

/// Opens `rel` (relative to the rootfs fd `root`) as if the rootfs were "/": absolute symlinks
/// and ".." stay inside it, and magic links (/proc/*/fd) are refused. What the agent resolved
/// when it planned may have been swapped for a symlink since; this resolution is the one that
/// counts, and it cannot lead outside the rootfs.
unsafe fn open_in_root(root: c_int, rel: *const c_char, flags: c_int) -> c_int {
    // SAFETY: an all-zero open_how is valid; openat2 reads it and the NUL-terminated path.
    unsafe {
        let mut how: libc::open_how = std::mem::zeroed();
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        libc::syscall(
            libc::SYS_openat2,
            root,
            rel,
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as c_int
    }
}

/// mkdir -p of the parent of `rel` inside the root, one component at a time (each opened with
/// `open_in_root`, each missing one made with mkdirat in the directory just opened). Returns an
/// O_PATH fd of the parent and the offset of the last component in `rel`, or an errno.
unsafe fn parent_in_root(root: c_int, rel: &CString) -> Result<(c_int, usize), c_int> {
    let b = rel.as_bytes();
    let slash = b.iter().rposition(|c| *c == b'/');
    let last = slash.map_or(0, |s| s + 1);
    let mut buf = [0u8; 4096];
    if b.len() >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    buf[..b.len()].copy_from_slice(b);
    // SAFETY: open_in_root/mkdirat/close on NUL-terminated stack strings and fds we own.
    unsafe {
        let mut dir = open_in_root(root, c".".as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
        if dir < 0 {
            return Err(errno());
        }
        let Some(slash) = slash else { return Ok((dir, last)) };
        let mut start = 0;
        for i in 1..=slash {
            if i != slash && buf[i] != b'/' {
                continue;
            }
            let saved = buf[i];
            buf[i] = 0;
            let mut next = open_in_root(root, buf.as_ptr().cast(), libc::O_PATH | libc::O_DIRECTORY);
            if next < 0 && errno() == libc::ENOENT {
                if libc::mkdirat(dir, buf[start..].as_ptr().cast(), 0o755) != 0 && errno() != libc::EEXIST {
                    let e = errno();
                    libc::close(dir);
                    return Err(e);
                }
                next = open_in_root(root, buf.as_ptr().cast(), libc::O_PATH | libc::O_DIRECTORY);
            }
            let e = errno();
            libc::close(dir);
            if next < 0 {
                return Err(e);
            }
            dir = next;
            buf[i] = saved;
            start = i + 1;
        }
        Ok((dir, last))
    }
}

/// An O_PATH fd of the mount target `rel` in the root, made (directory or empty file) when
/// missing; or an errno.
unsafe fn target_in_root(root: c_int, rel: &CString, create: Create) -> Result<c_int, c_int> {
    // SAFETY: as in parent_in_root; `rel[last..]` is the NUL-terminated last component.
    unsafe {
        let fd = open_in_root(root, rel.as_ptr(), libc::O_PATH);
        if fd >= 0 {
            return Ok(fd);
        }
        if errno() != libc::ENOENT {
            return Err(errno());
        }
        let (dir, last) = parent_in_root(root, rel)?;
        let name = rel.as_ptr().add(last);
        let rc = match create {
            Create::Dir => libc::mkdirat(dir, name, 0o755),
            Create::File => {
                let f = libc::openat(
                    dir,
                    name,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                );
                if f >= 0 {
                    libc::close(f);
                }
                f.min(0)
            }
        };
        let e = errno();
        libc::close(dir);
        if rc != 0 && e != libc::EEXIST {
            return Err(e);
        }
        let fd = open_in_root(root, rel.as_ptr(), libc::O_PATH);
        if fd < 0 {
            return Err(errno());
        }
        Ok(fd)
    }
}

/// "/proc/self/fd/<fd>", NUL-terminated, on the stack: the path mount(2) is given so that it
/// acts on exactly the file the fd holds.
fn fd_path(fd: c_int) -> [u8; 32] {
    let mut path = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    path[..prefix.len()].copy_from_slice(prefix);
    write_decimal(&mut path[prefix.len()..], fd.max(0) as u32);
    path
}

/// Writes `n` in decimal at the start of `out` (which has room for 10 digits).
fn write_decimal(out: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == digits.len() {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
}

/// Mount flags of the mount at `path` that a bind remount must keep (statvfs's ST_* values
/// equal the MS_* ones for these bits).
unsafe fn kept_flags(path: *const c_char) -> c_ulong {
    // SAFETY: statvfs into a zeroed local.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path, &mut st) != 0 {
            return 0;
        }
        (st.f_flag as c_ulong) & KEPT_FLAGS
    }
}

const KEPT_FLAGS: c_ulong =
    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME | libc::MS_NODIRATIME | libc::MS_RELATIME;

/// Mounts `m` on its target in the root (`root`: an fd of the rootfs). Each step reopens the
/// target with `open_in_root` and mounts on /proc/self/fd/N, never on a path the kernel would
/// resolve again (a symlink swapped in meanwhile could lead it outside the rootfs).
unsafe fn mount_in_root(root: c_int, m: &MountOp, r: RawFd) {
    let idx = m.spec_index;
    let null = std::ptr::null::<c_char>();
    // SAFETY: mount/fstatvfs/close on fds we own and NUL-terminated stack paths.
    unsafe {
        let fd = match target_in_root(root, &m.target, m.create) {
            Ok(fd) => fd,
            Err(e) => fail(r, Step::MountTarget, idx, e),
        };
        let reopen = |fd: c_int| -> c_int {
            libc::close(fd);
            let fd = open_in_root(root, m.target.as_ptr(), libc::O_PATH);
            check(fd, r, Step::MountTarget, idx);
            fd
        };
        let kept = |fd: c_int| -> c_ulong {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::fstatvfs(fd, &mut st) != 0 {
                return 0;
            }
            (st.f_flag as c_ulong) & KEPT_FLAGS
        };
        let src = opt_ptr(&m.source);
        let data: *const libc::c_void = opt_ptr(&m.data).cast();
        let mut fd = fd;
        let p = fd_path(fd);
        match m.kind {
            MountKind::Mount => {
                check(libc::mount(src, p.as_ptr().cast(), opt_ptr(&m.fstype), m.flags, data), r, Step::Mount, idx);
            }
            MountKind::Bind { remount } => {
                let rec = m.flags & libc::MS_REC;
                let rc = libc::mount(src, p.as_ptr().cast(), null, libc::MS_BIND | rec, std::ptr::null());
                check(rc, r, Step::Mount, idx);
                if remount {
                    fd = reopen(fd);
                    let flags = (m.flags & !libc::MS_REC) | libc::MS_BIND | libc::MS_REMOUNT | kept(fd);
                    let p = fd_path(fd);
                    check(libc::mount(null, p.as_ptr().cast(), null, flags, std::ptr::null()), r, Step::Remount, idx);
                }
            }
            MountKind::Remount => {
                let flags = m.flags | libc::MS_REMOUNT | kept(fd);
                check(libc::mount(null, p.as_ptr().cast(), null, flags, data), r, Step::Remount, idx);
            }
        }
        for prop in &m.propagation {
            fd = reopen(fd);
            let p = fd_path(fd);
            check(libc::mount(null, p.as_ptr().cast(), null, *prop, std::ptr::null()), r, Step::MountPropagation, idx);
        }
        libc::close(fd);
    }
}

unsafe fn setup_root(root: &RootSetup, r: RawFd) {
    // SAFETY: mount/mkdir/mknod/symlink/pivot_root calls on prepared C strings, in the
    // container's own mount namespace.
    unsafe {
        let null = std::ptr::null::<c_char>();
        check(libc::mount(null, c"/".as_ptr(), null, root.propagation, std::ptr::null()), r, Step::Propagation, 0);
        check(
            libc::mount(
                root.rootfs.as_ptr(),
                root.rootfs.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            r,
            Step::BindRoot,
            0,
        );
        // The rootfs as the bind mount just made: every path below is resolved inside it.
        let rootfd = libc::open(root.rootfs.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
        check(rootfd, r, Step::BindRoot, 1);
        for m in &root.mounts {
            mount_in_root(rootfd, m, r);
        }
        for (i, d) in root.devices.iter().enumerate() {
            let (dir, last) = match parent_in_root(rootfd, &d.path) {
                Ok(x) => x,
                Err(e) => fail(r, Step::Device, i as u32, e),
            };
            let name = d.path.as_ptr().add(last);
            if libc::mknodat(dir, name, d.mode, d.dev) != 0 {
                if errno() != libc::EEXIST {
                    fail(r, Step::Device, i as u32, errno());
                }
            } else {
                check(libc::fchownat(dir, name, d.uid, d.gid, libc::AT_SYMLINK_NOFOLLOW), r, Step::Device, i as u32);
            }
            libc::close(dir);
        }
        for (i, (target, link)) in root.links.iter().enumerate() {
            let (dir, last) = match parent_in_root(rootfd, link) {
                Ok(x) => x,
                Err(e) => fail(r, Step::DevLink, i as u32, e),
            };
            if libc::symlinkat(target.as_ptr(), dir, link.as_ptr().add(last)) != 0 && errno() != libc::EEXIST {
                fail(r, Step::DevLink, i as u32, errno());
            }
            libc::close(dir);
        }
        if let Some(target) = &root.console {
            match target_in_root(rootfd, target, Create::File) {
                Ok(fd) => libc::close(fd),
                Err(e) => fail(r, Step::Console, 0, e),
            };
        }

        // pivot_root(".", ".") leaves the old root stacked on "/", then detach it. From an
        // initramfs (the guest agent's root) pivot_root is impossible (EINVAL): move the rootfs
        // onto "/" and chroot instead, as runc's --no-pivot does.
        let oldroot = libc::open(c"/".as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC);
        check(oldroot, r, Step::PivotRoot, 0);
        check(libc::fchdir(rootfd), r, Step::PivotRoot, 1);
        libc::close(rootfd);
        let pivoted = !root.no_pivot && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0;
        if pivoted {
            check(libc::fchdir(oldroot), r, Step::PivotRoot, 2);
            check(
                libc::mount(null, c".".as_ptr(), null, libc::MS_SLAVE | libc::MS_REC, std::ptr::null()),
                r,
                Step::PivotRoot,
                3,
            );
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), r, Step::PivotRoot, 4);
            check(libc::chdir(c"/".as_ptr()), r, Step::PivotRoot, 5);
        } else if root.no_pivot || errno() == libc::EINVAL {
            check(
                libc::mount(root.rootfs.as_ptr(), c"/".as_ptr(), null, libc::MS_MOVE, std::ptr::null()),
                r,
                Step::Chroot,
                2,
            );
            check(libc::chroot(c".".as_ptr()), r, Step::Chroot, 3);
            check(libc::chdir(c"/".as_ptr()), r, Step::Chroot, 4);
        } else {
            fail(r, Step::PivotRoot, 6, errno());
        }
        libc::close(oldroot);

        for (i, p) in root.masked.iter().enumerate() {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(p.as_ptr(), &mut st) != 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(r, Step::MaskPath, i as u32, errno());
            }
            let rc = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                libc::mount(c"tmpfs".as_ptr(), p.as_ptr(), c"tmpfs".as_ptr(), libc::MS_RDONLY, std::ptr::null())
            } else {
                libc::mount(c"/dev/null".as_ptr(), p.as_ptr(), null, libc::MS_BIND, std::ptr::null())
            };
            check(rc, r, Step::MaskPath, i as u32);
        }
        for (i, p) in root.readonly.iter().enumerate() {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(p.as_ptr(), &mut st) != 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(r, Step::ReadonlyPath, i as u32, errno());
            }
            check(
                libc::mount(p.as_ptr(), p.as_ptr(), null, libc::MS_BIND | libc::MS_REC, std::ptr::null()),
                r,
                Step::ReadonlyPath,
                i as u32,
            );
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC | kept_flags(p.as_ptr());
            check(libc::mount(null, p.as_ptr(), null, flags, std::ptr::null()), r, Step::ReadonlyPath, i as u32);
        }
        if root.readonly_root {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(c"/".as_ptr());
            check(libc::mount(null, c"/".as_ptr(), null, flags, std::ptr::null()), r, Step::ReadonlyRoot, 0);
        }
    }
}

/// Opens a pty in the (container's) /dev/ptmx, sends the master to the agent over `sock`, makes
/// the slave the controlling terminal and stdio; with `console`, also bind-mounts it on
/// /dev/console.
unsafe fn setup_tty(sock: RawFd, rows: u16, cols: u16, console: bool, r: RawFd) {
    // SAFETY: ioctls and mounts on fds and C strings of this process.
    unsafe {
        let master = libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        check(master, r, Step::Console, 2);
        let unlock: c_int = 0;
        check(libc::ioctl(master, libc::TIOCSPTLCK, &unlock), r, Step::Console, 3);
        let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        check(slave, r, Step::Console, 4);
        if rows > 0 && cols > 0 {
            let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            check(libc::ioctl(master, libc::TIOCSWINSZ, &ws), r, Step::Console, 5);
        }
        if console {
            let mut n: u32 = 0;
            check(libc::ioctl(master, libc::TIOCGPTN, &mut n), r, Step::Console, 6);
            // "/dev/pts/<n>" without allocating.
            let mut path = [0u8; 32];
            let prefix = b"/dev/pts/";
            path[..prefix.len()].copy_from_slice(prefix);
            write_decimal(&mut path[prefix.len()..], n);
            let null = std::ptr::null::<c_char>();
            let rc = libc::mount(path.as_ptr().cast(), c"/dev/console".as_ptr(), null, libc::MS_BIND, std::ptr::null());
            check(rc, r, Step::Console, 7);
        }
        if send_fd(sock, master) != 0 {
            fail(r, Step::Console, 8, errno());
        }
        libc::close(master);
        check(libc::ioctl(slave, libc::TIOCSCTTY, 0), r, Step::Stdio, 3);
        for i in 0..3 {
            check(libc::dup2(slave, i), r, Step::Stdio, i as u32);
        }
    }
}

/// Sends `fd` over a unix socket (SCM_RIGHTS), without allocating.
unsafe fn send_fd(sock: RawFd, fd: RawFd) -> c_int {
    // SAFETY: msghdr/cmsghdr built on stack buffers sized with CMSG_SPACE.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut buf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return -1;
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), fd);
        if libc::sendmsg(sock, &msg, 0) == 1 {
            0
        } else {
            -1
        }
    }
}
