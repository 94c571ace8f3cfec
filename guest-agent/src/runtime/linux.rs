//! `LinuxRuntime`: the `ContainerRuntime` that runs real containers (namespaces, cgroup v1 or v2,
//! pivot_root, seccomp) as children of the agent. See `child.rs` for how a process is started,
//! `reaper.rs` for how its exit is collected, `cgroups.rs` for limits and OOM accounting.
use super::cgroups::{self, Cgroup, Hierarchy};
use super::child::{self, Failure, Plan, SpawnError, StdioFds, Step, SyncPipes, Until};
use super::reaper::{ExitCallback, WaitStatus};
use super::spec::{self, HostInfo, NsKind};
use super::stdio::{self, Reader, Writer};
use super::{seccomp, sys};
use super::{ContainerConfig, ContainerRuntime, ExitStatus, Result, RuntimeError, Stats};
use async_trait::async_trait;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

/// How long `remove` keeps sending SIGKILL before it gives up on a container's processes.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// The container runtime of the agent.
///
/// * One instance per agent (tests may make several: they share the process-wide reaper).
/// * `state_dir` holds one directory per container (`state.json`, for debugging); it is removed
///   with the container.
/// * On a PVM host the guest kernel command line carries `GLIBC_TUNABLES=...` (glibc must not
///   pick AVX code paths there); the runtime adds that variable to the environment of every
///   container process whose spec does not set it.
pub struct LinuxRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    state_dir: PathBuf,
    no_pivot: AtomicBool,
    host: HostInfo,
    hierarchy: Hierarchy,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids whose create is in progress.
    reserved: Mutex<HashSet<String>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

/// Counts the OOM kills of one container's cgroup and reports each new one once.
struct OomTracker {
    id: String,
    cgroup: Arc<Cgroup>,
    reported: Mutex<u64>,
    tx: mpsc::UnboundedSender<String>,
}

impl OomTracker {
    fn check(&self) {
        let n = self.cgroup.oom_kills();
        let mut r = lock(&self.reported);
        if n > *r {
            *r = n;
            let _ = self.tx.send(self.id.clone());
        }
    }
}

struct Proc {
    pid: i32,
    pidfd: Option<OwnedFd>,
    stdin: Writer,
    stdout: Reader,
    stderr: Reader,
    tty: Option<Arc<AsyncFd<OwnedFd>>>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Proc {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

struct Container {
    id: String,
    cgroup: Arc<Cgroup>,
    /// Namespaces the container does not share with the agent (joined by exec).
    namespaces: Vec<NsKind>,
    seccomp: Option<Arc<seccomp::Program>>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    exec_lock: tokio::sync::Mutex<()>,
    /// (start pipe, report pipe) of an init that waits for start.
    start: Mutex<Option<(OwnedFd, OwnedFd)>>,
    started: AtomicBool,
    removing: AtomicBool,
    oom: Arc<OomTracker>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    state_path: PathBuf,
    /// The init's `args[0]` (for exec errors at start).
    arg0: String,
}

impl Container {
    fn state(&self) -> &'static str {
        if self.init.exited() {
            "stopped"
        } else if self.started.load(Ordering::SeqCst) {
            "running"
        } else {
            "created"
        }
    }

    fn is_init(&self, exec_id: &str) -> bool {
        exec_id.is_empty() || exec_id == self.id
    }

    fn proc(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if self.is_init(exec_id) {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| RuntimeError::NoProcess { id: self.id.clone(), exec_id: exec_id.into() })
    }

    fn all_procs(&self) -> Vec<Arc<Proc>> {
        let mut v = vec![self.init.clone()];
        v.extend(lock(&self.execs).values().cloned());
        v
    }

    fn bad_state(&self, action: &str) -> RuntimeError {
        RuntimeError::BadState { id: self.id.clone(), state: self.state().into(), action: action.into() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_err(what: impl Into<String>, err: std::io::Error) -> RuntimeError {
    RuntimeError::Io { what: what.into(), err }
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(spec::invalid("id", format!("{id:?} is not a container id (1-128 of A-Z a-z 0-9 _ . -)")))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| RuntimeError::Other(format!("runtime task failed: {e}")))?
}

/// The exit callback of a process: records its status (OOM kill included) on `tx`.
///
/// `kill_rest`: the cgroup of a container whose init this is, when the container has no PID
/// namespace of its own (a CRI pod's app container sharing the pod's). Its other processes would
/// outlive the init (reparented to the namespace's init, not killed by the kernel), keeping its
/// stdout/stderr open, so the exit, published once the output ends, would wait for them; they
/// are killed, as containerd's runc shim does (`runc kill --all` when the PID namespace is shared).
fn exit_callback(
    tx: watch::Sender<Option<ExitStatus>>,
    oom: Arc<OomTracker>,
    oom_before: u64,
    kill_rest: Option<Arc<Cgroup>>,
) -> ExitCallback {
    Box::new(move |ws| {
        if let Some(cgroup) = &kill_rest {
            if let Err(e) = cgroup.signal_all(libc::SIGKILL) {
                tracing::warn!("container {}: killing what its init left: {e}", oom.id);
            }
        }
        let (status, signal) = match ws {
            WaitStatus::Exited(c) => (c, None),
            WaitStatus::Signaled(s) => (128 + s, Some(s)),
        };
        // The OOM killer sends SIGKILL and counts the kill in the cgroup before the process is
        // gone: a SIGKILL death while the counter went up is an OOM kill.
        let oom_killed = signal == Some(libc::SIGKILL) && oom.cgroup.oom_kills() > oom_before;
        oom.check();
        tx.send_replace(Some(ExitStatus { status, signal, oom_killed }));
    })
}

/// The parent side of a process's stdio, before it is made async.
enum ParentStdio {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A terminal: the master comes from the child (`Spawned::tty`).
    Tty,
}

/// Stdio being set up: the parent side, the child-side fds (closed after the fork), what the
/// plan says, and the socket a pty master arrives on.
struct NewStdio {
    parent: ParentStdio,
    child_fds: Vec<OwnedFd>,
    plan: StdioFds,
    tty_sock: Option<OwnedFd>,
}

fn make_stdio(terminal: bool, size: (u16, u16)) -> Result<NewStdio> {
    if terminal {
        let (ours, theirs) = sys::socketpair().map_err(|e| io_err("creating the pty socket", e))?;
        let plan = StdioFds::Tty { sock: theirs.as_raw_fd(), rows: size.0, cols: size.1 };
        return Ok(NewStdio { parent: ParentStdio::Tty, child_fds: vec![theirs], plan, tty_sock: Some(ours) });
    }
    let p = |what| sys::pipe().map_err(|e| io_err(format!("creating the {what} pipe"), e));
    let (in_r, in_w) = p("stdin")?;
    let (out_r, out_w) = p("stdout")?;
    let (err_r, err_w) = p("stderr")?;
    let plan = StdioFds::Pipes { stdin: in_r.as_raw_fd(), stdout: out_w.as_raw_fd(), stderr: err_w.as_raw_fd() };
    Ok(NewStdio {
        parent: ParentStdio::Pipes { stdin: in_w, stdout: out_r, stderr: err_r },
        child_fds: vec![in_r, out_w, err_w],
        plan,
        tty_sock: None,
    })
}

/// Builds a `Proc` from what `spawn` returned (in the async context: registers the fds with it).
fn make_proc(spawned: child::Spawned, io: ParentStdio, exit: watch::Receiver<Option<ExitStatus>>) -> Result<Proc> {
    let child::Spawned { pid, pidfd, tty } = spawned;
    let a = |fd| stdio::async_fd(fd).map_err(|e| io_err("registering stdio with the runtime", e));
    Ok(match io {
        ParentStdio::Pipes { stdin, stdout, stderr } => Proc {
            pid,
            pidfd,
            stdin: Writer::new(Some(a(stdin)?), false),
            stdout: Reader::new(Some(a(stdout)?), false),
            stderr: Reader::new(Some(a(stderr)?), false),
            tty: None,
            exit,
        },
        ParentStdio::Tty => {
            let master = tty.ok_or_else(|| RuntimeError::Other("the terminal process sent no pty".into()))?;
            let m = a(master)?;
            Proc {
                pid,
                pidfd,
                stdin: Writer::new(Some(m.clone()), true),
                stdout: Reader::new(Some(m.clone()), true),
                stderr: Reader::new(None, true),
                tty: Some(m),
                exit,
            }
        }
    })
}

/// Context for turning a child's failure into an error.
struct FailureContext {
    id: String,
    exec_id: Option<String>,
    mounts: Vec<String>,
    /// linux.sysctl keys, sorted (the order they are written in).
    sysctls: Vec<String>,
    arg0: String,
    namespaces: Vec<usize>,
}

impl FailureContext {
    fn error(&self, e: SpawnError) -> RuntimeError {
        let who = match &self.exec_id {
            Some(x) => format!("process {x:?} of container {:?}", self.id),
            None => format!("container {:?}", self.id),
        };
        let f = match e {
            SpawnError::Other(m) => return RuntimeError::Other(format!("{who}: {m}")),
            SpawnError::Child(f) => f,
        };
        let Failure { step, index, errno } = f;
        let err = sys::errno_text(errno);
        let i = index as usize;
        let field = |name: String, what: &str| spec::invalid(name, format!("{what}: {err} ({who})"));
        match step {
            Step::MountTarget | Step::Mount | Step::Remount | Step::MountPropagation => {
                let dest = self.mounts.get(i).map(String::as_str).unwrap_or("?");
                let what = match step {
                    Step::MountTarget => "creating the mount point",
                    Step::Mount => "mount",
                    Step::Remount => "remount",
                    _ => "setting propagation",
                };
                field(format!("mounts[{i}]"), &format!("{what} of {dest}"))
            }
            Step::Setns if self.exec_id.is_none() => {
                let n = self.namespaces.get(i).copied().unwrap_or(i);
                field(format!("linux.namespaces[{n}].path"), "setns")
            }
            Step::Device => field(format!("linux.devices[{i}]"), "creating the device node"),
            Step::MaskPath => field(format!("linux.maskedPaths[{i}]"), "masking"),
            Step::ReadonlyPath => field(format!("linux.readonlyPaths[{i}]"), "making read-only"),
            Step::ReadonlyRoot => field("root.readonly".into(), "remounting the root read-only"),
            Step::Sysctl => {
                let key = self.sysctls.get(i).map(String::as_str).unwrap_or("?");
                field(format!("linux.sysctl.{key}"), "writing the sysctl")
            }
            Step::OomScoreAdj => field("process.oomScoreAdj".into(), "writing oom_score_adj"),
            Step::Hostname => field("hostname".into(), "sethostname"),
            Step::Domainname => field("domainname".into(), "setdomainname"),
            Step::Chdir => field("process.cwd".into(), "chdir"),
            Step::Rlimit => field(format!("process.rlimits[{i}]"), "setrlimit"),
            Step::Seccomp => field("linux.seccomp".into(), "loading the seccomp filter"),
            Step::Groups => field("process.user.additionalGids".into(), "setgroups"),
            Step::Gid => field("process.user.gid".into(), "setgid"),
            Step::Uid => field("process.user.uid".into(), "setuid"),
            Step::Bounding | Step::Caps | Step::Ambient => field("process.capabilities".into(), "setting capabilities"),
            Step::NoNewPrivs => field("process.noNewPrivileges".into(), "prctl"),
            Step::Console => field(
                "process.terminal".into(),
                "setting up a pty from the container's /dev/ptmx (a devpts mount at /dev/pts is needed)",
            ),
            Step::Exec => {
                let kind = super::ExecFailure::from_errno(errno);
                let msg = if kind == super::ExecFailure::NotFound {
                    format!("{:?}: executable not found (in $PATH or the rootfs)", self.arg0)
                } else {
                    format!("exec {:?}: {err}", self.arg0)
                };
                RuntimeError::Exec { kind, msg: format!("{msg} ({who})") }
            }
            s => RuntimeError::Other(format!("{who}: setting up the process failed at {s:?} (#{i}): {err}")),
        }
    }
}

/// What a successful create hands back to the async part.
struct Created {
    spawned: child::Spawned,
    io: ParentStdio,
    start: (OwnedFd, OwnedFd),
    cgroup: Arc<Cgroup>,
    oom: Arc<OomTracker>,
    exit_rx: watch::Receiver<Option<ExitStatus>>,
    namespaces: Vec<NsKind>,
    seccomp: Option<Arc<seccomp::Program>>,
    state_path: PathBuf,
    arg0: String,
}

/// Undoes a half-done create on drop.
struct CreateCleanup {
    state_path: Option<PathBuf>,
    cgroup: Option<Arc<Cgroup>>,
}

impl Drop for CreateCleanup {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.signal_all(libc::SIGKILL);
            if let Err(e) = cg.destroy() {
                tracing::warn!("cleaning up after a failed create: {e}");
            }
        }
        if let Some(p) = self.state_path.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Dropping the runtime kills every container it still has (SIGKILL) and removes their cgroups
/// and state in the background: nothing outlives the agent's runtime.
impl Drop for Inner {
    fn drop(&mut self) {
        let containers: Vec<Arc<Container>> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        if containers.is_empty() {
            return;
        }
        for c in &containers {
            if let Some(w) = lock(&c.watcher).take() {
                w.abort();
            }
            let _ = c.cgroup.signal_all(libc::SIGKILL);
            for p in c.all_procs() {
                if !p.exited() {
                    let _ = sys::send_signal(p.pid, p.pidfd.as_ref(), libc::SIGKILL);
                }
            }
        }
        let leftovers: Vec<(Arc<Cgroup>, PathBuf)> =
            containers.iter().map(|c| (c.cgroup.clone(), c.state_path.clone())).collect();
        let _ = std::thread::Builder::new().name("runtime-cleanup".into()).spawn(move || {
            for (cg, state) in leftovers {
                if let Err(e) = cg.destroy() {
                    tracing::warn!("runtime dropped: {e}");
                }
                let _ = std::fs::remove_dir_all(state);
            }
        });
    }
}

/// What `create` takes from a spec, checked before anything is created.
struct Checked<'a> {
    process: &'a Process,
    ns: spec::Namespaces,
    hostname: Option<std::ffi::CString>,
    domainname: Option<std::ffi::CString>,
    sysctls: Vec<(std::ffi::CString, std::ffi::CString)>,
    seccomp: Option<Arc<seccomp::Program>>,
    pplan: spec::ProcessPlan,
    rel: PathBuf,
    root: &'a oci_spec::runtime::Root,
}

fn check<'a>(spec: &'a Spec, id: &str, host: &HostInfo) -> Result<Checked<'a>> {
    let process = spec.process().as_ref().ok_or_else(|| spec::invalid("process", "is missing"))?;
    let ns = spec::namespaces(spec)?;
    for (field, v) in [("hostname", spec.hostname()), ("domainname", spec.domainname())] {
        if v.as_deref().is_some_and(|h| !h.is_empty()) && !ns.has_new(NsKind::Uts) {
            return Err(spec::invalid(field, "needs a new uts namespace in linux.namespaces"));
        }
    }
    let cstr_opt = |field: &str, v: &Option<String>| -> Result<Option<std::ffi::CString>> {
        match v.as_deref() {
            Some(s) if !s.is_empty() => {
                std::ffi::CString::new(s).map(Some).map_err(|_| spec::invalid(field, "contains a NUL byte"))
            }
            _ => Ok(None),
        }
    };
    let hostname = cstr_opt("hostname", spec.hostname())?;
    let domainname = cstr_opt("domainname", spec.domainname())?;
    let sysctls = spec::sysctls(spec)?;
    let linux = spec.linux().as_ref();
    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Some(Arc::new(seccomp::compile(s)?)),
        None => None,
    };
    let passwd = spec
        .root()
        .as_ref()
        .and_then(|r| spec::secure_join(r.path(), Path::new("/etc/passwd")).ok())
        .and_then(|p| std::fs::read_to_string(p).ok());
    let pplan = spec::process_plan(process, "process", host, passwd.as_deref())?;
    let rel = cgroups::relative_path(linux.and_then(|l| l.cgroups_path().as_deref()), id)?;
    // Checked before anything is created: the rootfs.
    let root = spec.root().as_ref().ok_or_else(|| spec::invalid("root", "is missing"))?;
    if !root.path().is_dir() {
        return Err(spec::invalid("root.path", format!("{} is not a directory", root.path().display())));
    }

    Ok(Checked { process, ns, hostname, domainname, sysctls, seccomp, pplan, rel, root })
}

impl Inner {
    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers).get(id).cloned().ok_or_else(|| RuntimeError::NoContainer(id.into()))
    }

    /// The file to open for a namespace to join: a `model::guest_container_ns` path names
    /// another container of this sandbox (a CRI pod's sandbox container), whose init must still
    /// run; any other path is taken as it is.
    fn namespace_file(&self, kind: NsKind, path: &Path, i: usize) -> Result<PathBuf> {
        let Some((id, name)) = path.to_str().and_then(shoji_devices::model::parse_guest_container_ns) else {
            return Ok(path.to_path_buf());
        };
        let bad =
            |why: String| spec::invalid(format!("linux.namespaces[{i}].path"), format!("{}: {why}", path.display()));
        if name != kind.proc_name() {
            return Err(bad(format!("names a {name} namespace, not {}", kind.proc_name())));
        }
        let c = self.container(id).map_err(|_| bad(format!("no container {id:?} in this sandbox")))?;
        if c.init.exited() {
            return Err(bad(format!("container {id:?} has exited")));
        }
        Ok(PathBuf::from(format!("/proc/{}/ns/{name}", c.init.pid)))
    }

    fn create_blocking(&self, cfg: ContainerConfig) -> Result<Created> {
        let ContainerConfig { id, spec } = cfg;
        let Checked { process, ns, hostname, domainname, sysctls, seccomp, pplan, rel, root } =
            check(&spec, &id, &self.host)?;
        let linux = spec.linux().as_ref();

        let mut cleanup = CreateCleanup { state_path: None, cgroup: None };
        let state_path = self.state_dir.join(&id);
        if state_path.exists() {
            // Left over from an agent that died: not a live container (those are in the map).
            let _ = std::fs::remove_dir_all(&state_path);
        }
        std::fs::create_dir_all(&state_path).map_err(|e| io_err(format!("creating {}", state_path.display()), e))?;
        cleanup.state_path = Some(state_path.clone());

        let cgroup = Arc::new(Cgroup::create(&self.hierarchy, &rel, linux.and_then(|l| l.resources().as_ref()))?);
        cleanup.cgroup = Some(cgroup.clone());

        let NewStdio { parent: io, mut child_fds, plan: stdio_fds, tty_sock } =
            make_stdio(pplan.terminal, pplan.console_size)?;
        let root_setup = spec::root_plan(
            &spec,
            &spec::RootInputs {
                ns: &ns,
                cgroup_dirs: cgroup.dirs(),
                cgroup_v2: cgroup.is_v2(),
                terminal: pplan.terminal,
                no_pivot: self.no_pivot.load(Ordering::Relaxed),
            },
        )?;
        let mut setns = Vec::new();
        for (kind, path, i) in &ns.join {
            let path = &self.namespace_file(*kind, path, *i)?;
            let fd = sys::open(path, libc::O_RDONLY).map_err(|e| {
                spec::invalid(format!("linux.namespaces[{i}].path"), format!("{}: {e}", path.display()))
            })?;
            setns.push((fd.as_raw_fd(), kind.flag()));
            child_fds.push(fd);
        }
        let procs = cgroup.open_procs()?;
        let join_cgroup = procs.iter().map(|f| f.as_raw_fd()).collect();
        child_fds.extend(procs);
        let pipes = SyncPipes::new().map_err(|e| io_err("creating sync pipes", e))?;
        let (start_r, start_w) = sys::pipe().map_err(|e| io_err("creating the start pipe", e))?;

        let ctx = FailureContext {
            id: id.clone(),
            exec_id: None,
            mounts: spec.mounts().iter().flatten().map(|m| m.destination().display().to_string()).collect(),
            sysctls: {
                let mut k: Vec<String> =
                    linux.and_then(|l| l.sysctl().as_ref()).into_iter().flatten().map(|(k, _)| k.clone()).collect();
                k.sort();
                k
            },
            arg0: process.args().as_ref().and_then(|a| a.first()).cloned().unwrap_or_default(),
            namespaces: ns.join.iter().map(|(_, _, i)| *i).collect(),
        };
        let plan = Plan {
            join_cgroup,
            setns,
            clone_flags: ns.clone_flags(),
            stdio: stdio_fds,
            report: pipes.report_w.as_raw_fd(),
            pid_pipe: pipes.pid_w.as_raw_fd(),
            start: Some(start_r.as_raw_fd()),
            root: Some(root_setup),
            chroot: None,
            hostname,
            domainname,
            sysctls,
            oom_score_adj: pplan.oom_score_adj,
            cwd: pplan.cwd,
            rlimits: pplan.rlimits,
            umask: pplan.umask,
            uid: pplan.uid,
            gid: pplan.gid,
            groups: pplan.groups,
            caps: pplan.caps,
            no_new_privs: pplan.no_new_privs,
            seccomp: seccomp.clone(),
            argv: pplan.argv,
            envp: pplan.envp,
            exec_paths: pplan.exec_paths,
        };
        child_fds.push(start_r);
        let report_r = pipes.report_r.try_clone().map_err(|e| io_err("dup", e))?;
        let oom = Arc::new(OomTracker {
            id: id.clone(),
            cgroup: cgroup.clone(),
            reported: Mutex::new(cgroup.oom_kills()),
            tx: self.oom_tx.clone(),
        });
        let (exit_tx, exit_rx) = watch::channel(None);
        let kill_rest = (!ns.has_new(NsKind::Pid)).then(|| cgroup.clone());
        let cb = exit_callback(exit_tx, oom.clone(), cgroup.oom_kills(), kill_rest);
        let spawned = child::spawn(&plan, pipes, child_fds, tty_sock, cb, Until::Ready).map_err(|e| ctx.error(e))?;

        let state = serde_json::json!({
            "id": id,
            "pid": spawned.pid,
            "rootfs": root.path(),
            "cgroup": cgroup.unique_dirs(),
        });
        if let Err(e) = std::fs::write(state_path.join("state.json"), state.to_string()) {
            tracing::warn!("container {id}: writing state.json: {e}");
        }
        cleanup.cgroup = None;
        cleanup.state_path = None;
        Ok(Created {
            spawned,
            io,
            start: (start_w, report_r),
            cgroup,
            oom,
            exit_rx,
            namespaces: ns.kinds(),
            seccomp,
            state_path,
            arg0: ctx.arg0,
        })
    }

    fn exec_blocking(
        &self,
        c: &Container,
        exec_id: &str,
        process: &Process,
        exit_tx: watch::Sender<Option<ExitStatus>>,
    ) -> Result<(child::Spawned, ParentStdio)> {
        let pid = c.init.pid;
        let proc_path = PathBuf::from(format!("/proc/{pid}"));
        let passwd = std::fs::read_to_string(proc_path.join("root/etc/passwd")).ok();
        let pplan = spec::process_plan(process, "process", &self.host, passwd.as_deref())?;
        let NewStdio { parent: io, mut child_fds, plan: stdio_fds, tty_sock } =
            make_stdio(pplan.terminal, pplan.console_size)?;
        let gone =
            |e: std::io::Error| RuntimeError::Other(format!("container {:?}: its init process is gone ({e})", c.id));
        let mut setns = Vec::new();
        for kind in &c.namespaces {
            let fd = sys::open(&proc_path.join("ns").join(kind.proc_name()), libc::O_RDONLY).map_err(gone)?;
            setns.push((fd.as_raw_fd(), kind.flag()));
            child_fds.push(fd);
        }
        let root = sys::open(&proc_path.join("root"), libc::O_PATH | libc::O_DIRECTORY).map_err(gone)?;
        let procs = c.cgroup.open_procs()?;
        let join_cgroup = procs.iter().map(|f| f.as_raw_fd()).collect();
        child_fds.extend(procs);
        let pipes = SyncPipes::new().map_err(|e| io_err("creating sync pipes", e))?;
        let plan = Plan {
            join_cgroup,
            setns,
            clone_flags: 0,
            stdio: stdio_fds,
            report: pipes.report_w.as_raw_fd(),
            pid_pipe: pipes.pid_w.as_raw_fd(),
            start: None,
            root: None,
            chroot: Some(root.as_raw_fd()),
            hostname: None,
            domainname: None,
            sysctls: Vec::new(),
            oom_score_adj: pplan.oom_score_adj,
            cwd: pplan.cwd,
            rlimits: pplan.rlimits,
            umask: pplan.umask,
            uid: pplan.uid,
            gid: pplan.gid,
            groups: pplan.groups,
            caps: pplan.caps,
            no_new_privs: pplan.no_new_privs,
            seccomp: c.seccomp.clone(),
            argv: pplan.argv,
            envp: pplan.envp,
            exec_paths: pplan.exec_paths,
        };
        child_fds.push(root);
        let ctx = FailureContext {
            id: c.id.clone(),
            exec_id: Some(exec_id.into()),
            mounts: Vec::new(),
            sysctls: Vec::new(),
            arg0: process.args().as_ref().and_then(|a| a.first()).cloned().unwrap_or_default(),
            namespaces: Vec::new(),
        };
        let cb = exit_callback(exit_tx, c.oom.clone(), c.cgroup.oom_kills(), None);
        let spawned = child::spawn(&plan, pipes, child_fds, tty_sock, cb, Until::Exec).map_err(|e| ctx.error(e))?;
        Ok((spawned, io))
    }
}

impl LinuxRuntime {
    /// A runtime keeping per-container state under `state_dir` (created if missing). Detects
    /// cgroup v2 or v1, reads the kernel command line for `GLIBC_TUNABLES`, and starts the
    /// process-wide reaper.
    pub fn new(state_dir: PathBuf) -> Result<Self> {
        let hierarchy = Hierarchy::detect().map_err(|e| io_err("detecting cgroups", e))?;
        Self::with_hierarchy(state_dir, hierarchy)
    }

    /// Like `new`, but puts containers in the cgroup2 hierarchy mounted at `cgroup2_mount`
    /// instead of detecting one (hybrid hosts, where cgroup2 sits at /sys/fs/cgroup/unified;
    /// used by tests to run the cgroup v2 code there). Limits need the controllers to be
    /// available in that hierarchy.
    pub fn with_cgroup2(state_dir: PathBuf, cgroup2_mount: &Path) -> Result<Self> {
        let hierarchy =
            Hierarchy::v2_at(cgroup2_mount).map_err(|e| io_err(format!("using {}", cgroup2_mount.display()), e))?;
        Self::with_hierarchy(state_dir, hierarchy)
    }

    fn with_hierarchy(state_dir: PathBuf, hierarchy: Hierarchy) -> Result<Self> {
        std::fs::create_dir_all(&state_dir).map_err(|e| io_err(format!("creating {}", state_dir.display()), e))?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let host =
            HostInfo { glibc_tunables: spec::glibc_tunables_from_cmdline(&cmdline), cap_last_cap: sys::cap_last_cap() };
        super::reaper::Reaper::global();
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Ok(LinuxRuntime {
            inner: Arc::new(Inner {
                state_dir,
                no_pivot: AtomicBool::new(false),
                host,
                hierarchy,
                containers: Mutex::new(HashMap::new()),
                reserved: Mutex::new(HashSet::new()),
                oom_tx,
                oom_rx: tokio::sync::Mutex::new(oom_rx),
            }),
        })
    }

    /// Enters new containers' root with `MS_MOVE` + `chroot` instead of `pivot_root`. That is
    /// what happens anyway when pivot_root is impossible (the agent's root is the initramfs);
    /// this forces it (tests, or hosts that forbid pivot_root). With chroot the old root's
    /// mounts stay in the container's mount namespace, out of reach only without
    /// CAP_SYS_CHROOT.
    pub fn set_no_pivot_root(&self, yes: bool) {
        self.inner.no_pivot.store(yes, Ordering::Relaxed);
    }

    /// Every check `create` makes on a spec before it touches the system, and the plan it
    /// computes (process, namespaces, seccomp, device rules, mounts and devices under
    /// `root.path`): an error naming the field, never a panic. For the fuzz targets; nothing
    /// is created.
    pub fn check_spec(spec: &Spec) -> Result<()> {
        let host = HostInfo { glibc_tunables: None, cap_last_cap: 40 };
        let c = check(spec, "check", &host)?;
        super::devices::rules(
            spec.linux().as_ref().and_then(|l| l.resources().as_ref()).and_then(|r| r.devices().as_deref()),
        )?;
        let cgroup_dirs = [(String::new(), PathBuf::from("/sys/fs/cgroup").join(&c.rel))];
        for cgroup_v2 in [true, false] {
            let inputs = spec::RootInputs {
                ns: &c.ns,
                cgroup_dirs: &cgroup_dirs,
                cgroup_v2,
                terminal: c.pplan.terminal,
                no_pivot: false,
            };
            spec::root_plan(spec, &inputs)?;
        }
        Ok(())
    }

    /// Whether containers get cgroup v2 (else v1).
    pub fn cgroup_v2(&self) -> bool {
        self.inner.hierarchy.is_v2()
    }

    /// The cgroup directories of a container (one for v2, one per used v1 hierarchy).
    pub fn cgroup_dirs(&self, id: &str) -> Result<Vec<PathBuf>> {
        let c = self.inner.container(id)?;
        Ok(c.cgroup.unique_dirs().into_iter().map(Path::to_path_buf).collect())
    }

    /// The pid (in the agent's pid namespace) of a process.
    pub fn pid(&self, id: &str, exec_id: &str) -> Result<i32> {
        Ok(self.inner.container(id)?.proc(exec_id)?.pid)
    }
}

/// Frees a reserved container id when create ends.
struct Reservation<'a> {
    inner: &'a Inner,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.inner.reserved).remove(&self.id);
    }
}

fn spawn_oom_watcher(cgroup: &Cgroup, oom: Arc<OomTracker>) -> Option<tokio::task::JoinHandle<()>> {
    let (fd, keep) = match cgroup.oom_notifier() {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("container {}: no OOM notifications ({e}); OOM kills are still seen at exit", oom.id);
            return None;
        }
    };
    let afd = match stdio::register(fd) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("container {}: OOM notifier: {e}", oom.id);
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let _keep = keep;
        loop {
            let Ok(mut g) = afd.readable().await else { break };
            sys::drain(afd.get_ref().as_raw_fd());
            g.clear_ready();
            // The notification can come before the kill is counted: look again shortly after.
            oom.check();
            tokio::time::sleep(Duration::from_millis(50)).await;
            oom.check();
            tokio::time::sleep(Duration::from_millis(450)).await;
            oom.check();
        }
    }))
}

/// Waits until every process in `procs` has exited, up to `limit`; returns whether they have.
async fn wait_all(procs: &[Arc<Proc>], limit: Duration) -> bool {
    let all = async {
        for p in procs {
            let mut rx = p.exit.clone();
            let _ = rx.wait_for(|s| s.is_some()).await;
        }
    };
    tokio::time::timeout(limit, all).await.is_ok()
}

#[async_trait]
impl ContainerRuntime for LinuxRuntime {
    async fn create(&self, cfg: ContainerConfig) -> Result<()> {
        check_id(&cfg.id)?;
        let id = cfg.id.clone();
        {
            let containers = lock(&self.inner.containers);
            let mut reserved = lock(&self.inner.reserved);
            if containers.contains_key(&id) || reserved.contains(&id) {
                return Err(RuntimeError::Exists(id));
            }
            reserved.insert(id.clone());
        }
        let _reservation = Reservation { inner: &self.inner, id: id.clone() };
        let inner = self.inner.clone();
        let created = blocking(move || inner.create_blocking(cfg)).await?;
        let Created { spawned, io, start, cgroup, oom, exit_rx, namespaces, seccomp, state_path, arg0 } = created;
        let init = match make_proc(spawned, io, exit_rx) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // Undo: the child is waiting for start; kill it and drop its cgroup.
                let _ = cgroup.signal_all(libc::SIGKILL);
                let cg = cgroup.clone();
                let _ = blocking(move || cg.destroy()).await;
                let _ = std::fs::remove_dir_all(&state_path);
                return Err(e);
            }
        };
        let watcher = spawn_oom_watcher(&cgroup, oom.clone());
        let c = Arc::new(Container {
            id: id.clone(),
            cgroup,
            namespaces,
            seccomp,
            init,
            execs: Mutex::new(HashMap::new()),
            exec_lock: tokio::sync::Mutex::new(()),
            start: Mutex::new(Some(start)),
            started: AtomicBool::new(false),
            removing: AtomicBool::new(false),
            oom,
            watcher: Mutex::new(watcher),
            state_path,
            arg0,
        });
        lock(&self.inner.containers).insert(id, c);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<()> {
        let c = self.inner.container(id)?;
        if c.removing.load(Ordering::SeqCst) || c.init.exited() {
            return Err(c.bad_state("start"));
        }
        let Some((start_w, report_r)) = lock(&c.start).take() else { return Err(c.bad_state("start")) };
        c.started.store(true, Ordering::SeqCst);
        let r = blocking(move || Ok(child::release(start_w, report_r))).await?;
        r.map_err(|e| {
            let ctx = FailureContext {
                id: id.into(),
                exec_id: None,
                mounts: Vec::new(),
                sysctls: Vec::new(),
                arg0: c.arg0.clone(),
                namespaces: Vec::new(),
            };
            ctx.error(e)
        })
    }

    async fn exec(&self, id: &str, exec_id: &str, process: Process) -> Result<()> {
        let c = self.inner.container(id)?;
        let _serial = c.exec_lock.lock().await;
        if c.is_init(exec_id) || lock(&c.execs).contains_key(exec_id) {
            return Err(RuntimeError::ProcessExists { id: id.into(), exec_id: exec_id.into() });
        }
        if c.state() != "running" || c.removing.load(Ordering::SeqCst) {
            return Err(c.bad_state("exec"));
        }
        let inner = self.inner.clone();
        let (c2, x) = (c.clone(), exec_id.to_string());
        let (exit_tx, mut rx) = watch::channel(None);
        let r = blocking(move || inner.exec_blocking(&c2, &x, &process, exit_tx)).await;
        let (spawned, io) = match r {
            Ok(x) => x,
            Err(e) => {
                // A process that failed before its exec is dying: let it be gone first.
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.is_some())).await;
                return Err(e);
            }
        };
        let p = make_proc(spawned, io, rx)?;
        lock(&c.execs).insert(exec_id.into(), Arc::new(p));
        Ok(())
    }

    async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        if !(0..=64).contains(&signal) {
            return Err(spec::invalid("signal", format!("{signal} is not a signal number")));
        }
        let c = self.inner.container(id)?;
        if all {
            c.cgroup.signal_all(signal).map_err(|e| io_err(format!("container {id:?}: signalling its cgroup"), e))?;
            if !c.init.exited() {
                let _ = sys::send_signal(c.init.pid, c.init.pidfd.as_ref(), signal);
            }
            return Ok(());
        }
        let p = c.proc(exec_id)?;
        if p.exited() {
            return Ok(());
        }
        match sys::send_signal(p.pid, p.pidfd.as_ref(), signal) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(io_err(format!("signal {signal} to process {exec_id:?} of container {id:?}"), e)),
        }
    }

    async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        let mut rx = p.exit.clone();
        let r = rx.wait_for(|s| s.is_some()).await;
        match r {
            Ok(s) => (*s).ok_or_else(|| RuntimeError::Other("exit status missing".into())),
            Err(_) => Err(RuntimeError::Other(format!("process {exec_id:?} of container {id:?}: exit status lost"))),
        }
    }

    async fn read_stdout(&self, id: &str, exec_id: &str, max: usize) -> Result<Vec<u8>> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        p.stdout.read(max).await.map_err(|e| io_err(format!("reading stdout of {exec_id:?} in {id:?}"), e))
    }

    async fn read_stderr(&self, id: &str, exec_id: &str, max: usize) -> Result<Vec<u8>> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        p.stderr.read(max).await.map_err(|e| io_err(format!("reading stderr of {exec_id:?} in {id:?}"), e))
    }

    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        p.stdin.write(data).await.map_err(|e| io_err(format!("writing stdin of {exec_id:?} in {id:?}"), e))
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        p.stdin.close().await.map_err(|e| io_err(format!("closing stdin of {exec_id:?} in {id:?}"), e))
    }

    async fn resize_tty(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<()> {
        let p = self.inner.container(id)?.proc(exec_id)?;
        let Some(t) = &p.tty else {
            return Err(RuntimeError::Other(format!("process {exec_id:?} of container {id:?} has no terminal")));
        };
        sys::set_winsize(t.get_ref().as_raw_fd(), rows, cols)
            .map_err(|e| io_err(format!("resizing the terminal of {exec_id:?} in {id:?}"), e))
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        let c = self.inner.container(id)?;
        blocking(move || Ok(c.cgroup.stats())).await
    }

    async fn update(&self, id: &str, resources: LinuxResources) -> Result<()> {
        let c = self.inner.container(id)?;
        if c.removing.load(Ordering::SeqCst) {
            return Err(c.bad_state("update"));
        }
        blocking(move || c.cgroup.apply(&resources)).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<i32>> {
        let c = self.inner.container(id)?;
        c.cgroup.pids().map_err(|e| io_err(format!("listing the processes of container {id:?}"), e))
    }

    async fn namespace(&self, id: &str, kind: &str) -> Result<PathBuf> {
        let c = self.inner.container(id)?;
        if c.init.exited() {
            return Err(RuntimeError::BadState { id: id.into(), state: "exited".into(), action: "join".into() });
        }
        Ok(PathBuf::from(format!("/proc/{}/ns/{kind}", c.init.pid)))
    }

    async fn remove(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let c = self.inner.container(id)?;
        if c.removing.swap(true, Ordering::SeqCst) {
            return Err(RuntimeError::BadState {
                id: id.into(),
                state: "being removed".into(),
                action: "remove".into(),
            });
        }
        // An init still waiting for start has nothing to shut down gracefully: it gets SIGKILL
        // below (its start pipe is closed only after that, so its status is 137, not 1).
        let procs = c.all_procs();
        let alive =
            |c: &Container| !c.cgroup.pids().unwrap_or_default().is_empty() || procs.iter().any(|p| !p.exited());
        if timeout_secs > 0 && c.started.load(Ordering::SeqCst) && alive(&c) {
            let _ = c.cgroup.signal_all(libc::SIGTERM);
            for p in &procs {
                if !p.exited() {
                    let _ = sys::send_signal(p.pid, p.pidfd.as_ref(), libc::SIGTERM);
                }
            }
            wait_all(&procs, Duration::from_secs(timeout_secs.into())).await;
        }
        let deadline = tokio::time::Instant::now() + KILL_DEADLINE;
        loop {
            let _ = c.cgroup.signal_all(libc::SIGKILL);
            for p in &procs {
                if !p.exited() {
                    let _ = sys::send_signal(p.pid, p.pidfd.as_ref(), libc::SIGKILL);
                }
            }
            let done = wait_all(&procs, Duration::from_millis(100)).await;
            if done && c.cgroup.pids().unwrap_or_default().is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                c.removing.store(false, Ordering::SeqCst);
                let left = c.cgroup.pids().unwrap_or_default();
                return Err(RuntimeError::Other(format!("container {id:?}: processes {left:?} survive SIGKILL")));
            }
        }
        lock(&c.start).take();
        if let Some(w) = lock(&c.watcher).take() {
            w.abort();
        }
        let cg = c.cgroup.clone();
        if let Err(e) = blocking(move || cg.destroy()).await {
            c.removing.store(false, Ordering::SeqCst);
            return Err(e);
        }
        if let Err(e) = std::fs::remove_dir_all(&c.state_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("container {id}: removing {}: {e}", c.state_path.display());
            }
        }
        lock(&self.inner.containers).remove(id);
        Ok(())
    }

    async fn next_oom_event(&self) -> String {
        let mut rx = self.inner.oom_rx.lock().await;
        // The sender lives in `inner`, so the channel never closes while `self` exists.
        rx.recv().await.unwrap_or_default()
    }
}
