//! `LinuxRuntime` against real namespaces, cgroups and seccomp: busybox containers built in
//! temporary directories. Needs root and /bin/busybox (Debian: busybox-static); without them
//! the tests fail and say why, they never skip.
use oci_spec::runtime::{LinuxResources, Process, Spec};
#[path = "common/container_io.rs"]
mod container_io;
use container_io::read_all;
use serde_json::json;
use shoji_agent::runtime::{ContainerConfig, ContainerRuntime, ExecFailure, ExitStatus, LinuxRuntime, RuntimeError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "mkdir", "touch", "id", "grep", "head", "yes", "tr", "wc", "stty", "tty", "hostname",
    "ls", "ps", "true", "false", "env", "pwd", "kill", "seq", "linux32", "linux64",
];
/// A wait longer than this is a hang.
const LIMIT: Duration = Duration::from_secs(20);

fn preflight() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the runtime tests create namespaces and cgroups: run them as root");
    assert!(Path::new(BUSYBOX).is_file(), "the runtime tests need a static {BUSYBOX}: apt-get install busybox-static");
}

struct Bundle {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    rt: LinuxRuntime,
}

/// A busybox rootfs and a runtime with its own state directory.
fn bundle() -> Bundle {
    preflight();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/tmp:/bin/sh\n").unwrap();
    let rt = LinuxRuntime::new(dir.path().join("state")).unwrap();
    Bundle { _dir: dir, rootfs, rt }
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A spec JSON for `args` in `rootfs`; tests edit the JSON before parsing it.
fn spec_json(rootfs: &Path, id: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": rootfs, "readonly": false },
        "hostname": "shoji-test",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "noNewPrivileges": true,
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }]
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "cgroupsPath": format!("/shoji-test-{}/{id}", std::process::id()),
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn parse(v: serde_json::Value) -> Spec {
    serde_json::from_value(v).unwrap()
}

fn cfg(id: &str, v: serde_json::Value) -> ContainerConfig {
    ContainerConfig { id: id.into(), spec: parse(v) }
}

async fn wait(rt: &LinuxRuntime, id: &str, exec_id: &str) -> ExitStatus {
    tokio::time::timeout(LIMIT, rt.wait(id, exec_id)).await.expect("wait hangs").unwrap()
}

/// Runs `args` as a container to the end: (exit, stdout, stderr); the container is removed.
async fn run(b: &Bundle, v: serde_json::Value, id: &str) -> (ExitStatus, String, String) {
    b.rt.create(cfg(id, v)).await.unwrap();
    b.rt.start(id).await.unwrap();
    let (st, out, err) =
        tokio::join!(wait(&b.rt, id, ""), read_all(&b.rt, id, "", false), read_all(&b.rt, id, "", true));
    b.rt.remove(id, 0).await.unwrap();
    (st, out, err)
}

fn exited(code: i32) -> ExitStatus {
    ExitStatus { status: code, signal: None, oom_killed: false }
}

#[tokio::test]
async fn output_namespaces_and_wait_before_start() {
    let b = bundle();
    let id = unique("out");
    let script = "echo hello; echo oops >&2; echo pid=$$; hostname; \
                  cat /proc/kcore | wc -c; \
                  cat /proc/sys/kernel/domainname > /proc/sys/kernel/domainname || echo ro-ok";
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sh", "-c", script]))).await.unwrap();
    // wait (twice) before start, then start.
    let (w1, w2, started, out, err) = tokio::join!(
        wait(&b.rt, &id, ""),
        wait(&b.rt, &id, &id),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.rt.start(&id).await
        },
        read_all(&b.rt, &id, "", false),
        read_all(&b.rt, &id, "", true),
    );
    started.unwrap();
    assert_eq!(w1, exited(0));
    assert_eq!(w2, exited(0));
    assert_eq!(wait(&b.rt, &id, "").await, exited(0), "a third wait after exit");
    assert_eq!(out, "hello\npid=1\nshoji-test\n0\nro-ok\n", "stderr: {err}");
    assert!(err.starts_with("oops\n"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn long_output_tail_is_kept_after_exit() {
    let b = bundle();
    let id = unique("tail");
    let script = "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; echo last";
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sh", "-c", script]))).await.unwrap();
    b.rt.start(&id).await.unwrap();
    // Let it exit before reading anything: the pipe still holds the whole output.
    assert_eq!(wait(&b.rt, &id, "").await, exited(0));
    let out = read_all(&b.rt, &id, "", false).await;
    assert_eq!(out.lines().count(), 3001);
    assert!(out.ends_with("line2999\nlast\n"));
    assert!(b.rt.read_stdout(&id, "", 10).await.unwrap().is_empty(), "EOF stays EOF");
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn stdin_round_trip_through_cat() {
    let b = bundle();
    let id = unique("cat");
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["cat"]))).await.unwrap();
    b.rt.start(&id).await.unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (written, out) = tokio::join!(
        async {
            let n = b.rt.write_stdin(&id, "", &data).await.unwrap();
            b.rt.close_stdin(&id, "").await.unwrap();
            n
        },
        read_all(&b.rt, &id, "", false)
    );
    assert_eq!(written, data.len());
    assert_eq!(out.as_bytes(), &data[..]);
    assert_eq!(wait(&b.rt, &id, "").await, exited(0));
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn terminal_output_and_resize() {
    let b = bundle();
    let id = unique("tty");
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", "read x; stty size; tty; echo got=$x"]);
    v["process"]["terminal"] = json!(true);
    v["process"]["consoleSize"] = json!({ "height": 24, "width": 80 });
    b.rt.create(cfg(&id, v)).await.unwrap();
    b.rt.start(&id).await.unwrap();
    b.rt.resize_tty(&id, "", 40, 100).await.unwrap();
    b.rt.write_stdin(&id, "", b"go\n").await.unwrap();
    let out = read_all(&b.rt, &id, "", false).await;
    assert!(out.contains("40 100"), "{out:?}");
    assert!(out.contains("got=go"), "{out:?}");
    assert!(out.contains("/dev/console") || out.contains("/dev/pts/"), "{out:?}");
    assert_eq!(read_all(&b.rt, &id, "", true).await, "", "a terminal has no separate stderr");
    assert_eq!(wait(&b.rt, &id, "").await, exited(0));
    let e = b.rt.resize_tty(&id, "nope", 1, 1).await.unwrap_err();
    assert!(matches!(e, RuntimeError::NoProcess { .. }), "{e}");
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn exit_code_and_signals() {
    let b = bundle();
    let id = unique("exit7");
    let (st, _, _) = run(&b, spec_json(&b.rootfs, &id, &["sh", "-c", "exit 7"]), &id).await;
    assert_eq!(st, exited(7));

    let id = unique("kill");
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sleep", "100"]))).await.unwrap();
    b.rt.start(&id).await.unwrap();
    b.rt.signal(&id, "", libc::SIGKILL, false).await.unwrap();
    assert_eq!(wait(&b.rt, &id, "").await, ExitStatus { status: 137, signal: Some(9), oom_killed: false });
    // Signalling an exited process is a no-op.
    b.rt.signal(&id, "", libc::SIGTERM, false).await.unwrap();
    b.rt.remove(&id, 0).await.unwrap();

    // A pid-namespace init only gets signals it handles: SIGTERM with a trap.
    let id = unique("term");
    let script = "trap 'exit 3' TERM; echo ready; while true; do sleep 0.05; done";
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sh", "-c", script]))).await.unwrap();
    b.rt.start(&id).await.unwrap();
    assert_eq!(b.rt.read_stdout(&id, "", 100).await.unwrap(), b"ready\n");
    b.rt.signal(&id, "", libc::SIGTERM, true).await.unwrap();
    assert_eq!(wait(&b.rt, &id, "").await, exited(3));
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn exec_into_running_container() {
    let b = bundle();
    let id = unique("exec");
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sleep", "100"]))).await.unwrap();
    let p: Process = serde_json::from_value(json!({
        "user": { "uid": 0, "gid": 0 }, "args": ["echo", "hi"], "env": ["PATH=/bin"], "cwd": "/"
    }))
    .unwrap();
    let e = b.rt.exec(&id, "e0", p.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::BadState { .. }), "exec before start: {e}");
    b.rt.start(&id).await.unwrap();

    b.rt.exec(&id, "e1", p.clone()).await.unwrap();
    assert_eq!(read_all(&b.rt, &id, "e1", false).await, "hi\n");
    assert_eq!(wait(&b.rt, &id, "e1").await, exited(0));
    let e = b.rt.exec(&id, "e1", p.clone()).await.unwrap_err();
    assert!(matches!(e, RuntimeError::ProcessExists { .. }), "{e}");

    // Same pid namespace and root as the init; its own exit code.
    let mut p2 = p.clone();
    p2.set_args(Some(vec!["sh".into(), "-c".into(), "cat /proc/1/cmdline | tr '\\0' ' '; hostname; exit 3".into()]));
    b.rt.exec(&id, "e2", p2).await.unwrap();
    assert_eq!(read_all(&b.rt, &id, "e2", false).await, "sleep 100 shoji-test\n");
    assert_eq!(wait(&b.rt, &id, "e2").await, exited(3));

    // An exec with a terminal.
    let mut p3 = p.clone();
    p3.set_terminal(Some(true));
    p3.set_args(Some(vec!["tty".into()]));
    b.rt.exec(&id, "e3", p3).await.unwrap();
    let tty = read_all(&b.rt, &id, "e3", false).await;
    assert!(tty.starts_with("/dev/pts/"), "{tty:?}");
    assert_eq!(wait(&b.rt, &id, "e3").await, exited(0));

    // A missing program is an error naming the field.
    let mut p4 = p.clone();
    p4.set_args(Some(vec!["no-such-program".into()]));
    let e = b.rt.exec(&id, "e4", p4).await.unwrap_err();
    assert!(matches!(&e, RuntimeError::Exec { kind: ExecFailure::NotFound, .. }), "{e:?}");
    assert!(e.to_string().starts_with("process.args[0]: "), "{e}");

    let pids = b.rt.pids(&id).await.unwrap();
    let ps: Vec<String> =
        pids.iter().map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default()).collect();
    assert_eq!(pids, vec![b.rt.pid(&id, "").unwrap()], "only the init is left: {ps:?}");
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn user_capabilities_rlimits_env() {
    let b = bundle();
    let id = unique("user");
    let script = "id -u; id -g; id -G; grep -E '^Cap(Eff|Bnd)' /proc/self/status; ulimit -n; echo $FOO $HOME; pwd; \
                  grep NoNewPrivs /proc/self/status; touch /x 2>/dev/null || echo ro-root; \
                  cat /proc/sys/kernel/domainname /proc/sys/kernel/msgmax";
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", script]);
    let caps = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    v["process"]["user"] = json!({ "uid": 1000, "gid": 1000, "additionalGids": [10, 20] });
    v["process"]["capabilities"] =
        json!({ "bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps, "ambient": caps });
    v["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": 123, "soft": 123 }]);
    v["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    v["process"]["cwd"] = json!("/tmp");
    v["root"]["readonly"] = json!(true);
    // Sysctls of the container's own uts and ipc namespaces.
    v["linux"]["sysctl"] = json!({ "kernel.domainname": "sysctl-dom", "kernel.msgmax": "4321" });
    let (st, out, err) = run(&b, v, &id).await;
    assert_eq!(st, exited(0), "stderr: {err}");
    assert_eq!(
        out,
        "1000\n1000\n1000 10 20\nCapEff:\t0000000000000420\nCapBnd:\t0000000000000420\n123\nbar /tmp\n/tmp\n\
         NoNewPrivs:\t1\nro-root\nsysctl-dom\n4321\n"
    );
}

#[tokio::test]
async fn memory_limit_oom_kill() {
    let b = bundle();
    let id = unique("oom");
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", "x=$(yes | head -c 200000000); echo survived"]);
    let limit = 16 << 20;
    v["linux"]["resources"] = json!({ "memory": { "limit": limit, "swap": limit } });
    b.rt.create(cfg(&id, v)).await.unwrap();
    let st = b.rt.stats(&id).await.unwrap();
    assert_eq!(st.memory_limit_bytes, limit as u64);
    b.rt.start(&id).await.unwrap();
    let (status, event) = tokio::join!(wait(&b.rt, &id, ""), async {
        tokio::time::timeout(LIMIT, b.rt.next_oom_event()).await.expect("no OOM event")
    });
    assert_eq!(status, ExitStatus { status: 137, signal: Some(9), oom_killed: true });
    assert_eq!(event, id);
    assert!(b.rt.stats(&id).await.unwrap().oom_kills >= 1);
    assert_eq!(read_all(&b.rt, &id, "", false).await, "");
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn pids_limit_caps_forks() {
    let b = bundle();
    let id = unique("pids");
    let mut v = spec_json(&b.rootfs, &id, &["sleep", "100"]);
    v["linux"]["resources"] = json!({ "pids": { "limit": 8 } });
    b.rt.create(cfg(&id, v)).await.unwrap();
    b.rt.start(&id).await.unwrap();
    // A shell in the container forks until the kernel refuses (busybox sh then gives up).
    let script = "i=0; while [ $i -lt 30 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); echo $i; done";
    let p: Process = serde_json::from_value(json!({
        "user": { "uid": 0, "gid": 0 }, "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"
    }))
    .unwrap();
    b.rt.exec(&id, "bomb", p).await.unwrap();
    let (out, err, st) =
        tokio::join!(read_all(&b.rt, &id, "bomb", false), read_all(&b.rt, &id, "bomb", true), wait(&b.rt, &id, "bomb"));
    let forked: u32 = out.lines().last().unwrap_or("0").parse().unwrap();
    // init + this shell + the sleeps <= 8 (one less while the exec's helper is still counted).
    assert!((5..=6).contains(&forked), "forked {forked}; stderr {err:?}");
    assert!(err.contains("can't fork"), "{err:?}");
    assert_eq!(st.status, 2);
    let st = b.rt.stats(&id).await.unwrap();
    assert_eq!(st.pids_limit, 8);
    assert!(st.pids_current <= 8, "{st:?}");
    let pids = b.rt.pids(&id).await.unwrap();
    assert_eq!(pids.len() as u32, 1 + forked, "{pids:?}");
    let update: LinuxResources = serde_json::from_value(json!({ "pids": { "limit": 50 } })).unwrap();
    b.rt.update(&id, update).await.unwrap();
    assert_eq!(b.rt.stats(&id).await.unwrap().pids_limit, 50);
    b.rt.remove(&id, 0).await.unwrap();
}

#[tokio::test]
async fn seccomp_profile_is_enforced() {
    let b = bundle();
    let script = "mkdir /tmp/x; echo rc=$?; touch /tmp/y; echo touch=$?";
    let id = unique("seccomp");
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", script]);
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 } ]
    });
    let (st, out, err) = run(&b, v, &id).await;
    assert_eq!(st, exited(0));
    assert_eq!(out, "rc=1\ntouch=0\n");
    assert!(err.contains("Operation not permitted"), "{err}");

    // The same script without the profile can mkdir (the control).
    let id = unique("noseccomp");
    let (_, out, _) = run(&b, spec_json(&b.rootfs, &id, &["sh", "-c", script]), &id).await;
    assert_eq!(out, "rc=0\ntouch=0\n");

    // Without no_new_privs the filter is loaded while still privileged: also enforced.
    let id = unique("seccomp-nnp");
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", script]);
    v["process"]["noNewPrivileges"] = json!(false);
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13 } ]
    });
    let (_, out, err) = run(&b, v, &id).await;
    assert_eq!(out, "rc=1\ntouch=0\n");
    assert!(err.contains("Permission denied"), "{err}");

    // Argument conditions (every operator, so the kernel checks all the code we emit):
    // personality(PER_LINUX32 = 8) is refused, personality(PER_LINUX = 0) is not.
    let id = unique("seccomp-args");
    let script = "linux32 true; echo l32=$?; linux64 true; echo l64=$?";
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", script]);
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            { "names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [ { "index": 0, "value": 8, "op": "SCMP_CMP_EQ" } ] },
            { "names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "args": [
                { "index": 1, "value": 0, "op": "SCMP_CMP_NE" }, { "index": 0, "value": 5, "op": "SCMP_CMP_LT" },
                { "index": 2, "value": 5, "op": "SCMP_CMP_LE" }, { "index": 3, "value": 5, "op": "SCMP_CMP_GT" },
                { "index": 4, "value": 5, "op": "SCMP_CMP_GE" },
                { "index": 5, "value": 255, "valueTwo": 1, "op": "SCMP_CMP_MASKED_EQ" } ] }
        ]
    });
    let (_, out, err) = run(&b, v, &id).await;
    assert_eq!(out, "l32=1\nl64=0\n", "stderr: {err}");
}

fn mountinfo() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        // Other tests run containers at the same time; their mounts are in their own
        // namespaces, so this process's table must not change at all.
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test]
async fn remove_leaves_nothing_behind() {
    let b = bundle();
    let before = mountinfo();
    let state_dir = b._dir.path().join("state");

    // Running, with an exec, killed at once.
    let id = unique("rm");
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sleep", "100"]))).await.unwrap();
    assert!(state_dir.join(&id).is_dir());
    b.rt.start(&id).await.unwrap();
    let p: Process = serde_json::from_value(json!({
        "user": { "uid": 0, "gid": 0 }, "args": ["sleep", "100"], "env": ["PATH=/bin"], "cwd": "/"
    }))
    .unwrap();
    b.rt.exec(&id, "x", p).await.unwrap();
    let pids = b.rt.pids(&id).await.unwrap();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let cgroups = b.rt.cgroup_dirs(&id).unwrap();
    assert!(cgroups.iter().all(|d| d.is_dir()));
    b.rt.remove(&id, 0).await.unwrap();
    assert!(pids.iter().all(|p| !alive(*p)), "processes left: {pids:?}");
    assert!(cgroups.iter().all(|d| !d.exists()), "cgroups left: {cgroups:?}");
    assert!(!state_dir.join(&id).exists());
    assert!(matches!(b.rt.wait(&id, "").await, Err(RuntimeError::NoContainer(_))));

    // Graceful: SIGTERM first, the init's trap exits well before the timeout.
    let id = unique("rm-term");
    let script = "trap 'exit 0' TERM; echo ready; while true; do sleep 0.05; done";
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sh", "-c", script]))).await.unwrap();
    b.rt.start(&id).await.unwrap();
    assert_eq!(b.rt.read_stdout(&id, "", 100).await.unwrap(), b"ready\n");
    let pid = b.rt.pid(&id, "").unwrap();
    let t = std::time::Instant::now();
    b.rt.remove(&id, 5).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
    assert!(!alive(pid));

    // Created but never started: a wait from before sees it killed.
    let id = unique("rm-created");
    b.rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["sleep", "100"]))).await.unwrap();
    let pid = b.rt.pid(&id, "").unwrap();
    let cgroups = b.rt.cgroup_dirs(&id).unwrap();
    let (st, removed) = tokio::join!(wait(&b.rt, &id, ""), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.rt.remove(&id, 10).await
    });
    removed.unwrap();
    assert_eq!(st, ExitStatus { status: 137, signal: Some(9), oom_killed: false });
    assert!(!alive(pid));
    assert!(cgroups.iter().all(|d| !d.exists()));

    assert_eq!(mountinfo(), before, "the agent's mount table changed");
}

#[tokio::test]
async fn bad_input_gives_the_right_error() {
    let b = bundle();
    let rt = &b.rt;
    let p: Process = Process::default();
    for e in [
        rt.start("nope").await.unwrap_err(),
        rt.wait("nope", "").await.unwrap_err(),
        rt.signal("nope", "", 9, false).await.unwrap_err(),
        rt.exec("nope", "e", p.clone()).await.unwrap_err(),
        rt.remove("nope", 0).await.unwrap_err(),
        rt.stats("nope").await.unwrap_err(),
        rt.read_stdout("nope", "", 1).await.unwrap_err(),
    ] {
        assert!(matches!(&e, RuntimeError::NoContainer(id) if id == "nope"), "{e}");
    }

    let invalid = |e: RuntimeError, want: &str| match &e {
        RuntimeError::InvalidSpec { field, .. } if field == want => {}
        _ => panic!("want an InvalidSpec for {want}, got {e:?}"),
    };
    let id = unique("bad");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["process"]["args"] = json!([]);
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "process.args");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["mounts"][1]["destination"] = json!("dev");
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "mounts[1].destination");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["mounts"][0]["type"] = json!("no-such-fs");
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "mounts[0]");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "user" }]);
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "linux.namespaces[1]");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["namespaces"] = json!([{ "type": "mount" }]);
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "hostname");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["seccomp"] = json!({ "defaultAction": "SCMP_ACT_NOTIFY" });
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "linux.seccomp.defaultAction");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["cgroupsPath"] = json!("/../../etc");
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "linux.cgroupsPath");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["root"]["path"] = json!("/no/such/rootfs");
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "root.path");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["resources"] = json!({ "cpu": { "cpus": "not-a-cpu-list" } });
    invalid(rt.create(cfg(&id, v)).await.unwrap_err(), "linux.resources.cpu.cpus");
    invalid(rt.create(cfg("../evil", spec_json(&b.rootfs, "x", &["true"]))).await.unwrap_err(), "id");
    // A JSON field of the wrong shape never reaches the runtime: the spec does not parse.
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["process"]["rlimits"] = json!([{ "type": "RLIMIT_BOGUS", "hard": 1, "soft": 1 }]);
    assert!(serde_json::from_value::<Spec>(v).is_err());
    // Nothing was left by the failed creates.
    let base = if rt.cgroup_v2() { "/sys/fs/cgroup" } else { "/sys/fs/cgroup/memory" };
    let cg = Path::new(base).join(format!("shoji-test-{}", std::process::id())).join(&id);
    assert!(!cg.exists(), "{}", cg.display());
    assert!(!b._dir.path().join("state").join(&id).exists());

    // A missing program fails start, naming the field; the init ends as "command not found".
    let mut v = spec_json(&b.rootfs, &id, &["no-such-program"]);
    v["process"]["env"] = json!(["PATH=/bin:/usr/bin"]);
    rt.create(cfg(&id, v)).await.unwrap();
    let e = rt.create(cfg(&id, spec_json(&b.rootfs, &id, &["true"]))).await.unwrap_err();
    assert!(matches!(&e, RuntimeError::Exists(x) if *x == id), "{e}");
    let e = rt.start(&id).await.unwrap_err();
    assert!(matches!(&e, RuntimeError::Exec { kind: ExecFailure::NotFound, .. }), "{e:?}");
    assert_eq!(wait(rt, &id, "").await, exited(127));
    let e = rt.start(&id).await.unwrap_err();
    assert!(matches!(e, RuntimeError::BadState { .. }), "{e}");
    let e = rt.wait(&id, "no-such-exec").await.unwrap_err();
    assert!(matches!(e, RuntimeError::NoProcess { .. }), "{e}");
    rt.remove(&id, 0).await.unwrap();
}

/// The first cgroup2 mount of this machine (/sys/fs/cgroup on a pure v2 host, usually
/// /sys/fs/cgroup/unified on a hybrid one).
fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
        .expect("no cgroup2 mount on this machine: the cgroup v2 test needs one (hybrid or unified cgroups)")
}

/// The cgroup v2 code on this machine's cgroup2 mount (on a hybrid host it has no memory or
/// pids controller, so limits are not exercised here; the guest runs them on pure v2).
#[tokio::test]
async fn cgroup_v2_join_mount_and_remove() {
    let b = bundle();
    let mount = cgroup2_mount();
    let rt = LinuxRuntime::with_cgroup2(b._dir.path().join("state2"), &mount).unwrap();
    assert!(rt.cgroup_v2());
    let id = unique("v2");
    let mut v = spec_json(
        &b.rootfs,
        &id,
        &["sh", "-c", "cat /proc/self/cgroup; cat /sys/fs/cgroup/cgroup.procs; exec sleep 100"],
    );
    v["linux"]["namespaces"].as_array_mut().unwrap().push(json!({ "type": "cgroup" }));
    v["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "ro"]
    }));
    rt.create(cfg(&id, v)).await.unwrap();
    let dirs = rt.cgroup_dirs(&id).unwrap();
    assert_eq!(dirs, vec![mount.join(format!("shoji-test-{}", std::process::id())).join(&id)]);
    rt.start(&id).await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("\n1\n") {
        let chunk = tokio::time::timeout(LIMIT, rt.read_stdout(&id, "", 100)).await.unwrap().unwrap();
        assert!(!chunk.is_empty(), "{}", String::from_utf8_lossy(&out));
        out.extend(chunk);
    }
    // Its own cgroup namespace: it sees itself at the root, and itself (pid 1) in it.
    assert!(String::from_utf8_lossy(&out).contains("0::/\n"), "{}", String::from_utf8_lossy(&out));
    // Once the cats are gone, the init (now sleep) is alone in the cgroup.
    let init = rt.pid(&id, "").unwrap();
    let mut pids = Vec::new();
    for _ in 0..100 {
        pids = rt.pids(&id).await.unwrap();
        if pids == [init] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pids, [init]);
    rt.remove(&id, 0).await.unwrap();
    assert!(!dirs[0].exists());

    // A limit whose controller is not in this hierarchy is an error, not ignored.
    let id = unique("v2-mem");
    let mut v = spec_json(&b.rootfs, &id, &["true"]);
    v["linux"]["resources"] = json!({ "memory": { "limit": 16777216 } });
    let avail = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    let r = rt.create(cfg(&id, v)).await;
    if avail.split_whitespace().any(|c| c == "memory") {
        r.unwrap();
        rt.remove(&id, 0).await.unwrap();
    } else {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, RuntimeError::InvalidSpec { field, .. } if field == "linux.resources.memory.limit"),
            "{e}"
        );
    }
}

/// MS_MOVE + chroot instead of pivot_root: the path the guest takes, its agent's root being the
/// initramfs. Also: the container's own cgroup mounted inside it (read-only).
#[tokio::test]
async fn chroot_root_and_cgroup_mount() {
    let b = bundle();
    b.rt.set_no_pivot_root(true);
    let before = mountinfo();
    let id = unique("chroot");
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", "ls /; echo ready; exec sleep 100"]);
    v["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "ro"]
    }));
    b.rt.create(cfg(&id, v)).await.unwrap();
    b.rt.start(&id).await.unwrap();
    let mut out = String::new();
    while !out.contains("ready\n") {
        let chunk = tokio::time::timeout(LIMIT, b.rt.read_stdout(&id, "", 1000)).await.unwrap().unwrap();
        assert!(!chunk.is_empty(), "{out}");
        out.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(out, "bin\ndev\netc\nproc\nroot\nsys\ntmp\nready\n");
    // An exec lands in the same root; the cgroup mount shows the container's own cgroup (its
    // pids as seen from inside) and is read-only.
    let script =
        "ls /; head -n1 /sys/fs/cgroup/pids/cgroup.procs 2>/dev/null || head -n1 /sys/fs/cgroup/cgroup.procs; \
                  mkdir /sys/fs/cgroup/x 2>/dev/null || echo ro";
    let p: Process = serde_json::from_value(json!({
        "user": { "uid": 0, "gid": 0 }, "args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"
    }))
    .unwrap();
    b.rt.exec(&id, "x", p).await.unwrap();
    let (out, err) = tokio::join!(read_all(&b.rt, &id, "x", false), read_all(&b.rt, &id, "x", true));
    assert_eq!(out, "bin\ndev\netc\nproc\nroot\nsys\ntmp\n1\nro\n", "stderr: {err}");
    assert_eq!(wait(&b.rt, &id, "x").await, exited(0));
    b.rt.remove(&id, 0).await.unwrap();
    assert_eq!(mountinfo(), before);
}

#[tokio::test]
async fn cpu_limits_and_stats() {
    let b = bundle();
    let id = unique("cpu");
    let script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo busy-done; exec sleep 100";
    let mut v = spec_json(&b.rootfs, &id, &["sh", "-c", script]);
    v["linux"]["resources"] = json!({ "cpu": { "shares": 512, "quota": 50000, "period": 100000 } });
    b.rt.create(cfg(&id, v)).await.unwrap();
    let dirs = b.rt.cgroup_dirs(&id).unwrap();
    let read = |name: &str| -> String {
        let d = dirs.iter().find(|d| d.join(name).exists()).unwrap_or_else(|| panic!("no {name} in {dirs:?}"));
        std::fs::read_to_string(d.join(name)).unwrap().trim().to_string()
    };
    if b.rt.cgroup_v2() {
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "20");
    } else {
        assert_eq!(read("cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu.shares"), "512");
    }
    b.rt.start(&id).await.unwrap();
    assert_eq!(b.rt.read_stdout(&id, "", 100).await.unwrap(), b"busy-done\n");
    let st = b.rt.stats(&id).await.unwrap();
    assert!(st.cpu_usage_usec > 0, "{st:?}");
    assert!(st.memory_usage_bytes > 0, "{st:?}");
    assert_eq!(st.pids_current, 1, "{st:?}");
    let update: LinuxResources = serde_json::from_value(json!({ "cpu": { "quota": -1 } })).unwrap();
    b.rt.update(&id, update).await.unwrap();
    if b.rt.cgroup_v2() {
        assert_eq!(read("cpu.max"), "max 100000");
    } else {
        assert_eq!(read("cpu.cfs_quota_us"), "-1");
    }
    b.rt.remove(&id, 0).await.unwrap();
}

/// A CRI pod in the guest: an app container joins its sandbox container's namespaces through
/// the paths the shim writes (`model::guest_container_ns`), which the agent resolves to that
/// container's init; a wrong kind, an unknown container and an exited one are refused naming
/// the field.
#[tokio::test]
async fn a_container_joins_another_containers_namespaces_by_guest_path() {
    let b = bundle();
    let pod = unique("pod");
    let mut v = spec_json(&b.rootfs, &pod, &["sleep", "100"]);
    v["hostname"] = json!("the-pod");
    v["linux"]["namespaces"].as_array_mut().unwrap().push(json!({ "type": "network" }));
    b.rt.create(cfg(&pod, v)).await.unwrap();
    b.rt.start(&pod).await.unwrap();
    let pod_pid = b.rt.pid(&pod, "").unwrap();
    let ns = |pid: i32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();

    let app = unique("app");
    let mut v =
        spec_json(&b.rootfs, &app, &["sh", "-c", "hostname; readlink /proc/self/ns/net; readlink /proc/self/ns/ipc"]);
    v.as_object_mut().unwrap().remove("hostname");
    v["linux"]["namespaces"] = json!([
        { "type": "pid" },
        { "type": "mount" },
        { "type": "ipc", "path": shoji_devices::model::guest_container_ns(&pod, "ipc") },
        { "type": "uts", "path": shoji_devices::model::guest_container_ns(&pod, "uts") },
        { "type": "network", "path": shoji_devices::model::guest_container_ns(&pod, "net") }
    ]);
    let (st, out, err) = run(&b, v.clone(), &app).await;
    assert_eq!(st, exited(0), "{err}");
    let want = format!("the-pod\n{}\n{}\n", ns(pod_pid, "net").display(), ns(pod_pid, "ipc").display());
    assert_eq!(out, want, "the app container is in the pod's uts, net and ipc namespaces");
    assert_ne!(ns(pod_pid, "net"), ns(std::process::id() as i32, "net"), "the pod has a network namespace of its own");

    let refused = |v: serde_json::Value, id: &str| {
        let rt = &b.rt;
        let id = id.to_string();
        async move { rt.create(cfg(&id, v)).await.unwrap_err().to_string() }
    };
    let mut wrong = v.clone();
    wrong["linux"]["namespaces"][2]["path"] = json!(shoji_devices::model::guest_container_ns(&pod, "net"));
    let e = refused(wrong, &unique("wrong")).await;
    assert!(e.contains("linux.namespaces[2].path") && e.contains("names a net namespace, not ipc"), "{e}");
    let mut missing = v.clone();
    missing["linux"]["namespaces"][2]["path"] = json!(shoji_devices::model::guest_container_ns("nope", "ipc"));
    let e = refused(missing, &unique("missing")).await;
    assert!(e.contains("linux.namespaces[2].path") && e.contains("no container \"nope\""), "{e}");

    b.rt.signal(&pod, "", libc::SIGKILL, false).await.unwrap();
    wait(&b.rt, &pod, "").await;
    let e = refused(v, &unique("late")).await;
    assert!(e.contains("has exited"), "{e}");
    b.rt.remove(&pod, 0).await.unwrap();
}

/// A pod's app container shares the pod's PID namespace (CRI `pid: POD`): when its init exits,
/// what it started is not killed by the kernel (the namespace's init is the pod's), and it holds
/// the container's stdout and stderr. The runtime kills the rest of the container's cgroup, as
/// containerd's runc shim does, so the exit is reported at once instead of when the last
/// background process happens to end (seen as kills and OOM kills "taking" minutes in a pod).
#[tokio::test]
async fn an_init_sharing_the_pods_pid_namespace_takes_its_background_processes_with_it() {
    let b = bundle();
    let pod = unique("pod");
    b.rt.create(cfg(&pod, spec_json(&b.rootfs, &pod, &["sleep", "100"]))).await.unwrap();
    b.rt.start(&pod).await.unwrap();

    let app = unique("app");
    let mut v = spec_json(&b.rootfs, &app, &["sh", "-c", "sleep 1000 & echo $! > /tmp/bg; echo started; exit 3"]);
    v["linux"]["namespaces"] = json!([
        { "type": "mount" },
        { "type": "ipc" },
        { "type": "uts" },
        { "type": "pid", "path": shoji_devices::model::guest_container_ns(&pod, "pid") }
    ]);
    let started = std::time::Instant::now();
    let (st, out, err) = run(&b, v, &app).await;
    assert_eq!((st, out.as_str()), (exited(3), "started\n"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "the exit waited for the background sleep");
    // Nothing of the app container is left in the pod's namespace: only the pod's sleep.
    let pod_pid = b.rt.pid(&pod, "").unwrap();
    // (A killed one stays a zombie child of the pod's `sleep`, which reaps nothing.)
    let children = std::fs::read_to_string(format!("/proc/{pod_pid}/task/{pod_pid}/children")).unwrap_or_default();
    let alive: Vec<&str> = children
        .split_whitespace()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .collect();
    assert!(alive.is_empty(), "the background sleep lives on under the pod's init: {alive:?}");

    b.rt.signal(&pod, "", libc::SIGKILL, false).await.unwrap();
    wait(&b.rt, &pod, "").await;
    b.rt.remove(&pod, 0).await.unwrap();
}
