//! The guest's PCI tree as host and guest both name it: [`PciPath`] and the slot plan that says
//! where each device of a sandbox sits.
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

/// The first slot a device gets: slot 0 of bus 0 is the host bridge.
pub const FIRST_DEVICE_SLOT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciPlanError {
    #[error("{devices} PCI devices do not fit bus 0 (at most {max})")]
    TooManyDevices { devices: usize, max: usize },
}

/// Where each device of a sandbox sits on the guest's PCI bus. The VMM places devices by this
/// plan, and the host side names them to the agent by it (a disk's PCI path is its id), so the
/// two cannot disagree. All on bus 0 from slot [`FIRST_DEVICE_SLOT`]: disks in the order given,
/// then shares in the order given, then the vsock device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlotPlan {
    disks: usize,
    shares: usize,
    vsock: bool,
}

impl PciSlotPlan {
    /// Most devices one sandbox can have: the slots of bus 0 after the host bridge.
    pub const MAX_DEVICES: usize = (PCI_SLOTS - FIRST_DEVICE_SLOT) as usize;

    pub fn new(disks: usize, shares: usize, vsock: bool) -> Result<Self, PciPlanError> {
        let devices = disks.saturating_add(shares).saturating_add(usize::from(vsock));
        if devices > Self::MAX_DEVICES {
            return Err(PciPlanError::TooManyDevices { devices, max: Self::MAX_DEVICES });
        }
        Ok(PciSlotPlan { disks, shares, vsock })
    }

    /// The path of the `index`th device of `kind` (the vsock device has index 0), if the plan
    /// has it.
    pub fn path(&self, kind: DeviceKind, index: usize) -> Option<PciPath> {
        let (before, count) = match kind {
            DeviceKind::Block => (0, self.disks),
            DeviceKind::Fs => (self.disks, self.shares),
            DeviceKind::Vsock => (self.disks + self.shares, usize::from(self.vsock)),
        };
        if index >= count {
            return None;
        }
        // In range: `new` checked that every planned slot is below PCI_SLOTS.
        let slot = u8::try_from(before + index).ok()?.checked_add(FIRST_DEVICE_SLOT)?;
        PciPath::new(vec![slot]).ok()
    }

    /// Disk `i` (`--disk`, a container's block device).
    pub fn disk(&self, i: usize) -> Option<PciPath> {
        self.path(DeviceKind::Block, i)
    }

    /// Share `j` (virtio-fs).
    pub fn share(&self, j: usize) -> Option<PciPath> {
        self.path(DeviceKind::Fs, j)
    }

    /// The vsock device.
    pub fn vsock(&self) -> Option<PciPath> {
        self.path(DeviceKind::Vsock, 0)
    }

    /// Every planned device in slot order: (kind, index within its kind, path).
    pub fn devices(&self) -> impl Iterator<Item = (DeviceKind, usize, PciPath)> + '_ {
        [(DeviceKind::Block, self.disks), (DeviceKind::Fs, self.shares), (DeviceKind::Vsock, usize::from(self.vsock))]
            .into_iter()
            .flat_map(|(kind, n)| (0..n).map(move |i| (kind, i)))
            .filter_map(|(kind, i)| Some((kind, i, self.path(kind, i)?)))
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

    fn p(s: &str) -> Option<PciPath> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn plan_fills_slots_disks_then_shares_then_vsock() {
        let plan = PciSlotPlan::new(2, 3, true).unwrap();
        assert_eq!((plan.disk(0), plan.disk(1), plan.disk(2)), (p("01"), p("02"), None));
        assert_eq!((plan.share(0), plan.share(2), plan.share(3)), (p("03"), p("05"), None));
        assert_eq!(plan.vsock(), p("06"));
        let order: Vec<String> = plan.devices().map(|(k, i, path)| format!("{k}#{i}@{path}")).collect();
        assert_eq!(
            order,
            [
                "virtio-blk#0@01",
                "virtio-blk#1@02",
                "virtio-fs#0@03",
                "virtio-fs#1@04",
                "virtio-fs#2@05",
                "virtio-vsock#0@06"
            ]
        );
    }

    #[test]
    fn plan_without_some_kinds() {
        let plan = PciSlotPlan::new(0, 1, true).unwrap();
        assert_eq!((plan.disk(0), plan.share(0), plan.vsock()), (None, p("01"), p("02")));
        let plan = PciSlotPlan::new(1, 0, false).unwrap();
        assert_eq!((plan.disk(0), plan.share(0), plan.vsock()), (p("01"), None, None));
        assert_eq!(plan.path(DeviceKind::Vsock, 1), None);
        assert_eq!(PciSlotPlan::new(0, 0, false).unwrap().devices().count(), 0);
    }

    #[test]
    fn plan_fits_bus_zero_or_is_refused() {
        let plan = PciSlotPlan::new(20, 10, true).unwrap();
        assert_eq!(plan.vsock(), p("1f"));
        assert_eq!(plan.devices().count(), PciSlotPlan::MAX_DEVICES);
        assert_eq!(PciSlotPlan::new(20, 11, true), Err(PciPlanError::TooManyDevices { devices: 32, max: 31 }));
        assert!(PciSlotPlan::new(usize::MAX, usize::MAX, true).is_err());
    }
}
