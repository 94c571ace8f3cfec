//! `shoji-agent`: the guest agent binary. As PID 1 it first sets up the guest (mounts, console),
//! then serves the agent API until SIGTERM/SIGINT, removes what is left and powers the VM off.
//! As an ordinary process (tests, debugging) it does the same minus the init duties, and exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use clap::Parser;
use oci_spec::runtime::{LinuxResources, Process};
use shoji_agent::listen::{self, ListenAddr};
use shoji_agent::runtime::{ContainerConfig, ContainerRuntime, ExitStatus, LinuxRuntime, Result, RuntimeError, Stats};
use shoji_agent::service::{Agent, ServiceConfig};
use shoji_agent::{init, logging, sys};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(name = "shoji-agent", version, about = "Shoji's guest agent")]
struct Args {
    /// Where to serve: vsock://CID:PORT or unix:PATH; repeat for several.
    #[arg(long = "listen", value_name = "ADDR", default_values_t = [listen::default_listen()])]
    listen: Vec<String>,
    /// The container runtime's state directory.
    #[arg(long, value_name = "DIR", default_value = "/run/shoji-agent")]
    state_dir: PathBuf,
    /// Log level or filter (warn, info, debug, shoji_agent=trace); default: $SHOJI_AGENT_LOG or warn.
    #[arg(long, value_name = "LEVEL")]
    log: Option<String>,
    /// Also send the log to this vsock port on the host (1025 by convention:
    /// `logging::LOG_VSOCK_PORT`).
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "1025")]
    log_vsock: Option<u32>,
}

/// The container runtime: [`LinuxRuntime`]. If it cannot start (no cgroup hierarchy, say), the
/// agent still serves, and every container call answers why.
fn default_runtime(state_dir: &Path) -> Arc<dyn ContainerRuntime> {
    match LinuxRuntime::new(state_dir.to_owned()) {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            tracing::error!("container runtime: {e}");
            Arc::new(NoRuntime { reason: format!("no container runtime: {e}") })
        }
    }
}

/// What answers every container call when the runtime could not start.
struct NoRuntime {
    reason: String,
}

impl NoRuntime {
    fn none<T>(&self) -> Result<T> {
        Err(RuntimeError::Other(self.reason.clone()))
    }
}

#[async_trait]
impl ContainerRuntime for NoRuntime {
    async fn create(&self, _: ContainerConfig) -> Result<()> {
        self.none()
    }
    async fn start(&self, _: &str) -> Result<()> {
        self.none()
    }
    async fn exec(&self, _: &str, _: &str, _: Process) -> Result<()> {
        self.none()
    }
    async fn signal(&self, _: &str, _: &str, _: i32, _: bool) -> Result<()> {
        self.none()
    }
    async fn wait(&self, _: &str, _: &str) -> Result<ExitStatus> {
        self.none()
    }
    async fn read_stdout(&self, _: &str, _: &str, _: usize) -> Result<Vec<u8>> {
        self.none()
    }
    async fn read_stderr(&self, _: &str, _: &str, _: usize) -> Result<Vec<u8>> {
        self.none()
    }
    async fn write_stdin(&self, _: &str, _: &str, _: &[u8]) -> Result<usize> {
        self.none()
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<()> {
        self.none()
    }
    async fn resize_tty(&self, _: &str, _: &str, _: u16, _: u16) -> Result<()> {
        self.none()
    }
    async fn stats(&self, _: &str) -> Result<Stats> {
        self.none()
    }
    async fn update(&self, _: &str, _: LinuxResources) -> Result<()> {
        self.none()
    }
    async fn pids(&self, _: &str) -> Result<Vec<i32>> {
        self.none()
    }
    async fn remove(&self, id: &str, _: u32) -> Result<()> {
        Err(RuntimeError::NoContainer(id.to_owned()))
    }
    async fn next_oom_event(&self) -> String {
        std::future::pending().await
    }
}

fn main() -> ExitCode {
    let pid1 = sys::is_pid1();
    // PID 1 must never exit (the kernel would panic): whatever happens, it powers the VM off.
    let result = std::panic::catch_unwind(|| agent_main(pid1));
    if pid1 {
        init::power_off();
    }
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn agent_main(pid1: bool) -> anyhow::Result<()> {
    let mut early = Vec::new();
    if pid1 {
        early.extend(init::init_pid1(Path::new("/")).into_iter().map(|e| e.to_string()));
    }

    let args = match Args::try_parse() {
        Ok(a) => a,
        // The kernel hands init its unknown command-line words: PID 1 carries on with defaults.
        Err(e)
            if pid1
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) =>
        {
            early.push(format!("ignoring the command line: {}", e.to_string().lines().next().unwrap_or("")));
            Args::parse_from(["shoji-agent"])
        }
        Err(e) => e.exit(),
    };

    let level = args.log.clone().or_else(|| std::env::var("SHOJI_AGENT_LOG").ok());
    let level = level.as_deref().unwrap_or(logging::DEFAULT_LEVEL);
    let (sink, vsock_err) = match args.log_vsock {
        Some(port) => logging::LogSink::with_vsock(port),
        None => (logging::LogSink::default(), None),
    };
    if let Err(e) = logging::init(level, sink.clone()) {
        eprintln!("shoji-agent: {e}; logging at {}", logging::DEFAULT_LEVEL);
        let _ = logging::init(logging::DEFAULT_LEVEL, sink);
    }
    for e in early {
        tracing::error!("init: {e}");
    }
    if let (Some(port), Some(e)) = (args.log_vsock, vsock_err) {
        tracing::warn!("log to vsock port {port}: {e}");
    }
    if !pid1 {
        if let Err(e) = init::become_subreaper() {
            tracing::warn!("cannot become a child subreaper: {e}");
        }
    }

    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
        eprintln!("shoji-agent: {e:#}");
    }
    result
}

/// Serves until SIGTERM or SIGINT, then stops serving, removes every container and syncs.
async fn run(args: Args) -> anyhow::Result<()> {
    let addrs: Vec<ListenAddr> =
        args.listen.iter().map(|s| s.parse()).collect::<std::result::Result<_, _>>().context("--listen")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    let agent = Arc::new(Agent::new(default_runtime(&args.state_dir), ServiceConfig::guest()));
    let mut servers = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        servers.push(listen::serve(addr, agent.clone()).await?);
    }
    tracing::info!(version = shoji_agent::service::AGENT_VERSION, "agent ready");

    let sig = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{sig}: shutting down");
    for server in &mut servers {
        if let Err(e) = server.shutdown().await {
            tracing::warn!("stopping a server: {e}");
        }
    }
    if let Err(e) = agent.destroy_all().await {
        tracing::warn!("cleaning up: {e}");
    }
    for addr in &addrs {
        if let ListenAddr::Unix(path) = addr {
            let _ = std::fs::remove_file(path);
        }
    }
    sys::sync();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = Args::try_parse_from(["shoji-agent"]).unwrap();
        assert_eq!(a.listen, ["vsock://-1:1024"]);
        assert_eq!((a.log, a.log_vsock), (None, None));
        let a =
            Args::try_parse_from(["shoji-agent", "--listen", "unix:/a", "--listen", "unix:/b", "--log-vsock"]).unwrap();
        assert_eq!(a.listen, ["unix:/a", "unix:/b"]);
        assert_eq!(a.log_vsock, Some(logging::LOG_VSOCK_PORT));
        let a = Args::try_parse_from(["shoji-agent", "--log-vsock", "2000", "--log", "debug"]).unwrap();
        assert_eq!((a.log_vsock, a.log.as_deref()), (Some(2000), Some("debug")));
        // What the kernel may hand PID 1 is not ours to parse.
        assert!(Args::try_parse_from(["shoji-agent", "quiet", "console=ttyS0"]).is_err());
    }
}
