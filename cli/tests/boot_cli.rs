//! `shoji boot` on the real /dev/kvm with the guest test kit: boot paths, hand-off checked from
//! inside the guest, exit codes, and one-line errors for bad input that leave nothing behind.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests boot real VMs and need /dev/kvm (read-write); it is missing on this host"
    );
}

fn shoji(args: &[&str]) -> Output {
    require_kvm();
    Command::new(env!("CARGO_BIN_EXE_shoji")).args(args).env_remove("RUST_LOG").output().expect("run shoji")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoji-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The probe's "probe: KEY..." lines.
fn probe_line<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("probe: {key}");
    out.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in guest output:\n{out}"))
}

#[test]
fn null_guest_boots_and_resets_with_1_and_4_vcpus() {
    for vcpus in ["1", "4"] {
        let o = shoji(&["boot", "--guest", "null", "--vcpus", vcpus]);
        assert!(o.status.success(), "vcpus={vcpus}: {o:?}");
        assert_eq!(stdout(&o), "SHOJI-NULL-OK\n");
        assert_eq!(stderr(&o), "", "a clean boot prints nothing on stderr");
    }
}

fn check_handoff(guest: &str, boot: &str) {
    let dir = scratch(guest);
    let initrd = dir.join("initrd.img");
    let data: Vec<u8> = (0..100_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let token = format!("token={}", std::process::id());
    let cmdline = format!("console=ttyS0 {token} -- init-arg");
    let o = shoji(&[
        "boot",
        "--guest",
        guest,
        "--vcpus",
        "2",
        "--memory",
        "64",
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(probe_line(&out, "boot="), format!("probe: boot={boot}"));
    assert_eq!(probe_line(&out, "cmdline="), format!("probe: cmdline=[{cmdline}]"));
    assert_eq!(probe_line(&out, "initrd"), format!("probe: initrd size={} fnv={:#x}", data.len(), fnv1a(&data)));
    assert_eq!(probe_line(&out, "mptable"), "probe: mptable cpus=2 checksum=ok");
    let e820: Vec<&str> = out.lines().filter(|l| l.starts_with("probe: e820 ")).collect();
    assert_eq!(
        e820,
        ["probe: e820 0x0 0x9fc00 1", "probe: e820 0x100000 0x3f00000 1", "probe: e820 0x4000000 0xbc000000 2"]
    );
    assert!(out.ends_with("PROBE-DONE\n"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pvh_elf_hands_off_cmdline_initrd_e820_and_mptable() {
    check_handoff("probe", "pvh");
}

#[test]
fn bzimage_hands_off_cmdline_initrd_e820_and_mptable() {
    check_handoff("probe-bzimage", "linux64");
}

#[test]
fn second_and_further_vcpus_come_up_by_init_sipi() {
    for (guest, vcpus) in [("probe", "2"), ("probe", "4"), ("probe-bzimage", "3")] {
        let o = shoji(&["boot", "--guest", guest, "--vcpus", vcpus, "--cmdline", "smp"]);
        assert!(o.status.success(), "{o:?}");
        let out = stdout(&o);
        assert_eq!(probe_line(&out, "mptable"), format!("probe: mptable cpus={vcpus} checksum=ok"));
        assert_eq!(probe_line(&out, "smp"), format!("probe: smp online={vcpus}"));
    }
}

#[test]
fn guest_triple_fault_is_a_clear_error() {
    for guest in ["probe", "probe-bzimage"] {
        let o = shoji(&["boot", "--guest", guest, "--cmdline", "crash"]);
        assert_eq!(o.status.code(), Some(125), "an error of Shoji's, as docker's: {o:?}");
        assert!(stdout(&o).contains("probe: crashing"));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("shoji: error: guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU 0 at RIP 0x"), "{err}");
    }
}

#[test]
fn hung_guest_is_stopped_by_timeout_on_every_vcpu() {
    let start = std::time::Instant::now();
    let o = shoji(&["boot", "--guest", "probe", "--vcpus", "3", "--cmdline", "smp hang", "--timeout", "1"]);
    assert_eq!(o.status.code(), Some(124), "{o:?}");
    assert!(stdout(&o).contains("probe: hanging"));
    assert!(stderr(&o).contains("timeout"), "{}", stderr(&o));
    assert!(start.elapsed().as_secs() < 60, "teardown of halted vCPUs must not hang");
}

#[test]
fn serial_to_a_file() {
    let dir = scratch("serial");
    let f = dir.join("console.log");
    let o = shoji(&["boot", "--guest", "null", "--serial", f.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "SHOJI-NULL-OK\n");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Each bad input: exit 125 (docker's status for its own errors), exactly one line naming the field, and the serial file that would
/// have been created is not.
#[test]
fn bad_input_gives_one_line_naming_the_field_and_leaves_nothing() {
    let dir = scratch("bad");
    let text = dir.join("notakernel");
    std::fs::write(&text, "just text, neither ELF nor bzImage").unwrap();
    let unreadable = dir.join("no-such-initrd");
    let serial = dir.join("console.log");
    let s = serial.to_str().unwrap();
    let long = "x".repeat(3000);
    let text_share = format!("{},tag=t", text.display());
    let huge = format!("{}", 1u64 << 40);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", "/nonexistent/vmlinux"], "kernel: /nonexistent/vmlinux: No such file"),
        (vec!["--kernel", text.to_str().unwrap()], "kernel: not an ELF vmlinux or a bzImage"),
        (vec!["--kernel", dir.to_str().unwrap()], "kernel: "),
        (vec!["--guest", "nope"], "guest: unknown test guest \"nope\""),
        (vec!["--guest", "null", "--memory", "0"], "memory: 0 MiB is out of range"),
        (vec!["--guest", "null", "--memory", &huge], "memory: 1099511627776 MiB is out of range"),
        (vec!["--guest", "null", "--vcpus", "0"], "vcpus: 0 is out of range"),
        (vec!["--guest", "null", "--vcpus", "255"], "vcpus: 255 is out of range"),
        (vec!["--guest", "null", "--initrd", unreadable.to_str().unwrap()], "initrd: "),
        (vec!["--guest", "null", "--initrd", dir.to_str().unwrap()], "initrd: "),
        (vec!["--guest", "null", "--cmdline", &long], "cmdline: 3000 bytes is over the limit of 2047"),
        (vec!["--guest", "null", "--timeout=-1"], "timeout: "),
        (vec!["--guest", "null", "--disk", "/nonexistent/disk.img"], "disk: /nonexistent/disk.img: No such file"),
        (vec!["--guest", "null", "--disk", "x.img,rx"], "disk: unknown option \"rx\""),
        (vec!["--guest", "null", "--share", "/nonexistent/dir"], "share: /nonexistent/dir: "),
        (vec!["--guest", "null", "--share", &text_share], "share: "),
        (vec!["--guest", "null", "--share", "/tmp,tag="], "share: tag \"\""),
        (vec!["--guest", "null", "--vsock", "/nonexistent/dir/v.sock"], "vsock: /nonexistent/dir/v.sock: "),
    ];
    for (args, want) in cases {
        let mut all = vec!["boot", "--serial", s];
        all.extend(&args);
        let o = shoji(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected, got: {err}");
        assert!(err.starts_with(&format!("shoji: error: {want}")), "{args:?}: {err}");
        let msg = &err["shoji: error: ".len()..];
        assert!(!msg.contains(&format!(": {want}")), "{args:?}: the cause is said once: {err}");
        assert!(!serial.exists(), "{args:?} left {} behind", serial.display());
    }
    // Clap's own argument errors too: one line naming the flag, 125.
    for (args, want) in [
        (&["boot", "--vcpus", "many"][..], "shoji: error: --vcpus: invalid value 'many'"),
        (&["boot", "--no-such-flag"][..], "shoji: error: --no-such-flag: unknown option (see `shoji boot --help`)"),
    ] {
        let o = shoji(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {o:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
