//! The task service: containerd's task API v2 mapped onto the sandbox's agent.
//!
//! One sandbox VM per shim, booted by the first Create; every container of the shim shares it.
//! Each container's rootfs (the snapshot mounted at `<bundle>/rootfs`) and the host files its
//! spec binds are bind-mounted into the sandbox's shared directory, which the guest sees through
//! one virtio-fs share, read-only but for those binds (see [`mount::Share`]). The VM stops when
//! the last container is deleted.
use crate::config::{options_config_path, ShimConfig};
use crate::devices::{self, HostNode};
use crate::events::Events;
use crate::mount::{self, MountSpec};
use crate::namespaces;
use crate::sizing;
use crate::stdio::{self, Target};
use crate::volumes;
use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code, TtrpcContext};
use containerd_shim::ExitSignal;
use shoji_sandbox::{
    ContainerSpec, Device, DiskConfig, Hotplug, NetConfig, NetHost, PciPath, PodNetwork, RpcCode, Sandbox,
    SandboxConfig, SandboxError, Session, SessionConfig, ShareConfig, Storage, Unplugged, UpdateNetworkRequest,
    EXIT_NOT_EXECUTABLE, RELEASE_TIMEOUT,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The virtio-fs tag of the sandbox's shared directory and where the guest mounts it.
use shoji_devices::model::SANDBOX_SHARED_TAG as SHARED_TAG;
/// Where the agent mounts the sandbox's share (`model::guest_share_dir(SHARED_TAG)`, checked by a test).
const GUEST_SHARED: &str = "/run/shoji/shared";
/// The exit status of a process whose sandbox VM stopped under it.
pub const EXIT_SANDBOX_GONE: u32 = 255;

type RpcResult<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// Locks, tolerating poison: a panicked handler must not wedge every later RPC.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Stopped,
}

struct Process {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// Exec processes: the OCI Process JSON from containerd.
    spec: Vec<u8>,
    state: State,
    exit: Option<(u32, Timestamp)>,
    /// From Create/Exec on; Start gives the copier a clone.
    stdin_pipe: Option<stdio::StdinPipe>,
}

impl Process {
    fn new(stdin: String, stdout: String, stderr: String, terminal: bool, spec: Vec<u8>) -> RpcResult<Process> {
        let stdin_pipe =
            stdio::open_stdin(&stdin).map_err(|e| status(Code::INVALID_ARGUMENT, format!("stdin: {stdin}: {e}")))?;
        Ok(Process { stdin, stdout, stderr, terminal, spec, state: State::Created, exit: None, stdin_pipe })
    }

    fn exit_status(&self) -> (u32, MessageField<Timestamp>) {
        match &self.exit {
            Some((s, t)) => (*s, MessageField::some(t.clone())),
            None => (0, MessageField::none()),
        }
    }
}

struct Container {
    bundle: String,
    /// `<bundle>/rootfs` is ours to unmount.
    rootfs_mounted: bool,
    /// Its spec's block devices and volumes, hot-plugged at Create; unplugged at Delete.
    devices: Vec<Plugged>,
    procs: HashMap<String, Process>,
}

/// The shim's one sandbox.
struct Vm {
    sandbox: Sandbox,
    session: Session,
    hotplug: Hotplug,
}

/// A host block device or volume plugged into the sandbox for a container.
#[derive(Debug, Clone)]
struct Plugged {
    pci: PciPath,
    container_path: String,
}

pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    rt: tokio::runtime::Runtime,
    /// Read when the sandbox boots (runtime options of the first Create may name another file).
    config: Mutex<ShimConfig>,
    /// `/run/shoji/s/<hash>` (0700): vsock socket, console log, staging/ and its read-only view
    /// shared/ (see [`mount::Share`]).
    dir: PathBuf,
    /// The sandbox this shim serves: the CRI pod sandbox id (its sandbox container's id), else
    /// the first container's id.
    sandbox_id: String,
    events: Events,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Container>>,
    exited: Condvar,
    /// Held while the VM boots (Create), so the state lock is not.
    vm: Mutex<Option<Arc<Vm>>>,
    /// The VM's vCPUs are paused (Pause): its tasks read PAUSED and cannot be reached.
    paused: AtomicBool,
    /// The CRI pod's network namespace wired to the VM's virtio-net tap (podnet in the sandbox
    /// crate); taken down with the VM.
    podnet: Mutex<Option<PodNetwork>>,
}

impl Service {
    pub fn new(config: ShimConfig, dir: PathBuf, sandbox_id: String, events: Events, exit: Arc<ExitSignal>) -> Service {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shim-rt")
            .enable_all()
            .build()
            .unwrap_or_else(|e| {
                tracing::error!("tokio runtime: {e}");
                std::process::exit(1)
            });
        Service {
            inner: Arc::new(Inner {
                rt,
                config: Mutex::new(config),
                dir,
                sandbox_id,
                events,
                exit,
                containers: Mutex::new(HashMap::new()),
                exited: Condvar::new(),
                vm: Mutex::new(None),
                paused: AtomicBool::new(false),
                podnet: Mutex::new(None),
            }),
        }
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn pid() -> u32 {
    std::process::id()
}

impl Inner {
    fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The sandbox, booted on first use, sized by the config and the pod's limits in the first
    /// container's `spec` (sizing.rs).
    fn vm(&self, spec: &serde_json::Value) -> RpcResult<Arc<Vm>> {
        let mut slot = lock(&self.vm);
        if let Some(vm) = &*slot {
            if let Some(why) = vm.sandbox.has_stopped() {
                return Err(status(Code::UNAVAILABLE, format!("sandbox: {why}")));
            }
            return Ok(vm.clone());
        }
        let config = lock(&self.config).clone();
        let (host_cpus, host_mib) = sizing::host_limits();
        let (vcpus, memory_mib) = sizing::vm_size(spec, config.vcpus, config.memory_mib, host_cpus, host_mib)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let shared = self.shared_dir();
        mount::Share::open(&self.dir)
            .map_err(|e| status(Code::INTERNAL, format!("sandbox: preparing {}: {e}", shared.display())))?;
        let mut cfg = SandboxConfig::new(self.dir.clone());
        cfg.vcpus = vcpus;
        cfg.memory_mib = memory_mib;
        cfg.kernel = config.kernel.clone();
        cfg.initrd = config.initrd.clone();
        cfg.shares = vec![ShareConfig { dir: shared, tag: SHARED_TAG.into(), read_only: false }];
        tracing::info!("sandbox: starting ({} vCPU, {} MiB) in {}", cfg.vcpus, cfg.memory_mib, self.dir.display());
        let started = std::time::Instant::now();
        // From the VM template of this size (built by the first sandbox of the size).
        let sandbox =
            self.rt.block_on(Sandbox::launch(&cfg)).map_err(|e| status(Code::INTERNAL, format!("sandbox: {e}")))?;
        let session_cfg = SessionConfig {
            hostname: "shoji".into(),
            sandbox_id: self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            storages: vec![sandbox.placement().share_storage(SHARED_TAG, GUEST_SHARED, false)],
        };
        let session = match self.rt.block_on(Session::create(&sandbox, session_cfg)) {
            Ok(s) => s,
            Err(e) => {
                let tail = sandbox.console_tail(20);
                let _ = sandbox.stop();
                return Err(status(Code::UNAVAILABLE, format!("sandbox: {e}; guest console:\n{tail}")));
            }
        };
        tracing::info!("sandbox: agent ready after {:.1} s", started.elapsed().as_secs_f64());
        let vm = Arc::new(Vm { sandbox, session, hotplug: Hotplug::new() });
        *slot = Some(vm.clone());
        Ok(vm)
    }

    /// Stops the sandbox VM (when no container is left).
    fn stop_vm(&self) {
        let Some(vm) = lock(&self.vm).take() else { return };
        if let Err(e) = self.rt.block_on(vm.session.destroy(Duration::from_secs(10))) {
            tracing::debug!("{e}");
        }
        if lock(&self.config).debug_console {
            tracing::info!("sandbox: guest console:\n{}", vm.sandbox.console_tail(200));
        }
        match Arc::try_unwrap(vm) {
            Ok(vm) => {
                if let Err(e) = vm.sandbox.stop() {
                    tracing::warn!("sandbox: {e}");
                }
            }
            // A copier thread still holds it: dropping the last reference stops the VM.
            Err(_) => tracing::debug!("sandbox: stopping when the last stream copier ends"),
        }
        if let Some(net) = lock(&self.podnet).take() {
            net.detach();
        }
        tracing::info!("sandbox: stopped");
    }

    /// Pauses or resumes the sandbox VM (for container `id`'s request) and says so.
    fn set_paused(&self, id: &str, paused: bool) -> RpcResult<()> {
        let vm = lock(&self.vm).clone().ok_or_else(|| status(Code::UNAVAILABLE, "sandbox: not running"))?;
        let what = if paused { "pause" } else { "resume" };
        let r = if paused { vm.sandbox.pause() } else { vm.sandbox.resume() };
        r.map_err(|e| status(Code::INTERNAL, format!("container {id}: {what}: {e}")))?;
        self.paused.store(paused, Ordering::Release);
        tracing::info!("container {id}: sandbox VM {}", if paused { "paused" } else { "resumed" });
        let container_id = id.to_string();
        if paused {
            self.events
                .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(TaskPaused { container_id, ..Default::default() }));
        } else {
            self.events.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed { container_id, ..Default::default() }),
            );
        }
        Ok(())
    }

    /// Refuses what needs the guest while it is paused (it would wait for the RPC timeout).
    fn not_paused(&self, id: &str) -> RpcResult<()> {
        if self.paused.load(Ordering::Acquire) {
            return Err(status(Code::FAILED_PRECONDITION, format!("container {id}: the sandbox is paused")));
        }
        Ok(())
    }

    fn session(&self) -> RpcResult<Session> {
        lock(&self.vm)
            .as_ref()
            .map(|v| v.session.clone())
            .ok_or_else(|| status(Code::UNAVAILABLE, "sandbox: not running"))
    }

    /// Unplugs a container's devices (the guest releases each first; `force`: even one it still
    /// counts as in use). A device the guest will not release is removed from the VM anyway.
    fn unplug(&self, id: &str, devices: &[Plugged], force: bool) {
        if devices.is_empty() {
            return;
        }
        let Some(vm) = lock(&self.vm).clone() else { return };
        if let Some(why) = vm.sandbox.has_stopped() {
            tracing::debug!("container {id}: devices not unplugged: the sandbox stopped ({why})");
            return;
        }
        for d in devices {
            let what = format!("container {id}: {} (PCI {})", d.container_path, d.pci);
            let unplug = |force| vm.hotplug.unplug(&vm.sandbox, &vm.session, &d.pci, RELEASE_TIMEOUT, force);
            let r = match self.rt.block_on(unplug(force)) {
                Err(e) if !force && e.rpc_code() == Some(RpcCode::FailedPrecondition) => {
                    tracing::warn!("{what}: the guest still uses it ({e}); unplugging it anyway");
                    self.rt.block_on(unplug(true))
                }
                r => r,
            };
            match r {
                Ok(Unplugged::Released) => tracing::info!("{what}: unplugged (released by the guest)"),
                Ok(Unplugged::Forced(why)) => {
                    tracing::warn!("{what}: unplugged; the guest did not release it: {why}")
                }
                Err(e) => tracing::warn!("{what}: unplugging: {e}"),
            }
        }
    }

    /// Marks a process exited, wakes waiters and publishes TaskExit.
    fn set_exited(&self, t: &Target, code: u32) {
        let at = now();
        {
            let mut cs = lock(&self.containers);
            let Some(p) = cs.get_mut(&t.container_id).and_then(|c| c.procs.get_mut(&t.exec_id)) else { return };
            if p.exit.is_some() {
                return;
            }
            p.state = State::Stopped;
            p.exit = Some((code, at.clone()));
        }
        self.exited.notify_all();
        let id = if t.exec_id.is_empty() { t.container_id.clone() } else { t.exec_id.clone() };
        self.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: t.container_id.clone(),
                id,
                pid: pid(),
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    /// After Start: waits for the process in the guest, drains its output, then reports the exit.
    fn watch(self: &Arc<Self>, vm: Arc<Vm>, t: Target, outputs: Vec<JoinHandle<()>>) {
        let inner = self.clone();
        let spawned = std::thread::Builder::new().name("shim-wait".into()).spawn(move || {
            let process = vm.session.process(&t.container_id, &t.exec_id);
            let r = inner.rt.block_on(async {
                tokio::select! {
                    r = process.wait() => r.map_err(|e| e.to_string()),
                    why = vm.sandbox.stopped() => Err(format!("sandbox: {why}")),
                }
            });
            let code = match r {
                Ok(r) => {
                    // Before the exit: containerd (CRI) marks the exit it then sees "OOMKilled".
                    if r.oom_killed {
                        tracing::warn!("{}/{}: killed by the guest's OOM killer", t.container_id, t.exec_id);
                        inner.events.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            Box::new(TaskOOM { container_id: t.container_id.clone(), ..Default::default() }),
                        );
                    }
                    u32::try_from(r.status).unwrap_or(EXIT_SANDBOX_GONE)
                }
                Err(e) => {
                    // The connection usually breaks a moment before the VM thread reports why.
                    let why = inner.rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(2), vm.sandbox.stopped()).await.ok()
                    });
                    let e = why.map(|w| format!("sandbox: {w}")).unwrap_or(e);
                    tracing::error!(
                        "{}/{}: the process is lost ({e}); reporting exit status {EXIT_SANDBOX_GONE}; guest console:\n{}",
                        t.container_id,
                        t.exec_id,
                        vm.sandbox.console_tail(10)
                    );
                    EXIT_SANDBOX_GONE
                }
            };
            drop(vm);
            for o in outputs {
                let _ = o.join();
            }
            inner.set_exited(&t, code);
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the exit watcher: {e}");
        }
    }
}

/// The spec's host block devices, found and opened for plugging; anything the sandbox cannot
/// take fails here, naming the entry. A privileged spec's host devices are dropped.
fn host_devices(id: &str, spec: &mut serde_json::Value) -> RpcResult<Vec<(devices::BlockDevice, HostNode)>> {
    let plan = devices::plan(spec).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
    if plan.dropped > 0 {
        devices::drop_host_devices(spec);
        tracing::info!(
            "container {id}: privileged: the {} host devices of linux.devices are not passed into the sandbox \
             (the container gets the guest's)",
            plan.dropped
        );
    }
    let sys = Path::new(devices::SYS_DEV_BLOCK);
    plan.blocks
        .into_iter()
        .map(|b| {
            let node = devices::open_host_block(sys, Path::new(devices::DEV), b.major, b.minor).map_err(|source| {
                let e = devices::DeviceError::Host {
                    index: b.index,
                    path: b.container_path.clone(),
                    major: b.major,
                    minor: b.minor,
                    source,
                };
                status(Code::INVALID_ARGUMENT, e.to_string())
            })?;
            Ok((b, node))
        })
        .collect()
}

/// Host paths the spec bind-mounts are bound at `<id>/mounts/<n>` in the share; the spec (JSON)
/// gets their guest paths. Mounts of kernel filesystems are left to the guest.
/// The spec's mounts carried as disks (volumes.rs), their sources open; checked before anything
/// is mounted or booted.
fn block_volumes(spec: &serde_json::Value) -> RpcResult<Vec<(volumes::BlockVolume, volumes::OpenSource)>> {
    let invalid = |e: volumes::VolumeError| status(Code::INVALID_ARGUMENT, e.to_string());
    let mut out = Vec::new();
    for v in volumes::candidates(spec).map_err(invalid)? {
        if let Some(source) = volumes::open_source(&v).map_err(invalid)? {
            out.push((v, source));
        }
    }
    Ok(out)
}

fn share_binds(spec: &mut serde_json::Value, id: &str, share: &mount::Share) -> RpcResult<()> {
    let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) else { return Ok(()) };
    for (i, m) in mounts.iter_mut().enumerate() {
        let is_bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
            || m.get("options")
                .and_then(|o| o.as_array())
                .is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind" | "rbind"))));
        let Some(source) = m.get("source").and_then(|s| s.as_str()).map(PathBuf::from) else { continue };
        if !is_bind || !source.is_absolute() {
            continue;
        }
        let ro =
            m.get("options").and_then(|o| o.as_array()).is_some_and(|o| o.iter().any(|x| x.as_str() == Some("ro")));
        let at = Path::new(id).join("mounts").join(i.to_string());
        share
            .bind(&at, &source, ro)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("mounts[{i}].source: {}: {e}", source.display())))?;
        m["source"] = serde_json::Value::String(format!("{GUEST_SHARED}/{id}/mounts/{i}"));
    }
    Ok(())
}

impl Inner {
    /// The spec's namespace paths, for the guest (namespaces.rs); the CNI network namespace a
    /// CRI sandbox container names, to wire to the VM.
    fn namespaces(&self, id: &str, spec: &mut serde_json::Value) -> RpcResult<Option<PathBuf>> {
        let r = namespaces::rewrite(spec, pid(), &self.sandbox_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if !r.joined.is_empty() {
            let kinds: Vec<&str> = r.joined.iter().map(|(_, k)| k.as_str()).collect();
            tracing::info!("container {id}: joins the {} namespaces of {}", kinds.join(", "), self.sandbox_id);
        }
        for p in &r.dropped_net {
            tracing::info!(
                "container {id}: network namespace {p} is the host's; a new one in the guest, given its interface"
            );
        }
        Ok(r.dropped_net.into_iter().next().map(PathBuf::from))
    }

    /// Wires the pod network namespace `netns` to a tap and plugs a virtio-net device on it:
    /// the agent request that sets the interface up in the sandbox container, once created.
    fn plug_pod_network(&self, vm: &Vm, id: &str, netns: &Path) -> RpcResult<Option<UpdateNetworkRequest>> {
        let failed = |e: SandboxError| status(Code::INTERNAL, format!("container {id}: network: {e}"));
        let Some((net, tap)) = PodNetwork::attach(netns).map_err(failed)? else {
            tracing::info!("container {id}: {} has no interface with an address: loopback only", netns.display());
            return Ok(None);
        };
        let mtu = u16::try_from(net.interface.mtu).ok();
        let cfg = NetConfig { backend: NetHost::Tap(tap), mac: net.interface.mac, mtu };
        let plugged = self.rt.block_on(vm.hotplug.plug_net(&vm.sandbox, cfg));
        let req = plugged.as_ref().ok().map(|pci| net.interface.update_request(id, pci));
        // Kept either way: the VM's stop takes the wiring down.
        *lock(&self.podnet) = Some(net);
        let pci = plugged.map_err(failed)?;
        tracing::info!("container {id}: pod network plugged at PCI {pci}");
        Ok(req)
    }

    fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> RpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(status(Code::INVALID_ARGUMENT, format!("id: {id:?} is not a container id")));
        }
        if let Some(path) = req.options.as_ref().and_then(|o| options_config_path(&o.type_url, &o.value)) {
            if lock(&self.vm).is_none() {
                let c = ShimConfig::load(Some(&path)).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
                tracing::info!("config: {} (runtime options)", path.display());
                *lock(&self.config) = c;
            }
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec_path = bundle.join("config.json");
        let mut spec: serde_json::Value = std::fs::read(&spec_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("bundle: {}: {e}", spec_path.display())))?;
        // Before anything is mounted or booted: a device the sandbox cannot take leaves nothing.
        let host_devices = host_devices(&id, &mut spec)?;
        let volumes = block_volumes(&spec)?;
        let netns = self.namespaces(&id, &mut spec)?;

        let rootfs = bundle.join("rootfs");
        // Registered before the (slow) boot: what containerd sends meanwhile (stdin, CloseIO,
        // State) finds the task.
        let init = Process::new(req.stdin.clone(), req.stdout.clone(), req.stderr.clone(), req.terminal, vec![])?;
        {
            let mut cs = lock(&self.containers);
            if cs.contains_key(&id) {
                return Err(status(Code::ALREADY_EXISTS, format!("container {id}: already exists")));
            }
            let procs = HashMap::from([(String::new(), init)]);
            cs.insert(
                id.clone(),
                Container { bundle: req.bundle.clone(), rootfs_mounted: false, devices: Vec::new(), procs },
            );
        }
        let forget = || {
            lock(&self.containers).remove(&id);
        };
        let mounts: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec { fstype: m.type_.clone(), source: m.source.clone(), options: m.options.to_vec() })
            .collect();
        let cleanup = |mounted: bool| {
            mount::remove_container(&self.dir, &id);
            if mounted {
                mount::unmount_all(&rootfs);
            }
        };
        if !mounts.is_empty() {
            if let Err(e) = std::fs::create_dir_all(&rootfs).and_then(|()| mount::mount_all(&mounts, &rootfs)) {
                mount::unmount_all(&rootfs);
                forget();
                return Err(status(Code::INTERNAL, format!("rootfs: {e}")));
            }
        }
        let mounted = !mounts.is_empty();
        let mut plugged = Vec::new();
        let prepared = (|| {
            let vm = self.vm(&spec)?;
            let share = mount::Share::open(&self.dir)
                .map_err(|e| status(Code::INTERNAL, format!("sandbox: {}: {e}", self.dir.display())))?;
            share
                .bind(&Path::new(&id).join("rootfs"), &rootfs, false)
                .map_err(|e| status(Code::INTERNAL, format!("rootfs: sharing {}: {e}", rootfs.display())))?;
            share_binds(&mut spec, &id, &share)?;
            for (b, node) in &host_devices {
                let disk = DiskConfig { path: node.fd_path(), read_only: b.read_only };
                let what = format!("linux.devices[{}] {}", b.index, b.container_path);
                let pci = self
                    .rt
                    .block_on(vm.hotplug.plug_disk(&vm.sandbox, disk))
                    .map_err(|e| status(Code::INTERNAL, format!("{what}: plugging {}: {e}", node.path.display())))?;
                tracing::info!(
                    "container {id}: {what}: host {} plugged at PCI {pci}{}",
                    node.path.display(),
                    if b.read_only { " (read-only)" } else { "" }
                );
                plugged.push(Plugged { pci, container_path: b.container_path.clone() });
            }
            let n_devices = plugged.len();
            // After share_binds: the rewritten mounts are binds of guest paths.
            let mut storages = Vec::new();
            for (v, source) in &volumes {
                let disk = DiskConfig { path: source.fd_path(), read_only: v.read_only };
                let what = v.what();
                let pci = self
                    .rt
                    .block_on(vm.hotplug.plug_disk(&vm.sandbox, disk))
                    .map_err(|e| status(Code::INTERNAL, format!("{what}: plugging {}: {e}", v.source.display())))?;
                tracing::info!(
                    "container {id}: {what}: {} volume {} plugged at PCI {pci}{}",
                    v.fstype,
                    v.source.display(),
                    if v.read_only { " (read-only)" } else { "" }
                );
                let at = v.guest_mount_point(&id);
                storages.push(Storage {
                    driver: "blk".into(),
                    source: pci.to_string(),
                    fstype: v.fstype.clone(),
                    options: v.options.clone(),
                    mount_point: at.clone(),
                    ..Default::default()
                });
                volumes::rewrite(&mut spec, v, &at);
                plugged.push(Plugged { pci, container_path: what });
            }
            let devices = plugged[..n_devices]
                .iter()
                .map(|p| Device {
                    id: p.pci.to_string(),
                    type_: "blk".into(),
                    container_path: p.container_path.clone(),
                    ..Default::default()
                })
                .collect();
            let create = ContainerSpec {
                id: id.clone(),
                spec_json: serde_json::to_vec(&spec).map_err(|e| status(Code::INTERNAL, e.to_string()))?,
                rootfs: format!("{GUEST_SHARED}/{id}/rootfs"),
                storages,
                devices,
                terminal: req.terminal,
            };
            let network = match &netns {
                Some(ns) => self.plug_pod_network(&vm, &id, ns)?,
                None => None,
            };
            // The agent rescans the PCI bus for them: no unplug may run meanwhile.
            let _hotplug = (!plugged.is_empty() || network.is_some()).then(|| self.rt.block_on(vm.hotplug.lock()));
            self.rt
                .block_on(vm.session.create_container(create))
                .map_err(|e| agent_status(&e, format!("container {id}")))?;
            // Its network namespace exists now: the interface moves in before anything runs.
            if let Some(req) = network {
                self.rt
                    .block_on(vm.session.update_network(req))
                    .map_err(|e| agent_status(&e, format!("container {id}")))?;
            }
            Ok::<_, ttrpc::Error>(())
        })();
        if let Err(e) = prepared {
            // No container holds them: the guest need not be asked twice.
            self.unplug(&id, &plugged, true);
            cleanup(mounted);
            forget();
            if lock(&self.containers).is_empty() {
                self.stop_vm();
            }
            return Err(e);
        }
        if let Some(c) = lock(&self.containers).get_mut(&id) {
            c.rootfs_mounted = mounted;
            c.devices = plugged;
        }
        tracing::info!("container {id}: created");
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: pid(),
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse { pid: pid(), ..Default::default() })
    }

    fn start(self: &Arc<Self>, req: api::StartRequest) -> RpcResult<api::StartResponse> {
        let t = Target { container_id: req.id.clone(), exec_id: req.exec_id.clone() };
        let (stdin, stdout, stderr, terminal, spec) = {
            let mut cs = lock(&self.containers);
            let p =
                cs.get_mut(&t.container_id).and_then(|c| c.procs.get_mut(&t.exec_id)).ok_or_else(|| not_found(&t))?;
            if p.state != State::Created {
                return Err(status(Code::FAILED_PRECONDITION, format!("{}: already started", name(&t))));
            }
            let reader = p.stdin_pipe.as_ref().map(|s| s.reader.try_clone().map(|r| (r, s.closed.clone())));
            let reader = reader.transpose().map_err(|e| status(Code::INTERNAL, format!("stdin: {e}")))?;
            (reader, p.stdout.clone(), p.stderr.clone(), p.terminal, p.spec.clone())
        };
        let vm = lock(&self.vm).clone().ok_or_else(|| status(Code::UNAVAILABLE, "sandbox: not running"))?;
        let started = if t.exec_id.is_empty() {
            let p = vm.session.process(&t.container_id, "");
            self.rt.block_on(p.start()).map(|()| p)
        } else {
            self.rt.block_on(vm.session.exec(&t.container_id, &t.exec_id, spec))
        };
        let process = match started {
            Ok(p) => p,
            Err(e) => {
                // Docker's statuses for a command that is missing (127) or cannot run (126), as
                // the agent typed them; Wait may already be waiting (it comes before Start).
                let code = e.exit_status().unwrap_or(EXIT_NOT_EXECUTABLE);
                self.set_exited(&t, u32::from(code));
                return Err(status(Code::FAILED_PRECONDITION, format!("{}: {e}", name(&t))));
            }
        };
        if let Some(p) = lock(&self.containers).get_mut(&t.container_id).and_then(|c| c.procs.get_mut(&t.exec_id)) {
            p.state = State::Running;
        }
        let handle = self.rt.handle().clone();
        let mut outputs = Vec::new();
        outputs.extend(stdio::spawn_output(handle.clone(), process.clone(), stdout, false));
        if !terminal {
            outputs.extend(stdio::spawn_output(handle.clone(), process.clone(), stderr, true));
        }
        match stdin {
            Some((reader, closed)) => stdio::spawn_input(handle, process.clone(), reader, closed),
            None if !terminal => stdio::close_stdin(&handle, &process),
            None => {}
        }
        self.watch(vm, t.clone(), outputs);
        tracing::info!("{}: started", name(&t));
        if t.exec_id.is_empty() {
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: t.container_id, pid: pid(), ..Default::default() }),
            );
        } else {
            self.events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: t.container_id,
                    exec_id: t.exec_id,
                    pid: pid(),
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse { pid: pid(), ..Default::default() })
    }

    fn delete(self: &Arc<Self>, req: api::DeleteRequest) -> RpcResult<api::DeleteResponse> {
        let t = Target { container_id: req.id.clone(), exec_id: req.exec_id.clone() };
        if !t.exec_id.is_empty() {
            let mut cs = lock(&self.containers);
            let c = cs.get_mut(&t.container_id).ok_or_else(|| not_found(&t))?;
            let p = c.procs.get(&t.exec_id).ok_or_else(|| not_found(&t))?;
            if p.state == State::Running {
                return Err(status(Code::FAILED_PRECONDITION, format!("{}: still running", name(&t))));
            }
            let (exit_status, exited_at) = p.exit_status();
            c.procs.remove(&t.exec_id);
            return Ok(api::DeleteResponse { pid: pid(), exit_status, exited_at, ..Default::default() });
        }
        if process(&lock(&self.containers), &t)?.state == State::Running {
            return Err(status(Code::FAILED_PRECONDITION, format!("{}: still running", name(&t))));
        }
        if let Ok(session) = self.session() {
            if let Err(e) = self.rt.block_on(session.remove_container(&t.container_id)) {
                tracing::debug!("{}: {e}", t.container_id);
            }
        }
        let Some(c) = lock(&self.containers).remove(&t.container_id) else { return Err(not_found(&t)) };
        // After RemoveContainer: the agent no longer counts them as in use.
        self.unplug(&t.container_id, &c.devices, false);
        mount::remove_container(&self.dir, &t.container_id);
        if c.rootfs_mounted {
            mount::unmount_all(&Path::new(&c.bundle).join("rootfs"));
        }
        let init = c.procs.get("");
        let (exit_status, exited_at) = init.map(|p| p.exit_status()).unwrap_or((0, MessageField::none()));
        if lock(&self.containers).is_empty() {
            self.stop_vm();
        }
        tracing::info!("container {}: deleted", t.container_id);
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: t.container_id.clone(),
                id: t.container_id,
                pid: pid(),
                exit_status,
                exited_at: exited_at.clone(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse { pid: pid(), exit_status, exited_at, ..Default::default() })
    }
}

fn name(t: &Target) -> String {
    if t.exec_id.is_empty() {
        format!("container {}", t.container_id)
    } else {
        format!("container {} exec {}", t.container_id, t.exec_id)
    }
}

/// An agent failure as containerd sees it: the agent's status class, prefixed with `what`.
fn agent_status(e: &SandboxError, what: String) -> ttrpc::Error {
    let code = match e.rpc_code() {
        Some(RpcCode::Invalid) => Code::INVALID_ARGUMENT,
        Some(RpcCode::NotFound) => Code::NOT_FOUND,
        Some(RpcCode::AlreadyExists) => Code::ALREADY_EXISTS,
        Some(RpcCode::FailedPrecondition) => Code::FAILED_PRECONDITION,
        Some(RpcCode::Other) => Code::INTERNAL,
        None => Code::UNAVAILABLE,
    };
    status(code, format!("{what}: {e}"))
}

fn not_found(t: &Target) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{}: not found", name(t)))
}

fn process<'a>(cs: &'a HashMap<String, Container>, t: &Target) -> RpcResult<&'a Process> {
    cs.get(&t.container_id).and_then(|c| c.procs.get(&t.exec_id)).ok_or_else(|| not_found(t))
}

impl containerd_shim::Task for Service {
    fn create(&self, _: &TtrpcContext, req: api::CreateTaskRequest) -> RpcResult<api::CreateTaskResponse> {
        self.inner.create(req)
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> RpcResult<api::StartResponse> {
        self.inner.start(req)
    }

    fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> RpcResult<api::DeleteResponse> {
        self.inner.delete(req)
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> RpcResult<api::Empty> {
        let t = Target { container_id: req.id.clone(), exec_id: req.exec_id.clone() };
        self.inner.not_paused(&t.container_id)?;
        if t.exec_id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "exec_id: empty"));
        }
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        if serde_json::from_slice::<serde_json::Value>(&spec).is_err() {
            return Err(status(Code::INVALID_ARGUMENT, format!("{}: spec: not an OCI process (JSON)", name(&t))));
        }
        let mut cs = lock(&self.inner.containers);
        let c = cs
            .get_mut(&t.container_id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {}: not found", t.container_id)))?;
        if c.procs.contains_key(&t.exec_id) {
            return Err(status(Code::ALREADY_EXISTS, format!("{}: already exists", name(&t))));
        }
        c.procs.insert(t.exec_id.clone(), Process::new(req.stdin, req.stdout, req.stderr, req.terminal, spec)?);
        drop(cs);
        self.inner.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded { container_id: t.container_id, exec_id: t.exec_id, ..Default::default() }),
        );
        Ok(api::Empty::new())
    }

    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> RpcResult<api::StateResponse> {
        let t = Target { container_id: req.id.clone(), exec_id: req.exec_id.clone() };
        let cs = lock(&self.inner.containers);
        let c = cs.get(&t.container_id).ok_or_else(|| not_found(&t))?;
        let p = c.procs.get(&t.exec_id).ok_or_else(|| not_found(&t))?;
        let st = match p.state {
            State::Created => api::Status::CREATED,
            State::Running if self.inner.paused.load(Ordering::Acquire) => api::Status::PAUSED,
            State::Running => api::Status::RUNNING,
            State::Stopped => api::Status::STOPPED,
        };
        let (exit_status, exited_at) = p.exit_status();
        Ok(api::StateResponse {
            id: req.id,
            bundle: c.bundle.clone(),
            pid: pid(),
            status: st.into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> RpcResult<api::WaitResponse> {
        let t = Target { container_id: req.id, exec_id: req.exec_id };
        let mut cs = lock(&self.inner.containers);
        loop {
            let p = process(&cs, &t)?;
            if let Some((s, at)) = &p.exit {
                return Ok(api::WaitResponse {
                    exit_status: *s,
                    exited_at: MessageField::some(at.clone()),
                    ..Default::default()
                });
            }
            cs = self.inner.exited.wait(cs).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> RpcResult<api::Empty> {
        let t = Target { container_id: req.id.clone(), exec_id: req.exec_id.clone() };
        let state = process(&lock(&self.inner.containers), &t)?.state;
        match state {
            State::Stopped => return Err(status(Code::NOT_FOUND, format!("{}: process already finished", name(&t)))),
            State::Created if t.exec_id.is_empty() => {
                // Never started: end it without starting it.
                if let Ok(session) = self.inner.session() {
                    let _ = self.inner.rt.block_on(session.remove_container(&t.container_id));
                }
                self.inner.set_exited(&t, 128 + req.signal);
                return Ok(api::Empty::new());
            }
            State::Created => {
                self.inner.set_exited(&t, 128 + req.signal);
                return Ok(api::Empty::new());
            }
            State::Running => {}
        }
        // A paused guest cannot take the signal: it runs again first (runc delivers a signal to
        // a frozen task once thawed; a paused VM would leave the call hanging instead).
        if self.inner.paused.load(Ordering::Acquire) {
            tracing::info!("{}: signal {} to a paused sandbox: resuming it first", name(&t), req.signal);
            self.inner.set_paused(&t.container_id, false)?;
        }
        let session = self.inner.session()?;
        let p = session.process(&t.container_id, &t.exec_id);
        self.inner
            .rt
            .block_on(p.signal(req.signal, req.all))
            .map_err(|e| agent_status(&e, format!("{}: signal {}", name(&t), req.signal)))?;
        Ok(api::Empty::new())
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> RpcResult<api::PidsResponse> {
        let session = self.inner.session()?;
        let pids = self
            .inner
            .rt
            .block_on(session.pids(&req.id))
            .map_err(|e| agent_status(&e, format!("container {}", req.id)))?;
        let processes = pids
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .map(|pid| containerd_shim::protos::types::task::ProcessInfo { pid, ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> RpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let t = Target { container_id: req.id, exec_id: req.exec_id };
        let mut cs = lock(&self.inner.containers);
        let p = cs.get_mut(&t.container_id).and_then(|c| c.procs.get_mut(&t.exec_id)).ok_or_else(|| not_found(&t))?;
        // The copier forwards what is left in the pipe, then closes the process's stdin.
        if let Some(pipe) = &p.stdin_pipe {
            pipe.closed.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(api::Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> RpcResult<api::Empty> {
        let session = self.inner.session()?;
        let p = session.process(&req.id, &req.exec_id);
        self.inner
            .rt
            .block_on(p.resize(req.height, req.width))
            .map_err(|e| agent_status(&e, format!("container {}: resize", req.id)))?;
        Ok(api::Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> RpcResult<api::Empty> {
        self.inner.not_paused(&req.id)?;
        let session = self.inner.session()?;
        // containerd sends the OCI LinuxResources as JSON in the Any.
        let resources_json = req.resources.as_ref().map(|a: &Any| a.value.clone()).unwrap_or_default();
        self.inner
            .rt
            .block_on(session.update_container(&req.id, resources_json))
            .map_err(|e| agent_status(&e, format!("container {}: update", req.id)))?;
        Ok(api::Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> RpcResult<api::StatsResponse> {
        self.inner.not_paused(&req.id)?;
        let session = self.inner.session()?;
        let s = self
            .inner
            .rt
            .block_on(session.stats(&req.id))
            .map_err(|e| agent_status(&e, format!("container {}: stats", req.id)))?;
        Ok(api::StatsResponse { stats: MessageField::some(crate::stats::metrics_any(&s)?), ..Default::default() })
    }

    /// Pauses the sandbox VM's vCPUs (Kata's semantics: the whole pod stops, memory kept).
    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> RpcResult<api::Empty> {
        let t = Target { container_id: req.id.clone(), exec_id: String::new() };
        if process(&lock(&self.inner.containers), &t)?.state != State::Running {
            return Err(status(Code::FAILED_PRECONDITION, format!("{}: not running", name(&t))));
        }
        self.inner.set_paused(&req.id, true)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> RpcResult<api::Empty> {
        let t = Target { container_id: req.id.clone(), exec_id: String::new() };
        process(&lock(&self.inner.containers), &t)?;
        if !self.inner.paused.load(Ordering::Acquire) {
            return Err(status(Code::FAILED_PRECONDITION, format!("{}: not paused", name(&t))));
        }
        self.inner.set_paused(&req.id, false)?;
        Ok(api::Empty::new())
    }

    fn connect(&self, _: &TtrpcContext, _: api::ConnectRequest) -> RpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse { shim_pid: pid(), task_pid: pid(), ..Default::default() })
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> RpcResult<api::Empty> {
        if !lock(&self.inner.containers).is_empty() {
            return Ok(api::Empty::new());
        }
        self.inner.stop_vm();
        tracing::info!("shutdown: no task left, exiting");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Create's handling of the spec's binds, against a share where a symlink was planted on
    /// the way to `mounts/<n>`: refused, the victim gets no mount; then the normal case.
    #[test]
    fn spec_binds_go_to_the_share_and_never_through_a_planted_symlink() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (mounts); CI runs as root");
        let tmp = tempfile::tempdir().unwrap();
        let (src, victim, dir) = (tmp.path().join("src"), tmp.path().join("victim"), tmp.path().join("sandbox"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(victim.join("0")).unwrap();
        let share = mount::Share::open(&dir).unwrap();
        std::fs::create_dir_all(dir.join("staging/c")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("staging/c/mounts")).unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        ]});

        let e = share_binds(&mut spec.clone(), "c", &share).unwrap_err();
        let victim_mounts = mount::mounts_under(&victim);
        let e = format!("{e:?}");

        std::fs::remove_file(dir.join("staging/c/mounts")).unwrap();
        let mut ok = spec.clone();
        let r = share_binds(&mut ok, "c", &share);
        let ro = std::fs::write(dir.join("shared/c/mounts/1/x"), "y").map_err(|e| e.raw_os_error());
        mount::remove_tree(&dir);
        let left = mount::mounts_under(tmp.path());

        assert!(victim_mounts.is_empty(), "victim mounted: {victim_mounts:?}");
        assert!(e.contains("mounts[1].source") && e.contains("c/mounts/1"), "{e}");
        r.unwrap();
        assert_eq!(ok["mounts"][1]["source"], format!("{GUEST_SHARED}/c/mounts/1"));
        assert_eq!(GUEST_SHARED, shoji_devices::model::guest_share_dir(SHARED_TAG));
        assert_eq!(ok["mounts"][0]["source"], "proc", "kernel filesystems are the guest's");
        assert_eq!(ro, Err(Some(libc::EROFS)));
        assert!(left.is_empty(), "{left:?}");
        assert!(!dir.exists());
    }
}
