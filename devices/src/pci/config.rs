//! A type-0 PCI configuration space with per-byte write masks, memory BARs that follow the
//! sizing protocol, and a capability list. Every access is bounds-checked: any width at any
//! offset from a guest is either served or ignored, never a panic.

pub const CONFIG_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;
const BAR0: usize = 0x10;
const CAP_START: usize = 0x40;
const STATUS_CAP_LIST: u16 = 1 << 4;
/// I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;

/// PCI identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code: class << 16 | subclass << 8 | prog_if.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 32-bit, non-prefetchable memory BAR at a fixed guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub addr: u32,
    pub size: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0}: size must be a power of two of at least 16 bytes and the address aligned to it")]
    BadBar(usize),
    #[error("capability does not fit in configuration space")]
    NoRoom,
    #[error("saved configuration space has {0} bytes")]
    Saved(usize),
}

pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.set_u16(0x00, ids.vendor);
        c.set_u16(0x02, ids.device);
        c.bytes[0x08] = ids.revision;
        c.bytes[0x09] = ids.class as u8;
        c.bytes[0x0a] = (ids.class >> 8) as u8;
        c.bytes[0x0b] = (ids.class >> 16) as u8;
        c.set_u16(0x2c, ids.subsystem_vendor);
        c.set_u16(0x2e, ids.subsystem);
        c.writable[0x04..0x06].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.writable[0x3c] = 0xff; // interrupt line: scratch for the OS
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        if index >= NUM_BARS || bar.size < 16 || !bar.size.is_power_of_two() || !bar.addr.is_multiple_of(bar.size) {
            return Err(ConfigError::BadBar(index));
        }
        self.bars[index] = Some(bar);
        let off = BAR0 + 4 * index;
        self.set_u32(off, bar.addr);
        self.writable[off..off + 4].copy_from_slice(&(!(bar.size - 1)).to_le_bytes());
        Ok(())
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Appends a capability (`body` starts after the ID and next-pointer bytes). `writable`
    /// masks the body's bytes the guest may change. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let off = self.next_cap;
        let len = 2 + body.len();
        if off + len > CONFIG_SIZE || writable.len() > body.len() {
            return Err(ConfigError::NoRoom);
        }
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        self.writable[off + 2..off + 2 + writable.len()].copy_from_slice(writable);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[0x34] = off as u8;
                let status = u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | STATUS_CAP_LIST;
                self.set_u16(0x06, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        crate::copy_out(&self.bytes, offset as u64, data, 0xff)
    }

    /// Writes only the bits the mask allows. BAR writes follow the sizing protocol: all ones
    /// reads back the size mask; any other value restores the BAR's fixed address (Shoji assigns
    /// BARs and does not move them).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < CONFIG_SIZE) else { return };
            let m = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
        for (index, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let off = BAR0 + 4 * index;
            if offset < off + 4 && offset + data.len() > off {
                let cur = u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap_or([0; 4]));
                let sizing = !(bar.size - 1);
                if cur != sizing {
                    self.bytes[off..off + 4].copy_from_slice(&bar.addr.to_le_bytes());
                }
            }
        }
    }

    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }

    /// The whole space as the guest sees it (for a snapshot).
    pub fn state(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Takes the guest-writable bits of a saved space; the rest (identity, capabilities) is
    /// what this device was built with.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigError> {
        if saved.len() != CONFIG_SIZE {
            return Err(ConfigError::Saved(saved.len()));
        }
        for (o, v) in saved.iter().enumerate() {
            let m = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
        Ok(())
    }

    /// Direct access for the owner of a capability (e.g. MSI-X control bits).
    pub fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        self.bytes.get(offset..offset.checked_add(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds { vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x01_8000, subsystem_vendor: 0x1af4, subsystem: 2 }
    }

    fn r32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_and_read_only_fields() {
        let mut c = PciConfig::new(ids());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        assert_eq!(r32(&c, 8), 0x0180_0001);
        c.write(0, &[0; 4]);
        c.write(8, &[0xff; 4]);
        assert_eq!(r32(&c, 0), 0x1042_1af4, "IDs are read-only");
        assert_eq!(r32(&c, 8), 0x0180_0001);
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
    }

    #[test]
    fn bar_sizing_protocol_and_fixed_address() {
        let mut c = PciConfig::new(ids());
        c.set_bar(0, Bar { addr: 0xc000_0000, size: 0x8000 }).unwrap();
        assert_eq!(r32(&c, 0x10), 0xc000_0000);
        c.write(0x10, &[0xff; 4]);
        assert_eq!(r32(&c, 0x10), 0xffff_8000, "size mask");
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(r32(&c, 0x10), 0xc000_0000);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(r32(&c, 0x10), 0xc000_0000, "moving a BAR is not supported");
        c.write(0x11, &[0xff]); // partial write
        assert_eq!(r32(&c, 0x10), 0xc000_0000);
        assert_eq!(r32(&c, 0x14), 0, "unused BAR reads 0 and stays 0");
        c.write(0x14, &[0xff; 4]);
        assert_eq!(r32(&c, 0x14), 0);
        assert!(c.set_bar(1, Bar { addr: 0xc000_0100, size: 0x8000 }).is_err());
        assert!(c.set_bar(6, Bar { addr: 0, size: 0x1000 }).is_err());
        assert!(c.set_bar(1, Bar { addr: 0, size: 3 }).is_err());
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfig::new(ids());
        let a = c.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0xc0]).unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        let mut s = [0; 2];
        c.read(6, &mut s);
        assert_ne!(u16::from_le_bytes(s) & STATUS_CAP_LIST, 0);
        let mut p = [0; 1];
        c.read(0x34, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x4c);
        c.read(0x4d, &mut p);
        assert_eq!(p[0], 0);
        c.write(0x42, &[0xff, 0xff]);
        let mut v = [0; 2];
        c.read(0x42, &mut v);
        assert_eq!(v, [1, 2 | 0xc0]);
        assert_eq!(c.add_capability(1, &[0; 250], &[]), Err(ConfigError::NoRoom));
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut c = PciConfig::new(ids());
        let mut b = [0u8; 8];
        c.read(252, &mut b);
        assert_eq!(&b[4..], &[0xff; 4]);
        c.read(usize::MAX, &mut b);
        assert_eq!(b, [0xff; 8]);
        c.write(254, &[1, 2, 3, 4]);
        c.write(usize::MAX - 1, &[1, 2, 3]);
    }
}
