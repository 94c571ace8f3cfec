//! virtio-net driven through virtio-queue's mock split queues on real guest memory, with an
//! in-memory backend; the tap itself in a private network namespace.
use super::tap::{Tap, TapError};
use super::*;
use crate::virtio::test_utils::{Irqs, WRITE};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;

/// Where queue `q`'s used ring is.
fn used_ring(q: usize) -> u64 {
    0x8000 + 0x1000 * q as u64
}
const BUF: u64 = 0x10_0000;

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
}

/// Frames in both directions, in memory.
struct Fake {
    wire: Arc<Mutex<Wire>>,
    vnet_hdr: bool,
}

impl NetBackend for Fake {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.wire.lock().unwrap().to_guest.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.wire.lock().unwrap().from_guest.push(frame.to_vec());
        Ok(())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }
    fn set_offloads(&mut self, _: u64) -> io::Result<()> {
        Ok(())
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Net,
    wire: Arc<Mutex<Wire>>,
    /// Next free descriptor index per queue (rx, tx).
    next: [u16; 2],
    /// Next free buffer address.
    next_buf: u64,
}

impl Rig {
    fn new(vnet_hdr: bool, features: u64) -> Rig {
        // Leaked so the mock queues (which borrow memory) can live in the rig; tests only.
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()));
        let wire = Arc::new(Mutex::new(Wire::default()));
        let mut dev = Net::new(Box::new(Fake { wire: wire.clone(), vnet_hdr }), [2, 0, 0, 0, 0, 1], Some(9000));
        let rx = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
        // The mock puts its used ring over the avail ring's entries from the 8th on (its ring
        // end is counted in entries, not bytes): each used ring goes to its own page instead.
        let queues = [(&rx, RX_QUEUE), (&tx, TX_QUEUE)]
            .map(|(vq, q)| {
                let mut queue: Queue = vq.create_queue().unwrap();
                queue.set_ready(false);
                let used = used_ring(q);
                queue.set_used_ring_address(Some(used as u32), Some(0));
                queue.set_ready(true);
                queue
            })
            .into();
        dev.activate(mem.clone(), queues, features & dev.features()).unwrap();
        Rig { mem, rx, tx, dev, wire, next: [0, 0], next_buf: BUF }
    }

    fn buf(&mut self, len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(0x1000).max(0x1000);
        at
    }

    /// Adds one chain to queue `q` (NEXT flags and indices filled in).
    fn add(&mut self, q: usize, descs: &[RawDescriptor]) {
        let base = self.next[q];
        let chained = crate::virtio::test_utils::chained(descs, base);
        let vq = if q == RX_QUEUE { &self.rx } else { &self.tx };
        vq.add_desc_chains(&chained, base).unwrap();
        self.next[q] = base + descs.len() as u16;
    }

    /// A receive buffer of `len` bytes; its address.
    fn rx_buffer(&mut self, len: u32) -> u64 {
        let at = self.buf(len);
        self.add(RX_QUEUE, &[desc(at, len, WRITE)]);
        at
    }

    /// Queues `frame` for transmission (header and payload in two descriptors) and kicks.
    fn transmit(&mut self, frame: &[u8]) -> Irqs {
        let split = frame.len().min(HDR_LEN);
        let (a, b) = (self.buf(split as u32), self.buf((frame.len() - split) as u32));
        self.mem.write_slice(&frame[..split], GuestAddress(a)).unwrap();
        self.mem.write_slice(&frame[split..], GuestAddress(b)).unwrap();
        let mut descs = vec![desc(a, split as u32, 0)];
        if frame.len() > split {
            descs.push(desc(b, (frame.len() - split) as u32, 0));
        }
        self.add(TX_QUEUE, &descs);
        self.kick(TX_QUEUE)
    }

    fn kick(&mut self, q: usize) -> Irqs {
        let mut irqs = Irqs::default();
        self.dev.queue_event(q, &mut irqs).unwrap();
        irqs
    }

    fn incoming(&self, frame: Vec<u8>) {
        self.wire.lock().unwrap().to_guest.push_back(frame);
    }

    /// (head, len) of used entry `i` of queue `q`.
    fn used(&self, q: usize, i: u16) -> (u32, u32) {
        let at = used_ring(q) + 4 + 8 * u64::from(i % QSIZE);
        (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap()
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

/// A frame with an all-zero header and `payload` bytes counting up.
fn frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

const ALL: u64 = u64::MAX;

#[test]
fn features_and_config_say_mac_mtu_link_and_offloads_only_with_headers() {
    let rig = Rig::new(true, ALL);
    let f = rig.dev.features();
    assert_eq!(
        f & (F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | VIRTIO_F_VERSION_1),
        F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | VIRTIO_F_VERSION_1
    );
    assert_eq!(f & OFFLOADS, OFFLOADS);
    assert_eq!(Rig::new(false, ALL).dev.features() & OFFLOADS, 0);
    let mut c = [0u8; 12];
    rig.dev.read_config(0, &mut c);
    assert_eq!(c, [2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0x28, 0x23], "mac, status up, one pair, mtu 9000");
    let mut tail = [0xaau8; 4];
    rig.dev.read_config(10, &mut tail);
    assert_eq!(tail, [0x28, 0x23, 0, 0], "past the end reads zero");
}

#[test]
fn a_transmitted_frame_reaches_the_backend_whole_and_is_signalled() {
    let mut rig = Rig::new(true, ALL);
    let f = frame(1000);
    let irqs = rig.transmit(&f);
    assert_eq!(irqs.0, vec![TX_QUEUE as u16]);
    assert_eq!(rig.wire.lock().unwrap().from_guest, vec![f]);
    assert_eq!((rig.used_idx(TX_QUEUE), rig.used(TX_QUEUE, 0)), (1, (0, 0)));
    assert_eq!(rig.dev.stats().tx_frames, 1);
    assert_eq!(rig.dev.errors(), 0);
}

#[test]
fn malformed_transmit_chains_are_counted_and_dropped() {
    let mut rig = Rig::new(false, ALL);
    rig.transmit(&[0u8; 4]);
    // Over the largest frame: header plus 64 KiB and more.
    let at = rig.buf(MAX_FRAME as u32 + 1);
    rig.add(TX_QUEUE, &[desc(at, MAX_FRAME as u32 + 1, 0)]);
    rig.kick(TX_QUEUE);
    // Only writable descriptors: no frame at all.
    let at = rig.buf(64);
    rig.add(TX_QUEUE, &[desc(at, 64, WRITE)]);
    rig.kick(TX_QUEUE);
    // An offload the device did not offer (no vnet header on this backend): NEEDS_CSUM.
    let mut f = frame(100);
    f[0] = 1;
    rig.transmit(&f);
    assert!(rig.wire.lock().unwrap().from_guest.is_empty());
    assert_eq!(rig.dev.errors(), 4);
    assert_eq!(rig.used_idx(TX_QUEUE), 4, "every chain is given back");
    // Still working.
    rig.transmit(&frame(10));
    assert_eq!(rig.wire.lock().unwrap().from_guest.len(), 1);
}

#[test]
fn a_large_frame_is_merged_over_several_buffers_with_num_buffers_set() {
    let mut rig = Rig::new(true, ALL);
    let bufs: Vec<u64> = (0..4).map(|_| rig.rx_buffer(1024)).collect();
    let mut f = frame(3000);
    f[0] = 2; // DATA_VALID: the header goes through as the backend gave it
    rig.incoming(f.clone());
    let mut irqs = Irqs::default();
    rig.dev.process_rx(&mut irqs).unwrap();
    assert_eq!(irqs.0, vec![RX_QUEUE as u16]);
    assert_eq!(rig.used_idx(RX_QUEUE), 3);
    assert_eq!([rig.used(RX_QUEUE, 0), rig.used(RX_QUEUE, 1), rig.used(RX_QUEUE, 2)], [(0, 1024), (1, 1024), (2, 964)]);
    let mut got = rig.read(bufs[0], 1024);
    got.extend(rig.read(bufs[1], 1024));
    got.extend(rig.read(bufs[2], 964));
    assert_eq!(got[NUM_BUFFERS..HDR_LEN], 3u16.to_le_bytes());
    assert_eq!(got[0], 2);
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
    assert_eq!(rig.dev.stats().rx_frames, 1);
}

#[test]
fn a_frame_without_room_waits_for_buffers_and_partial_room_is_given_back() {
    let mut rig = Rig::new(true, ALL);
    let f = frame(3000);
    rig.incoming(f.clone());
    rig.incoming(frame(10));
    // No buffers: nothing is read from the backend, nothing is used.
    assert!(rig.kick(RX_QUEUE).0.is_empty());
    // Two buffers are not enough for it: taken, then given back untouched.
    let a = rig.rx_buffer(1024);
    rig.rx_buffer(1024);
    assert!(rig.kick(RX_QUEUE).0.is_empty());
    assert_eq!(rig.used_idx(RX_QUEUE), 0);
    // A third: the held frame goes first, then the next frame when there is room.
    rig.rx_buffer(1024);
    assert_eq!(rig.kick(RX_QUEUE).0, vec![RX_QUEUE as u16]);
    assert_eq!(rig.used_idx(RX_QUEUE), 3);
    assert_eq!(rig.read(a + HDR_LEN as u64, 100), f[HDR_LEN..HDR_LEN + 100]);
    rig.rx_buffer(1024);
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used_idx(RX_QUEUE), 4);
    assert_eq!(rig.used(RX_QUEUE, 3).1, (HDR_LEN + 10) as u32);
    assert_eq!(rig.dev.stats(), NetStats { tx_frames: 0, rx_frames: 2, dropped: 0 });
}

#[test]
fn hostile_receive_buffers_are_counted_and_the_frame_still_delivered() {
    let mut rig = Rig::new(true, ALL);
    // Too small for the header, then a read-only "receive buffer", then a good one.
    let tiny = rig.buf(8);
    rig.add(RX_QUEUE, &[desc(tiny, 8, WRITE)]);
    let ro = rig.buf(512);
    rig.add(RX_QUEUE, &[desc(ro, 512, 0)]);
    let good = rig.rx_buffer(2048);
    rig.incoming(frame(100));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used_idx(RX_QUEUE), 3);
    assert_eq!([rig.used(RX_QUEUE, 0), rig.used(RX_QUEUE, 1), rig.used(RX_QUEUE, 2)], [(0, 0), (1, 0), (2, 112)]);
    assert_eq!(rig.read(good + NUM_BUFFERS as u64, 2), 1u16.to_le_bytes());
    assert_eq!(rig.dev.errors(), 2);
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped() {
    let mut rig = Rig::new(true, ALL & !F_MRG_RXBUF);
    rig.rx_buffer(512);
    let good = rig.rx_buffer(2048);
    rig.incoming(frame(1000));
    rig.incoming(frame(1000));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.used(RX_QUEUE, 0).1, 0, "dropped: the buffer comes back empty");
    assert_eq!(rig.used(RX_QUEUE, 1).1, 1012);
    assert_eq!(rig.read(good + NUM_BUFFERS as u64, 2), 1u16.to_le_bytes());
    assert_eq!(rig.dev.stats().dropped, 1);
}

#[test]
fn a_reset_forgets_the_queues_and_the_held_frame() {
    let mut rig = Rig::new(true, ALL);
    rig.rx_buffer(1024);
    rig.incoming(frame(3000));
    rig.kick(RX_QUEUE);
    assert!(rig.dev.rx_pending.is_some(), "one buffer is not enough");
    rig.dev.reset();
    assert!(rig.dev.rx_pending.is_none());
    let mut irqs = Irqs::default();
    rig.dev.queue_event(TX_QUEUE, &mut irqs).unwrap();
    rig.dev.queue_event(RX_QUEUE, &mut irqs).unwrap();
    assert!(irqs.0.is_empty());
}

/// Runs `f` on a thread in a network namespace of its own (root only): taps made there go
/// with it.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; it moves this (test) thread to a new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET) (these tests run as root): {}", io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_tap_opens_with_vnet_headers_takes_offloads_and_reads_nothing_while_down() {
    in_private_netns(|| {
        let mut tap = Tap::open("shoji-t0").unwrap();
        assert_eq!(tap.name(), "shoji-t0");
        assert!(tap.vnet_hdr() && tap.fd().is_some());
        tap.set_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert!(tap.recv(&mut buf).unwrap().is_none(), "non-blocking, nothing pending");
        // SAFETY: a NUL-terminated name; the call only reads it.
        let index = unsafe { libc::if_nametoindex(c"shoji-t0".as_ptr()) };
        assert_ne!(index, 0, "the tap is an interface of this namespace");
        for bad in ["", "a/b", "way-too-long-name", "a b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
    });
}

#[test]
fn a_ring_of_unusable_buffers_costs_one_pass_per_kick_and_takes_nothing() {
    let mut rig = Rig::new(true, ALL);
    // 15 chains too small for the header (a guest that republishes them gains nothing more).
    for _ in 0..15 {
        let at = rig.buf(8);
        rig.add(RX_QUEUE, &[desc(at, 8, WRITE)]);
    }
    rig.incoming(frame(100));
    assert!(rig.kick(RX_QUEUE).0.is_empty());
    assert_eq!((rig.used_idx(RX_QUEUE), rig.dev.errors()), (0, 15), "one look at each, all given back");
    rig.kick(RX_QUEUE);
    assert_eq!((rig.used_idx(RX_QUEUE), rig.dev.errors()), (0, 30));
    assert!(rig.dev.rx_pending.is_some(), "the frame waits for a usable buffer");
}

#[test]
fn headers_are_checked_against_the_accepted_offloads() {
    let mut rig = Rig::new(true, ALL & !(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6));
    let bufs: Vec<u64> = (0..4).map(|_| rig.rx_buffer(2048)).collect();
    let with = |flags: u8, gso: u8| {
        let mut f = frame(100);
        (f[0], f[1]) = (flags, gso);
        f
    };
    rig.incoming(with(2, 0)); // DATA_VALID: delivered, the hint cleared
    rig.incoming(with(1, 0)); // NEEDS_CSUM without a checksum offload: dropped
    rig.incoming(with(0, 1)); // TCPv4 segmentation not accepted: dropped
    rig.incoming(frame(9000 + 18 + 1)); // over the MTU without segmentation: dropped
    rig.incoming(with(0, 0));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.dev.stats(), NetStats { tx_frames: 0, rx_frames: 2, dropped: 3 });
    assert_eq!(rig.read(bufs[0], 2), [0, 0]);
    assert_eq!(rig.used_idx(RX_QUEUE), 2);

    // With the offloads accepted, the same headers go through as they are.
    let mut rig = Rig::new(true, ALL);
    let at = rig.rx_buffer(2048);
    rig.incoming(with(1, 1));
    rig.kick(RX_QUEUE);
    assert_eq!(rig.read(at, 2), [1, 1]);
    assert_eq!(rig.dev.stats().rx_frames, 1);
}

#[test]
fn a_broken_ring_stops_the_device_until_a_reset() {
    let mut rig = Rig::new(true, ALL);
    rig.rx_buffer(2048);
    rig.rx.avail().idx().store(100); // more entries than the ring has
    let mut irqs = Irqs::default();
    assert!(rig.dev.queue_event(RX_QUEUE, &mut irqs).is_err());
    // Broken: frames from the host stay in the backend, nothing is touched.
    rig.incoming(frame(10));
    let mut irqs = Irqs::default();
    assert!(rig.dev.queue_event(RX_QUEUE, &mut irqs).is_ok());
    assert_eq!(rig.wire.lock().unwrap().to_guest.len(), 1);
    rig.dev.reset();
    assert!(!rig.dev.broken);
}
