//! PID-1 duties: the filesystems every Linux userspace expects, stdio on the console, and a clean
//! power-off. Reaping container processes is the runtime's job; when the agent is not PID 1 it
//! makes itself a child subreaper so that orphans still come to it.
//!
//! Mounting takes a root directory so that the plan can be exercised below a temporary
//! directory (as root, in a private mount namespace) on a host.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libc::c_ulong;

use crate::sys;

/// One filesystem init mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedMount {
    pub source: &'static str,
    /// Absolute guest path.
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: c_ulong,
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// The mounts, in order: a mount's parent filesystem always comes before it.
pub const INIT_MOUNTS: &[PlannedMount] = &[
    PlannedMount { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
    PlannedMount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC, data: "" },
    PlannedMount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: libc::MS_NOSUID, data: "mode=0755" },
    PlannedMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "newinstance,ptmxmode=0666,mode=0620",
    },
    PlannedMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    PlannedMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
    PlannedMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    PlannedMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
];

/// Symlinks made in /dev once it is mounted: (link, target).
pub const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

/// The mounts init makes, in order.
pub fn planned_mounts() -> &'static [PlannedMount] {
    INIT_MOUNTS
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {fstype} at {target}: {err}")]
    Mount { fstype: &'static str, target: PathBuf, err: io::Error },
    #[error("creating {path}: {err}")]
    Create { path: PathBuf, err: io::Error },
    #[error("opening the console {path} for stdio: {err}")]
    Console { path: PathBuf, err: io::Error },
}

/// `target` below `root` (both absolute).
fn under(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

/// A directory on another filesystem than its parent's is a mount point.
fn is_mount_point(path: &Path) -> bool {
    match (std::fs::metadata(path), std::fs::metadata(path.join(".."))) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Mounts `mounts` below `root`, creating the targets; what is mounted already is left alone.
/// Carries on after a failure (PID 1 must not give up) and returns every failure.
pub fn mount_all(root: &Path, mounts: &[PlannedMount]) -> Vec<InitError> {
    let mut failures = Vec::new();
    for m in mounts {
        let target = under(root, m.target);
        if let Err(err) = std::fs::create_dir_all(&target) {
            failures.push(InitError::Create { path: target, err });
            continue;
        }
        if is_mount_point(&target) {
            tracing::debug!(target = %target.display(), "already mounted");
            continue;
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        if let Err(err) = sys::mount(Some(Path::new(m.source)), &target, Some(m.fstype), m.flags, data) {
            failures.push(InitError::Mount { fstype: m.fstype, target, err });
        }
    }
    failures
}

/// Makes the [`DEV_LINKS`] below `root` that do not exist yet.
pub fn make_dev_links(root: &Path) -> Vec<InitError> {
    let mut failures = Vec::new();
    for (link, target) in DEV_LINKS {
        let path = under(root, link);
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        if let Err(err) = std::os::unix::fs::symlink(target, &path) {
            failures.push(InitError::Create { path, err });
        }
    }
    failures
}

/// Everything PID 1 does before the agent serves: mounts, /dev links, stdio on /dev/console.
/// Returns the failures, to be logged once logging is up.
pub fn init_pid1(root: &Path) -> Vec<InitError> {
    let mut failures = mount_all(root, planned_mounts());
    failures.extend(make_dev_links(root));
    let console = under(root, "/dev/console");
    if let Err(err) = sys::redirect_stdio(&console) {
        failures.push(InitError::Console { path: console, err });
    }
    failures
}

/// For an agent that is not PID 1: orphaned descendants come to it rather than to init.
pub fn become_subreaper() -> io::Result<()> {
    sys::set_child_subreaper()
}

/// The end of PID 1: flush filesystems and reboot, which Shoji's VMM takes as "VM done". Never
/// returns: if the reboot is refused, PID 1 must still not exit (that panics the kernel).
pub fn power_off() -> ! {
    sys::sync();
    let err = sys::reboot();
    tracing::error!("reboot failed: {err}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// The kernel command-line parameter for how long the agent waits for a hot-plugged device to
/// appear or a removed one to go, in seconds (fractions allowed): `shoji.hotplug_timeout=10`.
/// A dotted parameter is a module parameter to the kernel, never passed to init: the agent reads
/// it from /proc/cmdline (as Kata's agent does `agent.hotplug_timeout`).
pub const HOTPLUG_TIMEOUT_PARAM: &str = "shoji.hotplug_timeout";
/// Longer than this is a typo, not a wish.
pub const MAX_HOTPLUG_TIMEOUT: Duration = Duration::from_secs(3600);

/// A hot-plug timeout in seconds: above zero, at most [`MAX_HOTPLUG_TIMEOUT`].
pub fn parse_hotplug_timeout(secs: &str) -> Result<Duration, String> {
    let bad = || format!("{secs:?} is not a number of seconds above 0 and at most {}", MAX_HOTPLUG_TIMEOUT.as_secs());
    let n: f64 = secs.trim().parse().map_err(|_| bad())?;
    let d = Duration::try_from_secs_f64(n).map_err(|_| bad())?;
    if d.is_zero() || d > MAX_HOTPLUG_TIMEOUT {
        return Err(bad());
    }
    Ok(d)
}

/// [`HOTPLUG_TIMEOUT_PARAM`] from a kernel command line (the text of /proc/cmdline): `None`
/// when it is not there; the last one counts, as with the kernel's own parameters.
pub fn hotplug_timeout_from_cmdline(cmdline: &str) -> Result<Option<Duration>, String> {
    let value = cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('=').filter(|(k, _)| *k == HOTPLUG_TIMEOUT_PARAM).map(|(_, v)| v))
        .next_back();
    value.map(|v| parse_hotplug_timeout(v).map_err(|e| format!("{HOTPLUG_TIMEOUT_PARAM}: {e}"))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_what_userspace_expects() {
        let targets: Vec<&str> = planned_mounts().iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/sys/fs/cgroup", "/run", "/tmp"]);
        let fstype = |t: &str| planned_mounts().iter().find(|m| m.target == t).unwrap().fstype;
        assert_eq!(fstype("/proc"), "proc");
        assert_eq!(fstype("/sys"), "sysfs");
        assert_eq!(fstype("/dev"), "devtmpfs");
        assert_eq!(fstype("/dev/pts"), "devpts");
        assert_eq!(fstype("/dev/shm"), "tmpfs");
        assert_eq!(fstype("/sys/fs/cgroup"), "cgroup2");
        assert_eq!(fstype("/run"), "tmpfs");
        assert_eq!(fstype("/tmp"), "tmpfs");
    }

    #[test]
    fn parents_are_mounted_before_children_and_nothing_twice() {
        let mounts = planned_mounts();
        for (i, m) in mounts.iter().enumerate() {
            for later in &mounts[i + 1..] {
                assert_ne!(m.target, later.target);
                assert!(!m.target.starts_with(&format!("{}/", later.target)), "{} before {}", m.target, later.target);
            }
            assert!(m.target.starts_with('/'));
            // Nothing executable or set-uid comes from the pseudo filesystems.
            assert!(m.flags & libc::MS_NOSUID != 0, "{}", m.target);
        }
    }

    #[test]
    fn dev_links_are_made_once() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dev")).unwrap();
        assert!(make_dev_links(root.path()).is_empty());
        assert_eq!(std::fs::read_link(root.path().join("dev/fd")).unwrap(), Path::new("/proc/self/fd"));
        assert!(make_dev_links(root.path()).is_empty(), "existing links are kept");
    }

    #[test]
    fn mount_points_are_recognised() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
        assert!(!is_mount_point(&dir.path().join("missing")));
    }

    #[test]
    fn hotplug_timeout_on_the_kernel_command_line() {
        let t = |c: &str| hotplug_timeout_from_cmdline(c);
        assert_eq!(t("console=ttyS0 acpi=off"), Ok(None));
        assert_eq!(t("console=ttyS0 shoji.hotplug_timeout=10 quiet"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(t("shoji.hotplug_timeout=0.5\n"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(t("shoji.hotplug_timeout=1 shoji.hotplug_timeout=2"), Ok(Some(Duration::from_secs(2))));
        // Other parameters that merely look alike are not it.
        assert_eq!(t("xshoji.hotplug_timeout=9 shoji.hotplug_timeout_ms=9 shoji.hotplug_timeout"), Ok(None));
        for bad in ["0", "-1", "abc", "", "3601", "inf", "NaN"] {
            let err = t(&format!("shoji.hotplug_timeout={bad}")).unwrap_err();
            assert!(err.starts_with("shoji.hotplug_timeout: "), "{err}");
        }
        assert_eq!(parse_hotplug_timeout("3600"), Ok(MAX_HOTPLUG_TIMEOUT));
    }
}
