//! The pod's network in the guest (UpdateNetwork). The host plugged a virtio-net device per pod
//! interface; each is found by its PCI path, checked by MAC (a wrong device is never
//! configured), moved into the pod's network namespace (the sandbox container's) under the
//! pod's name for it, and given the MTU, addresses and routes the host read from the pod's
//! namespace. All of it over netlink: the guest has no `ip`.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use shoji_devices::model::PciPath;
use shoji_netlink::config::{format_mac, parse_mac};
use shoji_netlink::{IpNet, Netlink, NetlinkError, Route};
use shoji_protocol::agent;

use crate::device::net::wait_for_virtio_net;
use crate::device::DeviceError;

/// One interface to set up, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub pci_path: PciPath,
    pub mac: [u8; 6],
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// A checked UpdateNetwork request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    /// Each with the index in `interfaces` of its device.
    pub routes: Vec<(Route, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A field of the request (its path, e.g. `interfaces[0].mtu`) and what is wrong.
    #[error("{0}: {1}")]
    Invalid(String, String),
    #[error("interface {name}: {source}")]
    Device {
        name: String,
        #[source]
        source: DeviceError,
    },
    #[error("interface {name}: the device at PCI {pci_path} is {found} ({mac}), not {want}")]
    WrongDevice { name: String, pci_path: String, found: String, mac: String, want: String },
    #[error("interface {name}: {source}")]
    Netlink {
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{what}: {source}")]
    Namespace {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Linux's IFNAMSIZ less the NUL.
const IFNAME_MAX: usize = 15;

fn check_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl NetworkConfig {
    pub fn parse(req: &agent::UpdateNetworkRequest) -> Result<NetworkConfig, NetworkError> {
        let invalid = |field: String, why: String| NetworkError::Invalid(field, why);
        let mut interfaces: Vec<InterfaceConfig> = Vec::new();
        for (i, x) in req.interfaces.iter().enumerate() {
            let f = |name: &str| format!("interfaces[{i}].{name}");
            let pci_path: PciPath = x.pci_path.parse().map_err(|e| invalid(f("pci_path"), format!("{e}")))?;
            let mac = parse_mac(&x.mac).map_err(|e| invalid(f("mac"), e.to_string()))?;
            if !check_name(&x.name) {
                return Err(invalid(f("name"), format!("{:?} is not an interface name", x.name)));
            }
            if interfaces.iter().any(|o| o.name == x.name) {
                return Err(invalid(f("name"), format!("{:?} is given twice", x.name)));
            }
            if !(68..=65535).contains(&x.mtu) {
                return Err(invalid(f("mtu"), format!("{} is not between 68 and 65535", x.mtu)));
            }
            let addresses = x
                .addresses
                .iter()
                .enumerate()
                .map(|(j, a)| {
                    a.parse::<IpNet>().map_err(|e| invalid(format!("interfaces[{i}].addresses[{j}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            interfaces.push(InterfaceConfig { pci_path, mac, name: x.name.clone(), mtu: x.mtu, addresses });
        }
        let mut routes = Vec::new();
        for (i, r) in req.routes.iter().enumerate() {
            let route =
                Route::parse(&r.dest, &r.gateway).map_err(|e| invalid(format!("routes[{i}]"), e.to_string()))?;
            let dev = interfaces.iter().position(|x| x.name == r.device).ok_or_else(|| {
                invalid(format!("routes[{i}].device"), format!("{:?} is not an interface of this request", r.device))
            })?;
            routes.push((route, dev));
        }
        Ok(NetworkConfig { interfaces, routes })
    }

    /// Sets it all up in the network namespace `netns` (a `/proc/<pid>/ns/net`).
    pub fn apply(&self, netns: &Path, sysfs_root: &Path, timeout: Duration) -> Result<(), NetworkError> {
        let ns = File::open(netns)
            .map_err(|e| NetworkError::Namespace { what: format!("opening {}", netns.display()), source: e })?;
        let mut root = Netlink::open().map_err(|e| NetworkError::Netlink { name: "(netlink)".into(), source: e })?;
        let mut pod = Netlink::open_in(&ns)
            .map_err(|e| NetworkError::Netlink { name: format!("(netlink in {})", netns.display()), source: e })?;
        let nl_err = |name: &str| {
            let name = name.to_string();
            move |source| NetworkError::Netlink { name: name.clone(), source }
        };
        let mut indices = Vec::new();
        for x in &self.interfaces {
            let kernel_name = wait_for_virtio_net(&x.pci_path, sysfs_root, timeout)
                .map_err(|source| NetworkError::Device { name: x.name.clone(), source })?;
            let link = root.link(&kernel_name).map_err(nl_err(&x.name))?;
            if link.mac != Some(x.mac) {
                return Err(NetworkError::WrongDevice {
                    name: x.name.clone(),
                    pci_path: x.pci_path.to_string(),
                    found: kernel_name,
                    mac: link.mac.as_ref().map_or_else(|| "no MAC".into(), format_mac),
                    want: format_mac(&x.mac),
                });
            }
            // Moved and renamed in one request: the kernel names it in the pod's namespace, so a
            // link there with the guest kernel's name is no clash.
            root.set_link(link.index, Some(false), None, Some(&x.name), Some(ns.as_raw_fd()))
                .map_err(nl_err(&x.name))?;
            let moved = pod.link(&x.name).map_err(nl_err(&x.name))?;
            pod.set_link(moved.index, None, Some(x.mtu), None, None).map_err(nl_err(&x.name))?;
            for a in &x.addresses {
                pod.add_address(moved.index, *a).map_err(nl_err(&x.name))?;
            }
            pod.set_link(moved.index, Some(true), None, None, None).map_err(nl_err(&x.name))?;
            indices.push(moved.index);
            tracing::info!(
                "network: {} (PCI {}, {kernel_name}) is {} in {}, mtu {}, {}",
                format_mac(&x.mac),
                x.pci_path,
                x.name,
                netns.display(),
                x.mtu,
                x.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ")
            );
        }
        if let Some(lo) = pod.links().map_err(nl_err("lo"))?.into_iter().find(|l| l.loopback && !l.up) {
            pod.set_link(lo.index, Some(true), None, None, None).map_err(nl_err("lo"))?;
        }
        // Gateways are reached through the link routes: those first.
        let mut routes: Vec<&(Route, usize)> = self.routes.iter().collect();
        routes.sort_by_key(|(r, _)| r.gateway.is_some());
        for (r, dev) in routes {
            let name = &self.interfaces[*dev].name;
            match pod.add_route(indices[*dev], r) {
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                r => r.map_err(nl_err(name))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> agent::UpdateNetworkRequest {
        agent::UpdateNetworkRequest {
            container_id: "pod".into(),
            interfaces: vec![agent::Interface {
                pci_path: "06".into(),
                mac: "02:00:00:00:00:01".into(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec!["10.88.0.5/16".into()],
                ..Default::default()
            }],
            routes: vec![agent::Route {
                dest: "default".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_request_parses_into_its_interfaces_and_routes() {
        let c = NetworkConfig::parse(&req()).unwrap();
        assert_eq!(c.interfaces[0].name, "eth0");
        assert_eq!(c.interfaces[0].addresses, ["10.88.0.5/16".parse().unwrap()]);
        assert_eq!(c.routes, [(Route::parse("default", "10.88.0.1").unwrap(), 0)]);
    }

    type Change = Box<dyn Fn(&mut agent::UpdateNetworkRequest)>;

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, Change)> = vec![
            ("interfaces[0].pci_path: ", Box::new(|r| r.interfaces[0].pci_path = "zz".into())),
            ("interfaces[0].mac: ", Box::new(|r| r.interfaces[0].mac = "02:00".into())),
            ("interfaces[0].name: ", Box::new(|r| r.interfaces[0].name = "../x".into())),
            ("interfaces[0].name: ", Box::new(|r| r.interfaces[0].name = "a-name-far-too-long".into())),
            ("interfaces[1].name: ", Box::new(|r| r.interfaces.push(r.interfaces[0].clone()))),
            ("interfaces[0].mtu: ", Box::new(|r| r.interfaces[0].mtu = 67)),
            ("interfaces[0].addresses[0]: ", Box::new(|r| r.interfaces[0].addresses[0] = "10.88.0.5".into())),
            ("routes[0]: ", Box::new(|r| r.routes[0].dest = "fd00::/64".into())),
            ("routes[0].device: ", Box::new(|r| r.routes[0].device = "eth1".into())),
        ];
        for (want, change) in cases {
            let mut r = req();
            change(&mut r);
            let e = NetworkConfig::parse(&r).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }
}
