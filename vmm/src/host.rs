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

/// The KVM API version `/dev/kvm` reports (12 on every kernel since 2.6.22), or why it cannot.
pub fn kvm_api_version() -> Result<i32, String> {
    kvm_ioctls::Kvm::new().map(|k| k.get_api_version()).map_err(|e| e.to_string())
}
