//! An interface's addresses and routes as plain data, parsed from and printed as the text the
//! agent protocol carries (`10.88.0.5/16`, `default`).
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("{0:?} is not an address with a prefix length (e.g. 10.88.0.5/16)")]
    Cidr(String),
    #[error("{0:?} is not an IP address")]
    Ip(String),
    #[error("route to {dest}: gateway {gateway} is not of the same family")]
    Family { dest: String, gateway: IpAddr },
    #[error("{0:?} is not a MAC address (six hex bytes separated by ':')")]
    Mac(String),
}

/// An address and its prefix length (an interface address, or a route's destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpNet { addr, prefix })
    }
}

impl FromStr for IpNet {
    type Err = NetConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetConfigError::Cidr(s.into());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        // Digits only: "+8" and " 8" parse as u8 but are not what anyone writes.
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        IpNet::new(addr, p.parse().map_err(|_| bad())?).ok_or_else(bad)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A route through an interface: to `dest` (`None`: the default route), via `gateway` or
/// directly on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dest: Option<IpNet>,
    pub gateway: Option<IpAddr>,
}

impl Route {
    /// From the protocol's text: `dest` is `default` or a CIDR, `gateway` empty or an address
    /// of the same family. A default route with no gateway is IPv4's.
    pub fn parse(dest: &str, gateway: &str) -> Result<Route, NetConfigError> {
        let dest = match dest {
            "default" | "" => None,
            d => Some(d.parse::<IpNet>()?),
        };
        let gateway = match gateway {
            "" => None,
            g => Some(g.parse::<IpAddr>().map_err(|_| NetConfigError::Ip(g.into()))?),
        };
        if let (Some(d), Some(g)) = (dest, gateway) {
            if d.addr.is_ipv4() != g.is_ipv4() {
                return Err(NetConfigError::Family { dest: d.to_string(), gateway: g });
            }
        }
        Ok(Route { dest, gateway })
    }

    pub fn is_ipv4(&self) -> bool {
        match (self.dest, self.gateway) {
            (Some(d), _) => d.addr.is_ipv4(),
            (None, Some(g)) => g.is_ipv4(),
            (None, None) => true,
        }
    }

    /// The protocol's text for the destination.
    pub fn dest_text(&self) -> String {
        self.dest.map_or_else(|| "default".into(), |d| d.to_string())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = || NetConfigError::Mac(s.into());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_print_back() {
        for s in ["10.88.0.5/16", "0.0.0.0/0", "fd00::1/64", "2001:db8::/32", "1.2.3.4/32"] {
            assert_eq!(s.parse::<IpNet>().unwrap().to_string(), s);
        }
        for s in ["10.88.0.5", "10.88.0.5/33", "fd00::1/129", "x/8", "1.2.3.4/", "1.2.3.4/+8", "1.2.3.4/ 8", ""] {
            assert_eq!(s.parse::<IpNet>(), Err(NetConfigError::Cidr(s.into())), "{s}");
        }
    }

    #[test]
    fn routes_parse_with_their_family_checked() {
        let r = Route::parse("default", "10.88.0.1").unwrap();
        assert_eq!((r.dest, r.gateway, r.is_ipv4()), (None, Some("10.88.0.1".parse().unwrap()), true));
        assert_eq!(r.dest_text(), "default");
        let r = Route::parse("fd00::/64", "").unwrap();
        assert!(!r.is_ipv4() && r.gateway.is_none());
        assert!(!Route::parse("default", "fd00::1").unwrap().is_ipv4());
        assert!(matches!(Route::parse("10.0.0.0/8", "fd00::1"), Err(NetConfigError::Family { .. })));
        assert_eq!(Route::parse("default", "gw"), Err(NetConfigError::Ip("gw".into())));
        assert!(matches!(Route::parse("10.0.0.0", ""), Err(NetConfigError::Cidr(_))));
    }

    #[test]
    fn macs_parse_strictly() {
        let m = parse_mac("02:42:ac:11:00:0a").unwrap();
        assert_eq!(m, [2, 0x42, 0xac, 0x11, 0, 0x0a]);
        assert_eq!(format_mac(&m), "02:42:ac:11:00:0a");
        for s in ["02:42:ac:11:00", "02:42:ac:11:00:0a:01", "2:42:ac:11:00:0a", "zz:42:ac:11:00:0a", ""] {
            assert_eq!(parse_mac(s), Err(NetConfigError::Mac(s.into())), "{s}");
        }
    }
}
