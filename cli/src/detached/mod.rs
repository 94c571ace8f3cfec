//! Detached sandboxes: `shoji run -d`, `ps`, `exec`, `kill`, `rm`, `logs`, `wait`.
//!
//! No daemon: `shoji run -d` checks its flags, claims the name (creates its state directory),
//! saves the checked plan in its `state.json` and re-executes itself as `shoji __sandbox NAME`
//! in a new session. That process boots the VM from the saved plan (no argv parsed again)
//! through the same Sandbox API and agent calls as `shoji run`, reports "started" (or the
//! error) on a pipe the CLI reads, then writes the command's output to the log in the state
//! directory until the command exits. Then it destroys the sandbox, stops the VM and records
//! the exit status: like Docker, an exited sandbox stays listed until `shoji rm`. The other
//! commands talk to the agent directly over the sandbox's vsock socket.
pub(crate) mod state;

use crate::run::saved::SavedPlan;
use crate::run::{self, Failure, Io, Plan, RunArgs, CONTAINER_ID, EXIT_SHOJI_ERROR};
use anyhow::{anyhow, Context};
use shoji_sandbox::{console_tail, Process, Sandbox, SandboxConfig, Session, Stream};
use shoji_vmm::logfile::{self, CappedLog, OUTPUT_LOG_MAX};
use shoji_vmm::ShareConfig;
use state::{Shown, State, StateError, Status};
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// How long `exec`, `kill` wait for the agent of a running sandbox to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `rm -f`: how long the sandbox process has to tear down after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(60);

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// List detached sandboxes (running ones; -a: all).
    Ps(PsArgs),
    /// Run a command in a detached sandbox's container.
    Exec(ExecArgs),
    /// Send a signal to a detached sandbox's command.
    Kill(KillArgs),
    /// Remove detached sandboxes (-f: running ones too, which are stopped).
    Rm(RmArgs),
    /// Print a detached sandbox's command output (--console: the guest console and agent log).
    Logs(LogsArgs),
    /// Wait until a detached sandbox's command has exited and print its exit status.
    Wait(NameArg),
    /// The process that holds a detached sandbox's VM (started by `shoji run -d`).
    #[command(name = "__sandbox", hide = true)]
    Sandbox(NameArg),
}

#[derive(clap::Args)]
pub struct PsArgs {
    /// Also list exited and dead sandboxes.
    #[arg(short = 'a', long)]
    all: bool,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the command a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (K alone: take its value from here, if set). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The command's working directory in the container (default: the container's).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    name: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct KillArgs {
    /// Signal name (KILL, SIGTERM, ...) or number.
    #[arg(short = 's', long, default_value = "KILL")]
    signal: String,
    name: String,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Stop running sandboxes first.
    #[arg(short = 'f', long)]
    force: bool,
    #[arg(required = true)]
    names: Vec<String>,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Print the guest console (kernel and agent log) instead of the command's output.
    #[arg(long)]
    console: bool,
    name: String,
}

#[derive(clap::Args)]
pub struct NameArg {
    name: String,
}

/// A command's failure: the one-line message, lines printed after it, the exit status.
struct Fail {
    msg: String,
    detail: String,
    code: u8,
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail { msg: msg.into(), detail: String::new(), code: EXIT_SHOJI_ERROR }
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Fail {
        fail(run::one_line(&e))
    }
}

impl From<StateError> for Fail {
    fn from(e: StateError) -> Fail {
        fail(e.to_string())
    }
}

fn exit(r: Result<u8, Fail>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("shoji: error: {}", f.msg);
            if !f.detail.is_empty() {
                eprintln!("{}", f.detail);
            }
            ExitCode::from(f.code)
        }
    }
}

pub fn main(cmd: Cmd) -> ExitCode {
    exit(match cmd {
        Cmd::Ps(a) => ps(a),
        Cmd::Exec(a) => exec(a),
        Cmd::Kill(a) => kill(a),
        Cmd::Rm(a) => rm(a),
        Cmd::Logs(a) => logs(a),
        Cmd::Wait(a) => wait(a),
        Cmd::Sandbox(a) => return sandbox_process(&a.name),
    })
}

/// The subcommand of a command line (`shoji [--log L] SUB ...`) and its index.
fn subcommand_at(args: &[String]) -> Option<(usize, &str)> {
    let mut it = args.iter().enumerate().skip(1);
    while let Some((i, a)) = it.next() {
        match a.as_str() {
            "--log" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            a => return Some((i, a)),
        }
    }
    None
}

fn subcommand(args: &[String]) -> Option<&str> {
    subcommand_at(args).map(|(_, s)| s)
}

/// Whether a command-line error is one of these commands' (one line and 125, as Docker's).
pub fn owns(args: &[String]) -> bool {
    matches!(subcommand(args), Some("ps" | "exec" | "kill" | "rm" | "logs" | "wait" | "__sandbox"))
}

/// Prints a command-line error of these commands as one line naming the field; 125.
pub fn clap_error(e: &clap::Error, args: &[String]) -> ExitCode {
    use clap::error::{ContextKind, ErrorKind};
    let sub = subcommand(args).unwrap_or("shoji");
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").trim();
    let arg = e.get(ContextKind::InvalidArg).map(|a| a.to_string());
    // "--signal <SIGNAL>" -> "--signal"; "<NAME>" -> "name"; "[CMD]..." -> "command"
    let field = arg.as_deref().map(|a| {
        let f = a.split([' ', '=', ',']).next().unwrap_or(a);
        let f = f.trim_matches(|c| "<>[].".contains(c)).to_lowercase();
        if f == "cmd" {
            "command".to_string()
        } else {
            f
        }
    });
    let line = match (e.kind(), field) {
        (ErrorKind::MissingRequiredArgument, Some(f)) => format!("{f}: missing (see `shoji {sub} --help`)"),
        (ErrorKind::UnknownArgument, Some(f)) if f.starts_with('-') => {
            format!("{f}: unknown option (see `shoji {sub} --help`)")
        }
        (ErrorKind::UnknownArgument, Some(f)) => format!("command: {f:?} must come after `--`"),
        (_, Some(f)) => format!("{f}: {first}"),
        (_, None) => format!("{sub}: {first}"),
    };
    eprintln!("shoji: error: {line}");
    ExitCode::from(EXIT_SHOJI_ERROR)
}

// ---- shoji run -d -------------------------------------------------------------------------

/// `shoji run -d`: prints the name once the command runs (0), or the error (125, or 126/127
/// when the command cannot be executed, as `shoji run`), leaving nothing behind.
pub fn run(a: RunArgs) -> ExitCode {
    match start(a) {
        Ok(name) => {
            println!("{name}");
            ExitCode::SUCCESS
        }
        Err(f) => exit(Err(f)),
    }
}

fn start(a: RunArgs) -> Result<String, Fail> {
    if a.interactive {
        return Err(fail("interactive: -i needs a terminal to attach to; a detached sandbox has none (drop -i)"));
    }
    let name = a.name.clone();
    // Every flag checked before the name is claimed: a bad one leaves nothing.
    let plan = run::plan(a)?;
    let (name, dir) = match name {
        Some(n) => {
            let dir = state::claim(&n)?;
            (n, dir)
        }
        None => state::claim_generated()?,
    };
    let st = State {
        name: name.clone(),
        pid: 0,
        created: state::now_secs(),
        command: plan.command.clone(),
        status: Status::Created,
        exit_code: None,
        error: None,
        plan: Some(SavedPlan::from(&plan)),
    };
    let r = state::save(&dir, &st).map_err(Fail::from).and_then(|()| spawn_sandbox(&name, &dir));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Only now: an image that came as a tar is unpacked in a temp dir of the plan's, which the
    // sandbox process unpacks its rootfs from (when not cached) before it reports.
    drop(plan);
    r.map(|()| name)
}

/// Starts `shoji __sandbox NAME` in its own session and waits for its report.
fn spawn_sandbox(name: &str, dir: &Path) -> Result<(), Fail> {
    use std::os::unix::process::CommandExt;
    let log_path = dir.join(state::SANDBOX_LOG);
    let log = std::fs::File::create(&log_path).with_context(|| format!("state: {}", log_path.display()))?;
    let exe = std::env::current_exe().context("sandbox: finding the shoji binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--log", "info", state::SANDBOX_CMD, name])
        // Its log is a file: no terminal colours (tracing-subscriber honours NO_COLOR).
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory; the sandbox outlives this
    // terminal session (no SIGHUP when it closes).
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().context("sandbox: starting its process")?;
    let mut report = std::io::BufReader::new(child.stdout.take().ok_or_else(|| fail("sandbox: no report pipe"))?);
    let mut first = String::new();
    report.read_line(&mut first).context("sandbox: reading its report")?;
    if first == "started\n" {
        return Ok(());
    }
    let mut rest = String::new();
    let _ = report.read_to_string(&mut rest);
    let status = child.wait().context("sandbox: waiting for its process")?;
    if let Some(code) = first.strip_prefix("error ").and_then(|c| c.trim().parse::<u8>().ok()) {
        let (msg, detail) = rest.split_once('\n').unwrap_or((rest.as_str(), ""));
        return Err(Fail { msg: msg.to_string(), detail: detail.trim_end().to_string(), code });
    }
    Err(Fail {
        msg: format!("sandbox: its process ended ({status}) before the command started"),
        detail: console_tail(&log_path, 20),
        code: EXIT_SHOJI_ERROR,
    })
}

/// `shoji __sandbox NAME`: holds the VM of a detached sandbox until its command exits.
fn sandbox_process(name: &str) -> ExitCode {
    let mut report = take_report_pipe();
    let dir = state::dir_of(name);
    let mut st = match state::load(name) {
        Ok(st) => st,
        Err(e) => return exit(Err(e.into())),
    };
    st.pid = std::process::id() as i32;
    st.status = Status::Starting;
    if let Err(e) = state::save(&dir, &st) {
        return exit(Err(e.into()));
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report_failure(&mut report, fail(format!("tokio runtime: {e}"))),
    };
    let started = boot_and_start(&st, &dir, &rt);
    let (vm, (session, (process, _user_net)), mut signals, until, tty) = match started {
        Ok(s) => s,
        Err(f) => {
            drop(rt);
            return report_failure(&mut report, f);
        }
    };
    st.status = Status::Running;
    if let Err(e) = state::save(&dir, &st) {
        tracing::warn!("{e}");
    }
    report_started(report);
    let result = rt.block_on(async {
        let r = supervise(&process, &vm, &mut signals, until, tty, &dir).await;
        run::destroy(&session, &vm).await;
        r
    });
    drop(rt);
    let stopped = vm.stop();
    match result {
        Ok(code) => {
            st.status = Status::Exited;
            st.exit_code = Some(code);
        }
        Err(why) => {
            st.status = Status::Dead;
            st.error = Some(match stopped {
                Err(e) => format!("{why} (VM: {e})"),
                Ok(()) => why,
            });
        }
    }
    tracing::info!(status = ?st.status, code = ?st.exit_code, error = ?st.error, "sandbox ended");
    match state::save(&dir, &st) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit(Err(e.into())),
    }
}

/// The sandbox, the session, the command and the user-mode network's passt (kept while it runs).
type Started =
    (Sandbox, (Session, (Process, Option<run::net::UserNet>)), run::Signals, Option<tokio::time::Instant>, bool);

/// Boots from the plan `shoji run -d` checked and saved, starts the command.
fn boot_and_start(st: &State, dir: &Path, rt: &tokio::runtime::Runtime) -> Result<Started, Fail> {
    let state_file = dir.join(state::STATE_FILE);
    let saved = st
        .plan
        .clone()
        .ok_or_else(|| fail(format!("state: {}: no saved plan (written by an older shoji?)", state_file.display())))?;
    let p =
        Plan::try_from(saved).map_err(|e| fail(format!("state: {}: {}", state_file.display(), run::one_line(&e))))?;
    let until = p.timeout.map(|t| tokio::time::Instant::now() + t);
    let (root_dir, builtin) = run::root_dir(&p)?;
    let mut cfg = SandboxConfig::new(dir.to_path_buf());
    // The agent logs at info on the console: `shoji logs --console` is the sandbox's record
    // (the kernel stays quiet; each console byte is a VM exit).
    cfg.extra_cmdline = Some(sandbox_cmdline());
    cfg.vcpus = p.cpus;
    cfg.memory_mib = p.memory_mib;
    cfg.disks = p.disks.clone();
    cfg.shares = vec![ShareConfig { dir: root_dir, tag: "rootfs".into(), read_only: builtin }];
    cfg.shares.extend(p.shares.iter().map(|(s, _)| s.clone()));
    let (kernel, initrd) = crate::artifacts::ensure()?;
    (cfg.kernel, cfg.initrd) = (Some(kernel), Some(initrd));
    cfg.vm_config().map_err(|e| Fail::from(run::sandbox_error(e)))?;

    let mut signals = rt.block_on(async { run::Signals::new() })?;
    // From the VM template when there is one (built on first use).
    let vm = rt.block_on(Sandbox::launch(&cfg)).map_err(|e| fail(e.to_string()))?;
    let req = match run::create_request(&p, builtin, None, vm.placement()) {
        Ok(r) => r,
        Err(e) => {
            let _ = vm.stop();
            return Err(e.into());
        }
    };
    // `shoji exec` starts from the container's process (user, capabilities, env, cwd).
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(&req.spec_json).context("spec")?;
    let process = serde_json::to_vec_pretty(&spec.process()).context("spec")?;
    let path = dir.join(state::PROCESS_FILE);
    std::fs::write(&path, process).with_context(|| format!("state: {}", path.display()))?;
    let started = rt.block_on(async {
        tokio::select! {
            r = run::start_command(&vm, req, format!("shoji-{}", st.name), &p.devices, p.net) => r,
            s = signals.stop.stop() => Err(Failure::Signal(s)),
            why = vm.stopped() => Err(Failure::Sandbox(anyhow!("sandbox: {why} before the command started"))),
            _ = run::deadline(until) => Err(Failure::Timeout),
        }
    });
    match started {
        Ok(started) => Ok((vm, started, signals, until, p.tty)),
        Err(f) => {
            let stopped = vm.stop();
            Err(match f {
                Failure::Timeout => Fail {
                    msg: "timeout: the sandbox ran past --timeout and was stopped".into(),
                    detail: String::new(),
                    code: 124,
                },
                Failure::Signal(s) => fail(format!("sandbox: stopped by signal {s} before the command started")),
                Failure::Command(e, code) => Fail { msg: run::one_line(&e), detail: String::new(), code },
                Failure::Error(e) => fail(run::one_line(&e)),
                Failure::Sandbox(e) => {
                    let mut msg = run::one_line(&e);
                    if let Err(why) = stopped {
                        msg.push_str(&format!(" (VM: {why})"));
                    }
                    let tail = console_tail(&dir.join(shoji_sandbox::CONSOLE_LOG), 20);
                    let detail =
                        if tail.is_empty() { tail } else { format!("shoji: the guest console's last lines:\n{tail}") };
                    Fail { msg, detail, code: EXIT_SHOJI_ERROR }
                }
            })
        }
    }
}

/// Our stdout is the pipe `shoji run -d` reads our report from: moved to a descriptor of its
/// own (close-on-exec), with /dev/null on stdout, so nothing else we run (an artifact build)
/// can write into it, and it ends when the report is written.
fn take_report_pipe() -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor of fd 1, which is open.
    let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        tracing::warn!("report pipe: {}", std::io::Error::last_os_error());
        return None;
    }
    match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1; both descriptors are open and ours.
        Ok(null) => unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        },
        Err(e) => tracing::warn!("/dev/null: {e}"),
    }
    // SAFETY: `fd` is the new descriptor from fcntl, owned by nothing else.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Tells `shoji run -d` that the command runs; dropping the pipe ends its read.
fn report_started(report: Option<std::fs::File>) {
    if let Some(mut out) = report {
        if let Err(e) = out.write_all(b"started\n") {
            tracing::warn!("report: {e}");
        }
    }
}

/// Tells `shoji run -d` why the command did not start; it removes the state directory.
fn report_failure(report: &mut Option<std::fs::File>, f: Fail) -> ExitCode {
    tracing::error!("{}", f.msg);
    if let Some(out) = report {
        let _ = write!(out, "error {}\n{}\n{}", f.code, f.msg, f.detail);
    }
    ExitCode::from(f.code)
}

/// Copies the command's output to the log until it has exited: its status, or why the sandbox
/// failed. A stop signal (`rm -f`) ends it as killed (137): DestroySandbox kills the command.
async fn supervise(
    process: &Process,
    vm: &Sandbox,
    sig: &mut run::Signals,
    until: Option<tokio::time::Instant>,
    tty: bool,
    dir: &Path,
) -> Result<i32, String> {
    let path = dir.join(state::OUTPUT_LOG);
    // Capped (a ring past OUTPUT_LOG_MAX): the command decides how much it prints.
    let log = CappedLog::create(&path, OUTPUT_LOG_MAX).map_err(|e| format!("state: {}: {e}", path.display()))?.shared();
    let (o, e, log2) = (process.clone(), process.clone(), log.clone());
    let out = tokio::spawn(async move { o.copy_output(Stream::Stdout, log2).await });
    let err = tokio::spawn(async move { e.copy_output(Stream::Stderr, log).await });
    if !tty {
        if let Err(e) = process.close_stdin().await {
            tracing::debug!("{e}");
        }
    }
    let status = tokio::select! {
        r = process.wait() => r.map_err(|e| format!("container: waiting: {e}"))?.status,
        s = sig.stop.stop() => {
            tracing::info!("signal {s}: destroying the sandbox");
            return Ok(128 + libc::SIGKILL);
        }
        why = vm.stopped() => return Err(format!("sandbox: {why} while the command ran")),
        _ = run::deadline(until) => {
            tracing::info!("--timeout: destroying the sandbox");
            return Ok(124);
        }
    };
    let drained = async {
        for (name, task) in [("stdout", out), ("stderr", err)] {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("{name}: {e}"),
                Err(e) => tracing::warn!("{name}: {e}"),
            }
        }
    };
    tokio::select! {
        () = drained => {}
        why = vm.stopped() => return Err(format!("sandbox: {why} while the output was read")),
        _ = run::deadline(until) => return Ok(124),
    }
    Ok(status)
}

// ---- ps, logs, wait -----------------------------------------------------------------------

fn ps(a: PsArgs) -> Result<u8, Fail> {
    let now = state::now_secs();
    let rows: Vec<[String; 4]> = state::list()
        .into_iter()
        .map(|st| (st.shown(), st))
        .filter(|(shown, _)| a.all || matches!(shown, Shown::Running | Shown::Starting))
        .map(|(shown, st)| {
            [st.name, shown.to_string(), ago(now.saturating_sub(st.created)), command_column(&st.command)]
        })
        .collect();
    print!("{}", table(["NAME", "STATUS", "CREATED", "COMMAND"], &rows));
    Ok(0)
}

fn table(head: [&str; 4], rows: &[[String; 4]]) -> String {
    let mut width = head.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 3 {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}   ", w = width[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(head);
    for r in rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3]]));
    }
    out
}

fn ago(secs: u64) -> String {
    let (n, unit) = match secs {
        0..=59 => (secs, "second"),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn command_column(command: &[String]) -> String {
    let joined = command.join(" ").replace(['\n', '\t'], " ");
    if joined.chars().count() > 40 {
        format!("{}...", joined.chars().take(37).collect::<String>())
    } else {
        joined
    }
}

fn logs(a: LogsArgs) -> Result<u8, Fail> {
    state::load(&a.name)?;
    let file = if a.console { shoji_sandbox::CONSOLE_LOG } else { state::OUTPUT_LOG };
    let path = state::dir_of(&a.name).join(file);
    // Both logs are capped rings (shoji_vmm::logfile): read back in order.
    match logfile::read(&path) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&text).and_then(|()| out.flush()).context("logs: stdout")?;
        }
        // Not started yet: no output.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("logs: {}: {e}", path.display()))),
    }
    Ok(0)
}

fn wait(a: NameArg) -> Result<u8, Fail> {
    let st = state::load(&a.name)?;
    if st.alive() {
        state::wait_exit(st.pid, None).context("wait: the sandbox process")?;
    }
    let st = state::load(&a.name)?;
    match st.shown() {
        Shown::Exited(code) => {
            println!("{code}");
            Ok(0)
        }
        _ => Err(fail(format!(
            "sandbox {}: is dead, with no exit status{}",
            a.name,
            st.error.map(|e| format!(" ({e})")).unwrap_or_default()
        ))),
    }
}

// ---- exec, kill ---------------------------------------------------------------------------

/// The sandbox's state, which must be running.
fn running_state(name: &str) -> Result<State, Fail> {
    let st = state::load(name)?;
    match st.shown() {
        Shown::Running => Ok(st),
        shown => Err(fail(format!("sandbox {name}: is not running ({shown})"))),
    }
}

async fn connect(name: &str) -> Result<Session, Fail> {
    let sock = state::dir_of(name).join(shoji_sandbox::VSOCK_SOCKET);
    Session::attach(&sock, CONNECT_TIMEOUT).await.map_err(|e| fail(format!("sandbox {name}: {e}")))
}

fn exec(a: ExecArgs) -> Result<u8, Fail> {
    match a.command.first() {
        Some(c) if !c.is_empty() && !c.contains('\0') => {}
        c => return Err(fail(format!("command: {:?} is not a program name", c.map_or("", |c| c.as_str())))),
    }
    if let Some(arg) = a.command.iter().find(|c| c.contains('\0')) {
        return Err(fail(format!("command: argument {arg:?} contains a NUL byte")));
    }
    let env: Vec<String> =
        a.env.iter().map(|e| run::parse_env(e)).collect::<anyhow::Result<Vec<_>>>()?.into_iter().flatten().collect();
    if let Some(w) = &a.workdir {
        if !w.starts_with('/') || w.contains('\0') {
            return Err(fail(format!("workdir: {w:?} is not an absolute path")));
        }
    }
    let stdin_fd = std::io::stdin().as_raw_fd();
    if a.tty && a.interactive && !run::tty::is_tty(stdin_fd) {
        return Err(fail("tty: -i -t needs a terminal on stdin (drop -t to pipe input)"));
    }
    running_state(&a.name)?;
    let path = state::dir_of(&a.name).join(state::PROCESS_FILE);
    let base = std::fs::read(&path).with_context(|| format!("state: {}", path.display()))?;
    let mut process: oci_spec::runtime::Process =
        serde_json::from_slice(&base).with_context(|| format!("state: {}", path.display()))?;
    let mut full_env = process.env().clone().unwrap_or_default();
    if a.tty && !full_env.iter().any(|e| e.starts_with("TERM=")) {
        full_env.push("TERM=xterm".into());
    }
    for e in env {
        let name = e.split_once('=').map_or(e.as_str(), |(n, _)| n).to_string();
        full_env.retain(|x| x.split_once('=').map_or(x.as_str(), |(n, _)| n) != name);
        full_env.push(e);
    }
    let stdout_fd = std::io::stdout().as_raw_fd();
    let size_fd = if run::tty::is_tty(stdout_fd) { stdout_fd } else { stdin_fd };
    let size = if a.tty { run::tty::window_size(size_fd) } else { None };
    process.set_args(Some(a.command.clone())).set_env(Some(full_env)).set_terminal(Some(a.tty)).set_console_size(
        size.map(|(rows, cols)| {
            oci_spec::runtime::BoxBuilder::default().height(u64::from(rows)).width(u64::from(cols)).build()
        })
        .transpose()
        .context("tty")?,
    );
    if let Some(w) = a.workdir {
        process.set_cwd(w.into());
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let exec_id = format!("exec-{}-{nanos:x}", std::process::id());
    let process_json = serde_json::to_vec(&process).context("process")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let r = rt.block_on(async {
        let mut sig = run::Signals::new()?;
        let session = connect(&a.name).await?;
        let process =
            session.exec(CONTAINER_ID, &exec_id, process_json).await.map_err(|e| failure(run::command_failure(e)))?;
        let io = Io { interactive: a.interactive, tty: a.tty };
        run::running(&io, &process, None, &mut sig, None).await.map_err(failure)
    });
    // The stdin reader thread may still be blocked in read(2): do not wait for it.
    rt.shutdown_background();
    r
}

fn failure(f: Failure) -> Fail {
    match f {
        Failure::Command(e, code) => Fail { msg: run::one_line(&e), detail: String::new(), code },
        Failure::Signal(s) => {
            Fail { msg: format!("exec: interrupted by signal {s}"), detail: String::new(), code: 128 + s as u8 }
        }
        Failure::Timeout => fail("exec: timeout"),
        Failure::Sandbox(e) | Failure::Error(e) => fail(run::one_line(&e)),
    }
}

/// A signal by name (KILL, SIGKILL, kill) or number.
fn parse_signal(s: &str) -> Result<u32, Fail> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("ABRT", libc::SIGABRT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("PIPE", libc::SIGPIPE),
        ("ALRM", libc::SIGALRM),
        ("TERM", libc::SIGTERM),
        ("CHLD", libc::SIGCHLD),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
        ("TSTP", libc::SIGTSTP),
        ("WINCH", libc::SIGWINCH),
    ];
    if let Ok(n) = s.parse::<u32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, v)| *v as u32)
        .ok_or_else(|| fail(format!("signal: {s:?} is not a signal name or number (1-64)")))
}

fn kill(a: KillArgs) -> Result<u8, Fail> {
    let signal = parse_signal(&a.signal)?;
    running_state(&a.name)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async {
        let session = connect(&a.name).await?;
        session
            .process(CONTAINER_ID, "")
            .signal(signal, false)
            .await
            .map_err(|e| fail(format!("sandbox {}: signal: {e}", a.name)))
    })?;
    Ok(0)
}

// ---- rm -------------------------------------------------------------------------------------

fn rm(a: RmArgs) -> Result<u8, Fail> {
    let mut failed = None;
    for name in &a.names {
        match remove(name, a.force) {
            Ok(()) => println!("{name}"),
            Err(f) => {
                eprintln!("shoji: error: {}", f.msg);
                failed = Some(f.code);
            }
        }
    }
    Ok(failed.unwrap_or(0))
}

/// Removes one sandbox: a live process is stopped first (with `force`), then the directory.
fn remove(name: &str, force: bool) -> Result<(), Fail> {
    let st = state::load(name)?;
    if st.alive() {
        if !force && st.status != Status::Exited {
            return Err(fail(format!("sandbox {name}: is running; `shoji kill` it first or use `shoji rm -f`")));
        }
        // SIGTERM: the sandbox process destroys the sandbox and stops its VM.
        // SAFETY: kill(2) with a pid checked to be this sandbox's process.
        unsafe { libc::kill(st.pid, libc::SIGTERM) };
        let gone = state::wait_exit(st.pid, Some(STOP_GRACE)).context("rm: waiting for the sandbox process")?;
        if !gone {
            tracing::warn!("sandbox {name}: still running after {STOP_GRACE:?}; killing it");
            // SAFETY: as above; SIGKILL ends the VM with the process.
            unsafe { libc::kill(st.pid, libc::SIGKILL) };
            state::wait_exit(st.pid, None).context("rm: waiting for the sandbox process")?;
        }
    }
    let dir = state::dir_of(name);
    std::fs::remove_dir_all(&dir).with_context(|| format!("rm: {}", dir.display()))?;
    Ok(())
}

/// The detached sandbox's guest command line: the agent logs at info on the console.
pub fn sandbox_cmdline() -> String {
    format!("{} -- --log info", shoji_vmm::cmdline::DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("KILL").ok(), Some(9));
        assert_eq!(parse_signal("sigterm").ok(), Some(15));
        assert_eq!(parse_signal("2").ok(), Some(2));
        for bad in ["0", "65", "NOPE", ""] {
            assert!(parse_signal(bad).unwrap_err().msg.starts_with("signal: "), "{bad}");
        }
    }

    #[test]
    fn ps_table() {
        let t = table(
            ["NAME", "STATUS", "CREATED", "COMMAND"],
            &[["x".into(), "exited(3)".into(), ago(61), command_column(&["sh".into(), "-c".into(), "x".repeat(50)])]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME   STATUS      CREATED        COMMAND");
        assert!(lines[1].starts_with("x      exited(3)   1 minute ago   sh -c xxx"), "{t}");
        assert!(lines[1].ends_with("..."));
    }
}
