//! The typed reason a process could not be started, as it crosses the agent boundary: a
//! [`StartFailure`] packed into the ttrpc status details of the failing RPC.
use crate::agent::{start_failure::Kind, StartFailure};
use protobuf::{Enum, Message};
use ttrpc::proto::{Any, Code};

/// The `Any` type URL of a packed [`StartFailure`].
pub const START_FAILURE_TYPE_URL: &str = "type.googleapis.com/shoji.agent.v1.StartFailure";

/// An RPC error whose status carries `kind` next to the one-line message.
pub fn status(code: Code, message: impl ToString, kind: Kind) -> ttrpc::Error {
    let mut st = ttrpc::get_status(code, message);
    let failure = StartFailure { kind: kind.into(), ..Default::default() };
    // Writing a two-field message into a Vec cannot fail.
    let value = failure.write_to_bytes().unwrap_or_default();
    st.details.push(Any { type_url: START_FAILURE_TYPE_URL.into(), value, ..Default::default() });
    ttrpc::Error::RpcStatus(st)
}

/// The start failure an RPC error carries, if any (an older agent sends none; an unknown kind
/// from a newer one reads as `Other`).
pub fn kind_of(e: &ttrpc::Error) -> Option<Kind> {
    let ttrpc::Error::RpcStatus(st) = e else { return None };
    let any = st.details.iter().find(|a| a.type_url == START_FAILURE_TYPE_URL)?;
    let failure = StartFailure::parse_from_bytes(&any.value).ok()?;
    Some(Kind::from_i32(failure.kind.value()).unwrap_or(Kind::OTHER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_failure_round_trips_through_the_status() {
        for kind in [Kind::OTHER, Kind::NOT_FOUND, Kind::NOT_EXECUTABLE] {
            let e = status(Code::INVALID_ARGUMENT, "process.args[0]: x", kind);
            assert_eq!(kind_of(&e), Some(kind));
        }
        assert_eq!(
            kind_of(&ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "container \"c\" not found"))),
            None
        );
        assert_eq!(kind_of(&ttrpc::Error::Others("x".into())), None);
    }

    #[test]
    fn a_garbled_or_unknown_kind_is_not_trusted_as_a_known_one() {
        let mut st = ttrpc::get_status(Code::INTERNAL, "m");
        st.details.push(Any { type_url: START_FAILURE_TYPE_URL.into(), value: vec![0x08, 0x2a], ..Default::default() });
        assert_eq!(kind_of(&ttrpc::Error::RpcStatus(st.clone())), Some(Kind::OTHER));
        st.details[0].value = vec![0xff];
        assert_eq!(kind_of(&ttrpc::Error::RpcStatus(st)), None);
    }
}
