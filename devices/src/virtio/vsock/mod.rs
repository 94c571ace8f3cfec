//! virtio-vsock (virtio 1.2, section 5.10) with a Firecracker-style "hybrid vsock" backend: the
//! guest's vsock streams map to unix streams on the host.
//!
//! - Host to guest: a host process connects to the unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; the device sends the guest a REQUEST for `port` from a fresh host port
//!   and, once the guest answers RESPONSE, writes `OK <host port>\n` back. From then on the unix
//!   stream carries the connection's bytes.
//! - Guest to host: a guest connection to CID 2, port `P` is connected to the unix socket at
//!   `<uds_path>_<P>`; RESPONSE on success, RST otherwise.
//!
//! Queues: 0 receive (device to guest), 1 transmit, 2 events (never used by this device).
//!
//! Limits: 1024 connections (host streams still sending their CONNECT line included), 256 KiB
//! of buffered guest data per connection (exactly the credit the guest gets), 64 KiB per packet,
//! 2 s for a handshake or a close. Sockets are non-blocking; timeouts use a timerfd.
//!
//! Modules: [`packet`] (headers and checks), `connection` (one stream: handshake, credit
//! flow control, shutdown) and `muxer` (the listener, connection table, packets owed to the
//! guest, timeouts, event-loop registrations).
mod connection;
mod muxer;
pub mod packet;

use super::{
    read_config_bytes, DeviceError, DeviceResult, ErrorCounter, Interrupt, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use event_manager::{EventOps, Events};
use muxer::{Muxer, DEV, LISTENER_EVENT, TIMER_EVENT, WAKE_EVENT};
use packet::{Header, MAX_PKT_DATA};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock: {0}: guest CID {1} is reserved or out of range")]
    Cid(PathBuf, u64),
    #[error("vsock: {0}: exists and is not a unix socket")]
    NotASocket(PathBuf),
    #[error("vsock: {0}: cannot remove the stale socket: {1}")]
    Stale(PathBuf, std::io::Error),
    #[error("vsock: {0}: cannot listen: {1}")]
    Bind(PathBuf, std::io::Error),
    #[error("vsock: {0}: {1}")]
    Setup(PathBuf, std::io::Error),
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Device and inode of the socket file we bound, so drop removes only our own.
    socket_id: (u64, u64),
    muxer: Muxer,
    /// Wakes the event loop to apply registration changes made outside it.
    wake: EventFd,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    /// A queue's rings are corrupt: stop until the driver resets the device.
    broken: bool,
    errors: ErrorCounter,
}

impl Vsock {
    /// Binds the host-side unix listener at `uds_path` (a stale socket file there is replaced;
    /// an existing non-socket file is an error). The socket file is removed on drop.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        let path = uds_path.to_path_buf();
        // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is "any"; upper bits reserved.
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(path, guest_cid));
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VsockError::Setup(path.clone(), e))?;
        let timer = TimerFd::new().map_err(|e| VsockError::Setup(path.clone(), e.into()))?;
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_socket() => {
                std::fs::remove_file(&path).map_err(|e| VsockError::Stale(path.clone(), e))?
            }
            Ok(_) => return Err(VsockError::NotASocket(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VsockError::Bind(path, e)),
        }
        let listener = UnixListener::bind(&path).map_err(|e| VsockError::Bind(path.clone(), e))?;
        let setup = listener.set_nonblocking(true).and_then(|()| std::fs::symlink_metadata(&path));
        let md = match setup {
            Ok(md) => md,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(VsockError::Setup(path, e));
            }
        };
        Ok(Vsock {
            guest_cid,
            socket_id: (md.dev(), md.ino()),
            muxer: Muxer::new(guest_cid, path.clone(), listener, timer),
            uds_path: path,
            wake,
            mem: None,
            queues: Vec::new(),
            broken: false,
            errors: ErrorCounter::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections (established or in handshake with the guest).
    pub fn connections(&self) -> usize {
        self.muxer.connections()
    }

    /// Asks the event loop for a backend event if registrations changed outside it.
    fn kick(&mut self) {
        if self.muxer.needs_reconcile() {
            if let Err(e) = self.wake.write(1) {
                tracing::error!(device = DEV, "cannot wake the event loop: {e}");
            }
        }
    }

    /// Guest memory, if queue `index` is there to be processed.
    fn ready(&self, index: usize) -> Option<GuestMemoryMmap> {
        if self.broken || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return None;
        }
        self.mem.clone()
    }

    /// Takes every packet the guest queued for transmission.
    fn process_tx(&mut self, irq: &mut dyn Interrupt) -> DeviceResult {
        let Some(mem) = self.ready(TX_QUEUE) else { return Ok(()) };
        let queue = &mut self.queues[TX_QUEUE];
        // One pass over what is available now: the driver notifies again for later packets.
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match queue.iter(&mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                self.broken = true;
                return Err(DeviceError::AvailableRing { queue: "tx", source: e });
            }
        };
        let used_any = !chains.is_empty();
        for mut chain in chains {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.handle_tx(&Header::of(&pkt), pkt.data_slice(), &self.errors),
                Err(e) => self.errors.record(DEV, &format_args!("tx packet: {e}")),
            }
            if let Err(e) = queue.add_used(&mem, head, 0) {
                self.broken = true;
                return Err(DeviceError::UsedRing { queue: "tx", source: e });
            }
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            irq.queue(TX_QUEUE as u16);
        }
        Ok(())
    }

    /// Fills the guest's receive buffers with packets owed to it.
    fn process_rx(&mut self, irq: &mut dyn Interrupt) -> DeviceResult {
        let Some(mem) = self.ready(RX_QUEUE) else { return Ok(()) };
        let queue = &mut self.queues[RX_QUEUE];
        let mut used_any = false;
        let mut result = Ok(());
        while self.muxer.has_rx() {
            let mut chain = match queue.iter(&mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => break, // no buffers: the packets wait for the next rx notification
                },
                Err(e) => {
                    self.broken = true;
                    result = Err(DeviceError::AvailableRing { queue: "rx", source: e });
                    break;
                }
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) if pkt.data_slice().is_some_and(|d| !d.is_empty()) => {
                    match self.muxer.fill_rx(&mut pkt, &self.errors) {
                        Some(n) => PKT_HEADER_SIZE as u32 + n,
                        None => {
                            queue.go_to_previous_position(); // nothing to send: keep the buffer
                            break;
                        }
                    }
                }
                Ok(_) => {
                    self.errors.record(DEV, &"rx buffer without room for data");
                    0
                }
                Err(e) => {
                    self.errors.record(DEV, &format_args!("rx buffer: {e}"));
                    0
                }
            };
            if let Err(e) = queue.add_used(&mem, head, len) {
                self.broken = true;
                result = Err(DeviceError::UsedRing { queue: "rx", source: e });
                break;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            irq.queue(RX_QUEUE as u16);
        }
        result
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.uds_path) {
            if (md.dev(), md.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn pci_class(&self) -> u32 {
        0x07_8000 // communication controller, other
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data)
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, _features: u64) -> DeviceResult {
        if queues.len() != 3 {
            return Err(DeviceError::QueueCount { expected: 3, got: queues.len() });
        }
        self.mem = Some(mem);
        self.queues = queues;
        self.broken = false;
        Ok(())
    }
    fn queue_event(&mut self, index: usize, irq: &mut dyn Interrupt) -> DeviceResult {
        let r = match index {
            RX_QUEUE => self.process_rx(irq),
            TX_QUEUE => self.process_tx(irq).and_then(|()| self.process_rx(irq)),
            _ => Ok(()), // event queue: buffers stay with the device, unused
        };
        self.kick();
        r
    }
    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        self.broken = false;
        self.muxer.reset();
        self.kick();
    }
    fn backend_init(&mut self, ops: &mut EventOps) {
        self.muxer.init(ops, &self.wake);
    }
    fn backend_event(&mut self, events: Events, ops: &mut EventOps, irq: &mut dyn Interrupt) -> DeviceResult {
        match events.data() {
            LISTENER_EVENT => self.muxer.accept(ops),
            WAKE_EVENT => {
                let _ = self.wake.read();
            }
            TIMER_EVENT => self.muxer.timer_event(&self.errors),
            token => self.muxer.host_event(token, events, &self.errors),
        }
        let r = self.process_rx(irq);
        self.muxer.reconcile(ops, &self.errors);
        r
    }
    fn errors(&self) -> u64 {
        self.errors.get()
    }
    fn queue_progress(&self) -> Vec<(u16, u16)> {
        super::queue_progress(&self.queues)
    }
    /// Only with no connection: a host socket cannot be saved (a template is taken with none).
    fn can_snapshot(&self) -> Result<(), String> {
        match self.muxer.connections() {
            0 if self.muxer.has_rx() => Err("vsock packets owed to the guest".into()),
            0 => Ok(()),
            n => Err(format!("{n} vsock connection(s) open")),
        }
    }
}

#[cfg(test)]
mod tests;
