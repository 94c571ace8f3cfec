//! The agent's one reaper of child processes.
//!
//! In the guest the agent is PID 1, so every orphan ends up as its child; on a host (tests) the
//! reaper makes the process a child subreaper (`PR_SET_CHILD_SUBREAPER`) so the same holds. One
//! thread blocks in `waitid(P_ALL, WEXITED | WNOWAIT)` until some child has exited, then reaps
//! every exited child with `waitpid(-1, WNOHANG)` and hands each status to the callback registered
//! for its pid. Statuses of unregistered pids (orphans) are dropped.
//!
//! The race between a fork and the registration of the new pid is closed by a lock: code that
//! creates children does so inside [`Reaper::with_registry`], and the reaper only reaps while
//! holding the same lock, so a child can never be reaped before its callback is in place.
//!
//! Consequence for the rest of the agent: never start processes with `std::process::Command` or
//! `tokio::process` (their own `waitpid(pid)` would race with `waitpid(-1)` here); fork inside
//! `with_registry` and register the pid.
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

impl WaitStatus {
    fn from_raw(status: libc::c_int) -> Self {
        if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        }
    }
}

/// Called once, on the reaper thread, with the pid's exit status. Keep it short and non-blocking.
pub type ExitCallback = Box<dyn FnOnce(WaitStatus) + Send>;

/// The pids whose exit someone waits for.
pub struct Registry {
    callbacks: HashMap<i32, ExitCallback>,
    generation: u64,
}

impl Registry {
    /// Registers `pid` (a child of this process, forked inside `with_registry`).
    pub fn register(&mut self, pid: i32, callback: ExitCallback) {
        self.callbacks.insert(pid, callback);
        self.generation = self.generation.wrapping_add(1);
    }
}

pub struct Reaper {
    registry: Mutex<Registry>,
    children: Condvar,
}

impl Reaper {
    /// The process-wide reaper, started on first use.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            // SAFETY: getpid has no preconditions.
            if unsafe { libc::getpid() } != 1 {
                // SAFETY: prctl with integer arguments; makes orphans of our children ours.
                if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                    tracing::warn!("PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
                }
            }
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                registry: Mutex::new(Registry { callbacks: HashMap::new(), generation: 0 }),
                children: Condvar::new(),
            }));
            if let Err(e) = std::thread::Builder::new().name("reaper".into()).spawn(move || reaper.run()) {
                // Without the thread nothing is ever reaped: there is no way to go on.
                panic!("cannot start the reaper thread: {e}");
            }
            reaper
        })
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the registry locked: fork children and register their pids in there.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = self.lock();
        let r = f(&mut reg);
        drop(reg);
        self.children.notify_all();
        r
    }

    fn run(&self) {
        loop {
            let generation = self.lock().generation;
            // SAFETY: an all-zero siginfo_t is a valid value to pass for the kernel to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid fills `info`; WNOWAIT leaves the child waitable.
            let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r != 0 {
                match super::sys::errno() {
                    libc::EINTR => {}
                    libc::ECHILD => {
                        // No children: sleep until someone registers a new one.
                        let mut reg = self.lock();
                        while reg.generation == generation {
                            reg = self.children.wait(reg).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    e => {
                        tracing::error!("reaper: waitid: {}", super::sys::errno_text(e));
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
                continue;
            }
            let mut done = Vec::new();
            {
                let mut reg = self.lock();
                loop {
                    let mut status = 0;
                    // SAFETY: waitpid writes the status into a local.
                    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                    if pid <= 0 {
                        break;
                    }
                    match reg.callbacks.remove(&pid) {
                        Some(cb) => done.push((cb, WaitStatus::from_raw(status))),
                        None => tracing::debug!("reaped orphan pid {pid}"),
                    }
                }
            }
            for (cb, status) in done {
                cb(status);
            }
        }
    }
}
