//! One Shoji sandbox: our Linux guest with the agent as PID 1, booted on a thread of the calling
//! process, and the agent session on it. `shoji run`, the detached sandboxes and the containerd
//! shim all stand on this crate; it knows no command line and builds nothing (see
//! [`artifacts`]: the guest kernel and initramfs are looked up in the cache `shoji setup` fills).
pub mod artifacts;
pub mod vm;

pub use shoji_vmm::{DiskConfig, ShareConfig};
pub use vm::*;
