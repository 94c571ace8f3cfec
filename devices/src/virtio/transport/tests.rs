//! The transport as a guest driver sees it, and as a hostile guest abuses it.
use super::*;
use crate::pci::msix::tests::Recorder;
use crate::virtio::block::Block;
use vm_memory::GuestAddress;

struct Rig {
    dev: VirtioPciDevice,
    irq: Arc<Recorder>,
    disk: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

fn rig(name: &str) -> Rig {
    let disk = std::env::temp_dir().join(format!("shoji-transport-{}-{name}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 64 * 1024]).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Recorder::default());
    let blk = Block::open(&disk, false).unwrap();
    let dev = VirtioPciDevice::new("test-blk", Box::new(blk), mem, 0xc000_0000, irq.clone()).unwrap();
    Rig { dev, irq, disk }
}

impl Rig {
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn cfg(&mut self, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.config_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    /// A queue at 0x1000 (desc), 0x2000 (avail), 0x3000 (used) of `size` entries.
    fn setup_queue(&mut self, size: u16) {
        self.w(0x16, 2, 0);
        self.w(0x18, 2, u64::from(size));
        self.w(0x20, 8, 0x1000);
        self.w(0x28, 4, 0x2000);
        self.w(0x2c, 4, 0);
        self.w(0x30, 8, 0x3000);
        self.w(0x1a, 2, 0);
        self.w(0x1c, 2, 1);
    }
    fn negotiate(&mut self) {
        self.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        self.w(0x00, 4, 1);
        let hi = self.r(0x04, 4);
        self.w(0x08, 4, 1);
        self.w(0x0c, 4, hi & 1); // VERSION_1
        self.w(0x08, 4, 0);
        self.w(0x0c, 4, 0);
        self.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
    }
}

#[test]
fn pci_identity_and_capabilities() {
    let mut r = rig("ids");
    assert_eq!(r.cfg(0, 4), 0x1042_1af4);
    assert_eq!(r.cfg(0x10, 4), 0xc000_0000);
    // Walk the capability list: MSI-X, then the four virtio structures.
    let mut p = r.cfg(0x34, 1) as usize;
    let mut found = Vec::new();
    while p != 0 {
        let id = r.cfg(p, 1) as u8;
        let kind = if id == 0x09 { r.cfg(p + 3, 1) as u8 } else { 0 };
        found.push((id, kind));
        p = r.cfg(p + 1, 1) as usize;
    }
    assert_eq!(found, vec![(0x11, 0), (0x09, 1), (0x09, 2), (0x09, 3), (0x09, 4)]);
    assert_eq!(r.dev.bars(), vec![(0, Bar { addr: 0xc000_0000, size: BAR_SIZE })]);
    assert_eq!(r.dev.notify_eventfds()[0].0, 0xc000_3000);
}

#[test]
fn feature_negotiation_and_activation() {
    let mut r = rig("features");
    assert_eq!(r.r(0x12, 2), 1, "num_queues");
    r.w(0x00, 4, 1);
    assert_eq!(r.r(0x04, 4) & 1, 1, "VERSION_1 offered");
    r.w(0x00, 4, 7);
    assert_eq!(r.r(0x04, 4), 0, "feature words past 1 read as 0");
    // Without VERSION_1 FEATURES_OK does not stick.
    r.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
    assert_eq!(r.r(0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
    r.w(0x14, 1, 0);
    r.negotiate();
    assert_ne!(r.r(0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
    // Features cannot change after FEATURES_OK.
    r.w(0x08, 4, 0);
    r.w(0x0c, 4, 0xffff_ffff);
    assert_eq!(r.r(0x0c, 4), 0);
    r.setup_queue(16);
    assert_eq!(r.r(0x20, 8), 0x1000);
    assert_eq!(r.r(0x1c, 2), 1);
    // Enable MSI-X and route vector 0.
    let ctrl = r.dev.msix_cap + 2;
    r.dev.config_write(ctrl, &0x8000u16.to_le_bytes());
    r.w(MSIX_TABLE, 4, 0xfee0_0000);
    r.w(MSIX_TABLE + 8, 4, 0x40);
    r.w(MSIX_TABLE + 12, 4, 0);
    assert!(r.irq.routes.lock().unwrap().iter().any(|(v, m)| *v == 0 && m.is_some()));
    r.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
    assert!(r.dev.activated);
    assert!(!r.dev.is_broken());
    // Queue registers are frozen once the driver is running.
    r.w(0x20, 8, 0x5000);
    assert_eq!(r.r(0x20, 8), 0x1000);
    // An empty notification is harmless; reset returns everything to the initial state.
    r.w(NOTIFY, 2, 0);
    r.w(0x14, 1, 0);
    assert_eq!((r.r(0x14, 1), r.r(0x1c, 2), r.dev.activated), (0, 0, false));
}

#[test]
fn invalid_queue_marks_the_device_broken_not_the_vmm() {
    let mut r = rig("badq");
    r.negotiate();
    r.setup_queue(15); // not a power of two
    r.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK));
    assert!(r.dev.is_broken());
    assert_ne!(r.r(0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
    assert!(r.dev.errors() >= 1);
    r.w(0x14, 1, 0);
    assert!(!r.dev.is_broken(), "a reset recovers");
    // DRIVER_OK without FEATURES_OK.
    r.w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK));
    assert!(r.dev.is_broken());
}

#[test]
fn vectors_out_of_range_read_back_as_no_vector() {
    let mut r = rig("vec");
    r.w(0x10, 2, 99);
    assert_eq!(r.r(0x10, 2), u64::from(NO_VECTOR));
    r.w(0x1a, 2, 2);
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR));
    r.w(0x1a, 2, 1);
    assert_eq!(r.r(0x1a, 2), 1);
    r.w(0x16, 2, 5); // no such queue
    assert_eq!(r.r(0x18, 2), 0, "absent queue has size 0");
    r.w(0x18, 2, 8);
    r.w(0x1c, 2, 1);
}

#[test]
fn isr_is_read_to_clear() {
    let mut r = rig("isr");
    r.dev.isr = 3;
    assert_eq!(r.r(ISR, 1), 3);
    assert_eq!(r.r(ISR, 1), 0);
}

/// Any width at any offset of the BAR and of config space, in any order: no panic, and the
/// device still answers sensibly afterwards.
#[test]
fn random_accesses_everywhere() {
    let mut r = rig("fuzz");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200_000 {
        let v = next();
        let width = [1usize, 2, 3, 4, 8][(v % 5) as usize];
        let data = next().to_le_bytes();
        match (v >> 8) % 4 {
            0 => r.dev.bar_write(0, (v >> 16) % u64::from(BAR_SIZE + 16), &data[..width]),
            1 => {
                let mut b = [0u8; 8];
                r.dev.bar_read((v >> 12) as u8 % 2, (v >> 16) % u64::from(BAR_SIZE + 16), &mut b[..width]);
            }
            2 => r.dev.config_write(((v >> 16) % 270) as usize, &data[..width]),
            _ => {
                let mut b = [0u8; 8];
                r.dev.config_read(((v >> 16) % 270) as usize, &mut b[..width]);
            }
        }
    }
    r.dev.bar_write(0, u64::MAX - 2, &[1, 2, 3, 4]);
    r.dev.bar_write(0, 0, &[]);
    r.w(0x14, 1, 0);
    assert_eq!(r.cfg(0, 4), 0x1042_1af4, "identity survives");
    assert_eq!(r.r(0x12, 2), 1);
}
