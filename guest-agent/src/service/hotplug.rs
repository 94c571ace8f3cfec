//! RemoveDevice, and the record of which container (or the sandbox) uses which PCI device, so
//! that a device is not pulled from under a container that still has it unless the host says
//! `force`. A use is recorded when CreateContainer/CreateSandbox names the device (a blk
//! `Device` or a blk `Storage`) and dropped when the container is removed.

use std::fmt;
use std::time::Duration;

use shoji_devices::model::{virtiofs_pci_path, PciPath};
use shoji_protocol::agent;
use shoji_protocol::ttrpc::Code;

use super::{Inner, NoUevents, RpcError};
use crate::device::{blk, remove_pci_device, RemoveError, Removed, UeventSource};
use crate::storage::Driver;

/// How much longer than its own deadline a removal may take before the RPC gives up on it: the
/// kernel's `remove` write itself cannot be bounded (it runs on in the background).
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// Who uses a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owner {
    Sandbox,
    Container(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Sandbox => f.write_str("the sandbox (a storage of CreateSandbox)"),
            Owner::Container(id) => write!(f, "container {id:?}"),
        }
    }
}

/// One device named by one request; `ticket` ties it to that request so that a failed request
/// drops exactly what it added.
#[derive(Debug, Clone)]
pub(super) struct DeviceUse {
    owner: Owner,
    path: PciPath,
    ticket: u64,
}

/// The PCI paths that a request's blk devices, blk storages and hot-plugged virtio-fs storages
/// name. Paths that do not parse are left out: the request fails on them anyway.
fn pci_paths<'a>(devices: &'a [agent::Device], storages: &'a [agent::Storage]) -> impl Iterator<Item = PciPath> + 'a {
    let devs = devices.iter().filter(|d| d.type_ == blk::KIND).filter_map(|d| d.id.parse().ok());
    let stores = storages.iter().filter_map(|s| match Driver::parse(&s.driver) {
        Some(Driver::Blk) => s.source.parse().ok(),
        Some(Driver::VirtioFs) => virtiofs_pci_path(&s.driver_options).ok().flatten(),
        _ => None,
    });
    devs.chain(stores)
}

impl Inner {
    /// Records that `owner` uses the devices of a request about to be handled; returns the
    /// ticket for [`Inner::release_ticket`] should the request fail.
    pub(super) fn claim_devices(&self, owner: Owner, devices: &[agent::Device], storages: &[agent::Storage]) -> u64 {
        self.claim_paths(owner, pci_paths(devices, storages))
    }

    /// [`Inner::claim_devices`] for devices named by their paths (a pod's interfaces).
    pub(super) fn claim_paths(&self, owner: Owner, paths: impl IntoIterator<Item = PciPath>) -> u64 {
        let mut st = self.state();
        st.next_ticket += 1;
        let ticket = st.next_ticket;
        let uses: Vec<DeviceUse> =
            paths.into_iter().map(|path| DeviceUse { owner: owner.clone(), path, ticket }).collect();
        st.device_uses.extend(uses);
        ticket
    }

    /// Drops the uses recorded by one (failed) request.
    pub(super) fn release_ticket(&self, ticket: u64) {
        self.state().device_uses.retain(|u| u.ticket != ticket);
    }

    /// Drops every use by `owner` (its container was removed).
    pub(super) fn release_owner(&self, owner: &Owner) {
        self.state().device_uses.retain(|u| u.owner != *owner);
    }

    /// Who uses the device at `path` or one behind it (a bridge takes its devices with it).
    fn users_of(&self, path: &PciPath) -> Vec<(Owner, PciPath)> {
        let st = self.state();
        let mut users: Vec<(Owner, PciPath)> = Vec::new();
        for u in st.device_uses.iter().filter(|u| path.contains(&u.path)) {
            if !users.iter().any(|(o, p)| *o == u.owner && *p == u.path) {
                users.push((u.owner.clone(), u.path.clone()));
            }
        }
        users
    }

    /// RemoveDevice: refuses a device in use unless `force`, then releases it in the guest.
    pub(super) async fn remove_device(&self, req: agent::RemoveDeviceRequest) -> Result<(), RpcError> {
        let path: PciPath = req.pci_path.parse().map_err(|e| RpcError::invalid("pci_path", e))?;
        let users = self.users_of(&path);
        if !users.is_empty() {
            let list: Vec<String> = users
                .iter()
                .map(|(owner, p)| if *p == path { owner.to_string() } else { format!("{owner} (as {p})") })
                .collect();
            let list = list.join(", ");
            if !req.force {
                return Err(RpcError::new(
                    Code::FAILED_PRECONDITION,
                    format!("PCI device {path} is in use by {list}: remove it first, or force"),
                ));
            }
            tracing::warn!(pci_path = %path, "PCI device removed by force while in use by {list}");
        }
        let timeout = match req.timeout_ms {
            0 => self.cfg.storage.hotplug_timeout,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let cfg = self.cfg.clone();
        let task_path = path.clone();
        let work = tokio::task::spawn_blocking(move || {
            // Opened before the write, so the remove uevent cannot be missed; without one the
            // wait polls sysfs alone.
            let mut uevents: Box<dyn UeventSource + Send> = match (cfg.uevents)() {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("no uevent socket ({e}); polling sysfs for the removal");
                    Box::new(NoUevents)
                }
            };
            remove_pci_device(&cfg.storage.sysfs_root, &task_path, &mut *uevents, timeout)
        });
        let removed = match tokio::time::timeout(timeout + WRITE_GRACE, work).await {
            Ok(joined) => joined
                .map_err(|e| RpcError::new(Code::INTERNAL, format!("device removal task failed: {e}")))?
                .map_err(remove_error)?,
            Err(_) => {
                return Err(RpcError::new(
                    Code::DEADLINE_EXCEEDED,
                    format!("PCI device {path}: the kernel did not finish removing it within {timeout:?}"),
                ))
            }
        };
        match removed {
            Removed::Released { sysfs, waited } => {
                tracing::info!(pci_path = %path, sysfs = %sysfs.display(), ?waited, "PCI device released")
            }
            Removed::Absent { .. } => {
                tracing::info!(pci_path = %path, "PCI device not in the guest: nothing to release")
            }
        }
        Ok(())
    }
}

/// The status of a failed removal: a path that leads nowhere sensible is NOT_FOUND, a device
/// that stays DEADLINE_EXCEEDED, the rest INTERNAL.
fn remove_error(e: RemoveError) -> RpcError {
    let code = match &e {
        RemoveError::Pci(_) => Code::NOT_FOUND,
        RemoveError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
        RemoveError::Write { .. } | RemoveError::Uevent(_) => Code::INTERNAL,
    };
    RpcError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::fs;
    use std::io;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, LinuxResources, Process, Spec};
    use shoji_protocol::agent_ttrpc::AgentServiceClient;
    use shoji_protocol::ttrpc;

    use super::*;
    use crate::device::UeventWait;
    use crate::listen::{self, ListenAddr};
    use crate::runtime::{ContainerConfig, ContainerRuntime, ExitStatus, Result as RtResult, RuntimeError, Stats};
    use crate::service::{Agent, ServiceConfig};
    use crate::storage::StorageContext;

    /// A runtime that only creates and removes.
    #[derive(Default)]
    struct Runtime(Mutex<HashSet<String>>);

    fn unused<T>() -> RtResult<T> {
        Err(RuntimeError::Other("not used by these tests".into()))
    }

    #[async_trait]
    impl ContainerRuntime for Runtime {
        async fn create(&self, cfg: ContainerConfig) -> RtResult<()> {
            if !self.0.lock().unwrap().insert(cfg.id.clone()) {
                return Err(RuntimeError::Exists(cfg.id));
            }
            Ok(())
        }
        async fn start(&self, _: &str) -> RtResult<()> {
            unused()
        }
        async fn exec(&self, _: &str, _: &str, _: Process) -> RtResult<()> {
            unused()
        }
        async fn signal(&self, _: &str, _: &str, _: i32, _: bool) -> RtResult<()> {
            unused()
        }
        async fn wait(&self, _: &str, _: &str) -> RtResult<ExitStatus> {
            unused()
        }
        async fn read_stdout(&self, _: &str, _: &str, _: usize) -> RtResult<Vec<u8>> {
            unused()
        }
        async fn read_stderr(&self, _: &str, _: &str, _: usize) -> RtResult<Vec<u8>> {
            unused()
        }
        async fn write_stdin(&self, _: &str, _: &str, _: &[u8]) -> RtResult<usize> {
            unused()
        }
        async fn close_stdin(&self, _: &str, _: &str) -> RtResult<()> {
            unused()
        }
        async fn resize_tty(&self, _: &str, _: &str, _: u16, _: u16) -> RtResult<()> {
            unused()
        }
        async fn stats(&self, _: &str) -> RtResult<Stats> {
            unused()
        }
        async fn update(&self, _: &str, _: LinuxResources) -> RtResult<()> {
            unused()
        }
        async fn namespace(&self, _: &str, _: &str) -> RtResult<PathBuf> {
            unused()
        }
        async fn pids(&self, _: &str) -> RtResult<Vec<i32>> {
            unused()
        }
        async fn remove(&self, id: &str, _: u32) -> RtResult<()> {
            self.0.lock().unwrap().remove(id).then_some(()).ok_or_else(|| RuntimeError::NoContainer(id.into()))
        }
        async fn next_oom_event(&self) -> String {
            std::future::pending().await
        }
    }

    /// A fake kernel: of the PCI functions in `removable`, one whose `remove` holds "1" goes.
    struct Kernel {
        removable: Vec<PathBuf>,
    }

    impl UeventSource for Kernel {
        fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
            for dir in &self.removable {
                if fs::read(dir.join("remove")).is_ok_and(|d| d == b"1") {
                    fs::remove_dir_all(dir)?;
                }
            }
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            Ok(UeventWait::Timeout)
        }
    }

    /// A PCI function with a virtio-blk disk `disk` under `sys`, and its node in `dev`.
    fn disk(sys: &Path, dev: &Path, rel: &str, disk: &str) -> PathBuf {
        let dir = sys.join(rel);
        fs::create_dir_all(dir.join("virtio1/block").join(disk)).unwrap();
        fs::write(dir.join("remove"), b"").unwrap();
        symlink("/dev/null", dev.join(disk)).unwrap();
        dir
    }

    fn spec_json(paths: &[&str]) -> Vec<u8> {
        let devices = paths
            .iter()
            .map(|p| {
                let mut d = LinuxDevice::default();
                d.set_path(p.into()).set_typ(LinuxDeviceType::C).set_major(7).set_minor(0);
                d
            })
            .collect();
        let mut spec = Spec::default();
        spec.linux_mut().as_mut().unwrap().set_devices(Some(devices));
        serde_json::to_vec(&spec).unwrap()
    }

    fn create(id: &str, pci: &str, spec_paths: &[&str]) -> agent::CreateContainerRequest {
        agent::CreateContainerRequest {
            container_id: id.into(),
            devices: vec![agent::Device {
                id: pci.into(),
                type_: blk::KIND.into(),
                container_path: "/dev/xvda".into(),
                ..Default::default()
            }],
            oci_spec_json: spec_json(spec_paths),
            ..Default::default()
        }
    }

    fn rm(pci: &str, force: bool, timeout_ms: u32) -> agent::RemoveDeviceRequest {
        agent::RemoveDeviceRequest { pci_path: pci.into(), force, timeout_ms, ..Default::default() }
    }

    fn code_and_message<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    /// Over ttrpc, as the host calls it: a device used by a container is refused (naming it),
    /// also through its bridge; force removes it; once the container is gone no force is
    /// needed; a failed create leaves no use behind; a device that stays times out.
    #[tokio::test(flavor = "current_thread")]
    async fn remove_device_refuses_devices_in_use_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, dev) = (tmp.path().join("sys"), tmp.path().join("dev"));
        fs::create_dir_all(&dev).unwrap();
        fs::create_dir_all(sys.join("devices/pci0000:00/0000:00:02.0/pci_bus/0000:01")).unwrap();
        let d05 = disk(&sys, &dev, "devices/pci0000:00/0000:00:05.0", "vdc");
        let d0203 = disk(&sys, &dev, "devices/pci0000:00/0000:00:02.0/0000:01:03.0", "vdd");
        let d06 = disk(&sys, &dev, "devices/pci0000:00/0000:00:06.0", "vde");
        let d08 = disk(&sys, &dev, "devices/pci0000:00/0000:00:08.0", "vdf"); // never goes
        let removable = vec![d05.clone(), d0203.clone(), d06.clone()];
        let cfg = ServiceConfig {
            storage: StorageContext {
                root: tmp.path().join("root"),
                sysfs_root: sys.clone(),
                dev_root: dev.clone(),
                hotplug_timeout: Duration::from_secs(5),
            },
            proc_root: PathBuf::from("/proc"),
            guest_wide: false,
            uevents: Arc::new(move || Ok(Box::new(Kernel { removable: removable.clone() }))),
        };
        let agent = Arc::new(Agent::new(Arc::new(Runtime::default()), cfg));
        let addr = ListenAddr::Unix(tmp.path().join("agent.sock"));
        let mut server = listen::serve(&addr, agent).await.unwrap();
        let client = AgentServiceClient::new(ttrpc::asynchronous::Client::connect(&addr.to_string()).await.unwrap());
        let ctx = || ttrpc::context::with_timeout(20_000_000_000);

        client.create_container(ctx(), &create("c1", "05", &["/dev/xvda"])).await.unwrap();
        client.create_container(ctx(), &create("c2", "02/03", &["/dev/xvda"])).await.unwrap();

        let (code, msg) = code_and_message(client.remove_device(ctx(), &rm("05", false, 0)).await);
        assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
        assert!(msg.contains("container \"c1\"") && msg.contains("05"), "{msg}");
        assert_eq!(fs::read(d05.join("remove")).unwrap(), b"", "nothing was asked of the kernel");
        // The bridge takes c2's device with it.
        let (code, msg) = code_and_message(client.remove_device(ctx(), &rm("02", false, 0)).await);
        assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
        assert!(msg.contains("container \"c2\" (as 02/03)"), "{msg}");
        // Another function of a used slot is not in use (and absent here: nothing to do).
        client.remove_device(ctx(), &rm("05.1", false, 0)).await.unwrap();

        client.remove_device(ctx(), &rm("02/03", true, 0)).await.unwrap();
        assert!(!d0203.exists(), "forced removal");

        client
            .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() })
            .await
            .unwrap();
        client.remove_device(ctx(), &rm("05", false, 0)).await.unwrap();
        assert!(!d05.exists());

        // A create that fails (its spec lacks /dev/xvda) leaves no use of 06 behind.
        let (code, msg) = code_and_message(client.create_container(ctx(), &create("c3", "06", &["/dev/other"])).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
        client.remove_device(ctx(), &rm("06", false, 0)).await.unwrap();
        assert!(!d06.exists());

        let (code, msg) = code_and_message(client.remove_device(ctx(), &rm("08", false, 100)).await);
        assert_eq!(code, Code::DEADLINE_EXCEEDED, "{msg}");
        assert!(msg.contains("0000:00:08.0"), "{msg}");
        assert!(d08.exists());

        let (code, msg) = code_and_message(client.remove_device(ctx(), &rm("zz", false, 0)).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.starts_with("pci_path: "), "{msg}");

        server.shutdown().await.unwrap();
    }
}
