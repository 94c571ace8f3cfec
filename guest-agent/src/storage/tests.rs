//! What can be checked without mounting: path handling, drivers, sources that are missing, the
//! virtio-fs tag and blk PCI path lookups in a fake sysfs. Real mounts (tmpfs, bind) are in
//! tests/service.rs, as root in a private mount namespace.

use std::fs;

use super::*;
use crate::device::ChannelUevents;

fn ctx(root: &Path) -> StorageContext {
    StorageContext {
        root: root.join("root"),
        sysfs_root: root.join("sys"),
        dev_root: root.join("dev"),
        hotplug_timeout: Duration::from_millis(50),
    }
}

fn req(driver: &str, source: &str, mount_point: &str) -> StorageRequest {
    StorageRequest {
        driver: driver.into(),
        source: source.into(),
        mount_point: mount_point.into(),
        ..Default::default()
    }
}

#[test]
fn guest_paths_are_taken_below_the_root() {
    let c = StorageContext { root: "/tmp/r".into(), ..StorageContext::guest() };
    assert_eq!(c.resolve("/run/a/./b").unwrap(), Path::new("/tmp/r/run/a/b"));
    assert_eq!(c.resolve("/").unwrap(), Path::new("/tmp/r"));
    assert_eq!(StorageContext::guest().resolve("/run/x").unwrap(), Path::new("/run/x"));
    for (bad, why) in [("", "empty"), ("run/x", "absolute"), ("/run/../etc", ".."), ("/a\0b", "NUL")] {
        let err = c.resolve(bad).unwrap_err();
        assert!(err.to_string().contains(why), "{bad:?}: {err}");
    }
}

#[test]
fn drivers_by_name() {
    for (name, d) in
        [("virtio-fs", Driver::VirtioFs), ("blk", Driver::Blk), ("tmpfs", Driver::Tmpfs), ("bind", Driver::Bind)]
    {
        assert_eq!(Driver::parse(name), Some(d));
        assert_eq!(d.name(), name);
    }
    assert_eq!(Driver::parse("virtiofs"), Some(Driver::VirtioFs));
    assert_eq!(Driver::parse("nfs"), None);
}

#[test]
fn unknown_driver_and_bad_mount_point_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, mut ev) = ChannelUevents::new();
    let err = mount_storage(&req("nfs", "srv:/x", "/mnt"), &ctx(dir.path()), &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::UnknownDriver { .. }), "{err:?}");
    assert!(err.to_string().contains("\"nfs\"") && err.to_string().contains("/mnt"), "{err}");

    let err = mount_storage(&req("tmpfs", "", "relative/x"), &ctx(dir.path()), &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::BadMountPoint { .. }), "{err:?}");
    assert!(err.to_string().contains("relative/x"), "{err}");

    let mut r = req("tmpfs", "", "/mnt");
    r.fstype = "ext4".into();
    let err = mount_storage(&r, &ctx(dir.path()), &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }) && err.to_string().contains("ext4"), "{err}");

    let mut r = req("tmpfs", "", "/mnt");
    r.options = vec!["bind".into()];
    assert!(matches!(mount_storage(&r, &ctx(dir.path()), &mut ev), Err(StorageError::Invalid { .. })));
    // Options go through the model's table: a word it refuses is refused, by name.
    r.options = vec!["size=1m,idmap".into()];
    let err = mount_storage(&r, &ctx(dir.path()), &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }) && err.to_string().contains("\"idmap\""), "{err}");
    // Nothing was created for a refused storage.
    assert!(!dir.path().join("root").exists());
}

#[test]
fn missing_bind_source_names_driver_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, mut ev) = ChannelUevents::new();
    let err = mount_storage(&req("bind", "/shared/nope", "/mnt/x"), &ctx(dir.path()), &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::MissingSource { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("storage bind \"/shared/nope\": source not found"), "{msg}");
    assert!(!dir.path().join("root/mnt").exists(), "no mount point is left behind");
}

#[test]
fn blk_needs_an_fstype_and_a_pci_path_that_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, mut ev) = ChannelUevents::new();
    let c = ctx(dir.path());

    let err = mount_storage(&req("blk", "02/01", "/mnt/vol"), &c, &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }) && err.to_string().contains("fstype"), "{err}");

    let mut r = req("blk", "zz", "/mnt/vol");
    r.fstype = "ext4".into();
    let err = mount_storage(&r, &c, &mut ev).unwrap_err();
    assert!(matches!(&err, StorageError::Device { err: DeviceError::BadPciPath { .. }, .. }), "{err:?}");

    // No bridge in slot 2: named at once.
    r.source = "02/01".into();
    let err = mount_storage(&r, &c, &mut ev).unwrap_err();
    assert!(matches!(&err, StorageError::Device { err: DeviceError::Pci(_), .. }), "{err:?}");
    assert!(err.to_string().starts_with("storage blk \"02/01\": PCI path 02/01"), "{err}");

    // A root-bus slot with no disk: waits for the hot-plug timeout, then says so.
    r.source = "05".into();
    let err = mount_storage(&r, &c, &mut ev).unwrap_err();
    assert!(matches!(&err, StorageError::Device { err: DeviceError::Timeout { .. }, .. }), "{err:?}");
    assert!(err.to_string().contains("no block device appeared"), "{err}");
}

#[test]
fn virtiofs_tags_are_looked_up_in_sysfs_when_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, mut ev) = ChannelUevents::new();
    let c = ctx(dir.path());
    assert_eq!(virtiofs_tags(&c.sysfs_root), None, "older kernels list none");

    for (n, tag) in [("0", "rootfs"), ("1", "shared")] {
        let d = c.sysfs_root.join(VIRTIOFS_SYSFS).join(n);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("tag"), format!("{tag}\n")).unwrap();
    }
    assert_eq!(virtiofs_tags(&c.sysfs_root).unwrap(), ["rootfs", "shared"]);

    let err = mount_storage(&req("virtio-fs", "missing", "/run/fs"), &c, &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::MissingSource { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("storage virtio-fs \"missing\": source not found"), "{msg}");
    assert!(msg.contains("rootfs") && msg.contains("shared"), "{msg}");

    let err = mount_storage(&req("virtio-fs", "", "/run/fs"), &c, &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }), "{err:?}");
}

#[test]
fn a_hot_plugged_share_is_waited_for_by_its_pci_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, mut ev) = ChannelUevents::new();
    let c = ctx(dir.path());
    fs::create_dir_all(c.sysfs_root.join("bus/pci")).unwrap();
    fs::write(c.sysfs_root.join("bus/pci/rescan"), "").unwrap();

    let mut r = req("virtio-fs", "hot0", "/run/fs");
    r.driver_options = vec!["pci_path=zz".into()];
    let err = mount_storage(&r, &c, &mut ev).unwrap_err();
    assert!(matches!(err, StorageError::Invalid { .. }) && err.to_string().contains("driver_options"), "{err}");

    // Not on the bus: rescanned once, then the hot-plug timeout, named.
    r.driver_options = vec!["pci_path=05".into()];
    let err = mount_storage(&r, &c, &mut ev).unwrap_err();
    assert!(matches!(&err, StorageError::Device { err: DeviceError::Timeout { .. }, .. }), "{err:?}");
    assert!(err.to_string().starts_with("storage virtio-fs \"hot0\": "), "{err}");
    assert_eq!(fs::read_to_string(c.sysfs_root.join("bus/pci/rescan")).unwrap(), "1");
}

#[test]
fn mount_points_are_created_and_removed_again() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("a/b/c");
    let created = create_mount_point(&target, false).unwrap();
    assert_eq!(created, [dir.path().join("a"), dir.path().join("a/b"), target.clone()]);
    assert!(target.is_dir());
    // Existing directories are not claimed.
    assert!(create_mount_point(&target, false).unwrap().is_empty());
    remove_created(&created);
    assert!(!dir.path().join("a").exists());

    let file = dir.path().join("f/file");
    let created = create_mount_point(&file, true).unwrap();
    assert!(file.is_file());
    // A directory someone filled is left alone.
    fs::write(dir.path().join("f/other"), b"x").unwrap();
    remove_created(&created);
    assert!(!file.exists() && dir.path().join("f/other").exists());
}
