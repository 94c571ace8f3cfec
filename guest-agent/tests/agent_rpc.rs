//! The real `shoji-agent` binary on the host, driven over a unix socket with the generated ttrpc
//! client, running real busybox containers (namespaces, cgroups, seccomp) — the same RPCs the
//! shim and `shoji run` send through the VM's vsock. Needs root and a static /bin/busybox
//! (Debian: busybox-static); without them the tests fail and say why.
use serde_json::json;
use shoji_protocol::agent::*;
use shoji_protocol::agent_ttrpc::{AgentServiceClient, HealthClient};
use shoji_protocol::ttrpc;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &["sh", "echo", "cat", "sleep", "mkdir", "yes", "head", "tty", "stty", "true"];

/// A running agent with its own socket, state dir and busybox rootfs; killed and cleaned on drop.
struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    client: AgentServiceClient,
    health: HealthClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: (test) SIGTERM to our own child: it removes its containers and socket.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

async fn agent() -> Agent {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests create namespaces and cgroups: run them as root");
    assert!(Path::new(BUSYBOX).is_file(), "these tests need a static {BUSYBOX}: apt-get install busybox-static");
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    let sock = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_shoji-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .spawn()
        .expect("start shoji-agent");
    let addr = format!("unix://{}", sock.display());
    let mut tries = 0;
    let c = loop {
        match ttrpc::asynchronous::Client::connect(&addr).await {
            Ok(c) => break c,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("agent socket: {e}"),
        }
    };
    Agent { child, _dir: dir, rootfs, client: AgentServiceClient::new(c.clone()), health: HealthClient::new(c) }
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn spec(a: &Agent, id: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": a.rootfs, "readonly": false },
        "hostname": "rpc-test",
        "process": { "user": { "uid": 0, "gid": 0 }, "args": args, "env": ["PATH=/bin"], "cwd": "/" },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance", "ptmxmode=0666"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" } ],
            "cgroupsPath": format!("/shoji-rpc-{}/{id}", std::process::id())
        }
    })
}

async fn create(a: &Agent, id: &str, spec: serde_json::Value) -> ttrpc::Result<()> {
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        ..Default::default()
    };
    a.client.create_container(ctx(), &req).await.map(drop)
}

async fn start(a: &Agent, id: &str) {
    a.client
        .start_container(ctx(), &StartContainerRequest { container_id: id.into(), ..Default::default() })
        .await
        .unwrap();
}

async fn read_all(a: &Agent, id: &str, exec_id: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let req =
            ReadStreamRequest { container_id: id.into(), exec_id: exec_id.into(), len: 4096, ..Default::default() };
        let r = if stderr { a.client.read_stderr(ctx(), &req).await } else { a.client.read_stdout(ctx(), &req).await };
        let data = r.unwrap().data;
        if data.is_empty() {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend(data);
    }
}

async fn wait(a: &Agent, id: &str, exec_id: &str) -> WaitProcessResponse {
    let req = WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
    a.client.wait_process(ctx(), &req).await.unwrap()
}

async fn remove(a: &Agent, id: &str) {
    let req = RemoveContainerRequest { container_id: id.into(), ..Default::default() };
    a.client.remove_container(ctx(), &req).await.unwrap();
}

async fn exec(a: &Agent, id: &str, exec_id: &str, process: serde_json::Value) {
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    };
    a.client.exec_process(ctx(), &req).await.unwrap();
}

fn status_code(e: &ttrpc::Error) -> i32 {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code.value(),
        other => panic!("not an RPC status: {other:?}"),
    }
}

#[tokio::test]
async fn run_exec_stdin_tty_and_exit_codes() {
    let a = agent().await;
    // Create/start; stdout and stderr; exit code 7 reported as 7.
    let id = unique("c");
    create(&a, &id, spec(&a, &id, &["sh", "-c", "echo out; echo err >&2; hostname; exit 7"])).await.unwrap();
    start(&a, &id).await;
    let (out, err, st) = tokio::join!(read_all(&a, &id, "", false), read_all(&a, &id, "", true), wait(&a, &id, ""));
    assert_eq!((out.as_str(), err.as_str()), ("out\nrpc-test\n", "err\n"));
    assert_eq!((st.status, st.signaled, st.oom_killed), (7, false, false));
    remove(&a, &id).await;

    // Exec into a running container: stdin -> stdout through cat, then a tty process.
    let id = unique("exec");
    create(&a, &id, spec(&a, &id, &["sleep", "100"])).await.unwrap();
    start(&a, &id).await;
    let proc_json = |args: &[&str], terminal: bool| json!({ "user": { "uid": 0, "gid": 0 }, "args": args, "env": ["PATH=/bin"], "cwd": "/", "terminal": terminal });
    exec(&a, &id, "cat", proc_json(&["cat"], false)).await;
    let w = WriteStreamRequest {
        container_id: id.clone(),
        exec_id: "cat".into(),
        data: b"hello stdin\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.client.write_stdin(ctx(), &w).await.unwrap().len, 12);
    let c = CloseStdinRequest { container_id: id.clone(), exec_id: "cat".into(), ..Default::default() };
    a.client.close_stdin(ctx(), &c).await.unwrap();
    assert_eq!(read_all(&a, &id, "cat", false).await, "hello stdin\n");
    assert_eq!(wait(&a, &id, "cat").await.status, 0);

    exec(&a, &id, "tty", proc_json(&["sh", "-c", "sleep 0.5; tty; stty size"], true)).await;
    let r = TtyWinResizeRequest {
        container_id: id.clone(),
        exec_id: "tty".into(),
        row: 33,
        column: 111,
        ..Default::default()
    };
    a.client.tty_win_resize(ctx(), &r).await.unwrap();
    let out = read_all(&a, &id, "tty", false).await;
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("33 111"), "{out:?}");
    assert_eq!(wait(&a, &id, "tty").await.status, 0);

    // SIGKILL to the init: 137, signaled, signal 9.
    let s = SignalProcessRequest { container_id: id.clone(), signal: 9, ..Default::default() };
    a.client.signal_process(ctx(), &s).await.unwrap();
    let st = wait(&a, &id, "").await;
    assert_eq!((st.status, st.signaled, st.signal), (137, true, 9));
    remove(&a, &id).await;
}

#[tokio::test]
async fn limits_seccomp_oom_and_remove_leaves_nothing() {
    let a = agent().await;
    // Memory limit -> OOM kill reported and an OOM event.
    let id = unique("oom");
    let mut v = spec(&a, &id, &["sh", "-c", "x=$(yes | head -c 200000000); echo survived"]);
    v["linux"]["resources"] = json!({ "memory": { "limit": 16 << 20, "swap": 16 << 20 } });
    create(&a, &id, v).await.unwrap();
    start(&a, &id).await;
    let oom_req = GetOOMEventRequest::new();
    let (st, ev) = tokio::join!(wait(&a, &id, ""), a.client.get_oom_event(ctx(), &oom_req));
    assert!(st.oom_killed && st.status == 137, "{st:?}");
    assert_eq!(ev.unwrap().container_id, id);
    remove(&a, &id).await;

    // pids limit honoured; seccomp blocks mkdir; ListProcesses/Stats.
    let id = unique("lim");
    let mut v = spec(&a, &id, &["sleep", "100"]);
    v["linux"]["resources"] = json!({ "pids": { "limit": 8 } });
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [ { "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 } ]
    });
    create(&a, &id, v).await.unwrap();
    start(&a, &id).await;
    let p =
        |s: &str| json!({ "user": { "uid": 0, "gid": 0 }, "args": ["sh", "-c", s], "env": ["PATH=/bin"], "cwd": "/" });
    exec(&a, &id, "mk", p("mkdir /tmp/x; echo rc=$?")).await;
    assert_eq!(read_all(&a, &id, "mk", false).await, "rc=1\n", "seccomp profile enforced");
    wait(&a, &id, "mk").await;
    exec(&a, &id, "bomb", p("i=0; while [ $i -lt 30 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; echo done"))
        .await;
    let err = read_all(&a, &id, "bomb", true).await;
    wait(&a, &id, "bomb").await;
    assert!(err.contains("can't fork"), "pids.max stops the loop: {err:?}");
    let stats = a
        .client
        .stats_container(ctx(), &StatsContainerRequest { container_id: id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(stats.pids_limit, 8);
    assert!(stats.pids_current <= 8, "{stats:?}");
    let pids = a
        .client
        .list_processes(ctx(), &ListProcessesRequest { container_id: id.clone(), ..Default::default() })
        .await
        .unwrap()
        .pids;
    assert!(!pids.is_empty());
    remove(&a, &id).await;
    // Nothing left: processes, mounts of the rootfs, cgroups.
    for pid in pids {
        // SAFETY: (test) probing a pid with signal 0.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "process {pid} survived RemoveContainer");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(a.rootfs.to_str().unwrap()), "a mount of the rootfs is left");
    let cg = format!("shoji-rpc-{}/{id}", std::process::id());
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        assert!(!Path::new(base).join(&cg).exists(), "cgroup {base}/{cg} left behind");
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    let a = agent().await;
    const NOT_FOUND: i32 = 5;
    const INVALID_ARGUMENT: i32 = 3;
    let e = a
        .client
        .start_container(ctx(), &StartContainerRequest { container_id: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status_code(&e), NOT_FOUND, "{e:?}");
    let bad = CreateContainerRequest {
        container_id: "bad".into(),
        oci_spec_json: b"{\"process\": 1}".to_vec(),
        ..Default::default()
    };
    let e = a.client.create_container(ctx(), &bad).await.unwrap_err();
    assert_eq!(status_code(&e), INVALID_ARGUMENT, "{e:?}");
    assert!(format!("{e:?}").contains("oci_spec_json"), "the error names the field: {e:?}");
    // A device for a PCI path that does not exist in this "guest".
    let id = unique("dev");
    let mut v = spec(&a, &id, &["true"]);
    v["linux"]["devices"] = json!([{ "path": "/dev/vdz", "type": "b", "major": 254, "minor": 99 }]);
    let req = CreateContainerRequest {
        container_id: id.clone(),
        oci_spec_json: serde_json::to_vec(&v).unwrap(),
        devices: vec![Device {
            id: "1f".into(),
            type_: "blk".into(),
            container_path: "/dev/vdz".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = a.client.create_container(ctx(), &req).await.unwrap_err();
    assert!(format!("{e:?}").contains("1f"), "the error names the PCI path: {e:?}");
    // Still serving, and nothing was created.
    let v = a.health.version(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(v.api_version, shoji_protocol::API_VERSION);
    let e =
        a.client.wait_process(ctx(), &WaitProcessRequest { container_id: id, ..Default::default() }).await.unwrap_err();
    assert_eq!(status_code(&e), NOT_FOUND);
}
