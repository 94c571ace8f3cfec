//! Shoji's device model.
//!
//! - [`model`]: names shared by host and guest (PCI paths, device kinds, vsock ports). It has no
//!   KVM or VMM dependency, so the guest agent links it.
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
