//! The host<->guest contract, in one place: the host (VMM, sandbox, shim, CLI) and the guest
//! agent both link this module, so what one side sets up the other finds. No KVM here: it
//! builds with `default-features = false`.
//!
//! - [`pci`]: PCI paths and the slot plan (which slot each disk, share and the vsock get).
//! - [`mount`]: the mount-option table and parser.
//! - here: vsock addressing and virtio-fs share tags and where the guest mounts them.
pub mod mount;
pub mod pci;
pub mod slots;

pub use mount::{MountOptionError, MountOptions};
pub use pci::{DeviceKind, PciPath, PciPathError, PCI_PATH_MAX_DEPTH, PCI_SLOTS};
pub use slots::{PciPlanError, PciSlotPlan, FIRST_DEVICE_SLOT};

/// The vsock port the agent's ttrpc server listens on in the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock context id (2 is the host).
pub const GUEST_CID: u64 = 3;

/// The virtio-fs tag of the share that holds a `shoji run` container's root
/// file system.
pub const ROOTFS_TAG: &str = "rootfs";
/// The virtio-fs tag of the containerd shim's one shared tree (every task's rootfs and binds).
pub const SANDBOX_SHARED_TAG: &str = "shared";
/// The directory under which the guest mounts shares: the share tagged T is at
/// `/run/shoji/T` (see [`guest_share_dir`]).
pub const GUEST_SHARES_DIR: &str = "/run/shoji";

/// The tag of extra share `i` (`--share`) when the user names none: "share0", "share1", ...
pub fn share_tag(i: usize) -> String {
    format!("share{i}")
}

/// Where the guest mounts the share tagged `tag`: `/run/shoji/<tag>`.
pub fn guest_share_dir(tag: &str) -> String {
    format!("{GUEST_SHARES_DIR}/{tag}")
}

/// The `driver_options` entry of a virtio-fs storage whose device was hot-plugged:
/// `pci_path=<PCI path>`. The agent then rescans the bus for that path before it mounts the
/// tag (a boot share needs none: the kernel probed it at boot).
pub const VIRTIOFS_PCI_OPTION: &str = "pci_path=";

/// The PCI path a virtio-fs storage's `driver_options` name, if any; an unparsable one is an
/// error naming it.
pub fn virtiofs_pci_path(driver_options: &[String]) -> Result<Option<PciPath>, PciPathError> {
    match driver_options.iter().find_map(|o| o.strip_prefix(VIRTIOFS_PCI_OPTION)) {
        Some(p) => p.parse().map(Some),
        None => Ok(None),
    }
}

/// Namespace paths a container spec may name to join another container's namespaces in the
/// guest: `<this>/<container id>/<kind>` ("net", "ipc", "uts", "pid", "cgroup"). Not a real
/// directory: the agent resolves it to that container's init process. The shim writes them
/// where containerd named a host process's namespaces (a CRI pod's sandbox container).
pub const GUEST_CONTAINER_NS_DIR: &str = "/run/shoji-ns";

/// The namespace path of container `id`'s `kind` namespace.
pub fn guest_container_ns(id: &str, kind: &str) -> String {
    format!("{GUEST_CONTAINER_NS_DIR}/{id}/{kind}")
}

/// (container id, kind) of a [`guest_container_ns`] path; `None` for any other path.
pub fn parse_guest_container_ns(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(GUEST_CONTAINER_NS_DIR)?.strip_prefix('/')?;
    let (id, kind) = rest.split_once('/')?;
    let bad = |s: &str| s.is_empty() || s == "." || s == ".." || s.contains('/');
    (!bad(id) && !bad(kind)).then_some((id, kind))
}

#[cfg(test)]
mod tests {
    #[test]
    fn virtiofs_pci_option_round_trips_and_bad_paths_fail() {
        let opt = |s: &str| vec!["other=1".to_string(), s.to_string()];
        assert_eq!(virtiofs_pci_path(&opt("pci_path=05.0")).unwrap().unwrap().to_string(), "05");
        assert_eq!(virtiofs_pci_path(&["x".to_string()]).unwrap(), None);
        assert!(virtiofs_pci_path(&opt("pci_path=zz")).is_err());
        assert!(virtiofs_pci_path(&opt("pci_path=")).is_err());
    }

    use super::*;

    #[test]
    fn container_namespace_paths_round_trip() {
        let p = guest_container_ns("pod1", "net");
        assert_eq!(p, "/run/shoji-ns/pod1/net");
        assert_eq!(parse_guest_container_ns(&p), Some(("pod1", "net")));
        for bad in [
            "/run/shoji-ns/pod1",
            "/run/shoji-ns//net",
            "/run/shoji-ns/a/b/c",
            "/run/shoji-nsx/a/net",
            "/proc/1/ns/net",
            "/run/shoji-ns/../net",
        ] {
            assert_eq!(parse_guest_container_ns(bad), None, "{bad}");
        }
    }

    #[test]
    fn share_names() {
        assert_eq!(share_tag(0), "share0");
        assert_eq!(guest_share_dir(ROOTFS_TAG), "/run/shoji/rootfs");
        assert_eq!(guest_share_dir(SANDBOX_SHARED_TAG), "/run/shoji/shared");
        assert_eq!(guest_share_dir(&share_tag(2)), "/run/shoji/share2");
    }
}
