//! The virtio-vsock packet paths on guest memory the fuzzer writes: the transmit and receive
//! queues' descriptor tables and available rings, and the packets and receive buffers, are all
//! arbitrary bytes, as a hostile guest could make them. The device is bound to a socket in a
//! temporary directory; a listener at `<socket>_5000` (drained every run, never read) lets guest
//! connections to host port 5000 get established, so data, credit and shutdown paths are reached
//! too. Host-initiated connections need the event loop and are not covered here.
//!
//! Input: the first `MEM` bytes of guest memory, from address 0 (the rest is zero):
//!   0x000 TX descriptor table (16 entries)   0x100 TX available ring   0x140 TX used ring
//!   0x200 RX descriptor table (16 entries)   0x300 RX available ring   0x340 RX used ring
//!   0x400.. packets and buffers, wherever the descriptors point
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoji_devices::virtio::vsock::{Vsock, RX_QUEUE, TX_QUEUE};
use shoji_devices::virtio::{Interrupt, VirtioDevice};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x4000;
const SIZE: u16 = 16;
const GUEST_CID: u64 = 3;
/// (descriptor table, available ring, used ring) of the TX and RX queues.
const TX_RINGS: (u64, u64, u64) = (0x000, 0x100, 0x140);
const RX_RINGS: (u64, u64, u64) = (0x200, 0x300, 0x340);

const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1, "queues are passed in index order");

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&mut self, _: u16) {}
    fn config(&mut self) {}
}

struct Host {
    sock: PathBuf,
    peer: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shoji-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz directory");
        let sock = dir.join("v.sock");
        let peer = UnixListener::bind(dir.join("v.sock_5000")).expect("fuzz peer listener");
        peer.set_nonblocking(true).expect("non-blocking listener");
        Host { sock, peer }
    })
}


fuzz_target!(|data: &[u8]| {
    let host = host();
    // Streams from the last run, closed on the device side already: keep the backlog empty.
    while host.peer.accept().is_ok() {}
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("write");
    let Ok(mut vsock) = Vsock::new(GUEST_CID, &host.sock) else { return };
    let (Some(tx), Some(rx), Ok(event)) = (common::queue(SIZE, TX_RINGS), common::queue(SIZE, RX_RINGS), Queue::new(SIZE)) else { return };
    let queues = vec![rx, tx, event];
    let features = vsock.features();
    if vsock.activate(mem, queues, features).is_err() {
        return;
    }
    for q in [TX_QUEUE, RX_QUEUE, TX_QUEUE, RX_QUEUE] {
        let _ = vsock.queue_event(q, &mut NoIrq);
    }
    // Every connection comes from a REQUEST in a TX chain: at most SIZE chains per pass (the
    // second pass sees new ones only if RX buffers overlapped the available ring).
    assert!(vsock.connections() <= 2 * usize::from(SIZE));
    vsock.reset();
});
