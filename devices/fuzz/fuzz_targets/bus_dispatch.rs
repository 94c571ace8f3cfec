//! Port-I/O dispatch as the vCPU threads do it ([`PioBus`] with the devices the VMM registers:
//! COM1, the i8042, the PCI root on 0xcf8..0xcff with a virtio-pci device behind it), plus that
//! device's BAR at any offset, as the MMIO bus forwards it: arbitrary reads and writes of every
//! width at every port and offset, in any order. Nothing may panic.
#![no_main]
#[path = "common.rs"]
mod common;
use common::{disk, NoMsi};
use libfuzzer_sys::fuzz_target;
use shoji_devices::bus::PioBus;
use shoji_devices::legacy::{ConsoleWriter, Serial, COM1_BASE, COM1_LEN, I8042, I8042_BASE, I8042_LEN};
use shoji_devices::pci::{PciDevice, PciRoot};
use shoji_devices::virtio::block::Block;
use shoji_devices::virtio::VirtioPciDevice;
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PCI_CONFIG_PORT: u16 = 0xcf8;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let Ok(blk) = Block::open(disk(), false) else { return };
    let Ok(pci) = VirtioPciDevice::new("fuzz", Box::new(blk), mem, 0xc000_0000, Arc::new(NoMsi)) else { return };
    let pci = Arc::new(Mutex::new(pci));
    let mut root = PciRoot::new();
    if root.add(pci.clone()).is_err() {
        return;
    }
    let (Ok(irq), Ok(reset)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else { return };
    let serial = Serial::new(irq, ConsoleWriter::new(Box::new(std::io::sink())));
    let mut bus = PioBus::default();
    bus.insert(COM1_BASE, COM1_LEN, Arc::new(Mutex::new(serial))).expect("serial");
    bus.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new(reset)))).expect("i8042");
    bus.insert(PCI_CONFIG_PORT, 8, Arc::new(Mutex::new(root))).expect("pci root");

    // Each access: op (bit 0 write, bit 1 MMIO, bits 2..4 width 1/2/4/8/any), 2 (port) or 8
    // (BAR offset) address bytes, then the bytes to write.
    let mut d = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (d.get(..n)?, d.get(n..)?);
        d = b;
        Some(a)
    };
    while let Some(&[op]) = take(1) {
        let width = match (op >> 2) & 7 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 8,
            w => usize::from(w) * 3,
        };
        let mut buf = vec![0u8; width];
        if op & 2 == 0 {
            let Some(p) = take(2) else { break };
            // Bias towards the registered ranges: half the accesses go near one of them.
            let raw = u16::from_le_bytes([p[0], p[1]]);
            let port = match op >> 5 {
                0 => COM1_BASE + raw % 16,
                1 => I8042_BASE + raw % 8,
                2 => PCI_CONFIG_PORT + raw % 16,
                _ => raw,
            };
            if op & 1 == 1 {
                let Some(v) = take(width) else { break };
                bus.write(port, v);
            } else {
                bus.read(port, &mut buf);
            }
        } else {
            let Some(o) = take(8) else { break };
            let raw = u64::from_le_bytes(o.try_into().expect("8 bytes"));
            let offset = if op >> 5 == 0 { raw } else { raw % 0x4000 };
            let mut dev = pci.lock().unwrap_or_else(|p| p.into_inner());
            if op & 1 == 1 {
                let Some(v) = take(width) else { break };
                dev.bar_write(0, offset, v);
            } else {
                dev.bar_read(0, offset, &mut buf);
            }
        }
    }
});
