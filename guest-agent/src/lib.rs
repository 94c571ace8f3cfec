//! Shoji's guest agent, PID 1 in the sandbox VM. So far: the pure core of device handling
//! (requests → updates → one batched rewrite of the container's OCI spec) and the container
//! runtime (`runtime::LinuxRuntime`).

pub mod device;
pub mod runtime;
