//! A process's stdio: containerd's FIFOs on this side, the agent's streams on the other.
//!
//! Output is copied until the agent's stream ends (the process and every other writer are gone),
//! so the tail of the output is never lost; the exit is reported only after that. Stdin is copied
//! until containerd closes its end or sends CloseIO.
use shoji_sandbox::{Process, Stream};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::runtime::Handle;

const CHUNK: usize = 64 * 1024;

/// Which process of which container.
#[derive(Debug, Clone)]
pub struct Target {
    pub container_id: String,
    pub exec_id: String,
}

/// Copies the process's stdout (or stderr) into the FIFO at `path` until the stream ends.
/// An empty path: the output is still read (so the process never blocks on it) and dropped.
pub fn spawn_output(rt: Handle, p: Process, path: String, stderr: bool) -> Option<JoinHandle<()>> {
    let name = if stderr { "stderr" } else { "stdout" };
    let spawned = std::thread::Builder::new().name(format!("shim-{name}")).spawn(move || {
        // O_RDWR: opening never blocks and a reader that goes away never gives us SIGPIPE.
        let mut fifo = if path.is_empty() {
            None
        } else {
            match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!("{}: opening {name} {path}: {e}", p.container_id());
                    None
                }
            }
        };
        let stream = if stderr { Stream::Stderr } else { Stream::Stdout };
        loop {
            let data = match rt.block_on(p.read(stream)) {
                Ok(data) => data,
                Err(e) => {
                    tracing::debug!("{}/{}: {name}: {e}", p.container_id(), p.exec_id());
                    break;
                }
            };
            if data.is_empty() {
                break;
            }
            if let Some(f) = &mut fifo {
                if let Err(e) = f.write_all(&data) {
                    tracing::warn!("{}: writing {name}: {e}; dropping the rest", p.container_id());
                    fifo = None;
                }
            }
        }
        // Dropping our end: containerd's reader sees end of file.
    });
    spawned.map_err(|e| tracing::error!("cannot start the {name} copier: {e}")).ok()
}

/// The shim's hold on a stdin FIFO, opened at Create (or Exec): what containerd writes before
/// the process starts waits in the pipe.
///
/// End of file must not be taken from read(2), which returns 0 while no writer has come yet
/// (containerd connects its writer lazily, and Start can follow Exec by microseconds). poll(2)
/// on a FIFO reports POLLHUP only once a writer has come and gone since our open, so the copier
/// polls first. `closed` (CloseIO, Delete) ends it too, after what is already in the pipe.
pub struct StdinPipe {
    pub reader: File,
    pub closed: Arc<AtomicBool>,
}

/// The process is gone (Delete): its copier ends too.
impl Drop for StdinPipe {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Opens the stdin FIFO at `path` (none when empty).
pub fn open_stdin(path: &str) -> std::io::Result<Option<StdinPipe>> {
    if path.is_empty() {
        return Ok(None);
    }
    let reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    Ok(Some(StdinPipe { reader, closed: Arc::new(AtomicBool::new(false)) }))
}

/// What the next poll of the FIFO says.
enum Ready {
    Data,
    Hangup,
    Nothing,
}

fn poll_fifo(f: &File, timeout_ms: i32) -> Ready {
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n <= 0 {
        Ready::Nothing
    } else if p.revents & libc::POLLIN != 0 {
        Ready::Data
    } else if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        Ready::Hangup
    } else {
        Ready::Nothing
    }
}

/// Copies the stdin FIFO into the process's stdin; CloseStdin at its end.
pub fn spawn_input(rt: Handle, p: Process, mut f: File, closed: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("shim-stdin".into()).spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let closing = closed.load(Ordering::Acquire);
            match poll_fifo(&f, if closing { 0 } else { 200 }) {
                Ready::Hangup => break,
                Ready::Nothing if closing => break,
                Ready::Nothing => continue,
                Ready::Data => {}
            }
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {
                    continue
                }
                Err(e) => {
                    tracing::debug!("{}: reading stdin: {e}", p.container_id());
                    break;
                }
            };
            if let Err(e) = rt.block_on(p.write_stdin(buf[..n].to_vec())) {
                tracing::debug!("{}: {e}", p.container_id());
                return;
            }
        }
        close_stdin(&rt, &p);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the stdin copier: {e}");
    }
}

/// Ends the process's stdin in the guest.
pub fn close_stdin(rt: &Handle, p: &Process) {
    if let Err(e) = rt.block_on(p.close_stdin()) {
        tracing::debug!("{}: {e}", p.container_id());
    }
}
