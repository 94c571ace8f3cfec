//! The virtio-blk request path on guest memory the fuzzer writes: descriptor table, available
//! ring and buffers are all arbitrary bytes, as a hostile guest could make them.
#![no_main]
#[path = "common.rs"]
mod common;
use common::disk;
use libfuzzer_sys::fuzz_target;
use shoji_devices::virtio::block::Block;
use shoji_devices::virtio::{Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x1_0000;
const SIZE: u16 = 16;

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&mut self, _: u16) {}
    fn config(&mut self) {}
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("write");
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let Ok(mut blk) = Block::open(disk(), read_only) else { return };
    let Ok(mut q) = Queue::new(SIZE) else { return };
    q.set_size(SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    let features = blk.features();
    if blk.activate(mem, vec![q], features).is_err() {
        return;
    }
    let _ = blk.queue_event(0, &mut NoIrq);
    let _ = blk.queue_event(0, &mut NoIrq);
});
