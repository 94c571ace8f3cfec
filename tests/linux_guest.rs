//! The shared slow suite: our Linux kernel (kernel-config/) with our initramfs (rootfs/) on the
//! real /dev/kvm, driven through the `shoji` CLI exactly as a user runs it. One boot per test
//! binary: on PVM hosts the guest kernel is emulated and takes ~10-20 s to reach /init.
use shoji_tests::{guest_artifacts, is_root, require_kvm, shoji_bin, Loop};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn default_guest_boots_our_agent_as_pid1_and_it_answers_over_vsock() {
    require_kvm();
    // Build (or find) the cached artifacts first, so the boot's time limit covers only the boot.
    guest_artifacts();
    let dir = std::env::temp_dir().join(format!("shoji-linux-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vsock.sock");
    // The agent's log stream: its guest -> host connection to port 1025 reaches SOCK_1025.
    let log = LogListener::bind(&format!("{}_1025", sock.display()));
    // Our initramfs, default kernel parameters; init arguments ask the agent for its log on vsock.
    let cmdline = format!("{} -- --log info --log-vsock", shoji_vmm::cmdline::DEFAULT);

    let start = Instant::now();
    let child = Command::new(shoji_bin())
        .args(["boot", "--vcpus", "2", "--timeout", "600", "--cmdline", &cmdline, "--vsock"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shoji boot");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (version, details) = rt.block_on(async {
        use shoji_protocol::agent::{CheckRequest, GuestDetailsRequest};
        use shoji_protocol::agent_ttrpc::{AgentServiceClient, HealthClient};
        let port = shoji_devices::model::AGENT_VSOCK_PORT;
        let client = shoji_protocol::client::connect(&sock, port, Duration::from_secs(540)).await.expect("agent");
        let ctx = || shoji_protocol::ttrpc::context::with_timeout(60_000_000_000);
        let version = HealthClient::new(client.clone()).version(ctx(), &CheckRequest::new()).await.expect("Version");
        let details = AgentServiceClient::new(client)
            .get_guest_details(ctx(), &GuestDetailsRequest::new())
            .await
            .expect("details");
        (version, details)
    });
    eprintln!("agent answered after {:?}: {version:?} {details:?}", start.elapsed());
    // SIGTERM: the VMM stops the VM cleanly.
    // SAFETY: (test) signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait for shoji boot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- console ---\n{stdout}--- stderr ---\n{stderr}");
    assert!(out.status.success(), "shoji boot after SIGTERM: {:?}", out.status);
    assert_eq!(version.api_version, shoji_protocol::API_VERSION);
    assert!(!version.agent_version.is_empty());
    assert!(details.init_daemon, "the agent is PID 1");
    assert!(details.kernel_release.ends_with("-shoji"), "our kernel: {}", details.kernel_release);
    assert_eq!(details.online_cpus, 2);
    for c in ["memory", "pids", "cpu"] {
        assert!(details.cgroup_controllers.iter().any(|x| x == c), "cgroup2 controller {c} in the guest");
    }
    assert!(!stdout.contains("Kernel panic"), "{stdout}");
    let pvm = shoji_vmm::host::is_pvm();
    assert_eq!(stderr.matches("/dev/kvm is PVM").count(), usize::from(pvm), "the PVM note, once on PVM hosts");
    assert!(!sock.exists(), "the VMM removes its vsock socket on SIGTERM");
    // The log stream ends with the VMM; it carries the agent's lines, as the console does.
    let log = log.lines();
    eprintln!("--- agent log on vsock port 1025 ---\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("INFO agent ready")), "the agent's start line on vsock: {log:?}");
    assert!(stdout.contains("agent ready"), "and on the console: {stdout}");
    assert!(!log.iter().any(|l| l.contains("ignoring the command line")), "the agent took its arguments");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The host end of a guest -> host vsock port: collects the lines of the first connection
/// until its end (the VMM closes it when the VM stops).
struct LogListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: std::thread::JoinHandle<Vec<String>>,
}

impl LogListener {
    fn bind(path: &str) -> LogListener {
        use std::sync::atomic::Ordering;
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if stopped.load(Ordering::Relaxed) {
                            return Vec::new();
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("accepting on the log port: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            BufReader::new(conn).lines().map_while(Result::ok).collect()
        });
        LogListener { stop, reader }
    }

    /// Call once the VM has stopped.
    fn lines(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.reader.join().unwrap()
    }
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// Our Linux guest finds the sandbox's devices where Shoji says they are, and uses them.
#[test]
fn linux_guest_sees_and_uses_the_devices() {
    require_kvm();
    guest_artifacts();
    let dir = std::env::temp_dir().join(format!("shoji-linux-devices-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    let content: Vec<u8> = (0..(2u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&rw, &content).unwrap();
    std::fs::write(&ro, &content[..1 << 20]).unwrap();
    let share = dir.join("share");
    let share_ro = dir.join("share-ro");
    for d in [&share, &share_ro] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("hello.txt"), "hello from the host\n").unwrap();
    }
    let cmdline = format!(
        "{} rdinit=/selftest shoji.selftest shoji.selftest.write=vda shoji.selftest.fs=hostdir shoji.selftest.fs=rodir \
         shoji.selftest.vsock=5000 shoji.selftest.vsock.host=6000",
        shoji_vmm::cmdline::DEFAULT
    );
    // vsock, guest -> host: the guest connects to the host's port 6000 = SOCKET_6000.
    let sock = dir.join("vsock.sock");
    let host_listener = UnixListener::bind(format!("{}_6000", sock.display())).unwrap();
    let guest_to_host = std::thread::spawn(move || {
        let (mut c, _) = host_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap()).read_line(&mut line).unwrap();
        c.write_all(b"host-reply\n").unwrap();
        line
    });
    let child = Command::new(shoji_bin())
        .args(["boot", "--timeout", "600", "--cmdline", &cmdline])
        .args(["--disk", rw.to_str().unwrap(), "--disk", &format!("{},ro", ro.display())])
        .args(["--share", &format!("{},tag=hostdir", share.display())])
        .args(["--share", &format!("{},tag=rodir,ro", share_ro.display())])
        .args(["--vsock", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run shoji boot");
    // vsock, host -> guest: CONNECT to the guest's port 5000 until its listener is up.
    let deadline = Instant::now() + Duration::from_secs(600);
    let echoed = loop {
        assert!(Instant::now() < deadline, "the guest's vsock listener never answered");
        if let Ok(mut s) = UnixStream::connect(&sock) {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut ok = String::new();
            if s.write_all(b"CONNECT 5000\n").is_ok() && r.read_line(&mut ok).is_ok() && ok.starts_with("OK ") {
                s.write_all(b"ping\n").unwrap();
                let mut reply = String::new();
                r.read_line(&mut reply).unwrap();
                break reply;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(echoed, "guest-echo: ping\n");
    assert_eq!(guest_to_host.join().unwrap(), "hello-from-guest\n");
    let out = child.wait_with_output().expect("wait for shoji boot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- console ---\n{stdout}--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?}", out.status);
    // PCI paths: host bridge at 00, the disks at 01 and 02 in the order given.
    for line in [
        "selftest: pci 0000:00:00.0 0x1b36:0x0008",
        "selftest: pci 0000:00:01.0 0x1af4:0x1042",
        "selftest: pci 0000:00:02.0 0x1af4:0x1042",
        "selftest: pci 0000:00:03.0 0x1af4:0x105a",
        "selftest: pci 0000:00:04.0 0x1af4:0x105a",
        "selftest: pci 0000:00:05.0 0x1af4:0x1053",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?}");
    }
    let first4k = fnv1a(&content[..4096]);
    assert!(stdout.contains(&format!("selftest: block vda sectors=4096 ro=0 read=4096 fnv={first4k:#010x}")));
    assert!(stdout.contains(&format!("selftest: block vdb sectors=2048 ro=1 read=4096 fnv={first4k:#010x}")));
    assert!(stdout.contains("selftest: wrote vda 512 sync=0"), "{stdout}");
    assert!(stdout.contains("SHOJI-INIT-DONE"));
    let after = std::fs::read(&rw).unwrap();
    assert!(after.starts_with(b"SHOJI-GUEST-WROTE-THIS\0"), "the guest's write reached the host file");
    assert_eq!(&after[512..], &content[512..], "nothing else changed");
    assert_eq!(std::fs::read(&ro).unwrap(), &content[..1 << 20], "read-only disk untouched");
    // virtio-fs: the guest mounts both shares, reads the host's file, writes only to the rw one.
    assert!(stdout.contains("selftest: fs hostdir hello.txt [hello from the host] len=19"), "{stdout}");
    assert!(stdout.contains("selftest: fs rodir hello.txt [hello from the host] len=19"), "{stdout}");
    assert!(stdout.contains("selftest: fs hostdir create errno=0"));
    assert!(stdout.contains("selftest: fs rodir create errno=30"), "EROFS on the read-only share");
    assert_eq!(std::fs::read_to_string(share.join("from-guest.txt")).unwrap(), "written by the guest\n");
    assert!(!share_ro.join("from-guest.txt").exists());
    assert!(stdout.contains("selftest: vsock echoed [ping]"));
    assert!(stdout.contains("selftest: vsock host replied [host-reply]"));
    assert!(!sock.exists(), "the VMM removes its vsock socket");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `shoji run` end to end, in one boot: the built-in rootfs, a read-only share at
/// /mnt/<name>, a read-only disk at /dev/vda, both output streams copied exactly, the command's
/// exit status, and nothing left in TMPDIR (vsock socket, console log, temp dir).
#[test]
fn shoji_run_prints_both_streams_and_exits_with_the_commands_status() {
    require_kvm();
    guest_artifacts();
    let dir = std::env::temp_dir().join(format!("shoji-linux-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tmp = dir.join("tmp");
    let share = dir.join("host-data");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..8].copy_from_slice(b"DISKDATA");
    std::fs::write(&disk, &image).unwrap();

    // No --net: loopback only, as ever.
    let script =
        "cat /mnt/host-data/hello.txt; head -c 8 /dev/vda; echo; ls /sys/class/net; echo out; echo err >&2; exit 5";
    let start = Instant::now();
    let out = Command::new(shoji_bin())
        .args(["run", "--timeout", "900", "--share", &format!("{},ro", share.display())])
        .args(["--disk", &format!("{},ro", disk.display()), "--", "sh", "-c", script])
        .env("TMPDIR", &tmp)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("shoji run took {:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}", start.elapsed());
    assert_eq!(out.status.code(), Some(5), "the command's exit status");
    assert_eq!(stdout, "hello from the host\nDISKDATA\nlo\nout\n");
    assert_eq!(stderr, "err\n", "the command's stderr, and nothing from shoji");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "shoji run leaves nothing behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A detached sandbox end to end, in one boot: `run -d` prints the name once the command runs,
/// `ps` lists it running, `exec` runs a second command in its container (output and exit
/// status), `kill` ends the command, `wait` gives its status, `ps -a` lists it exited, `logs`
/// has the command's output, and `rm` leaves no process, no state dir and no socket. It runs
/// with `--net user`: the exec reaches a listener on the host's loopback through passt.
#[test]
fn detached_sandbox_execs_is_killed_and_removed() {
    require_kvm();
    guest_artifacts();
    let runs = tempfile::Builder::new().prefix("shoji-linux-detached-").tempdir().unwrap();
    let shoji = |args: &[&str]| {
        let out = Command::new(shoji_bin())
            .args(args)
            .env("SHOJI_RUN_DIR", runs.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run shoji");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        eprintln!("shoji {args:?}: {:?}\n{}{}", out.status, text(&out.stdout), text(&out.stderr));
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    /// Whatever fails, no sandbox is left running; its logs are shown.
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let dir = self.0.join("x");
            if std::thread::panicking() && dir.exists() {
                for f in ["sandbox.log", "console.log", "output.log", "state.json"] {
                    let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                    eprintln!("--- {f} ---\n{text}");
                }
                let _ = Command::new(shoji_bin()).args(["rm", "-f", "x"]).env("SHOJI_RUN_DIR", self.0).status();
            }
        }
    }
    let _cleanup = Cleanup(runs.path());

    // With a --device (root only, for the loop device): plugged by the sandbox process from the
    // saved plan, read through `exec`.
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("disk.img");
    let mut data = vec![0u8; 1 << 20];
    data[..16].copy_from_slice(b"SHOJI-DETACHED-1");
    std::fs::write(&image, &data).unwrap();
    let lo = if is_root() {
        Some(Loop::attach(&image))
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs the tests as root");
        eprintln!("not root: `run -d --device` is not tried here");
        None
    };
    let device = lo.as_ref().map(|l| format!("{}:/dev/xvdz:r", l.0.display()));
    // User-mode networking (passt): the host's loopback at 10.0.2.2.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let mut args = vec!["run", "-d", "--name", "x", "--net", "user"];
    if let Some(d) = &device {
        args.extend(["--device", d]);
    }
    args.extend(["--", "sh", "-c", "echo started; sleep 1000"]);
    let start = Instant::now();
    let (code, out, _) = shoji(&args);
    eprintln!("run -d took {:?}", start.elapsed());
    assert_eq!((code, out.as_str()), (Some(0), "x\n"), "run -d prints the name");
    let dir = runs.path().join("x");
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    let pid: i32 = state
        .split("\"pid\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("the sandbox process's pid in state.json");
    assert!(dir.join("vsock.sock").exists());

    let (code, out, _) = shoji(&["ps"]);
    assert_eq!(code, Some(0));
    assert!(out.lines().any(|l| l.starts_with("x ") && l.contains(" running ")), "{out}");

    let (code, out, err) = shoji(&["exec", "x", "--", "sh", "-c", "echo from-exec; echo to-stderr >&2; exit 3"]);
    assert_eq!((code, out.as_str(), err.as_str()), (Some(3), "from-exec\n", "to-stderr\n"));
    let script = format!("ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; echo hello-host | nc 10.0.2.2 {port}");
    let (code, out, err) = shoji(&["exec", "x", "--", "sh", "-c", &script]);
    assert_eq!((code, out.as_str()), (Some(0), "inet 10.0.2.15/24\n"), "{err}");
    host.set_nonblocking(false).unwrap();
    let (mut conn, _) = host.accept().unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert_eq!(got, "hello-host\n", "the guest reached the host's loopback through passt");
    let (code, _, err) = shoji(&["exec", "x", "--", "no-such-command"]);
    assert_eq!(code, Some(127), "{err}");
    if lo.is_some() {
        let (code, out, err) = shoji(&["exec", "x", "--", "head", "-c", "16", "/dev/xvdz"]);
        assert_eq!((code, out.as_str()), (Some(0), "SHOJI-DETACHED-1"), "{err}");
    }

    let (code, _, _) = shoji(&["kill", "x"]);
    assert_eq!(code, Some(0));
    // `wait` returns once the sandbox process has recorded the status and stopped the VM.
    let (code, out, _) = shoji(&["wait", "x"]);
    assert_eq!((code, out.as_str()), (Some(0), "137\n"), "SIGKILL");
    let (_, out, _) = shoji(&["ps", "-a"]);
    assert!(out.lines().any(|l| l.starts_with("x ") && l.contains(" exited(137) ")), "{out}");
    let (_, out, _) = shoji(&["ps"]);
    assert_eq!(out.lines().count(), 1, "no running sandbox: {out}");
    let (code, out, _) = shoji(&["logs", "x"]);
    assert_eq!((code, out.as_str()), (Some(0), "started\n"));
    let (code, out, _) = shoji(&["logs", "--console", "x"]);
    assert_eq!(code, Some(0));
    // (The boot's "agent ready" is in the VM template's console; a restored sandbox's console
    // starts after it.)
    assert!(out.contains("sandbox created sandbox=shoji-x"), "the console has the agent's log: {out}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("__sandbox"), "the sandbox process has exited");
    assert!(!dir.join("vsock.sock").exists(), "the VMM removed its socket");

    let (code, out, _) = shoji(&["rm", "x"]);
    assert_eq!((code, out.as_str()), (Some(0), "x\n"));
    assert!(!dir.exists(), "rm removes the state dir");
    assert!(std::fs::read_dir(runs.path()).unwrap().next().is_none());
}

/// A missing program is Docker's 127 under `shoji run`, from the agent's typed start failure
/// (the message names it), and the tool's own errors stay 125.
#[test]
fn shoji_run_of_a_missing_program_exits_127() {
    require_kvm();
    guest_artifacts();
    let out = Command::new(shoji_bin())
        .args(["run", "--timeout", "900", "--", "/no/such/program", "arg"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- stderr ---\n{stderr}");
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(stderr.contains("\"/no/such/program\": executable not found"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}
