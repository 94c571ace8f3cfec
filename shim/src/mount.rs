//! Host mounts of the shim: the task's rootfs (containerd's snapshot mounts) at
//! `<bundle>/rootfs`, and the sandbox's shared tree that virtio-fs serves to the guest.
//!
//! The guest is root over everything virtio-fs shares read-write, and this process is root on
//! the host: a path the shim mounts on must never pass through anything the guest can create,
//! rename or replace (a planted symlink would steer a host mount anywhere; Kata's
//! CVE-2020-2026). So the shim builds the tree in `<dir>/staging` (host only, 0700) and the guest
//! sees it through `<dir>/shared`, a read-only, nosuid, nodev bind of it: the guest can write
//! only inside the binds made read-write on it. Every path below those roots is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...)` and mounted onto the open fd
//! (`open_tree` + `mount_setattr` + `move_mount`), so nothing is resolved twice.
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use shoji_devices::model::MountOptions;

/// One mount as containerd describes it (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// mount(2) flags and the fs-specific data of an option list, by the one table of option words
/// host and guest share (`shoji_devices::model::mount`).
pub fn parse_options(options: &[String]) -> io::Result<(libc::c_ulong, String)> {
    let m = MountOptions::parse(options)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("rootfs options: {e}")))?;
    Ok((m.mount_flags(), m.data_string()))
}

pub(crate) fn cstr(p: &[u8], what: &str) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: contains NUL")))
}

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Takes ownership of a descriptor a syscall returned.
fn owned(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = cvt(r)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolution below a root that no symlink, magic link or `..` can leave, and that does not
/// cross into another mount (a target is a plain directory of ours, never a mount already).
pub(crate) const BENEATH: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
/// As [`BENEATH`], but through our own mounts (for finding mounts to unmount).
const BENEATH_XDEV: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

pub(crate) fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC;
    // SAFETY: open_how is plain data; zeroed is its valid "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 { u64::from(mode) } else { 0 };
    how.resolve = resolve;
    // SAFETY: `path` is NUL-terminated and `how` is a valid open_how whose size we pass; both
    // outlive the call.
    owned(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })
}

/// An O_PATH descriptor of a directory the shim owns the path of.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let p = cstr(path.as_os_str().as_bytes(), "path")?;
    // SAFETY: a NUL-terminated path that outlives the call.
    owned(unsafe {
        libc::open(p.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC).into()
    })
}

/// mkdirat(2) of one name; an existing entry (of any kind) is left to the open that follows.
fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated name that outlives the call.
    match cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(drop),
    }
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat buffer that outlives the call.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }.into())?;
    Ok(st)
}

/// Whether `fd` is the root of a mount.
fn is_mount_root(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: statx is plain data, filled by the kernel.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path and a buffer that outlives the call.
    cvt(unsafe {
        libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW, 0, &mut stx)
    }
    .into())?;
    Ok(stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0)
}

/// A detached copy of the mount (tree, with AT_RECURSIVE) at `source`, below `dir` or the
/// current directory, for attaching elsewhere.
fn open_tree(dir: Option<BorrowedFd<'_>>, source: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    let flags = flags | libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    let dir = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid descriptor (or AT_FDCWD) and a NUL-terminated path that outlives the call.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, dir, source.as_ptr(), flags) })
}

/// Sets mount attributes (and propagation, if not 0) on the mount of `fd` and every mount below.
fn mount_setattr(fd: BorrowedFd<'_>, attr_set: u64, propagation: libc::c_ulong) -> io::Result<()> {
    #[allow(clippy::unnecessary_cast)] // c_ulong is 32 bits wide on 32-bit targets
    let attr = libc::mount_attr { attr_set, attr_clr: 0, propagation: propagation as u64, userns_fd: 0 };
    // SAFETY: a valid descriptor, an empty path, and a mount_attr whose size we pass; all
    // outlive the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

/// Attaches the detached tree `tree` on the (already resolved) target `onto`.
fn move_mount(tree: BorrowedFd<'_>, onto: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid descriptors and empty NUL-terminated paths that outlive the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            onto.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Detaches the mount whose root `fd` is (through its /proc/self/fd link: no path walk).
fn umount_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let p = cstr(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes(), "fd path")?;
    // SAFETY: a NUL-terminated path that outlives the call.
    cvt(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) }.into()).map(drop)
}

/// Attaches `tree` at `onto`: nosuid, nodev (and read-only) on every mount of it, private so
/// that nothing mounted on the source later shows up writable in the copy.
fn attach(tree: &OwnedFd, onto: BorrowedFd<'_>, read_only: bool) -> io::Result<()> {
    let ro = if read_only { libc::MOUNT_ATTR_RDONLY } else { 0 };
    mount_setattr(tree.as_fd(), libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | ro, libc::MS_PRIVATE)?;
    move_mount(tree.as_fd(), onto)
}

/// The names of a relative path without `.`/`..`/root (a slip is an error, not a clamp).
fn names(rel: &Path) -> io::Result<Vec<CString>> {
    let mut v = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => v.push(cstr(n.as_bytes(), "path")?),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain relative path", rel.display()),
                ))
            }
        }
    }
    if v.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    }
    Ok(v)
}

/// Creates `rel` below `root` (directories 0700; the last one a directory, or a 0600 file)
/// one component at a time, never through a symlink.
fn create_beneath(root: BorrowedFd<'_>, rel: &Path, dir: bool) -> io::Result<()> {
    let names = names(rel)?;
    let (last, parents) = names.split_last().ok_or_else(|| io::Error::other("empty path"))?;
    let mut cur: Option<OwnedFd> = None;
    for n in parents {
        let at = cur.as_ref().map_or(root, |f| f.as_fd());
        mkdirat(at, n, 0o700)?;
        cur = Some(openat2(at, n, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0, BENEATH)?);
    }
    let at = cur.as_ref().map_or(root, |f| f.as_fd());
    if dir {
        mkdirat(at, last, 0o700)?;
        openat2(at, last, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0, BENEATH)?;
    } else {
        // O_NONBLOCK: an existing FIFO must not block us; the type is checked below.
        let f =
            openat2(at, last, libc::O_CREAT | libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW, 0o600, BENEATH)?;
        if fstat(f.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a regular file"));
        }
    }
    Ok(())
}

/// A sandbox's shared tree: `<dir>/staging` (host only, 0700), where the shim creates the
/// directories and files to mount on, and `<dir>/shared`, the read-only, nosuid, nodev bind of
/// it that virtio-fs serves.
pub struct Share {
    staging: OwnedFd,
    shared: OwnedFd,
}

impl Share {
    /// Opens the share of sandbox directory `dir`, creating it (0700) and the read-only view on
    /// first use.
    pub fn open(dir: &Path) -> io::Result<Share> {
        // Two opens racing to attach the view would stack two, binds going to the hidden one.
        static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ATTACHING.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        // Also tightens a directory an older shim made 0755.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let d = open_dir(dir)?;
        let sub = |name: &CStr| -> io::Result<OwnedFd> {
            mkdirat(d.as_fd(), name, 0o700)?;
            openat2(d.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0, BENEATH_XDEV)
        };
        let staging = sub(c"staging")?;
        let mut shared = sub(c"shared")?;
        if !is_mount_root(shared.as_fd())? {
            let tree = open_tree(Some(staging.as_fd()), c"", libc::AT_EMPTY_PATH as libc::c_uint)?;
            attach(&tree, shared.as_fd(), true)?;
            shared = openat2(d.as_fd(), c"shared", libc::O_PATH | libc::O_DIRECTORY, 0, BENEATH_XDEV)?;
            if !is_mount_root(shared.as_fd())? {
                return Err(io::Error::other("shared: the read-only view did not attach"));
            }
        }
        Ok(Share { staging, shared })
    }

    /// Bind-mounts `source` (a file or directory; containerd's or the spec's, so trusted) at
    /// `rel` in the share: recursively, nosuid, nodev, and read-only on every submount if
    /// `read_only`. The target is created in staging and mounted on by descriptor: a symlink
    /// anywhere on `rel` fails the call, it is never followed.
    pub fn bind(&self, rel: &Path, source: &Path, read_only: bool) -> io::Result<()> {
        let src = cstr(source.as_os_str().as_bytes(), "source")?;
        let tree = open_tree(None, &src, libc::AT_RECURSIVE as libc::c_uint)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
        let dir = fstat(tree.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        create_beneath(self.staging.as_fd(), rel, dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", rel.display())))?;
        let names = names(rel)?;
        let mut rel_c = names.iter().map(|n| n.as_bytes()).collect::<Vec<_>>().join(&b'/');
        rel_c.push(0);
        let rel_c = CStr::from_bytes_with_nul(&rel_c).map_err(io::Error::other)?;
        let flags = libc::O_PATH | libc::O_NOFOLLOW | if dir { libc::O_DIRECTORY } else { 0 };
        let onto = openat2(self.shared.as_fd(), rel_c, flags, 0, BENEATH)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", rel.display())))?;
        attach(&tree, onto.as_fd(), read_only)
            .map_err(|e| io::Error::new(e.kind(), format!("mounting on {}: {e}", rel.display())))
    }
}

/// Mounts containerd's snapshot mounts, in order, at `target` (containerd's `<bundle>/rootfs`,
/// which the guest cannot reach). nosuid, nodev: the guest writes to it.
pub fn mount_all(mounts: &[MountSpec], target: &Path) -> io::Result<()> {
    for m in mounts {
        let (flags, data) = parse_options(&m.options)?;
        let what = || format!("mount {} ({}) at {}", m.source, m.fstype, target.display());
        if flags & libc::MS_BIND != 0 || m.fstype == "bind" {
            let src = cstr(m.source.as_bytes(), "source")?;
            let rec = if flags & libc::MS_REC != 0 { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
            open_tree(None, &src, rec)
                .and_then(|tree| attach(&tree, open_dir(target)?.as_fd(), flags & libc::MS_RDONLY != 0))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))?;
            continue;
        }
        let fstype = if m.fstype.is_empty() { "none" } else { m.fstype.as_str() };
        let (src, tgt, fs, d) = (
            cstr(m.source.as_bytes(), "source")?,
            cstr(target.as_os_str().as_bytes(), "target")?,
            cstr(fstype.as_bytes(), "type")?,
            cstr(data.as_bytes(), "options")?,
        );
        let flags = flags | libc::MS_NOSUID | libc::MS_NODEV;
        let data_ptr = if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() };
        // SAFETY: every pointer is a NUL-terminated string (or null) that outlives the call.
        cvt(unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, data_ptr) }.into())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))?;
    }
    Ok(())
}

/// Unmounts everything mounted at `target` (lazily: busy mounts go once unused), not following
/// a symlink there. Not mounted is fine: teardown runs again after a crash.
pub fn unmount_all(target: &Path) {
    let Ok(tgt) = cstr(target.as_os_str().as_bytes(), "target") else { return };
    for _ in 0..16 {
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            return;
        }
    }
}

/// A mount point as /proc/self/mountinfo escapes it (`\040` for a space, ...).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct.and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Mount points at or under `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> =
        info.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape).filter(|p| p.starts_with(dir)).collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts what is mounted at `rel` below `root` (stacked mounts one at a time), reaching it
/// without following a symlink and detaching it by descriptor: whatever is renamed or planted
/// on the way cannot turn this into an unmount elsewhere.
fn unmount_at(root: BorrowedFd<'_>, rel: &Path) {
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let Ok(rel) = cstr(rel.as_os_str().as_bytes(), "path") else { return };
    for _ in 0..16 {
        let Ok(fd) = openat2(root, &rel, libc::O_PATH | libc::O_NOFOLLOW, 0, BENEATH_XDEV) else { return };
        if !is_mount_root(fd.as_fd()).unwrap_or(false) || umount_fd(fd.as_fd()).is_err() {
            return;
        }
    }
}

/// Unmounts every mount at or under `under` (`root` or a directory below it).
fn unmount_beneath(root: &Path, under: &Path) {
    let Ok(root_fd) = open_dir(root) else { return };
    for m in mounts_under(under) {
        if let Ok(rel) = m.strip_prefix(root) {
            unmount_at(root_fd.as_fd(), rel);
        }
    }
}

/// Removes `dir` unless something is still mounted in it (removal would then reach into a
/// bound host directory).
fn remove_dir(dir: &Path, mounted: &Path) {
    let left = mounts_under(mounted);
    if !left.is_empty() {
        tracing::error!("not removing {}: still mounted: {left:?}", dir.display());
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// Unmounts a container's part of the share of sandbox directory `dir` and removes it.
/// Idempotent.
pub fn remove_container(dir: &Path, id: &str) {
    if !matches!(names(Path::new(id)).map(|n| n.len()), Ok(1)) {
        return;
    }
    let shared = dir.join("shared").join(id);
    unmount_beneath(dir, &shared);
    remove_dir(&dir.join("staging").join(id), &shared);
    // A sandbox directory of an older shim, without staging (a plain shared/ directory).
    if !dir.join("staging").exists() {
        remove_dir(&shared, &shared);
    }
}

/// Unmounts every mount at or under `dir`, then removes it. Idempotent.
pub fn remove_tree(dir: &Path) {
    unmount_beneath(dir, dir);
    remove_dir(dir, dir);
}

#[cfg(test)]
mod tests;
