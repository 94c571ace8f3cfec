//! The OCI runtime spec of `shoji run`'s container, written with oci-spec's builders: Docker's
//! defaults where they matter (namespaces, mounts, capabilities, masked paths), the command,
//! its environment and terminal, the shares as bind mounts and the disks and `--device`s as
//! devices.
use anyhow::Result;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceBuilder, LinuxDeviceCgroup,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder,
    LinuxSeccomp, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use std::collections::HashSet;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const HOSTNAME: &str = "shoji";

/// A directory the agent mounted in the guest, bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// A block device in the container: a `--disk` (placeholder numbers `0:i`) or a `--device` (the
/// host node's numbers). The agent replaces the numbers of both the node and its cgroup rule
/// with the guest node's (found by PCI path), so path and numbers must each be unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: String,
    pub major: i64,
    pub minor: i64,
    /// The device cgroup access the container gets ("rwm" or a subset).
    pub access: String,
}

#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub args: &'a [String],
    pub env: &'a [String],
    pub cwd: &'a str,
    pub terminal: bool,
    pub console_size: Option<(u16, u16)>,
    /// The rootfs in the guest.
    pub root: &'a str,
    pub readonly_root: bool,
    /// A tmpfs on /mnt (and /tmp): a read-only rootfs has no room for the share mount points.
    pub scratch_tmpfs: bool,
    pub binds: &'a [Bind],
    pub devices: &'a [Device],
    /// `linux.seccomp`; `None` only for `--security-opt seccomp=unconfined`.
    pub seccomp: Option<LinuxSeccomp>,
}

/// The process environment: PATH, HOSTNAME and (with a terminal) TERM, then the user's `K=V`
/// entries, a later one replacing an earlier one of the same name.
pub fn environment(user: &[String], terminal: bool) -> Vec<String> {
    let mut env = vec![format!("PATH={DEFAULT_PATH}"), format!("HOSTNAME={HOSTNAME}")];
    if terminal {
        env.push("TERM=xterm".into());
    }
    for e in user {
        let name = e.split_once('=').map_or(e.as_str(), |(n, _)| n);
        env.retain(|x| x.split_once('=').map_or(x.as_str(), |(n, _)| n) != name);
        env.push(e.clone());
    }
    env
}

/// Docker's default capability set for the container's root.
const CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The device cgroup (`linux.resources.devices`), Docker's: deny everything, allow creating any
/// node (opening it is what the cgroup guards), the standard devices every container gets, and
/// each device by the numbers in its node entry, which the agent's batched rewrite turns into the
/// guest's, with its access.
fn device_rules(devices: &[Device]) -> Result<Vec<LinuxDeviceCgroup>> {
    let r = |allow: bool, typ: Option<LinuxDeviceType>, major: Option<i64>, minor: Option<i64>, access: &str| {
        let mut b = LinuxDeviceCgroupBuilder::default().allow(allow).access(access);
        if let Some(t) = typ {
            b = b.typ(t);
        }
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build()
    };
    use LinuxDeviceType::{B, C};
    let mut rules = vec![
        r(false, None, None, None, "rwm")?,
        r(true, Some(C), None, None, "m")?,
        r(true, Some(B), None, None, "m")?,
    ];
    // null, zero, full, random, urandom, tty, console, ptmx, and the pty slaves (136:*).
    for (major, minor) in [(1, Some(3)), (1, Some(5)), (1, Some(7)), (1, Some(8)), (1, Some(9)), (5, Some(0))] {
        rules.push(r(true, Some(C), Some(major), minor, "rwm")?);
    }
    for (major, minor) in [(5, Some(1)), (5, Some(2)), (136, None)] {
        rules.push(r(true, Some(C), Some(major), minor, "rwm")?);
    }
    for d in devices {
        rules.push(r(true, Some(B), Some(d.major), Some(d.minor), &d.access)?);
    }
    Ok(rules)
}

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    Ok(MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

pub fn build(i: &Input) -> Result<Spec> {
    let caps: HashSet<Capability> = CAPS.iter().copied().collect();
    let mut process = ProcessBuilder::default()
        .terminal(i.terminal)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(i.args.to_vec())
        .env(i.env.to_vec())
        .cwd(i.cwd)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()?,
        )
        .no_new_privileges(false);
    if let Some((rows, cols)) = i.console_size.filter(|_| i.terminal) {
        process = process.console_size(
            oci_spec::runtime::BoxBuilder::default().height(u64::from(rows)).width(u64::from(cols)).build()?,
        );
    }

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        )?,
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"])?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"])?,
    ];
    if i.scratch_tmpfs {
        mounts.push(mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=1777"])?);
        if !i.binds.is_empty() {
            mounts.push(mount("/mnt", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=755", "size=64k"])?);
        }
    }
    for b in i.binds {
        let mode = if b.read_only { "ro" } else { "rw" };
        mounts.push(mount(&b.destination, "bind", &b.source, &["rbind", "rprivate", mode])?);
    }

    let namespaces =
        [LinuxNamespaceType::Mount, LinuxNamespaceType::Pid, LinuxNamespaceType::Uts, LinuxNamespaceType::Ipc]
            .into_iter()
            .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
            .collect::<Result<Vec<_>, _>>()?;
    let devices = i
        .devices
        .iter()
        .map(|d| {
            LinuxDeviceBuilder::default()
                .path(d.path.as_str())
                .typ(LinuxDeviceType::B)
                .major(d.major)
                .minor(d.minor)
                .file_mode(0o660u32)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(strings(&[
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
        ]))
        .readonly_paths(strings(&["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]));
    if !devices.is_empty() {
        linux = linux.devices(devices);
    }
    linux = linux.resources(LinuxResourcesBuilder::default().devices(device_rules(i.devices)?).build()?);
    if let Some(profile) = &i.seccomp {
        linux = linux.seccomp(profile.clone());
    }

    Ok(SpecBuilder::default()
        .version("1.0.2")
        .hostname(HOSTNAME)
        .process(process.build()?)
        .root(RootBuilder::default().path(i.root).readonly(i.readonly_root).build()?)
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(args: &'a [String], env: &'a [String], binds: &'a [Bind], devices: &'a [Device]) -> Input<'a> {
        Input {
            args,
            env,
            cwd: "/",
            terminal: false,
            console_size: Some((24, 80)),
            root: "/run/shoji/rootfs",
            readonly_root: true,
            scratch_tmpfs: true,
            binds,
            devices,
            seccomp: Some(crate::run::seccomp::default_profile().unwrap()),
        }
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let e = environment(&["A=1".into(), "PATH=/x".into(), "A=2".into(), "EMPTY=".into()], true);
        assert_eq!(e, ["HOSTNAME=shoji", "TERM=xterm", "PATH=/x", "A=2", "EMPTY="]);
        assert_eq!(environment(&[], false), [format!("PATH={DEFAULT_PATH}"), "HOSTNAME=shoji".to_string()]);
    }

    #[test]
    fn spec_has_the_command_the_root_the_mounts_and_the_devices() {
        let args = vec!["sh".to_string(), "-c".to_string(), "echo hi".to_string()];
        let env = environment(&[], false);
        let binds = vec![Bind { source: "/run/shoji/share0".into(), destination: "/mnt/data".into(), read_only: true }];
        let devices = vec![
            Device { path: "/dev/vda".into(), major: 0, minor: 0, access: "rwm".into() },
            Device { path: "/dev/xvdz".into(), major: 7, minor: 3, access: "rm".into() },
        ];
        let spec = build(&input(&args, &env, &binds, &devices)).unwrap();
        // What the agent receives is JSON: it must parse back to the same spec.
        let json = serde_json::to_vec(&spec).unwrap();
        let back: Spec = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, spec);
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_deref().unwrap(), &args[..]);
        assert_eq!(p.terminal(), Some(false));
        assert!(p.console_size().is_none(), "no console size without a terminal");
        assert_eq!(p.cwd().to_str(), Some("/"));
        let root = spec.root().as_ref().unwrap();
        assert_eq!((root.path().to_str(), root.readonly()), (Some("/run/shoji/rootfs"), Some(true)));
        let dests: Vec<_> =
            spec.mounts().as_ref().unwrap().iter().map(|m| m.destination().to_str().unwrap().to_string()).collect();
        assert_eq!(dests, ["/proc", "/dev", "/dev/pts", "/dev/shm", "/sys", "/tmp", "/mnt", "/mnt/data"]);
        let bind = spec.mounts().as_ref().unwrap().last().unwrap();
        assert_eq!(bind.source().as_ref().unwrap().to_str(), Some("/run/shoji/share0"));
        assert!(bind.options().as_ref().unwrap().contains(&"ro".to_string()));
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<_> = linux.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        assert_eq!(
            ns,
            [LinuxNamespaceType::Mount, LinuxNamespaceType::Pid, LinuxNamespaceType::Uts, LinuxNamespaceType::Ipc]
        );
        let nodes: Vec<_> = linux
            .devices()
            .as_ref()
            .unwrap()
            .iter()
            .map(|d| (d.path().to_str().unwrap(), d.typ(), d.major(), d.minor()))
            .collect();
        assert_eq!(nodes, [("/dev/vda", LinuxDeviceType::B, 0, 0), ("/dev/xvdz", LinuxDeviceType::B, 7, 3)]);
        assert!(linux.seccomp().is_some());
        // Deny first, then the standard devices, then each device by its node's numbers, with
        // its access.
        let rules = linux.resources().as_ref().unwrap().devices().as_ref().unwrap();
        assert!(!rules[0].allow() && rules[0].typ().is_none() && rules[0].access().as_deref() == Some("rwm"));
        let tail: Vec<_> = rules[rules.len() - 2..]
            .iter()
            .map(|r| (r.allow(), r.typ(), r.major(), r.minor(), r.access().as_deref()))
            .collect();
        let b = Some(LinuxDeviceType::B);
        assert_eq!(tail, [(true, b, Some(0), Some(0), Some("rwm")), (true, b, Some(7), Some(3), Some("rm"))]);
        assert!(!rules.iter().any(|r| r.allow() && r.major().is_none() && r.access().as_deref() != Some("m")));
        assert_eq!(spec.hostname().as_deref(), Some(HOSTNAME));
    }

    #[test]
    fn terminal_gets_its_size_and_no_scratch_without_a_builtin_root() {
        let args = vec!["sh".to_string()];
        let env = environment(&[], true);
        let mut i = input(&args, &env, &[], &[]);
        i.terminal = true;
        i.scratch_tmpfs = false;
        i.readonly_root = false;
        let spec = build(&i).unwrap();
        let p = spec.process().as_ref().unwrap();
        let size = p.console_size().unwrap();
        assert_eq!((size.height(), size.width()), (24, 80));
        assert_eq!(spec.mounts().as_ref().unwrap().len(), 5);
        assert!(spec.linux().as_ref().unwrap().devices().is_none());
    }
}
