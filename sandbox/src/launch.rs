//! Starting a sandbox from its VM template, or cold when there is none to use
//! ([`Sandbox::launch`]): what the front ends call.
use crate::error::SandboxError;
use crate::template;
use crate::vm::{Sandbox, SandboxConfig};
use std::path::Path;
use std::time::Duration;

impl Sandbox {
    /// Starts the sandbox from its VM template ([`crate::template`]), building the template
    /// first when this VM shape has none; a cold boot when templates are off or a template
    /// cannot be built or restored (one log line says why). The configuration's disks and
    /// shares are hot-plugged into a restored VM: ask [`Sandbox::placement`] where they are.
    pub async fn launch(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        if !template::enabled() {
            return Self::start(cfg);
        }
        if let Err(e) = template::check_shape(cfg) {
            tracing::info!("no VM template ({e}); cold boot");
            return Self::start(cfg);
        }
        let (probe, _) = cfg.vm_config()?;
        let (dir, what) = match template::locate(&probe) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("VM template: {e}; cold boot");
                return Self::start(cfg);
            }
        };
        drop(probe);
        if !dir.join(shoji_vmm::snapshot::STATE_FILE).is_file() {
            template::not_found(&dir, &what);
            if let Err(e) = template::ensure(cfg, &dir, &what).await {
                tracing::warn!("VM template not built ({e}); cold boot");
                return Self::start(cfg);
            }
        }
        let mut sb = match Self::restore(cfg, &dir).await {
            Ok(sb) => sb,
            Err(e) => {
                tracing::warn!("VM template {} not used ({e}); removed, cold boot", dir.display());
                let _ = std::fs::remove_dir_all(&dir);
                return Self::start(cfg);
            }
        };
        // A disk or share that cannot be plugged is the caller's error, not the template's.
        for d in &cfg.disks {
            let p = sb.hot_add_disk(d.clone())?;
            sb.placement.disks.push(p);
        }
        for s in &cfg.shares {
            let p = sb.hot_add_share(s.clone())?;
            sb.placement.shares.push((s.tag.clone(), p));
        }
        Ok(sb)
    }

    /// Restores the template in `template`, without the configuration's disks and shares.
    async fn restore(cfg: &SandboxConfig, template: &Path) -> Result<Sandbox, SandboxError> {
        let mut bare = cfg.clone();
        bare.disks.clear();
        bare.shares.clear();
        let (mut vm, stop) = bare.vm_config()?;
        vm.restore = Some(template.to_path_buf());
        let mut sb = Self::start_vm(cfg.dir.clone(), vm, stop)?;
        sb.placement.restored = true;
        // Up (hotplug served) or failed (the restore refused the template).
        let t0 = std::time::Instant::now();
        while !sb.control().is_running() {
            if let Some(why) = sb.has_stopped() {
                let why = sb.halt().err().unwrap_or(why);
                return Err(SandboxError::Io(why));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(SandboxError::Io("the restored VM did not come up in 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(sb)
    }
}
