use std::fs;
use std::os::unix::fs::symlink;

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

use super::*;

fn request(kind: &str, id: &str, vm_path: Option<&str>, container_path: &str) -> DeviceRequest {
    DeviceRequest {
        id: id.into(),
        kind: kind.into(),
        vm_path: vm_path.map(Into::into),
        container_path: container_path.into(),
        options: vec![],
    }
}

fn ctx<'a>(uevents: &'a mut dyn UeventSource, root: &Path) -> DeviceContext<'a> {
    DeviceContext {
        sysfs_root: root.join("sys"),
        dev_root: root.join("dev"),
        hotplug_timeout: Duration::from_millis(100),
        uevents,
    }
}

#[test]
fn from_guest_node_reads_the_numbers_now() {
    let u = DeviceUpdate::from_guest_node("/dev/x", "/dev/null", Some("/dev/y".into())).unwrap();
    assert_eq!(
        u,
        DeviceUpdate {
            container_path: "/dev/x".into(),
            guest_major: 1,
            guest_minor: 3,
            final_path: Some("/dev/y".into())
        }
    );
}

#[test]
fn from_guest_node_fails_early_on_a_missing_node_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("vdz");
    let err = DeviceUpdate::from_guest_node("/dev/x", &missing, None).unwrap_err();
    assert!(matches!(&err, GuestNodeError::Stat { source, .. } if source.kind() == io::ErrorKind::NotFound), "{err:?}");
    assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");

    // A regular file is not a device node.
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = DeviceUpdate::from_guest_node("/dev/x", &file, None).unwrap_err();
    assert!(matches!(err, GuestNodeError::NotADeviceNode { .. }), "{err:?}");
}

#[test]
fn mmioblk_uses_the_given_vm_path() {
    let root = tempfile::tempdir().unwrap();
    let (_tx, mut src) = ChannelUevents::new();
    let mut ctx = ctx(&mut src, root.path());
    let got = handle_device(&request(MMIO_BLK_KIND, "", Some("/dev/null"), "/dev/xvda"), &mut ctx).unwrap();
    assert_eq!(got, Some(DeviceUpdate::from_guest_node("/dev/xvda", "/dev/null", None).unwrap()));

    let missing = root.path().join("dev/vdq");
    let err =
        handle_device(&request(MMIO_BLK_KIND, "", Some(missing.to_str().unwrap()), "/dev/xvda"), &mut ctx).unwrap_err();
    assert!(matches!(err, DeviceError::GuestNode(_)), "{err:?}");
    assert!(err.to_string().contains("vdq"), "{err}");

    let err = handle_device(&request(MMIO_BLK_KIND, "disk0", None, "/dev/xvda"), &mut ctx).unwrap_err();
    assert!(matches!(err, DeviceError::MissingVmPath { .. }), "{err:?}");
    assert!(err.to_string().contains("disk0"), "{err}");
}

#[test]
fn empty_container_path_checks_the_node_but_updates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (_tx, mut src) = ChannelUevents::new();
    let mut ctx = ctx(&mut src, root.path());
    assert_eq!(handle_device(&request(MMIO_BLK_KIND, "", Some("/dev/null"), ""), &mut ctx).unwrap(), None);
    let reqs =
        [request(MMIO_BLK_KIND, "", Some("/dev/null"), ""), request(MMIO_BLK_KIND, "", Some("/dev/null"), "/dev/a")];
    assert_eq!(handle_devices(&reqs, &mut ctx).unwrap().len(), 1);
    assert!(handle_device(&request(MMIO_BLK_KIND, "", Some("/nonexistent/vda"), ""), &mut ctx).is_err());
}

#[test]
fn unknown_kind_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (_tx, mut src) = ChannelUevents::new();
    let mut ctx = ctx(&mut src, root.path());
    let err = handle_device(&request("floppy", "fd0", None, "/dev/fd0"), &mut ctx).unwrap_err();
    assert!(matches!(err, DeviceError::UnknownKind { .. }), "{err:?}");
    assert!(err.to_string().contains("floppy"), "{err}");
}

/// The CreateContainer path: a PCI disk and an MMIO disk whose host numbers collide with each
/// other's guest numbers, one batch; and on failure the spec is unchanged.
#[test]
fn add_devices_handles_all_then_rewrites_once() {
    let root = tempfile::tempdir().unwrap();
    let sys = root.path().join("sys");
    fs::create_dir_all(sys.join("devices/pci0000:00/0000:00:04.0/virtio2/block/vda")).unwrap();
    fs::create_dir_all(root.path().join("dev")).unwrap();
    symlink("/dev/null", root.path().join("dev/vda")).unwrap();

    let mut host_devices = Vec::new();
    for (path, major, minor) in [("/dev/pci-disk", 1, 5), ("/dev/mmio-disk", 1, 3)] {
        let mut d = LinuxDevice::default();
        d.set_path(path.into()).set_typ(LinuxDeviceType::C).set_major(major).set_minor(minor);
        host_devices.push(d);
    }
    let mut spec = Spec::default();
    spec.linux_mut().as_mut().unwrap().set_devices(Some(host_devices));

    let reqs = [
        request(blk::KIND, "04", None, "/dev/pci-disk"), // guest /dev/null = 1:3
        request(MMIO_BLK_KIND, "", Some("/dev/zero"), "/dev/mmio-disk"), // guest 1:5
    ];
    let (_tx, mut src) = ChannelUevents::new();
    let mut c = ctx(&mut src, root.path());
    add_devices(&mut spec, &reqs, &mut c).unwrap();
    let got: Vec<(i64, i64)> =
        spec.linux().as_ref().unwrap().devices().as_ref().unwrap().iter().map(|d| (d.major(), d.minor())).collect();
    assert_eq!(got, vec![(1, 3), (1, 5)]);

    // A request for a path the spec lacks: error, spec unchanged.
    let before = serde_json::to_string(&spec).unwrap();
    let err =
        add_devices(&mut spec, &[request(MMIO_BLK_KIND, "", Some("/dev/null"), "/dev/absent")], &mut c).unwrap_err();
    assert!(matches!(err, DeviceError::Spec(SpecRewriteError::MissingDevices { .. })), "{err:?}");
    assert_eq!(serde_json::to_string(&spec).unwrap(), before);
}
