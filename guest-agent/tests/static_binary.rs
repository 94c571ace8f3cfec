//! The static agent that goes into the guest's initramfs, built by the one build path
//! (`guest-agent/build-static.sh`, which rootfs/build.sh and `shoji`'s artifacts call): none of
//! its Rust code uses AVX. On PVM hosts the guest kernel runs `noxsave`, so the upper YMM/ZMM
//! halves are not switched between guest tasks; glibc's own AVX variants (C, chosen by ifunc)
//! are turned off by GLIBC_TUNABLES on the kernel command line, so they are only listed here.
//!
//! `$SHOJI_AGENT_SYMBOLS` checks another agent binary (with its symbol table) instead of
//! building one, e.g. an unpatched build to see that this test can fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The agent with its symbol table, as built for the initramfs.
fn agent_with_symbols() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOJI_AGENT_SYMBOLS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-static.sh");
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock_before = std::fs::read(&lock).unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--symbols")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed: {}", script.display(), out.status);
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!path.is_empty(), "{} printed no path", script.display());
    // The AVX-free crates are committed (guest-agent/vendor): building must never touch Cargo.lock.
    assert!(std::fs::read(&lock).unwrap() == lock_before, "{} left Cargo.lock changed", script.display());
    PathBuf::from(path)
}

/// Whether an AT&T-syntax instruction touches vector state beyond the low 128 bits, or is
/// VEX/EVEX encoded (which zeroes the upper halves): ymm/zmm operands, or a `v` vector mnemonic
/// on xmm registers.
fn uses_avx(insn: &str) -> bool {
    if insn.contains("%ymm") || insn.contains("%zmm") {
        return true;
    }
    let mnemonic = insn.split_whitespace().next().unwrap_or("");
    mnemonic.starts_with('v') && insn.contains("%xmm")
}

/// Disassembles `bin` and returns each function that uses AVX, with its instruction count.
fn avx_functions(bin: &Path) -> BTreeMap<String, usize> {
    let mut child = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-C"])
        .arg(bin)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("objdump is needed to check the agent for AVX and cannot run ({e}); apt-get install binutils")
        });
    let mut found = BTreeMap::new();
    let mut current = String::new();
    let mut functions = 0usize;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // "0000000000401000 <name>:" starts a function; "  401000:\tinsn operands" is code.
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")).map(|(_, n)| n) {
            current = name.to_owned();
            functions += 1;
        } else if let Some((_, insn)) = line.split_once(":\t") {
            if uses_avx(insn) {
                *found.entry(current.clone()).or_insert(0) += 1;
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "objdump -d {} failed: {status}", bin.display());
    assert!(functions > 1000, "{} has {functions} symbols: built without its symbol table?", bin.display());
    found
}

/// Rust code: demangled paths. glibc's variants (`__memmove_avx_unaligned_erms`) are C.
fn is_rust(name: &str) -> bool {
    name.contains("::")
}

#[test]
fn no_rust_function_in_the_static_agent_uses_avx() {
    let unit = uses_avx;
    assert!(unit("vmovdqu (%rdi),%ymm0") && unit("vpxor %xmm0,%xmm0,%xmm0") && unit("vzeroupper %zmm1"));
    assert!(!unit("movdqu (%rdi),%xmm0") && !unit("pcmpeqb %xmm1,%xmm0") && !unit("mov %rax,%rbx"));

    let bin = agent_with_symbols();
    let found = avx_functions(&bin);
    let (rust, other): (Vec<_>, Vec<_>) = found.iter().partition(|(name, _)| is_rust(name));
    eprintln!(
        "{}: {} functions outside Rust use AVX (glibc's, off by GLIBC_TUNABLES on PVM hosts):",
        bin.display(),
        other.len()
    );
    for (name, n) in &other {
        eprintln!("  {name} ({n} instructions)");
    }
    assert!(
        rust.is_empty(),
        "{} Rust functions in {} use AVX; the guest kernel on PVM hosts does not switch the upper \
         vector state (see guest-agent/build-static.sh):\n{}",
        rust.len(),
        bin.display(),
        rust.iter().map(|(name, n)| format!("  {name} ({n} instructions)")).collect::<Vec<_>>().join("\n")
    );
    // glibc's are reserved names (`__strlen_avx2`, `_dl_runtime_profile_avx`); anything else
    // (a `#[no_mangle]` Rust function, another C library) is not covered by the tunable.
    let unexpected: Vec<_> = other.iter().filter(|(name, _)| !name.starts_with('_')).collect();
    assert!(unexpected.is_empty(), "AVX in functions that are neither Rust paths nor glibc's: {unexpected:?}");
}
