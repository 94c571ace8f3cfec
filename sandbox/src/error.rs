//! The one error of a sandbox, whatever front end sees it. Failures to start a program carry
//! their kind from the agent (typed, in the RPC status), so every front end maps them to the
//! same exit status.
use crate::artifacts::ArtifactError;
use shoji_protocol::agent::start_failure::Kind;
use shoji_protocol::ttrpc;
use shoji_vmm::VmError;

/// Docker's status for a command that was not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// Docker's status for a command that was found but could not be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;

/// Why a program could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    NotFound,
    NotExecutable,
    Other,
}

/// What an agent request's failure was, in the terms of a gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    /// The request was malformed or named something unusable.
    Invalid,
    /// No such container or process.
    NotFound,
    AlreadyExists,
    /// Not in a state that allows it (e.g. already started).
    FailedPrecondition,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("sandbox: {0}")]
    Io(String),
    /// The agent could not be reached, or the connection broke.
    #[error("agent: {0}")]
    Agent(String),
    /// The VM stopped (the reason) while it was needed.
    #[error("sandbox: {0}")]
    Stopped(String),
    /// The agent refused or failed a request; `message` names the container and field.
    #[error("{message}")]
    Rpc { rpc: &'static str, code: RpcCode, message: String },
    /// The program could not be started; [`SandboxError::exit_status`] gives its status.
    #[error("{message}")]
    Start { kind: StartFailure, message: String },
}

impl SandboxError {
    /// The exit status a shell (and Docker) gives a program that could not start: 127 when it
    /// does not exist, 126 when it cannot be executed; `None` for every other failure.
    pub fn exit_status(&self) -> Option<u8> {
        match self {
            SandboxError::Start { kind: StartFailure::NotFound, .. } => Some(EXIT_NOT_FOUND),
            SandboxError::Start { kind: StartFailure::NotExecutable, .. } => Some(EXIT_NOT_EXECUTABLE),
            _ => None,
        }
    }

    /// The status code class of an agent refusal (`None` for failures that are not refusals).
    pub fn rpc_code(&self) -> Option<RpcCode> {
        match self {
            SandboxError::Rpc { code, .. } => Some(*code),
            SandboxError::Start { .. } => Some(RpcCode::Invalid),
            _ => None,
        }
    }
}

/// The error of agent request `rpc`: a typed start failure when the agent sent one, a refusal
/// with its status, or a broken connection.
pub(crate) fn rpc_error(rpc: &'static str, e: ttrpc::Error) -> SandboxError {
    if let Some(kind) = shoji_protocol::start_failure::kind_of(&e) {
        let kind = match kind {
            Kind::NOT_FOUND => StartFailure::NotFound,
            Kind::NOT_EXECUTABLE => StartFailure::NotExecutable,
            Kind::OTHER => StartFailure::Other,
        };
        return SandboxError::Start { kind, message: rpc_msg(&e) };
    }
    match e {
        ttrpc::Error::RpcStatus(s) => {
            use ttrpc::Code;
            let code = match s.code() {
                Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => RpcCode::Invalid,
                Code::NOT_FOUND => RpcCode::NotFound,
                Code::ALREADY_EXISTS => RpcCode::AlreadyExists,
                Code::FAILED_PRECONDITION => RpcCode::FailedPrecondition,
                // A deadline or a lost peer is the connection's failure, not a refusal.
                Code::DEADLINE_EXCEEDED | Code::UNAVAILABLE => {
                    return SandboxError::Agent(format!("{rpc}: {}", s.message()))
                }
                _ => RpcCode::Other,
            };
            SandboxError::Rpc { rpc, code, message: s.message().to_string() }
        }
        e => SandboxError::Agent(format!("{rpc}: {e}")),
    }
}

/// The message of an agent error (its status message, not the whole RPC status).
fn rpc_msg(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoji_protocol::start_failure;
    use ttrpc::Code;

    fn status(code: Code, msg: &str) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
    }

    /// The exit status comes from the typed kind, never from the words: "container not found"
    /// is no 127, and a message that happens to say "process.args[0]" decides nothing.
    #[test]
    fn exit_status_comes_from_the_typed_kind_only() {
        let e = rpc_error("StartContainer", start_failure::status(Code::INVALID_ARGUMENT, "x", Kind::NOT_FOUND));
        assert_eq!(e.exit_status(), Some(127));
        assert_eq!(e.to_string(), "x");
        let e = rpc_error("ExecProcess", start_failure::status(Code::INVALID_ARGUMENT, "y", Kind::NOT_EXECUTABLE));
        assert_eq!(e.exit_status(), Some(126));
        let e = rpc_error("ExecProcess", start_failure::status(Code::INVALID_ARGUMENT, "z", Kind::OTHER));
        assert_eq!(e.exit_status(), None);
        for msg in ["container \"c\" not found", "process.args[0]: \"x\": executable not found"] {
            let e = rpc_error("StartContainer", status(Code::NOT_FOUND, msg));
            assert_eq!(e.exit_status(), None, "{msg}");
            assert_eq!(e.rpc_code(), Some(RpcCode::NotFound));
        }
    }

    #[test]
    fn broken_connections_are_agent_errors_not_refusals() {
        assert!(matches!(rpc_error("WaitProcess", ttrpc::Error::LocalClosed), SandboxError::Agent(_)));
        assert!(matches!(rpc_error("X", status(Code::DEADLINE_EXCEEDED, "late")), SandboxError::Agent(_)));
        let e = rpc_error("CreateContainer", status(Code::INVALID_ARGUMENT, "mounts[0]: bad"));
        assert_eq!(e.rpc_code(), Some(RpcCode::Invalid));
        assert_eq!(e.to_string(), "mounts[0]: bad");
    }
}
