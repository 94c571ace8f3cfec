//! VMM confinement, in process and per thread: every thread the library starts for a VM (the
//! vCPU threads `vcpuN`, the device thread `devices`, and the VM's own thread `shoji-vm` when
//! [`crate::vm::spawn`] starts it) confines itself before it touches guest-controlled data:
//!
//! 1. capabilities: the bounding, ambient, inheritable, permitted and effective sets of the
//!    thread shrink to what it needs: none for vCPUs and the VM thread, the file-ownership ones
//!    for the device thread (the virtio-fs server creates files as the guest's uid);
//! 2. Landlock (best effort; one log line if the kernel has none): the device thread may open
//!    only the VM's disk images and shared directories, the vCPU threads nothing;
//! 3. seccomp: an allowlist per thread kind ([`seccomp`]); a call outside it traps, and the
//!    SIGSYS handler (`sigsys`) reports it in one line and stops the VM with
//!    [`crate::VmError::Seccomp`].
//!
//! All three are per thread, so the caller's threads (the CLI's main thread, the shim's tokio
//! workers) stay as they were. Rlimits are per process: [`apply_rlimits`] only raises the
//! NOFILE soft limit to the hard one and leaves FSIZE alone, see there.
//!
//! Opt-out: `VmConfig::confine = false`, or `SHOJI_SECCOMP=off` in the environment (read by
//! [`default_enabled`]), for benchmark comparisons and the test that shows the difference only.
pub mod landlock;
pub mod seccomp;
pub(crate) mod sigsys;

use crate::exit::ExitSignal;
use std::path::PathBuf;
use std::sync::{Arc, Once, OnceLock};

/// The kinds of thread the VMM runs for a VM; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// `vcpuN`: KVM_RUN and the PIO/MMIO exits.
    Vcpu(u8),
    /// `devices`: the event loop serving virtio queues and device backends.
    Devices,
    /// `shoji-vm`: the VM's own thread after set-up: waits, then tears down.
    Vmm,
}

impl ThreadKind {
    /// The thread's name (also what `/proc/PID/task/TID/comm` shows).
    pub fn name(self) -> String {
        match self {
            ThreadKind::Vcpu(i) => format!("vcpu{i}"),
            ThreadKind::Devices => "devices".into(),
            ThreadKind::Vmm => "shoji-vm".into(),
        }
    }

    fn filter_index(self) -> usize {
        match self {
            ThreadKind::Vcpu(_) => 0,
            ThreadKind::Devices => 1,
            ThreadKind::Vmm => 2,
        }
    }

    /// Packed for [`ExitSignal::record_trap`]: bit 63 set, kind in bits 40.., index in 32..40.
    fn tag(self) -> u64 {
        let (k, i) = match self {
            ThreadKind::Vcpu(i) => (1u64, u64::from(i)),
            ThreadKind::Devices => (2, 0),
            ThreadKind::Vmm => (3, 0),
        };
        (1 << 63) | (k << 40) | (i << 32)
    }

    fn from_tag(t: u64) -> Option<(ThreadKind, u32)> {
        let nr = t as u32;
        let kind = match (t >> 40) & 0xff {
            1 => ThreadKind::Vcpu(((t >> 32) & 0xff) as u8),
            2 => ThreadKind::Devices,
            3 => ThreadKind::Vmm,
            _ => return None,
        };
        Some((kind, nr))
    }
}

/// A call a filter refused: which thread, which syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub thread: String,
    pub syscall: u32,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = seccomp::syscall_name(i64::from(self.syscall));
        write!(f, "thread {} made forbidden syscall {} ({name})", self.thread, self.syscall)
    }
}

/// The violation recorded in `exit`, if a filter fired.
pub fn violation(exit: &ExitSignal) -> Option<Violation> {
    let (kind, syscall) = ThreadKind::from_tag(exit.trap()?)?;
    Some(Violation { thread: kind.name(), syscall })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("seccomp filter for {0}: {1}")]
    Filter(String, String),
    #[error("capabilities of {0}: {1}")]
    Caps(String, std::io::Error),
    #[error("landlock for {0}: {1}")]
    Landlock(String, String),
    #[error("{0}")]
    Signal(String),
}

/// What the threads of one VM are confined to.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Off only for benchmark comparisons and the test of the difference.
    pub enabled: bool,
    /// Files and directories the device thread may open: (path, writable).
    pub device_paths: Vec<(PathBuf, bool)>,
}

/// The default of `VmConfig::confine`: on, unless `SHOJI_SECCOMP=off`.
pub fn default_enabled() -> bool {
    std::env::var_os("SHOJI_SECCOMP").is_none_or(|v| v != "off")
}

/// Keeps the current thread registered with the SIGSYS handler while it serves the VM.
pub struct Confined(#[allow(dead_code)] Option<sigsys::SlotGuard>);

impl Confined {
    /// Nothing to keep: the thread is not confined.
    pub fn none() -> Self {
        Confined(None)
    }
}

static PROGRAMS: OnceLock<Result<[seccompiler::BpfProgram; 3], String>> = OnceLock::new();

fn program(kind: ThreadKind) -> Result<&'static seccompiler::BpfProgram, ConfineError> {
    let all = PROGRAMS.get_or_init(|| {
        let p = |k| seccomp::program(k).map_err(|e| e.to_string());
        Ok([p(ThreadKind::Vcpu(0))?, p(ThreadKind::Devices)?, p(ThreadKind::Vmm)?])
    });
    match all {
        Ok(a) => Ok(&a[kind.filter_index()]),
        Err(e) => Err(ConfineError::Filter(kind.name(), e.clone())),
    }
}

/// Confines the calling thread as `kind` (see the module doc). A violation later is recorded
/// in `exit` and wakes its eventfd. Keep the result until the thread's VM work is done.
pub fn enter(kind: ThreadKind, plan: &Plan, exit: &Arc<ExitSignal>) -> Result<Confined, ConfineError> {
    if !plan.enabled {
        return Ok(Confined(None));
    }
    let name = kind.name();
    sigsys::install().map_err(ConfineError::Signal)?;
    let prog = program(kind)?;
    drop_capabilities(kind).map_err(|e| ConfineError::Caps(name.clone(), e))?;
    landlock::restrict(kind, plan).map_err(|e| ConfineError::Landlock(name.clone(), e))?;
    let guard = sigsys::register(&name, kind.tag(), exit.clone());
    seccompiler::apply_filter(prog).map_err(|e| ConfineError::Filter(name, e.to_string()))?;
    Ok(Confined(Some(guard)))
}

/// The capabilities the device thread keeps: the virtio-fs server acts on files as the guest's
/// uid/gid (setresuid/setresgid per request) and on files the guest owns.
const DEVICE_CAPS: &[u32] = &[
    0, // CAP_CHOWN
    1, // CAP_DAC_OVERRIDE
    2, // CAP_DAC_READ_SEARCH
    3, // CAP_FOWNER
    4, // CAP_FSETID
    6, // CAP_SETGID
    7, // CAP_SETUID
];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Shrinks the calling thread's capability sets (bounding set first: dropping from it needs
/// CAP_SETPCAP, which goes last). A process without capabilities has nothing to drop.
fn drop_capabilities(kind: ThreadKind) -> std::io::Result<()> {
    let keep: &[u32] = match kind {
        ThreadKind::Devices => DEVICE_CAPS,
        ThreadKind::Vcpu(_) | ThreadKind::Vmm => &[],
    };
    for cap in 0..64u32 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => break, // past the kernel's last capability
                Some(libc::EPERM) => break,  // no CAP_SETPCAP: not privileged, nothing to drop
                _ => return Err(e),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    let mut hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData for version 3; both pointers are valid.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut mask = [0u32; 2];
    for c in keep {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    for (d, m) in data.iter_mut().zip(mask) {
        d.effective &= m;
        d.permitted &= m;
        d.inheritable = 0;
    }
    let hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: capset reads a header and two CapData; it only ever lowers this thread's sets here.
    if unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

static RLIMITS: Once = Once::new();

/// Process-wide limits, set once. They are shared with the shim or the CLI, so they only go
/// where that cannot break them:
/// - RLIMIT_NOFILE: soft raised to the hard limit, so the virtio-fs handle caps (not EMFILE in
///   the middle of a request) are what bounds a guest's open files; the hard limit stays.
/// - RLIMIT_FSIZE: left as it is. It is per process and would cut the guest's disk images and
///   shared files as well as the shim's own files; the console log is bounded by its writer.
pub fn apply_rlimits() {
    RLIMITS.call_once(|| {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                    tracing::warn!("RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
                }
            }
        }
    });
}
