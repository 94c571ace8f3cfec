//! The virtio-net paths on guest memory the fuzzer writes: both queues' descriptor tables and
//! available rings, the frames to transmit and the receive buffers are arbitrary bytes, as a
//! hostile guest (a malformed frame flood) could make them; frames from the host side are cut
//! from the input too. The backend is in memory: what reaches it must be whole frames within
//! the bounds, and the device must hold at most one received frame.
//!
//! Input: the first `MEM` bytes of guest memory, from address 0 (the rest is zero), then the
//! acked features (u64), the backend's header flag (u8) and the host's frames: (u16 length,
//! bytes)*.
//!   0x000 RX descriptor table (16 entries)   0x100 RX available ring   0x140 RX used ring
//!   0x200 TX descriptor table (16 entries)   0x300 TX available ring   0x340 TX used ring
//!   0x400.. frames and buffers, wherever the descriptors point
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoji_devices::virtio::net::{Net, NetBackend, HDR_LEN, MAX_FRAME, RX_QUEUE, TX_QUEUE};
use shoji_devices::virtio::{Interrupt, VirtioDevice};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x4000;
const SIZE: u16 = 16;
const RX_RINGS: (u64, u64, u64) = (0x000, 0x100, 0x140);
const TX_RINGS: (u64, u64, u64) = (0x200, 0x300, 0x340);

struct NoIrq;
impl Interrupt for NoIrq {
    fn queue(&mut self, _: u16) {}
    fn config(&mut self) {}
}

struct Host {
    to_guest: VecDeque<Vec<u8>>,
    vnet_hdr: bool,
}

impl NetBackend for Host {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.to_guest.pop_front().map(|f| {
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            n
        }))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!((HDR_LEN..=MAX_FRAME).contains(&frame.len()), "a frame of {} bytes went out", frame.len());
        if !self.vnet_hdr {
            assert!(frame[..10].iter().all(|b| *b == 0), "an offload went out without headers");
        }
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


fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("write");
    // After the memory: the features the guest acks (8 bytes, within what is offered), whether
    // the backend passes headers through (1 byte), then the host's frames.
    let tail = &data[n..];
    let acked = tail.get(..8).and_then(|b| b.try_into().ok()).map_or(u64::MAX, u64::from_le_bytes);
    let vnet_hdr = tail.get(8).is_some_and(|b| b & 1 == 1);
    let mut rest = tail.get(9..).unwrap_or_default();
    let mut to_guest = VecDeque::new();
    while rest.len() >= 2 && to_guest.len() < 8 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        to_guest.push_back(rest[2..2 + len].to_vec());
        rest = &rest[2 + len..];
    }
    let mut net = Net::new(Box::new(Host { to_guest, vnet_hdr }), [2, 0, 0, 0, 0, 1], None);
    let (Some(rx), Some(tx)) = (common::queue(SIZE, RX_RINGS), common::queue(SIZE, TX_RINGS)) else { return };
    let acked = net.features() & acked;
    if net.activate(mem, vec![rx, tx], acked).is_err() {
        return;
    }
    for q in [TX_QUEUE, RX_QUEUE, TX_QUEUE, RX_QUEUE] {
        let _ = net.queue_event(q, &mut NoIrq);
    }
    let stats = net.stats();
    assert!(stats.tx_frames <= 2 * u64::from(SIZE));
    net.reset();
});
