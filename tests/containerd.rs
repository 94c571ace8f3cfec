//! containerd-shim-shoji-v2 under a real containerd (Debian's package, started privately in a
//! temp dir) driven by `ctr`: tests/containerd/containerd-it.sh runs the cases, first with runc
//! (a check on the test itself), then with our shim. Each of our tasks boots our Linux guest, so
//! this is part of the slow suite: generous timeouts, and the run/delete cycles are the bulk.
//! All of it once per containerd build: the host's (Debian 12: 1.6), then Debian unstable's (2.1;
//! `SHOJI_CONTAINERD_SUITES`, see `shoji_tests::containerd_builds`).
use shoji_tests::{containerd_builds, guest_artifacts, require_kvm, shoji_bin};
use std::path::Path;
use std::process::Command;

fn run_suite(runtime: &str, path: &std::ffi::OsStr, envs: &[(&str, &std::ffi::OsStr)]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("containerd/containerd-it.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).env("RUNTIME", runtime).env("PATH", path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running containerd-it.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn ctr_runs_tasks_with_runc_and_with_the_shoji_shim() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test runs containerd and mounts: it needs root (CI runs as root)");
    require_kvm();
    // The guest our shim boots: `shoji setup` fills the cache, and the shim finds it there by
    // itself (the config names no kernel or initramfs), as an installed shim does.
    guest_artifacts();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("shim.toml");
    std::fs::write(&config, "vcpus = 1\nmemory_mib = 256\nlog_level = \"debug\"\n").expect("shim config");
    let built = shoji_bin().with_file_name("containerd-shim-shoji-v2");
    assert!(
        built.is_file(),
        "{} is missing: `cargo test --workspace` builds it (for shim/tests/), or `cargo build -p containerd-shim-shoji-v2`",
        built.display()
    );
    // Installed: a copy outside the checkout and its target dir, so nothing it does can lean
    // on the source tree (containerd runs the copy, which re-execs itself as the server).
    let installed = tempfile::Builder::new().prefix("shoji-installed-shim-").tempdir().expect("tempdir");
    let shim = installed.path().join("containerd-shim-shoji-v2");
    std::fs::copy(&built, &shim).expect("installing the shim copy");
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("checkout");
    assert!(!shim.starts_with(checkout), "{} is outside {}", shim.display(), checkout.display());

    for build in containerd_builds() {
        let path = build.path_env();
        // The run/delete cycles try the shim, not containerd: the full 20 on the host's build,
        // a few on the others (each cycle boots a VM).
        let cycles: &std::ffi::OsStr = if build.suite == "host" { "20".as_ref() } else { "4".as_ref() };
        let (ok, out) = run_suite("io.containerd.runc.v2", &path, &[("CYCLES", cycles)]);
        println!("--- containerd {}, with runc\n{out}", build.suite);
        assert!(ok, "the containerd test fails with runc: the test or the host is broken, not the shim");

        let envs = [("SHIM_BIN", shim.as_os_str()), ("SHOJI_SHIM_CONFIG", config.as_os_str()), ("CYCLES", cycles)];
        let (ok, out) = run_suite("io.containerd.shoji.v2", &path, &envs);
        println!("--- containerd {}, with containerd-shim-shoji-v2\n{out}", build.suite);
        assert!(ok, "the containerd test fails with our shim on containerd {} (output above)", build.suite);
    }
}
