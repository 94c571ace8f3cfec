//! `shoji bench vsock`: round-trip latency and throughput both ways over Shoji's hybrid vsock
//! device, with the host CPU the VMM spends per round trip and per MiB, next to a baseline of
//! two host threads on a plain unix socket pair.
//!
//! The guest is the probe's `vsockbench` mode (vmm/testkit/vsockbench.c): it accepts one
//! connection, echoes `rounds` messages, drops `bytes` bytes and acknowledges them, then sends
//! `bytes` bytes. Everything is timed on the host, by one client thread that connects to the
//! VMM's unix socket (`CONNECT <port>`) and drives the phases; it samples the CPU time of every
//! other thread of this process (the VMM: vCPU, device and main threads) at each phase's ends.
//!
//! The baseline runs the same client against a host thread that does what the guest does over
//! a unix socket pair; its CPU figure is that thread's. It is the floor for any design that
//! hands a host process a unix stream (the host side of a hybrid vsock is exactly that), with
//! no VMM, no guest and no virtqueue in between.
//!
//! QEMU is not a peer here: its virtio-vsock device is vhost-vsock-pci, which needs the
//! kernel's vhost-vsock (`/dev/vhost-vsock`) and is reached through AF_VSOCK sockets, not a
//! unix socket; the report says whether this host has it.
use super::{command_line, json_str, machine, spread, tail, CpuSample, Line, LineClock, Machine, Scratch};
use anyhow::{anyhow, bail, Context, Result};
use shoji_vmm::{testkit, SerialOut, StopReason, VmConfig};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The guest port the probe listens on.
const PORT: u32 = 5001;
/// The device's largest packet payload, and the host's write and read size for the streams.
const CHUNK: usize = 64 << 10;
/// vsockbench.c's stream stamps.
const SINK_TAG: u64 = 0x5653_494e_0000_0000;
const SOURCE_TAG: u64 = 0x5653_4f55_0000_0000;
const GUEST_MIB: u64 = 128;
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// Any single read or write of the client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// For the VMM to come up and the guest to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const VHOST_VSOCK: &str = "/dev/vhost-vsock";

#[derive(Clone, Debug)]
pub struct VsockOpts {
    pub rounds: u32,
    pub warmup: u32,
    pub msg: u32,
    pub mib: u32,
    /// How many times the guest checks for a received packet before it halts, whenever it waits.
    pub poll: u32,
    pub runs: u32,
    pub json: bool,
}

impl VsockOpts {
    fn bytes(&self) -> u64 {
        u64::from(self.mib) << 20
    }
}

fn guest_cmdline(o: &VsockOpts) -> String {
    format!("vsockbench port={PORT} rounds={} msg={} bytes={} poll={}", o.rounds + o.warmup, o.msg, o.bytes(), o.poll)
}

/// The sink stream: the le64 word at every 8-byte-aligned offset W is SINK_TAG | W.
fn sink_stream(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len.div_ceil(8) as u64).flat_map(|w| (SINK_TAG | (w * 8)).to_le_bytes()).collect();
    v.truncate(len);
    v
}

/// What every source packet carries: 64 KiB of le64 SOURCE_TAG | W words.
fn source_block() -> Vec<u8> {
    (0..(CHUNK / 8) as u64).flat_map(|w| (SOURCE_TAG | (w * 8)).to_le_bytes()).collect()
}

/// Whether `data`, found at offset `pos` of the source stream, is what the guest sends there.
fn source_matches(block: &[u8], mut pos: usize, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let at = pos % block.len();
        let n = data.len().min(block.len() - at);
        if data[..n] != block[at..at + n] {
            return false;
        }
        data = &data[n..];
        pos += n;
    }
    true
}

/// One timed phase: wall seconds and CPU seconds (all measured threads; those that are not
/// vCPU threads).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timed {
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub device_cpu_seconds: f64,
}

impl Timed {
    fn new(t0: Instant, t1: Instant, c0: &CpuSample, c1: &CpuSample) -> Self {
        let (cpu_seconds, device_cpu_seconds) = c0.until(c1);
        Timed { seconds: t1.duration_since(t0).as_secs_f64().max(1e-9), cpu_seconds, device_cpu_seconds }
    }
}

/// What the client measured in one run.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// Round-trip times of the timed rounds, µs, in order.
    pub rtt_us: Vec<f64>,
    pub echo: Timed,
    pub sink: Timed,
    pub source: Timed,
    pub bytes: u64,
}

/// Nearest-rank percentile of `v` (sorted), `p` in 0..=100.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Measured {
    fn sorted_rtts(&self) -> Vec<f64> {
        let mut v = self.rtt_us.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn mib(&self) -> f64 {
        self.bytes as f64 / (1u64 << 20) as f64
    }
    /// The summary metrics, in [`METRICS`] order.
    fn metrics(&self) -> [f64; METRICS.len()] {
        let r = self.sorted_rtts();
        let n = self.rtt_us.len().max(1) as f64;
        let mb = self.bytes as f64 / 1e6;
        [
            percentile(&r, 50.0),
            percentile(&r, 99.0),
            self.echo.cpu_seconds * 1e6 / n,
            self.echo.device_cpu_seconds * 1e6 / n,
            mb / self.sink.seconds,
            self.sink.cpu_seconds * 1e6 / self.mib(),
            self.sink.device_cpu_seconds * 1e6 / self.mib(),
            mb / self.source.seconds,
            self.source.cpu_seconds * 1e6 / self.mib(),
            self.source.device_cpu_seconds * 1e6 / self.mib(),
        ]
    }
}

/// (phase, metric). The baseline has every metric: it has no vCPU, so its server thread's CPU
/// stands in both CPU rows (against all VMM threads, and against the device side alone, which
/// does the same socket reads and writes without emulating the guest).
const METRICS: [(&str, &str); 10] = [
    ("echo", "round trip p50, µs"),
    ("echo", "round trip p99, µs"),
    ("echo", "host CPU µs/round trip, all VMM threads"),
    ("echo", "host CPU µs/round trip, VMM threads outside vCPUs"),
    ("sink", "MB/s"),
    ("sink", "host CPU µs/MiB, all VMM threads"),
    ("sink", "host CPU µs/MiB, VMM threads outside vCPUs"),
    ("source", "MB/s"),
    ("source", "host CPU µs/MiB, all VMM threads"),
    ("source", "host CPU µs/MiB, VMM threads outside vCPUs"),
];

/// Drives the three phases over `s` (connected to the guest, or to the baseline's server) and
/// checks every byte that comes back. `sample` is the CPU time of whatever serves the stream.
fn drive(s: &UnixStream, o: &VsockOpts, sink: &[u8], sample: &dyn Fn() -> CpuSample) -> Result<Measured> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut r = s;
    let mut w = s;
    let n = o.msg as usize;
    let mut msg = vec![0u8; n];
    let mut back = vec![0u8; n];
    let mut m = Measured { bytes: o.bytes(), ..Measured::default() };
    m.rtt_us.reserve(o.rounds as usize);

    // Echo: the warm-up rounds first, untimed.
    let mut c0 = sample();
    let mut t0 = Instant::now();
    for i in 0..o.warmup + o.rounds {
        for (j, b) in msg.iter_mut().enumerate() {
            *b = (i as usize * 31 + j * 7) as u8;
        }
        if i == o.warmup {
            c0 = sample();
            t0 = Instant::now();
        }
        let t = Instant::now();
        w.write_all(&msg).with_context(|| format!("echo {i}: write"))?;
        r.read_exact(&mut back).with_context(|| format!("echo {i}: read"))?;
        if i >= o.warmup {
            m.rtt_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        if back != msg {
            bail!("echo {i}: the reply differs from the message");
        }
    }
    let t1 = Instant::now();
    m.echo = Timed::new(t0, t1, &c0, &sample());

    // Sink: the stream in 64 KiB writes, timed up to the acknowledgement.
    let c0 = sample();
    let t0 = Instant::now();
    for chunk in sink.chunks(CHUNK) {
        w.write_all(chunk).context("sink: write")?;
    }
    let mut ack = [0u8; 16];
    r.read_exact(&mut ack).context("sink: reading the acknowledgement")?;
    let t1 = Instant::now();
    m.sink = Timed::new(t0, t1, &c0, &sample());
    let got = u64::from_le_bytes(ack[..8].try_into().unwrap_or_default());
    let mismatches = u64::from_le_bytes(ack[8..].try_into().unwrap_or_default());
    if got != sink.len() as u64 || mismatches != 0 {
        bail!("sink: the guest acknowledged {got} bytes of {} with {mismatches} wrong stamps", sink.len());
    }

    // Source: the go byte, then every byte until the expected count.
    let block = source_block();
    let mut buf = vec![0u8; 4 * CHUNK];
    let total = o.bytes() as usize;
    let mut pos = 0;
    let c0 = sample();
    let t0 = Instant::now();
    w.write_all(b"G").context("source: write")?;
    while pos < total {
        let want = buf.len().min(total - pos);
        let k = match r.read(&mut buf[..want]) {
            Ok(0) => bail!("source: end of stream after {pos} of {total} bytes"),
            Ok(k) => k,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("source: read after {pos} of {total} bytes")),
        };
        if !source_matches(&block, pos, &buf[..k]) {
            bail!("source: wrong bytes at {pos}..{}", pos + k);
        }
        pos += k;
    }
    let t1 = Instant::now();
    m.source = Timed::new(t0, t1, &c0, &sample());
    // Then end of stream, nothing more.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).context("source: waiting for end of stream")?;
    if !rest.is_empty() {
        bail!("source: {} bytes more than expected", rest.len());
    }
    Ok(m)
}

/// This thread's id.
fn gettid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Every thread of this process except `skip`.
fn sample_others(skip: Option<u32>) -> CpuSample {
    let mut s = super::sample_cpu(None);
    if let Some(t) = skip {
        s.0.remove(&t);
    }
    s
}

/// Thread `tid` of this process alone (counted as a non-vCPU thread).
fn sample_thread(tid: u32) -> CpuSample {
    let ns = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    CpuSample(ns.map(|ns| (tid, (false, ns))).into_iter().collect())
}

/// Connects to the VMM's socket and asks for the guest's port until the guest answers, while
/// the VMM starts and the guest driver comes up (the device drops streams on its reset).
fn connect(sock: &Path) -> Result<(UnixStream, u32)> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut last = String::from("the socket never appeared");
    while Instant::now() < deadline {
        match try_connect(sock) {
            Ok(c) => return Ok(c),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no connection to guest port {PORT} within {CONNECT_TIMEOUT:?}: {last}")
}

fn try_connect(sock: &Path) -> Result<(UnixStream, u32)> {
    let s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(format!("CONNECT {PORT}\n").as_bytes())?;
    // Byte by byte: nothing after the line may be consumed here.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        if (&s).read(&mut b)? == 0 {
            bail!("end of stream before OK");
        }
        if b[0] == b'\n' {
            let text = String::from_utf8_lossy(&line).into_owned();
            let port = text.strip_prefix("OK ").and_then(|p| p.parse().ok());
            return port.map(|p| (s, p)).ok_or_else(|| anyhow!("unexpected answer {text:?}"));
        }
        line.push(b[0]);
    }
    bail!("answer too long")
}

/// The guest's report (vsockbench.c's last lines), for the per-run table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestStats {
    pub echo_packets: u64,
    pub sink_packets: u64,
    pub source_packets: u64,
    pub irqs: u64,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    pub halts: u64,
    pub polled: u64,
    pub credit_waits: u64,
}

fn guest_stats(lines: &[Line], o: &VsockOpts) -> Result<GuestStats> {
    if let Some(l) = lines.iter().find(|l| l.text.contains("probe: vsockbench error")) {
        bail!("guest: {}", l.text.trim());
    }
    let find = |p: &str| {
        lines.iter().find(|l| l.text.starts_with(p)).map(|l| l.text.as_str()).ok_or_else(|| anyhow!("no {p:?} line"))
    };
    let num = |l: &str, k: &str| super::field(l, k).ok_or_else(|| anyhow!("no {k}= in {l:?}"));
    let echo = find("probe: vsockbench echo ")?;
    let sink = find("probe: vsockbench sink ")?;
    let source = find("probe: vsockbench source ")?;
    let stats = find("probe: vsockbench stats ")?;
    let echo_bytes = u64::from(o.rounds + o.warmup) * u64::from(o.msg);
    if num(echo, "bytes")? != echo_bytes || num(sink, "bytes")? != o.bytes() || num(source, "bytes")? != o.bytes() {
        bail!("guest: byte counts differ from the workload: {echo:?} {sink:?} {source:?}");
    }
    if num(sink, "mismatches")? != 0 {
        bail!("guest: {sink}");
    }
    Ok(GuestStats {
        echo_packets: num(echo, "packets")?,
        sink_packets: num(sink, "packets")?,
        source_packets: num(source, "packets")?,
        irqs: num(stats, "irqs")?,
        rx_kicks: num(stats, "rx_kicks")?,
        tx_kicks: num(stats, "tx_kicks")?,
        halts: num(stats, "halts")?,
        polled: num(stats, "polled")?,
        credit_waits: num(stats, "credit_waits")?,
    })
}

#[derive(Clone, Debug)]
struct RunResult {
    kind: &'static str,
    run: u32,
    measured: Measured,
    guest: Option<GuestStats>,
}

fn run_shoji(o: &VsockOpts, dir: &Path, sink: &Arc<Vec<u8>>, run: u32) -> Result<RunResult> {
    let sock = dir.join("vsock.sock");
    let clock = LineClock::new(None);
    let kernel = testkit::guest("probe").ok_or_else(|| anyhow!("no built-in probe guest"))?;
    let mut cfg = VmConfig::new(kernel);
    cfg.cmdline = guest_cmdline(o);
    cfg.memory_mib = GUEST_MIB;
    cfg.serial = SerialOut::Writer(Box::new(clock.clone()));
    cfg.vsock = Some(sock.clone());
    cfg.timeout = Some(VM_TIMEOUT);
    let (oc, sink) = (o.clone(), sink.clone());
    let client = std::thread::Builder::new().name("bench-client".into()).spawn(move || {
        let me = gettid();
        let (s, _) = connect(&sock)?;
        drive(&s, &oc, &sink, &|| sample_others(me))
    })?;
    let outcome = shoji_vmm::run(cfg).context("shoji");
    let measured = client.join().map_err(|_| anyhow!("the client thread panicked"))?;
    let outcome = outcome?;
    let lines = clock.take();
    let measured = measured.with_context(|| format!("shoji run {run}: client ({})", tail(&lines)))?;
    if outcome.reason != StopReason::Reset || !lines.iter().any(|l| l.text == testkit::PROBE_DONE) {
        bail!("shoji: the guest stopped with {:?} before finishing: {}", outcome.reason, tail(&lines));
    }
    let guest = guest_stats(&lines, o).with_context(|| format!("shoji run {run}"))?;
    Ok(RunResult { kind: "shoji", run, measured, guest: Some(guest) })
}

/// The baseline's server: what the guest does, on a plain stream.
fn baseline_server(s: UnixStream, o: &VsockOpts) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let (mut r, mut w) = (&s, &s);
    let mut buf = vec![0u8; CHUNK];
    let mut read = |buf: &mut [u8]| -> Result<usize> {
        loop {
            match r.read(buf) {
                Ok(0) => bail!("baseline: end of stream"),
                Ok(k) => return Ok(k),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut left = u64::from(o.rounds + o.warmup) * u64::from(o.msg);
    while left > 0 {
        let k = read(&mut buf[..CHUNK.min(left as usize)])?;
        w.write_all(&buf[..k])?;
        left -= k as u64;
    }
    // The guest checks one aligned word per packet; so does this.
    let (mut got, mut mismatches) = (0u64, 0u64);
    while got < o.bytes() {
        let k = read(&mut buf[..CHUNK.min((o.bytes() - got) as usize)])?;
        let off = ((8 - (got & 7)) & 7) as usize;
        if off + 8 <= k {
            let word = u64::from_le_bytes(buf[off..off + 8].try_into().unwrap_or_default());
            mismatches += u64::from(word != SINK_TAG | (got + off as u64));
        }
        got += k as u64;
    }
    let mut ack = [0u8; 16];
    ack[..8].copy_from_slice(&got.to_le_bytes());
    ack[8..].copy_from_slice(&mismatches.to_le_bytes());
    w.write_all(&ack)?;
    read(&mut buf[..1])?;
    let block = source_block();
    let mut sent = 0u64;
    while sent < o.bytes() {
        let n = CHUNK.min((o.bytes() - sent) as usize);
        w.write_all(&block[..n])?;
        sent += n as u64;
    }
    // End of stream for the client, then stay until it has taken its last CPU sample and closed.
    s.shutdown(std::net::Shutdown::Write)?;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(k) => bail!("baseline: {k} unexpected bytes after the source phase"),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn run_baseline(o: &VsockOpts, sink: &[u8], run: u32) -> Result<RunResult> {
    let (client, server) = UnixStream::pair()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let oc = o.clone();
    let handle = std::thread::Builder::new().name("bench-baseline".into()).spawn(move || {
        let _ = tx.send(gettid());
        baseline_server(server, &oc)
    })?;
    let tid = rx.recv().ok().flatten().ok_or_else(|| anyhow!("baseline: no server thread id"))?;
    let measured = drive(&client, o, sink, &|| sample_thread(tid));
    drop(client);
    let served = handle.join().map_err(|_| anyhow!("the baseline server panicked"))?;
    let measured = measured.with_context(|| format!("baseline run {run}"))?;
    served.with_context(|| format!("baseline run {run}: server"))?;
    Ok(RunResult { kind: "baseline", run, measured, guest: None })
}

fn qemu_note() -> String {
    if Path::new(VHOST_VSOCK).exists() {
        format!(
            "not measured: this host has {VHOST_VSOCK}, but the bench has no QEMU peer for vsock (QEMU's \
             vhost-vsock-pci is reached through AF_VSOCK sockets, not a unix socket)"
        )
    } else {
        format!(
            "not measured: QEMU's virtio-vsock device (vhost-vsock-pci) needs the kernel's vhost-vsock \
             ({VHOST_VSOCK}), which this host does not have"
        )
    }
}

struct Report<'a> {
    opts: &'a VsockOpts,
    command: String,
    machine: Machine,
    results: Vec<RunResult>,
}

/// Per kind: each metric's values over the runs.
fn values(results: &[RunResult], kind: &str, i: usize) -> Vec<f64> {
    results.iter().filter(|r| r.kind == kind).map(|r| r.measured.metrics()[i]).filter(|v| v.is_finite()).collect()
}

fn cell(v: Option<(f64, f64, f64)>) -> String {
    let f = |x: f64| if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") };
    match v {
        None => "–".into(),
        Some((m, lo, hi)) => format!("{} ({}–{})", f(m), f(lo), f(hi)),
    }
}

impl Report<'_> {
    fn workload(&self, phase: &str) -> String {
        let o = self.opts;
        match phase {
            "echo" => format!("echo, {} B × {} round trips", o.msg, o.rounds),
            "sink" => format!("host → guest, {} MiB in 64 KiB writes", o.mib),
            _ => format!("guest → host, {} MiB in 64 KiB packets", o.mib),
        }
    }

    fn markdown(&self) -> String {
        let o = self.opts;
        let mut s = self.machine.header(&self.command);
        let _ = writeln!(
            s,
            "- Guest: the probe test guest's `vsockbench` mode (`{}`), 1 vCPU, {GUEST_MIB} MiB, Shoji's hybrid \
             vsock device (unix socket in {})",
            guest_cmdline(o),
            std::env::temp_dir().display()
        );
        let _ = writeln!(
            s,
            "- Client: one host thread on the unix socket (`CONNECT {PORT}`); echo: write {} B, read the echo, \
             {} round trips timed after {} untimed; host → guest: {} MiB in 64 KiB writes, timed to the guest's \
             16-byte acknowledgement; guest → host: timed from the 1-byte go signal to the last byte",
            o.msg, o.rounds, o.warmup, o.mib
        );
        let _ = writeln!(
            s,
            "- Baseline: the same client against a host thread on a unix socket pair doing what the guest does \
             (echo what it reads; read and acknowledge; write in 64 KiB writes); its CPU is that thread's, in \
             both CPU rows (it has no vCPU)"
        );
        let _ = writeln!(s, "- QEMU: {}", qemu_note());
        let _ = writeln!(s, "- Runs: {} each, interleaved; cells are median (min–max) over runs", o.runs);
        let _ = writeln!(s);
        let _ = writeln!(s, "| workload | metric | Shoji | unix socket baseline | Shoji/baseline |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let mut last = "";
        for (i, &(phase, metric)) in METRICS.iter().enumerate() {
            let sv = spread(values(&self.results, "shoji", i));
            let bv = spread(values(&self.results, "baseline", i));
            let ratio = match (sv, bv) {
                (Some(a), Some(b)) if b.0 > 0.0 => format!("{:.2}", a.0 / b.0),
                _ => "–".into(),
            };
            let label = if phase != last { self.workload(phase) } else { String::new() };
            last = phase;
            let _ = writeln!(s, "| {label} | {metric} | {} | {} | {ratio} |", cell(sv), cell(bv));
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Ratios are of the medians: above 1 in µs (latency, CPU), Shoji costs more; below 1 in MB/s, Shoji is \
             slower."
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Per run (CPU: all VMM threads / outside vCPUs; packets, interrupts, notifications, halts and polls as \
             the guest counted them):"
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| kind | run | p50 µs | p99 µs | CPU µs/rt | h→g MB/s | CPU µs/MiB | g→h MB/s | CPU µs/MiB | \
             packets echo/h→g/g→h | irqs | rx kicks | tx kicks | halts | polled | credit waits |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.results {
            let v = r.measured.metrics();
            let g = r.guest.as_ref().map_or_else(
                || "– | – | – | – | – | – | –".to_string(),
                |g| {
                    format!(
                        "{}/{}/{} | {} | {} | {} | {} | {} | {}",
                        g.echo_packets,
                        g.sink_packets,
                        g.source_packets,
                        g.irqs,
                        g.rx_kicks,
                        g.tx_kicks,
                        g.halts,
                        g.polled,
                        g.credit_waits
                    )
                },
            );
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {:.0} / {:.0} | {:.1} | {:.0} / {:.0} | {g} |",
                r.kind, r.run, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]
            );
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
            "  \"machine\": {{\"nproc\": {}, \"cpu\": {}, \"kernel\": {}, \"kvm\": {}, \"pvm\": {}, \"loadavg\": {}}},",
            m.nproc,
            json_str(&m.cpu),
            json_str(&m.kernel),
            json_str(&m.kvm),
            shoji_vmm::host::is_pvm(),
            json_str(&m.loadavg)
        );
        let _ = writeln!(
            s,
            "  \"config\": {{\"rounds\": {}, \"warmup\": {}, \"msg\": {}, \"mib\": {}, \"runs\": {}, \"guest_cmdline\": {}}},",
            o.rounds,
            o.warmup,
            o.msg,
            o.mib,
            o.runs,
            json_str(&guest_cmdline(o))
        );
        let _ = writeln!(s, "  \"qemu\": {},", json_str(&qemu_note()));
        s.push_str("  \"runs\": [\n");
        let runs: Vec<String> = self
            .results
            .iter()
            .map(|r| {
                let me = &r.measured;
                let v = me.metrics();
                let t = |t: &Timed| {
                    format!(
                        "{{\"seconds\": {:.6}, \"cpu_seconds\": {:.6}, \"device_cpu_seconds\": {:.6}}}",
                        t.seconds, t.cpu_seconds, t.device_cpu_seconds
                    )
                };
                let guest = r.guest.as_ref().map_or_else(
                    || "null".to_string(),
                    |g| {
                        format!(
                            "{{\"echo_packets\": {}, \"sink_packets\": {}, \"source_packets\": {}, \"irqs\": {}, \
                             \"rx_kicks\": {}, \"tx_kicks\": {}, \"halts\": {}, \"polled\": {}, \"credit_waits\": {}}}",
                            g.echo_packets,
                            g.sink_packets,
                            g.source_packets,
                            g.irqs,
                            g.rx_kicks,
                            g.tx_kicks,
                            g.halts,
                            g.polled,
                            g.credit_waits
                        )
                    },
                );
                format!(
                    "    {{\"kind\": \"{}\", \"run\": {}, \"rounds\": {}, \"bytes\": {}, \"rtt_p50_us\": {:.2}, \
                     \"rtt_p99_us\": {:.2}, \"echo_cpu_us_per_round_trip\": {:.3}, \"echo_device_cpu_us_per_round_trip\": {:.3}, \
                     \"sink_mb_per_s\": {:.2}, \"sink_cpu_us_per_mib\": {:.2}, \"sink_device_cpu_us_per_mib\": {:.2}, \
                     \"source_mb_per_s\": {:.2}, \"source_cpu_us_per_mib\": {:.2}, \"source_device_cpu_us_per_mib\": {:.2}, \
                     \"echo\": {}, \"sink\": {}, \"source\": {}, \"guest\": {}}}",
                    r.kind,
                    r.run,
                    me.rtt_us.len(),
                    me.bytes,
                    v[0],
                    v[1],
                    v[2],
                    v[3],
                    v[4],
                    v[5],
                    v[6],
                    v[7],
                    v[8],
                    v[9],
                    t(&me.echo),
                    t(&me.sink),
                    t(&me.source),
                    guest
                )
            })
            .collect();
        s.push_str(&runs.join(",\n"));
        s.push_str("\n  ]\n}\n");
        s
    }
}

pub fn vsock(o: VsockOpts) -> Result<()> {
    if o.rounds == 0 || o.runs == 0 || o.mib == 0 || !(1..=CHUNK as u32).contains(&o.msg) {
        bail!("--rounds, --mib and --runs must be at least 1, and --msg 1..={CHUNK}");
    }
    if u64::from(o.rounds + o.warmup) * u64::from(o.msg) > u64::from(u32::MAX) || o.mib >= 4096 {
        bail!("the guest counts in 32 bits: (--rounds + --warmup) × --msg and --mib MiB must stay under 4 GiB");
    }
    let machine = machine(None);
    let command = command_line();
    let dir = std::env::temp_dir().join(format!("shoji-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let sink = Arc::new(sink_stream(o.bytes() as usize));
    if !o.json {
        eprintln!("shoji: bench vsock: QEMU {}", qemu_note());
    }
    let mut results = Vec::new();
    for run in 1..=o.runs {
        for kind in ["shoji", "baseline"] {
            let r =
                if kind == "shoji" { run_shoji(&o, &scratch.0, &sink, run)? } else { run_baseline(&o, &sink, run)? };
            if !o.json {
                let v = r.measured.metrics();
                eprintln!(
                    "{kind:8} run {run}: echo p50 {:.1} µs p99 {:.1} µs, h→g {:.1} MB/s, g→h {:.1} MB/s",
                    v[0], v[1], v[4], v[7]
                );
            }
            results.push(r);
        }
    }
    let report = Report { opts: &o, command, machine, results };
    print!("{}", if o.json { report.json() } else { report.markdown() });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn streams_match_the_guests_stamps() {
        let s = sink_stream(20);
        assert_eq!(&s[..8], &SINK_TAG.to_le_bytes());
        assert_eq!(&s[8..16], &(SINK_TAG | 8).to_le_bytes());
        assert_eq!(s.len(), 20);
        let b = source_block();
        assert_eq!(b.len(), CHUNK);
        assert_eq!(&b[CHUNK - 8..], &(SOURCE_TAG | (CHUNK as u64 - 8)).to_le_bytes());
        // A read can start anywhere and wrap over a packet boundary.
        let stream: Vec<u8> = b.iter().chain(b.iter()).copied().collect();
        assert!(source_matches(&b, 100, &stream[100..CHUNK + 300]));
        let mut bad = stream[100..CHUNK + 300].to_vec();
        bad[CHUNK] ^= 1;
        assert!(!source_matches(&b, 100, &bad));
    }

    #[test]
    fn metrics_per_round_trip_and_per_mib() {
        let m = Measured {
            rtt_us: vec![30.0, 10.0, 20.0, 40.0],
            echo: Timed { seconds: 1.0, cpu_seconds: 0.0004, device_cpu_seconds: 0.0001 },
            sink: Timed { seconds: 0.5, cpu_seconds: 0.2, device_cpu_seconds: 0.1 },
            source: Timed { seconds: 0.25, cpu_seconds: 0.1, device_cpu_seconds: 0.05 },
            bytes: 4 << 20,
        };
        let v = m.metrics();
        assert_eq!((v[0], v[1]), (20.0, 40.0));
        assert!((v[2] - 100.0).abs() < 1e-9 && (v[3] - 25.0).abs() < 1e-9, "{v:?}");
        assert!((v[4] - 4.194304 / 0.5).abs() < 1e-9, "{v:?}");
        assert!((v[5] - 50_000.0).abs() < 1e-6 && (v[6] - 25_000.0).abs() < 1e-6, "{v:?}");
        assert!((v[7] - 4.194304 / 0.25).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn baseline_serves_the_client_like_the_guest() {
        let o = VsockOpts { rounds: 5, warmup: 2, msg: 100, mib: 1, poll: 0, runs: 1, json: true };
        let sink = sink_stream(o.bytes() as usize);
        let r = run_baseline(&o, &sink, 1).unwrap();
        assert_eq!(r.measured.rtt_us.len(), 5);
        assert!(r.measured.metrics().iter().all(|v| v.is_finite() && *v >= 0.0), "{:?}", r.measured);
    }

    #[test]
    fn guest_report_lines_are_checked() {
        let o = VsockOpts { rounds: 8, warmup: 2, msg: 10, mib: 1, poll: 0, runs: 1, json: true };
        let mk = |t: &[&str]| -> Vec<Line> {
            t.iter().map(|t| Line { text: t.to_string(), at: Instant::now(), cpu: None }).collect()
        };
        let good = [
            "probe: vsockbench echo bytes=100 packets=10",
            "probe: vsockbench sink bytes=1048576 packets=17 mismatches=0",
            "probe: vsockbench source bytes=1048576 packets=16",
            "probe: vsockbench stats rx=40 tx=30 rx_kicks=2 tx_kicks=28 irqs=25 halts=26 polled=3 slot_waits=0 credit_waits=3 unexpected=0",
        ];
        let g = guest_stats(&mk(&good), &o).unwrap();
        assert_eq!((g.echo_packets, g.sink_packets, g.source_packets, g.irqs, g.halts), (10, 17, 16, 25, 26));
        let mut bad = good.to_vec();
        bad[1] = "probe: vsockbench sink bytes=1048576 packets=17 mismatches=2";
        assert!(guest_stats(&mk(&bad), &o).unwrap_err().to_string().contains("mismatches=2"));
        let mut short = good.to_vec();
        short[2] = "probe: vsockbench source bytes=65536 packets=1";
        assert!(guest_stats(&mk(&short), &o).unwrap_err().to_string().contains("byte counts"));
        let mut err = good.to_vec();
        err.push("probe: vsockbench error: no progress for 10 s phase=sink");
        assert!(guest_stats(&mk(&err), &o).unwrap_err().to_string().contains("no progress"));
    }
}
