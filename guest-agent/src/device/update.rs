//! The one batched rewrite of a container's OCI spec from host device numbers to guest ones.
//!
//! Device handlers never touch the spec: each returns a [`DeviceUpdate`]. Once every device is
//! handled, [`apply_device_updates`] rewrites `linux.devices` and the `linux.resources.devices`
//! cgroup rules in one pass, so the spec is either wholly host or wholly guest. Every lookup is
//! keyed on the ORIGINAL host numbers and each entry is visited once, so a device whose host
//! numbers equal another device's guest numbers is never translated twice.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;

use oci_spec::runtime::{LinuxDeviceType, Spec};

use super::DeviceUpdate;

/// The two device-number spaces. `u` (unbuffered char) shares the char space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeType {
    Block,
    Char,
}

impl NodeType {
    /// The number space of an OCI device type; `None` for `a` (all) and `p` (FIFO).
    pub fn of(typ: LinuxDeviceType) -> Option<Self> {
        match typ {
            LinuxDeviceType::B => Some(NodeType::Block),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(NodeType::Char),
            LinuxDeviceType::A | LinuxDeviceType::P => None,
        }
    }
}

impl fmt::Display for NodeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeType::Block => "b",
            NodeType::Char => "c",
        })
    }
}

/// Why a batch of device updates could not be applied. The spec is untouched in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecRewriteError {
    #[error("OCI spec has no linux section, so device updates for {paths:?} cannot be applied")]
    NoLinux { paths: Vec<String> },
    #[error("conflicting device updates: two updates for container path {path}")]
    DuplicateUpdate { path: String },
    #[error("linux.devices has more than one entry at {path}, which a device update targets")]
    DuplicateDevicePath { path: String },
    #[error("linux.devices entry {path} has type {typ:?}, which has no device numbers to update")]
    NotADeviceNode { path: String, typ: String },
    #[error("conflicting resource updates: {first} and {second} both have host numbers {typ} {major}:{minor}")]
    ConflictingHostNumbers { typ: NodeType, major: i64, minor: i64, first: String, second: String },
    #[error("device updates for {paths:?} match no entry in linux.devices")]
    MissingDevices { paths: Vec<String> },
}

/// Applies all device updates to `spec` at once.
///
/// - `linux.devices`: the entry whose `path` is an update's `container_path` gets the guest
///   major:minor, and `path = final_path` when one is given.
/// - `linux.resources.devices`: a rule with type `b`, `c` or `u` and both numbers set whose
///   (type, major, minor) equals an updated device's ORIGINAL host numbers gets that device's
///   guest numbers. Wildcard rules (type `a`, or a missing major or minor) are left alone.
///
/// An empty batch is a no-op, even without a `linux` section. On any error the spec is left
/// exactly as it was: the work is done on a copy that replaces the original only on success.
pub fn apply_device_updates(spec: &mut Spec, updates: &[DeviceUpdate]) -> Result<(), SpecRewriteError> {
    if updates.is_empty() {
        return Ok(());
    }

    let mut by_path: HashMap<&str, &DeviceUpdate> = HashMap::with_capacity(updates.len());
    for u in updates {
        if by_path.insert(u.container_path.as_str(), u).is_some() {
            return Err(SpecRewriteError::DuplicateUpdate { path: u.container_path.clone() });
        }
    }

    let Some(mut linux) = spec.linux().clone() else {
        return Err(SpecRewriteError::NoLinux { paths: updates.iter().map(|u| u.container_path.clone()).collect() });
    };

    // (type, host major, host minor) -> (guest major, guest minor, container path)
    let mut by_host_numbers: HashMap<(NodeType, i64, i64), (i64, i64, &str)> = HashMap::new();
    let mut matched: HashSet<&str> = HashSet::with_capacity(updates.len());

    for dev in linux.devices_mut().iter_mut().flatten() {
        let Some(update) = dev.path().to_str().and_then(|p| by_path.get(p)) else {
            continue;
        };
        let path = update.container_path.as_str();
        if !matched.insert(path) {
            return Err(SpecRewriteError::DuplicateDevicePath { path: path.to_owned() });
        }
        let Some(typ) = NodeType::of(dev.typ()) else {
            return Err(SpecRewriteError::NotADeviceNode { path: path.to_owned(), typ: dev.typ().as_str().to_owned() });
        };
        let key = (typ, dev.major(), dev.minor());
        match by_host_numbers.entry(key) {
            Entry::Occupied(first) => {
                return Err(SpecRewriteError::ConflictingHostNumbers {
                    typ,
                    major: key.1,
                    minor: key.2,
                    first: first.get().2.to_owned(),
                    second: path.to_owned(),
                });
            }
            Entry::Vacant(slot) => {
                slot.insert((update.guest_major, update.guest_minor, path));
            }
        }
        dev.set_major(update.guest_major);
        dev.set_minor(update.guest_minor);
        if let Some(final_path) = &update.final_path {
            dev.set_path(final_path.into());
        }
    }

    let missing: Vec<String> = updates
        .iter()
        .filter(|u| !matched.contains(u.container_path.as_str()))
        .map(|u| u.container_path.clone())
        .collect();
    if !missing.is_empty() {
        return Err(SpecRewriteError::MissingDevices { paths: missing });
    }

    let rules = linux.resources_mut().as_mut().and_then(|r| r.devices_mut().as_mut());
    for rule in rules.into_iter().flatten() {
        let (Some(typ), Some(major), Some(minor)) = (rule.typ().and_then(NodeType::of), rule.major(), rule.minor())
        else {
            continue;
        };
        if let Some(&(guest_major, guest_minor, _)) = by_host_numbers.get(&(typ, major, minor)) {
            rule.set_major(Some(guest_major));
            rule.set_minor(Some(guest_minor));
        }
    }

    spec.set_linux(Some(linux));
    Ok(())
}

#[cfg(test)]
mod tests;
