//! Devices of a container: each request is handled on its own and gives a [`DeviceUpdate`]
//! (container path → guest major:minor and final path); the updates are then applied to the OCI
//! spec in one batch ([`apply_device_updates`]). Handlers never touch the spec.
//!
//! Hot-plug (no ACPI in the guest): a PCI device the guest lacks makes the blk handler rescan
//! the bus ([`pci::pci_rescan`]); [`remove`] releases a device before the VMM drops it.

pub mod blk;
pub mod fs;
pub mod net;
pub mod pci;
pub mod remove;
pub mod uevent;
pub mod update;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;
use shoji_devices::model::PciPathError;

pub use pci::{pci_path_to_sysfs, pci_rescan, PciResolveError};
pub use remove::{remove_pci_device, RemoveError, Removed};
pub use uevent::{ChannelUevents, NetlinkUevents, Uevent, UeventSource, UeventWait};
pub use update::{apply_device_updates, NodeType, SpecRewriteError};

/// How long a handler waits for a device to show up (or a removed one to go), unless
/// configured otherwise (`shoji.hotplug_timeout=SECS` on the kernel command line).
pub const DEFAULT_HOTPLUG_TIMEOUT: Duration = Duration::from_secs(3);

/// The request kind whose guest node the runtime already knows (`vm_path`, e.g. "/dev/vda").
pub const MMIO_BLK_KIND: &str = "mmioblk";

/// One device the runtime asks for, as in the agent protocol's `Device` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRequest {
    /// Kind-specific: a PCI path ("02/01", "02.1") for `blk`.
    pub id: String,
    /// Selects the handler: "blk", "mmioblk".
    pub kind: String,
    /// The guest node, when the runtime knows it.
    pub vm_path: Option<String>,
    /// The `linux.devices` path this device stands for; empty: wait for the device but make no
    /// spec update (e.g. the root disk).
    pub container_path: String,
    pub options: Vec<String>,
}

/// What handling one device changes in the spec; see [`apply_device_updates`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUpdate {
    pub container_path: String,
    pub guest_major: i64,
    pub guest_minor: i64,
    /// The device's new path in the container; `None` keeps `container_path`.
    pub final_path: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestNodeError {
    #[error("guest device node {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest device node {path} is not a block or char device")]
    NotADeviceNode { path: PathBuf },
}

impl DeviceUpdate {
    /// An update to the numbers of the guest node `vm_path`, read now with `stat` so that a
    /// missing node fails here, naming its path.
    pub fn from_guest_node(
        container_path: impl Into<String>,
        vm_path: impl AsRef<Path>,
        final_path: Option<String>,
    ) -> Result<DeviceUpdate, GuestNodeError> {
        let path = vm_path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| GuestNodeError::Stat { path: path.to_owned(), source })?;
        let ft = meta.file_type();
        if !ft.is_block_device() && !ft.is_char_device() {
            return Err(GuestNodeError::NotADeviceNode { path: path.to_owned() });
        }
        let rdev = meta.rdev();
        Ok(DeviceUpdate {
            container_path: container_path.into(),
            guest_major: i64::from(libc::major(rdev)),
            guest_minor: i64::from(libc::minor(rdev)),
            final_path,
        })
    }
}

/// Where handlers look and how long they wait.
pub struct DeviceContext<'a> {
    /// Where sysfs is mounted: "/sys".
    pub sysfs_root: PathBuf,
    /// Where device nodes are: "/dev".
    pub dev_root: PathBuf,
    pub hotplug_timeout: Duration,
    /// Must have been listening since before the first request is handled (see [`uevent`]).
    pub uevents: &'a mut dyn UeventSource,
}

impl<'a> DeviceContext<'a> {
    /// The real guest: /sys, /dev, [`DEFAULT_HOTPLUG_TIMEOUT`].
    pub fn new(uevents: &'a mut dyn UeventSource) -> Self {
        DeviceContext {
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            hotplug_timeout: DEFAULT_HOTPLUG_TIMEOUT,
            uevents,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {id:?}: unknown device kind {kind:?}")]
    UnknownKind { kind: String, id: String },
    #[error("device {id:?} of kind {kind:?} needs vm_path (the guest node) and has none")]
    MissingVmPath { kind: String, id: String },
    #[error("device id {id:?} is not a PCI path: {source}")]
    BadPciPath {
        id: String,
        #[source]
        source: PciPathError,
    },
    #[error(transparent)]
    Pci(#[from] PciResolveError),
    #[error("PCI path {pci_path}: no block device appeared within {waited:?}")]
    Timeout { pci_path: String, waited: Duration },
    #[error("PCI path {pci_path}: the disk is in sysfs but {node} did not appear within {waited:?}")]
    NodeMissing { pci_path: String, node: PathBuf, waited: Duration },
    #[error("{sysfs} holds several disks {names:?}; a virtio-blk device has one")]
    SeveralDisks { sysfs: PathBuf, names: Vec<String> },
    #[error("PCI path {pci_path}: device name {name:?} is not a plain name under /dev")]
    BadDevName { pci_path: String, name: String },
    #[error("reading sysfs at {path}: {source}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for uevents: {0}")]
    Uevent(#[source] io::Error),
    #[error(transparent)]
    GuestNode(#[from] GuestNodeError),
    #[error(transparent)]
    Spec(#[from] SpecRewriteError),
}

/// The update for `req` once its guest node is known; none for an empty `container_path`, but
/// the node must exist either way.
fn update_for(req: &DeviceRequest, node: &Path) -> Result<Option<DeviceUpdate>, DeviceError> {
    let update = DeviceUpdate::from_guest_node(req.container_path.clone(), node, None)?;
    Ok((!req.container_path.is_empty()).then_some(update))
}

/// Handles one request by its kind; never touches the spec.
pub fn handle_device(req: &DeviceRequest, ctx: &mut DeviceContext<'_>) -> Result<Option<DeviceUpdate>, DeviceError> {
    match req.kind.as_str() {
        blk::KIND => blk::handle(req, ctx),
        MMIO_BLK_KIND => {
            let vm_path = req
                .vm_path
                .as_deref()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| DeviceError::MissingVmPath { kind: req.kind.clone(), id: req.id.clone() })?;
            update_for(req, Path::new(vm_path))
        }
        _ => Err(DeviceError::UnknownKind { kind: req.kind.clone(), id: req.id.clone() }),
    }
}

/// Handles every request in order; the first failure stops it.
pub fn handle_devices(
    requests: &[DeviceRequest],
    ctx: &mut DeviceContext<'_>,
) -> Result<Vec<DeviceUpdate>, DeviceError> {
    let mut updates = Vec::with_capacity(requests.len());
    for req in requests {
        if let Some(update) = handle_device(req, ctx)? {
            updates.push(update);
        }
    }
    Ok(updates)
}

/// The CreateContainer path: handle all devices, then rewrite the spec once. On error the spec
/// is unchanged.
pub fn add_devices(
    spec: &mut Spec,
    requests: &[DeviceRequest],
    ctx: &mut DeviceContext<'_>,
) -> Result<(), DeviceError> {
    let updates = handle_devices(requests, ctx)?;
    apply_device_updates(spec, &updates)?;
    Ok(())
}

#[cfg(test)]
mod tests;
