//! The `overlay` driver: a writable container root over a read-only one, e.g. an image that a
//! virtio-fs share gives every run unmodified. Writes land on a private tmpfs and go with the
//! mount, as in Docker.
//!
//! Request: fstype "overlay" (or empty), options `lowerdir=<guest path>` (the mount point of an
//! earlier storage) plus mount flags; `source` is only a label. The agent picks upperdir and
//! workdir itself, so a request cannot point them anywhere. They live on a tmpfs mounted on a
//! scratch directory beside the mount point (`.<name>.overlay`), which is detached and removed
//! again as soon as the overlay is mounted: the overlay holds its own reference to that tmpfs,
//! so unmounting the overlay frees it and the storage unmounts like any other.

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{
    create_mount_point, do_mount, expect_fstype, remove_created, Driver, MountOptions, MountedStorage, StorageContext,
    StorageError, StorageRequest,
};
use crate::sys;

/// The filesystem type overlays are mounted with.
pub const OVERLAY_FSTYPE: &str = "overlay";

/// What overlayfs reads specially in its option string (`,` ends an option, `:` separates
/// lower layers, `\` escapes): paths holding one are refused rather than escaped.
const SPECIAL: &[char] = &[',', ':', '\\'];

/// The guest path of `lowerdir=`: the filesystem data must be exactly that one option.
fn lowerdir(data: &str) -> Result<&str, String> {
    let mut lower = None;
    for opt in data.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("lowerdir", p)) if lower.is_none() => lower = Some(p),
            Some(("lowerdir", _)) => return Err("lowerdir= is given twice".into()),
            _ => {
                return Err(format!(
                    "option {opt:?} is not for this driver (it takes lowerdir= and mount flags; \
                     the agent makes upperdir and workdir)"
                ))
            }
        }
    }
    lower.ok_or_else(|| "options lack lowerdir=<guest path>".into())
}

/// `path` as a string overlayfs takes literally.
fn plain(path: &Path) -> Result<&str, String> {
    let s = path.to_str().ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    match s.find(SPECIAL) {
        Some(i) => Err(format!("{s:?} holds {:?}, which overlayfs options cannot carry", &s[i..i + 1])),
        None => Ok(s),
    }
}

/// The scratch directory for `target`'s tmpfs: `<parent>/.<name>.overlay`.
fn scratch_dir(target: &Path) -> Result<PathBuf, String> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(format!("cannot mount an overlay on {}", target.display()));
    };
    let mut n = std::ffi::OsString::from(".");
    n.push(name);
    n.push(".overlay");
    let dir = parent.join(n);
    plain(&dir).map_err(|e| format!("mount point {e}"))?;
    Ok(dir)
}

/// Mounts an overlay of `opts`' lowerdir at `target` (the checked host path of the mount point).
pub(super) fn mount(
    req: &StorageRequest,
    ctx: &StorageContext,
    target: PathBuf,
    opts: &MountOptions,
) -> Result<MountedStorage, StorageError> {
    let name = Driver::Overlay.name();
    let src = || req.source.clone();
    let invalid = |msg: String| StorageError::Invalid { driver: name, src: src(), msg };
    expect_fstype(req, OVERLAY_FSTYPE).map_err(invalid)?;
    let data = opts.data_string();
    let lower = lowerdir(&data).map_err(invalid)?;
    let lower = ctx.resolve(lower).map_err(|e| invalid(format!("lowerdir: {e}")))?;
    let lower_str = plain(&lower).map_err(|e| invalid(format!("lowerdir {e}")))?.to_owned();
    if target == ctx.root {
        return Err(invalid("the overlay cannot be mounted on /".into()));
    }
    let scratch = scratch_dir(&target).map_err(invalid)?;
    let missing = |detail| StorageError::MissingSource { driver: name, src: src(), detail };
    let lower_meta = std::fs::metadata(&lower).map_err(|e| missing(format!("lowerdir {}: {e}", lower.display())))?;
    if !lower_meta.is_dir() {
        return Err(missing(format!("lowerdir {} is not a directory", lower.display())));
    }

    let created = create_mount_point(&target, false).map_err(|(path, err)| StorageError::MountPoint {
        driver: name,
        src: src(),
        path,
        err,
    })?;
    let mounted = MountedStorage { driver: Driver::Overlay, source: src(), mount_point: target, created };
    let res = with_upper(&scratch, &lower_meta, |step, path, err| match step {
        Step::Mkdir => StorageError::MountPoint { driver: name, src: src(), path, err },
        Step::Mount => StorageError::Mount { driver: name, src: src(), mount_point: path, err },
    })
    .and_then(|(upper, work)| {
        let data = format!("lowerdir={lower_str},upperdir={upper},workdir={work}");
        let res = do_mount(
            Driver::Overlay,
            Path::new(OVERLAY_FSTYPE),
            &mounted.mount_point,
            Some(OVERLAY_FSTYPE),
            &MountOptions { data: vec![data], ..opts.clone() },
        );
        // The overlay holds its own reference to the tmpfs; this name for it goes.
        drop_scratch(&scratch, true);
        res.map_err(|err| StorageError::Mount {
            driver: name,
            src: src(),
            mount_point: mounted.mount_point.clone(),
            err,
        })
    });
    if let Err(e) = res {
        remove_created(&mounted.created);
        return Err(e);
    }
    Ok(mounted)
}

/// What failed while preparing the upper directory.
enum Step {
    Mkdir,
    Mount,
}

/// Creates `scratch`, mounts a tmpfs on it with `upper` (owner and mode of the lower root,
/// which the overlay's root shows) and `work`; returns their paths. On failure nothing is left.
fn with_upper<E>(
    scratch: &Path,
    lower: &Metadata,
    fail: impl Fn(Step, PathBuf, std::io::Error) -> E,
) -> Result<(String, String), E> {
    // A leftover is refused, not reused.
    std::fs::create_dir(scratch).map_err(|e| fail(Step::Mkdir, scratch.to_path_buf(), e))?;
    if let Err(e) = sys::mount(Some(Path::new("tmpfs")), scratch, Some("tmpfs"), 0, Some("mode=0700")) {
        drop_scratch(scratch, false);
        return Err(fail(Step::Mount, scratch.to_path_buf(), e));
    }
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    let made = std::fs::create_dir(&upper)
        .and_then(|()| std::os::unix::fs::chown(&upper, Some(lower.uid()), Some(lower.gid())))
        .and_then(|()| std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(lower.mode() & 0o7777)))
        .map_err(|e| fail(Step::Mkdir, upper.clone(), e))
        .and_then(|()| std::fs::create_dir(&work).map_err(|e| fail(Step::Mkdir, work.clone(), e)));
    if let Err(e) = made {
        drop_scratch(scratch, true);
        return Err(e);
    }
    // Below `scratch`, which `scratch_dir` checked, and plain names: UTF-8 without specials.
    Ok((upper.to_string_lossy().into_owned(), work.to_string_lossy().into_owned()))
}

/// Detaches the scratch tmpfs (when `mounted`) and removes its directory.
fn drop_scratch(scratch: &Path, mounted: bool) {
    if mounted {
        if let Err(e) = sys::umount2(scratch, libc::MNT_DETACH) {
            tracing::warn!(path = %scratch.display(), "detaching the overlay's scratch tmpfs: {e}");
        }
    }
    if let Err(e) = std::fs::remove_dir(scratch) {
        tracing::warn!(path = %scratch.display(), "removing the overlay's scratch directory: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::{mount_storage, unmount_storage};
    use super::*;
    use crate::device::ChannelUevents;
    use std::time::Duration;

    fn ctx(root: &Path) -> StorageContext {
        StorageContext {
            root: root.to_path_buf(),
            sysfs_root: root.join("sys"),
            dev_root: root.join("dev"),
            hotplug_timeout: Duration::from_millis(50),
        }
    }

    fn req(mount_point: &str, options: &[&str]) -> StorageRequest {
        StorageRequest {
            driver: "overlay".into(),
            source: "rootfs".into(),
            fstype: "overlay".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            mount_point: mount_point.into(),
            ..Default::default()
        }
    }

    /// Runs `f` on a thread of its own, in a private mount namespace when this is root, so that
    /// no mount of a test (even one that should have been refused) reaches the host.
    fn in_private_mount_ns(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                // SAFETY: unshare(2) with a flag only; it affects this (test's own) thread alone.
                if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                    eprintln!("skipping: unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
                    return;
                }
                sys::mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None).unwrap();
            }
            f()
        })
        .join()
        .unwrap();
    }

    #[test]
    fn lowerdir_is_the_only_data_option() {
        assert_eq!(lowerdir("lowerdir=/run/img"), Ok("/run/img"));
        assert_eq!(lowerdir(",lowerdir=/a,"), Ok("/a"));
        assert!(lowerdir("").unwrap_err().contains("lack lowerdir"));
        assert!(lowerdir("lowerdir=/a,lowerdir=/b").unwrap_err().contains("twice"));
        for bad in ["lowerdir=/a,upperdir=/etc", "workdir=/x,lowerdir=/a", "lowerdir=/a,index=on", "lowerdir"] {
            let e = lowerdir(bad).unwrap_err();
            assert!(e.contains("not for this driver"), "{bad}: {e}");
        }
        assert_eq!(plain(Path::new("/run/a b")), Ok("/run/a b"));
        for bad in ["/a:b", "/a,b", "/a\\b"] {
            assert!(plain(Path::new(bad)).unwrap_err().contains("overlayfs options cannot carry"), "{bad}");
        }
        assert_eq!(scratch_dir(Path::new("/r/run/rootfs")).unwrap(), Path::new("/r/run/.rootfs.overlay"));
        assert!(scratch_dir(Path::new("/")).is_err());
        assert!(scratch_dir(Path::new("/run/a:b")).is_err());
    }

    /// Requests the agent refuses before it creates or mounts anything; each names its reason.
    #[test]
    fn bad_requests_are_refused_and_leave_nothing() {
        in_private_mount_ns(bad_requests);
    }

    fn bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        std::fs::create_dir_all(dir.path().join("run/img")).unwrap();
        std::fs::write(dir.path().join("run/file"), "x").unwrap();
        let (_tx, mut ev) = ChannelUevents::new();
        let cases: &[(StorageRequest, &str)] = &[
            (req("/run/c/root", &[]), "lack lowerdir"),
            // Comma injection: MountOptions::parse splits it into a second data option.
            (req("/run/c/root", &["lowerdir=/run/img,upperdir=/etc"]), "\"upperdir=/etc\""),
            (req("/run/c/root", &["lowerdir=/run/img", "workdir=/etc"]), "\"workdir=/etc\""),
            (req("/run/c/root", &["lowerdir=/run/../etc"]), "\"..\""),
            (req("/run/c/root", &["lowerdir=run/img"]), "not absolute"),
            (req("/run/c/root", &["lowerdir=/run/img:/etc"]), "\":\""),
            (req("/run/c/root", &["lowerdir=/run/img\\"]), "\"\\\\\""),
            (req("/run/c:root", &["lowerdir=/run/img"]), "mount point"),
            (req("/", &["lowerdir=/run/img"]), "cannot be mounted on /"),
            (req("/.", &["lowerdir=/run/img"]), "cannot be mounted on /"),
            (req("/run/c/root", &["lowerdir=/run/none"]), "source not found"),
            (req("/run/c/root", &["lowerdir=/run/file"]), "not a directory"),
            (StorageRequest { fstype: "ext4".into(), ..req("/run/c/root", &["lowerdir=/run/img"]) }, "ext4"),
            (req("/run/c/root", &["lowerdir=/run/img", "bind"]), "bind options"),
        ];
        for (r, want) in cases {
            let e = mount_storage(r, &c, &mut ev).unwrap_err().to_string();
            assert!(e.starts_with("storage overlay \"rootfs\": ") && e.contains(want), "{r:?}: {e}");
        }
        let mut left: Vec<_> =
            std::fs::read_dir(dir.path().join("run")).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["file", "img"], "nothing was created for a refused request");
    }

    /// A scratch directory already there (a crashed agent's, say) is refused, not reused.
    #[test]
    fn a_leftover_scratch_directory_is_refused() {
        in_private_mount_ns(leftover_scratch);
    }

    fn leftover_scratch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run/img")).unwrap();
        std::fs::create_dir_all(dir.path().join("run/c/.root.overlay")).unwrap();
        let (_tx, mut ev) = ChannelUevents::new();
        let e = mount_storage(&req("/run/c/root", &["lowerdir=/run/img"]), &ctx(dir.path()), &mut ev).unwrap_err();
        assert!(matches!(e, StorageError::MountPoint { .. }), "{e:?}");
        assert!(e.to_string().contains(".root.overlay"), "{e}");
        assert!(!dir.path().join("run/c/root").exists(), "the mount point made for it is removed");
        assert!(dir.path().join("run/c/.root.overlay").is_dir(), "someone else's directory is left alone");
    }

    /// `/proc/thread-self/mountinfo` lines whose mount point is below `dir`: (mount point, fstype).
    fn mounts_below(dir: &Path) -> Vec<(String, String)> {
        let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let dir = dir.to_str().unwrap();
        info.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let dash = f.iter().position(|x| *x == "-")?;
                f[4].starts_with(dir).then(|| (f[4].to_owned(), f[dash + 1].to_owned()))
            })
            .collect()
    }

    /// A real overlay, as root, in a mount namespace of this test's own thread: the container
    /// writes to its root and makes its mount points there, the lower directory stays as it
    /// was, the root shows the lower root's mode, and no scratch tmpfs or directory remains
    /// mounted or visible; after unmounting, nothing is left.
    #[test]
    fn overlay_is_writable_keeps_the_lower_and_unmounts_cleanly() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: not root");
            return;
        }
        in_private_mount_ns(|| {
            let dir = tempfile::tempdir().unwrap();
            let c = ctx(dir.path());
            let img = dir.path().join("run/img");
            std::fs::create_dir_all(img.join("etc")).unwrap();
            std::fs::write(img.join("hello"), "from the image").unwrap();
            std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o751)).unwrap();
            let (_tx, mut ev) = ChannelUevents::new();

            let m = mount_storage(&req("/run/c/rootfs", &["lowerdir=/run/img", "nodev"]), &c, &mut ev).unwrap();
            let root = dir.path().join("run/c/rootfs");
            assert_eq!(m.mount_point, root);
            assert_eq!(m.created, [dir.path().join("run/c"), root.clone()]);
            assert_eq!(mounts_below(dir.path()), [(root.to_str().unwrap().to_owned(), "overlay".to_owned())]);
            assert!(!dir.path().join("run/c/.rootfs.overlay").exists(), "the scratch directory is gone");
            assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777, 0o751);

            assert_eq!(std::fs::read_to_string(root.join("hello")).unwrap(), "from the image");
            std::fs::write(root.join("hello"), "changed").unwrap();
            std::fs::write(root.join("new"), "new").unwrap();
            std::fs::create_dir(root.join("proc")).unwrap();
            std::fs::remove_dir(root.join("etc")).unwrap();
            assert_eq!(std::fs::read_to_string(root.join("hello")).unwrap(), "changed");
            assert!(!root.join("etc").exists());

            let mut lower: Vec<_> = std::fs::read_dir(&img).unwrap().map(|e| e.unwrap().file_name()).collect();
            lower.sort();
            assert_eq!(lower, ["etc", "hello"], "the lower directory is unchanged");
            assert_eq!(std::fs::read_to_string(img.join("hello")).unwrap(), "from the image");

            unmount_storage(&m).unwrap();
            assert!(mounts_below(dir.path()).is_empty());
            assert!(!dir.path().join("run/c").exists(), "the mount point the agent made is removed");
        });
    }
}
