//! `shoji bench devices`: virtio-blk throughput, IOPS and host CPU per request, measured from
//! the probe test guest's `blkbench` mode (vmm/testkit/blkbench.c), optionally side by side
//! with a peer ([`Peer`]): QEMU running the same guest on its own virtio-blk-pci device, or
//! Shoji with its confinement off (what seccomp, Landlock and the capability drops cost).
//!
//! The guest only marks phases on its serial console ("probe: bench seqread start" ... "end
//! bytes=B requests=R"); the host timestamps each line when it arrives and samples the VMM
//! process's CPU time (the sum of `/proc/PID/task/*/schedstat` run times: every thread, guest
//! execution included, nanosecond resolution) at the same moment. A phase's time runs from the
//! start line's arrival to the end line's, so it includes printing the end line (≈ 1 ms on a
//! PVM host): phases are sized to last far longer.
//!
//! Shoji runs in this process through [`shoji_vmm::run`] with a [`SerialOut::Writer`] that
//! stamps lines as the vCPU thread emits them; QEMU runs as a child whose `-serial stdio` pipe a
//! reader thread stamps; unconfined Shoji runs in this process too, with `VmConfig::confine`
//! off. Runs pair Shoji and the peer, Shoji first in odd runs and the peer first in even ones
//! ([`peer_first`]), so a drift weighs on both; each run gets a freshly written and synced disk
//! image (untimed), so each starts with the same clean page cache.
pub mod boot;
pub mod hotplug;
pub mod plot;
pub mod stats;
pub mod template;
pub mod vsock;

use anyhow::{anyhow, bail, Context, Result};
use shoji_vmm::{host, testkit, DiskConfig, SerialOut, StopReason, VmConfig};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the guest stamps into the first 8 bytes of every 4 KiB block (blkbench.c: stamp()).
const STAMP_TAG: u64 = 0x5348_4f4a_0000_0000;
const SEQ_REQUEST: u64 = 64 << 10;
const RAND_REQUEST: u64 = 4 << 10;
/// Guest RAM the probe's bench mode touches: rings and headers, and its data buffers.
const GUEST_AREAS: &[(u64, u64)] = &[(0x30000, 0x40000), (0x80_0000, 0x90_0000)];
const GUEST_MIB: u64 = 128;
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// In the order the guest runs them (the write phase last: it stamps one block per request).
const PHASES: &[&str] = &["seqread", "randread", "seqwrite"];

/// What a bench runs next to Shoji, interleaved run by run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// QEMU running the same guest.
    Qemu,
    /// Shoji itself with the VMM's confinement off (no seccomp filters, Landlock or capability
    /// drops, as `SHOJI_SECCOMP=off`): what the confinement costs.
    Unconfined,
    /// `shoji run` cold booting (`SHOJI_TEMPLATES=off`): what the VM template saves (`bench
    /// run` only).
    Cold,
}

impl Peer {
    /// The peer's name in per-run rows and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Qemu => "qemu",
            Peer::Unconfined => "shoji-unconfined",
            Peer::Cold => "shoji-cold",
        }
    }

    /// Its column heading.
    pub fn title(self) -> &'static str {
        match self {
            Peer::Qemu => "QEMU",
            Peer::Unconfined => "Shoji unconfined",
            Peer::Cold => "Shoji cold boot",
        }
    }

    /// The heading of the ratio columns (Shoji's value over the peer's).
    pub fn ratio_title(self) -> &'static str {
        match self {
            Peer::Qemu => "Shoji/QEMU",
            Peer::Unconfined => "confined/unconfined",
            Peer::Cold => "template/cold",
        }
    }

    /// One sentence for a report's header: what the peer is.
    pub fn describe(self) -> &'static str {
        match self {
            Peer::Qemu => "QEMU running the same guest",
            Peer::Unconfined => {
                "Shoji unconfined: the same binary and VM with the VMM's confinement off (no seccomp \
                 filters, Landlock or capability drops: `VmConfig::confine = false`, as `SHOJI_SECCOMP=off`); \
                 the Shoji column is confined"
            }
            Peer::Cold => {
                "Shoji cold booting the guest (`SHOJI_TEMPLATES=off`); the Shoji column restores its VM \
                 template (built by the warm-up run when missing)"
            }
        }
    }
}

/// Whether the peer runs first in run `run` (1-based): Shoji first in odd runs, the peer first
/// in even ones, so a drift over the bench (page cache, other load) weighs on both alike.
pub(crate) fn peer_first(run: u32) -> bool {
    run.is_multiple_of(2)
}

/// `--peer unconfined` compares against Shoji confined: refused when `SHOJI_SECCOMP=off` (read
/// by [`shoji_vmm::confine::default_enabled`], passed as `confine_default`) turns it off for both.
pub(crate) fn check_peer(peer: Option<Peer>, confine_default: bool) -> Result<()> {
    if peer == Some(Peer::Unconfined) && !confine_default {
        bail!("peer: `--peer unconfined` compares with Shoji confined, but SHOJI_SECCOMP=off is set: unset it");
    }
    if peer == Some(Peer::Cold) {
        bail!("peer: `--peer cold` compares sandboxes (templates against cold boots): only `shoji bench run` takes it");
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct DevicesOpts {
    pub mib: u64,
    pub ios: u64,
    pub qd: u32,
    pub runs: u32,
    pub peer: Option<Peer>,
    pub json: bool,
}

/// A serial line and when it arrived, with the VMM's CPU time then (bench lines only).
#[derive(Clone, Debug)]
struct Line {
    text: String,
    at: Instant,
    cpu: Option<CpuSample>,
}

/// Run time per thread of the VMM process, and whether the thread runs a vCPU.
#[derive(Clone, Debug, Default, PartialEq)]
struct CpuSample(BTreeMap<u32, (bool, u64)>);

impl CpuSample {
    /// CPU seconds from `self` to `later`: (all threads, threads other than the vCPUs).
    /// Threads that exited in between are missing from `later`, so their time is lost; the
    /// VMMs here keep their threads for the whole run (QEMU's I/O workers idle for 10 s first).
    fn until(&self, later: &CpuSample) -> (f64, f64) {
        let (mut all, mut other) = (0u64, 0u64);
        for (tid, &(vcpu, ns)) in &later.0 {
            let d = ns.saturating_sub(self.0.get(tid).map_or(0, |t| t.1));
            all += d;
            if !vcpu {
                other += d;
            }
        }
        (all as f64 / 1e9, other as f64 / 1e9)
    }
}

/// One phase as measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub name: String,
    pub bytes: u64,
    pub requests: u64,
    pub seconds: f64,
    /// Host CPU of every VMM thread over the phase, and of those that are not vCPU threads
    /// (device emulation and I/O; a vCPU thread also runs the guest itself).
    pub cpu_seconds: f64,
    pub device_cpu_seconds: f64,
    pub kicks: u64,
    pub irqs: u64,
}

impl Phase {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    pub fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.requests as f64
    }
    pub fn device_cpu_us_per_request(&self) -> f64 {
        self.device_cpu_seconds * 1e6 / self.requests as f64
    }
    /// The headline figure: MB/s for sequential phases, IOPS for random ones.
    pub fn rate(&self) -> f64 {
        if self.name.starts_with("rand") {
            self.iops()
        } else {
            self.mb_per_s()
        }
    }
}

#[derive(Clone, Debug)]
struct RunResult {
    vmm: &'static str,
    run: u32,
    wall_s: f64,
    phases: Vec<Phase>,
}

/// Collects serial output into stamped lines. `pid` is whose CPU time to sample (None: this
/// process).
///
/// The serial writer runs on a vCPU thread, which is confined (no directory listing there:
/// [`shoji_vmm::confine`]), so a bench line's CPU sample is taken by a sampler thread of the
/// bench while the vCPU thread waits for it: the sampling moment stays the line's arrival.
#[derive(Clone)]
struct LineClock {
    partial: Vec<u8>,
    lines: Arc<Mutex<Vec<Line>>>,
    sampler: std::sync::mpsc::Sender<std::sync::mpsc::SyncSender<CpuSample>>,
}

impl LineClock {
    fn new(pid: Option<u32>) -> Self {
        let (sampler, requests) = std::sync::mpsc::channel::<std::sync::mpsc::SyncSender<CpuSample>>();
        // Ends when the last LineClock clone (and so the last sender) is gone.
        let spawned = std::thread::Builder::new().name("bench-sampler".into()).spawn(move || {
            for reply in requests {
                let _ = reply.send(sample_cpu(pid));
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("bench: no sampler thread ({e}): CPU samples will be empty");
        }
        LineClock { partial: Vec::new(), lines: Arc::new(Mutex::new(Vec::new())), sampler }
    }

    /// A CPU sample taken now, on the sampler thread.
    fn sample(&self) -> CpuSample {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.sampler.send(tx).is_err() {
            return CpuSample::default();
        }
        rx.recv().unwrap_or_default()
    }

    fn feed(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let at = Instant::now();
            self.partial.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let text = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
            self.partial.clear();
            let cpu = text.contains("probe: bench ").then(|| self.sample());
            self.lines.lock().unwrap_or_else(|p| p.into_inner()).push(Line { text, at, cpu });
        }
        self.partial.extend_from_slice(rest);
    }

    fn take(&self) -> Vec<Line> {
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Write for LineClock {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.feed(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every thread of `pid` (None: this process): schedstat's run time in ns (guest execution
/// included), and whether its name marks a vCPU thread (Shoji "vcpuN", QEMU "CPU N/KVM").
fn sample_cpu(pid: Option<u32>) -> CpuSample {
    let dir = match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}/task")),
        None => PathBuf::from("/proc/self/task"),
    };
    let Ok(tasks) = std::fs::read_dir(&dir) else { return CpuSample::default() };
    let threads = tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let ns =
                std::fs::read_to_string(t.path().join("schedstat")).ok()?.split_whitespace().next()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let vcpu = comm.starts_with("vcpu") || comm.trim_end().ends_with("/KVM");
            Some((tid, (vcpu, ns)))
        })
        .collect();
    CpuSample(threads)
}

/// `key=N` in a line's words.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// What each phase must transfer: (name, requests, bytes per request).
fn expected(o: &DevicesOpts) -> Vec<(&'static str, u64, u64)> {
    let seq = o.mib * (1 << 20) / SEQ_REQUEST;
    vec![("seqread", seq, SEQ_REQUEST), ("randread", o.ios, RAND_REQUEST), ("seqwrite", seq, SEQ_REQUEST)]
}

/// The phases of one run from its stamped lines; also checks what the guest reported against
/// `expect` ([`expected`]).
fn parse_phases(lines: &[Line], expect: &[(&str, u64, u64)]) -> Result<Vec<Phase>> {
    if let Some(l) = lines.iter().find(|l| l.text.contains("probe: bench error")) {
        bail!("guest: {}", l.text.trim());
    }
    check_guest_memory(lines)?;
    let find = |suffix: &str| lines.iter().find(|l| l.text.ends_with(suffix) || l.text.contains(&format!("{suffix} ")));
    let mut phases = Vec::new();
    for &(name, want_requests, request_bytes) in expect {
        let start = find(&format!("probe: bench {name} start")).ok_or_else(|| anyhow!("no {name} start line"))?;
        let end = find(&format!("probe: bench {name} end")).ok_or_else(|| anyhow!("no {name} end line"))?;
        let stats = find(&format!("probe: bench {name} stats")).ok_or_else(|| anyhow!("no {name} stats line"))?;
        let num = |l: &Line, k: &str| field(&l.text, k).ok_or_else(|| anyhow!("no {k}= in {:?}", l.text));
        let (errors, mismatches) = (num(stats, "errors")?, num(stats, "mismatches")?);
        if errors != 0 || mismatches != 0 {
            bail!("guest: {name}: {errors} failed requests, {mismatches} reads with wrong data: {}", stats.text);
        }
        let (bytes, requests) = (num(end, "bytes")?, num(end, "requests")?);
        if requests != want_requests || bytes != requests * request_bytes {
            bail!("guest: {name}: {requests} requests for {bytes} bytes, expected {want_requests} of {request_bytes}");
        }
        let (Some(c0), Some(c1)) = (&start.cpu, &end.cpu) else { bail!("{name}: no CPU samples") };
        if c1.0.is_empty() {
            bail!("{name}: the VMM had exited before its CPU time was sampled");
        }
        let (cpu_seconds, device_cpu_seconds) = c0.until(c1);
        phases.push(Phase {
            name: name.to_string(),
            bytes,
            requests,
            seconds: end.at.duration_since(start.at).as_secs_f64().max(1e-9),
            cpu_seconds,
            device_cpu_seconds,
            kicks: num(stats, "kicks")?,
            irqs: num(stats, "irqs")?,
        });
    }
    Ok(phases)
}

/// The areas the bench mode writes must be RAM in the E820 map the guest got (under QEMU the
/// firmware decides what is reserved).
fn check_guest_memory(lines: &[Line]) -> Result<()> {
    let ram: Vec<(u64, u64)> = lines
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.text.strip_prefix("probe: e820 ")?.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
            if w.len() != 3 || w[2] != "1" {
                return None;
            }
            let (start, size) = (hex(w[0])?, hex(w[1])?);
            Some((start, start + size))
        })
        .collect();
    if ram.is_empty() {
        bail!("the guest printed no E820 map");
    }
    for &(a, b) in GUEST_AREAS {
        if !ram.iter().any(|&(s, e)| s <= a && b <= e) {
            bail!("guest memory {a:#x}..{b:#x} used by the bench is not RAM in the guest's E820 map {ram:x?}");
        }
    }
    Ok(())
}

/// A disk of `mib` MiB whose every 4 KiB block starts with its stamp, the rest zero; written
/// afresh and synced before every run, so each VMM starts from the same clean page cache.
fn make_disk(path: &Path, mib: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for m in 0..mib {
        for (i, block) in chunk.chunks_mut(4096).enumerate() {
            let sector = (m << 20 | (i as u64) << 12) / 512;
            block[..8].copy_from_slice(&(STAMP_TAG | sector).to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// After a run: every 64 KiB chunk the write phase wrote starts with its stamp.
fn check_written(path: &Path, mib: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut b = [0u8; 8];
    for chunk in 0..mib * (1 << 20) / SEQ_REQUEST {
        let off = chunk * SEQ_REQUEST;
        f.read_exact_at(&mut b, off)?;
        let want = STAMP_TAG | (off / 512);
        if u64::from_le_bytes(b) != want {
            bail!("disk offset {off:#x} holds {:#x} after the write phase, expected {want:#x}", u64::from_le_bytes(b));
        }
    }
    Ok(())
}

fn guest_cmdline(o: &DevicesOpts) -> String {
    format!("blkbench mib={} ios={} qd={}", o.mib, o.ios, o.qd)
}

/// One run of Shoji in this process; `unconfined`: with [`VmConfig::confine`] off (the peer
/// [`Peer::Unconfined`]), else as `SHOJI_SECCOMP` says (on unless it is `off`).
fn run_shoji(o: &DevicesOpts, disk: &Path, run: u32, unconfined: bool) -> Result<RunResult> {
    let vmm = if unconfined { Peer::Unconfined.name() } else { "shoji" };
    let clock = LineClock::new(None);
    let kernel = testkit::guest("probe").ok_or_else(|| anyhow!("no built-in probe guest"))?;
    let mut cfg = VmConfig::new(kernel);
    if unconfined {
        cfg.confine = false;
    }
    cfg.cmdline = guest_cmdline(o);
    cfg.memory_mib = GUEST_MIB;
    cfg.serial = SerialOut::Writer(Box::new(clock.clone()));
    cfg.disks = vec![DiskConfig { path: disk.to_path_buf(), read_only: false }];
    cfg.timeout = Some(VM_TIMEOUT);
    let t0 = Instant::now();
    let outcome = shoji_vmm::run(cfg).context("shoji")?;
    let wall_s = t0.elapsed().as_secs_f64();
    let lines = clock.take();
    if outcome.reason != StopReason::Reset || !lines.iter().any(|l| l.text == testkit::PROBE_DONE) {
        bail!("{vmm}: the guest stopped with {:?} before finishing: {}", outcome.reason, tail(&lines));
    }
    let phases = parse_phases(&lines, &expected(o)).with_context(|| format!("{vmm} run {run}"))?;
    Ok(RunResult { vmm, run, wall_s, phases })
}

const QEMU: &str = "qemu-system-x86_64";

/// The QEMU flags every peer run shares: machine `machine`, KVM, the host CPU, 1 vCPU, `mib` MiB,
/// no default devices, the serial console on stdio, exit (not reboot) when the guest resets.
pub(crate) fn qemu_common_args(machine: &str, mib: u64) -> Vec<String> {
    let m = mib.to_string();
    [
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        &m,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec()
}

fn qemu_args(o: &DevicesOpts, kernel: &Path, disk: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["-name".into(), "shoji-bench,debug-threads=on".into()];
    a.extend(qemu_common_args("pc", GUEST_MIB));
    a.push("-kernel".into());
    a.push(kernel.display().to_string());
    a.extend(["-append".into(), guest_cmdline(o)]);
    a.extend([
        "-drive".into(),
        format!("file={},format=raw,if=none,id=d0,cache=writeback,aio=threads", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
    ]);
    a
}

fn run_qemu(o: &DevicesOpts, kernel: &Path, disk: &Path, run: u32) -> Result<RunResult> {
    let t0 = Instant::now();
    let mut child = Command::new(QEMU)
        .args(qemu_args(o, kernel, disk))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let mut clock = LineClock::new(Some(child.id()));
    let lines = clock.lines.clone();
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            clock.feed(&buf[..n]);
        }
        clock.feed(b"\n");
    });
    let mut err = child.stderr.take().ok_or_else(|| anyhow!("no stderr pipe"))?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let lines = std::mem::take(&mut *lines.lock().unwrap_or_else(|p| p.into_inner()));
    let Some(status) = status else {
        bail!("qemu: still running after {VM_TIMEOUT:?}, killed: {}", tail(&lines));
    };
    if !lines.iter().any(|l| l.text.ends_with(testkit::PROBE_DONE)) {
        bail!("qemu: exited ({status}) before the guest finished: {} {}", stderr.trim(), tail(&lines));
    }
    let phases = parse_phases(&lines, &expected(o)).with_context(|| format!("qemu run {run}"))?;
    Ok(RunResult { vmm: "qemu", run, wall_s, phases })
}

fn tail(lines: &[Line]) -> String {
    let n = lines.len().saturating_sub(3);
    let t: Vec<&str> = lines[n..].iter().map(|l| l.text.trim()).collect();
    format!("last output: {:?}", t)
}

/// Removes the scratch directory when the bench ends, however it ends.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub kvm: String,
    pub loadavg: String,
    pub qemu: Option<String>,
}

impl Machine {
    /// The report's opening lines, shared by every bench: the exact command, the machine, the
    /// load, and the peer when there is one.
    pub fn header(&self, command: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Command: `{command}`");
        let _ = writeln!(s);
        let _ =
            writeln!(s, "- Machine: {} CPUs ({}), Linux {}, /dev/kvm: {}", self.nproc, self.cpu, self.kernel, self.kvm);
        let _ = writeln!(s, "- Load average at start: {}", self.loadavg);
        if let Some(q) = &self.qemu {
            let _ = writeln!(s, "- Peer: {q}");
        }
        s
    }
}

fn machine(peer: Option<Peer>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into());
    let kvm = if host::is_pvm() {
        "PVM (kvm_pvm: guest kernel-mode code is emulated)".to_string()
    } else {
        "hardware virtualization (kvm_intel/kvm_amd)".to_string()
    };
    let qemu = (peer == Some(Peer::Qemu)).then(|| {
        Command::new(QEMU)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
            .unwrap_or_else(|| format!("{QEMU} not found"))
    });
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu,
        kernel: read("/proc/sys/kernel/osrelease"),
        kvm,
        loadavg: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        qemu,
    }
}

/// Median, minimum and maximum.
fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((med, v[0], v[n - 1]))
}

/// The metrics of the summary table, per phase.
const METRICS: usize = 3;

impl Phase {
    fn metrics(&self) -> [f64; METRICS] {
        [self.rate(), self.cpu_us_per_request(), self.device_cpu_us_per_request()]
    }
}

fn metric_label(phase: &str, i: usize) -> &'static str {
    match i {
        0 if phase.starts_with("rand") => "IOPS",
        0 => "MB/s",
        1 => "host CPU µs/request, all VMM threads",
        _ => "host CPU µs/request, outside vCPU threads",
    }
}

/// Per VMM and phase: each metric's values over the runs.
type Summary = BTreeMap<(&'static str, String), [Vec<f64>; METRICS]>;

fn summarize(results: &[RunResult]) -> Summary {
    let mut s = Summary::new();
    for r in results {
        for p in &r.phases {
            let e = s.entry((r.vmm, p.name.clone())).or_default();
            for (v, m) in e.iter_mut().zip(p.metrics()) {
                v.push(m);
            }
        }
    }
    s
}

/// Shoji's metric `i` of `phase` over the peer `vmm`'s, within each run that measured both.
fn paired_ratios(results: &[RunResult], vmm: &str, phase: &str, i: usize) -> Vec<f64> {
    let value = |vmm: &str, run: u32| {
        let r = results.iter().find(|r| r.vmm == vmm && r.run == run)?;
        r.phases.iter().find(|p| p.name == phase).map(|p| p.metrics()[i])
    };
    results
        .iter()
        .filter(|r| r.vmm == "shoji")
        .filter_map(|r| {
            let (a, b) = (value("shoji", r.run)?, value(vmm, r.run)?);
            (b > 0.0).then(|| a / b)
        })
        .collect()
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@".contains(c)) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        if let Some(name) = Path::new(first).file_name() {
            *first = name.to_string_lossy().into_owned();
        }
    }
    args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

fn fmt_rate(phase: &str, v: f64) -> String {
    if phase.starts_with("rand") {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn cell(phase: &str, metric: usize, v: Option<(f64, f64, f64)>) -> String {
    let f = |x: f64| if metric == 0 { fmt_rate(phase, x) } else { format!("{x:.1}") };
    match v {
        None => "–".into(),
        Some((m, lo, hi)) => format!("{} ({}–{})", f(m), f(lo), f(hi)),
    }
}

fn phase_label(o: &DevicesOpts, name: &str) -> String {
    match name {
        "seqread" => format!("seq read, 64 KiB × {}, {} MiB", o.mib * 16, o.mib),
        "seqwrite" => format!("seq write, 64 KiB × {}, {} MiB", o.mib * 16, o.mib),
        _ => format!("rand read, 4 KiB × {}", o.ios),
    }
}

struct Report<'a> {
    opts: &'a DevicesOpts,
    command: String,
    machine: Machine,
    qemu_command: Option<String>,
    results: Vec<RunResult>,
    peer_error: Option<String>,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let o = self.opts;
        let mut s = self.machine.header(&self.command);
        let _ = writeln!(
            s,
            "- Guest: the probe test guest's `blkbench` mode (`{}`), 1 vCPU, {GUEST_MIB} MiB, one raw \
             {} MiB disk image in {} (host page cache; no flush), {} requests in flight",
            guest_cmdline(o),
            o.mib,
            std::env::temp_dir().display(),
            o.qd
        );
        if let Some(q) = &self.qemu_command {
            let _ = writeln!(s, "- QEMU: `{q}`");
        }
        if let Some(p) = o.peer.filter(|p| *p != Peer::Qemu) {
            let _ = writeln!(s, "- Peer: {}", p.describe());
        }
        let order = if o.peer.is_some() {
            ", the order alternating (Shoji first in odd runs, the peer in even ones)"
        } else {
            ""
        };
        let _ = writeln!(s, "- Runs: {} per VMM, interleaved{order}; cells are median (min–max)", o.runs);
        if let (Some(e), Some(p)) = (&self.peer_error, o.peer) {
            let _ = writeln!(s, "- {} could not be measured: {e}", p.title());
        }
        let _ = writeln!(s);
        let sum = summarize(&self.results);
        let get =
            |vmm: &'static str, p: &str, i: usize| sum.get(&(vmm, p.to_string())).and_then(|m| spread(m[i].clone()));
        let peer = o.peer.filter(|_| self.peer_error.is_none());
        if let Some(peer) = peer {
            let (t, r) = (peer.title(), peer.ratio_title());
            let _ = writeln!(s, "| workload | metric | Shoji | {t} | {r} | {r}, paired runs |");
            let _ = writeln!(s, "|---|---|---|---|---|---|");
        } else {
            let _ = writeln!(s, "| workload | metric | Shoji |");
            let _ = writeln!(s, "|---|---|---|");
        }
        for p in PHASES {
            for i in 0..METRICS {
                let sv = get("shoji", p, i);
                if sv.is_none() {
                    continue;
                }
                let label = if i == 0 { phase_label(o, p) } else { String::new() };
                if let Some(peer) = peer {
                    let qv = get(peer.name(), p, i);
                    let ratio = match (sv, qv) {
                        (Some(a), Some(b)) if b.0 > 0.0 => format!("{:.3}", a.0 / b.0),
                        _ => "–".into(),
                    };
                    let paired = match spread(paired_ratios(&self.results, peer.name(), p, i)) {
                        Some((m, lo, hi)) => format!("{m:.3} ({lo:.3}–{hi:.3})"),
                        None => "–".into(),
                    };
                    let _ = writeln!(
                        s,
                        "| {label} | {} | {} | {} | {ratio} | {paired} |",
                        metric_label(p, i),
                        cell(p, i, sv),
                        cell(p, i, qv)
                    );
                } else {
                    let _ = writeln!(s, "| {label} | {} | {} |", metric_label(p, i), cell(p, i, sv));
                }
            }
        }
        if let Some(peer) = peer {
            let _ = writeln!(s);
            let who = match peer {
                Peer::Qemu => "Shoji is faster",
                Peer::Unconfined => "confined Shoji is faster (the confinement's cost is 1 − ratio)",
                Peer::Cold => "templates are faster",
            };
            let less = match peer {
                Peer::Qemu => "Shoji uses less",
                Peer::Unconfined => "it uses less (the cost is ratio − 1)",
                Peer::Cold => "templates use less",
            };
            let _ = writeln!(
                s,
                "Ratios: above 1 in MB/s or IOPS, {who}; below 1 in CPU, {less}. The first ratio is of the \
                 medians; the paired one is taken within each run (its two adjacent VMs), median (min–max) over \
                 the runs."
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "Per run (wall = whole VM run, boot to exit; kicks and irqs as the guest counted them):");
        let _ = writeln!(s);
        let _ = writeln!(s, "| VMM | run | wall s | phase | s | rate | CPU µs/req | outside vCPUs | kicks | irqs |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.results {
            for p in &r.phases {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {} | {:.3} | {} | {:.1} | {:.1} | {} | {} |",
                    r.vmm,
                    r.run,
                    r.wall_s,
                    p.name,
                    p.seconds,
                    fmt_rate(&p.name, p.rate()),
                    p.cpu_us_per_request(),
                    p.device_cpu_us_per_request(),
                    p.kicks,
                    p.irqs
                );
            }
        }
        s
    }

    fn json(&self) -> String {
        let o = self.opts;
        let m = &self.machine;
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"command\": {},", json_str(&self.command));
        let _ = writeln!(
            s,
            "  \"machine\": {{\"nproc\": {}, \"cpu\": {}, \"kernel\": {}, \"kvm\": {}, \"pvm\": {}, \"loadavg\": {}, \
             \"qemu\": {}}},",
            m.nproc,
            json_str(&m.cpu),
            json_str(&m.kernel),
            json_str(&m.kvm),
            host::is_pvm(),
            json_str(&m.loadavg),
            m.qemu.as_deref().map(json_str).unwrap_or_else(|| "null".into())
        );
        let _ = writeln!(
            s,
            "  \"config\": {{\"mib\": {}, \"ios\": {}, \"qd\": {}, \"runs\": {}, \"peer\": {}, \"guest_cmdline\": {}, \
             \"qemu_command\": {}}},",
            o.mib,
            o.ios,
            o.qd,
            o.runs,
            o.peer.map(|p| json_str(p.name())).unwrap_or_else(|| "null".into()),
            json_str(&guest_cmdline(o)),
            self.qemu_command.as_deref().map(json_str).unwrap_or_else(|| "null".into())
        );
        let _ = writeln!(
            s,
            "  \"peer_error\": {},",
            self.peer_error.as_deref().map(json_str).unwrap_or_else(|| "null".into())
        );
        s.push_str("  \"runs\": [\n");
        let runs: Vec<String> = self
            .results
            .iter()
            .map(|r| {
                let phases: Vec<String> = r
                    .phases
                    .iter()
                    .map(|p| {
                        format!(
                            "{{\"name\": \"{}\", \"bytes\": {}, \"requests\": {}, \"seconds\": {:.6}, \"cpu_seconds\": {:.6}, \
                             \"device_cpu_seconds\": {:.6}, \"mb_per_s\": {:.3}, \"iops\": {:.1}, \"cpu_us_per_request\": {:.3}, \
                             \"kicks\": {}, \"irqs\": {}}}",
                            p.name,
                            p.bytes,
                            p.requests,
                            p.seconds,
                            p.cpu_seconds,
                            p.device_cpu_seconds,
                            p.mb_per_s(),
                            p.iops(),
                            p.cpu_us_per_request(),
                            p.kicks,
                            p.irqs
                        )
                    })
                    .collect();
                format!(
                    "    {{\"vmm\": \"{}\", \"run\": {}, \"wall_s\": {:.3}, \"phases\": [\n      {}\n    ]}}",
                    r.vmm,
                    r.run,
                    r.wall_s,
                    phases.join(",\n      ")
                )
            })
            .collect();
        s.push_str(&runs.join(",\n"));
        s.push_str("\n  ]\n}\n");
        s
    }
}

fn json_str(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

pub fn devices(o: DevicesOpts) -> Result<()> {
    if o.mib == 0 || o.ios == 0 || o.runs == 0 || !(1..=16).contains(&o.qd) {
        bail!("--mib, --ios and --runs must be at least 1, and --qd 1..=16");
    }
    check_peer(o.peer, shoji_vmm::confine::default_enabled())?;
    let machine = machine(o.peer);
    let command = command_line();
    let dir = std::env::temp_dir().join(format!("shoji-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let disk = scratch.0.join("disk.img");
    make_disk(&disk, o.mib)?;
    let kernel = scratch.0.join("probe.elf");
    let mut qemu_command = None;
    if o.peer == Some(Peer::Qemu) {
        std::fs::write(&kernel, testkit::PROBE).with_context(|| format!("write {}", kernel.display()))?;
        let args: Vec<String> = qemu_args(&o, &kernel, &disk).iter().map(|a| shell_quote(a)).collect();
        qemu_command = Some(format!("{QEMU} {}", args.join(" ")));
    }
    let mut results = Vec::new();
    let mut peer_error = None;
    for run in 1..=o.runs {
        let mut sides = vec![None];
        if peer_error.is_none() {
            sides.extend(o.peer.map(Some));
        }
        if peer_first(run) {
            sides.reverse();
        }
        for side in sides {
            make_disk(&disk, o.mib)?;
            let r = match side {
                None => run_shoji(&o, &disk, run, false),
                Some(Peer::Unconfined | Peer::Cold) => run_shoji(&o, &disk, run, true),
                Some(Peer::Qemu) => run_qemu(&o, &kernel, &disk, run),
            }
            .and_then(|r| {
                check_written(&disk, o.mib).with_context(|| format!("{} run {run}", r.vmm))?;
                Ok(r)
            });
            match (side, r) {
                // QEMU may be missing or broken here: Shoji is still reported.
                (Some(Peer::Qemu), Err(e)) => {
                    let msg = format!("{e:#}");
                    eprintln!("shoji: bench: QEMU failed, reporting Shoji alone: {msg}");
                    results.retain(|r: &RunResult| r.vmm != Peer::Qemu.name());
                    peer_error = Some(msg);
                }
                (_, r) => {
                    let r = r?;
                    if !o.json {
                        eprintln!("{} run {run}: {}", r.vmm, brief(&r));
                    }
                    results.push(r);
                }
            }
        }
    }
    let report = Report { opts: &o, command, machine, qemu_command, results, peer_error };
    print!("{}", if o.json { report.json() } else { report.markdown() });
    Ok(())
}

fn brief(r: &RunResult) -> String {
    let parts: Vec<String> = r
        .phases
        .iter()
        .map(|p| {
            format!(
                "{} {} {} ({:.1} µs CPU/req)",
                p.name,
                fmt_rate(&p.name, p.rate()),
                if p.name.starts_with("rand") { "IOPS" } else { "MB/s" },
                p.cpu_us_per_request()
            )
        })
        .collect();
    format!("{:.2} s, {}", r.wall_s, parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines with CPU samples for bench lines: thread 1 a vCPU, thread 2 not; `cpu` is the
    /// vCPU's run time, the other thread has a tenth of it.
    fn lines(text: &[(&str, f64, u64)]) -> Vec<Line> {
        let t0 = Instant::now();
        text.iter()
            .map(|&(t, s, cpu)| Line {
                text: t.to_string(),
                at: t0 + Duration::from_secs_f64(s),
                cpu: t
                    .contains("probe: bench ")
                    .then(|| CpuSample([(1, (true, cpu)), (2, (false, cpu / 10))].into_iter().collect())),
            })
            .collect()
    }

    const E820: &[(&str, f64, u64)] =
        &[("probe: e820 0x0 0x9fc00 1", 0.0, 0), ("probe: e820 0x100000 0x7f00000 1", 0.0, 0)];
    const EXPECT: &[(&str, u64, u64)] =
        &[("seqread", 16, SEQ_REQUEST), ("randread", 10, RAND_REQUEST), ("seqwrite", 16, SEQ_REQUEST)];

    fn run_lines(write_errors: u64) -> Vec<Line> {
        let errs = format!("probe: bench seqwrite stats errors={write_errors} mismatches=0 kicks=2 irqs=2");
        let mut v: Vec<(&str, f64, u64)> = E820.to_vec();
        v.extend([
            ("probe: bench disk capacity=2048 qd=4 ro=0", 0.1, 0),
            ("probe: bench seqread start", 1.0, 1_000_000),
            ("probe: bench seqread end bytes=1048576 requests=16", 1.5, 5_000_000),
            ("probe: bench seqread stats errors=0 mismatches=0 kicks=4 irqs=3", 1.6, 5_100_000),
            ("probe: bench randread start", 2.0, 6_000_000),
            ("probe: bench randread end bytes=40960 requests=10", 2.25, 7_000_000),
            ("probe: bench randread stats errors=0 mismatches=0 kicks=5 irqs=5", 2.3, 7_000_000),
            ("probe: bench seqwrite start", 3.0, 8_000_000),
            ("probe: bench seqwrite end bytes=1048576 requests=16", 4.0, 10_000_000),
            (errs.as_str(), 4.1, 10_000_000),
        ]);
        lines(&v)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn phases_come_from_line_arrival_times_and_cpu_samples() {
        let p = parse_phases(&run_lines(0), EXPECT).unwrap();
        assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["seqread", "randread", "seqwrite"]);
        assert_eq!((p[0].bytes, p[0].requests), (1 << 20, 16));
        assert!(close(p[0].seconds, 0.5));
        assert!(close(p[0].mb_per_s(), 1.048576 / 0.5));
        // 4 ms on the vCPU thread and 0.4 ms on the other one, over 16 requests.
        assert!(close(p[0].cpu_us_per_request(), 4400.0 / 16.0), "{}", p[0].cpu_us_per_request());
        assert!(close(p[0].device_cpu_us_per_request(), 400.0 / 16.0));
        assert_eq!((p[0].kicks, p[0].irqs), (4, 3));
        assert!(close(p[1].iops(), 40.0));
        assert!(close(p[1].rate(), 40.0));
    }

    #[test]
    fn cpu_deltas_count_new_threads_whole_and_lose_exited_ones() {
        let a = CpuSample([(1, (true, 100)), (2, (false, 50)), (3, (false, 70))].into_iter().collect());
        let b = CpuSample([(1, (true, 300)), (2, (false, 60)), (4, (false, 5))].into_iter().collect());
        let (all, other) = a.until(&b);
        assert!(close(all * 1e9, 215.0) && close(other * 1e9, 15.0), "{all} {other}");
    }

    #[test]
    fn guest_errors_and_missing_lines_fail_the_run() {
        let e = parse_phases(&run_lines(3), EXPECT).unwrap_err().to_string();
        assert!(e.contains("3 failed requests"), "{e}");
        let mut l = run_lines(0);
        l.retain(|l| !l.text.contains("randread end"));
        assert!(parse_phases(&l, EXPECT).unwrap_err().to_string().contains("no randread end"));
        let mut l = run_lines(0);
        l.push(lines(&[("probe: bench error: queue 0 setup", 5.0, 0)]).remove(0));
        assert!(parse_phases(&l, EXPECT).unwrap_err().to_string().contains("queue 0 setup"));
        let short = [("seqread", 17, SEQ_REQUEST)];
        let e = parse_phases(&run_lines(0), &short).unwrap_err().to_string();
        assert!(e.contains("16 requests for 1048576 bytes, expected 17"), "{e}");
        // A VMM that is gone when the end line is read has no threads to sample.
        let mut l = run_lines(0);
        l.iter_mut().filter(|l| l.text.contains("seqwrite end")).for_each(|l| l.cpu = Some(CpuSample::default()));
        let e = parse_phases(&l, EXPECT).unwrap_err().to_string();
        assert!(e.contains("seqwrite: the VMM had exited"), "{e}");
    }

    #[test]
    fn bench_memory_must_be_ram_in_the_guests_e820_map() {
        let mut l = run_lines(0);
        l.retain(|l| !l.text.starts_with("probe: e820 0x100000"));
        l.extend(lines(&[("probe: e820 0x100000 0x400000 1", 0.0, 0)]));
        let e = parse_phases(&l, EXPECT).unwrap_err().to_string();
        assert!(e.contains("0x800000..0x900000"), "{e}");
    }

    #[test]
    fn line_clock_splits_chunks_and_samples_bench_lines_only() {
        let mut c = LineClock::new(None);
        c.feed(b"probe: boot=pvh\r\nprobe: bench seq");
        c.feed(b"read start\npartial");
        let l = c.take();
        assert_eq!(
            l.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["probe: boot=pvh", "probe: bench seqread start"]
        );
        assert!(l[0].cpu.is_none());
        let threads = &l[1].cpu.as_ref().unwrap().0;
        assert!(threads.values().any(|&(vcpu, ns)| !vcpu && ns > 0), "this process has used CPU: {threads:?}");
    }

    fn result(vmm: &'static str, run: u32, iops: f64) -> RunResult {
        let phase = |name: &str, seconds: f64| Phase {
            name: name.into(),
            bytes: 4096 * 1000,
            requests: 1000,
            seconds,
            cpu_seconds: 0.05,
            device_cpu_seconds: 0.01,
            kicks: 1000,
            irqs: 1000,
        };
        RunResult { vmm, run, wall_s: 1.0, phases: vec![phase("seqread", 0.1), phase("randread", 1000.0 / iops)] }
    }

    #[test]
    fn the_peer_runs_second_in_odd_runs_and_first_in_even_ones() {
        assert_eq!((1..=4).map(peer_first).collect::<Vec<_>>(), [false, true, false, true]);
        assert_eq!(Peer::Unconfined.name(), "shoji-unconfined");
        assert_eq!(Peer::Qemu.name(), "qemu");
        assert!(check_peer(Some(Peer::Unconfined), true).is_ok());
        assert!(check_peer(Some(Peer::Qemu), false).is_ok());
        let e = check_peer(Some(Peer::Unconfined), false).unwrap_err().to_string();
        assert!(e.starts_with("peer: ") && e.contains("SHOJI_SECCOMP=off"), "{e}");
    }

    #[test]
    fn paired_ratios_divide_within_a_run_only() {
        let p = Peer::Unconfined.name();
        let r = vec![
            result("shoji", 1, 9000.0),
            result(p, 1, 10000.0),
            result(p, 2, 8000.0),
            result("shoji", 2, 8000.0),
            // A run without its pair counts for neither side's ratio.
            result("shoji", 3, 1.0),
        ];
        let v = paired_ratios(&r, p, "randread", 0);
        assert_eq!(v.len(), 2);
        assert!(close(v[0], 0.9) && close(v[1], 1.0), "{v:?}");
        assert!(paired_ratios(&r, "qemu", "randread", 0).is_empty());
        assert!(paired_ratios(&r, p, "seqwrite", 0).is_empty());
    }

    #[test]
    fn an_unconfined_peer_is_named_in_the_header_and_the_ratio_columns() {
        let opts = DevicesOpts { mib: 1, ios: 1000, qd: 8, runs: 2, peer: Some(Peer::Unconfined), json: false };
        let machine = Machine {
            nproc: 2,
            cpu: "cpu".into(),
            kernel: "6".into(),
            kvm: "kvm".into(),
            loadavg: "0.1 0.1 0.1".into(),
            qemu: None,
        };
        let p = Peer::Unconfined.name();
        let results =
            vec![result("shoji", 1, 9000.0), result(p, 1, 10000.0), result(p, 2, 9000.0), result("shoji", 2, 9000.0)];
        let report = Report {
            opts: &opts,
            command: "shoji bench devices --peer unconfined".into(),
            machine,
            qemu_command: None,
            results,
            peer_error: None,
        };
        let md = report.markdown();
        assert!(md.contains("- Peer: Shoji unconfined: the same binary and VM with the VMM's confinement off"), "{md}");
        assert!(!md.contains("QEMU"), "{md}");
        assert!(md.contains("| Shoji | Shoji unconfined | confined/unconfined | confined/unconfined, paired runs |"));
        // IOPS medians 9000 and 9500; the pairs 0.9 and 1.0.
        let iops = md.lines().find(|l| l.contains("| IOPS |")).unwrap();
        assert!(iops.ends_with(&format!("| {:.3} | 0.950 (0.900–1.000) |", 9000.0 / 9500.0)), "{iops}");
        assert!(md.contains("| shoji-unconfined | 2 |"), "per-run rows name the peer: {md}");
        let json = report.json();
        assert!(json.contains("\"peer\": \"shoji-unconfined\""), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["runs"][1]["vmm"], "shoji-unconfined");
    }

    #[test]
    fn spread_and_fields() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(vec![]), None);
        assert_eq!(field("probe: bench x end bytes=12 requests=3", "requests"), Some(3));
        assert_eq!(field("probe: bench x end bytes=12", "byte"), None);
        assert_eq!(shell_quote("blkbench mib=1"), "'blkbench mib=1'");
        assert_eq!(shell_quote("--mib=4"), "--mib=4");
        assert_eq!(json_str("a\"b\n"), "\"a\\\"b\\u000a\"");
    }
}
