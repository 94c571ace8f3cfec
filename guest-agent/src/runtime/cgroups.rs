//! Container cgroups on cgroup v2 (the guest: one cgroup2 mount at /sys/fs/cgroup) and on cgroup
//! v1 (hybrid or legacy hosts: one hierarchy per controller under /sys/fs/cgroup/<controller>).
//!
//! v1 uses the memory, pids, cpu, cpuacct and (when the spec sets cpus/mems) cpuset hierarchies;
//! other hierarchies are left alone. Limits the spec sets on a controller that is not there are an
//! error, never ignored. Device rules are a BPF program on v2 (`devices`); not applied (logged):
//! device rules on v1 (hosts, never the guest), blockIO, hugepage, network and rdma limits.
use super::devices;
use super::{Result, RuntimeError, Stats};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// v1 controllers every container joins (when mounted).
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct"];
/// v2 controllers always enabled for children of the container's ancestors (cpuset and others
/// only when the spec sets them).
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// Directories this process created (ancestors shared by containers included). Creation and
/// removal are serialised under this lock so that removing an empty ancestor cannot race with
/// another container creating a directory under it.
static TREE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// A cgroup2 mount: its mount point.
    V2(PathBuf),
    /// cgroup v1: (controllers of the mount, mount point) per hierarchy.
    V1(Vec<(Vec<String>, PathBuf)>),
}

impl Hierarchy {
    /// What this machine has at /sys/fs/cgroup.
    pub fn detect() -> io::Result<Hierarchy> {
        let root = Path::new("/sys/fs/cgroup");
        let c = super::sys::cstring(root)?;
        // SAFETY: an all-zero statfs is a valid buffer for the kernel to fill.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs on a NUL-terminated path into a local buffer.
        super::sys::cvt(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
        if st.f_type as i64 == CGROUP2_SUPER_MAGIC {
            return Ok(Hierarchy::V2(root.to_path_buf()));
        }
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mounts = parse_v1_mounts(&info);
        if mounts.is_empty() {
            return Err(io::Error::other(
                "no cgroup hierarchy is mounted (neither cgroup2 at /sys/fs/cgroup nor cgroup v1)",
            ));
        }
        Ok(Hierarchy::V1(mounts))
    }

    /// A cgroup2 mount at `mount` (e.g. /sys/fs/cgroup/unified on a hybrid host).
    pub fn v2_at(mount: &Path) -> io::Result<Hierarchy> {
        let c = super::sys::cstring(mount)?;
        // SAFETY: an all-zero statfs is a valid buffer for the kernel to fill.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs on a NUL-terminated path into a local buffer.
        super::sys::cvt(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
        if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
            return Err(io::Error::other(format!("{} is not a cgroup2 mount", mount.display())));
        }
        Ok(Hierarchy::V2(mount.to_path_buf()))
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Hierarchy::V2(_))
    }

    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        match self {
            Hierarchy::V2(_) => None,
            Hierarchy::V1(m) => m.iter().find(|(c, _)| c.iter().any(|x| x == controller)).map(|(_, p)| p.as_path()),
        }
    }
}

/// The cgroup v1 hierarchies in a mountinfo text: (controllers, mount point).
pub fn parse_v1_mounts(mountinfo: &str) -> Vec<(Vec<String>, PathBuf)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mut r = right.split(' ');
        if r.next() != Some("cgroup") {
            continue;
        }
        let opts = r.nth(1).unwrap_or("");
        let Some(mp) = left.split(' ').nth(4) else { continue };
        let ctrls: Vec<String> = opts
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains("relatime"))
            .map(String::from)
            .collect();
        out.push((ctrls, PathBuf::from(mp.replace("\\040", " "))));
    }
    out
}

/// Checks a `linux.cgroupsPath` and turns it into a path relative to the hierarchy root.
/// systemd-style `slice:prefix:name` paths (no systemd in the guest) are laid out as runc's
/// systemd driver lays them out, so that a pod's containers share the pod's slice:
/// `kubepods-burstable-pod1.slice:cri-containerd:c1` is
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c1.scope`.
pub fn relative_path(spec_path: Option<&Path>, id: &str) -> Result<PathBuf> {
    let default = PathBuf::from("shoji").join(id);
    let Some(p) = spec_path else { return Ok(default) };
    let s = p.to_string_lossy();
    if s.is_empty() {
        return Ok(default);
    }
    if !s.contains('/') && s.split(':').count() == 3 {
        return systemd_path(&s);
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            _ => {
                return Err(RuntimeError::InvalidSpec {
                    field: "linux.cgroupsPath".into(),
                    msg: format!("{s:?} must not contain \"..\""),
                })
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(RuntimeError::InvalidSpec {
            field: "linux.cgroupsPath".into(),
            msg: format!("{s:?} names the root cgroup"),
        });
    }
    Ok(rel)
}

/// `slice:prefix:name` as runc's systemd driver places it (see [`relative_path`]).
fn systemd_path(s: &str) -> Result<PathBuf> {
    let bad = |why: &str| RuntimeError::InvalidSpec { field: "linux.cgroupsPath".into(), msg: format!("{s:?}: {why}") };
    let mut parts = s.split(':');
    let (slice, prefix, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let ok = |w: &str| !w.contains('/') && w != "." && w != "..";
    if !ok(slice) || !ok(prefix) || !ok(name) || name.is_empty() {
        return Err(bad("a systemd path is slice:prefix:name, each a plain name and the name not empty"));
    }
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    let Some(stem) = slice.strip_suffix(".slice") else { return Err(bad("the slice must end in .slice")) };
    let mut rel = PathBuf::new();
    if stem != "-" {
        if stem.is_empty() || stem.split('-').any(str::is_empty) {
            return Err(bad("the slice's name has an empty part"));
        }
        // Each dash-separated prefix is a parent slice: a-b.slice lives in a.slice.
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            rel.push(format!("{acc}.slice"));
        }
    }
    if name.ends_with(".slice") {
        rel.push(name);
    } else if prefix.is_empty() {
        rel.push(format!("{name}.scope"));
    } else {
        rel.push(format!("{prefix}-{name}.scope"));
    }
    Ok(rel)
}

fn io_err(what: impl Into<String>, err: io::Error) -> RuntimeError {
    RuntimeError::Io { what: what.into(), err }
}

fn read_u64(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    if s == "max" {
        return Some(u64::MAX);
    }
    s.parse().ok()
}

/// `key value` lines (memory.events, cpu.stat, memory.oom_control): the value of `key`.
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A container's cgroup: one directory (v2) or one per used v1 hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    v2: bool,
    /// (controller, directory); v2 has one entry with controller "".
    dirs: Vec<(String, PathBuf)>,
    /// The directories between the hierarchy roots and `dirs`, deepest last: those this process
    /// created are removed when the last container under them goes.
    ancestors: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the cgroup at `rel` and applies `resources`.
    pub fn create(h: &Hierarchy, rel: &Path, resources: Option<&LinuxResources>) -> Result<Cgroup> {
        let mut tree = TREE.lock().unwrap_or_else(|e| e.into_inner());
        let mut cg = Cgroup { v2: h.is_v2(), dirs: Vec::new(), ancestors: Vec::new() };
        let r = cg.make_dirs(h, rel, resources, &mut tree);
        drop(tree);
        if let Err(e) = r {
            cg.remove_dirs();
            return Err(e);
        }
        let mut r = resources.map_or(Ok(()), |res| cg.apply(res));
        // `apply` sets device rules only when the spec has some (an update without them keeps
        // the container's); a new container always gets the default rules.
        if r.is_ok() && resources.and_then(|res| res.devices().as_ref()).is_none_or(|d| d.is_empty()) {
            r = cg.set_devices(None);
        }
        if let Err(e) = r {
            cg.remove_dirs();
            return Err(e);
        }
        Ok(cg)
    }

    fn make_dirs(
        &mut self,
        h: &Hierarchy,
        rel: &Path,
        res: Option<&LinuxResources>,
        tree: &mut Vec<PathBuf>,
    ) -> Result<()> {
        match h {
            Hierarchy::V2(root) => {
                let mut wanted: Vec<String> = V2_CONTROLLERS.iter().map(|c| c.to_string()).collect();
                if res.and_then(|r| r.cpu().as_ref()).is_some_and(|c| c.cpus().is_some() || c.mems().is_some()) {
                    wanted.push("cpuset".into());
                }
                // `unified` keys name their controller: "io.max" needs io.
                for k in res.and_then(|r| r.unified().as_ref()).into_iter().flat_map(|u| u.keys()) {
                    if let Some((c, _)) = k.split_once('.') {
                        if c != "cgroup" && !wanted.iter().any(|w| w == c) {
                            wanted.push(c.to_string());
                        }
                    }
                }
                let mut dir = root.clone();
                let comps: Vec<_> = rel.components().collect();
                for (i, c) in comps.iter().enumerate() {
                    enable_v2_controllers(&dir, &wanted);
                    dir.push(c);
                    self.mkdir(&dir, i + 1 == comps.len(), tree)?;
                }
                self.dirs.push((String::new(), dir));
            }
            Hierarchy::V1(_) => {
                let mut wanted: Vec<&str> = V1_CONTROLLERS.to_vec();
                let cpu = res.and_then(|r| r.cpu().as_ref());
                if cpu.is_some_and(|c| c.cpus().is_some() || c.mems().is_some()) {
                    wanted.push("cpuset");
                }
                for ctrl in wanted {
                    let Some(mount) = h.v1_mount(ctrl) else { continue };
                    let dir = mount.join(rel);
                    if !self.dirs.iter().any(|(_, d)| *d == dir) {
                        let mut d = mount.to_path_buf();
                        let comps: Vec<_> = rel.components().collect();
                        for (i, c) in comps.iter().enumerate() {
                            let parent = d.clone();
                            d.push(c);
                            if self.mkdir(&d, i + 1 == comps.len(), tree)? && ctrl == "cpuset" {
                                for f in ["cpuset.cpus", "cpuset.mems"] {
                                    let v = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                                    write_file(&d.join(f), v.trim())
                                        .map_err(|e| io_err(format!("cgroup {}", d.display()), e))?;
                                }
                            }
                        }
                    }
                    self.dirs.push((ctrl.to_string(), dir));
                }
                if self.dirs.is_empty() {
                    return Err(RuntimeError::Other("cgroup v1: none of memory, pids, cpu, cpuacct is mounted".into()));
                }
            }
        }
        Ok(())
    }

    /// mkdir; returns whether it was created. The leaf may pre-exist only when empty.
    fn mkdir(&mut self, dir: &Path, leaf: bool, tree: &mut Vec<PathBuf>) -> Result<bool> {
        if !leaf {
            self.ancestors.push(dir.to_path_buf());
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {
                if !tree.iter().any(|d| d == dir) {
                    tree.push(dir.to_path_buf());
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if leaf {
                    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    if !procs.trim().is_empty() {
                        return Err(RuntimeError::Other(format!(
                            "cgroup {} already exists and has processes",
                            dir.display()
                        )));
                    }
                }
                Ok(false)
            }
            Err(e) => Err(io_err(format!("creating cgroup {}", dir.display()), e)),
        }
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The directory holding `controller`'s files (v2: the one directory).
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        if self.v2 {
            return self.dirs.first().map(|(_, d)| d.as_path());
        }
        self.dirs.iter().find(|(c, _)| c == controller).map(|(_, d)| d.as_path())
    }

    /// Every distinct directory (to join: write to each `cgroup.procs`).
    pub fn unique_dirs(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for (_, d) in &self.dirs {
            if !out.contains(&d.as_path()) {
                out.push(d);
            }
        }
        out
    }

    /// The `cgroup.procs` files, opened for writing, for a child to join with `write("0")`.
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>> {
        self.unique_dirs()
            .into_iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                super::sys::open(&p, libc::O_WRONLY).map_err(|e| io_err(format!("opening {}", p.display()), e))
            })
            .collect()
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir(controller).map(|d| d.join(name))
    }

    /// Writes `value` to `controller`'s `name`; a missing controller or file is an error naming
    /// the spec `field`.
    fn set(&self, field: &str, controller: &str, name: &str, value: &str) -> Result<()> {
        let path = self.file(controller, name).ok_or_else(|| RuntimeError::InvalidSpec {
            field: field.into(),
            msg: format!("the cgroup v1 {controller} controller is not mounted"),
        })?;
        write_file(&path, value).map_err(|e| {
            let msg = if e.kind() == io::ErrorKind::NotFound {
                format!("{} does not exist (controller {controller} not enabled?)", path.display())
            } else {
                format!("writing {value:?} to {}: {e}", path.display())
            };
            RuntimeError::InvalidSpec { field: field.into(), msg }
        })
    }

    /// Applies `res` (create and update).
    pub fn apply(&self, res: &LinuxResources) -> Result<()> {
        const R: &str = "linux.resources";
        if let Some(m) = res.memory() {
            let f = format!("{R}.memory");
            if self.v2 {
                if let Some(l) = m.limit() {
                    self.set(&format!("{f}.limit"), "memory", "memory.max", &v2_max(l))?;
                    if let Some(s) = m.swap() {
                        let swap = if s < 0 || l < 0 { "max".to_string() } else { (s - l).max(0).to_string() };
                        if self.file("memory", "memory.swap.max").is_some_and(|p| p.exists()) {
                            self.set(&format!("{f}.swap"), "memory", "memory.swap.max", &swap)?;
                        } else if s != l {
                            tracing::warn!(
                                "{f}.swap: memory.swap.max does not exist (no swap accounting); not applied"
                            );
                        }
                    }
                }
                if let Some(r) = m.reservation() {
                    self.set(&format!("{f}.reservation"), "memory", "memory.low", &v2_max(r))?;
                }
                if m.disable_oom_killer() == Some(true) {
                    return Err(RuntimeError::InvalidSpec {
                        field: format!("{f}.disableOOMKiller"),
                        msg: "cgroup v2 cannot disable the OOM killer".into(),
                    });
                }
            } else {
                if let Some(l) = m.limit() {
                    let memsw = self.file("memory", "memory.memsw.limit_in_bytes").filter(|p| p.exists());
                    let lim = l.to_string();
                    match (m.swap(), memsw) {
                        (Some(s), Some(_)) => {
                            // The kernel wants memory <= memsw at every step: order the writes.
                            if self.set(&format!("{f}.limit"), "memory", "memory.limit_in_bytes", &lim).is_err() {
                                self.set(
                                    &format!("{f}.swap"),
                                    "memory",
                                    "memory.memsw.limit_in_bytes",
                                    &s.to_string(),
                                )?;
                                self.set(&format!("{f}.limit"), "memory", "memory.limit_in_bytes", &lim)?;
                            } else {
                                self.set(
                                    &format!("{f}.swap"),
                                    "memory",
                                    "memory.memsw.limit_in_bytes",
                                    &s.to_string(),
                                )?;
                            }
                        }
                        (Some(s), None) => {
                            if s != l && s >= 0 {
                                tracing::warn!(
                                    "{f}.swap: no memory.memsw.limit_in_bytes (swap accounting off); not applied"
                                );
                            }
                            self.set(&format!("{f}.limit"), "memory", "memory.limit_in_bytes", &lim)?;
                        }
                        (None, _) => self.set(&format!("{f}.limit"), "memory", "memory.limit_in_bytes", &lim)?,
                    }
                }
                if let Some(r) = m.reservation() {
                    self.set(&format!("{f}.reservation"), "memory", "memory.soft_limit_in_bytes", &r.to_string())?;
                }
                if let Some(s) = m.swappiness() {
                    if s > 100 {
                        return Err(RuntimeError::InvalidSpec {
                            field: format!("{f}.swappiness"),
                            msg: format!("{s} is above 100"),
                        });
                    }
                    self.set(&format!("{f}.swappiness"), "memory", "memory.swappiness", &s.to_string())?;
                }
                if m.disable_oom_killer() == Some(true) {
                    self.set(&format!("{f}.disableOOMKiller"), "memory", "memory.oom_control", "1")?;
                }
            }
        }
        if let Some(c) = res.cpu() {
            let f = format!("{R}.cpu");
            if self.v2 {
                if let Some(s) = c.shares() {
                    if s > 0 {
                        let w = 1 + ((s.clamp(2, 262_144) - 2) * 9999) / 262_142;
                        self.set(&format!("{f}.shares"), "cpu", "cpu.weight", &w.to_string())?;
                    }
                }
                if c.quota().is_some() || c.period().is_some() {
                    let period = c.period().unwrap_or(100_000);
                    let quota = match c.quota() {
                        Some(q) if q > 0 => q.to_string(),
                        _ => "max".into(),
                    };
                    self.set(&format!("{f}.quota"), "cpu", "cpu.max", &format!("{quota} {period}"))?;
                }
                if let Some(b) = c.burst() {
                    self.set(&format!("{f}.burst"), "cpu", "cpu.max.burst", &b.to_string())?;
                }
                if let Some(i) = c.idle() {
                    self.set(&format!("{f}.idle"), "cpu", "cpu.idle", &i.to_string())?;
                }
            } else {
                if let Some(s) = c.shares() {
                    if s > 0 {
                        self.set(&format!("{f}.shares"), "cpu", "cpu.shares", &s.to_string())?;
                    }
                }
                if let Some(p) = c.period() {
                    self.set(&format!("{f}.period"), "cpu", "cpu.cfs_period_us", &p.to_string())?;
                }
                if let Some(q) = c.quota() {
                    self.set(&format!("{f}.quota"), "cpu", "cpu.cfs_quota_us", &q.max(-1).to_string())?;
                }
                if let Some(b) = c.burst() {
                    self.set(&format!("{f}.burst"), "cpu", "cpu.cfs_burst_us", &b.to_string())?;
                }
            }
            if c.realtime_runtime().is_some() || c.realtime_period().is_some() {
                if self.v2 {
                    return Err(RuntimeError::InvalidSpec {
                        field: format!("{f}.realtimeRuntime"),
                        msg: "cgroup v2 has no real-time CPU limits".into(),
                    });
                }
                if let Some(p) = c.realtime_period() {
                    self.set(&format!("{f}.realtimePeriod"), "cpu", "cpu.rt_period_us", &p.to_string())?;
                }
                if let Some(r) = c.realtime_runtime() {
                    self.set(&format!("{f}.realtimeRuntime"), "cpu", "cpu.rt_runtime_us", &r.to_string())?;
                }
            }
            if let Some(cpus) = c.cpus() {
                self.set(&format!("{f}.cpus"), "cpuset", "cpuset.cpus", cpus)?;
            }
            if let Some(mems) = c.mems() {
                self.set(&format!("{f}.mems"), "cpuset", "cpuset.mems", mems)?;
            }
        }
        if let Some(p) = res.pids() {
            let v = if p.limit() > 0 { p.limit().to_string() } else { "max".into() };
            self.set(&format!("{R}.pids.limit"), "pids", "pids.max", &v)?;
        }
        if let Some(u) = res.unified() {
            if !self.v2 {
                if !u.is_empty() {
                    return Err(RuntimeError::InvalidSpec {
                        field: format!("{R}.unified"),
                        msg: "needs cgroup v2; this host has cgroup v1".into(),
                    });
                }
            } else {
                let mut keys: Vec<_> = u.iter().collect();
                keys.sort();
                for (k, v) in keys {
                    if k.contains('/') || k.starts_with('.') || k.is_empty() {
                        return Err(RuntimeError::InvalidSpec {
                            field: format!("{R}.unified"),
                            msg: format!("{k:?} is not a cgroup file name"),
                        });
                    }
                    self.set(&format!("{R}.unified.{k}"), "", k, v)?;
                }
            }
        }
        if let Some(d) = res.devices().as_ref().filter(|d| !d.is_empty()) {
            self.set_devices(Some(d))?;
        }
        let ignored: Vec<&str> = [
            ("blockIO", res.block_io().is_some()),
            ("hugepageLimits", res.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())),
            ("network", res.network().is_some()),
            ("rdma", res.rdma().as_ref().is_some_and(|r| !r.is_empty())),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| n)
        .collect();
        if !ignored.is_empty() {
            tracing::debug!("linux.resources: not applied in the sandbox: {}", ignored.join(", "));
        }
        Ok(())
    }

    /// Enforces the device rules (`linux.resources.devices` plus the defaults every container
    /// gets; see `devices`). cgroup v2: a BPF program attached to the container's cgroup,
    /// replacing the one there. cgroup v1 (hosts only, never the guest): not applied.
    pub fn set_devices(&self, spec: Option<&[LinuxDeviceCgroup]>) -> Result<()> {
        let rules = devices::rules(spec)?;
        if !self.v2 {
            if spec.is_some_and(|d| !d.is_empty()) {
                tracing::debug!("linux.resources.devices: not applied on cgroup v1");
            }
            return Ok(());
        }
        let Some((_, dir)) = self.dirs.first() else { return Ok(()) };
        let what = |e: io::Error| io_err(format!("linux.resources.devices: the device cgroup of {}", dir.display()), e);
        let prog = devices::load(&devices::program(&rules)).map_err(what)?;
        let dirfd = super::sys::open(dir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(what)?;
        devices::attach(&dirfd, &prog).map_err(what)
    }

    /// The pids in the cgroup (in the agent's pid namespace).
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let Some((_, d)) = self.dirs.first() else { return Ok(Vec::new()) };
        let s = std::fs::read_to_string(d.join("cgroup.procs"))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Sends `sig` to every process in the cgroup (one pass).
    pub fn signal_all(&self, sig: i32) -> io::Result<()> {
        if self.v2 && sig == libc::SIGKILL {
            if let Some(p) = self.file("", "cgroup.kill").filter(|p| p.exists()) {
                if write_file(&p, "1").is_ok() {
                    return Ok(());
                }
            }
        }
        for pid in self.pids()? {
            // SAFETY: kill(2) with plain integers; a pid that just exited gives ESRCH, ignored.
            unsafe { libc::kill(pid, sig) };
        }
        Ok(())
    }

    /// The number of processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        if self.v2 {
            self.file("memory", "memory.events").and_then(|p| read_keyed(&p, "oom_kill")).unwrap_or(0)
        } else {
            self.file("memory", "memory.oom_control").and_then(|p| read_keyed(&p, "oom_kill")).unwrap_or(0)
        }
    }

    /// An fd that becomes readable when the cgroup hits OOM (v1: eventfd on memory.oom_control;
    /// v2: inotify on memory.events). The second fd (v1) must stay open with the first.
    pub fn oom_notifier(&self) -> io::Result<(OwnedFd, Option<OwnedFd>)> {
        let dir = self.dir("memory").ok_or_else(|| io::Error::other("no memory cgroup"))?;
        if self.v2 {
            return Ok((super::sys::inotify_modify(&dir.join("memory.events"))?, None));
        }
        let efd = super::sys::eventfd()?;
        let ctl = super::sys::open(&dir.join("memory.oom_control"), libc::O_RDONLY)?;
        write_file(&dir.join("cgroup.event_control"), &format!("{} {}", efd.as_raw_fd(), ctl.as_raw_fd()))?;
        Ok((efd, Some(ctl)))
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats { oom_kills: self.oom_kills(), ..Default::default() };
        if self.v2 {
            let f = |n: &str| self.file("", n);
            s.memory_usage_bytes = f("memory.current").and_then(|p| read_u64(&p)).unwrap_or(0);
            s.memory_limit_bytes = f("memory.max").and_then(|p| read_u64(&p)).unwrap_or(u64::MAX);
            s.cpu_usage_usec = f("cpu.stat").and_then(|p| read_keyed(&p, "usage_usec")).unwrap_or(0);
            s.pids_current = f("pids.current").and_then(|p| read_u64(&p)).unwrap_or(0);
            s.pids_limit = f("pids.max").and_then(|p| read_u64(&p)).unwrap_or(u64::MAX);
        } else {
            s.memory_usage_bytes = self.file("memory", "memory.usage_in_bytes").and_then(|p| read_u64(&p)).unwrap_or(0);
            s.memory_limit_bytes =
                self.file("memory", "memory.limit_in_bytes").and_then(|p| read_u64(&p)).unwrap_or(u64::MAX);
            s.cpu_usage_usec = self.file("cpuacct", "cpuacct.usage").and_then(|p| read_u64(&p)).unwrap_or(0) / 1000;
            s.pids_current = self.file("pids", "pids.current").and_then(|p| read_u64(&p)).unwrap_or(0);
            s.pids_limit = self.file("pids", "pids.max").and_then(|p| read_u64(&p)).unwrap_or(u64::MAX);
        }
        s
    }

    /// Removes the cgroup directories (the processes must be gone; retries while the kernel still
    /// counts exiting tasks), then the ancestors it created when they are empty. Blocking.
    pub fn destroy(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut tree = TREE.lock().unwrap_or_else(|e| e.into_inner());
        for d in self.unique_dirs() {
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if std::time::Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                        let _ = self.signal_all(libc::SIGKILL);
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_err(format!("removing cgroup {}", d.display()), e)),
                }
            }
        }
        tree.retain(|t| !self.unique_dirs().contains(&t.as_path()));
        remove_ancestors(&self.ancestors, &mut tree);
        Ok(())
    }

    /// Best-effort removal after a failed create.
    fn remove_dirs(&self) {
        let mut tree = TREE.lock().unwrap_or_else(|e| e.into_inner());
        for d in self.unique_dirs() {
            if tree.iter().any(|t| t.as_path() == d) && std::fs::remove_dir(d).is_ok() {
                tree.retain(|t| t.as_path() != d);
            }
        }
        remove_ancestors(&self.ancestors, &mut tree);
    }

    /// The path of the container's cgroup in each v1 hierarchy it uses, or of its v2 directory:
    /// (controller, path) for bind-mounting into the container.
    pub fn dirs(&self) -> &[(String, PathBuf)] {
        &self.dirs
    }
}

/// Removes the ancestors this process created once they are empty (deepest first; rmdir fails
/// on a cgroup with children or processes, so nothing in use goes).
fn remove_ancestors(ancestors: &[PathBuf], tree: &mut Vec<PathBuf>) {
    for d in ancestors.iter().rev() {
        if tree.contains(d) && std::fs::remove_dir(d).is_ok() {
            tree.retain(|t| t != d);
        }
    }
}

fn v2_max(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

fn enable_v2_controllers(dir: &Path, wanted: &[String]) {
    let avail = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in avail.split_whitespace().filter(|c| wanted.iter().any(|w| w == c)) {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        if let Err(e) = write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}")) {
            tracing::debug!("enabling {c} in {}: {e}", dir.display());
        }
    }
}

/// One write(2) of `value` (cgroup files take a value per write).
pub fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let fd = super::sys::open(path, libc::O_WRONLY)?;
    let b = value.as_bytes();
    // SAFETY: write from a valid slice to an fd we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_mounts_from_mountinfo() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    42 31 0:39 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        let m = parse_v1_mounts(info);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1], (vec!["memory".to_string()], PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(m[3].0, vec!["cpu".to_string(), "cpuacct".to_string()]);
        let h = Hierarchy::V1(m);
        assert_eq!(h.v1_mount("cpuacct"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(h.v1_mount("pids"), None);
    }

    #[test]
    fn cgroups_path_rules() {
        assert_eq!(relative_path(None, "c1").unwrap(), PathBuf::from("shoji/c1"));
        assert_eq!(relative_path(Some(Path::new("/a/b")), "c1").unwrap(), PathBuf::from("a/b"));
        assert_eq!(relative_path(Some(Path::new("a/b")), "c1").unwrap(), PathBuf::from("a/b"));
        let sd = |p: &str| relative_path(Some(Path::new(p)), "c1");
        assert_eq!(sd("system.slice:cri:c1").unwrap(), PathBuf::from("system.slice/cri-c1.scope"));
        assert_eq!(
            sd("kubepods-burstable-pod1.slice:cri-containerd:c1").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c1.scope"
            ),
            "a pod's containers share the pod's slice"
        );
        assert_eq!(sd(":cri:c1").unwrap(), PathBuf::from("system.slice/cri-c1.scope"));
        assert_eq!(sd("-.slice::c1").unwrap(), PathBuf::from("c1.scope"));
        assert_eq!(sd("a.slice:x:b.slice").unwrap(), PathBuf::from("a.slice/b.slice"));
        for bad in ["a.slice:x:", "a:x:c1", "a--b.slice:x:c1", "a.slice:..:c1", ".slice:x:c1"] {
            assert!(sd(bad).unwrap_err().to_string().starts_with("linux.cgroupsPath:"), "{bad}");
        }
        let e = relative_path(Some(Path::new("/a/../../etc")), "c1").unwrap_err().to_string();
        assert!(e.starts_with("linux.cgroupsPath:"), "{e}");
        assert!(relative_path(Some(Path::new("/")), "c1").is_err());
    }
}
