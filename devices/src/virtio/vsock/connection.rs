//! One vsock stream between a guest port and a host unix stream: handshake state, credit-based
//! flow control both ways (virtio 1.2, section 5.10.6.3), shutdown and the packets it owes the
//! guest.
//!
//! Host-to-guest data is read from the unix stream straight into guest RX buffers, never more
//! than the guest's credit allows, so nothing is buffered on that side. Guest-to-host data is
//! written to the stream at once; what the stream does not take is kept in `tx_buf`, which
//! cannot outgrow [`CONN_BUF_ALLOC`] because that is the credit the guest gets.
use super::packet::{
    Header, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};
use event_manager::EventSet;
use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// The receive buffer each connection announces to the guest (its credit for guest-to-host data)
/// and so the most guest data one connection ever buffers.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// A connection is named by its two ports; the CIDs are always the host's and the guest's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ConnKey {
    /// The host side: the port the guest connected to, or the one the device allocated.
    pub local_port: u32,
    /// The guest side.
    pub peer_port: u32,
}

/// Why a connection ends with a RST to the guest.
#[derive(Debug)]
pub enum End {
    /// The guest broke the protocol: counted as a guest error.
    Guest(String),
    /// The host side failed, went away, or a timeout expired.
    Host(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

// Packets a connection owes the guest (a set: each is sent once, in this order of priority).
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_RW: u8 = 4;
const P_SHUTDOWN: u8 = 8;
const P_CREDIT_UPDATE: u8 = 16;

pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    /// Event-loop data value of `stream`.
    pub token: u32,
    /// The epoll registration in place (`None`: not registered).
    pub registered: Option<EventSet>,
    /// Queued in the muxer's RX queue.
    pub in_rxq: bool,
    /// The connection is reset if still unsettled then (handshake or close).
    pub deadline: Option<Instant>,
    timeout: Duration,
    state: State,
    pending: u8,
    /// SHUTDOWN flags told (or to be told) to the guest.
    shutdown_sent: u32,
    // Host-to-guest flow: the guest's buffer and what it has consumed, what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    // Guest-to-host flow: bytes received, bytes written to the host, last fwd_cnt told.
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are not guest data (the `OK <port>` line).
    tx_ctrl: usize,
    /// Read returned end of file: the host sends no more.
    host_eof: bool,
    /// The host closed its end entirely (epoll HUP): it receives no more either.
    host_hup: bool,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    host_write_shut: bool,
    /// The guest shut down both directions: reset once `tx_buf` is written out.
    closing: bool,
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

impl Connection {
    fn new(key: ConnKey, stream: UnixStream, token: u32, timeout: Duration, state: State, pending: u8) -> Self {
        Connection {
            key,
            stream,
            token,
            registered: None,
            in_rxq: false,
            deadline: None,
            timeout,
            state,
            pending,
            shutdown_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            tx_ctrl: 0,
            host_eof: false,
            host_hup: false,
            guest_shut_send: false,
            guest_shut_recv: false,
            host_write_shut: false,
            closing: false,
        }
    }

    /// A host process asked for guest port `key.peer_port`: REQUEST the guest, wait for RESPONSE.
    pub fn host_initiated(key: ConnKey, stream: UnixStream, token: u32, timeout: Duration) -> Self {
        let mut c = Connection::new(key, stream, token, timeout, State::LocalInit, P_REQUEST);
        c.deadline = Some(Instant::now() + timeout);
        c
    }

    /// The guest's REQUEST `h` was connected to a host stream: RESPONSE it.
    pub fn guest_initiated(key: ConnKey, stream: UnixStream, token: u32, timeout: Duration, h: &Header) -> Self {
        let mut c = Connection::new(key, stream, token, timeout, State::Established, P_RESPONSE);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        c
    }

    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than it was sent gets no credit at all.
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_recv && !self.closing
    }

    /// The epoll interest this connection needs now; `None` once the host hung up (reads are then
    /// driven by credit until end of file, and a hung-up socket would report HUP forever).
    pub fn desired_events(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut ev = EventSet::empty();
        if self.can_read_host() && self.pending & P_RW == 0 && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// A guest packet for this connection, header already checked (RST is the muxer's).
    pub fn guest_packet(&mut self, h: &Header, data: Option<&VolatileSlice<'_, ()>>) -> Result<(), End> {
        let had_credit = self.peer_credit() > 0;
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match h.op {
            OP_RESPONSE => {
                if self.state != State::LocalInit {
                    return Err(End::Guest(format!("RESPONSE on established connection {:?}", self.key)));
                }
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.key.local_port);
                self.tx_buf.extend(line.as_bytes());
                self.tx_ctrl += line.len();
                self.flush()?;
            }
            OP_RW => {
                if self.state != State::Established || self.guest_shut_send {
                    return Err(End::Guest(format!("data on connection {:?} that does not accept it", self.key)));
                }
                if let Some(d) = data {
                    self.guest_data(d)?;
                }
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_RCV != 0 && !self.guest_shut_recv {
                    self.guest_shut_recv = true;
                    self.pending &= !P_RW;
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                if h.flags & SHUTDOWN_SEND != 0 {
                    self.guest_shut_send = true;
                }
                if self.guest_shut_recv && self.guest_shut_send && !self.closing {
                    self.closing = true;
                    self.deadline = Some(Instant::now() + self.timeout);
                }
                self.after_flush()?;
            }
            OP_CREDIT_REQUEST => self.pending |= P_CREDIT_UPDATE,
            OP_CREDIT_UPDATE => {}
            OP_REQUEST => return Err(End::Guest(format!("REQUEST for existing connection {:?}", self.key))),
            _ => {}
        }
        if !had_credit && self.peer_credit() > 0 && self.can_read_host() {
            // Credit is back: try a read now rather than after an event-loop round trip.
            self.pending |= P_RW;
        }
        Ok(())
    }

    fn guest_data(&mut self, d: &VolatileSlice<'_, ()>) -> Result<(), End> {
        let len = d.len();
        if len == 0 {
            return Ok(());
        }
        if self.tx_buf.len() - self.tx_ctrl + len > CONN_BUF_ALLOC as usize {
            return Err(End::Guest(format!("connection {:?}: guest sent beyond its credit", self.key)));
        }
        self.recv_cnt += len as u32;
        let mut written = 0;
        while written < len && self.tx_buf.is_empty() {
            let rest = d.offset(written).map_err(|e| End::Guest(e.to_string()))?;
            match (&self.stream).write_volatile(&rest) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if would_block(&e) => break,
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Host(format!("write: {e}"))),
            }
        }
        if written < len {
            let rest = d.offset(written).map_err(|e| End::Guest(e.to_string()))?;
            let mut copy = vec![0u8; rest.len()];
            rest.read_slice(&mut copy, 0).map_err(|e| End::Guest(e.to_string()))?;
            self.tx_buf.extend(copy);
        }
        self.fwd_cnt += written as u32;
        self.credit_update_if_low();
        Ok(())
    }

    /// Writes out as much of `tx_buf` as the host stream takes.
    fn flush(&mut self) -> Result<(), End> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Err(End::Host("write: stream closed".into())),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ctrl = n.min(self.tx_ctrl);
                    self.tx_ctrl -= ctrl;
                    self.fwd_cnt += (n - ctrl) as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Host(format!("write: {e}"))),
            }
        }
        self.credit_update_if_low();
        self.after_flush()
    }

    /// Once guest data is all written: pass on the guest's shutdown of its sending side, or end
    /// a connection the guest has closed.
    fn after_flush(&mut self) -> Result<(), End> {
        if !self.tx_buf.is_empty() {
            return Ok(());
        }
        if self.closing {
            return Err(End::Host(format!("connection {:?} closed by the guest", self.key)));
        }
        if self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Tells the guest about consumed data when its view of our free space drops below half.
    fn credit_update_if_low(&mut self) {
        if self.fwd_cnt == self.fwd_cnt_sent {
            return;
        }
        let guest_view_used = (self.recv_cnt - self.fwd_cnt_sent).0;
        if CONN_BUF_ALLOC.saturating_sub(guest_view_used) < CONN_BUF_ALLOC / 2 {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Queues the SHUTDOWN flags the host side has earned and not yet told.
    fn update_host_shutdown(&mut self) {
        let mut flags = self.shutdown_sent;
        if self.host_eof {
            flags |= SHUTDOWN_SEND;
        }
        if self.host_hup {
            flags |= SHUTDOWN_RCV;
        }
        if flags != self.shutdown_sent {
            self.shutdown_sent = flags;
            self.pending |= P_SHUTDOWN;
        }
    }

    /// Readiness of the host stream.
    pub fn host_event(&mut self, ev: EventSet) -> Result<(), End> {
        if ev.contains(EventSet::ERROR) {
            return Err(End::Host(format!("connection {:?}: socket error", self.key)));
        }
        if ev.contains(EventSet::OUT) {
            self.flush()?;
        }
        if ev.contains(EventSet::HANG_UP) && !self.host_hup {
            if self.state == State::LocalInit {
                return Err(End::Host(format!("connection {:?}: host left before the guest answered", self.key)));
            }
            self.host_hup = true;
            // Nobody reads what is still buffered for the host.
            self.tx_buf.clear();
            self.tx_ctrl = 0;
            self.update_host_shutdown();
            self.after_flush()?;
        }
        if ev.intersects(EventSet::IN | EventSet::HANG_UP) && self.can_read_host() {
            self.pending |= P_RW;
        }
        Ok(())
    }

    /// Writes the next packet this connection owes the guest into `pkt`; returns its payload
    /// length, or `None` when it owes nothing after all (no data to read, no credit).
    pub fn next_rx(&mut self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> Result<Option<u32>, End> {
        let (op, len, flags) = loop {
            if self.pending & P_REQUEST != 0 {
                self.pending &= !P_REQUEST;
                break (OP_REQUEST, 0, 0);
            }
            if self.pending & P_RESPONSE != 0 {
                self.pending &= !P_RESPONSE;
                break (OP_RESPONSE, 0, 0);
            }
            if self.pending & P_RW != 0 {
                self.pending &= !P_RW;
                if let Some(n) = self.read_host(pkt)? {
                    break (OP_RW, n, 0);
                }
                continue;
            }
            if self.pending & P_SHUTDOWN != 0 {
                self.pending &= !P_SHUTDOWN;
                if self.shutdown_sent == SHUTDOWN_RCV | SHUTDOWN_SEND && self.deadline.is_none() {
                    // Wait for the guest's RST, not forever.
                    self.deadline = Some(Instant::now() + self.timeout);
                }
                break (OP_SHUTDOWN, 0, self.shutdown_sent);
            }
            if self.pending & P_CREDIT_UPDATE != 0 {
                self.pending &= !P_CREDIT_UPDATE;
                break (OP_CREDIT_UPDATE, 0, 0);
            }
            return Ok(None);
        };
        let h = Header {
            len,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Header::to_guest(guest_cid, self.key.local_port, self.key.peer_port, op)
        };
        h.write_to(pkt).map_err(|e| End::Guest(format!("rx buffer: {e}")))?;
        // Every packet carries fwd_cnt, so a separate credit update is no longer owed.
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !P_CREDIT_UPDATE;
        Ok(Some(len))
    }

    /// Reads host data into the packet's data buffer, within the guest's credit.
    fn read_host(&mut self, pkt: &VsockPacket<'_, ()>) -> Result<Option<u32>, End> {
        if !self.can_read_host() {
            return Ok(None);
        }
        let credit = self.peer_credit();
        let Some(data) = pkt.data_slice().copied() else { return Ok(None) };
        let cap = (credit as usize).min(data.len()).min(MAX_PKT_DATA as usize);
        if cap == 0 {
            return Ok(None); // no credit: a CREDIT_UPDATE from the guest brings us back
        }
        match data.read_volatile_from(0, &mut &self.stream, cap) {
            Ok(0) => {
                self.host_eof = true;
                self.update_host_shutdown();
                Ok(None)
            }
            Ok(n) => {
                self.rx_cnt += n as u32;
                // A full read likely left more; a hung-up stream is not polled: read on.
                if (n == cap || self.host_hup) && self.peer_credit() > 0 {
                    self.pending |= P_RW;
                }
                Ok(Some(n as u32))
            }
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(End::Host(format!("connection {:?}: read: {e}", self.key))),
        }
    }
}
