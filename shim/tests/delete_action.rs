//! The `delete` action containerd runs after every exit of a shim's server (also after a SIGKILL
//! of it): it must work with no server, print a DeleteResponse, and be idempotent. Runs the real
//! binary (cargo builds it for this test, which is also what tests/containerd.rs drives).
use std::process::Command;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-shoji-v2");

fn delete(bundle: &std::path::Path, id: &str) -> std::process::Output {
    Command::new(SHIM)
        .args(["-namespace", "shoji-test", "-address", "/nonexistent/containerd.sock", "-id", id])
        .arg("-bundle")
        .arg(bundle)
        .arg("delete")
        .env("TTRPC_ADDRESS", "/nonexistent/containerd.sock.ttrpc")
        .current_dir(bundle)
        .output()
        .expect("running the shim")
}

#[test]
fn delete_without_a_server_prints_a_delete_response_and_can_repeat() {
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(bundle.path().join("config.json"), r#"{"ociVersion":"1.0.2","annotations":{}}"#).unwrap();
    // A server socket left behind by a killed server: `address` names it, delete removes it.
    let sock = bundle.path().join("server.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::write(bundle.path().join("address"), format!("unix://{}", sock.display())).unwrap();
    for round in 0..2 {
        let out = delete(bundle.path(), "shim-delete-test");
        assert!(out.status.success(), "round {round}: {out:?}");
        assert!(out.stderr.is_empty(), "round {round}: nothing on stderr: {out:?}");
        // DeleteResponse { exit_status (field 2) = 137, exited_at (field 3) }: 0x10 0x89 0x01, 0x1a.
        let b = &out.stdout;
        assert!(b.windows(3).any(|w| w == [0x10, 0x89, 0x01]), "round {round}: exit status 137 in {b:x?}");
        assert!(b.contains(&0x1a), "round {round}: an exited_at in {b:x?}");
        assert!(!sock.exists(), "round {round}: the stale server socket is removed");
    }
}

#[test]
fn a_bad_invocation_fails_with_a_message() {
    let out = Command::new(SHIM).arg("delete").output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("namespace"), "names what is missing: {text}");
}
