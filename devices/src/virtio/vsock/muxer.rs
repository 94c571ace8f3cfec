//! The host side of the device (Firecracker's "hybrid vsock"): the unix listener host processes
//! connect to, the `CONNECT <port>` handshake, guest connections to `<uds_path>_<port>`, the
//! table of connections, the queue of packets owed to the guest, timeouts, and the event-loop
//! registrations of every host socket.
//!
//! Guest packets arrive from the TX queue without access to the event loop, so registration
//! changes (new streams, interest changes, closed streams) are recorded and applied in
//! [`Muxer::reconcile`] from the next backend event; the device wakes the loop for that. A
//! closed stream is shut down at once (the host peer sees it immediately) and its descriptor is
//! kept until it is unregistered, so the event manager never sees a reused descriptor number.
use super::connection::{ConnKey, Connection, End};
use super::packet::{check_tx, Header, HOST_CID, OP_REQUEST, OP_RST};
use crate::virtio::transport::BACKEND_EVENT_BASE;
use crate::virtio::ErrorCounter;
use event_manager::{EventOps, EventSet, Events};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_vsock::packet::VsockPacket;
use vm_memory::VolatileSlice;
use vmm_sys_util::timerfd::TimerFd;

pub const DEV: &str = "virtio-vsock";

/// Event-loop data values: the listener, the device's wake eventfd, the timer, then streams.
pub const LISTENER_EVENT: u32 = BACKEND_EVENT_BASE;
pub const WAKE_EVENT: u32 = BACKEND_EVENT_BASE + 1;
pub const TIMER_EVENT: u32 = BACKEND_EVENT_BASE + 2;
const FIRST_STREAM_EVENT: u32 = BACKEND_EVENT_BASE + 3;

/// Connections plus host streams still in the CONNECT handshake.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host ports for host-initiated connections count up from here.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// How long a handshake or a close may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries in the RX queue before it is rebuilt from the connections (dropping queued RSTs).
const RXQ_CAP: usize = 2 * MAX_CONNECTIONS;
/// How long the listener rests after accept fails.
const LISTENER_PAUSE: Duration = Duration::from_secs(1);
/// Streams accepted per listener event (the listener is level-triggered: the rest come next).
const ACCEPT_BATCH: usize = 32;

/// A host stream that has not sent its `CONNECT <port>` line yet.
struct HostHandshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Clone, Copy, Debug)]
enum Owner {
    Handshake,
    Conn(ConnKey),
    /// Shut down, waiting to be unregistered.
    Retired,
}

enum RxItem {
    /// The connection owes the guest packets.
    Conn(ConnKey),
    /// A RST for a connection the device does not have (any more).
    Rst(Header),
}

struct Retired {
    stream: UnixStream,
    token: u32,
    registered: bool,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    timer: TimerFd,
    /// Handshake and close timeout.
    pub timeout: Duration,
    /// Connections plus handshakes at most.
    pub max_connections: usize,
    /// Accepting failed (out of descriptors?): the listener is unwatched until then, or until a
    /// stream closes.
    listener_resume: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u32, HostHandshake>,
    tokens: HashMap<u32, Owner>,
    next_token: u32,
    next_local_port: u32,
    rxq: VecDeque<RxItem>,
    retired: Vec<Retired>,
    /// Connections whose registration may differ from what they need.
    dirty: HashSet<ConnKey>,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
}

enum Line {
    Incomplete,
    Port(u32),
    Bad(String),
}

impl HostHandshake {
    /// Reads the handshake byte by byte so no payload after the line is consumed.
    fn read_line(&mut self) -> Line {
        loop {
            let mut b = [0u8; 1];
            match (&self.stream).read(&mut b) {
                Ok(0) => return Line::Bad("closed before CONNECT".into()),
                Ok(_) if b[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => {
                    self.line.push(b[0]);
                    if self.line.len() >= MAX_CONNECT_LINE {
                        return Line::Bad("CONNECT line too long".into());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Line::Incomplete,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Line::Bad(format!("read: {e}")),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> Line {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    match (words.next(), words.next().map(str::parse::<u32>), words.next()) {
        (Some(cmd), Some(Ok(port)), None) if cmd.eq_ignore_ascii_case("CONNECT") => Line::Port(port),
        _ => Line::Bad(format!("malformed CONNECT line {text:?}")),
    }
}

/// Connects to a unix socket without blocking (a listener with a full backlog fails at once
/// instead of stalling the event loop).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes that outlives the call, and
    // `fd` is an open socket.
    let r =
        unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener, timer: TimerFd) -> Self {
        Muxer {
            guest_cid,
            uds_path,
            listener,
            timer,
            timeout: DEFAULT_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            listener_resume: None,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_STREAM_EVENT,
            next_local_port: LOCAL_PORT_BASE,
            rxq: VecDeque::new(),
            retired: Vec::new(),
            dirty: HashSet::new(),
            armed: None,
        }
    }

    /// Registers the listener, `wake` and the timer.
    pub fn init(&self, ops: &mut EventOps, wake: &impl AsRawFd) {
        for (what, fd, data) in [
            ("listener", self.listener.as_raw_fd(), LISTENER_EVENT),
            ("wake eventfd", wake.as_raw_fd(), WAKE_EVENT),
            ("timer", self.timer.as_raw_fd(), TIMER_EVENT),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(device = DEV, "cannot watch the {what}: {e:?}");
            }
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn in_use(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    pub fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = if t == u32::MAX { FIRST_STREAM_EVENT } else { t + 1 };
            if !self.tokens.contains_key(&t) {
                return t;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX { LOCAL_PORT_BASE } else { p + 1 };
            if !self.conns.contains_key(&ConnKey { local_port: p, peer_port }) {
                return p;
            }
        }
    }

    fn note_deadline(&mut self, d: Option<Instant>) {
        let Some(d) = d else { return };
        if self.armed.is_none_or(|a| d < a) {
            self.arm(d);
        }
    }

    fn arm(&mut self, d: Instant) {
        let wait = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.armed = Some(d),
            Err(e) => tracing::error!(device = DEV, "cannot arm the timer: {e}"),
        }
    }

    fn push_rx(&mut self, item: RxItem) {
        if self.rxq.len() >= RXQ_CAP {
            // Only RSTs for unknown connections can fill it: rebuild from the connections.
            self.rxq.clear();
            for (key, c) in self.conns.iter_mut() {
                c.in_rxq = c.has_pending_rx();
                if c.in_rxq {
                    self.rxq.push_back(RxItem::Conn(*key));
                }
            }
        }
        self.rxq.push_back(item);
    }

    fn queue_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rxq && c.has_pending_rx() {
                c.in_rxq = true;
                self.push_rx(RxItem::Conn(key));
            }
        }
    }

    /// A RST answering guest packet `h`, addresses mirrored.
    fn rst_reply(&mut self, h: &Header) {
        self.push_rx(RxItem::Rst(Header {
            src_cid: h.dst_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            ..Header::to_guest(self.guest_cid, 0, 0, OP_RST)
        }));
    }

    fn retire(&mut self, stream: UnixStream, token: u32, registered: bool) {
        let _ = stream.shutdown(Shutdown::Both);
        if registered {
            self.tokens.insert(token, Owner::Retired);
            self.retired.push(Retired { stream, token, registered });
        } else {
            self.tokens.remove(&token);
        }
    }

    /// Ends a connection with a RST to the guest and closes its host stream.
    fn reset_conn(&mut self, key: ConnKey, end: End, errors: &ErrorCounter) {
        match &end {
            End::Guest(why) => errors.record(DEV, why),
            End::Host(why) => tracing::debug!(device = DEV, "reset: {why}"),
        }
        if let Some(c) = self.conns.remove(&key) {
            self.push_rx(RxItem::Rst(Header::to_guest(self.guest_cid, key.local_port, key.peer_port, OP_RST)));
            self.retire(c.stream, c.token, c.registered.is_some());
        }
    }

    /// Ends a connection the guest reset.
    fn drop_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.retire(c.stream, c.token, c.registered.is_some());
        }
    }

    /// Follows up on a connection that handled something.
    fn settle(&mut self, key: ConnKey, r: Result<(), End>, errors: &ErrorCounter) {
        match r {
            Ok(()) => {
                self.dirty.insert(key);
                self.queue_conn(key);
                let d = self.conns.get(&key).and_then(|c| c.deadline);
                self.note_deadline(d);
            }
            Err(end) => self.reset_conn(key, end, errors),
        }
    }

    /// A packet from the guest's TX queue.
    pub fn handle_tx(&mut self, h: &Header, data: Option<&VolatileSlice<'_, ()>>, errors: &ErrorCounter) {
        if let Err(why) = check_tx(h, self.guest_cid) {
            errors.record(DEV, &why);
            return;
        }
        if h.dst_cid != HOST_CID {
            if h.op != OP_RST {
                self.rst_reply(h);
            }
            return;
        }
        let key = ConnKey { local_port: h.dst_port, peer_port: h.src_port };
        if let Some(c) = self.conns.get_mut(&key) {
            if h.op == OP_RST {
                self.drop_conn(key);
            } else {
                let r = c.guest_packet(h, data);
                self.settle(key, r, errors);
            }
            return;
        }
        match h.op {
            OP_RST => {}
            OP_REQUEST => self.guest_connect(h, key),
            _ => self.rst_reply(h),
        }
    }

    /// The guest connects to host port `h.dst_port`: `<uds_path>_<port>`.
    fn guest_connect(&mut self, h: &Header, key: ConnKey) {
        if self.in_use() >= self.max_connections {
            tracing::warn!(
                device = DEV,
                "connection limit ({}) reached: refusing guest connection",
                self.max_connections
            );
            return self.rst_reply(h);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let token = self.alloc_token();
                self.tokens.insert(token, Owner::Conn(key));
                self.conns.insert(key, Connection::guest_initiated(key, stream, token, self.timeout, h));
                self.dirty.insert(key);
                self.queue_conn(key);
            }
            Err(e) => {
                tracing::debug!(device = DEV, "guest connection to {}: {e}", path.display());
                self.rst_reply(h);
            }
        }
    }

    /// The listener is readable: accept host streams and wait for their CONNECT line.
    pub fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Level-triggered: retrying now would spin. Pause, resume later.
                    tracing::warn!(device = DEV, "accept: {e}: pausing the listener");
                    let quiet = Events::with_data(&self.listener, LISTENER_EVENT, EventSet::empty());
                    if ops.modify(quiet).is_ok() {
                        let at = Instant::now() + LISTENER_PAUSE;
                        self.listener_resume = Some(at);
                        self.note_deadline(Some(at));
                    }
                    return;
                }
            };
            if self.in_use() >= self.max_connections {
                tracing::warn!(
                    device = DEV,
                    "connection limit ({}) reached: closing host stream",
                    self.max_connections
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(device = DEV, "host stream: {e}");
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = ops.add(Events::with_data(&stream, token, EventSet::IN)) {
                tracing::warn!(device = DEV, "cannot watch host stream: {e:?}");
                continue;
            }
            let deadline = Instant::now() + self.timeout;
            self.tokens.insert(token, Owner::Handshake);
            self.handshakes.insert(token, HostHandshake { stream, line: Vec::new(), deadline });
            self.note_deadline(Some(deadline));
        }
    }

    /// Readiness of host stream `token`.
    pub fn host_event(&mut self, token: u32, events: Events, errors: &ErrorCounter) {
        match self.tokens.get(&token).copied() {
            Some(Owner::Handshake) => self.handshake_event(token, events),
            Some(Owner::Conn(key)) => {
                let Some(c) = self.conns.get_mut(&key) else { return };
                if c.stream.as_raw_fd() != events.fd() {
                    return;
                }
                let r = c.host_event(events.event_set());
                self.settle(key, r, errors);
            }
            Some(Owner::Retired) | None => {}
        }
    }

    fn handshake_event(&mut self, token: u32, events: Events) {
        let Some(hs) = self.handshakes.get_mut(&token) else { return };
        if hs.stream.as_raw_fd() != events.fd() {
            return;
        }
        let line = if events.event_set().contains(EventSet::ERROR) {
            Line::Bad("socket error".into())
        } else {
            hs.read_line()
        };
        match line {
            Line::Incomplete => {}
            Line::Bad(why) => {
                tracing::debug!(device = DEV, "host stream closed: {why}");
                if let Some(hs) = self.handshakes.remove(&token) {
                    self.retire(hs.stream, token, true);
                }
            }
            Line::Port(port) => {
                let Some(hs) = self.handshakes.remove(&token) else { return };
                let key = ConnKey { local_port: self.alloc_local_port(port), peer_port: port };
                let mut c = Connection::host_initiated(key, hs.stream, token, self.timeout);
                c.registered = Some(EventSet::IN);
                let deadline = c.deadline;
                self.tokens.insert(token, Owner::Conn(key));
                self.conns.insert(key, c);
                self.dirty.insert(key);
                self.queue_conn(key);
                self.note_deadline(deadline);
            }
        }
    }

    /// The timer fired: end what is overdue, re-arm for what is left.
    pub fn timer_event(&mut self, errors: &ErrorCounter) {
        let now = Instant::now();
        self.armed = None;
        let late: Vec<u32> = self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(t, _)| *t).collect();
        for token in late {
            tracing::debug!(device = DEV, "host stream closed: no CONNECT line in time");
            if let Some(hs) = self.handshakes.remove(&token) {
                self.retire(hs.stream, token, true);
            }
        }
        let late: Vec<ConnKey> =
            self.conns.values().filter(|c| c.deadline.is_some_and(|d| d <= now)).map(|c| c.key).collect();
        for key in late {
            self.reset_conn(key, End::Host(format!("connection {key:?} timed out")), errors);
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.listener_resume)
            .min();
        match next {
            Some(d) => self.arm(d),
            // Setting the timer also clears its expiration count, so it stops polling readable.
            None => {
                if let Err(e) = self.timer.clear() {
                    tracing::error!(device = DEV, "cannot clear the timer: {e}");
                }
            }
        }
    }

    /// Writes the next packet owed to the guest into `pkt`; returns its payload length, or
    /// `None` when nothing is owed after all.
    pub fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>, errors: &ErrorCounter) -> Option<u32> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Rst(h) => match h.write_to(pkt) {
                    Ok(()) => return Some(0),
                    Err(e) => errors.record(DEV, &format_args!("rx buffer: {e}")),
                },
                RxItem::Conn(key) => {
                    let Some(c) = self.conns.get_mut(&key) else { continue };
                    c.in_rxq = false;
                    match c.next_rx(pkt, self.guest_cid) {
                        Ok(Some(len)) => {
                            self.settle(key, Ok(()), errors);
                            return Some(len);
                        }
                        Ok(None) => self.settle(key, Ok(()), errors),
                        Err(end) => self.reset_conn(key, end, errors),
                    }
                }
            }
        }
        None
    }

    /// Whether registrations wait for [`Muxer::reconcile`].
    pub fn needs_reconcile(&mut self) -> bool {
        let conns = &self.conns;
        self.dirty.retain(|k| conns.get(k).is_some_and(|c| c.desired_events() != c.registered));
        !self.dirty.is_empty() || !self.retired.is_empty()
    }

    /// Applies registration changes: unregisters and closes retired streams, registers new
    /// ones, updates interests.
    pub fn reconcile(&mut self, ops: &mut EventOps, errors: &ErrorCounter) {
        let mut closed_any = false;
        while !self.retired.is_empty() || !self.dirty.is_empty() {
            for r in std::mem::take(&mut self.retired) {
                closed_any = true;
                if r.registered {
                    if let Err(e) = ops.remove(Events::empty(&r.stream)) {
                        tracing::warn!(device = DEV, "cannot unwatch host stream: {e:?}");
                    }
                }
                self.tokens.remove(&r.token);
            }
            for key in std::mem::take(&mut self.dirty) {
                let Some(c) = self.conns.get_mut(&key) else { continue };
                let want = c.desired_events();
                if want == c.registered {
                    continue;
                }
                let r = match (c.registered, want) {
                    (None, Some(ev)) => ops.add(Events::with_data(&c.stream, c.token, ev)),
                    (Some(_), Some(ev)) => ops.modify(Events::with_data(&c.stream, c.token, ev)),
                    (Some(_), None) => ops.remove(Events::empty(&c.stream)),
                    (None, None) => Ok(()),
                };
                match r {
                    Ok(()) => c.registered = want,
                    Err(e) => self.reset_conn(key, End::Host(format!("event registration: {e:?}")), errors),
                }
            }
        }
        if self.listener_resume.is_some_and(|t| closed_any || t <= Instant::now()) {
            match ops.modify(Events::with_data(&self.listener, LISTENER_EVENT, EventSet::IN)) {
                Ok(()) => self.listener_resume = None,
                Err(e) => tracing::error!(device = DEV, "cannot watch the listener: {e:?}"),
            }
        }
    }

    /// Drops every connection and handshake (the guest forgot them); keeps the listener.
    pub fn reset(&mut self) {
        let conns: Vec<Connection> = self.conns.drain().map(|(_, c)| c).collect();
        for c in conns {
            self.retire(c.stream, c.token, c.registered.is_some());
        }
        let handshakes: Vec<(u32, HostHandshake)> = self.handshakes.drain().collect();
        for (token, hs) in handshakes {
            self.retire(hs.stream, token, true);
        }
        self.rxq.clear();
        self.dirty.clear();
    }
}
