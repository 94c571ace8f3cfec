//! A checked [`Plan`] as stored in a detached sandbox's `state.json`: `shoji run -d` plans and
//! checks once, the sandbox process (`shoji __sandbox NAME`) boots from the stored plan, so
//! nothing is parsed twice (no argv, no clap) and both see the same values (`-e K` already
//! holds its value, paths are canonical).
//!
//! A mirror rather than serde on [`Plan`] itself: the VMM's `DiskConfig` and `ShareConfig`
//! have no serde, and the on-disk shape stays put when the in-memory one changes.
use super::device::{self, DeviceArg};
use super::image::Image;
use super::{Plan, Rootfs};
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use shoji_vmm::{DiskConfig, ShareConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Where the container's root comes from ([`Rootfs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SavedRootfs {
    BuiltIn,
    /// [`SavedPlan::image`].
    Image,
    Dir(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A `--device` as checked by `shoji run -d` (the sandbox process checks the node again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedDevice {
    pub host: PathBuf,
    pub container: String,
    pub perms: String,
    pub major: i64,
    pub minor: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedShare {
    pub dir: PathBuf,
    pub tag: String,
    pub read_only: bool,
    /// Its name under /mnt.
    pub name: String,
}

/// [`Plan`], storable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedPlan {
    pub rootfs: SavedRootfs,
    /// What the image's cached rootfs is found (or unpacked) by.
    pub image: Option<Image>,
    pub env: Vec<String>,
    pub workdir: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<SavedDisk>,
    pub shares: Vec<SavedShare>,
    pub interactive: bool,
    pub tty: bool,
    pub timeout: Option<Duration>,
    pub command: Vec<String>,
    pub seccomp: bool,
    #[serde(default)]
    pub devices: Vec<SavedDevice>,
    #[serde(default)]
    pub net: super::net::NetMode,
}

impl From<&Plan> for SavedPlan {
    fn from(p: &Plan) -> SavedPlan {
        SavedPlan {
            rootfs: match &p.rootfs {
                Rootfs::BuiltIn => SavedRootfs::BuiltIn,
                Rootfs::Image => SavedRootfs::Image,
                Rootfs::Dir(d) => SavedRootfs::Dir(d.clone()),
            },
            image: p.image.clone(),
            env: p.env.clone(),
            workdir: p.workdir.clone(),
            cpus: p.cpus,
            memory_mib: p.memory_mib,
            disks: p.disks.iter().map(|d| SavedDisk { path: d.path.clone(), read_only: d.read_only }).collect(),
            shares: p
                .shares
                .iter()
                .map(|(s, name)| SavedShare {
                    dir: s.dir.clone(),
                    tag: s.tag.clone(),
                    read_only: s.read_only,
                    name: name.clone(),
                })
                .collect(),
            interactive: p.interactive,
            tty: p.tty,
            timeout: p.timeout,
            command: p.command.clone(),
            seccomp: p.seccomp,
            devices: p
                .devices
                .iter()
                .map(|d| SavedDevice {
                    host: d.host.clone(),
                    container: d.container.clone(),
                    perms: d.perms.clone(),
                    major: d.major,
                    minor: d.minor,
                })
                .collect(),
            net: p.net,
        }
    }
}

/// Back to a plan. The file is ours (a 0700 directory), so this only checks that it is whole:
/// what the agent request and the VM config are built from without further checks.
impl TryFrom<SavedPlan> for Plan {
    type Error = anyhow::Error;

    fn try_from(s: SavedPlan) -> Result<Plan> {
        let rootfs = match s.rootfs {
            SavedRootfs::BuiltIn => Rootfs::BuiltIn,
            SavedRootfs::Image if s.image.is_none() => return Err(anyhow!("plan: an image rootfs without its image")),
            SavedRootfs::Image => Rootfs::Image,
            SavedRootfs::Dir(d) if d.is_absolute() => Rootfs::Dir(d),
            SavedRootfs::Dir(d) => return Err(anyhow!("plan: rootfs {} is not an absolute path", d.display())),
        };
        if s.command.first().is_none_or(|c| c.is_empty()) || s.command.iter().any(|c| c.contains('\0')) {
            return Err(anyhow!("plan: command {:?} is not a command", s.command));
        }
        if !s.workdir.starts_with('/') || s.workdir.contains('\0') {
            return Err(anyhow!("plan: workdir {:?} is not an absolute path", s.workdir));
        }
        if s.disks.len() > 26 {
            return Err(anyhow!("plan: {} disks; at most 26", s.disks.len()));
        }
        // The node is looked at again: it must still be the block device `run -d` checked.
        let devices = s
            .devices
            .into_iter()
            .map(|d| {
                let arg = DeviceArg { host: d.host, container: d.container, perms: d.perms };
                let now = device::check(arg)?;
                if (now.major, now.minor) != (d.major, d.minor) {
                    return Err(anyhow!(
                        "device: {} is {}:{} now, not {}:{} as when `shoji run -d` checked it",
                        now.host.display(),
                        now.major,
                        now.minor,
                        d.major,
                        d.minor
                    ));
                }
                Ok(now)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            rootfs,
            image: s.image,
            env: s.env,
            workdir: s.workdir,
            cpus: s.cpus,
            memory_mib: s.memory_mib,
            disks: s.disks.into_iter().map(|d| DiskConfig { path: d.path, read_only: d.read_only }).collect(),
            shares: s
                .shares
                .into_iter()
                .map(|s| (ShareConfig { dir: s.dir, tag: s.tag, read_only: s.read_only }, s.name))
                .collect(),
            interactive: s.interactive,
            tty: s.tty,
            timeout: s.timeout,
            command: s.command,
            net: s.net,
            seccomp: s.seccomp,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rootfs: Rootfs) -> Plan {
        Plan {
            rootfs,
            image: None,
            env: vec!["A=1".into(), "B=two words".into()],
            workdir: "/tmp".into(),
            cpus: 2,
            memory_mib: 300,
            disks: vec![DiskConfig { path: "/x.img".into(), read_only: true }],
            shares: vec![(
                ShareConfig { dir: "/srv/data".into(), tag: "share0".into(), read_only: false },
                "data".into(),
            )],
            interactive: false,
            tty: true,
            timeout: Some(Duration::from_millis(1500)),
            command: vec!["sh".into(), "-c".into(), "echo $A".into()],
            seccomp: false,
            devices: vec![],
            net: crate::run::net::NetMode::User,
        }
    }

    fn round_trip(p: &Plan) -> Result<Plan> {
        let json = serde_json::to_string(&SavedPlan::from(p))?;
        Plan::try_from(serde_json::from_str::<SavedPlan>(&json)?)
    }

    #[test]
    fn a_plan_survives_the_round_trip_through_json() {
        for rootfs in [Rootfs::BuiltIn, Rootfs::Dir("/srv/root".into())] {
            let p = plan(rootfs);
            assert_eq!(format!("{:?}", round_trip(&p).unwrap()), format!("{p:?}"));
        }
    }

    #[test]
    fn an_incomplete_plan_is_refused() {
        let bad = |f: fn(&mut Plan)| {
            let mut p = plan(Rootfs::BuiltIn);
            f(&mut p);
            round_trip(&p).unwrap_err().to_string()
        };
        assert!(bad(|p| p.rootfs = Rootfs::Image).contains("without its image"));
        assert!(bad(|p| p.rootfs = Rootfs::Dir("rel".into())).contains("not an absolute path"));
        assert!(bad(|p| p.command.clear()).starts_with("plan: command"));
        assert!(bad(|p| p.workdir = "tmp".into()).starts_with("plan: workdir"));
    }

    #[test]
    fn a_saved_device_is_checked_again() {
        let mut saved = SavedPlan::from(&plan(Rootfs::BuiltIn));
        saved.devices.push(SavedDevice {
            host: "/nonexistent/dev/loop3".into(),
            container: "/dev/xvdz".into(),
            perms: "rwm".into(),
            major: 7,
            minor: 3,
        });
        let json = serde_json::to_string(&saved).unwrap();
        let e = Plan::try_from(serde_json::from_str::<SavedPlan>(&json).unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("device: /nonexistent/dev/loop3: No such file"), "{e}");
        // A state.json from before devices were saved has none.
        let old = json.replace(r#","devices":[{"host":"/nonexistent/dev/loop3","container":"/dev/xvdz","perms":"rwm","major":7,"minor":3}]"#, "");
        assert!(!old.contains("devices"), "{old}");
        assert!(Plan::try_from(serde_json::from_str::<SavedPlan>(&old).unwrap()).unwrap().devices.is_empty());
    }
}
