//! PCI: root bus 0 reached through the configuration-mechanism-1 ports 0xCF8/0xCFC, a host
//! bridge in slot 0, and the device interface the VMM dispatches config and BAR accesses to.
//! The VMM puts each device in the slot [`crate::model::PciSlotPlan`] gives it
//! ([`PciRoot::place`]), the plan the host also names devices to the guest by, at boot or while
//! the guest runs (hotplug); [`PciRoot::remove`] takes a device off the bus again.
pub mod config;
pub mod msix;

pub use config::{Bar, PciConfig, PciIds};

use crate::bus::PioDevice;
use crate::model::{PciPath, PCI_SLOTS};
use std::sync::{Arc, Mutex};

pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_PORTS_LEN: u16 = 8;
const ENABLE: u32 = 1 << 31;

/// A function on the PCI bus. Accesses come straight from the guest: implementations bound-check
/// everything and never panic.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The memory BARs to map, by BAR index.
    fn bars(&self) -> Vec<(u8, Bar)>;
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Slot 0: identifies the bus to the guest (Linux's type-1 probe looks for a host bridge).
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn bars(&self) -> Vec<(u8, Bar)> {
        Vec::new()
    }
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full ({PCI_SLOTS} slots)")]
    BusFull,
    #[error("PCI slot {0} is taken")]
    SlotTaken(PciPath),
    #[error("PCI path {0} is not a device slot on bus 0")]
    NotOnRootBus(PciPath),
}

pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; usize::from(PCI_SLOTS)];
        let bridge = PciConfig::new(PciIds {
            vendor: 0x1b36,
            device: 0x0008,
            revision: 0,
            class: 0x06_0000,
            subsystem_vendor: 0x1b36,
            subsystem: 0,
        });
        slots[0] = Some(Arc::new(Mutex::new(HostBridge(bridge))));
        PciRoot { slots, address: 0 }
    }

    /// CONFIG_ADDRESS and the host bridge's command register, for a snapshot (the devices on
    /// the bus are saved one by one).
    pub fn state(&self) -> (u32, u16) {
        let mut cmd = [0u8; 2];
        if let Some(Some(bridge)) = self.slots.first() {
            bridge.lock().unwrap_or_else(|p| p.into_inner()).config_read(4, &mut cmd);
        }
        (self.address, u16::from_le_bytes(cmd))
    }

    pub fn restore(&mut self, (address, command): (u32, u16)) {
        self.address = address & 0x80ff_fffc;
        if let Some(Some(bridge)) = self.slots.first() {
            bridge.lock().unwrap_or_else(|p| p.into_inner()).config_write(4, &command.to_le_bytes());
        }
    }

    /// Puts `dev` in the lowest free slot and returns its path ("01", "02", ...).
    pub fn add(&mut self, dev: SharedPciDevice) -> Result<PciPath, PciError> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(PciError::BusFull)?;
        self.slots[slot] = Some(dev);
        PciPath::new(vec![slot as u8]).map_err(|_| PciError::BusFull)
    }

    /// Puts `dev` at `path`, a free slot of bus 0 (the host bridge has slot 0).
    pub fn place(&mut self, path: &PciPath, dev: SharedPciDevice) -> Result<(), PciError> {
        let Some(slot) = path.root_slot() else { return Err(PciError::NotOnRootBus(path.clone())) };
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(dev);
                Ok(())
            }
            Some(Some(_)) => Err(PciError::SlotTaken(path.clone())),
            None => Err(PciError::NotOnRootBus(path.clone())),
        }
    }

    /// Takes the device at `path` off the bus: from then on its config space reads as all ones,
    /// as an empty slot's does. The host bridge (slot 0) stays; paths not on bus 0 hold nothing.
    pub fn remove(&mut self, path: &PciPath) -> Option<SharedPciDevice> {
        let slot = path.root_slot()?;
        if slot == 0 {
            return None;
        }
        self.slots.get_mut(usize::from(slot))?.take()
    }

    /// Reads config space of the device at `path` without touching CONFIG_ADDRESS (which
    /// belongs to the guest): for the host's diagnostics and tests. An empty slot reads as all
    /// ones, as it does for the guest.
    pub fn config_read(&self, path: &PciPath, offset: usize, data: &mut [u8]) {
        let dev = path.root_slot().and_then(|slot| self.slots.get(usize::from(slot)).cloned().flatten());
        match dev {
            Some(d) => d.lock().unwrap_or_else(|p| p.into_inner()).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// The device the current CONFIG_ADDRESS selects and the register offset, if any.
    fn selected(&self, port_offset: u16) -> Option<(SharedPciDevice, usize)> {
        let a = self.address;
        if a & ENABLE == 0 || (a >> 16) & 0xff != 0 || (a >> 8) & 0x7 != 0 {
            return None; // disabled, another bus, or a function other than 0
        }
        let slot = ((a >> 11) & 0x1f) as usize;
        let reg = (a & 0xfc) as usize + usize::from(port_offset - 4);
        self.slots.get(slot)?.clone().map(|d| (d, reg))
    }
}

impl PioDevice for PciRoot {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        self.read_inner(offset, data);
        tracing::trace!(offset, address = format_args!("{:#x}", self.address), ?data, "PCI config read");
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        tracing::trace!(offset, address = format_args!("{:#x}", self.address), ?data, "PCI config write");
        self.write_inner(offset, data);
    }
}

impl PciRoot {
    fn read_inner(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => match self.selected(offset) {
                Some((dev, reg)) => dev.lock().unwrap_or_else(|p| p.into_inner()).config_read(reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write_inner(&mut self, offset: u16, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            4..=7 if usize::from(offset - 4) + data.len() <= 4 => {
                if let Some((dev, reg)) = self.selected(offset) {
                    dev.lock().unwrap_or_else(|p| p.into_inner()).config_write(reg, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read32(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        root.write(0, &(ENABLE | (slot << 11) | reg).to_le_bytes());
        let mut b = [0; 4];
        root.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut root = PciRoot::new();
        assert_eq!(cfg_read32(&mut root, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read32(&mut root, 0, 8) >> 8, 0x06_0000);
        assert_eq!(cfg_read32(&mut root, 1, 0), 0xffff_ffff);
        // Address register reads back what was written (Linux's type-1 probe).
        root.write(0, &ENABLE.to_le_bytes());
        let mut a = [0; 4];
        root.read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), ENABLE);
    }

    #[test]
    fn byte_and_word_accesses_hit_the_right_register() {
        let mut root = PciRoot::new();
        root.write(0, &ENABLE.to_le_bytes());
        let mut w = [0; 2];
        root.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008, "device id via 0xCFE");
        let mut b = [0; 1];
        root.read(7, &mut b);
        assert_eq!(b[0], 0x00);
        root.read(5, &mut b);
        assert_eq!(b[0], 0x1b);
    }

    #[test]
    fn hostile_accesses() {
        let mut root = PciRoot::new();
        let mut b = [0u8; 4];
        // Disabled, other bus, other function, bad widths, straddling the data port.
        for addr in [0u32, ENABLE | (1 << 16), ENABLE | (1 << 8)] {
            root.write(0, &addr.to_le_bytes());
            root.read(4, &mut b);
            assert_eq!(b, [0xff; 4]);
        }
        root.write(0, &[1, 2]);
        root.write(1, &[1, 2, 3, 4]);
        root.read(6, &mut b);
        assert_eq!(b, [0xff; 4], "4 bytes at 0xCFE straddle the port");
        root.read(9, &mut b);
        root.write(0, &ENABLE.to_le_bytes());
        root.write(4, &[0xff; 4]); // vendor id is read-only
        assert_eq!(cfg_read32(&mut root, 0, 0), 0x0008_1b36);
        root.write(0, &(ENABLE | 0xfc).to_le_bytes());
        root.write(7, &[0xff]);
        root.read(7, &mut b[..1]);
    }

    fn dummy(device: u16) -> SharedPciDevice {
        Arc::new(Mutex::new(HostBridge(PciConfig::new(PciIds {
            vendor: 1,
            device,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }))))
    }

    #[test]
    fn slots_are_assigned_in_order() {
        let mut root = PciRoot::new();
        for want in 1..PCI_SLOTS {
            assert_eq!(root.add(dummy(2)).unwrap().to_string(), format!("{want:02x}"));
        }
        assert_eq!(root.add(dummy(2)), Err(PciError::BusFull));
    }

    #[test]
    fn devices_go_where_the_plan_says() {
        let plan = crate::model::PciSlotPlan::new(2, 1, true).unwrap();
        let mut root = PciRoot::new();
        // Placed out of order: the slot is the plan's, not the order of placement.
        for (n, (_, _, path)) in plan.devices().enumerate().collect::<Vec<_>>().into_iter().rev() {
            root.place(&path, dummy(0x100 + n as u16)).unwrap();
        }
        for (n, (_, _, path)) in plan.devices().enumerate() {
            let slot = u32::from(path.slots()[0]);
            assert_eq!(cfg_read32(&mut root, slot, 0) >> 16, 0x100 + n as u32, "{path}");
        }
        let p = |s: &str| s.parse::<PciPath>().unwrap();
        assert_eq!(root.place(&p("01"), dummy(9)), Err(PciError::SlotTaken(p("01"))));
        assert_eq!(root.place(&p("00"), dummy(9)), Err(PciError::SlotTaken(p("00"))));
        assert_eq!(root.place(&p("02/01"), dummy(9)), Err(PciError::NotOnRootBus(p("02/01"))));
        // The next free slot after the plan's devices.
        assert_eq!(root.add(dummy(9)).unwrap(), p("05"));
    }

    #[test]
    fn removed_devices_read_as_empty_slots_and_their_slot_is_free_again() {
        let mut root = PciRoot::new();
        let p = |s: &str| s.parse::<PciPath>().unwrap();
        root.place(&p("03"), dummy(0x33)).unwrap();
        assert_eq!(cfg_read32(&mut root, 3, 0), 0x0033_0001);
        let mut b = [0; 4];
        root.config_read(&p("03"), 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0033_0001, "the host's read sees the same register");
        let gone = root.remove(&p("03")).expect("a device was there");
        assert_eq!(cfg_read32(&mut root, 3, 0), 0xffff_ffff);
        root.config_read(&p("03"), 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The removed device is whole (a vCPU may still hold it) and the slot takes another.
        gone.lock().unwrap().config_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0033_0001);
        assert!(root.remove(&p("03")).is_none(), "removed twice");
        root.place(&p("03"), dummy(0x34)).unwrap();
        assert_eq!(cfg_read32(&mut root, 3, 0), 0x0034_0001);
        // The host bridge, empty slots and paths off bus 0 are not removable.
        assert!(root.remove(&p("00")).is_none());
        assert_eq!(cfg_read32(&mut root, 0, 0), 0x0008_1b36);
        assert!(root.remove(&p("1f")).is_none());
        assert!(root.remove(&p("03/00")).is_none());
        assert!(root.remove(&p("03.1")).is_none(), "function 1 is not the device in slot 3");
        assert_eq!(cfg_read32(&mut root, 3, 0), 0x0034_0001);
        assert_eq!(root.place(&p("04.2"), dummy(9)), Err(PciError::NotOnRootBus(p("04.2"))));
        root.config_read(&p("03/00"), 0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
