//! Logging with `tracing`: to stderr (the console when PID 1; quiet by default, since every
//! console byte costs a VM exit) and, optionally, to a vsock port on the host.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The host port the agent's log goes to when asked (`--log-vsock`).
pub const LOG_VSOCK_PORT: u32 = 1025;

/// The default level: warnings and errors only.
pub const DEFAULT_LEVEL: &str = "warn";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log level {level:?}: {msg}")]
    Level { level: String, msg: String },
    #[error("a logger is already installed")]
    AlreadySet,
}

/// Where log lines go: stderr, plus a vsock stream if one is connected.
#[derive(Clone, Default)]
pub struct LogSink {
    vsock: Option<Arc<File>>,
}

impl LogSink {
    /// Connects to the host's vsock `port`; when that fails the log stays on stderr only, and
    /// the reason is returned for logging.
    pub fn with_vsock(port: u32) -> (LogSink, Option<io::Error>) {
        match crate::sys::vsock_connect(crate::sys::VMADDR_CID_HOST, port) {
            Ok(fd) => (LogSink { vsock: Some(Arc::new(File::from(fd))) }, None),
            Err(e) => (LogSink::default(), Some(e)),
        }
    }
}

/// One log line's writer.
pub struct SinkWriter {
    vsock: Option<Arc<File>>,
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(v) = &self.vsock {
            // Best effort: a host that does not read loses lines, the agent never waits.
            let _ = (&**v).write_all(buf);
        }
        io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter { vsock: self.vsock.clone() }
    }
}

/// Parses a level or filter ("warn", "debug", "shoji_agent=trace").
pub fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Level { level: level.to_owned(), msg: e.to_string() })
}

/// Installs the global subscriber: plain text, no colours, no timestamps (the host stamps lines).
pub fn init(level: &str, sink: LogSink) -> Result<(), LogError> {
    tracing_subscriber::fmt()
        .with_env_filter(filter(level)?)
        .with_writer(sink)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init()
        .map_err(|_| LogError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        for ok in ["warn", "debug", "shoji_agent=trace,info", "off"] {
            filter(ok).unwrap();
        }
        let e = filter("shoji_agent=loud").unwrap_err();
        assert!(e.to_string().contains("loud"), "{e}");
    }
}
