//! `shoji run --device HOST[:CONTAINER][:PERMS]`, Docker's syntax: a host block device node,
//! hot-plugged into the sandbox as virtio-blk after boot and given to the container at
//! CONTAINER (default: HOST's path) with the device cgroup permissions PERMS (any of `r`, `w`,
//! `m`; default `rwm`). The container spec names the device by the HOST's numbers; the agent
//! finds the guest node by PCI path and rewrites both the node and the cgroup rule to the
//! guest's numbers in one batch.
//!
//! Only block devices can be passed: a char device has no virtio transport here, and a node with
//! the host's numbers would point at whatever guest device has them (or at nothing). Regular
//! files (raw images) are `--disk`'s, as Docker's `--device` takes only device nodes.
use anyhow::{anyhow, Result};
use shoji_vmm::DiskConfig;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

/// The default permissions (Docker's).
pub const DEFAULT_PERMS: &str = "rwm";

/// One `--device` as typed, before the host is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceArg {
    pub host: PathBuf,
    pub container: String,
    pub perms: String,
}

/// A checked `--device`: a block device node with its host numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    pub host: PathBuf,
    /// Its path in the container.
    pub container: String,
    /// Device cgroup access: a non-empty subset of "rwm" in that order.
    pub perms: String,
    pub major: i64,
    pub minor: i64,
}

impl HostDevice {
    /// Plugged read-only when the container may not write it.
    pub fn read_only(&self) -> bool {
        !self.perms.contains('w')
    }

    /// The virtio-blk disk that carries it.
    pub fn disk(&self) -> DiskConfig {
        DiskConfig { path: self.host.clone(), read_only: self.read_only() }
    }
}

/// PERMS: each of r, w, m at most once, at least one; returned in "rwm" order.
fn perms(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > 3 || !s.chars().all(|c| "rwm".contains(c)) {
        return None;
    }
    let canonical: String = "rwm".chars().filter(|c| s.contains(*c)).collect();
    (canonical.len() == s.len()).then_some(canonical)
}

/// Parses "HOST[:CONTAINER][:PERMS]" as Docker does: a second part that is valid PERMS is the
/// permissions, anything else the container path. Nothing is looked up.
pub fn parse(spec: &str) -> Result<DeviceArg> {
    if spec.contains('\0') {
        return Err(anyhow!("device: {spec:?} contains a NUL byte"));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, container, p) = match parts[..] {
        [h] => (h, None, None),
        [h, x] => match perms(x) {
            Some(_) => (h, None, Some(x)),
            None => (h, Some(x), None),
        },
        [h, c, p] => (h, Some(c), Some(p)),
        _ => return Err(anyhow!("device: {spec:?}: expected HOST[:CONTAINER][:PERMS]")),
    };
    if host.is_empty() {
        return Err(anyhow!("device: {spec:?}: empty host path"));
    }
    let container = container.unwrap_or(host);
    if !container.starts_with('/') || container == "/" {
        return Err(anyhow!("device: {container:?}: the container path must be an absolute file path"));
    }
    if container.split('/').any(|c| c == "..") {
        return Err(anyhow!("device: {container:?}: the container path must not contain \"..\""));
    }
    let perms = match p {
        None => DEFAULT_PERMS.to_string(),
        Some(p) => {
            perms(p).ok_or_else(|| anyhow!("device: {spec:?}: bad permissions {p:?} (any of r, w, m, each once)"))?
        }
    };
    Ok(DeviceArg { host: PathBuf::from(host), container: container.to_string(), perms })
}

/// The host's node: a block device openable with the access the permissions need.
pub fn check(a: DeviceArg) -> Result<HostDevice> {
    let shown = a.host.display();
    // Follows symlinks (/dev/disk/by-id/...), as the plug's open does.
    let meta = std::fs::metadata(&a.host).map_err(|e| anyhow!("device: {shown}: {e}"))?;
    let ft = meta.file_type();
    if ft.is_char_device() {
        return Err(anyhow!("device: {shown}: character devices cannot be passed into the sandbox"));
    }
    if !ft.is_block_device() {
        return Err(anyhow!("device: {shown}: not a block device node (a raw image file goes with --disk)"));
    }
    let read_only = !a.perms.contains('w');
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&a.host)
        .map_err(|e| anyhow!("device: {shown}: {e}"))?;
    let (major, minor) = numbers(meta.rdev());
    Ok(HostDevice { host: a.host, container: a.container, perms: a.perms, major, minor })
}

/// A device number's major and minor.
fn numbers(rdev: u64) -> (i64, i64) {
    (i64::from(libc::major(rdev)), i64::from(libc::minor(rdev)))
}

/// Every `--device`, parsed and checked, then checked against each other and against the
/// container paths `taken` already (the `--disk`s): the agent's batched rewrite needs unique
/// container paths and unique host numbers.
pub fn parse_all(specs: &[String], taken: &[String]) -> Result<Vec<HostDevice>> {
    let devices = specs.iter().map(|s| check(parse(s)?)).collect::<Result<Vec<_>>>()?;
    unique(&devices, taken)?;
    Ok(devices)
}

/// No two devices share a container path (or one of `taken`) or a host device.
fn unique(devices: &[HostDevice], taken: &[String]) -> Result<()> {
    for (i, d) in devices.iter().enumerate() {
        if taken.contains(&d.container) {
            return Err(anyhow!("device: {}: {} is already a --disk's path", d.host.display(), d.container));
        }
        for o in &devices[..i] {
            if o.container == d.container {
                return Err(anyhow!(
                    "device: {} and {} would both be {} in the container",
                    o.host.display(),
                    d.host.display(),
                    d.container
                ));
            }
            if (o.major, o.minor) == (d.major, d.minor) {
                return Err(anyhow!(
                    "device: {} and {} are the same device ({}:{}); pass it once",
                    o.host.display(),
                    d.host.display(),
                    d.major,
                    d.minor
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(host: &str, container: &str, perms: &str) -> DeviceArg {
        DeviceArg { host: host.into(), container: container.into(), perms: perms.into() }
    }

    #[test]
    fn docker_syntax() {
        assert_eq!(parse("/dev/loop3").unwrap(), arg("/dev/loop3", "/dev/loop3", "rwm"));
        assert_eq!(parse("/dev/loop3:/dev/xvdz").unwrap(), arg("/dev/loop3", "/dev/xvdz", "rwm"));
        // A second part that reads as permissions is the permissions.
        assert_eq!(parse("/dev/loop3:r").unwrap(), arg("/dev/loop3", "/dev/loop3", "r"));
        assert_eq!(parse("/dev/loop3:mr").unwrap(), arg("/dev/loop3", "/dev/loop3", "rm"));
        assert_eq!(parse("/dev/loop3:/dev/xvdz:rw").unwrap(), arg("/dev/loop3", "/dev/xvdz", "rw"));
        assert_eq!(parse("/dev/loop3:/dev/xvdz:wmr").unwrap(), arg("/dev/loop3", "/dev/xvdz", "rwm"));
    }

    #[test]
    fn bad_specs_are_one_line_naming_the_flag() {
        for bad in [
            "",
            ":/dev/x",
            "/dev/loop3:/dev/x:rwx",
            "/dev/loop3:/dev/x:rr",
            "/dev/loop3:/dev/x:",
            "/dev/loop3:xvdz",
            "/dev/loop3:/",
            "/dev/loop3:/dev/../etc/x",
            "/dev/loop3:/dev/x:r:w",
            "/dev/lo\0op",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("device: ") && !e.contains('\n'), "{bad:?}: {e}");
        }
    }

    #[test]
    fn only_block_devices_pass() {
        let e = check(parse("/dev/null").unwrap()).unwrap_err().to_string();
        assert_eq!(e, "device: /dev/null: character devices cannot be passed into the sandbox");
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = check(parse(f.path().to_str().unwrap()).unwrap()).unwrap_err().to_string();
        assert!(e.ends_with("not a block device node (a raw image file goes with --disk)"), "{e}");
        let e = check(parse("/nonexistent/dev/x").unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("device: /nonexistent/dev/x: No such file"), "{e}");
    }

    #[test]
    fn a_block_device_gets_its_host_numbers() {
        // Any block device this host has (loop devices usually exist, sometimes only as nodes).
        let Some(node) = std::fs::read_dir("/dev").unwrap().flatten().map(|e| e.path()).find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()) && std::fs::File::open(p).is_ok()
        }) else {
            eprintln!("no readable block device node in /dev: skipped");
            return;
        };
        let rdev = std::fs::metadata(&node).unwrap().rdev();
        let d = check(parse(&format!("{}:/dev/xvdz:r", node.display())).unwrap()).unwrap();
        assert_eq!((d.major, d.minor), (i64::from(libc::major(rdev)), i64::from(libc::minor(rdev))));
        assert!(d.read_only() && d.disk().read_only);
        assert_eq!(d.container, "/dev/xvdz");
    }

    #[test]
    fn device_numbers_split_as_the_kernel_does() {
        // makedev(259, 1048577): the major's high bits and the minor's high bits.
        let rdev = libc::makedev(259, 0x10_0001);
        assert_eq!(numbers(rdev), (259, 0x10_0001));
        assert_eq!(numbers(libc::makedev(7, 3)), (7, 3));
    }

    #[test]
    fn container_paths_and_host_devices_are_unique() {
        let d = |host: &str, container: &str, major, minor| HostDevice {
            host: host.into(),
            container: container.into(),
            perms: "rwm".into(),
            major,
            minor,
        };
        assert!(unique(&[d("/dev/loop0", "/dev/a", 7, 0), d("/dev/loop1", "/dev/b", 7, 1)], &[]).is_ok());
        let e = unique(&[d("/dev/loop0", "/dev/a", 7, 0), d("/dev/loop1", "/dev/a", 7, 1)], &[]).unwrap_err();
        assert!(e.to_string().contains("would both be /dev/a"), "{e}");
        let e = unique(&[d("/dev/loop0", "/dev/a", 7, 0), d("/dev/l0", "/dev/b", 7, 0)], &[]).unwrap_err();
        assert!(e.to_string().contains("are the same device (7:0)"), "{e}");
        let e = unique(&[d("/dev/loop0", "/dev/vda", 7, 0)], &["/dev/vda".into()]).unwrap_err();
        assert!(e.to_string().contains("already a --disk's path"), "{e}");
    }
}
