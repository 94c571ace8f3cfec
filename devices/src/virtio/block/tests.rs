//! virtio-blk driven through virtio-queue's mock split queue on real guest memory.
use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

use crate::virtio::test_utils::{Irqs, NEXT, WRITE};

struct Rig {
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Block,
    path: PathBuf,
    next_desc: u16,
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

impl Rig {
    fn new(name: &str, read_only: bool) -> Rig {
        let path = std::env::temp_dir().join(format!("shoji-blk-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        // Leaked so the mock queue (which borrows memory) can live in the rig; tests only.
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()));
        let mut dev = Block::open(&path, read_only).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        let q: Queue = vq.create_queue().unwrap();
        dev.activate(mem.clone(), vec![q], dev.features()).unwrap();
        Rig { mem, vq, dev, path, next_desc: 0 }
    }

    /// Submits one chain (NEXT flags and indices are filled in) and processes the queue.
    fn submit(&mut self, descs: &[RawDescriptor]) -> DeviceResult {
        let base = self.next_desc;
        let chained = crate::virtio::test_utils::chained(descs, base);
        self.vq.add_desc_chains(&chained, base).unwrap();
        self.next_desc = (base + descs.len() as u16) % 12;
        let mut irqs = Irqs::default();
        let r = self.dev.queue_event(0, &mut irqs);
        if r.is_ok() {
            assert_eq!(irqs.0, vec![0], "used buffers are signalled");
        }
        r
    }

    fn request(&mut self, type_: u32, sector: u64, data: Option<(u32, bool)>) -> u8 {
        self.mem.write_obj(RequestHeader { type_, reserved: 0, sector }, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![desc(HDR, 16, 0)];
        if let Some((len, device_writes)) = data {
            descs.push(desc(DATA, len, if device_writes { WRITE } else { 0 }));
        }
        descs.push(desc(STATUS, 1, WRITE));
        self.submit(&descs).unwrap();
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn last_used_len(&self) -> u32 {
        let idx = self.vq.used().idx().load();
        self.vq.used().ring().ref_at(usize::from(idx.wrapping_sub(1)) % 16).unwrap().load().len()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn write_then_read_back_and_check_the_host_file() {
    let mut r = Rig::new("rw", false);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_OUT, 8, Some((4096, false))), S_OK);
    assert_eq!(r.last_used_len(), 1, "a write returns only the status byte");
    let host = std::fs::read(&r.path).unwrap();
    assert_eq!(&host[4096..8192], &pattern[..]);
    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_IN, 8, Some((4096, true))), S_OK);
    assert_eq!(r.last_used_len(), 4097);
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(r.request(T_FLUSH, 0, None), S_OK);
}

#[test]
fn get_id_unsupported_and_config() {
    let mut r = Rig::new("id", false);
    assert_eq!(r.request(T_GET_ID, 0, Some((20, true))), S_OK);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(id.starts_with(b"shoji-"));
    assert_eq!(r.request(99, 0, None), S_UNSUPP);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
    let mut far = [7u8; 4];
    r.dev.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn out_of_range_and_read_only_fail_with_ioerr() {
    let mut r = Rig::new("range", false);
    assert_eq!(r.request(T_IN, 2047, Some((1024, true))), S_IOERR, "crosses the end");
    assert_eq!(r.request(T_IN, u64::MAX, Some((512, true))), S_IOERR, "overflow");
    assert_eq!(r.request(T_IN, 0, Some((100, true))), S_IOERR, "not a sector multiple");
    let mut ro = Rig::new("ro", true);
    assert_eq!(ro.dev.features() & F_RO, F_RO);
    assert_eq!(ro.request(T_OUT, 0, Some((512, false))), S_IOERR);
    assert_eq!(ro.request(T_IN, 0, Some((512, true))), S_OK);
    assert!(ro.dev.errors() >= 1 && r.dev.errors() >= 3);
}

#[test]
fn discard_and_write_zeroes() {
    let mut r = Rig::new("zero", false);
    for (t, sector) in [(T_WRITE_ZEROES, 0u64), (T_DISCARD, 16)] {
        r.mem.write_obj(DiscardSegment { sector, num_sectors: 8, flags: 0 }, GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(t, 0, Some((16, false))), S_OK);
    }
    let host = std::fs::read(&r.path).unwrap();
    assert!(host[..4096].iter().all(|b| *b == 0), "write-zeroes zeroed");
    assert_eq!(host.len(), 1 << 20, "size kept");
    r.mem.write_obj(DiscardSegment { sector: 4096, num_sectors: 8, flags: 0 }, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_DISCARD, 0, Some((16, false))), S_IOERR, "out of range segment");
    assert_eq!(r.request(T_DISCARD, 0, Some((15, false))), S_IOERR, "partial segment");
}

#[test]
fn hostile_chains_never_panic() {
    let mut r = Rig::new("hostile", false);
    // Header too short.
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.submit(&[desc(HDR, 8, 0), desc(STATUS, 1, WRITE)]).unwrap();
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    // No writable status byte at all.
    r.submit(&[desc(HDR, 16, 0)]).unwrap();
    assert_eq!(r.last_used_len(), 0);
    // Buffer outside guest memory.
    r.submit(&[desc(HDR, 16, 0), desc(0xffff_0000_0000, 512, WRITE), desc(STATUS, 1, WRITE)]).unwrap();
    // Oversized request.
    r.submit(&[desc(HDR, 16, 0), desc(DATA, 0x20_0000, WRITE), desc(STATUS, 1, WRITE)]).unwrap();
    // Readable after writable (invalid ordering).
    r.submit(&[desc(HDR, 16, 0), desc(STATUS, 1, WRITE), desc(DATA, 512, 0)]).unwrap();
    assert!(r.dev.errors() >= 3, "errors counted: {}", r.dev.errors());
}

#[test]
fn descriptor_loop_terminates() {
    let mut r = Rig::new("loop", false);
    // Descriptor 0 -> 1 -> 0 -> ...
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE | NEXT, 0)),
    ];
    r.vq.add_desc_chains(&looped, 0).unwrap();
    let mut irqs = Irqs::default();
    assert!(r.dev.queue_event(0, &mut irqs).is_ok());
}

#[test]
fn runaway_available_index_breaks_the_device() {
    let mut r = Rig::new("idx", false);
    r.vq.avail().idx().store(1000);
    let mut irqs = Irqs::default();
    let err = r.dev.queue_event(0, &mut irqs).unwrap_err();
    assert!(matches!(err, DeviceError::AvailableRing { queue: "request", .. }), "{err}");
    assert!(err.to_string().starts_with("request available ring: "), "{err}");
    r.dev.reset();
    assert!(r.dev.queue_event(0, &mut irqs).is_ok(), "after reset nothing to do");
}

#[test]
fn bad_backing_files() {
    let p = std::env::temp_dir().join(format!("shoji-blk-{}-odd", std::process::id()));
    std::fs::write(&p, [0u8; 1000]).unwrap();
    assert!(matches!(Block::open(&p, false), Err(BlockError::Size(_, 1000))));
    std::fs::remove_file(&p).unwrap();
    let e = Block::open(Path::new("/nonexistent/disk.img"), true).err().unwrap().to_string();
    assert!(e.starts_with("disk: /nonexistent/disk.img: "), "{e}");
}
