//! Facts about the host that decide how a VM is set up.
use std::path::Path;

/// `/dev/kvm` is served by kvm_pvm (Pagetable-based VM): guest kernel code is emulated and a
/// stock Linux needs extra parameters there (docs/kernel.md).
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The host's physical memory in MiB, from /proc/meminfo.
pub fn memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
