//! A hot-plugged virtio-net device: found by its PCI path; ready once the `virtio_net` driver
//! has made its interface (`virtio<N>/net/<name>` in sysfs).
use std::path::Path;
use std::time::Duration;

use shoji_devices::model::PciPath;

use super::blk::is_virtio_dev_name;
use super::fs::wait_for_function;
use super::DeviceError;

/// The name the guest kernel gave the interface of the virtio-net device at `pci_path`.
pub fn wait_for_virtio_net(pci_path: &PciPath, sysfs_root: &Path, timeout: Duration) -> Result<String, DeviceError> {
    wait_for_function(pci_path, sysfs_root, timeout, interface)
}

fn interface(pci_dev_dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(pci_dev_dir).ok()?;
    entries.flatten().filter(|e| e.file_name().to_str().is_some_and(is_virtio_dev_name)).find_map(|e| {
        let mut names = std::fs::read_dir(e.path().join("net")).ok()?.flatten();
        names.next().and_then(|n| n.file_name().into_string().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn the_interface_of_the_function_is_found_once_the_driver_made_it() {
        let root = tempfile::tempdir().unwrap();
        let sysfs = root.path();
        fs::create_dir_all(sysfs.join("bus/pci")).unwrap();
        fs::write(sysfs.join("bus/pci/rescan"), "").unwrap();
        let dev = sysfs.join("devices/pci0000:00/0000:00:06.0");
        let path: PciPath = "06".parse().unwrap();
        let err = wait_for_virtio_net(&path, sysfs, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        assert_eq!(fs::read_to_string(sysfs.join("bus/pci/rescan")).unwrap(), "1", "the bus was rescanned");
        fs::create_dir_all(dev.join("virtio4")).unwrap();
        assert!(wait_for_virtio_net(&path, sysfs, Duration::from_millis(30)).is_err(), "no interface yet");
        fs::create_dir_all(dev.join("virtio4/net/eth1")).unwrap();
        assert_eq!(wait_for_virtio_net(&path, sysfs, Duration::from_millis(30)).unwrap(), "eth1");
    }
}
