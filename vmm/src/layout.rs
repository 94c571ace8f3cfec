//! Guest physical memory layout (x86_64, no firmware). Everything the VMM writes before the first
//! instruction lives below 1 MiB; the kernel loads at 1 MiB or above.
//!
//! ```text
//! 0x0000_0500  boot GDT               0x0000_9000  PML4 / PDPT / PD (identity map, 1 GiB)
//! 0x0000_6000  PVH start_info         0x0002_0000  kernel command line (2 KiB)
//! 0x0000_7000  Linux boot_params      0x0009_fc00  EBDA: MP floating pointer + table
//! 0x0000_8ff0  boot stack top         0x0010_0000  kernel (HIMEM_START) ... initrd at top of RAM
//! 0xc000_0000 .. 0x1_0000_0000: MMIO gap (IOAPIC, LAPIC, future PCI BARs); RAM resumes at 4 GiB
//! ```
use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const IDT_START: GuestAddress = GuestAddress(0x520);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6080);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Linux's COMMAND_LINE_SIZE on x86, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: GuestAddress = GuestAddress(EBDA_START);
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel; Firecracker's address is conventional.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Linux's default initrd_addr_max: keep the initrd below 2 GiB.
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// The smallest guest that can hold the boot structures, a test guest and its stack.
pub const MIN_MEMORY_MIB: u64 = 2;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One range of guest RAM as the guest's E820 map shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest RAM regions to mmap for `mem_bytes` of memory: one below the MMIO gap, and the
/// rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START)]
    }
}

/// The E820 map: low RAM up to the EBDA, then RAM from 1 MiB, split around the MMIO gap. The
/// EBDA and the legacy hole (VGA, option ROMs, BIOS) are left out, so the guest never uses them.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM }];
    let himem = HIMEM_START.0;
    let low_end = mem_bytes.min(MMIO_GAP_START);
    if low_end > himem {
        map.push(E820Entry { addr: himem, size: low_end - himem, kind: E820_RAM });
    }
    // Address space between the end of low RAM and the MMIO gap is reserved, so the guest's
    // PCI allocator starts where ours does (MMIO_GAP_START). Linux assigns a hot-plugged
    // device's BARs itself on a rescan (it claims only firmware-assigned ones at boot), lowest
    // free address first, as the VMM's allocator does: with the same start, the same BAR
    // size and the same holes, both pick the same address, which the VMM has mapped.
    if low_end < MMIO_GAP_START {
        let from = low_end.max(himem);
        map.push(E820Entry { addr: from, size: MMIO_GAP_START - from, kind: E820_RESERVED });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry { addr: MMIO_GAP_END, size: mem_bytes - MMIO_GAP_START, kind: E820_RAM });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_has_one_region_and_two_e820_ranges() {
        assert_eq!(ram_regions(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(
            e820_map(128 * MIB),
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820_RAM },
                E820Entry { addr: 0x10_0000, size: 127 * MIB, kind: E820_RAM },
                E820Entry { addr: 128 * MIB, size: MMIO_GAP_START - 128 * MIB, kind: E820_RESERVED },
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = ram_regions(4 * GIB);
        assert_eq!(regions, vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]);
        let map = e820_map(4 * GIB);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], E820Entry { addr: MIB, size: 3 * GIB - MIB, kind: E820_RAM });
        assert_eq!(map[2], E820Entry { addr: 4 * GIB, size: GIB, kind: E820_RAM });
        // RAM reported equals RAM given, minus the EBDA and legacy hole below 1 MiB.
        let total: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(total, 4 * GIB - (MIB - 0x9fc00));
        // Nothing overlaps and nothing is in the MMIO gap.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn exactly_at_the_gap_has_no_high_region() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
        assert_eq!(e820_map(MMIO_GAP_START).len(), 2);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (GDT_START.0, 4 * 8),
            (IDT_START.0, 8),
            (PVH_INFO_START.0, 0x40),
            (PVH_MODLIST_START.0, 0x40),
            (PVH_MEMMAP_START.0, 0xf80),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x3000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        const {
            assert!(BOOT_STACK_POINTER < PML4_START.0 && BOOT_STACK_POINTER > ZERO_PAGE_START.0 + 0x1000);
            assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        }
    }
}
