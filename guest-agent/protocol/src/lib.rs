//! The agent API: messages and async ttrpc client/server stubs generated from
//! `protos/agent.proto`. The host side (the `shoji-sandbox` session, which the shim and the CLI
//! stand on) uses the client, the agent the server; `start_failure` types why a program could
//! not start.

/// Bumped when RPCs are added; the agent reports it in `Health.Version`. 2: RemoveDevice; 3: UpdateNetwork.
pub const API_VERSION: u32 = 4;

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
        assert_eq!((v.agent_version.as_str(), v.api_version), ("test", crate::API_VERSION));
        // Unimplemented RPCs answer with an error, not a hang.
        assert!(client.check(ttrpc::context::with_timeout(5_000_000_000), &CheckRequest::new()).await.is_err());
        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn remove_device_request_round_trips() {
        let req =
            RemoveDeviceRequest { pci_path: "02.1/03".into(), timeout_ms: 2500, force: true, ..Default::default() };
        let back = RemoveDeviceRequest::parse_from_bytes(&req.write_to_bytes().unwrap()).unwrap();
        assert_eq!((back.pci_path.as_str(), back.timeout_ms, back.force), ("02.1/03", 2500, true));
        // Defaults are what an older client that knows only the path would send.
        let only_path = RemoveDeviceRequest { pci_path: "05".into(), ..Default::default() };
        let back = RemoveDeviceRequest::parse_from_bytes(&only_path.write_to_bytes().unwrap()).unwrap();
        assert_eq!((back.timeout_ms, back.force), (0, false));
    }

    /// RemoveDevice over a real ttrpc connection: the server sees the request as sent; an
    /// agent without the RPC (older: only other services registered) answers with an error
    /// status, not a hang.
    #[tokio::test(flavor = "current_thread")]
    async fn remove_device_over_a_unix_socket() {
        use super::agent_ttrpc::{create_agent_service, create_health, AgentService, AgentServiceClient, Health};
        use protobuf::well_known_types::empty::Empty;
        use std::sync::{Arc, Mutex};
        #[derive(Default)]
        struct A(Mutex<Vec<(String, u32, bool)>>);
        #[async_trait::async_trait]
        impl AgentService for A {
            async fn remove_device(
                &self,
                _: &ttrpc::asynchronous::TtrpcContext,
                req: RemoveDeviceRequest,
            ) -> ttrpc::Result<Empty> {
                self.0.lock().unwrap().push((req.pci_path, req.timeout_ms, req.force));
                Ok(Empty::new())
            }
        }
        struct OldAgent;
        impl Health for OldAgent {}
        let dir = std::env::temp_dir().join(format!("shoji-proto-rm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let req = RemoveDeviceRequest { pci_path: "06".into(), timeout_ms: 100, force: true, ..Default::default() };
        for new in [true, false] {
            let addr = format!("unix://{}", dir.join(format!("a{new}.sock")).display());
            let agent = Arc::new(A::default());
            let services = if new { create_agent_service(agent.clone()) } else { create_health(Arc::new(OldAgent)) };
            let mut server = ttrpc::asynchronous::Server::new().bind(&addr).unwrap().register_service(services);
            server.start().await.unwrap();
            let client = AgentServiceClient::new(ttrpc::asynchronous::Client::connect(&addr).await.unwrap());
            let r = client.remove_device(ttrpc::context::with_timeout(5_000_000_000), &req).await;
            if new {
                r.unwrap();
                assert_eq!(*agent.0.lock().unwrap(), [("06".to_owned(), 100, true)]);
            } else {
                assert!(matches!(r, Err(ttrpc::Error::RpcStatus(_))), "{r:?}");
            }
            server.shutdown().await.unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
