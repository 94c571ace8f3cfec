//! Where the agent listens: `vsock://CID:PORT` (the guest's default, any CID on port 1024) or a
//! unix socket (`unix:PATH`, `unix://PATH`), and starting one ttrpc server per address.
//!
//! On vsock the agent serves the host only: a connection whose peer CID is not
//! `VMADDR_CID_HOST` (a guest-local peer, were a loopback transport ever built in) is closed
//! before ttrpc reads a byte. A container must never reach the agent (docs/security.md).

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use shoji_devices::model::AGENT_VSOCK_PORT;
use shoji_protocol::ttrpc::asynchronous::transport::Listener;
use shoji_protocol::ttrpc::asynchronous::Server;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use crate::service::{ttrpc_services, Agent};

/// What `--listen` defaults to.
pub fn default_listen() -> String {
    format!("vsock://-1:{AGENT_VSOCK_PORT}")
}

/// A parsed listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    /// `cid` -1 (`VMADDR_CID_ANY`) takes connections for any of the guest's CIDs.
    Vsock {
        cid: i64,
        port: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listen address {addr:?}: {msg}")]
pub struct ListenAddrError {
    pub addr: String,
    pub msg: String,
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |msg: &str| ListenAddrError { addr: s.to_owned(), msg: msg.to_owned() };
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| err("expected vsock://CID:PORT"))?;
            let cid: i64 = cid.parse().map_err(|_| err("CID is not a number"))?;
            if !(-1..=i64::from(u32::MAX)).contains(&cid) {
                return Err(err("CID is out of range"));
            }
            let port = port.parse().map_err(|_| err("PORT is not a 32-bit number"))?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            // "unix:///run/a.sock" and "unix:/run/a.sock" are the same path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() || path.contains('\0') {
                return Err(err("expected unix:PATH"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        Err(err("expected vsock://CID:PORT or unix:PATH"))
    }
}

impl fmt::Display for ListenAddr {
    /// The form ttrpc binds: `vsock://-1:1024`, `unix:///run/a.sock`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{addr}: removing the stale socket: {err}")]
    Stale { addr: ListenAddr, err: std::io::Error },
    #[error("{addr}: creating the socket's directory: {err}")]
    Dir { addr: ListenAddr, err: std::io::Error },
    #[error("{addr}: {err}")]
    Bind { addr: ListenAddr, err: shoji_protocol::ttrpc::Error },
    #[error("{addr}: {err}")]
    VsockBind { addr: ListenAddr, err: std::io::Error },
}

/// The only vsock peer the agent serves: the host (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// Whether a vsock peer may talk to the agent. CID 1 (`VMADDR_CID_LOCAL`) and the guest's own
/// CID are guest-local peers, i.e. a container; anything else that is not the host is too.
pub fn vsock_peer_allowed(peer_cid: u32) -> bool {
    peer_cid == HOST_CID
}

/// A vsock listener that yields only the host's connections; others are logged and closed.
fn host_only_vsock(cid: i64, port: u32) -> std::io::Result<Listener> {
    // -1 is VMADDR_CID_ANY (u32::MAX); the range was checked when the address was parsed.
    let cid = u32::try_from(cid).unwrap_or(libc::VMADDR_CID_ANY);
    let listener = VsockListener::bind(VsockAddr::new(cid, port))?;
    let accepted = futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) if vsock_peer_allowed(peer.cid()) => {
                    return Some((Ok::<VsockStream, std::io::Error>(stream), listener))
                }
                Ok((stream, peer)) => {
                    tracing::warn!(cid = peer.cid(), port = peer.port(), "refused a vsock peer that is not the host");
                    drop(stream);
                }
                Err(e) => return Some((Err(e), listener)),
            }
        }
    });
    Ok(Listener::new(accepted))
}

/// Binds `addr` and starts serving both services on it. A socket file left behind by an earlier
/// run is replaced.
pub async fn serve(addr: &ListenAddr, agent: Arc<Agent>) -> Result<Server, ServeError> {
    if let ListenAddr::Unix(path) = addr {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(|err| ServeError::Stale { addr: addr.clone(), err })?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| ServeError::Dir { addr: addr.clone(), err })?;
        }
    }
    let bind = |err| ServeError::Bind { addr: addr.clone(), err };
    let server = match addr {
        ListenAddr::Vsock { cid, port } => Server::new().add_listener(
            host_only_vsock(*cid, *port).map_err(|err| ServeError::VsockBind { addr: addr.clone(), err })?,
        ),
        ListenAddr::Unix(_) => Server::new().bind(&addr.to_string()).map_err(bind)?,
    };
    let mut server = server.register_service(ttrpc_services(agent));
    server.start().await.map_err(bind)?;
    tracing::info!(%addr, "serving");
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_a_vsock_peer() {
        assert!(vsock_peer_allowed(2));
        // VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, the guest's own CID (3 for Shoji), others.
        for cid in [0, 1, 3, 4, 1024, u32::MAX] {
            assert!(!vsock_peer_allowed(cid), "{cid}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(default_listen().parse::<ListenAddr>().unwrap(), ListenAddr::Vsock { cid: -1, port: 1024 });
        assert_eq!(default_listen(), "vsock://-1:1024");
        for (s, p) in
            [("unix:/run/a.sock", "/run/a.sock"), ("unix:///run/a.sock", "/run/a.sock"), ("unix:a.sock", "a.sock")]
        {
            let a: ListenAddr = s.parse().unwrap();
            assert_eq!(a, ListenAddr::Unix(p.into()), "{s}");
        }
        assert_eq!(ListenAddr::Unix("/run/a.sock".into()).to_string(), "unix:///run/a.sock");
        assert_eq!(ListenAddr::Vsock { cid: 3, port: 1024 }.to_string(), "vsock://3:1024");
        for bad in
            ["", "tcp://1.2.3.4:5", "unix:", "vsock://1024", "vsock://x:1", "vsock://-2:1", "vsock://1:99999999999"]
        {
            let e = bad.parse::<ListenAddr>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
