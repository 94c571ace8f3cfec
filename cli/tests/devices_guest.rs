//! PCI and virtio devices seen from inside a guest: the probe test guest enumerates bus 0
//! (`pci` mode), drives a virtio-blk disk as a real driver does, with MSI-X interrupts
//! (`blk` mode), talks FUSE to a virtio-fs share (`fs` mode), and runs vsock streams both ways
//! (`vsock` mode); the host checks its report and the disk file, shared directory or sockets
//! afterwards. Needs /dev/kvm.
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECTOR: usize = 512;

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests boot real VMs and need /dev/kvm (read-write); it is missing on this host"
    );
}

/// Boots `guest` with `cmdline` and `disks`; a guest that hangs is stopped by --timeout.
fn boot(guest: &str, cmdline: &str, disks: &[String]) -> Output {
    boot_with(guest, cmdline, disks, &[])
}

/// [`boot`] with virtio-fs `shares` ("DIR[,tag=T][,ro]") after the disks.
fn boot_with(guest: &str, cmdline: &str, disks: &[String], shares: &[String]) -> Output {
    require_kvm();
    let mut args = vec!["boot", "--guest", guest, "--cmdline", cmdline, "--timeout", "60"];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    for s in shares {
        args.extend(["--share", s.as_str()]);
    }
    Command::new(env!("CARGO_BIN_EXE_shoji")).args(&args).env_remove("RUST_LOG").output().expect("run shoji")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory, removed when the test ends (also when it fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("shoji-devices-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The probe's "probe: KEY..." line; exactly one must exist.
fn probe_line<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("probe: {key}");
    let found: Vec<&str> = out.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(found.len(), 1, "expected one {prefix:?} line in guest output:\n{out}");
    found[0]
}

/// The number after `key=` in the probe's "probe: blk KEY=N" line.
fn blk_number(out: &str, key: &str) -> u64 {
    let line = probe_line(out, &format!("blk {key}="));
    line[format!("probe: blk {key}=").len()..].parse().unwrap_or_else(|_| panic!("bad number in {line:?}"))
}

/// A 1 MiB disk: sector 0 filled with 0xee, sectors 1..8 with a known pattern, the rest zero
/// except a marker in the last sector.
fn disk_image() -> Vec<u8> {
    let mut d = vec![0u8; 1 << 20];
    d[..SECTOR].fill(0xee);
    for (i, b) in d[SECTOR..9 * SECTOR].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_right(11) as u8;
    }
    let n = d.len();
    d[n - 16..].copy_from_slice(b"SHOJI-LAST-SECTR");
    d
}

/// What the probe writes to sector 0 (blk.c: blk_pattern).
fn probe_sector0() -> Vec<u8> {
    let magic = b"SHOJI-PROBE-SECTOR0";
    (0..SECTOR).map(|i| if i < magic.len() { magic[i] } else { (i * 7) as u8 }).collect()
}

/// The virtio-blk serial the VMM reports for a backing file (GET_ID, 20 bytes at most).
fn disk_id(path: &Path) -> String {
    let md = std::fs::metadata(path).unwrap();
    let mut id = format!("shoji-{:x}{:x}", md.dev(), md.ino());
    id.truncate(20);
    id
}

/// The probe drove the disk in slot 01, whose offer has VERSION_1, FLUSH and RO as expected.
fn check_features(out: &str, read_only: bool) {
    let line = probe_line(out, "blk slot=");
    let hex = line.strip_prefix("probe: blk slot=01 features=0x").unwrap_or_else(|| panic!("{line:?}"));
    let f = u64::from_str_radix(hex, 16).unwrap();
    assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1: {line}");
    assert_ne!(f & (1 << 9), 0, "VIRTIO_BLK_F_FLUSH: {line}");
    assert_eq!(f & (1 << 5) != 0, read_only, "VIRTIO_BLK_F_RO: {line}");
}

fn virtio_blk_lines(slot: &str, bar: &str) -> Vec<String> {
    [
        "1af4:1042 class=018000".to_string(),
        format!("bar0 mem={bar} size=0x8000"),
        "cap msix size=2 table=0:0x4000 pba=0:0x6000".into(),
        "cap virtio type=1 bar=0 off=0x0 len=0x38".into(),
        "cap virtio type=2 bar=0 off=0x3000 len=0x4 mult=4".into(),
        "cap virtio type=3 bar=0 off=0x1000 len=0x1".into(),
        "cap virtio type=4 bar=0 off=0x2000 len=0x1000".into(),
    ]
    .into_iter()
    .map(|l| format!("probe: pci {slot} {l}"))
    .collect()
}

#[test]
fn pci_bus_lists_host_bridge_and_virtio_blk_disks_with_capabilities() {
    let dir = Scratch::new("pci");
    let a = dir.file("a.img", &vec![0u8; 1 << 20]);
    let b = dir.file("b.img", &vec![0u8; 2 << 20]);
    let disks = [a.display().to_string(), format!("{},ro", b.display())];
    for guest in ["probe", "probe-bzimage"] {
        let o = boot(guest, "pci", &disks);
        let out = stdout(&o);
        assert!(o.status.success(), "{guest}: {o:?}");
        assert_eq!(stderr(&o), "", "{guest}: enumeration must not cause guest errors");
        let pci: Vec<&str> = out.lines().filter(|l| l.starts_with("probe: pci")).collect();
        let mut want = vec!["probe: pci 00 1b36:0008 class=060000".to_string()];
        want.extend(virtio_blk_lines("01", "0xc0000000"));
        want.extend(virtio_blk_lines("02", "0xc0008000"));
        want.push("probe: pci functions=3".into());
        assert_eq!(pci, want, "{guest}:\n{out}");
        assert!(out.ends_with("PROBE-DONE\n"), "{guest}: {out}");
    }

    // Without disks there is only the host bridge.
    let o = boot("probe", "pci", &[]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    let pci: Vec<&str> = out.lines().filter(|l| l.starts_with("probe: pci")).collect();
    assert_eq!(pci, ["probe: pci 00 1b36:0008 class=060000", "probe: pci functions=1"], "{out}");
}

/// Runs `blk` on a fresh copy of [`disk_image`] and checks what both sides saw.
fn check_blk_rw(guest: &str) {
    let dir = Scratch::new(&format!("blk-{guest}"));
    let before = disk_image();
    let disk = dir.file("disk.img", &before);
    let o = boot(guest, "blk", &[disk.display().to_string()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{guest}: {o:?}");
    assert_eq!(stderr(&o), "", "{guest}: the driver must not cause guest errors");
    assert!(!out.contains("probe: blk error"), "{guest}:\n{out}");
    assert!(!out.contains("probe: blk ro"), "{guest}:\n{out}");
    check_features(&out, false);
    let want_fnv = fnv1a(&before[SECTOR..9 * SECTOR]);
    assert_eq!(probe_line(&out, "blk capacity="), format!("probe: blk capacity=2048 read fnv={want_fnv:#x}"));
    assert_eq!(probe_line(&out, "blk verify"), "probe: blk verify sector0=ok");
    assert_eq!(probe_line(&out, "blk id="), format!("probe: blk id={}", disk_id(&disk)));
    assert!(disk_id(&disk).starts_with("shoji-"));
    assert_eq!(probe_line(&out, "blk status"), "probe: blk status out=0 flush=0 in=0 getid=0");
    // out, flush, in (sectors 1..8), in (sector 0 read back), get-id: one MSI-X interrupt each.
    let (irqs, requests) = (blk_number(&out, "irqs"), blk_number(&out, "requests"));
    assert_eq!(requests, 5, "{out}");
    assert!(irqs >= 4 && irqs >= requests, "{guest}: {irqs} MSI-X interrupts for {requests} requests:\n{out}");
    assert!(out.ends_with("PROBE-DONE\n"), "{guest}: {out}");

    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(after[..SECTOR], probe_sector0()[..], "{guest}: sector 0 holds the guest's pattern");
    assert!(after[SECTOR..] == before[SECTOR..], "{guest}: only sector 0 was written");
}

#[test]
fn blk_driver_writes_flushes_reads_and_gets_id_with_msix_interrupts() {
    check_blk_rw("probe");
}

#[test]
fn blk_driver_works_from_the_bzimage_entry_too() {
    check_blk_rw("probe-bzimage");
}

#[test]
fn blk_read_only_disk_rejects_the_write_and_stays_unchanged() {
    let dir = Scratch::new("blk-ro");
    let before = disk_image();
    let disk = dir.file("ro.img", &before);
    let o = boot("probe", "blk", &[format!("{},ro", disk.display())]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(!out.contains("probe: blk error"), "{out}");
    check_features(&out, true);
    assert!(out.lines().any(|l| l == "probe: blk ro"), "{out}");
    assert_eq!(probe_line(&out, "blk ro write"), "probe: blk ro write rejected status=1");
    let want_fnv = fnv1a(&before[SECTOR..9 * SECTOR]);
    assert_eq!(probe_line(&out, "blk capacity="), format!("probe: blk capacity=2048 read fnv={want_fnv:#x}"));
    assert_eq!(probe_line(&out, "blk id="), format!("probe: blk id={}", disk_id(&disk)));
    assert_eq!(probe_line(&out, "blk status"), "probe: blk status out=1 flush=0 in=0 getid=0");
    let (irqs, requests) = (blk_number(&out, "irqs"), blk_number(&out, "requests"));
    assert_eq!(requests, 4, "{out}");
    assert!(irqs >= 4, "{irqs} MSI-X interrupts for {requests} requests:\n{out}");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
    // The VMM logs the rejected write as a guest error, and nothing else.
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("write to a read-only disk"), "{err}");
    assert!(std::fs::read(&disk).unwrap() == before, "a read-only disk must not change");
}

/// What the host puts in a share for the `fs` mode: "hello.txt", 3000 bytes starting with a
/// known first line.
fn hello_txt() -> Vec<u8> {
    let mut d = b"hello from the host\n".to_vec();
    let mut i = 0u32;
    while d.len() < 3000 {
        d.push(b'a' + (i.wrapping_mul(2_654_435_761).rotate_right(7) % 26) as u8);
        i += 1;
        if i.is_multiple_of(61) {
            d.push(b'\n');
        }
    }
    d.truncate(3000);
    d
}

/// What the probe writes to "from-guest.txt" (fs.c: FS_WRITE_TEXT).
const FS_WRITE_TEXT: &[u8] = b"written by the probe\n";

/// The number after `key=` in the probe's "probe: fs irqs=N requests=M" line.
fn fs_counter(out: &str, key: &str) -> u64 {
    let line = probe_line(out, "fs irqs=");
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    field.parse().unwrap_or_else(|_| panic!("bad number in {line:?}"))
}

/// Boots `fs` with one share of a fresh directory holding hello.txt; returns the output and
/// the directory (the scratch area is removed when the returned guard drops).
fn run_fs(name: &str, read_only: bool) -> (Output, String, Scratch, PathBuf) {
    let scratch = Scratch::new(name);
    let share = scratch.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), hello_txt()).unwrap();
    let spec = format!("{},tag=hostdir{}", share.display(), if read_only { ",ro" } else { "" });
    let o = boot_with("probe", "fs", &[], &[spec]);
    let out = stdout(&o);
    (o, out, scratch, share)
}

/// Lines every `fs` run prints the same way, read-only or not.
fn check_fs_common(out: &str) {
    assert!(!out.contains("probe: fs error"), "{out}");
    let slot = probe_line(out, "fs slot=");
    let hex = slot.strip_prefix("probe: fs slot=01 features=0x").unwrap_or_else(|| panic!("{slot:?}"));
    assert_ne!(u64::from_str_radix(hex, 16).unwrap() & (1 << 32), 0, "VIRTIO_F_VERSION_1: {slot}");
    let init = probe_line(out, "fs init");
    let minor = init.strip_prefix("probe: fs init error=0 major=7 minor=").unwrap_or_else(|| panic!("{init:?}"));
    assert!(minor.parse::<u32>().unwrap() >= 31, "{init}");
    assert_eq!(probe_line(out, "fs tag="), "probe: fs tag=hostdir");
    let hello = hello_txt();
    assert_eq!(
        probe_line(out, "fs lookup hello.txt"),
        format!("probe: fs lookup hello.txt error=0 size={}", hello.len())
    );
    assert_eq!(probe_line(out, "fs read"), format!("probe: fs read len={} fnv={:#x}", hello.len(), fnv1a(&hello)));
    assert_eq!(probe_line(out, "fs text="), "probe: fs text=[hello from the host]");
    assert_eq!(probe_line(out, "fs lookup missing.txt"), "probe: fs lookup missing.txt error=-2");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
}

#[test]
fn fs_driver_inits_looks_up_reads_and_creates_files_in_a_share() {
    let (o, out, _scratch, share) = run_fs("fs-rw", false);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "the driver must not cause guest errors");
    check_fs_common(&out);
    assert_eq!(
        probe_line(&out, "fs create"),
        format!("probe: fs create error=0 write error=0 written={}", FS_WRITE_TEXT.len())
    );
    assert_eq!(
        probe_line(&out, "fs status"),
        "probe: fs status init=0 lookup=0 open=0 read=0 release=0 missing=-2 create=0 write=0 release2=0"
    );
    // INIT, LOOKUP, OPEN, READ, RELEASE, LOOKUP, CREATE, WRITE, RELEASE: one MSI-X interrupt each.
    let (irqs, requests) = (fs_counter(&out, "irqs"), fs_counter(&out, "requests"));
    assert_eq!(requests, 9, "{out}");
    assert!(irqs >= requests, "{irqs} MSI-X interrupts for {requests} requests:\n{out}");

    let created = share.join("from-guest.txt");
    assert_eq!(std::fs::read(&created).unwrap(), FS_WRITE_TEXT, "what the guest wrote");
    // Mode 0644 as asked (umask 022 applied by the device, not the VMM's own umask).
    assert_eq!(std::fs::metadata(&created).unwrap().mode() & 0o7777, 0o644);
    assert_eq!(std::fs::read(share.join("hello.txt")).unwrap(), hello_txt(), "hello.txt unchanged");
    let mut names: Vec<String> =
        std::fs::read_dir(&share).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["from-guest.txt", "hello.txt"]);
}

#[test]
fn fs_read_only_share_reads_but_refuses_create_with_erofs() {
    let (o, out, _scratch, share) = run_fs("fs-ro", true);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "EROFS answers are not guest errors");
    check_fs_common(&out);
    assert_eq!(probe_line(&out, "fs create"), "probe: fs create error=-30 write error=skipped written=0");
    assert_eq!(
        probe_line(&out, "fs status"),
        "probe: fs status init=0 lookup=0 open=0 read=0 release=0 missing=-2 create=-30 write=- release2=-"
    );
    let (irqs, requests) = (fs_counter(&out, "irqs"), fs_counter(&out, "requests"));
    assert_eq!(requests, 7, "{out}");
    assert!(irqs >= requests, "{irqs} MSI-X interrupts for {requests} requests:\n{out}");
    let names: Vec<_> = std::fs::read_dir(&share).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["hello.txt"], "nothing may be created in a read-only share");
    assert_eq!(std::fs::read(share.join("hello.txt")).unwrap(), hello_txt());
}

#[test]
fn pci_bus_lists_virtio_fs_share_after_the_disk() {
    let dir = Scratch::new("pci-fs");
    let disk = dir.file("a.img", &vec![0u8; 1 << 20]);
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let o = boot_with("probe", "pci", &[disk.display().to_string()], &[format!("{},tag=pcitest", share.display())]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "enumeration must not cause guest errors");
    let pci: Vec<&str> = out.lines().filter(|l| l.starts_with("probe: pci")).collect();
    let mut want = vec!["probe: pci 00 1b36:0008 class=060000".to_string()];
    want.extend(virtio_blk_lines("01", "0xc0000000"));
    // Two queues (hiprio, request) + config: three MSI-X vectors; otherwise the same layout.
    want.extend(
        [
            "1af4:105a class=018000",
            "bar0 mem=0xc0008000 size=0x8000",
            "cap msix size=3 table=0:0x4000 pba=0:0x6000",
            "cap virtio type=1 bar=0 off=0x0 len=0x38",
            "cap virtio type=2 bar=0 off=0x3000 len=0x8 mult=4",
            "cap virtio type=3 bar=0 off=0x1000 len=0x1",
            "cap virtio type=4 bar=0 off=0x2000 len=0x1000",
        ]
        .iter()
        .map(|l| format!("probe: pci 02 {l}")),
    );
    want.push("probe: pci functions=3".into());
    assert_eq!(pci, want, "{out}");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
}

/// A `shoji boot` child, killed if the test ends (or fails) before it exits.
struct Vm(Option<Child>);

impl Vm {
    /// Boots the probe with `cmdline` and `--vsock sock`.
    fn vsock(cmdline: &str, sock: &Path) -> Vm {
        require_kvm();
        let child = Command::new(env!("CARGO_BIN_EXE_shoji"))
            .args(["boot", "--guest", "probe", "--cmdline", cmdline, "--timeout", "60", "--vsock"])
            .arg(sock)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run shoji");
        Vm(Some(child))
    }

    /// Waits (at most 90 s: the VM's own --timeout is 60 s) for the exit, then collects the
    /// output (a few KiB: it fits the pipes, so the child never blocks on them).
    fn wait(mut self) -> Output {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("shoji did not exit within 90 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
        child.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
        Output { status, stdout, stderr }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One line (up to and including '\n', 256 bytes at most) or whatever came before end of file;
/// the stream's read timeout bounds the wait.
fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    r.take(256).read_until(b'\n', &mut line)?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Host side of a guest-initiated connection: a listener at `path` that accepts one stream
/// (within 60 s), reads one line, answers `host-reply\n` and then waits for end of file (10 s).
/// Returns the line and whether end of file came.
fn host_listener(path: &Path) -> std::thread::JoinHandle<Result<(String, bool), String>> {
    let listener = UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(&stream);
        let line = read_line(&mut r).map_err(|e| format!("read: {e}"))?;
        (&stream).write_all(b"host-reply\n").map_err(|e| format!("write: {e}"))?;
        let mut rest = Vec::new();
        let eof = match r.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(e) => return Err(format!("waiting for end of file: {e} (after {rest:?})")),
        };
        Ok((line, eof))
    })
}

/// Connects to the VMM's socket and asks for guest `port` until the guest answers (`OK <port>`),
/// retrying while the VMM is starting or the guest driver is not up yet (the device then
/// resets the handshake after 2 s). Returns the stream's reader, the host port and the tries.
fn host_connect(sock: &Path, port: u32) -> (BufReader<UnixStream>, u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut tries = 0;
    let mut last = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(if tries == 0 { 0 } else { 200 }));
        let Ok(mut s) = UnixStream::connect(sock) else { continue };
        tries += 1;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_err() {
            continue;
        }
        let mut r = BufReader::new(s);
        match read_line(&mut r) {
            Ok(line) => {
                if let Some(p) = line.strip_prefix("OK ").and_then(|l| l.strip_suffix('\n')) {
                    return (r, p.parse().unwrap_or_else(|_| panic!("bad OK line {line:?}")), tries);
                }
                last = line;
            }
            Err(e) => last = e.to_string(),
        }
    }
    panic!("no OK from the guest within 45 s ({tries} tries, last answer {last:?})");
}

/// The number after `key=` in a probe line.
fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    v.parse().unwrap_or_else(|_| panic!("bad {key} in {line:?}"))
}

/// Lines every `vsock` run prints the same way.
fn check_vsock_common(out: &str) {
    assert!(!out.contains("probe: vsock error"), "{out}");
    let slot = probe_line(out, "vsock slot=");
    let hex = slot.strip_prefix("probe: vsock slot=01 features=0x").unwrap_or_else(|| panic!("{slot:?}"));
    assert_eq!(u64::from_str_radix(hex, 16).unwrap(), 1 << 32, "VIRTIO_F_VERSION_1 only: {slot}");
    assert_eq!(probe_line(out, "vsock cid="), "probe: vsock cid=3");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
}

#[test]
fn vsock_driver_accepts_a_host_connection_and_connects_to_a_host_listener() {
    let dir = Scratch::new("vsock");
    let sock = dir.0.join("v.sock");
    let mut host_sock = sock.clone().into_os_string();
    host_sock.push("_6000");
    let host = host_listener(Path::new(&host_sock));
    let vm = Vm::vsock("vsock vport=5000 hport=6000", &sock);

    // Host to guest: CONNECT, ping, the guest's echo, then end of file (the guest closed).
    let (mut r, host_port, tries) = host_connect(&sock, 5000);
    r.get_ref().write_all(b"ping\n").unwrap();
    r.get_ref().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_line(&mut r).unwrap(), "guest-echo: ping\n");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");

    let o = vm.wait();
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "the driver must not cause guest errors");
    check_vsock_common(&out);
    assert_eq!(probe_line(&out, "vsock accepted"), format!("probe: vsock accepted port=5000 from=2:{host_port}"));
    assert_eq!(probe_line(&out, "vsock echoed"), "probe: vsock echoed [ping]");
    assert_eq!(probe_line(&out, "vsock listen closed"), "probe: vsock listen closed=rst");
    assert_eq!(probe_line(&out, "vsock connected"), "probe: vsock connected port=6000 local=50000");
    assert_eq!(probe_line(&out, "vsock host replied"), "probe: vsock host replied [host-reply]");
    assert_eq!(probe_line(&out, "vsock connect closed"), "probe: vsock connect closed=rst");
    assert!(!out.contains("refused"), "{out}");
    // Each sent packet waits for its tx interrupt: RESPONSE, RW, SHUTDOWN each way, REQUEST.
    let packets = probe_line(&out, "vsock packets");
    let (irqs, tx) = (field(probe_line(&out, "vsock irqs="), "irqs"), field(packets, "tx"));
    assert_eq!(tx, 6, "{out}");
    assert!(irqs >= tx, "{irqs} MSI-X interrupts for {tx} sent packets:\n{out}");
    // REQUEST, RW, RST; RESPONSE, RW, RST at least.
    assert!(field(packets, "rx") >= 6, "{out}");
    if tries == 1 {
        // (A handshake the device gave up on before the driver was up ends in a RST the
        // driver ignores; anything else would be unexpected.)
        assert_eq!(field(packets, "unexpected"), 0, "{out}");
    }

    let (line, eof) = host.join().unwrap().unwrap();
    assert_eq!(line, "hello-from-probe\n");
    assert!(eof, "the guest's SHUTDOWN closes the host stream");
    assert!(!sock.exists(), "the VMM removes its socket on exit");
}

#[test]
fn vsock_guest_connect_to_a_port_without_listener_is_refused() {
    let dir = Scratch::new("vsock-refused");
    let sock = dir.0.join("v.sock");
    let o = Vm::vsock("vsock vport=0 hport=6001", &sock).wait();
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "a refused connection is not a guest error");
    check_vsock_common(&out);
    assert_eq!(probe_line(&out, "vsock connect refused"), "probe: vsock connect refused");
    assert!(!out.contains("probe: vsock connected"), "{out}");
    assert!(!out.contains("probe: vsock accepted"), "{out}");
    let packets = probe_line(&out, "vsock packets");
    assert_eq!((field(packets, "rx"), field(packets, "tx")), (1, 1), "REQUEST and its RST: {out}");
    assert_eq!(field(packets, "unexpected"), 0, "{out}");
    assert!(!sock.exists(), "the VMM removes its socket on exit");
}

#[test]
fn vsock_device_sits_after_the_disks_and_shares() {
    require_kvm();
    let dir = Scratch::new("vsock-pci");
    let disk = dir.file("a.img", &vec![0u8; 1 << 20]);
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = dir.0.join("v.sock");
    let o = Command::new(env!("CARGO_BIN_EXE_shoji"))
        .args(["boot", "--guest", "probe", "--cmdline", "pci vsock vport=0 hport=0", "--timeout", "60"])
        .arg("--disk")
        .arg(&disk)
        .arg("--share")
        .arg(&share)
        .arg("--vsock")
        .arg(&sock)
        .env_remove("RUST_LOG")
        .output()
        .expect("run shoji");
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "{o:?}");
    let pci: Vec<&str> = out.lines().filter(|l| l.starts_with("probe: pci 03")).collect();
    // Three queues (rx, tx, event) + config: four MSI-X vectors, three notify offsets.
    let want: Vec<String> = [
        "1af4:1053 class=078000",
        "bar0 mem=0xc0010000 size=0x8000",
        "cap msix size=4 table=0:0x4000 pba=0:0x6000",
        "cap virtio type=1 bar=0 off=0x0 len=0x38",
        "cap virtio type=2 bar=0 off=0x3000 len=0xc mult=4",
        "cap virtio type=3 bar=0 off=0x1000 len=0x1",
        "cap virtio type=4 bar=0 off=0x2000 len=0x1000",
    ]
    .iter()
    .map(|l| format!("probe: pci 03 {l}"))
    .collect();
    assert_eq!(pci, want, "{out}");
    assert_eq!(probe_line(&out, "pci functions="), "probe: pci functions=4");
    assert_eq!(probe_line(&out, "vsock slot="), "probe: vsock slot=03 features=0x100000000");
    assert_eq!(probe_line(&out, "vsock cid="), "probe: vsock cid=3");
    assert_eq!(probe_line(&out, "vsock packets"), "probe: vsock packets rx=0 tx=0 unexpected=0");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
    assert!(!sock.exists(), "the VMM removes its socket on exit");
}

/// What the host writes into the first 8 bytes of every 4 KiB block for `blkbench` (blkbench.c:
/// STAMP_TAG | the block's first sector).
fn bench_stamp(offset: usize) -> [u8; 8] {
    (0x5348_4f4a_0000_0000u64 | (offset / SECTOR) as u64).to_le_bytes()
}

/// A disk of `mib` MiB with every 4 KiB block stamped and the rest a non-zero pattern.
fn bench_disk(mib: usize) -> Vec<u8> {
    let mut d: Vec<u8> =
        (0..mib << 20).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect();
    for off in (0..d.len()).step_by(4096) {
        d[off..off + 8].copy_from_slice(&bench_stamp(off));
    }
    d
}

/// The phases' lines in the order the guest printed them.
fn bench_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("probe: bench ")).collect()
}

#[test]
fn blkbench_mode_runs_its_phases_with_the_requested_sizes_and_checks_data() {
    let dir = Scratch::new("blkbench");
    let before = bench_disk(2);
    let disk = dir.file("bench.img", &before);
    let o = boot("probe", "blkbench mib=1 ios=64 qd=4", &[disk.display().to_string()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "the bench must not cause guest errors");
    let stats = |phase: &str| probe_line(&out, &format!("bench {phase} stats"));
    let no_errors = |phase: &str| {
        let s = stats(phase);
        assert!(s.starts_with(&format!("probe: bench {phase} stats errors=0 mismatches=0 kicks=")), "{s}");
    };
    // Reads first (64 KiB x 16 over the first MiB, then 64 random 4 KiB reads), the write last.
    let phases: Vec<&str> = bench_lines(&out).into_iter().filter(|l| !l.contains(" stats ")).collect();
    assert_eq!(
        phases,
        [
            "probe: bench disk capacity=4096 qd=4 ro=0",
            "probe: bench seqread start",
            "probe: bench seqread end bytes=1048576 requests=16",
            "probe: bench randread start",
            "probe: bench randread end bytes=262144 requests=64",
            "probe: bench seqwrite start",
            "probe: bench seqwrite end bytes=1048576 requests=16",
        ],
        "{out}"
    );
    for p in ["seqread", "randread", "seqwrite"] {
        no_errors(p);
    }
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");

    // The write phase rewrote the first MiB, 64 KiB at a time, each request stamped with its
    // own sector; the second MiB is untouched.
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), before.len());
    for off in (0..1 << 20).step_by(64 << 10) {
        assert_eq!(after[off..off + 8], bench_stamp(off), "64 KiB request at {off:#x}");
    }
    assert!(after[1 << 20..] == before[1 << 20..], "only the first MiB was written");
}

#[test]
fn blkbench_mode_skips_writes_on_a_read_only_disk_and_counts_wrong_data() {
    // No stamps on this disk: every read is a mismatch, which the guest must notice.
    let dir = Scratch::new("blkbench-ro");
    let before = vec![0u8; 1 << 20];
    let disk = dir.file("ro.img", &before);
    let o = boot("probe", "blkbench mib=4 ios=20 qd=16", &[format!("{},ro", disk.display())]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "reads only: no guest errors");
    // mib=4 is clamped to the 1 MiB disk.
    assert_eq!(probe_line(&out, "bench disk"), "probe: bench disk capacity=2048 qd=16 ro=1");
    assert_eq!(probe_line(&out, "bench seqread end"), "probe: bench seqread end bytes=1048576 requests=16");
    assert!(probe_line(&out, "bench seqread stats").starts_with("probe: bench seqread stats errors=0 mismatches=16 "));
    assert_eq!(probe_line(&out, "bench randread end"), "probe: bench randread end bytes=81920 requests=20");
    assert!(probe_line(&out, "bench randread stats").starts_with("probe: bench randread stats errors=0 mismatches=20 "));
    assert_eq!(probe_line(&out, "bench seqwrite"), "probe: bench seqwrite skipped ro");
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
    assert!(std::fs::read(&disk).unwrap() == before, "a read-only disk must not change");
}

/// `shoji bench devices` end to end on a small workload: every phase is reported (nothing about
/// the numbers is checked: this machine's timing is not a test).
#[test]
fn bench_devices_reports_every_phase_for_shoji() {
    require_kvm();
    let o = Command::new(env!("CARGO_BIN_EXE_shoji"))
        .args(["bench", "devices", "--mib", "1", "--ios", "40", "--qd", "4", "--runs", "1", "--json"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run shoji");
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("\"command\": \"shoji bench devices --mib 1 --ios 40 --qd 4 --runs 1 --json\""), "{out}");
    assert!(out.contains("\"peer_error\": null"), "{out}");
    let runs: Vec<&str> = out.lines().filter(|l| l.contains("\"vmm\": ")).collect();
    assert_eq!(runs.len(), 1, "{out}");
    assert!(runs[0].contains("\"vmm\": \"shoji\""), "{out}");
    for (phase, bytes, requests) in [("seqread", 1 << 20, 16), ("randread", 40 * 4096, 40), ("seqwrite", 1 << 20, 16)] {
        let want = format!("{{\"name\": \"{phase}\", \"bytes\": {bytes}, \"requests\": {requests}, ");
        assert!(out.contains(&want), "{want} in\n{out}");
    }
}

/// vsockbench.c's sink stream: the le64 word at every 8-byte-aligned offset W is SINK_TAG | W.
fn vsockbench_sink_stream(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> =
        (0..len.div_ceil(8) as u64).flat_map(|w| (0x5653_494e_0000_0000 | (w * 8)).to_le_bytes()).collect();
    v.truncate(len);
    v
}

/// vsockbench.c's source packets: all the same 64 KiB block of le64 SOURCE_TAG | W words.
fn vsockbench_source_block() -> Vec<u8> {
    (0..8192u64).flat_map(|w| (0x5653_4f55_0000_0000 | (w * 8)).to_le_bytes()).collect()
}

#[test]
fn vsockbench_mode_echoes_sinks_and_sources_the_exact_bytes() {
    const ROUNDS: usize = 20;
    const MSG: usize = 100;
    // Not a multiple of 8 or of the 64 KiB packets: unaligned packet starts, a short last packet.
    const BYTES: usize = 300_005;
    let dir = Scratch::new("vsockbench");
    let sock = dir.0.join("v.sock");
    let vm = Vm::vsock(&format!("vsockbench port=5001 rounds={ROUNDS} msg={MSG} bytes={BYTES}"), &sock);
    let (mut r, host_port, tries) = host_connect(&sock, 5001);
    let s = r.get_ref().try_clone().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();

    // Echo: every message comes back unchanged.
    for i in 0..ROUNDS {
        let msg: Vec<u8> = (0..MSG).map(|j| (i * 31 + j * 7) as u8).collect();
        (&s).write_all(&msg).unwrap();
        let mut back = vec![0u8; MSG];
        r.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echo {i}");
    }
    // Sink: the guest acknowledges the byte count and found every stamp it checked right.
    (&s).write_all(&vsockbench_sink_stream(BYTES)).unwrap();
    let mut ack = [0u8; 16];
    r.read_exact(&mut ack).unwrap();
    let (got, mismatches) =
        (u64::from_le_bytes(ack[..8].try_into().unwrap()), u64::from_le_bytes(ack[8..].try_into().unwrap()));
    assert_eq!((got, mismatches), (BYTES as u64, 0));
    // Source: after the go byte, BYTES bytes of the repeated block, then end of file.
    (&s).write_all(b"G").unwrap();
    let mut source = Vec::new();
    r.read_to_end(&mut source).unwrap();
    assert_eq!(source.len(), BYTES);
    let block = vsockbench_source_block();
    for (i, chunk) in source.chunks(block.len()).enumerate() {
        assert!(chunk == &block[..chunk.len()], "source packet {i} differs");
    }

    let o = vm.wait();
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stderr(&o), "", "the bench must not cause guest errors");
    assert!(!out.contains("vsockbench error"), "{out}");
    assert_eq!(
        probe_line(&out, "vsockbench accepted"),
        format!("probe: vsockbench accepted port=5001 from=2:{host_port}")
    );
    let echo = probe_line(&out, "vsockbench echo ");
    assert_eq!(field(echo, "bytes"), (ROUNDS * MSG) as u64, "{out}");
    assert!(field(echo, "packets") >= ROUNDS as u64, "{out}");
    let sink = probe_line(&out, "vsockbench sink ");
    assert_eq!((field(sink, "bytes"), field(sink, "mismatches")), (BYTES as u64, 0), "{out}");
    assert_eq!(probe_line(&out, "vsockbench source "), format!("probe: vsockbench source bytes={BYTES} packets=5"));
    assert_eq!(probe_line(&out, "vsockbench closed"), "probe: vsockbench closed=rst");
    if tries == 1 {
        assert_eq!(field(probe_line(&out, "vsockbench stats"), "unexpected"), 0, "{out}");
    }
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
}

/// A wrong stamp in the sink stream is counted and reported back, not ignored.
#[test]
fn vsockbench_mode_counts_wrong_sink_data() {
    let dir = Scratch::new("vsockbench-bad");
    let sock = dir.0.join("v.sock");
    let vm = Vm::vsock("vsockbench port=5002 rounds=1 msg=8 bytes=200000", &sock);
    let (mut r, _, _) = host_connect(&sock, 5002);
    let s = r.get_ref().try_clone().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(b"12345678").unwrap();
    let mut back = [0u8; 8];
    r.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"12345678");
    // All zeros: whatever the packet boundaries, every checked word is wrong.
    (&s).write_all(&vec![0u8; 200_000]).unwrap();
    let mut ack = [0u8; 16];
    r.read_exact(&mut ack).unwrap();
    let mismatches = u64::from_le_bytes(ack[8..].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(ack[..8].try_into().unwrap()), 200_000);
    (&s).write_all(b"G").unwrap();
    let mut source = Vec::new();
    r.read_to_end(&mut source).unwrap();
    assert_eq!(source.len(), 200_000);
    let o = vm.wait();
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    let sink = probe_line(&out, "vsockbench sink ");
    assert!(mismatches >= 1 && field(sink, "mismatches") == mismatches, "{mismatches} {out}");
    assert!(field(sink, "packets") >= 4, "200000 bytes need 4 packets of 64 KiB at least: {out}");
}

/// `shoji bench vsock` end to end on a small workload: Shoji and the baseline are both reported
/// and the QEMU note is there (nothing about the numbers is checked: timing is not a test).
#[test]
fn bench_vsock_reports_shoji_and_the_baseline() {
    require_kvm();
    let o = Command::new(env!("CARGO_BIN_EXE_shoji"))
        .args(["bench", "vsock", "--rounds", "20", "--warmup", "2", "--msg", "100", "--mib", "1", "--runs", "1"])
        .arg("--json")
        .env_remove("RUST_LOG")
        .output()
        .expect("run shoji");
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.contains("\"guest_cmdline\": \"vsockbench port=5001 rounds=22 msg=100 bytes=1048576 poll=0\""),
        "{out}"
    );
    assert!(out.contains("\"qemu\": \"not measured: "), "{out}");
    let runs: Vec<&str> = out.lines().filter(|l| l.contains("\"kind\": ")).collect();
    assert_eq!(runs.len(), 2, "{out}");
    for (run, kind) in runs.iter().zip(["shoji", "baseline"]) {
        assert!(
            run.contains(&format!("\"kind\": \"{kind}\", \"run\": 1, \"rounds\": 20, \"bytes\": 1048576, ")),
            "{out}"
        );
    }
    // The guest's counts: 22 echoes, 1 MiB each way in 64 KiB packets (16 to send; the device
    // may split what it receives).
    assert!(runs[0].contains("\"echo_packets\": 22, "), "{out}");
    assert!(runs[0].contains("\"source_packets\": 16, "), "{out}");
    assert!(runs[1].contains("\"guest\": null"), "{out}");
}
