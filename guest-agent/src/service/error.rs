//! Errors as the client sees them: a ttrpc status code and a one-line message that names the
//! container, process, storage or field concerned.

use shoji_protocol::ttrpc::{self, Code};

use crate::device::{DeviceError, GuestNodeError};
use crate::runtime::RuntimeError;
use crate::storage::StorageError;

/// An RPC failure: what the client gets as `ttrpc::Error::RpcStatus`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    /// The message is kept to one line: a client logs it as one.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.contains('\n') { message.lines().collect::<Vec<_>>().join("; ") } else { message };
        RpcError { code, message }
    }

    pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Self {
        RpcError::new(Code::INVALID_ARGUMENT, format!("{field}: {msg}"))
    }

    /// Prefixes the message ("container \"c1\": ...").
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        RpcError::new(self.code, format!("{what}: {}", self.message))
    }

    /// A runtime error about container `id`; the message names the container.
    pub fn runtime(id: &str, e: RuntimeError) -> Self {
        let code = runtime_code(&e);
        let msg = e.to_string();
        if msg.contains(&format!("{id:?}")) {
            RpcError::new(code, msg)
        } else {
            RpcError::new(code, format!("container {id:?}: {msg}"))
        }
    }
}

impl From<RpcError> for ttrpc::Error {
    fn from(e: RpcError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

/// The status code of a runtime error.
pub fn runtime_code(e: &RuntimeError) -> Code {
    match e {
        RuntimeError::NoContainer(_) | RuntimeError::NoProcess { .. } => Code::NOT_FOUND,
        RuntimeError::Exists(_) | RuntimeError::ProcessExists { .. } => Code::ALREADY_EXISTS,
        RuntimeError::BadState { .. } => Code::FAILED_PRECONDITION,
        RuntimeError::InvalidSpec { .. } => Code::INVALID_ARGUMENT,
        RuntimeError::Io { .. } | RuntimeError::Other(_) => Code::INTERNAL,
    }
}

/// The status code of a device error: bad requests are INVALID_ARGUMENT, a device that is not
/// there is NOT_FOUND, the rest INTERNAL.
pub fn device_code(e: &DeviceError) -> Code {
    match e {
        DeviceError::UnknownKind { .. }
        | DeviceError::MissingVmPath { .. }
        | DeviceError::BadPciPath { .. }
        | DeviceError::BadDevName { .. }
        | DeviceError::GuestNode(GuestNodeError::NotADeviceNode { .. })
        | DeviceError::Spec(_) => Code::INVALID_ARGUMENT,
        DeviceError::Pci(_)
        | DeviceError::Timeout { .. }
        | DeviceError::NodeMissing { .. }
        | DeviceError::GuestNode(GuestNodeError::Stat { .. }) => Code::NOT_FOUND,
        DeviceError::SeveralDisks { .. } | DeviceError::Sysfs { .. } | DeviceError::Uevent(_) => Code::INTERNAL,
    }
}

/// The status code of a storage error.
pub fn storage_code(e: &StorageError) -> Code {
    match e {
        StorageError::UnknownDriver { .. } | StorageError::BadMountPoint { .. } | StorageError::Invalid { .. } => {
            Code::INVALID_ARGUMENT
        }
        StorageError::MissingSource { .. } => Code::NOT_FOUND,
        StorageError::Device { err, .. } => device_code(err),
        StorageError::MountPoint { .. } | StorageError::Mount { .. } | StorageError::Unmount { .. } => Code::INTERNAL,
    }
}

impl From<StorageError> for RpcError {
    fn from(e: StorageError) -> Self {
        RpcError::new(storage_code(&e), e.to_string())
    }
}

impl From<DeviceError> for RpcError {
    fn from(e: DeviceError) -> Self {
        RpcError::new(device_code(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_map_to_codes_and_name_the_container() {
        let cases = [
            (RuntimeError::NoContainer("c1".into()), Code::NOT_FOUND),
            (RuntimeError::NoProcess { id: "c1".into(), exec_id: "e".into() }, Code::NOT_FOUND),
            (RuntimeError::Exists("c1".into()), Code::ALREADY_EXISTS),
            (RuntimeError::ProcessExists { id: "c1".into(), exec_id: "e".into() }, Code::ALREADY_EXISTS),
            (
                RuntimeError::BadState { id: "c1".into(), state: "stopped".into(), action: "exec".into() },
                Code::FAILED_PRECONDITION,
            ),
            (RuntimeError::InvalidSpec { field: "process.args".into(), msg: "empty".into() }, Code::INVALID_ARGUMENT),
            (RuntimeError::Other("boom\nsecond line".into()), Code::INTERNAL),
        ];
        for (e, code) in cases {
            let r = RpcError::runtime("c1", e);
            assert_eq!(r.code, code, "{r}");
            assert!(r.message.contains("\"c1\""), "{r}");
            assert!(!r.message.contains('\n'), "{r}");
        }
        let r = RpcError::runtime("c1", RuntimeError::Other("boom".into()));
        assert_eq!(r.message, "container \"c1\": boom");
    }

    #[test]
    fn becomes_an_rpc_status() {
        let e: ttrpc::Error = RpcError::invalid("oci_spec_json", "expected value").into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::INVALID_ARGUMENT);
                assert_eq!(s.message(), "oci_spec_json: expected value");
            }
            other => panic!("{other:?}"),
        }
    }
}
