//! A shim whose cache `shoji setup` never filled: its first Create fails at once with one line
//! naming `shoji setup` (the shim only looks the guest up; it never builds it). Runs the real
//! binary as the ttrpc server containerd would start, and speaks the task API to it as
//! containerd does; a listening socket stands in for containerd's event service.
use containerd_shim::api;
use containerd_shim::protos::shim_sync::{Client, TaskClient};
use containerd_shim::protos::ttrpc::{self, context};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-shoji-v2");
const NAMESPACE: &str = "shoji-test";

/// Kills the server if the test ends early, so no shim outlives it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shim(args: &[&str], bundle: &Path, cache: &Path, config: &Path, events: &Path) -> Command {
    let mut cmd = Command::new(SHIM);
    cmd.args(["-namespace", NAMESPACE, "-address", "/nonexistent/containerd.sock"])
        .args(args)
        .env("TTRPC_ADDRESS", events)
        .env("SHOJI_CACHE", cache)
        .env("SHOJI_SHIM_CONFIG", config)
        .current_dir(bundle)
        .stdin(Stdio::null());
    cmd
}

#[test]
fn create_with_an_empty_cache_fails_with_one_line_naming_shoji_setup() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let bundle = root.path().join("bundle");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let spec = r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"}}"#;
    std::fs::write(bundle.join("config.json"), spec).unwrap();
    // The defaults (boot the cached guest), whatever /etc/shoji/shim.toml says on this host.
    let config = root.path().join("shim.toml");
    std::fs::write(&config, "").unwrap();
    let events = root.path().join("events.sock");
    let _containerd = UnixListener::bind(&events).unwrap();
    let sock = root.path().join("shim.sock");
    let address = format!("unix://{}", sock.display());
    let id = format!("empty-cache-{}", std::process::id());
    // What `start` leaves in the bundle for the server and `delete` (we start the server directly).
    std::fs::write(bundle.join("address"), &address).unwrap();

    let server = shim(&["-id", &id, "-socket", &address], &bundle, &cache, &config, &events)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the shim server");
    let mut server = Server(server);
    // The socket file exists from bind(), before listen(): connect until it is accepted.
    let started = Instant::now();
    let client = loop {
        match Client::connect(&address) {
            Ok(c) => break c,
            Err(e) => {
                if let Ok(Some(status)) = server.0.try_wait() {
                    panic!("the shim server exited ({status}) before listening on {}", sock.display());
                }
                assert!(started.elapsed() < Duration::from_secs(30), "the shim server never listened: {e:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let task = TaskClient::new(client);
    let req = api::CreateTaskRequest { id: id.clone(), bundle: bundle.display().to_string(), ..Default::default() };
    let t = Instant::now();
    let err = task.create(context::with_timeout(Duration::from_secs(60).as_nanos() as i64), &req).unwrap_err();
    let msg = match &err {
        ttrpc::Error::RpcStatus(s) => s.message.clone(),
        e => panic!("Create failed, but not with the shim's status: {e:?}"),
    };
    eprintln!("Create: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    assert!(msg.contains("no guest kernel") && msg.contains(&cache.display().to_string()), "{msg}");
    assert!(msg.ends_with("run `shoji setup`"), "{msg}");
    // Looked up, not built: a kernel build would take minutes.
    assert!(t.elapsed() < Duration::from_secs(30), "Create took {:?}", t.elapsed());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "nothing was written to the cache");

    // No task left: Shutdown ends the server.
    task.shutdown(context::with_timeout(Duration::from_secs(10).as_nanos() as i64), &api::ShutdownRequest::new())
        .expect("Shutdown");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the shim server did not exit after Shutdown");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the shim server: {status}");
    // containerd's `delete` after the server: removes what the Create prepared under /run/shoji.
    let out =
        shim(&["-id", &id, "-bundle", &bundle.display().to_string(), "delete"], &bundle, &cache, &config, &events)
            .output()
            .unwrap();
    assert!(out.status.success(), "delete: {out:?}");
    assert!(!sock.exists(), "the server's socket is gone");
}
