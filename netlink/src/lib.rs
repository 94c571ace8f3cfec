//! The route-netlink requests Shoji makes, synchronous and small: on the host, the shim reads a
//! pod's CNI interface and mirrors it to a tap (tc ingress + u32 `mirred` redirects, as Kata
//! does); in the guest, the agent moves the virtio-net interface into the pod's network
//! namespace and gives it the pod's addresses and routes. Both sides name an interface's
//! settings with the plain data in [`config`], which is what crosses the vsock.
pub mod config;
mod ops;
mod socket;

pub use config::{IpNet, NetConfigError, Route};
pub use ops::Link;
pub use socket::{in_netns, Netlink, NetlinkError};
