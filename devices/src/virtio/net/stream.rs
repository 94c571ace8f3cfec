//! A stream socket as the virtio-net backend: frames as QEMU's `-netdev stream` carries them,
//! each a 32-bit big-endian length and the Ethernet frame, with no virtio-net header (so no
//! offloads). This is what user-mode networking stacks such as passt speak: `shoji run --net
//! user` hands passt the other end of a socketpair. Non-blocking; a record split across reads
//! is reassembled here, and one the peer cannot take whole right now is kept (bounded) and
//! finished before the next.
use super::{NetBackend, HDR_LEN, MAX_FRAME};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The record prefix: the frame's length, big-endian.
const LEN: usize = 4;
/// The largest frame the device hands over or takes (no header on the wire).
const MAX_WIRE_FRAME: usize = MAX_FRAME - HDR_LEN;
/// Output kept while the peer is slow; frames beyond it are dropped, as a full NIC would.
const MAX_PENDING: usize = 1 << 20;

pub struct StreamBackend {
    sock: UnixStream,
    /// Bytes read and not yet handed over: whole records, then a partial one.
    inbuf: Vec<u8>,
    /// Records the peer has not taken yet.
    outbuf: Vec<u8>,
    dropped: u64,
}

impl StreamBackend {
    pub fn new(sock: UnixStream) -> io::Result<StreamBackend> {
        sock.set_nonblocking(true)?;
        Ok(StreamBackend {
            sock,
            inbuf: Vec::with_capacity(2 * (LEN + MAX_WIRE_FRAME)),
            outbuf: Vec::new(),
            dropped: 0,
        })
    }

    /// Frames dropped because the peer was not reading.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The first whole record's frame length, if one is buffered.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        if self.inbuf.len() < LEN {
            return Ok(None);
        }
        let n = u32::from_be_bytes([self.inbuf[0], self.inbuf[1], self.inbuf[2], self.inbuf[3]]) as usize;
        if n > MAX_WIRE_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {n}-byte frame on the stream")));
        }
        Ok((self.inbuf.len() >= LEN + n).then_some(n))
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.outbuf.is_empty() {
            match self.sock.write(&self.outbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.outbuf.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl NetBackend for StreamBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // Output waiting for the peer goes first whenever the device comes by.
        self.flush()?;
        loop {
            if let Some(n) = self.whole_record()? {
                let frame = &self.inbuf[LEN..LEN + n];
                let total = HDR_LEN + n;
                if buf.len() < total {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "receive buffer below MAX_FRAME"));
                }
                buf[..HDR_LEN].fill(0);
                buf[HDR_LEN..total].copy_from_slice(frame);
                self.inbuf.drain(..LEN + n);
                return Ok(Some(total));
            }
            // Room for one more whole record at most: the buffer stays bounded.
            let start = self.inbuf.len();
            self.inbuf.resize(start + LEN + MAX_WIRE_FRAME, 0);
            let r = self.sock.read(&mut self.inbuf[start..]);
            let got = match r {
                Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the network peer closed the stream")),
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
                Err(e) => Err(e),
            };
            self.inbuf.truncate(start + got.as_ref().ok().copied().flatten().unwrap_or(0));
            if got?.is_none() {
                return Ok(None);
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // Shorter than an Ethernet header: nothing a peer could use.
        let Some(eth) = frame.get(HDR_LEN..).filter(|e| e.len() >= 14) else { return Ok(()) };
        if self.outbuf.len() + LEN + eth.len() > MAX_PENDING {
            self.flush()?;
            if self.outbuf.len() + LEN + eth.len() > MAX_PENDING {
                self.dropped += 1;
                return Ok(());
            }
        }
        self.outbuf.extend_from_slice(&(eth.len() as u32).to_be_bytes());
        self.outbuf.extend_from_slice(eth);
        self.flush()
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        false
    }

    fn set_offloads(&mut self, _guest_features: u64) -> io::Result<()> {
        Ok(())
    }

    fn writable(&mut self) -> io::Result<()> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StreamBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamBackend::new(a).unwrap(), b)
    }

    fn record(frame: &[u8]) -> Vec<u8> {
        let mut r = (frame.len() as u32).to_be_bytes().to_vec();
        r.extend_from_slice(frame);
        r
    }

    #[test]
    fn records_split_and_joined_arbitrarily_come_out_as_frames_with_an_empty_header() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0xaa; MAX_FRAME];
        assert_eq!(be.recv(&mut buf).unwrap(), None);
        let (f1, f2) = (vec![1u8; 60], vec![2u8; 1500]);
        let mut wire = record(&f1);
        wire.extend(record(&f2));
        // Byte by byte for the first record, then the rest at once.
        for b in &wire[..10] {
            peer.write_all(&[*b]).unwrap();
            assert_eq!(be.recv(&mut buf).unwrap(), None);
        }
        peer.write_all(&wire[10..]).unwrap();
        let n = be.recv(&mut buf).unwrap().unwrap();
        assert_eq!((n, &buf[..HDR_LEN], &buf[HDR_LEN..n]), (HDR_LEN + 60, &[0u8; HDR_LEN][..], &f1[..]));
        let n = be.recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[HDR_LEN..n], &f2[..]);
        assert_eq!(be.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn frames_go_out_as_records_and_a_slow_peer_costs_bounded_memory() {
        let (mut be, mut peer) = pair();
        let mut frame = vec![0u8; HDR_LEN];
        frame.extend_from_slice(b"an ethernet frame");
        be.send(&frame).unwrap();
        let mut got = [0u8; 21];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x11an ethernet frame");
        // Shorter than an Ethernet header: not sent.
        be.send(&[0u8; HDR_LEN + 13]).unwrap();
        assert!(be.outbuf.is_empty());
        // The peer stops reading: the socket fills, then the pending buffer, then frames drop.
        let big = vec![0u8; HDR_LEN + 60_000];
        for _ in 0..200 {
            be.send(&big).unwrap();
        }
        assert!(be.outbuf.len() <= MAX_PENDING && be.dropped() > 0, "{} {}", be.outbuf.len(), be.dropped());
        // Once the peer reads again, the device's writable event sends what was kept.
        let kept = be.outbuf.len();
        peer.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut read = 0;
        for _ in 0..1000 {
            be.writable().unwrap();
            match peer.read(&mut sink) {
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if be.outbuf.is_empty() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(be.outbuf.is_empty() && read >= kept, "all of it went out: {} left, {read} read", be.outbuf.len());
    }

    #[test]
    fn an_oversized_length_or_a_closed_peer_is_an_error() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0; MAX_FRAME];
        peer.write_all(&(MAX_WIRE_FRAME as u32 + 1).to_be_bytes()).unwrap();
        assert_eq!(be.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (mut be, peer) = pair();
        drop(peer);
        assert_eq!(be.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
