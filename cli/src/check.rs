//! `shoji check`: what this host offers and lacks for Shoji, one line each, with the fix.
use crate::run::rootfs::is_static_elf;
use shoji_sandbox::artifacts;
use shoji_vmm::host;
use std::path::Path;

/// One finding: `ok` lines are informational; a failed essential makes the command exit 1.
struct Line {
    ok: bool,
    essential: bool,
    what: &'static str,
    detail: String,
}

fn line(ok: bool, essential: bool, what: &'static str, detail: impl Into<String>) -> Line {
    Line { ok, essential, what, detail: detail.into() }
}

/// A lookup's error as a finding: what is missing, then the fix.
fn fix(e: &artifacts::ArtifactError, how: &str) -> String {
    let msg = e.to_string();
    let what = msg.strip_suffix(": run `shoji setup`").unwrap_or(&msg);
    format!("{what}; fix: `shoji setup` {how}")
}

fn on_path(cmd: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| p.is_file())
}

fn findings() -> Vec<Line> {
    let mut v = Vec::new();
    let kvm = Path::new("/dev/kvm");
    let kind = if host::is_pvm() {
        "PVM (kvm_pvm): guest kernel code is emulated, Linux boots in ~10-20 s"
    } else {
        "hardware virtualization"
    };
    match std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        Ok(_) => match host::kvm_api_version() {
            Ok(api) => v.push(line(true, true, "kvm", format!("/dev/kvm usable, API {api}, {kind}"))),
            Err(e) => v.push(line(false, true, "kvm", format!("/dev/kvm: {e}"))),
        },
        Err(e) if kvm.exists() => v.push(line(
            false,
            true,
            "kvm",
            format!("/dev/kvm: {e}; fix: run as root or add yourself to the kvm group (sudo usermod -aG kvm $USER)"),
        )),
        Err(_) => v.push(line(
            false,
            true,
            "kvm",
            "/dev/kvm is missing; fix: enable VT-x/AMD-V (or nested virtualization) and load kvm_intel or kvm_amd",
        )),
    }
    // What the shim and `shoji run` boot; `shoji setup` (or a first `shoji run`) builds them.
    match artifacts::kernel() {
        Ok(p) => v.push(line(true, false, "kernel", format!("guest kernel cached: {}", p.display()))),
        Err(e) => {
            v.push(line(false, false, "kernel", fix(&e, "builds and caches it (~10-15 min, needs linux-source-6.1)")))
        }
    }
    match artifacts::initramfs() {
        Ok(p) => v.push(line(true, false, "initramfs", format!("guest initramfs cached: {}", p.display()))),
        Err(e) => v.push(line(false, false, "initramfs", fix(&e, "builds it (seconds, plus the agent's first build)"))),
    }
    let busybox = std::fs::read("/bin/busybox").map(|d| is_static_elf(&d)).unwrap_or(false);
    v.push(line(
        busybox,
        false,
        "busybox",
        if busybox {
            "static /bin/busybox for the built-in rootfs".to_string()
        } else {
            "no static /bin/busybox (built-in rootfs for `shoji run`); fix: apt-get install busybox-static".to_string()
        },
    ));
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    v.push(line(
        true,
        false,
        "cgroups",
        if v2 {
            "host cgroup v2 (unified)"
        } else {
            "host cgroups v1/hybrid (fine: containers run in the guest, on cgroup v2)"
        },
    ));
    match on_path("containerd") {
        Some(p) => v.push(line(true, false, "containerd", format!("{} (for the shim)", p.display()))),
        None => v.push(line(
            false,
            false,
            "containerd",
            "not installed (only for the shim); fix: apt-get install containerd",
        )),
    }
    match on_path("qemu-system-x86_64") {
        Some(p) => v.push(line(true, false, "qemu", format!("{} (peer for `shoji bench --peer qemu`)", p.display()))),
        None => v.push(line(
            false,
            false,
            "qemu",
            "not installed (only for bench peers); fix: apt-get install qemu-system-x86",
        )),
    }
    v.push(line(true, false, "vsock", "user-space hybrid vsock (no /dev/vhost-vsock needed)".to_string()));
    v
}

/// Prints the findings; exit status 1 when an essential one fails.
pub fn main() -> std::process::ExitCode {
    let all = findings();
    for l in &all {
        println!("{:<4} {:<11} {}", if l.ok { "ok" } else { "FIX" }, l.what, l.detail);
    }
    if all.iter().any(|l| l.essential && !l.ok) {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
