//! Kernel uevents: the message format, a small source trait, the real netlink source and a
//! channel-fed one for tests.
//!
//! A source must be listening BEFORE the caller looks in sysfs for a device: then an event sent
//! after that look is queued in the source and cannot be missed.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One kernel uevent: its KEY=VALUE environment (ACTION, DEVPATH, SUBSYSTEM, DEVNAME, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uevent {
    pub env: BTreeMap<String, String>,
}

impl Uevent {
    /// Parses a kernel uevent message: `action@devpath\0KEY=VALUE\0KEY=VALUE\0...`.
    /// Returns `None` for what is not a kernel uevent (udev's "libudev" messages, no ACTION or
    /// DEVPATH, not UTF-8).
    pub fn parse(msg: &[u8]) -> Option<Uevent> {
        let mut fields = msg.split(|b| *b == 0).filter(|f| !f.is_empty());
        let header = std::str::from_utf8(fields.next()?).ok()?;
        if !header.contains('@') {
            return None;
        }
        let mut env = BTreeMap::new();
        for field in fields {
            let field = std::str::from_utf8(field).ok()?;
            if let Some((k, v)) = field.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        let ev = Uevent { env };
        (ev.get("ACTION").is_some() && ev.get("DEVPATH").is_some()).then_some(ev)
    }

    /// Builds an event from KEY=VALUE pairs (for tests and synthetic sources).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Uevent {
        Uevent { env: pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect() }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    pub fn action(&self) -> &str {
        self.get("ACTION").unwrap_or("")
    }

    /// The device's path under /sys, e.g. "/devices/pci0000:00/0000:00:02.0/virtio1/block/vda".
    pub fn devpath(&self) -> &str {
        self.get("DEVPATH").unwrap_or("")
    }

    pub fn subsystem(&self) -> &str {
        self.get("SUBSYSTEM").unwrap_or("")
    }

    /// The node's name under /dev, e.g. "vda".
    pub fn devname(&self) -> Option<&str> {
        self.get("DEVNAME")
    }
}

/// What waiting on a source gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UeventWait {
    Event(Uevent),
    /// Nothing within the timeout.
    Timeout,
    /// Events were dropped (receive buffer overrun): look at sysfs again.
    Overrun,
}

/// Where uevents come from.
pub trait UeventSource {
    /// The next uevent, waiting at most `timeout`.
    fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait>;
}

/// The kernel's uevents, from a `NETLINK_KOBJECT_UEVENT` socket bound to the kernel's group.
#[derive(Debug)]
pub struct NetlinkUevents {
    fd: OwnedFd,
}

/// The kernel's multicast group for uevents (udev's re-broadcasts are group 2).
const KERNEL_UEVENT_GROUP: u32 = 1;
/// Kernel uevent messages are at most UEVENT_BUFFER_SIZE (2048) bytes.
const RECV_BUFFER: usize = 8192;

impl NetlinkUevents {
    /// Opens and binds the socket; from then on the kernel queues every uevent for us.
    pub fn open() -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid descriptor that was just created and that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut addr = zeroed_sockaddr_nl();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = KERNEL_UEVENT_GROUP;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NetlinkUevents { fd })
    }
}

fn zeroed_sockaddr_nl() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain integers, for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

impl UeventSource for NetlinkUevents {
    fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Round up so that a sub-millisecond remainder still waits rather than spins.
            let ms = remaining.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is one valid pollfd, alive for the whole call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Ok(UeventWait::Timeout);
            }
            let mut addr = zeroed_sockaddr_nl();
            let mut addr_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` and `addr` are valid for writes of the lengths passed, for the call.
            let len = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut addr as *mut libc::sockaddr_nl).cast(),
                    &mut addr_len,
                )
            };
            if len < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                    Some(libc::ENOBUFS) => return Ok(UeventWait::Overrun),
                    _ => return Err(err),
                }
            } else if addr.nl_pid == 0 {
                // Only the kernel (port 0) is believed; user space could send anything.
                if let Some(ev) = Uevent::parse(&buf[..len as usize]) {
                    return Ok(UeventWait::Event(ev));
                }
            }
            if Instant::now() >= deadline {
                return Ok(UeventWait::Timeout);
            }
        }
    }
}

/// A source fed from a channel, for tests: send [`Uevent`]s into the sender.
/// Once every sender is gone, waiting is an error (`BrokenPipe`), not a silent timeout.
#[derive(Debug)]
pub struct ChannelUevents {
    rx: mpsc::Receiver<Uevent>,
}

impl ChannelUevents {
    pub fn new() -> (mpsc::Sender<Uevent>, ChannelUevents) {
        let (tx, rx) = mpsc::channel();
        (tx, ChannelUevents { rx })
    }
}

impl UeventSource for ChannelUevents {
    fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Ok(UeventWait::Event(ev)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(UeventWait::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "uevent channel closed"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kernel_message() {
        let msg = b"add@/devices/pci0000:00/0000:00:02.0/virtio1/block/vda\0ACTION=add\0\
DEVPATH=/devices/pci0000:00/0000:00:02.0/virtio1/block/vda\0SUBSYSTEM=block\0MAJOR=253\0MINOR=0\0\
DEVNAME=vda\0DEVTYPE=disk\0DISKSEQ=1\0SEQNUM=1234\0";
        let ev = Uevent::parse(msg).unwrap();
        assert_eq!(ev.action(), "add");
        assert_eq!(ev.devpath(), "/devices/pci0000:00/0000:00:02.0/virtio1/block/vda");
        assert_eq!(ev.subsystem(), "block");
        assert_eq!(ev.devname(), Some("vda"));
        assert_eq!(ev.get("MAJOR"), Some("253"));
        assert_eq!(ev.get("SEQNUM"), Some("1234"));
        assert_eq!(ev.get("NOPE"), None);
    }

    #[test]
    fn values_may_contain_equals_and_the_last_nul_is_optional() {
        let ev = Uevent::parse(b"change@/x\0ACTION=change\0DEVPATH=/x\0ODD=a=b").unwrap();
        assert_eq!(ev.get("ODD"), Some("a=b"));
    }

    #[test]
    fn rejects_what_is_not_a_kernel_uevent() {
        assert_eq!(Uevent::parse(b""), None);
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(Uevent::parse(b"add@/x\0SUBSYSTEM=block\0"), None, "no ACTION/DEVPATH");
        assert_eq!(Uevent::parse(b"add@/x\0ACTION=add\0DEVPATH=\xff\0"), None, "not UTF-8");
    }

    #[test]
    fn channel_source_delivers_times_out_and_reports_a_closed_channel() {
        let (tx, mut src) = ChannelUevents::new();
        let ev = Uevent::from_pairs([("ACTION", "add"), ("DEVPATH", "/x")]);
        tx.send(ev.clone()).unwrap();
        assert_eq!(src.next_event(Duration::from_millis(10)).unwrap(), UeventWait::Event(ev));
        assert_eq!(src.next_event(Duration::from_millis(10)).unwrap(), UeventWait::Timeout);
        drop(tx);
        assert_eq!(src.next_event(Duration::from_millis(10)).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    /// The real socket opens and honours the timeout. Opening can be refused in a sandbox
    /// without netlink; that is reported, not failed, since the logic is covered above.
    #[test]
    fn netlink_source_opens_and_times_out() {
        let mut src = match NetlinkUevents::open() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipping: NETLINK_KOBJECT_UEVENT socket refused here: {e}");
                return;
            }
        };
        let start = Instant::now();
        match src.next_event(Duration::from_millis(50)).unwrap() {
            // An unrelated uevent can always happen on a real machine.
            UeventWait::Event(_) | UeventWait::Overrun => {}
            UeventWait::Timeout => assert!(start.elapsed() >= Duration::from_millis(50)),
        }
    }
}
