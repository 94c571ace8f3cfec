//! Arbitrary JSON as an OCI runtime spec, through every check and plan the agent's `create`
//! makes before it touches the system (process, namespaces, sysctls, seccomp, device rules,
//! mounts and devices under the rootfs). Errors are fine; a panic is a finding.
//!
//! `root.path` is replaced by a small rootfs made once (with symlinks leading out, up and in a
//! loop), so that the mount and device planning resolves paths in it rather than on the host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{Root, Spec};
use shoji_agent::runtime::LinuxRuntime;
use std::path::PathBuf;
use std::sync::OnceLock;

fn rootfs() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("shoji-agent-fuzz-{}", std::process::id()));
        let root = dir.join("rootfs");
        for d in ["bin", "dev", "etc", "proc", "a/b"] {
            std::fs::create_dir_all(root.join(d)).expect("making the fuzz rootfs");
        }
        let _ = std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
        for (target, link) in [("/etc", "abs"), ("../../../..", "a/up"), ("b", "a/rel"), ("loop", "loop")] {
            let _ = std::os::unix::fs::symlink(target, root.join(link));
        }
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut spec) = serde_json::from_slice::<Spec>(data) else { return };
    let mut root = Root::default();
    root.set_path(rootfs().clone());
    root.set_readonly(spec.root().as_ref().and_then(|r| r.readonly()));
    spec.set_root(Some(root));
    let _ = LinuxRuntime::check_spec(&spec);
});
