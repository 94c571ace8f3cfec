//! vCPU threads: each runs KVM_RUN and dispatches its exits. A fatal exit (triple fault, KVM
//! internal error, unknown exit) stops the VM with a message naming the reason and the RIP.
use crate::bus::PioBus;
use crate::confine::{self, ThreadKind};
use crate::exit::{ExitSignal, StopReason};
use crate::pause::PauseGate;
use crate::pci::MmioBus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

/// Counters a test or `shoji bench` can read after the run.
#[derive(Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
}

pub struct VcpuThread {
    pub handle: JoinHandle<()>,
}

static KICK_HANDLER: Once = Once::new();

/// The signal used to knock a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub fn install_kick_handler() -> Result<(), String> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"));
    });
    result
}

pub struct VcpuContext {
    pub id: u8,
    /// Locked by this thread around each KVM_RUN, and by a snapshot while the VM is paused.
    pub fd: Arc<Mutex<VcpuFd>>,
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<AtomicBool>,
    /// Closed while the VM is paused: the thread parks before its next KVM_RUN.
    pub gate: Arc<PauseGate>,
    pub stats: Arc<VcpuStats>,
    /// What the thread confines itself to before its first KVM_RUN.
    pub confine: Arc<confine::Plan>,
}

fn rip(fd: &VcpuFd) -> String {
    fd.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "unknown".into())
}

impl VcpuContext {
    pub fn spawn(self) -> std::io::Result<VcpuThread> {
        let handle = std::thread::Builder::new().name(format!("vcpu{}", self.id)).spawn(move || self.run())?;
        Ok(VcpuThread { handle })
    }

    fn run(mut self) {
        let _confined = match confine::enter(ThreadKind::Vcpu(self.id), &self.confine, &self.exit) {
            Ok(c) => c,
            Err(e) => {
                self.exit.set(Err(format!("vCPU {}: cannot confine its thread: {e}", self.id)));
                return;
            }
        };
        while !self.stop.load(Ordering::Acquire) {
            if self.gate.is_closing() {
                self.complete_pending_io();
            }
            self.gate.pass(&self.stop);
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let outcome = self.step();
            if let Some(r) = outcome {
                if let Err(msg) = &r {
                    tracing::debug!(vcpu = self.id, "{msg}");
                }
                self.exit.set(r);
                break;
            }
        }
    }

    /// Before parking: a KVM_RUN that only finishes the I/O instruction of the last exit
    /// (immediate_exit), so a paused vCPU's state is whole and can be saved.
    fn complete_pending_io(&self) {
        let mut fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        fd.set_kvm_immediate_exit(1);
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
    }

    /// One KVM_RUN. `Some` ends the VM.
    fn step(&mut self) -> Option<Result<StopReason, String>> {
        let id = self.id;
        let mut fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        let exit = match fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
            Err(e) => return Some(Err(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.pio.read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(port, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                self.mmio.read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
                None
            }
            VcpuExit::Intr => None,
            VcpuExit::Hlt => Some(Ok(StopReason::Halted)),
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(Ok(StopReason::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => Some(Ok(StopReason::Reset)),
                KVM_SYSTEM_EVENT_CRASH => {
                    Some(Err(format!("guest crashed (KVM system event) on vCPU {id} at RIP {}", rip(&fd))))
                }
                k => Some(Err(format!("unknown KVM system event {k} on vCPU {id}"))),
            },
            VcpuExit::Shutdown => {
                Some(Err(format!("guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {id} at RIP {}", rip(&fd))))
            }
            VcpuExit::InternalError => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the kvm_run union.
                let sub = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(Err(format!("KVM internal error (suberror {sub}) on vCPU {id} at RIP {}", rip(&fd))))
            }
            VcpuExit::FailEntry(reason, cpu) => Some(Err(format!(
                "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu}) on vCPU {id} at RIP {}",
                rip(&fd)
            ))),
            other => {
                let name = format!("{other:?}");
                Some(Err(format!("unhandled vCPU exit {name} on vCPU {id} at RIP {}", rip(&fd))))
            }
        }
    }
}
