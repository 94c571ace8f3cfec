//! `shoji run`: one command in a fresh sandbox, as `docker run` runs it in a container.
//!
//! 1. Every flag is checked (the devices with the VMM's own checks) before anything is built,
//!    booted or written: a bad flag is one line on stderr and exit status 125.
//! 2. The container rootfs (`--rootfs DIR`, or the built-in busybox one, built and cached on
//!    first use), the guest kernel and the initramfs are found or built.
//! 3. The VM boots on a thread of this process with a private session dir holding its vsock
//!    socket and its serial console log (`detached::sessions`: named by this process, so the
//!    next `shoji` command removes it if this one is killed); the rootfs and `--share` dirs are
//!    virtio-fs shares, `--disk`s virtio-blk disks.
//! 4. Over the agent API: CreateSandbox; each `--device` is hot-plugged (`shoji_sandbox::Hotplug`,
//!    as the shim does), then CreateContainer (the storages to mount, the devices,
//!    the OCI spec), StartContainer; stdout and stderr are copied to ours until end of stream,
//!    stdin forwarded with `-i`; signals are forwarded; WaitProcess gives the exit status.
//! 5. DestroySandbox, the VM is stopped and joined, the session dir removed.
pub(crate) mod device;
mod image;
pub(crate) mod net;
pub(crate) mod rootfs;
pub(crate) mod saved;
pub(crate) mod seccomp;
pub(crate) mod spec;
pub(crate) mod tty;

use anyhow::{anyhow, Context, Result};
use shoji_sandbox::{
    console_tail, ContainerSpec, Device, Hotplug, Placement, Process, Sandbox, SandboxConfig, SandboxError, Session,
    SessionConfig, Stream,
};
use shoji_vmm::{host, testkit, DiskConfig, ShareConfig, VmConfig, VmError};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Docker's exit status for errors of the tool itself (not of the command).
pub const EXIT_SHOJI_ERROR: u8 = 125;
/// Like `timeout(1)`.
const EXIT_TIMEOUT: u8 = 124;
const USAGE: &str = "shoji run [OPTIONS] -- CMD [ARGS...]";

/// The container's id in the sandbox (one container per `shoji run`).
pub(crate) const CONTAINER_ID: &str = "run";
/// Where the agent mounts the container's rootfs and the shares in the guest.
/// (`devices::model::guest_share_dir(ROOTFS_TAG)`, checked by a test.)
const GUEST_ROOTFS: &str = "/run/shoji/rootfs";
use shoji_devices::model::{self, ROOTFS_TAG};

#[derive(clap::Args, Debug)]
#[command(
    about = "Run a command in a new sandbox (built-in busybox rootfs unless --rootfs)",
    override_usage = USAGE
)]
pub struct RunArgs {
    /// The container's root filesystem, a host directory shared read-write (default: a
    /// built-in busybox rootfs, shared read-only, with tmpfs on /tmp).
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// An OCI image layout (directory or tar) to run: unpacked once into the cache and shared
    /// read-only with tmpfs on /tmp; its Env, WorkingDir and Entrypoint/Cmd are the defaults.
    #[arg(long, value_name = "OCI-LAYOUT-DIR-or-TAR")]
    pub image: Option<PathBuf>,
    /// Set an environment variable (K alone: take its value from here, if set). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// The command's working directory in the container (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// vCPUs of the sandbox.
    #[arg(long, default_value_t = 1, value_name = "N", allow_negative_numbers = true)]
    pub cpus: u8,
    /// Memory of the sandbox in MiB.
    #[arg(long, default_value_t = 256, value_name = "MiB", allow_negative_numbers = true)]
    pub memory: u64,
    /// A virtio-blk disk (raw image or block device), /dev/vda, /dev/vdb, ... in the container.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<String>,
    /// A host block device, hot-plugged after boot, at CONTAINER (default: the host path) with
    /// device cgroup permissions rwm or fewer (Docker's syntax). Repeatable.
    #[arg(long = "device", value_name = "HOST[:CONTAINER][:rwm]")]
    pub devices: Vec<String>,
    /// Share a host directory (virtio-fs) at /mnt/<its name> in the container.
    #[arg(long = "share", value_name = "DIR[,ro]")]
    pub shares: Vec<String>,
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal (with -i: the host terminal in raw mode is its keyboard).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Run in the background: print the sandbox's name once the command has started, keep
    /// its output for `shoji logs` (see `shoji ps`, `exec`, `kill`, `rm`).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// The detached sandbox's name (default: a generated adjective-noun).
    #[arg(long, value_name = "NAME", requires = "detach")]
    pub name: Option<String>,
    /// Stop the sandbox after this many seconds, boot included, and exit with status 124.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// The sandbox's network: `none` (loopback only) or `user` (user-mode networking through
    /// passt: outbound connections as this user; the host's loopback at 10.0.2.2).
    #[arg(long, value_enum, default_value_t = net::NetMode::None)]
    pub net: net::NetMode,
    /// Docker's `--security-opt`: only `seccomp=unconfined` (no seccomp profile) is known.
    #[arg(long = "security-opt", value_name = "seccomp=unconfined")]
    pub security_opt: Vec<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    pub command: Vec<String>,
}

/// Where the container's root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rootfs {
    BuiltIn,
    /// `Plan::image`.
    Image,
    Dir(PathBuf),
}

/// `RunArgs`, checked.
#[derive(Debug)]
pub(crate) struct Plan {
    pub rootfs: Rootfs,
    pub image: Option<image::Image>,
    pub env: Vec<String>,
    pub workdir: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    /// Each share and the name it gets under /mnt.
    pub shares: Vec<(ShareConfig, String)>,
    pub interactive: bool,
    pub tty: bool,
    pub timeout: Option<Duration>,
    pub command: Vec<String>,
    /// Whether the container gets the default seccomp profile (`run::seccomp`).
    pub seccomp: bool,
    /// `--device`s: hot-plugged after boot, in order.
    pub devices: Vec<device::HostDevice>,
    pub net: net::NetMode,
}

/// `shoji run`: the command's exit status, or 125 with one line on stderr.
pub fn main(args: RunArgs) -> ExitCode {
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("shoji: error: {}", one_line(&e));
            ExitCode::from(EXIT_SHOJI_ERROR)
        }
    }
}

/// An error and its causes on one line.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// One line for a command-line error of `shoji run` (clap's own message is several, with the
/// usage): "FIELD: what is wrong".
pub fn clap_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ErrorKind};
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").trim();
    let arg = e.get(ContextKind::InvalidArg).map(|a| a.to_string());
    // "--cpus <N>" -> "--cpus"
    let field = arg.as_deref().map(|a| a.split([' ', '=']).next().unwrap_or(a).to_string());
    match (e.kind(), field) {
        // `--name` without `-d`.
        (ErrorKind::MissingRequiredArgument, Some(f)) if f == "--detach" => {
            "--name: names a detached sandbox; it needs -d".to_string()
        }
        (ErrorKind::MissingRequiredArgument, _) => format!("command: missing; usage: {USAGE}"),
        (ErrorKind::UnknownArgument, Some(f)) if !f.starts_with('-') => {
            format!("command: {f:?} must come after `--`; usage: {USAGE}")
        }
        (ErrorKind::UnknownArgument, Some(f)) => format!("{f}: unknown option (see `shoji run --help`)"),
        (_, Some(f)) => format!("{f}: {first}"),
        (_, None) => format!("run: {first}"),
    }
}

/// "PATH[,ro]" for `--share`: the share and its name under /mnt.
fn parse_share(spec: &str, index: usize) -> Result<(ShareConfig, String)> {
    let mut parts = spec.split(',');
    let dir = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| anyhow!("share: empty directory in {spec:?}"))?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            o => return Err(anyhow!("share: unknown option {o:?} in {spec:?} (expected ro or rw)")),
        }
    }
    let full = std::fs::canonicalize(dir).map_err(|e| anyhow!("share: {dir}: {e}"))?;
    if !full.is_dir() {
        return Err(anyhow!("share: {dir}: not a directory"));
    }
    let name = full
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("share: {dir}: has no name to put under /mnt (the root, or not UTF-8)"))?
        .to_string();
    Ok((ShareConfig { dir: full, tag: model::share_tag(index), read_only }, name))
}

/// `-e K=V` or `-e K` (K's value here; left out when unset).
pub(crate) fn parse_env(e: &str) -> Result<Option<String>> {
    if e.contains('\0') {
        return Err(anyhow!("env: {e:?} contains a NUL byte"));
    }
    let name = e.split_once('=').map_or(e, |(n, _)| n);
    if name.is_empty() {
        return Err(anyhow!("env: {e:?} has no variable name (expected K=V or K)"));
    }
    if e.contains('=') {
        Ok(Some(e.to_string()))
    } else {
        Ok(std::env::var(name).ok().map(|v| format!("{name}={v}")))
    }
}

/// Checks every flag and every file they name; builds, boots and writes nothing.
pub(crate) fn plan(a: RunArgs) -> Result<Plan> {
    let image = a.image.as_deref().map(image::Image::open).transpose()?;
    let image_config = image.as_ref().map(|i| i.config.clone()).unwrap_or_default();
    let mut command = a.command;
    if command.is_empty() && image.is_some() {
        if image_config.command.is_empty() {
            return Err(anyhow!("command: missing, and the image has no Entrypoint or Cmd; usage: {USAGE}"));
        }
        command = image_config.command.clone();
    }
    match command.first() {
        None => return Err(anyhow!("command: missing; usage: {USAGE}")),
        Some(c) if c.is_empty() || c.contains('\0') => return Err(anyhow!("command: {c:?} is not a program name")),
        Some(_) => {}
    }
    if let Some(arg) = command.iter().find(|c| c.contains('\0')) {
        return Err(anyhow!("command: argument {arg:?} contains a NUL byte"));
    }
    let user_env: Vec<String> =
        a.env.iter().map(|e| parse_env(e)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    let env = image_config.env.iter().cloned().chain(user_env).collect();
    let workdir = a.workdir.or(image_config.workdir).unwrap_or_else(|| "/".to_string());
    if !workdir.starts_with('/') || workdir.contains('\0') {
        return Err(anyhow!("workdir: {workdir:?} is not an absolute path"));
    }
    let rootfs = match a.rootfs {
        None if image.is_some() => Rootfs::Image,
        None => Rootfs::BuiltIn,
        Some(d) => {
            let full = std::fs::canonicalize(&d).map_err(|e| anyhow!("rootfs: {}: {e}", d.display()))?;
            if !full.is_dir() {
                return Err(anyhow!("rootfs: {}: not a directory", d.display()));
            }
            Rootfs::Dir(full)
        }
    };
    let timeout = match a.timeout {
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => return Err(anyhow!("timeout: {t} is not a positive number of seconds")),
        None => None,
    };
    let disks = a.disks.iter().map(|d| crate::device_args::parse_disk(d)).collect::<Result<Vec<_>>>()?;
    if disks.len() > 26 {
        return Err(anyhow!("disk: {} disks; at most 26 (/dev/vda to /dev/vdz)", disks.len()));
    }
    let disk_paths: Vec<String> = (0..disks.len()).map(disk_path).collect();
    let devices = device::parse_all(&a.devices, &disk_paths)?;
    let shares = a.shares.iter().enumerate().map(|(i, s)| parse_share(s, i)).collect::<Result<Vec<_>>>()?;
    for (i, (s, name)) in shares.iter().enumerate() {
        if let Some((other, _)) = shares[..i].iter().find(|(_, n)| n == name) {
            return Err(anyhow!("share: {} and {} would both be /mnt/{name}", other.dir.display(), s.dir.display()));
        }
    }
    let mut seccomp = true;
    for opt in &a.security_opt {
        match opt.as_str() {
            "seccomp=unconfined" => seccomp = false,
            o => return Err(anyhow!("security-opt: {o:?} is not supported (only seccomp=unconfined)")),
        }
    }
    if a.tty && a.interactive && !tty::is_tty(std::io::stdin().as_raw_fd()) {
        return Err(anyhow!("tty: -i -t needs a terminal on stdin (drop -t to pipe input)"));
    }
    let p = Plan {
        rootfs,
        image,
        env,
        workdir,
        cpus: a.cpus,
        memory_mib: a.memory,
        disks,
        shares,
        interactive: a.interactive,
        tty: a.tty,
        timeout,
        command,
        seccomp,
        devices,
        net: a.net,
    };
    // The VMM's own checks (vCPUs and memory within this host's limits, disks and shares
    // openable), with a built-in test guest standing in for the kernel: no VM is created.
    let mut cfg = VmConfig::new(testkit::guest("null").ok_or_else(|| anyhow!("the built-in null guest is missing"))?);
    (cfg.vcpus, cfg.memory_mib, cfg.disks) = (p.cpus, p.memory_mib, p.disks.clone());
    cfg.shares = p.shares.iter().map(|(s, _)| s.clone()).collect();
    shoji_vmm::vm::check(&cfg).map_err(|e| sandbox_error(e.into()))?;
    Ok(p)
}

/// `--disk` `i`'s path in the container.
fn disk_path(i: usize) -> String {
    format!("/dev/vd{}", char::from(b'a' + i as u8))
}

/// The container rootfs directory (built, found or unpacked now) and whether it is a shared,
/// read-only one (built-in or image: tmpfs on /tmp) rather than the user's own directory.
pub(crate) fn root_dir(p: &Plan) -> Result<(PathBuf, bool)> {
    Ok(match &p.rootfs {
        Rootfs::BuiltIn => (rootfs::ensure()?, true),
        Rootfs::Image => {
            let cache = shoji_sandbox::artifacts::cache_dir()
                .ok_or_else(|| anyhow!("image: no cache directory: set SHOJI_CACHE or HOME"))?;
            let image = p.image.as_ref().ok_or_else(|| anyhow!("image: missing"))?;
            (image.rootfs(&cache)?, true)
        }
        Rootfs::Dir(d) => (d.clone(), false),
    })
}

/// Sandbox errors with `shoji run`'s flag names.
pub(crate) fn sandbox_error(e: SandboxError) -> anyhow::Error {
    match e {
        SandboxError::Vm(VmError::Vcpus(n, max)) => anyhow!("cpus: {n} is out of range (1..={max} on this host)"),
        // The message already holds its causes.
        e => anyhow!(e.to_string()),
    }
}

fn run(a: RunArgs) -> Result<u8> {
    let p = plan(a)?;
    let (root_dir, builtin) = root_dir(&p)?;
    // Built on first use (the sandbox library only looks them up).
    let (kernel, initrd) = crate::artifacts::ensure()?;
    // A private directory for the sandbox's sockets and console log, removed at the end (by
    // the next `shoji` command when this one is killed first).
    let dir = crate::rundir::RunSession::create()?;
    let mut cfg = SandboxConfig::new(dir.path().to_path_buf());
    cfg.vcpus = p.cpus;
    cfg.memory_mib = p.memory_mib;
    cfg.disks = p.disks.clone();
    cfg.shares = vec![ShareConfig { dir: root_dir, tag: ROOTFS_TAG.into(), read_only: builtin }];
    cfg.shares.extend(p.shares.iter().map(|(s, _)| s.clone()));
    (cfg.kernel, cfg.initrd) = (Some(kernel), Some(initrd));
    if host::is_pvm() {
        tracing::info!("/dev/kvm is PVM (kvm_pvm): adding the kernel parameters a stock guest kernel needs here");
    }
    cfg.vm_config().map_err(sandbox_error)?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    // Signals are ours from here on (before the VM exists, so none is missed).
    let signals = rt.block_on(async { Signals::new() })?;
    // From the VM template when there is one (built on first use).
    let vm = rt.block_on(Sandbox::launch(&cfg)).map_err(sandbox_error)?;
    let result = rt.block_on(session(&p, builtin, &vm, signals));
    drop(rt);
    let stopped = vm.stop();
    let code = match result {
        Ok(code) => code,
        Err(Failure::Timeout) => {
            eprintln!("shoji: timeout: the sandbox ran past --timeout and was stopped");
            EXIT_TIMEOUT
        }
        Err(Failure::Signal(sig)) => 128 + sig as u8,
        Err(Failure::Command(e, code)) => {
            eprintln!("shoji: error: {}", one_line(&e));
            code
        }
        Err(Failure::Error(e)) => {
            eprintln!("shoji: error: {}", one_line(&e));
            EXIT_SHOJI_ERROR
        }
        Err(Failure::Sandbox(e)) => {
            let mut msg = one_line(&e);
            if let Err(why) = &stopped {
                msg.push_str(&format!(" (VM: {why})"));
            }
            eprintln!("shoji: error: {msg}");
            let tail = console_tail(&dir.path().join(shoji_sandbox::CONSOLE_LOG), 20);
            if !tail.is_empty() {
                eprintln!("shoji: the guest console's last lines:\n{tail}");
            }
            EXIT_SHOJI_ERROR
        }
    };
    drop(dir);
    Ok(code)
}

/// Why a session ended without the command's status.
pub(crate) enum Failure {
    Timeout,
    /// Interrupted (by SIGINT, SIGTERM, SIGHUP) before the command started.
    Signal(i32),
    /// The command could not be started: 127 when it was not found, 126 when it could not be
    /// executed (Docker's statuses), else 125.
    Command(anyhow::Error, u8),
    /// The guest or its agent failed: the console's last lines tell more.
    Sandbox(anyhow::Error),
    Error(anyhow::Error),
}

/// The failure of creating or starting the command: its exit status is the one the sandbox
/// error carries (127 not found, 126 not executable: the agent says which, typed), else 125.
pub(crate) fn command_failure(e: SandboxError) -> Failure {
    match e {
        SandboxError::Agent(_) | SandboxError::Stopped(_) | SandboxError::Vm(_) => Failure::Sandbox(anyhow!(e)),
        e => {
            let code = e.exit_status().unwrap_or(EXIT_SHOJI_ERROR);
            Failure::Command(anyhow!("container: {e}"), code)
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

pub(crate) struct Signals {
    pub stop: StopSignals,
    winch: tokio::signal::unix::Signal,
}

/// SIGINT, SIGTERM, SIGHUP: forwarded to the command once it runs, the end before.
pub(crate) struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> Result<Signals> {
        let s = |k: SignalKind| signal(k).context("installing signal handlers");
        Ok(Signals {
            stop: StopSignals {
                int: s(SignalKind::interrupt())?,
                term: s(SignalKind::terminate())?,
                hup: s(SignalKind::hangup())?,
            },
            winch: s(SignalKind::window_change())?,
        })
    }
}

impl StopSignals {
    /// The next SIGINT, SIGTERM or SIGHUP.
    pub async fn stop(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// A deadline that never comes when there is none.
pub(crate) async fn deadline(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The agent's storages, devices and spec for the plan. `--device`s are in the spec as a node
/// and an allow rule each, by the host's numbers (the agent rewrites both to the guest's); their
/// agent [`Device`]s, which need the PCI path, are added once they are plugged
/// ([`start_command`]).
pub(crate) fn create_request(
    p: &Plan,
    builtin: bool,
    console_size: Option<(u16, u16)>,
    at: &Placement,
) -> Result<ContainerSpec> {
    // An image's root is an overlay (tmpfs upper) over the cached, shared image: writable, and
    // mount points that a `FROM scratch` image lacks can be made.
    let overlay = p.rootfs == Rootfs::Image;
    let mut storages = if overlay {
        image::rootfs_storages(at, ROOTFS_TAG, GUEST_ROOTFS)
    } else {
        vec![at.share_storage(ROOTFS_TAG, GUEST_ROOTFS, builtin)]
    };
    let mut binds = Vec::new();
    for (s, name) in &p.shares {
        let mount = model::guest_share_dir(&s.tag);
        storages.push(at.share_storage(&s.tag, &mount, s.read_only));
        binds.push(spec::Bind { source: mount, destination: format!("/mnt/{name}"), read_only: s.read_only });
    }
    let mut devices = Vec::new();
    let mut spec_devices = Vec::new();
    for (i, _) in p.disks.iter().enumerate() {
        let path = disk_path(i);
        // Where the sandbox put the disk: its slot in a cold boot, hot-plugged after a restore.
        let slot = at.disk_path(i).ok_or_else(|| anyhow!("disk {i}: not in the sandbox"))?;
        devices.push(Device {
            id: slot.to_string(),
            type_: "blk".into(),
            container_path: path.clone(),
            ..Default::default()
        });
        spec_devices.push(spec::Device { path, major: 0, minor: i as i64, access: "rwm".into() });
    }
    for d in &p.devices {
        spec_devices.push(spec::Device {
            path: d.container.clone(),
            major: d.major,
            minor: d.minor,
            access: d.perms.clone(),
        });
    }
    let env = spec::environment(&p.env, p.tty);
    let spec = spec::build(&spec::Input {
        args: &p.command,
        env: &env,
        cwd: &p.workdir,
        terminal: p.tty,
        console_size,
        root: GUEST_ROOTFS,
        readonly_root: builtin && !overlay,
        scratch_tmpfs: builtin,
        binds: &binds,
        devices: &spec_devices,
        seccomp: if p.seccomp { Some(seccomp::default_profile()?) } else { None },
    })?;
    Ok(ContainerSpec {
        id: CONTAINER_ID.into(),
        storages,
        devices,
        spec_json: serde_json::to_vec(&spec).context("spec")?,
        rootfs: GUEST_ROOTFS.into(),
        terminal: p.tty,
    })
}

/// Boots to a running command, forwards its stdio and signals, returns its exit status.
async fn session(p: &Plan, builtin: bool, vm: &Sandbox, mut sig: Signals) -> Result<u8, Failure> {
    let until = p.timeout.map(|t| tokio::time::Instant::now() + t);
    // Raw mode only when the host's stdin is the container's keyboard.
    let stdin_fd = std::io::stdin().as_raw_fd();
    let stdout_fd = std::io::stdout().as_raw_fd();
    let size_fd = if tty::is_tty(stdout_fd) { stdout_fd } else { stdin_fd };
    let console_size = if p.tty { tty::window_size(size_fd) } else { None };
    let req = create_request(p, builtin, console_size, vm.placement())?;

    // Up to a started command: any of these ends it.
    let (session, process) = tokio::select! {
        r = start_command(vm, req, format!("shoji-run-{}", std::process::id()), &p.devices, p.net) => r?,
        s = sig.stop.stop() => return Err(Failure::Signal(s)),
        why = vm.stopped() => return Err(Failure::Sandbox(anyhow!("sandbox: {why} before the command started"))),
        _ = deadline(until) => return Err(Failure::Timeout),
    };

    let (session, process, _net) = (session, process.0, process.1);
    let io = Io { interactive: p.interactive, tty: p.tty };
    let result = running(&io, &process, Some(vm), &mut sig, until).await;
    destroy(&session, vm).await;
    result
}

/// The session and the container, up to a running command, with `host_devices` hot-plugged
/// between CreateSandbox and CreateContainer (the path the shim takes): each gets the next free
/// PCI slot, and the container a blk [`Device`] naming it, which the agent finds after a rescan.
/// They are unplugged when the VM stops, with the sandbox.
pub(crate) async fn start_command(
    vm: &Sandbox,
    mut container: ContainerSpec,
    sandbox_id: String,
    host_devices: &[device::HostDevice],
    net_mode: net::NetMode,
) -> Result<(Session, (Process, Option<net::UserNet>)), Failure> {
    let cfg = SessionConfig { sandbox_id, hostname: spec::HOSTNAME.into(), ..Default::default() };
    let session = Session::create(vm, cfg).await.map_err(|e| Failure::Sandbox(anyhow!(e)))?;
    let hotplug = Hotplug::new();
    let user_net = match net_mode {
        net::NetMode::None => None,
        net::NetMode::User => {
            let (user_net, cfg) = net::UserNet::start().map_err(Failure::Error)?;
            let at = hotplug.plug_net(vm, cfg).await.map_err(|e| match e {
                e @ (SandboxError::Stopped(_) | SandboxError::Agent(_)) => Failure::Sandbox(anyhow!(e)),
                e => Failure::Error(anyhow!("--net user: {e}")),
            })?;
            Some((user_net, at))
        }
    };
    for d in host_devices {
        let at = hotplug.plug_disk(vm, d.disk()).await.map_err(|e| match e {
            e @ (SandboxError::Stopped(_) | SandboxError::Agent(_)) => Failure::Sandbox(anyhow!(e)),
            e => Failure::Error(anyhow!("device: {}: {e}", d.host.display())),
        })?;
        tracing::debug!("device {}: plugged at PCI path {at}", d.host.display());
        container.devices.push(Device {
            id: at.to_string(),
            type_: "blk".into(),
            container_path: d.container.clone(),
            ..Default::default()
        });
    }
    // No plug or unplug while the agent rescans for this container's devices.
    let id = container.id.clone();
    let process = {
        let _plugs = hotplug.lock().await;
        session.create_container(container).await.map_err(command_failure)?
    };
    // The interface is up before the command runs.
    if let Some((_, at)) = &user_net {
        let req = net::UserNet::update_request(&id, at);
        session.update_network(req).await.map_err(|e| match e {
            e @ (SandboxError::Stopped(_) | SandboxError::Agent(_)) => Failure::Sandbox(anyhow!(e)),
            e => Failure::Error(anyhow!("--net user: {e}")),
        })?;
    }
    process.start().await.map_err(command_failure)?;
    Ok((session, (process, user_net.map(|(n, _)| n))))
}

/// Whatever happened, the agent cleans up the guest (unless the VM is gone).
pub(crate) async fn destroy(session: &Session, vm: &Sandbox) {
    tokio::select! {
        r = session.destroy(Duration::from_secs(30)) => if let Err(e) = r { tracing::warn!("{e}") },
        _ = vm.stopped() => {}
    }
}

/// Resolves when the VM stopped; never without one (`shoji exec`: the VM is another
/// process's, and a lost agent connection ends the RPCs instead).
pub(crate) async fn vm_stopped(vm: Option<&Sandbox>) -> String {
    match vm {
        Some(vm) => vm.stopped().await,
        None => std::future::pending().await,
    }
}

/// How `running` forwards a process's stdio.
pub(crate) struct Io {
    pub interactive: bool,
    pub tty: bool,
}

/// Forwards stdio and signals until the command has exited and its output has ended.
pub(crate) async fn running(
    p: &Io,
    process: &Process,
    vm: Option<&Sandbox>,
    sig: &mut Signals,
    until: Option<tokio::time::Instant>,
) -> Result<u8, Failure> {
    let raw = if p.tty && p.interactive {
        Some(tty::RawMode::enter(std::io::stdin().as_raw_fd()).map_err(|e| anyhow!("tty: raw mode: {e}"))?)
    } else {
        None
    };
    let (o, e) = (process.clone(), process.clone());
    let out = tokio::spawn(async move { o.copy_output(Stream::Stdout, std::io::stdout()).await });
    let err = tokio::spawn(async move { e.copy_output(Stream::Stderr, std::io::stderr()).await });
    if p.interactive {
        tokio::spawn(forward_stdin(process.clone()));
    } else if !p.tty {
        // No -i: the command reads end of file at once. (A terminal with no -i stays open:
        // closing it would send ^D, as docker run -t keeps it.)
        if let Err(e) = process.close_stdin().await {
            tracing::debug!("{e}");
        }
    }
    let waiter = process.clone();
    let mut wait = tokio::spawn(async move { waiter.wait().await });
    let mut interrupts = 0;
    let status = loop {
        tokio::select! {
            r = &mut wait => {
                let r = r.map_err(|e| anyhow!("waiting: {e}"))?;
                break r.map_err(|e| anyhow!("container: waiting: {e}"))?;
            }
            s = sig.stop.stop() => {
                // Forwarded; the third ^C kills.
                interrupts += usize::from(s == libc::SIGINT);
                let signal = if interrupts >= 3 { libc::SIGKILL } else { s } as u32;
                if let Err(e) = process.signal(signal, false).await {
                    tracing::debug!("signal {signal}: {e}");
                }
            }
            _ = sig.winch.recv(), if p.tty => {
                if let Some((row, column)) = tty::window_size(std::io::stdout().as_raw_fd())
                    .or_else(|| tty::window_size(std::io::stdin().as_raw_fd()))
                {
                    if let Err(e) = process.resize(row.into(), column.into()).await {
                        tracing::debug!("{e}");
                    }
                }
            }
            why = vm_stopped(vm) => return Err(Failure::Sandbox(anyhow!("sandbox: {why} while the command ran"))),
            _ = deadline(until) => return Err(Failure::Timeout),
        }
    };
    // The command has exited; its output ends when the last writer is gone (the whole PID
    // namespace ends with it): copy everything up to there.
    let drained = async {
        for (name, task) in [("stdout", out), ("stderr", err)] {
            task.await.map_err(|e| anyhow!("{name}: {e}"))?.map_err(|e| anyhow!("{name}: {e}"))?;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = drained => r?,
        why = vm_stopped(vm) => return Err(Failure::Sandbox(anyhow!("sandbox: {why} while the output was read"))),
        _ = deadline(until) => return Err(Failure::Timeout),
    }
    drop(raw);
    Ok(u8::try_from(status.status).unwrap_or(u8::MAX))
}

/// Forwards our stdin to the command's; CloseStdin at our end of file. A thread reads (stdin
/// cannot be polled in general); it is left blocked in read(2) when the command ends first.
async fn forward_stdin(process: Process) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let reader = std::thread::Builder::new().name("shoji-stdin".into()).spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match std::io::Read::read(&mut std::io::stdin().lock(), &mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    if let Err(e) = reader {
        tracing::warn!("stdin: cannot start its reader: {e}");
        return;
    }
    while let Some(data) = rx.recv().await {
        if let Err(e) = process.write_stdin(data).await {
            // The command closed its stdin or ended: nothing more to forward.
            tracing::debug!("{e}");
            return;
        }
    }
    if let Err(e) = process.close_stdin().await {
        tracing::debug!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> std::result::Result<RunArgs, clap::Error> {
        let mut v = vec!["shoji", "run"];
        v.extend_from_slice(args);
        match crate::Cli::try_parse_from(v)?.cmd {
            crate::Cmd::Run(r) => Ok(r),
            _ => unreachable!("not run"),
        }
    }

    #[test]
    fn flags_parse_and_the_command_comes_after_the_dashes() {
        let r = parse(&["-e", "A=1", "-w", "/tmp", "--cpus", "2", "-it", "--", "sh", "-c", "exit 3"]).unwrap();
        assert_eq!(r.command, ["sh", "-c", "exit 3"]);
        assert_eq!((r.cpus, r.memory, r.interactive, r.tty), (2, 256, true, true));
        assert_eq!(r.env, ["A=1"]);
        assert_eq!(r.workdir.as_deref(), Some("/tmp"));
    }

    fn line(args: &[&str]) -> String {
        clap_error_line(&parse(args).map(drop).unwrap_err())
    }

    #[test]
    fn command_line_errors_are_one_line_naming_the_field() {
        assert!(line(&[]).starts_with("command: missing; usage: shoji run"), "{}", line(&[]));
        assert!(line(&["echo", "hi"]).starts_with("command: \"echo\" must come after `--`"), "{}", line(&["echo"]));
        assert_eq!(line(&["--bogus", "--", "true"]), "--bogus: unknown option (see `shoji run --help`)");
        let l = line(&["--cpus", "x", "--", "true"]);
        assert!(l.starts_with("--cpus: invalid value 'x'"), "{l}");
        let l = line(&["--memory", "-5", "--", "true"]);
        assert!(!l.contains('\n') && l.starts_with("--memory"), "{l}");
    }

    #[test]
    fn env_entries() {
        assert_eq!(parse_env("A=b=c").unwrap().as_deref(), Some("A=b=c"));
        assert_eq!(parse_env("A=").unwrap().as_deref(), Some("A="));
        assert!(parse_env("=x").unwrap_err().to_string().starts_with("env: "));
        std::env::set_var("SHOJI_RUN_TEST_ENV", "v");
        assert_eq!(parse_env("SHOJI_RUN_TEST_ENV").unwrap().as_deref(), Some("SHOJI_RUN_TEST_ENV=v"));
        assert_eq!(parse_env("SHOJI_RUN_TEST_UNSET_ENV").unwrap(), None);
    }

    #[test]
    fn shares_are_named_by_their_directory() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (s, name) = parse_share(&format!("{},ro", data.display()), 3).unwrap();
        assert_eq!((s.tag.as_str(), s.read_only, name.as_str()), ("share3", true, "data"));
        assert!(parse_share(&format!("{},x", data.display()), 0).unwrap_err().to_string().starts_with("share: "));
        assert!(parse_share("/", 0).unwrap_err().to_string().starts_with("share: /: has no name"));
        assert!(parse_share(",ro", 0).unwrap_err().to_string().starts_with("share: empty"));
    }

    /// Where a cold boot puts `p`'s disks and shares (the rootfs share first).
    fn cold(p: &Plan) -> Placement {
        let mut c = SandboxConfig::new("/nonexistent".into());
        c.disks = p.disks.clone();
        c.shares = vec![ShareConfig { dir: "/".into(), tag: ROOTFS_TAG.into(), read_only: true }];
        c.shares.extend(p.shares.iter().map(|(s, _)| s.clone()));
        Placement::cold(&c).unwrap()
    }

    #[test]
    fn create_request_mounts_rootfs_shares_and_disks() {
        let d = tempfile::tempdir().unwrap();
        let p = Plan {
            rootfs: Rootfs::BuiltIn,
            image: None,
            env: vec![],
            workdir: "/".into(),
            cpus: 1,
            memory_mib: 256,
            disks: vec![
                DiskConfig { path: "/x.img".into(), read_only: true },
                DiskConfig { path: "/y.img".into(), read_only: false },
            ],
            shares: vec![(ShareConfig { dir: d.path().into(), tag: "share0".into(), read_only: false }, "d".into())],
            interactive: false,
            tty: false,
            timeout: None,
            command: vec!["true".into()],
            seccomp: true,
            devices: vec![],
            net: net::NetMode::None,
        };
        let r = create_request(&p, true, None, &cold(&p)).unwrap();
        let st: Vec<_> =
            r.storages.iter().map(|s| (s.source.as_str(), s.mount_point.as_str(), s.options[0].as_str())).collect();
        assert_eq!(st, [("rootfs", GUEST_ROOTFS, "ro"), ("share0", "/run/shoji/share0", "rw")]);
        let dev: Vec<_> = r.devices.iter().map(|d| (d.id.as_str(), d.container_path.as_str())).collect();
        assert_eq!(dev, [("01", "/dev/vda"), ("02", "/dev/vdb")]);
        assert_eq!(r.rootfs, GUEST_ROOTFS);
        assert_eq!(GUEST_ROOTFS, model::guest_share_dir(ROOTFS_TAG));
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&r.spec_json).unwrap();
        assert!(spec.mounts().as_ref().unwrap().iter().any(|m| m.destination() == std::path::Path::new("/mnt/d")));

        // A --device: a node and a rule by the host's numbers, with its permissions; its agent
        // Device comes once it is plugged (the PCI path is the VMM's choice).
        let loop3 = device::HostDevice {
            host: "/dev/loop3".into(),
            container: "/dev/xvdz".into(),
            perms: "r".into(),
            major: 7,
            minor: 3,
        };
        let p = Plan { devices: vec![loop3], ..p };
        let r = create_request(&p, true, None, &cold(&p)).unwrap();
        assert_eq!(r.devices.len(), 2);
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&r.spec_json).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let node = linux.devices().as_ref().unwrap().last().unwrap();
        assert_eq!((node.path().to_str(), node.major(), node.minor()), (Some("/dev/xvdz"), 7, 3));
        let rule = linux.resources().as_ref().unwrap().devices().as_ref().unwrap().last().unwrap();
        assert_eq!(
            (rule.allow(), rule.major(), rule.minor(), rule.access().as_deref()),
            (true, Some(7), Some(3), Some("r"))
        );
    }

    #[test]
    fn device_flags_are_checked_before_anything_starts() {
        let err = |args: &[&str]| one_line(&plan(parse(args).unwrap()).unwrap_err());
        assert_eq!(
            err(&["--device", "/dev/null:/dev/x", "--", "true"]),
            "device: /dev/null: character devices cannot be passed into the sandbox"
        );
        assert!(err(&["--device", "/dev/sda:/dev/x:q", "--", "true"]).starts_with("device: "));
        let r = parse(&["--device", "/dev/loop0:/dev/xvdz:rw", "--device", "/dev/loop1", "--", "true"]).unwrap();
        assert_eq!(r.devices, ["/dev/loop0:/dev/xvdz:rw", "/dev/loop1"]);
    }
}
