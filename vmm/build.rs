//! Builds the guest test kit (vmm/testkit) with the machine's C toolchain and embeds the images,
//! so tests and `shoji bench` have tiny deterministic guests without any extra download.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-nostdlib",
    "-static",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

/// The probe guest: entry and interrupt stubs, boot hand-off checks, and the device modes.
const SOURCES: &[&str] =
    &["entry.S", "probe.c", "pci.c", "idt.c", "virtio.c", "blk.c", "fs.c", "vsock.c", "blkbench.c", "vsockbench.c"];

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn link(cc: &str, kit: &Path, out: &Path, sources: &[&str]) {
    let mut cmd = Command::new(cc);
    cmd.args(FLAGS).arg(format!("-Wl,-T,{}", kit.join("guest.ld").display())).arg("-o").arg(out);
    for s in sources {
        cmd.arg(kit.join(s));
    }
    run(&mut cmd);
}

/// A minimal bzImage: one setup sector holding the boot protocol header, then the flat image
/// that the loader places at 1 MiB (64-bit entry at +0x200).
fn bzimage(flat: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&0x1000u32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let init_size = u32::try_from(flat.len()).expect("test guest too large");
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    img.extend_from_slice(flat);
    img
}

fn main() {
    let kit = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("testkit");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cc = env::var("SHOJI_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    for f in SOURCES.iter().chain(&["guest.ld", "null.S", "probe.h"]) {
        println!("cargo:rerun-if-changed=testkit/{f}");
    }
    println!("cargo:rerun-if-env-changed=SHOJI_GUEST_CC");
    // Only builds that embed the test kit (the CLI, tests) need a C toolchain here.
    if env::var_os("CARGO_FEATURE_TESTKIT").is_none() {
        return;
    }

    link(&cc, &kit, &out.join("null.elf"), &["null.S"]);
    link(&cc, &kit, &out.join("probe.elf"), SOURCES);
    let flat = out.join("probe.bin");
    run(Command::new("objcopy").args(["-O", "binary", "--remove-section=.note"]).arg(out.join("probe.elf")).arg(&flat));
    let flat = fs::read(&flat).expect("read probe.bin");
    fs::write(out.join("probe.bzimage"), bzimage(&flat)).expect("write probe.bzimage");
}
