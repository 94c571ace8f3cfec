//! VM templates: a sandbox VM booted once to "agent listening" with only its vsock device, saved
//! ([`shoji_vmm::snapshot`]), and restored for every later sandbox of the same shape instead of
//! booting Linux again (Firecracker's snapshots, Kata's VM templating).
//!
//! A template is keyed by what the saved guest depends on: the kernel and initramfs files
//! (path, size, modification time), the guest command line, vCPUs, memory and the snapshot
//! format; it lives in `<cache>/templates/<key>/` (`state`, `memory`, and `template.json`
//! saying what it was built for). The first sandbox of a shape builds it (the boot it would have
//! made anyway, plus the save), under a lock file so concurrent first sandboxes build it once.
//! A restore that fails (a damaged file, another shape) removes the template and the sandbox
//! cold boots, with one log line; a template of another shape is simply not used (one log line
//! says which exist). `SHOJI_TEMPLATES=off` turns templates off (cold boots only);
//! `SHOJI_TEMPLATES=/abs/dir` keeps them there instead of the cache.
//!
//! Clones of one template start with the same kernel CRNG state and clock: the session's
//! CreateSandbox gives the guest fresh host entropy and the host's time before anything runs
//! (see docs/security.md).
use crate::artifacts;
use crate::error::SandboxError;
use crate::vm::{Sandbox, SandboxConfig};
use sha2::{Digest, Sha256};
use shoji_vmm::snapshot::{SnapshotError, FORMAT_VERSION};
use shoji_vmm::VmConfig;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where templates live under the cache directory.
const TEMPLATES: &str = "templates";
/// What a template was built for, for people and for the "which exist" log line.
const INFO_FILE: &str = "template.json";
/// How long a build may wait for the template VM's agent connection to be gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether templates are used (`SHOJI_TEMPLATES=off`: never).
pub fn enabled() -> bool {
    std::env::var("SHOJI_TEMPLATES").map_or(true, |v| v != "off" && v != "0")
}

/// Where templates live: `SHOJI_TEMPLATES` when it is an absolute directory, else the cache's.
fn root() -> Option<PathBuf> {
    match std::env::var_os("SHOJI_TEMPLATES").map(PathBuf::from) {
        Some(d) if d.is_absolute() => Some(d),
        _ => artifacts::cache_dir().map(|c| c.join(TEMPLATES)),
    }
}

/// A file's identity for the key: path, size, modification time.
fn file_id(p: &Path) -> Result<String, SandboxError> {
    let md = std::fs::metadata(p).map_err(|e| SandboxError::Io(format!("{}: {e}", p.display())))?;
    Ok(format!("{}:{}:{}.{}", p.display(), md.len(), md.mtime(), md.mtime_nsec()))
}

/// The template a VM configured as `vm` would use: its directory, and a one-line description.
pub fn locate(vm: &VmConfig) -> Result<(PathBuf, String), SandboxError> {
    let root = root().ok_or_else(|| SandboxError::Io("no cache directory for templates".into()))?;
    let kernel = match &vm.kernel {
        shoji_vmm::KernelImage::Path(p) => file_id(p)?,
        shoji_vmm::KernelImage::Bytes { name, data } => format!("{name}:{}", data.len()),
    };
    let initrd = vm.initrd.as_deref().map(file_id).transpose()?.unwrap_or_default();
    let id = format!("{kernel} {initrd} {:?} {FORMAT_VERSION} {} {}", vm.cmdline, vm.vcpus, vm.memory_mib);
    let key: String = Sha256::digest(id.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let name = |k: &shoji_vmm::KernelImage| match k {
        shoji_vmm::KernelImage::Path(p) => p.display().to_string(),
        shoji_vmm::KernelImage::Bytes { name, .. } => name.to_string(),
    };
    // The shape, short: the key covers the files' identities and the command line too.
    let what = format!("vcpus={} memory_mib={} kernel={}", vm.vcpus, vm.memory_mib, name(&vm.kernel));
    Ok((root.join(key), what))
}

/// The other templates in the cache, as their descriptions (for the "not used" log line).
fn others(dir: &Path) -> Vec<String> {
    let Some(parent) = dir.parent() else { return Vec::new() };
    let Ok(rd) = std::fs::read_dir(parent) else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.path() != dir)
        .filter_map(|e| std::fs::read_to_string(e.path().join(INFO_FILE)).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// Builds the template for `cfg`'s VM shape into `dir` unless it is there: boots a VM with
/// only vsock, waits for the agent to listen, lets go of the connection, pauses, saves.
pub async fn ensure(cfg: &SandboxConfig, dir: &Path, what: &str) -> Result<(), SandboxError> {
    if dir.join(shoji_vmm::snapshot::STATE_FILE).is_file() {
        return Ok(());
    }
    let parent = dir.parent().ok_or_else(|| SandboxError::Io("template directory".into()))?;
    std::fs::create_dir_all(parent).map_err(|e| SandboxError::Io(format!("{}: {e}", parent.display())))?;
    let _lock = lock(&dir.with_extension("lock")).await?;
    if dir.join(shoji_vmm::snapshot::STATE_FILE).is_file() {
        return Ok(()); // built by whoever held the lock
    }
    let t0 = Instant::now();
    tracing::info!("building the VM template ({what}); once per VM shape");
    let staging = parent.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| SandboxError::Io(format!("{}: {e}", staging.display())))?;
    let r = build(cfg, &staging, dir, what).await;
    let _ = std::fs::remove_dir_all(&staging);
    r?;
    tracing::info!("VM template built in {:.1?}: {}", t0.elapsed(), dir.display());
    Ok(())
}

async fn build(cfg: &SandboxConfig, staging: &Path, dir: &Path, what: &str) -> Result<(), SandboxError> {
    let mut tcfg = cfg.clone();
    tcfg.dir = staging.to_path_buf();
    tcfg.disks.clear();
    tcfg.shares.clear();
    let (vm_cfg, stop) = tcfg.vm_config()?;
    let vm = Sandbox::start_vm(staging.to_path_buf(), vm_cfg, stop)?;
    let r = async {
        // The agent listening is what a restored sandbox starts from; the connection goes
        // before the save (a host socket cannot be saved).
        let port = shoji_devices::model::AGENT_VSOCK_PORT;
        let sock = vm.vsock_socket();
        let conn = tokio::select! {
            c = shoji_protocol::client::connect_stream(&sock, port, crate::AGENT_TIMEOUT) => {
                c.map_err(|e| SandboxError::Agent(e.to_string()))?
            }
            why = vm.stopped() => return Err(SandboxError::Stopped(why)),
        };
        drop(conn);
        let snap = staging.join("snap");
        let deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            vm.pause()?;
            match vm.control().snapshot(&snap) {
                Ok(()) => break,
                // The vsock device still winds the connection down: let the guest run a moment.
                Err(SnapshotError::Unsupported(_, why)) if why.contains("vsock") && Instant::now() < deadline => {
                    vm.resume()?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(SandboxError::Io(format!("saving the VM template: {e}"))),
            }
        }
        std::fs::write(snap.join(INFO_FILE), format!("{what}\n"))
            .map_err(|e| SandboxError::Io(format!("{}: {e}", snap.display())))?;
        match std::fs::rename(&snap, dir) {
            Ok(()) => Ok(()),
            Err(_) if dir.join(shoji_vmm::snapshot::STATE_FILE).is_file() => Ok(()),
            Err(e) => Err(SandboxError::Io(format!("{}: {e}", dir.display()))),
        }
    }
    .await;
    if let Err(e) = vm.stop() {
        tracing::debug!("template VM: {e}");
    }
    r
}

/// Holds an exclusive flock on `path` (waiting for another builder) until dropped.
async fn lock(path: &Path) -> Result<std::fs::File, SandboxError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| SandboxError::Io(format!("{}: {e}", path.display())))?;
    let deadline = Instant::now() + crate::AGENT_TIMEOUT;
    loop {
        // SAFETY: flock on an fd we own; LOCK_NB so the async task never blocks.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if Instant::now() > deadline {
            return Err(SandboxError::Io(format!("{}: another build holds it too long", path.display())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `cfg`'s VM shape has templates: 1-vCPU sandboxes only, for now. 2-vCPU guests on
/// PVM hosts stalled their second vCPU (an RCU stall, the guest answering no more) after an
/// OOM kill, restored and cold booted alike (docs/kubernetes.md); until that is understood,
/// only 1-vCPU snapshots are made and tested.
pub fn check_shape(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    if cfg.vcpus > 1 {
        return Err(SandboxError::Io(format!(
            "vcpus: templates are for 1-vCPU sandboxes only (asked for {})",
            cfg.vcpus
        )));
    }
    Ok(())
}

/// Builds (or finds) the template `cfg`'s sandboxes restore from: its directory.
pub async fn build_for(cfg: &SandboxConfig) -> Result<PathBuf, SandboxError> {
    check_shape(cfg)?;
    let (vm, _) = cfg.vm_config()?;
    let (dir, what) = locate(&vm)?;
    drop(vm);
    ensure(cfg, &dir, &what).await?;
    Ok(dir)
}

/// The templates there are: (directory, what it was built for).
pub fn list() -> Vec<(PathBuf, String)> {
    let Some(root) = root() else { return Vec::new() };
    let Ok(rd) = std::fs::read_dir(&root) else { return Vec::new() };
    let mut v: Vec<_> = rd
        .flatten()
        .filter_map(|e| {
            let what = std::fs::read_to_string(e.path().join(INFO_FILE)).ok()?;
            Some((e.path(), what.trim().to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The log line for a VM shape that has no template while others exist.
pub fn not_found(dir: &Path, what: &str) {
    let others = others(dir);
    if others.is_empty() {
        tracing::info!("no VM template for {what}");
    } else {
        tracing::info!("no VM template for {what}; not used, built for other shapes: {}", others.join(" | "));
    }
}
