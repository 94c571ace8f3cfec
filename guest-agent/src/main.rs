//! `shoji-agent`: the guest agent binary. As PID 1 it first sets up the guest (mounts, console),
//! then serves the agent API until SIGTERM/SIGINT, removes what is left and powers the VM off.
//! As an ordinary process (tests, debugging) it does the same minus the init duties, and exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use shoji_agent::listen::{self, ListenAddr};
use shoji_agent::runtime::{ContainerRuntime, LinuxRuntime};
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
    /// How long to wait for a hot-plugged device, in seconds; as PID 1 the default comes from
    /// `shoji.hotplug_timeout=SECS` on the kernel command line, else 3 s.
    #[arg(long, value_name = "SECS", value_parser = init::parse_hotplug_timeout)]
    hotplug_timeout: Option<Duration>,
}

/// The container runtime: real containers (namespaces, cgroups, pivot_root, seccomp).
fn default_runtime(state_dir: &Path) -> anyhow::Result<Arc<dyn ContainerRuntime>> {
    let rt = LinuxRuntime::new(state_dir.to_owned())
        .map_err(|e| anyhow::anyhow!("container runtime in {}: {e}", state_dir.display()))?;
    Ok(Arc::new(rt))
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
    let mut early_info = Vec::new();
    if pid1 {
        early.extend(init::init_pid1(Path::new("/")).into_iter().map(|e| e.to_string()));
    }

    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if pid1 {
        let kernel_words = without_kernel_words(&mut argv);
        if !kernel_words.is_empty() {
            early_info.push(format!("init: kernel parameters passed to init, not ours: {}", kernel_words.join(" ")));
        }
    }
    let args = match Args::try_parse_from(&argv) {
        Ok(a) => a,
        // Other words we cannot parse (the kernel's, after ours): PID 1 carries on with defaults.
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
    for m in early_info {
        tracing::info!("{m}");
    }
    if let (Some(port), Some(e)) = (args.log_vsock, vsock_err) {
        tracing::warn!("log to vsock port {port}: {e}");
    }
    if !pid1 {
        if let Err(e) = init::become_subreaper() {
            tracing::warn!("cannot become a child subreaper: {e}");
        }
    }

    let hotplug_timeout = hotplug_timeout(&args, pid1);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(args, hotplug_timeout)));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
        eprintln!("shoji-agent: {e:#}");
    }
    result
}

/// The kernel hands init the command-line words it does not know first (`noxsave` on PVM hosts:
/// the FPU code reads it from the raw command line), then the arguments after `--`. We take no
/// positional arguments, so the leading words without a dash are the kernel's: removed from
/// `argv` (after argv\[0\]) and returned.
fn without_kernel_words(argv: &mut Vec<std::ffi::OsString>) -> Vec<String> {
    let n = argv.iter().skip(1).take_while(|a| !a.to_string_lossy().starts_with('-')).count();
    argv.drain(1..1 + n).map(|a| a.to_string_lossy().into_owned()).collect()
}

/// The hot-plug timeout: `--hotplug-timeout`, else (as PID 1) the kernel command line's
/// `shoji.hotplug_timeout`, else the default. A bad kernel value is logged and the default kept.
fn hotplug_timeout(args: &Args, pid1: bool) -> Duration {
    let default = shoji_agent::device::DEFAULT_HOTPLUG_TIMEOUT;
    if let Some(t) = args.hotplug_timeout {
        return t;
    }
    if !pid1 {
        return default;
    }
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("reading /proc/cmdline: {e}; hot-plug timeout {default:?}");
            return default;
        }
    };
    match init::hotplug_timeout_from_cmdline(&cmdline) {
        Ok(Some(t)) => {
            tracing::info!("hot-plug timeout {t:?} (kernel command line)");
            t
        }
        Ok(None) => default,
        Err(e) => {
            tracing::warn!("{e}; hot-plug timeout {default:?}");
            default
        }
    }
}

/// Serves until SIGTERM or SIGINT, then stops serving, removes every container and syncs.
async fn run(args: Args, hotplug_timeout: Duration) -> anyhow::Result<()> {
    let addrs: Vec<ListenAddr> =
        args.listen.iter().map(|s| s.parse()).collect::<std::result::Result<_, _>>().context("--listen")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    let mut cfg = ServiceConfig::guest();
    cfg.storage.hotplug_timeout = hotplug_timeout;
    let agent = Arc::new(Agent::new(default_runtime(&args.state_dir)?, cfg));
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
        assert_eq!((a.log, a.log_vsock, a.hotplug_timeout), (None, None, None));
        let a = Args::try_parse_from(["shoji-agent", "--hotplug-timeout", "7.5"]).unwrap();
        assert_eq!(a.hotplug_timeout, Some(Duration::from_millis(7500)));
        assert!(Args::try_parse_from(["shoji-agent", "--hotplug-timeout", "0"]).is_err());
        let a =
            Args::try_parse_from(["shoji-agent", "--listen", "unix:/a", "--listen", "unix:/b", "--log-vsock"]).unwrap();
        assert_eq!(a.listen, ["unix:/a", "unix:/b"]);
        assert_eq!(a.log_vsock, Some(logging::LOG_VSOCK_PORT));
        let a = Args::try_parse_from(["shoji-agent", "--log-vsock", "2000", "--log", "debug"]).unwrap();
        assert_eq!((a.log_vsock, a.log.as_deref()), (Some(2000), Some("debug")));
        // What the kernel may hand PID 1 is not ours to parse.
        assert!(Args::try_parse_from(["shoji-agent", "quiet", "console=ttyS0"]).is_err());
        // As PID 1, the kernel's leading words go; what follows `--` on its command line stays.
        let mut argv: Vec<std::ffi::OsString> =
            ["/init", "noxsave", "nofsgsbase", "--log", "info", "--log-vsock"].map(Into::into).to_vec();
        assert_eq!(without_kernel_words(&mut argv), ["noxsave", "nofsgsbase"]);
        let a = Args::try_parse_from(&argv).unwrap();
        assert_eq!((a.log.as_deref(), a.log_vsock), (Some("info"), Some(logging::LOG_VSOCK_PORT)));
        let mut argv: Vec<std::ffi::OsString> = ["/init", "noxsave"].map(Into::into).to_vec();
        assert_eq!(without_kernel_words(&mut argv), ["noxsave"]);
        assert_eq!(argv, ["/init"]);
        let mut argv: Vec<std::ffi::OsString> = ["/init", "--log", "debug", "stray"].map(Into::into).to_vec();
        assert!(without_kernel_words(&mut argv).is_empty(), "only leading words");
        assert!(Args::try_parse_from(&argv).is_err());
    }
}
