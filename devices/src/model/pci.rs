//! The guest's PCI tree as host and guest both name it: [`PciPath`] (the slot plan that says
//! where each device of a sandbox sits is in [`super::slots`]).
use std::fmt;
use std::str::FromStr;

/// A device's place on the guest's PCI tree, slot by slot from the root bus through each
/// bridge: "02" is slot 2 on bus 0, "02/01" is slot 1 behind the bridge in slot 2.
///
/// Each element may name a function other than 0 as Kata's `SlotFn` does, `SS.F`: "02.1" is
/// function 1 of slot 2, "03.2/01" slot 1 behind a bridge that is function 2 of slot 3.
/// Function 0 is written without its suffix ("02", never "02.0"), so every path without a
/// function reads and prints as it always has; "02.0" is accepted and means "02".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PciPath {
    slots: Vec<u8>,
    /// One per slot; kept apart so that [`PciPath::slots`] stays a plain slice.
    functions: Vec<u8>,
}

/// PCI allows 32 device slots per bus.
pub const PCI_SLOTS: u8 = 32;
/// PCI allows 8 functions per device slot.
pub const PCI_FUNCTIONS: u8 = 8;
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
    #[error("PCI path {path:?}: function {function:?} is not one digit from 0 to 7")]
    BadFunction { path: String, function: String },
}

/// One element of a [`PciPath`]: a slot (device number) and a function on one bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotFn {
    pub slot: u8,
    pub function: u8,
}

impl SlotFn {
    /// `None` when `slot` or `function` is out of PCI's range.
    pub fn new(slot: u8, function: u8) -> Option<SlotFn> {
        (slot < PCI_SLOTS && function < PCI_FUNCTIONS).then_some(SlotFn { slot, function })
    }
}

impl fmt::Display for SlotFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.slot)?;
        if self.function != 0 {
            write!(f, ".{}", self.function)?;
        }
        Ok(())
    }
}

impl PciPath {
    /// A path of function-0 elements (the common case: one function per slot).
    pub fn new(slots: Vec<u8>) -> Result<Self, PciPathError> {
        PciPath::from_slot_fns(slots.into_iter().map(|slot| SlotFn { slot, function: 0 }))
    }

    /// A path of any elements; the ranges are checked here.
    pub fn from_slot_fns(elems: impl IntoIterator<Item = SlotFn>) -> Result<Self, PciPathError> {
        let (slots, functions): (Vec<u8>, Vec<u8>) = elems.into_iter().map(|e| (e.slot, e.function)).unzip();
        let path = PciPath { slots, functions };
        if path.slots.is_empty() {
            return Err(PciPathError::Empty);
        }
        if path.slots.len() > PCI_PATH_MAX_DEPTH {
            return Err(PciPathError::TooDeep { path: path.to_string() });
        }
        if let Some(s) = path.slots.iter().find(|s| **s >= PCI_SLOTS) {
            return Err(PciPathError::BadSlot { path: path.to_string(), slot: format!("{s:02x}") });
        }
        if let Some(f) = path.functions.iter().find(|f| **f >= PCI_FUNCTIONS) {
            return Err(PciPathError::BadFunction { path: path.to_string(), function: f.to_string() });
        }
        Ok(path)
    }

    /// The slot of each element; see [`PciPath::functions`] for their functions.
    pub fn slots(&self) -> &[u8] {
        &self.slots
    }

    /// The function of each element (0 for an element written without one).
    pub fn functions(&self) -> &[u8] {
        &self.functions
    }

    /// Each element, root bus first.
    pub fn elements(&self) -> impl ExactSizeIterator<Item = SlotFn> + '_ {
        self.slots.iter().zip(&self.functions).map(|(&slot, &function)| SlotFn { slot, function })
    }

    /// The last element: the device itself.
    pub fn device(&self) -> SlotFn {
        // Never empty: every constructor checks.
        self.elements().last().unwrap_or(SlotFn { slot: 0, function: 0 })
    }

    /// The slot when this is function 0 of a slot on the root bus (what the VMM places and
    /// removes today); `None` for anything behind a bridge or a function other than 0.
    pub fn root_slot(&self) -> Option<u8> {
        match (self.slots.as_slice(), self.functions.as_slice()) {
            (&[slot], &[0]) => Some(slot),
            _ => None,
        }
    }

    /// Whether `other` is this device or sits behind it (this path is a prefix of `other`):
    /// removing this device removes `other` too.
    pub fn contains(&self, other: &PciPath) -> bool {
        other.slots.starts_with(&self.slots) && other.functions.starts_with(&self.functions)
    }
}

impl fmt::Display for PciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.elements().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{e}")?;
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
        let bad_slot = |slot: &str| PciPathError::BadSlot { path: s.into(), slot: slot.into() };
        let bad_fn = |function: &str| PciPathError::BadFunction { path: s.into(), function: function.into() };
        let elems = parts
            .iter()
            .map(|p| {
                let (slot, function) = match p.split_once('.') {
                    Some((slot, function)) => (slot, Some(function)),
                    None => (*p, None),
                };
                if slot.len() != 2 || !slot.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad_slot(slot));
                }
                let slot_n = u8::from_str_radix(slot, 16).map_err(|_| bad_slot(slot))?;
                if slot_n >= PCI_SLOTS {
                    return Err(bad_slot(slot));
                }
                let function = match function {
                    None => 0,
                    Some(f) if f.len() == 1 && matches!(f.as_bytes()[0], b'0'..=b'7') => f.as_bytes()[0] - b'0',
                    Some(f) => return Err(bad_fn(f)),
                };
                Ok(SlotFn { slot: slot_n, function })
            })
            .collect::<Result<Vec<SlotFn>, _>>()?;
        PciPath::from_slot_fns(elems)
    }
}

/// Kinds of device on a sandbox's PCI bus, in the order the bus is filled at boot (a network
/// device is hot-plugged only, for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Block,
    Fs,
    Vsock,
    Net,
}

impl DeviceKind {
    /// The name reports use ("virtio-blk", ...).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "virtio-blk",
            DeviceKind::Fs => "virtio-fs",
            DeviceKind::Vsock => "virtio-vsock",
            DeviceKind::Net => "virtio-net",
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
        for s in ["00", "02", "1f", "02/01", "02/1f/03", "02.1", "1f.7", "03.2/01", "02/01.4/1e.7"] {
            let p: PciPath = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!("02/01".parse::<PciPath>().unwrap().slots(), &[2, 1]);
        assert_eq!("02/01".parse::<PciPath>().unwrap().functions(), &[0, 0]);
        let p: PciPath = "03.2/01.5".parse().unwrap();
        assert_eq!((p.slots(), p.functions()), (&[3, 1][..], &[2, 5][..]));
        assert_eq!(p.device(), SlotFn { slot: 1, function: 5 });
        assert_eq!(p.elements().collect::<Vec<_>>(), [SlotFn::new(3, 2).unwrap(), SlotFn::new(1, 5).unwrap()]);
    }

    /// Function 0 is the path as it was before functions: "02.0" (Kata's spelling) is "02".
    #[test]
    fn function_zero_is_the_plain_slot() {
        let a: PciPath = "02.0/01.0".parse().unwrap();
        assert_eq!(a, "02/01".parse().unwrap());
        assert_eq!(a, PciPath::new(vec![2, 1]).unwrap());
        assert_eq!(a.to_string(), "02/01");
        assert_ne!("02.1".parse::<PciPath>().unwrap(), "02".parse().unwrap());
    }

    #[test]
    fn root_slot_is_only_function_zero_on_bus_zero() {
        assert_eq!("05".parse::<PciPath>().unwrap().root_slot(), Some(5));
        assert_eq!("05.1".parse::<PciPath>().unwrap().root_slot(), None);
        assert_eq!("05/01".parse::<PciPath>().unwrap().root_slot(), None);
    }

    #[test]
    fn contains_is_a_prefix_by_slot_and_function() {
        let p = |s: &str| s.parse::<PciPath>().unwrap();
        assert!(p("02").contains(&p("02")));
        assert!(p("02").contains(&p("02/01")));
        assert!(p("02").contains(&p("02/01.3/04")));
        assert!(!p("02/01").contains(&p("02")));
        assert!(!p("02.1").contains(&p("02/01")));
        assert!(!p("02").contains(&p("02.1/01")));
        assert!(!p("03").contains(&p("02/03")));
    }

    #[test]
    fn from_slot_fns_checks_ranges() {
        assert!(PciPath::from_slot_fns([SlotFn { slot: 2, function: 8 }]).is_err());
        assert!(PciPath::from_slot_fns([SlotFn { slot: 32, function: 0 }]).is_err());
        assert!(PciPath::from_slot_fns([]).is_err());
        assert_eq!(SlotFn::new(31, 7).map(|e| e.to_string()).as_deref(), Some("1f.7"));
        assert_eq!(SlotFn::new(32, 0), None);
        assert_eq!(SlotFn::new(0, 8), None);
    }

    #[test]
    fn invalid_forms_are_rejected_with_the_culprit() {
        assert_eq!("".parse::<PciPath>(), Err(PciPathError::Empty));
        for (s, slot) in [
            ("2", "2"),
            ("020", "020"),
            ("20", "20"),
            ("zz", "zz"),
            ("02/", ""),
            ("/02", ""),
            ("+1", "+1"),
            (".1", ""),
            ("2.1", "2"),
        ] {
            assert_eq!(s.parse::<PciPath>(), Err(PciPathError::BadSlot { path: s.into(), slot: slot.into() }), "{s}");
        }
        for (s, function) in
            [("02.8", "8"), ("02.", ""), ("02.10", "10"), ("02.1.1", "1.1"), ("02.a", "a"), ("01/02.+1", "+1")]
        {
            assert_eq!(
                s.parse::<PciPath>(),
                Err(PciPathError::BadFunction { path: s.into(), function: function.into() }),
                "{s}"
            );
        }
        assert!(matches!("01/01/01/01/01/01/01/01/01".parse::<PciPath>(), Err(PciPathError::TooDeep { .. })));
        assert!(PciPath::new(vec![]).is_err());
        assert!(PciPath::new(vec![32]).is_err());
    }
}
