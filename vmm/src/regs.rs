//! Initial vCPU state for each boot protocol: segments, control registers, page tables, MSRs,
//! FPU and LAPIC. The PVH entry wants 32-bit protected mode with paging off; the Linux 64-bit
//! entry wants long mode with an identity map.
use crate::layout::*;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::Address;
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot GDT/page tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM vCPU register ioctl {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

/// How the kernel wants to be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, %ebx = hvm_start_info.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, %rsi = boot_params.
    Linux64 { entry: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT entry from flags/base/limit, in the layout the CPU reads.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden part of a segment register, as the CPU would load it from `entry`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Boot GDT: null, code (32-bit for PVH, 64-bit for Linux64), data, TSS.
fn boot_gdt(entry: BootEntry) -> [u64; 4] {
    let code = match entry {
        BootEntry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
        BootEntry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [0, code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

fn write_gdt_idt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GDT_START.unchecked_add(i as u64 * 8))?;
    }
    mem.write_obj(0u64, IDT_START)?;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages for the Linux 64-bit entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START.0 | 0x03, PML4_START)?;
    mem.write_obj(PDE_START.0 | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, PDE_START.unchecked_add(i * 8))?;
    }
    Ok(())
}

/// Special registers for the BSP; also writes the GDT (and page tables for long mode).
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    let gdt = boot_gdt(entry);
    write_gdt_idt(mem, &gdt)?;
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))
}

/// General registers for the BSP.
pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let regs = match entry {
        BootEntry::Pvh { entry } => kvm_regs { rflags: 0x2, rip: entry, rbx: PVH_INFO_START.0, ..Default::default() },
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START.0,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// The MSRs each vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0, entries.len()))?;
    let set = vcpu.set_msrs(&msrs).map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs(set, entries.len()));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (legacy PIC), LINT1 = NMI, as the MP table says.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[off + i] as u8;
        }
        let v = set_delivery_mode(u32::from_le_bytes(raw), mode).to_le_bytes();
        for (i, b) in v.iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

/// The guest memory must at least cover what this module writes.
pub fn boot_area_fits(mem: &GuestMemoryMmap) -> bool {
    mem.address_in_range(PDE_START.unchecked_add(0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.base, code64.limit, code64.selector), (0, 0xffff_ffff, 8));
        assert_eq!((code64.l, code64.db, code64.type_, code64.present, code64.s), (1, 0, 0xb, 1, 1));
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.db, data.selector, data.unusable), (3, 1, 16, 0));
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tss.s, tss.type_, tss.present), (0, 0xb, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        // Base and limit bits land where the CPU expects them.
        let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 2);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(set_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }

    #[test]
    fn msrs_include_fast_strings_and_mtrr() {
        let m = boot_msrs();
        assert!(m.iter().any(|e| e.index == MSR_IA32_MISC_ENABLE && e.data == 1));
        assert!(m.iter().any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == 0x806));
    }
}
