//! `shoji run` killed with SIGKILL leaves nothing once one more `shoji` command has run: no
//! session dir (vsock socket, console log), nothing in TMPDIR, no process, no mount. Boots our
//! Linux guest on the real /dev/kvm (`shoji setup` builds it when missing), three times: the
//! kill lands (a) while the guest boots, (b) while the command runs, (c) at teardown.
//!
//! Each phase has its own SHOJI_RUN_DIR and TMPDIR, so the sessions dir it checks
//! (`$SHOJI_RUN_DIR/.runs`) is its own and the sweep of the next command is what empties it.
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Boots take 30-300 s on a loaded PVM host.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn require_kvm() {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert!(ok, "these tests boot real VMs and need read-write /dev/kvm; it is missing or not accessible here");
}

fn shoji() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoji"));
    c.env_remove("RUST_LOG").stdin(Stdio::null());
    c
}

/// The guest kernel and initramfs, built now if missing, so no build runs under a kill.
fn guest_artifacts() {
    let out = shoji().arg("setup").stderr(Stdio::inherit()).output().expect("shoji setup");
    assert!(out.status.success(), "shoji setup: {out:?}");
}

/// One phase's scratch: its run dir, TMPDIR and the killed run's stderr.
struct Scratch {
    dir: tempfile::TempDir,
}

/// A `shoji run` that is killed when the test fails first.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new().prefix("shoji-crash-cli-").tempdir().unwrap();
        for d in ["run", "tmp"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Scratch { dir }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn sessions(&self) -> PathBuf {
        self.run_dir().join(".runs")
    }

    fn with_env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        c.env("SHOJI_RUN_DIR", self.run_dir()).env("TMPDIR", self.dir.path().join("tmp"))
    }

    /// Starts `shoji run -- CMD`; its stdout lines come on `lines`.
    fn spawn(&self, cmd: &[&str]) -> Run {
        let err = std::fs::File::create(self.dir.path().join("stderr")).unwrap();
        let mut c = shoji();
        self.with_env(&mut c).args(["run", "--timeout", "900", "--"]).args(cmd).stdout(Stdio::piped()).stderr(err);
        let mut child = c.spawn().expect("spawn shoji run");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Run { child, lines }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The session dirs now.
    fn session_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.sessions()) {
            Ok(d) => d.map(|e| e.unwrap().path()).collect(),
            Err(_) => vec![],
        }
    }

    /// SIGKILLs the run and reaps it: whether SIGKILL is what ended it.
    fn kill(&self, mut run: Run) -> bool {
        // SAFETY: (test) kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(run.child.id() as i32, libc::SIGKILL) };
        let status = run.child.wait().unwrap();
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
    }

    /// One more `shoji` command, then nothing of the killed run is left.
    fn assert_nothing_left_after_one_more_command(&self) {
        let out = self.with_env(&mut shoji()).arg("ps").output().expect("shoji ps");
        assert!(out.status.success(), "shoji ps: {out:?}");
        let left = self.session_dirs();
        assert!(left.is_empty(), "session dirs left after `shoji ps`: {left:?}");
        let tmp: Vec<_> = std::fs::read_dir(self.dir.path().join("tmp")).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(tmp.is_empty(), "nothing left in TMPDIR: {tmp:?}");
        let sockets = sockets_under(self.dir.path());
        assert!(sockets.is_empty(), "sockets left: {sockets:?}");
        let procs = processes_with_env("SHOJI_RUN_DIR", &self.run_dir());
        assert!(procs.is_empty(), "processes of the killed run left: {procs:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours = self.dir.path().to_str().unwrap();
        assert!(!mounts.contains(ours), "mounts under {ours} left:\n{mounts}");
    }
}

fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_socket() {
            found.push(e.path());
        } else if t.is_dir() {
            found.extend(sockets_under(&e.path()));
        }
    }
    found
}

/// Every process whose environment has `key=value` (a killed run's children would inherit it).
fn processes_with_env(key: &str, value: &Path) -> Vec<String> {
    let entry = format!("{key}={}", value.display()).into_bytes();
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        if env.split(|b| *b == 0).any(|v| v == entry.as_slice()) {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!("{pid}: {}", String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// The next stdout line of `run`, failing with its stderr after `limit`.
fn next_line(s: &Scratch, run: &Run, limit: Duration) -> String {
    run.lines.recv_timeout(limit).unwrap_or_else(|e| panic!("no output from shoji run ({e}); stderr:\n{}", s.stderr()))
}

/// (a) Killed while the guest boots: as soon as the VM's vsock socket exists.
fn killed_at_boot() {
    let s = Scratch::new();
    let start = Instant::now();
    let run = s.spawn(&["sh", "-c", "echo started; sleep 600"]);
    let socket = loop {
        if let Some(sock) = s.session_dirs().iter().map(|d| d.join("vsock.sock")).find(|p| p.exists()) {
            break sock;
        }
        assert!(start.elapsed() < BOOT_LIMIT, "no VM started; stderr:\n{}", s.stderr());
        assert!(run.lines.try_recv().is_err(), "the command started before the kill: boot too fast to catch");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(s.kill(run), "SIGKILL ended shoji run");
    eprintln!("(a) killed {:?} after the spawn, while booting", start.elapsed());
    assert!(socket.exists(), "a killed run leaves its session behind until the next command");
    s.assert_nothing_left_after_one_more_command();
}

/// (b) Killed while the command runs.
fn killed_mid_command() {
    let s = Scratch::new();
    let start = Instant::now();
    let run = s.spawn(&["sh", "-c", "echo started; sleep 600"]);
    assert_eq!(next_line(&s, &run, BOOT_LIMIT), "started");
    eprintln!("(b) the command started after {:?}", start.elapsed());
    assert!(s.kill(run), "SIGKILL ended shoji run");
    let left = s.session_dirs();
    assert_eq!(left.len(), 1, "the killed run's session is there until the next command: {left:?}");
    assert!(left[0].join("vsock.sock").exists() && left[0].join("console.log").exists(), "{left:?}");
    s.assert_nothing_left_after_one_more_command();
}

/// (c) Killed at teardown: the command exits at once after its output, so the kill lands as
/// its output arrives, while the sandbox is destroyed and the VM stopped. Not exact: it may
/// land a little before (the output is copied just before the exit status comes back) or
/// after the session dir is gone (then there is nothing for the sweep to do); either way
/// nothing may be left, and the phase says where the kill landed.
fn killed_at_teardown() {
    let s = Scratch::new();
    let run = s.spawn(&["echo", "done"]);
    assert_eq!(next_line(&s, &run, BOOT_LIMIT), "done");
    let killed = s.kill(run);
    let left = s.session_dirs();
    eprintln!(
        "(c) teardown: {}; session dir {}",
        if killed { "SIGKILL ended shoji run" } else { "shoji run had exited before the kill" },
        if left.is_empty() { "already removed" } else { "left for the sweep" }
    );
    s.assert_nothing_left_after_one_more_command();
}

#[test]
fn sigkilled_shoji_run_leaves_nothing_after_the_next_command() {
    require_kvm();
    guest_artifacts();
    killed_at_boot();
    killed_mid_command();
    killed_at_teardown();
}
