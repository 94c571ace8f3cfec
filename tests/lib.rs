//! Helpers shared by Shoji's integration tests, which boot real VMs on /dev/kvm.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Fails (never skips) when the host cannot run VMs, saying why.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert!(ok, "these tests boot real VMs and need read-write /dev/kvm; it is missing or not accessible here");
}

/// The `shoji` binary of this build (cargo builds it for the workspace's test run).
pub fn shoji_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOJI_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/shoji
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("shoji")).expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --bins`, or run the whole workspace with `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// The guest kernel and initramfs, found as the shim and `shoji run` find them: `shoji setup`
/// (once per test binary) builds whatever is missing or stale into the cache, then the sandbox
/// library looks them up. Called first, so a test's time limit covers its boot, not a build.
pub fn guest_artifacts() -> (PathBuf, PathBuf) {
    static ARTIFACTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ARTIFACTS
        .get_or_init(|| {
            let bin = shoji_bin();
            // Its build progress goes to our stderr, as a user would see it.
            let out = Command::new(&bin).arg("setup").stderr(Stdio::inherit()).output().expect("running shoji setup");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{} setup failed ({}): {stdout}", bin.display(), out.status);
            let kernel = shoji_sandbox::artifacts::kernel().unwrap_or_else(|e| panic!("after shoji setup: {e}"));
            let initrd = shoji_sandbox::artifacts::initramfs().unwrap_or_else(|e| panic!("after shoji setup: {e}"));
            eprintln!("guest kernel {}\nguest initramfs {}", kernel.display(), initrd.display());
            (kernel, initrd)
        })
        .clone()
}

/// Counts what a VM could leak from the process that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessResources {
    pub fds: usize,
    pub threads: usize,
    pub mappings: usize,
}

pub fn process_resources() -> ProcessResources {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    ProcessResources { fds: count("/proc/self/fd"), threads: count("/proc/self/task"), mappings: maps.lines().count() }
}

/// What each of this process's fds is (its /proc/self/fd link), for a leak's report.
pub fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|t| t.display().to_string()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A loop device over a file (root only), detached when dropped.
pub struct Loop(pub PathBuf);

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("run losetup (as root)");
        assert!(out.status.success(), "losetup -f --show: {}", String::from_utf8_lossy(&out.stderr));
        Loop(PathBuf::from(String::from_utf8(out.stdout).expect("losetup's output").trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Whether this process runs as root (loop devices, containerd).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A containerd build the containerd and CRI suites run against.
#[derive(Debug, Clone)]
pub struct ContainerdBuild {
    /// "host" (the machine's package: Debian 12's 1.6) or the Debian suite it came from.
    pub suite: String,
    /// The directory with its containerd, ctr and containerd-shim-runc-v2 (`None`: `PATH`).
    pub bin: Option<PathBuf>,
}

impl ContainerdBuild {
    /// `PATH` with this build's binaries first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let path = std::env::var_os("PATH").unwrap_or_default();
        match &self.bin {
            None => path,
            Some(b) => std::env::join_paths(std::iter::once(b.clone()).chain(std::env::split_paths(&path)))
                .expect("PATH entries"),
        }
    }
}

/// The containerd builds in `SHOJI_CONTAINERD_SUITES`, in order (default "host unstable": the
/// machine's package, Debian 12's 1.6, then Debian unstable's 2.1; "trixie" is 1.7). Other
/// suites' packages are fetched and cached by tests/containerd/fetch-containerd.sh on first use
/// (CI fetches them first).
pub fn containerd_builds() -> Vec<ContainerdBuild> {
    let suites = std::env::var("SHOJI_CONTAINERD_SUITES").unwrap_or_else(|_| "host unstable".into());
    let mut builds = Vec::new();
    for suite in suites.split_whitespace() {
        if suite == "host" {
            builds.push(ContainerdBuild { suite: "host".into(), bin: None });
            continue;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("containerd/fetch-containerd.sh");
        let out = Command::new("bash").arg(&script).arg(suite).output().expect("running fetch-containerd.sh");
        assert!(out.status.success(), "fetch-containerd.sh {suite}: {}", String::from_utf8_lossy(&out.stderr).trim());
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        builds.push(ContainerdBuild { suite: suite.into(), bin: Some(bin) });
    }
    builds
}
