//! The modern virtio-pci transport (virtio 1.x, section 4.1): PCI identity and capabilities,
//! the common configuration structure, ISR, device configuration, notifications (one eventfd per
//! queue, registered by the VMM as KVM ioeventfds) and MSI-X (one vector per queue + config).
//!
//! BAR 0 layout (32-bit memory BAR, 32 KiB):
//! ```text
//! 0x0000 common cfg   0x1000 ISR   0x2000 device cfg   0x3000 notify (4 bytes per queue)
//! 0x4000 MSI-X table  0x6000 MSI-X PBA
//! ```
use super::{ErrorCounter, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::pci::msix::{MsiInterrupts, Msix, MsixState, CAP_ID_MSIX};
use crate::pci::{Bar, PciConfig, PciDevice, PciIds};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
pub const NO_VECTOR: u16 = 0xffff;
/// Event-loop data values below this are queue indices; devices use values from here on.
pub const BACKEND_EVENT_BASE: u32 = 1 << 16;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// A queue's registers as the driver set them.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    /// The device's limit (not the driver's: a restore keeps the device's own).
    #[serde(skip)]
    max: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    vector: u16,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs { max, size: max, ready: false, desc: 0, avail: 0, used: 0, vector: NO_VECTOR }
    }
}

/// One queue in a snapshot: its registers and, once activated, where the device is in it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    #[serde(flatten)]
    pub regs: QueueRegs,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio-pci device in a snapshot: everything the driver set through the transport.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub config: Vec<u8>,
    pub msix: MsixState,
    pub queues: Vec<QueueState>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub config_vector: u16,
    pub isr: u8,
    pub activated: bool,
}

pub struct VirtioPciDevice {
    name: String,
    config: PciConfig,
    msix_cap: usize,
    msix: Msix,
    device: Box<dyn VirtioDevice>,
    queues: Vec<QueueRegs>,
    notify: Vec<EventFd>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    isr: u8,
    activated: bool,
    mem: GuestMemoryMmap,
    errors: ErrorCounter,
}

/// Interrupts for a device while the transport is borrowed: ISR bit + MSI-X vector.
struct TransportIrq<'a> {
    msix: &'a mut Msix,
    queues: &'a [QueueRegs],
    config_vector: u16,
    isr: &'a mut u8,
}

impl Interrupt for TransportIrq<'_> {
    fn queue(&mut self, queue: u16) {
        *self.isr |= 1;
        if let Some(q) = self.queues.get(usize::from(queue)) {
            if q.vector != NO_VECTOR {
                self.msix.trigger(q.vector);
            }
        }
    }
    fn config(&mut self) {
        *self.isr |= 2;
        if self.config_vector != NO_VECTOR {
            self.msix.trigger(self.config_vector);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("notify eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("PCI configuration: {0}")]
    Config(#[from] crate::pci::config::ConfigError),
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPciDevice {
    /// `bar_addr` is where the VMM placed BAR 0 (aligned to [`BAR_SIZE`]).
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar_addr: u32,
        irq: Arc<dyn MsiInterrupts>,
    ) -> Result<Self, TransportError> {
        let dtype = device.device_type();
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + dtype as u16,
            revision: 1,
            class: device.pci_class(),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.set_bar(0, Bar { addr: bar_addr, size: BAR_SIZE })?;
        let queues: Vec<QueueRegs> = device.queue_max_sizes().into_iter().map(QueueRegs::new).collect();
        let msix = Msix::new(queues.len() as u16 + 1, irq);
        let (body, writable) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(CAP_ID_MSIX, &body, &writable)?;
        config.add_capability(CAP_ID_VENDOR, &vendor_cap(CFG_COMMON, COMMON, COMMON_LEN, None), &[])?;
        let notify_len = (queues.len() as u64).max(1) * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(CFG_NOTIFY, NOTIFY, notify_len, Some(NOTIFY_MULTIPLIER)),
            &[],
        )?;
        config.add_capability(CAP_ID_VENDOR, &vendor_cap(CFG_ISR, ISR, 1, None), &[])?;
        config.add_capability(CAP_ID_VENDOR, &vendor_cap(CFG_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, None), &[])?;
        let notify = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        Ok(VirtioPciDevice {
            name: name.to_string(),
            config,
            msix_cap,
            msix,
            device,
            queues,
            notify,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            isr: 0,
            activated: false,
            mem,
            errors: ErrorCounter::default(),
        })
    }

    /// (guest address, eventfd) for each queue's notification, for KVM ioeventfds.
    pub fn notify_eventfds(&self) -> Vec<(u64, &EventFd)> {
        let base = self.config.bar(0).map(|b| u64::from(b.addr)).unwrap_or(0);
        self.notify
            .iter()
            .enumerate()
            .map(|(i, e)| (base + NOTIFY + u64::from(NOTIFY_MULTIPLIER) * i as u64, e))
            .collect()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Guest errors: transport-level plus the device's own.
    pub fn errors(&self) -> u64 {
        self.errors.get() + self.device.errors()
    }

    pub fn is_broken(&self) -> bool {
        self.status & STATUS_NEEDS_RESET != 0
    }

    fn irq(&mut self) -> (&mut Box<dyn VirtioDevice>, TransportIrq<'_>) {
        (
            &mut self.device,
            TransportIrq {
                msix: &mut self.msix,
                queues: &self.queues,
                config_vector: self.config_vector,
                isr: &mut self.isr,
            },
        )
    }

    fn mark_broken(&mut self, why: &str) {
        self.errors.record(&self.name, &format_args!("device marked broken: {why}"));
        self.status |= STATUS_NEEDS_RESET;
        let (_, mut irq) = self.irq();
        irq.config();
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in self.queues.iter_mut() {
            *q = QueueRegs::new(q.max);
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.isr = 0;
        self.activated = false;
    }

    /// The device's state for a snapshot; refused while the device holds state outside its
    /// queues ([`VirtioDevice::can_snapshot`]). Call it with the vCPUs stopped.
    pub fn state(&self) -> Result<TransportState, String> {
        let progress = if self.activated {
            self.device.can_snapshot().map_err(|e| format!("{}: {e}", self.name))?;
            self.device.queue_progress()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = progress.get(i).copied().unwrap_or((0, 0));
                QueueState { regs: *q, next_avail, next_used }
            })
            .collect();
        Ok(TransportState {
            device_type: self.device.device_type(),
            config: self.config.state(),
            msix: self.msix.state(),
            queues,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            isr: self.isr,
            activated: self.activated,
        })
    }

    /// Takes over a saved state on a freshly built device of the same kind: the MSI-X routes
    /// go back to the VMM, an activated device is activated again where its queues were, then
    /// every ready queue is processed once and interrupted once (what was in flight when the
    /// snapshot was taken is neither lost nor left waiting).
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        let name = self.name.clone();
        let err = |what: String| format!("{name}: {what}");
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(err(format!(
                "saved as device type {} with {} queues; this one is type {} with {}",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            )));
        }
        self.config.restore(&s.config).map_err(|e| err(e.to_string()))?;
        self.msix.restore(&s.msix).map_err(err)?;
        for (r, q) in self.queues.iter_mut().zip(&s.queues) {
            *r = QueueRegs { max: r.max, ..q.regs };
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.config_vector = self.valid_vector(s.config_vector);
        self.isr = s.isr;
        if s.activated {
            let progress: Vec<(u16, u16)> = s.queues.iter().map(|q| (q.next_avail, q.next_used)).collect();
            self.activate_at(&progress);
            if !self.activated {
                return Err(err("the saved queues do not activate".into()));
            }
            for i in 0..self.queues.len() {
                if self.queues[i].ready {
                    self.queue_notified(i);
                    let (_, mut irq) = self.irq();
                    irq.queue(i as u16);
                }
            }
        }
        Ok(())
    }

    fn activate(&mut self) {
        self.activate_at(&[])
    }

    /// Activation with each queue's (next available, next used) from `progress` (a restore).
    fn activate_at(&mut self, progress: &[(u16, u16)]) {
        if self.status & STATUS_FEATURES_OK == 0 {
            self.mark_broken("DRIVER_OK without FEATURES_OK");
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, r) in self.queues.iter().enumerate() {
            let mut q = match Queue::new(r.max) {
                Ok(q) => q,
                Err(e) => return self.mark_broken(&format!("queue {i}: {e:?}")),
            };
            if r.ready {
                if r.size == 0 || r.size > r.max || !r.size.is_power_of_two() {
                    return self.mark_broken(&format!("queue {i}: size {} (max {})", r.size, r.max));
                }
                q.set_size(r.size);
                q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
                q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
                q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if let Some((avail, used)) = progress.get(i) {
                    q.set_next_avail(*avail);
                    q.set_next_used(*used);
                }
                if !q.is_valid(&self.mem) {
                    return self.mark_broken(&format!("queue {i}: invalid size or ring addresses"));
                }
            }
            queues.push(q);
        }
        match self.device.activate(self.mem.clone(), queues, self.driver_features) {
            Ok(()) => self.activated = true,
            Err(e) => self.mark_broken(&format!("activation: {e}")),
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED);
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                self.errors
                    .record(&self.name, &format_args!("driver features {:#x} not acceptable", self.driver_features));
                v &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v | (self.status & STATUS_NEEDS_RESET);
        if newly_ok && !self.activated && !self.is_broken() {
            self.activate();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let features = match self.device_feature_select {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        };
        let driver = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&features.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&driver.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = 0; // config generation: our device configs do not change under the driver
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            b[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&q.vector.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.ready).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.avail.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.used.to_le_bytes());
        }
        b
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let val = {
            let mut b = [0u8; 8];
            let n = data.len().min(8);
            b[..n].copy_from_slice(&data[..n]);
            u64::from_le_bytes(b)
        };
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match (off, data.len()) {
            (0x00, 4) => self.device_feature_select = val as u32,
            (0x08, 4) => self.driver_feature_select = val as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | val,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (val << 32),
                _ => {}
            },
            (0x10, 2) => self.config_vector = self.valid_vector(val as u16),
            (0x14, 1) => self.write_status(val as u8),
            (0x16, 2) => self.queue_select = val as u16,
            (0x18, 2) if setup => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                    q.size = val as u16;
                }
            }
            (0x1a, 2) => {
                let v = self.valid_vector(val as u16);
                if let Some(q) = self.selected_queue() {
                    q.vector = v;
                }
            }
            (0x1c, 2) if setup && val == 1 => {
                if let Some(q) = self.selected_queue() {
                    q.ready = true;
                }
            }
            (0x20..=0x37, 4 | 8) if setup && off.is_multiple_of(4) => {
                let Some(q) = self.selected_queue().filter(|q| !q.ready) else { return };
                let field = match off & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                if data.len() == 8 {
                    *field = val;
                } else if off.is_multiple_of(8) {
                    *field = (*field & !0xffff_ffff) | val;
                } else {
                    *field = (*field & 0xffff_ffff) | (val << 32);
                }
            }
            _ => self
                .errors
                .record(&self.name, &format_args!("common config write of {} bytes at {off:#x} ignored", data.len())),
        }
    }

    /// The driver notified queue `index` (ioeventfd fired, or a trapped notify write).
    pub fn queue_notified(&mut self, index: usize) {
        if let Some(e) = self.notify.get(index) {
            let _ = e.read();
        }
        if !self.activated || self.is_broken() {
            return;
        }
        let (device, mut irq) = self.irq();
        if let Err(e) = device.queue_event(index, &mut irq) {
            self.mark_broken(&format!("queue {index}: {e}"));
        }
    }

    fn backend_event(&mut self, events: Events, ops: &mut EventOps) {
        let (device, mut irq) = self.irq();
        if let Err(e) = device.backend_event(events, ops, &mut irq) {
            self.mark_broken(&format!("backend: {e}"));
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctrl = self.msix_cap + 2;
        if offset < ctrl + 2 && offset + data.len() > ctrl {
            if let Some(b) = self.config.bytes(ctrl, 2) {
                self.msix.set_control(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }

    fn bars(&self) -> Vec<(u8, Bar)> {
        self.config.bar(0).map(|b| vec![(0, b)]).unwrap_or_default()
    }

    fn bar_read(&mut self, bar: u8, off: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let end = off.saturating_add(data.len() as u64);
        match off {
            o if end <= COMMON + COMMON_LEN => {
                let b = self.common_bytes();
                data.copy_from_slice(&b[o as usize..end as usize]);
            }
            ISR if data.len() == 1 => {
                data[0] = self.isr;
                self.isr = 0; // read to clear
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size() as u64).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_size() as u64).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: u8, off: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let end = off.saturating_add(data.len() as u64);
        let notify_end = NOTIFY + u64::from(NOTIFY_MULTIPLIER) * self.queues.len() as u64;
        match off {
            o if end <= COMMON + COMMON_LEN => self.common_write(o, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..notify_end).contains(&o) => {
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                self.queue_notified(q);
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size() as u64).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }
}

/// Feeds a transport's queue notifications and backend events from the VMM's event loop.
pub struct VirtioPciSubscriber(pub Arc<Mutex<VirtioPciDevice>>);

impl MutEventSubscriber for VirtioPciSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let mut dev = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (i, e) in dev.notify.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                tracing::error!(device = dev.name, "cannot watch queue {i} notifications: {err:?}");
            }
        }
        dev.device.backend_init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut dev = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let data = events.data();
        if (data as usize) < dev.notify.len() {
            dev.queue_notified(data as usize);
        } else {
            dev.backend_event(events, ops);
        }
    }
}

#[cfg(test)]
mod tests;
