//! virtio-vsock packet headers (virtio 1.2, section 5.10.6): protocol constants, a copy of a guest
//! header taken once (the guest can change its memory under us), header checks, and writing
//! device headers into guest RX buffers through [`VsockPacket`].
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

/// The host's context id; the device speaks for it.
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The largest payload of one packet, either way (Linux uses 64 KiB as well).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// The header of a packet, as plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a parsed guest packet (VsockPacket keeps its own copy of the header).
    pub fn of(pkt: &VsockPacket<'_, ()>) -> Header {
        Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Writes this header into a guest RX buffer (all fields, so nothing stale remains).
    pub fn write_to(&self, pkt: &mut VsockPacket<'_, ()>) -> Result<(), virtio_vsock::packet::Error> {
        pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE])?;
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
        Ok(())
    }

    /// A device-to-guest header from the host side of a connection.
    pub fn to_guest(guest_cid: u64, local_port: u32, peer_port: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

/// Why a guest (TX) packet is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxPacketError {
    #[error("source CID {src} is not the guest's ({guest})")]
    SourceCid { src: u64, guest: u64 },
    #[error("socket type {0} is not STREAM")]
    SocketType(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("operation {op} with {len} bytes of payload")]
    PayloadOnControl { op: u16, len: u32 },
    #[error("payload of {0} bytes is over {MAX_PKT_DATA}")]
    TooLong(u32),
}

/// Checks a guest (TX) packet header.
pub fn check_tx(h: &Header, guest_cid: u64) -> Result<(), TxPacketError> {
    if h.src_cid != guest_cid {
        return Err(TxPacketError::SourceCid { src: h.src_cid, guest: guest_cid });
    }
    if h.type_ != TYPE_STREAM {
        return Err(TxPacketError::SocketType(h.type_));
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
        return Err(TxPacketError::UnknownOp(h.op));
    }
    if h.op != OP_RW && h.len != 0 {
        return Err(TxPacketError::PayloadOnControl { op: h.op, len: h.len });
    }
    if h.len > MAX_PKT_DATA {
        return Err(TxPacketError::TooLong(h.len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header { src_cid: 3, dst_cid: HOST_CID, type_: TYPE_STREAM, op: OP_RW, len: 10, ..Header::default() }
    }

    #[test]
    fn header_checks() {
        assert!(check_tx(&good(), 3).is_ok());
        assert_eq!(check_tx(&good(), 4), Err(TxPacketError::SourceCid { src: 3, guest: 4 }));
        assert_eq!(check_tx(&good(), 4).unwrap_err().to_string(), "source CID 3 is not the guest's (4)");
        assert_eq!(check_tx(&Header { type_: 2, ..good() }, 3), Err(TxPacketError::SocketType(2)));
        assert_eq!(check_tx(&Header { op: 0, ..good() }, 3), Err(TxPacketError::UnknownOp(0)));
        assert_eq!(check_tx(&Header { op: 8, ..good() }, 3), Err(TxPacketError::UnknownOp(8)));
        assert_eq!(
            check_tx(&Header { op: OP_REQUEST, ..good() }, 3),
            Err(TxPacketError::PayloadOnControl { op: OP_REQUEST, len: 10 })
        );
        let long = MAX_PKT_DATA + 1;
        assert_eq!(check_tx(&Header { len: long, ..good() }, 3), Err(TxPacketError::TooLong(long)));
        assert!(check_tx(&Header { len: long, ..good() }, 3).unwrap_err().to_string().contains("over"));
    }
}
