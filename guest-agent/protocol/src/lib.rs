//! The agent API: messages and async ttrpc client/server stubs generated from
//! `protos/agent.proto`. The host side (the `shoji-sandbox` session, which the shim and the CLI
//! stand on) uses the client, the agent the server; `start_failure` types why a program could
//! not start.

/// Bumped when RPCs are added; the agent reports it in `Health.Version`.
pub const API_VERSION: u32 = 1;

#[allow(clippy::all, unused_imports, missing_docs, dead_code, non_camel_case_types, non_snake_case)]
#[allow(non_upper_case_globals, trivial_casts, unsafe_code, unused_results, unknown_lints, unused_mut, unused)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, unused_imports, missing_docs, dead_code, non_camel_case_types, non_snake_case)]
#[allow(non_upper_case_globals, trivial_casts, unsafe_code, unused_results, unknown_lints, unused_mut, unused)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use ttrpc;

pub mod client;
pub mod start_failure;

#[cfg(test)]
mod tests {
    use super::agent::*;
    use protobuf::Message;

    #[test]
    fn unknown_fields_are_tolerated() {
        // A newer peer adds field 99 to ReadStreamRequest: an older one must still parse it.
        let mut req = ReadStreamRequest::new();
        req.container_id = "c1".into();
        req.len = 4096;
        let mut bytes = req.write_to_bytes().unwrap();
        bytes.extend_from_slice(&[0x98, 0x06, 0x2a]); // field 99, varint 42
        let back = ReadStreamRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!((back.container_id.as_str(), back.len), ("c1", 4096));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn health_round_trip_over_a_unix_socket() {
        use super::agent_ttrpc::{create_health, Health, HealthClient};
        use std::sync::Arc;
        struct H;
        #[async_trait::async_trait]
        impl Health for H {
            async fn version(
                &self,
                _: &ttrpc::asynchronous::TtrpcContext,
                _: CheckRequest,
            ) -> ttrpc::Result<VersionCheckResponse> {
                Ok(VersionCheckResponse {
                    agent_version: "test".into(),
                    api_version: super::API_VERSION,
                    ..Default::default()
                })
            }
        }
        let dir = std::env::temp_dir().join(format!("shoji-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = format!("unix://{}", dir.join("a.sock").display());
        let mut server =
            ttrpc::asynchronous::Server::new().bind(&addr).unwrap().register_service(create_health(Arc::new(H)));
        server.start().await.unwrap();
        let client = HealthClient::new(ttrpc::asynchronous::Client::connect(&addr).await.unwrap());
        let v = client.version(ttrpc::context::with_timeout(5_000_000_000), &CheckRequest::new()).await.unwrap();
        assert_eq!((v.agent_version.as_str(), v.api_version), ("test", 1));
        // Unimplemented RPCs answer with an error, not a hang.
        assert!(client.check(ttrpc::context::with_timeout(5_000_000_000), &CheckRequest::new()).await.is_err());
        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
