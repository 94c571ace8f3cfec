//! virtio-fs with fuse-backend-rs on a real directory, under FUSE requests the fuzzer writes
//! (headers included: opcodes, node ids, uid/gid, lengths, names, modes, rdev, flags). The share
//! lies in a temporary parent next to a sentinel file and directory, and holds a symlink to the
//! sentinel. After every input: nothing outside the share was created, removed or changed, and
//! no device node or setuid/setgid file exists inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoji_devices::virtio::fs::{Fs, FsLimits, HIPRIO_QUEUE, NUM_QUEUES, QUEUE_SIZE, REQUEST_QUEUE};
use shoji_devices::virtio::{Interrupt, VirtioDevice};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x4_0000;
const SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const IN: u64 = 0x1_0000;
const OUT: u64 = 0x2_0000;
const OUT_LEN: u32 = 0x1_0000;
const SENTINEL: &[u8] = b"outside the share\n";

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&mut self, _: u16) {}
    fn config(&mut self) {}
}

fn parent() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("shoji-fuzz-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("sentinel-dir")).expect("parent");
        std::fs::write(p.join("sentinel"), SENTINEL).expect("sentinel");
        p
    })
}

/// A fresh share: a file, a directory and a symlink out of it.
fn fresh_share(share: &Path) {
    let _ = std::fs::remove_dir_all(share);
    std::fs::create_dir_all(share.join("sub")).expect("share");
    std::fs::write(share.join("hello"), b"hello").expect("hello");
    std::os::unix::fs::symlink("../sentinel", share.join("out")).expect("symlink");
}

/// Nothing outside the share changed; no device node or setuid/setgid file inside it.
fn check(parent: &Path, share: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(parent).expect("parent").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["sentinel", "sentinel-dir", "share"], "entries next to the share");
    assert_eq!(std::fs::read(parent.join("sentinel")).expect("sentinel"), SENTINEL);
    let md = std::fs::symlink_metadata(parent.join("sentinel")).expect("sentinel");
    assert!(md.is_file() && md.permissions().mode() & 0o7777 == 0o644, "sentinel mode {:o}", md.permissions().mode());
    assert_eq!(std::fs::read_dir(parent.join("sentinel-dir")).expect("sentinel-dir").count(), 0);
    assert!(std::fs::symlink_metadata(share).expect("share").is_dir(), "the share is still a directory");
    let mut stack = vec![share.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let md = std::fs::symlink_metadata(e.path()).expect("entry");
            let t = md.file_type();
            assert!(!t.is_block_device() && !t.is_char_device(), "device node {:?}", e.path());
            if !t.is_symlink() {
                assert_eq!(md.permissions().mode() & 0o6000, 0, "setuid/setgid {:?}", e.path());
            }
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
}

fn desc(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + 16 * u64::from(i))).expect("desc");
}

fn queue(base: u64) -> Queue {
    let mut q = Queue::new(SIZE).expect("queue");
    q.set_desc_table_address(Some((DESC + base) as u32), Some(0));
    q.set_avail_ring_address(Some((AVAIL + base) as u32), Some(0));
    q.set_used_ring_address(Some((USED + base) as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    let parent = parent();
    let share = parent.join("share");
    fresh_share(&share);
    let limits = FsLimits { max_inodes: 64, max_handles: 16 };
    let Ok(mut fs) = Fs::with_limits("fuzz", &share, data.first().is_some_and(|b| b & 0x80 != 0), limits) else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    // Queue 1 (requests) at 0; queue 0 (hiprio) has its own rings at 0x8000.
    let mut queues: Vec<Queue> = (0..NUM_QUEUES).map(|_| Queue::new(QUEUE_SIZE).expect("queue")).collect();
    queues[REQUEST_QUEUE] = queue(0);
    queues[HIPRIO_QUEUE] = queue(0x8000);
    if fs.activate(mem.clone(), queues, fs.features()).is_err() {
        return;
    }
    // INIT first, so the fuzzer starts with a mounted file system.
    let mut init = Vec::new();
    init.extend_from_slice(&56u32.to_le_bytes()); // len: in_header (40) + init_in (16)
    init.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    init.extend_from_slice(&[0u8; 32]); // unique, nodeid, uid, gid, pid, padding
    init.extend_from_slice(&[7, 0, 0, 0, 31, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]);
    // Requests: 2-byte length, 1 flag byte (bit 0: fix in_header.len; bit 1: hiprio), bytes.
    let mut requests = vec![(1u8, init.as_slice())];
    let mut d = data.get(1..).unwrap_or_default();
    while d.len() >= 3 {
        let n = usize::from(u16::from_le_bytes([d[0], d[1]])) % 4096;
        let flags = d[2];
        let end = (3 + n).min(d.len());
        requests.push((flags, &d[3..end]));
        d = &d[end..];
    }
    let mut avail = [0u16; 2];
    for (flags, req) in requests.into_iter().take(64) {
        let mut req = req.to_vec();
        if flags & 1 == 1 && req.len() >= 4 {
            let len = req.len() as u32;
            req[..4].copy_from_slice(&len.to_le_bytes());
        }
        let (index, base) = if flags & 2 == 2 { (HIPRIO_QUEUE, 0x8000) } else { (REQUEST_QUEUE, 0) };
        mem.write_slice(&req, GuestAddress(IN)).expect("request");
        // Descriptors 0 (request) and 1 (reply) of this queue's table.
        desc(&mem, DESC + base, 0, IN, req.len() as u32, 1, 1);
        desc(&mem, DESC + base, 1, OUT, OUT_LEN, 2, 0);
        let slot = &mut avail[index];
        let ring = AVAIL + base + 4 + 2 * u64::from(*slot % SIZE);
        mem.write_obj(0u16, GuestAddress(ring)).expect("avail ring");
        *slot = slot.wrapping_add(1);
        mem.write_obj(*slot, GuestAddress(AVAIL + base + 2)).expect("avail idx");
        if fs.queue_event(index, &mut NoIrq).is_err() {
            fs.reset();
            break;
        }
    }
    drop(fs);
    check(parent, &share);
});
