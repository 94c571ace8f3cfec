//! How a VM stops: the first reason any thread records (a vCPU exit, a device, a seccomp
//! trap, the host), and the eventfd that wakes the VM's owner to act on it.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest pulsed the reset line (i8042) or asked KVM to reset: Linux `reboot`.
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// A vCPU executed HLT with interrupts off and nothing can wake it.
    Halted,
    /// `VmConfig::timeout` ran out.
    Timeout,
    /// The host asked (`VmConfig::stop`).
    Stopped,
}

/// Where the first stop reason is recorded; `evt` wakes the VM's owner.
pub struct ExitSignal {
    pub reason: Mutex<Option<Result<StopReason, String>>>,
    pub evt: EventFd,
    /// A seccomp violation, recorded from the SIGSYS handler (an atomic: no lock there); 0: none.
    trap: AtomicU64,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal { reason: Mutex::new(None), evt: EventFd::new(libc::EFD_NONBLOCK)?, trap: AtomicU64::new(0) })
    }

    /// Records a packed seccomp violation (see [`crate::confine`]); the first one wins.
    /// Async-signal-safe.
    pub fn record_trap(&self, packed: u64) {
        let _ = self.trap.compare_exchange(0, packed, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The packed violation, if a filter fired.
    pub fn trap(&self) -> Option<u64> {
        Some(self.trap.load(Ordering::Acquire)).filter(|t| *t != 0)
    }

    /// The first reason wins; later ones (e.g. other vCPUs being stopped) are dropped.
    pub fn set(&self, r: Result<StopReason, String>) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(r);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal VM exit: {e}");
        }
    }

    pub fn take(&self) -> Option<Result<StopReason, String>> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
