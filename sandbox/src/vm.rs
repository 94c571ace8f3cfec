//! The sandbox VM: our Linux guest with the agent as PID 1, booted on a thread of the calling
//! process (one process per sandbox, no VMM daemon); [`crate::Session`] talks to its agent.
//!
//! The sandbox's directory holds its vsock socket (`vsock.sock`; guest-initiated connections
//! land on `vsock.sock_<port>`) and its serial console log (`console.log`). The caller owns the
//! directory; [`Sandbox::stop`] stops and joins the VM but leaves files to the caller.
use crate::artifacts;
use crate::error::SandboxError;
use shoji_protocol::agent_ttrpc::AgentServiceClient;
use shoji_vmm::{
    cmdline, host, DiskConfig, HotplugError, HotplugStats, KernelImage, NetConfig, PauseError, PciPath, SerialOut,
    ShareConfig, VmConfig, VmControl, VmError,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use vmm_sys_util::eventfd::EventFd;

/// Name of the vsock socket in the sandbox directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Name of the console log in the sandbox directory.
pub const CONSOLE_LOG: &str = "console.log";
/// How long every vCPU may take to stop when the VM is paused (one is kicked out of KVM_RUN at
/// once; this bounds a thread stuck in the kernel).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Holds the vsock socket and the console log (must exist).
    pub dir: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Guest kernel and initramfs; `None`: the ones `shoji setup` cached (looked up, never built).
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

    /// The VM's configuration (artifacts looked up, then checked), and its stop eventfd.
    pub fn vm_config(&self) -> Result<(VmConfig, Arc<EventFd>), SandboxError> {
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => artifacts::kernel()?,
        };
        let initrd = match &self.initrd {
            Some(i) => i.clone(),
            None => artifacts::initramfs()?,
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
            confine: shoji_vmm::confine::default_enabled(),
            irqchip: shoji_vmm::IrqChip::InKernel,
            restore: None,
        };
        shoji_vmm::vm::check(&cfg)?;
        Ok((cfg, stop))
    }
}

/// A running sandbox VM.
pub struct Sandbox {
    dir: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<Result<shoji_vmm::VmOutcome, VmError>>>,
    stopped: watch::Receiver<Option<String>>,
    /// Hotplug into the running VM.
    control: Arc<VmControl>,
    /// Where the configuration's disks and shares are on the guest's bus.
    pub(crate) placement: Placement,
}

/// Where a sandbox's configured disks and shares are in the guest: on the slots of the cold
/// boot's plan, or hot-plugged after a template restore. What a front end names them by.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Restored from a template: the disks and shares were hot-plugged.
    pub restored: bool,
    pub(crate) disks: Vec<PciPath>,
    pub(crate) shares: Vec<(String, PciPath)>,
}

impl Placement {
    /// A cold boot's: the slot plan's paths.
    pub fn cold(cfg: &SandboxConfig) -> Result<Placement, SandboxError> {
        use shoji_devices::model::{DeviceKind, PciSlotPlan};
        let plan = PciSlotPlan::new(cfg.disks.len(), cfg.shares.len(), true)
            .map_err(|e| SandboxError::Io(format!("PCI slots: {e}")))?;
        let missing = || SandboxError::Io("PCI slot plan".into());
        let disks = (0..cfg.disks.len())
            .map(|i| plan.path(DeviceKind::Block, i).ok_or_else(missing))
            .collect::<Result<_, _>>()?;
        let shares = cfg
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| plan.path(DeviceKind::Fs, i).map(|p| (s.tag.clone(), p)).ok_or_else(missing))
            .collect::<Result<_, _>>()?;
        Ok(Placement { restored: false, disks, shares })
    }

    /// The PCI path of the configuration's `index`th disk.
    pub fn disk_path(&self, index: usize) -> Option<&PciPath> {
        self.disks.get(index)
    }

    /// The storage that mounts the configuration's share `tag` at `mount_point` in the guest:
    /// by tag for a boot device, by PCI path (the agent waits for it) for a hot-plugged one.
    pub fn share_storage(&self, tag: &str, mount_point: &str, read_only: bool) -> crate::Storage {
        match self.shares.iter().find(|(t, _)| t == tag) {
            Some((_, p)) if self.restored => crate::hotplugged_virtiofs_storage(tag, p, mount_point, read_only),
            _ => crate::virtiofs_storage(tag, mount_point, read_only),
        }
    }
}

impl Sandbox {
    /// Checks the configuration and boots the VM on a new thread (a cold boot).
    pub fn start(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let (vm, stop) = cfg.vm_config()?;
        let placement = Placement::cold(cfg)?;
        let mut sb = Self::start_vm(cfg.dir.clone(), vm, stop)?;
        sb.placement = placement;
        Ok(sb)
    }

    /// Where the configuration's disks and shares are in the guest.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub(crate) fn control(&self) -> &VmControl {
        &self.control
    }

    /// Boots an already checked VM configuration (see [`SandboxConfig::vm_config`]).
    pub fn start_vm(dir: PathBuf, vm: VmConfig, stop: Arc<EventFd>) -> Result<Sandbox, SandboxError> {
        let (tx, stopped) = watch::channel(None);
        let control = VmControl::new();
        // The library's own thread: it confines itself once the VM runs (crate::confine).
        let thread = shoji_vmm::vm::spawn_with_control(vm, control.clone(), move |r| {
            let why = match r {
                Ok(o) => format!("the VM stopped ({:?})", o.reason),
                Err(e) => format!("the VM failed: {e}"),
            };
            let _ = tx.send(Some(why));
        })
        .map_err(|e| SandboxError::Io(format!("starting the VM thread: {e}")))?;
        Ok(Sandbox { dir, stop, thread: Some(thread), stopped, control, placement: Placement::default() })
    }

    /// Plugs `disk` into the running VM as virtio-blk and returns its PCI path, by which the
    /// agent finds it once it has rescanned the guest's bus. Opens the file and makes KVM calls
    /// on the calling thread (a few milliseconds; from async code, call it where blocking is
    /// fine). Plugs are serialised.
    pub fn hot_add_disk(&self, disk: DiskConfig) -> Result<PciPath, SandboxError> {
        self.control.add_disk(disk).map_err(|e| self.hotplug_error(e))
    }

    /// Shares `share.dir` with the running VM as a new virtio-fs device, served by a device
    /// thread of its own that Landlock confines to that directory; returns its PCI path (name
    /// it in the storage: [`crate::hotplugged_virtiofs_storage`]). The tag must be new in the VM.
    pub fn hot_add_share(&self, share: ShareConfig) -> Result<PciPath, SandboxError> {
        self.control.add_share(share).map_err(|e| self.hotplug_error(e))
    }

    /// Plugs a virtio-net device on `net.tap` (opened by the caller in its network namespace)
    /// into the running VM; returns its PCI path.
    pub fn hot_add_net(&self, net: NetConfig) -> Result<PciPath, SandboxError> {
        self.control.add_net(net).map_err(|e| self.hotplug_error(e))
    }

    /// Unplugs the hot-plugged device at `path`. Ask the agent to remove it in the guest first:
    /// this takes it away whether or not the guest let go (log that case), and its slot is the
    /// next hot-add's.
    pub fn hot_remove(&self, path: &PciPath) -> Result<(), SandboxError> {
        self.control.remove(path).map_err(|e| self.hotplug_error(e))
    }

    /// What hot-plugged devices hold now (for leak checks).
    pub fn hotplug_stats(&self) -> Result<HotplugStats, SandboxError> {
        self.control.stats().map_err(|e| self.hotplug_error(e))
    }

    /// Pauses the VM (every vCPU parked; memory and devices kept): containerd's Pause of a
    /// task. Fails, the VM running on, when a vCPU does not stop within [`PAUSE_TIMEOUT`].
    pub fn pause(&self) -> Result<(), SandboxError> {
        self.control.pause(PAUSE_TIMEOUT).map_err(|e| self.pause_error(e))
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), SandboxError> {
        self.control.resume().map_err(|e| self.pause_error(e))
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    fn pause_error(&self, e: PauseError) -> SandboxError {
        match e {
            PauseError::NotRunning => {
                SandboxError::Stopped(self.has_stopped().unwrap_or_else(|| "the VM is not running".into()))
            }
            e => SandboxError::Io(format!("pause: {e}")),
        }
    }

    fn hotplug_error(&self, e: HotplugError) -> SandboxError {
        match e {
            HotplugError::NotRunning => {
                SandboxError::Stopped(self.has_stopped().unwrap_or_else(|| "the VM is not running".into()))
            }
            e => SandboxError::Vm(e.into()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }

    /// Connects to the agent, waiting for the guest to boot (up to `timeout`).
    pub(crate) async fn agent(&self, timeout: Duration) -> Result<AgentServiceClient, SandboxError> {
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

    pub(crate) fn halt(&mut self) -> Result<(), String> {
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

/// How much of a log's end [`console_tail`] reads: lines are short, and a log may be large.
pub const TAIL_BYTES: u64 = 64 << 10;

/// The last `n` lines of a console log (a [`shoji_vmm::logfile`]), indented. Reads at most
/// [`TAIL_BYTES`] from its end.
pub fn console_tail(path: &Path, n: usize) -> String {
    let bytes = shoji_vmm::logfile::tail(path, TAIL_BYTES).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// Creates `dir` (not its parents) private to its owner, 0700 whatever the umask: a sandbox
/// directory holds the agent's socket (whoever reaches it runs commands in the guest) and the
/// guest's logs.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// 100 MiB through the console sink the VM uses: the file stays under its cap and the tail
    /// shows the newest lines.
    #[test]
    fn the_console_log_is_capped_and_its_tail_is_the_newest_output() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CONSOLE_LOG);
        let mut w = shoji_vmm::vm::serial_writer(shoji_vmm::SerialOut::File(p.clone())).unwrap();
        let (mut written, mut i) = (0u64, 0u64);
        while written < 100 << 20 {
            let line = format!("console line {i:09} {}\n", "x".repeat(100));
            w.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
            if i % 100_000 == 0 {
                assert!(std::fs::metadata(&p).unwrap().len() <= shoji_vmm::logfile::CONSOLE_LOG_MAX);
            }
        }
        w.finish();
        drop(w);
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= shoji_vmm::logfile::CONSOLE_LOG_MAX && len > shoji_vmm::logfile::CONSOLE_LOG_MAX / 2, "{len}");
        let tail = console_tail(&p, 3);
        let want: Vec<String> = (i - 3..i).map(|k| format!("  console line {k:09} {}", "x".repeat(100))).collect();
        assert_eq!(tail, want.join("\n"));
        // No sibling files either (no rotation left behind).
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn console_tail_of_a_big_plain_file_reads_its_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big.log");
        let mut f = std::fs::File::create(&p).unwrap();
        let body: String = (0..200_000).map(|k| format!("old {k}\n")).collect();
        f.write_all(body.as_bytes()).unwrap();
        f.write_all(b"second to last\nlast\n").unwrap();
        assert_eq!(console_tail(&p, 2), "  second to last\n  last");
        assert_eq!(console_tail(&d.path().join("missing"), 2), "");
    }

    #[test]
    fn private_dirs_are_0700_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sb");
        create_private_dir(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(create_private_dir(&p).is_err(), "an existing directory is not taken over");
    }
}
