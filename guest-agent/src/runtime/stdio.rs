//! A process's stdio as seen by the agent: the parent ends of three pipes, or the master of a pty
//! (stdout and stdin share it; stderr is then empty, as with any terminal).
//!
//! End of stream is the kernel's: a pipe reads 0 once every writer (the process and whatever it
//! left running) has closed it and the buffer is drained, and a pty master reads EIO once the last
//! slave fd is closed and its buffer drained. So nothing written before exit is ever lost.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

/// The most one read returns.
const MAX_READ: usize = 1 << 20;

type Fd = Arc<AsyncFd<OwnedFd>>;

pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<Fd> {
    super::sys::set_nonblocking(fd.as_raw_fd())?;
    Ok(Arc::new(register(fd)?))
}

/// Registers `fd` with the current tokio runtime (call from async code).
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and always returns the same fd; the AsyncFd owns it until dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// The readable end of stdout or stderr.
pub(crate) struct Reader {
    fd: Mutex<Option<Fd>>,
    tty: bool,
}

impl Reader {
    pub fn new(fd: Option<Fd>, tty: bool) -> Self {
        Reader { fd: Mutex::new(fd), tty }
    }

    /// Up to `max` bytes; empty at end of stream (and ever after).
    pub async fn read(&self, max: usize) -> io::Result<Vec<u8>> {
        let mut slot = self.fd.lock().await;
        let Some(fd) = slot.clone() else { return Ok(Vec::new()) };
        let mut buf = vec![0u8; max.clamp(1, MAX_READ)];
        loop {
            let mut guard = fd.readable().await?;
            let r = guard.try_io(|inner| {
                // SAFETY: read into a valid mutable buffer from an fd we own.
                let n = unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if self.tty && e.raw_os_error() == Some(libc::EIO) => break,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        *slot = None;
        Ok(Vec::new())
    }
}

/// The writable end of stdin.
pub(crate) struct Writer {
    fd: Mutex<Option<Fd>>,
    tty: bool,
}

impl Writer {
    pub fn new(fd: Option<Fd>, tty: bool) -> Self {
        Writer { fd: Mutex::new(fd), tty }
    }

    /// Writes all of `data` (waiting while the pipe is full); EPIPE when the reader is gone.
    pub async fn write(&self, data: &[u8]) -> io::Result<usize> {
        let slot = self.fd.lock().await;
        let Some(fd) = slot.clone() else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed"));
        };
        let mut done = 0;
        while done < data.len() {
            let rest = data.get(done..).unwrap_or(&[]);
            let mut guard = fd.writable().await?;
            let r = guard.try_io(|inner| {
                // SAFETY: write from a valid slice to an fd we own.
                let n = unsafe { libc::write(inner.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(done)
    }

    /// Closes stdin: the pipe's write end is closed, so the process reads EOF. A terminal has no
    /// separate input to close: the line discipline's EOF character (^D) is sent instead.
    pub async fn close(&self) -> io::Result<()> {
        if self.tty {
            let is_open = self.fd.lock().await.is_some();
            if is_open {
                self.write(&[0x04]).await?;
            }
        }
        self.fd.lock().await.take();
        Ok(())
    }
}
