//! Landlock for the VMM's threads: the device thread may open only the VM's disk images and
//! shared directories (the virtio-fs server's every open lands below a share), the vCPU threads
//! nothing. Best effort: on a kernel without Landlock this logs once and the thread goes on with
//! its seccomp filter and capabilities only.
use super::{Plan, ThreadKind};
use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};
use std::sync::Once;

/// The newest ABI this code knows; older kernels get what they support (best effort).
const ABI_WANTED: ABI = ABI::V6;

static UNSUPPORTED: Once = Once::new();

/// Restricts the calling thread (Landlock domains are per thread and inherited by children).
pub fn restrict(kind: ThreadKind, plan: &Plan) -> Result<(), String> {
    let mut paths: Vec<(std::path::PathBuf, bool)> = match kind {
        // A virtio-fs reset rebuilds the FUSE server on the vCPU thread that wrote the status.
        ThreadKind::Devices | ThreadKind::Vcpu(_) => plan.device_paths.clone(),
        // The VM thread removes the vsock sockets at teardown: no file restriction for it.
        ThreadKind::Vmm => return Ok(()),
    };
    // fuse-backend-rs reopens inodes through /proc/self/fd and reads /proc/self/mountinfo.
    if !plan.device_paths.is_empty() {
        paths.push(("/proc/self".into(), false));
    }
    let all = AccessFs::from_all(ABI_WANTED);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .and_then(|r| r.create())
        .map_err(|e| e.to_string())?;
    for (path, writable) in &paths {
        let fd = PathFd::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let is_dir = path.is_dir();
        let access = match (is_dir, writable) {
            (true, true) => all,
            (true, false) => AccessFs::from_read(ABI_WANTED),
            (false, true) => AccessFs::from_file(ABI_WANTED),
            (false, false) => AccessFs::from_file(ABI_WANTED) & AccessFs::from_read(ABI_WANTED),
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(|e| e.to_string())?;
    }
    let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
    if status.ruleset == RulesetStatus::NotEnforced {
        UNSUPPORTED.call_once(|| tracing::warn!("this kernel has no Landlock: VMM threads run without it"));
    }
    Ok(())
}
