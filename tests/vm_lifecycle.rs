//! The VMM as a library: many boots in one process leave no fd, thread or mapping behind.
use shoji_tests::{process_resources, require_kvm};
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{SerialOut, StopReason, VmConfig};
use std::sync::Mutex;
use std::time::Duration;

/// Resource counts are per process: tests in this binary must not boot concurrently.
static SERIAL: Mutex<()> = Mutex::new(());

fn boot(guest: &str, cmdline: &str, vcpus: u8, timeout: Option<Duration>) -> (StopReason, String) {
    let out = Capture::default();
    let mut cfg = VmConfig::new(testkit::guest(guest).unwrap());
    cfg.cmdline = cmdline.into();
    cfg.vcpus = vcpus;
    cfg.memory_mib = 256;
    cfg.serial = SerialOut::Writer(Box::new(out.clone()));
    cfg.timeout = timeout;
    let outcome = shoji_vmm::run(cfg).expect("boot");
    let text = out.text();
    (outcome.reason, text)
}

#[test]
fn twenty_boots_in_a_row_leave_nothing_behind() {
    require_kvm();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Warm up with each kind of boot: one-time process state (signal handler, and the malloc
    // arenas glibc creates for the largest number of concurrent vCPU threads) is not a leak.
    boot("null", "", 1, None);
    boot("probe", "smp", 4, None);
    boot("probe", "smp hang", 2, Some(Duration::from_millis(300)));
    let before = process_resources();
    for i in 0..20 {
        let (reason, out) = match i % 4 {
            0 | 1 => boot("null", "", 1, None),
            2 => boot("probe", "smp", 4, None),
            _ => boot("probe", "smp hang", 2, Some(Duration::from_millis(300))),
        };
        match i % 4 {
            0 | 1 => assert_eq!((reason, out.as_str()), (StopReason::Reset, "SHOJI-NULL-OK\n")),
            2 => {
                assert_eq!(reason, StopReason::Reset);
                assert!(out.contains("probe: smp online=4"), "{out}");
            }
            _ => {
                assert_eq!(reason, StopReason::Timeout);
                assert!(out.contains("probe: hanging"), "{out}");
            }
        }
    }
    let after = process_resources();
    assert_eq!(before, after, "fds/threads/mappings before vs after 20 boots");
}

#[test]
fn a_failed_boot_leaves_nothing_behind() {
    require_kvm();
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    boot("null", "", 1, None);
    let before = process_resources();
    for _ in 0..5 {
        let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
        cfg.cmdline = "crash".into();
        cfg.serial = SerialOut::Discard;
        let err = shoji_vmm::run(cfg).unwrap_err().to_string();
        assert!(err.starts_with("guest triple fault"), "{err}");
    }
    assert_eq!(before, process_resources());
}
