//! Shoji's virtual machine monitor: a KVM VM with guest memory, vCPU threads and legacy devices,
//! booted straight into a PVH or Linux 64-bit kernel entry with no firmware.
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
pub mod pci;
pub mod regs;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod vcpu;
pub mod vm;

pub use exit::StopReason;
pub use pci::{DiskConfig, ShareConfig};
pub use vm::{run, spawn, KernelImage, SerialOut, VmConfig, VmError, VmOutcome};
