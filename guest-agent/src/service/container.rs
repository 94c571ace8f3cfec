//! CreateSandbox, CreateContainer and RemoveContainer: the RPCs that mount storages and rewrite
//! specs before (or after) the runtime is called.

use oci_spec::runtime::{Root, Spec};
use shoji_protocol::agent;
use shoji_protocol::ttrpc::Code;

use super::{convert, unmount_blocking, Container, Inner, NoUevents, RpcError, Sandbox, ServiceConfig};
use crate::device::{add_devices, DeviceRequest, UeventSource};
use crate::runtime::{ContainerConfig, RuntimeError};
use crate::storage::{mount_storages, unmount_storages, Driver, MountedStorage, StorageRequest};

/// The longest hostname Linux takes.
const HOST_NAME_MAX: usize = 64;

impl Inner {
    pub(super) async fn create_sandbox(&self, req: agent::CreateSandboxRequest) -> Result<(), RpcError> {
        if !req.hostname.is_empty() {
            check_hostname(&req.hostname)?;
        }
        if req.entropy.len() > MAX_ENTROPY {
            return Err(RpcError::invalid("entropy", format!("{} bytes (at most {MAX_ENTROPY})", req.entropy.len())));
        }
        if self.cfg.guest_wide {
            // First: nothing random and nothing timed happens in this sandbox before it.
            seed_guest(&req.entropy, req.realtime_ns)?;
        }
        {
            let mut st = self.state();
            if let Some(sb) = &st.sandbox {
                return Err(RpcError::new(Code::ALREADY_EXISTS, format!("sandbox {:?} is already created", sb.id)));
            }
            // Claimed now, so a concurrent CreateSandbox is refused; filled in below.
            st.sandbox = Some(Sandbox { id: req.sandbox_id.clone(), storages: Vec::new() });
        }
        let storages: Vec<StorageRequest> = req.storages.iter().map(convert::storage_request).collect();
        let result = async {
            if !req.hostname.is_empty() {
                if self.cfg.guest_wide {
                    crate::sys::sethostname(&req.hostname).map_err(|e| {
                        RpcError::new(Code::INTERNAL, format!("setting hostname {:?}: {e}", req.hostname))
                    })?;
                } else {
                    tracing::debug!(hostname = %req.hostname, "hostname not set (disabled)");
                }
            }
            let cfg = self.cfg.clone();
            on_blocking_pool(move || prepare(&cfg, None, &storages, &[])).await
        }
        .await;
        let mounted = match result {
            Ok(mounted) => mounted,
            Err(e) => {
                self.state().sandbox = None;
                return Err(e.context(format!("sandbox {:?}", req.sandbox_id)));
            }
        };
        let leftover = match self.state().sandbox.as_mut() {
            Some(sb) => {
                sb.storages = mounted;
                None
            }
            // DestroySandbox came in the meantime.
            None => Some(mounted),
        };
        if let Some(mounted) = leftover {
            unmount_blocking(mounted).await?;
            let msg = format!("sandbox {:?} was destroyed while it was being created", req.sandbox_id);
            return Err(RpcError::new(Code::ABORTED, msg));
        }
        tracing::info!(sandbox = %req.sandbox_id, "sandbox created");
        Ok(())
    }

    pub(super) async fn create_container(&self, req: agent::CreateContainerRequest) -> Result<(), RpcError> {
        let id = req.container_id.clone();
        convert::check_container_id(&id)?;
        let ctx = || format!("container {id:?}");
        // Everything that needs no work comes first: a bad request changes nothing.
        let mut spec = convert::parse_spec(&req.oci_spec_json).map_err(|e| e.context(ctx()))?;
        let rootfs = if req.rootfs.is_empty() {
            None
        } else {
            Some(self.cfg.storage.resolve(&req.rootfs).map_err(|e| RpcError::invalid("rootfs", e).context(ctx()))?)
        };
        let storages: Vec<StorageRequest> = req.storages.iter().map(convert::storage_request).collect();
        let devices: Vec<DeviceRequest> = req.devices.iter().map(convert::device_request).collect();

        {
            let mut st = self.state();
            if st.containers.contains_key(&id) {
                return Err(RpcError::runtime(&id, RuntimeError::Exists(id.clone())));
            }
            st.containers.insert(id.clone(), Container::Creating);
        }
        let mounted = if storages.is_empty() && devices.is_empty() {
            Vec::new()
        } else {
            let cfg = self.cfg.clone();
            let prepared = on_blocking_pool(move || {
                let mounted = prepare(&cfg, Some(&mut spec), &storages, &devices)?;
                Ok((spec, mounted))
            })
            .await;
            match prepared {
                Ok((rewritten, mounted)) => {
                    spec = rewritten;
                    mounted
                }
                Err(e) => {
                    self.state().containers.remove(&id);
                    return Err(e.context(ctx()));
                }
            }
        };
        if let Some(path) = rootfs {
            let mut root = spec.root().clone().unwrap_or_else(|| {
                let mut r = Root::default();
                r.set_readonly(None);
                r
            });
            root.set_path(path);
            spec.set_root(Some(root));
        }

        match self.runtime.create(ContainerConfig { id: id.clone(), spec }).await {
            Ok(()) => {
                self.state().containers.insert(id.clone(), Container::Created { storages: mounted });
                tracing::info!(container = %id, "container created");
                Ok(())
            }
            Err(e) => {
                let err = RpcError::runtime(&id, e);
                if let Err(undo) = unmount_blocking(mounted).await {
                    tracing::warn!(container = %id, "after a failed create: {undo}");
                }
                self.state().containers.remove(&id);
                Err(err)
            }
        }
    }

    /// Removes the container from the runtime, then unmounts its storages. A container the
    /// runtime does not know but the agent mounted storages for is cleaned up all the same.
    pub(super) async fn remove_container(&self, id: &str, timeout_secs: u32) -> Result<(), RpcError> {
        if matches!(self.state().containers.get(id), Some(Container::Creating)) {
            return Err(RpcError::new(Code::FAILED_PRECONDITION, format!("container {id:?} is still being created")));
        }
        let removed = self.runtime.remove(id, timeout_secs).await;
        let known = match removed {
            Ok(()) => true,
            Err(RuntimeError::NoContainer(_)) => false,
            Err(e) => return Err(RpcError::runtime(id, e)),
        };
        let entry = {
            let mut st = self.state();
            match st.containers.get(id) {
                Some(Container::Created { .. }) => st.containers.remove(id),
                _ => None,
            }
        };
        let storages = match entry {
            Some(Container::Created { storages }) => storages,
            _ if known => Vec::new(),
            _ => return Err(RpcError::runtime(id, RuntimeError::NoContainer(id.to_owned()))),
        };
        unmount_blocking(storages).await.map_err(|e| e.context(format!("container {id:?}")))?;
        tracing::info!(container = %id, "container removed");
        Ok(())
    }
}

fn check_hostname(name: &str) -> Result<(), RpcError> {
    if name.len() > HOST_NAME_MAX || name.contains(['\0', '/']) {
        return Err(RpcError::invalid(
            "hostname",
            format!("{name:?} must be at most {HOST_NAME_MAX} bytes without NUL or '/'"),
        ));
    }
    Ok(())
}

/// Runs `f` on the blocking pool: storages and devices may wait for a hot-plugged device, and
/// the agent's single-threaded runtime must keep serving meanwhile.
pub(super) async fn on_blocking_pool<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RpcError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::new(Code::INTERNAL, format!("storage and device task failed: {e}")))?
}

/// Mounts the storages, then handles the devices and rewrites `spec` in one batch. On failure
/// nothing stays mounted and the spec is unchanged.
fn prepare(
    cfg: &ServiceConfig,
    spec: Option<&mut Spec>,
    storages: &[StorageRequest],
    devices: &[DeviceRequest],
) -> Result<Vec<MountedStorage>, RpcError> {
    // A uevent socket is opened (before any lookup) only when a device may be hot-plugged.
    let hotplug = !devices.is_empty() || storages.iter().any(|s| Driver::parse(&s.driver) == Some(Driver::Blk));
    let mut uevents: Box<dyn UeventSource + Send> = if hotplug {
        (cfg.uevents)().map_err(|e| RpcError::new(Code::INTERNAL, format!("opening the uevent socket: {e}")))?
    } else {
        Box::new(NoUevents)
    };
    let mounted = mount_storages(storages, &cfg.storage, &mut *uevents)?;
    if let Some(spec) = spec {
        let mut ctx = cfg.storage.device_context(&mut *uevents);
        if let Err(e) = add_devices(spec, devices, &mut ctx) {
            if let Err(undo) = unmount_storages(mounted) {
                tracing::warn!("after a device failure: {undo}");
            }
            return Err(e.into());
        }
    }
    Ok(mounted)
}

/// The most entropy one CreateSandbox may carry.
const MAX_ENTROPY: usize = 512;

/// Mixes the host's randomness into the kernel pool (credited) and reseeds the CRNG, then sets
/// the clock: what a VM restored from a template needs before any container runs.
fn seed_guest(entropy: &[u8], realtime_ns: u64) -> Result<(), RpcError> {
    if !entropy.is_empty() {
        crate::sys::add_entropy(entropy)
            .map_err(|e| RpcError::new(Code::INTERNAL, format!("adding the host's entropy: {e}")))?;
    }
    if realtime_ns > 0 {
        crate::sys::set_realtime(realtime_ns)
            .map_err(|e| RpcError::new(Code::INTERNAL, format!("setting the clock: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        check_hostname("sandbox-1").unwrap();
        assert_eq!(check_hostname(&"h".repeat(65)).unwrap_err().code, Code::INVALID_ARGUMENT);
        assert!(check_hostname("a/b").unwrap_err().message.starts_with("hostname: "));
    }
}
