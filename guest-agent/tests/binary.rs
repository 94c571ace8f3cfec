//! The real `shoji-agent` binary, as an ordinary process: it serves on unix sockets, answers,
//! and exits cleanly on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use shoji_protocol::agent;
use shoji_protocol::agent_ttrpc::{AgentServiceClient, HealthClient};
use shoji_protocol::ttrpc::{self, asynchronous::Client};

mod common;

const AGENT: &str = env!("CARGO_BIN_EXE_shoji-agent");

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

/// Kills the agent if a test fails half-way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, sig) }, 0);
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_for_socket(path: &Path, agent: &mut Running) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = agent.0.try_wait().unwrap() {
            panic!("the agent exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn serves_on_unix_sockets_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("sub/b.sock"));
    // A stale socket from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&a).unwrap());
    let mut agent = Running(
        Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix:{}", a.display()))
            .arg("--listen")
            .arg(format!("unix://{}", b.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--log", "info"])
            // No host vsock peer here: the log stays on stderr and the agent carries on.
            .arg("--log-vsock")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&b, &mut agent);

    for sock in [&a, &b] {
        let client = Client::connect(&format!("unix://{}", sock.display())).await.unwrap();
        let v = HealthClient::new(client.clone()).version(ctx(), &agent::CheckRequest::new()).await.unwrap();
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(v.api_version, shoji_protocol::API_VERSION);
        let d =
            AgentServiceClient::new(client).get_guest_details(ctx(), &agent::GuestDetailsRequest::new()).await.unwrap();
        assert!(!d.init_daemon);
    }
    assert!(dir.path().join("state").is_dir());

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(!a.exists() && !b.exists(), "the sockets are removed");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut agent.0.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("agent ready") && log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("log to vsock port 1025: "), "the failed vsock log connection is logged: {log}");
}

#[test]
fn a_bad_listen_address_is_refused_by_name() {
    let out = Command::new(AGENT).args(["--listen", "tcp://0.0.0.0:1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"tcp://0.0.0.0:1\""), "{err}");
}

/// The host pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// PID 1 of a new PID namespace (in a private mount namespace, /dev/console bound to /dev/null):
/// it runs its init duties, serves, and on SIGTERM shuts down with reboot(RB_AUTOBOOT), which in
/// a PID namespace ends the namespace with SIGHUP. Root only; skipped otherwise.
#[tokio::test(flavor = "current_thread")]
async fn as_pid1_it_serves_and_reboots_on_sigterm() {
    use std::os::unix::process::ExitStatusExt;
    let flags = ["--pid", "--fork", "--mount", "--propagation", "private"];
    if let Some(why) = common::cannot_unshare(&flags) {
        eprintln!("skipping: {why}");
        return;
    }
    // Not below /tmp or /run (where the checkout itself may be, as in CI's clone): PID 1 mounts
    // tmpfs over those in its mount namespace, which would hide the socket.
    std::fs::create_dir_all("/var/tmp").unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let sock = dir.path().join("pid1.sock");
    let mut unshare = Running(
        Command::new("unshare")
            .args(flags)
            .args(["sh", "-c"])
            .arg(r#"mount --bind /dev/null /dev/console && exec "$0" "$@""#)
            .arg(AGENT)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--state-dir", "/run/shoji-agent-test", "--log", "info"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock, &mut unshare);

    let client = Client::connect(&format!("unix://{}", sock.display())).await.unwrap();
    let d = AgentServiceClient::new(client).get_guest_details(ctx(), &agent::GuestDetailsRequest::new()).await.unwrap();
    assert!(d.init_daemon, "the agent sees itself as PID 1");

    let agent_pid = children(unshare.0.id());
    assert_eq!(agent_pid.len(), 1, "unshare has one child, the agent: {agent_pid:?}");
    // SAFETY: kill takes plain integers; the pid is the agent, alive (it just answered).
    assert_eq!(unsafe { libc::kill(agent_pid[0] as libc::pid_t, libc::SIGTERM) }, 0);
    let status = unshare.wait_exit(Duration::from_secs(20));
    // unshare(1) passes on how its child ended: a reboot in a PID namespace is SIGHUP.
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status}");
}
