//! `shoji setup` with the guest artifacts already cached (CI builds the kernel first; without
//! it this test builds it, ~10-15 min): one line per artifact with its path, status 0.
use std::path::Path;
use std::process::Command;

#[test]
fn setup_with_the_cache_present_prints_the_cached_paths() {
    let shoji = env!("CARGO_BIN_EXE_shoji");
    // The first call may still build the initramfs (it follows the agent's source) or the
    // run rootfs; the second finds everything cached.
    let first = Command::new(shoji).arg("setup").output().expect("run shoji");
    assert!(first.status.success(), "{first:?}");
    let o = Command::new(shoji).arg("setup").output().expect("run shoji");
    assert!(o.status.success(), "{o:?}");
    assert!(o.stderr.is_empty(), "nothing is built, nothing said: {}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, name, file) in [(lines[0], "kernel", "vmlinux"), (lines[1], "initramfs", "initramfs.cpio")] {
        let rest = line.strip_prefix(name).unwrap_or_else(|| panic!("{name} first: {line}")).trim_start();
        let (path, how) = rest.split_once(' ').unwrap();
        assert!(path.ends_with(file) && Path::new(path).is_file(), "{line}");
        assert_eq!(how, "(cached)", "{line}");
    }
    let rest = lines[2].strip_prefix("run rootfs").unwrap().trim_start();
    let (path, how) = rest.split_once(' ').unwrap();
    assert!(Path::new(path).join("bin/busybox").is_file(), "{}", lines[2]);
    assert!(how.starts_with("(cached;"), "{}", lines[2]);
}
