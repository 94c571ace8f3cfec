//! From protocol messages to what the runtime, device and storage code take, checking every
//! field on the way; each error names the field.

use oci_spec::runtime::{LinuxResources, Process, Spec};
use shoji_protocol::agent;

use super::error::RpcError;
use crate::device::DeviceRequest;
use crate::runtime::ExitStatus;
use crate::storage::StorageRequest;

/// The most output one ReadStdout/ReadStderr returns (and what `len = 0` asks for).
pub const MAX_READ_LEN: usize = 1 << 20;

/// Container ids as runc takes them: letters, digits, `_+-.`, not starting with `.`, at most
/// 1024 bytes; they end up in paths and cgroup names.
pub fn check_container_id(id: &str) -> Result<(), RpcError> {
    let field = "container_id";
    if id.is_empty() {
        return Err(RpcError::invalid(field, "must not be empty"));
    }
    if id.len() > 1024 {
        return Err(RpcError::invalid(field, format!("is {} bytes long; at most 1024", id.len())));
    }
    if id.starts_with('.') || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b)) {
        return Err(RpcError::invalid(field, format!("{id:?} may hold only letters, digits and _+-. (not first)")));
    }
    Ok(())
}

/// Exec ids are free-form but must not hold `/` or NUL; empty means the init process.
pub fn check_exec_id(exec_id: &str) -> Result<(), RpcError> {
    if exec_id.len() > 1024 || exec_id.contains(['/', '\0']) {
        return Err(RpcError::invalid("exec_id", format!("{exec_id:?} must be at most 1024 bytes without '/' or NUL")));
    }
    Ok(())
}

/// The error for JSON in `field`: names the field and where the JSON is wrong.
fn json_error<T>(field: &str, json: &[u8], parsed: serde_json::Result<T>) -> Result<T, RpcError> {
    if json.is_empty() {
        return Err(RpcError::invalid(field, "is empty"));
    }
    parsed.map_err(|e| RpcError::invalid(field, e))
}

/// `oci_spec_json` → [`Spec`].
pub fn parse_spec(json: &[u8]) -> Result<Spec, RpcError> {
    json_error("oci_spec_json", json, serde_json::from_slice(json))
}

/// `process_json` → [`Process`].
pub fn parse_process(json: &[u8]) -> Result<Process, RpcError> {
    json_error("process_json", json, serde_json::from_slice(json))
}

/// `resources_json` → [`LinuxResources`].
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, RpcError> {
    json_error("resources_json", json, serde_json::from_slice(json))
}

pub fn device_request(d: &agent::Device) -> DeviceRequest {
    DeviceRequest {
        id: d.id.clone(),
        kind: d.type_.clone(),
        vm_path: (!d.vm_path.is_empty()).then(|| d.vm_path.clone()),
        container_path: d.container_path.clone(),
        options: d.options.clone(),
    }
}

pub fn storage_request(s: &agent::Storage) -> StorageRequest {
    StorageRequest {
        driver: s.driver.clone(),
        driver_options: s.driver_options.clone(),
        source: s.source.clone(),
        fstype: s.fstype.clone(),
        options: s.options.clone(),
        mount_point: s.mount_point.clone(),
    }
}

/// A signal number: 0 (probe) up to SIGRTMAX (64).
pub fn signal(n: u32) -> Result<i32, RpcError> {
    if n > 64 {
        return Err(RpcError::invalid("signal", format!("{n} is not a signal number (0-64)")));
    }
    Ok(n as i32)
}

/// Terminal rows or columns.
pub fn tty_dimension(field: &str, n: u32) -> Result<u16, RpcError> {
    u16::try_from(n).map_err(|_| RpcError::invalid(field, format!("{n} is more than {}", u16::MAX)))
}

/// The read size: `len` capped at [`MAX_READ_LEN`]; 0 asks for the most.
pub fn read_len(len: u32) -> usize {
    match len as usize {
        0 => MAX_READ_LEN,
        n => n.min(MAX_READ_LEN),
    }
}

pub fn wait_response(s: ExitStatus) -> agent::WaitProcessResponse {
    agent::WaitProcessResponse {
        status: s.status,
        signaled: s.signal.is_some(),
        signal: s.signal.map_or(0, |n| u32::try_from(n).unwrap_or(0)),
        oom_killed: s.oom_killed,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoji_protocol::ttrpc::Code;

    #[test]
    fn container_ids() {
        for ok in ["c1", "a.b-c_d+e", &"x".repeat(1024)] {
            check_container_id(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "é", &"x".repeat(1025)] {
            let e = check_container_id(bad).unwrap_err();
            assert_eq!(e.code, Code::INVALID_ARGUMENT, "{bad:?}");
            assert!(e.message.starts_with("container_id: "), "{e}");
        }
        check_exec_id("").unwrap();
        check_exec_id("exec 1").unwrap();
        assert!(check_exec_id("a/b").is_err() && check_exec_id("a\0").is_err());
    }

    #[test]
    fn json_errors_name_field_and_position() {
        let e = parse_spec(b"{\"ociVersion\": 5}").unwrap_err();
        assert_eq!(e.code, Code::INVALID_ARGUMENT);
        assert!(e.message.starts_with("oci_spec_json: invalid type"), "{e}");
        assert!(e.message.contains("line 1 column"), "{e}");
        assert_eq!(parse_spec(b"").unwrap_err().message, "oci_spec_json: is empty");
        let e = parse_process(b"{\"args\": [\"sh\"], \"cwd\": \"/\", \"user\": 7}").unwrap_err();
        assert!(e.message.starts_with("process_json: "), "{e}");
        let e = parse_resources(b"[").unwrap_err();
        assert!(e.message.starts_with("resources_json: "), "{e}");
        let spec = parse_spec(br#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), std::path::Path::new("rootfs"));
    }

    #[test]
    fn numbers_are_checked() {
        assert_eq!(signal(9).unwrap(), 9);
        assert_eq!(signal(0).unwrap(), 0);
        assert!(signal(65).unwrap_err().message.contains("65"));
        assert_eq!(tty_dimension("row", 24).unwrap(), 24);
        assert!(tty_dimension("column", 70_000).unwrap_err().message.starts_with("column: "));
        assert_eq!(read_len(0), MAX_READ_LEN);
        assert_eq!(read_len(10), 10);
        assert_eq!(read_len(u32::MAX), MAX_READ_LEN);
    }

    #[test]
    fn wait_status_fields() {
        let r = wait_response(ExitStatus { status: 137, signal: Some(9), oom_killed: true });
        assert_eq!((r.status, r.signaled, r.signal, r.oom_killed), (137, true, 9, true));
        let r = wait_response(ExitStatus { status: 3, signal: None, oom_killed: false });
        assert_eq!((r.status, r.signaled, r.signal, r.oom_killed), (3, false, 0, false));
    }

    #[test]
    fn proto_messages_become_requests() {
        let d = agent::Device {
            id: "02/01".into(),
            type_: "blk".into(),
            container_path: "/dev/xvda".into(),
            ..Default::default()
        };
        let r = device_request(&d);
        assert_eq!((r.kind.as_str(), r.vm_path, r.id.as_str()), ("blk", None, "02/01"));
        let s = agent::Storage { driver: "tmpfs".into(), mount_point: "/run/x".into(), ..Default::default() };
        assert_eq!(storage_request(&s).mount_point, "/run/x");
    }
}
