//! What happens when a filter fires: `SECCOMP_RET_TRAP` raises SIGSYS on the offending thread,
//! and this handler, using only async-signal-safe calls (`write(2)`, atomics, a thread-local
//! read), writes one line naming the thread and the syscall to stderr, records the violation in
//! the VM's [`ExitSignal`] and wakes the VM's owner, which stops the VM with
//! [`crate::VmError::Seccomp`]. The syscall itself returns `-EPERM` to the thread, so the thread
//! runs on (with an error) until the teardown stops it.
//!
//! Why TRAP rather than `RET_KILL_PROCESS`: the VMM shares its process with the shim or the CLI,
//! and a killed process can neither say which thread did what nor clean up the sandbox; the
//! filter already refused the call, so nothing is gained by killing.
use super::seccomp::syscall_name;
use crate::exit::ExitSignal;
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: i32 = 1;
/// At most this many report lines per process: a thread that retries a refused call in a loop
/// must not flood the log (the first line is the one that matters; the VM is stopping anyway).
const MAX_REPORTS: u32 = 16;
static REPORTS: AtomicU32 = AtomicU32::new(0);

/// What the handler needs to know about the thread it interrupts.
pub(crate) struct ThreadSlot {
    /// The thread's name, as `/proc/PID/task/TID/comm` shows it.
    name: [u8; 16],
    name_len: usize,
    /// Packed [`super::ThreadKind`] and index, as stored in [`ExitSignal::trap`].
    tag: u64,
    exit: Arc<ExitSignal>,
}

thread_local! {
    // A const-initialised Cell of a raw pointer has no lazy initialisation and no destructor, so
    // reading it from a signal handler touches nothing but the thread's TLS block.
    static SLOT: Cell<*const ThreadSlot> = const { Cell::new(std::ptr::null()) };
    // The name outlives the slot: the filter stays on the thread after its VM work is done.
    static NAME: Cell<([u8; 16], usize)> = const { Cell::new(([0; 16], 0)) };
}

/// Keeps the current thread's slot alive; clears it when the thread's work ends.
pub(crate) struct SlotGuard(#[allow(dead_code)] Box<ThreadSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        SLOT.with(|s| s.set(std::ptr::null()));
    }
}

/// Registers the current thread with the handler (before its filter is installed).
pub(crate) fn register(name: &str, tag: u64, exit: Arc<ExitSignal>) -> SlotGuard {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    NAME.with(|c| c.set((buf, n)));
    let slot = Box::new(ThreadSlot { name: buf, name_len: n, tag, exit });
    SLOT.with(|s| s.set(&*slot as *const ThreadSlot));
    SlotGuard(slot)
}

static INSTALL: Once = Once::new();

/// Installs the process-wide SIGSYS handler (once).
pub(crate) fn install() -> Result<(), String> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we fill in the handler, flags
        // and an empty mask, and pass valid pointers to sigaction(2).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(format!("cannot install the SIGSYS handler: {}", std::io::Error::last_os_error()));
        }
    });
    result
}

/// The `_sigsys` member of the kernel's siginfo (x86-64 layout).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// A fixed-size line buffer: formatting without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn push_dec(&mut self, mut v: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&d[i..]);
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS its union
    // holds `_sigsys`, which `SigsysInfo` lays out.
    let si = unsafe { &*(info as *const SigsysInfo) };
    if si.code != SYS_SECCOMP {
        return;
    }
    let nr = si.syscall;
    let slot = SLOT.with(|s| s.get());
    // SAFETY: a non-null slot points into the Box a live SlotGuard of this very thread owns.
    let slot = unsafe { slot.as_ref() };
    if REPORTS.fetch_add(1, Ordering::Relaxed) < MAX_REPORTS {
        let mut l = Line { buf: [0; 192], len: 0 };
        l.push(b"shoji: seccomp: thread ");
        let (name, len) = match slot {
            Some(s) => (s.name, s.name_len),
            None => NAME.with(|c| c.get()),
        };
        l.push(if len == 0 { b"(unknown)" } else { &name[..len] });
        l.push(b" made forbidden syscall ");
        l.push_dec(u64::from(nr as u32));
        l.push(b" (");
        l.push(syscall_name(i64::from(nr)).as_bytes());
        l.push(if slot.is_some() { b"); stopping the VM\n" } else { b"); refused\n" });
        // SAFETY: write(2) is async-signal-safe; the buffer is valid for `len` bytes.
        unsafe { libc::write(libc::STDERR_FILENO, l.buf.as_ptr().cast(), l.len) };
    }
    if let Some(s) = slot {
        s.exit.record_trap(s.tag | u64::from(nr as u32));
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes from a valid u64 to the VM's exit eventfd.
        unsafe { libc::write(s.exit.evt.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    // The refused call returns -EPERM to the thread.
    // SAFETY: for a SA_SIGINFO handler `ctx` is the interrupted thread's ucontext; RAX holds the
    // syscall's return value when the handler returns.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
}
