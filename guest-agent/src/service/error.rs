//! Errors as the client sees them: a ttrpc status code and a one-line message that names the
//! container, process, storage or field concerned.

use shoji_protocol::agent::start_failure::Kind as StartKind;
use shoji_protocol::ttrpc::{self, Code};

use crate::device::{DeviceError, GuestNodeError};
use crate::runtime::{ExecFailure, RuntimeError};
use crate::storage::StorageError;

/// An RPC failure: what the client gets as `ttrpc::Error::RpcStatus`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
    /// Set when the user program could not be started: sent typed in the status details.
    pub start_failure: Option<StartKind>,
}

impl RpcError {
    /// The message is kept to one line: a client logs it as one.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.contains('\n') { message.lines().collect::<Vec<_>>().join("; ") } else { message };
        RpcError { code, message, start_failure: None }
    }

    pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Self {
        RpcError::new(Code::INVALID_ARGUMENT, format!("{field}: {msg}"))
    }

    /// Prefixes the message ("container \"c1\": ...").
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        RpcError { start_failure: self.start_failure, ..RpcError::new(self.code, format!("{what}: {}", self.message)) }
    }

    /// A runtime error about container `id`; the message names the container.
    pub fn runtime(id: &str, e: RuntimeError) -> Self {
        let code = runtime_code(&e);
        let start_failure = match &e {
            RuntimeError::Exec { kind: ExecFailure::NotFound, .. } => Some(StartKind::NOT_FOUND),
            RuntimeError::Exec { kind: ExecFailure::NotExecutable, .. } => Some(StartKind::NOT_EXECUTABLE),
            RuntimeError::Exec { kind: ExecFailure::Other, .. } => Some(StartKind::OTHER),
            _ => None,
        };
        let msg = e.to_string();
        let r = if msg.contains(&format!("{id:?}")) {
            RpcError::new(code, msg)
        } else {
            RpcError::new(code, format!("container {id:?}: {msg}"))
        };
        RpcError { start_failure, ..r }
    }
}

impl From<RpcError> for ttrpc::Error {
    fn from(e: RpcError) -> Self {
        match e.start_failure {
            Some(kind) => shoji_protocol::start_failure::status(e.code, e.message, kind),
            None => ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message)),
        }
    }
}

/// The status code of a runtime error.
pub fn runtime_code(e: &RuntimeError) -> Code {
    match e {
        RuntimeError::NoContainer(_) | RuntimeError::NoProcess { .. } => Code::NOT_FOUND,
        RuntimeError::Exists(_) | RuntimeError::ProcessExists { .. } => Code::ALREADY_EXISTS,
        RuntimeError::BadState { .. } => Code::FAILED_PRECONDITION,
        RuntimeError::InvalidSpec { .. } | RuntimeError::Exec { .. } => Code::INVALID_ARGUMENT,
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

#[cfg(test)]
mod start_failure_tests {
    use super::*;
    use shoji_protocol::start_failure::kind_of;

    /// The host maps exec failures by kind, never by message: a missing program and a missing
    /// container both say "not found" in words, only one is 127.
    #[test]
    fn exec_failures_travel_typed_and_other_errors_carry_no_kind() {
        for (errno, kind) in [
            (libc::ENOENT, StartKind::NOT_FOUND),
            (libc::EACCES, StartKind::NOT_EXECUTABLE),
            (libc::E2BIG, StartKind::OTHER),
        ] {
            let e = RuntimeError::Exec { kind: ExecFailure::from_errno(errno), msg: "x".into() };
            let t: ttrpc::Error = RpcError::runtime("c1", e).context("StartContainer").into();
            assert_eq!(kind_of(&t), Some(kind), "errno {errno}");
        }
        let t: ttrpc::Error = RpcError::runtime("c1", RuntimeError::NoContainer("c1".into())).into();
        assert_eq!(kind_of(&t), None);
    }
}
