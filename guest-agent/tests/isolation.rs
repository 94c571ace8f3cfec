//! Attacks from inside a container on the guest it runs in, each tried for real against
//! `LinuxRuntime` with busybox containers: device nodes of the guest (the device cgroup) and
//! mount targets swapped for symlinks between planning and mounting. Needs root, /bin/busybox
//! and a cgroup2 mount (hybrid hosts have one at /sys/fs/cgroup/unified); without them the tests
//! fail and say why, they never skip.
#[path = "common/container_io.rs"]
mod container_io;
use container_io::read_all;
use serde_json::json;
use shoji_agent::runtime::{ContainerConfig, ContainerRuntime, ExitStatus, LinuxRuntime};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &["sh", "echo", "cat", "head", "wc", "mknod", "ls", "tty", "true"];
/// A wait longer than this is a hang.
const LIMIT: Duration = Duration::from_secs(20);

struct Bundle {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
}

/// A busybox rootfs in a temporary directory.
fn bundle() -> Bundle {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the isolation tests create namespaces and cgroups: run them as root");
    assert!(
        Path::new(BUSYBOX).is_file(),
        "the isolation tests need a static {BUSYBOX}: apt-get install busybox-static"
    );
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    Bundle { dir, rootfs }
}

/// A runtime on this machine's cgroup2 mount: the guest's kind of cgroup, where the device
/// rules are a BPF program.
fn v2_runtime(b: &Bundle) -> LinuxRuntime {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = info
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?;
            (right.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(mp))
        })
        .expect("no cgroup2 mount on this machine: the device cgroup tests need one (hybrid or unified cgroups)");
    LinuxRuntime::with_cgroup2(b.dir.path().join("state-v2"), &mount).unwrap()
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A spec running `script` with every capability (CAP_MKNOD included: the runtime leaves the
/// capabilities alone when the spec gives none).
fn spec_json(rootfs: &Path, id: &str, script: &str) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": rootfs, "readonly": false },
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "cgroupsPath": format!("/shoji-isolation-{}/{id}", std::process::id())
        }
    })
}

fn cfg(id: &str, v: serde_json::Value) -> ContainerConfig {
    ContainerConfig { id: id.into(), spec: serde_json::from_value(v).unwrap() }
}

/// Runs a created container to the end: (exit, stdout, stderr); the container is removed.
async fn run(rt: &LinuxRuntime, id: &str) -> (ExitStatus, String, String) {
    rt.start(id).await.unwrap();
    let (st, out, err) = tokio::join!(
        async { tokio::time::timeout(LIMIT, rt.wait(id, "")).await.expect("wait hangs").unwrap() },
        read_all(rt, id, "", false),
        read_all(rt, id, "", true)
    );
    rt.remove(id, 0).await.unwrap();
    (st, out, err)
}

/// The issue's attack: with CAP_MKNOD a container made nodes of the guest's devices and opened
/// them (serial console, kmsg, block devices). Now the open is refused by the device cgroup
/// (EPERM), while the standard devices and a pty still work.
#[tokio::test]
async fn guest_devices_cannot_be_opened_through_mknod() {
    let b = bundle();
    let rt = v2_runtime(&b);
    let id = unique("mknod");
    // Each line prints "<name>-opened" only when the open succeeded.
    let script = "mknod /dev/s0 c 4 64; echo x > /dev/s0 && echo s0-opened; \
                  mknod /dev/km c 1 11; echo shoji-isolation-test > /dev/km && echo km-opened; \
                  head -c1 /dev/km >/dev/null && echo km-read; \
                  mknod /dev/l0 b 7 0; head -c 512 /dev/l0 >/dev/null && echo l0-opened; \
                  echo standard; echo x > /dev/null && echo null-ok; head -c 5 /dev/zero | wc -c; \
                  head -c 7 /dev/urandom | wc -c; head -c 3 /dev/random | wc -c; \
                  echo x 2>/dev/null > /dev/full || echo full-enospc; \
                  (echo x > /dev/tty) 2>&1 | grep -c 'not permitted'; true";
    rt.create(cfg(&id, spec_json(&b.rootfs, &id, script))).await.unwrap();
    let (st, out, err) = run(&rt, &id).await;
    assert_eq!(st.status, 0, "{out}{err}");
    for (name, what) in [("s0", "the serial console"), ("km", "/dev/kmsg"), ("l0", "a loop device")] {
        assert!(!out.contains(&format!("{name}-opened")), "{what} opened from a container:\n{out}");
    }
    assert!(!out.contains("km-read"), "/dev/kmsg read from a container:\n{out}");
    assert_eq!(err.matches("Operation not permitted").count(), 4, "each open refused with EPERM:\n{err}");
    let standard = out.split_once("standard\n").map(|(_, s)| s).unwrap_or_default();
    assert_eq!(standard, "null-ok\n5\n7\n3\nfull-enospc\n0\n", "{out}{err}");

    // A terminal: the container's own ptmx and pts devices.
    let id = unique("pty");
    let mut v = spec_json(&b.rootfs, &id, "tty");
    v["process"]["terminal"] = json!(true);
    rt.create(cfg(&id, v)).await.unwrap();
    let (st, out, _) = run(&rt, &id).await;
    assert_eq!((st.status, out.trim()), (0, "/dev/pts/0"), "{out}");
}

/// A device the spec lists in `linux.devices` and allows in `linux.resources.devices` works,
/// with exactly the access the rule gives (here write, not read); the spec's rules come in order
/// (the last that matches decides).
#[tokio::test]
async fn spec_device_rules_allow_exactly_what_they_say() {
    let b = bundle();
    let rt = v2_runtime(&b);
    let id = unique("devrule");
    let script = "echo shoji-isolation-test > /dev/kmsg && echo kmsg-write-ok; \
                  head -c1 /dev/kmsg >/dev/null && echo kmsg-read-ok; \
                  echo x > /dev/null && echo null-ok; \
                  head -c 4 /dev/zero | wc -c; true";
    let mut v = spec_json(&b.rootfs, &id, script);
    v["linux"]["devices"] = json!([{ "path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 438 }]);
    v["linux"]["resources"] = json!({ "devices": [
        { "allow": false, "access": "rwm" },
        { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "rw" },
        { "allow": false, "type": "c", "major": 1, "minor": 11, "access": "r" }
    ]});
    rt.create(cfg(&id, v)).await.unwrap();
    let (st, out, err) = run(&rt, &id).await;
    assert_eq!(st.status, 0, "{out}{err}");
    assert_eq!(out, "kmsg-write-ok\nnull-ok\n4\n", "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
}

/// Swaps two names atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap();
    let b = std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap();
    // SAFETY: renameat2 on two NUL-terminated paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// runc CVE-2021-30465: the rootfs swaps a mount destination for a symlink to a path outside it
/// between the runtime's planning and its mount. The tmpfs for /mnt must land inside the rootfs;
/// had it landed on the host directory `victim`, the bind mount of `victim` at /data would show
/// that empty tmpfs instead of the marker file.
#[tokio::test]
async fn mount_target_symlinks_cannot_lead_outside_the_rootfs() {
    let b = bundle();
    let rt = LinuxRuntime::new(b.dir.path().join("state")).unwrap();
    let victim = b.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("marker"), "host-data\n").unwrap();
    // Where the symlink leads when resolved inside the rootfs.
    std::fs::create_dir_all(b.rootfs.join(victim.strip_prefix("/").unwrap())).unwrap();
    std::fs::create_dir(b.rootfs.join("data")).unwrap();
    let spec = |id: &str| {
        let mut v = spec_json(&b.rootfs, id, "cat /data/marker; echo x > /mnt/written && echo mnt-ok");
        let m = v["mounts"].as_array_mut().unwrap();
        m.push(json!({ "destination": "/mnt", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"] }));
        m.push(json!({ "destination": "/data", "type": "bind", "source": victim, "options": ["rbind", "ro"] }));
        v
    };

    // The symlink is there from the start.
    std::os::unix::fs::symlink(&victim, b.rootfs.join("mnt")).unwrap();
    let id = unique("mnt-link");
    rt.create(cfg(&id, spec(&id))).await.unwrap();
    let (st, out, err) = run(&rt, &id).await;
    assert_eq!((st.status, out.as_str()), (0, "host-data\nmnt-ok\n"), "{err}");
    assert!(!victim.join("written").exists(), "the container wrote into the host directory");

    // The symlink swapped in and out while containers are created: /mnt is a directory or the
    // symlink, in turn, as fast as renameat2 goes.
    std::fs::remove_file(b.rootfs.join("mnt")).unwrap();
    std::fs::create_dir(b.rootfs.join("mnt")).unwrap();
    std::os::unix::fs::symlink(&victim, b.rootfs.join("mnt-link")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, a, l) = (stop.clone(), b.rootfs.join("mnt"), b.rootfs.join("mnt-link"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                exchange(&a, &l).unwrap();
                n += 1;
            }
            n
        })
    };
    let (mut ran, mut escaped) = (0, Vec::new());
    for _ in 0..40 {
        let id = unique("mnt-race");
        // A create may fail when the swap lands mid-setup (the target vanishes); that is fine.
        if rt.create(cfg(&id, spec(&id))).await.is_err() {
            continue;
        }
        let (_, out, err) = run(&rt, &id).await;
        ran += 1;
        if !out.starts_with("host-data\n") {
            escaped.push(format!("{out}{err}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("{ran} of 40 containers ran, {swaps} swaps");
    assert!(escaped.is_empty(), "{} of {ran} mounts landed outside the rootfs: {:?}", escaped.len(), escaped);
    assert!(ran >= 10, "only {ran} of 40 containers started ({swaps} swaps)");
    assert!(!victim.join("written").exists(), "the container wrote into the host directory");
}

/// The checks the `spec_plan` fuzz target drives: a good spec passes them, nothing is created,
/// and a bad device rule is an error naming its field.
#[test]
fn check_spec_passes_a_good_spec_and_names_bad_fields() {
    let b = bundle();
    let v = spec_json(&b.rootfs, "check", "true");
    let before: Vec<_> = std::fs::read_dir(&b.rootfs).unwrap().map(|e| e.unwrap().file_name()).collect();
    LinuxRuntime::check_spec(&serde_json::from_value(v.clone()).unwrap()).unwrap();
    let after: Vec<_> = std::fs::read_dir(&b.rootfs).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after);
    let mut bad = v;
    bad["linux"]["resources"] = json!({ "devices": [{ "allow": true, "access": "rwx" }] });
    let e = LinuxRuntime::check_spec(&serde_json::from_value(bad).unwrap()).unwrap_err().to_string();
    assert!(e.starts_with("linux.resources.devices[0].access:"), "{e}");
}
