//! virtio-blk over a raw image file or a block device: read, write, flush, GET_ID, discard and
//! write-zeroes (where the file system supports hole punching), read-only disks, and bounded
//! request sizes. Malformed requests complete with an error status; only a broken queue (bad
//! ring indices) stops the device.
use super::{
    read_config_bytes, DeviceError, DeviceResult, ErrorCounter, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// The largest data transfer one request may carry; the guest learns it from size_max/seg_max.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
const SEG_MAX: u32 = 126;
const SIZE_MAX: u32 = (MAX_REQUEST_BYTES / SEG_MAX as u64) as u32 & !0xfff;
const MAX_DISCARD_SEGMENTS: u32 = 16;
pub const ID_BYTES: usize = 20;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: u32,
    pub reserved: u32,
    pub sector: u64,
}
// SAFETY: plain integers, no padding; any byte pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}
// SAFETY: plain integers, no padding; any byte pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk: {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("disk: {0}: size {1} is not a multiple of 512 bytes")]
    Size(PathBuf, u64),
}

pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_BYTES],
    /// Hole punching works on this file (regular file on a supporting file system).
    punch: bool,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    errors: ErrorCounter,
    buf: Vec<u8>,
}

/// Why a request failed, mapped to a virtio-blk status.
enum ReqError {
    /// The guest sent something malformed or out of range: IOERR, counted.
    Guest(String),
    Unsupported,
    Io(std::io::Error),
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let mut file =
            OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| BlockError::Open(path.into(), e))?;
        let size = file.seek(SeekFrom::End(0)).map_err(|e| BlockError::Open(path.into(), e))?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(path.into(), size));
        }
        let md = file.metadata().map_err(|e| BlockError::Open(path.into(), e))?;
        let mut id = [0u8; ID_BYTES];
        // Serial: stable per backing inode, like QEMU's default "QM000..." style ids.
        let serial = format!("shoji-{:x}{:x}", md.dev(), md.ino());
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            sectors: size / SECTOR_SIZE,
            id,
            punch: md.is_file(),
            mem: None,
            queues: Vec::new(),
            errors: ErrorCounter::default(),
            buf: Vec::new(),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        let max_sectors = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u32;
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn check_range(&self, sector: u64, bytes: u64) -> Result<u64, ReqError> {
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(ReqError::Guest(format!("length {bytes} is not a multiple of 512")));
        }
        if bytes > MAX_REQUEST_BYTES {
            return Err(ReqError::Guest(format!("request of {bytes} bytes is over {MAX_REQUEST_BYTES}")));
        }
        let end = sector.checked_add(bytes / SECTOR_SIZE).ok_or(ReqError::Guest("sector overflow".into()))?;
        if end > self.sectors {
            return Err(ReqError::Guest(format!("sectors {sector}..{end} beyond the disk ({})", self.sectors)));
        }
        Ok(sector * SECTOR_SIZE)
    }

    /// Serves one request; returns bytes written to the guest (including the status byte).
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                self.errors.record("virtio-blk", &format_args!("descriptor chain: {e}"));
                return 0;
            }
        };
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                self.errors.record("virtio-blk", &format_args!("descriptor chain: {e}"));
                return 0;
            }
        };
        let avail = writer.available_bytes();
        if avail == 0 {
            self.errors.record("virtio-blk", &"request without a status byte");
            return 0;
        }
        let mut status_w = match writer.split_at(avail - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let result = match reader.read_obj::<RequestHeader>() {
            Ok(h) => self.execute(h, &mut reader, &mut writer),
            Err(_) => Err(ReqError::Guest("request header shorter than 16 bytes".into())),
        };
        let status = match result {
            Ok(()) => S_OK,
            Err(ReqError::Unsupported) => S_UNSUPP,
            Err(ReqError::Guest(m)) => {
                self.errors.record("virtio-blk", &m);
                S_IOERR
            }
            Err(ReqError::Io(e)) => {
                tracing::warn!("virtio-blk: host I/O error: {e}");
                S_IOERR
            }
        };
        let written = writer.bytes_written() as u32;
        if status_w.write_all(&[status]).is_err() {
            return written;
        }
        written + 1
    }

    fn execute(
        &mut self,
        h: RequestHeader,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<(), ReqError> {
        match h.type_ {
            T_IN => {
                let len = writer.available_bytes() as u64;
                let mut off = self.check_range(h.sector, len)?;
                let mut left = len as usize;
                while left > 0 {
                    let n = left.min(64 * 1024);
                    self.buf.resize(n, 0);
                    self.file.read_exact_at(&mut self.buf[..n], off).map_err(ReqError::Io)?;
                    writer.write_all(&self.buf[..n]).map_err(|e| ReqError::Guest(e.to_string()))?;
                    off += n as u64;
                    left -= n;
                }
                Ok(())
            }
            T_OUT => {
                if self.read_only {
                    return Err(ReqError::Guest("write to a read-only disk".into()));
                }
                let len = reader.available_bytes() as u64;
                let mut off = self.check_range(h.sector, len)?;
                let mut left = len as usize;
                while left > 0 {
                    let n = left.min(64 * 1024);
                    self.buf.resize(n, 0);
                    reader.read_exact(&mut self.buf[..n]).map_err(|e| ReqError::Guest(e.to_string()))?;
                    self.file.write_all_at(&self.buf[..n], off).map_err(ReqError::Io)?;
                    off += n as u64;
                    left -= n;
                }
                Ok(())
            }
            T_FLUSH => {
                if self.read_only {
                    return Ok(());
                }
                self.file.sync_data().map_err(ReqError::Io)
            }
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                writer.write_all(&self.id[..n]).map_err(|e| ReqError::Guest(e.to_string()))
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(ReqError::Guest("discard/write-zeroes on a read-only disk".into()));
                }
                let seg = std::mem::size_of::<DiscardSegment>();
                let count = reader.available_bytes() / seg;
                if count == 0 || count > MAX_DISCARD_SEGMENTS as usize || !reader.available_bytes().is_multiple_of(seg)
                {
                    return Err(ReqError::Guest(format!("{} bytes of discard segments", reader.available_bytes())));
                }
                for _ in 0..count {
                    let s: DiscardSegment = reader.read_obj().map_err(|e| ReqError::Guest(e.to_string()))?;
                    let bytes = u64::from(s.num_sectors) * SECTOR_SIZE;
                    let off = self.check_range(s.sector, bytes)?;
                    if s.flags & !1 != 0 {
                        return Err(ReqError::Unsupported);
                    }
                    self.zero_range(off, bytes, h.type_ == T_DISCARD)?;
                }
                Ok(())
            }
            _ => Err(ReqError::Unsupported),
        }
    }

    /// Discard punches a hole; write-zeroes punches (or, where that fails, writes zeroes).
    fn zero_range(&mut self, off: u64, len: u64, discard: bool) -> Result<(), ReqError> {
        if len == 0 {
            return Ok(());
        }
        if self.punch {
            // SAFETY: fallocate on an fd we own with in-range offsets; it touches no memory.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            self.punch = false;
        }
        if discard {
            return Ok(()); // discard is advisory
        }
        let zeroes = vec![0u8; len.min(64 * 1024) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], off + done).map_err(ReqError::Io)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn pci_class(&self) -> u32 {
        0x01_8000 // mass storage, other
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, _features: u64) -> DeviceResult {
        if queues.len() != 1 {
            return Err(DeviceError::QueueCount { expected: 1, got: queues.len() });
        }
        self.mem = Some(mem);
        self.queues = queues;
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
    }
    fn errors(&self) -> u64 {
        self.errors.get()
    }
    fn queue_progress(&self) -> Vec<(u16, u16)> {
        super::queue_progress(&self.queues)
    }
    /// Requests complete within one queue event: between events nothing is in flight.
    fn can_snapshot(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Block {
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
        for chain in chains {
            let head = chain.head_index();
            let len = self.handle(mem, chain);
            queue.add_used(mem, head, len).map_err(|source| DeviceError::UsedRing { queue: "request", source })?;
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            irq.queue(index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
