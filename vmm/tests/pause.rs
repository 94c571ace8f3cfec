//! Pause and resume on the real /dev/kvm: the probe guest, two vCPUs (the second idles in HLT,
//! inside KVM_RUN), confined, prints a dot at a time. Paused, its output stops growing: every
//! vCPU was kicked out of KVM_RUN and parked; resumed, the dots go on; a VM stopped while paused
//! tears down (the parked threads are released). Needs /dev/kvm.
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{spawn_with_control, PauseError, SerialOut, StopReason, VmConfig, VmControl};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

fn dots(out: &Capture) -> usize {
    out.text().matches('.').count()
}

/// Waits until the guest printed more than `n` dots.
fn more_dots_than(out: &Capture, n: usize, what: &str) {
    let t0 = Instant::now();
    while dots(out) <= n {
        assert!(t0.elapsed() < Duration::from_secs(120), "{what}: no dot after {n}: {}", out.text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_paused_vm_stops_and_a_resumed_one_goes_on() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "this test boots a real VM and needs /dev/kvm");
    let out = Capture::default();
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
    cfg.cmdline = "smp tick".into();
    cfg.vcpus = 2;
    cfg.serial = SerialOut::Writer(Box::new(out.clone()));
    cfg.stop = Some(stop.clone());
    cfg.timeout = Some(Duration::from_secs(300));
    cfg.confine = true;
    let control = VmControl::new();
    assert!(matches!(control.pause(Duration::from_secs(1)), Err(PauseError::NotRunning)), "no VM yet");
    let thread = spawn_with_control(cfg, control.clone(), |_| {}).unwrap();

    more_dots_than(&out, 3, "ticking");
    assert!(out.text().contains("probe: smp online=2"), "{}", out.text());
    for round in 0..3 {
        let t = Instant::now();
        control.pause(Duration::from_secs(10)).unwrap();
        eprintln!("round {round}: paused in {:?}", t.elapsed());
        assert!(control.is_paused());
        let frozen = dots(&out);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(dots(&out), frozen, "round {round}: a paused vCPU ran");
        control.pause(Duration::from_secs(10)).unwrap();
        assert_eq!(dots(&out), frozen, "a second pause changes nothing");
        control.resume().unwrap();
        assert!(!control.is_paused());
        more_dots_than(&out, frozen, "resumed");
    }
    control.resume().unwrap();

    // Stopped while paused: the parked vCPU threads are released and joined.
    control.pause(Duration::from_secs(10)).unwrap();
    stop.write(1).unwrap();
    let t = Instant::now();
    let outcome = thread.join().unwrap().unwrap();
    eprintln!("stopped while paused: torn down in {:?}", t.elapsed());
    assert_eq!(outcome.reason, StopReason::Stopped, "{outcome:?}");
    assert!(matches!(control.resume(), Err(PauseError::NotRunning)), "the VM is gone");
}
