//! Reaching the agent from the host through the VMM's hybrid vsock socket (Firecracker's
//! protocol): connect to the unix socket, send `CONNECT <port>\n`, read `OK <host port>\n`, then
//! speak ttrpc on the same stream. Until the guest's agent listens, the VMM answers a CONNECT
//! by closing the stream, so this retries until its deadline.
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("agent: no answer on {path} port {port} within {secs} s (last: {last})")]
    Timeout { path: String, port: u32, secs: u64, last: String },
}

/// One handshake attempt: the stream after `OK`, or why not.
async fn handshake(path: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    // Byte by byte: nothing after the newline may be consumed, it is ttrpc.
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) => return Err("closed before OK (nothing listening yet)".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err("handshake line too long".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if line.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(format!("unexpected answer {:?}", String::from_utf8_lossy(&line)))
    }
}

/// A raw stream to guest vsock `port` through the hybrid socket at `path`.
pub async fn connect_stream(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match handshake(path, port).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(ConnectError::Timeout {
                path: path.display().to_string(),
                port,
                secs: timeout.as_secs(),
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A ttrpc client for the agent listening on guest vsock `port`.
pub async fn connect(path: &Path, port: u32, timeout: Duration) -> Result<ttrpc::asynchronous::Client, ConnectError> {
    let stream = connect_stream(path, port, timeout).await?;
    Ok(ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream)))
}
