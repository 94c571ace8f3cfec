//! Host devices a container's spec names (`linux.devices`, from `ctr run --device` or CRI
//! `devices`), as the sandbox can take them.
//!
//! A host node means nothing inside the VM: its major:minor name some other guest device, or
//! none. So each block device is hot-plugged as virtio-blk, and the agent rewrites the entry
//! (and the device cgroup rules naming it) to the guest node it finds by PCI path. Anything else
//! (character devices, FIFOs) cannot be passed and fails Create, naming the entry.
//!
//! The spec carries the CONTAINER path and the host's numbers, not the host path: the host node
//! is found by its numbers (`/sys/dev/block/MAJ:MIN/uevent` names it under /dev) and opened
//! once, without following links, and checked to be that block device; the VMM opens it again
//! through that descriptor (`/proc/self/fd/N`), never by a name resolved twice.
//!
//! A privileged container's spec lists every host device (containerd's `WithHostDevices`,
//! alongside a device cgroup that allows everything): those are the host's, not asked for, and
//! are dropped (logged); the container gets the guest's devices instead.
use serde_json::Value;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where the kernel names block devices by number.
pub const SYS_DEV_BLOCK: &str = "/sys/dev/block";
/// Where the host's device nodes live.
pub const DEV: &str = "/dev";

/// One block device to hot-plug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Its index in `linux.devices` (for messages).
    pub index: usize,
    /// Where the container sees it (the entry's `path`).
    pub container_path: String,
    /// The host's numbers (the entry's).
    pub major: u32,
    pub minor: u32,
    /// The device cgroup does not let the container write it.
    pub read_only: bool,
}

/// What to do with a spec's `linux.devices`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub blocks: Vec<BlockDevice>,
    /// A privileged spec's host devices, dropped (their count).
    pub dropped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("linux.devices[{index}] {path}: character devices cannot be passed into the sandbox")]
    Char { index: usize, path: String },
    #[error("linux.devices[{index}] {path}: FIFOs cannot be passed into the sandbox")]
    Fifo { index: usize, path: String },
    #[error("linux.devices[{index}] {path}: {why}")]
    Invalid { index: usize, path: String, why: String },
    #[error("linux.devices[{index}] {path}: the same host device (b {major}:{minor}) as linux.devices[{first}]")]
    Duplicate { index: usize, path: String, major: u32, minor: u32, first: usize },
    #[error("linux.devices[{index}] {path}: host block device {major}:{minor}: {source}")]
    Host { index: usize, path: String, major: u32, minor: u32, source: io::Error },
}

/// The plan for `spec`'s `linux.devices`: the block devices to plug, or an error naming the
/// first entry the sandbox cannot take. Pure: reads nothing on the host.
pub fn plan(spec: &Value) -> Result<Plan, DeviceError> {
    let linux = spec.get("linux");
    let entries = linux.and_then(|l| l.get("devices")).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let rules =
        linux.and_then(|l| l.pointer("/resources/devices")).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    if !entries.is_empty() && allows_all(rules) {
        return Ok(Plan { blocks: Vec::new(), dropped: entries.len() });
    }
    let mut blocks: Vec<BlockDevice> = Vec::new();
    for (index, e) in entries.iter().enumerate() {
        let path = e.get("path").and_then(Value::as_str).unwrap_or_default().to_string();
        let invalid = |why: &str| DeviceError::Invalid { index, path: path.clone(), why: why.into() };
        if !path.starts_with('/') {
            return Err(invalid("the path is not absolute"));
        }
        match e.get("type").and_then(Value::as_str) {
            Some("b") => {}
            Some("c" | "u") => return Err(DeviceError::Char { index, path }),
            Some("p") => return Err(DeviceError::Fifo { index, path }),
            Some(t) => return Err(invalid(&format!("unknown device type {t:?}"))),
            None => return Err(invalid("no device type")),
        }
        let number = |k: &str| e.get(k).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
        let (Some(major), Some(minor)) = (number("major"), number("minor")) else {
            return Err(invalid("a block device without its major and minor numbers"));
        };
        // The agent's batch maps host numbers to one guest device each.
        if let Some(first) = blocks.iter().find(|b| (b.major, b.minor) == (major, minor)) {
            return Err(DeviceError::Duplicate { index, path, major, minor, first: first.index });
        }
        let read_only = !access(rules, major, minor).contains('w');
        blocks.push(BlockDevice { index, container_path: path, major, minor, read_only });
    }
    Ok(Plan { blocks, dropped: 0 })
}

/// Empties `linux.devices` (a privileged spec's host devices, see [`Plan::dropped`]).
pub fn drop_host_devices(spec: &mut Value) {
    if let Some(d) = spec.pointer_mut("/linux/devices") {
        *d = Value::Array(Vec::new());
    }
}

fn rule_type(r: &Value) -> &str {
    r.get("type").and_then(Value::as_str).unwrap_or("a")
}

fn rule_access(r: &Value) -> &str {
    r.get("access").and_then(Value::as_str).unwrap_or("rwm")
}

fn is_allow(r: &Value) -> bool {
    r.get("allow").and_then(Value::as_bool).unwrap_or(false)
}

/// Whether the device cgroup ends up allowing every device (a privileged container): the last
/// rule naming all devices allows them all.
fn allows_all(rules: &[Value]) -> bool {
    let all = |r: &&Value| {
        rule_type(r) == "a" && r.get("major").is_none_or(Value::is_null) && r.get("minor").is_none_or(Value::is_null)
    };
    rules.iter().rfind(all).is_some_and(|r| is_allow(r) && ["r", "w", "m"].iter().all(|c| rule_access(r).contains(c)))
}

/// The access (a subset of "rwm") the device cgroup rules give block device `major:minor`, as
/// the kernel's device cgroup applies them in order (each matching rule adds or takes away its
/// access). No rules at all: the spec restricts nothing.
pub fn access(rules: &[Value], major: u32, minor: u32) -> String {
    if rules.is_empty() {
        return "rwm".into();
    }
    let matches = |r: &Value, k: &str, n: u32| match r.get(k) {
        None | Some(Value::Null) => true,
        Some(v) => v.as_i64() == Some(i64::from(n)),
    };
    let mut granted = String::new();
    for r in rules {
        if !matches!(rule_type(r), "a" | "b") || !matches(r, "major", major) || !matches(r, "minor", minor) {
            continue;
        }
        for c in ['r', 'w', 'm'] {
            if rule_access(r).contains(c) {
                granted.retain(|g| g != c);
                if is_allow(r) {
                    granted.push(c);
                }
            }
        }
    }
    ['r', 'w', 'm'].iter().filter(|c| granted.contains(**c)).collect()
}

/// A host block device, open without following links and checked to be `major:minor`.
#[derive(Debug)]
pub struct HostNode {
    /// O_PATH: pins the node; the VMM opens it through [`HostNode::fd_path`].
    file: File,
    /// Where it was found (for logs).
    pub path: PathBuf,
}

impl HostNode {
    /// A path that reopens exactly this node.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// The `DEVNAME` of a sysfs `uevent` file: the node's name under /dev.
pub fn uevent_devname(uevent: &str) -> Option<&str> {
    uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(str::trim).filter(|n| !n.is_empty())
}

/// Finds block device `major:minor` under `dev` by its name in `sys_dev_block` and opens it
/// (O_PATH, beneath `dev`, no symlinks): it must be that very block device.
pub fn open_host_block(sys_dev_block: &Path, dev: &Path, major: u32, minor: u32) -> io::Result<HostNode> {
    let uevent = sys_dev_block.join(format!("{major}:{minor}")).join("uevent");
    let text =
        std::fs::read_to_string(&uevent).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", uevent.display())))?;
    let name = uevent_devname(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{}: no DEVNAME", uevent.display())))?;
    let dir = crate::mount::open_dir(dev)?;
    let cname = crate::mount::cstr(name.as_bytes(), "DEVNAME")?;
    let path = dev.join(name);
    let fd = crate::mount::openat2(dir.as_fd(), &cname, libc::O_PATH, 0, crate::mount::BENEATH)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let file = File::from(fd);
    let md = file.metadata()?;
    if !md.file_type().is_block_device() || md.rdev() != libc::makedev(major, minor) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not block device {major}:{minor}", path.display()),
        ));
    }
    Ok(HostNode { file, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::ffi::OsStrExt;

    fn is_fd_path(path: &Path) -> bool {
        path.as_os_str().as_bytes().starts_with(b"/proc/self/fd/")
    }

    /// What `ctr run --device /dev/loop3` puts in the spec (containerd 1.6, printed by `ctr c info`).
    fn ctr_spec() -> Value {
        json!({"linux": {
            "devices": [{"path": "/dev/xvdz", "type": "b", "major": 7, "minor": 3, "fileMode": 384, "uid": 0, "gid": 0}],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                {"allow": true, "type": "c", "major": 136, "access": "rwm"},
                {"allow": true, "type": "b", "major": 7, "minor": 3, "access": "rwm"}
            ]}
        }})
    }

    #[test]
    fn block_devices_become_plugs_with_the_container_path() {
        let p = plan(&ctr_spec()).unwrap();
        assert_eq!(
            p,
            Plan {
                blocks: vec![BlockDevice {
                    index: 0,
                    container_path: "/dev/xvdz".into(),
                    major: 7,
                    minor: 3,
                    read_only: false
                }],
                dropped: 0
            }
        );
    }

    #[test]
    fn no_devices_and_the_default_spec_plan_nothing() {
        assert_eq!(plan(&json!({})).unwrap(), Plan::default());
        let mut s = ctr_spec();
        s["linux"]["devices"] = Value::Null;
        assert_eq!(plan(&s).unwrap(), Plan::default());
    }

    #[test]
    fn char_devices_and_fifos_are_refused_naming_index_and_path() {
        let mut s = ctr_spec();
        s["linux"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64}));
        let e = plan(&s).unwrap_err().to_string();
        assert_eq!(e, "linux.devices[1] /dev/ttyS0: character devices cannot be passed into the sandbox");
        s["linux"]["devices"][1]["type"] = json!("u");
        assert!(matches!(plan(&s), Err(DeviceError::Char { index: 1, .. })));
        s["linux"]["devices"][1] = json!({"path": "/dev/fifo", "type": "p"});
        assert_eq!(
            plan(&s).unwrap_err().to_string(),
            "linux.devices[1] /dev/fifo: FIFOs cannot be passed into the sandbox"
        );
    }

    #[test]
    fn malformed_and_duplicate_entries_are_refused() {
        let mut s = ctr_spec();
        s["linux"]["devices"][0]["minor"] = Value::Null;
        assert!(plan(&s).unwrap_err().to_string().contains("without its major and minor"));
        let mut s = ctr_spec();
        s["linux"]["devices"][0]["path"] = json!("dev/x");
        assert!(plan(&s).unwrap_err().to_string().contains("not absolute"));
        let mut s = ctr_spec();
        s["linux"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"path": "/dev/other", "type": "b", "major": 7, "minor": 3}));
        assert_eq!(
            plan(&s).unwrap_err().to_string(),
            "linux.devices[1] /dev/other: the same host device (b 7:3) as linux.devices[0]"
        );
    }

    #[test]
    fn access_follows_the_rules_in_order() {
        let r = |v: Value| v.as_array().unwrap().clone();
        assert_eq!(access(&[], 7, 3), "rwm");
        assert_eq!(access(&r(json!([{"allow": false, "access": "rwm"}])), 7, 3), "");
        let ro = r(
            json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "b", "major": 7, "minor": 3, "access": "rm"}]),
        );
        assert_eq!(access(&ro, 7, 3), "rm");
        assert_eq!(access(&ro, 7, 4), "", "another minor");
        // A later deny takes away what an earlier allow gave; char rules do not count.
        let later = r(json!([
            {"allow": true, "type": "b", "major": 7, "access": "rwm"},
            {"allow": false, "type": "b", "major": 7, "minor": 3, "access": "w"},
            {"allow": true, "type": "c", "major": 7, "minor": 3, "access": "w"}
        ]));
        assert_eq!(access(&later, 7, 3), "rm");
        assert_eq!(access(&later, 7, 9), "rwm");
    }

    #[test]
    fn a_device_the_cgroup_does_not_let_write_is_plugged_read_only() {
        let mut s = ctr_spec();
        s["linux"]["resources"]["devices"][3]["access"] = json!("r");
        assert!(plan(&s).unwrap().blocks[0].read_only);
        // CRI's "mrw" permissions: writable.
        s["linux"]["resources"]["devices"][3]["access"] = json!("mrw");
        assert!(!plan(&s).unwrap().blocks[0].read_only);
        // No rule for it behind the deny-all: not writable either.
        s["linux"]["resources"]["devices"].as_array_mut().unwrap().pop();
        assert!(plan(&s).unwrap().blocks[0].read_only);
    }

    #[test]
    fn a_privileged_specs_host_devices_are_dropped_not_refused() {
        // ctr run --privileged: every host device, char ones too, and an allow-all cgroup.
        let mut s = json!({"linux": {
            "devices": [
                {"path": "/dev/btrfs-control", "type": "c", "major": 10, "minor": 234},
                {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0}
            ],
            "resources": {"devices": [{"allow": true, "access": "rwm"}]}
        }});
        assert_eq!(plan(&s).unwrap(), Plan { blocks: vec![], dropped: 2 });
        drop_host_devices(&mut s);
        assert_eq!(s["linux"]["devices"], json!([]));
        // An allow-all taken back by a later deny-all is not privileged.
        s["linux"]["devices"] = json!([{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11}]);
        s["linux"]["resources"]["devices"].as_array_mut().unwrap().push(json!({"allow": false, "access": "rwm"}));
        assert!(matches!(plan(&s), Err(DeviceError::Char { index: 0, .. })));
        // Allow-all for reads only is not either.
        s["linux"]["resources"]["devices"] = json!([{"allow": true, "type": "a", "access": "r"}]);
        assert!(plan(&s).is_err());
    }

    #[test]
    fn uevent_names_the_node() {
        assert_eq!(uevent_devname("MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n"), Some("loop3"));
        assert_eq!(uevent_devname("MAJOR=7\nDEVNAME=\n"), None);
        assert_eq!(uevent_devname(""), None);
    }

    fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) {
        let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        let r = unsafe { libc::mknod(p.as_ptr(), mode | 0o600, libc::makedev(major, minor)) };
        assert_eq!(r, 0, "mknod {}: {}", path.display(), io::Error::last_os_error());
    }

    /// The host node by its numbers, in a fake sysfs and /dev: found and pinned when it is that
    /// block device; refused when the name is a symlink, the wrong numbers, a char device, or
    /// escapes /dev.
    #[test]
    fn host_nodes_are_found_by_number_and_opened_without_links() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (mknod); CI runs as root");
        let tmp = tempfile::tempdir().unwrap();
        let (sys, dev) = (tmp.path().join("sys"), tmp.path().join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        let entry = |n: &str, name: &str| {
            std::fs::create_dir_all(sys.join(n)).unwrap();
            std::fs::write(sys.join(n).join("uevent"), format!("MAJOR=0\nDEVNAME={name}\n")).unwrap();
        };
        mknod(&dev.join("loop3"), libc::S_IFBLK, 7, 3);
        mknod(&dev.join("ttyX"), libc::S_IFCHR, 7, 5);
        std::os::unix::fs::symlink("loop3", dev.join("link")).unwrap();
        std::fs::write(tmp.path().join("outside"), "x").unwrap();
        entry("7:3", "loop3");
        entry("7:4", "link");
        entry("7:5", "ttyX");
        entry("7:6", "../outside");
        entry("7:7", "loop3");

        let n = open_host_block(&sys, &dev, 7, 3).unwrap();
        assert_eq!(n.path, dev.join("loop3"));
        assert!(is_fd_path(&n.fd_path()));
        let md = std::fs::metadata(n.fd_path()).unwrap();
        assert_eq!(md.rdev(), libc::makedev(7, 3));

        let err = |minor| open_host_block(&sys, &dev, 7, minor).unwrap_err().to_string();
        assert!(err(4).contains("link"), "{}", err(4));
        assert!(err(5).contains("is not block device 7:5"), "{}", err(5));
        assert!(!err(6).is_empty());
        assert!(err(7).contains("is not block device 7:7"), "{}", err(7));
        assert!(err(8).contains("7:8/uevent"), "{}", err(8));
    }
}
