//! A tap device as the virtio-net backend: `/dev/net/tun` opened `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR` with a 12-byte header (the guest's `virtio_net_hdr_v1`, passed through as is,
//! so the offloads the guest accepted are the tap's: `TUNSETOFFLOAD`), non-blocking. The tap
//! lives in the network namespace of the thread that opens it.
use super::{NetBackend, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, HDR_LEN};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)` and friends (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// The one tap ioctl after set-up (the device thread's seccomp filter allows it).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the union is 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?}: 1 to 15 bytes, no '/', NUL or space")]
    Name(String),
    #[error("tap {0}: /dev/net/tun: {1}")]
    Open(String, io::Error),
    #[error("tap {0}: {1}: {2}")]
    Ioctl(String, &'static str, io::Error),
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (or attaches to it, if it exists and this user may) in the
    /// calling thread's network namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bad = name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
        if bad {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TapError::Open(name.into(), e))?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Tap { file, name: name.into() };
        // SAFETY: TUNSETIFF reads (and writes back) one ifreq that lives across the call.
        unsafe { tap.ioctl("TUNSETIFF", TUNSETIFF, &mut req as *mut IfReq as libc::c_ulong)? };
        let hdr: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int that lives across the call.
        unsafe { tap.ioctl("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, &hdr as *const libc::c_int as libc::c_ulong)? };
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One tap ioctl.
    ///
    /// # Safety
    /// `arg` must be what `req` expects: an integer, or a pointer to a live value of the type
    /// the request reads or writes.
    unsafe fn ioctl(&self, what: &'static str, req: libc::c_ulong, arg: libc::c_ulong) -> Result<(), TapError> {
        // SAFETY: the fd is ours; the argument is as the caller promised.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) } < 0 {
            return Err(TapError::Ioctl(self.name.clone(), what, io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a frame in one write, or drops it.
        self.file.write(frame).map(drop)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        let mut flags: libc::c_uint = 0;
        if guest_features & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if guest_features & F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if guest_features & F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument itself.
        unsafe { self.ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD, libc::c_ulong::from(flags)) }.map_err(|e| match e {
            TapError::Ioctl(_, _, io) => io,
            other => io::Error::other(other.to_string()),
        })
    }
}
