//! Devices after boot, both halves at once: the VMM plugs a virtio-blk, -fs or -net function into a free slot
//! of bus 0 and the agent finds it by that PCI path (it rescans the bus when a container asks for
//! a path it does not have); to unplug, the agent first removes the function in the guest, then
//! the VMM drops it. A guest that does not let go in time loses the device anyway, with one log
//! line saying so.
//!
//! Plugs, unplugs and the creates that rescan must not interleave (a rescan between the guest's
//! remove and the VMM's would bring the device back), so [`Hotplug`] holds one lock for each
//! whole operation; front ends take [`Hotplug::lock`] around a CreateContainer that names
//! hot-plugged devices.
use crate::error::SandboxError;
use crate::session::Session;
use crate::vm::Sandbox;
use shoji_vmm::{DiskConfig, NetConfig, PciPath, ShareConfig};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};

/// How long the guest gets to release a device before the VMM takes it away.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serialises a sandbox's plugs and unplugs (and the creates that use them).
#[derive(Default)]
pub struct Hotplug {
    lock: Mutex<()>,
}

/// How an unplug ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplugged {
    /// The guest released the function, then the VMM dropped it.
    Released,
    /// The guest did not release it (the reason); the VMM dropped it anyway.
    Forced(String),
}

impl Hotplug {
    pub fn new() -> Self {
        Hotplug::default()
    }

    /// Held across a CreateContainer that names hot-plugged devices.
    pub async fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Plugs `disk` (opened here, on the caller's thread) into the running VM: its PCI path,
    /// which the agent finds after a rescan.
    pub async fn plug_disk(&self, vm: &Sandbox, disk: DiskConfig) -> Result<PciPath, SandboxError> {
        let _g = self.lock.lock().await;
        vm.hot_add_disk(disk)
    }

    /// Shares a host directory with the running VM as a new virtio-fs device: its PCI path,
    /// for [`crate::hotplugged_virtiofs_storage`].
    pub async fn plug_share(&self, vm: &Sandbox, share: ShareConfig) -> Result<PciPath, SandboxError> {
        let _g = self.lock.lock().await;
        vm.hot_add_share(share)
    }

    /// Plugs a virtio-net device on `net.tap` into the running VM: its PCI path, for the
    /// agent's UpdateNetwork.
    pub async fn plug_net(&self, vm: &Sandbox, net: NetConfig) -> Result<PciPath, SandboxError> {
        let _g = self.lock.lock().await;
        vm.hot_add_net(net)
    }

    /// Unplugs the device at `path`: the agent releases it (up to `timeout`), then the VMM drops
    /// it whatever the guest did. A device a live container still uses is refused by the agent
    /// unless `force`.
    pub async fn unplug(
        &self,
        vm: &Sandbox,
        session: &Session,
        path: &PciPath,
        timeout: Duration,
        force: bool,
    ) -> Result<Unplugged, SandboxError> {
        let _g = self.lock.lock().await;
        let released = match session.remove_device(path, timeout, force).await {
            Ok(()) => Unplugged::Released,
            // In use and not forced: the device stays, in the guest and in the VM.
            Err(e @ SandboxError::Rpc { code: crate::RpcCode::FailedPrecondition, .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("device {path}: the guest did not release it ({e}); removing it from the VM anyway");
                Unplugged::Forced(e.to_string())
            }
        };
        vm.hot_remove(path)?;
        Ok(released)
    }
}
