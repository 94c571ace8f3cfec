//! virtio 1.x devices behind the modern virtio-pci transport.
//!
//! A device implements [`VirtioDevice`]; [`transport::VirtioPciDevice`] gives it PCI identity,
//! capabilities, the common configuration, MSI-X and queue notification eventfds, and feeds it
//! queue events from the VMM's event loop. Everything a guest writes is treated as hostile:
//! errors are counted and logged (rate-limited), and a device that cannot continue is marked
//! broken (DEVICE_NEEDS_RESET) without affecting the VM or other devices.
pub mod block;
pub mod fs;
pub mod net;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod transport;
pub mod vsock;

use event_manager::{EventOps, Events};
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use transport::{VirtioPciDevice, VirtioPciSubscriber};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// How a device tells the driver it used buffers.
pub trait Interrupt {
    fn queue(&mut self, queue: u16);
    fn config(&mut self);
}

/// What a device does when a guest request is malformed, counted per device.
#[derive(Default, Debug)]
pub struct ErrorCounter {
    count: AtomicU64,
}

/// Only the first few errors of a device are logged one by one; the rest are counted.
const LOG_FIRST_ERRORS: u64 = 8;

impl ErrorCounter {
    pub fn record(&self, device: &str, what: &dyn std::fmt::Display) {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if n < LOG_FIRST_ERRORS {
            tracing::warn!(device, "guest error: {what}");
        } else if n == LOG_FIRST_ERRORS {
            tracing::warn!(device, "more guest errors: counting only");
        }
    }
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Why a device cannot go on: the transport marks it broken (DEVICE_NEEDS_RESET) until the
/// driver resets it. Malformed requests are no such error: devices count and answer those.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("expected {expected} queue(s), got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("{queue} available ring: {source}")]
    AvailableRing { queue: &'static str, source: virtio_queue::Error },
    #[error("{queue} used ring: {source}")]
    UsedRing { queue: &'static str, source: virtio_queue::Error },
    #[error("cannot make a queue of size {size}: {source}")]
    NewQueue { size: u16, source: virtio_queue::Error },
    #[error("FUSE server panicked on opcode {opcode}")]
    FuseServerPanic { opcode: u32 },
}

/// Result of device processing: `Err` marks the device broken until the driver resets it.
pub type DeviceResult = Result<(), DeviceError>;

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// PCI class code for the transport.
    fn pci_class(&self) -> u32 {
        0xff_0000
    }
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered (including VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: queues are validated and owned by the device from now on.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, acked_features: u64) -> DeviceResult;
    /// The driver notified queue `index`.
    fn queue_event(&mut self, index: usize, irq: &mut dyn Interrupt) -> DeviceResult;
    /// Back to the state before activation (driver reset or NEEDS_RESET recovery).
    fn reset(&mut self);
    /// Backend fds (sockets) to register in the event loop; their events arrive in
    /// [`VirtioDevice::backend_event`].
    fn backend_init(&mut self, _ops: &mut EventOps) {}
    fn backend_event(&mut self, _events: Events, _ops: &mut EventOps, _irq: &mut dyn Interrupt) -> DeviceResult {
        Ok(())
    }
    /// Guest errors seen so far.
    fn errors(&self) -> u64;
    /// (next available, next used) of each queue, for a snapshot of an activated device.
    fn queue_progress(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
    /// Whether an activated device's state is all in its queues now, so a snapshot can hold
    /// it; why not otherwise.
    fn can_snapshot(&self) -> Result<(), String> {
        Err("this kind of device cannot be saved in a snapshot".into())
    }
}

/// [`VirtioDevice::queue_progress`] for a device that keeps its queues in a `Vec`.
pub fn queue_progress(queues: &[Queue]) -> Vec<(u16, u16)> {
    queues.iter().map(|q| (q.next_avail(), q.next_used())).collect()
}

/// Copies `data.len()` bytes of `bytes` at `offset` (out of range reads as zero), for device
/// configuration spaces.
pub fn read_config_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    crate::copy_out(bytes, offset, data, 0)
}

/// Takes ready queue `index` out of `queues` (an unready placeholder stays in its place) so a
/// device can process it while borrowing itself mutably; the caller puts it back.
pub fn take_ready_queue(queues: &mut [Queue], index: usize) -> Result<Option<Queue>, DeviceError> {
    match queues.get_mut(index) {
        Some(q) if q.ready() => {
            let size = q.max_size();
            let placeholder = Queue::new(size).map_err(|source| DeviceError::NewQueue { size, source })?;
            Ok(Some(std::mem::replace(q, placeholder)))
        }
        _ => Ok(None),
    }
}
