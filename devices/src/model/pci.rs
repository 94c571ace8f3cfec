//! The guest's PCI tree as host and guest both name it: [`PciPath`] (the slot plan that says
//! where each device of a sandbox sits is in [`super::slots`]).
use std::fmt;
use std::str::FromStr;

/// A device's place on the guest's PCI tree, slot by slot from the root bus through each
/// bridge: "02" is slot 2 on bus 0, "02/01" is slot 1 behind the bridge in slot 2.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PciPath(Vec<u8>);

/// PCI allows 32 device slots per bus.
pub const PCI_SLOTS: u8 = 32;
/// Deeper trees than this are not something Shoji builds; reject them as malformed.
pub const PCI_PATH_MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciPathError {
    #[error("PCI path is empty")]
    Empty,
    #[error("PCI path {path:?}: more than {PCI_PATH_MAX_DEPTH} levels")]
    TooDeep { path: String },
    #[error("PCI path {path:?}: slot {slot:?} is not two hex digits below 0x20")]
    BadSlot { path: String, slot: String },
}

impl PciPath {
    pub fn new(slots: Vec<u8>) -> Result<Self, PciPathError> {
        let path = PciPath(slots);
        if path.0.is_empty() {
            return Err(PciPathError::Empty);
        }
        if path.0.len() > PCI_PATH_MAX_DEPTH {
            return Err(PciPathError::TooDeep { path: path.to_string() });
        }
        if let Some(s) = path.0.iter().find(|s| **s >= PCI_SLOTS) {
            return Err(PciPathError::BadSlot { path: path.to_string(), slot: format!("{s:02x}") });
        }
        Ok(path)
    }

    pub fn slots(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for PciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{s:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for PciPath {
    type Err = PciPathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PciPathError::Empty);
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > PCI_PATH_MAX_DEPTH {
            return Err(PciPathError::TooDeep { path: s.into() });
        }
        let bad = |slot: &str| PciPathError::BadSlot { path: s.into(), slot: slot.into() };
        let slots = parts
            .iter()
            .map(|p| {
                if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(p));
                }
                let v = u8::from_str_radix(p, 16).map_err(|_| bad(p))?;
                if v >= PCI_SLOTS {
                    return Err(bad(p));
                }
                Ok(v)
            })
            .collect::<Result<Vec<u8>, _>>()?;
        PciPath::new(slots)
    }
}

/// Kinds of device on a sandbox's PCI bus, in the order the bus is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Block,
    Fs,
    Vsock,
}

impl DeviceKind {
    /// The name reports use ("virtio-blk", ...).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "virtio-blk",
            DeviceKind::Fs => "virtio-fs",
            DeviceKind::Vsock => "virtio-vsock",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        for s in ["00", "02", "1f", "02/01", "02/1f/03"] {
            let p: PciPath = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!("02/01".parse::<PciPath>().unwrap().slots(), &[2, 1]);
    }

    #[test]
    fn invalid_forms_are_rejected_with_the_culprit() {
        assert_eq!("".parse::<PciPath>(), Err(PciPathError::Empty));
        for (s, slot) in
            [("2", "2"), ("020", "020"), ("20", "20"), ("zz", "zz"), ("02/", ""), ("/02", ""), ("+1", "+1")]
        {
            assert_eq!(s.parse::<PciPath>(), Err(PciPathError::BadSlot { path: s.into(), slot: slot.into() }), "{s}");
        }
        assert!(matches!("01/01/01/01/01/01/01/01/01".parse::<PciPath>(), Err(PciPathError::TooDeep { .. })));
        assert!(PciPath::new(vec![]).is_err());
        assert!(PciPath::new(vec![32]).is_err());
    }
}
