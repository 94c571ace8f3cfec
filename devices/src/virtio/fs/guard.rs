//! [`Guarded`]: the passthrough file system behind a policy layer that sees every request after
//! fuse-backend-rs parsed it (so the guest cannot change a value after it was checked).
//!
//! - No device nodes: MKNOD of a block or char device and RENAME_WHITEOUT (which leaves a 0:0
//!   char device) get EPERM.
//! - No setuid/setgid: S_ISUID and S_ISGID are cleared from every mode the guest sets (MKNOD,
//!   MKDIR, CREATE, SETATTR). The server runs as root and creates files with the guest's uid/gid,
//!   so this is what keeps a guest root from leaving a setuid-root binary for host users. The
//!   ownership itself is kept as the guest asks: without those bits a file owned by any uid grants
//!   nothing its owner did not already have (and chown(2) clears both bits anyway).
//! - No privileged xattrs: `security.*` (file capabilities) and `trusted.*` are refused with
//!   EPERM, should xattrs ever be turned on (they are off: fuse-backend-rs answers ENOSYS).
//! - Caps on held inodes and handles ([`FsLimits`]): each costs the VMM an fd. Past a cap the
//!   guest gets ENFILE. The layer mirrors the lookup counts fuse-backend-rs keeps (every returned
//!   entry is one reference, FORGET drops them), so FORGET and RELEASE give slots back.
use super::FsLimits;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// FUSE's root node id; fuse-backend-rs never forgets it, so it is not counted.
const ROOT_ID: u64 = 1;
/// Mode bits a guest may not set on the host.
const PRIVILEGE_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

#[derive(Default)]
struct Held {
    /// Node id -> lookup count, for every node the guest holds but the root.
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
}

pub(super) struct Guarded {
    inner: PassthroughFs,
    limits: FsLimits,
    held: Mutex<Held>,
}

impl Guarded {
    pub(super) fn new(inner: PassthroughFs, limits: FsLimits) -> Guarded {
        Guarded { inner, limits, held: Mutex::new(Held::default()) }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a request that makes a new node: ENFILE at the inode cap.
    fn room_for_inode(&self) -> io::Result<()> {
        if self.held().inodes.len() >= self.limits.max_inodes {
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    /// Before a request that opens a handle: ENFILE at the handle cap.
    fn room_for_handle(&self) -> io::Result<()> {
        if self.held().handles.len() >= self.limits.max_handles {
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    /// Counts one more reference to the node of `entry`.
    fn hold(&self, entry: &Entry) {
        if entry.inode != 0 && entry.inode != ROOT_ID {
            *self.held().inodes.entry(entry.inode).or_insert(0) += 1;
        }
    }

    /// Counts the reference `entry` carries if the node is held already or fits under the cap;
    /// otherwise drops the reference again and answers ENFILE.
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if entry.inode == 0 || entry.inode == ROOT_ID {
            return Ok(entry);
        }
        let mut held = self.held();
        if let Some(n) = held.inodes.get_mut(&entry.inode) {
            *n += 1;
            return Ok(entry);
        }
        if held.inodes.len() >= self.limits.max_inodes {
            drop(held);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(err(libc::ENFILE));
        }
        held.inodes.insert(entry.inode, 1);
        Ok(entry)
    }

    fn drop_refs(&self, inode: u64, count: u64) {
        let mut held = self.held();
        if let Some(n) = held.inodes.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.inodes.remove(&inode);
            }
        }
    }

    fn opened(&self, handle: Option<u64>) {
        if let Some(h) = handle {
            self.held().handles.insert(h);
        }
    }
}

/// Whether MKNOD may make a node of this type on the host: no block or char devices.
pub(super) fn mknod_allowed(mode: u32) -> bool {
    !matches!(mode & libc::S_IFMT, libc::S_IFBLK | libc::S_IFCHR)
}

impl FileSystem for Guarded {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy();
        *self.held() = Held::default();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.drop_refs(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(inode, count) in &requests {
            self.drop_refs(inode, count);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode &= !PRIVILEGE_BITS;
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.room_for_inode()?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.hold(&entry);
        Ok(entry)
    }

    fn mknod(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        if !mknod_allowed(mode) {
            return Err(err(libc::EPERM));
        }
        self.room_for_inode()?;
        let entry = self.inner.mknod(ctx, parent, name, mode & !PRIVILEGE_BITS, rdev, umask)?;
        self.hold(&entry);
        Ok(entry)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.room_for_inode()?;
        let entry = self.inner.mkdir(ctx, parent, name, mode & !PRIVILEGE_BITS, umask)?;
        self.hold(&entry);
        Ok(entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(err(libc::EPERM));
        }
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        // A hard link is one more reference to a node that may not be held yet.
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.room_for_handle()?;
        let r = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.opened(r.0);
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.room_for_inode()?;
        self.room_for_handle()?;
        args.mode &= !PRIVILEGE_BITS;
        let r = self.inner.create(ctx, parent, name, args)?;
        self.hold(&r.0);
        self.opened(r.1);
        Ok(r)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, flags, fuse_flags)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(&self, ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.held().handles.remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(&self, ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        let n = name.to_bytes();
        if n.starts_with(b"security.") || n.starts_with(b"trusted.") {
            return Err(err(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        self.room_for_handle()?;
        let r = self.inner.opendir(ctx, inode, flags)?;
        self.opened(r.0);
        Ok(r)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Every entry sent carries a reference. At the cap an entry for a node not held yet is
        // declined as if the buffer were full (fuse-backend-rs then drops its reference); a
        // reply that could not carry even one entry becomes ENFILE rather than a silent EOF.
        let (mut sent, mut declined) = (0usize, false);
        self.inner.readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
            if entry.inode != 0 && entry.inode != ROOT_ID {
                let held = self.held();
                if !held.inodes.contains_key(&entry.inode) && held.inodes.len() >= self.limits.max_inodes {
                    declined = true;
                    return Ok(0);
                }
            }
            let n = add_entry(dir_entry, entry)?;
            if n > 0 {
                self.hold(&entry);
                sent += 1;
            }
            Ok(n)
        })?;
        if sent == 0 && declined {
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.held().handles.remove(&handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
