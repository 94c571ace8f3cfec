//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how legacy IRQs are wired. Written from the spec; pure, so it is unit-tested.
use crate::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START};

/// APIC ID 255 is the broadcast ID and the IOAPIC takes the next ID after the CPUs.
pub const MAX_CPUS: u8 = 254;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("vcpus: {0} is not between 1 and {MAX_CPUS}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, to be written at
/// [`MPTABLE_START`] (the EBDA, where the spec tells the guest to search). Without `ioapic`
/// (a split irqchip: no IOAPIC, no PIC) the table lists the CPUs and the bus only.
pub fn build(num_cpus: u8, ioapic: bool) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;
    let table_addr = MPTABLE_START.0 as u32 + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0); // processor
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(if cpu == 0 { 0x3 } else { 0x1 }); // enabled, bootstrap processor
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    if ioapic {
        entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IOAPIC, enabled
        entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
        count += 1;
        for irq in 0..IOAPIC_PINS {
            // INT, conforming polarity/trigger, ISA bus irq -> same IOAPIC pin
            entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
            count += 1;
        }
    }
    // LINT0 is ExtINT (the legacy PIC), LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let len = u16::try_from(44 + entries.len()).expect("MP table fits in 64 KiB for 254 CPUs");
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SHOJI   ");
    table.extend_from_slice(b"SHOJI-VMM   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, features
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_zero_and_counts_match() {
        for cpus in [1u8, 2, 4, 64, MAX_CPUS] {
            let t = build(cpus, true).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            let cfg = &t[addr - MPTABLE_START.0 as usize..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(&cfg[..len]), 0, "table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            // Walk entries the way a guest does.
            let (mut off, mut procs, mut bsp) = (44, 0, 0);
            for _ in 0..count {
                match cfg[off] {
                    0 => {
                        procs += 1;
                        if cfg[off + 3] & 2 != 0 {
                            bsp += 1;
                        }
                        off += 20
                    }
                    1..=4 => off += 8,
                    t => panic!("bad entry type {t}"),
                }
            }
            assert_eq!(off, len);
            assert_eq!((procs, bsp), (cpus as usize, 1));
        }
    }

    #[test]
    fn cpu_count_limits() {
        assert_eq!(build(0, true), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(255, true), Err(MpTableError::CpuCount(255)));
    }

    #[test]
    fn checksum_detects_corruption() {
        let mut t = build(2, true).unwrap();
        t[20] ^= 1;
        assert_ne!(sum(&t[16..]), 0);
    }
}
