//! The guest test kit: tiny freestanding guests built from `vmm/testkit` by build.rs with the
//! machine's C toolchain and embedded here, so VMM tests and `shoji bench` boot in milliseconds.
use crate::vm::KernelImage;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Writes [`NULL_MARKER`] to COM1, then resets through the i8042 (PVH ELF).
pub const NULL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/null.elf"));
/// Reports boot hand-off (cmdline, initrd, E820, MP table, SMP bring-up) on COM1 (PVH ELF);
/// command-line words select device modes (`pci` enumeration, a `blk` virtio-blk driver).
pub const PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));
/// The same probe as a bzImage, entered through the Linux 64-bit boot protocol.
pub const PROBE_BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.bzimage"));

pub const NULL_MARKER: &str = "SHOJI-NULL-OK";
pub const PROBE_DONE: &str = "PROBE-DONE";
pub const NAMES: &[&str] = &["null", "probe", "probe-bzimage"];

pub fn guest(name: &str) -> Option<KernelImage> {
    let data = match name {
        "null" => NULL,
        "probe" => PROBE,
        "probe-bzimage" => PROBE_BZIMAGE,
        _ => return None,
    };
    let name = NAMES.iter().find(|n| **n == name).copied()?;
    Some(KernelImage::Bytes { name, data })
}

/// A serial console sink a test can read while the VM runs (`SerialOut::Writer`).
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// What the guest printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits (up to 2 min, then panics showing the output) until the guest printed `what`.
    pub fn wait_for(&self, what: &str) {
        let t0 = std::time::Instant::now();
        while !self.text().contains(what) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(120), "no {what:?} in: {}", self.text());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Write for Capture {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
