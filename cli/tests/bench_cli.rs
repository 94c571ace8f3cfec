//! `shoji bench boot` / `bench run` through the CLI: argument errors are one line and status
//! 125 before anything runs; one quick real run of the null guest gives parseable JSON and a
//! PNG, another runs it next to its unconfined peer. Nothing here asserts a timing.
use std::path::Path;
use std::process::{Command, Output};

fn shoji(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoji")).args(args).env_remove("RUST_LOG").output().expect("run shoji")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_are_one_line_naming_the_field_with_status_125() {
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "boot", "-n", "0"], "--runs: invalid value '0'"),
        (&["bench", "boot", "-n", "many"], "--runs: invalid value 'many'"),
        (&["bench", "boot", "--guest", "windows"], "--guest: invalid value 'windows'"),
        (&["bench", "boot", "--peer", "firecracker"], "--peer: invalid value 'firecracker'"),
        (&["bench", "boot", "--frobnicate"], "--frobnicate: unknown option (see `shoji bench boot --help`)"),
        (&["bench", "boot", "--plot", "out.svg"], "plot: out.svg must end in .png"),
        (&["bench", "run", "--guest", "null"], "guest: `bench run` runs a container, which needs the linux guest"),
        (&["bench", "run", "--peer", "qemu"], "--peer: unknown option (see `shoji bench run --help`)"),
        (&["bench", "teleport"], "command: unrecognized subcommand 'teleport' (see `shoji bench --help`)"),
        (&["bench"], "command: missing (see `shoji bench --help`)"),
        (&[], "command: missing (see `shoji --help`)"),
    ];
    for (args, want) in cases {
        let o = shoji(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected, got: {err}");
        assert!(err.starts_with(&format!("shoji: error: {want}")), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing ran, nothing is reported");
    }
    // Help is not an error.
    let o = shoji(&["bench", "boot", "--help"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    // The unconfined peer is the confined bench's opposite: not with confinement off for both.
    for bench in ["boot", "devices"] {
        let o = Command::new(env!("CARGO_BIN_EXE_shoji"))
            .args(["bench", bench, "--peer", "unconfined"])
            .env("SHOJI_SECCOMP", "off")
            .env_remove("RUST_LOG")
            .output()
            .expect("run shoji");
        assert_eq!(o.status.code(), Some(125), "{bench}: {o:?}");
        let err = stderr(&o);
        assert!(err.starts_with("shoji: error: peer: `--peer unconfined` compares with Shoji confined"), "{err}");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn the_unconfined_peer_boots_in_the_same_run_and_gets_ratios() {
    assert!(Path::new("/dev/kvm").exists(), "this test boots real VMs and needs /dev/kvm");
    let o = shoji(&["bench", "boot", "--guest", "null", "-n", "2", "--peer", "unconfined", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["peer"], "shoji-unconfined");
    let systems = v["systems"].as_array().unwrap();
    let names: Vec<&str> = systems.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["shoji", "shoji-unconfined"]);
    assert!(systems[1]["command"].as_str().unwrap().starts_with("SHOJI_SECCOMP=off shoji boot"), "{v}");
    assert!(systems.iter().all(|s| s["samples_ms"].as_array().unwrap().len() == 2), "{v}");
    assert!(v["ratio_shoji_over_peer"]["p50"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert!(v["machine"]["qemu"].is_null(), "no QEMU asked about: {v}");
}

#[test]
fn a_quick_null_guest_run_gives_json_and_a_png() {
    assert!(Path::new("/dev/kvm").exists(), "this test boots real VMs and needs /dev/kvm");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("boot.png");
    let o = shoji(&["bench", "boot", "--guest", "null", "-n", "3", "--json", "--plot", png.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["bench"], "boot");
    assert_eq!(v["guest"], "null");
    assert_eq!(v["runs"], 3);
    let systems = v["systems"].as_array().unwrap();
    assert_eq!(systems.len(), 1, "no peer asked for: {v}");
    assert_eq!(systems[0]["name"], "shoji");
    let samples = systems[0]["samples_ms"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    assert!(samples.iter().all(|s| s.as_f64().is_some_and(|ms| ms > 0.0)), "{samples:?}");
    let sum = &systems[0]["summary_ms"];
    for k in ["p50", "p90", "p99", "min", "max"] {
        assert!(sum[k].as_f64().is_some(), "{k} missing: {sum}");
    }
    assert!(sum["min"].as_f64() <= sum["p50"].as_f64() && sum["p50"].as_f64() <= sum["max"].as_f64());
    assert!(v["ratio_shoji_over_peer"].is_null());
    assert!(v["machine"]["nproc"].as_u64().is_some_and(|n| n > 0));
    assert!(v["command"].as_str().unwrap().starts_with("shoji bench boot"));
    let data = std::fs::read(&png).expect("the plot was written");
    assert_eq!(&data[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&data[12..16], b"IHDR");
    let (w, h) =
        (u32::from_be_bytes(data[16..20].try_into().unwrap()), u32::from_be_bytes(data[20..24].try_into().unwrap()));
    assert_eq!((w, h), (960, 540));
    assert!(data.len() > 10_000, "a drawn chart, not an empty image: {} bytes", data.len());
}
