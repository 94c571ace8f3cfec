//! `shoji check` on this host: one line per finding, the KVM kind named, fixes for what is
//! missing, exit status 1 only when KVM itself is unusable.
use std::process::Command;

fn check(cache: &std::path::Path) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_shoji")).arg("check").env("SHOJI_CACHE", cache).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn check_reports_kvm_kind_and_fixes() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "this test needs /dev/kvm, which is missing here");
    let empty = std::env::temp_dir().join(format!("shoji-check-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out) = check(&empty);
    assert_eq!(code, 0, "{out}");
    let kvm = out.lines().find(|l| l.split_whitespace().nth(1) == Some("kvm")).expect("a kvm line");
    assert!(kvm.starts_with("ok "), "{kvm}");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(kvm.contains("PVM"), pvm, "{kvm}");
    assert_eq!(kvm.contains("hardware"), !pvm, "{kvm}");
    // An empty cache: the kernel is reported missing with the fix, which is not fatal.
    let kernel = out.lines().find(|l| l.split_whitespace().nth(1) == Some("kernel")).expect("a kernel line");
    assert!(kernel.starts_with("FIX") && kernel.contains("fix:"), "{kernel}");
    for what in ["busybox", "cgroups", "containerd", "qemu", "vsock"] {
        let l =
            out.lines().find(|l| l.split_whitespace().nth(1) == Some(what)).unwrap_or_else(|| panic!("{what}: {out}"));
        assert!(l.starts_with("ok ") || l.contains("fix:"), "every missing item names its fix: {l}");
    }
    std::fs::remove_dir_all(&empty).unwrap();
}
