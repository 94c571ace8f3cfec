//! A sandbox: our Linux guest with the agent as PID 1, booted on a thread of the calling process,
//! and the agent's client. The one code path `shoji run`, the detached sandboxes and the
//! containerd shim share (one process per sandbox, no VMM daemon).
//!
//! The sandbox's directory holds its vsock socket (`vsock.sock`; guest-initiated connections
//! land on `vsock.sock_<port>`) and its serial console log (`console.log`). The caller owns the
//! directory; [`Sandbox::stop`] stops and joins the VM but leaves files to the caller.
use crate::{artifacts, cmdline, host, DiskConfig, KernelImage, SerialOut, ShareConfig, VmConfig, VmError};
use shoji_protocol::agent;
use shoji_protocol::agent_ttrpc::AgentServiceClient;
use shoji_protocol::ttrpc;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use vmm_sys_util::eventfd::EventFd;

/// How long the agent may take to answer after the VM starts (a PVM host boots in ~20 s).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Name of the vsock socket in the sandbox directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Name of the console log in the sandbox directory.
pub const CONSOLE_LOG: &str = "console.log";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Artifacts(#[from] artifacts::ArtifactError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("sandbox: {0}")]
    Io(String),
    #[error("agent: {0}")]
    Agent(String),
}

/// What a sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Holds the vsock socket and the console log (must exist).
    pub dir: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Guest kernel and initramfs; `None`: the cached ones, built on first use.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Words added to the guest kernel command line.
    pub extra_cmdline: Option<String>,
    pub disks: Vec<DiskConfig>,
    pub shares: Vec<ShareConfig>,
}

impl SandboxConfig {
    pub fn new(dir: PathBuf) -> Self {
        SandboxConfig {
            dir,
            vcpus: 1,
            memory_mib: 256,
            kernel: None,
            initrd: None,
            extra_cmdline: None,
            disks: vec![],
            shares: vec![],
        }
    }

    /// The VM's configuration (artifacts found or built, then checked), and its stop eventfd.
    pub fn vm_config(&self) -> Result<(VmConfig, Arc<EventFd>), SandboxError> {
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => artifacts::ensure_kernel()?,
        };
        let initrd = match &self.initrd {
            Some(i) => i.clone(),
            None => artifacts::ensure_rootfs()?,
        };
        let pvm = host::is_pvm();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| SandboxError::Io(format!("eventfd: {e}")))?);
        let cfg = VmConfig {
            kernel: KernelImage::Path(kernel),
            initrd: Some(initrd),
            cmdline: cmdline::linux(self.extra_cmdline.as_deref(), pvm),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            serial: SerialOut::File(self.dir.join(CONSOLE_LOG)),
            disks: self.disks.clone(),
            shares: self.shares.clone(),
            vsock: Some(self.dir.join(VSOCK_SOCKET)),
            stop: Some(stop.clone()),
            timeout: None,
            confine: crate::confine::default_enabled(),
        };
        crate::vm::check(&cfg)?;
        Ok((cfg, stop))
    }
}

/// A running sandbox VM.
pub struct Sandbox {
    dir: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<Result<crate::VmOutcome, VmError>>>,
    stopped: watch::Receiver<Option<String>>,
}

impl Sandbox {
    /// Checks the configuration and boots the VM on a new thread.
    pub fn start(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let (vm, stop) = cfg.vm_config()?;
        Self::start_vm(cfg.dir.clone(), vm, stop)
    }

    /// Boots an already checked VM configuration (see [`SandboxConfig::vm_config`]).
    pub fn start_vm(dir: PathBuf, vm: VmConfig, stop: Arc<EventFd>) -> Result<Sandbox, SandboxError> {
        let (tx, stopped) = watch::channel(None);
        // The library's own thread: it confines itself once the VM runs (crate::confine).
        let thread = crate::vm::spawn(vm, move |r| {
            let why = match r {
                Ok(o) => format!("the VM stopped ({:?})", o.reason),
                Err(e) => format!("the VM failed: {e}"),
            };
            let _ = tx.send(Some(why));
        })
        .map_err(|e| SandboxError::Io(format!("starting the VM thread: {e}")))?;
        Ok(Sandbox { dir, stop, thread: Some(thread), stopped })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }

    /// Connects to the agent, waiting for the guest to boot (up to `timeout`).
    pub async fn agent(&self, timeout: Duration) -> Result<AgentServiceClient, SandboxError> {
        let port = shoji_devices::model::AGENT_VSOCK_PORT;
        let sock = self.vsock_socket();
        tokio::select! {
            c = shoji_protocol::client::connect(&sock, port, timeout) => {
                c.map(AgentServiceClient::new).map_err(|e| SandboxError::Agent(e.to_string()))
            }
            why = self.stopped() => Err(SandboxError::Agent(format!("{why} before the agent answered"))),
        }
    }

    /// Resolves when the VM has stopped, with the reason.
    pub async fn stopped(&self) -> String {
        let mut rx = self.stopped.clone();
        let why = rx.wait_for(Option::is_some).await.map(|v| v.clone().unwrap_or_default());
        why.unwrap_or_else(|_| "the VM thread is gone".into())
    }

    /// Whether the VM has stopped, with the reason.
    pub fn has_stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// The last `n` lines of the console log, indented (for error reports).
    pub fn console_tail(&self, n: usize) -> String {
        console_tail(&self.dir.join(CONSOLE_LOG), n)
    }

    /// Stops the VM (if it still runs) and joins its thread.
    pub fn stop(mut self) -> Result<(), String> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), String> {
        let Some(t) = self.thread.take() else { return Ok(()) };
        let _ = self.stop.write(1);
        match t.join() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the VM thread panicked".into()),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// The last `n` lines of a console log, indented.
pub fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// A ttrpc context with a time limit (zero: none, for the calls that wait on a process).
pub fn ctx(limit: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(limit.as_nanos().min(i64::MAX as u128) as i64)
}

/// The message of an agent error (its status message, not the whole RPC status).
pub fn rpc_msg(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
        e => e.to_string(),
    }
}

/// The agent storage that mounts virtio-fs share `tag` at `mount_point` in the guest.
pub fn virtiofs_storage(tag: &str, mount_point: &str, read_only: bool) -> agent::Storage {
    agent::Storage {
        driver: "virtio-fs".into(),
        source: tag.into(),
        fstype: "virtiofs".into(),
        options: vec![if read_only { "ro" } else { "rw" }.into()],
        mount_point: mount_point.into(),
        ..Default::default()
    }
}
