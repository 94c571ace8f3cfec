//! Shoji's virtual machine monitor, a library: a KVM VM with guest memory, vCPU threads and the
//! devices of shoji-devices (port I/O, and PCI with MSI-X routes, irqfds and ioeventfds served by
//! one device thread), booted straight into a PVH or Linux 64-bit kernel entry with no firmware.
//! Every thread it starts for a VM confines itself ([`confine`]). It knows no command line and
//! no agent: the sandbox library and the `shoji` CLI drive it through [`VmConfig`] and [`run`] or
//! [`spawn`], and plug disks into a running VM, or pause it, through a [`VmControl`] ([`spawn_with_control`]).
//! The C test guests are behind the `testkit` feature.
pub mod boot;
pub mod bus;
pub mod cmdline;
pub mod confine;
pub mod cpuid;
pub mod exit;
pub mod host;
pub mod irq;
pub mod layout;
pub mod logfile;
pub mod mptable;
pub mod pause;
pub mod pci;
pub mod regs;
pub mod snapshot;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod vcpu;
pub mod vm;

pub use exit::StopReason;
pub use pause::PauseError;
pub use pci::{AttachedDevice, DiskConfig, HotplugError, HotplugStats, NetConfig, NetHost, ShareConfig};
pub use shoji_devices::model::PciPath;
pub use shoji_devices::virtio::net::stream::StreamBackend;
pub use shoji_devices::virtio::net::tap::{Tap, TapError};
pub use vm::{
    run, spawn, spawn_with_control, IrqChip, KernelImage, SerialOut, VmConfig, VmControl, VmError, VmOutcome,
};
