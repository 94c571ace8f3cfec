//! Fixtures the device fuzz targets share (each target includes this file with `#[path]`).
#![allow(dead_code)]
use shoji_devices::pci::msix::{MsiInterrupts, MsiMessage};
use virtio_queue::{Queue, QueueT};
use std::path::PathBuf;
use std::sync::OnceLock;

/// MSI-X routes and interrupts go nowhere: the targets look for panics, not for interrupts.
pub struct NoMsi;
impl MsiInterrupts for NoMsi {
    fn set_route(&self, _: u16, _: Option<MsiMessage>) {}
    fn fire(&self, _: u16) {}
}

/// A 64 KiB zeroed disk image for this process, made once.
pub fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("shoji-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 * 1024]).expect("fuzz disk");
        p
    })
}

/// A ready split queue of `size` entries at the given (descriptor table, available ring, used
/// ring) guest addresses.
pub fn queue(size: u16, (desc, avail, used): (u64, u64, u64)) -> Option<Queue> {
    let mut q = Queue::new(size).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    Some(q)
}
