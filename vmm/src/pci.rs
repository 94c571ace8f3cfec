//! The sandbox's PCI devices: the root bus on the config ports, BAR placement in the MMIO gap,
//! MMIO dispatch to BARs, KVM ioeventfds for queue notifications, and the event-loop thread
//! that runs the devices' queues.
use crate::confine::{Plan, ThreadKind};
use crate::exit::ExitSignal;
use crate::irq::IrqRouting;
use crate::layout::{IOAPIC_ADDR, MMIO_GAP_START};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use shoji_devices::model::{DeviceKind, PciPath, PciPlanError, PciSlotPlan};
use shoji_devices::pci::{PciRoot, SharedPciDevice};
use shoji_devices::virtio::block::Block;
use shoji_devices::virtio::fs::Fs;
use shoji_devices::virtio::transport::BAR_SIZE;
use shoji_devices::virtio::vsock::Vsock;
use shoji_devices::virtio::{VirtioDevice, VirtioPciDevice, VirtioPciSubscriber};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    #[error("PCI: out of MMIO space for BARs")]
    NoMmio,
    #[error("PCI: {0}")]
    Bus(#[from] shoji_devices::pci::PciError),
    #[error("PCI: {0}")]
    Plan(#[from] PciPlanError),
    #[error("PCI: {0}")]
    Irq(#[from] crate::irq::IrqError),
    #[error("PCI device {0}: {1}")]
    Transport(String, shoji_devices::virtio::transport::TransportError),
    #[error("PCI: KVM ioeventfd: {0}")]
    IoEvent(kvm_ioctls::Error),
    #[error("PCI: the slot plan has no {0} #{1}")]
    Unplanned(DeviceKind, usize),
    #[error("PCI: event loop: {0}")]
    EventLoop(String),
}

/// A host directory shared with the guest through virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    pub dir: PathBuf,
    pub tag: String,
    pub read_only: bool,
}

/// A disk as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

struct MmioRange {
    start: u64,
    len: u64,
    dev: SharedPciDevice,
    bar: u8,
}

/// MMIO exits go to the BAR that contains the address; anything else reads as all ones.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<MmioRange>,
    unclaimed: AtomicU64,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&MmioRange, u64)> {
        let i = self.ranges.partition_point(|r| r.start <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        let off = addr - r.start;
        (off < r.len).then_some((r, off))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((r, off)) if off + data.len() as u64 <= r.len => {
                r.dev.lock().unwrap_or_else(|p| p.into_inner()).bar_read(r.bar, off, data)
            }
            _ => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((r, off)) if off + data.len() as u64 <= r.len => {
                r.dev.lock().unwrap_or_else(|p| p.into_inner()).bar_write(r.bar, off, data)
            }
            _ => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

/// A device on the bus, for reporting (`shoji` prints paths; tests check them).
#[derive(Debug, Clone)]
pub struct AttachedDevice {
    pub kind: &'static str,
    pub path: PciPath,
    pub what: String,
}

pub struct PciDevices {
    pub root: Arc<Mutex<PciRoot>>,
    pub mmio: Arc<MmioBus>,
    pub attached: Vec<AttachedDevice>,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
}

impl PciDevices {
    /// Guest errors counted by all virtio devices.
    pub fn guest_errors(&self) -> u64 {
        self.virtio.iter().map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).errors()).sum()
    }
}

/// The devices to put on the bus, already opened and checked.
#[derive(Default)]
pub struct DeviceSet {
    pub disks: Vec<(DiskConfig, Block)>,
    pub shares: Vec<(ShareConfig, Fs)>,
    pub vsock: Option<Vsock>,
}

/// Builds the bus and wires each device to KVM. Each device goes to the slot
/// [`PciSlotPlan`] gives it (disks as given from 01, then shares, then vsock): the plan the host
/// side also names devices to the guest by.
pub fn build(vm: &Arc<VmFd>, mem: &GuestMemoryMmap, set: DeviceSet) -> Result<PciDevices, PciSetupError> {
    let routing = Arc::new(IrqRouting::new(vm.clone()));
    let mut alloc = AddressAllocator::new(MMIO_GAP_START, u64::from(IOAPIC_ADDR) - MMIO_GAP_START)
        .map_err(|_| PciSetupError::NoMmio)?;
    let mut root = PciRoot::new();
    let mut mmio = MmioBus::default();
    let mut attached = Vec::new();
    let mut virtio = Vec::new();
    let plan = PciSlotPlan::new(set.disks.len(), set.shares.len(), set.vsock.is_some())?;
    let mut add =
        |name: String, kind: DeviceKind, index: usize, dev: Box<dyn VirtioDevice>| -> Result<(), PciSetupError> {
            let path = plan.path(kind, index).ok_or(PciSetupError::Unplanned(kind, index))?;
            let bar = alloc
                .allocate(u64::from(BAR_SIZE), u64::from(BAR_SIZE), AllocPolicy::FirstMatch)
                .map_err(|_| PciSetupError::NoMmio)?;
            let vectors = dev.queue_max_sizes().len() as u16 + 1;
            let msi = routing.device(vectors)?;
            let t = VirtioPciDevice::new(&name, dev, mem.clone(), bar.start() as u32, msi)
                .map_err(|e| PciSetupError::Transport(name.clone(), e))?;
            for (addr, evt) in t.notify_eventfds() {
                vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(PciSetupError::IoEvent)?;
            }
            let t = Arc::new(Mutex::new(t));
            let shared: SharedPciDevice = t.clone();
            root.place(&path, shared.clone())?;
            mmio.ranges.push(MmioRange { start: bar.start(), len: u64::from(BAR_SIZE), dev: shared, bar: 0 });
            attached.push(AttachedDevice { kind: kind.name(), path, what: name });
            virtio.push(t);
            Ok(())
        };
    for (i, (cfg, block)) in set.disks.into_iter().enumerate() {
        let what = format!("{}{}", cfg.path.display(), if cfg.read_only { " (ro)" } else { "" });
        add(what, DeviceKind::Block, i, Box::new(block))?;
    }
    for (j, (cfg, fs)) in set.shares.into_iter().enumerate() {
        let what = format!("{} tag={}{}", cfg.dir.display(), cfg.tag, if cfg.read_only { " (ro)" } else { "" });
        add(what, DeviceKind::Fs, j, Box::new(fs))?;
    }
    if let Some(v) = set.vsock {
        let what = format!("cid={} {}", v.guest_cid(), v.uds_path().display());
        add(what, DeviceKind::Vsock, 0, Box::new(v))?;
    }
    mmio.ranges.sort_by_key(|r| r.start);
    Ok(PciDevices { root: Arc::new(Mutex::new(root)), mmio: Arc::new(mmio), attached, virtio })
}

/// Wakes the loop so it can see the stop flag.
struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("event loop stop fd: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// The thread that runs device queues (ioeventfd notifications) and device backends.
pub struct EventLoop {
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// The thread confines itself (as [`ThreadKind::Devices`]) before it serves anything; if it
    /// cannot, it stops the VM through `exit`.
    pub fn start(devices: &PciDevices, plan: Arc<Plan>, exit: Arc<ExitSignal>) -> Result<Self, PciSetupError> {
        let err = |e: &dyn std::fmt::Debug| PciSetupError::EventLoop(format!("{e:?}"));
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().map_err(|e| err(&e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(&e))?;
        em.add_subscriber(Box::new(Stopper { evt: wake.try_clone().map_err(|e| err(&e))?, stop: stop.clone() }));
        for d in &devices.virtio {
            em.add_subscriber(Box::new(VirtioPciSubscriber(d.clone())));
        }
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let _confined = match crate::confine::enter(ThreadKind::Devices, &plan, &exit) {
                    Ok(c) => c,
                    Err(e) => return exit.set(Err(format!("device thread: cannot confine it: {e}"))),
                };
                while !stop.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
                        tracing::error!("device event loop: {e:?}");
                        break;
                    }
                }
            })
            .map_err(|e| err(&e))?;
        Ok(EventLoop { wake, thread: Some(thread) })
    }

    pub fn stop(&mut self) {
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the device event loop panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
