//! Names in FUSE requests, checked before dispatch.
//!
//! fuse-backend-rs answers a name without its NUL with EINVAL too, but first logs the whole
//! request body (up to the 1 MiB chain) at error level, and a two-name request (RENAME, SYMLINK)
//! without its second NUL gets no reply at all. So every request that carries names is checked
//! here: each name must end with a NUL inside the request and be at most NAME_MAX bytes (a
//! symlink target PATH_MAX, an xattr value XATTR_SIZE_MAX). The checked bytes are then copied
//! to device-private memory ([`Snapshot`]) and the server parses that copy, so a guest that
//! rewrites the request after the check (from another vCPU) changes nothing.
use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, GetxattrIn, LinkIn, MkdirIn, MknodIn, Opcode, Rename2In, RenameIn, SetxattrIn,
};
use fuse_backend_rs::transport::Reader;
use std::io::Read;
use std::mem::size_of;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Longest name plus its NUL (NAME_MAX, XATTR_NAME_MAX).
const NAME_BYTES: usize = 256;
/// Longest symlink target plus its NUL (PATH_MAX).
const TARGET_BYTES: usize = 4096;
/// Largest xattr value (XATTR_SIZE_MAX).
const XATTR_VALUE_BYTES: usize = 64 * 1024;

/// What follows the fixed arguments of a request that carries names.
#[derive(Clone, Copy)]
enum Names {
    /// One name (most requests).
    One,
    /// A name then a symlink target.
    NameAndTarget,
    /// Two names (RENAME, RENAME2).
    Two,
    /// A name then the value (SETXATTR).
    NameAndValue,
}

/// The fixed argument size and names of `opcode`, if it carries names.
fn layout(opcode: u32) -> Option<(usize, Names)> {
    const LOOKUP: u32 = Opcode::Lookup as u32;
    const MKDIR: u32 = Opcode::Mkdir as u32;
    const MKNOD: u32 = Opcode::Mknod as u32;
    const CREATE: u32 = Opcode::Create as u32;
    const UNLINK: u32 = Opcode::Unlink as u32;
    const RMDIR: u32 = Opcode::Rmdir as u32;
    const RENAME: u32 = Opcode::Rename as u32;
    const RENAME2: u32 = Opcode::Rename2 as u32;
    const LINK: u32 = Opcode::Link as u32;
    const SYMLINK: u32 = Opcode::Symlink as u32;
    const SETXATTR: u32 = Opcode::Setxattr as u32;
    const GETXATTR: u32 = Opcode::Getxattr as u32;
    const REMOVEXATTR: u32 = Opcode::Removexattr as u32;
    Some(match opcode {
        LOOKUP | UNLINK | RMDIR | REMOVEXATTR => (0, Names::One),
        MKDIR => (size_of::<MkdirIn>(), Names::One),
        MKNOD => (size_of::<MknodIn>(), Names::One),
        CREATE => (size_of::<CreateIn>(), Names::One),
        LINK => (size_of::<LinkIn>(), Names::One),
        GETXATTR => (size_of::<GetxattrIn>(), Names::One),
        SYMLINK => (0, Names::NameAndTarget),
        RENAME => (size_of::<RenameIn>(), Names::Two),
        RENAME2 => (size_of::<Rename2In>(), Names::Two),
        SETXATTR => (size_of::<SetxattrIn>(), Names::NameAndValue),
        _ => return None,
    })
}

/// The most body bytes (after the in_header) any request with names may have.
pub(super) const MAX_BODY: usize = size_of::<MknodIn>() + NAME_BYTES + XATTR_VALUE_BYTES;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum NameError {
    #[error("request too short for its arguments")]
    Short,
    #[error("name without its NUL")]
    NoNul,
    #[error("name or value too long")]
    TooLong,
    #[error("request body unreadable: {0}")]
    Read(String),
}

impl NameError {
    pub(super) fn errno(&self) -> i32 {
        match self {
            NameError::TooLong => libc::ENAMETOOLONG,
            _ => libc::EINVAL,
        }
    }
}

/// Length of the NUL-terminated string at the start of `b`, NUL included, if it has one within
/// `max` bytes; `TooLong` if it goes on past `max`.
fn cstr_len(b: &[u8], max: usize) -> Result<usize, NameError> {
    match b.iter().take(max).position(|c| *c == 0) {
        Some(p) => Ok(p + 1),
        None if b.len() > max => Err(NameError::TooLong),
        None => Err(NameError::NoNul),
    }
}

/// Checks the names of a request whose body (`body_len` bytes after the in_header) `body`
/// reads. Returns the body when the opcode carries names (the server must then parse this
/// copy), `None` when it carries none.
pub(super) fn check_names(opcode: u32, body: &mut Reader<'_>, body_len: usize) -> Result<Option<Vec<u8>>, NameError> {
    let Some((fixed, names)) = layout(opcode) else { return Ok(None) };
    if body_len > MAX_BODY {
        return Err(NameError::TooLong);
    }
    let mut buf = vec![0u8; body_len];
    body.read_exact(&mut buf).map_err(|e| NameError::Read(e.to_string()))?;
    let rest = buf.get(fixed..).ok_or(NameError::Short)?;
    let first = cstr_len(rest, NAME_BYTES)?;
    let after = &rest[first..];
    match names {
        Names::One => {}
        Names::NameAndTarget => {
            cstr_len(after, TARGET_BYTES)?;
        }
        Names::Two => {
            cstr_len(after, NAME_BYTES)?;
        }
        Names::NameAndValue => {
            if after.len() > XATTR_VALUE_BYTES {
                return Err(NameError::TooLong);
            }
        }
    }
    Ok(Some(buf))
}

/// Why a checked request could not be copied into the snapshot (a device bug, not the guest's).
#[derive(Debug, thiserror::Error)]
pub(super) enum SnapshotError {
    #[error("request of {0} bytes is too long")]
    TooLong(usize),
    #[error("writing the copy: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("snapshot queue: {0}")]
    Queue(virtio_queue::Error),
    #[error("no chain in the snapshot queue")]
    NoChain,
    #[error("reading the copy: {0}")]
    Reader(fuse_backend_rs::transport::Error),
}

/// Device-private guest memory holding a copy of one checked request, with a one-descriptor
/// split queue around it so fuse-backend-rs' [`Reader`] can read it like any request.
pub(super) struct Snapshot {
    mem: GuestMemoryMmap,
}

const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DATA: u64 = 0x1000;

impl Snapshot {
    pub(super) fn new() -> std::io::Result<Snapshot> {
        let size = DATA as usize + crate::virtio::fs::IN_HEADER_BYTES + MAX_BODY;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).map_err(std::io::Error::other)?;
        Ok(Snapshot { mem })
    }

    /// Stores `request` (header and body) and returns a reader over the copy.
    pub(super) fn reader(&self, request: &[u8]) -> Result<Reader<'_>, SnapshotError> {
        let len = u32::try_from(request.len()).map_err(|_| SnapshotError::TooLong(request.len()))?;
        let mem = &self.mem;
        let w = |addr: u64, b: &[u8]| mem.write_slice(b, GuestAddress(addr)).map_err(SnapshotError::Write);
        w(DATA, request)?;
        // Descriptor 0: DATA, len, device-readable, no next.
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&DATA.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        w(DESC_TABLE, &desc)?;
        // Available ring: flags 0, idx 1, ring[0] = descriptor 0.
        w(AVAIL_RING, &[0, 0, 1, 0, 0, 0])?;
        let mut q = Queue::new(2).map_err(SnapshotError::Queue)?;
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        let chain: DescriptorChain<&GuestMemoryMmap> =
            q.iter(mem).map_err(SnapshotError::Queue)?.next().ok_or(SnapshotError::NoChain)?;
        Reader::from_descriptor_chain(mem, chain).map_err(SnapshotError::Reader)
    }
}
