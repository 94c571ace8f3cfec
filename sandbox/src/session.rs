//! The agent session: what every front end (`shoji run`, the detached sandboxes and `shoji
//! exec`, the containerd shim) asks of the guest agent, written once. A [`Session`] creates,
//! execs into and removes containers; each started program is a [`Process`] with its streams,
//! wait, signal and resize. Failures are one [`SandboxError`], which carries Docker's exit
//! status when a program could not start.
use crate::error::{rpc_error, SandboxError};
use crate::vm::Sandbox;
use shoji_protocol::agent;
use shoji_protocol::agent_ttrpc::AgentServiceClient;
use shoji_protocol::ttrpc;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

pub use shoji_protocol::agent::{Device, StatsContainerResponse, Storage, UpdateNetworkRequest};

/// How long the agent may take to answer after the VM starts (a PVM host boots in ~20 s, more
/// when loaded).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// The limit of every set-up and tear-down RPC (the calls that wait on a process have none).
/// Creating a container on a PVM host pays ~2.5 ms per page fault: minutes are not unheard of.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How much longer than the guest's wait a RemoveDevice may take (the RPC itself, the kernel's
/// remove write).
const REMOVE_DEVICE_MARGIN: Duration = Duration::from_secs(5);
/// How much one read of a process's output asks for.
const READ_CHUNK: u32 = 64 * 1024;

/// A ttrpc context with a time limit (zero: none, for the calls that wait on a process).
fn ctx(limit: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(limit.as_nanos().min(i64::MAX as u128) as i64)
}

/// The agent storage that mounts virtio-fs share `tag` at `mount_point` in the guest.
pub fn virtiofs_storage(tag: &str, mount_point: &str, read_only: bool) -> Storage {
    Storage {
        driver: "virtio-fs".into(),
        source: tag.into(),
        fstype: "virtiofs".into(),
        options: vec![if read_only { "ro" } else { "rw" }.into()],
        mount_point: mount_point.into(),
        ..Default::default()
    }
}

/// [`virtiofs_storage`] for a share hot-plugged at `pci` ([`crate::Hotplug::plug_share`]): the
/// agent rescans the bus for it before mounting, and refuses to release it while mounted.
pub fn hotplugged_virtiofs_storage(tag: &str, pci: &shoji_vmm::PciPath, mount_point: &str, read_only: bool) -> Storage {
    let mut s = virtiofs_storage(tag, mount_point, read_only);
    s.driver_options = vec![format!("{}{pci}", shoji_devices::model::VIRTIOFS_PCI_OPTION)];
    s
}

/// A container to create: its OCI spec (JSON) and what the agent prepares for it first.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub id: String,
    /// The OCI runtime spec, as JSON.
    pub spec_json: Vec<u8>,
    /// The container root in the guest.
    pub rootfs: String,
    /// Mounted by the agent before the container is created.
    pub storages: Vec<Storage>,
    /// Guest devices to find by PCI path and rewrite into the spec.
    pub devices: Vec<Device>,
    pub terminal: bool,
}

/// One agent connection and the sandbox it manages in the guest.
#[derive(Clone)]
pub struct Session {
    client: AgentServiceClient,
}

/// A sandbox-wide setting of [`Session::create`].
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    /// The id the guest logs the sandbox under.
    pub sandbox_id: String,
    pub hostname: String,
    /// Storages shared by every container (mounted once, by CreateSandbox).
    pub storages: Vec<Storage>,
}

/// Randomness for the guest's CRNG (a VM restored from a template shares its template's).
fn host_entropy() -> Result<Vec<u8>, SandboxError> {
    use std::io::Read;
    let mut b = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| SandboxError::Io(format!("/dev/urandom: {e}")))?;
    Ok(b)
}

impl Session {
    /// Waits for the agent of `vm` (up to [`AGENT_TIMEOUT`]) and sets the sandbox up in the guest.
    pub async fn create(vm: &Sandbox, cfg: SessionConfig) -> Result<Session, SandboxError> {
        let client = vm.agent(AGENT_TIMEOUT).await?;
        let session = Session { client };
        let req = agent::CreateSandboxRequest {
            hostname: cfg.hostname,
            sandbox_id: cfg.sandbox_id,
            storages: cfg.storages,
            entropy: host_entropy()?,
            realtime_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            ..Default::default()
        };
        tokio::select! {
            r = session.client.create_sandbox(ctx(RPC_TIMEOUT), &req) => r.map_err(|e| rpc_error("CreateSandbox", e))?,
            why = vm.stopped() => return Err(SandboxError::Stopped(why)),
        };
        Ok(session)
    }

    /// Joins the running sandbox whose VM serves `vsock_socket` (another process's: `shoji
    /// exec`), without setting anything up.
    pub async fn attach(vsock_socket: &Path, timeout: Duration) -> Result<Session, SandboxError> {
        let port = shoji_devices::model::AGENT_VSOCK_PORT;
        let conn = shoji_protocol::client::connect(vsock_socket, port, timeout)
            .await
            .map_err(|e| SandboxError::Agent(e.to_string()))?;
        Ok(Session { client: AgentServiceClient::new(conn) })
    }

    /// Creates a container; its init process is the returned [`Process`], which runs once
    /// [`Process::start`] is called. Its output can be read from now on.
    pub async fn create_container(&self, c: ContainerSpec) -> Result<Process, SandboxError> {
        let req = agent::CreateContainerRequest {
            container_id: c.id.clone(),
            storages: c.storages,
            devices: c.devices,
            oci_spec_json: c.spec_json,
            rootfs: c.rootfs,
            terminal: c.terminal,
            ..Default::default()
        };
        self.client.create_container(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("CreateContainer", e))?;
        Ok(self.process(&c.id, ""))
    }

    /// Starts another process (an OCI Process object as JSON) in a running container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<Process, SandboxError> {
        let req = agent::ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process_json,
            ..Default::default()
        };
        self.client.exec_process(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("ExecProcess", e))?;
        Ok(self.process(container_id, exec_id))
    }

    /// The handle of a process that exists in the guest (the container's init: `exec_id` "").
    pub fn process(&self, container_id: &str, exec_id: &str) -> Process {
        Process { client: self.client.clone(), container_id: container_id.into(), exec_id: exec_id.into() }
    }

    /// Kills what is left of the container and removes it in the guest.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError> {
        let req = agent::RemoveContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.client.remove_container(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("RemoveContainer", e))?;
        Ok(())
    }

    /// Asks the guest to release the PCI device at `pci_path` (hot-remove, before the VMM drops
    /// it), waiting up to `timeout` for it to go (zero: the agent's hot-plug timeout). Refused
    /// with [`crate::error::RpcCode::FailedPrecondition`], naming the container, while a
    /// container uses the device, unless `force`. A device the guest does not have is no error.
    pub async fn remove_device(
        &self,
        pci_path: &shoji_devices::model::PciPath,
        timeout: Duration,
        force: bool,
    ) -> Result<(), SandboxError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let req =
            agent::RemoveDeviceRequest { pci_path: pci_path.to_string(), timeout_ms, force, ..Default::default() };
        // The agent's own wait ends first, so its answer says why.
        let limit = if timeout.is_zero() { RPC_TIMEOUT } else { timeout + REMOVE_DEVICE_MARGIN };
        self.client.remove_device(ctx(limit), &req).await.map_err(|e| rpc_error("RemoveDevice", e))?;
        Ok(())
    }

    /// Sets a pod's interfaces up in the guest ([`crate::PodInterface::update_request`]); the
    /// agent waits for a hot-plugged device as it does for a disk.
    pub async fn update_network(&self, req: agent::UpdateNetworkRequest) -> Result<(), SandboxError> {
        self.client.update_network(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("UpdateNetwork", e))?;
        Ok(())
    }

    /// Applies new resources (an OCI LinuxResources object as JSON).
    pub async fn update_container(&self, container_id: &str, resources_json: Vec<u8>) -> Result<(), SandboxError> {
        let req =
            agent::UpdateContainerRequest { container_id: container_id.into(), resources_json, ..Default::default() };
        self.client.update_container(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("UpdateContainer", e))?;
        Ok(())
    }

    /// The container's cgroup statistics.
    pub async fn stats(&self, container_id: &str) -> Result<StatsContainerResponse, SandboxError> {
        let req = agent::StatsContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.client.stats_container(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("StatsContainer", e))
    }

    /// The guest pids of the container's processes.
    pub async fn pids(&self, container_id: &str) -> Result<Vec<i32>, SandboxError> {
        let req = agent::ListProcessesRequest { container_id: container_id.into(), ..Default::default() };
        let r = self.client.list_processes(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("ListProcesses", e))?;
        Ok(r.pids)
    }

    /// Tears the sandbox down in the guest (every container killed, storages unmounted);
    /// bounded by `limit`, since the VM is usually stopped right after.
    pub async fn destroy(&self, limit: Duration) -> Result<(), SandboxError> {
        let req = agent::DestroySandboxRequest::new();
        match tokio::time::timeout(limit, self.client.destroy_sandbox(ctx(limit), &req)).await {
            Ok(r) => r.map(drop).map_err(|e| rpc_error("DestroySandbox", e)),
            Err(_) => Err(SandboxError::Agent(format!("DestroySandbox: no answer in {limit:?}"))),
        }
    }
}

/// How a process ended, as a shell's `$?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + N when killed by signal N.
    pub status: i32,
    pub oom_killed: bool,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A process in the guest: a container's init (`exec_id` "") or an exec'd one.
#[derive(Clone)]
pub struct Process {
    client: AgentServiceClient,
    container_id: String,
    exec_id: String,
}

impl Process {
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Lets a container's init exec the user program (exec'd processes run at once).
    pub async fn start(&self) -> Result<(), SandboxError> {
        if !self.exec_id.is_empty() {
            return Ok(());
        }
        let req = agent::StartContainerRequest { container_id: self.container_id.clone(), ..Default::default() };
        self.client.start_container(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("StartContainer", e))?;
        Ok(())
    }

    /// The next chunk of a stream; empty at its end.
    pub async fn read(&self, stream: Stream) -> Result<Vec<u8>, SandboxError> {
        let req = agent::ReadStreamRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            len: READ_CHUNK,
            ..Default::default()
        };
        let r = match stream {
            Stream::Stdout => self.client.read_stdout(ctx(Duration::ZERO), &req).await,
            Stream::Stderr => self.client.read_stderr(ctx(Duration::ZERO), &req).await,
        };
        let what = if stream == Stream::Stdout { "ReadStdout" } else { "ReadStderr" };
        Ok(r.map_err(|e| rpc_error(what, e))?.data)
    }

    /// Copies a stream to `w` until its end. What cannot be written (`w` closed) is read and
    /// dropped, so the program never blocks on its output.
    pub async fn copy_output(&self, stream: Stream, mut w: impl Write) -> Result<(), SandboxError> {
        let mut broken = false;
        loop {
            let data = self.read(stream).await?;
            if data.is_empty() {
                return Ok(());
            }
            if broken {
                continue;
            }
            if let Err(e) = w.write_all(&data).and_then(|()| w.flush()) {
                tracing::debug!("writing the output of {}: {e}", self.name());
                broken = true;
            }
        }
    }

    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<(), SandboxError> {
        let req = agent::WriteStreamRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            data,
            ..Default::default()
        };
        self.client.write_stdin(ctx(Duration::ZERO), &req).await.map_err(|e| rpc_error("WriteStdin", e))?;
        Ok(())
    }

    /// The program reads end of file once what was written is read.
    pub async fn close_stdin(&self) -> Result<(), SandboxError> {
        let req = agent::CloseStdinRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        self.client.close_stdin(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("CloseStdin", e))?;
        Ok(())
    }

    /// Waits (without limit) for the process to end.
    pub async fn wait(&self) -> Result<ExitStatus, SandboxError> {
        let req = agent::WaitProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        let r = self.client.wait_process(ctx(Duration::ZERO), &req).await.map_err(|e| rpc_error("WaitProcess", e))?;
        Ok(ExitStatus { status: r.status, oom_killed: r.oom_killed })
    }

    /// Sends `signal` to the process (`all`: to every process of its container).
    pub async fn signal(&self, signal: u32, all: bool) -> Result<(), SandboxError> {
        let req = agent::SignalProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.client.signal_process(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("SignalProcess", e))?;
        Ok(())
    }

    /// Resizes the process's terminal.
    pub async fn resize(&self, row: u32, column: u32) -> Result<(), SandboxError> {
        let req = agent::TtyWinResizeRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            row,
            column,
            ..Default::default()
        };
        self.client.tty_win_resize(ctx(RPC_TIMEOUT), &req).await.map_err(|e| rpc_error("TtyWinResize", e))?;
        Ok(())
    }

    fn name(&self) -> String {
        if self.exec_id.is_empty() {
            format!("container {}", self.container_id)
        } else {
            format!("container {} exec {}", self.container_id, self.exec_id)
        }
    }
}
