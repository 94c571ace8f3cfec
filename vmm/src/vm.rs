//! One VM from config to exit: validate, create, load, run, tear down. Teardown always joins
//! every vCPU thread and drops every fd and mapping, so a process can boot VMs in a loop.
use crate::boot::{self, BootError};
use crate::bus::PioBus;
use crate::confine::{self, ThreadKind};
use crate::cpuid;
use crate::exit::{ExitSignal, StopReason};
use crate::host;
use crate::layout::{self, KVM_TSS_ADDRESS, MIN_MEMORY_MIB};
use crate::mptable;
use crate::pause::{PauseError, PauseGate};
use crate::pci::{
    self, AttachedDevice, DeviceSet, DiskConfig, EventLoop, Hotplug, HotplugError, HotplugStats, NetConfig,
    PciSetupError, ShareConfig,
};
use crate::regs::{self, RegsError};
use crate::snapshot::{self, DeviceState, SnapshotError, VcpuState, VmState};
use crate::vcpu::{self, VcpuContext, VcpuStats};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use shoji_devices::legacy::{ConsoleWriter, Serial, I8042};
use shoji_devices::legacy::{COM1_BASE, COM1_GSI, COM1_LEN, I8042_BASE, I8042_LEN};
use shoji_devices::model::PciPath;
use shoji_devices::pci::{PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use shoji_devices::virtio::block::Block;
use shoji_devices::virtio::fs::Fs;
use shoji_devices::virtio::vsock::Vsock;
use shoji_devices::virtio::VirtioPciDevice;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// Where the guest's serial console goes.
pub enum SerialOut {
    Stdout,
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
    Discard,
}

/// The kernel to boot: a file, or an image already in memory (the built-in test guests).
#[derive(Debug, Clone)]
pub enum KernelImage {
    Path(PathBuf),
    Bytes { name: &'static str, data: &'static [u8] },
}

/// Where the VM's interrupt controllers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqChip {
    /// LAPICs, IOAPIC and PIC in the kernel, and the PIT (Firecracker's model): what a Linux
    /// guest with legacy devices (the serial console's IRQ 4) needs.
    #[default]
    InKernel,
    /// LAPICs only (KVM_CAP_SPLIT_IRQCHIP with no user-space IOAPIC or PIC) and no PIT: for
    /// guests whose devices are MSI-X only and that time with the LAPIC (the test guests). The
    /// serial port has no interrupt; the MP table lists no IOAPIC. Skips the in-kernel irqchip
    /// and PIT set-up, which wait on RCU grace periods here.
    Split,
}

pub struct VmConfig {
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    /// The complete guest command line (see [`crate::cmdline`] for the defaults).
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub serial: SerialOut,
    /// virtio-blk disks, on PCI slots 01, 02, ... in this order.
    pub disks: Vec<DiskConfig>,
    /// virtio-fs shares, on the PCI slots after the disks.
    pub shares: Vec<ShareConfig>,
    /// The hybrid vsock device: host side is a unix socket at this path (Firecracker's
    /// protocol: `CONNECT <port>` in, `OK <port>` back; guest connections go to `PATH_<port>`).
    pub vsock: Option<PathBuf>,
    /// When this eventfd becomes readable the VM is stopped ([`StopReason::Stopped`]): how a
    /// front end turns SIGTERM/SIGINT, or its own decision, into a clean teardown.
    pub stop: Option<Arc<EventFd>>,
    /// Stop the VM with [`StopReason::Timeout`] after this long.
    pub timeout: Option<Duration>,
    /// Confine the VMM's threads (seccomp, Landlock, capabilities: [`crate::confine`]). On by
    /// default; off only for benchmark comparisons (`SHOJI_SECCOMP=off`).
    pub confine: bool,
    /// The interrupt controllers (a snapshot's VM must have been configured alike).
    pub irqchip: IrqChip,
    /// Restore the VM saved in this snapshot directory ([`VmControl::snapshot`]) instead of
    /// booting: the kernel, initrd and command line are not used; vCPUs, memory and boot
    /// devices must be configured as when it was taken (checked).
    pub restore: Option<PathBuf>,
}

impl VmConfig {
    pub fn new(kernel: KernelImage) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            serial: SerialOut::Stdout,
            disks: Vec::new(),
            shares: Vec::new(),
            vsock: None,
            stop: None,
            timeout: None,
            confine: confine::default_enabled(),
            irqchip: IrqChip::InKernel,
            restore: None,
        }
    }
}

/// Every error names the field or the stage it comes from, on one line.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("kernel: {0}: {1}")]
    KernelFile(PathBuf, std::io::Error),
    #[error("initrd: {0}: {1}")]
    InitrdFile(PathBuf, std::io::Error),
    #[error("vcpus: {0} is out of range (1..={1} on this host)")]
    Vcpus(u8, u8),
    #[error("memory: {0} MiB is out of range ({MIN_MEMORY_MIB}..={1} MiB: the host has {1} MiB)")]
    Memory(u64, u64),
    #[error("{0}")]
    Disk(#[from] shoji_devices::virtio::block::BlockError),
    #[error("{0}")]
    Share(#[from] shoji_devices::virtio::fs::FsError),
    #[error("{0}")]
    Vsock(#[from] shoji_devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Pci(#[from] PciSetupError),
    #[error("serial: {0}: {1}")]
    SerialFile(PathBuf, std::io::Error),
    #[error("kvm: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("vCPU set-up: {0}")]
    Regs(#[from] RegsError),
    #[error("VMM: {0}")]
    Internal(String),
    /// A VMM thread made a syscall outside its filter (one line names the thread and the call).
    #[error("seccomp: {0}; the VM was stopped")]
    Seccomp(confine::Violation),
    #[error("confinement: {0}")]
    Confine(#[from] confine::ConfineError),
    /// The guest did something the VMM cannot continue from.
    #[error("{0}")]
    Guest(String),
    /// A hot-add or unplug on a running VM failed ([`VmControl`]).
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// What a finished VM reports.
#[derive(Debug)]
pub struct VmOutcome {
    pub reason: StopReason,
    pub exits: u64,
    pub pio_unclaimed: u64,
    pub mmio_unclaimed: u64,
    pub serial_write_errors: u64,
    /// Malformed requests the guest sent to virtio devices.
    pub device_guest_errors: u64,
    pub devices: Vec<AttachedDevice>,
}

struct Validated {
    /// None when restoring a snapshot.
    kernel: Option<File>,
    initrd: Option<File>,
    devices: DeviceSet,
}

fn open_kernel(image: &KernelImage) -> Result<File, VmError> {
    match image {
        KernelImage::Path(p) => File::open(p).map_err(|e| VmError::KernelFile(p.clone(), e)),
        KernelImage::Bytes { name, data } => {
            memfd_with(name, data).map_err(|e| VmError::KernelFile(PathBuf::from(name), e))
        }
    }
}

/// An anonymous in-memory file holding `data`, so built-in images go through the same loader.
fn memfd_with(name: &str, data: &[u8]) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data)?;
    Ok(f)
}

fn validate(cfg: &VmConfig, max_vcpus: u8) -> Result<Validated, VmError> {
    let kernel = match cfg.restore {
        Some(_) => None,
        None => {
            let mut kernel = open_kernel(&cfg.kernel)?;
            boot::kernel_format(&mut kernel)?;
            Some(kernel)
        }
    };
    let initrd = match &cfg.initrd {
        Some(p) => {
            let f = File::open(p).map_err(|e| VmError::InitrdFile(p.clone(), e))?;
            let md = f.metadata().map_err(|e| VmError::InitrdFile(p.clone(), e))?;
            if !md.is_file() {
                return Err(VmError::InitrdFile(p.clone(), std::io::Error::other("not a regular file")));
            }
            Some(f)
        }
        None => None,
    };
    if cfg.vcpus == 0 || cfg.vcpus > max_vcpus {
        return Err(VmError::Vcpus(cfg.vcpus, max_vcpus));
    }
    let host_mib = host::memory_mib().unwrap_or(u64::MAX >> 20);
    if cfg.memory_mib < MIN_MEMORY_MIB || cfg.memory_mib > host_mib {
        return Err(VmError::Memory(cfg.memory_mib, host_mib));
    }
    boot::build_cmdline(&cfg.cmdline)?;
    let disks = cfg
        .disks
        .iter()
        .map(|d| Block::open(&d.path, d.read_only).map(|b| (d.clone(), b)))
        .collect::<Result<Vec<_>, _>>()?;
    let shares = cfg
        .shares
        .iter()
        .map(|s| Fs::new(&s.tag, &s.dir, s.read_only).map(|f| (s.clone(), f)))
        .collect::<Result<Vec<_>, _>>()?;
    let vsock = match &cfg.vsock {
        Some(p) => Some(Vsock::new(shoji_devices::model::GUEST_CID, p)?),
        None => None,
    };
    Ok(Validated { kernel, initrd, devices: DeviceSet { disks, shares, vsock } })
}

/// The most vCPUs a VM may have here: KVM's limit, capped by the MP table's APIC ID space.
pub fn max_vcpus(kvm: &Kvm) -> u8 {
    kvm.get_max_vcpus().min(usize::from(mptable::MAX_CPUS)) as u8
}

fn create_memory(vm: &VmFd, mem_mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let bytes = mem_mib << 20;
    let ranges: Vec<(GuestAddress, usize)> =
        layout::ram_regions(bytes).into_iter().map(|(a, s)| (a, s as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::GuestMemory(format!("{e:?}")))?;
    register_memory(vm, mem)
}

/// Guest RAM mapped private copy-on-write from a snapshot's memory file (regions back to back):
/// pages the guest never writes stay shared with the page cache and every other VM restored
/// from the same file.
fn restore_memory(vm: &VmFd, file: &File, mem_mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let gm = |e: &dyn std::fmt::Debug| VmError::GuestMemory(format!("{e:?}"));
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, size) in layout::ram_regions(mem_mib << 20) {
        let fd = file.try_clone().map_err(|e| gm(&e))?;
        let mapping = MmapRegion::<()>::build(
            Some(FileOffset::new(fd, offset)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .map_err(|e| gm(&e))?;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or_else(|| gm(&"region past the address space"))?);
        offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| gm(&e))?;
    register_memory(vm, mem)
}

fn register_memory(vm: &VmFd, mem: GuestMemoryMmap) -> Result<GuestMemoryMmap, VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|e| VmError::GuestMemory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM fd: the VM is
        // dropped (and its vCPUs joined) before `mem` in `run`.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(mem)
}

/// The console sink. A file is capped ([`crate::logfile::CONSOLE_LOG_MAX`], a ring past it): the
/// guest decides how much it prints.
pub fn serial_writer(out: SerialOut) -> Result<ConsoleWriter, VmError> {
    let w: Box<dyn Write + Send> = match out {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(
            crate::logfile::CappedLog::create(&p, crate::logfile::CONSOLE_LOG_MAX)
                .map_err(|e| VmError::SerialFile(p.clone(), e))?,
        ),
        SerialOut::Writer(w) => w,
        SerialOut::Discard => Box::new(std::io::sink()),
    };
    Ok(ConsoleWriter::new(w))
}

/// Checks `cfg` the way [`run`] does, without creating a VM: for front ends that want to report
/// bad input before saying anything else.
pub fn check(cfg: &VmConfig) -> Result<(), VmError> {
    let kvm = Kvm::new().map_err(|e| VmError::Kvm("/dev/kvm", e))?;
    validate(cfg, max_vcpus(&kvm)).map(drop)
}

/// Boots the VM described by `cfg` and blocks until it stops. The calling thread is not
/// confined (it is the caller's); the VM's own threads are (see [`crate::confine`]).
pub fn run(cfg: VmConfig) -> Result<VmOutcome, VmError> {
    run_on(cfg, false, None)
}

/// Boots the VM on a new thread `shoji-vm` that confines itself too (as [`ThreadKind::Vmm`])
/// once the vCPU and device threads run; `done` sees the result on that thread before it ends.
pub fn spawn<F>(cfg: VmConfig, done: F) -> std::io::Result<std::thread::JoinHandle<Result<VmOutcome, VmError>>>
where
    F: FnOnce(&Result<VmOutcome, VmError>) + Send + 'static,
{
    spawn_inner(cfg, None, done)
}

/// [`spawn`], with `control` serving hotplug for the VM while it runs (from when its devices
/// are up until it stops; [`HotplugError::NotRunning`] outside that).
pub fn spawn_with_control<F>(
    cfg: VmConfig,
    control: Arc<VmControl>,
    done: F,
) -> std::io::Result<std::thread::JoinHandle<Result<VmOutcome, VmError>>>
where
    F: FnOnce(&Result<VmOutcome, VmError>) + Send + 'static,
{
    spawn_inner(cfg, Some(control), done)
}

fn spawn_inner<F>(
    cfg: VmConfig,
    control: Option<Arc<VmControl>>,
    done: F,
) -> std::io::Result<std::thread::JoinHandle<Result<VmOutcome, VmError>>>
where
    F: FnOnce(&Result<VmOutcome, VmError>) + Send + 'static,
{
    std::thread::Builder::new().name(ThreadKind::Vmm.name()).spawn(move || {
        let r = run_on(cfg, true, control);
        done(&r);
        r
    })
}

/// A running VM's hotplug handle: virtio-blk disks plugged in and out while the guest runs
/// (the mechanism: [`Hotplug`]). Shared between threads; one lock serialises plugs, so
/// concurrent calls run one after the other. Call it from the caller's own (unconfined)
/// threads: it opens disk files and makes KVM calls there.
#[derive(Default)]
pub struct VmControl {
    hotplug: Mutex<Option<Hotplug>>,
    /// The running VM's vCPU threads, for pause and resume; detached before they are joined.
    vcpus: Mutex<Option<Vcpus>>,
}

/// What pausing needs of the vCPU threads: their gate, and their pthreads to kick; and what a
/// snapshot reads of the paused machine.
struct Vcpus {
    gate: Arc<PauseGate>,
    threads: Vec<libc::pthread_t>,
    machine: Machine,
}

/// The parts of a running VM a snapshot saves.
struct Machine {
    vm: Arc<VmFd>,
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    serial: Arc<Mutex<Serial>>,
    root: Arc<Mutex<PciRoot>>,
    boot: Vec<(AttachedDevice, Arc<Mutex<VirtioPciDevice>>)>,
    mem: GuestMemoryMmap,
    memory_mib: u64,
    /// In-kernel PIC, IOAPIC and PIT.
    legacy: bool,
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(VmControl::default())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Hotplug) -> Result<T, HotplugError>) -> Result<T, HotplugError> {
        let mut g = self.hotplug.lock().unwrap_or_else(|p| p.into_inner());
        f(g.as_mut().ok_or(HotplugError::NotRunning)?)
    }

    /// Whether a VM is up for hotplug now.
    pub fn is_running(&self) -> bool {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Opens `disk` on the calling thread and plugs it into the lowest free PCI slot after the
    /// boot devices; returns its path, by which the guest agent finds it after a bus rescan.
    pub fn add_disk(&self, disk: DiskConfig) -> Result<PciPath, HotplugError> {
        self.with(|h| h.add_disk(&disk))
    }

    /// Shares `share.dir` with the running VM as a new virtio-fs device (its own device thread,
    /// confined to that directory); returns its PCI path. The tag must be new in the VM.
    pub fn add_share(&self, share: ShareConfig) -> Result<PciPath, HotplugError> {
        self.with(|h| h.add_share(&share))
    }

    /// Plugs a virtio-net device on an open tap into the running VM; returns its PCI path.
    pub fn add_net(&self, net: NetConfig) -> Result<PciPath, HotplugError> {
        self.with(|h| h.add_net(net))
    }

    /// Unplugs the hot-plugged device at `path`, released by the guest or not (the caller asks
    /// the agent first, and logs it when the guest did not let go): from then on the guest's
    /// accesses to it hit nothing and read all ones; its slot, BAR space and GSIs are reused.
    /// [`HotplugError::Leak`] means it is gone but a KVM call to give something back failed.
    pub fn remove(&self, path: &PciPath) -> Result<(), HotplugError> {
        self.with(|h| h.remove(path))
    }

    /// Every device on the bus, boot and hot-plugged, in slot order.
    pub fn devices(&self) -> Result<Vec<AttachedDevice>, HotplugError> {
        self.with(|h| Ok(h.devices()))
    }

    /// Counts for leak checks (GSIs, BARs, hot-plugged devices).
    pub fn stats(&self) -> Result<HotplugStats, HotplugError> {
        self.with(|h| Ok(h.stats()))
    }

    /// Reads config space at `path` as the guest sees it (an empty slot reads all ones).
    pub fn config_read(&self, path: &PciPath, offset: usize, data: &mut [u8]) -> Result<(), HotplugError> {
        self.with(|h| {
            h.config_read(path, offset, data);
            Ok(())
        })
    }

    /// An MMIO access as a vCPU makes it (tests: a BAR after its device was unplugged).
    #[cfg(feature = "testkit")]
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), HotplugError> {
        self.with(|h| {
            h.mmio_read(addr, data);
            Ok(())
        })
    }

    /// Pauses the VM: every vCPU thread parks before its next KVM_RUN (kicked out of the
    /// current one). Idempotent. Fails, leaving the VM running, when a vCPU does not stop in
    /// `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let g = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let v = g.as_ref().ok_or(PauseError::NotRunning)?;
        let total = v.threads.len();
        v.gate
            .close(total, timeout, || {
                for t in &v.threads {
                    // SAFETY: the threads are joined only after `detach_vcpus`, which waits for
                    // this lock: each pthread_t still names a live thread; the kick signal has a
                    // no-op handler.
                    unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
                }
            })
            .map_err(|parked| PauseError::Timeout { parked, total, timeout })
    }

    /// Resumes a paused VM (a running one is left as it is).
    pub fn resume(&self) -> Result<(), PauseError> {
        let g = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().ok_or(PauseError::NotRunning)?.gate.open();
        Ok(())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|v| v.gate.is_closed())
    }

    /// Saves the paused VM into `dir` (created if missing): `state` and `memory`
    /// ([`crate::snapshot`]). The VM stays paused; resume it or stop it after. Refused, writing
    /// nothing, when a device holds state a snapshot cannot keep (see [`crate::snapshot`]).
    pub fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        let hotplug = self.hotplug.lock().unwrap_or_else(|p| p.into_inner());
        let h = hotplug.as_ref().ok_or(SnapshotError::NotRunning)?;
        if h.stats().hot_devices > 0 {
            return Err(SnapshotError::Unsupported("hot-plugged devices".into(), "unplug them first".into()));
        }
        let g = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let v = g.as_ref().ok_or(SnapshotError::NotRunning)?;
        if !v.gate.is_closed() {
            return Err(SnapshotError::NotPaused);
        }
        let m = &v.machine;
        // Held to the end: the device thread cannot touch queues or guest memory meanwhile.
        let locked: Vec<_> = m.boot.iter().map(|(a, d)| (a, d.lock().unwrap_or_else(|p| p.into_inner()))).collect();
        let mut devices = Vec::with_capacity(locked.len());
        for (a, d) in &locked {
            let transport = d.state().map_err(|e| SnapshotError::Unsupported(a.path.to_string(), e))?;
            devices.push(DeviceState { path: a.path.to_string(), kind: a.kind.to_string(), transport });
        }
        let kvm = Kvm::new().map_err(|e| SnapshotError::Kvm("/dev/kvm", e))?;
        let msr_list = kvm.get_msr_index_list().map_err(|e| SnapshotError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let vcpus = m
            .vcpu_fds
            .iter()
            .map(|fd| VcpuState::save(&fd.lock().unwrap_or_else(|p| p.into_inner()), msr_list.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(&m.vm, m.legacy)?;
        let serial = m.serial.lock().unwrap_or_else(|p| p.into_inner()).state();
        let pci_root = m.root.lock().unwrap_or_else(|p| p.into_inner()).state();
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Io(dir.to_path_buf(), e))?;
        let memory = snapshot::write_memory(&m.mem, &dir.join(snapshot::MEMORY_FILE))?;
        let s = snapshot::Snapshot {
            vcpu_count: m.vcpu_fds.len() as u8,
            memory_mib: m.memory_mib,
            memory,
            vcpus,
            vm,
            serial,
            pci_root,
            devices,
        };
        snapshot::write_state(dir, &s)
    }

    fn attach_vcpus(&self, v: Vcpus) {
        *self.vcpus.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }

    /// Before the vCPU threads are stopped and joined (waits for a pause in progress).
    fn detach_vcpus(&self) {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Serves `h` until [`VmControl::detach`]; refused while it serves another VM.
    fn attach(&self, h: Hotplug) -> Result<(), VmError> {
        let mut g = self.hotplug.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() {
            return Err(VmError::Internal("this VmControl serves another running VM".into()));
        }
        *g = Some(h);
        Ok(())
    }

    fn detach(&self) -> Option<Hotplug> {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The files the device thread may open: the disk images and shared directories.
fn plan(cfg: &VmConfig) -> confine::Plan {
    let mut device_paths: Vec<(PathBuf, bool)> = cfg.disks.iter().map(|d| (d.path.clone(), !d.read_only)).collect();
    device_paths.extend(cfg.shares.iter().map(|s| (s.dir.clone(), !s.read_only)));
    confine::Plan { enabled: cfg.confine, device_paths }
}

fn run_on(cfg: VmConfig, confine_self: bool, control: Option<Arc<VmControl>>) -> Result<VmOutcome, VmError> {
    let kvm = Kvm::new().map_err(|e| VmError::Kvm("/dev/kvm", e))?;
    let max = max_vcpus(&kvm);
    let Validated { mut kernel, mut initrd, devices } = validate(&cfg, max)?;
    vcpu::install_kick_handler().map_err(VmError::Internal)?;
    let plan = Arc::new(plan(&cfg));
    if plan.enabled {
        confine::apply_rlimits();
    }

    let saved = match &cfg.restore {
        Some(dir) => {
            let s = snapshot::read_state(dir)?;
            s.check(cfg.vcpus, cfg.memory_mib, cfg.irqchip == IrqChip::InKernel, &planned_devices(&cfg))?;
            let memory = snapshot::verify_memory(&dir.join(snapshot::MEMORY_FILE), &s.memory)?;
            Some((s, memory))
        }
        None => None,
    };

    let vm = Arc::new(kvm.create_vm().map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?);
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    let legacy = cfg.irqchip == IrqChip::InKernel;
    if legacy {
        vm.create_irq_chip().map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    } else {
        let mut cap = kvm_enable_cap { cap: KVM_CAP_SPLIT_IRQCHIP, ..Default::default() };
        cap.args[0] = 24; // routes reserved for a user-space IOAPIC's pins (none here)
        vm.enable_cap(&cap).map_err(|e| VmError::Kvm("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", e))?;
    }
    let mem = match &saved {
        Some((_, file)) => restore_memory(&vm, file, cfg.memory_mib)?,
        None => create_memory(&vm, cfg.memory_mib)?,
    };
    if !regs::boot_area_fits(&mem) {
        return Err(VmError::Memory(cfg.memory_mib, host::memory_mib().unwrap_or(0)));
    }

    let entry = match kernel.as_mut() {
        Some(kernel) => {
            let loaded =
                boot::load(&mem, cfg.memory_mib << 20, kernel, &cfg.cmdline, initrd.as_mut(), cfg.vcpus, legacy)?;
            tracing::debug!(?loaded, "kernel loaded");
            Some(loaded.entry)
        }
        None => None,
    };
    drop(kernel);
    drop(initrd);
    let saved = saved.map(|(s, _)| s);

    let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Internal(format!("eventfd: {e}")))?);
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Internal(format!("eventfd: {e}")))?;
    if legacy {
        vm.register_irqfd(&serial_irq, COM1_GSI).map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
    }
    let console = serial_writer(cfg.serial)?;
    let serial_errors = console.errors();
    let serial = match &saved {
        Some(s) => Serial::from_state(serial_irq, console, &s.serial)
            .map_err(|e| SnapshotError::Restore("serial".into(), e))?,
        None => Serial::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset = exit.evt.try_clone().map_err(|e| VmError::Internal(format!("eventfd: {e}")))?;
    let mut pio = PioBus::default();
    pio.insert(COM1_BASE, COM1_LEN, serial.clone()).map_err(|e| VmError::Internal(e.to_string()))?;
    pio.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new(reset))))
        .map_err(|e| VmError::Internal(e.to_string()))?;
    let mut devices = pci::build(&vm, &mem, devices, legacy)?;
    pio.insert(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN, devices.root.clone())
        .map_err(|e| VmError::Internal(e.to_string()))?;
    let pio = Arc::new(pio);
    let mut event_loop = EventLoop::start(&devices, plan.clone(), exit.clone())?;
    // Detached again at teardown: hotplug runs on the caller's threads while the VM is up.
    let mut control = match (control, Hotplug::new(&mut devices, &event_loop, plan.clone(), exit.clone())) {
        (Some(c), Some(h)) => c.attach(h).map(|_| ControlGuard(Some(c)))?,
        _ => ControlGuard(None),
    };

    let supported =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(PauseGate::default());
    let stats = Arc::new(VcpuStats::default());
    let mut contexts = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
        let entries = cpuid::filter(supported.as_slice(), id, cfg.vcpus);
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VmError::Internal(format!("CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
        match (&saved, entry) {
            (Some(s), _) => s.vcpus[usize::from(id)].restore(&fd)?,
            (None, Some(entry)) => {
                regs::setup_msrs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_lapic(&fd)?;
                if id == 0 {
                    regs::setup_sregs(&mem, &fd, entry)?;
                    regs::setup_regs(&fd, entry)?;
                }
            }
            (None, None) => return Err(VmError::Internal("neither a kernel nor a snapshot".into())),
        }
        contexts.push(VcpuContext {
            id,
            fd: Arc::new(Mutex::new(fd)),
            pio: pio.clone(),
            mmio: devices.mmio.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            gate: gate.clone(),
            stats: stats.clone(),
            confine: plan.clone(),
        });
    }

    // The machine around the vCPUs, then the devices: a device's restore processes its queues
    // and interrupts the guest, which must land in the restored LAPICs.
    if let Some(s) = &saved {
        s.vm.restore(&vm)?;
        // The guest's clock may jump by the time the snapshot was on disk (this host's PVM guests
        // read the host's TSC), which its RCU and soft-lockup watchdogs take for a stall, and
        // print one over the slow console. KVM_KVMCLOCK_CTRL tells them the host stopped the VM
        // (as QEMU does on resume). Refused (EINVAL) for a guest without kvmclock.
        for c in &contexts {
            let fd = c.fd.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = fd.kvmclock_ctrl() {
                tracing::debug!(vcpu = c.id, "KVM_KVMCLOCK_CTRL: {e}");
            }
        }
        devices.root.lock().unwrap_or_else(|p| p.into_inner()).restore(s.pci_root);
        devices.restore(&s.devices).map_err(|(what, e)| SnapshotError::Restore(what, e))?;
        tracing::info!(dir = ?cfg.restore, "VM restored from its snapshot");
    }
    let machine = Machine {
        vm: vm.clone(),
        vcpu_fds: contexts.iter().map(|c| c.fd.clone()).collect(),
        serial: serial.clone(),
        root: devices.root.clone(),
        boot: devices.boot_virtio(),
        mem: mem.clone(),
        memory_mib: cfg.memory_mib,
        legacy,
    };

    let mut threads = Vec::with_capacity(contexts.len());
    let mut spawn_error = None;
    for ctx in contexts {
        match ctx.spawn() {
            Ok(t) => threads.push(t),
            Err(e) => {
                spawn_error = Some(VmError::Internal(format!("cannot start vCPU thread: {e}")));
                break;
            }
        }
    }
    if let Some(c) = &control.0 {
        use std::os::unix::thread::JoinHandleExt;
        c.attach_vcpus(Vcpus {
            gate: gate.clone(),
            threads: threads.iter().map(|t| t.handle.as_pthread_t()).collect(),
            machine,
        });
    }
    // The VM's own thread confines itself last: the threads it starts must not inherit its
    // filter (filters stack), and set-up needs far more than waiting and teardown do.
    let confined = match (spawn_error, confine_self) {
        (Some(e), _) => Err(e),
        (None, true) => confine::enter(ThreadKind::Vmm, &plan, &exit).map_err(VmError::from),
        (None, false) => Ok(confine::Confined::none()),
    };
    let (reason, _confined) = match confined {
        Err(e) => (Err(e), None),
        Ok(c) => (wait_for_exit(&exit, cfg.stop.as_deref(), cfg.timeout), Some(c)),
    };

    // Teardown: stop every vCPU (a paused one too), kicking it out of KVM_RUN until its thread
    // is gone.
    if let Some(c) = &control.0 {
        c.detach_vcpus();
    }
    stop.store(true, Ordering::Release);
    gate.release();
    for t in threads {
        while !t.handle.is_finished() {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t comes from a JoinHandle that is not yet joined, so the
            // thread still exists; the kick signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.handle.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_micros(200));
        }
        if t.handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
    serial.lock().unwrap_or_else(|p| p.into_inner()).console().finish();
    // Waits for a hotplug in progress (it needs the event loop), then refuses new ones.
    let hotplug = control.detach();
    event_loop.stop();
    let device_guest_errors = devices.guest_errors() + hotplug.as_ref().map_or(0, Hotplug::guest_errors);
    let attached = hotplug.as_ref().map_or_else(|| devices.attached.clone(), Hotplug::devices);
    drop(hotplug);
    let mmio_unclaimed = devices.mmio.unclaimed();
    drop(devices);
    drop(vm);
    drop(mem);
    // A filter that fired during teardown still decides how the VM ended.
    if let Some(v) = confine::violation(&exit) {
        return Err(VmError::Seccomp(v));
    }
    let reason = reason?;
    Ok(VmOutcome {
        reason,
        exits: stats.exits.load(Ordering::Relaxed),
        pio_unclaimed: pio.unclaimed(),
        mmio_unclaimed,
        serial_write_errors: serial_errors.load(Ordering::Relaxed),
        device_guest_errors,
        devices: attached,
    })
}

/// The boot devices `cfg` gives, as (kind, PCI path) in slot order: what a snapshot must
/// have been taken with.
fn planned_devices(cfg: &VmConfig) -> Vec<(String, String)> {
    use shoji_devices::model::{DeviceKind, PciSlotPlan};
    let Ok(plan) = PciSlotPlan::new(cfg.disks.len(), cfg.shares.len(), cfg.vsock.is_some()) else { return Vec::new() };
    let mut v = Vec::new();
    let kinds = [
        (DeviceKind::Block, cfg.disks.len()),
        (DeviceKind::Fs, cfg.shares.len()),
        (DeviceKind::Vsock, usize::from(cfg.vsock.is_some())),
    ];
    for (kind, n) in kinds {
        for i in 0..n {
            if let Some(p) = plan.path(kind, i) {
                v.push((kind.name().to_string(), p.to_string()));
            }
        }
    }
    v
}

/// Detaches the VM from its [`VmControl`] on every way out of [`run_on`], a failed set-up too.
struct ControlGuard(Option<Arc<VmControl>>);

impl ControlGuard {
    fn detach(&mut self) -> Option<Hotplug> {
        self.0.take()?.detach()
    }
}

impl Drop for ControlGuard {
    fn drop(&mut self) {
        drop(self.detach());
    }
}

fn wait_for_exit(exit: &ExitSignal, stop: Option<&EventFd>, timeout: Option<Duration>) -> Result<StopReason, VmError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let wait_ms: i32 = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(StopReason::Timeout);
                }
                left.as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut pfds = [
            libc::pollfd { fd: exit.evt.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.map(|s| s.as_raw_fd()).unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: a valid array of pollfds for the duration of the call (fd -1 is ignored).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmError::Internal(format!("poll: {e}")));
        }
        if n == 0 {
            continue;
        }
        if pfds[1].revents & libc::POLLIN != 0 && pfds[0].revents & libc::POLLIN == 0 {
            return Ok(StopReason::Stopped);
        }
        let _ = exit.evt.read();
        if let Some(v) = confine::violation(exit) {
            return Err(VmError::Seccomp(v));
        }
        // An eventfd write with no recorded reason comes from the i8042 reset line.
        return match exit.take() {
            None | Some(Ok(StopReason::Reset)) => Ok(StopReason::Reset),
            Some(Ok(r)) => Ok(r),
            Some(Err(msg)) => Err(VmError::Guest(msg)),
        };
    }
}
