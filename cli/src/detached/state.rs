//! Detached sandboxes on disk: one directory per name under the run dir, holding `state.json`,
//! the Sandbox files (vsock socket, console log), the command's output log and the container's
//! process (for `shoji exec`). The directory's creation is the name's lock. `.runs` in the run
//! dir holds the `shoji run` sessions ([`crate::rundir`]).
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default run dir (the containerd shim uses /run/shoji/s/).
pub const STATE_FILE: &str = "state.json";
/// The command's stdout and stderr, in the order they came.
pub const OUTPUT_LOG: &str = "output.log";
/// The sandbox process's own log (its stderr: tracing, panics).
pub const SANDBOX_LOG: &str = "sandbox.log";
/// The container's OCI process, the base of `shoji exec`'s.
pub const PROCESS_FILE: &str = "process.json";
/// The hidden subcommand the sandbox process runs as (also how a live one is recognised).
pub const SANDBOX_CMD: &str = "__sandbox";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sandbox {0}: not found")]
    NotFound(String),
    #[error("name: {0} is already in use")]
    InUse(String),
    #[error("name: {0:?} is not a valid name (letters, digits and _.- , not first; at most 64)")]
    BadName(String),
    #[error("state: {0}: {1}")]
    Io(String, std::io::Error),
    #[error("state: {0}: {1}")]
    Corrupt(String, serde_json::Error),
}

/// Where a sandbox is in its life, as its process last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The directory exists; the sandbox process has not reported yet.
    Created,
    /// Booting and starting the command.
    Starting,
    Running,
    /// The command exited (`exit_code`) and the VM stopped.
    Exited,
    /// The VM or the agent failed while the command ran (`error`).
    Dead,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    /// The sandbox process (0 until it has started).
    pub pid: i32,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub command: Vec<String>,
    pub status: Status,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    /// The checked plan of `shoji run -d`, which the sandbox process boots from. (`None`: a
    /// state written by an older shoji, which saved its arguments instead; it cannot start.)
    #[serde(default)]
    pub plan: Option<crate::run::saved::SavedPlan>,
}

/// What `ps` shows: the recorded status, checked against the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Starting,
    Running,
    Exited(i32),
    /// Its process is gone without an exit status (a crash), or it recorded a failure.
    Dead,
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shown::Starting => write!(f, "starting"),
            Shown::Running => write!(f, "running"),
            Shown::Exited(c) => write!(f, "exited({c})"),
            Shown::Dead => write!(f, "dead"),
        }
    }
}

impl State {
    pub fn shown(&self) -> Shown {
        match self.status {
            Status::Exited => Shown::Exited(self.exit_code.unwrap_or(-1)),
            Status::Dead => Shown::Dead,
            _ if !self.alive() => Shown::Dead,
            Status::Created | Status::Starting => Shown::Starting,
            Status::Running => Shown::Running,
        }
    }

    /// Whether the sandbox process still runs (checked by its command line, so a reused pid
    /// is not taken for it).
    pub fn alive(&self) -> bool {
        self.pid > 0 && is_sandbox_process(self.pid, &self.name)
    }
}

pub use crate::rundir::run_dir;

pub fn dir_of(name: &str) -> PathBuf {
    run_dir().join(name)
}

/// Names are directory names and appear in the agent's ids: a conservative alphabet.
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.into()))
    }
}

/// Takes `name`: creates its directory, which fails when it exists.
pub fn claim(name: &str) -> Result<PathBuf, StateError> {
    claim_in(&run_dir(), name)
}

/// [`claim`] under `root`: the run dir is made 0700 when missing, the sandbox's directory always.
fn claim_in(root: &Path, name: &str) -> Result<PathBuf, StateError> {
    check_name(name)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| StateError::Io(root.display().to_string(), e))?;
    let dir = root.join(name);
    // Private: it holds the agent's socket and the logs.
    match shoji_sandbox::create_private_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StateError::InUse(name.into())),
        Err(e) => Err(StateError::Io(dir.display().to_string(), e)),
    }
}

/// A fresh adjective-noun name (a hex suffix when those are taken).
pub fn claim_generated() -> Result<(String, PathBuf), StateError> {
    const ADJ: &[&str] = &[
        "amber", "bold", "brisk", "calm", "clever", "eager", "fuzzy", "gentle", "happy", "keen", "lucid", "merry",
        "nimble", "quiet", "rapid", "sunny", "tidy", "vivid", "witty", "zesty",
    ];
    const NOUN: &[&str] = &[
        "badger", "crane", "falcon", "gecko", "heron", "ibis", "koala", "lynx", "marten", "newt", "otter", "panda",
        "quail", "raven", "sparrow", "tapir", "urchin", "vole", "wombat", "yak",
    ];
    for attempt in 0..64 {
        let r = random_u64();
        let mut name =
            format!("{}-{}", ADJ[(r % ADJ.len() as u64) as usize], NOUN[((r >> 8) % NOUN.len() as u64) as usize]);
        if attempt >= 8 {
            name.push_str(&format!("-{:04x}", (r >> 16) & 0xffff));
        }
        match claim(&name) {
            Ok(dir) => return Ok((name, dir)),
            Err(StateError::InUse(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StateError::InUse("every generated name".into()))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_ok() {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn load(name: &str) -> Result<State, StateError> {
    if check_name(name).is_err() {
        return Err(StateError::NotFound(name.into()));
    }
    let path = dir_of(name).join(STATE_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotFound(name.into())),
        Err(e) => return Err(StateError::Io(path.display().to_string(), e)),
    };
    serde_json::from_slice(&data).map_err(|e| StateError::Corrupt(path.display().to_string(), e))
}

/// Writes the state file whole (a temp file renamed over it), so readers never see half.
pub fn save(dir: &Path, st: &State) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!(".{STATE_FILE}.{}", std::process::id()));
    let io = |e| StateError::Io(path.display().to_string(), e);
    let data = serde_json::to_vec_pretty(st).map_err(|e| StateError::Corrupt(path.display().to_string(), e))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&data).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Every sandbox in the run dir, by name; unreadable ones are skipped with a warning.
pub fn list() -> Vec<State> {
    let Ok(entries) = std::fs::read_dir(run_dir()) else { return vec![] };
    // Dot names are no sandbox's (the `shoji run` sessions dir).
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| !n.starts_with('.')).collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| match load(&n) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        })
        .collect()
}

/// Whether `pid` is a `shoji __sandbox NAME` process.
fn is_sandbox_process(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == SANDBOX_CMD.as_bytes() && w[1] == name.as_bytes())
}

/// Waits until process `pid` has exited, at most `limit`: whether it has. A pidfd, so no
/// polling and no signal is needed (the process is not our child).
pub fn wait_exit(pid: i32, limit: Option<Duration>) -> std::io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(true) } else { Err(e) };
    }
    // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 };
    let ms = limit.map_or(-1, |l| l.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["x", "web-1", "a.b_c", "A9"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_state_without_its_process_is_dead_unless_it_exited() {
        let mut st = State {
            name: "n".into(),
            pid: i32::MAX,
            created: 0,
            command: vec!["true".into()],
            status: Status::Running,
            exit_code: None,
            error: None,
            plan: None,
        };
        assert_eq!(st.shown(), Shown::Dead);
        st.status = Status::Exited;
        st.exit_code = Some(3);
        assert_eq!(st.shown().to_string(), "exited(3)");
    }

    #[test]
    fn claimed_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("run");
        let dir = claim_in(&root, "private-one").unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(matches!(claim_in(&root, "private-one"), Err(StateError::InUse(_))));
    }

    #[test]
    fn waiting_for_a_gone_process_returns_at_once() {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert!(wait_exit(pid, None).unwrap());
    }
}
