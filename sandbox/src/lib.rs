//! One Shoji sandbox: our Linux guest with the agent as PID 1, booted on a thread of the calling
//! process ([`Sandbox`]), and the agent session on it ([`Session`], [`Process`]). `shoji run`,
//! the detached sandboxes, `shoji exec` and the containerd shim all stand on this crate and
//! speak to the agent only through it. It knows no command line and builds nothing: the guest
//! kernel and initramfs are looked up ([`artifacts`]) in the cache `shoji setup` fills.
pub mod artifacts;
mod error;
mod hotplug;
mod launch;
mod podnet;
mod session;
pub mod template;
mod vm;

pub use error::{RpcCode, SandboxError, StartFailure, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};
pub use hotplug::{Hotplug, Unplugged, RELEASE_TIMEOUT};
pub use podnet::{PodInterface, PodNetwork, TAP_NAME};
pub use session::{
    hotplugged_virtiofs_storage, virtiofs_storage, ContainerSpec, Device, ExitStatus, Process, Session, SessionConfig,
    StatsContainerResponse, Storage, Stream, UpdateNetworkRequest, AGENT_TIMEOUT, RPC_TIMEOUT,
};
pub use shoji_netlink::{IpNet, Route};
pub use shoji_vmm::{
    DiskConfig, HotplugError, HotplugStats, NetConfig, NetHost, PciPath, ShareConfig, StreamBackend, Tap, TapError,
};
pub use vm::*;
