//! VMM confinement on the real /dev/kvm: every thread the library starts for a VM runs under
//! its seccomp filter (and without capabilities it does not need) while the caller's threads
//! stay as they were; a call outside a filter is refused, reported in one line naming the
//! thread and the syscall, and stops the VM with that reason; Landlock keeps the device
//! thread inside the VM's shares and disks. Needs /dev/kvm.
use shoji_vmm::confine::{self, Plan, ThreadKind, Violation};
use shoji_vmm::exit::ExitSignal;
use shoji_vmm::testkit::{self, Capture};
use shoji_vmm::{DiskConfig, SerialOut, ShareConfig, StopReason, VmConfig, VmError, VmOutcome};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

fn require_kvm() {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot real VMs and need /dev/kvm");
}

/// A running VM of the probe guest in `hang` mode, with a disk, a share and a vsock device, so
/// every kind of VMM thread exists; started through the library's own VM thread.
struct Vm {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(confine: bool) -> Vm {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let out = Capture::default();
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
        cfg.cmdline = "smp hang".into();
        cfg.vcpus = 2;
        cfg.serial = SerialOut::Writer(Box::new(out.clone()));
        cfg.disks = vec![DiskConfig { path: disk, read_only: false }];
        cfg.shares = vec![ShareConfig { tag: "t".into(), dir: share, read_only: false }];
        cfg.vsock = Some(dir.path().join("vsock.sock"));
        cfg.stop = Some(stop.clone());
        cfg.timeout = Some(Duration::from_secs(60));
        cfg.confine = confine;
        let thread = shoji_vmm::spawn(cfg, |_| {}).unwrap();
        let t0 = Instant::now();
        while !out.text().contains("probe: hanging") {
            assert!(t0.elapsed() < Duration::from_secs(60), "the probe did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vm { stop, thread: Some(thread), _dir: dir }
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

/// (tid, name, status) of every thread of this process.
fn threads() -> Vec<(i32, String, String)> {
    let mut v = vec![];
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path();
        let tid: i32 = p.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let Ok(status) = std::fs::read_to_string(p.join("status")) else { continue };
        let name = status.lines().next().unwrap().trim_start_matches("Name:\t").to_string();
        v.push((tid, name, status));
    }
    v
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {status}")).trim()
}

const VMM_THREADS: &[&str] = &["vcpu0", "vcpu1", "devices", "shoji-vm"];

/// Tests here boot VMs that the others' thread scans would see: one at a time.
static ONE: Mutex<()> = Mutex::new(());

#[test]
fn every_vmm_thread_runs_under_its_seccomp_filter_and_the_callers_do_not() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start(true);
    let all = threads();
    for name in VMM_THREADS {
        let (_, _, status) = all.iter().find(|(_, n, _)| n == name).unwrap_or_else(|| panic!("no thread {name}"));
        assert_eq!(field(status, "Seccomp:"), "2", "thread {name} is not under a seccomp filter");
        assert_eq!(field(status, "NoNewPrivs:"), "1", "thread {name}");
        let eff = u64::from_str_radix(field(status, "CapEff:"), 16).unwrap();
        let bnd = u64::from_str_radix(field(status, "CapBnd:"), 16).unwrap();
        // The device thread keeps the file-ownership capabilities (CHOWN, DAC_OVERRIDE,
        // DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID), the others none.
        let allowed: u64 = if *name == "devices" { 0b1101_1111 } else { 0 };
        assert_eq!(eff & !allowed, 0, "thread {name} has capabilities {eff:#x}");
        assert_eq!(bnd & !allowed, 0, "thread {name} has bounding set {bnd:#x}");
    }
    let me = field(&std::fs::read_to_string("/proc/thread-self/status").unwrap(), "Seccomp:").to_string();
    assert_eq!(me, "0", "the caller's thread must stay unfiltered");
    assert_eq!(vm.join().unwrap().reason, StopReason::Stopped);
}

#[test]
fn with_confinement_off_no_vmm_thread_is_filtered() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Vm::start(false);
    let all = threads();
    for name in VMM_THREADS {
        let (_, _, status) = all.iter().find(|(_, n, _)| n == name).unwrap_or_else(|| panic!("no thread {name}"));
        assert_eq!(field(status, "Seccomp:"), "0", "thread {name}");
    }
    assert_eq!(vm.join().unwrap().reason, StopReason::Stopped);
}

/// A syscall's return value and errno, once made.
type CallResult = Arc<Mutex<Option<(i32, Option<i32>)>>>;

/// The guest's console output, written on the vCPU thread that runs the guest's `out`; after
/// `trigger` it makes a forbidden call there, as a compromised vCPU thread would.
struct Tripwire {
    seen: Vec<u8>,
    trigger: &'static str,
    result: CallResult,
}

impl Write for Tripwire {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        self.seen.extend_from_slice(d);
        let mut r = self.result.lock().unwrap();
        if r.is_none() && String::from_utf8_lossy(&self.seen).contains(self.trigger) {
            // SAFETY: a plain syscall with integer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            *r = Some((fd, std::io::Error::last_os_error().raw_os_error()));
        }
        Ok(d.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A filter firing on a vCPU thread of a running VM stops the VM with the thread and the
/// syscall named; the VM's own thread stays filtered up to its end (its `done` callback).
#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_stops_the_vm_naming_thread_and_syscall() {
    require_kvm();
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let result = Arc::new(Mutex::new(None));
    let mut cfg = VmConfig::new(testkit::guest("probe").unwrap());
    cfg.cmdline = "hang".into();
    cfg.serial =
        SerialOut::Writer(Box::new(Tripwire { seen: vec![], trigger: "probe: hanging", result: result.clone() }));
    cfg.timeout = Some(Duration::from_secs(60));
    let done = Arc::new(Mutex::new(None));
    let d = done.clone();
    let t = shoji_vmm::spawn(cfg, move |_| {
        // SAFETY: a plain syscall with integer arguments.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        *d.lock().unwrap() = Some((fd, std::io::Error::last_os_error().raw_os_error()));
    })
    .unwrap();
    let r = t.join().unwrap();
    assert_eq!(*result.lock().unwrap(), Some((-1, Some(libc::EPERM))), "socket(AF_INET) on vcpu0 must be refused");
    match r {
        Err(VmError::Seccomp(v)) => {
            assert_eq!(v, Violation { thread: "vcpu0".into(), syscall: libc::SYS_socket as u32 });
            let msg = VmError::Seccomp(v).to_string();
            assert!(msg.contains("thread vcpu0") && msg.contains("syscall 41 (socket)"), "{msg}");
        }
        other => panic!("the VM should stop with the seccomp violation, got {other:?}"),
    }
    assert_eq!(*done.lock().unwrap(), Some((-1, Some(libc::EPERM))), "shoji-vm may not create sockets");
}

const CHILD_ENV: &str = "SHOJI_SECCOMP_TEST_KIND";

/// Run by [`forbidden_syscalls_are_refused_and_reported_on_each_thread_kind`] in a child
/// process (a refused call leaves a filtered thread behind): confines a thread with the
/// library's own function for the kind, then makes forbidden calls on it.
#[test]
fn child_makes_forbidden_syscalls_under_a_filter() {
    let Ok(kind) = std::env::var(CHILD_ENV) else { return };
    let kind = match kind.as_str() {
        "vcpu" => ThreadKind::Vcpu(0),
        "devices" => ThreadKind::Devices,
        _ => ThreadKind::Vmm,
    };
    let exit = Arc::new(ExitSignal::new().unwrap());
    let e = exit.clone();
    let t = std::thread::Builder::new().name(kind.name()).spawn(move || {
        let plan = Plan { enabled: true, device_paths: vec![] };
        let _c = confine::enter(kind, &plan, &e).expect("confine");
        // SAFETY: plain syscalls with valid (or null) arguments.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let sock_err = std::io::Error::last_os_error().raw_os_error();
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        // SAFETY: a NUL-terminated path and argv; execve only returns on failure.
        let exec = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null()) };
        let exec_err = std::io::Error::last_os_error().raw_os_error();
        (sock, sock_err, exec, exec_err)
    });
    let (sock, sock_err, exec, exec_err) = t.unwrap().join().unwrap();
    assert_eq!((sock, sock_err), (-1, Some(libc::EPERM)), "socket(AF_INET) must be refused");
    assert_eq!((exec, exec_err), (-1, Some(libc::EPERM)), "execve must be refused");
    let v = confine::violation(&exit).expect("the violation is recorded");
    assert_eq!(v, Violation { thread: kind.name(), syscall: libc::SYS_socket as u32 }, "the first one wins");
    assert!(exit.evt.read().is_ok(), "the VM's owner is woken");
    println!("CHILD-OK");
}

#[test]
fn forbidden_syscalls_are_refused_and_reported_on_each_thread_kind() {
    for (kind, name) in [("vcpu", "vcpu0"), ("devices", "devices"), ("vmm", "shoji-vm")] {
        let o = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_makes_forbidden_syscalls_under_a_filter", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, kind)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && out.contains("CHILD-OK"), "{kind}:\n{out}\n{err}");
        for (nr, call) in [(libc::SYS_socket, "socket"), (libc::SYS_execve, "execve")] {
            let line = format!("shoji: seccomp: thread {name} made forbidden syscall {nr} ({call}); stopping the VM");
            assert!(err.lines().any(|l| l == line), "{kind}: no line {line:?} in:\n{err}");
        }
    }
}

/// Landlock on the device thread: inside the shares and disks only.
#[test]
fn the_device_thread_opens_only_the_vms_shares_and_disks() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("in.txt"), b"in").unwrap();
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, b"secret").unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let plan = Plan { enabled: true, device_paths: vec![(share.clone(), true)] };
    let (inside, out_err, etc_err) = std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            let _c = confine::enter(ThreadKind::Devices, &plan, &exit).expect("confine");
            let inside = std::fs::read(share.join("in.txt")).map_err(|e| e.kind());
            let out = std::fs::read(&outside).map_err(|e| e.raw_os_error());
            let etc = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
            (inside, out.err(), etc.err())
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(inside, Ok(b"in".to_vec()));
    assert_eq!(out_err, Some(Some(libc::EACCES)), "a file outside the share");
    assert_eq!(etc_err, Some(Some(libc::EACCES)), "/etc/passwd");
}
