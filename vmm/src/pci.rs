//! The sandbox's PCI devices: the root bus on the config ports, BAR placement in the MMIO gap,
//! MMIO dispatch to BARs, KVM ioeventfds for queue notifications, the event-loop thread that
//! runs the devices' queues, and hotplug ([`Hotplug`]) of virtio-blk into a running VM.
use crate::confine::{Plan, ThreadKind};
use crate::exit::ExitSignal;
use crate::irq::{DeviceMsi, IrqRouting};
use crate::layout::{IOAPIC_ADDR, MMIO_GAP_START};
use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use shoji_devices::model::{DeviceKind, PciPath, PciPlanError, PciSlotPlan};
use shoji_devices::pci::{PciRoot, SharedPciDevice};
use shoji_devices::virtio::block::{Block, BlockError};
use shoji_devices::virtio::fs::Fs;
use shoji_devices::virtio::net::{stream::StreamBackend, tap::Tap, Net, NetBackend, MTU_RANGE};
use shoji_devices::virtio::transport::BAR_SIZE;
use shoji_devices::virtio::vsock::Vsock;
use shoji_devices::virtio::{VirtioDevice, VirtioPciDevice, VirtioPciSubscriber};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
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

/// A network device: where its frames go on the host, the guest's MAC and MTU (default 1500).
pub struct NetConfig {
    pub backend: NetHost,
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
}

/// The host end of a network device.
pub enum NetHost {
    /// A tap the caller opened, in the network namespace it lives in (checksum and TSO
    /// offloads pass through).
    Tap(Tap),
    /// A stream socket to a user-mode network stack (passt), QEMU's stream framing.
    Stream(StreamBackend),
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

/// MMIO exits go to the BAR that contains the address; anything else reads as all ones. The
/// ranges change only when a device is plugged or unplugged, so they sit behind an RwLock: a
/// vCPU exit takes it for reading (uncontended: one atomic), and an unplug that takes it for
/// writing waits for the accesses already inside the device, none reaching it afterwards.
#[derive(Default)]
pub struct MmioBus {
    ranges: RwLock<Vec<MmioRange>>,
    unclaimed: AtomicU64,
}

fn find(ranges: &[MmioRange], addr: u64) -> Option<(&MmioRange, u64)> {
    let i = ranges.partition_point(|r| r.start <= addr);
    let r = ranges.get(i.checked_sub(1)?)?;
    let off = addr - r.start;
    (off < r.len).then_some((r, off))
}

impl MmioBus {
    fn ranges(&self) -> std::sync::RwLockReadGuard<'_, Vec<MmioRange>> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ranges_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<MmioRange>> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a BAR, kept sorted by address (the allocator never hands out overlapping ones).
    fn insert(&self, r: MmioRange) {
        let mut ranges = self.ranges_mut();
        let i = ranges.partition_point(|x| x.start < r.start);
        ranges.insert(i, r);
    }

    /// Drops the BAR at `start`; returns whether there was one. Once it returns no vCPU is
    /// inside that device through MMIO, and none gets there again.
    fn remove(&self, start: u64) -> bool {
        let mut ranges = self.ranges_mut();
        let before = ranges.len();
        ranges.retain(|r| r.start != start);
        ranges.len() != before
    }

    /// BARs mapped now (for tests and leak checks).
    pub fn len(&self) -> usize {
        self.ranges().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        let ranges = self.ranges();
        match find(&ranges, addr) {
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
        let ranges = self.ranges();
        match find(&ranges, addr) {
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
    /// The boot devices.
    pub attached: Vec<AttachedDevice>,
    /// The boot shares' tags.
    share_tags: Vec<String>,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// What wired the boot devices, kept for hotplug ([`Hotplug::new`] takes it).
    wiring: Option<Wiring>,
}

impl PciDevices {
    /// The boot virtio devices with where they sit, for snapshots.
    pub fn boot_virtio(&self) -> Vec<(AttachedDevice, Arc<Mutex<VirtioPciDevice>>)> {
        self.attached.iter().cloned().zip(self.virtio.iter().cloned()).collect()
    }

    /// Puts saved transport states back into the boot devices, matched by PCI path; on
    /// failure, which device and why.
    pub fn restore(&self, saved: &[crate::snapshot::DeviceState]) -> Result<(), (String, String)> {
        for (a, d) in self.attached.iter().zip(&self.virtio) {
            let path = a.path.to_string();
            let s =
                saved.iter().find(|s| s.path == path).ok_or_else(|| (path.clone(), "not in the snapshot".into()))?;
            d.lock().unwrap_or_else(|p| p.into_inner()).restore(&s.transport).map_err(|e| (path, e))?;
        }
        Ok(())
    }

    /// Guest errors counted by the boot virtio devices.
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

/// What it takes to connect a virtio device to KVM: BAR space from the MMIO gap, GSIs and
/// irqfds for its MSI-X vectors, ioeventfds for its queue notifications. The same steps at
/// boot and on a hot-add; [`Wiring::unwire`] undoes them on an unplug.
struct Wiring {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    routing: Arc<IrqRouting>,
    alloc: AddressAllocator,
    plan: PciSlotPlan,
}

/// One device connected to KVM, not yet on the bus.
struct Wired {
    dev: Arc<Mutex<VirtioPciDevice>>,
    msi: Arc<DeviceMsi>,
    bar: RangeInclusive,
}

impl Wiring {
    fn wire(&mut self, name: &str, dev: Box<dyn VirtioDevice>) -> Result<Wired, PciSetupError> {
        let bar = self
            .alloc
            .allocate(u64::from(BAR_SIZE), u64::from(BAR_SIZE), AllocPolicy::FirstMatch)
            .map_err(|_| PciSetupError::NoMmio)?;
        let vectors = dev.queue_max_sizes().len() as u16 + 1;
        let msi = match self.routing.device(vectors) {
            Ok(m) => m,
            Err(e) => {
                let _ = self.alloc.free(&bar);
                return Err(e.into());
            }
        };
        let t = match VirtioPciDevice::new(name, dev, self.mem.clone(), bar.start() as u32, msi.clone()) {
            Ok(t) => t,
            Err(e) => {
                let _ = msi.release();
                let _ = self.alloc.free(&bar);
                return Err(PciSetupError::Transport(name.to_string(), e));
            }
        };
        let wired = Wired { dev: Arc::new(Mutex::new(t)), msi, bar };
        let registered = {
            let t = wired.dev.lock().unwrap_or_else(|p| p.into_inner());
            let mut result = Ok(());
            for (addr, evt) in t.notify_eventfds() {
                if let Err(e) = self.vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch) {
                    result = Err(PciSetupError::IoEvent(e));
                    break;
                }
            }
            result
        };
        if let Err(e) = registered {
            // Unregistering the ones that were not registered fails harmlessly.
            let _ = self.unwire(&wired);
            return Err(e);
        }
        Ok(wired)
    }

    /// Gives back what [`Wiring::wire`] took. Everything is attempted; the KVM calls that
    /// failed are returned, one line each.
    fn unwire(&mut self, w: &Wired) -> Vec<String> {
        let mut errors = Vec::new();
        {
            let t = w.dev.lock().unwrap_or_else(|p| p.into_inner());
            for (addr, evt) in t.notify_eventfds() {
                if let Err(e) = self.vm.unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch) {
                    errors.push(format!("ioeventfd at {addr:#x}: {e}"));
                }
            }
        }
        if let Err(e) = w.msi.release() {
            errors.push(format!("MSI vectors: {e}"));
        }
        if let Err(e) = self.alloc.free(&w.bar) {
            errors.push(format!("BAR at {:#x}: {e:?}", w.bar.start()));
        }
        errors
    }
}

/// Builds the bus and wires each device to KVM. Each device goes to the slot
/// [`PciSlotPlan`] gives it (disks as given from 01, then shares, then vsock): the plan the host
/// side also names devices to the guest by.
/// `legacy`: the VM has the in-kernel PIC and IOAPIC (their pins keep their routes).
pub fn build(vm: &Arc<VmFd>, mem: &GuestMemoryMmap, set: DeviceSet, legacy: bool) -> Result<PciDevices, PciSetupError> {
    let alloc = AddressAllocator::new(MMIO_GAP_START, u64::from(IOAPIC_ADDR) - MMIO_GAP_START)
        .map_err(|_| PciSetupError::NoMmio)?;
    let plan = PciSlotPlan::new(set.disks.len(), set.shares.len(), set.vsock.is_some())?;
    let mut wiring = Wiring {
        vm: vm.clone(),
        mem: mem.clone(),
        routing: Arc::new(IrqRouting::new(vm.clone(), legacy)),
        alloc,
        plan,
    };
    let mut root = PciRoot::new();
    let mmio = MmioBus::default();
    let mut attached = Vec::new();
    let mut virtio = Vec::new();
    let share_tags = set.shares.iter().map(|(cfg, _)| cfg.tag.clone()).collect();
    let mut add =
        |name: String, kind: DeviceKind, index: usize, dev: Box<dyn VirtioDevice>| -> Result<(), PciSetupError> {
            let path = plan.path(kind, index).ok_or(PciSetupError::Unplanned(kind, index))?;
            let w = wiring.wire(&name, dev)?;
            let shared: SharedPciDevice = w.dev.clone();
            root.place(&path, shared.clone())?;
            mmio.insert(MmioRange { start: w.bar.start(), len: u64::from(BAR_SIZE), dev: shared, bar: 0 });
            attached.push(AttachedDevice { kind: kind.name(), path, what: name });
            virtio.push(w.dev);
            Ok(())
        };
    for (i, (cfg, block)) in set.disks.into_iter().enumerate() {
        add(disk_name(&cfg), DeviceKind::Block, i, Box::new(block))?;
    }
    for (j, (cfg, fs)) in set.shares.into_iter().enumerate() {
        add(share_name(&cfg), DeviceKind::Fs, j, Box::new(fs))?;
    }
    if let Some(v) = set.vsock {
        let what = format!("cid={} {}", v.guest_cid(), v.uds_path().display());
        add(what, DeviceKind::Vsock, 0, Box::new(v))?;
    }
    Ok(PciDevices {
        root: Arc::new(Mutex::new(root)),
        mmio: Arc::new(mmio),
        attached,
        share_tags,
        virtio,
        wiring: Some(wiring),
    })
}

/// How a share is named in reports: its directory, tag and "(ro)" when read-only.
fn share_name(cfg: &ShareConfig) -> String {
    format!("{} tag={}{}", cfg.dir.display(), cfg.tag, if cfg.read_only { " (ro)" } else { "" })
}

/// How a disk is named in reports: its path, and "(ro)" when read-only.
fn disk_name(cfg: &DiskConfig) -> String {
    format!("{}{}", cfg.path.display(), if cfg.read_only { " (ro)" } else { "" })
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

/// What the device thread's event loop runs.
type Subscriber = Box<dyn MutEventSubscriber + Send>;
/// Runs a closure on the device thread, with the loop's subscriber list.
type Endpoint = RemoteEndpoint<Subscriber>;

/// The thread that runs device queues (ioeventfd notifications) and device backends.
pub struct EventLoop {
    wake: EventFd,
    endpoint: Endpoint,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// The thread confines itself (as [`ThreadKind::Devices`]) before it serves anything; if it
    /// cannot, it stops the VM through `exit`.
    pub fn start(devices: &PciDevices, plan: Arc<Plan>, exit: Arc<ExitSignal>) -> Result<Self, PciSetupError> {
        let subs = devices.virtio.iter().map(|d| Box::new(VirtioPciSubscriber(d.clone())) as Subscriber).collect();
        Self::spawn("devices", subs, plan, exit, false)
    }

    /// A loop on a new thread `name` serving `subscribers`, confined by `plan`. With
    /// `wait_confined`, returns once the thread is confined (a failure is returned here and
    /// the VM goes on); otherwise the thread stops the VM if it cannot confine itself.
    fn spawn(
        name: &str,
        subscribers: Vec<Subscriber>,
        plan: Arc<Plan>,
        exit: Arc<ExitSignal>,
        wait_confined: bool,
    ) -> Result<Self, PciSetupError> {
        let err = |e: &dyn std::fmt::Debug| PciSetupError::EventLoop(format!("{e:?}"));
        let mut em = EventManager::<Subscriber>::new().map_err(|e| err(&e))?;
        let endpoint = em.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(&e))?;
        em.add_subscriber(Box::new(Stopper { evt: wake.try_clone().map_err(|e| err(&e))?, stop: stop.clone() }));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let (confined_tx, confined_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let confined = crate::confine::enter(ThreadKind::Devices, &plan, &exit);
                let _confined = match confined {
                    Ok(c) if wait_confined => {
                        let _ = confined_tx.send(Ok(()));
                        c
                    }
                    Ok(c) => c,
                    Err(e) if wait_confined => return drop(confined_tx.send(Err(e.to_string()))),
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
        let event_loop = EventLoop { wake, endpoint, thread: Some(thread) };
        if wait_confined {
            match confined_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(PciSetupError::EventLoop(format!("{name}: cannot confine it: {e}"))),
                Err(_) => return Err(PciSetupError::EventLoop(format!("{name}: the thread ended at start"))),
            }
        }
        Ok(event_loop)
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

/// Hot-plugged virtio devices of a running VM.
///
/// The mechanism, with the guest booted `acpi=off` and no guest kernel patch: a hot-add wires
/// the device to KVM (BAR, MSI-X GSIs and irqfds, ioeventfds), registers it with the device
/// thread's event loop, maps its BAR and last puts it in the lowest free slot of bus 0
/// ([`PciSlotPlan::hot_add`]): config space answers there from then on, and the guest agent
/// finds it by rescanning the bus (`/sys/bus/pci/rescan`). An unplug first has the agent remove
/// the function in the guest (the host side asks it), then [`Hotplug::remove`] takes the device
/// off the bus whatever the guest did: config space and BAR then read as all ones, queue
/// notifications and interrupts go nowhere, and every resource goes back for the next device.
///
/// The caller's thread does the work (opening the disk, the KVM calls); only the event-loop
/// registration runs on the device thread, through its remote endpoint (an `epoll_ctl`, which
/// that thread's seccomp filter allows). Landlock on the device thread covers only the paths the
/// VM booted with, which is why a hot-added disk is opened here: the device thread only reads
/// and writes the open file. A hot-added virtio-fs share cannot work that way (its FUSE server
/// opens files below the shared directory as the guest asks), so it gets a device thread of its
/// own, started here from the caller's unconfined thread and confined like the boot one
/// (seccomp, capabilities), with Landlock allowing exactly its share; an unplug stops it.
pub struct Hotplug {
    wiring: Wiring,
    /// The boot confinement: a hot-added share's thread is confined the same way.
    confine: Arc<Plan>,
    exit: Arc<ExitSignal>,
    root: Arc<Mutex<PciRoot>>,
    mmio: Arc<MmioBus>,
    endpoint: Endpoint,
    boot: Vec<AttachedDevice>,
    /// The boot shares' tags (a hot-added share must not reuse one).
    boot_tags: Vec<String>,
    /// By slot on bus 0.
    hot: BTreeMap<u8, HotDevice>,
    /// Guest errors counted by devices already unplugged.
    removed_errors: u64,
}

struct HotDevice {
    info: AttachedDevice,
    wired: Wired,
    served: Served,
    /// A share's virtio-fs tag.
    tag: Option<String>,
}

/// Where a hot-plugged device's queues are served.
enum Served {
    /// On the boot device thread, as this subscriber.
    Shared(SubscriberId),
    /// On a thread of its own (a virtio-fs share).
    Own(EventLoop),
}

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("hotplug: the VM is not running")]
    NotRunning,
    #[error("hotplug: {0}")]
    Disk(#[from] BlockError),
    #[error("hotplug: {0}")]
    Share(#[from] shoji_devices::virtio::fs::FsError),
    #[error("hotplug: {0}")]
    Slot(#[from] PciPlanError),
    #[error("hotplug: {0}")]
    Setup(#[from] PciSetupError),
    #[error("hotplug: the device thread's event loop: {0}")]
    EventLoop(String),
    #[error("hotplug: mtu {mtu} is out of range (68..=65535)")]
    Mtu { mtu: u16 },
    #[error("hotplug: a virtio-fs device with tag {0:?} is in the VM already")]
    TagInUse(String),
    /// The device is off the bus, but some of its resources could not be given back.
    #[error("hotplug: {path} was removed, but: {what}")]
    Leak { path: PciPath, what: String },
}

/// Counts for leak checks: what the hot-plugged devices hold is given back on unplug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugStats {
    /// Devices hot-plugged now.
    pub hot_devices: usize,
    /// MSI GSIs in use (boot and hot-plugged devices).
    pub gsis_in_use: usize,
    /// BARs mapped on the MMIO bus.
    pub mmio_ranges: usize,
    /// Device threads of hot-plugged shares running now.
    pub own_threads: usize,
}

impl Hotplug {
    /// Takes over the wiring of `devices` (boot devices stay as they are) and the event loop's
    /// endpoint. `None` when it was taken already.
    /// `confine` and `exit` are the boot threads' (for a hot-added share's own thread).
    pub fn new(
        devices: &mut PciDevices,
        event_loop: &EventLoop,
        confine: Arc<Plan>,
        exit: Arc<ExitSignal>,
    ) -> Option<Hotplug> {
        Some(Hotplug {
            wiring: devices.wiring.take()?,
            confine,
            exit,
            root: devices.root.clone(),
            mmio: devices.mmio.clone(),
            endpoint: event_loop.endpoint.clone(),
            boot: devices.attached.clone(),
            boot_tags: devices.share_tags.clone(),
            hot: BTreeMap::new(),
            removed_errors: 0,
        })
    }

    /// Opens `disk` (on this thread) and plugs it in as virtio-blk; returns its PCI path.
    pub fn add_disk(&mut self, disk: &DiskConfig) -> Result<PciPath, HotplugError> {
        let block = Block::open(&disk.path, disk.read_only)?;
        self.add(DeviceKind::Block, disk_name(disk), Box::new(block), None)
    }

    /// Shares `share.dir` under `share.tag` as a new virtio-fs device served by a thread of its
    /// own, which Landlock confines to that directory; returns its PCI path. The guest mounts
    /// it by tag once the agent has rescanned the bus. Tags must stay unique in the VM.
    pub fn add_share(&mut self, share: &ShareConfig) -> Result<PciPath, HotplugError> {
        let hot_tags = self.hot.values().filter_map(|d| d.tag.as_deref());
        if self.boot_tags.iter().map(String::as_str).chain(hot_tags).any(|t| t == share.tag) {
            return Err(HotplugError::TagInUse(share.tag.clone()));
        }
        let fs = Fs::new(&share.tag, &share.dir, share.read_only)?;
        let own =
            Plan { enabled: self.confine.enabled, device_paths: vec![(fs.dir().to_path_buf(), !share.read_only)] };
        self.add(DeviceKind::Fs, share_name(share), Box::new(fs), Some((share.tag.clone(), Arc::new(own))))
    }

    /// Plugs in a virtio-net device on `tap` (opened by the caller, in the network namespace
    /// it belongs to); returns its PCI path. The device thread only reads and writes the tap.
    pub fn add_net(&mut self, net: NetConfig) -> Result<PciPath, HotplugError> {
        let host = match &net.backend {
            NetHost::Tap(t) => t.name().to_string(),
            NetHost::Stream(_) => "stream".into(),
        };
        let what = format!("{host} mac={}", net.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
        if let Some(mtu) = net.mtu.filter(|m| !MTU_RANGE.contains(m)) {
            return Err(HotplugError::Mtu { mtu });
        }
        let backend: Box<dyn NetBackend> = match net.backend {
            NetHost::Tap(t) => Box::new(t),
            NetHost::Stream(s) => Box::new(s),
        };
        let dev = Net::new(backend, net.mac, net.mtu);
        self.add(DeviceKind::Net, what, Box::new(dev), None)
    }

    fn add(
        &mut self,
        kind: DeviceKind,
        name: String,
        dev: Box<dyn VirtioDevice>,
        share: Option<(String, Arc<Plan>)>,
    ) -> Result<PciPath, HotplugError> {
        let path = self.wiring.plan.hot_add(kind)?;
        // The plan's hot slots are function 0 of slots on bus 0.
        let Some(slot) = path.root_slot() else {
            let _ = self.wiring.plan.hot_remove(&path);
            return Err(PciPlanError::BusFull.into());
        };
        match self.plug(&path, kind, name, dev, share) {
            Ok(d) => {
                tracing::info!(path = %path, device = d.info.what, "{kind} hot-plugged");
                self.hot.insert(slot, d);
                Ok(path)
            }
            Err(e) => {
                let _ = self.wiring.plan.hot_remove(&path);
                Err(e)
            }
        }
    }

    fn plug(
        &mut self,
        path: &PciPath,
        kind: DeviceKind,
        name: String,
        dev: Box<dyn VirtioDevice>,
        share: Option<(String, Arc<Plan>)>,
    ) -> Result<HotDevice, HotplugError> {
        let (tag, own_thread) = share.unzip();
        let wired = self.wiring.wire(&name, dev)?;
        let sub: Subscriber = Box::new(VirtioPciSubscriber(wired.dev.clone()));
        let served = match own_thread {
            Some(plan) => {
                let thread = format!("fs-{}", path.root_slot().unwrap_or(0));
                EventLoop::spawn(&thread, vec![sub], plan, self.exit.clone(), true)
                    .map(Served::Own)
                    .map_err(|e| HotplugError::EventLoop(e.to_string()))
            }
            None => self
                .endpoint
                .call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                    Ok::<_, event_manager::Error>(ops.add_subscriber(sub))
                })
                .map(Served::Shared)
                .map_err(|e| HotplugError::EventLoop(format!("{e:?}"))),
        };
        let served = match served {
            Ok(s) => s,
            Err(e) => {
                let _ = self.wiring.unwire(&wired);
                return Err(e);
            }
        };
        let shared: SharedPciDevice = wired.dev.clone();
        self.mmio.insert(MmioRange { start: wired.bar.start(), len: u64::from(BAR_SIZE), dev: shared.clone(), bar: 0 });
        // Last: from here the guest can find it.
        if let Err(e) = self.root.lock().unwrap_or_else(|p| p.into_inner()).place(path, shared) {
            self.mmio.remove(wired.bar.start());
            let _ = self.stop_serving(served);
            let _ = self.wiring.unwire(&wired);
            return Err(PciSetupError::from(e).into());
        }
        Ok(HotDevice { info: AttachedDevice { kind: kind.name(), path: path.clone(), what: name }, wired, served, tag })
    }

    /// Stops serving a device's queues: its subscriber leaves the boot loop, or its own thread
    /// stops (joined here).
    fn stop_serving(&self, served: Served) -> Result<(), String> {
        match served {
            Served::Shared(id) => self.unsubscribe(id),
            Served::Own(mut event_loop) => {
                event_loop.stop();
                Ok(())
            }
        }
    }

    /// Takes the event loop's subscriber back; it is dropped here, on the caller's thread.
    fn unsubscribe(&self, id: SubscriberId) -> Result<(), String> {
        self.endpoint
            .call_blocking(move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| ops.remove_subscriber(id))
            .map(drop)
            .map_err(|e| format!("event loop: {e:?}"))
    }

    /// Unplugs the hot-plugged device at `path`, whether or not the guest let it go: it leaves
    /// config space first, then its BAR (waiting for accesses already in it), then its queue
    /// notifications, its event-loop registration and its interrupts, and its BAR space, GSIs
    /// and slot are free for the next device. Boot devices are not unpluggable
    /// ([`PciPlanError::NotHotPlugged`]).
    pub fn remove(&mut self, path: &PciPath) -> Result<(), HotplugError> {
        let d = path.root_slot().and_then(|slot| self.hot.remove(&slot));
        let d = d.ok_or_else(|| PciPlanError::NotHotPlugged(path.clone()))?;
        let mut problems = Vec::new();
        if self.root.lock().unwrap_or_else(|p| p.into_inner()).remove(path).is_none() {
            problems.push("it was not on the bus".to_string());
        }
        if !self.mmio.remove(d.wired.bar.start()) {
            problems.push("its BAR was not mapped".to_string());
        }
        if let Err(e) = self.stop_serving(d.served) {
            problems.push(e);
        }
        problems.extend(self.wiring.unwire(&d.wired));
        let _ = self.wiring.plan.hot_remove(path);
        self.removed_errors += d.wired.dev.lock().unwrap_or_else(|p| p.into_inner()).errors();
        tracing::info!(path = %path, device = d.info.what, "{} unplugged", d.info.kind);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(HotplugError::Leak { path: path.clone(), what: problems.join("; ") })
        }
    }

    /// Every device on the bus, boot and hot-plugged, in slot order.
    pub fn devices(&self) -> Vec<AttachedDevice> {
        let mut all: Vec<AttachedDevice> =
            self.boot.iter().chain(self.hot.values().map(|d| &d.info)).cloned().collect();
        all.sort_by(|a, b| a.path.elements().cmp(b.path.elements()));
        all
    }

    pub fn stats(&self) -> HotplugStats {
        HotplugStats {
            hot_devices: self.hot.len(),
            own_threads: self.hot.values().filter(|d| matches!(d.served, Served::Own(_))).count(),
            gsis_in_use: self.wiring.routing.gsis_in_use(),
            mmio_ranges: self.mmio.len(),
        }
    }

    /// Guest errors counted by hot-plugged devices, present and past.
    pub fn guest_errors(&self) -> u64 {
        self.removed_errors
            + self.hot.values().map(|d| d.wired.dev.lock().unwrap_or_else(|p| p.into_inner()).errors()).sum::<u64>()
    }

    /// Reads the config space of the function at `path` the way the guest would see it,
    /// without touching the guest's CONFIG_ADDRESS.
    pub fn config_read(&self, path: &PciPath, offset: usize, data: &mut [u8]) {
        self.root.lock().unwrap_or_else(|p| p.into_inner()).config_read(path, offset, data)
    }

    /// An MMIO read as a vCPU does it (tests: BAR accesses after an unplug).
    #[cfg(feature = "testkit")]
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoji_devices::pci::{Bar, PciDevice};
    use std::sync::atomic::AtomicUsize;

    /// A BAR that reads as its byte offset and counts the accesses that reach it.
    struct Counting(Arc<AtomicUsize>);

    impl PciDevice for Counting {
        fn config_read(&mut self, _: usize, data: &mut [u8]) {
            data.fill(0)
        }
        fn config_write(&mut self, _: usize, _: &[u8]) {}
        fn bars(&self) -> Vec<(u8, Bar)> {
            Vec::new()
        }
        fn bar_read(&mut self, _: u8, offset: u64, data: &mut [u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
            data.fill(offset as u8)
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn range(start: u64, hits: &Arc<AtomicUsize>) -> MmioRange {
        MmioRange { start, len: 0x1000, dev: Arc::new(Mutex::new(Counting(hits.clone()))), bar: 0 }
    }

    #[test]
    fn ranges_are_found_in_any_insertion_order_and_gaps_read_all_ones() {
        let bus = MmioBus::default();
        let hits = Arc::new(AtomicUsize::new(0));
        for start in [0x3000, 0x1000, 0x5000] {
            bus.insert(range(start, &hits));
        }
        let mut b = [0u8; 4];
        for (addr, want) in [(0x1004, [4; 4]), (0x3ffc, [0xfc; 4]), (0x5010, [0x10; 4]), (0x2000, [0xff; 4])] {
            bus.read(addr, &mut b);
            assert_eq!(b, want, "{addr:#x}");
        }
        bus.read(0x1ffe, &mut b);
        assert_eq!(b, [0xff; 4], "an access straddling the BAR's end");
        assert_eq!((hits.load(Ordering::Relaxed), bus.unclaimed(), bus.len()), (3, 2, 3));
        assert!(bus.remove(0x3000));
        assert!(!bus.remove(0x3000));
        bus.read(0x3004, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.read(0x5004, &mut b);
        assert_eq!(b, [4; 4], "the others stay");
    }

    /// vCPUs hammering a BAR while it is unplugged: the unplug waits for the accesses inside
    /// the device, and after it none reaches it; the rest read all ones.
    #[test]
    fn an_unplug_while_vcpus_poke_the_bar_leaves_no_access_behind() {
        let bus = Arc::new(MmioBus::default());
        let hits = Arc::new(AtomicUsize::new(0));
        bus.insert(range(0x1000, &hits));
        let stop = Arc::new(AtomicBool::new(false));
        let pokers: Vec<_> = (0..2)
            .map(|_| {
                let (bus, stop) = (bus.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut b = [0u8; 4];
                    while !stop.load(Ordering::Relaxed) {
                        bus.read(0x1008, &mut b);
                        assert!(b == [8; 4] || b == [0xff; 4], "{b:?}");
                        bus.write(0x1008, &b);
                    }
                })
            })
            .collect();
        while hits.load(Ordering::Relaxed) < 1000 {
            std::thread::yield_now();
        }
        assert!(bus.remove(0x1000));
        let after = hits.load(Ordering::Relaxed);
        let unclaimed = bus.unclaimed();
        while bus.unclaimed() < unclaimed + 1000 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        for p in pokers {
            p.join().unwrap();
        }
        assert_eq!(hits.load(Ordering::Relaxed), after, "an access reached the unplugged device");
    }
}
