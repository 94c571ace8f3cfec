//! `shoji bench boot` and `shoji bench run`: end-to-end latency of a whole `shoji` process, as
//! a user sees it, next to QEMU booting the same guest.
//!
//! A sample is the wall time from just before `spawn()` of the process to the moment the kernel
//! reports it exited (`waitid(WNOWAIT)`, before reaping): exec, KVM set-up, guest boot, guest
//! exit and teardown all count. `bench boot` runs `shoji boot` (this same binary): the null
//! guest prints its marker and resets; the Linux guest boots the cached kernel and initramfs
//! with `rdinit=/selftest`, whose /init prints `SHOJI-INIT-OK boottime=...` and reboots. `bench
//! run` runs `shoji run -- true` (boot, agent, container, exit status, teardown). The peer of
//! `bench boot` is QEMU or `shoji boot` itself with `SHOJI_SECCOMP=off` (its confinement off).
//! Each system gets one untimed warm-up run first (page cache, lazily built artifacts), then the
//! systems alternate in pairs, Shoji first in odd runs and the peer first in even ones.
use super::stats::Summary;
use super::{check_peer, command_line, machine, peer_first, shell_quote, Machine, Peer, Scratch, QEMU};
use crate::artifacts;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use shoji_vmm::{cmdline, host, testkit};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a sample measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    /// `shoji boot`: spawn to VM exit.
    Boot,
    /// `shoji run -- true`: spawn to exit.
    Run,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Guest {
    /// The test kit's null guest: prints a marker and resets (no Linux).
    Null,
    /// Shoji's guest kernel and initramfs (built and cached on first use).
    Linux,
}

#[derive(Clone, Debug)]
pub struct BootOpts {
    pub bench: Bench,
    pub n: u32,
    pub guest: Guest,
    pub peer: Option<Peer>,
    pub json: bool,
    pub plot: Option<PathBuf>,
    /// `shoji boot --irqchip split` (the test guests need no legacy interrupt controller).
    pub split_irqchip: bool,
}

/// No sample may take longer: a hung guest is killed and fails the bench.
const SAMPLE_LIMIT: Duration = Duration::from_secs(300);
/// The guest RAM both systems give the guest (`shoji boot`'s default).
const GUEST_MIB: u64 = 128;
/// The Linux guest's /init runs the initramfs's selftest init: it prints this and reboots.
const INIT_MARKER: &str = "SHOJI-INIT-OK";

/// One system under test: how to start a sample and how to tell it succeeded.
struct System {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// Printed on stdout by a successful sample.
    marker: Option<&'static str>,
    /// Set in its environment.
    env: Vec<(&'static str, &'static str)>,
}

impl System {
    fn command_text(&self) -> String {
        let prog =
            if self.name.starts_with("shoji") { "shoji".to_string() } else { self.program.display().to_string() };
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={} ", shell_quote(v))).collect();
        let args: Vec<String> = self.args.iter().map(|a| shell_quote(a)).collect();
        format!("{}{prog} {}", env.concat(), args.join(" "))
    }
}

/// A system's name for a report's list: "Shoji", or the peer's title.
fn label(name: &str) -> &'static str {
    [Peer::Qemu, Peer::Unconfined, Peer::Cold].into_iter().find(|p| p.name() == name).map_or("Shoji", Peer::title)
}

/// One timed sample: milliseconds, and what the guest said about itself.
struct Sample {
    ms: f64,
    /// The Linux guest's CLOCK_BOOTTIME when /init started, in ms.
    guest_boottime_ms: Option<f64>,
}

fn validate(o: &BootOpts) -> Result<()> {
    if o.n == 0 {
        bail!("n: must be at least 1");
    }
    if o.bench == Bench::Run && o.guest != Guest::Linux {
        bail!("guest: `bench run` runs a container, which needs the linux guest");
    }
    if let Some(p) = &o.plot {
        if p.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("png")) != Some(true) {
            bail!("plot: {} must end in .png", p.display());
        }
        super::plot::load_font()?;
    }
    Ok(())
}

/// Shoji's and its peer's commands for the chosen bench and guest.
fn systems(o: &BootOpts, scratch: &Path) -> Result<Vec<System>> {
    let exe = std::env::current_exe().context("cannot find this shoji binary")?;
    let limit = SAMPLE_LIMIT.as_secs().to_string();
    let mut shoji = System { name: "shoji", program: exe, args: Vec::new(), marker: None, env: Vec::new() };
    let mut qemu_boot: Option<Vec<String>> = None;
    match (o.bench, o.guest) {
        (Bench::Run, _) => {
            shoji.args = ["run", "--timeout", &limit, "--", "true"].map(String::from).to_vec();
        }
        (Bench::Boot, Guest::Null) => {
            shoji.args = ["boot", "--guest", "null", "--timeout", &limit].map(String::from).to_vec();
            if o.split_irqchip {
                shoji.args.extend(["--irqchip".into(), "split".into()]);
            }
            shoji.marker = Some(testkit::NULL_MARKER);
            let kernel = scratch.join("null.elf");
            std::fs::write(&kernel, testkit::NULL).with_context(|| format!("write {}", kernel.display()))?;
            qemu_boot = Some(vec!["-kernel".into(), kernel.display().to_string()]);
        }
        (Bench::Boot, Guest::Linux) => {
            let kernel = artifacts::ensure_kernel()?;
            let initrd = artifacts::ensure_rootfs()?;
            let user = format!("{} rdinit=/selftest", cmdline::DEFAULT);
            shoji.args = ["boot", "--cmdline", &user, "--timeout", &limit].map(String::from).to_vec();
            shoji.marker = Some(INIT_MARKER);
            qemu_boot = Some(vec![
                "-kernel".into(),
                kernel.display().to_string(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-append".into(),
                cmdline::linux(Some(&user), host::is_pvm()),
            ]);
        }
    }
    let mut v = vec![shoji];
    if let Some(p @ (Peer::Unconfined | Peer::Cold)) = o.peer {
        let s = &v[0];
        let (program, args, marker) = (s.program.clone(), s.args.clone(), s.marker);
        let env = if p == Peer::Cold { vec![("SHOJI_TEMPLATES", "off")] } else { vec![("SHOJI_SECCOMP", "off")] };
        v.push(System { name: p.name(), program, args, marker, env });
    }
    if let (Some(Peer::Qemu), Some(boot)) = (o.peer, qemu_boot) {
        // QEMU's leanest machine (qboot firmware, no PCI, no ACPI): what the guest needs is a
        // UART and the i8042 line it resets through (microvm has none by default).
        let mut args = super::qemu_common_args("microvm,pit=off,pic=off,rtc=off", GUEST_MIB);
        args.extend(["-device".into(), "i8042".into()]);
        args.extend(boot);
        let marker = v[0].marker;
        v.push(System { name: Peer::Qemu.name(), program: PathBuf::from(QEMU), args, marker, env: Vec::new() });
    }
    Ok(v)
}

/// Waits until `child` has exited, without reaping it (so its pid cannot be reused while the
/// watchdog may still kill it).
fn wait_exited(child: &std::process::Child) -> std::io::Result<()> {
    loop {
        // SAFETY: waitid(2) with P_PID on our own child and a zeroed siginfo_t it fills in;
        // WNOWAIT leaves the child to be reaped by Child::wait.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, child.id(), &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One run of `s`, timed from spawn to exit; its stdout and stderr go to files in `dir`.
fn sample(s: &System, dir: &Path) -> Result<Sample> {
    let out_path = dir.join(format!("{}.out", s.name));
    let err_path = dir.join(format!("{}.err", s.name));
    let out = File::create(&out_path).with_context(|| format!("create {}", out_path.display()))?;
    let err = File::create(&err_path).with_context(|| format!("create {}", err_path.display()))?;
    let mut cmd = Command::new(&s.program);
    cmd.args(&s.args).envs(s.env.iter().copied()).stdin(Stdio::null()).stdout(out).stderr(err).env_remove("RUST_LOG");
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("{}: cannot start {}", s.name, s.program.display()))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        if rx.recv_timeout(SAMPLE_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill(2) on our child, which is not reaped until this thread is joined.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let waited = wait_exited(&child);
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(tx);
    let _ = dog.join();
    let status = child.wait().with_context(|| format!("{}: wait", s.name))?;
    waited.with_context(|| format!("{}: waitid", s.name))?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let last = |t: &str| t.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
    if !status.success() {
        bail!("{}: exited with {status}: {} {}", s.name, last(&stderr), last(&stdout));
    }
    if let Some(m) = s.marker {
        if !stdout.contains(m) {
            bail!("{}: the guest never printed {m}: {}", s.name, last(&stdout));
        }
    }
    Ok(Sample { ms, guest_boottime_ms: guest_boottime_ms(&stdout) })
}

/// `SHOJI-INIT-OK boottime=S.US` -> ms.
fn guest_boottime_ms(console: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(INIT_MARKER))?;
    let v: f64 = line.split_whitespace().find_map(|w| w.strip_prefix("boottime="))?.parse().ok()?;
    Some(v * 1e3)
}

const COLUMNS: [&str; 6] = ["min", "p25", "p50", "p90", "p99", "max"];

/// Everything measured, per system in order (shoji first).
pub struct Results {
    pub systems: Vec<(&'static str, String, Vec<f64>)>,
    guest_boottimes: Vec<f64>,
    peer_error: Option<String>,
}

pub fn main(o: BootOpts) -> Result<()> {
    validate(&o)?;
    match (o.bench, o.peer) {
        (Bench::Run, Some(Peer::Cold) | None) => {}
        (Bench::Run, Some(p)) => bail!("peer: `bench run` compares only with `cold`, not {}", p.name()),
        _ => check_peer(o.peer, shoji_vmm::confine::default_enabled())?,
    }
    let machine = machine(o.peer);
    let command = command_line();
    let dir = std::env::temp_dir().join(format!("shoji-bench-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let mut systems = systems(&o, &scratch.0)?;
    let mut peer_error = None;
    // Warm-up, untimed: Shoji's must work; a peer that fails is reported and dropped.
    sample(&systems[0], &scratch.0).map_err(|e| anyhow!("warm-up: {e:#}"))?;
    if systems.len() > 1 {
        if let Err(e) = sample(&systems[1], &scratch.0) {
            let msg = format!("{e:#}");
            eprintln!("shoji: bench: {} failed, reporting Shoji alone: {msg}", label(systems[1].name));
            peer_error = Some(msg);
            systems.truncate(1);
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut guest_boottimes = Vec::new();
    for i in 1..=o.n {
        let mut order: Vec<usize> = (0..systems.len()).collect();
        if peer_first(i) {
            order.reverse();
        }
        for k in order {
            let s = &systems[k];
            let r = sample(s, &scratch.0).map_err(|e| anyhow!("run {i}: {e:#}"))?;
            if !o.json {
                eprintln!("{:<5} {i}/{}: {:.1} ms", s.name, o.n, r.ms);
            }
            if k == 0 {
                guest_boottimes.extend(r.guest_boottime_ms);
            }
            samples[k].push(r.ms);
        }
    }
    let results = Results {
        systems: systems.iter().zip(samples).map(|(s, v)| (s.name, s.command_text(), v)).collect(),
        guest_boottimes,
        peer_error,
    };
    if let Some(p) = &o.plot {
        super::plot::draw(
            p,
            &plot_title(&o),
            &results.systems.iter().map(|s| (s.0, s.2.as_slice())).collect::<Vec<_>>(),
        )
        .map_err(|e| anyhow!("plot: {}: {e:#}", p.display()))?;
    }
    let report = Report { o: &o, command, machine, results };
    print!("{}", if o.json { report.json() } else { report.markdown() });
    Ok(())
}

fn what(o: &BootOpts) -> &'static str {
    match (o.bench, o.guest) {
        (Bench::Run, _) => "`shoji run -- true`, spawn to exit",
        (Bench::Boot, Guest::Null) => "boot of the null test guest, spawn to VM exit",
        (Bench::Boot, Guest::Linux) => "boot of the Linux guest to /init (rdinit=/selftest), spawn to VM exit",
    }
}

fn plot_title(o: &BootOpts) -> String {
    let w = match (o.bench, o.guest) {
        (Bench::Run, _) => "shoji run -- true",
        (Bench::Boot, Guest::Null) => "boot, null guest",
        (Bench::Boot, Guest::Linux) => "boot, Linux guest to /init",
    };
    format!("{w}: spawn to exit, {} runs each", o.n)
}

struct Report<'a> {
    o: &'a BootOpts,
    command: String,
    machine: Machine,
    results: Results,
}

impl Report<'_> {
    fn summaries(&self) -> Vec<(&'static str, Option<Summary>)> {
        self.results.systems.iter().map(|(n, _, v)| (*n, Summary::of(v))).collect()
    }

    /// Shoji's percentiles over the peer's (below 1: Shoji is faster).
    fn ratio(&self) -> Option<[f64; 6]> {
        let s = self.summaries();
        let (a, b) = (s.first()?.1?, s.get(1)?.1?);
        let mut r = [0.0; 6];
        for (i, (x, y)) in a.cells().iter().zip(b.cells()).enumerate() {
            r[i] = x / y;
        }
        Some(r)
    }

    fn markdown(&self) -> String {
        let o = self.o;
        let mut s = self.machine.header(&self.command);
        let _ = writeln!(s, "- Measures: {}", what(o));
        for (name, cmd, _) in &self.results.systems {
            let _ = writeln!(s, "- {}: `{cmd}`", label(name));
        }
        if let Some(p) = o.peer.filter(|p| *p != Peer::Qemu) {
            let _ = writeln!(s, "- Peer: {}", p.describe());
        }
        match (&self.results.peer_error, o.peer, o.bench) {
            (Some(e), Some(p), _) => {
                let _ = writeln!(s, "- {} could not be measured: {e}", p.title());
            }
            (None, None, Bench::Run) => {
                let _ = writeln!(s, "- Peer: none fits (QEMU alone runs no containers)");
            }
            _ => {}
        }
        let _ = writeln!(
            s,
            "- Runs: {} per system, interleaved{}, after one untimed warm-up each; percentiles are nearest-rank",
            o.n,
            if o.peer.is_some() { " (Shoji first in odd runs, the peer in even ones)" } else { "" }
        );
        if let Some(b) = Summary::of(&self.results.guest_boottimes) {
            let _ = writeln!(
                s,
                "- The Linux guest's own clock at /init (CLOCK_BOOTTIME, Shoji runs): p50 {:.1} ms, min {:.1}, max {:.1}",
                b.p50, b.min, b.max
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "| system | runs | min ms | p25 ms | p50 ms | p90 ms | p99 ms | max ms |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for ((name, _, v), (_, sum)) in self.results.systems.iter().zip(self.summaries()) {
            let cells = match sum {
                Some(x) => x.cells().map(|c| format!("{c:.1}")).join(" | "),
                None => ["–"; 6].join(" | "),
            };
            let _ = writeln!(s, "| {name} | {} | {cells} |", v.len());
        }
        if let (Some(r), Some((peer, _, _))) = (self.ratio(), self.results.systems.get(1)) {
            let _ = writeln!(s, "| shoji/{peer} | | {} |", r.map(|x| format!("{x:.3}")).join(" | "));
            let _ = writeln!(s);
            let _ = writeln!(s, "Ratios below 1: Shoji (the first row) is faster.");
        }
        s
    }

    fn json(&self) -> String {
        let m = &self.machine;
        let systems: Vec<serde_json::Value> = self
            .results
            .systems
            .iter()
            .zip(self.summaries())
            .map(|((name, cmd, v), (_, sum))| {
                json!({
                    "name": name,
                    "command": cmd,
                    "samples_ms": v,
                    "summary_ms": sum.map(|x| json!({"min": x.min, "p25": x.p25, "p50": x.p50, "p90": x.p90, "p99": x.p99, "max": x.max})),
                })
            })
            .collect();
        let ratio = self.ratio().map(|r| {
            let mut o = serde_json::Map::new();
            for (k, v) in COLUMNS.iter().zip(r) {
                o.insert(k.to_string(), json!(v));
            }
            serde_json::Value::Object(o)
        });
        let v = json!({
            "bench": match self.o.bench { Bench::Boot => "boot", Bench::Run => "run" },
            "guest": match self.o.guest { Guest::Null => "null", Guest::Linux => "linux" },
            "measures": what(self.o),
            "runs": self.o.n,
            "peer": self.o.peer.map(Peer::name),
            "command": self.command,
            "machine": {
                "nproc": m.nproc, "cpu": m.cpu, "kernel": m.kernel, "kvm": m.kvm, "pvm": host::is_pvm(),
                "loadavg": m.loadavg, "qemu": m.qemu,
            },
            "systems": systems,
            "ratio_shoji_over_peer": ratio,
            "guest_boottime_ms": self.results.guest_boottimes,
            "peer_error": self.results.peer_error,
            "plot": self.o.plot.as_ref().map(|p| p.display().to_string()),
        });
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::stats::percentile;
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let s = Summary::of(&[3.0, 1.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.p25, s.p50, s.p90, s.min, s.max), (1.0, 2.0, 4.0, 1.0, 4.0));
        assert_eq!(s.cells(), [1.0, 1.0, 2.0, 4.0, 4.0, 4.0]);
    }

    #[test]
    fn the_unconfined_peer_is_shoji_boot_with_seccomp_off() {
        let dir = tempfile::tempdir().unwrap();
        let o = BootOpts {
            bench: Bench::Boot,
            n: 2,
            guest: Guest::Null,
            peer: Some(Peer::Unconfined),
            json: false,
            plot: None,
            split_irqchip: false,
        };
        let v = systems(&o, dir.path()).unwrap();
        assert_eq!(v.iter().map(|s| s.name).collect::<Vec<_>>(), ["shoji", "shoji-unconfined"]);
        assert_eq!((&v[1].program, &v[1].args, v[1].marker), (&v[0].program, &v[0].args, v[0].marker));
        assert!(v[0].env.is_empty());
        assert_eq!(v[1].env, [("SHOJI_SECCOMP", "off")]);
        assert!(
            v[1].command_text().starts_with("SHOJI_SECCOMP=off shoji boot --guest null"),
            "{}",
            v[1].command_text()
        );
        assert_eq!((label("shoji"), label("shoji-unconfined"), label("qemu")), ("Shoji", "Shoji unconfined", "QEMU"));

        let results = Results {
            systems: v
                .iter()
                .zip([vec![10.0, 30.0], vec![10.0, 20.0]])
                .map(|(s, x)| (s.name, s.command_text(), x))
                .collect(),
            guest_boottimes: Vec::new(),
            peer_error: None,
        };
        let machine = Machine {
            nproc: 2,
            cpu: "cpu".into(),
            kernel: "6".into(),
            kvm: "kvm".into(),
            loadavg: "0".into(),
            qemu: None,
        };
        let r = Report { o: &o, command: "shoji bench boot".into(), machine, results };
        assert_eq!(r.ratio(), Some([1.0, 1.0, 1.0, 1.5, 1.5, 1.5]));
        let md = r.markdown();
        assert!(md.contains("- Shoji unconfined: `SHOJI_SECCOMP=off shoji boot"), "{md}");
        assert!(md.contains("- Peer: Shoji unconfined: the same binary"), "{md}");
        assert!(md.contains("| shoji/shoji-unconfined | | 1.000 | 1.000 | 1.000 | 1.500 | 1.500 | 1.500 |"), "{md}");
        assert!(!md.contains("QEMU"), "{md}");
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["peer"], "shoji-unconfined");
        assert_eq!(v["ratio_shoji_over_peer"]["p90"], 1.5);
        assert_eq!(v["systems"][1]["summary_ms"]["p25"], 10.0);
    }

    #[test]
    fn guest_boottime_comes_from_the_init_marker() {
        assert_eq!(guest_boottime_ms("x\nSHOJI-INIT-OK boottime=1.250000\n"), Some(1250.0));
        assert_eq!(guest_boottime_ms("SHOJI-NULL-OK\n"), None);
    }

    #[test]
    fn bad_combinations_name_the_field() {
        let o =
            |bench, guest, peer| BootOpts { bench, n: 3, guest, peer, json: false, plot: None, split_irqchip: false };
        let e = validate(&o(Bench::Run, Guest::Null, None)).unwrap_err().to_string();
        assert!(e.starts_with("guest: "), "{e}");
        let mut x = o(Bench::Boot, Guest::Null, None);
        x.n = 0;
        assert!(validate(&x).unwrap_err().to_string().starts_with("n: "));
        x.n = 1;
        x.plot = Some("out.svg".into());
        assert!(validate(&x).unwrap_err().to_string().starts_with("plot: out.svg must end in .png"));
    }
}
