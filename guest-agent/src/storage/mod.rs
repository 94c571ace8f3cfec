//! Storages: what is mounted in the guest before a container (or the sandbox) uses it.
//!
//! Drivers: `virtio-fs` (a share, by tag), `blk` (a virtio-blk disk, by PCI path), `tmpfs`,
//! `bind` and `overlay` (a writable root over an earlier storage, `overlay.rs`). Mount points are created as needed and removed again on unmount. Every path is taken
//! relative to [`StorageContext::root`] ("/" in the guest), and sysfs and /dev are parameters,
//! so that the code runs on a host in a temporary directory.

mod overlay;

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

pub use shoji_devices::model::MountOptions;

use crate::device::blk::wait_for_virtio_blk;
use crate::device::fs::wait_for_virtio_fs;
use crate::device::{DeviceContext, DeviceError, UeventSource, DEFAULT_HOTPLUG_TIMEOUT};
use crate::sys;
use shoji_devices::model::virtiofs_pci_path;

/// The filesystem type virtio-fs shares are mounted with.
pub const VIRTIOFS_FSTYPE: &str = "virtiofs";

/// Where storages live and devices are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageContext {
    /// Guest paths (mount points, bind sources) are taken below this: "/" in the guest.
    pub root: PathBuf,
    /// Where sysfs is mounted: "/sys".
    pub sysfs_root: PathBuf,
    /// Where device nodes are: "/dev".
    pub dev_root: PathBuf,
    /// How long a hot-plugged disk or share may take to show up.
    pub hotplug_timeout: Duration,
}

impl StorageContext {
    /// The real guest: "/", "/sys", "/dev", [`DEFAULT_HOTPLUG_TIMEOUT`].
    pub fn guest() -> Self {
        StorageContext {
            root: PathBuf::from("/"),
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            hotplug_timeout: DEFAULT_HOTPLUG_TIMEOUT,
        }
    }

    /// The device module's view of the same paths.
    pub fn device_context<'a>(&self, uevents: &'a mut dyn UeventSource) -> DeviceContext<'a> {
        DeviceContext {
            sysfs_root: self.sysfs_root.clone(),
            dev_root: self.dev_root.clone(),
            hotplug_timeout: self.hotplug_timeout,
            uevents,
        }
    }

    /// The host path of the guest path `path`: absolute, without `..`, taken below `root`.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, BadPath> {
        let bad = |reason| BadPath { path: path.to_owned(), reason };
        if path.is_empty() {
            return Err(bad("is empty"));
        }
        if path.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(bad("is not absolute"));
        }
        let mut out = self.root.clone();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir => return Err(bad("contains \"..\"")),
                Component::Prefix(_) => return Err(bad("is not a Unix path")),
            }
        }
        Ok(out)
    }
}

/// A guest path the agent refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path {path:?} {reason}")]
pub struct BadPath {
    pub path: String,
    pub reason: &'static str,
}

/// The storage drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    VirtioFs,
    Blk,
    Tmpfs,
    Bind,
    /// A writable overlay (upper on a private tmpfs) over an earlier storage: `overlay.rs`.
    Overlay,
}

impl Driver {
    /// The driver of a storage request ("virtio-fs", "blk", "tmpfs", "bind"; "virtiofs" and
    /// "virtio-blk" are accepted too).
    pub fn parse(name: &str) -> Option<Driver> {
        Some(match name {
            "virtio-fs" | "virtiofs" => Driver::VirtioFs,
            "blk" | "virtio-blk" => Driver::Blk,
            "tmpfs" => Driver::Tmpfs,
            "bind" => Driver::Bind,
            "overlay" => Driver::Overlay,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::VirtioFs => "virtio-fs",
            Driver::Blk => "blk",
            Driver::Tmpfs => "tmpfs",
            Driver::Bind => "bind",
            Driver::Overlay => "overlay",
        }
    }
}

/// One storage request, as in the agent protocol's `Storage` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageRequest {
    pub driver: String,
    pub driver_options: Vec<String>,
    /// virtio-fs tag, blk PCI path, bind source (a guest path); unused by tmpfs.
    pub source: String,
    /// Needed for blk ("ext4"); virtio-fs and tmpfs imply theirs.
    pub fstype: String,
    pub options: Vec<String>,
    /// Absolute guest path.
    pub mount_point: String,
}

/// A storage the agent mounted; give it back to [`unmount_storage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedStorage {
    pub driver: Driver,
    pub source: String,
    /// The host path of the mount point.
    pub mount_point: PathBuf,
    /// Directories and the file the agent created for the mount point, outermost first; they
    /// are removed again (if empty) after unmounting.
    pub created: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage {driver:?} at {mount_point:?}: unknown driver (known: virtio-fs, blk, tmpfs, bind, overlay)")]
    UnknownDriver { driver: String, mount_point: String },
    #[error("storage {driver} {src:?}: mount_point {err}")]
    BadMountPoint { driver: &'static str, src: String, err: BadPath },
    #[error("storage {driver} {src:?}: {msg}")]
    Invalid { driver: &'static str, src: String, msg: String },
    #[error("storage {driver} {src:?}: source not found: {detail}")]
    MissingSource { driver: &'static str, src: String, detail: String },
    #[error("storage {} {src:?}: {err}", driver.name())]
    Device { driver: Driver, src: String, err: DeviceError },
    #[error("storage {driver} {src:?}: creating mount point {path}: {err}")]
    MountPoint { driver: &'static str, src: String, path: PathBuf, err: io::Error },
    #[error("storage {driver} {src:?}: mounting at {mount_point}: {err}")]
    Mount { driver: &'static str, src: String, mount_point: PathBuf, err: io::Error },
    #[error("storage {driver} {src:?}: unmounting {mount_point}: {err}")]
    Unmount { driver: &'static str, src: String, mount_point: PathBuf, err: io::Error },
}

/// Mounts one storage. `uevents` is used by `blk` only, and must have been listening since
/// before this call (see [`crate::device::uevent`]).
pub fn mount_storage(
    req: &StorageRequest,
    ctx: &StorageContext,
    uevents: &mut dyn UeventSource,
) -> Result<MountedStorage, StorageError> {
    let driver = Driver::parse(&req.driver).ok_or_else(|| StorageError::UnknownDriver {
        driver: req.driver.clone(),
        mount_point: req.mount_point.clone(),
    })?;
    let name = driver.name();
    let invalid = |msg: String| StorageError::Invalid { driver: name, src: req.source.clone(), msg };
    let target = ctx.resolve(&req.mount_point).map_err(|err| StorageError::BadMountPoint {
        driver: name,
        src: req.source.clone(),
        err,
    })?;
    let opts = MountOptions::parse(&req.options).map_err(|e| invalid(format!("options: {e}")))?;
    if opts.bind && driver != Driver::Bind {
        return Err(invalid("bind options are only for the bind driver".into()));
    }

    // What to mount, and whether the mount point is a file (a bind-mounted file).
    let (source, fstype, file_target): (PathBuf, Option<&str>, bool) =
        match driver {
            Driver::VirtioFs => {
                expect_fstype(req, VIRTIOFS_FSTYPE).map_err(invalid)?;
                if req.source.is_empty() {
                    return Err(invalid("source (the virtio-fs tag) is empty".into()));
                }
                // A hot-plugged share: the bus is rescanned for it and its driver bound first.
                let pci =
                    virtiofs_pci_path(&req.driver_options).map_err(|e| invalid(format!("driver_options: {e}")))?;
                if let Some(pci) = &pci {
                    wait_for_virtio_fs(pci, &ctx.sysfs_root, ctx.hotplug_timeout)
                        .map_err(|err| StorageError::Device { driver, src: req.source.clone(), err })?;
                }
                wait_for_virtiofs_tag(&ctx.sysfs_root, &req.source, ctx.hotplug_timeout)
                    .map_err(|detail| StorageError::MissingSource { driver: name, src: req.source.clone(), detail })?;
                (PathBuf::from(&req.source), Some(VIRTIOFS_FSTYPE), false)
            }
            Driver::Blk => {
                if req.fstype.is_empty() {
                    return Err(invalid("fstype is empty; a disk needs one (e.g. \"ext4\")".into()));
                }
                let pci_path = req.source.parse().map_err(|source| StorageError::Device {
                    driver,
                    src: req.source.clone(),
                    err: DeviceError::BadPciPath { id: req.source.clone(), source },
                })?;
                let node = wait_for_virtio_blk(&pci_path, &ctx.sysfs_root, &ctx.dev_root, uevents, ctx.hotplug_timeout)
                    .map_err(|err| StorageError::Device { driver, src: req.source.clone(), err })?;
                (node, Some(req.fstype.as_str()), false)
            }
            Driver::Tmpfs => {
                expect_fstype(req, "tmpfs").map_err(invalid)?;
                (PathBuf::from("tmpfs"), Some("tmpfs"), false)
            }
            Driver::Overlay => return overlay::mount(req, ctx, target, &opts),
            Driver::Bind => {
                let src = ctx.resolve(&req.source).map_err(|e| StorageError::Invalid {
                    driver: name,
                    src: req.source.clone(),
                    msg: e.to_string(),
                })?;
                let meta = std::fs::metadata(&src).map_err(|e| StorageError::MissingSource {
                    driver: name,
                    src: req.source.clone(),
                    detail: format!("{}: {e}", src.display()),
                })?;
                (src, None, !meta.is_dir())
            }
        };

    let created = create_mount_point(&target, file_target).map_err(|(path, err)| StorageError::MountPoint {
        driver: name,
        src: req.source.clone(),
        path,
        err,
    })?;
    let mounted = MountedStorage { driver, source: req.source.clone(), mount_point: target, created };
    if let Err(err) = do_mount(driver, &source, &mounted.mount_point, fstype, &opts) {
        remove_created(&mounted.created);
        let err = match (driver, err.raw_os_error()) {
            // A virtio-fs tag nobody offers fails with ENOENT/EINVAL, depending on the kernel.
            (Driver::VirtioFs, Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => StorageError::MissingSource {
                driver: name,
                src: req.source.clone(),
                detail: format!("mount at {} refused: {err}", mounted.mount_point.display()),
            },
            _ => StorageError::Mount { driver: name, src: req.source.clone(), mount_point: mounted.mount_point, err },
        };
        return Err(err);
    }
    tracing::debug!(driver = name, source = %req.source, mount_point = %mounted.mount_point.display(), "storage mounted");
    Ok(mounted)
}

/// Mounts storages in order; on a failure the ones already mounted are unmounted again.
pub fn mount_storages(
    reqs: &[StorageRequest],
    ctx: &StorageContext,
    uevents: &mut dyn UeventSource,
) -> Result<Vec<MountedStorage>, StorageError> {
    let mut done = Vec::with_capacity(reqs.len());
    for req in reqs {
        match mount_storage(req, ctx, uevents) {
            Ok(m) => done.push(m),
            Err(e) => {
                if let Err(undo) = unmount_storages(done) {
                    tracing::warn!("while undoing storages: {undo}");
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Unmounts a storage (lazily if it is busy) and removes the mount point the agent created. A
/// mount point that is already gone or no longer a mount is fine.
pub fn unmount_storage(m: &MountedStorage) -> Result<(), StorageError> {
    let fail = |err| StorageError::Unmount {
        driver: m.driver.name(),
        src: m.source.clone(),
        mount_point: m.mount_point.clone(),
        err,
    };
    match sys::umount2(&m.mount_point, 0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            tracing::warn!(mount_point = %m.mount_point.display(), "busy; detaching it lazily");
            sys::umount2(&m.mount_point, libc::MNT_DETACH).map_err(fail)?;
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
            tracing::debug!(mount_point = %m.mount_point.display(), "not mounted any more: {e}");
        }
        Err(e) => return Err(fail(e)),
    }
    remove_created(&m.created);
    Ok(())
}

/// Unmounts in reverse order, trying every one; the first error is returned.
pub fn unmount_storages(mounted: Vec<MountedStorage>) -> Result<(), StorageError> {
    let mut first = None;
    for m in mounted.iter().rev() {
        if let Err(e) = unmount_storage(m) {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn expect_fstype(req: &StorageRequest, want: &str) -> Result<(), String> {
    if req.fstype.is_empty() || req.fstype == want {
        Ok(())
    } else {
        Err(format!("fstype {:?} does not fit this driver (it mounts {want})", req.fstype))
    }
}

fn do_mount(driver: Driver, source: &Path, target: &Path, fstype: Option<&str>, opts: &MountOptions) -> io::Result<()> {
    if driver == Driver::Bind {
        let rec = opts.flags & libc::MS_REC;
        sys::mount(Some(source), target, None, libc::MS_BIND | rec, None)?;
        // Bind mounts take their other flags (ro, nosuid, ...) only by a remount.
        let rest = opts.flags & !libc::MS_REC;
        if rest != 0 {
            if let Err(e) = sys::mount(None, target, None, libc::MS_REMOUNT | libc::MS_BIND | rest, None) {
                let _ = sys::umount2(target, libc::MNT_DETACH);
                return Err(e);
            }
        }
    } else {
        sys::mount(Some(source), target, fstype, opts.flags, Some(&opts.data_string()))?;
    }
    for &p in &opts.propagation {
        if let Err(e) = sys::mount(None, target, None, p, None) {
            let _ = sys::umount2(target, libc::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

/// Creates the missing directories up to `target` (and `target` itself, as an empty file when
/// `file`); returns what it created, outermost first. On failure it removes what it made.
fn create_mount_point(target: &Path, file: bool) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let mut missing: Vec<&Path> = target.ancestors().take_while(|p| std::fs::symlink_metadata(p).is_err()).collect();
    missing.reverse();
    let mut created = Vec::with_capacity(missing.len());
    for (i, p) in missing.iter().enumerate() {
        let last = i + 1 == missing.len();
        let res = if last && file {
            std::fs::OpenOptions::new().write(true).create_new(true).open(p).map(drop)
        } else {
            std::fs::create_dir(p)
        };
        match res {
            Ok(()) => created.push(p.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                remove_created(&created);
                return Err((p.to_path_buf(), e));
            }
        }
    }
    Ok(created)
}

/// Removes what [`create_mount_point`] made, innermost first; only empty directories go.
fn remove_created(created: &[PathBuf]) {
    for p in created.iter().rev() {
        let res = match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(p),
            Ok(m) if m.is_file() && m.len() == 0 => std::fs::remove_file(p),
            _ => continue,
        };
        if let Err(e) = res {
            tracing::debug!(path = %p.display(), "left in place: {e}");
            return;
        }
    }
}

/// Where kernels since 6.9 list virtio-fs tags: `<sysfs>/fs/virtiofs/<N>/tag`.
pub const VIRTIOFS_SYSFS: &str = "fs/virtiofs";

/// The virtio-fs tags in sysfs, or `None` when this kernel does not list them.
pub fn virtiofs_tags(sysfs_root: &Path) -> Option<Vec<String>> {
    let dir = std::fs::read_dir(sysfs_root.join(VIRTIOFS_SYSFS)).ok()?;
    let mut tags: Vec<String> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("tag")).ok())
        .map(|t| t.trim_end_matches('\n').to_owned())
        .collect();
    tags.sort();
    Some(tags)
}

/// Waits for a virtio-fs share with `tag` when the kernel lists tags in sysfs; without that list
/// there is nothing to wait on and mount(2) itself tells.
fn wait_for_virtiofs_tag(sysfs_root: &Path, tag: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(tags) = virtiofs_tags(sysfs_root) else {
            return Ok(());
        };
        if tags.iter().any(|t| t == tag) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no virtio-fs device has this tag within {timeout:?} (tags present: {tags:?})"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests;
