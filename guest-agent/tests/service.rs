//! The agent's RPC service, in process on a unix socket, driven with the generated ttrpc client,
//! over a fake container runtime (the real-container tests belong to the runtime).
//!
//! Tests that mount (tmpfs, bind) need root; they run again in a child process inside a private
//! mount namespace (`unshare -m`), so that no mount outlives them, and are skipped when not root.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use shoji_agent::device::{ChannelUevents, UeventSource};
use shoji_agent::listen::{self, ListenAddr};
use shoji_agent::runtime::{ContainerConfig, ContainerRuntime, ExitStatus, Result, RuntimeError, Stats};
use shoji_agent::service::{Agent, ServiceConfig};
use shoji_agent::storage::StorageContext;
use shoji_protocol::agent::{self, health_check_response::ServingStatus};
use shoji_protocol::agent_ttrpc::{AgentServiceClient, HealthClient};
use shoji_protocol::ttrpc::{self, asynchronous::Client, Code};

mod common;

// ---------------------------------------------------------------------------------------------
// A fake runtime: remembers what it was asked, answers from a script.

#[derive(Default)]
struct FakeContainer {
    started: bool,
    /// What ReadStdout hands out, chunk by chunk; then end of stream.
    stdout: VecDeque<Vec<u8>>,
    execs: Vec<String>,
    signals: Vec<(String, i32, bool)>,
    stdin: Vec<u8>,
}

#[derive(Default)]
struct FakeRuntime {
    containers: Mutex<HashMap<String, FakeContainer>>,
    /// Every successful create, in order.
    created: Mutex<Vec<ContainerConfig>>,
    /// Every call, by name, to check that a refused request never reached the runtime.
    calls: Mutex<Vec<String>>,
    /// What `namespace` answers for any container it has.
    namespace: Mutex<PathBuf>,
}

impl FakeRuntime {
    fn call(&self, name: &str) {
        self.calls.lock().unwrap().push(name.to_owned());
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut FakeContainer) -> T) -> Result<T> {
        let mut cs = self.containers.lock().unwrap();
        cs.get_mut(id).map(f).ok_or_else(|| RuntimeError::NoContainer(id.to_owned()))
    }

    fn process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&mut FakeContainer) -> T) -> Result<T> {
        self.with(id, |c| {
            if exec_id.is_empty() || exec_id == id || c.execs.iter().any(|e| e == exec_id) {
                Ok(f(c))
            } else {
                Err(RuntimeError::NoProcess { id: id.to_owned(), exec_id: exec_id.to_owned() })
            }
        })?
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn create(&self, cfg: ContainerConfig) -> Result<()> {
        self.call("create");
        let mut cs = self.containers.lock().unwrap();
        if cs.contains_key(&cfg.id) {
            return Err(RuntimeError::Exists(cfg.id));
        }
        let stdout = VecDeque::from([b"hello ".to_vec(), b"world\n".to_vec()]);
        cs.insert(cfg.id.clone(), FakeContainer { stdout, ..Default::default() });
        self.created.lock().unwrap().push(cfg);
        Ok(())
    }
    async fn start(&self, id: &str) -> Result<()> {
        self.call("start");
        self.with(id, |c| {
            if c.started {
                return Err(RuntimeError::BadState {
                    id: id.to_owned(),
                    state: "running".into(),
                    action: "start".into(),
                });
            }
            c.started = true;
            Ok(())
        })?
    }
    async fn exec(&self, id: &str, exec_id: &str, _: Process) -> Result<()> {
        self.call("exec");
        self.with(id, |c| {
            if c.execs.iter().any(|e| e == exec_id) {
                return Err(RuntimeError::ProcessExists { id: id.to_owned(), exec_id: exec_id.to_owned() });
            }
            c.execs.push(exec_id.to_owned());
            Ok(())
        })?
    }
    async fn signal(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        self.call("signal");
        self.process(id, exec_id, |c| c.signals.push((exec_id.to_owned(), signal, all)))
    }
    async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        self.call("wait");
        self.process(id, exec_id, |_| ExitStatus { status: 137, signal: Some(9), oom_killed: true })
    }
    async fn read_stdout(&self, id: &str, exec_id: &str, max: usize) -> Result<Vec<u8>> {
        self.call("read_stdout");
        self.process(id, exec_id, |c| match c.stdout.pop_front() {
            Some(mut chunk) if chunk.len() > max => {
                let rest = chunk.split_off(max);
                c.stdout.push_front(rest);
                chunk
            }
            Some(chunk) => chunk,
            None => Vec::new(),
        })
    }
    async fn read_stderr(&self, id: &str, exec_id: &str, _: usize) -> Result<Vec<u8>> {
        self.call("read_stderr");
        self.process(id, exec_id, |_| Vec::new())
    }
    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        self.call("write_stdin");
        self.process(id, exec_id, |c| {
            c.stdin.extend_from_slice(data);
            data.len()
        })
    }
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.call("close_stdin");
        self.process(id, exec_id, |_| ())
    }
    async fn resize_tty(&self, id: &str, exec_id: &str, _: u16, _: u16) -> Result<()> {
        self.call("resize_tty");
        self.process(id, exec_id, |_| ())
    }
    async fn stats(&self, id: &str) -> Result<Stats> {
        self.call("stats");
        self.with(id, |_| Stats { memory_usage_bytes: 4096, pids_current: 2, ..Default::default() })
    }
    async fn update(&self, id: &str, _: LinuxResources) -> Result<()> {
        self.call("update");
        self.with(id, |_| ())
    }
    async fn namespace(&self, id: &str, _: &str) -> Result<PathBuf> {
        self.call("namespace");
        let ns = self.namespace.lock().unwrap().clone();
        self.with(id, |_| ns)
    }
    async fn pids(&self, id: &str) -> Result<Vec<i32>> {
        self.call("pids");
        self.with(id, |_| vec![1, 7])
    }
    async fn remove(&self, id: &str, _: u32) -> Result<()> {
        self.call("remove");
        self.containers.lock().unwrap().remove(id).map(drop).ok_or_else(|| RuntimeError::NoContainer(id.to_owned()))
    }
    async fn next_oom_event(&self) -> String {
        "c-oom".into()
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: the service on a unix socket in a temporary directory.

struct Harness {
    dir: tempfile::TempDir,
    runtime: Arc<FakeRuntime>,
    server: ttrpc::asynchronous::Server,
    agent: AgentServiceClient,
    health: HealthClient,
}

/// A uevent source that never sees an event (no device is ever hot-plugged in these tests).
fn quiet_uevents() -> std::io::Result<Box<dyn UeventSource + Send>> {
    let (tx, rx) = ChannelUevents::new();
    std::mem::forget(tx); // keep the channel open: waiting times out rather than failing
    Ok(Box::new(rx))
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["root", "sys", "dev", "proc"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let cfg = ServiceConfig {
            storage: StorageContext {
                root,
                sysfs_root: dir.path().join("sys"),
                dev_root: dir.path().join("dev"),
                hotplug_timeout: Duration::from_millis(200),
            },
            proc_root: PathBuf::from("/proc"),
            guest_wide: false,
            uevents: Arc::new(quiet_uevents),
        };
        let runtime = Arc::new(FakeRuntime::default());
        let agent = Arc::new(Agent::new(runtime.clone(), cfg));
        let addr = ListenAddr::Unix(dir.path().join("agent.sock"));
        let server = listen::serve(&addr, agent).await.unwrap();
        let client = Client::connect(&addr.to_string()).await.unwrap();
        Harness {
            dir,
            runtime,
            server,
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn calls(&self) -> Vec<String> {
        self.runtime.calls.lock().unwrap().clone()
    }

    async fn stop(mut self) {
        self.server.shutdown().await.unwrap();
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

/// The code and message of a failed call.
fn status<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

const SPEC: &str = r#"{
    "ociVersion": "1.0.2",
    "root": {"path": "rootfs", "readonly": true},
    "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
    "linux": {
        "devices": [{"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0}],
        "resources": {"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "rw"}
        ]}
    }
}"#;

fn create_req(id: &str) -> agent::CreateContainerRequest {
    agent::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: SPEC.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn storage(driver: &str, source: &str, mount_point: &str, options: &[&str]) -> agent::Storage {
    agent::Storage {
        driver: driver.into(),
        source: source.into(),
        mount_point: mount_point.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn health_and_version() {
    let h = Harness::start().await;
    let r = h.health.check(ctx(), &agent::CheckRequest::new()).await.unwrap();
    assert_eq!(r.status.enum_value(), Ok(ServingStatus::SERVING));
    let v = h.health.version(ctx(), &agent::CheckRequest::new()).await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, shoji_protocol::API_VERSION);
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn guest_details() {
    let h = Harness::start().await;
    let d = h.agent.get_guest_details(ctx(), &agent::GuestDetailsRequest::new()).await.unwrap();
    assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!d.kernel_release.is_empty());
    assert!(d.mem_total_bytes > 0, "MemTotal from /proc/meminfo");
    assert!(!d.init_daemon, "the test is not PID 1");
    // The harness's sysfs is an empty directory: CPUs and controllers are simply unknown.
    assert_eq!((d.online_cpus, d.cgroup_controllers.len()), (0, 0));
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_spec_is_invalid_argument_and_the_agent_keeps_serving() {
    let h = Harness::start().await;
    let cases: [(&[u8], &str); 4] = [
        (br#"{"ociVersion": 1}"#, "oci_spec_json: invalid type: integer `1`, expected a string at line 1 column"),
        (b"{not json", "oci_spec_json: key must be a string at line 1 column 2"),
        (b"", "oci_spec_json: is empty"),
        (
            br#"{"ociVersion": "1.0.2", "linux": {"devices": [{"path": "/dev/x", "type": "q"}]}}"#,
            "oci_spec_json: unknown variant `q`",
        ),
    ];
    for (json, want) in cases {
        let mut req = create_req("c1");
        req.oci_spec_json = json.to_vec();
        let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.starts_with(&format!("container \"c1\": {want}")), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    // Bad ids and rootfs, too.
    let (code, msg) = status(h.agent.create_container(ctx(), &create_req("../x")).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("container_id: "), "{msg}");
    let mut req = create_req("c1");
    req.rootfs = "relative".into();
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("rootfs: path \"relative\" is not absolute"), "{msg}");
    assert!(h.calls().is_empty(), "nothing reached the runtime: {:?}", h.calls());

    // Still serving, and the same id can be created now.
    h.health.version(ctx(), &agent::CheckRequest::new()).await.unwrap();
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    let (code, msg) = status(h.agent.create_container(ctx(), &create_req("c1")).await);
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    assert!(msg.contains("\"c1\""), "{msg}");
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn missing_pci_device_is_a_clear_error_and_the_spec_never_reaches_the_runtime() {
    let h = Harness::start().await;
    let device = |id: &str| agent::Device {
        id: id.into(),
        type_: "blk".into(),
        container_path: "/dev/xvda".into(),
        ..Default::default()
    };
    // No bridge in slot 2 of the (fake, empty) sysfs: named at once.
    let mut req = create_req("c1");
    req.devices = vec![device("02/01")];
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.starts_with("container \"c1\": PCI path 02/01: bridge"), "{msg}");
    // Nothing in slot 5 of the root bus: after the hot-plug timeout.
    req.devices = vec![device("05")];
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert_eq!(msg.split(" within ").next().unwrap(), "container \"c1\": PCI path 05: no block device appeared");
    // Not a PCI path, and an unknown kind: the request is wrong.
    req.devices = vec![device("zz")];
    assert_eq!(status(h.agent.create_container(ctx(), &req).await).0, Code::INVALID_ARGUMENT);
    req.devices = vec![agent::Device { type_: "gpu".into(), ..device("02") }];
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("unknown device kind \"gpu\""), "{msg}");
    assert!(h.calls().is_empty(), "the runtime saw none of it: {:?}", h.calls());

    // A device that is there (its node known): the runtime gets the spec rewritten in one batch
    // (linux.devices and the cgroup rule: host 8:0 → guest 1:3, /dev/null's numbers) and the
    // root path set to `rootfs`.
    req.devices = vec![agent::Device {
        type_: "mmioblk".into(),
        vm_path: "/dev/null".into(),
        container_path: "/dev/xvda".into(),
        ..Default::default()
    }];
    req.rootfs = "/run/shoji/c1/rootfs".into();
    h.agent.create_container(ctx(), &req).await.unwrap();
    let created = h.runtime.created.lock().unwrap().clone();
    let spec: &Spec = &created[0].spec;
    let dev = &spec.linux().as_ref().unwrap().devices().as_ref().unwrap()[0];
    assert_eq!((dev.major(), dev.minor()), (1, 3));
    let rules = spec.linux().as_ref().unwrap().resources().as_ref().unwrap().devices().as_ref().unwrap();
    assert_eq!((rules[1].major(), rules[1].minor()), (Some(1), Some(3)));
    assert_eq!(rules[0].major(), None, "the wildcard rule is untouched");
    let root = spec.root().as_ref().unwrap();
    assert_eq!(root.path(), &h.root().join("run/shoji/c1/rootfs"));
    assert_eq!(root.readonly(), Some(true), "the rest of root is kept");
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_create_the_client_gave_up_on_still_finishes_cleanly() {
    let h = Harness::start().await;
    // The device wait (200 ms) outlasts the client's deadline (50 ms): ttrpc drops the handler.
    let mut req = create_req("c1");
    req.devices = vec![agent::Device {
        id: "05".into(),
        type_: "blk".into(),
        container_path: "/dev/xvda".into(),
        ..Default::default()
    }];
    let r = h.agent.create_container(ttrpc::context::with_timeout(50_000_000), &req).await;
    assert!(r.is_err(), "{r:?}");
    // The work went on in its own task and undid its claim on "c1" when the device never came.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_containers_and_processes_are_not_found() {
    let h = Harness::start().await;
    let id = || "nope".to_string();
    let results = [
        status(
            h.agent
                .start_container(ctx(), &agent::StartContainerRequest { container_id: id(), ..Default::default() })
                .await,
        ),
        status(
            h.agent
                .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: id(), ..Default::default() })
                .await,
        ),
        status(
            h.agent.wait_process(ctx(), &agent::WaitProcessRequest { container_id: id(), ..Default::default() }).await,
        ),
        status(
            h.agent
                .signal_process(
                    ctx(),
                    &agent::SignalProcessRequest { container_id: id(), signal: 15, ..Default::default() },
                )
                .await,
        ),
        status(
            h.agent
                .stats_container(ctx(), &agent::StatsContainerRequest { container_id: id(), ..Default::default() })
                .await,
        ),
        status(
            h.agent
                .list_processes(ctx(), &agent::ListProcessesRequest { container_id: id(), ..Default::default() })
                .await,
        ),
        status(
            h.agent.read_stdout(ctx(), &agent::ReadStreamRequest { container_id: id(), ..Default::default() }).await,
        ),
        status(
            h.agent.close_stdin(ctx(), &agent::CloseStdinRequest { container_id: id(), ..Default::default() }).await,
        ),
    ];
    for (code, msg) in results {
        assert_eq!(code, Code::NOT_FOUND, "{msg}");
        assert_eq!(msg, "container \"nope\" not found");
    }
    // A known container, an unknown process.
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    let req = agent::WaitProcessRequest { container_id: "c1".into(), exec_id: "e9".into(), ..Default::default() };
    let (code, msg) = status(h.agent.wait_process(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert_eq!(msg, "process \"e9\" of container \"c1\" not found");
    // Empty and odd ids are refused before the runtime is asked.
    let req = agent::StartContainerRequest { container_id: String::new(), ..Default::default() };
    assert_eq!(
        status(h.agent.start_container(ctx(), &req).await),
        (Code::INVALID_ARGUMENT, "container_id: must not be empty".into())
    );
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn process_rpcs_pass_through_and_check_their_arguments() {
    let h = Harness::start().await;
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    h.agent
        .start_container(ctx(), &agent::StartContainerRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    let (code, msg) = status(
        h.agent
            .start_container(ctx(), &agent::StartContainerRequest { container_id: "c1".into(), ..Default::default() })
            .await,
    );
    assert_eq!((code, msg.as_str()), (Code::FAILED_PRECONDITION, "container \"c1\" is running, cannot start"));

    // ExecProcess: process_json is parsed; the exec id must be new.
    let exec = |exec_id: &str, json: &str| agent::ExecProcessRequest {
        container_id: "c1".into(),
        exec_id: exec_id.into(),
        process_json: json.as_bytes().to_vec(),
        ..Default::default()
    };
    let good = r#"{"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#;
    let (code, msg) = status(h.agent.exec_process(ctx(), &exec("e1", r#"{"args": "ls"}"#)).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("exec \"e1\" in container \"c1\": process_json: invalid type"), "{msg}");
    assert_eq!(status(h.agent.exec_process(ctx(), &exec("", good)).await).0, Code::INVALID_ARGUMENT);
    assert_eq!(status(h.agent.exec_process(ctx(), &exec("c1", good)).await).0, Code::INVALID_ARGUMENT);
    h.agent.exec_process(ctx(), &exec("e1", good)).await.unwrap();
    assert_eq!(status(h.agent.exec_process(ctx(), &exec("e1", good)).await).0, Code::ALREADY_EXISTS);

    // Signals are checked, then passed on.
    let sig = |signal: u32| agent::SignalProcessRequest {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        signal,
        all: true,
        ..Default::default()
    };
    h.agent.signal_process(ctx(), &sig(9)).await.unwrap();
    let (code, msg) = status(h.agent.signal_process(ctx(), &sig(99)).await);
    assert_eq!((code, msg.as_str()), (Code::INVALID_ARGUMENT, "signal: 99 is not a signal number (0-64)"));
    assert_eq!(h.runtime.containers.lock().unwrap()["c1"].signals, [("e1".to_string(), 9, true)]);

    // WaitProcess: every field of the exit status.
    let w = h
        .agent
        .wait_process(
            ctx(),
            &agent::WaitProcessRequest { container_id: "c1".into(), exec_id: "e1".into(), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!((w.status, w.signaled, w.signal, w.oom_killed), (137, true, 9, true));

    // Stdin, tty, stats, processes, resources, OOM events.
    let n = h
        .agent
        .write_stdin(
            ctx(),
            &agent::WriteStreamRequest { container_id: "c1".into(), data: b"input".to_vec(), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!(n.len, 5);
    h.agent
        .close_stdin(ctx(), &agent::CloseStdinRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    let resize =
        |row, column| agent::TtyWinResizeRequest { container_id: "c1".into(), row, column, ..Default::default() };
    h.agent.tty_win_resize(ctx(), &resize(24, 80)).await.unwrap();
    assert_eq!(status(h.agent.tty_win_resize(ctx(), &resize(24, 1 << 20)).await).0, Code::INVALID_ARGUMENT);
    let s = h
        .agent
        .stats_container(ctx(), &agent::StatsContainerRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!((s.memory_usage_bytes, s.pids_current), (4096, 2));
    let p = h
        .agent
        .list_processes(ctx(), &agent::ListProcessesRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(p.pids, [1, 7]);
    let upd = |json: &str| agent::UpdateContainerRequest {
        container_id: "c1".into(),
        resources_json: json.as_bytes().to_vec(),
        ..Default::default()
    };
    h.agent.update_container(ctx(), &upd(r#"{"pids": {"limit": 10}}"#)).await.unwrap();
    let (code, msg) = status(h.agent.update_container(ctx(), &upd(r#"{"pids": 10}"#)).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.starts_with("container \"c1\": resources_json: invalid type"), "{msg}");
    let oom = h.agent.get_oom_event(ctx(), &agent::GetOOMEventRequest::new()).await.unwrap();
    assert_eq!(oom.container_id, "c-oom");

    h.agent
        .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    let (code, _) = status(
        h.agent
            .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() })
            .await,
    );
    assert_eq!(code, Code::NOT_FOUND);
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn read_stdout_passes_end_of_stream_through() {
    let h = Harness::start().await;
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    let read = |len: u32| agent::ReadStreamRequest { container_id: "c1".into(), len, ..Default::default() };
    let mut got = Vec::new();
    // A small len is honoured; 0 asks for as much as the agent gives.
    let first = h.agent.read_stdout(ctx(), &read(3)).await.unwrap();
    assert_eq!(first.data, b"hel");
    got.extend(first.data);
    loop {
        let r = h.agent.read_stdout(ctx(), &read(0)).await.unwrap();
        if r.data.is_empty() {
            break;
        }
        got.extend(r.data);
    }
    assert_eq!(got, b"hello world\n");
    // End of stream stays end of stream; stderr was empty from the start.
    assert!(h.agent.read_stdout(ctx(), &read(4096)).await.unwrap().data.is_empty());
    assert!(h.agent.read_stderr(ctx(), &read(4096)).await.unwrap().data.is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn sandbox_without_storages() {
    let h = Harness::start().await;
    let req = agent::CreateSandboxRequest { sandbox_id: "sb".into(), hostname: "box".into(), ..Default::default() };
    h.agent.create_sandbox(ctx(), &req).await.unwrap();
    let (code, msg) = status(h.agent.create_sandbox(ctx(), &req).await);
    assert_eq!((code, msg.as_str()), (Code::ALREADY_EXISTS, "sandbox \"sb\" is already created"));
    let bad = agent::CreateSandboxRequest { hostname: "x".repeat(65), ..Default::default() };
    assert_eq!(status(h.agent.create_sandbox(ctx(), &bad).await).0, Code::INVALID_ARGUMENT);
    h.agent.create_container(ctx(), &create_req("c1")).await.unwrap();
    h.agent.destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new()).await.unwrap();
    assert!(h.runtime.containers.lock().unwrap().is_empty(), "DestroySandbox removed the containers");
    h.agent.create_sandbox(ctx(), &req).await.unwrap();
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Real mounts: root, private mount namespace.

/// Runs `test` again in a child process in private mount and network namespaces. True in that
/// child (go on), false in the parent once the child passed, or when the test cannot run here
/// (not root, no `unshare`, namespaces refused), which it says.
fn in_private_mount_ns(test: &str) -> bool {
    if std::env::var_os("SHOJI_TEST_IN_MOUNT_NS").is_some() {
        return true;
    }
    if let Some(why) = common::cannot_unshare(&["--mount", "--net", "--propagation", "private"]) {
        eprintln!("skipping {test}: {why}");
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("SHOJI_TEST_IN_MOUNT_NS", "1")
        .output();
    match out {
        Err(e) => panic!("running unshare: {e}"),
        Ok(out) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && text.contains("1 passed"), "{test} in a mount namespace:\n{text}");
            false
        }
    }
}

/// (mount point, fstype) of every mount below `dir`, from /proc/self/mountinfo.
fn mounts_below(dir: &Path) -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mp = PathBuf::from(fields[4].replace("\\040", " "));
            mp.starts_with(dir).then(|| (mp, fields[sep + 1].to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn storages_are_mounted_then_unmounted_on_remove() {
    if !in_private_mount_ns("storages_are_mounted_then_unmounted_on_remove") {
        return;
    }
    let h = Harness::start().await;
    let root = h.root();
    std::fs::create_dir_all(root.join("shared/data")).unwrap();
    std::fs::write(root.join("shared/data/hello"), b"hi").unwrap();
    std::fs::write(root.join("shared/file"), b"one file").unwrap();

    let mut req = create_req("c1");
    req.storages = vec![
        storage("tmpfs", "", "/run/c1/scratch", &["size=1m", "nosuid"]),
        storage("bind", "/shared/data", "/run/c1/data", &["ro"]),
        storage("bind", "/shared/file", "/run/c1/etc/file", &[]),
    ];
    h.agent.create_container(ctx(), &req).await.unwrap();
    let mut mounts = mounts_below(&root);
    mounts.sort();
    let points: Vec<&Path> = mounts.iter().map(|m| m.0.as_path()).collect();
    assert_eq!(points, [root.join("run/c1/data"), root.join("run/c1/etc/file"), root.join("run/c1/scratch")]);
    assert_eq!(mounts.iter().find(|m| m.0 == root.join("run/c1/scratch")).unwrap().1, "tmpfs");
    assert_eq!(std::fs::read(root.join("run/c1/data/hello")).unwrap(), b"hi");
    assert_eq!(std::fs::read(root.join("run/c1/etc/file")).unwrap(), b"one file");
    // "ro" took effect on the bind mount.
    let err = std::fs::write(root.join("run/c1/data/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    std::fs::write(root.join("run/c1/scratch/new"), b"x").unwrap();

    h.agent
        .remove_container(ctx(), &agent::RemoveContainerRequest { container_id: "c1".into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(mounts_below(&root), [], "all unmounted");
    assert!(!root.join("run").exists(), "the mount points the agent made are gone");
    assert!(root.join("shared/data/hello").exists(), "bind sources are untouched");
    h.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn failed_create_unmounts_what_it_mounted() {
    if !in_private_mount_ns("failed_create_unmounts_what_it_mounted") {
        return;
    }
    let h = Harness::start().await;
    let root = h.root();

    // A missing bind source after a good tmpfs: named, and the tmpfs is undone.
    let mut req = create_req("c1");
    req.storages = vec![storage("tmpfs", "", "/run/c1/a", &[]), storage("bind", "/shared/none", "/run/c1/b", &[])];
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.starts_with("container \"c1\": storage bind \"/shared/none\": source not found"), "{msg}");
    assert_eq!(mounts_below(&root), []);

    // Good storages, then a device that is not there: the storages are undone too.
    req.storages = vec![storage("tmpfs", "", "/run/c1/a", &[])];
    req.devices = vec![agent::Device {
        id: "03".into(),
        type_: "blk".into(),
        container_path: "/dev/xvda".into(),
        ..Default::default()
    }];
    let (code, msg) = status(h.agent.create_container(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("PCI path 03"), "{msg}");
    assert_eq!(mounts_below(&root), []);
    assert!(!root.join("run").exists());
    assert!(h.calls().is_empty(), "{:?}", h.calls());

    // Sandbox storages live until DestroySandbox.
    let sb = agent::CreateSandboxRequest {
        sandbox_id: "sb".into(),
        storages: vec![storage("tmpfs", "", "/run/sandbox/shm", &["size=64k"])],
        ..Default::default()
    };
    h.agent.create_sandbox(ctx(), &sb).await.unwrap();
    assert_eq!(mounts_below(&root), [(root.join("run/sandbox/shm"), "tmpfs".to_string())]);
    h.agent.destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new()).await.unwrap();
    assert_eq!(mounts_below(&root), []);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The pod network: real netlink, in the child's own network namespace (the "guest's root").

#[tokio::test(flavor = "current_thread")]
async fn update_network_moves_the_interface_into_the_pods_namespace_and_sets_it_up() {
    use shoji_devices::virtio::net::tap::Tap;
    use shoji_netlink::{config::format_mac, IpNet, Netlink, Route};
    if !in_private_mount_ns("update_network_moves_the_interface_into_the_pods_namespace_and_sets_it_up") {
        return;
    }
    let h = Harness::start().await;
    // The virtio-net device's interface, as the guest kernel made it, and its sysfs.
    let tap = Tap::open("vnet0").unwrap();
    let mut root = Netlink::open().unwrap();
    let mac = root.link("vnet0").unwrap().mac.unwrap();
    let dev = h.dir.path().join("sys/devices/pci0000:00/0000:00:06.0/virtio4/net/vnet0");
    std::fs::create_dir_all(dev).unwrap();
    // The pod's sandbox container: a process in a network namespace of its own.
    let mut pod = std::process::Command::new("unshare").args(["--net", "sleep", "60"]).spawn().unwrap();
    let pod_ns = PathBuf::from(format!("/proc/{}/ns/net", pod.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(&pod_ns).ok() == std::fs::read_link("/proc/self/ns/net").ok() {
        assert!(std::time::Instant::now() < deadline, "unshare did not run");
        std::thread::sleep(Duration::from_millis(5));
    }
    *h.runtime.namespace.lock().unwrap() = pod_ns.clone();
    // The pod's namespace already has a link with the guest kernel's name for ours: no clash,
    // since the move names it eth0 there.
    let ip = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pod_ns.display()))
        .args(["ip", "link", "add", "vnet0", "type", "veth", "peer", "name", "vpeer0"])
        .output()
        .unwrap();
    assert!(ip.status.success(), "{}", String::from_utf8_lossy(&ip.stderr));
    h.agent.create_container(ctx(), &create_req("pod")).await.unwrap();

    let iface = |mac: &str| agent::Interface {
        pci_path: "06".into(),
        mac: mac.into(),
        name: "eth0".into(),
        mtu: 1400,
        addresses: vec!["10.88.0.5/16".into()],
        ..Default::default()
    };
    let route = |dest: &str, gateway: &str| agent::Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: "eth0".into(),
        ..Default::default()
    };
    let req = |mac: &str| agent::UpdateNetworkRequest {
        container_id: "pod".into(),
        interfaces: vec![iface(mac)],
        routes: vec![route("default", "10.88.0.1"), route("192.168.5.0/24", "")],
        ..Default::default()
    };
    // Refused before anything moves: another device's MAC, an unknown container, a bad field.
    let (code, msg) = status(h.agent.update_network(ctx(), &req("02:00:00:00:00:99")).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("interface eth0: the device at PCI 06 is vnet0"), "{msg}");
    let mut other = req(&format_mac(&mac));
    other.container_id = "nope".into();
    assert_eq!(status(h.agent.update_network(ctx(), &other).await).0, Code::NOT_FOUND);
    let mut bad = req(&format_mac(&mac));
    bad.interfaces[0].mtu = 10;
    let (code, msg) = status(h.agent.update_network(ctx(), &bad).await);
    assert_eq!((code, msg.as_str()), (Code::INVALID_ARGUMENT, "interfaces[0].mtu: 10 is not between 68 and 65535"));
    assert!(root.link("vnet0").is_ok(), "still here");

    h.agent.update_network(ctx(), &req(&format_mac(&mac))).await.unwrap();
    assert!(root.link("vnet0").is_err(), "moved out of the agent's namespace");
    let mut nl = Netlink::open_in(&std::fs::File::open(&pod_ns).unwrap()).unwrap();
    let eth0 = nl.link("eth0").unwrap();
    assert_eq!((eth0.mac, eth0.mtu, eth0.up), (Some(mac), 1400, true));
    assert_eq!(nl.addresses(eth0.index).unwrap(), ["10.88.0.5/16".parse::<IpNet>().unwrap()]);
    let mut routes = nl.routes(eth0.index).unwrap();
    routes.sort_by_key(|r| r.dest_text());
    assert_eq!(routes, [Route::parse("192.168.5.0/24", "").unwrap(), Route::parse("default", "10.88.0.1").unwrap()]);
    assert!(nl.links().unwrap().iter().any(|l| l.loopback && l.up), "the pod's loopback is up");

    // The device is the container's while it lives.
    let rm = agent::RemoveDeviceRequest { pci_path: "06".into(), ..Default::default() };
    let (code, msg) = status(h.agent.remove_device(ctx(), &rm).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("\"pod\""), "{msg}");
    let _ = pod.kill();
    let _ = pod.wait();
    drop(tap);
    h.stop().await;
}
