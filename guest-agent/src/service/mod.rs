//! The agent's RPC service: `AgentService` and `Health` from shoji-protocol, mapped onto a
//! [`ContainerRuntime`], the storage handlers and the device handlers (RemoveDevice and who
//! uses which device: [`hotplug`]).
//!
//! Every request is checked before anything is done, every failure becomes a ttrpc status with a
//! one-line message (see [`error`]), and nothing a client sends can stop the agent from serving
//! the next request.

mod container;
pub mod convert;
pub mod error;
pub mod guest;
mod hotplug;
mod network;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use shoji_protocol::agent::{self, health_check_response::ServingStatus};
use shoji_protocol::agent_ttrpc::{self, create_agent_service, create_health};
use shoji_protocol::ttrpc::{self, asynchronous::TtrpcContext, Code};

pub use error::RpcError;
pub use guest::AGENT_VERSION;

use crate::device::{NetlinkUevents, UeventSource, UeventWait};
use crate::runtime::ContainerRuntime;
use crate::storage::{MountedStorage, StorageContext};

/// Opens a uevent source; called once per request that needs devices, before any is looked up.
pub type UeventOpener = Arc<dyn Fn() -> io::Result<Box<dyn UeventSource + Send>> + Send + Sync>;

/// Where the service looks and what it may change.
#[derive(Clone)]
pub struct ServiceConfig {
    /// Root, sysfs, /dev and the hot-plug timeout for storages and devices.
    pub storage: StorageContext,
    /// Where procfs is mounted: "/proc".
    pub proc_root: PathBuf,
    /// Whether CreateSandbox may change guest-wide state: the hostname, the clock and the
    /// kernel's entropy pool (not in tests on a host).
    pub guest_wide: bool,
    pub uevents: UeventOpener,
}

impl ServiceConfig {
    /// The real guest: "/", "/sys", "/dev", "/proc", netlink uevents, hostname set.
    pub fn guest() -> Self {
        ServiceConfig {
            storage: StorageContext::guest(),
            proc_root: PathBuf::from("/proc"),
            guest_wide: true,
            uevents: Arc::new(|| Ok(Box::new(NetlinkUevents::open()?))),
        }
    }
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("storage", &self.storage)
            .field("proc_root", &self.proc_root)
            .field("guest_wide", &self.guest_wide)
            .finish_non_exhaustive()
    }
}

/// A uevent source that never has an event, for requests that look up no hot-plugged device.
struct NoUevents;

impl UeventSource for NoUevents {
    fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
        std::thread::sleep(timeout);
        Ok(UeventWait::Timeout)
    }
}

/// What the service itself keeps: the storages it mounted, per container and for the sandbox,
/// and which of them uses which PCI device.
#[derive(Default)]
struct State {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Container>,
    device_uses: Vec<hotplug::DeviceUse>,
    next_ticket: u64,
}

struct Sandbox {
    id: String,
    storages: Vec<MountedStorage>,
}

enum Container {
    /// CreateContainer is under way; a second one for the same id is refused.
    Creating,
    Created {
        storages: Vec<MountedStorage>,
    },
}

/// The `AgentService` implementation.
pub struct Agent {
    inner: Arc<Inner>,
}

/// What the service works on, shared with the tasks it detaches (see [`Agent::detached`]).
struct Inner {
    runtime: Arc<dyn ContainerRuntime>,
    cfg: ServiceConfig,
    state: Mutex<State>,
}

/// The `Health` implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentHealth;

/// Both services, ready for `ttrpc::asynchronous::Server::register_service`.
pub fn ttrpc_services(agent: Arc<Agent>) -> HashMap<String, ttrpc::asynchronous::Service> {
    let mut services = create_agent_service(agent);
    services.extend(create_health(Arc::new(AgentHealth)));
    services
}

impl Agent {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, cfg: ServiceConfig) -> Self {
        Agent { inner: Arc::new(Inner { runtime, cfg, state: Mutex::new(State::default()) }) }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.inner.cfg
    }

    /// Removes every container the agent created (at once, no grace period) and unmounts every
    /// storage, the sandbox's included. Used by DestroySandbox and on shutdown; tries everything
    /// and returns the first error.
    pub async fn destroy_all(&self) -> Result<(), RpcError> {
        self.detached(|inner| async move { inner.destroy_all().await }).await
    }

    /// Runs `f` as a task of its own. ttrpc drops a handler when the client's deadline passes;
    /// work that mounts, creates or removes must not stop half-way then, or the agent's state and
    /// the guest's would part. A detached task runs to the end and keeps them together.
    async fn detached<T, F, Fut>(&self, f: F) -> Result<T, RpcError>
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RpcError>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(f(self.inner.clone()))
            .await
            .map_err(|e| RpcError::new(Code::INTERNAL, format!("request task failed: {e}")))?
    }
}

impl Inner {
    /// The state, even if a thread panicked while holding it (it holds only plain data).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn destroy_all(&self) -> Result<(), RpcError> {
        let ids: Vec<String> = self.state().containers.keys().cloned().collect();
        let mut first = None;
        for id in ids {
            match self.remove_container(&id, 0).await {
                Ok(()) => self.release_owner(&hotplug::Owner::Container(id)),
                Err(e) => {
                    tracing::warn!("destroying the sandbox: {e}");
                    first.get_or_insert(e);
                }
            }
        }
        let sandbox = self.state().sandbox.take();
        if let Some(sb) = sandbox {
            match unmount_blocking(sb.storages).await {
                Ok(()) => self.release_owner(&hotplug::Owner::Sandbox),
                Err(e) => {
                    let e = e.context(format!("sandbox {:?}", sb.id));
                    tracing::warn!("{e}");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Unmounts storages on the blocking pool (unmounting may sync a filesystem).
async fn unmount_blocking(storages: Vec<MountedStorage>) -> Result<(), RpcError> {
    if storages.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || crate::storage::unmount_storages(storages))
        .await
        .map_err(|e| RpcError::new(Code::INTERNAL, format!("unmount task failed: {e}")))?
        .map_err(RpcError::from)
}

/// Logs a failed RPC (quietly: a client error is not the agent's) and hands it to ttrpc.
fn reply<T>(rpc: &str, r: Result<T, RpcError>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::info!(rpc, code = ?e.code, "{e}");
        e.into()
    })
}

/// Checks a container id and an exec id.
fn ids(container_id: &str, exec_id: &str) -> Result<(), RpcError> {
    convert::check_container_id(container_id)?;
    convert::check_exec_id(exec_id)
}

#[async_trait]
impl agent_ttrpc::AgentService for Agent {
    async fn create_sandbox(&self, _: &TtrpcContext, req: agent::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            let ticket = inner.claim_devices(hotplug::Owner::Sandbox, &[], &req.storages);
            let r = inner.create_sandbox(req).await;
            if r.is_err() {
                inner.release_ticket(ticket);
            }
            r
        });
        reply("CreateSandbox", r.await.map(|()| Empty::new()))
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: agent::DestroySandboxRequest) -> ttrpc::Result<Empty> {
        reply("DestroySandbox", self.destroy_all().await.map(|()| Empty::new()))
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: agent::GuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        let cfg = &self.inner.cfg;
        Ok(guest::guest_details(&cfg.proc_root, &cfg.storage.sysfs_root))
    }

    async fn create_container(&self, _: &TtrpcContext, req: agent::CreateContainerRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            // Claimed before the devices are looked up: a RemoveDevice meanwhile is refused.
            let owner = hotplug::Owner::Container(req.container_id.clone());
            let ticket = inner.claim_devices(owner, &req.devices, &req.storages);
            let r = inner.create_container(req).await;
            if r.is_err() {
                inner.release_ticket(ticket);
            }
            r
        });
        reply("CreateContainer", r.await.map(|()| Empty::new()))
    }

    async fn start_container(&self, _: &TtrpcContext, req: agent::StartContainerRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            ids(&req.container_id, "")?;
            inner.runtime.start(&req.container_id).await.map_err(|e| RpcError::runtime(&req.container_id, e))
        });
        reply("StartContainer", r.await.map(|()| Empty::new()))
    }

    async fn remove_container(&self, _: &TtrpcContext, req: agent::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            ids(&req.container_id, "")?;
            inner.remove_container(&req.container_id, req.timeout_secs).await?;
            inner.release_owner(&hotplug::Owner::Container(req.container_id));
            Ok(())
        });
        reply("RemoveContainer", r.await.map(|()| Empty::new()))
    }

    async fn remove_device(&self, _: &TtrpcContext, req: agent::RemoveDeviceRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move { inner.remove_device(req).await });
        reply("RemoveDevice", r.await.map(|()| Empty::new()))
    }

    async fn update_network(&self, _: &TtrpcContext, req: agent::UpdateNetworkRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move { inner.update_network(req).await });
        reply("UpdateNetwork", r.await.map(|()| Empty::new()))
    }

    async fn exec_process(&self, _: &TtrpcContext, req: agent::ExecProcessRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            ids(&req.container_id, &req.exec_id)?;
            if req.exec_id.is_empty() || req.exec_id == req.container_id {
                return Err(RpcError::invalid("exec_id", "must name a new process (not empty, not the container id)"));
            }
            let process = convert::parse_process(&req.process_json)
                .map_err(|e| e.context(format!("exec {:?} in container {:?}", req.exec_id, req.container_id)))?;
            inner
                .runtime
                .exec(&req.container_id, &req.exec_id, process)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))
        });
        reply("ExecProcess", r.await.map(|()| Empty::new()))
    }

    async fn signal_process(&self, _: &TtrpcContext, req: agent::SignalProcessRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            ids(&req.container_id, &req.exec_id)?;
            let sig = convert::signal(req.signal)?;
            inner
                .runtime
                .signal(&req.container_id, &req.exec_id, sig, req.all)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))
        });
        reply("SignalProcess", r.await.map(|()| Empty::new()))
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let r = async {
            ids(&req.container_id, &req.exec_id)?;
            let status = self
                .inner
                .runtime
                .wait(&req.container_id, &req.exec_id)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))?;
            Ok(convert::wait_response(status))
        };
        reply("WaitProcess", r.await)
    }

    async fn update_container(&self, _: &TtrpcContext, req: agent::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        let r = self.detached(|inner| async move {
            ids(&req.container_id, "")?;
            let resources = convert::parse_resources(&req.resources_json)
                .map_err(|e| e.context(format!("container {:?}", req.container_id)))?;
            inner
                .runtime
                .update(&req.container_id, resources)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))
        });
        reply("UpdateContainer", r.await.map(|()| Empty::new()))
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        let r = async {
            ids(&req.container_id, "")?;
            let s = self
                .inner
                .runtime
                .stats(&req.container_id)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))?;
            Ok(agent::StatsContainerResponse {
                memory_usage_bytes: s.memory_usage_bytes,
                memory_limit_bytes: s.memory_limit_bytes,
                cpu_usage_usec: s.cpu_usage_usec,
                pids_current: s.pids_current,
                pids_limit: s.pids_limit,
                oom_kills: s.oom_kills,
                ..Default::default()
            })
        };
        reply("StatsContainer", r.await)
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: agent::ListProcessesRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        let r = async {
            ids(&req.container_id, "")?;
            let pids = self
                .inner
                .runtime
                .pids(&req.container_id)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))?;
            Ok(agent::ListProcessesResponse { pids, ..Default::default() })
        };
        reply("ListProcesses", r.await)
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: agent::GetOOMEventRequest) -> ttrpc::Result<agent::OOMEvent> {
        let container_id = self.inner.runtime.next_oom_event().await;
        Ok(agent::OOMEvent { container_id, ..Default::default() })
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: agent::WriteStreamRequest,
    ) -> ttrpc::Result<agent::WriteStreamResponse> {
        let r = async {
            ids(&req.container_id, &req.exec_id)?;
            let n = self
                .inner
                .runtime
                .write_stdin(&req.container_id, &req.exec_id, &req.data)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))?;
            let len = u32::try_from(n.min(req.data.len())).unwrap_or(u32::MAX);
            Ok(agent::WriteStreamResponse { len, ..Default::default() })
        };
        reply("WriteStdin", r.await)
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        reply("ReadStdout", self.read_stream(req, Stream::Stdout).await)
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        reply("ReadStderr", self.read_stream(req, Stream::Stderr).await)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: agent::CloseStdinRequest) -> ttrpc::Result<Empty> {
        let r = async {
            ids(&req.container_id, &req.exec_id)?;
            self.inner
                .runtime
                .close_stdin(&req.container_id, &req.exec_id)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))
        };
        reply("CloseStdin", r.await.map(|()| Empty::new()))
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: agent::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let r = async {
            ids(&req.container_id, &req.exec_id)?;
            let rows = convert::tty_dimension("row", req.row)?;
            let cols = convert::tty_dimension("column", req.column)?;
            self.inner
                .runtime
                .resize_tty(&req.container_id, &req.exec_id, rows, cols)
                .await
                .map_err(|e| RpcError::runtime(&req.container_id, e))
        };
        reply("TtyWinResize", r.await.map(|()| Empty::new()))
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Agent {
    /// ReadStdout/ReadStderr: at most [`convert::MAX_READ_LEN`]; empty data is end of stream,
    /// exactly as the runtime says it.
    async fn read_stream(
        &self,
        req: agent::ReadStreamRequest,
        stream: Stream,
    ) -> Result<agent::ReadStreamResponse, RpcError> {
        ids(&req.container_id, &req.exec_id)?;
        let max = convert::read_len(req.len);
        let r = match stream {
            Stream::Stdout => self.inner.runtime.read_stdout(&req.container_id, &req.exec_id, max).await,
            Stream::Stderr => self.inner.runtime.read_stderr(&req.container_id, &req.exec_id, max).await,
        };
        let mut data = r.map_err(|e| RpcError::runtime(&req.container_id, e))?;
        if data.len() > max {
            tracing::warn!(container = %req.container_id, "runtime returned {} bytes for a read of {max}", data.len());
            data.truncate(max);
        }
        Ok(agent::ReadStreamResponse { data, ..Default::default() })
    }
}

#[async_trait]
impl agent_ttrpc::Health for AgentHealth {
    async fn check(&self, _: &TtrpcContext, _: agent::CheckRequest) -> ttrpc::Result<agent::HealthCheckResponse> {
        Ok(agent::HealthCheckResponse { status: ServingStatus::SERVING.into(), ..Default::default() })
    }

    async fn version(&self, _: &TtrpcContext, _: agent::CheckRequest) -> ttrpc::Result<agent::VersionCheckResponse> {
        Ok(agent::VersionCheckResponse {
            agent_version: AGENT_VERSION.to_owned(),
            api_version: shoji_protocol::API_VERSION,
            ..Default::default()
        })
    }
}
