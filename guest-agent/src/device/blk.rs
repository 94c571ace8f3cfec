//! virtio-blk disks found by PCI path: look in sysfs, else rescan the PCI bus once (a device
//! hot-added by the VMM is only found by a scan: the guest runs without ACPI hotplug) and wait
//! for the disk's uevent.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoji_devices::model::PciPath;

use super::pci::{pci_path_to_sysfs, pci_rescan, PciResolveError};
use super::uevent::{Uevent, UeventSource, UeventWait};
use super::{DeviceContext, DeviceError, DeviceRequest, DeviceUpdate};

/// The request kind whose `id` is the PCI path of a virtio-blk device.
pub const KIND: &str = "blk";

/// The `blk` handler: the disk behind the PCI path in `req.id`, as an update for
/// `req.container_path` with the guest node's numbers. `None` when `container_path` is empty
/// (wait for the disk, change nothing in the spec).
pub fn handle(req: &DeviceRequest, ctx: &mut DeviceContext<'_>) -> Result<Option<DeviceUpdate>, DeviceError> {
    let pci_path: PciPath = req.id.parse().map_err(|source| DeviceError::BadPciPath { id: req.id.clone(), source })?;
    let node = wait_for_virtio_blk(&pci_path, &ctx.sysfs_root, &ctx.dev_root, &mut *ctx.uevents, ctx.hotplug_timeout)?;
    tracing::debug!(pci_path = %pci_path, node = %node.display(), "virtio-blk disk found");
    super::update_for(req, &node)
}

/// The /dev node of the virtio-blk disk at `pci_path`, waiting up to `timeout` for it.
///
/// First looks in sysfs (`<pci dev>/virtio<N>/block/<name>`, with `<dev_root>/<name>` present);
/// if the PCI function (or a bridge on its way) is not there, rescans the PCI bus once (see
/// [`rescan`]); then waits for the kernel's `add` uevent of a block device directly under
/// `<pci dev>/virtio<N>/block/`. `uevents` must have been listening since before this call.
pub fn wait_for_virtio_blk(
    pci_path: &PciPath,
    sysfs_root: &Path,
    dev_root: &Path,
    uevents: &mut dyn UeventSource,
    timeout: Duration,
) -> Result<PathBuf, DeviceError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let (dev_dir, rescanned) = resolve(sysfs_root, pci_path)?;
    // DEVPATH in uevents is relative to the sysfs mount.
    let devpath = match dev_dir.strip_prefix(sysfs_root).ok().and_then(Path::to_str) {
        Some(rel) => format!("/{rel}"),
        None => return Err(DeviceError::Sysfs { path: dev_dir, source: io::Error::other("not a UTF-8 path") }),
    };

    // The disk may be in sysfs before devtmpfs has made its node; its uevent comes after the
    // node, so in that case keep waiting for the uevent.
    let mut seen_in_sysfs = None;
    let look_in_sysfs = |seen: &mut Option<PathBuf>| -> Result<Option<PathBuf>, DeviceError> {
        let Some(name) = find_virtio_blk(&dev_dir)? else {
            return Ok(None);
        };
        let node = dev_node(dev_root, &name, pci_path)?;
        if node.exists() {
            return Ok(Some(node));
        }
        *seen = Some(node);
        Ok(None)
    };

    if let Some(node) = look_in_sysfs(&mut seen_in_sysfs)? {
        return Ok(node);
    }
    if !rescanned && !dev_dir.exists() {
        rescan(sysfs_root, pci_path);
        // The scan is synchronous: the disk is usually there now. Its uevent is queued too.
        if let Some(node) = look_in_sysfs(&mut seen_in_sysfs)? {
            return Ok(node);
        }
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let waited = start.elapsed();
            return Err(match seen_in_sysfs {
                Some(node) => DeviceError::NodeMissing { pci_path: pci_path.to_string(), node, waited },
                None => DeviceError::Timeout { pci_path: pci_path.to_string(), waited },
            });
        }
        match uevents.next_event(remaining).map_err(DeviceError::Uevent)? {
            UeventWait::Event(ev) => {
                if let Some(name) = match_blk_uevent(&ev, &devpath) {
                    return dev_node(dev_root, name, pci_path);
                }
                tracing::trace!(devpath = ev.devpath(), action = ev.action(), "uevent ignored");
            }
            UeventWait::Overrun => {
                tracing::debug!("uevents were dropped; looking in sysfs again");
                if let Some(node) = look_in_sysfs(&mut seen_in_sysfs)? {
                    return Ok(node);
                }
            }
            UeventWait::Timeout => {}
        }
    }
}

/// The sysfs directory of the function at `pci_path`, and whether the bus had to be rescanned
/// to get there (a hot-added bridge is found by the same scan as a device).
pub(crate) fn resolve(sysfs_root: &Path, pci_path: &PciPath) -> Result<(PathBuf, bool), DeviceError> {
    match pci_path_to_sysfs(sysfs_root, pci_path) {
        Ok(dir) => Ok((dir, false)),
        Err(PciResolveError::MissingBridge { .. }) => {
            rescan(sysfs_root, pci_path);
            Ok((pci_path_to_sysfs(sysfs_root, pci_path)?, true))
        }
        Err(e) => Err(e.into()),
    }
}

/// Rescans the PCI bus for the device at `pci_path`. A failure is logged, not returned: the
/// wait that follows still ends at its deadline with the error that says what is missing.
pub fn rescan(sysfs_root: &Path, pci_path: &PciPath) {
    match pci_rescan(sysfs_root) {
        Ok(()) => tracing::debug!(pci_path = %pci_path, "PCI device not in sysfs; the bus was rescanned"),
        Err(e) => tracing::warn!(
            pci_path = %pci_path,
            "PCI device not in sysfs and {} could not be written: {e}",
            sysfs_root.join(super::pci::PCI_RESCAN).display()
        ),
    }
}

/// The name of the block device under a virtio PCI device's sysfs dir (`virtio<N>/block/<name>`),
/// `None` if the device or its disk is not there (yet).
pub fn find_virtio_blk(pci_dev_dir: &Path) -> Result<Option<String>, DeviceError> {
    let sysfs_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DeviceError::Sysfs { path, source }
    };
    let entries = match std::fs::read_dir(pci_dev_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(sysfs_err(pci_dev_dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(sysfs_err(pci_dev_dir))?;
        if !entry.file_name().to_str().is_some_and(is_virtio_dev_name) {
            continue;
        }
        let block = entry.path().join("block");
        let disks = match std::fs::read_dir(&block) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(sysfs_err(&block)(e)),
        };
        for disk in disks {
            let disk = disk.map_err(sysfs_err(&block))?;
            names.push(disk.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    match names.len() {
        0 => Ok(None),
        1 => Ok(names.pop()),
        _ => Err(DeviceError::SeveralDisks { sysfs: pci_dev_dir.to_path_buf(), names }),
    }
}

/// The disk name if `ev` is the `add` of a whole block device directly under
/// `<pci_devpath>/virtio<N>/block/` (partitions, other devices and other actions do not match).
pub fn match_blk_uevent<'a>(ev: &'a Uevent, pci_devpath: &str) -> Option<&'a str> {
    if ev.action() != "add" || ev.subsystem() != "block" {
        return None;
    }
    let rest = ev.devpath().strip_prefix(pci_devpath)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (Some(virtio), Some("block"), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !is_virtio_dev_name(virtio) || name.is_empty() {
        return None;
    }
    Some(ev.devname().unwrap_or(name))
}

/// "virtio" followed by a decimal index, as the virtio bus names its devices.
pub(crate) fn is_virtio_dev_name(name: &str) -> bool {
    name.strip_prefix("virtio").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `<dev_root>/<name>`, refusing names that would leave `dev_root`.
fn dev_node(dev_root: &Path, name: &str, pci_path: &PciPath) -> Result<PathBuf, DeviceError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(DeviceError::BadDevName { pci_path: pci_path.to_string(), name: name.to_owned() });
    }
    Ok(dev_root.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::uevent::ChannelUevents;
    use crate::device::{handle_devices, DeviceContext};
    use std::fs;
    use std::os::unix::fs::symlink;

    const PCI_DEV: &str = "devices/pci0000:00/0000:00:02.0/0000:01:03.0";
    const DEVPATH: &str = "/devices/pci0000:00/0000:00:02.0/0000:01:03.0";

    /// A fake sysfs with a bridge in slot 2 (bus 1) and a fake /dev whose nodes are symlinks to
    /// /dev/null (char 1:3): `stat` follows them, and no root is needed to make them.
    struct Fake {
        sysfs: tempfile::TempDir,
        dev: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Fake {
            let sysfs = tempfile::tempdir().unwrap();
            let bridge = sysfs.path().join("devices/pci0000:00/0000:00:02.0");
            fs::create_dir_all(bridge.join("pci_bus/0000:01")).unwrap();
            Fake { sysfs, dev: tempfile::tempdir().unwrap() }
        }
        fn add_disk(&self, name: &str) {
            fs::create_dir_all(self.sysfs.path().join(PCI_DEV).join("virtio4/block").join(name)).unwrap();
        }
        fn add_node(&self, name: &str) {
            symlink("/dev/null", self.dev.path().join(name)).unwrap();
        }
        fn ctx<'a>(&self, uevents: &'a mut dyn UeventSource, timeout: Duration) -> DeviceContext<'a> {
            DeviceContext {
                sysfs_root: self.sysfs.path().to_path_buf(),
                dev_root: self.dev.path().to_path_buf(),
                hotplug_timeout: timeout,
                uevents,
            }
        }
    }

    fn blk_request(pci: &str, container_path: &str) -> DeviceRequest {
        DeviceRequest {
            id: pci.into(),
            kind: KIND.into(),
            vm_path: None,
            container_path: container_path.into(),
            options: vec![],
        }
    }

    fn add_block(devpath: &str, name: &str) -> Uevent {
        Uevent::from_pairs([("ACTION", "add"), ("SUBSYSTEM", "block"), ("DEVPATH", devpath), ("DEVNAME", name)])
    }

    #[test]
    fn disk_already_present() {
        let fake = Fake::new();
        fake.add_disk("vdb");
        fake.add_node("vdb");
        let (_tx, mut src) = ChannelUevents::new();
        let mut ctx = fake.ctx(&mut src, Duration::from_secs(5));
        let updates = handle_devices(&[blk_request("02/03", "/dev/xvda")], &mut ctx).unwrap();
        assert_eq!(
            updates,
            vec![DeviceUpdate { container_path: "/dev/xvda".into(), guest_major: 1, guest_minor: 3, final_path: None }]
        );
    }

    /// Tells the test each time the code under test starts waiting for a uevent.
    struct Announcing {
        inner: ChannelUevents,
        waiting: std::sync::mpsc::Sender<()>,
    }
    impl UeventSource for Announcing {
        fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
            let _ = self.waiting.send(());
            self.inner.next_event(timeout)
        }
    }

    #[test]
    fn disk_appears_after_its_uevent() {
        let fake = Fake::new();
        let (tx, inner) = ChannelUevents::new();
        let (waiting_tx, waiting) = std::sync::mpsc::channel();
        let mut src = Announcing { inner, waiting: waiting_tx };
        let sysfs = fake.sysfs.path().to_path_buf();
        let dev = fake.dev.path().to_path_buf();
        let feeder = std::thread::spawn(move || {
            // Only once the handler has looked in sysfs and is waiting.
            waiting.recv().unwrap();
            // Unrelated: another PCI device's disk, a partition of ours, a net device.
            tx.send(add_block("/devices/pci0000:00/0000:00:05.0/virtio2/block/vdc", "vdc")).unwrap();
            tx.send(add_block(&format!("{DEVPATH}/virtio4/block/vdb/vdb1"), "vdb1")).unwrap();
            tx.send(Uevent::from_pairs([("ACTION", "add"), ("SUBSYSTEM", "net"), ("DEVPATH", DEVPATH)])).unwrap();
            // The kernel makes the sysfs entry and the devtmpfs node before sending the uevent.
            fs::create_dir_all(sysfs.join(PCI_DEV).join("virtio4/block/vdb")).unwrap();
            symlink("/dev/null", dev.join("vdb")).unwrap();
            tx.send(add_block(&format!("{DEVPATH}/virtio4/block/vdb"), "vdb")).unwrap();
            // The three unrelated events were each waited past.
            for _ in 0..3 {
                waiting.recv().unwrap();
            }
            tx // keep the channel open until joined
        });
        let mut ctx = fake.ctx(&mut src, Duration::from_secs(10));
        let updates = handle_devices(&[blk_request("02/03", "/dev/xvda")], &mut ctx).unwrap();
        let _tx = feeder.join().unwrap();
        assert_eq!(
            updates,
            vec![DeviceUpdate { container_path: "/dev/xvda".into(), guest_major: 1, guest_minor: 3, final_path: None }]
        );
    }

    #[test]
    fn no_uevent_times_out_within_the_bound() {
        let fake = Fake::new();
        let (_tx, mut src) = ChannelUevents::new();
        let timeout = Duration::from_millis(200);
        let mut ctx = fake.ctx(&mut src, timeout);
        let start = Instant::now();
        let err = handle_devices(&[blk_request("02/03", "/dev/xvda")], &mut ctx).unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(2), "{elapsed:?}");
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("02/03") && msg.contains("ms"), "{msg}");
    }

    #[test]
    fn missing_dev_node_after_the_uevent_fails_early_naming_it() {
        let fake = Fake::new();
        let (tx, mut src) = ChannelUevents::new();
        fake.add_disk("vdb");
        tx.send(add_block(&format!("{DEVPATH}/virtio4/block/vdb"), "vdb")).unwrap();
        let mut ctx = fake.ctx(&mut src, Duration::from_secs(10));
        let start = Instant::now();
        let err = handle_devices(&[blk_request("02/03", "/dev/xvda")], &mut ctx).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "should not wait for the timeout");
        let missing = fake.dev.path().join("vdb");
        assert!(
            matches!(&err, DeviceError::GuestNode(e) if e.to_string().contains(&*missing.to_string_lossy())),
            "{err}"
        );
    }

    #[test]
    fn disk_in_sysfs_without_a_node_and_no_uevent_names_the_node() {
        let fake = Fake::new();
        fake.add_disk("vdb");
        let (_tx, mut src) = ChannelUevents::new();
        let mut ctx = fake.ctx(&mut src, Duration::from_millis(100));
        let err = handle_devices(&[blk_request("02/03", "/dev/xvda")], &mut ctx).unwrap_err();
        assert!(matches!(err, DeviceError::NodeMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("vdb"), "{err}");
    }

    #[test]
    fn missing_bridge_and_bad_pci_path_are_errors() {
        let fake = Fake::new();
        let (_tx, mut src) = ChannelUevents::new();
        let mut ctx = fake.ctx(&mut src, Duration::from_secs(5));
        let err = handle_devices(&[blk_request("07/03", "/dev/xvda")], &mut ctx).unwrap_err();
        assert!(matches!(err, DeviceError::Pci(_)), "{err:?}");
        let err = handle_devices(&[blk_request("zz", "/dev/xvda")], &mut ctx).unwrap_err();
        assert!(matches!(err, DeviceError::BadPciPath { .. }), "{err:?}");
        assert!(err.to_string().contains("zz"), "{err}");
    }

    #[test]
    fn overrun_makes_it_look_in_sysfs_again() {
        struct Script(Vec<UeventWait>, Box<dyn FnMut()>);
        impl UeventSource for Script {
            fn next_event(&mut self, _: Duration) -> io::Result<UeventWait> {
                (self.1)();
                Ok(self.0.pop().unwrap_or(UeventWait::Timeout))
            }
        }
        let fake = Fake::new();
        let (sysfs, dev) = (fake.sysfs.path().to_path_buf(), fake.dev.path().to_path_buf());
        let mut src = Script(
            vec![UeventWait::Overrun],
            Box::new(move || {
                let _ = fs::create_dir_all(sysfs.join(PCI_DEV).join("virtio0/block/vda"));
                let _ = symlink("/dev/null", dev.join("vda"));
            }),
        );
        let node = wait_for_virtio_blk(
            &"02/03".parse().unwrap(),
            fake.sysfs.path(),
            fake.dev.path(),
            &mut src,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(node, fake.dev.path().join("vda"));
    }

    /// A fake kernel for hot-add: the host has put a virtio-blk device at `devpath` (relative to
    /// sysfs); once "1" is in the rescan file, the next wait finds the device in sysfs, its node
    /// in /dev and its `add` uevent (the file is emptied again, counting each rescan).
    struct HotAddKernel {
        sysfs: PathBuf,
        dev: PathBuf,
        devpath: String,
        rescans: usize,
        waits: usize,
    }

    impl HotAddKernel {
        fn new(fake: &Fake, devpath: &str) -> HotAddKernel {
            let sysfs = fake.sysfs.path().to_path_buf();
            fs::create_dir_all(sysfs.join("bus/pci")).unwrap();
            fs::write(sysfs.join(crate::device::pci::PCI_RESCAN), b"").unwrap();
            HotAddKernel { sysfs, dev: fake.dev.path().to_path_buf(), devpath: devpath.into(), rescans: 0, waits: 0 }
        }
    }

    impl UeventSource for HotAddKernel {
        fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
            self.waits += 1;
            let rescan = self.sysfs.join(crate::device::pci::PCI_RESCAN);
            if fs::read(&rescan)? == b"1" {
                fs::write(&rescan, b"")?;
                self.rescans += 1;
                fs::create_dir_all(self.sysfs.join(self.devpath.trim_start_matches('/')).join("virtio7/block/vdc"))?;
                symlink("/dev/null", self.dev.join("vdc"))?;
                return Ok(UeventWait::Event(add_block(&format!("{}/virtio7/block/vdc", self.devpath), "vdc")));
            }
            std::thread::sleep(timeout);
            Ok(UeventWait::Timeout)
        }
    }

    #[test]
    fn a_hot_added_disk_is_found_after_one_rescan() {
        for (pci, devpath) in [
            ("05", "/devices/pci0000:00/0000:00:05.0"),
            ("05.2", "/devices/pci0000:00/0000:00:05.2"),
            ("02/04.1", "/devices/pci0000:00/0000:00:02.0/0000:01:04.1"),
        ] {
            let fake = Fake::new();
            let mut kernel = HotAddKernel::new(&fake, devpath);
            let node = wait_for_virtio_blk(
                &pci.parse().unwrap(),
                fake.sysfs.path(),
                fake.dev.path(),
                &mut kernel,
                Duration::from_secs(5),
            )
            .unwrap();
            assert_eq!(node, fake.dev.path().join("vdc"), "{pci}");
            assert_eq!(kernel.rescans, 1, "{pci}");
        }
    }

    #[test]
    fn a_device_that_is_in_sysfs_is_not_rescanned_for() {
        let fake = Fake::new();
        // The PCI function is there, its disk not yet (the driver is probing).
        fs::create_dir_all(fake.sysfs.path().join(PCI_DEV)).unwrap();
        let mut kernel = HotAddKernel::new(&fake, DEVPATH);
        let err = wait_for_virtio_blk(
            &"02/03".parse().unwrap(),
            fake.sysfs.path(),
            fake.dev.path(),
            &mut kernel,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        assert_eq!(kernel.rescans, 0);
        assert!(kernel.waits > 0);
    }

    #[test]
    fn a_missing_device_is_rescanned_for_once_then_times_out() {
        let fake = Fake::new();
        let rescan = fake.sysfs.path().join(crate::device::pci::PCI_RESCAN);
        fs::create_dir_all(rescan.parent().unwrap()).unwrap();
        fs::write(&rescan, b"").unwrap();
        let (_tx, mut src) = ChannelUevents::new();
        let timeout = Duration::from_millis(150);
        let start = Instant::now();
        let err = wait_for_virtio_blk(&"09".parse().unwrap(), fake.sysfs.path(), fake.dev.path(), &mut src, timeout)
            .unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() >= timeout);
        assert_eq!(fs::read(&rescan).unwrap(), b"1", "the bus was rescanned");
    }

    #[test]
    fn a_missing_bridge_is_rescanned_for_then_named() {
        let fake = Fake::new();
        let rescan = fake.sysfs.path().join(crate::device::pci::PCI_RESCAN);
        fs::create_dir_all(rescan.parent().unwrap()).unwrap();
        fs::write(&rescan, b"").unwrap();
        let (_tx, mut src) = ChannelUevents::new();
        let err = wait_for_virtio_blk(
            &"07/03".parse().unwrap(),
            fake.sysfs.path(),
            fake.dev.path(),
            &mut src,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, DeviceError::Pci(PciResolveError::MissingBridge { .. })), "{err:?}");
        assert_eq!(fs::read(&rescan).unwrap(), b"1");
    }

    #[test]
    fn several_disks_under_one_device_is_an_error() {
        let fake = Fake::new();
        fake.add_disk("vda");
        fake.add_disk("vdb");
        let err = find_virtio_blk(&fake.sysfs.path().join(PCI_DEV)).unwrap_err();
        assert!(matches!(err, DeviceError::SeveralDisks { .. }), "{err:?}");
    }

    #[test]
    fn uevent_matching() {
        let ok = format!("{DEVPATH}/virtio4/block/vdb");
        assert_eq!(match_blk_uevent(&add_block(&ok, "vdb"), DEVPATH), Some("vdb"));
        // Without DEVNAME the last DEVPATH element names the disk.
        let ev = Uevent::from_pairs([("ACTION", "add"), ("SUBSYSTEM", "block"), ("DEVPATH", ok.as_str())]);
        assert_eq!(match_blk_uevent(&ev, DEVPATH), Some("vdb"));
        let mut remove = add_block(&ok, "vdb");
        remove.env.insert("ACTION".into(), "remove".into());
        assert_eq!(match_blk_uevent(&remove, DEVPATH), None);
        let mut other_subsystem = add_block(&ok, "vdb");
        other_subsystem.env.insert("SUBSYSTEM".into(), "bdi".into());
        assert_eq!(match_blk_uevent(&other_subsystem, DEVPATH), None);
        for devpath in [
            format!("{DEVPATH}/virtio4/block/vdb/vdb1"), // partition
            format!("{DEVPATH}0/virtio4/block/vdb"),     // a sibling whose name extends ours
            format!("{DEVPATH}/virtiox/block/vdb"),
            format!("{DEVPATH}/virtio4/block/"),
            "/devices/pci0000:00/0000:00:03.0/virtio4/block/vdb".to_string(),
        ] {
            assert_eq!(match_blk_uevent(&add_block(&devpath, "vdb"), DEVPATH), None, "{devpath}");
        }
    }

    #[test]
    fn dev_names_cannot_leave_the_dev_dir() {
        let p: PciPath = "02".parse().unwrap();
        for bad in ["", ".", "..", "../etc/passwd", "a/b"] {
            assert!(matches!(dev_node(Path::new("/dev"), bad, &p), Err(DeviceError::BadDevName { .. })), "{bad}");
        }
        assert_eq!(dev_node(Path::new("/dev"), "vda", &p).unwrap(), Path::new("/dev/vda"));
    }
}
