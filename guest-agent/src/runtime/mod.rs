//! The container runtime interface the agent's RPC service drives. One implementation runs real
//! containers (namespaces, cgroups, pivot_root, seccomp); the service only maps RPCs onto it.
//!
//! Conventions: `exec_id` empty (or equal to the container id) means the container's init
//! process. Every method is safe to call concurrently from different tasks.
//!
//! The implementation is [`LinuxRuntime`] (no runc, no libcontainer, no C library):
//! * `child`: a process starts as a fork of the agent (stage 1: joins the cgroup and the
//!   namespaces given by path) that clones stage 2 into new namespaces; stage 2 sets up the root
//!   (mounts, devices, pivot_root), credentials, capabilities and seccomp, then execs. The
//!   children only make system calls on data the agent prepared (`spec`).
//! * `reaper`: the agent's one `waitpid(-1)` loop; exit statuses go to callbacks by pid.
//! * `cgroups`: cgroup v2 (the guest) and v1 (hybrid hosts, CI), limits, stats, OOM counts.
//! * `seccomp`: OCI profiles compiled to BPF in pure Rust; always enforced or an error.
//! * `stdio`: pipes or a pty from the container's own devpts, as async streams whose end is
//!   the kernel's end of file (no output is lost at exit).
use async_trait::async_trait;
use oci_spec::runtime::{LinuxResources, Process, Spec};

/// How a process ended, as the shim and `shoji run` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Like a shell's `$?`: the exit code, or 128 + N when killed by signal N.
    pub status: i32,
    pub signal: Option<i32>,
    /// The process was killed by the kernel's OOM killer (cgroup memory limit).
    pub oom_killed: bool,
}

/// Resource usage of a container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub cpu_usage_usec: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
}

/// What CreateContainer hands the runtime: the spec is already rewritten for the guest (devices,
/// `root.path` = the container's rootfs in the guest).
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    pub spec: Spec,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {0:?} not found")]
    NoContainer(String),
    #[error("process {exec_id:?} of container {id:?} not found")]
    NoProcess { id: String, exec_id: String },
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("process {exec_id:?} already exists in container {id:?}")]
    ProcessExists { id: String, exec_id: String },
    #[error("container {id:?} is {state}, cannot {action}")]
    BadState { id: String, state: String, action: String },
    /// The spec or process is unusable; `field` names the JSON field.
    #[error("{field}: {msg}")]
    InvalidSpec { field: String, msg: String },
    /// The user program could not be executed (`process.args[0]`): the kind travels to the
    /// host typed, where it becomes Docker's 127 or 126.
    #[error("process.args[0]: {msg}")]
    Exec { kind: ExecFailure, msg: String },
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Other(String),
}

/// Why execve(2) of the user program failed, as a shell sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFailure {
    /// ENOENT, ENOTDIR: no such program (a shell's 127).
    NotFound,
    /// EACCES, EPERM, ENOEXEC, EISDIR, ETXTBSY, ELOOP: it is there but cannot run (126).
    NotExecutable,
    Other,
}

impl ExecFailure {
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOENT | libc::ENOTDIR => ExecFailure::NotFound,
            libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR | libc::ETXTBSY | libc::ELOOP => {
                ExecFailure::NotExecutable
            }
            _ => ExecFailure::Other,
        }
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// Creates the container and its init process (stopped before exec of the user program);
    /// stdio pipes (or a pty when `process.terminal`) are set up and readable from now on.
    async fn create(&self, cfg: ContainerConfig) -> Result<()>;
    /// Lets the init process exec the user program.
    async fn start(&self, id: &str) -> Result<()>;
    /// Runs another process in the running container's namespaces and cgroup.
    async fn exec(&self, id: &str, exec_id: &str, process: Process) -> Result<()>;
    /// Sends `signal` to one process, or to every process of the container when `all`.
    async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()>;
    /// Waits until the process has exited and been reaped; may be called several times and
    /// before `start` (it then waits for start and exit).
    async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus>;
    /// Up to `max` bytes of output; an empty vector means end of stream (the process closed it
    /// and everything written before exit has been returned).
    async fn read_stdout(&self, id: &str, exec_id: &str, max: usize) -> Result<Vec<u8>>;
    async fn read_stderr(&self, id: &str, exec_id: &str, max: usize) -> Result<Vec<u8>>;
    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize>;
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()>;
    async fn resize_tty(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<()>;
    async fn stats(&self, id: &str) -> Result<Stats>;
    async fn update(&self, id: &str, resources: LinuxResources) -> Result<()>;
    async fn pids(&self, id: &str) -> Result<Vec<i32>>;
    /// The file of container `id`'s `kind` namespace ("net", "ipc", ...: its init's
    /// `/proc/<pid>/ns/<kind>`) while its init runs.
    async fn namespace(&self, id: &str, kind: &str) -> Result<std::path::PathBuf>;
    /// Kills what is left (SIGKILL after `timeout_secs` of SIGTERM; 0 = at once), waits for it,
    /// and removes every trace: cgroup, mounts made for it, state, pipes.
    async fn remove(&self, id: &str, timeout_secs: u32) -> Result<()>;
    /// The id of the next container that had a process OOM-killed (blocks until one does).
    async fn next_oom_event(&self) -> String;
}

mod cgroups;
mod child;
mod devices;
mod linux;
pub mod reaper;
mod seccomp;
mod spec;
/// Mount option parsing (OCI and containerd option lists), shared with the containerd shim.
pub use spec::{parse_mount_options, MountOptions};
mod stdio;
mod sys;
#[cfg(target_arch = "x86_64")]
mod syscalls_x86_64;

pub use linux::LinuxRuntime;
