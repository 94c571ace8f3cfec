//! Shoji's devices: the host<->guest contract, and the emulation of every device a sandbox VM has.
//!
//! - [`model`]: the host<->guest contract (PCI paths and slot plan, vsock port and CID, share
//!   tags, mount options). It has no KVM or VMM dependency, so the guest agent links it.
//! - [`bus`]: the trait port-I/O devices implement and the port-I/O dispatch the VMM's vCPU
//!   exits go through.
//! - [`legacy`]: the port-I/O devices a Linux guest expects on a PC: 8250 serial, i8042 reset.
//! - [`pci`]: root bus 0 on the configuration ports with a host bridge, config spaces and BARs,
//!   MSI-X.
//! - [`virtio`]: the modern virtio-pci transport and the virtio-blk, virtio-fs and virtio-vsock
//!   devices.
//!
//! All but [`model`] are behind the `emulation` feature (on by default; the agent turns it off).
//! The emulation needs no KVM either: the VMM backs interrupts and queue notifications with KVM irqfds, MSI
//! routes and ioeventfds, so the devices run and are tested (and fuzzed) without a VM.
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
