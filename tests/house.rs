//! The rules of the house, checked on the real dependency graph (`cargo tree`): the shim never
//! links the guest agent or the CLI's libraries; the sandbox session knows no command line; the
//! CLI and the shim reach the agent only through the session (the protocol crate is no direct
//! dependency of theirs); the VMM library depends on neither the session nor the CLI; the device
//! model owns no VM.
use std::collections::BTreeSet;
use std::process::Command;

/// The packages in `package`'s normal dependency tree (`depth`: None for all of it).
fn deps(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", package]);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if let Some(d) = depth {
        cmd.args(["--depth", &d.to_string()]);
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).filter(|n| n != package).collect()
}

fn none_of(package: &str, found: &BTreeSet<String>, banned: &[&str]) {
    let bad: Vec<&&str> = banned.iter().filter(|b| found.contains(**b)).collect();
    assert!(bad.is_empty(), "{package} depends on {bad:?}");
}

#[test]
fn the_shim_links_neither_the_agent_nor_the_cli_libraries() {
    let d = deps("containerd-shim-shoji-v2", None);
    assert!(d.contains("shoji-sandbox"), "the shim stands on the sandbox crate: {d:?}");
    none_of("the shim", &d, &["shoji-agent", "shoji-cli", "plotters", "indicatif", "clap", "tar", "flate2"]);
}

#[test]
fn the_session_knows_no_command_line_and_builds_nothing() {
    let d = deps("shoji-sandbox", None);
    none_of("shoji-sandbox", &d, &["shoji-agent", "shoji-cli", "plotters", "indicatif", "clap", "tar", "flate2"]);
}

#[test]
fn front_ends_speak_to_the_agent_only_through_the_session() {
    for front in ["shoji-cli", "containerd-shim-shoji-v2"] {
        let direct = deps(front, Some(1));
        none_of(front, &direct, &["shoji-protocol", "ttrpc", "shoji-agent"]);
    }
}

#[test]
fn the_vmm_library_depends_on_neither_the_session_nor_the_cli() {
    let d = deps("shoji-vmm", None);
    none_of("shoji-vmm", &d, &["shoji-sandbox", "shoji-cli", "shoji-protocol", "shoji-agent", "clap"]);
}

#[test]
fn devices_own_no_vm() {
    let d = deps("shoji-devices", None);
    none_of("shoji-devices", &d, &["kvm-ioctls", "kvm-bindings", "shoji-vmm", "shoji-sandbox"]);
}
