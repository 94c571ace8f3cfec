//! A hot-plugged virtio-fs device: found by its PCI path, like a disk, but there is no node to
//! wait for. Once the `virtio_fs` driver has bound the device its tag is mountable, so the wait
//! ends when the function's `virtio<N>` child has a driver.
use std::path::Path;
use std::time::{Duration, Instant};

use shoji_devices::model::PciPath;

use super::blk::{is_virtio_dev_name, rescan, resolve};
use super::DeviceError;

/// Waits until the virtio device at `pci_path` is bound to its driver, rescanning the bus once
/// when the function is not in sysfs yet (the hot-add case).
pub fn wait_for_virtio_fs(pci_path: &PciPath, sysfs_root: &Path, timeout: Duration) -> Result<(), DeviceError> {
    wait_for_function(pci_path, sysfs_root, timeout, |dir| bound(dir).then_some(()))
}

/// Polls the sysfs directory of the function at `pci_path` until `ready` finds what it wants
/// there, rescanning the bus once when the function is not in sysfs yet, until the deadline.
pub(crate) fn wait_for_function<T>(
    pci_path: &PciPath,
    sysfs_root: &Path,
    timeout: Duration,
    ready: impl Fn(&Path) -> Option<T>,
) -> Result<T, DeviceError> {
    let start = Instant::now();
    let (dev_dir, mut rescanned) = resolve(sysfs_root, pci_path)?;
    loop {
        if let Some(found) = ready(&dev_dir) {
            return Ok(found);
        }
        if !rescanned && !dev_dir.exists() {
            rescan(sysfs_root, pci_path);
            rescanned = true;
            continue;
        }
        if start.elapsed() >= timeout {
            return Err(DeviceError::Timeout { pci_path: pci_path.to_string(), waited: start.elapsed() });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a `virtio<N>` child of the PCI function has a driver bound.
fn bound(pci_dev_dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(pci_dev_dir) else { return false };
    entries
        .flatten()
        .any(|e| e.file_name().to_str().is_some_and(is_virtio_dev_name) && e.path().join("driver").exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_bound_function_is_found_and_an_absent_one_times_out_after_one_rescan() {
        let root = tempfile::tempdir().unwrap();
        let sysfs = root.path();
        fs::create_dir_all(sysfs.join("bus/pci")).unwrap();
        fs::write(sysfs.join("bus/pci/rescan"), "").unwrap();
        let dev = sysfs.join("devices/pci0000:00/0000:00:05.0");
        let path: PciPath = "05.0".parse().unwrap();

        let err = wait_for_virtio_fs(&path, sysfs, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        assert_eq!(fs::read_to_string(sysfs.join("bus/pci/rescan")).unwrap(), "1", "the bus was rescanned");

        fs::create_dir_all(dev.join("virtio3")).unwrap();
        let err = wait_for_virtio_fs(&path, sysfs, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "an unbound device is not ready: {err:?}");
        fs::create_dir_all(sysfs.join("bus/virtio/drivers/virtio_fs")).unwrap();
        std::os::unix::fs::symlink(sysfs.join("bus/virtio/drivers/virtio_fs"), dev.join("virtio3/driver")).unwrap();
        wait_for_virtio_fs(&path, sysfs, Duration::from_millis(30)).unwrap();
    }
}
