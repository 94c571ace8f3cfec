//! Checks an OCI spec and turns it into what the container process needs (C strings, flags,
//! numbers; see `child::Plan`). Every error names the JSON field it is about.
use super::child::{Caps, Create, DeviceOp, MountKind, MountOp, RootSetup};
use super::{Result, RuntimeError};
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxDeviceType, LinuxNamespaceType, PosixRlimitType, Process, Spec,
};
use std::collections::VecDeque;
use std::ffi::{c_int, c_ulong, CString, OsString};
use std::path::{Component, Path, PathBuf};

pub(crate) fn invalid(field: impl Into<String>, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidSpec { field: field.into(), msg: msg.into() }
}

fn cstr(field: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| invalid(field, "contains a NUL byte"))
}

fn cpath(field: &str, p: &Path) -> Result<CString> {
    super::sys::cstring(p).map_err(|_| invalid(field, "contains a NUL byte"))
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the agent knows about the machine it runs on.
#[derive(Debug, Clone)]
pub(crate) struct HostInfo {
    /// `GLIBC_TUNABLES=...` from the kernel command line (PVM hosts; see `LinuxRuntime`).
    pub glibc_tunables: Option<String>,
    pub cap_last_cap: u32,
}

/// The `GLIBC_TUNABLES=...` word of a kernel command line, if any.
pub(crate) fn glibc_tunables_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find(|w| w.starts_with("GLIBC_TUNABLES=")).map(String::from)
}

/// A process's part of the plan.
#[derive(Debug)]
pub(crate) struct ProcessPlan {
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub exec_paths: Vec<CString>,
    pub cwd: CString,
    pub rlimits: Vec<(c_int, libc::rlimit)>,
    pub umask: Option<libc::mode_t>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub caps: Option<Caps>,
    pub no_new_privs: bool,
    pub oom_score_adj: Option<CString>,
    pub terminal: bool,
    /// (rows, cols); 0 when not given.
    pub console_size: (u16, u16),
}

/// The home directory of `uid` in an `/etc/passwd` text.
pub(crate) fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid) && !f[5].is_empty()).then(|| f[5].to_string())
    })
}

/// Checks `p` (the spec's `process`, or an exec's process; `field` is its JSON name).
/// `passwd` is the container's /etc/passwd (for HOME), when readable.
pub(crate) fn process_plan(p: &Process, field: &str, host: &HostInfo, passwd: Option<&str>) -> Result<ProcessPlan> {
    let args = p.args().as_deref().unwrap_or(&[]);
    if args.is_empty() {
        return Err(invalid(format!("{field}.args"), "is empty: nothing to run"));
    }
    let argv =
        args.iter().enumerate().map(|(i, a)| cstr(&format!("{field}.args[{i}]"), a)).collect::<Result<Vec<_>>>()?;
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    for (i, e) in env.iter().enumerate() {
        if e.contains('\0') {
            return Err(invalid(format!("{field}.env[{i}]"), "contains a NUL byte"));
        }
        if !e.contains('=') || e.starts_with('=') {
            return Err(invalid(format!("{field}.env[{i}]"), format!("{e:?} is not NAME=VALUE")));
        }
    }
    let has = |env: &[String], name: &str| env.iter().any(|e| e.split_once('=').is_some_and(|(n, _)| n == name));
    let uid = p.user().uid();
    if !has(&env, "HOME") {
        let home = passwd.and_then(|pw| home_from_passwd(pw, uid)).unwrap_or_else(|| "/".into());
        env.push(format!("HOME={home}"));
    }
    if let Some(t) = &host.glibc_tunables {
        if !has(&env, "GLIBC_TUNABLES") {
            env.push(t.clone());
        }
    }
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH).to_string();
    let envp = env.iter().map(|e| cstr(&format!("{field}.env"), e)).collect::<Result<Vec<_>>>()?;

    let arg0 = &args[0];
    let exec_paths = if arg0.contains('/') {
        vec![cstr(&format!("{field}.args[0]"), arg0)?]
    } else {
        path_var
            .split(':')
            .map(|d| if d.is_empty() { format!("./{arg0}") } else { format!("{}/{arg0}", d.trim_end_matches('/')) })
            .map(|s| cstr(&format!("{field}.args[0]"), &s))
            .collect::<Result<Vec<_>>>()?
    };

    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return Err(invalid(format!("{field}.cwd"), format!("{} is not an absolute path", cwd.display())));
    }
    let cwd = cpath(&format!("{field}.cwd"), cwd)?;

    let mut rlimits = Vec::new();
    let mut seen = Vec::new();
    for (i, rl) in p.rlimits().iter().flatten().enumerate() {
        let f = format!("{field}.rlimits[{i}]");
        if rl.soft() > rl.hard() {
            return Err(invalid(f, format!("soft limit {} is above the hard limit {}", rl.soft(), rl.hard())));
        }
        if seen.contains(&rl.typ()) {
            return Err(invalid(f, format!("{:?} is set twice", rl.typ())));
        }
        seen.push(rl.typ());
        rlimits.push((rlimit_resource(rl.typ()), libc::rlimit { rlim_cur: rl.soft(), rlim_max: rl.hard() }));
    }

    let user = p.user();
    let groups = user.additional_gids().clone().unwrap_or_default();
    let caps = p.capabilities().as_ref().map(|c| caps_plan(c, host.cap_last_cap));
    let oom_score_adj = match p.oom_score_adj() {
        Some(v) if !(-1000..=1000).contains(&v) => {
            return Err(invalid(format!("{field}.oomScoreAdj"), format!("{v} is outside -1000..=1000")))
        }
        Some(v) => Some(cstr("", &v.to_string())?),
        None => None,
    };
    let console_size = p
        .console_size()
        .map(|b| (b.height().min(u16::MAX as u64) as u16, b.width().min(u16::MAX as u64) as u16))
        .unwrap_or((0, 0));
    if p.apparmor_profile().as_deref().is_some_and(|a| !a.is_empty()) || p.selinux_label().is_some() {
        tracing::debug!("{field}: AppArmor/SELinux labels are not applied in the sandbox guest");
    }
    Ok(ProcessPlan {
        argv,
        envp,
        exec_paths,
        cwd,
        rlimits,
        umask: user.umask(),
        uid,
        gid: user.gid(),
        groups,
        caps,
        // runc's default: off unless the spec asks.
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        oom_score_adj,
        terminal: p.terminal().unwrap_or(false),
        console_size,
    })
}

fn rlimit_resource(t: PosixRlimitType) -> c_int {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as c_int
}

/// The number of a capability (linux/capability.h).
pub(crate) fn cap_number(c: &Capability) -> u32 {
    use Capability::*;
    match c {
        Chown => 0,
        DacOverride => 1,
        DacReadSearch => 2,
        Fowner => 3,
        Fsetid => 4,
        Kill => 5,
        Setgid => 6,
        Setuid => 7,
        Setpcap => 8,
        LinuxImmutable => 9,
        NetBindService => 10,
        NetBroadcast => 11,
        NetAdmin => 12,
        NetRaw => 13,
        IpcLock => 14,
        IpcOwner => 15,
        SysModule => 16,
        SysRawio => 17,
        SysChroot => 18,
        SysPtrace => 19,
        SysPacct => 20,
        SysAdmin => 21,
        SysBoot => 22,
        SysNice => 23,
        SysResource => 24,
        SysTime => 25,
        SysTtyConfig => 26,
        Mknod => 27,
        Lease => 28,
        AuditWrite => 29,
        AuditControl => 30,
        Setfcap => 31,
        MacOverride => 32,
        MacAdmin => 33,
        Syslog => 34,
        WakeAlarm => 35,
        BlockSuspend => 36,
        AuditRead => 37,
        Perfmon => 38,
        Bpf => 39,
        CheckpointRestore => 40,
    }
}

fn caps_plan(c: &LinuxCapabilities, last_cap: u32) -> Caps {
    // Capabilities the running kernel does not know are left out, as runc does.
    let mask = |set: &Option<oci_spec::runtime::Capabilities>| -> u64 {
        set.iter().flatten().map(cap_number).filter(|n| *n <= last_cap && *n < 64).fold(0, |m, n| m | (1u64 << n))
    };
    Caps {
        bounding: mask(c.bounding()),
        effective: mask(c.effective()),
        permitted: mask(c.permitted()),
        inheritable: mask(c.inheritable()),
        ambient: mask(c.ambient()),
        last_cap,
    }
}

/// A namespace kind the container may have apart from the agent's, in `setns` order (mount last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NsKind {
    Ipc,
    Uts,
    Net,
    Pid,
    Cgroup,
    Mnt,
}

impl NsKind {
    pub const ORDER: [NsKind; 6] = [NsKind::Ipc, NsKind::Uts, NsKind::Net, NsKind::Pid, NsKind::Cgroup, NsKind::Mnt];

    pub fn proc_name(self) -> &'static str {
        match self {
            NsKind::Ipc => "ipc",
            NsKind::Uts => "uts",
            NsKind::Net => "net",
            NsKind::Pid => "pid",
            NsKind::Cgroup => "cgroup",
            NsKind::Mnt => "mnt",
        }
    }

    pub fn flag(self) -> c_int {
        match self {
            NsKind::Ipc => libc::CLONE_NEWIPC,
            NsKind::Uts => libc::CLONE_NEWUTS,
            NsKind::Net => libc::CLONE_NEWNET,
            NsKind::Pid => libc::CLONE_NEWPID,
            NsKind::Cgroup => libc::CLONE_NEWCGROUP,
            NsKind::Mnt => libc::CLONE_NEWNS,
        }
    }
}

/// The namespaces of a new container.
#[derive(Debug, Default)]
pub(crate) struct Namespaces {
    /// Namespaces to create (clone flags).
    pub new: Vec<NsKind>,
    /// Namespaces to join: (kind, path, index in linux.namespaces).
    pub join: Vec<(NsKind, PathBuf, usize)>,
}

impl Namespaces {
    pub fn clone_flags(&self) -> c_ulong {
        self.new.iter().fold(0, |f, k| f | k.flag() as c_ulong)
    }

    /// Every namespace the container does not share with the agent, in setns order.
    pub fn kinds(&self) -> Vec<NsKind> {
        NsKind::ORDER.into_iter().filter(|k| self.new.contains(k) || self.join.iter().any(|(j, _, _)| j == k)).collect()
    }

    pub fn has_new(&self, k: NsKind) -> bool {
        self.new.contains(&k)
    }
}

pub(crate) fn namespaces(spec: &Spec) -> Result<Namespaces> {
    let mut ns = Namespaces::default();
    let list = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    for (i, n) in list.into_iter().flatten().enumerate() {
        let f = format!("linux.namespaces[{i}]");
        let kind = match n.typ() {
            LinuxNamespaceType::Mount => NsKind::Mnt,
            LinuxNamespaceType::Uts => NsKind::Uts,
            LinuxNamespaceType::Ipc => NsKind::Ipc,
            LinuxNamespaceType::Network => NsKind::Net,
            LinuxNamespaceType::Pid => NsKind::Pid,
            LinuxNamespaceType::Cgroup => NsKind::Cgroup,
            LinuxNamespaceType::User => return Err(invalid(f, "user namespaces are not supported")),
            LinuxNamespaceType::Time => return Err(invalid(f, "time namespaces are not supported")),
        };
        if ns.new.contains(&kind) || ns.join.iter().any(|(k, _, _)| *k == kind) {
            return Err(invalid(f, format!("the {} namespace is listed twice", kind.proc_name())));
        }
        match n.path() {
            Some(p) if !p.as_os_str().is_empty() => {
                if kind == NsKind::Mnt {
                    return Err(invalid(format!("{f}.path"), "joining an existing mount namespace is not supported"));
                }
                if !p.is_absolute() {
                    return Err(invalid(format!("{f}.path"), format!("{} is not an absolute path", p.display())));
                }
                ns.join.push((kind, p.clone(), i));
            }
            _ => ns.new.push(kind),
        }
    }
    if !ns.has_new(NsKind::Mnt) {
        return Err(invalid("linux.namespaces", "a new mount namespace is required (the container gets its own root)"));
    }
    let linux = spec.linux().as_ref();
    if linux.is_some_and(|l| l.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())) {
        return Err(invalid("linux.uidMappings", "user namespaces are not supported"));
    }
    if linux.is_some_and(|l| l.personality().is_some()) {
        return Err(invalid("linux.personality", "is not supported"));
    }
    Ok(ns)
}

/// Resolves `unsafe_path` inside `root` the way the kernel would after a chroot to `root`:
/// symlinks (absolute or relative) and ".." never lead outside `root`.
pub(crate) fn secure_join(root: &Path, unsafe_path: &Path) -> std::io::Result<PathBuf> {
    fn parts(p: &Path) -> VecDeque<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    }
    let mut todo = parts(unsafe_path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&c);
        match std::fs::symlink_metadata(root.join(&candidate)) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(root.join(&candidate))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut next = parts(&target);
                next.extend(todo);
                todo = next;
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// Mount options, by the one table host and guest share (`shoji_devices::model::mount`).
pub use shoji_devices::model::MountOptions;

/// Parses OCI `mounts[].options` (or any option list); errors name `field`.
pub fn parse_mount_options(field: &str, opts: &[String]) -> Result<MountOptions> {
    MountOptions::parse(opts).map_err(|e| invalid(field, e.to_string()))
}

fn propagation_flags(field: &str, s: Option<&str>) -> Result<c_ulong> {
    Ok(match s.unwrap_or("") {
        "" | "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "private" => libc::MS_PRIVATE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "shared" | "rshared" => return Err(invalid(field, "shared rootfs propagation is not supported")),
        other => return Err(invalid(field, format!("{other:?} is not a propagation mode"))),
    })
}

/// Inputs of `root_plan` besides the spec.
pub(crate) struct RootInputs<'a> {
    pub ns: &'a Namespaces,
    /// Where the container's cgroup is: (controller or "", directory), and whether v2.
    pub cgroup_dirs: &'a [(String, PathBuf)],
    pub cgroup_v2: bool,
    /// The init has a terminal (bind-mounted on /dev/console).
    pub terminal: bool,
    pub no_pivot: bool,
}

const DEFAULT_DEVICES: &[(&str, u32, u32)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// The root filesystem part of a new container's plan.
pub(crate) fn root_plan(spec: &Spec, inp: &RootInputs) -> Result<RootSetup> {
    let root = spec.root().as_ref().ok_or_else(|| invalid("root", "is missing"))?;
    let rp = root.path();
    if !rp.is_absolute() {
        return Err(invalid("root.path", format!("{} is not an absolute path", rp.display())));
    }
    let rootfs = std::fs::canonicalize(rp).map_err(|e| invalid("root.path", format!("{}: {e}", rp.display())))?;
    if !rootfs.is_dir() {
        return Err(invalid("root.path", format!("{} is not a directory", rp.display())));
    }
    let linux = spec.linux().as_ref();
    // Paths relative to the rootfs, resolved now (to know what to create); the child resolves
    // them again inside the rootfs when it mounts (`child::open_in_root`).
    let join = |field: &str, p: &Path| -> Result<PathBuf> {
        let abs = secure_join(&rootfs, p)
            .map_err(|e| invalid(field, format!("resolving {} in the rootfs: {e}", p.display())))?;
        let rel = abs.strip_prefix(&rootfs).map(Path::to_path_buf).unwrap_or_default();
        Ok(if rel.as_os_str().is_empty() { PathBuf::from(".") } else { rel })
    };

    let mut mounts = Vec::new();
    let mut dev_is_bind = false;
    let mut has_pts = false;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let f = format!("mounts[{i}]");
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(invalid(format!("{f}.destination"), format!("{} is not an absolute path", dest.display())));
        }
        let clean: PathBuf = dest.components().collect();
        let target_path = join(&format!("{f}.destination"), dest)?;
        let target = cpath(&format!("{f}.destination"), &target_path)?;
        let typ = m.typ().as_deref().unwrap_or("");
        let opts = parse_mount_options(&format!("{f}.options"), m.options().as_deref().unwrap_or(&[]))?;
        if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
            return Err(invalid(f, "id-mapped mounts are not supported"));
        }
        let bind = opts.bind || typ == "bind";
        if clean == Path::new("/dev") && bind {
            dev_is_bind = true;
        }
        if clean == Path::new("/dev/pts") {
            has_pts = true;
        }
        let idx = i as u32;
        if typ == "cgroup" || typ == "cgroup2" {
            mounts.extend(cgroup_mounts(&f, &target_path, &opts, inp, idx)?);
            continue;
        }
        if bind {
            let src =
                m.source().as_ref().ok_or_else(|| invalid(format!("{f}.source"), "a bind mount needs a source"))?;
            if !src.is_absolute() {
                return Err(invalid(format!("{f}.source"), format!("{} is not an absolute path", src.display())));
            }
            let meta = std::fs::metadata(src)
                .map_err(|e| invalid(format!("{f}.source"), format!("{}: {e}", src.display())))?;
            let remount = opts.flags & !(libc::MS_REC | libc::MS_BIND) != 0;
            mounts.push(MountOp {
                kind: MountKind::Bind { remount },
                source: Some(cpath(&format!("{f}.source"), src)?),
                target,
                fstype: None,
                flags: opts.flags,
                data: None,
                propagation: opts.propagation,
                create: if meta.is_dir() { Create::Dir } else { Create::File },
                spec_index: idx,
            });
        } else {
            if typ.is_empty() {
                return Err(invalid(format!("{f}.type"), "is missing (and the mount is not a bind mount)"));
            }
            let source = match m.source() {
                Some(s) => cpath(&format!("{f}.source"), s)?,
                None => cstr(&format!("{f}.type"), typ)?,
            };
            let data =
                if opts.data.is_empty() { None } else { Some(cstr(&format!("{f}.options"), &opts.data.join(","))?) };
            mounts.push(MountOp {
                kind: MountKind::Mount,
                source: Some(source),
                target,
                fstype: Some(cstr(&format!("{f}.type"), typ)?),
                flags: opts.flags,
                data,
                propagation: opts.propagation,
                create: Create::Dir,
                spec_index: idx,
            });
        }
    }

    let setup_dev = !dev_is_bind;
    let mut devices = Vec::new();
    let spec_devices = linux.and_then(|l| l.devices().as_ref());
    for (i, d) in spec_devices.into_iter().flatten().enumerate() {
        let f = format!("linux.devices[{i}]");
        if !d.path().is_absolute() {
            return Err(invalid(format!("{f}.path"), format!("{} is not an absolute path", d.path().display())));
        }
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => return Err(invalid(format!("{f}.type"), "\"a\" is not a device type")),
        };
        let (major, minor) = (d.major(), d.minor());
        if !(0..=0xfff).contains(&major) || !(0..=0xfffff).contains(&minor) {
            return Err(invalid(f, format!("device number {major}:{minor} is out of range")));
        }
        let perm = d.file_mode().unwrap_or(0o666) & 0o7777;
        devices.push(DeviceOp {
            path: cpath(&format!("{f}.path"), &join(&format!("{f}.path"), d.path())?)?,
            mode: kind | perm,
            dev: libc::makedev(major as u32, minor as u32),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    let mut links = Vec::new();
    let mut console = None;
    if setup_dev {
        for (path, major, minor) in DEFAULT_DEVICES {
            if spec_devices.into_iter().flatten().any(|d| d.path() == Path::new(path)) {
                continue;
            }
            devices.push(DeviceOp {
                path: cpath("linux.devices", &join("linux.devices", Path::new(path))?)?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(*major, *minor),
                uid: 0,
                gid: 0,
            });
        }
        let mut l = vec![
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ];
        if has_pts {
            l.push(("pts/ptmx", "/dev/ptmx"));
        }
        for (target, link) in l {
            links.push((cstr("", target)?, cpath("", &join("", Path::new(link))?)?));
        }
        if inp.terminal {
            console = Some(cpath("", &join("", Path::new("/dev/console"))?)?);
        }
    }

    let paths = |name: &str, list: Option<&Vec<String>>| -> Result<Vec<CString>> {
        list.into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let f = format!("linux.{name}[{i}]");
                if !p.starts_with('/') {
                    return Err(invalid(f, format!("{p:?} is not an absolute path")));
                }
                cstr(&f, p)
            })
            .collect()
    };
    let masked = paths("maskedPaths", linux.and_then(|l| l.masked_paths().as_ref()))?;
    let readonly = paths("readonlyPaths", linux.and_then(|l| l.readonly_paths().as_ref()))?;
    let propagation =
        propagation_flags("linux.rootfsPropagation", linux.and_then(|l| l.rootfs_propagation().as_deref()))?;

    Ok(RootSetup {
        rootfs: cpath("root.path", &rootfs)?,
        propagation,
        mounts,
        devices,
        links,
        console,
        masked,
        readonly,
        readonly_root: root.readonly().unwrap_or(false),
        no_pivot: inp.no_pivot,
    })
}

/// A `cgroup` mount: cgroup2 itself when the container has its own cgroup namespace on v2;
/// otherwise the container's own cgroup directories bind-mounted (v1: one per hierarchy under a
/// tmpfs), so it never sees the rest of the tree.
fn cgroup_mounts(f: &str, target: &Path, opts: &MountOptions, inp: &RootInputs, idx: u32) -> Result<Vec<MountOp>> {
    let flags = opts.flags | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let t = cpath(&format!("{f}.destination"), target)?;
    if inp.cgroup_v2 {
        if inp.ns.has_new(NsKind::Cgroup) {
            return Ok(vec![MountOp {
                kind: MountKind::Mount,
                source: Some(cstr("", "cgroup2")?),
                target: t,
                fstype: Some(cstr("", "cgroup2")?),
                flags,
                data: None,
                propagation: opts.propagation.clone(),
                create: Create::Dir,
                spec_index: idx,
            }]);
        }
        let dir =
            inp.cgroup_dirs.first().map(|(_, d)| d.clone()).ok_or_else(|| invalid(f, "the container has no cgroup"))?;
        return Ok(vec![MountOp {
            kind: MountKind::Bind { remount: true },
            source: Some(cpath("", &dir)?),
            target: t,
            fstype: None,
            flags,
            data: None,
            propagation: opts.propagation.clone(),
            create: Create::Dir,
            spec_index: idx,
        }]);
    }
    let mut out = vec![MountOp {
        kind: MountKind::Mount,
        source: Some(cstr("", "tmpfs")?),
        target: t.clone(),
        fstype: Some(cstr("", "tmpfs")?),
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: Some(cstr("", "mode=755")?),
        propagation: Vec::new(),
        create: Create::Dir,
        spec_index: idx,
    }];
    for (ctrl, dir) in inp.cgroup_dirs {
        out.push(MountOp {
            kind: MountKind::Bind { remount: true },
            source: Some(cpath("", dir)?),
            target: cpath("", &target.join(ctrl))?,
            fstype: None,
            flags,
            data: None,
            propagation: Vec::new(),
            create: Create::Dir,
            spec_index: idx,
        });
    }
    if opts.flags & libc::MS_RDONLY != 0 {
        out.push(MountOp {
            kind: MountKind::Remount,
            source: None,
            target: t,
            fstype: None,
            flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
            propagation: Vec::new(),
            create: Create::Dir,
            spec_index: idx,
        });
    }
    Ok(out)
}

/// `linux.sysctl` as (file under /proc/sys, value).
pub(crate) fn sysctls(spec: &Spec) -> Result<Vec<(CString, CString)>> {
    let mut out = Vec::new();
    let Some(map) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) else { return Ok(out) };
    let mut keys: Vec<_> = map.iter().collect();
    keys.sort();
    for (k, v) in keys {
        let f = format!("linux.sysctl.{k}");
        let ok = !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            && !k.split(['.', '/']).any(|p| p.is_empty() || p == "..");
        if !ok {
            return Err(invalid(f, "is not a sysctl name"));
        }
        out.push((cstr(&f, &format!("/proc/sys/{}", k.replace('.', "/")))?, cstr(&f, v)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("a/up")).unwrap();
        std::os::unix::fs::symlink("b", root.join("a/rel")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(secure_join(root, Path::new("/abs/passwd")).unwrap(), root.join("etc/passwd"));
        assert_eq!(secure_join(root, Path::new("/a/up/x")).unwrap(), root.join("x"));
        assert_eq!(secure_join(root, Path::new("/../../x")).unwrap(), root.join("x"));
        assert_eq!(secure_join(root, Path::new("/a/rel/c")).unwrap(), root.join("a/b/c"));
        assert!(secure_join(root, Path::new("/loop")).is_err());
    }

    proptest::proptest! {
        #[test]
        fn secure_join_never_leaves_the_root(parts in proptest::collection::vec("(\\.\\.|\\.|a|b|up|abs|/)", 0..12)) {
            let d = tempfile::tempdir().unwrap();
            let root = d.path();
            std::fs::create_dir_all(root.join("a/b")).unwrap();
            std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
            std::os::unix::fs::symlink("../../../..", root.join("a/up")).unwrap();
            let p = format!("/{}", parts.join("/"));
            let j = secure_join(root, Path::new(&p)).unwrap();
            proptest::prop_assert!(j.starts_with(root), "{} -> {}", p, j.display());
        }

        #[test]
        fn mount_options_never_panic(opts in proptest::collection::vec(".{0,12}", 0..8)) {
            let _ = parse_mount_options("m", &opts);
        }
    }

    #[test]
    fn mount_options() {
        let o = |v: &[&str]| parse_mount_options("m", &v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let m = o(&["nosuid", "noexec", "mode=755", "size=65536k", "rbind", "rslave", "ro", "rw"]).unwrap();
        assert_eq!(m.flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_REC);
        assert!(m.bind);
        assert_eq!(m.propagation, vec![libc::MS_SLAVE | libc::MS_REC]);
        assert_eq!(m.data, vec!["mode=755", "size=65536k"]);
        let e = o(&["idmap"]).unwrap_err().to_string();
        assert!(e.starts_with("m: "), "{e}");
        assert!(o(&["rro"]).is_err());
        assert!(o(&["a\0b"]).unwrap_err().to_string().contains("NUL"));
        // One entry may hold several words (containerd's lists do).
        let m = o(&["ro,nosuid", "size=1m"]).unwrap();
        assert_eq!((m.flags, m.data), (libc::MS_RDONLY | libc::MS_NOSUID, vec!["size=1m".to_string()]));
    }

    #[test]
    fn passwd_and_cmdline() {
        let pw = "root:x:0:0:root:/root:/bin/sh\nbad line\nu:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(home_from_passwd(pw, 0).as_deref(), Some("/root"));
        assert_eq!(home_from_passwd(pw, 1000).as_deref(), Some("/home/u"));
        assert_eq!(home_from_passwd(pw, 5), None);
        assert_eq!(
            glibc_tunables_from_cmdline("console=ttyS0 GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2 quiet").as_deref(),
            Some("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2")
        );
        assert_eq!(glibc_tunables_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn process_checks_name_fields() {
        let host = HostInfo { glibc_tunables: Some("GLIBC_TUNABLES=x=1".into()), cap_last_cap: 40 };
        let mut p = Process::default();
        p.set_args(Some(vec![]));
        assert!(process_plan(&p, "process", &host, None).unwrap_err().to_string().starts_with("process.args:"));
        p.set_args(Some(vec!["sh".into()]));
        p.set_cwd("rel".into());
        assert!(process_plan(&p, "process", &host, None).unwrap_err().to_string().starts_with("process.cwd:"));
        p.set_cwd("/".into());
        p.set_env(Some(vec!["A=1".into(), "NOEQUALS".into()]));
        assert!(process_plan(&p, "process", &host, None).unwrap_err().to_string().starts_with("process.env[1]:"));
        p.set_env(Some(vec!["PATH=/bin:/x".into()]));
        let plan = process_plan(&p, "process", &host, Some("root:x:0:0::/root:/bin/sh")).unwrap();
        let env: Vec<_> = plan.envp.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(env, ["PATH=/bin:/x", "HOME=/root", "GLIBC_TUNABLES=x=1"]);
        let paths: Vec<_> = plan.exec_paths.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(paths, ["/bin/sh", "/x/sh"]);
    }
}
