//! PCI hot-remove, the guest's half: before the VMM drops a device, the agent asks the kernel to
//! release it (`<device>/remove` in sysfs: the driver unbinds, the disk goes away, the function
//! leaves the bus) and waits, bounded, until it has. The device is found by its PCI path through
//! the bridges (see [`pci_path_to_sysfs`]), never by a name the guest could have chosen.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoji_devices::model::PciPath;

use super::pci::{pci_path_to_sysfs, write_existing, PciResolveError};
use super::uevent::{UeventSource, UeventWait};

/// How often the sysfs directory is looked at again while waiting (uevents may be dropped, or
/// the source may be one that never has any).
const POLL: Duration = Duration::from_millis(50);

/// What a removal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// The function was there and is gone now.
    Released { sysfs: PathBuf, waited: Duration },
    /// The guest did not have it (never found, or already removed): nothing to do.
    Absent { sysfs: Option<PathBuf> },
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error(transparent)]
    Pci(PciResolveError),
    #[error("PCI path {pci_path}: asking the kernel to remove the device ({path}): {source}")]
    Write {
        pci_path: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("PCI path {pci_path}: {sysfs} is still there {waited:?} after its removal was asked")]
    Timeout { pci_path: String, sysfs: PathBuf, waited: Duration },
    #[error("waiting for uevents: {0}")]
    Uevent(#[source] io::Error),
}

/// Releases the PCI function at `pci_path`: writes "1" to its sysfs `remove` attribute, then
/// waits up to `timeout` until its sysfs directory is gone or its `remove` uevent has come.
/// `uevents` should be listening since before this call; any source works, sysfs is polled too.
pub fn remove_pci_device(
    sysfs_root: &Path,
    pci_path: &PciPath,
    uevents: &mut dyn UeventSource,
    timeout: Duration,
) -> Result<Removed, RemoveError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let dir = match pci_path_to_sysfs(sysfs_root, pci_path) {
        Ok(dir) => dir,
        // No bridge, no device behind it.
        Err(PciResolveError::MissingBridge { .. }) => return Ok(Removed::Absent { sysfs: None }),
        Err(e) => return Err(RemoveError::Pci(e)),
    };
    if !dir.is_dir() {
        return Ok(Removed::Absent { sysfs: Some(dir) });
    }
    let devpath = dir.strip_prefix(sysfs_root).ok().and_then(Path::to_str).map(|rel| format!("/{rel}"));

    let remove = dir.join("remove");
    match write_existing(&remove, b"1") {
        Ok(()) => {}
        // Gone between the look and the write (another removal).
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => {
            return Ok(Removed::Absent { sysfs: Some(dir) });
        }
        Err(source) => return Err(RemoveError::Write { pci_path: pci_path.to_string(), path: remove, source }),
    }
    tracing::debug!(pci_path = %pci_path, sysfs = %dir.display(), "PCI device removal asked");

    loop {
        if !dir.exists() {
            return Ok(Removed::Released { sysfs: dir, waited: start.elapsed() });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(RemoveError::Timeout { pci_path: pci_path.to_string(), sysfs: dir, waited: start.elapsed() });
        }
        match uevents.next_event(remaining.min(POLL)).map_err(RemoveError::Uevent)? {
            UeventWait::Event(ev) if ev.action() == "remove" && Some(ev.devpath()) == devpath.as_deref() => {
                return Ok(Removed::Released { sysfs: dir, waited: start.elapsed() });
            }
            UeventWait::Event(ev) => {
                tracing::trace!(devpath = ev.devpath(), action = ev.action(), "uevent ignored");
            }
            UeventWait::Overrun | UeventWait::Timeout => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::uevent::{ChannelUevents, Uevent};
    use std::fs;

    /// A fake sysfs with a bridge in slot 2 (bus 1) and the device at "02/03" (0000:01:03.0).
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let bridge = root.path().join("devices/pci0000:00/0000:00:02.0");
        fs::create_dir_all(bridge.join("pci_bus/0000:01")).unwrap();
        let dev = bridge.join("0000:01:03.0");
        fs::create_dir_all(dev.join("virtio3/block/vdb")).unwrap();
        fs::write(dev.join("remove"), b"").unwrap();
        (root, dev)
    }

    fn path(s: &str) -> PciPath {
        s.parse().unwrap()
    }

    /// A fake kernel: once "1" is in `<dev>/remove`, the device's directory goes.
    struct RemovingKernel {
        dev: PathBuf,
        waits: usize,
    }

    impl UeventSource for RemovingKernel {
        fn next_event(&mut self, timeout: Duration) -> io::Result<UeventWait> {
            self.waits += 1;
            if fs::read(self.dev.join("remove")).is_ok_and(|d| d == b"1") {
                fs::remove_dir_all(&self.dev)?;
            }
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            Ok(UeventWait::Timeout)
        }
    }

    #[test]
    fn remove_is_written_on_the_device_behind_the_bridge_and_waited_for() {
        let (root, dev) = tree();
        // A sibling with the same slot on the root bus must not be touched.
        let sibling = root.path().join("devices/pci0000:00/0000:00:03.0");
        fs::create_dir_all(&sibling).unwrap();
        fs::write(sibling.join("remove"), b"").unwrap();

        let mut kernel = RemovingKernel { dev: dev.clone(), waits: 0 };
        let got = remove_pci_device(root.path(), &path("02/03"), &mut kernel, Duration::from_secs(5)).unwrap();
        assert!(matches!(&got, Removed::Released { sysfs, .. } if *sysfs == dev), "{got:?}");
        assert!(!dev.exists());
        assert!(kernel.waits >= 1);
        assert_eq!(fs::read(sibling.join("remove")).unwrap(), b"");
        assert!(root.path().join("devices/pci0000:00/0000:00:02.0").is_dir(), "the bridge stays");
    }

    #[test]
    fn a_function_other_than_zero_is_removed_alone() {
        let (root, _) = tree();
        let f0 = root.path().join("devices/pci0000:00/0000:00:05.0");
        let f1 = root.path().join("devices/pci0000:00/0000:00:05.1");
        for d in [&f0, &f1] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("remove"), b"").unwrap();
        }
        let mut kernel = RemovingKernel { dev: f1.clone(), waits: 0 };
        remove_pci_device(root.path(), &path("05.1"), &mut kernel, Duration::from_secs(5)).unwrap();
        assert!(!f1.exists());
        assert_eq!(fs::read(f0.join("remove")).unwrap(), b"");
    }

    #[test]
    fn the_remove_uevent_ends_the_wait() {
        let (root, dev) = tree();
        let (tx, mut src) = ChannelUevents::new();
        // Another device's removal first: ignored.
        let devpath = "/devices/pci0000:00/0000:00:02.0/0000:01:03.0";
        tx.send(Uevent::from_pairs([("ACTION", "remove"), ("DEVPATH", "/devices/pci0000:00/0000:00:04.0")])).unwrap();
        tx.send(Uevent::from_pairs([("ACTION", "remove"), ("DEVPATH", devpath)])).unwrap();
        let got = remove_pci_device(root.path(), &path("02/03"), &mut src, Duration::from_secs(5)).unwrap();
        assert!(matches!(got, Removed::Released { .. }), "{got:?}");
        assert_eq!(fs::read(dev.join("remove")).unwrap(), b"1");
    }

    #[test]
    fn a_device_that_stays_times_out_within_the_bound() {
        let (root, dev) = tree();
        let (_tx, mut src) = ChannelUevents::new();
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let err = remove_pci_device(root.path(), &path("02/03"), &mut src, timeout).unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(2), "{elapsed:?}");
        assert!(matches!(err, RemoveError::Timeout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("02/03") && msg.contains("0000:01:03.0"), "{msg}");
        assert_eq!(fs::read(dev.join("remove")).unwrap(), b"1", "asked once");
    }

    #[test]
    fn an_absent_device_or_bridge_is_nothing_to_do() {
        let (root, _) = tree();
        let (_tx, mut src) = ChannelUevents::new();
        let got = remove_pci_device(root.path(), &path("02/04"), &mut src, Duration::from_secs(5)).unwrap();
        assert!(matches!(got, Removed::Absent { sysfs: Some(_) }), "{got:?}");
        let got = remove_pci_device(root.path(), &path("07/01"), &mut src, Duration::from_secs(5)).unwrap();
        assert_eq!(got, Removed::Absent { sysfs: None });
        // Nothing was created on the way.
        assert!(!root.path().join("devices/pci0000:00/0000:00:02.0/0000:01:04.0").exists());
    }

    #[test]
    fn a_device_without_a_remove_attribute_is_an_error_naming_it() {
        let (root, dev) = tree();
        fs::remove_file(dev.join("remove")).unwrap();
        let (_tx, mut src) = ChannelUevents::new();
        let err = remove_pci_device(root.path(), &path("02/03"), &mut src, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, RemoveError::Write { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(err.to_string().contains("0000:01:03.0/remove"), "{err}");
        assert!(!dev.join("remove").exists(), "never created");
    }
}
