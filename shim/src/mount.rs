//! Host mounts of the shim: the task's rootfs (containerd's snapshot mounts) at
//! `<bundle>/rootfs`, and bind mounts into the sandbox's shared (virtio-fs) directory.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One mount as containerd describes it (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// mount(2) flags and the fs-specific data of an option list (the agent's parser: one table of
/// option names for OCI specs and containerd's mounts).
pub fn parse_options(options: &[String]) -> std::io::Result<(libc::c_ulong, String)> {
    let m = shoji_agent::runtime::parse_mount_options("rootfs options", options)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let bind = if m.bind { libc::MS_BIND } else { 0 };
    Ok((m.flags | bind, m.data.join(",")))
}

fn cstr(p: &[u8], what: &str) -> std::io::Result<CString> {
    CString::new(p).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: contains NUL")))
}

fn sys_mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let src = cstr(source.as_bytes(), "source")?;
    let tgt = cstr(target.as_os_str().as_bytes(), "target")?;
    let fs = cstr(fstype.as_bytes(), "type")?;
    let d = cstr(data.as_bytes(), "options")?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() },
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts containerd's snapshot mounts, in order, at `target`.
pub fn mount_all(mounts: &[MountSpec], target: &Path) -> std::io::Result<()> {
    for m in mounts {
        let (flags, data) = parse_options(&m.options)?;
        let fstype = if m.fstype.is_empty() || m.fstype == "bind" { "none" } else { m.fstype.as_str() };
        sys_mount(&m.source, target, fstype, flags, &data).map_err(|e| {
            std::io::Error::new(e.kind(), format!("mount {} ({}) at {}: {e}", m.source, m.fstype, target.display()))
        })?;
        if flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0 {
            // A bind mount ignores MS_RDONLY until it is remounted.
            sys_mount("", target, "none", libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, "")?;
        }
    }
    Ok(())
}

/// Bind-mounts `source` (a file or directory) at `target`, created if needed.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    if source.is_dir() {
        std::fs::create_dir_all(target)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(target)?;
    }
    let src =
        source.to_str().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "source: not UTF-8"))?;
    sys_mount(src, target, "none", libc::MS_BIND | libc::MS_REC, "")?;
    if read_only {
        sys_mount("", target, "none", libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, "")?;
    }
    Ok(())
}

/// Unmounts everything mounted at `target` (lazily: busy mounts go once unused). Not mounted is
/// fine: teardown runs again after a crash.
pub fn unmount_all(target: &Path) {
    let Ok(tgt) = cstr(target.as_os_str().as_bytes(), "target") else { return };
    for _ in 0..16 {
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) } != 0 {
            return;
        }
    }
}

/// Mount points at or under `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<std::path::PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts every mount at or under `dir`, then removes it. Idempotent.
pub fn remove_tree(dir: &Path) {
    for m in mounts_under(dir) {
        unmount_all(&m);
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&v(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])).unwrap();
        assert_eq!((f, d.as_str()), (0, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2"));
        let (f, d) = parse_options(&v(&["rbind", "ro", "nosuid"])).unwrap();
        assert_eq!(f, libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY | libc::MS_NOSUID);
        assert_eq!(d, "");
        let (f, _) = parse_options(&v(&["ro", "rw"])).unwrap();
        assert_eq!(f, 0, "the last of ro/rw wins");
        assert!(parse_options(&v(&["idmap"])).is_err());
    }

    #[test]
    fn bind_and_remove_tree_leave_nothing() {
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root (mount(2)); CI runs as root");
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let shared = d.path().join("shared");
        bind(&src, &shared.join("c/rootfs"), true).unwrap();
        bind(&src.join("f"), &shared.join("c/mounts/0"), false).unwrap();
        assert_eq!(std::fs::read_to_string(shared.join("c/rootfs/f")).unwrap(), "x");
        assert!(std::fs::write(shared.join("c/rootfs/g"), "y").is_err(), "read-only bind");
        assert_eq!(mounts_under(&shared).len(), 2);
        remove_tree(&shared);
        assert!(!shared.exists());
        assert!(mounts_under(d.path()).is_empty());
        remove_tree(&shared); // again: nothing to do
    }
}
