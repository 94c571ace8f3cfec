//! Where shoji keeps what lives while it runs: the run dir (detached sandboxes' state,
//! `crate::detached::state`) and `shoji run` sessions on disk. Each `shoji run` keeps its sandbox's files (vsock socket,
//! console log) in a private directory under the sessions dir, named after its owner:
//! `<pid>-<start time>` (the start time in clock ticks since boot, field 22 of
//! /proc/PID/stat, so a reused pid is not taken for the owner). The owner removes it when it
//! ends; one killed first (SIGKILL, a crash) leaves it to the next `shoji` command, which
//! removes every directory whose owner is gone ([`sweep`]).
//!
//! The sessions dir is `.runs` in the run dir (a name no sandbox can have), so that tests that
//! set $SHOJI_RUN_DIR keep theirs apart; without $SHOJI_RUN_DIR a user other than root (who
//! cannot write /run/shoji) uses `$TMPDIR/shoji-runs-UID`.
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

const DEFAULT_RUN_DIR: &str = "/run/shoji/sandboxes";

/// The run dir: $SHOJI_RUN_DIR, or /run/shoji/sandboxes.
pub fn run_dir() -> PathBuf {
    std::env::var_os("SHOJI_RUN_DIR").filter(|d| !d.is_empty()).map_or_else(|| DEFAULT_RUN_DIR.into(), PathBuf::from)
}

/// A session directory that could not be made or used.
#[derive(Debug, thiserror::Error)]
#[error("state: {0}: {1}")]
pub struct SessionDirError(String, std::io::Error);

/// The sessions dir's name in the run dir.
pub const SESSIONS_DIR: &str = ".runs";

/// Where `shoji run` sessions live.
pub fn sessions_dir() -> PathBuf {
    let explicit = std::env::var_os("SHOJI_RUN_DIR").is_some_and(|d| !d.is_empty());
    let euid = euid();
    if explicit || euid == 0 {
        run_dir().join(SESSIONS_DIR)
    } else {
        std::env::temp_dir().join(format!("shoji-runs-{euid}"))
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// One `shoji run`'s private directory, removed when dropped.
#[derive(Debug)]
pub struct RunSession {
    path: PathBuf,
}

impl RunSession {
    /// Creates this process's session directory (one per process) under [`sessions_dir`].
    pub fn create() -> Result<RunSession, SessionDirError> {
        Self::create_in(&sessions_dir())
    }

    fn create_in(root: &Path) -> Result<RunSession, SessionDirError> {
        let io = |p: &Path, e| SessionDirError(p.display().to_string(), e);
        if let Some(parent) = root.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(|e| io(parent, e))?;
        }
        match shoji_sandbox::create_private_dir(root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(root, e)),
        }
        // Another user's (a shared $TMPDIR), a symlink or an open one is not ours to use.
        if !is_private_dir(root) {
            let why = std::io::Error::other("not a private directory of this user (0700, not a symlink)");
            return Err(io(root, why));
        }
        let pid = std::process::id();
        let start =
            owner_start(pid).ok_or_else(|| io(Path::new("/proc/self/stat"), std::io::Error::other("no start time")))?;
        let path = root.join(format!("{pid}-{start}"));
        shoji_sandbox::create_private_dir(&path).map_err(|e| io(&path, e))?;
        Ok(RunSession { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunSession {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            tracing::warn!("run session {}: {e}", self.path.display());
        }
    }
}

/// Whether `dir` is a real directory (not a symlink) of ours that no one else may enter.
fn is_private_dir(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == euid() && m.mode() & 0o077 == 0)
}

/// The start time of process `pid` while it runs (not a zombie): field 22 of /proc/PID/stat.
fn owner_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (the state), so field 22 is fields[19].
    match fields.first() {
        Some(&"Z" | &"X" | &"x") => None,
        _ => fields.get(19)?.parse().ok(),
    }
}

/// `<pid>-<start time>`.
fn parse_owner(name: &str) -> Option<(u32, u64)> {
    let (pid, start) = name.split_once('-')?;
    Some((pid.parse().ok().filter(|p| *p > 0)?, start.parse().ok()?))
}

/// Removes a session directory without following a symlink: a symlink is removed itself, and
/// `remove_dir_all` never follows one beneath. Gone already is fine (two sweeps at once).
fn remove(path: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Removes the session directories whose owner is gone (pid dead, a zombie, or reused by a
/// process with another start time). Cheap: one directory read and one /proc read per session.
pub fn sweep() {
    sweep_in(&sessions_dir());
}

fn sweep_in(root: &Path) {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!("run sessions: {}: {e}", root.display());
            return;
        }
    };
    if !is_private_dir(root) {
        tracing::warn!("run sessions: {}: not a private directory of this user; left alone", root.display());
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        // Anything not named by an owner is not a session: left alone.
        let Some((pid, start)) = name.to_str().and_then(parse_owner) else { continue };
        if owner_start(pid) == Some(start) {
            continue;
        }
        let path = entry.path();
        match remove(&path) {
            Ok(()) => tracing::info!("removed the run session {} (its shoji process is gone)", path.display()),
            Err(e) => tracing::warn!("run session {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_session_is_a_private_dir_named_by_its_owner_and_removed_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("run").join(SESSIONS_DIR);
        let s = RunSession::create_in(&root).unwrap();
        let path = s.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        let (pid, start) = parse_owner(path.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!((pid, Some(start)), (std::process::id(), owner_start(pid)));
        std::fs::write(path.join("console.log"), "x").unwrap();
        // A live owner's session survives a sweep.
        sweep_in(&root);
        assert!(path.exists());
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn a_shared_sessions_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("open");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = RunSession::create_in(&root).unwrap_err().to_string();
        assert!(e.contains("not a private directory"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(RunSession::create_in(&link).is_err());
    }

    #[test]
    fn sweeping_removes_sessions_whose_owner_is_gone_and_only_those() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join(SESSIONS_DIR);
        shoji_sandbox::create_private_dir(&root).unwrap();
        let me = std::process::id();
        let my_start = owner_start(me).unwrap();
        let mk = |name: &str| {
            let p = root.join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("vsock.sock"), "").unwrap();
            p
        };
        // Gone: an exited, reaped process.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let gone = c.id();
        c.wait().unwrap();
        let dead = mk(&format!("{gone}-1"));
        // A zombie (killed, not reaped) holds nothing.
        let mut z = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        let z_start = owner_start(z.id()).unwrap();
        let zombie = mk(&format!("{}-{z_start}", z.id()));
        z.kill().unwrap();
        while std::fs::read_to_string(format!("/proc/{}/stat", z.id())).is_ok_and(|s| !s.contains(") Z ")) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Our pid with another start time: a reused pid.
        let reused = mk(&format!("{me}-{}", my_start + 1));
        let live = mk(&format!("{me}-{my_start}"));
        let other = mk("not-a-session");
        // A planted symlink named like a session: removed, its target untouched.
        let target = d.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), "").unwrap();
        let link = root.join(format!("{gone}-2"));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        sweep_in(&root);
        z.wait().unwrap();
        for gone in [&dead, &zombie, &reused, &link] {
            assert!(std::fs::symlink_metadata(gone).is_err(), "{} swept", gone.display());
        }
        assert!(live.join("vsock.sock").exists() && other.exists());
        assert!(target.join("keep").exists(), "the symlink was not followed");
    }
}
