//! The few raw system calls the agent makes itself, each behind a safe function. Every `unsafe`
//! block in the service, storage and init code lives here.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libc::c_ulong;

fn cstring(what: &str, bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2). `None` for source, fstype or data passes NULL.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(|s| cstring("mount source", s.as_os_str().as_bytes())).transpose()?;
    let target = cstring("mount target", target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|s| cstring("fstype", s.as_bytes())).transpose()?;
    let data = data.filter(|d| !d.is_empty()).map(|d| cstring("mount data", d.as_bytes())).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    check(unsafe { libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) })
}

/// umount2(2).
pub fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstring("mount target", target.as_os_str().as_bytes())?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) })
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, alive for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Adds `data` to the kernel's input pool, credited at 8 bits a byte, and reseeds the CRNG
/// from it (needs CAP_SYS_ADMIN).
pub fn add_entropy(data: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + data.len());
    info.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    // SAFETY: `info` is a rand_pool_info followed by buf_size bytes, alive for the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })
}

/// Sets CLOCK_REALTIME to `ns` since the epoch.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as _ };
    // SAFETY: a valid timespec for the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// The running kernel's release (uname -r).
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain bytes, for which all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the call.
    check(unsafe { libc::uname(&mut uts) })?;
    // SAFETY: the kernel NUL-terminates every utsname field, and `uts` outlives the borrow.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// sync(2).
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// reboot(2) with `RB_AUTOBOOT`: Shoji's VMM ends the VM when the guest reboots. Returns only
/// on failure (for instance when not PID 1 or without CAP_SYS_BOOT).
pub fn reboot() -> io::Error {
    // SAFETY: reboot takes a plain integer command.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants are re-parented to us, not to init.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument; the rest are ignored.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })
}

/// Opens `console` read-write (without making it the controlling terminal) and makes it fd 0, 1
/// and 2.
pub fn redirect_stdio(console: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(console)?;
    for fd in 0..=2 {
        // SAFETY: `file` is an open descriptor; dup2 onto 0..2 replaces our own stdio only.
        check(unsafe { libc::dup2(file.as_raw_fd(), fd) })?;
    }
    Ok(())
}

/// Our process id is 1: we are the VM's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The host's CID, as the guest dials it.
pub const VMADDR_CID_HOST: u32 = 2;

/// A stream connection to vsock `cid:port`, made non-blocking once connected (a writer that
/// would block drops what it writes rather than stall the agent).
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a valid descriptor that was just created and that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain integers, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check(rc)?;
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    check(flags)?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(fd)
}
