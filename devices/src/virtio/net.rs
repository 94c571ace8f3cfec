//! virtio-net over a host backend (a tap device, [`tap::Tap`]): one receive and one transmit
//! queue, the MAC and MTU in config space, mergeable receive buffers, and checksum/TSO offloads
//! when the backend passes virtio-net headers through (a tap opened with `IFF_VNET_HDR`, whose
//! header is the same 12-byte `virtio_net_hdr_v1`).
//!
//! What the guest controls is treated as hostile: a transmit chain shorter than the header or
//! longer than [`MAX_FRAME`] is dropped and counted; receive chains too small for the header are
//! counted and returned empty; nothing a guest writes reaches the host but whole frames, whose
//! headers the host kernel checks as it does for any tap user. Memory stays bounded: one frame
//! buffer each way and at most one received frame held while the guest has no buffers.
//!
//! Receiving: the backend's fd is edge-triggered in the event loop, so the device drains it
//! until it would block or the guest has no buffers left; a frame that found no room is kept and
//! delivered when the driver adds buffers (its receive-queue notification).
pub mod stream;
pub mod tap;

use super::{read_config_bytes, DeviceError, DeviceResult, ErrorCounter, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use event_manager::{EventOps, EventSet, Events};
use std::io;
use std::os::fd::RawFd;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

pub const TYPE_NET: u32 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// The largest frame either way, header included: a 64 KiB TSO segment plus the Ethernet
/// header (what tap and Linux's virtio-net use as their bound).
pub const MAX_FRAME: usize = HDR_LEN + 65_550;
/// The MTU offered when none is given.
pub const DEFAULT_MTU: u16 = 1500;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
/// The offloads offered when the backend passes headers through.
pub const OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
const S_LINK_UP: u16 = 1;

const DEVICE: &str = "virtio-net";
/// The backend fd's event data (the transport claims the values below the base).
const BACKEND_EVENT: u32 = super::transport::BACKEND_EVENT_BASE;
/// `virtio_net_hdr` flags and GSO types.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// What a frame may carry beyond the MTU: the Ethernet header and one VLAN tag.
const ETH_OVERHEAD: usize = 18;
/// The MTU range the device may offer (the spec's lower bound; the largest IP packet).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=65_535;

/// Where frames go to and come from on the host.
pub trait NetBackend: Send {
    /// Reads one frame, header first, into `buf` ([`MAX_FRAME`] bytes); `None` when nothing is
    /// pending.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one frame, header first.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The fd the event loop waits on for received frames.
    fn fd(&self) -> Option<RawFd>;
    /// Whether the backend honours the virtio-net header (checksum and segmentation offloads);
    /// without it the device offers none and headers must carry no offload.
    fn vnet_hdr(&self) -> bool;
    /// The offloads the guest accepted (`F_GUEST_*`): what the backend may hand it.
    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()>;
    /// The fd can take output again (its edge-triggered writable event): send what was kept
    /// back when it could not.
    fn writable(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counters for tests and reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames the backend refused or the guest had no usable buffer for.
    pub dropped: u64,
}

pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    mtu: u16,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    acked: u64,
    errors: ErrorCounter,
    stats: NetStats,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for receive buffers.
    rx_pending: Option<usize>,
    /// The guest's accepted features, for the backend's offloads: applied on the device thread
    /// (activation runs on a vCPU thread, whose seccomp filter allows no tap ioctl).
    offloads_to_apply: Option<u64>,
    /// A backend receive error was logged (once per activation: the guest's kicks retry it).
    backend_error_logged: bool,
    /// A queue error broke the device (the transport marked it NEEDS_RESET): nothing is served
    /// until the driver resets it, backend events included.
    broken: bool,
}

impl Net {
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6], mtu: Option<u16>) -> Net {
        Net {
            backend,
            mac,
            mtu: mtu.unwrap_or(DEFAULT_MTU),
            mem: None,
            queues: Vec::new(),
            acked: 0,
            errors: ErrorCounter::default(),
            stats: NetStats::default(),
            tx_buf: vec![0; MAX_FRAME],
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            offloads_to_apply: None,
            backend_error_logged: false,
            broken: false,
        }
    }

    /// Hands the backend the offloads the guest accepted, once after each activation.
    fn apply_offloads(&mut self) {
        if let Some(acked) = self.offloads_to_apply.take() {
            if let Err(e) = self.backend.set_offloads(acked) {
                tracing::warn!("{DEVICE}: the backend refused the guest's offloads: {e}");
            }
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Sends every frame the guest queued.
    fn process_tx(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue, irq: &mut dyn Interrupt) -> DeviceResult {
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(source) => return Err(DeviceError::AvailableRing { queue: "transmit", source }),
        };
        let mut used_any = false;
        for chain in chains {
            let head = chain.head_index();
            self.send(mem, chain);
            queue.add_used(mem, head, 0).map_err(|source| DeviceError::UsedRing { queue: "transmit", source })?;
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            irq.queue(TX_QUEUE as u16);
        }
        Ok(())
    }

    fn send(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mut reader = match chain.reader(mem) {
            Ok(r) => r,
            Err(e) => return self.errors.record(DEVICE, &format_args!("transmit chain: {e}")),
        };
        let len = reader.available_bytes();
        if !(HDR_LEN..=MAX_FRAME).contains(&len) {
            return self.errors.record(DEVICE, &format_args!("transmit frame of {len} bytes"));
        }
        if let Err(e) = io::Read::read_exact(&mut reader, &mut self.tx_buf[..len]) {
            return self.errors.record(DEVICE, &format_args!("transmit frame: {e}"));
        }
        if !self.backend.vnet_hdr() && self.tx_buf[..HDR_LEN].iter().take(NUM_BUFFERS).any(|b| *b != 0) {
            // No offloads were offered, so none may be asked for.
            return self.errors.record(DEVICE, &"transmit header asks for an offload that was not offered");
        }
        match self.backend.send(&self.tx_buf[..len]) {
            Ok(()) => self.stats.tx_frames += 1,
            Err(e) => {
                self.stats.dropped += 1;
                tracing::debug!("{DEVICE}: the backend refused a frame: {e}");
            }
        }
    }

    /// Moves received frames into the guest's buffers until the backend has no more or the
    /// guest has no room (the frame is then kept for the next receive-queue notification).
    fn process_rx(&mut self, irq: &mut dyn Interrupt) -> DeviceResult {
        let Some(mem) = self.mem.clone() else { return Ok(()) };
        let Some(mut queue) = super::take_ready_queue(&mut self.queues, RX_QUEUE)? else { return Ok(()) };
        let result = self.fill_rx(&mem, &mut queue, irq);
        self.queues[RX_QUEUE] = queue;
        result
    }

    /// One pass over the receive buffers available now (at most the queue size, however the
    /// guest rewrites its ring meanwhile): frames go in while they fit; the chains not used are
    /// given back for the next pass.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue, irq: &mut dyn Interrupt) -> DeviceResult {
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(source) => return Err(DeviceError::AvailableRing { queue: "receive", source }),
        };
        let mut next = 0;
        let mut used_any = false;
        let mut result = Ok(());
        while next < chains.len() {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => match self.check_rx_frame(len) {
                        Some(len) => len,
                        None => continue,
                    },
                    Ok(None) => break,
                    Err(e) => {
                        if !self.backend_error_logged {
                            self.backend_error_logged = true;
                            tracing::warn!("{DEVICE}: receiving from the backend: {e}");
                        }
                        break;
                    }
                },
            };
            let Some((taken, delivered)) = self.deliver(mem, &chains[next..], len) else {
                self.rx_pending = Some(len);
                break;
            };
            self.rx_pending = None;
            if delivered {
                self.stats.rx_frames += 1;
            } else {
                self.stats.dropped += 1;
            }
            if let Err(e) = self.complete(mem, queue, &taken) {
                result = Err(e);
                break;
            }
            next += taken.len();
            used_any = true;
        }
        // The chains not taken go back to the available ring.
        for _ in next..chains.len() {
            queue.go_to_previous_position();
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            irq.queue(RX_QUEUE as u16);
        }
        result
    }

    /// Checks the frame the backend put in `rx_buf[..len]` against what the guest accepted,
    /// clearing the header's checksum flags when it took no checksum offload; `None` (counted as
    /// dropped) when the guest could not handle it: shorter than the header, a checksum or
    /// segmentation offload it did not accept (left from before a reset), or, without
    /// segmentation, longer than the MTU allows.
    fn check_rx_frame(&mut self, len: usize) -> Option<usize> {
        let hdr = &mut self.rx_buf[..len.min(HDR_LEN)];
        let ok = len >= HDR_LEN && {
            let (flags, gso) = (hdr[0], hdr[1] & !GSO_ECN);
            let csum = self.acked & F_GUEST_CSUM != 0;
            let gso_ok = match gso {
                GSO_NONE => len - HDR_LEN <= usize::from(self.mtu) + ETH_OVERHEAD,
                GSO_TCPV4 => self.acked & F_GUEST_TSO4 != 0,
                GSO_TCPV6 => self.acked & F_GUEST_TSO6 != 0,
                _ => false,
            };
            if !csum {
                // DATA_VALID is only a hint; NEEDS_CSUM would leave the checksum to the guest.
                hdr[0] = 0;
            }
            gso_ok && (csum || flags & HDR_F_NEEDS_CSUM == 0)
        };
        if !ok {
            self.stats.dropped += 1;
        }
        ok.then_some(len)
    }

    /// Writes the frame in `rx_buf[..len]` into the first of `chains` it needs (one without
    /// mergeable buffers): the (head, bytes written) of each chain taken and whether the frame
    /// went in (false: it did not fit one buffer without mergeable buffers; dropped, its buffer
    /// returned empty). `None`: the chains are not enough; nothing is taken.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        chains: &[DescriptorChain<&GuestMemoryMmap>],
        len: usize,
    ) -> Option<(Vec<(u16, u32)>, bool)> {
        let mergeable = self.acked & F_MRG_RXBUF != 0;
        // (head, bytes written) of each chain taken, in order.
        let mut used: Vec<(u16, u32)> = Vec::new();
        // The header's place in the first usable chain; chains before it were unusable.
        let mut header = None;
        let mut first_of_frame = 0;
        let mut off = HDR_LEN;
        let mut chains = chains.iter();
        while header.is_none() || off < len {
            let chain = chains.next()?.clone();
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => {
                    self.errors.record(DEVICE, &format_args!("receive chain: {e}"));
                    used.push((head, 0));
                    continue;
                }
            };
            let mut written = 0;
            if header.is_none() {
                // The header goes whole into the first chain.
                let rest = match writer.available_bytes() {
                    n if n < HDR_LEN => None,
                    _ => writer.split_at(HDR_LEN).ok(),
                };
                let Some(rest) = rest else {
                    self.errors.record(DEVICE, &format_args!("receive buffer of {} bytes", writer.available_bytes()));
                    used.push((head, 0));
                    continue;
                };
                header = Some(writer);
                writer = rest;
                written = HDR_LEN;
                first_of_frame = used.len();
            }
            let n = writer.available_bytes().min(len - off);
            if let Err(e) = io::Write::write_all(&mut writer, &self.rx_buf[off..off + n]) {
                self.errors.record(DEVICE, &format_args!("receive buffer: {e}"));
            }
            used.push((head, (written + n) as u32));
            off += n;
            if off < len && !mergeable {
                // Without mergeable buffers the frame must fit one chain: dropped, the chain
                // returned empty.
                if let Some(last) = used.last_mut() {
                    last.1 = 0;
                }
                return Some((used, false));
            }
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(&self.rx_buf[..HDR_LEN]);
        let buffers = u16::try_from(used.len() - first_of_frame).unwrap_or(u16::MAX);
        hdr[NUM_BUFFERS..].copy_from_slice(&(if mergeable { buffers } else { 1 }).to_le_bytes());
        if let Some(mut header) = header {
            if let Err(e) = io::Write::write_all(&mut header, &hdr) {
                self.errors.record(DEVICE, &format_args!("receive header: {e}"));
            }
        }
        Some((used, true))
    }

    /// Puts the chains in the used ring (lengths as written).
    fn complete(&self, mem: &GuestMemoryMmap, queue: &mut Queue, used: &[(u16, u32)]) -> DeviceResult {
        for (head, len) in used {
            queue.add_used(mem, *head, *len).map_err(|source| DeviceError::UsedRing { queue: "receive", source })?;
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn pci_class(&self) -> u32 {
        0x02_0000 // network controller, Ethernet
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let offloads = if self.backend.vnet_hdr() { OFFLOADS } else { 0 };
        VIRTIO_F_VERSION_1 | F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | offloads
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, acked_features: u64) -> DeviceResult {
        if queues.len() != 2 {
            return Err(DeviceError::QueueCount { expected: 2, got: queues.len() });
        }
        if self.backend.vnet_hdr() {
            self.offloads_to_apply = Some(acked_features);
        }
        self.acked = acked_features;
        self.mem = Some(mem);
        self.queues = queues;
        Ok(())
    }
    fn queue_event(&mut self, index: usize, irq: &mut dyn Interrupt) -> DeviceResult {
        if self.broken {
            return Ok(());
        }
        self.apply_offloads();
        let result = match index {
            RX_QUEUE => self.process_rx(irq),
            TX_QUEUE => {
                let Some(mem) = self.mem.clone() else { return Ok(()) };
                let Some(mut queue) = super::take_ready_queue(&mut self.queues, TX_QUEUE)? else { return Ok(()) };
                let result = self.process_tx(&mem, &mut queue, irq);
                self.queues[TX_QUEUE] = queue;
                result
            }
            _ => Ok(()),
        };
        self.broken = result.is_err();
        result
    }
    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        self.acked = 0;
        self.rx_pending = None;
        self.offloads_to_apply = None;
        self.backend_error_logged = false;
        self.broken = false;
    }
    fn backend_init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.backend.fd() {
            // Writable too (an edge each time the fd can take output again after it could not):
            // a stream backend finishes what it kept back then.
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND_EVENT, set)) {
                tracing::error!("{DEVICE}: cannot watch the backend: {e:?}");
            }
        }
    }
    fn backend_event(&mut self, _events: Events, _ops: &mut EventOps, irq: &mut dyn Interrupt) -> DeviceResult {
        if self.broken {
            return Ok(());
        }
        self.apply_offloads();
        if let Err(e) = self.backend.writable() {
            self.errors.record(DEVICE, &format_args!("backend output: {e}"));
        }
        let result = self.process_rx(irq);
        self.broken = result.is_err();
        result
    }
    fn errors(&self) -> u64 {
        self.errors.get()
    }
}

#[cfg(test)]
mod tests;
