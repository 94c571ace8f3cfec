//! `containerd-shim-shoji-v2`: containerd's shim v2 (task API v2) running each task in a Shoji
//! micro-VM. containerd starts it with `start` (we re-exec ourselves as the ttrpc server and print
//! its address), talks ttrpc to the server, and runs `delete` after the server is gone.
//! See docs/shim.md.
mod config;
mod devices;
mod events;
mod mount;
mod namespaces;
mod sizing;
mod stats;
mod stdio;
mod task;
mod volumes;

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, ExitSignal, Flags, Shim, StartOpts};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// containerd's name for us: `--runtime io.containerd.shoji.v2`.
const RUNTIME_ID: &str = "io.containerd.shoji.v2";
/// Sandbox directories (vsock socket, console log, shared dir), one per sandbox.
const STATE_ROOT: &str = "/run/shoji/s";
/// CRI's annotation naming the pod sandbox a container belongs to: one VM per pod.
const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

struct ShojiShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    debug: bool,
    exit: Arc<ExitSignal>,
}

/// The sandbox a container belongs to: its CRI pod, else itself.
fn grouping(bundle: &Path, id: &str) -> String {
    let spec: Option<serde_json::Value> =
        std::fs::read(bundle.join("config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    spec.as_ref()
        .and_then(|s| s.pointer("/annotations")?.get(CRI_SANDBOX_ID)?.as_str().map(String::from))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| id.to_string())
}

/// `/run/shoji/s/<16 hex>`: short enough for the vsock socket's sun_path, unique per
/// namespace and sandbox.
fn sandbox_dir(namespace: &str, group: &str) -> PathBuf {
    let h = sha2::Sha256::digest(format!("{namespace}/{group}").as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new(STATE_ROOT).join(hex)
}

/// Our tracing to containerd's log FIFO (`log` in the bundle), which containerd copies into its
/// own log; `log` records of the crates we use go the same way.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into());
    let fifo = std::fs::OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_target(false);
    let _ = match fifo {
        Ok(f) => builder.with_writer(Mutex::new(f)).try_init(),
        Err(_) => builder.with_writer(std::io::sink).try_init(),
    };
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!("panic{at}: {msg}");
    }));
}

impl Shim for ShojiShim {
    type T = task::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        ShojiShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            debug: args.debug,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Nothing but the address may reach stdout here (containerd reads it as the address).
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let group = grouping(&self.bundle, &opts.id);
        let (_, address) = containerd_shim::spawn(opts, &group, vec![])?;
        // Without it containerd cannot reconnect to us after it restarts.
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// After every exit of the server, and for a shim that died: idempotent, works without us.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let group = grouping(&self.bundle, &self.id);
        let dir = sandbox_dir(&self.namespace, &group);
        mount::remove_container(&dir, &self.id);
        if group == self.id {
            mount::remove_tree(&dir);
            // The server's socket (a killed server leaves it behind); `address` is ours, written
            // at start: "unix:///run/containerd/s/<hash>".
            if let Ok(a) = std::fs::read_to_string(self.bundle.join("address")) {
                if let Some(path) = a.trim().strip_prefix("unix://") {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        mount::unmount_all(&self.bundle.join("rootfs"));
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp::now(),
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let config = config::ShimConfig::load(None);
        let level = match (&config, self.debug) {
            (_, true) => "debug".to_string(),
            (Ok(c), false) => c.log_level.clone(),
            (Err(_), false) => "info".to_string(),
        };
        init_logging(&level);
        let config = config.unwrap_or_else(|e| {
            tracing::error!("{e}; using the defaults");
            config::ShimConfig::default()
        });
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let events = events::Events::start(publisher, ttrpc_address, self.namespace.clone());
        let dir = sandbox_dir(&self.namespace, &self.id);
        tracing::info!(
            "shim {} for {}/{} (sandbox dir {})",
            env!("CARGO_PKG_VERSION"),
            self.namespace,
            self.id,
            dir.display()
        );
        task::Service::new(config, dir, self.id.clone(), events, self.exit.clone())
    }
}

fn main() {
    // No reaper: the VM runs on our threads, we have no children to reap, and a reaper thread
    // would race std::process (the guest kernel build on first use runs scripts).
    let config = Config { no_setup_logger: true, no_reaper: true, ..Default::default() };
    containerd_shim::run::<ShojiShim>(RUNTIME_ID, Some(config));
}
