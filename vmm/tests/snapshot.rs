//! Snapshot and restore on the real /dev/kvm. The probe guest runs its `blkbench` mode on a
//! virtio-blk disk (MSI-X interrupts, up to 8 requests in flight, the LAPIC timer as its
//! watchdog) and checks a stamp in every block it reads; in the middle of its random-read phase
//! the VM is paused, saved, and torn down, and a new VM restored from the files finishes the
//! run: no request lost or repeated wrongly (errors=0, mismatches=0), the write phase lands on
//! the disk, and the guest reaches its end. Damaged or mismatched snapshots are refused before
//! anything runs. Needs /dev/kvm.
use shoji_vmm::snapshot::{MEMORY_FILE, STATE_FILE};
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{spawn_with_control, DiskConfig, SerialOut, StopReason, VmConfig, VmControl, VmError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

const STAMP_TAG: u64 = 0x5348_4f4a_0000_0000;
const MIB: u64 = 8;
const CMDLINE: &str = "blkbench mib=8 ios=40000 qd=8";

/// Every 4 KiB block starts with its stamp (blkbench.c).
fn stamped_disk(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for m in 0..MIB {
        for (i, block) in chunk.chunks_mut(4096).enumerate() {
            let sector = (m << 20 | (i as u64) << 12) / 512;
            block[..8].copy_from_slice(&(STAMP_TAG | sector).to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
}

fn config(disk: &Path, out: &Capture, stop: &Arc<EventFd>, restore: Option<PathBuf>) -> VmConfig {
    let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
    cfg.cmdline = CMDLINE.into();
    cfg.memory_mib = 64;
    cfg.disks = vec![DiskConfig { path: disk.to_path_buf(), read_only: false }];
    cfg.serial = SerialOut::Writer(Box::new(out.clone()));
    cfg.stop = Some(stop.clone());
    cfg.timeout = Some(Duration::from_secs(300));
    cfg.restore = restore;
    cfg
}

/// A scratch directory with a stamped disk, and the probe's blkbench run on it in a VM.
struct Running {
    dir: tempfile::TempDir,
    disk: PathBuf,
    out: Capture,
    stop: Arc<EventFd>,
    control: Arc<VmControl>,
    vm: std::thread::JoinHandle<Result<shoji_vmm::VmOutcome, VmError>>,
}

fn running() -> Running {
    assert!(Path::new("/dev/kvm").exists(), "this test boots a real VM and needs /dev/kvm");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    stamped_disk(&disk);
    let out = Capture::default();
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let control = VmControl::new();
    let vm = spawn_with_control(config(&disk, &out, &stop, None), control.clone(), |_| {}).unwrap();
    Running { dir, disk, out, stop, control, vm }
}

#[test]
fn a_vm_saved_in_the_middle_of_disk_io_finishes_the_run_after_a_restore() {
    // Run until the random reads are under way, then pause, save and stop.
    let Running { dir, disk, out, stop, control, vm } = running();
    let snap = dir.path().join("snap");
    out.wait_for("probe: bench randread start");
    control.pause(Duration::from_secs(10)).unwrap();
    let before = out.text();
    assert!(!before.contains("randread end"), "the run ended before the pause: {before}");
    let t = Instant::now();
    control.snapshot(&snap).unwrap();
    eprintln!("saved in {:?}", t.elapsed());
    stop.write(1).unwrap();
    assert_eq!(vm.join().unwrap().unwrap().reason, StopReason::Stopped);
    for f in [STATE_FILE, MEMORY_FILE] {
        assert!(snap.join(f).is_file(), "{f} written");
    }

    // A new VM from the files goes on where the old one stopped.
    let out2 = Capture::default();
    let stop2 = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let t = Instant::now();
    let control2 = VmControl::new();
    let vm2 = spawn_with_control(config(&disk, &out2, &stop2, Some(snap.clone())), control2, |_| {}).unwrap();
    out2.wait_for(testkit::PROBE_DONE);
    eprintln!("restored run finished in {:?}", t.elapsed());
    let outcome = vm2.join().unwrap().unwrap();
    let after = out2.text();
    eprintln!("after the restore:\n{after}");
    assert_eq!(outcome.reason, StopReason::Reset, "{outcome:?}");
    assert!(!after.contains("bench disk capacity"), "the restored guest did not start over: {after}");
    for phase in ["randread", "seqwrite"] {
        assert!(after.contains(&format!("probe: bench {phase} end")), "{phase} finished: {after}");
        let stats = after.lines().find(|l| l.contains(&format!("bench {phase} stats"))).unwrap_or_default();
        assert!(stats.contains("errors=0 mismatches=0"), "{phase}: {stats}");
    }
    assert!(!after.contains("bench error"), "{after}");
    assert_eq!(outcome.device_guest_errors, 0, "{outcome:?}");
    // The write phase (after the restore) stamped the first block of each 64 KiB request.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&disk).unwrap();
    let mut b = [0u8; 8];
    for off in (0..MIB << 20).step_by(64 << 10) {
        f.read_exact_at(&mut b, off).unwrap();
        assert_eq!(u64::from_le_bytes(b), STAMP_TAG | (off / 512), "disk offset {off:#x}");
    }
}

#[test]
fn a_damaged_or_mismatched_snapshot_is_refused_before_the_vm_runs() {
    let Running { dir, disk, out, stop, control, vm } = running();
    let snap = dir.path().join("snap");
    out.wait_for("probe: bench seqread start");
    assert!(control.snapshot(&snap).unwrap_err().to_string().contains("not paused"), "a running VM is not saved");
    control.pause(Duration::from_secs(10)).unwrap();
    control.snapshot(&snap).unwrap();
    stop.write(1).unwrap();
    vm.join().unwrap().unwrap();

    let restore = |cfg: VmConfig| -> String {
        let r = shoji_vmm::run(cfg);
        match r {
            Err(e @ VmError::Snapshot(_)) => e.to_string(),
            other => panic!("expected a snapshot error, got {other:?}"),
        }
    };
    // Another shape: memory, vCPUs, devices.
    let mut cfg = config(&disk, &out, &stop, Some(snap.clone()));
    cfg.memory_mib = 128;
    let e = restore(cfg);
    assert!(e.contains("memory_mib 64") && e.contains("configured with 128"), "{e}");
    let mut cfg = config(&disk, &out, &stop, Some(snap.clone()));
    cfg.vcpus = 2;
    assert!(restore(cfg).contains("vcpus"));
    let mut cfg = config(&disk, &out, &stop, Some(snap.clone()));
    cfg.disks.clear();
    assert!(restore(cfg).contains("devices"));
    // One byte of guest memory changed: the checksum catches it.
    let mem = snap.join(MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"X", 0x10_0000).unwrap();
    let e = restore(config(&disk, &out, &stop, Some(snap.clone())));
    assert!(e.contains("checksum"), "{e}");
}
