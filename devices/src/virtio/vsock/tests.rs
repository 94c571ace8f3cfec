//! virtio-vsock driven like a guest driver would, through virtio-queue's mock split queues on
//! real guest memory, with real unix sockets in a temporary directory and the backend events
//! dispatched by a real event manager.
use super::connection::CONN_BUF_ALLOC;
use super::muxer::LOCAL_PORT_BASE;
use super::packet::*;
use super::*;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const MEM_SIZE: usize = 0x200_0000;
const RING: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
const RX_BUF: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_BUF_LEN: u32 = PKT_HEADER_SIZE as u32 + 4096;
const TX_BUF: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_1000;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

use crate::virtio::test_utils::{Irqs, NEXT, WRITE};

struct Dev {
    vsock: Vsock,
    irqs: Irqs,
    backend_errors: Vec<DeviceError>,
}

/// Feeds backend events to the device, as the transport's subscriber does.
struct Sub(Arc<Mutex<Dev>>);
impl MutEventSubscriber for Sub {
    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap().vsock.backend_init(ops);
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut d = self.0.lock().unwrap();
        let Dev { vsock, irqs, backend_errors } = &mut *d;
        if let Err(e) = vsock.backend_event(events, ops, irqs) {
            backend_errors.push(e);
        }
    }
}

fn encode(h: &Header) -> [u8; PKT_HEADER_SIZE] {
    let mut b = [0u8; PKT_HEADER_SIZE];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Header {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// A guest packet from guest port `gport` to host port `hport`.
fn g(op: u16, gport: u32, hport: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: gport,
        dst_port: hport,
        type_: TYPE_STREAM,
        op,
        buf_alloc: GUEST_BUF_ALLOC,
        ..Header::default()
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    vqs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    dev: Arc<Mutex<Dev>>,
    em: EventManager<Sub>,
    dir: PathBuf,
    uds: PathBuf,
    /// Descriptors used so far per queue (chains are laid out one after the other).
    next_desc: [u16; 3],
    rx_buffers: u16,
    tx_packets: u64,
    rx_seen: u16,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("shoji-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let vsock = Vsock::new(CID, &uds).unwrap();
        // Leaked so the mock queues (which borrow memory) can live in the rig; tests only.
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()));
        let vqs: Vec<_> = RING.iter().map(|a| MockSplitQueue::create(mem, GuestAddress(*a), QUEUE_SIZE)).collect();
        let dev = Arc::new(Mutex::new(Dev { vsock, irqs: Irqs::default(), backend_errors: Vec::new() }));
        let queues: Vec<Queue> = vqs.iter().map(|vq| vq.create_queue().unwrap()).collect();
        {
            let mut d = dev.lock().unwrap();
            let features = d.vsock.features();
            d.vsock.activate(mem.clone(), queues, features).unwrap();
        }
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(Sub(dev.clone()));
        Rig { mem, vqs, dev, em, dir, uds, next_desc: [0; 3], rx_buffers: 0, tx_packets: 0, rx_seen: 0 }
    }

    fn dev(&self) -> MutexGuard<'_, Dev> {
        self.dev.lock().unwrap()
    }

    fn errors(&self) -> u64 {
        self.dev().vsock.errors()
    }

    fn queue_event(&mut self, q: usize) -> DeviceResult {
        let mut d = self.dev();
        let Dev { vsock, irqs, .. } = &mut *d;
        vsock.queue_event(q, irqs)
    }

    /// Adds one chain (NEXT flags and indices filled in) to queue `q`.
    fn add_chain(&mut self, q: usize, descs: &[RawDescriptor]) {
        let base = self.next_desc[q];
        let chained = crate::virtio::test_utils::chained(descs, base);
        self.vqs[q].add_desc_chains(&chained, base).unwrap();
        self.next_desc[q] = base + descs.len() as u16;
    }

    /// The guest posts `n` receive buffers (one descriptor each: header and 4 KiB of data).
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let addr = RX_BUF + u64::from(self.rx_buffers) * RX_STRIDE;
            self.add_chain(RX_QUEUE, &[desc(addr, RX_BUF_LEN, WRITE)]);
            self.rx_buffers += 1;
        }
        self.queue_event(RX_QUEUE).unwrap();
    }

    /// The guest transmits one packet: header and data in two descriptors, or one.
    fn send_with(&mut self, h: Header, data: &[u8], one_descriptor: bool) {
        let addr = TX_BUF + (self.tx_packets % 256) * TX_STRIDE;
        self.tx_packets += 1;
        self.mem.write_slice(&encode(&h), GuestAddress(addr)).unwrap();
        let data_addr = addr + PKT_HEADER_SIZE as u64;
        self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
        if data.is_empty() {
            self.add_chain(TX_QUEUE, &[desc(addr, PKT_HEADER_SIZE as u32, 0)]);
        } else if one_descriptor {
            self.add_chain(TX_QUEUE, &[desc(addr, (PKT_HEADER_SIZE + data.len()) as u32, 0)]);
        } else {
            self.add_chain(TX_QUEUE, &[desc(addr, PKT_HEADER_SIZE as u32, 0), desc(data_addr, data.len() as u32, 0)]);
        }
        self.queue_event(TX_QUEUE).unwrap();
    }

    fn send(&mut self, h: Header, data: &[u8]) {
        self.send_with(Header { len: data.len() as u32, ..h }, data, false)
    }

    /// Packets the device put in the guest's receive buffers since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = &self.vqs[RX_QUEUE].used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let e = used.ring().ref_at(usize::from(self.rx_seen) % usize::from(QUEUE_SIZE)).unwrap().load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUF + u64::from(e.id()) * RX_STRIDE;
            let mut raw = vec![0u8; e.len() as usize];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = decode(&raw[..PKT_HEADER_SIZE]);
            assert_eq!(e.len() as usize, PKT_HEADER_SIZE + h.len as usize, "used length matches {h:?}");
            out.push((h, raw[PKT_HEADER_SIZE..].to_vec()));
        }
        out
    }

    /// Runs the event loop until it is idle.
    fn pump(&mut self) {
        for _ in 0..100 {
            if self.em.run_with_timeout(5).unwrap() == 0 {
                break;
            }
        }
        assert!(self.dev().backend_errors.is_empty(), "{:?}", self.dev().backend_errors);
    }

    /// Runs the event loop until the guest received at least `n` more packets.
    fn wait_rx(&mut self, n: usize) -> Vec<(Header, Vec<u8>)> {
        let mut got = self.recv();
        let until = Instant::now() + Duration::from_secs(5);
        while got.len() < n {
            assert!(Instant::now() < until, "waited for {n} packets, got {got:?}");
            self.em.run_with_timeout(10).unwrap();
            got.extend(self.recv());
        }
        got
    }

    /// Host data arriving for the guest on one connection, until `len` bytes came; the guest
    /// consumes it and says so (credit update) whenever it got half its buffer.
    fn guest_read(&mut self, gport: u32, hport: u32, len: usize) -> Vec<u8> {
        let mut data = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while data.len() < len {
            assert!(Instant::now() < until, "waited for {len} bytes, got {}", data.len());
            self.em.run_with_timeout(10).unwrap();
            for (h, d) in self.recv() {
                assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, hport, gport), "{h:?}");
                data.extend(d);
            }
            if self.rx_buffers - self.rx_seen < 4 {
                self.give_rx(8);
            }
        }
        data
    }

    /// A host process connects through the listener and asks for guest port `port`.
    fn host_connect(&self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s
    }

    /// The full host-initiated handshake; returns the stream and the device's port.
    fn host_initiated(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect(port);
        let req = self.wait_rx(1);
        assert_eq!(req.len(), 1);
        let h = req[0].0;
        assert_eq!((h.op, h.dst_port, h.src_cid, h.dst_cid, h.type_), (OP_REQUEST, port, HOST_CID, CID, TYPE_STREAM));
        self.send(g(OP_RESPONSE, port, h.src_port), &[]);
        assert_eq!(read_line(&mut s), format!("OK {}", h.src_port));
        (s, h.src_port)
    }

    /// A host service listening on `<uds>_<port>`.
    fn host_listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).unwrap()
    }

    /// The guest connects to `port` served by `l`; returns the accepted host stream.
    fn guest_connect(&mut self, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
        self.send(g(OP_REQUEST, gport, port), &[]);
        let resp = self.wait_rx(1);
        assert_eq!(resp.len(), 1);
        assert_eq!((resp[0].0.op, resp[0].0.src_port, resp[0].0.dst_port), (OP_RESPONSE, port, gport));
        assert_eq!(resp[0].0.buf_alloc, CONN_BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// The host stream was closed by the device: end of file (or reset) on read.
fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("stream still open: {other:?}"),
    }
}

#[test]
fn identity_and_config() {
    let r = Rig::new("identity");
    let d = r.dev();
    assert_eq!(d.vsock.device_type(), TYPE_VSOCK);
    assert_eq!(d.vsock.queue_max_sizes(), vec![256, 256, 256]);
    assert_eq!(d.vsock.features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 8];
    d.vsock.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut tail = [0xffu8; 4];
    d.vsock.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut r = Rig::new("host");
    r.give_rx(16);
    let (mut host, local) = r.host_initiated(52);
    assert!(local >= LOCAL_PORT_BASE);
    host.write_all(b"ping from host").unwrap();
    assert_eq!(r.guest_read(52, local, 14), b"ping from host");
    r.send(g(OP_RW, 52, local), b"pong from guest");
    assert_eq!(read_n(&mut host, 15), b"pong from guest");
    // Header and data in one descriptor (Linux 6.2+) work too.
    r.send_with(Header { len: 3, ..g(OP_RW, 52, local) }, b"one", true);
    assert_eq!(read_n(&mut host, 3), b"one");
    // Data written right after the CONNECT line, before OK, is not lost.
    let mut early = r.host_connect(53);
    early.write_all(b"early").unwrap();
    let req = r.wait_rx(1)[0].0;
    r.send(g(OP_RESPONSE, 53, req.src_port), &[]);
    assert_eq!(read_line(&mut early), format!("OK {}", req.src_port));
    assert_ne!(req.src_port, local, "host ports are unique");
    assert_eq!(r.guest_read(53, req.src_port, 5), b"early");
    assert_eq!(r.dev().vsock.connections(), 2);
    assert_eq!(r.errors(), 0);
    assert!(r.dev().irqs.0.contains(&0) && r.dev().irqs.0.contains(&1));
}

#[test]
fn guest_initiated_connection_carries_data_both_ways() {
    let mut r = Rig::new("guest");
    r.give_rx(16);
    let l = r.host_listen(5000);
    let mut host = r.guest_connect(&l, 40000, 5000);
    r.send(g(OP_RW, 40000, 5000), b"hello host");
    assert_eq!(read_n(&mut host, 10), b"hello host");
    host.write_all(b"hello guest").unwrap();
    assert_eq!(r.guest_read(40000, 5000, 11), b"hello guest");
    // A bigger transfer: 100 KiB each way.
    let big: Vec<u8> = (0..100 * 1024u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&big).unwrap();
    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < big.len() {
        let part = r.guest_read(40000, 5000, 1);
        fwd += part.len() as u32;
        got.extend(part);
        r.send(Header { fwd_cnt: fwd + 11, ..g(OP_CREDIT_UPDATE, 40000, 5000) }, &[]);
    }
    assert_eq!(got, big);
    for chunk in big.chunks(MAX_PKT_DATA as usize) {
        r.send(g(OP_RW, 40000, 5000), chunk);
    }
    assert_eq!(read_n(&mut host, big.len()), big);
    assert_eq!(r.errors(), 0);
}

#[test]
fn refused_and_unknown_connections_get_rst() {
    let mut r = Rig::new("refused");
    r.give_rx(16);
    r.send(g(OP_REQUEST, 40001, 6000), &[]);
    let p = r.wait_rx(1);
    assert_eq!((p[0].0.op, p[0].0.src_port, p[0].0.dst_port, p[0].0.dst_cid), (OP_RST, 6000, 40001, CID));
    // Data, credit requests and shutdowns for connections that do not exist.
    for op in [OP_RW, OP_CREDIT_REQUEST, OP_SHUTDOWN, OP_RESPONSE] {
        let data: &[u8] = if op == OP_RW { b"x" } else { &[] };
        r.send(g(op, 40002, 6001), data);
        let p = r.wait_rx(1);
        assert_eq!((p[0].0.op, p[0].0.src_port, p[0].0.dst_port), (OP_RST, 6001, 40002));
    }
    // A RST is never answered, and a connection to another CID is reset by "it".
    r.send(g(OP_RST, 40002, 6001), &[]);
    r.send(Header { dst_cid: 7, ..g(OP_REQUEST, 40003, 80) }, &[]);
    r.pump();
    let p = r.recv();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].0.op, p[0].0.src_cid, p[0].0.src_port), (OP_RST, 7, 80));
    assert_eq!(r.dev().vsock.connections(), 0);
    assert_eq!(r.errors(), 0);
}

#[test]
fn rst_and_shutdown_from_the_guest_close_host_streams() {
    let mut r = Rig::new("close");
    r.give_rx(16);
    let l = r.host_listen(5001);
    let mut a = r.guest_connect(&l, 1, 5001);
    let mut b = r.guest_connect(&l, 2, 5001);
    let (mut c, local) = r.host_initiated(77);
    assert_eq!(r.dev().vsock.connections(), 3);
    // RST: closed quietly.
    r.send(g(OP_RST, 1, 5001), &[]);
    assert_closed(&mut a);
    // SHUTDOWN of both directions: the device answers RST and closes.
    r.send(Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..g(OP_SHUTDOWN, 2, 5001) }, &[]);
    assert_closed(&mut b);
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].0.src_port, p[0].0.dst_port), (OP_RST, 5001, 2));
    // SHUTDOWN of the guest's sending side only: the host reads EOF but can still write.
    r.send(g(OP_RW, 77, local), b"last");
    r.send(Header { flags: SHUTDOWN_SEND, ..g(OP_SHUTDOWN, 77, local) }, &[]);
    assert_eq!(read_n(&mut c, 4), b"last");
    assert_closed(&mut c);
    c.write_all(b"reply").unwrap();
    assert_eq!(r.guest_read(77, local, 5), b"reply");
    r.pump();
    let rst: Vec<_> = r.recv().into_iter().map(|(h, _)| h).collect();
    assert!(rst.is_empty(), "{rst:?}");
    assert_eq!(r.dev().vsock.connections(), 1);
    // Data after the guest shut down sending is a protocol error: reset.
    r.send(g(OP_RW, 77, local), b"more");
    let p = r.wait_rx(1);
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_RST, 77));
    assert_eq!(r.errors(), 1);
    assert_eq!(r.dev().vsock.connections(), 0);
    r.pump();
}

#[test]
fn host_close_and_half_close_reach_the_guest() {
    let mut r = Rig::new("hostclose");
    r.give_rx(16);
    let l = r.host_listen(5002);
    let mut half = r.guest_connect(&l, 10, 5002);
    let full = r.guest_connect(&l, 11, 5002);
    // Half close: the guest learns the host sends no more, and can still send.
    half.write_all(b"bye").unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    let p = r.wait_rx(2);
    assert_eq!((p[0].0.op, p[0].1.as_slice()), (OP_RW, &b"bye"[..]));
    assert_eq!((p[1].0.op, p[1].0.flags, p[1].0.dst_port), (OP_SHUTDOWN, SHUTDOWN_SEND, 10));
    r.send(g(OP_RW, 10, 5002), b"still here");
    assert_eq!(read_n(&mut half, 10), b"still here");
    // Full close with unread data: the data first, then SHUTDOWN of both directions.
    let mut full = full;
    full.write_all(b"final words").unwrap();
    drop(full);
    let mut got = Vec::new();
    let mut pkts = Vec::new();
    while !pkts.iter().any(|(h, _): &(Header, Vec<u8>)| h.op == OP_SHUTDOWN) {
        pkts.extend(r.wait_rx(1));
    }
    let (shutdown, _) = pkts.pop().unwrap();
    for (h, d) in pkts {
        assert_eq!((h.op, h.dst_port), (OP_RW, 11));
        got.extend(d);
    }
    assert_eq!(got, b"final words");
    assert_eq!(shutdown.dst_port, 11);
    assert_eq!(shutdown.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // Data for a host that is gone: the device resets the connection.
    r.send(g(OP_RW, 11, 5002), b"too late");
    let p = r.wait_rx(1);
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_RST, 11));
    r.pump();
    assert_eq!(r.dev().vsock.connections(), 1);
    assert_eq!(r.errors(), 0);
}

#[test]
fn guest_credit_limits_what_the_device_sends() {
    let mut r = Rig::new("credit");
    r.give_rx(32);
    let l = r.host_listen(5003);
    r.send(Header { buf_alloc: 100, ..g(OP_REQUEST, 20, 5003) }, &[]);
    let p = r.wait_rx(1);
    assert_eq!(p[0].0.op, OP_RESPONSE);
    let (mut host, _) = l.accept().unwrap();
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    host.write_all(&data).unwrap();
    let sent = |pkts: &[(Header, Vec<u8>)]| -> Vec<u8> {
        pkts.iter().filter(|(h, _)| h.op == OP_RW).flat_map(|(_, d)| d.clone()).collect()
    };
    let first = sent(&r.wait_rx(1));
    r.pump();
    let mut first = first;
    first.extend(sent(&r.recv()));
    assert_eq!(first, &data[..100], "no more than the guest's buffer");
    // Credit returns: the next 100 bytes.
    r.send(Header { buf_alloc: 100, fwd_cnt: 100, ..g(OP_CREDIT_UPDATE, 20, 5003) }, &[]);
    r.pump();
    assert_eq!(sent(&r.recv()), &data[100..200]);
    // A bigger buffer: the rest.
    r.send(Header { buf_alloc: 1000, fwd_cnt: 200, ..g(OP_CREDIT_UPDATE, 20, 5003) }, &[]);
    r.pump();
    assert_eq!(sent(&r.recv()), &data[200..]);
    // A credit request is answered with the device's counters.
    r.send(g(OP_RW, 20, 5003), b"abc");
    r.send(g(OP_CREDIT_REQUEST, 20, 5003), &[]);
    let p = r.wait_rx(1);
    assert_eq!((p[0].0.op, p[0].0.buf_alloc, p[0].0.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 3));
    // A guest that claims to have consumed more than it got gets nothing.
    host.write_all(b"more").unwrap();
    r.send(Header { buf_alloc: 1000, fwd_cnt: 5000, ..g(OP_CREDIT_UPDATE, 20, 5003) }, &[]);
    r.pump();
    assert_eq!(sent(&r.recv()), b"");
    assert_eq!(r.errors(), 0);
}

#[test]
fn device_credit_updates_and_overrun() {
    let mut r = Rig::new("devcredit");
    r.give_rx(64);
    let l = r.host_listen(5004);
    let mut host = r.guest_connect(&l, 30, 5004);
    // The guest sends 3/4 of the device's buffer; the host reads it all.
    let chunk = vec![0x5au8; MAX_PKT_DATA as usize];
    let total = CONN_BUF_ALLOC as usize * 3 / 4;
    let reader = std::thread::spawn(move || {
        let got = read_n(&mut host, total);
        (host, got)
    });
    for _ in 0..total / chunk.len() {
        r.send_with(Header { len: chunk.len() as u32, ..g(OP_RW, 30, 5004) }, &chunk, true);
        r.pump();
    }
    let (mut host, got) = reader.join().unwrap();
    assert!(got.iter().all(|b| *b == 0x5a));
    r.pump();
    // Whatever was told last leaves the guest at least half the buffer.
    let told = r.recv().iter().filter(|(h, _)| h.op == OP_CREDIT_UPDATE).map(|(h, _)| h.fwd_cnt).max().unwrap();
    assert!(CONN_BUF_ALLOC as usize - (total - told as usize) >= CONN_BUF_ALLOC as usize / 2, "told {told}");
    // A guest that ignores the credit while the host does not read is reset.
    let mut reset = false;
    for _ in 0..100 {
        r.send_with(Header { len: chunk.len() as u32, ..g(OP_RW, 30, 5004) }, &chunk, true);
        if r.recv().iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "overrun detected");
    assert_eq!(r.errors(), 1);
    r.pump();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    let _ = host.read_to_end(&mut sink);
    assert!(sink.len() <= 100 * chunk.len());
}

#[test]
fn many_concurrent_streams() {
    let mut r = Rig::new("many");
    r.give_rx(64);
    let l = r.host_listen(5005);
    let mut hosts: Vec<(UnixStream, u32, u32)> = Vec::new();
    for i in 0..4u32 {
        let (s, local) = r.host_initiated(100 + i);
        hosts.push((s, 100 + i, local));
    }
    for i in 0..3u32 {
        let s = r.guest_connect(&l, 200 + i, 5005);
        hosts.push((s, 200 + i, 5005));
    }
    assert_eq!(r.dev().vsock.connections(), 7);
    for (s, gport, hport) in hosts.iter_mut() {
        s.write_all(format!("to guest {gport}").as_bytes()).unwrap();
        let msg = format!("to host {gport}");
        r.send(g(OP_RW, *gport, *hport), msg.as_bytes());
    }
    let mut by_port: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let until = Instant::now() + Duration::from_secs(5);
    while by_port.values().map(Vec::len).sum::<usize>() < 7 * 12 {
        assert!(Instant::now() < until, "{by_port:?}");
        r.em.run_with_timeout(10).unwrap();
        for (h, d) in r.recv() {
            assert_eq!(h.op, OP_RW);
            by_port.entry(h.dst_port).or_default().extend(d);
        }
    }
    for (s, gport, _) in hosts.iter_mut() {
        assert_eq!(by_port[gport], format!("to guest {gport}").as_bytes());
        assert_eq!(read_n(s, 11), format!("to host {gport}").as_bytes());
    }
    assert_eq!(r.errors(), 0);
}

#[test]
fn hostile_packets_are_counted_and_dropped() {
    let mut r = Rig::new("hostile");
    r.give_rx(16);
    let mut expected = 0;
    let mut check = |r: &mut Rig, what: &str| {
        expected += 1;
        assert_eq!(r.errors(), expected, "{what}");
    };
    r.send(g(99, 1, 2), &[]);
    check(&mut r, "unknown op");
    r.send(g(0, 1, 2), &[]);
    check(&mut r, "op 0");
    r.send(Header { type_: 2, ..g(OP_REQUEST, 1, 2) }, &[]);
    check(&mut r, "seqpacket");
    r.send(Header { src_cid: 9, ..g(OP_REQUEST, 1, 2) }, &[]);
    check(&mut r, "spoofed source");
    r.send_with(Header { len: 5, ..g(OP_REQUEST, 1, 2) }, b"12345", false);
    check(&mut r, "payload on a request");
    // Header shorter than 44 bytes.
    r.mem.write_slice(&encode(&g(OP_REQUEST, 1, 2)), GuestAddress(TX_BUF)).unwrap();
    r.add_chain(TX_QUEUE, &[desc(TX_BUF, 20, 0)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "truncated header");
    // len beyond the data descriptor, and beyond the maximum.
    r.mem.write_slice(&encode(&Header { len: 1000, ..g(OP_RW, 1, 2) }), GuestAddress(TX_BUF)).unwrap();
    r.add_chain(TX_QUEUE, &[desc(TX_BUF, 44, 0), desc(TX_BUF + 44, 100, 0)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "len beyond the buffer");
    r.add_chain(TX_QUEUE, &[desc(TX_BUF, 1044 - 1, 0)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "len beyond a single descriptor");
    r.mem.write_slice(&encode(&Header { len: MAX_PKT_DATA + 1, ..g(OP_RW, 1, 2) }), GuestAddress(TX_BUF)).unwrap();
    r.add_chain(TX_QUEUE, &[desc(TX_BUF, 44, 0), desc(TX_BUF + 44, MAX_PKT_DATA + 1, 0)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "oversized");
    // Device-writable TX buffers, and a buffer outside guest memory.
    r.add_chain(TX_QUEUE, &[desc(TX_BUF, 44, WRITE)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "write-only header");
    r.add_chain(TX_QUEUE, &[desc(0xffff_0000_0000, 44, 0)]);
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "outside memory");
    // A descriptor loop: 0 -> 1 -> 0 ...
    let base = r.next_desc[TX_QUEUE];
    r.mem.write_slice(&encode(&Header { len: 10, ..g(OP_RW, 1, 2) }), GuestAddress(TX_BUF)).unwrap();
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(TX_BUF, 44, NEXT, base + 1)),
        RawDescriptor::from(SplitDescriptor::new(TX_BUF + 44, 4, NEXT, base)),
    ];
    r.vqs[TX_QUEUE].add_desc_chains(&looped, base).unwrap();
    r.next_desc[TX_QUEUE] += 2;
    r.queue_event(TX_QUEUE).unwrap();
    check(&mut r, "descriptor loop");
    r.pump();
    assert!(r.recv().is_empty(), "dropped packets get no answer");
    // The device still works.
    r.send(g(OP_REQUEST, 40, 6666), &[]);
    let p = r.recv();
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_RST, 40));
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let mut r = Rig::new("badrx");
    r.send(g(OP_REQUEST, 40, 6666), &[]); // refused: a RST is owed, no buffer yet
    assert!(r.recv().is_empty());
    r.add_chain(RX_QUEUE, &[desc(RX_BUF, RX_BUF_LEN, 0)]); // device-readable
    r.add_chain(RX_QUEUE, &[desc(RX_BUF + RX_STRIDE, 20, WRITE)]); // shorter than a header
    r.add_chain(RX_QUEUE, &[desc(RX_BUF + 2 * RX_STRIDE, PKT_HEADER_SIZE as u32, WRITE)]); // no data room
    r.queue_event(RX_QUEUE).unwrap();
    assert_eq!(r.errors(), 3);
    let used = |r: &Rig, i: usize| r.vqs[RX_QUEUE].used().ring().ref_at(i).unwrap().load();
    assert_eq!(r.vqs[RX_QUEUE].used().idx().load(), 3);
    for i in 0..3 {
        assert_eq!(used(&r, i).len(), 0, "bad buffers are returned empty");
    }
    // Header and data in separate descriptors (Linux before 6.2).
    let hdr = RX_BUF + 3 * RX_STRIDE;
    r.add_chain(RX_QUEUE, &[desc(hdr, PKT_HEADER_SIZE as u32, WRITE), desc(hdr + 0x100, 4096, WRITE)]);
    r.queue_event(RX_QUEUE).unwrap();
    let e = used(&r, 3);
    assert_eq!((e.id(), e.len()), (3, PKT_HEADER_SIZE as u32));
    let mut raw = [0u8; PKT_HEADER_SIZE];
    r.mem.read_slice(&mut raw, GuestAddress(hdr)).unwrap();
    let h = decode(&raw);
    assert_eq!((h.op, h.dst_port, h.src_port), (OP_RST, 40, 6666));
    assert_eq!(r.errors(), 3);
}

#[test]
fn runaway_available_index_breaks_the_device_until_reset() {
    let mut r = Rig::new("idx");
    r.vqs[TX_QUEUE].avail().idx().store(1000);
    let err = r.queue_event(TX_QUEUE).unwrap_err();
    assert!(matches!(err, DeviceError::AvailableRing { queue: "tx", .. }), "{err}");
    assert!(err.to_string().starts_with("tx available ring: "), "{err}");
    r.dev().vsock.reset();
    assert!(r.queue_event(TX_QUEUE).is_ok(), "after reset nothing to do");
}

#[test]
fn connect_line_errors_and_timeouts() {
    let mut r = Rig::new("timeouts");
    r.dev().vsock.muxer.timeout = Duration::from_millis(50);
    r.give_rx(16);
    for bad in ["HELLO 52\n", "CONNECT\n", "CONNECT x\n", "CONNECT 1 2\n", "CONNECT 99999999999\n"] {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        r.pump();
        assert_closed(&mut s);
    }
    let mut long = UnixStream::connect(&r.uds).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    long.write_all(&[b'7'; 100]).unwrap();
    r.pump();
    assert_closed(&mut long);
    // No line at all: closed when the timeout expires (the timer wakes the loop).
    let mut silent = UnixStream::connect(&r.uds).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(200) {
        r.em.run_with_timeout(10).unwrap();
    }
    assert_closed(&mut silent);
    // The guest never answers a REQUEST: the host stream is closed, the guest gets a RST.
    let mut unanswered = r.host_connect(60);
    let p = r.wait_rx(2);
    assert_eq!((p[0].0.op, p[1].0.op, p[1].0.dst_port), (OP_REQUEST, OP_RST, 60));
    assert_closed(&mut unanswered);
    // The guest refuses (RST): closed without OK.
    let mut refused = r.host_connect(61);
    let p = r.wait_rx(1);
    r.send(g(OP_RST, 61, p[0].0.src_port), &[]);
    assert_closed(&mut refused);
    assert_eq!(r.dev().vsock.connections(), 0);
    assert_eq!(r.errors(), 0);
}

#[test]
fn rx_packets_wait_for_buffers() {
    let mut r = Rig::new("nobufs");
    let mut host = r.host_connect(70);
    r.pump();
    assert!(r.recv().is_empty());
    r.give_rx(1);
    let p = r.recv();
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_REQUEST, 70), "delivered on the rx notification");
    let local = p[0].0.src_port;
    r.send(g(OP_RESPONSE, 70, local), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    host.write_all(b"data").unwrap();
    r.pump();
    assert!(r.recv().is_empty());
    r.give_rx(1);
    assert_eq!(r.recv()[0].1, b"data");
}

#[test]
fn reset_closes_connections_and_keeps_listening() {
    let mut r = Rig::new("reset");
    r.give_rx(16);
    let (mut host, _) = r.host_initiated(80);
    r.dev().vsock.reset();
    assert_closed(&mut host);
    r.pump();
    assert_eq!(r.dev().vsock.connections(), 0);
    let _again = r.host_connect(81);
    r.pump();
    assert_eq!(r.dev().vsock.connections(), 1, "the listener still accepts");
    // Not activated: nothing is processed.
    assert!(r.queue_event(TX_QUEUE).is_ok());
}

#[test]
fn socket_file_lifecycle() {
    let dir = std::env::temp_dir().join(format!("shoji-vsock-{}-files", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    // A stale socket file is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(CID, &path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(dev);
    assert!(!path.exists(), "removed on drop");
    // A regular file is not.
    std::fs::write(&path, b"keep me").unwrap();
    let e = Vsock::new(CID, &path).err().unwrap().to_string();
    assert!(e.starts_with("vsock: ") && e.contains(path.to_str().unwrap()), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    std::fs::remove_file(&path).unwrap();
    // Reserved CIDs, and a directory that does not exist.
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(Vsock::new(cid, &path).err().unwrap().to_string().starts_with("vsock: "));
    }
    let e = Vsock::new(CID, Path::new("/nonexistent/dir/v.sock")).err().unwrap().to_string();
    assert!(e.starts_with("vsock: /nonexistent/dir/v.sock: "), "{e}");
    // Dropping does not remove a socket someone else bound at the path since.
    let dev = Vsock::new(CID, &path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(dev);
    assert!(path.exists());
    drop(other);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connection_limit() {
    let mut r = Rig::new("limit");
    r.dev().vsock.muxer.max_connections = 2;
    r.give_rx(16);
    let l = r.host_listen(5006);
    let (_a, local) = r.host_initiated(90);
    let _b = r.guest_connect(&l, 91, 5006);
    // Full: the guest is refused, a host stream is closed at once.
    r.send(g(OP_REQUEST, 92, 5006), &[]);
    let p = r.recv();
    assert_eq!((p[0].0.op, p[0].0.dst_port), (OP_RST, 92));
    let mut refused = r.host_connect(93);
    r.pump();
    assert_closed(&mut refused);
    assert_eq!(r.dev().vsock.connections(), 2);
    // A connection ends: room again.
    r.send(g(OP_RST, 90, local), &[]);
    r.pump();
    let (_c, _) = r.host_initiated(94);
    assert_eq!(r.dev().vsock.connections(), 2);
    assert_eq!(r.errors(), 0);
}
