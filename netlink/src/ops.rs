//! The requests themselves: links, addresses, routes, and tc's ingress redirect.
use crate::config::{IpNet, Route};
use crate::socket::{Netlink, NetlinkError};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector,
    TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;
use std::os::fd::RawFd;

/// A network interface as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// IPv6 addresses and routes the kernel makes by itself on every link.
fn link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_multicast())
}

impl Netlink {
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.dump("listing links", RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| {
                let mut link = Link {
                    index: l.header.index,
                    name: String::new(),
                    mac: None,
                    mtu: 0,
                    up: l.header.flags.contains(LinkFlags::Up),
                    loopback: l.header.flags.contains(LinkFlags::Loopback),
                };
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Mtu(m) => link.mtu = m,
                        LinkAttribute::Address(a) => link.mac = a.try_into().ok(),
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    pub fn link(&mut self, name: &str) -> Result<Link, NetlinkError> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| NetlinkError::NotFound(format!("no interface {name}")))
    }

    /// Changes what is given of link `index`: up or down, MTU, name, and the network
    /// namespace it lives in (an fd of that namespace).
    pub fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        mtu: Option<u32>,
        name: Option<&str>,
        netns: Option<RawFd>,
    ) -> Result<(), NetlinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(name) = name {
            m.attributes.push(LinkAttribute::IfName(name.into()));
        }
        if let Some(fd) = netns {
            m.attributes.push(LinkAttribute::NetNsFd(fd));
        }
        self.request(&format!("setting link {index}"), RouteNetlinkMessage::SetLink(m), 0)
    }

    /// The addresses of link `index`, without IPv6 link-local ones.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let replies = self.dump("listing addresses", RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
            if a.header.index != index {
                continue;
            }
            // IFA_LOCAL is the interface's own address where it differs from IFA_ADDRESS
            // (point-to-point); otherwise there is only IFA_ADDRESS.
            let mut addr = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => addr = Some(*ip),
                    AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(net) = addr.filter(|ip| !link_local_v6(ip)).and_then(|ip| IpNet::new(ip, a.header.prefix_len)) {
                out.push(net);
            }
        }
        Ok(out)
    }

    pub fn add_address(&mut self, index: u32, net: IpNet) -> Result<(), NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = family(&net.addr);
        m.header.prefix_len = net.prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(net.addr));
        m.attributes.push(AddressAttribute::Address(net.addr));
        self.request(&format!("adding address {net}"), RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The routes through link `index` in the main table that someone added (not the ones the
    /// kernel made for an address, nor IPv6's link-local and multicast ones).
    pub fn routes(&mut self, index: u32) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut q = RouteMessage::default();
            q.header.address_family = fam;
            for m in self.dump("listing routes", RouteNetlinkMessage::GetRoute(q))? {
                let RouteNetlinkMessage::NewRoute(r) = m else { continue };
                let h = &r.header;
                if h.table != RouteHeader::RT_TABLE_MAIN
                    || h.kind != RouteType::Unicast
                    || h.protocol == RouteProtocol::Kernel
                {
                    continue;
                }
                let (mut dest, mut gateway, mut oif) = (None, None, None);
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dest = ip(d),
                        RouteAttribute::Gateway(g) => gateway = ip(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                if oif != Some(index) || dest.as_ref().is_some_and(link_local_v6) {
                    continue;
                }
                let dest = match dest {
                    Some(d) => Some(IpNet::new(d, h.destination_prefix_length).ok_or_else(|| {
                        NetlinkError::Decode(format!("route to {d}/{}", h.destination_prefix_length))
                    })?),
                    // IPv6's default route on the link alone: `::/0`, or it would read as IPv4's.
                    None if fam == AddressFamily::Inet6 && gateway.is_none() => {
                        IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
                    }
                    None => None,
                };
                out.push(Route { dest, gateway });
            }
        }
        Ok(out)
    }

    pub fn add_route(&mut self, index: u32, route: &Route) -> Result<(), NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = if route.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link };
        if let Some(d) = route.dest {
            m.header.destination_prefix_length = d.prefix;
            m.attributes.push(RouteAttribute::Destination(RouteAddress::from(d.addr)));
        }
        if let Some(g) = route.gateway {
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        m.attributes.push(RouteAttribute::Oif(index));
        let what = match route.gateway {
            Some(g) => format!("adding route to {} via {g}", route.dest_text()),
            None => format!("adding route to {}", route.dest_text()),
        };
        self.request(&what, RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Adds the ingress qdisc (`tc qdisc add dev <index> ingress`).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let m = ingress_qdisc(index);
        self.request(
            &format!("adding the ingress qdisc to link {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Deletes link `index`'s ingress qdisc and the filters on it.
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let m = ingress_qdisc(index);
        self.request(
            &format!("deleting the ingress qdisc of link {index}"),
            RouteNetlinkMessage::DelQueueDiscipline(m),
            0,
        )
    }

    /// Every frame arriving on link `from` leaves through link `to` (`tc filter add dev from
    /// parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev to`).
    pub fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), NetlinkError> {
        let mut m = TcMessage::default();
        m.header.index = from as i32;
        m.header.parent = INGRESS_QDISC;
        // Priority 1 in the upper half, ETH_P_ALL (network order) in the lower.
        m.header.info = (1 << 16) | u32::from(0x0003u16.to_be());
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
        ];
        m.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.request(
            &format!("redirecting link {from} to link {to}"),
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The number of tc filters on link `index`'s ingress (for leak checks and tests).
    pub fn ingress_filters(&mut self, index: u32) -> Result<usize, NetlinkError> {
        let mut q = TcMessage::default();
        q.header.index = index as i32;
        q.header.parent = INGRESS_QDISC;
        let replies = self.dump("listing filters", RouteNetlinkMessage::GetTrafficFilter(q))?;
        Ok(replies
            .iter()
            .filter(|m| match m {
                // A u32 dump also lists the hash table each filter sits in: count the filters,
                // which carry a selector.
                RouteNetlinkMessage::NewTrafficFilter(f) => {
                    f.header.index == index as i32
                        && f.attributes.iter().any(|a| {
                            matches!(a, TcAttribute::Options(o)
                                if o.iter().any(|o| matches!(o, TcOption::U32(TcFilterU32Option::Selector(_)))))
                        })
                }
                _ => false,
            })
            .count())
    }
}

/// The ingress qdisc's handle (`ffff:`), the parent of its filters.
const INGRESS_QDISC: TcHandle = TcHandle { major: 0xffff, minor: 0 };

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::default();
    m.header.index = index as i32;
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = INGRESS_QDISC;
    m.attributes = vec![TcAttribute::Kind("ingress".into())];
    m
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
