//! One route-netlink socket: requests that the kernel acknowledges, and dumps. A netlink socket
//! belongs to the network namespace it was created in, whatever thread later uses it, so
//! [`Netlink::open_in`] makes one for another namespace on a short-lived thread.
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {0}: {1}")]
    Io(&'static str, io::Error),
    /// The kernel refused a request.
    #[error("{what}: {err}")]
    Refused { what: String, err: io::Error },
    #[error("netlink: undecodable reply: {0}")]
    Decode(String),
    #[error("{0}")]
    NotFound(String),
}

impl NetlinkError {
    /// The errno of a refused request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
}

/// Runs `f` on a new thread that has joined the network namespace `netns` (an open
/// `/proc/<pid>/ns/net` or `/var/run/netns/<name>`): what `f` creates there (a socket, a tap)
/// stays in that namespace. The caller's threads are not moved.
pub fn in_netns<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || {
                // SAFETY: setns on this thread only (network namespaces are per thread), with an fd
                // the caller keeps open across the call.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace thread panicked")))
    })
}

pub struct Netlink {
    sock: Socket,
    seq: u32,
}

/// Bigger than any one reply datagram the kernel sends for these requests.
const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::Io("socket", e))?;
        sock.bind_auto().map_err(|e| NetlinkError::Io("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(|e| NetlinkError::Io("connect", e))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// A socket in network namespace `netns`.
    pub fn open_in(netns: &File) -> Result<Netlink, NetlinkError> {
        in_netns(netns, Netlink::open).map_err(|e| NetlinkError::Io("setns", e))?
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(|e| NetlinkError::Io("send", e))?;
        Ok(self.seq)
    }

    /// Reads replies to request `seq` and hands each to `each` until it says stop.
    fn replies(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Result<bool, NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::Io("recv", e)),
            };
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode("a message of length 0".into()));
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                if !each(m.payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends a request and waits for the kernel's acknowledgement; `what` names it in errors.
    pub fn request(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        let mut result = Ok(());
        self.replies(seq, |p| match p {
            NetlinkPayload::Error(e) => {
                if e.code.is_some() {
                    result = Err(NetlinkError::Refused { what: what.into(), err: e.to_io() });
                }
                Ok(false)
            }
            _ => Ok(true),
        })?;
        result
    }

    /// Dumps every object of the kind `msg` asks for.
    pub fn dump(&mut self, what: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        let mut result = Ok(());
        self.replies(seq, |p| match p {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                Ok(true)
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                result = Err(NetlinkError::Refused { what: what.into(), err: e.to_io() });
                Ok(false)
            }
            // A dump that failed part-way says so in its DONE.
            NetlinkPayload::Done(d) if d.code != 0 => {
                result = Err(NetlinkError::Refused { what: what.into(), err: io::Error::from_raw_os_error(-d.code) });
                Ok(false)
            }
            NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => Ok(false),
            _ => Ok(true),
        })?;
        result.map(|()| out)
    }
}
