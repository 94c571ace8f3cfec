//! UpdateNetwork: the pod's interfaces set up in its sandbox container's network namespace
//! ([`crate::network`]); the devices count as that container's, so RemoveDevice refuses them
//! while it lives.
use shoji_protocol::agent;
use shoji_protocol::ttrpc::Code;

use super::container::on_blocking_pool;
use super::{convert, hotplug, Inner, RpcError};
use crate::device::DeviceError;
use crate::network::{NetworkConfig, NetworkError};

impl Inner {
    pub(super) async fn update_network(&self, req: agent::UpdateNetworkRequest) -> Result<(), RpcError> {
        let id = req.container_id.clone();
        convert::check_container_id(&id)?;
        let cfg = NetworkConfig::parse(&req).map_err(network_error)?;
        let netns = self.runtime.namespace(&id, "net").await.map_err(|e| RpcError::runtime(&id, e))?;
        let owner = hotplug::Owner::Container(id.clone());
        let ticket = self.claim_paths(owner, cfg.interfaces.iter().map(|x| x.pci_path.clone()));
        let (sysfs, timeout) = (self.cfg.storage.sysfs_root.clone(), self.cfg.storage.hotplug_timeout);
        let r = on_blocking_pool(move || cfg.apply(&netns, &sysfs, timeout).map_err(network_error)).await;
        if r.is_err() {
            self.release_ticket(ticket);
        }
        r.map_err(|e| e.context(format!("container {id:?}: network")))
    }
}

fn network_error(e: NetworkError) -> RpcError {
    let code = match &e {
        NetworkError::Invalid(..) => Code::INVALID_ARGUMENT,
        NetworkError::Device { source: DeviceError::Timeout { .. }, .. } => Code::DEADLINE_EXCEEDED,
        NetworkError::Device { .. } | NetworkError::WrongDevice { .. } => Code::FAILED_PRECONDITION,
        NetworkError::Netlink { .. } | NetworkError::Namespace { .. } => Code::INTERNAL,
    };
    RpcError::new(code, e.to_string())
}
