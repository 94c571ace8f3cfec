//! Devices plugged into a running sandbox, in our Linux guest with our agent (issue 12): the VMM
//! places a virtio-blk function in a free slot of bus 0, the agent rescans the bus when a
//! container names that PCI path, waits for the uevent and rewrites the spec's host numbers to
//! the guest node's. One boot per test; on PVM hosts a boot takes ~20-60 s and a container a few
//! seconds.
//!
//! - through `shoji run --device` as a user types it, on a host loop device: the container reads
//!   the host's bytes through a node with the guest's numbers and its write lands in the file;
//! - with the sandbox library, in one boot: add, use, remove (released by the guest), add again
//!   into the freed slot, then cycles of add, use and remove, after which the VMM holds no more
//!   devices, GSIs or BARs and the process no more fds, threads or mappings than before; then the
//!   seed's collision case: two disks whose spec numbers are each other's guest numbers, each
//!   read through its own path (the agent's batched rewrite); then a virtio-fs share added to
//!   the running VM (its own confined device thread), used by a container both ways, refused
//!   while mounted, removed, added again into the same slot and removed: no thread, device or
//!   fd left; then a virtio-net device on a tap in a private host network namespace: the
//!   guest's driver binds it, and a container pings the host end and exchanges a TCP message
//!   with a host listener through it.
use shoji_sandbox::{
    hotplugged_virtiofs_storage, virtiofs_storage, ContainerSpec, Device, DiskConfig, Hotplug, PciPath, Sandbox,
    SandboxConfig, Session, SessionConfig, ShareConfig, Stream, Unplugged,
};
use shoji_tests::{guest_artifacts, process_resources, require_kvm, shoji_bin, Loop};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the host writes at the start of each disk.
const MAGIC: &[u8; 16] = b"SHOJI-HOTPLUG-01";
/// The container's path for the device (not the host's).
const XVDZ: &str = "/dev/xvdz";
/// The second disk's first bytes.
const OTHER_MAGIC: &[u8; 16] = b"SHOJI-HOTPLUG-02";
/// The numbers the first disk hot-plugged into a sandbox gets in our guest (virtblk's dynamic
/// major, minor 0); the collision case checks them.
const FIRST_GUEST_DISK: (u32, u32) = (254, 0);
/// Add/use/remove cycles after the first add-remove-add (issue 12 asks for 20).
const CYCLES: usize = 20;

/// A 1 MiB image starting with `MAGIC`.
fn image(path: &Path) {
    let mut data = vec![0u8; 1 << 20];
    data[..MAGIC.len()].copy_from_slice(MAGIC);
    std::fs::write(path, &data).unwrap();
}

/// The major and minor of an `ls -l` line of a device node ("brw-rw----  1 root root 254,  0 ...").
fn ls_numbers(line: &str) -> Option<(u32, u32)> {
    let (before, after) = line.split_once(',')?;
    let major = before.split_whitespace().last()?.parse().ok()?;
    let minor = after.split_whitespace().next()?.parse().ok()?;
    Some((major, minor))
}

#[test]
fn ls_numbers_parses_busybox_device_lines() {
    assert_eq!(ls_numbers("brw-rw----    1 root     root      254,   0 Jan  1 00:00 /dev/xvdz"), Some((254, 0)));
    assert_eq!(ls_numbers("-rw-r--r-- 1 root root 5 Jan 1 00:00 /x"), None);
}

fn shoji(args: &[&str], tmp: &Path) -> (Option<i32>, String, String) {
    let start = Instant::now();
    let out = Command::new(shoji_bin())
        .args(args)
        .env("TMPDIR", tmp)
        .env("SHOJI_RUN_DIR", tmp.join("runs"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("shoji {args:?} took {:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}", start.elapsed());
    (out.status.code(), stdout, stderr)
}

#[test]
fn shoji_run_device_passes_a_host_loop_device_by_the_guests_numbers() {
    require_kvm();
    guest_artifacts();
    let dir = tempfile::Builder::new().prefix("shoji-hotplug-cli-").tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();

    // A char device: one line, Docker's status for the tool's errors, nothing booted or left.
    let (code, out, err) = shoji(&["run", "--device", "/dev/null:/dev/xvdz", "--", "true"], &tmp);
    assert_eq!(code, Some(125), "{out}{err}");
    assert_eq!(err, "shoji: error: device: /dev/null: character devices cannot be passed into the sandbox\n");
    let left: Vec<_> = std::fs::read_dir(tmp.join("runs")).into_iter().flatten().flatten().collect();
    assert!(left.iter().all(|e| e.file_name().to_string_lossy().starts_with('.')), "left behind: {left:?}");

    let file = dir.path().join("disk.img");
    image(&file);
    let lo = Loop::attach(&file);
    let host = std::fs::metadata(&lo.0).unwrap().rdev();
    let host = (libc::major(host), libc::minor(host));
    let device = format!("{}:{XVDZ}", lo.0.display());
    let script = format!(
        "head -c 16 {XVDZ}; echo; ls -l {XVDZ}; printf W | dd of={XVDZ} bs=1 seek=100 conv=notrunc,fsync 2>/dev/null \
         && echo written"
    );
    let (code, out, err) = shoji(&["run", "--timeout", "600", "--device", &device, "--", "sh", "-c", &script], &tmp);
    drop(lo);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(std::str::from_utf8(MAGIC).unwrap()), "{out}");
    let ls = lines.next().unwrap_or_default();
    assert!(ls.starts_with('b') && ls.ends_with(XVDZ), "{ls}");
    let guest = ls_numbers(ls).unwrap_or_else(|| panic!("no numbers in {ls:?}"));
    assert_ne!(guest, host, "the node has the host loop device's numbers, not the guest's");
    assert_eq!(lines.next(), Some("written"), "{out}");
    let data = std::fs::read(&file).unwrap();
    assert_eq!(data[100], b'W', "the container's write did not reach the host file");
    assert_eq!(&data[..16], MAGIC);
}

/// The built-in busybox rootfs `shoji setup` cached ("run rootfs DIR (...)" in its output).
fn run_rootfs() -> PathBuf {
    let out = Command::new(shoji_bin()).arg("setup").output().expect("run shoji setup");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("run rootfs").map(|r| PathBuf::from(r.split_whitespace().next().unwrap_or(""))))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| panic!("no run rootfs in shoji setup's output:\n{text}"))
}

const GUEST_ROOTFS: &str = "/run/shoji/rootfs";

/// The OCI spec (JSON) of a container on the busybox rootfs running `args` as root, in its
/// own PID and mount namespaces, with /proc and a small /dev tmpfs, then `mounts`; `process`
/// and `linux` entries are added to (or replace) the defaults.
fn busybox_spec(
    args: &[&str],
    mounts: &[serde_json::Value],
    process: serde_json::Value,
    linux: serde_json::Value,
) -> Vec<u8> {
    let mut all = vec![
        serde_json::json!({ "destination": "/proc", "type": "proc", "source": "proc" }),
        serde_json::json!({ "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=64k"] }),
    ];
    all.extend(mounts.iter().cloned());
    let mut spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": GUEST_ROOTFS, "readonly": true },
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin:/sbin:/usr/bin"],
            "cwd": "/"
        },
        "mounts": all,
        "linux": { "namespaces": [ { "type": "pid" }, { "type": "mount" } ] }
    });
    for (key, extra) in [("process", process), ("linux", linux)] {
        if let (Some(base), Some(extra)) = (spec[key].as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
    }
    serde_json::to_vec(&spec).unwrap()
}

/// A hot-plugged disk as a container spec names it: its path in the container, the numbers the
/// spec gives it (the host's, in the shim's flow; the agent rewrites them) and its PCI path.
struct SpecDisk<'a> {
    path: &'a str,
    numbers: (u32, u32),
    pci: &'a PciPath,
}

/// A container running `args` with `disks` (read-only in its device cgroup).
fn with_disks(id: &str, args: &[&str], disks: &[SpecDisk<'_>]) -> ContainerSpec {
    let nodes: Vec<_> = disks
        .iter()
        .map(|d| serde_json::json!({ "path": d.path, "type": "b", "major": d.numbers.0, "minor": d.numbers.1, "fileMode": 432 }))
        .collect();
    let mut rules = vec![serde_json::json!({ "allow": false, "access": "rwm" })];
    rules.extend(disks.iter().map(
        |d| serde_json::json!({ "allow": true, "type": "b", "major": d.numbers.0, "minor": d.numbers.1, "access": "r" }),
    ));
    let linux = serde_json::json!({ "devices": nodes, "resources": { "devices": rules } });
    ContainerSpec {
        id: id.into(),
        spec_json: busybox_spec(args, &[], serde_json::json!({}), linux),
        rootfs: GUEST_ROOTFS.into(),
        devices: disks
            .iter()
            .map(|d| Device {
                id: d.pci.to_string(),
                type_: "blk".into(),
                container_path: d.path.into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A container running `script` with the hot-plugged share `tag` (at `pci`) bound at /mnt.
fn with_share(id: &str, tag: &str, pci: &PciPath, script: &str) -> ContainerSpec {
    let guest_dir = format!("/run/shoji/{tag}");
    let bind =
        serde_json::json!({ "destination": "/mnt", "type": "bind", "source": guest_dir, "options": ["rbind", "rw"] });
    ContainerSpec {
        id: id.into(),
        spec_json: busybox_spec(&["sh", "-c", script], &[bind], serde_json::json!({}), serde_json::json!({})),
        rootfs: GUEST_ROOTFS.into(),
        storages: vec![hotplugged_virtiofs_storage(tag, pci, &guest_dir, false)],
        ..Default::default()
    }
}

/// This process's threads whose name starts with `prefix`: (tid, /proc status text).
fn threads_named(prefix: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            found.push((t.file_name().to_string_lossy().into_owned(), status));
        }
    }
    found
}

/// The host end of the test network: a tap in a network namespace of its own, up with
/// 10.0.2.1/24, and a TCP listener on 10.0.2.1:7777 in that namespace.
fn host_network() -> (shoji_sandbox::Tap, std::net::TcpListener) {
    std::thread::spawn(|| {
        // SAFETY: unshare with a flag only; it moves this short-lived thread to a new namespace,
        // which the tap and the listener keep alive.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET): run as root");
        let tap = shoji_sandbox::Tap::open("shoji-net0").unwrap();
        if_up_with_address("shoji-net0", [10, 0, 2, 1], [255, 255, 255, 0]);
        let listener = std::net::TcpListener::bind("10.0.2.1:7777").unwrap();
        (tap, listener)
    })
    .join()
    .unwrap()
}

/// `ifconfig NAME ADDR netmask MASK up`, by ioctls on a socket of the calling thread's namespace.
fn if_up_with_address(name: &str, addr: [u8; 4], mask: [u8; 4]) {
    #[repr(C)]
    struct IfReqAddr {
        name: [u8; 16],
        addr: libc::sockaddr_in,
        _pad: [u8; 8],
    }
    #[repr(C)]
    struct IfReqFlags {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut ifname = [0u8; 16];
    ifname[..name.len()].copy_from_slice(name.as_bytes());
    let sin = |a: [u8; 4]| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a) },
        sin_zero: [0; 8],
    };
    // SAFETY: socket with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    for (req, a) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, mask)] {
        let mut r = IfReqAddr { name: ifname, addr: sin(a), _pad: [0; 8] };
        // SAFETY: the request reads one ifreq with an address, which lives across the call.
        assert_eq!(unsafe { libc::ioctl(fd, req, &mut r) }, 0, "{}", std::io::Error::last_os_error());
    }
    let mut f = IfReqFlags { name: ifname, flags: 0, _pad: [0; 22] };
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq with flags, live across the calls.
    unsafe {
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut f), 0);
        f.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut f), 0, "{}", std::io::Error::last_os_error());
        libc::close(fd);
    }
}

/// A container in the guest's own network namespace, with what it needs to bring up the
/// hot-plugged interface at PCI slot `slot` and talk through it.
fn network_user(id: &str, slot: u8) -> ContainerSpec {
    let script = format!(
        "echo 1 > /sys/bus/pci/rescan; \
         for i in $(seq 50); do set -- /sys/bus/pci/devices/0000:00:{slot:02x}.0/virtio*/net/*; [ -e \"$1\" ] && break; sleep 0.1; done; \
         IF=${{1##*/}}; echo \"if $IF $(cat /sys/class/net/$IF/address)\"; \
         ip link set $IF up && ip addr add 10.0.2.2/24 dev $IF && ping -c 2 -W 10 10.0.2.1 >/dev/null && echo ping-ok; \
         echo hello-from-guest | nc 10.0.2.1 7777"
    );
    let caps = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE"];
    let sysfs = serde_json::json!({ "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["rw", "nosuid", "nodev", "noexec"] });
    let process = serde_json::json!({ "capabilities": { "bounding": caps, "effective": caps, "permitted": caps } });
    ContainerSpec {
        id: id.into(),
        spec_json: busybox_spec(&["sh", "-c", &script], &[sysfs], process, serde_json::json!({})),
        rootfs: GUEST_ROOTFS.into(),
        ..Default::default()
    }
}

/// A container that prints the first 16 bytes of its hot-plugged disk (placeholder numbers in
/// the spec, which the agent rewrites).
fn reader(id: &str, pci: &PciPath) -> ContainerSpec {
    with_disks(id, &["head", "-c", "16", XVDZ], &[SpecDisk { path: XVDZ, numbers: (0, 99), pci }])
}

/// How long a container may take, create to removal (a hung device must fail the test, not
/// hang it: waiting on a process has no RPC limit).
const CONTAINER_LIMIT: Duration = Duration::from_secs(180);

/// Creates, runs and removes a reader of `pci` (holding the plug lock across the create):
/// what it printed.
async fn read_in_container(session: &Session, hotplug: &Hotplug, id: &str, pci: &PciPath) -> String {
    run_in_container(session, hotplug, reader(id, pci)).await
}

/// Creates, runs and removes `spec`'s container: what it printed.
async fn run_in_container(session: &Session, hotplug: &Hotplug, spec: ContainerSpec) -> String {
    let id = spec.id.clone();
    tokio::time::timeout(CONTAINER_LIMIT, run_in_container_unbounded(session, hotplug, spec))
        .await
        .unwrap_or_else(|_| panic!("{id}: not done in {CONTAINER_LIMIT:?}"))
}

async fn run_in_container_unbounded(session: &Session, hotplug: &Hotplug, spec: ContainerSpec) -> String {
    let id = spec.id.clone();
    let process = {
        let _plugs = hotplug.lock().await;
        session.create_container(spec).await.unwrap_or_else(|e| panic!("create {id}: {e}"))
    };
    process.start().await.unwrap();
    let mut out = Vec::new();
    process.copy_output(Stream::Stdout, &mut out).await.unwrap();
    let mut err = Vec::new();
    process.copy_output(Stream::Stderr, &mut err).await.unwrap();
    let status = process.wait().await.unwrap();
    assert_eq!(status.status, 0, "{id}: {}", String::from_utf8_lossy(&err));
    session.remove_container(&id).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn hot_add_use_remove_reuse_and_cycles_leave_nothing_behind() {
    require_kvm();
    let (kernel, initrd) = guest_artifacts();
    let rootfs = run_rootfs();
    let rootfs_dir = rootfs.canonicalize().unwrap_or_else(|_| rootfs.clone());
    let dir = tempfile::Builder::new().prefix("shoji-hotplug-lib-").tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    image(&disk);
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let mut cfg = SandboxConfig::new(vm_dir.clone());
    (cfg.kernel, cfg.initrd) = (Some(kernel), Some(initrd));
    cfg.shares = vec![shoji_sandbox::ShareConfig { dir: rootfs, tag: "rootfs".into(), read_only: true }];
    let vm = Sandbox::start(&cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let boot = Instant::now();
            let session = Session::create(
                &vm,
                SessionConfig {
                    sandbox_id: "hotplug".into(),
                    hostname: "hotplug".into(),
                    storages: vec![virtiofs_storage("rootfs", GUEST_ROOTFS, true)],
                },
            )
            .await
            .unwrap();
            eprintln!("booted in {:?}", boot.elapsed());
            let hotplug = Hotplug::new();
            let plug = || hotplug.plug_disk(&vm, DiskConfig { path: disk.clone(), read_only: true });
            let unplug = |at: PciPath| {
                let (vm, session, hotplug) = (&vm, &session, &hotplug);
                async move { hotplug.unplug(vm, session, &at, Duration::from_secs(10), false).await.unwrap() }
            };

            let start = process_resources();
            let start_fds = shoji_tests::fd_targets();
            // One round first, so what the first create and unplug set up for good (the runtime's
            // and the allocator's buffers) is in the mappings' baseline; fds and threads are
            // compared with the counts before it too.
            let first = plug().await.unwrap();
            let t = Instant::now();
            assert_eq!(read_in_container(&session, &hotplug, "c-first", &first).await.as_bytes(), MAGIC);
            eprintln!("{first}: add to bytes read in a container: {:?}", t.elapsed());
            assert_eq!(unplug(first.clone()).await, Unplugged::Released);
            let stats = vm.hotplug_stats().unwrap();
            let before = process_resources();
            assert_eq!(stats.hot_devices, 0, "{stats:?}");

            // The freed slot is the next add's.
            let again = plug().await.unwrap();
            assert_eq!(again, first, "the freed slot was not reused");
            assert_eq!(read_in_container(&session, &hotplug, "c-again", &again).await.as_bytes(), MAGIC);
            assert_eq!(unplug(again).await, Unplugged::Released);

            let t = Instant::now();
            for i in 0..CYCLES {
                let at = plug().await.unwrap();
                assert_eq!(at, first, "cycle {i}");
                // Every 5th add is used in a container (the agent rescans and finds it); the
                // others go straight to the agent's RemoveDevice (seconds a container under PVM).
                if i % 5 == 0 {
                    let out = read_in_container(&session, &hotplug, &format!("c{i}"), &at).await;
                    assert_eq!(out.as_bytes(), MAGIC, "cycle {i}");
                }
                assert_eq!(unplug(at).await, Unplugged::Released, "cycle {i}");
            }
            eprintln!("{CYCLES} add/read/remove cycles: {:?}", t.elapsed());
            let after = process_resources();
            assert_eq!(vm.hotplug_stats().unwrap(), stats, "the VMM kept hot-plug resources");
            // No growth (a leak); a helper thread that happened to run at `before` (tokio's
            // blocking pool, a stream copier) may be gone by now, so fewer is fine.
            assert!(
                after.fds <= before.fds && after.threads <= before.threads && after.mappings <= before.mappings,
                "the process kept fds, threads or mappings: {after:?} after the cycles, {before:?} before"
            );
            // Against the counts before the first plug too, but without the virtio-fs inode fds
            // of the rootfs share: the guest's dentry cache keeps what the first container looked
            // up (capped by the fs device, and no hot-plug's).
            let not_share = |fds: Vec<String>| -> Vec<String> {
                fds.into_iter().filter(|f| !Path::new(f).starts_with(&rootfs_dir)).collect()
            };
            let (fds_then, fds_now) = (not_share(start_fds), not_share(shoji_tests::fd_targets()));
            let mut left = fds_then.clone();
            let new: Vec<&String> = fds_now
                .iter()
                .filter(|f| match left.iter().position(|x| x == *f) {
                    Some(i) => {
                        left.remove(i);
                        false
                    }
                    None => true,
                })
                .collect();
            assert!(new.is_empty(), "fds opened since before the first plug and still open: {new:?}");
            assert!(after.threads <= start.threads, "threads: {after:?} now, {start:?} before the first plug");

            // The seed's collision case, arranged: two disks whose spec numbers are each other's
            // guest numbers (the first disk plugged gets virtblk minor 0, the second minor 16).
            // A rewrite that maps one device at a time would turn the first's rewritten entry
            // into the second's numbers: both paths would then read the same disk.
            let other = dir.path().join("other.img");
            let mut data = vec![0u8; 1 << 20];
            data[..16].copy_from_slice(OTHER_MAGIC);
            std::fs::write(&other, &data).unwrap();
            let a = plug().await.unwrap();
            let b = hotplug.plug_disk(&vm, DiskConfig { path: other.clone(), read_only: true }).await.unwrap();
            let (first_disk, second_disk) = (FIRST_GUEST_DISK, (FIRST_GUEST_DISK.0, FIRST_GUEST_DISK.1 + 16));
            let spec = with_disks(
                "c-collide",
                &["sh", "-c", "head -c 16 /dev/xa; echo; head -c 16 /dev/xb; echo; ls -l /dev/xa /dev/xb"],
                &[
                    SpecDisk { path: "/dev/xa", numbers: second_disk, pci: &a },
                    SpecDisk { path: "/dev/xb", numbers: first_disk, pci: &b },
                ],
            );
            let out = run_in_container(&session, &hotplug, spec).await;
            let lines: Vec<&str> = out.lines().collect();
            let numbers: Vec<_> = lines.iter().skip(2).filter_map(|l| ls_numbers(l)).collect();
            assert_eq!(
                numbers,
                [first_disk, second_disk],
                "the guest gave the disks other numbers than the collision needs: {out}"
            );
            assert_eq!(lines[..2], [std::str::from_utf8(MAGIC).unwrap(), std::str::from_utf8(OTHER_MAGIC).unwrap()], "{out}");
            eprintln!("collision: /dev/xa {second_disk:?} -> {first_disk:?}, /dev/xb {first_disk:?} -> {second_disk:?}; each read its own disk");
            assert_eq!(unplug(a).await, Unplugged::Released);
            assert_eq!(unplug(b).await, Unplugged::Released);

            // virtio-fs after boot: a host directory shared into the running VM.
            let share_dir = dir.path().join("hot-share");
            std::fs::create_dir(&share_dir).unwrap();
            std::fs::write(share_dir.join("hello"), "from the host\n").unwrap();
            let share = ShareConfig { dir: share_dir.clone(), tag: "hot0".into(), read_only: false };
            let (stats, fds) = (vm.hotplug_stats().unwrap(), not_share(shoji_tests::fd_targets()));
            assert!(threads_named("fs-").is_empty());
            let t = Instant::now();
            let at = hotplug.plug_share(&vm, share.clone()).await.unwrap();
            // Served by a thread of its own, confined like the boot device thread.
            let own = threads_named("fs-");
            assert_eq!(own.len(), 1, "{own:?}");
            assert!(own[0].1.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])), "{}", own[0].1);
            assert_eq!(vm.hotplug_stats().unwrap().own_threads, 1);
            let again = hotplug.plug_share(&vm, ShareConfig { tag: "rootfs".into(), ..share.clone() }).await;
            let msg = again.expect_err("a second device with a tag in use").to_string();
            assert!(msg.contains("tag \"rootfs\" is in the VM already"), "{msg}");

            let script = "cat /mnt/hello && echo from-the-guest > /mnt/written && grep -w /mnt /proc/mounts";
            let out = run_in_container(&session, &hotplug, with_share("c-fs", "hot0", &at, script)).await;
            eprintln!("{at}: share added, mounted and used by a container in {:?}:\n{out}", t.elapsed());
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some("from the host"), "{out}");
            assert!(lines.next().is_some_and(|l| l.starts_with("hot0 /mnt virtiofs rw")), "{out}");
            assert_eq!(std::fs::read_to_string(share_dir.join("written")).unwrap(), "from-the-guest\n");

            // In use by a (stopped, not removed) container: the agent refuses to release it.
            let spec = with_share("c-fs-held", "hot0", &at, "true");
            let process = {
                let _plugs = hotplug.lock().await;
                session.create_container(spec).await.unwrap()
            };
            process.start().await.unwrap();
            assert_eq!(process.wait().await.unwrap().status, 0);
            let held = hotplug.unplug(&vm, &session, &at, Duration::from_secs(10), false).await;
            let msg = held.expect_err("released while a container has it").to_string();
            assert!(msg.contains("c-fs-held"), "{msg}");
            session.remove_container("c-fs-held").await.unwrap();
            assert_eq!(unplug(at.clone()).await, Unplugged::Released);
            assert!(threads_named("fs-").is_empty(), "the share's device thread outlived it");

            // Its slot and tag are free again; a share never mounted goes as well.
            let again = hotplug.plug_share(&vm, share.clone()).await.unwrap();
            assert_eq!(again, at, "the freed slot was not reused");
            assert_eq!(unplug(again).await, Unplugged::Released);
            assert_eq!(vm.hotplug_stats().unwrap(), stats, "the VMM kept hot-plug resources");
            assert!(threads_named("fs-").is_empty());
            // (Without the rootfs share's inode fds: the container looked up new names there.)
            let fds_now = not_share(shoji_tests::fd_targets());
            assert!(fds_now.len() <= fds.len(), "fds: {fds_now:?} now, {fds:?} before the share");

            // virtio-net after boot, on a tap in a private host network namespace.
            let (tap, listener) = host_network();
            let mac = [0x02, 0x53, 0x48, 0x00, 0x00, 0x02];
            let at = vm.hot_add_net(shoji_sandbox::NetConfig { backend: shoji_sandbox::NetHost::Tap(tap), mac, mtu: None }).unwrap();
            let server = std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let (mut conn, peer) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).unwrap();
                conn.write_all(b"hello-from-host\n").unwrap();
                (peer, line)
            });
            let slot = at.root_slot().unwrap();
            let t = Instant::now();
            let out = run_in_container(&session, &hotplug, network_user("c-net", slot)).await;
            eprintln!("{at}: network device up and used in {:?}:\n{out}", t.elapsed());
            let (peer, line) = server.join().unwrap();
            assert_eq!(line, "hello-from-guest\n");
            assert_eq!(peer.ip().to_string(), "10.0.2.2");
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some("if eth0 02:53:48:00:00:02"), "{out}");
            assert_eq!(lines.next(), Some("ping-ok"), "{out}");
            assert_eq!(lines.next(), Some("hello-from-host"), "{out}");
            assert_eq!(unplug(at).await, Unplugged::Released);

            if let Err(e) = session.destroy(Duration::from_secs(30)).await {
                eprintln!("destroy: {e}");
            }
        })
    }));
    let tail = vm.console_tail(40);
    let stopped = vm.stop();
    if let Err(panic) = result {
        eprintln!("guest console:\n{tail}");
        std::panic::resume_unwind(panic);
    }
    stopped.unwrap();
}
