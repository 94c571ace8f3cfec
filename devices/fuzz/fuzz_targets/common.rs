//! Fixtures the device fuzz targets share (each target includes this file with `#[path]`).
#![allow(dead_code)]
use shoji_devices::pci::msix::{MsiInterrupts, MsiMessage};
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
