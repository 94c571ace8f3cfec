//! VM templates with our Linux guest on the real /dev/kvm, through `shoji run` as a user runs
//! it: the first sandbox of a shape builds the template, the next ones are restored from it;
//! clones get their own randomness and the host's clock; a template of another shape is not
//! used and a damaged one falls back to a cold boot, each with a log line. The templates live in
//! a directory of this test's (`SHOJI_TEMPLATES`), so the user's cache is not touched.
use shoji_tests::{guest_artifacts, require_kvm, shoji_bin};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SCRIPT: &str = "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -x | head -1; date +%s";

struct Run {
    stdout: Vec<String>,
    stderr: String,
    /// Host time (s) before the start and after the end.
    window: (u64, u64),
    took: Duration,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn run(templates: &Path, memory: &str) -> Run {
    let (t0, start) = (now(), Instant::now());
    let out = Command::new(shoji_bin())
        .args(["run", "--log", "info", "--memory", memory, "--timeout", "900", "--", "sh", "-c", SCRIPT])
        .env("SHOJI_TEMPLATES", templates)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji run");
    let r = Run {
        stdout: String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        window: (t0, now() + 1),
        took: start.elapsed(),
    };
    eprintln!("shoji run --memory {memory}: {:?}\n{}\n{}", r.took, r.stdout.join("\n"), r.stderr);
    assert!(out.status.success(), "{}", r.stderr);
    assert_eq!(r.stdout.len(), 3, "boot id, random bytes, date: {:?}", r.stdout);
    r
}

impl Run {
    fn restored(&self) -> bool {
        self.stderr.contains("VM restored from its snapshot")
    }
    fn guest_time(&self) -> u64 {
        self.stdout[2].trim().parse().unwrap_or_else(|e| panic!("date: {:?}: {e}", self.stdout[2]))
    }
}

#[test]
fn sandboxes_restored_from_one_template_are_not_twins_and_unusable_templates_fall_back() {
    require_kvm();
    guest_artifacts();
    let templates = tempfile::tempdir().unwrap();

    // The first sandbox builds the template (one boot), then is restored from it.
    let first = run(templates.path(), "256");
    assert!(first.stderr.contains("building the VM template (vcpus=1 memory_mib=256"), "{}", first.stderr);
    assert!(first.restored(), "the first sandbox runs from the template it built");
    let built: Vec<_> = std::fs::read_dir(templates.path()).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert_eq!(built.len(), 1, "one template: {built:?}");
    let template = built[0].path();

    // The second is restored without a build, and is not its sibling's twin.
    let second = run(templates.path(), "256");
    assert!(second.restored() && !second.stderr.contains("building"), "{}", second.stderr);
    assert_ne!(first.stdout[0], second.stdout[0], "boot ids");
    assert_ne!(first.stdout[1], second.stdout[1], "random bytes");
    for r in [&first, &second] {
        // The template's clock stood still while it was on disk; the host's is set at start.
        let t = r.guest_time();
        assert!(t + 1 >= r.window.0 && t <= r.window.1, "guest clock {t} outside the run's {:?}", r.window);
    }

    // Another shape: the template is not used (said so), one of its own is built.
    let other = run(templates.path(), "320");
    assert!(
        other.stderr.contains("no VM template for vcpus=1 memory_mib=320")
            && other.stderr.contains("built for other shapes: vcpus=1 memory_mib=256"),
        "{}",
        other.stderr
    );
    assert!(other.restored());

    // A restored guest's clock jumps by the template's age on this host kind (PVM guests read the
    // host's TSC), past the RCU stall timeout (21 s) here; the VMM tells the guest's watchdogs
    // that the host stopped it (KVM_KVMCLOCK_CTRL), so no stall is reported on the console.
    let age = || std::fs::metadata(template.join("state")).unwrap().modified().unwrap().elapsed().unwrap_or_default();
    while age() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let console = restored_console(templates.path());
    assert!(
        !console.contains("rcu: INFO") && !console.contains("stall"),
        "a stall reported after the restore:\n{console}"
    );

    // A damaged memory file fails its checksum: removed, and this sandbox cold boots.
    let memory = template.join("memory");
    let f = std::fs::OpenOptions::new().write(true).open(&memory).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"X", 0x20_0000).unwrap();
    drop(f);
    let damaged = run(templates.path(), "256");
    assert!(
        damaged.stderr.contains("not used")
            && damaged.stderr.contains("checksum")
            && damaged.stderr.contains("cold boot"),
        "{}",
        damaged.stderr
    );
    assert!(!damaged.restored());
    assert!(!template.exists(), "the damaged template is gone (the next sandbox builds it again)");
    eprintln!("first (build + restore) {:?}, restored {:?}, cold boot {:?}", first.took, second.took, damaged.took);
}

/// Starts a default sandbox (1 vCPU, 256 MiB: `shoji run`'s template) through the library,
/// restored from the templates in `templates`, with the agent's first answer; its guest console.
fn restored_console(templates: &Path) -> String {
    let (kernel, initrd) = guest_artifacts();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shoji_sandbox::SandboxConfig::new(dir.path().to_path_buf());
    (cfg.kernel, cfg.initrd) = (Some(kernel), Some(initrd));
    std::env::set_var("SHOJI_TEMPLATES", templates);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let vm = shoji_sandbox::Sandbox::launch(&cfg).await.expect("launch");
        assert!(vm.placement().restored, "restored from the template");
        let config = shoji_sandbox::SessionConfig { sandbox_id: "console".into(), ..Default::default() };
        shoji_sandbox::Session::create(&vm, config).await.expect("the agent's first answer");
        // The stall check runs on the guest's first ticks: give it a few.
        tokio::time::sleep(Duration::from_secs(3)).await;
        vm.stop().expect("stop");
    });
    std::env::remove_var("SHOJI_TEMPLATES");
    let text = std::fs::read(dir.path().join(shoji_sandbox::CONSOLE_LOG)).unwrap_or_default();
    String::from_utf8_lossy(&text).into_owned()
}
