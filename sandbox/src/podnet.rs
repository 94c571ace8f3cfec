//! A CRI pod's network on the host, Kata's way. CNI made a veth in the pod's network namespace
//! and put the pod's addresses and routes on it; Shoji adds a tap beside it and redirects every
//! frame arriving on either to the other (tc: ingress qdisc, u32 match-all, `mirred egress
//! redirect`), so the VM's virtio-net device on the tap *is* the pod's interface. The guest gets
//! the veth's MAC, MTU, addresses and routes (the agent's UpdateNetwork), read here from the
//! namespace over netlink. The veth keeps its addresses: nothing on the host side of the
//! namespace uses them, since every frame goes to the VM.
use crate::error::SandboxError;
use shoji_netlink::config::format_mac;
use shoji_netlink::{IpNet, Netlink, NetlinkError, Route};
use shoji_protocol::agent;
use shoji_vmm::{PciPath, Tap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The tap's name in the pod's namespace (Kata names its `tap0_kata`).
pub const TAP_NAME: &str = "tap0_shoji";

/// The pod's interface as CNI set it up, for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the pod ("eth0"): the guest's interface gets the same.
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<Route>,
}

impl PodInterface {
    /// The agent request that sets this interface up in container `container_id`'s network
    /// namespace, on the device plugged at `pci`.
    pub fn update_request(&self, container_id: &str, pci: &PciPath) -> agent::UpdateNetworkRequest {
        agent::UpdateNetworkRequest {
            container_id: container_id.into(),
            interfaces: vec![agent::Interface {
                pci_path: pci.to_string(),
                mac: format_mac(&self.mac),
                name: self.name.clone(),
                mtu: self.mtu,
                addresses: self.addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            }],
            routes: self
                .routes
                .iter()
                .map(|r| agent::Route {
                    dest: r.dest_text(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: self.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The wiring of one pod namespace; [`PodNetwork::detach`] takes it down.
pub struct PodNetwork {
    netns: PathBuf,
    nl: Netlink,
    veth: u32,
    tap: u32,
    /// The links whose ingress qdisc we added (the only ones we delete).
    qdiscs: Vec<u32>,
    pub interface: PodInterface,
}

fn err(netns: &Path, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Io(format!("pod network {}: {e}", netns.display()))
}

impl PodNetwork {
    /// Wires the pod namespace at `netns` to a new tap, returned for the VM's virtio-net
    /// device. `None` when the namespace has no interface with an address (no CNI network:
    /// the pod gets loopback only). On failure nothing is left behind.
    pub fn attach(netns: &Path) -> Result<Option<(PodNetwork, Tap)>, SandboxError> {
        let ns = File::open(netns).map_err(|e| err(netns, e))?;
        let mut nl = Netlink::open_in(&ns).map_err(|e| err(netns, e))?;
        let mut candidates = Vec::new();
        for l in nl.links().map_err(|e| err(netns, e))? {
            if l.loopback || l.name == TAP_NAME {
                continue;
            }
            let addresses = nl.addresses(l.index).map_err(|e| err(netns, e))?;
            if !addresses.is_empty() {
                candidates.push((l, addresses));
            }
        }
        let Some((veth, addresses)) = candidates.first().cloned() else { return Ok(None) };
        if candidates.len() > 1 {
            let others: Vec<&str> = candidates[1..].iter().map(|(l, _)| l.name.as_str()).collect();
            tracing::warn!(
                "pod network {}: only {} goes to the VM; {} left out",
                netns.display(),
                veth.name,
                others.join(", ")
            );
        }
        let mac = veth.mac.ok_or_else(|| err(netns, format!("{} has no MAC address", veth.name)))?;
        let routes = nl.routes(veth.index).map_err(|e| err(netns, e))?;
        let tap = shoji_netlink::in_netns(&ns, || Tap::open(TAP_NAME))
            .map_err(|e| err(netns, e))?
            .map_err(|e| err(netns, e))?;
        let tap_index = nl.link(TAP_NAME).map_err(|e| err(netns, e))?.index;
        let mut net = PodNetwork {
            netns: netns.to_path_buf(),
            nl,
            veth: veth.index,
            tap: tap_index,
            qdiscs: Vec::new(),
            interface: PodInterface { name: veth.name.clone(), mac, mtu: veth.mtu, addresses, routes },
        };
        if let Err(e) = net.wire(veth.mtu) {
            net.unwire();
            return Err(err(netns, e));
        }
        tracing::info!(
            "pod network {}: {} ({}, mtu {}, {}) mirrored to {TAP_NAME}",
            netns.display(),
            veth.name,
            format_mac(&mac),
            veth.mtu,
            net.interface.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
        );
        Ok(Some((net, tap)))
    }

    fn wire(&mut self, mtu: u32) -> Result<(), NetlinkError> {
        self.nl.set_link(self.tap, Some(true), Some(mtu), None, None)?;
        for i in [self.veth, self.tap] {
            self.nl.add_ingress_qdisc(i)?;
            self.qdiscs.push(i);
        }
        self.nl.add_redirect(self.veth, self.tap)?;
        self.nl.add_redirect(self.tap, self.veth)
    }

    /// Deletes the ingress qdiscs we added (their filters with them); what is already gone
    /// is fine.
    fn unwire(&mut self) -> Vec<NetlinkError> {
        std::mem::take(&mut self.qdiscs)
            .into_iter()
            .filter_map(|i| match self.nl.delete_ingress_qdisc(i) {
                Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => None,
                r => r.err(),
            })
            .collect()
    }

    /// Takes the wiring down. The tap itself goes when the VM's device closes it, the veth
    /// and the namespace when CNI and containerd remove them.
    pub fn detach(mut self) {
        for e in self.unwire() {
            tracing::warn!("pod network {}: {e}", self.netns.display());
        }
    }
}
