//! Guest kernel command lines: Shoji's defaults and the extra parameters a PVM host needs.

/// Quiet serial console (each byte is a VM exit), reboot through the i8042 line (which ends
/// the VM), no ACPI tables to look for, no legacy port-0x80 delays, one UART to probe.
/// Devices are on PCI (configuration mechanism 1, MSI-X), which needs no ACPI.
pub const DEFAULT: &str = "console=ttyS0 reboot=k panic=1 quiet acpi=off 8250.nr_uarts=1 io_delay=none";

/// On a PVM host a stock kernel's supervisor code goes through KVM's emulator, which cannot run
/// cmpxchg16b, popcnt, clac or xrstor; the rest cut seconds of emulated boot work. Guest user
/// code must not use AVX there (its upper state is not switched), hence the glibc tunable.
/// Measured in docs/kernel.md.
pub const PVM: &str = "clearcpuid=cx16,popcnt,smap,rdrand,rdseed,erms,fsrm,114 nofsgsbase noxsave \
rodata=off percpu_alloc=page noreplace-smp initcall_blacklist=slab_sysfs_init,param_sysfs_init,inet6_init \
GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load,-FMA,-BMI2";

/// The command line for a Linux guest. PVM parameters go first so that the user's own
/// parameters override them and any init arguments after `--` stay last.
pub fn linux(user: Option<&str>, pvm: bool) -> String {
    let base = user.unwrap_or(DEFAULT).trim();
    if pvm {
        format!("{PVM} {base}").trim().to_string()
    } else {
        base.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_params_come_first_and_init_args_stay_last() {
        assert_eq!(linux(None, false), DEFAULT);
        let c = linux(Some("console=ttyS0 -- poweroff"), true);
        assert!(c.starts_with("clearcpuid=cx16,popcnt,smap"));
        assert!(c.ends_with("console=ttyS0 -- poweroff"));
        assert!(c.contains(" noxsave "));
        assert!(crate::boot::build_cmdline(&linux(None, true)).is_ok(), "defaults fit the limit");
    }
}
