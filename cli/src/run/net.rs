//! `shoji run --net`: `none` (the default: the guest has loopback only, as before) or `user`,
//! user-mode networking through passt (the stack podman and libvirt use): the sandbox gets a
//! virtio-net device whose frames go over a socketpair to a passt process of its own, which
//! makes the guest's connections as ordinary sockets of this user. The guest is 10.0.2.15/24
//! behind the gateway 10.0.2.2, which passt maps to the host's loopback (QEMU's user-mode
//! addresses); passt exits with the sandbox.
use anyhow::{bail, Context, Result};
use shoji_sandbox::{IpNet, NetConfig, NetHost, PciPath, PodInterface, Route, StreamBackend, UpdateNetworkRequest};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum NetMode {
    /// No network device (loopback only).
    #[default]
    None,
    /// User-mode networking through passt: outbound connections, the host at 10.0.2.2.
    User,
}

pub const GUEST_ADDRESS: &str = "10.0.2.15";
pub const GUEST_PREFIX: u8 = 24;
pub const GATEWAY: &str = "10.0.2.2";
/// passt's default MTU (the largest 802.3 frame, in IPv4 words).
pub const MTU: u16 = 65_520;
/// The guest's MAC (locally administered); passt learns it from the first frame.
const MAC: [u8; 6] = [0x02, 0x5a, 0x00, 0x00, 0x00, 0x01];

/// The passt process of one sandbox; killed when dropped.
pub struct UserNet {
    child: Child,
}

impl Drop for UserNet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl UserNet {
    /// Starts passt on one end of a socketpair; the other end is the device's backend.
    pub fn start() -> Result<(UserNet, NetConfig)> {
        let (ours, theirs) = UnixStream::pair().context("--net user: socketpair")?;
        let backend = StreamBackend::new(ours).context("--net user: socketpair")?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new("passt");
        cmd.args(["--foreground", "--quiet", "--one-off", "--ipv4-only", "--fd", &fd.to_string()])
            .args(["--address", GUEST_ADDRESS, "--netmask", &GUEST_PREFIX.to_string(), "--gateway", GATEWAY])
            .args(["--mtu", &MTU.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec only fcntl on an fd this process owns
        // (async-signal-safe): passt inherits its end of the pair.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("--net user: passt is not installed (apt-get install passt)")
            }
            Err(e) => return Err(e).context("--net user: starting passt"),
        };
        drop(theirs);
        Ok((UserNet { child }, NetConfig { backend: NetHost::Stream(backend), mac: MAC, mtu: Some(MTU) }))
    }

    /// The agent request that sets the interface plugged at `pci` up for container `id`.
    pub fn update_request(id: &str, pci: &PciPath) -> UpdateNetworkRequest {
        let addr = IpNet::new(GUEST_ADDRESS.parse().expect("an IPv4 address"), GUEST_PREFIX).expect("a prefix");
        let iface = PodInterface {
            name: "eth0".into(),
            mac: MAC,
            mtu: MTU.into(),
            addresses: vec![addr],
            routes: vec![Route::parse("default", GATEWAY).expect("a route")],
        };
        iface.update_request(id, pci)
    }
}
