//! PCI and virtio devices seen from inside a guest: the probe test guest enumerates bus 0
//! (`pci` mode) and drives a virtio-blk disk as a real driver does, with MSI-X interrupts
//! (`blk` mode); the host checks its report and the disk file afterwards. Needs /dev/kvm.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SECTOR: usize = 512;

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests boot real VMs and need /dev/kvm (read-write); it is missing on this host"
    );
}

/// Boots `guest` with `cmdline` and `disks`; a guest that hangs is stopped by --timeout.
fn boot(guest: &str, cmdline: &str, disks: &[String]) -> Output {
    require_kvm();
    let mut args = vec!["boot", "--guest", guest, "--cmdline", cmdline, "--timeout", "60"];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
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
