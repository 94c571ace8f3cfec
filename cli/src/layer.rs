//! OCI image layers (tar, tar+gzip) unpacked into a rootfs directory without ever leaving it.
//!
//! A layer is hostile input: its names may hold `..`, its symlinks may point anywhere on the
//! host, and a later entry (or whiteout) may try to go through such a symlink. So nothing here
//! uses a path from the host's root: every entry is created or removed relative to a directory
//! fd, the directories on its way are opened one name at a time with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`, plus
//! `O_NOFOLLOW`), and the entry itself is made with `*at` calls that do not follow a symlink in
//! its last name (`O_CREAT|O_EXCL`, `mkdirat`, `symlinkat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `unlinkat`). A symlink on the way to an entry is an error, not followed
//! (even inside the rootfs): layers made by diffing a filesystem never need one.
//!
//! Whiteouts: `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties its
//! directory; both act before the layer's own files (a second pass over the layer). Device
//! nodes and FIFOs are skipped (the container's `/dev` provides them); ownership and xattrs are
//! not kept (the files belong to whoever unpacks).
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The most file bytes all layers of one image may unpack to (a bound on the disk one image can
/// fill in the cache).
pub const MAX_UNPACKED_BYTES: u64 = 16 << 30;
/// The most entries all layers of one image may hold.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// The most bytes one layer's tar stream may have once decompressed (headers, long names and
/// padding included: a gzip bomb ends here).
pub const MAX_TAR_BYTES: u64 = 2 * MAX_UNPACKED_BYTES;
/// The longest entry or link name (Linux's PATH_MAX).
pub const MAX_NAME_BYTES: usize = 4096;
/// The most directories an entry may sit under (it bounds the tree's depth, so a whiteout's
/// recursive removal holds at most this many directory fds).
pub const MAX_DEPTH: usize = 128;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// One entry of the layer: its name (escaped onto one line) and what is wrong with it.
    #[error("entry {entry}: {why}")]
    Entry { entry: String, why: String },
    #[error("not a tar layer: {0}")]
    Tar(String),
    #[error("{0}")]
    Io(String),
}

/// What is left of an image's allowance ([`MAX_UNPACKED_BYTES`], [`MAX_ENTRIES`]), shared by its
/// layers.
#[derive(Debug, Clone)]
pub struct Budget {
    pub bytes: u64,
    pub entries: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { bytes: MAX_UNPACKED_BYTES, entries: MAX_ENTRIES }
    }
}

/// The rootfs being unpacked into: a directory fd every entry is resolved beneath.
#[derive(Debug)]
pub struct Rootfs {
    fd: OwnedFd,
}

impl Rootfs {
    /// Opens an existing directory (the caller's, trusted path) as the root of the unpacking.
    pub fn open(dir: &Path) -> Result<Rootfs, LayerError> {
        let f = File::open(dir).map_err(|e| LayerError::Io(format!("{}: {e}", dir.display())))?;
        if !f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(LayerError::Io(format!("{}: not a directory", dir.display())));
        }
        Ok(Rootfs { fd: f.into() })
    }
}

/// Applies one layer blob (plain tar, or gzip by its magic) to `root`: whiteouts first, then
/// the entries. Stops at the first refused entry (the rootfs is then half made: throw it away).
pub fn apply<R: Read + Seek>(root: &Rootfs, blob: &mut R, budget: &mut Budget) -> Result<(), LayerError> {
    // Pass 1: names checked, entries counted, whiteouts applied.
    for_each(blob, |entry| {
        budget.entries = budget
            .entries
            .checked_sub(1)
            .ok_or_else(|| LayerError::Tar(format!("more than {MAX_ENTRIES} entries in the image (MAX_ENTRIES)")))?;
        let name = entry.path_bytes().into_owned();
        let at = |why: String| LayerError::Entry { entry: shown(&name), why };
        let comps = components(&name).map_err(at)?;
        match comps.last().map(|c| c.to_bytes()).and_then(|c| c.strip_prefix(WHITEOUT)) {
            Some(OPAQUE) => opaque(root, &comps[..comps.len() - 1]).map_err(at),
            // Other `.wh..wh.*` names are aufs bookkeeping, not whiteouts.
            Some(hidden) if hidden.starts_with(WHITEOUT) => Ok(()),
            Some(hidden) => whiteout(root, &comps[..comps.len() - 1], hidden).map_err(at),
            None => Ok(()),
        }
    })?;
    // Pass 2: everything but the whiteouts; directory modes last (a read-only directory must
    // still take the entries under it).
    let mut dir_modes = Vec::new();
    for_each(blob, |entry| {
        let name = entry.path_bytes().into_owned();
        let at = |why: String| LayerError::Entry { entry: shown(&name), why };
        let comps = components(&name).map_err(at)?;
        if comps.last().is_some_and(|c| c.to_bytes().starts_with(WHITEOUT)) {
            return Ok(());
        }
        unpack(root, &comps, entry, budget, &mut dir_modes).map_err(at)
    })?;
    for (comps, mode) in dir_modes.iter().rev() {
        // A later entry of the layer may have replaced the directory (by a file or a symlink,
        // never followed): then there is nothing to set.
        if let Ok(Some(d)) = open_dir(root, comps, false) {
            fchmod(&d, *mode).map_err(|why| LayerError::Entry { entry: shown(&join(comps)), why })?;
        }
    }
    Ok(())
}

/// Runs `f` on each entry of the blob's tar stream (decompressed), from its start.
fn for_each<R: Read + Seek>(
    blob: &mut R,
    mut f: impl FnMut(&mut tar::Entry<'_, Capped<Box<dyn Read + '_>>>) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    let io = |e: std::io::Error| LayerError::Io(format!("reading the layer: {e}"));
    blob.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut magic = [0u8; 2];
    let n = blob.read(&mut magic).map_err(io)?;
    blob.seek(SeekFrom::Start(0)).map_err(io)?;
    // Media types lie often enough (docker's own types): trust the gzip magic.
    let stream: Box<dyn Read + '_> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(&mut *blob))
    } else {
        Box::new(&mut *blob)
    };
    let mut archive = tar::Archive::new(Capped { inner: stream, left: MAX_TAR_BYTES });
    let entries = archive.entries().map_err(|e| LayerError::Tar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| LayerError::Tar(e.to_string()))?;
        f(&mut entry)?;
    }
    Ok(())
}

/// A reader that fails past `left` bytes.
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            return Err(std::io::Error::other(format!("the tar stream is over {MAX_TAR_BYTES} bytes (MAX_TAR_BYTES)")));
        }
        let max = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A name as it appears in errors: lossy UTF-8 with control characters escaped (one line).
fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).escape_debug().to_string()
}

fn join(comps: &[CString]) -> Vec<u8> {
    comps.iter().map(|c| c.to_bytes()).collect::<Vec<_>>().join(&b'/')
}

/// A layer name's components: relative, `.` dropped, one trailing `/` allowed; absolute names,
/// `..`, empty components (`a//b`) and NULs are refused. Empty for the root itself (`./`).
fn components(name: &[u8]) -> Result<Vec<CString>, String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("name longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.starts_with(b"/") {
        return Err("absolute name (layer names are relative to the rootfs)".into());
    }
    let name = name.strip_suffix(b"/").unwrap_or(name);
    let mut out = Vec::new();
    if name.is_empty() {
        return Ok(out);
    }
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" => return Err("empty path component".into()),
            b"." => {}
            b".." => return Err("`..` in the name".into()),
            c => out.push(CString::new(c).map_err(|_| "NUL in the name".to_string())?),
        }
    }
    if out.len() > MAX_DEPTH + 1 {
        return Err(format!("more than {MAX_DEPTH} directories deep"));
    }
    Ok(out)
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The directory `name` directly under `dir`, never through a symlink or out of `dir`.
fn openat_dir(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH
            | libc::RESOLVE_NO_SYMLINKS
            | libc::RESOLVE_NO_MAGICLINKS
            | libc::RESOLVE_NO_XDEV,
    };
    // SAFETY: `name` is a NUL-terminated string and `how` a live open_how of the size passed;
    // the kernel reads both and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir, name.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>())
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens the directory `comps` under the root, one name at a time. Missing directories are made
/// (0755) when `create`, else the answer is None. A symlink or file on the way is an error.
fn open_dir(root: &Rootfs, comps: &[CString], create: bool) -> Result<Option<OwnedFd>, String> {
    // SAFETY: dup of an fd we own; the kernel returns a new fd or -1.
    let fd = unsafe { libc::fcntl(root.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("dup: {}", errno()));
    }
    // SAFETY: a new fd that nothing else owns.
    let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
    for (i, c) in comps.iter().enumerate() {
        let next = match openat_dir(cur.as_raw_fd(), c) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                // SAFETY: NUL-terminated name, directory fd we own.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) } < 0 {
                    let e = errno();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(format!("{}: creating it: {e}", shown(&join(&comps[..=i]))));
                    }
                }
                openat_dir(cur.as_raw_fd(), c)
            }
            r => r,
        };
        cur = match next {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => {
                let what = match lstat(&cur, c) {
                    Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                        "is a symbolic link (not followed: a layer entry's directories must be directories)".into()
                    }
                    Ok(Some(st)) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => "is not a directory".into(),
                    _ => e.to_string(),
                };
                return Err(format!("{} {what}", shown(&join(&comps[..=i]))));
            }
        };
    }
    Ok(Some(cur))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; None when there is nothing by that name.
fn lstat(dir: &OwnedFd, name: &CStr) -> std::io::Result<Option<libc::stat>> {
    // SAFETY: all-zero is a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name, a live out-pointer, a directory fd we own.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        Ok(Some(st))
    } else {
        let e = errno();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

fn fchmod(fd: &OwnedFd, mode: u32) -> Result<(), String> {
    // SAFETY: an fd we own; no memory is passed.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) } < 0 {
        return Err(format!("chmod: {}", errno()));
    }
    Ok(())
}

/// Removes `name` under `dir`, a directory with all it holds; nothing there is fine.
fn remove(dir: &OwnedFd, name: &CStr, depth: usize) -> Result<(), String> {
    let Some(st) = lstat(dir, name).map_err(|e| e.to_string())? else { return Ok(()) };
    let mut flags = 0;
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        if depth > MAX_DEPTH + 1 {
            return Err(format!("a directory more than {MAX_DEPTH} deep"));
        }
        let sub = openat_dir(dir.as_raw_fd(), name).map_err(|e| e.to_string())?;
        remove_children(&sub, depth + 1)?;
        flags = libc::AT_REMOVEDIR;
    }
    // SAFETY: NUL-terminated name, a directory fd we own.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } < 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(format!("removing it: {e}"));
        }
    }
    Ok(())
}

/// Removes everything in the directory `dir`.
fn remove_children(dir: &OwnedFd, depth: usize) -> Result<(), String> {
    for name in list(dir)? {
        remove(dir, &name, depth).map_err(|e| format!("{}: {e}", shown(name.to_bytes())))?;
    }
    Ok(())
}

/// The names in directory `dir` (without `.` and `..`), read through a duplicate of its fd.
fn list(dir: &OwnedFd) -> Result<Vec<CString>, String> {
    // SAFETY: dup of an fd we own; the kernel returns a new fd or -1.
    let fd = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("dup: {}", errno()));
    }
    // SAFETY: fdopendir takes ownership of the new fd (closed by closedir below, or here on
    // failure) and reads from its start.
    let d = unsafe {
        libc::lseek(fd, 0, libc::SEEK_SET);
        libc::fdopendir(fd)
    };
    if d.is_null() {
        let e = errno();
        // SAFETY: fdopendir failed, so the fd is still ours to close.
        unsafe { libc::close(fd) };
        return Err(format!("listing: {e}"));
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: `d` is a live DIR stream, used by this thread only.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it is copied
        // before the next readdir call.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: `d` is live and not used after this.
    unsafe { libc::closedir(d) };
    Ok(names)
}

/// `.wh.HIDDEN` under `parent`: removes HIDDEN from the layers below.
fn whiteout(root: &Rootfs, parent: &[CString], hidden: &[u8]) -> Result<(), String> {
    if hidden.is_empty() || hidden == b"." || hidden == b".." {
        return Err("a whiteout of `.`, `..` or nothing".into());
    }
    let hidden = CString::new(hidden).map_err(|_| "NUL in the name".to_string())?;
    match open_dir(root, parent, false)? {
        Some(dir) => remove(&dir, &hidden, parent.len() + 1),
        None => Ok(()), // nothing below to hide
    }
}

/// `.wh..wh..opq` in `parent`: empties it of what the layers below put there.
fn opaque(root: &Rootfs, parent: &[CString]) -> Result<(), String> {
    match open_dir(root, parent, false)? {
        Some(dir) => remove_children(&dir, parent.len() + 1),
        None => Ok(()),
    }
}

/// Makes room for a new `name` in `dir`: whatever is there goes (a layer replaces it), unless it
/// is a directory and `keep_dir`. Whether a directory was kept.
fn replace(dir: &OwnedFd, name: &CStr, keep_dir: bool, depth: usize) -> Result<bool, String> {
    match lstat(dir, name).map_err(|e| e.to_string())? {
        Some(st) if keep_dir && st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(true),
        Some(_) => remove(dir, name, depth).map(|()| false),
        None => Ok(false),
    }
}

/// Creates one (non-whiteout) entry.
fn unpack<R: Read>(
    root: &Rootfs,
    comps: &[CString],
    entry: &mut tar::Entry<'_, R>,
    budget: &mut Budget,
    dir_modes: &mut Vec<(Vec<CString>, u32)>,
) -> Result<(), String> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    let mode = entry.header().mode().map_err(|e| format!("mode: {e}"))?;
    let Some((name, parent)) = comps.split_last() else {
        // The root itself (`./`): its mode is the cache's business, not the image's.
        return if kind.is_dir() { Ok(()) } else { Err("not a directory, yet named like the root".into()) };
    };
    let depth = comps.len();
    match kind {
        T::Directory => {
            let dir = open_dir(root, parent, true)?.ok_or("its directory vanished")?;
            if !replace(&dir, name, true, depth)? {
                // SAFETY: NUL-terminated name, a directory fd we own.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } < 0 {
                    return Err(format!("mkdir: {}", errno()));
                }
            }
            dir_modes.push((comps.to_vec(), mode));
            Ok(())
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let size = entry.size();
            if size > budget.bytes {
                return Err(format!("the image unpacks to over {MAX_UNPACKED_BYTES} bytes (MAX_UNPACKED_BYTES)"));
            }
            let dir = open_dir(root, parent, true)?.ok_or("its directory vanished")?;
            replace(&dir, name, false, depth)?;
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: NUL-terminated name, a directory fd we own; O_EXCL: a new file, never
            // something (a symlink) already there.
            let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600) };
            if fd < 0 {
                return Err(format!("creating it: {}", errno()));
            }
            // SAFETY: a new fd that nothing else owns.
            let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            // What the entry really yields (sparse files) is counted, not its header.
            let copied = std::io::copy(&mut Read::take(&mut *entry, budget.bytes + 1), &mut file)
                .map_err(|e| format!("writing it: {e}"))?;
            if copied > budget.bytes {
                return Err(format!("the image unpacks to over {MAX_UNPACKED_BYTES} bytes (MAX_UNPACKED_BYTES)"));
            }
            budget.bytes -= copied;
            file.flush().map_err(|e| format!("writing it: {e}"))?;
            fchmod(&file.into(), mode)
        }
        T::Symlink => {
            let target = entry.link_name_bytes().ok_or("a symlink without a target")?;
            if target.is_empty() {
                return Err("a symlink without a target".into());
            }
            let target = CString::new(target.into_owned()).map_err(|_| "NUL in the link target".to_string())?;
            let dir = open_dir(root, parent, true)?.ok_or("its directory vanished")?;
            replace(&dir, name, false, depth)?;
            // SAFETY: NUL-terminated strings, a directory fd we own. The target is only data
            // here (resolved by the guest, inside its own root).
            if unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } < 0 {
                return Err(format!("symlink: {}", errno()));
            }
            Ok(())
        }
        T::Link => {
            let target = entry.link_name_bytes().ok_or("a hard link without a target")?.into_owned();
            let tcomps = components(&target).map_err(|e| format!("hard link target {}: {e}", shown(&target)))?;
            let Some((tname, tparent)) = tcomps.split_last() else {
                return Err("a hard link to the root".into());
            };
            let missing = || format!("hard link target {} is not in the rootfs", shown(&target));
            let tdir = open_dir(root, tparent, false).map_err(|e| format!("hard link target: {e}"))?;
            let tdir = tdir.ok_or_else(missing)?;
            let st = lstat(&tdir, tname).map_err(|e| format!("hard link target: {e}"))?.ok_or_else(missing)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(format!("hard link target {} is a directory", shown(&target)));
            }
            let dir = open_dir(root, parent, true)?.ok_or("its directory vanished")?;
            if let Some(old) = lstat(&dir, name).map_err(|e| e.to_string())? {
                if (old.st_dev, old.st_ino) == (st.st_dev, st.st_ino) {
                    return Ok(()); // already that file
                }
            }
            replace(&dir, name, false, depth)?;
            // SAFETY: NUL-terminated names, directory fds we own; flags 0: a symlink target is
            // linked itself, never followed.
            if unsafe { libc::linkat(tdir.as_raw_fd(), tname.as_ptr(), dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
                return Err(format!("hard link: {}", errno()));
            }
            Ok(())
        }
        // Device nodes come from the container's /dev, never from an image; pax/GNU headers the
        // tar reader did not fold in are metadata.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let c = |n: &str| components(n.as_bytes()).map(|v| join(&v));
        assert_eq!(c("./a/./b/").unwrap(), b"a/b");
        assert_eq!(c("./").unwrap(), b"");
        for bad in ["/etc/passwd", "a/../b", "..", "a//b", "a\0b"] {
            assert!(c(bad).is_err(), "{bad:?}");
        }
        assert!(c(&"a/".repeat(MAX_DEPTH + 2)).is_err());
        assert!(c(&"a".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        let mut r = Capped { inner: std::io::repeat(0), left: 10 };
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), 10);
        assert!(r.read(&mut buf).unwrap_err().to_string().contains("MAX_TAR_BYTES"));
        let mut r = Capped { inner: &b"0123456789"[..], left: 10 };
        assert_eq!(r.read(&mut buf).unwrap(), 10);
        assert_eq!(r.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn budget_counts_entries_and_bytes_across_layers() {
        let d = tempfile::tempdir().unwrap();
        let root = Rootfs::open(d.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..3 {
            let mut h = tar::Header::new_gnu();
            h.set_size(100);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("f{i}"), &[7u8; 100][..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut budget = Budget { bytes: 1000, entries: 3 };
        apply(&root, &mut std::io::Cursor::new(&tar), &mut budget).unwrap();
        assert_eq!((budget.bytes, budget.entries), (700, 0));
        let e = apply(&root, &mut std::io::Cursor::new(&tar), &mut budget).unwrap_err().to_string();
        assert!(e.contains("MAX_ENTRIES"), "{e}");
        let mut budget = Budget { bytes: 250, entries: 10 };
        let e = apply(&root, &mut std::io::Cursor::new(&tar), &mut budget).unwrap_err().to_string();
        assert!(e.contains("entry f2") && e.contains("MAX_UNPACKED_BYTES"), "{e}");
    }
}
