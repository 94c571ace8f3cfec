//! A split irqchip (LAPICs in the kernel, no IOAPIC, PIC or PIT) on the real /dev/kvm: the null
//! guest reaches its marker, and the probe guest drives a virtio-blk disk on MSI-X interrupts
//! with its LAPIC-timer watchdog, is saved mid-run and finishes on a restored VM (whose
//! snapshot holds no PIC, IOAPIC or PIT state); a split snapshot is refused by an in-kernel VM.
//! Needs /dev/kvm.
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{spawn_with_control, DiskConfig, IrqChip, SerialOut, StopReason, VmConfig, VmControl, VmError};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

fn config(guest: &str, out: &Capture) -> VmConfig {
    let mut cfg = VmConfig::new(testkit::guest(guest).unwrap());
    cfg.serial = SerialOut::Writer(Box::new(out.clone()));
    cfg.timeout = Some(Duration::from_secs(120));
    cfg.irqchip = IrqChip::Split;
    cfg
}

#[test]
fn test_guests_run_on_a_split_irqchip_and_are_saved_and_restored_there() {
    assert!(Path::new("/dev/kvm").exists(), "this test boots a real VM and needs /dev/kvm");
    let out = Capture::default();
    let outcome = shoji_vmm::run(config("null", &out)).unwrap();
    assert_eq!(outcome.reason, StopReason::Reset);
    assert!(out.text().contains(testkit::NULL_MARKER), "{}", out.text());

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let with_disk = |out: &Capture, stop: &Arc<EventFd>| {
        let mut cfg = config("probe", out);
        cfg.cmdline = "blk tick".into();
        cfg.disks = vec![DiskConfig { path: disk.clone(), read_only: false }];
        cfg.stop = Some(stop.clone());
        cfg
    };
    let out = Capture::default();
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let control = VmControl::new();
    let vm = spawn_with_control(with_disk(&out, &stop), control.clone(), |_| {}).unwrap();
    // `blk` drives the disk with interrupts, then `tick` prints a dot a line forever (LAPIC timer).
    out.wait_for("probe: ticking");
    let text = out.text();
    assert!(!text.contains("blk error"), "{text}");
    let irqs: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("probe: blk irqs="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_default();
    assert!(irqs > 0, "the disk's completions came as MSI-X interrupts: {text}");
    control.pause(Duration::from_secs(10)).unwrap();
    let snap = dir.path().join("snap");
    control.snapshot(&snap).unwrap();
    stop.write(1).unwrap();
    assert_eq!(vm.join().unwrap().unwrap().reason, StopReason::Stopped);

    // The restored VM ticks on.
    let out2 = Capture::default();
    let stop2 = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut cfg = with_disk(&out2, &stop2);
    cfg.restore = Some(snap.clone());
    let vm2 = spawn_with_control(cfg, VmControl::new(), |_| {}).unwrap();
    let t0 = Instant::now();
    while out2.text().matches('.').count() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the restored guest does not tick: {:?}", out2.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop2.write(1).unwrap();
    assert_eq!(vm2.join().unwrap().unwrap().reason, StopReason::Stopped);

    // An in-kernel VM does not take a split snapshot.
    let mut cfg = with_disk(&Capture::default(), &stop2);
    cfg.irqchip = IrqChip::InKernel;
    cfg.restore = Some(snap);
    match shoji_vmm::run(cfg) {
        Err(e @ VmError::Snapshot(_)) => assert!(e.to_string().contains("irqchip split"), "{e}"),
        other => panic!("expected a snapshot error, got {other:?}"),
    }
}
