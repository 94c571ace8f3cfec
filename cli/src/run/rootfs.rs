//! The built-in container rootfs of `shoji run` (no `--rootfs`): a static busybox with its
//! applet links, `/etc/passwd`, `/etc/group` and the empty directories a container mounts on.
//! Built once from the host's `/bin/busybox` (Debian's `busybox-static`) and cached under the
//! shoji cache directory by the hash of the busybox binary and this recipe; the sandbox shares it
//! read-only, so one copy serves every run.
use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

pub const BUSYBOX: &str = "/bin/busybox";

/// Bumped whenever what `build` writes changes (part of the cache key).
const RECIPE: &str = "shoji-run-rootfs-v1";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";
/// (directory, mode): mount points (read-only rootfs: they must exist), home, scratch.
const DIRS: &[(&str, u32)] =
    &[("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("root", 0o700), ("mnt", 0o755)];

/// Whether `data` is a static ELF executable: an ELF file with no PT_INTERP program header.
pub fn is_static_elf(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return false; // not a 64-bit little-endian ELF
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| data.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else { return false };
    if phnum == 0 || phentsize < 56 {
        return false;
    }
    (0..usize::from(phnum)).all(|i| {
        let at = phoff.saturating_add(i.saturating_mul(usize::from(phentsize)));
        matches!(u32_at(at), Some(t) if t != PT_INTERP)
    })
}

fn busybox_ok() -> Option<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(BUSYBOX).ok()?.read_to_end(&mut data).ok()?;
    is_static_elf(&data).then_some(data)
}

/// A static `/bin/busybox`: the one there, or (as root, with apt) `busybox-static` installed now.
fn static_busybox() -> Result<Vec<u8>> {
    if let Some(data) = busybox_ok() {
        return Ok(data);
    }
    let fix = "install Debian's busybox-static (`apt-get install busybox-static`) or pass --rootfs DIR";
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        return Err(anyhow!("rootfs: the built-in rootfs needs a static {BUSYBOX}, and there is none: {fix}"));
    }
    eprintln!("shoji: installing busybox-static with apt-get (the built-in rootfs needs a static {BUSYBOX})");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "busybox-static"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).stdout(Stdio::null()).status();
        install();
    }
    busybox_ok().ok_or_else(|| anyhow!("rootfs: apt-get did not leave a static {BUSYBOX}: {fix}"))
}

fn cache_key(busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE.as_bytes());
    h.update(busybox);
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The built-in rootfs directory, built first when it is not cached.
pub fn ensure() -> Result<PathBuf> {
    let cache = shoji_sandbox::artifacts::cache_dir()
        .ok_or_else(|| anyhow!("rootfs: no cache directory: set SHOJI_CACHE or HOME"))?;
    let busybox = static_busybox()?;
    let base = cache.join("run-rootfs");
    let dir = base.join(cache_key(&busybox));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base).with_context(|| format!("rootfs: creating {}", base.display()))?;
    // Built beside its final place and renamed into it: a half-built rootfs is never used.
    let tmp = base.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = build(&tmp, &busybox).with_context(|| format!("rootfs: building {}", tmp.display()));
    let result = built.and_then(|()| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another `shoji run` finished the same rootfs first.
        Err(_) if dir.is_dir() => Ok(()),
        Err(e) => Err(anyhow!("rootfs: moving it to {}: {e}", dir.display())),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dir)
}

fn build(root: &Path, busybox: &[u8]) -> Result<()> {
    let mkdir = |p: &Path, mode: u32| -> Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(mode).create(p).with_context(|| p.display().to_string())?;
        // The umask may have narrowed the mode.
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).with_context(|| p.display().to_string())
    };
    mkdir(root, 0o755)?;
    for (d, mode) in DIRS {
        mkdir(&root.join(d), *mode)?;
    }
    mkdir(&root.join("bin"), 0o755)?;
    mkdir(&root.join("etc"), 0o755)?;
    let bb = root.join("bin/busybox");
    std::fs::write(&bb, busybox).with_context(|| bb.display().to_string())?;
    std::fs::set_permissions(&bb, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join("etc/passwd"), PASSWD)?;
    std::fs::write(root.join("etc/group"), GROUP)?;

    // `busybox --list-full`: one "dir/applet" per line (bin/sh, usr/bin/awk, sbin/ip, ...).
    let out = Command::new(&bb).arg("--list-full").stderr(Stdio::inherit()).output().context("busybox --list-full")?;
    if !out.status.success() {
        return Err(anyhow!("busybox --list-full: {}", out.status));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut links = 0;
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let rel = Path::new(line);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) || rel == Path::new("bin/busybox") {
            continue;
        }
        let link = root.join(rel);
        if let Some(parent) = link.parent() {
            mkdir(parent, 0o755)?;
        }
        match std::os::unix::fs::symlink(BUSYBOX, &link) {
            Ok(()) => links += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(anyhow!("{}: {e}", link.display())),
        }
    }
    if !root.join("bin/sh").exists() {
        return Err(anyhow!("busybox has no sh applet ({links} applets)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b""));
        assert!(!is_static_elf(b"#!/bin/sh\necho not an ELF file at all, but long enough to be one......"));
        // This test binary is dynamically linked (it has PT_INTERP).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
        // A minimal static ELF: header + one PT_LOAD program header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert!(is_static_elf(&elf));
        elf[64..68].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        assert!(!is_static_elf(&elf));
        // Truncated program headers are not "static".
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert!(!is_static_elf(&elf));
    }

    #[test]
    fn key_depends_on_busybox() {
        assert_ne!(cache_key(b"a"), cache_key(b"b"));
        assert_eq!(cache_key(b"a").len(), 16);
    }

    #[test]
    fn builds_a_busybox_tree() {
        let bb = busybox_ok().expect("a static /bin/busybox (Debian: apt-get install busybox-static)");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        build(&root, &bb).unwrap();
        assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), Path::new(BUSYBOX));
        assert!(std::fs::read_to_string(root.join("etc/passwd")).unwrap().starts_with("root:x:0:0:"));
        for (d, mode) in DIRS {
            let md = std::fs::metadata(root.join(d)).unwrap();
            assert_eq!(md.permissions().mode() & 0o7777, *mode, "{d}");
        }
    }
}
