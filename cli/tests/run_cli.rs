//! `shoji run` with bad input: every mistake is one line `shoji: error: FIELD: ...` and exit
//! status 125 (docker's), before anything is built or booted, and nothing is left behind: the
//! temp dir and the cache dir given to it stay empty. No VM is started by these tests.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("shoji-run-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["tmp", "cache", "files/data", "other/data"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("files/a-file"), "x").unwrap();
        Scratch { dir }
    }

    fn path(&self, p: &str) -> String {
        self.dir.join(p).to_str().unwrap().to_string()
    }

    /// `shoji run ARGS` with its own TMPDIR and SHOJI_CACHE, stdin not a terminal.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_shoji"))
            .arg("run")
            .args(args)
            .env("TMPDIR", self.dir.join("tmp"))
            .env("SHOJI_CACHE", self.dir.join("cache"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run shoji")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Runs `args`, expects 125 and one error line starting with `shoji: error: {field}: `.
fn fails(s: &Scratch, args: &[&str], field: &str) -> String {
    let o = s.run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
    assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout: {o:?}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    assert!(err.starts_with(&format!("shoji: error: {field}: ")), "{args:?}: names {field}: {err}");
    assert!(is_empty(&s.dir.join("tmp")), "{args:?}: nothing left in TMPDIR");
    assert!(is_empty(&s.dir.join("cache")), "{args:?}: nothing built");
    err
}

#[test]
fn a_missing_command_is_an_error() {
    let s = Scratch::new("command");
    fails(&s, &[], "command");
    fails(&s, &["--cpus", "1"], "command");
    let e = fails(&s, &["echo", "hello"], "command");
    assert!(e.contains("after `--`"), "{e}");
    fails(&s, &["--", ""], "command");
}

#[test]
fn bad_flags_and_values_name_the_flag() {
    let s = Scratch::new("flags");
    fails(&s, &["--bogus", "--", "true"], "--bogus");
    fails(&s, &["--cpus", "x", "--", "true"], "--cpus");
    fails(&s, &["--memory", "lots", "--", "true"], "--memory");
    fails(&s, &["--memory", "-5", "--", "true"], "--memory");
    fails(&s, &["--cpus", "0", "--", "true"], "cpus");
    fails(&s, &["--cpus", "255", "--", "true"], "cpus");
    fails(&s, &["--memory", "1", "--", "true"], "memory");
    fails(&s, &["--memory", "99999999999", "--", "true"], "memory");
    fails(&s, &["--timeout", "-1", "--", "true"], "timeout");
    fails(&s, &["--timeout", "nan", "--", "true"], "timeout");
    fails(&s, &["-e", "=x", "--", "true"], "env");
    fails(&s, &["-w", "relative/dir", "--", "true"], "workdir");
    let e = fails(&s, &["--security-opt", "seccomp=/some/profile.json", "--", "true"], "security-opt");
    assert!(e.contains("seccomp=unconfined"), "{e}");
    let e = fails(&s, &["-i", "-t", "--", "sh"], "tty");
    assert!(e.contains("terminal"), "{e}");
}

#[test]
fn missing_files_and_bad_devices_name_the_field() {
    let s = Scratch::new("files");
    let missing = s.path("missing");
    fails(&s, &["--rootfs", &missing, "--", "true"], "rootfs");
    fails(&s, &["--rootfs", &s.path("files/a-file"), "--", "true"], "rootfs");
    fails(&s, &["--share", &missing, "--", "true"], "share");
    fails(&s, &["--share", &s.path("files/a-file"), "--", "true"], "share");
    fails(&s, &["--share", &format!("{},bogus", s.path("files/data")), "--", "true"], "share");
    fails(&s, &["--share", "/", "--", "true"], "share");
    let e = fails(&s, &["--share", &s.path("files/data"), "--share", &s.path("other/data"), "--", "true"], "share");
    assert!(e.contains("/mnt/data"), "{e}");
    fails(&s, &["--disk", &missing, "--", "true"], "disk");
    fails(&s, &["--disk", &format!("{},bogus", s.path("files/a-file")), "--", "true"], "disk");
    // A one-byte file is not a disk (sizes are multiples of 512); the cause is said once.
    let e = fails(&s, &["--disk", &s.path("files/a-file"), "--", "true"], "disk");
    assert_eq!(e.matches("512").count(), 1, "{e}");
    // --image: a missing path, a directory that is no image layout, a file that is no tar.
    fails(&s, &["--image", &missing, "--", "true"], "image");
    let e = fails(&s, &["--image", &s.path("files/data"), "--", "true"], "image");
    assert!(e.contains("no OCI image layout"), "{e}");
    fails(&s, &["--image", &s.path("files/a-file"), "--", "true"], "image");
    let e = fails(&s, &["--image", &missing, "--rootfs", &s.path("files/data"), "--", "true"], "--image");
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn help_is_not_an_error() {
    let s = Scratch::new("help");
    let o = s.run(&["--help"]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("shoji run [OPTIONS] -- CMD [ARGS...]"), "{out}");
    for flag in ["--rootfs", "--env", "--workdir", "--cpus", "--memory", "--disk", "--share", "--interactive", "--tty"]
    {
        assert!(out.contains(flag), "{flag} in the help: {out}");
    }
}
