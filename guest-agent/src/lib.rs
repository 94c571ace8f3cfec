//! Shoji's guest agent, PID 1 in the sandbox VM: the RPC service ([`service`]) over a container
//! runtime ([`runtime`]), storages ([`storage`]), devices and the batched OCI spec rewrite
//! ([`device`]), init duties ([`init`]), listen addresses ([`listen`]) and logging ([`logging`]).

pub mod device;
pub mod init;
pub mod listen;
pub mod logging;
pub mod network;
pub mod runtime;
pub mod service;
pub mod storage;
pub mod sys;
