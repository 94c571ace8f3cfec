//! Attacks from inside a container, in our Linux guest with our agent, through `shoji run`
//! exactly as a user runs it (docs/security.md). One boot per test; on PVM hosts each boot takes
//! ~15-30 s.
//!
//! - a container opens AF_VSOCK to the agent's port on CID 1 (local), 2 (host) and 3 (the guest
//!   itself): refused by seccomp, and with seccomp off still refused (no loopback transport in
//!   the guest kernel, the host has no listener on the agent's port, the agent serves only the
//!   host's CID);
//! - a container makes a char device node for the serial console and writes to it: the node may
//!   be made (as with Docker) but the device cgroup refuses the open, while a `--disk` works;
//! - a container leaves a setuid file and a block device node in a read-write share: the host
//!   sees neither a setuid bit nor a device node.
use shoji_tests::{guest_artifacts, require_kvm, shoji_bin};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The static vsock client (tests/probes/vsock_connect.c), built into `dir`.
fn vsock_probe(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/vsock_connect.c");
    let out = dir.join("vsock-connect");
    let cc = if Command::new("musl-gcc").arg("--version").output().is_ok() { "musl-gcc" } else { "gcc" };
    let st = Command::new(cc).args(["-static", "-Os", "-o"]).arg(&out).arg(&src).status().expect("run the C compiler");
    assert!(st.success(), "{cc} could not build {}", src.display());
    out
}

fn shoji_run(args: &[&str], tmp: &Path) -> (Option<i32>, String, String) {
    require_kvm();
    guest_artifacts();
    let start = Instant::now();
    let out = Command::new(shoji_bin())
        .args(["run", "--timeout", "900"])
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run shoji run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("shoji run took {:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}", start.elapsed());
    (out.status.code(), stdout, stderr)
}

const PROBE_ALL: &str = "for c in 1 2 3; do /mnt/probes/vsock-connect $c 1024; done";

#[test]
fn container_cannot_reach_the_agent_devices_or_leave_host_privileges() {
    let dir = tempfile::Builder::new().prefix("shoji-isolation-").tempdir().unwrap();
    let (tmp, probes, rw) = (dir.path().join("tmp"), dir.path().join("probes"), dir.path().join("rw"));
    for d in [&tmp, &probes, &rw] {
        std::fs::create_dir_all(d).unwrap();
    }
    vsock_probe(&probes);
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..8].copy_from_slice(b"DISKDATA");
    std::fs::write(&disk, &image).unwrap();
    let script = format!(
        "{PROBE_ALL}; \
         mknod /dev/s0 c 4 64 && echo mknod-made; \
         if (echo attack > /dev/s0) 2>/dev/null; then echo SERIAL-WRITTEN; else echo serial-refused; fi; \
         if head -c 8 /dev/kmsg >/dev/null 2>&1; then echo KMSG-READ; else echo kmsg-refused; fi; \
         head -c 8 /dev/vda; echo; \
         echo '#!/bin/sh' > /mnt/rw/suid; chmod 4755 /mnt/rw/suid; chmod 2755 /mnt/rw/suid 2>/dev/null; \
         mkdir -m 2775 /mnt/rw/sgid-dir; \
         if mknod /mnt/rw/blk b 7 0 2>/dev/null; then echo BLK-MADE; else echo blk-refused; fi; \
         if mknod /mnt/rw/chr c 1 3 2>/dev/null; then echo CHR-MADE; else echo chr-refused; fi"
    );
    let (code, out, err) = shoji_run(
        &[
            "--share",
            &format!("{},ro", probes.display()),
            "--share",
            &rw.display().to_string(),
            "--disk",
            &disk.display().to_string(),
            "--",
            "sh",
            "-c",
            &script,
        ],
        &tmp,
    );
    assert_eq!(code, Some(0), "{err}");
    for cid in 1..=3 {
        let line = format!("cid {cid} port 1024: socket: Operation not permitted");
        assert!(out.lines().any(|l| l == line), "seccomp refuses AF_VSOCK for cid {cid}: {out}");
    }
    assert!(!out.contains("CONNECTED"), "{out}");
    assert!(out.contains("mknod-made\n"), "making a node is allowed, as with Docker: {out}");
    assert!(out.contains("serial-refused\n"), "the device cgroup refuses the console's serial port: {out}");
    assert!(out.contains("kmsg-refused\n"), "no /dev/kmsg in a container: {out}");
    assert!(out.contains("DISKDATA\n"), "the --disk is allowed by its own rule: {out}");
    assert!(out.contains("blk-refused\n") && out.contains("chr-refused\n"), "virtio-fs refuses device nodes: {out}");
    // What the guest left in the share, seen from the host.
    let mode = std::fs::metadata(rw.join("suid")).expect("the guest's file").permissions().mode();
    assert_eq!(mode & 0o6000, 0, "no setuid/setgid bit reaches the host: {mode:o}");
    let mode = std::fs::metadata(rw.join("sgid-dir")).expect("the guest's dir").permissions().mode();
    assert_eq!(mode & 0o6000, 0, "no setgid dir: {mode:o}");
    for n in ["blk", "chr"] {
        if let Ok(m) = std::fs::symlink_metadata(rw.join(n)) {
            let t = m.file_type();
            assert!(!t.is_block_device() && !t.is_char_device(), "a device node {n} reached the host");
        }
    }
    assert!(std::fs::read_dir(&tmp).unwrap().next().is_none(), "shoji run leaves nothing behind");
}

#[test]
fn without_seccomp_vsock_still_does_not_reach_the_agent() {
    let dir = tempfile::Builder::new().prefix("shoji-isolation-").tempdir().unwrap();
    let (tmp, probes) = (dir.path().join("tmp"), dir.path().join("probes"));
    for d in [&tmp, &probes] {
        std::fs::create_dir_all(d).unwrap();
    }
    vsock_probe(&probes);
    let (code, out, err) = shoji_run(
        &[
            "--security-opt",
            "seccomp=unconfined",
            "--share",
            &format!("{},ro", probes.display()),
            "--",
            "sh",
            "-c",
            PROBE_ALL,
        ],
        &tmp,
    );
    assert_eq!(code, Some(1), "the last probe fails: {err}");
    for cid in 1..=3 {
        let prefix = format!("cid {cid} port 1024: connect: ");
        assert!(out.lines().any(|l| l.starts_with(&prefix)), "cid {cid}: the socket opens but connect fails: {out}");
    }
    assert!(!out.contains("CONNECTED"), "{out}");
}
