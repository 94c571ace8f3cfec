//! The interface between the VMM's I/O dispatch and a device, and the port-I/O dispatch itself
//! ([`PioBus`]): accesses nobody claims read as all ones and are counted, so a guest probing
//! absent hardware costs one exit and nothing else. It lives here (the VMM re-exports it) so the
//! `bus_dispatch` fuzz target drives the real dispatch.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device reached through x86 port I/O. `offset` is relative to the device's base port.
///
/// Implementations must accept any access width and offset a guest may produce: reads of
/// unknown registers return all ones, writes are ignored. They must never panic.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
    unclaimed: AtomicU64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port range {base:#x}+{len} overlaps another device or is empty")]
pub struct BusOverlap {
    pub base: u16,
    pub len: u16,
}

/// Logged individually only for the first few, then counted.
const LOG_FIRST_UNCLAIMED: u64 = 16;

impl PioBus {
    pub fn insert(&mut self, base: u16, len: u16, dev: Arc<Mutex<dyn PioDevice>>) -> Result<(), BusOverlap> {
        let end = u32::from(base) + u32::from(len);
        if len == 0
            || end > 0x1_0000
            || self
                .ranges
                .iter()
                .any(|r| u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end)
        {
            return Err(BusOverlap { base, len });
        }
        self.ranges.push(Range { base, len, dev });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        let i = self.ranges.partition_point(|r| r.base <= port);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        let off = port - r.base;
        (off < r.len).then_some((r, off))
    }

    fn miss(&self, port: u16, write: bool) {
        let n = self.unclaimed.fetch_add(1, Ordering::Relaxed);
        if n < LOG_FIRST_UNCLAIMED {
            tracing::debug!(port = format_args!("{port:#x}"), write, "port I/O to no device");
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((r, off)) => r.dev.lock().unwrap_or_else(|p| p.into_inner()).read(off, data),
            None => {
                data.fill(0xff);
                self.miss(port, false);
            }
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some((r, off)) => r.dev.lock().unwrap_or_else(|p| p.into_inner()).write(off, data),
            None => self.miss(port, true),
        }
    }

    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, Vec<u8>)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_and_unclaimed_ports() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Echo(vec![])))).unwrap();
        assert_eq!(bus.insert(0x3fc, 8, dev.clone()), Err(BusOverlap { base: 0x3fc, len: 8 }));
        assert!(bus.insert(0x3f0, 9, dev.clone()).is_err());
        assert!(bus.insert(0xfffe, 4, dev.clone()).is_err());
        assert!(bus.insert(0x100, 0, dev.clone()).is_err());
        let mut b = [0u8; 2];
        bus.read(0x3fa, &mut b);
        assert_eq!(b, [2, 2]);
        bus.write(0x3ff, &[9]);
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![9])]);
        bus.read(0x400, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        bus.write(0x3f7, &[1]);
        bus.read(0, &mut b);
        bus.read(0xffff, &mut b);
        assert_eq!(bus.unclaimed(), 4);
    }
}
