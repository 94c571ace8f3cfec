//! The virtio-pci transport under arbitrary guest accesses: PCI config space and BAR 0 reads and
//! writes of any width at any offset, in any order (feature negotiation, queue set-up, MSI-X
//! table abuse, status changes, resets).
#![no_main]
#[path = "common.rs"]
mod common;
use common::{disk, NoMsi};
use libfuzzer_sys::fuzz_target;
use shoji_devices::pci::PciDevice;
use shoji_devices::virtio::block::Block;
use shoji_devices::virtio::VirtioPciDevice;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let Ok(blk) = Block::open(disk(), false) else { return };
    let Ok(mut dev) = VirtioPciDevice::new("fuzz", Box::new(blk), mem, 0xc000_0000, Arc::new(NoMsi)) else { return };
    // Each op: kind (1 byte), offset (2 bytes), width (1 byte), value (8 bytes).
    for op in data.chunks_exact(12) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = usize::from(op[3] % 9);
        let mut val = [0u8; 8];
        val.copy_from_slice(&op[4..12]);
        match op[0] % 4 {
            0 => dev.config_write(offset as usize % 300, &val[..width]),
            1 => dev.config_read(offset as usize % 300, &mut val[..width]),
            2 => dev.bar_write(op[0] >> 7, offset, &val[..width]),
            _ => dev.bar_read(op[0] >> 7, offset, &mut val[..width]),
        }
    }
});
