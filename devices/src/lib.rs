//! Shoji's device model.
//!
//! - [`model`]: the host<->guest contract (PCI paths and slot plan, vsock ports, share tags, mount
//!   options). It has no KVM or VMM dependency, so the guest agent links it.
//! - [`legacy`]: the port-I/O devices a Linux guest expects on a PC: 8250 serial, i8042 reset.
//! - [`bus`]: the trait port-I/O devices implement; the VMM dispatches vCPU exits through it.
#[cfg(feature = "emulation")]
pub mod bus;
#[cfg(feature = "emulation")]
pub mod legacy;
pub mod model;
#[cfg(feature = "emulation")]
pub mod pci;
#[cfg(feature = "emulation")]
pub mod virtio;

/// Copies `data.len()` bytes of `src` starting at `offset` into `data`; bytes past the end of
/// `src` (or an offset that overflows) read as `fill`. Every guest-visible register window
/// (config spaces, MSI-X table and PBA) reads through this, so no access can index out of range.
pub fn copy_out(src: &[u8], offset: u64, data: &mut [u8], fill: u8) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(fill);
    }
}
