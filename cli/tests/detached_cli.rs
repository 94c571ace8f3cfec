//! The detached-sandbox commands (`run -d`, `ps`, `exec`, `kill`, `rm`, `logs`, `wait`) with
//! bad input, unknown and busy names, and fabricated state (a sandbox whose process is gone,
//! one that exited): one-line errors with status 125, and nothing booted. Each test has its
//! own SHOJI_RUN_DIR, TMPDIR and (empty, and checked to stay so) SHOJI_CACHE.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new().prefix("shoji-detached-cli-").tempdir().unwrap();
        for d in ["run", "tmp", "cache"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Scratch { dir }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn shoji(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_shoji"))
            .args(args)
            .env("SHOJI_RUN_DIR", self.run_dir())
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("SHOJI_CACHE", self.dir.path().join("cache"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run shoji")
    }

    /// Expects status 125 and one line `shoji: error: {prefix}...`; nothing built.
    fn fails(&self, args: &[&str], prefix: &str) -> String {
        let o = self.shoji(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout: {o:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with(&format!("shoji: error: {prefix}")), "{args:?}: {prefix}: {err}");
        assert!(is_empty(&self.dir.path().join("cache")), "{args:?}: nothing built");
        assert!(is_empty(&self.dir.path().join("tmp")), "{args:?}: nothing in TMPDIR");
        err
    }

    /// A sandbox directory with a state file, as `shoji __sandbox` writes it.
    fn fabricate(&self, name: &str, pid: u32, status: &str, exit_code: Option<i32>) -> PathBuf {
        let dir = self.run_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let state = format!(
            r#"{{"name":"{name}","pid":{pid},"created":{},"command":["sh","-c","sleep 1000"],"status":"{status}","exit_code":{},"args":["-d","--","sh","-c","sleep 1000"]}}"#,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 90,
            exit_code.map_or("null".to_string(), |c| c.to_string()),
        );
        std::fs::write(dir.join("state.json"), state).unwrap();
        dir
    }
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// The pid of a process that has exited (and been reaped).
fn gone_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn argument_errors_are_one_line_naming_the_field() {
    let s = Scratch::new();
    s.fails(&["exec"], "name: missing");
    s.fails(&["exec", "x"], "command: missing");
    s.fails(&["exec", "x", "echo"], "command: \"echo\" must come after `--`");
    s.fails(&["exec", "--bogus", "x", "--", "true"], "--bogus: unknown option");
    s.fails(&["exec", "-w", "rel", "x", "--", "true"], "workdir: ");
    s.fails(&["exec", "-e", "=v", "x", "--", "true"], "env: ");
    s.fails(&["kill"], "name: missing");
    s.fails(&["kill", "-s", "BOGUS", "x"], "signal: ");
    s.fails(&["rm"], "names: missing");
    s.fails(&["logs"], "name: missing");
    s.fails(&["ps", "--bogus"], "--bogus: unknown option");
    s.fails(&["run", "--name", "x", "--", "true"], "--name");
    s.fails(&["run", "-d", "-i", "--", "cat"], "interactive: ");
    s.fails(&["run", "-d", "--name", "a/b", "--", "true"], "name: ");
    s.fails(&["run", "-d", "--name", "-x", "--", "true"], "");
    // The run flags are checked before the name is claimed.
    s.fails(&["run", "-d", "--name", "x", "--cpus", "0", "--", "true"], "cpus: ");
    s.fails(&["run", "-d", "--name", "x", "--rootfs", "/nonexistent", "--", "true"], "rootfs: ");
    assert!(!s.run_dir().join("x").exists(), "no state left for a bad flag");
}

#[test]
fn unknown_names_are_not_found() {
    let s = Scratch::new();
    for args in [
        &["exec", "nope", "--", "true"][..],
        &["kill", "nope"],
        &["rm", "nope"],
        &["rm", "-f", "nope"],
        &["logs", "nope"],
        &["wait", "nope"],
        &["exec", "../run", "--", "true"],
    ] {
        let name = args.iter().find(|a| a.contains("nope") || a.contains("..")).unwrap();
        s.fails(args, &format!("sandbox {name}: not found"));
    }
    let o = s.shoji(&["ps", "-a"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "NAME   STATUS   CREATED   COMMAND\n");
}

#[test]
fn a_busy_name_is_refused_and_its_sandbox_left_alone() {
    let s = Scratch::new();
    let dir = s.fabricate("busy", gone_pid(), "exited", Some(0));
    let before = std::fs::read(dir.join("state.json")).unwrap();
    s.fails(&["run", "-d", "--name", "busy", "--", "true"], "name: busy is already in use");
    assert_eq!(std::fs::read(dir.join("state.json")).unwrap(), before);
}

#[test]
fn ps_shows_dead_and_exited_sandboxes_and_rm_cleans_them() {
    let s = Scratch::new();
    // Its process is gone without an exit status: a crash.
    let dead = s.fabricate("crashed", gone_pid(), "running", None);
    std::fs::write(dead.join("vsock.sock"), "").unwrap();
    // A live process that is not a sandbox (pid reuse) does not make it running.
    s.fabricate("reused", std::process::id(), "running", None);
    let exited = s.fabricate("done", gone_pid(), "exited", Some(3));
    std::fs::write(exited.join("output.log"), "started\nbye\n").unwrap();

    let o = s.shoji(&["ps"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).lines().count(), 1, "only the header without -a: {}", stdout(&o));
    let o = s.shoji(&["ps", "-a"]);
    let table = stdout(&o);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["NAME", "STATUS", "CREATED", "COMMAND"], "{table}");
    assert_eq!(rows[1][..5], ["crashed", "dead", "1", "minute", "ago"], "{table}");
    assert_eq!(rows[2][..2], ["done", "exited(3)"], "{table}");
    assert_eq!(rows[3][..2], ["reused", "dead"], "{table}");
    assert!(table.contains("sh -c sleep 1000"), "{table}");

    let o = s.shoji(&["logs", "done"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "started\nbye\n"));
    let o = s.shoji(&["wait", "done"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "3\n"));
    s.fails(&["wait", "crashed"], "sandbox crashed: is dead");
    s.fails(&["exec", "crashed", "--", "true"], "sandbox crashed: is not running (dead)");
    s.fails(&["kill", "done"], "sandbox done: is not running (exited(3))");

    // A dead or exited sandbox is removed without -f, leftover socket and all.
    let o = s.shoji(&["rm", "crashed", "done", "reused"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "crashed\ndone\nreused\n");
    assert!(is_empty(&s.run_dir()), "rm removes the state dirs");
}

#[test]
fn rm_refuses_a_running_sandbox_without_f_and_stops_it_with_f() {
    let s = Scratch::new();
    // A stand-in for the sandbox process: its command line says `__sandbox live`.
    let mut child =
        Command::new("sh").args(["-c", "sleep 1000; :", "__sandbox", "live"]).process_group(0).spawn().expect("sh");
    let dir = s.fabricate("live", child.id(), "running", None);
    let o = s.shoji(&["ps"]);
    assert!(stdout(&o).lines().any(|l| l.starts_with("live") && l.contains("running")), "{o:?}");
    s.fails(&["rm", "live"], "sandbox live: is running");
    assert!(dir.exists());
    let o = s.shoji(&["rm", "-f", "live"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!dir.exists(), "rm -f removes the state dir");
    // rm -f waited for the process: SIGTERM ended it.
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
    // SAFETY: (test) the orphaned sleep of our own process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
}

/// The sandbox process fails before booting (its cache path is a file, so the built-in rootfs
/// cannot be built): `run -d` prints its one-line error with 125 and leaves no state.
#[test]
fn a_sandbox_that_cannot_start_leaves_nothing() {
    let s = Scratch::new();
    let not_a_dir = s.dir.path().join("cache-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shoji"))
        .args(["run", "-d", "--name", "y", "--", "true"])
        .env("SHOJI_RUN_DIR", s.run_dir())
        .env("SHOJI_CACHE", &not_a_dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(o.stdout.is_empty(), "{o:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("shoji: error: rootfs: "), "{err}");
    assert!(is_empty(&s.run_dir()), "no state dir left");
}

/// A state written by an older shoji (its arguments, no plan): the sandbox process refuses it
/// with an error naming the file, and parses no arguments.
#[test]
fn a_state_without_a_plan_cannot_start() {
    let s = Scratch::new();
    let dir = s.fabricate("old", gone_pid(), "created", None);
    let o = s.shoji(&["__sandbox", "old"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    let report = stdout(&o);
    let named = format!("state: {}: no saved plan", dir.join("state.json").display());
    assert!(report.starts_with("error 125\n") && report.contains(&named), "{report}");
    assert!(is_empty(&s.dir.path().join("cache")), "nothing built");
}
