//! The slot plan: where each device of a sandbox sits on the guest's PCI bus 0, for the devices
//! it boots with and for those plugged in while it runs.
//!
//! Hotplug without ACPI (the guest boots `acpi=off`) and without a guest kernel patch: the VMM
//! puts a new function in the slot [`PciSlotPlan::hot_add`] gives it, so config space answers
//! there from then on, and the guest agent rescans the bus (`/sys/bus/pci/rescan`). Unplug is
//! the other way round: the agent removes the function in the guest, then the VMM drops it and
//! [`PciSlotPlan::hot_remove`] frees its slot for the next hot-add.
use super::pci::{DeviceKind, PciPath, PCI_SLOTS};

/// The first slot a device gets: slot 0 of bus 0 is the host bridge.
pub const FIRST_DEVICE_SLOT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciPlanError {
    #[error("{devices} PCI devices do not fit bus 0 (at most {max})")]
    TooManyDevices { devices: usize, max: usize },
    #[error("PCI bus 0 has no free slot for another device")]
    BusFull,
    #[error("PCI path {0} is not a hot-plugged device")]
    NotHotPlugged(PciPath),
}

/// Where each device of a sandbox sits on the guest's PCI bus. The VMM places devices by this
/// plan, and the host side names them to the agent by it (a disk's PCI path is its id), so the
/// two cannot disagree. All on bus 0 from slot [`FIRST_DEVICE_SLOT`]: disks in the order given,
/// then shares in the order given, then the vsock device; hot-plugged devices after them, each
/// in the lowest free slot (a slot freed by an unplug is the first one reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlotPlan {
    disks: usize,
    shares: usize,
    vsock: bool,
    /// The hot-plugged device in each slot, by slot number.
    hot: [Option<DeviceKind>; PCI_SLOTS as usize],
}

impl PciSlotPlan {
    /// Most devices one sandbox can have: the slots of bus 0 after the host bridge.
    pub const MAX_DEVICES: usize = (PCI_SLOTS - FIRST_DEVICE_SLOT) as usize;

    pub fn new(disks: usize, shares: usize, vsock: bool) -> Result<Self, PciPlanError> {
        let devices = disks.saturating_add(shares).saturating_add(usize::from(vsock));
        if devices > Self::MAX_DEVICES {
            return Err(PciPlanError::TooManyDevices { devices, max: Self::MAX_DEVICES });
        }
        Ok(PciSlotPlan { disks, shares, vsock, hot: [None; PCI_SLOTS as usize] })
    }

    /// The path of the `index`th boot device of `kind` (the vsock device has index 0), if the
    /// plan has it.
    pub fn path(&self, kind: DeviceKind, index: usize) -> Option<PciPath> {
        let (before, count) = match kind {
            DeviceKind::Block => (0, self.disks),
            DeviceKind::Fs => (self.disks, self.shares),
            DeviceKind::Vsock => (self.disks + self.shares, usize::from(self.vsock)),
            DeviceKind::Net => return None,
        };
        if index >= count {
            return None;
        }
        // In range: `new` checked that every planned slot is below PCI_SLOTS.
        let slot = u8::try_from(before + index).ok()?.checked_add(FIRST_DEVICE_SLOT)?;
        slot_path(slot)
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

    /// Every boot device in slot order: (kind, index within its kind, path).
    pub fn devices(&self) -> impl Iterator<Item = (DeviceKind, usize, PciPath)> + '_ {
        [(DeviceKind::Block, self.disks), (DeviceKind::Fs, self.shares), (DeviceKind::Vsock, usize::from(self.vsock))]
            .into_iter()
            .flat_map(|(kind, n)| (0..n).map(move |i| (kind, i)))
            .filter_map(|(kind, i)| Some((kind, i, self.path(kind, i)?)))
    }

    /// The first slot after the boot devices: hot-plugged devices go at or after it.
    fn first_hot_slot(&self) -> usize {
        usize::from(FIRST_DEVICE_SLOT) + self.disks + self.shares + usize::from(self.vsock)
    }

    /// Takes the lowest free slot after the boot devices for a hot-plugged `kind`.
    pub fn hot_add(&mut self, kind: DeviceKind) -> Result<PciPath, PciPlanError> {
        let first = self.first_hot_slot();
        let slot = (first..self.hot.len()).find(|s| self.hot[*s].is_none()).ok_or(PciPlanError::BusFull)?;
        let path = u8::try_from(slot).ok().and_then(slot_path).ok_or(PciPlanError::BusFull)?;
        self.hot[slot] = Some(kind);
        Ok(path)
    }

    /// Frees the slot of the hot-plugged device at `path` and says what it was. Boot devices
    /// stay where they are.
    pub fn hot_remove(&mut self, path: &PciPath) -> Result<DeviceKind, PciPlanError> {
        let not_hot = || PciPlanError::NotHotPlugged(path.clone());
        let slot = path.root_slot().ok_or_else(not_hot)?;
        self.hot.get_mut(usize::from(slot)).and_then(Option::take).ok_or_else(not_hot)
    }

    /// The hot-plugged devices in slot order.
    pub fn hot_devices(&self) -> impl Iterator<Item = (DeviceKind, PciPath)> + '_ {
        self.hot.iter().enumerate().filter_map(|(s, k)| Some(((*k)?, slot_path(u8::try_from(s).ok()?)?)))
    }
}

/// The path of `slot` on bus 0.
fn slot_path(slot: u8) -> Option<PciPath> {
    PciPath::new(vec![slot]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

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

    #[test]
    fn hot_added_devices_follow_the_boot_devices_and_freed_slots_are_reused() {
        let mut plan = PciSlotPlan::new(1, 1, true).unwrap();
        assert_eq!(plan.hot_add(DeviceKind::Block).ok(), p("04"));
        assert_eq!(plan.hot_add(DeviceKind::Block).ok(), p("05"));
        assert_eq!(plan.hot_add(DeviceKind::Fs).ok(), p("06"));
        assert_eq!(plan.hot_remove(&"05".parse().unwrap()), Ok(DeviceKind::Block));
        let hot: Vec<String> = plan.hot_devices().map(|(k, path)| format!("{k}@{path}")).collect();
        assert_eq!(hot, ["virtio-blk@04", "virtio-fs@06"]);
        // The freed slot first, then the next one up.
        assert_eq!(plan.hot_add(DeviceKind::Block).ok(), p("05"));
        assert_eq!(plan.hot_add(DeviceKind::Block).ok(), p("07"));
        // Boot devices keep their slots and their paths.
        assert_eq!((plan.disk(0), plan.share(0), plan.vsock()), (p("01"), p("02"), p("03")));
        assert_eq!(plan.devices().count(), 3);
    }

    #[test]
    fn only_hot_plugged_devices_can_be_removed() {
        let mut plan = PciSlotPlan::new(1, 0, true).unwrap();
        for s in ["00", "01", "02", "03", "1f", "03/01", "03.1"] {
            let path: PciPath = s.parse().unwrap();
            assert_eq!(plan.hot_remove(&path), Err(PciPlanError::NotHotPlugged(path.clone())), "{s}");
        }
        let path = plan.hot_add(DeviceKind::Block).unwrap();
        let fn1: PciPath = format!("{path}.1").parse().unwrap();
        assert_eq!(plan.hot_remove(&fn1), Err(PciPlanError::NotHotPlugged(fn1)), "another function of its slot");
        assert_eq!(plan.hot_remove(&path), Ok(DeviceKind::Block));
        assert_eq!(plan.hot_remove(&path), Err(PciPlanError::NotHotPlugged(path)), "removed twice");
    }

    #[test]
    fn hot_add_stops_at_slot_31() {
        let mut plan = PciSlotPlan::new(2, 0, false).unwrap();
        for want in 3..PCI_SLOTS {
            assert_eq!(plan.hot_add(DeviceKind::Block).unwrap().slots(), &[want]);
        }
        assert_eq!(plan.hot_add(DeviceKind::Block), Err(PciPlanError::BusFull));
        let mut full = PciSlotPlan::new(20, 10, true).unwrap();
        assert_eq!(full.hot_add(DeviceKind::Block), Err(PciPlanError::BusFull));
    }

    /// One step of a random plug sequence: add, or remove the `n`th plugged device (modulo
    /// their number), or remove a path that may be anything.
    #[derive(Debug, Clone)]
    enum Op {
        Add(DeviceKind),
        RemovePlugged(usize),
        RemoveAny(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let kind = prop_oneof![Just(DeviceKind::Block), Just(DeviceKind::Fs), Just(DeviceKind::Vsock)];
        prop_oneof![
            3 => kind.prop_map(Op::Add),
            2 => any::<usize>().prop_map(Op::RemovePlugged),
            1 => (0..PCI_SLOTS).prop_map(Op::RemoveAny),
        ]
    }

    proptest! {
        /// Random add/remove sequences against a reference model (a set of taken slots): no two
        /// devices share a slot, a freed slot is reused lowest first, nothing goes past slot 31
        /// or into a boot device's slot, and what is removed is what was added there.
        #[test]
        fn hot_plug_sequences_match_a_reference_model(
            disks in 0usize..6, shares in 0usize..4, vsock in any::<bool>(),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut plan = PciSlotPlan::new(disks, shares, vsock).unwrap();
            let boot: BTreeSet<u8> = plan.devices().map(|(_, _, p)| p.slots()[0]).collect();
            let first = FIRST_DEVICE_SLOT + (disks + shares + usize::from(vsock)) as u8;
            let mut model: std::collections::BTreeMap<u8, DeviceKind> = Default::default();
            for op in ops {
                match op {
                    Op::Add(kind) => {
                        let want = (first..PCI_SLOTS).find(|s| !model.contains_key(s));
                        match (plan.hot_add(kind), want) {
                            (Ok(path), Some(s)) => {
                                prop_assert_eq!(path.slots(), &[s]);
                                prop_assert!(!boot.contains(&s));
                                model.insert(s, kind);
                            }
                            (Err(PciPlanError::BusFull), None) => {}
                            (got, want) => prop_assert!(false, "hot_add gave {:?}, the model {:?}", got, want),
                        }
                    }
                    Op::RemovePlugged(n) if !model.is_empty() => {
                        let (&s, &kind) = model.iter().nth(n % model.len()).unwrap();
                        prop_assert_eq!(plan.hot_remove(&PciPath::new(vec![s]).unwrap()), Ok(kind));
                        model.remove(&s);
                    }
                    Op::RemovePlugged(_) => {}
                    Op::RemoveAny(s) => {
                        let got = plan.hot_remove(&PciPath::new(vec![s]).unwrap());
                        match model.remove(&s) {
                            Some(kind) => prop_assert_eq!(got, Ok(kind)),
                            None => prop_assert!(got.is_err()),
                        }
                    }
                }
                let hot: Vec<(u8, DeviceKind)> = plan.hot_devices().map(|(k, p)| (p.slots()[0], k)).collect();
                let want: Vec<(u8, DeviceKind)> = model.iter().map(|(s, k)| (*s, *k)).collect();
                prop_assert_eq!(hot, want);
            }
        }
    }
}
