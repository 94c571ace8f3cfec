//! CPUID for each vCPU: what KVM supports, with the topology and hypervisor bits a guest needs
//! to enumerate its CPUs correctly, and the features a sandbox VM must not advertise.
use kvm_bindings::kvm_cpuid_entry2;

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EAX_TURBO: u32 = 1 << 1;
const ECX_EPB: u32 = 1 << 3;

/// Topology levels in leaf 0xB: one thread per core, all vCPUs as cores of one package.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites KVM's supported CPUID for vCPU `cpu` of `count`.
pub fn filter(supported: &[kvm_cpuid_entry2], cpu: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(cpu);
    let count = u32::from(count);
    let mut out: Vec<kvm_cpuid_entry2> =
        supported.iter().filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2).copied().collect();
    for e in out.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cores = count.saturating_sub(1) & 0x3f;
                let sharing = if (e.eax & 0xe0) >> 5 >= 3 { count.saturating_sub(1) } else { 0 };
                e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_POWER => {
                e.eax &= !EAX_TURBO;
                e.ecx &= !ECX_EPB;
            }
            LEAF_PMU => {
                // No virtual PMU: the guest must not program counters we do not context-switch.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    let topo = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function: LEAF_TOPOLOGY,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    out.push(topo(0, 0, 1, LEVEL_SMT));
    out.push(topo(1, bits_for(count), count, LEVEL_CORE));
    out.push(topo(2, 0, 0, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).expect("leaf present")
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x806f8, 0xff_ff_08_ff, 0x7ed8_3203, 0x0f8b_fbff),
            entry(4, 0, 0x7c00_4121, 0, 0, 0),
            entry(4, 3, 0x7c00_4163, 0, 0, 0),
            entry(6, 0, 0x77, 0, 0x9, 0),
            entry(0xa, 0, 0x0804_3005, 0, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0xb, 1, 7, 64, 0x201, 9),
            entry(0x1f, 0, 1, 2, 0x100, 9),
            entry(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
        ]
    }

    #[test]
    fn features_leaf_carries_apic_id_count_and_hypervisor_bit() {
        let out = filter(&host(), 3, 4);
        let f = find(&out, 1, 0);
        assert_eq!(f.ebx >> 24, 3, "APIC id");
        assert_eq!((f.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!((f.ebx >> 8) & 0xff, 8, "clflush size");
        assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(f.edx & EDX_HTT, 0);
        let single = find(&filter(&host(), 0, 1), 1, 0);
        assert_eq!(single.ebx >> 16, 1);
        assert_eq!(single.edx & EDX_HTT, 0);
        // Unrelated leaves pass through untouched.
        assert_eq!(find(&out, 0x8000_0001, 0), host()[9]);
    }

    #[test]
    fn topology_is_rewritten_per_vcpu() {
        let out = filter(&host(), 2, 6);
        assert!(out.iter().all(|e| e.function != 0x1f), "host 0x1f topology dropped");
        assert_eq!(out.iter().filter(|e| e.function == 0xb).count(), 3);
        let smt = find(&out, 0xb, 0);
        let core = find(&out, 0xb, 1);
        let end = find(&out, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 2));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
        assert!(out.iter().filter(|e| e.function == 0xb).all(|e| e.flags & 1 == 1));
        let c4 = find(&out, 4, 0);
        assert_eq!(c4.eax >> 26, 5, "cores per package - 1");
        assert_eq!(c4.eax & 0x3fff, 0x0121 & 0x3fff, "cache type/level kept");
    }

    #[test]
    fn pmu_and_power_features_are_hidden() {
        let out = filter(&host(), 0, 1);
        let pmu = find(&out, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let p = find(&out, 6, 0);
        assert_eq!(p.eax & EAX_TURBO, 0);
        assert_eq!(p.ecx & ECX_EPB, 0);
    }

    #[test]
    fn shift_widths() {
        assert_eq!((bits_for(1), bits_for(2), bits_for(3), bits_for(4), bits_for(5)), (0, 1, 2, 2, 3));
        assert_eq!(bits_for(254), 8);
    }
}
