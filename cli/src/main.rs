//! `shoji`: the command-line front end: `run` (and the detached `run -d`, `ps`, `exec`, `kill`,
//! `wait`, `logs`, `rm`), `boot`, `setup`, `check` and `bench`. Sandboxes go through
//! shoji-sandbox; `boot` and the device benches drive the VMM library directly; the guest
//! kernel and initramfs are built only here (`artifacts`), by `shoji setup` or on first use.
mod artifacts;
mod bench;
mod check;
mod detached;
mod device_args;
mod run;
mod rundir;
mod setup;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use shoji_vmm::{cmdline, host, testkit, KernelImage, SerialOut, StopReason, VmConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "shoji", version, about = "Micro-VM sandboxes for containers")]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. "debug" or "shoji_vmm=trace".
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM with a kernel (default: the cached Shoji guest kernel and initramfs).
    Boot(BootArgs),
    /// Run a command in a new sandbox, as `docker run` does in a container.
    Run(run::RunArgs),
    /// Measure Shoji (and optionally a peer VMM) with the built-in test guests.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// What this host offers and lacks for Shoji (KVM and its kind, cached guest, tools), with fixes.
    Check,
    /// Build (or find) the cached guest kernel, initramfs and built-in run rootfs, with progress.
    Setup,
    /// VM templates: `build` saves the guest booted to its agent for a sandbox size (`shoji run`
    /// and the shim build one on first use anyway), `ls` lists them, `rm` removes them all.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Detached sandboxes (`shoji run -d`): ps, exec, kill, rm, logs, wait.
    #[command(flatten)]
    Detached(detached::Cmd),
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build the templates `shoji run` and `shoji run -d` restore from, for this size.
    Build {
        /// vCPUs of the sandbox.
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        /// Memory of the sandbox in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
    },
    /// List the templates and what each was built for.
    Ls,
    /// Remove every template (the next sandbox of each size builds its own again).
    Rm,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// virtio-blk: sequential read/write MB/s, 4 KiB random-read IOPS and host CPU per request,
    /// from the probe guest's `blkbench` mode; prints a Markdown report (BENCHMARKS.md).
    Devices(BenchDevicesArgs),
    /// vsock: round-trip latency, MB/s both ways and host CPU per round trip and per MiB, from
    /// the probe guest's `vsockbench` mode, next to a host unix-socket baseline (BENCHMARKS.md).
    Vsock(BenchVsockArgs),
    /// Boot latency: spawn of `shoji boot` to the guest's exit, percentiles, optionally next to
    /// QEMU booting the same guest or Shoji unconfined (BENCHMARKS.md).
    Boot(BenchBootArgs),
    /// `shoji run -- true` end to end: spawn to exit, percentiles (no peer fits).
    Run(BenchRunArgs),
    /// A disk hot-plugged into a running sandbox to its bytes in a new container, next to a
    /// boot disk (`--disk`) and what one adds to the boot (BENCHMARKS.md).
    Hotplug(BenchHotplugArgs),
    /// A sandbox started from its VM template to its agent's first answer, optionally next to
    /// cold boots (BENCHMARKS.md).
    Template(BenchTemplateArgs),
}

#[derive(clap::Args)]
struct BenchTemplateArgs {
    /// Timed starts (each side), after one untimed warm-up that builds the template if missing.
    #[arg(short = 'n', long = "runs", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// Also cold boot the same sandbox each run, interleaved.
    #[arg(long = "peer-cold")]
    cold: bool,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchHotplugArgs {
    /// Timed hot and cold rounds each (interleaved), after one untimed round each.
    #[arg(short = 'n', long = "runs", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// Timed boots with and without a disk each (0: none).
    #[arg(long, default_value_t = 3)]
    boots: u32,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchBootArgs {
    /// Timed runs per system (interleaved with the peer's), after one untimed warm-up.
    #[arg(short = 'n', long = "runs", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// null: the test kit's null guest (no Linux); linux: Shoji's kernel and initramfs to /init.
    #[arg(long, value_enum, default_value = "null")]
    guest: bench::boot::Guest,
    /// Also boot the same guest with this peer, run by run, and report ratios: QEMU, or
    /// Shoji unconfined (`SHOJI_SECCOMP=off`: what the VMM's confinement costs).
    #[arg(long, value_enum)]
    peer: Option<bench::Peer>,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
    /// Draw the latency distributions per system into this PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Boot the null guest with `--irqchip split` (no in-kernel PIC, IOAPIC or PIT).
    #[arg(long)]
    split_irqchip: bool,
}

#[derive(clap::Args)]
struct BenchRunArgs {
    /// Timed runs, after one untimed warm-up.
    #[arg(short = 'n', long = "runs", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// The guest (only linux runs containers).
    #[arg(long, value_enum, default_value = "linux")]
    guest: bench::boot::Guest,
    /// Also run each sample cold booting (`SHOJI_TEMPLATES=off`), interleaved, and report the
    /// template/cold ratios.
    #[arg(long = "peer-cold")]
    peer: bool,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
    /// Draw the latency distribution into this PNG.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

impl BenchBootArgs {
    fn opts(self, bench: bench::boot::Bench) -> bench::boot::BootOpts {
        let (n, guest, peer, json, plot, split_irqchip) =
            (self.n, self.guest, self.peer, self.json, self.plot, self.split_irqchip);
        bench::boot::BootOpts { bench, n, guest, peer, json, plot, split_irqchip }
    }
}

impl BenchRunArgs {
    /// No other VMM runs containers the way `shoji run` does: the only peer is Shoji cold booting.
    fn opts(self, bench: bench::boot::Bench) -> bench::boot::BootOpts {
        let peer = self.peer.then_some(bench::Peer::Cold);
        bench::boot::BootOpts {
            bench,
            n: self.n,
            guest: self.guest,
            peer,
            json: self.json,
            plot: self.plot,
            split_irqchip: false,
        }
    }
}

#[derive(clap::Args)]
struct BenchVsockArgs {
    /// Echo phase: this many timed round trips.
    #[arg(long, default_value_t = 2000)]
    rounds: u32,
    /// Untimed round trips before them.
    #[arg(long, default_value_t = 50)]
    warmup: u32,
    /// Echo message size in bytes (1..=65536).
    #[arg(long, default_value_t = 64)]
    msg: u32,
    /// Stream phases: this many MiB each way.
    #[arg(long, default_value_t = 64)]
    mib: u32,
    /// Whenever it waits, the guest first checks this many times for a received packet before
    /// it halts (0: it halts at once and waits for the interrupt).
    #[arg(long, default_value_t = 0)]
    poll: u32,
    /// Runs of Shoji and of the baseline (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchDevicesArgs {
    /// Sequential phases: 64 KiB requests over this many MiB (also the disk image's size).
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Random-read phase: this many 4 KiB reads anywhere on the disk.
    #[arg(long, default_value_t = 20000)]
    ios: u64,
    /// Requests the guest keeps in flight (1..=16).
    #[arg(long, default_value_t = 8)]
    qd: u32,
    /// Runs per VMM (interleaved with the peer's).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Also run the same guest with this peer, run by run, and report ratios: QEMU, or Shoji
    /// unconfined (no seccomp, Landlock or capability drops: what the confinement costs).
    #[arg(long, value_enum)]
    peer: Option<bench::Peer>,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BootArgs {
    /// Kernel: an ELF vmlinux (PVH entry preferred) or a bzImage.
    #[arg(long, conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// A built-in test guest instead of a kernel: null, probe, probe-bzimage.
    #[arg(long)]
    guest: Option<String>,
    /// Initramfs (default: the cached Shoji initramfs when booting the default kernel).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: Shoji's; PVM hosts get their extra parameters in front).
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Serial console: "stdout" or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// A virtio-blk disk: raw image or block device, "PATH[,ro]". Repeatable; PCI slots 01, 02, ...
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// Share a host directory through virtio-fs: "DIR[,tag=T][,ro]" (tag defaults to share0,
    /// share1, ...). Repeatable; PCI slots after the disks.
    #[arg(long = "share", value_name = "DIR[,tag=T][,ro]")]
    shares: Vec<String>,
    /// virtio-vsock (guest CID 3) with its host side on this unix socket: connect and send
    /// "CONNECT <port>\n"; guest connections to the host's port P go to SOCKET_P.
    #[arg(long, value_name = "SOCKET")]
    vsock: Option<PathBuf>,
    /// Stop the VM after this many seconds and exit with status 124.
    #[arg(long)]
    timeout: Option<f64>,
    /// Interrupt controllers: in-kernel (LAPIC, IOAPIC, PIC and PIT; what Linux needs) or split
    /// (LAPICs only, no PIT: for guests with MSI-X devices only, such as the test guests).
    #[arg(long, value_enum, default_value = "in-kernel")]
    irqchip: IrqChipArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum IrqChipArg {
    InKernel,
    Split,
}

fn boot(a: BootArgs) -> Result<ExitCode> {
    let disks = a.disks.iter().map(|d| device_args::parse_disk(d)).collect::<Result<Vec<_>>>()?;
    let shares =
        a.shares.iter().enumerate().map(|(i, s)| device_args::parse_share(s, i)).collect::<Result<Vec<_>>>()?;
    let pvm = host::is_pvm();
    let (kernel, initrd, cmdline) = if let Some(name) = &a.guest {
        let image = testkit::guest(name)
            .ok_or_else(|| anyhow!("guest: unknown test guest {name:?} (known: {})", testkit::NAMES.join(", ")))?;
        (image, a.initrd, a.cmdline.unwrap_or_default())
    } else {
        let default_kernel = a.kernel.is_none();
        let kernel = match a.kernel {
            Some(k) => k,
            None => artifacts::ensure_kernel()?,
        };
        let initrd = match (a.initrd, default_kernel) {
            (Some(i), _) => Some(i),
            (None, true) => Some(artifacts::ensure_rootfs()?),
            (None, false) => None,
        };
        (KernelImage::Path(kernel), initrd, cmdline::linux(a.cmdline.as_deref(), pvm))
    };
    let serial = match a.serial.as_str() {
        "stdout" | "-" => SerialOut::Stdout,
        p => SerialOut::File(PathBuf::from(p)),
    };
    let timeout = match a.timeout {
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => return Err(anyhow!("timeout: {t} is not a positive number of seconds")),
        None => None,
    };
    let linux = a.guest.is_none();
    let cfg = VmConfig {
        kernel,
        initrd,
        cmdline,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        serial,
        disks,
        shares,
        vsock: a.vsock,
        stop: Some(stop_on_signals()?),
        timeout,
        confine: shoji_vmm::confine::default_enabled(),
        irqchip: match a.irqchip {
            IrqChipArg::InKernel => shoji_vmm::IrqChip::InKernel,
            IrqChipArg::Split => shoji_vmm::IrqChip::Split,
        },
        restore: None,
    };
    shoji_vmm::vm::check(&cfg)?;
    if linux && pvm {
        eprintln!("shoji: /dev/kvm is PVM (kvm_pvm): adding the kernel parameters a stock guest kernel needs here");
    }
    let outcome = shoji_vmm::run(cfg)?;
    tracing::info!(?outcome, "VM stopped");
    Ok(match outcome.reason {
        StopReason::Reset | StopReason::PowerOff | StopReason::Halted | StopReason::Stopped => ExitCode::SUCCESS,
        StopReason::Timeout => {
            eprintln!("shoji: timeout: the VM ran past --timeout and was stopped");
            ExitCode::from(124)
        }
    })
}

/// The eventfd SIGTERM/SIGINT write to (async-signal-safe), so the VM stops cleanly and leaves
/// no socket behind.
static STOP_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 and the fd an eventfd
        // that lives for the whole process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// An eventfd that SIGTERM and SIGINT make readable.
fn stop_on_signals() -> Result<std::sync::Arc<vmm_sys_util::eventfd::EventFd>> {
    use std::os::fd::AsRawFd;
    let evt = std::sync::Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
    STOP_FD.store(evt.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| anyhow!("cannot handle signal {sig}: {e}"))?;
    }
    Ok(evt)
}

/// Whether the command line is `shoji [--log L] run ...` (its errors are `shoji run`'s).
fn is_run(args: &[String]) -> bool {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--log" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            a => return a == "run",
        }
    }
    false
}

/// The words naming the subcommand in `args` ("bench boot"), for messages.
fn subcommand(args: &[String]) -> String {
    let mut words = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--log" => {
                it.next();
            }
            "--" => break,
            a if a.starts_with('-') => {}
            a if words.is_empty() || words == ["bench"] => words.push(a.to_string()),
            _ => break,
        }
    }
    words.join(" ")
}

/// One line for a command-line error (clap's own message is several, with the usage):
/// "FIELD: what is wrong". `shoji run`'s are its own.
fn usage_error_line(e: &clap::Error, args: &[String]) -> String {
    use clap::error::{ContextKind, ErrorKind};
    if is_run(args) {
        return run::clap_error_line(e);
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").trim();
    let sub = subcommand(args);
    let help = if sub.is_empty() { "`shoji --help`".to_string() } else { format!("`shoji {sub} --help`") };
    // "--vcpus <VCPUS>" -> "--vcpus"
    let field = e
        .get(ContextKind::InvalidArg)
        .map(|a| a.to_string())
        .map(|a| a.split([' ', '=']).next().unwrap_or(&a).to_string());
    match (e.kind(), field) {
        // The unknown word was taken for the subcommand: help is its parent's.
        (ErrorKind::InvalidSubcommand, _) => {
            let parent = sub.rsplit_once(' ').map(|(p, _)| format!("`shoji {p} --help`"));
            format!("command: {first} (see {})", parent.unwrap_or_else(|| "`shoji --help`".into()))
        }
        (ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand, _) => {
            format!("command: missing (see {help})")
        }
        (ErrorKind::UnknownArgument, Some(f)) => format!("{f}: unknown option (see {help})"),
        (_, Some(f)) => format!("{f}: {first}"),
        (_, None) if sub.is_empty() => first.to_string(),
        (_, None) => format!("{sub}: {first}"),
    }
}

/// Docker's exit status for errors of Shoji itself (bad flags, missing files, KVM failures, a
/// guest crash), so they are told apart from a guest's or a command's own status.
const EXIT_SHOJI_ERROR: u8 = run::EXIT_SHOJI_ERROR;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // The detached commands name their own fields.
        Err(e) if detached::owns(&args) && e.use_stderr() => return detached::clap_error(&e, &args),
        // Usage errors, like docker's: one line and status 125 (help and version still print).
        Err(e) if e.use_stderr() => {
            eprintln!("shoji: error: {}", usage_error_line(&e, &args));
            return ExitCode::from(EXIT_SHOJI_ERROR);
        }
        Err(e) => e.exit(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // First-use builds of the guest kernel and initramfs show their progress, in every command.
    setup::install_progress();
    // A `shoji run` killed before it could clean up left its session dir behind: removed here.
    rundir::sweep();
    let result = match cli.cmd {
        Cmd::Run(a) if a.detach => return detached::run(a),
        Cmd::Run(a) => return run::main(a),
        Cmd::Check => return check::main(),
        Cmd::Setup => setup::main().map(|()| ExitCode::SUCCESS).context("setup"),
        Cmd::Detached(c) => return detached::main(c),
        Cmd::Boot(a) => boot(a).context("boot"),
        Cmd::Bench(BenchCmd::Devices(a)) => bench::devices(bench::DevicesOpts {
            mib: a.mib,
            ios: a.ios,
            qd: a.qd,
            runs: a.runs,
            peer: a.peer,
            json: a.json,
        })
        .map(|()| ExitCode::SUCCESS)
        .context("bench devices"),
        Cmd::Bench(BenchCmd::Vsock(a)) => bench::vsock::vsock(bench::vsock::VsockOpts {
            rounds: a.rounds,
            warmup: a.warmup,
            msg: a.msg,
            mib: a.mib,
            poll: a.poll,
            runs: a.runs,
            json: a.json,
        })
        .map(|()| ExitCode::SUCCESS)
        .context("bench vsock"),
        Cmd::Bench(BenchCmd::Boot(a)) => {
            bench::boot::main(a.opts(bench::boot::Bench::Boot)).map(|()| ExitCode::SUCCESS).context("bench boot")
        }
        Cmd::Template(t) => template_cmd(t).map(|()| ExitCode::SUCCESS).context("template"),
        Cmd::Bench(BenchCmd::Template(a)) => {
            bench::template::main(a.n, a.cold, a.json).map(|()| ExitCode::SUCCESS).context("bench template")
        }
        Cmd::Bench(BenchCmd::Hotplug(a)) => {
            bench::hotplug::main(bench::hotplug::HotplugOpts { runs: a.n, boots: a.boots, json: a.json })
                .map(|()| ExitCode::SUCCESS)
                .context("bench hotplug")
        }
        Cmd::Bench(BenchCmd::Run(a)) => {
            bench::boot::main(a.opts(bench::boot::Bench::Run)).map(|()| ExitCode::SUCCESS).context("bench run")
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: under the command's context, our errors' messages already include
            // their causes (and name the field or stage), so print that one message.
            let msg = e.chain().nth(1).map(|c| c.to_string()).unwrap_or_else(|| e.to_string());
            eprintln!("shoji: error: {}", msg.replace('\n', " "));
            ExitCode::from(EXIT_SHOJI_ERROR)
        }
    }
}

/// `shoji template build|ls|rm`.
fn template_cmd(t: TemplateCmd) -> Result<()> {
    use shoji_sandbox::template;
    match t {
        TemplateCmd::Build { cpus, memory } => {
            let (kernel, initrd) = artifacts::ensure()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            let scratch = tempfile::tempdir().context("scratch directory")?;
            // `shoji run`'s sandbox, then `run -d`'s (its agent logs at info on the console).
            for extra in [None, Some(detached::sandbox_cmdline())] {
                let mut cfg = shoji_sandbox::SandboxConfig::new(scratch.path().to_path_buf());
                (cfg.vcpus, cfg.memory_mib, cfg.extra_cmdline) = (cpus, memory, extra);
                (cfg.kernel, cfg.initrd) = (Some(kernel.clone()), Some(initrd.clone()));
                let dir = rt.block_on(template::build_for(&cfg)).map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("{}", dir.display());
            }
        }
        TemplateCmd::Ls => {
            for (dir, what) in template::list() {
                println!("{}\t{what}", dir.display());
            }
        }
        TemplateCmd::Rm => {
            for (dir, _) in template::list() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
                println!("{}", dir.display());
            }
        }
    }
    Ok(())
}
