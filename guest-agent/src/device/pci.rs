//! From a PCI path ("02/01": bridge in slot 2 of the root bus, then slot 1 behind it; "02.1":
//! function 1 of slot 2) to the device's directory in sysfs, following each bridge's secondary
//! bus; and the bus rescan that makes a hot-added device appear.

use std::io;
use std::path::{Path, PathBuf};

use shoji_devices::model::PciPath;

/// The root bus of the guest's PCI tree (domain 0, bus 0).
pub const PCI_ROOT_BUS: &str = "0000:00";

#[derive(Debug, thiserror::Error)]
pub enum PciResolveError {
    #[error("PCI path {pci_path}: bridge {sysfs} is not in sysfs")]
    MissingBridge { pci_path: String, sysfs: PathBuf },
    #[error("PCI path {pci_path}: cannot read the bridge's secondary bus at {sysfs}: {source}")]
    NoSecondaryBus {
        pci_path: String,
        sysfs: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("PCI path {pci_path}: {sysfs} should hold exactly one bus, found {found:?}")]
    SecondaryBusCount { pci_path: String, sysfs: PathBuf, found: Vec<String> },
    #[error("PCI path {pci_path}: {sysfs} holds {name:?}, which is not a PCI bus name like \"0000:01\"")]
    BadBusName { pci_path: String, sysfs: PathBuf, name: String },
}

/// Where writing "1" makes the kernel scan every PCI bus for new devices (relative to sysfs).
pub const PCI_RESCAN: &str = "bus/pci/rescan";

/// The sysfs directory of the device at `path`: `<root>/devices/pci0000:00/0000:00:SS.F/...`.
///
/// Every element but the last is a bridge whose `pci_bus/` directory must hold exactly one
/// entry, the bus behind it. The last element is not required to exist yet: a hot-plugged
/// device may still be on its way (wait for its uevent).
pub fn pci_path_to_sysfs(sysfs_root: &Path, path: &PciPath) -> Result<PathBuf, PciResolveError> {
    let mut dir = sysfs_root.join("devices").join(format!("pci{PCI_ROOT_BUS}"));
    let mut bus = PCI_ROOT_BUS.to_owned();
    let depth = path.slots().len();
    for (i, e) in path.elements().enumerate() {
        dir.push(format!("{bus}:{:02x}.{:x}", e.slot, e.function));
        if i + 1 == depth {
            break;
        }
        if !dir.is_dir() {
            return Err(PciResolveError::MissingBridge { pci_path: path.to_string(), sysfs: dir });
        }
        let bus_dir = dir.join("pci_bus");
        let found = read_names(&bus_dir).map_err(|source| PciResolveError::NoSecondaryBus {
            pci_path: path.to_string(),
            sysfs: bus_dir.clone(),
            source,
        })?;
        let [next] = found.as_slice() else {
            return Err(PciResolveError::SecondaryBusCount { pci_path: path.to_string(), sysfs: bus_dir, found });
        };
        if !is_bus_name(next) {
            return Err(PciResolveError::BadBusName { pci_path: path.to_string(), sysfs: bus_dir, name: next.clone() });
        }
        bus = next.clone();
    }
    Ok(dir)
}

/// Asks the kernel to scan the PCI buses (hot-add without ACPI: the VMM has put the device in a
/// free slot; the scan finds it, binds its driver and sends its uevents). The write returns once
/// the scan is done. Never creates the file: a tree without it (no PCI) is an error.
pub fn pci_rescan(sysfs_root: &Path) -> io::Result<()> {
    write_existing(&sysfs_root.join(PCI_RESCAN), b"1")
}

/// Writes `data` to an existing file (a sysfs attribute), in one write.
pub(crate) fn write_existing(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(data)
}

/// The names in a directory, sorted; a name that is not UTF-8 is kept lossily (and then fails
/// the bus-name check with a readable message).
fn read_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// "DDDD:BB" in lowercase or uppercase hex.
fn is_bus_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 7 && b[4] == b':' && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn pci(s: &str) -> PciPath {
        s.parse().unwrap()
    }

    /// A bridge at `dir` whose `pci_bus/` holds `buses`.
    fn bridge(dir: &Path, buses: &[&str]) {
        fs::create_dir_all(dir.join("pci_bus")).unwrap();
        for b in buses {
            fs::create_dir(dir.join("pci_bus").join(b)).unwrap();
        }
    }

    #[test]
    fn device_on_the_root_bus() {
        let root = tempfile::tempdir().unwrap();
        let got = pci_path_to_sysfs(root.path(), &pci("02")).unwrap();
        assert_eq!(got, root.path().join("devices/pci0000:00/0000:00:02.0"));
        // Slots are hex, two digits.
        let got = pci_path_to_sysfs(root.path(), &pci("1f")).unwrap();
        assert_eq!(got, root.path().join("devices/pci0000:00/0000:00:1f.0"));
    }

    #[test]
    fn one_bridge() {
        let root = tempfile::tempdir().unwrap();
        let b = root.path().join("devices/pci0000:00/0000:00:02.0");
        bridge(&b, &["0000:01"]);
        let got = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap();
        assert_eq!(got, b.join("0000:01:01.0"));
    }

    #[test]
    fn two_bridges() {
        let root = tempfile::tempdir().unwrap();
        let b1 = root.path().join("devices/pci0000:00/0000:00:03.0");
        bridge(&b1, &["0000:05"]);
        let b2 = b1.join("0000:05:1e.0");
        bridge(&b2, &["0000:0a"]);
        let got = pci_path_to_sysfs(root.path(), &pci("03/1e/07")).unwrap();
        assert_eq!(got, root.path().join("devices/pci0000:00/0000:00:03.0/0000:05:1e.0/0000:0a:07.0"));
    }

    #[test]
    fn functions_other_than_zero_through_bridges() {
        let root = tempfile::tempdir().unwrap();
        let got = pci_path_to_sysfs(root.path(), &pci("02.3")).unwrap();
        assert_eq!(got, root.path().join("devices/pci0000:00/0000:00:02.3"));
        // A bridge that is function 2 of slot 3; the device is function 7 of slot 0x1e behind it.
        let b = root.path().join("devices/pci0000:00/0000:00:03.2");
        bridge(&b, &["0000:04"]);
        let got = pci_path_to_sysfs(root.path(), &pci("03.2/1e.7")).unwrap();
        assert_eq!(got, b.join("0000:04:1e.7"));
        // Function 0 of the same slot is another device, not this bridge.
        let err = pci_path_to_sysfs(root.path(), &pci("03/1e")).unwrap_err();
        assert!(
            matches!(&err, PciResolveError::MissingBridge { sysfs, .. } if sysfs.ends_with("0000:00:03.0")),
            "{err}"
        );
    }

    #[test]
    fn rescan_writes_one_and_never_creates_the_file() {
        let root = tempfile::tempdir().unwrap();
        let err = pci_rescan(root.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!root.path().join(PCI_RESCAN).exists());
        fs::create_dir_all(root.path().join("bus/pci")).unwrap();
        fs::write(root.path().join(PCI_RESCAN), b"").unwrap();
        pci_rescan(root.path()).unwrap();
        assert_eq!(fs::read(root.path().join(PCI_RESCAN)).unwrap(), b"1");
    }

    #[test]
    fn missing_bridge_is_named() {
        let root = tempfile::tempdir().unwrap();
        let err = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap_err();
        assert!(matches!(err, PciResolveError::MissingBridge { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("PCI path 02/01") && msg.contains("0000:00:02.0"), "{msg}");

        // The second bridge is missing.
        let b1 = root.path().join("devices/pci0000:00/0000:00:02.0");
        bridge(&b1, &["0000:01"]);
        let err = pci_path_to_sysfs(root.path(), &pci("02/04/01")).unwrap_err();
        assert!(
            matches!(&err, PciResolveError::MissingBridge { sysfs, .. } if sysfs.ends_with("0000:01:04.0")),
            "{err}"
        );
    }

    #[test]
    fn bridge_without_pci_bus_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let b = root.path().join("devices/pci0000:00/0000:00:02.0");
        fs::create_dir_all(&b).unwrap();
        let err = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap_err();
        assert!(matches!(err, PciResolveError::NoSecondaryBus { .. }), "{err:?}");
        assert!(err.to_string().contains("pci_bus"), "{err}");
    }

    #[test]
    fn pci_bus_with_zero_or_two_entries_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let b = root.path().join("devices/pci0000:00/0000:00:02.0");
        bridge(&b, &[]);
        let err = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap_err();
        assert!(matches!(&err, PciResolveError::SecondaryBusCount { found, .. } if found.is_empty()), "{err:?}");
        assert!(err.to_string().contains("02/01"), "{err}");

        bridge(&b, &["0000:01", "0000:02"]);
        let err = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap_err();
        assert!(matches!(&err, PciResolveError::SecondaryBusCount { found, .. } if found.len() == 2), "{err:?}");
        assert!(err.to_string().contains("0000:01") && err.to_string().contains("0000:02"), "{err}");
    }

    #[test]
    fn odd_bus_name_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let b = root.path().join("devices/pci0000:00/0000:00:02.0");
        bridge(&b, &["..x"]);
        let err = pci_path_to_sysfs(root.path(), &pci("02/01")).unwrap_err();
        assert!(matches!(err, PciResolveError::BadBusName { .. }), "{err:?}");
        assert!(is_bus_name("0000:01") && is_bus_name("0001:Ff"));
        assert!(!is_bus_name("0000:1") && !is_bus_name("0000-01") && !is_bus_name("000g:01"));
    }
}
