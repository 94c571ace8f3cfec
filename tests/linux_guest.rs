//! The shared slow suite: our Linux kernel (kernel-config/) with our initramfs (rootfs/) on the
//! real /dev/kvm, driven through the `shoji` CLI exactly as a user runs it. One boot per test
//! binary: on PVM hosts the guest kernel is emulated and takes ~10-20 s to reach /init.
use shoji_tests::{require_kvm, shoji_bin};
use std::process::Command;

#[test]
fn default_kernel_and_initramfs_boot_to_init_and_reset() {
    require_kvm();
    // Build (or find) the cached artifacts first, so the boot's time limit covers only the boot.
    let kernel = shoji_vmm::artifacts::ensure_kernel().expect("guest kernel");
    let rootfs = shoji_vmm::artifacts::ensure_rootfs().expect("guest initramfs");
    eprintln!("kernel {}\nrootfs {}", kernel.display(), rootfs.display());

    let start = std::time::Instant::now();
    let out =
        Command::new(shoji_bin()).args(["boot", "--vcpus", "2", "--timeout", "600"]).output().expect("run shoji boot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("boot took {:?}\n--- console ---\n{stdout}--- stderr ---\n{stderr}", start.elapsed());
    assert!(out.status.success(), "shoji boot failed: {:?}", out.status);
    let marker = stdout.lines().find(|l| l.starts_with("SHOJI-INIT-OK boottime=")).expect("init marker on the console");
    let boottime: f64 = marker["SHOJI-INIT-OK boottime=".len()..].parse().expect("boottime");
    assert!(boottime > 0.0);
    assert!(stdout.contains("reboot: Restarting system"), "the guest's reboot ends the VM");
    assert!(!stdout.contains("Kernel panic"), "{stdout}");
    let pvm = shoji_vmm::host::is_pvm();
    assert_eq!(stderr.contains("/dev/kvm is PVM"), pvm, "the PVM note appears exactly on PVM hosts");
    assert_eq!(stderr.matches("/dev/kvm is PVM").count(), usize::from(pvm), "said once");
}
