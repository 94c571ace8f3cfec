//! Compiles an OCI `linux.seccomp` profile into a classic BPF program for `seccomp(2)`.
//!
//! Pure Rust on purpose: the agent is a static (musl or glibc) binary and libseccomp is C. The
//! program is built in the agent and only loaded by the container process, right before it execs
//! the user program, so a profile that cannot be compiled fails `create` and is never skipped.
//!
//! Semantics (those of runc with libseccomp):
//! * syscall names unknown to this table are skipped with a warning (profiles name syscalls of
//!   newer kernels or other architectures);
//! * several conditions on different arguments of one entry must all hold; conditions on the same
//!   argument are alternatives (each becomes its own rule);
//! * for one syscall, rules with conditions are tried before rules without, then the first
//!   matching rule decides; unmatched syscalls get `defaultAction`;
//! * `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE` without `errnoRet` return EPERM;
//! * only the native ABI is filtered: a syscall made through another ABI (i386 `int 0x80`, x32)
//!   kills the process, libseccomp's default "bad architecture" action;
//! * `SCMP_ACT_NOTIFY` and `listenerPath` (user notification) are not supported: an error.
use super::{Result, RuntimeError};
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator};

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter: instructions plus the `seccomp(SECCOMP_SET_MODE_FILTER)` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
    pub flags: u32,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGT_K: u16 = 0x25;
const BPF_JGE_K: u16 = 0x35;
const BPF_AND_K: u16 = 0x54;
const BPF_RET_K: u16 = 0x06;
const BPF_MAXINSNS: usize = 4096;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_KILL_THREAD: u32 = 0;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_TRACE: u32 = 0x7ff0_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;

const FLAG_TSYNC: u32 = 1;
const FLAG_LOG: u32 = 2;
const FLAG_SPEC_ALLOW: u32 = 4;

#[cfg(target_arch = "x86_64")]
mod native {
    pub const AUDIT_ARCH: u32 = 0xc000_003e;
    pub const ARCH: oci_spec::runtime::Arch = oci_spec::runtime::Arch::ScmpArchX86_64;
    /// x32 syscalls arrive with AUDIT_ARCH_X86_64 and this bit set in the number.
    pub const X32_BIT: Option<u32> = Some(0x4000_0000);
    pub(crate) use super::super::syscalls_x86_64::SYSCALLS;
}

#[cfg(not(target_arch = "x86_64"))]
mod native {
    pub const AUDIT_ARCH: u32 = 0;
    pub const X32_BIT: Option<u32> = None;
    pub const SYSCALLS: &[(&str, u32)] = &[];
}

/// The syscall number of `name` on the native architecture.
pub fn syscall_nr(name: &str) -> Option<u32> {
    native::SYSCALLS.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidSpec { field: field.into(), msg: msg.into() }
}

fn action_value(field: &str, action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<u32> {
    let data = |what: &str| -> Result<u32> {
        match errno_ret {
            None => Ok(libc::EPERM as u32),
            Some(v) if v <= 0xffff => Ok(v),
            Some(v) => Err(invalid(format!("{field}.errnoRet"), format!("{v} does not fit the 16 bits of {what}"))),
        }
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data("SCMP_ACT_ERRNO")?,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data("SCMP_ACT_TRACE")?,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(invalid(field, "SCMP_ACT_NOTIFY (seccomp user notification) is not supported"))
        }
    })
}

#[derive(Debug, Clone, Copy)]
struct Cond {
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

#[derive(Debug, Clone)]
struct Rule {
    nr: u32,
    action: u32,
    conds: Vec<Cond>,
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// Compiles `profile` for the native architecture.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program> {
    const F: &str = "linux.seccomp";
    if cfg!(not(target_arch = "x86_64")) {
        return Err(invalid(F, "seccomp profiles are only supported on x86_64 so far"));
    }
    if profile.listener_path().is_some() {
        return Err(invalid(format!("{F}.listenerPath"), "seccomp user notification is not supported"));
    }
    if let Some(archs) = profile.architectures() {
        if !archs.is_empty() && !archs.iter().any(|a| *a == native_arch() || *a == Arch::ScmpArchNative) {
            return Err(invalid(
                format!("{F}.architectures"),
                format!("{archs:?} does not include the native architecture {:?}", native_arch()),
            ));
        }
    }
    let mut flags = 0;
    for (i, f) in profile.flags().iter().flatten().enumerate() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(invalid(
                    format!("{F}.flags[{i}]"),
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV needs user notification, which is not supported",
                ))
            }
        };
    }
    let default = action_value(&format!("{F}.defaultAction"), profile.default_action(), profile.default_errno_ret())?;

    // Expand entries into rules, in profile order.
    let mut rules: Vec<Rule> = Vec::new();
    let mut unknown: Vec<&str> = Vec::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("{F}.syscalls[{i}]");
        let action = action_value(&field, sc.action(), sc.errno_ret())?;
        let mut conds = Vec::new();
        for (j, a) in sc.args().iter().flatten().enumerate() {
            if a.index() >= 6 {
                return Err(invalid(
                    format!("{field}.args[{j}].index"),
                    format!("{} is not an argument index (0..=5)", a.index()),
                ));
            }
            conds.push(Cond {
                index: a.index() as u32,
                op: a.op(),
                value: a.value(),
                value_two: a.value_two().unwrap_or(0),
            });
        }
        // Conditions on the same argument are alternatives: one rule each (runc's rule).
        let mut indices: Vec<u32> = conds.iter().map(|c| c.index).collect();
        indices.sort_unstable();
        let same_index = indices.windows(2).any(|w| w[0] == w[1]);
        let groups: Vec<Vec<Cond>> = if same_index { conds.iter().map(|c| vec![*c]).collect() } else { vec![conds] };
        for name in sc.names() {
            let Some(nr) = syscall_nr(name) else {
                unknown.push(name);
                continue;
            };
            for g in &groups {
                rules.push(Rule { nr, action, conds: g.clone() });
            }
        }
    }
    if !unknown.is_empty() {
        tracing::warn!("seccomp profile: skipping syscalls unknown on this architecture: {}", unknown.join(", "));
    }

    // Per syscall, rules with conditions first (stable), keeping first-appearance order of syscalls.
    let mut order: Vec<u32> = Vec::new();
    for r in &rules {
        if !order.contains(&r.nr) {
            order.push(r.nr);
        }
    }
    let mut sorted: Vec<&Rule> = Vec::with_capacity(rules.len());
    for nr in &order {
        sorted.extend(rules.iter().filter(|r| r.nr == *nr && !r.conds.is_empty()));
        if let Some(r) = rules.iter().find(|r| r.nr == *nr && r.conds.is_empty()) {
            sorted.push(r);
        }
    }

    // Architecture check, then the x32 ABI check.
    let mut p: Vec<Insn> = vec![
        insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        insn(BPF_JEQ_K, 1, 0, native::AUDIT_ARCH),
        insn(BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
    ];
    if let Some(bit) = native::X32_BIT {
        p.push(insn(BPF_JGE_K, 0, 1, bit));
        p.push(insn(BPF_RET_K, 0, 0, RET_KILL_PROCESS));
    }
    for r in sorted {
        if r.conds.is_empty() {
            p.push(insn(BPF_JEQ_K, 0, 1, r.nr));
            p.push(insn(BPF_RET_K, 0, 0, r.action));
            continue;
        }
        // Block: JEQ nr (miss → END); conditions (fail → END); RET action; END: reload nr.
        let mut body: Vec<Insn> = Vec::new();
        for c in &r.conds {
            cond_code(c, &mut body);
        }
        let start = p.len();
        let end = start + 1 + body.len() + 1; // index of the reload
        p.push(insn(BPF_JEQ_K, 0, jump(start, end)?, r.nr));
        for (i, mut ins) in body.into_iter().enumerate() {
            let at = start + 1 + i;
            if ins.jt == FAIL {
                ins.jt = jump(at, end)?;
            }
            if ins.jf == FAIL {
                ins.jf = jump(at, end)?;
            }
            p.push(ins);
        }
        p.push(insn(BPF_RET_K, 0, 0, r.action));
        p.push(insn(BPF_LD_W_ABS, 0, 0, OFF_NR));
    }
    p.push(insn(BPF_RET_K, 0, 0, default));
    if p.len() > BPF_MAXINSNS {
        return Err(invalid(
            F,
            format!("the profile compiles to {} BPF instructions, more than the kernel's {BPF_MAXINSNS}", p.len()),
        ));
    }
    Ok(Program { insns: p, flags })
}

fn native_arch() -> Arch {
    #[cfg(target_arch = "x86_64")]
    {
        native::ARCH
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Arch::ScmpArchNative
    }
}

/// Placeholder jump offset meaning "to the end of the rule block" (fixed up by `compile`).
const FAIL: u8 = 0xff;

fn jump(from: usize, to: usize) -> Result<u8> {
    u8::try_from(to - from - 1).map_err(|_| invalid("linux.seccomp", "a rule is too long for a BPF jump"))
}

/// Emits the comparison of argument `c.index` with the condition; falls through when it holds,
/// jumps to FAIL when it does not.
fn cond_code(c: &Cond, out: &mut Vec<Insn>) {
    let hi_off = OFF_ARGS + 8 * c.index + 4;
    let lo_off = OFF_ARGS + 8 * c.index;
    let (vhi, vlo) = ((c.value >> 32) as u32, c.value as u32);
    let ld = |off| insn(BPF_LD_W_ABS, 0, 0, off);
    let j = insn;
    match c.op {
        LinuxSeccompOperator::ScmpCmpEq => {
            out.push(ld(hi_off));
            out.push(j(BPF_JEQ_K, 0, FAIL, vhi));
            out.push(ld(lo_off));
            out.push(j(BPF_JEQ_K, 0, FAIL, vlo));
        }
        LinuxSeccompOperator::ScmpCmpNe => {
            out.push(ld(hi_off));
            out.push(j(BPF_JEQ_K, 0, 2, vhi)); // high words differ → holds
            out.push(ld(lo_off));
            out.push(j(BPF_JEQ_K, FAIL, 0, vlo));
        }
        LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe => {
            let last = if c.op == LinuxSeccompOperator::ScmpCmpGt { BPF_JGT_K } else { BPF_JGE_K };
            out.push(ld(hi_off));
            out.push(j(BPF_JGT_K, 3, 0, vhi)); // hi > vhi → holds
            out.push(j(BPF_JEQ_K, 0, FAIL, vhi)); // hi < vhi → fails
            out.push(ld(lo_off));
            out.push(j(last, 0, FAIL, vlo));
        }
        LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe => {
            // a < v ⇔ !(a >= v); a <= v ⇔ !(a > v)
            let last = if c.op == LinuxSeccompOperator::ScmpCmpLt { BPF_JGE_K } else { BPF_JGT_K };
            out.push(ld(hi_off));
            out.push(j(BPF_JGT_K, FAIL, 0, vhi)); // hi > vhi → fails
            out.push(j(BPF_JEQ_K, 0, 2, vhi)); // hi < vhi → holds
            out.push(ld(lo_off));
            out.push(j(last, FAIL, 0, vlo));
        }
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (mhi, mlo) = ((c.value >> 32) as u32, c.value as u32);
            let (whi, wlo) = ((c.value_two >> 32) as u32, c.value_two as u32);
            out.push(ld(hi_off));
            out.push(insn(BPF_AND_K, 0, 0, mhi));
            out.push(j(BPF_JEQ_K, 0, FAIL, whi));
            out.push(ld(lo_off));
            out.push(insn(BPF_AND_K, 0, 0, mlo));
            out.push(j(BPF_JEQ_K, 0, FAIL, wlo));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSyscallBuilder};

    /// A tiny classic-BPF interpreter for the instructions `compile` emits.
    fn run(p: &Program, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p.insns[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_AND_K => acc &= i.k,
                BPF_RET_K => return i.k,
                BPF_JEQ_K | BPF_JGT_K | BPF_JGE_K => {
                    let t = match i.code {
                        BPF_JEQ_K => acc == i.k,
                        BPF_JGT_K => acc > i.k,
                        _ => acc >= i.k,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const ARCH: u32 = 0xc000_003e;

    fn nr(name: &str) -> u32 {
        syscall_nr(name).unwrap()
    }

    fn profile(default: LinuxSeccompAction, syscalls: Vec<oci_spec::runtime::LinuxSyscall>) -> LinuxSeccomp {
        LinuxSeccompBuilder::default().default_action(default).syscalls(syscalls).build().unwrap()
    }

    fn arg(index: usize, op: LinuxSeccompOperator, value: u64, two: Option<u64>) -> oci_spec::runtime::LinuxSeccompArg {
        let b = LinuxSeccompArgBuilder::default().index(index).op(op).value(value);
        match two {
            Some(t) => b.value_two(t).build().unwrap(),
            None => b.build().unwrap(),
        }
    }

    #[test]
    fn deny_list_and_default() {
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            vec![LinuxSyscallBuilder::default()
                .names(vec!["mkdir".into(), "mkdirat".into(), "no_such_syscall".into()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .build()
                .unwrap()],
        ))
        .unwrap();
        assert_eq!(run(&p, ARCH, nr("mkdir"), [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&p, ARCH, nr("mkdirat"), [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&p, ARCH, nr("read"), [0; 6]), RET_ALLOW);
        // Other ABIs are killed.
        assert_eq!(run(&p, 0x4000_0003, 39, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&p, ARCH, 0x4000_0000 | nr("mkdir"), [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn allow_list_with_errno_default() {
        let mut s = profile(
            LinuxSeccompAction::ScmpActErrno,
            vec![LinuxSyscallBuilder::default()
                .names(vec!["read".into(), "write".into()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .build()
                .unwrap()],
        );
        s.set_default_errno_ret(Some(38));
        let p = compile(&s).unwrap();
        assert_eq!(run(&p, ARCH, nr("write"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("openat"), [0; 6]), RET_ERRNO | 38);
    }

    #[test]
    fn argument_comparisons_are_64_bit() {
        use LinuxSeccompOperator::*;
        let values = [0u64, 1, 7, 8, 9, 0xffff_ffff, 0x1_0000_0000, 0x1_0000_0008, u64::MAX];
        for op in [ScmpCmpEq, ScmpCmpNe, ScmpCmpLt, ScmpCmpLe, ScmpCmpGt, ScmpCmpGe] {
            for v in [8u64, 0x1_0000_0008, 0] {
                let p = compile(&profile(
                    LinuxSeccompAction::ScmpActAllow,
                    vec![LinuxSyscallBuilder::default()
                        .names(vec!["personality".into()])
                        .action(LinuxSeccompAction::ScmpActErrno)
                        .args(vec![arg(2, op, v, None)])
                        .build()
                        .unwrap()],
                ))
                .unwrap();
                for a in values {
                    let want = match op {
                        ScmpCmpEq => a == v,
                        ScmpCmpNe => a != v,
                        ScmpCmpLt => a < v,
                        ScmpCmpLe => a <= v,
                        ScmpCmpGt => a > v,
                        ScmpCmpGe => a >= v,
                        _ => unreachable!(),
                    };
                    let got = run(&p, ARCH, nr("personality"), [0, 0, a, 0, 0, 0]) == RET_ERRNO | 1;
                    assert_eq!(got, want, "{op:?} arg={a:#x} value={v:#x}");
                }
            }
        }
    }

    #[test]
    fn masked_eq_and_alternatives() {
        use LinuxSeccompOperator::*;
        // clone allowed unless a namespace flag (0x7e020000) is set; personality 0 or 8 allowed.
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActErrno,
            vec![
                LinuxSyscallBuilder::default()
                    .names(vec!["clone".into()])
                    .action(LinuxSeccompAction::ScmpActAllow)
                    .args(vec![arg(0, ScmpCmpMaskedEq, 0x7e02_0000, Some(0))])
                    .build()
                    .unwrap(),
                LinuxSyscallBuilder::default()
                    .names(vec!["personality".into()])
                    .action(LinuxSeccompAction::ScmpActAllow)
                    .args(vec![arg(0, ScmpCmpEq, 0, None), arg(0, ScmpCmpEq, 8, None)])
                    .build()
                    .unwrap(),
            ],
        ))
        .unwrap();
        assert_eq!(run(&p, ARCH, nr("clone"), [0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("clone"), [0x2000_0000 | 0x11, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(run(&p, ARCH, nr("personality"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("personality"), [8, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("personality"), [9, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(run(&p, ARCH, nr("read"), [0; 6]), RET_ERRNO | 1);
    }

    #[test]
    fn conditional_rules_before_unconditional_and_all_conditions_hold() {
        use LinuxSeccompOperator::*;
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActKillProcess,
            vec![
                LinuxSyscallBuilder::default()
                    .names(vec!["socket".into()])
                    .action(LinuxSeccompAction::ScmpActAllow)
                    .build()
                    .unwrap(),
                LinuxSyscallBuilder::default()
                    .names(vec!["socket".into()])
                    .action(LinuxSeccompAction::ScmpActErrno)
                    .errno_ret(13u32)
                    .args(vec![arg(0, ScmpCmpEq, 16, None), arg(1, ScmpCmpEq, 3, None)])
                    .build()
                    .unwrap(),
            ],
        ))
        .unwrap();
        assert_eq!(run(&p, ARCH, nr("socket"), [16, 3, 0, 0, 0, 0]), RET_ERRNO | 13);
        assert_eq!(run(&p, ARCH, nr("socket"), [16, 2, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("socket"), [2, 3, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, nr("bind"), [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn unsupported_inputs_are_errors() {
        let notify = profile(
            LinuxSeccompAction::ScmpActAllow,
            vec![LinuxSyscallBuilder::default()
                .names(vec!["mkdir".into()])
                .action(LinuxSeccompAction::ScmpActNotify)
                .build()
                .unwrap()],
        );
        let e = compile(&notify).unwrap_err().to_string();
        assert!(e.contains("linux.seccomp.syscalls[0]") && e.contains("NOTIFY"), "{e}");

        let mut bad_errno = profile(LinuxSeccompAction::ScmpActErrno, vec![]);
        bad_errno.set_default_errno_ret(Some(70000));
        assert!(compile(&bad_errno).unwrap_err().to_string().contains("defaultAction.errnoRet"));

        let mut arm = profile(LinuxSeccompAction::ScmpActAllow, vec![]);
        arm.set_architectures(Some(vec![Arch::ScmpArchAarch64]));
        assert!(compile(&arm).unwrap_err().to_string().contains("linux.seccomp.architectures"));

        let bad_index = profile(
            LinuxSeccompAction::ScmpActAllow,
            vec![LinuxSyscallBuilder::default()
                .names(vec!["mkdir".into()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .args(vec![arg(6, LinuxSeccompOperator::ScmpCmpEq, 0, None)])
                .build()
                .unwrap()],
        );
        assert!(compile(&bad_index).unwrap_err().to_string().contains("args[0].index"));
    }

    proptest::proptest! {
        #[test]
        fn random_comparisons_match(op in 0usize..7, value: u64, two: u64, a: u64, index in 0usize..6) {
            use LinuxSeccompOperator::*;
            let op = [ScmpCmpEq, ScmpCmpNe, ScmpCmpLt, ScmpCmpLe, ScmpCmpGt, ScmpCmpGe, ScmpCmpMaskedEq][op];
            let p = compile(&profile(
                LinuxSeccompAction::ScmpActAllow,
                vec![LinuxSyscallBuilder::default()
                    .names(vec!["ioctl".into()])
                    .action(LinuxSeccompAction::ScmpActErrno)
                    .args(vec![arg(index, op, value, Some(two))])
                    .build()
                    .unwrap()],
            ))
            .unwrap();
            let want = match op {
                ScmpCmpEq => a == value,
                ScmpCmpNe => a != value,
                ScmpCmpLt => a < value,
                ScmpCmpLe => a <= value,
                ScmpCmpGt => a > value,
                ScmpCmpGe => a >= value,
                ScmpCmpMaskedEq => a & value == two,
            };
            let mut args = [0u64; 6];
            args[index] = a;
            let got = run(&p, ARCH, nr("ioctl"), args) == RET_ERRNO | 1;
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn docker_sized_profile_fits() {
        let names: Vec<String> = native::SYSCALLS.iter().map(|(n, _)| n.to_string()).collect();
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActErrno,
            vec![LinuxSyscallBuilder::default().names(names).action(LinuxSeccompAction::ScmpActAllow).build().unwrap()],
        ))
        .unwrap();
        assert!(p.insns.len() < BPF_MAXINSNS);
        assert_eq!(run(&p, ARCH, nr("execve"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, ARCH, 999, [0; 6]), RET_ERRNO | 1);
    }
}
