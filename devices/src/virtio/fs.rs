//! virtio-fs: one host directory shared with the guest over FUSE, served in-process by
//! fuse-backend-rs' [`PassthroughFs`]. No DAX window (no shared memory region): file data always
//! travels through the request queues.
//!
//! Queues: 0 is the high-priority queue (FORGET, INTERRUPT), 1 the single request queue. Both
//! carry FUSE messages and are served the same way.
//!
//! What the guest sends is untrusted. Every request chain is checked before it reaches the FUSE
//! server: the FUSE in_header must be present and its `len` must fit in the readable part of the
//! chain, and the opcode must be one FUSE defines. Requests that fail these checks, or that the
//! server rejects, are counted with [`ErrorCounter`] and completed with whatever reply was written
//! (an error reply when the device could write one, otherwise 0 bytes); the device keeps serving.
//! Only a broken ring (bad available index) or a panic inside the FUSE server marks the device
//! broken; [`VirtioDevice::reset`] then rebuilds the server with a fresh passthrough file system.
//!
//! Confinement: the guest reaches only what [`PassthroughFs`] resolves below the shared directory:
//! lookups use `openat(O_NOFOLLOW)` relative to directory fds, names containing `/` are
//! rejected, `..` from the root resolves to the root, and symlinks are never followed on the host
//! (the guest resolves them itself; opening a symlink inode fails).
//!
//! Read-only shares are enforced here, before dispatch: the opcode is peeked from the chain (without
//! consuming it) and every request in [`READ_ONLY_DENIED`], as well as OPEN/OPENDIR asking for
//! write access, truncation or creation (see [`open_modifies`]), is answered with `EROFS` without
//! reaching the passthrough file system.
use super::{
    read_config_bytes, DeviceError, DeviceResult, ErrorCounter, Interrupt, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OpenIn, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use std::io::Write;
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
mod guard;
mod names;
use guard::Guarded;
use names::check_names;
use std::path::{Path, PathBuf};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, Bytes, GuestMemoryMmap};

pub const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
/// Bytes of the tag field in the device configuration (virtio 1.2, 5.11.4).
pub const TAG_BYTES: usize = 36;
const CONFIG_BYTES: usize = TAG_BYTES + 4;
const DEVICE: &str = "virtio-fs";

const IN_HEADER_BYTES: usize = size_of::<InHeader>();
const OUT_HEADER_BYTES: usize = size_of::<OutHeader>();

/// FUSE_TMPFILE (Linux 6.3+); fuse-backend-rs 0.14 does not know it (answers ENOSYS).
const OPCODE_TMPFILE: u32 = 51;
/// Whether Linux's FUSE defines `opcode` (up to FUSE_STATX = 52; 7 and 19 were never used).
/// Defined opcodes the server does not implement (COPY_FILE_RANGE, SYNCFS, TMPFILE, STATX) get
/// ENOSYS from it without being counted as guest errors: a normal Linux guest sends them and
/// falls back.
fn fuse_defines(opcode: u32) -> bool {
    matches!(opcode, 1..=6 | 8..=18 | 20..=52)
}

/// Requests refused with EROFS on a read-only share: everything that creates, removes, renames or
/// changes a file, its data, size, times, mode, owner or extended attributes.
pub const READ_ONLY_DENIED: &[u32] = &[
    Opcode::Setattr as u32,
    Opcode::Symlink as u32,
    Opcode::Mknod as u32,
    Opcode::Mkdir as u32,
    Opcode::Unlink as u32,
    Opcode::Rmdir as u32,
    Opcode::Rename as u32,
    Opcode::Link as u32,
    Opcode::Write as u32,
    Opcode::Setxattr as u32,
    Opcode::Removexattr as u32,
    Opcode::Create as u32,
    Opcode::Fallocate as u32,
    Opcode::Rename2 as u32,
    Opcode::CopyFileRange as u32,
    OPCODE_TMPFILE,
];

/// OPEN/OPENDIR flags refused on a read-only share: any access mode but O_RDONLY, or O_TRUNC or
/// O_CREAT (a Linux guest never sends O_CREAT in OPEN; CREATE is its own opcode).
pub fn open_modifies(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("share: tag {0:?}: must be 1 to 36 bytes without NUL")]
    Tag(String),
    #[error("share: {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("share: {0}: not a directory")]
    NotDir(PathBuf),
    #[error("share: {0}: path is not valid UTF-8 or contains NUL")]
    Path(PathBuf),
    #[error("share: {0}: passthrough file system: {1}")]
    Passthrough(PathBuf, std::io::Error),
}

/// Caps on what one guest can make the device hold open on the host: every looked-up inode keeps
/// an `O_PATH` fd and every open file or directory one more. Past a cap the guest gets ENFILE;
/// FORGET and RELEASE/RELEASEDIR give entries back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsLimits {
    /// Inodes the guest holds a lookup reference to (the root is not counted).
    pub max_inodes: usize,
    /// Open file and directory handles.
    pub max_handles: usize,
}

impl Default for FsLimits {
    /// 64 Ki inodes and 16 Ki handles: far above what a container workload keeps cached, and
    /// together below a VMM's RLIMIT_NOFILE of 128 Ki.
    fn default() -> Self {
        FsLimits { max_inodes: 64 * 1024, max_handles: 16 * 1024 }
    }
}

pub struct Fs {
    tag: String,
    /// The canonical shared directory.
    dir: PathBuf,
    read_only: bool,
    server: Server<Guarded>,
    /// A driver ran on this server since it was built: a reset must build a fresh one.
    used: bool,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    errors: ErrorCounter,
    limits: FsLimits,
    /// Where requests with names are copied after their check (see [`names`]).
    snapshot: names::Snapshot,
    /// Requests handed to the FUSE server (tests check what never reaches it).
    dispatched: std::sync::atomic::AtomicU64,
}

/// What a request chain turned into.
enum Outcome {
    /// Bytes written to the guest (the used length).
    Used(u32),
    /// The FUSE server panicked: its state can no longer be trusted.
    Panicked(DeviceError),
}

thread_local! {
    /// Whether this thread has an fs struct (cwd, root, umask) of its own; `None` until tried.
    static PRIVATE_FS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Gives the calling thread its own fs struct, once per thread (`unshare(CLONE_FS)`), so that the
/// umask fuse-backend-rs needs at 0 is that thread's alone: the umask is otherwise shared by
/// the whole process, and the shim or CLI creating files meanwhile would make them
/// world-writable. False when the kernel (or a seccomp filter) refuses; the device then serves
/// nothing rather than touch the process umask.
fn private_fs() -> bool {
    PRIVATE_FS.with(|p| {
        if let Some(done) = p.get() {
            return done;
        }
        // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask from the rest of
        // the process; it takes no pointers.
        let done = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
        if !done {
            tracing::error!("{DEVICE}: unshare(CLONE_FS): {}; not serving", std::io::Error::last_os_error());
        }
        p.set(Some(done));
        done
    })
}

/// Holds this thread's umask at 0 while fuse-backend-rs runs: it applies the guest's umask
/// itself (and sets 0 on INIT/DESTROY anyway). Only on a thread that passed [`private_fs`].
struct ThreadUmaskZero(libc::mode_t);

impl ThreadUmaskZero {
    fn enter() -> ThreadUmaskZero {
        // SAFETY: umask swaps the calling thread's (private, see `private_fs`) creation mask;
        // it cannot fail.
        ThreadUmaskZero(unsafe { libc::umask(0) })
    }
}

impl Drop for ThreadUmaskZero {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

/// The passthrough file system for `dir`, behind the policy layer. The root is imported on INIT,
/// on the serving thread (import sets that thread's umask to 0).
fn build_server(dir: &Path, limits: FsLimits) -> Result<Server<Guarded>, FsError> {
    let root_dir = match dir.to_str() {
        Some(s) if !s.contains('\0') => s.to_string(),
        _ => return Err(FsError::Path(dir.into())),
    };
    let cfg = Config {
        root_dir,
        cache_policy: CachePolicy::Auto,
        writeback: false,
        xattr: false,
        do_import: true,
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        inode_file_handles: false,
        dax_file_size: None,
        ..Default::default()
    };
    let fs: PassthroughFs = PassthroughFs::new(cfg).map_err(|e| FsError::Passthrough(dir.into(), e))?;
    Ok(Server::new(Guarded::new(fs, limits)))
}

impl Fs {
    /// Shares `dir` under `tag` (1..=36 bytes, no NUL). `read_only` rejects every modifying
    /// request with EROFS before it reaches the passthrough file system.
    ///
    /// The thread that serves requests gets an fs struct of its own on its first request
    /// (`unshare(CLONE_FS)`; a seccomp filter on that thread must allow it): fuse-backend-rs needs
    /// the umask at 0 while it runs, and only that thread's is.
    pub fn new(tag: &str, dir: &Path, read_only: bool) -> Result<Fs, FsError> {
        Fs::with_limits(tag, dir, read_only, FsLimits::default())
    }

    /// [`Fs::new`] with explicit caps on inodes and handles.
    pub fn with_limits(tag: &str, dir: &Path, read_only: bool, limits: FsLimits) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_BYTES || tag.contains('\0') {
            return Err(FsError::Tag(tag.into()));
        }
        let md = std::fs::metadata(dir).map_err(|e| FsError::Dir(dir.into(), e))?;
        if !md.is_dir() {
            return Err(FsError::NotDir(dir.into()));
        }
        let canonical = dir.canonicalize().map_err(|e| FsError::Dir(dir.into(), e))?;
        let server = build_server(&canonical, limits)?;
        Ok(Fs {
            tag: tag.into(),
            dir: canonical.clone(),
            read_only,
            server,
            used: false,
            mem: None,
            queues: Vec::new(),
            errors: ErrorCounter::default(),
            limits,
            snapshot: names::Snapshot::new().map_err(|e| FsError::Passthrough(canonical.clone(), e))?,
            dispatched: Default::default(),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn config_bytes(&self) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_BYTES);
        c[..n].copy_from_slice(&tag[..n]);
        c[TAG_BYTES..].copy_from_slice(&1u32.to_le_bytes()); // num_request_queues
        c
    }

    /// Serves one request chain.
    fn handle(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Outcome {
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.errors.record(DEVICE, &format_args!("readable descriptors: {e}"));
                return Outcome::Used(0);
            }
        };
        let mut writer = match VirtioFsWriter::new(mem, chain.clone()) {
            Ok(w) => w,
            Err(e) => {
                self.errors.record(DEVICE, &format_args!("writable descriptors: {e}"));
                return Outcome::Used(0);
            }
        };
        let capacity = writer.available_bytes();

        // Peek at the request on a clone of the reader; the server gets the original.
        let mut peek = reader.clone();
        let header: InHeader = match peek.read_obj() {
            Ok(h) => h,
            Err(_) => {
                let have = reader.available_bytes();
                self.errors.record(DEVICE, &format_args!("request of {have} bytes has no FUSE in_header"));
                return Outcome::Used(0);
            }
        };
        let len = header.len as usize;
        if len < IN_HEADER_BYTES || len > reader.available_bytes() {
            let have = reader.available_bytes();
            self.errors.record(
                DEVICE,
                &format_args!("opcode {}: in_header.len {len} outside {IN_HEADER_BYTES}..={have}", header.opcode),
            );
            return Outcome::Used(reply_error(&mut writer, header.unique, libc::EINVAL));
        }
        if !fuse_defines(header.opcode) {
            self.errors.record(DEVICE, &format_args!("unknown FUSE opcode {}", header.opcode));
            return Outcome::Used(reply_error(&mut writer, header.unique, libc::ENOSYS));
        }
        if self.read_only {
            let deny = if READ_ONLY_DENIED.contains(&header.opcode) {
                true
            } else if header.opcode == Opcode::Open as u32 || header.opcode == Opcode::Opendir as u32 {
                match peek.read_obj::<OpenIn>() {
                    Ok(open) => open_modifies(open.flags),
                    Err(_) => {
                        self.errors.record(DEVICE, &format_args!("opcode {}: request too short", header.opcode));
                        return Outcome::Used(reply_error(&mut writer, header.unique, libc::EINVAL));
                    }
                }
            } else {
                false
            };
            if deny {
                return Outcome::Used(reply_error(&mut writer, header.unique, libc::EROFS));
            }
        }

        // Requests with names: checked, then served from a private copy of what was checked.
        let mut body = reader.clone();
        let reader = match body
            .read_obj::<InHeader>()
            .map_err(|e| names::NameError::Read(e.to_string()))
            .and_then(|_| check_names(header.opcode, &mut body, len - IN_HEADER_BYTES))
        {
            Ok(None) => reader,
            Ok(Some(checked)) => {
                let mut request = header.as_slice().to_vec();
                request.extend_from_slice(&checked);
                match self.snapshot.reader(&request) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("{DEVICE}: request copy: {e}");
                        return Outcome::Used(reply_error(&mut writer, header.unique, libc::EIO));
                    }
                }
            }
            Err(e) => {
                self.errors.record(DEVICE, &format_args!("opcode {}: {e}", header.opcode));
                return Outcome::Used(reply_error(&mut writer, header.unique, e.errno()));
            }
        };
        if !private_fs() {
            return Outcome::Used(reply_error(&mut writer, header.unique, libc::EPERM));
        }

        // Clear where the reply header goes, so that after a failed request we can tell whether
        // the server wrote a reply (see `written_reply`). A clone writes without moving `writer`.
        if capacity >= OUT_HEADER_BYTES {
            let _ = writer.clone().write_all(OutHeader::default().as_slice());
        }
        self.dispatched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = {
            let _umask = ThreadUmaskZero::enter();
            catch_unwind(AssertUnwindSafe(|| self.server.handle_message(reader, writer.into(), None, None)))
        };
        match result {
            Ok(Ok(n)) => Outcome::Used(u32::try_from(n.min(capacity)).unwrap_or(u32::MAX)),
            Ok(Err(e)) => {
                self.errors.record(DEVICE, &format_args!("opcode {}: {e}", header.opcode));
                Outcome::Used(written_reply(mem, &chain, header.unique, capacity))
            }
            Err(_) => Outcome::Panicked(DeviceError::FuseServerPanic { opcode: header.opcode }),
        }
    }

    fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        index: u16,
        irq: &mut dyn Interrupt,
    ) -> DeviceResult {
        let mut used_any = false;
        // One pass over what is available now: the driver notifies again for later requests.
        // Heads are collected first because the iterator borrows the queue.
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(source) => return Err(DeviceError::AvailableRing { queue: "request", source }),
        };
        let mut fatal = None;
        for chain in chains {
            let head = chain.head_index();
            let len = match self.handle(mem, chain) {
                Outcome::Used(n) => n,
                Outcome::Panicked(why) => {
                    fatal = Some(why);
                    0
                }
            };
            queue.add_used(mem, head, len).map_err(|source| DeviceError::UsedRing { queue: "request", source })?;
            used_any = true;
            if fatal.is_some() {
                break;
            }
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            irq.queue(index);
        }
        fatal.map_or(Ok(()), Err)
    }
}

/// Writes a FUSE reply that carries only an error; returns the bytes written (0 when the chain
/// has no room for it).
fn reply_error(writer: &mut VirtioFsWriter<'_>, unique: u64, errno: i32) -> u32 {
    let header = OutHeader { len: OUT_HEADER_BYTES as u32, error: -errno, unique };
    match writer.write_all(header.as_slice()) {
        Ok(()) => OUT_HEADER_BYTES as u32,
        Err(_) => 0,
    }
}

/// After the server failed a request: the length of the reply it wrote before failing, if it
/// wrote one (a reply header for this request with a plausible length), else 0.
fn written_reply(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    capacity: usize,
) -> u32 {
    let mut header = OutHeader::default();
    let buf = header.as_mut_slice();
    let mut got = 0;
    for desc in chain.clone().writable() {
        if got == buf.len() {
            break;
        }
        let n = (desc.len() as usize).min(buf.len() - got);
        if mem.read_slice(&mut buf[got..got + n], desc.addr()).is_err() {
            return 0;
        }
        got += n;
    }
    let len = header.len as usize;
    if got == OUT_HEADER_BYTES && header.unique == unique && (OUT_HEADER_BYTES..=capacity).contains(&len) {
        len as u32
    } else {
        0
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn pci_class(&self) -> u32 {
        0x01_8000 // mass storage, other
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, _features: u64) -> DeviceResult {
        if queues.len() != NUM_QUEUES {
            return Err(DeviceError::QueueCount { expected: NUM_QUEUES, got: queues.len() });
        }
        self.mem = Some(mem);
        self.queues = queues;
        self.used = true;
        Ok(())
    }
    fn queue_event(&mut self, index: usize, irq: &mut dyn Interrupt) -> DeviceResult {
        let Some(mem) = self.mem.clone() else { return Ok(()) };
        let Some(mut queue) = super::take_ready_queue(&mut self.queues, index)? else { return Ok(()) };
        let result = self.process(&mem, &mut queue, index as u16, irq);
        self.queues[index] = queue;
        result
    }
    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        // The reset of a driver's probe finds the server as built: nothing to drop.
        if !std::mem::take(&mut self.used) {
            return;
        }
        // A fresh passthrough file system: drops every inode and handle the previous driver
        // instance held (and any state a panic may have left behind).
        match build_server(&self.dir, self.limits) {
            Ok(server) => self.server = server,
            Err(e) => tracing::warn!("{DEVICE}: reset keeps the old file system: {e}"),
        }
    }
    fn errors(&self) -> u64 {
        self.errors.get()
    }
}

#[cfg(test)]
mod tests;
