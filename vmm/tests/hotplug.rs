//! PCI hotplug on the real /dev/kvm, with the probe guest idling in HLT and every VMM thread
//! confined: a disk plugged into a running VM answers in config space at the slot the plan
//! gives it, and its BAR answers; unplugged, both read as all ones and its slot, BAR, GSIs,
//! ioeventfds, irqfds and event-loop registration are given back and reused; 20 cycles leave
//! the process with the fds, threads, epoll registrations, GSIs and BARs it had; concurrent
//! plugs are serialised; a VM stopped with a disk still plugged tears down cleanly. Needs
//! /dev/kvm.
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{
    spawn_with_control, DiskConfig, HotplugError, HotplugStats, PciPath, SerialOut, StopReason, VmConfig, VmControl,
    VmError, VmOutcome,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// The tests count the whole process's fds and threads: one VM at a time.
static ONE: Mutex<()> = Mutex::new(());

/// The probe guest in `hang` mode with one boot disk (slot 01), confined, and its control.
struct Vm {
    control: Arc<VmControl>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    dir: tempfile::TempDir,
}

impl Vm {
    fn start() -> Vm {
        assert!(Path::new("/dev/kvm").exists(), "these tests boot real VMs and need /dev/kvm");
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot.img");
        std::fs::write(&boot, vec![0u8; 1 << 20]).unwrap();
        let out = Capture::default();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
        cfg.cmdline = "hang".into();
        cfg.serial = SerialOut::Writer(Box::new(out.clone()));
        cfg.disks = vec![DiskConfig { path: boot, read_only: false }];
        cfg.stop = Some(stop.clone());
        cfg.timeout = Some(Duration::from_secs(300));
        cfg.confine = true;
        let control = VmControl::new();
        assert!(matches!(control.add_disk(disk(dir.path(), "early")), Err(HotplugError::NotRunning)));
        let thread = spawn_with_control(cfg, control.clone(), |_| {}).unwrap();
        let t0 = Instant::now();
        while !out.text().contains("probe: hanging") {
            assert!(t0.elapsed() < Duration::from_secs(120), "the probe did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(control.is_running());
        Vm { control, stop, thread: Some(thread), dir }
    }

    /// A new 64 KiB disk image in the VM's directory.
    fn disk(&self, name: &str) -> DiskConfig {
        disk(self.dir.path(), name)
    }

    fn join(mut self) -> Result<VmOutcome, VmError> {
        let _ = self.stop.write(1);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

fn disk(dir: &Path, name: &str) -> DiskConfig {
    let path: PathBuf = dir.join(format!("{name}.img"));
    if !path.exists() {
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
    }
    DiskConfig { path, read_only: false }
}

fn path(s: &str) -> PciPath {
    s.parse().unwrap()
}

fn cfg32(c: &VmControl, p: &PciPath, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    c.config_read(p, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// BAR 0's guest address, from config space.
fn bar0(c: &VmControl, p: &PciPath) -> u64 {
    u64::from(cfg32(c, p, 0x10) & !0xf)
}

fn mmio32(c: &VmControl, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    c.mmio_read(addr, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// virtio-blk (modern): vendor 0x1af4, device 0x1040 + 2.
const VIRTIO_BLK_IDS: u32 = 0x1042_1af4;

/// What the process holds: fds, threads, and registrations in its epoll sets (the device
/// thread's event loop among them), read from /proc.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    fds: usize,
    threads: usize,
    epoll_registrations: usize,
}

fn held() -> Held {
    let mut fds = 0;
    let mut epoll_registrations = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        fds += 1;
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if target.to_string_lossy() == "anon_inode:[eventpoll]" {
            let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name())).unwrap_or_default();
            epoll_registrations += info.lines().filter(|l| l.starts_with("tfd:")).count();
        }
    }
    Held { fds, threads: std::fs::read_dir("/proc/self/task").unwrap().count(), epoll_registrations }
}

#[test]
fn a_disk_is_plugged_unplugged_and_plugged_again_and_twenty_cycles_leave_nothing() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start();
    let c = &vm.control;
    let boot_stats = c.stats().unwrap();
    assert_eq!(boot_stats.hot_devices, 0);
    assert_eq!(boot_stats.mmio_ranges, 1, "the boot disk's BAR");
    assert_eq!(cfg32(c, &path("01"), 0), VIRTIO_BLK_IDS, "the boot disk");
    let before = held();

    // Hot-add: the first slot after the boot disk, config space and BAR answer there.
    let p = c.add_disk(vm.disk("a")).unwrap();
    assert_eq!(p, path("02"));
    assert_eq!(cfg32(c, &p, 0), VIRTIO_BLK_IDS);
    let bar = bar0(c, &p);
    assert_ne!(bar, 0);
    assert_ne!(mmio32(c, bar), u32::MAX, "the common config (device feature select) answers");
    let hot = c.stats().unwrap();
    assert_eq!(hot.hot_devices, 1);
    assert_eq!(hot.mmio_ranges, 2);
    assert!(hot.gsis_in_use > boot_stats.gsis_in_use, "{hot:?}");
    let with_one = held();
    assert!(with_one.fds > before.fds, "the disk file and the device's eventfds: {with_one:?}");
    assert!(with_one.epoll_registrations > before.epoll_registrations, "its queue in the event loop: {with_one:?}");
    let listed: Vec<String> = c.devices().unwrap().iter().map(|d| format!("{}@{}", d.kind, d.path)).collect();
    assert_eq!(listed, ["virtio-blk@01", "virtio-blk@02"]);
    assert!(c.remove(&path("02.1")).is_err(), "function 1 of its slot is not the disk");
    assert_eq!(cfg32(c, &p, 0), VIRTIO_BLK_IDS);

    // Unplug: config space and the BAR read as all ones; boot devices and unknown paths refuse.
    c.remove(&p).unwrap();
    assert_eq!(cfg32(c, &p, 0), u32::MAX);
    assert_eq!(mmio32(c, bar), u32::MAX, "nothing behind the old BAR");
    assert_eq!(c.stats().unwrap(), boot_stats);
    assert_eq!(held(), before);
    for bad in ["02", "01", "00", "1f", "02/01", "02.1"] {
        let e = c.remove(&path(bad)).unwrap_err();
        assert!(e.to_string().contains("not a hot-plugged device"), "{bad}: {e}");
    }
    assert_eq!(cfg32(c, &path("01"), 0), VIRTIO_BLK_IDS, "the boot disk is untouched");

    // Plugged again: the freed slot and the freed BAR space.
    let p2 = c.add_disk(vm.disk("b")).unwrap();
    assert_eq!(p2, p);
    assert_eq!(bar0(c, &p2), bar);
    assert_eq!(cfg32(c, &p2, 0), VIRTIO_BLK_IDS);
    c.remove(&p2).unwrap();

    // A disk that cannot be opened takes nothing.
    let e = c.add_disk(DiskConfig { path: vm.dir.path().join("missing.img"), read_only: false }).unwrap_err();
    assert!(matches!(e, HotplugError::Disk(_)), "{e}");
    assert!(e.to_string().contains("missing.img"), "{e}");

    for i in 0..20 {
        let a = c.add_disk(vm.disk(&format!("c{i}"))).unwrap();
        let b = c.add_disk(vm.disk(&format!("d{i}"))).unwrap();
        assert_eq!((a.to_string(), b.to_string()), ("02".into(), "03".into()), "cycle {i}");
        c.remove(&a).unwrap();
        c.remove(&b).unwrap();
    }
    assert_eq!(c.stats().unwrap(), boot_stats);
    assert_eq!(held(), before, "20 plug/unplug cycles");

    // The bus fills up (slots 02..1f), says so, and empties again.
    let mut plugged = vec![];
    let full = loop {
        match c.add_disk(vm.disk("full")) {
            Ok(p) => plugged.push(p),
            Err(e) => break e,
        }
    };
    assert_eq!(plugged.len(), 30);
    assert_eq!(plugged.last().unwrap(), &path("1f"));
    assert!(full.to_string().contains("no free slot"), "{full}");
    for p in &plugged {
        c.remove(p).unwrap();
    }
    assert_eq!(c.stats().unwrap(), boot_stats);
    assert_eq!(held(), before);

    // Stopped with a disk plugged: a clean teardown on the confined VM thread, then no VM.
    let left = c.add_disk(vm.disk("left")).unwrap();
    let control = vm.control.clone();
    let outcome = vm.join().expect("the VM stops cleanly with a hot-plugged disk");
    assert_eq!(outcome.reason, StopReason::Stopped);
    let listed: Vec<String> = outcome.devices.iter().map(|d| d.path.to_string()).collect();
    assert_eq!(listed, ["01".to_string(), left.to_string()]);
    assert!(!control.is_running());
    assert!(matches!(control.remove(&left), Err(HotplugError::NotRunning)));
    assert!(matches!(control.stats(), Err(HotplugError::NotRunning)));
}

#[test]
fn concurrent_plugs_are_serialised_and_get_distinct_slots() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start();
    let boot_stats = vm.control.stats().unwrap();
    let before = held();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let c = vm.control.clone();
            let disks: Vec<DiskConfig> = (0..10).map(|i| vm.disk(&format!("w{w}-{i}"))).collect();
            let seen = seen.clone();
            std::thread::spawn(move || {
                for d in disks {
                    let p = c.add_disk(d).unwrap();
                    assert_eq!(cfg32(&c, &p, 0), VIRTIO_BLK_IDS);
                    seen.lock().unwrap().push(p.clone());
                    // Nobody else got this slot while it is plugged.
                    let owners = c.devices().unwrap().iter().filter(|x| x.path == p).count();
                    assert_eq!(owners, 1, "{p}");
                    c.remove(&p).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 40);
    let stats: HotplugStats = vm.control.stats().unwrap();
    assert_eq!(stats, boot_stats);
    // The workers' threads are gone; so is everything the plugs took.
    assert_eq!(held(), before);
    assert_eq!(vm.join().unwrap().reason, StopReason::Stopped);
}

/// virtio-fs (modern): vendor 0x1af4, device 0x1040 + 26.
const VIRTIO_FS_IDS: u32 = 0x105a_1af4;

/// A share plugged into a running VM gets a device thread of its own, confined (seccomp mode
/// 2) before the plug returns; a tag already in the VM is refused; unplugged, the thread is gone
/// with everything else, and 20 cycles leave the process as it was.
#[test]
fn a_share_gets_its_own_confined_thread_and_twenty_cycles_leave_nothing() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start();
    let c = vm.control.clone();
    let boot_stats = c.stats().unwrap();
    let before = held();
    let dir = vm.dir.path().join("share");
    std::fs::create_dir(&dir).unwrap();
    let share = shoji_vmm::ShareConfig { dir: dir.clone(), tag: "hot".into(), read_only: false };

    let p = c.add_share(share.clone()).unwrap();
    assert_eq!(cfg32(&c, &p, 0), VIRTIO_FS_IDS);
    let own: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().starts_with("fs-"))
        .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap())
        .collect();
    assert_eq!(own.len(), 1, "one thread for the share");
    assert!(own[0].lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])), "{}", own[0]);
    assert_eq!(c.stats().unwrap().own_threads, 1);
    assert_eq!(held().threads, before.threads + 1);

    let e = c.add_share(share.clone()).unwrap_err();
    assert!(matches!(e, HotplugError::TagInUse(ref t) if t == "hot"), "{e}");
    let e = c.add_share(shoji_vmm::ShareConfig { dir: dir.join("missing"), tag: "x".into(), read_only: true });
    assert!(matches!(e, Err(HotplugError::Share(_))), "{e:?}");
    c.remove(&p).unwrap();
    assert_eq!(cfg32(&c, &p, 0), u32::MAX, "the slot reads empty");
    assert_eq!(c.stats().unwrap(), boot_stats);
    assert_eq!(held(), before, "the share's thread or fds outlived it");

    for i in 0..20 {
        let a = c.add_share(share.clone()).unwrap();
        assert_eq!(a, p, "cycle {i}: the freed slot is the next one's");
        c.remove(&a).unwrap();
    }
    assert_eq!(c.stats().unwrap(), boot_stats);
    assert_eq!(held(), before);
    // A share still plugged when the VM stops goes with it.
    c.add_share(share).unwrap();
    assert_eq!(vm.join().unwrap().reason, StopReason::Stopped);
}

/// virtio-net (modern): vendor 0x1af4, device 0x1040 + 1.
const VIRTIO_NET_IDS: u32 = 0x1041_1af4;

/// Opens tap `name` on a thread in a new network namespace (root only); the namespace lives as
/// long as the tap.
fn private_tap(name: &'static str) -> shoji_vmm::Tap {
    std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; it moves this short-lived thread to a new namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET): run as root");
        shoji_vmm::Tap::open(name).unwrap()
    })
    .join()
    .unwrap()
}

/// A network device on a tap plugged into a running VM answers as virtio-net with the MAC in
/// its config space, and its unplug gives everything back (the tap closed with it).
#[test]
fn a_net_device_on_a_tap_is_plugged_and_unplugged_leaving_nothing() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start();
    let c = vm.control.clone();
    let boot_stats = c.stats().unwrap();
    let tap = private_tap("shoji-hp0");
    let small = shoji_vmm::NetConfig {
        backend: shoji_vmm::NetHost::Tap(private_tap("shoji-hp1")),
        mac: [2, 0, 0, 0, 0, 9],
        mtu: Some(60),
    };
    let e = c.add_net(small).unwrap_err();
    assert!(matches!(e, HotplugError::Mtu { mtu: 60 }), "{e}");
    assert_eq!(c.stats().unwrap(), boot_stats, "a refused device takes nothing");
    let before = held();
    let mac = [0x02, 0x53, 0x48, 0x00, 0x00, 0x07];
    let p = c.add_net(shoji_vmm::NetConfig { backend: shoji_vmm::NetHost::Tap(tap), mac, mtu: Some(1400) }).unwrap();
    assert_eq!(cfg32(&c, &p, 0), VIRTIO_NET_IDS);
    let listed = c.devices().unwrap();
    let d = listed.iter().find(|d| d.path == p).expect("listed");
    assert_eq!((d.kind, d.what.as_str()), ("virtio-net", "shoji-hp0 mac=02:53:48:00:00:07"));
    // The device config (MAC first) is in BAR 0 at the transport's device-config offset; the
    // guest reads it there. Here: the BAR answers and the slot is taken.
    assert_ne!(mmio32(&c, bar0(&c, &p)), u32::MAX);
    c.remove(&p).unwrap();
    assert_eq!(cfg32(&c, &p, 0), u32::MAX);
    assert_eq!(c.stats().unwrap(), boot_stats);
    let after = held();
    let expected = Held { fds: before.fds - 1, ..before };
    assert_eq!(after, expected, "everything but the tap's fd (closed with the device) as before");
    assert_eq!(vm.join().unwrap().reason, StopReason::Stopped);
}
