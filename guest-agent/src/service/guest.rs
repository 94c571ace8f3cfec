//! GetGuestDetails: what the guest is (kernel, memory, CPUs, cgroup controllers).

use std::path::Path;

use shoji_protocol::agent::GuestDetailsResponse;

/// The agent's version, as Version and GetGuestDetails report it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Reads the details from `proc_root` ("/proc") and `sysfs_root` ("/sys"); what cannot be read
/// is left zero or empty (and logged), so the call itself does not fail.
pub fn guest_details(proc_root: &Path, sysfs_root: &Path) -> GuestDetailsResponse {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| tracing::debug!(path = %p.display(), "guest details: {e}"))
            .unwrap_or_default()
    };
    GuestDetailsResponse {
        agent_version: AGENT_VERSION.to_owned(),
        kernel_release: crate::sys::kernel_release().unwrap_or_default(),
        mem_total_bytes: mem_total_bytes(&read(&proc_root.join("meminfo"))).unwrap_or(0),
        online_cpus: count_cpu_list(read(&sysfs_root.join("devices/system/cpu/online")).trim()).unwrap_or(0),
        init_daemon: crate::sys::is_pid1(),
        cgroup_controllers: read(&sysfs_root.join("fs/cgroup/cgroup.controllers"))
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        ..Default::default()
    }
}

/// `MemTotal:  16318412 kB` from /proc/meminfo, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The number of CPUs in a kernel CPU list ("0-3,5,7-8" → 7).
pub fn count_cpu_list(list: &str) -> Option<u32> {
    if list.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for part in list.split(',') {
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
        n = n.checked_add(count)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_bytes(text), Some(16318412 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: x kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        for bad in ["", "a", "3-1", "0-", ","] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn details_from_fake_roots() {
        let dir = tempfile::tempdir().unwrap();
        let (proc_root, sys) = (dir.path().join("proc"), dir.path().join("sys"));
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::create_dir_all(sys.join("devices/system/cpu")).unwrap();
        std::fs::create_dir_all(sys.join("fs/cgroup")).unwrap();
        std::fs::write(proc_root.join("meminfo"), "MemTotal: 2048 kB\n").unwrap();
        std::fs::write(sys.join("devices/system/cpu/online"), "0-1\n").unwrap();
        std::fs::write(sys.join("fs/cgroup/cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let d = guest_details(&proc_root, &sys);
        assert_eq!(d.agent_version, AGENT_VERSION);
        assert_eq!((d.mem_total_bytes, d.online_cpus), (2048 * 1024, 2));
        assert_eq!(d.cgroup_controllers, ["cpuset", "cpu", "io", "memory", "pids"]);
        assert!(!d.kernel_release.is_empty());
        // Missing files leave fields empty rather than failing.
        let d = guest_details(&dir.path().join("none"), &dir.path().join("none"));
        assert_eq!((d.mem_total_bytes, d.online_cpus, d.cgroup_controllers.len()), (0, 0, 0));
    }
}
