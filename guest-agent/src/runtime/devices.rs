//! The device cgroup: which device nodes a container may create (mknod) and open.
//!
//! Without it a container holding CAP_MKNOD (in the default set) makes a node for any guest
//! device (serial console, virtio disks, kmsg) and opens it. On cgroup v2 the kernel asks a BPF
//! program (`BPF_PROG_TYPE_CGROUP_DEVICE`) attached to the container's cgroup; it is built here
//! instruction by instruction (no libbpf: the agent is a static binary without C dependencies)
//! and attached in exclusive mode, so nothing below the container's cgroup can replace it.
//!
//! Rules (those of runc): default deny; the spec's `linux.resources.devices` in order, then the
//! devices every container gets (mknod of any node; null, zero, full, random, urandom, tty,
//! console, ptmx and the pts ptys: read, write, mknod). The last rule that matches a request
//! decides. An allow rule matches a request whose access is within the rule's; a deny rule
//! matches a request that asks for any of the rule's access (cgroup v1's semantics).
use super::{Result, RuntimeError};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The kernel's access bits (`BPF_DEVCG_ACC_*`).
pub const ACC_MKNOD: u8 = 1;
pub const ACC_READ: u8 = 2;
pub const ACC_WRITE: u8 = 4;
const ACC_ALL: u8 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// The device kind a rule applies to (`BPF_DEVCG_DEV_*` for the two real ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    All,
    Block,
    Char,
}

impl Kind {
    fn code(self) -> Option<i32> {
        match self {
            Kind::All => None,
            Kind::Block => Some(1),
            Kind::Char => Some(2),
        }
    }
}

/// One device cgroup rule; `None` numbers are wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u8,
}

impl Rule {
    const fn allow(kind: Kind, major: Option<u32>, minor: Option<u32>) -> Rule {
        Rule { allow: true, kind, major, minor, access: ACC_ALL }
    }

    /// Whether the rule matches every request (rules before it can never decide): any access
    /// requested is within rwm (allow) and shares some with it (deny).
    fn matches_all(&self) -> bool {
        self.kind == Kind::All && self.major.is_none() && self.minor.is_none() && self.access == ACC_ALL
    }
}

/// What every container may use, after the spec's rules (runc's list).
const DEFAULT_RULES: &[Rule] = &[
    Rule { allow: true, kind: Kind::Char, major: None, minor: None, access: ACC_MKNOD },
    Rule { allow: true, kind: Kind::Block, major: None, minor: None, access: ACC_MKNOD },
    Rule::allow(Kind::Char, Some(1), Some(3)), // null
    Rule::allow(Kind::Char, Some(1), Some(5)), // zero
    Rule::allow(Kind::Char, Some(1), Some(7)), // full
    Rule::allow(Kind::Char, Some(1), Some(8)), // random
    Rule::allow(Kind::Char, Some(1), Some(9)), // urandom
    Rule::allow(Kind::Char, Some(5), Some(0)), // tty
    Rule::allow(Kind::Char, Some(5), Some(1)), // console
    Rule::allow(Kind::Char, Some(5), Some(2)), // ptmx
    Rule::allow(Kind::Char, Some(136), None),  // pts
];

/// The rules for a container: the spec's (`linux.resources.devices`), then the defaults.
pub fn rules(spec: Option<&[LinuxDeviceCgroup]>) -> Result<Vec<Rule>> {
    const F: &str = "linux.resources.devices";
    let mut out = Vec::new();
    for (i, d) in spec.into_iter().flatten().enumerate() {
        let kind = match d.typ() {
            None | Some(LinuxDeviceType::A) => Kind::All,
            Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => Kind::Char,
            Some(LinuxDeviceType::B) => Kind::Block,
            Some(LinuxDeviceType::P) => {
                return Err(invalid(format!("{F}[{i}].type"), "\"p\" (a fifo) is not a device cgroup type"))
            }
        };
        let number = |field: &str, v: Option<i64>, max: i64| -> Result<Option<u32>> {
            match v {
                None => Ok(None),
                Some(n) if n < 0 => Ok(None),
                Some(n) if n <= max => Ok(Some(n as u32)),
                Some(n) => Err(invalid(format!("{F}[{i}].{field}"), format!("{n} is above {max}"))),
            }
        };
        let major = number("major", d.major(), 0xfff)?;
        let minor = number("minor", d.minor(), 0xf_ffff)?;
        let access = match d.access().as_deref() {
            None | Some("") => ACC_ALL,
            Some(s) => {
                let mut a = 0;
                for c in s.chars() {
                    a |= match c {
                        'r' => ACC_READ,
                        'w' => ACC_WRITE,
                        'm' => ACC_MKNOD,
                        _ => return Err(invalid(format!("{F}[{i}].access"), format!("{s:?} is not made of r, w, m"))),
                    };
                }
                a
            }
        };
        out.push(Rule { allow: d.allow(), kind, major, minor, access });
    }
    out.extend_from_slice(DEFAULT_RULES);
    Ok(out)
}

fn invalid(field: String, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidSpec { field, msg: msg.into() }
}

/// One eBPF instruction, laid out as the kernel's `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src register in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes (class | op | source).
pub(crate) const LDX_MEM_W: u8 = 0x61;
pub(crate) const ALU32_AND_K: u8 = 0x54;
pub(crate) const ALU32_RSH_K: u8 = 0x74;
pub(crate) const ALU64_AND_K: u8 = 0x57;
pub(crate) const ALU64_MOV_K: u8 = 0xb7;
pub(crate) const ALU64_MOV_X: u8 = 0xbf;
pub(crate) const JMP_JEQ_K: u8 = 0x15;
pub(crate) const JMP_JNE_K: u8 = 0x55;
pub(crate) const JMP_JNE_X: u8 = 0x5d;
pub(crate) const JMP_EXIT: u8 = 0x95;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// The BPF program for `rules`. Context (`struct bpf_cgroup_dev_ctx`): access_type (access << 16
/// | type) at 0, major at 4, minor at 8. Registers: r2 type, r3 access, r4 major, r5 minor; the
/// rules are tested last first, each falling through to the next when it does not match; r0 is
/// 1 (allow) or 0 (deny). Rules that an earlier-tested catch-all rule hides are left out (the
/// verifier rejects unreachable code).
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Conditional jumps to the end of the block, patched once its length is known.
        let mut block: Vec<Insn> = Vec::new();
        if let Some(t) = r.kind.code() {
            block.push(insn(JMP_JNE_K, 2, 0, 0, t));
        }
        if r.access != ACC_ALL {
            block.push(insn(ALU64_MOV_X, 1, 3, 0, 0));
            block.push(insn(ALU64_AND_K, 1, 0, 0, r.access.into()));
            if r.allow {
                // Some requested access is not in the rule.
                block.push(insn(JMP_JNE_X, 1, 3, 0, 0));
            } else {
                // No requested access is in the rule.
                block.push(insn(JMP_JEQ_K, 1, 0, 0, 0));
            }
        }
        if let Some(m) = r.major {
            block.push(insn(JMP_JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            block.push(insn(JMP_JNE_K, 5, 0, 0, m as i32));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, r.allow.into()));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if matches!(ins.code, JMP_JNE_K | JMP_JNE_X | JMP_JEQ_K) {
                ins.off = (len - i - 1) as i16;
            }
        }
        p.extend(block);
        if r.matches_all() {
            return p;
        }
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads (and for PROG_LOAD, fills a log buffer through) an attribute struct of
    // the size given; every pointer in it refers to memory that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads a device program into the kernel; on a verifier rejection, the error carries the end of
/// the verifier's log.
pub fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"shoji_devices\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EACCES)) => {
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            Err(io::Error::new(
                e.kind(),
                format!("{e}; verifier: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
            ))
        }
        Err(e) => Err(e),
    }
}

/// Attaches `prog` to the cgroup2 directory `cgroup` in exclusive mode: it replaces the program
/// attached there before, and no cgroup below may attach one of its own.
pub fn attach(cgroup: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests;
